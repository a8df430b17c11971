//! The store registry and `StoreFile` over the 9P server double serving
//! real temporary directories: names and markers at boot, every file
//! operation checked on the host file system, a VHDX written through 9P
//! that `qemu-img check` accepts, flush = fsync one for one, server errors
//! as named errors, and no fid left behind.

use super::testing::DirChannel;
use super::*;
use crate::testing::FakeHost;
use alloc::vec;
use std::path::Path;
use std::process::Command;
use vstorage::p9::{errno, Op};
use vstorage::vhdx::{self, CreateParams, OpenOptions, Vhdx};
use vstorage::{BlockIo, IoError, VirtualDisk};

struct Fixture {
    local: tempfile::TempDir,
    shared: tempfile::TempDir,
    servers: Vec<Rc<RefCell<vstorage::p9::server::DirServer>>>,
}

fn channels(f: &mut Fixture, msize: u32) -> Vec<Box<dyn StoreChannel>> {
    let a = DirChannel::new("a", f.local.path(), msize);
    let s = DirChannel::new("shared", f.shared.path(), msize);
    f.servers = vec![a.server.clone(), s.server.clone()];
    vec![Box::new(a), Box::new(s)]
}

fn fixture() -> Fixture {
    Fixture {
        local: tempfile::tempdir().unwrap(),
        shared: tempfile::tempdir().unwrap(),
        servers: Vec::new(),
    }
}

fn stores(f: &mut Fixture) -> Stores {
    let specs = parse_specs("store=local:a:/srv/stores/a store=shared:shared:/srv/stores/shared").0;
    Stores::attach(channels(f, 65536), &specs, "a")
}

fn sp(s: &str) -> StorePath {
    StorePath::parse(s).unwrap()
}

#[test]
fn the_command_line_names_the_stores_and_boot_prints_a_marker_each() {
    let (specs, errors) = parse_specs(
        "name=a store=local:a:/x%20y/stores/a store=Bad:t:/p store=shared:shared:/s store=x:a:/dup mode=node",
    );
    assert_eq!(
        specs,
        vec![
            StoreSpec {
                name: "local".into(),
                tag: "a".into(),
                host_path: "/x y/stores/a".into()
            },
            StoreSpec {
                name: "shared".into(),
                tag: "shared".into(),
                host_path: "/s".into()
            },
        ]
    );
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(percent_decode("a%3Ab%zz%4"), "a:b%zz%4");

    let mut f = fixture();
    let mut host = FakeHost::new();
    host.stores = channels(&mut f, 65536);
    let cmdline =
        "name=a store=local:a:/srv/a store=shared:shared:/srv/shared store=gone:g:/nowhere";
    let s = Stores::boot(&mut host, cmdline, "a");
    let lines = host.lines();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[0].starts_with("vmm-service: store local (a) ready: ")
            && lines[0].ends_with(" MiB free"),
        "{}",
        lines[0]
    );
    assert!(lines[1].starts_with("vmm-service: store shared (shared) ready: "));
    assert_eq!(
        lines[2],
        "vmm-service: store gone (g) missing: no store device with mount tag g"
    );
    assert!(
        host.take_stores().is_empty(),
        "the channels were handed over once"
    );
    let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["local", "shared"]);
    let st = s.status();
    assert_eq!(st[0].host_path, "/srv/a");
    assert!(st[0].total_bytes > 0 && st[0].free_bytes <= st[0].total_bytes);
    assert!(st[0].used_bytes <= st[0].total_bytes && st[0].error.is_none());

    // Without a store= word a device is named by its tag.
    let mut f = fixture();
    let s = Stores::attach(channels(&mut f, 65536), &[], "a");
    let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "shared"]);
}

