//! The one-pass copy engine: copies a virtual disk's allocated ranges, in
//! ascending virtual-offset order, into a destination disk created with the
//! same geometry.
//!
//! The engine works on *virtual* byte offsets, never on file bytes, so a
//! dynamic VHDX copies only what the guest can see, and a raw image copies
//! only what its source reports as allocated: unallocated ranges are skipped
//! and stay unallocated (zero) on the destination.
//!
//! [`CopyJob`] is the plan and the cursor, with no I/O of its own: a caller
//! asks for the next chunk ([`CopyJob::next_chunk`]), moves its bytes, and
//! reports it done ([`CopyJob::complete`]). That keeps the engine usable from
//! the hypervisor (no_std, one chunk per worker slice) and lets the write
//! mirror ([`crate::mirror`]) interleave guest writes between chunks.
//! [`copy_disk`] drives a job to the end for a plain offline copy.
//!
//! Invariants:
//! - the plan's ranges are sorted, disjoint, non-adjacent, sector-aligned and
//!   inside the disk; chunks never cross a range;
//! - everything in the plan below the cursor has been written to the
//!   destination (durable only after the final flush);
//! - memory is bounded by one chunk buffer, whatever the disk size.

#[cfg(feature = "std")]
mod host;
#[cfg(feature = "cli")]
pub use host::{cli_copy, cli_copy_with, copy_progress_bar};
#[cfg(feature = "std")]
pub use host::{
    copy_differencing, copy_disk_pipelined, create_child_like, create_child_like_with, create_like,
    create_like_with, open_disk, own_ranges, params_like, HostDisk, READ_AHEAD_CHUNKS,
};

use alloc::vec::Vec;
use core::fmt;

use crate::io::{DiskError, VirtualDisk};

/// Default chunk size: large enough for sequential throughput on an
/// unbuffered file, small enough to keep a mirrored guest write's wait short.
pub const DEFAULT_CHUNK_BYTES: u32 = 1 << 20;
/// Smallest chunk accepted (one 4 KiB sector).
pub const MIN_CHUNK_BYTES: u32 = 4096;
/// Largest chunk accepted: caps the buffer an option can make us allocate.
pub const MAX_CHUNK_BYTES: u32 = 64 << 20;

/// How a copy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOptions {
    /// Bytes moved per step (rounded down to the disk's sector size,
    /// clamped to [`MIN_CHUNK_BYTES`]..=[`MAX_CHUNK_BYTES`]).
    pub chunk_bytes: u32,
    /// Do not write chunks that read as all zeros, so a fully allocated
    /// source (a raw image) or a block the guest wrote only in part yields
    /// a sparse destination. Valid only when the destination is freshly
    /// created and reads as zeros where nothing was written: a raw file, a
    /// dynamic or a fixed VHDX, never a differencing one (an unwritten
    /// range reads its parent). The mirror skips a zero chunk only where no
    /// mirrored guest write reached the destination ahead of the cursor
    /// ([`crate::mirror::MirrorCore::may_skip_zeros`]).
    pub skip_zero_chunks: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            skip_zero_chunks: false,
        }
    }
}

/// Why a copy failed. Every variant leaves the source untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyError {
    /// Source and destination differ in virtual size or sector size.
    GeometryMismatch {
        /// Source `(virtual size, logical sector size)`.
        source: (u64, u32),
        /// Destination `(virtual size, logical sector size)`.
        dest: (u64, u32),
    },
    /// The source's allocation map could not be read.
    SourceMap(DiskError),
    /// Reading the source failed at this virtual offset.
    SourceRead {
        /// Virtual offset of the chunk.
        offset: u64,
        /// The disk's error.
        error: DiskError,
    },
    /// Writing the destination failed at this virtual offset.
    DestWrite {
        /// Virtual offset of the chunk.
        offset: u64,
        /// The disk's error.
        error: DiskError,
    },
    /// Making the destination durable failed.
    DestFlush(DiskError),
    /// The chunk handed to [`CopyJob::complete`] is not the next one.
    OutOfOrder {
        /// Offset of the chunk the job expected.
        expected: u64,
        /// Offset of the chunk it got.
        got: u64,
    },
    /// The copy was cancelled.
    Cancelled,
    /// Opening the source or creating the destination failed (host copies).
    Open(DiskError),
}

