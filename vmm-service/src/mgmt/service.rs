//! The managed node: the VM table, the job table and the request handlers
//! ([`Managed`]). Requests reach it through the management server
//! (server.rs); the link benchmark's jobs are bench.rs's.
//!
//! VM semantics (docs/MANAGEMENT.md): create loads the guest kernel into a
//! new partition (state `created`); start runs it; stop stops it for good
//! (a stopped VM cannot run again: delete and create it); delete needs a VM
//! that is not running and returns its memory. `vm-move` hands the VM to a
//! live migration (`crate::migrate`): while it moves, requests that would
//! change it are refused with `vm-migrating`, and its job is cancelled or
//! resolved through the migration, not the job table alone.

use super::auth::ClusterKey;
use super::bench::LinkBench;
use super::jobs::{JobError, JobTable};
use super::proto::{
    ApiError, Body, ErrorCode, JobKind, JobState, LinuxBoot, NodeInfo, Outcome, Request, StoreInfo,
    VmFiles, VmInfo, VmMove, APPEND_MAX, CONSOLE_INPUT_MAX, CONSOLE_LINES_MAX, GUEST_MAX,
    PROTOCOL_VERSION,
};
use crate::migrate::channel::{Holds, HOLD_MS_MAX};
use crate::migrate::{migrating, Faults, Migrations, MoveRequest};
use crate::sched::{ProgressLog, Scheduler};
use crate::storage_migration::{FileStore, Progress as StorageProgress, StorageMove};
use crate::vm::{StopReason, Vm, VmError, VmState};
use crate::vmconfig;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use hvcore::host::{Host, HostError, NicRole};
use hvcore::vcpu::Vendor;
use migration::policy::{NS_PER_MS, NS_PER_S};
use migration::Policy;

/// Most VMs a node holds.
pub const VMS_MAX: usize = 16;
/// Largest VM memory accepted, in MiB (the host may have less).
pub const VM_MEMORY_MIB_MAX: u64 = 4096;
/// Smallest VM memory accepted, in MiB (the guest kernel needs this much).
pub const VM_MEMORY_MIB_MIN: u64 = 4;
/// Console lines returned when the request names no count.
pub const CONSOLE_LINES_DEFAULT: u32 = 20;
/// The `guest` a Linux VM is listed with.
pub const LINUX_GUEST: &str = "linux";
/// Boot modules holding the Linux guest's kernel (a bzImage) and initramfs
/// (module 0 is the guest test kernel).
pub const LINUX_KERNEL_MODULE: usize = 1;
pub const LINUX_INITRD_MODULE: usize = 2;
/// Guests the guest kernel runs (`case=` values; docs/DESIGN.md).
pub const GUESTS: [&str; 13] = [
    "heartbeat",
    "dirty-demo",
    "bench-hypercall",
    "busy-verify",
    "disk-verify",
    "disk-beat",
    "hello",
    "cpuid",
    "memory",
    "dirty-log",
    "bad-msr",
    "triple-fault",
    "two-vms",
];
/// Longest step of a store benchmark per node loop round (VMs and the
/// management API run between steps).
pub const STORE_BENCH_STEP_NS: u64 = 50_000_000;
/// `pause_reason` of a VM whose disk's store is full.
pub const PAUSE_STORE_FULL: &str = "store full";
/// `pause_reason` of a VM whose node may not write its disks on a shared
/// store (its lease is lost, or not yet held).
pub const PAUSE_LEASE: &str = "lease";
/// The guest of a VM created without one.
pub const DEFAULT_GUEST: &str = "heartbeat";

/// What the node was told at boot that the API reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    pub mgmt_addr: String,
    pub migration_addr: String,
    /// Where VMs can move (`peers=`).
    pub peers: Vec<crate::node::Peer>,
}

/// Bounds of `vm-move`'s arguments.
pub const DOWNTIME_MS_MAX: u64 = 60_000;
pub const BANDWIDTH_MIB_S_MAX: u64 = 100_000;
pub const TIMEOUT_S_MAX: u64 = 86_400;
/// Defaults of `vm-move`'s arguments.
pub const DOWNTIME_MS_DEFAULT: u64 = 300;
pub const TIMEOUT_S_DEFAULT: u64 = 600;

/// The node's VMs, jobs and settings, and the handlers over them.
pub struct Managed {
    identity: NodeIdentity,
    image: Vec<u8>,
    vms: Vec<Vm>,
    jobs: JobTable,
    bench: LinkBench,
    migrations: Migrations,
    sched: Scheduler,
    progress: ProgressLog,
    /// Where storage migrations put files (`None`: no stores).
    files: Option<alloc::boxed::Box<dyn FileStore>>,
    /// Storage migrations and their jobs (queued ones too).
    storage_moves: Vec<(u64, StorageMove)>,
    /// The node's stores, shared with `files` when it is their
    /// `StoreFiles`.
    stores: alloc::rc::Rc<crate::store::Stores>,
    /// Running store benchmarks and their jobs.
    store_benches: Vec<(u64, crate::store::bench::StoreBench)>,
}

/// Longest step of a storage migration per node-loop round (the VMs and
/// the API run between steps).
pub const STORAGE_STEP_NS: u64 = 20_000_000;

fn err(code: ErrorCode, message: impl Into<String>) -> Outcome {
    Outcome::Error(ApiError::new(code, message))
}

fn vm_error(e: VmError) -> Outcome {
    let code = match e {
        VmError::BadName => ErrorCode::InvalidArgument,
        VmError::Host(HostError::OutOfMemory { .. }) => ErrorCode::NoResources,
        VmError::Host(HostError::NoVirtualization | HostError::Backend(_)) => {
            ErrorCode::Unsupported
        }
        VmError::Host(HostError::InvalidSize { .. })
        | VmError::Load(_)
        | VmError::Linux(_)
        | VmError::Start(_) => ErrorCode::InvalidArgument,
    };
    err(code, format!("cannot create the VM: {e}"))
}

/// A store operation's failure as an error reply.
fn store_error(e: &crate::store::StoreError) -> Outcome {
    use crate::store::StoreError;
    let code = match e {
        StoreError::NoSuchStore(_) => ErrorCode::NotFound,
        StoreError::BadPath(_) => ErrorCode::InvalidArgument,
        StoreError::Unusable { .. } => ErrorCode::Unsupported,
        e if e.is_no_space() => ErrorCode::NoResources,
        e if e.is_not_found() => ErrorCode::NotFound,
        StoreError::P9 { .. } | StoreError::Busy(_) => ErrorCode::InvalidState,
    };
    err(code, e.to_string())
}

fn state_name(vm: &Vm) -> &'static str {
    match vm.state() {
        VmState::Created if vm.migration_mark().is_some_and(|m| m.incoming) => "incoming",
        VmState::Stopped(_) => "stopped",
        _ if vm.is_paused() || vm.store_full().is_some() || vm.lease_hold().is_some() => "paused",
        VmState::Created => "created",
        VmState::Running => "running",
        VmState::Halted => "halted",
    }
}

fn fmt_addr(a: Option<([u8; 4], u8)>) -> String {
    match a {
        Some(([a, b, c, d], p)) => format!("{a}.{b}.{c}.{d}/{p}"),
        None => String::new(),
    }
}

impl Managed {
    /// A node with no VMs that creates them from the guest kernel `image`
    /// and moves them to its peers with `key` (migration port `mig_port`).
    pub fn new(
        host: &mut dyn Host,
        identity: NodeIdentity,
        image: Vec<u8>,
        key: ClusterKey,
        mig_port: u16,
    ) -> Self {
        let migrations = Migrations::new(
            host,
            &identity.name,
            key,
            mig_port,
            identity.peers.clone(),
            true,
        );
        Self {
            identity,
            image,
            vms: Vec::new(),
            jobs: JobTable::new(),
            bench: LinkBench::new(),
            migrations,
            sched: Scheduler::default(),
            progress: ProgressLog::default(),
            files: None,
            storage_moves: Vec::new(),
            stores: alloc::rc::Rc::new(crate::store::Stores::none()),
            store_benches: Vec::new(),
        }
    }

    /// The node's stores (attached at boot, `crate::store::Stores::boot`).
    /// A node with stores keeps VM disks on them (`crate::store::StoreFiles`:
    /// new disks, storage migration); one without keeps disks in its
    /// memory and refuses storage migration.
    pub fn set_stores(&mut self, stores: crate::store::Stores) {
        self.stores = alloc::rc::Rc::new(stores);
        self.migrations.set_stores(self.stores.clone());
        self.files = match self.stores.iter().next() {
            Some(_) => Some(alloc::boxed::Box::new(crate::store::StoreFiles::new(
                self.stores.clone(),
            ))),
            None => None,
        };
    }
    /// The node's stores.
    pub fn stores(&self) -> &crate::store::Stores {
        &self.stores
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.identity.name
    }
    /// The job table.
    pub fn jobs(&mut self) -> &mut JobTable {
        &mut self.jobs
    }
    /// Number of VMs.
    pub fn vm_count(&self) -> usize {
        self.vms.len()
    }
    /// Whether a link benchmark, a store benchmark or a migration is under
    /// way (the node loop must not idle).
    pub fn has_bench_work(&self) -> bool {
        self.bench.is_active()
            || self.migrations.is_active()
            || !self.storage_moves.is_empty()
            || !self.store_benches.is_empty()
    }
    /// Whether a migration is under way (the node loop gives guests
    /// shorter turns, so the link is serviced often).
    pub fn is_migrating(&self) -> bool {
        self.migrations.is_active()
    }
    /// The VMs (tests).
    pub fn vms(&self) -> &[Vm] {
        &self.vms
    }
    /// The VMs, to look into their memory (tests).
    #[cfg(test)]
    pub fn vms_mut(&mut self) -> &mut [Vm] {
        &mut self.vms
    }