#[test]
fn a_store_whose_server_fails_is_listed_with_the_reason() {
    let mut f = fixture();
    let ch = channels(&mut f, 65536);
    f.servers[1]
        .borrow_mut()
        .fail_next(Op::Attach, errno::EACCES);
    let mut host = FakeHost::new();
    host.stores = ch;
    let s = Stores::boot(&mut host, "store=local:a:/a store=shared:shared:/s", "a");
    assert_eq!(
        host.lines()[1],
        "vmm-service: store shared (shared) unusable: 9P attach: permission denied (EACCES)"
    );
    let st = s.status();
    assert!(st[0].error.is_none());
    assert_eq!(
        st[1].error.as_deref(),
        Some("store shared is unusable: 9P attach: permission denied (EACCES)")
    );
    assert_eq!(st[1].free_bytes, 0);
    let e = s.open(&sp("shared:x"), false).unwrap_err();
    assert!(matches!(e, StoreError::Unusable { .. }), "{e}");
    f.servers[0].borrow_mut().fail_next(Op::Statfs, errno::EIO);
    assert_eq!(
        s.status()[0].error.as_deref(),
        Some("store local: 9P statfs: input/output error (EIO)")
    );
}

#[test]
fn files_through_the_store_are_host_files() {
    let mut f = fixture();
    let s = stores(&mut f);
    s.mkdir_all(&sp("local:vms/web")).unwrap();
    s.mkdir_all(&sp("local:vms/web")).unwrap();
    assert!(f.local.path().join("vms/web").is_dir());
    let mut file = s.create(&sp("local:vms/web/disk.bin"), true).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    file.write_at(1000, &data).unwrap();
    let on_disk = std::fs::read(f.local.path().join("vms/web/disk.bin")).unwrap();
    assert_eq!(on_disk.len(), 201_000);
    assert_eq!(&on_disk[1000..], &data[..]);
    assert_eq!(file.len().unwrap(), 201_000);
    let mut back = vec![0u8; 5000];
    file.read_at(150_000, &mut back).unwrap();
    assert_eq!(&back[..], &data[149_000..154_000]);
    assert_eq!(
        file.read_at(200_000, &mut back),
        Err(IoError::OutOfRange {
            offset: 200_000,
            len_bytes: 5000,
            store_len: 201_000
        })
    );
    file.set_len(4096).unwrap();
    assert_eq!(
        std::fs::metadata(f.local.path().join("vms/web/disk.bin"))
            .unwrap()
            .len(),
        4096
    );
    file.allocate(0, 1 << 20).unwrap();
    assert_eq!(file.len().unwrap(), 1 << 20);
    let e = s.create(&sp("local:vms/web/disk.bin"), true).unwrap_err();
    assert_eq!(e.p9().and_then(P9Error::errno), Some(errno::EEXIST), "{e}");
    drop(file);

    // Read-only opens refuse writes; directories are not files.
    let mut ro = s.open(&sp("local:vms/web/disk.bin"), false).unwrap();
    assert_eq!(ro.write_at(0, b"x"), Err(IoError::ReadOnly));
    assert_eq!(ro.flush(), Ok(()));
    drop(ro);
    assert!(s.open(&sp("local:vms"), true).is_err());

    s.rename(&sp("local:vms/web/disk.bin"), &sp("local:vms/disk.bin"))
        .unwrap();
    assert!(f.local.path().join("vms/disk.bin").is_file());
    s.sync_dir(&sp("local:vms")).unwrap();
    let names: Vec<String> = s
        .read_dir(&sp("local:vms"))
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["disk.bin", "web"]);
    assert_eq!(s.metadata(&sp("local:vms/disk.bin")).unwrap().size, 1 << 20);
    assert!(s.metadata(&sp("local:nothing")).unwrap_err().is_not_found());
    let e = s
        .rename(&sp("local:vms/disk.bin"), &sp("shared:disk.bin"))
        .unwrap_err();
    assert!(e.to_string().contains("by copying"), "{e}");
    s.remove(&sp("local:vms/disk.bin")).unwrap();
    s.remove_dir(&sp("local:vms/web")).unwrap();
    s.remove_dir(&sp("local:vms")).unwrap();
    assert_eq!(std::fs::read_dir(f.local.path()).unwrap().count(), 0);

    // The shared store is another directory.
    let mut g = s.create(&sp("shared:note"), false).unwrap();
    g.write_at(0, b"shared bytes").unwrap();
    g.flush().unwrap();
    drop(g);
    assert_eq!(
        std::fs::read(f.shared.path().join("note")).unwrap(),
        b"shared bytes"
    );
    for srv in &f.servers {
        assert_eq!(
            srv.borrow().open_fids(),
            1,
            "every fid but the root clunked"
        );
    }
}

