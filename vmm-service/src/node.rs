//! Node modes, chosen by the node command line (docs/DESIGN.md, "Node
//! command line"): `node` (with a cluster key, from the platform's fw_cfg
//! file or `key=`: the managed node serving the management API and running
//! the VMs created through it; without: a heartbeat VM for ever), `test`
//! (the guest test cases), `demo` (the dirty-rate display), `bench-exits`
//! (hypercall round trips against bare world switches) and `bench-dirty`
//! (the cost of dirty tracking, nested write protection against PML).
//!
//! Each mode returns the node's exit code; [`crate::run`] powers off with
//! it.

use crate::cases::{self, Case};
use crate::linux_cases;
use crate::mgmt::auth::ClusterKey;
use crate::mgmt::server::MgmtServer;
use crate::mgmt::service::{Managed, NodeIdentity};
use crate::sched::{ProgressLog, RunOutcome, Scheduler};
use crate::vm::{StopReason, Vm};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use hvcore::addr::PAGE_SIZE;
use hvcore::host::{DirtyMode, Host};

/// Demo: sample period and number of samples.
pub const DEMO_PERIOD_NS: u64 = 500_000_000;
pub const DEMO_SAMPLES: u32 = 10;
/// Demo: downtime limit of its live migration (tight enough that the busy
/// guest needs several passes).
pub const DEMO_DOWNTIME_LIMIT_NS: u64 = 100_000_000;
/// Bench: measuring window for hypercall round trips.
pub const BENCH_WINDOW_NS: u64 = 1_000_000_000;
/// Bench: warm-up before measuring.
pub const BENCH_WARMUP_NS: u64 = 100_000_000;
/// Managed node: VM time between two rounds of network service.
pub const SERVE_INTERVAL_NS: u64 = 10_000_000;
/// Default TCP port of the management API.
pub const DEFAULT_MGMT_PORT: u16 = 7000;
/// Default TCP port where a managed node accepts migrations.
pub const DEFAULT_MIG_PORT: u16 = 7100;
/// Most entries of `peers=`.
pub const PEERS_MAX: usize = 16;

/// Another node of the cluster, from `peers=NAME@A.B.C.D` (docs/DESIGN.md,
/// "Node command line"): where `vm-move --to NAME` connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    /// Its migration NIC's IPv4 address.
    pub addr: [u8; 4],
}

impl Peer {
    /// `NAME@A.B.C.D`, the name a valid VM-style node name (`[a-z0-9-]`,
    /// 1 to 32 characters).
    pub fn parse(s: &str) -> Option<Peer> {
        let (name, addr) = s.split_once('@')?;
        let name_ok = !name.is_empty()
            && name.len() <= crate::vm::NAME_MAX
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let addr = crate::mgmt::proto::parse_ipv4(addr)?;
        name_ok.then(|| Peer {
            name: name.into(),
            addr,
        })
    }
}

impl core::fmt::Display for Peer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [a, b, c, d] = self.addr;
        write!(f, "{}@{a}.{b}.{c}.{d}", self.name)
    }
}

/// The node's mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Node,
    Test,
    Demo,
    BenchExits,
    BenchDirty,
    Unsupported(String),
}

/// What the service reads from the node command line. Keys it does not
/// know belong to the platform and are ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: String,
    pub mode: Mode,
    /// `tests=` as given (`None` when absent).
    pub tests: Option<String>,
    /// The cluster key in hex (`None` when absent): the platform's
    /// (`Host::cluster_key`, QEMU's fw_cfg file, off the command line) when
    /// it has one, else `key=` (kept for tests; `ps` shows command lines).
    pub key: Option<String>,
    /// Where `key` came from, for messages.
    pub key_origin: &'static str,
    /// `mgmt_port=`: TCP port of the management API (`None` when invalid).
    pub mgmt_port: Option<u16>,
    /// `mgmt_ip=` and `mig_ip=` as given (the platform configures the NICs
    /// from them; the service only reports them).
    pub mgmt_ip: String,
    pub mig_ip: String,
    /// `mig_port=`: TCP port for migrations (`None` when invalid).
    pub mig_port: Option<u16>,
    /// `peers=`: the other nodes, in order, duplicates and the node itself
    /// left out.
    pub peers: Vec<Peer>,
    /// `peers=` entries that did not parse (warned about at start).
    pub bad_peers: Vec<String>,
}

impl NodeConfig {
    /// Parse space-separated `key=value` words.
    pub fn parse(cmdline: &str) -> Self {
        let mut cfg = NodeConfig {
            name: "a".into(),
            mode: Mode::Node,
            tests: None,
            key: None,
            key_origin: "key=",
            mgmt_port: Some(DEFAULT_MGMT_PORT),
            mgmt_ip: String::new(),
            mig_ip: String::new(),
            mig_port: Some(DEFAULT_MIG_PORT),
            peers: Vec::new(),
            bad_peers: Vec::new(),
        };
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "name" => cfg.name = value.into(),
                "mode" => {
                    cfg.mode = match value {
                        "node" => Mode::Node,
                        "test" => Mode::Test,
                        "demo" => Mode::Demo,
                        "bench-exits" => Mode::BenchExits,
                        "bench-dirty" => Mode::BenchDirty,
                        other => Mode::Unsupported(other.into()),
                    }
                }
                "tests" => cfg.tests = Some(value.into()),
                "key" => cfg.key = Some(value.into()),
                "mgmt_port" => cfg.mgmt_port = value.parse().ok().filter(|p| *p != 0),
                "mgmt_ip" => cfg.mgmt_ip = value.into(),
                "mig_ip" => cfg.mig_ip = value.into(),
                "mig_port" => cfg.mig_port = value.parse().ok().filter(|p| *p != 0),
                "peers" => {
                    for entry in value.split(',').filter(|e| !e.is_empty()) {
                        match Peer::parse(entry) {
                            Some(p) if cfg.peers.len() < PEERS_MAX => {
                                if !cfg.peers.iter().any(|q| q.name == p.name) {
                                    cfg.peers.push(p);
                                }
                            }
                            _ => cfg.bad_peers.push(entry.chars().take(64).collect()),
                        }
                    }
                }
                _ => {}
            }
        }
        let own = cfg.name.clone();
        cfg.peers.retain(|p| p.name != own);
        cfg
    }
}

