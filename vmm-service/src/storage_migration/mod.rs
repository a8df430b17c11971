//! Storage live migration: a running VM's disks move to other files (another
//! store, another directory) while the guest keeps using them (MISSION,
//! "Storage live migration"; docs/MANAGEMENT.md, `vm-move-storage`).
//!
//! A [`StorageMove`] (one per job) moves the disks its [`Plan`] names, one
//! after another. For each disk:
//! 1. the destination VHDX is created under its *partial* name
//!    ([`FileStore::create_partial`]) with the source's geometry, and the
//!    VM's disk becomes the [`Mirror`], a
//!    `vstorage::mirror::MirroredDisk(source, destination)` shared with
//!    the job (`Rc<RefCell<..>>` is a `VirtualDisk`): from this
//!    moment every guest write goes to the source and, behind the copy's
//!    cursor, to the destination too, and completes only when durable on
//!    both (`MirroredDisk::write`: write and flush on each);
//! 2. [`StorageMove::step`] copies the source's allocated ranges in one
//!    ascending pass, a chunk at a time within a time budget per node-loop
//!    round (unallocated blocks are skipped: holes stay holes);
//! 3. when the copy is complete and flushed (`Mirrored`), the partial file
//!    gets its final name durably ([`FileStore::commit_partial`]), the
//!    VM's configuration file (`crate::vmconfig`, if the node keeps one)
//!    is rewritten crash-safely to name it, the guest's I/O switches to
//!    the destination (`switch_over`), and only then is the source closed
//!    and its file deleted (unless the plan keeps it).
//!
//! After the disks, the configuration file moves if the plan says so
//! (written whole at its new place, then the old one deleted unless
//! kept) and the snapshot location is recorded in it.
//!
//! Cancel or failure (the destination store full, an I/O error): the
//! mirror stops, the source is the disk again (it holds every acknowledged
//! write), the partial destination is closed and deleted. Disks switched
//! before stay switched (each is whole in its new place). A node that
//! restarts mid-copy removes its partial files at boot (node stores).
//!
//! Invariants: the VM's disk is always its source, or a mirror whose
//! primary holds every acknowledged write, or its complete destination;
//! a source file is deleted only after the switch; a destination has its
//! final name only once complete; the VM's configuration file names, at
//! every instant, disk files that are whole (the source until the new
//! file is named, then the new file before the source goes).

pub use crate::disks::FileStore;
use crate::disks::{Backing, Detached};
use crate::vm::Vm;
use crate::vmconfig;
use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use vstorage::copy::{CopyOptions, CopyStats};
use vstorage::mirror::{MirroredDisk, Step};
use vstorage::vhdx::{self, CreateParams, Vhdx};
use vstorage::{BlockIo, VirtualDisk};

/// The source and destination of one disk's move.
pub type Mirror = MirroredDisk<Box<dyn VirtualDisk>, Vhdx<Box<dyn BlockIo>>>;

/// Where a job moves a VM's disks, configuration file and snapshot
/// location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Per disk slot, its new location (`None`: the disk stays).
    pub targets: Vec<Option<String>>,
    /// The configuration file's new location, `STORE:path` (`None`: it
    /// stays).
    pub config: Option<String>,
    /// The new snapshot location, `STORE:DIR` (`None`: it stays).
    pub snapshots: Option<String>,
    /// Keep the source files after the switch.
    pub keep_source: bool,
}

/// Where the checkpoint files go for `STORE[:DIR]`: with a store alone
/// the store's own layout, `STORE:vms/VM/snapshots`; else `STORE:DIR`
/// itself when the snapshot location was named (`--snapshots`), and its
/// `snapshots` directory when everything moves there (`--to`).
pub fn snapshots_in(to: &str, vm: &str, named: bool) -> String {
    match to.split_once(':') {
        None => format!("{to}:vms/{vm}/snapshots"),
        Some(_) if named => vmconfig::dir_in(to, vm),
        Some(_) => vmconfig::file_in(&vmconfig::dir_in(to, vm), "snapshots"),
    }
}

/// `STORE[:DIR]` and a disk's file name as a location: `STORE:DIR/FILE`,
/// or with a store alone the store's own layout for VM `vm`,
/// `STORE:vms/VM/FILE` (where `vm create --disk` puts disks).
pub fn location_in(to: &str, vm: &str, file_name: &str) -> String {
    let (store, dir) = match to.split_once(':') {
        Some((store, dir)) => (store, String::from(dir)),
        None => (to, format!("vms/{vm}")),
    };
    let dir = dir.trim_matches('/');
    if dir.is_empty() {
        format!("{store}:{file_name}")
    } else {
        format!("{store}:{dir}/{file_name}")
    }
}