impl fmt::Display for CopyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CopyError::GeometryMismatch { source, dest } => write!(
                f,
                "destination geometry ({} bytes, {}-byte sectors) differs from the source ({} bytes, {}-byte sectors)",
                dest.0, dest.1, source.0, source.1
            ),
            CopyError::SourceMap(e) => write!(f, "cannot read the source's allocation map: {e}"),
            CopyError::SourceRead { offset, error } => {
                write!(f, "reading the source at virtual offset {offset} failed: {error}")
            }
            CopyError::DestWrite { offset, error } => write!(
                f,
                "writing the destination at virtual offset {offset} failed: {error}"
            ),
            CopyError::DestFlush(e) => write!(f, "flushing the destination failed: {e}"),
            CopyError::OutOfOrder { expected, got } => write!(
                f,
                "copy chunk at {got} completed out of order (expected {expected})"
            ),
            CopyError::Cancelled => f.write_str("the copy was cancelled"),
            CopyError::Open(e) => write!(f, "{e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for CopyError {}

impl CopyError {
    /// Whether a store filled up ([`crate::io::IoError::NoSpace`] on
    /// either side): the copy can be retried once space is freed.
    pub fn is_no_space(&self) -> bool {
        match self {
            CopyError::SourceMap(e) | CopyError::DestFlush(e) | CopyError::Open(e) => {
                e.is_no_space()
            }
            CopyError::SourceRead { error, .. } | CopyError::DestWrite { error, .. } => {
                error.is_no_space()
            }
            _ => false,
        }
    }
}

/// One unit of copying: `[offset, offset + len_bytes)` in virtual bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// First virtual byte.
    pub offset: u64,
    /// Length in bytes (a sector multiple, at most the job's chunk size).
    pub len_bytes: u64,
}

impl Chunk {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len_bytes
    }

    /// True when `[offset, offset + len)` shares a byte with the chunk.
    pub fn overlaps(&self, offset: u64, len_bytes: u64) -> bool {
        ranges_overlap(self.offset, self.len_bytes, offset, len_bytes)
    }
}

/// True when the half-open ranges share at least one byte.
pub(crate) fn ranges_overlap(a_off: u64, a_len: u64, b_off: u64, b_len: u64) -> bool {
    a_len != 0
        && b_len != 0
        && a_off < b_off.saturating_add(b_len)
        && b_off < a_off.saturating_add(a_len)
}

/// The copy plan and its cursor.
#[derive(Debug, Clone)]
pub struct CopyJob {
    /// `(offset, len_bytes)` ranges still to copy, sorted and merged.
    ranges: Vec<(u64, u64)>,
    /// Index of the range the cursor is in.
    range_idx: usize,
    /// Virtual offset up to which the plan has been copied.
    cursor: u64,
    chunk_bytes: u64,
    bytes_total: u64,
    bytes_copied: u64,
    /// [`CopyOptions::skip_zero_chunks`] of the options the plan was made with.
    skip_zeros: bool,
}

