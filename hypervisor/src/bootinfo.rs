//! Boot information from the loader: memory map, command line, modules and
//! the ACPI RSDP, parsed from either protocol into one [`BootInfo`].
//!
//! * Multiboot1 (spec 0.6.96, 3.3 "Boot information format"): `flags`
//!   selects which fields are valid; bit 2 cmdline, bit 3 mods, bit 6 mmap.
//!   The RSDP is not passed: it is found by scanning the EBDA and the BIOS
//!   area 0xE0000-0xFFFFF (ACPI 6.4, 5.2.5.1).
//! * Xen PVH `hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h):
//!   magic 0x336ec578, version 1 adds the memory map; `rsdp_paddr` is given.
//!
//! Everything the loader hands over is an allegation: counts are capped,
//! lengths bounded and address ranges checked for overflow. The parser copies
//! what it keeps into fixed-size arrays (no heap exists yet), so the loader's
//! structures are dead once [`parse`] returns; only the modules' bytes stay
//! where the loader put them (the frame allocator excludes them).
//!
//! The parsing reaches memory only through [`BootMem`], so host tests feed it
//! byte buffers.

/// Multiboot1 loader magic in EAX.
pub const MULTIBOOT_LOADER_MAGIC: u32 = 0x2BAD_B002;
/// `hvm_start_info.magic` (and the value the PVH entry stub passes along).
pub const PVH_START_MAGIC: u32 = 0x336E_C578;

/// Most memory-map entries kept.
pub const MAX_MEM_REGIONS: usize = 128;
/// Most modules kept.
pub const MAX_MODULES: usize = 16;
/// Longest command line kept (bytes); longer ones are cut at a space.
pub const MAX_CMDLINE: usize = 1024;
/// Longest module command line kept (bytes).
pub const MAX_MODULE_CMDLINE: usize = 128;

/// Reads physical memory during boot.
pub trait BootMem {
    /// Fill `buf` from physical address `pa`; `false` if that range cannot
    /// be read (outside what is mapped).
    fn read(&self, pa: u64, buf: &mut [u8]) -> bool;
}

/// Which loader started the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Multiboot1,
    Pvh,
}

/// Kind of a memory-map entry (e820 types: ACPI 6.4, 15.1 table 15.312).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemKind {
    /// Type 1: RAM the OS may use.
    Usable,
    /// Type 3: ACPI tables, reclaimable after they are read.
    AcpiReclaimable,
    /// Type 4: ACPI NVS.
    AcpiNvs,
    /// Type 5: bad memory.
    Bad,
    /// Type 2 and anything unknown.
    Reserved(u32),
}

impl MemKind {
    /// From an e820 / Multiboot type number.
    pub fn from_e820(kind: u32) -> Self {
        match kind {
            1 => MemKind::Usable,
            3 => MemKind::AcpiReclaimable,
            4 => MemKind::AcpiNvs,
            5 => MemKind::Bad,
            other => MemKind::Reserved(other),
        }
    }
}

/// One memory-map entry: `[base, base + len_bytes)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    pub base: u64,
    pub len_bytes: u64,
    pub kind: MemKind,
}

impl MemRegion {
    /// Exclusive end (saturating: a region running past 2^64 is cut).
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.len_bytes)
    }
}

/// One boot module: bytes at `[start, end)` plus its command line.
#[derive(Clone, Copy, Debug)]
pub struct Module {
    pub start: u64,
    pub end: u64,
    cmdline: [u8; MAX_MODULE_CMDLINE],
    cmdline_len: usize,
}

impl Module {
    /// The module's command line (lossy: invalid UTF-8 gives "").
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }
    /// Size in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.end - self.start
    }
}

/// What the loader told us, copied out of its structures.
pub struct BootInfo {
    pub protocol: Protocol,
    regions: [MemRegion; MAX_MEM_REGIONS],
    region_count: usize,
    /// Entries the loader reported beyond [`MAX_MEM_REGIONS`] (dropped).
    pub regions_dropped: usize,
    modules: [Module; MAX_MODULES],
    module_count: usize,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    /// Physical address of the ACPI RSDP, if known.
    pub rsdp: Option<u64>,
}

