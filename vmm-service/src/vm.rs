//! A VM and its worker: lifecycle, exit loop, device models, hypercalls.
//!
//! Lifecycle: `Created` (kernel loaded, start state built) -> `Running` <->
//! `Halted` (idle for the rest of a slice) -> `Stopped(reason)`. Apart from
//! the state, a live migration can *pause* a VM ([`Vm::pause`]): it is not
//! runnable until [`Vm::resume`], whatever its state. A disk whose store is
//! full pauses it too, for its own reason ([`Vm::store_full`]): the guest's
//! request waits in its ring, unanswered, and [`Vm::retry_store_full`]
//! (the node, every [`STORE_FULL_RETRY_NS`], or `vm resume`) serves it
//! again; the VM runs on once it succeeds. The two pauses are independent:
//! a migration's resume does not end a store-full pause. A stopped VM
//! never runs again; dropping the [`Vm`] drops its partition, which returns
//! its memory to the host. Every stop prints one console line, `vm NAME
//! stopped: REASON`.
//!
//! The dirty log has one owner at a time: the guest's test hypercalls, or
//! a live migration, which claims it with [`Vm::claim_dirty_log`] and
//! returns it with [`Vm::release_dirty_log`]; in between the guest's
//! dirty-log calls are refused (`HC_ERR_BUSY`, counted in
//! [`VmCounters::dirty_log_refused`]), so a guest cannot reset, steal from
//! or stop the log its own migration depends on.
//!
//! The exit loop ([`Vm::run_slice`]) is the hot path: it allocates nothing,
//! formats nothing and reads the clock only on preemption and every
//! [`CLOCK_CHECK_EXITS`] exits. Console lines and stop reports are formatted
//! only when they happen.

use crate::devices::exits::{self as device_exits, MmioError};
use crate::devices::{acpi, Devices, Machine};
use crate::hypercall::{self, DirtyCheck, DirtyLogOwner, Effect};
use crate::loader::linux::{self, LinuxLoadError};
use crate::loader::{self, LoadError, LoadedKernel};
use crate::start::{self, StartError};
use crate::uart::LineSink;
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use core::fmt::{self, Write as _};
use hvcore::abi::{HC_MIGRATION_STATUS, HC_NOP};
use hvcore::exit::{self, Handled, StopReason as ExitStop};
use hvcore::host::{DirtyMode, Host, HostError, Partition};
use hvcore::vcpu::IoDir;
use vstorage::VirtualDisk;

/// Exits between two clock reads when the guest is not preempted.
pub const CLOCK_CHECK_EXITS: u32 = 256;
/// Console lines each VM remembers (for node-side checks).
pub const RECENT_LINES: usize = 32;
/// Console input waiting for the guest to read it (`vm console --send`):
/// the most bytes a VM holds back.
pub use hvmgmt::proto::CONSOLE_INPUT_MAX;
/// Longest VM name.
pub const NAME_MAX: usize = 32;

const RFLAGS_IF: u64 = 1 << 9;

/// Host time between the node's automatic retries of a VM paused because
/// its store is full.
pub const STORE_FULL_RETRY_NS: u64 = 1_000_000_000;

/// A VM held back because a disk's store is full: the guest's request
/// waits in its ring (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreFull {
    /// The disk's virtio slot.
    pub slot: u8,
    /// The store's error on the last try.
    pub detail: String,
    /// Host time of the pause.
    pub since_ns: u64,
    /// Host time of the next automatic retry.
    pub next_retry_ns: u64,
    /// Retries that found the store still full.
    pub retries: u64,
}

/// Why a VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest reported success (`HC_TEST_RESULT` 0) with this message.
    GuestOk(String),
    /// The guest reported failure (`HC_TEST_RESULT` 1) with this message.
    GuestFailed(String),
    /// The hypervisor's exit handling stopped it: triple fault, entry
    /// failure, an exit it cannot decode, a bad nested access
    /// (`hvcore::exit::StopReason`).
    Exit(ExitStop),
    /// HLT with RFLAGS.IF = 0: nothing can ever wake the vCPU.
    HaltedInterruptsDisabled,
    /// The service stopped it (end of a demo or benchmark, node shutdown).
    Requested,
    /// It ran past its time limit.
    Timeout,
    /// The guest broke the hypervisor's protocol in a way it cannot recover
    /// from.
    ProtocolViolation(&'static str),
    /// An MMIO access could not be emulated.
    Mmio(MmioError),
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::GuestOk(m) if m.is_empty() => write!(f, "guest reported ok"),
            StopReason::GuestOk(m) => write!(f, "guest reported ok: {m}"),
            StopReason::GuestFailed(m) => write!(f, "guest reported failure: {m}"),
            StopReason::Exit(stop) => write!(f, "{stop}"),
            StopReason::HaltedInterruptsDisabled => write!(f, "halted with interrupts disabled"),
            StopReason::Requested => write!(f, "stopped by the service"),
            StopReason::Timeout => write!(f, "timeout"),
            StopReason::ProtocolViolation(what) => write!(f, "guest protocol violation: {what}"),
            StopReason::Mmio(e) => write!(f, "{e}"),
        }
    }
}

/// Where a VM is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Loaded, not started.
    Created,
    /// Runnable.
    Running,
    /// Executed HLT with interrupts enabled: idle until its next slice
    /// (there are no virtual interrupts yet, so HLT is a yield).
    Halted,
    /// Will never run again.
    Stopped(StopReason),
}

/// Why a VM could not be created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmError {
    /// The name is empty, too long, or has characters other than
    /// `[a-z0-9-]`.
    BadName,
    /// The platform could not create the partition.
    Host(HostError),
    /// The kernel image could not be loaded.
    Load(LoadError),
    /// The Linux kernel or initramfs could not be loaded.
    Linux(LinuxLoadError),
    /// The start state could not be built.
    Start(StartError),
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmError::BadName => {
                write!(
                    f,
                    "VM names are 1 to {NAME_MAX} characters of a-z, 0-9 and '-'"
                )
            }
            VmError::Host(e) => write!(f, "{e}"),
            VmError::Load(e) => write!(f, "guest kernel: {e}"),
            VmError::Linux(e) => write!(f, "{e}"),
            VmError::Start(e) => write!(f, "{e}"),
        }
    }
}

/// How a slice ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceEnd {
    /// The slice's time ran out.
    Expired,
    /// The guest halted (idle) before the slice ended.
    Idle,
    /// The VM stopped.
    Stopped,
    /// The VM was not runnable.
    NotRunnable,
}

/// Counters kept by the worker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmCounters {
    /// Exits seen by the service.
    pub exits: u64,
    /// Hypercalls handled.
    pub hypercalls: u64,
    /// `HC_PROGRESS` reports.
    pub progress_reports: u64,
    /// Last `HC_PROGRESS` counter.
    pub last_progress: u64,
    /// Slices given to this VM.
    pub slices: u64,
    /// Console lines emitted.
    pub console_lines: u64,
    /// Dirty-log hypercalls refused because a migration owned the log.
    pub dirty_log_refused: u64,
}

/// Live migrations of one VM as its guest sees them (`HC_MIGRATION_STATUS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrationCounters {
    /// Migrations that switched the VM over (it now runs on their
    /// destination).
    pub completed: u64,
    /// Migrations that failed or were cancelled (the VM stayed here).
    pub failed: u64,
}

/// A live migration moving a VM (the migration jobs set and clear it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrationMark {
    /// The job (either end).
    pub job: u64,
    /// This VM is the destination's copy, filled by the migration.
    pub incoming: bool,
}

/// The node-side bookkeeping of a VM that travels with a live migration:
/// what `HC_MIGRATION_STATUS` reports and the console history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bookkeeping {
    pub migrations: MigrationCounters,
    /// The last console lines, oldest first (at most [`RECENT_LINES`]).
    pub console: alloc::vec::Vec<String>,
    /// The worker's counters (exits, console lines, refused dirty-log
    /// calls, ...): they describe the VM, not the node that ran it.
    pub counters: VmCounters,
    /// Console input the guest has not read yet (at most
    /// [`CONSOLE_INPUT_MAX`] bytes): it moves with the VM.
    pub console_input: alloc::vec::Vec<u8>,
}

