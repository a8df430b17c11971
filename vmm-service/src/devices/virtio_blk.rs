//! virtio-blk (virtio 1.2, 5.2) behind the virtio-mmio transport: a VM's
//! virtual disk.
//!
//! The model keeps the guest-visible state only (transport registers,
//! queue positions, the disk's size as the guest saw it); the bytes live
//! in a [`VirtualDisk`] the VM owns and hands to [`VirtioBlk::process`]
//! (a VHDX through vstorage, on whatever `BlockIo` the node has). That
//! split lets a live migration carry the device state while the disk stays
//! where it is, and lets storage migration swap the disk under a running
//! device.
//!
//! Requests (virtio 1.2, 5.2.6): a descriptor chain whose readable part
//! starts with the 16-byte header (type, reserved, sector) and whose last
//! writable byte is the status; the bytes between are the data (readable
//! for writes, writable for reads). Supported: `IN`, `OUT`, `FLUSH`,
//! `GET_ID`; anything else answers `UNSUPP`. A request that is not whole
//! sectors, runs past the disk, exceeds [`MAX_REQUEST_BYTES`] or finds no
//! disk answers `IOERR`, as does a disk error. A write is acknowledged
//! once the disk took it; `FLUSH` makes every acknowledged write durable
//! (the driver negotiates `VIRTIO_BLK_F_FLUSH`; without it the device is
//! write-through: each write is flushed before it is acknowledged).
//!
//! A full store is not an error the guest sees: a request whose disk call
//! fails with `IoError::NoSpace` (the VHDX engine leaves the disk usable
//! then) is *not completed*: it goes back to the available ring (the queue's
//! `last_avail` steps back over it), no status byte is written, nothing is
//! acknowledged, later requests wait behind it, and the device reports
//! [`VirtioBlk::store_full`]. The VM is paused on that; each later
//! [`VirtioBlk::process`] (the node's retry) serves the same request again
//! from the ring, in full (a write is idempotent), until it succeeds. The
//! stalled request needs no saved state: it is still in the guest's ring,
//! and a restored device looks at its ring once without a notify.
//!
//! A disk whose writes become durable later, elsewhere (a disk mirrored to
//! another node during a shared-nothing migration:
//! `VirtualDisk::durability_ticket`) holds a served `OUT` or `FLUSH` the
//! same way, without pausing anything: the request is done on the disk
//! but not completed; it goes back to the ring and the device remembers
//! it ([`VirtioBlk::held`]); each later `process` finds it first and
//! completes it, without serving it again, once the disk says the ticket
//! is durable. Later requests wait behind it. Should the VM move while
//! one is held, the destination serves it again from the ring (the same
//! bytes to the same place).
//!
//! Features offered: `SEG_MAX`, `FLUSH`, `RO` for a read-only disk. Memory
//! is bounded by one [`CHUNK_BYTES`] bounce buffer whatever the request.

use super::state::{expect_version, DeviceKind, Snapshot, StateError, StateReader, StateWriter};
use super::virtio_mmio::{Desc, QueueError, VirtioDevice, VirtioMmio};
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use hvcore::addr::Gpa;
use hvcore::mem::GuestMemory;
use vstorage::VirtualDisk;

/// Virtio device ID of a block device.
pub const DEVICE_ID: u32 = 2;
/// Bytes per virtio-blk sector (always 512, whatever the disk's own).
pub const SECTOR_BYTES: u64 = 512;
/// Largest request accepted.
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;
/// Bytes moved per disk call.
pub const CHUNK_BYTES: usize = 64 << 10;
/// Segments per request the driver may use (`seg_max`).
pub const SEG_MAX: u32 = 64;

/// Feature bits (virtio 1.2, 5.2.3).
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_FLUSH: u64 = 1 << 9;

/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
/// Status values.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Bytes of the `GET_ID` answer.
const ID_BYTES: usize = 20;

/// The device's configuration: what the guest sees of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Size in 512-byte sectors.
    pub capacity_sectors: u64,
    pub read_only: bool,
}

impl VirtioDevice for BlkConfig {
    fn device_id(&self) -> u32 {
        DEVICE_ID
    }
    fn features(&self) -> u64 {
        F_SEG_MAX | F_FLUSH | if self.read_only { F_RO } else { 0 }
    }
    fn num_queues(&self) -> usize {
        1
    }
    fn config_read(&self, offset: u64, data: &mut [u8]) {
        // virtio 1.2, 5.2.4: capacity (le64) at 0, size_max at 8, seg_max
        // at 12; the rest reads zero.
        let mut space = [0u8; 24];
        space[..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        space[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| space.get(o as usize))
                .copied()
                .unwrap_or(0);
        }
    }
}

/// What one [`VirtioBlk::process`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkCounters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Requests answered `IOERR` or `UNSUPP`.
    pub errors: u64,
}

