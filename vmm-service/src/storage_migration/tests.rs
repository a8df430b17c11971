//! Storage migration over files in memory: a VM's disk moves while its
//! guest writes (ahead of the copy, behind it, into holes), and the new
//! file must hold exactly what the guest sees, with the source's holes;
//! cancel and a full destination leave the VM on its source with every
//! write; the source file is deleted only after the switch.

use super::testing::MemFiles;
use super::*;
use crate::disks::{DiskMeta, MemFile, MEM_BLOCK_BYTES};
use crate::loader::build::kernel;
use crate::testing::FakeHost;
use alloc::vec;
use core::cell::Cell;
use vstorage::vhdx::OpenOptions;
use vstorage::MemIo;

const MIB: u64 = 1 << 20;
const DISK: u64 = 8 * MIB;
const SOURCE: &str = "local:vms/v/v-0.vhdx";

fn fill(tag: u8, len: u64) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ tag).collect()
}

/// A VM with an 8 MiB disk (1 MiB blocks) at `SOURCE` in `files`, data
/// in blocks 0, 1 and 5; returns the VM and the model of its disk.
fn vm_with_disk(host: &mut FakeHost, files: &MemFiles) -> (Vm, Vec<u8>) {
    let file = MemFile::new(64 * MIB).unwrap();
    files.files.borrow_mut().insert(SOURCE.into(), file.clone());
    let params = CreateParams {
        block_size: MEM_BLOCK_BYTES,
        ..CreateParams::dynamic(DISK)
    };
    let mut disk = vhdx::create(file, &params).unwrap();
    let mut model = vec![0u8; DISK as usize];
    for (block, tag) in [(0u64, 1u8), (1, 2), (5, 3)] {
        let data = fill(tag, MIB);
        disk.write(block * MIB, &data).unwrap();
        model[(block * MIB) as usize..((block + 1) * MIB) as usize].copy_from_slice(&data);
    }
    disk.flush().unwrap();
    let mut vm = Vm::create(host, "v", 4 << 20, &kernel(), "case=x").unwrap();
    let meta = DiskMeta {
        backing: Backing::File {
            location: SOURCE.into(),
        },
        fixed: false,
        virtual_bytes: DISK,
        block_bytes: MEM_BLOCK_BYTES,
        checkpoint: None,
    };
    assert_eq!(vm.attach_disk(Box::new(disk), meta), Some(0));
    (vm, model)
}

/// A guest write through the VM's disk, recorded in the model.
fn guest_write(vm: &mut Vm, model: &mut [u8], at: u64, tag: u8, len: u64) {
    let data = fill(tag, len);
    vm.disk_mut(0).unwrap().write(at, &data).unwrap();
    model[at as usize..(at + len) as usize].copy_from_slice(&data);
}

fn guest_sees(vm: &mut Vm) -> Vec<u8> {
    let mut all = vec![0u8; DISK as usize];
    vm.disk_mut(0).unwrap().read(0, &mut all).unwrap();
    all
}

/// One chunk per step: the clock moves by one per call, the budget is 1.
fn tick() -> impl Fn() -> u64 {
    let t = Cell::new(0u64);
    move || {
        t.set(t.get() + 1);
        t.get()
    }
}

#[test]
fn a_disk_moves_while_the_guest_writes_and_keeps_its_holes() {
    let mut host = FakeHost::new();
    let files = MemFiles::new(64 * MIB);
    let (mut vm, mut model) = vm_with_disk(&mut host, &files);
    let plan = plan(&vm, Some("shared:vms/v"), &[], false).unwrap();
    assert_eq!(plan.targets, [Some("shared:vms/v/v-0.vhdx".to_string())]);
    let mut job = StorageMove::new(&vm, &files, plan).unwrap();
    let clock = tick();
    let mut steps = 0;
    loop {
        let p = job.step(&mut vm, &files, &clock, 1).unwrap();
        steps += 1;
        // Behind the cursor, ahead of it, and into a hole, each round.
        match steps {
            1 => {
                assert!(files
                    .names()
                    .contains(&"shared:vms/v/v-0.vhdx.partial-a".into()));
                guest_write(&mut vm, &mut model, 0, 9, 4096);
                guest_write(&mut vm, &mut model, 5 * MIB + 512, 10, 8192);
            }
            2 => guest_write(&mut vm, &mut model, 7 * MIB, 11, MIB),
            3 => guest_write(&mut vm, &mut model, MIB - 512, 12, 1024),
            _ => {}
        }
        assert_eq!(guest_sees(&mut vm), model, "step {steps}");
        match p {
            Progress::Running {
                bytes_done,
                bytes_total,
            } => {
                assert!(bytes_done <= bytes_total);
                assert_eq!(bytes_total, 3 * MIB, "allocated bytes only");
            }
            Progress::Done { summary } => {
                assert_eq!(summary, format!("moved {SOURCE} -> shared:vms/v/v-0.vhdx"));
                break;
            }
        }
        assert!(steps < 100);
    }
    // The source file is gone, the destination has its name, the VM reads
    // it and lists it.
    assert_eq!(files.names(), ["shared:vms/v/v-0.vhdx"]);
    assert_eq!(vm.disk_meta()[0].location(), "shared:vms/v/v-0.vhdx");
    assert_eq!(guest_sees(&mut vm), model);
    guest_write(&mut vm, &mut model, 3 * MIB, 13, 4096);
    vm.disk_mut(0).unwrap().flush().unwrap();
    // The new file, as a host tool opens it: valid, the guest's bytes,
    // and the source's holes (blocks 2, 3, 4, 6 were never written; 3
    // only after the switch).
    let bytes = files.bytes("shared:vms/v/v-0.vhdx");
    let mut d = Vhdx::open(MemIo::from_vec(bytes), OpenOptions::read_only()).unwrap();
    d.verify().unwrap();
    let mut all = vec![0u8; DISK as usize];
    d.read(0, &mut all).unwrap();
    assert_eq!(all, model);
    let ranges = d.allocated_ranges().unwrap();
    let blocks: Vec<u64> = ranges
        .iter()
        .flat_map(|&(o, l)| (o / MIB)..((o + l) / MIB))
        .collect();
    assert_eq!(blocks, [0, 1, 3, 5, 7]);
}

