//! The moves that carry disks obey the node's limit like any `vm-move`
//! (issue 14, item 5): a shared-nothing move (`include_storage`), a quick
//! move and a move on the shared store wait `queued` behind the limit,
//! start by themselves in order when a slot frees and complete with their
//! report; a queued one that is cancelled has touched nothing: the VM
//! runs on at a on its own files, b has no VM, no job and no file of it.

use super::*;

const MIB: u64 = 1 << 20;
const DISK_MIB: u64 = 8;

/// The three VMs, each with data on its disk: `n` (own store, moved with
/// `include_storage`), `q` (own store, `quick`) and `s` (shared store).
fn three() -> Stored {
    let mut s = Stored::new();
    for (vm, store, seed) in [("n", None, 1u8), ("q", None, 2), ("s", Some("shared"), 3)] {
        s.started(vm, store, DISK_MIB);
        s.write(0, vm, MIB, &pattern(3 * MIB, seed));
    }
    s.p.a().ok(Request::HostSet {
        max_live_migrations: Some(1),
        max_storage_migrations: None,
    });
    s
}

fn request(vm: &str) -> Request {
    Mv {
        include_storage: vm == "n",
        quick: vm == "q",
        ..Mv::default()
    }
    .req(vm)
}

fn queued(s: &mut Stored, id: u64) -> bool {
    let j = s.p.a().job(id);
    j.state == JobState::Queued && phase_of(&j) == Phase::Queued
}

/// VM `vm` runs on a, untouched by a move: its guest goes on, its disk
/// holds its data and has no checkpoint, it can be changed again (no
/// migration mark), its files on a are its own.
fn untouched_on_a(s: &mut Stored, vm: &str) {
    assert_eq!(s.p.a().vm_state(vm).as_deref(), Some("running"), "{vm}");
    let before = s.p.a().check_memory(vm);
    s.p.rounds(20);
    assert!(s.p.a().check_memory(vm) > before, "{vm} runs");
    s.check_disk(0, vm);
    let v = s.p.n[0].node.vms().iter().find(|v| v.name() == vm).unwrap();
    assert!(v.migration_mark().is_none(), "{vm} is no longer marked");
    assert!(v.disk_meta()[0].checkpoint.is_none(), "{vm}: no checkpoint");
}