impl CopyJob {
    /// Builds a plan from `allocated` ranges (as reported by
    /// [`VirtualDisk::allocated_ranges`]) for a disk of `virtual_size` bytes
    /// with `sector_bytes` sectors. The ranges are allegations from a file:
    /// they are sorted, merged, widened to sector boundaries and clipped to
    /// the disk, so a bad map can cost extra copying but never a panic or an
    /// out-of-range request.
    pub fn new(
        allocated: &[(u64, u64)],
        virtual_size: u64,
        sector_bytes: u32,
        opts: CopyOptions,
    ) -> Self {
        let sector = u64::from(sector_bytes.max(1));
        let disk_end = virtual_size - virtual_size % sector;
        let mut ranges: Vec<(u64, u64)> = allocated
            .iter()
            .filter_map(|&(off, len)| {
                let start = off - off % sector;
                let end = off.saturating_add(len).min(disk_end);
                let end = end.checked_next_multiple_of(sector)?.min(disk_end);
                (start < end).then_some((start, end))
            })
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        let ranges: Vec<(u64, u64)> = merged.into_iter().map(|(s, e)| (s, e - s)).collect();
        let bytes_total = ranges.iter().map(|r| r.1).sum();
        let chunk = opts.chunk_bytes.clamp(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES);
        let chunk_bytes = u64::from(chunk - chunk % sector_bytes.clamp(1, MIN_CHUNK_BYTES));
        let cursor = ranges.first().map_or(disk_end, |r| r.0);
        CopyJob {
            ranges,
            range_idx: 0,
            cursor,
            chunk_bytes,
            bytes_total,
            bytes_copied: 0,
            skip_zeros: opts.skip_zero_chunks,
        }
    }

    /// Plans the copy of `src`: its allocation map and geometry.
    pub fn for_disk<S: VirtualDisk + ?Sized>(
        src: &mut S,
        opts: CopyOptions,
    ) -> Result<Self, CopyError> {
        let map = src.allocated_ranges().map_err(CopyError::SourceMap)?;
        Ok(Self::new(
            &map,
            src.virtual_size(),
            src.logical_sector_size(),
            opts,
        ))
    }

    /// The next chunk to copy, or `None` when the plan is done. Does not
    /// move the cursor: call [`CopyJob::complete`] once its bytes are written.
    pub fn next_chunk(&self) -> Option<Chunk> {
        let &(start, len) = self.ranges.get(self.range_idx)?;
        let end = start + len;
        let offset = self.cursor.max(start);
        Some(Chunk {
            offset,
            len_bytes: (end - offset).min(self.chunk_bytes),
        })
    }

    /// The chunk the plan copies right after `chunk` (a chunk of this plan),
    /// or `None` after the last one. Lets a copier read ahead of the cursor.
    pub fn chunk_after(&self, chunk: Chunk) -> Option<Chunk> {
        let idx = self.ranges.partition_point(|r| r.0 <= chunk.offset);
        let &(start, len) = self.ranges.get(idx.checked_sub(1)?)?;
        let at = chunk.end();
        let (start, end) = if at < start + len {
            (at, start + len)
        } else {
            let &(next, next_len) = self.ranges.get(idx)?;
            (next, next + next_len)
        };
        Some(Chunk {
            offset: start,
            len_bytes: (end - start).min(self.chunk_bytes),
        })
    }

    /// Records `chunk` (the one [`CopyJob::next_chunk`] returned) as copied.
    pub fn complete(&mut self, chunk: Chunk) -> Result<(), CopyError> {
        let expected = self.next_chunk();
        if expected != Some(chunk) {
            return Err(CopyError::OutOfOrder {
                expected: expected.map_or(self.cursor, |c| c.offset),
                got: chunk.offset,
            });
        }
        self.cursor = chunk.end();
        self.bytes_copied += chunk.len_bytes;
        if let Some(&(start, len)) = self.ranges.get(self.range_idx) {
            if self.cursor >= start + len {
                self.range_idx += 1;
                if let Some(&(next, _)) = self.ranges.get(self.range_idx) {
                    self.cursor = next;
                }
            }
        }
        Ok(())
    }

    /// True when every planned byte has been copied.
    pub fn is_done(&self) -> bool {
        self.range_idx >= self.ranges.len()
    }

