//! Checkpoints over files in memory: what the guest wrote before and after
//! the checkpoint reads back through the chain, from the files a restarted
//! node opens, and after the merge; the base file is not written while the
//! checkpoint stands; a step that fails leaves the VM on what it had.

use super::*;
use crate::disks::{DiskMeta, MemFile, MEM_BLOCK_BYTES};
use crate::loader::build::kernel;
use crate::storage_migration::testing::MemFiles;
use crate::testing::FakeHost;
use crate::vmconfig::{Boot, Placement, VmId};
use alloc::string::ToString;
use alloc::vec;
use core::cell::Cell;
use vstorage::MemIo;

pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const DISK: u64 = 8 * MIB;
pub(crate) const BASE: &str = "local:vms/v/v-0.vhdx";
pub(crate) const CONFIG: &str = "local:vms/v/v.vmcfg";
pub(crate) const CHILD: &str = "local:vms/v/snapshots/v-0-checkpoint.avhdx";

fn fill(tag: u8, len: u64) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(13) ^ tag).collect()
}

/// A VM with an 8 MiB disk at `BASE` (data in blocks 0 and 3) and its
/// configuration file at `CONFIG`; returns the VM and its disk's model.
pub(crate) fn vm_with_disk(
    host: &mut FakeHost,
    files: &dyn FileStore,
    mem: &MemFiles,
) -> (Vm, Vec<u8>) {
    let file = MemFile::new(64 * MIB).unwrap();
    mem.files.borrow_mut().insert(BASE.into(), file.clone());
    let params = CreateParams {
        block_size: MEM_BLOCK_BYTES,
        ..CreateParams::dynamic(DISK)
    };
    let mut disk = vhdx::create(Box::new(file) as Box<dyn BlockIo>, &params).unwrap();
    let mut model = vec![0u8; DISK as usize];
    for (block, tag) in [(0u64, 1u8), (3, 2)] {
        let data = fill(tag, MIB);
        disk.write(block * MIB, &data).unwrap();
        model[(block * MIB) as usize..((block + 1) * MIB) as usize].copy_from_slice(&data);
    }
    disk.flush().unwrap();
    let mut vm = Vm::create(host, "v", 4 << 20, &kernel(), "case=x").unwrap();
    let meta = DiskMeta {
        backing: Backing::File {
            location: BASE.into(),
        },
        fixed: false,
        virtual_bytes: DISK,
        block_bytes: MEM_BLOCK_BYTES,
        checkpoint: None,
    };
    assert_eq!(vm.attach_disk(Box::new(disk), meta), Some(0));
    vm.set_placement(Some(Placement {
        id: VmId([7; 16]),
        at: Some(CONFIG.into()),
        snapshots: "local:vms/v/snapshots".into(),
        boot: Boot::Guest("disk-verify".into()),
    }));
    vmconfig::save(&vm, files).unwrap();
    (vm, model)
}

pub(crate) fn guest_write(vm: &mut Vm, model: &mut [u8], at: u64, tag: u8, len: u64) {
    let data = fill(tag, len);
    vm.disk_mut(0).unwrap().write(at, &data).unwrap();
    model[at as usize..(at + len) as usize].copy_from_slice(&data);
}

pub(crate) fn guest_sees(vm: &mut Vm) -> Vec<u8> {
    let mut all = vec![0u8; DISK as usize];
    vm.disk_mut(0).unwrap().read(0, &mut all).unwrap();
    all
}

/// The whole virtual disk in the file at `at` as a host tool reads it.
pub(crate) fn file_reads(files: &MemFiles, at: &str) -> Vec<u8> {
    let mut d = Vhdx::open(MemIo::from_vec(files.bytes(at)), OpenOptions::read_only()).unwrap();
    let mut all = vec![0u8; DISK as usize];
    d.read(0, &mut all).unwrap();
    all
}

