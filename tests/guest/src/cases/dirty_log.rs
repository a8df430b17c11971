//! `dirty-log`: three rounds of seeded pseudo-random page writes, each
//! checked for exact equality against the hypervisor's collect-and-clear
//! (docs/DESIGN.md, case 4), once with each dirty tracker the CPU has:
//! nested write protection always, then PML where the hypervisor offers it
//! (`HC_DIRTY_LOG_ENABLE` answers `HC_ERR_UNSUPPORTED` elsewhere). Both
//! are held to the same exact set, so a page the guest wrote that either
//! tracker missed fails the case, and with it the VMX suite.
//!
//! Exactness means the guest must report *every* page written during a
//! round, by itself, by the MMU or by the hypervisor on its behalf:
//! * the random pages (one byte each, in the round's private region);
//! * the `HC_FILL_PAGE` page;
//! * its bitmap's pages (cleared at the start of every round);
//! * its stack: every page from two below the current RSP up to the stack
//!   top is touched (rewritten unchanged) at the start of the round;
//! * its page-table pages: the MMU sets accessed/dirty bits in them and an
//!   emulator may treat each walk as a write (with EPT A/D bits on, PML
//!   logs every guest page walk as a write), so they are touched too.
//!
//! Nothing else is written during a round: all state is in locals (this
//! function's frame is inside the touched stack range), nothing is printed,
//! and no global is written (the hypercall vendor flag is only read).

use crate::arch::{read_cr3, read_rsp, touch_byte};
use crate::hypercall::{self, err_name};
use crate::layout::{
    page_table_pages, stack_touch_range, DirtyLayout, FrameBitmap, DIRTY_PAGES_PER_ROUND,
    DIRTY_REGION_PAGES, DIRTY_ROUNDS, MAX_PT_PAGES, PAGE_BYTES,
};
use crate::rng::XorShift64;
use crate::{fail, println, report, Env};
use hvcore::abi::{DIRTY_TRACKER_PML, DIRTY_TRACKER_WRITE_PROTECT, HC_ERR_UNSUPPORTED};

const SEED: u64 = 0x5eed_d1e7_1095_0001;
/// Byte the hypervisor writes in round r: `FILL_BYTE + r`.
const FILL_BYTE: u8 = 0xd0;

pub fn run(env: &Env) -> ! {
    let ram_bytes = env.params.ram_bytes;
    let layout = match DirtyLayout::new(ram_bytes, env.free_start) {
        Ok(layout) => layout,
        Err(e) => fail!(
            "{} (RAM {:#x}, free from {:#x})",
            e,
            ram_bytes,
            env.free_start
        ),
    };

    let mut pt_pages = [0u64; MAX_PT_PAGES];
    let read_entry = |gpa: u64| {
        if gpa.checked_add(8).is_none_or(|end| end > ram_bytes) {
            return 0;
        }
        // SAFETY: an aligned u64 inside guest RAM (checked above), which is
        // identity-mapped; reading a page-table entry has no side effects.
        unsafe { (gpa as *const u64).read_volatile() }
    };
    let pt_count = match page_table_pages(read_cr3(), read_entry, &mut pt_pages) {
        Ok(n) => n,
        Err(e) => fail!("walking the guest page tables: {}", e),
    };
    let pt_pages = &pt_pages[..pt_count];
    if let Some(&bad) = pt_pages.iter().find(|&&p| p >= ram_bytes) {
        fail!("page-table page {:#x} lies outside RAM", bad);
    }
    println!(
        "dirty-log: bitmap {:#x} ({} bytes), buffer {:#x}..{:#x}, {} page-table pages, stack {:#x}..{:#x}",
        layout.bitmap_gpa,
        layout.bitmap_len,
        layout.buffer_gpa,
        layout.end(),
        pt_count,
        env.stack_bottom,
        env.stack_top
    );

    // SAFETY: the bitmap lies in free guest RAM (DirtyLayout keeps it below
    // ram_bytes and above the image), identity-mapped, u64-aligned (page
    // aligned), and nothing else refers to it.
    let words = unsafe {
        core::slice::from_raw_parts_mut(layout.bitmap_gpa as *mut u64, layout.bitmap_words())
    };
    let mut bitmap = FrameBitmap::new(words);
    let mut rng = XorShift64::new(SEED);

    let mut pml_checked = false;
    for (tracker, name) in [
        (DIRTY_TRACKER_WRITE_PROTECT, "write-protect"),
        (DIRTY_TRACKER_PML, "pml"),
    ] {
        let r = hypercall::dirty_log_enable(tracker);
        if tracker == DIRTY_TRACKER_PML && r.rax == HC_ERR_UNSUPPORTED {
            println!("dirty-log: pml: not offered by this CPU, not checked");
            continue;
        }
        if r.is_err() {
            fail!(
                "HC_DIRTY_LOG_ENABLE({}): {} ({:#x})",
                name,
                err_name(r.rax),
                r.rax
            );
        }
        rounds(name, &layout, pt_pages, env, &mut bitmap, &mut rng);
        let r = hypercall::dirty_log_disable();
        if r.is_err() {
            fail!("HC_DIRTY_LOG_DISABLE: {} ({:#x})", err_name(r.rax), r.rax);
        }
        println!(
            "dirty-log: {}: {} rounds, {} distinct random pages, every round's dirty set matched exactly",
            name,
            DIRTY_ROUNDS,
            DIRTY_ROUNDS * DIRTY_PAGES_PER_ROUND
        );
        pml_checked |= tracker == DIRTY_TRACKER_PML;
    }
    if pml_checked {
        report::ok("dirty sets matched in all rounds, write protection and PML")
    }
    report::ok("dirty sets matched in all rounds (write protection; no PML)")
}