    /// True when all of `[offset, offset + len_bytes)` is still ahead of the
    /// cursor inside the plan, so the copy will carry whatever the source
    /// holds there later. A write there need not be mirrored; a write
    /// anywhere else (already copied, or outside the plan, which the copy
    /// will never visit) must be.
    pub fn is_pending(&self, offset: u64, len_bytes: u64) -> bool {
        let Some(end) = offset.checked_add(len_bytes) else {
            return false;
        };
        if offset < self.cursor {
            return false;
        }
        let rest = self.ranges.get(self.range_idx..).unwrap_or(&[]);
        // The last range starting at or before `offset`.
        let idx = rest.partition_point(|r| r.0 <= offset);
        match idx.checked_sub(1).and_then(|i| rest.get(i)) {
            Some(&(start, len)) => offset >= start && end <= start + len,
            None => false,
        }
    }

    /// Virtual offset the copy has reached.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Bytes copied so far.
    pub fn bytes_copied(&self) -> u64 {
        self.bytes_copied
    }

    /// Bytes the plan copies in all (the allocated part of the source).
    pub fn bytes_total(&self) -> u64 {
        self.bytes_total
    }

    /// Chunk size in bytes (the buffer a driver needs).
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    /// The planned ranges `(offset, len_bytes)`.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// Whether the plan was made to skip all-zero chunks
    /// ([`CopyOptions::skip_zero_chunks`]).
    pub fn skips_zero_chunks(&self) -> bool {
        self.skip_zeros
    }
}

/// Where a copy's time and bytes went, counted by the drivers that are
/// given a clock ([`crate::mirror::MirroredDisk::step_timed`]). Times are
/// in the clock's nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Chunks read from the source.
    pub chunks: u64,
    /// Of those, chunks not written because they read as all zeros.
    pub zero_chunks_skipped: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes written to the destination.
    pub bytes_written: u64,
    /// Time reading the source.
    pub read_ns: u64,
    /// Time looking for zeros.
    pub zero_check_ns: u64,
    /// Time writing the destination.
    pub write_ns: u64,
    /// Destination flushes by the copy (not those of mirrored writes) and
    /// their time.
    pub flushes: u64,
    pub flush_ns: u64,
}

impl CopyStats {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &CopyStats) {
        self.chunks += other.chunks;
        self.zero_chunks_skipped += other.zero_chunks_skipped;
        self.bytes_read += other.bytes_read;
        self.bytes_written += other.bytes_written;
        self.read_ns += other.read_ns;
        self.zero_check_ns += other.zero_check_ns;
        self.write_ns += other.write_ns;
        self.flushes += other.flushes;
        self.flush_ns += other.flush_ns;
    }
}