/// One VM.
pub struct Vm {
    name: String,
    /// What runs in it (the guest case), for listings.
    label: String,
    /// Share of its time the scheduler holds it back (live migration's
    /// auto-converge), and until when it is held after its last slice.
    throttle_pct: u8,
    held_until_ns: u64,
    migration: Option<MigrationMark>,
    partition: Box<dyn Partition>,
    devices: Devices,
    state: VmState,
    /// Paused by a live migration: not runnable until resumed.
    paused: bool,
    /// Paused because a disk's store is full.
    store_full: Option<StoreFull>,
    /// Console input COM1's receive FIFO has not taken yet.
    console_queue: VecDeque<u8>,
    /// Paused because this node may not write the VM's disks on a shared
    /// store (its lease is lost or not yet held): why, for `vm list`.
    lease_hold: Option<String>,
    /// The VM's lease on the shared store its disks are on, if any
    /// (`crate::lease::vms`).
    lease: Option<crate::lease::vms::VmLease>,
    /// Open while this node may write the VM's disks on a shared store:
    /// their files' writes go through it (`crate::lease::vms::GatedIo`).
    disk_gate: crate::lease::vms::WriteGate,
    /// Who drives the partition's dirty log.
    dirty_log_owner: DirtyLogOwner,
    migrations: MigrationCounters,
    counters: VmCounters,
    recent: VecDeque<String>,
    /// Reused buffer for console lines.
    line_buf: String,
    /// The disks behind its virtio-blk devices (index = virtio slot).
    disks: alloc::vec::Vec<Box<dyn VirtualDisk>>,
    /// What the node knows of each (same index).
    disk_meta: alloc::vec::Vec<crate::disks::DiskMeta>,
    /// Its identity and configuration file (a node with stores keeps
    /// one; `crate::vmconfig`), else `None`.
    placement: Option<crate::vmconfig::Placement>,
    /// What it brought of its configuration when it arrived by live
    /// migration (until the node gives it a placement).
    carried: Option<crate::vmconfig::Carried>,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.name)
            .field("state", &self.state)
            .field("counters", &self.counters)
            .finish()
    }
}

impl Vm {
    /// Create VM `name` with `ram_bytes` of RAM, load `image` (an ELF
    /// kernel) and build its start state with guest command line `cmdline`.
    pub fn create(
        host: &mut dyn Host,
        name: &str,
        ram_bytes: u64,
        image: &[u8],
        cmdline: &str,
    ) -> Result<Self, VmError> {
        if !name_ok(name) {
            return Err(VmError::BadName);
        }
        // Check the image before asking for memory.
        loader::check(image, ram_bytes).map_err(VmError::Load)?;
        let mut partition = host.create_partition(ram_bytes).map_err(VmError::Host)?;
        let kernel: LoadedKernel =
            loader::load(image, partition.memory()).map_err(VmError::Load)?;
        let entry = start::build(partition.memory(), &kernel, cmdline).map_err(VmError::Start)?;
        partition.vcpu().reset_long_mode(&entry);
        Ok(Self::with_partition(name, partition))
    }

    /// Create VM `name` on the PC machine with `ram_bytes` of RAM running
    /// the Linux bzImage `image` with initramfs `initrd` and kernel
    /// arguments `args` (after `console=ttyS0` and the TSC rate,
    /// [`linux::kernel_cmdline`]).
    pub fn create_linux(
        host: &mut dyn Host,
        name: &str,
        ram_bytes: u64,
        image: &[u8],
        initrd: &[u8],
        args: &str,
    ) -> Result<Self, VmError> {
        if !name_ok(name) {
            return Err(VmError::BadName);
        }
        let khz = host.tsc_khz();
        let cmdline = linux::kernel_cmdline(args, (khz > 0).then_some(khz));
        linux::check(image, ram_bytes, initrd.len() as u64, &cmdline).map_err(VmError::Linux)?;
        let mut partition = host.create_partition(ram_bytes).map_err(VmError::Host)?;
        let boot = linux::load(partition.memory(), image, initrd, &cmdline, &[])
            .map_err(VmError::Linux)?;
        partition.vcpu().reset_long_mode(&boot.entry);
        let mut vm = Self::with_partition(name, partition);
        vm.devices = Devices::pc(host.wall_clock_ns());
        Ok(vm)
    }

    /// An empty VM `name` with `ram_bytes` of zeroed RAM and a vCPU in its
    /// reset state, nothing loaded: the destination of a live migration,
    /// filled by it. It stays `Created` (not runnable) until started.
    pub fn create_empty(host: &mut dyn Host, name: &str, ram_bytes: u64) -> Result<Self, VmError> {
        if !name_ok(name) {
            return Err(VmError::BadName);
        }
        let partition = host.create_partition(ram_bytes).map_err(VmError::Host)?;
        Ok(Self::with_partition(name, partition))
    }

    fn with_partition(name: &str, partition: Box<dyn Partition>) -> Self {
        Self {
            name: name.into(),
            label: String::new(),
            throttle_pct: 0,
            held_until_ns: 0,
            migration: None,
            partition,
            devices: Devices::new(),
            state: VmState::Created,
            paused: false,
            store_full: None,
            console_queue: VecDeque::new(),
            lease_hold: None,
            lease: None,
            disk_gate: crate::lease::vms::WriteGate::default(),
            dirty_log_owner: DirtyLogOwner::Guest,
            migrations: MigrationCounters::default(),
            counters: VmCounters::default(),
            recent: VecDeque::new(),
            line_buf: String::new(),
            disks: alloc::vec::Vec::new(),
            disk_meta: alloc::vec::Vec::new(),
            placement: None,
            carried: None,
        }
    }

