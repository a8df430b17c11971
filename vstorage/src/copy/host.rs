//! Host side of the copy engine: opening and creating disk files, and the
//! `vhdx copy SRC DST [--progress]` command.
//!
//! Files are opened with `O_DIRECT` where the filesystem allows it
//! ([`FileIo::open_direct`]): the one-pass copy must not fill the host page
//! cache with a disk it reads once (MISSION "Storage live migration", step 3).

use std::path::Path;
use std::string::{String, ToString};
use std::sync::mpsc;
use std::vec::Vec;

use super::{check_geometry, Chunk, CopyError, CopyJob, CopyOptions};
use crate::fsops::{self, FileOps, HostFileOps};
use crate::io::{DiskError, FileIo, RawDisk, VirtualDisk};
use crate::vhdx::{self, CreateParams, DiskKind, Vhdx};

/// A disk file on the host: the kind is chosen by the file name's extension.
#[derive(Debug)]
pub enum HostDisk {
    /// A raw image (any extension but `.vhdx` / `.avhdx`).
    Raw(RawDisk<FileIo>),
    /// A VHDX file, with its parent chain attached when differencing
    /// (boxed: its state is far larger than a raw file's).
    Vhdx(Box<Vhdx<FileIo>>),
}

impl HostDisk {
    /// Short name of the format, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            HostDisk::Raw(_) => "raw",
            HostDisk::Vhdx(d) => d.kind().as_str(),
        }
    }

    fn as_disk(&mut self) -> &mut dyn VirtualDisk {
        match self {
            HostDisk::Raw(d) => d,
            HostDisk::Vhdx(d) => &mut **d,
        }
    }

    fn as_disk_ref(&self) -> &dyn VirtualDisk {
        match self {
            HostDisk::Raw(d) => d,
            HostDisk::Vhdx(d) => &**d,
        }
    }

    /// Flushes and, for VHDX, marks the file cleanly closed, reporting
    /// errors that a plain drop would swallow.
    pub fn close(&mut self) -> Result<(), DiskError> {
        match self {
            HostDisk::Raw(d) => d.flush(),
            HostDisk::Vhdx(d) => {
                d.flush()?;
                d.close()
            }
        }
    }
}

impl VirtualDisk for HostDisk {
    fn virtual_size(&self) -> u64 {
        self.as_disk_ref().virtual_size()
    }
    fn logical_sector_size(&self) -> u32 {
        self.as_disk_ref().logical_sector_size()
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.as_disk().read(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.as_disk().write(offset, data)
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        self.as_disk().flush()
    }
    fn allocated_ranges(&mut self) -> Result<Vec<(u64, u64)>, DiskError> {
        self.as_disk().allocated_ranges()
    }
}

/// The host's own words for an I/O error, without our operation prefix.
fn detail(e: &crate::io::IoError) -> String {
    match e {
        crate::io::IoError::Host { detail, .. } => detail.clone(),
        crate::io::IoError::NoSpace { detail, .. } => format!("store full: {detail}"),
        other => other.to_string(),
    }
}

/// One line for the user about `e` concerning `path`: named once, without
/// the error kind's prefix when the message already says what failed.
#[cfg(feature = "cli")]
fn describe(path: &Path, e: &DiskError) -> String {
    let msg = match e {
        DiskError::Open(m) | DiskError::Request(m) => m.clone(),
        DiskError::Corrupt(m) => format!("corrupt: {m}"),
        DiskError::Io(io) => io.to_string(),
    };
    let name = path.display().to_string();
    let msg = if msg.contains(&name) {
        msg
    } else {
        format!("{name}: {msg}")
    };
    // One line whatever the message holds.
    msg.replace(['\n', '\r'], " ")
}

/// True for `.vhdx` and `.avhdx` (Hyper-V's name for checkpoint children).
pub(crate) fn is_vhdx(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("vhdx") || e.eq_ignore_ascii_case("avhdx"))
}

/// Opens a disk file unbuffered: VHDX (with its parent chain) by
/// extension, raw otherwise.
pub fn open_disk(path: &Path, writable: bool) -> Result<HostDisk, DiskError> {
    if is_vhdx(path) {
        let d = vhdx::host::open_path_direct(path, writable)?;
        return Ok(HostDisk::Vhdx(Box::new(d)));
    }
    let io = FileIo::open_direct(path, writable)
        .map_err(|e| DiskError::Open(format!("cannot open {}: {}", path.display(), detail(&e))))?;
    Ok(HostDisk::Raw(RawDisk::open(io)?))
}

