//! Shared helpers for the mirror tests: a small PRNG, self-describing
//! sector stamps and a model of what each sector may hold.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use vstorage::io::{MemIo, RawDisk, VirtualDisk};

pub const SECTOR: usize = 512;

/// xorshift64*: deterministic, seedable, good enough to pick test operations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// True with probability `pct` percent.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

/// The bytes write `id` puts in `sector`: id, sector number, then filler,
/// so a misplaced or torn sector is recognised. Id 0 is "never written"
/// (all zeros).
pub fn stamp(id: u64, sector: u64) -> [u8; SECTOR] {
    let mut s = [0u8; SECTOR];
    if id == 0 {
        return s;
    }
    s[..8].copy_from_slice(&id.to_le_bytes());
    s[8..16].copy_from_slice(&sector.to_le_bytes());
    s[16..].fill(id as u8 ^ sector as u8);
    s
}

/// Data for a write of `sectors` sectors at `first` by write `id`.
pub fn write_data(id: u64, first: u64, sectors: u64) -> Vec<u8> {
    let mut data = Vec::with_capacity(sectors as usize * SECTOR);
    for s in first..first + sectors {
        data.extend_from_slice(&stamp(id, s));
    }
    data
}

/// Which write's stamp a sector holds, or `None` for garbage.
pub fn decode(sector: u64, bytes: &[u8]) -> Option<u64> {
    let id = u64::from_le_bytes(bytes[..8].try_into().ok()?);
    (bytes == stamp(id, sector)).then_some(id)
}

/// What each sector may hold: the last acknowledged write's id, plus the
/// ids of unacknowledged writes issued after it (they may or may not have
/// landed).
#[derive(Clone)]
pub struct Model {
    pub allowed: Vec<Vec<u64>>,
}

impl Model {
    pub fn new(sectors: u64) -> Self {
        Model {
            allowed: vec![vec![0]; sectors as usize],
        }
    }
    pub fn acked(&mut self, id: u64, first: u64, sectors: u64) {
        for s in first..first + sectors {
            self.allowed[s as usize] = vec![id];
        }
    }
    pub fn unacked(&mut self, id: u64, first: u64, sectors: u64) {
        for s in first..first + sectors {
            self.allowed[s as usize].push(id);
        }
    }
    /// Checks every sector of `disk` against the model.
    pub fn check(&self, disk: &mut dyn VirtualDisk, what: &str) {
        self.check_from(disk, 0, what);
    }

    /// Checks sectors `first..` of `disk` against the model, reading in
    /// batches (a file-backed disk pays a system call per read).
    pub fn check_from(&self, disk: &mut dyn VirtualDisk, first: u64, what: &str) {
        const BATCH: u64 = 128;
        let end = self.allowed.len() as u64;
        let mut buf = vec![0u8; BATCH as usize * SECTOR];
        let mut s0 = first;
        while s0 < end {
            let n = BATCH.min(end - s0);
            let bytes = &mut buf[..n as usize * SECTOR];
            disk.read(s0 * SECTOR as u64, bytes)
                .unwrap_or_else(|e| panic!("{what}: reading sectors {s0}..{}: {e}", s0 + n));
            for (i, sector) in bytes.chunks(SECTOR).enumerate() {
                let s = s0 + i as u64;
                let allowed = &self.allowed[s as usize];
                let got = decode(s, sector);
                assert!(
                    got.is_some_and(|id| allowed.contains(&id)),
                    "{what}: sector {s} holds write {got:?}, expected one of {allowed:?}"
                );
            }
            s0 += n;
        }
    }
}

/// A zeroed in-memory disk of `sectors` 512-byte sectors.
pub fn mem_disk(sectors: u64) -> RawDisk<MemIo> {
    RawDisk::create(MemIo::new(), sectors * SECTOR as u64).expect("memory disk")
}

/// A fresh directory for one test's files, under $TMPDIR (or the system's).
pub fn tempdir(name: &str) -> PathBuf {
    let base = std::env::var_os("TMPDIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let p = base.join(format!("vstorage-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// A guest thread writing random stamps (1 to 8 sectors, ids from 101) to
/// `disk` until `stop` is set, and at least `min` times. Returns `model`
/// updated with what it wrote.
pub fn guest_writer<D: VirtualDisk + Send + 'static>(
    mut disk: D,
    mut model: Model,
    seed: u64,
    min: u64,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Model> {
    let sectors = model.allowed.len() as u64;
    thread::spawn(move || {
        let mut rng = Rng::new(seed);
        let mut id = 100;
        while id < 100 + min || !stop.load(Ordering::Relaxed) {
            id += 1;
            let first = rng.below(sectors - 8);
            let len = 1 + rng.below(8);
            match disk.write(first * SECTOR as u64, &write_data(id, first, len)) {
                Ok(()) => model.acked(id, first, len),
                Err(_) => model.unacked(id, first, len),
            }
        }
        model
    })
}
