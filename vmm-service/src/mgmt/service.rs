//! The managed node: the VM table, the job table and the request handlers
//! ([`Managed`]), and the management server that carries requests over the
//! node's TCP stack ([`MgmtServer`]).
//!
//! The server is polled by the node loop between VM time slices, in three
//! steps so that network access and request handling never hold the host at
//! once: (1) with the [`NetStack`]: poll, notice new connections, read at most
//! [`READ_CHUNK`] bytes per connection; (2) with the host: answer complete
//! requests; (3) with the [`NetStack`]: send queued replies, release finished
//! or dead connections. At most [`CONNECTIONS_MAX`] connections are served;
//! a listener is always kept open for the next one, so a client that went
//! away never blocks the API.
//!
//! VM semantics (docs/MANAGEMENT.md): create loads the guest kernel into a
//! new partition (state `created`); start runs it; stop stops it for good
//! (a stopped VM cannot run again: delete and create it); delete needs a VM
//! that is not running and returns its memory.

use super::auth::{fresh_nonce, ClusterKey, Entropy, ReplayGuard};
use super::conn::ServerConn;
use super::jobs::{JobError, JobTable};
use super::proto::{
    parse_ipv4, ApiError, Body, ErrorCode, JobKind, NodeInfo, Outcome, Request, VmInfo,
    CONSOLE_LINES_MAX, GUEST_MAX, PROTOCOL_VERSION,
};
use crate::sched::{ProgressLog, Scheduler};
use crate::vm::{StopReason, Vm, VmError, VmState};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use hvcore::host::{Host, HostError, NetStack, NicRole, SocketId, TcpState};
use hvcore::vcpu::Vendor;

/// Most VMs a node holds.
pub const VMS_MAX: usize = 16;
/// Largest VM memory accepted, in MiB (the host may have less).
pub const VM_MEMORY_MIB_MAX: u64 = 4096;
/// Smallest VM memory accepted, in MiB (the guest kernel needs this much).
pub const VM_MEMORY_MIB_MIN: u64 = 4;
/// Console lines returned when the request names no count.
pub const CONSOLE_LINES_DEFAULT: u32 = 20;
/// Guests the guest kernel runs (`case=` values; docs/DESIGN.md).
pub const GUESTS: [&str; 10] = [
    "heartbeat",
    "dirty-demo",
    "bench-hypercall",
    "hello",
    "cpuid",
    "memory",
    "dirty-log",
    "bad-msr",
    "triple-fault",
    "two-vms",
];
/// The guest of a VM created without one.
pub const DEFAULT_GUEST: &str = "heartbeat";
/// Most management connections served at once.
pub const CONNECTIONS_MAX: usize = 4;
/// Bytes read from one connection per poll.
pub const READ_CHUNK: usize = 4096;
/// Link benchmark limits: bytes over TCP, raw frames, frame size.
pub const BENCH_BYTES_MAX: u64 = 1 << 30;
pub const BENCH_FRAMES_MAX: u64 = 1_000_000;
pub const BENCH_FRAME_BYTES: usize = 1514;
/// A benchmark stream that moves nothing for this long fails.
pub const BENCH_STALL_NS: u64 = 10_000_000_000;

/// What the node was told at boot that the API reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    pub mgmt_addr: String,
    pub migration_addr: String,
}

/// Per-VM configuration kept beside the [`Vm`].
#[derive(Clone, Debug, PartialEq, Eq)]
struct VmMeta {
    memory_mib: u64,
    guest: String,
}

/// A link benchmark job's side of the work.
#[derive(Debug)]
enum BenchWork {
    Receive {
        job: u64,
        socket: Option<SocketId>,
        port: u16,
        received: u64,
        first_ns: Option<u64>,
        last_progress_ns: u64,
    },
    Send {
        job: u64,
        peer: [u8; 4],
        port: u16,
        frames: u64,
        raw: Option<(u64, u64)>,
        socket: Option<SocketId>,
        sent: u64,
        start_ns: Option<u64>,
        last_progress_ns: u64,
    },
}

/// The node's VMs, jobs and settings, and the handlers over them.
pub struct Managed {
    identity: NodeIdentity,
    image: Vec<u8>,
    vms: Vec<Vm>,
    meta: Vec<VmMeta>,
    jobs: JobTable,
    bench: Vec<BenchWork>,
    sched: Scheduler,
    progress: ProgressLog,
}

fn err(code: ErrorCode, message: impl Into<String>) -> Outcome {
    Outcome::Error(ApiError::new(code, message))
}

fn vm_error(e: VmError) -> Outcome {
    let code = match e {
        VmError::BadName => ErrorCode::InvalidArgument,
        VmError::Host(HostError::OutOfMemory { .. }) => ErrorCode::NoResources,
        VmError::Host(HostError::NoVirtualization | HostError::Backend(_)) => {
            ErrorCode::Unsupported
        }
        VmError::Host(HostError::InvalidSize { .. }) | VmError::Load(_) | VmError::Start(_) => {
            ErrorCode::InvalidArgument
        }
    };
    err(code, format!("cannot create the VM: {e}"))
}

fn state_name(state: &VmState) -> &'static str {
    match state {
        VmState::Created => "created",
        VmState::Running => "running",
        VmState::Halted => "halted",
        VmState::Stopped(_) => "stopped",
    }
}

