//! The virtio-mmio transport (virtio 1.2, 4.2.2, "version 2" register
//! layout) and the split virtqueue (virtio 1.2, 2.7), for any device model
//! behind it: the project's test kernel drives it with virtio-drivers'
//! `MmioTransport`, a Linux guest with its `virtio_mmio` driver (the DSDT
//! describes each slot, `acpi::VirtioMmioSlot`).
//!
//! [`VirtioMmio`] is the register file: feature negotiation, device
//! status, queue configuration, the interrupt status, and the device's
//! configuration space at 0x100 (answered by the [`VirtioDevice`]). A
//! write to `QueueNotify` only records the queue ([`VirtioMmio::take_notified`]):
//! the device's work runs after the access, outside the MMIO path, where
//! guest memory and the backing store are at hand.
//!
//! [`SplitQueue`] reads descriptor chains from guest memory and returns
//! them through the used ring. Everything it reads is the guest's and an
//! allegation: indices are taken modulo the queue size, a chain longer
//! than the queue (a loop) or a descriptor outside guest RAM is a
//! [`QueueError`], which the device answers by setting
//! `DEVICE_NEEDS_RESET` (virtio 1.2, 2.1.2): the guest's driver must reset
//! the device; nothing panics and the VM runs on.
//!
//! Only what a driver negotiates is offered: no indirect descriptors, no
//! event index, no packed ring; `VIRTIO_F_VERSION_1` always (modern only).
//!
//! Saved state ([`VirtioMmio::save`]): the register file and every
//! queue's addresses and ring positions; restore checks every field
//! against what the registers can hold.

use super::state::{StateError, StateReader, StateWriter};
use alloc::vec::Vec;
use core::fmt;
use hvcore::addr::Gpa;
use hvcore::mem::{GuestMemory, MemError};

/// "virt" (virtio 1.2, 4.2.2: MagicValue).
pub const MAGIC: u32 = 0x7472_6976;
/// The modern register layout.
pub const VERSION: u32 = 2;
/// VendorID the devices report ("HVMG").
pub const VENDOR_ID: u32 = 0x474d_5648;
/// Offset of the device configuration space.
pub const CONFIG_OFFSET: u64 = 0x100;
/// Bytes of a slot's register window (header plus configuration space).
pub const WINDOW_BYTES: u64 = 0x200;
/// `VIRTIO_F_VERSION_1` (virtio 1.2, 6).
pub const F_VERSION_1: u64 = 1 << 32;
/// Largest queue a device offers.
pub const QUEUE_MAX: u16 = 256;
/// Most queues one device has.
pub const MAX_QUEUES: usize = 4;

// Register offsets (virtio 1.2, Table 4.1).
const R_MAGIC: u64 = 0x000;
const R_VERSION: u64 = 0x004;
const R_DEVICE_ID: u64 = 0x008;
const R_VENDOR_ID: u64 = 0x00c;
const R_DEVICE_FEATURES: u64 = 0x010;
const R_DEVICE_FEATURES_SEL: u64 = 0x014;
const R_DRIVER_FEATURES: u64 = 0x020;
const R_DRIVER_FEATURES_SEL: u64 = 0x024;
const R_QUEUE_SEL: u64 = 0x030;
const R_QUEUE_NUM_MAX: u64 = 0x034;
const R_QUEUE_NUM: u64 = 0x038;
const R_QUEUE_READY: u64 = 0x044;
const R_QUEUE_NOTIFY: u64 = 0x050;
const R_INTERRUPT_STATUS: u64 = 0x060;
const R_INTERRUPT_ACK: u64 = 0x064;
const R_STATUS: u64 = 0x070;
const R_QUEUE_DESC_LOW: u64 = 0x080;
const R_QUEUE_DESC_HIGH: u64 = 0x084;
const R_QUEUE_DRIVER_LOW: u64 = 0x090;
const R_QUEUE_DRIVER_HIGH: u64 = 0x094;
const R_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const R_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const R_CONFIG_GENERATION: u64 = 0x0fc;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// Interrupt status bits (virtio 1.2, 4.2.2: InterruptStatus).
pub const INT_USED_BUFFER: u32 = 1;
/// The configuration changed (or the device needs a reset).
pub const INT_CONFIG: u32 = 2;

