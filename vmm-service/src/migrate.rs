//! Live migration within one node: a running [`Vm`] moves to a new VM on
//! the same node through an in-memory byte pipe ([`MemPipe`]) that carries
//! the real encoded migration stream, exactly as it would cross the wire.
//!
//! Parts:
//! * [`SourceVm`]: `migration::MigratableVm` over the running VM (pages
//!   through its `GuestMemory`; the dirty log claimed from the guest with
//!   [`Vm::claim_dirty_log`] for the whole migration, in the best mode the
//!   backend has: PML when `Vcpu::caps().pml`, else nested write
//!   protection; pause = not scheduled, throttle = a share of its time,
//!   vCPU state through `Vcpu::save_state`, device state through
//!   `Devices::save`);
//! * [`DestVm`]: `migration::DestinationVm` over an empty VM created before
//!   the migration with the same RAM size (MISSION "Live migration" step 1),
//!   not runnable until the receiver resumes it;
//! * [`migrate_local`]: the driver. The node has one CPU, so it interleaves
//!   bounded steps of both engines with time slices of the guest, which
//!   keeps running during pre-copy.
//!
//! Naming: the destination VM has the source VM's name, so the console
//! prefix `[NAME]` does not change; both exist only during the migration,
//! and only one of them is ever runnable.
//!
//! Invariants:
//! * the source VM is destroyed only after the destination resumed (the
//!   receiver resumes it on `go`, after the digest matched and all state
//!   was restored);
//! * any failure before that point discards the destination and leaves
//!   the source running with its memory untouched (the engine only reads
//!   it); the report says `failed` or `cancelled` with the reason;
//! * while the migration runs, the guest's dirty-log hypercalls are refused
//!   (`HC_ERR_BUSY`): the log belongs to the engine; with
//!   `Policy::verify_memory` (every test case sets it) a write the log
//!   missed anyway fails the migration at switch-over;
//! * both ends live on this node, so the protocol's "in doubt" case (link
//!   lost after `go`) is decided here: whichever side the receiver says
//!   runs, runs;
//! * one `migration-report {json}` line per migration on the node console.

use crate::devices::Devices;
use crate::vm::{SliceEnd, Vm};
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use hvcore::addr::Gpa;
use hvcore::host::{DirtyMode, Host};
use migration::{
    Clock, DestinationVm, DeviceDesc, DeviceState, DirtyBitmap, MemPipe, MigratableVm, Migration,
    MigrationReport, MigrationResult, Page, Policy, Progress, Receiver, RecvProgress, VcpuState,
    VmConfig, VmError, PAGE_SIZE,
};

/// `dirty_tracker` of the report: nested-page write protection.
pub const TRACKER_WRITE_PROTECT: &str = "write-protect";
/// `dirty_tracker` of the report: Intel page-modification logging.
pub const TRACKER_PML: &str = "pml";

/// Device kind of the port I/O bus state ([`Devices::save`]), the one
/// device record of our VMs.
pub const DEVICE_KIND_PORT_BUS: u16 = 1;
/// Guest time per turn while pre-copy runs (a turn ends at the first
/// timer exit after it, so it can run a tick longer).
pub const GUEST_SLICE_NS: u64 = 4_000_000;
/// Most engine time per turn before the guest runs again.
pub const ENGINE_SLICE_NS: u64 = 2_000_000;
/// Node time between two progress lines in the debug log.
const PROGRESS_LOG_NS: u64 = 1_000_000_000;
/// Receiver steps after the source finished, to let it see the end.
const DRAIN_STEPS: u32 = 10_000;

/// The source VM as the engine sees it. Shared with the driver, which runs
/// the guest between engine steps.
pub struct SourceVm {
    vm: Rc<RefCell<Vm>>,
    /// Throttle in percent (time the guest does not get).
    throttle: Rc<RefCell<u8>>,
    config: VmConfig,
}

/// The configuration record of one of our VMs: RAM, one vCPU, the port
/// bus. CPUID is not listed: both ends are this node, with one CPUID policy
/// (`hvcore::exit`).
pub fn vm_config(ram_bytes: u64) -> VmConfig {
    VmConfig {
        ram_bytes,
        vcpus: 1,
        devices: vec![DeviceDesc {
            kind: DEVICE_KIND_PORT_BUS,
            instance: 0,
            version: u32::from(Devices::SAVE_VERSION),
        }],
        cpuid: Vec::new(),
    }
}