/// Why the boot information could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    /// Neither the Multiboot nor the PVH magic.
    UnknownProtocol(u32),
    /// The structure at the given address could not be read.
    Unreadable(u64),
    /// `hvm_start_info.magic` was wrong.
    BadPvhMagic(u32),
    /// No memory map was provided (Multiboot flag 6 clear, or PVH version 0).
    NoMemoryMap,
}

impl core::fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BootInfoError::UnknownProtocol(m) => {
                write!(
                    f,
                    "unknown boot protocol (magic {m:#x}); boot with Multiboot1 or PVH"
                )
            }
            BootInfoError::Unreadable(pa) => write!(f, "boot structure at {pa:#x} is unreadable"),
            BootInfoError::BadPvhMagic(m) => write!(f, "hvm_start_info magic {m:#x} is wrong"),
            BootInfoError::NoMemoryMap => write!(f, "the loader passed no memory map"),
        }
    }
}

const EMPTY_MODULE: Module = Module {
    start: 0,
    end: 0,
    cmdline: [0; MAX_MODULE_CMDLINE],
    cmdline_len: 0,
};
const EMPTY_REGION: MemRegion = MemRegion {
    base: 0,
    len_bytes: 0,
    kind: MemKind::Reserved(0),
};

impl BootInfo {
    fn empty(protocol: Protocol) -> Self {
        BootInfo {
            protocol,
            regions: [EMPTY_REGION; MAX_MEM_REGIONS],
            region_count: 0,
            regions_dropped: 0,
            modules: [EMPTY_MODULE; MAX_MODULES],
            module_count: 0,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            rsdp: None,
        }
    }

    /// The memory map, in loader order.
    pub fn regions(&self) -> &[MemRegion] {
        &self.regions[..self.region_count]
    }
    /// The modules, in loader order (module 0 is the guest kernel).
    pub fn modules(&self) -> &[Module] {
        &self.modules[..self.module_count]
    }
    /// The node command line ("" if none or not UTF-8).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }
    /// Total bytes of usable RAM in the map.
    pub fn usable_bytes(&self) -> u64 {
        self.regions()
            .iter()
            .filter(|r| r.kind == MemKind::Usable)
            .map(|r| r.len_bytes)
            .fold(0u64, u64::saturating_add)
    }
    /// End of the highest usable region.
    pub fn max_usable_end(&self) -> u64 {
        self.regions()
            .iter()
            .filter(|r| r.kind == MemKind::Usable)
            .map(MemRegion::end)
            .max()
            .unwrap_or(0)
    }

    /// GRUB and QEMU put the image's path first on a Multiboot command line
    /// (`/boot/hvmigrate name=a ...`): drop a first word that is not a
    /// `key=value` pair so the node sees only its own arguments.
    fn drop_image_path(&mut self) {
        let line = &self.cmdline[..self.cmdline_len];
        let first_end = line.iter().position(|b| *b == b' ').unwrap_or(line.len());
        if line[..first_end].contains(&b'=') {
            return;
        }
        let rest_start = line[first_end..]
            .iter()
            .position(|b| *b != b' ')
            .map_or(line.len(), |p| first_end + p);
        self.cmdline.copy_within(rest_start..self.cmdline_len, 0);
        self.cmdline_len -= rest_start;
    }

    fn push_region(&mut self, base: u64, len_bytes: u64, kind: u32) {
        if len_bytes == 0 {
            return;
        }
        if self.region_count == MAX_MEM_REGIONS {
            self.regions_dropped += 1;
            return;
        }
        self.regions[self.region_count] = MemRegion {
            base,
            len_bytes,
            kind: MemKind::from_e820(kind),
        };
        self.region_count += 1;
    }

