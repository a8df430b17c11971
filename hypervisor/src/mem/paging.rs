//! The host's own page tables: identity map of `[0, max(4 GiB, end of RAM))`
//! (AMD APM vol. 2, 5.3; Intel SDM vol. 3A, 4.5).
//!
//! * 2 MiB pages everywhere except the 2 MiB regions that hold the image,
//!   which get 4 KiB pages so the image is mapped W^X: text read-only and
//!   executable, rodata read-only, data/bss writable, and the guard page
//!   below the boot stack not present.
//! * RAM-like memory (usable, ACPI, NVS in the memory map) is write-back;
//!   everything else (MMIO holes, the LAPIC at 0xFEE00000, the IOAPIC, VGA,
//!   firmware ROM) is uncached: PCD|PWT select PAT entry 3 = UC with the
//!   power-on PAT (AMD APM vol. 2, 7.8.2; Intel SDM vol. 3A, 11.12.4).
//! * Everything but the image text is NX when the CPU has NX (the boot stub
//!   sets EFER.NXE then). CR0.WP is set, so read-only binds ring 0 too.
//!
//! Table frames come from the frame allocator and are never freed. The
//! attribute decisions are pure functions, tested on the host.

use super::frames::align_up;
use super::{alloc_frame, MemInitError, BOOT_MAPPED_BYTES, MAX_PHYS_BYTES};
use crate::bootinfo::{BootInfo, MemKind, MemRegion};
use crate::cpu;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const NO_EXECUTE: u64 = 1 << 63;
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

const FOUR_KIB: u64 = 4096;
const TWO_MIB: u64 = 2 << 20;
const ONE_GIB: u64 = 1 << 30;

/// Where the image's parts lie (all page-aligned but `end`, which is
/// rounded up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLayout {
    /// First byte of the image (text starts here).
    pub start: u64,
    /// First byte of read-only data (end of text).
    pub rodata_start: u64,
    /// First byte of writable data (end of rodata).
    pub data_start: u64,
    /// End of the image (.bss included).
    pub end: u64,
    /// The page left unmapped below the boot stack.
    pub stack_guard: u64,
}

fn ram_like(regions: &[MemRegion], start: u64, end: u64) -> bool {
    regions.iter().any(|r| {
        matches!(
            r.kind,
            MemKind::Usable | MemKind::AcpiReclaimable | MemKind::AcpiNvs
        ) && r.base < end
            && start < r.end()
    })
}

fn cache_bits(regions: &[MemRegion], start: u64, end: u64) -> u64 {
    if ram_like(regions, start, end) {
        0
    } else {
        PCD | PWT
    }
}

/// Entry bits of the 2 MiB page at `page` (not overlapping the image).
pub fn large_page_flags(page: u64, regions: &[MemRegion], nx: bool) -> u64 {
    let mut flags = PRESENT | WRITABLE | PAGE_SIZE_BIT | cache_bits(regions, page, page + TWO_MIB);
    if nx {
        flags |= NO_EXECUTE;
    }
    flags
}

/// Entry bits of the 4 KiB page at `page` inside a 2 MiB region that holds
/// (part of) the image; 0 = not present.
pub fn small_page_flags(page: u64, regions: &[MemRegion], image: &ImageLayout, nx: bool) -> u64 {
    if page == image.stack_guard {
        return 0;
    }
    let nx_bit = if nx { NO_EXECUTE } else { 0 };
    let cache = cache_bits(regions, page, page + FOUR_KIB);
    let access = if (image.start..image.rodata_start).contains(&page) {
        0 // text: read-only, executable
    } else if (image.rodata_start..image.data_start).contains(&page) {
        nx_bit
    } else {
        WRITABLE | nx_bit
    };
    PRESENT | access | cache
}

fn overlaps_image(page: u64, image: &ImageLayout) -> bool {
    page < image.end && image.start < page + TWO_MIB
}

fn entry(table: u64, index: u64) -> *mut u64 {
    (table + index * 8) as *mut u64
}

fn new_table() -> Result<u64, MemInitError> {
    Ok(alloc_frame()
        .ok_or(MemInitError::OutOfFrames("host page tables"))?
        .as_u64())
}

/// Next-level table behind `table[index]`, allocated on first use.
///
/// # Safety
/// `table` must be a page-table frame this module allocated
/// (identity-mapped, owned here).
unsafe fn next_table(table: u64, index: u64) -> Result<u64, MemInitError> {
    let e = entry(table, index);
    // SAFETY: per the contract `table` is ours and mapped; index < 512.
    let v = unsafe { e.read_volatile() };
    if v & PRESENT != 0 {
        return Ok(v & ADDR_MASK);
    }
    let frame = new_table()?;
    // SAFETY: as above. Intermediate entries are permissive; leaves decide.
    unsafe { e.write_volatile(frame | PRESENT | WRITABLE) };
    Ok(frame)
}

