//! Storage live migration of one disk file on the host (MISSION "Storage
//! live migration"): the destination file is created with the source's
//! parameters, the guest keeps running through a [`SharedDisk`] while
//! [`StorageMigration::run_copy`] copies, every write is mirrored, then
//! [`StorageMigration::complete`] switches I/O to the destination and
//! deletes the source (or keeps it, by option).
//!
//! Whatever goes wrong before switch-over — a failed copy, a failed
//! mirrored write, a cancel — the destination file is deleted and the guest
//! stays on the source, which holds every acknowledged write.

use std::path::{Path, PathBuf};
use std::string::ToString;
use std::sync::Arc;

use super::{MirrorError, MirrorState, Progress, SharedDisk, SharedMirror};
use crate::copy::{
    check_geometry, create_child_like_with, create_like_with, own_ranges, CopyJob, CopyOptions,
    HostDisk,
};
use crate::fsops::{self, FileOps, HostFileOps};
use crate::io::{DiskError, VirtualDisk};

/// How a storage migration runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrationOptions {
    /// Chunk size of the one-pass copy.
    pub copy: CopyOptions,
    /// Keep the source file after switch-over instead of deleting it.
    pub keep_source: bool,
}

/// One disk file moving to a new location while the guest uses it.
pub struct StorageMigration {
    mirror: SharedMirror<HostDisk, HostDisk>,
    source_path: PathBuf,
    dest_path: PathBuf,
    opts: MigrationOptions,
    ops: Arc<dyn FileOps>,
}

