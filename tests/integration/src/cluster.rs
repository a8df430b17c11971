//! A cluster booted for one test, driven as a user drives it: `qemu-runner
//! cluster ...` and `hvctl` commands (their real binaries through cargo),
//! plus, where a test must be quick (polling a job until it reaches a
//! phase, to inject a fault exactly there), the same client library
//! in-process.
//!
//! One test cluster at a time per test binary ([`TestCluster::up`] holds a
//! lock until the cluster is dropped): tests would otherwise compete for
//! the same two cores and make each other's timing meaningless. Each has
//! its own state directory under the system's temp directory, its own
//! ports, and is taken down when dropped, also when an assertion fails.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hvmgmt::auth::ClusterKey;
use hvmgmt::proto::{Body, JobInfo, Outcome, Phase, Request, VmInfo, VmMove};
use qemu_runner::hvctl::Client;

use crate::{require_qemu, runner, Run};

static ONE_CLUSTER: Mutex<()> = Mutex::new(());

/// A booted cluster, down when dropped.
pub struct TestCluster {
    pub dir: PathBuf,
    pub booted_in: Duration,
    /// What `cluster up` printed.
    pub up_stdout: String,
    up: bool,
    _turn: MutexGuard<'static, ()>,
}

impl TestCluster {
    /// Boot `nodes` nodes for test `tag`.
    pub fn up(tag: &str, nodes: u32) -> Self {
        Self::up_prepared(tag, nodes, |_| {})
    }