fn fmt_addr(a: Option<([u8; 4], u8)>) -> String {
    match a {
        Some(([a, b, c, d], p)) => format!("{a}.{b}.{c}.{d}/{p}"),
        None => String::new(),
    }
}

fn mb_per_s(bytes: u64, ns: u64) -> u64 {
    let r = u128::from(bytes) * 1000 / u128::from(ns.max(1));
    u64::try_from(r).unwrap_or(u64::MAX)
}

impl Managed {
    /// A node with no VMs that creates them from the guest kernel `image`.
    pub fn new(identity: NodeIdentity, image: Vec<u8>) -> Self {
        Self {
            identity,
            image,
            vms: Vec::new(),
            meta: Vec::new(),
            jobs: JobTable::new(),
            bench: Vec::new(),
            sched: Scheduler::default(),
            progress: ProgressLog::default(),
        }
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.identity.name
    }
    /// The job table.
    pub fn jobs(&mut self) -> &mut JobTable {
        &mut self.jobs
    }
    /// Number of VMs.
    pub fn vm_count(&self) -> usize {
        self.vms.len()
    }
    /// Whether a link benchmark is under way (the node loop must not idle).
    pub fn has_bench_work(&self) -> bool {
        !self.bench.is_empty()
    }

    /// Run runnable VMs round robin until `deadline_ns`; returns false (at
    /// once) when none is runnable.
    pub fn run_vms(&mut self, host: &mut dyn Host, deadline_ns: u64) -> bool {
        if !self.vms.iter().any(Vm::is_runnable) {
            return false;
        }
        self.sched
            .run(host, &mut self.vms, Some(deadline_ns), &mut self.progress);
        // The log only serves test cases; keep it from growing.
        self.progress = ProgressLog::default();
        true
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.vms.iter().position(|v| v.name() == name)
    }

    fn not_found(name: &str) -> Outcome {
        let shown: String = name.chars().take(crate::vm::NAME_MAX).collect();
        err(
            ErrorCode::NotFound,
            format!("no VM named '{shown}' on this node"),
        )
    }

    fn vm_info(&self, i: usize) -> VmInfo {
        let vm = &self.vms[i];
        VmInfo {
            name: vm.name().into(),
            state: state_name(vm.state()).into(),
            stop_reason: vm.stop_reason().map(ToString::to_string),
            memory_mib: self.meta[i].memory_mib,
            guest: self.meta[i].guest.clone(),
            exits: vm.counters().exits,
            console_lines: vm.counters().console_lines,
        }
    }

    /// Answer one request.
    pub fn handle(&mut self, host: &mut dyn Host, request: Request) -> Outcome {
        let now = host.now_ns();
        match request {
            Request::NodeInfo => {
                let (total, free) = host.memory_stats();
                let (mgmt_addr, migration_addr) = match host.net() {
                    Some(net) => (
                        fmt_addr(net.address(NicRole::Management)),
                        fmt_addr(net.address(NicRole::Migration)),
                    ),
                    None => (
                        self.identity.mgmt_addr.clone(),
                        self.identity.migration_addr.clone(),
                    ),
                };
                Outcome::Ok(Body::NodeInfo(NodeInfo {
                    name: self.identity.name.clone(),
                    cpu_vendor: match host.vendor() {
                        Vendor::Amd => "amd".into(),
                        Vendor::Intel => "intel".into(),
                    },
                    cpus: host.cpu_count(),
                    memory_total_bytes: total,
                    memory_free_bytes: free,
                    version: env!("CARGO_PKG_VERSION").into(),
                    protocol_version: PROTOCOL_VERSION,
                    mgmt_addr,
                    migration_addr,
                }))
            }
            Request::VmList => Outcome::Ok(Body::VmList {
                vms: (0..self.vms.len()).map(|i| self.vm_info(i)).collect(),
            }),
            Request::VmCreate {
                name,
                memory_mib,
                guest,
            } => self.create(host, &name, memory_mib, guest.as_deref()),
            Request::VmStart { name } => {
                let Some(i) = self.find(&name) else {
                    return Self::not_found(&name);
                };
                match self.vms[i].state() {
                    VmState::Created => {
                        self.vms[i].start();
                        Outcome::Ok(Body::Vm(self.vm_info(i)))
                    }
                    VmState::Running | VmState::Halted => {
                        err(ErrorCode::InvalidState, format!("VM {name} is already running"))
                    }
                    VmState::Stopped(_) => err(
                        ErrorCode::InvalidState,
                        format!("VM {name} has stopped and cannot run again: delete it and create it anew"),
                    ),
                }
            }
            Request::VmStop { name } => {
                let Some(i) = self.find(&name) else {
                    return Self::not_found(&name);
                };
                if self.vms[i].stop_reason().is_some() {
                    return err(
                        ErrorCode::InvalidState,
                        format!("VM {name} is already stopped"),
                    );
                }
                self.vms[i].stop(host, StopReason::Requested);
                Outcome::Ok(Body::Vm(self.vm_info(i)))
            }
            Request::VmDelete { name } => {
                let Some(i) = self.find(&name) else {
                    return Self::not_found(&name);
                };
                if self.vms[i].is_runnable() {
                    return err(
                        ErrorCode::InvalidState,
                        format!("VM {name} is running: stop it first"),
                    );
                }
                self.meta.remove(i);
                self.vms.remove(i).destroy();
                host.console_write(&format!("vmm-service: VM {name} deleted\n"));
                Outcome::Ok(Body::Done)
            }
            Request::VmConsole { name, lines } => {
                let Some(i) = self.find(&name) else {
                    return Self::not_found(&name);
                };
                let want = lines
                    .unwrap_or(CONSOLE_LINES_DEFAULT)
                    .min(CONSOLE_LINES_MAX) as usize;
                let all: Vec<&str> = self.vms[i].recent_lines().collect();
                let skip = all.len().saturating_sub(want);
                Outcome::Ok(Body::Console {
                    vm: name,
                    lines: all[skip..].iter().map(|s| String::from(*s)).collect(),
                })
            }
            Request::JobList => Outcome::Ok(Body::JobList {
                jobs: self.jobs.list(now),
            }),
            Request::JobCancel { id } => match self.jobs.cancel(id, now) {
                Ok(()) => match self.jobs.info(id, now) {
                    Some(j) => Outcome::Ok(Body::Job(j)),
                    None => Outcome::Ok(Body::Done),
                },
                Err(JobError::NotFound) => err(ErrorCode::NotFound, format!("no job {id}")),
                Err(_) => err(
                    ErrorCode::InvalidState,
                    format!("job {id} has ended or cannot be cancelled"),
                ),
            },
            Request::HostGet => Outcome::Ok(Body::Host(self.jobs.settings())),
            Request::HostSet {
                max_live_migrations,
                max_storage_migrations,
            } => match self
                .jobs
                .set_limits(max_live_migrations, max_storage_migrations, now)
            {
                Ok(s) => Outcome::Ok(Body::Host(s)),
                Err(_) => err(
                    ErrorCode::InvalidArgument,
                    format!(
                        "limits are 1 to {} simultaneous migrations",
                        super::jobs::LIMIT_MAX
                    ),
                ),
            },
            Request::BenchLinkReceive { port, bytes } => self.bench_receive(host, port, bytes),
            Request::BenchLinkSend {
                peer,
                port,
                bytes,
                frames,
            } => self.bench_send(host, &peer, port, bytes, frames),
        }
    }

