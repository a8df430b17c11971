//! Block I/O: the byte-addressed backing store ([`BlockIo`]) and the
//! guest-visible disk ([`VirtualDisk`]).
//!
//! Format code (VHDX) never touches a file directly: it resolves guest
//! requests into file ranges and moves bytes through a [`BlockIo`], so the
//! same engine runs over a host file ([`FileIo`], `std` only), a memory
//! buffer ([`MemIo`]) or a test double that simulates crashes.
//!
//! Invariants:
//! - `read_at` never returns a partially filled buffer: a read that runs past
//!   the end of the store is an error ([`IoError::OutOfRange`]).
//! - `flush` returning `Ok` means every earlier `write_at`/`set_len` is durable.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// An error from a backing store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoError {
    /// A read touched bytes past the end of the store.
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        len_bytes: u64,
        /// Length of the store when the request was made.
        store_len: u64,
    },
    /// The host refused an operation (`op` names it, `detail` is the host's message).
    Host {
        /// The operation that failed ("read", "write", "flush", ...).
        op: &'static str,
        /// The host's explanation.
        detail: String,
    },
    /// The store is full (ENOSPC or EDQUOT, from the host file system or a
    /// node store's 9P server): the failed write or allocation may have
    /// happened in part, nothing written before it is lost, and it can be
    /// retried once space is freed. Kept apart from [`IoError::Host`] so a
    /// caller acts on it without reading messages (pause the VM whose disk
    /// grew, fail a copy to a store that filled).
    NoSpace {
        /// The operation that failed ("write", "allocate", "flush", ...).
        op: &'static str,
        /// The host's explanation (which file, which store). A `Box<str>`
        /// keeps `IoError` (and every error holding one) as small as before.
        detail: alloc::boxed::Box<str>,
    },
    /// The store is read-only.
    ReadOnly,
}

impl IoError {
    /// Whether the store is full ([`IoError::NoSpace`]).
    pub fn is_no_space(&self) -> bool {
        matches!(self, IoError::NoSpace { .. })
    }
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoError::OutOfRange {
                offset,
                len_bytes,
                store_len,
            } => write!(
                f,
                "read of {len_bytes} bytes at offset {offset} runs past the end of the file ({store_len} bytes)"
            ),
            IoError::Host { op, detail } => write!(f, "{op} failed: {detail}"),
            IoError::NoSpace { op, detail } => write!(f, "{op} failed: store full: {detail}"),
            IoError::ReadOnly => f.write_str("file is opened read-only"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for IoError {}

/// Byte-addressed backing store (a file, a memory buffer, a test double).
// `len` is the store's size, never empty-or-not: no `is_empty` counterpart.
#[allow(clippy::len_without_is_empty)]
pub trait BlockIo {
    /// Fills `buf` from `offset`. A store shorter than `offset + buf.len()` is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError>;
    /// Writes `data` at `offset`, growing the store if needed.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError>;
    /// Makes every earlier write durable when it returns `Ok`.
    fn flush(&mut self) -> Result<(), IoError>;
    /// Current length of the store in bytes.
    fn len(&self) -> Result<u64, IoError>;
    /// Truncates or extends (with zeros) the store.
    fn set_len(&mut self, len: u64) -> Result<(), IoError>;
    /// Backs `[offset, offset + len_bytes)` with real storage, extending the
    /// store (with zeros) if it is shorter, so later writes there cannot
    /// fail for lack of space. Bytes already in the store are kept.
    ///
    /// The default writes zeros from the store's end to `offset +
    /// len_bytes` ([`allocate_by_writing_zeros`]); a host file uses the
    /// file system's preallocation instead.
    fn allocate(&mut self, offset: u64, len_bytes: u64) -> Result<(), IoError> {
        allocate_by_writing_zeros(self, offset, len_bytes)
    }
}

/// Extends `io` to `offset + len_bytes` by writing zeros past its current
/// end, 1 MiB at a time: the portable way to make storage really allocated.
/// Ranges inside the store are taken as allocated already.
pub fn allocate_by_writing_zeros<B: BlockIo + ?Sized>(
    io: &mut B,
    offset: u64,
    len_bytes: u64,
) -> Result<(), IoError> {
    const CHUNK: u64 = 1 << 20;
    let end = offset.checked_add(len_bytes).ok_or(IoError::Host {
        op: "allocate",
        detail: String::from("offset overflows"),
    })?;
    let mut cur = io.len()?;
    if cur >= end {
        return Ok(());
    }
    let zeros = vec![0u8; CHUNK.min(end - cur) as usize];
    while cur < end {
        let n = (end - cur).min(CHUNK) as usize;
        io.write_at(cur, &zeros[..n])?;
        cur += n as u64;
    }
    Ok(())
}

impl<B: BlockIo + ?Sized> BlockIo for alloc::boxed::Box<B> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        (**self).write_at(offset, data)
    }
    fn flush(&mut self) -> Result<(), IoError> {
        (**self).flush()
    }
    fn len(&self) -> Result<u64, IoError> {
        (**self).len()
    }
    fn set_len(&mut self, len: u64) -> Result<(), IoError> {
        (**self).set_len(len)
    }
    fn allocate(&mut self, offset: u64, len_bytes: u64) -> Result<(), IoError> {
        (**self).allocate(offset, len_bytes)
    }
}

