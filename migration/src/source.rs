//! The source side: the pre-copy engine [`Migration`].
//!
//! It drives a [`MigratableVm`] through the protocol in [`crate::stream`]:
//! handshake, pass 0 (every page; zero pages as markers), dirty passes until
//! the expected downtime fits the limit (throttling the guest when passes
//! stop converging), pause, final dirty pages, in verification mode the
//! whole-memory check and the verify record, vCPU and device state, end
//! record, then the ready / go / resumed exchange.
//!
//! [`Migration::step`] does a bounded amount of work (at most
//! `Policy::step_pages` pages read and one transport send) so the hypervisor
//! can interleave it with guest execution on one CPU. The engine owns
//! neither the VM nor the link: both are lent to each step (the node's
//! migration job owns them and runs the guest, the network and other VMs
//! between steps), and the node's clock comes with the step.
//!
//! Bandwidth is what the peer *acknowledged* ([`Transport::acked_bytes`])
//! over node time, sampled over windows of 50 ms, so bytes sitting in
//! buffers on the way do not make the link look faster than it is and the
//! switch-over decision is not fooled. A link that moves nothing for
//! `Policy::stall_timeout_ns` while bytes are owed ends the migration
//! ([`MigrationError::LinkStalled`]).
//!
//! Invariants:
//! - Until the go record has been handed to the transport (the commit
//!   point), every way out — error, timeout, cancel, peer abort — stops the
//!   dirty log, removes the throttle, resumes the VM if it was paused, and
//!   best-effort tells the destination to discard. The source VM's memory
//!   is only ever read.
//! - After the commit point the source never resumes on its own: only an
//!   explicit abort from the destination (it discarded its copy) sends the
//!   VM back; losing the channel leaves the VM paused and the result
//!   [`MigrationError::InDoubt`], until [`Migration::resolve_in_doubt`]
//!   brings the destination's answer from a later connection.
//! - `page_hashes[gfn]` is the hash of the last contents of `gfn` handed to
//!   the transport, so the end digest describes exactly the image sent.
//! - Verification mode (`Policy::verify_memory`): with the VM paused after
//!   the last pages, every frame is read again and hashed; a frame whose
//!   hash differs from `page_hashes` was written without the dirty log
//!   reporting it. Any such frame fails the migration before the commit
//!   point (so the VM resumes at the source), naming the frames; otherwise
//!   the digest of the memory read goes out in the verify record for the
//!   destination to compare with its own memory.

use crate::bitmap::DirtyBitmap;
use crate::digest::{
    crc32_append_page, is_zero_page, page_hash, page_hash_at, page_hash_of_crc, zero_page_hash,
    ImageDigest,
};
use crate::error::{MigrationError, StreamError, TransportError, VmError};
use crate::policy::{self, Policy};
use crate::report::{MigrationReport, MigrationResult, PausePhases};
use crate::seal::FRAME_BODY_MAX;
use crate::state::{DeviceState, VcpuState, VmConfig, MAX_DEVICE_PAYLOAD, MAX_XSAVE_BYTES};
use crate::stream::{
    self, Decoder, Direction, Record, MAX_DATA_RUN_PAGES, MAX_ZERO_RUN_PAGES, PROGRESS_VERSION,
    SEALED_VERSION, VERIFY_VERSION,
};
use crate::transport::Transport;
use crate::{Page, PAGE_SIZE};
use alloc::boxed::Box;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

/// The running VM being migrated away, as the hypervisor exposes it.
pub trait MigratableVm {
    /// The configuration sent first (RAM size, vCPUs, devices, CPUID).
    fn config(&self) -> VmConfig;
    /// Copy guest frame `gfn` into `buf`.
    fn read_page(&mut self, gfn: u64, buf: &mut Page) -> Result<(), VmError>;
    /// Start tracking writes, with the best tracker the hypervisor has
    /// (nested write protection, or hardware logging such as Intel PML), and
    /// return its name for the report (e.g. `"write-protect"`, `"pml"`).
    /// Every write after this returns must show up in a later
    /// `collect_dirty`, including writes by the hypervisor and device models
    /// (STYLE 5). From here until `stop_dirty_log` the log belongs to the
    /// engine: nothing else may collect, clear or stop it.
    fn start_dirty_log(&mut self) -> Result<&'static str, VmError>;
    /// Set in `out` the frames written since the last collection and reset
    /// the log. Must only set bits, never clear them. A word-based log ORs
    /// straight in through [`DirtyBitmap::with_words_mut`].
    fn collect_dirty(&mut self, out: &mut DirtyBitmap) -> Result<(), VmError>;
    /// Stop tracking writes.
    fn stop_dirty_log(&mut self);
    /// Let the guest's vCPUs run only `100 - pct` percent of the time.
    fn set_throttle(&mut self, pct: u8);
    /// Stop all vCPUs and device activity; memory and state are frozen
    /// until `resume`.
    fn pause(&mut self) -> Result<(), VmError>;
    /// Continue after `pause` (only on the way back: the migration failed
    /// before the commit point).
    fn resume(&mut self);
    /// State of every vCPU, ids `0..config().vcpus` in order (VM paused).
    fn save_vcpus(&mut self) -> Result<Vec<VcpuState>, VmError>;
    /// State of every configured device, in configuration order (VM paused).
    fn save_devices(&mut self) -> Result<Vec<DeviceState>, VmError>;
}

impl<V: MigratableVm + ?Sized> MigratableVm for &mut V {
    fn config(&self) -> VmConfig {
        (**self).config()
    }
    fn read_page(&mut self, gfn: u64, buf: &mut Page) -> Result<(), VmError> {
        (**self).read_page(gfn, buf)
    }
    fn start_dirty_log(&mut self) -> Result<&'static str, VmError> {
        (**self).start_dirty_log()
    }
    fn collect_dirty(&mut self, out: &mut DirtyBitmap) -> Result<(), VmError> {
        (**self).collect_dirty(out)
    }
    fn stop_dirty_log(&mut self) {
        (**self).stop_dirty_log()
    }
    fn set_throttle(&mut self, pct: u8) {
        (**self).set_throttle(pct)
    }
    fn pause(&mut self) -> Result<(), VmError> {
        (**self).pause()
    }
    fn resume(&mut self) {
        (**self).resume()
    }
    fn save_vcpus(&mut self) -> Result<Vec<VcpuState>, VmError> {
        (**self).save_vcpus()
    }
    fn save_devices(&mut self) -> Result<Vec<DeviceState>, VmError> {
        (**self).save_devices()
    }
}

