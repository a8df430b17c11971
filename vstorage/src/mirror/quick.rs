//! Quick storage migration (MISSION "Quick storage migration"): a
//! checkpoint puts every new write into a differencing disk, so the base
//! can be copied while the guest runs; then, with the guest saved, the
//! checkpoint's data is folded into the copied base and the guest resumes
//! on it.
//!
//! ```text
//!   checkpoint ──> copy_base (guest runs on the child) ──> finish (guest saved)
//!        \                          \
//!         `──────── cancel ──────────`──> destination deleted, guest stays
//!                                         on child + base ("vhdx merge CHILD"
//!                                         folds the checkpoint back later)
//! ```
//!
//! `finish` folds the child straight into the destination base instead of
//! copying the child file and merging it there: the result is the same file
//! (the base as of the checkpoint plus every later write) with one copy of
//! the child's data instead of two. Reading the ranges the child holds
//! *through the chain* is exact even for partially present blocks: their
//! other sectors come from the base, which is frozen since the checkpoint
//! and so already identical on the destination.
//!
//! Invariant: the base is never written after the checkpoint; downtime (the
//! `finish` step) is proportional to [`QuickMigration::child_bytes`].

use super::host::file_err;
use super::MirrorError;
use crate::copy::{
    check_geometry, copy_disk_pipelined, copy_plan, create_like_with, open_disk, own_ranges,
    CopyJob, CopyOptions, HostDisk,
};
use crate::fsops::{self, FileOps, HostFileOps};
use crate::io::VirtualDisk;
use crate::vhdx;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a quick migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuickState {
    /// The guest writes to the checkpoint; the base is not copied yet.
    Checkpointed,
    /// The base is on the destination; waiting for the guest to be saved.
    BaseCopied,
}

/// A quick storage migration of one VHDX base disk.
pub struct QuickMigration {
    base: PathBuf,
    child: PathBuf,
    dest: PathBuf,
    opts: CopyOptions,
    state: QuickState,
    ops: Arc<dyn FileOps>,
}

