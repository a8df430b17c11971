//! The 9P2000.L client: one request at a time over a [`Transport`], with
//! fid management.
//!
//! Invariants:
//! - at most one request is outstanding (every call is request, reply), so
//!   every request but `Tversion` carries tag [`TAG`];
//! - a fid is in the table from the reply that created it (attach, walk)
//!   until its `Tclunk` was sent (a clunk releases the fid even when the
//!   server answers with an error, as 9P specifies), and at most
//!   [`FIDS_MAX`] are live;
//! - memory per call is bounded: the reply buffer is the negotiated msize,
//!   reads and writes move at most `msize - 24` bytes per message, and a
//!   directory listing stops at [`READDIR_ENTRIES_MAX`] entries;
//! - nothing from the server panics the client: a transport failure, a
//!   malformed reply and a server error are three [`P9Error`] variants,
//!   each naming the operation.

use super::wire::{
    parse_reply, setattr_valid, Attr, DirEntry, Encoder, Expect, Op, Parsed, ProtoError, Qid,
    Reply, StatFs, AT_REMOVEDIR, GETATTR_BASIC, HEADER_BYTES, IO_HEADER_BYTES, MSIZE_MIN, NAME_MAX,
    NOFID, NOTAG, VERSION, WALK_MAX,
};
use alloc::collections::BTreeSet;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// Tag of every request after `Tversion`.
pub const TAG: u16 = 1;
/// Most fids live at once (the root included).
pub const FIDS_MAX: usize = 1024;
/// Most entries one directory listing returns.
pub const READDIR_ENTRIES_MAX: usize = 65_536;
/// Longest path (all components) accepted.
pub const PATH_MAX: usize = 4096;