/// The parameters of a new VHDX holding a copy of `like`: same virtual
/// size, sector sizes, and (when `like` is a VHDX) block size and kind. A
/// differencing source is copied flattened, as a dynamic disk: its virtual
/// view includes the parent chain.
pub fn params_like(like: &HostDisk) -> CreateParams {
    let mut p = CreateParams::dynamic(like.virtual_size());
    p.logical_sector_size = like.logical_sector_size();
    if let HostDisk::Vhdx(v) = like {
        p.block_size = v.block_size();
        p.physical_sector_size = v.physical_sector_size();
        p.fixed = v.kind() == DiskKind::Fixed;
    }
    p.guid_seed = vhdx::host::new_seed();
    p
}

/// Creates a new disk file at `path` with the same parameters as `like`
/// (see [`params_like`]), opened unbuffered. The kind follows `path`'s
/// extension. Refuses to replace an existing file; removes what it created
/// when it fails. The new name is durable when it returns (see
/// [`crate::fsops`]).
pub fn create_like(like: &HostDisk, path: &Path) -> Result<HostDisk, DiskError> {
    create_like_with(like, path, &HostFileOps)
}

/// [`create_like`] with the file-system steps done through `ops`.
pub fn create_like_with(
    like: &HostDisk,
    path: &Path,
    ops: &dyn FileOps,
) -> Result<HostDisk, DiskError> {
    claim(ops, path)?;
    let result = (|| {
        let io = FileIo::open_direct(path, true)?;
        let disk = if is_vhdx(path) {
            HostDisk::Vhdx(Box::new(vhdx::create(io, &params_like(like))?))
        } else {
            let disk = RawDisk::create(io, like.virtual_size())?;
            // A raw file keeps 512-byte sectors unless told otherwise.
            let disk = if like.logical_sector_size() == disk.logical_sector_size() {
                disk
            } else {
                RawDisk::open_with_sector(disk.into_inner(), like.logical_sector_size())?
            };
            HostDisk::Raw(disk)
        };
        fsops::created(ops, path).map_err(|e| sync_err(path, e))?;
        Ok(disk)
    })();
    if result.is_err() {
        // Best effort: the error being returned matters more than this one.
        let _ = fsops::discard(ops, path);
    }
    result
}

fn sync_err(path: &Path, e: std::io::Error) -> DiskError {
    DiskError::Io(crate::io::IoError::Host {
        op: "sync",
        detail: format!("{}: {e}", fsops::parent_dir(path).display()),
    })
}

/// Creates `path` as an empty file, refusing to replace one.
fn claim(ops: &dyn FileOps, path: &Path) -> Result<(), DiskError> {
    ops.create_new(path).map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::AlreadyExists {
            "it already exists".to_string()
        } else {
            e.to_string()
        };
        DiskError::Open(format!("cannot create {}: {why}", path.display()))
    })
}

/// The ranges the VHDX at `path` holds in its own file: for a differencing
/// disk, without its parent chain's (opened read-only, parent not attached).
/// Block-granular: a partially present block counts whole.
pub fn own_ranges(path: &Path) -> Result<Vec<(u64, u64)>, DiskError> {
    let io = FileIo::open(path, false)
        .map_err(|e| DiskError::Open(format!("cannot open {}: {}", path.display(), detail(&e))))?;
    let mut d = Vhdx::open(io, vhdx::OpenOptions::read_only())?;
    d.data_ranges()
}

/// Creates `path` as a new differencing VHDX whose parent is `parent` (an
/// already moved copy of `like`'s parent), with `like`'s block size, opened
/// unbuffered with its chain. Refuses to replace an existing file.
pub fn create_child_like(
    like: &HostDisk,
    path: &Path,
    parent: &Path,
) -> Result<HostDisk, DiskError> {
    create_child_like_with(like, path, parent, &HostFileOps)
}

/// [`create_child_like`] with the file-system steps done through `ops`.
pub fn create_child_like_with(
    like: &HostDisk,
    path: &Path,
    parent: &Path,
    ops: &dyn FileOps,
) -> Result<HostDisk, DiskError> {
    let HostDisk::Vhdx(v) = like else {
        return Err(DiskError::Open(format!(
            "{} is not a VHDX differencing disk",
            path.display()
        )));
    };
    let block_size = v.block_size();
    claim(ops, path)?;
    let result = (|| {
        drop(vhdx::host::create_differencing_path(
            path,
            parent,
            Some(block_size),
        )?);
        fsops::created(ops, path).map_err(|e| sync_err(path, e))?;
        open_disk(path, true)
    })();
    if result.is_err() {
        // Best effort: the error being returned matters more than this one.
        let _ = fsops::discard(ops, path);
    }
    result
}

