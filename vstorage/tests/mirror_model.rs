//! Property tests (proptest) of the single-threaded mirror
//! ([`MirroredDisk`]) against a model: generated interleavings of guest
//! writes, copy steps, reads, flushes, cancel and switch-over, with a fault
//! injected on the source or the destination at a generated operation. After every run the surviving disk (and, once
//! mirrored, both) must hold exactly the acknowledged writes, after losing
//! everything that was not flushed. Half the runs let the copy skip
//! all-zero chunks (the destination stays sparse); then the zero writes the
//! guest makes over data, behind and ahead of the cursor, must still end
//! as zeros on the destination.

mod mirror_support;

use mirror_support::{decode, mem_disk, write_data, Model, SECTOR};
use proptest::prelude::*;
use vstorage::copy::CopyOptions;
use vstorage::io::{MemIo, RawDisk, VirtualDisk};
use vstorage::mirror::fault::{FaultPlan, FaultyDisk};
use vstorage::mirror::{MirrorState, MirroredDisk, SharedMirror, Step};
use vstorage::vhdx::{self, CreateParams, Vhdx};

type Disk = FaultyDisk<RawDisk<MemIo>>;

const SECTORS: u64 = 512;
const CHUNK: u32 = 8192;
/// 4 KiB allocation units of the source's map.
const MAP_UNITS: usize = (SECTORS as usize * SECTOR) / 4096;

/// One thing the guest or the migration does.
#[derive(Debug, Clone)]
enum Op {
    /// Guest write of `len` sectors at `first` (zeros when `zeros`).
    Write { first: u64, len: u64, zeros: bool },
    /// One copy step.
    Step,
    /// Guest read of one sector, checked against the model.
    Read(u64),
    /// Guest flush.
    Flush,
    /// Switch-over, when the destination is complete.
    SwitchOver,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..SECTORS, 1..=4u64, prop::bool::weighted(0.3)).prop_map(|(first, len, zeros)| {
            Op::Write { first, len: len.min(SECTORS - first), zeros }
        }),
        5 => Just(Op::Step),
        1 => (0..SECTORS).prop_map(Op::Read),
        1 => Just(Op::Flush),
        1 => Just(Op::SwitchOver),
    ]
}

/// At most one injected fault, at operation 1..60 of its kind.
fn fault_plan() -> impl Strategy<Value = FaultPlan> {
    (
        0..6u8,
        1..60u64,
        any::<bool>(),
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.3),
    )
        .prop_map(|(kind, n, volatile, sticky, torn)| {
            let mut plan = FaultPlan {
                volatile,
                sticky,
                torn,
                ..FaultPlan::default()
            };
            match kind {
                0 => plan.fail_write = Some(n),
                1 => plan.fail_flush = Some(n),
                2 => plan.fail_read = Some(n),
                _ => {}
            }
            plan
        })
}

/// The source's allocation map: 4 KiB units, or the whole disk (`None`).
fn alloc_map() -> impl Strategy<Value = Option<Vec<(u64, u64)>>> {
    prop::option::weighted(0.7, prop::collection::vec(any::<bool>(), MAP_UNITS)).prop_map(|m| {
        m.map(|units| {
            units
                .iter()
                .enumerate()
                .filter(|(_, &on)| on)
                .map(|(i, _)| (i as u64 * 4096, 4096))
                .collect()
        })
    })
}

fn check_survivor(mut disk: Disk, model: &Model, what: &str) {
    disk.crash();
    model.check(disk.inner_mut(), what);
}