    /// Give the VM `disk` as its next virtio-blk device (before it starts;
    /// the guest sees it at the next virtio-mmio slot). Returns the slot,
    /// or `None` when every slot is taken.
    pub fn attach_disk(
        &mut self,
        disk: Box<dyn VirtualDisk>,
        meta: crate::disks::DiskMeta,
    ) -> Option<u8> {
        if self.devices.machine() == Machine::Pc {
            // A PC guest (Linux) finds virtio-mmio devices only in the
            // ACPI tables, which the loader wrote before any disk was
            // attached: write them again describing the slots with this
            // one (the RSDP stays at the tables' start, where the zero
            // page points). Not started yet: the guest has not read them.
            let mut slots = self.devices.virtio_slots();
            if slots.len() >= acpi::MAX_VIRTIO_MMIO {
                return None;
            }
            slots.push(acpi::VirtioMmioSlot::standard(slots.len() as u8));
            self.write_acpi_tables(&slots).ok()?;
        }
        let Some(slot) = self.devices.add_virtio_blk(disk.virtual_size(), false) else {
            if self.devices.machine() == Machine::Pc {
                let _ = self.write_acpi_tables(&self.devices.virtio_slots());
            }
            return None;
        };
        self.disks.push(disk);
        self.disk_meta.push(meta);
        Some(slot)
    }
    /// Write the PC machine's ACPI tables describing virtio `slots`.
    fn write_acpi_tables(
        &mut self,
        slots: &[acpi::VirtioMmioSlot],
    ) -> Result<(), hvcore::mem::MemError> {
        let tables = acpi::build(acpi::ACPI_TABLES_GPA, slots);
        self.partition
            .memory()
            .write(hvcore::addr::Gpa(tables.base_gpa), &tables.bytes)
    }
    /// How many disks it has.
    pub fn disk_count(&self) -> usize {
        self.disks.len()
    }
    /// What the node knows of its disks (index = slot).
    pub fn disk_meta(&self) -> &[crate::disks::DiskMeta] {
        &self.disk_meta
    }
    /// Its disks' metadata, to change (storage migration moves files).
    pub fn disk_meta_mut(&mut self) -> &mut [crate::disks::DiskMeta] {
        &mut self.disk_meta
    }
    /// The disk behind virtio slot `slot`.
    pub fn disk_mut(&mut self, slot: u8) -> Option<&mut (dyn VirtualDisk + 'static)> {
        self.disks.get_mut(usize::from(slot)).map(|d| &mut **d)
    }
    /// Replace the disk behind `slot` (storage migration's switch of the
    /// VM's I/O); returns the old one.
    pub fn replace_disk(
        &mut self,
        slot: u8,
        disk: Box<dyn VirtualDisk>,
    ) -> Option<Box<dyn VirtualDisk>> {
        let d = self.disks.get_mut(usize::from(slot))?;
        Some(core::mem::replace(d, disk))
    }
    /// Take over `source`'s disks (and what the node knows of them): a
    /// move within the node, at the destination's resume, when the source
    /// is paused past its commit point and never runs again. The device
    /// state came through the stream; the storage behind it is the same.
    pub fn adopt_disks(&mut self, source: &mut Vm) {
        (self.disks, self.disk_meta) = source.take_disks();
        // The lease and the gate its files write through go with them.
        self.lease = source.lease.take();
        self.disk_gate = source.disk_gate.clone();
        self.lease_hold = source.lease_hold.take();
        // The same VM on the same node: the same identity and file.
        if self.placement.is_none() {
            self.placement = source.placement.take();
        }
    }
    /// Its identity and configuration file, if the node keeps one.
    pub fn placement(&self) -> Option<&crate::vmconfig::Placement> {
        self.placement.as_ref()
    }
    /// The same, to change (a storage migration moves the file).
    pub fn placement_mut(&mut self) -> Option<&mut crate::vmconfig::Placement> {
        self.placement.as_mut()
    }
    /// Give it an identity and configuration file (create, import).
    pub fn set_placement(&mut self, placement: Option<crate::vmconfig::Placement>) {
        self.placement = placement;
    }
    /// What it brought of its configuration, if it arrived by live
    /// migration from a node that sent it.
    pub fn carried(&self) -> Option<&crate::vmconfig::Carried> {
        self.carried.as_ref()
    }
    /// Set what it brought (the destination of a live migration).
    pub fn set_carried(&mut self, carried: Option<crate::vmconfig::Carried>) {
        self.carried = carried;
    }
    /// Take every disk (the VM is about to be destroyed).
    pub fn take_disks(
        &mut self,
    ) -> (
        alloc::vec::Vec<Box<dyn VirtualDisk>>,
        alloc::vec::Vec<crate::disks::DiskMeta>,
    ) {
        (
            core::mem::take(&mut self.disks),
            core::mem::take(&mut self.disk_meta),
        )
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// What runs in it (the guest case), as the management API lists it.
    pub fn label(&self) -> &str {
        &self.label
    }
    /// Set the label.
    pub fn set_label(&mut self, label: &str) {
        self.label = label.into();
    }
    /// The live migration moving it, if any.
    pub fn migration_mark(&self) -> Option<MigrationMark> {
        self.migration
    }
    /// Set or clear the live migration moving it.
    pub fn set_migration_mark(&mut self, mark: Option<MigrationMark>) {
        self.migration = mark;
    }
    /// Hold the VM back `pct` percent of the time (0 = none, at most 99):
    /// after a slice of `t` the scheduler skips it for `t * pct / (100 -
    /// pct)`.
    pub fn set_throttle(&mut self, pct: u8) {
        self.throttle_pct = pct.min(99);
        if self.throttle_pct == 0 {
            self.held_until_ns = 0;
        }
    }
    /// The throttle in percent.
    pub fn throttle(&self) -> u8 {
        self.throttle_pct
    }
    /// Whether the scheduler may give it a slice at `now_ns` (runnable and
    /// not held back by its throttle).
    pub fn runnable_at(&self, now_ns: u64) -> bool {
        self.is_runnable() && now_ns >= self.held_until_ns
    }
    /// Whether it is runnable but held back by its throttle at `now_ns`.
    pub fn is_held(&self, now_ns: u64) -> bool {
        self.is_runnable() && now_ns < self.held_until_ns
    }
    /// A slice ran from `start_ns` to `end_ns`: apply the throttle.
    pub fn note_slice(&mut self, start_ns: u64, end_ns: u64) {
        let pct = u64::from(self.throttle_pct);
        if pct > 0 {
            let ran = end_ns.saturating_sub(start_ns);
            self.held_until_ns = end_ns.saturating_add(ran.saturating_mul(pct) / (100 - pct));
        }
    }
    /// What travels with a live migration.
    pub fn bookkeeping(&self) -> Bookkeeping {
        Bookkeeping {
            migrations: self.migrations,
            console: self.recent.iter().cloned().collect(),
            counters: self.counters,
            console_input: self.console_queue.iter().copied().collect(),
        }
    }
    /// Take over `b` after a completed live migration into this VM: its
    /// console history and one more completed migration.
    pub fn adopt(&mut self, b: &Bookkeeping) {
        let keep = b.console.len().saturating_sub(RECENT_LINES);
        self.recent = b.console[keep..].iter().cloned().collect();
        self.console_queue = b
            .console_input
            .iter()
            .take(CONSOLE_INPUT_MAX)
            .copied()
            .collect();
        self.counters = b.counters;
        self.migrations = MigrationCounters {
            completed: b.migrations.completed.saturating_add(1),
            failed: b.migrations.failed,
        };
    }
    /// Its state.
    pub fn state(&self) -> &VmState {
        &self.state
    }
    /// Why it stopped, if it did.
    pub fn stop_reason(&self) -> Option<&StopReason> {
        match &self.state {
            VmState::Stopped(r) => Some(r),
            _ => None,
        }
    }
    /// Whether the scheduler should give it slices.
    pub fn is_runnable(&self) -> bool {
        !self.paused
            && self.store_full.is_none()
            && self.lease_hold.is_none()
            && matches!(self.state, VmState::Running | VmState::Halted)
    }
    /// Why it is held back besides a live migration: a disk's store is
    /// full.
    pub fn store_full(&self) -> Option<&StoreFull> {
        self.store_full.as_ref()
    }
    /// Whether the node should retry its store-full request at `now_ns`.
    pub fn store_full_retry_due(&self, now_ns: u64) -> bool {
        self.store_full
            .as_ref()
            .is_some_and(|f| now_ns >= f.next_retry_ns)
            && self.stop_reason().is_none()
    }
    /// Serve the request that waits for a full store again (the node's
    /// retry, or `vm resume`). `Ok(true)`: served, the VM runs on;
    /// `Ok(false)`: not paused for a full store; `Err(why)`: the store is
    /// still full (next automatic retry in [`STORE_FULL_RETRY_NS`]).
    pub fn retry_store_full(&mut self, host: &mut dyn Host) -> Result<bool, String> {
        let Some(mut full) = self.store_full.take() else {
            return Ok(false);
        };
        self.devices
            .process_virtio(self.partition.memory(), &mut self.disks);
        let now = host.now_ns();
        match self.devices.store_full() {
            None => {
                let waited_ms = now.saturating_sub(full.since_ns) / 1_000_000;
                host.console_write(&alloc::format!(
                    "vm {} resumed: its store has space again (paused {waited_ms} ms, {} retries)\n",
                    self.name, full.retries
                ));
                Ok(true)
            }
            Some((slot, why)) => {
                full.slot = slot;
                full.detail = why.into();
                full.retries += 1;
                full.next_retry_ns = now.saturating_add(STORE_FULL_RETRY_NS);
                let err = full.detail.clone();
                self.store_full = Some(full);
                Err(err)
            }
        }
    }
    /// A disk's request found its store full: hold the VM (once).
    fn note_store_full(&mut self, host: &mut dyn Host) {
        let Some((slot, why)) = self.devices.store_full() else {
            return;
        };
        if self.store_full.is_some() {
            return;
        }
        let now = host.now_ns();
        host.console_write(&alloc::format!(
            "vm {} paused: store full: disk {slot}: {why}\n",
            self.name
        ));
        self.store_full = Some(StoreFull {
            slot,
            detail: why.into(),
            since_ns: now,
            next_retry_ns: now.saturating_add(STORE_FULL_RETRY_NS),
            retries: 0,
        });
    }
    /// Why it is held back because this node may not write its disks
    /// (its lease), if it is.
    pub fn lease_hold(&self) -> Option<&str> {
        self.lease_hold.as_deref()
    }
    /// Hold it (`Some(why)`: fenced, its disk gate closed at once) or let
    /// it run again (`None`: the gate opens).
    pub fn set_lease_hold(&mut self, why: Option<String>) {
        match why {
            Some(_) => self.disk_gate.close(),
            None => self.disk_gate.open(),
        }
        self.lease_hold = why;
    }
    /// Its lease, if its disks are on a shared store.
    pub fn lease_mut(&mut self) -> &mut Option<crate::lease::vms::VmLease> {
        &mut self.lease
    }
    /// Its lease, to look at.
    pub fn lease(&self) -> Option<&crate::lease::vms::VmLease> {
        self.lease.as_ref()
    }
    /// The gate its shared-store disks write through.
    pub fn disk_gate(&self) -> &crate::lease::vms::WriteGate {
        &self.disk_gate
    }
    /// Give it disks opened for it elsewhere (a live migration's
    /// destination on a shared store: its devices came with the state).
    pub fn set_disks(
        &mut self,
        disks: alloc::vec::Vec<Box<dyn VirtualDisk>>,
        meta: alloc::vec::Vec<crate::disks::DiskMeta>,
    ) {
        self.disks = disks;
        self.disk_meta = meta;
    }
    /// Whether a live migration paused it.
    pub fn is_paused(&self) -> bool {
        self.paused
    }
    /// Stop giving it slices (live migration switch-over): its memory,
    /// vCPU and devices are frozen until [`Vm::resume`].
    pub fn pause(&mut self) {
        self.paused = true;
    }
    /// Runnable again after [`Vm::pause`] (a migration went back).
    pub fn resume(&mut self) {
        self.paused = false;
    }
    /// Its live migrations so far.
    pub fn migrations(&self) -> MigrationCounters {
        self.migrations
    }
    /// Count one more migration that failed or was cancelled.
    pub fn note_failed_migration(&mut self) {
        self.migrations.failed = self.migrations.failed.saturating_add(1);
    }
    /// Host console input for the guest's COM1 at the host's time now: how
    /// many bytes its receive FIFO took (offer the rest again later).
    pub fn console_input(&mut self, host: &dyn Host, bytes: &[u8]) -> usize {
        self.devices.console_input(host.now_ns(), bytes)
    }
    /// Queue console input (`vm console --send`): COM1's receive FIFO gets
    /// it as the guest reads, a FIFO's worth before each of the VM's
    /// slices. All or nothing: `Err(room)` when more than the `room` bytes
    /// still free of [`CONSOLE_INPUT_MAX`] were offered.
    pub fn queue_console_input(&mut self, bytes: &[u8]) -> Result<(), usize> {
        let room = CONSOLE_INPUT_MAX.saturating_sub(self.console_queue.len());
        if bytes.len() > room {
            return Err(room);
        }
        self.console_queue.extend(bytes);
        Ok(())
    }
    /// Bytes of queued console input the guest has not read yet.
    pub fn console_input_queued(&self) -> usize {
        self.console_queue.len()
    }
    /// Move queued console input into COM1's receive FIFO while it has room.
    fn feed_console(&mut self, now_ns: u64) {
        while !self.console_queue.is_empty() {
            let (front, _) = self.console_queue.as_slices();
            let offered = front.len();
            let n = self.devices.console_input(now_ns, front);
            self.console_queue.drain(..n);
            if n < offered {
                break;
            }
        }
    }
    /// Replace the device models (restored from a migration stream).
    pub fn set_devices(&mut self, devices: Devices) {
        self.devices = devices;
    }
    /// Worker counters.
    pub fn counters(&self) -> VmCounters {
        self.counters
    }
    /// The last [`RECENT_LINES`] console lines, oldest first.
    pub fn recent_lines(&self) -> impl Iterator<Item = &str> {
        self.recent.iter().map(String::as_str)
    }
    /// The partition (dirty log, statistics).
    pub fn partition(&mut self) -> &mut dyn Partition {
        &mut *self.partition
    }
    /// Guest RAM size in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.partition.ram_bytes()
    }
    /// Its devices.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }
    /// Its devices and memory, to play a guest driver (tests).
    #[cfg(test)]
    pub fn devices_and_memory(&mut self) -> (&mut Devices, &mut dyn hvcore::mem::GuestMemory) {
        (&mut self.devices, self.partition.memory())
    }

