//! A polled virtio-net driver (virtio 1.1, 5.1) on `virtio-drivers`'
//! [`VirtQueue`] and [`PciTransport`], and its [`smoltcp::phy::Device`].
//!
//! `virtio-drivers`' own `VirtIONetRaw` checks for a notification after
//! every frame it sends and every receive buffer it gives back; with
//! `VIRTIO_F_EVENT_IDX` (which it always negotiates) its `should_notify`
//! stays true while the device is behind, and every completion re-arms a
//! used-buffer interrupt. Each notification is a trapped MMIO write that
//! QEMU handles under its global lock, stalling this CPU while QEMU's I/O
//! thread is busy moving frames (docs/DESIGN.md, "Node networking", has the
//! counts). This driver instead:
//! * negotiates only `VERSION_1` and `MAC`; without `EVENT_IDX` the device
//!   suppresses notifications with the used ring's `NO_NOTIFY` flag while it
//!   is already working on a queue (virtio 1.1, 2.6.7.2), which QEMU sets
//!   for as long as its transmit bottom half runs and whenever it holds
//!   receive buffers;
//! * adds buffers without notifying and checks, once per batch
//!   ([`VirtioNic::kick`]), whether the device asked to be told, after a
//!   full fence (the flag read must not pass the index write; 2.6.13.6);
//! * asks for no used-buffer interrupts (`VIRTQ_AVAIL_F_NO_INTERRUPT`): the
//!   node polls;
//! * keeps 256 buffers per queue (QEMU's default queue size) so the device
//!   has a whole burst to work on between two polls;
//! * hands received frames to smoltcp in place and lets smoltcp build
//!   outgoing frames directly in a transmit buffer (no copy, no allocation
//!   per frame);
//! * does the TCP checksums itself, as a card's checksum offload would
//!   (`csum.rs`: eight bytes a step where smoltcp takes two): smoltcp is
//!   told the device computes and checks them, the transmit path fills them
//!   in and the receive path drops a TCP frame whose checksum is wrong
//!   before the stack sees it.
//!
//! Everything the device writes (used ring ids and lengths) is checked
//! before use: an unknown token or a length outside the buffer drops that
//! frame, never the node.

use super::csum;
use super::BENCH_ETHERTYPE;
use crate::virtio_hal::VirtioHal;
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use bitflags::bitflags;
use core::sync::atomic::{fence, Ordering};
use hvcore::host::NicStats;
use smoltcp::phy::{self, Checksum, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::Transport;

/// Buffers per virtqueue (QEMU's virtio-net `rx_queue_size` and
/// `tx_queue_size` default; the device's maximum is checked at set-up).
pub const QUEUE_SIZE: usize = 256;
/// Bytes per buffer: the header and a full frame, rounded up.
const BUFFER_BYTES: usize = 2048;
/// `struct virtio_net_hdr` with `num_buffers`, which a `VERSION_1` device
/// always uses (virtio 1.1, 5.1.6).
pub const HEADER_BYTES: usize = 12;
/// Largest frame sent (Ethernet header + 1500 bytes of IP).
pub const MTU_FRAME_BYTES: usize = 1514;
const _: () = assert!(HEADER_BYTES + MTU_FRAME_BYTES <= BUFFER_BYTES);

/// Receive queue index, transmit queue index (virtio 1.1, 5.1.2).
const RECEIVE_QUEUE: u16 = 0;
const TRANSMIT_QUEUE: u16 = 1;

bitflags! {
    /// The feature bits this driver accepts (virtio 1.1, 5.1.3 and 6).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Features: u64 {
        /// The device has a MAC address in its configuration space.
        const MAC = 1 << 5;
        /// Virtio 1.x (required of a modern device).
        const VERSION_1 = 1 << 32;
    }
}

/// Why a NIC could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NicError {
    /// The device does not offer virtio 1.x.
    NotModern,
    /// A virtqueue could not be set up (too small, or already in use).
    Queue,
    /// The configuration space could not be read.
    Config,
}

impl core::fmt::Display for NicError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            NicError::NotModern => "the device does not offer virtio 1.x",
            NicError::Queue => "cannot set up a virtqueue of 256 entries",
            NicError::Config => "cannot read the MAC address",
        })
    }
}