    /// Advance the link benchmark and the migration jobs (call every loop
    /// round).
    pub fn drive_jobs(&mut self, host: &mut dyn Host) {
        self.bench.drive(&mut self.jobs, host);
        if self.migrations.is_active() && self.files.is_some() {
            let before = self.placements();
            self.migrations.drive(host, &mut self.vms, &mut self.jobs);
            self.settle_placements(host, before);
        } else {
            self.migrations.drive(host, &mut self.vms, &mut self.jobs);
        }
        self.drive_storage_moves(host);
        self.drive_store_benches(host);
        self.retry_store_full(host);
        self.drive_leases(host);
    }

    /// The leases' times (tests shorten them).
    pub fn set_lease_timing(&mut self, timing: crate::lease::Timing) {
        self.migrations.lease_node.timing = timing;
    }

    /// VM `i`'s lease on the shared store of its disks (or on `store`,
    /// about to get one), made if it has none yet; `None` if neither is
    /// shared.
    fn lease_of(
        &mut self,
        i: usize,
        store: Option<&str>,
    ) -> Option<&mut crate::lease::vms::VmLease> {
        use crate::lease::vms;
        if self.vms[i].lease().is_none() {
            // Disks it has already were opened without the lease (an
            // imported VM's, read-only): opened again once it is owned.
            let reopen = self.vms[i].disk_count() > 0;
            let store = store
                .filter(|s| vms::is_shared_store(s))
                .map(String::from)
                .or_else(|| vms::shared_store(&self.vms[i]))?;
            let at = vms::lease_location(&store, self.vms[i].name());
            let node = self.migrations.lease_node.clone();
            let file = vms::StoreLeaseFile::new(self.stores.clone(), &at, &node.name).ok()?;
            let mut lease =
                vms::VmLease::new(self.vms[i].name(), &node, &at, alloc::boxed::Box::new(file));
            if reopen {
                lease.reopen_when_owned();
            }
            *self.vms[i].lease_mut() = Some(lease);
        }
        self.vms[i].lease_mut().as_mut()
    }

    /// Ask for VM `i`'s lease now (before it starts or gets a disk on
    /// `store`): `Err` names the holder.
    fn acquire_lease(
        &mut self,
        host: &dyn Host,
        i: usize,
        store: Option<&str>,
    ) -> Result<(), String> {
        let now_ms = host.now_ns() / NS_PER_MS;
        match self.lease_of(i, store) {
            None => return Ok(()),
            Some(l) => l.acquire(now_ms)?,
        }
        // Back after a time without it: its disks are opened again.
        crate::lease::vms::regain(&mut self.vms[i], &self.stores, host.now_ns())
    }

    /// Give VM `i`'s lease up (it stopped or is deleted).
    fn release_lease(&mut self, host: &mut dyn Host, i: usize) {
        let name = String::from(self.vms[i].name());
        if let Some(l) = self.vms[i].lease_mut() {
            let at = String::from(l.location());
            if let Err(e) = l.release() {
                host.console_write(&format!(
                    "vmm-service: VM {name}: cannot remove its lease {at}: {e}\n"
                ));
            }
        }
    }

    /// Renew, watch, take or adopt each VM's lease (call every loop
    /// round): a VM whose node may not write its shared disks is held.
    fn drive_leases(&mut self, host: &mut dyn Host) {
        let now_ms = host.now_ns() / NS_PER_MS;
        for i in 0..self.vms.len() {
            // A migrating VM's lease is renewed too (a pre-copy may take
            // longer than the expiry): the source's until it hands the lease
            // over, the destination's from its arrival.
            if self.vms[i].stop_reason().is_some() {
                continue;
            }
            // A running VM whose disk came onto a shared store (storage
            // migration) takes its lease too.
            if self.vms[i].lease().is_none()
                && self.vms[i].migration_mark().is_none()
                && *self.vms[i].state() != VmState::Created
                && self.storage_job(self.vms[i].name()).is_none()
                && crate::lease::vms::shared_store(&self.vms[i]).is_some()
            {
                // Its files were opened without the gate: open them again
                // behind it once the lease is its own.
                if let Some(l) = self.lease_of(i, None) {
                    l.reopen_when_owned();
                }
            }
            let seed = host.now_ns();
            if let Some(line) =
                crate::lease::vms::tick(&mut self.vms[i], now_ms, Some(&self.stores), seed)
            {
                host.console_write(&line);
            }
        }
    }

    /// After live migrations stepped: a VM that left this node takes
    /// its configuration file with it (the file here is removed; the
    /// destination writes its own); a VM replaced by its copy within the
    /// node keeps its identity and file; a VM that arrived from another
    /// node gets a configuration file here, with the identity and (a
    /// Linux VM's) kernel arguments its source sent in the `open`
    /// (`Vm::carried`; a new identity if the source sent none).
    /// `before`: the VMs with a placement before the step.
    fn settle_placements(
        &mut self,
        host: &mut dyn Host,
        before: Vec<(String, vmconfig::Placement, bool)>,
    ) {
        let Some(files) = self.files.as_deref() else {
            return;
        };
        for (name, p, all_shared) in before {
            match self.vms.iter_mut().find(|v| v.name() == name) {
                Some(v) if v.placement().is_none() => v.set_placement(Some(p)),
                Some(_) => {}
                None => {
                    // A VM whose disks and file are all on the shared
                    // store moved with them: the destination adopts the
                    // file (and so the VM's id).
                    let adopted = all_shared
                        && p.at.as_deref().is_some_and(|at| {
                            crate::lease::vms::is_shared_store(crate::lease::vms::store_of(at))
                        });
                    if adopted {
                        continue;
                    }
                    if let Some(at) = p.at {
                        let line = match files.remove(&at) {
                            Ok(()) => format!(
                                "vmm-service: VM {name} left this node: its configuration {at} removed\n"
                            ),
                            Err(e) => format!(
                                "vmm-service: VM {name} left this node: cannot remove its configuration {at}: {e}\n"
                            ),
                        };
                        host.console_write(&line);
                    }
                }
            }
        }
        for i in 0..self.vms.len() {
            let vm = &self.vms[i];
            if vm.placement().is_some() || vm.migration_mark().is_some() {
                continue;
            }
            if let Some((at, cfg)) = Self::shared_config_of(files, vm) {
                let line = format!(
                    "vmm-service: VM {}: its configuration {at} (id {}) is on the shared store with its disks: kept\n",
                    vm.name(),
                    cfg.id
                );
                self.vms[i].set_placement(Some(vmconfig::Placement {
                    id: cfg.id,
                    at: Some(at),
                    snapshots: cfg.snapshots,
                    boot: cfg.boot,
                }));
                host.console_write(&line);
                continue;
            }
            let store = files.default_store();
            let at = store
                .as_deref()
                .map(|s| vmconfig::default_location(s, vm.name()))
                .filter(|at| files.file_bytes(at).is_none());
            // What it brought from its source (an older source sends
            // neither: a new id, no kernel arguments).
            let carried = vm.carried().cloned().unwrap_or_default();
            let boot = if vm.label() == LINUX_GUEST {
                vmconfig::Boot::Linux {
                    append: carried.append.unwrap_or_default(),
                }
            } else {
                vmconfig::Boot::Guest(vm.label().into())
            };
            let placement = vmconfig::Placement {
                id: carried.id.unwrap_or_else(|| vmconfig::new_id(host)),
                at: at.clone(),
                snapshots: vmconfig::default_snapshots(
                    store
                        .as_deref()
                        .unwrap_or(crate::store::files::DEFAULT_STORE),
                    vm.name(),
                ),
                boot,
            };
            let vm = &mut self.vms[i];
            vm.set_placement(Some(placement));
            let line = match at {
                Some(at) => match vmconfig::save(vm, files) {
                    Ok(()) => format!("vmm-service: VM {}: configuration {at} written\n", vm.name()),
                    Err(e) => {
                        if let Some(p) = vm.placement_mut() {
                            p.at = None;
                        }
                        format!("vmm-service: VM {}: cannot write its configuration {at}: {e}\n", vm.name())
                    }
                },
                None => format!(
                    "vmm-service: VM {}: no configuration file written (a file of its name is in the way, or no store)\n",
                    vm.name()
                ),
            };
            host.console_write(&line);
        }
    }

    /// The VMs' placements by name, and whether all of each VM's disks
    /// are on the shared store (before a migration step:
    /// [`Managed::settle_placements`]).
    fn placements(&self) -> Vec<(String, vmconfig::Placement, bool)> {
        self.vms
            .iter()
            .filter_map(|v| {
                let shared = crate::lease::vms::all_disks_shared(v);
                v.placement().map(|p| (v.name().into(), p.clone(), shared))
            })
            .collect()
    }

    /// The configuration file on the shared store of a VM that arrived
    /// with all its disks there: `shared:vms/VM/VM.vmcfg` or `VM.vmcfg`
    /// beside one of its disks, if it describes this VM (its name, its
    /// disks where they are).
    fn shared_config_of(files: &dyn FileStore, vm: &Vm) -> Option<(String, vmconfig::VmConfig)> {
        if !crate::lease::vms::all_disks_shared(vm) {
            return None;
        }
        let file = format!("{}.{}", vm.name(), vmconfig::EXTENSION);
        let disks: Vec<String> = vm.disk_meta().iter().map(|m| m.location()).collect();
        let mut candidates = alloc::vec![vmconfig::default_location(
            crate::lease::vms::SHARED_STORE,
            vm.name()
        )];
        for d in &disks {
            if let Some((dir, _)) = d.rsplit_once('/') {
                candidates.push(vmconfig::file_in(dir, &file));
            }
        }
        candidates.into_iter().find_map(|at| {
            files.file_bytes(&at)?;
            let cfg = vmconfig::read(files, &at).ok()?;
            let same =
                cfg.name == vm.name() && cfg.disks.iter().map(|d| &d.location).eq(disks.iter());
            same.then_some((at, cfg))
        })
    }

    /// Where disks and storage migrations put files in place of the
    /// node's stores (tests: files in memory).
    pub fn set_file_store(&mut self, files: alloc::boxed::Box<dyn FileStore>) {
        self.files = Some(files);
    }

    /// Whether a storage migration of VM `name` is under way.
    fn storage_job(&self, name: &str) -> Option<u64> {
        self.storage_moves
            .iter()
            .find(|(_, m)| m.vm() == name)
            .map(|(j, _)| *j)
    }

