//! `StoreFiles` over the 9P server double serving real temporary
//! directories: a VM's disk created on the default store is a host VHDX
//! that `qemu-img check` accepts and that holds what the guest wrote; a
//! storage migration local -> shared moves it (source gone, or kept),
//! cancel and a full destination leave no file behind and the VM on its
//! source; existing files are never replaced.

use super::*;
use crate::disks::{self, Backing};
use crate::loader::build::kernel;
use crate::storage_migration::{plan, Progress, StorageMove};
use crate::store::testing::DirChannel;
use crate::store::{parse_specs, Stores};
use crate::testing::FakeHost;
use crate::vm::Vm;
use alloc::vec;
use core::cell::Cell;
use hvcore::host::StoreChannel;
use std::path::{Path, PathBuf};
use std::process::Command;
use vstorage::p9::{errno, server::DirServer, Op};
use vstorage::vhdx::{OpenOptions, Vhdx};
use vstorage::{MemIo, VirtualDisk};

const MIB: u64 = 1 << 20;

struct Fixture {
    local: tempfile::TempDir,
    shared: tempfile::TempDir,
    servers: Vec<Rc<RefCell<DirServer>>>,
    files: StoreFiles,
}

fn fixture() -> Fixture {
    let local = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    let a = DirChannel::new("a", local.path(), 65536);
    let s = DirChannel::new("shared", shared.path(), 65536);
    let servers = vec![a.server.clone(), s.server.clone()];
    let channels: Vec<Box<dyn StoreChannel>> = vec![Box::new(a), Box::new(s)];
    let specs = parse_specs("store=local:a:/srv/a store=shared:shared:/srv/shared").0;
    let stores = Rc::new(Stores::attach(channels, &specs, "a"));
    Fixture {
        local,
        shared,
        servers,
        files: StoreFiles::new(stores),
    }
}

/// Every file below `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn qemu_img_check(file: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(file)
        .output()
        .expect("qemu-img runs (cargo run -p qemu-runner -- setup installs qemu-utils)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No errors"),
        "qemu-img check {}: {out:?}",
        file.display()
    );
}

/// The whole disk of the VHDX at `file`, as a host tool reads it.
fn host_disk(file: &Path) -> Vec<u8> {
    let bytes = std::fs::read(file).unwrap();
    let mut d = Vhdx::open(MemIo::from_vec(bytes), OpenOptions::read_only()).unwrap();
    d.verify().unwrap();
    let mut all = vec![0u8; d.virtual_size() as usize];
    d.read(0, &mut all).unwrap();
    all
}

fn fill(tag: u8, len: u64) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(13) ^ tag).collect()
}

/// VM `v` with a `mib` MiB dynamic disk on the default store, data written
/// at 0, 33 MiB and the last MiB; returns it and the model of its disk.
fn vm_with_disk(host: &mut FakeHost, f: &Fixture, mib: u64) -> (Vm, Vec<u8>) {
    let mut vm = Vm::create(host, "v", 4 << 20, &kernel(), "case=x").unwrap();
    let info = disks::create_for_vm(&mut vm, Some(&f.files), mib, None, false).unwrap();
    assert_eq!(info.location, "local:vms/v/v-0.vhdx");
    let mut model = vec![0u8; (mib * MIB) as usize];
    for (at, tag) in [(0, 1u8), (33 * MIB, 2), ((mib - 1) * MIB, 3)] {
        guest_write(&mut vm, &mut model, at, tag, MIB);
    }
    vm.disk_mut(0).unwrap().flush().unwrap();
    (vm, model)
}

fn guest_write(vm: &mut Vm, model: &mut [u8], at: u64, tag: u8, len: u64) {
    let data = fill(tag, len);
    vm.disk_mut(0).unwrap().write(at, &data).unwrap();
    model[at as usize..(at + len) as usize].copy_from_slice(&data);
}

/// One chunk per step.
fn tick() -> impl Fn() -> u64 {
    let t = Cell::new(0u64);
    move || {
        t.set(t.get() + 1);
        t.get()
    }
}

fn local_file(f: &Fixture) -> PathBuf {
    f.local.path().join("vms/v/v-0.vhdx")
}

