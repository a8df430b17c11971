//! What the runner prints after a run: the per-case summary of `guest-test`,
//! the dirty-rate summary of `demo`, the `bench exits` figures and the step
//! summary of `test`. Pure functions of a [`SerialLog`] and a few facts
//! about how the run ended, so every rule here is unit-tested.

use crate::markers::{BenchExits, CaseResult, DirtyRate, SerialLog};

/// The test cases, in the node's default order (one list for the node,
/// the guest kernel and the runner: `hvcore::abi::case`).
pub const ALL_CASES: [&str; 14] = hvcore::abi::case::ALL;

/// The console line the `hello` case must produce (checked by the runner
/// too, not only by the node).
pub const HELLO_CONSOLE: (&str, &str) = ("hello", "Hello from the hvmigrate guest");

/// One line of a summary: a name and ok or a reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub name: String,
    pub result: Result<(), String>,
}

/// The `guest-test` verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestSummary {
    /// One per requested case (then any extra case the node reported).
    pub cases: Vec<Outcome>,
    /// A node-level failure (hypervisor fault or panic), counted as failed.
    pub node: Option<String>,
}

impl TestSummary {
    /// Judge a run. `ended` says how the node output ended, for cases that
    /// never reported (e.g. `node output ended`, `timed out after 300 s`).
    pub fn build(requested: &[String], log: &SerialLog, ended: &str) -> Self {
        let no_result = match &log.fault {
            Some(fault) => format!("no result (node stopped: {fault})"),
            None => format!("no result ({ended})"),
        };
        let mut names: Vec<&str> = requested.iter().map(String::as_str).collect();
        for (name, _) in &log.cases {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
        let cases = names
            .into_iter()
            .map(|name| {
                let result = match log.case(name) {
                    None => Err(no_result.clone()),
                    Some(CaseResult::Failed(reason)) if reason.is_empty() => {
                        Err("(no reason given)".into())
                    }
                    Some(CaseResult::Failed(reason)) => Err(reason.clone()),
                    Some(CaseResult::Ok) => runner_check(name, log),
                };
                Outcome {
                    name: name.to_string(),
                    result,
                }
            })
            .collect();
        Self {
            cases,
            node: log.fault.clone(),
        }
    }

    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.result.is_ok()).count()
    }

    pub fn failed(&self) -> usize {
        self.cases.len() - self.passed() + usize::from(self.node.is_some())
    }

    pub fn all_passed(&self) -> bool {
        self.failed() == 0
    }

    /// `case NAME: ok|FAILED: reason` lines, a `node: FAILED` line if the
    /// hypervisor faulted, and the closing `N passed, N failed`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for case in &self.cases {
            match &case.result {
                Ok(()) => out.push_str(&format!("case {}: ok\n", case.name)),
                Err(reason) => out.push_str(&format!("case {}: FAILED: {}\n", case.name, reason)),
            }
        }
        if let Some(fault) = &self.node {
            out.push_str(&format!("node: FAILED: {fault}\n"));
        }
        out.push_str(&totals_line(self.passed(), self.failed()));
        out.push('\n');
        out
    }
}

/// Checks the runner makes itself on top of the node's verdict.
fn runner_check(case: &str, log: &SerialLog) -> Result<(), String> {
    if case == HELLO_CONSOLE.0 && !log.has_console_line(HELLO_CONSOLE.0, HELLO_CONSOLE.1) {
        return Err(format!(
            "node reported ok, but the console has no line \"[{}] {}\"",
            HELLO_CONSOLE.0, HELLO_CONSOLE.1
        ));
    }
    Ok(())
}

/// The plain closing line.
pub fn totals_line(passed: usize, failed: usize) -> String {
    format!("{passed} passed, {failed} failed")
}

/// `1234567.8` -> `1,234,568`.
pub fn group_thousands(value: f64) -> String {
    if !value.is_finite() {
        return value.to_string();
    }
    let rounded = value.round() as i128;
    let digits = rounded.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if rounded < 0 {
        out.insert(0, '-');
    }
    out
}

/// The `bench exits` report.
pub fn bench_report(b: &BenchExits) -> String {
    let verdict = if b.ratio_pct >= 80.0 {
        "meets"
    } else {
        "below"
    };
    format!(
        "bench exits (svm, QEMU TCG):\n\
         \x20 hypercall round trips/s : {}\n\
         \x20 raw VMRUN round trips/s : {}\n\
         \x20 ratio                   : {:.1}% ({} the 80% goal)\n",
        group_thousands(b.hypercall_per_s),
        group_thousands(b.raw_per_s),
        b.ratio_pct,
        verdict
    )
}