#[test]
fn cancel_leaves_the_vm_on_its_source_with_every_write() {
    let mut host = FakeHost::new();
    let files = MemFiles::new(64 * MIB);
    let (mut vm, mut model) = vm_with_disk(&mut host, &files);
    let plan = plan(&vm, Some("shared"), &[], false).unwrap();
    let mut job = StorageMove::new(&vm, &files, plan).unwrap();
    let clock = tick();
    job.step(&mut vm, &files, &clock, 1).unwrap();
    guest_write(&mut vm, &mut model, 6 * MIB, 20, 4096);
    job.step(&mut vm, &files, &clock, 1).unwrap();
    job.cancel(&mut vm, &files);
    assert_eq!(files.names(), [SOURCE], "no partial file left");
    assert_eq!(vm.disk_meta()[0].location(), SOURCE);
    guest_write(&mut vm, &mut model, 2 * MIB, 21, 4096);
    assert_eq!(guest_sees(&mut vm), model);
    vm.disk_mut(0).unwrap().flush().unwrap();
    // The writes are in the source file itself.
    let (disks, _) = vm.take_disks();
    drop(disks);
    let mut d = Vhdx::open(
        MemIo::from_vec(files.bytes(SOURCE)),
        OpenOptions::read_only(),
    )
    .unwrap();
    let mut all = vec![0u8; DISK as usize];
    d.read(0, &mut all).unwrap();
    assert_eq!(all, model);
}

