//! The host's own page tables: identity map of `[0, max(4 GiB, end of RAM))`
//! with 2 MiB pages (AMD APM vol. 2, 5.3.4 "2-Mbyte page translation";
//! Intel SDM vol. 3A, 4.5).
//!
//! * RAM-like memory (usable, ACPI, NVS in the memory map) is write-back;
//!   everything else (MMIO holes, the LAPIC at 0xFEE00000, the IOAPIC,
//!   firmware ROM) is uncached: PCD|PWT select PAT entry 3 = UC with the
//!   power-on PAT (AMD APM vol. 2, 7.8.2; Intel SDM vol. 3A, 11.12.4).
//! * Only the 2 MiB pages that overlap the image are executable; everything
//!   else is NX when the CPU has NX (EFER.NXE is set by the boot stub then).
//!
//! Table frames come from the frame allocator and are never freed.

use super::frames::align_up;
use super::{alloc_frame, MemInitError, BOOT_MAPPED_BYTES, MAX_PHYS_BYTES};
use crate::bootinfo::{BootInfo, MemKind};
use crate::cpu;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const NO_EXECUTE: u64 = 1 << 63;
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

const TWO_MIB: u64 = 2 << 20;
const ONE_GIB: u64 = 1 << 30;

/// Attributes of one 2 MiB page, from the memory map and the image range.
/// Pure, so it can be tested on the host.
pub fn large_page_flags(
    page: u64,
    info_regions: &[crate::bootinfo::MemRegion],
    image: (u64, u64),
    nx: bool,
) -> u64 {
    let end = page + TWO_MIB;
    let overlaps = |s: u64, e: u64| s < end && page < e;
    let ram_like = info_regions.iter().any(|r| {
        matches!(
            r.kind,
            MemKind::Usable | MemKind::AcpiReclaimable | MemKind::AcpiNvs
        ) && overlaps(r.base, r.end())
    });
    let mut flags = PRESENT | WRITABLE | PAGE_SIZE_BIT;
    if !ram_like {
        flags |= PCD | PWT;
    }
    if nx && !overlaps(image.0, image.1) {
        flags |= NO_EXECUTE;
    }
    flags
}

fn table_entry(table: u64, index: u64) -> *mut u64 {
    (table + index * 8) as *mut u64
}

/// Next-level table behind `entry`, allocated on first use.
///
/// # Safety
/// `table` must be a page-table frame this module owns (identity-mapped).
unsafe fn next_table(table: u64, index: u64) -> Result<u64, MemInitError> {
    let e = table_entry(table, index);
    // SAFETY: per the contract `table` is ours and mapped; index < 512.
    let v = unsafe { e.read_volatile() };
    if v & PRESENT != 0 {
        return Ok(v & ADDR_MASK);
    }
    let frame = alloc_frame()
        .ok_or(MemInitError::OutOfFrames("host page tables"))?
        .as_u64();
    // SAFETY: as above.
    unsafe { e.write_volatile(frame | PRESENT | WRITABLE) };
    Ok(frame)
}

/// Build the host page tables and switch CR3 to them. Returns the number
/// of bytes mapped.
pub fn init(info: &BootInfo, image: (u64, u64)) -> Result<u64, MemInitError> {
    let top = align_up(info.max_usable_end().min(MAX_PHYS_BYTES), ONE_GIB).max(BOOT_MAPPED_BYTES);
    let nx = cpu::has_nx();
    let pml4 = alloc_frame()
        .ok_or(MemInitError::OutOfFrames("host page tables"))?
        .as_u64();
    let mut page = 0;
    while page < top {
        // SAFETY: all tables walked here were allocated by this function and
        // are identity-mapped under the boot tables (the low-first frame
        // search hands out frames below 4 GiB while those are free).
        unsafe {
            let pdpt = next_table(pml4, (page >> 39) & 511)?;
            let pd = next_table(pdpt, (page >> 30) & 511)?;
            let flags = large_page_flags(page, info.regions(), image, nx);
            table_entry(pd, (page >> 21) & 511).write_volatile(page | flags);
        }
        page += TWO_MIB;
    }
    // SAFETY: the new tables identity-map everything the old ones did
    // (the first 4 GiB) with the image executable, plus all RAM.
    unsafe { cpu::write_cr3(pml4) };
    Ok(top)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootinfo::MemRegion;

    #[test]
    fn flags_follow_the_map() {
        let regions = [
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
        ];
        let image = (0x10_0000, 0x30_0000);
        let low = large_page_flags(0, &regions, image, true);
        assert_eq!(low & (PCD | NO_EXECUTE), 0);
        let img2 = large_page_flags(0x20_0000, &regions, image, true);
        assert_eq!(img2 & NO_EXECUTE, 0);
        let data = large_page_flags(0x40_0000, &regions, image, true);
        assert_eq!(data & (NO_EXECUTE | PCD), NO_EXECUTE);
        let lapic = large_page_flags(0xFEE0_0000, &regions, image, false);
        assert_eq!(lapic & (PCD | PWT | NO_EXECUTE), PCD | PWT);
    }
}
