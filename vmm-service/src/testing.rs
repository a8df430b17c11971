//! Test doubles: guest memory over a `Vec<u8>` with a dirty record, a
//! partition that replays a scripted guest on hvcore's recording
//! [`FakeVcpu`] (the `testing` feature), and a host with a simulated clock
//! that captures console output.
//!
//! Time: the clock advances by `ns_per_run` on every guest run and, when
//! `ns_per_page_read` is set, by that much per 4 KiB the hypervisor reads
//! from guest memory (a migration's copy work), so an engine turn ends and
//! the guest runs again during pre-copy, as on a real node.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use hvcore::addr::{Gpa, PAGE_SIZE};
use hvcore::host::{
    CpuidResult, CpuidSource, DirtyMode, Host, HostError, NetError, NetStack, NicRole, NicStats,
    Partition, PartitionStats, SocketId, StoreChannel, TcpState,
};
use hvcore::mem::{check_guest_range, GuestMemory, MemError};
pub use hvcore::testing::{FakeCpuid, FakeVcpu};
use hvcore::vcpu::{Vcpu, Vendor, VmExit};

/// Guest RAM in a vector; records written frames while logging is on.
pub struct FakeMemory {
    bytes: Vec<u8>,
    pub logging: bool,
    pub dirty: BTreeSet<u64>,
    /// Clock to advance on reads, and by how much per 4 KiB read.
    pub read_cost: Option<(Rc<Cell<u64>>, u64)>,
}

impl FakeMemory {
    pub fn new(ram_bytes: u64) -> Self {
        Self {
            bytes: vec![0; ram_bytes as usize],
            logging: false,
            dirty: BTreeSet::new(),
            read_cost: None,
        }
    }
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// A write by the guest itself (hardware write protection records it).
    pub fn guest_write(&mut self, gpa: Gpa, data: &[u8]) {
        self.write(gpa, data).expect("guest write inside RAM");
    }
    /// A write that escapes the dirty log (simulates a hypervisor bug).
    pub fn write_unlogged(&mut self, gpa: Gpa, data: &[u8]) {
        let s = gpa.0 as usize;
        self.bytes[s..s + data.len()].copy_from_slice(data);
    }
}

impl GuestMemory for FakeMemory {
    fn ram_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemError> {
        check_guest_range(gpa, buf.len() as u64, self.ram_bytes())?;
        let s = gpa.0 as usize;
        buf.copy_from_slice(&self.bytes[s..s + buf.len()]);
        if let Some((clock, ns_per_page)) = &self.read_cost {
            let pages = (buf.len() as u64).div_ceil(PAGE_SIZE);
            clock.set(clock.get() + pages * ns_per_page);
        }
        Ok(())
    }
    fn write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), MemError> {
        check_guest_range(gpa, data.len() as u64, self.ram_bytes())?;
        let s = gpa.0 as usize;
        self.bytes[s..s + data.len()].copy_from_slice(data);
        if self.logging && !data.is_empty() {
            let first = gpa.0 / PAGE_SIZE;
            let last = (gpa.0 + data.len() as u64 - 1) / PAGE_SIZE;
            self.dirty.extend(first..=last);
        }
        Ok(())
    }
}

/// The host CPU of [`FakeHost`]: it reports SVM (CPUID 0x8000_0001 ECX
/// bit 2) and VMX (CPUID 1 ECX bit 5) and nothing else interesting.
pub fn svm_vmx_cpuid() -> FakeCpuid {
    let mut c = FakeCpuid::default();
    c.leaves.insert(
        (1, 0),
        CpuidResult {
            ecx: 1 << 5,
            ..CpuidResult::default()
        },
    );
    c.leaves.insert(
        (0x8000_0001, 0),
        CpuidResult {
            ecx: 1 << 2,
            ..CpuidResult::default()
        },
    );
    c
}

/// The scripted guest: called once per `Partition::run` with the vCPU and
/// memory, returns the exit to report.
pub type Program = Box<dyn FnMut(&mut FakeVcpu, &mut FakeMemory) -> VmExit>;