type Queue = VirtQueue<VirtioHal, QUEUE_SIZE>;

/// A buffer the device may access: its bytes never move (boxed) and nothing
/// touches them until the device has returned it.
type DmaBuffer = Box<[u8]>;

fn new_buffer() -> DmaBuffer {
    vec![0u8; BUFFER_BYTES].into_boxed_slice()
}

/// A received frame, taken off the used ring: its buffer returns to the
/// device through [`RxRing::repost`].
pub struct RxFrame {
    buf: DmaBuffer,
    len: usize,
}

impl RxFrame {
    /// The Ethernet frame.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[HEADER_BYTES..HEADER_BYTES + self.len]
    }
}

/// The receive queue and the buffers posted on it.
pub struct RxRing {
    queue: Queue,
    /// Posted buffers, by token.
    posted: Vec<Option<DmaBuffer>>,
    /// Buffers added since the last [`VirtioNic::kick`].
    added: usize,
    /// Buffers the device returned with an impossible length or token.
    bad: u64,
    /// TCP frames dropped for a wrong checksum.
    bad_checksums: u64,
    frames: u64,
    bytes: u64,
    bench_frames: u64,
}

impl RxRing {
    fn new(queue: Queue) -> Self {
        Self {
            queue,
            posted: (0..QUEUE_SIZE).map(|_| None).collect(),
            added: 0,
            bad: 0,
            bad_checksums: 0,
            frames: 0,
            bytes: 0,
            bench_frames: 0,
        }
    }

    /// Give `buf` to the device (no notification: [`VirtioNic::kick`]).
    fn post(&mut self, mut buf: DmaBuffer) {
        // SAFETY: the buffer is kept in `posted` (heap, never moved or
        // touched) until the device returns it through the used ring.
        match unsafe { self.queue.add(&[], &mut [&mut buf]) } {
            Ok(token) => match self.posted.get_mut(usize::from(token)) {
                Some(slot) => {
                    *slot = Some(buf);
                    self.added += 1;
                }
                None => unreachable!("virtqueue token {token} >= queue size"),
            },
            // Every buffer of the queue is posted already: keep none extra.
            Err(_) => drop(buf),
        }
    }

    /// Give a received frame's buffer back to the device.
    pub fn repost(&mut self, frame: RxFrame) {
        self.post(frame.buf);
    }

    /// The next frame from the device, benchmark frames counted and given
    /// back on the way.
    pub fn next_frame(&mut self) -> Option<RxFrame> {
        loop {
            let token = self.queue.peek_used()?;
            let Some(mut buf) = self
                .posted
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                // A used entry for a buffer we did not post: the device is
                // broken. Nothing can be recycled; the frame is lost.
                self.bad += 1;
                return None;
            };
            // SAFETY: `buf` is the buffer posted under `token`.
            let used = unsafe { self.queue.pop_used(token, &[], &mut [&mut buf]) };
            let len = used
                .ok()
                .and_then(|n| usize::try_from(n).ok())
                .and_then(|n| n.checked_sub(HEADER_BYTES))
                .filter(|n| HEADER_BYTES + n <= buf.len() && *n >= 14);
            let Some(len) = len else {
                self.bad += 1;
                self.post(buf);
                continue;
            };
            self.frames += 1;
            self.bytes += len as u64;
            let frame = RxFrame { buf, len };
            let ethertype = u16::from_be_bytes([frame.bytes()[12], frame.bytes()[13]]);
            if ethertype == BENCH_ETHERTYPE {
                self.bench_frames += 1;
                self.repost(frame);
                continue;
            }
            // The checksum smoltcp was told the device checks.
            if !csum::tcp_ok(frame.bytes()) {
                self.bad_checksums += 1;
                self.repost(frame);
                continue;
            }
            return Some(frame);
        }
    }
}

