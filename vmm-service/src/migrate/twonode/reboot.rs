//! The destination of a move with disks loses power and boots again
//! ([`Stored::reboot`]): before `go` its files still have their partial
//! names, so its boot removes them and nothing of the VM is left there;
//! once the VM resumed there, its files have their names and its boot
//! keeps them (they may be the only copy: the source deletes its own when
//! the move is settled for the destination).

use super::*;

const MIB: u64 = 1 << 20;
const DISK_MIB: u64 = 8;

fn request(quick: bool, resumed_ms: u64) -> Request {
    Mv {
        include_storage: !quick,
        quick,
        resumed_ms,
        ..Mv::default()
    }
    .req("v")
}

/// VM v on a with data on its 8 MiB disk.
fn started() -> Stored {
    let mut s = Stored::new();
    s.started("v", None, DISK_MIB);
    s.write(0, "v", 0, &pattern(2 * MIB, 1));
    s.write(0, "v", 5 * MIB, &pattern(MIB, 2));
    s
}

/// Run until a's job `id` is in doubt or ended; in doubt, wait for a's
/// question to the rebooted b and settle it as the operator would:
/// `keep`.
fn settle(s: &mut Stored, id: u64, keep: Keep) -> JobInfo {
    s.p.until(400_000, "in doubt or ended", |p| {
        let j = p.a().job(id);
        phase_of(&j) == Phase::InDoubt || !matches!(j.state, JobState::Queued | JobState::Running)
    });
    if phase_of(&s.p.a().job(id)) == Phase::InDoubt {
        s.p.until(400_000, "b's answer", |p| {
            p.a()
                .job(id)
                .error
                .is_some_and(|e| e.contains("restarted after the switch-over"))
        });
        s.p.a().ok(Request::JobResolve { id, keep });
    }
    s.p.until_ended(id)
}

/// b stops once it holds the VM's whole state and said `ready` (the disks
/// all written and flushed there), before `go` reaches it: its boot
/// removes the partial files; the VM runs on at a on its own disk (the
/// operator keeps the source), and moves again afterwards.
#[test]
fn a_destination_that_stops_before_go_keeps_no_file_after_its_boot() {
    for quick in [false, true] {
        let mut s = started();
        let id = s.p.start_move(request(quick, 0));
        s.p.until(400_000, "b said ready", |p| {
            p.b().jobs().iter().any(|j| {
                j.vm == "v"
                    && j.migration
                        .as_ref()
                        .is_some_and(|m| m.phase == Phase::SwitchingOver)
            })
        });
        let files = s.files(1);
        assert!(
            !files.is_empty() && files.iter().all(|f| f.ends_with(".partial-b")),
            "quick {quick}: only partial files before go: {files:?}"
        );
        s.p.kill(1);
        s.p.rounds(100);
        let console = s.reboot(1);
        for f in &files {
            let line = format!("store local: removed {f} (left by an unfinished copy)");
            assert!(console.contains(&line), "quick {quick}: {console}");
        }
        assert!(
            s.files(1).is_empty(),
            "quick {quick}: b keeps {:?}",
            s.files(1)
        );
        let j = settle(&mut s, id, Keep::Source);
        assert_ne!(j.state, JobState::Completed, "quick {quick}: {j:?}");
        s.p.rounds(50);
        assert_eq!(s.p.a().vm_state("v").as_deref(), Some("running"));
        s.check_disk(0, "v");
        s.p.a().check_memory("v");
        assert_eq!(s.files(0), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
        // b, booted again, takes it.
        let id = s.p.start_move(request(quick, 0));
        let j = s.p.until_ended(id);
        assert_eq!(j.state, JobState::Completed, "quick {quick}: {j:?}");
        s.p.rounds(20);
        s.check_disk(1, "v");
        assert_eq!(s.files(1), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
    }
}

/// b stops after the VM resumed there, before a heard `resumed`: its files
/// have their names, its boot keeps them whole; settled for the
/// destination, a deletes its own, and b's are the VM's disk.
#[test]
fn a_destination_that_stops_after_the_resume_keeps_the_vms_files() {
    for quick in [false, true] {
        let mut s = started();
        let id = s.p.start_move(request(quick, 5000));
        s.p.until(400_000, "b resumed", |p| {
            p.b().vm_state("v").as_deref() == Some("running")
        });
        assert_eq!(s.files(1), ["vms/v/v-0.vhdx"], "quick {quick}");
        s.p.kill(1);
        s.p.rounds(100);
        let console = s.reboot(1);
        assert!(!console.contains("removed"), "quick {quick}: {console}");
        assert_eq!(s.files(1), ["vms/v/v-0.vhdx"], "quick {quick}");
        s.check_file(1, "vms/v/v-0.vhdx", "v");
        let j = settle(&mut s, id, Keep::Destination);
        assert_eq!(j.state, JobState::Completed, "quick {quick}: {j:?}");
        s.p.rounds(20);
        assert!(
            s.files(0).is_empty(),
            "quick {quick}: a keeps {:?}",
            s.files(0)
        );
        s.check_file(1, "vms/v/v-0.vhdx", "v");
    }
}

/// b cannot name its files at `go` (the rename fails): it refuses the
/// resume and discards the VM and its partial files; a learns it and
/// resumes its copy on its own disk, though it had sent `go`.
#[test]
fn a_destination_that_cannot_name_its_files_at_go_gives_the_vm_back() {
    let mut s = started();
    let id = s.p.start_move(
        Mv {
            include_storage: true,
            store: Some("shared:arriving"),
            ..Mv::default()
        }
        .req("v"),
    );
    s.p.until(400_000, "b said ready", |p| {
        p.b().jobs().iter().any(|j| {
            j.migration
                .as_ref()
                .is_some_and(|m| m.phase == Phase::SwitchingOver)
        })
    });
    assert_eq!(
        walk(&s.shared.path().join("arriving")),
        ["v-0.vhdx.partial-b"]
    );
    s.servers[1]
        .borrow_mut()
        .fail_next(vstorage::p9::Op::Renameat, vstorage::p9::errno::EIO);
    let j = s.p.until_ended(id);
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    let why = j.error.unwrap_or_default();
    assert!(why.contains("could not be committed"), "{why}");
    s.p.rounds(50);
    assert_eq!(s.p.a().vm_state("v").as_deref(), Some("running"));
    s.check_disk(0, "v");
    s.p.a().check_memory("v");
    assert_eq!(s.files(0), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
    assert!(s.p.b().vm_state("v").is_none());
    let bj = s.p.b().jobs();
    let e = bj[0].error.clone().unwrap_or_default();
    assert!(e.contains("cannot commit the VM's disks here"), "{e}");
    assert!(walk(&s.shared.path().join("arriving")).is_empty());
}
