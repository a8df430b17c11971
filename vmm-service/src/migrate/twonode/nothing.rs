//! Shared-nothing moves (`vm-move` with `include_storage`): two managed
//! nodes on the test doubles, each with a local store only (the 9P server
//! double over its own temporary directory). The VM's disk is mirrored to
//! b over the migration link, then memory and state move; the bytes are
//! checked on b's disk and files on both directories.

use super::*;
use crate::store::testing::DirChannel;
use crate::store::{parse_specs, Stores};
use hvcore::host::StoreChannel;

const MIB: u64 = 1 << 20;
/// The VM's disk.
const DISK_MIB: u64 = 16;

struct Nothing {
    p: Pair,
    dirs: [tempfile::TempDir; 2],
    /// What the guest's disk holds (the writes made through it).
    image: Vec<u8>,
}

impl Nothing {
    fn new() -> Self {
        let mut p = Pair::new();
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        for (i, name) in ["a", "b"].into_iter().enumerate() {
            let l = DirChannel::new(name, dirs[i].path(), 65536);
            let channels: Vec<Box<dyn StoreChannel>> = vec![Box::new(l)];
            let specs = parse_specs(&format!("store=local:{name}:/srv/{name}")).0;
            p.n[i]
                .node
                .set_stores(Stores::attach(channels, &specs, name));
        }
        Nothing {
            p,
            dirs,
            image: vec![0u8; (DISK_MIB * MIB) as usize],
        }
    }

    /// VM `v` on a with a 16 MiB disk holding data in three places,
    /// started.
    fn started(&mut self) {
        self.p.a().ok(Request::VmCreate {
            name: "v".into(),
            memory_mib: 4,
            guest: None,
            linux: None,
        });
        self.p.a().ok(Request::VmDiskCreate {
            name: "v".into(),
            size_mib: DISK_MIB,
            store: None,
            fixed: None,
        });
        self.p.a().ok(Request::VmStart { name: "v".into() });
        for (at, len, seed) in [(0, 3 * MIB, 1u8), (6 * MIB, MIB, 2), (15 * MIB, MIB, 3)] {
            self.write(0, at, len as usize, seed);
        }
        self.p.rounds(20);
    }

