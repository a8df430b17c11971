//! On-disk structures of MS-VHDX: constants, GUIDs, CRC-32C, the file
//! identifier, headers, region table, metadata table and items, BAT entries and
//! the parent locator.
//!
//! Everything here is pure: parsers take byte slices read by the caller and
//! return typed values or a message naming what is wrong; serializers return
//! bytes. Parsers never index with file-derived values without a bounds check
//! and never panic.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// 1 MiB: the alignment of every region, the log and every block (MS-VHDX 2.1).
pub const MIB: u64 = 1 << 20;
/// 64 KiB: the spacing of the header section structures (MS-VHDX 2.2).
pub const KIB64: u64 = 64 << 10;
/// Size of a header structure (MS-VHDX 2.2.2).
pub const HEADER_SIZE: usize = 4096;
/// Size of a region table (MS-VHDX 2.2.3).
pub const REGION_TABLE_SIZE: usize = 64 << 10;
/// Size of the metadata table at the start of the metadata region (MS-VHDX 2.6.1).
pub const METADATA_TABLE_SIZE: usize = 64 << 10;
/// File offsets of the structures in the header section (MS-VHDX 2.2).
pub const FILE_ID_OFFSET: u64 = 0;
/// First header.
pub const HEADER1_OFFSET: u64 = 64 << 10;
/// Second header.
pub const HEADER2_OFFSET: u64 = 128 << 10;
/// First region table.
pub const REGION1_OFFSET: u64 = 192 << 10;
/// Second region table.
pub const REGION2_OFFSET: u64 = 256 << 10;
/// Largest virtual disk (MS-VHDX 2.6.2.2): 64 TiB.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Smallest and largest payload block (MS-VHDX 2.6.2.1).
pub const MIN_BLOCK_SIZE: u32 = 1 << 20;
/// Largest payload block.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Sectors described by one sector bitmap block (MS-VHDX 2.4): 2^23.
pub const SECTORS_PER_BITMAP_BLOCK: u64 = 1 << 23;
/// Entry count caps of the region and metadata tables.
pub const MAX_TABLE_ENTRIES: u32 = 2047;

/// File type identifier signature "vhdxfile" (MS-VHDX 2.2.1).
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
const HEADER_SIGNATURE: &[u8; 4] = b"head";
const REGION_SIGNATURE: &[u8; 4] = b"regi";
const METADATA_SIGNATURE: &[u8; 8] = b"metadata";

/// CRC-32C (Castagnoli), the checksum of every VHDX structure. Slice-by-16
/// tables: checksums cover 64 KiB tables and whole log entries.
pub const CRC32C: crc::Crc<u32, crc::Table<16>> =
    crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);

/// CRC-32C of `buf` with the 4-byte checksum field at `field` taken as zero.
pub fn checksum_with_hole(buf: &[u8], field: usize) -> u32 {
    let mut d = CRC32C.digest();
    let (a, rest) = buf.split_at(field.min(buf.len()));
    d.update(a);
    let hole = rest.len().min(4);
    d.update(&[0u8; 4][..hole]);
    d.update(rest.get(4..).unwrap_or(&[]));
    d.finalize()
}

/// Little-endian field readers that return 0 outside `b` (callers pass
/// fixed-size structures, so a miss is a caller bug, not a file property).
pub fn rd16(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_le_bytes)
        .unwrap_or(0)
}
/// See [`rd16`].
pub fn rd32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0)
}
/// See [`rd16`].
pub fn rd64(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}
/// Writes `v` at `off` if it fits.
pub fn wr16(b: &mut [u8], off: usize, v: u16) {
    if let Some(s) = b.get_mut(off..off + 2) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}