/// The node's configuration: its command line's, with the platform's
/// cluster key (QEMU's fw_cfg file, which `ps` does not show) in place of
/// `key=` when the platform has one.
pub fn node_config(host: &dyn Host) -> NodeConfig {
    let mut cfg = NodeConfig::parse(host.cmdline());
    if let Some(key) = host.cluster_key() {
        cfg.key = Some(key.into());
        cfg.key_origin = "the fw_cfg cluster key (opt/hvmigrate/key)";
    }
    cfg
}

/// Run the mode the command line asks for; returns the exit code.
pub fn main(host: &mut dyn Host) -> u8 {
    let cfg = node_config(host);
    if let Mode::Unsupported(m) = &cfg.mode {
        let line =
            format!("vmm-service: unknown mode={m} (expected node, test, demo, bench-exits or bench-dirty)\n");
        host.console_write(&line);
        return 1;
    }
    let Some(image) = host.module(0).map(<[u8]>::to_vec) else {
        host.console_write(
            "vmm-service: no guest kernel: boot module 0 is missing (QEMU: -initrd guest-kernel; GRUB: module /boot/guest-kernel)\n",
        );
        return 1;
    };
    match cfg.mode {
        Mode::Node if cfg.key.is_some() => managed_mode(host, image, &cfg, None),
        Mode::Node => node_mode(host, &image),
        Mode::Test => test_mode(host, &image, cfg.tests.as_deref()),
        Mode::Demo => demo_mode(host, &image),
        Mode::BenchExits => bench_exits_mode(host, &image),
        Mode::BenchDirty => bench_dirty_mode(host, &image),
        Mode::Unsupported(_) => 1,
    }
}

/// Create and start one VM, or print why not.
fn start_vm(
    host: &mut dyn Host,
    name: &str,
    ram_mib: u64,
    image: &[u8],
    cmdline: &str,
) -> Option<Vm> {
    match Vm::create(host, name, ram_mib << 20, image, cmdline) {
        Ok(mut vm) => {
            vm.start();
            Some(vm)
        }
        Err(e) => {
            host.console_write(&format!("vmm-service: cannot create VM {name}: {e}\n"));
            None
        }
    }
}

/// `mode=node`: VM `vm0` with the heartbeat guest, for ever. Returns only if
/// the VM stops.
fn node_mode(host: &mut dyn Host, image: &[u8]) -> u8 {
    let Some(vm) = start_vm(host, "vm0", 64, image, "case=heartbeat") else {
        return 1;
    };
    let mut vms = [vm];
    Scheduler::default().run(host, &mut vms, None, &mut ProgressLog::default());
    host.console_write("vmm-service: no VM left running\n");
    1
}

/// `mode=node` with a cluster key: serve the management API and run the VMs
/// created through it, for ever (`rounds` bounds the loop for tests).
/// Returns 1 if the node cannot serve (bad key, no entropy source, no NIC).
fn managed_mode(host: &mut dyn Host, image: Vec<u8>, cfg: &NodeConfig, rounds: Option<u64>) -> u8 {
    let key = match ClusterKey::from_hex(cfg.key.as_deref().unwrap_or("")) {
        Ok(k) => k,
        Err(e) => {
            host.console_write(&format!("vmm-service: {}: {e}\n", cfg.key_origin));
            return 1;
        }
    };
    // Every handshake draws a nonce: without a real source they would be
    // guessable.
    if let Err(e) = host.entropy_sources() {
        host.console_write(&format!(
            "vmm-service: not serving the management API (its handshakes need unpredictable nonces): {e}\n"
        ));
        return 1;
    }
    let Some(port) = cfg.mgmt_port else {
        host.console_write("vmm-service: mgmt_port= must be a TCP port from 1 to 65535\n");
        return 1;
    };
    if host.net().is_none() {
        host.console_write(
            "vmm-service: the management API needs a NIC (QEMU: -device virtio-net-pci,netdev=...) and mgmt_ip=; none is configured\n",
        );
        return 1;
    }
    for bad in &cfg.bad_peers {
        host.console_write(&format!(
            "vmm-service: peers=: ignoring '{bad}' (expected NAME@A.B.C.D)\n"
        ));
    }
    let identity = NodeIdentity {
        name: cfg.name.clone(),
        mgmt_addr: cfg.mgmt_ip.clone(),
        migration_addr: cfg.mig_ip.clone(),
        peers: cfg.peers.clone(),
    };
    let mig_port = cfg.mig_port.unwrap_or(DEFAULT_MIG_PORT);
    let cmdline = String::from(host.cmdline());
    let stores = crate::store::Stores::boot(host, &cmdline, &cfg.name);
    let mut node = Managed::new(host, identity, image, key.clone(), mig_port);
    node.set_stores(stores);
    let mut server = MgmtServer::new(key, port);
    host.console_write(&format!(
        "vmm-service: management API listening on port {port} (protocol {})\n",
        crate::mgmt::proto::PROTOCOL_VERSION
    ));
    let mut round = 0u64;
    while rounds.is_none_or(|r| round < r) {
        round += 1;
        server.poll(host, &mut node);
        node.drive_jobs(host);
        // While VMs move, guests get shorter turns so the links (and the
        // engines) are serviced often.
        let turn = if node.is_migrating() {
            crate::migrate::GUEST_SLICE_NS
        } else {
            SERVE_INTERVAL_NS
        };
        let deadline = host.now_ns().saturating_add(turn);
        if !node.run_vms(host, deadline) && !node.has_bench_work() {
            host.idle();
        }
    }
    0
}