/// One virtio-blk device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioBlk {
    mmio: VirtioMmio,
    config: BlkConfig,
    /// Counters since the VM was built here (not saved).
    pub counters: BlkCounters,
    /// The last protocol violation, for diagnostics (not saved).
    pub last_error: Option<QueueError>,
    /// The store behind the disk is full: the first request waiting in the
    /// ring failed with `NoSpace` (the error's text); `None` once it is
    /// served (not saved: the request is still in the ring).
    store_full: Option<String>,
    /// Restored from a saved state: requests the source left in the ring
    /// (one that waited for a full store) are served without a new notify.
    recheck: bool,
    /// A request served on a disk whose durability comes later (not
    /// saved: the request is still in the ring).
    held: Option<Held>,
}

/// A request done on the disk, waiting for its durability ticket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    head: u16,
    written: u32,
    ticket: u64,
}

/// How one request was served.
enum Served {
    /// Completed: bytes written into the guest's buffers (status included),
    /// and whether it wrote or flushed the disk.
    Done(u32, bool),
    /// The disk's store is full: not completed (the error's text).
    StoreFull(String),
}

/// The writable/readable bytes of a chain as one address space.
struct Segments<'a> {
    descs: &'a [Desc],
}

impl Segments<'_> {
    /// Total bytes of descriptors with `write`.
    fn total(&self, write: bool) -> u64 {
        self.descs
            .iter()
            .filter(|d| d.write == write)
            .map(|d| u64::from(d.len))
            .sum()
    }

    /// Copy between guest memory and `buf` at byte `offset` of the
    /// `write`-kind descriptors (device-writable ones are written).
    fn copy(
        &self,
        mem: &mut dyn GuestMemory,
        write: bool,
        mut offset: u64,
        buf: &mut [u8],
    ) -> Result<(), QueueError> {
        let mut done = 0usize;
        for d in self.descs.iter().filter(|d| d.write == write) {
            if done == buf.len() {
                break;
            }
            let len = u64::from(d.len);
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = ((len - offset) as usize).min(buf.len() - done);
            let gpa = Gpa(d.gpa.wrapping_add(offset));
            if write {
                mem.write(gpa, &buf[done..done + n])?;
            } else {
                mem.read(gpa, &mut buf[done..done + n])?;
            }
            done += n;
            offset = 0;
        }
        Ok(())
    }
}

impl VirtioBlk {
    /// Version of the saved state.
    pub const STATE_VERSION: u16 = 1;

    /// A disk of `capacity_bytes` (rounded down to whole sectors) in its
    /// reset state.
    pub fn new(capacity_bytes: u64, read_only: bool) -> Self {
        Self {
            mmio: VirtioMmio::new(),
            config: BlkConfig {
                capacity_sectors: capacity_bytes / SECTOR_BYTES,
                read_only,
            },
            counters: BlkCounters::default(),
            last_error: None,
            store_full: None,
            recheck: false,
            held: None,
        }
    }

    /// What the guest sees of the disk.
    pub fn config(&self) -> BlkConfig {
        self.config
    }

    /// The transport's registers.
    pub fn transport(&self) -> &VirtioMmio {
        &self.mmio
    }

