//! Write mirroring for storage live migration: the guest keeps running on
//! its source disk while the copy engine ([`crate::copy`]) fills the
//! destination, and every guest write that the copy would otherwise miss is
//! also written to the destination.
//!
//! States (MISSION "Storage live migration"):
//!
//! ```text
//!   Copying --copy done + dest flushed--> Mirrored --switch_over--> SwitchedOver
//!      |  \______________________________   |
//!      |  cancel          dest I/O error  \ | cancel / dest I/O error
//!      v                                   vv
//!   Cancelled                            Failed / Cancelled
//! ```
//!
//! - **Copying**: one ascending pass over the source's allocated ranges. A
//!   guest write goes to the source; it goes to the destination as well
//!   unless it lies wholly in the part of the plan the copy has not reached
//!   yet (the copy will carry it). A write overlapping the chunk in flight,
//!   or another write in progress, waits: chunks and writes hold their byte
//!   ranges exclusively, so a chunk can never carry stale source bytes over a
//!   newer mirrored write, and overlapping writes reach both copies in the
//!   same order.
//! - **Mirrored**: the destination is complete; every write goes to both.
//! - **SwitchedOver**: the destination is the disk; the source is handed
//!   back to the caller to delete or keep.
//! - **Cancelled / Failed**: the destination is handed back to be discarded;
//!   the source keeps serving I/O and holds every acknowledged write.
//!
//! Holes: with [`CopyOptions::skip_zero_chunks`] (a destination that reads
//! as zeros wherever nothing was written: a new dynamic or fixed VHDX, a raw
//! file; never a differencing disk) a chunk the source reads as all zeros is
//! not written, so the destination stays sparse. That is right only while
//! the destination still reads zeros there: a mirrored guest write may have
//! reached the destination ahead of the cursor (one that spans pending and
//! copied or unplanned bytes), and a later unmirrored write of zeros over it
//! lands on the source alone. The core records the ranges ahead of the
//! cursor that mirrored writes reached; a zero chunk touching one of them is
//! written ([`MirrorCore::may_skip_zeros`]).
//!
//! A write is acknowledged only when every copy it must reach is durable:
//! the primary (source before switch-over, destination after) is written and
//! flushed, then the mirror copy. A mirror-side failure does not fail the
//! guest's write (the source holds it); it fails the migration instead.
//!
//! [`MirrorCore`] is that state machine with no I/O and no locking: it only
//! admits or refuses chunks and writes. [`MirroredDisk`] drives it on one
//! thread (no_std: the hypervisor calls [`MirroredDisk::step`] between guest
//! requests); [`SharedMirror`] (`std`) drives it from a guest-I/O side and a
//! copy thread at once, blocking on the core's refusals.

pub mod fault;
#[cfg(feature = "std")]
mod host;
#[cfg(feature = "std")]
mod quick;
#[cfg(feature = "std")]
mod shared;
#[cfg(feature = "std")]
pub use host::{MigrationOptions, StorageMigration};
#[cfg(feature = "std")]
pub use quick::{QuickMigration, QuickState};
#[cfg(feature = "std")]
pub use shared::{SharedDisk, SharedMirror};

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::copy::{self, ranges_overlap, Chunk, CopyError, CopyJob, CopyOptions, CopyStats};
use crate::io::{DiskError, VirtualDisk};

/// Where a mirrored migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorState {
    /// The one-pass copy runs; writes are mirrored behind its cursor.
    Copying,
    /// The destination is a complete, current copy; writes go to both.
    Mirrored,
    /// I/O goes to the destination only.
    SwitchedOver,
    /// Cancelled by request; the source is the disk.
    Cancelled,
    /// The copy or a mirrored write failed; the source is the disk.
    Failed,
}

impl MirrorState {
    /// True while the source is the disk the guest runs on.
    pub fn source_is_primary(self) -> bool {
        !matches!(self, MirrorState::SwitchedOver)
    }

    /// True in the states where the destination still receives writes.
    pub fn mirrors(self) -> bool {
        matches!(self, MirrorState::Copying | MirrorState::Mirrored)
    }
}

impl fmt::Display for MirrorState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MirrorState::Copying => "copying",
            MirrorState::Mirrored => "mirrored",
            MirrorState::SwitchedOver => "switched over",
            MirrorState::Cancelled => "cancelled",
            MirrorState::Failed => "failed",
        })
    }
}

/// A snapshot of a migration's progress, as a management job shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Current state.
    pub state: MirrorState,
    /// Bytes the copy has moved.
    pub bytes_copied: u64,
    /// Bytes the copy moves in all.
    pub bytes_total: u64,
    /// Guest writes that reached the destination as well as the source.
    pub mirrored_writes: u64,
    /// Why the migration failed, in [`MirrorState::Failed`].
    pub failure: Option<MirrorError>,
}