/// What a step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Work was done; step again soon.
    Busy,
    /// Nothing to do until bytes arrive or the rate limit allows more, for
    /// up to about `max_ns`.
    Waiting { max_ns: u64 },
    /// The migration is over; see [`Migration::report`].
    Finished(MigrationResult),
}

/// Where the source engine stands, for progress displays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Version negotiation.
    Handshake,
    /// Pre-copy passes; the VM runs.
    Copying,
    /// The VM is paused: last pages, verification, vCPU and device state.
    FinalCopy,
    /// Waiting for `ready`, or for `resumed` after `go`.
    SwitchingOver,
    /// Over.
    Finished,
}

/// A snapshot of the source engine's progress ([`Migration::status`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// The pass under way (0 = the full copy).
    pub pass: u32,
    /// Stream bytes handed to the transport.
    pub bytes_sent: u64,
    /// Pages of this pass not yet sent, in bytes (an estimate of what is
    /// left: later passes resend what the guest dirties meanwhile).
    pub bytes_remaining: u64,
    /// Bytes per second the guest dirtied in the last pass.
    pub dirty_rate_bytes_per_s: u64,
    /// Bytes per second the peer acknowledged (moving average).
    pub bandwidth_bytes_per_s: u64,
    /// Throttle in force.
    pub throttle_pct: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Handshake,
    AwaitOffer,
    /// Pre-copy pass `n` (0 = all pages) while the VM runs.
    Copy,
    /// Last dirty pages while the VM is paused.
    FinalCopy,
    /// Verification mode: re-reading the whole memory (VM paused), next gfn.
    Verify,
    /// vCPU and device state, then the end record (VM paused).
    SendState,
    AwaitReady,
    AwaitResumed,
    Finished,
}

/// How long to wait for back-channel bytes before stepping again.
const POLL_NS: u64 = 1_000_000;
/// Shortest interval a bandwidth sample spans.
const RATE_WINDOW_NS: u64 = 50_000_000;
/// Back-channel receive chunk.
const RECV_CHUNK: usize = 1024;
/// Pages read and hashed per verification step.
const VERIFY_PAGES_PER_STEP: u64 = 1024;
/// Stale frames named in the error of a failed verification.
const STALE_GFNS_REPORTED: usize = 8;
/// Room one more page may take in a batch: its data plus a whole
/// record's framing, behind the marker of a zero run it closes.
const BATCH_BYTES_PER_PAGE: usize = WORST_BYTES_PER_PAGE + stream::MEM_ZERO_RECORD_BYTES;
/// Smallest batch of pages worth a step when the send window is short.
const MIN_BATCH_PAGES: usize = 16;
/// Most stream bytes one page can cost: its data plus a whole record's
/// framing (a run of one page).
const WORST_BYTES_PER_PAGE: usize = PAGE_SIZE + stream::HEADER_BYTES + 12 + stream::CRC_BYTES;

/// When each phase of the pause began (node time, ns): the start of the
/// first step in it ([`PausePhases`]).
#[derive(Clone, Copy, Debug, Default)]
struct PauseMarks {
    pause: Option<u64>,
    final_copy: Option<u64>,
    verify: Option<u64>,
    state: Option<u64>,
    await_ready: Option<u64>,
    acked: Option<u64>,
    ready: Option<u64>,
}

impl PauseMarks {
    /// The phases' lengths in µs, the last one ending at `end`. A phase
    /// never entered lasts 0; a later mark missing (the migration ended
    /// early) ends a phase at `end`.
    fn phases(&self, end: u64) -> PausePhases {
        let marks = [
            self.pause,
            self.final_copy,
            self.verify,
            self.state,
            self.await_ready,
            self.acked,
            self.ready,
        ];
        let mut us = [0u64; 7];
        for (i, m) in marks.iter().enumerate() {
            let Some(start) = *m else { continue };
            let next = marks[i + 1..]
                .iter()
                .flatten()
                .next()
                .copied()
                .unwrap_or(end);
            us[i] = next.saturating_sub(start) / 1000;
        }
        PausePhases {
            harvest: us[0],
            last_pages: us[1],
            verify: us[2],
            state: us[3],
            drain: us[4],
            ready: us[5],
            resumed: us[6],
        }
    }
}

/// The records of one batch of pages, built in place in the batch buffer:
/// finished records end at `len`; at most one run is open after them.
struct Batch {
    /// Bytes of finished records.
    len: usize,
    /// Open run of data pages: first gfn, pages; its header goes at `len`,
    /// its pages right after it.
    data: Option<(u64, u64)>,
    /// The CRC of each page of the open data run.
    crcs: [u32; MAX_DATA_RUN_PAGES as usize],
    /// Open run of zero pages: first gfn, pages.
    zero: Option<(u64, u64)>,
    /// A data record's CRC covers its pages (before version 5; from it on,
    /// its head only and `crcs` are unused).
    pages_in_crc: bool,
}

impl Batch {
    fn new(pages_in_crc: bool) -> Self {
        Self {
            len: 0,
            data: None,
            crcs: [0; MAX_DATA_RUN_PAGES as usize],
            zero: None,
            pages_in_crc,
        }
    }

    /// Where the page of `gfn` is read to: the end of the open data run if
    /// it continues it, else behind a data header (and behind the marker of
    /// an open zero run, which a data page closes). Closes a data run the
    /// page cannot continue.
    fn page_slot(&mut self, buf: &mut [u8], gfn: u64) -> usize {
        if let Some((start, n)) = self.data {
            if start + n == gfn && n < MAX_DATA_RUN_PAGES {
                return self.len + stream::MEM_DATA_HEAD_BYTES + n as usize * PAGE_SIZE;
            }
            self.close_data(buf);
        }
        let marker = if self.zero.is_some() {
            stream::MEM_ZERO_RECORD_BYTES
        } else {
            0
        };
        self.len + marker + stream::MEM_DATA_HEAD_BYTES
    }

    /// The page just read for `gfn` is zero: it joins (or starts) a zero
    /// run; its bytes are overwritten later.
    fn zero(&mut self, buf: &mut [u8], gfn: u64) {
        self.close_data(buf);
        match self.zero {
            Some((start, n)) if start + n == gfn && n < MAX_ZERO_RUN_PAGES => {
                self.zero = Some((start, n + 1))
            }
            _ => {
                self.close_zero(buf);
                self.zero = Some((gfn, 1));
            }
        }
    }

