//! Moves of a VM whose disk is on the shared store (only memory and state
//! move; the lease passes at the switch-over): two managed nodes on the
//! test doubles whose stores are the 9P server double over real
//! temporary directories, the `shared` one the same directory for both.

use super::*;
use crate::lease::LeaseRecord;

impl Stored {
    /// VM `name` with a 4 MiB disk on the shared store, on node `i`.
    fn create(&mut self, i: usize, name: &str) -> Outcome {
        self.p.n[i].create_with_disk(name, Some("shared"))
    }

    pub(super) fn lease(&self, vm: &str) -> Option<LeaseRecord> {
        let at = self.shared.path().join(format!("vms/{vm}/{vm}.lease"));
        let bytes = std::fs::read(at).ok()?;
        Some(LeaseRecord::decode(&bytes).unwrap())
    }

    fn write_lease(&self, vm: &str, owner: &str, epoch: u64) {
        let r = LeaseRecord {
            vm: vm.into(),
            owner: owner.into(),
            incarnation: 77,
            epoch,
            counter: 0,
        };
        let at = self.shared.path().join(format!("vms/{vm}/{vm}.lease"));
        std::fs::write(at, r.encode()).unwrap();
    }

    fn info(&mut self, i: usize, vm: &str) -> VmInfo {
        self.p.n[i]
            .vms()
            .into_iter()
            .find(|v| v.name == vm)
            .unwrap()
    }

    /// Write one sector through VM `vm`'s disk on node `i`.
    fn disk_write(&mut self, i: usize, vm: &str) -> Result<(), vstorage::DiskError> {
        let n = &mut self.p.n[i];
        let v = n
            .node
            .vms_mut()
            .iter_mut()
            .find(|v| v.name() == vm)
            .unwrap();
        let d = v.disk_mut(0).unwrap();
        d.write(0, &[0x5a; 512])?;
        d.flush()
    }