impl Progress {
    /// Percentage of the copy done (0..=100).
    pub fn percent(&self) -> u8 {
        copy::percent(self.bytes_copied, self.bytes_total)
    }
}

/// Errors of the mirror. Guest I/O sees [`DiskError`]s; these describe why a
/// migration stopped or why a request to it was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorError {
    /// The copy failed (reading the source, writing or flushing the destination).
    Copy(CopyError),
    /// A guest write could not be mirrored to the destination.
    MirrorWrite {
        /// Virtual offset of the write.
        offset: u64,
        /// The destination's error.
        error: DiskError,
    },
    /// The operation needs another state (e.g. switch-over before the copy is done).
    WrongState {
        /// What was asked.
        op: &'static str,
        /// The state the migration was in.
        state: MirrorState,
    },
    /// A step was asked for out of order (e.g. finishing a quick migration
    /// before its base is copied).
    Sequence(&'static str),
    /// A host file operation of the migration failed (creating the
    /// destination, deleting the destination or the source).
    File {
        /// What was being done ("create", "delete", ...).
        op: &'static str,
        /// The file.
        path: String,
        /// The host's explanation.
        detail: String,
    },
}

impl fmt::Display for MirrorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MirrorError::Copy(e) => write!(f, "storage copy failed: {e}"),
            MirrorError::MirrorWrite { offset, error } => write!(
                f,
                "mirroring a guest write at virtual offset {offset} to the destination failed: {error}"
            ),
            MirrorError::WrongState { op, state } => {
                write!(f, "cannot {op} while the migration is {state}")
            }
            MirrorError::Sequence(what) => write!(f, "out of sequence: {what}"),
            MirrorError::File { op, path, detail } => write!(f, "cannot {op} {path}: {detail}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for MirrorError {}

impl MirrorError {
    /// Whether a store filled up (copying or mirroring a write to the
    /// destination, [`crate::io::IoError::NoSpace`]).
    pub fn is_no_space(&self) -> bool {
        match self {
            MirrorError::Copy(e) => e.is_no_space(),
            MirrorError::MirrorWrite { error, .. } => error.is_no_space(),
            _ => false,
        }
    }
}

impl From<CopyError> for MirrorError {
    fn from(e: CopyError) -> Self {
        MirrorError::Copy(e)
    }
}

/// Which disk a write's acknowledgement depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Primary {
    /// The source (before switch-over, and after cancel or failure).
    Source,
    /// The destination (after switch-over).
    Dest,
}

/// An admitted guest write: which copies it goes to. Hand it back to
/// [`MirrorCore::end_write`] when done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteTicket {
    id: u64,
    /// The copy whose failure fails the write.
    pub primary: Primary,
    /// Also write (and flush) the destination after the primary; a failure
    /// there fails the migration, not the write.
    pub mirror: bool,
}

/// A refusal: the range is held by a chunk in flight or another write.
/// Retry after the holder ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// What the copy side should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkAdmission {
    /// Copy this chunk, then call [`MirrorCore::end_chunk`].
    Copy(Chunk),
    /// A guest write holds part of the next chunk, or the most chunks are
    /// in flight already: retry when one of them ends.
    Busy,
    /// No chunk is left to start, but some are still in flight: a
    /// read-ahead copier stops reading; whoever ends the last one then gets
    /// [`ChunkAdmission::Done`].
    Drained,
    /// Every chunk is copied: flush the destination and call
    /// [`MirrorCore::end_copy`].
    Done,
    /// The migration is not copying any more (finished, cancelled or failed).
    Stopped(MirrorState),
}

/// The mirror's state machine: plan, cursor, range ownership and counters.
/// It performs no I/O; drivers ask it before every chunk and every write.
#[derive(Debug, Clone)]
pub struct MirrorCore {
    job: CopyJob,
    state: MirrorState,
    /// Chunks admitted and not yet ended, oldest (at the cursor) first.
    in_flight: Vec<Chunk>,
    /// How many chunks may be in flight at once (a copier reading ahead).
    max_in_flight: usize,
    /// Guest writes in progress: `(ticket id, offset, len_bytes)`.
    writes: Vec<(u64, u64, u64)>,
    next_ticket: u64,
    mirrored_writes: u64,
    failure: Option<MirrorError>,
    /// Ranges at or past the cursor that mirrored writes reached on the
    /// destination: sorted, disjoint, at most [`DEST_AHEAD_MAX`] (more are
    /// merged into one covering range, which only costs zero chunks
    /// written). Kept only for a plan that skips zero chunks.
    dest_ahead: Vec<(u64, u64)>,
}

/// Most ranges [`MirrorCore`] keeps of mirrored writes ahead of the cursor.
const DEST_AHEAD_MAX: usize = 1024;

