//! Round-robin time sharing of the one physical CPU between VMs.
//!
//! Each runnable VM in turn gets a slice of [`SLICE_NS`] of host time
//! ([`Vm::run_slice`]); a VM that halts gives up the rest of its slice. The
//! guests' LAPIC-timer exits make sure a VM that never exits on its own still
//! comes back to the scheduler.
//!
//! Throttling (live migration's auto-converge) is the scheduler's: a VM
//! throttled to `p` percent sits out `t * p / (100 - p)` after a slice of
//! `t` ([`Vm::set_throttle`], [`Vm::note_slice`]), so it gets `100 - p`
//! percent of the time it would have had; while every runnable VM sits out,
//! [`Scheduler::run`] returns [`RunOutcome::Held`] and the node loop does
//! other work (the migration's engine). Because exactly one VM runs at a time, the
//! order of `HC_PROGRESS` reports across VMs is the order of slices: the
//! [`ProgressLog`] records it as runs of (VM index, reports), without any
//! work on the hot path.

use crate::vm::Vm;
use alloc::vec::Vec;
use hvcore::host::Host;

/// Length of a time slice in nanoseconds.
pub const SLICE_NS: u64 = 10_000_000;
/// Most runs a [`ProgressLog`] keeps (later runs are counted, not stored).
pub const PROGRESS_RUNS_MAX: usize = 4096;

/// Order of progress reports across VMs, as runs of consecutive reports by
/// the same VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgressLog {
    runs: Vec<(usize, u64)>,
    /// Runs not stored because the log was full.
    pub dropped_runs: u64,
}

impl ProgressLog {
    /// Record `reports` new reports by VM `vm`.
    pub fn record(&mut self, vm: usize, reports: u64) {
        if reports == 0 {
            return;
        }
        let full = self.runs.len() >= PROGRESS_RUNS_MAX;
        match self.runs.last_mut() {
            Some((last, n)) if *last == vm => *n += reports,
            _ if full => self.dropped_runs += 1,
            _ => self.runs.push((vm, reports)),
        }
    }
    /// The runs, oldest first.
    pub fn runs(&self) -> &[(usize, u64)] {
        &self.runs
    }
    /// Total reports by `vm` in stored runs.
    pub fn reports(&self, vm: usize) -> u64 {
        self.runs
            .iter()
            .filter(|(v, _)| *v == vm)
            .map(|(_, n)| n)
            .sum()
    }
    /// Whether `vm` reported progress both before and after some report of
    /// another VM, i.e. it was preempted mid-stream while another VM made
    /// progress.
    pub fn interrupted(&self, vm: usize) -> bool {
        let first = self.runs.iter().position(|(v, _)| *v == vm);
        let last = self.runs.iter().rposition(|(v, _)| *v == vm);
        match (first, last) {
            (Some(f), Some(l)) => self.runs[f..l].iter().any(|(v, _)| *v != vm),
            _ => false,
        }
    }
}

/// Why [`Scheduler::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// No VM is runnable any more.
    AllStopped,
    /// The deadline passed.
    Deadline,
    /// Every runnable VM is held back by its throttle for now.
    Held,
}

/// The round-robin scheduler.
#[derive(Clone, Debug)]
pub struct Scheduler {
    /// Slice length in nanoseconds.
    pub slice_ns: u64,
    next: usize,
}

impl Default for Scheduler {
    fn default() -> Self {
        Self::new(SLICE_NS)
    }
}

impl Scheduler {
    /// A scheduler with slices of `slice_ns`.
    pub fn new(slice_ns: u64) -> Self {
        Self { slice_ns, next: 0 }
    }

