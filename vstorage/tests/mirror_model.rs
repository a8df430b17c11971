//! Property tests of the single-threaded mirror ([`MirroredDisk`]) against
//! a model: random interleavings of guest writes, copy steps, reads, cancel
//! and switch-over, with a fault injected on the source or the destination
//! at a random operation. After every run the surviving disk (and, once
//! mirrored, both) must hold exactly the acknowledged writes, after losing
//! everything that was not flushed.

mod mirror_support;

use mirror_support::{decode, mem_disk, write_data, Model, Rng, SECTOR};
use vstorage::copy::CopyOptions;
use vstorage::io::{MemIo, RawDisk, VirtualDisk};
use vstorage::mirror::fault::{FaultPlan, FaultyDisk};
use vstorage::mirror::{MirrorState, MirroredDisk, Step};

type Disk = FaultyDisk<RawDisk<MemIo>>;

const SECTORS: u64 = 512;
const CHUNK: u32 = 8192;
const CASES: u64 = 400;

fn random_plan(rng: &mut Rng) -> FaultPlan {
    let mut plan = FaultPlan {
        volatile: rng.chance(50),
        sticky: rng.chance(30),
        torn: rng.chance(30),
        ..FaultPlan::default()
    };
    let n = Some(1 + rng.below(60));
    match rng.below(6) {
        0 => plan.fail_write = n,
        1 => plan.fail_flush = n,
        2 => plan.fail_read = n,
        _ => {}
    }
    plan
}

/// A random allocation map: 4 KiB-aligned runs, sometimes the whole disk.
fn random_map(rng: &mut Rng) -> Option<Vec<(u64, u64)>> {
    if rng.chance(30) {
        return None;
    }
    let blocks = SECTORS * SECTOR as u64 / 4096;
    Some(
        (0..blocks)
            .filter(|_| rng.chance(50))
            .map(|b| (b * 4096, 4096))
            .collect(),
    )
}

struct Run {
    rng: Rng,
    model: Model,
    next_id: u64,
}

impl Run {
    fn write(&mut self, disk: &mut MirroredDisk<Disk, Disk>) {
        let first = self.rng.below(SECTORS);
        let len = (1 + self.rng.below(4)).min(SECTORS - first);
        self.next_id += 1;
        let id = self.next_id;
        match disk.write(first * SECTOR as u64, &write_data(id, first, len)) {
            Ok(()) => self.model.acked(id, first, len),
            Err(_) => self.model.unacked(id, first, len),
        }
    }

    fn read_check(&mut self, disk: &mut MirroredDisk<Disk, Disk>) {
        let s = self.rng.below(SECTORS);
        let mut buf = [0u8; SECTOR];
        // A read may fail under an injected fault; when it succeeds it must
        // show an allowed write.
        if disk.read(s * SECTOR as u64, &mut buf).is_ok() {
            let got = decode(s, &buf);
            assert!(
                got.is_some_and(|id| self.model.allowed[s as usize].contains(&id)),
                "read of sector {s} returned {got:?}, allowed {:?}",
                self.model.allowed[s as usize]
            );
        }
    }
}

fn check_survivor(mut disk: Disk, model: &Model, what: &str) {
    disk.crash();
    model.check(disk.inner_mut(), what);
}

fn run_case(seed: u64) {
    let mut rng = Rng::new(seed);
    let map = random_map(&mut rng);
    let mut model = Model::new(SECTORS);
    // Initial contents: the allocated part of the source holds data.
    let mut src_raw = mem_disk(SECTORS);
    let mut next_id = 0;
    for (off, len) in map.clone().unwrap_or(vec![(0, SECTORS * SECTOR as u64)]) {
        let (first, n) = (off / SECTOR as u64, len / SECTOR as u64);
        next_id += 1;
        src_raw
            .write(off, &write_data(next_id, first, n))
            .expect("fill source");
        model.acked(next_id, first, n);
    }
    let src_plan = FaultPlan {
        allocated: map,
        ..random_plan(&mut rng)
    };
    let dst_plan = random_plan(&mut rng);
    let src = FaultyDisk::new(src_raw, src_plan.clone());
    let dst = FaultyDisk::new(mem_disk(SECTORS), dst_plan.clone());
    let opts = CopyOptions {
        chunk_bytes: CHUNK,
        ..CopyOptions::default()
    };
    let mut disk = MirroredDisk::new(src, dst, opts).expect("start mirror");
    let mut run = Run {
        rng,
        model,
        next_id,
    };
    let mut source_back = None;
    let mut discarded = None;
    for _ in 0..200 {
        let roll = run.rng.below(100);
        match disk.state() {
            MirrorState::Copying if roll < 40 => match disk.step() {
                Ok(_) => {}
                Err(_) => assert_eq!(disk.state(), MirrorState::Failed),
            },
            MirrorState::Copying | MirrorState::Mirrored if roll == 99 && run.rng.chance(20) => {
                discarded = disk.cancel().expect("cancel");
                assert!(discarded.is_some());
                assert_eq!(disk.state(), MirrorState::Cancelled);
            }
            MirrorState::Mirrored if roll < 10 => {
                source_back = Some(disk.switch_over().expect("switch over"));
                assert_eq!(disk.state(), MirrorState::SwitchedOver);
            }
            _ if roll < 90 => run.write(&mut disk),
            _ => run.read_check(&mut disk),
        }
        if disk.state() == MirrorState::Failed && discarded.is_none() {
            discarded = disk.take_discarded();
            assert!(
                discarded.is_some(),
                "a failed mirror hands back its destination"
            );
            assert!(disk.progress().failure.is_some());
        }
    }
    let state = disk.state();
    let progress = disk.progress();
    assert!(progress.bytes_copied <= progress.bytes_total);
    assert!(progress.percent() <= 100);
    let (source, dest) = disk.into_parts();
    let ctx = format!("seed {seed}, state {state}, src {src_plan:?}, dst {dst_plan:?}");
    match state {
        MirrorState::SwitchedOver => {
            assert!(source.is_none() && source_back.is_some());
            check_survivor(dest.expect("destination"), &run.model, &ctx);
        }
        MirrorState::Mirrored => {
            // Both copies hold every acknowledged write.
            check_survivor(source.expect("source"), &run.model, &ctx);
            check_survivor(dest.expect("destination"), &run.model, &ctx);
        }
        MirrorState::Copying | MirrorState::Cancelled | MirrorState::Failed => {
            check_survivor(source.expect("source"), &run.model, &ctx);
        }
    }
}

