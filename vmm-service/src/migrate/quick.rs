//! Quick storage migration, the source's disk work (MISSION "Quick storage
//! migration"; the algorithm is `vstorage::mirror::quick`'s, here over the
//! node's stores and any destination disk, e.g. the migration link's
//! remote disk target):
//!
//! ```text
//!   start: a checkpoint per disk (crate::checkpoint): the guest writes
//!          to the child, the base is frozen
//!   copy_base (VM runs): the base's allocated ranges to the destination,
//!          zero chunks skipped (the destination is new)
//!   start_fold (VM paused: downtime starts): plan the child's own ranges
//!   fold: those ranges read *through the chain* written to the
//!          destination (exact even for partly written blocks: their other
//!          sectors come from the base, identical on the destination), no
//!          zero skipping (a zero written after the checkpoint must land)
//!   then memory and state move, the VM resumes at the destination on the
//!          merged base; finish deletes the child and the base here
//!   abort (any failure before the VM resumes there): the VM runs on here,
//!          the checkpoint merged back into the base (or kept, and said so)
//! ```
//!
//! Writes to the destination never block: `may_write` says whether it
//! takes more now (the remote target's window); the caller flushes it and
//! waits for that to be durable before memory moves.
//!
//! Invariant: the base is never written while the move runs (the guest
//! writes the child); the downtime's disk part is proportional to what the
//! child holds ([`QuickDisks::child_bytes`], reported while the base
//! copies).

use super::remote_disk::{DiskSpec, RemoteDisk, RemoteLink};
use crate::checkpoint::{self, Checkpoint, StoreDisk};
use crate::disks::{Backing, FileStore};
use crate::vm::Vm;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use vstorage::copy::{CopyJob, CopyOptions};
use vstorage::vhdx::{OpenOptions, Vhdx};
use vstorage::VirtualDisk;

/// Where a disk's move stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The base is being copied; the guest runs.
    Base,
    /// The base is copied; waiting for the pause.
    BaseCopied,
    /// The guest is paused; the child's ranges are being folded.
    Fold,
    /// Everything is written to the destination.
    Folded,
}

/// One disk of the move.
struct DiskMove {
    checkpoint: Checkpoint,
    /// A second, read-only handle on the frozen base (the chain's own
    /// parent handle only serves the guest's reads).
    base: Option<StoreDisk>,
    job: CopyJob,
}

/// The disk side of a quick migration of one VM: every disk of the VM.
pub struct QuickDisks {
    disks: Vec<DiskMove>,
    /// The disk being worked on.
    at: usize,
    phase: Phase,
    buf: Vec<u8>,
    opts: CopyOptions,
    /// Bytes of the bases copied, and to copy.
    base_done: u64,
    base_total: u64,
    /// Bytes folded, and to fold.
    fold_done: u64,
    fold_total: u64,
    /// The children's size when the base copy completed.
    child_at_base_copied: u64,
}

impl core::fmt::Debug for QuickDisks {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("QuickDisks")
            .field("phase", &self.phase)
            .field("base", &(self.base_done, self.base_total))
            .field("fold", &(self.fold_done, self.fold_total))
            .finish_non_exhaustive()
    }
}

/// What a step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// More to do.
    More,
    /// The destination takes no more now (`may_write` said no).
    Blocked,
    /// The phase's work is done.
    Done,
}