    /// The page just read for `gfn` (CRC `crc`) carries data, where
    /// [`Batch::page_slot`] put it: it continues the open data run or opens
    /// one (the marker of an open zero run goes into the gap left for it).
    fn data(&mut self, buf: &mut [u8], gfn: u64, crc: u32) {
        let n = match self.data {
            Some((start, n)) => {
                self.data = Some((start, n + 1));
                n
            }
            None => {
                self.close_zero(buf);
                self.data = Some((gfn, 1));
                0
            }
        };
        if let Some(slot) = self.crcs.get_mut(n as usize) {
            *slot = crc;
        }
    }

    fn close_zero(&mut self, buf: &mut [u8]) {
        if let Some((start, n)) = self.zero.take() {
            let rec = stream::mem_zero_record(start, n as u32);
            buf[self.len..self.len + rec.len()].copy_from_slice(&rec);
            self.len += rec.len();
        }
    }

    fn close_data(&mut self, buf: &mut [u8]) {
        if let Some((start, n)) = self.data.take() {
            let head = stream::mem_data_head(start, n as u32);
            buf[self.len..self.len + head.len()].copy_from_slice(&head);
            let mut crc = crc32fast::hash(&head);
            if self.pages_in_crc {
                for c in &self.crcs[..n as usize] {
                    crc = crc32_append_page(crc, *c);
                }
            }
            let end = self.len + head.len() + n as usize * PAGE_SIZE;
            buf[end..end + stream::CRC_BYTES].copy_from_slice(&crc.to_le_bytes());
            self.len = end + stream::CRC_BYTES;
        }
    }

    /// Bytes the records take once the open run is closed.
    fn extent(&self) -> usize {
        let data = self.data.map_or(0, |(_, n)| {
            stream::MEM_DATA_HEAD_BYTES + n as usize * PAGE_SIZE + stream::CRC_BYTES
        });
        let zero = self.zero.map_or(0, |_| stream::MEM_ZERO_RECORD_BYTES);
        self.len + data + zero
    }

    /// Finish the open run.
    fn close(&mut self, buf: &mut [u8]) {
        self.close_data(buf);
        self.close_zero(buf);
    }
}

/// One outgoing live migration: the engine's state. The VM and the link
/// are lent to it for each step ([`Migration::step`]), so whoever owns
/// them (the node's job) keeps them between steps.
pub struct Migration {
    policy: Policy,
    config: VmConfig,
    phase: Phase,
    back: Decoder,
    out: Vec<u8>,
    /// Page batches on their way to the transport ([`Migration::send_pages`]).
    batch: Vec<u8>,
    page: Box<Page>,
    page_hashes: Vec<u64>,
    to_send: DirtyBitmap,
    cursor: u64,
    pages_this_pass: u64,
    prev_dirty: Option<u64>,
    bandwidth: Option<u64>,
    /// Bandwidth sampling window: start time and the link's acknowledged
    /// bytes then.
    rate_window: Option<(u64, u64)>,
    throttle: u8,
    expected_downtime_ns: Option<u64>,
    t_start: u64,
    t_pass: u64,
    dirty_rate: u64,
    t_transfer: u64,
    transfer_bytes: u64,
    pause_ns: Option<u64>,
    marks: PauseMarks,
    /// Stall detection: when the link last moved (acknowledged or
    /// delivered bytes), and its counters then.
    last_link_progress_ns: u64,
    last_acked: u64,
    last_received: u64,
    received: u64,
    /// The negotiated stream version (0 before the offer).
    version: u16,
    /// Version 4: stream bytes the destination reported applied.
    applied: u64,
    dirty_log_on: bool,
    paused: bool,
    committed: bool,
    sent_digest: u64,
    /// Verification mode: next gfn, fold of the memory read so far, frames
    /// found stale (count and the first few).
    verify_gfn: u64,
    verify_digest: ImageDigest,
    stale_pages: u64,
    stale_gfns: Vec<u64>,
    report: MigrationReport,
    error: Option<MigrationError>,
}

impl Migration {
    /// Prepare to migrate `vm` (its configuration is taken now). Nothing
    /// happens until the first [`Migration::step`]. `now_ns` starts the
    /// clock of the timeout and of `total_ms`.
    pub fn new<V: MigratableVm + ?Sized>(vm: &V, policy: Policy, now_ns: u64) -> Self {
        let config = vm.config();
        let ram_pages = config.ram_pages();
        let pages = usize::try_from(ram_pages).unwrap_or(0);
        Self {
            policy,
            report: MigrationReport {
                passes: 0,
                pages_per_pass: Vec::new(),
                bytes_sent: 0,
                zero_pages: 0,
                ram_bytes: config.ram_bytes,
                total_ms: 0,
                downtime_ms: 0,
                expected_downtime_ms: 0,
                throttle_pct: 0,
                result: MigrationResult::Failed,
                error: None,
                dirty_tracker: None,
                verified: false,
                pause_us: PausePhases::default(),
            },
            config,
            phase: Phase::Handshake,
            back: Decoder::new(Direction::DestToSource),
            out: Vec::new(),
            batch: Vec::new(),
            page: Box::new([0u8; PAGE_SIZE]),
            page_hashes: (0..pages as u64).map(zero_page_hash).collect(),
            to_send: DirtyBitmap::new(ram_pages),
            cursor: 0,
            pages_this_pass: 0,
            prev_dirty: None,
            bandwidth: None,
            rate_window: None,
            throttle: 0,
            expected_downtime_ns: None,
            t_start: now_ns,
            t_pass: now_ns,
            dirty_rate: 0,
            t_transfer: now_ns,
            transfer_bytes: 0,
            pause_ns: None,
            last_link_progress_ns: now_ns,
            last_acked: 0,
            last_received: 0,
            received: 0,
            version: 0,
            applied: 0,
            dirty_log_on: false,
            paused: false,
            committed: false,
            sent_digest: 0,
            verify_gfn: 0,
            verify_digest: ImageDigest::new(),
            stale_pages: 0,
            stale_gfns: Vec::new(),
            error: None,
            marks: PauseMarks::default(),
        }
    }