    /// Hand the dirty log to a live migration: start it in `mode` (whatever
    /// the guest had going is reset) and refuse the guest's dirty-log calls
    /// until [`Vm::release_dirty_log`].
    pub fn claim_dirty_log(&mut self, mode: DirtyMode) -> Result<(), HostError> {
        self.partition.enable_dirty_log(mode)?;
        self.dirty_log_owner = DirtyLogOwner::Migration;
        Ok(())
    }
    /// Collect-and-clear the dirty log into `bitmap` (the owner's call; see
    /// `Partition::collect_dirty`).
    pub fn collect_dirty(&mut self, bitmap: &mut [u64]) -> Result<u64, HostError> {
        self.partition.collect_dirty(bitmap)
    }
    /// The migration is done with the dirty log: stop it and give the
    /// guest its calls back.
    pub fn release_dirty_log(&mut self) {
        self.partition.disable_dirty_log();
        self.dirty_log_owner = DirtyLogOwner::Guest;
    }
    /// Who owns the dirty log now.
    pub fn dirty_log_owner(&self) -> DirtyLogOwner {
        self.dirty_log_owner
    }

    /// Destroy the VM: its partition is dropped, which returns guest memory
    /// and the nested page table to the host. Stop it first to have the
    /// reason reported.
    pub fn destroy(self) {
        drop(self);
    }

    /// Created -> Running. No effect in any other state.
    pub fn start(&mut self) {
        if self.state == VmState::Created {
            self.state = VmState::Running;
        }
    }

    /// Stop the VM for `reason` and report it on the console. A VM already
    /// stopped keeps its first reason.
    pub fn stop(&mut self, host: &mut dyn Host, reason: StopReason) {
        if matches!(self.state, VmState::Stopped(_)) {
            return;
        }
        let mut line = String::new();
        let _ = writeln!(line, "vm {} stopped: {reason}", self.name);
        host.console_write(&line);
        self.state = VmState::Stopped(reason);
    }