impl MirrorCore {
    /// A core in [`MirrorState::Copying`] for the plan `job`.
    pub fn new(job: CopyJob) -> Self {
        MirrorCore {
            job,
            state: MirrorState::Copying,
            in_flight: Vec::new(),
            max_in_flight: 1,
            writes: Vec::new(),
            next_ticket: 0,
            mirrored_writes: 0,
            failure: None,
            dest_ahead: Vec::new(),
        }
    }

    /// Current state.
    pub fn state(&self) -> MirrorState {
        self.state
    }

    /// Progress snapshot.
    pub fn progress(&self) -> Progress {
        Progress {
            state: self.state,
            bytes_copied: self.job.bytes_copied(),
            bytes_total: self.job.bytes_total(),
            mirrored_writes: self.mirrored_writes,
            failure: self.failure.clone(),
        }
    }

    /// The copy plan.
    pub fn job(&self) -> &CopyJob {
        &self.job
    }

    fn write_conflicts(&self, offset: u64, len_bytes: u64) -> bool {
        self.writes
            .iter()
            .any(|&(_, o, l)| ranges_overlap(o, l, offset, len_bytes))
    }

    /// Admits a guest write of `len_bytes` at `offset`, or refuses it while
    /// another holder owns part of its range.
    pub fn begin_write(&mut self, offset: u64, len_bytes: u64) -> Result<WriteTicket, Busy> {
        if self.write_conflicts(offset, len_bytes)
            || self.in_flight.iter().any(|c| c.overlaps(offset, len_bytes))
        {
            return Err(Busy);
        }
        let (primary, mirror) = match self.state {
            MirrorState::Copying => (Primary::Source, !self.job.is_pending(offset, len_bytes)),
            MirrorState::Mirrored => (Primary::Source, true),
            MirrorState::SwitchedOver => (Primary::Dest, false),
            MirrorState::Cancelled | MirrorState::Failed => (Primary::Source, false),
        };
        if mirror && self.state == MirrorState::Copying && self.job.skips_zero_chunks() {
            self.note_dest_ahead(offset, len_bytes);
        }
        let id = self.next_ticket;
        self.next_ticket = self.next_ticket.wrapping_add(1);
        self.writes.push((id, offset, len_bytes));
        Ok(WriteTicket {
            id,
            primary,
            mirror,
        })
    }

    /// Records that a mirrored write of `[offset, offset + len_bytes)` will
    /// reach the destination: the part at or past the cursor, which a later
    /// zero chunk there must overwrite.
    fn note_dest_ahead(&mut self, offset: u64, len_bytes: u64) {
        let start = offset.max(self.job.cursor());
        let end = offset.saturating_add(len_bytes);
        if start >= end {
            return;
        }
        let r = &mut self.dest_ahead;
        // Ranges wholly behind the cursor no longer matter.
        let cursor = self.job.cursor();
        r.retain(|&(s, l)| s + l > cursor);
        // Insert and merge with whatever it touches.
        let first = r.partition_point(|&(s, l)| s + l < start);
        let mut last = first;
        let (mut lo, mut hi) = (start, end);
        while let Some(&(s, l)) = r.get(last) {
            if s > hi {
                break;
            }
            lo = lo.min(s);
            hi = hi.max(s + l);
            last += 1;
        }
        r.splice(first..last, [(lo, hi - lo)]);
        if r.len() > DEST_AHEAD_MAX {
            let lo = r.first().map_or(lo, |f| f.0);
            let hi = r.last().map_or(hi, |l| l.0 + l.1);
            r.clear();
            r.push((lo, hi - lo));
        }
    }

    /// Whether the driver may leave `chunk` (admitted, in flight) unwritten
    /// when the source reads it as all zeros: the plan skips zero chunks
    /// and no mirrored write reached the destination in its range, so the
    /// destination still reads zeros there. While the chunk is in flight
    /// no write can enter its range, so the answer holds until it ends.
    pub fn may_skip_zeros(&self, chunk: Chunk) -> bool {
        self.job.skips_zero_chunks() && self.dest_ahead.iter().all(|&(s, l)| !chunk.overlaps(s, l))
    }

    /// Ends a write. `mirror_result` is the destination's outcome when the
    /// ticket asked for a mirror copy and the destination was still there
    /// (`None` otherwise). Returns `true` when this call failed the
    /// migration: the driver must then discard the destination.
    pub fn end_write(
        &mut self,
        ticket: WriteTicket,
        offset: u64,
        mirror_result: Option<Result<(), DiskError>>,
    ) -> bool {
        self.writes.retain(|w| w.0 != ticket.id);
        match mirror_result {
            Some(Ok(())) => {
                if self.state.mirrors() {
                    self.mirrored_writes += 1;
                }
                false
            }
            Some(Err(error)) => self.fail(MirrorError::MirrorWrite { offset, error }),
            None => false,
        }
    }

