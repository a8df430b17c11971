//! `two-vms` (roles a and b run at once on one physical CPU): a busy loop
//! that never halts and reports progress, so the node can see both VMs
//! advance while the other still runs (only timer preemption allows that).

use core::arch::asm;

use crate::hypercall::{self, err_name};
use crate::{fail, println, report, Env};

/// Progress reports per VM (>= 100 required).
const REPORTS: u64 = 200;
/// Loop iterations between reports: a few milliseconds under TCG, so a run
/// spans many scheduler time slices.
const SPIN_ITERATIONS: u64 = 2_000_000;

/// Burn `iterations` loop turns without touching memory or halting.
fn spin(iterations: u64) {
    // SAFETY: a register-only countdown loop.
    unsafe {
        asm!("2:", "dec {n}", "jnz 2b", n = inout(reg) iterations.max(1) => _, options(nomem, nostack));
    }
}

pub fn run(env: &Env) -> ! {
    let role = match env.args.role {
        Some(role @ ("a" | "b")) => role,
        Some(other) => fail!("two-vms: role must be a or b, got {:?}", other),
        None => fail!("two-vms: no role= on the command line"),
    };
    println!(
        "two-vms {}: busy loop with {} progress reports",
        role, REPORTS
    );
    for i in 0..REPORTS {
        spin(SPIN_ITERATIONS);
        let r = hypercall::progress(i);
        if r.is_err() {
            fail!("HC_PROGRESS({}): {} ({:#x})", i, err_name(r.rax), r.rax);
        }
    }
    println!("two-vms {}: done", role);
    report::ok("all progress reports made")
}