/// A guest that spins until the timer preempts it, for ever.
pub fn spinner() -> Program {
    Box::new(|_, _| VmExit::ExternalInterrupt)
}

/// A guest that writes `text` to COM1 one byte per exit, then reports
/// `HC_TEST_RESULT` ok.
pub fn printer(text: &'static str) -> Program {
    let mut i = 0;
    Box::new(move |v, _| {
        use hvcore::vcpu::{IoAccess, IoDir};
        if let Some(&b) = text.as_bytes().get(i) {
            i += 1;
            v.regs.rax = u64::from(b);
            VmExit::Io(IoAccess {
                port: 0x3f8,
                size: 1,
                dir: IoDir::Out,
                string: false,
                rep: false,
            })
        } else {
            v.regs.rax = hvcore::abi::HC_TEST_RESULT;
            (v.regs.rdi, v.regs.rsi, v.regs.rdx) = (0, 0, 0);
            VmExit::Hypercall
        }
    })
}

/// A partition running a [`Program`].
pub struct FakePartition {
    pub vcpu: FakeVcpu,
    pub mem: FakeMemory,
    pub program: Program,
    pub runs: u64,
    /// Shared simulated clock, advanced by `ns_per_run` on every run.
    pub clock: Rc<Cell<u64>>,
    pub ns_per_run: u64,
    pub dropped: Option<Rc<Cell<u64>>>,
    /// Where to leave the guest RAM when dropped (the host's
    /// `dropped_memory`): what a destroyed source held at the end.
    pub keep_memory: Option<Rc<RefCell<Vec<Vec<u8>>>>>,
    /// The mode of the last `enable_dirty_log`.
    pub dirty_mode: Option<DirtyMode>,
}

impl FakePartition {
    pub fn new(ram_bytes: u64) -> Self {
        Self {
            vcpu: FakeVcpu::new(),
            mem: FakeMemory::new(ram_bytes),
            program: spinner(),
            runs: 0,
            clock: Rc::new(Cell::new(0)),
            ns_per_run: 1000,
            dropped: None,
            keep_memory: None,
            dirty_mode: None,
        }
    }
}

impl Drop for FakePartition {
    fn drop(&mut self) {
        if let Some(d) = &self.dropped {
            d.set(d.get() + 1);
        }
        if let Some(keep) = &self.keep_memory {
            keep.borrow_mut().push(core::mem::take(&mut self.mem.bytes));
        }
    }
}

impl Partition for FakePartition {
    fn ram_bytes(&self) -> u64 {
        self.mem.ram_bytes()
    }
    fn memory(&mut self) -> &mut dyn GuestMemory {
        &mut self.mem
    }
    fn vcpu(&mut self) -> &mut dyn Vcpu {
        &mut self.vcpu
    }
    fn run(&mut self) -> VmExit {
        self.runs += 1;
        self.clock.set(self.clock.get() + self.ns_per_run);
        (self.program)(&mut self.vcpu, &mut self.mem)
    }
    fn enable_dirty_log(&mut self, mode: DirtyMode) -> Result<(), HostError> {
        if mode == DirtyMode::Pml && !self.vcpu.caps().pml {
            return Err(HostError::Backend("PML not available"));
        }
        self.dirty_mode = Some(mode);
        self.mem.logging = true;
        self.mem.dirty.clear();
        Ok(())
    }
    fn disable_dirty_log(&mut self) {
        self.mem.logging = false;
    }
    fn dirty_log_enabled(&self) -> bool {
        self.mem.logging
    }
    fn collect_dirty(&mut self, bitmap: &mut [u64]) -> Result<u64, HostError> {
        let n = self.mem.dirty.len() as u64;
        for gfn in core::mem::take(&mut self.mem.dirty) {
            bitmap[(gfn / 64) as usize] |= 1 << (gfn % 64);
        }
        Ok(n)
    }
    fn stats(&self) -> PartitionStats {
        PartitionStats {
            exits: self.runs,
            dirty_faults: 0,
        }
    }
}

