//! Quick storage migration between nodes, as a user does it (issue 14,
//! item 3): `hvctl --node a vm move q --to b --quick --wait` for a
//! running `disk-verify` VM whose disk is a VHDX on node a's local store.
//! A checkpoint takes the guest's writes while the base copies to b; then
//! the VM is saved, the checkpoint's data goes into b's base, memory and
//! state follow, and the VM resumes on b. Checked: the command exits 0
//! and prints the downtime and the checkpoint's growth; the VM runs on b
//! and its `disk-verify: round N ok` lines go on there (none FAILED: the
//! disk holds every write from before and after the checkpoint); on the
//! host, node a's store has none of the VM's files left (no base, no
//! checkpoint, no configuration) and node b's has the base (passing
//! `qemu-img check`) and a configuration naming it, without a checkpoint.
//! Then the VM moves back b -> a the same way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::cluster::TestCluster;
use integration_tests::files::{check_vhdx, files_in};

/// Time for a guest line to appear.
const LINE: Duration = Duration::from_secs(90);

/// The files of VM `vm` on a node's store at `store`.
fn vm_files(store: &Path, vm: &str) -> Vec<String> {
    files_in(store)
        .into_iter()
        .filter(|f| f.starts_with(&format!("vms/{vm}/")))
        .collect()
}

/// `vm move VM --to TO --quick --wait` from `from`: exits 0; the output.
fn quick_move(c: &TestCluster, from: &str, vm: &str, to: &str) -> String {
    let t = std::time::Instant::now();
    let out = c.ok(from, &["vm", "move", vm, "--to", to, "--quick", "--wait"]);
    eprintln!(
        "timing: quick move {vm} {from} -> {to}: {:.1} s\n{out}",
        t.elapsed().as_secs_f64()
    );
    out
}

/// After a quick move of `vm` from the store at `gone` to the one at
/// `here`: none of its files left at `gone`; at `here` its base and its
/// configuration, which names the base and no checkpoint.
fn files_moved(gone: &Path, here: &Path, vm: &str) {
    assert!(
        vm_files(gone, vm).is_empty(),
        "the source store keeps {:?}",
        vm_files(gone, vm)
    );
    let base = format!("vms/{vm}/{vm}-0.vhdx");
    let cfg = format!("vms/{vm}/{vm}.vmcfg");
    assert_eq!(vm_files(here, vm), [base.clone(), cfg.clone()]);
    check_vhdx(&here.join(&base));
    let text = std::fs::read_to_string(here.join(&cfg)).unwrap();
    assert!(
        text.contains(&format!("disk.0=dynamic local:{base}\n")),
        "{text}"
    );
    assert!(!text.contains("checkpoint."), "{text}");
}

#[test]
fn a_disk_verify_vm_moves_quick_to_b_and_back() {
    let c = TestCluster::up("vquick", 2);
    let stores: PathBuf = std::fs::canonicalize(c.stores()).unwrap();
    let (sa, sb) = (stores.join("a"), stores.join("b"));
    c.ok(
        "a",
        &[
            "vm",
            "create",
            "q",
            "--memory",
            "32M",
            "--disk",
            "32M",
            "--guest",
            "disk-verify",
        ],
    );
    c.ok("a", &["vm", "start", "q"]);
    // Four 8 MiB spans: after round 4 every block of the base is written.
    c.wait_line("a", "q", "disk-verify: round 4 ok", LINE);

    let out = quick_move(&c, "a", "q", "b");
    assert!(out.contains("downtime"), "{out}");
    assert!(out.contains("checkpoint"), "{out}");
    assert!(c.vm("a", "q").is_none(), "q left node a");
    assert!(c.vm("b", "q").is_some(), "q runs on node b");
    c.disk_rounds_go_on("b", "q", &["a"], 2, LINE);
    // The guest checked every byte of its memory model on arrival.
    c.wait_line("b", "q", "disk-verify: migration 1 ok", LINE);
    files_moved(&sa, &sb, "q");

    let out = quick_move(&c, "b", "q", "a");
    assert!(out.contains("downtime"), "{out}");
    assert!(c.vm("b", "q").is_none(), "q left node b");
    c.disk_rounds_go_on("a", "q", &["b"], 2, LINE);
    c.wait_line("a", "q", "disk-verify: migration 2 ok", LINE);
    files_moved(&sb, &sa, "q");
}