fn min_avg_max(values: impl Iterator<Item = f64> + Clone) -> (f64, f64, f64) {
    let n = values.clone().count().max(1) as f64;
    let min = values.clone().fold(f64::INFINITY, f64::min);
    let max = values.clone().fold(f64::NEG_INFINITY, f64::max);
    (min, values.sum::<f64>() / n, max)
}

/// The `demo` summary: a table of the samples and min/avg/max.
pub fn dirty_rate_report(rates: &[DirtyRate]) -> String {
    if rates.is_empty() {
        return "no dirty-rate samples: the node printed no `dirty-rate:` line\n".to_string();
    }
    let mut out = String::from(
        "dirty-page rate the hypervisor tracked for the guest (16 MiB buffer, 4 KiB pages):\n\
         \x20   time    pages/s      MiB/s     exits\n",
    );
    for r in rates {
        out.push_str(&format!(
            "{:>7.1}s {:>10} {:>10.1} {:>9}\n",
            r.t_ms / 1000.0,
            group_thousands(r.pages_per_s),
            r.mib_per_s,
            group_thousands(r.exits)
        ));
    }
    let (pmin, pavg, pmax) = min_avg_max(rates.iter().map(|r| r.pages_per_s));
    let (mmin, mavg, mmax) = min_avg_max(rates.iter().map(|r| r.mib_per_s));
    out.push_str(&format!(
        "{} samples; pages/s min {} avg {} max {}; MiB/s min {:.1} avg {:.1} max {:.1}\n",
        rates.len(),
        group_thousands(pmin),
        group_thousands(pavg),
        group_thousands(pmax),
        mmin,
        mavg,
        mmax
    ));
    out
}

