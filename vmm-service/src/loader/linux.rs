//! Loading a Linux bzImage and its initramfs for the x86 boot protocol's
//! 64-bit entry, on the PC machine ([`crate::devices::Machine::Pc`]).
//!
//! Guest-physical layout (RAM is `[0, ram_bytes)`, at most
//! [`LINUX_MAX_RAM_BYTES`] so it stays below the MMIO hole):
//!
//! | range | what | E820 |
//! |---|---|---|
//! | 0x1000-0x6fff | identity page tables (`start::write_identity_map`) | RAM |
//! | 0x7000 | GDT: 0x08 and 0x10 64-bit code, 0x18 data ([`LINUX_GDT`]) | RAM |
//! | 0x8000 | `boot_params` (the zero page) | RAM |
//! | 0x9000 | command line, NUL-terminated | RAM |
//! | 0x80000 down | initial stack | RAM |
//! | 0x9fc00-0x9ffff | (EBDA-sized hole) | reserved |
//! | 0xe0000-0xfffff | ACPI tables ([`crate::devices::acpi`]) | reserved |
//! | 1 MiB up | free | RAM |
//! | `pref_address` (16 MiB) + `init_size` | the protected-mode kernel, decompressed in place | RAM |
//! | top of RAM | the initramfs, page-aligned | RAM |
//!
//! Linux keeps the first megabyte reserved for itself, so nothing the
//! loader puts there is overwritten before the kernel has copied
//! `boot_params` and the command line. Everything is checked ([`plan`])
//! before anything is written, and nothing overlaps.
//!
//! Start state (boot.rst, "64-bit Boot Protocol"): 64-bit mode, paging on
//! with the 4 GiB identity map (it covers the kernel's `init_size` range,
//! the zero page and the command line), interrupts off, RSI = the zero
//! page, RIP = load address + 0x200, CS = 0x10 and DS = ES = SS = 0x18
//! (`__BOOT_CS` / `__BOOT_DS`, descriptors of [`LINUX_GDT`]).

use super::bzimage::{self, BzImage, BzImageError, ENTRY_64_OFFSET, XLF_CAN_BE_LOADED_ABOVE_4G};
use crate::devices::acpi::{self, VirtioMmioSlot, ACPI_TABLES_GPA};
use crate::start::{write_gdt, write_identity_map, IDENTITY_MAP_BYTES};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use hvcore::abi::{BOOT_PARAMS_GPA, GUEST_GDT_GPA, GUEST_INITIAL_RSP, GUEST_PML4_GPA};
use hvcore::addr::{Gpa, PAGE_SIZE};
use hvcore::mem::{GuestMemory, MemError};
use hvcore::vcpu::{LongModeEntry, SELECTORS_LINUX};

/// The zero page.
pub const LINUX_ZERO_PAGE_GPA: u64 = BOOT_PARAMS_GPA;
/// The command line.
pub const LINUX_CMDLINE_GPA: u64 = 0x9000;
/// Longest command line the loader places (one page, with its NUL).
pub const LINUX_CMDLINE_MAX: usize = PAGE_SIZE as usize - 1;
/// End of the low RAM range in the E820 map.
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// Start of RAM above the BIOS area.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Largest guest RAM for a Linux guest: below the PCI/MMIO hole that the
/// I/O APIC and local APIC pages sit in.
pub const LINUX_MAX_RAM_BYTES: u64 = 0xc000_0000;
/// GDT: null, 0x08 64-bit code (what the vCPU reset loads), 0x10 64-bit
/// code (`__BOOT_CS`), 0x18 flat data (`__BOOT_DS`). Accessed bits preset.
pub const LINUX_GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
];
/// What every Linux guest's command line starts with: the console on the
/// emulated COM1, and `tsc=reliable`: the guest's TSC is the node's plus
/// an offset (constant rate, continued across a migration), while the
/// clocksource watchdog would check it against the ACPI PM timer, whose
/// every read is a VM exit; on a loaded node a slow read-back made Linux
/// mark the TSC unstable and fall back to that timer.
pub const BASE_CMDLINE: &str = "console=ttyS0 tsc=reliable";