#[test]
fn a_new_disk_is_a_host_vhdx_on_the_default_store() {
    let f = fixture();
    let mut host = FakeHost::new();
    assert_eq!(f.files.default_store().as_deref(), Some("local"));
    assert!(f.files.has_store("shared") && !f.files.has_store("memory"));
    let (vm, model) = vm_with_disk(&mut host, &f, 64);
    assert_eq!(tree(f.local.path()), ["vms/v/v-0.vhdx"], "no partial file");
    let listed = disks::list(&vm, Some(&f.files));
    assert_eq!(listed[0].location, "local:vms/v/v-0.vhdx");
    assert_eq!(
        listed[0].file_bytes,
        std::fs::metadata(local_file(&f)).unwrap().len()
    );
    // A host tool reads the disk in use (flushed).
    qemu_img_check(&local_file(&f));
    assert!(host_disk(&local_file(&f)) == model, "the guest's bytes");
    drop(vm);

    // Two disks of VM u on the shared store, the second fixed: allocated
    // on the host.
    let mut vm = Vm::create(&mut host, "u", 4 << 20, &kernel(), "case=x").unwrap();
    disks::create_for_vm(&mut vm, Some(&f.files), 4, Some("shared"), false).unwrap();
    let d = disks::create_for_vm(&mut vm, Some(&f.files), 4, Some("shared"), true).unwrap();
    assert_eq!(d.location, "shared:vms/u/u-1.vhdx");
    assert!(d.file_bytes >= 4 * MIB, "{d:?}");
    qemu_img_check(&f.shared.path().join("vms/u/u-1.vhdx"));
    assert_eq!(tree(f.shared.path()), ["vms/u/u-0.vhdx", "vms/u/u-1.vhdx"]);

    // An existing file is never replaced: another VM of the same name
    // finds the disk there.
    let mut again = Vm::create(&mut host, "v", 4 << 20, &kernel(), "case=x").unwrap();
    let e = disks::create_for_vm(&mut again, Some(&f.files), 8, None, false).unwrap_err();
    assert_eq!(
        e,
        disks::CreateError::NoResources(
            "local:vms/v/v-0.vhdx exists: pick another place, or remove the file first".into()
        )
    );
    assert_eq!(tree(f.local.path()), ["vms/v/v-0.vhdx"]);
    assert!(host_disk(&local_file(&f)) == model, "untouched");
    drop((vm, again));
    for s in &f.servers {
        assert_eq!(s.borrow().open_fids(), 1, "every file closed");
    }
}

#[test]
fn a_disk_moves_local_to_shared_while_written_and_the_source_goes() {
    let f = fixture();
    let mut host = FakeHost::new();
    let (mut vm, mut model) = vm_with_disk(&mut host, &f, 64);
    let p = plan(&vm, Some("shared"), &[], false).unwrap();
    assert_eq!(p.targets, [Some("shared:vms/v/v-0.vhdx".into())]);
    let mut job = StorageMove::new(&vm, &f.files, p).unwrap();
    let clock = tick();
    let mut steps = 0u8;
    let summary = loop {
        match job.step(&mut vm, &f.files, &clock, 1).unwrap() {
            Progress::Running { .. } => {}
            Progress::Done { summary } => break summary,
        }
        steps += 1;
        if steps == 1 {
            assert_eq!(
                tree(f.shared.path()),
                ["vms/v/v-0.vhdx.partial-a"],
                "written under its partial name"
            );
        }
        // Behind and ahead of the copy, and into a hole.
        guest_write(&mut vm, &mut model, u64::from(steps) * 4096, steps, 4096);
        guest_write(
            &mut vm,
            &mut model,
            40 * MIB + u64::from(steps) * 512,
            99,
            512,
        );
        assert!(steps < 200);
    };
    assert_eq!(
        summary,
        "moved local:vms/v/v-0.vhdx -> shared:vms/v/v-0.vhdx"
    );
    assert!(steps > 1, "the copy took several steps");
    assert!(tree(f.local.path()).is_empty(), "source removed");
    assert!(
        !f.local.path().join("vms/v").exists(),
        "the VM's directory went with its last file"
    );
    assert_eq!(tree(f.shared.path()), ["vms/v/v-0.vhdx"]);
    assert!(
        matches!(&vm.disk_meta()[0].backing, Backing::File { location } if location == "shared:vms/v/v-0.vhdx")
    );
    // The VM writes on into its new file.
    guest_write(&mut vm, &mut model, 7 * MIB, 7, 4096);
    vm.disk_mut(0).unwrap().flush().unwrap();
    let moved = f.shared.path().join("vms/v/v-0.vhdx");
    qemu_img_check(&moved);
    assert!(host_disk(&moved) == model);

    // Back to another local directory, keeping the source.
    let p = plan(&vm, Some("local:other"), &[], true).unwrap();
    let mut job = StorageMove::new(&vm, &f.files, p).unwrap();
    while let Progress::Running { .. } = job.step(&mut vm, &f.files, &clock, 1).unwrap() {}
    assert_eq!(tree(f.local.path()), ["other/v-0.vhdx"]);
    assert_eq!(tree(f.shared.path()), ["vms/v/v-0.vhdx"], "kept");
    drop(vm);
    qemu_img_check(&moved);
    qemu_img_check(&f.local.path().join("other/v-0.vhdx"));
    assert!(host_disk(&f.local.path().join("other/v-0.vhdx")) == model);
    for s in &f.servers {
        assert_eq!(s.borrow().open_fids(), 1);
    }
}