    fn create(
        &mut self,
        host: &mut dyn Host,
        name: &str,
        memory_mib: u64,
        guest: Option<&str>,
    ) -> Outcome {
        let guest = guest.unwrap_or(DEFAULT_GUEST);
        if guest.len() > GUEST_MAX || !GUESTS.contains(&guest) {
            let shown: String = guest.chars().take(GUEST_MAX).collect();
            return err(
                ErrorCode::InvalidArgument,
                format!("unknown guest '{shown}'; guests: {}", GUESTS.join(", ")),
            );
        }
        if !(VM_MEMORY_MIB_MIN..=VM_MEMORY_MIB_MAX).contains(&memory_mib) {
            return err(
                ErrorCode::InvalidArgument,
                format!("memory must be {VM_MEMORY_MIB_MIN} to {VM_MEMORY_MIB_MAX} MiB"),
            );
        }
        if self.find(name).is_some() {
            return err(
                ErrorCode::AlreadyExists,
                format!("a VM named {name} exists"),
            );
        }
        if self.vms.len() >= VMS_MAX {
            return err(
                ErrorCode::NoResources,
                format!("this node holds at most {VMS_MAX} VMs"),
            );
        }
        let cmdline = format!("case={guest}");
        match Vm::create(host, name, memory_mib << 20, &self.image, &cmdline) {
            Ok(vm) => {
                self.vms.push(vm);
                self.meta.push(VmMeta {
                    memory_mib,
                    guest: guest.into(),
                });
                host.console_write(&format!(
                    "vmm-service: VM {name} created ({memory_mib} MiB, guest {guest})\n"
                ));
                Outcome::Ok(Body::Vm(self.vm_info(self.vms.len() - 1)))
            }
            Err(e) => vm_error(e),
        }
    }

    fn bench_receive(&mut self, host: &mut dyn Host, port: u16, bytes: u64) -> Outcome {
        if bytes == 0 || bytes > BENCH_BYTES_MAX || port == 0 {
            return err(
                ErrorCode::InvalidArgument,
                "bytes must be 1 B to 1 GiB, port non-zero",
            );
        }
        let Some(net) = host.net() else {
            return err(ErrorCode::Unsupported, "this node has no network");
        };
        let socket = match net.tcp_listen(NicRole::Migration, port) {
            Ok(s) => s,
            Err(e) => return err(ErrorCode::NoResources, format!("cannot listen: {e}")),
        };
        let now = host.now_ns();
        match self.jobs.submit(JobKind::LinkBench, "", bytes, true, now) {
            Ok(job) => {
                self.bench.push(BenchWork::Receive {
                    job,
                    socket: Some(socket),
                    port,
                    received: 0,
                    first_ns: None,
                    last_progress_ns: now,
                });
                self.job_outcome(job, now)
            }
            Err(_) => {
                if let Some(net) = host.net() {
                    net.tcp_release(socket);
                }
                err(ErrorCode::NoResources, "the job table is full")
            }
        }
    }