/// `mode=test`: run the cases named by `tests` (all when absent, empty or
/// `all`), in the order given.
fn test_mode(host: &mut dyn Host, image: &[u8], tests: Option<&str>) -> u8 {
    let names: Vec<&str> = match tests {
        None | Some("all" | "") => Case::ALL.iter().map(|c| c.name()).collect(),
        Some(list) => list.split(',').filter(|s| !s.is_empty()).collect(),
    };
    let (mut passed, mut failed) = (0u32, 0u32);
    for name in names {
        let result = match Case::from_name(name) {
            Some(case) => cases::run_case(host, image, case),
            None if linux_cases::CASES.contains(&name) => linux_case(host, name),
            None => Err("unknown case".into()),
        };
        let line = match result {
            Ok(()) => {
                passed += 1;
                format!("case {name}: ok\n")
            }
            Err(reason) => {
                failed += 1;
                format!("case {name}: FAILED: {reason}\n")
            }
        };
        host.console_write(&line);
    }
    host.console_write(&format!("{passed} passed, {failed} failed\n"));
    u8::from(failed != 0)
}

/// A Linux case, with the kernel and initramfs from boot modules 1 and 2.
fn linux_case(host: &mut dyn Host, name: &str) -> Result<(), String> {
    let (Some(kernel), Some(initrd)) = (host.module(1), host.module(2)) else {
        return Err(
            "the Linux cases need the kernel and initramfs as boot modules 1 and 2 (qemu-runner guest-test passes them)"
                .into(),
        );
    };
    let (kernel, initrd) = (kernel.to_vec(), initrd.to_vec());
    linux_cases::run(host, name, &kernel, &initrd)
}

/// `mode=demo`: watch the dirty rate of a guest rewriting a 16 MiB buffer.
fn demo_mode(host: &mut dyn Host, image: &[u8]) -> u8 {
    let Some(vm) = start_vm(host, "demo", 64, image, "case=dirty-demo") else {
        return 1;
    };
    let mut vms = [vm];
    host.console_write(
        "demo: VM demo rewrites a 16 MiB buffer in a loop; every 500 ms the hypervisor collects and clears its dirty log \
         (nested-page write protection). pages_per_s = distinct 4 KiB pages written per second, which live migration \
         would have to copy again; mib_per_s = the same in MiB/s; exits = VM exits in the interval\n",
    );
    if let Err(e) = vms[0].partition().enable_dirty_log(DirtyMode::WriteProtect) {
        host.console_write(&format!("demo: cannot enable dirty logging: {e}\n"));
        vms[0].stop(host, StopReason::Requested);
        return 1;
    }
    let pages = vms[0].partition().ram_bytes() / PAGE_SIZE;
    let mut bitmap = vec![0u64; pages.div_ceil(64) as usize];
    let mut sched = Scheduler::default();
    let mut progress = ProgressLog::default();
    let start = host.now_ns();
    let mut last_ns = start;
    let mut last_exits = vms[0].partition().stats().exits;
    for sample in 1..=DEMO_SAMPLES {
        let due = start + u64::from(sample) * DEMO_PERIOD_NS;
        if sched.run(host, &mut vms, Some(due), &mut progress) == RunOutcome::AllStopped {
            host.console_write("demo: the demo VM stopped early\n");
            return 1;
        }
        bitmap.iter_mut().for_each(|w| *w = 0);
        let dirty = match vms[0].partition().collect_dirty(&mut bitmap) {
            Ok(n) => n,
            Err(e) => {
                host.console_write(&format!("demo: collecting the dirty log failed: {e}\n"));
                vms[0].stop(host, StopReason::Requested);
                return 1;
            }
        };
        let now = host.now_ns();
        let exits = vms[0].partition().stats().exits;
        let interval_ns = now.saturating_sub(last_ns).max(1);
        let pages_per_s = per_second(dirty, interval_ns);
        let mib_per_s = per_second(dirty * PAGE_SIZE, interval_ns) >> 20;
        host.console_write(&format!(
            "dirty-rate: t_ms={} pages_per_s={pages_per_s} mib_per_s={mib_per_s} exits={}\n",
            (now - start) / 1_000_000,
            exits - last_exits
        ));
        last_ns = now;
        last_exits = exits;
    }
    vms[0].partition().disable_dirty_log();
    let [vm] = vms;
    demo_migrate(host, vm)
}

