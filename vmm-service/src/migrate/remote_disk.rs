//! A remote disk target over the migration link: the source node writes a
//! disk that lives on the destination node (shared-nothing live
//! migration; quick storage migration's base copy). docs/DESIGN.md, "Live
//! migration between nodes", "Shared-nothing".
//!
//! Messages travel as sealed *disk frames* (`migration::seal`, kind 3),
//! beside the control messages and the stream, in order with them:
//!
//! ```text
//! write = 1 | slot:u8 | offset:u64 BE | data   (data: whole sectors, at most PIECE_BYTES)
//! flush = 2 | seq:u64 BE                        (a barrier: every earlier write durable)
//! ack   = 3 | seq:u64 BE                        (destination: barrier `seq` is durable)
//! error = 4 | UTF-8 text                        (destination: it cannot go on)
//! ```
//!
//! Source side: a [`RemoteLink`] (one per migration) queues the messages
//! its [`RemoteDisk`]s produce (one per disk, a `vstorage::VirtualDisk`
//! that a `MirroredDisk` writes as its destination); the job moves them
//! to the link with [`RemoteLink::pump`], at most [`WINDOW_BYTES`] of
//! write data unacknowledged, and hands every message from the
//! destination to [`RemoteLink::receive`]. A `RemoteDisk` never blocks: a
//! write is queued, a flush queues a barrier; what is durable on the
//! destination is what a barrier's ack covers ([`RemoteLink::ticket`],
//! [`RemoteLink::is_acked`]). Disks the guest writes through are
//! wrapped in a [`MirrorSlot`], whose `durability_ticket` /
//! `is_durable` let virtio-blk hold a request until the destination
//! acknowledged it.
//!
//! Destination side: a [`DiskSink`] creates the disks as partial files
//! (`FileStore::create_partial`), applies writes at virtual offsets to
//! their VHDX engines, answers a barrier only after the VHDX flush of
//! every disk succeeded, and at the end commits the files
//! ([`DiskSink::commit`]) or deletes them ([`DiskSink::discard`]).
//!
//! Bad input from the peer (an unknown slot or message, a write that is
//! not whole sectors or runs past its disk, an ack for a barrier never
//! sent) is an error naming it, which ends the migration; never a panic.
//! Memory is bounded: the sender's window, the sealer's disk queue.

use crate::disks::{Backing, DiskMeta, FileStore};
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use serde::{Deserialize, Serialize};
use vstorage::mirror::MirroredDisk;
use vstorage::vhdx::{self, CreateParams, Vhdx};
use vstorage::{BlockIo, DiskError, IoError, VirtualDisk};

/// Data bytes per write message (whole sectors of 512 and 4096 bytes; a
/// message fits one sealed frame).
pub const PIECE_BYTES: usize = 32 << 10;
/// Write data on the wire and not yet acknowledged durable, at most.
pub const WINDOW_BYTES: u64 = 2 << 20;
/// A barrier goes out after this much write data at the latest (so acks
/// flow back while the copy runs).
pub const BARRIER_BYTES: u64 = 512 << 10;
/// Either end gives up when the other is silent this long during the
/// disk copy: the source when nothing it sent is acknowledged, the
/// destination when nothing arrives (the source sends a barrier at least
/// every [`PING_NS`]).
pub const DISK_STALL_NS: u64 = 10_000_000_000;
/// A barrier goes out at least this often while the source waits for
/// nothing (so the destination knows it lives).
pub const PING_NS: u64 = 1_000_000_000;
/// Longest error text sent or shown.
pub const ERROR_TEXT_MAX: usize = 300;

const OP_WRITE: u8 = 1;
const OP_FLUSH: u8 = 2;
const OP_ACK: u8 = 3;
const OP_ERROR: u8 = 4;
const WRITE_HEADER: usize = 10;

/// A disk the destination creates (in `open`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Its virtio slot (0, 1, ... in order).
    pub slot: u8,
    /// The file's name; it goes to `STORE[:DIR]/NAME` on the destination.
    pub file: String,
    pub fixed: bool,
    pub virtual_bytes: u64,
    pub block_bytes: u32,
    pub sector_bytes: u32,
    /// Allocated data on the source (what the copy moves), for the
    /// destination's space check; 0 when unknown.
    #[serde(default)]
    pub allocated_bytes: u64,
}

/// Room a disk's file needs beyond its data (headers, log, tables), as
/// the space check counts it.
pub const FILE_OVERHEAD_BYTES: u64 = 8 << 20;

/// Whether `free_bytes` in a store hold the disks `specs` (a fixed disk
/// its whole size, a dynamic one its allocated data, each plus
/// [`FILE_OVERHEAD_BYTES`]); `Err` says how much is missing.
pub fn check_space(store: &str, free_bytes: u64, specs: &[DiskSpec]) -> Result<(), String> {
    let need = specs.iter().fold(0u64, |n, s| {
        let data = if s.fixed {
            s.virtual_bytes
        } else {
            s.allocated_bytes.min(s.virtual_bytes)
        };
        n.saturating_add(data).saturating_add(FILE_OVERHEAD_BYTES)
    });
    if need > free_bytes {
        return Err(format!(
            "not enough space in store {store:.40}: {} MiB free, the disks need {} MiB",
            free_bytes >> 20,
            need.div_ceil(1 << 20)
        ));
    }
    Ok(())
}

