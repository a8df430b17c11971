//! Live migration of a VM whose disk is on the shared store (issue 14 item
//! 2, docs/DESIGN.md "Leases" and "Live migration between nodes"): a
//! `disk-verify` VM with a 64 MiB disk on store `shared` moves a -> b -> a
//! with `--wait`; only memory and state move, the VHDX stays the one file
//! in `stores/shared` (checked on the host: no copy anywhere, `qemu-img
//! check` clean), the guest's rounds go on with none FAILED and it finds
//! its memory model intact (`disk-verify: migration N ok`), and the lease
//! file beside it names the node that runs it. While a holds the lease, b
//! cannot give a VM of that name a disk there (storage_migration.rs checks
//! `vm import` + `vm start` on b refused while a holds it). Then b is killed right after the commit point,
//! after it adopted the lease: a, in doubt, reads the lease, settles the
//! move as b's and deletes its stale copy (never resumed over a disk b
//! wrote); b, started again, has nothing. The VM died with b, as any VM
//! of a crashed node: registered again on a (`vm import` of its file on
//! the shared store), `vm start` is refused naming b until b's lease
//! expired and a's claim settled, then a fresh guest boots on a with its
//! disk.
//! Never two nodes run the VM.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hvmgmt::proto::JobState;
use integration_tests::cluster::TestCluster;
use integration_tests::files::{check_vhdx, files_in};

/// One line of a guest under load.
const LINE: Duration = Duration::from_secs(90);
/// A move with `--wait`, or a lease take-over.
const MOVE: Duration = Duration::from_secs(180);

/// `KEY=` of the lease file (`owner`, `epoch`).
fn lease_field(stores: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(stores.join("shared/vms/s/s.lease")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(String::from))
}

/// The VM's one file is where it was and nowhere else, and sound.
fn one_file(stores: &Path) {
    let vhdx: Vec<String> = files_in(stores)
        .into_iter()
        .filter(|f| f.ends_with(".vhdx") || f.contains(".partial-"))
        .collect();
    assert_eq!(vhdx, ["shared/vms/s/s-0.vhdx"], "{:?}", files_in(stores));
    check_vhdx(&stores.join("shared/vms/s/s-0.vhdx"));
}

fn moved(c: &TestCluster, from: &str, to: &str) {
    let out = c.ok(from, &["vm", "move", "s", "--to", to, "--wait"]);
    for l in out.lines().filter(|l| l.contains("downtime")) {
        eprintln!("{from} -> {to}: {}", l.trim());
    }
    assert!(c.vm(from, "s").is_none(), "{from} let go: {out}");
    let v = c.vm(to, "s").expect("the VM is listed on the destination");
    assert_eq!(v.state, "running", "{v:?}");
}

