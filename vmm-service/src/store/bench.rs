//! The store benchmark (`store-bench`): what plain 9P file I/O costs on
//! this node, the yardstick storage migration is held against (issue 12's
//! benchmark), and a VHDX made from inside the node for the host to check.
//!
//! On store `S` the node, in four timed phases over `mib` MiB:
//! 1. *write*: creates `S:bench-NODE.raw`, writes the pattern
//!    ([`pattern`]) in writes of [`CHUNK_BYTES`] (1020 KiB: two full 9P
//!    messages), fsyncs it;
//! 2. *read*: reads it back in reads of [`CHUNK_BYTES`] and checks every
//!    byte;
//! 3. *copy*: copies it to `S:bench-NODE.copy` (read + write,
//!    [`CHUNK_BYTES`] at a time) the way a storage migration writes its destination: into the
//!    partial file (`bench-NODE.copy.partial-NODE`), committed at the end
//!    (fsync, rename, directory fsync; `Stores::commit_partial`), and its
//!    length read back through the still-open file: the plain copy a
//!    storage migration competes with;
//! 4. *vhdx*: creates `S:bench-NODE.vhdx` (dynamic, 32 MiB blocks, virtual
//!    size `mib` MiB rounded up to 32 MiB) with the VHDX engine over a
//!    [`StoreFile`], writes the pattern at virtual offset 0, flushes and
//!    closes it;
//!
//! then syncs the directory and, unless asked to keep them, removes the
//! three files. Each phase's figure counts only the time spent inside its
//! own steps ([`StoreBench::step`] runs for at most a time budget, so VMs
//! and the management API go on between steps and are not counted).
//!
//! A step that fails ends the benchmark with the error; cancelling it
//! (through the job) removes the files.

use super::{StoreError, StoreFile, StorePath, Stores};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use vstorage::vhdx::{self, CreateParams, Vhdx};
use vstorage::{BlockIo, VirtualDisk};

/// Bytes moved per read or write call: [`super::COPY_IO_BYTES`] (two
/// full 9P messages), the size storage migration copies in, so the plain
/// copy it is held against moves its bytes in as few round trips.
pub const CHUNK_BYTES: usize = super::COPY_IO_BYTES;
/// Largest benchmark, in MiB.
pub const BENCH_MIB_MAX: u64 = 1024;

/// The benchmark's data: the 8-byte word at byte offset `o` (a multiple of
/// 8) is `(o / 8 + 1) * 0x9E37_79B9_7F4A_7C15` (wrapping), little-endian.
/// `buf` is filled with the bytes from `offset` (a multiple of 8).
pub fn pattern(offset: u64, buf: &mut [u8]) {
    for (i, w) in buf.chunks_mut(8).enumerate() {
        let o = offset + i as u64 * 8;
        let v = (o / 8 + 1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .to_le_bytes();
        w.copy_from_slice(&v[..w.len()]);
    }
}

/// The phase under way.
enum Phase {
    Write {
        file: StoreFile,
        done: u64,
    },
    Read {
        file: StoreFile,
        done: u64,
    },
    Copy {
        src: StoreFile,
        dst: StoreFile,
        done: u64,
    },
    Vhdx {
        disk: Box<Vhdx<StoreFile>>,
        done: u64,
    },
    Finish,
}

/// What a step left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// More to do; bytes moved so far over all phases.
    Running { bytes_done: u64 },
    /// Finished: the figures, one line (`write_mb_per_s=... ...`).
    Done(String),
}

/// One benchmark run.
pub struct StoreBench {
    store: String,
    node: String,
    bytes: u64,
    keep: bool,
    guid_seed: u64,
    phase: Phase,
    /// Busy nanoseconds of write, read, copy, vhdx.
    busy_ns: [u64; 4],
    buf: Vec<u8>,
    expect: Vec<u8>,
}

impl core::fmt::Debug for StoreBench {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("StoreBench")
            .field("store", &self.store)
            .field("bytes", &self.bytes)
            .finish()
    }
}

