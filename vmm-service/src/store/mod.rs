//! The node's stores: host directories the node reaches over 9P2000.L
//! (docs/DESIGN.md, "Node stores"), and the file operations VM disks and
//! storage migration need on them.
//!
//! At boot ([`Stores::boot`]) the service takes the platform's store
//! channels (`Host::take_stores`, one per virtio-9p device), connects a
//! `vstorage::p9` client to each, names them from the node command line
//! (`store=NAME:TAG:HOST_PATH`; a device not named there is named by its
//! mount tag) and prints one marker per store:
//! `vmm-service: store NAME (TAG) ready: N MiB free` (or `... unusable:
//! REASON`). From then on files are addressed as `STORE:path`
//! ([`StorePath`]) and opened as [`StoreFile`]s, which implement
//! `vstorage::BlockIo`, so the VHDX engine runs on them unchanged.
//!
//! Invariants:
//! - one client per store, shared by every open file of that store
//!   ([`Conn`]: the node has one CPU and one thread; `BlockIo::read_at`
//!   takes `&self`, so the client sits in a `RefCell` that each operation
//!   borrows for exactly one 9P exchange, never across calls);
//! - every fid an operation walks for itself is clunked before it returns,
//!   whatever happened; a [`StoreFile`] clunks its fid when dropped;
//! - paths are checked before anything is sent ([`vstorage::p9::split_path`]:
//!   no `..`, no empty or over-long names), so no request leaves the
//!   store's directory by name;
//! - durability follows `BlockIo`'s contract: [`StoreFile`]'s `flush` is a
//!   9P `Tfsync` of the file (QEMU: fsync(2) on the host file), and nothing
//!   else is; a new name is durable after [`Stores::sync_dir`] of its
//!   directory. QEMU's 9P server ignores `O_DIRECT`, so the host's page
//!   cache sits under every store: fsync is the only durability point;
//! - a file that must not be taken for whole until it is complete (a copy's
//!   destination) is written under its *partial* name,
//!   `NAME.partial-NODE` ([`Stores::create_partial`]), and gets its name
//!   only by [`Stores::commit_partial`] (fsync of the data, rename, fsync of
//!   the directory). A partial file is never complete: at boot every
//!   partial file of this node is removed from every store, and a marker
//!   line names it (`vmm-service: store NAME: removed PATH (left by an
//!   unfinished copy)`). Other nodes' partial files on a shared store are
//!   theirs and left alone;
//! - a full store is a typed error all the way up: `Rlerror` ENOSPC or
//!   EDQUOT is `StoreError::is_no_space` here and `IoError::NoSpace` from a
//!   [`StoreFile`] (so `DiskError::is_no_space` through the VHDX engine).

pub mod bench;
mod file;
pub mod files;
#[cfg(test)]
pub(crate) mod testing;

pub use file::{StoreFile, COPY_IO_BYTES};
pub use files::StoreFiles;

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt;
use hvcore::host::{Host, StoreChannel};
use vstorage::p9::{
    self, open_flags, split_path, Attr, Client, DirEntry, Fid, P9Error, StatFs, Transport,
    TransportError,
};

/// The msize the node asks for (the platform may cap it lower).
pub const MSIZE: u32 = 512 * 1024;
/// Longest store name (the same rules as a VM name: `a-z`, `0-9`, `-`).
pub const STORE_NAME_MAX: usize = 32;
/// Most stores a node uses.
pub const STORES_MAX: usize = 8;
/// Permission bits of files and directories the node creates.
pub const FILE_MODE: u32 = 0o644;
pub const DIR_MODE: u32 = 0o755;
/// What a partial file's name adds to the final name, before the node's
/// name: `disk.vhdx` becomes `disk.vhdx.partial-a` on node `a`.
pub const PARTIAL_MARK: &str = ".partial-";
/// Bounds of the search for partial files: directory levels below the
/// store's root, and directories listed in all (boot time stays bounded
/// whatever a store holds).
pub const PARTIAL_SCAN_DEPTH: usize = 8;
pub const PARTIAL_SCAN_DIRS: usize = 1024;

/// A platform store channel as the client's transport.
pub struct ChannelTransport(pub Box<dyn StoreChannel>);

impl fmt::Debug for ChannelTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelTransport({})", self.0.tag())
    }
}