    /// Lets up to `n` (at least 1) chunks be in flight at once, for a copier
    /// that reads ahead while it writes; they must end in order.
    pub fn set_max_in_flight(&mut self, n: usize) {
        self.max_in_flight = n.max(1);
    }

    /// Admits the next chunk of the copy (the one after those in flight).
    pub fn begin_chunk(&mut self) -> ChunkAdmission {
        if self.state != MirrorState::Copying {
            return ChunkAdmission::Stopped(self.state);
        }
        if self.in_flight.len() >= self.max_in_flight {
            return ChunkAdmission::Busy;
        }
        let next = match self.in_flight.last() {
            Some(&last) => self.job.chunk_after(last),
            None => self.job.next_chunk(),
        };
        let Some(chunk) = next else {
            return if self.in_flight.is_empty() {
                ChunkAdmission::Done
            } else {
                ChunkAdmission::Drained
            };
        };
        if self.write_conflicts(chunk.offset, chunk.len_bytes) {
            return ChunkAdmission::Busy;
        }
        self.in_flight.push(chunk);
        ChunkAdmission::Copy(chunk)
    }

    /// Ends the oldest chunk in flight. Returns `true` when this call failed
    /// the migration (the driver discards the destination).
    pub fn end_chunk(&mut self, chunk: Chunk, result: Result<(), CopyError>) -> bool {
        let Some(pos) = self.in_flight.iter().position(|&c| c == chunk) else {
            // Dropped by a cancel or failure while it was in flight.
            return false;
        };
        self.in_flight.remove(pos);
        if self.state != MirrorState::Copying {
            return false;
        }
        // `complete` refuses a chunk that is not the next one: ending out of
        // order fails the migration rather than leaving a hole.
        match result.and_then(|()| self.job.complete(chunk)) {
            Ok(()) => false,
            Err(e) => self.fail(MirrorError::Copy(e)),
        }
    }

    /// Ends the copy after the driver flushed the destination: the
    /// destination is complete and current, so the state becomes
    /// [`MirrorState::Mirrored`]. Returns `true` when this call failed the
    /// migration.
    pub fn end_copy(&mut self, flush_result: Result<(), DiskError>) -> bool {
        if self.state != MirrorState::Copying || !self.job.is_done() || !self.in_flight.is_empty() {
            return false;
        }
        match flush_result {
            Ok(()) => {
                self.state = MirrorState::Mirrored;
                false
            }
            Err(e) => self.fail(MirrorError::Copy(CopyError::DestFlush(e))),
        }
    }

    /// Switches I/O to the destination. Refused (`Busy`) while writes are in
    /// progress, so none straddles the switch; an error outside
    /// [`MirrorState::Mirrored`].
    pub fn switch_over(&mut self) -> Result<Result<(), Busy>, MirrorError> {
        if self.state != MirrorState::Mirrored {
            return Err(MirrorError::WrongState {
                op: "switch over",
                state: self.state,
            });
        }
        if !self.writes.is_empty() {
            return Ok(Err(Busy));
        }
        self.state = MirrorState::SwitchedOver;
        Ok(Ok(()))
    }

    /// Cancels the migration. Returns `true` when the destination must now
    /// be discarded; `false` when there was nothing to cancel (already
    /// switched over, cancelled or failed). After switch-over the destination
    /// is the disk, so cancel is refused.
    pub fn cancel(&mut self) -> Result<bool, MirrorError> {
        match self.state {
            MirrorState::Copying | MirrorState::Mirrored => {
                self.state = MirrorState::Cancelled;
                // Chunks in flight are abandoned: free their ranges.
                self.in_flight.clear();
                Ok(true)
            }
            MirrorState::Cancelled | MirrorState::Failed => Ok(false),
            MirrorState::SwitchedOver => Err(MirrorError::WrongState {
                op: "cancel",
                state: self.state,
            }),
        }
    }

    fn fail(&mut self, why: MirrorError) -> bool {
        if !self.state.mirrors() {
            return false;
        }
        self.state = MirrorState::Failed;
        self.failure = Some(why);
        self.in_flight.clear();
        true
    }
}

/// Writes `data` to `disk` and flushes it: a write is acknowledged only once durable.
fn write_durable<D: VirtualDisk + ?Sized>(
    disk: &mut D,
    offset: u64,
    data: &[u8],
) -> Result<(), DiskError> {
    disk.write(offset, data)?;
    disk.flush()
}

