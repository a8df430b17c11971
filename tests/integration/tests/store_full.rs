//! A store that a running VM's disk fills (issue 12, item 5), as a user
//! sees it: node a's local store is a small tmpfs (mounted before the
//! cluster boots, so QEMU exports it) with a filler file on it; a
//! `disk-verify` VM's dynamic VHDX on it grows until the store is full.
//! The VM is then listed `paused` with the reason `store full` (text and
//! JSON), its rounds stop, another VM on the node keeps printing, and `vm
//! resume` is refused while the store is still full. The filler is deleted
//! on the host: the node's own retry resumes the VM, its `disk-verify:
//! round N ok` lines go on with no FAILED (every round reads back what
//! earlier rounds wrote), and `qemu-img check` passes on the VHDX.
//!
//! Needs root (to mount the tmpfs), as the suite has here and in CI.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::cluster::TestCluster;
use integration_tests::Tmpfs;

/// Size of the tmpfs under node a's local store, and of the filler on it:
/// 16 MiB free, which the 32 MiB disk's second 8 MiB round runs out of;
/// without the filler the whole disk fits.
const STORE_MIB: u64 = 40;
const FILLER_MIB: u64 = 24;

/// The rounds VM `name` reported ok in `serial`, and whether it failed.
fn rounds(serial: &str, name: &str) -> (u64, bool) {
    let tag = format!("[{name}] disk-verify: ");
    let mut last = 0;
    let mut failed = false;
    for l in serial
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix(&tag))
    {
        if let Some(n) = l.strip_prefix("round ").and_then(|r| r.strip_suffix(" ok")) {
            last = n.parse().unwrap_or(last);
        }
        failed |= l.starts_with("FAILED");
    }
    (last, failed)
}

fn heartbeats(serial: &str, name: &str) -> usize {
    let tag = format!("[{name}] heartbeat ");
    serial.lines().filter(|l| l.starts_with(&tag)).count()
}

#[test]
fn a_full_store_pauses_the_vm_and_space_resumes_it() {
    let store = |dir: &Path| dir.join("stores").join("a");
    let mut mount = None;
    let c = TestCluster::up_prepared("store-full", 1, |dir| {
        mount = Some(Tmpfs::mount(&store(dir), STORE_MIB));
        std::fs::write(
            store(dir).join("filler"),
            vec![0x11u8; (FILLER_MIB << 20) as usize],
        )
        .unwrap();
    });
    // Unmounted (lazily) before the cluster goes down and its directory
    // is removed: declared after it, dropped before it.
    let _mount = mount;
    let store = store(&c.dir);

    c.ok("a", &["vm", "create", "hb", "--memory", "8M"]);
    c.ok("a", &["vm", "start", "hb"]);
    c.ok(
        "a",
        &[
            "vm",
            "create",
            "d",
            "--memory",
            "16M",
            "--disk",
            "32M",
            "--store",
            "local",
            "--guest",
            "disk-verify",
        ],
    );
    c.ok("a", &["vm", "start", "d"]);
    c.wait_line(
        "a",
        "d",
        "disk-verify: round 1 ok",
        Duration::from_secs(180),
    );

    // The store fills: paused, with the reason.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let v = c.vm("a", "d").expect("d is listed");
        if v.state == "paused" {
            assert_eq!(v.pause_reason.as_deref(), Some("store full"), "{v:?}");
            break;
        }
        assert_eq!(v.state, "running", "{v:?}");
        assert!(
            Instant::now() < deadline,
            "d never paused; serial tail:\n{}",
            c.serial_tail("a", 30)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let text = c.ok("a", &["vm", "list"]);
    let line = text
        .lines()
        .find(|l| l.starts_with("d "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("paused") && line.contains("(store full)"),
        "{line}"
    );
    let json = c.ok("a", &["--json", "vm", "list"]);
    assert!(json.contains("\"pause_reason\": \"store full\""), "{json}");
    assert!(
        c.serial("a").contains("vm d paused: store full: disk 0"),
        "{}",
        c.serial_tail("a", 30)
    );

    // It stays paused (no rounds) while the other VM keeps printing.
    let before = c.serial("a");
    std::thread::sleep(Duration::from_secs(4));
    let after = c.serial("a");
    assert_eq!(rounds(&after, "d").0, rounds(&before, "d").0, "d ran");
    assert!(
        heartbeats(&after, "hb") > heartbeats(&before, "hb"),
        "hb stopped printing while d waited"
    );
    let run = c.hvctl("a", &["vm", "resume", "d"]);
    assert!(!run.success, "vm resume on a full store succeeded");
    assert!(
        run.transcript().contains("still full"),
        "{}",
        run.transcript()
    );
    assert_eq!(c.vm("a", "d").unwrap().state, "paused");

    // Space returns on the host: the node's retry resumes the VM.
    let (paused_at, _) = rounds(&after, "d");
    std::fs::remove_file(store.join("filler")).unwrap();
    let want = format!("disk-verify: round {} ok", paused_at + 3);
    c.wait_line("a", "d", &want, Duration::from_secs(300));
    let serial = c.serial("a");
    assert!(serial.contains("vm d resumed: its store has space again"));
    let (_, failed) = rounds(&serial, "d");
    assert!(!failed, "disk-verify failed:\n{}", c.serial_tail("a", 30));
    let v = c.vm("a", "d").unwrap();
    assert_eq!((v.state.as_str(), v.pause_reason), ("running", None));

    // The VHDX is sound once the VM is gone (its disk closed cleanly).
    c.ok("a", &["vm", "stop", "d"]);
    c.ok("a", &["vm", "delete", "d"]);
    let vhdx = store.join("vms/d/d-0.vhdx");
    let out = Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(&vhdx)
        .output()
        .expect("qemu-img");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors"),
        "qemu-img check {}: {text}",
        vhdx.display()
    );
}
