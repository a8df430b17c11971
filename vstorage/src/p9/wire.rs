//! 9P2000.L messages: encoding requests and decoding replies.
//!
//! Wire format (the Linux kernel's `Documentation/filesystems/9p.rst` and
//! the 9P2000.L protocol description in the `diod` project, which QEMU's
//! `hw/9pfs` implements): every message is `size[4] type[1] tag[2]` then a
//! body, all integers little-endian; `size` counts the whole message. A
//! string is `len[2]` then `len` bytes (no terminator); a qid is
//! `type[1] version[4] path[8]`.
//!
//! | request (T) | body | reply (R = T + 1) |
//! |---|---|---|
//! | version 100 | msize[4] version[s] | msize[4] version[s] |
//! | attach 104 | fid[4] afid[4] uname[s] aname[s] n_uname[4] | qid |
//! | walk 110 | fid[4] newfid[4] nwname[2] wname[s]... | nwqid[2] qid... |
//! | lopen 12 | fid[4] flags[4] | qid iounit[4] |
//! | lcreate 14 | fid[4] name[s] flags[4] mode[4] gid[4] | qid iounit[4] |
//! | read 116 | fid[4] offset[8] count[4] | count[4] data[count] |
//! | write 118 | fid[4] offset[8] count[4] data[count] | count[4] |
//! | fsync 50 | fid[4] datasync[4] | (empty) |
//! | getattr 24 | fid[4] request_mask[8] | valid[8] qid mode[4] uid[4] gid[4] nlink[8] rdev[8] size[8] blksize[8] blocks[8] 4 x (sec[8] nsec[8]) gen[8] data_version[8] |
//! | setattr 26 | fid[4] valid[4] mode[4] uid[4] gid[4] size[8] atime (sec[8] nsec[8]) mtime (sec[8] nsec[8]) | (empty) |
//! | statfs 8 | fid[4] | type[4] bsize[4] blocks[8] bfree[8] bavail[8] files[8] ffree[8] fsid[8] namelen[4] |
//! | rename 20 | fid[4] dfid[4] name[s] | (empty) |
//! | renameat 74 | olddirfid[4] oldname[s] newdirfid[4] newname[s] | (empty) |
//! | unlinkat 76 | dirfid[4] name[s] flags[4] | (empty) |
//! | mkdir 72 | dfid[4] name[s] mode[4] gid[4] | qid |
//! | readdir 40 | fid[4] offset[8] count[4] | count[4] then entries: qid offset[8] type[1] name[s] |
//! | clunk 120 | fid[4] | (empty) |
//!
//! Any request may instead get `Rlerror` (7): `ecode[4]`, a Linux errno.
//!
//! Replies are allegations (STYLE 4): [`parse_reply`] checks the size field
//! against the bytes received, the type against the request, the tag, every
//! field's presence, counts against what was asked and what arrived, and
//! that nothing trails the body. It allocates nothing but the directory
//! entries, whose number the reply's own length bounds.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// The protocol version string this client speaks.
pub const VERSION: &str = "9P2000.L";
/// Tag of `Tversion` (no other request may be outstanding).
pub const NOTAG: u16 = 0xffff;
/// "No fid" (the `afid` of an attach without authentication).
pub const NOFID: u32 = u32::MAX;
/// `size[4] type[1] tag[2]`.
pub const HEADER_BYTES: usize = 7;
/// Bytes of a read or write message that are not payload (Linux's
/// `P9_IOHDRSZ`: header, fid, offset, count, rounded up).
pub const IO_HEADER_BYTES: u32 = 24;
/// Smallest msize this client accepts (QEMU refuses less, too).
pub const MSIZE_MIN: u32 = 4096;
/// Longest name (one path component) sent or accepted.
pub const NAME_MAX: usize = 255;
/// Most names one `Twalk` may carry (9P's MAXWELEM).
pub const WALK_MAX: usize = 16;
/// Size of a qid on the wire.
pub const QID_BYTES: usize = 13;

/// Message types (the T-message; its reply is the next number).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Statfs = 8,
    Lopen = 12,
    Lcreate = 14,
    Rename = 20,
    Getattr = 24,
    Setattr = 26,
    Readdir = 40,
    Fsync = 50,
    Mkdir = 72,
    Renameat = 74,
    Unlinkat = 76,
    Version = 100,
    Attach = 104,
    Walk = 110,
    Read = 116,
    Write = 118,
    Clunk = 120,
}

