//! Node networking: the management and migration NICs (virtio-net over
//! modern PCI: the polled driver in `nic.rs`, on `virtio-drivers`' queues)
//! with a TCP/IP stack (`smoltcp`) on each, behind
//! [`hvcore::host::NetStack`].
//!
//! Configuration comes from the node command line (docs/DESIGN.md, "Node
//! networking"): `mgmt_ip=A.B.C.D/P [mgmt_gw=A.B.C.D]` and `mig_ip=A.B.C.D/P`.
//! The first virtio-net PCI function (lowest slot) is the management NIC
//! when `mgmt_ip=` is given, the next one the migration NIC; QEMU numbers
//! slots in the order of its `-device` options.
//!
//! Everything is polled: no NIC interrupts. The service calls
//! [`NodeNet::poll`] between VM time slices; a poll drains the receive
//! queues into the stack, sends what the stack has queued, and notifies
//! each device at most once per queue for all of it. Frames of the raw link
//! benchmark (ethertype [`BENCH_ETHERTYPE`]) are counted and recycled
//! without reaching the stack. Received frames are untrusted: smoltcp
//! parses them with checked lengths; the driver looks only at lengths and
//! the ethertype.
//!
//! Socket buffers: 32 KiB per direction on the management NIC (heap), 4 MiB
//! per direction on the migration NIC (whole frames from the frame
//! allocator, returned with the socket), which is the window a stream needs
//! on this link (see `MIGRATION_SOCKET_BUFFER_BYTES`). A socket whose
//! buffers cannot be allocated is refused with [`NetError::OutOfMemory`].

mod csum;
mod nic;

use crate::pci;
use crate::virtio_hal::VirtioHal;
use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use hvcore::addr::Hpa;
use hvcore::host::{NetError, NetStack, NicRole, NicStats, SocketId, TcpState, BENCH_ETHERTYPE};
use hvmgmt::proto::parse_ipv4;
use nic::{VirtioNic, MTU_FRAME_BYTES};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::DeviceType;
/// TCP sockets per NIC.
const SOCKETS_PER_NIC: usize = 8;
/// TCP buffers per socket (each direction). Management requests are small.
/// A migration stream's window must cover the bandwidth-delay product of a
/// link whose round trip includes four host threads being scheduled (two
/// QEMU vCPUs, two QEMU I/O threads): measured with `bench link` on a loaded
/// 2-core machine, 256 KiB windows gave 25-39 MB/s, 1 MiB 45-60, 2 MiB
/// 57-101 and 4 MiB 110-112. Window scaling (RFC 7323) carries it.
const MGMT_SOCKET_BUFFER_BYTES: usize = 32 * 1024;
const MIGRATION_SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// The raw benchmark gives up when the link takes no frame for this long.
const RAW_STALL_NS: u64 = 5_000_000_000;
/// How long a released socket may take to finish closing before it is reset.
const LINGER_NS: u64 = 5_000_000_000;
/// Idle TCP connections are dropped after this long without traffic.
const TCP_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors setting up the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetInitError {
    /// A command-line address is malformed (key named).
    BadConfig(&'static str),
    /// Fewer virtio-net devices than configured NICs.
    MissingNic { wanted: usize, found: usize },
    /// The driver refused the device.
    Driver(&'static str),
    /// The device could not be set up.
    Device(nic::NicError),
}

impl fmt::Display for NetInitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetInitError::BadConfig(key) => write!(f, "{key}= is not an IPv4 address (A.B.C.D or A.B.C.D/P)"),
            NetInitError::MissingNic { wanted, found } => write!(
                f,
                "{wanted} NICs configured but {found} virtio-net PCI devices found (QEMU: -device virtio-net-pci,netdev=...; not disable-modern=on)"
            ),
            NetInitError::Driver(what) => write!(f, "virtio-net: {what}"),
            NetInitError::Device(e) => write!(f, "virtio-net: {e}"),
        }
    }
}

/// One interface's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfConfig {
    pub addr: [u8; 4],
    pub prefix: u8,
    pub gateway: Option<[u8; 4]>,
}

fn parse_cidr(s: &str) -> Option<([u8; 4], u8)> {
    let (a, p) = s.split_once('/').unwrap_or((s, "24"));
    let prefix: u8 = p.parse().ok().filter(|p| (1..=32).contains(p))?;
    Some((parse_ipv4(a)?, prefix))
}