impl QuickDisks {
    /// Start: a checkpoint of every disk of `vm` (each on a store), the
    /// bases' copy planned. A disk that cannot take one fails the start
    /// and the checkpoints already taken are merged back.
    pub fn start(vm: &mut Vm, files: &dyn FileStore) -> Result<Self, String> {
        if vm.disk_count() == 0 {
            return Err(format!("VM {} has no disk to move", vm.name()));
        }
        if let Some(m) = vm
            .disk_meta()
            .iter()
            .find(|m| !matches!(m.backing, Backing::File { .. }))
        {
            return Err(format!(
                "disk {} is in node memory: a quick move needs its disks on a store",
                m.location()
            ));
        }
        let opts = CopyOptions {
            skip_zero_chunks: true,
            chunk_bytes: crate::store::COPY_IO_BYTES as u32,
        };
        let mut this = Self {
            disks: Vec::new(),
            at: 0,
            phase: Phase::Base,
            buf: Vec::new(),
            opts,
            base_done: 0,
            base_total: 0,
            fold_done: 0,
            fold_total: 0,
            child_at_base_copied: 0,
        };
        for slot in 0..vm.disk_count() as u8 {
            match Self::start_disk(vm, files, slot, opts) {
                Ok(d) => {
                    this.base_total += d.job.bytes_total();
                    this.disks.push(d);
                }
                Err(e) => {
                    let undo = this.abort(vm, files, true);
                    return Err(format!(
                        "{e}{}",
                        undo.map_or_else(String::new, |u| format!("; {u}"))
                    ));
                }
            }
        }
        Ok(this)
    }

    fn start_disk(
        vm: &mut Vm,
        files: &dyn FileStore,
        slot: u8,
        opts: CopyOptions,
    ) -> Result<DiskMove, String> {
        let checkpoint = checkpoint::take(vm, files, slot)?;
        let opened = files
            .open(checkpoint.base())
            .and_then(|io| Vhdx::open(io, OpenOptions::read_only()).map_err(|e| format!("{e}")))
            .and_then(|mut base| {
                let map = base.allocated_ranges().map_err(|e| format!("{e}"))?;
                let job = CopyJob::new(&map, base.virtual_size(), base.logical_sector_size(), opts);
                Ok((base, job))
            });
        match opened {
            Ok((base, job)) => Ok(DiskMove {
                checkpoint,
                base: Some(base),
                job,
            }),
            Err(e) => {
                let why = format!("cannot read {}: {e}", checkpoint.base());
                if let Err((_, m)) = checkpoint.merge(vm, files) {
                    return Err(format!("{why}; the checkpoint stays: {m}"));
                }
                Err(why)
            }
        }
    }

    /// Where the move stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// `(done, total)` bytes of the bases' copy.
    pub fn base_bytes(&self) -> (u64, u64) {
        (self.base_done, self.base_total)
    }

    /// `(done, total)` bytes of the fold (0, 0 before it starts).
    pub fn fold_bytes(&self) -> (u64, u64) {
        (self.fold_done, self.fold_total)
    }

    /// Bytes the children hold now: the checkpoints'
    /// growth, what the fold will write during downtime.
    pub fn child_bytes(&self) -> u64 {
        self.disks
            .iter()
            .map(|d| d.checkpoint.child_bytes().unwrap_or(0))
            .sum()
    }

    /// The children's size when the base copy completed.
    pub fn child_bytes_at_base_copied(&self) -> u64 {
        self.child_at_base_copied
    }

    /// The `STORE:path` of each disk's base (what the destination's
    /// configuration names after the move) and checkpoint.
    pub fn files(&self) -> Vec<(String, String)> {
        self.disks
            .iter()
            .map(|d| (d.checkpoint.base().into(), d.checkpoint.child().into()))
            .collect()
    }