/// `Rlerror`'s type.
pub const RLERROR: u8 = 7;

impl Op {
    /// Every operation (fuzzing and tests).
    pub const ALL: [Op; 17] = [
        Op::Statfs,
        Op::Lopen,
        Op::Lcreate,
        Op::Rename,
        Op::Getattr,
        Op::Setattr,
        Op::Readdir,
        Op::Fsync,
        Op::Mkdir,
        Op::Renameat,
        Op::Unlinkat,
        Op::Version,
        Op::Attach,
        Op::Walk,
        Op::Read,
        Op::Write,
        Op::Clunk,
    ];

    /// The request's type byte.
    pub fn t(self) -> u8 {
        self as u8
    }

    /// The reply's type byte.
    pub fn r(self) -> u8 {
        self as u8 + 1
    }

    /// The operation whose request type is `t`.
    pub fn from_t(t: u8) -> Option<Op> {
        Op::ALL.into_iter().find(|o| o.t() == t)
    }

    /// Its name, as in the protocol (`lopen`, `walk`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Op::Statfs => "statfs",
            Op::Lopen => "lopen",
            Op::Lcreate => "lcreate",
            Op::Rename => "rename",
            Op::Getattr => "getattr",
            Op::Setattr => "setattr",
            Op::Readdir => "readdir",
            Op::Fsync => "fsync",
            Op::Mkdir => "mkdir",
            Op::Renameat => "renameat",
            Op::Unlinkat => "unlinkat",
            Op::Version => "version",
            Op::Attach => "attach",
            Op::Walk => "walk",
            Op::Read => "read",
            Op::Write => "write",
            Op::Clunk => "clunk",
        }
    }
}

/// Linux open flags as 9P2000.L carries them (`L_O_*`, the x86 values).
pub mod open_flags {
    pub const RDONLY: u32 = 0;
    pub const WRONLY: u32 = 1;
    pub const RDWR: u32 = 2;
    pub const CREAT: u32 = 0o100;
    pub const EXCL: u32 = 0o200;
    pub const TRUNC: u32 = 0o1000;
    pub const APPEND: u32 = 0o2000;
    /// QEMU drops it (its server has no direct I/O): durability over 9P
    /// comes from `Tfsync` only.
    pub const DIRECT: u32 = 0o40000;
    pub const DIRECTORY: u32 = 0o200000;
}

/// `Tsetattr` valid bits.
pub mod setattr_valid {
    pub const MODE: u32 = 0x1;
    pub const SIZE: u32 = 0x8;
}

/// `Tgetattr` request mask: the basic fields (mode through blocks).
pub const GETATTR_BASIC: u64 = 0x7ff;
/// `Tunlinkat` flag: remove a directory.
pub const AT_REMOVEDIR: u32 = 0x200;
/// Qid type bit of a directory.
pub const QID_DIR: u8 = 0x80;

/// A server's identity of a file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Qid {
    pub kind: u8,
    pub version: u32,
    pub path: u64,
}

impl Qid {
    /// Whether it names a directory.
    pub fn is_dir(&self) -> bool {
        self.kind & QID_DIR != 0
    }
}

/// `Rgetattr`'s fields this code uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attr {
    pub valid: u64,
    pub qid: Qid,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    pub size: u64,
    pub blksize: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    pub mtime_sec: u64,
    pub mtime_nsec: u64,
}

/// `Rstatfs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatFs {
    pub fs_type: u32,
    pub bsize: u32,
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub fsid: u64,
    pub namelen: u32,
}

impl StatFs {
    /// Size of the file system in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.bsize))
    }
    /// Bytes an unprivileged writer may still use.
    pub fn free_bytes(&self) -> u64 {
        self.bavail.saturating_mul(u64::from(self.bsize))
    }
    /// Bytes in use (total less all free blocks, reserved ones included).
    pub fn used_bytes(&self) -> u64 {
        self.blocks
            .saturating_sub(self.bfree)
            .saturating_mul(u64::from(self.bsize))
    }
}

/// One `Rreaddir` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub qid: Qid,
    /// Cookie for the next `Treaddir` after this entry.
    pub offset: u64,
    /// `d_type` (4 directory, 8 regular file, ...).
    pub kind: u8,
    /// The name; bytes that are not UTF-8 are replaced (U+FFFD).
    pub name: String,
}