/// A host with a simulated clock and captured console.
pub struct FakeHost {
    pub cmdline: String,
    pub module: Option<Vec<u8>>,
    /// Boot modules 1, 2, ... (a Linux kernel and initramfs).
    pub more_modules: Vec<Vec<u8>>,
    pub console: String,
    pub clock: Rc<Cell<u64>>,
    /// Clock advance per guest run of partitions created here.
    pub ns_per_run: u64,
    /// Programs for the next partitions, in creation order (then spinners).
    pub programs: VecDeque<Program>,
    pub created: Vec<u64>,
    pub dropped: Rc<Cell<u64>>,
    /// With `keep_dropped_memory`: the guest RAM of every partition
    /// dropped so far, in drop order.
    pub dropped_memory: Rc<RefCell<Vec<Vec<u8>>>>,
    pub keep_dropped_memory: bool,
    /// Clock advance per 4 KiB the hypervisor reads from guest memory of
    /// partitions created here (0: reads are free).
    pub ns_per_page_read: u64,
    /// vCPU capabilities of partitions created here.
    pub caps: hvcore::vcpu::VcpuCaps,
    pub cpuid: FakeCpuid,
    /// What `wall_clock_ns` answers.
    pub wall_clock_ns: u64,
    pub fail_create: bool,
    pub raw_ns_per_roundtrip: u64,
    pub entropy: crate::mgmt::auth::TestEntropy,
    /// What `entropy_sources` reports (a source by default).
    pub entropy_sources: Result<hvcore::entropy::Sources, hvcore::entropy::EntropyError>,
    /// What `cluster_key` reports (the platform's key, off the command
    /// line; none by default).
    pub cluster_key: Option<String>,
    pub net: Option<FakeNet>,
    /// Partitions larger than this fail with `OutOfMemory` (the fuzz
    /// harnesses: guest RAM is allocated for real here).
    pub ram_limit_bytes: Option<u64>,
    /// Clock advance per `idle()`.
    pub idle_ns: u64,
    pub idles: u64,
    /// Store channels `take_stores` hands over (once).
    pub stores: Vec<Box<dyn StoreChannel>>,
}

impl Default for FakeHost {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeHost {
    pub fn new() -> Self {
        Self {
            cmdline: String::new(),
            module: Some(crate::loader::build::kernel()),
            more_modules: Vec::new(),
            console: String::new(),
            clock: Rc::new(Cell::new(1_000_000)),
            ns_per_run: 1000,
            programs: VecDeque::new(),
            created: Vec::new(),
            dropped: Rc::new(Cell::new(0)),
            dropped_memory: Rc::new(RefCell::new(Vec::new())),
            keep_dropped_memory: false,
            ns_per_page_read: 0,
            caps: hvcore::vcpu::VcpuCaps::default(),
            cpuid: svm_vmx_cpuid(),
            wall_clock_ns: 0,
            fail_create: false,
            raw_ns_per_roundtrip: 10_000,
            entropy: crate::mgmt::auth::TestEntropy(0x1234_5678_9abc_def1),
            entropy_sources: Ok(hvcore::entropy::Sources::new(&["test"])),
            cluster_key: None,
            net: None,
            ram_limit_bytes: None,
            idle_ns: 1_000_000,
            idles: 0,
            stores: Vec::new(),
        }
    }
    /// Console lines.
    pub fn lines(&self) -> Vec<&str> {
        self.console.lines().collect()
    }
}

impl CpuidSource for FakeHost {
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        self.cpuid.host_cpuid(leaf, subleaf)
    }
    fn tsc_khz(&self) -> u64 {
        self.cpuid.tsc_khz
    }
}