impl DiskSpec {
    /// The spec of `meta` (the disk in `slot`, of `sector_bytes`).
    pub fn of(slot: u8, meta: &DiskMeta, sector_bytes: u32) -> Self {
        Self {
            slot,
            file: meta.file_name(),
            fixed: meta.fixed,
            virtual_bytes: meta.virtual_bytes,
            block_bytes: meta.block_bytes,
            sector_bytes,
            allocated_bytes: 0,
        }
    }

    /// With `bytes` of allocated data (the destination's space check).
    pub fn with_allocated(mut self, bytes: u64) -> Self {
        self.allocated_bytes = bytes;
        self
    }
}

/// An error message for the peer.
pub fn error_message(why: &str) -> Vec<u8> {
    let mut m = alloc::vec![OP_ERROR];
    let mut end = why.len().min(ERROR_TEXT_MAX);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    m.extend_from_slice(&why.as_bytes()[..end]);
    m
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_be_bytes(a))
}

#[derive(Debug, Default)]
struct LinkState {
    /// Messages not yet on the wire: `(body, write data bytes)`.
    outbox: VecDeque<(Vec<u8>, u64)>,
    /// Write data queued, put on the wire, acknowledged (cumulative).
    queued: u64,
    on_wire: u64,
    acked: u64,
    /// Write data queued since the last barrier.
    unbarriered: u64,
    /// The last barrier queued (0: none yet) and the last acknowledged.
    last_seq: u64,
    acked_seq: u64,
    /// Barriers not acknowledged: `(seq, write data queued before it)`.
    barriers: VecDeque<(u64, u64)>,
    /// Why the link cannot carry writes any more.
    failed: Option<String>,
}

impl LinkState {
    fn barrier(&mut self) {
        self.last_seq += 1;
        let mut m = alloc::vec![OP_FLUSH];
        m.extend_from_slice(&self.last_seq.to_be_bytes());
        self.outbox.push_back((m, 0));
        self.barriers.push_back((self.last_seq, self.queued));
        self.unbarriered = 0;
    }
}

/// The source's end of the remote disks of one migration: the messages
/// waiting for the wire and what the destination acknowledged. Clones
/// share it (the node has one thread).
#[derive(Clone, Debug, Default)]
pub struct RemoteLink(Rc<RefCell<LinkState>>);

impl RemoteLink {
    pub fn new() -> Self {
        Self::default()
    }

    /// The remote disk in `slot` of `virtual_bytes` with sectors of
    /// `sector_bytes`.
    pub fn disk(&self, slot: u8, virtual_bytes: u64, sector_bytes: u32) -> RemoteDisk {
        RemoteDisk {
            link: self.clone(),
            slot,
            virtual_bytes,
            sector_bytes,
        }
    }

    /// Move queued messages to the wire through `send` while the window
    /// allows. `Err`: `send` failed (the link is then failed).
    pub fn pump(&self, send: &mut dyn FnMut(&[u8]) -> Result<(), String>) -> Result<(), String> {
        let mut s = self.0.borrow_mut();
        if let Some(why) = &s.failed {
            return Err(why.clone());
        }
        while let Some((_, data)) = s.outbox.front() {
            let data = *data;
            if data > 0 && s.on_wire.saturating_sub(s.acked) >= WINDOW_BYTES {
                break;
            }
            let Some((body, _)) = s.outbox.pop_front() else {
                break;
            };
            if let Err(e) = send(&body) {
                s.failed = Some(e.clone());
                return Err(e);
            }
            s.on_wire += data;
        }
        Ok(())
    }

    /// A message from the destination: an ack (or its error, which fails
    /// the link). `Err`: the destination failed or broke the protocol.
    pub fn receive(&self, body: &[u8]) -> Result<(), String> {
        let r = self.receive_inner(body);
        if let Err(e) = &r {
            self.fail(e);
        }
        r
    }

    fn receive_inner(&self, body: &[u8]) -> Result<(), String> {
        let mut s = self.0.borrow_mut();
        match body.first() {
            Some(&OP_ACK) if body.len() == 9 => {
                let seq = u64_at(body, 1).unwrap_or(0);
                if seq <= s.acked_seq || seq > s.last_seq {
                    return Err(format!(
                        "the destination acknowledged disk barrier {seq}, which is not outstanding"
                    ));
                }
                while let Some(&(b, bytes)) = s.barriers.front() {
                    if b > seq {
                        break;
                    }
                    s.acked = s.acked.max(bytes);
                    s.barriers.pop_front();
                }
                s.acked_seq = seq;
                Ok(())
            }
            Some(&OP_ERROR) => {
                let text = String::from_utf8_lossy(&body[1..body.len().min(ERROR_TEXT_MAX + 1)]);
                Err(format!("the destination's disks failed: {text}"))
            }
            _ => Err(format!(
                "the destination sent a malformed disk message ({} bytes)",
                body.len()
            )),
        }
    }