/// A decoded reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    Version {
        msize: u32,
        version: &'a [u8],
    },
    Attach(Qid),
    Walk(Vec<Qid>),
    Open {
        qid: Qid,
        iounit: u32,
    },
    Read(&'a [u8]),
    Write(u32),
    Getattr(Attr),
    Statfs(StatFs),
    Mkdir(Qid),
    Readdir(Vec<DirEntry>),
    /// Replies without a body (fsync, setattr, rename, renameat,
    /// unlinkat, clunk).
    Empty,
}

/// What is wrong with a reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// Fewer bytes than the 7-byte header.
    Short { len: usize },
    /// The size field disagrees with the bytes received.
    SizeMismatch { field: u32, received: usize },
    /// A type that is neither the expected reply nor `Rlerror`.
    UnexpectedType { got: u8, expected: u8 },
    /// The tag is not the request's.
    WrongTag { got: u16, expected: u16 },
    /// The body ends inside a field.
    Truncated { field: &'static str },
    /// Bytes follow the last field.
    Trailing { bytes: usize },
    /// A count disagrees with what was asked or what arrived.
    BadCount {
        field: &'static str,
        value: u64,
        limit: u64,
    },
    /// A field holds a value the protocol does not allow.
    BadValue { field: &'static str, value: u64 },
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::Short { len } => {
                write!(f, "{len}-byte reply is shorter than a 9P header")
            }
            ProtoError::SizeMismatch { field, received } => write!(
                f,
                "reply says it is {field} bytes but {received} were received"
            ),
            ProtoError::UnexpectedType { got, expected } => {
                write!(f, "reply type {got}, expected {expected} or Rlerror")
            }
            ProtoError::WrongTag { got, expected } => {
                write!(f, "reply tag {got}, expected {expected}")
            }
            ProtoError::Truncated { field } => write!(f, "reply ends inside field {field}"),
            ProtoError::Trailing { bytes } => {
                write!(f, "{bytes} bytes after the reply's last field")
            }
            ProtoError::BadCount {
                field,
                value,
                limit,
            } => {
                write!(f, "{field} is {value}, above the limit of {limit}")
            }
            ProtoError::BadValue { field, value } => write!(f, "{field} has invalid value {value}"),
        }
    }
}

/// A reply that arrived intact: a result, or the server's errno.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    Ok(Reply<'a>),
    /// `Rlerror`: the server refused with this Linux errno.
    Error(u32),
}

/// Builds one T-message.
#[derive(Debug)]
pub struct Encoder<'a> {
    buf: &'a mut Vec<u8>,
}

impl<'a> Encoder<'a> {
    /// Starts message `op` with `tag` in `buf` (cleared first).
    pub fn new(buf: &'a mut Vec<u8>, op: Op, tag: u16) -> Self {
        buf.clear();
        buf.extend_from_slice(&[0; 4]);
        buf.push(op.t());
        buf.extend_from_slice(&tag.to_le_bytes());
        Encoder { buf }
    }
    pub fn u8(self, v: u8) -> Self {
        self.buf.push(v);
        self
    }
    pub fn u16(self, v: u16) -> Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(self, v: u32) -> Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(self, v: u64) -> Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A string; the caller has checked it is at most `u16::MAX` bytes
    /// (names are checked against [`NAME_MAX`], longer ones are cut here).
    pub fn str(self, s: &str) -> Self {
        let b = s.as_bytes();
        let n = b.len().min(usize::from(u16::MAX));
        self.buf.extend_from_slice(&(n as u16).to_le_bytes());
        self.buf.extend_from_slice(&b[..n]);
        self
    }
    /// Raw bytes (a write's payload).
    pub fn bytes(self, b: &[u8]) -> Self {
        self.buf.extend_from_slice(b);
        self
    }
    /// Writes the size field; returns the message length.
    pub fn finish(self) -> usize {
        let len = self.buf.len();
        let size = u32::try_from(len).unwrap_or(u32::MAX);
        self.buf[..4].copy_from_slice(&size.to_le_bytes());
        len
    }
}

