//! The VHDX engine over host files: `O_DIRECT` and buffered backends,
//! parent-chain opening and creation helpers the copy engine uses.

use vstorage::io::{BlockIo, FileIo, VirtualDisk};
use vstorage::vhdx::host::{create_differencing_path, create_path, open_path, open_path_direct};
use vstorage::vhdx::{CreateParams, DiskKind};

#[test]
fn direct_io_round_trip_through_vhdx() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    let mut p = CreateParams::dynamic(32 << 20);
    p.block_size = 2 << 20;
    create_path(&path, &p).unwrap().close().unwrap();
    let mut d = open_path_direct(&path, true).unwrap();
    if !d.io().is_direct() {
        eprintln!("note: the filesystem refused O_DIRECT; the buffered fallback was tested");
    }
    // Sector-aligned but not 4 KiB-aligned: FileIo bounces internally.
    let data: Vec<u8> = (0..3 * 512).map(|i| (i % 253) as u8).collect();
    d.write((7 << 20) + 512, &data).unwrap();
    d.flush().unwrap();
    d.close().unwrap();
    drop(d);
    let mut r = open_path(&path, false).unwrap();
    let mut back = vec![0u8; data.len()];
    r.read((7 << 20) + 512, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(
        r.io().len().unwrap() % (1 << 20),
        0,
        "file stays 1 MiB aligned"
    );
    assert_eq!(r.allocated_ranges().unwrap(), vec![(6 << 20, 2 << 20)]);
}

#[test]
fn differencing_chain_of_three() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let mut p = CreateParams::dynamic(8 << 20);
    p.block_size = 1 << 20;
    let mut d = create_path(&base, &p).unwrap();
    d.write(0, &[1u8; 4096]).unwrap();
    d.close().unwrap();
    drop(d);
    let mid = dir.path().join("mid.avhdx");
    let mut m = create_differencing_path(&mid, &base, None).unwrap();
    m.write(512, &[2u8; 512]).unwrap();
    m.close().unwrap();
    drop(m);
    let top = dir.path().join("top.avhdx");
    let mut t = create_differencing_path(&top, &mid, Some(2 << 20)).unwrap();
    assert_eq!(t.kind(), DiskKind::Differencing);
    t.write(1024, &[3u8; 512]).unwrap();
    t.close().unwrap();
    drop(t);
    let mut t = open_path(&top, false).unwrap();
    let mut b = vec![0u8; 2048];
    t.read(0, &mut b).unwrap();
    assert!(b[..512].iter().all(|&x| x == 1));
    assert!(b[512..1024].iter().all(|&x| x == 2));
    assert!(b[1024..1536].iter().all(|&x| x == 3));
    assert!(b[1536..].iter().all(|&x| x == 1));
    assert_eq!(t.allocated_ranges().unwrap(), vec![(0, 2 << 20)]);
    t.verify().unwrap();
    // The raw bytes of a chain member are never touched by reads.
    let before = std::fs::read(&base).unwrap();
    drop(t);
    assert_eq!(std::fs::read(&base).unwrap(), before);
    let _ = FileIo::open(&base, false).unwrap();
}