/// The transmit queue, its buffers in flight and its free buffers.
pub struct TxRing {
    queue: Queue,
    /// In-flight buffers by token, with the length handed to the device.
    in_flight: Vec<Option<(DmaBuffer, usize)>>,
    in_flight_count: usize,
    pool: Vec<DmaBuffer>,
    /// Frames added since the last [`VirtioNic::kick`].
    added: usize,
    bad: u64,
    frames: u64,
    bytes: u64,
}

impl TxRing {
    fn new(queue: Queue) -> Self {
        Self {
            queue,
            in_flight: (0..QUEUE_SIZE).map(|_| None).collect(),
            in_flight_count: 0,
            pool: Vec::new(),
            added: 0,
            bad: 0,
            frames: 0,
            bytes: 0,
        }
    }

    /// Take back the buffers the device has sent.
    pub fn reap(&mut self) {
        while let Some(token) = self.queue.peek_used() {
            let Some((buf, len)) = self
                .in_flight
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                self.bad += 1;
                return;
            };
            // SAFETY: the same buffer and length as given to `add`.
            if unsafe { self.queue.pop_used(token, &[&buf[..len]], &mut []) }.is_err() {
                self.bad += 1;
            }
            self.in_flight_count -= 1;
            self.pool.push(buf);
        }
    }

    /// Whether a frame can be queued now.
    pub fn has_room(&mut self) -> bool {
        if self.queue.available_desc() == 0 {
            self.reap();
        }
        self.queue.available_desc() > 0
    }

    /// Frames handed to the device and not yet sent.
    pub fn in_flight(&self) -> usize {
        self.in_flight_count
    }

    /// A free buffer with a zeroed header (no offloads: virtio 1.1, 5.1.6).
    fn buffer(&mut self) -> DmaBuffer {
        let mut buf = self.pool.pop().unwrap_or_else(new_buffer);
        buf[..HEADER_BYTES].fill(0);
        buf
    }

    /// Queue the frame that `fill` writes into `len` bytes (no notification:
    /// [`VirtioNic::kick`]). False when the queue is full or `len` is not a
    /// frame length; the frame is then dropped, as on a wire.
    pub fn send_with<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> (bool, R) {
        if !(14..=MTU_FRAME_BYTES).contains(&len) || !self.has_room() {
            let mut scratch = vec![0u8; len];
            return (false, fill(&mut scratch));
        }
        let mut buf = self.buffer();
        let total = HEADER_BYTES + len;
        let r = fill(&mut buf[HEADER_BYTES..total]);
        // SAFETY: the buffer is kept in `in_flight` (heap, untouched) until
        // the device returns it (`reap`).
        match unsafe { self.queue.add(&[&buf[..total]], &mut []) } {
            Ok(token) => match self.in_flight.get_mut(usize::from(token)) {
                Some(slot) => {
                    *slot = Some((buf, total));
                    self.in_flight_count += 1;
                    self.added += 1;
                    self.frames += 1;
                    self.bytes += len as u64;
                    (true, r)
                }
                None => unreachable!("virtqueue token {token} >= queue size"),
            },
            Err(_) => {
                self.pool.push(buf);
                (false, r)
            }
        }
    }
}

/// One virtio-net device, polled.
pub struct VirtioNic {
    transport: PciTransport,
    mac: [u8; 6],
    pub rx: RxRing,
    pub tx: TxRing,
    /// Notifications sent (trapped MMIO writes), per queue.
    rx_kicks: u64,
    tx_kicks: u64,
    /// Polls of the stack over this device.
    pub polls: u64,
}