/// The NIC configuration on `cmdline`: (management, migration).
pub fn parse_config(cmdline: &str) -> Result<(Option<IfConfig>, Option<IfConfig>), NetInitError> {
    let value = |key: &str| crate::bootinfo::cmdline_value(cmdline, key);
    let mgmt = match value("mgmt_ip") {
        None => None,
        Some(v) => {
            let (addr, prefix) = parse_cidr(v).ok_or(NetInitError::BadConfig("mgmt_ip"))?;
            let gateway = match value("mgmt_gw") {
                None => None,
                Some(g) => Some(parse_ipv4(g).ok_or(NetInitError::BadConfig("mgmt_gw"))?),
            };
            Some(IfConfig {
                addr,
                prefix,
                gateway,
            })
        }
    };
    let mig = match value("mig_ip") {
        None => None,
        Some(v) => {
            let (addr, prefix) = parse_cidr(v).ok_or(NetInitError::BadConfig("mig_ip"))?;
            Some(IfConfig {
                addr,
                prefix,
                gateway: None,
            })
        }
    };
    Ok((mgmt, mig))
}

struct Nic {
    role: NicRole,
    dev: VirtioNic,
    iface: Interface,
    sockets: SocketSet<'static>,
    config: IfConfig,
}

struct Slot {
    nic: usize,
    handle: SocketHandle,
    /// Frames holding the socket's buffers, freed with the socket.
    frames: Option<Frames>,
    /// Released: reap once closed, reset at this time at the latest.
    linger_until_ns: Option<u64>,
}

/// The node's NICs and their TCP/IP stacks.
pub struct NodeNet {
    nics: Vec<Nic>,
    slots: BTreeMap<u32, Slot>,
    next_id: u32,
    now_ns: u64,
}

/// A run of frames from the frame allocator (the migration sockets'
/// buffers: several MiB each, which belong with the memory VMs draw from
/// rather than in the heap, which is at most 64 MiB).
struct Frames {
    hpa: Hpa,
    pages: u64,
}

/// Two socket buffers of `bytes` each in one run of frames; `None` when
/// memory is short.
fn frame_buffers(bytes: usize) -> Option<(Frames, &'static mut [u8], &'static mut [u8])> {
    let pages = u64::try_from(bytes.div_ceil(PAGE_BYTES) * 2).ok()?;
    let hpa = crate::mem::alloc_contiguous(pages, 1)?;
    // SAFETY: the frames were just allocated (zeroed, identity-mapped) and
    // belong to this socket alone until `NodeNet::remove_slot` frees them,
    // which it does only after removing (dropping) the socket that holds
    // the slices, so no reference outlives the memory.
    let all = unsafe { core::slice::from_raw_parts_mut(hpa.as_u64() as *mut u8, bytes * 2) };
    let (rx, tx) = all.split_at_mut(bytes);
    Some((Frames { hpa, pages }, rx, tx))
}

const PAGE_BYTES: usize = 4096;

fn instant(now_ns: u64) -> Instant {
    Instant::from_micros((now_ns / 1000) as i64)
}

