//! The node side of the guest test cases (docs/DESIGN.md, "Test cases").
//!
//! Each case creates its VMs from the one guest kernel, runs them under the
//! scheduler for at most [`CASE_TIMEOUT_NS`] of node time, judges the result
//! from how the VMs stopped and what they printed, and destroys them (their
//! memory goes back to the host) before the next case runs.
//!
//! The live-migration cases (`local-migrate-*`) run one VM, wait for its
//! guest's first `HC_PROGRESS` (its workload is running), live-migrate it
//! within the node ([`crate::migrate`]) once or twice, run the VM that
//! results until its guest reports, and judge from both the guest's result
//! and the `migration-report` fields. Every one of them migrates in
//! verification mode (`Policy::verify_memory`): a completed migration must
//! say `verified`, and must have used the best dirty tracker the vCPU has
//! (PML when `Vcpu::caps().pml`).

use crate::devices::{Devices, Machine};
use crate::migrate::{self, Faults};
use crate::sched::{ProgressLog, RunOutcome, Scheduler};
use crate::vm::{StopReason, Vm};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use hvcore::exit::StopReason as ExitStop;
use hvcore::host::Host;
use migration::policy::{NS_PER_MS, NS_PER_S};
use migration::{MigrationReport, MigrationResult, Policy};

/// Time limit of one case in node nanoseconds.
pub const CASE_TIMEOUT_NS: u64 = 30_000_000_000;
/// The line the `hello` guest prints.
pub const HELLO_LINE: &str = "Hello from the hvmigrate guest";
/// Progress reports each `two-vms` guest makes at least.
pub const TWO_VMS_MIN_REPORTS: u64 = 100;
/// Time limit of a live-migration case (the migrations included).
pub const MIGRATION_CASE_TIMEOUT_NS: u64 = 90 * NS_PER_S;
/// `local-migrate-abort`: the link breaks after this many stream bytes
/// (partway through the first pass).
pub const ABORT_AFTER_BYTES: u64 = 256 << 10;
/// `local-migrate-converge`: the transport's rate limit.
pub const CONVERGE_BYTES_PER_S: u64 = 4 << 20;
/// `local-migrate-converge`: the migration's own time limit.
pub const CONVERGE_TIMEOUT_NS: u64 = 60 * NS_PER_S;

/// One VM of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmSpec {
    pub name: &'static str,
    pub ram_mib: u64,
    pub cmdline: &'static str,
}

/// The test cases, in the order `tests=all` runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    Hello,
    Cpuid,
    Memory,
    DirtyLog,
    BadMsr,
    TripleFault,
    TwoVms,
    Interrupt,
    LocalMigrateIdle,
    LocalMigrateBusy,
    LocalMigrateAbort,
    LocalMigrateConverge,
    LocalMigrateTamper,
    VirtioBlk,
}

impl Case {
    /// Every case in order.
    pub const ALL: [Case; 14] = [
        Case::Hello,
        Case::Cpuid,
        Case::Memory,
        Case::DirtyLog,
        Case::BadMsr,
        Case::TripleFault,
        Case::TwoVms,
        Case::Interrupt,
        Case::LocalMigrateIdle,
        Case::LocalMigrateBusy,
        Case::LocalMigrateAbort,
        Case::LocalMigrateConverge,
        Case::LocalMigrateTamper,
        Case::VirtioBlk,
    ];

