//! Node stores on a two-node cluster, as a user sees them: each node boots
//! with its local store (`stores/NODE/` in the state directory) and the
//! shared one (`stores/shared/`) and says so on its console; `hvctl store
//! list` shows both on both nodes with the host's free bytes; a file the
//! node writes through 9P is a host file with the node's bytes, and the
//! VHDX it writes passes `qemu-img check`; a server error (QEMU refusing
//! to create a file over a directory) reaches the user as a clear error;
//! a node that restarts removes the partial files (unfinished copies) it
//! left on its stores, and only its own.

use std::path::Path;
use std::process::Command;

use integration_tests::cluster::TestCluster;
use integration_tests::files::qemu_img;
use integration_tests::runner;

/// `"key": value` of the JSON object that starts at `from` in `text`.
fn field<'a>(text: &'a str, from: usize, key: &str) -> &'a str {
    let k = format!("\"{key}\": ");
    let at = text[from..]
        .find(&k)
        .unwrap_or_else(|| panic!("{key} in {text}"))
        + from
        + k.len();
    let rest = &text[at..];
    let end = rest.find([',', '\n', '}']).unwrap();
    rest[..end].trim().trim_matches('"')
}

/// (free, total) bytes of the file system holding `p`, as the host sees it.
fn host_fs(p: &Path) -> (u64, u64) {
    let out = Command::new("stat")
        .args(["-f", "-c", "%S %a %b"])
        .arg(p)
        .output()
        .unwrap();
    let v: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    (v[0] * v[1], v[0] * v[2])
}

/// The store benchmark's data (vmm-service `store::bench::pattern`).
fn pattern(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    for o in (0..len as u64).step_by(8) {
        v.extend_from_slice(
            &(o / 8 + 1)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .to_le_bytes(),
        );
    }
    v
}