impl Host for FakeHost {
    fn vendor(&self) -> Vendor {
        Vendor::Amd
    }
    fn cmdline(&self) -> &str {
        &self.cmdline
    }
    fn module(&self, index: usize) -> Option<&[u8]> {
        match index.checked_sub(1) {
            None => self.module.as_deref(),
            Some(i) => self.more_modules.get(i).map(Vec::as_slice),
        }
    }
    fn create_partition(&mut self, ram_bytes: u64) -> Result<Box<dyn Partition>, HostError> {
        if self.fail_create {
            return Err(HostError::NoVirtualization);
        }
        if let Some(limit) = self.ram_limit_bytes.filter(|l| ram_bytes > *l) {
            return Err(HostError::OutOfMemory {
                requested_bytes: ram_bytes,
                free_bytes: limit,
            });
        }
        self.created.push(ram_bytes);
        let mut p = FakePartition::new(ram_bytes);
        p.clock = self.clock.clone();
        p.ns_per_run = self.ns_per_run;
        p.dropped = Some(self.dropped.clone());
        if self.keep_dropped_memory {
            p.keep_memory = Some(self.dropped_memory.clone());
        }
        p.vcpu.caps = self.caps;
        if self.ns_per_page_read > 0 {
            p.mem.read_cost = Some((self.clock.clone(), self.ns_per_page_read));
        }
        if let Some(prog) = self.programs.pop_front() {
            p.program = prog;
        }
        Ok(Box::new(p))
    }
    fn now_ns(&self) -> u64 {
        self.clock.get()
    }
    fn wall_clock_ns(&self) -> u64 {
        self.wall_clock_ns
    }
    fn console_write(&mut self, s: &str) {
        self.console.push_str(s);
    }
    fn memory_stats(&self) -> (u64, u64) {
        (1 << 30, 1 << 29)
    }
    fn bench_raw_roundtrips(&mut self, iterations: u64) -> Result<u64, HostError> {
        let ns = iterations * self.raw_ns_per_roundtrip;
        self.clock.set(self.clock.get() + ns);
        Ok(ns)
    }
    fn shutdown(&mut self, code: u8) -> ! {
        panic!("shutdown({code})")
    }
    fn cpu_count(&self) -> u32 {
        2
    }
    fn entropy(&mut self, buf: &mut [u8]) {
        use crate::mgmt::auth::Entropy;
        assert!(
            self.entropy_sources.is_ok(),
            "entropy used on a host that reported no source"
        );
        self.entropy.fill(buf);
    }
    fn entropy_sources(&self) -> Result<hvcore::entropy::Sources, hvcore::entropy::EntropyError> {
        self.entropy_sources.clone()
    }
    fn cluster_key(&self) -> Option<&str> {
        self.cluster_key.as_deref()
    }
    fn net(&mut self) -> Option<&mut dyn NetStack> {
        self.net.as_mut().map(|n| n as &mut dyn NetStack)
    }
    fn idle(&mut self) {
        self.clock.set(self.clock.get() + self.idle_ns);
        self.idles += 1;
    }
    fn take_stores(&mut self) -> Vec<Box<dyn StoreChannel>> {
        core::mem::take(&mut self.stores)
    }
}

/// One socket of the [`FakeNet`].
#[derive(Debug)]
pub struct FakeSocket {
    #[allow(dead_code)]
    pub nic: NicRole,
    pub port: u16,
    pub remote: Option<([u8; 4], u16)>,
    pub state: TcpState,
    /// Bytes the peer sent, waiting for `tcp_recv`.
    pub rx: VecDeque<u8>,
    /// Bytes the node sent.
    pub tx: Vec<u8>,
    pub closed_by_node: bool,
    /// Released by the node: it stays here so the peer can still take what
    /// was sent (a graceful close delivers queued data).
    pub released: bool,
}