/// `boot_params` offsets (Documentation/arch/x86/zero-page.rst).
const BP_ACPI_RSDP_ADDR: usize = 0x070;
const BP_EXT_RAMDISK_IMAGE: usize = 0x0c0;
const BP_EXT_RAMDISK_SIZE: usize = 0x0c4;
const BP_EXT_CMD_LINE_PTR: usize = 0x0c8;
const BP_E820_ENTRIES: usize = 0x1e8;
const BP_E820_TABLE: usize = 0x2d0;
const BP_E820_MAX: usize = 128;
/// Setup header fields the loader writes.
const HDR_VID_MODE: usize = 0x1fa;
const HDR_TYPE_OF_LOADER: usize = 0x210;
const HDR_LOADFLAGS: usize = 0x211;
const HDR_CODE32_START: usize = 0x214;
const HDR_RAMDISK_IMAGE: usize = 0x218;
const HDR_RAMDISK_SIZE: usize = 0x21c;
const HDR_HEAP_END_PTR: usize = 0x224;
const HDR_CMD_LINE_PTR: usize = 0x228;

/// E820 range types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

/// One E820 map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

/// Where everything goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxLayout {
    /// Where the protected-mode kernel is loaded.
    pub kernel_gpa: u64,
    /// End of the range the kernel needs while it starts (load + init_size).
    pub kernel_end_gpa: u64,
    pub initrd_gpa: u64,
    pub initrd_len: u64,
    pub e820: Vec<E820Entry>,
}

/// A loaded kernel, ready to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxBoot {
    /// The vCPU's reset state: RSI = the zero page, CS/DS the boot
    /// protocol's selectors.
    pub entry: LongModeEntry,
    pub layout: LinuxLayout,
    /// The kernel's version string, if it has one.
    pub kernel_version: Option<String>,
}

/// Why a Linux guest could not be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinuxLoadError {
    /// Not a bootable bzImage.
    Image(BzImageError),
    /// More RAM than the machine maps below its MMIO hole.
    RamTooLarge { ram_bytes: u64 },
    /// Not enough RAM for kernel, initramfs and boot structures.
    RamTooSmall { ram_bytes: u64, needed_bytes: u64 },
    /// The command line is longer than the kernel or the loader allows.
    CmdlineTooLong { len: usize, max: usize },
    /// The command line has a byte outside printable ASCII.
    CmdlineByte { at: usize, byte: u8 },
    /// Writing guest memory failed.
    Memory(MemError),
}

impl fmt::Display for LinuxLoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinuxLoadError::Image(e) => write!(f, "Linux kernel: {e}"),
            LinuxLoadError::RamTooLarge { ram_bytes } => write!(
                f,
                "{} MiB of RAM is more than a Linux guest can have ({} MiB)",
                ram_bytes >> 20,
                LINUX_MAX_RAM_BYTES >> 20
            ),
            LinuxLoadError::RamTooSmall {
                ram_bytes,
                needed_bytes,
            } => write!(
                f,
                "{} MiB of RAM is too small for this kernel and initramfs (needs {} MiB)",
                ram_bytes >> 20,
                needed_bytes.div_ceil(1 << 20)
            ),
            LinuxLoadError::CmdlineTooLong { len, max } => {
                write!(f, "kernel command line is {len} bytes (at most {max})")
            }
            LinuxLoadError::CmdlineByte { at, byte } => {
                write!(
                    f,
                    "kernel command line has byte {byte:#04x} at {at} (printable ASCII only)"
                )
            }
            LinuxLoadError::Memory(e) => write!(f, "writing the Linux boot structures: {e}"),
        }
    }
}

impl From<MemError> for LinuxLoadError {
    fn from(e: MemError) -> Self {
        LinuxLoadError::Memory(e)
    }
}

impl From<BzImageError> for LinuxLoadError {
    fn from(e: BzImageError) -> Self {
        LinuxLoadError::Image(e)
    }
}