/// Runs `ops` (cancelling before op `cancel_at`, if any) and checks the
/// surviving copies against the model.
fn run_case(
    map: Option<Vec<(u64, u64)>>,
    src_plan: FaultPlan,
    dst_plan: FaultPlan,
    ops: &[Op],
    cancel_at: Option<usize>,
    skip_zeros: bool,
    zero_filled: bool,
) {
    let mut model = Model::new(SECTORS);
    // Initial contents: the allocated part of the source holds data, or
    // (`zero_filled`) zeros, so that whole chunks read as zeros and the
    // zero-skip meets the guest's mirrored writes ahead of the cursor.
    let mut src_raw = mem_disk(SECTORS);
    let mut next_id = 0;
    for (off, len) in map.clone().unwrap_or(vec![(0, SECTORS * SECTOR as u64)]) {
        let (first, n) = (off / SECTOR as u64, len / SECTOR as u64);
        next_id += 1;
        let id = if zero_filled { 0 } else { next_id };
        src_raw
            .write(off, &write_data(id, first, n))
            .expect("fill source");
        model.acked(id, first, n);
    }
    let src_plan = FaultPlan {
        allocated: map,
        ..src_plan
    };
    let src = FaultyDisk::new(src_raw, src_plan);
    let dst = FaultyDisk::new(mem_disk(SECTORS), dst_plan);
    let opts = CopyOptions {
        chunk_bytes: CHUNK,
        skip_zero_chunks: skip_zeros,
    };
    let mut disk = MirroredDisk::new(src, dst, opts).expect("start mirror");
    let mut source_back = None;
    let mut discarded = None;
    for (i, op) in ops.iter().enumerate() {
        if cancel_at == Some(i) && disk.state().mirrors() {
            discarded = disk.cancel().expect("cancel");
            assert!(discarded.is_some());
            assert_eq!(disk.state(), MirrorState::Cancelled);
        }
        match *op {
            Op::Write { first, len, zeros } => {
                next_id += 1;
                let id = if zeros { 0 } else { next_id };
                match disk.write(first * SECTOR as u64, &write_data(id, first, len)) {
                    Ok(()) => model.acked(id, first, len),
                    Err(_) => model.unacked(id, first, len),
                }
            }
            Op::Step if disk.state() == MirrorState::Copying => {
                if disk.step().is_err() {
                    assert_eq!(disk.state(), MirrorState::Failed);
                }
            }
            Op::Read(s) => {
                let mut buf = [0u8; SECTOR];
                // A read may fail under an injected fault; when it succeeds
                // it must show an allowed write.
                if disk.read(s * SECTOR as u64, &mut buf).is_ok() {
                    let got = decode(s, &buf);
                    let allowed = &model.allowed[s as usize];
                    assert!(
                        got.is_some_and(|id| allowed.contains(&id)),
                        "read of sector {s} returned {got:?}, allowed {allowed:?}"
                    );
                }
            }
            Op::Flush => {
                // A failed flush only means the unflushed writes may be lost:
                // every acknowledged write was flushed already.
                let _ = disk.flush();
            }
            Op::SwitchOver if disk.state() == MirrorState::Mirrored => {
                source_back = Some(disk.switch_over().expect("switch over"));
                assert_eq!(disk.state(), MirrorState::SwitchedOver);
            }
            Op::Step | Op::SwitchOver => {}
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
    let ctx = format!("final state {state}");
    match state {
        MirrorState::SwitchedOver => {
            assert!(source.is_none() && source_back.is_some());
            check_survivor(dest.expect("destination"), &model, &ctx);
        }
        MirrorState::Mirrored => {
            // Both copies hold every acknowledged write.
            check_survivor(source.expect("source"), &model, &ctx);
            check_survivor(dest.expect("destination"), &model, &ctx);
        }
        MirrorState::Copying | MirrorState::Cancelled | MirrorState::Failed => {
            check_survivor(source.expect("source"), &model, &ctx);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn mirror_matches_model_under_faults(
        map in alloc_map(),
        src_plan in fault_plan(),
        dst_plan in fault_plan(),
        ops in prop::collection::vec(op(), 1..220),
        cancel_at in prop::option::weighted(0.25, 0..220usize),
        skip_zeros in any::<bool>(),
        zero_filled in prop::bool::weighted(0.3),
    ) {
        run_case(map, src_plan, dst_plan, &ops, cancel_at, skip_zeros, zero_filled);
    }
}

/// Guest writes of zeros and data, up to 8 sectors, or copy steps.
fn zero_heavy_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..SECTORS, 1..=8u64, any::<bool>()).prop_map(|(first, len, zeros)| {
            Op::Write { first, len: len.min(SECTORS - first), zeros }
        }),
        3 => Just(Op::Step),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// No faults, the copy always skipping zeros, a source whose planned
    /// ranges read as zeros: chunks are often all zeros, and the guest's
    /// data and zeros land on both sides of the cursor and of the plan's
    /// holes. The run ends mirrored and switched over, so the destination
    /// is checked against every acknowledged write.
    #[test]
    fn zero_skip_matches_model(
        map in alloc_map(),
        mut ops in prop::collection::vec(zero_heavy_op(), 1..160),
    ) {
        ops.extend(core::iter::repeat_n(Op::Step, 80));
        ops.push(Op::SwitchOver);
        run_case(map, FaultPlan::default(), FaultPlan::default(), &ops, None, true, true);
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

const MIB: u64 = 1 << 20;
const ZERO_CHUNK: u32 = 64 << 10;

/// An 8 MiB dynamic VHDX in memory with 1 MiB blocks; `data` MiB of it
/// written with stamps of write 1.
fn vhdx_disk(data: u64) -> Vhdx<MemIo> {
    let params = CreateParams {
        block_size: MIB as u32,
        guid_seed: 7,
        ..CreateParams::dynamic(8 * MIB)
    };
    let mut d = vhdx::create(MemIo::new(), &params).expect("create VHDX");
    if data > 0 {
        let sectors = data * MIB / SECTOR as u64;
        d.write(0, &write_data(1, 0, sectors)).expect("fill");
    }
    d
}

/// The guest's writes of the zero-skip cases, made after the first chunk
/// `[0, 64 KiB)` of a plan `[0, 3 MiB)` is copied: zeros over data behind
/// the cursor (mirrored); data straddling the plan's end (mirrored: part of
/// it lands on the destination *ahead* of the cursor); zeros over that, all
/// inside the plan and ahead (not mirrored: the copy carries it, and must
/// write its zeros over what the mirrored write left); zeros over a whole
/// block ahead (not mirrored; its chunks stay holes).
fn zero_writes(disk: &mut dyn VirtualDisk) {
    let s = SECTOR as u64;
    disk.write(0, &write_data(0, 0, 8)).unwrap();
    let straddle = 3 * MIB - 1024;
    disk.write(straddle, &write_data(2, straddle / s, 4))
        .unwrap();
    let tail = 3 * MIB - u64::from(ZERO_CHUNK);
    disk.write(tail, &write_data(0, tail / s, u64::from(ZERO_CHUNK) / s))
        .unwrap();
    disk.write(MIB, &write_data(0, MIB / s, MIB / s)).unwrap();
}

fn whole(disk: &mut dyn VirtualDisk) -> Vec<u8> {
    let mut v = vec![0u8; disk.virtual_size() as usize];
    disk.read(0, &mut v).unwrap();
    v
}

/// The checks after a zero-skip case: both copies read the same, the
/// zeros the guest wrote read as zeros on the destination, and the block
/// the guest zeroed ahead of the cursor was never allocated there.
fn check_zero_case(src: &mut dyn VirtualDisk, dst: &mut dyn VirtualDisk) {
    let want = whole(src);
    let got = whole(dst);
    assert!(want == got, "the destination differs from the source");
    let tail = (3 * MIB - u64::from(ZERO_CHUNK)) as usize;
    assert!(got[tail..(3 * MIB - 1024) as usize].iter().all(|&b| b == 0));
    assert!(got[..4096].iter().all(|&b| b == 0));
    let allocated = dst.allocated_ranges().unwrap();
    assert!(
        allocated.iter().all(|&(o, l)| o + l <= MIB || o >= 2 * MIB),
        "the zeroed block was allocated on the destination: {allocated:?}"
    );
}

#[test]
fn zero_chunks_stay_holes_and_zero_writes_reach_the_destination() {
    let opts = CopyOptions {
        chunk_bytes: ZERO_CHUNK,
        skip_zero_chunks: true,
    };
    let mut disk = MirroredDisk::new(vhdx_disk(3), vhdx_disk(0), opts).unwrap();
    assert!(matches!(disk.step().unwrap(), Step::Copied(_)));
    zero_writes(&mut disk);
    disk.run_to_mirrored().unwrap();
    let stats = disk.stats();
    // The zeroed block's 16 chunks; not the chunk the mirrored write reached.
    assert_eq!(stats.zero_chunks_skipped, 16, "{stats:?}");
    assert_eq!(stats.chunks, 48);
    let mut source = disk.switch_over().unwrap();
    let (_, dest) = disk.into_parts();
    check_zero_case(&mut source, &mut dest.expect("destination"));
}

#[test]
fn shared_mirror_skips_zero_chunks_the_same_way() {
    let opts = CopyOptions {
        chunk_bytes: ZERO_CHUNK,
        skip_zero_chunks: true,
    };
    let mirror = SharedMirror::new(vhdx_disk(3), vhdx_disk(0), opts).unwrap();
    let mut buf = Vec::new();
    assert!(matches!(mirror.step(&mut buf).unwrap(), Step::Copied(_)));
    let mut guest = mirror.disk();
    zero_writes(&mut guest);
    mirror.run_to_mirrored().unwrap();
    let mut source = mirror.switch_over().unwrap();
    // After the switch the guest's disk is the destination.
    check_zero_case(&mut source, &mut guest);
}

#[test]
fn without_the_option_zero_chunks_are_written() {
    let opts = CopyOptions {
        chunk_bytes: ZERO_CHUNK,
        skip_zero_chunks: false,
    };
    let mut disk = MirroredDisk::new(vhdx_disk(3), vhdx_disk(0), opts).unwrap();
    assert!(matches!(disk.step().unwrap(), Step::Copied(_)));
    zero_writes(&mut disk);
    disk.run_to_mirrored().unwrap();
    assert_eq!(disk.stats().zero_chunks_skipped, 0);
    let mut source = disk.switch_over().unwrap();
    let (_, dest) = disk.into_parts();
    let mut dest = dest.unwrap();
    assert!(whole(&mut source) == whole(&mut dest));
    // Block 3 too: the mirrored write straddling the plan's end.
    assert_eq!(dest.allocated_ranges().unwrap(), vec![(0, 4 * MIB)]);
}