    /// The names in VM `vm`'s directory on the shared store, sorted.
    fn vm_dir(&self, vm: &str) -> Vec<String> {
        let at = self.shared.path().join(format!("vms/{vm}"));
        let mut names: Vec<String> = std::fs::read_dir(at)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn vhdx_files(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in walk(self.shared.path()) {
            if e.ends_with(".vhdx") {
                out.push(e);
            }
        }
        out
    }
}

fn gate_open(s: &mut Stored, i: usize, vm: &str) -> bool {
    s.p.n[i]
        .node
        .vms()
        .iter()
        .find(|v| v.name() == vm)
        .unwrap()
        .disk_gate()
        .is_open()
}

fn error_of(o: Outcome) -> crate::mgmt::proto::ApiError {
    match o {
        Outcome::Error(e) => e,
        other => panic!("expected a refusal: {other:?}"),
    }
}

/// A VM on the shared store moves a -> b -> a with its lease: the
/// destination writes the same file after adopting the record naming it
/// with the next epoch; the other node cannot take the VM's files
/// meanwhile.
#[test]
fn a_shared_store_vm_moves_with_its_lease() {
    let mut s = Stored::new();
    assert!(matches!(s.create(0, "s"), Outcome::Ok(_)));
    let l = s.lease("s").expect("the lease is taken with the disk");
    assert_eq!((l.owner.as_str(), l.epoch), ("a", 1));
    s.p.a().ok(Request::VmStart { name: "s".into() });
    s.p.rounds(50);
    s.disk_write(0, "s").unwrap();
    // b cannot put a disk of a VM of that name there while a holds it.
    let e = error_of(s.create(1, "s"));
    assert!(e.message.contains("leased by node a"), "{e:?}");
    s.p.b().ok(Request::VmDelete { name: "s".into() });
    assert_eq!(
        s.lease("s").unwrap().owner,
        "a",
        "b's attempt changed nothing"
    );

    let id = s.p.start_move(Pair::move_req("s"));
    let j = s.p.until_ended(id);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
    s.p.rounds(20);
    assert!(s.p.a().vms().is_empty());
    let v = s.info(1, "s");
    assert_eq!((v.state.as_str(), v.pause_reason), ("running", None));
    let l = s.lease("s").unwrap();
    assert_eq!((l.owner.as_str(), l.epoch), ("b", 2));
    assert_ne!(l.incarnation, 0, "b adopted the hand-over");
    // The hand-over and the adoption were staged ahead of the pause and
    // renamed into place inside it: no side file is left.
    assert_eq!(s.vm_dir("s"), ["s-0.vhdx", "s.lease"]);
    s.disk_write(1, "s").unwrap();
    s.p.b().check_memory("s");
    match s.p.b().ok(Request::VmDiskList { name: "s".into() }) {
        Body::Disks { disks, .. } => {
            assert_eq!(disks.len(), 1);
            assert_eq!(disks[0].location, "shared:vms/s/s-0.vhdx");
        }
        other => panic!("{other:?}"),
    }
    // Renewals go on at b.
    let c = s.lease("s").unwrap().counter;
    s.p.rounds(400);
    assert!(s.lease("s").unwrap().counter > c, "b renews");

    // And back.
    let back = match s.p.b().ok(Mv {
        to: Some("a"),
        ..Mv::default()
    }
    .req("s"))
    {
        Body::Job(j) => j.id,
        other => panic!("{other:?}"),
    };
    s.p.until(400_000, "move back", |p| {
        !matches!(p.b().job(back).state, JobState::Queued | JobState::Running)
    });
    assert_eq!(s.p.b().job(back).state, JobState::Completed);
    s.p.rounds(20);
    assert!(s.p.b().vms().is_empty());
    let l = s.lease("s").unwrap();
    assert_eq!((l.owner.as_str(), l.epoch), ("a", 3));
    s.disk_write(0, "s").unwrap();
    assert_eq!(s.vhdx_files().len(), 1, "one file, never copied");
    // Stop releases the lease.
    s.p.a().ok(Request::VmStop { name: "s".into() });
    assert!(s.lease("s").is_none());
}

/// A node whose lease record is no longer its own stops writing at once:
/// the VM is paused (`lease`), its disk refuses writes, `vm resume` names
/// the holder; when the lease is free again, resume takes it.
#[test]
fn a_lost_lease_fences_the_vm() {
    let mut s = Stored::new();
    assert!(matches!(s.create(0, "s"), Outcome::Ok(_)));
    s.p.a().ok(Request::VmStart { name: "s".into() });
    s.p.rounds(50);
    s.write_lease("s", "x", 5);
    s.p.until(10_000, "fenced", |p| {
        p.a().vms()[0].pause_reason.as_deref() == Some("lease")
    });
    let v = s.info(0, "s");
    assert_eq!(v.state, "paused");
    assert!(
        v.pause_detail.unwrap().contains("held by x"),
        "{:?}",
        s.info(0, "s")
    );
    assert!(!gate_open(&mut s, 0, "s"), "the gate stops writes");
    let e = error_of(s.p.a().call(Request::VmResume { name: "s".into() }));
    assert!(e.message.contains("leased by node x"), "{e:?}");
    // Nothing renews x's record: still, a resume only watches it...
    assert_eq!(s.lease("s").unwrap().owner, "x");
    // ...and the record freed, it takes the lease and runs on.
    std::fs::remove_file(s.shared.path().join("vms/s/s.lease")).unwrap();
    s.p.a().ok(Request::VmResume { name: "s".into() });
    let v = s.info(0, "s");
    assert_eq!((v.state.as_str(), v.pause_reason), ("running", None));
    assert_eq!(s.lease("s").unwrap().owner, "a");
    s.disk_write(0, "s").unwrap();
}

/// `vm start` of a VM whose lease another node holds is refused naming
/// it; an abandoned lease (its record unchanged) is taken only after the
/// expiry and the settle time.
#[test]
fn start_is_refused_while_another_node_holds_the_lease() {
    let mut s = Stored::new();
    assert!(matches!(s.create(0, "t"), Outcome::Ok(_)));
    s.write_lease("t", "b", 4);
    // The node loop renews the lease of the created VM and finds it lost.
    s.p.until(10_000, "lost", |p| p.a().vms()[0].pause_reason.is_some());
    let start = s.p.clock.get();
    let e = error_of(s.p.a().call(Request::VmStart { name: "t".into() }));
    assert_eq!(e.code, ErrorCode::InvalidState);
    assert!(
        e.message
            .starts_with("VM t cannot start on node a: its disks are leased by node b"),
        "{e:?}"
    );
    assert_eq!(s.info(0, "t").state, "paused");
    // Keep asking: refused until expiry + settle, then it starts.
    let mut started_at = None;
    for _ in 0..20_000 {
        s.p.round();
        if let Outcome::Ok(_) = s.p.a().call(Request::VmStart { name: "t".into() }) {
            started_at = Some(s.p.clock.get());
            break;
        }
    }
    let waited_ms = (started_at.expect("started once the lease expired") - start) / 1_000_000;
    assert!(
        // (ms of the node clock, truncated)
        waited_ms + 1 >= TIMING.expire_ms + TIMING.settle_ms,
        "taken after {waited_ms} ms"
    );
    let l = s.lease("t").unwrap();
    assert_eq!((l.owner.as_str(), l.epoch), ("a", 5));
    s.p.rounds(20);
    assert_eq!(s.info(0, "t").state, "running");
}

/// A move cancelled while the destination holds `ready` (after the pause,
/// so after the hand-over, before `go`): the source takes its lease back
/// (the destination never adopted it) and runs on; b keeps nothing.
#[test]
fn a_failure_before_the_commit_point_keeps_a_as_owner() {
    let mut s = Stored::new();
    assert!(matches!(s.create(0, "s"), Outcome::Ok(_)));
    s.p.a().ok(Request::VmStart { name: "s".into() });
    s.p.rounds(50);
    let id = s.p.start_move(
        Mv {
            ready_ms: 5000,
            ..Mv::default()
        }
        .req("s"),
    );
    s.p.until_phase(id, Phase::SwitchingOver);
    // The hand-over was written at the pause.
    let handed = s.lease("s").unwrap();
    assert_eq!(
        (handed.owner.as_str(), handed.epoch, handed.incarnation),
        ("b", 2, 0)
    );
    s.p.a().ok(Request::JobCancel { id });
    let j = s.p.until_ended(id);
    assert_eq!(j.state, JobState::Cancelled, "{j:?}");
    let l = s.lease("s").unwrap();
    assert_eq!((l.owner.as_str(), l.epoch), ("a", 3));
    let v = s.info(0, "s");
    assert_eq!((v.state.as_str(), v.pause_reason), ("running", None));
    s.disk_write(0, "s").unwrap();
    s.p.until(400_000, "b discards", |p| p.b().vm_state("s").is_none());
    s.p.rounds(400);
    assert_eq!(s.lease("s").unwrap().owner, "a");
}

/// b dies right after `go`, having adopted the lease (it ran the VM and
/// may have written its disks): the source's paused copy is stale, so a
/// settles the doubt from the lease itself (the VM is b's; a deletes its
/// copy) and refuses to keep its copy. Never two copies, never the stale
/// one; the lease stays b's (a restarted b does not own it: its
/// incarnation changed) until it expires.
#[test]
fn the_destination_lost_after_adopting_keeps_the_vm() {
    let mut s = Stored::new();
    assert!(matches!(s.create(0, "s"), Outcome::Ok(_)));
    s.p.a().ok(Request::VmStart { name: "s".into() });
    s.p.rounds(50);
    let id = s.p.start_move(
        Mv {
            resumed_ms: 5000,
            ..Mv::default()
        }
        .req("s"),
    );
    s.p.until(400_000, "b resumed", |p| {
        p.b().vm_state("s").as_deref() == Some("running")
    });
    let l = s.lease("s").unwrap();
    assert_eq!((l.owner.as_str(), l.epoch), ("b", 2));
    assert_ne!(l.incarnation, 0, "b adopted");
    s.p.kill(1);
    let j = s.p.until_ended(id);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
    assert!(s.p.a().vms().is_empty(), "the stale copy is gone");
    let l = s.lease("s").unwrap();
    assert_eq!((l.owner.as_str(), l.epoch), ("b", 2));
}

/// In doubt with the lease adopted at b: the operator cannot keep the
/// source copy (stale), and is told why.
#[test]
fn keeping_a_stale_source_copy_is_refused() {
    let mut s = Stored::new();
    assert!(matches!(s.create(0, "s"), Outcome::Ok(_)));
    s.p.a().ok(Request::VmStart { name: "s".into() });
    s.p.rounds(50);
    let id = s.p.start_move(
        Mv {
            resumed_ms: 5000,
            ..Mv::default()
        }
        .req("s"),
    );
    s.p.until(400_000, "b resumed", |p| {
        p.b().vm_state("s").as_deref() == Some("running")
    });
    // The source is still waiting for `resumed`: ask it to keep its copy
    // as soon as it is in doubt (cut the link).
    s.p.cut = true;
    s.p.until_phase(id, Phase::InDoubt);
    match s.p.a().call(Request::JobResolve {
        id,
        keep: Keep::Source,
    }) {
        Outcome::Error(e) => {
            assert_eq!(e.code, ErrorCode::InvalidState, "{e:?}");
            assert!(e.message.contains("node b adopted the lease"), "{e:?}");
        }
        // The doubt was already settled from the lease.
        Outcome::Ok(_) => panic!("a stale copy was kept"),
    }
}

/// A VM with a disk on a store only this node sees is still refused.
#[test]
fn a_vm_on_a_local_store_is_still_refused() {
    let mut s = Stored::new();
    assert!(matches!(
        s.p.a().create_with_disk("l", Some("local")),
        Outcome::Ok(_)
    ));
    s.p.a().ok(Request::VmStart { name: "l".into() });
    let e = error_of(s.p.a().call(Pair::move_req("l")));
    assert!(
        e.message
            .starts_with("VM l has 1 virtual disk, which would not follow it"),
        "{e:?}"
    );
}

/// A move that takes longer than the lease's expiry (here: the
/// destination holds its `accept` for 2 s against an expiry of 100 ms)
/// keeps the source renewing: the VM is never fenced while it moves, and
/// the move completes.
#[test]
fn the_source_renews_while_the_vm_moves() {
    let mut s = Stored::new();
    assert!(matches!(s.create(0, "s"), Outcome::Ok(_)));
    s.p.a().ok(Request::VmStart { name: "s".into() });
    s.p.rounds(50);
    let id = s.p.start_move(
        Mv {
            accept_ms: 2000,
            ..Mv::default()
        }
        .req("s"),
    );
    s.p.until_phase(id, Phase::Negotiating);
    let before = s.lease("s").unwrap().counter;
    let t = s.p.clock.get();
    s.p.until(400_000, "a few expiries pass", |p| {
        p.clock.get() - t > 5 * TIMING.expire_ms * 1_000_000
    });
    assert!(
        s.lease("s").unwrap().counter > before + 5,
        "a renews while it moves"
    );
    assert_eq!(s.info(0, "s").pause_reason, None);
    let j = s.p.until_ended(id);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
    s.p.rounds(20);
    assert_eq!(s.lease("s").unwrap().owner, "b");
}

/// A running VM whose disk a storage migration moved onto the shared store
/// takes the lease, and its disk file is opened again behind the VM's
/// write gate: losing the lease then stops its writes at the I/O layer.
#[test]
fn a_disk_moved_onto_the_shared_store_takes_the_lease() {
    let mut s = Stored::new();
    assert!(matches!(
        s.p.a().create_with_disk("m", Some("local")),
        Outcome::Ok(_)
    ));
    s.p.a().ok(Request::VmStart { name: "m".into() });
    assert!(s.lease("m").is_none());
    s.p.a().ok(Request::VmMoveStorage {
        name: "m".into(),
        to: Some("shared".into()),
        vhd: Vec::new(),
        config: None,
        snapshots: None,
        keep_source: None,
        bandwidth_mib_s: None,
    });
    s.p.until(100_000, "moved and leased", |p| {
        p.a().jobs().iter().all(|j| j.state == JobState::Completed)
            && p.a().vms()[0].pause_reason.is_none()
    });
    s.p.rounds(50);
    let l = s.lease("m").expect("the lease is taken after the move");
    assert_eq!(l.owner, "a");
    s.disk_write(0, "m").unwrap();
    s.write_lease("m", "x", 9);
    s.p.until(10_000, "fenced", |p| {
        p.a().vms()[0].pause_reason.as_deref() == Some("lease")
    });
    assert!(s.disk_write(0, "m").is_err(), "the reopened file is gated");
}

/// b dies after `go` but before it could adopt the lease (its store
/// failed every read and rename meanwhile): it never wrote the VM's disk, and the
/// lease still holds the hand-over record. The source, in doubt, is not
/// settled by the lease; the operator keeps the source, which takes the
/// lease back at once and runs on.
#[test]
fn a_destination_lost_before_adopting_leaves_the_source_its_copy() {
    let mut s = Stored::new();
    assert!(matches!(s.create(0, "s"), Outcome::Ok(_)));
    s.p.a().ok(Request::VmStart { name: "s".into() });
    s.p.rounds(50);
    let id = s.p.start_move(
        Mv {
            resumed_ms: 5000,
            ..Mv::default()
        }
        .req("s"),
    );
    s.p.until_phase(id, Phase::Copying);
    let b_store = s.servers[1].clone();
    s.p.until(400_000, "b resumed, held for its lease", |p| {
        // Reads fail, and so does the rename of b's staged adoption.
        let mut store = b_store.borrow_mut();
        store.fail_next(vstorage::p9::Op::Lopen, vstorage::p9::errno::EIO);
        store.fail_next(vstorage::p9::Op::Renameat, vstorage::p9::errno::EIO);
        drop(store);
        p.b()
            .vms()
            .iter()
            .any(|v| v.name == "s" && v.pause_reason.as_deref() == Some("lease"))
    });
    let l = s.lease("s").unwrap();
    assert_eq!((l.owner.as_str(), l.epoch, l.incarnation), ("b", 2, 0));
    s.p.kill(1);
    s.p.until_phase(id, Phase::InDoubt);
    s.p.rounds(200);
    assert_eq!(s.p.a().job(id).state, JobState::Running, "still in doubt");
    s.p.a().ok(Request::JobResolve {
        id,
        keep: Keep::Source,
    });
    let v = s.info(0, "s");
    assert_eq!((v.state.as_str(), v.pause_reason), ("running", None));
    let l = s.lease("s").unwrap();
    assert_eq!((l.owner.as_str(), l.epoch), ("a", 3));
    s.disk_write(0, "s").unwrap();
}

/// `vm import` of a VM on the shared store on the node that does not hold
/// its lease: listed off, its disk opened read-only (b writes nothing to
/// the store, not even a VHDX header); `vm start` refused naming a; once a
/// stopped it (lease removed), b starts it and writes its disk.
#[test]
fn an_imported_vm_starts_only_on_the_lease_holder() {
    let mut s = Stored::new();
    assert!(matches!(s.create(0, "s"), Outcome::Ok(_)));
    s.p.a().ok(Request::VmStart { name: "s".into() });
    s.p.rounds(50);
    s.disk_write(0, "s").unwrap();
    // Its configuration file onto the shared store too, for b to import.
    let job = match s.p.a().ok(Request::VmMoveStorage {
        name: "s".into(),
        to: None,
        vhd: Vec::new(),
        config: Some("shared".into()),
        snapshots: None,
        keep_source: None,
        bandwidth_mib_s: None,
    }) {
        Body::Job(j) => j.id,
        other => panic!("{other:?}"),
    };
    s.p.until(10_000, "the config move", |p| {
        p.a().job(job).state == JobState::Completed
    });
    let before = s_writes(&s);
    s.p.b().ok(Request::VmImport {
        path: "shared:vms/s/s.vmcfg".into(),
    });
    assert_eq!(s.info(1, "s").state, "created");
    let e = error_of(s.p.b().call(Request::VmStart { name: "s".into() }));
    assert!(
        e.message
            .starts_with("VM s cannot start on node b: its disks are leased by node a"),
        "{e:?}"
    );
    s.p.rounds(100);
    assert_eq!(s_writes(&s), before, "b wrote nothing to the shared store");
    assert_eq!(s.lease("s").unwrap().owner, "a");
    s.p.a().ok(Request::VmStop { name: "s".into() });
    s.p.b().ok(Request::VmStart { name: "s".into() });
    s.p.rounds(50);
    let v = s.info(1, "s");
    assert_eq!((v.state.as_str(), v.pause_reason), ("running", None));
    assert_eq!(s.lease("s").unwrap().owner, "b");
    s.disk_write(1, "s").unwrap();
}

fn s_writes(s: &Stored) -> u64 {
    s.servers[1].borrow().count(vstorage::p9::Op::Write)
}