    fn push_module(&mut self, mem: &dyn BootMem, start: u64, end: u64, cmdline_pa: u64) {
        if self.module_count == MAX_MODULES || end < start {
            return;
        }
        let mut m = EMPTY_MODULE;
        m.start = start;
        m.end = end;
        m.cmdline_len = read_cstr(mem, cmdline_pa, &mut m.cmdline);
        self.modules[self.module_count] = m;
        self.module_count += 1;
    }
}

fn read_u32(mem: &dyn BootMem, pa: u64) -> Result<u32, BootInfoError> {
    let mut b = [0u8; 4];
    if mem.read(pa, &mut b) {
        Ok(u32::from_le_bytes(b))
    } else {
        Err(BootInfoError::Unreadable(pa))
    }
}

fn read_u64(mem: &dyn BootMem, pa: u64) -> Result<u64, BootInfoError> {
    let mut b = [0u8; 8];
    if mem.read(pa, &mut b) {
        Ok(u64::from_le_bytes(b))
    } else {
        Err(BootInfoError::Unreadable(pa))
    }
}

/// Copy the NUL-terminated string at `pa` into `out` (at most `out.len()`
/// bytes; a longer string is cut at its last space that fits, so no
/// `key=value` pair is cut in half). Returns the length kept; 0 for `pa` 0.
fn read_cstr(mem: &dyn BootMem, pa: u64, out: &mut [u8]) -> usize {
    if pa == 0 {
        return 0;
    }
    let mut len = 0;
    while len < out.len() {
        let mut b = [0u8; 1];
        if !mem.read(pa.saturating_add(len as u64), &mut b) || b[0] == 0 {
            return len;
        }
        out[len] = b[0];
        len += 1;
    }
    // Too long: cut at the last space.
    out.iter().rposition(|b| *b == b' ').unwrap_or(0)
}

/// Parse the boot information. `magic` and `info_pa` are what the entry stub
/// passed (EAX/PVH marker and EBX).
pub fn parse(mem: &dyn BootMem, magic: u32, info_pa: u64) -> Result<BootInfo, BootInfoError> {
    match magic {
        MULTIBOOT_LOADER_MAGIC => parse_multiboot(mem, info_pa),
        PVH_START_MAGIC => parse_pvh(mem, info_pa),
        other => Err(BootInfoError::UnknownProtocol(other)),
    }
}

/// Multiboot1 information structure (spec 3.3). Offsets used:
/// 0 flags, 16 cmdline, 20 mods_count, 24 mods_addr, 44 mmap_length,
/// 48 mmap_addr.
fn parse_multiboot(mem: &dyn BootMem, mbi: u64) -> Result<BootInfo, BootInfoError> {
    let mut info = BootInfo::empty(Protocol::Multiboot1);
    let flags = read_u32(mem, mbi)?;

    if flags & (1 << 2) != 0 {
        let pa = u64::from(read_u32(mem, mbi + 16)?);
        info.cmdline_len = read_cstr(mem, pa, &mut info.cmdline);
        info.drop_image_path();
    }

    if flags & (1 << 3) != 0 {
        let count = read_u32(mem, mbi + 20)? as usize;
        let addr = u64::from(read_u32(mem, mbi + 24)?);
        // Module entry: mod_start, mod_end, string, reserved (16 bytes).
        for i in 0..count.min(MAX_MODULES) {
            let e = addr + 16 * i as u64;
            let start = u64::from(read_u32(mem, e)?);
            let end = u64::from(read_u32(mem, e + 4)?);
            let string = u64::from(read_u32(mem, e + 8)?);
            info.push_module(mem, start, end, string);
        }
    }

    if flags & (1 << 6) == 0 {
        return Err(BootInfoError::NoMemoryMap);
    }
    let length = u64::from(read_u32(mem, mbi + 44)?);
    let addr = u64::from(read_u32(mem, mbi + 48)?);
    // Entries: size (u32, not counting itself), base_addr u64, length u64,
    // type u32. `size` may exceed 20; a size below 20 is malformed and ends
    // the walk. The walk is bounded by `length` and by the entry cap.
    let mut off = 0u64;
    let mut seen = 0usize;
    while off + 24 <= length && seen < 4 * MAX_MEM_REGIONS {
        let size = u64::from(read_u32(mem, addr + off)?);
        if size < 20 {
            break;
        }
        let base = read_u64(mem, addr + off + 4)?;
        let len = read_u64(mem, addr + off + 12)?;
        let kind = read_u32(mem, addr + off + 20)?;
        info.push_region(base, len, kind);
        off = off.saturating_add(size + 4);
        seen += 1;
    }

    info.rsdp = find_rsdp_bios(mem);
    Ok(info)
}