/// The `test` steps' closing block: one line per step run, then the totals.
pub fn steps_report(steps: &[Outcome]) -> String {
    let mut out = String::new();
    for s in steps {
        match &s.result {
            Ok(()) => out.push_str(&format!("step {}: ok\n", s.name)),
            Err(why) => out.push_str(&format!("step {}: FAILED: {}\n", s.name, why)),
        }
    }
    let passed = steps.iter().filter(|s| s.result.is_ok()).count();
    out.push_str(&totals_line(passed, steps.len() - passed));
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::markers::parse_totals;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn last_line(s: &str) -> &str {
        s.lines().last().unwrap()
    }

    #[test]
    fn all_ok() {
        let log = SerialLog::from_text(
            "[hello] Hello from the hvmigrate guest\ncase hello: ok\ncase cpuid: ok\n2 passed, 0 failed\n",
        );
        let s = TestSummary::build(&names(&["hello", "cpuid"]), &log, "node output ended");
        assert!(s.all_passed());
        assert_eq!(
            s.render(),
            "case hello: ok\ncase cpuid: ok\n2 passed, 0 failed\n"
        );
    }

    #[test]
    fn missing_result_and_requested_order() {
        let log = SerialLog::from_text(
            "case cpuid: ok\ncase hello: FAILED: no hello line on the console\n",
        );
        let s = TestSummary::build(
            &names(&["hello", "cpuid", "memory"]),
            &log,
            "node output ended",
        );
        let text = s.render();
        assert_eq!(
            text,
            "case hello: FAILED: no hello line on the console\n\
             case cpuid: ok\n\
             case memory: FAILED: no result (node output ended)\n\
             1 passed, 2 failed\n"
        );
        assert_eq!(parse_totals(last_line(&text)), Some((1, 2)));
        assert!(!s.all_passed());
    }

    #[test]
    fn hello_needs_the_console_line_too() {
        let log = SerialLog::from_text("case hello: ok\n");
        let s = TestSummary::build(&names(&["hello"]), &log, "node output ended");
        assert!(
            matches!(&s.cases[0].result, Err(r) if r.contains("[hello] Hello from the hvmigrate guest"))
        );
        // The line from another VM does not count.
        let log = SerialLog::from_text("[cpuid] Hello from the hvmigrate guest\ncase hello: ok\n");
        assert!(!TestSummary::build(&names(&["hello"]), &log, "x").all_passed());
    }

    #[test]
    fn hypervisor_fault_fails_the_run() {
        let log = SerialLog::from_text(
            "[hello] Hello from the hvmigrate guest\ncase hello: ok\nHYPERVISOR FAULT: vector 14 (#PF) error 0x2\nrax=0\nhvmigrate: shutdown code=3\n",
        );
        let s = TestSummary::build(&names(&["hello", "cpuid"]), &log, "node output ended");
        let text = s.render();
        assert!(text.contains("case hello: ok\n"));
        assert!(text
            .contains("case cpuid: FAILED: no result (node stopped: HYPERVISOR FAULT: vector 14"));
        assert!(text.contains("node: FAILED: HYPERVISOR FAULT: vector 14 (#PF) error 0x2\n"));
        assert_eq!(last_line(&text), "1 passed, 2 failed");
        assert!(!s.all_passed());
    }

    #[test]
    fn panic_with_all_cases_reported_still_fails() {
        let log = SerialLog::from_text("case cpuid: ok\nHYPERVISOR PANIC at x.rs:1: boom\n");
        let s = TestSummary::build(&names(&["cpuid"]), &log, "timed out after 300 s");
        assert_eq!(last_line(&s.render()), "1 passed, 1 failed");
    }

    #[test]
    fn timeout_reason_and_unrequested_cases() {
        let log = SerialLog::from_text("case extra: ok\n");
        let s = TestSummary::build(&names(&["memory"]), &log, "timed out after 300 s");
        assert_eq!(
            s.render(),
            "case memory: FAILED: no result (timed out after 300 s)\ncase extra: ok\n1 passed, 1 failed\n"
        );
    }

    #[test]
    fn unknown_case_reported_by_node() {
        let log = SerialLog::from_text(
            "case no-such-case: FAILED: unknown case no-such-case\n0 passed, 1 failed\n",
        );
        let s = TestSummary::build(&names(&["no-such-case"]), &log, "node output ended");
        assert_eq!(
            s.render(),
            "case no-such-case: FAILED: unknown case no-such-case\n0 passed, 1 failed\n"
        );
    }

    #[test]
    fn thousands() {
        assert_eq!(group_thousands(0.0), "0");
        assert_eq!(group_thousands(999.4), "999");
        assert_eq!(group_thousands(1000.0), "1,000");
        assert_eq!(group_thousands(1234567.8), "1,234,568");
        assert_eq!(group_thousands(-65000.0), "-65,000");
    }

    #[test]
    fn bench_text() {
        let b = BenchExits {
            hypercall_per_s: 52000.0,
            raw_per_s: 61000.0,
            ratio_pct: 85.25,
        };
        let text = bench_report(&b);
        assert!(text.contains("hypercall round trips/s : 52,000"));
        assert!(text.contains("raw VMRUN round trips/s : 61,000"));
        assert!(
            text.contains("85.2% (meets the 80% goal)")
                || text.contains("85.3% (meets the 80% goal)")
        );
        let low = BenchExits {
            ratio_pct: 50.0,
            ..b
        };
        assert!(bench_report(&low).contains("below the 80% goal"));
    }

    #[test]
    fn dirty_rate_text() {
        assert!(dirty_rate_report(&[]).contains("no dirty-rate samples"));
        let rates = [
            DirtyRate {
                t_ms: 1000.0,
                pages_per_s: 4000.0,
                mib_per_s: 15.6,
                exits: 4100.0,
            },
            DirtyRate {
                t_ms: 2000.0,
                pages_per_s: 6000.0,
                mib_per_s: 23.4,
                exits: 6100.0,
            },
        ];
        let text = dirty_rate_report(&rates);
        assert!(
            text.contains("    1.0s      4,000       15.6     4,100"),
            "{text}"
        );
        assert!(text.contains(
            "2 samples; pages/s min 4,000 avg 5,000 max 6,000; MiB/s min 15.6 avg 19.5 max 23.4"
        ));
    }

    #[test]
    fn steps() {
        let steps = vec![
            Outcome {
                name: "fmt".into(),
                result: Ok(()),
            },
            Outcome {
                name: "clippy".into(),
                result: Err("exit status 101".into()),
            },
        ];
        let text = steps_report(&steps);
        assert_eq!(
            text,
            "step fmt: ok\nstep clippy: FAILED: exit status 101\n1 passed, 1 failed\n"
        );
    }
}