/// See [`wr16`].
pub fn wr32(b: &mut [u8], off: usize, v: u32) {
    if let Some(s) = b.get_mut(off..off + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}
/// See [`wr16`].
pub fn wr64(b: &mut [u8], off: usize, v: u64) {
    if let Some(s) = b.get_mut(off..off + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}
fn wr_bytes(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(s) = b.get_mut(off..off + v.len()) {
        s.copy_from_slice(v);
    }
}

/// A GUID in its on-disk (Microsoft mixed-endian) byte order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The all-zero GUID.
    pub const ZERO: Guid = Guid([0; 16]);

    /// Builds a GUID from its textual fields `d1-d2-d3-d4`.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// Reads 16 bytes at `off` (zero GUID if out of range).
    pub fn read(b: &[u8], off: usize) -> Guid {
        let mut g = [0u8; 16];
        if let Some(s) = b.get(off..off + 16) {
            g.copy_from_slice(s);
        }
        Guid(g)
    }

    /// True for the all-zero GUID.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Parses `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` (braces optional, any case).
    pub fn parse(s: &str) -> Option<Guid> {
        let s = s.trim();
        let s = s.strip_prefix('{').unwrap_or(s);
        let s = s.strip_suffix('}').unwrap_or(s);
        let parts: Vec<&str> = s.split('-').collect();
        let lens = [8usize, 4, 4, 4, 12];
        if parts.len() != 5 || parts.iter().zip(lens).any(|(p, l)| p.len() != l) {
            return None;
        }
        let d1 = u32::from_str_radix(parts.first()?, 16).ok()?;
        let d2 = u16::from_str_radix(parts.get(1)?, 16).ok()?;
        let d3 = u16::from_str_radix(parts.get(2)?, 16).ok()?;
        let tail = [*parts.get(3)?, *parts.get(4)?].concat();
        let mut d4 = [0u8; 8];
        for (i, byte) in d4.iter_mut().enumerate() {
            *byte = u8::from_str_radix(tail.get(i * 2..i * 2 + 2)?, 16).ok()?;
        }
        Some(Guid::from_fields(d1, d2, d3, d4))
    }
}

impl fmt::Display for Guid {
    /// Formats as `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` in lowercase.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{{{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}}}",
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            b[8],
            b[9],
            b[10],
            b[11],
            b[12],
            b[13],
            b[14],
            b[15]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Deterministic GUID source (SplitMix64). No RNG dependency: the caller
/// seeds it (the CLI from /dev/urandom and the clock; tests with constants).
#[derive(Debug, Clone)]
pub struct GuidGen {
    state: u64,
}

impl GuidGen {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        GuidGen { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A fresh version-4 style GUID (never zero).
    pub fn next_guid(&mut self) -> Guid {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        b[8..].copy_from_slice(&self.next_u64().to_le_bytes());
        b[7] = (b[7] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Guid(b)
    }
}

/// Region GUIDs (MS-VHDX 2.2.3.2).
pub const BAT_REGION: Guid = Guid::from_fields(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
/// Metadata region GUID.
pub const METADATA_REGION: Guid = Guid::from_fields(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
/// Metadata item GUIDs (MS-VHDX 2.6.2).
pub const FILE_PARAMETERS: Guid = Guid::from_fields(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
/// Virtual Disk Size item.
pub const VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
/// Virtual Disk ID (page 83 data) item.
pub const VIRTUAL_DISK_ID: Guid = Guid::from_fields(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
/// Logical Sector Size item.
pub const LOGICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
/// Physical Sector Size item.
pub const PHYSICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
/// Parent Locator item.
pub const PARENT_LOCATOR: Guid = Guid::from_fields(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
/// The VHDX parent locator type (MS-VHDX 2.6.2.6.3).
pub const VHDX_PARENT_LOCATOR_TYPE: Guid = Guid::from_fields(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// Builds the 64 KiB file type identifier (MS-VHDX 2.2.1).
pub fn file_identifier(creator: &str) -> Vec<u8> {
    let mut b = vec![0u8; KIB64 as usize];
    wr_bytes(&mut b, 0, FILE_SIGNATURE);
    let mut off = 8;
    for unit in creator.encode_utf16().take(255) {
        wr16(&mut b, off, unit);
        off += 2;
    }
    b
}

/// One of the two headers (MS-VHDX 2.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Higher is newer.
    pub sequence_number: u64,
    /// Changed on the first modification of the file in each session.
    pub file_write_guid: Guid,
    /// Changed on the first modification of user-visible data in each session.
    pub data_write_guid: Guid,
    /// Non-zero while the log may hold entries to replay.
    pub log_guid: Guid,
    /// Must be 0.
    pub log_version: u16,
    /// Must be 1.
    pub version: u16,
    /// Log length in bytes (multiple of 1 MiB).
    pub log_length: u32,
    /// Log offset in bytes (multiple of 1 MiB).
    pub log_offset: u64,
}

impl Header {
    /// Parses a 4 KiB header; `Err` names why it is not valid.
    pub fn parse(b: &[u8]) -> Result<Header, &'static str> {
        if b.len() < HEADER_SIZE {
            return Err("header truncated");
        }
        let b = &b[..HEADER_SIZE];
        if &b[0..4] != HEADER_SIGNATURE {
            return Err("header signature is not \"head\"");
        }
        if rd32(b, 4) != checksum_with_hole(b, 4) {
            return Err("header checksum mismatch");
        }
        Ok(Header {
            sequence_number: rd64(b, 8),
            file_write_guid: Guid::read(b, 16),
            data_write_guid: Guid::read(b, 32),
            log_guid: Guid::read(b, 48),
            log_version: rd16(b, 64),
            version: rd16(b, 66),
            log_length: rd32(b, 68),
            log_offset: rd64(b, 72),
        })
    }

    /// Serializes into 4 KiB with the checksum filled in.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        wr_bytes(&mut b, 0, HEADER_SIGNATURE);
        wr64(&mut b, 8, self.sequence_number);
        wr_bytes(&mut b, 16, &self.file_write_guid.0);
        wr_bytes(&mut b, 32, &self.data_write_guid.0);
        wr_bytes(&mut b, 48, &self.log_guid.0);
        wr16(&mut b, 64, self.log_version);
        wr16(&mut b, 66, self.version);
        wr32(&mut b, 68, self.log_length);
        wr64(&mut b, 72, self.log_offset);
        let c = checksum_with_hole(&b, 4);
        wr32(&mut b, 4, c);
        b
    }
}

/// One region table entry (MS-VHDX 2.2.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionEntry {
    /// What the region is.
    pub guid: Guid,
    /// File offset (multiple of 1 MiB, at least 1 MiB).
    pub file_offset: u64,
    /// Length in bytes (multiple of 1 MiB).
    pub length: u32,
    /// The implementation must know this region to load the file.
    pub required: bool,
}

/// The BAT and metadata regions located by the region table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regions {
    /// The BAT region.
    pub bat: RegionEntry,
    /// The metadata region.
    pub metadata: RegionEntry,
}

/// Why a region table could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionError {
    /// Damaged table.
    Corrupt(String),
    /// Valid table naming something we cannot handle.
    Unsupported(String),
}

/// Parses a 64 KiB region table.
pub fn parse_region_table(b: &[u8]) -> Result<Regions, RegionError> {
    let c = |m: &str| RegionError::Corrupt(String::from(m));
    if b.len() < REGION_TABLE_SIZE {
        return Err(c("region table truncated"));
    }
    let b = &b[..REGION_TABLE_SIZE];
    if &b[0..4] != REGION_SIGNATURE {
        return Err(c("region table signature is not \"regi\""));
    }
    if rd32(b, 4) != checksum_with_hole(b, 4) {
        return Err(c("region table checksum mismatch"));
    }
    let count = rd32(b, 8);
    if count > MAX_TABLE_ENTRIES {
        return Err(RegionError::Corrupt(format!(
            "region table entry count {count} exceeds 2047"
        )));
    }
    let mut bat = None;
    let mut meta = None;
    for i in 0..count as usize {
        let off = 16 + i * 32;
        let e = RegionEntry {
            guid: Guid::read(b, off),
            file_offset: rd64(b, off + 16),
            length: rd32(b, off + 24),
            required: rd32(b, off + 28) & 1 != 0,
        };
        let slot = if e.guid == BAT_REGION {
            &mut bat
        } else if e.guid == METADATA_REGION {
            &mut meta
        } else if e.required {
            return Err(RegionError::Unsupported(format!(
                "unknown required region {}",
                e.guid
            )));
        } else {
            continue;
        };
        if slot.is_some() {
            return Err(RegionError::Corrupt(format!(
                "region {} listed twice",
                e.guid
            )));
        }
        if e.file_offset < MIB
            || !e.file_offset.is_multiple_of(MIB)
            || !u64::from(e.length).is_multiple_of(MIB)
        {
            return Err(RegionError::Corrupt(format!(
                "region {} at offset {} length {} is not 1 MiB aligned",
                e.guid, e.file_offset, e.length
            )));
        }
        if e.length == 0 {
            return Err(RegionError::Corrupt(format!("region {} is empty", e.guid)));
        }
        *slot = Some(e);
    }
    match (bat, meta) {
        (Some(bat), Some(metadata)) => Ok(Regions { bat, metadata }),
        (None, _) => Err(c("region table has no BAT region")),
        (_, None) => Err(c("region table has no metadata region")),
    }
}

/// Serializes a region table holding the BAT and metadata regions.
pub fn build_region_table(r: &Regions) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    wr_bytes(&mut b, 0, REGION_SIGNATURE);
    wr32(&mut b, 8, 2);
    for (i, e) in [r.bat, r.metadata].iter().enumerate() {
        let off = 16 + i * 32;
        wr_bytes(&mut b, off, &e.guid.0);
        wr64(&mut b, off + 16, e.file_offset);
        wr32(&mut b, off + 24, e.length);
        wr32(&mut b, off + 28, u32::from(e.required));
    }
    let c = checksum_with_hole(&b, 4);
    wr32(&mut b, 4, c);
    b
}

/// One metadata table entry (MS-VHDX 2.6.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataEntry {
    /// Item identity.
    pub item_id: Guid,
    /// Offset from the start of the metadata region (0 when `length` is 0).
    pub offset: u32,
    /// Length in bytes (at most 1 MiB).
    pub length: u32,
    /// User metadata.
    pub is_user: bool,
    /// Virtual disk (not file) metadata.
    pub is_virtual_disk: bool,
    /// Must be understood to load the file.
    pub is_required: bool,
}

/// Parses the 64 KiB metadata table; `region_len` bounds item placement.
pub fn parse_metadata_table(b: &[u8], region_len: u32) -> Result<Vec<MetadataEntry>, String> {
    if b.len() < METADATA_TABLE_SIZE {
        return Err("metadata table truncated".into());
    }
    if &b[0..8] != METADATA_SIGNATURE {
        return Err("metadata table signature is not \"metadata\"".into());
    }
    let count = rd16(b, 10);
    if u32::from(count) > MAX_TABLE_ENTRIES {
        return Err(format!("metadata table entry count {count} exceeds 2047"));
    }
    let mut out: Vec<MetadataEntry> = Vec::new();
    for i in 0..count as usize {
        let off = 32 + i * 32;
        let flags = rd32(b, off + 24);
        let e = MetadataEntry {
            item_id: Guid::read(b, off),
            offset: rd32(b, off + 16),
            length: rd32(b, off + 20),
            is_user: flags & 1 != 0,
            is_virtual_disk: flags & 2 != 0,
            is_required: flags & 4 != 0,
        };
        if e.length > MIB as u32 {
            return Err(format!(
                "metadata item {} length {} exceeds 1 MiB",
                e.item_id, e.length
            ));
        }
        if e.length != 0 {
            let end = u64::from(e.offset) + u64::from(e.length);
            if u64::from(e.offset) < METADATA_TABLE_SIZE as u64 || end > u64::from(region_len) {
                return Err(format!(
                    "metadata item {} at offset {} length {} lies outside the metadata region",
                    e.item_id, e.offset, e.length
                ));
            }
        }
        if out
            .iter()
            .any(|o| o.item_id == e.item_id && o.is_user == e.is_user)
        {
            return Err(format!("metadata item {} listed twice", e.item_id));
        }
        out.push(e);
    }
    Ok(out)
}

/// Serializes a metadata table for `entries`.
pub fn build_metadata_table(entries: &[MetadataEntry]) -> Vec<u8> {
    let mut b = vec![0u8; METADATA_TABLE_SIZE];
    wr_bytes(&mut b, 0, METADATA_SIGNATURE);
    wr16(&mut b, 10, entries.len() as u16);
    for (i, e) in entries.iter().enumerate() {
        let off = 32 + i * 32;
        wr_bytes(&mut b, off, &e.item_id.0);
        wr32(&mut b, off + 16, e.offset);
        wr32(&mut b, off + 20, e.length);
        let flags = u32::from(e.is_user)
            | u32::from(e.is_virtual_disk) << 1
            | u32::from(e.is_required) << 2;
        wr32(&mut b, off + 24, flags);
    }
    b
}

/// Payload block states (MS-VHDX 2.5.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadState {
    /// 0: not in this file (parent, or undefined for non-differencing).
    NotPresent,
    /// 1: contents undefined.
    Undefined,
    /// 2: reads as zeros.
    Zero,
    /// 3: unmapped (reads as zeros here).
    Unmapped,
    /// 6: all of the block is in the file.
    FullyPresent,
    /// 7: some sectors are in the file per the sector bitmap (differencing only).
    PartiallyPresent,
    /// 4 (and any other unknown value): reserved.
    Reserved(u8),
}

/// Sector bitmap block states (MS-VHDX 2.5.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapState {
    /// 0: not allocated.
    NotPresent,
    /// 6: allocated at the entry's offset.
    Present,
    /// Any other value.
    Reserved(u8),
}