    /// The case's name on the command line and in results
    /// ([`hvcore::abi::case`]).
    pub fn name(self) -> &'static str {
        use hvcore::abi::case;
        match self {
            Case::Hello => case::HELLO,
            Case::Cpuid => case::CPUID,
            Case::Memory => case::MEMORY,
            Case::DirtyLog => case::DIRTY_LOG,
            Case::BadMsr => case::BAD_MSR,
            Case::TripleFault => case::TRIPLE_FAULT,
            Case::TwoVms => case::TWO_VMS,
            Case::Interrupt => case::INTERRUPT,
            Case::LocalMigrateIdle => case::LOCAL_MIGRATE_IDLE,
            Case::LocalMigrateBusy => case::LOCAL_MIGRATE_BUSY,
            Case::LocalMigrateAbort => case::LOCAL_MIGRATE_ABORT,
            Case::LocalMigrateConverge => case::LOCAL_MIGRATE_CONVERGE,
            Case::LocalMigrateTamper => case::LOCAL_MIGRATE_TAMPER,
            Case::VirtioBlk => case::VIRTIO_BLK,
        }
    }

    /// The case called `name`.
    pub fn from_name(name: &str) -> Option<Case> {
        Case::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Its VMs.
    pub fn vms(self) -> &'static [VmSpec] {
        match self {
            Case::Hello => &[VmSpec {
                name: "hello",
                ram_mib: 64,
                cmdline: "case=hello",
            }],
            Case::Cpuid => &[VmSpec {
                name: "cpuid",
                ram_mib: 64,
                cmdline: "case=cpuid",
            }],
            Case::Memory => &[VmSpec {
                name: "memory",
                ram_mib: 64,
                cmdline: "case=memory",
            }],
            Case::DirtyLog => &[VmSpec {
                name: "dirty-log",
                ram_mib: 64,
                cmdline: "case=dirty-log",
            }],
            Case::BadMsr => &[VmSpec {
                name: "bad-msr",
                ram_mib: 64,
                cmdline: "case=bad-msr",
            }],
            Case::TripleFault => &[VmSpec {
                name: "triple-fault",
                ram_mib: 64,
                cmdline: "case=triple-fault",
            }],
            Case::TwoVms => &[
                VmSpec {
                    name: "two-vms-a",
                    ram_mib: 32,
                    cmdline: "case=two-vms role=a",
                },
                VmSpec {
                    name: "two-vms-b",
                    ram_mib: 32,
                    cmdline: "case=two-vms role=b",
                },
            ],
            Case::Interrupt => &[VmSpec {
                name: "interrupt",
                ram_mib: 32,
                cmdline: "case=interrupt",
            }],
            Case::LocalMigrateIdle => &[VmSpec {
                name: "local-migrate-idle",
                ram_mib: 64,
                cmdline: "case=local-migrate-idle",
            }],
            Case::LocalMigrateBusy => &[VmSpec {
                name: "local-migrate-busy",
                ram_mib: 64,
                cmdline: "case=local-migrate-busy",
            }],
            Case::LocalMigrateAbort => &[VmSpec {
                name: "local-migrate-abort",
                ram_mib: 64,
                cmdline: "case=local-migrate-abort",
            }],
            Case::LocalMigrateConverge => &[VmSpec {
                name: "local-migrate-converge",
                ram_mib: 64,
                cmdline: "case=local-migrate-converge",
            }],
            Case::LocalMigrateTamper => &[VmSpec {
                name: "local-migrate-tamper",
                ram_mib: 64,
                cmdline: "case=local-migrate-tamper",
            }],
            Case::VirtioBlk => &[VmSpec {
                name: "virtio-blk",
                ram_mib: 32,
                cmdline: "case=virtio-blk",
            }],
        }
    }

    /// The machine its VMs get: the PC platform for `interrupt` (its
    /// local APIC), the minimal one otherwise.
    pub fn machine(self) -> Machine {
        match self {
            Case::Interrupt => Machine::Pc,
            _ => Machine::Minimal,
        }
    }

    /// Whether this is a live-migration case.
    pub fn is_migration(self) -> bool {
        matches!(
            self,
            Case::LocalMigrateIdle
                | Case::LocalMigrateBusy
                | Case::LocalMigrateAbort
                | Case::LocalMigrateConverge
                | Case::LocalMigrateTamper
                | Case::VirtioBlk
        )
    }

    /// The migration policy of a live-migration case: verification mode
    /// always, plus the case's own knobs.
    pub fn migration_policy(self) -> Policy {
        let mut p = Policy {
            verify_memory: true,
            ..Policy::default()
        };
        match self {
            // A tight downtime budget: the dirtying guest needs more than
            // one dirty pass to fit it.
            Case::LocalMigrateBusy => p.downtime_limit_ns = 30 * NS_PER_MS,
            // A transport slower than the guest dirties memory: only the
            // throttle lets the dirty set shrink.
            Case::LocalMigrateConverge => {
                p.max_bandwidth_bytes_per_s = CONVERGE_BYTES_PER_S;
                p.timeout_ns = CONVERGE_TIMEOUT_NS;
                p.throttle_initial_pct = 50;
                p.throttle_step_pct = 25;
            }
            _ => {}
        }
        p
    }
}