/// The demo's second act: live-migrate the busy demo VM within the node
/// (it keeps dirtying its buffer throughout), print the report, and show
/// the VM running at the destination.
fn demo_migrate(host: &mut dyn Host, vm: Vm) -> u8 {
    host.console_write(
        "demo: live-migrating VM demo to a new VM on this node while it keeps rewriting its buffer \
         (pre-copy passes over write-protected nested page tables, throttling if it does not converge, \
         then pause, last pages, vCPU and device state, resume at the destination)\n",
    );
    let policy = migration::Policy {
        downtime_limit_ns: DEMO_DOWNTIME_LIMIT_NS,
        ..migration::Policy::default()
    };
    let out = crate::migrate::migrate_local(host, vm, policy, crate::migrate::Faults::default());
    let mut vm = out.vm;
    let completed = out.report.result == migration::MigrationResult::Completed;
    let exits = vm.counters().exits;
    let end = host.now_ns().saturating_add(DEMO_PERIOD_NS);
    crate::migrate::run_until(host, &mut vm, end, |_| false);
    let ran = vm.counters().exits > exits && vm.stop_reason().is_none();
    host.console_write(&format!(
        "demo: after the migration VM demo {} ({} exits in {} ms)\n",
        if ran {
            "runs at the destination"
        } else {
            "did not run on"
        },
        vm.counters().exits - exits,
        DEMO_PERIOD_NS / 1_000_000
    ));
    vm.stop(host, StopReason::Requested);
    u8::from(!(completed && ran))
}

/// `mode=bench-exits`: hypercall round trips per second against bare world
/// switches.
fn bench_exits_mode(host: &mut dyn Host, image: &[u8]) -> u8 {
    let Some(vm) = start_vm(host, "bench", 64, image, "case=bench-hypercall") else {
        return 1;
    };
    let mut vms = [vm];
    let mut sched = Scheduler::default();
    let mut progress = ProgressLog::default();
    let warm_end = host.now_ns() + BENCH_WARMUP_NS;
    sched.run(host, &mut vms, Some(warm_end), &mut progress);
    let h0 = vms[0].counters().hypercalls;
    let t0 = host.now_ns();
    let outcome = sched.run(host, &mut vms, Some(t0 + BENCH_WINDOW_NS), &mut progress);
    let t1 = host.now_ns();
    let calls = vms[0].counters().hypercalls - h0;
    if outcome == RunOutcome::AllStopped || calls == 0 {
        host.console_write("bench exits: the bench VM made no hypercalls\n");
        return 1;
    }
    vms[0].stop(host, StopReason::Requested);
    let hc_per_s = per_second(calls, (t1 - t0).max(1));
    let raw_ns = match host.bench_raw_roundtrips(calls) {
        Ok(ns) => ns.max(1),
        Err(e) => {
            host.console_write(&format!(
                "bench exits: raw world-switch benchmark failed: {e}\n"
            ));
            return 1;
        }
    };
    let raw_per_s = per_second(calls, raw_ns).max(1);
    let ratio_pct = u128::from(hc_per_s) * 100 / u128::from(raw_per_s);
    host.console_write(&format!(
        "bench exits: hypercall_roundtrips_per_s={hc_per_s} raw_roundtrips_per_s={raw_per_s} ratio_pct={ratio_pct}\n"
    ));
    0
}

/// Bench dirty: measuring window per tracking mode (node time).
pub const BENCH_DIRTY_WINDOW_NS: u64 = 2_000_000_000;
/// Bench dirty: dirty-log collection period (a pre-copy round).
pub const BENCH_DIRTY_ROUND_NS: u64 = 250_000_000;
/// Bench dirty: how often the guest's pass counter is sampled. A pass
/// takes far longer than this even untracked (4096 page writes), so the
/// one-byte counter cannot wrap between samples.
const BENCH_DIRTY_SAMPLE_NS: u64 = 4_000_000;

/// What one tracking mode cost the `dirty-demo` guest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct DirtyPhase {
    /// Passes over the 16 MiB buffer (4096 page writes each).
    passes: u64,
    ns: u64,
    exits: u64,
    /// Frames collected dirty, summed over the rounds.
    dirtied: u64,
    rounds: u64,
    /// The last complete round's dirty bitmap.
    last_round: Vec<u64>,
    /// Increments of the buffer's first byte during that round: from 2 on,
    /// the guest wrote every page of its buffer within the round.
    last_round_passes: u64,
}

/// The buffer GPA from the guest's `dirty-demo: ... at GPA 0x...` line.
fn demo_buffer_gpa(vm: &Vm) -> Option<u64> {
    vm.recent_lines().find_map(|l| {
        let rest = l.strip_prefix("dirty-demo:")?;
        let hex = rest.split("at GPA 0x").nth(1)?;
        let end = hex
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(hex.len());
        u64::from_str_radix(&hex[..end], 16).ok()
    })
}