impl MigratableVm for SourceVm {
    fn config(&self) -> VmConfig {
        self.config.clone()
    }

    fn read_page(&mut self, gfn: u64, buf: &mut Page) -> Result<(), VmError> {
        let gpa = gfn
            .checked_mul(PAGE_SIZE as u64)
            .ok_or(VmError::at("page outside guest RAM", gfn))?;
        let mut vm = self.vm.borrow_mut();
        vm.partition()
            .memory()
            .read(Gpa(gpa), &mut buf[..])
            .map_err(|_| VmError::at("page outside guest RAM", gfn))
    }

    fn start_dirty_log(&mut self) -> Result<&'static str, VmError> {
        let mut vm = self.vm.borrow_mut();
        // The best tracker the backend has: PML logs writes in hardware
        // without a fault per page; write protection works everywhere.
        if vm.partition().vcpu().caps().pml {
            match vm.claim_dirty_log(DirtyMode::Pml) {
                Ok(()) => return Ok(TRACKER_PML),
                Err(e) => log::warn!("migrate: PML refused ({e}), using write protection"),
            }
        }
        vm.claim_dirty_log(DirtyMode::WriteProtect)
            .map_err(|_| VmError::new("cannot enable dirty logging (out of memory?)"))?;
        Ok(TRACKER_WRITE_PROTECT)
    }

    fn collect_dirty(&mut self, out: &mut DirtyBitmap) -> Result<(), VmError> {
        let mut vm = self.vm.borrow_mut();
        out.with_words_mut(|words| vm.collect_dirty(words))
            .map(|_| ())
            .map_err(|_| VmError::new("collecting the dirty log failed"))
    }

    fn stop_dirty_log(&mut self) {
        self.vm.borrow_mut().release_dirty_log();
    }

    fn set_throttle(&mut self, pct: u8) {
        *self.throttle.borrow_mut() = pct.min(99);
    }

    fn pause(&mut self) -> Result<(), VmError> {
        let mut vm = self.vm.borrow_mut();
        if vm.stop_reason().is_some() {
            return Err(VmError::new("the VM stopped"));
        }
        vm.pause();
        Ok(())
    }

    fn resume(&mut self) {
        self.vm.borrow_mut().resume();
    }

    fn save_vcpus(&mut self) -> Result<Vec<VcpuState>, VmError> {
        let mut vm = self.vm.borrow_mut();
        let mut s = vm.partition().vcpu().save_state();
        s.id = 0;
        Ok(vec![s])
    }

    fn save_devices(&mut self) -> Result<Vec<DeviceState>, VmError> {
        let vm = self.vm.borrow();
        Ok(vec![DeviceState {
            kind: DEVICE_KIND_PORT_BUS,
            instance: 0,
            version: u32::from(Devices::SAVE_VERSION),
            payload: vm.devices().save(),
        }])
    }
}

/// The destination: an empty VM, shared with the driver. `None` once
/// discarded.
pub struct DestVm {
    vm: Rc<RefCell<Option<Vm>>>,
    ram_bytes: u64,
}

impl DestVm {
    fn with<R>(&mut self, f: impl FnOnce(&mut Vm) -> Result<R, VmError>) -> Result<R, VmError> {
        match self.vm.borrow_mut().as_mut() {
            Some(vm) => f(vm),
            None => Err(VmError::new("the destination VM was discarded")),
        }
    }
}

fn page_gpa(gfn: u64) -> Result<Gpa, VmError> {
    gfn.checked_mul(PAGE_SIZE as u64)
        .map(Gpa)
        .ok_or(VmError::at("page outside guest RAM", gfn))
}

impl DestinationVm for DestVm {
    fn prepare(&mut self, config: &VmConfig) -> Result<(), VmError> {
        // The VM exists already (created like the source); the stream's
        // configuration must describe exactly it.
        let want = vm_config(self.ram_bytes);
        if config.ram_bytes != want.ram_bytes {
            return Err(VmError::at(
                "RAM size differs from the destination VM's",
                config.ram_bytes,
            ));
        }
        if config.vcpus != 1 {
            return Err(VmError::at(
                "only one vCPU per VM is supported",
                u64::from(config.vcpus),
            ));
        }
        if config.devices != want.devices {
            return Err(VmError::new("device list differs from this node's VMs"));
        }
        self.with(|_| Ok(()))
    }

