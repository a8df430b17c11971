//! Guest-virtual to guest-physical translation through the guest's own
//! page tables, and the instruction fetch MMIO emulation needs.
//!
//! Without decode assists the VMM must read the faulting instruction
//! itself: RIP is a guest *linear* address, so the bytes are found by
//! walking the guest's paging structures (in guest RAM, read through
//! [`GuestMemory`]) from its CR3. Every paging mode an x86-64 guest can be
//! in is handled: none (CR0.PG = 0), 32-bit (with PSE 4 MiB pages), PAE,
//! 4-level and 5-level (CR4.LA57) long mode with 1 GiB and 2 MiB pages.
//!
//! Everything read here is the guest's and is an allegation: a walk is at
//! most five reads, an entry pointing outside guest RAM is an error, not a
//! panic, and nothing is written (no accessed/dirty bits: the CPU already
//! set them when it executed the instruction). Permissions are not
//! checked for the same reason: the CPU fetched these bytes before the
//! data access faulted.
//!
//! Reference: Intel SDM vol. 3A, 4.3 (32-bit paging), 4.4 (PAE), 4.5
//! (4-level and 5-level paging); AMD APM vol. 2, 5.3.

use super::mmio::MAX_INSN_BYTES;
use core::fmt;
use hvcore::addr::Gpa;
use hvcore::mem::{GuestMemory, MemError};

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1 << 0;
const PAGE_SIZE_BIT: u64 = 1 << 7;
/// Physical-address bits 51:12 of a 64-bit entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The control registers that select and root the guest's paging.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Paging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

/// Why a linear address could not be translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// Not canonical for the paging mode.
    NonCanonical(u64),
    /// A paging-structure entry on the way was not present.
    NotPresent { linear: u64, level: u8 },
    /// A paging structure (or the page) lies outside guest RAM.
    Memory(MemError),
}

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalkError::NonCanonical(a) => write!(f, "non-canonical guest address {a:#x}"),
            WalkError::NotPresent { linear, level } => {
                write!(
                    f,
                    "guest address {linear:#x} not mapped (level {level} entry not present)"
                )
            }
            WalkError::Memory(e) => write!(f, "guest page tables: {e}"),
        }
    }
}

impl From<MemError> for WalkError {
    fn from(e: MemError) -> Self {
        WalkError::Memory(e)
    }
}

fn read_u32(mem: &dyn GuestMemory, gpa: u64) -> Result<u64, WalkError> {
    let mut b = [0u8; 4];
    mem.read(Gpa(gpa), &mut b)?;
    Ok(u64::from(u32::from_le_bytes(b)))
}

/// Translate `linear` to a guest-physical address.
pub fn translate(mem: &dyn GuestMemory, p: &Paging, linear: u64) -> Result<u64, WalkError> {
    if p.cr0 & CR0_PG == 0 {
        return Ok(linear & 0xffff_ffff);
    }
    if p.efer & EFER_LMA != 0 {
        let levels: u8 = if p.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        let bits = 12 + 9 * u32::from(levels);
        // Canonical: bits 63..bits-1 all equal.
        let top = (linear as i64) >> (bits - 1);
        if top != 0 && top != -1 {
            return Err(WalkError::NonCanonical(linear));
        }
        let mut table = p.cr3 & ADDR_MASK;
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * u32::from(level - 1);
            let index = (linear >> shift) & 0x1ff;
            let entry = mem.read_u64(Gpa(table + index * 8))?;
            if entry & PRESENT == 0 {
                return Err(WalkError::NotPresent { linear, level });
            }
            // 1 GiB (level 3) and 2 MiB (level 2) pages.
            if level == 1 || ((level == 2 || level == 3) && entry & PAGE_SIZE_BIT != 0) {
                let page_mask = (1u64 << shift) - 1;
                return Ok((entry & ADDR_MASK & !page_mask) | (linear & page_mask));
            }
            table = entry & ADDR_MASK;
        }
        unreachable!("level 1 always returns");
    }
    let linear = linear & 0xffff_ffff;
    if p.cr4 & CR4_PAE != 0 {
        // PAE: 4 PDPTEs at CR3[31:5].
        let pdpte = mem.read_u64(Gpa((p.cr3 & 0xffff_ffe0) + (linear >> 30) * 8))?;
        if pdpte & PRESENT == 0 {
            return Err(WalkError::NotPresent { linear, level: 3 });
        }
        let pde = mem.read_u64(Gpa((pdpte & ADDR_MASK) + ((linear >> 21) & 0x1ff) * 8))?;
        if pde & PRESENT == 0 {
            return Err(WalkError::NotPresent { linear, level: 2 });
        }
        if pde & PAGE_SIZE_BIT != 0 {
            return Ok((pde & ADDR_MASK & !0x1f_ffff) | (linear & 0x1f_ffff));
        }
        let pte = mem.read_u64(Gpa((pde & ADDR_MASK) + ((linear >> 12) & 0x1ff) * 8))?;
        if pte & PRESENT == 0 {
            return Err(WalkError::NotPresent { linear, level: 1 });
        }
        return Ok((pte & ADDR_MASK) | (linear & 0xfff));
    }
    // 32-bit paging.
    let pde = read_u32(mem, (p.cr3 & 0xffff_f000) + (linear >> 22) * 4)?;
    if pde & PRESENT == 0 {
        return Err(WalkError::NotPresent { linear, level: 2 });
    }
    if pde & PAGE_SIZE_BIT != 0 && p.cr4 & CR4_PSE != 0 {
        // 4 MiB page; PSE-36 puts address bits 39:32 in entry bits 20:13.
        let high = ((pde >> 13) & 0xff) << 32;
        return Ok(high | (pde & 0xffc0_0000) | (linear & 0x3f_ffff));
    }
    let pte = read_u32(mem, (pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4)?;
    if pte & PRESENT == 0 {
        return Err(WalkError::NotPresent { linear, level: 1 });
    }
    Ok((pte & 0xffff_f000) | (linear & 0xfff))
}