#[test]
fn writes_after_a_checkpoint_go_to_the_child_and_the_merge_folds_them_back() {
    let mut host = FakeHost::new();
    let files = MemFiles::new(64 * MIB);
    let (mut vm, mut model) = vm_with_disk(&mut host, &files, &files);
    guest_write(&mut vm, &mut model, 5 * MIB, 3, 4096);
    let before = model.clone();

    let cp = take(&mut vm, &files, 0).unwrap();
    assert_eq!((cp.base(), cp.child()), (BASE, CHILD));
    assert!(files.names().contains(&CHILD.to_string()));
    let cfg = vmconfig::read(&files, CONFIG).unwrap();
    assert_eq!(cfg.disks[0].location, BASE);
    assert_eq!(cfg.disks[0].checkpoint.as_deref(), Some(CHILD));
    assert_eq!(
        guest_sees(&mut vm),
        model,
        "the checkpoint changes nothing seen"
    );
    assert_eq!(cp.child_bytes().unwrap(), 0);

    // Over the base's data, into a hole, a partial sector run, zeros.
    guest_write(&mut vm, &mut model, 512, 9, 1024);
    guest_write(&mut vm, &mut model, 6 * MIB, 10, MIB + 4096);
    let zeros = vec![0u8; 8192];
    vm.disk_mut(0).unwrap().write(3 * MIB, &zeros).unwrap();
    model[(3 * MIB) as usize..(3 * MIB + 8192) as usize].fill(0);
    vm.disk_mut(0).unwrap().flush().unwrap();
    assert_eq!(guest_sees(&mut vm), model);
    // What the guest wrote, to the sector (not the child's 1 MiB blocks).
    const WRITTEN: u64 = 1024 + MIB + 4096 + 8192;
    assert_eq!(cp.child_bytes().unwrap(), WRITTEN);
    assert_eq!(file_reads(&files, BASE), before, "the base is frozen");

    // What a restarted node opens from the configuration.
    let mut reopened = open_chain(&files, BASE, CHILD, 1).unwrap();
    let mut all = vec![0u8; DISK as usize];
    reopened.read(0, &mut all).unwrap();
    assert_eq!(all, model);
    drop(reopened);

    let held = cp.merge(&mut vm, &files).map_err(|(_, e)| e).unwrap();
    assert_eq!(held, WRITTEN);
    assert_eq!(guest_sees(&mut vm), model);
    guest_write(&mut vm, &mut model, 2 * MIB, 11, 4096);
    vm.disk_mut(0).unwrap().flush().unwrap();
    assert_eq!(
        file_reads(&files, BASE),
        model,
        "the base holds every write"
    );
    assert!(!files.names().contains(&CHILD.to_string()), "child deleted");
    let cfg = vmconfig::read(&files, CONFIG).unwrap();
    assert_eq!(cfg.disks[0].checkpoint, None);
    assert!(vm.disk_meta()[0].checkpoint.is_none());
}

#[test]
fn an_imported_vm_with_a_checkpoint_runs_on_its_chain() {
    let mut host = FakeHost::new();
    let files = MemFiles::new(64 * MIB);
    let (mut vm, mut model) = vm_with_disk(&mut host, &files, &files);
    let cp = take(&mut vm, &files, 0).unwrap();
    guest_write(&mut vm, &mut model, 7 * MIB, 4, 4096);
    drop(cp);
    vm.destroy();
    let mut again = Vm::create(&mut host, "v", 4 << 20, &kernel(), "case=x").unwrap();
    let info = attach_chain(&mut again, &files, BASE, CHILD, 3).unwrap();
    assert_eq!(info.location, BASE);
    assert_eq!(again.disk_meta()[0].checkpoint.as_deref(), Some(CHILD));
    assert_eq!(guest_sees(&mut again), model);
    assert!(attach_chain(&mut again, &files, CHILD, BASE, 3)
        .unwrap_err()
        .contains("not a differencing disk"));
}

/// A store whose partial files or configuration rewrites fail on demand.
struct Faulty {
    inner: MemFiles,
    fail_create: Cell<bool>,
    fail_replace: Cell<bool>,
}