/// A transport failure (the device, not the protocol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportError(pub String);

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A request/response channel to one 9P server (virtio-9p on the node, a
/// server double in tests).
pub trait Transport {
    /// Largest message, either way, the channel carries (the msize cap).
    fn max_message_bytes(&self) -> u32;
    /// Sends `request` (one whole T-message) and receives its reply into
    /// `reply`; returns the reply's length. The reply's bytes are the
    /// caller's to check.
    fn transact(&mut self, request: &[u8], reply: &mut [u8]) -> Result<usize, TransportError>;
}

impl<T: Transport + ?Sized> Transport for alloc::boxed::Box<T> {
    fn max_message_bytes(&self) -> u32 {
        (**self).max_message_bytes()
    }
    fn transact(&mut self, request: &[u8], reply: &mut [u8]) -> Result<usize, TransportError> {
        (**self).transact(request, reply)
    }
}

/// A client-side file handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fid(pub u32);

/// What went wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum P9Error {
    /// The channel failed.
    Transport { op: &'static str, detail: String },
    /// The server's reply broke the protocol.
    Protocol { op: &'static str, error: ProtoError },
    /// The server refused: a Linux errno.
    Server { op: &'static str, errno: u32 },
    /// Version negotiation failed.
    Version(String),
    /// A name or path this client will not send (the reason says why).
    BadName(String),
    /// [`FIDS_MAX`] fids are open.
    TooManyFids,
    /// A result larger than the client's limit.
    TooLarge { what: &'static str, limit: u64 },
}

/// Linux errno values the store code acts on.
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const ENOENT: u32 = 2;
    pub const EIO: u32 = 5;
    pub const EBADF: u32 = 9;
    pub const ENOMEM: u32 = 12;
    pub const EACCES: u32 = 13;
    pub const EBUSY: u32 = 16;
    pub const EEXIST: u32 = 17;
    pub const EXDEV: u32 = 18;
    pub const ENOTDIR: u32 = 20;
    pub const EISDIR: u32 = 21;
    pub const EINVAL: u32 = 22;
    pub const EMFILE: u32 = 24;
    pub const EFBIG: u32 = 27;
    pub const ENOSPC: u32 = 28;
    pub const EROFS: u32 = 30;
    pub const ENAMETOOLONG: u32 = 36;
    pub const ENOTEMPTY: u32 = 39;
    pub const EOPNOTSUPP: u32 = 95;
    pub const EDQUOT: u32 = 122;
}

/// Name and description of a Linux errno (`None` for ones not listed).
pub fn errno_name(e: u32) -> Option<(&'static str, &'static str)> {
    use errno::*;
    Some(match e {
        EPERM => ("EPERM", "operation not permitted"),
        ENOENT => ("ENOENT", "no such file or directory"),
        EIO => ("EIO", "input/output error"),
        EBADF => ("EBADF", "bad file handle"),
        ENOMEM => ("ENOMEM", "the server is out of memory"),
        EACCES => ("EACCES", "permission denied"),
        EBUSY => ("EBUSY", "busy"),
        EEXIST => ("EEXIST", "file exists"),
        EXDEV => ("EXDEV", "cross-device link"),
        ENOTDIR => ("ENOTDIR", "not a directory"),
        EISDIR => ("EISDIR", "is a directory"),
        EINVAL => ("EINVAL", "invalid argument"),
        EMFILE => ("EMFILE", "the server has too many open files"),
        EFBIG => ("EFBIG", "file too large"),
        ENOSPC => ("ENOSPC", "no space left on the store"),
        EROFS => ("EROFS", "read-only file system"),
        ENAMETOOLONG => ("ENAMETOOLONG", "file name too long"),
        ENOTEMPTY => ("ENOTEMPTY", "directory not empty"),
        EOPNOTSUPP => ("EOPNOTSUPP", "operation not supported by the server"),
        EDQUOT => ("EDQUOT", "disk quota exceeded"),
        _ => return None,
    })
}

impl P9Error {
    /// The server's errno, when it refused.
    pub fn errno(&self) -> Option<u32> {
        match self {
            P9Error::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }
    /// Whether the store is full (ENOSPC or EDQUOT).
    pub fn is_no_space(&self) -> bool {
        matches!(self.errno(), Some(errno::ENOSPC | errno::EDQUOT))
    }
    /// Whether the file or directory does not exist.
    pub fn is_not_found(&self) -> bool {
        self.errno() == Some(errno::ENOENT)
    }
}

impl fmt::Display for P9Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            P9Error::Transport { op, detail } => write!(f, "9P {op}: transport failed: {detail}"),
            P9Error::Protocol { op, error } => write!(f, "9P {op}: malformed reply: {error}"),
            P9Error::Server { op, errno } => match errno_name(*errno) {
                Some((name, text)) => write!(f, "9P {op}: {text} ({name})"),
                None => write!(f, "9P {op}: the server refused with errno {errno}"),
            },
            P9Error::Version(m) => write!(f, "9P version: {m}"),
            P9Error::BadName(m) => write!(f, "invalid name: {m}"),
            P9Error::TooManyFids => write!(f, "9P: {FIDS_MAX} files are open at once"),
            P9Error::TooLarge { what, limit } => write!(f, "9P: {what} exceeds {limit}"),
        }
    }
}

/// Checks one path component: 1 to 255 bytes, not `.` or `..`, no `/` or
/// NUL.
pub fn check_name(name: &str) -> Result<(), P9Error> {
    let shown = || {
        let mut s: String = name.chars().take(40).collect();
        if s.len() < name.len() {
            s.push('…');
        }
        s
    };
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(P9Error::BadName(alloc::format!(
            "'{}' must be 1 to {NAME_MAX} bytes",
            shown()
        )));
    }
    if name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(P9Error::BadName(alloc::format!(
            "'{}' is not a file name ('.', '..', '/' and NUL are refused)",
            shown()
        )));
    }
    Ok(())
}

/// Splits a store-relative path (`dir/file`, `/dir/file`; empty or `/` is
/// the store's root) into checked components.
pub fn split_path(path: &str) -> Result<Vec<&str>, P9Error> {
    if path.len() > PATH_MAX {
        return Err(P9Error::BadName(alloc::format!(
            "a path of {} bytes is longer than {PATH_MAX}",
            path.len()
        )));
    }
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for p in &parts {
        check_name(p)?;
    }
    Ok(parts)
}

/// `Rlopen`/`Rlcreate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    pub qid: Qid,
    pub iounit: u32,
}

/// A connected 9P2000.L session.
#[derive(Debug)]
pub struct Client<T: Transport> {
    transport: T,
    msize: u32,
    root: Fid,
    fids: BTreeSet<u32>,
    next_fid: u32,
    req: Vec<u8>,
    reply: Vec<u8>,
}