    /// Copy the bases to `targets` (one per disk slot, each the
    /// destination's new, empty disk of the same geometry) until `end` of
    /// `clock` or until `may_write` says no. The guest runs meanwhile.
    pub fn copy_base(
        &mut self,
        targets: &mut [&mut dyn VirtualDisk],
        may_write: &mut dyn FnMut() -> bool,
        clock: &dyn Fn() -> u64,
        end: u64,
    ) -> Result<Step, String> {
        if self.phase != Phase::Base {
            return Ok(Step::Done);
        }
        if targets.len() != self.disks.len() {
            return Err("one destination disk per disk".into());
        }
        loop {
            let Some(d) = self.disks.get_mut(self.at) else {
                for d in &mut self.disks {
                    // The read-only view of the base is done with.
                    d.base = None;
                }
                self.child_at_base_copied = self.child_bytes();
                self.phase = Phase::BaseCopied;
                self.at = 0;
                return Ok(Step::Done);
            };
            let Some(chunk) = d.job.next_chunk() else {
                self.at += 1;
                continue;
            };
            if !may_write() {
                return Ok(Step::Blocked);
            }
            let len = chunk.len_bytes as usize;
            if self.buf.len() < len {
                self.buf.resize(len, 0);
            }
            let base = d.base.as_mut().ok_or("the base's view is gone")?;
            base.read(chunk.offset, &mut self.buf[..len])
                .map_err(|e| format!("cannot read {}: {e}", d.checkpoint.base()))?;
            let target = &mut *targets[self.at];
            write_skipping_zeros(
                target,
                chunk.offset,
                &self.buf[..len],
                self.opts.skip_zero_chunks,
            )
            .map_err(|e| format!("cannot write the copy of {}: {e}", d.checkpoint.base()))?;
            d.job.complete(chunk).map_err(|e| format!("{e}"))?;
            self.base_done += chunk.len_bytes;
            if clock() >= end {
                return Ok(Step::More);
            }
        }
    }

    /// With the guest paused (downtime started): plan the fold of what the
    /// children hold. Returns the bytes to fold.
    pub fn start_fold(&mut self) -> Result<u64, String> {
        match self.phase {
            Phase::BaseCopied => {}
            Phase::Base => return Err("the bases are not copied yet".into()),
            Phase::Fold | Phase::Folded => return Ok(self.fold_total),
        }
        let opts = CopyOptions {
            skip_zero_chunks: false,
            ..self.opts
        };
        self.fold_total = 0;
        for d in &mut self.disks {
            d.checkpoint.flush()?;
            let ranges = d.checkpoint.own_ranges()?;
            let (size, sector) = d.checkpoint.geometry();
            d.job = CopyJob::new(&ranges, size, sector, opts);
            self.fold_total += d.job.bytes_total();
        }
        self.at = 0;
        self.phase = Phase::Fold;
        Ok(self.fold_total)
    }

    /// Write what the children hold (read through each chain) to
    /// `targets`, until `end` of `clock` or until `may_write` says no.
    pub fn fold(
        &mut self,
        targets: &mut [&mut dyn VirtualDisk],
        may_write: &mut dyn FnMut() -> bool,
        clock: &dyn Fn() -> u64,
        end: u64,
    ) -> Result<Step, String> {
        match self.phase {
            Phase::Fold => {}
            Phase::Folded => return Ok(Step::Done),
            _ => return Err("the fold is not started".into()),
        }
        if targets.len() != self.disks.len() {
            return Err("one destination disk per disk".into());
        }
        loop {
            let Some(d) = self.disks.get_mut(self.at) else {
                self.phase = Phase::Folded;
                return Ok(Step::Done);
            };
            let Some(chunk) = d.job.next_chunk() else {
                self.at += 1;
                continue;
            };
            if !may_write() {
                return Ok(Step::Blocked);
            }
            let len = chunk.len_bytes as usize;
            if self.buf.len() < len {
                self.buf.resize(len, 0);
            }
            d.checkpoint.read(chunk.offset, &mut self.buf[..len])?;
            targets[self.at]
                .write(chunk.offset, &self.buf[..len])
                .map_err(|e| format!("cannot write {}'s data: {e}", d.checkpoint.child()))?;
            d.job.complete(chunk).map_err(|e| format!("{e}"))?;
            self.fold_done += chunk.len_bytes;
            if clock() >= end {
                return Ok(Step::More);
            }
        }
    }