    /// Write `len` bytes of pattern `seed` at `at` through VM v's disk on
    /// node `i` (as the guest's virtio-blk does: write, then flush).
    fn write(&mut self, i: usize, at: u64, len: usize, seed: u8) {
        let data: Vec<u8> = (0..len)
            .map(|k| (k as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect();
        let v = self.p.n[i]
            .node
            .vms_mut()
            .iter_mut()
            .find(|v| v.name() == "v")
            .unwrap();
        let d = v.disk_mut(0).unwrap();
        d.write(at, &data).unwrap();
        d.flush().unwrap();
        self.image[at as usize..at as usize + len].copy_from_slice(&data);
    }

    /// VM v's disk on node `i` as it reads now, compared with the image.
    fn check_disk(&mut self, i: usize) {
        let v = self.p.n[i]
            .node
            .vms_mut()
            .iter_mut()
            .find(|v| v.name() == "v")
            .unwrap();
        let d = v.disk_mut(0).unwrap();
        let mut got = vec![0u8; self.image.len()];
        d.read(0, &mut got).unwrap();
        let first = got.iter().zip(&self.image).position(|(a, b)| a != b);
        assert_eq!(first, None, "node {i}: the disk differs at this byte");
    }

    /// Files under node `i`'s store directory.
    fn files(&self, i: usize) -> Vec<String> {
        let root = self.dirs[i].path();
        let mut v: Vec<String> = walk(root)
            .into_iter()
            .map(|f| f.trim_start_matches(&*root.display().to_string()).into())
            .collect();
        v.sort();
        v
    }

    fn storage(&mut self, id: u64) -> (u64, u64, u64) {
        let m = self.p.a().job(id).migration.unwrap();
        (m.storage_bytes_copied, m.storage_bytes_total, m.bytes_sent)
    }

    fn start(&mut self) -> u64 {
        self.p.start_move(
            Mv {
                include_storage: true,
                ..Mv::default()
            }
            .req("v"),
        )
    }
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

/// The VM moves a -> b with its disk: guest writes during the disk copy
/// (behind and ahead of the copy) and during the memory copy arrive; the
/// job shows both phases; b's disk holds every byte in a committed file
/// on b's store that its configuration names; a's files are gone.
#[test]
fn a_vm_moves_with_its_disk_and_writes_during_both_copies_arrive() {
    let mut s = Nothing::new();
    s.started();
    assert_eq!(
        s.files(0),
        ["/vms/v/v-0.vhdx", "/vms/v/v.vmcfg"],
        "a's files before"
    );
    let id = s.start();
    // The disk copy: the job counts storage bytes, no memory yet.
    s.p.until(10_000, "the disk copy runs", |p| {
        p.a().job(id).migration.is_some_and(|m| {
            m.storage_bytes_total > 0 && m.storage_bytes_copied > 0 && m.bytes_sent == 0
        })
    });
    let (copied, total, _) = s.storage(id);
    assert!(copied < total, "mid-copy: {copied} of {total}");
    assert!(total >= 5 * MIB, "the allocated blocks: {total}");
    s.write(0, 0, 64 << 10, 7); // behind the copy
    s.write(0, 15 * MIB + 4096, 8192, 8); // ahead of it
    s.write(0, 10 * MIB, 4096, 9); // in a hole
    assert!(
        s.files(1).iter().any(|f| f.ends_with(".partial-b")),
        "{:?}",
        s.files(1)
    );
    // The memory copy, the mirror still in place.
    s.p.until(200_000, "the memory copy runs", |p| {
        p.a().job(id).migration.is_some_and(|m| m.bytes_sent > 0)
    });
    let (copied, total, _) = s.storage(id);
    assert_eq!(copied, total, "the disk copy completed first");
    s.write(0, 6 * MIB, 4096, 10);
    s.write(0, 12 * MIB, 512, 11);
    let j = s.p.until_ended(id);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
    assert_eq!(s.storage(id).0, total, "the ended job keeps its disk bytes");
    s.p.rounds(50);
    assert!(s.p.a().vms().is_empty());
    assert_eq!(s.p.b().vm_state("v").as_deref(), Some("running"));
    s.p.b().check_memory("v");
    s.check_disk(1);
    // The guest writes on at b.
    s.write(1, 2 * MIB, 4096, 12);
    s.check_disk(1);
    match s.p.b().ok(Request::VmDiskList { name: "v".into() }) {
        Body::Disks { disks, .. } => {
            assert_eq!(disks.len(), 1);
            assert_eq!(disks[0].location, "local:vms/v/v-0.vhdx");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.files(0), Vec::<String>::new(), "a's files are gone");
    assert_eq!(s.files(1), ["/vms/v/v-0.vhdx", "/vms/v/v.vmcfg"]);
    let cfg = std::fs::read_to_string(s.dirs[1].path().join("vms/v/v.vmcfg")).unwrap();
    assert!(cfg.contains("local:vms/v/v-0.vhdx"), "{cfg}");
}

/// A cut link (or a dead b) during the disk copy: a gives up, the VM runs
/// on at a on its own disk with every write; once b learns (the link
/// back), its partial files are gone.
#[test]
fn a_cut_link_during_the_disk_copy_leaves_the_vm_on_a() {
    let mut s = Nothing::new();
    s.started();
    let id = s.start();
    s.p.until(10_000, "the disk copy runs", |p| {
        p.a()
            .job(id)
            .migration
            .is_some_and(|m| m.storage_bytes_copied > 0)
    });
    s.p.cut = true;
    s.write(0, 0, 4096, 21);
    let j = s.p.until_ended(id);
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    let why = j.error.unwrap_or_default();
    assert!(why.contains("node b acknowledged no disk write"), "{why}");
    assert_eq!(s.p.a().vm_state("v").as_deref(), Some("running"));
    s.write(0, 4096, 4096, 22);
    s.check_disk(0);
    s.p.a().check_memory("v");
    assert_eq!(s.files(0), ["/vms/v/v-0.vhdx", "/vms/v/v.vmcfg"]);
    s.p.cut = false;
    s.p.until(400_000, "b lets go", |p| p.b().vms().is_empty());
    s.p.rounds(10);
    assert_eq!(s.files(1), Vec::<String>::new(), "no partial files on b");
    // It moves once the link is back.
    let id = s.start();
    let j = s.p.until_ended(id);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
    s.p.rounds(20);
    s.check_disk(1);
}

/// A cut link during the memory copy: the engine gives up, the VM runs on
/// at a on its own disk (the mirror goes); b removes what it received.
#[test]
fn a_cut_link_during_the_memory_copy_leaves_the_vm_on_a() {
    let mut s = Nothing::new();
    s.started();
    let id = s.start();
    s.p.until(200_000, "the memory copy runs", |p| {
        p.a().job(id).migration.is_some_and(|m| m.bytes_sent > 0)
    });
    s.write(0, 3 * MIB, 4096, 31);
    s.p.cut = true;
    s.write(0, 5 * MIB, 4096, 32);
    let j = s.p.until_ended(id);
    assert_ne!(j.state, JobState::Completed, "{j:?}");
    assert_eq!(s.p.a().vm_state("v").as_deref(), Some("running"));
    s.write(0, 7 * MIB, 4096, 33);
    s.check_disk(0);
    s.p.a().check_memory("v");
    assert_eq!(s.files(0), ["/vms/v/v-0.vhdx", "/vms/v/v.vmcfg"]);
    s.p.cut = false;
    s.p.until(400_000, "b lets go", |p| p.b().vms().is_empty());
    s.p.rounds(10);
    assert_eq!(s.files(1), Vec::<String>::new(), "nothing left on b");
}

/// A bandwidth limit below the guest's write rate: the limit is the
/// copy's, the mirrored guest writes go besides it, so the copy still
/// ends at the limit's pace and the move completes with every byte.
#[test]
fn a_guest_writing_faster_than_the_bandwidth_limit_does_not_starve_the_copy() {
    let mut s = Nothing::new();
    s.started();
    let id = s.p.start_move(
        Mv {
            include_storage: true,
            bandwidth_mib_s: Some(1),
            ..Mv::default()
        }
        .req("v"),
    );
    // 256 KiB every 100 ms of the nodes' clock (2.5 MiB/s, the limit is
    // 1) for 60 s at most, at the disk's start: behind the copy, so each
    // write is mirrored. The 16 MiB disk takes about 16 s at the limit
    // (zero chunks count, skipped or not).
    let t0 = s.p.clock.get();
    let mut k = 0u64;
    while s.storage(id).2 == 0 {
        assert!(k < 600, "the disk copy starved: {:?}", s.storage(id));
        s.write(0, 0, 256 << 10, 40 + (k % 100) as u8);
        let next = t0 + (k + 1) * 100_000_000;
        while s.p.clock.get() < next {
            s.p.round();
        }
        k += 1;
    }
    assert!(k >= 100, "the copy kept to the limit: {k} steps of 100 ms");
    let (copied, total, _) = s.storage(id);
    assert_eq!(copied, total, "the disk copy completed first");
    let j = s.p.until_ended(id);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
    s.p.rounds(50);
    assert_eq!(s.p.b().vm_state("v").as_deref(), Some("running"));
    s.check_disk(1);
}

/// Refusals: b cannot create the disks (no such store; a file in the
/// way), `--store` with a bad name, a move within the node. The VM runs
/// on at a untouched.
#[test]
fn refusals_name_the_reason() {
    let mut s = Nothing::new();
    s.started();
    let id = s.p.start_move(
        Mv {
            include_storage: true,
            store: Some("nosuch"),
            ..Mv::default()
        }
        .req("v"),
    );
    let j = s.p.until_ended(id);
    assert_eq!(j.state, JobState::Failed);
    let why = j.error.unwrap_or_default();
    assert!(
        why.contains("cannot create the VM's disks on node b: no store named 'nosuch'"),
        "{why}"
    );
    std::fs::create_dir_all(s.dirs[1].path().join("vms/v")).unwrap();
    std::fs::write(s.dirs[1].path().join("vms/v/v-0.vhdx"), b"x").unwrap();
    let id = s.start();
    let j = s.p.until_ended(id);
    let why = j.error.unwrap_or_default();
    assert!(why.contains("local:vms/v/v-0.vhdx exists"), "{why}");
    assert_eq!(s.files(1), ["/vms/v/v-0.vhdx"]);
    for (to, store) in [("a", None), ("b", Some("bad name!"))] {
        match s.p.a().call(
            Mv {
                to: Some(to),
                include_storage: true,
                store,
                ..Mv::default()
            }
            .req("v"),
        ) {
            Outcome::Error(e) => assert_eq!(e.code, ErrorCode::InvalidArgument, "{e:?}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(s.p.a().vm_state("v").as_deref(), Some("running"));
    s.check_disk(0);
    assert_eq!(s.files(0), ["/vms/v/v-0.vhdx", "/vms/v/v.vmcfg"]);
}

/// `job-cancel` during the disk copy: the VM runs on at a on its own disk
/// (writes made during the copy kept); b drops its partial files at once
/// (it sees the link close). A second move then completes.
#[test]
fn cancel_during_the_disk_copy_gives_the_vm_its_disk_back() {
    let mut s = Nothing::new();
    s.started();
    let id = s.start();
    s.p.until(10_000, "the disk copy runs", |p| {
        p.a().job(id).migration.is_some_and(|m| {
            m.storage_bytes_copied > 0 && m.storage_bytes_copied < m.storage_bytes_total
        })
    });
    s.write(0, 8 * MIB, 4096, 41);
    let j = match s.p.a().ok(Request::JobCancel { id }) {
        Body::Job(j) => j,
        other => panic!("{other:?}"),
    };
    assert_eq!(j.state, JobState::Cancelled, "{j:?}");
    assert_eq!(s.p.a().vm_state("v").as_deref(), Some("running"));
    s.write(0, 9 * MIB, 4096, 42);
    s.check_disk(0);
    s.p.until(10_000, "b lets go", |p| p.b().vms().is_empty());
    s.p.rounds(10);
    assert_eq!(s.files(1), Vec::<String>::new(), "no partial files on b");
    // Moved again, to a directory named on b's store.
    let id = s.p.start_move(
        Mv {
            include_storage: true,
            store: Some("local:elsewhere"),
            ..Mv::default()
        }
        .req("v"),
    );
    let j = s.p.until_ended(id);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
    s.p.rounds(20);
    s.check_disk(1);
    assert_eq!(s.files(1), ["/elsewhere/v-0.vhdx", "/vms/v/v.vmcfg"]);
    let cfg = std::fs::read_to_string(s.dirs[1].path().join("vms/v/v.vmcfg")).unwrap();
    assert!(cfg.contains("local:elsewhere/v-0.vhdx"), "{cfg}");
}

/// b dies during the disk copy: a gives up after the stall, the VM runs on
/// at a on its own disk with every write (b's partial files are for its
/// next boot to remove).
#[test]
fn a_dead_destination_during_the_disk_copy_leaves_the_vm_on_a() {
    let mut s = Nothing::new();
    s.started();
    let id = s.start();
    s.p.until(10_000, "the disk copy runs", |p| {
        p.a()
            .job(id)
            .migration
            .is_some_and(|m| m.storage_bytes_copied > 0)
    });
    s.p.kill(1);
    s.write(0, 11 * MIB, 4096, 51);
    let j = s.p.until_ended(id);
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    let why = j.error.unwrap_or_default();
    assert!(why.contains("node b acknowledged no disk write"), "{why}");
    assert_eq!(s.p.a().vm_state("v").as_deref(), Some("running"));
    s.write(0, 13 * MIB, 4096, 52);
    s.check_disk(0);
    s.p.a().check_memory("v");
    assert_eq!(s.files(0), ["/vms/v/v-0.vhdx", "/vms/v/v.vmcfg"]);
    assert!(
        s.files(1).iter().all(|f| f.contains(".partial-")),
        "only partial files on b: {:?}",
        s.files(1)
    );
}