/// An in-memory network: tests play the peers of the node's sockets.
#[derive(Debug, Default)]
pub struct FakeNet {
    pub sockets: BTreeMap<u32, FakeSocket>,
    next: u32,
    pub max_sockets: usize,
    /// Send-buffer room per `tcp_send` call.
    pub send_room: usize,
    /// A socket's send buffer: at most this many bytes sent and not yet
    /// taken by the peer (a real socket's buffer is bounded too).
    pub socket_buffer: usize,
    pub polls: u64,
    pub bench_frames: u64,
    /// Receive windows of peers set by [`FakeNet::peer_window`]: the node
    /// can have at most this many bytes sent and not yet taken by the peer.
    windows: BTreeMap<u32, usize>,
}

impl FakeNet {
    pub fn new() -> Self {
        Self {
            max_sockets: 8,
            send_room: 64 * 1024,
            socket_buffer: 4 << 20,
            ..Self::default()
        }
    }
    /// A peer connects to a listening socket on `port`.
    pub fn peer_connect(&mut self, port: u16) -> Option<SocketId> {
        let (id, s) = self
            .sockets
            .iter_mut()
            .find(|(_, s)| s.port == port && s.state == TcpState::Listening && !s.released)?;
        s.state = TcpState::Connecting;
        Some(SocketId(*id))
    }
    /// The peer sends bytes.
    pub fn peer_send(&mut self, id: SocketId, data: &[u8]) {
        if let Some(s) = self.sockets.get_mut(&id.0) {
            s.rx.extend(data);
        }
    }
    /// What the node sent to the peer since the last call.
    pub fn peer_take(&mut self, id: SocketId) -> Vec<u8> {
        self.sockets
            .get_mut(&id.0)
            .map(|s| core::mem::take(&mut s.tx))
            .unwrap_or_default()
    }
    /// The peer closes its side.
    pub fn peer_close(&mut self, id: SocketId) {
        if let Some(s) = self.sockets.get_mut(&id.0) {
            s.state = TcpState::PeerClosed;
        }
    }
    /// The peer of `id` has a receive window of `bytes`: once that much
    /// sent data waits untaken ([`FakeNet::peer_take`]), sends take nothing
    /// (a peer that never reads).
    pub fn peer_window(&mut self, id: SocketId, bytes: usize) {
        self.windows.insert(id.0, bytes);
    }
    /// Whether the node released socket `id`.
    pub fn released(&self, id: SocketId) -> bool {
        self.sockets.get(&id.0).is_some_and(|s| s.released)
    }
    fn add(&mut self, s: FakeSocket) -> Result<SocketId, NetError> {
        if self.sockets.values().filter(|s| !s.released).count() >= self.max_sockets {
            return Err(NetError::NoSockets);
        }
        self.next += 1;
        self.sockets.insert(self.next, s);
        Ok(SocketId(self.next))
    }
}