/// Build the host page tables and switch CR3 to them. Returns the number
/// of bytes mapped.
pub fn init(info: &BootInfo, image: &ImageLayout) -> Result<u64, MemInitError> {
    let top = align_up(info.max_usable_end().min(MAX_PHYS_BYTES), ONE_GIB).max(BOOT_MAPPED_BYTES);
    let nx = cpu::has_nx();
    let regions = info.regions();
    let pml4 = new_table()?;
    let mut page = 0;
    while page < top {
        // SAFETY: every table written here was allocated by this function;
        // frames come low-first from the allocator, below 4 GiB, which the
        // boot tables identity-map.
        unsafe {
            let pdpt = next_table(pml4, (page >> 39) & 511)?;
            let pd = next_table(pdpt, (page >> 30) & 511)?;
            let pde = entry(pd, (page >> 21) & 511);
            if overlaps_image(page, image) {
                let pt = new_table()?;
                for i in 0..512 {
                    let p = page + i * FOUR_KIB;
                    let flags = small_page_flags(p, regions, image, nx);
                    entry(pt, i).write_volatile(if flags == 0 { 0 } else { p | flags });
                }
                pde.write_volatile(pt | PRESENT | WRITABLE);
            } else {
                pde.write_volatile(page | large_page_flags(page, regions, nx));
            }
        }
        page += TWO_MIB;
    }
    // SAFETY: the new tables identity-map everything the boot tables did
    // (the first 4 GiB) plus all RAM; the running code (text) stays
    // executable, the stack and all statics stay writable.
    unsafe { cpu::write_cr3(pml4) };
    Ok(top)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions() -> [MemRegion; 3] {
        [
            MemRegion {
                base: 0,
                len_bytes: 0x9_FC00,
                kind: MemKind::Usable,
            },
            MemRegion {
                base: 0x10_0000,
                len_bytes: 0x3FEE_0000,
                kind: MemKind::Usable,
            },
            MemRegion {
                base: 0xFEFF_C000,
                len_bytes: 0x4000,
                kind: MemKind::Reserved(2),
            },
        ]
    }

    const IMAGE: ImageLayout = ImageLayout {
        start: 0x10_0000,
        rodata_start: 0x11_0000,
        data_start: 0x12_0000,
        end: 0x23_0000,
        stack_guard: 0x13_0000,
    };

    #[test]
    fn large_pages_follow_the_map() {
        let r = regions();
        let data = large_page_flags(0x40_0000, &r, true);
        assert_eq!(
            data & (NO_EXECUTE | PCD | WRITABLE | PAGE_SIZE_BIT),
            NO_EXECUTE | WRITABLE | PAGE_SIZE_BIT
        );
        let lapic = large_page_flags(0xFEE0_0000, &r, false);
        assert_eq!(lapic & (PCD | PWT | NO_EXECUTE), PCD | PWT);
    }

    #[test]
    fn image_is_mapped_w_xor_x() {
        let r = regions();
        let text = small_page_flags(0x10_8000, &r, &IMAGE, true);
        assert_eq!(text & (WRITABLE | NO_EXECUTE), 0);
        let rodata = small_page_flags(0x11_8000, &r, &IMAGE, true);
        assert_eq!(rodata & (WRITABLE | NO_EXECUTE), NO_EXECUTE);
        let data = small_page_flags(0x12_0000, &r, &IMAGE, true);
        assert_eq!(data & (WRITABLE | NO_EXECUTE), WRITABLE | NO_EXECUTE);
        assert_eq!(small_page_flags(0x13_0000, &r, &IMAGE, true), 0);
        // Below the image: plain RAM; the VGA hole is uncached.
        let low = small_page_flags(0x1000, &r, &IMAGE, true);
        assert_eq!(low & (WRITABLE | NO_EXECUTE | PCD), WRITABLE | NO_EXECUTE);
        let vga = small_page_flags(0xB_8000, &r, &IMAGE, true);
        assert_eq!(vga & (PCD | PWT), PCD | PWT);
        // Beyond the image's end in the same 2 MiB region: data.
        let after = small_page_flags(0x23_0000, &r, &IMAGE, false);
        assert_eq!(after, PRESENT | WRITABLE);
        assert!(overlaps_image(0, &IMAGE) && overlaps_image(0x20_0000, &IMAGE));
        assert!(!overlaps_image(0x40_0000, &IMAGE));
    }
}