/// `hvm_start_info` (version 1):
/// 0 magic u32, 4 version u32, 8 flags u32, 12 nr_modules u32,
/// 16 modlist_paddr u64, 24 cmdline_paddr u64, 32 rsdp_paddr u64,
/// 40 memmap_paddr u64, 48 memmap_entries u32, 52 reserved u32.
fn parse_pvh(mem: &dyn BootMem, si: u64) -> Result<BootInfo, BootInfoError> {
    let mut info = BootInfo::empty(Protocol::Pvh);
    let magic = read_u32(mem, si)?;
    if magic != PVH_START_MAGIC {
        return Err(BootInfoError::BadPvhMagic(magic));
    }
    let version = read_u32(mem, si + 4)?;
    let nr_modules = read_u32(mem, si + 12)? as usize;
    let modlist = read_u64(mem, si + 16)?;
    let cmdline = read_u64(mem, si + 24)?;
    let rsdp = read_u64(mem, si + 32)?;

    info.cmdline_len = read_cstr(mem, cmdline, &mut info.cmdline);
    // hvm_modlist_entry: paddr u64, size u64, cmdline_paddr u64, reserved u64.
    for i in 0..nr_modules.min(MAX_MODULES) {
        let e = modlist.saturating_add(32 * i as u64);
        let start = read_u64(mem, e)?;
        let size = read_u64(mem, e + 8)?;
        let string = read_u64(mem, e + 16)?;
        if let Some(end) = start.checked_add(size) {
            info.push_module(mem, start, end, string);
        }
    }

    if version < 1 {
        return Err(BootInfoError::NoMemoryMap);
    }
    let memmap = read_u64(mem, si + 40)?;
    let entries = read_u32(mem, si + 48)? as usize;
    if memmap == 0 || entries == 0 {
        return Err(BootInfoError::NoMemoryMap);
    }
    // hvm_memmap_table_entry: addr u64, size u64, type u32, reserved u32.
    for i in 0..entries.min(4 * MAX_MEM_REGIONS) {
        let e = memmap.saturating_add(24 * i as u64);
        let base = read_u64(mem, e)?;
        let len = read_u64(mem, e + 8)?;
        let kind = read_u32(mem, e + 16)?;
        info.push_region(base, len, kind);
    }

    info.rsdp = if rsdp != 0 {
        Some(rsdp)
    } else {
        find_rsdp_bios(mem)
    };
    Ok(info)
}

/// Whether a valid RSDP (ACPI 6.4, 5.2.5.3) sits at `pa`: signature
/// "RSD PTR " and the ACPI 1.0 checksum over its first 20 bytes.
fn rsdp_at(mem: &dyn BootMem, pa: u64) -> bool {
    let mut b = [0u8; 20];
    mem.read(pa, &mut b)
        && &b[..8] == b"RSD PTR "
        && b.iter().fold(0u8, |s, x| s.wrapping_add(*x)) == 0
}

/// Search the first KiB of the EBDA (segment at 0x40E) and 0xE0000-0xFFFFF
/// on 16-byte boundaries (ACPI 6.4, 5.2.5.1).
pub fn find_rsdp_bios(mem: &dyn BootMem) -> Option<u64> {
    let mut seg = [0u8; 2];
    if mem.read(0x40E, &mut seg) {
        let ebda = u64::from(u16::from_le_bytes(seg)) << 4;
        if (0x8_0000..0xA_0000).contains(&ebda) {
            if let Some(pa) = (ebda..ebda + 1024).step_by(16).find(|pa| rsdp_at(mem, *pa)) {
                return Some(pa);
            }
        }
    }
    (0xE_0000u64..0x10_0000)
        .step_by(16)
        .find(|pa| rsdp_at(mem, *pa))
}