/// Moves one chunk (skipping it when it reads as zeros and `skip` allows),
/// counting and timing each part in `stats`.
fn copy_chunk_counted<S: VirtualDisk, D: VirtualDisk>(
    src: &mut S,
    dst: &mut D,
    chunk: Chunk,
    buf: &mut Vec<u8>,
    skip: bool,
    now: &dyn Fn() -> u64,
    stats: &mut CopyStats,
) -> Result<(), CopyError> {
    let t0 = now();
    copy::read_chunk(src, chunk, buf)?;
    let t1 = now();
    stats.chunks += 1;
    stats.bytes_read += chunk.len_bytes;
    stats.read_ns += t1.saturating_sub(t0);
    let data = buf.get(..chunk.len_bytes as usize).unwrap_or(buf);
    if skip {
        let zero = copy::is_zero(data);
        stats.zero_check_ns += now().saturating_sub(t1);
        if zero {
            stats.zero_chunks_skipped += 1;
            return Ok(());
        }
    }
    // A chunk with some data: its zero granules are skipped too (each
    // look stops at the first word that is not zero).
    let t2 = now();
    stats.bytes_written += copy::write_chunk(dst, chunk, data, skip)?;
    stats.write_ns += now().saturating_sub(t2);
    Ok(())
}

fn gone(which: &str) -> DiskError {
    DiskError::Request(alloc::format!(
        "the {which} disk is no longer part of this migration"
    ))
}

/// A source disk being migrated to a destination, presented to the guest as
/// one [`VirtualDisk`]. Single-threaded: the owner interleaves guest I/O with
/// [`MirroredDisk::step`] calls (no_std friendly). For a copy thread running
/// beside guest I/O use [`SharedMirror`] (`std`).
#[derive(Debug)]
pub struct MirroredDisk<S, D> {
    source: Option<S>,
    dest: Option<D>,
    /// Destination removed by cancel or failure, awaiting discard.
    discarded: Option<D>,
    core: MirrorCore,
    buf: Vec<u8>,
    virtual_size: u64,
    sector_bytes: u32,
    stats: CopyStats,
}

/// What one [`MirroredDisk::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Copied a chunk; more remain.
    Copied(Chunk),
    /// The copy is complete and the destination flushed: ready to switch over.
    Mirrored,
}

impl<S: VirtualDisk, D: VirtualDisk> MirroredDisk<S, D> {
    /// Starts mirroring `source` to `dest` (which must have the same
    /// geometry; create it with the same parameters as the source).
    pub fn new(mut source: S, dest: D, opts: CopyOptions) -> Result<Self, MirrorError> {
        copy::check_geometry(&source, &dest)?;
        let job = CopyJob::for_disk(&mut source, opts)?;
        Ok(MirroredDisk {
            virtual_size: source.virtual_size(),
            sector_bytes: source.logical_sector_size(),
            source: Some(source),
            dest: Some(dest),
            discarded: None,
            core: MirrorCore::new(job),
            buf: Vec::new(),
            stats: CopyStats::default(),
        })
    }

    /// What the copy's steps did so far, and (with
    /// [`MirroredDisk::step_timed`]) where their time went.
    pub fn stats(&self) -> CopyStats {
        self.stats
    }

    /// Progress snapshot.
    pub fn progress(&self) -> Progress {
        self.core.progress()
    }

    /// Current state.
    pub fn state(&self) -> MirrorState {
        self.core.state()
    }

    fn discard_dest(&mut self) {
        if let Some(d) = self.dest.take() {
            self.discarded = Some(d);
        }
    }

    /// Copies the next chunk; after the last one flushes the destination and
    /// enters [`MirrorState::Mirrored`]. A failure moves to
    /// [`MirrorState::Failed`] (the guest keeps running on the source) and is
    /// returned.
    pub fn step(&mut self) -> Result<Step, MirrorError> {
        self.step_timed(&|| 0)
    }

    /// [`MirroredDisk::step`], timing its reads, zero checks, writes and
    /// flush with `now` (nanoseconds) into [`MirroredDisk::stats`].
    pub fn step_timed(&mut self, now: &dyn Fn() -> u64) -> Result<Step, MirrorError> {
        match self.core.begin_chunk() {
            ChunkAdmission::Copy(chunk) => {
                let skip = self.core.may_skip_zeros(chunk);
                let result = match (self.source.as_mut(), self.dest.as_mut()) {
                    (Some(s), Some(d)) => {
                        copy_chunk_counted(s, d, chunk, &mut self.buf, skip, now, &mut self.stats)
                    }
                    _ => Err(CopyError::Cancelled),
                };
                if self.core.end_chunk(chunk, result) {
                    self.discard_dest();
                }
                self.check_failed()?;
                Ok(Step::Copied(chunk))
            }
            ChunkAdmission::Done => {
                self.buf = Vec::new();
                let t0 = now();
                let flushed = match self.dest.as_mut() {
                    Some(d) => d.flush(),
                    None => Err(gone("destination")),
                };
                self.stats.flushes += 1;
                self.stats.flush_ns += now().saturating_sub(t0);
                if self.core.end_copy(flushed) {
                    self.discard_dest();
                }
                self.check_failed()?;
                Ok(Step::Mirrored)
            }
            ChunkAdmission::Stopped(MirrorState::Mirrored) => Ok(Step::Mirrored),
            ChunkAdmission::Stopped(state) => Err(self
                .core
                .failure
                .clone()
                .unwrap_or(MirrorError::WrongState { op: "copy", state })),
            // Single-threaded: nothing can hold a range between calls.
            ChunkAdmission::Busy | ChunkAdmission::Drained => Err(MirrorError::WrongState {
                op: "copy while a range is held",
                state: self.core.state(),
            }),
        }
    }

