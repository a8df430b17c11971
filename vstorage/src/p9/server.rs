//! A 9P2000.L server double over a real host directory (`std` only): what
//! QEMU's `-fsdev local,security_model=none` does, in-process, so host
//! tests can drive the client and everything above it against real files
//! (bytes on disk, `qemu-img check` on a VHDX written through 9P).
//!
//! It implements [`Transport`] directly: `transact` decodes the request,
//! performs it on the directory and encodes the reply. It serves the
//! messages the client sends (version, attach, walk, lopen, lcreate, read,
//! write, fsync, getattr, setattr (size, mode), statfs, rename, renameat,
//! unlinkat, mkdir, readdir, clunk) and answers anything else with
//! `EOPNOTSUPP`. Walks refuse `..` and `/`, so no request leaves the
//! directory through a name (symbolic links are followed: a test double,
//! not a security boundary).
//!
//! Test hooks: [`DirServer::fail_next`] answers the next request of an
//! operation with an errno, [`DirServer::mangle_next`] rewrites the next
//! reply of an operation (malformed-reply tests), and
//! [`DirServer::count`] tells how many requests of an operation arrived
//! (e.g. that a flush really sent `Tfsync`).

use super::client::{errno, Transport, TransportError};
use super::wire::{
    Op, Qid, ReplyEncoder, RequestReader, AT_REMOVEDIR, GETATTR_BASIC, HEADER_BYTES, MSIZE_MIN,
    NOFID, QID_DIR, RLERROR, VERSION,
};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A reply rewriter for [`DirServer::mangle_next`].
pub type Mangler = Box<dyn FnMut(&mut Vec<u8>) + Send>;

struct Node {
    /// Relative to the root ("" is the root).
    rel: PathBuf,
    file: Option<File>,
    /// Directory entries snapshot at the first readdir: (name, qid, d_type).
    listing: Option<Vec<(Vec<u8>, Qid, u8)>>,
    opened_dir: bool,
}

/// The server double.
pub struct DirServer {
    root: PathBuf,
    msize_max: u32,
    msize: u32,
    fids: HashMap<u32, Node>,
    faults: Vec<(Op, u32)>,
    manglers: Vec<(Op, Mangler)>,
    counts: BTreeMap<u8, u64>,
    out: Vec<u8>,
}

impl std::fmt::Debug for DirServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirServer")
            .field("root", &self.root)
            .field("msize", &self.msize)
            .field("fids", &self.fids.len())
            .finish()
    }
}

type Res = Result<(), u32>;

fn io_errno(e: &std::io::Error) -> u32 {
    e.raw_os_error()
        .and_then(|c| u32::try_from(c).ok())
        .unwrap_or(errno::EIO)
}

fn qid_of(m: &fs::Metadata) -> Qid {
    Qid {
        kind: if m.is_dir() { QID_DIR } else { 0 },
        version: m.mtime() as u32,
        path: m.ino(),
    }
}

fn d_type(m: &fs::Metadata) -> u8 {
    if m.is_dir() {
        4
    } else if m.file_type().is_symlink() {
        10
    } else {
        8
    }
}

/// A name from the wire: one component, never `.`, `..` or containing `/`.
fn component(name: &[u8]) -> Result<&str, u32> {
    let s = std::str::from_utf8(name).map_err(|_| errno::EINVAL)?;
    if s.is_empty() || s == "." || s == ".." || s.contains(['/', '\0']) {
        return Err(errno::EINVAL);
    }
    Ok(s)
}

impl DirServer {
    /// Serves `root` (which must exist) with messages of at most
    /// `msize_max` bytes.
    pub fn new(root: impl Into<PathBuf>, msize_max: u32) -> Self {
        DirServer {
            root: root.into(),
            msize_max: msize_max.max(MSIZE_MIN),
            msize: msize_max.max(MSIZE_MIN),
            fids: HashMap::new(),
            faults: Vec::new(),
            manglers: Vec::new(),
            counts: BTreeMap::new(),
            out: Vec::new(),
        }
    }