/// Run `case` with guest kernel `image`; `Err` holds the failure reason.
pub fn run_case(host: &mut dyn Host, image: &[u8], case: Case) -> Result<(), String> {
    if case.is_migration() {
        return run_migration_case(host, image, case);
    }
    let mut vms = Vec::new();
    for spec in case.vms() {
        let mut vm = Vm::create(host, spec.name, spec.ram_mib << 20, image, spec.cmdline)
            .map_err(|e| format!("cannot create VM {}: {e}", spec.name))?;
        if case.machine() == Machine::Pc {
            vm.set_devices(Devices::pc(host.wall_clock_ns()));
        }
        vms.push(vm);
    }
    vms.iter_mut().for_each(Vm::start);
    let deadline = host.now_ns().saturating_add(CASE_TIMEOUT_NS);
    let mut progress = ProgressLog::default();
    let outcome = Scheduler::default().run(host, &mut vms, Some(deadline), &mut progress);
    let result = if outcome == RunOutcome::Deadline {
        for vm in vms.iter_mut() {
            vm.stop(host, StopReason::Timeout);
        }
        Err("timeout".into())
    } else {
        evaluate(case, &vms, &progress)
    };
    // Destroy the VMs: their partitions return guest memory to the host.
    vms.into_iter().for_each(Vm::destroy);
    result
}

/// Judge a finished case from its VMs (in [`Case::vms`] order) and the
/// order of their progress reports.
pub fn evaluate(case: Case, vms: &[Vm], progress: &ProgressLog) -> Result<(), String> {
    match case {
        Case::Hello => {
            let vm = vm_at(vms, 0)?;
            reported_ok(vm)?;
            if vm.recent_lines().any(|l| l == HELLO_LINE) {
                Ok(())
            } else {
                Err("no hello line on the console".into())
            }
        }
        Case::Cpuid
        | Case::Interrupt
        | Case::Memory
        | Case::DirtyLog
        | Case::BadMsr
        | Case::LocalMigrateIdle
        | Case::LocalMigrateBusy
        | Case::LocalMigrateAbort
        | Case::LocalMigrateConverge
        | Case::LocalMigrateTamper
        | Case::VirtioBlk => reported_ok(vm_at(vms, 0)?),
        Case::TripleFault => {
            let vm = vm_at(vms, 0)?;
            match vm.stop_reason() {
                Some(StopReason::Exit(ExitStop::TripleFault)) => Ok(()),
                Some(other) => Err(format!(
                    "expected a triple fault, but vm {} stopped: {other}",
                    vm.name()
                )),
                None => Err(format!(
                    "expected a triple fault, but vm {} is still running",
                    vm.name()
                )),
            }
        }
        Case::TwoVms => {
            let (a, b) = (vm_at(vms, 0)?, vm_at(vms, 1)?);
            reported_ok(a)?;
            reported_ok(b)?;
            for (i, vm, other) in [(0, a, b), (1, b, a)] {
                let reports = vm.counters().progress_reports;
                if reports < TWO_VMS_MIN_REPORTS {
                    return Err(format!(
                        "{} made {reports} progress reports (at least {TWO_VMS_MIN_REPORTS} expected)",
                        vm.name()
                    ));
                }
                if !progress.interrupted(i) {
                    return Err(format!(
                        "progress did not interleave: {} was never preempted while {} made progress ({} runs of reports)",
                        vm.name(),
                        other.name(),
                        progress.runs().len()
                    ));
                }
            }
            Ok(())
        }
    }
}