/// What a storage move is asked to move: `to` (`STORE[:DIR]`)
/// everything, each of `vhd` (`SRC=DST`) one disk, `config` and
/// `snapshots` (`STORE[:DIR]`) the configuration file and the snapshot
/// location.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ask<'a> {
    pub to: Option<&'a str>,
    pub vhd: &'a [String],
    pub config: Option<&'a str>,
    pub snapshots: Option<&'a str>,
    pub keep_source: bool,
}

/// The plan for `vm` (see [`Ask`]): every disk into `to` (keeping its
/// file name; [`location_in`]), then each `SRC=DST` of `vhd` (SRC a
/// disk's location or its slot number, DST a location) for that disk
/// alone; the configuration file (keeping its name) to `config`, else
/// `to`; the snapshot location to `snapshots`, else `to`
/// ([`snapshots_in`]). Items already where they would go stay; a VM
/// without a configuration file (a node without stores) has neither
/// item to move.
pub fn plan_all(vm: &Vm, ask: &Ask) -> Result<Plan, String> {
    let mut plan = plan_disks(vm, ask.to, ask.vhd, ask.keep_source, true)?;
    let placement = vm.placement();
    if placement.is_none() && (ask.config.is_some() || ask.snapshots.is_some()) {
        return Err(format!(
            "VM {} has no configuration file on this node (it keeps VM configurations in memory)",
            vm.name()
        ));
    }
    if let Some(p) = placement {
        for (what, dir) in [("config", ask.config), ("snapshots", ask.snapshots)] {
            if let Some(d) = dir {
                let store = d.split_once(':').map_or(d, |(s, _)| s);
                crate::store::check_store_name(store)
                    .map_err(|e| format!("--{what} {d:.80}: {e}"))?;
            }
        }
        if let (Some(at), Some(dir)) = (&p.at, ask.config.or(ask.to)) {
            let new = vmconfig::file_in(&vmconfig::dir_in(dir, vm.name()), vmconfig::file_name(at));
            vmconfig::check_location(&new).map_err(|e| format!("--config: {e}"))?;
            if new != *at {
                plan.config = Some(new);
            } else if ask.config.is_some() {
                return Err(format!("the configuration file is at {at} already"));
            }
        }
        let snapshots = match (ask.snapshots, ask.to) {
            (Some(d), _) => Some(snapshots_in(d, vm.name(), true)),
            (None, Some(d)) => Some(snapshots_in(d, vm.name(), false)),
            (None, None) => None,
        };
        if let Some(new) = snapshots {
            vmconfig::check_location(&new).map_err(|e| format!("--snapshots: {e}"))?;
            if new != p.snapshots {
                plan.snapshots = Some(new);
            } else if ask.snapshots.is_some() {
                return Err(format!("the snapshot location is {new} already"));
            }
        }
    }
    if plan.targets.iter().all(Option::is_none) && plan.config.is_none() && plan.snapshots.is_none()
    {
        return Err(format!(
            "nothing to move: VM {} has no item named",
            vm.name()
        ));
    }
    Ok(plan)
}

/// The plan for `vm`'s disks alone: every disk into `to` (`STORE[:DIR]`,
/// keeping its file name; [`location_in`]), then each `SRC=DST` of `vhd`
/// (SRC a disk's location or its slot number, DST a location) for that
/// disk alone.
pub fn plan(vm: &Vm, to: Option<&str>, vhd: &[String], keep_source: bool) -> Result<Plan, String> {
    plan_disks(vm, to, vhd, keep_source, false)
}