fn mb_per_s(bytes: u64, ns: u64) -> u64 {
    u64::try_from(u128::from(bytes) * 1000 / u128::from(ns.max(1))).unwrap_or(u64::MAX)
}

impl StoreBench {
    /// The file names of node `node`'s benchmark on `store`.
    pub fn paths(store: &str, node: &str) -> Result<[StorePath; 3], StoreError> {
        Ok([
            StorePath::new(store, &format!("bench-{node}.raw"))?,
            StorePath::new(store, &format!("bench-{node}.copy"))?,
            StorePath::new(store, &format!("bench-{node}.vhdx"))?,
        ])
    }

    /// Starts a run: creates the first file. `mib` is 1 to
    /// [`BENCH_MIB_MAX`].
    pub fn start(
        stores: &Stores,
        store: &str,
        node: &str,
        mib: u64,
        keep: bool,
        guid_seed: u64,
    ) -> Result<Self, StoreError> {
        if !(1..=BENCH_MIB_MAX).contains(&mib) {
            return Err(StoreError::BadPath(format!(
                "the benchmark moves 1 to {BENCH_MIB_MAX} MiB"
            )));
        }
        let [raw, _, _] = Self::paths(store, node)?;
        let file = stores.create(&raw, false)?;
        Ok(StoreBench {
            store: store.into(),
            node: node.into(),
            bytes: mib << 20,
            keep,
            guid_seed,
            phase: Phase::Write { file, done: 0 },
            busy_ns: [0; 4],
            buf: vec![0; CHUNK_BYTES],
            expect: vec![0; CHUNK_BYTES],
        })
    }

    /// Bytes the whole run moves (four phases).
    pub fn bytes_total(&self) -> u64 {
        self.bytes * 4
    }

    /// Works for about `budget_ns` (at least one chunk); `now` is the node
    /// clock.
    pub fn step(
        &mut self,
        stores: &Stores,
        now: &dyn Fn() -> u64,
        budget_ns: u64,
    ) -> Result<Step, String> {
        let start = now();
        loop {
            let t0 = now();
            let (index, finished) = self.advance(stores)?;
            let t1 = now();
            if let Some(i) = index {
                self.busy_ns[i] += t1.saturating_sub(t0);
            }
            if finished {
                return Ok(Step::Done(self.report()));
            }
            if t1.saturating_sub(start) >= budget_ns {
                return Ok(Step::Running {
                    bytes_done: self.bytes_done(),
                });
            }
        }
    }

    fn bytes_done(&self) -> u64 {
        match &self.phase {
            Phase::Write { done, .. } => *done,
            Phase::Read { done, .. } => self.bytes + done,
            Phase::Copy { done, .. } => 2 * self.bytes + done,
            Phase::Vhdx { done, .. } => 3 * self.bytes + done,
            Phase::Finish => 4 * self.bytes,
        }
    }

    fn report(&self) -> String {
        let [w, r, c, v] = self.busy_ns;
        let b = self.bytes;
        let mut s = format!(
            "write_mb_per_s={} read_mb_per_s={} copy_mb_per_s={} vhdx_write_mb_per_s={} mib={}",
            mb_per_s(b, w),
            mb_per_s(b, r),
            mb_per_s(b, c),
            mb_per_s(b, v),
            b >> 20
        );
        if self.keep {
            s.push_str(&format!(" kept={}:bench-{}.*", self.store, self.node));
        }
        s
    }