/// With a limit of one, the shared-nothing move runs while the quick one
/// and the shared-store one wait `queued` (nothing sent, nothing made on
/// b); each starts when the one before it ends, in order, and completes
/// with its report.
#[test]
fn moves_with_disks_queue_under_the_limit_and_complete_in_order() {
    let mut s = three();
    let n = s.p.start_move(request("n"));
    let q = s.p.start_move(request("q"));
    let sh = s.p.start_move(request("s"));
    assert_eq!(s.p.a().job(n).state, JobState::Running);
    // While n copies its disk, the others wait.
    s.p.until(100_000, "n's disk copy runs", |p| {
        p.a()
            .job(n)
            .migration
            .is_some_and(|m| m.storage_bytes_copied > 0)
    });
    for id in [q, sh] {
        assert!(queued(&mut s, id), "{:?}", s.p.a().job(id));
        let m = s.p.a().job(id).migration.unwrap();
        assert_eq!((m.bytes_sent, m.storage_bytes_copied), (0, 0), "{m:?}");
    }
    assert_eq!(s.p.b().vm_state("q"), None);
    assert_eq!(s.p.b().vm_state("s"), None);
    assert!(
        s.files(1).iter().all(|f| f.starts_with("vms/n/")),
        "b has only n's files: {:?}",
        s.files(1)
    );
    untouched_on_a_but_marked(&mut s, "q");
    // Each starts when the one before it ended.
    let jn = s.p.until_ended(n);
    assert_eq!(jn.state, JobState::Completed, "{jn:?}");
    s.p.round();
    assert_ne!(s.p.a().job(q).state, JobState::Queued, "q starts");
    assert!(queued(&mut s, sh), "s waits for q");
    let jq = s.p.until_ended(q);
    assert_eq!(jq.state, JobState::Completed, "{jq:?}");
    let js = s.p.until_ended(sh);
    assert_eq!(js.state, JobState::Completed, "{js:?}");
    // Their reports.
    for (j, disk) in [(&jn, true), (&jq, true), (&js, false)] {
        let r = j.report.clone().unwrap();
        assert_eq!(r.result, "completed", "{r:?}");
        assert!(r.verified && r.bytes_sent > 0 && r.total_ms > 0, "{r:?}");
        assert!(r.downtime_ms > 0 && r.downtime_ms <= r.total_ms, "{r:?}");
        let m = j.migration.clone().unwrap();
        assert_eq!(m.phase, Phase::Completed);
        if disk {
            assert!(
                m.storage_bytes_total >= 3 * MIB && m.storage_bytes_copied == m.storage_bytes_total,
                "{m:?}"
            );
        } else {
            assert_eq!((m.storage_bytes_copied, m.storage_bytes_total), (0, 0));
        }
    }
    assert!(jq.result.unwrap().contains("checkpoint grew"));
    // All three run on b with their data; a keeps nothing of n and q.
    s.p.rounds(20);
    assert!(s.p.a().vms().is_empty());
    for vm in ["n", "q", "s"] {
        assert_eq!(s.p.b().vm_state(vm).as_deref(), Some("running"), "{vm}");
        s.p.b().check_memory(vm);
        s.check_disk(1, vm);
    }
    assert!(s.files(0).is_empty(), "a keeps {:?}", s.files(0));
    assert_eq!(
        s.files(1),
        [
            "vms/n/n-0.vhdx",
            "vms/n/n.vmcfg",
            "vms/q/q-0.vhdx",
            "vms/q/q.vmcfg",
            "vms/s/s.vmcfg"
        ]
    );
    assert_eq!(s.lease("s").unwrap().owner, "b");
}

/// A queued VM runs on at a and its guest goes on while it waits.
fn untouched_on_a_but_marked(s: &mut Stored, vm: &str) {
    let before = s.p.a().check_memory(vm);
    s.p.rounds(5);
    assert!(s.p.a().check_memory(vm) > before, "{vm} runs while queued");
    match s.p.a().call(Request::VmStop { name: vm.into() }) {
        Outcome::Error(e) => assert_eq!(e.code, ErrorCode::VmMigrating, "{e:?}"),
        other => panic!("a queued VM was stopped: {other:?}"),
    }
}

/// Queued moves of each kind cancelled: nothing of them happened (the VM
/// on a as it was, b without VM, job or file); once the slot frees, a
/// new move of each completes.
#[test]
fn a_cancelled_queued_move_with_disks_touches_nothing() {
    let mut s = three();
    // The slot: a plain VM's move held at b's accept.
    s.p.started("w");
    let w = s.p.start_move(
        Mv {
            accept_ms: 60_000,
            ..Mv::default()
        }
        .req("w"),
    );
    let ids: Vec<u64> = ["n", "q", "s"]
        .iter()
        .map(|vm| s.p.start_move(request(vm)))
        .collect();
    s.p.rounds(200);
    for (vm, &id) in ["n", "q", "s"].iter().zip(&ids) {
        assert!(queued(&mut s, id), "{vm}: {:?}", s.p.a().job(id));
        let j = match s.p.a().ok(Request::JobCancel { id }) {
            Body::Job(j) => j,
            other => panic!("{other:?}"),
        };
        assert_eq!(j.state, JobState::Cancelled, "{vm}: {j:?}");
    }
    s.p.rounds(200);
    for (vm, &id) in ["n", "q", "s"].iter().zip(&ids) {
        let j = s.p.a().job(id);
        assert_eq!(j.state, JobState::Cancelled, "{vm}: {j:?}");
        assert_eq!(phase_of(&j), Phase::Cancelled, "{vm}");
        let r = j.report.unwrap();
        assert_eq!((r.result.as_str(), r.bytes_sent), ("cancelled", 0), "{vm}");
        untouched_on_a(&mut s, vm);
        assert_eq!(s.p.b().vm_state(vm), None, "{vm} never reached b");
    }
    assert_eq!(
        s.files(0),
        [
            "vms/n/n-0.vhdx",
            "vms/n/n.vmcfg",
            "vms/q/q-0.vhdx",
            "vms/q/q.vmcfg",
            "vms/s/s.vmcfg",
            "vms/w/w.vmcfg"
        ]
    );
    assert!(s.files(1).is_empty(), "b has {:?}", s.files(1));
    assert_eq!(s.lease("s").unwrap().owner, "a");
    // b knows only w's move (held at its accept).
    let bj = s.p.b().jobs();
    assert_eq!(bj.len(), 1, "{bj:?}");
    assert_eq!(bj[0].vm, "w");
    // The slot frees: each moves now.
    s.p.a().ok(Request::JobCancel { id: w });
    s.p.until_ended(w);
    for vm in ["n", "q", "s"] {
        let id = s.p.start_move(request(vm));
        let j = s.p.until_ended(id);
        assert_eq!(j.state, JobState::Completed, "{vm}: {j:?}");
    }
    s.p.rounds(20);
    for vm in ["n", "q", "s"] {
        s.check_disk(1, vm);
    }
}