    /// One step of each running storage migration (at most
    /// [`STORAGE_STEP_NS`] each); cancelled ones stop, queued ones wait.
    fn drive_storage_moves(&mut self, host: &mut dyn Host) {
        let Some(files) = self.files.as_deref() else {
            return;
        };
        for (job, mut mv) in core::mem::take(&mut self.storage_moves) {
            let now = host.now_ns();
            let vi = self.vms.iter().position(|v| v.name() == mv.vm());
            match (self.jobs.state(job), vi) {
                (Some(JobState::Queued), Some(_)) => self.storage_moves.push((job, mv)),
                (Some(JobState::Running), Some(vi)) => {
                    let clock = || host.now_ns();
                    match mv.step(&mut self.vms[vi], files, &clock, STORAGE_STEP_NS) {
                        Ok(StorageProgress::Running {
                            bytes_done,
                            bytes_total,
                        }) => {
                            self.jobs.progress(job, bytes_done, Some(bytes_total));
                            self.storage_moves.push((job, mv));
                        }
                        Ok(StorageProgress::Done { summary }) => {
                            let (done, total) = mv.bytes();
                            self.jobs.progress(job, done, Some(total));
                            let now = host.now_ns();
                            host.console_write(&format!(
                                "vmm-service: VM {}: storage {summary} (job {job})\nvmm-service: VM {}: storage copy: {} (job {job})\n",
                                mv.vm(),
                                mv.vm(),
                                mv.report()
                            ));
                            self.jobs.complete(job, Some(&summary), now);
                        }
                        Err(e) => {
                            let now = host.now_ns();
                            host.console_write(&format!(
                                "vmm-service: VM {}: storage migration failed: {e} (job {job})\n",
                                mv.vm()
                            ));
                            self.jobs.fail(job, &e, now);
                        }
                    }
                }
                (_, Some(vi)) => {
                    // Cancelled (or gone from the table): back to the
                    // sources.
                    mv.cancel(&mut self.vms[vi], files);
                    host.console_write(&format!(
                        "vmm-service: VM {}: storage migration cancelled, the VM runs on its source files (job {job})\n",
                        self.vms[vi].name()
                    ));
                }
                (state, None) => {
                    mv.abandon(files);
                    if state.is_some_and(|s| !s.is_final()) {
                        self.jobs.fail(job, "the VM is gone", now);
                    }
                }
            }
        }
    }

    fn move_storage(&mut self, host: &mut dyn Host, request: Request) -> Outcome {
        let Request::VmMoveStorage {
            name,
            to,
            vhd,
            config,
            snapshots,
            keep_source,
            bandwidth_mib_s,
        } = request
        else {
            return err(ErrorCode::BadRequest, "not a storage move");
        };
        let bandwidth = bandwidth_mib_s.unwrap_or(0);
        if bandwidth > BANDWIDTH_MIB_S_MAX {
            return err(
                ErrorCode::InvalidArgument,
                format!("bandwidth_mib_s must be 0 to {BANDWIDTH_MIB_S_MAX}"),
            );
        }
        let Some(i) = self.find(&name) else {
            return Self::not_found(&name);
        };
        if let Some(e) = self.migrating_error(i) {
            return e;
        }
        if let Some(job) = self.storage_job(&name) {
            return Outcome::Error(migrating(&name, job));
        }
        if (config.is_some() || snapshots.is_some()) && self.vms[i].placement().is_none() {
            return err(
                ErrorCode::Unsupported,
                "this node keeps VM configurations in memory, not in files: there is no configuration file or snapshot location to move",
            );
        }
        if vhd.len() > crate::devices::MAX_VIRTIO_SLOTS {
            return err(ErrorCode::InvalidArgument, "more --vhd than a VM has disks");
        }
        let Some(files) = self.files.as_deref() else {
            return err(
                ErrorCode::Unsupported,
                "this node has no stores to move files to",
            );
        };
        let ask = crate::storage_migration::Ask {
            to: to.as_deref(),
            vhd: &vhd,
            config: config.as_deref(),
            snapshots: snapshots.as_deref(),
            keep_source: keep_source == Some(true),
        };
        let plan = match crate::storage_migration::plan_all(&self.vms[i], &ask) {
            Ok(p) => p,
            Err(e) => return err(ErrorCode::InvalidArgument, e),
        };
        let mv = match StorageMove::new(&self.vms[i], files, plan) {
            Ok(m) => m.with_rate(bandwidth << 20),
            Err(e) => return err(ErrorCode::InvalidArgument, e),
        };
        let now = host.now_ns();
        match self
            .jobs
            .submit(JobKind::StorageMigration, &name, 0, true, now)
        {
            Ok(job) => {
                self.storage_moves.push((job, mv));
                match self.jobs.info(job, now) {
                    Some(j) => Outcome::Ok(Body::Job(j)),
                    None => Outcome::Ok(Body::Done),
                }
            }
            Err(_) => err(ErrorCode::NoResources, "the job table is full"),
        }
    }

    /// One step of each store benchmark (at most
    /// [`STORE_BENCH_STEP_NS`] each).
    fn drive_store_benches(&mut self, host: &mut dyn Host) {
        for (job, mut bench) in core::mem::take(&mut self.store_benches) {
            if !self.jobs.is_running(job) {
                bench.abandon(&self.stores);
                continue;
            }
            let clock = || host.now_ns();
            match bench.step(&self.stores, &clock, STORE_BENCH_STEP_NS) {
                Ok(crate::store::bench::Step::Running { bytes_done }) => {
                    self.jobs.progress(job, bytes_done, None);
                    self.store_benches.push((job, bench));
                }
                Ok(crate::store::bench::Step::Done(result)) => {
                    let now = host.now_ns();
                    host.console_write(&format!("vmm-service: store bench: {result}\n"));
                    self.jobs.complete(job, Some(&result), now);
                }
                Err(e) => {
                    bench.abandon(&self.stores);
                    let now = host.now_ns();
                    self.jobs.fail(job, &e, now);
                }
            }
        }
    }

    fn store_bench(&mut self, host: &mut dyn Host, store: &str, mib: u64, keep: bool) -> Outcome {
        let mut seed = [0u8; 8];
        host.entropy(&mut seed);
        let bench = match crate::store::bench::StoreBench::start(
            &self.stores,
            store,
            &self.identity.name,
            mib,
            keep,
            u64::from_le_bytes(seed),
        ) {
            Ok(b) => b,
            Err(e) => return store_error(&e),
        };
        let now = host.now_ns();
        match self
            .jobs
            .submit(JobKind::StoreBench, "", bench.bytes_total(), true, now)
        {
            Ok(job) => {
                self.store_benches.push((job, bench));
                match self.jobs.info(job, now) {
                    Some(j) => Outcome::Ok(Body::Job(j)),
                    None => Outcome::Ok(Body::Done),
                }
            }
            Err(_) => {
                bench.abandon(&self.stores);
                err(ErrorCode::NoResources, "the job table is full")
            }
        }
    }

    /// Run runnable VMs round robin until `deadline_ns`; returns false (at
    /// once) when none is runnable.
    pub fn run_vms(&mut self, host: &mut dyn Host, deadline_ns: u64) -> bool {
        if !self.vms.iter().any(Vm::is_runnable) {
            return false;
        }
        self.sched
            .run(host, &mut self.vms, Some(deadline_ns), &mut self.progress);
        // The log only serves test cases; keep it from growing.
        self.progress = ProgressLog::default();
        true
    }

    fn not_found(name: &str) -> Outcome {
        let shown: String = name.chars().take(crate::vm::NAME_MAX).collect();
        err(
            ErrorCode::NotFound,
            format!("no VM named '{shown}' on this node"),
        )
    }

    fn vm_info(&self, i: usize) -> VmInfo {
        let vm = &self.vms[i];
        VmInfo {
            name: vm.name().into(),
            state: state_name(vm).into(),
            stop_reason: vm.stop_reason().map(ToString::to_string),
            memory_mib: vm.ram_bytes() >> 20,
            guest: vm.label().into(),
            exits: vm.counters().exits,
            console_lines: vm.counters().console_lines,
            migration_job: vm.migration_mark().map(|m| m.job),
            pause_reason: match (vm.store_full(), vm.lease_hold()) {
                _ if vm.stop_reason().is_some() => None,
                (Some(_), _) => Some(PAUSE_STORE_FULL.into()),
                (None, Some(_)) => Some(PAUSE_LEASE.into()),
                (None, None) => None,
            },
            pause_detail: match (vm.store_full(), vm.lease_hold()) {
                _ if vm.stop_reason().is_some() => None,
                (Some(f), _) => Some(format!("disk {}: {}", f.slot, f.detail)),
                (None, Some(why)) => Some(why.into()),
                (None, None) => None,
            },
            files: vm.placement().map(|p| {
                alloc::boxed::Box::new(VmFiles {
                    vm_id: p.id.to_string(),
                    config: p.at.clone(),
                    snapshots: p.snapshots.clone(),
                })
            }),
        }
    }

    /// VM `i`'s disks, configuration file and snapshot location.
    fn disks_body(&self, i: usize) -> Outcome {
        let vm = &self.vms[i];
        Outcome::Ok(Body::Disks {
            vm: vm.name().into(),
            disks: crate::disks::list(vm, self.files.as_deref()),
            config: vm.placement().and_then(|p| p.at.clone()),
            snapshots: vm.placement().map(|p| p.snapshots.clone()),
        })
    }

    /// Retry the waiting disk request of each VM paused because its store
    /// is full, once a [`crate::vm::STORE_FULL_RETRY_NS`] (call every loop
    /// round).
    fn retry_store_full(&mut self, host: &mut dyn Host) {
        let now = host.now_ns();
        for vm in &mut self.vms {
            if vm.store_full_retry_due(now) {
                // Still full: the VM waits for the next retry.
                let _ = vm.retry_store_full(host);
            }
        }
    }