    fn write_page(&mut self, gfn: u64, data: &Page) -> Result<(), VmError> {
        let gpa = page_gpa(gfn)?;
        self.with(|vm| {
            vm.partition()
                .memory()
                .write(gpa, &data[..])
                .map_err(|_| VmError::at("page outside guest RAM", gfn))
        })
    }

    fn zero_page(&mut self, gfn: u64) -> Result<(), VmError> {
        self.write_page(gfn, &[0u8; PAGE_SIZE])
    }

    fn read_page(&mut self, gfn: u64, buf: &mut Page) -> Result<(), VmError> {
        let gpa = page_gpa(gfn)?;
        self.with(|vm| {
            vm.partition()
                .memory()
                .read(gpa, &mut buf[..])
                .map_err(|_| VmError::at("page outside guest RAM", gfn))
        })
    }

    fn restore_vcpus(&mut self, vcpus: &[VcpuState]) -> Result<(), VmError> {
        let [state] = vcpus else {
            return Err(VmError::at("vCPU count", vcpus.len() as u64));
        };
        self.with(|vm| {
            vm.partition()
                .vcpu()
                .restore_state(state)
                .map_err(|e| VmError::at(e.what, e.value))
        })
    }

    fn restore_devices(&mut self, devices: &[DeviceState]) -> Result<(), VmError> {
        let [d] = devices else {
            return Err(VmError::at("device count", devices.len() as u64));
        };
        if d.kind != DEVICE_KIND_PORT_BUS || d.instance != 0 {
            return Err(VmError::at("unknown device", u64::from(d.kind)));
        }
        let restored = Devices::restore(&d.payload)
            .map_err(|_| VmError::new("device state refused by the port bus"))?;
        self.with(|vm| {
            vm.set_devices(restored);
            Ok(())
        })
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.with(|vm| {
            vm.start();
            Ok(())
        })
    }

    fn discard(&mut self) {
        // Dropping the VM returns its memory to the host.
        self.vm.borrow_mut().take();
    }
}

/// The receiver of a local migration.
type Rx = Receiver<DestVm, MemPipe>;

/// The source's end of the in-node link: a [`MemPipe`] whose `send` also
/// lets the receiver consume what arrived. Both sides share the node's one
/// CPU, so the engine's bandwidth samples (taken around its sends) then
/// include the destination's work, and its expected downtime is the real
/// one rather than the sender's half.
struct LocalLink {
    pipe: MemPipe,
    rx: Rc<RefCell<Rx>>,
}

impl migration::Transport for LocalLink {
    fn send(&mut self, bytes: &[u8]) -> Result<(), migration::TransportError> {
        let r = self.pipe.send(bytes);
        // Bytes delivered before a break are still consumed. The driver
        // never holds the receiver while stepping the engine.
        if let Ok(mut rx) = self.rx.try_borrow_mut() {
            while rx.step() == RecvProgress::Busy {}
        }
        r
    }
    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, migration::TransportError> {
        self.pipe.recv(buf)
    }
    fn send_window(&self) -> usize {
        self.pipe.send_window()
    }
}

/// The engine's clock: the host's, shared with the driver, which borrows
/// the host mutably only between engine steps.
struct LoopClock<'h> {
    host: RefCell<&'h mut dyn Host>,
}

impl Clock for LoopClock<'_> {
    fn now_ns(&self) -> u64 {
        self.host.borrow().now_ns()
    }
    fn idle(&self, _max_ns: u64) {}
}

/// Test hooks of one local migration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Break the source-to-destination link after this many stream bytes
    /// (`MemPipe::fail_after`).
    pub fail_after_bytes: Option<u64>,
}

/// How a local migration ended.
#[derive(Debug)]
pub struct LocalOutcome {
    /// The VM that runs now: the destination after a completed migration,
    /// else the source (resumed).
    pub vm: Vm,
    /// The source engine's report (also printed as `migration-report`).
    pub report: MigrationReport,
}

