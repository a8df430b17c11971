//! Shared-nothing live migration (issue 14 item 1, docs/DESIGN.md "Live
//! migration between nodes", shared-nothing): a `disk-verify` VM whose
//! 64 MiB disk is on a's local store moves a -> b -> a with
//! `--include-storage --wait`. Its disk follows it over the migration
//! link: after each move the VHDX is in the destination's local store and
//! nowhere else (checked on the host, `qemu-img check` clean, no partial
//! file left), the guest's rounds go on there with none FAILED, and it
//! finds its memory model intact (`disk-verify: migration N ok`). Then
//! a move whose link is cut during the disk copy, and one cut during the
//! memory copy, fail: the VM runs on at a on its own disk, and b, once it
//! learns, keeps no file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hvmgmt::proto::{JobState, MigrationInfo};
use integration_tests::cluster::TestCluster;
use integration_tests::files::{check_vhdx, files_in};

/// One line of a guest under load.
const LINE: Duration = Duration::from_secs(90);
/// A move, or a failure to be noticed.
const MOVE: Duration = Duration::from_secs(300);

/// The VM's disk is in `node`'s local store and nowhere else, sound; no
/// partial file anywhere.
fn disk_on(stores: &Path, node: &str) {
    let disks: Vec<String> = files_in(stores)
        .into_iter()
        .filter(|f| f.ends_with(".vhdx") || f.contains(".partial-"))
        .collect();
    let want = format!("{node}/vms/s/s-0.vhdx");
    assert_eq!(disks, [want.as_str()], "{:?}", files_in(stores));
    check_vhdx(&stores.join(&want));
}

/// Wait until a's move `id`, still under way, shows `what` (`done`);
/// a move that ended or stalls fails the test with the job as it is.
fn wait_job(c: &TestCluster, id: u64, what: &str, done: impl Fn(&MigrationInfo) -> bool) {
    let deadline = Instant::now() + MOVE;
    loop {
        let job = c.job("a", id);
        if job.migration.as_deref().is_some_and(&done) {
            return;
        }
        assert!(
            matches!(job.state, JobState::Queued | JobState::Running),
            "waiting for {what}, the move ended: {job:#?}"
        );
        assert!(Instant::now() < deadline, "waiting for {what}: {job:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_vm_moves_with_its_disk_between_nodes_without_shared_storage() {
    let c = TestCluster::up("nothing", 2);
    let stores: PathBuf = std::fs::canonicalize(c.stores()).unwrap();
    c.ok(
        "a",
        &[
            "vm",
            "create",
            "s",
            "--memory",
            "32M",
            "--disk",
            "64M",
            "--guest",
            "disk-verify",
        ],
    );
    c.ok("a", &["vm", "start", "s"]);
    c.wait_line("a", "s", "disk-verify: round 2 ok", LINE);
    disk_on(&stores, "a");

    for (n, (from, to)) in [("a", "b"), ("b", "a")].into_iter().enumerate() {
        let t = Instant::now();
        let out = c.ok(
            from,
            &["vm", "move", "s", "--to", to, "--include-storage", "--wait"],
        );
        eprintln!("moved {from} -> {to} in {:?}", t.elapsed());
        assert!(c.vm(from, "s").is_none(), "{from} let go: {out}");
        let v = c.vm(to, "s").expect("the VM is listed on the destination");
        assert_eq!(v.state, "running", "{v:?}");
        c.disk_rounds_go_on(to, "s", &["a", "b"], 2, LINE);
        // The guest checked every byte of its memory model on arrival.
        c.wait_line(
            to,
            "s",
            &format!("disk-verify: migration {} ok", n + 1),
            LINE,
        );
        disk_on(&stores, to);
        assert!(
            c.serial(from).contains("VM s left this node: its disk"),
            "{}",
            c.serial_tail(from, 20)
        );
    }

    // The link cut during the disk copy (rate-limited so it lasts): a
    // gives up, the VM runs on at a on its own disk; b, once the link is
    // back and it learns, keeps nothing.
    let id = c.start_move("a", "s", "b", &["--include-storage", "--bandwidth", "1"]);
    wait_job(&c, id, "the disk copy to start", |m| {
        m.storage_bytes_copied > 0
    });
    c.link("b", true);
    let job = c.wait_end("a", id, MOVE);
    assert_eq!(job.state, JobState::Failed, "{job:#?}");
    assert_eq!(c.vm("a", "s").map(|v| v.state), Some("running".into()));
    c.link("b", false);
    c.wait_gone("b", "s", MOVE);
    c.disk_rounds_go_on("a", "s", &["a", "b"], 1, LINE);
    c.wait_line("a", "s", "disk-verify: failed migration 1: memory ok", LINE);
    disk_on(&stores, "a");

    // The link cut during the memory copy (the disks copied, the mirror
    // in place): the same outcome.
    let id = c.start_move("a", "s", "b", &["--include-storage", "--bandwidth", "2"]);
    wait_job(&c, id, "the memory copy to start", |m| m.bytes_sent > 0);
    let m = c.job("a", id).migration.unwrap();
    assert!(
        m.storage_bytes_total > 0 && m.storage_bytes_copied == m.storage_bytes_total,
        "{m:?}"
    );
    c.link("b", true);
    let job = c.wait_end("a", id, MOVE);
    assert_eq!(job.state, JobState::Failed, "{job:#?}");
    assert_eq!(c.vm("a", "s").map(|v| v.state), Some("running".into()));
    c.link("b", false);
    c.wait_gone("b", "s", MOVE);
    c.disk_rounds_go_on("a", "s", &["a", "b"], 1, LINE);
    c.wait_line("a", "s", "disk-verify: failed migration 2: memory ok", LINE);
    disk_on(&stores, "a");
}
