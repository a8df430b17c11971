//! Shared-nothing moves (`vm-move` with `include_storage`): two managed
//! nodes on the test doubles with their stores ([`Stored`]), the VM's
//! disk on a's own store. The VM's disk is mirrored to
//! b over the migration link, then memory and state move; the bytes are
//! checked on b's disk and files on both directories.

use super::*;

const MIB: u64 = 1 << 20;
/// The VM's disk.
const DISK_MIB: u64 = 16;

/// VM `v` on a with a 16 MiB disk on its own store holding data in three
/// places, started.
fn started() -> Stored {
    let mut s = Stored::new();
    s.started("v", None, DISK_MIB);
    for (at, len, seed) in [(0, 3 * MIB, 1u8), (6 * MIB, MIB, 2), (15 * MIB, MIB, 3)] {
        s.write(0, "v", at, &pattern(len, seed));
    }
    s
}

/// Move v to b with its disk; the job.
fn start(s: &mut Stored) -> u64 {
    s.p.start_move(
        Mv {
            include_storage: true,
            ..Mv::default()
        }
        .req("v"),
    )
}

/// The VM moves a -> b with its disk: guest writes during the disk copy
/// (behind and ahead of the copy) and during the memory copy arrive; the
/// job shows both phases; b's disk holds every byte in a committed file
/// on b's store that its configuration names; a's files are gone.
#[test]
fn a_vm_moves_with_its_disk_and_writes_during_both_copies_arrive() {
    let mut s = started();
    assert_eq!(
        s.files(0),
        ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"],
        "a's files before"
    );
    let id = start(&mut s);
    // The disk copy: the job counts storage bytes, no memory yet.
    s.p.until(10_000, "the disk copy runs", |p| {
        p.a().job(id).migration.is_some_and(|m| {
            m.storage_bytes_total > 0 && m.storage_bytes_copied > 0 && m.bytes_sent == 0
        })
    });
    let (copied, total, _) = s.storage(id);
    assert!(copied < total, "mid-copy: {copied} of {total}");
    assert!(total >= 5 * MIB, "the allocated blocks: {total}");
    s.write(0, "v", 0, &pattern(64 << 10, 7)); // behind the copy
    s.write(0, "v", 15 * MIB + 4096, &pattern(8192, 8)); // ahead of it
    s.write(0, "v", 10 * MIB, &pattern(4096, 9)); // in a hole
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
    s.write(0, "v", 6 * MIB, &pattern(4096, 10));
    s.write(0, "v", 12 * MIB, &pattern(512, 11));
    let j = s.p.until_ended(id);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
    assert_eq!(s.storage(id).0, total, "the ended job keeps its disk bytes");
    s.p.rounds(50);
    assert!(s.p.a().vms().is_empty());
    assert_eq!(s.p.b().vm_state("v").as_deref(), Some("running"));
    s.p.b().check_memory("v");
    s.check_disk(1, "v");
    // The guest writes on at b.
    s.write(1, "v", 2 * MIB, &pattern(4096, 12));
    s.check_disk(1, "v");
    match s.p.b().ok(Request::VmDiskList { name: "v".into() }) {
        Body::Disks { disks, .. } => {
            assert_eq!(disks.len(), 1);
            assert_eq!(disks[0].location, "local:vms/v/v-0.vhdx");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.files(0), Vec::<String>::new(), "a's files are gone");
    assert_eq!(s.files(1), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
    let cfg = std::fs::read_to_string(s.local[1].path().join("vms/v/v.vmcfg")).unwrap();
    assert!(cfg.contains("local:vms/v/v-0.vhdx"), "{cfg}");
}

/// A cut link (or a dead b) during the disk copy: a gives up, the VM runs
/// on at a on its own disk with every write; once b learns (the link
/// back), its partial files are gone.
#[test]
fn a_cut_link_during_the_disk_copy_leaves_the_vm_on_a() {
    let mut s = started();
    let id = start(&mut s);
    s.p.until(10_000, "the disk copy runs", |p| {
        p.a()
            .job(id)
            .migration
            .is_some_and(|m| m.storage_bytes_copied > 0)
    });
    s.p.cut = true;
    s.write(0, "v", 0, &pattern(4096, 21));
    let j = s.p.until_ended(id);
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    let why = j.error.unwrap_or_default();
    assert!(why.contains("node b acknowledged no disk write"), "{why}");
    assert_eq!(s.p.a().vm_state("v").as_deref(), Some("running"));
    s.write(0, "v", 4096, &pattern(4096, 22));
    s.check_disk(0, "v");
    s.p.a().check_memory("v");
    assert_eq!(s.files(0), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
    s.p.cut = false;
    s.p.until(400_000, "b lets go", |p| p.b().vms().is_empty());
    s.p.rounds(10);
    assert_eq!(s.files(1), Vec::<String>::new(), "no partial files on b");
    // It moves once the link is back.
    let id = start(&mut s);
    let j = s.p.until_ended(id);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
    s.p.rounds(20);
    s.check_disk(1, "v");
}

/// A cut link during the memory copy: the engine gives up, the VM runs on
/// at a on its own disk (the mirror goes); b removes what it received.
#[test]
fn a_cut_link_during_the_memory_copy_leaves_the_vm_on_a() {
    let mut s = started();
    let id = start(&mut s);
    s.p.until(200_000, "the memory copy runs", |p| {
        p.a().job(id).migration.is_some_and(|m| m.bytes_sent > 0)
    });
    s.write(0, "v", 3 * MIB, &pattern(4096, 31));
    s.p.cut = true;
    s.write(0, "v", 5 * MIB, &pattern(4096, 32));
    let j = s.p.until_ended(id);
    assert_ne!(j.state, JobState::Completed, "{j:?}");
    assert_eq!(s.p.a().vm_state("v").as_deref(), Some("running"));
    s.write(0, "v", 7 * MIB, &pattern(4096, 33));
    s.check_disk(0, "v");
    s.p.a().check_memory("v");
    assert_eq!(s.files(0), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
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
    let mut s = started();
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
        s.write(0, "v", 0, &pattern(256 << 10, 40 + (k % 100) as u8));
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
    s.check_disk(1, "v");
}

/// Refusals: b cannot create the disks (no such store; a file in the
/// way), `--store` with a bad name, a move within the node. The VM runs
/// on at a untouched.
#[test]
fn refusals_name_the_reason() {
    let mut s = started();
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
    std::fs::create_dir_all(s.local[1].path().join("vms/v")).unwrap();
    std::fs::write(s.local[1].path().join("vms/v/v-0.vhdx"), b"x").unwrap();
    let id = start(&mut s);
    let j = s.p.until_ended(id);
    let why = j.error.unwrap_or_default();
    assert!(why.contains("local:vms/v/v-0.vhdx exists"), "{why}");
    assert_eq!(s.files(1), ["vms/v/v-0.vhdx"]);
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
    s.check_disk(0, "v");
    assert_eq!(s.files(0), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
}

/// `job-cancel` during the disk copy: the VM runs on at a on its own disk
/// (writes made during the copy kept); b drops its partial files at once
/// (it sees the link close). A second move then completes.
#[test]
fn cancel_during_the_disk_copy_gives_the_vm_its_disk_back() {
    let mut s = started();
    let id = start(&mut s);
    s.p.until(10_000, "the disk copy runs", |p| {
        p.a().job(id).migration.is_some_and(|m| {
            m.storage_bytes_copied > 0 && m.storage_bytes_copied < m.storage_bytes_total
        })
    });
    s.write(0, "v", 8 * MIB, &pattern(4096, 41));
    let j = match s.p.a().ok(Request::JobCancel { id }) {
        Body::Job(j) => j,
        other => panic!("{other:?}"),
    };
    assert_eq!(j.state, JobState::Cancelled, "{j:?}");
    assert_eq!(s.p.a().vm_state("v").as_deref(), Some("running"));
    s.write(0, "v", 9 * MIB, &pattern(4096, 42));
    s.check_disk(0, "v");
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
    s.check_disk(1, "v");
    assert_eq!(s.files(1), ["elsewhere/v-0.vhdx", "vms/v/v.vmcfg"]);
    let cfg = std::fs::read_to_string(s.local[1].path().join("vms/v/v.vmcfg")).unwrap();
    assert!(cfg.contains("local:elsewhere/v-0.vhdx"), "{cfg}");
}

/// b dies during the disk copy: a gives up after the stall, the VM runs on
/// at a on its own disk with every write (b's partial files are for its
/// next boot to remove).
#[test]
fn a_dead_destination_during_the_disk_copy_leaves_the_vm_on_a() {
    let mut s = started();
    let id = start(&mut s);
    s.p.until(10_000, "the disk copy runs", |p| {
        p.a()
            .job(id)
            .migration
            .is_some_and(|m| m.storage_bytes_copied > 0)
    });
    s.p.kill(1);
    s.write(0, "v", 11 * MIB, &pattern(4096, 51));
    let j = s.p.until_ended(id);
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    let why = j.error.unwrap_or_default();
    assert!(why.contains("node b acknowledged no disk write"), "{why}");
    assert_eq!(s.p.a().vm_state("v").as_deref(), Some("running"));
    s.write(0, "v", 13 * MIB, &pattern(4096, 52));
    s.check_disk(0, "v");
    s.p.a().check_memory("v");
    assert_eq!(s.files(0), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
    assert!(
        s.files(1).iter().all(|f| f.contains(".partial-")),
        "only partial files on b: {:?}",
        s.files(1)
    );
}