    /// The VM `name` as requests address it: the one that is not a
    /// migration's incoming copy (during a move within the node both
    /// exist), else that one.
    fn find(&self, name: &str) -> Option<usize> {
        self.vms
            .iter()
            .position(|v| v.name() == name && v.migration_mark().is_none_or(|m| !m.incoming))
            .or_else(|| self.vms.iter().position(|v| v.name() == name))
    }

    /// `vm-migrating` if a migration moves VM `i`.
    fn migrating_error(&self, i: usize) -> Option<Outcome> {
        self.vms[i]
            .migration_mark()
            .map(|m| Outcome::Error(migrating(self.vms[i].name(), m.job)))
    }

    fn move_vm(&mut self, host: &mut dyn Host, request: VmMove) -> Outcome {
        let VmMove {
            name,
            to,
            downtime_ms,
            bandwidth_mib_s,
            timeout_s,
            encrypt,
            verify,
            debug_hold_accept_ms,
            debug_hold_ready_ms,
            debug_hold_resumed_ms,
            include_storage,
            store,
            quick,
        } = request;
        let downtime_ms = downtime_ms.unwrap_or(DOWNTIME_MS_DEFAULT);
        let bandwidth = bandwidth_mib_s.unwrap_or(0);
        let timeout_s = timeout_s.unwrap_or(TIMEOUT_S_DEFAULT);
        if !(1..=DOWNTIME_MS_MAX).contains(&downtime_ms)
            || bandwidth > BANDWIDTH_MIB_S_MAX
            || !(1..=TIMEOUT_S_MAX).contains(&timeout_s)
        {
            return err(
                ErrorCode::InvalidArgument,
                format!(
                    "downtime_ms must be 1 to {DOWNTIME_MS_MAX}, bandwidth_mib_s 0 to \
                     {BANDWIDTH_MIB_S_MAX}, timeout_s 1 to {TIMEOUT_S_MAX}"
                ),
            );
        }
        let holds = Holds {
            accept_ms: debug_hold_accept_ms.unwrap_or(0),
            ready_ms: debug_hold_ready_ms.unwrap_or(0),
            resumed_ms: debug_hold_resumed_ms.unwrap_or(0),
        };
        if holds != holds.capped() {
            return err(
                ErrorCode::InvalidArgument,
                format!("the debug_hold_* arguments must be 0 to {HOLD_MS_MAX}"),
            );
        }
        let policy = Policy {
            downtime_limit_ns: downtime_ms * NS_PER_MS,
            max_bandwidth_bytes_per_s: bandwidth << 20,
            timeout_ns: timeout_s * NS_PER_S,
            verify_memory: verify.unwrap_or(true),
            // A quick move saves the VM for its memory: no pre-copy.
            pause_at_once: quick,
            ..Policy::default()
        };
        let req = MoveRequest {
            vm: name,
            to,
            policy,
            encrypt: encrypt.unwrap_or(false),
            faults: Faults::default(),
            holds,
            include_storage,
            store,
            quick,
        };
        let now = host.now_ns();
        match self
            .migrations
            .start(host, &mut self.vms, &mut self.jobs, req)
        {
            Ok(job) => match self.jobs.info(job, now) {
                Some(j) => Outcome::Ok(Body::Job(j)),
                None => Outcome::Ok(Body::Done),
            },
            Err(e) => Outcome::Error(e),
        }
    }

    /// Answer one request.
    pub fn handle(&mut self, host: &mut dyn Host, request: Request) -> Outcome {
        let now = host.now_ns();
        match request {
            Request::NodeInfo => {
                let (total, free) = host.memory_stats();
                let (mgmt_addr, migration_addr) = match host.net() {
                    Some(net) => (
                        fmt_addr(net.address(NicRole::Management)),
                        fmt_addr(net.address(NicRole::Migration)),
                    ),
                    None => (
                        self.identity.mgmt_addr.clone(),
                        self.identity.migration_addr.clone(),
                    ),
                };
                Outcome::Ok(Body::NodeInfo(NodeInfo {
                    name: self.identity.name.clone(),
                    cpu_vendor: match host.vendor() {
                        Vendor::Amd => "amd".into(),
                        Vendor::Intel => "intel".into(),
                    },
                    cpus: host.cpu_count(),
                    memory_total_bytes: total,
                    memory_free_bytes: free,
                    version: env!("CARGO_PKG_VERSION").into(),
                    protocol_version: PROTOCOL_VERSION,
                    mgmt_addr,
                    migration_addr,
                    peers: self
                        .identity
                        .peers
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                }))
            }
            Request::VmList => Outcome::Ok(Body::VmList {
                vms: (0..self.vms.len()).map(|i| self.vm_info(i)).collect(),
            }),
            Request::VmCreate {
                name,
                memory_mib,
                guest,
                linux,
            } => self.create(host, &name, memory_mib, guest.as_deref(), linux.as_ref()),
            Request::VmDiskCreate {
                name,
                size_mib,
                store,
                fixed,
            } => {
                let Some(i) = self.find(&name) else {
                    return Self::not_found(&name);
                };
                if *self.vms[i].state() != VmState::Created {
                    return err(
                        ErrorCode::InvalidState,
                        format!("VM {name} has started: disks are added before it starts"),
                    );
                }
                if let Err(e) = self.acquire_lease(&*host, i, store.as_deref()) {
                    return err(
                        ErrorCode::InvalidState,
                        format!(
                            "VM {name} cannot have a disk on store {}: {e}",
                            store.as_deref().unwrap_or("")
                        ),
                    );
                }
                let vm = &mut self.vms[i];
                match crate::disks::create_for_vm(
                    vm,
                    self.files.as_deref(),
                    size_mib,
                    store.as_deref(),
                    fixed == Some(true),
                ) {
                    Ok(d) => {
                        host.console_write(&format!(
                            "vmm-service: VM {name}: disk {} ({} MiB, {}) at {}\n",
                            d.slot,
                            d.virtual_bytes >> 20,
                            d.kind,
                            d.location
                        ));
                        if let Some(files) = self.files.as_deref() {
                            if let Err(e) = vmconfig::save(&self.vms[i], files) {
                                return err(
                                    ErrorCode::NoResources,
                                    format!("disk {} was made at {}, but the VM's configuration file could not be rewritten to name it: {e}", d.slot, d.location),
                                );
                            }
                        }
                        self.disks_body(i)
                    }
                    Err(crate::disks::CreateError::Invalid(m)) => {
                        err(ErrorCode::InvalidArgument, m)
                    }
                    Err(crate::disks::CreateError::NoResources(m)) => {
                        err(ErrorCode::NoResources, m)
                    }
                }
            }
            Request::VmDiskList { name } => match self.find(&name) {
                None => Self::not_found(&name),
                Some(i) => self.disks_body(i),
            },
            Request::VmImport { path } => self.import(host, &path),
            Request::VmStart { name } => {
                let Some(i) = self.find(&name) else {
                    return Self::not_found(&name);
                };
                if let Some(e) = self.migrating_error(i) {
                    return e;
                }
                match self.vms[i].state() {
                    VmState::Created => {
                        if let Err(e) = self.acquire_lease(&*host, i, None) {
                            return err(
                                ErrorCode::InvalidState,
                                format!("VM {name} cannot start on node {}: {e}", self.identity.name),
                            );
                        }
                        self.vms[i].start();
                        Outcome::Ok(Body::Vm(self.vm_info(i)))
                    }
                    VmState::Running | VmState::Halted => {
                        err(ErrorCode::InvalidState, format!("VM {name} is already running"))
                    }
                    VmState::Stopped(_) => err(
                        ErrorCode::InvalidState,
                        format!("VM {name} has stopped and cannot run again: delete it and create it anew"),
                    ),
                }
            }
            Request::VmStop { name } => {
                let Some(i) = self.find(&name) else {
                    return Self::not_found(&name);
                };
                if let Some(e) = self.migrating_error(i) {
                    return e;
                }
                if self.vms[i].stop_reason().is_some() {
                    return err(
                        ErrorCode::InvalidState,
                        format!("VM {name} is already stopped"),
                    );
                }
                self.vms[i].stop(host, StopReason::Requested);
                self.release_lease(host, i);
                Outcome::Ok(Body::Vm(self.vm_info(i)))
            }
            Request::VmResume { name } => {
                let Some(i) = self.find(&name) else {
                    return Self::not_found(&name);
                };
                if let Some(e) = self.migrating_error(i) {
                    return e;
                }
                if self.vms[i].stop_reason().is_some() {
                    return err(ErrorCode::InvalidState, format!("VM {name} has stopped"));
                }
                if self.vms[i].lease_hold().is_some() {
                    return match self.acquire_lease(&*host, i, None) {
                        Ok(()) => {
                            self.vms[i].set_lease_hold(None);
                            host.console_write(&format!(
                                "vm {name} runs again: it holds its lease\n"
                            ));
                            Outcome::Ok(Body::Vm(self.vm_info(i)))
                        }
                        Err(e) => err(
                            ErrorCode::InvalidState,
                            format!("VM {name} stays paused: {e}"),
                        ),
                    };
                }
                match self.vms[i].retry_store_full(host) {
                    Ok(true) => Outcome::Ok(Body::Vm(self.vm_info(i))),
                    Ok(false) => err(
                        ErrorCode::InvalidState,
                        format!("VM {name} is not paused (nothing to resume)"),
                    ),
                    Err(why) => err(
                        ErrorCode::NoResources,
                        format!("VM {name} stays paused: its store is still full ({why}); free space on it or move the disk (vm move-storage)"),
                    ),
                }
            }
            Request::VmDelete { name } => {
                let Some(i) = self.find(&name) else {
                    return Self::not_found(&name);
                };
                if let Some(e) = self.migrating_error(i) {
                    return e;
                }
                if let Some(job) = self.storage_job(&name) {
                    return Outcome::Error(migrating(&name, job));
                }
                if self.vms[i].is_runnable() {
                    return err(
                        ErrorCode::InvalidState,
                        format!("VM {name} is running: stop it first"),
                    );
                }
                self.release_lease(host, i);
                let vm = self.vms.remove(i);
                // As Hyper-V's Remove-VM: the configuration goes, the
                // disks stay.
                let gone = vm.placement().and_then(|p| p.at.clone());
                vm.destroy();
                if let (Some(at), Some(files)) = (gone, self.files.as_deref()) {
                    if let Err(e) = files.remove(&at) {
                        host.console_write(&format!(
                            "vmm-service: VM {name}: cannot remove its configuration {at}: {e}\n"
                        ));
                    }
                }
                host.console_write(&format!("vmm-service: VM {name} deleted\n"));
                Outcome::Ok(Body::Done)
            }
            Request::VmConsole { name, lines } => {
                let Some(i) = self.find(&name) else {
                    return Self::not_found(&name);
                };
                let want = lines
                    .unwrap_or(CONSOLE_LINES_DEFAULT)
                    .min(CONSOLE_LINES_MAX) as usize;
                let all: Vec<&str> = self.vms[i].recent_lines().collect();
                let skip = all.len().saturating_sub(want);
                Outcome::Ok(Body::Console {
                    vm: name,
                    lines: all[skip..].iter().map(|s| String::from(*s)).collect(),
                })
            }
            Request::VmConsoleInput { name, text } => {
                let Some(i) = self.find(&name) else {
                    return Self::not_found(&name);
                };
                if let Some(e) = self.migrating_error(i) {
                    return e;
                }
                if self.vms[i].stop_reason().is_some() {
                    return err(ErrorCode::InvalidState, format!("VM {name} has stopped"));
                }
                if text.len() > CONSOLE_INPUT_MAX {
                    return err(
                        ErrorCode::InvalidArgument,
                        format!("console input is at most {CONSOLE_INPUT_MAX} bytes at a time"),
                    );
                }
                match self.vms[i].queue_console_input(text.as_bytes()) {
                    Ok(()) => Outcome::Ok(Body::Done),
                    Err(room) => err(
                        ErrorCode::NoResources,
                        format!(
                            "VM {name} has not read its earlier console input: room for {room} more bytes, {} offered",
                            text.len()
                        ),
                    ),
                }
            }
            Request::JobList => Outcome::Ok(Body::JobList {
                jobs: self.jobs.list(now),
            }),
            Request::JobShow { id } => match self.jobs.info(id, now) {
                Some(j) => Outcome::Ok(Body::Job(j)),
                None => err(ErrorCode::NotFound, format!("no job {id}")),
            },
            // Its files are moving: one migration at a time.
            Request::VmMove(VmMove { name, .. }) if self.storage_job(&name).is_some() => {
                Outcome::Error(migrating(&name, self.storage_job(&name).unwrap_or(0)))
            }
            Request::VmMove(m) => self.move_vm(host, m),
            r @ Request::VmMoveStorage { .. } => self.move_storage(host, r),
            Request::JobResolve { id, keep } => {
                let before = self.placements();
                let resolved =
                    self.migrations
                        .resolve(host, &mut self.vms, &mut self.jobs, id, keep);
                self.settle_placements(host, before);
                match resolved {
                    Ok(()) => match self.jobs.info(id, now) {
                        Some(j) => Outcome::Ok(Body::Job(j)),
                        None => Outcome::Ok(Body::Done),
                    },
                    Err(e) => Outcome::Error(e),
                }
            }
            Request::JobCancel { id } if self.migrations.owns(id) => {
                match self
                    .migrations
                    .cancel(host, &mut self.vms, &mut self.jobs, id)
                {
                    Ok(()) => match self.jobs.info(id, now) {
                        Some(j) => Outcome::Ok(Body::Job(j)),
                        None => Outcome::Ok(Body::Done),
                    },
                    Err(e) => Outcome::Error(e),
                }
            }
            Request::JobCancel { id } => match self.jobs.cancel(id, now) {
                Ok(()) => match self.jobs.info(id, now) {
                    Some(j) => Outcome::Ok(Body::Job(j)),
                    None => Outcome::Ok(Body::Done),
                },
                Err(JobError::NotFound) => err(ErrorCode::NotFound, format!("no job {id}")),
                Err(_) => err(
                    ErrorCode::InvalidState,
                    format!("job {id} has ended or cannot be cancelled"),
                ),
            },
            Request::HostGet => Outcome::Ok(Body::Host(self.jobs.settings())),
            Request::HostSet {
                max_live_migrations,
                max_storage_migrations,
            } => match self
                .jobs
                .set_limits(max_live_migrations, max_storage_migrations, now)
            {
                Ok(s) => Outcome::Ok(Body::Host(s)),
                Err(_) => err(
                    ErrorCode::InvalidArgument,
                    format!(
                        "limits are 1 to {} simultaneous migrations",
                        super::jobs::LIMIT_MAX
                    ),
                ),
            },
            Request::BenchLinkReceive { port, bytes } => {
                self.bench.receive(&mut self.jobs, host, port, bytes)
            }
            Request::BenchLinkSend {
                peer,
                port,
                bytes,
                frames,
            } => self
                .bench
                .send(&mut self.jobs, host, &peer, port, bytes, frames),
            Request::StoreList => Outcome::Ok(Body::StoreList {
                stores: self
                    .stores
                    .status()
                    .into_iter()
                    .map(|s| StoreInfo {
                        name: s.name,
                        tag: s.tag,
                        host_path: s.host_path,
                        total_bytes: s.total_bytes,
                        free_bytes: s.free_bytes,
                        used_bytes: s.used_bytes,
                        error: s.error,
                    })
                    .collect(),
            }),
            Request::StoreBench { store, mib, keep } => self.store_bench(host, &store, mib, keep),
        }
    }