impl NetStack for FakeNet {
    fn poll(&mut self, _now_ns: u64) {
        self.polls += 1;
        // Connections finish their handshake one poll after the peer's SYN.
        for s in self.sockets.values_mut() {
            if s.state == TcpState::Connecting {
                s.state = TcpState::Open;
            }
        }
    }
    fn tcp_listen(&mut self, nic: NicRole, port: u16) -> Result<SocketId, NetError> {
        self.add(FakeSocket {
            nic,
            port,
            remote: None,
            state: TcpState::Listening,
            rx: VecDeque::new(),
            tx: Vec::new(),
            closed_by_node: false,
            released: false,
        })
    }
    fn tcp_connect(
        &mut self,
        nic: NicRole,
        addr: [u8; 4],
        port: u16,
    ) -> Result<SocketId, NetError> {
        self.add(FakeSocket {
            nic,
            port,
            remote: Some((addr, port)),
            state: TcpState::Open,
            rx: VecDeque::new(),
            tx: Vec::new(),
            closed_by_node: false,
            released: false,
        })
    }
    fn tcp_state(&self, socket: SocketId) -> TcpState {
        self.sockets
            .get(&socket.0)
            .map_or(TcpState::Closed, |s| s.state)
    }
    fn tcp_recv(&mut self, socket: SocketId, buf: &mut [u8]) -> Result<usize, NetError> {
        let s = self
            .sockets
            .get_mut(&socket.0)
            .ok_or(NetError::NotConnected)?;
        let n = buf.len().min(s.rx.len());
        for (d, b) in buf.iter_mut().zip(s.rx.drain(..n)) {
            *d = b;
        }
        Ok(n)
    }
    fn tcp_send(&mut self, socket: SocketId, data: &[u8]) -> Result<usize, NetError> {
        let window = self.windows.get(&socket.0).copied();
        let buffer = self.socket_buffer;
        let s = self
            .sockets
            .get_mut(&socket.0)
            .ok_or(NetError::NotConnected)?;
        if !matches!(s.state, TcpState::Open | TcpState::PeerClosed) || s.closed_by_node {
            return Err(NetError::NotConnected);
        }
        let mut room = self.send_room.min(buffer.saturating_sub(s.tx.len()));
        if let Some(w) = window {
            room = room.min(w.saturating_sub(s.tx.len()));
        }
        let n = data.len().min(room);
        s.tx.extend_from_slice(&data[..n]);
        Ok(n)
    }
    fn tcp_unacked(&self, _socket: SocketId) -> usize {
        0
    }
    fn tcp_close(&mut self, socket: SocketId) {
        if let Some(s) = self.sockets.get_mut(&socket.0) {
            s.closed_by_node = true;
            s.state = TcpState::Closed;
        }
    }
    fn tcp_release(&mut self, socket: SocketId) {
        if let Some(s) = self.sockets.get_mut(&socket.0) {
            s.released = true;
            s.state = TcpState::Closed;
        }
    }
    fn raw_bench_send(
        &mut self,
        _nic: NicRole,
        frames: u64,
        _frame_bytes: usize,
    ) -> Result<u64, NetError> {
        self.bench_frames += frames;
        Ok(frames * 1000)
    }
    fn stats(&self, _nic: NicRole) -> Option<NicStats> {
        Some(NicStats {
            rx_bench_frames: self.bench_frames,
            ..NicStats::default()
        })
    }
    fn address(&self, nic: NicRole) -> Option<([u8; 4], u8)> {
        Some(match nic {
            NicRole::Management => ([10, 0, 2, 15], 24),
            NicRole::Migration => ([192, 168, 100, 1], 24),
        })
    }
}

/// A file on a store with room for `room` bytes of file: growing past it
/// is a full store (`IoError::NoSpace`, nothing written); the test frees
/// space by raising the shared `room`.
pub struct RoomFile {
    pub io: vstorage::MemIo,
    pub room: Rc<Cell<u64>>,
}

impl RoomFile {
    /// An empty file with unlimited room, and the handle on its room.
    pub fn new() -> (Self, Rc<Cell<u64>>) {
        let room = Rc::new(Cell::new(u64::MAX));
        (
            Self {
                io: vstorage::MemIo::new(),
                room: room.clone(),
            },
            room,
        )
    }
    fn check(&self, end: u64) -> Result<(), vstorage::IoError> {
        if end > self.room.get() {
            return Err(vstorage::IoError::NoSpace {
                op: "write",
                detail: "test store: no space left".into(),
            });
        }
        Ok(())
    }
}

impl vstorage::BlockIo for RoomFile {
    fn read_at(&self, o: u64, b: &mut [u8]) -> Result<(), vstorage::IoError> {
        self.io.read_at(o, b)
    }
    fn write_at(&mut self, o: u64, b: &[u8]) -> Result<(), vstorage::IoError> {
        self.check(o + b.len() as u64)?;
        self.io.write_at(o, b)
    }
    fn flush(&mut self) -> Result<(), vstorage::IoError> {
        Ok(())
    }
    fn len(&self) -> Result<u64, vstorage::IoError> {
        self.io.len()
    }
    fn set_len(&mut self, l: u64) -> Result<(), vstorage::IoError> {
        self.check(l)?;
        self.io.set_len(l)
    }
}