/// The disks' part of the plan; `allow_none`: a plan that moves no disk
/// is not an error here.
fn plan_disks(
    vm: &Vm,
    to: Option<&str>,
    vhd: &[String],
    keep_source: bool,
    allow_none: bool,
) -> Result<Plan, String> {
    let metas = vm.disk_meta();
    let mut targets: Vec<Option<String>> = match to {
        Some(to) => metas
            .iter()
            .map(|m| Some(location_in(to, vm.name(), &m.file_name())))
            .collect(),
        None => alloc::vec![None; metas.len()],
    };
    for pair in vhd {
        let (src, dst) = pair
            .split_once('=')
            .ok_or_else(|| format!("--vhd {pair:.80}: expected SOURCE=STORE:PATH"))?;
        let slot = metas
            .iter()
            .position(|m| m.location() == src)
            .or_else(|| src.parse::<usize>().ok().filter(|&i| i < metas.len()))
            .ok_or_else(|| format!("VM {} has no disk {src:.80}", vm.name()))?;
        if !dst.contains(':') {
            return Err(format!("--vhd {pair:.80}: the destination is STORE:PATH"));
        }
        targets[slot] = Some(dst.into());
    }
    if targets.iter().all(Option::is_none) && !allow_none {
        return Err(format!(
            "nothing to move: VM {} has no disk named",
            vm.name()
        ));
    }
    for (m, t) in metas.iter().zip(&targets) {
        if t.as_deref() == Some(m.location().as_str()) {
            return Err(format!("disk {} is there already", m.location()));
        }
        if let (Some(_), Some(c)) = (t, &m.checkpoint) {
            return Err(format!(
                "disk {} has a checkpoint ({c}): it moves once the checkpoint is merged",
                m.location()
            ));
        }
    }
    Ok(Plan {
        targets,
        config: None,
        snapshots: None,
        keep_source,
    })
}

/// The disk being moved now.
struct DiskMove {
    slot: u8,
    to: String,
    mirror: Rc<RefCell<Mirror>>,
}

/// Where a job stands after a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Allocated bytes copied, and to copy, over the disks so far.
    Running { bytes_done: u64, bytes_total: u64 },
    /// Every disk moved.
    Done { summary: String },
}

/// A storage migration job's work on one VM.
pub struct StorageMove {
    vm: String,
    plan: Plan,
    /// Next slot to consider.
    next: usize,
    current: Option<DiskMove>,
    /// Bytes of the disks already switched.
    done_bytes: u64,
    moved: Vec<String>,
    /// Rate limit of the copy in bytes per second (0: none).
    rate_bytes_per_s: u64,
    /// When the first step ran (the rate limit's origin).
    started_ns: Option<u64>,
    /// The copy's counts of the disks already switched.
    stats_done: CopyStats,
    /// Steps taken and the time spent inside them.
    steps: u64,
    step_ns: u64,
}

/// Whether a copy limited to `rate_bytes_per_s` (0: no limit) that has
/// moved `bytes_done` in `elapsed_ns` may move more now: the bytes moved
/// stay at or under the rate times the time elapsed (a chunk may take it
/// over by one chunk, which the next steps wait out).
pub fn under_rate(bytes_done: u64, elapsed_ns: u64, rate_bytes_per_s: u64) -> bool {
    rate_bytes_per_s == 0
        || u128::from(bytes_done) * 1_000_000_000
            <= u128::from(rate_bytes_per_s) * u128::from(elapsed_ns)
}

impl StorageMove {
    /// A job for `vm` along `plan`, every destination's store checked.
    pub fn new(vm: &Vm, files: &dyn FileStore, plan: Plan) -> Result<Self, String> {
        if plan.targets.len() != vm.disk_count() {
            return Err("the plan does not cover the VM's disks".into());
        }
        for t in plan
            .targets
            .iter()
            .flatten()
            .chain(&plan.config)
            .chain(&plan.snapshots)
        {
            let store = t.split_once(':').map_or(t.as_str(), |(s, _)| s);
            if !files.has_store(store) {
                return Err(format!("no store named '{store:.40}' on this node"));
            }
        }
        if let Some(c) = &plan.config {
            if files.file_bytes(c).is_some() {
                return Err(format!(
                    "{c} exists: pick another place, or remove the file first"
                ));
            }
        }
        Ok(Self {
            vm: vm.name().into(),
            plan,
            next: 0,
            current: None,
            done_bytes: 0,
            moved: Vec::new(),
            rate_bytes_per_s: 0,
            started_ns: None,
            stats_done: CopyStats::default(),
            steps: 0,
            step_ns: 0,
        })
    }

    /// The copy limited to `bytes_per_s` (0: no limit); guest writes are
    /// mirrored whatever the limit.
    pub fn with_rate(mut self, bytes_per_s: u64) -> Self {
        self.rate_bytes_per_s = bytes_per_s;
        self
    }

