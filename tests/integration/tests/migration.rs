//! Live migration between two nodes, as an operator does it and as it
//! fails (issue 11, "Tests"): a `busy-verify` VM moves a -> b -> a, both
//! moves verified, its heartbeats unbroken and never doubled; then the
//! failure matrix. Every case ends with the VM running exactly once, its
//! memory checked by the guest itself (`busy-verify: migration N ok`, or
//! after a failed move `busy-verify: failed migration N: memory ok` with the
//! VM beating on at the source), and a job whose error names the cause.
//!
//! Faults are injected on the real link (the relay's cut, `cluster kill`,
//! `cluster start --wrong-key`) at a phase the test reaches by polling the
//! job (`job-show`) 20 times a second; a bandwidth cap (`--bandwidth`)
//! makes the copy phases seconds long, and a generous downtime limit makes
//! the final paused copy long. Phases that last only milliseconds
//! (negotiating, waiting for `ready`, between `go` and `resumed`) are held
//! open by the destination on request: vm-move's test knobs
//! (docs/MANAGEMENT.md). The failure cases use 16 MiB guests.

use std::io::Read;
use std::process::Child;
use std::time::{Duration, Instant};

use hvmgmt::proto::{Body, JobInfo, JobState, Phase, Request};
use integration_tests::cluster::{job_of, TestCluster};
use integration_tests::{hvctl_bin, hvctl_command, Run};

const AB: &[&str] = &["a", "b"];
/// Time for a guest line to appear.
const LINE: Duration = Duration::from_secs(60);
/// Time for a failing migration to notice and give up (the source gives
/// up after 8 s without an acknowledgement).
const GIVE_UP: Duration = Duration::from_secs(90);
/// Time for a destination to drop the copy of a migration that failed
/// (it gives up on a silent source after 30 s).
const DROPPED: Duration = Duration::from_secs(60);
/// Memory of the failure cases' guests, MiB.
const SMALL: u64 = 16;

fn took(what: &str, start: Instant) {
    eprintln!("timing: {what}: {:.1} s", start.elapsed().as_secs_f64());
}

/// The job's error, which must exist.
fn error_of(j: &JobInfo) -> String {
    j.error
        .clone()
        .unwrap_or_else(|| panic!("job {} has no error: {j:#?}", j.id))
}

/// After a move that failed or was cancelled: the VM beats on at `node`
/// alone and has checked its memory after one more failed migration than
/// the `before` it had seen.
fn survived(c: &TestCluster, node: &str, name: &str, before: u32) {
    c.wait_line(
        node,
        name,
        &format!("busy-verify: failed migration {}: memory ok", before + 1),
        LINE,
    );
    c.runs_once_on(node, name, AB);
}