#[test]
fn cancel_and_a_full_destination_leave_no_file_and_the_vm_on_its_source() {
    let f = fixture();
    let mut host = FakeHost::new();
    let (mut vm, mut model) = vm_with_disk(&mut host, &f, 64);
    let clock = tick();

    let p = plan(&vm, Some("shared"), &[], false).unwrap();
    let mut job = StorageMove::new(&vm, &f.files, p).unwrap();
    job.step(&mut vm, &f.files, &clock, 1).unwrap();
    guest_write(&mut vm, &mut model, 5 * MIB, 5, 4096);
    job.cancel(&mut vm, &f.files);
    assert!(tree(f.shared.path()).is_empty(), "no destination file");
    assert_eq!(vm.disk_meta()[0].location(), "local:vms/v/v-0.vhdx");

    // The destination fills up during the copy.
    let p = plan(&vm, Some("shared"), &[], false).unwrap();
    let mut job = StorageMove::new(&vm, &f.files, p).unwrap();
    job.step(&mut vm, &f.files, &clock, 1).unwrap();
    f.servers[1]
        .borrow_mut()
        .fail_next(Op::Write, errno::ENOSPC);
    let e = loop {
        match job.step(&mut vm, &f.files, &clock, 1) {
            Ok(Progress::Running { .. }) => {}
            Ok(Progress::Done { .. }) => panic!("the store is full"),
            Err(e) => break e,
        }
    };
    assert!(
        e.contains("store full") && e.contains("runs on from its source"),
        "{e}"
    );
    assert!(tree(f.shared.path()).is_empty(), "no destination file");
    guest_write(&mut vm, &mut model, 9 * MIB, 9, 4096);
    vm.disk_mut(0).unwrap().flush().unwrap();
    drop(vm);
    qemu_img_check(&local_file(&f));
    assert!(host_disk(&local_file(&f)) == model, "every write kept");

    // A destination that exists already is refused at the start.
    std::fs::create_dir_all(f.shared.path().join("vms/v")).unwrap();
    std::fs::write(f.shared.path().join("vms/v/v-0.vhdx"), b"someone's").unwrap();
    let mut vm = Vm::create(&mut host, "w", 4 << 20, &kernel(), "case=x").unwrap();
    disks::create_for_vm(&mut vm, Some(&f.files), 4, None, false).unwrap();
    let p = plan(&vm, None, &["0=shared:vms/v/v-0.vhdx".into()], false).unwrap();
    let mut job = StorageMove::new(&vm, &f.files, p).unwrap();
    let e = job.step(&mut vm, &f.files, &clock, 1).unwrap_err();
    assert!(e.contains("exists"), "{e}");
    assert_eq!(
        std::fs::read(f.shared.path().join("vms/v/v-0.vhdx")).unwrap(),
        b"someone's"
    );
}
