//! The live-migration cases (docs/DESIGN.md, "Test cases" 8-11). The node
//! migrates the VM after the guest's first `HC_PROGRESS`; the guest learns
//! of migrations by polling `HC_MIGRATION_STATUS` (RAX = completed, RDI =
//! failed or cancelled) and then checks what a migration must preserve:
//!
//! * `local-migrate-idle`: heartbeats continue, the TSC never goes back;
//! * `local-migrate-busy` / `-converge`: the classic workload (one byte in
//!   every page of a buffer incremented in a loop) is interrupted by the
//!   switch-over; afterwards every byte must equal the number of finished
//!   sweeps, plus one in the pages before the one where the loop stopped;
//! * `local-migrate-abort`: a pattern region and the workload's bytes are
//!   intact after the failed migration (the VM stayed) and again after the
//!   one that completed;
//! * `local-migrate-tamper`: the workload, while the guest keeps calling
//!   the dirty-log hypercalls (ENABLE, CHECK, DISABLE) that act on the log
//!   its own migration reads: they must be refused (`HC_ERR_BUSY`) while
//!   the migration runs, the migration must complete (verified) and every
//!   workload byte must be right afterwards.

use crate::arch::rdtsc;
use crate::hypercall::{self, err_name};
use crate::layout::{align_down, pattern, PAGE_BYTES};
use crate::{fail, println, report, Env};
use hvcore::abi::{DIRTY_TRACKER_WRITE_PROTECT, HC_ERR_BUSY, HC_ERR_INVALID};

/// Pages between two `HC_MIGRATION_STATUS` polls inside a sweep.
const POLL_EVERY_PAGES: u64 = 256;

/// `(completed, failed)` migrations of this VM so far.
pub(super) fn status() -> (u64, u64) {
    let r = hypercall::migration_status();
    if r.is_err() {
        fail!("HC_MIGRATION_STATUS failed: {}", hypercall::err_name(r.rax));
    }
    (r.rax, r.rdi)
}

/// The classic migration workload over `pages` pages at `start`: sweep
/// after sweep, one byte per page incremented.
pub(super) struct Sweeper {
    pub(super) start: u64,
    pub(super) pages: u64,
    /// Finished sweeps (each page's byte is `sweeps` mod 256 between
    /// sweeps).
    pub(super) sweeps: u64,
}

impl Sweeper {
    pub(super) fn new(env: &Env, offset: u64, bytes: u64) -> Self {
        let start = env.free_start + offset;
        if start + bytes > env.params.ram_bytes {
            fail!(
                "workload buffer {:#x}+{:#x} does not fit in RAM ({:#x})",
                start,
                bytes,
                env.params.ram_bytes
            );
        }
        Self {
            start,
            pages: bytes / PAGE_BYTES,
            sweeps: 0,
        }
    }

    fn byte(&self, page: u64) -> *mut u8 {
        (self.start + page * PAGE_BYTES) as *mut u8
    }

    /// Increment page `page`'s byte (one step of a sweep).
    pub(super) fn touch(&self, page: u64) {
        let p = self.byte(page);
        // SAFETY: the buffer is free guest RAM inside ram_bytes (checked in
        // `new`), identity-mapped, owned by no Rust object; volatile keeps
        // every access.
        unsafe { p.write_volatile(p.read_volatile().wrapping_add(1)) };
    }

    /// The first byte that is not as the loop left it when it stood at
    /// `stopped_at`: `(page, found, expected)`.
    pub(super) fn first_mismatch(&self, stopped_at: u64) -> Option<(u64, u8, u8)> {
        (0..self.pages).find_map(|page| {
            let want = (self.sweeps + u64::from(page < stopped_at)) as u8;
            // SAFETY: as in `touch`.
            let got = unsafe { self.byte(page).read_volatile() };
            (got != want).then_some((page, got, want))
        })
    }

    /// GPA of page `page`'s byte.
    pub(super) fn gpa(&self, page: u64) -> u64 {
        self.byte(page) as u64
    }

    /// Sweep until `stop()` (polled every [`POLL_EVERY_PAGES`] pages)
    /// holds; returns the page the sweep stopped at (pages before it are
    /// one ahead). `after_sweep` runs after each full sweep.
    fn run_until(
        &mut self,
        mut stop: impl FnMut() -> bool,
        mut after_sweep: impl FnMut(u64),
    ) -> u64 {
        loop {
            for page in 0..self.pages {
                if page % POLL_EVERY_PAGES == 0 && stop() {
                    return page;
                }
                self.touch(page);
            }
            self.sweeps += 1;
            after_sweep(self.sweeps);
        }
    }

