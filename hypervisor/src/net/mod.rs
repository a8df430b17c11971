//! Node networking: the management and migration NICs (virtio-net over
//! modern PCI, `virtio-drivers`) with a polled TCP/IP stack (`smoltcp`) on
//! each, behind [`hvcore::host::NetStack`].
//!
//! Configuration comes from the node command line (docs/DESIGN.md, "Node
//! networking"): `mgmt_ip=A.B.C.D/P [mgmt_gw=A.B.C.D]` and `mig_ip=A.B.C.D/P`.
//! The first virtio-net PCI function (lowest slot) is the management NIC
//! when `mgmt_ip=` is given, the next one the migration NIC; QEMU numbers
//! slots in the order of its `-device` options.
//!
//! Everything is polled: no NIC interrupts. The service calls
//! [`NodeNet::poll`] between VM time slices; a poll drains the receive
//! queues into the stack and sends what the stack has queued. Frames of the
//! raw link benchmark (ethertype [`BENCH_ETHERTYPE`]) are counted and
//! recycled without reaching the stack. Received frames are untrusted:
//! smoltcp parses them with checked lengths; this module looks only at the
//! ethertype, after checking the frame is long enough to have one.

mod hal;

use crate::pci;
use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use hal::NetHal;
use hvcore::host::{NetError, NetStack, NicRole, NicStats, SocketId, TcpState, BENCH_ETHERTYPE};
use hvmgmt::proto::parse_ipv4;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::DeviceType;

/// Receive (and transmit) virtqueue size.
const QUEUE_SIZE: usize = 64;
/// Receive buffer size: a full Ethernet frame plus the virtio-net header.
const RX_BUFFER_BYTES: usize = 2048;
/// Largest frame sent (Ethernet header + 1500 bytes of IP).
const MTU_FRAME_BYTES: usize = 1514;
/// TCP sockets per NIC.
const SOCKETS_PER_NIC: usize = 8;
/// TCP buffers per socket (each direction): management requests are small;
/// migration streams need a window that covers the link's delay.
const MGMT_SOCKET_BUFFER_BYTES: usize = 32 * 1024;
const MIGRATION_SOCKET_BUFFER_BYTES: usize = 256 * 1024;
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

type VirtioNet = VirtIONetRaw<NetHal, PciTransport, QUEUE_SIZE>;

/// Transmit buffer size: the virtio-net header and a full frame.
const TX_BUFFER_BYTES: usize = 2048;

/// The device as smoltcp sees it, with counters.
///
/// Receive: every receive buffer is posted to the device; a completed one
/// is copied out and posted again at once. Transmit is asynchronous: up to
/// a queue's worth of frames are in flight, their buffers kept here until
/// the device reports them done (a blocking send per frame would make every
/// frame wait for QEMU's I/O thread). Buffers are boxed slices: their bytes
/// never move while the device may access them.
struct NicDevice {
    net: VirtioNet,
    /// Posted receive buffers by token.
    rx: Vec<Option<Box<[u8]>>>,
    /// In-flight transmit buffers by token, with the length handed out.
    tx: Vec<Option<(Box<[u8]>, usize)>>,
    /// Free transmit buffers.
    tx_pool: Vec<Box<[u8]>>,
    stats: NicStats,
}

impl NicDevice {
    fn new(mut net: VirtioNet) -> Result<Self, NetInitError> {
        let mut rx: Vec<Option<Box<[u8]>>> = (0..QUEUE_SIZE).map(|_| None).collect();
        for _ in 0..QUEUE_SIZE {
            let mut buf = vec![0u8; RX_BUFFER_BYTES].into_boxed_slice();
            // SAFETY: the buffer is kept in `rx` (heap, never moved or
            // touched) until the device completes it.
            let token = unsafe { net.receive_begin(&mut buf) }
                .map_err(|_| NetInitError::Driver("cannot post receive buffers"))?;
            let slot = rx
                .get_mut(usize::from(token))
                .ok_or(NetInitError::Driver("receive token out of range"))?;
            *slot = Some(buf);
        }
        Ok(Self {
            net,
            rx,
            tx: (0..QUEUE_SIZE).map(|_| None).collect(),
            tx_pool: Vec::new(),
            stats: NicStats::default(),
        })
    }

    /// Take back transmit buffers the device has finished with.
    fn reap_tx(&mut self) {
        while let Some(token) = self.net.poll_transmit() {
            let Some((buf, len)) = self.tx.get_mut(usize::from(token)).and_then(Option::take)
            else {
                // A token we never handed out: the device is broken.
                panic!("virtio-net: completion for unknown transmit token {token}");
            };
            // SAFETY: the same buffer and length as given to transmit_begin.
            let _ = unsafe { self.net.transmit_complete(token, &buf[..len]) };
            self.tx_pool.push(buf);
        }
    }

    fn can_send(&mut self) -> bool {
        self.reap_tx();
        self.net.can_send()
    }

