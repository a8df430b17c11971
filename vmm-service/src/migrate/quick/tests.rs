//! The quick move's disk work over files in memory, the destination a new
//! VHDX as the destination node's sink makes it: the destination ends
//! with exactly what the guest wrote before and after the checkpoint
//! (over the base's data, into holes, zeros over data), the base is never
//! written, the files here go only at the end; a move that fails leaves
//! the VM on its disk with every write, merged back or kept and said so.

use super::super::remote_disk::DiskSink;
use super::*;
use crate::checkpoint::tests::{
    file_reads, guest_sees, guest_write, vm_with_disk, BASE, CHILD, CONFIG, DISK, MIB,
};
use crate::disks::{MemFile, MEM_BLOCK_BYTES};
use crate::storage_migration::testing::MemFiles;
use crate::testing::FakeHost;
use crate::vmconfig;
use alloc::rc::Rc;
use alloc::string::ToString;
use alloc::vec;
use core::cell::Cell;
use vstorage::vhdx::{self, CreateParams};

/// The destination's new disk (what b's sink creates for the base).
fn target() -> (Vhdx<MemFile>, MemFile) {
    let file = MemFile::new(64 * MIB).unwrap();
    let params = CreateParams {
        block_size: MEM_BLOCK_BYTES,
        ..CreateParams::dynamic(DISK)
    };
    (vhdx::create(file.clone(), &params).unwrap(), file)
}

fn reads(file: &MemFile) -> Vec<u8> {
    let mut d = Vhdx::open(
        vstorage::MemIo::from_vec(file.bytes()),
        OpenOptions::read_only(),
    )
    .unwrap();
    let mut all = vec![0u8; DISK as usize];
    d.read(0, &mut all).unwrap();
    all
}

/// `got` equals `want`, or the first difference is named.
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: byte {i} (MiB {}) is {} not {}",
            i >> 20,
            got[i],
            want[i]
        );
    }
}

/// One chunk per call: the clock moves by one each time it is read.
fn tick() -> impl Fn() -> u64 {
    let t = Cell::new(0u64);
    move || {
        t.set(t.get() + 1);
        t.get()
    }
}

