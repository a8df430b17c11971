//! `qemu-runner cluster up|status|down|link|kill|start` and `bench link`: a
//! cluster of hvmigrate nodes under QEMU on this machine.
//!
//! Each node is a QEMU process in the background with two NICs
//! (shared/PLATFORM.md, "Two QEMU nodes on one virtual Ethernet link"):
//! * management: QEMU user networking; host port `127.0.0.1:P` is forwarded
//!   to the node's management port 7000 at 10.0.2.15 (addresses internal to
//!   QEMU's emulated network);
//! * migration: a `-netdev stream` connection to the link relay
//!   ([`crate::relay`]), a `qemu-runner` process that `cluster up` starts
//!   first, on the Unix socket `link-NAME.sock` of the state directory;
//!   addresses 192.168.100.N/24 inside the emulated link. The relay forwards
//!   frames between the nodes it was told about (by pid), and is where
//!   `cluster link cut|restore` pulls and plugs a node's cable.
//!
//! `cluster kill NAME` powers a node off abruptly (SIGKILL to its QEMU) and
//! `cluster start NAME` boots it again, empty, from the QEMU arguments
//! `cluster up` recorded: same addresses, ports and key.
//!
//! The cluster key never appears on a command line (`ps` shows those to
//! every local user): each node gets it as QEMU's fw_cfg file
//! `opt/hvmigrate/key` (`-fw_cfg name=opt/hvmigrate/key,file=cluster.key`),
//! which the node reads through the fw_cfg I/O ports, and every node also
//! gets a `virtio-rng-pci` entropy device for its nonces.
//!
//! The state directory (default `target/cluster`, or
//! `$HVMIGRATE_CLUSTER_DIR`, or `--state-dir`; mode 0700) holds
//! `cluster.json` (nodes, ports, process ids, QEMU arguments and the
//! cluster key, mode 0600), the key alone as `cluster.key` (hex, mode 0600,
//! for QEMU), each node's serial log `node-NAME.log` (the previous boot's
//! as `node-NAME.log.1` after `cluster start`), the relay's sockets and its
//! log `relay.log`.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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
use crate::qemu::NodeStore;
use crate::relay::{self, ControlRequest, PortSpec};

/// Most nodes.
pub const NODES_MAX: usize = 8;
/// Time for the link relay to answer after it was started.
pub const RELAY_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// Boot modules after the guest kernel: the Linux guest's kernel and
    /// initramfs (what `vm create --linux` boots), or none.
    pub modules: Vec<PathBuf>,
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
    /// QEMU's arguments (run in the state directory), kept for `cluster
    /// start`.
    #[serde(default)]
    pub qemu_args: Vec<String>,
    /// A key of the node's own instead of the cluster's (hex; `cluster
    /// start --wrong-key`, fault injection), also what hvctl uses for it.
    #[serde(default)]
    pub own_key: Option<String>,
}

/// `cluster.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The cluster key, hex (never printed).
    pub key: String,
    /// The link relay's process.
    #[serde(default)]
    pub relay_pid: Option<u32>,
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

/// The key file QEMU passes to the nodes (relative to the state directory,
/// where QEMU runs).
pub const KEY_FILE: &str = "cluster.key";
/// The fw_cfg name the node reads the key from.
pub const KEY_FW_CFG_NAME: &str = "opt/hvmigrate/key";