    /// The next frame for the stack, counting (and dropping) benchmark
    /// frames on the way.
    fn next_frame(&mut self) -> Option<Vec<u8>> {
        loop {
            let token = self.net.poll_receive()?;
            let Some(mut buf) = self.rx.get_mut(usize::from(token)).and_then(Option::take) else {
                panic!("virtio-net: completion for unknown receive token {token}");
            };
            // SAFETY: the same buffer as given to receive_begin for `token`.
            let done = unsafe { self.net.receive_complete(token, &mut buf) };
            // The device's lengths are checked against the buffer.
            let frame = done
                .ok()
                .and_then(|(hdr, len)| buf.get(hdr..hdr.checked_add(len)?))
                .map(|f| {
                    let bench = f
                        .get(12..14)
                        .is_some_and(|t| u16::from_be_bytes([t[0], t[1]]) == BENCH_ETHERTYPE);
                    (f.len(), (!bench).then(|| f.to_vec()))
                });
            // SAFETY: as in `new`: the buffer stays in `rx` until completed.
            match unsafe { self.net.receive_begin(&mut buf) } {
                Ok(t) => {
                    if let Some(slot) = self.rx.get_mut(usize::from(t)) {
                        *slot = Some(buf);
                    }
                }
                // Cannot happen (we just freed a descriptor); the queue is
                // one buffer shorter if it does.
                Err(_) => log::warn!("virtio-net: could not repost a receive buffer"),
            }
            let Some((len, copy)) = frame else {
                continue;
            };
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += len as u64;
            match copy {
                Some(f) => return Some(f),
                None => self.stats.rx_bench_frames += 1,
            }
        }
    }

    /// Queue `frame` for transmission; false when the queue is full or the
    /// frame too long.
    fn send_frame(&mut self, frame: &[u8]) -> bool {
        if !self.can_send() {
            return false;
        }
        let mut buf = self
            .tx_pool
            .pop()
            .unwrap_or_else(|| vec![0u8; TX_BUFFER_BYTES].into_boxed_slice());
        let Ok(hdr) = self.net.fill_buffer_header(&mut buf) else {
            return false;
        };
        let Some(len) = hdr.checked_add(frame.len()).filter(|l| *l <= buf.len()) else {
            self.tx_pool.push(buf);
            return false;
        };
        buf[hdr..len].copy_from_slice(frame);
        // SAFETY: the buffer is kept in `tx` (heap, untouched) until the
        // device completes it (`reap_tx`).
        match unsafe { self.net.transmit_begin(&buf[..len]) } {
            Ok(token) => {
                if let Some(slot) = self.tx.get_mut(usize::from(token)) {
                    *slot = Some((buf, len));
                }
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += frame.len() as u64;
                true
            }
            Err(_) => {
                self.tx_pool.push(buf);
                false
            }
        }
    }
}

struct NicRx(Vec<u8>);
struct NicTx<'a>(&'a mut NicDevice);

impl RxToken for NicRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for NicTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        // A frame the device refuses is lost, as on a wire; TCP resends.
        self.0.send_frame(&frame);
        r
    }
}

impl Device for NicDevice {
    type RxToken<'a> = NicRx;
    type TxToken<'a> = NicTx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(NicRx, NicTx<'_>)> {
        let frame = self.next_frame()?;
        Some((NicRx(frame), NicTx(self)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<NicTx<'_>> {
        self.can_send().then_some(NicTx(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU_FRAME_BYTES;
        caps
    }
}

struct Nic {
    role: NicRole,
    dev: NicDevice,
    iface: Interface,
    sockets: SocketSet<'static>,
    config: IfConfig,
}

struct Slot {
    nic: usize,
    handle: SocketHandle,
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
            let transport = PciTransport::new::<NetHal, _>(&mut root, df).map_err(|_| {
                NetInitError::Driver("the PCI transport (modern virtio) is missing")
            })?;
            let net = VirtioNet::new(transport)
                .map_err(|_| NetInitError::Driver("device initialisation failed"))?;
            let mac = net.mac_address();
            let mut dev = NicDevice::new(net)?;
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
        let bytes = match self.nics[nic].role {
            NicRole::Management => MGMT_SOCKET_BUFFER_BYTES,
            NicRole::Migration => MIGRATION_SOCKET_BUFFER_BYTES,
        };
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; bytes]),
            tcp::SocketBuffer::new(vec![0; bytes]),
        );
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
            self.nics[slot.nic].sockets.remove(slot.handle);
        }
    }

    /// Frames received on any NIC so far (the node stays awake while they
    /// keep coming).
    pub fn rx_frames(&self) -> u64 {
        self.nics.iter().map(|n| n.dev.stats.rx_frames).sum()
    }
}

impl NetStack for NodeNet {
    fn poll(&mut self, now_ns: u64) {
        self.now_ns = now_ns;
        let t = instant(now_ns);
        for nic in &mut self.nics {
            nic.iface.poll(t, &mut nic.dev, &mut nic.sockets);
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
        frame[6..12].copy_from_slice(&dev.net.mac_address());
        frame[12..14].copy_from_slice(&BENCH_ETHERTYPE.to_be_bytes());
        let start = crate::time::now_ns();
        for i in 0..frames {
            frame[14..22].copy_from_slice(&i.to_be_bytes());
            // Wait for room: the link's pace is what is measured.
            let wait_start = crate::time::now_ns();
            while !dev.send_frame(&frame) {
                if crate::time::now_ns().saturating_sub(wait_start) > RAW_STALL_NS {
                    return Err(NetError::Device("the link took no frame for 5 s"));
                }
                core::hint::spin_loop();
            }
        }
        // Until the last frame has left.
        while dev.tx.iter().any(Option::is_some) {
            dev.reap_tx();
            if crate::time::now_ns().saturating_sub(start) > RAW_STALL_NS + frames * 1_000_000 {
                break;
            }
            core::hint::spin_loop();
        }
        Ok(crate::time::now_ns().saturating_sub(start))
    }

    fn stats(&self, nic: NicRole) -> Option<NicStats> {
        self.nic_index(nic).map(|n| self.nics[n].dev.stats)
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