/// Moves a *read-only* member of a differencing chain (a checkpoint that
/// is some disk's parent): creates `dst` as a differencing disk of
/// `dst_parent` (the already moved copy of `src`'s parent) and copies into
/// it the blocks `src` holds itself, read through `src`'s chain. The copy
/// reads the same as `src`. Returns the bytes copied; on failure `dst` is
/// removed.
pub fn copy_differencing(src: &Path, dst: &Path, dst_parent: &Path) -> Result<u64, CopyError> {
    let ranges = own_ranges(src).map_err(CopyError::Open)?;
    let mut source = open_disk(src, false).map_err(CopyError::Open)?;
    let mut dest = create_child_like(&source, dst, dst_parent).map_err(CopyError::Open)?;
    let result = check_geometry(&source, &dest)
        .and_then(|()| {
            let job = CopyJob::new(
                &ranges,
                source.virtual_size(),
                source.logical_sector_size(),
                CopyOptions::default(),
            );
            // No zero skipping: zeros in the child hide the parent's data.
            super::copy_plan(&mut source, &mut dest, job, false, |_, _| true)
        })
        .and_then(|n| dest.close().map(|()| n).map_err(CopyError::DestFlush));
    if result.is_err() {
        drop(dest);
        // Best effort: the copy's error is the one to report.
        let _ = fsops::discard(&HostFileOps, dst);
    }
    result
}

/// Chunks read ahead of the destination writes by [`copy_disk_pipelined`].
pub const READ_AHEAD_CHUNKS: usize = 2;

/// [`super::copy_disk`] with the source read on a second thread, up to
/// [`READ_AHEAD_CHUNKS`] chunks ahead of the destination writes, so reading
/// one disk and writing the other overlap. Same plan, same order, same
/// result; memory stays bounded (`READ_AHEAD_CHUNKS + 1` chunk buffers).
pub fn copy_disk_pipelined<S, D>(
    src: &mut S,
    dst: &mut D,
    opts: CopyOptions,
    mut on_progress: impl FnMut(u64, u64) -> bool,
) -> Result<u64, CopyError>
where
    S: VirtualDisk + Send + ?Sized,
    D: VirtualDisk + ?Sized,
{
    check_geometry(src, dst)?;
    let mut job = CopyJob::for_disk(src, opts)?;
    let mut reader_job = job.clone();
    type Filled = (Chunk, Vec<u8>, Result<(), CopyError>);
    let (full_tx, full_rx) = mpsc::sync_channel::<Filled>(READ_AHEAD_CHUNKS);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..=READ_AHEAD_CHUNKS {
        // Cannot fail: the receiver is alive.
        let _ = empty_tx.send(Vec::new());
    }
    std::thread::scope(|scope| {
        scope.spawn(move || {
            while let Some(chunk) = reader_job.next_chunk() {
                let Ok(mut buf) = empty_rx.recv() else {
                    return; // the writer stopped
                };
                let read = super::read_chunk(src, chunk, &mut buf);
                let failed = read.is_err();
                if full_tx.send((chunk, buf, read)).is_err() || failed {
                    return;
                }
                if reader_job.complete(chunk).is_err() {
                    return;
                }
            }
        });
        let result = (|| {
            while job.next_chunk().is_some() {
                let (chunk, buf, read) = full_rx.recv().map_err(|_| CopyError::SourceRead {
                    offset: job.cursor(),
                    error: DiskError::Request("the reader thread stopped early".into()),
                })?;
                read?;
                super::write_chunk(dst, chunk, &buf, opts.skip_zero_chunks)?;
                job.complete(chunk)?;
                // The reader may have finished; a spare buffer is harmless.
                let _ = empty_tx.send(buf);
                if !on_progress(job.bytes_copied(), job.bytes_total()) {
                    return Err(CopyError::Cancelled);
                }
            }
            dst.flush().map_err(CopyError::DestFlush)?;
            Ok(job.bytes_copied())
        })();
        // Unblock a reader waiting to send or for a buffer, before the
        // scope joins it.
        drop(full_rx);
        drop(empty_tx);
        result
    })
}