    /// The next request of `op` is answered with `Rlerror(errno)`.
    pub fn fail_next(&mut self, op: Op, errno: u32) {
        self.faults.push((op, errno));
    }

    /// The next reply to `op` is passed through `f` before it is sent.
    pub fn mangle_next(&mut self, op: Op, f: Mangler) {
        self.manglers.push((op, f));
    }

    /// Requests of `op` received so far.
    pub fn count(&self, op: Op) -> u64 {
        self.counts.get(&op.t()).copied().unwrap_or(0)
    }

    /// Fids the client holds on this server now.
    pub fn open_fids(&self) -> usize {
        self.fids.len()
    }

    /// The directory served.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// After `from` was renamed to `to`: every fid on `from` or below it
    /// now names the new path, as QEMU's server updates its fids' paths
    /// (an open file renamed under its fid keeps working, path-based
    /// requests such as getattr included).
    fn renamed(&mut self, from: &Path, to: &Path) {
        for node in self.fids.values_mut() {
            if let Ok(rest) = node.rel.strip_prefix(from) {
                node.rel = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
            }
        }
    }

    fn path(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn node(&self, fid: u32) -> Result<&Node, u32> {
        self.fids.get(&fid).ok_or(errno::EBADF)
    }

    fn node_mut(&mut self, fid: u32) -> Result<&mut Node, u32> {
        self.fids.get_mut(&fid).ok_or(errno::EBADF)
    }

    fn reply(&mut self, op: Op, tag: u16) -> ReplyEncoder<'_> {
        ReplyEncoder::new(&mut self.out, op.r(), tag)
    }