    fn create(
        &mut self,
        host: &mut dyn Host,
        name: &str,
        memory_mib: u64,
        guest: Option<&str>,
        linux: Option<&LinuxBoot>,
    ) -> Outcome {
        if linux.is_some() && guest.is_some() {
            return err(
                ErrorCode::InvalidArgument,
                "a VM runs either Linux or a guest case: give linux or guest, not both",
            );
        }
        let guest = match linux {
            Some(_) => LINUX_GUEST,
            None => guest.unwrap_or(DEFAULT_GUEST),
        };
        if linux.is_none() && (guest.len() > GUEST_MAX || !GUESTS.contains(&guest)) {
            let shown: String = guest.chars().take(GUEST_MAX).collect();
            return err(
                ErrorCode::InvalidArgument,
                format!("unknown guest '{shown}'; guests: {}", GUESTS.join(", ")),
            );
        }
        if !(VM_MEMORY_MIB_MIN..=VM_MEMORY_MIB_MAX).contains(&memory_mib) {
            return err(
                ErrorCode::InvalidArgument,
                format!("memory must be {VM_MEMORY_MIB_MIN} to {VM_MEMORY_MIB_MAX} MiB"),
            );
        }
        if self.find(name).is_some() {
            return err(
                ErrorCode::AlreadyExists,
                format!("a VM named {name} exists"),
            );
        }
        if self.vms.len() >= VMS_MAX {
            return err(
                ErrorCode::NoResources,
                format!("this node holds at most {VMS_MAX} VMs"),
            );
        }
        let created = match linux {
            Some(l) => Self::create_linux(host, name, memory_mib, &l.append),
            None => Vm::create(
                host,
                name,
                memory_mib << 20,
                &self.image,
                &format!("case={guest}"),
            )
            .map_err(CreateError::Vm),
        };
        match created {
            Ok(mut vm) => {
                vm.set_label(guest);
                let boot = match linux {
                    Some(l) => vmconfig::Boot::Linux {
                        append: l.append.clone(),
                    },
                    None => vmconfig::Boot::Guest(guest.into()),
                };
                if let Err(e) = self.place_new(host, &mut vm, boot) {
                    vm.destroy();
                    return Outcome::Error(e);
                }
                self.vms.push(vm);
                host.console_write(&format!(
                    "vmm-service: VM {name} created ({memory_mib} MiB, guest {guest})\n"
                ));
                Outcome::Ok(Body::Vm(self.vm_info(self.vms.len() - 1)))
            }
            Err(CreateError::Vm(e)) => vm_error(e),
            Err(CreateError::Refused(e)) => Outcome::Error(e),
        }
    }

