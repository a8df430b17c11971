//! The shared mirror under real concurrency: guest writer threads write
//! random stamps (many of them right at the copy cursor, to hit the chunk
//! in flight) while a copy thread steps through the disk. Checked after
//! each run: every acknowledged write is on the surviving disk, and once
//! mirrored, source and destination are byte-identical (including a region
//! all writers hammer at once, where only the copies' agreement is defined).

mod mirror_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use mirror_support::{decode, mem_disk, write_data, Model, Rng, SECTOR};
use vstorage::copy::CopyOptions;
use vstorage::io::{DiskError, MemIo, RawDisk, VirtualDisk};
use vstorage::mirror::fault::{FaultPlan, FaultyDisk};
use vstorage::mirror::{MirrorState, SharedDisk, SharedMirror};

const SECTORS: u64 = 2048;
/// The first sectors are written by every thread (copied early, so most
/// writes there are mirrored and their order on both copies matters).
const HOT_SECTORS: u64 = 64;
const STRIPE: u64 = 8;
const WRITERS: u64 = 3;
const CHUNK: u32 = 4096;

/// A disk that yields the CPU inside every operation, widening the windows
/// in which another thread can interleave.
struct Yielding<D>(D);

impl<D: VirtualDisk> VirtualDisk for Yielding<D> {
    fn virtual_size(&self) -> u64 {
        self.0.virtual_size()
    }
    fn logical_sector_size(&self) -> u32 {
        self.0.logical_sector_size()
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        thread::yield_now();
        self.0.read(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        thread::yield_now();
        self.0.write(offset, data)
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        self.0.flush()
    }
    fn allocated_ranges(&mut self) -> Result<Vec<(u64, u64)>, DiskError> {
        self.0.allocated_ranges()
    }
}

type Disk = Yielding<FaultyDisk<RawDisk<MemIo>>>;

fn disk(plan: FaultPlan) -> Disk {
    Yielding(FaultyDisk::new(mem_disk(SECTORS), plan))
}

/// A write for thread `t`: inside one of its own stripes, half the time
/// next to the copy cursor; or, sometimes, in the shared hot region.
fn pick(rng: &mut Rng, t: u64, cursor_sector: u64) -> (u64, u64, bool) {
    if rng.chance(10) {
        let first = rng.below(HOT_SECTORS - 4);
        return (first, 1 + rng.below(4), true);
    }
    let stripes = (SECTORS - HOT_SECTORS) / STRIPE;
    let near = if rng.chance(50) {
        cursor_sector.saturating_sub(HOT_SECTORS) / STRIPE + rng.below(4)
    } else {
        rng.below(stripes)
    };
    // The thread's stripe at or after `near`, wrapping.
    let mut k = near - near % WRITERS + t;
    if k >= stripes {
        k = t;
    }
    let first = HOT_SECTORS + k * STRIPE + rng.below(STRIPE);
    let len = 1 + rng.below(STRIPE - first % STRIPE);
    (first, len, false)
}

struct Outcome {
    model: Model,
    acked: u64,
}

/// Runs `WRITERS` writer threads against `guest` until `stop` is set and
/// each has done at least `min_writes`. Returns the model of the owned
/// sectors (the hot region is left out of it).
fn run_writers(
    guest: SharedDisk<Disk, Disk>,
    mirror: SharedMirror<Disk, Disk>,
    stop: Arc<AtomicBool>,
    min_writes: u64,
    seed: u64,
) -> thread::JoinHandle<Outcome> {
    thread::spawn(move || {
        // The source starts filled by write 1 (see `filled_source`).
        let mut initial = Model::new(SECTORS);
        initial.acked(1, 0, SECTORS);
        let model = Arc::new(Mutex::new(initial));
        let handles: Vec<_> = (0..WRITERS)
            .map(|t| {
                let mut guest = guest.clone();
                let mirror = mirror.clone();
                let stop = Arc::clone(&stop);
                let model = Arc::clone(&model);
                thread::spawn(move || {
                    let mut rng = Rng::new(seed * 31 + t);
                    let mut acked = 0;
                    let mut n = 0u64;
                    while n < min_writes || !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let id = (t + 1) << 32 | n;
                        let cursor = mirror.progress().bytes_copied / SECTOR as u64;
                        let (first, len, hot) = pick(&mut rng, t, cursor);
                        let data = write_data(id, first, len);
                        let ok = guest.write(first * SECTOR as u64, &data).is_ok();
                        acked += u64::from(ok);
                        if hot {
                            continue;
                        }
                        let mut m = model.lock().unwrap();
                        if ok {
                            m.acked(id, first, len);
                        } else {
                            m.unacked(id, first, len);
                        }
                    }
                    acked
                })
            })
            .collect();
        let acked = handles.into_iter().map(|h| h.join().unwrap()).sum();
        let mut model = Arc::try_unwrap(model).ok().unwrap().into_inner().unwrap();
        // The hot region's value is whichever concurrent write came last:
        // checked by comparing the copies instead.
        for s in 0..HOT_SECTORS {
            model.allowed[s as usize] = Vec::new();
        }
        Outcome { model, acked }
    })
}