    /// Run the VM until `slice_end_ns` (host clock), until it halts, or
    /// until it stops.
    pub fn run_slice(&mut self, host: &mut dyn Host, slice_end_ns: u64) -> SliceEnd {
        if self.paused || self.store_full.is_some() || self.lease_hold.is_some() {
            return SliceEnd::NotRunnable;
        }
        if !self.console_queue.is_empty()
            && matches!(self.state, VmState::Running | VmState::Halted)
        {
            // Before the halted check: the input's interrupt wakes the guest.
            self.feed_console(host.now_ns());
        }
        match self.state {
            VmState::Running => {}
            VmState::Halted => {
                // A halted PC guest sleeps until a device interrupt.
                if self.devices.machine() == Machine::Pc && !self.wake(host, slice_end_ns) {
                    return SliceEnd::Idle;
                }
                self.state = VmState::Running;
            }
            _ => return SliceEnd::NotRunnable,
        }
        self.counters.slices += 1;
        // Requests a restored device found in its ring (one that waited
        // for a full store on the source of a live migration).
        if self.devices.virtio_pending() {
            self.devices
                .process_virtio(self.partition.memory(), &mut self.disks);
            if self.devices.store_full().is_some() {
                self.note_store_full(host);
                return SliceEnd::NotRunnable;
            }
        }
        let mut since_clock = 0u32;
        let pc = self.devices.machine() == Machine::Pc;
        loop {
            if pc {
                // Timers up to now, then the next event or its window.
                self.devices.advance(host.now_ns());
                device_exits::deliver(&mut self.devices, self.partition.vcpu());
            }
            let vm_exit = self.partition.run();
            self.counters.exits += 1;
            match exit::handle(vm_exit, self.partition.vcpu(), &*host) {
                Handled::Resume => {}
                Handled::Hypercall => {
                    self.counters.hypercalls += 1;
                    // The benchmark's call, without the general dispatch.
                    let vcpu = self.partition.vcpu();
                    let regs = vcpu.regs_mut();
                    if regs.rax == HC_NOP {
                        regs.rax = regs.rdi.wrapping_add(1);
                        vcpu.skip_instruction();
                    } else if regs.rax == HC_MIGRATION_STATUS {
                        // Node-side bookkeeping, not a partition matter.
                        regs.rax = self.migrations.completed;
                        regs.rdi = self.migrations.failed;
                        vcpu.skip_instruction();
                    } else if let Some(reason) = self.hypercall(host) {
                        self.stop(host, reason);
                        return SliceEnd::Stopped;
                    }
                }
                Handled::Io(io) => {
                    let vcpu = self.partition.vcpu();
                    match io.dir {
                        IoDir::In => {
                            let value = self.devices.io_in(io.port, io.size);
                            exit::complete_io_in(vcpu, io.size, value);
                        }
                        IoDir::Out => {
                            let value = exit::io_out_value(vcpu, io.size);
                            vcpu.skip_instruction();
                            let mut sink = ConsoleSink {
                                host: &mut *host,
                                name: &self.name,
                                buf: &mut self.line_buf,
                                recent: &mut self.recent,
                                count: &mut self.counters.console_lines,
                            };
                            self.devices.io_out(io.port, io.size, value, &mut sink);
                        }
                    }
                }
                Handled::Mmio { gpa, access } => {
                    // Nothing behind it on a machine without a PC platform
                    // and no virtio device there: the guest is broken.
                    if !pc && !self.devices.claims_mmio(gpa.as_u64()) {
                        let stop = ExitStop::BadNestedAccess { gpa, access };
                        self.stop(host, StopReason::Exit(stop));
                        return SliceEnd::Stopped;
                    }
                    let now = host.now_ns();
                    let r = device_exits::mmio(
                        &mut self.devices,
                        &mut *self.partition,
                        now,
                        gpa.as_u64(),
                    );
                    if let Err(e) = r {
                        self.stop(host, StopReason::Mmio(e));
                        return SliceEnd::Stopped;
                    }
                    // Serve what the access started (a virtio notify).
                    if self.devices.virtio_pending() {
                        self.devices
                            .process_virtio(self.partition.memory(), &mut self.disks);
                        if self.devices.store_full().is_some() {
                            self.note_store_full(host);
                            return SliceEnd::NotRunnable;
                        }
                    }
                }
                Handled::DeviceMsrRead { msr } => {
                    device_exits::msr_read(&self.devices, self.partition.vcpu(), msr);
                }
                Handled::DeviceMsrWrite { msr, value } => {
                    let (now, khz) = (host.now_ns(), host.tsc_khz());
                    let vcpu = self.partition.vcpu();
                    device_exits::msr_write(&mut self.devices, vcpu, now, msr, value, khz);
                }
                Handled::Halted => {
                    if self.partition.vcpu().regs().rflags & RFLAGS_IF == 0 {
                        self.stop(host, StopReason::HaltedInterruptsDisabled);
                        return SliceEnd::Stopped;
                    }
                    if pc && self.wake(host, slice_end_ns) {
                        continue;
                    }
                    self.state = VmState::Halted;
                    return SliceEnd::Idle;
                }
                Handled::Preempted => {
                    since_clock = 0;
                    if host.now_ns() >= slice_end_ns {
                        return SliceEnd::Expired;
                    }
                    continue;
                }
                Handled::Stop(stop) => {
                    self.stop(host, StopReason::Exit(stop));
                    return SliceEnd::Stopped;
                }
            }
            since_clock += 1;
            if since_clock >= CLOCK_CHECK_EXITS {
                since_clock = 0;
                if host.now_ns() >= slice_end_ns {
                    return SliceEnd::Expired;
                }
            }
        }
    }

    /// A PC guest halted with interrupts enabled: wait (node time) for its
    /// next device event if that comes before `slice_end_ns`. `true` when
    /// an interrupt is pending and the guest should run again now.
    fn wake(&mut self, host: &mut dyn Host, slice_end_ns: u64) -> bool {
        loop {
            let now = host.now_ns();
            self.devices.advance(now);
            if self.devices.interrupt_pending() {
                return true;
            }
            match self.devices.next_event_ns() {
                Some(t) if t < slice_end_ns && now < slice_end_ns => {
                    core::hint::spin_loop();
                }
                _ => return false,
            }
        }
    }

    /// The general hypercall path; `Some` stops the VM.
    fn hypercall(&mut self, host: &mut dyn Host) -> Option<StopReason> {
        match hypercall::dispatch(&mut *self.partition, self.dirty_log_owner) {
            Effect::None => None,
            Effect::Progress(counter) => {
                self.counters.progress_reports += 1;
                self.counters.last_progress = counter;
                None
            }
            Effect::TestResult { ok: true, message } => Some(StopReason::GuestOk(message)),
            Effect::TestResult { ok: false, message } => Some(StopReason::GuestFailed(message)),
            Effect::DirtyMismatch(check) => {
                self.report_dirty_mismatch(host, &check);
                None
            }
            Effect::DirtyLogBusy => {
                self.counters.dirty_log_refused += 1;
                None
            }
        }
    }

    fn report_dirty_mismatch(&mut self, host: &mut dyn Host, check: &DirtyCheck) {
        let mut line = String::new();
        let _ = write!(
            line,
            "vm {}: dirty-log check: {} frames differ ({} missing, {} extra; {} collected); first:",
            self.name,
            check.differing(),
            check.missing,
            check.extra,
            check.collected
        );
        for (gfn, missing) in &check.first {
            let kind = if *missing { "missing" } else { "extra" };
            let _ = write!(line, " {gfn:#x} ({kind})");
        }
        line.push('\n');
        host.console_write(&line);
    }
}

/// VM names: 1 to [`NAME_MAX`] characters of `[a-z0-9-]`.
pub(crate) fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Emits a VM's UART lines on the node console as `[NAME] line`.
struct ConsoleSink<'a> {
    host: &'a mut dyn Host,
    name: &'a str,
    buf: &'a mut String,
    recent: &'a mut VecDeque<String>,
    count: &'a mut u64,
}

impl LineSink for ConsoleSink<'_> {
    fn line(&mut self, line: &str) {
        self.buf.clear();
        self.buf.push('[');
        self.buf.push_str(self.name);
        self.buf.push_str("] ");
        self.buf.push_str(line);
        self.buf.push('\n');
        self.host.console_write(self.buf);
        *self.count += 1;
        keep_line(self.recent, line);
    }
}

/// The separator of a folded run of counting lines (`heartbeat 12 … 480`).
const FOLD: &str = " … ";

/// Keep `line` among the last [`RECENT_LINES`], folding a run of lines that
/// differ only in a trailing number, each one more than the last, into one
/// kept line updated in place: a guest that prints `heartbeat N` every 10 ms
/// would otherwise push its own reports out of the kept lines within a third
/// of a second (the node console still gets every line).
fn keep_line(recent: &mut VecDeque<String>, line: &str) {
    if let (Some(last), Some((prefix, n))) = (recent.back_mut(), counted(line)) {
        if let Some((run_prefix, first, end)) = run(last) {
            if run_prefix == prefix && end.checked_add(1) == Some(n) {
                *last = alloc::format!("{prefix} {first}{FOLD}{n}");
                return;
            }
        }
    }
    if recent.len() >= RECENT_LINES {
        recent.pop_front();
    }
    recent.push_back(line.into());
}

/// `"text N"` as `("text", N)`: a non-empty text, one space, decimal digits.
fn counted(line: &str) -> Option<(&str, u64)> {
    let (prefix, digits) = line.rsplit_once(' ')?;
    if prefix.is_empty() {
        return None;
    }
    Some((prefix, number(digits)?))
}

/// Plain decimal digits (no sign, no spaces) that fit a `u64`.
fn number(digits: &str) -> Option<u64> {
    let plain = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    plain.then(|| digits.parse().ok()).flatten()
}

