//! The mirror over real VHDX engines (in memory) whose stores fail at the
//! Nth write or flush — data, BAT, log or header, whatever the Nth is. For
//! every N, on the destination and on the source: the run ends either
//! switched over, with the destination holding every acknowledged write, or
//! back on the source, which holds every acknowledged write.

mod mirror_support;

use std::sync::OnceLock;

use mirror_support::{write_data, Model, Rng, SECTOR};
use vstorage::copy::CopyOptions;
use vstorage::io::{MemIo, VirtualDisk};
use vstorage::mirror::fault::FaultyIo;
use vstorage::mirror::{MirrorState, MirroredDisk, Step};
use vstorage::vhdx::{self, CreateParams, OpenOptions, Vhdx};

type Disk = Vhdx<FaultyIo<MemIo>>;

const SIZE: u64 = 4 << 20;
const SECTORS: u64 = SIZE / SECTOR as u64;
const FILLED_SECTORS: u64 = (1 << 20) / SECTOR as u64;

fn params() -> CreateParams {
    let mut p = CreateParams::dynamic(SIZE);
    p.block_size = 1 << 20;
    p.guid_seed = 42;
    p
}

/// The bytes of a new VHDX file; with `fill`, its first MiB written by
/// write 1. Made once per kind: the engine is slow in debug builds.
fn template(fill: bool) -> &'static [u8] {
    static FILLED: OnceLock<Vec<u8>> = OnceLock::new();
    static EMPTY: OnceLock<Vec<u8>> = OnceLock::new();
    (if fill { &FILLED } else { &EMPTY }).get_or_init(|| {
        let mut d = vhdx::create(MemIo::new(), &params()).unwrap();
        if fill {
            d.write(0, &write_data(1, 0, FILLED_SECTORS)).unwrap();
        }
        d.close().unwrap();
        d.io().as_slice().to_vec()
    })
}

/// A VHDX in memory whose store fails as asked.
fn disk(fill: bool, fail_write: Option<u64>, fail_flush: Option<u64>) -> Disk {
    let io = MemIo::from_vec(template(fill).to_vec());
    Vhdx::open(
        FaultyIo::new(io, fail_write, fail_flush),
        OpenOptions::read_write(7),
    )
    .unwrap()
}

/// What survives on `d`'s store, as a fresh engine sees it after reopening.
fn reopened(d: Disk) -> Vhdx<MemIo> {
    let bytes = d.io().inner_bytes();
    drop(d);
    Vhdx::open(MemIo::from_vec(bytes), OpenOptions::read_write(9)).unwrap()
}

trait InnerBytes {
    fn inner_bytes(&self) -> Vec<u8>;
}

impl InnerBytes for FaultyIo<MemIo> {
    fn inner_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; vstorage::io::BlockIo::len(self).unwrap() as usize];
        vstorage::io::BlockIo::read_at(self, 0, &mut v).unwrap();
        v
    }
}

fn run(src_fault: (Option<u64>, Option<u64>), dst_fault: (Option<u64>, Option<u64>), seed: u64) {
    let src = disk(true, src_fault.0, src_fault.1);
    let dst = disk(false, dst_fault.0, dst_fault.1);
    let mut model = Model::new(SECTORS);
    model.acked(1, 0, FILLED_SECTORS);
    let opts = CopyOptions {
        chunk_bytes: 128 << 10,
        ..CopyOptions::default()
    };
    let mut m = MirroredDisk::new(src, dst, opts).unwrap();
    let mut rng = Rng::new(seed);
    let mut id = 10;
    let mut switched = false;
    for _ in 0..80 {
        if rng.chance(40) && m.state() == MirrorState::Copying {
            let _ = m.step();
        } else if m.state() == MirrorState::Mirrored && rng.chance(20) {
            m.switch_over().unwrap();
            switched = true;
        } else {
            id += 1;
            let first = rng.below(SECTORS - 16);
            let len = 1 + rng.below(16);
            match m.write(first * SECTOR as u64, &write_data(id, first, len)) {
                Ok(()) => model.acked(id, first, len),
                Err(_) => model.unacked(id, first, len),
            }
        }
    }
    if m.state() == MirrorState::Copying {
        // Finish the copy (or fail trying), then switch if we can.
        while let Ok(Step::Copied(_)) = m.step() {}
    }
    if m.state() == MirrorState::Mirrored {
        m.switch_over().unwrap();
        switched = true;
    }
    let ctx = format!("src {src_fault:?} dst {dst_fault:?} seed {seed}");
    let (source, dest) = m.into_parts();
    if switched {
        let mut d = reopened(dest.unwrap());
        model.check(&mut d, &format!("destination, {ctx}"));
    } else {
        let mut s = reopened(source.unwrap());
        model.check(&mut s, &format!("source, {ctx}"));
    }
}

#[test]
fn destination_store_failing_anywhere() {
    for n in (1..40).step_by(4) {
        run((None, None), (Some(n), None), n);
        run((None, None), (None, Some(n)), n + 1000);
    }
}

#[test]
fn source_store_failing_anywhere() {
    for n in (1..40).step_by(6) {
        run((Some(n), None), (None, None), n);
        run((None, Some(n)), (None, None), n + 1000);
    }
}