impl NodeNet {
    /// Bring up the NICs the command line configures. `Ok(None)` when it
    /// configures none (test and benchmark modes).
    pub fn init(cmdline: &str, now_ns: u64, seed: u64) -> Result<Option<Self>, NetInitError> {
        let (mgmt, mig) = parse_config(cmdline)?;
        let wanted: Vec<(NicRole, IfConfig)> = [
            mgmt.map(|c| (NicRole::Management, c)),
            mig.map(|c| (NicRole::Migration, c)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if wanted.is_empty() {
            return Ok(None);
        }
        let mut root = pci::root();
        let found = pci::find_virtio(&mut root, DeviceType::Network);
        if found.len() < wanted.len() {
            return Err(NetInitError::MissingNic {
                wanted: wanted.len(),
                found: found.len(),
            });
        }
        let mut nics = Vec::new();
        for (i, ((role, config), df)) in wanted.into_iter().zip(found).enumerate() {
            let transport = PciTransport::new::<VirtioHal, _>(&mut root, df).map_err(|_| {
                NetInitError::Driver("the PCI transport (modern virtio) is missing")
            })?;
            let mut dev = VirtioNic::new(transport).map_err(NetInitError::Device)?;
            let mac = dev.mac();
            let mut cfg = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
            cfg.random_seed = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut iface = Interface::new(cfg, &mut dev, instant(now_ns));
            let [a, b, c, d] = config.addr;
            iface.update_ip_addrs(|addrs| {
                let _ = addrs.push(IpCidr::new(
                    IpAddress::Ipv4(Ipv4Address::new(a, b, c, d)),
                    config.prefix,
                ));
            });
            if let Some([a, b, c, d]) = config.gateway {
                let _ = iface
                    .routes_mut()
                    .add_default_ipv4_route(Ipv4Address::new(a, b, c, d));
            }
            log::info!(
                "net: {} NIC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} at pci 00:{:02x}.{} is {a}.{b}.{c}.{d}/{}",
                match role {
                    NicRole::Management => "management",
                    NicRole::Migration => "migration",
                },
                mac[0], mac[1], mac[2], mac[3], mac[4], mac[5],
                df.device,
                df.function,
                config.prefix
            );
            nics.push(Nic {
                role,
                dev,
                iface,
                sockets: SocketSet::new(Vec::new()),
                config,
            });
        }
        Ok(Some(Self {
            nics,
            slots: BTreeMap::new(),
            next_id: 0,
            now_ns,
        }))
    }

    fn nic_index(&self, role: NicRole) -> Option<usize> {
        self.nics.iter().position(|n| n.role == role)
    }

    fn add_socket(&mut self, nic: usize) -> Result<(u32, SocketHandle), NetError> {
        let in_use = self.slots.values().filter(|s| s.nic == nic).count();
        if in_use >= SOCKETS_PER_NIC {
            return Err(NetError::NoSockets);
        }
        let (mut socket, frames) = match self.nics[nic].role {
            NicRole::Management => (
                tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; MGMT_SOCKET_BUFFER_BYTES]),
                    tcp::SocketBuffer::new(vec![0; MGMT_SOCKET_BUFFER_BYTES]),
                ),
                None,
            ),
            NicRole::Migration => {
                let (frames, rx, tx) =
                    frame_buffers(MIGRATION_SOCKET_BUFFER_BYTES).ok_or(NetError::OutOfMemory)?;
                let socket =
                    tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
                (socket, Some(frames))
            }
        };
        socket.set_timeout(Some(TCP_TIMEOUT));
        socket.set_nagle_enabled(false);
        if self.nics[nic].role == NicRole::Migration {
            // Acknowledge at once: a delayed ACK (smoltcp's default 10 ms)
            // holds the sender's window shut on a link this fast.
            socket.set_ack_delay(None);
        }
        let handle = self.nics[nic].sockets.add(socket);
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        self.slots.insert(
            id,
            Slot {
                nic,
                handle,
                frames,
                linger_until_ns: None,
            },
        );
        Ok((id, handle))
    }

    fn socket(&self, id: SocketId) -> Option<&tcp::Socket<'static>> {
        let slot = self.slots.get(&id.0)?;
        Some(self.nics[slot.nic].sockets.get::<tcp::Socket>(slot.handle))
    }

    fn socket_mut(&mut self, id: SocketId) -> Option<&mut tcp::Socket<'static>> {
        let slot = self.slots.get(&id.0)?;
        if slot.linger_until_ns.is_some() {
            return None;
        }
        Some(
            self.nics[slot.nic]
                .sockets
                .get_mut::<tcp::Socket>(slot.handle),
        )
    }

    fn remove_slot(&mut self, id: u32) {
        if let Some(slot) = self.slots.remove(&id) {
            // Dropped here, before its buffers' frames are freed.
            drop(self.nics[slot.nic].sockets.remove(slot.handle));
            if let Some(f) = slot.frames {
                crate::mem::free_contiguous(f.hpa, f.pages);
            }
        }
    }

    /// Frames received on any NIC so far (the node stays awake while they
    /// keep coming).
    pub fn rx_frames(&self) -> u64 {
        self.nics.iter().map(|n| n.dev.stats().rx_frames).sum()
    }
}