/// A kept line as a run: `"text N"` is the run N..=N, `"text A … B"` A..=B.
fn run(kept: &str) -> Option<(&str, u64, u64)> {
    match kept.rsplit_once(FOLD) {
        Some((head, tail)) => {
            let (prefix, first) = counted(head)?;
            Some((prefix, first, number(tail)?))
        }
        None => counted(kept).map(|(prefix, n)| (prefix, n, n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::build::kernel;
    use crate::testing::{printer, FakeHost, FakeMemory, FakeVcpu};
    use hvcore::abi::{HC_MIGRATION_STATUS, HC_PROGRESS, HC_TEST_RESULT};
    use hvcore::addr::Gpa;
    use hvcore::mem::GuestMemory;
    use hvcore::vcpu::{Access, IoAccess, VmExit};

    fn vm(host: &mut FakeHost, name: &str) -> Vm {
        let mut v = Vm::create(host, name, 4 << 20, &kernel(), "case=x").unwrap();
        v.start();
        v
    }

    #[test]
    fn uart_lines_reach_the_console_with_prefix() {
        let mut host = FakeHost::new();
        host.programs
            .push_back(printer("Hello from the hvmigrate guest\r\nsecond\n"));
        let mut v = vm(&mut host, "hello");
        assert_eq!(v.run_slice(&mut host, u64::MAX), SliceEnd::Stopped);
        assert_eq!(
            host.lines(),
            [
                "[hello] Hello from the hvmigrate guest",
                "[hello] second",
                "vm hello stopped: guest reported ok",
            ]
        );
        assert_eq!(
            v.recent_lines().collect::<alloc::vec::Vec<_>>(),
            ["Hello from the hvmigrate guest", "second"]
        );
        assert_eq!(v.stop_reason(), Some(&StopReason::GuestOk(String::new())));
        assert!(!v.is_runnable());
        assert_eq!(v.run_slice(&mut host, u64::MAX), SliceEnd::NotRunnable);
    }

    fn kept(lines: &[&str]) -> Vec<String> {
        let mut recent = VecDeque::new();
        for l in lines {
            keep_line(&mut recent, l);
        }
        recent.into_iter().collect()
    }

    #[test]
    fn counting_runs_fold_into_one_kept_line() {
        let mut lines = vec!["busy-verify: 16 MiB"];
        let beats: Vec<String> = (1..=500).map(|n| format!("heartbeat {n}")).collect();
        lines.extend(beats[..300].iter().map(String::as_str));
        lines.push("busy-verify: migration 1 ok");
        lines.extend(beats[300..].iter().map(String::as_str));
        assert_eq!(
            kept(&lines),
            [
                "busy-verify: 16 MiB",
                "heartbeat 1 … 300",
                "busy-verify: migration 1 ok",
                "heartbeat 301 … 500",
            ]
        );
    }

    #[test]
    fn only_consecutive_numbers_with_the_same_text_fold() {
        assert_eq!(
            kept(&[
                "heartbeat 1",
                "heartbeat 3",
                "tick 4",
                "T:12 1796323507",
                "T:13 1796323508",
                "x 18446744073709551615",
                "x 0",
                "7",
                "8",
                "heartbeat 4",
                "heartbeat 5",
            ]),
            [
                "heartbeat 1",
                "heartbeat 3",
                "tick 4",
                "T:12 1796323507",
                "T:13 1796323508",
                "x 18446744073709551615",
                "x 0",
                "7",
                "8",
                "heartbeat 4 … 5",
            ]
        );
        // Never more than RECENT_LINES kept lines.
        let many: Vec<String> = (0..100).map(|n| format!("line {}", n * 2)).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let k = kept(&refs);
        assert_eq!(k.len(), RECENT_LINES);
        assert_eq!(k.last().map(String::as_str), Some("line 198"));
    }

    #[test]
    fn create_loads_and_resets_the_vcpu() {
        let mut host = FakeHost::new();
        let v = Vm::create(&mut host, "a", 4 << 20, &kernel(), "case=hello").unwrap();
        assert_eq!(v.state(), &VmState::Created);
        assert_eq!(host.created, [4 << 20]);
        assert_eq!(
            Vm::create(&mut host, "Bad Name", 4 << 20, &kernel(), "").unwrap_err(),
            VmError::BadName
        );
        assert!(matches!(
            Vm::create(&mut host, "a", 4 << 20, b"junk", ""),
            Err(VmError::Load(_))
        ));
        assert_eq!(
            host.created.len(),
            1,
            "bad image rejected before allocating"
        );
        assert!(matches!(
            Vm::create(&mut host, "a", 1 << 20, &kernel(), ""),
            Err(VmError::Load(LoadError::OutsideRam { .. }))
        ));
        host.fail_create = true;
        assert_eq!(
            Vm::create(&mut host, "a", 4 << 20, &kernel(), "").unwrap_err(),
            VmError::Host(HostError::NoVirtualization)
        );
        // Destroy returns the partition.
        v.destroy();
        assert_eq!(host.dropped.get(), 1);
    }

    /// Queued console input reaches the guest's COM1 receive register a
    /// FIFO's worth at a time as its slices run, is bounded, and moves
    /// with the VM's bookkeeping (a live migration's `Paused` message).
    #[test]
    fn queued_console_input_reaches_the_guest() {
        let mut host = FakeHost::new();
        let mut step = 0;
        let seen = alloc::rc::Rc::new(core::cell::RefCell::new(alloc::vec::Vec::new()));
        let seen2 = seen.clone();
        host.programs.push_back(alloc::boxed::Box::new(
            move |v: &mut FakeVcpu, _: &mut FakeMemory| {
                if step > 0 {
                    seen2.borrow_mut().push(v.regs.rax as u8);
                }
                step += 1;
                if step > 3 {
                    v.regs.rax = HC_TEST_RESULT;
                    v.regs.rdi = 0;
                    v.regs.rdx = 0;
                    return VmExit::Hypercall;
                }
                VmExit::Io(IoAccess {
                    port: 0x3f8,
                    size: 1,
                    dir: IoDir::In,
                    string: false,
                    rep: false,
                })
            },
        ));
        let mut v = vm(&mut host, "con");
        assert_eq!(
            v.queue_console_input(&[b'x'; CONSOLE_INPUT_MAX + 1]),
            Err(CONSOLE_INPUT_MAX)
        );
        assert_eq!(v.queue_console_input(b"ls\n"), Ok(()));
        assert_eq!(v.bookkeeping().console_input, b"ls\n");
        assert_eq!(v.console_input_queued(), 3);
        assert_eq!(v.run_slice(&mut host, u64::MAX), SliceEnd::Stopped);
        assert_eq!(*seen.borrow(), b"ls\n");
        assert_eq!(v.console_input_queued(), 0);
        // Input left waiting goes with the VM.
        v.queue_console_input(b"pwd\n").unwrap();
        let mut w = vm(&mut host, "dst");
        w.adopt(&v.bookkeeping());
        assert_eq!(w.console_input_queued(), 4);
        assert_eq!(w.bookkeeping().console_input, b"pwd\n");
    }

    /// A guest doing `in` from ports and recording RAX, then stopping.
    #[test]
    fn port_reads_go_to_devices() {
        let mut host = FakeHost::new();
        let mut step = 0;
        let seen = alloc::rc::Rc::new(core::cell::RefCell::new(alloc::vec::Vec::new()));
        let seen2 = seen.clone();
        host.programs.push_back(alloc::boxed::Box::new(
            move |v: &mut FakeVcpu, _: &mut FakeMemory| {
                if step > 0 {
                    seen2.borrow_mut().push(v.regs.rax);
                }
                step += 1;
                let port = match step {
                    1 => 0x3fd,
                    2 => 0x61,
                    3 => 0x80,
                    _ => {
                        v.regs.rax = HC_TEST_RESULT;
                        v.regs.rdi = 0;
                        v.regs.rdx = 0;
                        return VmExit::Hypercall;
                    }
                };
                v.regs.rax = 0x1234_5600;
                VmExit::Io(IoAccess {
                    port,
                    size: 1,
                    dir: IoDir::In,
                    string: false,
                    rep: false,
                })
            },
        ));
        let mut v = vm(&mut host, "io");
        v.run_slice(&mut host, u64::MAX);
        assert_eq!(*seen.borrow(), [0x1234_5660, 0x1234_56ff, 0x1234_56ff]);
        assert_eq!(v.devices().unclaimed_accesses, 1);
    }

    #[test]
    fn exits_that_stop_the_vm() {
        let cases: [(VmExit, u64, &str); 4] = [
            (VmExit::Shutdown, 0, "vm s stopped: triple fault (shutdown)"),
            (
                VmExit::Unknown { raw: 0x7f },
                0,
                "vm s stopped: unhandled exit code 0x7f",
            ),
            (
                VmExit::NestedFault {
                    gpa: Gpa(0x1_0000_0000),
                    access: Access {
                        write: true,
                        ..Access::default()
                    },
                },
                0,
                "vm s stopped: write to unmapped guest-physical memory at 0x100000000",
            ),
            (
                VmExit::Hlt,
                0,
                "vm s stopped: halted with interrupts disabled",
            ),
        ];
        for (exit, rflags, line) in cases {
            let mut host = FakeHost::new();
            host.programs.push_back(alloc::boxed::Box::new(
                move |v: &mut FakeVcpu, _: &mut FakeMemory| {
                    v.regs.rflags = rflags;
                    exit
                },
            ));
            let mut v = vm(&mut host, "s");
            assert_eq!(v.run_slice(&mut host, u64::MAX), SliceEnd::Stopped);
            assert_eq!(host.lines(), [line]);
            // A second stop keeps the first reason and prints nothing.
            v.stop(&mut host, StopReason::Requested);
            assert_eq!(host.lines().len(), 1);
        }
    }

    #[test]
    fn hlt_with_interrupts_enabled_yields() {
        let mut host = FakeHost::new();
        host.programs.push_back(alloc::boxed::Box::new(
            |v: &mut FakeVcpu, _: &mut FakeMemory| {
                v.regs.rflags = 0x202;
                VmExit::Hlt
            },
        ));
        let mut v = vm(&mut host, "idle");
        assert_eq!(v.run_slice(&mut host, u64::MAX), SliceEnd::Idle);
        assert_eq!(v.state(), &VmState::Halted);
        assert!(v.is_runnable());
        assert_eq!(v.run_slice(&mut host, u64::MAX), SliceEnd::Idle);
        assert_eq!(v.counters().slices, 2);
    }

    #[test]
    fn slice_ends_on_time_even_without_preemption() {
        let mut host = FakeHost::new();
        // NOP hypercalls only: the clock is read every CLOCK_CHECK_EXITS.
        host.programs.push_back(alloc::boxed::Box::new(
            |v: &mut FakeVcpu, _: &mut FakeMemory| {
                v.regs.rax = HC_NOP;
                VmExit::Hypercall
            },
        ));
        let mut v = vm(&mut host, "nop");
        let end = host.clock.get() + 100 * host.ns_per_run;
        assert_eq!(v.run_slice(&mut host, end), SliceEnd::Expired);
        assert_eq!(v.counters().hypercalls, u64::from(CLOCK_CHECK_EXITS));
        assert_eq!(v.counters().exits, v.counters().hypercalls);
    }

    #[test]
    fn migration_status_and_pause() {
        let mut host = FakeHost::new();
        let seen = alloc::rc::Rc::new(core::cell::Cell::new((0u64, 0u64)));
        let seen2 = seen.clone();
        let mut step = 0;
        host.programs.push_back(alloc::boxed::Box::new(
            move |v: &mut FakeVcpu, _: &mut FakeMemory| {
                if step > 0 {
                    seen2.set((v.regs.rax, v.regs.rdi));
                }
                step += 1;
                v.regs.rax = HC_MIGRATION_STATUS;
                VmExit::Hypercall
            },
        ));
        let mut v = vm(&mut host, "m");
        v.note_failed_migration();
        let end = host.clock.get() + 10 * host.ns_per_run;
        v.run_slice(&mut host, end);
        assert_eq!(seen.get(), (0, 1), "RAX completed, RDI failed");
        let mut d = Vm::create_empty(&mut host, "m", 4 << 20).unwrap();
        assert_eq!(d.state(), &VmState::Created);
        assert!(!d.is_runnable());
        d.adopt(&v.bookkeeping());
        assert_eq!(
            d.migrations(),
            MigrationCounters {
                completed: 1,
                failed: 1
            }
        );
        v.pause();
        assert!(!v.is_runnable() && v.is_paused());
        assert_eq!(v.run_slice(&mut host, u64::MAX), SliceEnd::NotRunnable);
        v.resume();
        assert!(v.is_runnable());
    }

    /// A disk whose store fills pauses its VM with the request unanswered
    /// (`store full`); a retry while it is still full keeps it paused;
    /// after space is freed the retry serves the write (acknowledged then,
    /// data on the disk) and the VM runs on. Other VMs are not held.
    #[test]
    fn a_full_store_pauses_the_vm_until_a_retry_succeeds() {
        use crate::devices::acpi::VirtioMmioSlot;
        use crate::devices::virtio_blk::{test_driver, S_OK};
        use crate::testing::RoomFile;
        use vstorage::vhdx::{self, CreateParams};
        let mut host = FakeHost::new();
        let mut v = vm(&mut host, "full");
        let other = vm(&mut host, "other");
        let (file, room) = RoomFile::new();
        let params = CreateParams {
            block_size: 1 << 20,
            ..CreateParams::dynamic(8 << 20)
        };
        let disk = vhdx::create(file, &params).unwrap();
        room.set(vstorage::BlockIo::len(disk.io()).unwrap());
        let meta = crate::disks::DiskMeta {
            backing: crate::disks::Backing::File {
                location: "local:full.vhdx".into(),
            },
            fixed: false,
            virtual_bytes: 8 << 20,
            block_bytes: 1 << 20,
            checkpoint: None,
        };
        assert_eq!(v.attach_disk(Box::new(disk), meta), Some(0));
        let base = VirtioMmioSlot::standard(0).base;
        let devices = &mut v.devices;
        let mut w = |off: u64, val: u32| devices.mmio_write(0, base + off, &val.to_le_bytes());
        test_driver::init(&mut w);
        let data: alloc::vec::Vec<u8> = (0..4096u32).map(|i| (i * 13) as u8).collect();
        test_driver::submit_write(v.partition.memory(), &mut w, 0, 8, &data);
        assert_eq!(v.run_slice(&mut host, u64::MAX), SliceEnd::NotRunnable);
        let full = v.store_full().expect("paused for a full store").clone();
        assert_eq!(full.slot, 0);
        assert!(full.detail.contains("store full"), "{}", full.detail);
        assert!(
            !v.is_runnable() && !v.is_paused(),
            "not a migration's pause"
        );
        assert!(other.is_runnable(), "other VMs are not held");
        assert!(host
            .lines()
            .iter()
            .any(|l| l.starts_with("vm full paused: store full: disk 0")));
        assert_eq!(test_driver::completed(v.partition.memory()).0, 0);
        // Not due yet; then due, and still full.
        assert!(!v.store_full_retry_due(full.since_ns));
        assert!(v.store_full_retry_due(full.since_ns + STORE_FULL_RETRY_NS));
        assert!(v.retry_store_full(&mut host).is_err());
        assert_eq!(v.store_full().unwrap().retries, 1);
        assert_eq!(test_driver::completed(v.partition.memory()), (0, 0xaa));
        assert_eq!(v.run_slice(&mut host, u64::MAX), SliceEnd::NotRunnable);
        // Space returns: the same write completes, acknowledged.
        room.set(u64::MAX);
        assert_eq!(v.retry_store_full(&mut host), Ok(true));
        assert!(v.store_full().is_none() && v.is_runnable());
        assert_eq!(test_driver::completed(v.partition.memory()), (1, S_OK));
        let mut back = alloc::vec![0u8; 4096];
        v.disk_mut(0).unwrap().read(8 * 512, &mut back).unwrap();
        assert_eq!(back, data);
        assert!(host
            .lines()
            .iter()
            .any(|l| l.starts_with("vm full resumed: its store has space again")));
        assert_eq!(v.retry_store_full(&mut host), Ok(false), "nothing waits");
    }

    /// A PC guest programs its local APIC timer through MMIO (emulated
    /// from the instruction bytes at RIP), then runs with interrupts off
    /// (a window is asked for, nothing injected), then opens the window:
    /// the timer's vector is injected exactly once, and TSC_DEADLINE reads
    /// back through the device models.
    #[test]
    fn pc_guest_takes_its_lapic_timer_interrupt() {
        use crate::loader::bzimage::test_image;
        use hvcore::msr::IA32_TSC_DEADLINE;
        let mut host = FakeHost::new();
        host.cpuid.tsc_khz = 1_000_000;
        let seen = alloc::rc::Rc::new(core::cell::RefCell::new(alloc::vec::Vec::new()));
        let seen2 = seen.clone();
        let mut step = 0;
        host.programs.push_back(alloc::boxed::Box::new(
            move |v: &mut FakeVcpu, m: &mut FakeMemory| {
                step += 1;
                // `mov [edi], eax` (89 07) at 0x1000, paging off.
                m.write(Gpa(0x1000), &[0x89, 0x07]).unwrap();
                let mmio_write = |v: &mut FakeVcpu, reg: u64, value: u64| {
                    v.regs.rip = 0x1000;
                    v.regs.rax = value;
                    VmExit::NestedFault {
                        gpa: Gpa(0xfee0_0000 + reg),
                        access: Access {
                            write: true,
                            ..Access::default()
                        },
                    }
                };
                match step {
                    1 => {
                        assert_eq!(v.regs.rip, 0x100_0200, "Linux entry");
                        assert_eq!(v.regs.rsi, 0x8000, "zero page");
                        mmio_write(v, 0xf0, 0x1ff) // SVR: enabled
                    }
                    2 => {
                        assert_eq!(v.regs.rip, 0x1002, "MMIO stepped over");
                        mmio_write(v, 0x320, 0x40) // LVT timer: one-shot, 0x40
                    }
                    3 => mmio_write(v, 0x380, 1), // initial count: fires now
                    4..=6 => {
                        // Interrupts off: nothing injected, a window asked.
                        v.regs.rflags = 2;
                        if step == 6 {
                            seen2.borrow_mut().push((v.interrupts.clone(), v.windows));
                        }
                        v.regs.rax = HC_NOP;
                        VmExit::Hypercall
                    }
                    7 => {
                        v.regs.rflags = 0x202;
                        VmExit::InterruptWindow
                    }
                    8 => {
                        seen2.borrow_mut().push((v.interrupts.clone(), v.windows));
                        v.regs.rcx = u64::from(IA32_TSC_DEADLINE);
                        VmExit::MsrRead {
                            msr: IA32_TSC_DEADLINE,
                        }
                    }
                    _ => {
                        seen2.borrow_mut().push((v.interrupts.clone(), v.windows));
                        assert_eq!(v.regs.rax, 0, "deadline 0 outside TSC-deadline mode");
                        assert!(v.injected.is_empty(), "no #GP: {:?}", v.injected);
                        v.regs.rax = HC_TEST_RESULT;
                        (v.regs.rdi, v.regs.rsi, v.regs.rdx) = (0, 0, 0);
                        VmExit::Hypercall
                    }
                }
            },
        ));
        let image = test_image(b"\xf4");
        let mut v = Vm::create_linux(&mut host, "lx", 64 << 20, &image, b"", "").unwrap();
        assert_eq!(v.devices().machine(), Machine::Pc);
        v.start();
        assert_eq!(v.run_slice(&mut host, u64::MAX), SliceEnd::Stopped);
        assert_eq!(v.stop_reason(), Some(&StopReason::GuestOk(String::new())));
        let seen = seen.borrow();
        assert_eq!(seen[0], (alloc::vec![], (true, false)), "blocked: window");
        assert_eq!(seen[1], (alloc::vec![0x40], (false, false)), "injected");
        assert_eq!(seen[2], (alloc::vec![0x40], (false, false)), "only once");
    }

    /// Disks attached to a Linux VM before it starts are described in its
    /// ACPI tables (Linux finds virtio-mmio devices nowhere else): the
    /// tables in guest memory are those built for every slot in use.
    #[test]
    fn disks_of_a_linux_vm_are_in_its_acpi_tables() {
        use crate::loader::bzimage::test_image;
        let mut host = FakeHost::new();
        let image = test_image(b"\xf4");
        let mut v = Vm::create_linux(&mut host, "lx", 64 << 20, &image, b"", "").unwrap();
        let read_tables = |v: &mut Vm, len: usize| {
            let mut got = alloc::vec![0u8; len];
            v.partition
                .memory()
                .read(hvcore::addr::Gpa(acpi::ACPI_TABLES_GPA), &mut got)
                .unwrap();
            got
        };
        let none = acpi::build(acpi::ACPI_TABLES_GPA, &[]);
        assert_eq!(read_tables(&mut v, none.bytes.len()), none.bytes);
        for n in 1..=2u8 {
            let (disk, file) = crate::disks::new_mem_vhdx(1 << 20).unwrap();
            let meta = crate::disks::DiskMeta {
                backing: crate::disks::Backing::Memory {
                    name: format!("lx-{n}.vhdx"),
                    file,
                },
                fixed: false,
                virtual_bytes: 1 << 20,
                block_bytes: crate::disks::MEM_BLOCK_BYTES,
                checkpoint: None,
            };
            assert_eq!(v.attach_disk(Box::new(disk), meta), Some(n - 1));
            let slots: alloc::vec::Vec<_> = (0..n).map(acpi::VirtioMmioSlot::standard).collect();
            let want = acpi::build(acpi::ACPI_TABLES_GPA, &slots);
            assert!(want.bytes.len() > none.bytes.len());
            assert_eq!(
                read_tables(&mut v, want.bytes.len()),
                want.bytes,
                "{n} disks"
            );
        }
    }

    /// MMIO on the minimal machine (no devices behind it) still stops the
    /// VM as an access to unmapped memory; an instruction the emulator
    /// cannot decode stops a PC guest with its bytes.
    #[test]
    fn mmio_that_cannot_be_emulated_stops_the_vm() {
        use crate::loader::bzimage::test_image;
        let mut host = FakeHost::new();
        host.programs.push_back(alloc::boxed::Box::new(
            |v: &mut FakeVcpu, m: &mut FakeMemory| {
                m.write(Gpa(0x1000), &[0x0f, 0x0b]).unwrap(); // ud2
                v.regs.rip = 0x1000;
                VmExit::NestedFault {
                    gpa: Gpa(0xfec0_0000),
                    access: Access::default(),
                }
            },
        ));
        let image = test_image(b"\xf4");
        let mut v = Vm::create_linux(&mut host, "lx", 64 << 20, &image, b"", "").unwrap();
        v.start();
        assert_eq!(v.run_slice(&mut host, u64::MAX), SliceEnd::Stopped);
        let line = host.lines().last().unwrap().to_string();
        assert!(
            line.starts_with("vm lx stopped: MMIO access to 0xfec00000: cannot emulate the instruction at RIP 0x1000")
                && line.contains("(opcode 0xf0b is not an emulated MMIO access); bytes 0f 0b "),
            "{line}"
        );
    }

    #[test]
    fn progress_is_counted() {
        let mut host = FakeHost::new();
        let mut i = 0;
        host.programs.push_back(alloc::boxed::Box::new(
            move |v: &mut FakeVcpu, _: &mut FakeMemory| {
                i += 1;
                v.regs.rax = HC_PROGRESS;
                v.regs.rdi = i;
                VmExit::Hypercall
            },
        ));
        let mut v = vm(&mut host, "p");
        let end = host.clock.get() + 1000 * host.ns_per_run;
        v.run_slice(&mut host, end);
        assert!(v.counters().progress_reports >= 1000);
        assert_eq!(v.counters().last_progress, v.counters().progress_reports);
    }
}