/// A live-migration case: start the VM, wait for its guest's first
/// progress report, migrate (twice for `local-migrate-abort`: the first
/// over a link that breaks), run the VM that results until its guest
/// reports, judge.
fn run_migration_case(host: &mut dyn Host, image: &[u8], case: Case) -> Result<(), String> {
    let spec = case.vms()[0];
    let mut vm = Vm::create(host, spec.name, spec.ram_mib << 20, image, spec.cmdline)
        .map_err(|e| format!("cannot create VM {}: {e}", spec.name))?;
    let disk_file = if case == Case::VirtioBlk {
        let (disk, file) = crate::disks::new_mem_vhdx(VIRTIO_BLK_DISK_BYTES)
            .map_err(|e| format!("cannot create the disk: {e}"))?;
        let meta = crate::disks::DiskMeta {
            backing: crate::disks::Backing::Memory {
                name: "virtio-blk-0.vhdx".into(),
                file: file.clone(),
            },
            fixed: false,
            virtual_bytes: VIRTIO_BLK_DISK_BYTES,
            block_bytes: crate::disks::MEM_BLOCK_BYTES,
            checkpoint: None,
        };
        vm.attach_disk(alloc::boxed::Box::new(disk), meta)
            .ok_or("no virtio slot for the disk")?;
        Some(file)
    } else {
        None
    };
    vm.start();
    let deadline = host.now_ns().saturating_add(MIGRATION_CASE_TIMEOUT_NS);
    let policy = case.migration_policy();
    let tracker = if vm.partition().vcpu().caps().pml {
        migrate::TRACKER_PML
    } else {
        migrate::TRACKER_WRITE_PROTECT
    };
    let mut reports = Vec::new();
    let mut result = Ok(());
    if !migrate::run_until(host, &mut vm, deadline, |v| {
        v.counters().progress_reports > 0
    }) {
        result = Err(not_running(host, &mut vm, "before the migration"));
    }
    if result.is_ok() && case == Case::LocalMigrateAbort {
        let faults = Faults {
            fail_after_bytes: Some(ABORT_AFTER_BYTES),
        };
        let policy = within(host, policy, deadline);
        let out = migrate::migrate_local(host, vm, policy, faults);
        vm = out.vm;
        reports.push(out.report);
        // The guest checks its memory after the failed attempt and says so
        // with a second progress report.
        if !migrate::run_until(host, &mut vm, deadline, |v| {
            v.counters().progress_reports > 1
        }) {
            result = Err(not_running(host, &mut vm, "after the failed migration"));
        }
    }
    if result.is_ok() {
        let policy = within(host, policy, deadline);
        let out = migrate::migrate_local(host, vm, policy, Faults::default());
        vm = out.vm;
        reports.push(out.report);
        migrate::run_until(host, &mut vm, deadline, |v| v.stop_reason().is_some());
        if vm.stop_reason().is_none() {
            vm.stop(host, StopReason::Timeout);
            result = Err("timeout".into());
        }
    }
    let result = result
        .and_then(|()| reported_ok(&vm))
        .and_then(|()| judge_reports(case, &reports, tracker))
        .and_then(|()| judge_vm(case, &vm));
    // Destroying the VM closes its disk (the VHDX's log is cleared).
    vm.destroy();
    match disk_file {
        Some(file) => result.and_then(|()| check_virtio_blk_disk(&file.bytes())),
        None => result,
    }
}

/// The `virtio-blk` case's disk: 4 MiB, dynamic.
pub const VIRTIO_BLK_DISK_BYTES: u64 = 4 << 20;
/// Seed and sectors of the case's pattern (tests/guest `cases/disk.rs`).
pub const VIRTIO_BLK_SEED: u64 = 0x5eed_b10c;
pub const VIRTIO_BLK_SECTORS: u64 = 2048;

/// Check the `virtio-blk` guest's writes in the bytes of its VHDX file, as
/// a host tool reads them: the file opens and validates, the first half
/// MiB holds round 1 of the pattern, the second round 2, the rest zeros.
pub fn check_virtio_blk_disk(file: &[u8]) -> Result<(), String> {
    use vstorage::vhdx::{OpenOptions, Vhdx};
    use vstorage::{MemIo, VirtualDisk};
    let mut disk = Vhdx::open(MemIo::from_vec(file.to_vec()), OpenOptions::read_only())
        .map_err(|e| format!("the disk's VHDX does not open: {e}"))?;
    disk.verify()
        .map_err(|e| format!("the disk's VHDX does not verify: {e}"))?;
    let half = VIRTIO_BLK_SECTORS / 2;
    let sector = hvcore::abi::DISK_SECTOR_BYTES;
    let mut got = alloc::vec![0u8; half as usize * sector];
    let mut want = got.clone();
    for (round, first) in [(1, 0), (2, half)] {
        disk.read(first * sector as u64, &mut got)
            .map_err(|e| format!("reading the VHDX: {e}"))?;
        hvcore::abi::fill_disk_pattern(VIRTIO_BLK_SEED, round, first, &mut want);
        if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
            return Err(format!(
                "the VHDX holds other bytes than the guest wrote: sector {} byte {}",
                first + (i / sector) as u64,
                i % sector
            ));
        }
    }
    let mut rest = alloc::vec![0u8; sector];
    disk.read(VIRTIO_BLK_SECTORS * sector as u64, &mut rest)
        .map_err(|e| format!("reading the VHDX: {e}"))?;
    if rest.iter().any(|&b| b != 0) {
        return Err("the VHDX has data past what the guest wrote".into());
    }
    Ok(())
}