#[test]
fn paths_and_names_are_checked_before_anything_is_sent() {
    let mut f = fixture();
    let s = stores(&mut f);
    let before = f.servers[0].borrow().count(Op::Walk);
    for bad in [
        "local:../etc/passwd",
        "Local:x",
        ":x",
        "local:a/./b",
        "local:a\0b",
    ] {
        assert!(StorePath::parse(bad).is_err(), "{bad}");
    }
    assert_eq!(sp("local:/a//b/").path, "a/b");
    assert_eq!(sp("shared").path, "");
    assert!(matches!(
        s.open(&sp("nosuch:x"), false),
        Err(StoreError::NoSuchStore(_))
    ));
    assert!(matches!(
        s.create(&sp("local:"), false),
        Err(StoreError::BadPath(_))
    ));
    assert_eq!(f.servers[0].borrow().count(Op::Walk), before);
}

#[test]
fn server_errors_reach_the_caller_by_name() {
    let mut f = fixture();
    let s = stores(&mut f);
    let mut file = s.create(&sp("local:d.bin"), true).unwrap();
    f.servers[0]
        .borrow_mut()
        .fail_next(Op::Write, errno::ENOSPC);
    let e = file.write_at(0, &[1; 100]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "write failed: store full: local:d.bin: 9P write: no space left on the store (ENOSPC)"
    );
    assert!(matches!(e, IoError::NoSpace { op: "write", .. }), "{e:?}");
    assert!(file.last_error_is_no_space());
    f.servers[0]
        .borrow_mut()
        .fail_next(Op::Write, errno::EDQUOT);
    assert!(file.write_at(0, &[1; 100]).unwrap_err().is_no_space());
    f.servers[0].borrow_mut().fail_next(Op::Fsync, errno::EIO);
    let e = file.flush().unwrap_err();
    assert!(matches!(e, IoError::Host { op: "flush", .. }), "{e:?}");
    assert!(!file.last_error_is_no_space());
    // A malformed reply is the protocol's error, and the store goes on.
    f.servers[0]
        .borrow_mut()
        .mangle_next(Op::Getattr, Box::new(|b: &mut Vec<u8>| b.truncate(20)));
    let e = file.len().unwrap_err();
    assert!(e.to_string().contains("malformed reply"), "{e}");
    file.write_at(0, b"ok").unwrap();
    assert_eq!(file.len().unwrap(), 2);
    let e = s.remove(&sp("local:missing")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "store local: missing: 9P unlinkat: no such file or directory (ENOENT)"
    );
}

/// Counts the engine's `flush` calls on the way to the store file.
struct CountFlush<B> {
    inner: B,
    flushes: Rc<core::cell::Cell<u64>>,
}

impl<B: BlockIo> BlockIo for CountFlush<B> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.inner.write_at(offset, data)
    }
    fn flush(&mut self) -> Result<(), IoError> {
        self.flushes.set(self.flushes.get() + 1);
        self.inner.flush()
    }
    fn len(&self) -> Result<u64, IoError> {
        self.inner.len()
    }
    fn set_len(&mut self, len: u64) -> Result<(), IoError> {
        self.inner.set_len(len)
    }
    fn allocate(&mut self, offset: u64, len_bytes: u64) -> Result<(), IoError> {
        self.inner.allocate(offset, len_bytes)
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 12) as u8)
        .collect()
}

fn qemu_img(args: &[&str], file: &Path) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .arg(file)
        .output()
        .expect("qemu-img runs (cargo run -p qemu-runner -- setup installs qemu-utils)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-img {args:?}: {text}");
    text
}