/// A host file operation's failure, as a [`MirrorError`].
pub(super) fn file_err(op: &'static str, path: &Path, e: impl ToString) -> MirrorError {
    MirrorError::File {
        op,
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

impl StorageMigration {
    /// Starts migrating `source` (the open disk the guest runs on, whose
    /// file is `source_path`) to a new file `dest_path` of the same kind and
    /// parameters. From now on the guest must do its I/O through
    /// [`StorageMigration::disk`]. On error the source is handed back
    /// untouched and no destination file is left. A differencing source is
    /// moved flattened (its chain's data in one dynamic file); to keep the
    /// chain, use [`StorageMigration::start_differencing`].
    pub fn start(
        source: HostDisk,
        source_path: &Path,
        dest_path: &Path,
        opts: MigrationOptions,
    ) -> Result<Self, (MirrorError, HostDisk)> {
        Self::start_with(source, source_path, dest_path, opts, Arc::new(HostFileOps))
    }

    /// [`StorageMigration::start`] with the file-system steps (create,
    /// sync, delete) done through `ops`, for the whole migration.
    pub fn start_with(
        mut source: HostDisk,
        source_path: &Path,
        dest_path: &Path,
        opts: MigrationOptions,
        ops: Arc<dyn FileOps>,
    ) -> Result<Self, (MirrorError, HostDisk)> {
        let job = match CopyJob::for_disk(&mut source, opts.copy) {
            Ok(job) => job,
            Err(e) => return Err((e.into(), source)),
        };
        let dest = create_like_with(&source, dest_path, &*ops);
        Self::begin(source, job, dest, source_path, dest_path, opts, ops)
    }

    /// Like [`StorageMigration::start`] for a differencing disk whose
    /// parent chain was already moved (parents are read-only: move them
    /// with [`crate::copy::copy_differencing`], base first). The
    /// destination is created as a differencing disk of `dest_parent`, and
    /// only the blocks the source holds itself are copied; the rest reads
    /// through the moved chain.
    pub fn start_differencing(
        source: HostDisk,
        source_path: &Path,
        dest_path: &Path,
        dest_parent: &Path,
        opts: MigrationOptions,
    ) -> Result<Self, (MirrorError, HostDisk)> {
        // The plan is read from the file by a second, read-only open: make
        // the guest's earlier writes (and the blocks they allocated) durable
        // there first. Read before the first mirrored write: blocks
        // allocated later lie outside the plan, so their writes are mirrored.
        let mut source = source;
        if let Err(e) = source.flush() {
            return Err((file_err("flush", source_path, e), source));
        }
        let ranges = match own_ranges(source_path) {
            Ok(r) => r,
            Err(e) => return Err((file_err("read", source_path, e), source)),
        };
        let job = CopyJob::new(
            &ranges,
            source.virtual_size(),
            source.logical_sector_size(),
            CopyOptions {
                // An unwritten range of a differencing destination reads its
                // parent: the child's zeros must be written.
                skip_zero_chunks: false,
                ..opts.copy
            },
        );
        let ops: Arc<dyn FileOps> = Arc::new(HostFileOps);
        let dest = create_child_like_with(&source, dest_path, dest_parent, &*ops);
        Self::begin(source, job, dest, source_path, dest_path, opts, ops)
    }

    fn begin(
        source: HostDisk,
        job: CopyJob,
        dest: Result<HostDisk, DiskError>,
        source_path: &Path,
        dest_path: &Path,
        opts: MigrationOptions,
        ops: Arc<dyn FileOps>,
    ) -> Result<Self, (MirrorError, HostDisk)> {
        let dest = match dest {
            Ok(d) => d,
            Err(e) => return Err((file_err("create", dest_path, e), source)),
        };
        if let Err(e) = check_geometry(&source, &dest) {
            drop(dest);
            // Best effort: the geometry error is the one to report.
            let _ = fsops::discard(&*ops, dest_path);
            return Err((e.into(), source));
        }
        Ok(StorageMigration {
            mirror: SharedMirror::with_plan(source, dest, job),
            source_path: source_path.to_path_buf(),
            dest_path: dest_path.to_path_buf(),
            opts,
            ops,
        })
    }

    /// The guest's disk: the source until switch-over, the destination after.
    pub fn disk(&self) -> SharedDisk<HostDisk, HostDisk> {
        self.mirror.disk()
    }

    /// The mirror, for a copy thread of the caller's own.
    pub fn mirror(&self) -> &SharedMirror<HostDisk, HostDisk> {
        &self.mirror
    }

    /// Progress snapshot (the job's percentage, mirrored writes, state).
    pub fn progress(&self) -> Progress {
        self.mirror.progress()
    }

    /// Runs the one-pass copy to the end (call it on a worker thread). On
    /// failure the destination file is deleted and the error returned; the
    /// guest stays on the source.
    pub fn run_copy(&self) -> Result<(), MirrorError> {
        let result = self.mirror.run_to_mirrored();
        if result.is_err() || self.mirror.state() == MirrorState::Failed {
            self.discard_dest(self.mirror.take_discarded())?;
        }
        result
    }

    /// Deletes the destination file once the mirror has let go of it
    /// (after a failure or cancel).
    fn discard_dest(&self, dest: Option<HostDisk>) -> Result<(), MirrorError> {
        if let Some(dest) = dest {
            drop(dest);
            fsops::discard(&*self.ops, &self.dest_path)
                .map_err(|e| file_err("delete", &self.dest_path, e))?;
        }
        Ok(())
    }

    /// Cancels: the guest stays on the source; the destination is deleted.
    /// Also the way to clean up after a failure seen in [`Self::progress`].
    pub fn cancel(&self) -> Result<(), MirrorError> {
        let dest = self.mirror.cancel()?;
        self.discard_dest(dest)
    }

    /// Switches the guest's I/O to the destination (waiting for writes in
    /// flight), then deletes the source file unless
    /// [`MigrationOptions::keep_source`], only once the destination and its
    /// directory entry are durable ([`fsops::replace_source`]). Only in
    /// [`MirrorState::Mirrored`].
    pub fn complete(&self) -> Result<(), MirrorError> {
        let mut source = self.mirror.switch_over()?;
        // Best effort: the source is no longer the disk; a close error only
        // matters for a kept source, and then it is reported.
        let closed = source.close();
        drop(source);
        if self.opts.keep_source {
            return closed.map_err(|e| file_err("close", &self.source_path, e));
        }
        fsops::replace_source(&*self.ops, &self.dest_path, &self.source_path)
            .map_err(|e| file_err("delete", &self.source_path, e))
    }

    /// Where the disk is going.
    pub fn dest_path(&self) -> &Path {
        &self.dest_path
    }

    /// Where the disk comes from.
    pub fn source_path(&self) -> &Path {
        &self.source_path
    }
}

impl Drop for StorageMigration {
    /// A migration dropped after a failure (a mirrored write can fail after
    /// the copy finished) still deletes its destination.
    fn drop(&mut self) {
        // Best effort: nobody is left to report an error to.
        let _ = self.discard_dest(self.mirror.take_discarded());
    }
}