#[test]
fn the_destination_gets_the_base_then_the_checkpoint_and_the_source_files_go() {
    let mut host = FakeHost::new();
    let files = MemFiles::new(64 * MIB);
    let (mut vm, mut model) = vm_with_disk(&mut host, &files, &files);
    guest_write(&mut vm, &mut model, 5 * MIB, 3, 64 << 10);
    let at_checkpoint = model.clone();
    let mut q = QuickDisks::start(&mut vm, &files).unwrap();
    assert_eq!(q.files(), [(BASE.to_string(), CHILD.to_string())]);
    assert_eq!(q.base_bytes(), (0, 3 * MIB), "allocated blocks only");
    let (mut dest, dest_file) = target();
    let clock = tick();
    let mut yes = || true;
    let mut calls = 0;
    let mut growth = Vec::new();
    loop {
        let step = q
            .copy_base(&mut [&mut dest], &mut yes, &clock, clock() + 1)
            .unwrap();
        calls += 1;
        // The guest writes on meanwhile: over the base's data (copied and
        // not yet), into a hole, zeros over data, part of a sector run.
        match calls {
            1 => guest_write(&mut vm, &mut model, 512, 9, 1024),
            2 => guest_write(&mut vm, &mut model, 3 * MIB + 4096, 10, 8192),
            3 => {
                vm.disk_mut(0)
                    .unwrap()
                    .write(5 * MIB, &[0u8; 4096])
                    .unwrap();
                model[(5 * MIB) as usize..(5 * MIB + 4096) as usize].fill(0);
            }
            4 => guest_write(&mut vm, &mut model, 7 * MIB, 11, 4096),
            _ => {}
        }
        vm.disk_mut(0).unwrap().flush().unwrap();
        growth.push(q.child_bytes());
        if step == Step::Done {
            break;
        }
        assert!(calls < 1000);
    }
    assert!(calls > 4, "the copy took several steps: {calls}");
    assert_eq!(q.phase(), Phase::BaseCopied);
    assert_eq!(q.base_bytes(), (3 * MIB, 3 * MIB));
    assert!(growth.windows(2).all(|w| w[0] <= w[1]), "{growth:?}");
    // What the guest wrote, to the sector.
    const WRITTEN: u64 = 1024 + 8192 + 4096 + 4096;
    assert_eq!(q.child_bytes(), WRITTEN);
    assert_eq!(q.child_bytes_at_base_copied(), WRITTEN);
    dest.flush().unwrap();
    same(
        &reads(&dest_file),
        &at_checkpoint,
        "the base as of the checkpoint",
    );
    same(
        &file_reads(&files, BASE),
        &at_checkpoint,
        "the base is frozen",
    );

    // The pause: the children's ranges through the chain.
    assert_eq!(q.start_fold().unwrap(), WRITTEN);
    let mut steps = 0;
    while q
        .fold(&mut [&mut dest], &mut yes, &clock, clock() + 1)
        .unwrap()
        != Step::Done
    {
        steps += 1;
        assert!(steps < 1000);
    }
    assert_eq!(q.fold_bytes(), (WRITTEN, WRITTEN));
    dest.flush().unwrap();
    drop(dest);
    same(&reads(&dest_file), &model, "every write, before and after");
    same(&guest_sees(&mut vm), &model, "the guest's view");

    // The VM resumed at the destination and left this node.
    vm.destroy();
    assert!(q.finish(&files).is_empty());
    let names = files.names();
    assert!(
        !names.contains(&BASE.to_string()) && !names.contains(&CHILD.to_string()),
        "{names:?}"
    );
}

#[test]
fn a_failed_move_leaves_the_vm_on_its_disk_merged_back_or_kept() {
    let mut host = FakeHost::new();
    let files = MemFiles::new(64 * MIB);
    let (mut vm, mut model) = vm_with_disk(&mut host, &files, &files);
    let mut q = QuickDisks::start(&mut vm, &files).unwrap();
    let (mut dest, _) = target();
    let clock = tick();
    // The destination takes nothing: blocked, nothing copied.
    let mut no = || false;
    assert_eq!(
        q.copy_base(&mut [&mut dest], &mut no, &clock, u64::MAX)
            .unwrap(),
        Step::Blocked
    );
    assert_eq!(q.base_bytes().0, 0);
    let mut yes = || true;
    q.copy_base(&mut [&mut dest], &mut yes, &clock, clock() + 1)
        .unwrap();
    guest_write(&mut vm, &mut model, 6 * MIB, 12, 4096);
    // The link is cut: the VM runs on here, the checkpoint merged back.
    assert_eq!(q.abort(&mut vm, &files, true), None);
    same(&guest_sees(&mut vm), &model, "the guest's view");
    guest_write(&mut vm, &mut model, 0, 13, 4096);
    vm.disk_mut(0).unwrap().flush().unwrap();
    same(&file_reads(&files, BASE), &model, "the merged base");
    assert!(!files.names().contains(&CHILD.to_string()));
    assert_eq!(
        vmconfig::read(&files, CONFIG).unwrap().disks[0].checkpoint,
        None
    );

    // Kept instead: said so, and the configuration names it.
    let q = QuickDisks::start(&mut vm, &files).unwrap();
    guest_write(&mut vm, &mut model, MIB, 14, 4096);
    let kept = q.abort(&mut vm, &files, false).unwrap();
    assert!(kept.contains(CHILD) && kept.contains("kept"), "{kept}");
    same(
        &guest_sees(&mut vm),
        &model,
        "the guest's view on the kept chain",
    );
    assert_eq!(
        vmconfig::read(&files, CONFIG).unwrap().disks[0]
            .checkpoint
            .as_deref(),
        Some(CHILD)
    );
}