/// Descriptor flags (virtio 1.2, 2.7.5).
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
/// `VIRTQ_AVAIL_F_NO_INTERRUPT`.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// What a device model behind the transport provides.
pub trait VirtioDevice {
    /// Virtio device ID (2 = block).
    fn device_id(&self) -> u32;
    /// Feature bits offered (the transport adds [`F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Queues the device has (at most [`MAX_QUEUES`]).
    fn num_queues(&self) -> usize;
    /// Read of the configuration space at `offset` (from 0x100).
    fn config_read(&self, offset: u64, data: &mut [u8]);
    /// Write of the configuration space (ignored by read-only configs).
    fn config_write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// Why a queue could not be used: the guest broke the ring protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// The queue is not ready or its size is not a power of two up to the
    /// maximum.
    NotConfigured,
    /// The available index ran more than the queue size ahead.
    AvailIndex { avail: u16, last: u16 },
    /// A descriptor index outside the table.
    BadIndex(u16),
    /// A chain longer than the queue (a loop).
    ChainTooLong,
    /// Indirect descriptors were not negotiated.
    Indirect,
    /// A ring or buffer outside guest RAM.
    Memory(MemError),
}

impl From<MemError> for QueueError {
    fn from(e: MemError) -> Self {
        QueueError::Memory(e)
    }
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::NotConfigured => write!(f, "queue used before it was configured"),
            QueueError::AvailIndex { avail, last } => {
                write!(
                    f,
                    "available index {avail} is more than a queue ahead of {last}"
                )
            }
            QueueError::BadIndex(i) => write!(f, "descriptor index {i} outside the table"),
            QueueError::ChainTooLong => write!(f, "descriptor chain longer than the queue"),
            QueueError::Indirect => write!(f, "indirect descriptor not negotiated"),
            QueueError::Memory(e) => write!(f, "{e}"),
        }
    }
}

/// One descriptor of a chain, as the guest wrote it (length checked only
/// against guest RAM when the bytes are moved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub gpa: u64,
    pub len: u32,
    /// The device writes this buffer (else it reads it).
    pub write: bool,
}

/// A split virtqueue's configuration and the device's ring positions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SplitQueue {
    /// Queue size the driver chose (QueueNum).
    pub size: u16,
    pub ready: bool,
    /// Descriptor table, available ring ("driver area"), used ring
    /// ("device area").
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    /// Next available-ring entry the device takes.
    pub last_avail: u16,
    /// Next used-ring index the device writes.
    pub used_idx: u16,
}

impl SplitQueue {
    fn usable(&self) -> bool {
        self.ready && self.size.is_power_of_two() && self.size <= QUEUE_MAX
    }

    /// The next available chain: its head index, its descriptors into
    /// `chain` (cleared first). `None` when the ring is empty.
    pub fn pop(
        &mut self,
        mem: &dyn GuestMemory,
        chain: &mut Vec<Desc>,
    ) -> Result<Option<u16>, QueueError> {
        if !self.usable() {
            return Err(QueueError::NotConfigured);
        }
        chain.clear();
        let avail_idx = read_u16(mem, self.driver.wrapping_add(2))?;
        let pending = avail_idx.wrapping_sub(self.last_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(QueueError::AvailIndex {
                avail: avail_idx,
                last: self.last_avail,
            });
        }
        let slot = u64::from(self.last_avail % self.size);
        let head = read_u16(mem, self.driver.wrapping_add(4 + 2 * slot))?;
        let mut index = head;
        loop {
            if index >= self.size {
                return Err(QueueError::BadIndex(index));
            }
            if chain.len() >= usize::from(self.size) {
                return Err(QueueError::ChainTooLong);
            }
            let mut raw = [0u8; 16];
            mem.read(Gpa(self.desc.wrapping_add(16 * u64::from(index))), &mut raw)?;
            let gpa = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            let next = u16::from_le_bytes([raw[14], raw[15]]);
            if flags & DESC_F_INDIRECT != 0 {
                return Err(QueueError::Indirect);
            }
            chain.push(Desc {
                gpa,
                len,
                write: flags & DESC_F_WRITE != 0,
            });
            if flags & DESC_F_NEXT == 0 {
                break;
            }
            index = next;
        }
        self.last_avail = self.last_avail.wrapping_add(1);
        Ok(Some(head))
    }

