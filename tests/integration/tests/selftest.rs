//! The backend smoke test, booted as a user would: `node --append
//! selftest=2` runs `hypervisor::virt::selftest` (exit decoding, dirty
//! logging, timer preemption, event re-injection, ASID sharing, vCPU state
//! round trip, triple fault, no frame leaks) instead of the service.

use integration_tests::{require_qemu, runner};

#[test]
fn backend_selftest_passes_under_qemu_svm() {
    require_qemu();
    let run = runner(&[
        "node",
        "--arch",
        "svm",
        "--append",
        "selftest=2",
        "--timeout",
        "180",
    ]);
    let t = run.transcript();
    assert!(run.has_line("selftest: ok"), "selftest did not pass:\n{t}");
    assert!(run.has_line("hvmigrate: shutdown code=0"), "{t}");
    assert!(!run.stdout.contains("HYPERVISOR"), "{t}");
}