#[test]
fn a_vm_whose_disk_cannot_take_a_checkpoint_is_refused_untouched() {
    let mut host = FakeHost::new();
    let files = MemFiles::new(64 * MIB);
    let mut vm = Vm::create(
        &mut host,
        "w",
        4 << 20,
        &crate::loader::build::kernel(),
        "case=x",
    )
    .unwrap();
    assert!(QuickDisks::start(&mut vm, &files)
        .unwrap_err()
        .contains("no disk"));
    crate::disks::create_for_vm(&mut vm, None, 1, None, false).unwrap();
    assert!(QuickDisks::start(&mut vm, &files)
        .unwrap_err()
        .contains("node memory"));
    assert!(files.names().is_empty());
}

/// The two ends of the link in memory: what the source sent, what the
/// destination answered; `cut` makes the source's next receive fail.
#[derive(Default)]
struct Link {
    to_b: core::cell::RefCell<alloc::collections::VecDeque<Vec<u8>>>,
    to_a: core::cell::RefCell<alloc::collections::VecDeque<Vec<u8>>>,
    cut: Cell<bool>,
}

impl DiskWire for &Link {
    fn send(&mut self, body: &[u8]) -> Result<(), String> {
        self.to_b.borrow_mut().push_back(body.to_vec());
        Ok(())
    }
    fn recv(&mut self) -> Result<Option<Vec<u8>>, String> {
        if self.cut.get() {
            return Err("link to b lost".into());
        }
        Ok(self.to_a.borrow_mut().pop_front())
    }
}

impl Link {
    /// One source step, then the destination applies what came.
    fn round(
        &self,
        src: &mut QuickSource,
        vm: &mut Vm,
        sink: &mut DiskSink,
        clock: &dyn Fn() -> u64,
    ) -> Result<bool, String> {
        let mut wire = self;
        let done = src.step(vm, &mut wire, clock, clock() + 1)?;
        while let Some(m) = self.to_b.borrow_mut().pop_front() {
            if let Some(ack) = sink.apply(&m).unwrap() {
                self.to_a.borrow_mut().push_back(ack);
            }
        }
        Ok(done)
    }
}

const ON_B: &str = "local:vms/v/v-0.vhdx";

#[test]
fn over_the_remote_disk_target_b_gets_every_write_and_a_deletes_its_files() {
    let mut host = FakeHost::new();
    let a = MemFiles::new(64 * MIB);
    let b = MemFiles::new(64 * MIB);
    let (mut vm, mut model) = vm_with_disk(&mut host, &a, &a);
    let mut src = QuickSource::start(&mut vm, &a).unwrap();
    assert_eq!(src.specs().len(), 1);
    assert_eq!(src.specs()[0].file, "v-0.vhdx", "b's base keeps its name");
    let mut sink = DiskSink::create(Rc::new(b.clone()), "v", None, src.specs()).unwrap();
    let link = Link::default();
    let clock = tick();
    let mut rounds = 0;
    loop {
        let done = link.round(&mut src, &mut vm, &mut sink, &clock).unwrap();
        rounds += 1;
        if !vm.is_paused() {
            // The guest writes on while the base copies.
            match rounds {
                1 => guest_write(&mut vm, &mut model, 4096, 21, 8192),
                2 => guest_write(&mut vm, &mut model, 6 * MIB + 512, 22, 1024),
                3 => {
                    vm.disk_mut(0).unwrap().write(0, &[0u8; 512]).unwrap();
                    model[..512].fill(0);
                }
                _ => {}
            }
        } else {
            assert_ne!(src.stage(), Stage::CopyBase);
        }
        if done {
            break;
        }
        assert!(rounds < 10_000);
    }
    assert!(vm.is_paused(), "the guest is saved for the memory move");
    assert!(src.paused_at().is_some());
    let p = src.progress();
    assert_eq!((p.base_done, p.base_total), (2 * MIB, 2 * MIB));
    // The child's growth while the base copied: what the guest wrote.
    const WRITTEN: u64 = 8192 + 1024 + 512;
    assert_eq!(p.child_max, WRITTEN);
    assert_eq!((p.fold_done, p.fold_total), (WRITTEN, WRITTEN));
    assert_eq!(p.acked, 2 * MIB + WRITTEN, "{p:?}");
    // b commits at the VM's resume there.
    sink.commit().unwrap();
    assert!(b.names().contains(&ON_B.to_string()), "{:?}", b.names());
    same(&file_reads(&b, ON_B), &model, "b's merged base");
    vm.destroy();
    assert!(src.finish(&a).is_empty());
    let left = a.names();
    assert!(
        !left.contains(&BASE.to_string()) && !left.contains(&CHILD.to_string()),
        "{left:?}"
    );
}

