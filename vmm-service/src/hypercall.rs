//! Hypercalls (`hvcore::abi`): number in RAX, arguments in RDI, RSI, RDX;
//! result in RAX, extra results in RDI and RSI.
//!
//! Arguments are allegations. A bad argument (GPA outside RAM, length over a
//! cap, an undefined flag value) is answered with an error code in RAX and
//! the guest continues: that is the guest's problem to handle, not a reason
//! to stop it. Only `HC_TEST_RESULT` ends the VM, because the guest asks for
//! it. Every call advances RIP past the `vmmcall`.
//!
//! Nothing here allocates except `HC_DIRTY_LOG_CHECK` (two bitmaps sized by
//! guest RAM); `HC_NOP`, the benchmark's call, is the first arm.
//!
//! The dirty log has one owner at a time ([`DirtyLogOwner`]). While a live
//! migration owns it, the guest's dirty-log calls (`HC_DIRTY_LOG_ENABLE`,
//! `_CHECK`, `_DISABLE`) are refused with `HC_ERR_BUSY` and touch nothing:
//! each of them would reset, steal from or stop the log the pre-copy engine
//! relies on, leaving pages stale at the destination.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use hvcore::abi::{
    DIRTY_TRACKER_PML, DIRTY_TRACKER_WRITE_PROTECT, HC_DIRTY_LOG_CHECK, HC_DIRTY_LOG_DISABLE,
    HC_DIRTY_LOG_ENABLE, HC_ERR_BUSY, HC_ERR_FAILED, HC_ERR_INVALID, HC_ERR_UNKNOWN,
    HC_ERR_UNSUPPORTED, HC_FILL_PAGE, HC_NOP, HC_PROGRESS, HC_TEST_RESULT,
};
use hvcore::addr::{Gpa, PAGE_SIZE};
use hvcore::host::{DirtyMode, Partition};

/// Longest `HC_TEST_RESULT` message in bytes.
pub const MESSAGE_MAX: usize = 256;
/// How many differing frames a dirty-log check reports by number.
pub const REPORTED_FRAMES: usize = 8;

/// Who may drive a VM's dirty log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirtyLogOwner {
    /// The guest, through its test hypercalls (nobody else uses it).
    #[default]
    Guest,
    /// A live migration of the VM: the guest's dirty-log calls are refused.
    Migration,
}

/// What a hypercall means for the worker beyond its return value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing more.
    None,
    /// `HC_PROGRESS(counter)`.
    Progress(u64),
    /// `HC_TEST_RESULT`: stop the VM with this result.
    TestResult { ok: bool, message: String },
    /// `HC_DIRTY_LOG_CHECK` found differences (the guest was told too).
    DirtyMismatch(DirtyCheck),
    /// A dirty-log call was refused with `HC_ERR_BUSY` (a migration owns
    /// the log).
    DirtyLogBusy,
}

/// Outcome of comparing the guest's bitmap with the hypervisor's dirty set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyCheck {
    /// Frames the guest wrote that the hypervisor did not see.
    pub missing: u64,
    /// Frames the hypervisor reported that the guest did not write.
    pub extra: u64,
    /// Frames the hypervisor reported dirty in total.
    pub collected: u64,
    /// The first differing frames: (gfn, missing?).
    pub first: Vec<(u64, bool)>,
}

impl DirtyCheck {
    /// Frames that differ.
    pub fn differing(&self) -> u64 {
        self.missing + self.extra
    }
}

/// Compare the guest's bitmap (bytes, bit n of byte n/8 = frame n) with the
/// hypervisor's (u64 words) over the first `pages` frames. Bits past the end
/// of either bitmap count as clear.
pub fn compare_bitmaps(guest: &[u8], hv: &[u64], pages: u64) -> DirtyCheck {
    let mut out = DirtyCheck::default();
    for gfn in 0..pages {
        let idx = gfn as usize;
        let g = guest.get(idx / 8).is_some_and(|b| b >> (idx % 8) & 1 != 0);
        let h = hv.get(idx / 64).is_some_and(|w| w >> (idx % 64) & 1 != 0);
        if g == h {
            continue;
        }
        if g {
            out.missing += 1;
        } else {
            out.extra += 1;
        }
        if out.first.len() < REPORTED_FRAMES {
            out.first.push((gfn, g));
        }
    }
    out
}