/// A 64-bit BAT entry (MS-VHDX 2.5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatEntry(pub u64);

impl BatEntry {
    /// Raw 3-bit state.
    pub fn raw_state(self) -> u8 {
        (self.0 & 7) as u8
    }
    /// State as a payload entry.
    pub fn payload_state(self) -> PayloadState {
        match self.raw_state() {
            0 => PayloadState::NotPresent,
            1 => PayloadState::Undefined,
            2 => PayloadState::Zero,
            // 5 is UNMAPPED in the v0.95 draft of the format; files written
            // to it exist (QEMU reads them the same way).
            3 | 5 => PayloadState::Unmapped,
            6 => PayloadState::FullyPresent,
            7 => PayloadState::PartiallyPresent,
            r => PayloadState::Reserved(r),
        }
    }
    /// State as a sector bitmap entry.
    pub fn bitmap_state(self) -> BitmapState {
        match self.raw_state() {
            0 => BitmapState::NotPresent,
            6 => BitmapState::Present,
            r => BitmapState::Reserved(r),
        }
    }
    /// File offset in bytes (FileOffsetMB * 1 MiB).
    pub fn file_offset(self) -> u64 {
        self.0 & !(MIB - 1)
    }
    /// Reserved bits 3..20.
    pub fn reserved_bits(self) -> u64 {
        self.0 & 0xF_FFF8
    }
    /// Builds an entry; `file_offset` must be a multiple of 1 MiB.
    pub fn new(state: u8, file_offset: u64) -> BatEntry {
        BatEntry(((file_offset / MIB) << 20) | u64::from(state & 7))
    }
}

