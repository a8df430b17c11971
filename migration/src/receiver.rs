//! The destination side: [`Receiver`] consumes the stream into a
//! [`DestinationVm`].
//!
//! Order of events (see the state machine in [`crate::stream`]): send the
//! version offer; on the configuration record create the empty VM
//! ([`DestinationVm::prepare`]); apply memory records; collect vCPU and
//! device state; on the end record compute the image digest from the
//! destination's own memory (see [`DigestCheck`]), compare, restore vCPU
//! and device state, and answer `ready`; resume only on `go`, then answer
//! `resumed`.
//!
//! Verification mode: when the source sent a memory verify record (the
//! digest of its whole memory with the VM paused), the end-record check
//! re-reads and hashes the whole destination memory whatever the
//! [`DigestCheck`], and the result must equal both the end digest (the
//! image sent) and the verify digest (the source's memory); a mismatch
//! aborts before `ready`.
//!
//! Invariants:
//! - The VM is resumed only after the digest matched (and, after a verify
//!   record, the source's memory digest too), all state was restored, and
//!   the source sent `go`.
//! - Every failure before resume discards the destination VM and
//!   (best effort) tells the source, which then resumes its own copy.
//! - RAM handed over by `prepare` is zero-filled, so a zero marker for a
//!   frame never written in this migration costs nothing; a zero marker for
//!   a written frame zeroes it.

use crate::bitmap::DirtyBitmap;
use crate::digest::{
    is_zero_page, page_hash, page_hash_at, page_hash_of_crc, zero_page_hash, ImageDigest,
};
use crate::error::{MigrationError, StreamError, VmError};
use crate::report::MigrationResult;
use crate::state::{DeviceState, VcpuState, VmConfig};
use crate::stream::{versions_for, Decoder, Direction, Item, Record, MAGIC_DEST, PROGRESS_VERSION};
use crate::transport::Transport;
use crate::{Page, PAGE_SIZE};
use alloc::boxed::Box;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// The empty VM on the destination host that receives a migration.
pub trait DestinationVm {
    /// Create RAM (zero-filled), vCPUs and devices for `config`, or refuse
    /// (e.g. a CPUID feature this host cannot show, not enough memory).
    fn prepare(&mut self, config: &VmConfig) -> Result<(), VmError>;
    /// Store one page.
    fn write_page(&mut self, gfn: u64, data: &Page) -> Result<(), VmError>;
    /// Zero one page that was written earlier in this migration.
    fn zero_page(&mut self, gfn: u64) -> Result<(), VmError>;
    /// Read one page back (for the digest).
    fn read_page(&mut self, gfn: u64, buf: &mut Page) -> Result<(), VmError>;
    /// Load vCPU state, ids `0..n` in order. Values are allegations: the
    /// backend checks architectural consistency and refuses what it cannot
    /// load.
    fn restore_vcpus(&mut self, vcpus: &[VcpuState]) -> Result<(), VmError>;
    /// Load device state, in configuration order.
    fn restore_devices(&mut self, devices: &[DeviceState]) -> Result<(), VmError>;
    /// Start the vCPUs.
    fn resume(&mut self) -> Result<(), VmError>;
    /// Throw the VM away (the migration failed; the source keeps it). Called
    /// after any `prepare`, even a refused one.
    fn discard(&mut self);
}

impl<D: DestinationVm + ?Sized> DestinationVm for &mut D {
    fn prepare(&mut self, config: &VmConfig) -> Result<(), VmError> {
        (**self).prepare(config)
    }
    fn write_page(&mut self, gfn: u64, data: &Page) -> Result<(), VmError> {
        (**self).write_page(gfn, data)
    }
    fn zero_page(&mut self, gfn: u64) -> Result<(), VmError> {
        (**self).zero_page(gfn)
    }
    fn read_page(&mut self, gfn: u64, buf: &mut Page) -> Result<(), VmError> {
        (**self).read_page(gfn, buf)
    }
    fn restore_vcpus(&mut self, vcpus: &[VcpuState]) -> Result<(), VmError> {
        (**self).restore_vcpus(vcpus)
    }
    fn restore_devices(&mut self, devices: &[DeviceState]) -> Result<(), VmError> {
        (**self).restore_devices(devices)
    }
    fn resume(&mut self) -> Result<(), VmError> {
        (**self).resume()
    }
    fn discard(&mut self) {
        (**self).discard()
    }
}