impl FileStore for Faulty {
    fn has_store(&self, store: &str) -> bool {
        self.inner.has_store(store)
    }
    fn default_store(&self) -> Option<String> {
        self.inner.default_store()
    }
    fn create_partial(&self, to: &str) -> Result<Box<dyn BlockIo>, String> {
        if self.fail_create.get() {
            return Err("the store is full".into());
        }
        self.inner.create_partial(to)
    }
    fn replace_partial(&self, to: &str) -> Result<Box<dyn BlockIo>, String> {
        if self.fail_replace.get() {
            return Err("the store is read-only".into());
        }
        self.inner.replace_partial(to)
    }
    fn commit_partial(&self, to: &str) -> Result<(), String> {
        self.inner.commit_partial(to)
    }
    fn remove_partial(&self, to: &str) {
        self.inner.remove_partial(to)
    }
    fn remove(&self, at: &str) -> Result<(), String> {
        self.inner.remove(at)
    }
    fn file_bytes(&self, at: &str) -> Option<u64> {
        self.inner.file_bytes(at)
    }
    fn read(&self, at: &str, max_bytes: usize) -> Result<Vec<u8>, String> {
        self.inner.read(at, max_bytes)
    }
    fn open(&self, at: &str) -> Result<Box<dyn BlockIo>, String> {
        self.inner.open(at)
    }
}

#[test]
fn a_checkpoint_that_cannot_be_made_or_recorded_leaves_the_vm_on_its_disk() {
    let mut host = FakeHost::new();
    let mem = MemFiles::new(64 * MIB);
    let files = Faulty {
        inner: mem.clone(),
        fail_create: Cell::new(true),
        fail_replace: Cell::new(false),
    };
    let (mut vm, mut model) = vm_with_disk(&mut host, &files, &mem);
    let names = mem.names();
    let e = take(&mut vm, &files, 0).unwrap_err();
    assert!(e.contains("the store is full"), "{e}");
    assert_eq!(mem.names(), names, "no file left");
    guest_write(&mut vm, &mut model, 4 * MIB, 5, 4096);
    assert_eq!(guest_sees(&mut vm), model);

    files.fail_create.set(false);
    files.fail_replace.set(true);
    let e = take(&mut vm, &files, 0).unwrap_err();
    assert!(
        e.contains("configuration") && e.contains("read-only"),
        "{e}"
    );
    assert_eq!(mem.names(), names, "the child is deleted");
    assert!(vm.disk_meta()[0].checkpoint.is_none());
    guest_write(&mut vm, &mut model, 4 * MIB + 4096, 6, 4096);
    vm.disk_mut(0).unwrap().flush().unwrap();
    assert_eq!(guest_sees(&mut vm), model);
    assert_eq!(file_reads(&mem, BASE), model, "the VM writes its base");
    assert_eq!(
        vmconfig::read(&files, CONFIG).unwrap().disks[0].checkpoint,
        None
    );

    // A merge whose configuration cannot be rewritten keeps the child
    // file (the base holds the data either way).
    files.fail_replace.set(false);
    let cp = take(&mut vm, &files, 0).unwrap();
    guest_write(&mut vm, &mut model, 0, 7, 4096);
    files.fail_replace.set(true);
    cp.merge(&mut vm, &files).map_err(|(_, e)| e).unwrap();
    assert_eq!(guest_sees(&mut vm), model);
    assert!(mem.names().contains(&CHILD.to_string()));
}

#[test]
fn a_checkpoint_is_refused_where_it_cannot_stand() {
    let mut host = FakeHost::new();
    let files = MemFiles::new(64 * MIB);
    let (mut vm, _) = vm_with_disk(&mut host, &files, &files);
    assert!(take(&mut vm, &files, 1).unwrap_err().contains("no disk 1"));
    let cp = take(&mut vm, &files, 0).unwrap();
    assert!(take(&mut vm, &files, 0)
        .unwrap_err()
        .contains("has a checkpoint already"));
    drop(cp);
    let mut other = Vm::create(&mut host, "w", 4 << 20, &kernel(), "case=x").unwrap();
    crate::disks::create_for_vm(&mut other, None, 1, None, false).unwrap();
    assert!(take(&mut other, &files, 0)
        .unwrap_err()
        .contains("node memory"));
}
