//! A [`FileStore`] of files in memory, for the host tests of disks and
//! storage migration.

use crate::disks::{FileStore, MemFile};
use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use vstorage::BlockIo;

/// Files by location; partial files are `LOCATION.partial-a`. Clones
/// share the files.
#[derive(Clone)]
pub struct MemFiles {
    pub files: Rc<RefCell<BTreeMap<String, MemFile>>>,
    /// Room of each new file.
    pub limit: u64,
}

impl MemFiles {
    pub fn new(limit: u64) -> Self {
        Self {
            files: Rc::new(RefCell::new(BTreeMap::new())),
            limit,
        }
    }
    pub fn names(&self) -> Vec<String> {
        self.files.borrow().keys().cloned().collect()
    }
    pub fn bytes(&self, at: &str) -> Vec<u8> {
        self.files.borrow()[at].bytes()
    }
}

impl FileStore for MemFiles {
    fn has_store(&self, store: &str) -> bool {
        matches!(store, "local" | "shared")
    }
    fn default_store(&self) -> Option<String> {
        Some("local".into())
    }
    fn file_bytes(&self, at: &str) -> Option<u64> {
        self.files.borrow().get(at).and_then(|f| f.len().ok())
    }
    fn create_partial(&self, to: &str) -> Result<Box<dyn BlockIo>, String> {
        let f = MemFile::new(self.limit).map_err(|e| e.to_string())?;
        let name = format!("{to}.partial-a");
        if self.files.borrow().contains_key(&name) {
            return Err(format!("{name} exists"));
        }
        self.files.borrow_mut().insert(name, f.clone());
        Ok(Box::new(f))
    }
    fn replace_partial(&self, to: &str) -> Result<Box<dyn BlockIo>, String> {
        self.create_partial(to)
    }
    fn read(&self, at: &str, max_bytes: usize) -> Result<Vec<u8>, String> {
        let files = self.files.borrow();
        let f = files.get(at).ok_or_else(|| format!("{at}: no such file"))?;
        let bytes = f.bytes();
        if bytes.len() > max_bytes {
            return Err(format!("{at}: larger than {max_bytes} bytes"));
        }
        Ok(bytes)
    }
    fn open(&self, at: &str) -> Result<Box<dyn BlockIo>, String> {
        let files = self.files.borrow();
        let f = files.get(at).ok_or_else(|| format!("{at}: no such file"))?;
        Ok(Box::new(f.clone()))
    }
    fn commit_partial(&self, to: &str) -> Result<(), String> {
        let f = self
            .files
            .borrow_mut()
            .remove(&format!("{to}.partial-a"))
            .ok_or("no partial file")?;
        self.files.borrow_mut().insert(to.into(), f);
        Ok(())
    }
    fn remove_partial(&self, to: &str) {
        self.files.borrow_mut().remove(&format!("{to}.partial-a"));
    }
    fn remove(&self, at: &str) -> Result<(), String> {
        self.files
            .borrow_mut()
            .remove(at)
            .map(drop)
            .ok_or_else(|| format!("no file {at}"))
    }
}