/// How the destination computes the digest it compares with the source's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DigestCheck {
    /// Hash every page as it is written (the record's bytes handed to
    /// [`DestinationVm::write_page`]; a zeroed page hashes as zero without
    /// a read) and keep the hash (8 bytes per guest page); at the end
    /// record only fold the hashes. One CRC pass over each page received
    /// (version 5, over a sealed link: none, the hash names the page's
    /// stream offset and the link's tag checked its bytes) and no
    /// read-back (issue 13: at most one checksum pass per side when
    /// verification is off); the fold is all the pause pays. Catches lost,
    /// stale, misplaced or misapplied records; not a `write_page` that
    /// stores something other than it was given, nor memory corrupted
    /// later.
    HashOnWrite,
    /// Re-read and hash the whole image from the destination's memory
    /// ([`DestinationVm::read_page`]) at the end record. Catches what
    /// [`DigestCheck::HashOnWrite`] cannot, but costs a full memory pass
    /// while the VM is paused. Verification mode always does this.
    FullImageAtEnd,
}

/// What a receiver step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvProgress {
    /// Work was done; step again.
    Busy,
    /// Waiting for bytes from the source.
    Waiting,
    /// Over; see [`Receiver::outcome`].
    Finished(MigrationResult),
}

/// The destination's account of a migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiveOutcome {
    /// `completed`: the VM runs here. `cancelled`: the source aborted.
    /// `failed`: an error here or on the channel.
    pub result: MigrationResult,
    /// Why not completed.
    pub error: Option<String>,
    /// The digest that was verified (set once it matched).
    pub verified_digest: Option<u64>,
    /// The source sent a memory verify record and the whole destination
    /// memory, re-read, hashed to its digest.
    pub memory_verified: bool,
    /// Page payloads written.
    pub pages_written: u64,
    /// Pages covered by zero markers.
    pub zero_pages: u64,
    /// Bytes received.
    pub bytes_received: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Start,
    Receiving,
    /// Folding the image digest: next gfn.
    Verifying {
        next_gfn: u64,
        expected: u64,
    },
    /// Verified; `ready` goes out at `until_ns` (a test knob,
    /// [`Receiver::with_holds`]).
    HoldReady {
        digest: u64,
        until_ns: u64,
    },
    AwaitGo,
    /// Resumed on `go`; `resumed` goes out at `until_ns` (a test knob).
    HoldResumed {
        until_ns: u64,
    },
    Finished,
}

/// Receive chunk per step.
const RECV_CHUNK: usize = 64 * 1024;
/// Version 4: a progress record goes back after this many more stream
/// bytes were applied (one per 64-page record, 41 bytes sealed).
const PROGRESS_EVERY_BYTES: u64 = 128 * 1024;
/// Pages hashed per verification step.
const VERIFY_PAGES_PER_STEP: u64 = 1024;
/// Page hashes folded per verification step ([`DigestCheck::HashOnWrite`]).
const FOLD_HASHES_PER_STEP: u64 = 1 << 16;

/// Default for [`Receiver::with_stall_timeout`].
pub const RECEIVER_STALL_TIMEOUT_NS: u64 = 30_000_000_000;

/// One incoming live migration: the receiving engine's state. The empty VM
/// and the link are lent to each step ([`Receiver::step`]).
pub struct Receiver {
    decoder: Decoder,
    stall_timeout_ns: u64,
    last_byte_ns: u64,
    phase: Phase,
    ram_pages: u64,
    written: DirtyBitmap,
    check: DigestCheck,
    page_hashes: Vec<u64>,
    vcpus: Vec<VcpuState>,
    devices: Vec<DeviceState>,
    /// The source's memory digest from its verify record.
    source_memory: Option<u64>,
    digest: ImageDigest,
    page: Box<Page>,
    prepared: bool,
    /// Stream bytes applied as of the last progress record sent.
    progress_sent: u64,
    /// Test knobs: how long to wait before `ready` and before `resumed`.
    hold_ready_ns: u64,
    hold_resumed_ns: u64,
    /// Node time of the current step.
    now_ns: u64,
    outcome: ReceiveOutcome,
    error: Option<MigrationError>,
}

