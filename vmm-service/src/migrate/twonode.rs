//! Host tests of node-to-node moves: two managed nodes on the test doubles
//! ([`Pair`]), their migration NICs joined by a simulated link that the
//! tests cut, restore or silence, requests answered by the real handlers,
//! and guests whose state lives in registers and memory so that either
//! copy can be checked at any time ([`writer`], [`check_memory`]).
//!
//! A cut link holds every byte in the sockets (as TCP retransmits): after
//! a restore they are delivered; a killed node's sockets never answer.

use crate::mgmt::auth::{ClusterKey, TestEntropy};
use crate::mgmt::proto::{
    Body, ErrorCode, JobInfo, JobState, Keep, Outcome, Phase, Request, VmInfo, VmMove,
};
use crate::mgmt::service::{Managed, NodeIdentity};
use crate::node::Peer;
use crate::testing::{FakeHost, FakeMemory, FakeNet, FakeVcpu, Program};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use hvcore::addr::Gpa;
use hvcore::host::{Host, SocketId, TcpState};
use hvcore::vcpu::VmExit;
use std::cell::Cell;
use std::rc::Rc;

mod nothing;
mod queue;
mod quick;
mod reboot;
mod shared;
mod vmconfig;

const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const MIG_PORT: u16 = 7100;
/// The guest's work buffer: 64 pages from 1 MiB.
const WORK_GPA: u64 = 0x10_0000;
const WORK_PAGES: u64 = 64;
/// Simulated time per round of the two node loops.
const ROUND_NS: u64 = 50_000;

fn ip(i: usize) -> [u8; 4] {
    [192, 168, 100, 1 + i as u8]
}

/// A guest that writes counter N (kept in RBX, so it moves with the vCPU)
/// into work page N % 64 on every run.
fn writer() -> Program {
    Box::new(|v: &mut FakeVcpu, m: &mut FakeMemory| {
        let i = v.regs.rbx + 1;
        v.regs.rbx = i;
        m.guest_write(Gpa(WORK_GPA + (i % WORK_PAGES) * 4096), &i.to_le_bytes());
        VmExit::ExternalInterrupt
    })
}

/// One node: its host doubles and its VM and job tables.
struct Node {
    name: &'static str,
    host: FakeHost,
    node: Managed,
    up: bool,
}

impl Node {
    fn new(
        i: usize,
        name: &'static str,
        peer: &'static str,
        clock: &Rc<Cell<u64>>,
        key: &str,
    ) -> Self {
        let mut host = FakeHost::new();
        host.clock = clock.clone();
        host.ns_per_run = 100_000;
        // A 4 MiB pass spans several engine slices, so every phase is seen.
        host.ns_per_page_read = 8_000;
        host.entropy = TestEntropy(0x5eed_0000 + i as u64 * 7919 + clock.get());
        host.net = Some(FakeNet::new());
        // Writers for every partition this node will create.
        for _ in 0..8 {
            host.programs.push_back(writer());
        }
        let image = host.module.clone().unwrap_or_default();
        let identity = NodeIdentity {
            name: name.into(),
            peers: vec![Peer {
                name: peer.into(),
                addr: ip(1 - i),
            }],
            ..NodeIdentity::default()
        };
        let key = ClusterKey::from_hex(key).unwrap();
        let node = Managed::new(&mut host, identity, image, key, MIG_PORT);
        Node {
            name,
            host,
            node,
            up: true,
        }
    }

    fn net(&mut self) -> &mut FakeNet {
        self.host.net.as_mut().unwrap()
    }

    fn call(&mut self, req: Request) -> Outcome {
        self.node.handle(&mut self.host, req)
    }

    fn ok(&mut self, req: Request) -> Body {
        match self.call(req.clone()) {
            Outcome::Ok(b) => b,
            Outcome::Error(e) => panic!("node {}: {req:?}: {e:?}", self.name),
        }
    }

    /// VM `name` (4 MiB, a writer) with a 4 MiB disk on `store` (`None`:
    /// the node's default), not started: the disk's answer (the VM's
    /// creation must succeed).
    fn create_with_disk(&mut self, name: &str, store: Option<&str>) -> Outcome {
        self.ok(Request::VmCreate {
            name: name.into(),
            memory_mib: 4,
            guest: None,
            linux: None,
        });
        self.call(Request::VmDiskCreate {
            name: name.into(),
            size_mib: 4,
            store: store.map(Into::into),
            fixed: None,
        })
    }