/// Live-migrate `vm` to a new VM of the same name and size on this node
/// under `policy`, running the guest between engine steps, and print one
/// `migration-report {json}` line. Returns the VM that runs afterwards.
/// A destination that cannot be created fails the migration at once (the
/// VM keeps running).
pub fn migrate_local(host: &mut dyn Host, vm: Vm, policy: Policy, faults: Faults) -> LocalOutcome {
    let name = String::from(vm.name());
    let ram_bytes = vm.ram_bytes();
    let dest = match Vm::create_empty(host, &name, ram_bytes) {
        Ok(d) => d,
        Err(e) => {
            let mut vm = vm;
            vm.note_failed_migration();
            let report = failed_report(ram_bytes, format!("cannot create the destination VM: {e}"));
            print_report(host, &report);
            return LocalOutcome { vm, report };
        }
    };
    let src = Rc::new(RefCell::new(vm));
    let throttle = Rc::new(RefCell::new(0u8));
    let dst = Rc::new(RefCell::new(Some(dest)));
    let (src_end, dst_end) = MemPipe::pair();
    if let Some(n) = faults.fail_after_bytes {
        src_end.fail_after(n);
    }
    let clock = LoopClock {
        host: RefCell::new(host),
    };
    let source = SourceVm {
        vm: src.clone(),
        throttle: throttle.clone(),
        config: vm_config(ram_bytes),
    };
    let rx = Rc::new(RefCell::new(Receiver::new(
        DestVm {
            vm: dst.clone(),
            ram_bytes,
        },
        dst_end,
    )));
    let link = LocalLink {
        pipe: src_end,
        rx: rx.clone(),
    };
    let mut m = Migration::new(source, link, &clock, policy);
    let result = drive(&clock, &src, &throttle, &mut m, &rx);
    let report = m.report().clone();
    let received = rx.borrow().outcome().result;
    drop(m);
    drop(rx);
    let host = clock.host.into_inner();
    print_report(host, &report);
    let mut source = unwrap_rc(src);
    let dest = dst.borrow_mut().take();
    match (received, dest) {
        (MigrationResult::Completed, Some(mut d)) => {
            // The destination runs: only now is the source released.
            d.adopt_bookkeeping(&source);
            source.destroy();
            LocalOutcome { vm: d, report }
        }
        (_, dest) => {
            // Discard whatever is left of the destination; the source runs.
            drop(dest);
            if result != MigrationResult::Completed {
                source.note_failed_migration();
            }
            source.resume();
            LocalOutcome { vm: source, report }
        }
    }
}

/// Step both engines and the guest until the source engine finishes, then
/// let the receiver see the end. Returns the source's result.
fn drive(
    clock: &LoopClock<'_>,
    src: &Rc<RefCell<Vm>>,
    throttle: &Rc<RefCell<u8>>,
    m: &mut Migration<SourceVm, LocalLink, &LoopClock<'_>>,
    rx: &Rc<RefCell<Rx>>,
) -> MigrationResult {
    let step_rx = || rx.borrow_mut().step();
    let mut next_log = clock.now_ns().saturating_add(PROGRESS_LOG_NS);
    let result = loop {
        // Engine turn: until both wait, or its time is up.
        let t0 = clock.now_ns();
        let mut finished = None;
        loop {
            let waiting = match m.step() {
                Progress::Finished(res) => {
                    finished = Some(res);
                    break;
                }
                Progress::Busy => false,
                Progress::Waiting { .. } => true,
            };
            while step_rx() == RecvProgress::Busy {}
            if waiting || clock.now_ns().saturating_sub(t0) >= ENGINE_SLICE_NS {
                break;
            }
        }
        if let Some(res) = finished {
            break res;
        }
        let now = clock.now_ns();
        if now >= next_log {
            next_log = now.saturating_add(PROGRESS_LOG_NS);
            let r = m.report();
            log::debug!(
                "migrate: {} passes done, {} bytes sent, throttle {}%, paused {}, committed {}",
                r.passes,
                r.bytes_sent,
                throttle.borrow(),
                m.vm_paused(),
                m.committed()
            );
        }
        // Guest turn (pre-copy only: a paused VM does not run).
        let pct = u64::from(*throttle.borrow());
        let mut vm = src.borrow_mut();
        if vm.stop_reason().is_some() {
            drop(vm);
            m.cancel();
            continue;
        }
        if !vm.is_runnable() {
            continue;
        }
        let start = clock.now_ns();
        {
            let mut host = clock.host.borrow_mut();
            let end = start.saturating_add(GUEST_SLICE_NS);
            // A halted guest yields the rest of its turn.
            while host.now_ns() < end {
                if vm.run_slice(&mut **host, end) != SliceEnd::Expired {
                    break;
                }
            }
        }
        drop(vm);
        // The throttle as a duty cycle over the time the guest actually
        // ran (a turn lasts at least until the next timer tick): it sits
        // out `pct / (100 - pct)` of that while the engine works or waits
        // for its rate limit.
        let ran = clock.now_ns().saturating_sub(start);
        let off_end = clock
            .now_ns()
            .saturating_add(ran.saturating_mul(pct) / (100 - pct));
        while clock.now_ns() < off_end {
            if let Progress::Finished(_) = m.step() {
                break;
            }
            while step_rx() == RecvProgress::Busy {}
        }
    };
    for _ in 0..DRAIN_STEPS {
        if matches!(step_rx(), RecvProgress::Finished(_)) {
            break;
        }
    }
    if !matches!(step_rx(), RecvProgress::Finished(_)) {
        // The source is done and nothing more will come.
        rx.borrow_mut().cancel();
    }
    result
}