/// The value of `key` in a space-separated `key=value` command line (the
/// last occurrence wins); a bare `key` gives `Some("")`.
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .rev()
        .find_map(|word| match word.split_once('=') {
            Some((k, v)) if k == key => Some(v),
            None if word == key => Some(""),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    /// A flat image of physical memory starting at 0.
    struct Image(Vec<u8>);

    impl Image {
        fn new(len: usize) -> Self {
            Image(vec![0; len])
        }
        fn put(&mut self, pa: u64, bytes: &[u8]) {
            let pa = pa as usize;
            self.0[pa..pa + bytes.len()].copy_from_slice(bytes);
        }
        fn put32(&mut self, pa: u64, v: u32) {
            self.put(pa, &v.to_le_bytes());
        }
        fn put64(&mut self, pa: u64, v: u64) {
            self.put(pa, &v.to_le_bytes());
        }
    }

    impl BootMem for Image {
        fn read(&self, pa: u64, buf: &mut [u8]) -> bool {
            let Ok(start) = usize::try_from(pa) else {
                return false;
            };
            match self.0.get(start..start + buf.len()) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        }
    }

    fn multiboot_image() -> Image {
        let mut m = Image::new(0x10_0000);
        let mbi = 0x9000;
        m.put32(mbi, (1 << 2) | (1 << 3) | (1 << 6));
        m.put32(mbi + 16, 0xA000);
        m.put(0xA000, b"/boot/hvmigrate name=b log=debug\0");
        m.put32(mbi + 20, 1);
        m.put32(mbi + 24, 0xB000);
        m.put32(0xB000, 0x20_0000);
        m.put32(0xB004, 0x20_1234);
        m.put32(0xB008, 0xB100);
        m.put(0xB100, b"guest\0");
        m.put32(mbi + 44, 2 * 24);
        m.put32(mbi + 48, 0xC000);
        for (i, (base, len, kind)) in [(0u64, 0x9_FC00u64, 1u32), (0x10_0000, 0x3FF0_0000, 1)]
            .into_iter()
            .enumerate()
        {
            let e = 0xC000 + 24 * i as u64;
            m.put32(e, 20);
            m.put64(e + 4, base);
            m.put64(e + 12, len);
            m.put32(e + 20, kind);
        }
        m
    }

    #[test]
    fn multiboot_fields() {
        let m = multiboot_image();
        let info = parse(&m, MULTIBOOT_LOADER_MAGIC, 0x9000).unwrap();
        assert_eq!(info.protocol, Protocol::Multiboot1);
        assert_eq!(info.cmdline(), "name=b log=debug");
        assert_eq!(info.modules().len(), 1);
        assert_eq!(info.modules()[0].start, 0x20_0000);
        assert_eq!(info.modules()[0].len_bytes(), 0x1234);
        assert_eq!(info.modules()[0].cmdline(), "guest");
        assert_eq!(info.regions().len(), 2);
        assert_eq!(info.max_usable_end(), 0x4000_0000);
        assert_eq!(info.rsdp, None);
    }

    #[test]
    fn multiboot_rsdp_scan() {
        let mut m = multiboot_image();
        let mut rsdp = [0u8; 20];
        rsdp[..8].copy_from_slice(b"RSD PTR ");
        rsdp[9..15].copy_from_slice(b"BOCHS ");
        let sum = rsdp.iter().fold(0u8, |s, x| s.wrapping_add(*x));
        rsdp[8] = 0u8.wrapping_sub(sum);
        m.put(0xF_5A40, &rsdp);
        let info = parse(&m, MULTIBOOT_LOADER_MAGIC, 0x9000).unwrap();
        assert_eq!(info.rsdp, Some(0xF_5A40));
        // A bad checksum is not an RSDP.
        m.put(0xF_5A48, &[0]);
        assert_eq!(find_rsdp_bios(&m), None);
    }

    #[test]
    fn multiboot_hostile_sizes_are_bounded() {
        let mut m = multiboot_image();
        // An mmap entry with size 0 ends the walk instead of looping.
        m.put32(0xC000 + 24, 0);
        // Claims a huge module count.
        m.put32(0x9000 + 20, u32::MAX);
        m.put32(0x9000 + 44, u32::MAX);
        let info = parse(&m, MULTIBOOT_LOADER_MAGIC, 0x9000).unwrap();
        assert_eq!(info.regions().len(), 1);
        assert!(info.modules().len() <= MAX_MODULES);
        // Missing memory map is an error, unknown magic too.
        m.put32(0x9000, 0);
        assert_eq!(
            parse(&m, MULTIBOOT_LOADER_MAGIC, 0x9000).err(),
            Some(BootInfoError::NoMemoryMap)
        );
        assert_eq!(
            parse(&m, 7, 0x9000).err(),
            Some(BootInfoError::UnknownProtocol(7))
        );
        assert_eq!(
            parse(&m, MULTIBOOT_LOADER_MAGIC, 0xFFFF_FFF0).err(),
            Some(BootInfoError::Unreadable(0xFFFF_FFF0))
        );
    }

    #[test]
    fn pvh_fields() {
        let mut m = Image::new(0x1_0000);
        let si = 0x1000;
        m.put32(si, PVH_START_MAGIC);
        m.put32(si + 4, 1);
        m.put32(si + 12, 1);
        m.put64(si + 16, 0x2000);
        m.put64(si + 24, 0x3000);
        m.put64(si + 32, 0xF_0000);
        m.put64(si + 40, 0x4000);
        m.put32(si + 48, 3);
        m.put(0x3000, b"name=a mode=test\0");
        m.put64(0x2000, 0x80_0000);
        m.put64(0x2008, 0x500);
        m.put64(0x2010, 0);
        for (i, (base, len, kind)) in [
            (0u64, 0x9_F000u64, 1u32),
            (0x10_0000, 0x100_0000, 1),
            (0xFEC0_0000, 0x1000, 2),
        ]
        .into_iter()
        .enumerate()
        {
            let e = 0x4000 + 24 * i as u64;
            m.put64(e, base);
            m.put64(e + 8, len);
            m.put32(e + 16, kind);
        }
        let info = parse(&m, PVH_START_MAGIC, si).unwrap();
        assert_eq!(info.protocol, Protocol::Pvh);
        assert_eq!(info.cmdline(), "name=a mode=test");
        assert_eq!(info.modules()[0].end, 0x80_0500);
        assert_eq!(info.modules()[0].cmdline(), "");
        assert_eq!(info.regions()[2].kind, MemKind::Reserved(2));
        assert_eq!(info.usable_bytes(), 0x9_F000 + 0x100_0000);
        assert_eq!(info.rsdp, Some(0xF_0000));
        m.put32(si, 0);
        assert_eq!(
            parse(&m, PVH_START_MAGIC, si).err(),
            Some(BootInfoError::BadPvhMagic(0))
        );
    }

    #[test]
    fn long_cmdline_is_cut_at_a_space() {
        let mut m = multiboot_image();
        let mut long = Vec::new();
        while long.len() < MAX_CMDLINE + 100 {
            long.extend_from_slice(b"key=value ");
        }
        long.push(0);
        m.put(0xD000, &long);
        m.put32(0x9000 + 16, 0xD000);
        let info = parse(&m, MULTIBOOT_LOADER_MAGIC, 0x9000).unwrap();
        assert!(info.cmdline().len() <= MAX_CMDLINE);
        assert!(info.cmdline().ends_with("value"));
    }

    #[test]
    fn cmdline_values() {
        let c = "name=b  log=debug fault-test mode=test log=trace";
        assert_eq!(cmdline_value(c, "name"), Some("b"));
        assert_eq!(cmdline_value(c, "log"), Some("trace"));
        assert_eq!(cmdline_value(c, "fault-test"), Some(""));
        assert_eq!(cmdline_value(c, "tests"), None);
    }
}