    /// Register the VM the configuration file at `path` describes, in
    /// place (Hyper-V's Import-VM -Register): created (off), its disks
    /// opened where the file names them, the file kept where it is and
    /// rewritten there on every change from now on. Refused: a VM of
    /// that name (or that id) here already, a file that is missing,
    /// unreadable or invalid, a disk missing or not a usable VHDX.
    ///
    /// The one entry point for registering a VM from its file (issue 14's
    /// shared-store moves use it): it takes no lease; a caller that
    /// shares the store with other nodes must own the VM's files first.
    pub fn import(&mut self, host: &mut dyn Host, path: &str) -> Outcome {
        let Some(files) = self.files.as_deref() else {
            return err(
                ErrorCode::Unsupported,
                "this node has no stores: it keeps VM configurations in memory and cannot import one",
            );
        };
        if let Err(e) = vmconfig::check_location(path) {
            return err(ErrorCode::InvalidArgument, e);
        }
        let store = path.split_once(':').map_or(path, |(s, _)| s);
        if !files.has_store(store) {
            return err(
                ErrorCode::InvalidArgument,
                format!("no store named '{store}' on this node"),
            );
        }
        if files.file_bytes(path).is_none() {
            return err(ErrorCode::NotFound, format!("no file at {path}"));
        }
        let cfg = match vmconfig::read(files, path) {
            Ok(c) => c,
            Err(e) => return err(ErrorCode::InvalidArgument, format!("cannot import: {e}")),
        };
        let name = cfg.name.clone();
        if self.find(&name).is_some() {
            return err(
                ErrorCode::AlreadyExists,
                format!("a VM named {name} is registered on this node already"),
            );
        }
        if let Some(v) = self
            .vms
            .iter()
            .find(|v| v.placement().is_some_and(|p| p.id == cfg.id))
        {
            return err(
                ErrorCode::AlreadyExists,
                format!("VM {} here has the id {} already", v.name(), cfg.id),
            );
        }
        if self.vms.len() >= VMS_MAX {
            return err(
                ErrorCode::NoResources,
                format!("this node holds at most {VMS_MAX} VMs"),
            );
        }
        for (slot, d) in cfg.disks.iter().enumerate() {
            if files.file_bytes(&d.location).is_none() {
                return err(
                    ErrorCode::NotFound,
                    format!(
                        "cannot import {name}: its disk {slot} is missing ({} is not there)",
                        d.location
                    ),
                );
            }
        }
        let (guest, linux) = match &cfg.boot {
            vmconfig::Boot::Guest(g) => (Some(g.as_str()), None),
            vmconfig::Boot::Linux { append } => (
                None,
                Some(LinuxBoot {
                    append: append.clone(),
                }),
            ),
        };
        if let Some(g) = guest {
            if !GUESTS.contains(&g) {
                return err(
                    ErrorCode::InvalidArgument,
                    format!("cannot import {name}: this node has no guest '{g}'"),
                );
            }
        }
        let created = match &linux {
            Some(l) => Self::create_linux(host, &name, cfg.memory_mib, &l.append),
            None => Vm::create(
                host,
                &name,
                cfg.memory_mib << 20,
                &self.image,
                &format!("case={}", guest.unwrap_or(DEFAULT_GUEST)),
            )
            .map_err(CreateError::Vm),
        };
        let mut vm = match created {
            Ok(vm) => vm,
            Err(CreateError::Vm(e)) => return vm_error(e),
            Err(CreateError::Refused(e)) => return Outcome::Error(e),
        };
        vm.set_label(guest.unwrap_or(LINUX_GUEST));
        for (slot, d) in cfg.disks.iter().enumerate() {
            let mut seed = [0u8; 8];
            host.entropy(&mut seed);
            let seed = u64::from_le_bytes(seed);
            let attached = match &d.checkpoint {
                Some(c) => crate::checkpoint::attach_chain(&mut vm, files, &d.location, c, seed),
                None => crate::disks::attach_existing(&mut vm, files, &d.location, seed),
            };
            if let Err(e) = attached {
                vm.destroy();
                return err(
                    ErrorCode::InvalidArgument,
                    format!("cannot import {name}: disk {slot}: {e}"),
                );
            }
        }
        vm.set_placement(Some(vmconfig::Placement {
            id: cfg.id,
            at: Some(path.into()),
            snapshots: cfg.snapshots,
            boot: cfg.boot,
        }));
        host.console_write(&format!(
            "vmm-service: VM {name} imported from {path} (id {}, {} MiB, {} disks)\n",
            cfg.id,
            cfg.memory_mib,
            cfg.disks.len()
        ));
        self.vms.push(vm);
        Outcome::Ok(Body::Vm(self.vm_info(self.vms.len() - 1)))
    }

    /// Give a new VM its identity and configuration file
    /// (`STORE:vms/VM/VM.vmcfg` on the node's default store), written
    /// now; a node without stores keeps VM configurations in memory. A
    /// file already there is never replaced: it may describe a VM this
    /// node or another registered before (import it instead).
    fn place_new(
        &mut self,
        host: &mut dyn Host,
        vm: &mut Vm,
        boot: vmconfig::Boot,
    ) -> Result<(), ApiError> {
        let Some(files) = self.files.as_deref() else {
            return Ok(());
        };
        let Some(store) = files.default_store() else {
            return Ok(());
        };
        let at = vmconfig::default_location(&store, vm.name());
        if files.file_bytes(&at).is_some() {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "a VM configuration exists at {at}: register that VM with `vm import {at}`, or remove the file"
                ),
            ));
        }
        vm.set_placement(Some(vmconfig::Placement {
            id: vmconfig::new_id(host),
            at: Some(at.clone()),
            snapshots: vmconfig::default_snapshots(&store, vm.name()),
            boot,
        }));
        vmconfig::save(vm, files).map_err(|e| {
            ApiError::new(
                ErrorCode::NoResources,
                format!("cannot write the VM's configuration {at}: {e}"),
            )
        })
    }

    /// A Linux VM from the kernel and initramfs the node was given as
    /// boot modules 1 and 2 (`qemu-runner cluster up` passes them).
    fn create_linux(
        host: &mut dyn Host,
        name: &str,
        memory_mib: u64,
        append: &str,
    ) -> Result<Vm, CreateError> {
        if append.len() > APPEND_MAX || append.chars().any(char::is_control) {
            return Err(CreateError::Refused(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("--append: at most {APPEND_MAX} printable characters"),
            )));
        }
        // Copied: the VM's creation borrows the host mutably.
        let (Some(kernel), Some(initrd)) = (
            host.module(LINUX_KERNEL_MODULE).map(<[u8]>::to_vec),
            host.module(LINUX_INITRD_MODULE).map(<[u8]>::to_vec),
        ) else {
            return Err(CreateError::Refused(ApiError::new(
                ErrorCode::Unsupported,
                "this node has no Linux image: it boots with Debian's kernel and the runner's initramfs as boot modules 1 and 2 (`qemu-runner cluster up` passes them when it could build the image)",
            )));
        };
        Vm::create_linux(host, name, memory_mib << 20, &kernel, &initrd, append)
            .map_err(CreateError::Vm)
    }
}

/// Why [`Managed::create`] made no VM.
enum CreateError {
    Vm(VmError),
    /// Refused before a VM was attempted.
    Refused(ApiError),
}
#[cfg(test)]
mod tests {
    use super::super::proto::{JobKind, JobState};
    use super::super::rig::{Rig, KEY};
    use super::*;
    use crate::testing::printer;
    use alloc::vec;

    fn code(o: &Outcome) -> Option<ErrorCode> {
        match o {
            Outcome::Error(e) => Some(e.code),
            Outcome::Ok(_) => None,
        }
    }

    fn create(name: &str, mib: u64, guest: Option<&str>) -> Request {
        Request::VmCreate {
            name: name.into(),
            memory_mib: mib,
            guest: guest.map(Into::into),
            linux: None,
        }
    }

    #[test]
    fn every_vm_operation_over_the_wire() {
        let mut r = Rig::new();
        let (s, mut c, ok) = r.connect(KEY, 1);
        ok.unwrap();
        let Outcome::Ok(Body::NodeInfo(info)) = r.call(s, &mut c, Request::NodeInfo) else {
            panic!()
        };
        assert_eq!(
            (info.name.as_str(), info.cpu_vendor.as_str(), info.cpus),
            ("a", "amd", 2)
        );
        assert_eq!(info.memory_total_bytes, 1 << 30);
        assert_eq!(info.mgmt_addr, "10.0.2.15/24");
        assert_eq!(info.protocol_version, PROTOCOL_VERSION);

        r.host
            .programs
            .push_back(printer("heartbeat 1\nheartbeat 2\n"));
        let o = r.call(s, &mut c, create("web", 8, None));
        let Outcome::Ok(Body::Vm(vm)) = o else {
            panic!("{o:?}")
        };
        assert_eq!(
            (vm.state.as_str(), vm.guest.as_str(), vm.memory_mib),
            ("created", "heartbeat", 8)
        );
        assert_eq!(
            code(&r.call(s, &mut c, create("web", 8, None))),
            Some(ErrorCode::AlreadyExists)
        );
        assert_eq!(
            code(&r.call(s, &mut c, create("x", 8, Some("rm-rf")))),
            Some(ErrorCode::InvalidArgument)
        );
        assert_eq!(
            code(&r.call(s, &mut c, create("x", 1 << 20, None))),
            Some(ErrorCode::InvalidArgument)
        );
        assert_eq!(
            code(&r.call(s, &mut c, create("Bad!", 8, None))),
            Some(ErrorCode::InvalidArgument)
        );
        r.host.fail_create = true;
        assert_eq!(
            code(&r.call(s, &mut c, create("x", 8, None))),
            Some(ErrorCode::Unsupported)
        );
        r.host.fail_create = false;

        let o = r.call(s, &mut c, Request::VmStart { name: "web".into() });
        assert!(
            matches!(&o, Outcome::Ok(Body::Vm(v)) if v.state == "running"),
            "{o:?}"
        );
        assert_eq!(
            code(&r.call(s, &mut c, Request::VmStart { name: "web".into() })),
            Some(ErrorCode::InvalidState)
        );
        assert_eq!(
            code(&r.call(s, &mut c, Request::VmDelete { name: "web".into() })),
            Some(ErrorCode::InvalidState)
        );
        // The VM runs between rounds; its console lines are kept.
        let deadline = r.host.now_ns() + 50_000_000;
        r.node.run_vms(&mut r.host, deadline);
        let o = r.call(
            s,
            &mut c,
            Request::VmConsole {
                name: "web".into(),
                lines: Some(1),
            },
        );
        assert_eq!(
            o,
            Outcome::Ok(Body::Console {
                vm: "web".into(),
                lines: vec!["heartbeat 1 … 2".into()]
            })
        );
        let Outcome::Ok(Body::VmList { vms }) = r.call(s, &mut c, Request::VmList) else {
            panic!()
        };
        assert_eq!(vms.len(), 1);
        assert_eq!(
            vms[0].state, "stopped",
            "the printer guest reports ok after printing"
        );
        assert_eq!(vms[0].console_lines, 2);
        assert_eq!(
            code(&r.call(s, &mut c, Request::VmStop { name: "web".into() })),
            Some(ErrorCode::InvalidState)
        );
        assert_eq!(
            code(&r.call(
                s,
                &mut c,
                Request::VmConsoleInput {
                    name: "web".into(),
                    text: "ls\n".into()
                }
            )),
            Some(ErrorCode::InvalidState),
            "a stopped VM reads no input"
        );
        assert_eq!(
            code(&r.call(s, &mut c, Request::VmStart { name: "web".into() })),
            Some(ErrorCode::InvalidState)
        );
        assert_eq!(
            r.call(s, &mut c, Request::VmDelete { name: "web".into() }),
            Outcome::Ok(Body::Done)
        );
        assert_eq!(r.host.dropped.get(), 1, "memory returned");

        // Stop a running VM.
        r.call(s, &mut c, create("spin", 8, Some("dirty-demo")));
        r.call(
            s,
            &mut c,
            Request::VmStart {
                name: "spin".into(),
            },
        );
        // Console input: queued whole up to CONSOLE_INPUT_MAX bytes.
        let input = |text: String| Request::VmConsoleInput {
            name: "spin".into(),
            text,
        };
        assert_eq!(
            code(&r.call(s, &mut c, input("x".repeat(CONSOLE_INPUT_MAX + 1)))),
            Some(ErrorCode::InvalidArgument)
        );
        assert_eq!(
            r.call(s, &mut c, input("x".repeat(1000))),
            Outcome::Ok(Body::Done)
        );
        let o = r.call(s, &mut c, input("y".repeat(100)));
        assert!(
            matches!(&o, Outcome::Error(e) if e.code == ErrorCode::NoResources
                && e.message.contains("room for 24 more bytes")),
            "{o:?}"
        );
        assert_eq!(
            r.call(s, &mut c, input("y".repeat(24))),
            Outcome::Ok(Body::Done)
        );
        let o = r.call(
            s,
            &mut c,
            Request::VmStop {
                name: "spin".into(),
            },
        );
        assert!(
            matches!(&o, Outcome::Ok(Body::Vm(v)) if v.state == "stopped"
            && v.stop_reason.as_deref() == Some("stopped by the service")),
            "{o:?}"
        );
        for op in [
            Request::VmStart {
                name: "nope".into(),
            },
            Request::VmStop {
                name: "nope".into(),
            },
            Request::VmDelete {
                name: "nope".into(),
            },
            Request::VmConsole {
                name: "nope".into(),
                lines: None,
            },
            Request::VmConsoleInput {
                name: "nope".into(),
                text: "ls\n".into(),
            },
            Request::JobCancel { id: 5 },
        ] {
            assert_eq!(code(&r.call(s, &mut c, op)), Some(ErrorCode::NotFound));
        }
    }