/// Raw payload state values.
pub const PAYLOAD_NOT_PRESENT: u8 = 0;
/// See [`PayloadState::Undefined`].
pub const PAYLOAD_UNDEFINED: u8 = 1;
/// See [`PayloadState::Zero`].
pub const PAYLOAD_ZERO: u8 = 2;
/// See [`PayloadState::Unmapped`].
pub const PAYLOAD_UNMAPPED: u8 = 3;
/// See [`PayloadState::FullyPresent`].
pub const PAYLOAD_FULLY_PRESENT: u8 = 6;
/// See [`PayloadState::PartiallyPresent`].
pub const PAYLOAD_PARTIALLY_PRESENT: u8 = 7;
/// See [`BitmapState::Present`].
pub const SB_PRESENT: u8 = 6;

/// File Parameters item (MS-VHDX 2.6.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileParameters {
    /// Payload block size in bytes.
    pub block_size: u32,
    /// Fully provisioned (fixed) file.
    pub leave_blocks_allocated: bool,
    /// Differencing file.
    pub has_parent: bool,
}

/// Most key/value entries a parent locator may have. MS-VHDX 2.6.2.6.3
/// defines five keys for the VHDX locator type (parent_linkage,
/// parent_linkage2, relative_path, volume_path, absolute_win32_path) and
/// says nothing of others; 64 leaves room for keys other writers add while
/// keeping the duplicate-key check and the decoded strings small.
pub const MAX_LOCATOR_ENTRIES: usize = 64;
/// Longest key, in bytes of UTF-16: the defined keys are 12 to 19
/// characters; 256 characters is generous for any other.
pub const MAX_LOCATOR_KEY_BYTES: usize = 512;
/// Most bytes of UTF-16 all keys and values of one locator may hold
/// together: three full-length paths (a Win32 extended-length path is at
/// most 32,767 characters, 65,534 bytes, the most a 16-bit ValueLength
/// field can say; MS-VHDX 2.6.2.6.2), two GUIDs and the keys fit in it.
/// Decoding keys and values then costs at most a few hundred KiB, however
/// many times the entries point at the same bytes.
pub const MAX_LOCATOR_STRING_BYTES: usize = 256 << 10;