/// Fetch up to 15 instruction bytes at linear address `rip` into `buf`;
/// returns how many were read (at least 1). A second page that is not
/// mapped ends the fetch early: the instruction may still be complete
/// (the decoder says `Truncated` if not).
pub fn fetch(
    mem: &dyn GuestMemory,
    p: &Paging,
    rip: u64,
    buf: &mut [u8; MAX_INSN_BYTES],
) -> Result<usize, WalkError> {
    let first = translate(mem, p, rip)?;
    let in_page = (0x1000 - (rip & 0xfff)) as usize;
    let n = in_page.min(MAX_INSN_BYTES);
    mem.read(Gpa(first), &mut buf[..n])?;
    if n == MAX_INSN_BYTES {
        return Ok(n);
    }
    let next = rip.wrapping_add(n as u64);
    match translate(mem, p, next) {
        Ok(gpa) => match mem.read(Gpa(gpa), &mut buf[n..]) {
            Ok(()) => Ok(MAX_INSN_BYTES),
            Err(_) => Ok(n),
        },
        Err(_) => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeMemory;

    const LONG4: Paging = Paging {
        cr0: CR0_PG | 1,
        cr3: 0x1000,
        cr4: CR4_PAE,
        efer: EFER_LMA | (1 << 8),
    };

    /// A 4-level map: 0xffff_8000_0020_3000 and _4000 (4 KiB pages) ->
    /// 0x30_0000 and 0x31_0000; 0xffff_8000_4000_0000 (2 MiB) -> 0x40_0000;
    /// 0x8000_0000 (1 GiB) -> 0x4000_0000 (outside this RAM: translation
    /// only).
    fn long_mode_memory() -> FakeMemory {
        let mut m = FakeMemory::new(8 << 20);
        let w = |m: &mut FakeMemory, gpa: u64, v: u64| m.write_u64(Gpa(gpa), v).unwrap();
        // PML4[256] -> PDPT 0x2000; PML4[0] -> PDPT 0x5000.
        w(&mut m, 0x1000 + 256 * 8, 0x2000 | 3);
        w(&mut m, 0x1000, 0x5000 | 3);
        // PDPT[0] -> PD 0x3000; PDPT[1] -> 2 MiB pages in PD 0x6000.
        w(&mut m, 0x2000, 0x3000 | 3);
        w(&mut m, 0x2008, 0x6000 | 3);
        // PD[1] -> PT 0x4000; PT[3] -> 0x30_0000.
        w(&mut m, 0x3008, 0x4000 | 3);
        w(&mut m, 0x4000 + 3 * 8, 0x30_0000 | 3);
        w(&mut m, 0x4000 + 4 * 8, 0x31_0000 | 3);
        // PD 0x6000[0]: 2 MiB page at 0x40_0000.
        w(&mut m, 0x6000, 0x40_0000 | 0x83);
        // PDPT 0x5000[2]: 1 GiB page at 0x4000_0000 (outside RAM).
        w(&mut m, 0x5000 + 2 * 8, 0x4000_0000 | 0x83);
        m
    }

    #[test]
    fn four_level_with_all_page_sizes() {
        let m = long_mode_memory();
        assert_eq!(translate(&m, &LONG4, 0xffff_8000_0020_3abc), Ok(0x30_0abc));
        assert_eq!(translate(&m, &LONG4, 0xffff_8000_4012_3456), Ok(0x52_3456));
        assert_eq!(translate(&m, &LONG4, 0x8765_4321), Ok(0x4765_4321));
        assert_eq!(
            translate(&m, &LONG4, 0xffff_8000_0020_5000),
            Err(WalkError::NotPresent {
                linear: 0xffff_8000_0020_5000,
                level: 1
            })
        );
        assert_eq!(
            translate(&m, &LONG4, 0x0000_8000_0000_0000),
            Err(WalkError::NonCanonical(0x0000_8000_0000_0000))
        );
        assert!(matches!(
            translate(&m, &LONG4, 0x1_0000_0000),
            Err(WalkError::NotPresent { level: 3, .. })
        ));
        // CR3 outside RAM.
        let far = Paging {
            cr3: 0x1_0000_0000,
            ..LONG4
        };
        assert!(matches!(translate(&m, &far, 0), Err(WalkError::Memory(_))));
    }

    #[test]
    fn five_level_and_legacy_modes() {
        let mut m = long_mode_memory();
        // PML5[0] at 0x7000 -> the PML4 at 0x1000.
        m.write_u64(Gpa(0x7000), 0x1000 | 3).unwrap();
        let five = Paging {
            cr3: 0x7000,
            cr4: CR4_PAE | CR4_LA57,
            ..LONG4
        };
        assert_eq!(translate(&m, &five, 0x8012_3456), Ok(0x4012_3456));
        assert!(matches!(
            translate(&m, &five, 0xffff_8000_0000_0000),
            Err(WalkError::NotPresent { level: 5, .. })
        ));
        // Paging off: linear is physical (32 bits).
        let off = Paging::default();
        assert_eq!(translate(&m, &off, 0x1_0012_3456), Ok(0x12_3456));
        // 32-bit paging: PD at 0x10000, PDE[1] 4 MiB page at 0x40_0000,
        // PDE[0] -> PT at 0x11000, PTE[5] -> 0x7_7000.
        m.write(Gpa(0x10004), &(0x40_0000u32 | 0x83).to_le_bytes())
            .unwrap();
        m.write(Gpa(0x10000), &(0x11000u32 | 3).to_le_bytes())
            .unwrap();
        m.write(Gpa(0x11000 + 5 * 4), &(0x7_7000u32 | 3).to_le_bytes())
            .unwrap();
        let p32 = Paging {
            cr0: CR0_PG | 1,
            cr3: 0x10000,
            cr4: CR4_PSE,
            efer: 0,
        };
        assert_eq!(translate(&m, &p32, 0x41_2345), Ok(0x41_2345));
        assert_eq!(translate(&m, &p32, 0x5abc), Ok(0x7_7abc));
        assert!(translate(&m, &p32, 0x80_0000).is_err());
        // PAE: PDPT at 0x20000 (32-byte aligned), PDPTE[0] -> PD 0x21000.
        m.write_u64(Gpa(0x20000), 0x21000 | 1).unwrap();
        m.write_u64(Gpa(0x21000 + 8), 0x60_0000 | 0x83).unwrap();
        let pae = Paging {
            cr0: CR0_PG | 1,
            cr3: 0x20000,
            cr4: CR4_PAE,
            efer: 0,
        };
        assert_eq!(translate(&m, &pae, 0x21_0000), Ok(0x61_0000));
        assert!(translate(&m, &pae, 0x4000_0000).is_err());
    }

    #[test]
    fn fetch_crosses_pages_and_stops_at_unmapped_ones() {
        let mut m = long_mode_memory();
        // Instruction bytes at the end of the page mapped at
        // 0xffff_8000_0020_3000 (GPA 0x30_0000), continuing into the next
        // linear page (GPA 0x31_0000).
        m.write(Gpa(0x30_0ffc), &[1, 2, 3, 4]).unwrap();
        m.write(Gpa(0x31_0000), &[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16])
            .unwrap();
        let mut buf = [0u8; MAX_INSN_BYTES];
        let n = fetch(&m, &LONG4, 0xffff_8000_0020_3ffc, &mut buf).unwrap();
        assert_eq!(n, 15);
        assert_eq!(buf, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
        // The next page (0x20_5000) is not mapped: 4 bytes.
        m.write(Gpa(0x31_0ffe), &[0x89, 0x02]).unwrap();
        let n = fetch(&m, &LONG4, 0xffff_8000_0020_4ffe, &mut buf).unwrap();
        assert_eq!((n, &buf[..2]), (2, &[0x89, 0x02][..]));
        // Unmapped RIP.
        assert!(fetch(&m, &LONG4, 0xffff_8000_0020_5000, &mut buf).is_err());
    }

    /// Random page-table contents: bounded, never a panic.
    #[test]
    fn random_tables_never_panic() {
        let mut rng = 0x5851_f42d_4c95_7f2du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut m = FakeMemory::new(1 << 20);
        for i in 0..(1 << 17) {
            // Entries mostly pointing inside the 1 MiB, some outside.
            let v = next();
            let e = if v & 7 == 0 {
                v
            } else {
                (v & 0xf_f000) | (v & 0x81) | 1
            };
            m.write_u64(Gpa(i * 8), e).unwrap();
        }
        for _ in 0..20_000 {
            let p = Paging {
                cr0: if next() & 1 == 0 { CR0_PG } else { 0 },
                cr3: next() & 0xf_ffff,
                cr4: next() & (CR4_PAE | CR4_PSE | CR4_LA57),
                efer: next() & EFER_LMA,
            };
            let mut buf = [0u8; MAX_INSN_BYTES];
            let _ = fetch(&m, &p, next(), &mut buf);
        }
    }
}