/// A checked cursor over a reply body.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], ProtoError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(ProtoError::Truncated { field })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, ProtoError> {
        Ok(self.take(1, field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, ProtoError> {
        let b = self.take(2, field)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, ProtoError> {
        let b = self.take(4, field)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, ProtoError> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self, field: &'static str) -> Result<&'a [u8], ProtoError> {
        let n = self.u16(field)?;
        self.take(usize::from(n), field)
    }
    fn qid(&mut self) -> Result<Qid, ProtoError> {
        Ok(Qid {
            kind: self.u8("qid.type")?,
            version: self.u32("qid.version")?,
            path: self.u64("qid.path")?,
        })
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn end(self) -> Result<(), ProtoError> {
        match self.remaining() {
            0 => Ok(()),
            bytes => Err(ProtoError::Trailing { bytes }),
        }
    }
}

/// What the client asked, as far as the reply's checks need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expect {
    pub op: Op,
    pub tag: u16,
    /// Read, write and readdir: the count asked for. Walk: the names sent.
    pub count: u32,
}

/// Checks and decodes `reply`, the answer to `expect`.
pub fn parse_reply(expect: Expect, reply: &[u8]) -> Result<Parsed<'_>, ProtoError> {
    if reply.len() < HEADER_BYTES {
        return Err(ProtoError::Short { len: reply.len() });
    }
    let size = u32::from_le_bytes([reply[0], reply[1], reply[2], reply[3]]);
    if usize::try_from(size).ok() != Some(reply.len()) {
        return Err(ProtoError::SizeMismatch {
            field: size,
            received: reply.len(),
        });
    }
    let kind = reply[4];
    let tag = u16::from_le_bytes([reply[5], reply[6]]);
    if kind != expect.op.r() && kind != RLERROR {
        return Err(ProtoError::UnexpectedType {
            got: kind,
            expected: expect.op.r(),
        });
    }
    if tag != expect.tag {
        return Err(ProtoError::WrongTag {
            got: tag,
            expected: expect.tag,
        });
    }
    let mut r = Reader {
        buf: &reply[HEADER_BYTES..],
        pos: 0,
    };
    if kind == RLERROR {
        let errno = r.u32("ecode")?;
        r.end()?;
        return Ok(Parsed::Error(errno));
    }
    let body = match expect.op {
        Op::Version => Reply::Version {
            msize: r.u32("msize")?,
            version: r.string("version")?,
        },
        Op::Attach => Reply::Attach(r.qid()?),
        Op::Walk => {
            let n = r.u16("nwqid")?;
            if u32::from(n) > expect.count {
                return Err(ProtoError::BadCount {
                    field: "nwqid",
                    value: u64::from(n),
                    limit: u64::from(expect.count),
                });
            }
            let mut qids = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                qids.push(r.qid()?);
            }
            Reply::Walk(qids)
        }
        Op::Lopen | Op::Lcreate => Reply::Open {
            qid: r.qid()?,
            iounit: r.u32("iounit")?,
        },
        Op::Read => Reply::Read(counted(&mut r, expect.count)?),
        Op::Write => {
            let n = r.u32("count")?;
            if n > expect.count {
                return Err(ProtoError::BadCount {
                    field: "count",
                    value: u64::from(n),
                    limit: u64::from(expect.count),
                });
            }
            Reply::Write(n)
        }
        Op::Getattr => {
            let valid = r.u64("valid")?;
            let qid = r.qid()?;
            let mode = r.u32("mode")?;
            let uid = r.u32("uid")?;
            let gid = r.u32("gid")?;
            let nlink = r.u64("nlink")?;
            let _rdev = r.u64("rdev")?;
            let size = r.u64("size")?;
            let blksize = r.u64("blksize")?;
            let blocks = r.u64("blocks")?;
            let _atime = (r.u64("atime_sec")?, r.u64("atime_nsec")?);
            let mtime_sec = r.u64("mtime_sec")?;
            let mtime_nsec = r.u64("mtime_nsec")?;
            let _ctime = (r.u64("ctime_sec")?, r.u64("ctime_nsec")?);
            let _btime = (r.u64("btime_sec")?, r.u64("btime_nsec")?);
            let _gen = r.u64("gen")?;
            let _data_version = r.u64("data_version")?;
            Reply::Getattr(Attr {
                valid,
                qid,
                mode,
                uid,
                gid,
                nlink,
                size,
                blksize,
                blocks,
                mtime_sec,
                mtime_nsec,
            })
        }
        Op::Statfs => {
            let s = StatFs {
                fs_type: r.u32("type")?,
                bsize: r.u32("bsize")?,
                blocks: r.u64("blocks")?,
                bfree: r.u64("bfree")?,
                bavail: r.u64("bavail")?,
                files: r.u64("files")?,
                ffree: r.u64("ffree")?,
                fsid: r.u64("fsid")?,
                namelen: r.u32("namelen")?,
            };
            if s.bfree > s.blocks || s.bavail > s.blocks {
                return Err(ProtoError::BadCount {
                    field: "bfree/bavail",
                    value: s.bfree.max(s.bavail),
                    limit: s.blocks,
                });
            }
            Reply::Statfs(s)
        }
        Op::Mkdir => Reply::Mkdir(r.qid()?),
        Op::Readdir => {
            let data = counted(&mut r, expect.count)?;
            let mut d = Reader { buf: data, pos: 0 };
            // Each entry takes at least 24 bytes, so the count bounds them.
            let mut entries = Vec::new();
            while d.remaining() > 0 {
                let qid = d.qid()?;
                let offset = d.u64("dirent.offset")?;
                let kind = d.u8("dirent.type")?;
                let name = d.string("dirent.name")?;
                if name.is_empty() || name.len() > NAME_MAX || name.contains(&b'/') {
                    return Err(ProtoError::BadValue {
                        field: "dirent.name length or '/'",
                        value: name.len() as u64,
                    });
                }
                entries.push(DirEntry {
                    qid,
                    offset,
                    kind,
                    name: String::from_utf8_lossy(name).into_owned(),
                });
            }
            Reply::Readdir(entries)
        }
        Op::Fsync | Op::Setattr | Op::Rename | Op::Renameat | Op::Unlinkat | Op::Clunk => {
            Reply::Empty
        }
    };
    r.end()?;
    Ok(Parsed::Ok(body))
}

/// `count[4] data[count]` with `count` at most `asked` and exactly the
/// bytes that follow.
fn counted<'a>(r: &mut Reader<'a>, asked: u32) -> Result<&'a [u8], ProtoError> {
    let n = r.u32("count")?;
    if n > asked {
        return Err(ProtoError::BadCount {
            field: "count",
            value: u64::from(n),
            limit: u64::from(asked),
        });
    }
    if r.remaining() != n as usize {
        return Err(ProtoError::BadCount {
            field: "count (bytes present)",
            value: u64::from(n),
            limit: r.remaining() as u64,
        });
    }
    r.take(n as usize, "data")
}