/// True when every byte of `data` is zero. Looks at 64 bytes at a time
/// (eight words or-ed together, which the compiler vectorizes), stopping at
/// the first block that is not zero.
pub fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    for block in &mut blocks {
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            acc |= u64::from_ne_bytes(b);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Percentage (0..=100) of `done` out of `total`; an empty job is 100%.
pub fn percent(done: u64, total: u64) -> u8 {
    if total == 0 {
        return 100;
    }
    let p = u128::from(done.min(total)) * 100 / u128::from(total);
    u8::try_from(p).unwrap_or(100)
}

/// Checks that `dst` can hold a copy of `src` byte for byte.
pub fn check_geometry<S, D>(src: &S, dst: &D) -> Result<(), CopyError>
where
    S: VirtualDisk + ?Sized,
    D: VirtualDisk + ?Sized,
{
    let s = (src.virtual_size(), src.logical_sector_size());
    let d = (dst.virtual_size(), dst.logical_sector_size());
    if s != d {
        return Err(CopyError::GeometryMismatch { source: s, dest: d });
    }
    Ok(())
}

/// Reads `chunk` from `src` into the start of `buf` (grown to fit).
pub(crate) fn read_chunk<S: VirtualDisk + ?Sized>(
    src: &mut S,
    chunk: Chunk,
    buf: &mut Vec<u8>,
) -> Result<(), CopyError> {
    // A chunk is at most MAX_CHUNK_BYTES, so it fits in usize.
    let len = usize::try_from(chunk.len_bytes).unwrap_or(usize::MAX);
    if buf.len() < len {
        buf.resize(len, 0);
    }
    src.read(chunk.offset, &mut buf[..len])
        .map_err(|error| CopyError::SourceRead {
            offset: chunk.offset,
            error,
        })
}

/// Granule of zero skipping inside a chunk: aligned 64 KiB pieces of a
/// chunk that read as zeros are not written (a chunk whose start or end
/// holds the edge of the guest's data keeps the rest a hole), while a
/// chunk of data stays one write.
pub const ZERO_GRANULE_BYTES: u64 = 64 << 10;

/// Writes `chunk`'s bytes (the start of `buf`) to `dst` and returns the
/// bytes written; with `skip_zeros` (see
/// [`CopyOptions::skip_zero_chunks`]) only its runs of aligned
/// [`ZERO_GRANULE_BYTES`] pieces that are not all zeros, one write a run.
pub(crate) fn write_chunk<D: VirtualDisk + ?Sized>(
    dst: &mut D,
    chunk: Chunk,
    buf: &[u8],
    skip_zeros: bool,
) -> Result<u64, CopyError> {
    let data = buf.get(..chunk.len_bytes as usize).unwrap_or(buf);
    let write = |dst: &mut D, from: usize, to: usize| {
        let at = chunk.offset + from as u64;
        dst.write(at, &data[from..to])
            .map(|()| (to - from) as u64)
            .map_err(|error| CopyError::DestWrite { offset: at, error })
    };
    if !skip_zeros {
        return write(dst, 0, data.len());
    }
    let mut written = 0;
    let mut run: Option<usize> = None;
    let mut pos = 0usize;
    while pos < data.len() {
        let at = chunk.offset + pos as u64;
        let next = (at / ZERO_GRANULE_BYTES + 1) * ZERO_GRANULE_BYTES;
        let end = data.len().min((next - chunk.offset) as usize);
        match (is_zero(&data[pos..end]), run) {
            (true, Some(from)) => {
                written += write(dst, from, pos)?;
                run = None;
            }
            (false, None) => run = Some(pos),
            _ => {}
        }
        pos = end;
    }
    if let Some(from) = run {
        written += write(dst, from, data.len())?;
    }
    Ok(written)
}

/// Moves one chunk from `src` to `dst` through `buf`.
pub(crate) fn copy_chunk<S, D>(
    src: &mut S,
    dst: &mut D,
    chunk: Chunk,
    buf: &mut Vec<u8>,
    skip_zeros: bool,
) -> Result<(), CopyError>
where
    S: VirtualDisk + ?Sized,
    D: VirtualDisk + ?Sized,
{
    read_chunk(src, chunk, buf)?;
    write_chunk(dst, chunk, buf, skip_zeros).map(drop)
}

/// Copies every allocated range of `src` into `dst` in one ascending pass
/// and flushes `dst`. `on_progress(bytes_copied, bytes_total)` runs after
/// every chunk; returning `false` from it cancels the copy
/// ([`CopyError::Cancelled`]). On error the destination holds a partial copy
/// the caller must discard.
pub fn copy_disk<S, D>(
    src: &mut S,
    dst: &mut D,
    opts: CopyOptions,
    on_progress: impl FnMut(u64, u64) -> bool,
) -> Result<u64, CopyError>
where
    S: VirtualDisk + ?Sized,
    D: VirtualDisk + ?Sized,
{
    check_geometry(src, dst)?;
    let job = CopyJob::for_disk(src, opts)?;
    copy_plan(src, dst, job, opts.skip_zero_chunks, on_progress)
}

/// Runs a plan made by the caller (e.g. only the ranges a differencing
/// disk holds itself) from `src` to `dst`, then flushes `dst`. Like
/// [`copy_disk`] otherwise; the caller checked the geometry.
pub fn copy_plan<S, D>(
    src: &mut S,
    dst: &mut D,
    mut job: CopyJob,
    skip_zero_chunks: bool,
    mut on_progress: impl FnMut(u64, u64) -> bool,
) -> Result<u64, CopyError>
where
    S: VirtualDisk + ?Sized,
    D: VirtualDisk + ?Sized,
{
    let mut buf = Vec::new();
    while let Some(chunk) = job.next_chunk() {
        copy_chunk(src, dst, chunk, &mut buf, skip_zero_chunks)?;
        job.complete(chunk)?;
        if !on_progress(job.bytes_copied(), job.bytes_total()) {
            return Err(CopyError::Cancelled);
        }
    }
    dst.flush().map_err(CopyError::DestFlush)?;
    Ok(job.bytes_copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{MemIo, RawDisk};

    fn opts(chunk: u32) -> CopyOptions {
        CopyOptions {
            chunk_bytes: chunk,
            skip_zero_chunks: false,
        }
    }

    #[test]
    fn plan_sorts_merges_aligns_and_clips() {
        let job = CopyJob::new(
            &[
                (10_000, 100),
                (0, 512),
                (512, 512),
                (9000, 2000),
                (1 << 40, 5),
            ],
            16384,
            512,
            opts(4096),
        );
        assert_eq!(job.ranges(), &[(0, 1024), (8704, 2560)]);
        assert_eq!(job.bytes_total(), 1024 + 2560);
        // Overflowing and out-of-disk ranges never panic.
        let job = CopyJob::new(
            &[(u64::MAX - 3, 100), (16000, u64::MAX)],
            16384,
            512,
            opts(0),
        );
        assert_eq!(job.ranges(), &[(15872, 512)]);
        assert_eq!(job.chunk_bytes(), 4096);
    }

    #[test]
    fn chunks_walk_ranges_in_order() {
        let mut job = CopyJob::new(&[(0, 10240), (65536, 4096)], 1 << 20, 512, opts(4096));
        let mut seen = Vec::new();
        while let Some(c) = job.next_chunk() {
            seen.push((c.offset, c.len_bytes));
            job.complete(c).unwrap();
        }
        assert_eq!(seen, [(0, 4096), (4096, 4096), (8192, 2048), (65536, 4096)]);
        assert!(job.is_done());
        assert_eq!(job.bytes_copied(), job.bytes_total());
        assert!(job
            .complete(Chunk {
                offset: 0,
                len_bytes: 512
            })
            .is_err());
        // Reading ahead walks the same chunks without moving the cursor.
        let job = CopyJob::new(&[(0, 10240), (65536, 4096)], 1 << 20, 512, opts(4096));
        let mut ahead = Vec::new();
        let mut c = job.next_chunk();
        while let Some(chunk) = c {
            ahead.push((chunk.offset, chunk.len_bytes));
            c = job.chunk_after(chunk);
        }
        assert_eq!(ahead, seen);
    }

    #[test]
    fn pending_means_ahead_of_cursor_inside_plan() {
        let mut job = CopyJob::new(&[(0, 8192), (65536, 8192)], 1 << 20, 512, opts(4096));
        assert!(job.is_pending(0, 8192));
        assert!(!job.is_pending(4096, 8192), "spans a hole");
        assert!(!job.is_pending(16384, 512), "outside the plan");
        let c = job.next_chunk().unwrap();
        job.complete(c).unwrap();
        assert!(!job.is_pending(0, 512), "already copied");
        assert!(job.is_pending(4096, 512));
        assert!(job.is_pending(65536 + 512, 512));
        assert!(!job.is_pending(u64::MAX - 1, 2));
    }

    #[test]
    fn copy_disk_copies_allocated_bytes() {
        let mut src = RawDisk::create(MemIo::new(), 1 << 20).unwrap();
        for i in 0..256u64 {
            let b = [(i % 251) as u8; 4096];
            src.write(i * 4096, &b).unwrap();
        }
        let mut dst = RawDisk::create(MemIo::new(), 1 << 20).unwrap();
        let mut calls = 0;
        let n = copy_disk(&mut src, &mut dst, opts(65536), |_, _| {
            calls += 1;
            true
        })
        .unwrap();
        assert_eq!(n, 1 << 20);
        assert_eq!(calls, 16);
        assert_eq!(src.into_inner(), dst.into_inner());
    }

    #[test]
    fn copy_disk_rejects_other_geometry_and_honours_cancel() {
        let mut src = RawDisk::create(MemIo::new(), 1 << 20).unwrap();
        let mut small = RawDisk::create(MemIo::new(), 1 << 19).unwrap();
        assert!(matches!(
            copy_disk(&mut src, &mut small, opts(4096), |_, _| true),
            Err(CopyError::GeometryMismatch { .. })
        ));
        let mut dst = RawDisk::create(MemIo::new(), 1 << 20).unwrap();
        assert_eq!(
            copy_disk(&mut src, &mut dst, opts(4096), |done, _| done < 8192),
            Err(CopyError::Cancelled)
        );
    }

    /// A disk that records the writes it gets.
    struct Recorder(Vec<(u64, usize)>);

    impl VirtualDisk for Recorder {
        fn virtual_size(&self) -> u64 {
            1 << 20
        }
        fn logical_sector_size(&self) -> u32 {
            512
        }
        fn read(&mut self, _: u64, buf: &mut [u8]) -> Result<(), DiskError> {
            buf.fill(0);
            Ok(())
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
            self.0.push((offset, data.len()));
            Ok(())
        }
        fn flush(&mut self) -> Result<(), DiskError> {
            Ok(())
        }
    }

    #[test]
    fn zero_granules_of_a_chunk_are_not_written() {
        const K: usize = 1024;
        let chunk = Chunk {
            offset: 60 * K as u64,
            len_bytes: 200 * K as u64,
        };
        let mut buf = vec![0u8; 200 * K];
        buf[..4 * K].fill(1); // [60K, 64K)
        buf[70 * K] = 1; // 130K: granule [128K, 192K)
        let mut d = Recorder(Vec::new());
        assert_eq!(write_chunk(&mut d, chunk, &buf, true), Ok(68 * K as u64));
        assert_eq!(d.0, [(60 * K as u64, 4 * K), (128 * K as u64, 64 * K)]);
        let mut d = Recorder(Vec::new());
        assert_eq!(write_chunk(&mut d, chunk, &buf, false), Ok(200 * K as u64));
        assert_eq!(d.0, [(60 * K as u64, 200 * K)]);
        // A chunk of data is one write; one of zeros none.
        let mut d = Recorder(Vec::new());
        buf.fill(3);
        assert_eq!(write_chunk(&mut d, chunk, &buf, true), Ok(200 * K as u64));
        buf.fill(0);
        assert_eq!(write_chunk(&mut d, chunk, &buf, true), Ok(0));
        assert_eq!(d.0, [(60 * K as u64, 200 * K)]);
    }

    #[test]
    fn is_zero_finds_any_set_byte() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 200]));
        for len in [1usize, 63, 64, 65, 200, 4096] {
            for at in [0, len / 2, len - 1] {
                let mut b = vec![0u8; len];
                b[at] = 0x80;
                assert!(!is_zero(&b), "len {len} at {at}");
            }
        }
    }

    #[test]
    fn percent_is_bounded() {
        assert_eq!(percent(0, 0), 100);
        assert_eq!(percent(1, 3), 33);
        assert_eq!(percent(u64::MAX, u64::MAX), 100);
        assert_eq!(percent(5, 1), 100);
    }
}