impl Transport for ChannelTransport {
    fn max_message_bytes(&self) -> u32 {
        self.0.max_message_bytes()
    }
    fn transact(&mut self, request: &[u8], reply: &mut [u8]) -> Result<usize, TransportError> {
        self.0
            .transact(request, reply)
            .map_err(|e| TransportError(e.to_string()))
    }
}

/// One store's client, shared by the registry and its open files.
pub type Conn = Rc<RefCell<Client<ChannelTransport>>>;

/// What went wrong with a store operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// No store of that name on this node.
    NoSuchStore(String),
    /// The store exists but could not be attached at boot.
    Unusable { store: String, reason: String },
    /// A `STORE:path` or name that is not valid.
    BadPath(String),
    /// The 9P exchange failed (server error, malformed reply, device).
    P9 {
        store: String,
        path: String,
        error: P9Error,
    },
    /// The store's client is in use by an operation already under way
    /// (cannot happen on the node's single thread; reported, not panicked).
    Busy(String),
}

impl StoreError {
    /// The 9P error, when the server or the channel failed.
    pub fn p9(&self) -> Option<&P9Error> {
        match self {
            StoreError::P9 { error, .. } => Some(error),
            _ => None,
        }
    }
    /// Whether the store is full (ENOSPC, EDQUOT).
    pub fn is_no_space(&self) -> bool {
        self.p9().is_some_and(P9Error::is_no_space)
    }
    /// Whether the file or directory does not exist.
    pub fn is_not_found(&self) -> bool {
        self.p9().is_some_and(P9Error::is_not_found)
    }
    /// Whether the name is taken already (EEXIST).
    pub fn is_exists(&self) -> bool {
        self.p9().and_then(P9Error::errno) == Some(p9::errno::EEXIST)
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::NoSuchStore(s) => write!(f, "no store named '{s}' on this node"),
            StoreError::Unusable { store, reason } => {
                write!(f, "store {store} is unusable: {reason}")
            }
            StoreError::BadPath(m) => write!(f, "{m}"),
            StoreError::P9 { store, path, error } => {
                if path.is_empty() {
                    write!(f, "store {store}: {error}")
                } else {
                    write!(f, "store {store}: {path}: {error}")
                }
            }
            StoreError::Busy(s) => write!(f, "store {s} is busy"),
        }
    }
}

/// A file or directory on a store: `STORE:path` (`STORE` or `STORE:` alone
/// is the store's root).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorePath {
    pub store: String,
    /// Relative to the store's root, components joined by `/`.
    pub path: String,
}

impl StorePath {
    /// Parses and checks `STORE:path`.
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        let (store, path) = s.split_once(':').unwrap_or((s, ""));
        check_store_name(store)?;
        let parts = split_path(path).map_err(|e| StoreError::BadPath(format!("{s:.80}: {e}")))?;
        Ok(StorePath {
            store: store.into(),
            path: parts.join("/"),
        })
    }
    /// `store` and `path` (checked).
    pub fn new(store: &str, path: &str) -> Result<Self, StoreError> {
        check_store_name(store)?;
        let parts = split_path(path).map_err(|e| StoreError::BadPath(e.to_string()))?;
        Ok(StorePath {
            store: store.into(),
            path: parts.join("/"),
        })
    }
    /// The path's components.
    pub fn parts(&self) -> Vec<&str> {
        self.path.split('/').filter(|p| !p.is_empty()).collect()
    }
    /// (parent components, last name); `None` for the root.
    fn split_last(&self) -> Option<(Vec<&str>, &str)> {
        let mut parts = self.parts();
        let last = parts.pop()?;
        Some((parts, last))
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.store, self.path)
    }
}

/// Checks a store name: 1 to 32 of `a-z`, `0-9`, `-`.
pub fn check_store_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= STORE_NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadPath(format!(
            "'{name:.40}' is not a store name (1 to {STORE_NAME_MAX} of a-z, 0-9, -)"
        )))
    }
}

/// A `store=NAME:TAG:HOST_PATH` word of the node command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreSpec {
    pub name: String,
    pub tag: String,
    /// Where the store lives on the machine that exports it (reported,
    /// never used by the node). Percent-encoded on the command line.
    pub host_path: String,
}