/// Largest store a [`MemIo`] accepts (guards tests and fuzzing against
/// file-derived offsets that would allocate absurd amounts of memory).
pub const MEM_IO_MAX_LEN: u64 = 1 << 34;

/// A `Vec<u8>`-backed store for tests and fuzzing. Flush is a no-op.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemIo {
    data: Vec<u8>,
    limit: u64,
}

impl MemIo {
    /// An empty store.
    pub fn new() -> Self {
        Self::from_vec(Vec::new())
    }

    /// A store holding `data`.
    pub fn from_vec(data: Vec<u8>) -> Self {
        MemIo {
            data,
            limit: MEM_IO_MAX_LEN,
        }
    }

    /// Caps how large the store may grow (writes past it fail with
    /// [`IoError::NoSpace`]).
    pub fn with_limit(mut self, limit_bytes: u64) -> Self {
        self.limit = limit_bytes;
        self
    }

    /// The stored bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.data
    }

    /// Consumes the store, returning its bytes.
    pub fn into_vec(self) -> Vec<u8> {
        self.data
    }

    fn grow_to(&mut self, len: u64) -> Result<(), IoError> {
        if len > self.limit {
            // The limit is the store's capacity: a full store, as a host
            // file system's ENOSPC would say.
            return Err(IoError::NoSpace {
                op: "write",
                detail: alloc::format!(
                    "memory store would grow to {len} bytes, above its limit of {}",
                    self.limit
                )
                .into_boxed_str(),
            });
        }
        let len = usize::try_from(len).map_err(|_| IoError::Host {
            op: "write",
            detail: String::from("length does not fit in memory"),
        })?;
        if self.data.len() < len {
            self.data.resize(len, 0);
        }
        Ok(())
    }
}

fn range_in(offset: u64, len: usize, store_len: usize) -> Option<core::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(len)?;
    if end > store_len {
        return None;
    }
    Some(start..end)
}

impl BlockIo for MemIo {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let r = range_in(offset, buf.len(), self.data.len()).ok_or(IoError::OutOfRange {
            offset,
            len_bytes: buf.len() as u64,
            store_len: self.data.len() as u64,
        })?;
        buf.copy_from_slice(&self.data[r]);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        let end = offset.checked_add(data.len() as u64).ok_or(IoError::Host {
            op: "write",
            detail: String::from("offset overflows"),
        })?;
        self.grow_to(end)?;
        // grow_to guarantees end <= data.len() and end fits usize.
        let r = range_in(offset, data.len(), self.data.len()).ok_or(IoError::Host {
            op: "write",
            detail: String::from("offset out of range"),
        })?;
        self.data[r].copy_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }

    fn len(&self) -> Result<u64, IoError> {
        Ok(self.data.len() as u64)
    }

    fn set_len(&mut self, len: u64) -> Result<(), IoError> {
        if len <= self.data.len() as u64 {
            self.data.truncate(len as usize);
            Ok(())
        } else {
            self.grow_to(len)
        }
    }
}

/// What a disk operation failed on: split so a caller can tell "this file
/// cannot be used as asked" from "this file is damaged" from "the store failed".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskError {
    /// The file is not something we can open as asked (not a VHDX, unsupported
    /// version or feature, missing parent, bad creation parameters).
    Open(String),
    /// The file claims to be a VHDX but its structures are inconsistent.
    Corrupt(String),
    /// The request itself is invalid (unaligned, out of range, read-only disk).
    Request(String),
    /// The backing store failed.
    Io(IoError),
}

