//! Storage live migration on a booted node, as a user does it (issue 12,
//! "Tests"): a `disk-verify` VM's disk, a VHDX on the node's local store,
//! moves local -> shared -> another local directory while the guest writes
//! and checks it; its `disk-verify: round N ok` lines keep coming and none
//! says FAILED; the host files pass `qemu-img check` (also while the VM
//! holds them); the source is gone after a move, or kept with
//! `--keep-source`. Then, on the same node: a move cancelled mid-copy
//! (rate-limited with `--bandwidth` so the copy lasts seconds) leaves no
//! destination file, and a second move queued behind it under
//! `max-storage-migrations 1` runs once it ends; a destination on a full
//! file system (an 8 MiB tmpfs mounted inside the shared store) fails the
//! move and the VM runs on from its source; after the VM stops, a copy the
//! node makes matches its source (`qemu-img compare`); and a node killed
//! mid-copy removes the half-written destination at its next boot. The
//! VM's configuration file (`VM.vmcfg`) moves with `--to`.
//!
//! `vm_configuration_files_move_and_import` (two nodes): a VM's
//! configuration file moved alone (`--config`), then with everything
//! (`--to`), read on the host after each move; a VM whose files are on
//! the shared store registered on node b (`vm import`), listed off,
//! refused a second time, then run there on its disk.
//!
//! One cluster per test (boots are the slow part).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hvmgmt::proto::{Body, JobInfo, JobState, Request};
use integration_tests::cluster::{job_of, TestCluster};
use integration_tests::files::{check_vhdx, files_in, qemu_img};

/// Time for a guest line to appear.
const LINE: Duration = Duration::from_secs(90);
/// Time for a move to end.
const MOVE: Duration = Duration::from_secs(180);

/// [`files_in`] without lease files (`VM.lease`: a node takes one for a
/// running VM with a disk on the shared store, in its own time; leases
/// are shared_store.rs's to test).
fn vm_files_in(dir: &Path) -> Vec<String> {
    let mut files = files_in(dir);
    files.retain(|f| !f.ends_with(".lease"));
    files
}

struct Node<'a> {
    c: &'a TestCluster,
    stores: PathBuf,
}