    fn job(&mut self, id: u64) -> JobInfo {
        match self.ok(Request::JobShow { id }) {
            Body::Job(j) => j,
            other => panic!("{other:?}"),
        }
    }

    fn jobs(&mut self) -> Vec<JobInfo> {
        match self.ok(Request::JobList) {
            Body::JobList { jobs } => jobs,
            other => panic!("{other:?}"),
        }
    }

    fn vms(&mut self) -> Vec<VmInfo> {
        match self.ok(Request::VmList) {
            Body::VmList { vms } => vms,
            other => panic!("{other:?}"),
        }
    }

    fn vm_state(&mut self, name: &str) -> Option<String> {
        self.vms()
            .into_iter()
            .find(|v| v.name == name)
            .map(|v| v.state)
    }

    /// The guest's writes are all there: the last 64 counters in their
    /// pages (memory and registers of one consistent moment).
    fn check_memory(&mut self, name: &str) -> u64 {
        let i = self
            .node
            .vms()
            .iter()
            .position(|v| v.name() == name)
            .unwrap();
        let vm = &mut self.node.vms_mut()[i];
        let last = vm.partition().vcpu().regs().rbx;
        assert!(last > WORK_PAGES, "the guest ran: {last}");
        for back in 0..WORK_PAGES {
            let n = last - back;
            let mut b = [0u8; 8];
            vm.partition()
                .memory()
                .read(Gpa(WORK_GPA + (n % WORK_PAGES) * 4096), &mut b)
                .unwrap();
            assert_eq!(u64::from_le_bytes(b), n, "VM {name} on {}", self.name);
        }
        last
    }
}

/// A `vm-move` to b (or `to`) with short downtime and the test knobs.
#[derive(Default)]
struct Mv {
    to: Option<&'static str>,
    encrypt: Option<bool>,
    verify: Option<bool>,
    accept_ms: u64,
    ready_ms: u64,
    resumed_ms: u64,
    include_storage: bool,
    store: Option<&'static str>,
    quick: bool,
    /// The move's timeout (default 120 s).
    timeout_s: Option<u64>,
    /// The move's bandwidth limit (default none).
    bandwidth_mib_s: Option<u64>,
}

impl Mv {
    fn req(&self, name: &str) -> Request {
        Request::VmMove(VmMove {
            downtime_ms: Some(300),
            bandwidth_mib_s: self.bandwidth_mib_s,
            timeout_s: Some(self.timeout_s.unwrap_or(120)),
            encrypt: self.encrypt,
            verify: self.verify,
            debug_hold_accept_ms: Some(self.accept_ms),
            debug_hold_ready_ms: Some(self.ready_ms),
            debug_hold_resumed_ms: Some(self.resumed_ms),
            include_storage: self.include_storage,
            store: self.store.map(Into::into),
            quick: self.quick,
            ..VmMove::to(name, self.to.unwrap_or("b"))
        })
    }
}

/// Two nodes, `a` and `b`, and the link between their migration NICs.
struct Pair {
    clock: Rc<Cell<u64>>,
    n: [Node; 2],
    /// Connections: (node, socket) of the connecting end and of the
    /// accepted one.
    links: Vec<((usize, u32), (usize, u32))>,
    cut: bool,
}

impl Pair {
    fn new() -> Self {
        Self::with_keys(KEY, KEY)
    }

    fn with_keys(ka: &str, kb: &str) -> Self {
        let clock = Rc::new(Cell::new(1_000_000_000));
        Pair {
            n: [
                Node::new(0, "a", "b", &clock, ka),
                Node::new(1, "b", "a", &clock, kb),
            ],
            clock,
            links: Vec::new(),
            cut: false,
        }
    }

    fn a(&mut self) -> &mut Node {
        &mut self.n[0]
    }
    fn b(&mut self) -> &mut Node {
        &mut self.n[1]
    }

    /// VM `name` (4 MiB, a writer) created and started on `a`, run a bit.
    fn started(&mut self, name: &str) {
        self.a().ok(Request::VmCreate {
            name: name.into(),
            memory_mib: 4,
            guest: None,
            linux: None,
        });
        self.a().ok(Request::VmStart { name: name.into() });
        self.rounds(50);
    }