impl DiskError {
    /// True for [`DiskError::Corrupt`].
    pub fn is_corrupt(&self) -> bool {
        matches!(self, DiskError::Corrupt(_))
    }
    /// True when the backing store is full ([`IoError::NoSpace`]).
    pub fn is_no_space(&self) -> bool {
        matches!(self, DiskError::Io(e) if e.is_no_space())
    }
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskError::Open(m) => write!(f, "cannot open: {m}"),
            DiskError::Corrupt(m) => write!(f, "corrupt: {m}"),
            DiskError::Request(m) => write!(f, "invalid request: {m}"),
            DiskError::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for DiskError {}

impl From<IoError> for DiskError {
    fn from(e: IoError) -> Self {
        DiskError::Io(e)
    }
}

/// A disk as the guest sees it: virtual byte offsets, sector-aligned I/O.
pub trait VirtualDisk {
    /// Size of the disk in bytes.
    fn virtual_size(&self) -> u64;
    /// Logical sector size in bytes (512 or 4096).
    fn logical_sector_size(&self) -> u32;
    /// Reads `buf.len()` bytes at `offset` (both sector-aligned).
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError>;
    /// Writes `data` at `offset` (both sector-aligned).
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError>;
    /// Makes every earlier write durable.
    fn flush(&mut self) -> Result<(), DiskError>;
    /// Ranges `(offset, len_bytes)` that may hold data (allocated blocks); a
    /// copier may skip the rest, which reads as zeros. Default: the whole disk.
    fn allocated_ranges(&mut self) -> Result<Vec<(u64, u64)>, DiskError> {
        Ok(vec![(0, self.virtual_size())])
    }
    /// For a disk whose writes become durable later, elsewhere (a mirror
    /// to another node, acknowledged over the network): a ticket covering
    /// every write and flush so far, to ask [`VirtualDisk::is_durable`]
    /// about before the guest is told they are done. `None` (the
    /// default): `write` and `flush` returning `Ok` is all there is.
    fn durability_ticket(&mut self) -> Option<u64> {
        None
    }
    /// Whether the writes `ticket` covers are durable everywhere they must
    /// be (or need not be any more). Default: yes.
    fn is_durable(&mut self, _ticket: u64) -> bool {
        true
    }
}

/// A boxed disk (`Box<dyn VirtualDisk>`, what a VM holds) is a disk, so a
/// mirror or a copy can own it without a wrapper type of its own.
impl<T: VirtualDisk + ?Sized> VirtualDisk for alloc::boxed::Box<T> {
    fn virtual_size(&self) -> u64 {
        (**self).virtual_size()
    }
    fn logical_sector_size(&self) -> u32 {
        (**self).logical_sector_size()
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        (**self).read(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        (**self).write(offset, data)
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        (**self).flush()
    }
    fn allocated_ranges(&mut self) -> Result<Vec<(u64, u64)>, DiskError> {
        (**self).allocated_ranges()
    }
    fn durability_ticket(&mut self) -> Option<u64> {
        (**self).durability_ticket()
    }
    fn is_durable(&mut self, ticket: u64) -> bool {
        (**self).is_durable(ticket)
    }
}

/// A disk shared by the VM and the job that steps it (a mirror being
/// copied, a checkpoint chain being merged) is a disk: each call borrows
/// it for that call only. Single-threaded use only; a call made while
/// another holds the borrow is a bug of the caller and panics.
impl<T: VirtualDisk + ?Sized> VirtualDisk for alloc::rc::Rc<core::cell::RefCell<T>> {
    fn virtual_size(&self) -> u64 {
        self.borrow().virtual_size()
    }
    fn logical_sector_size(&self) -> u32 {
        self.borrow().logical_sector_size()
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.borrow_mut().read(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.borrow_mut().write(offset, data)
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        self.borrow_mut().flush()
    }
    fn allocated_ranges(&mut self) -> Result<Vec<(u64, u64)>, DiskError> {
        self.borrow_mut().allocated_ranges()
    }
    fn durability_ticket(&mut self) -> Option<u64> {
        self.borrow_mut().durability_ticket()
    }
    fn is_durable(&mut self, ticket: u64) -> bool {
        self.borrow_mut().is_durable(ticket)
    }
}

/// Checks that `[offset, offset+len)` is sector-aligned and inside a disk.
pub fn check_request(
    offset: u64,
    len_bytes: usize,
    sector_bytes: u32,
    virtual_size: u64,
) -> Result<(), DiskError> {
    let sector = u64::from(sector_bytes.max(1));
    let len = len_bytes as u64;
    if !offset.is_multiple_of(sector) || !len.is_multiple_of(sector) {
        return Err(DiskError::Request(alloc::format!(
            "offset {offset} and length {len} must be multiples of the {sector}-byte sector"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= virtual_size => Ok(()),
        _ => Err(DiskError::Request(alloc::format!(
            "request at {offset} of {len} bytes runs past the end of the {virtual_size}-byte disk"
        ))),
    }
}

/// A raw image: virtual byte `n` is file byte `n`.
#[derive(Debug)]
pub struct RawDisk<B: BlockIo> {
    io: B,
    size: u64,
    sector: u32,
}

impl<B: BlockIo> RawDisk<B> {
    /// Uses the whole store as a disk of 512-byte sectors. The size is fixed
    /// at open; a store whose length is not a sector multiple exposes only the
    /// whole sectors.
    pub fn open(io: B) -> Result<Self, DiskError> {
        Self::open_with_sector(io, 512)
    }

    /// Like [`RawDisk::open`] with a 512 or 4096-byte logical sector.
    pub fn open_with_sector(io: B, sector_bytes: u32) -> Result<Self, DiskError> {
        if sector_bytes != 512 && sector_bytes != 4096 {
            return Err(DiskError::Open(alloc::format!(
                "logical sector size {sector_bytes} is not 512 or 4096"
            )));
        }
        let len = io.len()?;
        let size = len - len % u64::from(sector_bytes);
        Ok(RawDisk {
            io,
            size,
            sector: sector_bytes,
        })
    }

    /// Creates (resizes) the store to `size` bytes of zeros-or-existing data.
    pub fn create(mut io: B, size: u64) -> Result<Self, DiskError> {
        io.set_len(size)?;
        Ok(RawDisk {
            io,
            size: size - size % 512,
            sector: 512,
        })
    }

    /// The backing store.
    pub fn into_inner(self) -> B {
        self.io
    }

    /// The backing store, borrowed.
    pub fn io(&self) -> &B {
        &self.io
    }
}

impl<B: BlockIo> VirtualDisk for RawDisk<B> {
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn logical_sector_size(&self) -> u32 {
        self.sector
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_request(offset, buf.len(), self.sector, self.size)?;
        Ok(self.io.read_at(offset, buf)?)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        check_request(offset, data.len(), self.sector, self.size)?;
        Ok(self.io.write_at(offset, data)?)
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(self.io.flush()?)
    }
}

#[cfg(feature = "std")]
pub use file::FileIo;

#[cfg(feature = "std")]
mod file {
    //! Host file backend. With `O_DIRECT` every transfer goes through a
    //! 4096-aligned bounce buffer covering whole 4096-byte blocks, so callers
    //! may use any offset, length and buffer.
    use super::{BlockIo, IoError};
    use std::fs::{File, OpenOptions};
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::path::Path;
    use std::sync::Mutex;

    /// `O_DIRECT` on x86-64 Linux.
    const O_DIRECT: i32 = 0o40000;
    /// Alignment O_DIRECT needs for buffers, offsets and lengths.
    const DIRECT_ALIGN: usize = 4096;

    /// A host file.
    #[derive(Debug)]
    pub struct FileIo {
        file: File,
        direct: bool,
        writable: bool,
        /// Reused bounce buffer for unaligned `O_DIRECT` transfers.
        bounce: Mutex<Vec<u8>>,
    }

    /// ENOSPC and EDQUOT (Linux errno values).
    const NO_SPACE_ERRNOS: [i32; 2] = [28, 122];

    fn host(op: &'static str, e: std::io::Error) -> IoError {
        if e.raw_os_error()
            .is_some_and(|n| NO_SPACE_ERRNOS.contains(&n))
        {
            return IoError::NoSpace {
                op,
                detail: e.to_string().into_boxed_str(),
            };
        }
        IoError::Host {
            op,
            detail: e.to_string(),
        }
    }

    /// The 4096-aligned window of `len` bytes inside `raw`, growing `raw`
    /// as needed (the bounce buffer is reused across requests).
    fn aligned_window(raw: &mut Vec<u8>, len: usize) -> &mut [u8] {
        if raw.len() < len + DIRECT_ALIGN {
            raw.resize(len + DIRECT_ALIGN, 0);
        }
        let addr = raw.as_ptr() as usize;
        let start = (DIRECT_ALIGN - addr % DIRECT_ALIGN) % DIRECT_ALIGN;
        &mut raw[start..start + len]
    }

    /// True when a transfer can bypass the bounce buffer.
    fn aligned(ptr: *const u8, offset: u64, len: usize) -> bool {
        (ptr as usize).is_multiple_of(DIRECT_ALIGN)
            && offset.is_multiple_of(DIRECT_ALIGN as u64)
            && len.is_multiple_of(DIRECT_ALIGN)
    }

    impl FileIo {
        /// Opens an existing file, read-write when `writable`.
        pub fn open(path: &Path, writable: bool) -> Result<Self, IoError> {
            let file = OpenOptions::new()
                .read(true)
                .write(writable)
                .open(path)
                .map_err(|e| host("open", e))?;
            Ok(FileIo {
                file,
                direct: false,
                writable,
                bounce: Mutex::new(Vec::new()),
            })
        }

        /// Creates (truncating) a file for reading and writing.
        pub fn create(path: &Path) -> Result<Self, IoError> {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(|e| host("create", e))?;
            Ok(FileIo {
                file,
                direct: false,
                writable: true,
                bounce: Mutex::new(Vec::new()),
            })
        }

        /// Opens an existing file bypassing the page cache (`O_DIRECT`),
        /// falling back to buffered I/O when the filesystem refuses it.
        pub fn open_direct(path: &Path, writable: bool) -> Result<Self, IoError> {
            match OpenOptions::new()
                .read(true)
                .write(writable)
                .custom_flags(O_DIRECT)
                .open(path)
            {
                Ok(file) => Ok(FileIo {
                    file,
                    direct: true,
                    writable,
                    bounce: Mutex::new(Vec::new()),
                }),
                Err(e) if e.raw_os_error() == Some(22) => Self::open(path, writable),
                Err(e) => Err(host("open", e)),
            }
        }

        /// Wraps an already-open file (buffered I/O).
        pub fn from_file(file: File, writable: bool) -> Self {
            FileIo {
                file,
                direct: false,
                writable,
                bounce: Mutex::new(Vec::new()),
            }
        }

        /// True when transfers bypass the page cache.
        pub fn is_direct(&self) -> bool {
            self.direct
        }

        /// Reads whole aligned blocks; bytes past end of file read as zero.
        /// Returns how many bytes of the window exist in the file.
        fn read_window(&self, start: u64, win: &mut [u8]) -> Result<usize, IoError> {
            let mut done = 0usize;
            while done < win.len() {
                let n = self
                    .file
                    .read_at(&mut win[done..], start + done as u64)
                    .map_err(|e| host("read", e))?;
                if n == 0 {
                    break;
                }
                done += n;
                // With O_DIRECT a short read means end of file; asking again
                // at an unaligned offset would be refused.
                if self.direct && !done.is_multiple_of(DIRECT_ALIGN) {
                    break;
                }
            }
            win[done..].fill(0);
            Ok(done)
        }

        fn bounce(&self) -> Result<std::sync::MutexGuard<'_, Vec<u8>>, IoError> {
            self.bounce.lock().map_err(|_| IoError::Host {
                op: "bounce",
                detail: "bounce buffer lock poisoned".into(),
            })
        }

        fn direct_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
            let a = DIRECT_ALIGN as u64;
            let end = offset + buf.len() as u64;
            if aligned(buf.as_ptr(), offset, buf.len()) {
                let got = self.read_window(offset, buf)?;
                if got < buf.len() {
                    return Err(IoError::OutOfRange {
                        offset,
                        len_bytes: buf.len() as u64,
                        store_len: offset + got as u64,
                    });
                }
                return Ok(());
            }
            let start = offset - offset % a;
            let end_al = end.div_ceil(a) * a;
            let win_len = usize::try_from(end_al - start).map_err(|_| IoError::Host {
                op: "read",
                detail: "request too large".into(),
            })?;
            let mut raw = self.bounce()?;
            let win = aligned_window(&mut raw, win_len);
            let got = self.read_window(start, win)?;
            if (start + got as u64) < end {
                return Err(IoError::OutOfRange {
                    offset,
                    len_bytes: buf.len() as u64,
                    store_len: start + got as u64,
                });
            }
            let skip = (offset - start) as usize;
            buf.copy_from_slice(&win[skip..skip + buf.len()]);
            Ok(())
        }

        fn direct_write(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
            if aligned(data.as_ptr(), offset, data.len()) {
                return self
                    .file
                    .write_all_at(data, offset)
                    .map_err(|e| host("write", e));
            }
            let a = DIRECT_ALIGN as u64;
            let start = offset - offset % a;
            let end = offset + data.len() as u64;
            let end_al = end.div_ceil(a) * a;
            // Only a partial last block can push the file past `end`.
            let old_len = if end_al != end {
                Some(self.len()?)
            } else {
                None
            };
            let win_len = usize::try_from(end_al - start).map_err(|_| IoError::Host {
                op: "write",
                detail: "request too large".into(),
            })?;
            let skip = (offset - start) as usize;
            let partial = skip != 0 || end != end_al;
            let mut raw = self.bounce()?;
            let win = aligned_window(&mut raw, win_len);
            if partial {
                self.read_window(start, win)?;
            }
            win[skip..skip + data.len()].copy_from_slice(data);
            self.file
                .write_all_at(win, start)
                .map_err(|e| host("write", e))?;
            drop(raw);
            // Whole-block writes may have extended the file past the byte the
            // caller wrote last: trim back to what a buffered write would give.
            if let Some(old_len) = old_len {
                let want = old_len.max(end);
                if end_al > want {
                    self.file.set_len(want).map_err(|e| host("set_len", e))?;
                }
            }
            Ok(())
        }
    }

    impl BlockIo for FileIo {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
            if offset.checked_add(buf.len() as u64).is_none() {
                return Err(IoError::OutOfRange {
                    offset,
                    len_bytes: buf.len() as u64,
                    store_len: self.len()?,
                });
            }
            if self.direct {
                return self.direct_read(offset, buf);
            }
            match self.file.read_exact_at(buf, offset) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    Err(IoError::OutOfRange {
                        offset,
                        len_bytes: buf.len() as u64,
                        store_len: self.len()?,
                    })
                }
                Err(e) => Err(host("read", e)),
            }
        }

        fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
            if !self.writable {
                return Err(IoError::ReadOnly);
            }
            if offset.checked_add(data.len() as u64).is_none() {
                return Err(IoError::Host {
                    op: "write",
                    detail: "offset overflows".into(),
                });
            }
            if self.direct {
                return self.direct_write(offset, data);
            }
            self.file
                .write_all_at(data, offset)
                .map_err(|e| host("write", e))
        }

        fn flush(&mut self) -> Result<(), IoError> {
            if !self.writable {
                return Ok(());
            }
            self.file.sync_data().map_err(|e| host("flush", e))
        }

        fn len(&self) -> Result<u64, IoError> {
            Ok(self.file.metadata().map_err(|e| host("stat", e))?.len())
        }

        fn set_len(&mut self, len: u64) -> Result<(), IoError> {
            if !self.writable {
                return Err(IoError::ReadOnly);
            }
            self.file.set_len(len).map_err(|e| host("set_len", e))
        }

        /// `fallocate(2)` mode 0 (what `posix_fallocate` does when the file
        /// system supports it): blocks are reserved and the file extended,
        /// without writing them. A file system without it (EOPNOTSUPP)
        /// gets zeros written instead.
        fn allocate(&mut self, offset: u64, len_bytes: u64) -> Result<(), IoError> {
            if !self.writable {
                return Err(IoError::ReadOnly);
            }
            if len_bytes == 0 {
                return Ok(());
            }
            match rustix::fs::fallocate(
                &self.file,
                rustix::fs::FallocateFlags::empty(),
                offset,
                len_bytes,
            ) {
                Ok(()) => Ok(()),
                Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
                    super::allocate_by_writing_zeros(self, offset, len_bytes)
                }
                Err(e) => Err(host("allocate", e.into())),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn direct_and_buffered_agree_on_unaligned_io() {
            let dir = std::env::temp_dir().join(format!("vstorage-fileio-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let p = dir.join("f.bin");
            drop(FileIo::create(&p).unwrap());
            for direct in [false, true] {
                std::fs::write(&p, b"").unwrap();
                let mut f = if direct {
                    FileIo::open_direct(&p, true).unwrap()
                } else {
                    FileIo::open(&p, true).unwrap()
                };
                f.write_at(10, b"hello").unwrap();
                assert_eq!(f.len().unwrap(), 15);
                f.write_at(4094, &[7u8; 5000]).unwrap();
                assert_eq!(f.len().unwrap(), 9094);
                let mut b = [0u8; 5];
                f.read_at(10, &mut b).unwrap();
                assert_eq!(&b, b"hello");
                let mut big = vec![0u8; 5000];
                f.read_at(4094, &mut big).unwrap();
                assert!(big.iter().all(|&x| x == 7));
                assert!(matches!(
                    f.read_at(9000, &mut big),
                    Err(IoError::OutOfRange { .. })
                ));
                // Aligned buffer, offset and length: no bounce buffer.
                let mut raw = Vec::new();
                let win = aligned_window(&mut raw, 8192);
                win.fill(5);
                f.write_at(16384, win).unwrap();
                win.fill(0);
                f.read_at(16384, win).unwrap();
                assert!(win.iter().all(|&x| x == 5));
                assert_eq!(f.len().unwrap(), 24576);
                assert!(matches!(
                    f.read_at(20480, win),
                    Err(IoError::OutOfRange { .. })
                ));
                f.flush().unwrap();
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }

        #[test]
        fn a_full_file_system_is_no_space_not_a_host_error() {
            // Linux's /dev/full refuses every write with ENOSPC.
            let full = OpenOptions::new().write(true).open("/dev/full").unwrap();
            let mut f = FileIo::from_file(full, true);
            let e = f.write_at(0, b"data").unwrap_err();
            assert!(e.is_no_space(), "{e:?}");
            assert!(matches!(e, IoError::NoSpace { op: "write", .. }), "{e:?}");
            assert!(
                e.to_string().starts_with("write failed: store full: "),
                "{e}"
            );
            assert!(crate::io::DiskError::from(e).is_no_space());
            // Other failures stay host errors.
            let e = FileIo::open(Path::new("/nonexistent/vstorage"), false).unwrap_err();
            assert!(
                !e.is_no_space() && matches!(e, IoError::Host { .. }),
                "{e:?}"
            );
            assert!(!crate::io::DiskError::Corrupt("x".into()).is_no_space());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_io_reads_past_end_fail() {
        let mut m = MemIo::new();
        m.write_at(4, b"abcd").unwrap();
        assert_eq!(m.len().unwrap(), 8);
        let mut b = [0u8; 4];
        m.read_at(4, &mut b).unwrap();
        assert_eq!(&b, b"abcd");
        assert!(m.read_at(6, &mut b).is_err());
        assert!(m.read_at(u64::MAX, &mut b).is_err());
        assert!(m.write_at(u64::MAX, &b).is_err());
    }

    /// The portable fallback behind `BlockIo::allocate`: zeros are written
    /// past the end only, existing bytes stay.
    #[test]
    fn allocate_by_writing_zeros_extends_and_keeps_bytes() {
        let mut m = MemIo::from_vec(vec![7u8; 100]);
        m.allocate(50, (3 << 20) + 10).unwrap();
        assert_eq!(m.len().unwrap(), (3 << 20) + 60);
        assert!(m.as_slice()[..100].iter().all(|&b| b == 7));
        assert!(m.as_slice()[100..].iter().all(|&b| b == 0));
        m.allocate(0, 10).unwrap();
        assert_eq!(m.len().unwrap(), (3 << 20) + 60);
        assert!(m.allocate(u64::MAX, 2).is_err());
    }

    #[test]
    fn raw_disk_checks_alignment_and_bounds() {
        let mut d = RawDisk::create(MemIo::new(), 4096).unwrap();
        d.write(512, &[1u8; 512]).unwrap();
        let mut b = [0u8; 512];
        d.read(512, &mut b).unwrap();
        assert_eq!(b, [1u8; 512]);
        assert!(d.read(1, &mut b).is_err());
        assert!(d.read(4096, &mut b).is_err());
    }
}
