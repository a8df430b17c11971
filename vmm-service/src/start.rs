//! The guest's start state, as `hvcore::abi` promises it.
//!
//! Writes into guest RAM (below [`GUEST_KERNEL_MIN_GPA`], so never over the
//! kernel): identity page tables for the first 4 GiB with 2 MiB pages (PML4
//! at [`GUEST_PML4_GPA`], the PDPT in the next page, then four page
//! directories), a three-entry GDT at [`GUEST_GDT_GPA`], and [`BootParams`]
//! plus the command line at [`BOOT_PARAMS_GPA`]. Returns the
//! [`LongModeEntry`] the vCPU is reset to.
//!
//! Paging structures: AMD APM vol. 2, 5.3 (long-mode page translation,
//! 2 MiB pages); descriptors: AMD APM vol. 2, 4.8 (long-mode segment
//! descriptors).

use crate::loader::LoadedKernel;
use core::fmt;
use hvcore::abi::{
    BootParams, BOOT_PARAMS_GPA, CMDLINE_MAX, CMDLINE_OFFSET, GUEST_GDT_GPA, GUEST_INITIAL_RSP,
    GUEST_KERNEL_MIN_GPA, GUEST_PML4_GPA,
};
use hvcore::addr::{Gpa, LARGE_PAGE_SIZE, PAGE_SIZE};
use hvcore::mem::{GuestMemory, MemError};
use hvcore::vcpu::LongModeEntry;

/// GPA of the PDPT (the page after the PML4).
pub const GUEST_PDPT_GPA: u64 = GUEST_PML4_GPA + PAGE_SIZE;
/// GPA of the first of the four page directories.
pub const GUEST_PD_GPA: u64 = GUEST_PDPT_GPA + PAGE_SIZE;
/// Bytes identity-mapped for the guest at start.
pub const IDENTITY_MAP_BYTES: u64 = 4 << 30;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_LARGE: u64 = 1 << 7;

/// GDT: null, 0x08 64-bit code (L=1, P, DPL 0, execute/read, accessed), 0x10
/// data (P, read/write, accessed, G, D/B). Accessed bits are preset so the
/// CPU never writes the GDT.
pub const GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// Why the start state could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartError {
    /// The guest command line is longer than [`CMDLINE_MAX`].
    CmdlineTooLong { len: usize },
    /// Guest RAM is too small to hold the boot structures and the kernel.
    RamTooSmall { ram_bytes: u64, needed_bytes: u64 },
    /// Writing guest memory failed.
    Memory(MemError),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::CmdlineTooLong { len } => {
                write!(
                    f,
                    "guest command line is {len} bytes (at most {CMDLINE_MAX})"
                )
            }
            StartError::RamTooSmall {
                ram_bytes,
                needed_bytes,
            } => write!(
                f,
                "guest RAM of {ram_bytes} bytes is too small (needs at least {needed_bytes})"
            ),
            StartError::Memory(e) => write!(f, "writing guest start state: {e}"),
        }
    }
}

impl From<MemError> for StartError {
    fn from(e: MemError) -> Self {
        StartError::Memory(e)
    }
}

/// Write the boot structures for `kernel` and return the vCPU entry state.
pub fn build(
    mem: &mut dyn GuestMemory,
    kernel: &LoadedKernel,
    cmdline: &str,
) -> Result<LongModeEntry, StartError> {
    if cmdline.len() > CMDLINE_MAX {
        return Err(StartError::CmdlineTooLong { len: cmdline.len() });
    }
    let needed_bytes = kernel.end_gpa.max(GUEST_KERNEL_MIN_GPA);
    if mem.ram_bytes() < needed_bytes {
        return Err(StartError::RamTooSmall {
            ram_bytes: mem.ram_bytes(),
            needed_bytes,
        });
    }

    write_identity_map(mem)?;
    write_gdt(mem, &GDT)?;

    let params = BootParams {
        ram_bytes: mem.ram_bytes(),
        cmdline_gpa: BOOT_PARAMS_GPA + CMDLINE_OFFSET,
        cmdline_len: cmdline.len() as u64,
        vcpus: 1,
        kernel_end_gpa: kernel.end_gpa,
    };
    let mut boot_page = [0u8; PAGE_SIZE as usize];
    boot_page[..BootParams::SIZE].copy_from_slice(&params.to_bytes());
    let off = CMDLINE_OFFSET as usize;
    boot_page[off..off + cmdline.len()].copy_from_slice(cmdline.as_bytes());
    mem.write(Gpa(BOOT_PARAMS_GPA), &boot_page)?;

    Ok(LongModeEntry {
        rip: kernel.entry,
        rsp: GUEST_INITIAL_RSP,
        rdi: BOOT_PARAMS_GPA,
        cr3: Gpa(GUEST_PML4_GPA),
        gdt_base: Gpa(GUEST_GDT_GPA),
        gdt_limit: (GDT.len() * 8 - 1) as u16,
        rsi: 0,
        code_selector: hvcore::vcpu::SELECTORS_ABI.0,
        data_selector: hvcore::vcpu::SELECTORS_ABI.1,
    })
}