impl Receiver {
    /// Wait for a migration, from node time `now_ns`.
    pub fn new(now_ns: u64) -> Self {
        Self {
            decoder: Decoder::new(Direction::SourceToDest),
            stall_timeout_ns: RECEIVER_STALL_TIMEOUT_NS,
            last_byte_ns: now_ns,
            phase: Phase::Start,
            ram_pages: 0,
            written: DirtyBitmap::new(0),
            check: DigestCheck::HashOnWrite,
            page_hashes: Vec::new(),
            vcpus: Vec::new(),
            devices: Vec::new(),
            source_memory: None,
            digest: ImageDigest::new(),
            page: Box::new([0u8; PAGE_SIZE]),
            prepared: false,
            progress_sent: 0,
            hold_ready_ns: 0,
            hold_resumed_ns: 0,
            now_ns,
            outcome: ReceiveOutcome {
                result: MigrationResult::Failed,
                error: None,
                verified_digest: None,
                memory_verified: false,
                pages_written: 0,
                zero_pages: 0,
                bytes_received: 0,
            },
            error: None,
        }
    }

    /// Choose how the digest is checked (default
    /// [`DigestCheck::HashOnWrite`]).
    pub fn with_digest_check(mut self, check: DigestCheck) -> Self {
        self.check = check;
        self
    }

    /// Give up (discard the VM) when the source sends nothing for this
    /// long (default [`RECEIVER_STALL_TIMEOUT_NS`]). Safe in every phase:
    /// the source resumes its own copy unless this side resumed, which it
    /// does only on `go`.
    pub fn with_stall_timeout(mut self, ns: u64) -> Self {
        self.stall_timeout_ns = ns;
        self
    }

    /// Test knobs (docs/MANAGEMENT.md, "Test knobs"): wait `ready_ns`
    /// after the verification before answering `ready`, and `resumed_ns`
    /// after resuming the VM on `go` before confirming `resumed`. They
    /// change only when this side answers, never what it does; a `go`
    /// still resumes the VM at once, and the source's stall timeout still
    /// applies to it.
    pub fn with_holds(mut self, ready_ns: u64, resumed_ns: u64) -> Self {
        self.hold_ready_ns = ready_ns;
        self.hold_resumed_ns = resumed_ns;
        self
    }

    /// Do a bounded amount of work with the destination VM and the link, at
    /// node time `now_ns`: one record, or one receive of at most 64 KiB, or
    /// a bounded slice of the digest verification.
    pub fn step<D, T>(&mut self, vm: &mut D, link: &mut T, now_ns: u64) -> RecvProgress
    where
        D: DestinationVm + ?Sized,
        T: Transport + ?Sized,
    {
        if self.phase == Phase::Finished {
            return RecvProgress::Finished(self.outcome.result);
        }
        self.now_ns = now_ns;
        let before = self.outcome.bytes_received;
        let result = self.step_inner(vm, link);
        if self.outcome.bytes_received != before
            || matches!(
                self.phase,
                Phase::HoldReady { .. } | Phase::HoldResumed { .. }
            )
        {
            // A hold is this side's own silence, not the source's.
            self.last_byte_ns = now_ns;
        }
        match result {
            Ok(RecvProgress::Waiting)
                if now_ns.saturating_sub(self.last_byte_ns) >= self.stall_timeout_ns =>
            {
                let silent_ms = now_ns.saturating_sub(self.last_byte_ns) / 1_000_000;
                self.fail(
                    vm,
                    link,
                    MigrationError::LinkStalled {
                        silent_ms,
                        waiting_for: "the source's data",
                    },
                );
                RecvProgress::Finished(self.outcome.result)
            }
            Ok(p) => p,
            Err(e) => {
                self.fail(vm, link, e);
                RecvProgress::Finished(self.outcome.result)
            }
        }
    }

    /// Give up (management request, or the source's question about an
    /// in-doubt switch-over): discard the VM, tell the source. Does nothing
    /// once the VM has resumed or the migration ended; returns whether it
    /// gave up.
    pub fn cancel<D, T>(&mut self, vm: &mut D, link: &mut T, why: MigrationError) -> bool
    where
        D: DestinationVm + ?Sized,
        T: Transport + ?Sized,
    {
        if self.phase == Phase::Finished {
            return false;
        }
        if self.resumed() {
            // Held before confirming: the VM runs here, for good.
            self.phase = Phase::Finished;
            return false;
        }
        self.fail(vm, link, why);
        true
    }