    /// The VM it moves.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// Work for up to `budget_ns` of `clock`: start the next disk, copy
    /// chunks, switch a disk whose copy is complete. `Err` ends the job
    /// as failed; the VM then runs on from the disk's source.
    pub fn step(
        &mut self,
        vm: &mut Vm,
        files: &dyn FileStore,
        clock: &dyn Fn() -> u64,
        budget_ns: u64,
    ) -> Result<Progress, String> {
        let now = clock();
        self.steps += 1;
        let r = self.step_until(vm, files, clock, now, now.saturating_add(budget_ns));
        self.step_ns += clock().saturating_sub(now);
        r
    }

    fn step_until(
        &mut self,
        vm: &mut Vm,
        files: &dyn FileStore,
        clock: &dyn Fn() -> u64,
        now: u64,
        end: u64,
    ) -> Result<Progress, String> {
        let started = *self.started_ns.get_or_insert(now);
        loop {
            if self.current.is_none() {
                let Some(slot) =
                    (self.next..self.plan.targets.len()).find(|&i| self.plan.targets[i].is_some())
                else {
                    self.move_config(vm, files)?;
                    return Ok(Progress::Done {
                        summary: format!("moved {}", self.moved.join(", ")),
                    });
                };
                self.next = slot + 1;
                let to = self.plan.targets[slot].clone().unwrap_or_default();
                self.start_disk(vm, files, slot as u8, to)?;
            }
            let elapsed = clock().saturating_sub(started);
            if !under_rate(self.bytes().0, elapsed, self.rate_bytes_per_s) {
                let (bytes_done, bytes_total) = self.bytes();
                return Ok(Progress::Running {
                    bytes_done,
                    bytes_total,
                });
            }
            let step = match &self.current {
                Some(cur) => cur.mirror.borrow_mut().step_timed(clock),
                None => continue,
            };
            match step {
                Ok(Step::Copied(_)) => {}
                Ok(Step::Mirrored) => self.switch(vm, files)?,
                Err(e) => {
                    let why = format!("{e}; the VM runs on from its source");
                    self.abort(vm, files);
                    return Err(why);
                }
            }
            if clock() >= end {
                let (bytes_done, bytes_total) = self.bytes();
                return Ok(Progress::Running {
                    bytes_done,
                    bytes_total,
                });
            }
        }
    }

    /// Allocated bytes copied and to copy: the disks switched, plus the
    /// current one's plan.
    pub fn bytes(&self) -> (u64, u64) {
        let (mut done, mut total) = (self.done_bytes, self.done_bytes);
        if let Some(cur) = &self.current {
            let p = cur.mirror.borrow().progress();
            done += p.bytes_copied;
            total += p.bytes_total;
        }
        (done, total)
    }

    /// The copy's counts over every disk so far (with the current one's).
    pub fn stats(&self) -> CopyStats {
        let mut s = self.stats_done;
        if let Some(cur) = &self.current {
            s.add(&cur.mirror.borrow().stats());
        }
        s
    }

    /// Where the copy's time went, one line: steps and the time inside
    /// them, then per part (`read`, `zero check`, `write`, `flush`) its
    /// milliseconds, chunks and zero chunks left unwritten.
    pub fn report(&self) -> String {
        let s = self.stats();
        let ms = |ns: u64| ns / 1_000_000;
        format!(
            "{} steps ({} ms), {} chunks ({} MiB read, {} MiB written, {} all-zero not written): read {} ms, zero check {} ms, write {} ms, {} flushes {} ms",
            self.steps,
            ms(self.step_ns),
            s.chunks,
            s.bytes_read >> 20,
            s.bytes_written >> 20,
            s.zero_chunks_skipped,
            ms(s.read_ns),
            ms(s.zero_check_ns),
            ms(s.write_ns),
            s.flushes,
            ms(s.flush_ns)
        )
    }

