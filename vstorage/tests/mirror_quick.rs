//! Quick storage migration on real files: checkpoint, copy the base while
//! a guest thread writes to the checkpoint (zeros over base data included),
//! then fold the checkpoint into the copied base. The destination must hold
//! the base plus every acknowledged write; the source files go away (or the
//! base stays, by option); cancel leaves the guest on checkpoint + base.

mod mirror_support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use mirror_support::{tempdir, write_data, Model, Rng, SECTOR};
use vstorage::copy::{open_disk, CopyOptions, HostDisk};
use vstorage::io::VirtualDisk;
use vstorage::mirror::{QuickMigration, QuickState};
use vstorage::vhdx::{self, CreateParams};

const SIZE: u64 = 8 << 20;
const SECTORS: u64 = SIZE / SECTOR as u64;

fn make_base(path: &Path) -> Model {
    let mut p = CreateParams::dynamic(SIZE);
    p.block_size = 1 << 20;
    let mut d = vhdx::host::create_path(path, &p).unwrap();
    d.write(0, &write_data(1, 0, SECTORS / 2)).unwrap();
    d.close().unwrap();
    let mut m = Model::new(SECTORS);
    m.acked(1, 0, SECTORS / 2);
    m
}

/// Writes into the checkpoint until `stop` (at least `min` writes); every
/// fifth write is zeros (id 0), often over the base's data.
fn guest(
    mut disk: HostDisk,
    mut model: Model,
    stop: Arc<AtomicBool>,
    min: u64,
) -> thread::JoinHandle<(HostDisk, Model)> {
    thread::spawn(move || {
        // First, zeros over a whole block of base data: the fold must carry
        // them, not skip them as "empty".
        let block = (1 << 20) / SECTOR as u64;
        disk.write(0, &write_data(0, 0, block)).unwrap();
        model.acked(0, 0, block);
        let mut rng = Rng::new(3);
        let mut n = 0;
        while n < min || !stop.load(Ordering::Relaxed) {
            n += 1;
            let id = if n % 5 == 0 { 0 } else { 1000 + n };
            let first = rng.below(SECTORS - 16);
            let len = 1 + rng.below(16);
            match disk.write(first * SECTOR as u64, &write_data(id, first, len)) {
                Ok(()) => model.acked(id, first, len),
                Err(_) => model.unacked(id, first, len),
            }
        }
        disk.flush().unwrap();
        (disk, model)
    })
}

fn check_file(path: &Path, model: &Model, what: &str) {
    let mut d = open_disk(path, false).unwrap();
    model.check(&mut d, what);
}

fn opts() -> CopyOptions {
    CopyOptions {
        chunk_bytes: 256 << 10,
        ..CopyOptions::default()
    }
}

#[test]
fn checkpoint_copy_base_then_fold_checkpoint_into_destination() {
    for keep_source in [false, true] {
        let dir = tempdir(if keep_source { "keep" } else { "move" });
        let (base, child, dest) = (
            dir.join("base.vhdx"),
            dir.join("base-checkpoint.avhdx"),
            dir.join("moved.vhdx"),
        );
        let base_model = make_base(&base);
        let (mut qm, child_disk) =
            QuickMigration::checkpoint(&base, &child, &dest, opts()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = guest(child_disk, base_model.clone(), Arc::clone(&stop), 30);
        let mut calls = 0;
        let copied = qm
            .copy_base(|done, total| {
                calls += 1;
                done <= total
            })
            .unwrap();
        assert_eq!(copied, SIZE / 2, "only the base's allocated half");
        assert!(calls > 0);
        assert_eq!(qm.state(), QuickState::BaseCopied);
        stop.store(true, Ordering::Relaxed);
        let (child_disk, model) = writer.join().unwrap();
        assert!(
            qm.child_bytes().unwrap() > 0,
            "the checkpoint took the writes"
        );
        // The base was frozen during the copy.
        check_file(&base, &base_model, "base after the copy");
        let folded = qm.finish(child_disk, keep_source).unwrap();
        assert!(folded > 0);
        check_file(&dest, &model, "destination after quick migration");
        assert!(!child.exists(), "checkpoint deleted");
        assert_eq!(base.exists(), keep_source);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn cancel_leaves_the_guest_on_checkpoint_and_base() {
    let dir = tempdir("quick-cancel");
    let (base, child, dest) = (
        dir.join("base.vhdx"),
        dir.join("child.vhdx"),
        dir.join("moved.vhdx"),
    );
    let base_model = make_base(&base);
    let (mut qm, child_disk) = QuickMigration::checkpoint(&base, &child, &dest, opts()).unwrap();
    let stop = Arc::new(AtomicBool::new(true));
    let (mut child_disk, model) = guest(child_disk, base_model.clone(), stop, 20)
        .join()
        .unwrap();
    // Cancelled from the progress callback: no destination left.
    assert!(qm.copy_base(|_, _| false).is_err());
    assert!(!dest.exists());
    qm.cancel().unwrap();
    model.check(&mut child_disk, "checkpoint over base after cancel");
    drop(child_disk);
    check_file(&base, &base_model, "base after cancel");

    // A destination that exists is refused before any checkpoint is taken.
    std::fs::write(&dest, b"x").unwrap();
    let other_child = dir.join("child2.vhdx");
    assert!(QuickMigration::checkpoint(&base, &other_child, &dest, opts()).is_err());
    assert!(!other_child.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
