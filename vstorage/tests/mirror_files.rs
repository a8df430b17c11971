//! Storage live migration of real VHDX files: a guest thread writes while
//! the copy runs; afterwards the file the guest ends up on — reopened from
//! disk — holds every acknowledged write, and the file it left is deleted
//! (or kept, by option).

mod mirror_support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use mirror_support::{guest_writer, tempdir, write_data, Model, SECTOR};
use vstorage::copy::{open_disk, CopyOptions};
use vstorage::io::VirtualDisk;
use vstorage::mirror::{MigrationOptions, MirrorState, StorageMigration};
use vstorage::vhdx::{self, CreateParams};

const SIZE: u64 = 16 << 20;
const SECTORS: u64 = SIZE / SECTOR as u64;

/// A dynamic VHDX with 1 MiB blocks, its first half written by write 1.
fn make_source(path: &Path) -> Model {
    let mut p = CreateParams::dynamic(SIZE);
    p.block_size = 1 << 20;
    let mut d = vhdx::host::create_path(path, &p).unwrap();
    d.write(0, &write_data(1, 0, SECTORS / 2)).unwrap();
    d.close().unwrap();
    let mut model = Model::new(SECTORS);
    model.acked(1, 0, SECTORS / 2);
    model
}

fn start(src: &Path, dst: &Path, keep_source: bool) -> StorageMigration {
    let disk = open_disk(src, true).unwrap();
    let opts = MigrationOptions {
        copy: CopyOptions {
            chunk_bytes: 256 << 10,
            ..CopyOptions::default()
        },
        keep_source,
    };
    StorageMigration::start(disk, src, dst, opts)
        .map_err(|(e, _)| e)
        .unwrap()
}

/// A guest writing random stamps through the migration until told to stop
/// (and at least `min` times). Returns the model of what it wrote.
fn guest(
    m: &StorageMigration,
    model: Model,
    stop: Arc<AtomicBool>,
    min: u64,
) -> thread::JoinHandle<Model> {
    guest_writer(m.disk(), model, 7, min, stop)
}

fn check_file(path: &Path, model: &Model, what: &str) {
    let mut d = open_disk(path, false).unwrap();
    model.check(&mut d, what);
}

#[test]
fn migrate_while_writing_then_switch_over_and_delete_source() {
    let dir = tempdir("mig-complete");
    let (src, dst) = (dir.join("disk.vhdx"), dir.join("moved.vhdx"));
    let model = make_source(&src);
    let m = start(&src, &dst, false);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = guest(&m, model, Arc::clone(&stop), 40);
    m.run_copy().unwrap();
    stop.store(true, Ordering::Relaxed);
    let model = writer.join().unwrap();
    let p = m.progress();
    assert_eq!((p.state, p.percent()), (MirrorState::Mirrored, 100));
    m.complete().unwrap();
    assert!(!src.exists(), "source deleted after switch-over");
    // The guest carries on, on the destination.
    let mut disk = m.disk();
    disk.write(0, &write_data(5000, 0, 1)).unwrap();
    let mut model = model;
    model.acked(5000, 0, 1);
    drop(disk);
    drop(m);
    check_file(&dst, &model, "destination file after migration");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cancel_deletes_destination_and_keeps_source_current() {
    let dir = tempdir("mig-cancel");
    let (src, dst) = (dir.join("disk.vhdx"), dir.join("moved.vhdx"));
    let model = make_source(&src);
    let m = start(&src, &dst, false);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = guest(&m, model, Arc::clone(&stop), 20);
    let mut buf = Vec::new();
    for _ in 0..10 {
        m.mirror().step(&mut buf).unwrap();
    }
    m.cancel().unwrap();
    assert!(!dst.exists(), "destination deleted on cancel");
    stop.store(true, Ordering::Relaxed);
    let model = writer.join().unwrap();
    assert_eq!(m.progress().state, MirrorState::Cancelled);
    assert!(m.complete().is_err());
    drop(m);
    check_file(&src, &model, "source file after cancel");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn keep_source_and_refuse_existing_destination() {
    let dir = tempdir("mig-keep");
    let (src, dst) = (dir.join("disk.vhdx"), dir.join("moved.vhdx"));
    let model = make_source(&src);
    std::fs::write(&dst, b"occupied").unwrap();
    let disk = open_disk(&src, true).unwrap();
    let Err((e, mut disk)) = StorageMigration::start(disk, &src, &dst, MigrationOptions::default())
    else {
        panic!("an existing destination must be refused")
    };
    assert!(e.to_string().contains("moved.vhdx"), "{e}");
    assert_eq!(std::fs::read(&dst).unwrap(), b"occupied");
    // The source came back usable.
    model.check(&mut disk, "source handed back");
    drop(disk);
    std::fs::remove_file(&dst).unwrap();

    let m = start(&src, &dst, true);
    m.run_copy().unwrap();
    m.complete().unwrap();
    drop(m);
    assert!(src.exists(), "source kept on request");
    check_file(&src, &model, "kept source");
    check_file(&dst, &model, "destination");
    let _ = std::fs::remove_dir_all(&dir);
}