/// Run the demo guest for [`BENCH_DIRTY_WINDOW_NS`] in `mode` (`None`:
/// untracked), counting its passes from the first byte of its buffer (it
/// increments one byte per page per pass) and collecting every round.
fn bench_dirty_phase(
    host: &mut dyn Host,
    vms: &mut [Vm; 1],
    buffer_gpa: u64,
    mode: Option<DirtyMode>,
) -> Result<DirtyPhase, String> {
    let mut sched = Scheduler::default();
    let mut progress = ProgressLog::default();
    let read_counter = |vm: &mut Vm| -> Result<u8, String> {
        let mut b = [0u8];
        vm.partition()
            .memory()
            .read(hvcore::addr::Gpa(buffer_gpa), &mut b)
            .map_err(|e| format!("reading the guest's buffer: {e}"))?;
        Ok(b[0])
    };
    if let Some(m) = mode {
        vms[0]
            .partition()
            .enable_dirty_log(m)
            .map_err(|e| format!("enabling dirty logging: {e}"))?;
    }
    let words = (vms[0].partition().ram_bytes() / PAGE_SIZE).div_ceil(64) as usize;
    let mut bitmap = vec![0u64; words];
    let mut phase = DirtyPhase::default();
    let exits0 = vms[0].partition().stats().exits;
    let t0 = host.now_ns();
    let end = t0 + BENCH_DIRTY_WINDOW_NS;
    let mut next_round = t0 + BENCH_DIRTY_ROUND_NS;
    let mut counter = read_counter(&mut vms[0])?;
    let mut counter_at_round = counter;
    loop {
        let now = host.now_ns();
        if now >= end {
            break;
        }
        let due = (now + BENCH_DIRTY_SAMPLE_NS).min(next_round).min(end);
        if sched.run(host, vms, Some(due), &mut progress) == RunOutcome::AllStopped {
            return Err("the demo VM stopped".into());
        }
        let c = read_counter(&mut vms[0])?;
        phase.passes += u64::from(c.wrapping_sub(counter));
        counter = c;
        if host.now_ns() >= next_round {
            next_round += BENCH_DIRTY_ROUND_NS;
            if mode.is_some() {
                bitmap.fill(0);
                phase.dirtied += vms[0]
                    .partition()
                    .collect_dirty(&mut bitmap)
                    .map_err(|e| format!("collecting the dirty log: {e}"))?;
                phase.rounds += 1;
                phase.last_round_passes = u64::from(c.wrapping_sub(counter_at_round));
                counter_at_round = c;
            }
        }
    }
    phase.ns = host.now_ns() - t0;
    phase.exits = vms[0].partition().stats().exits - exits0;
    if mode.is_some() {
        vms[0].partition().disable_dirty_log();
    }
    phase.last_round = bitmap;
    Ok(phase)
}

/// `mode=bench-dirty`: the cost of tracking a guest that rewrites a 16 MiB
/// buffer (one byte per page, as fast as it can), untracked, with nested
/// write protection and with PML (when the CPU has it), one after the
/// other in one run; then whether the two trackers saw the same pages in
/// their last full round.
fn bench_dirty_mode(host: &mut dyn Host, image: &[u8]) -> u8 {
    let Some(vm) = start_vm(host, "bench", 64, image, "case=dirty-demo") else {
        return 1;
    };
    let mut vms = [vm];
    let mut sched = Scheduler::default();
    let mut progress = ProgressLog::default();
    // Warm up until the guest has said where its buffer is.
    let give_up = host.now_ns() + 100 * BENCH_WARMUP_NS;
    let gpa = loop {
        if let Some(gpa) = demo_buffer_gpa(&vms[0]) {
            break gpa;
        }
        let due = host.now_ns() + BENCH_WARMUP_NS;
        if due > give_up
            || sched.run(host, &mut vms, Some(due), &mut progress) == RunOutcome::AllStopped
        {
            host.console_write("bench dirty: the demo guest never announced its buffer\n");
            return 1;
        }
    };
    let pml = vms[0].partition().vcpu().caps().pml;
    let mut phases: Vec<(&str, DirtyPhase)> = Vec::new();
    for (name, mode) in [
        ("none", None),
        ("write-protect", Some(DirtyMode::WriteProtect)),
        ("pml", Some(DirtyMode::Pml)),
    ] {
        if mode == Some(DirtyMode::Pml) && !pml {
            host.console_write("bench dirty: mode=pml unavailable (this CPU has no PML)\n");
            continue;
        }
        match bench_dirty_phase(host, &mut vms, gpa, mode) {
            Ok(p) => phases.push((name, p)),
            Err(e) => {
                host.console_write(&format!("bench dirty: mode={name}: FAILED: {e}\n"));
                vms[0].stop(host, StopReason::Requested);
                return 1;
            }
        }
    }
    vms[0].stop(host, StopReason::Requested);
    let base = phases
        .first()
        .map_or(1, |(_, p)| per_second(p.passes, p.ns).max(1));
    for (name, p) in &phases {
        let passes_per_s = per_second(p.passes, p.ns);
        let pages_per_s = per_second(p.passes * (16 << 20) / PAGE_SIZE, p.ns);
        // Exits per dirtied page, in hundredths.
        let epp = if p.dirtied == 0 {
            String::from("-")
        } else {
            let x = u128::from(p.exits) * 100 / u128::from(p.dirtied);
            format!("{}.{:02}", x / 100, x % 100)
        };
        host.console_write(&format!(
            "bench dirty: mode={name} passes_per_s={passes_per_s} page_writes_per_s={pages_per_s} \
             mib_per_s={} rounds={} dirtied_pages={} exits={} exits_per_dirtied_page={epp} \
             throughput_retained_pct={}\n",
            (pages_per_s * PAGE_SIZE) >> 20,
            p.rounds,
            p.dirtied,
            p.exits,
            u128::from(passes_per_s) * 100 / u128::from(base)
        ));
    }
    let wp = phases.iter().find(|(n, _)| *n == "write-protect");
    let pm = phases.iter().find(|(n, _)| *n == "pml");
    if let (Some((_, wp)), Some((_, pm))) = (wp, pm) {
        let mut only_wp = Vec::new();
        let mut only_pml = Vec::new();
        for (i, (a, b)) in wp.last_round.iter().zip(&pm.last_round).enumerate() {
            for bit in 0..64 {
                let gfn = i as u64 * 64 + bit;
                match ((a >> bit) & 1, (b >> bit) & 1) {
                    (1, 0) => only_wp.push(gfn),
                    (0, 1) => only_pml.push(gfn),
                    _ => {}
                }
            }
        }
        let count = |v: &[u64]| v.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        host.console_write(&format!(
            "bench dirty: last round: write-protect {} frames, pml {} frames, only write-protect {:x?}, only pml {:x?}\n",
            count(&wp.last_round),
            count(&pm.last_round),
            &only_wp[..only_wp.len().min(8)],
            &only_pml[..only_pml.len().min(8)]
        ));
    }
    // Each tracker against what the guest certainly wrote: every page of
    // its buffer, in a round that held a whole pass. Frames outside the
    // buffer (its stack, its page tables, which PML also reports for the
    // MMU's accessed/dirty updates) may differ between trackers; a buffer
    // page one tracker missed is a failure.
    let buffer_pages = (16u64 << 20) / PAGE_SIZE;
    let mut failed = false;
    for (name, p) in phases.iter().filter(|(n, _)| *n != "none") {
        if p.last_round_passes < 2 {
            host.console_write(&format!(
                "bench dirty: mode={name}: last round held no whole pass ({} buffer passes), not checked\n",
                p.last_round_passes
            ));
            continue;
        }
        let missed = crate::hypercall::missed_frames(&p.last_round, gpa / PAGE_SIZE, buffer_pages);
        if missed.count > 0 {
            failed = true;
            host.console_write(&format!(
                "bench dirty: mode={name}: FAILED: the tracker missed {} of the {buffer_pages} pages the guest wrote in its last round (first {:x?})\n",
                missed.count, missed.first
            ));
        } else {
            host.console_write(&format!(
                "bench dirty: mode={name}: all {buffer_pages} pages the guest wrote were reported\n"
            ));
        }
    }
    u8::from(failed)
}