/// Builds R-messages: the server doubles' half (tests, fuzz seeds).
#[derive(Debug)]
pub struct ReplyEncoder<'a> {
    buf: &'a mut Vec<u8>,
}

impl<'a> ReplyEncoder<'a> {
    /// Starts reply type `kind` with `tag` in `buf` (cleared first).
    pub fn new(buf: &'a mut Vec<u8>, kind: u8, tag: u16) -> Self {
        buf.clear();
        buf.extend_from_slice(&[0; 4]);
        buf.push(kind);
        buf.extend_from_slice(&tag.to_le_bytes());
        ReplyEncoder { buf }
    }
    pub fn u8(self, v: u8) -> Self {
        self.buf.push(v);
        self
    }
    pub fn u16(self, v: u16) -> Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(self, v: u32) -> Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(self, v: u64) -> Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn qid(self, q: Qid) -> Self {
        self.u8(q.kind).u32(q.version).u64(q.path)
    }
    pub fn str(self, s: &[u8]) -> Self {
        let n = s.len().min(usize::from(u16::MAX));
        self.buf.extend_from_slice(&(n as u16).to_le_bytes());
        self.buf.extend_from_slice(&s[..n]);
        self
    }
    pub fn bytes(self, b: &[u8]) -> Self {
        self.buf.extend_from_slice(b);
        self
    }
    /// Writes the size field; returns the message length.
    pub fn finish(self) -> usize {
        let len = self.buf.len();
        let size = u32::try_from(len).unwrap_or(u32::MAX);
        self.buf[..4].copy_from_slice(&size.to_le_bytes());
        len
    }
}