impl VirtioNic {
    /// Initialise the device (virtio 1.1, 3.1.1) and post every receive
    /// buffer.
    pub fn new(mut transport: PciTransport) -> Result<Self, NicError> {
        let features = transport.begin_init(Features::MAC | Features::VERSION_1);
        if !features.contains(Features::VERSION_1) {
            return Err(NicError::NotModern);
        }
        let mac = if features.contains(Features::MAC) {
            // `mac` is the first field of `struct virtio_net_config`
            // (virtio 1.1, 5.1.4).
            transport
                .read_config_space::<[u8; 6]>(0)
                .map_err(|_| NicError::Config)?
        } else {
            // No MAC from the device: a locally administered one.
            [0x52, 0x54, 0x00, 0xff, 0xff, 0xff]
        };
        let rx =
            Queue::new(&mut transport, RECEIVE_QUEUE, false, false).map_err(|_| NicError::Queue)?;
        let tx = Queue::new(&mut transport, TRANSMIT_QUEUE, false, false)
            .map_err(|_| NicError::Queue)?;
        transport.finish_init();
        let mut nic = Self {
            transport,
            mac,
            rx: RxRing::new(rx),
            tx: TxRing::new(tx),
            rx_kicks: 0,
            tx_kicks: 0,
            polls: 0,
        };
        // Polled: no used-buffer notifications (virtio 1.1, 2.6.7.1).
        nic.rx.queue.set_dev_notify(false);
        nic.tx.queue.set_dev_notify(false);
        for _ in 0..QUEUE_SIZE {
            nic.rx.post(new_buffer());
        }
        nic.kick();
        Ok(nic)
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Tell the device about buffers added since the last call, if it asked
    /// to be told (the used ring's `NO_NOTIFY` flag is clear).
    pub fn kick(&mut self) {
        if self.rx.added == 0 && self.tx.added == 0 {
            return;
        }
        // The flag must be read after the ring index was written (virtio
        // 1.1, 2.6.13.6: "a memory barrier before reading flags"); x86 may
        // otherwise satisfy the load before the store is visible.
        fence(Ordering::SeqCst);
        if self.rx.added > 0 && self.rx.queue.should_notify() {
            self.transport.notify(RECEIVE_QUEUE);
            self.rx_kicks += 1;
        }
        if self.tx.added > 0 && self.tx.queue.should_notify() {
            self.transport.notify(TRANSMIT_QUEUE);
            self.tx_kicks += 1;
        }
        self.rx.added = 0;
        self.tx.added = 0;
    }

    /// Counters.
    pub fn stats(&self) -> NicStats {
        NicStats {
            rx_frames: self.rx.frames,
            tx_frames: self.tx.frames,
            rx_bytes: self.rx.bytes,
            tx_bytes: self.tx.bytes,
            rx_bench_frames: self.rx.bench_frames,
            rx_kicks: self.rx_kicks,
            tx_kicks: self.tx_kicks,
            device_errors: self.rx.bad + self.tx.bad,
            rx_bad_checksums: self.rx.bad_checksums,
            polls: self.polls,
        }
    }
}

/// A received frame on its way into smoltcp; its buffer goes back to the
/// device when the token is consumed or dropped.
pub struct NicRx<'a> {
    ring: &'a mut RxRing,
    frame: Option<RxFrame>,
}

impl Drop for NicRx<'_> {
    fn drop(&mut self) {
        if let Some(frame) = self.frame.take() {
            self.ring.repost(frame);
        }
    }
}

impl phy::RxToken for NicRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(mut self, f: F) -> R {
        match self.frame.take() {
            Some(frame) => {
                let r = f(frame.bytes());
                self.ring.repost(frame);
                r
            }
            None => unreachable!("an RxToken is built with its frame"),
        }
    }
}

/// Room for one frame in the transmit queue.
pub struct NicTx<'a>(&'a mut TxRing);

impl phy::TxToken for NicTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // A frame the device refuses is lost, as on a wire; TCP resends.
        self.0
            .send_with(len, |frame| {
                let r = f(frame);
                // smoltcp left the TCP checksum to the device.
                csum::fill_tcp(frame);
                r
            })
            .1
    }
}

impl phy::Device for VirtioNic {
    type RxToken<'a> = NicRx<'a>;
    type TxToken<'a> = NicTx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(NicRx<'_>, NicTx<'_>)> {
        let frame = self.rx.next_frame()?;
        Some((
            NicRx {
                ring: &mut self.rx,
                frame: Some(frame),
            },
            NicTx(&mut self.tx),
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<NicTx<'_>> {
        self.tx.has_room().then_some(NicTx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU_FRAME_BYTES;
        // TCP checksums are this driver's (`csum.rs`); IPv4 header and ICMP
        // checksums stay smoltcp's.
        caps.checksum.tcp = Checksum::None;
        caps
    }
}