impl NetStack for NodeNet {
    fn poll(&mut self, now_ns: u64) {
        self.now_ns = now_ns;
        let t = instant(now_ns);
        for nic in &mut self.nics {
            nic.iface.poll(t, &mut nic.dev, &mut nic.sockets);
            nic.dev.polls += 1;
            // One notification for everything the poll queued.
            nic.dev.kick();
        }
        // Reap released sockets that finished closing or overstayed.
        let done: Vec<u32> = self
            .slots
            .iter()
            .filter_map(|(id, s)| {
                let until = s.linger_until_ns?;
                let sock = self.nics[s.nic].sockets.get::<tcp::Socket>(s.handle);
                let closed = matches!(sock.state(), tcp::State::Closed | tcp::State::TimeWait);
                (closed || now_ns >= until).then_some(*id)
            })
            .collect();
        for id in done {
            if let Some(s) = self.slots.get(&id) {
                let nic = s.nic;
                let h = s.handle;
                self.nics[nic].sockets.get_mut::<tcp::Socket>(h).abort();
            }
            self.remove_slot(id);
        }
    }

    fn tcp_listen(&mut self, nic: NicRole, port: u16) -> Result<SocketId, NetError> {
        let n = self.nic_index(nic).ok_or(NetError::NoNic)?;
        if port == 0 {
            return Err(NetError::BadAddress);
        }
        let (id, handle) = self.add_socket(n)?;
        let sock = self.nics[n].sockets.get_mut::<tcp::Socket>(handle);
        if sock.listen(port).is_err() {
            self.remove_slot(id);
            return Err(NetError::BadAddress);
        }
        Ok(SocketId(id))
    }

    fn tcp_connect(
        &mut self,
        nic: NicRole,
        addr: [u8; 4],
        port: u16,
    ) -> Result<SocketId, NetError> {
        let n = self.nic_index(nic).ok_or(NetError::NoNic)?;
        let (id, handle) = self.add_socket(n)?;
        // Ephemeral ports 49152..65535 (RFC 6335), varied by socket id.
        let local_port = 49152 + (id % 16384) as u16;
        let [a, b, c, d] = addr;
        let nic = &mut self.nics[n];
        let sock = nic.sockets.get_mut::<tcp::Socket>(handle);
        let remote = (IpAddress::Ipv4(Ipv4Address::new(a, b, c, d)), port);
        if sock
            .connect(nic.iface.context(), remote, local_port)
            .is_err()
        {
            self.remove_slot(id);
            return Err(NetError::BadAddress);
        }
        Ok(SocketId(id))
    }

    fn tcp_state(&self, socket: SocketId) -> TcpState {
        let Some(s) = self.socket(socket) else {
            return TcpState::Closed;
        };
        match s.state() {
            tcp::State::Listen => TcpState::Listening,
            tcp::State::SynSent | tcp::State::SynReceived => TcpState::Connecting,
            tcp::State::Established | tcp::State::FinWait1 | tcp::State::FinWait2 => TcpState::Open,
            tcp::State::CloseWait => TcpState::PeerClosed,
            tcp::State::Closed
            | tcp::State::Closing
            | tcp::State::LastAck
            | tcp::State::TimeWait => {
                if s.can_recv() {
                    TcpState::PeerClosed
                } else {
                    TcpState::Closed
                }
            }
        }
    }

    fn tcp_recv(&mut self, socket: SocketId, buf: &mut [u8]) -> Result<usize, NetError> {
        let s = self.socket_mut(socket).ok_or(NetError::NotConnected)?;
        match s.recv_slice(buf) {
            Ok(n) => Ok(n),
            Err(tcp::RecvError::Finished) => Ok(0),
            Err(tcp::RecvError::InvalidState) => Err(NetError::NotConnected),
        }
    }

    fn tcp_send(&mut self, socket: SocketId, data: &[u8]) -> Result<usize, NetError> {
        let s = self.socket_mut(socket).ok_or(NetError::NotConnected)?;
        if !s.may_send() {
            return Err(NetError::NotConnected);
        }
        s.send_slice(data).map_err(|_| NetError::NotConnected)
    }

    fn tcp_unacked(&self, socket: SocketId) -> usize {
        self.socket(socket).map_or(0, tcp::Socket::send_queue)
    }