    /// Run `vms` round robin until none is runnable or the host clock passes
    /// `deadline_ns`. Progress reports are recorded in `progress`.
    pub fn run(
        &mut self,
        host: &mut dyn Host,
        vms: &mut [Vm],
        deadline_ns: Option<u64>,
        progress: &mut ProgressLog,
    ) -> RunOutcome {
        loop {
            let now = host.now_ns();
            if deadline_ns.is_some_and(|d| now >= d) {
                return RunOutcome::Deadline;
            }
            let n = vms.len();
            let Some(i) = (0..n)
                .map(|k| (self.next + k) % n)
                .find(|&i| vms[i].runnable_at(now))
            else {
                if vms.iter().any(|v| v.is_held(now)) {
                    return RunOutcome::Held;
                }
                return RunOutcome::AllStopped;
            };
            self.next = (i + 1) % n;
            let mut slice_end = now.saturating_add(self.slice_ns);
            if let Some(d) = deadline_ns {
                slice_end = slice_end.min(d);
            }
            let vm = &mut vms[i];
            let before = vm.counters().progress_reports;
            vm.run_slice(host, slice_end);
            vm.note_slice(now, host.now_ns());
            progress.record(i, vm.counters().progress_reports - before);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::build::kernel;
    use crate::testing::{FakeHost, FakeMemory, FakeVcpu};
    use hvcore::abi::HC_PROGRESS;
    use hvcore::vcpu::VmExit;

    #[test]
    fn two_spinning_vms_share_the_cpu_fairly() {
        let mut host = FakeHost::new();
        host.ns_per_run = 1_000_000; // every run is a 1 ms timer tick
        let mut vms: Vec<Vm> = ["a", "b"]
            .iter()
            .map(|n| Vm::create(&mut host, n, 4 << 20, &kernel(), "").unwrap())
            .collect();
        vms.iter_mut().for_each(Vm::start);
        let mut s = Scheduler::default();
        let deadline = host.clock.get() + 1_000_000_000;
        let mut log = ProgressLog::default();
        assert_eq!(
            s.run(&mut host, &mut vms, Some(deadline), &mut log),
            RunOutcome::Deadline
        );
        let (a, b) = (vms[0].counters(), vms[1].counters());
        assert_eq!(a.slices + b.slices, 100, "1 s of 10 ms slices");
        assert!(a.slices.abs_diff(b.slices) <= 1);
        assert!(a.exits.abs_diff(b.exits) <= 10);
        assert!(host.clock.get() >= deadline);
    }

    #[test]
    fn progress_interleaves_and_stopped_vms_drop_out() {
        let mut host = FakeHost::new();
        host.ns_per_run = 100_000;
        for _ in 0..2 {
            let mut i = 0u64;
            host.programs.push_back(alloc::boxed::Box::new(
                move |v: &mut FakeVcpu, _: &mut FakeMemory| {
                    i += 1;
                    if i > 1000 {
                        v.regs.rax = hvcore::abi::HC_TEST_RESULT;
                        (v.regs.rdi, v.regs.rdx) = (0, 0);
                        return VmExit::Hypercall;
                    }
                    if i.is_multiple_of(5) {
                        v.regs.rax = HC_PROGRESS;
                        v.regs.rdi = i;
                        return VmExit::Hypercall;
                    }
                    VmExit::ExternalInterrupt
                },
            ));
        }
        let mut vms: Vec<Vm> = ["a", "b"]
            .iter()
            .map(|n| Vm::create(&mut host, n, 4 << 20, &kernel(), "").unwrap())
            .collect();
        vms.iter_mut().for_each(Vm::start);
        let mut log = ProgressLog::default();
        let out = Scheduler::default().run(&mut host, &mut vms, None, &mut log);
        assert_eq!(out, RunOutcome::AllStopped);
        assert_eq!((log.reports(0), log.reports(1)), (200, 200));
        assert!(log.interrupted(0) && log.interrupted(1));
        // About 100 runs per slice, so about 20 reports per run, alternating.
        assert!(log.runs().len() >= 10);
        for (k, (vm, n)) in log.runs().iter().enumerate() {
            assert_eq!(*vm, k % 2);
            assert!((19..=21).contains(n), "{n}");
        }
    }

    /// A VM throttled to 75 % gets a quarter of the time of one that is
    /// not; a throttled VM alone makes `run` return `Held` between slices.
    #[test]
    fn throttled_vms_get_their_share() {
        let mut host = FakeHost::new();
        host.ns_per_run = 1_000_000;
        let mut vms: Vec<Vm> = ["a", "b"]
            .iter()
            .map(|n| Vm::create(&mut host, n, 4 << 20, &kernel(), "").unwrap())
            .collect();
        vms.iter_mut().for_each(Vm::start);
        vms[1].set_throttle(75);
        let mut s = Scheduler::default();
        let mut log = ProgressLog::default();
        let deadline = host.clock.get() + 2_000_000_000;
        while s.run(&mut host, &mut vms, Some(deadline), &mut log) != RunOutcome::Deadline {}
        // b runs a slice, then sits out three while a runs: a quarter of
        // the time (the rest goes to a).
        let (a, b) = (vms[0].counters().exits, vms[1].counters().exits);
        assert!((b * 100 / (a + b)).abs_diff(25) <= 2, "{a} {b}");
        // Alone: held between slices, for three times its slice.
        let mut one = vec![Vm::create(&mut host, "c", 4 << 20, &kernel(), "").unwrap()];
        one[0].start();
        one[0].set_throttle(75);
        let t0 = host.clock.get();
        assert_eq!(
            s.run(&mut host, &mut one, Some(t0 + 1_000_000_000), &mut log),
            RunOutcome::Held
        );
        let ran = host.clock.get() - t0;
        assert_eq!(ran, SLICE_NS);
        assert!(!one[0].runnable_at(host.clock.get() + 3 * SLICE_NS - 1));
        assert!(one[0].runnable_at(host.clock.get() + 3 * SLICE_NS));
        one[0].set_throttle(0);
        assert!(one[0].runnable_at(host.clock.get()));
    }

    #[test]
    fn progress_log_interleave_logic() {
        let mut log = ProgressLog::default();
        log.record(0, 5);
        log.record(0, 5);
        log.record(1, 0);
        log.record(1, 3);
        assert_eq!(log.runs(), [(0, 10), (1, 3)]);
        assert!(!log.interrupted(0) && !log.interrupted(1));
        log.record(0, 1);
        assert!(log.interrupted(0) && !log.interrupted(1));
        log.record(1, 1);
        assert!(log.interrupted(1));
        assert!(!log.interrupted(7));
        for i in 0..PROGRESS_RUNS_MAX + 10 {
            log.record(i % 2, 1);
        }
        assert_eq!(log.runs().len(), PROGRESS_RUNS_MAX);
        assert!(log.dropped_runs > 0);
    }
}