    /// The link failed under the job: the same as a transport error in a
    /// step (the VM is discarded unless it resumed already).
    pub fn link_failed<D, T>(&mut self, vm: &mut D, link: &mut T, why: crate::TransportError)
    where
        D: DestinationVm + ?Sized,
        T: Transport + ?Sized,
    {
        if self.resumed() {
            // The VM runs here; only the confirmation is lost.
            if self.phase != Phase::Finished {
                self.outcome.error = Some(alloc::format!(
                    "resumed, but could not confirm to the source: {why}"
                ));
                self.phase = Phase::Finished;
            }
        } else if self.phase != Phase::Finished {
            self.fail(vm, link, MigrationError::Transport(why));
        }
    }

    /// The outcome; final once [`RecvProgress::Finished`] was returned.
    pub fn outcome(&self) -> &ReceiveOutcome {
        &self.outcome
    }

    /// Why the migration did not complete here.
    pub fn error(&self) -> Option<&MigrationError> {
        self.error.as_ref()
    }

    /// Whether the source's `go` arrived and the VM was resumed here.
    pub fn resumed(&self) -> bool {
        self.outcome.result == MigrationResult::Completed
    }

    /// Whether this side answered `ready` and waits for `go`.
    pub fn awaiting_go(&self) -> bool {
        self.phase == Phase::AwaitGo
    }

    fn send_record<T: Transport + ?Sized>(
        &mut self,
        link: &mut T,
        rec: &Record,
    ) -> Result<(), MigrationError> {
        let mut out = Vec::new();
        rec.encode(&mut out);
        link.send(&out)?;
        Ok(())
    }

    /// Version 4, while memory arrives: tell the source how much of its
    /// stream is applied here once `every` more bytes were (every
    /// [`PROGRESS_EVERY_BYTES`] while records keep coming, at once when
    /// nothing more has arrived), so what it has sent beyond that (what a
    /// pause would wait for) stays bounded and known.
    fn report_progress<T: Transport + ?Sized>(&mut self, link: &mut T, every: u64) {
        if self.decoder.version() < PROGRESS_VERSION || self.phase != Phase::Receiving {
            return;
        }
        let applied = self
            .outcome
            .bytes_received
            .saturating_sub(self.decoder.buffered_bytes() as u64);
        if applied < self.progress_sent.saturating_add(every) {
            return;
        }
        self.progress_sent = applied;
        // Advisory: a link that broke shows at the next receive, after
        // what arrived before the break (e.g. the source's abort) is read.
        let _ = self.send_record(link, &Record::Progress { applied });
    }

