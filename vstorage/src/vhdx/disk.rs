//! [`Vhdx`]: an open VHDX file as a [`VirtualDisk`].
//!
//! The format modules (`format`, `layout`, `log`) decide *where* bytes live;
//! this module moves them through a [`BlockIo`] and keeps the crash-safety
//! rules of MS-VHDX:
//!
//! - Headers are updated by writing the non-current copy with sequence + 1 and
//!   flushing (MS-VHDX 2.2.2.1); each update is done twice so both copies agree.
//! - The first modification in a session changes FileWriteGuid and sets a new
//!   LogGuid; the first user-visible one also changes DataWriteGuid.
//! - BAT and sector bitmap changes go through the log: entry written and
//!   flushed, then applied and flushed. Each entry is its own complete
//!   sequence (tail = itself) and is applied before the next is written, so
//!   replay of the newest valid entry is always correct and idempotent.
//! - New payload data is written and flushed *before* the BAT entry that makes
//!   it visible, so a crash never exposes stale file bytes.
//! - A clean [`Vhdx::close`] (or drop) clears LogGuid so other implementations
//!   can open the file read-only.
//! - A file with a pending log opened read-only is replayed into an in-memory
//!   overlay (MS-VHDX 2.3.3, note 5); the file itself is not touched.

use super::format::*;
use super::layout::{Geometry, ReadPiece, ReadSource, WritePlan};
use super::log::{self, EntryParams, LogWrite, LOG_SECTOR};
use crate::io::{check_request, BlockIo, DiskError, VirtualDisk};
use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

/// Largest log we read into memory for replay.
const MAX_LOG_BYTES: u64 = 256 << 20;
/// Largest in-memory overlay (read-only replay), in 4 KiB pages.
const MAX_OVERLAY_PAGES: usize = 1 << 16;
/// Largest BAT we hold in memory.
const MAX_BAT_BYTES: u64 = 1 << 30;
/// Largest file growth a log replay may cause.
const MAX_REPLAY_GROWTH: u64 = 4 << 30;
/// Pending metadata pages that force a commit before the next flush.
const MAX_PENDING_PAGES: usize = 64;
/// Chunk size for zero fills and block copies.
const COPY_CHUNK: usize = 1 << 20;

fn corrupt(m: impl Into<String>) -> DiskError {
    DiskError::Corrupt(m.into())
}
fn open_err(m: impl Into<String>) -> DiskError {
    DiskError::Open(m.into())
}
fn round_up_mib(v: u64) -> Option<u64> {
    v.checked_add(MIB - 1).map(|x| x & !(MIB - 1))
}

/// How to open a file.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// Allow writes (and log replay on disk).
    pub writable: bool,
    /// Seed for the GUIDs this session generates.
    pub guid_seed: u64,
}

impl OpenOptions {
    /// Read-only.
    pub fn read_only() -> Self {
        OpenOptions {
            writable: false,
            guid_seed: 0,
        }
    }
    /// Read-write with GUIDs from `seed`.
    pub fn read_write(seed: u64) -> Self {
        OpenOptions {
            writable: true,
            guid_seed: seed,
        }
    }
}

/// What kind of VHDX a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// Blocks allocated on demand.
    Dynamic,
    /// Fully provisioned (LeaveBlocksAllocated).
    Fixed,
    /// Has a parent (HasParent).
    Differencing,
}

impl DiskKind {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskKind::Dynamic => "dynamic",
            DiskKind::Fixed => "fixed",
            DiskKind::Differencing => "differencing",
        }
    }
}

/// What a new differencing disk records about its parent.
#[derive(Debug, Clone)]
pub struct ParentSpec {
    /// The parent's DataWriteGuid (becomes parent_linkage).
    pub data_write_guid: Guid,
    /// Path relative to the child's directory ('\'-separated), if any.
    pub relative_path: Option<String>,
    /// Absolute path (stored as absolute_win32_path), if any.
    pub absolute_path: Option<String>,
    /// Parent's virtual size.
    pub virtual_size: u64,
    /// Parent's logical sector size.
    pub logical_sector_size: u32,
    /// Parent's physical sector size.
    pub physical_sector_size: u32,
    /// Parent's page 83 id (virtual disk metadata is copied on fork).
    pub disk_id: Guid,
}

/// Parameters of a new file.
#[derive(Debug, Clone)]
pub struct CreateParams {
    /// Virtual size in bytes (ignored for differencing: the parent's is used).
    pub virtual_size: u64,
    /// Payload block size in bytes (power of two, 1..=256 MiB).
    pub block_size: u32,
    /// 512 or 4096.
    pub logical_sector_size: u32,
    /// 512 or 4096.
    pub physical_sector_size: u32,
    /// Allocate every block now (LeaveBlocksAllocated).
    pub fixed: bool,
    /// Make a differencing disk of this parent.
    pub parent: Option<ParentSpec>,
    /// Seed for GUIDs.
    pub guid_seed: u64,
}

impl CreateParams {
    /// Checks the parameters without touching any file; returns the geometry.
    pub fn validate(&self) -> Result<Geometry, DiskError> {
        let (virtual_size, ls, ps, has_parent) = match &self.parent {
            Some(p) => (
                p.virtual_size,
                p.logical_sector_size,
                p.physical_sector_size,
                true,
            ),
            None => (
                self.virtual_size,
                self.logical_sector_size,
                self.physical_sector_size,
                false,
            ),
        };
        if ps != 512 && ps != 4096 {
            return Err(open_err(format!(
                "physical sector size {ps} is not 512 or 4096"
            )));
        }
        if ls != 512 && ls != 4096 {
            return Err(open_err(format!(
                "logical sector size {ls} is not 512 or 4096"
            )));
        }
        let geo = Geometry::new(self.block_size, ls, virtual_size, has_parent).ok_or_else(|| {
            open_err(format!(
                "invalid parameters: size {virtual_size} must be a non-zero multiple of the {ls}-byte sector up to 64 TiB, block size {} a power of two from 1 MiB to 256 MiB",
                self.block_size
            ))
        })?;
        if geo.bat_entries() * 8 > MAX_BAT_BYTES {
            return Err(open_err(
                "disk too large for its block size (BAT over 1 GiB)",
            ));
        }
        Ok(geo)
    }

    /// A dynamic disk of `virtual_size` bytes with 32 MiB blocks and 512-byte sectors.
    pub fn dynamic(virtual_size: u64) -> Self {
        CreateParams {
            virtual_size,
            block_size: 32 << 20,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            fixed: false,
            parent: None,
            guid_seed: 0,
        }
    }
}

/// An open VHDX file.
pub struct Vhdx<B: BlockIo> {
    io: B,
    writable: bool,
    header: Header,
    /// 0: the header at 64 KiB is current, 1: the one at 128 KiB.
    current_slot: u8,
    params: DiskParams,
    geo: Geometry,
    regions: Regions,
    /// The BAT, padded to whole 4 KiB pages.
    bat: Vec<u8>,
    /// The metadata table as read at open.
    meta_entries: Vec<MetadataEntry>,
    /// BAT pages changed in memory, not yet committed through the log.
    pending_bat: BTreeSet<usize>,
    /// Sector bitmap pages (by file offset) changed, not yet committed.
    pending_sb: BTreeMap<u64, Vec<u8>>,
    /// Zero-state entries whose file space may be reused.
    reusable: IndexSet,
    log_offset: u64,
    log_length: u32,
    log_head: u32,
    log_seq: u64,
    /// Pages replayed in memory (read-only open of a file with a pending log).
    overlay: BTreeMap<u64, Vec<u8>>,
    /// Length of the file as this session sees it.
    file_len: u64,
    /// Next 1 MiB-aligned free offset at the end of the file.
    alloc_end: u64,
    guids: GuidGen,
    session_file: bool,
    session_data: bool,
    /// This session has put its own LogGuid in the header.
    session_log: bool,
    log_replayed: bool,
    parent: Option<Box<Vhdx<B>>>,
    poisoned: Option<String>,
    /// Set by the crash test hook: the session must leave the file as is.
    crashed: bool,
    stop_before_apply: bool,
}