impl<T: Transport> Client<T> {
    /// Negotiates the version (msize at most `msize_wanted` and the
    /// transport's cap) and attaches to the export `aname` as the root fid.
    pub fn connect(transport: T, msize_wanted: u32, aname: &str) -> Result<Self, P9Error> {
        let msize = msize_wanted.min(transport.max_message_bytes());
        if msize < MSIZE_MIN {
            return Err(P9Error::Version(alloc::format!(
                "an msize of {msize} bytes is below the minimum of {MSIZE_MIN}"
            )));
        }
        let mut c = Client {
            transport,
            msize,
            root: Fid(0),
            fids: BTreeSet::new(),
            next_fid: 1,
            req: Vec::new(),
            reply: vec![0; msize as usize],
        };
        Encoder::new(&mut c.req, Op::Version, NOTAG)
            .u32(msize)
            .str(VERSION)
            .finish();
        let (server_msize, ok) = match c.call(Op::Version, NOTAG, 0)? {
            Reply::Version { msize, version } => (msize, version == VERSION.as_bytes()),
            _ => return Err(mismatch(Op::Version)),
        };
        if !ok {
            return Err(P9Error::Version(
                "the server does not speak 9P2000.L".to_string(),
            ));
        }
        if server_msize > msize || server_msize < MSIZE_MIN {
            return Err(P9Error::Version(alloc::format!(
                "the server chose an msize of {server_msize} bytes; {MSIZE_MIN} to {msize} were offered"
            )));
        }
        c.msize = server_msize;
        c.reply.truncate(server_msize as usize);
        Encoder::new(&mut c.req, Op::Attach, TAG)
            .u32(c.root.0)
            .u32(NOFID)
            .str("root")
            .str(aname)
            .u32(0)
            .finish();
        match c.call(Op::Attach, TAG, 0)? {
            Reply::Attach(_) => {}
            _ => return Err(mismatch(Op::Attach)),
        }
        c.fids.insert(c.root.0);
        Ok(c)
    }