#[test]
fn a_vhdx_written_through_9p_is_a_valid_host_file_and_flush_is_fsync() {
    let mut f = fixture();
    let s = stores(&mut f);
    s.mkdir(&sp("shared:vms")).unwrap();
    let flushes = Rc::new(core::cell::Cell::new(0));
    let io = CountFlush {
        inner: s.create(&sp("shared:vms/d.vhdx"), true).unwrap(),
        flushes: flushes.clone(),
    };
    let server = f.servers[1].clone();
    let fsyncs = || server.borrow().count(Op::Fsync);
    let mut disk = vhdx::create(io, &CreateParams::dynamic(64 << 20)).unwrap();
    let a = pattern(3 << 20, 0x11);
    let b = pattern(1 << 20, 0x77);
    disk.write(1 << 20, &a).unwrap();
    disk.write(40 << 20, &b).unwrap();
    assert_eq!(
        fsyncs(),
        flushes.get(),
        "every flush the engine asked for is one Tfsync, and nothing else is"
    );
    disk.flush().unwrap();
    disk.close().unwrap();
    assert!(flushes.get() >= 2);
    assert_eq!(fsyncs(), flushes.get());
    drop(disk);
    s.sync_dir(&sp("shared:vms")).unwrap();

    // The host sees a valid VHDX holding the data.
    let host_file = f.shared.path().join("vms/d.vhdx");
    let check = qemu_img(&["check", "-f", "vhdx"], &host_file);
    assert!(check.contains("No errors"), "{check}");
    let raw = f.shared.path().join("expect.raw");
    let mut expect = vec![0u8; 64 << 20];
    expect[1 << 20..(1 << 20) + a.len()].copy_from_slice(&a);
    expect[40 << 20..(40 << 20) + b.len()].copy_from_slice(&b);
    std::fs::write(&raw, &expect).unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "vhdx", "-F", "raw"])
        .arg(&host_file)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // And reopens through the store with the same bytes.
    let io = s.open(&sp("shared:vms/d.vhdx"), false).unwrap();
    let mut disk = Vhdx::open(io, OpenOptions::read_only()).unwrap();
    let mut back = vec![0u8; 1 << 20];
    disk.read(40 << 20, &mut back).unwrap();
    assert_eq!(back, b);
    drop(disk);
    assert_eq!(f.servers[1].borrow().open_fids(), 1);
}

#[test]
fn a_full_store_reaches_the_disk_writer_as_no_space_and_nothing_acknowledged_is_lost() {
    let mut f = fixture();
    let s = stores(&mut f);
    let io = s.create(&sp("local:d.vhdx"), true).unwrap();
    let mut disk = vhdx::create(io, &CreateParams::dynamic(64 << 20)).unwrap();
    let a = pattern(2 << 20, 0x21);
    let b = pattern(1 << 20, 0x42);
    disk.write(0, &a).unwrap();
    disk.flush().unwrap();
    // The store fills while a write needs a new block.
    f.servers[0]
        .borrow_mut()
        .fail_next(Op::Write, errno::ENOSPC);
    let e = disk.write(32 << 20, &b).unwrap_err();
    assert!(e.is_no_space(), "{e:?}");
    assert!(e.to_string().contains("store full"), "{e}");
    // The engine keeps the handle usable (the failed block's space is
    // given back): space returns and the same write goes through on it
    // (what a VM paused for a full store does); the disk is opened again
    // (log replay) and written once more, earlier data intact.
    disk.write(32 << 20, &b).unwrap();
    disk.flush().unwrap();
    drop(disk);
    let io = s.open(&sp("local:d.vhdx"), true).unwrap();
    let mut disk = Vhdx::open(io, OpenOptions::read_write(7)).unwrap();
    disk.write(32 << 20, &b).unwrap();
    disk.flush().unwrap();
    let mut back = vec![0u8; a.len()];
    disk.read(0, &mut back).unwrap();
    assert!(back == a);
    disk.close().unwrap();
    drop(disk);
    let host_file = f.local.path().join("d.vhdx");
    let check = qemu_img(&["check", "-f", "vhdx"], &host_file);
    assert!(check.contains("No errors"), "{check}");
    let mut expect = vec![0u8; 64 << 20];
    expect[..a.len()].copy_from_slice(&a);
    expect[32 << 20..(32 << 20) + b.len()].copy_from_slice(&b);
    let raw = f.local.path().join("expect.raw");
    std::fs::write(&raw, &expect).unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "vhdx", "-F", "raw"])
        .arg(&host_file)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Store operations say it the same way.
    f.servers[0]
        .borrow_mut()
        .fail_next(Op::Mkdir, errno::ENOSPC);
    let e = s.mkdir(&sp("local:vms")).unwrap_err();
    assert!(e.is_no_space(), "{e:?}");
}