    /// One chunk of the current phase (or a phase change). Returns the
    /// phase the time counts for and whether the run is over.
    fn advance(&mut self, stores: &Stores) -> Result<(Option<usize>, bool), String> {
        let [raw, copy, vhdx_path] =
            Self::paths(&self.store, &self.node).map_err(|e| e.to_string())?;
        let bytes = self.bytes;
        let chunk = |done: u64| (bytes - done).min(CHUNK_BYTES as u64) as usize;
        let e = |e: vstorage::IoError| e.to_string();
        match &mut self.phase {
            Phase::Write { file, done } => {
                if *done < bytes {
                    let n = chunk(*done);
                    pattern(*done, &mut self.buf[..n]);
                    file.write_at(*done, &self.buf[..n]).map_err(e)?;
                    *done += n as u64;
                    return Ok((Some(0), false));
                }
                file.flush().map_err(e)?;
                let file = stores.open(&raw, false).map_err(|e| e.to_string())?;
                self.phase = Phase::Read { file, done: 0 };
                Ok((Some(0), false))
            }
            Phase::Read { file, done } => {
                if *done < bytes {
                    let n = chunk(*done);
                    file.read_at(*done, &mut self.buf[..n]).map_err(e)?;
                    pattern(*done, &mut self.expect[..n]);
                    if self.buf[..n] != self.expect[..n] {
                        let at = self.buf[..n]
                            .iter()
                            .zip(&self.expect[..n])
                            .position(|(a, b)| a != b)
                            .unwrap_or(0) as u64;
                        return Err(format!(
                            "{raw}: read back differs from what was written at byte {}",
                            *done + at
                        ));
                    }
                    *done += n as u64;
                    return Ok((Some(1), false));
                }
                let src = stores.open(&raw, false).map_err(|e| e.to_string())?;
                let partial = stores.partial_of(&copy).map_err(|e| e.to_string())?;
                match stores.remove(&partial) {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.to_string()),
                }
                let dst = stores.create_partial(&copy).map_err(|e| e.to_string())?;
                self.phase = Phase::Copy { src, dst, done: 0 };
                Ok((Some(2), false))
            }
            Phase::Copy { src, dst, done } => {
                if *done < bytes {
                    let n = chunk(*done);
                    src.read_at(*done, &mut self.buf[..n]).map_err(e)?;
                    dst.write_at(*done, &self.buf[..n]).map_err(e)?;
                    *done += n as u64;
                    return Ok((Some(2), false));
                }
                stores
                    .commit_partial(dst, &copy)
                    .map_err(|e| e.to_string())?;
                let len = dst.len().map_err(e)?;
                if len != bytes {
                    return Err(format!(
                        "{copy}: {len} bytes after its commit, {bytes} written"
                    ));
                }
                let io = stores
                    .create(&vhdx_path, false)
                    .map_err(|e| e.to_string())?;
                let size = bytes.div_ceil(32 << 20) * (32 << 20);
                let params = CreateParams {
                    guid_seed: self.guid_seed,
                    ..CreateParams::dynamic(size)
                };
                let disk = vhdx::create(io, &params).map_err(|e| format!("{vhdx_path}: {e}"))?;
                self.phase = Phase::Vhdx {
                    disk: Box::new(disk),
                    done: 0,
                };
                Ok((Some(3), false))
            }
            Phase::Vhdx { disk, done } => {
                if *done < bytes {
                    let n = chunk(*done);
                    pattern(*done, &mut self.buf[..n]);
                    disk.write(*done, &self.buf[..n])
                        .map_err(|e| format!("{vhdx_path}: {e}"))?;
                    *done += n as u64;
                    return Ok((Some(3), false));
                }
                disk.flush().map_err(|e| format!("{vhdx_path}: {e}"))?;
                disk.close().map_err(|e| format!("{vhdx_path}: {e}"))?;
                self.phase = Phase::Finish;
                Ok((Some(3), false))
            }
            Phase::Finish => {
                let root = StorePath::new(&self.store, "").map_err(|e| e.to_string())?;
                if !self.keep {
                    for p in [&raw, &copy, &vhdx_path] {
                        stores.remove(p).map_err(|e| e.to_string())?;
                    }
                }
                stores.sync_dir(&root).map_err(|e| e.to_string())?;
                Ok((None, true))
            }
        }
    }

    /// Ends a run early (failed or cancelled): closes its files and removes
    /// them, whatever exists of them.
    pub fn abandon(self, stores: &Stores) {
        let Ok(paths) = Self::paths(&self.store, &self.node) else {
            return;
        };
        drop(self.phase);
        for p in &paths {
            let _ = stores.remove(p);
        }
        if let Ok(p) = stores.partial_of(&paths[1]) {
            let _ = stores.remove(&p);
        }
    }
}
