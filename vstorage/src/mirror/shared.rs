//! The host driver of [`MirrorCore`]: guest I/O on any number of threads
//! (through [`SharedDisk`] handles) while a copy thread runs
//! [`SharedMirror::run_to_mirrored`] (the source read on a helper thread,
//! a few chunks ahead of the destination writes) or calls
//! [`SharedMirror::step`] one chunk at a time.
//!
//! Locking: the core, the source and the destination each sit behind their
//! own mutex, so a chunk being written to the destination does not stall
//! guest reads of the source. A thread never holds a disk's lock while
//! waiting for the core's, and only [`SharedMirror::switch_over`] takes a
//! disk lock (the source's) while holding the core's; no cycle, no deadlock.
//! Range conflicts (a write against a chunk in flight or another write, a
//! chunk against a write, the read-ahead limit) wait on one condition
//! variable that every range release and state change signals.

use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::vec::Vec;

use super::{
    gone, write_durable, Busy, ChunkAdmission, MirrorCore, MirrorError, MirrorState, Primary,
    Progress, Step,
};
use crate::copy::{self, Chunk, CopyError, CopyJob, CopyOptions, READ_AHEAD_CHUNKS};
use crate::io::{DiskError, VirtualDisk};

struct Inner<S, D> {
    core: Mutex<MirrorCore>,
    /// Signalled whenever a range is released or the state changes.
    changed: Condvar,
    source: Mutex<Option<S>>,
    dest: Mutex<Option<D>>,
    discarded: Mutex<Option<D>>,
    virtual_size: u64,
    sector_bytes: u32,
}

/// A panic on another thread is a broken invariant already reported there;
/// the data behind the lock is still consistent at every await point of
/// this module, so keep serving rather than cascade the panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A migration shared between a copy thread and guest I/O threads.
pub struct SharedMirror<S, D> {
    inner: Arc<Inner<S, D>>,
}

impl<S, D> Clone for SharedMirror<S, D> {
    fn clone(&self) -> Self {
        SharedMirror {
            inner: Arc::clone(&self.inner),
        }
    }
}

/// The guest's view of a [`SharedMirror`]: a [`VirtualDisk`] that may be
/// cloned onto several I/O threads.
pub struct SharedDisk<S, D> {
    inner: Arc<Inner<S, D>>,
}