    /// Stop: every later write fails, every ticket counts as durable (the
    /// mirror goes; the source holds the writes).
    pub fn fail(&self, why: &str) {
        self.0.borrow_mut().failed.get_or_insert_with(|| why.into());
    }

    /// Why the link failed, if it did.
    pub fn failed(&self) -> Option<String> {
        self.0.borrow().failed.clone()
    }

    /// Queue a barrier whatever was written (a sign of life).
    pub fn ping(&self) {
        self.0.borrow_mut().barrier();
    }

    /// Queue a barrier if writes were queued since the last one.
    pub fn sync(&self) {
        let mut s = self.0.borrow_mut();
        if s.unbarriered > 0 {
            s.barrier();
        }
    }

    /// A ticket covering every write queued so far (the last barrier;
    /// writes since it are covered once [`RemoteLink::sync`] ran).
    pub fn ticket(&self) -> u64 {
        self.0.borrow().last_seq
    }

    /// Whether barrier `ticket` is acknowledged (or the link failed).
    pub fn is_acked(&self, ticket: u64) -> bool {
        let s = self.0.borrow();
        s.acked_seq >= ticket || s.failed.is_some()
    }

    /// Nothing queued or unacknowledged: every write so far is durable on
    /// the destination.
    pub fn drained(&self) -> bool {
        let s = self.0.borrow();
        s.failed.is_none() && s.outbox.is_empty() && s.unbarriered == 0 && s.acked_seq == s.last_seq
    }

    /// Whether everything queued is on the wire.
    pub fn outbox_empty(&self) -> bool {
        self.0.borrow().outbox.is_empty()
    }

    /// Whether a copier may queue more: queued and unacknowledged write
    /// data under the window.
    pub fn has_room(&self) -> bool {
        let s = self.0.borrow();
        s.queued.saturating_sub(s.acked) < WINDOW_BYTES
    }

    /// Write data `(queued, acknowledged durable)`, bytes.
    pub fn bytes(&self) -> (u64, u64) {
        let s = self.0.borrow();
        (s.queued, s.acked)
    }
}

/// One disk on the destination, as the source writes it: writes are
/// queued on the [`RemoteLink`], a flush queues a barrier. It never
/// blocks; durability is the link's tickets.
#[derive(Debug)]
pub struct RemoteDisk {
    link: RemoteLink,
    slot: u8,
    virtual_bytes: u64,
    sector_bytes: u32,
}

impl RemoteDisk {
    fn failed(&self) -> Result<(), DiskError> {
        match self.link.failed() {
            Some(why) => Err(DiskError::Io(IoError::Host {
                op: "remote write",
                detail: why,
            })),
            None => Ok(()),
        }
    }
}

