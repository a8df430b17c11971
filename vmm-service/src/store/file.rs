//! [`StoreFile`]: an open file on a store as a `vstorage::BlockIo`.
//!
//! Every `BlockIo` call is one or more 9P exchanges on the store's shared
//! client, nothing is cached: `read_at` is `Tread`s (a short read is
//! `IoError::OutOfRange`, as the trait requires), `write_at` `Twrite`s,
//! `flush` one `Tfsync` (QEMU: fsync(2) of the host file; the only point at
//! which written data is durable, exactly where the VHDX engine's
//! durability contract calls it), `len` a `Tgetattr`, `set_len` a
//! `Tsetattr` of the size. `allocate` writes zeros past the end (9P2000.L
//! has no fallocate), so a fixed VHDX is really allocated on the host.
//!
//! A full store (the server's `Rlerror` says ENOSPC or EDQUOT) is
//! `IoError::NoSpace`, which the VHDX engine passes up unchanged
//! (`DiskError::is_no_space`), so the caller of a disk write learns that
//! the store is full, not just that something failed. A failed call also
//! keeps the 9P error itself ([`StoreFile::last_error`]).

use super::{Conn, StorePath};
use alloc::format;
use alloc::string::String;
use core::cell::RefCell;
use vstorage::p9::{Fid, P9Error};
use vstorage::{BlockIo, IoError};

/// Bytes a bulk copy on a store moves per read or write call: two full
/// 9P messages (`2 x (MSIZE - 24)`, each `Tread`/`Twrite` carries at most
/// `MSIZE - 24` bytes) rounded down to whole 4 KiB pages, 1020 KiB. A
/// round trip costs the node far more than its bytes (measured under TCG
/// on a loaded 2-core machine, docs/DESIGN.md "Storage live migration"),
/// and a power of two such as 1 MiB needs a third message for its last
/// 48 bytes: 3 round trips per MiB instead of 2.
pub const COPY_IO_BYTES: usize =
    (2 * (super::MSIZE - vstorage::p9::wire::IO_HEADER_BYTES) as usize) & !4095;
const _: () = assert!(COPY_IO_BYTES == 1020 << 10);

/// An open file on a store (see the module doc).
pub struct StoreFile {
    conn: Conn,
    fid: Fid,
    writable: bool,
    at: StorePath,
    last_error: RefCell<Option<P9Error>>,
}

impl core::fmt::Debug for StoreFile {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("StoreFile")
            .field("at", &self.at)
            .field("fid", &self.fid)
            .field("writable", &self.writable)
            .finish()
    }
}

impl StoreFile {
    pub(super) fn new(conn: Conn, fid: Fid, writable: bool, at: StorePath) -> Self {
        StoreFile {
            conn,
            fid,
            writable,
            at,
            last_error: RefCell::new(None),
        }
    }

    /// Where the file is.
    pub fn path(&self) -> &StorePath {
        &self.at
    }

    /// The file was renamed (under its open fid) to `at`.
    pub(super) fn set_path(&mut self, at: StorePath) {
        self.at = at;
    }

    /// Whether it was opened for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The 9P error of the last call that failed, if any.
    pub fn last_error(&self) -> Option<P9Error> {
        self.last_error.borrow().clone()
    }

    /// Whether the last failure was a full store (ENOSPC, EDQUOT).
    pub fn last_error_is_no_space(&self) -> bool {
        self.last_error
            .borrow()
            .as_ref()
            .is_some_and(P9Error::is_no_space)
    }

    /// One operation on the client, with errors recorded and mapped.
    fn call<R>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut vstorage::p9::Client<super::ChannelTransport>, Fid) -> Result<R, P9Error>,
    ) -> Result<R, IoError> {
        let mut c = self.conn.try_borrow_mut().map_err(|_| IoError::Host {
            op,
            detail: format!("{}: the store is busy", self.at),
        })?;
        f(&mut c, self.fid).map_err(|e| {
            let detail = format!("{}: {e}", self.at);
            let full = e.is_no_space();
            *self.last_error.borrow_mut() = Some(e);
            if full {
                IoError::NoSpace {
                    op,
                    detail: detail.into_boxed_str(),
                }
            } else {
                IoError::Host { op, detail }
            }
        })
    }
}

impl BlockIo for StoreFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let n = self.call("read", |c, fid| c.read(fid, offset, buf))?;
        if n < buf.len() {
            return Err(IoError::OutOfRange {
                offset,
                len_bytes: buf.len() as u64,
                store_len: offset.saturating_add(n as u64),
            });
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        if !self.writable {
            return Err(IoError::ReadOnly);
        }
        if offset.checked_add(data.len() as u64).is_none() {
            return Err(IoError::Host {
                op: "write",
                detail: String::from("offset overflows"),
            });
        }
        self.call("write", |c, fid| c.write(fid, offset, data))
    }

    fn flush(&mut self) -> Result<(), IoError> {
        if !self.writable {
            return Ok(());
        }
        self.call("flush", |c, fid| c.fsync(fid))
    }

    fn len(&self) -> Result<u64, IoError> {
        self.call("stat", |c, fid| c.getattr(fid).map(|a| a.size))
    }

    fn set_len(&mut self, len: u64) -> Result<(), IoError> {
        if !self.writable {
            return Err(IoError::ReadOnly);
        }
        self.call("set_len", |c, fid| c.set_size(fid, len))
    }
}

impl Drop for StoreFile {
    fn drop(&mut self) {
        if let Ok(mut c) = self.conn.try_borrow_mut() {
            // The fid is released whatever the server says.
            let _ = c.clunk(self.fid);
        }
    }
}
