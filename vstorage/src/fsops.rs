//! Host file-system steps whose order decides what survives a crash (std
//! only).
//!
//! A file's data is durable after `fsync` on the file, but its *name* is an
//! entry in its directory, durable only after `fsync` on the directory
//! (POSIX leaves it to the file system; Linux ext4 and XFS need it). So:
//!
//! - after a destination file is created, its directory is synced
//!   ([`created`]), so a crash cannot lose the new name while the caller
//!   goes on as if it existed;
//! - before a source file is deleted, the destination's data and directory
//!   are synced, then the source is removed and its directory synced
//!   ([`replace_source`]), so at every instant one complete copy has a
//!   durable name.
//!
//! The steps go through [`FileOps`] so a test double can record their
//! order; [`HostFileOps`] does them on the host.

use std::fs::File;
use std::io;
use std::path::Path;

/// The host file-system operations whose order matters for durability.
pub trait FileOps: Send + Sync {
    /// Creates `path` as a new, empty file; fails if it exists.
    fn create_new(&self, path: &Path) -> io::Result<()>;
    /// Makes the data and metadata of the file at `path` durable (fsync).
    fn sync_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of directory `dir` durable (fsync on the directory).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Removes the file at `path`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
}

/// [`FileOps`] on the host's file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostFileOps;

impl FileOps for HostFileOps {
    fn create_new(&self, path: &Path) -> io::Result<()> {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map(drop)
    }
    fn sync_file(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        // Linux opens a directory read-only for fsync.
        File::open(dir)?.sync_all()
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// After creating `path`: makes its name durable.
pub fn created(ops: &dyn FileOps, path: &Path) -> io::Result<()> {
    ops.sync_dir(parent_dir(path))
}

/// Deletes `source` once `dest` (its complete replacement, already written
/// and flushed) is durable under its name: syncs `dest` and its directory,
/// removes `source`, then syncs the source's directory.
pub fn replace_source(ops: &dyn FileOps, dest: &Path, source: &Path) -> io::Result<()> {
    ops.sync_file(dest)?;
    ops.sync_dir(parent_dir(dest))?;
    ops.remove_file(source)?;
    ops.sync_dir(parent_dir(source))
}

/// Removes a partial destination after a failure; a missing file is fine.
pub fn discard(ops: &dyn FileOps, path: &Path) -> io::Result<()> {
    match ops.remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