/// Every valid `store=` word of `cmdline` (invalid ones are returned as
/// messages).
pub fn parse_specs(cmdline: &str) -> (Vec<StoreSpec>, Vec<String>) {
    let mut specs: Vec<StoreSpec> = Vec::new();
    let mut errors = Vec::new();
    for word in cmdline.split_ascii_whitespace() {
        let Some(v) = word.strip_prefix("store=") else {
            continue;
        };
        let mut it = v.splitn(3, ':');
        let (name, tag, path) = (
            it.next().unwrap_or(""),
            it.next().unwrap_or(""),
            it.next().unwrap_or(""),
        );
        if check_store_name(name).is_err() || tag.is_empty() || tag.len() > 64 {
            errors.push(format!(
                "store={v:.80}: expected NAME:TAG:HOST_PATH with NAME of a-z, 0-9, -"
            ));
        } else if specs.iter().any(|s| s.name == name || s.tag == tag) {
            errors.push(format!("store={v:.80}: name or tag given twice"));
        } else {
            specs.push(StoreSpec {
                name: name.into(),
                tag: tag.into(),
                host_path: percent_decode(path),
            });
        }
    }
    (specs, errors)
}

/// `%XX` escapes decoded (a malformed escape stays as written).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One store of the node.
#[derive(Debug)]
pub struct Store {
    pub name: String,
    pub tag: String,
    pub host_path: String,
    /// The client, or why the store could not be attached.
    conn: Result<Conn, String>,
}

/// A store as listed (`store-list`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreStatus {
    pub name: String,
    pub tag: String,
    pub host_path: String,
    /// The file system's size, free (for unprivileged writers) and used
    /// bytes (`Tstatfs`); zero with `error` set when it failed.
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub used_bytes: u64,
    pub error: Option<String>,
}

/// The node's stores.
#[derive(Debug, Default)]
pub struct Stores {
    stores: Vec<Store>,
    /// This node's name: the owner mark of its partial files.
    node: String,
}

impl Stores {
    /// No stores.
    pub fn none() -> Self {
        Self::default()
    }

    /// Takes the platform's store channels, attaches each, prints a marker
    /// line per store (and per `store=` word that names no device) and
    /// removes the partial files node `node` left on them (a line per file
    /// removed).
    pub fn boot(host: &mut dyn Host, cmdline: &str, node: &str) -> Self {
        let (specs, errors) = parse_specs(cmdline);
        for e in errors {
            host.console_write(&format!("vmm-service: {e}\n"));
        }
        let channels = host.take_stores();
        let stores = Self::attach(channels, &specs, node);
        for s in &stores.stores {
            let line = match &s.conn {
                Ok(_) => match stores.statfs(&s.name) {
                    Ok(st) => format!(
                        "vmm-service: store {} ({}) ready: {} MiB free\n",
                        s.name,
                        s.tag,
                        st.free_bytes() >> 20
                    ),
                    Err(e) => format!("vmm-service: store {} ({}) unusable: {e}\n", s.name, s.tag),
                },
                Err(e) => format!("vmm-service: store {} ({}) unusable: {e}\n", s.name, s.tag),
            };
            host.console_write(&line);
        }
        for spec in &specs {
            if !stores.stores.iter().any(|s| s.tag == spec.tag) {
                host.console_write(&format!(
                    "vmm-service: store {} ({}) missing: no store device with mount tag {}\n",
                    spec.name, spec.tag, spec.tag
                ));
            }
        }
        for s in stores.stores.iter().filter(|s| s.conn.is_ok()) {
            match stores.remove_partials(&s.name) {
                Ok(removed) => {
                    for p in removed {
                        host.console_write(&format!(
                            "vmm-service: store {}: removed {} (left by an unfinished copy)\n",
                            s.name, p.path
                        ));
                    }
                }
                Err(e) => host.console_write(&format!(
                    "vmm-service: store {}: cannot remove unfinished copies: {e}\n",
                    s.name
                )),
            }
        }
        stores
    }

    /// Connects a client to each channel and names it: from `specs` by
    /// mount tag, else by the tag itself (when it is a valid name), else
    /// `storeN`. `node` is this node's name (partial files carry it).
    pub fn attach(channels: Vec<Box<dyn StoreChannel>>, specs: &[StoreSpec], node: &str) -> Self {
        let mut stores: Vec<Store> = Vec::new();
        for (i, ch) in channels.into_iter().enumerate().take(STORES_MAX) {
            let tag: String = ch.tag().chars().take(64).collect();
            let spec = specs.iter().find(|s| s.tag == tag);
            let mut name = match spec {
                Some(s) => s.name.clone(),
                None if check_store_name(&tag).is_ok() => tag.clone(),
                None => format!("store{i}"),
            };
            if stores.iter().any(|s| s.name == name) {
                name = format!("store{i}");
            }
            let conn = Client::connect(ChannelTransport(ch), MSIZE, "")
                .map(|c| Rc::new(RefCell::new(c)))
                .map_err(|e| e.to_string());
            stores.push(Store {
                name,
                tag,
                host_path: spec.map(|s| s.host_path.clone()).unwrap_or_default(),
                conn,
            });
        }
        Stores {
            stores,
            node: node.into(),
        }
    }