/// Write `contents` to `path`, created with mode 0600 (the mode applies at
/// creation: no moment where another user can open it).
fn write_private(path: &Path, contents: &str) -> Result<(), String> {
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::io::Write::write_all(&mut file, contents.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
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
    let k = key.map_or_else(
        || n.own_key.clone().unwrap_or_else(|| state.key.clone()),
        String::from,
    );
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

/// The node command line (no key: that comes through fw_cfg).
pub fn node_cmdline(name: &str, migration_ip: &str, peers: &str) -> String {
    let mut line = format!(
        "name={name} mode=node mgmt_ip={NODE_MGMT_IP}/24 mgmt_gw=10.0.2.2 mgmt_port={NODE_MGMT_PORT} mig_ip={migration_ip}/24"
    );
    if !peers.is_empty() {
        line.push_str(&format!(" peers={peers}"));
    }
    line
}

/// Node `i`'s peers among `count` nodes, as its `peers=` wants them:
/// `NAME@IPv4` of every other node, comma-separated (docs/DESIGN.md).
pub fn peers(i: usize, count: usize) -> String {
    (0..count)
        .filter(|&j| j != i)
        .map(|j| format!("{}@{}", node_name(j), migration_ip(j)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Node `i`'s migration NIC MAC address (the relay forwards by it).
pub fn migration_mac(i: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x00, 0x01, (i + 1) as u8]
}

/// Node `i`'s address on the migration link.
pub fn migration_ip(i: usize) -> String {
    format!("192.168.100.{}", i + 1)
}

/// The stores of node `name` under the state directory `dir`: its local
/// store `stores/NAME` (named `local`, mount tag = the node's name) and the
/// cluster's shared store `stores/shared` (named and tagged `shared`).
pub fn node_stores(dir: &Path, name: &str) -> Vec<NodeStore> {
    let stores = dir.join("stores");
    vec![
        NodeStore {
            name: "local".into(),
            tag: name.into(),
            path: stores.join(name),
        },
        NodeStore {
            name: "shared".into(),
            tag: "shared".into(),
            path: stores.join("shared"),
        },
    ]
}

/// QEMU's arguments for node `i`, with `stores` exported to it. QEMU runs
/// in the state directory, where its migration NIC connects to the relay's
/// socket `link-NAME.sock` (relative, so a deep state directory never
/// exceeds a socket path's length).
pub fn qemu_args(
    boot: &Boot,
    i: usize,
    count: usize,
    mgmt_port: u16,
    log: &Path,
    stores: &[NodeStore],
) -> Vec<String> {
    let name = node_name(i);
    let images = &boot.images;
    let mac = migration_mac(i);
    let mut cmdline = node_cmdline(&name, &migration_ip(i), &peers(i, count));
    for s in stores {
        cmdline.push(' ');
        cmdline.push_str(&crate::qemu::store_word(s));
    }
    let mut a: Vec<String> = boot.accel.qemu_args().map(String::from).into();
    a.extend([
        "-m".into(),
        format!("{NODE_MEMORY_MIB}M"),
        "-kernel".into(),
        images.hypervisor.display().to_string(),
        "-initrd".into(),
        // QEMU's Multiboot loader takes the modules comma-separated.
        std::iter::once(&images.guest_kernel)
            .chain(&boot.modules)
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(","),
        "-append".into(),
        cmdline,
        "-serial".into(),
        format!("file:{}", log.display()),
        "-display".into(),
        "none".into(),
        "-monitor".into(),
        "none".into(),
        "-no-reboot".into(),
        "-device".into(),
        "isa-debug-exit,iobase=0xf4,iosize=0x04".into(),
        // The cluster key as a file the node reads through fw_cfg.
        "-fw_cfg".into(),
        format!("name={KEY_FW_CFG_NAME},file={KEY_FILE}"),
        "-device".into(),
        crate::qemu::ENTROPY_DEVICE.into(),
        // Management NIC: user networking, only a host-loopback forward.
        "-netdev".into(),
        format!("user,id=mgmt,restrict=on,hostfwd=tcp:127.0.0.1:{mgmt_port}-{NODE_MGMT_IP}:{NODE_MGMT_PORT}"),
        "-device".into(),
        format!("virtio-net-pci,netdev=mgmt,mac=52:54:00:00:00:{:02x}", i + 1),
        // Migration NIC: through the relay.
        "-netdev".into(),
        format!(
            "stream,id=mig,server=off,addr.type=unix,addr.path={}",
            relay::link_socket_name(&name)
        ),
        "-device".into(),
        format!(
            "virtio-net-pci,netdev=mig,mac={}",
            mac.map(|b| format!("{b:02x}")).join(":")
        ),
    ]);
    for (index, s) in stores.iter().enumerate() {
        a.extend(crate::qemu::store_args(index, s));
    }
    a
}

/// The relay's ports for `count` nodes.
pub fn relay_ports(count: usize) -> Vec<PortSpec> {
    (0..count)
        .map(|i| PortSpec {
            name: node_name(i),
            mac: migration_mac(i),
        })
        .collect()
}

/// Whether process `pid` exists and has not exited (a zombie whose parent
/// has not reaped it counts as gone).
pub fn alive(pid: u32) -> bool {
    let Ok(spid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks for existence and permission.
    if unsafe { libc::kill(spid, 0) } != 0 {
        return false;
    }
    // /proc/PID/stat: "PID (COMM) STATE ..."; COMM may hold spaces.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next())
        })
        .is_none_or(|state| state != 'Z' && state != 'X')
}

fn signal_group(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: every process the cluster starts (node QEMUs, the relay)
        // leads its own process group (process_group(0)); signalling that
        // group reaches only it.
        unsafe {
            libc::kill(-pid, signal);
        }
    }
}

fn kill_group(pid: u32) {
    signal_group(pid, libc::SIGTERM);
}

/// Whether `pid` is still the process we started for a node (a QEMU), not
/// a reused pid.
fn is_qemu(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| c.trim_end().starts_with("qemu-system"))
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

/// Start the link relay for `count` nodes in the background and wait until
/// it answers.
fn start_relay(dir: &Path, count: usize) -> Result<u32, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding qemu-runner: {e}"))?;
    let log_path = dir.join("relay.log");
    let log = fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let relay = Command::new(exe)
        .args(["cluster", "relay", "--nodes", &count.to_string()])
        .arg("--state-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting the link relay: {e}"))?;
    let pid = relay.id();
    let deadline = Instant::now() + RELAY_TIMEOUT;
    while relay::control_status(dir).is_err() {
        if Instant::now() > deadline || !alive(pid) {
            signal_group(pid, libc::SIGKILL);
            return Err(format!(
                "the link relay did not start: {}",
                fs::read_to_string(&log_path).unwrap_or_default().trim()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(pid)
}

/// Start node `n`'s QEMU from its recorded arguments and register it with
/// the relay; returns its pid.
fn spawn_node(dir: &Path, n: &NodeState) -> Result<u32, String> {
    let err_path = dir.join(format!("qemu-{}.err", n.name));
    let err = fs::File::create(&err_path).map_err(|e| format!("{}: {e}", err_path.display()))?;
    let child = Command::new(crate::qemu::QEMU)
        .args(&n.qemu_args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", crate::qemu::QEMU))?;
    let pid = child.id();
    if let Err(e) = relay::control(
        dir,
        &ControlRequest::Expect {
            node: n.name.clone(),
            pid,
        },
    ) {
        signal_group(pid, libc::SIGKILL);
        return Err(e);
    }
    Ok(pid)
}

/// A spinner while nodes boot (stderr, drawn on a terminal only).
fn spinner() -> indicatif::ProgressBar {
    let spinner =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    spinner.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    spinner.enable_steady_tick(Duration::from_millis(120));
    spinner
}

/// Wait until node `n` answers an authenticated `node-info`.
fn wait_answer(
    dir: &Path,
    n: &NodeState,
    key: &ClusterKey,
    deadline: Instant,
    spinner: &indicatif::ProgressBar,
) -> Result<(), String> {
    spinner.set_message(format!(
        "waiting for node {} to answer on 127.0.0.1:{}",
        n.name, n.mgmt_port
    ));
    let addr = format!("127.0.0.1:{}", n.mgmt_port);
    loop {
        if !alive(n.pid) {
            let err =
                fs::read_to_string(dir.join(format!("qemu-{}.err", n.name))).unwrap_or_default();
            return Err(format!(
                "node {} exited while starting\nQEMU: {}\nserial log tail:\n{}",
                n.name,
                err.trim(),
                log_tail(&n.log, 20)
            ));
        }
        if Client::connect(&addr, key)
            .and_then(|mut c| c.call_ok(Request::NodeInfo))
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "node {} did not answer on {addr} within {} s; serial log tail:\n{}",
                n.name,
                UP_TIMEOUT.as_secs(),
                log_tail(&n.log, 20)
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Run `bench` on the running cluster of state directory `state_dir_arg`,
/// or on one of `nodes` nodes booted for it (TCG; built first if
/// `build`) and shut down after, whatever `bench` returned.
pub fn on_cluster(
    state_dir_arg: Option<&str>,
    build: bool,
    nodes: usize,
    bench: impl FnOnce(&Path) -> Result<u8, String>,
) -> Result<u8, String> {
    let dir = state_dir(state_dir_arg);
    let own = load(&dir).is_err();
    if own {
        let boot = Boot {
            images: if build {
                crate::cargo::build()?
            } else {
                let i = crate::cargo::Images::locate()?;
                i.check()?;
                i
            },
            accel: crate::accel::Accel::Tcg,
            modules: Vec::new(),
        };
        up(&dir, &boot, nodes)?;
    }
    let result = bench(&dir);
    if own {
        down(&dir).ok();
    }
    result
}

/// `cluster up`: start the link relay, boot `count` nodes in the background
/// and wait until each answers an authenticated `node-info`.
pub fn up(dir: &Path, boot: &Boot, count: usize) -> Result<ClusterState, String> {
    if !(1..=NODES_MAX).contains(&count) {
        return Err(format!("--nodes must be 1 to {NODES_MAX}"));
    }
    if let Ok(old) = load(dir) {
        if old
            .nodes
            .iter()
            .map(|n| n.pid)
            .chain(old.relay_pid)
            .any(alive)
        {
            return Err(format!(
                "a cluster is already running from {} (`cluster down` first)",
                dir.display()
            ));
        }
    }
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    // QEMU is told the stores' absolute paths (and reports them).
    let stores_root = fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let key = hex_encode(&hvctl::random_bytes::<32>()?);
    write_private(&dir.join(KEY_FILE), &key)?;
    let mut state = ClusterState {
        key: key.clone(),
        relay_pid: None,
        nodes: Vec::new(),
    };
    state.relay_pid = Some(start_relay(dir, count)?);
    save(dir, &state)?;
    for i in 0..count {
        let name = node_name(i);
        let mgmt_port = free_port()?;
        let log = dir.join(format!("node-{name}.log"));
        let _ = fs::remove_file(&log);
        let _ = fs::remove_file(dir.join(format!("node-{name}.log.1")));
        // Stores persist across `cluster down` and `up`, like disks.
        let stores = node_stores(&stores_root, &name);
        for s in &stores {
            fs::create_dir_all(&s.path).map_err(|e| format!("{}: {e}", s.path.display()))?;
        }
        let mut node = NodeState {
            name,
            pid: 0,
            mgmt_port,
            migration_ip: migration_ip(i),
            qemu_args: qemu_args(boot, i, count, mgmt_port, &log, &stores),
            log,
            own_key: None,
        };
        match spawn_node(dir, &node) {
            Ok(pid) => node.pid = pid,
            Err(e) => {
                down(dir).ok();
                return Err(e);
            }
        }
        state.nodes.push(node);
        save(dir, &state)?;
    }
    let key = ClusterKey::from_hex(&state.key).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + UP_TIMEOUT;
    let spinner = spinner();
    for n in &state.nodes {
        if let Err(e) = wait_answer(dir, n, &key, deadline, &spinner) {
            spinner.finish_and_clear();
            down(dir).ok();
            return Err(e);
        }
    }
    spinner.finish_and_clear();
    Ok(state)
}

/// `cluster down`: stop every node and the relay, and remove the state file
/// (logs stay).
pub fn down(dir: &Path) -> Result<usize, String> {
    let state = load(dir)?;
    let mut stopped = 0;
    for n in &state.nodes {
        if alive(n.pid) && is_qemu(n.pid) {
            kill_group(n.pid);
            stopped += 1;
        }
    }
    let pids: Vec<u32> = state
        .nodes
        .iter()
        .map(|n| n.pid)
        .chain(state.relay_pid)
        .collect();
    if let Some(r) = state.relay_pid.filter(|&r| alive(r)) {
        kill_group(r);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in pids.iter().filter(|p| alive(**p)) {
        // A node or relay that ignored TERM.
        signal_group(*pid, libc::SIGKILL);
    }
    let _ = fs::remove_file(dir.join(KEY_FILE));
    for n in &state.nodes {
        let _ = fs::remove_file(dir.join(own_key_file(&n.name)));
    }
    fs::remove_file(state_file(dir)).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(stopped)
}

fn find_node<'s>(state: &'s ClusterState, name: &str) -> Result<(usize, &'s NodeState), String> {
    state
        .nodes
        .iter()
        .enumerate()
        .find(|(_, n)| n.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = state.nodes.iter().map(|n| n.name.as_str()).collect();
            format!(
                "no node {name:?} in the cluster (nodes: {})",
                names.join(", ")
            )
        })
}

/// `cluster kill NAME`: power the node off abruptly (SIGKILL to its QEMU:
/// no shutdown, whatever it held is lost); returns once it is gone.
pub fn kill(dir: &Path, name: &str) -> Result<(), String> {
    let state = load(dir)?;
    let (_, n) = find_node(&state, name)?;
    if !alive(n.pid) || !is_qemu(n.pid) {
        return Err(format!("node {name} is not running"));
    }
    signal_group(n.pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(n.pid) {
        if Instant::now() > deadline {
            return Err(format!("node {name} (pid {}) did not die", n.pid));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// QEMU arguments `args` with the node's fw_cfg key file set to
/// `key_file` (relative to the state directory).
pub fn with_key(args: &[String], key_file: &str) -> Vec<String> {
    let prefix = format!("name={KEY_FW_CFG_NAME},file=");
    args.iter()
        .map(|a| {
            if a.starts_with(&prefix) {
                format!("{prefix}{key_file}")
            } else {
                a.clone()
            }
        })
        .collect()
}

/// Node `name`'s own key file (`cluster start --wrong-key`).
fn own_key_file(name: &str) -> String {
    format!("node-{name}.key")
}

/// `cluster start NAME [--wrong-key]`: boot a node that is not running
/// again, empty, from the arguments `cluster up` recorded (same ports,
/// addresses and key; with `wrong_key` a fresh random key instead, which
/// the other nodes must refuse); returns once it answers.
pub fn start(dir: &Path, name: &str, wrong_key: bool) -> Result<NodeState, String> {
    let mut state = load(dir)?;
    let (i, n) = find_node(&state, name)?;
    if alive(n.pid) {
        return Err(format!(
            "node {name} is running (`cluster kill {name}` first)"
        ));
    }
    if n.qemu_args.is_empty() {
        return Err(format!(
            "the cluster state has no QEMU arguments for node {name} (started by an older qemu-runner: `cluster down` and `cluster up`)"
        ));
    }
    if !state.relay_pid.is_some_and(alive) {
        return Err(
            "the cluster's link relay is not running (`cluster down` and `cluster up`)".into(),
        );
    }
    let (key, key_file) = if wrong_key {
        let key = hex_encode(&hvctl::random_bytes::<32>()?);
        let file = own_key_file(name);
        write_private(&dir.join(&file), &key)?;
        (key, file)
    } else {
        let _ = fs::remove_file(dir.join(own_key_file(name)));
        (state.key.clone(), KEY_FILE.to_string())
    };
    let _ = fs::rename(&n.log, n.log.with_extension("log.1"));
    let mut node = n.clone();
    node.qemu_args = with_key(&n.qemu_args, &key_file);
    node.own_key = wrong_key.then(|| key.clone());
    let key = ClusterKey::from_hex(&key).map_err(|e| e.to_string())?;
    let spinner = spinner();
    let deadline = Instant::now() + UP_TIMEOUT;
    let mut attempt = 1;
    let answered = loop {
        node.pid = spawn_node(dir, &node)?;
        state.nodes[i] = node.clone();
        save(dir, &state)?;
        match wait_answer(dir, &node, &key, deadline, &spinner) {
            // The node's old management port can be taken for a moment
            // after a kill (a client's connection bound to it on this
            // busy host): QEMU then exits at once; try again shortly.
            Err(e) if e.contains(PORT_BUSY) && attempt < START_ATTEMPTS => {
                attempt += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            other => break other,
        }
    };
    spinner.finish_and_clear();
    answered.map(|()| node)
}

/// What QEMU says when a host port of its user network is in use.
const PORT_BUSY: &str = "Could not set up host forwarding rule";
/// Boots `cluster start` tries when the node's port is briefly in use.
const START_ATTEMPTS: u32 = 5;

/// `cluster link cut|restore --node NAME`.
pub fn link(dir: &Path, name: &str, cut: bool) -> Result<(), String> {
    let state = load(dir)?;
    find_node(&state, name)?;
    let node = name.to_string();
    relay::control(
        dir,
        &if cut {
            ControlRequest::Cut { node }
        } else {
            ControlRequest::Restore { node }
        },
    )
    .map(|_| ())
}

/// One node's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    pub name: String,
    /// `running` (answers), `unreachable` (process up, API silent),
    /// `stopped` (process gone).
    pub state: String,
    pub management_address: String,
    /// The node's migration link at the relay: `up`, `cut` (`cluster link
    /// cut`), `down` (the node's QEMU is not connected) or `no-relay`.
    pub link: String,
}

/// `cluster status`.
pub fn status(dir: &Path) -> Result<Vec<NodeStatus>, String> {
    let state = load(dir)?;
    let key = ClusterKey::from_hex(&state.key).map_err(|e| e.to_string())?;
    let links = relay::control_status(dir).ok();
    Ok(state
        .nodes
        .iter()
        .map(|n| {
            let link = match links.as_ref().map(|l| l.iter().find(|p| p.name == n.name)) {
                None => "no-relay",
                Some(Some(p)) if p.cut => "cut",
                Some(Some(p)) if p.connected_pid == Some(n.pid) => "up",
                Some(_) => "down",
            };
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
                link: link.into(),
            }
        })
        .collect())
}

/// `bench link`: `bytes` from node a to node b over TCP on the migration
/// link, after `frames` raw frames on the same link; returns the report.
pub fn bench_link(dir: &Path, bytes: u64, frames: u64) -> Result<String, String> {
    bench_link_quiet(dir, bytes, frames, false)
}

/// [`bench_link`], printing nothing while it runs when `quiet` (`bench
/// migrate --json` keeps its output JSON).
pub fn bench_link_quiet(
    dir: &Path,
    bytes: u64,
    frames: u64,
    quiet: bool,
) -> Result<String, String> {
    let state = load(dir)?;
    let [a, b, ..] = state.nodes.as_slice() else {
        return Err("bench link needs a cluster of two nodes".into());
    };
    let key = ClusterKey::from_hex(&state.key).map_err(|e| e.to_string())?;
    let mut ca = Client::connect(&format!("127.0.0.1:{}", a.mgmt_port), &key)?;
    let mut cb = Client::connect(&format!("127.0.0.1:{}", b.mgmt_port), &key)?;
    // Not 7100: the managed node accepts migrations there (mig_port).
    let port = 7200;
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
    if quiet {
        hvctl::follow(&mut ca, tx, true)?;
    } else {
        println!(
            "bench link: {frames} raw frames, then {} MiB over TCP from node a to node b",
            bytes >> 20
        );
        hvctl::watch(&mut ca, tx, false)?;
    }
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
    let rx_result = rx_job.result.clone().unwrap_or_default();
    let mut report = format!(
        "bench link: tcp_mb_per_s={} raw_frame_mb_per_s={} raw_frames_per_s={} tcp_pct_of_raw={} (tcp {} bytes in {} ms; raw {} frames of {} bytes in {} ms)",
        field("tcp_mb_per_s"),
        field("raw_mb_per_s"),
        field("raw_frames_per_s"),
        pct_of(&field("tcp_mb_per_s"), &field("raw_mb_per_s")),
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
    report.push_str(&format!(
        "\nbench link: migration NICs during TCP: sender {}; receiver {}",
        stack_summary(&result),
        stack_summary(&rx_result)
    ));
    Ok(report)
}

/// `a` as a percentage of `b` (both decimal numbers), or `?`.
fn pct_of(a: &str, b: &str) -> String {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(a), Ok(b)) if b > 0 => (a * 100 / b).to_string(),
        _ => "?".into(),
    }
}

/// A node's NIC counters from a link benchmark result (`out= in= polls=
/// kicks= csum_bad=`), with the frames each stack poll moved.
fn stack_summary(result: &str) -> String {
    let num = |k: &str| -> Option<u64> {
        result
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
    };
    match (num("out"), num("in"), num("polls"), num("kicks"), num("csum_bad")) {
        (Some(out), Some(inn), Some(polls), Some(kicks), Some(bad)) => format!(
            "{out} frames out, {inn} in, {polls} polls ({} frames per poll), {kicks} notifications, {bad} bad checksums",
            (out + inn) / polls.max(1)
        ),
        _ => "no counters".into(),
    }
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
        modules: linux_modules(),
    })
}

/// The Linux guest's kernel and initramfs for the nodes (built, or
/// downloaded and built, under target/linux-guest/ by `linux_image`). A
/// machine that cannot fetch them still gets its cluster, whose nodes
/// then refuse `vm create --linux` with a clear error.
fn linux_modules() -> Vec<PathBuf> {
    let built = crate::cargo::target_dir().and_then(|dir| {
        crate::linux_image::build(&dir, &mut |l| eprintln!("qemu-runner: {l}"))
            .map_err(|e| e.to_string())
    });
    match built {
        Ok(image) => vec![image.kernel, image.initramfs],
        Err(e) => {
            eprintln!(
                "qemu-runner: no Linux guest image for the nodes (vm create --linux will be refused): {e}"
            );
            Vec::new()
        }
    }
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
                    println!(
                        "{:<4} {:<12} {:<22} link {}",
                        n.name, n.state, n.management_address, n.link
                    );
                }
            }
            Ok(u8::from(nodes.iter().any(|n| n.state != "running")))
        }
        Cluster::Relay { nodes, state } => {
            let dir = state_dir(state.state_dir.as_deref());
            let count = usize::try_from(*nodes).unwrap_or(usize::MAX).min(NODES_MAX);
            relay::run(&dir, relay_ports(count))?;
            Ok(0)
        }
        Cluster::Link(l) => {
            let (node, state, cut) = match l {
                crate::cli::LinkCmd::Cut { node, state } => (node, state, true),
                crate::cli::LinkCmd::Restore { node, state } => (node, state, false),
            };
            link(&state_dir(state.state_dir.as_deref()), node, cut)?;
            println!(
                "node {node}: migration link {}",
                if cut { "cut" } else { "restored" }
            );
            Ok(0)
        }
        Cluster::Kill { name, state } => {
            kill(&state_dir(state.state_dir.as_deref()), name)?;
            println!("node {name} killed");
            Ok(0)
        }
        Cluster::Start {
            name,
            wrong_key,
            state,
        } => {
            let n = start(&state_dir(state.state_dir.as_deref()), name, *wrong_key)?;
            println!(
                "node {} up: management 127.0.0.1:{}{}",
                n.name,
                n.mgmt_port,
                if *wrong_key {
                    " (with a key of its own, not the cluster's)"
                } else {
                    ""
                }
            );
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
    fn link_bench_report_helpers() {
        assert_eq!(pct_of("142", "196"), "72");
        assert_eq!(pct_of("?", "196"), "?");
        assert_eq!(pct_of("5", "0"), "?");
        let sender =
            "tcp_bytes=1 raw_frames_per_s=2 out=46000 in=1000 polls=2350 kicks=12 csum_bad=0";
        assert_eq!(
            stack_summary(sender),
            "46000 frames out, 1000 in, 2350 polls (20 frames per poll), 12 notifications, 0 bad checksums"
        );
        let receiver = "received 9 bytes in 1 ms: tcp_mb_per_s=9; raw benchmark frames received so far: 5; out=3 in=40 polls=0 kicks=1 csum_bad=2";
        assert!(stack_summary(receiver)
            .starts_with("3 frames out, 40 in, 0 polls (43 frames per poll)"));
        assert_eq!(stack_summary("an old node's result"), "no counters");
    }

    #[test]
    fn names_cmdlines_and_args() {
        assert_eq!(
            (node_name(0), node_name(1)),
            ("a".to_string(), "b".to_string())
        );
        let c = node_cmdline("b", "192.168.100.2", &peers(1, 3));
        assert!(c.contains("mode=node ") && c.contains("mig_ip=192.168.100.2/24"));
        assert!(c.ends_with(" peers=a@192.168.100.1,c@192.168.100.3"), "{c}");
        assert!(!c.contains("key"), "{c}");
        assert!(!node_cmdline("a", "192.168.100.1", &peers(0, 1)).contains("peers"));
        let images = Boot {
            images: Images {
                hypervisor: "/h".into(),
                guest_kernel: "/g".into(),
            },
            accel: Accel::Tcg,
            modules: vec!["/lk".into(), "/li".into()],
        };
        let stores = node_stores(Path::new("/s"), "a");
        let a = qemu_args(&images, 0, 2, 5000, Path::new("/l"), &stores);
        let joined = a.join(" ");
        assert!(
            joined.contains("hostfwd=tcp:127.0.0.1:5000-10.0.2.15:7000"),
            "{joined}"
        );
        assert!(
            joined.contains(
                "-netdev stream,id=mig,server=off,addr.type=unix,addr.path=link-a.sock \
                 -device virtio-net-pci,netdev=mig,mac=52:54:00:00:01:01"
            ),
            "{joined}"
        );
        assert!(
            joined.contains("store=local:a:/s/stores/a store=shared:shared:/s/stores/shared"),
            "{joined}"
        );
        assert!(joined.contains(
            "-fsdev local,id=st0,path=/s/stores/a,security_model=none -device virtio-9p-pci,fsdev=st0,mount_tag=a"
        ));
        assert!(joined.contains(
            "path=/s/stores/shared,security_model=none -device virtio-9p-pci,fsdev=st1,mount_tag=shared"
        ));
        let c = qemu_args(&images, 2, 3, 5002, Path::new("/l"), &[]).join(" ");
        assert!(c.contains("addr.path=link-c.sock"), "{c}");
        assert!(c.contains("mac=52:54:00:00:01:03"), "{c}");
        assert!(c.contains("mig_ip=192.168.100.3/24"), "{c}");
        assert!(c.contains("peers=a@192.168.100.1,b@192.168.100.2"), "{c}");
        assert!(!c.contains("dgram") && !c.contains("0.0.0.0") && !c.contains("socket,"));
        assert!(joined.starts_with("-accel tcg -cpu qemu64,+svm,+npt,+rdrand -m 1024M"));
        // The Linux image follows the guest kernel as boot modules 1 and 2.
        assert!(joined.contains(" -initrd /g,/lk,/li "), "{joined}");
        // The key reaches the node as a fw_cfg file, never as an argument.
        assert!(
            joined
                .contains("-fw_cfg name=opt/hvmigrate/key,file=cluster.key -device virtio-rng-pci"),
            "{joined}"
        );
        assert!(!joined.contains("key="), "{joined}");
        let kvm = Boot {
            accel: Accel::Kvm,
            ..images.clone()
        };
        let k = qemu_args(&kvm, 0, 2, 5000, Path::new("/l"), &[]).join(" ");
        assert!(k.starts_with("-accel kvm -cpu host -m 1024M"), "{k}");
        // `cluster start --wrong-key` swaps the key and nothing else.
        let swapped = with_key(&a, "node-a.key");
        let changed: Vec<(&String, &String)> =
            a.iter().zip(&swapped).filter(|(x, y)| x != y).collect();
        assert_eq!(
            changed,
            [(
                &"name=opt/hvmigrate/key,file=cluster.key".to_string(),
                &"name=opt/hvmigrate/key,file=node-a.key".to_string()
            )]
        );
        assert_eq!(swapped.len(), a.len());
        assert_eq!(with_key(&swapped, KEY_FILE), a, "and back");
        // The relay forwards by the MACs QEMU is given.
        let ports = relay_ports(3);
        assert_eq!(ports[1].name, "b");
        assert_eq!(ports[1].mac, migration_mac(1));
        assert!(qemu_args(&images, 1, 2, 1, Path::new("/l"), &[])
            .join(" ")
            .contains("mac=52:54:00:00:01:02"));
    }

    #[test]
    fn zombies_and_strangers_are_not_nodes() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        assert!(alive(pid) && !is_qemu(pid));
        let dir = std::env::temp_dir().join(format!("hvm-cluster-kill-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let node = |pid| NodeState {
            name: "b".into(),
            pid,
            mgmt_port: 1,
            migration_ip: migration_ip(1),
            log: dir.join("node-b.log"),
            qemu_args: Vec::new(),
            own_key: None,
        };
        save(
            &dir,
            &ClusterState {
                key: "00".repeat(32),
                relay_pid: None,
                nodes: vec![node(pid)],
            },
        )
        .unwrap();
        // A pid that is not a QEMU is never signalled.
        let e = kill(&dir, "b").unwrap_err();
        assert!(e.contains("not running"), "{e}");
        assert!(alive(pid));
        assert!(kill(&dir, "z").unwrap_err().contains("no node"));
        // start refuses a running node, and one without recorded arguments.
        assert!(start(&dir, "b", false).unwrap_err().contains("is running"));
        child.kill().unwrap();
        // Killed but not yet reaped: a zombie, which counts as gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) {
            assert!(Instant::now() < deadline, "a zombie counts as alive");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(start(&dir, "b", false)
            .unwrap_err()
            .contains("no QEMU arguments"));
        child.wait().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_round_trip_and_target_resolution() {
        let dir = std::env::temp_dir().join(format!("hvm-cluster-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let s = ClusterState {
            key: "00".repeat(32),
            relay_pid: Some(7),
            nodes: vec![NodeState {
                name: "a".into(),
                pid: 0,
                mgmt_port: 4242,
                migration_ip: "192.168.100.1".into(),
                log: "/x".into(),
                qemu_args: vec!["-m".into(), "1024M".into()],
                own_key: None,
            }],
        };
        save(&dir, &s).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(state_file(&dir)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key file is private");
        // QEMU's key file: private from creation, replaced on the next up.
        let kf = dir.join(KEY_FILE);
        fs::write(&kf, "old").unwrap();
        fs::set_permissions(&kf, fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&kf, "00ff").unwrap();
        assert_eq!(fs::read_to_string(&kf).unwrap(), "00ff");
        let mode = fs::metadata(&kf).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "cluster.key is private");
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
                accel: Accel::Tcg,
                modules: Vec::new()
            },
            9
        )
        .unwrap_err()
        .contains("--nodes"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
