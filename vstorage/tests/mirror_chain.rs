//! Moving a disk with its checkpoint chain: base <- snapshot <- live child.
//! The base and the snapshot are read-only and are copied (the snapshot as
//! a differencing disk of the moved base); the live child is migrated with
//! the mirror while a guest writes, as a differencing disk of the moved
//! snapshot. At the destination the chain reads exactly as the source did,
//! plus every acknowledged write.

mod mirror_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mirror_support::{guest_writer, tempdir, write_data, Model, SECTOR};
use vstorage::copy::{cli_copy, copy_differencing, open_disk, own_ranges, CopyOptions, HostDisk};
use vstorage::io::VirtualDisk;
use vstorage::mirror::{MigrationOptions, MirrorState, StorageMigration};
use vstorage::vhdx::{self, CreateParams, DiskKind};

const SIZE: u64 = 8 << 20;
const SECTORS: u64 = SIZE / SECTOR as u64;
const MIB_SECTORS: u64 = (1 << 20) / SECTOR as u64;

#[test]
fn chain_moves_with_live_child_mirrored() {
    let dir = tempdir("chain");
    let (src_dir, dst_dir) = (dir.join("src"), dir.join("dst"));
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::create_dir_all(&dst_dir).unwrap();
    let base = src_dir.join("base.vhdx");
    let snap = src_dir.join("snap.avhdx");
    let live = src_dir.join("live.avhdx");
    let mut model = Model::new(SECTORS);

    let mut p = CreateParams::dynamic(SIZE);
    p.block_size = 1 << 20;
    let mut b = vhdx::host::create_path(&base, &p).unwrap();
    b.write(0, &write_data(1, 0, 4 * MIB_SECTORS)).unwrap();
    b.close().unwrap();
    drop(b);
    model.acked(1, 0, 4 * MIB_SECTORS);
    let mut s = vhdx::host::create_differencing_path(&snap, &base, None).unwrap();
    // Partly over the base, partly new, and zeros hiding base data.
    s.write(MIB_SECTORS * 512, &write_data(2, MIB_SECTORS, 16))
        .unwrap();
    s.write(6 << 20, &write_data(3, 6 * MIB_SECTORS, 8))
        .unwrap();
    s.write(2 << 20, &write_data(0, 2 * MIB_SECTORS, 8))
        .unwrap();
    s.close().unwrap();
    drop(s);
    model.acked(2, MIB_SECTORS, 16);
    model.acked(3, 6 * MIB_SECTORS, 8);
    model.acked(0, 2 * MIB_SECTORS, 8);
    let snap_model = model.clone();
    drop(vhdx::host::create_differencing_path(&live, &snap, None).unwrap());
    let mut guest_disk = open_disk(&live, true).unwrap();
    guest_disk.write(512, &write_data(4, 1, 2)).unwrap();
    model.acked(4, 1, 2);

    // Parents first: they are read-only, a plain copy each.
    let (base2, snap2, live2) = (
        dst_dir.join("base.vhdx"),
        dst_dir.join("snap.avhdx"),
        dst_dir.join("live.avhdx"),
    );
    cli_copy(&base, &base2, false).unwrap();
    let copied = copy_differencing(&snap, &snap2, &base2).unwrap();
    assert_eq!(copied, 3 << 20, "only the snapshot's own three blocks");

    let opts = MigrationOptions {
        copy: CopyOptions {
            chunk_bytes: 128 << 10,
            ..CopyOptions::default()
        },
        keep_source: false,
    };
    let m = StorageMigration::start_differencing(guest_disk, &live, &live2, &snap2, opts)
        .map_err(|(e, _)| e)
        .unwrap();
    assert_eq!(
        m.progress().bytes_total,
        1 << 20,
        "only the child's own block"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writer = guest_writer(m.disk(), model, 11, 40, Arc::clone(&stop));
    m.run_copy().unwrap();
    stop.store(true, Ordering::Relaxed);
    let model = writer.join().unwrap();
    assert_eq!(m.progress().state, MirrorState::Mirrored);
    m.complete().unwrap();
    drop(m);
    assert!(!live.exists(), "the live child's source is deleted");

    // The moved chain: live2 -> snap2 -> base2, reading as the model says.
    let HostDisk::Vhdx(mut moved) = open_disk(&live2, false).unwrap() else {
        panic!("VHDX")
    };
    assert_eq!(moved.kind(), DiskKind::Differencing);
    model.check(&mut *moved, "moved chain");
    drop(moved);
    // The moved snapshot holds the same blocks and reads like the source
    // snapshot, which is untouched.
    assert_eq!(own_ranges(&snap2).unwrap(), own_ranges(&snap).unwrap());
    for path in [&snap, &snap2] {
        let mut d = open_disk(path, false).unwrap();
        snap_model.check(&mut d, &path.display().to_string());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
