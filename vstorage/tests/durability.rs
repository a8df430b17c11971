//! Durability of the host steps: a fixed VHDX is allocated for real (its
//! blocks reserved on the file system, not a sparse file), and the order of
//! create / fsync / directory fsync / delete in a storage migration and a
//! quick storage migration, recorded by a file-ops double that does the
//! real operations and writes each one down.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use vstorage::copy::{open_disk, CopyOptions};
use vstorage::fsops::{FileOps, HostFileOps};
use vstorage::io::VirtualDisk;
use vstorage::mirror::{MigrationOptions, QuickMigration, StorageMigration};
use vstorage::vhdx::{self, CreateParams, DiskKind};

const MIB: u64 = 1 << 20;

/// (apparent length, bytes the file system allocated to it).
fn allocation(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).unwrap();
    (m.len(), m.blocks() * 512)
}

fn assert_allocated(path: &Path) {
    let (len, alloc) = allocation(path);
    assert!(
        alloc >= len && alloc <= len + 4 * MIB,
        "{}: {len} bytes long but {alloc} bytes allocated",
        path.display()
    );
}

#[test]
fn fixed_vhdx_is_allocated_not_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("lib.vhdx");
    let mut p = CreateParams::dynamic(64 * MIB);
    p.fixed = true;
    let mut d = vhdx::host::create_path(&lib, &p).unwrap();
    assert_eq!(d.kind(), DiskKind::Fixed);
    d.close().unwrap();
    drop(d);
    assert!(allocation(&lib).0 >= 64 * MIB);
    assert_allocated(&lib);

    let cli = dir.path().join("cli.vhdx");
    let out = Command::new(env!("CARGO_BIN_EXE_vhdx"))
        .arg("create")
        .arg(&cli)
        .args(["--size", "64M", "--fixed"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_allocated(&cli);

    // A dynamic disk of the same size stays small.
    let dynamic = dir.path().join("dyn.vhdx");
    drop(vhdx::host::create_path(&dynamic, &CreateParams::dynamic(64 * MIB)).unwrap());
    assert!(allocation(&dynamic).0 < 8 * MIB);

    // A copy of a fixed disk is fixed and allocated too.
    let copy = dir.path().join("copy.vhdx");
    vstorage::copy::cli_copy(&lib, &copy, false).unwrap();
    assert_allocated(&copy);
}

/// Does each operation on the host and records it as `(op, path)`.
#[derive(Default)]
struct Recorder(Mutex<Vec<(&'static str, PathBuf)>>);

impl Recorder {
    fn log(&self) -> Vec<(&'static str, PathBuf)> {
        self.0.lock().unwrap().clone()
    }
    fn note(&self, op: &'static str, p: &Path) {
        self.0.lock().unwrap().push((op, p.to_path_buf()));
    }
}

impl FileOps for Recorder {
    fn create_new(&self, path: &Path) -> std::io::Result<()> {
        self.note("create", path);
        HostFileOps.create_new(path)
    }
    fn sync_file(&self, path: &Path) -> std::io::Result<()> {
        self.note("fsync", path);
        HostFileOps.sync_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.note("fsync-dir", dir);
        HostFileOps.sync_dir(dir)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        self.note("delete", path);
        HostFileOps.remove_file(path)
    }
}

/// Index of the first `(op, path)` at or after `from`.
fn find(log: &[(&'static str, PathBuf)], from: usize, op: &str, p: &Path) -> usize {
    log.iter()
        .skip(from)
        .position(|(o, q)| *o == op && q == p)
        .map(|i| i + from)
        .unwrap_or_else(|| panic!("no {op} {} after step {from} in {log:?}", p.display()))
}

fn small_vhdx(path: &Path) {
    let mut p = CreateParams::dynamic(4 * MIB);
    p.block_size = MIB as u32;
    let mut d = vhdx::host::create_path(path, &p).unwrap();
    d.write(0, &[0x5A; 4096]).unwrap();
    d.close().unwrap();
}

#[test]
fn storage_migration_makes_the_destination_durable_before_deleting_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (src, dst) = (a.join("disk.vhdx"), b.join("disk.vhdx"));
    small_vhdx(&src);
    let rec = Arc::new(Recorder::default());
    let disk = open_disk(&src, true).unwrap();
    let m =
        StorageMigration::start_with(disk, &src, &dst, MigrationOptions::default(), rec.clone())
            .map_err(|(e, _)| e)
            .unwrap();
    m.run_copy().unwrap();
    m.complete().unwrap();
    assert!(!src.exists() && dst.exists());
    let log = rec.log();
    let created = find(&log, 0, "create", &dst);
    let named = find(&log, created, "fsync-dir", &b);
    let synced = find(&log, named + 1, "fsync", &dst);
    let named_again = find(&log, synced, "fsync-dir", &b);
    let deleted = find(&log, named_again, "delete", &src);
    find(&log, deleted, "fsync-dir", &a);
    // The destination's name was durable before anything else happened to
    // it, and nothing was deleted before the destination was synced.
    assert_eq!(named, created + 1, "{log:?}");
    assert!(log[..synced].iter().all(|(o, _)| *o != "delete"), "{log:?}");
    let mut d = open_disk(&dst, false).unwrap();
    let mut buf = vec![0u8; 4096];
    d.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0x5A));
}

#[test]
fn quick_migration_makes_the_destination_durable_before_deleting_sources() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (base, child, dest) = (a.join("base.vhdx"), a.join("ck.avhdx"), b.join("base.vhdx"));
    small_vhdx(&base);
    let rec = Arc::new(Recorder::default());
    let (mut q, mut disk) =
        QuickMigration::checkpoint_with(&base, &child, &dest, CopyOptions::default(), rec.clone())
            .unwrap();
    disk.write(MIB, &[0x77; 4096]).unwrap();
    disk.flush().unwrap();
    q.copy_base(|_, _| true).unwrap();
    q.finish(disk, false).unwrap();
    assert!(!base.exists() && !child.exists() && dest.exists());
    let log = rec.log();
    let created = find(&log, 0, "create", &dest);
    assert_eq!(log[created + 1], ("fsync-dir", b.clone()), "{log:?}");
    let synced = find(&log, created, "fsync", &dest);
    let named = find(&log, synced, "fsync-dir", &b);
    let del_child = find(&log, named, "delete", &child);
    find(&log, del_child, "fsync-dir", &a);
    let del_base = find(&log, del_child, "delete", &base);
    find(&log, del_base, "fsync-dir", &a);
    assert!(log[..synced].iter().all(|(o, _)| *o != "delete"), "{log:?}");
    let mut d = open_disk(&dest, false).unwrap();
    let mut buf = vec![0u8; 4096];
    d.read(MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0x77));
}