    fn check_failed(&self) -> Result<(), MirrorError> {
        match (&self.core.failure, self.core.state()) {
            (Some(e), MirrorState::Failed) => Err(e.clone()),
            _ => Ok(()),
        }
    }

    /// Steps until the destination is complete.
    pub fn run_to_mirrored(&mut self) -> Result<(), MirrorError> {
        while let Step::Copied(_) = self.step()? {}
        Ok(())
    }

    /// Switches I/O to the destination and returns the source, which the
    /// caller deletes (or keeps, by option).
    pub fn switch_over(&mut self) -> Result<S, MirrorError> {
        match self.core.switch_over()? {
            Ok(()) => self.source.take().ok_or(MirrorError::WrongState {
                op: "switch over twice",
                state: MirrorState::SwitchedOver,
            }),
            Err(Busy) => Err(MirrorError::WrongState {
                op: "switch over during a write",
                state: self.core.state(),
            }),
        }
    }

    /// Cancels the migration and returns the destination for the caller to
    /// discard; the source stays the disk. `None` when already cancelled or
    /// failed (see [`MirroredDisk::take_discarded`]).
    pub fn cancel(&mut self) -> Result<Option<D>, MirrorError> {
        if self.core.cancel()? {
            self.discard_dest();
        }
        Ok(self.discarded.take())
    }

    /// The destination removed by a cancel or failure, to be discarded.
    pub fn take_discarded(&mut self) -> Option<D> {
        self.discarded.take()
    }

    /// Ends the migration and returns whichever disks are still held:
    /// `(source, destination)`.
    pub fn into_parts(self) -> (Option<S>, Option<D>) {
        (self.source, self.dest.or(self.discarded))
    }
}