    /// Handles one request; the reply is left in `self.out`.
    fn handle(&mut self, msg: &[u8]) -> Res {
        let Some((t, tag, mut r)) = RequestReader::new(msg) else {
            return Err(errno::EINVAL);
        };
        *self.counts.entry(t).or_insert(0) += 1;
        let Some(op) = Op::from_t(t) else {
            return Err(errno::EOPNOTSUPP);
        };
        if let Some(i) = self.faults.iter().position(|(o, _)| *o == op) {
            let (_, e) = self.faults.remove(i);
            return Err(e);
        }
        let bad = errno::EINVAL;
        match op {
            Op::Version => {
                let msize = r.u32().ok_or(bad)?;
                let version = r.str().ok_or(bad)?;
                self.fids.clear();
                self.msize = msize.min(self.msize_max);
                let v: &[u8] = if version == VERSION.as_bytes() {
                    VERSION.as_bytes()
                } else {
                    b"unknown"
                };
                let m = self.msize;
                self.reply(op, tag).u32(m).str(v).finish();
            }
            Op::Attach => {
                let fid = r.u32().ok_or(bad)?;
                let _afid = r.u32().filter(|a| *a == NOFID).ok_or(bad)?;
                let meta = fs::metadata(&self.root).map_err(|e| io_errno(&e))?;
                self.insert(fid, PathBuf::new())?;
                self.reply(op, tag).qid(qid_of(&meta)).finish();
            }
            Op::Walk => {
                let fid = r.u32().ok_or(bad)?;
                let newfid = r.u32().ok_or(bad)?;
                let n = r.u16().ok_or(bad)?;
                let mut rel = self.node(fid)?.rel.clone();
                let mut qids = Vec::new();
                for i in 0..n {
                    let name = component(r.str().ok_or(bad)?)?;
                    let next = rel.join(name);
                    match fs::metadata(self.path(&next)) {
                        Ok(m) => {
                            qids.push(qid_of(&m));
                            rel = next;
                        }
                        Err(e) if i == 0 => return Err(io_errno(&e)),
                        Err(_) => break,
                    }
                }
                if qids.len() == usize::from(n) {
                    if newfid != fid {
                        self.insert(newfid, rel)?;
                    } else {
                        let node = self.node_mut(fid)?;
                        node.rel = rel;
                        node.file = None;
                    }
                }
                let mut e = ReplyEncoder::new(&mut self.out, op.r(), tag).u16(qids.len() as u16);
                for q in qids {
                    e = e.qid(q);
                }
                e.finish();
            }
            Op::Lopen => {
                let fid = r.u32().ok_or(bad)?;
                let flags = r.u32().ok_or(bad)?;
                let path = self.path(&self.node(fid)?.rel);
                let meta = fs::metadata(&path).map_err(|e| io_errno(&e))?;
                let node = self.node_mut(fid)?;
                if meta.is_dir() {
                    node.opened_dir = true;
                    node.listing = None;
                } else {
                    node.file = Some(open(&path, flags, false, 0)?);
                }
                self.reply(op, tag).qid(qid_of(&meta)).u32(0).finish();
            }
            Op::Lcreate => {
                let fid = r.u32().ok_or(bad)?;
                let name = component(r.str().ok_or(bad)?)?.to_string();
                let flags = r.u32().ok_or(bad)?;
                let mode = r.u32().ok_or(bad)?;
                let _gid = r.u32().ok_or(bad)?;
                let rel = self.node(fid)?.rel.join(&name);
                let path = self.path(&rel);
                let file = open(&path, flags, true, mode)?;
                let meta = file.metadata().map_err(|e| io_errno(&e))?;
                let node = self.node_mut(fid)?;
                node.rel = rel;
                node.file = Some(file);
                node.opened_dir = false;
                self.reply(op, tag).qid(qid_of(&meta)).u32(0).finish();
            }
            Op::Read => {
                let fid = r.u32().ok_or(bad)?;
                let offset = r.u64().ok_or(bad)?;
                let count = r.u32().ok_or(bad)?;
                let max = self.msize.saturating_sub(HEADER_BYTES as u32 + 4);
                let mut buf = vec![0u8; count.min(max) as usize];
                let file = self.node(fid)?.file.as_ref().ok_or(errno::EBADF)?;
                let n = read_full(file, &mut buf, offset).map_err(|e| io_errno(&e))?;
                self.reply(op, tag).u32(n as u32).bytes(&buf[..n]).finish();
            }
            Op::Write => {
                let fid = r.u32().ok_or(bad)?;
                let offset = r.u64().ok_or(bad)?;
                let count = r.u32().ok_or(bad)?;
                let data = r.bytes(count as usize).ok_or(bad)?;
                let file = self.node(fid)?.file.as_ref().ok_or(errno::EBADF)?;
                file.write_all_at(data, offset).map_err(|e| io_errno(&e))?;
                self.reply(op, tag).u32(count).finish();
            }
            Op::Fsync => {
                let fid = r.u32().ok_or(bad)?;
                let _datasync = r.u32().ok_or(bad)?;
                let node = self.node(fid)?;
                match &node.file {
                    Some(f) => f.sync_all().map_err(|e| io_errno(&e))?,
                    None if node.opened_dir => File::open(self.path(&node.rel))
                        .and_then(|d| d.sync_all())
                        .map_err(|e| io_errno(&e))?,
                    None => return Err(errno::EBADF),
                }
                self.reply(op, tag).finish();
            }
            Op::Getattr => {
                let fid = r.u32().ok_or(bad)?;
                let _mask = r.u64().ok_or(bad)?;
                let m = fs::metadata(self.path(&self.node(fid)?.rel)).map_err(|e| io_errno(&e))?;
                self.reply(op, tag)
                    .u64(GETATTR_BASIC)
                    .qid(qid_of(&m))
                    .u32(m.mode())
                    .u32(m.uid())
                    .u32(m.gid())
                    .u64(m.nlink())
                    .u64(m.rdev())
                    .u64(m.size())
                    .u64(m.blksize())
                    .u64(m.blocks())
                    .u64(m.atime() as u64)
                    .u64(m.atime_nsec() as u64)
                    .u64(m.mtime() as u64)
                    .u64(m.mtime_nsec() as u64)
                    .u64(m.ctime() as u64)
                    .u64(m.ctime_nsec() as u64)
                    .u64(0)
                    .u64(0)
                    .u64(0)
                    .u64(0)
                    .finish();
            }
            Op::Setattr => {
                let fid = r.u32().ok_or(bad)?;
                let valid = r.u32().ok_or(bad)?;
                let mode = r.u32().ok_or(bad)?;
                let _uid = r.u32().ok_or(bad)?;
                let _gid = r.u32().ok_or(bad)?;
                let size = r.u64().ok_or(bad)?;
                let path = self.path(&self.node(fid)?.rel);
                if valid & 0x1 != 0 {
                    fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777))
                        .map_err(|e| io_errno(&e))?;
                }
                if valid & 0x8 != 0 {
                    OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(size))
                        .map_err(|e| io_errno(&e))?;
                }
                self.reply(op, tag).finish();
            }
            Op::Statfs => {
                let fid = r.u32().ok_or(bad)?;
                let path = self.path(&self.node(fid)?.rel);
                let s = rustix::fs::statvfs(&path).map_err(|e| e.raw_os_error() as u32)?;
                self.reply(op, tag)
                    .u32(0)
                    .u32(s.f_frsize as u32)
                    .u64(s.f_blocks)
                    .u64(s.f_bfree)
                    .u64(s.f_bavail)
                    .u64(s.f_files)
                    .u64(s.f_ffree)
                    .u64(s.f_fsid)
                    .u32(s.f_namemax as u32)
                    .finish();
            }
            Op::Rename => {
                let fid = r.u32().ok_or(bad)?;
                let dfid = r.u32().ok_or(bad)?;
                let name = component(r.str().ok_or(bad)?)?;
                let to = self.node(dfid)?.rel.join(name);
                let from = self.node(fid)?.rel.clone();
                fs::rename(self.path(&from), self.path(&to)).map_err(|e| io_errno(&e))?;
                self.renamed(&from, &to);
                self.reply(op, tag).finish();
            }
            Op::Renameat => {
                let old_dir = r.u32().ok_or(bad)?;
                let old_name = component(r.str().ok_or(bad)?)?;
                let new_dir = r.u32().ok_or(bad)?;
                let new_name = component(r.str().ok_or(bad)?)?;
                let from = self.node(old_dir)?.rel.join(old_name);
                let to = self.node(new_dir)?.rel.join(new_name);
                fs::rename(self.path(&from), self.path(&to)).map_err(|e| io_errno(&e))?;
                self.renamed(&from, &to);
                self.reply(op, tag).finish();
            }
            Op::Unlinkat => {
                let dir = r.u32().ok_or(bad)?;
                let name = component(r.str().ok_or(bad)?)?;
                let flags = r.u32().ok_or(bad)?;
                let path = self.path(&self.node(dir)?.rel.join(name));
                let res = if flags & AT_REMOVEDIR != 0 {
                    fs::remove_dir(path)
                } else {
                    fs::remove_file(path)
                };
                res.map_err(|e| io_errno(&e))?;
                self.reply(op, tag).finish();
            }
            Op::Mkdir => {
                let dir = r.u32().ok_or(bad)?;
                let name = component(r.str().ok_or(bad)?)?;
                let mode = r.u32().ok_or(bad)?;
                let _gid = r.u32().ok_or(bad)?;
                let path = self.path(&self.node(dir)?.rel.join(name));
                fs::DirBuilder::new()
                    .mode(mode & 0o7777)
                    .create(&path)
                    .map_err(|e| io_errno(&e))?;
                let m = fs::metadata(&path).map_err(|e| io_errno(&e))?;
                self.reply(op, tag).qid(qid_of(&m)).finish();
            }
            Op::Readdir => {
                let fid = r.u32().ok_or(bad)?;
                let offset = r.u64().ok_or(bad)?;
                let count = r.u32().ok_or(bad)?;
                let dir = self.path(&self.node(fid)?.rel);
                let node = self.node_mut(fid)?;
                if !node.opened_dir {
                    return Err(errno::EBADF);
                }
                if offset == 0 || node.listing.is_none() {
                    node.listing = Some(list(&dir)?);
                }
                let listing = node.listing.as_deref().unwrap_or(&[]);
                let mut data = Vec::new();
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                for (i, (name, qid, kind)) in listing.iter().enumerate().skip(start) {
                    let entry = 13 + 8 + 1 + 2 + name.len();
                    if data.len() + entry > count as usize {
                        break;
                    }
                    let mut e = Vec::new();
                    ReplyEncoder::new(&mut e, 0, 0)
                        .qid(*qid)
                        .u64(i as u64 + 1)
                        .u8(*kind)
                        .str(name)
                        .finish();
                    data.extend_from_slice(&e[HEADER_BYTES..]);
                }
                ReplyEncoder::new(&mut self.out, op.r(), tag)
                    .u32(data.len() as u32)
                    .bytes(&data)
                    .finish();
            }
            Op::Clunk => {
                let fid = r.u32().ok_or(bad)?;
                self.fids.remove(&fid).ok_or(errno::EBADF)?;
                self.reply(op, tag).finish();
            }
        }
        Ok(())
    }

    fn insert(&mut self, fid: u32, rel: PathBuf) -> Res {
        if self.fids.contains_key(&fid) {
            return Err(errno::EEXIST);
        }
        self.fids.insert(
            fid,
            Node {
                rel,
                file: None,
                listing: None,
                opened_dir: false,
            },
        );
        Ok(())
    }
}