#[test]
fn a_full_destination_fails_the_move_and_the_vm_runs_on() {
    let mut host = FakeHost::new();
    // Room for the VHDX's metadata and about one block.
    let files = MemFiles::new(6 * MIB);
    let (mut vm, mut model) = vm_with_disk(&mut host, &files);
    let plan = plan(&vm, Some("shared"), &[], false).unwrap();
    let mut job = StorageMove::new(&vm, &files, plan).unwrap();
    let clock = tick();
    let mut err = None;
    for _ in 0..20 {
        guest_write(&mut vm, &mut model, 4096, 30, 4096);
        match job.step(&mut vm, &files, &clock, 1) {
            Ok(Progress::Running { .. }) => {}
            Ok(Progress::Done { .. }) => panic!("the copy cannot fit"),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let err = err.expect("the move fails");
    assert!(err.contains("runs on from its source"), "{err}");
    assert_eq!(files.names(), [SOURCE]);
    guest_write(&mut vm, &mut model, 7 * MIB, 31, 4096);
    assert_eq!(guest_sees(&mut vm), model);
}

#[test]
fn keep_source_and_plans() {
    let mut host = FakeHost::new();
    let files = MemFiles::new(64 * MIB);
    let (mut vm, model) = vm_with_disk(&mut host, &files);
    let p = plan(&vm, None, &["0=shared:x/new.vhdx".into()], true).unwrap();
    assert_eq!(p.targets, [Some("shared:x/new.vhdx".to_string())]);
    assert_eq!(
        plan(&vm, None, &[format!("{SOURCE}=shared:y.vhdx")], false)
            .unwrap()
            .targets,
        [Some("shared:y.vhdx".to_string())]
    );
    for bad in [
        plan(&vm, None, &[], false),
        plan(&vm, None, &["3=shared:a".into()], false),
        plan(&vm, None, &["0=nostore".into()], false),
        plan(&vm, None, &["0".into()], false),
        plan(&vm, None, &[format!("0={SOURCE}")], false),
    ] {
        assert!(bad.is_err(), "{bad:?}");
    }
    assert!(StorageMove::new(
        &vm,
        &files,
        plan(&vm, Some("elsewhere"), &[], false).unwrap()
    )
    .is_err());
    let mut job = StorageMove::new(&vm, &files, p).unwrap();
    let clock = tick();
    while let Progress::Running { .. } = job.step(&mut vm, &files, &clock, 1).unwrap() {}
    assert_eq!(
        files.names(),
        [SOURCE, "shared:x/new.vhdx"],
        "the source is kept"
    );
    assert_eq!(guest_sees(&mut vm), model);
}

#[test]
fn a_rate_limit_spaces_the_copy_and_the_guest_writes_on() {
    assert!(under_rate(0, 0, 1));
    assert!(under_rate(u64::MAX, 0, 0), "0: no limit");
    assert!(under_rate(MIB, 1_000_000_000, MIB));
    assert!(!under_rate(MIB + 1, 1_000_000_000, MIB));
    assert!(under_rate(u64::MAX, u64::MAX, u64::MAX), "no overflow");

    let mut host = FakeHost::new();
    let files = MemFiles::new(64 * MIB);
    let (mut vm, mut model) = vm_with_disk(&mut host, &files);
    let p = plan(&vm, Some("shared"), &[], false).unwrap();
    let mut job = StorageMove::new(&vm, &files, p).unwrap().with_rate(MIB);
    let now = Cell::new(0u64);
    let clock = || now.get();
    let copied = |p: Progress| match p {
        Progress::Running { bytes_done, .. } => bytes_done,
        Progress::Done { .. } => u64::MAX,
    };
    let first = copied(job.step(&mut vm, &files, &clock, 0).unwrap());
    assert!(first > 0 && first < 3 * MIB, "{first}");
    for _ in 0..5 {
        guest_write(&mut vm, &mut model, 6 * MIB, 40, 4096);
        let again = copied(job.step(&mut vm, &files, &clock, 0).unwrap());
        assert_eq!(again, first, "no time passed: nothing more copied");
    }
    assert_eq!(guest_sees(&mut vm), model);
    // Time passes: the copy goes on and ends.
    let mut rounds = 0;
    loop {
        now.set(now.get() + 1_000_000_000);
        if copied(job.step(&mut vm, &files, &clock, 0).unwrap()) == u64::MAX {
            break;
        }
        rounds += 1;
        assert!(rounds < 10);
    }
    assert_eq!(files.names(), ["shared:vms/v/v-0.vhdx"]);
    assert_eq!(guest_sees(&mut vm), model);
}

#[test]
fn zeros_in_the_source_stay_holes_and_zero_writes_reach_the_destination() {
    let mut host = FakeHost::new();
    let files = MemFiles::new(64 * MIB);
    let (mut vm, mut model) = vm_with_disk(&mut host, &files);
    // Block 2 allocated on the source but all zeros.
    vm.disk_mut(0)
        .unwrap()
        .write(2 * MIB, &vec![0u8; MIB as usize])
        .unwrap();
    let plan = plan(&vm, Some("shared"), &[], false).unwrap();
    let mut job = StorageMove::new(&vm, &files, plan).unwrap();
    let clock = tick();
    let mut steps = 0;
    loop {
        let p = job.step(&mut vm, &files, &clock, 1).unwrap();
        steps += 1;
        if steps == 1 {
            // Zeros over data behind the cursor (mirrored) and over a
            // whole block ahead of it (the copy finds it all zeros).
            let zeros = vec![0u8; MIB as usize];
            vm.disk_mut(0).unwrap().write(0, &zeros[..4096]).unwrap();
            model[..4096].fill(0);
            vm.disk_mut(0).unwrap().write(5 * MIB, &zeros).unwrap();
            model[(5 * MIB) as usize..(6 * MIB) as usize].fill(0);
        }
        if matches!(p, Progress::Done { .. }) {
            break;
        }
        assert!(steps < 100);
    }
    assert_eq!(guest_sees(&mut vm), model);
    let report = job.report();
    // Blocks 0 and 1 written; 2 and 5 read, and found zeros.
    assert!(report.contains("(4 MiB read, 2 MiB written"), "{report}");
    vm.disk_mut(0).unwrap().flush().unwrap();
    let bytes = files.bytes("shared:vms/v/v-0.vhdx");
    let mut d = Vhdx::open(MemIo::from_vec(bytes), OpenOptions::read_only()).unwrap();
    d.verify().unwrap();
    let mut all = vec![0u8; DISK as usize];
    d.read(0, &mut all).unwrap();
    assert_eq!(all, model);
    let blocks: Vec<u64> = d
        .allocated_ranges()
        .unwrap()
        .iter()
        .flat_map(|&(o, l)| (o / MIB)..((o + l) / MIB))
        .collect();
    assert_eq!(blocks, [0, 1], "the all-zero blocks 2 and 5 stay holes");
}