    fn step_inner<D, T>(&mut self, vm: &mut D, link: &mut T) -> Result<RecvProgress, MigrationError>
    where
        D: DestinationVm + ?Sized,
        T: Transport + ?Sized,
    {
        match self.phase {
            Phase::Start => {
                // Version 5 only over a sealed link, and only when the
                // digest is folded from hashes kept while writing (a
                // version-5 data page's hash names its place in the
                // stream, which a re-read of memory cannot tell).
                let versions =
                    versions_for(link.authenticated() && self.check == DigestCheck::HashOnWrite);
                self.decoder.set_versions(versions);
                let mut out = Vec::from(MAGIC_DEST);
                Record::Offer {
                    versions: versions.to_vec(),
                }
                .encode(&mut out);
                link.send(&out)?;
                self.phase = Phase::Receiving;
                Ok(RecvProgress::Busy)
            }
            Phase::Verifying { next_gfn, expected } => {
                let end;
                let full =
                    self.check == DigestCheck::FullImageAtEnd || self.source_memory.is_some();
                if full {
                    end = next_gfn
                        .saturating_add(VERIFY_PAGES_PER_STEP)
                        .min(self.ram_pages);
                    for gfn in next_gfn..end {
                        vm.read_page(gfn, &mut self.page)?;
                        // A zero page's hash needs no CRC (most of an idle
                        // guest's memory).
                        self.digest.push(if is_zero_page(&self.page) {
                            zero_page_hash(gfn)
                        } else {
                            page_hash(gfn, &self.page)
                        });
                    }
                } else {
                    end = next_gfn
                        .saturating_add(FOLD_HASHES_PER_STEP)
                        .min(self.ram_pages);
                    let hashes = usize::try_from(next_gfn)
                        .ok()
                        .zip(usize::try_from(end).ok())
                        .and_then(|(a, b)| self.page_hashes.get(a..b))
                        .unwrap_or(&[]);
                    for h in hashes {
                        self.digest.push(*h);
                    }
                }
                if end < self.ram_pages {
                    self.phase = Phase::Verifying {
                        next_gfn: end,
                        expected,
                    };
                    return Ok(RecvProgress::Busy);
                }
                let computed = self.digest.finish();
                if computed != expected {
                    return Err(StreamError::DigestMismatch {
                        stream: expected,
                        computed,
                    }
                    .into());
                }
                if let Some(source) = self.source_memory {
                    if source != computed {
                        return Err(MigrationError::MemoryMismatch {
                            source,
                            destination: computed,
                        });
                    }
                    self.outcome.memory_verified = true;
                }
                self.outcome.verified_digest = Some(computed);
                vm.restore_vcpus(&self.vcpus)?;
                vm.restore_devices(&self.devices)?;
                self.phase = Phase::HoldReady {
                    digest: computed,
                    until_ns: self.now_ns.saturating_add(self.hold_ready_ns),
                };
                Ok(RecvProgress::Busy)
            }
            Phase::HoldReady { digest, until_ns } if self.now_ns >= until_ns => {
                self.send_record(link, &Record::Ready { digest })?;
                self.phase = Phase::AwaitGo;
                Ok(RecvProgress::Busy)
            }
            Phase::HoldResumed { until_ns } => {
                if self.now_ns < until_ns {
                    return Ok(RecvProgress::Waiting);
                }
                self.phase = Phase::Finished;
                if let Err(e) = self.send_record(link, &Record::Resumed) {
                    self.outcome.error = Some(alloc::format!(
                        "resumed, but could not confirm to the source: {e}"
                    ));
                }
                Ok(RecvProgress::Finished(self.outcome.result))
            }
            // While holding `ready`, records still arrive (an `abort`).
            Phase::Receiving | Phase::AwaitGo | Phase::HoldReady { .. } => {
                // Records already buffered first, so the buffer stays bounded.
                match self.decoder.next_item()? {
                    Some(item @ Item::Pages { .. }) => {
                        // Straight from the decoder's buffer into guest
                        // memory.
                        Memory {
                            written: &mut self.written,
                            page_hashes: &mut self.page_hashes,
                            outcome: &mut self.outcome,
                        }
                        .pages(vm, &item)?;
                        self.report_progress(link, PROGRESS_EVERY_BYTES);
                        return Ok(RecvProgress::Busy);
                    }
                    Some(Item::Record(rec)) => {
                        let memory = matches!(rec, Record::MemZero { .. });
                        self.apply(vm, link, rec)?;
                        if memory {
                            self.report_progress(link, PROGRESS_EVERY_BYTES);
                        }
                        return Ok(RecvProgress::Busy);
                    }
                    None => {}
                }
                if let Some(r) = self.recv_lent(vm, link) {
                    return r;
                }
                // Received straight into the decoder's buffer.
                let got = link.recv(self.decoder.spare(RECV_CHUNK));
                let n = match got {
                    Ok(n) => n,
                    Err(e) => {
                        // A cut inside the stream says more than the bare
                        // transport error.
                        self.decoder.finish()?;
                        return Err(e.into());
                    }
                };
                self.decoder.filled(n);
                self.outcome.bytes_received += n as u64;
                if n == 0 {
                    // Caught up: say so, however little was applied since
                    // (the source counts what it has not heard of as still
                    // on its way).
                    self.report_progress(link, 1);
                    return Ok(RecvProgress::Waiting);
                }
                Ok(RecvProgress::Busy)
            }
            Phase::Finished => Ok(RecvProgress::Finished(self.outcome.result)),
        }
    }