    /// Return chain `head` with `len` bytes written into its buffers.
    pub fn push_used(
        &mut self,
        mem: &mut dyn GuestMemory,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        if !self.usable() {
            return Err(QueueError::NotConfigured);
        }
        let slot = u64::from(self.used_idx % self.size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write(Gpa(self.device.wrapping_add(4 + 8 * slot)), &elem)?;
        // The element before the index (virtio 1.2, 2.7.8: the driver
        // reads the index, then the element).
        self.used_idx = self.used_idx.wrapping_add(1);
        mem.write(
            Gpa(self.device.wrapping_add(2)),
            &self.used_idx.to_le_bytes(),
        )?;
        Ok(())
    }

    /// Whether the driver asked for no interrupts (avail flags).
    pub fn interrupt_suppressed(&self, mem: &dyn GuestMemory) -> bool {
        read_u16(mem, self.driver).is_ok_and(|f| f & AVAIL_F_NO_INTERRUPT != 0)
    }
}

fn read_u16(mem: &dyn GuestMemory, gpa: u64) -> Result<u16, MemError> {
    let mut b = [0u8; 2];
    mem.read(Gpa(gpa), &mut b)?;
    Ok(u16::from_le_bytes(b))
}

/// The register file of one virtio-mmio slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioMmio {
    status: u8,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    queues: [SplitQueue; MAX_QUEUES],
    /// Queues notified since the last [`VirtioMmio::take_notified`].
    notified: u8,
}

impl Default for VirtioMmio {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioMmio {
    /// Version of [`VirtioMmio::save`].
    pub const STATE_VERSION: u16 = 1;

    /// The reset state.
    pub fn new() -> Self {
        Self {
            status: 0,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            queues: [SplitQueue::default(); MAX_QUEUES],
            notified: 0,
        }
    }

    /// Device status as the driver set it.
    pub fn status(&self) -> u8 {
        self.status
    }
    /// Features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }
    /// Whether the driver finished initialisation and the device works.
    pub fn driver_ok(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::DEVICE_NEEDS_RESET == 0
    }
    /// Queue `i`.
    pub fn queue_mut(&mut self, i: usize) -> Option<&mut SplitQueue> {
        self.queues.get_mut(i)
    }
    /// The interrupt line: high while an interrupt status bit is set.
    pub fn interrupt_line(&self) -> bool {
        self.interrupt_status != 0
    }
    /// The device used buffers: raise the used-buffer interrupt.
    pub fn signal_used(&mut self) {
        self.interrupt_status |= INT_USED_BUFFER;
    }
    /// The guest broke the queue protocol: the device stops until the
    /// driver resets it, and says so (virtio 1.2, 2.1.2).
    pub fn set_needs_reset(&mut self) {
        if self.status & status::DRIVER_OK != 0 {
            self.status |= status::DEVICE_NEEDS_RESET;
            self.interrupt_status |= INT_CONFIG;
        }
    }
    /// Queues notified and not yet taken (bit n = queue n).
    pub fn notified(&self) -> u8 {
        self.notified
    }
    /// Queues notified since the last call (bit n = queue n).
    pub fn take_notified(&mut self) -> u8 {
        core::mem::take(&mut self.notified)
    }

    fn reset(&mut self) {
        *self = Self {
            config_generation: self.config_generation,
            ..Self::new()
        };
    }