#[test]
fn a_link_cut_during_the_base_copy_or_the_fold_leaves_the_vm_on_a() {
    for cut_in_fold in [false, true] {
        let mut host = FakeHost::new();
        let a = MemFiles::new(64 * MIB);
        let b = MemFiles::new(64 * MIB);
        let (mut vm, mut model) = vm_with_disk(&mut host, &a, &a);
        let mut src = QuickSource::start(&mut vm, &a).unwrap();
        let mut sink = DiskSink::create(Rc::new(b.clone()), "v", None, src.specs()).unwrap();
        let link = Link::default();
        let clock = tick();
        let mut rounds = 0;
        let err = loop {
            if !vm.is_paused() {
                guest_write(
                    &mut vm,
                    &mut model,
                    (rounds % 8) * MIB + 4096,
                    30 + rounds as u8,
                    4096,
                );
            }
            let cut_now = if cut_in_fold {
                src.stage() == Stage::Fold
            } else {
                rounds == 2
            };
            link.cut.set(cut_now);
            match link.round(&mut src, &mut vm, &mut sink, &clock) {
                Err(e) => break e,
                Ok(done) => assert!(!done, "the cut came too late"),
            }
            rounds += 1;
            assert!(rounds < 10_000);
        };
        assert!(err.contains("link to b lost"), "{err}");
        assert_eq!(src.stage() == Stage::Fold, cut_in_fold);
        assert_eq!(src.abort(&mut vm, &a, true), None);
        sink.discard();
        assert!(
            b.names().is_empty(),
            "b's partial files removed: {:?}",
            b.names()
        );
        assert!(!vm.is_paused(), "the VM runs on at a");
        same(&guest_sees(&mut vm), &model, "the guest's view");
        vm.disk_mut(0).unwrap().flush().unwrap();
        same(&file_reads(&a, BASE), &model, "a's base, merged");
        assert!(!a.names().contains(&CHILD.to_string()));
    }
}

#[test]
fn a_destination_that_acknowledges_nothing_fails_the_move_in_bounded_time() {
    let mut host = FakeHost::new();
    let a = MemFiles::new(64 * MIB);
    let (mut vm, model) = vm_with_disk(&mut host, &a, &a);
    let mut src = QuickSource::start(&mut vm, &a).unwrap();
    let link = Link::default();
    let now = Cell::new(0u64);
    let clock = || now.get();
    let mut wire = &link;
    let mut err = None;
    for _ in 0..100 {
        // b takes the messages and never answers.
        match src.step(&mut vm, &mut wire, &clock, now.get() + 1) {
            Ok(done) => assert!(!done),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
        link.to_b.borrow_mut().clear();
        now.set(now.get() + STALL_NS / 10);
    }
    let err = err.expect("the stall is noticed");
    assert!(err.contains("acknowledged no disk data"), "{err}");
    assert!(now.get() <= 2 * STALL_NS, "within about the stall time");
    assert_eq!(src.abort(&mut vm, &a, true), None);
    same(&guest_sees(&mut vm), &model, "the guest's view");
}