    fn create_linux(name: &str, append: &str) -> Request {
        Request::VmCreate {
            name: name.into(),
            memory_mib: 64,
            guest: None,
            linux: Some(LinuxBoot {
                append: append.into(),
            }),
        }
    }

    /// `vm create --linux` boots the node's Linux image (boot modules 1
    /// and 2) with the user's arguments; a node without one says so.
    #[test]
    fn linux_vms_are_created_from_the_nodes_image() {
        use crate::loader::bzimage::test_image;
        use crate::loader::linux::LINUX_CMDLINE_GPA;
        let mut r = Rig::new();
        let (s, mut c, ok) = r.connect(KEY, 1);
        ok.unwrap();
        let o = r.call(s, &mut c, create_linux("lx", ""));
        let Outcome::Error(e) = o else {
            panic!("{o:?}")
        };
        assert_eq!(e.code, ErrorCode::Unsupported);
        assert!(e.message.contains("no Linux image"), "{}", e.message);

        r.host.more_modules = vec![test_image(b"\xf4"), b"initramfs".to_vec()];
        let both = Request::VmCreate {
            name: "lx".into(),
            memory_mib: 64,
            guest: Some("hello".into()),
            linux: Some(LinuxBoot::default()),
        };
        assert_eq!(
            code(&r.call(s, &mut c, both)),
            Some(ErrorCode::InvalidArgument)
        );
        let long = "x".repeat(APPEND_MAX + 1);
        assert_eq!(
            code(&r.call(s, &mut c, create_linux("lx", &long))),
            Some(ErrorCode::InvalidArgument)
        );
        assert_eq!(
            code(&r.call(s, &mut c, create_linux("lx", "a\nb"))),
            Some(ErrorCode::InvalidArgument)
        );
        let o = r.call(s, &mut c, create_linux("lx", "hvmigrate.ticks=1 quiet"));
        let Outcome::Ok(Body::Vm(vm)) = o else {
            panic!("{o:?}")
        };
        assert_eq!(
            (vm.state.as_str(), vm.guest.as_str(), vm.memory_mib),
            ("created", LINUX_GUEST, 64)
        );
        // The kernel's command line: the node's arguments, then the user's.
        let mut line = [0u8; 128];
        r.node.vms_mut()[0]
            .partition()
            .memory()
            .read(hvcore::addr::Gpa(LINUX_CMDLINE_GPA), &mut line)
            .unwrap();
        let end = line.iter().position(|&b| b == 0).unwrap();
        let line = core::str::from_utf8(&line[..end]).unwrap();
        assert!(
            line.starts_with("console=ttyS0") && line.ends_with(" hvmigrate.ticks=1 quiet"),
            "{line}"
        );
        assert!(r
            .host
            .console
            .contains("VM lx created (64 MiB, guest linux)"));
    }

    #[test]
    fn disks_are_created_and_listed_over_the_wire() {
        let mut r = Rig::new();
        let (s, mut c, ok) = r.connect(KEY, 1);
        ok.unwrap();
        let disk = |size_mib, store: Option<&str>| Request::VmDiskCreate {
            name: "d".into(),
            size_mib,
            store: store.map(Into::into),
            fixed: None,
        };
        assert_eq!(
            code(&r.call(s, &mut c, disk(4, None))),
            Some(ErrorCode::NotFound)
        );
        r.call(s, &mut c, create("d", 8, Some("disk-verify")));
        let o = r.call(s, &mut c, disk(4, None));
        let Outcome::Ok(Body::Disks { vm, disks, .. }) = o else {
            panic!("{o:?}")
        };
        assert_eq!(vm, "d");
        assert_eq!(disks.len(), 1);
        let d = &disks[0];
        assert_eq!(
            (
                d.slot,
                d.location.as_str(),
                d.kind.as_str(),
                d.virtual_bytes
            ),
            (0, "memory:d-0.vhdx", "dynamic", 4 << 20)
        );
        let empty_file = d.file_bytes;
        assert!(empty_file > 0);
        let o = r.call(
            s,
            &mut c,
            Request::VmDiskCreate {
                name: "d".into(),
                size_mib: 2,
                store: None,
                fixed: Some(true),
            },
        );
        let Outcome::Ok(Body::Disks { disks, .. }) = o else {
            panic!("{o:?}")
        };
        assert_eq!(disks[1].kind, "fixed");
        assert!(
            disks[1].file_bytes >= empty_file + (2 << 20),
            "a fixed disk is allocated"
        );
        for bad in [disk(0, None), disk(1 << 20, None), disk(4, Some("nowhere"))] {
            assert_eq!(
                code(&r.call(s, &mut c, bad)),
                Some(ErrorCode::InvalidArgument)
            );
        }
        let o = r.call(s, &mut c, Request::VmDiskList { name: "d".into() });
        let Outcome::Ok(Body::Disks { disks, .. }) = o else {
            panic!("{o:?}")
        };
        assert_eq!(disks.len(), 2);
        r.host.programs.push_back(printer("x\n"));
        r.call(s, &mut c, Request::VmStart { name: "d".into() });
        assert_eq!(
            code(&r.call(s, &mut c, disk(4, None))),
            Some(ErrorCode::InvalidState)
        );
    }

    /// vm-move-storage over the wire: a disk on store `local` moves to
    /// `shared` as a job (percent of allocated bytes, the new location
    /// listed, the source file gone); refusals name why.
    #[test]
    fn storage_migration_over_the_wire() {
        use crate::storage_migration::testing::MemFiles;
        let mut r = Rig::new();
        let (s, mut c, ok) = r.connect(KEY, 1);
        ok.unwrap();
        let mv = |name: &str, to: Option<&str>| Request::VmMoveStorage {
            name: name.into(),
            to: to.map(Into::into),
            vhd: Vec::new(),
            config: None,
            snapshots: None,
            keep_source: None,
            bandwidth_mib_s: None,
        };
        r.call(s, &mut c, create("d", 8, Some("disk-verify")));
        r.call(
            s,
            &mut c,
            Request::VmDiskCreate {
                name: "d".into(),
                size_mib: 4,
                store: None,
                fixed: None,
            },
        );
        assert_eq!(
            code(&r.call(s, &mut c, mv("d", Some("shared")))),
            Some(ErrorCode::Unsupported),
            "no stores"
        );
        r.call(s, &mut c, Request::VmDelete { name: "d".into() });
        let files = MemFiles::new(64 << 20);
        r.node.set_file_store(alloc::boxed::Box::new(files.clone()));
        for vm in ["d", "e"] {
            r.call(s, &mut c, create(vm, 8, Some("disk-verify")));
            let o = r.call(
                s,
                &mut c,
                Request::VmDiskCreate {
                    name: vm.into(),
                    size_mib: 4,
                    store: None,
                    fixed: None,
                },
            );
            let Outcome::Ok(Body::Disks { disks, .. }) = o else {
                panic!("{o:?}")
            };
            assert_eq!(disks[0].location, format!("local:vms/{vm}/{vm}-0.vhdx"));
        }
        assert_eq!(
            files.names(),
            [
                "local:vms/d/d-0.vhdx",
                "local:vms/d/d.vmcfg",
                "local:vms/e/e-0.vhdx",
                "local:vms/e/e.vmcfg"
            ]
        );
        r.call(
            s,
            &mut c,
            Request::HostSet {
                max_live_migrations: None,
                max_storage_migrations: Some(1),
            },
        );
        let too_fast = Request::VmMoveStorage {
            name: "d".into(),
            to: Some("shared".into()),
            vhd: Vec::new(),
            config: None,
            snapshots: None,
            keep_source: None,
            bandwidth_mib_s: Some(BANDWIDTH_MIB_S_MAX + 1),
        };
        for bad in [
            mv("d", None),
            mv("d", Some("nowhere")),
            mv("d", Some("local:vms/d")),
            too_fast,
        ] {
            assert_eq!(
                code(&r.call(s, &mut c, bad)),
                Some(ErrorCode::InvalidArgument)
            );
        }
        let Outcome::Ok(Body::Job(j1)) = r.call(s, &mut c, mv("d", Some("shared:moved"))) else {
            panic!()
        };
        assert_eq!(
            (j1.kind, j1.state),
            (JobKind::StorageMigration, JobState::Running)
        );
        // (The rig's clock stands still, so the job runs to its end within
        // the node's round; JobTable's own tests cover queueing.)
        let Outcome::Ok(Body::Job(j)) = r.call(s, &mut c, Request::JobShow { id: j1.id }) else {
            panic!()
        };
        assert_eq!((j.state, j.percent), (JobState::Completed, 100), "{j:?}");
        assert_eq!(
            j.bytes_done, j.bytes_total,
            "an empty disk: nothing allocated to copy"
        );
        let o = r.call(s, &mut c, Request::VmDiskList { name: "d".into() });
        let Outcome::Ok(Body::Disks { disks, .. }) = o else {
            panic!("{o:?}")
        };
        assert_eq!(disks[0].location, "shared:moved/d-0.vhdx");
        assert!(disks[0].file_bytes > 0);
        assert_eq!(
            files.names(),
            [
                "local:vms/e/e-0.vhdx",
                "local:vms/e/e.vmcfg",
                "shared:moved/d-0.vhdx",
                "shared:moved/d.vmcfg"
            ],
            "the sources are gone; the configuration moved with the disk"
        );
        // Moved again, keeping the source this time; the VM is not
        // migrating any more.
        let o = r.call(
            s,
            &mut c,
            Request::VmMoveStorage {
                name: "d".into(),
                to: None,
                vhd: vec!["0=local:back.vhdx".into()],
                config: None,
                snapshots: None,
                keep_source: Some(true),
                bandwidth_mib_s: None,
            },
        );
        assert!(matches!(o, Outcome::Ok(Body::Job(_))), "{o:?}");
        r.node.drive_jobs(&mut r.host);
        assert_eq!(
            files.names(),
            [
                "local:back.vhdx",
                "local:vms/e/e-0.vhdx",
                "local:vms/e/e.vmcfg",
                "shared:moved/d-0.vhdx",
                "shared:moved/d.vmcfg"
            ]
        );
        let cfg = crate::vmconfig::read(&files, "shared:moved/d.vmcfg").unwrap();
        assert_eq!(cfg.disks[0].location, "local:back.vhdx");
    }