    fn move_req(name: &str) -> Request {
        Mv::default().req(name)
    }

    /// Start a move of `name` to b; its job id on a.
    fn start_move(&mut self, req: Request) -> u64 {
        match self.a().ok(req) {
            Body::Job(j) => j.id,
            other => panic!("{other:?}"),
        }
    }

    /// One round of both node loops and of the link.
    fn round(&mut self) {
        for node in &mut self.n {
            if !node.up {
                continue;
            }
            node.node.drive_jobs(&mut node.host);
            let deadline = node.host.now_ns() + super::GUEST_SLICE_NS;
            node.node.run_vms(&mut node.host, deadline);
        }
        self.carry();
        self.clock.set(self.clock.get() + ROUND_NS);
    }

    fn rounds(&mut self, n: usize) {
        for _ in 0..n {
            self.round();
        }
    }

    /// Run until `done` holds (panics after `max` rounds).
    fn until(&mut self, max: usize, what: &str, mut done: impl FnMut(&mut Pair) -> bool) {
        for _ in 0..max {
            if done(self) {
                return;
            }
            self.round();
        }
        panic!("{what}: not within {max} rounds");
    }

    /// Run until a's job `id` is in `phase`.
    fn until_phase(&mut self, id: u64, phase: Phase) {
        self.until(200_000, &format!("phase {phase:?}"), |p| {
            p.a().job(id).migration.is_some_and(|m| m.phase == phase)
        });
    }

    /// Run until a's job `id` ended; its info.
    fn until_ended(&mut self, id: u64) -> JobInfo {
        self.until(400_000, "the job ends", |p| {
            !matches!(p.a().job(id).state, JobState::Queued | JobState::Running)
        });
        self.a().job(id)
    }

    /// New connections get their peer; bytes move unless the link is cut;
    /// a close reaches the other end after its last bytes.
    fn carry(&mut self) {
        for i in 0..2 {
            let fresh: Vec<(u32, [u8; 4], u16)> = self.n[i]
                .net()
                .sockets
                .iter()
                .filter(|(_, s)| s.remote.is_some() && !s.released)
                .filter_map(|(id, s)| s.remote.map(|(addr, port)| (*id, addr, port)))
                .collect();
            for (id, addr, port) in fresh {
                if self.links.iter().any(|(c, _)| *c == (i, id)) || self.cut {
                    continue;
                }
                let Some(j) = (0..2).find(|&j| ip(j) == addr) else {
                    continue;
                };
                if !self.n[j].up {
                    continue; // a dead node answers nothing
                }
                match self.n[j].net().peer_connect(port) {
                    Some(s) => self.links.push(((i, id), (j, s.0))),
                    None => {
                        // Refused (nothing listening).
                        if let Some(s) = self.n[i].net().sockets.get_mut(&id) {
                            s.state = TcpState::Closed;
                        }
                        self.links.push(((i, id), (usize::MAX, 0)));
                    }
                }
            }
        }
        if self.cut {
            return;
        }
        for &((i, x), (j, y)) in &self.links.clone() {
            if j == usize::MAX || !self.n[i].up || !self.n[j].up {
                continue;
            }
            for ((p, s), (q, t)) in [((i, x), (j, y)), ((j, y), (i, x))] {
                let bytes = self.n[p].net().peer_take(SocketId(s));
                self.n[q].net().peer_send(SocketId(t), &bytes);
                let closed = self.n[p]
                    .net()
                    .sockets
                    .get(&s)
                    .is_some_and(|k| k.closed_by_node || k.released);
                if closed {
                    if let Some(k) = self.n[q].net().sockets.get_mut(&t) {
                        if k.state == TcpState::Open {
                            k.state = TcpState::PeerClosed;
                        }
                    }
                }
            }
        }
    }

    /// Node `i` loses power: it stops, its sockets go silent.
    fn kill(&mut self, i: usize) {
        self.n[i].up = false;
    }
}

/// Short lease times so that expiry fits a test (the rules of
/// `Timing::check` hold).
const TIMING: crate::lease::Timing = crate::lease::Timing {
    renew_ms: 10,
    expire_ms: 100,
    settle_ms: 30,
    margin_ms: 10,
};