    /// Every byte as the loop left it when it stopped at `stopped_at`.
    fn verify(&self, stopped_at: u64) {
        if let Some((page, got, want)) = self.first_mismatch(stopped_at) {
            fail!(
                "workload byte of page {} (GPA {:#x}) is {}, expected {} ({} sweeps, stopped at page {})",
                page,
                self.gpa(page),
                got,
                want,
                self.sweeps,
                stopped_at
            );
        }
    }

    /// Finish the interrupted sweep so the loop can go on.
    fn finish_sweep(&mut self, stopped_at: u64) {
        for page in stopped_at..self.pages {
            self.touch(page);
        }
        self.sweeps += 1;
    }
}

/// `local-migrate-idle`: `heartbeat N` about every 50 ms; after the node
/// says the VM was migrated, three more heartbeats, with the TSC never
/// going back, then ok.
pub fn idle() -> ! {
    let period = super::endless::tsc_hz() / 20;
    let mut deadline = rdtsc();
    let mut last_tsc = deadline;
    let mut n: u64 = 0;
    let mut moved_at = None;
    loop {
        n += 1;
        println!("heartbeat {}", n);
        if n == 1 {
            hypercall::progress(1);
        }
        deadline = deadline.wrapping_add(period);
        while (rdtsc().wrapping_sub(deadline) as i64) < 0 {
            core::hint::spin_loop();
        }
        let now = rdtsc();
        if now < last_tsc {
            fail!("TSC went back from {} to {}", last_tsc, now);
        }
        last_tsc = now;
        let (completed, failed) = status();
        if failed != 0 {
            fail!(
                "a migration failed ({} failed, {} completed)",
                failed,
                completed
            );
        }
        match moved_at {
            None if completed >= 1 => {
                println!("local-migrate-idle: migrated before heartbeat {}", n + 1);
                moved_at = Some(n);
            }
            Some(m) if n >= m + 3 => {
                report::ok("heartbeat went on after the migration, TSC monotonic")
            }
            _ => {}
        }
    }
}

/// `local-migrate-busy` (16 MiB) and `local-migrate-converge` (8 MiB): the
/// workload until the node says the VM was migrated, then the check.
pub fn busy(env: &Env, buffer_bytes: u64, name: &str) -> ! {
    let mut w = Sweeper::new(env, 0, buffer_bytes);
    println!(
        "{}: incrementing one byte in each of {} pages at GPA {:#x}",
        name, w.pages, w.start
    );
    let stopped_at = w.run_until(
        || status().0 >= 1,
        |sweeps| {
            if sweeps == 1 {
                hypercall::progress(1);
            }
        },
    );
    let (_, failed) = status();
    if failed != 0 {
        fail!(
            "{} migration(s) failed before the one that completed",
            failed
        );
    }
    w.verify(stopped_at);
    println!(
        "{}: after {} sweeps, stopped at page {}: every byte as expected",
        name, w.sweeps, stopped_at
    );
    report::ok("workload bytes intact after the switch-over")
}

/// Bytes of the pattern region of `local-migrate-abort`.
const ABORT_PATTERN_BYTES: u64 = 8 << 20;
/// Bytes of its workload buffer (after the pattern region).
const ABORT_WORKLOAD_BYTES: u64 = 4 << 20;

fn check_pattern(start: u64, end: u64, when: &str) {
    let mut gpa = start;
    while gpa < end {
        // SAFETY: [start, end) is free guest RAM this case filled, inside
        // ram_bytes, owned by no Rust object.
        let got = unsafe { (gpa as *const u64).read_volatile() };
        if got != pattern(gpa) {
            fail!(
                "{}: pattern mismatch at GPA {:#x}: {:#018x} instead of {:#018x}",
                when,
                gpa,
                got,
                pattern(gpa)
            );
        }
        gpa += 8;
    }
}

/// `local-migrate-abort`: pattern + workload; after the failed migration
/// both are intact and `HC_PROGRESS(2)` tells the node; after the completed
/// one both are intact again, then ok.
pub fn abort(env: &Env) -> ! {
    let start = env.free_start;
    let end = align_down(start + ABORT_PATTERN_BYTES, 8);
    if end + ABORT_WORKLOAD_BYTES > env.params.ram_bytes {
        fail!("local-migrate-abort: buffers do not fit in RAM");
    }
    let mut gpa = start;
    while gpa < end {
        // SAFETY: as in `check_pattern`.
        unsafe { (gpa as *mut u64).write_volatile(pattern(gpa)) };
        gpa += 8;
    }
    let mut w = Sweeper::new(env, ABORT_PATTERN_BYTES, ABORT_WORKLOAD_BYTES);
    println!(
        "local-migrate-abort: pattern over GPA {:#x}..{:#x}, workload over {} pages",
        start, end, w.pages
    );
    // Until the failed migration.
    let at = w.run_until(
        || status().1 >= 1,
        |sweeps| {
            if sweeps == 1 {
                hypercall::progress(1);
            }
        },
    );
    if status().0 != 0 {
        fail!("a migration completed before the failed one was seen");
    }
    check_pattern(start, end, "after the failed migration");
    w.verify(at);
    w.finish_sweep(at);
    println!("local-migrate-abort: memory intact after the failed migration, still running");
    hypercall::progress(2);
    // Until the one that completes.
    let at = w.run_until(|| status().0 >= 1, |_| {});
    check_pattern(start, end, "after the completed migration");
    w.verify(at);
    println!("local-migrate-abort: memory intact after the completed migration");
    report::ok("memory intact after the failed and after the completed migration")
}