/// The kernel command line: [`BASE_CMDLINE`], then `tsc_early_khz=N` when
/// the node knows the TSC rate the guest sees (Linux 6.1 takes the TSC
/// frequency from CPUID only on Intel; on AMD it would calibrate against
/// the PIT), then the user's `args`.
pub fn kernel_cmdline(args: &str, tsc_khz: Option<u64>) -> String {
    let mut s = String::from(BASE_CMDLINE);
    if let Some(khz) = tsc_khz {
        s.push_str(&format!(" tsc_early_khz={khz}"));
    }
    let args = args.trim();
    if !args.is_empty() {
        s.push(' ');
        s.push_str(args);
    }
    s
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    v.checked_add(align - 1).map(|x| x & !(align - 1))
}

/// Check everything and decide where things go, writing nothing.
pub fn plan(
    bz: &BzImage<'_>,
    ram_bytes: u64,
    initrd_len: u64,
    cmdline: &str,
) -> Result<LinuxLayout, LinuxLoadError> {
    if ram_bytes > LINUX_MAX_RAM_BYTES || ram_bytes > IDENTITY_MAP_BYTES {
        return Err(LinuxLoadError::RamTooLarge { ram_bytes });
    }
    let max = LINUX_CMDLINE_MAX.min(bz.header.cmdline_size as usize);
    if cmdline.len() > max {
        return Err(LinuxLoadError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    if let Some((at, &byte)) = cmdline
        .as_bytes()
        .iter()
        .enumerate()
        .find(|(_, b)| !(0x20..0x7f).contains(*b))
    {
        return Err(LinuxLoadError::CmdlineByte { at, byte });
    }
    let h = &bz.header;
    let align = u64::from(h.kernel_alignment);
    let kernel_gpa =
        align_up(h.pref_address.max(HIGH_RAM_START), align).ok_or(LinuxLoadError::RamTooSmall {
            ram_bytes,
            needed_bytes: u64::MAX,
        })?;
    let kernel_end_gpa = kernel_gpa + u64::from(h.init_size).max(bz.kernel.len() as u64);
    // The initramfs goes as high as allowed, page-aligned.
    let mut top = ram_bytes;
    if h.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G == 0 {
        top = top.min(u64::from(h.initrd_addr_max) + 1);
    }
    let initrd_gpa = if initrd_len == 0 {
        0
    } else {
        top.checked_sub(initrd_len)
            .map_or(0, |s| s & !(PAGE_SIZE - 1))
    };
    let needed_bytes = align_up(kernel_end_gpa, PAGE_SIZE)
        .and_then(|e| {
            initrd_len
                .checked_next_multiple_of(PAGE_SIZE)
                .and_then(|i| e.checked_add(i))
        })
        .unwrap_or(u64::MAX);
    if kernel_end_gpa > ram_bytes || (initrd_len > 0 && initrd_gpa < kernel_end_gpa) {
        return Err(LinuxLoadError::RamTooSmall {
            ram_bytes,
            needed_bytes,
        });
    }
    let e820 = alloc::vec![
        E820Entry {
            addr: 0,
            size: LOW_RAM_END,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: LOW_RAM_END,
            size: 0xa_0000 - LOW_RAM_END,
            kind: E820Kind::Reserved,
        },
        E820Entry {
            addr: ACPI_TABLES_GPA,
            size: HIGH_RAM_START - ACPI_TABLES_GPA,
            kind: E820Kind::Reserved,
        },
        E820Entry {
            addr: HIGH_RAM_START,
            size: ram_bytes - HIGH_RAM_START,
            kind: E820Kind::Ram,
        },
    ];
    Ok(LinuxLayout {
        kernel_gpa,
        kernel_end_gpa,
        initrd_gpa,
        initrd_len,
        e820,
    })
}

/// Validate `image` against a VM of `ram_bytes` before allocating it.
pub fn check(
    image: &[u8],
    ram_bytes: u64,
    initrd_len: u64,
    cmdline: &str,
) -> Result<LinuxLayout, LinuxLoadError> {
    let bz = bzimage::parse(image)?;
    plan(&bz, ram_bytes, initrd_len, cmdline)
}

/// The zero page for `bz` with `layout`.
fn zero_page(bz: &BzImage<'_>, layout: &LinuxLayout, rsdp: u64) -> [u8; PAGE_SIZE as usize] {
    let mut zp = [0u8; PAGE_SIZE as usize];
    let put32 =
        |zp: &mut [u8], off: usize, v: u32| zp[off..off + 4].copy_from_slice(&v.to_le_bytes());
    zp[bzimage::SETUP_HEADER_OFFSET..bz.header.header_end].copy_from_slice(bz.header_bytes);
    zp[HDR_VID_MODE..HDR_VID_MODE + 2].copy_from_slice(&0xffffu16.to_le_bytes());
    zp[HDR_TYPE_OF_LOADER] = 0xff;
    // Keep LOADED_HIGH; no heap, no quiet flag, no KASLR claim.
    zp[HDR_LOADFLAGS] = bz.header.loadflags & bzimage::LOADED_HIGH;
    put32(&mut zp, HDR_CODE32_START, layout.kernel_gpa as u32);
    put32(&mut zp, HDR_RAMDISK_IMAGE, layout.initrd_gpa as u32);
    put32(&mut zp, HDR_RAMDISK_SIZE, layout.initrd_len as u32);
    put32(
        &mut zp,
        BP_EXT_RAMDISK_IMAGE,
        (layout.initrd_gpa >> 32) as u32,
    );
    put32(
        &mut zp,
        BP_EXT_RAMDISK_SIZE,
        (layout.initrd_len >> 32) as u32,
    );
    zp[HDR_HEAP_END_PTR..HDR_HEAP_END_PTR + 2].copy_from_slice(&[0, 0]);
    put32(&mut zp, HDR_CMD_LINE_PTR, LINUX_CMDLINE_GPA as u32);
    put32(
        &mut zp,
        BP_EXT_CMD_LINE_PTR,
        (LINUX_CMDLINE_GPA >> 32) as u32,
    );
    zp[BP_ACPI_RSDP_ADDR..BP_ACPI_RSDP_ADDR + 8].copy_from_slice(&rsdp.to_le_bytes());
    let n = layout.e820.len().min(BP_E820_MAX);
    zp[BP_E820_ENTRIES] = n as u8;
    for (i, e) in layout.e820.iter().take(n).enumerate() {
        let off = BP_E820_TABLE + 20 * i;
        zp[off..off + 8].copy_from_slice(&e.addr.to_le_bytes());
        zp[off + 8..off + 16].copy_from_slice(&e.size.to_le_bytes());
        zp[off + 16..off + 20].copy_from_slice(&(e.kind as u32).to_le_bytes());
    }
    zp
}

/// Load `image` and `initrd` into `mem` with kernel command line
/// `cmdline` (see [`kernel_cmdline`]): page tables, GDT, ACPI tables
/// (describing the machine and the virtio-mmio devices `virtio`), zero
/// page, command line, kernel and initramfs. On error nothing is written.
pub fn load(
    mem: &mut dyn GuestMemory,
    image: &[u8],
    initrd: &[u8],
    cmdline: &str,
    virtio: &[VirtioMmioSlot],
) -> Result<LinuxBoot, LinuxLoadError> {
    let bz = bzimage::parse(image)?;
    let layout = plan(&bz, mem.ram_bytes(), initrd.len() as u64, cmdline)?;
    write_identity_map(mem)?;
    write_gdt(mem, &LINUX_GDT)?;
    let tables = acpi::build(ACPI_TABLES_GPA, virtio);
    mem.write(Gpa(tables.base_gpa), &tables.bytes)?;
    mem.write(
        Gpa(LINUX_ZERO_PAGE_GPA),
        &zero_page(&bz, &layout, tables.rsdp_gpa()),
    )?;
    let mut line = [0u8; PAGE_SIZE as usize];
    line[..cmdline.len()].copy_from_slice(cmdline.as_bytes());
    mem.write(Gpa(LINUX_CMDLINE_GPA), &line)?;
    mem.write(Gpa(layout.kernel_gpa), bz.kernel)?;
    if !initrd.is_empty() {
        mem.write(Gpa(layout.initrd_gpa), initrd)?;
    }
    Ok(LinuxBoot {
        entry: LongModeEntry {
            rip: layout.kernel_gpa + ENTRY_64_OFFSET,
            rsp: GUEST_INITIAL_RSP,
            rdi: 0,
            rsi: LINUX_ZERO_PAGE_GPA,
            cr3: Gpa(GUEST_PML4_GPA),
            gdt_base: Gpa(GUEST_GDT_GPA),
            gdt_limit: (LINUX_GDT.len() * 8 - 1) as u16,
            code_selector: SELECTORS_LINUX.0,
            data_selector: SELECTORS_LINUX.1,
        },
        layout,
        kernel_version: bz.version.map(String::from),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::bzimage::test_image;
    use crate::testing::FakeMemory;

    const RAM: u64 = 64 << 20;

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn loads_kernel_initrd_and_boot_params() {
        let img = test_image(b"\xfa\xf4\xeb\xfd");
        let initrd = alloc::vec![0x5au8; 10_000];
        let mut mem = FakeMemory::new(RAM);
        let cmdline = kernel_cmdline("  rdinit=/init quiet ", Some(2_500_000));
        assert_eq!(
            cmdline,
            "console=ttyS0 tsc=reliable tsc_early_khz=2500000 rdinit=/init quiet"
        );
        let disk = [VirtioMmioSlot::standard(0)];
        let boot = load(&mut mem, &img, &initrd, &cmdline, &disk).unwrap();
        let b = mem.bytes();
        // Kernel at pref_address, entry at +0x200.
        assert_eq!(boot.layout.kernel_gpa, 0x100_0000);
        assert_eq!(boot.layout.kernel_end_gpa, 0x140_0000);
        assert_eq!(&b[0x100_0000..0x100_0004], b"\xfa\xf4\xeb\xfd");
        assert_eq!(boot.entry.rip, 0x100_0200);
        assert_eq!(boot.entry.rsi, 0x8000);
        assert_eq!(
            (boot.entry.code_selector, boot.entry.data_selector),
            (0x10, 0x18)
        );
        assert_eq!(boot.entry.cr3, Gpa(0x1000));
        assert_eq!(boot.entry.gdt_limit, 31);
        assert_eq!(boot.kernel_version.as_deref(), Some("6.1.0-test (x)"));
        // Initramfs at the top, page-aligned.
        let top = boot.layout.initrd_gpa;
        assert_eq!(top, (RAM - 10_000) & !0xfff);
        assert!(b[top as usize..top as usize + 10_000]
            .iter()
            .all(|&x| x == 0x5a));
        // Zero page.
        let zp = &b[0x8000..0x9000];
        assert_eq!(&zp[0x202..0x206], b"HdrS");
        assert_eq!(u32_at(zp, 0x1fa) & 0xffff, 0xffff, "vid_mode");
        assert_eq!(zp[0x210], 0xff, "type_of_loader");
        assert_eq!(zp[0x211], 0x01, "loadflags");
        assert_eq!(u32_at(zp, 0x214), 0x100_0000);
        assert_eq!(u32_at(zp, 0x218) as u64, top);
        assert_eq!(u32_at(zp, 0x21c), 10_000);
        assert_eq!(u32_at(zp, 0x228), 0x9000);
        assert_eq!(
            (u32_at(zp, 0xc0), u32_at(zp, 0xc4), u32_at(zp, 0xc8)),
            (0, 0, 0)
        );
        assert_eq!(u64_at(zp, 0x70), ACPI_TABLES_GPA);
        assert_eq!(zp[0x1ef], 0, "sentinel clear");
        assert_eq!(zp[0x1e8], 4);
        let e820: Vec<(u64, u64, u32)> = (0..4)
            .map(|i| {
                let o = 0x2d0 + 20 * i;
                (u64_at(zp, o), u64_at(zp, o + 8), u32_at(zp, o + 16))
            })
            .collect();
        assert_eq!(
            e820,
            [
                (0, 0x9_fc00, 1),
                (0x9_fc00, 0x400, 2),
                (0xe_0000, 0x2_0000, 2),
                (0x10_0000, RAM - 0x10_0000, 1)
            ]
        );
        // Command line, NUL-terminated.
        let line = &b[0x9000..0x9000 + cmdline.len() + 1];
        assert_eq!(&line[..cmdline.len()], cmdline.as_bytes());
        assert_eq!(line[cmdline.len()], 0);
        // GDT with __BOOT_CS and __BOOT_DS; identity map; ACPI RSDP.
        assert_eq!(u64_at(b, 0x7010), 0x00af_9b00_0000_ffff);
        assert_eq!(u64_at(b, 0x7018), 0x00cf_9300_0000_ffff);
        assert_eq!(u64_at(b, 0x3000), 0x83);
        assert_eq!(&b[0xe_0000..0xe_0008], b"RSD PTR ");
        assert!(b[0xe_0000..0x10_0000].windows(8).any(|w| w == b"LNRO0005"));
        // Nothing else written between the boot structures and the kernel.
        assert!(b[0x10_0000..0x100_0000].iter().all(|&x| x == 0));
        assert!(b[0xa000..0xe_0000].iter().all(|&x| x == 0));
    }

    #[test]
    fn without_an_initrd() {
        let img = test_image(b"");
        let mut mem = FakeMemory::new(RAM);
        let boot = load(&mut mem, &img, &[], BASE_CMDLINE, &[]).unwrap();
        assert_eq!((boot.layout.initrd_gpa, boot.layout.initrd_len), (0, 0));
        assert_eq!(u32_at(mem.bytes(), 0x8000 + 0x218), 0);
        assert_eq!(kernel_cmdline("", None), "console=ttyS0 tsc=reliable");
    }

    fn err(img: &[u8], ram: u64, initrd: u64, cmdline: &str) -> LinuxLoadError {
        let e = check(img, ram, initrd, cmdline).unwrap_err();
        assert!(!alloc::format!("{e}").is_empty());
        e
    }

    #[test]
    fn rejects_what_does_not_fit() {
        let img = test_image(b"");
        assert!(matches!(err(b"junk", RAM, 0, ""), LinuxLoadError::Image(_)));
        assert!(matches!(
            err(&img, 0xc000_1000, 0, ""),
            LinuxLoadError::RamTooLarge { .. }
        ));
        // Kernel needs 16 MiB + 4 MiB.
        assert!(matches!(
            err(&img, 16 << 20, 0, ""),
            LinuxLoadError::RamTooSmall { .. }
        ));
        assert!(check(&img, 20 << 20, 0, "").is_ok());
        // The initrd must fit above the kernel.
        assert!(matches!(
            err(&img, 24 << 20, 5 << 20, ""),
            LinuxLoadError::RamTooSmall {
                needed_bytes,
                ..
            } if needed_bytes == 25 << 20
        ));
        assert!(check(&img, 24 << 20, 4 << 20, "").is_ok());
        assert!(matches!(
            err(&img, 24 << 20, u64::MAX, ""),
            LinuxLoadError::RamTooSmall { .. }
        ));
        // Command line: the kernel's cmdline_size (2047) and bytes.
        let long = "x".repeat(2048);
        assert_eq!(
            err(&img, RAM, 0, &long),
            LinuxLoadError::CmdlineTooLong {
                len: 2048,
                max: 2047
            }
        );
        assert!(check(&img, RAM, 0, &long[..2047]).is_ok());
        assert_eq!(
            err(&img, RAM, 0, "a\nb"),
            LinuxLoadError::CmdlineByte { at: 1, byte: b'\n' }
        );
        // Without XLF_CAN_BE_LOADED_ABOVE_4G the initrd respects
        // initrd_addr_max.
        let mut low = img.clone();
        low[0x236] = 1;
        low[0x22c..0x230].copy_from_slice(&0x01ff_ffffu32.to_le_bytes());
        let l = check(&low, RAM, 0x1000, "").unwrap();
        assert_eq!(l.initrd_gpa, 0x01ff_f000);
        // Nothing written when loading fails.
        let mut mem = FakeMemory::new(16 << 20);
        assert!(load(&mut mem, &img, &[], "", &[]).is_err());
        assert!(mem.bytes().iter().all(|&b| b == 0));
    }
}