/// The three rounds with the log enabled (`name`: the tracker, for
/// messages). No prints, no globals: everything written is in the bitmap.
fn rounds(
    name: &str,
    layout: &DirtyLayout,
    pt_pages: &[u64],
    env: &Env,
    bitmap: &mut FrameBitmap,
    rng: &mut XorShift64,
) {
    for round in 0..DIRTY_ROUNDS {
        bitmap.clear();
        let (bitmap_first, bitmap_pages) = layout.bitmap_pages();
        bitmap.set_pages(bitmap_first, bitmap_pages);

        let (stack_low, stack_high) =
            stack_touch_range(read_rsp(), env.stack_bottom, env.stack_top);
        let mut page = stack_low;
        while page < stack_high {
            // SAFETY: a page of our own stack, mapped and writable; the byte
            // is rewritten with its own value.
            unsafe { touch_byte(page) };
            page += PAGE_BYTES;
        }
        bitmap.set_pages(stack_low, (stack_high - stack_low) / PAGE_BYTES);

        for &pt in pt_pages {
            // SAFETY: a page-table page in guest RAM (checked above); its
            // first entry is rewritten with its own value.
            unsafe { touch_byte(pt) };
            bitmap.set(pt / PAGE_BYTES);
        }

        let region = layout.region_gpa(round);
        let mut distinct = 0;
        while distinct < DIRTY_PAGES_PER_ROUND {
            let value = rng.next_u64();
            let gpa = region + (value % DIRTY_REGION_PAGES) * PAGE_BYTES;
            // SAFETY: the page is in this round's region of free guest RAM
            // (DirtyLayout), which no Rust object owns.
            unsafe { ((gpa + (value >> 52)) as *mut u8).write_volatile(value as u8) };
            if bitmap.set(gpa / PAGE_BYTES) {
                distinct += 1;
            }
        }

        let fill = layout.fill_gpa(round);
        let fill_byte = FILL_BYTE + round as u8;
        bitmap.set(fill / PAGE_BYTES);
        // SAFETY: the fill page is free RAM outside every region, owned by
        // nothing.
        let r = unsafe { hypercall::fill_page(fill, fill_byte) };
        if r.is_err() {
            fail!(
                "round {}: HC_FILL_PAGE({:#x}): {} ({:#x})",
                round + 1,
                fill,
                err_name(r.rax),
                r.rax
            );
        }
        // SAFETY: reading back the fill page (free RAM, see above).
        let (first, last) = unsafe {
            (
                (fill as *const u8).read_volatile(),
                ((fill + PAGE_BYTES - 1) as *const u8).read_volatile(),
            )
        };
        if first != fill_byte || last != fill_byte {
            fail!(
                "round {}: HC_FILL_PAGE({:#x}, {:#x}) left bytes {:#x}/{:#x}",
                round + 1,
                fill,
                fill_byte,
                first,
                last
            );
        }

        let r = hypercall::dirty_log_check(bitmap.words());
        if r.is_err() {
            fail!(
                "{} round {}: HC_DIRTY_LOG_CHECK: {} ({:#x})",
                name,
                round + 1,
                err_name(r.rax),
                r.rax
            );
        }
        if r.rax != 0 {
            fail!(
                "{} round {}: dirty sets differ in {} frames: hypervisor missed {}, reported {} extra (guest reported {})",
                name,
                round + 1,
                r.rax,
                r.rdi,
                r.rsi,
                bitmap.count()
            );
        }
    }
}
