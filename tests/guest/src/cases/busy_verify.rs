//! `busy-verify`: the guest of the two-node tests (docs/DESIGN.md,
//! "Non-test guests"). It runs for ever: the classic migration workload
//! over a buffer, `heartbeat N` every 10 ms with N consecutive, and after
//! every migration it observes (`HC_MIGRATION_STATUS`) a check of every
//! byte it wrote, printed as `busy-verify: migration N ok`,
//! `busy-verify: failed migration N: memory ok` or a `busy-verify: FAILED`
//! line (then it reports failure, which stops the VM).
//!
//! The heartbeat counter and the workload's model (finished sweeps) live
//! in guest memory like everything else, so after a migration they
//! continue where they were: a missing or repeated heartbeat, or a byte
//! that differs from the model, is a page the migration lost or left
//! stale.

use super::endless::Beats;
use super::migrate::{status, Sweeper};
use crate::layout::{align_down, PAGE_BYTES};
use crate::{fail, println, Env};

/// Largest workload buffer.
const BUFFER_MAX_BYTES: u64 = 16 << 20;
/// Heartbeats per second.
const BEATS_PER_S: u64 = 100;
/// Pages between two TSC reads (heartbeat due?).
const BEAT_CHECK_PAGES: u64 = 16;
/// Pages between two `HC_MIGRATION_STATUS` polls.
const STATUS_EVERY_PAGES: u64 = 256;

/// Run the workload for ever.
pub fn run(env: &Env) -> ! {
    let free = env.params.ram_bytes.saturating_sub(env.free_start);
    let bytes = align_down(BUFFER_MAX_BYTES.min(free / 2), PAGE_BYTES);
    if bytes < PAGE_BYTES {
        fail!("busy-verify: no free RAM for a workload buffer");
    }
    let mut w = Sweeper::new(env, 0, bytes);
    println!(
        "busy-verify: workload over {} pages at GPA {:#x}",
        w.pages, w.start
    );
    let mut beats = Beats::new(BEATS_PER_S);
    let mut seen = status();
    loop {
        for page in 0..w.pages {
            if page % BEAT_CHECK_PAGES == 0 {
                beats.tick();
            }
            if page % STATUS_EVERY_PAGES == 0 {
                let now = status();
                if now != seen {
                    check("busy-verify", &w, page, seen, now);
                    seen = now;
                }
            }
            w.touch(page);
        }
        w.sweeps += 1;
    }
}

/// The migration counters changed from `before` to `now` while the loop
/// stands at `page`: check every byte and say so, lines tagged `tag`
/// (the case's name).
pub(super) fn check(tag: &str, w: &Sweeper, page: u64, before: (u64, u64), now: (u64, u64)) {
    let (completed, failed) = now;
    let what = if completed != before.0 {
        ("migration", completed)
    } else {
        ("failed migration", failed)
    };
    if let Some((bad, got, want)) = w.first_mismatch(page) {
        println!(
            "{}: FAILED {} {}: page {} (GPA {:#x}) holds {}, expected {}",
            tag,
            what.0,
            what.1,
            bad,
            w.gpa(bad),
            got,
            want
        );
        fail!(
            "{}: {} {}: page {} (GPA {:#x}) holds {}, expected {} ({} sweeps, loop at page {})",
            tag,
            what.0,
            what.1,
            bad,
            w.gpa(bad),
            got,
            want,
            w.sweeps,
            page
        );
    }
    if completed != before.0 {
        println!("{}: migration {} ok", tag, completed);
    }
    if failed != before.1 {
        println!("{}: failed migration {}: memory ok", tag, failed);
    }
}