/// A request as a server double sees it: a checked cursor over the body.
#[derive(Debug)]
pub struct RequestReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> RequestReader<'a> {
    /// Splits a whole T-message into (type, tag, body reader); `None` when
    /// it is shorter than its header or its size field is wrong.
    pub fn new(msg: &'a [u8]) -> Option<(u8, u16, Self)> {
        if msg.len() < HEADER_BYTES {
            return None;
        }
        let size = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
        if usize::try_from(size).ok() != Some(msg.len()) {
            return None;
        }
        let tag = u16::from_le_bytes([msg[5], msg[6]]);
        Some((
            msg[4],
            tag,
            RequestReader {
                buf: &msg[HEADER_BYTES..],
                pos: 0,
            },
        ))
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len())?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Some(s)
    }
    pub fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_le_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }
    pub fn str(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn expect(op: Op, count: u32) -> Expect {
        Expect { op, tag: 1, count }
    }

    fn reply(op: Op, f: impl FnOnce(ReplyEncoder<'_>) -> ReplyEncoder<'_>) -> Vec<u8> {
        let mut b = Vec::new();
        f(ReplyEncoder::new(&mut b, op.r(), 1)).finish();
        b
    }

    #[test]
    fn requests_encode_as_the_protocol_says() {
        let mut b = Vec::new();
        let n = Encoder::new(&mut b, Op::Version, NOTAG)
            .u32(8192)
            .str(VERSION)
            .finish();
        assert_eq!(n, b.len());
        assert_eq!(
            b,
            [
                vec![21, 0, 0, 0, 100, 0xff, 0xff, 0x00, 0x20, 0, 0, 8, 0],
                b"9P2000.L".to_vec()
            ]
            .concat()
        );
        let (t, tag, mut r) = RequestReader::new(&b).unwrap();
        assert_eq!(
            (t, tag, r.u32(), r.str()),
            (100, NOTAG, Some(8192), Some(&b"9P2000.L"[..]))
        );
        assert_eq!(r.u8(), None);
    }

    #[test]
    fn every_reply_kind_decodes() {
        let q = Qid {
            kind: QID_DIR,
            version: 3,
            path: 0x1122334455,
        };
        let v = reply(Op::Version, |e| e.u32(65536).str(b"9P2000.L"));
        assert_eq!(
            parse_reply(expect(Op::Version, 0), &v),
            Ok(Parsed::Ok(Reply::Version {
                msize: 65536,
                version: b"9P2000.L"
            }))
        );
        let w = reply(Op::Walk, |e| e.u16(2).qid(q).qid(q));
        assert_eq!(
            parse_reply(expect(Op::Walk, 2), &w),
            Ok(Parsed::Ok(Reply::Walk(vec![q, q])))
        );
        assert!(matches!(
            parse_reply(expect(Op::Walk, 1), &w),
            Err(ProtoError::BadCount { field: "nwqid", .. })
        ));
        let rd = reply(Op::Read, |e| e.u32(3).bytes(b"abc"));
        assert_eq!(
            parse_reply(expect(Op::Read, 3), &rd),
            Ok(Parsed::Ok(Reply::Read(b"abc")))
        );
        assert!(
            parse_reply(expect(Op::Read, 2), &rd).is_err(),
            "more than asked"
        );
        let short = reply(Op::Read, |e| e.u32(4).bytes(b"abc"));
        assert!(matches!(
            parse_reply(expect(Op::Read, 8), &short),
            Err(ProtoError::BadCount { .. })
        ));
        let err = {
            let mut b = Vec::new();
            ReplyEncoder::new(&mut b, RLERROR, 1).u32(28).finish();
            b
        };
        assert_eq!(
            parse_reply(expect(Op::Write, 1), &err),
            Ok(Parsed::Error(28))
        );
        let st = reply(Op::Statfs, |e| {
            e.u32(0xef53)
                .u32(4096)
                .u64(100)
                .u64(40)
                .u64(30)
                .u64(10)
                .u64(5)
                .u64(7)
                .u32(255)
        });
        let Ok(Parsed::Ok(Reply::Statfs(s))) = parse_reply(expect(Op::Statfs, 0), &st) else {
            panic!()
        };
        assert_eq!(
            (s.total_bytes(), s.free_bytes(), s.used_bytes()),
            (409600, 122880, 245760)
        );
        let dir = {
            let mut ents = Vec::new();
            ReplyEncoder::new(&mut ents, 0, 0)
                .qid(q)
                .u64(1)
                .u8(4)
                .str(b"sub")
                .qid(Qid::default())
                .u64(2)
                .u8(8)
                .str(b"f\xffx")
                .finish();
            let data = ents[HEADER_BYTES..].to_vec();
            reply(Op::Readdir, |e| e.u32(data.len() as u32).bytes(&data))
        };
        let Ok(Parsed::Ok(Reply::Readdir(d))) = parse_reply(expect(Op::Readdir, 4096), &dir) else {
            panic!()
        };
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].name.as_str(), d[0].offset, d[0].kind), ("sub", 1, 4));
        assert_eq!(d[1].name, "f\u{fffd}x");
        for op in [Op::Fsync, Op::Clunk, Op::Unlinkat] {
            assert_eq!(
                parse_reply(expect(op, 0), &reply(op, |e| e)),
                Ok(Parsed::Ok(Reply::Empty))
            );
        }
    }

    #[test]
    fn malformed_replies_are_named_errors() {
        let ok = reply(Op::Lopen, |e| e.qid(Qid::default()).u32(0));
        assert!(parse_reply(expect(Op::Lopen, 0), &ok).is_ok());
        assert_eq!(
            parse_reply(expect(Op::Lopen, 0), &ok[..5]),
            Err(ProtoError::Short { len: 5 })
        );
        let mut cut = ok.clone();
        cut.truncate(ok.len() - 1);
        assert!(matches!(
            parse_reply(expect(Op::Lopen, 0), &cut),
            Err(ProtoError::SizeMismatch { .. })
        ));
        let mut cut_fixed = cut.clone();
        let n = cut_fixed.len() as u32;
        cut_fixed[..4].copy_from_slice(&n.to_le_bytes());
        assert_eq!(
            parse_reply(expect(Op::Lopen, 0), &cut_fixed),
            Err(ProtoError::Truncated { field: "iounit" })
        );
        let long = reply(Op::Lopen, |e| e.qid(Qid::default()).u32(0).u8(9));
        assert_eq!(
            parse_reply(expect(Op::Lopen, 0), &long),
            Err(ProtoError::Trailing { bytes: 1 })
        );
        assert!(matches!(
            parse_reply(expect(Op::Read, 0), &ok),
            Err(ProtoError::UnexpectedType {
                got: 13,
                expected: 117
            })
        ));
        let mut other_tag = ok.clone();
        other_tag[5] = 9;
        assert_eq!(
            parse_reply(expect(Op::Lopen, 0), &other_tag),
            Err(ProtoError::WrongTag {
                got: 9,
                expected: 1
            })
        );
        let bad_statfs = reply(Op::Statfs, |e| {
            e.u32(0)
                .u32(4096)
                .u64(1)
                .u64(2)
                .u64(0)
                .u64(0)
                .u64(0)
                .u64(0)
                .u32(0)
        });
        assert!(parse_reply(expect(Op::Statfs, 0), &bad_statfs).is_err());
        let slash = {
            let mut ents = Vec::new();
            ReplyEncoder::new(&mut ents, 0, 0)
                .qid(Qid::default())
                .u64(1)
                .u8(8)
                .str(b"a/b")
                .finish();
            let data = ents[HEADER_BYTES..].to_vec();
            reply(Op::Readdir, |e| e.u32(data.len() as u32).bytes(&data))
        };
        assert!(matches!(
            parse_reply(expect(Op::Readdir, 4096), &slash),
            Err(ProtoError::BadValue { .. })
        ));
        // Every message is a named error, never a panic.
        for e in [
            ProtoError::Short { len: 1 },
            ProtoError::Truncated { field: "x" },
        ] {
            assert!(!alloc::format!("{e}").is_empty());
        }
    }

    #[test]
    fn every_prefix_of_every_reply_is_refused_cleanly() {
        let q = Qid::default();
        let replies = [
            (Op::Attach, reply(Op::Attach, |e| e.qid(q))),
            (
                Op::Getattr,
                reply(Op::Getattr, |e| {
                    let mut e = e.u64(0x7ff).qid(q).u32(0o100644).u32(0).u32(0);
                    for _ in 0..15 {
                        e = e.u64(1);
                    }
                    e
                }),
            ),
            (Op::Mkdir, reply(Op::Mkdir, |e| e.qid(q))),
            (Op::Write, reply(Op::Write, |e| e.u32(5))),
        ];
        for (op, full) in replies {
            assert!(parse_reply(expect(op, 5), &full).is_ok(), "{op:?}");
            for cut in HEADER_BYTES..full.len() {
                let mut m = full[..cut].to_vec();
                m[..4].copy_from_slice(&(cut as u32).to_le_bytes());
                assert!(
                    matches!(
                        parse_reply(expect(op, 5), &m),
                        Err(ProtoError::Truncated { .. })
                    ),
                    "{op:?} cut at {cut}"
                );
            }
        }
    }
}