    /// The VM runs at the destination (it left this node's VM table):
    /// delete each checkpoint and base here. Returns what could not be
    /// deleted.
    pub fn finish(self, files: &dyn FileStore) -> Vec<String> {
        let mut left = Vec::new();
        for d in self.disks {
            let (base, child) = (
                String::from(d.checkpoint.base()),
                String::from(d.checkpoint.child()),
            );
            drop(d);
            for f in [child, base] {
                if let Err(e) = files.remove(&f) {
                    left.push(format!("{f}: {e}"));
                }
            }
        }
        left
    }

    /// The move failed before the VM resumed at the destination (the
    /// caller discards the destination's files): the VM runs on here. With
    /// `merge` each checkpoint is folded back into its base; a merge that
    /// fails, or `merge` false, keeps the checkpoint (recorded in the VM's
    /// configuration). Returns what was kept, to say so, or `None`.
    pub fn abort(self, vm: &mut Vm, files: &dyn FileStore, merge: bool) -> Option<String> {
        let mut kept = Vec::new();
        for d in self.disks {
            let DiskMove {
                checkpoint, base, ..
            } = d;
            drop(base);
            if !merge {
                kept.push(format!("{} kept", checkpoint.child()));
                continue;
            }
            let child = String::from(checkpoint.child());
            if let Err((_, e)) = checkpoint.merge(vm, files) {
                kept.push(format!("{child} kept ({e})"));
            }
        }
        (!kept.is_empty()).then(|| format!("checkpoint {}", kept.join(", ")))
    }
}

/// Write `data` at `at` to `dst`, leaving out aligned 64 KiB pieces of
/// zeros when `skip_zeros` (the destination is new: they read as zeros).
fn write_skipping_zeros(
    dst: &mut dyn VirtualDisk,
    at: u64,
    data: &[u8],
    skip_zeros: bool,
) -> Result<(), vstorage::DiskError> {
    if !skip_zeros {
        return dst.write(at, data);
    }
    let granule = vstorage::copy::ZERO_GRANULE_BYTES;
    let mut run: Option<usize> = None;
    let mut pos = 0usize;
    while pos < data.len() {
        let next = ((at + pos as u64) / granule + 1) * granule;
        let end = data.len().min((next - at) as usize);
        match (vstorage::copy::is_zero(&data[pos..end]), run) {
            (true, Some(from)) => {
                dst.write(at + from as u64, &data[from..pos])?;
                run = None;
            }
            (false, None) => run = Some(pos),
            _ => {}
        }
        pos = end;
    }
    if let Some(from) = run {
        dst.write(at + from as u64, &data[from..])?;
    }
    Ok(())
}

/// Where the source's disk work over the link stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The bases go to the destination; the guest runs on the children.
    CopyBase,
    /// The guest is paused (downtime); the children's data goes.
    Fold,
    /// Everything is queued; waiting for the destination's last ack.
    Flushing { ticket: u64 },
    /// Every disk is whole and durable on the destination.
    Copied,
}

/// The source's disk work of a quick move over the migration link: the
/// [`QuickDisks`] writing the destination's new disks through the remote
/// disk target (`super::remote_disk`), which the destination's sink
/// creates from [`QuickSource::specs`].
pub struct QuickSource {
    disks: QuickDisks,
    link: RemoteLink,
    targets: Vec<RemoteDisk>,
    specs: Vec<DiskSpec>,
    stage: Stage,
    /// When this job paused the guest (downtime's start).
    pause_ns: Option<u64>,
    /// Largest size of the children seen while the bases copied.
    child_max: u64,
    /// The destination's last acknowledged byte count, and when it moved.
    last_acked: (u64, u64),
    /// When its first step ran (the move's disk part began).
    started_ns: Option<u64>,
}

/// How long the destination may leave written data unacknowledged.
pub const STALL_NS: u64 = 8_000_000_000;

/// The link as the disk work uses it: disk messages out and in
/// (`Conn::send_disk`, `Conn::next_disk`).
pub trait DiskWire {
    /// Put one disk message on the link.
    fn send(&mut self, body: &[u8]) -> Result<(), String>;
    /// The next disk message from the peer, if one came.
    fn recv(&mut self) -> Result<Option<Vec<u8>>, String>;
}

