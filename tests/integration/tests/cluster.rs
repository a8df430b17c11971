//! A two-node cluster as a user drives it: `cluster up`, `hvctl` against
//! both nodes (every command), a wrong key and garbage bytes refused while
//! the node keeps serving, the migration link cut and restored at the
//! relay, a node killed and started again (empty), `cluster down`. The cluster's state lives in a
//! temporary directory; its ports are picked free at run time on 127.0.0.1.
//! A guard takes the cluster down if an assertion fails.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use integration_tests::cluster::TestCluster;
use integration_tests::runner;

/// The management address of `node` from `cluster status --json`.
fn mgmt_addr(status_json: &str, node: &str) -> String {
    let at = status_json
        .find(&format!("\"name\": \"{node}\""))
        .unwrap_or_else(|| panic!("node {node} not in {status_json}"));
    let rest = &status_json[at..];
    let key = "\"management_address\": \"";
    let start = rest.find(key).expect("management_address") + key.len();
    rest[start..].split('"').next().unwrap().to_string()
}

/// Every string value of `"field": "..."` in a JSON text.
fn json_strings(json: &str, field: &str) -> Vec<String> {
    let needle = format!("\"{field}\": \"");
    json.split(&needle)
        .skip(1)
        .map(|r| r.split('"').next().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn cluster_up_hvctl_and_down() {
    let mut c = TestCluster::up("cluster", 2);
    assert!(
        c.up_stdout.contains("node a up: management 127.0.0.1:"),
        "{}",
        c.up_stdout
    );
    assert!(
        c.up_stdout.contains("node b up: management 127.0.0.1:"),
        "{}",
        c.up_stdout
    );

    let status = runner(&["cluster", "status", "--json", "--state-dir", c.dir()]);
    assert!(status.success, "{}", status.transcript());
    assert_eq!(
        status.stdout.matches("\"running\"").count(),
        2,
        "{}",
        status.stdout
    );
    let addr_a = mgmt_addr(&status.stdout, "a");

    // The key is in no process's command line (what `ps` shows every local
    // user); the nodes read it through fw_cfg and seeded their entropy
    // pools from the virtio entropy device and RDRAND.
    let state = std::fs::read_to_string(c.dir.join("cluster.json")).expect("cluster.json");
    let key = json_strings(&state, "key")[0].clone();
    assert_eq!(key.len(), 64, "{state}");
    let pids: Vec<String> = state
        .split("\"pid\": ")
        .skip(1)
        .map(|r| r.chars().take_while(char::is_ascii_digit).collect())
        .collect();
    assert_eq!(pids.len(), 2, "{state}");
    for pid in &pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("a node's cmdline");
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            cmdline.contains("-fw_cfg name=opt/hvmigrate/key,file=cluster.key"),
            "{cmdline}"
        );
        assert!(
            !cmdline.contains(&key) && !cmdline.contains("key="),
            "{cmdline}"
        );
    }
    for node in ["a", "b"] {
        let log = std::fs::read_to_string(c.dir.join(format!("node-{node}.log"))).unwrap();
        assert!(
            log.contains("entropy: seeded from virtio-rng, RDRAND"),
            "{log}"
        );
        assert!(
            log.contains("fw_cfg: cluster key from opt/hvmigrate/key"),
            "{log}"
        );
        assert!(!log.contains(&key), "the key is never logged");
    }

    for node in ["a", "b"] {
        let info = c.ok(node, &["node", "info"]);
        assert!(info.contains(&format!("node {node}")), "{info}");
        let peer = if node == "a" {
            "b@192.168.100.2"
        } else {
            "a@192.168.100.1"
        };
        assert!(info.contains(&format!("peers        {peer}")), "{info}");
        assert!(info.contains("cpu vendor   amd"), "{info}");
        let json = c.ok(node, &["--json", "node", "info"]);
        assert!(
            json.contains("\"body\": \"node-info\"") && json.contains("\"cpus\": 1"),
            "{json}"
        );
        assert!(c.ok(node, &["vm", "list"]).contains("no VMs"));
    }

    // VM lifecycle on node b: the hello guest prints its line and stops.
    let created = c.ok(
        "b",
        &[
            "vm", "create", "greeter", "--memory", "32M", "--guest", "hello",
        ],
    );
    assert!(
        created.contains("greeter") && created.contains("created"),
        "{created}"
    );
    c.ok("b", &["vm", "start", "greeter"]);
    let mut console = String::new();
    for _ in 0..40 {
        console = c.ok("b", &["vm", "console", "greeter"]);
        if console.contains("Hello from the hvmigrate guest") {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        console.contains("Hello from the hvmigrate guest"),
        "{console}"
    );
    let list = c.ok("b", &["--json", "vm", "list"]);
    assert!(
        list.contains("\"state\": \"stopped\"") && list.contains("guest reported ok"),
        "{list}"
    );
    c.ok("b", &["vm", "delete", "greeter"]);

    // A heartbeat VM on node a: start, stop, delete; errors on the way.
    c.ok("a", &["vm", "create", "beat", "--memory", "64"]);
    let dup = c.hvctl("a", &["vm", "create", "beat", "--memory", "64"]);
    assert!(
        !dup.success && dup.stderr.contains("already-exists"),
        "{}",
        dup.transcript()
    );
    c.ok("a", &["vm", "start", "beat"]);
    let busy = c.hvctl("a", &["vm", "delete", "beat"]);
    assert!(
        !busy.success && busy.stderr.contains("stop it first"),
        "{}",
        busy.transcript()
    );
    let stopped = c.ok("a", &["vm", "stop", "beat"]);
    assert!(stopped.contains("stopped"), "{stopped}");
    c.ok("a", &["vm", "delete", "beat"]);
    let gone = c.hvctl("a", &["--json", "vm", "start", "beat"]);
    assert!(
        !gone.success && gone.stdout.contains("\"not-found\""),
        "{}",
        gone.transcript()
    );

    // Jobs and host settings.
    assert!(c.ok("a", &["job", "list"]).contains("no jobs"));
    let cancel = c.hvctl("a", &["job", "cancel", "42"]);
    assert!(
        !cancel.success && cancel.stderr.contains("not-found"),
        "{}",
        cancel.transcript()
    );
    let set = c.ok(
        "b",
        &[
            "host",
            "set",
            "--max-migrations",
            "3",
            "--max-storage-migrations",
            "1",
        ],
    );
    assert!(set.contains("max live migrations     3"), "{set}");
    assert!(c
        .ok("b", &["--json", "host", "get"])
        .contains("\"max_storage_migrations\": 1"));
    let bad = c.hvctl("b", &["host", "set", "--max-migrations", "0"]);
    assert!(
        !bad.success && bad.stderr.contains("invalid-argument"),
        "{}",
        bad.transcript()
    );

    // The migration link carries raw frames and a TCP stream, every frame
    // and byte accounted for on node b.
    let bench = runner(&[
        "bench",
        "link",
        "--mib",
        "8",
        "--frames",
        "5000",
        "--state-dir",
        c.dir(),
    ]);
    assert!(bench.success, "{}", bench.transcript());
    assert!(
        bench.stdout.contains("raw 5000 frames of 1514 bytes")
            && bench
                .stdout
                .contains("node b received 8388608 bytes (Completed)")
            && bench
                .stdout
                .contains("raw benchmark frames received so far: 5000"),
        "{}",
        bench.transcript()
    );

    // A wrong key is refused; garbage gets an error reply; the node serves on.
    let wrong = runner(&[
        "hvctl",
        "--addr",
        &addr_a,
        "--key",
        &"5a".repeat(32),
        "node",
        "info",
    ]);
    assert!(!wrong.success, "{}", wrong.transcript());
    assert!(
        wrong.stderr.contains("auth-failed"),
        "{}",
        wrong.transcript()
    );
    let mut s = TcpStream::connect(&addr_a).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"\x00\x00\x00\x0bhello world").unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&reply).contains("bad-request") {
            break;
        }
    }
    assert!(
        String::from_utf8_lossy(&reply).contains("bad-request"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
    drop(s);
    assert!(c.ok("a", &["node", "info"]).contains("node a"));

    // The migration link at the relay; a node killed and booted again.
    // `status(&["b link up"])`: node b's status line says "link up".
    let status = |want: &[&str]| {
        let run = runner(&["cluster", "status", "--state-dir", c.dir()]);
        for w in want {
            let (node, what) = w.split_once(' ').unwrap();
            assert!(
                run.stdout
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(node) && l.contains(what)),
                "{w:?} not in:\n{}",
                run.transcript()
            );
        }
    };
    status(&["a link up", "b link up"]);
    let cut = runner(&[
        "cluster",
        "link",
        "cut",
        "--node",
        "b",
        "--state-dir",
        c.dir(),
    ]);
    assert!(
        cut.has_line("node b: migration link cut"),
        "{}",
        cut.transcript()
    );
    status(&["a link up", "b link cut"]);
    let restore = runner(&[
        "cluster",
        "link",
        "restore",
        "--node",
        "b",
        "--state-dir",
        c.dir(),
    ]);
    assert!(restore.success, "{}", restore.transcript());
    status(&["b link up"]);
    c.ok("b", &["vm", "create", "lost", "--memory", "32"]);
    let kill = runner(&["cluster", "kill", "b", "--state-dir", c.dir()]);
    assert!(kill.has_line("node b killed"), "{}", kill.transcript());
    status(&["a running", "b stopped", "b link down"]);
    assert!(!c.hvctl("b", &["node", "info"]).success);
    let again = runner(&["cluster", "kill", "b", "--state-dir", c.dir()]);
    assert!(
        !again.success && again.stderr.contains("node b is not running"),
        "{}",
        again.transcript()
    );
    let start = runner(&["cluster", "start", "b", "--state-dir", c.dir()]);
    assert!(start.success, "{}", start.transcript());
    status(&["b running", "b link up"]);
    // Empty: what it held before the power-off is gone.
    assert!(c.ok("b", &["vm", "list"]).contains("no VMs"));
    assert!(c
        .ok("b", &["node", "info"])
        .contains("migration    192.168.100.2"));
    // Booted with a key of its own: hvctl follows it there, the cluster's
    // key is refused (and, later, the other nodes' migrations).
    let cluster_key = std::fs::read_to_string(c.dir.join("cluster.json"))
        .unwrap()
        .split("\"key\": \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    assert!(runner(&["cluster", "kill", "b", "--state-dir", c.dir()]).success);
    let wrong = runner(&[
        "cluster",
        "start",
        "b",
        "--wrong-key",
        "--state-dir",
        c.dir(),
    ]);
    assert!(
        wrong.stdout.contains("with a key of its own"),
        "{}",
        wrong.transcript()
    );
    assert!(c.ok("b", &["node", "info"]).contains("node b"));
    let status = runner(&["cluster", "status", "--json", "--state-dir", c.dir()]);
    let addr_b = mgmt_addr(&status.stdout, "b");
    let refused = runner(&[
        "hvctl",
        "--addr",
        &addr_b,
        "--key",
        &cluster_key,
        "node",
        "info",
    ]);
    assert!(
        !refused.success && refused.stderr.contains("auth-failed"),
        "{}",
        refused.transcript()
    );
    assert!(runner(&["cluster", "kill", "b", "--state-dir", c.dir()]).success);
    assert!(runner(&["cluster", "start", "b", "--state-dir", c.dir()]).success);
    let back = runner(&[
        "hvctl",
        "--addr",
        &addr_b,
        "--key",
        &cluster_key,
        "node",
        "info",
    ]);
    assert!(back.success, "{}", back.transcript());

    let twice = runner(&["cluster", "start", "b", "--state-dir", c.dir()]);
    assert!(
        !twice.success && twice.stderr.contains("node b is running"),
        "{}",
        twice.transcript()
    );

    let down = c.down();
    assert!(down.success, "{}", down.transcript());
    assert!(
        down.stdout.contains("2 node(s) stopped"),
        "{}",
        down.transcript()
    );
    let after = runner(&["cluster", "status", "--state-dir", c.dir()]);
    assert!(
        !after.success && after.stderr.contains("no cluster"),
        "{}",
        after.transcript()
    );
}