    /// The negotiated message size.
    pub fn msize(&self) -> u32 {
        self.msize
    }
    /// Most payload bytes one read or write message carries.
    pub fn io_max(&self) -> u32 {
        self.msize - IO_HEADER_BYTES
    }
    /// The export's root.
    pub fn root(&self) -> Fid {
        self.root
    }
    /// Fids live now (the root included).
    pub fn fids_in_use(&self) -> usize {
        self.fids.len()
    }
    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }
    /// The transport, mutably (tests inject faults through it).
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// Sends `self.req` and checks the reply; a server error becomes
    /// [`P9Error::Server`].
    fn call(&mut self, op: Op, tag: u16, count: u32) -> Result<Reply<'_>, P9Error> {
        let n = self
            .transport
            .transact(&self.req, &mut self.reply)
            .map_err(|e| P9Error::Transport {
                op: op.name(),
                detail: e.0,
            })?;
        let Some(bytes) = self.reply.get(..n) else {
            return Err(P9Error::Transport {
                op: op.name(),
                detail: alloc::format!(
                    "reported a {n}-byte reply for a {}-byte buffer",
                    self.reply.len()
                ),
            });
        };
        match parse_reply(Expect { op, tag, count }, bytes) {
            Ok(Parsed::Ok(r)) => Ok(r),
            Ok(Parsed::Error(errno)) => Err(P9Error::Server {
                op: op.name(),
                errno,
            }),
            Err(error) => Err(P9Error::Protocol {
                op: op.name(),
                error,
            }),
        }
    }

    /// A call whose reply has no body.
    fn call_empty(&mut self, op: Op) -> Result<(), P9Error> {
        match self.call(op, TAG, 0)? {
            Reply::Empty => Ok(()),
            _ => Err(mismatch(op)),
        }
    }

    fn alloc_fid(&mut self) -> Result<Fid, P9Error> {
        if self.fids.len() >= FIDS_MAX {
            return Err(P9Error::TooManyFids);
        }
        // At most FIDS_MAX are taken, so this finds one within FIDS_MAX + 1
        // steps.
        loop {
            let f = self.next_fid;
            self.next_fid = self.next_fid.wrapping_add(1);
            if f != NOFID && !self.fids.contains(&f) {
                return Ok(Fid(f));
            }
        }
    }

    fn check_fid(&self, fid: Fid, op: Op) -> Result<(), P9Error> {
        if self.fids.contains(&fid.0) {
            Ok(())
        } else {
            Err(P9Error::BadName(alloc::format!(
                "{}: fid {} is not open",
                op.name(),
                fid.0
            )))
        }
    }

    /// A new fid for `names` walked from `from` (a clone of `from` when
    /// `names` is empty). A missing component is the server's error
    /// (ENOENT).
    pub fn walk(&mut self, from: Fid, names: &[&str]) -> Result<Fid, P9Error> {
        self.check_fid(from, Op::Walk)?;
        for n in names {
            check_name(n)?;
        }
        let new = self.alloc_fid()?;
        let mut chunks = names.chunks(WALK_MAX);
        let first = chunks.next().unwrap_or(&[]);
        self.walk_step(from, new, first)?;
        self.fids.insert(new.0);
        for chunk in chunks {
            if let Err(e) = self.walk_step(new, new, chunk) {
                let _ = self.clunk(new);
                return Err(e);
            }
        }
        Ok(new)
    }

    /// One `Twalk` of at most [`WALK_MAX`] names; all must be walked.
    fn walk_step(&mut self, from: Fid, to: Fid, names: &[&str]) -> Result<(), P9Error> {
        let mut e = Encoder::new(&mut self.req, Op::Walk, TAG)
            .u32(from.0)
            .u32(to.0)
            .u16(names.len() as u16);
        for n in names {
            e = e.str(n);
        }
        e.finish();
        let wanted = names.len();
        let got = match self.call(Op::Walk, TAG, wanted as u32)? {
            Reply::Walk(q) => q.len(),
            _ => return Err(mismatch(Op::Walk)),
        };
        if got < wanted {
            // The server walked part of the way; `to` was not created (or,
            // when it is `from`, did not move). 9P says so; report ENOENT
            // for the component that failed.
            return Err(P9Error::Server {
                op: "walk",
                errno: errno::ENOENT,
            });
        }
        Ok(())
    }

    /// A new fid for the store-relative `path` (see [`split_path`]).
    pub fn walk_path(&mut self, path: &str) -> Result<Fid, P9Error> {
        let parts = split_path(path)?;
        self.walk(self.root, &parts)
    }

    /// Opens `fid` (Linux open flags, [`super::wire::open_flags`]).
    pub fn lopen(&mut self, fid: Fid, flags: u32) -> Result<Opened, P9Error> {
        self.check_fid(fid, Op::Lopen)?;
        Encoder::new(&mut self.req, Op::Lopen, TAG)
            .u32(fid.0)
            .u32(flags)
            .finish();
        match self.call(Op::Lopen, TAG, 0)? {
            Reply::Open { qid, iounit } => Ok(Opened { qid, iounit }),
            _ => Err(mismatch(Op::Lopen)),
        }
    }

    /// Creates and opens `name` in directory `dir`; `dir` then stands for
    /// the new, open file (9P2000.L semantics).
    pub fn lcreate(
        &mut self,
        dir: Fid,
        name: &str,
        flags: u32,
        mode: u32,
    ) -> Result<Opened, P9Error> {
        self.check_fid(dir, Op::Lcreate)?;
        check_name(name)?;
        Encoder::new(&mut self.req, Op::Lcreate, TAG)
            .u32(dir.0)
            .str(name)
            .u32(flags)
            .u32(mode)
            .u32(0)
            .finish();
        match self.call(Op::Lcreate, TAG, 0)? {
            Reply::Open { qid, iounit } => Ok(Opened { qid, iounit }),
            _ => Err(mismatch(Op::Lcreate)),
        }
    }

    /// Reads into `buf` from `offset` of the open `fid`, in messages of at
    /// most [`Client::io_max`] bytes; returns the bytes read (fewer than
    /// `buf.len()` only at the end of the file).
    pub fn read(&mut self, fid: Fid, offset: u64, buf: &mut [u8]) -> Result<usize, P9Error> {
        self.check_fid(fid, Op::Read)?;
        let mut done = 0usize;
        while done < buf.len() {
            let want = (buf.len() - done).min(self.io_max() as usize) as u32;
            let at = offset
                .checked_add(done as u64)
                .ok_or_else(|| P9Error::BadName("read offset overflows".to_string()))?;
            Encoder::new(&mut self.req, Op::Read, TAG)
                .u32(fid.0)
                .u64(at)
                .u32(want)
                .finish();
            let data = match self.call(Op::Read, TAG, want)? {
                Reply::Read(d) => d,
                _ => return Err(mismatch(Op::Read)),
            };
            if data.is_empty() {
                break;
            }
            // parse_reply checked data.len() <= want <= what is left.
            buf[done..done + data.len()].copy_from_slice(data);
            done += data.len();
        }
        Ok(done)
    }

    /// Writes all of `data` at `offset` of the open `fid`.
    pub fn write(&mut self, fid: Fid, offset: u64, data: &[u8]) -> Result<(), P9Error> {
        self.check_fid(fid, Op::Write)?;
        let mut done = 0usize;
        while done < data.len() {
            let n = (data.len() - done).min(self.io_max() as usize);
            let at = offset
                .checked_add(done as u64)
                .ok_or_else(|| P9Error::BadName("write offset overflows".to_string()))?;
            Encoder::new(&mut self.req, Op::Write, TAG)
                .u32(fid.0)
                .u64(at)
                .u32(n as u32)
                .bytes(&data[done..done + n])
                .finish();
            let wrote = match self.call(Op::Write, TAG, n as u32)? {
                Reply::Write(w) => w as usize,
                _ => return Err(mismatch(Op::Write)),
            };
            if wrote == 0 {
                // Retrying would loop for ever; the server said nothing.
                return Err(P9Error::Server {
                    op: "write",
                    errno: errno::EIO,
                });
            }
            done += wrote;
        }
        Ok(())
    }

    /// Makes the open `fid`'s data and metadata durable (fsync(2) on the
    /// server; `datasync` = 0). On a directory opened for reading it makes
    /// its entries durable.
    pub fn fsync(&mut self, fid: Fid) -> Result<(), P9Error> {
        self.check_fid(fid, Op::Fsync)?;
        Encoder::new(&mut self.req, Op::Fsync, TAG)
            .u32(fid.0)
            .u32(0)
            .finish();
        self.call_empty(Op::Fsync)
    }

    /// The basic attributes of `fid`.
    pub fn getattr(&mut self, fid: Fid) -> Result<Attr, P9Error> {
        self.check_fid(fid, Op::Getattr)?;
        Encoder::new(&mut self.req, Op::Getattr, TAG)
            .u32(fid.0)
            .u64(GETATTR_BASIC)
            .finish();
        match self.call(Op::Getattr, TAG, 0)? {
            Reply::Getattr(a) => Ok(a),
            _ => Err(mismatch(Op::Getattr)),
        }
    }

    /// Truncates or extends (with zeros) the file `fid` to `size` bytes.
    pub fn set_size(&mut self, fid: Fid, size: u64) -> Result<(), P9Error> {
        self.check_fid(fid, Op::Setattr)?;
        Encoder::new(&mut self.req, Op::Setattr, TAG)
            .u32(fid.0)
            .u32(setattr_valid::SIZE)
            .u32(0)
            .u32(0)
            .u32(0)
            .u64(size)
            .u64(0)
            .u64(0)
            .u64(0)
            .u64(0)
            .finish();
        self.call_empty(Op::Setattr)
    }

    /// The file system holding `fid`.
    pub fn statfs(&mut self, fid: Fid) -> Result<StatFs, P9Error> {
        self.check_fid(fid, Op::Statfs)?;
        Encoder::new(&mut self.req, Op::Statfs, TAG)
            .u32(fid.0)
            .finish();
        match self.call(Op::Statfs, TAG, 0)? {
            Reply::Statfs(s) => Ok(s),
            _ => Err(mismatch(Op::Statfs)),
        }
    }

    /// Moves the file `fid` to `name` in directory `dir` (`Trename`).
    pub fn rename(&mut self, fid: Fid, dir: Fid, name: &str) -> Result<(), P9Error> {
        self.check_fid(fid, Op::Rename)?;
        self.check_fid(dir, Op::Rename)?;
        check_name(name)?;
        Encoder::new(&mut self.req, Op::Rename, TAG)
            .u32(fid.0)
            .u32(dir.0)
            .str(name)
            .finish();
        self.call_empty(Op::Rename)
    }

    /// Renames `old_dir/old_name` to `new_dir/new_name` (`Trenameat`,
    /// rename(2): an existing file at the target is replaced).
    pub fn renameat(
        &mut self,
        old_dir: Fid,
        old_name: &str,
        new_dir: Fid,
        new_name: &str,
    ) -> Result<(), P9Error> {
        self.check_fid(old_dir, Op::Renameat)?;
        self.check_fid(new_dir, Op::Renameat)?;
        check_name(old_name)?;
        check_name(new_name)?;
        Encoder::new(&mut self.req, Op::Renameat, TAG)
            .u32(old_dir.0)
            .str(old_name)
            .u32(new_dir.0)
            .str(new_name)
            .finish();
        self.call_empty(Op::Renameat)
    }

    /// Removes `name` from directory `dir` (a directory only with
    /// `remove_dir`, and only when empty).
    pub fn unlinkat(&mut self, dir: Fid, name: &str, remove_dir: bool) -> Result<(), P9Error> {
        self.check_fid(dir, Op::Unlinkat)?;
        check_name(name)?;
        Encoder::new(&mut self.req, Op::Unlinkat, TAG)
            .u32(dir.0)
            .str(name)
            .u32(if remove_dir { AT_REMOVEDIR } else { 0 })
            .finish();
        self.call_empty(Op::Unlinkat)
    }

    /// Creates directory `name` in `dir` with permission bits `mode`.
    pub fn mkdir(&mut self, dir: Fid, name: &str, mode: u32) -> Result<Qid, P9Error> {
        self.check_fid(dir, Op::Mkdir)?;
        check_name(name)?;
        Encoder::new(&mut self.req, Op::Mkdir, TAG)
            .u32(dir.0)
            .str(name)
            .u32(mode)
            .u32(0)
            .finish();
        match self.call(Op::Mkdir, TAG, 0)? {
            Reply::Mkdir(q) => Ok(q),
            _ => Err(mismatch(Op::Mkdir)),
        }
    }

    /// Every entry of the directory `fid` (opened with [`Client::lopen`]
    /// and [`super::wire::open_flags::DIRECTORY`]), without `.` and `..`, in the
    /// server's order; at most [`READDIR_ENTRIES_MAX`].
    pub fn readdir(&mut self, fid: Fid) -> Result<Vec<DirEntry>, P9Error> {
        self.check_fid(fid, Op::Readdir)?;
        let mut out = Vec::new();
        let mut cookie = 0u64;
        let mut seen = 0usize;
        loop {
            let count = self.io_max();
            Encoder::new(&mut self.req, Op::Readdir, TAG)
                .u32(fid.0)
                .u64(cookie)
                .u32(count)
                .finish();
            let entries = match self.call(Op::Readdir, TAG, count)? {
                Reply::Readdir(e) => e,
                _ => return Err(mismatch(Op::Readdir)),
            };
            let Some(last) = entries.last() else {
                return Ok(out);
            };
            cookie = last.offset;
            // Counting every entry (dots too) bounds a server that repeats
            // itself.
            seen += entries.len();
            if seen > READDIR_ENTRIES_MAX + 2 {
                return Err(P9Error::TooLarge {
                    what: "directory listing",
                    limit: READDIR_ENTRIES_MAX as u64,
                });
            }
            out.extend(
                entries
                    .into_iter()
                    .filter(|e| e.name != "." && e.name != ".."),
            );
        }
    }

    /// Releases `fid` (always, whatever the server answers).
    pub fn clunk(&mut self, fid: Fid) -> Result<(), P9Error> {
        self.check_fid(fid, Op::Clunk)?;
        self.fids.remove(&fid.0);
        Encoder::new(&mut self.req, Op::Clunk, TAG)
            .u32(fid.0)
            .finish();
        self.call_empty(Op::Clunk)
    }
}

