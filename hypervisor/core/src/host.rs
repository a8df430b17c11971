//! The seam between the platform layer and the root-partition service.
//!
//! `vmm-service` (logic) drives VMs only through [`Host`] and [`Partition`];
//! the `hypervisor` crate implements them on real hardware (SVM or VMX chosen
//! at boot), and tests implement them with doubles.
//!
//! A [`Partition`] is one VM's hardware side: guest RAM, the nested page
//! table, the dirty log and the vCPU. [`Partition::run`] resolves dirty-log
//! write faults itself (they never reach the service), so the service sees
//! only exits it has to act on.

use crate::entropy::{EntropyError, Sources};
use crate::mem::GuestMemory;
use crate::vcpu::{Vcpu, Vendor, VmExit};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

/// Errors from the platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostError {
    /// Not enough host memory for the request.
    OutOfMemory {
        requested_bytes: u64,
        free_bytes: u64,
    },
    /// A size or count outside what the platform supports.
    InvalidSize { what: &'static str, value: u64 },
    /// No virtualization backend (neither SVM nor VMX usable).
    NoVirtualization,
    /// The backend failed (message names the step).
    Backend(&'static str),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::OutOfMemory {
                requested_bytes,
                free_bytes,
            } => write!(
                f,
                "out of host memory: {} KiB requested, {} KiB free",
                requested_bytes / 1024,
                free_bytes / 1024
            ),
            HostError::InvalidSize { what, value } => write!(f, "invalid {what}: {value}"),
            HostError::NoVirtualization => {
                write!(f, "no usable hardware virtualization (SVM or VMX)")
            }
            HostError::Backend(what) => write!(f, "virtualization backend failed: {what}"),
        }
    }
}

/// Result of a CPUID instruction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidResult {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Source of the host's own CPUID values (the guest's view is derived from
/// them by policy in [`crate::cpuid`]).
pub trait CpuidSource {
    /// Execute CPUID on the host.
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult;
    /// The rate of the TSC guests read, in kHz (the host's measured rate:
    /// no TSC scaling); 0 when unknown. The CPUID policy reports it (leaf
    /// 0x15, leaf 0x4000_0010) and Linux guests on AMD get it as
    /// `tsc_early_khz=`.
    fn tsc_khz(&self) -> u64;
}

/// Dirty-tracking mode of a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyMode {
    /// Nested-page write protection: the first write to a page in a round
    /// faults, is recorded and write access is restored.
    WriteProtect,
    /// Intel page-modification logging (when [`crate::vcpu::VcpuCaps::pml`]).
    Pml,
}

/// Counters a partition keeps for reports and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartitionStats {
    /// Exits taken since creation (all kinds, including resolved ones).
    pub exits: u64,
    /// Dirty-log write faults resolved inside [`Partition::run`].
    pub dirty_faults: u64,
}

/// One VM's hardware side.
pub trait Partition {
    /// Guest RAM size in bytes.
    fn ram_bytes(&self) -> u64;
    /// Guest memory (writes are recorded in the dirty log).
    fn memory(&mut self) -> &mut dyn GuestMemory;
    /// The (single, for now) vCPU.
    fn vcpu(&mut self) -> &mut dyn Vcpu;
    /// Run the vCPU until an exit the service must handle. Dirty-log write
    /// faults are resolved here and never returned.
    fn run(&mut self) -> VmExit;
    /// Start dirty logging: write-protect all guest RAM, empty the dirty set.
    fn enable_dirty_log(&mut self, mode: DirtyMode) -> Result<(), HostError>;
    /// Stop dirty logging and restore write access everywhere.
    fn disable_dirty_log(&mut self);
    /// Whether logging is on.
    fn dirty_log_enabled(&self) -> bool;
    /// Collect-and-clear: OR the dirty set into `bitmap` (bit n = guest frame
    /// n; `bitmap` has at least `ram_bytes / 4096` bits), empty the set and
    /// write-protect exactly those pages again, with the TLB flush that needs.
    /// Returns how many frames were dirty.
    fn collect_dirty(&mut self, bitmap: &mut [u64]) -> Result<u64, HostError>;
    /// Counters.
    fn stats(&self) -> PartitionStats;
}