    fn bench_send(
        &mut self,
        host: &mut dyn Host,
        peer: &str,
        port: u16,
        bytes: u64,
        frames: u64,
    ) -> Outcome {
        let Some(addr) = parse_ipv4(peer) else {
            return err(ErrorCode::InvalidArgument, "peer must be an IPv4 address");
        };
        if bytes == 0 || bytes > BENCH_BYTES_MAX || frames > BENCH_FRAMES_MAX || port == 0 {
            return err(
                ErrorCode::InvalidArgument,
                format!(
                    "bytes must be 1 B to 1 GiB, frames at most {BENCH_FRAMES_MAX}, port non-zero"
                ),
            );
        }
        if host.net().is_none() {
            return err(ErrorCode::Unsupported, "this node has no network");
        }
        let now = host.now_ns();
        match self.jobs.submit(JobKind::LinkBench, "", bytes, true, now) {
            Ok(job) => {
                self.bench.push(BenchWork::Send {
                    job,
                    peer: addr,
                    port,
                    frames,
                    raw: None,
                    socket: None,
                    sent: 0,
                    start_ns: None,
                    last_progress_ns: now,
                });
                self.job_outcome(job, now)
            }
            Err(_) => err(ErrorCode::NoResources, "the job table is full"),
        }
    }

    fn job_outcome(&self, job: u64, now: u64) -> Outcome {
        match self.jobs.info(job, now) {
            Some(j) => Outcome::Ok(Body::Job(j)),
            None => Outcome::Ok(Body::Done),
        }
    }

    /// Advance the link benchmark jobs (call every loop iteration).
    pub fn drive_jobs(&mut self, host: &mut dyn Host) {
        if self.bench.is_empty() {
            return;
        }
        let now = host.now_ns();
        let mut work = core::mem::take(&mut self.bench);
        work.retain_mut(|w| self.drive_bench(host, w, now));
        self.bench = work;
    }

    /// One step of a benchmark job; false once it has ended (its socket
    /// released).
    fn drive_bench(&mut self, host: &mut dyn Host, work: &mut BenchWork, now: u64) -> bool {
        let Some(net) = host.net() else {
            return false;
        };
        match work {
            BenchWork::Receive {
                job,
                socket,
                port,
                received,
                first_ns,
                last_progress_ns,
            } => {
                let done = |net: &mut dyn NetStack, s: &mut Option<SocketId>| {
                    if let Some(id) = s.take() {
                        net.tcp_release(id);
                    }
                    false
                };
                if !self.jobs.is_running(*job) {
                    return done(net, socket);
                }
                let Some(id) = *socket else { return false };
                let mut buf = [0u8; 4096];
                loop {
                    match net.tcp_recv(id, &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            first_ns.get_or_insert(now);
                            *received += n as u64;
                            *last_progress_ns = now;
                        }
                    }
                }
                self.jobs.progress(*job, *received, None);
                let total = self.jobs.info(*job, now).map_or(0, |j| j.bytes_total);
                let state = net.tcp_state(id);
                if *received >= total || matches!(state, TcpState::PeerClosed | TcpState::Closed) {
                    let ns = now.saturating_sub(first_ns.unwrap_or(now));
                    let raw = net
                        .stats(NicRole::Migration)
                        .map_or(0, |s| s.rx_bench_frames);
                    let text = format!(
                        "received {received} bytes on port {port} in {} ms: tcp_mb_per_s={}; raw benchmark frames received so far: {raw}",
                        ns / 1_000_000,
                        mb_per_s(*received, ns)
                    );
                    if *received >= total {
                        self.jobs.complete(*job, Some(&text), now);
                    } else if state == TcpState::Closed && *received == 0 && first_ns.is_none() {
                        self.jobs
                            .fail(*job, "the stream was reset before any data", now);
                    } else {
                        self.jobs
                            .fail(*job, &format!("stream ended early: {text}"), now);
                    }
                    return done(net, socket);
                }
                if first_ns.is_some() && now.saturating_sub(*last_progress_ns) > BENCH_STALL_NS {
                    self.jobs.fail(*job, "the stream stalled for 10 s", now);
                    return done(net, socket);
                }
                true
            }
            BenchWork::Send {
                job,
                peer,
                port,
                frames,
                raw,
                socket,
                sent,
                start_ns,
                last_progress_ns,
            } => {
                let release = |net: &mut dyn NetStack, s: &mut Option<SocketId>| {
                    if let Some(id) = s.take() {
                        net.tcp_release(id);
                    }
                    false
                };
                if !self.jobs.is_running(*job) {
                    return release(net, socket);
                }
                // Phase 1: raw frames (blocking, measured by the platform).
                if raw.is_none() {
                    match net.raw_bench_send(NicRole::Migration, *frames, BENCH_FRAME_BYTES) {
                        Ok(ns) => *raw = Some((*frames, ns)),
                        Err(e) => {
                            self.jobs.fail(*job, &format!("raw frames: {e}"), now);
                            return false;
                        }
                    }
                    *last_progress_ns = host.now_ns();
                    return true;
                }
                // Phase 2: TCP.
                let id = match *socket {
                    Some(id) => id,
                    None => match net.tcp_connect(NicRole::Migration, *peer, *port) {
                        Ok(id) => {
                            *socket = Some(id);
                            *last_progress_ns = now;
                            id
                        }
                        Err(e) => {
                            self.jobs.fail(*job, &format!("cannot connect: {e}"), now);
                            return false;
                        }
                    },
                };
                let total = self.jobs.info(*job, now).map_or(0, |j| j.bytes_total);
                match net.tcp_state(id) {
                    TcpState::Open | TcpState::PeerClosed => {}
                    TcpState::Connecting | TcpState::Listening => {
                        if now.saturating_sub(*last_progress_ns) > BENCH_STALL_NS {
                            self.jobs
                                .fail(*job, "the peer did not accept within 10 s", now);
                            return release(net, socket);
                        }
                        return true;
                    }
                    TcpState::Closed => {
                        let msg = format!("the connection closed after {sent} of {total} bytes");
                        self.jobs.fail(*job, &msg, now);
                        return release(net, socket);
                    }
                }
                start_ns.get_or_insert(now);
                let chunk = [0x5au8; 8192];
                while *sent < total {
                    let want = (total - *sent).min(chunk.len() as u64) as usize;
                    match net.tcp_send(id, &chunk[..want]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            *sent += n as u64;
                            *last_progress_ns = now;
                        }
                    }
                }
                self.jobs.progress(*job, *sent, None);
                if *sent >= total && net.tcp_unacked(id) == 0 {
                    let ns = now.saturating_sub(start_ns.unwrap_or(now));
                    let (n, raw_ns) = raw.unwrap_or((0, 1));
                    let raw_bytes = n * BENCH_FRAME_BYTES as u64;
                    let text = format!(
                        "tcp_bytes={total} tcp_ms={} tcp_mb_per_s={} raw_frames={n} raw_frame_bytes={BENCH_FRAME_BYTES} raw_ms={} raw_mb_per_s={} raw_frames_per_s={}",
                        ns / 1_000_000,
                        mb_per_s(total, ns),
                        raw_ns / 1_000_000,
                        mb_per_s(raw_bytes, raw_ns),
                        u128::from(n) * 1_000_000_000 / u128::from(raw_ns.max(1)),
                    );
                    release(net, socket);
                    self.jobs.complete(*job, Some(&text), now);
                    host.console_write(&format!("bench link: {text}\n"));
                    return false;
                }
                if now.saturating_sub(*last_progress_ns) > BENCH_STALL_NS {
                    self.jobs.fail(*job, "the stream stalled for 10 s", now);
                    return release(net, socket);
                }
                true
            }
        }
    }
}