    /// Do a bounded amount of work with the VM and the link, at node time
    /// `now_ns` (monotonic).
    pub fn step<V, T>(&mut self, vm: &mut V, link: &mut T, now_ns: u64) -> Progress
    where
        V: MigratableVm + ?Sized,
        T: Transport + ?Sized,
    {
        if self.phase == Phase::Finished {
            return Progress::Finished(self.report.result);
        }
        let now = now_ns;
        if now.saturating_sub(self.t_start) > self.policy.timeout_ns {
            let limit_ms = self.policy.timeout_ns / policy::NS_PER_MS;
            if self.committed {
                let e = MigrationError::Timeout { limit_ms };
                self.finish(
                    MigrationResult::Failed,
                    Some(MigrationError::InDoubt(Box::new(e))),
                    now,
                );
            } else {
                self.abandon(
                    vm,
                    link,
                    MigrationResult::Cancelled,
                    MigrationError::Timeout { limit_ms },
                    now,
                );
            }
            return Progress::Finished(self.report.result);
        }
        let result = self
            .step_inner(vm, link, now)
            .and_then(|p| self.check_stall(link, now).map(|()| p));
        match result {
            Ok(p) => p,
            Err(e) => {
                self.fail(vm, link, e, now);
                Progress::Finished(self.report.result)
            }
        }
    }

    /// End the migration for `e` as its phase demands: before the commit
    /// point the way back; after it only the destination's own word that
    /// it discarded the VM lets the source resume, anything else leaves
    /// the outcome in doubt.
    fn fail<V, T>(&mut self, vm: &mut V, link: &mut T, e: MigrationError, now: u64)
    where
        V: MigratableVm + ?Sized,
        T: Transport + ?Sized,
    {
        match e {
            MigrationError::PeerAborted(_) => {
                self.abandon(vm, link, MigrationResult::Failed, e, now)
            }
            e if self.committed => self.finish(
                MigrationResult::Failed,
                Some(MigrationError::InDoubt(Box::new(e))),
                now,
            ),
            e => self.abandon(vm, link, MigrationResult::Failed, e, now),
        }
    }

    /// The link has moved nothing for `Policy::stall_timeout_ns` while the
    /// engine had bytes in flight or waited for the peer.
    fn check_stall<T: Transport + ?Sized>(
        &mut self,
        link: &T,
        now: u64,
    ) -> Result<(), MigrationError> {
        let acked = link.acked_bytes();
        if acked != self.last_acked || self.received != self.last_received {
            self.last_acked = acked;
            self.last_received = self.received;
            self.last_link_progress_ns = now;
            return Ok(());
        }
        // Nothing owed by the peer: the engine itself is busy (reading
        // pages, verifying), which is no stall of the link.
        let in_flight = self.report.bytes_sent > acked;
        let awaiting_peer = matches!(
            self.phase,
            Phase::AwaitOffer | Phase::AwaitReady | Phase::AwaitResumed
        );
        if !(in_flight || awaiting_peer) {
            self.last_link_progress_ns = now;
            return Ok(());
        }
        let silent = now.saturating_sub(self.last_link_progress_ns);
        if silent >= self.policy.stall_timeout_ns {
            return Err(MigrationError::LinkStalled {
                silent_ms: silent / policy::NS_PER_MS,
                waiting_for: if in_flight {
                    "the destination to acknowledge data"
                } else {
                    "the destination's answer"
                },
            });
        }
        Ok(())
    }

    /// Operator cancel. Before the commit point the VM keeps running at the
    /// source and the result is `cancelled`; returns false (and does
    /// nothing) if the migration is past the commit point or over.
    pub fn cancel<V, T>(&mut self, vm: &mut V, link: &mut T, now_ns: u64) -> bool
    where
        V: MigratableVm + ?Sized,
        T: Transport + ?Sized,
    {
        if self.committed || self.phase == Phase::Finished {
            return false;
        }
        self.abandon(
            vm,
            link,
            MigrationResult::Cancelled,
            MigrationError::Cancelled,
            now_ns,
        );
        true
    }

    /// The link failed under the job (e.g. its connection was reset): the
    /// same as a transport error in a step.
    pub fn link_failed<V, T>(&mut self, vm: &mut V, link: &mut T, why: TransportError, now_ns: u64)
    where
        V: MigratableVm + ?Sized,
        T: Transport + ?Sized,
    {
        if self.phase != Phase::Finished {
            self.fail(vm, link, MigrationError::Transport(why), now_ns);
        }
    }

    /// Settle a migration left in doubt ([`MigrationError::InDoubt`]) with
    /// the destination's answer, learnt over a new connection:
    /// `resumed_there` = it resumed the VM (the migration completed; the
    /// paused source is released to be removed), else it discarded its
    /// copy (the VM resumes here and the migration failed for its first
    /// cause). Does nothing unless the migration is in doubt.
    pub fn resolve_in_doubt<V: MigratableVm + ?Sized>(
        &mut self,
        vm: &mut V,
        resumed_there: bool,
        now_ns: u64,
    ) {
        let Some(MigrationError::InDoubt(cause)) = self.error.take() else {
            return;
        };
        self.stop_dirty_log(vm);
        if resumed_there {
            self.report.result = MigrationResult::Completed;
            self.report.error = None;
            self.report.total_ms = now_ns.saturating_sub(self.t_start) / policy::NS_PER_MS;
            self.report.downtime_ms = self
                .pause_ns
                .map_or(0, |p| now_ns.saturating_sub(p) / policy::NS_PER_MS);
            self.error = None;
        } else {
            if self.paused {
                vm.resume();
                self.paused = false;
            }
            let e = MigrationError::DiscardedAfterGo(cause);
            self.report.result = MigrationResult::Failed;
            self.report.error = Some(e.to_string());
            self.report.downtime_ms = 0;
            self.error = Some(e);
        }
    }

    /// Whether the migration ended in doubt (see
    /// [`Migration::resolve_in_doubt`]).
    pub fn in_doubt(&self) -> bool {
        matches!(self.error, Some(MigrationError::InDoubt(_)))
    }

    /// The report; final once [`Progress::Finished`] was returned.
    pub fn report(&self) -> &MigrationReport {
        &self.report
    }

    /// Why the migration did not complete.
    pub fn error(&self) -> Option<&MigrationError> {
        self.error.as_ref()
    }

    /// Past the commit point: the go order was handed to the transport, the
    /// destination owns the VM, [`Migration::cancel`] no longer applies.
    pub fn committed(&self) -> bool {
        self.committed
    }

    /// Whether the source VM is paused now (after completion: released to
    /// be removed; after an in-doubt failure: waiting for management).
    pub fn vm_paused(&self) -> bool {
        self.paused
    }

    /// Where the engine stands.
    pub fn stage(&self) -> Stage {
        match self.phase {
            Phase::Handshake | Phase::AwaitOffer => Stage::Handshake,
            Phase::Copy => Stage::Copying,
            Phase::FinalCopy | Phase::Verify | Phase::SendState => Stage::FinalCopy,
            Phase::AwaitReady | Phase::AwaitResumed => Stage::SwitchingOver,
            Phase::Finished => Stage::Finished,
        }
    }