    fn selected(&mut self, dev: &dyn VirtioDevice) -> Option<&mut SplitQueue> {
        let i = self.queue_sel as usize;
        if i < dev.num_queues().min(MAX_QUEUES) {
            self.queues.get_mut(i)
        } else {
            None
        }
    }

    /// Guest read of `data.len()` bytes at `offset` in the window.
    /// Header registers are 32-bit: other widths read all-ones.
    pub fn read(&mut self, dev: &dyn VirtioDevice, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            dev.config_read(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0xff);
            return;
        }
        let features = dev.features() | F_VERSION_1;
        let value: u32 = match offset {
            R_MAGIC => MAGIC,
            R_VERSION => VERSION,
            R_DEVICE_ID => dev.device_id(),
            R_VENDOR_ID => VENDOR_ID,
            R_DEVICE_FEATURES => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            R_QUEUE_NUM_MAX => match self.selected(dev) {
                Some(_) => u32::from(QUEUE_MAX),
                None => 0,
            },
            R_QUEUE_READY => self.selected(dev).map_or(0, |q| u32::from(q.ready)),
            R_INTERRUPT_STATUS => self.interrupt_status,
            R_STATUS => u32::from(self.status),
            R_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Guest write of `data` at `offset` in the window.
    pub fn write(&mut self, dev: &mut dyn VirtioDevice, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            dev.config_write(offset - CONFIG_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes(bytes);
        let offered = dev.features() | F_VERSION_1;
        let configurable = self.status & status::DRIVER_OK == 0;
        match offset {
            R_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            R_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            R_DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                // Only offered bits can be accepted.
                let (shift, mask) = match self.driver_features_sel {
                    0 => (0, 0xffff_ffffu64),
                    1 => (32, 0xffff_ffff_0000_0000),
                    _ => return,
                };
                self.driver_features =
                    (self.driver_features & !mask) | ((u64::from(value) << shift) & mask & offered);
            }
            R_QUEUE_SEL => self.queue_sel = value,
            R_QUEUE_NUM if configurable => {
                if let Some(q) = self.selected(dev) {
                    q.size = u16::try_from(value).unwrap_or(0);
                }
            }
            R_QUEUE_READY => {
                if let Some(q) = self.selected(dev) {
                    q.ready = value & 1 != 0;
                    if q.ready {
                        q.last_avail = 0;
                        q.used_idx = 0;
                    }
                }
            }
            R_QUEUE_NOTIFY if (value as usize) < dev.num_queues().min(MAX_QUEUES) => {
                self.notified |= 1 << value;
            }
            R_INTERRUPT_ACK => self.interrupt_status &= !value,
            R_STATUS => {
                if value == 0 {
                    self.reset();
                } else {
                    let mut s = value as u8;
                    // FEATURES_OK sticks only if VERSION_1 was accepted
                    // (a legacy driver cannot use this device).
                    if s & status::FEATURES_OK != 0 && self.driver_features & F_VERSION_1 == 0 {
                        s &= !status::FEATURES_OK;
                    }
                    // The device's own NEEDS_RESET survives driver writes.
                    self.status = s | (self.status & status::DEVICE_NEEDS_RESET);
                }
            }
            R_QUEUE_DESC_LOW | R_QUEUE_DESC_HIGH | R_QUEUE_DRIVER_LOW | R_QUEUE_DRIVER_HIGH
            | R_QUEUE_DEVICE_LOW | R_QUEUE_DEVICE_HIGH
                if configurable =>
            {
                if let Some(q) = self.selected(dev) {
                    let field = match offset {
                        R_QUEUE_DESC_LOW | R_QUEUE_DESC_HIGH => &mut q.desc,
                        R_QUEUE_DRIVER_LOW | R_QUEUE_DRIVER_HIGH => &mut q.driver,
                        _ => &mut q.device,
                    };
                    *field = if offset.is_multiple_of(8) {
                        (*field & !0xffff_ffff) | u64::from(value)
                    } else {
                        (*field & 0xffff_ffff) | (u64::from(value) << 32)
                    };
                }
            }
            _ => {}
        }
    }

    /// Append the register file and the queues.
    pub fn save(&self, w: &mut StateWriter<'_>) {
        w.u8(self.status)
            .u32(self.device_features_sel)
            .u64(self.driver_features)
            .u32(self.driver_features_sel)
            .u32(self.queue_sel)
            .u32(self.interrupt_status)
            .u32(self.config_generation)
            .u8(self.notified);
        for q in &self.queues {
            w.u16(q.size)
                .bool(q.ready)
                .u64(q.desc)
                .u64(q.driver)
                .u64(q.device)
                .u16(q.last_avail)
                .u16(q.used_idx);
        }
    }

    /// Read what [`VirtioMmio::save`] wrote, checking each field against
    /// what the registers can hold for `dev`.
    pub fn restore(r: &mut StateReader<'_>, dev: &dyn VirtioDevice) -> Result<Self, StateError> {
        let offered = dev.features() | F_VERSION_1;
        let mut m = Self::new();
        m.status = r.u8()?;
        m.device_features_sel = r.u32()?;
        m.driver_features = r.u64()?;
        if m.driver_features & !offered != 0 {
            return Err(StateError::BadValue {
                what: "virtio driver features",
                value: m.driver_features,
            });
        }
        m.driver_features_sel = r.u32()?;
        m.queue_sel = r.u32()?;
        m.interrupt_status =
            r.u32_masked("virtio interrupt status", INT_USED_BUFFER | INT_CONFIG)?;
        m.config_generation = r.u32()?;
        let queues_mask = (1u16 << dev.num_queues().min(MAX_QUEUES)) - 1;
        m.notified = r.u8_masked("virtio notified queues", queues_mask as u8)?;
        for (i, q) in m.queues.iter_mut().enumerate() {
            q.size = r.u16()?;
            q.ready = r.bool("virtio queue ready")?;
            q.desc = r.u64()?;
            q.driver = r.u64()?;
            q.device = r.u64()?;
            q.last_avail = r.u16()?;
            q.used_idx = r.u16()?;
            if q.size > QUEUE_MAX || (q.ready && !q.size.is_power_of_two()) {
                return Err(StateError::BadValue {
                    what: "virtio queue size",
                    value: u64::from(q.size),
                });
            }
            if i >= dev.num_queues() && (q.ready || q.size != 0) {
                return Err(StateError::BadValue {
                    what: "virtio queue the device does not have",
                    value: i as u64,
                });
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeMemory;

    struct Dummy;
    impl VirtioDevice for Dummy {
        fn device_id(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            1 << 9
        }
        fn num_queues(&self) -> usize {
            1
        }
        fn config_read(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
    }

    fn rd(m: &mut VirtioMmio, off: u64) -> u32 {
        let mut b = [0u8; 4];
        m.read(&Dummy, off, &mut b);
        u32::from_le_bytes(b)
    }
    fn wr(m: &mut VirtioMmio, off: u64, v: u32) {
        m.write(&mut Dummy, off, &v.to_le_bytes());
    }

    /// Negotiate and set up queue 0 with 8 entries at 0x1000/0x2000/0x3000.
    fn configured() -> VirtioMmio {
        let mut m = VirtioMmio::new();
        wr(&mut m, R_STATUS, 3);
        wr(&mut m, R_DRIVER_FEATURES_SEL, 0);
        wr(&mut m, R_DRIVER_FEATURES, 1 << 9);
        wr(&mut m, R_DRIVER_FEATURES_SEL, 1);
        wr(&mut m, R_DRIVER_FEATURES, 1);
        wr(&mut m, R_STATUS, 0xb);
        wr(&mut m, R_QUEUE_SEL, 0);
        wr(&mut m, R_QUEUE_NUM, 8);
        wr(&mut m, R_QUEUE_DESC_LOW, 0x1000);
        wr(&mut m, R_QUEUE_DRIVER_LOW, 0x2000);
        wr(&mut m, R_QUEUE_DEVICE_LOW, 0x3000);
        wr(&mut m, R_QUEUE_READY, 1);
        wr(&mut m, R_STATUS, 0xf);
        m
    }

    #[test]
    fn identification_and_features() {
        let mut m = VirtioMmio::new();
        assert_eq!(rd(&mut m, R_MAGIC), MAGIC);
        assert_eq!(rd(&mut m, R_VERSION), 2);
        assert_eq!(rd(&mut m, R_DEVICE_ID), 2);
        assert_eq!(rd(&mut m, R_DEVICE_FEATURES), 1 << 9);
        wr(&mut m, R_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut m, R_DEVICE_FEATURES), 1, "VERSION_1");
        assert_eq!(rd(&mut m, R_QUEUE_NUM_MAX), u32::from(QUEUE_MAX));
        wr(&mut m, R_QUEUE_SEL, 1);
        assert_eq!(rd(&mut m, R_QUEUE_NUM_MAX), 0, "no queue 1");
        // A 2-byte header read is not a register access.
        let mut b = [0u8; 2];
        m.read(&Dummy, R_MAGIC, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        // Config space passes through.
        let mut c = [0u8; 4];
        m.read(&Dummy, 0x104, &mut c);
        assert_eq!(c, [4, 5, 6, 7]);
    }

    #[test]
    fn features_ok_needs_version_1_and_unoffered_bits_are_dropped() {
        let mut m = VirtioMmio::new();
        wr(&mut m, R_DRIVER_FEATURES, u32::MAX);
        assert_eq!(m.driver_features(), 1 << 9);
        wr(&mut m, R_STATUS, 0xb);
        assert_eq!(rd(&mut m, R_STATUS), 3, "legacy driver: no FEATURES_OK");
        let m = configured();
        assert_eq!(m.status(), 0xf);
        assert!(m.driver_ok());
        assert_eq!(m.driver_features(), F_VERSION_1 | (1 << 9));
    }

    #[test]
    fn queue_addresses_notify_interrupt_and_reset() {
        let mut m = configured();
        let q = *m.queue_mut(0).unwrap();
        assert_eq!(
            (q.size, q.ready, q.desc, q.driver, q.device),
            (8, true, 0x1000, 0x2000, 0x3000)
        );
        // After DRIVER_OK the addresses are fixed.
        wr(&mut m, R_QUEUE_DESC_LOW, 0x5000);
        assert_eq!(m.queue_mut(0).unwrap().desc, 0x1000);
        wr(&mut m, R_QUEUE_NOTIFY, 0);
        wr(&mut m, R_QUEUE_NOTIFY, 3);
        assert_eq!(m.take_notified(), 1);
        assert_eq!(m.take_notified(), 0);
        m.signal_used();
        assert!(m.interrupt_line());
        assert_eq!(rd(&mut m, R_INTERRUPT_STATUS), 1);
        wr(&mut m, R_INTERRUPT_ACK, 1);
        assert!(!m.interrupt_line());
        wr(&mut m, R_STATUS, 0);
        assert_eq!(m, VirtioMmio::new());
    }

    fn write_desc(mem: &mut FakeMemory, i: u64, gpa: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&gpa.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        mem.write(Gpa(0x1000 + 16 * i), &d).unwrap();
    }
    fn publish(mem: &mut FakeMemory, slot: u64, head: u16, idx: u16) {
        mem.write(Gpa(0x2004 + 2 * slot), &head.to_le_bytes())
            .unwrap();
        mem.write(Gpa(0x2002), &idx.to_le_bytes()).unwrap();
    }

    #[test]
    fn pop_chain_and_push_used() {
        let mut mem = FakeMemory::new(1 << 20);
        let mut m = configured();
        let q = m.queue_mut(0).unwrap();
        let mut chain = Vec::new();
        assert_eq!(q.pop(&mem, &mut chain), Ok(None));
        write_desc(&mut mem, 2, 0x8000, 16, DESC_F_NEXT, 5);
        write_desc(&mut mem, 5, 0x9000, 512, DESC_F_NEXT | DESC_F_WRITE, 7);
        write_desc(&mut mem, 7, 0xa000, 1, DESC_F_WRITE, 0);
        publish(&mut mem, 0, 2, 1);
        assert_eq!(q.pop(&mem, &mut chain), Ok(Some(2)));
        assert_eq!(
            chain,
            [
                Desc {
                    gpa: 0x8000,
                    len: 16,
                    write: false
                },
                Desc {
                    gpa: 0x9000,
                    len: 512,
                    write: true
                },
                Desc {
                    gpa: 0xa000,
                    len: 1,
                    write: true
                },
            ]
        );
        assert_eq!(q.pop(&mem, &mut chain), Ok(None));
        q.push_used(&mut mem, 2, 513).unwrap();
        let mut used = [0u8; 12];
        mem.read(Gpa(0x3000), &mut used).unwrap();
        assert_eq!(used, [0, 0, 1, 0, 2, 0, 0, 0, 1, 2, 0, 0]);
        assert!(!q.interrupt_suppressed(&mem));
    }

    #[test]
    fn guest_ring_garbage_is_an_error_not_a_panic() {
        let mut mem = FakeMemory::new(1 << 20);
        let mut m = configured();
        let q = m.queue_mut(0).unwrap();
        let mut chain = Vec::new();
        // A loop: 0 -> 1 -> 0.
        write_desc(&mut mem, 0, 0x8000, 16, DESC_F_NEXT, 1);
        write_desc(&mut mem, 1, 0x8000, 16, DESC_F_NEXT, 0);
        publish(&mut mem, 0, 0, 1);
        assert_eq!(q.pop(&mem, &mut chain), Err(QueueError::ChainTooLong));
        let mut q2 = *q;
        q2.last_avail = 0;
        write_desc(&mut mem, 0, 0x8000, 16, DESC_F_NEXT, 9);
        assert_eq!(q2.pop(&mem, &mut chain), Err(QueueError::BadIndex(9)));
        let mut q3 = *q;
        q3.last_avail = 0;
        publish(&mut mem, 0, 0, 100);
        assert!(matches!(
            q3.pop(&mem, &mut chain),
            Err(QueueError::AvailIndex { .. })
        ));
        let mut q4 = *q;
        q4.driver = 1 << 40;
        assert!(matches!(
            q4.pop(&mem, &mut chain),
            Err(QueueError::Memory(_))
        ));
        write_desc(&mut mem, 0, 0x8000, 16, DESC_F_INDIRECT, 0);
        publish(&mut mem, 0, 0, 1);
        let mut q5 = *q;
        q5.last_avail = 0;
        assert_eq!(q5.pop(&mem, &mut chain), Err(QueueError::Indirect));
        m.set_needs_reset();
        assert!(!m.driver_ok());
        assert_eq!(rd(&mut m, R_STATUS) & 0x40, 0x40);
    }

    #[test]
    fn state_round_trips_and_is_checked() {
        let mut m = configured();
        m.queue_mut(0).unwrap().last_avail = 7;
        m.signal_used();
        let mut out = Vec::new();
        m.save(&mut StateWriter::new(&mut out));
        let mut r = StateReader::new(&out);
        assert_eq!(VirtioMmio::restore(&mut r, &Dummy), Ok(m.clone()));
        r.finish().unwrap();
        for len in 0..out.len() {
            let mut r = StateReader::new(&out[..len]);
            assert!(VirtioMmio::restore(&mut r, &Dummy).is_err(), "len {len}");
        }
        // A queue the device does not have.
        let mut bad = configured();
        bad.queues[1].ready = true;
        bad.queues[1].size = 8;
        let mut out = Vec::new();
        bad.save(&mut StateWriter::new(&mut out));
        assert!(VirtioMmio::restore(&mut StateReader::new(&out), &Dummy).is_err());
    }
}