    /// The stores, in device order.
    pub fn iter(&self) -> impl Iterator<Item = &Store> {
        self.stores.iter()
    }

    /// Whether the node has a store of that name.
    pub fn contains(&self, name: &str) -> bool {
        self.stores.iter().any(|s| s.name == name)
    }

    fn conn(&self, store: &str) -> Result<&Conn, StoreError> {
        let s = self
            .stores
            .iter()
            .find(|s| s.name == store)
            .ok_or_else(|| StoreError::NoSuchStore(store.chars().take(40).collect()))?;
        s.conn.as_ref().map_err(|reason| StoreError::Unusable {
            store: store.into(),
            reason: reason.clone(),
        })
    }

    /// Runs `f` on the store's client; a 9P error is reported with `path`.
    fn with<R>(
        &self,
        store: &str,
        path: &str,
        f: impl FnOnce(&Conn, &mut Client<ChannelTransport>) -> Result<R, P9Error>,
    ) -> Result<R, StoreError> {
        let conn = self.conn(store)?;
        let mut c = conn
            .try_borrow_mut()
            .map_err(|_| StoreError::Busy(store.into()))?;
        f(conn, &mut c).map_err(|error| StoreError::P9 {
            store: store.into(),
            path: path.into(),
            error,
        })
    }

    /// Every store with its file system's figures (a store whose statfs
    /// fails is listed with the error).
    pub fn status(&self) -> Vec<StoreStatus> {
        self.stores
            .iter()
            .map(|s| {
                let mut st = StoreStatus {
                    name: s.name.clone(),
                    tag: s.tag.clone(),
                    host_path: s.host_path.clone(),
                    total_bytes: 0,
                    free_bytes: 0,
                    used_bytes: 0,
                    error: None,
                };
                match self.statfs(&s.name) {
                    Ok(f) => {
                        st.total_bytes = f.total_bytes();
                        st.free_bytes = f.free_bytes();
                        st.used_bytes = f.used_bytes();
                    }
                    Err(e) => st.error = Some(e.to_string()),
                }
                st
            })
            .collect()
    }

    /// The file system holding the store.
    pub fn statfs(&self, store: &str) -> Result<StatFs, StoreError> {
        self.with(store, "", |_, c| c.statfs(c.root()))
    }

    /// Opens an existing file, read-write or read-only.
    pub fn open(&self, at: &StorePath, writable: bool) -> Result<StoreFile, StoreError> {
        let flags = if writable {
            open_flags::RDWR
        } else {
            open_flags::RDONLY
        };
        self.with(&at.store, &at.path, |conn, c| {
            let fid = c.walk(c.root(), &at.parts())?;
            match c.lopen(fid, flags) {
                Ok(o) if o.qid.is_dir() => {
                    let _ = c.clunk(fid);
                    Err(P9Error::Server {
                        op: "lopen",
                        errno: p9::errno::EISDIR,
                    })
                }
                Ok(_) => Ok(StoreFile::new(conn.clone(), fid, writable, at.clone())),
                Err(e) => {
                    let _ = c.clunk(fid);
                    Err(e)
                }
            }
        })
    }

    /// Creates a file and opens it read-write: a new one (`EEXIST` if the
    /// name is taken) when `exclusive`, else created or truncated. Its name
    /// is durable only after [`Stores::sync_dir`] of its directory.
    pub fn create(&self, at: &StorePath, exclusive: bool) -> Result<StoreFile, StoreError> {
        let Some((dir, name)) = at.split_last() else {
            return Err(StoreError::BadPath(format!("{at}: names no file")));
        };
        let flags = open_flags::RDWR
            | open_flags::CREAT
            | if exclusive {
                open_flags::EXCL
            } else {
                open_flags::TRUNC
            };
        self.with(&at.store, &at.path, |conn, c| {
            let fid = c.walk(c.root(), &dir)?;
            match c.lcreate(fid, name, flags, FILE_MODE) {
                Ok(_) => Ok(StoreFile::new(conn.clone(), fid, true, at.clone())),
                Err(e) => {
                    let _ = c.clunk(fid);
                    Err(e)
                }
            }
        })
    }