#[test]
fn a_partial_file_gets_its_name_only_when_committed() {
    let mut f = fixture();
    let s = stores(&mut f);
    s.mkdir(&sp("shared:vms")).unwrap();
    let at = sp("shared:vms/d.vhdx");
    let host = |p: &str| f.shared.path().join(p);
    let mut file = s.create_partial(&at).unwrap();
    assert_eq!(file.path(), &sp("shared:vms/d.vhdx.partial-a"));
    file.write_at(0, &pattern(100_000, 3)).unwrap();
    assert!(host("vms/d.vhdx.partial-a").is_file() && !host("vms/d.vhdx").exists());
    // A second copy to the same place is refused, not clobbered.
    let e = s.create_partial(&at).unwrap_err();
    assert!(e.is_exists(), "{e:?}");
    // Only the partial file of `at` commits to `at`.
    let mut other = s.create(&sp("shared:vms/other"), true).unwrap();
    assert!(matches!(
        s.commit_partial(&mut other, &at),
        Err(StoreError::BadPath(_))
    ));

    let server = f.servers[1].clone();
    let fsyncs = server.borrow().count(Op::Fsync);
    s.commit_partial(&mut file, &at).unwrap();
    // The data, then the directory entry: two fsyncs, in that order of need.
    assert_eq!(server.borrow().count(Op::Fsync), fsyncs + 2);
    assert!(!host("vms/d.vhdx.partial-a").exists());
    assert_eq!(
        std::fs::read(host("vms/d.vhdx")).unwrap(),
        pattern(100_000, 3)
    );
    // The open file goes on as the committed one (its fid followed the
    // rename, as QEMU's do).
    assert_eq!(file.path(), &at);
    assert_eq!(file.len().unwrap(), 100_000);
    file.write_at(100_000, b"more").unwrap();
    file.flush().unwrap();
    assert_eq!(
        std::fs::metadata(host("vms/d.vhdx")).unwrap().len(),
        100_004
    );
    // A cancelled copy removes its partial file by its path.
    let gone = s.create_partial(&sp("shared:vms/e.vhdx")).unwrap();
    let p = gone.path().clone();
    drop(gone);
    s.remove(&p).unwrap();
    assert!(!host("vms/e.vhdx.partial-a").exists());
    assert!(matches!(
        s.create_partial(&sp("shared:")),
        Err(StoreError::BadPath(_))
    ));
    drop((file, other));
    assert_eq!(server.borrow().open_fids(), 1);
}