    /// Progress figures.
    pub fn status(&self) -> Status {
        let left = match self.phase {
            Phase::Copy | Phase::FinalCopy => self.to_send.count_from(self.cursor),
            _ => 0,
        };
        Status {
            pass: self.report.passes,
            bytes_sent: self.report.bytes_sent,
            bytes_remaining: left * PAGE_SIZE as u64,
            dirty_rate_bytes_per_s: self.dirty_rate,
            bandwidth_bytes_per_s: self.bandwidth.unwrap_or(0),
            throttle_pct: self.throttle,
        }
    }

    /// The negotiated stream version (0 before the destination's offer).
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The configuration sent (and accepted by the destination).
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    fn step_inner<V, T>(
        &mut self,
        vm: &mut V,
        link: &mut T,
        now: u64,
    ) -> Result<Progress, MigrationError>
    where
        V: MigratableVm + ?Sized,
        T: Transport + ?Sized,
    {
        self.mark(link, now);
        match self.phase {
            Phase::Handshake => {
                self.config.validate()?;
                self.send_raw(link, &stream::MAGIC_SOURCE)?;
                self.phase = Phase::AwaitOffer;
                Ok(Progress::Busy)
            }
            Phase::AwaitOffer => match self.poll_back(link)? {
                None => Ok(Progress::Waiting { max_ns: POLL_NS }),
                Some(Record::Offer { versions }) => {
                    let version =
                        stream::negotiate(&versions, stream::versions_for(link.authenticated()))?;
                    if self.policy.verify_memory && version < VERIFY_VERSION {
                        return Err(MigrationError::VerificationUnsupported { version });
                    }
                    self.version = version;
                    self.out.clear();
                    Record::Select { version }.encode(&mut self.out);
                    Record::Config(self.config.clone()).encode(&mut self.out);
                    self.flush_out(link)?;
                    self.report.dirty_tracker = Some(vm.start_dirty_log()?.into());
                    self.dirty_log_on = true;
                    self.to_send.set_all();
                    self.cursor = 0;
                    self.t_transfer = now;
                    self.t_pass = now;
                    self.transfer_bytes = 0;
                    self.rate_window = Some((now, self.acknowledged(link)));
                    self.phase = Phase::Copy;
                    if self.policy.pause_at_once {
                        // Quick migration: one pass, the VM paused from the
                        // start (every page is already to be sent).
                        self.pause_ns = Some(now);
                        self.marks.pause = Some(now);
                        vm.pause()?;
                        self.paused = true;
                        self.phase = Phase::FinalCopy;
                    }
                    Ok(Progress::Busy)
                }
                Some(other) => Err(self.unexpected(other)),
            },
            Phase::Copy | Phase::FinalCopy => {
                if let Some(rec) = self.poll_back(link)? {
                    return Err(self.unexpected(rec));
                }
                self.sample_bandwidth(link, now);
                let elapsed = now.saturating_sub(self.t_transfer);
                let wait = policy::rate_limit_wait_ns(
                    self.transfer_bytes,
                    elapsed,
                    self.policy.max_bandwidth_bytes_per_s,
                );
                if wait > 0 {
                    return Ok(Progress::Waiting { max_ns: wait });
                }
                // The end of a pass is a step of its own, so the pause it
                // may start is timed from a step's start.
                if self.to_send.next_set(self.cursor).is_none() {
                    // While the destination is further behind than the
                    // pause could absorb, wait for it instead of starting
                    // another pass (which would only harvest the log again).
                    if self.phase == Phase::Copy && self.destination_behind(link) {
                        return Ok(Progress::Waiting {
                            max_ns: POLL_NS / 10,
                        });
                    }
                    self.end_of_pass(vm, link, now)?;
                    return Ok(Progress::Busy);
                }
                // Flow control: page data only when the transport has room
                // for a useful batch (never more than it has room for).
                let pages = self.send_window(link) / WORST_BYTES_PER_PAGE;
                if pages < MIN_BATCH_PAGES.min(self.policy.step_pages.max(1) as usize) {
                    return Ok(Progress::Waiting {
                        max_ns: POLL_NS / 10,
                    });
                }
                self.send_pages(vm, link, pages)?;
                Ok(Progress::Busy)
            }
            Phase::Verify => {
                if let Some(rec) = self.poll_back(link)? {
                    return Err(self.unexpected(rec));
                }
                self.verify_step(vm, link)?;
                Ok(Progress::Busy)
            }
            Phase::SendState => {
                self.send_state(vm, link)?;
                Ok(Progress::Busy)
            }
            Phase::AwaitReady => match self.poll_back(link)? {
                None => Ok(Progress::Waiting { max_ns: POLL_NS }),
                Some(Record::Ready { digest }) => {
                    self.marks.acked.get_or_insert(now);
                    self.marks.ready = Some(now);
                    if digest != self.sent_digest {
                        return Err(MigrationError::DigestDisagreement {
                            sent: self.sent_digest,
                            confirmed: digest,
                        });
                    }
                    // Commit before the send: if the send fails we cannot
                    // know how much of the go record arrived.
                    self.committed = true;
                    self.out.clear();
                    Record::Go.encode(&mut self.out);
                    self.flush_out(link)?;
                    self.phase = Phase::AwaitResumed;
                    Ok(Progress::Busy)
                }
                Some(other) => Err(self.unexpected(other)),
            },
            Phase::AwaitResumed => match self.poll_back(link)? {
                None => Ok(Progress::Waiting { max_ns: POLL_NS }),
                Some(Record::Resumed) => {
                    self.finish(MigrationResult::Completed, None, now);
                    self.stop_dirty_log(vm);
                    Ok(Progress::Finished(MigrationResult::Completed))
                }
                Some(other) => Err(self.unexpected(other)),
            },
            Phase::Finished => Ok(Progress::Finished(self.report.result)),
        }
    }

    /// Note the start of a pause phase: the first step in it (and, while
    /// waiting for `ready`, the first step that finds every byte sent
    /// acknowledged).
    fn mark<T: Transport + ?Sized>(&mut self, link: &T, now: u64) {
        let m = &mut self.marks;
        let slot = match self.phase {
            Phase::FinalCopy => &mut m.final_copy,
            Phase::Verify => &mut m.verify,
            Phase::SendState => &mut m.state,
            Phase::AwaitReady => {
                if m.await_ready.is_some()
                    && m.acked.is_none()
                    && link.acked_bytes() >= self.report.bytes_sent
                {
                    m.acked = Some(now);
                }
                &mut m.await_ready
            }
            Phase::AwaitResumed => &mut m.ready,
            _ => return,
        };
        slot.get_or_insert(now);
    }