impl DiskWire for super::channel::Conn {
    fn send(&mut self, body: &[u8]) -> Result<(), String> {
        self.send_disk(body).map_err(|e| format!("{e}"))
    }
    fn recv(&mut self) -> Result<Option<Vec<u8>>, String> {
        self.next_disk(true)
    }
}

impl core::fmt::Debug for QuickSource {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("QuickSource")
            .field("stage", &self.stage)
            .field("disks", &self.disks)
            .finish_non_exhaustive()
    }
}

/// A quick move's disk progress, for the job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuickProgress {
    /// Bytes of the bases copied and to copy.
    pub base_done: u64,
    pub base_total: u64,
    /// Bytes the checkpoints hold now (their growth while the bases
    /// copy), and the most seen.
    pub child_bytes: u64,
    pub child_max: u64,
    /// Bytes of the checkpoints written during the pause, and to write.
    pub fold_done: u64,
    pub fold_total: u64,
    /// Write data acknowledged durable by the destination.
    pub acked: u64,
}

impl QuickSource {
    /// The disks the destination creates for `vm` (one per slot, each
    /// base's file name and geometry), checked movable: each on a store,
    /// none on the shared store, none with a checkpoint.
    pub fn specs_of(vm: &mut Vm) -> Result<Vec<DiskSpec>, String> {
        if vm.disk_count() == 0 {
            return Err(format!(
                "VM {} has no disk: a quick move is for disks (move it without --quick)",
                vm.name()
            ));
        }
        let mut specs = Vec::new();
        for slot in 0..vm.disk_count() as u8 {
            let sector = vm.disk_mut(slot).map_or(512, |d| d.logical_sector_size());
            let Some(meta) = vm.disk_meta().get(usize::from(slot)) else {
                return Err("the disks changed".into());
            };
            if let Some(c) = &meta.checkpoint {
                return Err(format!(
                    "disk {} has a checkpoint ({c}): merge it first",
                    meta.location()
                ));
            }
            let Backing::File { location } = &meta.backing else {
                return Err(format!(
                    "disk {} is in node memory: a quick move needs its disks on a store",
                    meta.location()
                ));
            };
            if crate::lease::vms::is_shared_store(crate::lease::vms::store_of(location)) {
                return Err(format!(
                    "disk {location} is on the shared store: both nodes see it, move the VM \
                     without --quick"
                ));
            }
            let spec = DiskSpec::of(slot, meta, sector);
            // What the base holds: the destination checks its room.
            let allocated: u64 = vm
                .disk_mut(slot)
                .and_then(|d| d.allocated_ranges().ok())
                .map_or(0, |r| r.iter().map(|x| x.1).sum());
            specs.push(spec.with_allocated(allocated));
        }
        Ok(specs)
    }

    /// Take the checkpoints of `vm`'s disks; the specs of the disks the
    /// destination creates are [`QuickSource::specs`] (as
    /// [`QuickSource::specs_of`] gave them before).
    pub fn start(vm: &mut Vm, files: &dyn FileStore) -> Result<Self, String> {
        let specs = Self::specs_of(vm)?;
        let disks = QuickDisks::start(vm, files)?;
        let link = RemoteLink::new();
        let targets = specs
            .iter()
            .map(|s| link.disk(s.slot, s.virtual_bytes, s.sector_bytes))
            .collect();
        Ok(Self {
            disks,
            link,
            targets,
            specs,
            stage: Stage::CopyBase,
            pause_ns: None,
            child_max: 0,
            last_acked: (0, 0),
            started_ns: None,
        })
    }

    /// The disks the destination creates (`open`'s `create_disks`).
    pub fn specs(&self) -> &[DiskSpec] {
        &self.specs
    }

    /// Where it stands.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// When it paused the guest, if it did.
    pub fn paused_at(&self) -> Option<u64> {
        self.pause_ns
    }