impl Node<'_> {
    fn ok(&self, args: &[&str]) -> String {
        self.c.ok("a", args)
    }
    /// The disk location VM `vm` lists (slot 0).
    fn location(&self, vm: &str) -> String {
        match self
            .c
            .client("a")
            .call_ok(Request::VmDiskList { name: vm.into() })
        {
            Ok(Body::Disks { disks, .. }) => disks[0].location.clone(),
            other => panic!("vm-disk-list {vm}: {other:?}"),
        }
    }
    /// `vm move-storage` without --wait; the job.
    fn start_move(&self, vm: &str, args: &[&str]) -> JobInfo {
        let mut all = vec!["--json", "vm", "move-storage", vm];
        all.extend_from_slice(args);
        job_of(&self.ok(&all))
    }
    /// `vm move-storage ... --wait`, which must exit 0.
    fn move_wait(&self, vm: &str, args: &[&str]) -> String {
        let mut all = vec!["vm", "move-storage", vm];
        all.extend_from_slice(args);
        all.push("--wait");
        let t = Instant::now();
        let out = self.ok(&all);
        eprintln!(
            "timing: move-storage {vm} {args:?}: {:.1} s",
            t.elapsed().as_secs_f64()
        );
        out
    }
    /// Wait until VM `vm` has checked `more` more rounds, none failed.
    fn rounds_go_on(&self, vm: &str, more: u64) {
        self.c.disk_rounds_go_on("a", vm, &["a"], more, LINE);
    }
    fn wait_log(&self, line: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.c.serial("a").lines().any(|l| l.trim_end() == line) {
            assert!(
                Instant::now() < deadline,
                "no line {line:?} in node a's log:\n{}",
                self.c.serial_tail("a", 30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn a_running_vms_disk_moves_between_stores() {
    let c = TestCluster::up("vstore", 1);
    let n = Node {
        c: &c,
        stores: std::fs::canonicalize(c.dir.join("stores")).unwrap(),
    };
    let (local, shared) = (n.stores.join("a"), n.stores.join("shared"));

    n.ok(&[
        "vm",
        "create",
        "d",
        "--memory",
        "32M",
        "--disk",
        "32M",
        "--guest",
        "disk-verify",
    ]);
    assert_eq!(n.location("d"), "local:vms/d/d-0.vhdx");
    assert_eq!(files_in(&local), ["vms/d/d-0.vhdx", "vms/d/d.vmcfg"]);
    n.ok(&["vm", "start", "d"]);
    // Four 8 MiB spans: after round 4 every block is written.
    c.wait_line("a", "d", "disk-verify: round 4 ok", LINE);
    check_vhdx(&local.join("vms/d/d-0.vhdx"));

    // local -> shared while the guest writes; the source goes.
    let out = n.move_wait("d", &["--to", "shared"]);
    assert!(
        out.contains("moved local:vms/d/d-0.vhdx -> shared:vms/d/d-0.vhdx"),
        "{out}"
    );
    assert!(n
        .ok(&["vm", "disk", "list", "d"])
        .contains("shared:vms/d/d-0.vhdx"));
    assert!(files_in(&local).is_empty(), "{:?}", files_in(&local));
    assert!(!local.join("vms/d").exists(), "the VM's directory went too");
    assert_eq!(vm_files_in(&shared), ["vms/d/d-0.vhdx", "vms/d/d.vmcfg"]);
    check_vhdx(&shared.join("vms/d/d-0.vhdx"));
    n.rounds_go_on("d", 2);

    // shared -> another local directory, keeping the source.
    n.move_wait("d", &["--to", "local:moved", "--keep-source"]);
    assert_eq!(n.location("d"), "local:moved/d-0.vhdx");
    assert_eq!(files_in(&local), ["moved/d-0.vhdx", "moved/d.vmcfg"]);
    assert_eq!(
        vm_files_in(&shared),
        ["vms/d/d-0.vhdx", "vms/d/d.vmcfg"],
        "kept"
    );
    n.rounds_go_on("d", 2);
    check_vhdx(&local.join("moved/d-0.vhdx"));

    // Cancel mid-copy (1 MiB/s: the 32 MiB take half a minute), with a
    // second move queued behind it under max-storage-migrations 1.
    n.ok(&["host", "set", "--max-storage-migrations", "1"]);
    n.ok(&["vm", "create", "e", "--memory", "8M", "--disk", "4M"]);
    let slow = n.start_move("d", &["--to", "shared:cancel", "--bandwidth", "1"]);
    let queued = n.start_move("e", &["--to", "shared"]);
    assert_eq!(queued.state, JobState::Queued, "{queued:#?}");
    let j = c.wait_job("a", slow.id, "copying", MOVE, |j| j.bytes_done > 0);
    assert!(j.bytes_done < j.bytes_total, "{j:#?}");
    assert_eq!(
        files_in(&shared.join("cancel")),
        ["d-0.vhdx.partial-a"],
        "written under its partial name"
    );
    assert_eq!(c.job("a", queued.id).state, JobState::Queued);
    n.ok(&["job", "cancel", &slow.id.to_string()]);
    assert_eq!(c.wait_end("a", slow.id, MOVE).state, JobState::Cancelled);
    assert!(
        files_in(&shared.join("cancel")).is_empty(),
        "a destination file is left: {:?}",
        files_in(&shared.join("cancel"))
    );
    assert_eq!(n.location("d"), "local:moved/d-0.vhdx");
    let e = c.wait_end("a", queued.id, MOVE);
    assert_eq!(e.state, JobState::Completed, "the queued move ran: {e:#?}");
    assert_eq!(n.location("e"), "shared:vms/e/e-0.vhdx");
    n.rounds_go_on("d", 2);

    // A destination on a full file system: the move fails, nothing is
    // left there, the VM runs on from its source.
    let small = shared.join("small");
    let fs = integration_tests::Tmpfs::mount(&small, 8);
    let run = c.hvctl(
        "a",
        &["vm", "move-storage", "d", "--to", "shared:small", "--wait"],
    );
    assert!(!run.success, "{}", run.transcript());
    let text = run.stdout.clone() + &run.stderr;
    assert!(text.contains("store full"), "{}", run.transcript());
    assert!(files_in(&small).is_empty(), "{:?}", files_in(&small));
    drop(fs);
    assert_eq!(n.location("d"), "local:moved/d-0.vhdx");
    n.rounds_go_on("d", 3);

    // The VM stops; a copy the node makes of its disk now matches it.
    n.ok(&["vm", "stop", "d"]);
    let last = local.join("moved/d-0.vhdx");
    check_vhdx(&last);
    n.move_wait("d", &["--to", "shared:copy", "--keep-source"]);
    let copy = shared.join("copy/d-0.vhdx");
    check_vhdx(&copy);
    let (same, text) = qemu_img(&[
        "compare",
        "-f",
        "vhdx",
        "-F",
        "vhdx",
        last.to_str().unwrap(),
        copy.to_str().unwrap(),
    ]);
    assert!(same && text.contains("Images are identical"), "{text}");

    // The node dies mid-copy; its next boot removes the half-written
    // destination, and the source is whole.
    let slow = n.start_move("d", &["--to", "local:restart", "--bandwidth", "1"]);
    c.wait_job("a", slow.id, "copying", MOVE, |j| j.bytes_done > 0);
    assert_eq!(files_in(&local.join("restart")), ["d-0.vhdx.partial-a"]);
    c.must(&["cluster", "kill", "a"]);
    // The node boots on the ports it had; one freed a moment ago can be
    // briefly unavailable on a busy machine: a few tries.
    let mut start = c.runner(&["cluster", "start", "a"]);
    for _ in 0..5 {
        if start.success {
            break;
        }
        eprintln!(
            "cluster start a failed, again in 2 s:\n{}",
            start.transcript()
        );
        std::thread::sleep(Duration::from_secs(2));
        start = c.runner(&["cluster", "start", "a"]);
    }
    assert!(start.success, "{}", start.transcript());
    n.wait_log(
        "vmm-service: store local: removed restart/d-0.vhdx.partial-a (left by an unfinished copy)",
        LINE,
    );
    assert!(files_in(&local.join("restart")).is_empty());
    check_vhdx(&copy);
}

/// The `key=value` lines of the configuration file at `path` on the host.
fn config_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(text.starts_with("hvmigrate-vm 1\n"), "{text}");
    text.lines().skip(1).map(String::from).collect()
}

fn line_of<'a>(lines: &'a [String], key: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn vm_configuration_files_move_and_import() {
    let c = TestCluster::up("vmcfg", 2);
    let n = Node {
        c: &c,
        stores: std::fs::canonicalize(c.dir.join("stores")).unwrap(),
    };
    let (local, shared) = (n.stores.join("a"), n.stores.join("shared"));
    n.ok(&[
        "vm",
        "create",
        "d",
        "--memory",
        "32M",
        "--disk",
        "16M",
        "--guest",
        "disk-verify",
    ]);
    assert_eq!(files_in(&local), ["vms/d/d-0.vhdx", "vms/d/d.vmcfg"]);
    let first = config_lines(&local.join("vms/d/d.vmcfg"));
    let id = line_of(&first, "id")[0].to_string();
    assert_eq!(line_of(&first, "name"), ["d"]);
    assert_eq!(line_of(&first, "disk.0"), ["dynamic local:vms/d/d-0.vhdx"]);
    n.ok(&["vm", "start", "d"]);
    c.wait_line("a", "d", "disk-verify: round 2 ok", LINE);

    // The configuration alone to the shared store: the disk stays.
    let out = n.move_wait("d", &["--config", "shared:cfg"]);
    assert!(
        out.contains("config local:vms/d/d.vmcfg -> shared:cfg/d.vmcfg"),
        "{out}"
    );
    assert_eq!(files_in(&local), ["vms/d/d-0.vhdx"]);
    assert_eq!(vm_files_in(&shared), ["cfg/d.vmcfg"]);
    let cfg = config_lines(&shared.join("cfg/d.vmcfg"));
    assert_eq!(line_of(&cfg, "disk.0"), ["dynamic local:vms/d/d-0.vhdx"]);
    assert_eq!(line_of(&cfg, "id"), [id.as_str()]);
    let listed = n.ok(&["vm", "disk", "list", "d"]);
    assert!(listed.contains("config     shared:cfg/d.vmcfg"), "{listed}");

    // Everything to another local directory while the guest writes.
    n.move_wait("d", &["--to", "local:final"]);
    assert_eq!(files_in(&local), ["final/d-0.vhdx", "final/d.vmcfg"]);
    assert!(vm_files_in(&shared).is_empty(), "{:?}", files_in(&shared));
    let cfg = config_lines(&local.join("final/d.vmcfg"));
    assert_eq!(line_of(&cfg, "disk.0"), ["dynamic local:final/d-0.vhdx"]);
    assert_eq!(line_of(&cfg, "snapshots"), ["local:final/snapshots"]);
    assert_eq!(line_of(&cfg, "id"), [id.as_str()]);
    check_vhdx(&local.join("final/d-0.vhdx"));
    n.rounds_go_on("d", 2);
    let json = n.ok(&["--json", "vm", "list"]);
    assert!(
        json.contains("\"config\": \"local:final/d.vmcfg\""),
        "{json}"
    );

    // A VM whose files are all on the shared store, registered on b.
    n.ok(&[
        "vm",
        "create",
        "s",
        "--memory",
        "32M",
        "--disk",
        "16M",
        "--store",
        "shared",
        "--guest",
        "disk-verify",
    ]);
    n.move_wait("s", &["--config", "shared", "--snapshots", "shared"]);
    assert_eq!(vm_files_in(&shared), ["vms/s/s-0.vhdx", "vms/s/s.vmcfg"]);
    let out = c.ok("b", &["vm", "import", "shared:vms/s/s.vmcfg"]);
    assert!(out.contains("created"), "{out}");
    let listed = c.ok("b", &["vm", "list"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("s ") && l.contains("created")),
        "{listed}"
    );
    let disks = c.ok("b", &["vm", "disk", "list", "s"]);
    assert!(disks.contains("shared:vms/s/s-0.vhdx"), "{disks}");
    assert!(disks.contains("config     shared:vms/s/s.vmcfg"), "{disks}");
    let twice = c.hvctl("b", &["vm", "import", "shared:vms/s/s.vmcfg"]);
    assert!(
        !twice.success && twice.stderr.contains("registered on this node already"),
        "{}",
        twice.transcript()
    );
    let bad = c.hvctl("b", &["vm", "import", "shared:vms/s/s-0.vhdx"]);
    assert!(
        !bad.success && bad.stderr.contains("is at most 4096 bytes"),
        "{}",
        bad.transcript()
    );
    // Registered is not running: while a holds the VM's lease (taken
    // when its disk was made on the shared store), b may not start it;
    // once a gives it up, b runs it on its disk.
    let held = c.hvctl("b", &["vm", "start", "s"]);
    assert!(
        !held.success && held.stderr.contains("leased by node a"),
        "{}",
        held.transcript()
    );
    n.ok(&["vm", "stop", "s"]);
    c.ok("b", &["vm", "start", "s"]);
    c.wait_line("b", "s", "disk-verify: round 1 ok", LINE);
    check_vhdx(&shared.join("vms/s/s-0.vhdx"));
}