    /// Guest MMIO read at `offset` in the slot's window.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        self.mmio.read(&self.config, offset, data);
    }

    /// Guest MMIO write at `offset`.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        let mut config = self.config;
        self.mmio.write(&mut config, offset, data);
    }

    /// Whether the guest notified a queue since the last
    /// [`VirtioBlk::process`], or a request waits for a full store.
    pub fn has_work(&self) -> bool {
        self.mmio.notified() != 0
            || self.store_full.is_some()
            || self.recheck
            || self.held.is_some()
    }

    /// Whether a served request waits for its disk's durability ticket.
    pub fn held(&self) -> bool {
        self.held.is_some()
    }

    /// Why a request waits (its store is full), if one does.
    pub fn store_full(&self) -> Option<&str> {
        self.store_full.as_deref()
    }

    /// The interrupt line (level).
    pub fn interrupt_line(&self) -> bool {
        self.mmio.interrupt_line()
    }

    /// Serve every request the guest made available, on `disk` (`None`:
    /// no disk attached, every request fails). `scratch` is reused
    /// between calls. Returns whether any request completed. A request
    /// that finds the store full stops the round and stays in the ring
    /// ([`VirtioBlk::store_full`]; the module doc).
    pub fn process(
        &mut self,
        mem: &mut dyn GuestMemory,
        mut disk: Option<&mut (dyn VirtualDisk + '_)>,
        scratch: &mut Vec<u8>,
    ) -> bool {
        self.mmio.take_notified();
        self.recheck = false;
        if !self.mmio.driver_ok() {
            return false;
        }
        let write_through = self.mmio.driver_features() & F_FLUSH == 0;
        let config = self.config;
        let mut chain = Vec::new();
        let mut completed = false;
        loop {
            let Some(queue) = self.mmio.queue_mut(0) else {
                return completed;
            };
            let head = match queue.pop(mem, &mut chain) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    self.fail(e);
                    return completed;
                }
            };
            if let Some(h) = self.held.take() {
                if h.head == head {
                    let durable = match &mut disk {
                        Some(d) => d.is_durable(h.ticket),
                        None => true,
                    };
                    if !durable {
                        queue.last_avail = queue.last_avail.wrapping_sub(1);
                        self.held = Some(h);
                        break;
                    }
                    if let Err(e) = queue.push_used(mem, head, h.written) {
                        self.fail(e);
                        return completed;
                    }
                    completed = true;
                    continue;
                }
                // Not the chain it held (a reset): serve what is there.
            }
            let mut counters = self.counters;
            let served = serve(
                &config,
                &chain,
                mem,
                match &mut disk {
                    Some(d) => Some(&mut **d),
                    None => None,
                },
                write_through,
                scratch,
                &mut counters,
            );
            self.counters = counters;
            let Some(queue) = self.mmio.queue_mut(0) else {
                return completed;
            };
            let written = match served {
                Ok(Served::Done(n, wrote)) => {
                    let ticket = match (&mut disk, wrote) {
                        (Some(d), true) => d.durability_ticket().filter(|&t| !d.is_durable(t)),
                        _ => None,
                    };
                    if let Some(ticket) = ticket {
                        // Done on the disk, durable later: back into the
                        // ring, remembered (the module doc).
                        queue.last_avail = queue.last_avail.wrapping_sub(1);
                        self.held = Some(Held {
                            head,
                            written: n,
                            ticket,
                        });
                        break;
                    }
                    n
                }
                Ok(Served::StoreFull(why)) => {
                    // Back into the ring, unanswered: served again by the
                    // next call. The driver may not touch a chain it made
                    // available until it is used, so it is the same one.
                    queue.last_avail = queue.last_avail.wrapping_sub(1);
                    if self.store_full.is_none() {
                        log::warn!("virtio-blk: {why}: the request waits for space");
                    }
                    self.store_full = Some(why);
                    break;
                }
                Err(e) => {
                    self.fail(e);
                    return completed;
                }
            };
            self.store_full = None;
            if let Err(e) = queue.push_used(mem, head, written) {
                self.fail(e);
                return completed;
            }
            completed = true;
        }
        let suppressed = self
            .mmio
            .queue_mut(0)
            .is_some_and(|q| q.interrupt_suppressed(mem));
        if completed && !suppressed {
            self.mmio.signal_used();
        }
        completed
    }

    fn fail(&mut self, e: QueueError) {
        log::warn!("virtio-blk: {e}: the device needs a reset");
        self.last_error = Some(e);
        self.mmio.set_needs_reset();
    }
}

/// Serve one request; returns the bytes written into the guest's buffers,
/// or that the store is full (nothing written to the guest then).
fn serve<'d>(
    config: &BlkConfig,
    chain: &[Desc],
    mem: &mut dyn GuestMemory,
    disk: Option<&mut (dyn VirtualDisk + 'd)>,
    write_through: bool,
    scratch: &mut Vec<u8>,
    counters: &mut BlkCounters,
) -> Result<Served, QueueError> {
    let segs = Segments { descs: chain };
    let readable = segs.total(false);
    let writable = segs.total(true);
    // No room for the status byte or the header: nothing can be answered.
    if writable == 0 || readable < 16 {
        return Err(QueueError::BadIndex(0));
    }
    let mut header = [0u8; 16];
    segs.copy(mem, false, 0, &mut header)?;
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let in_len = writable - 1;
    let out_len = readable - 16;
    let mut data_written = 0u64;
    let status = match (kind, disk) {
        (T_GET_ID, _) => {
            let mut id = [0u8; ID_BYTES];
            let text = b"hvmigrate-vdisk";
            id[..text.len()].copy_from_slice(text);
            let n = (in_len as usize).min(ID_BYTES);
            segs.copy(mem, true, 0, &mut id[..n])?;
            data_written = n as u64;
            S_OK
        }
        (T_IN | T_OUT | T_FLUSH, None) => S_IOERR,
        (T_FLUSH, Some(d)) => {
            counters.flushes += 1;
            match d.flush() {
                Ok(()) => S_OK,
                Err(e) if e.is_no_space() => return Ok(Served::StoreFull(e.to_string())),
                Err(e) => {
                    log::warn!("virtio-blk: flush failed: {e}");
                    S_IOERR
                }
            }
        }
        (T_IN | T_OUT, Some(d)) => {
            let write = kind == T_OUT;
            let len = if write { out_len } else { in_len };
            let in_range = len % SECTOR_BYTES == 0
                && len <= MAX_REQUEST_BYTES
                && sector
                    .checked_add(len / SECTOR_BYTES)
                    .is_some_and(|end| end <= config.capacity_sectors);
            if !in_range || (write && config.read_only) {
                S_IOERR
            } else {
                let r = transfer(&segs, mem, d, write, sector * SECTOR_BYTES, len, scratch);
                match r {
                    Ok(Ok(())) => {
                        if write {
                            counters.writes += 1;
                            counters.bytes_written += len;
                        } else {
                            counters.reads += 1;
                            counters.bytes_read += len;
                            data_written = len;
                        }
                        if write && write_through {
                            match d.flush() {
                                Ok(()) => S_OK,
                                Err(e) if e.is_no_space() => {
                                    return Ok(Served::StoreFull(e.to_string()))
                                }
                                Err(_) => S_IOERR,
                            }
                        } else {
                            S_OK
                        }
                    }
                    Ok(Err(e)) if e.is_no_space() => return Ok(Served::StoreFull(e.to_string())),
                    Ok(Err(e)) => {
                        log::warn!("virtio-blk: disk error at sector {sector}: {e}");
                        S_IOERR
                    }
                    Err(q) => return Err(q),
                }
            }
        }
        _ => S_UNSUPP,
    };
    if status != S_OK {
        counters.errors += 1;
    }
    segs.copy(mem, true, in_len, &mut [status])?;
    // At most MAX_REQUEST_BYTES + 1 or the ID: fits u32.
    Ok(Served::Done(
        u32::try_from(data_written + 1).unwrap_or(u32::MAX),
        status == S_OK && matches!(kind, T_OUT | T_FLUSH),
    ))
}