/// `count` events over `ns` nanoseconds, per second.
fn per_second(count: u64, ns: u64) -> u64 {
    let r = u128::from(count) * 1_000_000_000 / u128::from(ns.max(1));
    u64::try_from(r).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{printer, FakeHost, FakeMemory, FakeVcpu, Program};
    use alloc::boxed::Box;
    use alloc::string::ToString;
    use hvcore::abi::{HC_NOP, HC_TEST_RESULT};
    use hvcore::addr::Gpa;
    use hvcore::vcpu::VmExit;

    #[test]
    fn cmdline_parsing() {
        let c = NodeConfig::parse("name=b log=debug mode=test tests=hello,cpuid junk");
        assert_eq!(
            c,
            NodeConfig {
                name: "b".into(),
                mode: Mode::Test,
                tests: Some("hello,cpuid".into()),
                ..NodeConfig::parse("")
            }
        );
        let c = NodeConfig::parse("key=00ff mgmt_port=7002 mgmt_ip=10.0.2.15/24 mig_ip=x");
        assert_eq!(c.key.as_deref(), Some("00ff"));
        assert_eq!(c.mgmt_port, Some(7002));
        assert_eq!(
            (c.mgmt_ip.as_str(), c.mig_ip.as_str()),
            ("10.0.2.15/24", "x")
        );
        assert_eq!(NodeConfig::parse("mgmt_port=0").mgmt_port, None);
        assert_eq!(NodeConfig::parse("mgmt_port=70000").mgmt_port, None);
        assert_eq!(NodeConfig::parse("").mgmt_port, Some(DEFAULT_MGMT_PORT));
        assert_eq!(NodeConfig::parse("").mode, Mode::Node);
        assert_eq!(NodeConfig::parse("").mig_port, Some(DEFAULT_MIG_PORT));
        assert_eq!(NodeConfig::parse("mig_port=7200").mig_port, Some(7200));
        assert_eq!(NodeConfig::parse("mig_port=0").mig_port, None);
        let c = NodeConfig::parse(
            "name=a peers=b@192.168.100.2,a@192.168.100.1,,c@192.168.100.3,B@1.2.3.4,d@1.2.3,b@9.9.9.9",
        );
        let shown: Vec<String> = c.peers.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["b@192.168.100.2", "c@192.168.100.3"]);
        assert_eq!(c.bad_peers, ["B@1.2.3.4", "d@1.2.3"]);
        assert_eq!(NodeConfig::parse("mode=bench-exits").mode, Mode::BenchExits);
        assert_eq!(NodeConfig::parse("mode=bench-dirty").mode, Mode::BenchDirty);
        assert_eq!(
            NodeConfig::parse("mode=x").mode,
            Mode::Unsupported("x".into())
        );
    }

    fn host(cmdline: &str, programs: Vec<Program>) -> FakeHost {
        let mut h = FakeHost::new();
        h.cmdline = cmdline.into();
        h.ns_per_run = 100_000;
        h.programs.extend(programs);
        h
    }

    #[test]
    fn test_mode_reports_each_case_and_a_summary() {
        let triple: Program = Box::new(|_: &mut FakeVcpu, _: &mut FakeMemory| VmExit::Shutdown);
        let mut h = host(
            "mode=test tests=hello,nope,triple-fault,,memory",
            vec![
                printer("Hello from the hvmigrate guest\n"),
                triple,
                printer(""),
            ],
        );
        assert_eq!(main(&mut h), 1);
        let lines = h.lines();
        assert!(lines.contains(&"case hello: ok"));
        assert!(lines.contains(&"case nope: FAILED: unknown case"));
        assert!(lines.contains(&"case triple-fault: ok"));
        assert!(lines.contains(&"case memory: ok"));
        assert_eq!(*lines.last().unwrap(), "3 passed, 1 failed");
        assert_eq!(h.dropped.get(), 3);

        let mut h = host("mode=test tests=memory", vec![printer("")]);
        assert_eq!(main(&mut h), 0);
        assert_eq!(h.lines().last(), Some(&"1 passed, 0 failed"));
    }

    #[test]
    fn all_cases_run_in_order() {
        let mut h = host("mode=test tests=", vec![]);
        h.ns_per_run = 1_000_000_000; // every case times out fast
        assert_eq!(main(&mut h), 1);
        let results: Vec<&str> = h
            .lines()
            .into_iter()
            .filter(|l| l.starts_with("case "))
            .collect();
        let names: Vec<String> = Case::ALL
            .iter()
            .map(|c| format!("case {}: FAILED: timeout", c.name()))
            .collect();
        assert_eq!(results, names);
        let summary = format!("0 passed, {} failed", Case::ALL.len());
        assert_eq!(h.lines().last(), Some(&summary.as_str()));
    }

    #[test]
    fn missing_module_and_bad_mode() {
        let mut h = host("mode=test", vec![]);
        h.module = None;
        assert_eq!(main(&mut h), 1);
        assert!(h.console.contains("boot module 0 is missing"));
        let mut h = host("mode=fly", vec![]);
        assert_eq!(main(&mut h), 1);
        assert!(h.console.contains("unknown mode=fly"));
    }

    #[test]
    fn managed_mode_needs_a_key_and_a_nic_then_serves() {
        let key = "key=00112233445566778899aabbccddeeff";
        let mut h = host(&format!("mode=node {key}"), vec![]);
        assert_eq!(main(&mut h), 1, "no NIC");
        assert!(h.console.contains("needs a NIC"));
        let mut h = host("mode=node key=0011", vec![]);
        h.net = Some(crate::testing::FakeNet::new());
        assert_eq!(main(&mut h), 1);
        assert!(h.console.contains("key=: the cluster key has 2 bytes"));
        let mut h = host(&format!("mode=node {key} mgmt_port=7001"), vec![]);
        h.net = Some(crate::testing::FakeNet::new());
        let cfg = NodeConfig::parse(&h.cmdline.clone());
        let image = h.module.clone().unwrap();
        assert_eq!(managed_mode(&mut h, image, &cfg, Some(5)), 0);
        assert!(h.console.contains("management API listening on port 7001"));
        let net = h.net.as_mut().unwrap();
        assert!(net.peer_connect(7001).is_some(), "a listener is up");
        assert_eq!(h.idles, 5, "idle without VMs");
    }

    #[test]
    fn managed_mode_takes_the_platform_key_and_needs_entropy() {
        let key = "00112233445566778899aabbccddeeff";
        // The platform's key (fw_cfg) wins over `key=` and makes a managed
        // node of plain `mode=node`.
        let mut h = host("mode=node mgmt_port=7001", vec![]);
        h.cluster_key = Some(key.into());
        let cfg = node_config(&h);
        assert_eq!(cfg.key.as_deref(), Some(key));
        h.cmdline = "mode=node key=ffff".into();
        assert_eq!(node_config(&h).key.as_deref(), Some(key));
        h.cluster_key = None;
        assert_eq!(node_config(&h).key.as_deref(), Some("ffff"));
        // A bad platform key is named as such.
        let mut h = host("mode=node", vec![]);
        h.cluster_key = Some("0011".into());
        h.net = Some(crate::testing::FakeNet::new());
        assert_eq!(main(&mut h), 1);
        assert!(
            h.console.contains(
                "the fw_cfg cluster key (opt/hvmigrate/key): the cluster key has 2 bytes"
            ),
            "{}",
            h.console
        );
        // No entropy source: refused before anything listens.
        let mut h = host("mode=node mgmt_port=7001", vec![]);
        h.cluster_key = Some(key.into());
        h.net = Some(crate::testing::FakeNet::new());
        h.entropy_sources = Err(hvcore::entropy::EntropyError::NoSource);
        assert_eq!(main(&mut h), 1);
        assert!(
            h.console.contains(
                "not serving the management API (its handshakes need unpredictable nonces): no entropy source"
            ),
            "{}",
            h.console
        );
        assert!(h.net.as_mut().unwrap().peer_connect(7001).is_none());
        // With one, the same node serves.
        h.entropy_sources = Ok(hvcore::entropy::Sources::new(&["virtio-rng"]));
        h.console.clear();
        let image = h.module.clone().unwrap();
        assert_eq!(managed_mode(&mut h, image, &cfg, Some(2)), 0);
        assert!(h.console.contains("management API listening on port 7001"));
    }

    #[test]
    fn node_mode_runs_until_the_vm_stops() {
        let mut h = host("", vec![printer("heartbeat 1\n")]);
        assert_eq!(main(&mut h), 1);
        assert_eq!(
            h.lines(),
            [
                "[vm0] heartbeat 1",
                "vm vm0 stopped: guest reported ok",
                "vmm-service: no VM left running"
            ]
        );
    }

    #[test]
    fn demo_prints_ten_samples() {
        // The guest writes 100 pages per run; 1 ms per run.
        let mut page = 0u64;
        let prog: Program = Box::new(move |_: &mut FakeVcpu, m: &mut FakeMemory| {
            for _ in 0..100 {
                m.guest_write(Gpa(0x100_0000 + (page % 4096) * 4096), &[1]);
                page += 1;
            }
            VmExit::ExternalInterrupt
        });
        let mut h = host("mode=demo", vec![prog]);
        h.ns_per_run = 1_000_000;
        assert_eq!(main(&mut h), 0);
        let samples: Vec<&str> = h
            .lines()
            .into_iter()
            .filter(|l| l.starts_with("dirty-rate:"))
            .collect();
        assert_eq!(samples.len(), DEMO_SAMPLES as usize);
        // 500 runs of 100 pages over a 4096-page buffer: all 4096 dirty.
        assert_eq!(
            samples[0],
            "dirty-rate: t_ms=500 pages_per_s=8192 mib_per_s=32 exits=500"
        );
        assert!(samples[9].starts_with("dirty-rate: t_ms=5000 "));
        assert!(h.lines()[0].starts_with("demo: "));
        assert_eq!(
            h.lines().last(),
            Some(&"vm demo stopped: stopped by the service")
        );
        // Then the live migration of the busy VM, and the VM runs on.
        let report = h
            .lines()
            .into_iter()
            .find(|l| l.starts_with("migration-report {"))
            .expect("a migration report");
        assert!(report.contains("\"result\":\"completed\""), "{report}");
        assert!(h
            .console
            .contains("demo: after the migration VM demo runs at the destination"));
    }

    /// The `dirty-demo` guest: announces its 16 MiB buffer, then each run
    /// increments the byte of the next 256 pages. A write to page `lose`
    /// escapes the dirty log (a tracker that misses it).
    fn dirty_demo(lose: Option<u64>) -> Program {
        let line = b"dirty-demo: incrementing one byte in each of 4096 pages (16 MiB at GPA 0x1000000..0x2000000)\n";
        let mut said = 0;
        let mut page = 0u64;
        Box::new(move |v: &mut FakeVcpu, m: &mut FakeMemory| {
            use hvcore::mem::GuestMemory;
            use hvcore::vcpu::{IoAccess, IoDir};
            if let Some(&b) = line.get(said) {
                said += 1;
                v.regs.rax = u64::from(b);
                return VmExit::Io(IoAccess {
                    port: 0x3f8,
                    size: 1,
                    dir: IoDir::Out,
                    string: false,
                    rep: false,
                });
            }
            for _ in 0..256 {
                let gpa = Gpa(0x100_0000 + page * 4096);
                let mut b = [0u8];
                m.read(gpa, &mut b).unwrap();
                b[0] = b[0].wrapping_add(1);
                if lose == Some(page) {
                    m.write_unlogged(gpa, &b);
                } else {
                    m.guest_write(gpa, &b);
                }
                page = (page + 1) % 4096;
            }
            VmExit::ExternalInterrupt
        })
    }

    /// `bench dirty` checks each tracker against the pages the guest
    /// certainly wrote (its whole buffer, in a round that held a full
    /// pass): a tracker that misses one fails the benchmark.
    #[test]
    fn bench_dirty_fails_when_a_tracker_misses_a_written_page() {
        for lose in [None, Some(77)] {
            let mut h = host("mode=bench-dirty", vec![dirty_demo(lose)]);
            h.ns_per_run = 1_000_000;
            h.caps.pml = true;
            let code = main(&mut h);
            let lines = h.lines();
            let has = |s: &str| lines.iter().any(|l| l.contains(s));
            assert!(has("bench dirty: mode=pml passes_per_s="), "{lines:?}");
            match lose {
                None => {
                    assert_eq!(code, 0, "{lines:?}");
                    assert!(has(
                        "bench dirty: mode=write-protect: all 4096 pages the guest wrote were reported"
                    ));
                    assert!(has("bench dirty: mode=pml: all 4096 pages"));
                }
                Some(_) => {
                    assert_eq!(code, 1, "{lines:?}");
                    assert!(has(
                        "bench dirty: mode=pml: FAILED: the tracker missed 1 of the 4096 pages the guest wrote in its last round (first [104d])"
                    ), "{lines:?}");
                }
            }
        }
    }

    #[test]
    fn bench_compares_hypercalls_with_raw_switches() {
        let mut i = 0u64;
        let prog: Program = Box::new(move |v: &mut FakeVcpu, _: &mut FakeMemory| {
            if i > 0 {
                assert_eq!(v.regs.rax, i + 1, "NOP returns RDI + 1");
            }
            i += 1;
            v.regs.rdi = i;
            v.regs.rax = HC_NOP;
            VmExit::Hypercall
        });
        let mut h = host("mode=bench-exits", vec![prog]);
        h.ns_per_run = 20_000; // 50k/s
        h.raw_ns_per_roundtrip = 16_000; // 62.5k/s
        assert_eq!(main(&mut h), 0);
        let line = h
            .lines()
            .into_iter()
            .find(|l| l.starts_with("bench exits:"))
            .unwrap()
            .to_string();
        assert!(
            line.starts_with("bench exits: hypercall_roundtrips_per_s="),
            "{line}"
        );
        let field = |k: &str| -> u64 {
            let v = line.split(' ').find_map(|w| w.strip_prefix(k)).unwrap();
            v.parse().unwrap()
        };
        let hc = field("hypercall_roundtrips_per_s=");
        let raw = field("raw_roundtrips_per_s=");
        assert!((49_000..=50_000).contains(&hc), "{hc}");
        assert_eq!(raw, 62_500);
        assert_eq!(field("ratio_pct="), hc * 100 / raw);
        // A guest that stops instead of benchmarking fails the mode.
        let stop: Program = Box::new(|v: &mut FakeVcpu, _: &mut FakeMemory| {
            v.regs.rax = HC_TEST_RESULT;
            (v.regs.rdi, v.regs.rdx) = (0, 0);
            VmExit::Hypercall
        });
        let mut h = host("mode=bench-exits", vec![stop]);
        assert_eq!(main(&mut h), 1);
    }
}