    /// Fold a bandwidth sample once the window spans long enough: bytes
    /// the peer acknowledged over node time (not bytes queued locally, so
    /// buffers in between do not inflate it).
    fn sample_bandwidth<T: Transport + ?Sized>(&mut self, link: &T, now: u64) {
        let acked = self.acknowledged(link);
        let Some((t0, a0)) = self.rate_window else {
            self.rate_window = Some((now, acked));
            return;
        };
        let span = now.saturating_sub(t0);
        // Without an estimate yet, take what there is at the end of a
        // pass rather than wait for a full window.
        let early = self.bandwidth.is_none() && self.to_send.next_set(self.cursor).is_none();
        if span < RATE_WINDOW_NS && !(early && span > 0) {
            return;
        }
        if let Some(sample) = policy::bandwidth_sample(acked.saturating_sub(a0), span) {
            self.bandwidth = Some(policy::ewma(
                self.bandwidth,
                sample,
                self.policy.ewma_weight_pct,
            ));
        }
        self.rate_window = Some((now, acked));
    }

    /// An abort from the peer, or a record the decoder accepted but this
    /// phase does not expect (e.g. an early `ready`).
    fn unexpected(&self, rec: Record) -> MigrationError {
        match rec {
            Record::Abort { reason } => MigrationError::PeerAborted(reason),
            other => MigrationError::Stream(StreamError::UnexpectedRecord {
                record: self.back.records().saturating_sub(1),
                kind: other.name(),
                state: "the source is sending",
            }),
        }
    }

    /// The next back-channel record, if one has fully arrived. Progress
    /// records (version 4) are taken here: they only move `applied`.
    fn poll_back<T: Transport + ?Sized>(
        &mut self,
        link: &mut T,
    ) -> Result<Option<Record>, MigrationError> {
        let mut pulled = false;
        loop {
            match self.back.next_record()? {
                Some(Record::Progress { applied }) => {
                    if self.version < PROGRESS_VERSION {
                        return Err(self.unexpected(Record::Progress { applied }));
                    }
                    // Never more than was sent, never backwards.
                    self.applied = self.applied.max(applied.min(self.report.bytes_sent));
                }
                Some(r) => return Ok(Some(r)),
                None if pulled => return Ok(None),
                None => {
                    pulled = true;
                    let mut buf = [0u8; RECV_CHUNK];
                    // A clean end of the back channel before its last
                    // record is a protocol-level truncation; report the
                    // transport error.
                    let n = link.recv(&mut buf).map_err(MigrationError::Transport)?;
                    if n == 0 {
                        return Ok(None);
                    }
                    self.received += n as u64;
                    self.back.feed(&buf[..n]);
                }
            }
        }
    }

    /// Bytes the peer has acknowledged: version 4, what the destination
    /// reported applied; before it, what the transport delivered.
    fn acknowledged<T: Transport + ?Sized>(&self, link: &T) -> u64 {
        if self.version >= PROGRESS_VERSION {
            self.applied
        } else {
            link.acked_bytes()
        }
    }

    /// Version 4: what the destination has yet to apply would alone take
    /// longer than the downtime limit at the measured rate.
    fn destination_behind<T: Transport + ?Sized>(&self, link: &T) -> bool {
        let bw = policy::effective_bandwidth(self.bandwidth, self.policy.max_bandwidth_bytes_per_s);
        if self.version < PROGRESS_VERSION || bw == 0 {
            return false;
        }
        let ahead = self
            .report
            .bytes_sent
            .saturating_sub(self.acknowledged(link));
        !policy::fits_downtime(
            policy::expected_downtime_ns(ahead, bw, self.policy.switch_over_cost_ns),
            self.policy.downtime_limit_ns,
        )
    }

    /// Room for page data now: the transport's window, and (version 4) no
    /// more in flight beyond what the destination applied than
    /// [`policy::in_flight_cap_bytes`], so what a pause waits for stays
    /// a fraction of the downtime limit.
    fn send_window<T: Transport + ?Sized>(&self, link: &T) -> usize {
        let w = link.send_window();
        if self.version < PROGRESS_VERSION {
            return w;
        }
        let bw = policy::effective_bandwidth(self.bandwidth, self.policy.max_bandwidth_bytes_per_s);
        let cap = policy::in_flight_cap_bytes(bw, self.policy.downtime_limit_ns);
        let ahead = self.report.bytes_sent.saturating_sub(self.applied);
        w.min(usize::try_from(cap.saturating_sub(ahead)).unwrap_or(usize::MAX))
    }

    fn send_raw<T: Transport + ?Sized>(
        &mut self,
        link: &mut T,
        bytes: &[u8],
    ) -> Result<(), MigrationError> {
        link.send(bytes)?;
        self.report.bytes_sent += bytes.len() as u64;
        self.transfer_bytes += bytes.len() as u64;
        Ok(())
    }

    fn flush_out<T: Transport + ?Sized>(&mut self, link: &mut T) -> Result<(), MigrationError> {
        let out = core::mem::take(&mut self.out);
        let r = self.send_raw(link, &out);
        self.out = out;
        self.out.clear();
        r
    }

