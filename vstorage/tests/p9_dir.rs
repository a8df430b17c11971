//! The 9P client against the server double over a real temporary
//! directory: every operation, with the bytes and names checked on the
//! host file system, and server errors and malformed replies surfacing as
//! named errors.

use std::fs;

use vstorage::p9::server::DirServer;
use vstorage::p9::{open_flags, Client, Op, P9Error};

fn connect(dir: &std::path::Path, msize: u32) -> Client<DirServer> {
    Client::connect(DirServer::new(dir, msize), msize, "").expect("connect")
}

#[test]
fn files_written_through_9p_are_real_files() {
    let t = tempfile::tempdir().unwrap();
    let mut c = connect(t.path(), 65536);
    assert_eq!(c.msize(), 65536);
    let root = c.root();
    let d = c.walk(root, &[]).unwrap();
    c.mkdir(root, "vms", 0o755).unwrap();
    assert!(t.path().join("vms").is_dir());
    let f = c.walk_path("vms").unwrap();
    c.lcreate(
        f,
        "disk.bin",
        open_flags::RDWR | open_flags::CREAT | open_flags::EXCL,
        0o644,
    )
    .unwrap();
    // 300 KiB + 7: several messages, a partial last one.
    let data: Vec<u8> = (0..300 * 1024 + 7u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    c.write(f, 4096, &data).unwrap();
    let fsyncs = c.transport().count(Op::Fsync);
    c.fsync(f).unwrap();
    assert_eq!(c.transport().count(Op::Fsync), fsyncs + 1);
    let on_disk = fs::read(t.path().join("vms/disk.bin")).unwrap();
    assert_eq!(on_disk.len(), 4096 + data.len());
    assert!(on_disk[..4096].iter().all(|b| *b == 0));
    assert_eq!(&on_disk[4096..], &data[..]);
    let writes = c.transport().count(Op::Write);
    assert_eq!(writes, data.len().div_ceil(c.io_max() as usize) as u64);

    let mut back = vec![0u8; data.len() + 100];
    let n = c.read(f, 4096, &mut back).unwrap();
    assert_eq!(n, data.len(), "short only at the end of the file");
    assert_eq!(&back[..n], &data[..]);
    assert_eq!(c.getattr(f).unwrap().size, on_disk.len() as u64);
    c.set_size(f, 1 << 20).unwrap();
    assert_eq!(
        fs::metadata(t.path().join("vms/disk.bin")).unwrap().len(),
        1 << 20
    );
    c.set_size(f, 10).unwrap();
    assert_eq!(
        fs::read(t.path().join("vms/disk.bin")).unwrap(),
        vec![0u8; 10]
    );

    // Rename through the fid, then by name; list; remove.
    c.rename(f, root, "moved.bin").unwrap();
    assert!(t.path().join("moved.bin").is_file());
    c.clunk(f).unwrap();
    c.renameat(root, "moved.bin", d, "final.bin").unwrap();
    fs::write(t.path().join("vms/other"), b"x").unwrap();
    let v = c.walk_path("vms").unwrap();
    c.lopen(v, open_flags::RDONLY | open_flags::DIRECTORY)
        .unwrap();
    let names: Vec<String> = c.readdir(v).unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["other"]);
    c.fsync(v).unwrap();
    c.clunk(v).unwrap();
    let e = c.unlinkat(root, "vms", true).unwrap_err();
    assert_eq!(e.errno(), Some(vstorage::p9::errno::ENOTEMPTY), "{e}");
    let v = c.walk_path("vms").unwrap();
    c.unlinkat(v, "other", false).unwrap();
    c.clunk(v).unwrap();
    c.unlinkat(root, "vms", true).unwrap();
    c.unlinkat(root, "final.bin", false).unwrap();
    assert_eq!(fs::read_dir(t.path()).unwrap().count(), 0);
    c.clunk(d).unwrap();
    assert_eq!(c.transport().open_fids(), 1, "only the root is left");
    assert_eq!(c.fids_in_use(), 1);
}

#[test]
fn statfs_reports_the_host_file_system() {
    let t = tempfile::tempdir().unwrap();
    let mut c = connect(t.path(), 8192);
    let s = c.statfs(c.root()).unwrap();
    let host = host_statfs(t.path());
    assert_eq!(s.total_bytes(), host.0);
    // Free space moves as other processes write: within 1 %.
    let diff = s.free_bytes().abs_diff(host.1);
    assert!(diff <= host.0 / 100, "{} vs {}", s.free_bytes(), host.1);
    assert!(s.used_bytes() <= s.total_bytes());
}

fn host_statfs(p: &std::path::Path) -> (u64, u64) {
    let out = std::process::Command::new("stat")
        .args(["-f", "-c", "%S %b %a"])
        .arg(p)
        .output()
        .unwrap();
    let s = String::from_utf8(out.stdout).unwrap();
    let v: Vec<u64> = s.split_whitespace().map(|x| x.parse().unwrap()).collect();
    (v[0] * v[1], v[0] * v[2])
}

#[test]
fn server_errors_and_malformed_replies_are_named() {
    let t = tempfile::tempdir().unwrap();
    let mut c = connect(t.path(), 8192);
    let e = c.walk_path("missing/file").unwrap_err();
    assert!(e.is_not_found());
    assert_eq!(e.to_string(), "9P walk: no such file or directory (ENOENT)");
    fs::write(t.path().join("f"), b"hello").unwrap();
    let f = c.walk_path("f").unwrap();
    c.lopen(f, open_flags::RDWR).unwrap();
    c.transport_mut()
        .fail_next(Op::Write, vstorage::p9::errno::ENOSPC);
    let e = c.write(f, 0, b"data").unwrap_err();
    assert!(e.is_no_space());
    assert_eq!(
        e.to_string(),
        "9P write: no space left on the store (ENOSPC)"
    );
    // A reply cut short, one with a wrong tag, one with an absurd count.
    c.transport_mut().mangle_next(
        Op::Read,
        Box::new(|b: &mut Vec<u8>| b.truncate(b.len() - 1)),
    );
    let mut buf = [0u8; 5];
    let e = c.read(f, 0, &mut buf).unwrap_err();
    assert!(matches!(e, P9Error::Protocol { op: "read", .. }), "{e}");
    c.transport_mut()
        .mangle_next(Op::Getattr, Box::new(|b: &mut Vec<u8>| b[5] = 42));
    assert_eq!(
        c.getattr(f).unwrap_err().to_string(),
        "9P getattr: malformed reply: reply tag 42, expected 1"
    );
    c.transport_mut().mangle_next(
        Op::Read,
        Box::new(|b: &mut Vec<u8>| b[7..11].copy_from_slice(&9999u32.to_le_bytes())),
    );
    assert_eq!(
        c.read(f, 0, &mut buf).unwrap_err().to_string(),
        "9P read: malformed reply: count is 9999, above the limit of 5"
    );
    // The session goes on after each.
    assert_eq!(c.read(f, 0, &mut buf).unwrap(), 5);
    assert_eq!(&buf, b"hello");
}