/// Move `len` bytes between the chain's data and the disk at byte
/// `offset`, one chunk at a time. Outer error: the guest's buffers;
/// inner: the disk.
fn transfer<'d>(
    segs: &Segments<'_>,
    mem: &mut dyn GuestMemory,
    disk: &mut (dyn VirtualDisk + 'd),
    write: bool,
    offset: u64,
    len: u64,
    scratch: &mut Vec<u8>,
) -> Result<Result<(), vstorage::DiskError>, QueueError> {
    if scratch.len() < CHUNK_BYTES {
        *scratch = vec![0u8; CHUNK_BYTES];
    }
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(CHUNK_BYTES);
        let buf = &mut scratch[..n];
        if write {
            // Readable data starts after the 16-byte header.
            segs.copy(mem, false, 16 + done, buf)?;
            if let Err(e) = disk.write(offset + done, buf) {
                return Ok(Err(e));
            }
        } else {
            if let Err(e) = disk.read(offset + done, buf) {
                return Ok(Err(e));
            }
            segs.copy(mem, true, done, buf)?;
        }
        done += n as u64;
    }
    Ok(Ok(()))
}

impl Snapshot for VirtioBlk {
    fn kind(&self) -> DeviceKind {
        DeviceKind::VirtioBlk
    }
    fn state_version(&self) -> u16 {
        Self::STATE_VERSION
    }
    fn save_state(&self, out: &mut Vec<u8>) {
        let mut w = StateWriter::new(out);
        w.u64(self.config.capacity_sectors)
            .bool(self.config.read_only);
        self.mmio.save(&mut w);
    }
    fn restore_state(&mut self, version: u16, bytes: &[u8]) -> Result<(), StateError> {
        expect_version("virtio-blk", version, Self::STATE_VERSION)?;
        let mut r = StateReader::new(bytes);
        let capacity_sectors = r.u64()?;
        if capacity_sectors > u64::MAX / SECTOR_BYTES {
            return Err(StateError::BadValue {
                what: "virtio-blk capacity",
                value: capacity_sectors,
            });
        }
        let config = BlkConfig {
            capacity_sectors,
            read_only: r.bool("virtio-blk read-only")?,
        };
        let mmio = VirtioMmio::restore(&mut r, &config)?;
        r.finish()?;
        self.config = config;
        self.mmio = mmio;
        self.recheck = true;
        Ok(())
    }
}

/// A driver's side of one queue for tests elsewhere in the crate (a VM's
/// or a node's disk): `w(offset, value)` writes the slot's registers.
#[cfg(test)]
pub(crate) mod test_driver {
    use super::*;
    const DESC: u64 = 0x30_0000;
    const AVAIL: u64 = 0x30_1000;
    const USED: u64 = 0x30_2000;
    const HDR: u64 = 0x30_3000;
    const STATUS: u64 = 0x30_4000;
    const DATA: u64 = 0x31_0000;

    /// Negotiate FLUSH, one queue of 16 (rings at 3 MiB), DRIVER_OK.
    pub fn init(w: &mut dyn FnMut(u64, u32)) {
        for (off, v) in [
            (0x70, 3),
            (0x24, 0),
            (0x20, F_FLUSH as u32),
            (0x24, 1),
            (0x20, 1),
            (0x70, 0xb),
            (0x30, 0),
            (0x38, 16),
            (0x80, DESC as u32),
            (0x90, AVAIL as u32),
            (0xa0, USED as u32),
            (0x44, 1),
            (0x70, 0xf),
        ] {
            w(off, v);
        }
    }