impl VirtualDisk for RemoteDisk {
    fn virtual_size(&self) -> u64 {
        self.virtual_bytes
    }
    fn logical_sector_size(&self) -> u32 {
        self.sector_bytes
    }
    fn read(&mut self, _: u64, _: &mut [u8]) -> Result<(), DiskError> {
        Err(DiskError::Request(
            "a remote disk is written only (the source is read)".into(),
        ))
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        vstorage::io::check_request(offset, data.len(), self.sector_bytes, self.virtual_bytes)?;
        self.failed()?;
        let mut s = self.link.0.borrow_mut();
        for (i, piece) in data.chunks(PIECE_BYTES).enumerate() {
            let mut m = Vec::with_capacity(WRITE_HEADER + piece.len());
            m.push(OP_WRITE);
            m.push(self.slot);
            m.extend_from_slice(&(offset + (i * PIECE_BYTES) as u64).to_be_bytes());
            m.extend_from_slice(piece);
            s.outbox.push_back((m, piece.len() as u64));
            s.queued += piece.len() as u64;
            s.unbarriered += piece.len() as u64;
            if s.unbarriered >= BARRIER_BYTES {
                s.barrier();
            }
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        self.failed()?;
        self.link.sync();
        Ok(())
    }
}

/// A disk mirrored to the destination.
pub type Mirror = MirroredDisk<Box<dyn VirtualDisk>, RemoteDisk>;

/// The VM's view of a disk being mirrored to another node: the mirror
/// (shared with the job that steps its copy) and the link whose tickets
/// say when a write is durable there.
pub struct MirrorSlot {
    pub mirror: Rc<RefCell<Mirror>>,
    pub link: RemoteLink,
}

impl VirtualDisk for MirrorSlot {
    fn virtual_size(&self) -> u64 {
        self.mirror.borrow().virtual_size()
    }
    fn logical_sector_size(&self) -> u32 {
        self.mirror.borrow().logical_sector_size()
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.mirror.borrow_mut().read(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.mirror.borrow_mut().write(offset, data)
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        self.mirror.borrow_mut().flush()
    }
    fn allocated_ranges(&mut self) -> Result<Vec<(u64, u64)>, DiskError> {
        self.mirror.borrow_mut().allocated_ranges()
    }
    fn durability_ticket(&mut self) -> Option<u64> {
        if !self.mirror.borrow().state().mirrors() {
            return None;
        }
        self.link.sync();
        Some(self.link.ticket())
    }
    fn is_durable(&mut self, ticket: u64) -> bool {
        !self.mirror.borrow().state().mirrors() || self.link.is_acked(ticket)
    }
}

/// Stands in for a disk whose source was lost (never expected: the
/// mirror hands it back); every request fails.
struct Lost {
    size: u64,
    sector: u32,
}

impl VirtualDisk for Lost {
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn logical_sector_size(&self) -> u32 {
        self.sector
    }
    fn read(&mut self, _: u64, _: &mut [u8]) -> Result<(), DiskError> {
        Err(DiskError::Request("the disk was lost".into()))
    }
    fn write(&mut self, _: u64, _: &[u8]) -> Result<(), DiskError> {
        Err(DiskError::Request("the disk was lost".into()))
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        Err(DiskError::Request("the disk was lost".into()))
    }
}

/// Bytes a copy step moves at once.
pub const COPY_CHUNK_BYTES: u32 = 256 << 10;

/// The source's side of a shared-nothing move: every disk of the VM
/// mirrored to the destination over one [`RemoteLink`] (the VM's disks
/// are [`MirrorSlot`]s meanwhile), copied one after another.
pub struct Mirrors {
    pub link: RemoteLink,
    mirrors: Vec<Rc<RefCell<Mirror>>>,
    /// The disk being copied.
    next: usize,
    /// The VM's own disk files (`STORE:path`), deleted once it runs on
    /// the destination.
    pub files: Vec<String>,
    /// The copy's rate limit, bytes per second (0: none), and when it
    /// started.
    rate_bytes_per_s: u64,
    started_ns: Option<u64>,
}

impl Mirrors {
    /// Mirror every disk of `vm` to the destination. `Err`: the VM keeps
    /// its disks as they were.
    pub fn install(vm: &mut crate::vm::Vm) -> Result<Self, String> {
        let link = RemoteLink::new();
        let (disks, meta) = vm.take_disks();
        let mut ranges_ok = Ok(());
        let mut sources = Vec::new();
        for (slot, mut d) in disks.into_iter().enumerate() {
            // The plan's ranges are read again by the mirror; a disk that
            // cannot say them is refused before it is handed over.
            if let Err(e) = d.allocated_ranges() {
                ranges_ok = Err(format!("disk {slot}: cannot read its allocation: {e}"));
            }
            sources.push(d);
        }
        if let Err(e) = ranges_ok {
            vm.set_disks(sources, meta);
            return Err(e);
        }
        let files = meta
            .iter()
            .filter_map(|m| match &m.backing {
                Backing::File { location } => Some(location.clone()),
                Backing::Memory { .. } => None,
            })
            .collect();
        let opts = vstorage::copy::CopyOptions {
            // The destination is a new dynamic or fixed VHDX: zero chunks
            // stay holes.
            skip_zero_chunks: true,
            chunk_bytes: COPY_CHUNK_BYTES,
        };
        let mut mirrors = Vec::new();
        let mut slots: Vec<Box<dyn VirtualDisk>> = Vec::new();
        let mut it = sources.into_iter().enumerate();
        while let Some((slot, d)) = it.next() {
            let (size, sector) = (d.virtual_size(), d.logical_sector_size());
            let remote = link.disk(slot as u8, size, sector);
            match MirroredDisk::new(d, remote, opts) {
                Ok(m) => {
                    let m = Rc::new(RefCell::new(m));
                    slots.push(Box::new(MirrorSlot {
                        mirror: m.clone(),
                        link: link.clone(),
                    }));
                    mirrors.push(m);
                }
                Err(e) => {
                    // Only the allocation map can fail here (read just
                    // before); the disk went with it. The others go back.
                    log::warn!("shared-nothing migration: disk {slot} lost: {e}");
                    link.fail("cancelled");
                    drop(slots);
                    let mut back: Vec<Box<dyn VirtualDisk>> = Vec::new();
                    for m in mirrors {
                        let (size, sector) = {
                            let b = m.borrow();
                            (b.virtual_size(), b.logical_sector_size())
                        };
                        let _ = m.borrow_mut().cancel();
                        match Rc::try_unwrap(m)
                            .ok()
                            .and_then(|c| c.into_inner().into_parts().0)
                        {
                            Some(d) => back.push(d),
                            None => back.push(Box::new(Lost { size, sector })),
                        }
                    }
                    back.push(Box::new(Lost { size, sector }));
                    back.extend(it.map(|(_, d)| d));
                    vm.set_disks(back, meta);
                    return Err(format!("disk {slot}: {e}"));
                }
            }
        }
        vm.set_disks(slots, meta);
        Ok(Self {
            link,
            mirrors,
            next: 0,
            files,
            rate_bytes_per_s: 0,
            started_ns: None,
        })
    }

    /// The copy limited to `bytes_per_s` (0: none; guest writes are
    /// mirrored whatever the limit).
    pub fn with_rate(mut self, bytes_per_s: u64) -> Self {
        self.rate_bytes_per_s = bytes_per_s;
        self
    }