/// A connection being served.
struct Served {
    socket: SocketId,
    conn: Option<ServerConn>,
    inbox: Vec<u8>,
    peer_gone: bool,
}

/// Entropy drawn from the host.
struct HostEntropy<'a>(&'a mut dyn Host);

impl Entropy for HostEntropy<'_> {
    fn fill(&mut self, buf: &mut [u8]) {
        self.0.entropy(buf);
    }
}

/// The management server on the management NIC.
pub struct MgmtServer {
    key: ClusterKey,
    port: u16,
    listener: Option<SocketId>,
    served: Vec<Served>,
    replay: ReplayGuard,
    nonces: u64,
    /// Connections accepted so far.
    pub accepted: u64,
}

impl MgmtServer {
    /// A server for `key` on TCP `port`.
    pub fn new(key: ClusterKey, port: u16) -> Self {
        Self {
            key,
            port,
            listener: None,
            served: Vec::new(),
            replay: ReplayGuard::new(),
            nonces: 0,
            accepted: 0,
        }
    }

    /// Connections being served.
    pub fn connections(&self) -> usize {
        self.served.len()
    }

    /// One round of serving: network in, requests answered, network out.
    pub fn poll(&mut self, host: &mut dyn Host, node: &mut Managed) {
        let now = host.now_ns();
        let Some(net) = host.net() else { return };
        net.poll(now);
        // (1) Accept and read.
        if let Some(l) = self.listener {
            if net.tcp_state(l) != TcpState::Listening {
                self.listener = None;
                if matches!(net.tcp_state(l), TcpState::Closed) {
                    net.tcp_release(l);
                } else {
                    self.accepted += 1;
                    self.served.push(Served {
                        socket: l,
                        conn: None,
                        inbox: Vec::new(),
                        peer_gone: false,
                    });
                }
            }
        }
        if self.listener.is_none() && self.served.len() < CONNECTIONS_MAX {
            // On failure (no socket free) try again next round.
            self.listener = net.tcp_listen(NicRole::Management, self.port).ok();
        }
        for s in &mut self.served {
            let wants = s.conn.as_ref().is_none_or(ServerConn::wants_input);
            if wants && s.inbox.len() < READ_CHUNK {
                let mut buf = [0u8; READ_CHUNK];
                let room = READ_CHUNK - s.inbox.len();
                if let Ok(n) = net.tcp_recv(s.socket, &mut buf[..room]) {
                    s.inbox.extend_from_slice(&buf[..n]);
                }
            }
            if matches!(
                net.tcp_state(s.socket),
                TcpState::PeerClosed | TcpState::Closed
            ) && s.inbox.is_empty()
            {
                s.peer_gone = true;
            }
        }
        // (2) Answer.
        let name = String::from(node.name());
        for s in &mut self.served {
            let conn = s.conn.get_or_insert_with(|| {
                self.nonces += 1;
                let nonce = fresh_nonce(&mut HostEntropy(&mut *host), self.nonces);
                ServerConn::new(&name, nonce, now)
            });
            conn.tick(now);
            let inbox = core::mem::take(&mut s.inbox);
            let mut handler = |req: Request| node.handle(&mut *host, req);
            if inbox.is_empty() {
                conn.process(&self.key, &mut self.replay, &mut handler);
            } else {
                conn.receive(&inbox, &self.key, &mut self.replay, &mut handler);
            }
        }
        // (3) Send and clean up.
        let Some(net) = host.net() else { return };
        self.served.retain_mut(|s| {
            let Some(conn) = s.conn.as_mut() else {
                return true;
            };
            // A connection still being set up (SYN received) cannot send
            // yet: its greeting waits for the next round.
            let state = net.tcp_state(s.socket);
            let sendable = matches!(state, TcpState::Open | TcpState::PeerClosed);
            if !conn.output().is_empty() && !s.peer_gone && sendable {
                match net.tcp_send(s.socket, conn.output()) {
                    Ok(n) => conn.consume_output(n),
                    Err(_) => s.peer_gone = true,
                }
            }
            if state == TcpState::Closed {
                s.peer_gone = true;
            }
            if conn.is_finished() || s.peer_gone {
                net.tcp_release(s.socket);
                return false;
            }
            true
        });
        if self.listener.is_none() && self.served.len() < CONNECTIONS_MAX {
            self.listener = net.tcp_listen(NicRole::Management, self.port).ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mgmt::auth::TestEntropy;
    use crate::mgmt::conn::{ClientConn, ClientError, ClientEvent};
    use crate::mgmt::proto::{JobState, ResponseFrame};
    use crate::testing::{printer, FakeHost, FakeNet};

    const KEY: &str = "00112233445566778899aabbccddeeff";
    const PORT: u16 = 7000;

    struct Rig {
        host: FakeHost,
        node: Managed,
        server: MgmtServer,
    }

    impl Rig {
        fn new() -> Self {
            let mut host = FakeHost::new();
            host.net = Some(FakeNet::new());
            host.ns_per_run = 100_000;
            let image = host.module.clone().unwrap();
            let identity = NodeIdentity {
                name: "a".into(),
                ..NodeIdentity::default()
            };
            Rig {
                host,
                node: Managed::new(identity, image),
                server: MgmtServer::new(ClusterKey::from_hex(KEY).unwrap(), PORT),
            }
        }
        fn net(&mut self) -> &mut FakeNet {
            self.host.net.as_mut().unwrap()
        }
        fn round(&mut self) {
            self.server.poll(&mut self.host, &mut self.node);
            self.node.drive_jobs(&mut self.host);
        }
        /// Connect a client with `key`; returns the socket and the client.
        fn connect(
            &mut self,
            key: &str,
            seed: u64,
        ) -> (SocketId, ClientConn, Result<(), ClientError>) {
            self.round(); // listener up
            let s = self.net().peer_connect(PORT).expect("listening");
            let mut e = TestEntropy(seed);
            let mut c = ClientConn::new(ClusterKey::from_hex(key).unwrap(), fresh_nonce(&mut e, 1));
            let mut result = Ok(());
            for _ in 0..6 {
                self.round();
                let bytes = self.net().peer_take(s);
                match c.receive(&bytes) {
                    Ok(_) => {}
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
                let out = c.take_output();
                self.net().peer_send(s, &out);
                if c.is_ready() {
                    break;
                }
            }
            (s, c, result)
        }
        fn call(&mut self, s: SocketId, c: &mut ClientConn, req: Request) -> Outcome {
            let id = c.request(req).unwrap();
            let out = c.take_output();
            self.net().peer_send(s, &out);
            for _ in 0..4 {
                self.round();
                let bytes = self.net().peer_take(s);
                for ev in c.receive(&bytes).unwrap() {
                    if let ClientEvent::Response(ResponseFrame { id: got, outcome }) = ev {
                        assert_eq!(got, id);
                        return outcome;
                    }
                }
            }
            panic!("no reply");
        }
    }

    fn code(o: &Outcome) -> Option<ErrorCode> {
        match o {
            Outcome::Error(e) => Some(e.code),
            Outcome::Ok(_) => None,
        }
    }

    fn create(name: &str, mib: u64, guest: Option<&str>) -> Request {
        Request::VmCreate {
            name: name.into(),
            memory_mib: mib,
            guest: guest.map(Into::into),
        }
    }

    #[test]
    fn every_vm_operation_over_the_wire() {
        let mut r = Rig::new();
        let (s, mut c, ok) = r.connect(KEY, 1);
        ok.unwrap();
        let Outcome::Ok(Body::NodeInfo(info)) = r.call(s, &mut c, Request::NodeInfo) else {
            panic!()
        };
        assert_eq!(
            (info.name.as_str(), info.cpu_vendor.as_str(), info.cpus),
            ("a", "amd", 2)
        );
        assert_eq!(info.memory_total_bytes, 1 << 30);
        assert_eq!(info.mgmt_addr, "10.0.2.15/24");
        assert_eq!(info.protocol_version, PROTOCOL_VERSION);

        r.host
            .programs
            .push_back(printer("heartbeat 1\nheartbeat 2\n"));
        let o = r.call(s, &mut c, create("web", 8, None));
        let Outcome::Ok(Body::Vm(vm)) = o else {
            panic!("{o:?}")
        };
        assert_eq!(
            (vm.state.as_str(), vm.guest.as_str(), vm.memory_mib),
            ("created", "heartbeat", 8)
        );
        assert_eq!(
            code(&r.call(s, &mut c, create("web", 8, None))),
            Some(ErrorCode::AlreadyExists)
        );
        assert_eq!(
            code(&r.call(s, &mut c, create("x", 8, Some("rm-rf")))),
            Some(ErrorCode::InvalidArgument)
        );
        assert_eq!(
            code(&r.call(s, &mut c, create("x", 1 << 20, None))),
            Some(ErrorCode::InvalidArgument)
        );
        assert_eq!(
            code(&r.call(s, &mut c, create("Bad!", 8, None))),
            Some(ErrorCode::InvalidArgument)
        );
        r.host.fail_create = true;
        assert_eq!(
            code(&r.call(s, &mut c, create("x", 8, None))),
            Some(ErrorCode::Unsupported)
        );
        r.host.fail_create = false;

        let o = r.call(s, &mut c, Request::VmStart { name: "web".into() });
        assert!(
            matches!(&o, Outcome::Ok(Body::Vm(v)) if v.state == "running"),
            "{o:?}"
        );
        assert_eq!(
            code(&r.call(s, &mut c, Request::VmStart { name: "web".into() })),
            Some(ErrorCode::InvalidState)
        );
        assert_eq!(
            code(&r.call(s, &mut c, Request::VmDelete { name: "web".into() })),
            Some(ErrorCode::InvalidState)
        );
        // The VM runs between rounds; its console lines are kept.
        let deadline = r.host.now_ns() + 50_000_000;
        r.node.run_vms(&mut r.host, deadline);
        let o = r.call(
            s,
            &mut c,
            Request::VmConsole {
                name: "web".into(),
                lines: Some(1),
            },
        );
        assert_eq!(
            o,
            Outcome::Ok(Body::Console {
                vm: "web".into(),
                lines: vec!["heartbeat 2".into()]
            })
        );
        let Outcome::Ok(Body::VmList { vms }) = r.call(s, &mut c, Request::VmList) else {
            panic!()
        };
        assert_eq!(vms.len(), 1);
        assert_eq!(
            vms[0].state, "stopped",
            "the printer guest reports ok after printing"
        );
        assert_eq!(vms[0].console_lines, 2);
        assert_eq!(
            code(&r.call(s, &mut c, Request::VmStop { name: "web".into() })),
            Some(ErrorCode::InvalidState)
        );
        assert_eq!(
            code(&r.call(s, &mut c, Request::VmStart { name: "web".into() })),
            Some(ErrorCode::InvalidState)
        );
        assert_eq!(
            r.call(s, &mut c, Request::VmDelete { name: "web".into() }),
            Outcome::Ok(Body::Done)
        );
        assert_eq!(r.host.dropped.get(), 1, "memory returned");

        // Stop a running VM.
        r.call(s, &mut c, create("spin", 8, Some("dirty-demo")));
        r.call(
            s,
            &mut c,
            Request::VmStart {
                name: "spin".into(),
            },
        );
        let o = r.call(
            s,
            &mut c,
            Request::VmStop {
                name: "spin".into(),
            },
        );
        assert!(
            matches!(&o, Outcome::Ok(Body::Vm(v)) if v.state == "stopped"
            && v.stop_reason.as_deref() == Some("stopped by the service")),
            "{o:?}"
        );
        for op in [
            Request::VmStart {
                name: "nope".into(),
            },
            Request::VmStop {
                name: "nope".into(),
            },
            Request::VmDelete {
                name: "nope".into(),
            },
            Request::VmConsole {
                name: "nope".into(),
                lines: None,
            },
            Request::JobCancel { id: 5 },
        ] {
            assert_eq!(code(&r.call(s, &mut c, op)), Some(ErrorCode::NotFound));
        }
    }

    #[test]
    fn the_vm_table_is_bounded() {
        let mut r = Rig::new();
        for i in 0..VMS_MAX {
            let o = r
                .node
                .handle(&mut r.host, create(&format!("v{i}"), 4, None));
            assert!(matches!(o, Outcome::Ok(_)), "{o:?}");
        }
        let o = r.node.handle(&mut r.host, create("one-more", 4, None));
        assert_eq!(code(&o), Some(ErrorCode::NoResources));
    }

    #[test]
    fn host_settings_and_jobs_over_the_wire() {
        let mut r = Rig::new();
        let (s, mut c, ok) = r.connect(KEY, 2);
        ok.unwrap();
        assert_eq!(
            r.call(s, &mut c, Request::HostGet),
            Outcome::Ok(Body::Host(super::super::jobs::DEFAULT_SETTINGS))
        );
        let o = r.call(
            s,
            &mut c,
            Request::HostSet {
                max_live_migrations: Some(1),
                max_storage_migrations: None,
            },
        );
        let Outcome::Ok(Body::Host(h)) = o else {
            panic!()
        };
        assert_eq!((h.max_live_migrations, h.max_storage_migrations), (1, 2));
        let bad = Request::HostSet {
            max_live_migrations: Some(0),
            max_storage_migrations: Some(99),
        };
        assert_eq!(
            code(&r.call(s, &mut c, bad)),
            Some(ErrorCode::InvalidArgument)
        );
        // Two live migrations under a limit of one: the second queues.
        let now = r.host.now_ns();
        let a = r
            .node
            .jobs()
            .submit(JobKind::LiveMigration, "v1", 100, true, now)
            .unwrap();
        let b = r
            .node
            .jobs()
            .submit(JobKind::LiveMigration, "v2", 100, true, now)
            .unwrap();
        r.node.jobs().progress(a, 50, None);
        let Outcome::Ok(Body::JobList { jobs }) = r.call(s, &mut c, Request::JobList) else {
            panic!()
        };
        assert_eq!(jobs.len(), 2);
        assert_eq!(
            (jobs[0].state, jobs[0].percent, jobs[0].vm.as_str()),
            (JobState::Running, 50, "v1")
        );
        assert_eq!(jobs[1].state, JobState::Queued);
        let o = r.call(s, &mut c, Request::JobCancel { id: a });
        assert!(matches!(&o, Outcome::Ok(Body::Job(j)) if j.state == JobState::Cancelled));
        assert_eq!(
            r.node.jobs().state(b),
            Some(JobState::Running),
            "the queued job started"
        );
        assert_eq!(
            code(&r.call(s, &mut c, Request::JobCancel { id: a })),
            Some(ErrorCode::InvalidState)
        );
    }

    #[test]
    fn bad_key_and_garbage_connections_leave_the_node_serving() {
        let mut r = Rig::new();
        let (s_bad, _c, res) = r.connect("ffffffffffffffffffffffffffffffff", 3);
        assert!(
            matches!(res, Err(ClientError::Refused(ref e)) if e.code == ErrorCode::AuthFailed),
            "{res:?}"
        );
        // Garbage, then a peer that just vanishes.
        r.round();
        let g = r.net().peer_connect(PORT).unwrap();
        r.net()
            .peer_send(g, b"\x00\x00\x00\x05hello GET / HTTP/1.0\r\n\r\n");
        r.round();
        r.round();
        let reply = r.net().peer_take(g);
        assert!(String::from_utf8_lossy(&reply).contains("bad-request"));
        r.round();
        let v = r.net().peer_connect(PORT).unwrap();
        r.net().peer_close(v);
        for _ in 0..3 {
            r.round();
        }
        // A good client is still served, and dead connections were released.
        let (s, mut c, ok) = r.connect(KEY, 4);
        ok.unwrap();
        assert!(matches!(r.call(s, &mut c, Request::VmList), Outcome::Ok(_)));
        assert!(r.server.connections() <= 2, "{}", r.server.connections());
        assert!(r.net().released(s_bad), "refused connection released");
        assert!(r.net().released(v), "vanished peer released");
    }

    #[test]
    fn connections_are_capped_and_the_cap_frees() {
        let mut r = Rig::new();
        r.net().max_sockets = 16;
        let mut held = Vec::new();
        for _ in 0..CONNECTIONS_MAX {
            r.round();
            held.push(r.net().peer_connect(PORT).unwrap());
        }
        r.round();
        r.round();
        assert_eq!(r.server.connections(), CONNECTIONS_MAX);
        assert!(
            r.net().peer_connect(PORT).is_none(),
            "no listener beyond the cap"
        );
        // Idle unauthenticated connections time out and free their slots.
        r.host
            .clock
            .set(r.host.now_ns() + super::super::conn::HANDSHAKE_TIMEOUT_NS);
        r.round();
        r.round();
        assert_eq!(r.server.connections(), 0);
        let (s, mut c, ok) = r.connect(KEY, 5);
        ok.unwrap();
        assert!(matches!(
            r.call(s, &mut c, Request::NodeInfo),
            Outcome::Ok(_)
        ));
    }

    #[test]
    fn link_bench_jobs_measure_and_report() {
        let mut r = Rig::new();
        let o = r.node.handle(
            &mut r.host,
            Request::BenchLinkReceive {
                port: 7100,
                bytes: 100_000,
            },
        );
        let Outcome::Ok(Body::Job(rx)) = o else {
            panic!("{o:?}")
        };
        let o = r.node.handle(
            &mut r.host,
            Request::BenchLinkSend {
                peer: "192.168.100.2".into(),
                port: 7100,
                bytes: 100_000,
                frames: 50,
            },
        );
        let Outcome::Ok(Body::Job(tx)) = o else {
            panic!("{o:?}")
        };
        assert!(r.node.has_bench_work());
        // Fake wire: move the sender's bytes into the receiver's socket.
        let rx_sock = r.net().peer_connect(7100).unwrap();
        for _ in 0..20 {
            r.round();
            let tx_sock: Vec<u32> = r
                .net()
                .sockets
                .iter()
                .filter(|(_, s)| s.remote.is_some() && !s.tx.is_empty())
                .map(|(id, _)| *id)
                .collect();
            for id in tx_sock {
                let bytes = r.net().peer_take(SocketId(id));
                r.net().peer_send(rx_sock, &bytes);
            }
            r.host.clock.set(r.host.now_ns() + 1_000_000);
        }
        let now = r.host.now_ns();
        let t = r.node.jobs().info(tx.id, now).unwrap();
        assert_eq!(t.state, JobState::Completed, "{t:?}");
        let text = t.result.unwrap();
        assert!(
            text.contains("tcp_bytes=100000") && text.contains("raw_frames=50"),
            "{text}"
        );
        assert!(text.contains("raw_mb_per_s=1514"), "{text}");
        let j = r.node.jobs().info(rx.id, now).unwrap();
        assert_eq!(
            (j.state, j.bytes_done, j.percent),
            (JobState::Completed, 100_000, 100)
        );
        assert!(!r.node.has_bench_work());
        assert!(r.host.console.contains("bench link: tcp_bytes=100000"));
        // Bad arguments and a node without a network.
        let bad = Request::BenchLinkSend {
            peer: "300.1.1.1".into(),
            port: 1,
            bytes: 1,
            frames: 1,
        };
        assert_eq!(
            code(&r.node.handle(&mut r.host, bad)),
            Some(ErrorCode::InvalidArgument)
        );
        r.host.net = None;
        let o = r
            .node
            .handle(&mut r.host, Request::BenchLinkReceive { port: 1, bytes: 1 });
        assert_eq!(code(&o), Some(ErrorCode::Unsupported));
    }
}
