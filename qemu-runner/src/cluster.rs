//! `qemu-runner cluster up|status|down` and `bench link`: a cluster of
//! hvmigrate nodes under QEMU on this machine.
//!
//! Each node is a QEMU process in the background with two NICs
//! (shared/PLATFORM.md, "Two QEMU nodes on one virtual Ethernet link"):
//! * management: QEMU user networking; host port `127.0.0.1:P` is forwarded
//!   to the node's management port 7000 at 10.0.2.15 (addresses internal to
//!   QEMU's emulated network);
//! * migration: a TCP-backed socket link on 127.0.0.1, addresses
//!   192.168.100.N/24 inside the emulated link. Two nodes are joined
//!   directly (node `a` listens, `b` connects); three or more each connect
//!   to a hub that `cluster up` starts in the background ([`run_hub`]: a
//!   `qemu-runner` process repeating every frame to every other node, over
//!   the same length-prefixed TCP framing QEMU's socket backend speaks).
//!
//! The state directory (default `target/cluster`, or
//! `$HVMIGRATE_CLUSTER_DIR`, or `--state-dir`) holds `cluster.json` (nodes,
//! ports, process ids and the cluster key, mode 0600) and each node's serial
//! log `node-NAME.log`.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hvmgmt::auth::{hex_encode, ClusterKey};
use hvmgmt::proto::{Body, JobState, Request};
use serde::{Deserialize, Serialize};

use crate::accel::Accel;
use crate::arch::Arch;
use crate::cargo::Images;
use crate::hvctl::{self, Client};

/// Most nodes.
pub const NODES_MAX: usize = 8;
/// Largest frame the hub forwards (QEMU's socket backend sends at most
/// 69632 bytes; Ethernet frames here are at most 1514).
pub const HUB_FRAME_MAX: usize = 69632;
/// The node's management port inside QEMU's user network.
pub const NODE_MGMT_PORT: u16 = 7000;
/// The node's address on QEMU's user network (QEMU's fixed default).
pub const NODE_MGMT_IP: &str = "10.0.2.15";
/// Time for every node to answer after `cluster up`.
pub const UP_TIMEOUT: Duration = Duration::from_secs(120);
/// Memory per node.
pub const NODE_MEMORY_MIB: u64 = 1024;

/// What the nodes boot: the images, and how QEMU runs their CPU.
#[derive(Clone, Debug)]
pub struct Boot {
    pub images: Images,
    pub accel: Accel,
}

/// One node of the cluster state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub pid: u32,
    /// Host port forwarded to the node's management API.
    pub mgmt_port: u16,
    /// The node's address on the migration link.
    pub migration_ip: String,
    pub log: PathBuf,
}

/// `cluster.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The cluster key, hex (never printed).
    pub key: String,
    /// Host port of the migration link (node `a` listens on it, or the hub
    /// for three nodes or more).
    pub link_port: u16,
    /// The hub's process (three nodes or more).
    #[serde(default)]
    pub hub_pid: Option<u32>,
    pub nodes: Vec<NodeState>,
}

/// The state directory.
pub fn state_dir(explicit: Option<&str>) -> PathBuf {
    match explicit {
        Some(d) => PathBuf::from(d),
        None => match std::env::var_os("HVMIGRATE_CLUSTER_DIR") {
            Some(d) => PathBuf::from(d),
            None => crate::cargo::workspace_root()
                .join("target")
                .join("cluster"),
        },
    }
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("cluster.json")
}

/// Read the cluster state.
pub fn load(dir: &Path) -> Result<ClusterState, String> {
    let f = state_file(dir);
    let text = fs::read_to_string(&f).map_err(|_| {
        format!(
            "no cluster at {} (start one with `cargo run -p qemu-runner -- cluster up`)",
            dir.display()
        )
    })?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", f.display()))
}