    /// The disk specs for the destination's `open` (by slot).
    pub fn specs(vm: &mut crate::vm::Vm) -> Vec<DiskSpec> {
        let metas = vm.disk_meta().to_vec();
        let mut v = Vec::new();
        for (slot, m) in metas.iter().enumerate() {
            let (sector, allocated) = match vm.disk_mut(slot as u8) {
                Some(d) => (
                    d.logical_sector_size(),
                    d.allocated_ranges()
                        .map(|r| r.iter().map(|x| x.1).sum())
                        .unwrap_or(0),
                ),
                None => (512, 0),
            };
            v.push(DiskSpec::of(slot as u8, m, sector).with_allocated(allocated));
        }
        v
    }

    /// Copy until `clock` reaches `end_ns` or the window is full. `Ok(true)`
    /// once every disk is mirrored and every write so far is durable on
    /// the destination.
    pub fn step(&mut self, clock: &dyn Fn() -> u64, end_ns: u64) -> Result<bool, String> {
        let started = *self.started_ns.get_or_insert_with(clock);
        loop {
            if let Some(why) = self.link.failed() {
                return Err(why);
            }
            let Some(m) = self.mirrors.get(self.next) else {
                self.link.sync();
                return Ok(self.link.drained());
            };
            // The limit is the copy's: mirrored guest writes go whatever
            // it (counting them would starve the copy of a guest that
            // writes faster than the limit, and the move would never end).
            let elapsed = clock().saturating_sub(started);
            let limited = !crate::storage_migration::under_rate(
                self.bytes().0,
                elapsed,
                self.rate_bytes_per_s,
            );
            if !self.link.has_room() || limited {
                return Ok(false);
            }
            let step = m.borrow_mut().step_timed(clock);
            match step {
                Ok(vstorage::mirror::Step::Copied(_)) => {}
                Ok(vstorage::mirror::Step::Mirrored) => self.next += 1,
                Err(e) => {
                    let why = self.link.failed().unwrap_or_else(|| format!("{e}"));
                    return Err(format!("disk {}: {why}", self.next));
                }
            }
            if clock() >= end_ns {
                return Ok(false);
            }
        }
    }

    /// Allocated bytes copied and to copy, over every disk.
    pub fn bytes(&self) -> (u64, u64) {
        self.mirrors.iter().fold((0, 0), |(d, t), m| {
            let p = m.borrow().progress();
            (d + p.bytes_copied, t + p.bytes_total)
        })
    }