    fn start_disk(
        &mut self,
        vm: &mut Vm,
        files: &dyn FileStore,
        slot: u8,
        to: String,
    ) -> Result<(), String> {
        let meta = vm
            .disk_meta()
            .get(usize::from(slot))
            .cloned()
            .ok_or("the disk is gone")?;
        let file = files.create_partial(&to)?;
        let params = CreateParams {
            virtual_size: meta.virtual_bytes,
            block_size: meta.block_bytes,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            fixed: meta.fixed,
            parent: None,
            guid_seed: meta.virtual_bytes ^ u64::from(slot),
        };
        let dest = match vhdx::create(file, &params) {
            Ok(d) => d,
            Err(e) => {
                files.remove_partial(&to);
                return Err(format!("cannot create {to}: {e}"));
            }
        };
        let sector = match vm.disk_mut(slot) {
            Some(d) => d.logical_sector_size(),
            None => 512,
        };
        let placeholder = Box::new(Detached {
            size: meta.virtual_bytes,
            sector,
        });
        let Some(source) = vm.replace_disk(slot, placeholder) else {
            files.remove_partial(&to);
            return Err("the disk is gone".into());
        };
        // Check before the source is handed over: `MirroredDisk::new`
        // consumes it even when it refuses.
        if let Err(e) = vstorage::copy::check_geometry(&*source, &dest) {
            vm.replace_disk(slot, source);
            files.remove_partial(&to);
            return Err(format!("cannot mirror to {to}: {e}"));
        }
        let opts = CopyOptions {
            // The destination is a new dynamic or fixed VHDX (no parent):
            // what is not written reads as zeros, so zero chunks stay holes
            // (the mirror still writes those a mirrored write reached).
            skip_zero_chunks: true,
            // Two full 9P messages a read and a write: round trips, not
            // bytes, are what a chunk costs on a store.
            chunk_bytes: crate::store::COPY_IO_BYTES as u32,
        };
        let mirror = match MirroredDisk::new(source, dest, opts) {
            Ok(m) => Rc::new(RefCell::new(m)),
            Err(e) => {
                // Only the source's allocation map can fail here, and the
                // source went with it: the disk cannot go on.
                files.remove_partial(&to);
                return Err(format!("cannot read the source's allocation: {e}"));
            }
        };
        vm.replace_disk(slot, Box::new(mirror.clone()));
        self.current = Some(DiskMove { slot, to, mirror });
        Ok(())
    }

    /// Take the mirror out of the VM (its handle replaced) as the only
    /// owner.
    fn unwrap_mirror(vm: &mut Vm, cur: DiskMove) -> Option<Mirror> {
        let (size, sector) = {
            let m = cur.mirror.borrow();
            (m.virtual_size(), m.logical_sector_size())
        };
        let handle = vm.replace_disk(cur.slot, Box::new(Detached { size, sector }));
        drop(handle);
        Rc::try_unwrap(cur.mirror).ok().map(RefCell::into_inner)
    }

    /// The current disk's copy is complete: name the new file, switch the
    /// VM to it, delete (or keep) the source.
    fn switch(&mut self, vm: &mut Vm, files: &dyn FileStore) -> Result<(), String> {
        let Some(cur) = self.current.take() else {
            return Ok(());
        };
        if let Err(e) = files.commit_partial(&cur.to) {
            self.current = Some(cur);
            self.abort(vm, files);
            return Err(format!(
                "cannot name the new file: {e}; the VM runs on from its source"
            ));
        }
        // The new file is whole and named: the VM's configuration names
        // it before the VM switches (a node that stops from here on
        // finds a configuration naming a whole file: the new one, or
        // before this rewrite the source, which is not deleted yet).
        if let Err(e) = Self::name_in_config(vm, files, cur.slot, &cur.to) {
            let _ = files.remove(&cur.to);
            self.current = Some(cur);
            self.abort(vm, files);
            return Err(format!(
                "cannot rewrite the VM's configuration to name the new file: {e}; the VM runs on from its source"
            ));
        }
        let switched = cur.mirror.borrow_mut().switch_over();
        let bytes_total = cur.mirror.borrow().progress().bytes_total;
        self.stats_done.add(&cur.mirror.borrow().stats());
        let (slot, to) = (cur.slot, cur.to.clone());
        let source = match switched {
            Ok(s) => s,
            Err(e) => {
                // Named but not switched: the source still holds every
                // write; the new file goes.
                let _ = files.remove(&to);
                self.current = Some(cur);
                self.abort(vm, files);
                // The configuration names the source again.
                if let Err(c) = vmconfig::save(vm, files) {
                    log::warn!(
                        "storage migration: cannot restore the configuration of {}: {c}",
                        vm.name()
                    );
                }
                return Err(format!(
                    "cannot switch over: {e}; the VM runs on from its source"
                ));
            }
        };
        // The mirror now reads and writes only the destination: give the
        // VM the destination itself.
        let dest = Self::unwrap_mirror(vm, cur).and_then(|m| m.into_parts().1);
        match dest {
            Some(d) => {
                vm.replace_disk(slot, Box::new(d));
            }
            None => return Err("the destination disk was lost at the switch".into()),
        }
        self.done_bytes += bytes_total;
        let old = vm.disk_meta().get(usize::from(slot)).cloned();
        if let Some(meta) = vm.disk_meta_mut().get_mut(usize::from(slot)) {
            meta.backing = Backing::File {
                location: to.clone(),
            };
        }
        // Close the source (its VHDX header written), then delete it.
        drop(source);
        if let Some(old) = old {
            if !self.plan.keep_source {
                if let Backing::File { location } = &old.backing {
                    if let Err(e) = files.remove(location) {
                        log::warn!("storage migration: cannot delete {location}: {e}");
                    }
                }
            }
            self.moved.push(format!("{} -> {to}", old.location()));
        }
        Ok(())
    }