fn save(dir: &Path, state: &ClusterState) -> Result<(), String> {
    let f = state_file(dir);
    let text = serde_json::to_string_pretty(state).map_err(|e| e.to_string())?;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&f)
        .map_err(|e| format!("{}: {e}", f.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .map_err(|e| format!("{}: {e}", f.display()))
}

/// Address and key for hvctl: explicit `--addr`/`--key` win; else the node
/// (default `a`) from the cluster state.
pub fn resolve_target(
    dir: Option<&str>,
    node: Option<&str>,
    addr: Option<&str>,
    key: Option<&str>,
) -> Result<(String, String), String> {
    if let (Some(a), Some(k)) = (addr, key) {
        return Ok((a.to_string(), k.to_string()));
    }
    let state = load(&state_dir(dir))?;
    let name = node.unwrap_or("a");
    let n = state.nodes.iter().find(|n| n.name == name).ok_or_else(|| {
        let names: Vec<&str> = state.nodes.iter().map(|n| n.name.as_str()).collect();
        format!(
            "no node {name:?} in the cluster (nodes: {})",
            names.join(", ")
        )
    })?;
    let a = addr.map_or_else(|| format!("127.0.0.1:{}", n.mgmt_port), String::from);
    let k = key.map_or_else(|| state.key.clone(), String::from);
    Ok((a, k))
}

/// A free TCP port on 127.0.0.1 (the kernel's choice; released at once).
pub fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

/// Node names: a, b, ...
pub fn node_name(i: usize) -> String {
    char::from(b'a' + (i % 26) as u8).to_string()
}

/// The node command line.
pub fn node_cmdline(name: &str, key: &str, migration_ip: &str) -> String {
    format!(
        "name={name} mode=node key={key} mgmt_ip={NODE_MGMT_IP}/24 mgmt_gw=10.0.2.2 mgmt_port={NODE_MGMT_PORT} mig_ip={migration_ip}/24"
    )
}

/// QEMU's arguments for node `i` of `count`.
pub fn qemu_args(
    boot: &Boot,
    i: usize,
    count: usize,
    key: &str,
    mgmt_port: u16,
    link_port: u16,
    log: &Path,
) -> Vec<String> {
    let name = node_name(i);
    let mig_ip = format!("192.168.100.{}", i + 1);
    let images = &boot.images;
    let mut a: Vec<String> = boot.accel.qemu_args().map(String::from).into();
    a.extend([
        "-m".into(),
        format!("{NODE_MEMORY_MIB}M"),
        "-kernel".into(),
        images.hypervisor.display().to_string(),
        "-initrd".into(),
        images.guest_kernel.display().to_string(),
        "-append".into(),
        node_cmdline(&name, key, &mig_ip),
        "-serial".into(),
        format!("file:{}", log.display()),
        "-display".into(),
        "none".into(),
        "-monitor".into(),
        "none".into(),
        "-no-reboot".into(),
        "-device".into(),
        "isa-debug-exit,iobase=0xf4,iosize=0x04".into(),
        // Management NIC: user networking, only a host-loopback forward.
        "-netdev".into(),
        format!("user,id=mgmt,restrict=on,hostfwd=tcp:127.0.0.1:{mgmt_port}-{NODE_MGMT_IP}:{NODE_MGMT_PORT}"),
        "-device".into(),
        format!("virtio-net-pci,netdev=mgmt,mac=52:54:00:00:00:{:02x}", i + 1),
    ]);
    if count > 2 {
        a.extend([
            "-netdev".into(),
            format!("socket,id=mig,connect=127.0.0.1:{link_port}"),
            "-device".into(),
            format!("virtio-net-pci,netdev=mig,mac=52:54:00:00:01:{:02x}", i + 1),
        ]);
    } else if count == 2 {
        let end = if i == 0 { "listen" } else { "connect" };
        a.extend([
            "-netdev".into(),
            format!("socket,id=mig,{end}=127.0.0.1:{link_port}"),
            "-device".into(),
            format!("virtio-net-pci,netdev=mig,mac=52:54:00:00:01:{:02x}", i + 1),
        ]);
    } else {
        // A lone node still gets its migration NIC, on a link to nowhere.
        a.extend([
            "-netdev".into(),
            "user,id=mig,restrict=on".into(),
            "-device".into(),
            format!("virtio-net-pci,netdev=mig,mac=52:54:00:00:01:{:02x}", i + 1),
        ]);
    }
    a
}

/// Whether process `pid` exists.
pub fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks for existence and permission.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn kill_group(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: the node was started as the leader of its own process
        // group (process_group(0)); signalling that group reaches only it.
        unsafe {
            libc::kill(-pid, libc::SIGTERM);
        }
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .filter(|l| !l.contains("key="))
        .copied()
        .collect::<Vec<_>>()
        .join("\n")
}

/// `cluster up`: boot `count` nodes in the background and wait until each
/// answers an authenticated `node-info`.
pub fn up(dir: &Path, boot: &Boot, count: usize) -> Result<ClusterState, String> {
    if !(1..=NODES_MAX).contains(&count) {
        return Err(format!("--nodes must be 1 to {NODES_MAX}"));
    }
    if let Ok(old) = load(dir) {
        if old.nodes.iter().any(|n| alive(n.pid)) {
            return Err(format!(
                "a cluster is already running from {} (`cluster down` first)",
                dir.display()
            ));
        }
    }
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let key = hex_encode(&hvctl::random_bytes::<32>()?);
    let link_port = free_port()?;
    let mut state = ClusterState {
        key: key.clone(),
        link_port,
        hub_pid: None,
        nodes: Vec::new(),
    };
    if count > 2 {
        let exe = std::env::current_exe().map_err(|e| format!("finding qemu-runner: {e}"))?;
        let hub = Command::new(exe)
            .args(["cluster", "hub", "--port", &link_port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("starting the link hub: {e}"))?;
        state.hub_pid = Some(hub.id());
        save(dir, &state)?;
        // The nodes connect at start-up and QEMU 7.2 does not retry.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", link_port)).is_err() {
            if Instant::now() > deadline || !alive(hub.id()) {
                down(dir).ok();
                return Err("the link hub did not start".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for i in 0..count {
        let name = node_name(i);
        let mgmt_port = free_port()?;
        let log = dir.join(format!("node-{name}.log"));
        let _ = fs::remove_file(&log);
        let err_path = dir.join(format!("qemu-{name}.err"));
        let err =
            fs::File::create(&err_path).map_err(|e| format!("{}: {e}", err_path.display()))?;
        let child = Command::new(crate::qemu::QEMU)
            .args(qemu_args(boot, i, count, &key, mgmt_port, link_port, &log))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", crate::qemu::QEMU))?;
        state.nodes.push(NodeState {
            name,
            pid: child.id(),
            mgmt_port,
            migration_ip: format!("192.168.100.{}", i + 1),
            log,
        });
        save(dir, &state)?;
        if i == 0 && count == 2 {
            // The listening end of the link must exist before the other
            // node connects (QEMU 7.2 does not retry).
            std::thread::sleep(Duration::from_millis(700));
        }
    }
    let key = ClusterKey::from_hex(&state.key).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + UP_TIMEOUT;
    // A spinner while the nodes boot (stderr, drawn on a terminal only).
    let spinner =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    spinner.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    spinner.enable_steady_tick(Duration::from_millis(120));
    for n in &state.nodes {
        spinner.set_message(format!(
            "waiting for node {} to answer on 127.0.0.1:{}",
            n.name, n.mgmt_port
        ));
        loop {
            if !alive(n.pid) {
                spinner.finish_and_clear();
                let err = fs::read_to_string(dir.join(format!("qemu-{}.err", n.name)))
                    .unwrap_or_default();
                down(dir).ok();
                return Err(format!(
                    "node {} exited while starting\nQEMU: {}\nserial log tail:\n{}",
                    n.name,
                    err.trim(),
                    log_tail(&n.log, 20)
                ));
            }
            let addr = format!("127.0.0.1:{}", n.mgmt_port);
            let answered = Client::connect(&addr, &key)
                .and_then(|mut c| c.call_ok(Request::NodeInfo))
                .is_ok();
            if answered {
                break;
            }
            if Instant::now() > deadline {
                spinner.finish_and_clear();
                let tail = log_tail(&n.log, 20);
                down(dir).ok();
                return Err(format!(
                    "node {} did not answer on 127.0.0.1:{} within {} s; serial log tail:\n{tail}",
                    n.name,
                    n.mgmt_port,
                    UP_TIMEOUT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    spinner.finish_and_clear();
    Ok(state)
}

/// `cluster down`: stop every node and remove the state file (logs stay).
pub fn down(dir: &Path) -> Result<usize, String> {
    let state = load(dir)?;
    let mut stopped = 0;
    for n in &state.nodes {
        if alive(n.pid) {
            kill_group(n.pid);
            stopped += 1;
        }
    }
    let pids: Vec<u32> = state
        .nodes
        .iter()
        .map(|n| n.pid)
        .chain(state.hub_pid)
        .collect();
    if let Some(h) = state.hub_pid {
        kill_group(h);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in pids.iter().filter(|p| alive(**p)) {
        if let Ok(pid) = i32::try_from(*pid) {
            // SAFETY: as in kill_group; SIGKILL for a node that ignored TERM.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
    fs::remove_file(state_file(dir)).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(stopped)
}

/// The migration-link hub for three nodes or more: accepts the nodes'
/// socket-backend connections on `listener` and repeats every frame (4-byte
/// big-endian length, then the frame) to every other connection. Blocking
/// writes carry the links' back-pressure: the slowest node paces the rest,
/// and no frame is dropped. Runs until killed (`cluster down`).
pub fn run_hub(listener: TcpListener) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    type Peers = Arc<Mutex<Vec<(u64, std::net::TcpStream)>>>;
    let peers: Peers = Arc::new(Mutex::new(Vec::new()));
    for (id, conn) in (0u64..).zip(listener.incoming()) {
        let Ok(mut conn) = conn else { continue };
        let Ok(writer) = conn.try_clone() else {
            continue;
        };
        peers
            .lock()
            .map_err(|_| "hub lock poisoned")?
            .push((id, writer));
        let peers = Arc::clone(&peers);
        std::thread::spawn(move || {
            let mut frame = vec![0u8; 4 + HUB_FRAME_MAX];
            loop {
                let mut len = [0u8; 4];
                if conn.read_exact(&mut len).is_err() {
                    break;
                }
                let n = u32::from_be_bytes(len) as usize;
                if n > HUB_FRAME_MAX {
                    break; // not QEMU's framing: drop this peer
                }
                frame[..4].copy_from_slice(&len);
                if conn.read_exact(&mut frame[4..4 + n]).is_err() {
                    break;
                }
                let Ok(mut all) = peers.lock() else { break };
                all.retain_mut(|(pid, w)| *pid == id || w.write_all(&frame[..4 + n]).is_ok());
            }
            if let Ok(mut all) = peers.lock() {
                all.retain(|(pid, _)| *pid != id);
            }
        });
    }
    Ok(())
}

/// One node's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    pub name: String,
    /// `running` (answers), `unreachable` (process up, API silent),
    /// `stopped` (process gone).
    pub state: String,
    pub management_address: String,
}

/// `cluster status`.
pub fn status(dir: &Path) -> Result<Vec<NodeStatus>, String> {
    let state = load(dir)?;
    let key = ClusterKey::from_hex(&state.key).map_err(|e| e.to_string())?;
    Ok(state
        .nodes
        .iter()
        .map(|n| {
            let addr = format!("127.0.0.1:{}", n.mgmt_port);
            let s = if !alive(n.pid) {
                "stopped"
            } else if Client::connect(&addr, &key)
                .and_then(|mut c| c.call_ok(Request::NodeInfo))
                .is_ok()
            {
                "running"
            } else {
                "unreachable"
            };
            NodeStatus {
                name: n.name.clone(),
                state: s.into(),
                management_address: addr,
            }
        })
        .collect())
}

/// `bench link`: `bytes` from node a to node b over TCP on the migration
/// link, after `frames` raw frames on the same link; returns the report.
pub fn bench_link(dir: &Path, bytes: u64, frames: u64) -> Result<String, String> {
    let state = load(dir)?;
    let [a, b, ..] = state.nodes.as_slice() else {
        return Err("bench link needs a cluster of two nodes".into());
    };
    let key = ClusterKey::from_hex(&state.key).map_err(|e| e.to_string())?;
    let mut ca = Client::connect(&format!("127.0.0.1:{}", a.mgmt_port), &key)?;
    let mut cb = Client::connect(&format!("127.0.0.1:{}", b.mgmt_port), &key)?;
    let port = 7100;
    let rx = match cb.call_ok(Request::BenchLinkReceive { port, bytes })? {
        Body::Job(j) => j.id,
        other => return Err(format!("unexpected reply from node b: {other:?}")),
    };
    let tx = match ca.call_ok(Request::BenchLinkSend {
        peer: b.migration_ip.clone(),
        port,
        bytes,
        frames,
    })? {
        Body::Job(j) => j.id,
        other => return Err(format!("unexpected reply from node a: {other:?}")),
    };
    println!(
        "bench link: {frames} raw frames, then {} MiB over TCP from node a to node b",
        bytes >> 20
    );
    hvctl::watch(&mut ca, tx, false)?;
    let job = |c: &mut Client, id: u64| -> Result<Option<hvmgmt::proto::JobInfo>, String> {
        match c.call_ok(Request::JobList)? {
            Body::JobList { jobs } => Ok(jobs.into_iter().find(|j| j.id == id)),
            _ => Ok(None),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let rx_job = loop {
        let j = job(&mut cb, rx)?.ok_or("node b forgot the receive job")?;
        if j.state.is_final() || Instant::now() > deadline {
            break j;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let tx_job = job(&mut ca, tx)?.ok_or("node a forgot the send job")?;
    if tx_job.state != JobState::Completed {
        return Err(format!(
            "the send job ended {:?}: {}",
            tx_job.state,
            tx_job.error.unwrap_or_default()
        ));
    }
    let result = tx_job.result.unwrap_or_default();
    let field = |k: &str| -> String {
        result
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .unwrap_or("?")
            .to_string()
    };
    let mut report = format!(
        "bench link: tcp_mb_per_s={} raw_frame_mb_per_s={} raw_frames_per_s={} (tcp {} bytes in {} ms; raw {} frames of {} bytes in {} ms)",
        field("tcp_mb_per_s"),
        field("raw_mb_per_s"),
        field("raw_frames_per_s"),
        field("tcp_bytes"),
        field("tcp_ms"),
        field("raw_frames"),
        field("raw_frame_bytes"),
        field("raw_ms"),
    );
    report.push_str(&format!(
        "\nbench link: node b received {} bytes ({:?}){}",
        rx_job.bytes_done,
        rx_job.state,
        rx_job.result.map(|r| format!(": {r}")).unwrap_or_default()
    ));
    Ok(report)
}

fn images(build: bool) -> Result<Images, String> {
    if build {
        crate::cargo::build()
    } else {
        let i = Images::locate()?;
        i.check()?;
        Ok(i)
    }
}

/// `cluster up`'s boot: the path must be QEMU's and, for `--accel kvm`,
/// the host must have nested KVM.
fn boot(arch: Arch, accel: Accel, build: bool) -> Result<Boot, String> {
    if arch != Arch::Svm {
        return Err(format!(
            "--arch {arch}: clusters run on the svm path (QEMU) only; the vmx path boots under Bochs, which has no virtio-net"
        ));
    }
    crate::accel::check(accel)?;
    Ok(Boot {
        images: images(build)?,
        accel,
    })
}

/// qemu-runner's `cluster` commands; `Ok` with the exit status.
pub fn run_cli(cmd: &crate::cli::Cluster) -> Result<u8, String> {
    use crate::cli::Cluster;
    match cmd {
        Cluster::Up {
            nodes,
            arch,
            accel,
            state,
            build,
        } => {
            let dir = state_dir(state.state_dir.as_deref());
            let boot = boot(arch.arch, accel.accel, build.build())?;
            let count = usize::try_from(*nodes).unwrap_or(usize::MAX);
            let state = up(&dir, &boot, count)?;
            for n in &state.nodes {
                println!("node {} up: management 127.0.0.1:{}", n.name, n.mgmt_port);
            }
            println!("cluster state and logs: {}", dir.display());
            Ok(0)
        }
        Cluster::Status { json, state } => {
            let nodes = status(&state_dir(state.state_dir.as_deref()))?;
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&nodes).unwrap_or_default()
                );
            } else {
                for n in &nodes {
                    println!("{:<4} {:<12} {}", n.name, n.state, n.management_address);
                }
            }
            Ok(u8::from(nodes.iter().any(|n| n.state != "running")))
        }
        Cluster::Hub { port } => {
            let l = TcpListener::bind(("127.0.0.1", *port))
                .map_err(|e| format!("hub: 127.0.0.1:{port}: {e}"))?;
            run_hub(l)?;
            Ok(0)
        }
        Cluster::Down { state } => {
            let n = down(&state_dir(state.state_dir.as_deref()))?;
            println!("cluster down: {n} node(s) stopped");
            Ok(0)
        }
    }
}

/// `bench link`: on the running cluster, or on one booted for the run.
pub fn run_bench_link(
    mib: u64,
    frames: u64,
    state_dir_arg: Option<&str>,
    build: bool,
) -> Result<u8, String> {
    let dir = state_dir(state_dir_arg);
    let bytes = mib
        .checked_shl(20)
        .filter(|b| b >> 20 == mib)
        .ok_or("--mib is too large")?;
    let own = load(&dir).is_err();
    if own {
        up(&dir, &boot(Arch::Svm, Accel::Tcg, build)?, 2)?;
    }
    let result = bench_link(&dir, bytes, frames);
    if own {
        down(&dir).ok();
    }
    println!("{}", result?);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cmdlines_and_args() {
        assert_eq!(
            (node_name(0), node_name(1)),
            ("a".to_string(), "b".to_string())
        );
        let c = node_cmdline("b", "00ff", "192.168.100.2");
        assert!(c.contains("mode=node key=00ff") && c.contains("mig_ip=192.168.100.2/24"));
        let images = Boot {
            images: Images {
                hypervisor: "/h".into(),
                guest_kernel: "/g".into(),
            },
            accel: Accel::Tcg,
        };
        let a = qemu_args(&images, 0, 2, "k", 5000, 6000, Path::new("/l"));
        let joined = a.join(" ");
        assert!(
            joined.contains("hostfwd=tcp:127.0.0.1:5000-10.0.2.15:7000"),
            "{joined}"
        );
        assert!(joined.contains("socket,id=mig,listen=127.0.0.1:6000"));
        let b = qemu_args(&images, 1, 2, "k", 5001, 6000, Path::new("/l")).join(" ");
        assert!(b.contains("socket,id=mig,connect=127.0.0.1:6000"));
        assert!(!b.contains("dgram") && !b.contains("0.0.0.0"));
        let c = qemu_args(&images, 2, 3, "k", 5002, 6001, Path::new("/l")).join(" ");
        assert!(c.contains("socket,id=mig,connect=127.0.0.1:6001"), "{c}");
        assert!(c.contains("mig_ip=192.168.100.3/24"), "{c}");
        assert!(joined.starts_with("-accel tcg -cpu qemu64,+svm,+npt -m 1024M"));
        let kvm = Boot {
            accel: Accel::Kvm,
            ..images.clone()
        };
        let k = qemu_args(&kvm, 0, 2, "k", 5000, 6000, Path::new("/l")).join(" ");
        assert!(k.starts_with("-accel kvm -cpu host -m 1024M"), "{k}");
    }

    #[test]
    fn state_round_trip_and_target_resolution() {
        let dir = std::env::temp_dir().join(format!("hvm-cluster-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let s = ClusterState {
            key: "00".repeat(32),
            link_port: 1,
            hub_pid: None,
            nodes: vec![NodeState {
                name: "a".into(),
                pid: 0,
                mgmt_port: 4242,
                migration_ip: "192.168.100.1".into(),
                log: "/x".into(),
            }],
        };
        save(&dir, &s).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(state_file(&dir)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key file is private");
        assert_eq!(load(&dir).unwrap(), s);
        let d = dir.to_str();
        assert_eq!(
            resolve_target(d, None, None, None).unwrap(),
            ("127.0.0.1:4242".to_string(), "00".repeat(32))
        );
        assert!(resolve_target(d, Some("z"), None, None)
            .unwrap_err()
            .contains("no node"));
        assert_eq!(
            resolve_target(d, Some("z"), Some("h:1"), Some("k")).unwrap(),
            ("h:1".to_string(), "k".to_string())
        );
        assert!(up(
            &dir,
            &Boot {
                images: Images {
                    hypervisor: "/h".into(),
                    guest_kernel: "/g".into()
                },
                accel: Accel::Tcg
            },
            9
        )
        .unwrap_err()
        .contains("--nodes"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