/// Opens `path` with Linux open flags (access mode, TRUNC, APPEND, EXCL
/// with `create`).
fn open(path: &Path, flags: u32, create: bool, mode: u32) -> Result<File, u32> {
    let mut o = OpenOptions::new();
    match flags & 3 {
        0 => o.read(true),
        1 => o.write(true),
        _ => o.read(true).write(true),
    };
    if flags & 0o1000 != 0 {
        o.truncate(true);
    }
    if flags & 0o2000 != 0 {
        o.append(true);
    }
    if create {
        if flags & 0o200 != 0 {
            o.create_new(true);
        } else {
            o.create(true);
        }
        o.mode(mode & 0o7777);
    }
    o.open(path).map_err(|e| io_errno(&e))
}

fn read_full(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], offset + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn list(dir: &Path) -> Result<Vec<(Vec<u8>, Qid, u8)>, u32> {
    let mut out = Vec::new();
    for dot in [".", ".."] {
        let m = fs::metadata(dir.join(dot)).map_err(|e| io_errno(&e))?;
        out.push((dot.as_bytes().to_vec(), qid_of(&m), 4));
    }
    let mut names = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| io_errno(&e))? {
        let e = e.map_err(|e| io_errno(&e))?;
        let m = e.metadata().map_err(|e| io_errno(&e))?;
        names.push((
            std::os::unix::ffi::OsStrExt::as_bytes(e.file_name().as_os_str()).to_vec(),
            qid_of(&m),
            d_type(&m),
        ));
    }
    names.sort_by(|a, b| a.0.cmp(&b.0));
    out.extend(names);
    Ok(out)
}

impl Transport for DirServer {
    fn max_message_bytes(&self) -> u32 {
        self.msize_max
    }

    fn transact(&mut self, request: &[u8], reply: &mut [u8]) -> Result<usize, TransportError> {
        let (t, tag) = match RequestReader::new(request) {
            Some((t, tag, _)) => (t, tag),
            None => return Err(TransportError("malformed request".into())),
        };
        if let Err(e) = self.handle(request) {
            ReplyEncoder::new(&mut self.out, RLERROR, tag)
                .u32(e)
                .finish();
        }
        if let Some(op) = Op::from_t(t) {
            if let Some(i) = self.manglers.iter().position(|(o, _)| *o == op) {
                let (_, mut f) = self.manglers.remove(i);
                f(&mut self.out);
            }
        }
        let n = self.out.len();
        let room = reply.len();
        let dst = reply.get_mut(..n).ok_or_else(|| {
            TransportError(format!(
                "a {n}-byte reply does not fit the {room}-byte buffer"
            ))
        })?;
        dst.copy_from_slice(&self.out);
        Ok(n)
    }
}