    /// A VM whose disk's store fills: `vm list` says `paused` with the
    /// reason `store full` (JSON too), other VMs run on; `vm resume` while
    /// the store is still full is refused and leaves it paused; the node's
    /// own retry (a second later) resumes it once space returns, and `vm
    /// resume` does at once after a second stall.
    #[test]
    fn a_full_store_pauses_the_vm_until_space_returns() {
        use crate::devices::acpi::VirtioMmioSlot;
        use crate::devices::virtio_blk::{test_driver, S_OK};
        use crate::testing::RoomFile;
        let mut r = Rig::new();
        let (s, mut c, ok) = r.connect(KEY, 1);
        ok.unwrap();
        for vm in ["d", "other"] {
            r.call(s, &mut c, create(vm, 8, Some("disk-verify")));
        }
        r.call(
            s,
            &mut c,
            Request::VmDiskCreate {
                name: "d".into(),
                size_mib: 4,
                store: None,
                fixed: None,
            },
        );
        for vm in ["d", "other"] {
            r.call(s, &mut c, Request::VmStart { name: vm.into() });
        }
        // The disk's file lives on a store the test fills and frees.
        let (file, room) = RoomFile::new();
        let params = vstorage::vhdx::CreateParams {
            block_size: 1 << 20,
            ..vstorage::vhdx::CreateParams::dynamic(4 << 20)
        };
        let disk = vstorage::vhdx::create(file, &params).unwrap();
        let full_at = vstorage::BlockIo::len(disk.io()).unwrap();
        room.set(full_at);
        let vm = &mut r.node.vms_mut()[0];
        vm.replace_disk(0, alloc::boxed::Box::new(disk));
        let base = VirtioMmioSlot::standard(0).base;
        let (devices, mem) = vm.devices_and_memory();
        let mut w = |off: u64, val: u32| devices.mmio_write(0, base + off, &val.to_le_bytes());
        test_driver::init(&mut w);
        test_driver::submit_write(mem, &mut w, 0, 0, &[0x5a; 512]);
        let list = |r: &mut Rig, c: &mut hvmgmt::client::ClientConn| {
            let Outcome::Ok(Body::VmList { vms }) = r.call(s, c, Request::VmList) else {
                panic!()
            };
            vms
        };
        let soon = r.host.now_ns() + 1_000_000;
        r.node.run_vms(&mut r.host, soon);
        let vms = list(&mut r, &mut c);
        assert_eq!(
            (vms[0].state.as_str(), vms[0].pause_reason.as_deref()),
            ("paused", Some("store full"))
        );
        assert!(vms[0].pause_detail.as_deref().unwrap().contains("disk 0"));
        assert_eq!(
            (vms[1].state.as_str(), vms[1].pause_reason.as_deref()),
            ("running", None)
        );
        let json = serde_json::to_string(&vms[0]).unwrap();
        assert!(json.contains(r#""pause_reason":"store full""#), "{json}");
        let exits = r.node.vms()[1].counters().exits;
        let soon = r.host.now_ns() + 1_000_000;
        r.node.run_vms(&mut r.host, soon);
        assert!(
            r.node.vms()[1].counters().exits > exits,
            "the other VM runs"
        );
        let resume = Request::VmResume { name: "d".into() };
        let o = r.call(s, &mut c, resume.clone());
        assert_eq!(code(&o), Some(ErrorCode::NoResources));
        let Outcome::Error(e) = o else { panic!() };
        assert!(e.message.contains("still full"), "{}", e.message);
        assert_eq!(list(&mut r, &mut c)[0].state, "paused");
        // Space returns: the node's retry, a second later, resumes it.
        room.set(u64::MAX);
        r.node.drive_jobs(&mut r.host);
        let (_, mem) = r.node.vms_mut()[0].devices_and_memory();
        assert_eq!(test_driver::completed(mem).0, 0, "not before its time");
        r.advance(crate::vm::STORE_FULL_RETRY_NS);
        r.node.drive_jobs(&mut r.host);
        let vms = list(&mut r, &mut c);
        assert_eq!(
            (vms[0].state.as_str(), vms[0].pause_reason.as_deref()),
            ("running", None)
        );
        let (devices, mem) = r.node.vms_mut()[0].devices_and_memory();
        assert_eq!(test_driver::completed(mem), (1, S_OK));
        // A second stall, ended by vm resume at once.
        room.set(full_at + (1 << 20));
        let mut w = |off: u64, val: u32| devices.mmio_write(0, base + off, &val.to_le_bytes());
        test_driver::submit_write(mem, &mut w, 1, 4 << 10, &[0x6b; 4096]);
        let soon = r.host.now_ns() + 1_000_000;
        r.node.run_vms(&mut r.host, soon);
        assert_eq!(list(&mut r, &mut c)[0].state, "paused");
        room.set(u64::MAX);
        let o = r.call(s, &mut c, resume.clone());
        let Outcome::Ok(Body::Vm(v)) = o else {
            panic!("{o:?}")
        };
        assert_eq!((v.state.as_str(), v.pause_reason), ("running", None));
        let (_, mem) = r.node.vms_mut()[0].devices_and_memory();
        assert_eq!(test_driver::completed(mem), (2, S_OK));
        assert_eq!(
            code(&r.call(s, &mut c, resume)),
            Some(ErrorCode::InvalidState)
        );
        let mut back = [0u8; 4096];
        r.node.vms_mut()[0]
            .disk_mut(0)
            .unwrap()
            .read(2 << 20, &mut back)
            .unwrap();
        assert_eq!(back, [0x6b; 4096]);
    }

    #[test]
    fn the_vm_table_is_bounded() {
        let mut r = Rig::new();
        for i in 0..VMS_MAX {
            let o = r
                .node
                .handle(&mut r.host, create(&format!("v{i}"), 4, None));
            assert!(matches!(o, Outcome::Ok(_)), "{o:?}");
        }
        let o = r.node.handle(&mut r.host, create("one-more", 4, None));
        assert_eq!(code(&o), Some(ErrorCode::NoResources));
    }

    #[test]
    fn host_settings_and_jobs_over_the_wire() {
        let mut r = Rig::new();
        let (s, mut c, ok) = r.connect(KEY, 2);
        ok.unwrap();
        assert_eq!(
            r.call(s, &mut c, Request::HostGet),
            Outcome::Ok(Body::Host(super::super::jobs::DEFAULT_SETTINGS))
        );
        let o = r.call(
            s,
            &mut c,
            Request::HostSet {
                max_live_migrations: Some(1),
                max_storage_migrations: None,
            },
        );
        let Outcome::Ok(Body::Host(h)) = o else {
            panic!()
        };
        assert_eq!((h.max_live_migrations, h.max_storage_migrations), (1, 2));
        let bad = Request::HostSet {
            max_live_migrations: Some(0),
            max_storage_migrations: Some(99),
        };
        assert_eq!(
            code(&r.call(s, &mut c, bad)),
            Some(ErrorCode::InvalidArgument)
        );
        // Two live migrations under a limit of one: the second queues.
        let now = r.host.now_ns();
        let a = r
            .node
            .jobs()
            .submit(JobKind::LiveMigration, "v1", 100, true, now)
            .unwrap();
        let b = r
            .node
            .jobs()
            .submit(JobKind::LiveMigration, "v2", 100, true, now)
            .unwrap();
        r.node.jobs().progress(a, 50, None);
        let Outcome::Ok(Body::JobList { jobs }) = r.call(s, &mut c, Request::JobList) else {
            panic!()
        };
        assert_eq!(jobs.len(), 2);
        assert_eq!(
            (jobs[0].state, jobs[0].percent, jobs[0].vm.as_str()),
            (JobState::Running, 50, "v1")
        );
        assert_eq!(jobs[1].state, JobState::Queued);
        let o = r.call(s, &mut c, Request::JobCancel { id: a });
        assert!(matches!(&o, Outcome::Ok(Body::Job(j)) if j.state == JobState::Cancelled));
        assert_eq!(
            r.node.jobs().state(b),
            Some(JobState::Running),
            "the queued job started"
        );
        assert_eq!(
            code(&r.call(s, &mut c, Request::JobCancel { id: a })),
            Some(ErrorCode::InvalidState)
        );
    }
}