/// A reply of the right type that decoded to another variant: impossible
/// by [`parse_reply`]'s construction, reported instead of panicking.
fn mismatch(op: Op) -> P9Error {
    P9Error::Protocol {
        op: op.name(),
        error: ProtoError::UnexpectedType {
            got: op.r(),
            expected: op.r(),
        },
    }
}

// The smallest msize must hold a read header and some payload.
const _: () = assert!(MSIZE_MIN > IO_HEADER_BYTES + HEADER_BYTES as u32);

#[cfg(test)]
mod tests {
    use super::super::wire::{open_flags, ReplyEncoder, RequestReader, RLERROR};
    use super::*;
    use alloc::boxed::Box;

    type Handler = Box<dyn FnMut(u8, u16, &mut RequestReader<'_>, &mut Vec<u8>)>;

    /// An in-memory fake server: `version` and `attach` answered as a
    /// well-behaved server would, everything else by `handler`; every
    /// request's type is logged.
    struct Fake {
        msize_reply: u32,
        version_reply: &'static [u8],
        handler: Handler,
        log: Vec<u8>,
        fail_transport: bool,
    }

    impl Fake {
        fn new(
            handler: impl FnMut(u8, u16, &mut RequestReader<'_>, &mut Vec<u8>) + 'static,
        ) -> Self {
            Fake {
                msize_reply: 8192,
                version_reply: b"9P2000.L",
                handler: Box::new(handler),
                log: Vec::new(),
                fail_transport: false,
            }
        }
    }

    impl core::fmt::Debug for Fake {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.write_str("Fake")
        }
    }

    impl Transport for Fake {
        fn max_message_bytes(&self) -> u32 {
            8192
        }
        fn transact(&mut self, request: &[u8], reply: &mut [u8]) -> Result<usize, TransportError> {
            if self.fail_transport {
                return Err(TransportError("device gone".into()));
            }
            let (t, tag, mut r) = RequestReader::new(request).expect("client sends valid messages");
            self.log.push(t);
            let mut out = Vec::new();
            match t {
                100 => {
                    ReplyEncoder::new(&mut out, 101, tag)
                        .u32(self.msize_reply)
                        .str(self.version_reply)
                        .finish();
                }
                104 => {
                    ReplyEncoder::new(&mut out, 105, tag)
                        .qid(Qid::default())
                        .finish();
                }
                _ => (self.handler)(t, tag, &mut r, &mut out),
            }
            reply[..out.len()].copy_from_slice(&out);
            Ok(out.len())
        }
    }

    fn empty(t: u8, tag: u16, out: &mut Vec<u8>) {
        ReplyEncoder::new(out, t + 1, tag).finish();
    }

    fn walk_all(t: u8, tag: u16, r: &mut RequestReader<'_>, out: &mut Vec<u8>) {
        r.u32();
        r.u32();
        let n = r.u16().unwrap();
        let mut e = ReplyEncoder::new(out, t + 1, tag).u16(n);
        for _ in 0..n {
            e = e.qid(Qid::default());
        }
        e.finish();
    }

    #[test]
    fn version_negotiation_is_checked() {
        let c = Client::connect(Fake::new(|_, _, _, _| {}), 65536, "").unwrap();
        assert_eq!((c.msize(), c.io_max(), c.fids_in_use()), (8192, 8168, 1));
        let mut f = Fake::new(|_, _, _, _| {});
        f.msize_reply = 9000;
        let e = Client::connect(f, 8192, "").unwrap_err();
        assert!(alloc::format!("{e}").contains("msize of 9000"), "{e}");
        let mut f = Fake::new(|_, _, _, _| {});
        f.version_reply = b"9P2000.u";
        let e = Client::connect(f, 8192, "").unwrap_err();
        assert_eq!(
            e,
            P9Error::Version("the server does not speak 9P2000.L".into())
        );
        let e = Client::connect(Fake::new(|_, _, _, _| {}), 100, "").unwrap_err();
        assert!(matches!(e, P9Error::Version(_)));
        let mut f = Fake::new(|_, _, _, _| {});
        f.fail_transport = true;
        let e = Client::connect(f, 8192, "").unwrap_err();
        assert_eq!(
            alloc::format!("{e}"),
            "9P version: transport failed: device gone"
        );
    }

    #[test]
    fn long_walks_go_sixteen_names_at_a_time_and_partial_walks_fail() {
        let mut c = Client::connect(Fake::new(walk_all), 8192, "").unwrap();
        let names: Vec<String> = (0..40).map(|i| alloc::format!("d{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let f = c.walk(c.root(), &refs).unwrap();
        assert_eq!(c.transport().log.iter().filter(|t| **t == 110).count(), 3);
        assert_eq!(c.fids_in_use(), 2);
        let g = c.walk(f, &[]).unwrap();
        assert_ne!(f, g, "a clone is a new fid");

        // A server that walks only the first name of each request.
        let mut c = Client::connect(
            Fake::new(|t, tag, r, out| match t {
                110 => {
                    r.u32();
                    r.u32();
                    let n = r.u16().unwrap().min(1);
                    let mut e = ReplyEncoder::new(out, t + 1, tag).u16(n);
                    for _ in 0..n {
                        e = e.qid(Qid::default());
                    }
                    e.finish();
                }
                _ => empty(t, tag, out),
            }),
            8192,
            "",
        )
        .unwrap();
        let e = c.walk_path("a/b").unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert_eq!(c.fids_in_use(), 1, "the half-walked fid was never created");
        // 17 names: the first message succeeds partially... a partial
        // walk in a later message clunks the fid that did exist.
        let names: Vec<String> = (0..17).map(|i| alloc::format!("n{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        assert!(c.walk(c.root(), &refs).is_err());
        assert_eq!(c.fids_in_use(), 1);
        for bad in ["..", "a/../b", "x\0y"] {
            assert!(
                matches!(c.walk_path(bad), Err(P9Error::BadName(_))),
                "{bad}"
            );
        }
        assert!(matches!(c.walk(Fid(77), &[]), Err(P9Error::BadName(_))));
    }

    #[test]
    fn reads_and_writes_are_split_at_msize_and_short_counts_continue() {
        // A "file" of 20000 bytes of i as u8; writes accept at most 1000
        // bytes per message.
        let file: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        let mut c = Client::connect(
            Fake::new(move |t, tag, r, out| match t {
                116 => {
                    r.u32();
                    let off = r.u64().unwrap() as usize;
                    let n = r.u32().unwrap() as usize;
                    let d = &file[off.min(file.len())..(off + n).min(file.len())];
                    ReplyEncoder::new(out, 117, tag)
                        .u32(d.len() as u32)
                        .bytes(d)
                        .finish();
                }
                118 => {
                    r.u32();
                    r.u64();
                    let n = r.u32().unwrap();
                    ReplyEncoder::new(out, 119, tag).u32(n.min(1000)).finish();
                }
                110 => walk_all(t, tag, r, out),
                _ => empty(t, tag, out),
            }),
            8192,
            "",
        )
        .unwrap();
        let f = c.walk_path("f").unwrap();
        let mut buf = vec![0u8; 30_000];
        assert_eq!(c.read(f, 0, &mut buf).unwrap(), 20_000);
        assert!(buf[..20_000].iter().enumerate().all(|(i, b)| *b == i as u8));
        let reads = c.transport().log.iter().filter(|t| **t == 116).count();
        assert_eq!(
            reads, 4,
            "3 messages of at most 8168 bytes, then the empty one at the end"
        );
        c.write(f, 0, &[1; 2500]).unwrap();
        assert_eq!(c.transport().log.iter().filter(|t| **t == 118).count(), 3);
    }

    #[test]
    fn a_write_of_nothing_and_server_errors_are_errors() {
        let mut c = Client::connect(
            Fake::new(|t, tag, r, out| match t {
                118 => {
                    ReplyEncoder::new(out, 119, tag).u32(0).finish();
                }
                50 => {
                    ReplyEncoder::new(out, RLERROR, tag).u32(28).finish();
                }
                110 => walk_all(t, tag, r, out),
                _ => empty(t, tag, out),
            }),
            8192,
            "",
        )
        .unwrap();
        let f = c.walk_path("f").unwrap();
        assert!(c.write(f, 0, b"x").is_err());
        let e = c.fsync(f).unwrap_err();
        assert!(e.is_no_space());
        assert_eq!(
            alloc::format!("{e}"),
            "9P fsync: no space left on the store (ENOSPC)"
        );
        let e = P9Error::Server {
            op: "read",
            errno: 4242,
        };
        assert_eq!(
            alloc::format!("{e}"),
            "9P read: the server refused with errno 4242"
        );
    }

    #[test]
    fn fids_are_bounded_and_clunk_always_releases() {
        let mut c = Client::connect(
            Fake::new(|t, tag, r, out| match t {
                110 => walk_all(t, tag, r, out),
                120 => {
                    ReplyEncoder::new(out, RLERROR, tag).u32(9).finish();
                }
                _ => empty(t, tag, out),
            }),
            8192,
            "",
        )
        .unwrap();
        let mut fids = Vec::new();
        loop {
            match c.walk(c.root(), &[]) {
                Ok(f) => fids.push(f),
                Err(e) => {
                    assert_eq!(e, P9Error::TooManyFids);
                    break;
                }
            }
        }
        assert_eq!(fids.len(), FIDS_MAX - 1);
        assert!(c.clunk(fids[0]).is_err(), "the server's EBADF is reported");
        assert_eq!(c.fids_in_use(), FIDS_MAX - 1, "but the fid is free");
        assert!(c.walk(c.root(), &[]).is_ok());
    }

    #[test]
    fn a_server_that_lists_for_ever_is_cut_off() {
        let mut c = Client::connect(
            Fake::new(|t, tag, r, out| match t {
                40 => {
                    // Always the same 250 entries, never the end.
                    let mut data = Vec::new();
                    for i in 0..250u32 {
                        let mut e = Vec::new();
                        let name = alloc::format!("f{i}");
                        ReplyEncoder::new(&mut e, 0, 0)
                            .qid(Qid::default())
                            .u64(1)
                            .u8(8)
                            .str(name.as_bytes())
                            .finish();
                        data.extend_from_slice(&e[HEADER_BYTES..]);
                    }
                    ReplyEncoder::new(out, 41, tag)
                        .u32(data.len() as u32)
                        .bytes(&data)
                        .finish();
                }
                12 => {
                    ReplyEncoder::new(out, 13, tag)
                        .qid(Qid::default())
                        .u32(0)
                        .finish();
                }
                110 => walk_all(t, tag, r, out),
                _ => empty(t, tag, out),
            }),
            8192,
            "",
        )
        .unwrap();
        let d = c.walk_path("d").unwrap();
        c.lopen(d, open_flags::RDONLY | open_flags::DIRECTORY)
            .unwrap();
        assert_eq!(
            c.readdir(d),
            Err(P9Error::TooLarge {
                what: "directory listing",
                limit: READDIR_ENTRIES_MAX as u64
            })
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("disk.vhdx").is_ok());
        for bad in ["", ".", "..", "a/b", "a\0"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name(&"x".repeat(256)).is_err());
        assert_eq!(split_path("/a//b/").unwrap(), ["a", "b"]);
        assert!(split_path("").unwrap().is_empty());
        assert!(split_path(&"a/".repeat(3000)).is_err());
    }
}