    /// Read, classify and send up to `step_pages` pages of the current pass.
    ///
    /// Where the link lends room in its send queue
    /// ([`Transport::send_with`]), the pages go in pieces of at most one
    /// sealed frame's body ([`FRAME_BODY_MAX`]) of whole records, each
    /// page read from guest memory straight into its place in the
    /// transport's queue (a sealed link then seals the frame there in
    /// place: one copy and the MAC's one pass). Else they are built in a
    /// batch of this engine's and sent (one copy more).
    fn send_pages<V, T>(
        &mut self,
        vm: &mut V,
        link: &mut T,
        max_pages: usize,
    ) -> Result<(), MigrationError>
    where
        V: MigratableVm + ?Sized,
        T: Transport + ?Sized,
    {
        let limit = u64::from(self.policy.step_pages.max(1)).min(max_pages as u64);
        let mut pages = 0u64;
        while pages < limit && self.to_send.next_set(self.cursor).is_some() {
            let want = FRAME_BODY_MAX.min((limit - pages) as usize * BATCH_BYTES_PER_PAGE);
            let base = self.report.bytes_sent;
            let (cursor, zero_pages) = (self.cursor, self.report.zero_pages);
            let mut filled = None;
            let lent = link.send_with(want, &mut |room| {
                let (len, n, r) = self.fill_records(vm, room, limit - pages, base);
                let len = if r.is_ok() { len } else { 0 };
                filled = Some((len, n, r));
                len
            });
            let Some(sent) = lent else {
                if filled.is_some() {
                    // Read but not sent: read again below.
                    self.cursor = cursor;
                    self.report.zero_pages = zero_pages;
                }
                break;
            };
            let Some((len, n, r)) = filled else {
                // A link that failed before it lent room says why.
                sent?;
                return Err(MigrationError::Transport(TransportError::Broken(
                    "the link lent no room for the pages",
                )));
            };
            self.pages_this_pass += n;
            pages += n;
            r?;
            sent?;
            if n == 0 {
                break; // Nothing fitted (cannot happen: `want` fits a page).
            }
            self.report.bytes_sent += len as u64;
            self.transfer_bytes += len as u64;
        }
        if pages >= limit || self.to_send.next_set(self.cursor).is_none() {
            return Ok(());
        }
        // Worst case: every page its own data record, each behind a zero
        // marker. Grown once, then reused (never shrunk, never re-zeroed).
        let left = limit - pages;
        let room = left as usize * BATCH_BYTES_PER_PAGE;
        if self.batch.len() < room {
            self.batch.resize(room, 0);
        }
        let mut batch = core::mem::take(&mut self.batch);
        let base = self.report.bytes_sent;
        let (len, n, result) = self.fill_records(vm, &mut batch[..room], left, base);
        self.pages_this_pass += n;
        let sent = result.and_then(|()| self.send_raw(link, &batch[..len]));
        self.batch = batch;
        sent
    }

    /// Read pages of the pass (at most `max_pages`) into `buf` as whole
    /// memory records while the worst case of one more page fits;
    /// `base` is the stream offset of `buf[0]`. Returns the bytes of
    /// records, the pages read, and how reading ended.
    ///
    /// Each page is read from guest memory straight into its place in
    /// `buf` (one copy) and checked for zero there. Before version 5 it
    /// is CRC'd once: that CRC gives the page hash (for the end digest)
    /// and, combined, the record's CRC
    /// ([`crate::digest::crc32_append_page`]). From version 5 on (a
    /// sealed link) the link's MAC is the one pass over its bytes: the
    /// record's CRC covers its head and the page hash names the page's
    /// place in the stream ([`crate::digest::page_hash_at`]), unless
    /// verification mode needs the content hash (one CRC pass). A zero
    /// page's bytes are dropped again and it joins a zero marker.
    fn fill_records<V>(
        &mut self,
        vm: &mut V,
        buf: &mut [u8],
        max_pages: u64,
        base: u64,
    ) -> (usize, u64, Result<(), MigrationError>)
    where
        V: MigratableVm + ?Sized,
    {
        let sealed = self.version >= SEALED_VERSION;
        let positional = sealed && !self.policy.verify_memory;
        let mut b = Batch::new(!sealed);
        let mut pages = 0u64;
        let result = (|| {
            while pages < max_pages && b.extent() + BATCH_BYTES_PER_PAGE <= buf.len() {
                let Some(gfn) = self.to_send.next_set(self.cursor) else {
                    break;
                };
                self.cursor = gfn + 1;
                let at = b.page_slot(buf, gfn);
                let page = <&mut Page>::try_from(&mut buf[at..at + PAGE_SIZE])
                    .map_err(|_| VmError::at("batch buffer", gfn))?;
                vm.read_page(gfn, page)?;
                let hash = if is_zero_page(page) {
                    self.report.zero_pages += 1;
                    b.zero(buf, gfn);
                    zero_page_hash(gfn)
                } else if positional {
                    b.data(buf, gfn, 0);
                    page_hash_at(gfn, base + at as u64)
                } else {
                    let crc = crc32fast::hash(page);
                    b.data(buf, gfn, crc);
                    page_hash_of_crc(gfn, crc)
                };
                if let Some(h) = usize::try_from(gfn)
                    .ok()
                    .and_then(|i| self.page_hashes.get_mut(i))
                {
                    *h = hash;
                }
                pages += 1;
            }
            Ok::<(), MigrationError>(())
        })();
        b.close(buf);
        (b.len, pages, result)
    }

    fn end_of_pass<V, T>(
        &mut self,
        vm: &mut V,
        link: &mut T,
        now: u64,
    ) -> Result<(), MigrationError>
    where
        V: MigratableVm + ?Sized,
        T: Transport + ?Sized,
    {
        self.report.pages_per_pass.push(self.pages_this_pass);
        self.report.passes += 1;
        self.pages_this_pass = 0;
        self.cursor = 0;
        if self.phase == Phase::FinalCopy {
            // The VM is paused and its last pages are sent: nothing more to
            // collect. The log stays on until the migration is over:
            // stopping it gives write access back to every frame, work in
            // proportion to RAM that the pause does not need (the way back
            // stops it before the VM resumes; on completion it stops after
            // the destination confirmed).
            if self.policy.verify_memory {
                self.verify_gfn = 0;
                self.verify_digest = ImageDigest::new();
                self.phase = Phase::Verify;
                return Ok(());
            }
            self.phase = Phase::SendState;
            return Ok(());
        }
        self.sample_bandwidth(link, now);
        self.to_send.clear_all();
        vm.collect_dirty(&mut self.to_send)?;
        let dirty = self.to_send.count();
        let pass_ns = now.saturating_sub(self.t_pass);
        self.t_pass = now;
        if let Some(rate) = policy::bandwidth_sample(dirty * PAGE_SIZE as u64, pass_ns) {
            self.dirty_rate = rate;
        }
        let bw = policy::effective_bandwidth(self.bandwidth, self.policy.max_bandwidth_bytes_per_s);
        // What is still on its way counts too: the pause waits for it
        // (once there is a rate to time it by; without one, an idle guest
        // with nothing dirty must still be able to switch over).
        let in_flight = if bw > 0 {
            self.report
                .bytes_sent
                .saturating_sub(self.acknowledged(link))
        } else {
            0
        };
        let expected = policy::expected_downtime_ns(
            (dirty * PAGE_SIZE as u64).saturating_add(in_flight),
            bw,
            self.policy.switch_over_cost_ns,
        );
        self.expected_downtime_ns = Some(expected);
        if policy::fits_downtime(expected, self.policy.downtime_limit_ns) {
            // Downtime starts when stopping the vCPUs starts.
            self.pause_ns = Some(now);
            self.marks.pause = Some(now);
            vm.pause()?;
            self.paused = true;
            // Writes between the collection above and the pause.
            vm.collect_dirty(&mut self.to_send)?;
            self.phase = Phase::FinalCopy;
        } else {
            if let Some(prev) = self.prev_dirty {
                if !policy::is_converging(prev, dirty, self.policy.min_shrink_pct) {
                    self.throttle = policy::next_throttle(self.throttle, &self.policy);
                    vm.set_throttle(self.throttle);
                }
            }
            self.prev_dirty = Some(dirty);
        }
        Ok(())
    }