    /// Make request number `n` (0, 1, ...) a write of `data` at `sector`
    /// available, and notify.
    pub fn submit_write(
        mem: &mut dyn GuestMemory,
        w: &mut dyn FnMut(u64, u32),
        n: u16,
        sector: u64,
        data: &[u8],
    ) {
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&T_OUT.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write(Gpa(HDR), &hdr).unwrap();
        mem.write(Gpa(STATUS), &[0xaa]).unwrap();
        mem.write(Gpa(DATA), data).unwrap();
        for (i, (gpa, len, flags)) in [
            (HDR, 16u32, 1u16),
            (DATA, data.len() as u32, 1),
            (STATUS, 1, 2),
        ]
        .into_iter()
        .enumerate()
        {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&gpa.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&(i as u16 + 1).to_le_bytes());
            mem.write(Gpa(DESC + 16 * i as u64), &d).unwrap();
        }
        mem.write(Gpa(AVAIL + 4 + 2 * u64::from(n % 16)), &0u16.to_le_bytes())
            .unwrap();
        mem.write(Gpa(AVAIL + 2), &(n + 1).to_le_bytes()).unwrap();
        w(0x50, 0);
    }

    /// Requests completed (the used ring's index) and the last status byte.
    pub fn completed(mem: &dyn GuestMemory) -> (u16, u8) {
        let mut b = [0u8; 2];
        mem.read(Gpa(USED + 2), &mut b).unwrap();
        let mut st = [0u8];
        mem.read(Gpa(STATUS), &mut st).unwrap();
        (u16::from_le_bytes(b), st[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeMemory;
    use vstorage::vhdx::{self, CreateParams, OpenOptions, Vhdx};
    use vstorage::{BlockIo, MemIo};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const HDR: u64 = 0x4000;
    const DATA: u64 = 0x10_0000;
    const STATUS: u64 = 0x5000;

    fn w32(m: &mut VirtioBlk, off: u64, v: u32) {
        m.mmio_write(off, &v.to_le_bytes());
    }
    fn r32(m: &mut VirtioBlk, off: u64) -> u32 {
        let mut b = [0u8; 4];
        m.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// The driver's side, as virtio-drivers does it: negotiate, one queue
    /// of 16, DRIVER_OK.
    fn driver_init(dev: &mut VirtioBlk, flush: bool) {
        w32(dev, 0x70, 0);
        w32(dev, 0x70, 3);
        assert_eq!(r32(dev, 0x10) & (F_FLUSH as u32), F_FLUSH as u32);
        w32(dev, 0x24, 0);
        w32(dev, 0x20, if flush { F_FLUSH as u32 } else { 0 });
        w32(dev, 0x24, 1);
        w32(dev, 0x20, 1);
        w32(dev, 0x70, 0xb);
        w32(dev, 0x30, 0);
        w32(dev, 0x38, 16);
        w32(dev, 0x80, DESC as u32);
        w32(dev, 0x90, AVAIL as u32);
        w32(dev, 0xa0, USED as u32);
        w32(dev, 0x44, 1);
        w32(dev, 0x70, 0xf);
        assert_eq!(r32(dev, 0x70), 0xf);
    }

    struct Driver {
        avail: u16,
    }

    impl Driver {
        fn desc(mem: &mut FakeMemory, i: u64, gpa: u64, len: u32, flags: u16, next: u16) {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&gpa.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            mem.write(Gpa(DESC + 16 * i), &d).unwrap();
        }

        /// Submit a request (header, optional data, status) and run the
        /// device; returns (status, used length).
        fn request(
            &mut self,
            dev: &mut VirtioBlk,
            mem: &mut FakeMemory,
            disk: Option<&mut dyn VirtualDisk>,
            (kind, sector, data_len, device_writes_data): (u32, u64, u32, bool),
        ) -> (u8, u32) {
            let mut hdr = [0u8; 16];
            hdr[..4].copy_from_slice(&kind.to_le_bytes());
            hdr[8..].copy_from_slice(&sector.to_le_bytes());
            mem.write(Gpa(HDR), &hdr).unwrap();
            mem.write(Gpa(STATUS), &[0xaa]).unwrap();
            Self::desc(mem, 0, HDR, 16, 1, 1);
            if data_len > 0 {
                Self::desc(
                    mem,
                    1,
                    DATA,
                    data_len,
                    1 | if device_writes_data { 2 } else { 0 },
                    2,
                );
                Self::desc(mem, 2, STATUS, 1, 2, 0);
            } else {
                Self::desc(mem, 1, STATUS, 1, 2, 0);
            }
            let slot = u64::from(self.avail % 16);
            mem.write(Gpa(AVAIL + 4 + 2 * slot), &0u16.to_le_bytes())
                .unwrap();
            self.avail = self.avail.wrapping_add(1);
            mem.write(Gpa(AVAIL + 2), &self.avail.to_le_bytes())
                .unwrap();
            w32(dev, 0x50, 0);
            assert!(dev.has_work());
            let mut scratch = Vec::new();
            assert!(dev.process(mem, disk, &mut scratch));
            let mut used = [0u8; 4];
            mem.read(Gpa(USED + 2), &mut used[..2]).unwrap();
            assert_eq!(u16::from_le_bytes([used[0], used[1]]), self.avail);
            let uslot = u64::from((self.avail - 1) % 16);
            mem.read(Gpa(USED + 4 + 8 * uslot + 4), &mut used).unwrap();
            let mut st = [0u8];
            mem.read(Gpa(STATUS), &mut st).unwrap();
            assert!(dev.interrupt_line());
            w32(dev, 0x64, 1);
            (st[0], u32::from_le_bytes(used))
        }
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn new_vhdx(size: u64) -> Vhdx<MemIo> {
        vhdx::create(MemIo::new(), &CreateParams::dynamic(size)).unwrap()
    }

    #[test]
    fn writes_and_reads_reach_the_vhdx() {
        let mut disk = new_vhdx(8 << 20);
        let mut dev = VirtioBlk::new(8 << 20, false);
        let mut mem = FakeMemory::new(4 << 20);
        driver_init(&mut dev, true);
        let mut drv = Driver { avail: 0 };
        let data = pattern(7, 8192);
        mem.write(Gpa(DATA), &data).unwrap();
        assert_eq!(
            drv.request(
                &mut dev,
                &mut mem,
                Some(&mut disk),
                (T_OUT, 100, 8192, false)
            ),
            (S_OK, 1)
        );
        assert_eq!(
            drv.request(&mut dev, &mut mem, Some(&mut disk), (T_FLUSH, 0, 0, false)),
            (S_OK, 1)
        );
        mem.write(Gpa(DATA), &[0u8; 8192]).unwrap();
        assert_eq!(
            drv.request(&mut dev, &mut mem, Some(&mut disk), (T_IN, 100, 8192, true)),
            (S_OK, 8193)
        );
        let mut back = vec![0u8; 8192];
        mem.read(Gpa(DATA), &mut back).unwrap();
        assert_eq!(back, data);
        // The bytes are in the VHDX file: reopen its bytes and read them.
        disk.close().unwrap();
        let file = disk.io().clone();
        let mut reopened = Vhdx::open(file, OpenOptions::read_only()).unwrap();
        let mut on_disk = vec![0u8; 8192];
        reopened.read(100 * 512, &mut on_disk).unwrap();
        assert_eq!(on_disk, data);
        reopened.verify().unwrap();
        assert_eq!(dev.counters.writes, 1);
        assert_eq!(dev.counters.bytes_read, 8192);
    }

    #[test]
    fn bad_requests_answer_errors() {
        let mut disk = new_vhdx(1 << 20);
        let mut dev = VirtioBlk::new(1 << 20, false);
        let mut mem = FakeMemory::new(4 << 20);
        driver_init(&mut dev, true);
        let mut drv = Driver { avail: 0 };
        // Past the end, partial sector, unknown type, no disk.
        let cases: [(u32, u64, u32, bool, u8); 4] = [
            (T_IN, 2047, 1024, true, S_IOERR),
            (T_OUT, 0, 100, false, S_IOERR),
            (99, 0, 512, true, S_UNSUPP),
            (T_IN, u64::MAX, 512, true, S_IOERR),
        ];
        for (kind, sector, len, wr, want) in cases {
            let (st, _) = drv.request(&mut dev, &mut mem, Some(&mut disk), (kind, sector, len, wr));
            assert_eq!(st, want, "{kind} {sector} {len}");
        }
        let (st, _) = drv.request(&mut dev, &mut mem, None, (T_IN, 0, 512, true));
        assert_eq!(st, S_IOERR);
        let (st, n) = drv.request(&mut dev, &mut mem, None, (T_GET_ID, 0, 20, true));
        assert_eq!((st, n), (S_OK, 21));
        assert_eq!(dev.counters.errors, 5);
        assert!(
            dev.transport().driver_ok(),
            "errors are answers, not resets"
        );
        // Read-only disk refuses writes.
        let mut ro = VirtioBlk::new(1 << 20, true);
        driver_init(&mut ro, true);
        let mut drv = Driver { avail: 0 };
        let (st, _) = drv.request(&mut ro, &mut mem, Some(&mut disk), (T_OUT, 0, 512, false));
        assert_eq!(st, S_IOERR);
    }

    /// A store that fails every write: the guest sees IOERR, the device
    /// goes on.
    #[derive(Default)]
    struct FailingWrites(MemIo);
    impl BlockIo for FailingWrites {
        fn read_at(&self, o: u64, b: &mut [u8]) -> Result<(), vstorage::IoError> {
            self.0.read_at(o, b)
        }
        fn write_at(&mut self, _: u64, _: &[u8]) -> Result<(), vstorage::IoError> {
            Err(vstorage::IoError::Host {
                op: "write",
                detail: "no space left on device".into(),
            })
        }
        fn flush(&mut self) -> Result<(), vstorage::IoError> {
            Ok(())
        }
        fn len(&self) -> Result<u64, vstorage::IoError> {
            self.0.len()
        }
        fn set_len(&mut self, l: u64) -> Result<(), vstorage::IoError> {
            self.0.set_len(l)
        }
    }

    #[test]
    fn disk_errors_become_ioerr() {
        let mut disk = vstorage::RawDisk::create(FailingWrites::default(), 0).unwrap();
        let mut dev = VirtioBlk::new(1 << 20, false);
        let mut mem = FakeMemory::new(4 << 20);
        driver_init(&mut dev, false);
        let mut drv = Driver { avail: 0 };
        let (st, _) = drv.request(&mut dev, &mut mem, Some(&mut disk), (T_OUT, 0, 512, false));
        assert_eq!(st, S_IOERR);
    }

    /// A write that finds the store full is neither completed nor answered:
    /// it stays in the ring, the device says why, retries find it again,
    /// and once space is freed it completes with its data on the disk.
    #[test]
    fn a_full_store_leaves_the_request_in_the_ring_until_space_returns() {
        for flush_negotiated in [true, false] {
            let (file, room) = crate::testing::RoomFile::new();
            let params = CreateParams {
                block_size: 1 << 20,
                ..CreateParams::dynamic(8 << 20)
            };
            let mut disk = vhdx::create(file, &params).unwrap();
            room.set(disk.io().len().unwrap());
            let mut dev = VirtioBlk::new(8 << 20, false);
            let mut mem = FakeMemory::new(4 << 20);
            driver_init(&mut dev, flush_negotiated);
            let data = pattern(3, 8192);
            mem.write(Gpa(DATA), &data).unwrap();
            let mut hdr = [0u8; 16];
            hdr[..4].copy_from_slice(&T_OUT.to_le_bytes());
            hdr[8..].copy_from_slice(&40u64.to_le_bytes());
            mem.write(Gpa(HDR), &hdr).unwrap();
            mem.write(Gpa(STATUS), &[0xaa]).unwrap();
            Driver::desc(&mut mem, 0, HDR, 16, 1, 1);
            Driver::desc(&mut mem, 1, DATA, 8192, 1, 2);
            Driver::desc(&mut mem, 2, STATUS, 1, 2, 0);
            mem.write(Gpa(AVAIL + 4), &0u16.to_le_bytes()).unwrap();
            mem.write(Gpa(AVAIL + 2), &1u16.to_le_bytes()).unwrap();
            w32(&mut dev, 0x50, 0);
            let used_idx = |mem: &FakeMemory| {
                let mut b = [0u8; 2];
                mem.read(Gpa(USED + 2), &mut b).unwrap();
                u16::from_le_bytes(b)
            };
            let status = |mem: &FakeMemory| {
                let mut b = [0u8];
                mem.read(Gpa(STATUS), &mut b).unwrap();
                b[0]
            };
            let mut scratch = Vec::new();
            for _ in 0..3 {
                assert!(!dev.process(&mut mem, Some(&mut disk), &mut scratch));
                assert!(dev.store_full().is_some_and(|w| w.contains("store full")));
                assert!(dev.has_work(), "the retry has work");
                assert_eq!(used_idx(&mem), 0, "nothing completed");
                assert_eq!(status(&mem), 0xaa, "no status written");
                assert!(!dev.interrupt_line());
                assert!(dev.transport().driver_ok(), "no reset");
            }
            assert_eq!(dev.counters.errors, 0);
            room.set(u64::MAX);
            assert!(dev.process(&mut mem, Some(&mut disk), &mut scratch));
            assert_eq!(dev.store_full(), None);
            assert!(!dev.has_work());
            assert_eq!((used_idx(&mem), status(&mem)), (1, S_OK));
            assert!(dev.interrupt_line());
            let mut back = vec![0u8; 8192];
            disk.read(40 * 512, &mut back).unwrap();
            assert_eq!(back, data);
            disk.flush().unwrap();
            disk.verify().unwrap();
        }
    }

    /// A disk whose writes are durable only once a counter says so (a
    /// disk mirrored to another node); it counts its writes.
    struct Later {
        disk: Vhdx<MemIo>,
        writes: u32,
        acked: u64,
        ticket: u64,
    }

    impl VirtualDisk for Later {
        fn virtual_size(&self) -> u64 {
            self.disk.virtual_size()
        }
        fn logical_sector_size(&self) -> u32 {
            512
        }
        fn read(&mut self, o: u64, b: &mut [u8]) -> Result<(), vstorage::DiskError> {
            self.disk.read(o, b)
        }
        fn write(&mut self, o: u64, d: &[u8]) -> Result<(), vstorage::DiskError> {
            self.writes += 1;
            self.ticket += 1;
            self.disk.write(o, d)
        }
        fn flush(&mut self) -> Result<(), vstorage::DiskError> {
            self.disk.flush()
        }
        fn durability_ticket(&mut self) -> Option<u64> {
            Some(self.ticket)
        }
        fn is_durable(&mut self, ticket: u64) -> bool {
            self.acked >= ticket
        }
    }

    /// A write on a disk whose durability comes later is done once, then
    /// held in the ring unanswered (the VM runs on) until its ticket is
    /// durable; then it completes without being written again.
    #[test]
    fn a_write_waits_in_the_ring_until_its_disk_says_it_is_durable() {
        let mut disk = Later {
            disk: new_vhdx(8 << 20),
            writes: 0,
            acked: 0,
            ticket: 0,
        };
        let mut dev = VirtioBlk::new(8 << 20, false);
        let mut mem = FakeMemory::new(4 << 20);
        test_driver::init(&mut |o, v| w32(&mut dev, o, v));
        let data = pattern(5, 4096);
        test_driver::submit_write(&mut mem, &mut |o, v| w32(&mut dev, o, v), 0, 8, &data);
        let mut scratch = Vec::new();
        for _ in 0..3 {
            assert!(!dev.process(&mut mem, Some(&mut disk), &mut scratch));
            assert!(dev.held() && dev.has_work(), "held, retried each round");
            assert_eq!(test_driver::completed(&mem).0, 0, "not completed");
            assert_eq!(dev.store_full(), None, "nothing pauses the VM");
        }
        assert_eq!(disk.writes, 1, "served once, never again");
        disk.acked = disk.ticket;
        assert!(dev.process(&mut mem, Some(&mut disk), &mut scratch));
        assert_eq!(test_driver::completed(&mem), (1, S_OK));
        assert!(!dev.held());
        assert_eq!(disk.writes, 1);
        let mut back = vec![0u8; 4096];
        disk.read(8 * 512, &mut back).unwrap();
        assert_eq!(back, data);
        // A restored device (the VM moved while it was held) serves the
        // request again from the ring: it is still available there.
        let mut dev2 = VirtioBlk::new(8 << 20, false);
        test_driver::init(&mut |o, v| w32(&mut dev2, o, v));
        test_driver::submit_write(&mut mem, &mut |o, v| w32(&mut dev2, o, v), 1, 16, &data);
        disk.acked = 0;
        assert!(!dev2.process(&mut mem, Some(&mut disk), &mut scratch));
        let mut saved = Vec::new();
        dev2.save_state(&mut saved);
        let mut dev3 = VirtioBlk::new(8 << 20, false);
        dev3.restore_state(VirtioBlk::STATE_VERSION, &saved)
            .unwrap();
        let mut plain = new_vhdx(8 << 20);
        assert!(dev3.process(&mut mem, Some(&mut plain), &mut scratch));
        assert_eq!(test_driver::completed(&mem), (2, S_OK));
        plain.read(16 * 512, &mut back).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn a_broken_ring_sets_needs_reset() {
        let mut dev = VirtioBlk::new(1 << 20, false);
        let mut mem = FakeMemory::new(4 << 20);
        driver_init(&mut dev, true);
        // Status descriptor outside RAM.
        Driver::desc(&mut mem, 0, HDR, 16, 1, 1);
        Driver::desc(&mut mem, 1, 1 << 40, 1, 2, 0);
        mem.write(Gpa(AVAIL + 2), &1u16.to_le_bytes()).unwrap();
        w32(&mut dev, 0x50, 0);
        assert!(!dev.process(&mut mem, None, &mut Vec::new()));
        assert!(!dev.transport().driver_ok());
        assert_eq!(r32(&mut dev, 0x70) & 0x40, 0x40);
        assert_eq!(r32(&mut dev, 0x60), 2, "config interrupt");
        // The driver resets and starts over.
        driver_init(&mut dev, true);
        assert!(dev.transport().driver_ok());
    }

    #[test]
    fn config_space_and_state() {
        let mut dev = VirtioBlk::new(3 << 20, false);
        let mut cap = [0u8; 8];
        dev.mmio_read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 6144);
        assert_eq!(r32(&mut dev, 0x10c), SEG_MAX);
        driver_init(&mut dev, true);
        let mut saved = Vec::new();
        dev.save_state(&mut saved);
        let mut other = VirtioBlk::new(0, true);
        other.restore_state(1, &saved).unwrap();
        assert_eq!(other.config(), dev.config());
        assert_eq!(other.transport(), dev.transport());
        assert!(other.restore_state(2, &saved).is_err());
        for len in 0..saved.len() {
            let before = other.clone();
            assert!(other.restore_state(1, &saved[..len]).is_err());
            assert_eq!(other, before, "refusal changes nothing");
        }
    }
}