impl<B: BlockIo> core::fmt::Debug for Vhdx<B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Vhdx")
            .field("virtual_size", &self.geo.virtual_size)
            .field("block_size", &self.geo.block_size)
            .field("kind", &self.kind())
            .finish_non_exhaustive()
    }
}

/// What a file extent holds, for overlap messages (named only when one is
/// reported, so validating a BAT allocates nothing per entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Extent {
    Header,
    Log,
    BatRegion,
    MetadataRegion,
    /// An allocated BAT entry, by index.
    Entry(u32),
}

/// A set of BAT indices as a bitmap: one bit per entry, allocated only when
/// the first index is inserted.
#[derive(Debug, Default)]
struct IndexSet {
    words: Vec<u64>,
}

impl IndexSet {
    /// Inserts `i` of a BAT with `entries` entries.
    fn insert(&mut self, i: u64, entries: u64) {
        if self.words.is_empty() {
            self.words = vec![0; entries.div_ceil(64) as usize];
        }
        if let Some(w) = self.words.get_mut((i / 64) as usize) {
            *w |= 1 << (i % 64);
        }
    }
    fn contains(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    fn remove(&mut self, i: u64) {
        if let Some(w) = self.words.get_mut((i / 64) as usize) {
            *w &= !(1 << (i % 64));
        }
    }
}

/// Entry `i` of an in-memory BAT (zero past its end).
fn bat_at(bat: &[u8], i: u64) -> BatEntry {
    BatEntry(rd64(
        bat,
        usize::try_from(i).unwrap_or(usize::MAX).saturating_mul(8),
    ))
}

/// Reads whole-structure bytes from `io` (overlay-free), mapping a short file
/// to a corruption error naming `what`.
fn read_struct<B: BlockIo>(io: &B, off: u64, len: usize, what: &str) -> Result<Vec<u8>, DiskError> {
    let mut b = vec![0u8; len];
    match io.read_at(off, &mut b) {
        Ok(()) => Ok(b),
        Err(crate::io::IoError::OutOfRange { .. }) => Err(corrupt(format!(
            "{what} at offset {off} lies past the end of the file"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Result of reading the header section.
struct Headers {
    header: Header,
    slot: u8,
}

fn read_headers<B: BlockIo>(io: &B) -> Result<Headers, DiskError> {
    let len = io.len()?;
    if len < REGION2_OFFSET + KIB64 {
        let mut sig = [0u8; 8];
        if len >= 8 {
            io.read_at(0, &mut sig)?;
        }
        if &sig != FILE_SIGNATURE {
            return Err(open_err("not a VHDX file (no \"vhdxfile\" signature)"));
        }
        return Err(corrupt(format!(
            "file is {len} bytes, too short for the VHDX header section"
        )));
    }
    let id = read_struct(io, FILE_ID_OFFSET, 8, "file identifier")?;
    if id.as_slice() != FILE_SIGNATURE {
        return Err(open_err("not a VHDX file (no \"vhdxfile\" signature)"));
    }
    let h1 = Header::parse(&read_struct(io, HEADER1_OFFSET, HEADER_SIZE, "header 1")?);
    let h2 = Header::parse(&read_struct(io, HEADER2_OFFSET, HEADER_SIZE, "header 2")?);
    let (header, slot) = match (h1, h2) {
        (Ok(a), Ok(b)) => {
            if b.sequence_number > a.sequence_number {
                (b, 1)
            } else {
                (a, 0)
            }
        }
        (Ok(a), Err(_)) => (a, 0),
        (Err(_), Ok(b)) => (b, 1),
        (Err(e1), Err(e2)) => {
            return Err(corrupt(format!(
                "no valid header (header 1: {e1}; header 2: {e2})"
            )))
        }
    };
    if header.version != 1 {
        return Err(open_err(format!(
            "unsupported VHDX version {} (only 1 is known)",
            header.version
        )));
    }
    Ok(Headers { header, slot })
}

/// Checks the header's log location against the file.
fn check_log_location(h: &Header, file_len: u64) -> Result<(), DiskError> {
    let end = h.log_offset.checked_add(u64::from(h.log_length));
    if h.log_offset < MIB
        || !h.log_offset.is_multiple_of(MIB)
        || h.log_length == 0
        || !u64::from(h.log_length).is_multiple_of(MIB)
        || u64::from(h.log_length) > MAX_LOG_BYTES
    {
        return Err(corrupt(format!(
            "log at offset {} length {} is not a 1 MiB-aligned region of at most 256 MiB",
            h.log_offset, h.log_length
        )));
    }
    match end {
        Some(e) if e <= file_len => Ok(()),
        _ => Err(corrupt(format!(
            "log at offset {} length {} runs past the end of the file",
            h.log_offset, h.log_length
        ))),
    }
}

/// The active log sequence of a file, if its header names a log.
fn pending_log<B: BlockIo>(io: &B, h: &Header) -> Result<Option<Vec<log::ParsedEntry>>, DiskError> {
    if h.log_guid.is_zero() {
        return Ok(None);
    }
    if h.log_version != 0 {
        return Err(open_err(format!(
            "unsupported log version {} with a log to replay",
            h.log_version
        )));
    }
    let file_len = io.len()?;
    check_log_location(h, file_len)?;
    let log_bytes = read_struct(io, h.log_offset, h.log_length as usize, "log")?;
    // A LogGuid with no valid entry means the writer crashed between setting
    // the GUID and flushing its first entry: nothing was applied, so there is
    // nothing to replay (QEMU treats it the same way).
    let Some(seq) = log::find_active_sequence(&log_bytes, &h.log_guid).map_err(corrupt)? else {
        return Ok(None);
    };
    let head = seq.last().ok_or_else(|| corrupt("empty log sequence"))?;
    if file_len < head.flushed_file_offset {
        return Err(corrupt(format!(
            "file is {file_len} bytes but the log says at least {} were flushed: the file was truncated",
            head.flushed_file_offset
        )));
    }
    // A replay may extend the file (MS-VHDX 2.3.3), but a log is written by
    // one allocation at a time: refuse one that would grow the file by more
    // than MAX_REPLAY_GROWTH rather than write that many zeros.
    for e in &seq {
        let last = e.last_file_offset;
        if last > file_len.saturating_add(MAX_REPLAY_GROWTH) {
            return Err(corrupt(format!(
                "log entry {} would grow the file from {file_len} to {last} bytes",
                e.sequence_number
            )));
        }
        for w in &e.writes {
            let (off, len) = match w {
                LogWrite::Data { file_offset, .. } => (*file_offset, LOG_SECTOR as u64),
                LogWrite::Zero { file_offset, len } => (*file_offset, *len),
            };
            let end = off.checked_add(len);
            if off < HEADER2_OFFSET + KIB64 || end.is_none_or(|x| x > last.max(file_len)) {
                return Err(corrupt(format!(
                    "log entry {} writes {len} bytes at offset {off}, outside the file structures",
                    e.sequence_number
                )));
            }
        }
    }
    Ok(Some(seq))
}

/// Fetches the active log for diagnostics: `true` when a replay is pending.
pub fn log_replay_needed<B: BlockIo>(io: &B) -> Result<bool, DiskError> {
    let h = read_headers(io)?;
    Ok(pending_log(io, &h.header)?.is_some())
}

impl<B: BlockIo> Vhdx<B> {
    /// Opens a VHDX. A pending log is replayed: on disk when writable, in
    /// memory otherwise. A differencing disk needs [`Vhdx::attach_parent`]
    /// before reads that fall through to the parent.
    pub fn open(io: B, opts: OpenOptions) -> Result<Self, DiskError> {
        let hs = read_headers(&io)?;
        let mut v = Vhdx {
            io,
            writable: opts.writable,
            header: hs.header,
            current_slot: hs.slot,
            params: DiskParams {
                file: FileParameters {
                    block_size: MIN_BLOCK_SIZE,
                    leave_blocks_allocated: false,
                    has_parent: false,
                },
                virtual_size: 0,
                disk_id: Guid::ZERO,
                logical_sector_size: 512,
                physical_sector_size: 512,
                parent_locator: None,
            },
            geo: Geometry::new(MIN_BLOCK_SIZE, 512, 512, false)
                .ok_or_else(|| corrupt("internal geometry"))?,
            regions: Regions {
                bat: RegionEntry {
                    guid: BAT_REGION,
                    file_offset: 0,
                    length: 0,
                    required: true,
                },
                metadata: RegionEntry {
                    guid: METADATA_REGION,
                    file_offset: 0,
                    length: 0,
                    required: true,
                },
            },
            bat: Vec::new(),
            meta_entries: Vec::new(),
            pending_bat: BTreeSet::new(),
            pending_sb: BTreeMap::new(),
            reusable: IndexSet::default(),
            log_offset: 0,
            log_length: 0,
            log_head: 0,
            log_seq: 1,
            overlay: BTreeMap::new(),
            file_len: 0,
            alloc_end: 0,
            guids: GuidGen::new(opts.guid_seed),
            session_file: false,
            session_data: false,
            session_log: false,
            log_replayed: false,
            parent: None,
            poisoned: None,
            // Until open succeeds, drop must leave the file alone: a
            // half-done replay has to stay replayable.
            crashed: true,
            stop_before_apply: false,
        };
        v.file_len = v.io.len()?;
        if let Some(seq) = pending_log(&v.io, &v.header)? {
            v.replay(seq)?;
        }
        check_log_location(&v.header, v.file_len)?;
        v.log_offset = v.header.log_offset;
        v.log_length = v.header.log_length;
        v.load_structures()?;
        v.crashed = false;
        Ok(v)
    }

    fn replay(&mut self, seq: Vec<log::ParsedEntry>) -> Result<(), DiskError> {
        let last = seq.last().map(|e| e.last_file_offset).unwrap_or(0);
        self.log_replayed = true;
        if self.writable {
            // FileWriteGuid changes before the log playback modifies the file.
            self.update_header(|h, g| h.file_write_guid = g.next_guid())?;
            self.session_file = true;
            for e in &seq {
                for w in &e.writes {
                    self.apply_write(w)?;
                }
            }
            if self.io.len()? < last {
                self.io.set_len(last)?;
            }
            self.io.flush()?;
            self.update_header(|h, _| h.log_guid = Guid::ZERO)?;
            self.file_len = self.io.len()?;
        } else {
            for e in &seq {
                for w in &e.writes {
                    match w {
                        LogWrite::Data { file_offset, data } => {
                            self.overlay.insert(*file_offset, data.clone());
                        }
                        LogWrite::Zero { file_offset, len } => {
                            let pages = len / LOG_SECTOR as u64;
                            if pages > MAX_OVERLAY_PAGES as u64 {
                                return Err(open_err(
                                    "log zeroes too much to replay in memory; open read-write to replay it",
                                ));
                            }
                            for p in 0..pages {
                                self.overlay.insert(
                                    file_offset + p * LOG_SECTOR as u64,
                                    vec![0u8; LOG_SECTOR],
                                );
                            }
                        }
                    }
                    if self.overlay.len() > MAX_OVERLAY_PAGES {
                        return Err(open_err(
                            "log too large to replay in memory; open read-write to replay it",
                        ));
                    }
                }
            }
            self.file_len = self.file_len.max(last);
        }
        Ok(())
    }

    fn apply_write(&mut self, w: &LogWrite) -> Result<(), DiskError> {
        match w {
            LogWrite::Data { file_offset, data } => self.io.write_at(*file_offset, data)?,
            LogWrite::Zero { file_offset, len } => {
                let zeros = vec![0u8; COPY_CHUNK];
                let mut done = 0u64;
                while done < *len {
                    let n = (*len - done).min(COPY_CHUNK as u64) as usize;
                    self.io.write_at(file_offset + done, &zeros[..n])?;
                    done += n as u64;
                }
            }
        }
        Ok(())
    }

    /// Reads file bytes as this session sees them (overlay first).
    fn read_file(&self, off: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let end = off
            .checked_add(buf.len() as u64)
            .ok_or_else(|| corrupt("file offset overflows"))?;
        if self.overlay.is_empty() {
            return match self.io.read_at(off, buf) {
                Ok(()) => Ok(()),
                Err(crate::io::IoError::OutOfRange { .. }) => Err(corrupt(format!(
                    "read of {} bytes at file offset {off} runs past the end of the file",
                    buf.len()
                ))),
                Err(e) => Err(e.into()),
            };
        }
        if end > self.file_len {
            return Err(corrupt(format!(
                "read of {} bytes at file offset {off} runs past the end of the file",
                buf.len()
            )));
        }
        let real_len = self.io.len()?;
        let page = LOG_SECTOR as u64;
        let mut cur = off;
        while cur < end {
            let p = cur - cur % page;
            let n = (p + page).min(end) - cur;
            let dst = &mut buf[(cur - off) as usize..(cur - off + n) as usize];
            if let Some(data) = self.overlay.get(&p) {
                let s = (cur - p) as usize;
                dst.copy_from_slice(&data[s..s + n as usize]);
            } else if cur + n <= real_len {
                self.io.read_at(cur, dst)?;
            } else if cur >= real_len {
                dst.fill(0);
            } else {
                let have = (real_len - cur) as usize;
                self.io.read_at(cur, &mut dst[..have])?;
                dst[have..].fill(0);
            }
            cur += n;
        }
        Ok(())
    }

    fn load_structures(&mut self) -> Result<(), DiskError> {
        // Region tables: the first valid copy wins.
        let mut errors = Vec::new();
        let mut regions = None;
        for (i, off) in [REGION1_OFFSET, REGION2_OFFSET].into_iter().enumerate() {
            let mut b = vec![0u8; REGION_TABLE_SIZE];
            self.read_file(off, &mut b)?;
            match parse_region_table(&b) {
                Ok(r) => {
                    regions = Some(r);
                    break;
                }
                Err(RegionError::Unsupported(m)) => return Err(open_err(m)),
                Err(RegionError::Corrupt(m)) => errors.push(format!("region table {}: {m}", i + 1)),
            }
        }
        let regions = regions.ok_or_else(|| corrupt(errors.join("; ")))?;
        self.regions = regions;
        for r in [regions.bat, regions.metadata] {
            let end = r.file_offset.checked_add(u64::from(r.length));
            if end.is_none_or(|e| e > self.file_len) {
                return Err(corrupt(format!(
                    "{} region at offset {} length {} runs past the end of the file",
                    if r.guid == BAT_REGION {
                        "BAT"
                    } else {
                        "metadata"
                    },
                    r.file_offset,
                    r.length
                )));
            }
        }
        // Metadata.
        let meta_off = regions.metadata.file_offset;
        let mut table = vec![0u8; METADATA_TABLE_SIZE];
        if (regions.metadata.length as usize) < METADATA_TABLE_SIZE {
            return Err(corrupt("metadata region smaller than its 64 KiB table"));
        }
        self.read_file(meta_off, &mut table)?;
        let entries = parse_metadata_table(&table, regions.metadata.length).map_err(corrupt)?;
        let entries_saved = entries.clone();
        let params = {
            let this = &*self;
            parse_disk_params(&entries, |e| {
                let mut b = vec![0u8; e.length as usize];
                this.read_file(meta_off + u64::from(e.offset), &mut b)
                    .map_err(|e| MetadataError::Corrupt(e.to_string()))?;
                Ok(b)
            })
        }
        .map_err(|e| match e {
            MetadataError::Corrupt(m) => corrupt(m),
            MetadataError::Unsupported(m) => open_err(m),
        })?;
        let geo = Geometry::new(
            params.file.block_size,
            params.logical_sector_size,
            params.virtual_size,
            params.file.has_parent,
        )
        .ok_or_else(|| corrupt("disk parameters out of range"))?;
        // BAT.
        let entries = geo.bat_entries();
        let need = entries * 8;
        if need > u64::from(regions.bat.length) {
            return Err(corrupt(format!(
                "BAT region of {} bytes cannot hold the {entries} entries the disk needs",
                regions.bat.length
            )));
        }
        if need > MAX_BAT_BYTES {
            return Err(open_err("BAT larger than 1 GiB is not supported"));
        }
        let padded = need.div_ceil(LOG_SECTOR as u64) * LOG_SECTOR as u64;
        let mut bat = vec![0u8; padded as usize];
        self.read_file(regions.bat.file_offset, &mut bat)?;
        self.params = params;
        self.meta_entries = entries_saved;
        self.geo = geo;
        self.bat = bat;
        self.validate_layout()?;
        Ok(())
    }

    /// Checks every BAT entry and that no two structures overlap, then finds
    /// the zero-state blocks whose file space may be reused.
    ///
    /// Time O(n log n) and memory 4 bytes per allocated or zero-state entry
    /// on top of the BAT itself, whatever the entries say: entries are kept
    /// as `u32` BAT indices sorted by file offset, and a message naming an
    /// extent is formatted only when it is reported.
    fn validate_layout(&mut self) -> Result<(), DiskError> {
        let g = self.geo;
        let diff = g.has_parent;
        let fixed = self.fixed_extents();
        let entries = g.bat_entries();
        // MAX_BAT_BYTES keeps the entry count far below 2^32.
        let idx32 = |i: u64| u32::try_from(i).map_err(|_| corrupt("BAT too large"));
        let mut allocated: Vec<u32> = Vec::new();
        let mut zero_candidates: Vec<u32> = Vec::new();
        let mut partial_without_sb: Option<u64> = None;
        for i in 0..entries {
            let e = self.bat_entry(i);
            if e.reserved_bits() != 0 {
                return Err(corrupt(format!("BAT entry {i} has reserved bits set")));
            }
            match g.classify_index(i) {
                Ok(block) => {
                    if block >= g.payload_blocks {
                        if e.raw_state() != 0 {
                            return Err(corrupt(format!(
                                "BAT entry {i} describes block {block} past the end of the disk"
                            )));
                        }
                        continue;
                    }
                    match e.payload_state() {
                        PayloadState::Reserved(s) => {
                            return Err(corrupt(format!("BAT entry {i} has reserved state {s}")))
                        }
                        PayloadState::PartiallyPresent if !diff => {
                            return Err(corrupt(format!(
                                "BAT entry {i} is partially present in a non-differencing disk"
                            )))
                        }
                        PayloadState::PartiallyPresent => {
                            let chunk = block / g.chunk_ratio;
                            let sb = self.bat_entry(g.bitmap_index(chunk));
                            if sb.bitmap_state() != BitmapState::Present {
                                partial_without_sb.get_or_insert(chunk);
                            }
                        }
                        PayloadState::FullyPresent => {}
                        PayloadState::NotPresent => continue,
                        PayloadState::Zero | PayloadState::Unmapped | PayloadState::Undefined => {
                            if e.file_offset() != 0 {
                                zero_candidates.push(idx32(i)?);
                            }
                            continue;
                        }
                    }
                }
                Err(_) => match e.bitmap_state() {
                    BitmapState::NotPresent => continue,
                    BitmapState::Reserved(s) => {
                        return Err(corrupt(format!("BAT entry {i} has reserved state {s}")))
                    }
                    BitmapState::Present if !diff => {
                        return Err(corrupt(format!(
                            "BAT entry {i} has a sector bitmap in a non-differencing disk"
                        )))
                    }
                    BitmapState::Present => {}
                },
            }
            let off = e.file_offset();
            if off < MIB {
                return Err(corrupt(format!(
                    "BAT entry {i} points into the header section"
                )));
            }
            match self.entry_extent(i) {
                Some((_, end)) if end <= self.file_len => allocated.push(idx32(i)?),
                _ => return Err(corrupt(format!("BAT entry {i} points past end of file"))),
            }
        }
        if let Some(c) = partial_without_sb {
            return Err(corrupt(format!(
                "chunk {c} has partially present blocks but no sector bitmap"
            )));
        }
        // Overlaps: with both lists sorted by start, only neighbours in the
        // merged order can overlap.
        let by_offset = |this: &Self, v: &mut Vec<u32>| {
            v.sort_unstable_by_key(|&i| (this.bat_entry(u64::from(i)).file_offset(), i));
        };
        by_offset(self, &mut allocated);
        let mut prev: Option<(u64, u64, Extent)> = None;
        let mut top = 0u64;
        let (mut fi, mut ai) = (0usize, 0usize);
        loop {
            let next_fixed = fixed.get(fi).copied();
            let next_alloc = allocated.get(ai).and_then(|&i| {
                let (s, e) = self.entry_extent(u64::from(i))?;
                Some((s, e, Extent::Entry(i)))
            });
            let cur = match (next_fixed, next_alloc) {
                (Some(f), Some(a)) if (f.0, f.1) <= (a.0, a.1) => {
                    fi += 1;
                    f
                }
                (_, Some(a)) => {
                    ai += 1;
                    a
                }
                (Some(f), None) => {
                    fi += 1;
                    f
                }
                (None, None) => break,
            };
            if let Some(p) = prev {
                if cur.0 < p.1 {
                    return Err(corrupt(format!(
                        "{} overlaps {}",
                        self.describe_extent(p.2),
                        self.describe_extent(cur.2)
                    )));
                }
            }
            top = top.max(cur.1);
            prev = Some(cur);
        }
        // Zero-state blocks with file space: reusable when the space is
        // free. Taken in file order; a candidate is checked against the
        // next occupied extent of each sorted list (their ends ascend too,
        // as they do not overlap) and against the last one accepted.
        let bs = u64::from(g.block_size);
        by_offset(self, &mut zero_candidates);
        let (mut fi, mut ai) = (0usize, 0usize);
        let mut last_reused_end = 0u64;
        let mut reusable = IndexSet::default();
        for &i in &zero_candidates {
            let off = self.bat_entry(u64::from(i)).file_offset();
            let Some(end) = off.checked_add(bs) else {
                continue;
            };
            if off < MIB || end > self.file_len || off < last_reused_end {
                continue;
            }
            while fixed.get(fi).is_some_and(|f| f.1 <= off) {
                fi += 1;
            }
            while allocated
                .get(ai)
                .and_then(|&a| self.entry_extent(u64::from(a)))
                .is_some_and(|x| x.1 <= off)
            {
                ai += 1;
            }
            let clash = fixed.get(fi).is_some_and(|f| f.0 < end)
                || allocated
                    .get(ai)
                    .and_then(|&a| self.entry_extent(u64::from(a)))
                    .is_some_and(|x| x.0 < end);
            if !clash {
                reusable.insert(u64::from(i), entries);
                last_reused_end = end;
                top = top.max(end);
            }
        }
        self.reusable = reusable;
        self.alloc_end =
            round_up_mib(top.max(self.file_len)).ok_or_else(|| corrupt("file too large"))?;
        Ok(())
    }

    /// The structures at fixed places, sorted by offset.
    fn fixed_extents(&self) -> [(u64, u64, Extent); 4] {
        let r = &self.regions;
        let mut v = [
            (0, MIB, Extent::Header),
            (
                self.log_offset,
                self.log_offset + u64::from(self.log_length),
                Extent::Log,
            ),
            (
                r.bat.file_offset,
                r.bat.file_offset + u64::from(r.bat.length),
                Extent::BatRegion,
            ),
            (
                r.metadata.file_offset,
                r.metadata.file_offset + u64::from(r.metadata.length),
                Extent::MetadataRegion,
            ),
        ];
        v.sort_unstable_by_key(|x| (x.0, x.1));
        v
    }

    /// File range `[start, end)` that allocated BAT entry `i` occupies, or
    /// `None` when it would overflow. The last payload block may be cut
    /// short by the end of the disk: other writers size the file to the
    /// data only.
    fn entry_extent(&self, i: u64) -> Option<(u64, u64)> {
        let g = self.geo;
        let bs = u64::from(g.block_size);
        let size = match g.classify_index(i) {
            Ok(block) => bs.min(g.virtual_size.saturating_sub(block * bs)),
            Err(_) => MIB,
        };
        let off = self.bat_entry(i).file_offset();
        Some((off, off.checked_add(size)?))
    }

    /// Names an extent for an error message.
    fn describe_extent(&self, x: Extent) -> String {
        match x {
            Extent::Header => "header section".into(),
            Extent::Log => "log".into(),
            Extent::BatRegion => "BAT region".into(),
            Extent::MetadataRegion => "metadata region".into(),
            Extent::Entry(i) => match self.geo.classify_index(u64::from(i)) {
                Ok(block) => format!("payload block {block} (BAT entry {i})"),
                Err(chunk) => format!("sector bitmap {chunk} (BAT entry {i})"),
            },
        }
    }

    fn bat_entry(&self, i: u64) -> BatEntry {
        bat_at(&self.bat, i)
    }

    fn set_bat_entry(&mut self, i: u64, e: BatEntry, dirty: &mut BTreeSet<usize>) {
        let off = i as usize * 8;
        wr64(&mut self.bat, off, e.0);
        dirty.insert(off / LOG_SECTOR);
    }

    /// Attaches the parent of a differencing disk, checking its identity
    /// (DataWriteGuid against parent_linkage/parent_linkage2) and sector size.
    pub fn attach_parent(&mut self, parent: Vhdx<B>) -> Result<(), DiskError> {
        let Some(pl) = &self.params.parent_locator else {
            return Err(open_err("not a differencing disk"));
        };
        let have = parent.header.data_write_guid;
        let ok = ["parent_linkage", "parent_linkage2"]
            .iter()
            .filter_map(|k| pl.get(k))
            .filter_map(Guid::parse)
            .any(|g| g == have);
        if !ok {
            return Err(open_err(format!(
                "parent's DataWriteGuid {have} does not match the child's parent_linkage {}",
                pl.get("parent_linkage").unwrap_or("?")
            )));
        }
        if parent.logical_sector_size() != self.logical_sector_size() {
            return Err(open_err(format!(
                "parent logical sector size {} differs from the child's {}",
                parent.logical_sector_size(),
                self.logical_sector_size()
            )));
        }
        self.parent = Some(Box::new(parent));
        Ok(())
    }

    /// The attached parent, if any.
    pub fn parent(&self) -> Option<&Vhdx<B>> {
        self.parent.as_deref()
    }

    /// Detaches and returns the parent.
    pub fn take_parent(&mut self) -> Option<Vhdx<B>> {
        self.parent.take().map(|b| *b)
    }

    /// Dynamic, fixed or differencing.
    pub fn kind(&self) -> DiskKind {
        if self.params.file.has_parent {
            DiskKind::Differencing
        } else if self.params.file.leave_blocks_allocated {
            DiskKind::Fixed
        } else {
            DiskKind::Dynamic
        }
    }

    /// Payload block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.geo.block_size
    }

    /// Virtual size in bytes (same as [`VirtualDisk::virtual_size`]).
    pub fn virtual_size_bytes(&self) -> u64 {
        self.geo.virtual_size
    }

    /// Logical sector size in bytes (same as [`VirtualDisk::logical_sector_size`]).
    pub fn logical_sector_bytes(&self) -> u32 {
        self.geo.sector_size
    }

    /// Physical sector size in bytes.
    pub fn physical_sector_size(&self) -> u32 {
        self.params.physical_sector_size
    }

    /// Page 83 identity.
    pub fn disk_id(&self) -> Guid {
        self.params.disk_id
    }

    /// The current header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The parent locator of a differencing disk.
    pub fn parent_locator(&self) -> Option<&ParentLocator> {
        self.params.parent_locator.as_ref()
    }

    /// True when a log was replayed at open (on disk or in memory).
    pub fn log_was_replayed(&self) -> bool {
        self.log_replayed
    }

    /// True when a log was replayed only in memory (read-only open).
    pub fn log_pending_on_disk(&self) -> bool {
        !self.overlay.is_empty() || (self.log_replayed && !self.writable)
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The backing store.
    pub fn io(&self) -> &B {
        &self.io
    }

    /// Writes a header update: the non-current slot gets sequence + 1 and
    /// becomes current after a flush. Done twice so both copies agree.
    fn update_header(
        &mut self,
        f: impl FnOnce(&mut Header, &mut GuidGen),
    ) -> Result<(), DiskError> {
        let mut h = self.header.clone();
        f(&mut h, &mut self.guids);
        for _ in 0..2 {
            h.sequence_number = self
                .header
                .sequence_number
                .checked_add(1)
                .ok_or_else(|| corrupt("header sequence number overflow"))?;
            let slot = 1 - self.current_slot;
            let off = if slot == 0 {
                HEADER1_OFFSET
            } else {
                HEADER2_OFFSET
            };
            self.io.write_at(off, &h.to_bytes())?;
            self.io.flush()?;
            self.header = h.clone();
            self.current_slot = slot;
        }
        Ok(())
    }

    fn check_usable(&self) -> Result<(), DiskError> {
        if let Some(p) = &self.poisoned {
            return Err(DiskError::Request(format!(
                "disk unusable after an earlier failure: {p}"
            )));
        }
        Ok(())
    }

    /// Header work before the first modification of a session.
    fn begin_modification(&mut self, user_visible: bool) -> Result<(), DiskError> {
        self.check_usable()?;
        if !self.writable {
            return Err(DiskError::Request("disk is opened read-only".into()));
        }
        let new_file = !self.session_file;
        // A fresh LogGuid before this session writes into the log region:
        // entries left by earlier sessions can then never join our sequences.
        let new_log = !self.session_log || self.header.log_guid.is_zero();
        let new_data = user_visible && !self.session_data;
        if new_file || new_log || new_data {
            self.update_header(|h, g| {
                if new_file {
                    h.file_write_guid = g.next_guid();
                }
                if new_log {
                    h.log_guid = g.next_guid();
                }
                if new_data {
                    h.data_write_guid = g.next_guid();
                }
                h.log_version = 0;
            })?;
            if new_log {
                self.log_head = 0;
                self.log_seq = 1;
                self.session_log = true;
            }
            self.session_file = true;
            self.session_data |= user_visible;
        }
        Ok(())
    }

    /// Test hook: the next metadata commit (a flush, or close) writes and
    /// flushes its log entry, then stops as if the machine crashed before
    /// applying it.
    #[doc(hidden)]
    pub fn debug_stop_before_apply(&mut self) {
        self.stop_before_apply = true;
    }

    /// Commits metadata writes through the log.
    fn commit(&mut self, writes: Vec<LogWrite>) -> Result<(), DiskError> {
        let max_entry = (self.log_length / 2) as usize;
        let mut groups: Vec<Vec<LogWrite>> = vec![Vec::new()];
        for w in writes {
            let g = groups.last_mut().ok_or_else(|| corrupt("internal"))?;
            g.push(w);
            if log::entry_len(g) > max_entry && g.len() > 1 {
                let w = g.pop().ok_or_else(|| corrupt("internal"))?;
                groups.push(vec![w]);
            }
        }
        for g in groups.into_iter().filter(|g| !g.is_empty()) {
            let r = self.commit_entry(&g);
            if let Err(e) = &r {
                self.poisoned = Some(e.to_string());
            }
            r?;
        }
        Ok(())
    }

    fn commit_entry(&mut self, writes: &[LogWrite]) -> Result<(), DiskError> {
        let len = log::entry_len(writes) as u32;
        if len > self.log_length {
            return Err(corrupt("log too small for one entry"));
        }
        if self.log_head + len > self.log_length {
            self.log_head = 0;
        }
        let real_len = self.io.len()?;
        let p = EntryParams {
            sequence_number: self.log_seq,
            tail: self.log_head,
            log_guid: self.header.log_guid,
            flushed_file_offset: real_len & !(MIB - 1),
            last_file_offset: round_up_mib(self.alloc_end.max(real_len))
                .ok_or_else(|| corrupt("file too large"))?,
        };
        let entry = log::build_entry(&p, writes);
        self.io
            .write_at(self.log_offset + u64::from(self.log_head), &entry)?;
        self.io.flush()?;
        self.log_head += len;
        self.log_seq += 1;
        if self.stop_before_apply {
            self.crashed = true;
            return Err(DiskError::Io(crate::io::IoError::Host {
                op: "commit",
                detail: "simulated crash before applying the log".into(),
            }));
        }
        for w in writes {
            self.apply_write(w)?;
        }
        self.io.flush()?;
        Ok(())
    }

    fn bat_page_writes(&self, dirty: &BTreeSet<usize>) -> Vec<LogWrite> {
        dirty
            .iter()
            .filter_map(|&p| {
                let data = self.bat.get(p * LOG_SECTOR..(p + 1) * LOG_SECTOR)?.to_vec();
                Some(LogWrite::Data {
                    file_offset: self.regions.bat.file_offset + (p * LOG_SECTOR) as u64,
                    data,
                })
            })
            .collect()
    }

    /// Reserves `len` bytes of new file space (1 MiB aligned) and extends the
    /// file with zeros to cover it.
    fn allocate(&mut self, len: u64) -> Result<u64, DiskError> {
        let off = self.alloc_end;
        let end = off
            .checked_add(len)
            .ok_or_else(|| DiskError::Request("file would grow past 2^64 bytes".into()))?;
        if self.io.len()? < end {
            self.io.set_len(end)?;
        }
        self.alloc_end = end;
        self.file_len = self.file_len.max(end);
        Ok(off)
    }

    fn write_zeros(&mut self, off: u64, len: u64) -> Result<(), DiskError> {
        self.apply_write(&LogWrite::Zero {
            file_offset: off,
            len,
        })
    }

    /// Sets `count` sector bitmap bits from `bit` in the bitmap at `sb_off`,
    /// staging modified 4 KiB pages in `pages`.
    fn set_bits(
        &self,
        sb_off: u64,
        bit: u64,
        count: u64,
        pages: &mut BTreeMap<u64, Vec<u8>>,
    ) -> Result<(), DiskError> {
        let page_bits = (LOG_SECTOR * 8) as u64;
        let mut b = bit;
        let end = bit + count;
        while b < end {
            let page_off = sb_off + (b / page_bits) * LOG_SECTOR as u64;
            let first = b % page_bits;
            let n = (page_bits - first).min(end - b);
            let staged = pages.contains_key(&page_off);
            let mut page = match pages.remove(&page_off) {
                Some(p) => p,
                None => {
                    let mut p = vec![0u8; LOG_SECTOR];
                    self.read_file(page_off, &mut p)?;
                    p
                }
            };
            let mut changed = false;
            for k in first..first + n {
                if let Some(byte) = page.get_mut((k / 8) as usize) {
                    changed |= *byte & (1 << (k % 8)) == 0;
                    *byte |= 1 << (k % 8);
                }
            }
            // Rewriting sectors already present costs no log entry.
            if changed || staged {
                pages.insert(page_off, page);
            }
            b += n;
        }
        Ok(())
    }

    /// Reads `count` sector bitmap bits from `bit`.
    fn get_bits(&self, sb_off: u64, bit: u64, count: u64) -> Result<Vec<bool>, DiskError> {
        let first_byte = bit / 8;
        let last_byte = (bit + count).div_ceil(8);
        let mut bytes = vec![0u8; (last_byte - first_byte) as usize];
        let start = sb_off + first_byte;
        self.read_file(start, &mut bytes)?;
        // Staged (uncommitted) bitmap pages win over the file.
        let end = start + bytes.len() as u64;
        let first_page = start - start % LOG_SECTOR as u64;
        for (&p, page) in self.pending_sb.range(first_page..end) {
            let lo = start.max(p);
            let hi = end.min(p + LOG_SECTOR as u64);
            if lo < hi {
                bytes[(lo - start) as usize..(hi - start) as usize]
                    .copy_from_slice(&page[(lo - p) as usize..(hi - p) as usize]);
            }
        }
        Ok((bit..bit + count)
            .map(|k| {
                let i = (k / 8 - first_byte) as usize;
                bytes.get(i).is_some_and(|b| b & (1 << (k % 8)) != 0)
            })
            .collect())
    }

    fn read_parent(&mut self, voff: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let Some(p) = self.parent.as_deref_mut() else {
            return Err(open_err(
                "differencing disk has no parent attached (open it with its parent chain)",
            ));
        };
        let psize = p.virtual_size();
        let avail = psize.saturating_sub(voff).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        if !head.is_empty() {
            p.read(voff, head)?;
        }
        tail.fill(0);
        Ok(())
    }

    fn read_inner(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let g = self.geo;
        let ss = u64::from(g.sector_size);
        let pieces: Vec<ReadPiece> = {
            let bat = &self.bat;
            g.resolve_read(|i| bat_at(bat, i), offset, buf.len() as u64)
                .collect()
        };
        for p in pieces {
            let dst = &mut buf[p.buf_offset as usize..(p.buf_offset + p.len) as usize];
            match p.source {
                ReadSource::File(off) => self.read_file(off, dst)?,
                ReadSource::Zero => dst.fill(0),
                ReadSource::Parent => self.read_parent(p.virtual_offset, dst)?,
                ReadSource::Bitmap {
                    file_offset,
                    bitmap_file_offset,
                    first_bit,
                } => {
                    let bits = self.get_bits(bitmap_file_offset, first_bit, p.len / ss)?;
                    // Runs of equal bits: one transfer per run.
                    let mut i = 0usize;
                    while i < bits.len() {
                        let present = bits[i];
                        let mut j = i;
                        while j < bits.len() && bits[j] == present {
                            j += 1;
                        }
                        let s = i as u64 * ss;
                        let d = &mut dst[s as usize..(j as u64 * ss) as usize];
                        if present {
                            self.read_file(file_offset + s, d)?;
                        } else {
                            self.read_parent(p.virtual_offset + s, d)?;
                        }
                        i = j;
                    }
                }
            }
        }
        Ok(())
    }

    fn write_inner(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.begin_modification(true)?;
        let mut dirty = core::mem::take(&mut self.pending_bat);
        let mut sb_pages = core::mem::take(&mut self.pending_sb);
        let r = self.place_writes(offset, data, &mut dirty, &mut sb_pages);
        self.pending_bat = dirty;
        self.pending_sb = sb_pages;
        r?;
        // Metadata is committed on flush (or close); a long run of
        // allocations without one is committed in batches.
        if self.pending_bat.len() + self.pending_sb.len() > MAX_PENDING_PAGES {
            self.commit_pending()?;
        }
        Ok(())
    }

    /// Commits pending BAT and sector bitmap pages: data first (so no entry
    /// points at unwritten space), then one log transaction.
    fn commit_pending(&mut self) -> Result<(), DiskError> {
        if self.pending_bat.is_empty() && self.pending_sb.is_empty() {
            return Ok(());
        }
        self.io.flush()?;
        let mut meta: Vec<LogWrite> = core::mem::take(&mut self.pending_sb)
            .into_iter()
            .map(|(file_offset, data)| LogWrite::Data { file_offset, data })
            .collect();
        let dirty = core::mem::take(&mut self.pending_bat);
        meta.extend(self.bat_page_writes(&dirty));
        self.commit(meta)
    }

    /// Writes the payload of one request and stages the metadata it changes.
    fn place_writes(
        &mut self,
        offset: u64,
        data: &[u8],
        dirty: &mut BTreeSet<usize>,
        sb_pages: &mut BTreeMap<u64, Vec<u8>>,
    ) -> Result<(), DiskError> {
        let g = self.geo;
        let bs = u64::from(g.block_size);
        let mut pos = 0usize;
        for (block, within, n) in g.split(offset, data.len() as u64) {
            let src = &data[pos..pos + n as usize];
            pos += n as usize;
            let idx = g.payload_index(block);
            let plan = g.plan_write(
                block,
                within,
                n,
                self.bat_entry(idx),
                self.bat_entry(g.bitmap_index(block / g.chunk_ratio)),
                self.reusable.contains(idx),
            );
            let mark = match plan {
                WritePlan::InPlace { file_offset, mark } => {
                    self.io.write_at(file_offset, src)?;
                    mark
                }
                WritePlan::Place {
                    reuse,
                    offset_in_block,
                    new_state,
                    mark,
                } => {
                    let off = match reuse {
                        Some(off) => {
                            self.reusable.remove(idx);
                            // The rest of the block must read as zeros.
                            self.write_zeros(off, offset_in_block)?;
                            let tail = offset_in_block + n;
                            self.write_zeros(off + tail, bs - tail)?;
                            off
                        }
                        None => self.allocate(bs)?,
                    };
                    self.io.write_at(off + offset_in_block, src)?;
                    self.set_bat_entry(idx, BatEntry::new(new_state, off), dirty);
                    mark
                }
            };
            if let Some(m) = mark {
                let sb_off = match m.bitmap_file_offset {
                    Some(o) => o,
                    None => {
                        let o = self.allocate(MIB)?;
                        self.set_bat_entry(m.bitmap_index, BatEntry::new(SB_PRESENT, o), dirty);
                        o
                    }
                };
                self.set_bits(sb_off, m.first_bit, m.sectors, sb_pages)?;
            }
        }
        Ok(())
    }

    /// Marks the file cleanly closed: flushes and clears LogGuid so other
    /// implementations need no replay. Idempotent; the disk stays usable (a
    /// later write starts a new log). Also closes the parent.
    pub fn close(&mut self) -> Result<(), DiskError> {
        if self.crashed {
            return Ok(());
        }
        if let Some(p) = self.parent.as_deref_mut() {
            p.close()?;
        }
        if self.writable && self.poisoned.is_none() {
            self.commit_pending()?;
        }
        if self.writable && self.poisoned.is_none() && !self.header.log_guid.is_zero() {
            self.io.flush()?;
            self.update_header(|h, _| h.log_guid = Guid::ZERO)?;
            self.session_log = false;
        }
        Ok(())
    }

    /// Rewrites the parent locator's `relative_path` and
    /// `absolute_win32_path` (MS-VHDX 2.6.2.6.3: stale paths are updated once
    /// a chain opens). The new item goes after the last metadata item and the
    /// table entry is repointed, both through the log. Other keys are kept.
    pub fn update_parent_paths(
        &mut self,
        relative: Option<String>,
        absolute: Option<String>,
    ) -> Result<(), DiskError> {
        let Some(old) = self.params.parent_locator.clone() else {
            return Err(DiskError::Request("not a differencing disk".into()));
        };
        let mut pl = old.clone();
        pl.entries
            .retain(|(k, _)| k != "relative_path" && k != "absolute_win32_path");
        if let Some(r) = relative {
            pl.entries.push(("relative_path".into(), r));
        }
        if let Some(a) = absolute {
            pl.entries.push(("absolute_win32_path".into(), a));
        }
        if pl == old {
            return Ok(());
        }
        pl.check_limits().map_err(DiskError::Request)?;
        let item = pl.to_bytes();
        let region_len = u64::from(self.regions.metadata.length);
        let used_end = self
            .meta_entries
            .iter()
            .map(|e| u64::from(e.offset) + u64::from(e.length))
            .max()
            .unwrap_or(0)
            .max(METADATA_TABLE_SIZE as u64);
        let at = used_end.div_ceil(8) * 8;
        if at + item.len() as u64 > region_len || item.len() as u64 > MIB {
            return Err(DiskError::Request(
                "no room in the metadata region for the new parent locator".into(),
            ));
        }
        let Some(pos) = self
            .meta_entries
            .iter()
            .position(|e| e.item_id == PARENT_LOCATOR && !e.is_user)
        else {
            return Err(corrupt("parent locator entry vanished"));
        };
        self.begin_modification(false)?;
        let mut entries = self.meta_entries.clone();
        if let Some(e) = entries.get_mut(pos) {
            e.offset = at as u32;
            e.length = item.len() as u32;
        }
        // Stage the touched 4 KiB pages of the metadata region.
        let base = self.regions.metadata.file_offset;
        let page = LOG_SECTOR as u64;
        let mut pages: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut stage = |this: &Self, off_in_region: u64, bytes: &[u8]| -> Result<(), DiskError> {
            let mut done = 0u64;
            while done < bytes.len() as u64 {
                let cur = off_in_region + done;
                let p = cur - cur % page;
                let b = match pages.entry(p) {
                    alloc::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    alloc::collections::btree_map::Entry::Vacant(v) => {
                        let mut b = vec![0u8; LOG_SECTOR];
                        this.read_file(base + p, &mut b)?;
                        v.insert(b)
                    }
                };
                let n = (page - (cur - p)).min(bytes.len() as u64 - done);
                let s = (cur - p) as usize;
                b[s..s + n as usize].copy_from_slice(&bytes[done as usize..(done + n) as usize]);
                done += n;
            }
            Ok(())
        };
        stage(self, at, &item)?;
        // The table itself: only its used part changes.
        let table = build_metadata_table(&entries);
        let table_used = 32 + 32 * entries.len();
        stage(self, 0, &table[..table_used])?;
        let writes = pages
            .into_iter()
            .map(|(p, data)| LogWrite::Data {
                file_offset: base + p,
                data,
            })
            .collect();
        self.commit(writes)?;
        self.meta_entries = entries;
        self.params.parent_locator = Some(pl);
        Ok(())
    }

    /// Deeper consistency checks than open does (for `vhdx check`): both
    /// region table copies valid and identical, every sector bitmap of a
    /// partially present block readable, then the parent chain.
    pub fn verify(&mut self) -> Result<(), DiskError> {
        let mut tables = Vec::new();
        for (i, off) in [REGION1_OFFSET, REGION2_OFFSET].into_iter().enumerate() {
            let mut b = vec![0u8; REGION_TABLE_SIZE];
            self.read_file(off, &mut b)?;
            match parse_region_table(&b) {
                Ok(r) => tables.push(r),
                Err(RegionError::Corrupt(m) | RegionError::Unsupported(m)) => {
                    return Err(corrupt(format!("region table {}: {m}", i + 1)))
                }
            }
        }
        if tables.first() != tables.get(1) {
            return Err(corrupt("region table 2 differs from region table 1"));
        }
        let g = self.geo;
        for block in 0..g.payload_blocks {
            let e = self.bat_entry(g.payload_index(block));
            if e.payload_state() == PayloadState::PartiallyPresent {
                let sb = self.bat_entry(g.bitmap_index(block / g.chunk_ratio));
                self.get_bits(
                    sb.file_offset(),
                    g.bitmap_bit(block, 0),
                    g.sectors_per_block(),
                )?;
            }
        }
        if let Some(p) = self.parent.as_deref_mut() {
            p.verify()?;
        }
        Ok(())
    }

    /// Ranges of the virtual disk that may hold data in this file or, for a
    /// differencing disk, its parent chain. Merged and sorted.
    pub fn data_ranges(&mut self) -> Result<Vec<(u64, u64)>, DiskError> {
        let g = self.geo;
        let bs = u64::from(g.block_size);
        let mut v: Vec<(u64, u64)> = Vec::new();
        for block in 0..g.payload_blocks {
            let e = self.bat_entry(g.payload_index(block));
            if matches!(
                e.payload_state(),
                PayloadState::FullyPresent | PayloadState::PartiallyPresent
            ) {
                let start = block * bs;
                v.push((start, bs.min(g.virtual_size - start)));
            }
        }
        if let Some(p) = self.parent.as_deref_mut() {
            let limit = g.virtual_size;
            for (o, l) in p.data_ranges()? {
                if o < limit {
                    v.push((o, l.min(limit - o)));
                }
            }
        }
        v.sort();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (o, l) in v {
            if let Some(last) = out.last_mut() {
                if o <= last.0 + last.1 {
                    let end = (o + l).max(last.0 + last.1);
                    last.1 = end - last.0;
                    continue;
                }
            }
            out.push((o, l));
        }
        Ok(out)
    }

    /// Folds this differencing disk into its attached parent: every sector
    /// present in the child is written to the parent, then the parent is
    /// flushed. The parent must have been opened writable. The child is left
    /// unchanged (its parent linkage no longer matches afterwards).
    pub fn merge_into_parent(&mut self) -> Result<(), DiskError> {
        self.check_usable()?;
        let g = self.geo;
        let bs = u64::from(g.block_size);
        let ss = u64::from(g.sector_size);
        let Some(mut parent) = self.parent.take() else {
            return Err(open_err("merge needs the parent attached"));
        };
        let r = (|| -> Result<(), DiskError> {
            let psize = parent.virtual_size();
            let mut buf = vec![0u8; COPY_CHUNK];
            for block in 0..g.payload_blocks {
                let e = self.bat_entry(g.payload_index(block));
                let start = block * bs;
                let len = bs
                    .min(g.virtual_size - start)
                    .min(psize.saturating_sub(start));
                if len == 0 {
                    continue;
                }
                // Runs (offset in block, length, from child file?) to copy.
                let mut runs: Vec<(u64, u64, bool)> = Vec::new();
                match e.payload_state() {
                    PayloadState::FullyPresent => runs.push((0, len, true)),
                    PayloadState::PartiallyPresent => {
                        let sb = self.bat_entry(g.bitmap_index(block / g.chunk_ratio));
                        let bits =
                            self.get_bits(sb.file_offset(), g.bitmap_bit(block, 0), len / ss)?;
                        let mut i = 0usize;
                        while i < bits.len() {
                            let mut j = i;
                            while j < bits.len() && bits[j] == bits[i] {
                                j += 1;
                            }
                            if bits[i] {
                                runs.push((i as u64 * ss, (j - i) as u64 * ss, true));
                            }
                            i = j;
                        }
                    }
                    PayloadState::NotPresent => {}
                    _ => runs.push((0, len, false)),
                }
                for (o, l, from_file) in runs {
                    let mut done = 0u64;
                    while done < l {
                        let n = (l - done).min(COPY_CHUNK as u64) as usize;
                        let chunk = &mut buf[..n];
                        if from_file {
                            self.read_file(e.file_offset() + o + done, chunk)?;
                        } else {
                            chunk.fill(0);
                        }
                        parent.write(start + o + done, chunk)?;
                        done += n as u64;
                    }
                }
            }
            parent.flush()
        })();
        self.parent = Some(parent);
        r
    }
}

impl<B: BlockIo> VirtualDisk for Vhdx<B> {
    fn virtual_size(&self) -> u64 {
        self.geo.virtual_size
    }
    fn logical_sector_size(&self) -> u32 {
        self.geo.sector_size
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check_usable()?;
        check_request(
            offset,
            buf.len(),
            self.geo.sector_size,
            self.geo.virtual_size,
        )?;
        self.read_inner(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        check_request(
            offset,
            data.len(),
            self.geo.sector_size,
            self.geo.virtual_size,
        )?;
        let r = self.write_inner(offset, data);
        if let Err(e) = &r {
            if self.poisoned.is_none() && !matches!(e, DiskError::Request(_)) {
                self.poisoned = Some(e.to_string());
            }
        }
        r
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        self.check_usable()?;
        if self.writable {
            let r = self.commit_pending().and_then(|()| Ok(self.io.flush()?));
            if let Err(e) = &r {
                self.poisoned.get_or_insert_with(|| e.to_string());
            }
            r?;
        }
        Ok(())
    }
    fn allocated_ranges(&mut self) -> Result<Vec<(u64, u64)>, DiskError> {
        self.data_ranges()
    }
}

impl<B: BlockIo> Drop for Vhdx<B> {
    /// Best-effort clean close; call [`Vhdx::close`] to see errors.
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// Writes a new, empty VHDX into `io` (truncating it) and opens it read-write.
pub fn create<B: BlockIo>(mut io: B, p: &CreateParams) -> Result<Vhdx<B>, DiskError> {
    let mut guids = GuidGen::new(p.guid_seed);
    let geo = p.validate()?;
    let (virtual_size, ls, ps, has_parent) = (
        geo.virtual_size,
        geo.sector_size,
        p.parent
            .as_ref()
            .map_or(p.physical_sector_size, |x| x.physical_sector_size),
        geo.has_parent,
    );
    let fixed = p.fixed && !has_parent;
    let log_off = MIB;
    let log_len = MIB;
    let meta_off = 2 * MIB;
    let meta_len = MIB;
    let bat_off = 3 * MIB;
    let bat_bytes = geo.bat_entries() * 8;
    if bat_bytes > MAX_BAT_BYTES {
        return Err(open_err(
            "disk too large for its block size (BAT over 1 GiB)",
        ));
    }
    let bat_len = round_up_mib(bat_bytes).ok_or_else(|| open_err("too large"))?;
    let payload_start = bat_off + bat_len;
    let mut parent_locator = None;
    let mut disk_id = guids.next_guid();
    if let Some(ps) = &p.parent {
        let mut entries = vec![(
            String::from("parent_linkage"),
            ps.data_write_guid.to_string(),
        )];
        if let Some(r) = &ps.relative_path {
            entries.push(("relative_path".into(), r.clone()));
        }
        if let Some(a) = &ps.absolute_path {
            entries.push(("absolute_win32_path".into(), a.clone()));
        }
        let pl = ParentLocator {
            locator_type: VHDX_PARENT_LOCATOR_TYPE,
            entries,
        };
        pl.check_limits().map_err(open_err)?;
        parent_locator = Some(pl);
        disk_id = ps.disk_id;
    }
    let params = DiskParams {
        file: FileParameters {
            block_size: p.block_size,
            leave_blocks_allocated: fixed,
            has_parent,
        },
        virtual_size,
        disk_id,
        logical_sector_size: ls,
        physical_sector_size: ps,
        parent_locator,
    };
    let meta = build_metadata_region(&params, meta_len as usize);
    let mut bat = vec![0u8; bat_len as usize];
    let mut end = payload_start;
    if fixed {
        for b in 0..geo.payload_blocks {
            let off = payload_start + b * u64::from(p.block_size);
            wr64(
                &mut bat,
                (geo.payload_index(b) * 8) as usize,
                BatEntry::new(PAYLOAD_FULLY_PRESENT, off).0,
            );
            end = off + u64::from(p.block_size);
        }
    }
    let regions = Regions {
        bat: RegionEntry {
            guid: BAT_REGION,
            file_offset: bat_off,
            length: bat_len as u32,
            required: true,
        },
        metadata: RegionEntry {
            guid: METADATA_REGION,
            file_offset: meta_off,
            length: meta_len as u32,
            required: true,
        },
    };
    io.set_len(0)?;
    io.set_len(end)?;
    io.write_at(FILE_ID_OFFSET, &file_identifier("hvmigrate vstorage"))?;
    let rt = build_region_table(&regions);
    io.write_at(REGION1_OFFSET, &rt)?;
    io.write_at(REGION2_OFFSET, &rt)?;
    io.write_at(meta_off, &meta)?;
    io.write_at(bat_off, &bat)?;
    io.flush()?;
    let fw = guids.next_guid();
    let dw = guids.next_guid();
    for (i, off) in [HEADER1_OFFSET, HEADER2_OFFSET].into_iter().enumerate() {
        let h = Header {
            sequence_number: i as u64,
            file_write_guid: fw,
            data_write_guid: dw,
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: log_len as u32,
            log_offset: log_off,
        };
        io.write_at(off, &h.to_bytes())?;
    }
    io.flush()?;
    Vhdx::open(
        io,
        OpenOptions::read_write(guids.next_guid().0[0] as u64 ^ p.guid_seed.rotate_left(17)),
    )
}