    /// Rewrite VM `vm`'s configuration file with disk `slot` at `to`
    /// (nothing for a VM without one).
    fn name_in_config(vm: &Vm, files: &dyn FileStore, slot: u8, to: &str) -> Result<(), String> {
        let Some(p) = vm.placement() else {
            return Ok(());
        };
        let Some(at) = &p.at else {
            return Ok(());
        };
        let mut cfg = vmconfig::of_vm(vm, p);
        if let Some(d) = cfg.disks.get_mut(usize::from(slot)) {
            d.location = to.into();
        }
        vmconfig::write(files, at, &cfg)
    }

    /// After the disks: the configuration file to its new place (written
    /// whole there, durably, before the old one is deleted: a node that
    /// stops in between has both, each describing the VM), and the
    /// snapshot location recorded. The VM has no checkpoint files yet
    /// (this node makes none), so no file moves with the location.
    fn move_config(&mut self, vm: &mut Vm, files: &dyn FileStore) -> Result<(), String> {
        let (config, snapshots) = (self.plan.config.take(), self.plan.snapshots.take());
        if config.is_none() && snapshots.is_none() {
            return Ok(());
        }
        let Some(old) = vm.placement().cloned() else {
            return Err("the VM has no configuration file".into());
        };
        let mut new = old.clone();
        if let Some(s) = &snapshots {
            new.snapshots = s.clone();
        }
        if let Some(c) = &config {
            new.at = Some(c.clone());
        }
        let Some(at) = new.at.clone() else {
            return Err("the VM has no configuration file".into());
        };
        if config.is_some() && files.file_bytes(&at).is_some() {
            return Err(format!(
                "{at} exists: the configuration file stays at its place"
            ));
        }
        if let Err(e) = vmconfig::write(files, &at, &vmconfig::of_vm(vm, &new)) {
            return Err(format!(
                "cannot write the configuration file {at}: {e} (it stays at its place)"
            ));
        }
        vm.set_placement(Some(new));
        if let Some(s) = snapshots {
            self.moved
                .push(format!("snapshots {} -> {s}", old.snapshots));
        }
        if let (Some(c), Some(old_at)) = (config, old.at) {
            if !self.plan.keep_source {
                if let Err(e) = files.remove(&old_at) {
                    log::warn!("storage migration: cannot delete {old_at}: {e}");
                }
            }
            self.moved.push(format!("config {old_at} -> {c}"));
        }
        Ok(())
    }

    /// Stop the current disk's mirror: the source is the disk again, the
    /// partial destination is deleted.
    fn abort(&mut self, vm: &mut Vm, files: &dyn FileStore) {
        let Some(cur) = self.current.take() else {
            return;
        };
        let (slot, to) = (cur.slot, cur.to.clone());
        let _ = cur.mirror.borrow_mut().cancel();
        match Self::unwrap_mirror(vm, cur).map(Mirror::into_parts) {
            Some((Some(source), dest)) => {
                vm.replace_disk(slot, source);
                drop(dest);
            }
            _ => log::warn!("storage migration: the source disk of slot {slot} was lost"),
        }
        files.remove_partial(&to);
    }

    /// The job was cancelled: the VM runs on from its sources (disks
    /// already switched stay switched).
    pub fn cancel(mut self, vm: &mut Vm, files: &dyn FileStore) {
        self.abort(vm, files);
    }

    /// Why a job ends without its VM (deleted): nothing to give back; the
    /// partial file goes.
    pub fn abandon(mut self, files: &dyn FileStore) {
        if let Some(cur) = self.current.take() {
            files.remove_partial(&cur.to);
        }
    }
}

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