/// What a case checks of the migrated VM itself.
fn judge_vm(case: Case, vm: &Vm) -> Result<(), String> {
    // The guest called the dirty-log hypercalls all along; some of them
    // must have hit the migration and been refused (counted by the node,
    // whatever the guest claims).
    if case == Case::LocalMigrateTamper && vm.counters().dirty_log_refused == 0 {
        return Err("no dirty-log hypercall was refused during the migration".into());
    }
    Ok(())
}

/// `policy` with its timeout cut to what is left of the case's time, so a
/// migration that cannot finish is cancelled (the VM stays) instead of
/// outliving the case.
fn within(host: &dyn Host, mut policy: Policy, deadline_ns: u64) -> Policy {
    let left = deadline_ns.saturating_sub(host.now_ns());
    policy.timeout_ns = policy.timeout_ns.min(left);
    policy
}

/// Why the guest did not get where the case waited for it; a guest still
/// running ran out of time.
fn not_running(host: &mut dyn Host, vm: &mut Vm, when: &str) -> String {
    match vm.stop_reason() {
        Some(StopReason::GuestFailed(m)) => m.clone(),
        Some(r) => format!("vm {} stopped {when}: {r}", vm.name()),
        None => {
            vm.stop(host, StopReason::Timeout);
            "timeout".into()
        }
    }
}

/// The report checks of each live-migration case; `tracker` is the dirty
/// tracker the node's vCPU makes best (`dirty_tracker` of the report).
pub fn judge_reports(case: Case, reports: &[MigrationReport], tracker: &str) -> Result<(), String> {
    let completed = |r: &MigrationReport| {
        if r.result != MigrationResult::Completed {
            return Err(format!(
                "migration {}: {}",
                r.result.as_str(),
                r.error.as_deref().unwrap_or("no reason given")
            ));
        }
        if !r.verified {
            return Err("the migration completed without verifying the memory".into());
        }
        if r.dirty_tracker.as_deref() != Some(tracker) {
            return Err(format!(
                "the migration tracked dirty pages with {}, not {tracker}",
                r.dirty_tracker.as_deref().unwrap_or("nothing")
            ));
        }
        Ok(())
    };
    let last = reports
        .last()
        .ok_or_else(|| String::from("no migration report"))?;
    completed(last)?;
    match case {
        Case::LocalMigrateIdle if last.bytes_sent > last.ram_bytes + last.ram_bytes / 10 => {
            return Err(format!(
                "bytes_sent {} above 1.1 x ram_bytes ({})",
                last.bytes_sent,
                last.ram_bytes + last.ram_bytes / 10
            ));
        }
        Case::LocalMigrateBusy if last.passes < 3 => {
            return Err(format!(
                "{} passes (the full copy and at least two dirty passes expected)",
                last.passes
            ));
        }
        Case::LocalMigrateAbort => {
            let first = reports
                .first()
                .filter(|_| reports.len() == 2)
                .ok_or_else(|| String::from("expected two migrations"))?;
            if first.result != MigrationResult::Failed || first.error.is_none() {
                return Err(format!(
                    "first migration: result {} error {:?} (failed with a reason expected)",
                    first.result.as_str(),
                    first.error
                ));
            }
        }
        Case::LocalMigrateConverge => {
            if last.throttle_pct == 0 {
                return Err("the guest was never throttled".into());
            }
            let limit_ms = CONVERGE_TIMEOUT_NS / NS_PER_MS;
            if last.total_ms > limit_ms {
                return Err(format!("took {} ms (limit {limit_ms} ms)", last.total_ms));
            }
        }
        _ => {}
    }
    Ok(())
}