/// The parent locator (MS-VHDX 2.6.2.6): type and key/value pairs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParentLocator {
    /// Locator type GUID.
    pub locator_type: Guid,
    /// Key/value pairs in file order.
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// Value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Parses a locator item. What a locator may cost is capped before
    /// anything is decoded (see [`MAX_LOCATOR_ENTRIES`]); a locator over the
    /// caps is refused as corrupt.
    pub fn parse(b: &[u8]) -> Result<ParentLocator, String> {
        if b.len() < 20 {
            return Err("parent locator shorter than its 20-byte header".into());
        }
        let locator_type = Guid::read(b, 0);
        let count = usize::from(rd16(b, 18));
        if count > MAX_LOCATOR_ENTRIES {
            return Err(format!(
                "parent locator has {count} key/value entries; at most {MAX_LOCATOR_ENTRIES} are accepted"
            ));
        }
        let table_end = 20 + count * 12;
        if table_end > b.len() {
            return Err(format!(
                "parent locator key/value count {count} does not fit in the item"
            ));
        }
        let row = |i: usize| {
            let off = 20 + i * 12;
            (
                rd32(b, off) as usize,
                rd32(b, off + 4) as usize,
                usize::from(rd16(b, off + 8)),
                usize::from(rd16(b, off + 10)),
            )
        };
        let mut total = 0usize;
        for i in 0..count {
            let (_, _, key_len, val_len) = row(i);
            if key_len > MAX_LOCATOR_KEY_BYTES {
                return Err(format!(
                    "parent locator entry {i} has a {key_len}-byte key; at most {MAX_LOCATOR_KEY_BYTES} are accepted"
                ));
            }
            total += key_len + val_len;
        }
        if total > MAX_LOCATOR_STRING_BYTES {
            return Err(format!(
                "parent locator keys and values total {total} bytes; at most {MAX_LOCATOR_STRING_BYTES} are accepted"
            ));
        }
        let mut entries: Vec<(String, String)> = Vec::with_capacity(count);
        for i in 0..count {
            let (key_off, val_off, key_len, val_len) = row(i);
            let key = utf16_at(b, key_off, key_len)
                .ok_or_else(|| format!("parent locator entry {i} key lies outside the item"))?;
            let val = utf16_at(b, val_off, val_len)
                .ok_or_else(|| format!("parent locator entry {i} value lies outside the item"))?;
            if entries.iter().any(|(k, _)| *k == key) {
                return Err(format!("parent locator key {key:?} listed twice"));
            }
            entries.push((key, val));
        }
        Ok(ParentLocator {
            locator_type,
            entries,
        })
    }

    /// Checks that the locator is within what [`ParentLocator::parse`]
    /// accepts (and what its 16-bit length fields can say), before it is
    /// written to a file.
    pub fn check_limits(&self) -> Result<(), String> {
        if self.entries.len() > MAX_LOCATOR_ENTRIES {
            return Err(format!(
                "a parent locator holds at most {MAX_LOCATOR_ENTRIES} entries"
            ));
        }
        let mut total = 0usize;
        for (k, v) in &self.entries {
            let (kl, vl) = (k.encode_utf16().count() * 2, v.encode_utf16().count() * 2);
            if kl > MAX_LOCATOR_KEY_BYTES || kl == 0 || vl == 0 || vl > usize::from(u16::MAX) {
                return Err(format!(
                    "parent locator entry {k:?} is empty or too long for the format"
                ));
            }
            total += kl + vl;
        }
        if total > MAX_LOCATOR_STRING_BYTES {
            return Err(format!(
                "parent locator strings total {total} bytes, above {MAX_LOCATOR_STRING_BYTES}"
            ));
        }
        Ok(())
    }

    /// Serializes the locator.
    pub fn to_bytes(&self) -> Vec<u8> {
        let table_end = 20 + self.entries.len() * 12;
        let mut strings: Vec<u8> = Vec::new();
        let mut b = vec![0u8; table_end];
        wr_bytes(&mut b, 0, &self.locator_type.0);
        wr16(&mut b, 18, self.entries.len() as u16);
        for (i, (k, v)) in self.entries.iter().enumerate() {
            let ko = table_end + strings.len();
            let kb = utf16_bytes(k);
            strings.extend_from_slice(&kb);
            let vo = table_end + strings.len();
            let vb = utf16_bytes(v);
            strings.extend_from_slice(&vb);
            let off = 20 + i * 12;
            wr32(&mut b, off, ko as u32);
            wr32(&mut b, off + 4, vo as u32);
            wr16(&mut b, off + 8, kb.len() as u16);
            wr16(&mut b, off + 10, vb.len() as u16);
        }
        b.extend_from_slice(&strings);
        b
    }
}

