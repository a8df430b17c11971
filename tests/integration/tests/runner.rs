//! qemu-runner as a user drives it: boot nodes, read what it prints.
//! Each boot takes seconds under TCG, so these are few.

use integration_tests::{require_qemu, runner};

#[test]
fn hello_and_cpuid_pass() {
    require_qemu();
    let run = runner(&[
        "guest-test",
        "--arch",
        "svm",
        "hello",
        "cpuid",
        "--timeout",
        "180",
    ]);
    let t = run.transcript();
    assert!(run.success, "guest-test hello cpuid failed:\n{t}");
    assert!(
        run.has_line("[hello] Hello from the hvmigrate guest"),
        "no hello console line:\n{t}"
    );
    assert!(run.has_line("case hello: ok"), "{t}");
    assert!(run.has_line("case cpuid: ok"), "{t}");
    assert_eq!(run.last_line(), "2 passed, 0 failed", "{t}");
}

#[test]
fn unknown_case_fails() {
    require_qemu();
    let run = runner(&[
        "guest-test",
        "--arch",
        "svm",
        "no-such-case",
        "--timeout",
        "120",
    ]);
    let t = run.transcript();
    assert!(!run.success, "an unknown case must fail the run:\n{t}");
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("case no-such-case: FAILED")),
        "{t}"
    );
    assert_eq!(run.last_line(), "0 passed, 1 failed", "{t}");
}

#[test]
fn bench_exits_prints_figures() {
    require_qemu();
    let run = runner(&["bench", "exits", "--arch", "svm", "--timeout", "180"]);
    let t = run.transcript();
    assert!(run.success, "bench exits failed:\n{t}");
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("bench exits: hypercall_roundtrips_per_s="))
        .unwrap_or_else(|| panic!("no bench line from the node:\n{t}"));
    for key in [
        "hypercall_roundtrips_per_s",
        "raw_roundtrips_per_s",
        "ratio_pct",
    ] {
        let value: f64 = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} missing or not a number in {line:?}"));
        assert!(value > 0.0, "{key} = {value} in {line:?}");
    }
    assert!(run.stdout.contains("raw VMRUN round trips/s"), "{t}");
}

#[test]
fn unsupported_arch_is_rejected_clearly() {
    let run = runner(&["guest-test", "--arch", "arm", "hello"]);
    assert!(!run.success);
    assert!(
        run.stderr
            .contains("unknown --arch \"arm\" (expected one of: svm, vmx, svm-bochs)"),
        "{}",
        run.transcript()
    );
}

/// The command line as a user meets it: generated help for commands and
/// subcommands (exit 0), usage errors on stderr with exit status 2, shell
/// completions. No emulator is started.
#[test]
fn help_usage_errors_and_completions() {
    let help = runner(&["help", "guest-test"]);
    assert_eq!(help.code, Some(0), "{}", help.transcript());
    assert!(
        help.stdout
            .contains("Usage: qemu-runner guest-test [OPTIONS] [CASE]...")
            && help.stdout.contains("--accel <ACCEL>"),
        "{}",
        help.transcript()
    );
    let hvctl = runner(&["hvctl", "help", "vm", "create"]);
    assert_eq!(hvctl.code, Some(0), "{}", hvctl.transcript());
    assert!(
        hvctl.stdout.contains("--memory <SIZE>") && hvctl.stdout.contains("--guest <CASE>"),
        "{}",
        hvctl.transcript()
    );
    for args in [
        &["guest-test", "--bogus"][..],
        &["cluster", "up", "--nodes", "0"][..],
        &["hvctl", "vm", "create", "web"][..],
        &["hvctl", "host", "set"][..],
    ] {
        let run = runner(args);
        assert_eq!(run.code, Some(2), "{args:?}: {}", run.transcript());
        assert!(
            run.stderr.starts_with("error: ") && run.stdout.is_empty(),
            "{args:?}: {}",
            run.transcript()
        );
    }
    let bash = runner(&["completions", "bash"]);
    assert!(
        bash.success
            && bash.stdout.contains("complete -F _qemu__runner")
            && bash.stdout.contains("guest-test"),
        "{}",
        bash.transcript()
    );
    let fish = runner(&["hvctl", "completions", "fish"]);
    assert!(
        fish.success && fish.stdout.contains("complete -c hvctl"),
        "{}",
        fish.transcript()
    );
}
