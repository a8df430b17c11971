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
//! - A full store (`IoError::NoSpace`) while a write places its payload, or
//!   while a log entry is written (before it is durable), leaves the disk
//!   usable and unchanged as far as any reader can tell: space allocated for
//!   the failed write is given back and staged metadata stays staged, so the
//!   same write (or flush) can be retried once space is freed (a VM whose
//!   disk filled its store is paused and retries). Any other failure, and a
//!   failed fsync, poisons the disk: every later call fails.
//! - A file with a pending log opened read-only is replayed into an in-memory
//!   overlay (MS-VHDX 2.3.3, note 5); the file itself is not touched.
//!
//! One concern per submodule: `open` (reading and validating a file),
//! `commit` (the log: replay, header updates, commits), `allocation` (placing
//! writes and staging metadata), `diff` (parents, merge, locator updates)
//! and `create` (new files). This file holds the [`Vhdx`] state, reads and
//! the [`VirtualDisk`] implementation.

mod allocation;
mod commit;
mod create;
mod diff;
mod open;

pub use create::{create, CreateParams, ParentSpec};
pub use open::log_replay_needed;

use allocation::IndexSet;

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

impl<B: BlockIo> Vhdx<B> {
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

    fn bat_entry(&self, i: u64) -> BatEntry {
        bat_at(&self.bat, i)
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

    fn check_usable(&self) -> Result<(), DiskError> {
        if let Some(p) = &self.poisoned {
            return Err(DiskError::Request(format!(
                "disk unusable after an earlier failure: {p}"
            )));
        }
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
            if self.poisoned.is_none() && !matches!(e, DiskError::Request(_)) && !e.is_no_space() {
                self.poisoned = Some(e.to_string());
            }
        }
        r
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        self.check_usable()?;
        if self.writable {
            // commit_pending poisons what cannot be retried itself.
            self.commit_pending()?;
            if let Err(e) = self.io.flush() {
                self.poisoned.get_or_insert_with(|| e.to_string());
                return Err(e.into());
            }
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