/// b at its own limit answers `busy`: a's shared-nothing job waits
/// `queued` naming why, b makes no file for it meanwhile, and the move
/// completes once b's slot frees.
#[test]
fn a_busy_destination_holds_a_move_with_disks_in_the_queue() {
    let mut s = three();
    s.p.b().ok(Request::HostSet {
        max_live_migrations: Some(1),
        max_storage_migrations: None,
    });
    // b's slot: b moves a VM of its own to a, held at a's accept.
    s.p.b().ok(Request::VmCreate {
        name: "x".into(),
        memory_mib: 4,
        guest: None,
        linux: None,
    });
    s.p.b().ok(Request::VmStart { name: "x".into() });
    let x = match s.p.b().ok(Mv {
        to: Some("a"),
        accept_ms: 60_000,
        ..Mv::default()
    }
    .req("x"))
    {
        Body::Job(j) => j.id,
        other => panic!("{other:?}"),
    };
    s.p.rounds(50);
    s.p.a().ok(Request::HostSet {
        max_live_migrations: Some(2),
        max_storage_migrations: None,
    });
    // To b's shared store, whose server counts what b does there.
    let n = s.p.start_move(
        Mv {
            include_storage: true,
            store: Some("shared:arriving"),
            ..Mv::default()
        }
        .req("n"),
    );
    let made = |s: &Stored| {
        let b = s.servers[1].borrow();
        b.count(vstorage::p9::Op::Lcreate) + b.count(vstorage::p9::Op::Unlinkat)
    };
    let before = made(&s);
    s.p.until(100_000, "b says busy", |p| {
        p.a()
            .job(n)
            .error
            .is_some_and(|e| e.contains("waiting for node b"))
    });
    let j = s.p.a().job(n);
    assert_eq!(phase_of(&j), Phase::Queued, "{j:?}");
    // It asks again every second: b refuses each time and makes nothing.
    for _ in 0..3 {
        let t = s.p.clock.get() + 1_100_000_000;
        s.p.until(1_000_000, "a second passes", |p| p.clock.get() > t);
        assert_eq!(phase_of(&s.p.a().job(n)), Phase::Queued);
    }
    assert_eq!(made(&s), before, "b made and removed no file for n");
    assert!(!s.shared.path().join("arriving").exists());
    s.p.b().ok(Request::JobCancel { id: x });
    let j = s.p.until_ended(n);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
    s.p.rounds(20);
    s.check_disk(1, "n");
    assert!(s.shared.path().join("arriving/n-0.vhdx").exists());
}