/// A node's 9P server of the shared store.
type SharedServer = Rc<core::cell::RefCell<vstorage::p9::server::DirServer>>;

/// The two nodes with stores: the 9P server double over real temporary
/// directories, each node's own store `local` (its own directory) and the
/// store both see, `shared` (one directory); short lease times. The test
/// files of every mode with disks start here.
struct Stored {
    p: Pair,
    local: [tempfile::TempDir; 2],
    shared: tempfile::TempDir,
    /// Each node's 9P server of the shared store (to inject failures).
    servers: Vec<SharedServer>,
    /// What each VM's disk 0 holds: every write made through
    /// [`Stored::write`] (zeros elsewhere).
    images: std::collections::BTreeMap<String, Vec<u8>>,
    /// Nodes that lost power and were booted again: the old ones, kept
    /// until the test ends (dropped, they would close their files).
    _dead: Vec<Node>,
}

impl Stored {
    fn new() -> Self {
        let mut p = Pair::new();
        let local = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let shared = tempfile::tempdir().unwrap();
        let mut servers = Vec::new();
        for (dir, node) in local.iter().zip(&mut p.n) {
            let (channels, server) = Self::channels(dir, &shared, node.name);
            servers.push(server);
            let specs = crate::store::parse_specs(&Self::cmdline(node.name)).0;
            let stores = crate::store::Stores::attach(channels, &specs, node.name);
            node.node.set_stores(stores);
            node.node.set_lease_timing(TIMING);
        }
        Stored {
            p,
            local,
            shared,
            servers,
            images: Default::default(),
            _dead: Vec::new(),
        }
    }

    /// Node `name`'s store channels and its server of the shared store.
    fn channels(
        local: &tempfile::TempDir,
        shared: &tempfile::TempDir,
        name: &str,
    ) -> (Vec<Box<dyn hvcore::host::StoreChannel>>, SharedServer) {
        use crate::store::testing::DirChannel;
        let l = DirChannel::new(name, local.path(), 65536);
        let s = DirChannel::new("shared", shared.path(), 65536);
        let server = s.server.clone();
        (vec![Box::new(l), Box::new(s)], server)
    }

    fn cmdline(name: &str) -> String {
        format!("store=local:{name}:/srv/{name} store=shared:shared:/srv/shared")
    }

    /// Node `i`, which lost power ([`Pair::kill`]), boots again: a new
    /// node of that name on the same store directories, its stores
    /// attached as a booting node does (`Stores::boot`: the partial files
    /// it left are removed); the connections to it are gone (its peer's
    /// ends see them reset). Its console output.
    fn reboot(&mut self, i: usize) -> String {
        let (name, peer) = (self.p.n[i].name, self.p.n[1 - i].name);
        let mut fresh = Node::new(i, name, peer, &self.p.clock, KEY);
        let (channels, server) = Self::channels(&self.local[i], &self.shared, name);
        self.servers[i] = server;
        fresh.host.stores = channels;
        let stores = crate::store::Stores::boot(&mut fresh.host, &Self::cmdline(name), name);
        fresh.node.set_stores(stores);
        fresh.node.set_lease_timing(TIMING);
        let old = core::mem::replace(&mut self.p.n[i], fresh);
        self._dead.push(old);
        for ((x, xs), (y, ys)) in core::mem::take(&mut self.p.links) {
            if x == i || y == i {
                let (other, s) = if x == i { (y, ys) } else { (x, xs) };
                if other < 2 {
                    if let Some(k) = self.p.n[other].net().sockets.get_mut(&s) {
                        k.state = TcpState::Closed;
                    }
                }
            } else {
                self.p.links.push(((x, xs), (y, ys)));
            }
        }
        self.p.n[i].host.console.clone()
    }

    /// VM `vm` (4 MiB, a writer) on a with a disk of `mib` MiB on `store`
    /// (`None`: a's default, its own store), started.
    fn started(&mut self, vm: &str, store: Option<&str>, mib: u64) {
        self.p.a().ok(Request::VmCreate {
            name: vm.into(),
            memory_mib: 4,
            guest: None,
            linux: None,
        });
        self.p.a().ok(Request::VmDiskCreate {
            name: vm.into(),
            size_mib: mib,
            store: store.map(Into::into),
            fixed: None,
        });
        self.p.a().ok(Request::VmStart { name: vm.into() });
        self.images
            .insert(vm.into(), vec![0u8; (mib << 20) as usize]);
        self.p.rounds(20);
    }