#[test]
fn stores_on_a_cluster() {
    let c = TestCluster::up("store", 2);
    let stores = std::fs::canonicalize(c.stores()).unwrap();
    for node in ["a", "b"] {
        assert!(stores.join(node).is_dir() && stores.join("shared").is_dir());
        let log = std::fs::read_to_string(c.dir.join(format!("node-{node}.log"))).unwrap();
        for marker in [
            format!("vmm-service: store local ({node}) ready: "),
            "vmm-service: store shared (shared) ready: ".to_string(),
        ] {
            let line = log
                .lines()
                .find(|l| l.starts_with(&marker))
                .unwrap_or_else(|| panic!("node {node}: no line {marker:?} in its log"));
            assert!(line.ends_with(" MiB free"), "{line}");
        }
    }

    // store list: both stores on both nodes, the host's paths and figures.
    let (host_free, host_total) = host_fs(&stores);
    for node in ["a", "b"] {
        let table = c.ok(node, &["store", "list"]);
        assert!(table.starts_with("NAME"), "{table}");
        let json = c.ok(node, &["store", "list", "--json"]);
        let local = json.find("\"name\": \"local\"").expect("a local store");
        let shared = json.find("\"name\": \"shared\"").expect("a shared store");
        assert_eq!(field(&json, local, "tag"), node);
        assert_eq!(
            field(&json, local, "host_path"),
            stores.join(node).display().to_string()
        );
        assert_eq!(
            field(&json, shared, "host_path"),
            stores.join("shared").display().to_string()
        );
        for at in [local, shared] {
            assert_eq!(field(&json, at, "error"), "null", "{json}");
            let free: u64 = field(&json, at, "free_bytes").parse().unwrap();
            let total: u64 = field(&json, at, "total_bytes").parse().unwrap();
            let used: u64 = field(&json, at, "used_bytes").parse().unwrap();
            // QEMU rounds the block counts to its larger block size, and
            // the host's free space moves as other processes write.
            assert!(total.abs_diff(host_total) <= host_total / 100, "{json}");
            assert!(
                free.abs_diff(host_free) <= host_total / 50 + (256 << 20),
                "node {node}: free {free} vs the host's {host_free}"
            );
            assert!(used > 0 && used + free <= total, "{json}");
        }
    }

    // Node a writes through its local store; the host reads the bytes.
    let out = c.ok(
        "a",
        &[
            "store", "bench", "--store", "local", "--mib", "16", "--keep", "--wait",
        ],
    );
    let result = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("result: "))
        .unwrap_or_else(|| panic!("no result in {out}"));
    eprintln!("node a, local store, 16 MiB: {result}");
    assert!(result.starts_with("write_mb_per_s="), "{result}");
    let expect = pattern(16 << 20);
    let raw = std::fs::read(stores.join("a/bench-a.raw")).unwrap();
    assert!(
        raw == expect,
        "bench-a.raw does not hold what the node wrote"
    );
    let copy = std::fs::read(stores.join("a/bench-a.copy")).unwrap();
    assert!(copy == expect, "bench-a.copy differs from the original");
    let vhdx = stores.join("a/bench-a.vhdx");
    let (ok, text) = qemu_img(&["check", "-f", "vhdx", vhdx.to_str().unwrap()]);
    assert!(ok && text.contains("No errors"), "qemu-img check: {text}");
    let (ok, text) = qemu_img(&[
        "compare",
        "-f",
        "vhdx",
        "-F",
        "raw",
        vhdx.to_str().unwrap(),
        stores.join("a/bench-a.raw").to_str().unwrap(),
    ]);
    assert!(ok, "qemu-img compare: {text}");

    // Node b on the shared store; without --keep it leaves nothing.
    let out = c.ok(
        "b",
        &[
            "store", "bench", "--store", "shared", "--mib", "8", "--wait",
        ],
    );
    assert!(out.contains("completed"), "{out}");
    let left: Vec<_> = std::fs::read_dir(stores.join("shared"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // A 9P error from QEMU: the file to create is a directory on the host.
    for f in ["bench-a.raw", "bench-a.copy", "bench-a.vhdx"] {
        std::fs::remove_file(stores.join("a").join(f)).unwrap();
    }
    std::fs::create_dir(stores.join("a/bench-a.raw")).unwrap();
    let run = c.hvctl("a", &["store", "bench", "--mib", "1"]);
    assert_eq!(run.code, Some(1), "{}", run.transcript());
    assert!(
        run.stderr
            .contains("store local: bench-a.raw: 9P lcreate: is a directory (EISDIR)"),
        "{}",
        run.transcript()
    );
    let run = c.hvctl("a", &["store", "bench", "--store", "elsewhere"]);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("no store named 'elsewhere'"),
        "{}",
        run.transcript()
    );
    // The node goes on serving.
    assert!(c.ok("a", &["store", "list"]).contains("local"));

    // Node b dies in the middle of copies; at its next boot it removes its
    // partial files from both stores and leaves node a's.
    std::fs::create_dir_all(stores.join("b/vms/v1")).unwrap();
    let mine = [
        stores.join("b/vms/v1/disk.vhdx.partial-b"),
        stores.join("shared/disk2.vhdx.partial-b"),
    ];
    let theirs = stores.join("shared/disk2.vhdx.partial-a");
    for p in mine.iter().chain([&theirs]) {
        std::fs::write(p, b"half a copy").unwrap();
    }
    let run = runner(&["cluster", "kill", "b", "--state-dir", c.dir()]);
    assert!(run.success, "{}", run.transcript());
    let run = runner(&["cluster", "start", "b", "--state-dir", c.dir()]);
    assert!(run.success, "{}", run.transcript());
    let log = std::fs::read_to_string(c.dir.join("node-b.log")).unwrap();
    for line in [
        "vmm-service: store local: removed vms/v1/disk.vhdx.partial-b (left by an unfinished copy)",
        "vmm-service: store shared: removed disk2.vhdx.partial-b (left by an unfinished copy)",
    ] {
        assert!(
            log.lines().any(|l| l == line),
            "no {line:?} in node b's log"
        );
    }
    for p in &mine {
        assert!(!p.exists(), "{p:?} is still there");
    }
    assert!(theirs.exists(), "node b removed node a's partial file");
    assert!(stores.join("b/vms/v1").is_dir());
    assert!(c.ok("b", &["store", "list"]).contains("shared"));
}