#[test]
fn a_vm_on_the_shared_store_moves_with_its_lease() {
    let c = TestCluster::up("shared", 2);
    let stores: PathBuf = std::fs::canonicalize(c.dir.join("stores")).unwrap();
    let ab = ["a", "b"];
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
            "--store",
            "shared",
            "--guest",
            "disk-verify",
        ],
    );
    assert_eq!(lease_field(&stores, "owner").as_deref(), Some("a"));
    // Its configuration file beside its disk (vmconf's `vm import` reads
    // it at the end).
    c.ok(
        "a",
        &["vm", "move-storage", "s", "--config", "shared", "--wait"],
    );
    c.ok("a", &["vm", "start", "s"]);
    c.wait_line("a", "s", "disk-verify: round 2 ok", LINE);

    // The non-owner cannot touch the VM's files.
    let refused = c.hvctl(
        "b",
        &[
            "vm", "create", "s", "--memory", "8M", "--disk", "4M", "--store", "shared",
        ],
    );
    assert!(!refused.success, "{}", refused.transcript());
    assert!(
        refused.stderr.contains("leased by node a"),
        "{}",
        refused.transcript()
    );
    if c.vm("b", "s").is_some() {
        c.ok("b", &["vm", "delete", "s"]);
    }
    assert_eq!(lease_field(&stores, "owner").as_deref(), Some("a"));

    // a -> b -> a: memory and state only.
    for (n, from, to, epoch) in [(1, "a", "b", "2"), (2, "b", "a", "3")] {
        let t = Instant::now();
        moved(&c, from, to);
        assert_eq!(lease_field(&stores, "owner").as_deref(), Some(to));
        assert_eq!(lease_field(&stores, "epoch").as_deref(), Some(epoch));
        assert_ne!(lease_field(&stores, "incarnation").as_deref(), Some("0"));
        c.disk_rounds_go_on(to, "s", &ab, 2, LINE);
        // The guest checked every byte of its memory model on arrival.
        c.wait_line(to, "s", &format!("disk-verify: migration {n} ok"), LINE);
        one_file(&stores);
        eprintln!("moved {from} -> {to} in {:?}", t.elapsed());
    }

    // b killed right after the commit point: it resumed the VM and adopted
    // the lease, and holds its `resumed` answer.
    let id = c.start_move("a", "s", "b", &["--debug-hold-resumed-ms", "20000"]);
    let deadline = Instant::now() + MOVE;
    while c.vm("b", "s").is_none_or(|v| v.state != "running")
        || lease_field(&stores, "owner").as_deref() != Some("b")
    {
        assert!(Instant::now() < deadline, "b never took the VM over");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.must(&["cluster", "kill", "b"]);
    // b adopted the lease: it ran the VM after the switch-over and may have
    // written its disk, so a's paused copy is stale. a settles the doubt
    // from the lease (the VM was b's) and deletes its copy instead of
    // resuming it over a disk that moved on without it.
    let job = c.wait_end("a", id, MOVE);
    assert_eq!(job.state, JobState::Completed, "{job:#?}");
    assert!(c.vm("a", "s").is_none(), "a deleted its stale copy");
    assert!(
        c.serial("a").contains(&format!(
            "job {id}: node b adopted the lease on the VM's disks"
        )),
        "{}",
        c.serial_tail("a", 20)
    );
    assert_eq!(lease_field(&stores, "owner").as_deref(), Some("b"));
    assert_eq!(lease_field(&stores, "epoch").as_deref(), Some("4"));
    c.must(&["cluster", "start", "b"]);
    assert!(c.vm("b", "s").is_none(), "b came back without the VM");
    assert!(c.vm("a", "s").is_none(), "no node runs a copy");
    one_file(&stores);

    // The VM died with b. Registered again on a from its file, it may not
    // start while b's lease stands; once that expired (b's incarnation is
    // gone, nothing renews it) and a's claim settled, it boots on a from
    // its disk: exactly one node runs it.
    c.ok("a", &["vm", "import", "shared:vms/s/s.vmcfg"]);
    let held = c.hvctl("a", &["vm", "start", "s"]);
    assert!(
        !held.success && held.stderr.contains("leased by node b"),
        "{}",
        held.transcript()
    );
    let t = Instant::now();
    loop {
        let run = c.hvctl("a", &["vm", "start", "s"]);
        if run.success {
            break;
        }
        assert!(
            t.elapsed() < MOVE && run.stderr.contains("lease"),
            "{}",
            run.transcript()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("a started the VM {:?} after its first refusal", t.elapsed());
    assert_eq!(lease_field(&stores, "owner").as_deref(), Some("a"));
    assert_eq!(lease_field(&stores, "epoch").as_deref(), Some("5"));
    // A fresh guest on the same disk (disk-verify itself expects an empty
    // disk at boot, so its rounds are not the check here: that it booted
    // on a, with the lease, is).
    let banner = "[s] disk-verify: 64 MiB disk";
    let deadline = Instant::now() + LINE;
    while c.serial("a").matches(banner).count() < 2 {
        assert!(Instant::now() < deadline, "{}", c.serial_tail("a", 30));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(c.vm("b", "s").is_none());
    let _ = c.hvctl("a", &["vm", "stop", "s"]);
    c.ok("a", &["vm", "delete", "s"]);
    assert_eq!(lease_field(&stores, "owner"), None, "delete released it");
    one_file(&stores);
}