    /// VM `vm`'s disk 0 on node `i` (the guest's, through its VM).
    fn disk(&mut self, i: usize, vm: &str) -> &mut dyn vstorage::VirtualDisk {
        self.p.n[i]
            .node
            .vms_mut()
            .iter_mut()
            .find(|v| v.name() == vm)
            .unwrap_or_else(|| panic!("no VM {vm} on node {i}"))
            .disk_mut(0)
            .unwrap()
    }

    /// Write `data` at `at` through VM `vm`'s disk on node `i` (as its
    /// virtio-blk does: write, then flush), and into its image.
    fn write(&mut self, i: usize, vm: &str, at: u64, data: &[u8]) {
        let d = self.disk(i, vm);
        d.write(at, data).unwrap();
        d.flush().unwrap();
        self.images.get_mut(vm).unwrap()[at as usize..at as usize + data.len()]
            .copy_from_slice(data);
    }

    /// VM `vm`'s disk on node `i` reads as its image.
    fn check_disk(&mut self, i: usize, vm: &str) {
        let mut got = vec![0u8; self.images[vm].len()];
        self.disk(i, vm).read(0, &mut got).unwrap();
        same(
            &got,
            &self.images[vm],
            &format!("VM {vm}'s disk on node {i}"),
        );
    }

    /// The VHDX at `rel` on node `i`'s own store reads as VM `vm`'s image.
    fn check_file(&self, i: usize, rel: &str, vm: &str) {
        let bytes = std::fs::read(self.local[i].path().join(rel)).unwrap();
        let mut d = vstorage::vhdx::Vhdx::open(
            vstorage::MemIo::from_vec(bytes),
            vstorage::vhdx::OpenOptions::read_only(),
        )
        .unwrap();
        let mut got = vec![0u8; self.images[vm].len()];
        vstorage::VirtualDisk::read(&mut d, 0, &mut got).unwrap();
        same(&got, &self.images[vm], &format!("{rel} on node {i}"));
    }

    /// The files below node `i`'s own store, relative, sorted.
    fn files(&self, i: usize) -> Vec<String> {
        walk(self.local[i].path())
    }

    /// Job `id` on a: storage bytes copied and in all, memory bytes sent.
    fn storage(&mut self, id: u64) -> (u64, u64, u64) {
        let m = self.p.a().job(id).migration.unwrap();
        (m.storage_bytes_copied, m.storage_bytes_total, m.bytes_sent)
    }
}

/// `len` bytes of a pattern that `seed` tells apart (never zero).
fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|k| (k as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// `got` equals `want`, or the first difference is named.
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: byte {i} is {} not {}", got[i], want[i]);
    }
}

