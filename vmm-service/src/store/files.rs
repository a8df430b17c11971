//! [`StoreFiles`]: the node's stores as the [`FileStore`] that VM disks
//! (`crate::disks`) and storage migration (`crate::storage_migration`)
//! keep their files on. A location is `STORE:path` ([`StorePath`]).
//!
//! A new file (a disk being created, a migration's destination) is written
//! under its partial name (`NAME.partial-NODE`, [`Stores::create_partial`])
//! and named by [`Stores::commit_partial`] only once complete, so a node
//! that stops half-way leaves only partial files, which its next boot
//! removes.
//!
//! Invariants:
//! - `create_partial` refuses a location whose final file exists: a new
//!   disk or a migration never replaces a file it did not write (a kept
//!   source, another VM's disk);
//! - the adapter keeps a handle on each partial file it opened until that
//!   file is committed or removed: the commit needs the open file itself
//!   (its data is fsynced through its own fid, and the file is renamed
//!   under that fid, so the disk writing it goes on writing the same file
//!   under its final name);
//! - a full store stays recognisable: messages of failures the server
//!   reported as ENOSPC/EDQUOT start with `store full:`.

use super::{StoreError, StoreFile, StorePath, Stores};
use crate::disks::FileStore;
use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::RefCell;
use vstorage::{BlockIo, IoError};

/// The store a new disk goes to when none is named (`cluster up` names
/// each node's own store so).
pub const DEFAULT_STORE: &str = "local";

/// The node's stores as a [`FileStore`] (see the module doc).
pub struct StoreFiles {
    stores: Rc<Stores>,
    /// Partial files open now, by final location.
    partials: RefCell<Vec<(StorePath, Rc<RefCell<StoreFile>>)>>,
}

impl StoreFiles {
    /// Files on `stores`.
    pub fn new(stores: Rc<Stores>) -> Self {
        StoreFiles {
            stores,
            partials: RefCell::new(Vec::new()),
        }
    }

    /// The stores.
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    fn take_partial(&self, at: &StorePath) -> Option<Rc<RefCell<StoreFile>>> {
        let mut open = self.partials.borrow_mut();
        let i = open.iter().position(|(p, _)| p == at)?;
        Some(open.swap_remove(i).1)
    }

    /// The directory holding `at` (the store's root for a file there).
    /// Create `at`'s partial file (its directory made first) and keep a
    /// handle on it until its commit; `busy` names the work another
    /// partial file of `at` means ("a copy to", "a rewrite of").
    fn open_partial(&self, at: StorePath, busy: &str) -> Result<Box<dyn BlockIo>, String> {
        self.stores
            .mkdir_all(&Self::parent(&at))
            .map_err(|e| message(&e))?;
        let file = self.stores.create_partial(&at).map_err(|e| {
            if e.is_exists() {
                format!("{busy} {at} is under way already")
            } else {
                message(&e)
            }
        })?;
        let file = Rc::new(RefCell::new(file));
        self.partials.borrow_mut().push((at, file.clone()));
        Ok(Box::new(PartialFile(file)))
    }

    fn parent(at: &StorePath) -> StorePath {
        let dir = at.path.rsplit_once('/').map_or("", |(d, _)| d);
        StorePath {
            store: at.store.clone(),
            path: dir.into(),
        }
    }
}

/// A store error as a message, `store full: ...` when the store is full.
fn message(e: &StoreError) -> String {
    if e.is_no_space() {
        format!("store full: {e}")
    } else {
        e.to_string()
    }
}

fn parse(at: &str) -> Result<StorePath, String> {
    let p = StorePath::parse(at).map_err(|e| message(&e))?;
    if p.path.is_empty() {
        return Err(format!("{at:.80}: names a store, not a file"));
    }
    Ok(p)
}

/// A partial file as the disk that writes it sees it: a handle shared
/// with [`StoreFiles`] until the commit.
struct PartialFile(Rc<RefCell<StoreFile>>);

impl PartialFile {
    fn busy(op: &'static str) -> IoError {
        IoError::Host {
            op,
            detail: "the file is being renamed".into(),
        }
    }
}