#[test]
fn boot_removes_this_nodes_partial_files_and_only_those() {
    let mut f = fixture();
    let local = f.local.path().to_path_buf();
    let shared = f.shared.path().to_path_buf();
    let mut deep = local.join("deep");
    for i in 0..PARTIAL_SCAN_DEPTH {
        deep = deep.join(format!("d{i}"));
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::create_dir_all(local.join("vms/x")).unwrap();
    let mine = [
        local.join("vms/x/disk.vhdx.partial-a"),
        local.join("old.partial-a"),
        shared.join("s.vhdx.partial-a"),
    ];
    let others = [
        shared.join("s.vhdx.partial-b"),
        local.join("vms/x/disk.vhdx"),
        local.join("vms/x/disk.partial-ab"),
        local.join(".partial-a"),
        local.join("keep.partial"),
        // Below the scan's depth bound: left alone.
        deep.join("far.partial-a"),
    ];
    for p in mine.iter().chain(&others) {
        std::fs::write(p, b"x").unwrap();
    }
    let mut host = FakeHost::new();
    host.stores = channels(&mut f, 65536);
    let s = Stores::boot(
        &mut host,
        "store=local:a:/srv/a store=shared:shared:/srv/shared",
        "a",
    );
    let lines = host.lines();
    for want in [
        "vmm-service: store local: removed vms/x/disk.vhdx.partial-a (left by an unfinished copy)",
        "vmm-service: store local: removed old.partial-a (left by an unfinished copy)",
        "vmm-service: store shared: removed s.vhdx.partial-a (left by an unfinished copy)",
    ] {
        assert!(lines.contains(&want), "{want} not in {lines:?}");
    }
    assert_eq!(lines.len(), 5, "{lines:?}");
    for p in &mine {
        assert!(!p.exists(), "{p:?} left");
    }
    for p in &others {
        assert!(p.exists(), "{p:?} removed");
    }
    // The API vdisk uses: nothing left now, and new partial files listed.
    assert!(s.find_partials("local").unwrap().is_empty());
    let one = s.create_partial(&sp("local:vms/x/n.vhdx")).unwrap();
    assert_eq!(
        s.find_partials("local").unwrap(),
        [sp("local:vms/x/n.vhdx.partial-a")]
    );
    drop(one);
    assert_eq!(
        s.remove_partials("local").unwrap(),
        [sp("local:vms/x/n.vhdx.partial-a")]
    );
    assert!(!local.join("vms/x/n.vhdx.partial-a").exists());
    assert!(matches!(
        s.find_partials("nope"),
        Err(StoreError::NoSuchStore(_))
    ));
    for server in &f.servers {
        assert_eq!(server.borrow().open_fids(), 1);
    }
}

mod api {
    //! `store-list` and `store-bench` through the management handlers.
    use super::*;
    use crate::mgmt::proto::{Body, ErrorCode, JobState, Outcome, Request};
    use crate::mgmt::service::{Managed, NodeIdentity};

    fn node(f: &mut Fixture) -> (FakeHost, Managed) {
        let mut host = FakeHost::new();
        host.stores = channels(f, 65536);
        let stores = Stores::boot(
            &mut host,
            "store=local:a:/srv/stores/a store=shared:shared:/srv/stores/shared",
            "a",
        );
        let mut node = Managed::new(
            &mut host,
            NodeIdentity {
                name: "a".into(),
                ..NodeIdentity::default()
            },
            Vec::new(),
            key(),
            7100,
        );
        node.set_stores(stores);
        (host, node)
    }

    fn key() -> crate::mgmt::auth::ClusterKey {
        crate::mgmt::auth::ClusterKey::from_bytes(&[7; 16]).unwrap()
    }

    fn bench(store: &str, mib: u64, keep: bool) -> Request {
        Request::StoreBench {
            store: store.into(),
            mib,
            keep,
        }
    }

    /// Drives the node until job `id` ends; its final state and text.
    fn finish(host: &mut FakeHost, node: &mut Managed, id: u64) -> (JobState, String) {
        for _ in 0..10_000 {
            node.drive_jobs(host);
            let Outcome::Ok(Body::JobList { jobs }) = node.handle(host, Request::JobList) else {
                panic!()
            };
            let j = jobs.into_iter().find(|j| j.id == id).unwrap();
            if j.state.is_final() {
                return (j.state, j.result.or(j.error).unwrap_or_default());
            }
        }
        panic!("job {id} never ended");
    }

    fn job_id(o: &Outcome) -> u64 {
        match o {
            Outcome::Ok(Body::Job(j)) => j.id,
            other => panic!("{other:?}"),
        }
    }

    fn code(o: &Outcome) -> Option<ErrorCode> {
        match o {
            Outcome::Error(e) => Some(e.code),
            Outcome::Ok(_) => None,
        }
    }

    #[test]
    fn store_list_reports_every_store() {
        let mut f = fixture();
        let (mut host, mut node) = node(&mut f);
        let Outcome::Ok(Body::StoreList { stores }) = node.handle(&mut host, Request::StoreList)
        else {
            panic!()
        };
        let rows: Vec<(&str, &str, &str)> = stores
            .iter()
            .map(|s| (s.name.as_str(), s.tag.as_str(), s.host_path.as_str()))
            .collect();
        assert_eq!(
            rows,
            [
                ("local", "a", "/srv/stores/a"),
                ("shared", "shared", "/srv/stores/shared")
            ]
        );
        for s in &stores {
            assert!(s.error.is_none() && s.free_bytes > 0 && s.free_bytes <= s.total_bytes);
            assert!(s.used_bytes > 0 && s.used_bytes <= s.total_bytes);
        }
        // A node without stores lists none.
        let mut bare = Managed::new(&mut host, NodeIdentity::default(), Vec::new(), key(), 7100);
        assert_eq!(
            bare.handle(&mut host, Request::StoreList),
            Outcome::Ok(Body::StoreList { stores: vec![] })
        );
    }

    #[test]
    fn a_kept_bench_leaves_its_files_with_the_pattern_and_a_valid_vhdx() {
        let mut f = fixture();
        let (mut host, mut node) = node(&mut f);
        let o = node.handle(&mut host, bench("local", 3, true));
        let (state, result) = finish(&mut host, &mut node, job_id(&o));
        assert_eq!(state, JobState::Completed, "{result}");
        assert!(
            result.starts_with("write_mb_per_s=") && result.ends_with("mib=3 kept=local:bench-a.*"),
            "{result}"
        );
        let raw = std::fs::read(f.local.path().join("bench-a.raw")).unwrap();
        let mut expect = vec![0u8; 3 << 20];
        bench::pattern(0, &mut expect);
        assert!(raw == expect, "the raw file holds the pattern");
        assert_eq!(
            std::fs::read(f.local.path().join("bench-a.copy")).unwrap(),
            expect
        );
        let vhdx = f.local.path().join("bench-a.vhdx");
        assert!(qemu_img(&["check", "-f", "vhdx"], &vhdx).contains("No errors"));
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "vhdx", "-F", "raw"])
            .arg(&vhdx)
            .arg(f.local.path().join("bench-a.raw"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        for s in &f.servers {
            assert_eq!(s.borrow().open_fids(), 1);
        }
    }

    #[test]
    fn a_bench_cleans_up_after_itself_whether_it_completes_fails_or_is_cancelled() {
        let mut f = fixture();
        let (mut host, mut node) = node(&mut f);
        let empty = |p: &Path| std::fs::read_dir(p).unwrap().count() == 0;

        let o = node.handle(&mut host, bench("shared", 2, false));
        assert_eq!(
            finish(&mut host, &mut node, job_id(&o)).0,
            JobState::Completed
        );
        assert!(empty(f.shared.path()));

        // The store fills up during the copy.
        let o = node.handle(&mut host, bench("shared", 2, false));
        f.servers[1]
            .borrow_mut()
            .fail_next(vstorage::p9::Op::Lcreate, errno::ENOSPC);
        let (state, error) = finish(&mut host, &mut node, job_id(&o));
        assert_eq!(state, JobState::Failed);
        assert_eq!(
            error,
            "store shared: bench-a.copy.partial-a: 9P lcreate: no space left on the store (ENOSPC)"
        );
        assert!(empty(f.shared.path()), "the partial files were removed");

        let o = node.handle(&mut host, bench("local", 2, false));
        let id = job_id(&o);
        node.handle(&mut host, Request::JobCancel { id });
        assert_eq!(finish(&mut host, &mut node, id).0, JobState::Cancelled);
        assert!(empty(f.local.path()));
        assert!(!node.has_bench_work());

        assert_eq!(
            code(&node.handle(&mut host, bench("nope", 2, false))),
            Some(ErrorCode::NotFound)
        );
        assert_eq!(
            code(&node.handle(&mut host, bench("local", 0, false))),
            Some(ErrorCode::InvalidArgument)
        );
        assert_eq!(
            code(&node.handle(&mut host, bench("local", 1 << 20, false))),
            Some(ErrorCode::InvalidArgument)
        );
        std::fs::create_dir(f.local.path().join("bench-a.raw")).unwrap();
        let o = node.handle(&mut host, bench("local", 2, false));
        assert_eq!(code(&o), Some(ErrorCode::InvalidState));
        let Outcome::Error(e) = o else { panic!() };
        assert_eq!(
            e.message,
            "store local: bench-a.raw: 9P lcreate: is a directory (EISDIR)"
        );
    }
}