    /// When its first step ran, if it did.
    pub fn started_at(&self) -> Option<u64> {
        self.started_ns
    }

    /// Progress for the job.
    pub fn progress(&self) -> QuickProgress {
        let (base_done, base_total) = self.disks.base_bytes();
        let (fold_done, fold_total) = self.disks.fold_bytes();
        QuickProgress {
            base_done,
            base_total,
            child_bytes: self.disks.child_bytes(),
            child_max: self.child_max,
            fold_done,
            fold_total,
            acked: self.link.bytes().1,
        }
    }

    /// Work until `end` of `clock`: take the destination's acks from
    /// `recv`, copy, pause the guest and fold once the bases are there,
    /// put what is queued on the link through `send`. `Ok(true)`: every
    /// disk is whole and durable on the destination (the guest is
    /// paused; memory moves next). `Err`: the move fails (call
    /// [`QuickSource::abort`]).
    pub fn step(
        &mut self,
        vm: &mut Vm,
        wire: &mut dyn DiskWire,
        clock: &dyn Fn() -> u64,
        end: u64,
    ) -> Result<bool, String> {
        while let Some(m) = wire.recv()? {
            self.link.receive(&m)?;
        }
        if let Some(why) = self.link.failed() {
            return Err(why);
        }
        // A destination that acknowledges nothing for long, while data
        // waits for it, is gone.
        let now = clock();
        self.started_ns.get_or_insert(now);
        let (queued, acked) = self.link.bytes();
        if acked != self.last_acked.0 || queued == acked {
            self.last_acked = (acked, now);
        } else if now.saturating_sub(self.last_acked.1) > STALL_NS {
            return Err(format!(
                "the destination acknowledged no disk data for {} s",
                STALL_NS / 1_000_000_000
            ));
        }
        let link = self.link.clone();
        let mut room = || link.has_room();
        let mut targets: Vec<&mut dyn VirtualDisk> = self
            .targets
            .iter_mut()
            .map(|t| t as &mut dyn VirtualDisk)
            .collect();
        match self.stage {
            Stage::CopyBase => {
                let step = self.disks.copy_base(&mut targets, &mut room, clock, end)?;
                self.child_max = self.child_max.max(self.disks.child_bytes());
                if step == Step::Done {
                    // The save: downtime starts.
                    vm.pause();
                    self.pause_ns = Some(clock());
                    self.disks.start_fold()?;
                    self.stage = Stage::Fold;
                }
            }
            Stage::Fold => {
                if self.disks.fold(&mut targets, &mut room, clock, end)? == Step::Done {
                    for t in &mut targets {
                        t.flush().map_err(|e| format!("{e}"))?;
                    }
                    self.link.sync();
                    self.stage = Stage::Flushing {
                        ticket: self.link.ticket(),
                    };
                }
            }
            Stage::Flushing { ticket } => {
                if self.link.is_acked(ticket) {
                    self.stage = Stage::Copied;
                }
            }
            Stage::Copied => {}
        }
        self.link.pump(&mut |b| wire.send(b))?;
        if let Some(why) = self.link.failed() {
            return Err(why);
        }
        Ok(self.stage == Stage::Copied)
    }

    /// The move failed before the VM resumed at the destination: the VM
    /// runs on here (resumed if this job paused it), its checkpoints
    /// merged back (`merge`) or kept; the destination deletes its partial
    /// files. Returns what was kept, to say so.
    pub fn abort(self, vm: &mut Vm, files: &dyn FileStore, merge: bool) -> Option<String> {
        self.link.fail("the move failed");
        if self.pause_ns.is_some() {
            vm.resume();
        }
        self.disks.abort(vm, files, merge)
    }

    /// The VM runs at the destination and left this node: delete the
    /// checkpoints and bases here. Returns what could not be deleted.
    pub fn finish(self, files: &dyn FileStore) -> Vec<String> {
        self.disks.finish(files)
    }
}

#[cfg(test)]
mod tests;