/// The bar `vhdx copy --progress` draws on stderr, redrawn in place:
/// `[#####>    ]  42%  123.4 MiB/256.0 MiB  512.3 MiB/s`. Hidden when
/// stdout is not a terminal (output sent to a file or a pipe), so logs and
/// scripts never see control characters.
#[cfg(feature = "cli")]
pub fn copy_progress_bar() -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    let target = if std::io::stdout().is_terminal() {
        indicatif::ProgressDrawTarget::stderr()
    } else {
        indicatif::ProgressDrawTarget::hidden()
    };
    styled_bar(target)
}

#[cfg(feature = "cli")]
fn styled_bar(target: indicatif::ProgressDrawTarget) -> indicatif::ProgressBar {
    let style = indicatif::ProgressStyle::with_template(
        "[{bar:30}] {percent:>3}%  {bytes}/{total_bytes}  {bytes_per_sec}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("#> ");
    let bar = indicatif::ProgressBar::with_draw_target(Some(0), target);
    bar.set_style(style);
    bar
}

/// `vhdx copy SRC DST [--progress]`: copies the virtual disk SRC into a new
/// file DST of the same kind and parameters, in one unbuffered pass over
/// SRC's allocated data. On failure DST is removed. Errors are one line.
#[cfg(feature = "cli")]
pub fn cli_copy(src: &Path, dst: &Path, progress: bool) -> Result<(), String> {
    let bar = progress.then(copy_progress_bar);
    cli_copy_with(src, dst, bar.as_ref())
}

/// [`cli_copy`] drawing its progress on `bar` (if any): length and position
/// in bytes of disk data; finished on success, abandoned on failure.
#[cfg(feature = "cli")]
pub fn cli_copy_with(
    src: &Path,
    dst: &Path,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<(), String> {
    let mut source = open_disk(src, false).map_err(|e| describe(src, &e))?;
    let mut dest = create_like(&source, dst).map_err(|e| describe(dst, &e))?;
    let opts = CopyOptions {
        // The destination is new, so it reads as zeros: zero chunks of a
        // raw source stay holes.
        skip_zero_chunks: true,
        ..CopyOptions::default()
    };
    let result = copy_disk_pipelined(&mut source, &mut dest, opts, |done, total| {
        if let Some(bar) = bar {
            bar.set_length(total);
            bar.set_position(done);
        }
        true
    })
    .map_err(|e| e.to_string())
    .and_then(|_| {
        dest.close()
            .map_err(|e| format!("closing the destination: {e}"))
    });
    match result {
        Ok(()) => {
            if let Some(bar) = bar {
                bar.finish();
            }
            Ok(())
        }
        Err(e) => {
            if let Some(bar) = bar {
                bar.abandon();
            }
            drop(dest);
            // Best effort: the copy's error is the one to report.
            let _ = fsops::discard(&HostFileOps, dst);
            Err(format!("copy {} -> {}: {e}", src.display(), dst.display()))
        }
    }
}

#[cfg(all(test, feature = "cli"))]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A terminal that keeps what is drawn on it.
    #[derive(Debug, Clone, Default)]
    struct Screen(Arc<Mutex<String>>);

    impl Screen {
        fn put(&self, s: &str) -> std::io::Result<()> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .push_str(s);
            Ok(())
        }
    }

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            100
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.put(s)?;
            self.put("\n")
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.put(s)
        }
        fn clear_line(&self) -> std::io::Result<()> {
            self.put("\r")
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn copy_draws_its_progress_through_indicatif() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("s.vhdx"), dir.path().join("d.vhdx"));
        let mut p = vhdx::CreateParams::dynamic(8 << 20);
        p.block_size = 1 << 20;
        let mut d = vhdx::host::create_path(&src, &p).unwrap();
        d.write(0, &[7u8; 3 << 20]).unwrap();
        d.close().unwrap();
        drop(d);
        let screen = Screen::default();
        let bar = styled_bar(indicatif::ProgressDrawTarget::term_like(Box::new(
            screen.clone(),
        )));
        cli_copy_with(&src, &dst, Some(&bar)).unwrap();
        assert!(bar.is_finished());
        assert_eq!(bar.position(), 3 << 20);
        let drawn = screen.0.lock().unwrap().clone();
        assert!(
            drawn.contains("100%") && drawn.contains("3.00 MiB/3.00 MiB") && drawn.contains("###"),
            "{drawn:?}"
        );
    }
}