/// The files below `root`, relative to it, sorted.
fn walk(root: &std::path::Path) -> Vec<String> {
    fn go(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                go(root, &p, out);
            } else if let Ok(r) = p.strip_prefix(root) {
                out.push(r.display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    go(root, root, &mut out);
    out.sort();
    out
}

fn phase_of(j: &JobInfo) -> Phase {
    j.migration.as_ref().map(|m| m.phase).unwrap()
}

#[test]
fn a_vm_moves_to_the_peer_and_runs_there_only() {
    let mut p = Pair::new();
    p.started("v");
    let before = p.a().check_memory("v");
    let id = p.start_move(Pair::move_req("v"));
    // While it moves, the API answers and refuses to change the VM.
    p.until_phase(id, Phase::Copying);
    for req in [
        Request::VmStop { name: "v".into() },
        Request::VmDelete { name: "v".into() },
        Pair::move_req("v"),
    ] {
        match p.a().call(req) {
            Outcome::Error(e) => {
                assert_eq!(e.code, ErrorCode::VmMigrating);
                assert_eq!(e.message, format!("VM v is migrating (job {id})"));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(p.b().vm_state("v").as_deref(), Some("incoming"));
    let j = p.until_ended(id);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
    let r = j.report.unwrap();
    assert!(r.verified, "{r:?}");
    assert_eq!(r.result, "completed");
    assert!(p.a().vms().is_empty(), "the source let go");
    assert_eq!(p.b().vm_state("v").as_deref(), Some("running"));
    p.rounds(20);
    let after = p.b().check_memory("v");
    assert!(after > before, "the guest runs on at b");
    // b's job.
    let bj = p.b().jobs();
    assert_eq!(bj.len(), 1);
    assert_eq!(bj[0].state, JobState::Completed);
    // And back, encrypted, without verification.
    let back = match p.b().ok(Mv {
        to: Some("a"),
        encrypt: Some(true),
        verify: Some(false),
        ..Mv::default()
    }
    .req("v"))
    {
        Body::Job(j) => j.id,
        other => panic!("{other:?}"),
    };
    p.until(400_000, "move back", |p| {
        !matches!(p.b().job(back).state, JobState::Queued | JobState::Running)
    });
    let j = p.b().job(back);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
    let m = j.migration.unwrap();
    assert!(m.encrypted && !m.verify);
    assert!(p.b().vms().is_empty());
    p.rounds(20);
    assert!(p.a().check_memory("v") > after);
}

/// In doubt with b gone for good: the operator decides; keeping the
/// source resumes it.
#[test]
fn an_operator_resolves_a_move_in_doubt() {
    let mut p = Pair::new();
    p.started("v");
    let id = p.start_move(
        Mv {
            resumed_ms: 5000,
            ..Mv::default()
        }
        .req("v"),
    );
    p.until(400_000, "b resumed", |p| {
        p.b().vm_state("v").as_deref() == Some("running")
    });
    p.kill(1);
    p.until_phase(id, Phase::InDoubt);
    // The whole explanation reaches job-show (it runs past 200 bytes), the
    // lost link named after the destination.
    let note = p.a().job(id).error.unwrap();
    assert!(note.len() > 250, "{note}");
    assert!(
        note.starts_with("switch-over in doubt after the go order was sent (link to b lost: "),
        "{note}"
    );
    assert!(
        note.contains(
            "VM v stays paused here; this node asks b about it every 2 s and acts on its answer"
        ),
        "{note}"
    );
    match p.a().call(Request::JobCancel { id }) {
        Outcome::Error(e) => assert_eq!(e.code, ErrorCode::InvalidState, "{e:?}"),
        other => panic!("cancel after go: {other:?}"),
    }
    let j = match p.a().ok(Request::JobResolve {
        id,
        keep: Keep::Source,
    }) {
        Body::Job(j) => j,
        other => panic!("{other:?}"),
    };
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    assert_eq!(p.a().vm_state("v").as_deref(), Some("running"));
    p.rounds(20);
    p.a().check_memory("v");
    match p.a().call(Request::JobResolve {
        id,
        keep: Keep::Source,
    }) {
        Outcome::Error(e) => assert_eq!(e.code, ErrorCode::InvalidState),
        other => panic!("{other:?}"),
    }
}

/// `job-cancel` in every phase before `go`: the VM runs on at a, b keeps
/// nothing.
#[test]
fn cancel_works_in_every_phase_before_go() {
    for phase in [
        Phase::Queued,
        Phase::Negotiating,
        Phase::Copying,
        Phase::SwitchingOver,
    ] {
        let mut p = Pair::new();
        p.started("v");
        p.started("w");
        if phase == Phase::Queued {
            p.a().ok(Request::HostSet {
                max_live_migrations: Some(1),
                max_storage_migrations: None,
            });
            let _first = p.start_move(
                Mv {
                    accept_ms: 60_000,
                    ..Mv::default()
                }
                .req("w"),
            );
        }
        let id = p.start_move(
            Mv {
                accept_ms: if phase == Phase::Negotiating { 5000 } else { 0 },
                ready_ms: if phase == Phase::SwitchingOver {
                    5000
                } else {
                    0
                },
                ..Mv::default()
            }
            .req("v"),
        );
        p.until_phase(id, phase);
        let j = match p.a().ok(Request::JobCancel { id }) {
            Body::Job(j) => j,
            other => panic!("{other:?}"),
        };
        let j = if j.state == JobState::Running {
            p.until_ended(id)
        } else {
            j
        };
        assert_eq!(j.state, JobState::Cancelled, "{phase:?}: {j:?}");
        assert_eq!(phase_of(&j), Phase::Cancelled);
        assert_eq!(p.a().vm_state("v").as_deref(), Some("running"), "{phase:?}");
        p.rounds(20);
        p.a().check_memory("v");
        if phase != Phase::Queued {
            p.until(400_000, "b discards", |p| p.b().vm_state("v").is_none());
        }
    }
}

/// With a limit of one, a second move queues and starts by itself once
/// the first ends.
#[test]
fn a_second_move_queues_under_max_migrations_one() {
    let mut p = Pair::new();
    p.started("v");
    p.started("w");
    p.a().ok(Request::HostSet {
        max_live_migrations: Some(1),
        max_storage_migrations: None,
    });
    let first = p.start_move(Pair::move_req("v"));
    let second = p.start_move(Pair::move_req("w"));
    let j = p.a().job(second);
    assert_eq!(j.state, JobState::Queued);
    assert_eq!(phase_of(&j), Phase::Queued);
    assert_eq!(p.until_ended(first).state, JobState::Completed);
    let j = p.until_ended(second);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
    assert!(p.a().vms().is_empty());
    p.rounds(20);
    p.b().check_memory("v");
    p.b().check_memory("w");
}

/// The destination refuses before any page moves, naming the reason: a
/// name taken there, not enough memory.
#[test]
fn refusals_name_the_reason_and_move_nothing() {
    let mut p = Pair::new();
    p.started("v");
    p.b().ok(Request::VmCreate {
        name: "v".into(),
        memory_mib: 4,
        guest: None,
        linux: None,
    });
    let id = p.start_move(Pair::move_req("v"));
    let j = p.until_ended(id);
    assert_eq!(j.state, JobState::Failed);
    let e = j.error.unwrap();
    assert!(e.contains("a VM named v exists on node b"), "{e}");
    assert!(j.report.unwrap().bytes_sent < 4096, "no page moved");
    assert_eq!(p.a().vm_state("v").as_deref(), Some("running"));
    p.b().ok(Request::VmDelete { name: "v".into() });
    p.b().host.ram_limit_bytes = Some(1 << 20);
    let id = p.start_move(Pair::move_req("v"));
    let j = p.until_ended(id);
    assert_eq!(j.state, JobState::Failed);
    let e = j.error.unwrap();
    assert!(e.contains("cannot create the VM"), "{e}");
    assert_eq!(p.a().vm_state("v").as_deref(), Some("running"));
    assert!(p.b().vms().is_empty());
    p.a().check_memory("v");
}

/// A node with another key is no member: nothing is received, the job
/// says why.
#[test]
fn a_wrong_cluster_key_is_refused_and_nothing_is_received() {
    let other = "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    let mut p = Pair::with_keys(KEY, other);
    p.started("v");
    let id = p.start_move(Pair::move_req("v"));
    let j = p.until_ended(id);
    assert_eq!(j.state, JobState::Failed);
    let e = j.error.unwrap();
    assert!(e.contains("cluster key"), "{e}");
    assert!(p.b().vms().is_empty() && p.b().jobs().is_empty());
    assert_eq!(p.a().vm_state("v").as_deref(), Some("running"));
}

/// A VM with a virtual disk is not moved to another node (its disk would
/// stay behind): refused before any job, the VM runs on at a untouched,
/// b has nothing.
#[test]
fn a_vm_with_disks_is_not_moved_to_another_node() {
    let mut p = Pair::new();
    assert!(matches!(p.a().create_with_disk("d", None), Outcome::Ok(_)));
    p.a().ok(Request::VmStart { name: "d".into() });
    p.rounds(50);
    match p.a().call(Pair::move_req("d")) {
        Outcome::Error(e) => {
            assert_eq!(e.code, ErrorCode::Unsupported, "{e:?}");
            assert!(
                e.message
                    .starts_with("VM d has 1 virtual disk, which would not follow it to node b"),
                "{e:?}"
            );
        }
        other => panic!("a VM with a disk was moved: {other:?}"),
    }
    assert!(p.a().jobs().is_empty());
    assert_eq!(p.a().vm_state("d").as_deref(), Some("running"));
    p.rounds(50);
    assert!(p.b().vms().is_empty());
    assert!(p.b().jobs().is_empty());
    // Within the node it still moves (the new VM adopts the disks).
    let id = p.start_move(
        Mv {
            to: Some("a"),
            ..Mv::default()
        }
        .req("d"),
    );
    let j = p.until_ended(id);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
}