/// Frames of `[first_gfn, first_gfn + pages)` a dirty bitmap (u64 words,
/// bit n = frame n) does not report: what a tracker missed of a range the
/// guest is known to have written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Missed {
    /// How many.
    pub count: u64,
    /// The first [`REPORTED_FRAMES`] of them.
    pub first: Vec<u64>,
}

/// See [`Missed`]. Bits past the bitmap count as clear.
pub fn missed_frames(bitmap: &[u64], first_gfn: u64, pages: u64) -> Missed {
    let mut out = Missed::default();
    for gfn in first_gfn..first_gfn.saturating_add(pages) {
        let set = usize::try_from(gfn / 64)
            .ok()
            .and_then(|i| bitmap.get(i))
            .is_some_and(|w| w >> (gfn % 64) & 1 != 0);
        if !set {
            out.count += 1;
            if out.first.len() < REPORTED_FRAMES {
                out.first.push(gfn);
            }
        }
    }
    out
}

/// Handle the hypercall the vCPU of `p` just made: set the results, advance
/// RIP, and say what else the worker must do. `dirty_log` says who owns
/// the partition's dirty log now.
pub fn dispatch(p: &mut dyn Partition, dirty_log: DirtyLogOwner) -> Effect {
    let regs = *p.vcpu().regs();
    let (rax, effect) = match regs.rax {
        HC_NOP => (regs.rdi.wrapping_add(1), Effect::None),
        HC_PROGRESS => (0, Effect::Progress(regs.rdi)),
        HC_TEST_RESULT => test_result(p, regs.rdi, regs.rsi, regs.rdx),
        HC_DIRTY_LOG_ENABLE | HC_DIRTY_LOG_CHECK | HC_DIRTY_LOG_DISABLE
            if dirty_log == DirtyLogOwner::Migration =>
        {
            (HC_ERR_BUSY, Effect::DirtyLogBusy)
        }
        HC_DIRTY_LOG_ENABLE => (dirty_log_enable(p, regs.rdi), Effect::None),
        HC_DIRTY_LOG_DISABLE => {
            p.disable_dirty_log();
            (0, Effect::None)
        }
        HC_DIRTY_LOG_CHECK => {
            let (rax, rdi, rsi, effect) = dirty_check(p, regs.rdi, regs.rsi);
            let r = p.vcpu().regs_mut();
            r.rdi = rdi;
            r.rsi = rsi;
            (rax, effect)
        }
        HC_FILL_PAGE => (fill_page(p, regs.rdi, regs.rsi), Effect::None),
        _ => (HC_ERR_UNKNOWN, Effect::None),
    };
    let vcpu = p.vcpu();
    vcpu.regs_mut().rax = rax;
    vcpu.skip_instruction();
    effect
}

/// `HC_DIRTY_LOG_ENABLE(tracker)`.
fn dirty_log_enable(p: &mut dyn Partition, tracker: u64) -> u64 {
    let mode = match tracker {
        DIRTY_TRACKER_WRITE_PROTECT => DirtyMode::WriteProtect,
        DIRTY_TRACKER_PML if p.vcpu().caps().pml => DirtyMode::Pml,
        DIRTY_TRACKER_PML => return HC_ERR_UNSUPPORTED,
        _ => return HC_ERR_INVALID,
    };
    match p.enable_dirty_log(mode) {
        Ok(()) => 0,
        Err(e) => {
            log::warn!("dirty log enable failed: {e}");
            HC_ERR_FAILED
        }
    }
}

