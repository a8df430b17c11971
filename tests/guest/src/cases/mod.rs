//! The cases, by command-line name. Test cases end with `HC_TEST_RESULT`;
//! the non-test guests (`heartbeat`, `dirty-demo`, `bench-hypercall`) run
//! for ever.

mod basic;
mod dirty_log;
mod endless;
mod memory;
mod migrate;
mod two_vms;

use crate::Env;

/// Run the case the command line names.
pub fn run(env: &Env) -> ! {
    let Some(case) = env.args.case else {
        crate::fail!("no case= on the command line");
    };
    match case {
        "hello" => basic::hello(),
        "cpuid" => basic::cpuid(),
        "memory" => memory::run(env),
        "dirty-log" => dirty_log::run(env),
        "bad-msr" => basic::bad_msr(),
        "triple-fault" => basic::triple_fault(),
        "two-vms" => two_vms::run(env),
        "local-migrate-idle" => migrate::idle(),
        "local-migrate-busy" => migrate::busy(env, 16 << 20, "local-migrate-busy"),
        "local-migrate-abort" => migrate::abort(env),
        "local-migrate-converge" => migrate::busy(env, 8 << 20, "local-migrate-converge"),
        "heartbeat" => endless::heartbeat(),
        "dirty-demo" => endless::dirty_demo(env),
        "bench-hypercall" => endless::bench_hypercall(),
        other => crate::fail!("unknown case {}", other),
    }
}