/// Bytes of the `local-migrate-tamper` workload.
const TAMPER_WORKLOAD_BYTES: u64 = 8 << 20;

/// Results of the dirty-log calls `local-migrate-tamper` made.
#[derive(Default)]
struct Tampering {
    /// Calls the hypervisor carried out.
    done: u64,
    /// Calls refused with `HC_ERR_BUSY` (a migration owned the log).
    refused: u64,
}

impl Tampering {
    /// ENABLE, CHECK (against an empty bitmap: it collects and clears
    /// whatever the log holds) and DISABLE: each of them, carried out
    /// during pre-copy, would reset, steal from or stop the migration's
    /// dirty log.
    fn round(&mut self, bitmap: &[u64]) {
        let calls = [
            (
                "ENABLE",
                hypercall::dirty_log_enable(DIRTY_TRACKER_WRITE_PROTECT),
            ),
            ("CHECK", hypercall::dirty_log_check(bitmap)),
            ("DISABLE", hypercall::dirty_log_disable()),
        ];
        for (name, r) in calls {
            match r.rax {
                HC_ERR_BUSY => self.refused += 1,
                // CHECK after a refused ENABLE when the migration ended in
                // between: the log is off at the destination.
                HC_ERR_INVALID if name == "CHECK" => self.done += 1,
                _ if r.is_err() => {
                    fail!("HC_DIRTY_LOG_{}: {} ({:#x})", name, err_name(r.rax), r.rax)
                }
                _ => self.done += 1,
            }
        }
    }
}

/// `local-migrate-tamper`: the workload over 8 MiB; every
/// [`POLL_EVERY_PAGES`] pages the three dirty-log calls. Before the
/// migration they work; during it they must be refused; after it completed
/// (verified by the node) every workload byte must be as the loop left it,
/// and the calls work again.
pub fn tamper(env: &Env) -> ! {
    let mut w = Sweeper::new(env, 0, TAMPER_WORKLOAD_BYTES);
    // The bitmap for CHECK: one bit per frame, in free RAM after the
    // workload, left all zero.
    let bitmap_gpa = w.start + TAMPER_WORKLOAD_BYTES;
    let words = (env.params.ram_bytes / PAGE_BYTES).div_ceil(64) as usize;
    if bitmap_gpa + words as u64 * 8 > env.params.ram_bytes {
        fail!("local-migrate-tamper: no room for the bitmap");
    }
    // SAFETY: free guest RAM after the workload, inside ram_bytes (checked
    // above), identity-mapped, u64-aligned (page-aligned), owned by nothing
    // else; fresh RAM is zero.
    let bitmap = unsafe { core::slice::from_raw_parts(bitmap_gpa as *const u64, words) };
    println!(
        "local-migrate-tamper: incrementing one byte in each of {} pages at GPA {:#x}, calling the dirty-log hypercalls every {} pages",
        w.pages, w.start, POLL_EVERY_PAGES
    );
    let mut t = Tampering::default();
    t.round(bitmap);
    if t.refused != 0 {
        fail!("the dirty-log calls were refused before any migration");
    }
    let stopped_at = w.run_until(
        || {
            t.round(bitmap);
            let (completed, failed) = status();
            completed >= 1 || failed >= 1
        },
        |sweeps| {
            if sweeps == 1 {
                hypercall::progress(1);
            }
        },
    );
    let (completed, failed) = status();
    if failed != 0 || completed != 1 {
        fail!(
            "the migration did not complete ({} completed, {} failed)",
            completed,
            failed
        );
    }
    w.verify(stopped_at);
    if t.refused == 0 {
        fail!("no dirty-log call was refused: none ran during the migration");
    }
    let before = t.done;
    t.round(bitmap);
    if t.done != before + 3 {
        fail!("the dirty-log calls are still refused after the migration");
    }
    println!(
        "local-migrate-tamper: {} dirty-log calls refused during the migration, {} carried out; after {} sweeps, stopped at page {}: every byte as expected",
        t.refused, t.done, w.sweeps, stopped_at
    );
    report::ok("dirty-log calls refused during the migration, workload bytes intact")
}