impl<S: VirtualDisk, D: VirtualDisk> VirtualDisk for MirroredDisk<S, D> {
    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn logical_sector_size(&self) -> u32 {
        self.sector_bytes
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        if self.core.state().source_is_primary() {
            self.source
                .as_mut()
                .ok_or_else(|| gone("source"))?
                .read(offset, buf)
        } else {
            self.dest
                .as_mut()
                .ok_or_else(|| gone("destination"))?
                .read(offset, buf)
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        crate::io::check_request(offset, data.len(), self.sector_bytes, self.virtual_size)?;
        let len = data.len() as u64;
        let ticket = self.core.begin_write(offset, len).map_err(|Busy| {
            DiskError::Request(alloc::format!("write at {offset} overlaps a held range"))
        })?;
        let primary = match ticket.primary {
            Primary::Source => self
                .source
                .as_mut()
                .ok_or_else(|| gone("source"))
                .and_then(|s| write_durable(s, offset, data)),
            Primary::Dest => self
                .dest
                .as_mut()
                .ok_or_else(|| gone("destination"))
                .and_then(|d| write_durable(d, offset, data)),
        };
        if let Err(e) = primary {
            self.core.end_write(ticket, offset, None);
            return Err(e);
        }
        let mirrored = match (ticket.mirror, self.dest.as_mut()) {
            (true, Some(d)) => Some(write_durable(d, offset, data)),
            _ => None,
        };
        if self.core.end_write(ticket, offset, mirrored) {
            self.discard_dest();
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        // Only the primary: every mirrored write and the end of the copy
        // already made the destination durable.
        if self.core.state().source_is_primary() {
            self.source.as_mut().ok_or_else(|| gone("source"))?.flush()
        } else {
            self.dest
                .as_mut()
                .ok_or_else(|| gone("destination"))?
                .flush()
        }
    }

    fn allocated_ranges(&mut self) -> Result<Vec<(u64, u64)>, DiskError> {
        if self.core.state().source_is_primary() {
            self.source
                .as_mut()
                .ok_or_else(|| gone("source"))?
                .allocated_ranges()
        } else {
            self.dest
                .as_mut()
                .ok_or_else(|| gone("destination"))?
                .allocated_ranges()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core(map: &[(u64, u64)]) -> MirrorCore {
        let opts = CopyOptions {
            chunk_bytes: 4096,
            ..CopyOptions::default()
        };
        MirrorCore::new(CopyJob::new(map, 1 << 20, 512, opts))
    }

    #[test]
    fn writes_and_chunks_hold_their_ranges() {
        let mut c = core(&[(0, 1 << 20)]);
        let ChunkAdmission::Copy(chunk) = c.begin_chunk() else {
            panic!("first chunk")
        };
        assert_eq!((chunk.offset, chunk.len_bytes), (0, 4096));
        // A write into the chunk in flight waits; one past it goes ahead
        // without a mirror copy (the copy will carry it).
        assert_eq!(c.begin_write(512, 512), Err(Busy));
        let ahead = c.begin_write(8192, 512).unwrap();
        assert!(!ahead.mirror);
        // Overlapping writes are serialized so both copies see one order.
        assert_eq!(c.begin_write(8192, 4096), Err(Busy));
        assert!(!c.end_chunk(chunk, Ok(())));
        // The next chunk (4096..8192) is clear of the write at 8192.
        let ChunkAdmission::Copy(next) = c.begin_chunk() else {
            panic!("second chunk")
        };
        assert!(!c.end_chunk(next, Ok(())));
        // Now the chunk at 8192 is blocked by the write still in progress.
        assert_eq!(c.begin_chunk(), ChunkAdmission::Busy);
        assert!(!c.end_write(ahead, 8192, None));
        assert!(matches!(c.begin_chunk(), ChunkAdmission::Copy(_)));
        // Behind the cursor: mirrored.
        let behind = c.begin_write(0, 512).unwrap();
        assert!(behind.mirror && behind.primary == Primary::Source);
        assert!(!c.end_write(behind, 0, Some(Ok(()))));
        assert_eq!(c.progress().mirrored_writes, 1);
    }

    #[test]
    fn read_ahead_chunks_hold_ranges_and_end_in_order() {
        let mut c = core(&[(0, 16384)]);
        c.set_max_in_flight(3);
        let mut started = Vec::new();
        while let ChunkAdmission::Copy(chunk) = c.begin_chunk() {
            started.push(chunk);
        }
        assert_eq!(started.len(), 3);
        assert_eq!(c.begin_chunk(), ChunkAdmission::Busy, "limit reached");
        assert_eq!(c.begin_write(4096 + 512, 512), Err(Busy), "in flight");
        let beyond = c.begin_write(12288, 512).unwrap();
        assert!(!beyond.mirror, "ahead of every chunk: the copy carries it");
        assert!(!c.end_write(beyond, 12288, None));
        assert!(!c.end_chunk(started[0], Ok(())));
        assert!(!c.end_chunk(started[1], Ok(())));
        let last = c.begin_chunk();
        assert_eq!(
            last,
            ChunkAdmission::Copy(Chunk {
                offset: 12288,
                len_bytes: 4096
            })
        );
        assert_eq!(
            c.begin_chunk(),
            ChunkAdmission::Drained,
            "none left to start"
        );
        // Ending out of order fails the migration and frees every range.
        let ChunkAdmission::Copy(last) = last else {
            unreachable!()
        };
        assert!(c.end_chunk(last, Ok(())));
        assert_eq!(c.state(), MirrorState::Failed);
        assert!(c.begin_write(8192, 512).is_ok());
        assert!(!c.end_chunk(started[2], Ok(())), "already dropped");

        let mut c = core(&[(0, 16384)]);
        c.set_max_in_flight(2);
        let ChunkAdmission::Copy(first) = c.begin_chunk() else {
            panic!("chunk")
        };
        assert!(matches!(c.begin_chunk(), ChunkAdmission::Copy(_)));
        assert_eq!(c.cancel(), Ok(true));
        assert!(
            c.begin_write(first.offset, 512).is_ok(),
            "cancel frees ranges"
        );
    }

    #[test]
    fn zero_chunks_are_skippable_only_where_no_mirrored_write_went_ahead() {
        let opts = CopyOptions {
            chunk_bytes: 4096,
            skip_zero_chunks: true,
        };
        // Plan: [0, 16 KiB) and [20 KiB, 32 KiB); hole [16, 20) KiB.
        let mut c = MirrorCore::new(CopyJob::new(
            &[(0, 16384), (20480, 12288)],
            1 << 20,
            512,
            opts,
        ));
        // Straddles the plan's hole: mirrored, and part of it lies ahead.
        let w = c.begin_write(16384 - 512, 1024).unwrap();
        assert!(w.mirror);
        assert!(!c.end_write(w, 16384 - 512, Some(Ok(()))));
        // Two more that touch each other merge into one record.
        for off in [20480 + 4096 - 512, 20480 + 4096] {
            let w = c.begin_write(off, 512).unwrap();
            assert!(!w.mirror, "wholly pending");
            assert!(!c.end_write(w, off, None));
        }
        let w = c.begin_write(40960, 512).unwrap();
        assert!(w.mirror, "outside the plan");
        assert!(!c.end_write(w, 40960, Some(Ok(()))));
        assert_eq!(c.dest_ahead, [(16384 - 512, 1024), (40960, 512)]);
        let mut skippable = Vec::new();
        while let ChunkAdmission::Copy(chunk) = c.begin_chunk() {
            skippable.push((chunk.offset, c.may_skip_zeros(chunk)));
            assert!(!c.end_chunk(chunk, Ok(())));
        }
        assert_eq!(
            skippable,
            [
                (0, true),
                (4096, true),
                (8192, true),
                (12288, false),
                (20480, true),
                (24576, true),
                (28672, true)
            ]
        );
        // Touching or overlapping records merge.
        let mut c = MirrorCore::new(CopyJob::new(&[(0, 1 << 20)], 4 << 20, 512, opts));
        c.note_dest_ahead(8192, 512);
        c.note_dest_ahead(4096, 512);
        c.note_dest_ahead(8704, 512);
        c.note_dest_ahead(4096 + 256, 4096);
        assert_eq!(c.dest_ahead, [(4096, 5120)]);
        // Many records collapse into one that covers them all.
        let mut c = MirrorCore::new(CopyJob::new(&[(0, 1 << 20)], 4 << 20, 512, opts));
        for i in 0..(DEST_AHEAD_MAX as u64 + 5) {
            c.note_dest_ahead(i * 2048, 512);
        }
        assert!(c.dest_ahead.len() <= DEST_AHEAD_MAX);
        let covered = |o: u64| c.dest_ahead.iter().any(|&(s, l)| o >= s && o < s + l);
        assert!((0..(DEST_AHEAD_MAX as u64 + 5)).all(|i| covered(i * 2048)));
        // Without the option nothing is recorded or skipped.
        let mut c = core(&[(0, 8192)]);
        let w = c.begin_write(4096 - 512, 1024).unwrap();
        assert!(!c.end_write(w, 0, Some(Ok(()))));
        assert!(c.dest_ahead.is_empty());
        let ChunkAdmission::Copy(chunk) = c.begin_chunk() else {
            panic!("chunk")
        };
        assert!(!c.may_skip_zeros(chunk));
    }

    #[test]
    fn writes_outside_the_plan_are_mirrored() {
        let mut c = core(&[(65536, 4096)]);
        assert!(c.begin_write(0, 512).unwrap().mirror);
        assert!(!c.begin_write(65536, 512).unwrap().mirror);
        assert!(
            c.begin_write(65536 + 3584, 1024).unwrap().mirror,
            "spans out"
        );
    }

    #[test]
    fn lifecycle_and_failures() {
        let mut c = core(&[(0, 4096)]);
        assert!(c.switch_over().is_err());
        let ChunkAdmission::Copy(chunk) = c.begin_chunk() else {
            panic!("chunk")
        };
        assert!(!c.end_chunk(chunk, Ok(())));
        assert_eq!(c.begin_chunk(), ChunkAdmission::Done);
        assert!(c.end_copy(Err(DiskError::Request("x".into()))));
        assert_eq!(c.state(), MirrorState::Failed);
        assert_eq!(c.cancel(), Ok(false));
        let t = c.begin_write(0, 512).unwrap();
        assert!(!t.mirror, "no mirror after failure");

        let mut c = core(&[(0, 4096)]);
        let ChunkAdmission::Copy(chunk) = c.begin_chunk() else {
            panic!("chunk")
        };
        assert_eq!(c.cancel(), Ok(true));
        // The chunk in flight when cancel came is dropped quietly.
        assert!(!c.end_chunk(chunk, Ok(())));
        assert_eq!(
            c.begin_chunk(),
            ChunkAdmission::Stopped(MirrorState::Cancelled)
        );

        let mut c = core(&[(0, 4096)]);
        let ChunkAdmission::Copy(chunk) = c.begin_chunk() else {
            panic!("chunk")
        };
        assert!(!c.end_chunk(chunk, Ok(())));
        assert_eq!(c.begin_chunk(), ChunkAdmission::Done);
        assert!(!c.end_copy(Ok(())));
        let w = c.begin_write(0, 512).unwrap();
        assert_eq!(c.switch_over(), Ok(Err(Busy)), "waits for the write");
        assert!(!c.end_write(w, 0, Some(Ok(()))));
        assert_eq!(c.switch_over(), Ok(Ok(())));
        let after = c.begin_write(0, 512).unwrap();
        assert_eq!((after.primary, after.mirror), (Primary::Dest, false));
        assert!(c.cancel().is_err());
    }
}