fn vm_at(vms: &[Vm], i: usize) -> Result<&Vm, String> {
    vms.get(i).ok_or_else(|| String::from("case VM missing"))
}

/// Ok if `vm` stopped with the guest reporting success.
fn reported_ok(vm: &Vm) -> Result<(), String> {
    match vm.stop_reason() {
        Some(StopReason::GuestOk(_)) => Ok(()),
        Some(StopReason::GuestFailed(m)) if m.is_empty() => {
            Err(format!("{}: guest reported failure", vm.name()))
        }
        Some(StopReason::GuestFailed(m)) => Err(m.clone()),
        Some(other) => Err(format!("vm {} stopped: {other}", vm.name())),
        None => Err(format!("vm {} did not finish", vm.name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::build::kernel;
    use crate::testing::{printer, spinner, FakeHost, FakeMemory, FakeVcpu, Program};
    use alloc::boxed::Box;
    use hvcore::abi::{HC_DIRTY_LOG_DISABLE, HC_PROGRESS, HC_TEST_RESULT};
    use hvcore::addr::Gpa;
    use hvcore::mem::GuestMemory;
    use hvcore::vcpu::VmExit;

    fn run(programs: Vec<Program>, case: Case) -> (Result<(), String>, FakeHost) {
        let mut host = FakeHost::new();
        host.ns_per_run = 100_000;
        host.programs.extend(programs);
        let r = run_case(&mut host, &kernel(), case);
        (r, host)
    }

    fn exit_with(exit: VmExit) -> Program {
        Box::new(move |_: &mut FakeVcpu, _: &mut FakeMemory| exit)
    }

    fn fail(msg: &'static str) -> Program {
        Box::new(move |v: &mut FakeVcpu, m: &mut FakeMemory| {
            m.write(Gpa(0x9000), msg.as_bytes()).unwrap();
            v.regs.rax = HC_TEST_RESULT;
            (v.regs.rdi, v.regs.rsi, v.regs.rdx) = (1, 0x9000, msg.len() as u64);
            VmExit::Hypercall
        })
    }

    #[test]
    fn names_round_trip() {
        for c in Case::ALL {
            assert_eq!(Case::from_name(c.name()), Some(c));
        }
        assert_eq!(Case::from_name("nope"), None);
        assert_eq!(Case::ALL.map(Case::name), hvcore::abi::case::ALL);
    }

    #[test]
    fn hello_needs_the_line() {
        let (r, host) = run(
            alloc::vec![printer("Hello from the hvmigrate guest\n")],
            Case::Hello,
        );
        assert_eq!(r, Ok(()));
        assert_eq!(host.created, [64 << 20]);
        assert_eq!(host.dropped.get(), 1, "VM destroyed after the case");
        let (r, _) = run(
            alloc::vec![printer("Hello from the hvmigrate guest!\n")],
            Case::Hello,
        );
        assert_eq!(r, Err("no hello line on the console".into()));
        let (r, _) = run(alloc::vec![fail("LSR never ready")], Case::Hello);
        assert_eq!(r, Err("LSR never ready".into()));
    }

    #[test]
    fn plain_cases_follow_the_guest() {
        let (r, _) = run(alloc::vec![printer("")], Case::Memory);
        assert_eq!(r, Ok(()));
        let (r, _) = run(alloc::vec![fail("mismatch at 0x123000")], Case::Memory);
        assert_eq!(r, Err("mismatch at 0x123000".into()));
        let (r, _) = run(alloc::vec![exit_with(VmExit::Shutdown)], Case::Cpuid);
        assert_eq!(r, Err("vm cpuid stopped: triple fault (shutdown)".into()));
    }

    #[test]
    fn triple_fault_is_expected() {
        let (r, host) = run(alloc::vec![exit_with(VmExit::Shutdown)], Case::TripleFault);
        assert_eq!(r, Ok(()));
        assert!(host
            .lines()
            .contains(&"vm triple-fault stopped: triple fault (shutdown)"));
        let (r, _) = run(alloc::vec![printer("")], Case::TripleFault);
        assert_eq!(
            r,
            Err("expected a triple fault, but vm triple-fault stopped: guest reported ok".into())
        );
    }

    const WP: &str = migrate::TRACKER_WRITE_PROTECT;

    #[test]
    fn migration_reports_are_judged_per_case() {
        let ok = MigrationReport {
            passes: 3,
            pages_per_pass: alloc::vec![16384, 100, 10],
            bytes_sent: 1 << 20,
            zero_pages: 16000,
            ram_bytes: 64 << 20,
            total_ms: 500,
            downtime_ms: 10,
            expected_downtime_ms: 10,
            throttle_pct: 0,
            result: MigrationResult::Completed,
            error: None,
            dirty_tracker: Some("write-protect".into()),
            verified: true,
            pause_us: Default::default(),
        };
        assert_eq!(
            judge_reports(Case::LocalMigrateIdle, core::slice::from_ref(&ok), WP),
            Ok(())
        );
        let big = MigrationReport {
            bytes_sent: 71 << 20,
            ..ok.clone()
        };
        assert!(judge_reports(Case::LocalMigrateIdle, &[big], WP)
            .unwrap_err()
            .contains("above 1.1 x ram_bytes"));
        let two = MigrationReport {
            passes: 2,
            ..ok.clone()
        };
        assert!(judge_reports(Case::LocalMigrateBusy, &[two], WP)
            .unwrap_err()
            .contains("2 passes"));
        assert!(
            judge_reports(Case::LocalMigrateConverge, core::slice::from_ref(&ok), WP)
                .unwrap_err()
                .contains("never throttled")
        );
        let failed = MigrationReport {
            result: MigrationResult::Failed,
            error: Some("transport failed: injected failure".into()),
            ..ok.clone()
        };
        assert_eq!(
            judge_reports(Case::LocalMigrateAbort, &[failed.clone(), ok.clone()], WP),
            Ok(())
        );
        assert!(judge_reports(Case::LocalMigrateAbort, core::slice::from_ref(&ok), WP).is_err());
        assert_eq!(
            judge_reports(Case::LocalMigrateIdle, &[failed], WP).unwrap_err(),
            "migration failed: transport failed: injected failure"
        );
        // Every completed migration must have verified the memory, with
        // the best tracker of the node.
        let unverified = MigrationReport {
            verified: false,
            ..ok.clone()
        };
        assert_eq!(
            judge_reports(Case::LocalMigrateTamper, &[unverified], WP).unwrap_err(),
            "the migration completed without verifying the memory"
        );
        assert_eq!(
            judge_reports(Case::LocalMigrateIdle, core::slice::from_ref(&ok), "pml").unwrap_err(),
            "the migration tracked dirty pages with write-protect, not pml"
        );
        assert!(Case::ALL
            .iter()
            .filter(|c| c.is_migration())
            .all(|c| c.migration_policy().verify_memory));
    }

    #[test]
    fn migration_case_runs_the_guest_migrates_and_judges() {
        // A guest that reports progress, then ok: the migration happens in
        // between (the fake guest's program runs on at the destination).
        let mut i = 0u64;
        let prog: Program = Box::new(move |v: &mut FakeVcpu, _: &mut FakeMemory| {
            i += 1;
            v.regs.rax = if i == 1 { HC_PROGRESS } else { HC_TEST_RESULT };
            (v.regs.rdi, v.regs.rdx) = (1, 0);
            if i > 1 {
                v.regs.rdi = 0;
            }
            if i > 1 && i < 1000 {
                return VmExit::ExternalInterrupt;
            }
            VmExit::Hypercall
        });
        let (r, host) = run(alloc::vec![prog, printer("")], Case::LocalMigrateIdle);
        assert_eq!(r, Ok(()), "{}", host.console);
        assert!(host.console.contains("migration-report {"));
        assert_eq!(host.created, [64 << 20, 64 << 20]);
        assert_eq!(
            host.dropped.get(),
            2,
            "source after the switch, then the VM"
        );
    }

    /// `local-migrate-tamper` on the node side: the guest's dirty-log calls
    /// during the migration must have been refused (the node counts them);
    /// a guest that never called them fails the case.
    #[test]
    fn tamper_case_needs_refused_dirty_log_calls() {
        for calls in [true, false] {
            let mut i = 0u64;
            let prog: Program = Box::new(move |v: &mut FakeVcpu, _: &mut FakeMemory| {
                i += 1;
                (v.regs.rdi, v.regs.rsi, v.regs.rdx) = (0, 0, 0);
                v.regs.rax = match i {
                    1 => HC_PROGRESS,
                    30_000.. => HC_TEST_RESULT,
                    _ if calls => HC_DIRTY_LOG_DISABLE,
                    _ => return VmExit::ExternalInterrupt,
                };
                VmExit::Hypercall
            });
            let mut host = FakeHost::new();
            host.ns_per_run = 100_000;
            // Copying costs time, so the guest runs during pre-copy.
            host.ns_per_page_read = 2_000;
            host.programs.extend([prog, printer("")]);
            let r = run_case(&mut host, &kernel(), Case::LocalMigrateTamper);
            if calls {
                assert_eq!(r, Ok(()), "{}", host.console);
                assert!(
                    host.console.contains("\"verified\":true,"),
                    "{}",
                    host.console
                );
            } else {
                assert_eq!(
                    r,
                    Err("no dirty-log hypercall was refused during the migration".into())
                );
            }
        }
    }

    #[test]
    fn timeout_after_thirty_seconds() {
        let (r, host) = run(alloc::vec![spinner()], Case::BadMsr);
        assert_eq!(r, Err("timeout".into()));
        assert!(host.lines().contains(&"vm bad-msr stopped: timeout"));
        // 30 s of node time passed (the clock started at 1 ms).
        let elapsed = host.clock.get() - 1_000_000;
        assert!(
            (CASE_TIMEOUT_NS..CASE_TIMEOUT_NS + 1_000_000).contains(&elapsed),
            "{elapsed}"
        );
        assert_eq!(host.dropped.get(), 1);
    }

    /// A two-vms guest: `reports` progress calls, one every `every` runs,
    /// then ok.
    fn progresser(reports: u64, every: u64) -> Program {
        let mut i = 0u64;
        let mut done = 0u64;
        Box::new(move |v: &mut FakeVcpu, _: &mut FakeMemory| {
            i += 1;
            if done == reports {
                v.regs.rax = HC_TEST_RESULT;
                (v.regs.rdi, v.regs.rdx) = (0, 0);
                return VmExit::Hypercall;
            }
            if i.is_multiple_of(every) {
                done += 1;
                v.regs.rax = HC_PROGRESS;
                v.regs.rdi = done;
                return VmExit::Hypercall;
            }
            VmExit::ExternalInterrupt
        })
    }

    #[test]
    fn two_vms_must_interleave() {
        let (r, host) = run(
            alloc::vec![progresser(150, 10), progresser(150, 10)],
            Case::TwoVms,
        );
        assert_eq!(r, Ok(()));
        assert_eq!(host.created, [32 << 20, 32 << 20]);
        assert_eq!(host.dropped.get(), 2);
        // Too few reports.
        let (r, _) = run(
            alloc::vec![progresser(50, 10), progresser(150, 10)],
            Case::TwoVms,
        );
        assert!(r
            .unwrap_err()
            .contains("two-vms-a made 50 progress reports"));
        // A finishes within its first slice: never preempted mid-stream.
        let (r, _) = run(
            alloc::vec![progresser(100, 1), progresser(150, 10)],
            Case::TwoVms,
        );
        assert!(r.unwrap_err().contains("two-vms-a was never preempted"), "");
        // One fails.
        let (r, _) = run(
            alloc::vec![progresser(150, 10), fail("b broke")],
            Case::TwoVms,
        );
        assert_eq!(r, Err("b broke".into()));
    }

    #[test]
    fn creation_failure_is_a_case_failure() {
        let mut host = FakeHost::new();
        host.fail_create = true;
        let r = run_case(&mut host, &kernel(), Case::Hello);
        assert!(r
            .unwrap_err()
            .starts_with("cannot create VM hello: no usable hardware virtualization"));
    }
}