    /// Receive where the link lends its stream bytes (nothing buffered in
    /// the decoder): memory records are parsed where they lie and applied
    /// at once, page bytes straight from the link's buffer into guest
    /// memory (no copy into the decoder's); the first other record stops
    /// the step and is applied after it, and what follows it, like the
    /// tail of a record cut by the end of a piece, is fed to the decoder
    /// (copied). At most [`RECV_CHUNK`] stream bytes per step. `None`
    /// when the link does not lend now.
    fn recv_lent<D, T>(
        &mut self,
        vm: &mut D,
        link: &mut T,
    ) -> Option<Result<RecvProgress, MigrationError>>
    where
        D: DestinationVm + ?Sized,
        T: Transport + ?Sized,
    {
        if self.decoder.buffered_bytes() != 0 {
            return None;
        }
        let mut lent = 0usize;
        let mut other: Option<Record> = None;
        let mut failed: Option<MigrationError> = None;
        let decoder = &mut self.decoder;
        let mut memory = Memory {
            written: &mut self.written,
            page_hashes: &mut self.page_hashes,
            outcome: &mut self.outcome,
        };
        let got = link.recv_lent(&mut |piece| {
            lent += piece.len();
            let mut at = 0;
            while failed.is_none() && other.is_none() && at < piece.len() {
                let (item, used) = match decoder.next_item_in(&piece[at..]) {
                    Ok(r) => r,
                    Err(e) => {
                        failed = Some(e.into());
                        break;
                    }
                };
                at += used;
                let r = match item {
                    None => break,
                    Some(item @ Item::Pages { .. }) => memory.pages(vm, &item),
                    Some(Item::Record(Record::MemZero { start_gfn, pages })) => {
                        memory.zeros(vm, start_gfn, pages)
                    }
                    Some(Item::Record(rec)) => {
                        other = Some(rec);
                        Ok(())
                    }
                };
                if let Err(e) = r {
                    failed = Some(e);
                }
            }
            if failed.is_some() {
                return false;
            }
            decoder.feed(&piece[at..]);
            other.is_none() && decoder.buffered_bytes() == 0 && lent < RECV_CHUNK
        })?;
        self.outcome.bytes_received += lent as u64;
        Some((|| {
            if let Some(e) = failed {
                return Err(e);
            }
            if let Err(e) = got {
                // A cut inside the stream says more than the bare
                // transport error.
                self.decoder.finish()?;
                return Err(e.into());
            }
            if let Some(rec) = other {
                self.apply(vm, link, rec)?;
            }
            if lent == 0 {
                self.report_progress(link, 1);
                return Ok(RecvProgress::Waiting);
            }
            self.report_progress(link, PROGRESS_EVERY_BYTES);
            Ok(RecvProgress::Busy)
        })())
    }

    fn apply<D, T>(&mut self, vm: &mut D, link: &mut T, rec: Record) -> Result<(), MigrationError>
    where
        D: DestinationVm + ?Sized,
        T: Transport + ?Sized,
    {
        match rec {
            Record::Select { .. } => {}
            Record::Config(c) => {
                self.ram_pages = c.ram_pages();
                // A refused or half-done prepare is discarded too.
                self.prepared = true;
                vm.prepare(&c)?;
                self.written = DirtyBitmap::new(self.ram_pages);
                // Fresh RAM is zero (the `prepare` contract).
                self.page_hashes = (0..self.ram_pages).map(zero_page_hash).collect();
            }
            Record::MemData { start_gfn, data } => {
                for (i, chunk) in data.chunks_exact(PAGE_SIZE).enumerate() {
                    let gfn = start_gfn + i as u64;
                    if let Ok(page) = <&Page>::try_from(chunk) {
                        vm.write_page(gfn, page)?;
                        self.written.set(gfn);
                        self.outcome.pages_written += 1;
                        set_hash(&mut self.page_hashes, gfn, page_hash(gfn, page));
                    }
                }
            }
            Record::MemZero { start_gfn, pages } => Memory {
                written: &mut self.written,
                page_hashes: &mut self.page_hashes,
                outcome: &mut self.outcome,
            }
            .zeros(vm, start_gfn, pages)?,
            // The decoder allows one, after the last memory record.
            Record::MemVerify { digest } => self.source_memory = Some(digest),
            Record::Vcpu(v) => self.vcpus.push(*v),
            Record::Device(d) => self.devices.push(d),
            Record::End { digest } => {
                self.digest = ImageDigest::new();
                self.phase = Phase::Verifying {
                    next_gfn: 0,
                    expected: digest,
                };
            }
            Record::Go => {
                vm.resume()?;
                // From here the VM runs here; a lost `resumed` leaves the
                // source in doubt, not this side.
                self.outcome.result = MigrationResult::Completed;
                if self.hold_resumed_ns > 0 {
                    self.phase = Phase::HoldResumed {
                        until_ns: self.now_ns.saturating_add(self.hold_resumed_ns),
                    };
                    return Ok(());
                }
                self.phase = Phase::Finished;
                if let Err(e) = self.send_record(link, &Record::Resumed) {
                    self.outcome.error = Some(alloc::format!(
                        "resumed, but could not confirm to the source: {e}"
                    ));
                }
            }
            Record::Abort { reason } => {
                self.discard(vm);
                self.outcome.result = MigrationResult::Cancelled;
                self.outcome.error = Some(MigrationError::PeerAborted(reason.clone()).to_string());
                self.error = Some(MigrationError::PeerAborted(reason));
                self.phase = Phase::Finished;
            }
            // The decoder only yields source -> destination records here.
            Record::Offer { .. }
            | Record::Ready { .. }
            | Record::Resumed
            | Record::Progress { .. } => {}
        }
        Ok(())
    }