    /// The move failed or was cancelled: the VM gets its own disks back
    /// (they hold every write), the mirror stops.
    pub fn restore(self, vm: &mut crate::vm::Vm) {
        self.link.fail("the migration ended");
        let (slots, meta) = vm.take_disks();
        let sizes: Vec<(u64, u32)> = slots
            .iter()
            .map(|d| (d.virtual_size(), d.logical_sector_size()))
            .collect();
        drop(slots);
        let mut disks: Vec<Box<dyn VirtualDisk>> = Vec::new();
        let mut mirrors = self.mirrors.into_iter();
        for (slot, (size, sector)) in sizes.into_iter().enumerate() {
            let source = mirrors.next().and_then(|m| {
                let _ = m.borrow_mut().cancel();
                Rc::try_unwrap(m).ok().map(RefCell::into_inner)
            });
            match source.and_then(|m| m.into_parts().0) {
                Some(d) => disks.push(d),
                None => {
                    log::warn!("shared-nothing migration: the source of disk {slot} was lost");
                    disks.push(Box::new(Lost { size, sector }));
                }
            }
        }
        vm.set_disks(disks, meta);
    }
}

/// One disk being received.
struct SinkDisk {
    slot: u8,
    location: String,
    disk: Vhdx<Box<dyn BlockIo>>,
    spec: DiskSpec,
}

/// The destination's end: the disks it creates and writes.
pub struct DiskSink {
    files: Rc<dyn FileStore>,
    disks: Vec<SinkDisk>,
    /// Write data applied (bytes).
    pub applied: u64,
    committed: bool,
}

/// Whether `name` is a plain file name (no directory, no `..`).
fn file_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl DiskSink {
    /// Create the disks `specs` of VM `vm` in `store` (`STORE[:DIR]`;
    /// `None`: the default store's layout, `STORE:vms/VM/`), as partial
    /// files. `Err` names why not (nothing is left behind then).
    pub fn create(
        files: Rc<dyn FileStore>,
        vm: &str,
        store: Option<&str>,
        specs: &[DiskSpec],
    ) -> Result<Self, String> {
        if specs.len() > crate::devices::MAX_VIRTIO_SLOTS {
            return Err(format!("{} disks is too many", specs.len()));
        }
        let to = match store {
            Some(s) => String::from(s),
            None => files
                .default_store()
                .ok_or_else(|| String::from("this node has no store for the disks"))?,
        };
        let store_name = to.split_once(':').map_or(to.as_str(), |(s, _)| s);
        if !files.has_store(store_name) {
            return Err(format!("no store named '{store_name:.40}' on this node"));
        }
        let mut sink = Self {
            files,
            disks: Vec::new(),
            applied: 0,
            committed: false,
        };
        for (i, spec) in specs.iter().enumerate() {
            if usize::from(spec.slot) != i {
                sink.discard();
                return Err(format!("disk {i} comes as slot {}", spec.slot));
            }
            if !file_name_ok(&spec.file) {
                sink.discard();
                return Err(format!("'{:.40}' is not a disk file name", spec.file));
            }
            if !matches!(spec.sector_bytes, 512 | 4096) {
                sink.discard();
                return Err(format!("sectors of {} bytes", spec.sector_bytes));
            }
            let location = crate::storage_migration::location_in(&to, vm, &spec.file);
            if let Err(e) = crate::vmconfig::check_location(&location) {
                sink.discard();
                return Err(e);
            }
            if sink.disks.iter().any(|d| d.location == location) {
                sink.discard();
                return Err(format!("two disks named {location}"));
            }
            if sink.files.file_bytes(&location).is_some() {
                sink.discard();
                return Err(format!("{location} exists on this node"));
            }
            let file = match sink.files.create_partial(&location) {
                Ok(f) => f,
                Err(e) => {
                    sink.discard();
                    return Err(format!("cannot create {location}: {e}"));
                }
            };
            let params = CreateParams {
                virtual_size: spec.virtual_bytes,
                block_size: spec.block_bytes,
                logical_sector_size: spec.sector_bytes,
                physical_sector_size: 4096,
                fixed: spec.fixed,
                parent: None,
                guid_seed: spec.virtual_bytes ^ u64::from(spec.slot),
            };
            match vhdx::create(file, &params) {
                Ok(disk) => sink.disks.push(SinkDisk {
                    slot: spec.slot,
                    location,
                    disk,
                    spec: spec.clone(),
                }),
                Err(e) => {
                    sink.files.remove_partial(&location);
                    sink.discard();
                    return Err(format!("cannot create {location}: {e}"));
                }
            }
        }
        Ok(sink)
    }

    /// Where the disks go, by slot.
    pub fn locations(&self) -> Vec<String> {
        self.disks.iter().map(|d| d.location.clone()).collect()
    }

    /// Apply one message from the source; `Ok(Some(reply))` for a barrier
    /// (its ack, sent once every disk is flushed). `Err`: the message is
    /// bad or a disk failed (the migration ends; send
    /// [`error_message`]).
    pub fn apply(&mut self, body: &[u8]) -> Result<Option<Vec<u8>>, String> {
        match body.first() {
            Some(&OP_WRITE) if body.len() >= WRITE_HEADER => {
                let slot = body[1];
                let offset = u64_at(body, 2).unwrap_or(0);
                let data = &body[WRITE_HEADER..];
                let d = self
                    .disks
                    .iter_mut()
                    .find(|d| d.slot == slot)
                    .ok_or_else(|| format!("a disk write for slot {slot}, which is not sent"))?;
                vstorage::io::check_request(
                    offset,
                    data.len(),
                    d.spec.sector_bytes,
                    d.spec.virtual_bytes,
                )
                .map_err(|e| format!("a disk write for slot {slot}: {e}"))?;
                d.disk
                    .write(offset, data)
                    .map_err(|e| format!("{}: {e}", d.location))?;
                self.applied += data.len() as u64;
                Ok(None)
            }
            Some(&OP_FLUSH) if body.len() == 9 => {
                for d in &mut self.disks {
                    d.disk.flush().map_err(|e| format!("{}: {e}", d.location))?;
                }
                let mut ack = alloc::vec![OP_ACK];
                ack.extend_from_slice(&body[1..9]);
                Ok(Some(ack))
            }
            Some(&OP_ERROR) => {
                let text = String::from_utf8_lossy(&body[1..body.len().min(ERROR_TEXT_MAX + 1)]);
                Err(format!("the source's disks failed: {text}"))
            }
            _ => Err(format!("a malformed disk message ({} bytes)", body.len())),
        }
    }

    /// Flush every disk and give its file its final name: the disks the
    /// VM runs on here, with what the node knows of them (by slot).
    /// After an `Err` [`DiskSink::discard`] removes what is left.
    pub fn commit(&mut self) -> Result<(), String> {
        for d in &mut self.disks {
            d.disk.flush().map_err(|e| format!("{}: {e}", d.location))?;
        }
        for d in &self.disks {
            self.files
                .commit_partial(&d.location)
                .map_err(|e| format!("cannot name {}: {e}", d.location))?;
        }
        self.committed = true;
        Ok(())
    }

    /// Whether [`DiskSink::commit`] succeeded.
    pub fn is_committed(&self) -> bool {
        self.committed
    }

    /// The committed disks and their metadata (by slot).
    pub fn into_disks(self) -> (Vec<Box<dyn VirtualDisk>>, Vec<DiskMeta>) {
        let mut disks: Vec<Box<dyn VirtualDisk>> = Vec::new();
        let mut meta = Vec::new();
        for d in self.disks {
            meta.push(DiskMeta {
                backing: Backing::File {
                    location: d.location,
                },
                fixed: d.spec.fixed,
                virtual_bytes: d.spec.virtual_bytes,
                block_bytes: d.spec.block_bytes,
                checkpoint: None,
            });
            disks.push(Box::new(d.disk));
        }
        (disks, meta)
    }

    /// Give up: close the disks and delete their files (partial, or
    /// committed for a VM that did not stay here).
    pub fn discard(&mut self) {
        for d in self.disks.drain(..) {
            let location = d.location;
            drop(d.disk);
            if self.committed {
                if let Err(e) = self.files.remove(&location) {
                    log::warn!("shared-nothing migration: cannot delete {location}: {e}");
                }
            } else {
                self.files.remove_partial(&location);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage_migration::testing::MemFiles;
    use vstorage::copy::CopyOptions;
    use vstorage::mirror::Step;
    use vstorage::vhdx::OpenOptions;

    const MIB: u64 = 1 << 20;

    fn spec(slot: u8, file: &str) -> DiskSpec {
        DiskSpec {
            slot,
            file: file.into(),
            fixed: false,
            virtual_bytes: 8 * MIB,
            block_bytes: MIB as u32,
            sector_bytes: 512,
            allocated_bytes: 0,
        }
    }

    #[test]
    fn the_space_check_counts_fixed_disks_whole_and_dynamic_ones_by_data() {
        let mut a = spec(0, "a.vhdx");
        a.allocated_bytes = 3 * MIB;
        let mut b = spec(1, "b.vhdx");
        b.fixed = true;
        let need = 3 * MIB + 8 * MIB + 2 * FILE_OVERHEAD_BYTES;
        assert!(check_space("local", need, &[a.clone(), b.clone()]).is_ok());
        let e = check_space("local", need - 1, &[a, b]).unwrap_err();
        assert_eq!(
            e,
            "not enough space in store local: 26 MiB free, the disks need 27 MiB"
        );
    }

    fn local_disk(seed: u8) -> (Box<dyn VirtualDisk>, Vec<u8>) {
        let mut d = vhdx::create(
            vstorage::MemIo::new(),
            &CreateParams {
                virtual_size: 8 * MIB,
                block_size: MIB as u32,
                logical_sector_size: 512,
                physical_sector_size: 4096,
                fixed: false,
                parent: None,
                guid_seed: 1,
            },
        )
        .unwrap();
        let mut image = alloc::vec![0u8; (8 * MIB) as usize];
        for (i, at) in [0u64, 3 * MIB + 4096, 7 * MIB].into_iter().enumerate() {
            let data: Vec<u8> = (0..200_000u32)
                .map(|k| (k as u8).wrapping_mul(seed).wrapping_add(i as u8))
                .collect();
            let data = &data[..(data.len() / 512) * 512];
            let end = (at as usize + data.len()).min(image.len());
            let data = &data[..end - at as usize];
            d.write(at, data).unwrap();
            image[at as usize..end].copy_from_slice(data);
        }
        (Box::new(d), image)
    }

    /// Move every message both ways until nothing moves.
    fn run(link: &RemoteLink, sink: &mut DiskSink) {
        loop {
            let mut sent = Vec::new();
            link.pump(&mut |b| {
                sent.push(b.to_vec());
                Ok(())
            })
            .unwrap();
            if sent.is_empty() {
                break;
            }
            for m in sent {
                if let Some(r) = sink.apply(&m).unwrap() {
                    link.receive(&r).unwrap();
                }
            }
        }
    }

    fn read_back(files: &MemFiles, at: &str) -> Vec<u8> {
        let io: Box<dyn BlockIo> = files.open(at).unwrap();
        let mut d = Vhdx::open(io, OpenOptions::read_only()).unwrap();
        let mut out = alloc::vec![0u8; d.virtual_size() as usize];
        d.read(0, &mut out).unwrap();
        out
    }

    #[test]
    fn a_mirrored_disk_arrives_whole_with_guest_writes_acknowledged_only_when_durable() {
        let files = MemFiles::new(64 * MIB);
        let mut sink =
            DiskSink::create(Rc::new(files.clone()), "v", None, &[spec(0, "v.vhdx")]).unwrap();
        assert_eq!(sink.locations(), ["local:vms/v/v.vhdx"]);
        assert!(files
            .names()
            .contains(&"local:vms/v/v.vhdx.partial-a".into()));
        let link = RemoteLink::new();
        let (local, mut image) = local_disk(3);
        let opts = CopyOptions {
            skip_zero_chunks: true,
            chunk_bytes: 64 << 10,
        };
        let mirror = MirroredDisk::new(local, link.disk(0, 8 * MIB, 512), opts).unwrap();
        let mut slot = MirrorSlot {
            mirror: Rc::new(RefCell::new(mirror)),
            link: link.clone(),
        };
        let mut steps = 0;
        loop {
            // A guest write behind and ahead of the cursor now and then.
            if steps % 7 == 3 {
                let at = (steps as u64 * 40_960) % (8 * MIB - 8192);
                let at = at - at % 512;
                let data = alloc::vec![steps as u8 | 1; 8192];
                slot.write(at, &data).unwrap();
                image[at as usize..at as usize + 8192].copy_from_slice(&data);
                let t = slot.durability_ticket().unwrap();
                assert!(!slot.is_durable(t), "not before the destination's ack");
                run(&link, &mut sink);
                assert!(slot.is_durable(t), "after it");
            }
            if !link.has_room() {
                run(&link, &mut sink);
            }
            let step = slot.mirror.borrow_mut().step().unwrap();
            steps += 1;
            if step == Step::Mirrored {
                break;
            }
        }
        run(&link, &mut sink);
        assert!(link.drained());
        sink.commit().unwrap();
        let (disks, meta) = sink.into_disks();
        assert_eq!(disks.len(), 1);
        assert_eq!(meta[0].location(), "local:vms/v/v.vhdx");
        drop(disks);
        assert_eq!(files.names(), ["local:vms/v/v.vhdx"]);
        assert!(read_back(&files, "local:vms/v/v.vhdx") == image);
        // Zero chunks stayed holes: far less than the disk moved.
        assert!(link.bytes().0 < 2 * MIB, "{:?}", link.bytes());
    }

    #[test]
    fn the_window_bounds_unacknowledged_bytes_and_a_failed_link_releases_the_guest() {
        let link = RemoteLink::new();
        let mut d = link.disk(0, 64 * MIB, 512);
        d.write(0, &alloc::vec![1u8; (8 * MIB) as usize]).unwrap();
        let mut on_wire = 0u64;
        link.pump(&mut |b| {
            if b[0] == OP_WRITE {
                on_wire += (b.len() - WRITE_HEADER) as u64;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(on_wire, WINDOW_BYTES);
        assert!(!link.has_room());
        // Acks for barriers never sent, and garbage: errors, never panics.
        assert!(link.receive(&[OP_ACK, 0, 0, 0, 0, 0, 0, 0, 99]).is_err());
        assert!(link.failed().is_some());
        assert!(link.is_acked(link.ticket()), "a failed link holds no one");
        assert!(d.write(0, &[0u8; 512]).is_err());
        assert!(d.flush().is_err());
        let link = RemoteLink::new();
        assert!(link.receive(&[]).is_err());
        let link = RemoteLink::new();
        let e = link.receive(&error_message("store full")).unwrap_err();
        assert!(e.contains("store full"), "{e}");
        // Unaligned or out-of-range writes are refused at the source too.
        let link = RemoteLink::new();
        let mut d = link.disk(0, MIB, 512);
        assert!(d.write(100, &[0u8; 512]).is_err());
        assert!(d.write(MIB, &[0u8; 512]).is_err());
    }

    #[test]
    fn the_sink_refuses_bad_opens_and_bad_messages_and_cleans_up() {
        let files = MemFiles::new(64 * MIB);
        let rc: Rc<dyn FileStore> = Rc::new(files.clone());
        let e = DiskSink::create(rc.clone(), "v", Some("nosuch"), &[spec(0, "a.vhdx")])
            .err()
            .unwrap();
        assert!(e.contains("no store named 'nosuch'"), "{e}");
        let e = DiskSink::create(rc.clone(), "v", None, &[spec(0, "../x")])
            .err()
            .unwrap();
        assert!(e.contains("not a disk file name"), "{e}");
        let e = DiskSink::create(
            rc.clone(),
            "v",
            None,
            &[spec(0, "a.vhdx"), spec(0, "b.vhdx")],
        )
        .err()
        .unwrap();
        assert!(e.contains("comes as slot"), "{e}");
        assert!(files.names().is_empty(), "{:?}", files.names());
        // A file of that name exists here.
        files.files.borrow_mut().insert(
            "local:d/a.vhdx".into(),
            crate::disks::MemFile::new(MIB).unwrap(),
        );
        let e = DiskSink::create(rc.clone(), "v", Some("local:d"), &[spec(0, "a.vhdx")])
            .err()
            .unwrap();
        assert!(e.contains("exists"), "{e}");
        // Too little room for a fixed disk.
        let small = MemFiles::new(MIB);
        let mut fixed = spec(0, "f.vhdx");
        fixed.fixed = true;
        let e = DiskSink::create(Rc::new(small.clone()), "v", None, &[fixed])
            .err()
            .unwrap();
        assert!(e.contains("cannot create"), "{e}");
        assert!(small.names().is_empty());

        let mut sink = DiskSink::create(rc, "v", Some("shared:x"), &[spec(0, "a.vhdx")]).unwrap();
        let mut w = alloc::vec![OP_WRITE, 1];
        w.extend_from_slice(&0u64.to_be_bytes());
        w.extend_from_slice(&[0u8; 512]);
        assert!(sink.apply(&w).unwrap_err().contains("slot 1"));
        w[1] = 0;
        w[2..10].copy_from_slice(&(8 * MIB).to_be_bytes());
        assert!(sink.apply(&w).is_err(), "past the end");
        w[2..10].copy_from_slice(&3u64.to_be_bytes());
        assert!(sink.apply(&w).is_err(), "unaligned");
        assert!(sink.apply(&[OP_FLUSH, 1]).is_err());
        assert!(sink.apply(&[77]).is_err());
        assert!(sink.apply(&[]).is_err());
        assert_eq!(
            sink.apply(&[OP_FLUSH, 0, 0, 0, 0, 0, 0, 0, 5]).unwrap(),
            Some(alloc::vec![OP_ACK, 0, 0, 0, 0, 0, 0, 0, 5])
        );
        assert_eq!(
            files.names(),
            ["local:d/a.vhdx", "shared:x/a.vhdx.partial-a"]
        );
        sink.discard();
        assert_eq!(files.names(), ["local:d/a.vhdx"]);
    }
}