impl BlockIo for PartialFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let f = self.0.try_borrow().map_err(|_| Self::busy("read"))?;
        f.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        let mut f = self.0.try_borrow_mut().map_err(|_| Self::busy("write"))?;
        f.write_at(offset, data)
    }
    fn flush(&mut self) -> Result<(), IoError> {
        let mut f = self.0.try_borrow_mut().map_err(|_| Self::busy("flush"))?;
        f.flush()
    }
    fn len(&self) -> Result<u64, IoError> {
        let f = self.0.try_borrow().map_err(|_| Self::busy("stat"))?;
        f.len()
    }
    fn set_len(&mut self, len: u64) -> Result<(), IoError> {
        let mut f = self.0.try_borrow_mut().map_err(|_| Self::busy("set_len"))?;
        f.set_len(len)
    }
    fn allocate(&mut self, offset: u64, len_bytes: u64) -> Result<(), IoError> {
        let mut f = self
            .0
            .try_borrow_mut()
            .map_err(|_| Self::busy("allocate"))?;
        f.allocate(offset, len_bytes)
    }
}

impl FileStore for StoreFiles {
    fn has_store(&self, store: &str) -> bool {
        self.stores.contains(store)
    }

    fn default_store(&self) -> Option<String> {
        let usable = |s: &&super::Store| s.conn.is_ok();
        self.stores
            .iter()
            .filter(usable)
            .find(|s| s.name == DEFAULT_STORE)
            .or_else(|| self.stores.iter().find(usable))
            .map(|s| s.name.clone())
    }

    fn create_partial(&self, to: &str) -> Result<Box<dyn BlockIo>, String> {
        let at = parse(to)?;
        match self.stores.metadata(&at) {
            Ok(_) => {
                return Err(format!(
                    "{at} exists: pick another place, or remove the file first"
                ))
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(message(&e)),
        }
        self.open_partial(at, "a copy to")
    }

    fn replace_partial(&self, to: &str) -> Result<Box<dyn BlockIo>, String> {
        self.open_partial(parse(to)?, "a rewrite of")
    }

    fn read(&self, at: &str, max_bytes: usize) -> Result<Vec<u8>, String> {
        let at = parse(at)?;
        let file = self.stores.open(&at, false).map_err(|e| message(&e))?;
        let len = file.len().map_err(|e| format!("{at}: {e}"))?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= max_bytes)
            .ok_or_else(|| format!("{at}: larger than {max_bytes} bytes"))?;
        let mut bytes = alloc::vec![0u8; len];
        file.read_at(0, &mut bytes)
            .map_err(|e| format!("{at}: {e}"))?;
        Ok(bytes)
    }

    fn open(&self, at: &str) -> Result<Box<dyn BlockIo>, String> {
        let at = parse(at)?;
        let file = self.stores.open(&at, true).map_err(|e| message(&e))?;
        Ok(Box::new(file))
    }

    fn commit_partial(&self, to: &str) -> Result<(), String> {
        let at = parse(to)?;
        let file = self
            .take_partial(&at)
            .ok_or_else(|| format!("no partial file of {at} is open"))?;
        let mut file = file
            .try_borrow_mut()
            .map_err(|_| format!("the partial file of {at} is in use"))?;
        self.stores
            .commit_partial(&mut file, &at)
            .map_err(|e| message(&e))
    }

    fn remove_partial(&self, to: &str) {
        let Ok(at) = parse(to) else {
            return;
        };
        drop(self.take_partial(&at));
        let removed = self
            .stores
            .partial_of(&at)
            .and_then(|p| self.stores.remove(&p))
            .and_then(|()| self.stores.sync_dir(&Self::parent(&at)));
        if let Err(e) = removed {
            if !e.is_not_found() {
                log::warn!(
                    "cannot remove the partial file of {at} (the node's next boot will): {e}"
                );
            }
        }
    }

    fn remove(&self, at: &str) -> Result<(), String> {
        let at = parse(at)?;
        self.stores.remove(&at).map_err(|e| message(&e))?;
        let dir = Self::parent(&at);
        self.stores.sync_dir(&dir).map_err(|e| message(&e))?;
        // A VM's own directory (`vms/VM`, the default layout) goes with
        // its last file; anything else the operator made stays.
        if dir.path.starts_with("vms/")
            && dir.parts().len() == 2
            && self.stores.remove_dir(&dir).is_ok()
        {
            let _ = self.stores.sync_dir(&Self::parent(&dir));
        }
        Ok(())
    }

    fn file_bytes(&self, at: &str) -> Option<u64> {
        let at = parse(at).ok()?;
        self.stores.metadata(&at).ok().map(|a| a.size)
    }
}

#[cfg(test)]
mod tests;