    /// Runs `f` on a fid for the directory holding `at` and its last name.
    fn in_parent<R>(
        &self,
        at: &StorePath,
        f: impl FnOnce(&mut Client<ChannelTransport>, Fid, &str) -> Result<R, P9Error>,
    ) -> Result<R, StoreError> {
        let Some((dir, name)) = at.split_last() else {
            return Err(StoreError::BadPath(format!("{at}: the store's root")));
        };
        self.with(&at.store, &at.path, |_, c| {
            let fid = c.walk(c.root(), &dir)?;
            let r = f(c, fid, name);
            let _ = c.clunk(fid);
            r
        })
    }

    /// Deletes a file.
    pub fn remove(&self, at: &StorePath) -> Result<(), StoreError> {
        self.in_parent(at, |c, dir, name| c.unlinkat(dir, name, false))
    }

    /// Deletes an empty directory.
    pub fn remove_dir(&self, at: &StorePath) -> Result<(), StoreError> {
        self.in_parent(at, |c, dir, name| c.unlinkat(dir, name, true))
    }

    /// Creates a directory (its parent must exist).
    pub fn mkdir(&self, at: &StorePath) -> Result<(), StoreError> {
        self.in_parent(at, |c, dir, name| c.mkdir(dir, name, DIR_MODE).map(drop))
    }