fn utf16_bytes(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

fn utf16_at(b: &[u8], off: usize, len: usize) -> Option<String> {
    if !len.is_multiple_of(2) || off == 0 || len == 0 {
        return None;
    }
    let s = b.get(off..off.checked_add(len)?)?;
    let units = s.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
    Some(
        char::decode_utf16(units)
            .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect(),
    )
}

/// Everything the known metadata items say about the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskParams {
    /// File parameters.
    pub file: FileParameters,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Page 83 identity.
    pub disk_id: Guid,
    /// 512 or 4096.
    pub logical_sector_size: u32,
    /// 512 or 4096.
    pub physical_sector_size: u32,
    /// Present when `file.has_parent`.
    pub parent_locator: Option<ParentLocator>,
}

/// Why the metadata could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataError {
    /// Damaged or inconsistent.
    Corrupt(String),
    /// Well-formed but names something we cannot handle.
    Unsupported(String),
}

/// A logical or physical sector size must be 512 or 4096 (MS-VHDX
/// 2.6.2.4, 2.6.2.5); `which` names it in the message.
pub fn check_sector_size(which: &str, bytes: u32) -> Result<(), String> {
    if bytes == 512 || bytes == 4096 {
        Ok(())
    } else {
        Err(format!("{which} sector size {bytes} is not 512 or 4096"))
    }
}

/// Interprets the metadata items. `item` returns the bytes of an entry.
pub fn parse_disk_params(
    entries: &[MetadataEntry],
    mut item: impl FnMut(&MetadataEntry) -> Result<Vec<u8>, MetadataError>,
) -> Result<DiskParams, MetadataError> {
    let corrupt = |m: String| MetadataError::Corrupt(m);
    let find = |g: Guid| entries.iter().find(|e| e.item_id == g && !e.is_user);
    for e in entries {
        let known = !e.is_user
            && [
                FILE_PARAMETERS,
                VIRTUAL_DISK_SIZE,
                VIRTUAL_DISK_ID,
                LOGICAL_SECTOR_SIZE,
                PHYSICAL_SECTOR_SIZE,
                PARENT_LOCATOR,
            ]
            .contains(&e.item_id);
        if e.is_required && !known {
            return Err(MetadataError::Unsupported(format!(
                "unknown required metadata item {}",
                e.item_id
            )));
        }
    }
    let mut fetch = |g: Guid, name: &str, min_len: usize| -> Result<Vec<u8>, MetadataError> {
        let e = find(g).ok_or_else(|| corrupt(format!("metadata item {name} is missing")))?;
        let b = item(e)?;
        if b.len() < min_len {
            return Err(corrupt(format!(
                "metadata item {name} is {} bytes, needs {min_len}",
                b.len()
            )));
        }
        Ok(b)
    };
    let fp = fetch(FILE_PARAMETERS, "file parameters", 8)?;
    let block_size = rd32(&fp, 0);
    let flags = rd32(&fp, 4);
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(corrupt(format!(
            "block size {block_size} is not a power of two between 1 MiB and 256 MiB"
        )));
    }
    let file = FileParameters {
        block_size,
        leave_blocks_allocated: flags & 1 != 0,
        has_parent: flags & 2 != 0,
    };
    let virtual_size = rd64(&fetch(VIRTUAL_DISK_SIZE, "virtual disk size", 8)?, 0);
    let disk_id = Guid::read(&fetch(VIRTUAL_DISK_ID, "virtual disk id", 16)?, 0);
    let logical_sector_size = rd32(&fetch(LOGICAL_SECTOR_SIZE, "logical sector size", 4)?, 0);
    let physical_sector_size = rd32(&fetch(PHYSICAL_SECTOR_SIZE, "physical sector size", 4)?, 0);
    check_sector_size("logical", logical_sector_size).map_err(corrupt)?;
    check_sector_size("physical", physical_sector_size).map_err(corrupt)?;
    if virtual_size == 0
        || virtual_size > MAX_VIRTUAL_SIZE
        || !virtual_size.is_multiple_of(u64::from(logical_sector_size))
    {
        return Err(corrupt(format!(
            "virtual disk size {virtual_size} is not a non-zero multiple of the sector size up to 64 TiB"
        )));
    }
    let parent_locator = if file.has_parent {
        let b = fetch(PARENT_LOCATOR, "parent locator", 20)?;
        let pl = ParentLocator::parse(&b).map_err(corrupt)?;
        if pl.locator_type != VHDX_PARENT_LOCATOR_TYPE {
            return Err(MetadataError::Unsupported(format!(
                "parent locator type {} is not the VHDX locator",
                pl.locator_type
            )));
        }
        if pl.get("parent_linkage").is_none() {
            return Err(corrupt("parent locator has no parent_linkage".into()));
        }
        Some(pl)
    } else {
        None
    };
    Ok(DiskParams {
        file,
        virtual_size,
        disk_id,
        logical_sector_size,
        physical_sector_size,
        parent_locator,
    })
}