/// The node's platform as the root-partition service sees it.
pub trait Host: CpuidSource {
    /// CPU vendor of this node.
    fn vendor(&self) -> Vendor;
    /// Boot command line of the node.
    fn cmdline(&self) -> &str;
    /// Boot module `index` (guest kernel images), if present.
    fn module(&self, index: usize) -> Option<&[u8]>;
    /// Create a VM partition with `ram_bytes` of zeroed RAM and one vCPU.
    fn create_partition(&mut self, ram_bytes: u64) -> Result<Box<dyn Partition>, HostError>;
    /// Monotonic nanoseconds since boot.
    fn now_ns(&self) -> u64;
    /// Wall-clock time now, nanoseconds since 1970-01-01 UTC (the node's
    /// CMOS clock read at boot, advanced by [`Host::now_ns`]); 0 when the
    /// node has no clock it could read. A PC guest's RTC starts from it.
    fn wall_clock_ns(&self) -> u64;
    /// Write to the node console (serial).
    fn console_write(&mut self, s: &str);
    /// Host memory: (total, free) in bytes.
    fn memory_stats(&self) -> (u64, u64);
    /// Raw world-switch benchmark: `iterations` bare guest entry/exit round
    /// trips with no exit handling, returning the elapsed nanoseconds.
    fn bench_raw_roundtrips(&mut self, iterations: u64) -> Result<u64, HostError>;
    /// Power the node off (QEMU isa-debug-exit / Bochs shutdown port). `code`
    /// 0 means success.
    fn shutdown(&mut self, code: u8) -> !;
    /// Number of logical CPUs (from the ACPI MADT; 1 when unknown).
    fn cpu_count(&self) -> u32;
    /// Fill `buf` with unpredictable bytes: the node's entropy pool
    /// ([`crate::entropy`]), to which every call first adds fresh bytes
    /// from the hardware sources (a virtio entropy device, RDRAND, RDSEED).
    /// Nonces and keys come from here. Only on a node whose
    /// [`Host::entropy_sources`] is `Ok`: the platform panics otherwise (a
    /// caller that skipped the check would hand out guessable nonces).
    fn entropy(&mut self, buf: &mut [u8]);
    /// The entropy sources behind [`Host::entropy`] (capability query), or
    /// why there are none (no virtio entropy device and no RDRAND/RDSEED:
    /// timestamps alone are guessable). The service serves nothing that
    /// needs nonces without them.
    fn entropy_sources(&self) -> Result<Sources, EntropyError>;
    /// The cluster key as the node was given it off its command line (which
    /// `ps` shows every local user): QEMU's fw_cfg file
    /// `opt/hvmigrate/key`, its text with surrounding whitespace trimmed.
    /// `None` when there is none (the service then falls back to `key=`).
    fn cluster_key(&self) -> Option<&str>;
    /// The node's network stack, when it has NICs (capability query: `None`
    /// on a node booted without them).
    fn net(&mut self) -> Option<&mut dyn NetStack>;
    /// Idle until something may have happened (a timer tick or a frame):
    /// called by the service when no VM is runnable, instead of spinning.
    fn idle(&mut self);
    /// The node's stores (capability query): one channel per store device
    /// (virtio-9p), in PCI slot order, handed over to the caller, which
    /// owns them from then on (open files keep using them while the host
    /// is borrowed elsewhere). A device has one owner: later calls return
    /// an empty list, as does a node without stores.
    fn take_stores(&mut self) -> Vec<Box<dyn StoreChannel>>;
}

/// One node store as the platform offers it (docs/DESIGN.md, "Node
/// stores"): a 9P2000.L request/response channel to a host directory. The
/// channel moves whole messages and checks only their sizes; what the
/// reply says is the caller's to check (`vstorage::p9`).
pub trait StoreChannel {
    /// The device's mount tag (the store's identity on this node).
    fn tag(&self) -> &str;
    /// Largest message the channel carries either way (the 9P msize cap).
    fn max_message_bytes(&self) -> u32;
    /// Sends `request` (one whole T-message, at most
    /// [`StoreChannel::max_message_bytes`]) and waits for its reply in
    /// `reply`; returns the reply's length, which is at most `reply.len()`.
    /// Blocks the node until the server answers.
    fn transact(&mut self, request: &[u8], reply: &mut [u8]) -> Result<usize, StoreIoError>;
}

/// A store channel failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreIoError {
    /// A request above the channel's limit, or shorter than a 9P header.
    BadRequest { len: usize, max: u32 },
    /// The device failed or answered impossibly (message names it).
    Device(&'static str),
}

impl fmt::Display for StoreIoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreIoError::BadRequest { len, max } => {
                write!(f, "a {len}-byte request is outside 7..={max} bytes")
            }
            StoreIoError::Device(what) => write!(f, "store device: {what}"),
        }
    }
}

/// The node's two NICs (docs/DESIGN.md, "Node networking").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NicRole {
    /// Administrators' side: the management API.
    Management,
    /// Node-to-node link: migration streams.
    Migration,
}

/// A TCP socket of the [`NetStack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SocketId(pub u32);