/// Write the identity page tables for the first [`IDENTITY_MAP_BYTES`]
/// (PML4 at [`GUEST_PML4_GPA`], PDPT, four page directories of 2 MiB
/// pages), the CR3 every guest starts with.
pub fn write_identity_map(mem: &mut dyn GuestMemory) -> Result<(), MemError> {
    let mut page = [0u8; PAGE_SIZE as usize];
    put_entries(&mut page, |i| {
        (i == 0).then_some(GUEST_PDPT_GPA | PTE_PRESENT | PTE_WRITABLE)
    });
    mem.write(Gpa(GUEST_PML4_GPA), &page)?;
    put_entries(&mut page, |i| {
        (i < 4).then(|| (GUEST_PD_GPA + i * PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE)
    });
    mem.write(Gpa(GUEST_PDPT_GPA), &page)?;
    for pd in 0..4u64 {
        put_entries(&mut page, |i| {
            Some(((pd * 512 + i) * LARGE_PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_LARGE)
        });
        mem.write(Gpa(GUEST_PD_GPA + pd * PAGE_SIZE), &page)?;
    }
    Ok(())
}

/// Write `gdt` (descriptors, little-endian) at [`GUEST_GDT_GPA`]; its
/// limit is `gdt.len() * 8 - 1`. At most one page.
pub fn write_gdt(mem: &mut dyn GuestMemory, gdt: &[u64]) -> Result<(), MemError> {
    let mut bytes = [0u8; 64];
    let n = gdt.len().min(bytes.len() / 8);
    for (chunk, d) in bytes.chunks_exact_mut(8).zip(&gdt[..n]) {
        chunk.copy_from_slice(&d.to_le_bytes());
    }
    mem.write(Gpa(GUEST_GDT_GPA), &bytes[..n * 8])
}

/// Fill `page` with 512 little-endian entries, `f(i)` or zero.
fn put_entries(page: &mut [u8; PAGE_SIZE as usize], f: impl Fn(u64) -> Option<u64>) {
    for (i, chunk) in page.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&f(i as u64).unwrap_or(0).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeMemory;

    fn kernel() -> LoadedKernel {
        LoadedKernel {
            entry: 0x10_0040,
            end_gpa: 0x12_3456,
            segments: 1,
        }
    }

    #[test]
    fn layout_matches_the_abi() {
        let mut mem = FakeMemory::new(64 << 20);
        let entry = build(&mut mem, &kernel(), "case=hello").unwrap();
        let q = |gpa: u64| mem.read_u64(Gpa(gpa)).unwrap();
        // PML4[0] -> PDPT, nothing else.
        assert_eq!(q(GUEST_PML4_GPA), 0x2000 | 3);
        assert_eq!(q(GUEST_PML4_GPA + 8), 0);
        // PDPT[0..4] -> the four PDs.
        for i in 0..4 {
            assert_eq!(q(0x2000 + 8 * i), (0x3000 + 0x1000 * i) | 3);
        }
        assert_eq!(q(0x2000 + 8 * 4), 0);
        // PD entries: identity, 2 MiB, present+writable+PS.
        assert_eq!(q(0x3000), 0x83);
        assert_eq!(q(0x3008), 0x20_0083);
        assert_eq!(q(0x6ff8), 0xffe0_0083, "last 2 MiB below 4 GiB");
        for pd in 0..4u64 {
            for i in 0..512u64 {
                let gpa = (pd * 512 + i) << 21;
                assert_eq!(q(0x3000 + pd * 0x1000 + i * 8), gpa | 0x83);
            }
        }
        // GDT.
        assert_eq!(q(0x7000), 0);
        assert_eq!(q(0x7008), 0x00af_9b00_0000_ffff);
        assert_eq!(q(0x7010), 0x00cf_9300_0000_ffff);
        // Boot params and command line.
        let mut raw = [0u8; BootParams::SIZE];
        mem.read(Gpa(BOOT_PARAMS_GPA), &mut raw).unwrap();
        let p = BootParams::from_bytes(&raw).unwrap();
        assert_eq!(
            p,
            BootParams {
                ram_bytes: 64 << 20,
                cmdline_gpa: 0x8100,
                cmdline_len: 10,
                vcpus: 1,
                kernel_end_gpa: 0x12_3456,
            }
        );
        let mut cmd = [0u8; 10];
        mem.read(Gpa(0x8100), &mut cmd).unwrap();
        assert_eq!(&cmd, b"case=hello");
        assert_eq!(
            entry,
            LongModeEntry {
                rip: 0x10_0040,
                rsp: GUEST_INITIAL_RSP,
                rdi: BOOT_PARAMS_GPA,
                cr3: Gpa(0x1000),
                gdt_base: Gpa(0x7000),
                gdt_limit: 23,
                rsi: 0,
                code_selector: hvcore::vcpu::SELECTORS_ABI.0,
                data_selector: hvcore::vcpu::SELECTORS_ABI.1,
            }
        );
        // Nothing written at or above the kernel's lowest address.
        assert!(mem.bytes()[GUEST_KERNEL_MIN_GPA as usize..]
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn rejects_long_cmdline_and_small_ram() {
        let mut mem = FakeMemory::new(64 << 20);
        let long = "x".repeat(CMDLINE_MAX + 1);
        assert_eq!(
            build(&mut mem, &kernel(), &long),
            Err(StartError::CmdlineTooLong {
                len: CMDLINE_MAX + 1
            })
        );
        assert!(build(&mut mem, &kernel(), &"y".repeat(CMDLINE_MAX)).is_ok());
        let mut small = FakeMemory::new(0x10_0000);
        assert!(matches!(
            build(&mut small, &kernel(), ""),
            Err(StartError::RamTooSmall { .. })
        ));
    }
}