/// "Done means", as typed on a clean clone (the cluster's state directory
/// comes from `$HVMIGRATE_CLUSTER_DIR`, so every command is the README's),
/// then back again encrypted, both moves verified; then the same move with
/// the link cut mid-move (`cluster link cut --node b`) leaves the VM on a
/// with a failed job.
#[test]
fn busy_vm_moves_a_to_b_and_back_and_survives_a_cut() {
    let c = TestCluster::up("move", 2);
    let t0 = Instant::now();
    let env = [("HVMIGRATE_CLUSTER_DIR", c.dir())];
    let typed = |line: &str| hvctl_bin(&line.split_whitespace().collect::<Vec<_>>(), &env);
    let ok = |line: &str| {
        let run = typed(line);
        assert!(run.success, "hvctl {line}:\n{}", run.transcript());
        run.stdout
    };
    ok("--node a vm create v --memory 64M --guest busy-verify");
    ok("--node a vm start v");
    c.wait_line("a", "v", "heartbeat …", LINE);
    let moved = typed("--node a vm move v --to b --wait");
    assert_eq!(moved.code, Some(0), "{}", moved.transcript());
    assert!(
        moved
            .stdout
            .contains("v runs on node b (running) and no longer on node a"),
        "{}",
        moved.transcript()
    );
    took("move a -> b (--wait)", t0);
    assert!(ok("--node a vm list").contains("no VMs"));
    let on_b = ok("--node b vm list");
    assert!(
        on_b.lines()
            .any(|l| l.starts_with("v ") && l.contains("running")),
        "{on_b}"
    );
    c.wait_line("b", "v", "busy-verify: migration 1 ok", LINE);
    // Its console continues on b: the lines it printed on a came along.
    let console = ok("--node b vm console v");
    assert!(console.contains("heartbeat "), "{console}");
    // The job, with its report: verified.
    let id = moved
        .stdout
        .split_whitespace()
        .nth(1)
        .and_then(|w| w.trim_end_matches(':').parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no job id in {}", moved.stdout));
    let job = job_of(&ok(&format!("--node a --json job show {id}")));
    assert_eq!(job.state, JobState::Completed, "{job:#?}");
    let r = job.report.clone().expect("a completed job has its report");
    assert!(r.verified && r.result == "completed", "{r:#?}");
    assert!(
        r.passes >= 1 && r.bytes_sent > 0 && r.ram_bytes == 64 << 20,
        "{r:#?}"
    );
    let shown = ok(&format!("--node a job show {id}"));
    assert!(shown.contains("memory verified"), "{shown}");

    // And back, encrypted: migration 2, verified too.
    let t1 = Instant::now();
    let back = typed("--node b --json vm move v --to a --wait --encrypt");
    assert_eq!(back.code, Some(0), "{}", back.transcript());
    let job = job_of(&back.stdout);
    assert!(job.report.as_ref().is_some_and(|r| r.verified), "{job:#?}");
    assert!(
        job.migration.as_ref().is_some_and(|m| m.encrypted),
        "{job:#?}"
    );
    took("move b -> a (--wait --json --encrypt)", t1);
    c.wait_line("a", "v", "busy-verify: migration 2 ok", LINE);
    c.runs_once_on("a", "v", AB);
    let span = c.heartbeats("v", AB);
    eprintln!(
        "heartbeats 1..={} over both nodes, none missing, none twice",
        span.last
    );

    // The same move with b's link cut mid-move (capped at 8 MiB/s so the
    // first pass lasts long enough for a `cluster` command): v stays on a,
    // the job fails.
    let t2 = Instant::now();
    let mut waiter = hvctl_command(
        &[
            "--node",
            "a",
            "vm",
            "move",
            "v",
            "--to",
            "b",
            "--wait",
            "--bandwidth",
            "8",
        ],
        &env,
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("starting hvctl");
    let job_id = wait_for_job(&c, "a", "v", &mut waiter);
    c.wait_phase("a", job_id, Phase::Copying, 0, 1 << 20);
    c.must(&["cluster", "link", "cut", "--node", "b"]);
    let run = Run::from(waiter.wait_with_output().expect("hvctl ran"));
    assert_eq!(run.code, Some(1), "{}", run.transcript());
    assert!(
        run.stderr.contains("v was not moved"),
        "{}",
        run.transcript()
    );
    // The lost link is named after the destination, in --wait's output too.
    assert!(
        run.stdout.contains("link to b lost"),
        "{}",
        run.transcript()
    );
    c.must(&["cluster", "link", "restore", "--node", "b"]);
    let job = c.job("a", job_id);
    assert_eq!(job.state, JobState::Failed, "{job:#?}");
    let e = error_of(&job);
    assert!(e.contains("link to b lost"), "{e}");
    survived(&c, "a", "v", 0);
    took("move a -> b with the link cut", t2);
    took("the whole test (after boot)", t0);
}

/// The id of the live-migration job of VM `name` on `node`, once there,
/// started by `hvctl` (`cargo run`: it may have to link the binary first,
/// which takes a while on a loaded machine).
fn wait_for_job(c: &TestCluster, node: &str, name: &str, hvctl: &mut Child) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(300);
    // One session for all the polling: a new connection every few ms keeps
    // the node's slots churning, and a slot that hvctl holds while it is
    // still authenticating may be the one given up to a newcomer (the node
    // then closes hvctl's connection before it could ask for the move).
    let mut client = c.client(node);
    loop {
        let vm = match client.call_ok(Request::VmList) {
            Ok(Body::VmList { vms }) => vms.into_iter().find(|v| v.name == name),
            other => panic!("vm-list on node {node}: {other:?}"),
        };
        if let Some(id) = vm.and_then(|v| v.migration_job) {
            return id;
        }
        if let Ok(Some(status)) = hvctl.try_wait() {
            let mut err = String::new();
            if let Some(e) = hvctl.stderr.as_mut() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("hvctl vm move ended ({status}) before a migration of {name} started:\n{err}");
        }
        assert!(
            Instant::now() < deadline,
            "no migration of {name} started within 300 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The link cut at three points before the switch-over: the first pass,
/// a later (dirty) pass, the final copy with the VM paused. Each time the
/// source gives up, resumes the VM, and the guest finds its memory intact.
/// Then the link cut right after `go`: the source cannot know whether the
/// destination resumed the VM, so it keeps its copy paused (in doubt)
/// until the link is back and the destination tells it; exactly one copy
/// ever runs.
#[test]
fn link_cut_in_each_phase() {
    let c = TestCluster::up("cut", 2);
    c.busy("a", "v", SMALL);
    let cases: [(&str, Phase, u32, &[&str]); 3] = [
        ("the first pass", Phase::Copying, 0, &["--bandwidth", "2"]),
        ("a dirty pass", Phase::Copying, 1, &["--bandwidth", "2"]),
        (
            "the final copy",
            Phase::FinalCopy,
            0,
            &["--bandwidth", "2", "--downtime-ms", "60000"],
        ),
    ];
    for (what, phase, pass, extra) in cases {
        let t = Instant::now();
        let before = c.failed_checks("a", "v");
        let id = c.start_move("a", "v", "b", extra);
        c.wait_phase("a", id, phase, pass, 256 << 10);
        c.link("b", true);
        let job = c.wait_end("a", id, GIVE_UP);
        c.link("b", false);
        assert_eq!(job.state, JobState::Failed, "{what}: {job:#?}");
        let e = error_of(&job);
        assert!(e.contains("link to b lost"), "{what}: {e}");
        survived(&c, "a", "v", before);
        c.wait_gone("b", "v", DROPPED);
        took(&format!("link cut in {what}"), t);
    }

    // Right after `go`: the destination holds its `resumed` answer for 10 s
    // after it resumed the VM (a test knob of vm-move, docs/MANAGEMENT.md),
    // so the window between `go` and `resumed` is wide enough to cut.
    let t = Instant::now();
    let id = c.start_move("a", "v", "b", &["--debug-hold-resumed-ms", "10000"]);
    c.wait_phase("a", id, Phase::SwitchingOver, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.vm("b", "v").is_none_or(|v| v.state != "running") {
        assert!(Instant::now() < deadline, "b never resumed v");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.link("b", true);
    let doubt = c.wait_job("a", id, "in doubt", GIVE_UP, |j| {
        j.migration
            .as_ref()
            .is_some_and(|m| m.phase == Phase::InDoubt)
    });
    assert_eq!(c.vm("a", "v").map(|v| v.state), Some("paused".into()));
    // The whole explanation (past 200 bytes), the peer named.
    let note = error_of(&doubt);
    assert!(
        note.contains("in doubt") && note.contains("link to b lost"),
        "{doubt:#?}"
    );
    assert!(
        note.contains("VM v stays paused here; this node asks b about it"),
        "{doubt:#?}"
    );
    // Past the commit point: the move can no longer be cancelled.
    let refused = c.hvctl("a", &["job", "cancel", &id.to_string()]);
    assert_eq!(refused.code, Some(1), "{}", refused.transcript());
    assert!(
        refused.stderr.contains("invalid-state"),
        "{}",
        refused.transcript()
    );
    c.link("b", false);
    let job = c.wait_end("a", id, GIVE_UP);
    assert_eq!(job.state, JobState::Completed, "{job:#?}");
    c.wait_line("b", "v", "busy-verify: migration 1 ok", LINE);
    c.runs_once_on("b", "v", AB);
    assert!(c.vm("a", "v").is_none(), "a deleted its paused copy");
    took("link cut right after go, resolved", t);
}

/// The destination powered off mid-stream: the source gives up and the VM
/// runs on; the destination boots again empty and then takes the VM.
#[test]
fn destination_killed_mid_stream() {
    let c = TestCluster::up("kill", 2);
    c.busy("a", "v", SMALL);
    let t = Instant::now();
    let id = c.start_move("a", "v", "b", &["--bandwidth", "2"]);
    c.wait_phase("a", id, Phase::Copying, 0, 256 << 10);
    c.must(&["cluster", "kill", "b"]);
    let job = c.wait_end("a", id, GIVE_UP);
    assert_eq!(job.state, JobState::Failed, "{job:#?}");
    let e = error_of(&job);
    assert!(e.contains("link") || e.contains('b'), "{e}");
    survived(&c, "a", "v", 0);
    took("destination killed mid-stream", t);
    let t = Instant::now();
    c.must(&["cluster", "start", "b"]);
    assert!(c.ok("b", &["vm", "list"]).contains("no VMs"));
    let id = c.start_move("a", "v", "b", &[]);
    let job = c.wait_end("a", id, GIVE_UP);
    assert_eq!(job.state, JobState::Completed, "{job:#?}");
    c.wait_line("b", "v", "busy-verify: migration 1 ok", LINE);
    c.runs_once_on("b", "v", AB);
    took("destination started again, then the move", t);
}

/// The destination refuses before any page moves: the name taken, not
/// enough memory, a key that is not the cluster's (nothing received).
#[test]
fn destination_refuses() {
    let c = TestCluster::up("refuse", 2);
    c.busy("a", "v", SMALL);
    // The name is taken on b.
    c.ok("b", &["vm", "create", "v", "--memory", "4"]);
    let t = Instant::now();
    let id = c.start_move("a", "v", "b", &[]);
    let job = c.wait_end("a", id, Duration::from_secs(60));
    assert_eq!(job.state, JobState::Failed, "{job:#?}");
    let e = error_of(&job);
    assert!(e.contains("refused") && e.contains('v'), "{e}");
    survived(&c, "a", "v", 0);
    c.ok("b", &["vm", "delete", "v"]);
    took("refused: name taken", t);

    // Not enough memory on b: fill it with created (not started) VMs, in
    // pieces of at most 256 MiB (the node clears a VM's memory while it
    // answers vm-create: a piece of a GiB takes longer than hvctl waits
    // under emulation).
    let t = Instant::now();
    let mut fill = 0;
    loop {
        let info = c.ok("b", &["--json", "node", "info"]);
        let free: u64 = serde_json::from_str::<serde_json::Value>(&info).unwrap()["ok"]
            ["memory_free_bytes"]
            .as_u64()
            .unwrap();
        let free_mib = free >> 20;
        if free_mib < SMALL {
            break;
        }
        let mib = (free_mib - SMALL / 2).clamp(4, 256).to_string();
        c.ok(
            "b",
            &["vm", "create", &format!("fill{fill}"), "--memory", &mib],
        );
        fill += 1;
        assert!(fill < 15, "node b still has {free_mib} MiB free");
    }
    let id = c.start_move("a", "v", "b", &[]);
    let job = c.wait_end("a", id, Duration::from_secs(60));
    assert_eq!(job.state, JobState::Failed, "{job:#?}");
    let e = error_of(&job);
    assert!(e.contains("refused") && e.contains("memory"), "{e}");
    survived(&c, "a", "v", 1);
    took("refused: not enough memory", t);

    // A node that does not hold the cluster key: refused at the handshake,
    // nothing received.
    let t = Instant::now();
    c.must(&["cluster", "kill", "b"]);
    c.must(&["cluster", "start", "b", "--wrong-key"]);
    let id = c.start_move("a", "v", "b", &[]);
    let job = c.wait_end("a", id, Duration::from_secs(60));
    assert_eq!(job.state, JobState::Failed, "{job:#?}");
    let e = error_of(&job);
    assert!(e.contains("authenticat"), "{e}");
    assert!(c.ok("b", &["vm", "list"]).contains("no VMs"));
    assert!(c.ok("b", &["job", "list"]).contains("no jobs"));
    assert!(!c.serial("b").contains("[v] "), "b ran something of v");
    survived(&c, "a", "v", 2);
    took("refused: wrong cluster key", t);
}

/// `job cancel` in each phase before the switch-over (copying: first and
/// dirty pass; the final copy; negotiating; waiting for `ready`;
/// connecting; queued), the VM running on at
/// a each time; then two moves under `host set --max-migrations 1`: the
/// second queues, then starts by itself and completes.
#[test]
fn cancel_in_each_phase_then_two_moves_queue() {
    let c = TestCluster::up("cancel", 2);
    c.busy("a", "v", SMALL);
    let cancel = |id: u64| {
        let job = job_of(&c.ok("a", &["--json", "job", "cancel", &id.to_string()]));
        assert_eq!(job.id, id);
        let job = c.wait_end("a", id, GIVE_UP);
        assert_eq!(job.state, JobState::Cancelled, "{job:#?}");
        assert!(error_of(&job).contains("cancel"), "{job:#?}");
    };
    for (what, phase, pass, extra) in [
        (
            "copying, the first pass",
            Phase::Copying,
            0,
            &["--bandwidth", "2"][..],
        ),
        (
            "copying, a dirty pass",
            Phase::Copying,
            1,
            &["--bandwidth", "2"][..],
        ),
        (
            "the final copy",
            Phase::FinalCopy,
            0,
            &["--bandwidth", "2", "--downtime-ms", "60000"][..],
        ),
    ] {
        let t = Instant::now();
        let before = c.failed_checks("a", "v");
        let id = c.start_move("a", "v", "b", extra);
        c.wait_phase("a", id, phase, pass, 256 << 10);
        cancel(id);
        survived(&c, "a", "v", before);
        c.wait_gone("b", "v", DROPPED);
        took(&format!("cancel in {what}"), t);
    }
    // Negotiating (b holds its `accept` for 10 s) and waiting for `ready`
    // after the final copy, the VM paused (b holds `ready` for 10 s): test
    // knobs of vm-move (docs/MANAGEMENT.md).
    for (what, phase, extra) in [
        (
            "negotiating",
            Phase::Negotiating,
            &["--debug-hold-accept-ms", "10000"][..],
        ),
        (
            "waiting for ready",
            Phase::SwitchingOver,
            &["--debug-hold-ready-ms", "10000"][..],
        ),
    ] {
        let t = Instant::now();
        let before = c.failed_checks("a", "v");
        let id = c.start_move("a", "v", "b", extra);
        c.wait_phase("a", id, phase, 0, 0);
        if phase == Phase::SwitchingOver {
            assert_eq!(c.vm("a", "v").map(|v| v.state), Some("paused".into()));
        }
        cancel(id);
        survived(&c, "a", "v", before);
        c.wait_gone("b", "v", DROPPED);
        took(&format!("cancel while {what}"), t);
    }
    // Connecting: b's link is cut, so the connection cannot open.
    let t = Instant::now();
    let before = c.failed_checks("a", "v");
    c.link("b", true);
    let id = c.move_now("a", "v", "b", 0);
    c.wait_phase("a", id, Phase::Connecting, 0, 0);
    cancel(id);
    c.link("b", false);
    survived(&c, "a", "v", before);
    took("cancel while connecting", t);

    // Queued: under a limit of 1, a second VM's move waits for the first.
    let t = Instant::now();
    c.ok("a", &["host", "set", "--max-migrations", "1"]);
    c.busy("a", "w", SMALL);
    let first = c.move_now("a", "v", "b", 4);
    let queued = c.move_now("a", "w", "b", 0);
    let j = c.job("a", queued);
    assert_eq!(j.state, JobState::Queued, "{j:#?}");
    assert_eq!(j.migration.as_ref().map(|m| m.phase), Some(Phase::Queued));
    cancel(queued);
    c.runs_once_on("a", "w", AB);
    took("cancel while queued", t);
    // The same again, left alone: w's move starts by itself once v's ends.
    let t = Instant::now();
    let second = c.move_now("a", "w", "b", 0);
    assert_eq!(c.job("a", second).state, JobState::Queued);
    let one = c.wait_end("a", first, GIVE_UP);
    assert_eq!(one.state, JobState::Completed, "{one:#?}");
    let two = c.wait_end("a", second, GIVE_UP);
    assert_eq!(two.state, JobState::Completed, "{two:#?}");
    for vm in ["v", "w"] {
        c.wait_line("b", vm, "busy-verify: migration 1 ok", LINE);
        c.runs_once_on("b", vm, AB);
    }
    took("two moves, one at a time", t);
}