/// A TCP socket's state as the service needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpState {
    /// Waiting for a peer to connect.
    Listening,
    /// Connection being set up (either direction).
    Connecting,
    /// Data can flow both ways.
    Open,
    /// The peer closed its side: no more data will arrive, sending may
    /// still work.
    PeerClosed,
    /// Gone (closed, reset or timed out); release it.
    Closed,
}

/// Network errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetError {
    /// That NIC is not present.
    NoNic,
    /// Every socket slot is in use.
    NoSockets,
    /// No host memory for the socket's buffers.
    OutOfMemory,
    /// No such socket, or it is not connected.
    NotConnected,
    /// The address or port is invalid for the NIC.
    BadAddress,
    /// The device failed.
    Device(&'static str),
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetError::NoNic => write!(f, "the NIC is not present"),
            NetError::NoSockets => write!(f, "no free socket"),
            NetError::OutOfMemory => write!(f, "no host memory for the socket's buffers"),
            NetError::NotConnected => write!(f, "the socket is not connected"),
            NetError::BadAddress => write!(f, "invalid address or port"),
            NetError::Device(what) => write!(f, "NIC failure: {what}"),
        }
    }
}

/// Frame counters of one NIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Received frames of the raw link benchmark (ethertype
    /// [`BENCH_ETHERTYPE`]), which the TCP/IP stack never sees.
    pub rx_bench_frames: u64,
    /// Notifications the driver sent the device (each a trapped register
    /// write), for the receive and the transmit queue.
    pub rx_kicks: u64,
    pub tx_kicks: u64,
    /// Completions the device reported that the driver could not match
    /// to a buffer, or with an impossible length (frames dropped).
    pub device_errors: u64,
    /// Received TCP frames dropped for a wrong checksum.
    pub rx_bad_checksums: u64,
    /// Polls of this NIC ([`NetStack::poll`] calls).
    pub polls: u64,
}

/// Ethertype of raw benchmark frames (IEEE 802 local experimental 1).
pub const BENCH_ETHERTYPE: u16 = 0x88B5;

/// TCP/IP over the node's NICs, polled (no NIC interrupts): the service
/// calls [`NetStack::poll`] between VM time slices. Sockets are bounded by
/// the platform; every call is non-blocking except
/// [`NetStack::raw_bench_send`].
pub trait NetStack {
    /// Move frames between the NICs and the stack, run TCP timers.
    fn poll(&mut self, now_ns: u64);
    /// A new socket listening on `port` of `nic`. It serves one connection:
    /// once it is no longer [`TcpState::Listening`] it is that connection.
    fn tcp_listen(&mut self, nic: NicRole, port: u16) -> Result<SocketId, NetError>;
    /// A new socket connecting to `addr:port` through `nic`.
    fn tcp_connect(&mut self, nic: NicRole, addr: [u8; 4], port: u16)
        -> Result<SocketId, NetError>;
    /// The socket's state ([`TcpState::Closed`] for an unknown id).
    fn tcp_state(&self, socket: SocketId) -> TcpState;
    /// Received bytes into `buf`; `Ok(0)` when none are waiting.
    fn tcp_recv(&mut self, socket: SocketId, buf: &mut [u8]) -> Result<usize, NetError>;
    /// Queue bytes to send; returns how many fit in the send buffer.
    fn tcp_send(&mut self, socket: SocketId, data: &[u8]) -> Result<usize, NetError>;
    /// Bytes queued and not yet acknowledged by the peer.
    fn tcp_unacked(&self, socket: SocketId) -> usize;
    /// Close our side (FIN after queued data); the socket stays until
    /// [`NetStack::tcp_release`].
    fn tcp_close(&mut self, socket: SocketId);
    /// Forget the socket. The platform finishes a graceful close in the
    /// background (queued data is still delivered) and frees the slot then,
    /// or resets the connection if the peer does not finish within a few
    /// seconds.
    fn tcp_release(&mut self, socket: SocketId);
    /// Send `frames` raw broadcast frames of `frame_bytes` (ethertype
    /// [`BENCH_ETHERTYPE`]) on `nic` as fast as the device takes them;
    /// returns the nanoseconds it took. Blocks the node for that long.
    fn raw_bench_send(
        &mut self,
        nic: NicRole,
        frames: u64,
        frame_bytes: usize,
    ) -> Result<u64, NetError>;
    /// Counters of `nic`, `None` when absent.
    fn stats(&self, nic: NicRole) -> Option<NicStats>;
    /// IPv4 address and prefix length of `nic`, `None` when absent.
    fn address(&self, nic: NicRole) -> Option<([u8; 4], u8)>;
}