/// The source VM back out of its shared cell (the engines are gone).
fn unwrap_rc(rc: Rc<RefCell<Vm>>) -> Vm {
    match Rc::try_unwrap(rc) {
        Ok(cell) => cell.into_inner(),
        // The engine and the driver's clones are dropped before this.
        Err(_) => panic!("local migration: source VM still shared after the engines ended"),
    }
}

fn failed_report(ram_bytes: u64, error: String) -> MigrationReport {
    MigrationReport {
        passes: 0,
        pages_per_pass: Vec::new(),
        bytes_sent: 0,
        zero_pages: 0,
        ram_bytes,
        total_ms: 0,
        downtime_ms: 0,
        expected_downtime_ms: 0,
        throttle_pct: 0,
        result: MigrationResult::Failed,
        error: Some(error),
        dirty_tracker: None,
        verified: false,
    }
}

fn print_report(host: &mut dyn Host, report: &MigrationReport) {
    let mut line = String::from("migration-report ");
    line.push_str(&report.to_json());
    line.push('\n');
    host.console_write(&line);
}

/// Run `vm` alone until `until(vm)` holds, it stops, or `deadline_ns`;
/// true when `until` held.
pub fn run_until(
    host: &mut dyn Host,
    vm: &mut Vm,
    deadline_ns: u64,
    mut until: impl FnMut(&Vm) -> bool,
) -> bool {
    loop {
        if until(vm) {
            return true;
        }
        let now = host.now_ns();
        if now >= deadline_ns || !vm.is_runnable() {
            return until(vm);
        }
        let end = now.saturating_add(crate::sched::SLICE_NS).min(deadline_ns);
        vm.run_slice(host, end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::build::kernel;
    use crate::testing::{FakeHost, FakeMemory, FakeVcpu, Program};
    use alloc::boxed::Box;
    use hvcore::abi::{HC_DIRTY_LOG_CHECK, HC_DIRTY_LOG_DISABLE, HC_DIRTY_LOG_ENABLE, HC_ERR_BUSY};
    use hvcore::vcpu::VmExit;
    use migration::policy::NS_PER_MS;

    /// Pages of the writer's working set, from [`WORK_GPA`].
    const WORK_PAGES: u64 = 64;
    const WORK_GPA: u64 = 0x20_0000;

    /// A guest that, each run, writes its run counter into one of
    /// [`WORK_PAGES`] pages (round robin) and into RBX: memory and
    /// registers keep changing during pre-copy. Every `hypercall_every`
    /// runs (0: never) it instead makes the next of the three dirty-log
    /// calls (DISABLE, ENABLE, CHECK) and records what RAX it got the
    /// run after. With `lose` set, the write to that page escapes the dirty
    /// log (a hypervisor bug: a write the tracker never sees).
    fn writer(hypercall_every: u64, lose: Option<u64>, results: Rc<RefCell<Vec<u64>>>) -> Program {
        let mut i = 0u64;
        let mut calls = 0u64;
        let mut pending = false;
        Box::new(move |v: &mut FakeVcpu, m: &mut FakeMemory| {
            if core::mem::take(&mut pending) {
                results.borrow_mut().push(v.regs.rax);
            }
            if hypercall_every > 0 && v.regs.rbx % hypercall_every == hypercall_every - 1 {
                calls += 1;
                (v.regs.rax, v.regs.rdi, v.regs.rsi) = match calls % 3 {
                    0 => (HC_DIRTY_LOG_DISABLE, 0, 0),
                    1 => (HC_DIRTY_LOG_ENABLE, 0, 0),
                    _ => (HC_DIRTY_LOG_CHECK, 0x10_0000, 64),
                };
                v.regs.rbx += 1; // the next run writes again
                pending = true;
                return VmExit::Hypercall;
            }
            i += 1;
            let page = i % WORK_PAGES;
            let gpa = Gpa(WORK_GPA + page * 4096);
            if lose == Some(page) {
                m.write_unlogged(gpa, &i.to_le_bytes());
            } else {
                m.guest_write(gpa, &i.to_le_bytes());
            }
            v.regs.rbx = v.regs.rbx.max(i);
            VmExit::ExternalInterrupt
        })
    }

    /// A node whose guest runs take 100 us and whose hypervisor reads
    /// guest memory at 20 us per page (about 200 MB/s): a pass over the
    /// 4 MiB VM spans many engine turns, so the guest runs, and dirties
    /// pages, during pre-copy.
    fn host() -> FakeHost {
        let mut host = FakeHost::new();
        host.ns_per_run = 100_000;
        host.ns_per_page_read = 20_000;
        host.keep_dropped_memory = true;
        host
    }

    fn started(host: &mut FakeHost, program: Program) -> Vm {
        host.programs.push_back(program);
        let mut vm = Vm::create(host, "mig", 4 << 20, &kernel(), "case=x").unwrap();
        vm.start();
        // Let it write for a while first.
        let end = host.clock.get() + 5_000_000;
        vm.run_slice(host, end);
        vm
    }

    /// A policy whose downtime budget the first dirty set does not fit,
    /// so several dirty passes run; memory verified at switch-over.
    fn policy() -> Policy {
        Policy {
            downtime_limit_ns: 2 * NS_PER_MS,
            switch_over_cost_ns: NS_PER_MS / 2,
            verify_memory: true,
            ..Policy::default()
        }
    }

    fn read_u64(vm: &mut Vm, gpa: u64) -> u64 {
        let mut b = [0u8; 8];
        vm.partition().memory().read(Gpa(gpa), &mut b).unwrap();
        u64::from_le_bytes(b)
    }

    fn all_memory(vm: &mut Vm) -> Vec<u8> {
        let mut m = vec![0u8; vm.ram_bytes() as usize];
        vm.partition().memory().read(Gpa(0), &mut m).unwrap();
        m
    }

    /// The guest keeps writing during pre-copy: several dirty passes resend
    /// its pages, and the destination ends with the source's memory at the
    /// pause and the registers of its last run, not those from the start.
    #[test]
    fn dirty_passes_resend_pages_and_the_destination_gets_the_final_state() {
        let mut host = host();
        let mut vm = started(&mut host, writer(0, None, Rc::default()));
        let rbx_at_start = vm.partition().vcpu().regs().rbx;
        let out = migrate_local(&mut host, vm, policy(), Faults::default());
        let r = &out.report;
        assert_eq!(r.result, MigrationResult::Completed, "{r:?}");
        assert!(r.verified, "{r:?}");
        assert_eq!(r.dirty_tracker.as_deref(), Some(TRACKER_WRITE_PROTECT));
        // Pass 0 sends every page; at least two dirty passes resend the
        // working set's pages (the last pass runs paused).
        assert!(r.passes >= 3, "{r:?}");
        assert_eq!(r.pages_per_pass[0], 1024);
        let dirty_passes = &r.pages_per_pass[1..r.pages_per_pass.len() - 1];
        assert!(dirty_passes.iter().all(|&n| n > 0), "{r:?}");
        let resent: u64 = r.pages_per_pass[1..].iter().sum();
        assert!(resent >= WORK_PAGES, "{resent} pages resent: {r:?}");
        let mut vm = out.vm;
        assert_eq!(vm.name(), "mig");
        assert!(vm.is_runnable(), "the destination was started");
        assert_eq!(vm.migrations().completed, 1);
        assert_eq!(host.created, [4 << 20, 4 << 20]);
        assert_eq!(host.dropped.get(), 1, "the source is released");
        // Exactly the source's memory as it was when it was paused.
        let source = host.dropped_memory.borrow_mut().remove(0);
        assert!(all_memory(&mut vm) == source, "destination memory differs");
        // Registers from after the dirtying: the guest ran many times
        // during pre-copy, and its last write is in memory.
        let last = vm.partition().vcpu().regs().rbx;
        assert!(last > rbx_at_start + 2 * 40, "{rbx_at_start} -> {last}");
        for back in 0..WORK_PAGES {
            let i = last - back;
            assert_eq!(read_u64(&mut vm, WORK_GPA + (i % WORK_PAGES) * 4096), i);
        }
        let lines = host.lines();
        let report = lines
            .iter()
            .find(|l| l.starts_with("migration-report {"))
            .expect("report line");
        assert!(report.contains("\"result\":\"completed\""));
        assert!(report.ends_with("\"dirty_tracker\":\"write-protect\",\"verified\":true}"));
    }

    /// The audit's case: a guest that calls the dirty-log hypercalls
    /// (DISABLE among them) while it is being migrated. The calls are
    /// refused, the migration keeps its log, and the memory verifies.
    /// Before the log had an owner, DISABLE stopped the engine's log and
    /// the pages written afterwards stayed stale (verification then fails
    /// the migration).
    #[test]
    fn dirty_log_hypercalls_during_the_migration_are_refused() {
        let mut host = host();
        let results = Rc::new(RefCell::new(Vec::new()));
        let vm = started(&mut host, writer(7, None, results.clone()));
        let before = results.borrow().clone();
        assert!(
            !before.is_empty() && !before.contains(&HC_ERR_BUSY),
            "the guest's own calls work before the migration: {before:?}"
        );
        let out = migrate_local(&mut host, vm, policy(), Faults::default());
        let r = &out.report;
        assert_eq!(r.result, MigrationResult::Completed, "{r:?}");
        assert!(r.verified && r.passes >= 3, "{r:?}");
        let refused = out.vm.counters().dirty_log_refused;
        let during = results.borrow()[before.len()..].to_vec();
        assert!(refused >= 3, "{refused} calls refused");
        assert_eq!(
            during.iter().filter(|&&rax| rax == HC_ERR_BUSY).count() as u64,
            refused
        );
        let mut vm = out.vm;
        let source = host.dropped_memory.borrow_mut().remove(0);
        assert!(all_memory(&mut vm) == source, "destination memory differs");
        assert_eq!(
            vm.dirty_log_owner(),
            crate::hypercall::DirtyLogOwner::Guest,
            "the guest has its calls back at the destination"
        );
    }

    /// A write the dirty log never saw (a deliberately dropped dirty page):
    /// verification fails the migration naming the page, the destination
    /// is discarded, and the source runs on with its dirty log released.
    #[test]
    fn verification_fails_a_migration_that_missed_a_dirty_page() {
        let mut host = host();
        let lost_page = 9;
        let vm = started(&mut host, writer(0, Some(lost_page), Rc::default()));
        let out = migrate_local(&mut host, vm, policy(), Faults::default());
        let r = &out.report;
        assert_eq!(r.result, MigrationResult::Failed, "{r:?}");
        assert!(!r.verified);
        let lost_gfn = (WORK_GPA >> 12) + lost_page;
        let e = r.error.clone().unwrap();
        assert_eq!(
            e,
            format!(
                "memory verification failed: 1 pages at the source differ from what was sent \
                 (the dirty log missed writes); first gfns {lost_gfn:#x}; the VM keeps running \
                 at the source"
            )
        );
        let mut vm = out.vm;
        assert!(vm.is_runnable() && !vm.is_paused());
        assert_eq!(vm.migrations().failed, 1);
        assert!(!vm.partition().dirty_log_enabled());
        assert_eq!(vm.dirty_log_owner(), crate::hypercall::DirtyLogOwner::Guest);
        assert_eq!(host.dropped.get(), 1, "the destination is discarded");
        assert!(host.console.contains("\"result\":\"failed\""));

        // Without verification the same bug "completes" with a stale page.
        let mut host = self::host();
        let vm = started(&mut host, writer(0, Some(lost_page), Rc::default()));
        let unverified = Policy {
            verify_memory: false,
            ..policy()
        };
        let out = migrate_local(&mut host, vm, unverified, Faults::default());
        assert_eq!(out.report.result, MigrationResult::Completed);
        let mut vm = out.vm;
        let source = host.dropped_memory.borrow_mut().remove(0);
        let dest = all_memory(&mut vm);
        let stale: Vec<usize> = (0..source.len() / 4096)
            .filter(|&g| source[g * 4096..(g + 1) * 4096] != dest[g * 4096..(g + 1) * 4096])
            .collect();
        assert_eq!(stale, [lost_gfn as usize]);
    }

    /// The migration tracks dirty pages with PML when the vCPU has it.
    #[test]
    fn pml_is_used_when_the_backend_has_it() {
        let mut host = host();
        host.caps.pml = true;
        let vm = started(&mut host, writer(0, None, Rc::default()));
        let out = migrate_local(&mut host, vm, policy(), Faults::default());
        assert_eq!(out.report.result, MigrationResult::Completed);
        assert_eq!(out.report.dirty_tracker.as_deref(), Some(TRACKER_PML));
        assert!(out.report.verified && out.report.passes >= 3);
    }

    #[test]
    fn broken_link_keeps_the_vm_at_the_source_and_a_retry_completes() {
        let mut host = host();
        let vm = started(&mut host, writer(0, None, Rc::default()));
        let faults = Faults {
            fail_after_bytes: Some(20_000),
        };
        let out = migrate_local(&mut host, vm, policy(), faults);
        assert_eq!(out.report.result, MigrationResult::Failed);
        assert!(out
            .report
            .error
            .as_deref()
            .unwrap()
            .contains("injected failure"));
        let mut vm = out.vm;
        assert!(vm.is_runnable() && !vm.is_paused());
        assert_eq!(vm.migrations().failed, 1);
        assert!(!vm.partition().dirty_log_enabled());
        assert_eq!(host.dropped.get(), 1, "the destination is discarded");
        // The source keeps running and writing.
        let before = vm.partition().vcpu().regs().rbx;
        let end = host.clock.get() + 1_000_000;
        vm.run_slice(&mut host, end);
        assert!(vm.partition().vcpu().regs().rbx > before);
        let out = migrate_local(&mut host, vm, policy(), Faults::default());
        assert_eq!(out.report.result, MigrationResult::Completed);
        assert!(out.report.verified);
        assert_eq!(
            out.vm.migrations(),
            crate::vm::MigrationCounters {
                completed: 1,
                failed: 1
            }
        );
        assert_eq!(host.dropped.get(), 2);
    }

    #[test]
    fn no_room_for_the_destination_fails_without_touching_the_vm() {
        let mut host = FakeHost::new();
        let vm = started(&mut host, writer(0, None, Rc::default()));
        host.fail_create = true;
        let out = migrate_local(&mut host, vm, Policy::default(), Faults::default());
        assert_eq!(out.report.result, MigrationResult::Failed);
        assert!(out
            .report
            .error
            .unwrap()
            .starts_with("cannot create the destination VM"));
        assert!(out.vm.is_runnable());
        assert!(host.console.contains("migration-report {"));
    }

    #[test]
    fn destination_refuses_a_different_configuration() {
        let mut host = FakeHost::new();
        let vm = Vm::create_empty(&mut host, "d", 4 << 20).unwrap();
        let mut d = DestVm {
            vm: Rc::new(RefCell::new(Some(vm))),
            ram_bytes: 4 << 20,
        };
        assert!(d.prepare(&vm_config(4 << 20)).is_ok());
        assert!(d.prepare(&vm_config(8 << 20)).is_err());
        let mut two = vm_config(4 << 20);
        two.vcpus = 2;
        assert!(d.prepare(&two).is_err());
        // A vCPU record the architecture forbids is refused by name.
        let mut bad = VcpuState::default();
        bad.regs.rflags = 2;
        let e = d.restore_vcpus(&[bad]).unwrap_err();
        assert!(e.what.contains("TR") || e.what.contains("CS"), "{e}");
        d.discard();
        assert_eq!(host.dropped.get(), 1);
        assert!(d.write_page(0, &[0u8; PAGE_SIZE]).is_err());
    }
}