    fn tcp_close(&mut self, socket: SocketId) {
        if let Some(s) = self.socket_mut(socket) {
            s.close();
        }
    }

    fn tcp_release(&mut self, socket: SocketId) {
        let now = self.now_ns;
        let Some(slot) = self.slots.get_mut(&socket.0) else {
            return;
        };
        let sock = self.nics[slot.nic]
            .sockets
            .get_mut::<tcp::Socket>(slot.handle);
        if matches!(sock.state(), tcp::State::Listen | tcp::State::Closed) {
            self.remove_slot(socket.0);
            return;
        }
        sock.close();
        slot.linger_until_ns = Some(now.saturating_add(LINGER_NS));
    }

    fn raw_bench_send(
        &mut self,
        nic: NicRole,
        frames: u64,
        frame_bytes: usize,
    ) -> Result<u64, NetError> {
        let n = self.nic_index(nic).ok_or(NetError::NoNic)?;
        let len = frame_bytes.clamp(60, MTU_FRAME_BYTES);
        let dev = &mut self.nics[n].dev;
        let mut frame = vec![0u8; len];
        frame[..6].fill(0xff);
        frame[6..12].copy_from_slice(&dev.mac());
        frame[12..14].copy_from_slice(&BENCH_ETHERTYPE.to_be_bytes());
        let start = crate::time::now_ns();
        let kicks_before = dev.stats().tx_kicks;
        let mut sent = 0u64;
        let mut batches = 0u64;
        let mut last_progress = start;
        while sent < frames {
            // Fill every free slot, then one notification for the batch:
            // the link's pace is what is measured.
            let before = sent;
            while sent < frames && dev.tx.has_room() {
                frame[14..22].copy_from_slice(&sent.to_be_bytes());
                if !dev.tx.send_with(len, |b| b.copy_from_slice(&frame)).0 {
                    break;
                }
                sent += 1;
            }
            dev.kick();
            let now = crate::time::now_ns();
            if sent != before {
                batches += 1;
                last_progress = now;
            } else if now.saturating_sub(last_progress) > RAW_STALL_NS {
                return Err(NetError::Device("the link took no frame for 5 s"));
            }
            core::hint::spin_loop();
        }
        // Until the last frame has left.
        let mut last = dev.tx.in_flight();
        while last > 0 {
            dev.tx.reap();
            let now = crate::time::now_ns();
            if dev.tx.in_flight() != last {
                last = dev.tx.in_flight();
                last_progress = now;
            } else if now.saturating_sub(last_progress) > RAW_STALL_NS {
                return Err(NetError::Device("the link took no frame for 5 s"));
            }
            core::hint::spin_loop();
        }
        let ns = crate::time::now_ns().saturating_sub(start);
        log::info!(
            "net: raw benchmark: {frames} frames of {len} bytes in {} us, {batches} batches, {} notifications",
            ns / 1000,
            dev.stats().tx_kicks - kicks_before
        );
        Ok(ns)
    }

    fn stats(&self, nic: NicRole) -> Option<NicStats> {
        self.nic_index(nic).map(|n| self.nics[n].dev.stats())
    }

    fn address(&self, nic: NicRole) -> Option<([u8; 4], u8)> {
        self.nic_index(nic)
            .map(|n| (self.nics[n].config.addr, self.nics[n].config.prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parsing() {
        let (m, g) =
            parse_config("name=a mgmt_ip=10.0.2.15/24 mgmt_gw=10.0.2.2 mig_ip=192.168.100.2")
                .unwrap();
        assert_eq!(
            m,
            Some(IfConfig {
                addr: [10, 0, 2, 15],
                prefix: 24,
                gateway: Some([10, 0, 2, 2])
            })
        );
        assert_eq!(g.unwrap().addr, [192, 168, 100, 2]);
        assert_eq!(parse_config("mode=test").unwrap(), (None, None));
        assert!(parse_config("mgmt_ip=10.0.2.300").is_err());
        assert!(parse_config("mgmt_ip=10.0.2.3/33").is_err());
        assert!(parse_config("mig_ip=10.0.2").is_err());
        assert!(parse_config("mgmt_ip=10.0.2.3 mgmt_gw=x").is_err());
    }
}