    /// Verification mode, VM paused: read and hash the next frames, compare
    /// each with the hash of what was sent; after the last frame fail on
    /// any stale one, else send the verify record and the state.
    fn verify_step<V, T>(&mut self, vm: &mut V, link: &mut T) -> Result<(), MigrationError>
    where
        V: MigratableVm + ?Sized,
        T: Transport + ?Sized,
    {
        let ram_pages = self.config.ram_pages();
        let end = self
            .verify_gfn
            .saturating_add(VERIFY_PAGES_PER_STEP)
            .min(ram_pages);
        for gfn in self.verify_gfn..end {
            vm.read_page(gfn, &mut self.page)?;
            let hash = if is_zero_page(&self.page) {
                zero_page_hash(gfn)
            } else {
                page_hash(gfn, &self.page)
            };
            self.verify_digest.push(hash);
            let sent = usize::try_from(gfn)
                .ok()
                .and_then(|i| self.page_hashes.get(i));
            if sent != Some(&hash) {
                self.stale_pages += 1;
                if self.stale_gfns.len() < STALE_GFNS_REPORTED {
                    self.stale_gfns.push(gfn);
                }
            }
        }
        self.verify_gfn = end;
        if end < ram_pages {
            return Ok(());
        }
        if self.stale_pages > 0 {
            return Err(MigrationError::StalePages {
                stale_pages: self.stale_pages,
                first_gfns: core::mem::take(&mut self.stale_gfns),
            });
        }
        self.report.verified = true;
        self.out.clear();
        Record::MemVerify {
            digest: self.verify_digest.finish(),
        }
        .encode(&mut self.out);
        self.flush_out(link)?;
        self.phase = Phase::SendState;
        Ok(())
    }

    /// vCPU and device state, then the end record (VM paused).
    fn send_state<V, T>(&mut self, vm: &mut V, link: &mut T) -> Result<(), MigrationError>
    where
        V: MigratableVm + ?Sized,
        T: Transport + ?Sized,
    {
        let vcpus = vm.save_vcpus()?;
        if vcpus.len() as u64 != u64::from(self.config.vcpus) {
            return Err(MigrationError::InconsistentVm {
                what: "vCPU states",
                expected: u64::from(self.config.vcpus),
                found: vcpus.len() as u64,
            });
        }
        let devices = vm.save_devices()?;
        if devices.len() != self.config.devices.len() {
            return Err(MigrationError::InconsistentVm {
                what: "device states",
                expected: self.config.devices.len() as u64,
                found: devices.len() as u64,
            });
        }
        self.out.clear();
        for (i, v) in vcpus.into_iter().enumerate() {
            if v.id as usize != i || v.fpu.xsave.len() > MAX_XSAVE_BYTES {
                return Err(MigrationError::Vm(VmError::at(
                    "vCPU state out of order or XSAVE image too large",
                    i as u64,
                )));
            }
            Record::Vcpu(Box::new(v)).encode(&mut self.out);
        }
        for (d, want) in devices.into_iter().zip(&self.config.devices) {
            if (d.kind, d.instance, d.version) != (want.kind, want.instance, want.version)
                || d.payload.len() > MAX_DEVICE_PAYLOAD
            {
                return Err(MigrationError::Vm(VmError::at(
                    "device state does not match the configuration or is too large",
                    u64::from(d.kind),
                )));
            }
            Record::Device(d).encode(&mut self.out);
        }
        self.sent_digest = ImageDigest::of_hashes(&self.page_hashes);
        Record::End {
            digest: self.sent_digest,
        }
        .encode(&mut self.out);
        self.flush_out(link)?;
        self.phase = Phase::AwaitReady;
        Ok(())
    }

    /// The way back: everything the source changed is undone.
    fn abandon<V, T>(
        &mut self,
        vm: &mut V,
        link: &mut T,
        result: MigrationResult,
        err: MigrationError,
        now: u64,
    ) where
        V: MigratableVm + ?Sized,
        T: Transport + ?Sized,
    {
        // No abort before our magic (the peer could not parse it) or when the
        // peer already stopped or the channel is gone.
        if self.phase != Phase::Handshake
            && !matches!(
                err,
                MigrationError::PeerAborted(_)
                    | MigrationError::Transport(_)
                    | MigrationError::LinkStalled { .. }
            )
        {
            let mut out = Vec::new();
            Record::Abort {
                reason: err.to_string(),
            }
            .encode(&mut out);
            // Best effort: the destination discards on abort or on loss of
            // the channel alike.
            let _ = link.send(&out);
        }
        self.stop_dirty_log(vm);
        if self.throttle != 0 {
            vm.set_throttle(0);
        }
        if self.paused {
            vm.resume();
            self.paused = false;
        }
        self.finish(result, Some(err), now);
    }

    /// Stop the dirty log if it is on.
    fn stop_dirty_log<V: MigratableVm + ?Sized>(&mut self, vm: &mut V) {
        if self.dirty_log_on {
            vm.stop_dirty_log();
            self.dirty_log_on = false;
        }
    }

    /// Record the end. The dirty log is stopped by the caller: `abandon`
    /// before the VM resumes, the `resumed` step after the destination
    /// confirmed, `resolve_in_doubt` once the destination answered (until
    /// then the VM stays paused with the log on).
    fn finish(&mut self, result: MigrationResult, err: Option<MigrationError>, now: u64) {
        let r = &mut self.report;
        r.result = result;
        r.error = err.as_ref().map(|e| e.to_string());
        r.total_ms = now.saturating_sub(self.t_start) / policy::NS_PER_MS;
        r.downtime_ms = match (result, self.pause_ns) {
            (MigrationResult::Completed, Some(p)) => now.saturating_sub(p) / policy::NS_PER_MS,
            _ => 0,
        };
        r.pause_us = self.marks.phases(now);
        r.expected_downtime_ms = self
            .expected_downtime_ns
            .map_or(0, |e| e / policy::NS_PER_MS);
        r.throttle_pct = self.throttle;
        self.error = err;
        self.phase = Phase::Finished;
        // Release buffers sized by guest RAM early.
        self.page_hashes = vec![];
        self.to_send = DirtyBitmap::new(0);
    }
}