fn test_result(p: &mut dyn Partition, status: u64, msg_gpa: u64, msg_len: u64) -> (u64, Effect) {
    let ok = match status {
        0 => true,
        1 => false,
        _ => return (HC_ERR_INVALID, Effect::None),
    };
    let len = match usize::try_from(msg_len) {
        Ok(len) if len <= MESSAGE_MAX => len,
        _ => return (HC_ERR_INVALID, Effect::None),
    };
    let mut buf = [0u8; MESSAGE_MAX];
    if len > 0 && p.memory().read(Gpa(msg_gpa), &mut buf[..len]).is_err() {
        return (HC_ERR_INVALID, Effect::None);
    }
    let message = buf[..len]
        .iter()
        .map(|&b| {
            if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect();
    (0, Effect::TestResult { ok, message })
}

fn dirty_check(p: &mut dyn Partition, bitmap_gpa: u64, bitmap_len: u64) -> (u64, u64, u64, Effect) {
    if !p.dirty_log_enabled() {
        return (HC_ERR_INVALID, 0, 0, Effect::None);
    }
    let pages = p.ram_bytes() / PAGE_SIZE;
    // One bit per frame, rounded up to whole u64 words (guests keep their
    // bitmap as words); bits past the last frame are ignored.
    let max_len = pages.div_ceil(64) * 8;
    let len = match usize::try_from(bitmap_len) {
        Ok(len) if bitmap_len <= max_len => len,
        _ => return (HC_ERR_INVALID, 0, 0, Effect::None),
    };
    // Read the guest's bitmap before collecting, so a bad GPA leaves the
    // dirty set alone.
    let mut guest = vec![0u8; len];
    if p.memory().read(Gpa(bitmap_gpa), &mut guest).is_err() {
        return (HC_ERR_INVALID, 0, 0, Effect::None);
    }
    let mut hv = vec![0u64; pages.div_ceil(64) as usize];
    let collected = match p.collect_dirty(&mut hv) {
        Ok(n) => n,
        Err(e) => {
            log::warn!("dirty log collect failed: {e}");
            return (HC_ERR_FAILED, 0, 0, Effect::None);
        }
    };
    let mut check = compare_bitmaps(&guest, &hv, pages);
    check.collected = collected;
    let (missing, extra) = (check.missing, check.extra);
    let effect = if check.differing() == 0 {
        Effect::None
    } else {
        Effect::DirtyMismatch(check)
    };
    (missing + extra, missing, extra, effect)
}

fn fill_page(p: &mut dyn Partition, gpa: u64, byte: u64) -> u64 {
    let Ok(byte) = u8::try_from(byte) else {
        return HC_ERR_INVALID;
    };
    if !gpa.is_multiple_of(PAGE_SIZE) {
        return HC_ERR_INVALID;
    }
    match p.memory().write(Gpa(gpa), &[byte; PAGE_SIZE as usize]) {
        Ok(()) => 0,
        Err(_) => HC_ERR_INVALID,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakePartition;
    use hvcore::abi::HC_ERR_FIRST;
    use hvcore::mem::GuestMemory;

    fn call(p: &mut FakePartition, nr: u64, rdi: u64, rsi: u64, rdx: u64) -> Effect {
        call_as(p, DirtyLogOwner::Guest, nr, rdi, rsi, rdx)
    }

    fn call_as(
        p: &mut FakePartition,
        owner: DirtyLogOwner,
        nr: u64,
        rdi: u64,
        rsi: u64,
        rdx: u64,
    ) -> Effect {
        let r = &mut p.vcpu.regs;
        (r.rax, r.rdi, r.rsi, r.rdx) = (nr, rdi, rsi, rdx);
        let skips = p.vcpu.skips;
        let e = dispatch(p, owner);
        assert_eq!(p.vcpu.skips, skips + 1, "RIP advanced");
        e
    }

    /// While a migration owns the dirty log, the guest's three dirty-log
    /// calls get `HC_ERR_BUSY` and leave the log exactly as it was (the
    /// audit's DISABLE mid-migration left pages stale at the destination);
    /// the hypervisor's own writes on the guest's behalf are still logged.
    #[test]
    fn dirty_log_calls_are_refused_while_a_migration_owns_the_log() {
        let mut p = FakePartition::new(1 << 20);
        p.enable_dirty_log(DirtyMode::WriteProtect).unwrap();
        p.mem.guest_write(Gpa(5 * 4096), &[1]);
        let m = DirtyLogOwner::Migration;
        for (nr, rdi, rsi) in [
            (HC_DIRTY_LOG_DISABLE, 0, 0),
            (HC_DIRTY_LOG_ENABLE, DIRTY_TRACKER_WRITE_PROTECT, 0),
            (HC_DIRTY_LOG_CHECK, 0x8000, 32),
        ] {
            assert_eq!(call_as(&mut p, m, nr, rdi, rsi, 0), Effect::DirtyLogBusy);
            assert_eq!(p.vcpu.regs.rax, HC_ERR_BUSY);
            assert!(p.mem.logging, "still logging after call {nr}");
            assert!(p.mem.dirty.contains(&5), "dirty set kept after call {nr}");
        }
        assert_eq!(call_as(&mut p, m, HC_FILL_PAGE, 0x7000, 9, 0), Effect::None);
        assert_eq!(p.vcpu.regs.rax, 0);
        assert!(p.mem.dirty.contains(&7));
        assert_eq!(call_as(&mut p, m, HC_NOP, 1, 0, 0), Effect::None);
        assert_eq!(p.vcpu.regs.rax, 2);
        // Back with the guest: its calls work again.
        call(&mut p, HC_DIRTY_LOG_DISABLE, 0, 0, 0);
        assert_eq!(p.vcpu.regs.rax, 0);
        assert!(!p.mem.logging);
    }

    #[test]
    fn enable_picks_the_tracker() {
        let mut p = FakePartition::new(1 << 20);
        call(&mut p, HC_DIRTY_LOG_ENABLE, DIRTY_TRACKER_PML, 0, 0);
        assert_eq!(p.vcpu.regs.rax, HC_ERR_UNSUPPORTED, "no PML on this vCPU");
        assert!(!p.mem.logging);
        call(&mut p, HC_DIRTY_LOG_ENABLE, 2, 0, 0);
        assert_eq!(p.vcpu.regs.rax, HC_ERR_INVALID);
        call(
            &mut p,
            HC_DIRTY_LOG_ENABLE,
            DIRTY_TRACKER_WRITE_PROTECT,
            0,
            0,
        );
        assert_eq!(p.vcpu.regs.rax, 0);
        assert_eq!(p.dirty_mode, Some(DirtyMode::WriteProtect));
        p.vcpu.caps.pml = true;
        call(&mut p, HC_DIRTY_LOG_ENABLE, DIRTY_TRACKER_PML, 0, 0);
        assert_eq!(p.vcpu.regs.rax, 0);
        assert_eq!(p.dirty_mode, Some(DirtyMode::Pml));
    }

    #[test]
    fn nop_progress_unknown() {
        let mut p = FakePartition::new(1 << 20);
        assert_eq!(call(&mut p, HC_NOP, 41, 0, 0), Effect::None);
        assert_eq!(p.vcpu.regs.rax, 42);
        assert_eq!(call(&mut p, HC_NOP, u64::MAX, 0, 0), Effect::None);
        assert_eq!(p.vcpu.regs.rax, 0);
        assert_eq!(call(&mut p, HC_PROGRESS, 7, 0, 0), Effect::Progress(7));
        assert_eq!(p.vcpu.regs.rax, 0);
        assert_eq!(call(&mut p, 999, 0, 0, 0), Effect::None);
        assert_eq!(p.vcpu.regs.rax, HC_ERR_UNKNOWN);
    }

    #[test]
    fn test_result_reads_the_message() {
        let mut p = FakePartition::new(1 << 20);
        p.mem.write(Gpa(0x5000), b"all good\n\x01").unwrap();
        assert_eq!(
            call(&mut p, HC_TEST_RESULT, 0, 0x5000, 10),
            Effect::TestResult {
                ok: true,
                message: "all good??".into()
            }
        );
        assert_eq!(p.vcpu.regs.rax, 0);
        assert_eq!(
            call(&mut p, HC_TEST_RESULT, 1, 0x5000, 3),
            Effect::TestResult {
                ok: false,
                message: "all".into()
            }
        );
        assert_eq!(
            call(&mut p, HC_TEST_RESULT, 1, 0, 0),
            Effect::TestResult {
                ok: false,
                message: String::new()
            }
        );
        // Bad GPA, length over the cap, bad status: error, VM goes on.
        for (st, gpa, len) in [
            (0, (1 << 20) - 2, 3),
            (0, u64::MAX, 2),
            (0, 0x5000, MESSAGE_MAX as u64 + 1),
            (0, 0x5000, u64::MAX),
            (2, 0x5000, 3),
        ] {
            assert_eq!(call(&mut p, HC_TEST_RESULT, st, gpa, len), Effect::None);
            assert_eq!(p.vcpu.regs.rax, HC_ERR_INVALID);
        }
        // Exactly the cap is fine.
        assert!(matches!(
            call(&mut p, HC_TEST_RESULT, 0, 0x5000, MESSAGE_MAX as u64),
            Effect::TestResult { ok: true, .. }
        ));
    }

    #[test]
    fn fill_page_writes_through_the_dirty_log() {
        let mut p = FakePartition::new(1 << 20);
        assert_eq!(call(&mut p, HC_DIRTY_LOG_ENABLE, 0, 0, 0), Effect::None);
        assert_eq!(p.vcpu.regs.rax, 0);
        call(&mut p, HC_FILL_PAGE, 0x3000, 0x5a, 0);
        assert_eq!(p.vcpu.regs.rax, 0);
        assert!(p.mem.bytes()[0x3000..0x4000].iter().all(|&b| b == 0x5a));
        assert!(p.mem.dirty.contains(&3));
        for (gpa, byte) in [(0x3001, 1), (1 << 20, 1), (!0xfffu64, 1), (0x3000, 256)] {
            call(&mut p, HC_FILL_PAGE, gpa, byte, 0);
            assert_eq!(p.vcpu.regs.rax, HC_ERR_INVALID, "{gpa:#x} {byte}");
        }
    }

    #[test]
    fn dirty_check_compares_and_collects() {
        let pages = 260u64; // 1 MiB + 4 pages: 5 words, 40 bytes of bitmap
        let mut p = FakePartition::new(pages * PAGE_SIZE);
        // Not enabled yet.
        call(&mut p, HC_DIRTY_LOG_CHECK, 0x8000, 32, 0);
        assert_eq!(p.vcpu.regs.rax, HC_ERR_INVALID);
        call(&mut p, HC_DIRTY_LOG_ENABLE, 0, 0, 0);
        // The guest writes frames 10, 11 and its bitmap at 0x8000 (frame 8).
        p.mem.guest_write(Gpa(10 * 4096), &[1]);
        p.mem.guest_write(Gpa(11 * 4096), &[1]);
        let mut bitmap = [0u8; 32];
        for gfn in [8usize, 10, 11] {
            bitmap[gfn / 8] |= 1 << (gfn % 8);
        }
        p.mem.guest_write(Gpa(0x8000), &bitmap);
        assert_eq!(
            call(&mut p, HC_DIRTY_LOG_CHECK, 0x8000, 32, 0),
            Effect::None
        );
        assert_eq!(
            (p.vcpu.regs.rax, p.vcpu.regs.rdi, p.vcpu.regs.rsi),
            (0, 0, 0)
        );
        assert!(p.mem.dirty.is_empty(), "collect-and-clear");

        // Round 2: the hypervisor misses frame 20 (the guest's write went
        // unrecorded) and sees frame 30 the guest did not claim.
        p.mem.write_unlogged(Gpa(20 * 4096), &[1]);
        p.mem.guest_write(Gpa(30 * 4096), &[1]);
        let mut bitmap = [0u8; 32];
        for gfn in [8usize, 20] {
            bitmap[gfn / 8] |= 1 << (gfn % 8);
        }
        p.mem.guest_write(Gpa(0x8000), &bitmap);
        let e = call(&mut p, HC_DIRTY_LOG_CHECK, 0x8000, 32, 0);
        assert_eq!(
            (p.vcpu.regs.rax, p.vcpu.regs.rdi, p.vcpu.regs.rsi),
            (2, 1, 1)
        );
        match e {
            Effect::DirtyMismatch(c) => {
                assert_eq!(c.first, [(20, true), (30, false)]);
                assert_eq!(c.collected, 2);
            }
            other => panic!("{other:?}"),
        }

        // Bitmap length over ram pages / 64 words, bad GPA: error, dirty set
        // kept.
        p.mem.guest_write(Gpa(40 * 4096), &[1]);
        call(&mut p, HC_DIRTY_LOG_CHECK, 0x8000, 41, 0);
        assert_eq!(p.vcpu.regs.rax, HC_ERR_INVALID);
        call(&mut p, HC_DIRTY_LOG_CHECK, pages * PAGE_SIZE - 8, 32, 0);
        assert_eq!(p.vcpu.regs.rax, HC_ERR_INVALID);
        assert!(p.mem.dirty.contains(&40));
        // A short bitmap (frames 0..8, none claimed): frames past it count
        // as not written by the guest, so frame 40 is extra.
        call(&mut p, HC_DIRTY_LOG_CHECK, 0x8000, 1, 0);
        assert_eq!(
            (p.vcpu.regs.rax, p.vcpu.regs.rdi, p.vcpu.regs.rsi),
            (1, 0, 1)
        );

        // A full-length bitmap (whole words): bits past the last frame are
        // ignored.
        let mut bitmap = [0u8; 40];
        for gfn in [8usize, 50, 300] {
            bitmap[gfn / 8] |= 1 << (gfn % 8);
        }
        p.mem.guest_write(Gpa(50 * 4096), &[1]);
        p.mem.guest_write(Gpa(0x8000), &bitmap);
        call(&mut p, HC_DIRTY_LOG_CHECK, 0x8000, 40, 0);
        assert_eq!(
            (p.vcpu.regs.rax, p.vcpu.regs.rdi, p.vcpu.regs.rsi),
            (0, 0, 0)
        );

        call(&mut p, HC_DIRTY_LOG_DISABLE, 0, 0, 0);
        assert!(!p.mem.logging);
    }

    /// Any register contents for any hypercall number: no panic, RIP always
    /// advanced, errors only from the defined set.
    #[test]
    fn random_arguments_never_panic() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut p = FakePartition::new(1 << 20);
        p.vcpu.caps.pml = true;
        let interesting = [
            0,
            1,
            4095,
            4096,
            0xff,
            256,
            257,
            1 << 20,
            u64::MAX,
            u64::MAX - 4095,
        ];
        for _ in 0..20_000 {
            let nr = next() % 10;
            let mut args = [0u64; 3];
            for a in &mut args {
                let r = next();
                *a = if r & 1 == 0 {
                    interesting[(r >> 1) as usize % interesting.len()]
                } else {
                    next() >> (r >> 58)
                };
            }
            let [rdi, rsi, rdx] = args;
            let owner = if next() % 4 == 0 {
                DirtyLogOwner::Migration
            } else {
                DirtyLogOwner::Guest
            };
            let _ = call_as(&mut p, owner, nr, rdi, rsi, rdx);
            let rax = p.vcpu.regs.rax;
            if rax >= HC_ERR_FIRST {
                assert!([
                    HC_ERR_UNKNOWN,
                    HC_ERR_INVALID,
                    HC_ERR_FAILED,
                    HC_ERR_BUSY,
                    HC_ERR_UNSUPPORTED
                ]
                .contains(&rax));
            }
        }
    }

    #[test]
    fn missed_frames_of_a_written_range() {
        let mut bm = [u64::MAX; 4];
        assert_eq!(missed_frames(&bm, 10, 200), Missed::default());
        bm[1] &= !(1 << 3); // frame 67
        let m = missed_frames(&bm, 10, 200);
        assert_eq!((m.count, m.first.as_slice()), (1, &[67][..]));
        // Past the bitmap: missed.
        let m = missed_frames(&bm, 250, 10);
        assert_eq!(m.count, 4);
        assert_eq!(m.first, [256, 257, 258, 259]);
        assert_eq!(missed_frames(&[], u64::MAX - 1, 5).count, 1);
    }

    #[test]
    fn compare_reports_first_frames_only() {
        let guest = [0xffu8; 4];
        let hv = [0u64; 1];
        let c = compare_bitmaps(&guest, &hv, 64);
        assert_eq!((c.missing, c.extra), (32, 0));
        assert_eq!(c.first.len(), REPORTED_FRAMES);
        assert_eq!(c.first[0], (0, true));
        let c = compare_bitmaps(&[], &[u64::MAX], 10);
        assert_eq!((c.missing, c.extra), (0, 10));
    }
}