#[test]
fn mirror_matches_model_under_faults() {
    for seed in 0..CASES {
        run_case(seed);
    }
}

#[test]
fn clean_run_reaches_switch_over_with_identical_copies() {
    let mut src = mem_disk(SECTORS);
    src.write(0, &write_data(1, 0, SECTORS)).unwrap();
    let dst = mem_disk(SECTORS);
    let mut disk = MirroredDisk::new(src, dst, CopyOptions::default()).unwrap();
    assert_eq!(disk.progress().percent(), 0);
    // Writes behind and ahead of the cursor while copying in small chunks.
    let mut steps = 0;
    loop {
        let w = (steps * 7) % SECTORS;
        disk.write(w * SECTOR as u64, &write_data(100 + steps, w, 1))
            .unwrap();
        steps += 1;
        if disk.step().unwrap() == Step::Mirrored {
            break;
        }
    }
    let p = disk.progress();
    assert_eq!(p.state, MirrorState::Mirrored);
    assert_eq!((p.bytes_copied, p.percent()), (SECTORS * 512, 100));
    disk.write(0, &write_data(999, 0, 1)).unwrap();
    assert!(disk.progress().mirrored_writes >= 1);
    let source = disk.switch_over().unwrap();
    let (_, dest) = disk.into_parts();
    assert_eq!(source.into_inner(), dest.unwrap().into_inner());
}

#[test]
fn failed_mirror_write_fails_the_migration_not_the_guest() {
    let src = mem_disk(SECTORS);
    // The destination's first write is the first chunk; its second is the
    // mirrored copy of the guest write below.
    let plan = FaultPlan {
        fail_write: Some(2),
        ..FaultPlan::default()
    };
    let dst = FaultyDisk::new(mem_disk(SECTORS), plan);
    let opts = CopyOptions {
        chunk_bytes: CHUNK,
        ..CopyOptions::default()
    };
    let mut disk = MirroredDisk::new(src, dst, opts).unwrap();
    assert!(matches!(disk.step().unwrap(), Step::Copied(_)));
    // Behind the cursor: must be mirrored, and the mirror copy fails.
    disk.write(0, &write_data(7, 0, 1)).unwrap();
    assert_eq!(disk.state(), MirrorState::Failed);
    assert!(disk.take_discarded().is_some());
    assert!(disk.step().is_err());
    assert!(disk.switch_over().is_err());
    // The guest carries on with the source, which holds the write.
    disk.write(512, &write_data(8, 1, 1)).unwrap();
    let mut model = Model::new(SECTORS);
    model.acked(7, 0, 1);
    model.acked(8, 1, 1);
    model.check(&mut disk, "source after a failed mirror");
}

#[test]
fn switch_over_before_copy_done_is_refused() {
    let src = mem_disk(SECTORS);
    let dst = mem_disk(SECTORS);
    let mut disk = MirroredDisk::new(src, dst, CopyOptions::default()).unwrap();
    assert!(disk.switch_over().is_err());
    assert_eq!(disk.state(), MirrorState::Copying);
    assert!(disk.cancel().unwrap().is_some());
    assert!(disk.step().is_err());
    assert!(disk.switch_over().is_err());
}

#[test]
fn mismatched_geometry_is_refused() {
    let src = mem_disk(SECTORS);
    let dst = mem_disk(SECTORS / 2);
    assert!(MirroredDisk::new(src, dst, CopyOptions::default()).is_err());
}