    fn discard<D: DestinationVm + ?Sized>(&mut self, vm: &mut D) {
        if self.prepared {
            vm.discard();
            self.prepared = false;
        }
        self.vcpus.clear();
        self.devices.clear();
        self.written = DirtyBitmap::new(0);
        self.page_hashes = Vec::new();
    }

    fn fail<D, T>(&mut self, vm: &mut D, link: &mut T, e: MigrationError)
    where
        D: DestinationVm + ?Sized,
        T: Transport + ?Sized,
    {
        if !matches!(
            e,
            MigrationError::Transport(_) | MigrationError::LinkStalled { .. }
        ) {
            let _ = self.send_record(
                link,
                &Record::Abort {
                    reason: e.to_string(),
                },
            );
        }
        self.discard(vm);
        self.outcome.result = match e {
            MigrationError::Cancelled => MigrationResult::Cancelled,
            _ => MigrationResult::Failed,
        };
        self.outcome.error = Some(e.to_string());
        self.error = Some(e);
        self.phase = Phase::Finished;
    }
}

/// What applying memory records changes (borrowed from the receiver
/// beside its decoder, whose buffer or whose caller's the pages lie in).
struct Memory<'a> {
    written: &'a mut DirtyBitmap,
    page_hashes: &'a mut Vec<u64>,
    outcome: &'a mut ReceiveOutcome,
}

impl Memory<'_> {
    /// Write the pages of a memory data item into guest memory (one copy
    /// from where they lie); the page hashes reuse the CRCs that checked
    /// the record (one CRC pass per page), or (version 5, no CRCs) name
    /// the page's place in the stream.
    fn pages<D: DestinationVm + ?Sized>(
        &mut self,
        vm: &mut D,
        item: &Item<'_>,
    ) -> Result<(), MigrationError> {
        let Item::Pages {
            start_gfn,
            data,
            page_crcs,
            offset,
        } = *item
        else {
            return Ok(());
        };
        for (i, chunk) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let gfn = start_gfn + i as u64;
            let hash = match page_crcs.get(i) {
                Some(crc) => page_hash_of_crc(gfn, *crc),
                None => page_hash_at(gfn, offset + (i * PAGE_SIZE) as u64),
            };
            if let Ok(page) = <&Page>::try_from(chunk) {
                vm.write_page(gfn, page)?;
                self.written.set(gfn);
                self.outcome.pages_written += 1;
                set_hash(self.page_hashes, gfn, hash);
            }
        }
        Ok(())
    }

    /// Apply a zero marker: frames written before are zeroed again (fresh
    /// RAM is zero already).
    fn zeros<D: DestinationVm + ?Sized>(
        &mut self,
        vm: &mut D,
        start_gfn: u64,
        pages: u64,
    ) -> Result<(), MigrationError> {
        // The decoder checked start_gfn + pages <= RAM pages.
        for gfn in start_gfn..start_gfn + pages {
            if self.written.test(gfn) {
                vm.zero_page(gfn)?;
                self.written.clear(gfn);
                set_hash(self.page_hashes, gfn, zero_page_hash(gfn));
            }
        }
        self.outcome.zero_pages += pages;
        Ok(())
    }
}

/// Record `h` as the hash of what frame `gfn` now holds.
fn set_hash(page_hashes: &mut [u64], gfn: u64, h: u64) {
    if let Some(slot) = usize::try_from(gfn)
        .ok()
        .and_then(|i| page_hashes.get_mut(i))
    {
        *slot = h;
    }
}