impl<S, D> Clone for SharedDisk<S, D> {
    fn clone(&self) -> Self {
        SharedDisk {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S: VirtualDisk + Send, D: VirtualDisk + Send> SharedMirror<S, D> {
    /// Starts mirroring `source` to `dest` (same geometry required).
    pub fn new(mut source: S, dest: D, opts: CopyOptions) -> Result<Self, MirrorError> {
        copy::check_geometry(&source, &dest)?;
        let job = CopyJob::for_disk(&mut source, opts)?;
        Ok(Self::with_plan(source, dest, job))
    }

    /// Starts mirroring with a plan made by the caller from `source`
    /// ([`CopyJob::for_disk`]); `dest` must have passed
    /// [`copy::check_geometry`] against `source`.
    pub fn with_plan(source: S, dest: D, job: CopyJob) -> Self {
        SharedMirror {
            inner: Arc::new(Inner {
                core: Mutex::new(MirrorCore::new(job)),
                changed: Condvar::new(),
                virtual_size: source.virtual_size(),
                sector_bytes: source.logical_sector_size(),
                source: Mutex::new(Some(source)),
                dest: Mutex::new(Some(dest)),
                discarded: Mutex::new(None),
            }),
        }
    }

    /// A guest-side handle.
    pub fn disk(&self) -> SharedDisk<S, D> {
        SharedDisk {
            inner: Arc::clone(&self.inner),
        }
    }

    /// Progress snapshot.
    pub fn progress(&self) -> Progress {
        lock(&self.inner.core).progress()
    }

    /// Current state.
    pub fn state(&self) -> MirrorState {
        lock(&self.inner.core).state()
    }

    /// Copies the next chunk through `buf` (grown to the chunk size once),
    /// waiting while a guest write holds part of it. After the last chunk,
    /// flushes the destination and enters [`MirrorState::Mirrored`].
    pub fn step(&self, buf: &mut Vec<u8>) -> Result<Step, MirrorError> {
        let inner = &*self.inner;
        let admission = {
            let mut core = lock(&inner.core);
            loop {
                match core.begin_chunk() {
                    // Drained: another copier's chunks are still in flight.
                    ChunkAdmission::Busy | ChunkAdmission::Drained => {
                        core = inner
                            .changed
                            .wait(core)
                            .unwrap_or_else(PoisonError::into_inner)
                    }
                    ChunkAdmission::Copy(c) => {
                        break (ChunkAdmission::Copy(c), core.may_skip_zeros(c))
                    }
                    other => break (other, false),
                }
            }
        };
        let (admission, skip) = admission;
        match admission {
            ChunkAdmission::Copy(chunk) => {
                let result = inner.copy_chunk(chunk, buf, skip);
                let failed = lock(&inner.core).end_chunk(chunk, result);
                inner.changed.notify_all();
                if failed {
                    inner.discard_dest();
                }
                inner.check_failed()?;
                Ok(Step::Copied(chunk))
            }
            ChunkAdmission::Done => {
                *buf = Vec::new();
                let flushed = match lock(&inner.dest).as_mut() {
                    Some(d) => d.flush(),
                    None => Err(gone("destination")),
                };
                let failed = lock(&inner.core).end_copy(flushed);
                inner.changed.notify_all();
                if failed {
                    inner.discard_dest();
                }
                inner.check_failed()?;
                Ok(Step::Mirrored)
            }
            ChunkAdmission::Stopped(MirrorState::Mirrored) => Ok(Step::Mirrored),
            ChunkAdmission::Stopped(state) => Err(lock(&inner.core)
                .failure
                .clone()
                .unwrap_or(MirrorError::WrongState { op: "copy", state })),
            ChunkAdmission::Busy | ChunkAdmission::Drained => Err(MirrorError::WrongState {
                op: "copy",
                state: MirrorState::Copying,
            }),
        }
    }

    /// Copies until the destination is complete (or the migration stops),
    /// reading the source on a second thread up to [`READ_AHEAD_CHUNKS`]
    /// chunks ahead of the destination writes. Chunks read ahead are in
    /// flight: guest writes to them wait as for any chunk in flight, and
    /// they end in order, so the cursor and the mirror rule are unchanged.
    pub fn run_to_mirrored(&self) -> Result<(), MirrorError> {
        let inner = &*self.inner;
        type Filled = (Chunk, bool, Vec<u8>, Result<(), CopyError>);
        let (full_tx, full_rx) = mpsc::sync_channel::<Filled>(READ_AHEAD_CHUNKS);
        let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
        for _ in 0..=READ_AHEAD_CHUNKS {
            // Cannot fail: the receiver is alive.
            let _ = free_tx.send(Vec::new());
        }
        // One being written, READ_AHEAD_CHUNKS queued, one being read.
        lock(&inner.core).set_max_in_flight(READ_AHEAD_CHUNKS + 2);
        std::thread::scope(|scope| {
            scope.spawn(move || {
                // A buffer first: an admitted chunk must reach the writer.
                while let Ok(mut buf) = free_rx.recv() {
                    let (chunk, skip) = {
                        let mut core = lock(&inner.core);
                        loop {
                            match core.begin_chunk() {
                                ChunkAdmission::Copy(c) => break (c, core.may_skip_zeros(c)),
                                ChunkAdmission::Busy => {
                                    core = inner
                                        .changed
                                        .wait(core)
                                        .unwrap_or_else(PoisonError::into_inner)
                                }
                                // Nothing left to read, or stopped.
                                _ => return,
                            }
                        }
                    };
                    let read = inner.read_chunk(chunk, &mut buf);
                    if full_tx.send((chunk, skip, buf, read)).is_err() {
                        return;
                    }
                }
            });
            for (chunk, skip, buf, read) in full_rx.iter() {
                let result = read.and_then(|()| inner.write_chunk(chunk, &buf, skip));
                let failed = lock(&inner.core).end_chunk(chunk, result);
                inner.changed.notify_all();
                if failed {
                    inner.discard_dest();
                }
                if lock(&inner.core).state() != MirrorState::Copying {
                    break;
                }
                // The reader may have stopped; a spare buffer is harmless.
                let _ = free_tx.send(buf);
            }
            // Unblock a reader waiting to send or for a buffer before the
            // scope joins it (it also wakes on the condition variable).
            drop(full_rx);
            drop(free_tx);
            inner.changed.notify_all();
        });
        lock(&inner.core).set_max_in_flight(1);
        // Flush and enter Mirrored, or report why the copy stopped.
        let mut buf = Vec::new();
        while let Step::Copied(_) = self.step(&mut buf)? {}
        Ok(())
    }

    /// Waits for writes in progress to end, switches I/O to the destination
    /// and returns the source for the caller to delete or keep.
    pub fn switch_over(&self) -> Result<S, MirrorError> {
        let inner = &*self.inner;
        let mut core = lock(&inner.core);
        loop {
            match core.switch_over()? {
                Ok(()) => break,
                Err(Busy) => {
                    core = inner
                        .changed
                        .wait(core)
                        .unwrap_or_else(PoisonError::into_inner)
                }
            }
        }
        // Taken under the core lock: no read may reach the source once the
        // state says the destination is the disk.
        let source = lock(&inner.source).take();
        drop(core);
        inner.changed.notify_all();
        source.ok_or(MirrorError::WrongState {
            op: "switch over twice",
            state: MirrorState::SwitchedOver,
        })
    }

    /// Cancels the migration: the source stays the disk and the destination
    /// is returned for the caller to discard (`None` if an earlier cancel or
    /// failure already took it; see [`SharedMirror::take_discarded`]).
    pub fn cancel(&self) -> Result<Option<D>, MirrorError> {
        let discard = lock(&self.inner.core).cancel()?;
        self.inner.changed.notify_all();
        if discard {
            self.inner.discard_dest();
        }
        Ok(self.take_discarded())
    }

    /// The destination removed by a cancel or failure, to be discarded.
    pub fn take_discarded(&self) -> Option<D> {
        lock(&self.inner.discarded).take()
    }
}

impl<S: VirtualDisk, D: VirtualDisk> Inner<S, D> {
    fn discard_dest(&self) {
        if let Some(d) = lock(&self.dest).take() {
            *lock(&self.discarded) = Some(d);
        }
    }

    fn check_failed(&self) -> Result<(), MirrorError> {
        let core = lock(&self.core);
        match (&core.failure, core.state()) {
            (Some(e), MirrorState::Failed) => Err(e.clone()),
            _ => Ok(()),
        }
    }

    /// Reads the chunk from the source, then writes it to the destination
    /// (unless `skip` and it is all zeros), holding one disk lock at a time.
    fn copy_chunk(&self, chunk: Chunk, buf: &mut Vec<u8>, skip: bool) -> Result<(), CopyError> {
        self.read_chunk(chunk, buf)?;
        self.write_chunk(chunk, buf, skip)
    }

    /// Reads `chunk` from the source into `buf` (grown to fit).
    fn read_chunk(&self, chunk: Chunk, buf: &mut Vec<u8>) -> Result<(), CopyError> {
        match lock(&self.source).as_mut() {
            Some(s) => copy::read_chunk(s, chunk, buf),
            None => Err(CopyError::Cancelled),
        }
    }

    /// Writes `chunk`'s bytes (the start of `buf`) to the destination;
    /// with `skip` ([`MirrorCore::may_skip_zeros`]) not when all zeros.
    fn write_chunk(&self, chunk: Chunk, buf: &[u8], skip: bool) -> Result<(), CopyError> {
        match lock(&self.dest).as_mut() {
            Some(d) => copy::write_chunk(d, chunk, buf, skip).map(drop),
            None => Err(CopyError::Cancelled),
        }
    }
}

impl<S: VirtualDisk, D: VirtualDisk> VirtualDisk for SharedDisk<S, D> {
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size
    }

    fn logical_sector_size(&self) -> u32 {
        self.inner.sector_bytes
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        // The source is the disk until switch-over takes it away.
        if let Some(s) = lock(&self.inner.source).as_mut() {
            return s.read(offset, buf);
        }
        match lock(&self.inner.dest).as_mut() {
            Some(d) => d.read(offset, buf),
            None => Err(gone("destination")),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        let inner = &*self.inner;
        crate::io::check_request(offset, data.len(), inner.sector_bytes, inner.virtual_size)?;
        let len = data.len() as u64;
        let ticket = {
            let mut core = lock(&inner.core);
            loop {
                match core.begin_write(offset, len) {
                    Ok(t) => break t,
                    Err(Busy) => {
                        core = inner
                            .changed
                            .wait(core)
                            .unwrap_or_else(PoisonError::into_inner)
                    }
                }
            }
        };
        let primary = match ticket.primary {
            Primary::Source => match lock(&inner.source).as_mut() {
                Some(s) => write_durable(s, offset, data),
                None => Err(gone("source")),
            },
            Primary::Dest => match lock(&inner.dest).as_mut() {
                Some(d) => write_durable(d, offset, data),
                None => Err(gone("destination")),
            },
        };
        if let Err(e) = primary {
            lock(&inner.core).end_write(ticket, offset, None);
            inner.changed.notify_all();
            return Err(e);
        }
        let mirrored = if ticket.mirror {
            lock(&inner.dest)
                .as_mut()
                .map(|d| write_durable(d, offset, data))
        } else {
            None
        };
        let failed = lock(&inner.core).end_write(ticket, offset, mirrored);
        inner.changed.notify_all();
        if failed {
            inner.discard_dest();
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        let inner = &*self.inner;
        if let Some(s) = lock(&inner.source).as_mut() {
            s.flush()?;
            // The source is primary; the destination's durability is a
            // mirror matter, checked on every mirrored write already.
            return Ok(());
        }
        match lock(&inner.dest).as_mut() {
            Some(d) => d.flush(),
            None => Err(gone("destination")),
        }
    }

    fn allocated_ranges(&mut self) -> Result<Vec<(u64, u64)>, DiskError> {
        if let Some(s) = lock(&self.inner.source).as_mut() {
            return s.allocated_ranges();
        }
        match lock(&self.inner.dest).as_mut() {
            Some(d) => d.allocated_ranges(),
            None => Err(gone("destination")),
        }
    }
}
