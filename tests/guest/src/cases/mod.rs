//! The cases, by command-line name. Test cases end with `HC_TEST_RESULT`;
//! the non-test guests (`heartbeat`, `dirty-demo`, `bench-hypercall`,
//! `busy-verify`, `disk-verify`, `disk-beat`) run for ever.

mod basic;
mod busy_verify;
mod dirty_log;
mod disk;
mod endless;
mod interrupt;
mod memory;
mod migrate;
mod two_vms;

use crate::Env;

/// Run the case the command line names.
pub fn run(env: &Env) -> ! {
    let Some(case) = env.args.case else {
        crate::fail!("no case= on the command line");
    };
    use hvcore::abi::case as name;
    match case {
        name::HELLO => basic::hello(),
        name::CPUID => basic::cpuid(),
        name::MEMORY => memory::run(env),
        name::DIRTY_LOG => dirty_log::run(env),
        name::BAD_MSR => basic::bad_msr(),
        name::TRIPLE_FAULT => basic::triple_fault(),
        name::TWO_VMS => two_vms::run(env),
        name::INTERRUPT => interrupt::run(),
        name::LOCAL_MIGRATE_IDLE => migrate::idle(),
        name::LOCAL_MIGRATE_BUSY => migrate::busy(env, 16 << 20, name::LOCAL_MIGRATE_BUSY),
        name::LOCAL_MIGRATE_ABORT => migrate::abort(env),
        name::LOCAL_MIGRATE_CONVERGE => migrate::busy(env, 8 << 20, name::LOCAL_MIGRATE_CONVERGE),
        name::LOCAL_MIGRATE_TAMPER => migrate::tamper(env),
        name::VIRTIO_BLK => disk::virtio_blk(),
        "heartbeat" => endless::heartbeat(),
        "dirty-demo" => endless::dirty_demo(env),
        "bench-hypercall" => endless::bench_hypercall(),
        "busy-verify" => busy_verify::run(env),
        "disk-verify" => disk::disk_verify(env),
        "disk-beat" => disk::disk_beat(),
        other => crate::fail!("unknown case {}", other),
    }
}