impl core::fmt::Debug for QuickMigration {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("QuickMigration")
            .field("base", &self.base)
            .field("child", &self.child)
            .field("dest", &self.dest)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl QuickMigration {
    /// Takes the checkpoint: creates the differencing disk `child` on the
    /// VHDX `base` and returns it, opened for the guest (which must stop
    /// using `base` directly first). `dest` is where the base will go; it
    /// must not exist.
    pub fn checkpoint(
        base: &Path,
        child: &Path,
        dest: &Path,
        opts: CopyOptions,
    ) -> Result<(Self, HostDisk), MirrorError> {
        Self::checkpoint_with(base, child, dest, opts, Arc::new(HostFileOps))
    }

    /// [`QuickMigration::checkpoint`] with the file-system steps of the
    /// whole migration (create, sync, delete) done through `ops`.
    pub fn checkpoint_with(
        base: &Path,
        child: &Path,
        dest: &Path,
        opts: CopyOptions,
        ops: Arc<dyn FileOps>,
    ) -> Result<(Self, HostDisk), MirrorError> {
        if dest.exists() {
            return Err(file_err("use", dest, "it already exists"));
        }
        let created = vhdx::host::create_differencing_path(child, base, None)
            .map_err(|e| file_err("create", child, e))?;
        drop(created);
        // Reopen unbuffered, with the parent chain attached.
        let disk = open_disk(child, true).map_err(|e| file_err("open", child, e))?;
        Ok((
            QuickMigration {
                base: base.to_path_buf(),
                child: child.to_path_buf(),
                dest: dest.to_path_buf(),
                opts,
                state: QuickState::Checkpointed,
                ops,
            },
            disk,
        ))
    }

    /// Current state.
    pub fn state(&self) -> QuickState {
        self.state
    }

    /// Copies the frozen base to the destination in one unbuffered pass
    /// while the guest keeps writing to the checkpoint.
    /// `on_progress(done, total)` returning `false` cancels the copy (the
    /// destination is deleted; call [`QuickMigration::cancel`] to end).
    pub fn copy_base(
        &mut self,
        on_progress: impl FnMut(u64, u64) -> bool,
    ) -> Result<u64, MirrorError> {
        if self.state != QuickState::Checkpointed {
            return Err(MirrorError::Sequence("the base is already copied"));
        }
        let mut base = open_disk(&self.base, false).map_err(|e| file_err("open", &self.base, e))?;
        let mut dest = create_like_with(&base, &self.dest, &*self.ops)
            .map_err(|e| file_err("create", &self.dest, e))?;
        let opts = CopyOptions {
            // The destination is new: its unwritten ranges read as zeros.
            skip_zero_chunks: true,
            ..self.opts
        };
        let copied = copy_disk_pipelined(&mut base, &mut dest, opts, on_progress)
            .map_err(MirrorError::Copy)
            .and_then(|n| {
                dest.close().map_err(|e| file_err("close", &self.dest, e))?;
                Ok(n)
            });
        if copied.is_err() {
            drop(dest);
            // Best effort: the copy's error is the one to report.
            let _ = fsops::discard(&*self.ops, &self.dest);
        } else {
            self.state = QuickState::BaseCopied;
        }
        copied
    }

    /// Bytes the checkpoint holds so far, rounded up to its blocks: what
    /// `finish` will copy during downtime. Watch it grow during `copy_base`.
    /// Read from the file: blocks the guest allocated since its last flush
    /// are not counted yet.
    pub fn child_bytes(&self) -> Result<u64, MirrorError> {
        let ranges = own_ranges(&self.child).map_err(|e| file_err("read", &self.child, e))?;
        Ok(ranges.iter().map(|r| r.1).sum())
    }

    /// With the guest saved: closes the checkpoint (`child_disk`, as
    /// returned by [`QuickMigration::checkpoint`]), folds its data into the
    /// destination base, and deletes the checkpoint and — unless
    /// `keep_source` — the source base. The guest resumes on the
    /// destination. Returns the bytes folded.
    pub fn finish(self, mut child_disk: HostDisk, keep_source: bool) -> Result<u64, MirrorError> {
        if self.state != QuickState::BaseCopied {
            return Err(MirrorError::Sequence("finish needs the base copied first"));
        }
        child_disk
            .close()
            .map_err(|e| file_err("close", &self.child, e))?;
        drop(child_disk);
        let ranges = own_ranges(&self.child).map_err(|e| file_err("read", &self.child, e))?;
        let mut view =
            open_disk(&self.child, false).map_err(|e| file_err("open", &self.child, e))?;
        let mut dest = open_disk(&self.dest, true).map_err(|e| file_err("open", &self.dest, e))?;
        check_geometry(&view, &dest)?;
        let job = CopyJob::new(
            &ranges,
            view.virtual_size(),
            view.logical_sector_size(),
            self.opts,
        );
        // No zero skipping: a zero written after the checkpoint must
        // overwrite the base's data.
        let folded = copy_plan(&mut view, &mut dest, job, false, |_, _| true)?;
        dest.close().map_err(|e| file_err("close", &self.dest, e))?;
        drop((view, dest));
        // The destination holds everything now: make it durable under its
        // name before the checkpoint and the base go.
        fsops::replace_source(&*self.ops, &self.dest, &self.child)
            .map_err(|e| file_err("delete", &self.child, e))?;
        if !keep_source {
            fsops::replace_source(&*self.ops, &self.dest, &self.base)
                .map_err(|e| file_err("delete", &self.base, e))?;
        }
        Ok(folded)
    }

    /// Abandons the move: deletes the destination base (if copied). The
    /// guest stays on the checkpoint over the source base.
    pub fn cancel(self) -> Result<(), MirrorError> {
        fsops::discard(&*self.ops, &self.dest).map_err(|e| file_err("delete", &self.dest, e))
    }
}