    /// Creates a directory and any missing parents (existing ones are
    /// fine).
    pub fn mkdir_all(&self, at: &StorePath) -> Result<(), StoreError> {
        let parts = at.parts();
        for n in 1..=parts.len() {
            let sub = StorePath {
                store: at.store.clone(),
                path: parts[..n].join("/"),
            };
            match self.mkdir(&sub) {
                Ok(()) => {}
                Err(e) if e.p9().and_then(P9Error::errno) == Some(p9::errno::EEXIST) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Renames within one store (rename(2): an existing target file is
    /// replaced atomically).
    pub fn rename(&self, from: &StorePath, to: &StorePath) -> Result<(), StoreError> {
        if from.store != to.store {
            return Err(StoreError::BadPath(format!(
                "cannot rename {from} to {to}: files move between stores by copying"
            )));
        }
        let (Some((from_dir, from_name)), Some((to_dir, to_name))) =
            (from.split_last(), to.split_last())
        else {
            return Err(StoreError::BadPath(format!(
                "cannot rename a store's root ({from} to {to})"
            )));
        };
        self.with(&from.store, &from.path, |_, c| {
            let a = c.walk(c.root(), &from_dir)?;
            let b = match c.walk(c.root(), &to_dir) {
                Ok(b) => b,
                Err(e) => {
                    let _ = c.clunk(a);
                    return Err(e);
                }
            };
            let r = c.renameat(a, from_name, b, to_name);
            let _ = c.clunk(a);
            let _ = c.clunk(b);
            r
        })
    }

    /// The entries of a directory (without `.` and `..`).
    pub fn read_dir(&self, at: &StorePath) -> Result<Vec<DirEntry>, StoreError> {
        self.with(&at.store, &at.path, |_, c| {
            let fid = c.walk(c.root(), &at.parts())?;
            let r = c
                .lopen(fid, open_flags::RDONLY | open_flags::DIRECTORY)
                .and_then(|_| c.readdir(fid));
            let _ = c.clunk(fid);
            r
        })
    }

    /// Makes a directory's entries durable (fsync on the directory): after
    /// creating, renaming or removing a name in it.
    pub fn sync_dir(&self, at: &StorePath) -> Result<(), StoreError> {
        self.with(&at.store, &at.path, |_, c| {
            let fid = c.walk(c.root(), &at.parts())?;
            let r = c
                .lopen(fid, open_flags::RDONLY | open_flags::DIRECTORY)
                .and_then(|_| c.fsync(fid));
            let _ = c.clunk(fid);
            r
        })
    }

    /// The attributes of a file or directory (`is_not_found` on the error
    /// when it does not exist).
    pub fn metadata(&self, at: &StorePath) -> Result<Attr, StoreError> {
        self.with(&at.store, &at.path, |_, c| {
            let fid = c.walk(c.root(), &at.parts())?;
            let r = c.getattr(fid);
            let _ = c.clunk(fid);
            r
        })
    }

    /// The partial name of `at` on this node: `NAME.partial-NODE` in the
    /// same directory.
    pub fn partial_of(&self, at: &StorePath) -> Result<StorePath, StoreError> {
        if at.split_last().is_none() {
            return Err(StoreError::BadPath(format!("{at}: names no file")));
        }
        StorePath::new(
            &at.store,
            &format!("{}{PARTIAL_MARK}{}", at.path, self.node),
        )
    }

    /// Creates `at`'s partial file (a new one: `is_exists` on the error if
    /// it is there already, e.g. a copy of the same file under way) and
    /// opens it read-write. Its parent directory must exist. The file is
    /// `at` only after [`Stores::commit_partial`]; removed without a
    /// commit (a cancelled copy: [`Stores::remove`] of
    /// [`StoreFile::path`]) or at the node's next boot, it never was.
    pub fn create_partial(&self, at: &StorePath) -> Result<StoreFile, StoreError> {
        let partial = self.partial_of(at)?;
        self.create(&partial, true)
    }

    /// Gives the partial file `file` (from [`Stores::create_partial`] for
    /// `at`) its final name, durably: `Tfsync` of the file (its data and
    /// size), rename over `at` (an existing `at` is replaced atomically),
    /// `Tfsync` of the directory. `file` stays open and usable, now as
    /// `at`. On an error `at` is either untouched or, if only the last
    /// fsync failed, renamed but perhaps not durably.
    pub fn commit_partial(&self, file: &mut StoreFile, at: &StorePath) -> Result<(), StoreError> {
        let partial = self.partial_of(at)?;
        if *file.path() != partial {
            return Err(StoreError::BadPath(format!(
                "{} is not the partial file of {at}",
                file.path()
            )));
        }
        if let Err(e) = vstorage::BlockIo::flush(file) {
            return Err(match file.last_error() {
                Some(error) => StoreError::P9 {
                    store: partial.store.clone(),
                    path: partial.path.clone(),
                    error,
                },
                None => StoreError::Busy(format!("{}: {e}", partial.store)),
            });
        }
        self.rename(&partial, at)?;
        file.set_path(at.clone());
        let dir = at
            .split_last()
            .map(|(dir, _)| dir.join("/"))
            .unwrap_or_default();
        self.sync_dir(&StorePath {
            store: at.store.clone(),
            path: dir,
        })
    }

    /// This node's partial files on `store`, anywhere below its root (at
    /// most [`PARTIAL_SCAN_DEPTH`] levels down and [`PARTIAL_SCAN_DIRS`]
    /// directories listed), in the order found.
    pub fn find_partials(&self, store: &str) -> Result<Vec<StorePath>, StoreError> {
        let mark = format!("{PARTIAL_MARK}{}", self.node);
        let mut found = Vec::new();
        // (directory, depth) still to list; the root first.
        let mut todo: Vec<(String, usize)> = alloc::vec![(String::new(), 0)];
        let mut listed = 0usize;
        while let Some((dir, depth)) = todo.pop() {
            if listed == PARTIAL_SCAN_DIRS {
                break;
            }
            listed += 1;
            let entries = self.read_dir(&StorePath {
                store: store.into(),
                path: dir.clone(),
            })?;
            for e in entries {
                let path = if dir.is_empty() {
                    e.name.clone()
                } else {
                    format!("{dir}/{}", e.name)
                };
                let is_dir = e.kind == 4 || (e.kind == 0 && e.qid.is_dir());
                if is_dir {
                    if depth + 1 < PARTIAL_SCAN_DEPTH {
                        todo.push((path, depth + 1));
                    }
                } else if e.name.len() > mark.len() && e.name.ends_with(&mark) {
                    // Names the server sent that are not valid here
                    // (replaced bytes, over-long) cannot be removed by
                    // name: skipped.
                    if let Ok(p) = StorePath::new(store, &path) {
                        found.push(p);
                    }
                }
            }
        }
        Ok(found)
    }

    /// Removes this node's partial files from `store` ([`Stores::find_partials`])
    /// and makes their removal durable; returns what it removed.
    pub fn remove_partials(&self, store: &str) -> Result<Vec<StorePath>, StoreError> {
        let found = self.find_partials(store)?;
        let mut dirs: Vec<String> = Vec::new();
        for p in &found {
            self.remove(p)?;
            let dir = p.split_last().map(|(d, _)| d.join("/")).unwrap_or_default();
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        for dir in dirs {
            self.sync_dir(&StorePath {
                store: store.into(),
                path: dir,
            })?;
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests;
