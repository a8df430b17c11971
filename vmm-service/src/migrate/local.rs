//! Moves within the node for the modes that drive one VM themselves (the
//! test cases, the demo): [`migrate_local`] runs the node's own migration
//! jobs ([`Migrations`], source and receiver over an in-memory pipe, the
//! same code a managed node runs between nodes) in a small loop with the
//! scheduler until the move ended, and returns the VM that runs.
//!
//! The destination VM has the source VM's name, so the console prefix
//! `[NAME]` does not change; both exist only during the migration, and only
//! one of them is ever runnable.

use super::channel::Holds;
use super::set::{Migrations, MoveRequest};
use super::GUEST_SLICE_NS;
use crate::mgmt::jobs::JobTable;
use crate::sched::{ProgressLog, Scheduler};
use crate::vm::Vm;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use hvcore::host::Host;
use hvmgmt::auth::ClusterKey;
use migration::{MigrationReport, MigrationResult, Policy};

/// The node name a move within the node uses in test and demo modes.
pub const LOCAL_NODE: &str = "local";

/// Test hooks of one move within the node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Break the source-to-destination pipe after this many bytes
    /// (`MemPipe::fail_after`; the bytes are sealed frames).
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
/// under `policy`, running the guest between engine steps (the node's
/// migration jobs over an in-memory pipe), and print one
/// `migration-report {json}` line. Returns the VM that runs afterwards.
/// A destination that cannot be created fails the migration at once (the
/// VM keeps running).
pub fn migrate_local(host: &mut dyn Host, vm: Vm, policy: Policy, faults: Faults) -> LocalOutcome {
    let mut secret = [0u8; 32];
    host.entropy(&mut secret);
    // 32 bytes is within the key's limits.
    let key = match ClusterKey::from_bytes(&secret) {
        Ok(k) => k,
        Err(_) => unreachable!("a 32-byte cluster key is valid"),
    };
    let mut migrations = Migrations::new(host, LOCAL_NODE, key, 0, Vec::new(), false);
    let mut jobs = JobTable::new();
    let name = String::from(vm.name());
    let mut vms = vec![vm];
    let req = MoveRequest {
        vm: name,
        to: LOCAL_NODE.into(),
        policy,
        encrypt: false,
        faults,
        holds: Holds::default(),
        include_storage: false,
        store: None,
        quick: false,
    };
    let job = match migrations.start(host, &mut vms, &mut jobs, req) {
        Ok(j) => j,
        Err(e) => {
            let vm = vms.pop().expect("the VM is still there");
            return LocalOutcome {
                report: refused_report(vm.ram_bytes(), e.message),
                vm,
            };
        }
    };
    let mut sched = Scheduler::default();
    let mut progress = ProgressLog::default();
    loop {
        migrations.drive(host, &mut vms, &mut jobs);
        let ended = jobs.state(job).is_none_or(|s| s.is_final());
        if ended && !migrations.is_active() {
            break;
        }
        let deadline = host.now_ns().saturating_add(GUEST_SLICE_NS);
        sched.run(host, &mut vms, Some(deadline), &mut progress);
    }
    let report = migrations
        .report(job)
        .cloned()
        .unwrap_or_else(|| refused_report(0, "the migration left no report".into()));
    // Exactly one VM is left: the destination after a completed move, the
    // source otherwise.
    debug_assert_eq!(vms.len(), 1);
    let vm = if report.result == MigrationResult::Completed {
        vms.pop()
    } else {
        vms.into_iter().next()
    };
    LocalOutcome {
        vm: vm.expect("one VM remains"),
        report,
    }
}

fn refused_report(ram_bytes: u64, error: String) -> MigrationReport {
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
        pause_us: Default::default(),
    }
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
    use crate::migrate::{TRACKER_PML, TRACKER_WRITE_PROTECT};
    use crate::testing::{FakeHost, FakeMemory, FakeVcpu, Program};
    use alloc::boxed::Box;
    use alloc::format;
    use alloc::rc::Rc;
    use core::cell::RefCell;
    use hvcore::abi::{HC_DIRTY_LOG_CHECK, HC_DIRTY_LOG_DISABLE, HC_DIRTY_LOG_ENABLE, HC_ERR_BUSY};
    use hvcore::addr::Gpa;
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
        assert!(
            report.contains("\"dirty_tracker\":\"write-protect\",\"verified\":true,\"pause_us\":{")
        );
    }

    /// A vCPU inside an NMI handler (NMIs blocked until its IRET) and in
    /// an STI shadow keeps both across the move: the record carries them
    /// (stream version 3) and the destination's vCPU restores them.
    #[test]
    fn nmi_blocking_and_the_interrupt_shadow_move_with_the_vcpu() {
        let mut host = host();
        let vm = started(
            &mut host,
            Box::new(|v: &mut FakeVcpu, _: &mut FakeMemory| {
                v.nmi_blocked = true;
                v.shadow = true;
                VmExit::ExternalInterrupt
            }),
        );
        let out = migrate_local(&mut host, vm, policy(), Faults::default());
        assert_eq!(
            out.report.result,
            MigrationResult::Completed,
            "{:?}",
            out.report
        );
        let mut vm = out.vm;
        let st = vm.partition().vcpu().save_state();
        assert!(st.nmi_blocked && st.interrupt_shadow, "{st:?}");
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
        let e = out.report.error.unwrap();
        assert!(
            e.starts_with("node local refused: cannot create the VM: "),
            "{e}"
        );
        assert!(out.vm.is_runnable());
        assert!(host.console.contains("migration-report {"));
    }
}