/// Builds the metadata region (table plus items) for `p`, `region_len` long.
pub fn build_metadata_region(p: &DiskParams, region_len: usize) -> Vec<u8> {
    let mut items: Vec<(Guid, bool, Vec<u8>)> = Vec::new();
    let mut fp = vec![0u8; 8];
    wr32(&mut fp, 0, p.file.block_size);
    wr32(
        &mut fp,
        4,
        u32::from(p.file.leave_blocks_allocated) | u32::from(p.file.has_parent) << 1,
    );
    items.push((FILE_PARAMETERS, false, fp));
    items.push((
        VIRTUAL_DISK_SIZE,
        true,
        p.virtual_size.to_le_bytes().to_vec(),
    ));
    items.push((VIRTUAL_DISK_ID, true, p.disk_id.0.to_vec()));
    items.push((
        LOGICAL_SECTOR_SIZE,
        true,
        p.logical_sector_size.to_le_bytes().to_vec(),
    ));
    items.push((
        PHYSICAL_SECTOR_SIZE,
        true,
        p.physical_sector_size.to_le_bytes().to_vec(),
    ));
    if let Some(pl) = &p.parent_locator {
        items.push((PARENT_LOCATOR, false, pl.to_bytes()));
    }
    let mut region = vec![0u8; region_len];
    let mut entries = Vec::new();
    let mut off = METADATA_TABLE_SIZE;
    for (g, vd, data) in items {
        wr_bytes(&mut region, off, &data);
        entries.push(MetadataEntry {
            item_id: g,
            offset: off as u32,
            length: data.len() as u32,
            is_user: false,
            is_virtual_disk: vd,
            is_required: true,
        });
        off += data.len().div_ceil(8) * 8;
    }
    let table = build_metadata_table(&entries);
    wr_bytes(&mut region, 0, &table);
    region
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(CRC32C.checksum(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn guid_text_round_trip_and_layout() {
        let s = "{2dc27766-f623-4200-9d64-115e9bfd4a08}";
        assert_eq!(Guid::parse(s), Some(BAT_REGION));
        assert_eq!(BAT_REGION.to_string(), s);
        assert_eq!(&BAT_REGION.0[..4], &[0x66, 0x77, 0xC2, 0x2D]);
        assert_eq!(
            Guid::parse("2DC27766-F623-4200-9D64-115E9BFD4A08"),
            Some(BAT_REGION)
        );
        assert_eq!(Guid::parse("{zz}"), None);
        assert_eq!(Guid::parse("{2dc27766-f623-4200-9d64-115e9bfd4a0}"), None);
    }

    #[test]
    fn header_round_trip_and_checksum() {
        let h = Header {
            sequence_number: 7,
            file_write_guid: GuidGen::new(1).next_guid(),
            data_write_guid: GuidGen::new(2).next_guid(),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        let mut b = h.to_bytes();
        assert_eq!(Header::parse(&b), Ok(h));
        b[100] ^= 1;
        assert_eq!(Header::parse(&b), Err("header checksum mismatch"));
    }

    #[test]
    fn region_table_rejects_unknown_required() {
        let r = Regions {
            bat: RegionEntry {
                guid: BAT_REGION,
                file_offset: 3 * MIB,
                length: MIB as u32,
                required: true,
            },
            metadata: RegionEntry {
                guid: METADATA_REGION,
                file_offset: 2 * MIB,
                length: MIB as u32,
                required: true,
            },
        };
        let mut b = build_region_table(&r);
        assert_eq!(parse_region_table(&b), Ok(r));
        // Add a third, unknown, required entry.
        wr32(&mut b, 8, 3);
        wr_bytes(&mut b, 16 + 64, &GuidGen::new(9).next_guid().0);
        wr64(&mut b, 16 + 64 + 16, 10 * MIB);
        wr32(&mut b, 16 + 64 + 24, MIB as u32);
        wr32(&mut b, 16 + 64 + 28, 1);
        let c = checksum_with_hole(&b, 4);
        wr32(&mut b, 4, c);
        assert!(matches!(
            parse_region_table(&b),
            Err(RegionError::Unsupported(m)) if m.contains("unknown required region")
        ));
        // Not required: ignored.
        wr32(&mut b, 16 + 64 + 28, 0);
        let c = checksum_with_hole(&b, 4);
        wr32(&mut b, 4, c);
        assert_eq!(parse_region_table(&b), Ok(r));
    }

    #[test]
    fn metadata_round_trip_with_parent_locator() {
        let p = DiskParams {
            file: FileParameters {
                block_size: 2 * MIB as u32,
                leave_blocks_allocated: false,
                has_parent: true,
            },
            virtual_size: 10 * MIB,
            disk_id: GuidGen::new(3).next_guid(),
            logical_sector_size: 4096,
            physical_sector_size: 4096,
            parent_locator: Some(ParentLocator {
                locator_type: VHDX_PARENT_LOCATOR_TYPE,
                entries: vec![
                    (
                        "parent_linkage".into(),
                        "{00000000-0000-0000-0000-000000000001}".into(),
                    ),
                    ("relative_path".into(), "..\\base.vhdx".into()),
                ],
            }),
        };
        let region = build_metadata_region(&p, MIB as usize);
        let entries = parse_metadata_table(&region, MIB as u32).unwrap();
        let got = parse_disk_params(&entries, |e| {
            Ok(region[e.offset as usize..(e.offset + e.length) as usize].to_vec())
        })
        .unwrap();
        assert_eq!(got, p);
    }

    #[test]
    fn unknown_required_metadata_is_refused_optional_ignored() {
        let p = DiskParams {
            file: FileParameters {
                block_size: MIB as u32,
                leave_blocks_allocated: false,
                has_parent: false,
            },
            virtual_size: 4 * MIB,
            disk_id: Guid([1; 16]),
            logical_sector_size: 512,
            physical_sector_size: 512,
            parent_locator: None,
        };
        let region = build_metadata_region(&p, MIB as usize);
        let mut entries = parse_metadata_table(&region, MIB as u32).unwrap();
        let item = |e: &MetadataEntry| {
            Ok(region[e.offset as usize..(e.offset + e.length) as usize].to_vec())
        };
        let mut extra = entries[0];
        extra.item_id = Guid([7; 16]);
        extra.is_required = false;
        entries.push(extra);
        assert_eq!(parse_disk_params(&entries, item), Ok(p.clone()));
        entries.last_mut().unwrap().is_required = true;
        assert!(matches!(
            parse_disk_params(&entries, item),
            Err(MetadataError::Unsupported(m)) if m.contains("unknown required metadata item")
        ));
        // A missing required item is corruption.
        entries.retain(|e| e.item_id != VIRTUAL_DISK_SIZE && e.item_id != Guid([7; 16]));
        assert!(matches!(
            parse_disk_params(&entries, item),
            Err(MetadataError::Corrupt(m)) if m.contains("virtual disk size is missing")
        ));
    }

    /// Raw locator bytes: `n` rows, all keys/values of `len` bytes at the
    /// same offset but the key of row i shifted by 2*i (distinct keys).
    fn raw_locator(n: usize, key_len: u16, val_len: u16) -> Vec<u8> {
        let strings = 20 + 12 * n;
        let mut b = vec![0u8; strings + 2 * n + usize::from(key_len.max(val_len))];
        b[..16].copy_from_slice(&VHDX_PARENT_LOCATOR_TYPE.0);
        wr16(&mut b, 18, n as u16);
        for i in 0..n {
            let row = 20 + 12 * i;
            wr32(&mut b, row, (strings + 2 * i) as u32);
            wr32(&mut b, row + 4, strings as u32);
            wr16(&mut b, row + 8, key_len);
            wr16(&mut b, row + 10, val_len);
        }
        for (k, u) in b[strings..].chunks_exact_mut(2).enumerate() {
            u.copy_from_slice(&(0x4E00 + (k % 0x5000) as u16).to_le_bytes());
        }
        b
    }

    #[test]
    fn parent_locator_costs_are_capped_before_decoding() {
        assert!(ParentLocator::parse(&raw_locator(MAX_LOCATOR_ENTRIES, 8, 8)).is_ok());
        let e = ParentLocator::parse(&raw_locator(MAX_LOCATOR_ENTRIES + 1, 8, 8)).unwrap_err();
        assert!(e.contains("65 key/value entries"), "{e}");
        let e = ParentLocator::parse(&raw_locator(1, 514, 8)).unwrap_err();
        assert!(e.contains("514-byte key"), "{e}");
        // Four full-length values are more than the locator may hold.
        let e = ParentLocator::parse(&raw_locator(4, 8, 65534)).unwrap_err();
        assert!(e.contains("total"), "{e}");
        // Three full-length paths and the linkage fit.
        let mut pl = ParentLocator {
            locator_type: VHDX_PARENT_LOCATOR_TYPE,
            entries: vec![(
                "parent_linkage".into(),
                "{00000000-0000-0000-0000-000000000001}".into(),
            )],
        };
        for k in ["relative_path", "volume_path", "absolute_win32_path"] {
            pl.entries.push((k.into(), "p".repeat(32767)));
        }
        pl.check_limits().unwrap();
        assert_eq!(ParentLocator::parse(&pl.to_bytes()), Ok(pl.clone()));
        // One character more than a 16-bit length can say is refused.
        pl.entries[1].1.push('p');
        assert!(pl.check_limits().is_err());
    }

    #[test]
    fn bat_entry_fields() {
        let e = BatEntry::new(PAYLOAD_FULLY_PRESENT, 5 * MIB);
        assert_eq!(e.payload_state(), PayloadState::FullyPresent);
        assert_eq!(e.file_offset(), 5 * MIB);
        assert_eq!(BatEntry(4).payload_state(), PayloadState::Reserved(4));
        assert_eq!(BatEntry(5).payload_state(), PayloadState::Unmapped);
    }
}