    /// [`TestCluster::up`], with `prepare` run on the empty state
    /// directory first (a test mounts a small file system where a store
    /// will be, before QEMU exports it).
    pub fn up_prepared(tag: &str, nodes: u32, prepare: impl FnOnce(&std::path::Path)) -> Self {
        require_qemu();
        let turn = ONE_CLUSTER
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let dir = std::env::temp_dir().join(format!("hvm-it-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut c = TestCluster {
            dir,
            booted_in: Duration::ZERO,
            up_stdout: String::new(),
            up: false,
            _turn: turn,
        };
        prepare(&c.dir);
        let start = Instant::now();
        let n = nodes.to_string();
        let run = runner(&["cluster", "up", "--nodes", &n, "--state-dir", c.dir()]);
        c.up = true;
        assert!(run.success, "cluster up failed:\n{}", run.transcript());
        c.booted_in = start.elapsed();
        c.up_stdout = run.stdout;
        c
    }

    /// `cluster down` now (a test of it); the cluster is not taken down
    /// again when dropped.
    pub fn down(&mut self) -> Run {
        self.up = false;
        self.runner(&["cluster", "down"])
    }

    /// Round numbers of `[VM] disk-verify: round N ok` in `node`'s serial
    /// log; panics if the guest printed a FAILED round there.
    pub fn disk_rounds(&self, node: &str, vm: &str) -> Vec<u64> {
        let serial = self.serial(node);
        assert!(
            !serial.contains(&format!("[{vm}] disk-verify: FAILED")),
            "the guest found its disk damaged on {node}:\n{}",
            self.serial_tail(node, 30)
        );
        let prefix = format!("[{vm}] disk-verify: round ");
        serial
            .lines()
            .filter_map(|l| {
                l.trim_end_matches('\r')
                    .strip_prefix(&prefix)?
                    .strip_suffix(" ok")?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// The `disk-verify` guest `vm` goes on on `node`: `more` rounds past
    /// the highest seen on any of `nodes` (where it ran before), none
    /// failed, within `timeout`.
    pub fn disk_rounds_go_on(
        &self,
        node: &str,
        vm: &str,
        nodes: &[&str],
        more: u64,
        timeout: Duration,
    ) {
        let last = nodes
            .iter()
            .flat_map(|n| self.disk_rounds(n, vm))
            .max()
            .unwrap_or(0);
        let want = last + more;
        let deadline = Instant::now() + timeout;
        while self.disk_rounds(node, vm).into_iter().max().unwrap_or(0) < want {
            assert!(
                Instant::now() < deadline,
                "no disk-verify round {want} of {vm} on {node}:\n{}",
                self.serial_tail(node, 30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The host directory holding the nodes' stores (`STATE/stores`).
    pub fn stores(&self) -> PathBuf {
        self.dir.join("stores")
    }

    pub fn dir(&self) -> &str {
        self.dir.to_str().expect("utf-8 temp path")
    }

    /// `qemu-runner ARGS --state-dir DIR`.
    pub fn runner(&self, args: &[&str]) -> Run {
        let mut all = args.to_vec();
        all.extend(["--state-dir", self.dir()]);
        runner(&all)
    }

    /// `qemu-runner hvctl --state-dir DIR --node NODE ARGS`.
    pub fn hvctl(&self, node: &str, args: &[&str]) -> Run {
        let mut all = vec!["hvctl", "--state-dir", self.dir(), "--node", node];
        all.extend_from_slice(args);
        runner(&all)
    }

    /// [`TestCluster::hvctl`], which must succeed; its stdout.
    pub fn ok(&self, node: &str, args: &[&str]) -> String {
        let run = self.hvctl(node, args);
        assert!(
            run.success,
            "hvctl {args:?} on node {node} failed:\n{}",
            run.transcript()
        );
        run.stdout
    }

    /// A runner command that must succeed (`cluster link cut --node b`).
    pub fn must(&self, args: &[&str]) -> Run {
        let run = self.runner(args);
        assert!(run.success, "{args:?} failed:\n{}", run.transcript());
        run
    }

    /// An in-process client of `node` (as hvctl connects).
    pub fn client(&self, node: &str) -> Client {
        let (addr, key) =
            qemu_runner::cluster::resolve_target(Some(self.dir()), Some(node), None, None)
                .expect("the cluster state names the node");
        Client::connect(&addr, &ClusterKey::from_hex(&key).expect("hex key"))
            .unwrap_or_else(|e| panic!("connecting to node {node}: {e}"))
    }

    /// Cut (`cut`) or restore `node`'s migration link at the relay, as
    /// `cluster link cut|restore --node NODE` does but in-process, so the
    /// fault lands within milliseconds of the phase a test waited for.
    pub fn link(&self, node: &str, cut: bool) {
        qemu_runner::cluster::link(&self.dir, node, cut).unwrap_or_else(|e| {
            panic!(
                "link {} of node {node}: {e}",
                if cut { "cut" } else { "restore" }
            )
        });
    }

    /// Start moving `name` from `from` to `to` in-process (`vm-move`, what
    /// `hvctl vm move` sends); the job id. `bandwidth` in MiB/s (0: none).
    pub fn move_now(&self, from: &str, name: &str, to: &str, bandwidth: u64) -> u64 {
        match self.client(from).call_ok(Request::VmMove(VmMove {
            bandwidth_mib_s: (bandwidth > 0).then_some(bandwidth),
            ..VmMove::to(name, to)
        })) {
            Ok(Body::Job(j)) => j.id,
            other => panic!("vm-move {name} on node {from}: {other:?}"),
        }
    }

    /// Wait until `node` no longer lists VM `name` (a destination drops
    /// the copy of a migration that failed).
    pub fn wait_gone(&self, node: &str, name: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while let Some(v) = self.vm(node, name) {
            assert!(
                Instant::now() < deadline,
                "node {node} still lists VM {name} after {timeout:?}: {v:?}\nserial tail:\n{}",
                self.serial_tail(node, 30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether `node`'s QEMU runs (`cluster kill` stops it).
    pub fn is_up(&self, node: &str) -> bool {
        qemu_runner::cluster::load(&self.dir)
            .ok()
            .and_then(|s| s.nodes.into_iter().find(|n| n.name == node))
            .is_some_and(|n| qemu_runner::cluster::alive(n.pid))
    }

    /// Job `id` on `node` (`job-show`).
    pub fn job(&self, node: &str, id: u64) -> JobInfo {
        match self.client(node).call(Request::JobShow { id }) {
            Ok(Outcome::Ok(Body::Job(j))) => j,
            other => panic!("job-show {id} on node {node}: {other:?}"),
        }
    }

    /// Poll job `id` on `node` (20 times a second, one connection) until
    /// `want` holds; panics after `timeout` or if the job ends first
    /// (unless `want` accepts the ended job).
    pub fn wait_job(
        &self,
        node: &str,
        id: u64,
        what: &str,
        timeout: Duration,
        want: impl Fn(&JobInfo) -> bool,
    ) -> JobInfo {
        let mut c = self.client(node);
        let deadline = Instant::now() + timeout;
        loop {
            let j = match c.call(Request::JobShow { id }) {
                Ok(Outcome::Ok(Body::Job(j))) => j,
                other => panic!("job-show {id} on node {node}: {other:?}"),
            };
            if want(&j) {
                return j;
            }
            assert!(
                !j.state.is_final(),
                "job {id} on node {node} ended before {what}: {j:#?}"
            );
            assert!(
                Instant::now() < deadline,
                "job {id} on node {node}: not {what} within {timeout:?}: {j:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until job `id` on `node` has ended; returns it (with report).
    pub fn wait_end(&self, node: &str, id: u64, timeout: Duration) -> JobInfo {
        self.wait_job(node, id, "ended", timeout, |j| j.state.is_final())
    }

    /// Wait until the migration job reaches `phase` (and `pass` at least
    /// `min_pass`, and at least `min_bytes` sent).
    pub fn wait_phase(
        &self,
        node: &str,
        id: u64,
        phase: Phase,
        min_pass: u32,
        min_bytes: u64,
    ) -> JobInfo {
        self.wait_job(
            node,
            id,
            &format!("in phase {phase:?}, pass {min_pass}+, {min_bytes}+ bytes"),
            Duration::from_secs(120),
            |j| {
                j.migration.as_ref().is_some_and(|m| {
                    m.phase == phase && m.pass >= min_pass && m.bytes_sent >= min_bytes
                })
            },
        )
    }

    /// VM `name` on `node`, if listed.
    pub fn vm(&self, node: &str, name: &str) -> Option<VmInfo> {
        match self.client(node).call_ok(Request::VmList) {
            Ok(Body::VmList { vms }) => vms.into_iter().find(|v| v.name == name),
            other => panic!("vm-list on node {node}: {other:?}"),
        }
    }

    /// The console lines `node` keeps for VM `name`.
    pub fn console(&self, node: &str, name: &str) -> Vec<String> {
        match self.client(node).call_ok(Request::VmConsole {
            name: name.into(),
            lines: None,
        }) {
            Ok(Body::Console { lines, .. }) => lines,
            other => panic!("vm-console {name} on node {node}: {other:?}"),
        }
    }

    /// Wait until VM `name`'s console on `node` has a line equal to
    /// `line`, or starting with it if it ends with `…`.
    pub fn wait_console(&self, node: &str, name: &str, line: &str, timeout: Duration) {
        let (text, prefix) = match line.strip_suffix('…') {
            Some(p) => (p, true),
            None => (line, false),
        };
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.console(node, name);
            if lines
                .iter()
                .any(|l| l == text || (prefix && l.starts_with(text)))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "VM {name} on node {node} did not print {line:?} within {timeout:?}; last lines:\n{}\nserial tail:\n{}",
                lines.join("\n"),
                self.serial_tail(node, 30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Wait until `node`'s serial log shows VM `name` printing `line` (or
    /// a line starting with it if it ends with `…`); panics after
    /// `timeout`, or at once if the VM reported a failed memory check.
    /// The serial log holds every line a guest printed on that node (the
    /// node keeps only the last few for `vm console`).
    pub fn wait_line(&self, node: &str, name: &str, line: &str, timeout: Duration) {
        let (text, prefix) = match line.strip_suffix('…') {
            Some(p) => (p, true),
            None => (line, false),
        };
        let tag = format!("[{name}] ");
        let deadline = Instant::now() + timeout;
        loop {
            let serial = self.serial(node);
            let mut lines = serial
                .lines()
                .filter_map(|l| l.trim_end_matches('\r').strip_prefix(&tag));
            if lines.any(|l| l == text || (prefix && l.starts_with(text))) {
                return;
            }
            assert!(
                !serial.contains(&format!("{tag}busy-verify: FAILED")),
                "VM {name} on node {node} found its memory damaged:\n{}",
                self.serial_tail(node, 30)
            );
            assert!(
                Instant::now() < deadline,
                "VM {name} on node {node} did not print {line:?} within {timeout:?}; serial tail:\n{}",
                self.serial_tail(node, 30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// How many failed migrations VM `name` has checked its memory after
    /// on `node` (the N of its last `busy-verify: failed migration N:
    /// memory ok`).
    pub fn failed_checks(&self, node: &str, name: &str) -> u32 {
        let tag = format!("[{name}] busy-verify: failed migration ");
        self.serial(node)
            .lines()
            .filter_map(|l| {
                l.strip_prefix(&tag)?
                    .strip_suffix(": memory ok")?
                    .parse()
                    .ok()
            })
            .max()
            .unwrap_or(0)
    }

    /// `node`'s whole serial output since `cluster up` (earlier boots
    /// first).
    pub fn serial(&self, node: &str) -> String {
        let log = self.dir.join(format!("node-{node}.log"));
        let old = std::fs::read_to_string(log.with_extension("log.1")).unwrap_or_default();
        old + &std::fs::read_to_string(&log).unwrap_or_default()
    }

    /// The last `n` lines of `node`'s serial output (for failure messages).
    pub fn serial_tail(&self, node: &str, n: usize) -> String {
        let s = self.serial(node);
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Create VM `name` on node `node` running `busy-verify` and wait for
    /// its first heartbeat.
    pub fn busy(&self, node: &str, name: &str, mib: u64) {
        let mut c = self.client(node);
        c.call_ok(Request::VmCreate {
            name: name.into(),
            memory_mib: mib,
            guest: Some("busy-verify".into()),
            linux: None,
        })
        .unwrap_or_else(|e| panic!("vm-create {name} on node {node}: {e}"));
        c.call_ok(Request::VmStart { name: name.into() })
            .unwrap_or_else(|e| panic!("vm-start {name} on node {node}: {e}"));
        self.wait_line(node, name, "heartbeat …", Duration::from_secs(60));
    }

    /// Start moving `name` from `from` to `to` with extra `hvctl vm move`
    /// options (no `--wait`); the job id.
    pub fn start_move(&self, from: &str, name: &str, to: &str, extra: &[&str]) -> u64 {
        let mut args = vec!["--json", "vm", "move", name, "--to", to];
        args.extend_from_slice(extra);
        let run = self.hvctl(from, &args);
        assert!(run.success, "vm move failed:\n{}", run.transcript());
        job_id(&run.stdout)
    }

    /// VM `name` runs on `node` and on no other of `nodes`, its heartbeats
    /// over every node's serial log are 1, 2, 3, ... (none missing, none
    /// twice), and it keeps beating on `node`.
    pub fn runs_once_on(&self, node: &str, name: &str, nodes: &[&str]) {
        let v = self
            .vm(node, name)
            .unwrap_or_else(|| panic!("node {node} does not list VM {name}"));
        assert_eq!(v.state, "running", "VM {name} on node {node}: {v:?}");
        for other in nodes.iter().filter(|n| **n != node) {
            if !self.is_up(other) {
                continue; // powered off: it runs nothing
            }
            if let Some(v) = self.vm(other, name) {
                assert_ne!(
                    v.state, "running",
                    "VM {name} runs on node {other} too: {v:?}"
                );
            }
        }
        let before = self.heartbeats(name, nodes);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.heartbeats(name, nodes);
            let beats_here = qemu_runner::markers::heartbeats(&self.serial(node), name);
            if now.last > before.last && beats_here.last() == Some(&now.last) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "VM {name} stopped beating on node {node} (last heartbeat {})",
                now.last
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// VM `name`'s heartbeats over `nodes`' serial logs, checked.
    pub fn heartbeats(&self, name: &str, nodes: &[&str]) -> qemu_runner::markers::HeartbeatSpan {
        let logs: Vec<(String, Vec<u64>)> = nodes
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    qemu_runner::markers::heartbeats(&self.serial(n), name),
                )
            })
            .collect();
        let per_node: Vec<(&str, &[u64])> = logs
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        qemu_runner::markers::check_heartbeats(&per_node)
            .unwrap_or_else(|e| panic!("VM {name}'s heartbeats: {e}"))
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if self.up {
            let run = runner(&["cluster", "down", "--state-dir", self.dir()]);
            if !run.success {
                eprintln!("cluster down failed:\n{}", run.transcript());
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("the failed test's cluster logs: {}", self.dir.display());
        }
    }
}

/// The job id in an `hvctl --json` reply with a job body.
pub fn job_id(json: &str) -> u64 {
    match serde_json::from_str::<Outcome>(json) {
        Ok(Outcome::Ok(Body::Job(j))) => j.id,
        other => panic!("not a job reply: {other:?}\n{json}"),
    }
}

/// The job in an `hvctl --json` reply.
pub fn job_of(json: &str) -> JobInfo {
    match serde_json::from_str::<Outcome>(json) {
        Ok(Outcome::Ok(Body::Job(j))) => j,
        other => panic!("not a job reply: {other:?}\n{json}"),
    }
}