/// Checks `disk` against the model, taking anything in the hot region.
fn check(model: &Model, disk: &mut dyn VirtualDisk, what: &str) {
    let mut buf = vec![0u8; SECTOR];
    for s in 0..HOT_SECTORS {
        disk.read(s * SECTOR as u64, &mut buf).unwrap();
        assert!(decode(s, &buf).is_some(), "{what}: hot sector {s} is torn");
    }
    let mut owned = Model {
        allowed: model.allowed.clone(),
    };
    owned.allowed[..HOT_SECTORS as usize].fill(vec![]);
    owned.check_from(disk, HOT_SECTORS, what);
}

fn read_all(d: &mut dyn VirtualDisk) -> Vec<u8> {
    let mut v = vec![0u8; d.virtual_size() as usize];
    d.read(0, &mut v).unwrap();
    v
}

fn opts() -> CopyOptions {
    CopyOptions {
        chunk_bytes: CHUNK,
        ..CopyOptions::default()
    }
}

fn filled_source(plan: FaultPlan) -> Disk {
    let mut d = disk(plan);
    d.0.inner_mut()
        .write(0, &write_data(1, 0, SECTORS))
        .expect("fill");
    d
}

#[test]
fn concurrent_writers_during_copy_and_switch_over() {
    for seed in 0..4 {
        let src = filled_source(FaultPlan::default());
        let dst = disk(FaultPlan::default());
        let mirror = SharedMirror::new(src, dst, opts()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writers = run_writers(mirror.disk(), mirror.clone(), Arc::clone(&stop), 300, seed);
        mirror.run_to_mirrored().unwrap();
        assert_eq!(mirror.state(), MirrorState::Mirrored);
        stop.store(true, Ordering::Relaxed);
        let out = writers.join().unwrap();
        assert!(out.acked >= 3 * 300);
        let p = mirror.progress();
        assert_eq!((p.percent(), p.bytes_copied), (100, SECTORS * 512));
        assert!(p.mirrored_writes > 0, "no write was mirrored: {p:?}");

        let mut source = mirror.switch_over().unwrap();
        let mut guest = mirror.disk();
        check(&out.model, &mut guest, "destination after switch-over");
        check(&out.model, &mut source, "source after switch-over");
        assert!(
            read_all(&mut source) == read_all(&mut guest),
            "seed {seed}: source and destination differ after the mirror"
        );
        // After switch-over writes reach the destination only.
        guest.write(0, &write_data(9, 0, 1)).unwrap();
        assert_eq!(read_all(&mut guest)[..512], write_data(9, 0, 1));
        assert_ne!(read_all(&mut source)[..512], read_all(&mut guest)[..512]);
        assert_eq!(mirror.state(), MirrorState::SwitchedOver);
        assert!(mirror.cancel().is_err(), "cancel after switch-over");
    }
}

#[test]
fn destination_failure_leaves_source_with_every_acknowledged_write() {
    for (seed, fail_at) in [(10, 5), (11, 40), (12, 120)] {
        let src = filled_source(FaultPlan::default());
        let dst = disk(FaultPlan {
            fail_write: Some(fail_at),
            ..FaultPlan::default()
        });
        let mirror = SharedMirror::new(src, dst, opts()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writers = run_writers(mirror.disk(), mirror.clone(), Arc::clone(&stop), 200, seed);
        let copy = mirror.run_to_mirrored();
        stop.store(true, Ordering::Relaxed);
        let out = writers.join().unwrap();
        // Either the copy itself or a mirrored write hit the fault.
        assert_eq!(mirror.state(), MirrorState::Failed, "{copy:?}");
        assert!(mirror.progress().failure.is_some());
        assert!(mirror.take_discarded().is_some(), "destination handed back");
        assert!(mirror.switch_over().is_err());
        // The guest never saw an error: the source took every write.
        assert!(out.model.allowed.iter().all(|a| a.len() <= 1));
        let mut guest = mirror.disk();
        check(&out.model, &mut guest, "source after destination failure");
        guest.write(0, &write_data(5, 0, 1)).unwrap();
    }
}

#[test]
fn source_write_failure_is_not_acknowledged_and_copy_carries_on() {
    let src = filled_source(FaultPlan {
        fail_write: Some(50),
        torn: true,
        ..FaultPlan::default()
    });
    let dst = disk(FaultPlan::default());
    let mirror = SharedMirror::new(src, dst, opts()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = run_writers(mirror.disk(), mirror.clone(), Arc::clone(&stop), 200, 20);
    mirror.run_to_mirrored().unwrap();
    stop.store(true, Ordering::Relaxed);
    let out = writers.join().unwrap();
    let _source = mirror.switch_over().unwrap();
    check(
        &out.model,
        &mut mirror.disk(),
        "destination after a source fault",
    );
}

#[test]
fn cancel_mid_copy_keeps_the_source() {
    let src = filled_source(FaultPlan::default());
    let dst = disk(FaultPlan::default());
    let mirror = SharedMirror::new(src, dst, opts()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = run_writers(mirror.disk(), mirror.clone(), Arc::clone(&stop), 200, 30);
    let copier = {
        let mirror = mirror.clone();
        thread::spawn(move || mirror.run_to_mirrored())
    };
    while mirror.progress().percent() < 30 {
        thread::yield_now();
    }
    let discarded = mirror.cancel().unwrap();
    assert!(discarded.is_some());
    // The copier stops with an error, unless it finished just before.
    let _ = copier.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let out = writers.join().unwrap();
    assert_eq!(mirror.state(), MirrorState::Cancelled);
    check(&out.model, &mut mirror.disk(), "source after cancel");
}
