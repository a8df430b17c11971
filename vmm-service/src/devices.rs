//! A VM's devices: the machine layout, the port I/O and MMIO buses that
//! decode guest accesses to device models, the interrupt path, the device
//! clock, and versioned save/restore of all of it.
//!
//! Two machines exist:
//! * [`Machine::Minimal`], what the project's test kernel gets: COM1 only,
//!   its interrupt line unconnected;
//! * [`Machine::Pc`], what a Linux guest needs from a PC: COM1 (IRQ 4), the
//!   8259 pair with ELCR, the 8254 PIT with port 0x61, the RTC/CMOS (IRQ 8),
//!   the ACPI fixed registers (SCI on IRQ 9), the I/O APIC and the local
//!   APIC, at the addresses the ACPI tables ([`acpi`]) describe.
//!
//! Every access no device claims reads all-ones and drops writes (STYLE 4,
//! rule 2): what a guest probing absent hardware sees on a real machine.
//! Port 0x80 (the POST port guests write as an I/O delay) is silently
//! ignored. A port access wider than the device region it starts in is
//! split into byte accesses of consecutive ports, as an ISA bus does; an
//! MMIO access is decoded as a whole (its first byte picks the device) and
//! an MMIO access running past its region reads all-ones.
//!
//! Time: the methods take the node's clock (`now_ns`) and convert it to the
//! VM's *device clock*, which starts at 0 when the VM is built, never goes
//! backwards, and after a restore continues from the value saved (so a
//! timer armed on the source fires as far ahead on the destination,
//! whatever the two nodes' clocks read; the guest's TSC does the same).
//!
//! Interrupts: a device drives its ISA line through the [`DeviceCtx`] it is
//! given; after each access or timer step the set propagates line changes
//! to the [`irq::IrqChip`]. The vCPU loop then asks
//! [`Devices::poll_interrupt`] for the next vector to inject.
//!
//! Saved state ([`Devices::save`]): version byte 2, the machine, the device
//! clock, the line levels, then one record per device: kind, instance,
//! version, length, payload (see [`state`]). Version 1 (COM1 only, from
//! before this format) is still read.

pub mod acpi;
pub mod acpi_pm;
pub mod bus;
pub mod exits;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod ioapic;
pub mod irq;
pub mod lapic;
pub mod mmio;
pub mod pic;
pub mod pit;
pub mod rtc;
pub mod state;
pub mod virtio_blk;
pub mod virtio_mmio;
pub mod walk;

use crate::uart::{LineSink, Uart16550};
use acpi_pm::AcpiPm;
use alloc::boxed::Box;
use alloc::vec::Vec;
use bus::Bus;
use core::fmt;
use hvcore::abi::COM1_PORT;
use irq::{InterruptPoll, IrqChip, Readiness};
use pit::Pit;
use rtc::Rtc;
use state::{DeviceKind, Snapshot, StateError, StateReader, StateWriter};
use virtio_blk::VirtioBlk;

pub use state::StateError as RestoreError;

/// The BIOS POST diagnostic port.
pub const POST_PORT: u16 = 0x80;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u8 = 4;
/// The RTC's ISA interrupt line.
pub const RTC_IRQ: u8 = 8;
/// The ACPI SCI's ISA interrupt line.
pub const SCI_IRQ: u8 = 9;
/// The PIT channel 0 line.
pub const PIT_IRQ: u8 = 0;
/// Most bytes a device record may hold.
pub const MAX_RECORD_BYTES: usize = 16 * 1024;
/// Most device records in a saved set.
pub const MAX_RECORDS: usize = 32;
/// Most virtio-mmio slots a VM has (the DSDT describes at most 8).
pub const MAX_VIRTIO_SLOTS: usize = 8;

/// ISA interrupt line levels as devices drive them, and pulses (an edge
/// up and down between two propagations, e.g. a PIT period).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqLines {
    levels: u16,
    pulses: u16,
}

/// A device's handle on its own interrupt line (or on none).
pub struct IrqPin<'a> {
    lines: &'a mut IrqLines,
    line: Option<u8>,
}

impl IrqPin<'_> {
    /// Drive the line to `level`.
    pub fn set(&mut self, level: bool) {
        if let Some(l) = self.line {
            if level {
                self.lines.levels |= 1 << l;
            } else {
                self.lines.levels &= !(1 << l);
            }
        }
    }
    /// One edge up and down (edge-triggered inputs latch it).
    pub fn pulse(&mut self) {
        if let Some(l) = self.line {
            self.lines.pulses |= 1 << l;
        }
    }
}

/// Requests a device makes of the VM (ACPI sleep, reset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    /// The guest asked for power-off (ACPI S5).
    pub power_off: bool,
    /// The guest asked for a reset.
    pub reset: bool,
}

/// What a device sees of the VM while it handles an access or a timer.
pub struct DeviceCtx<'a> {
    /// The device clock, nanoseconds.
    pub now_ns: u64,
    /// The device's interrupt line.
    pub irq: IrqPin<'a>,
    /// Where console lines go (the UART).
    pub console: &'a mut dyn LineSink,
    /// Power requests.
    pub requests: &'a mut Requests,
}

/// A device model on the buses. Regions are numbered by the machine
/// layout; `offset` is from the region's base; `data` is the access (1, 2,
/// 4 or 8 bytes, little-endian).
pub trait Device: Snapshot {
    /// Guest read.
    fn read(&mut self, region: u8, offset: u64, data: &mut [u8], ctx: &mut DeviceCtx<'_>);
    /// Guest write.
    fn write(&mut self, region: u8, offset: u64, data: &[u8], ctx: &mut DeviceCtx<'_>);
    /// Run the device's timers up to `ctx.now_ns`.
    fn advance(&mut self, _ctx: &mut DeviceCtx<'_>) {}
    /// Device time at which [`Device::advance`] next has work.
    fn next_event_ns(&self) -> Option<u64> {
        None
    }
}

/// Which machine a VM has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// COM1 only (the project's test kernel).
    Minimal,
    /// The PC platform a Linux guest needs.
    Pc,
}

impl Machine {
    fn code(self) -> u8 {
        match self {
            Machine::Minimal => 0,
            Machine::Pc => 1,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Machine::Minimal),
            1 => Some(Machine::Pc),
            _ => None,
        }
    }
}

/// A device model the set owns by type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dev {
    Com1,
    Pit,
    Rtc,
    AcpiPm,
}

/// What a bus range leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Dev(Dev, u8),
    /// The 8259 pair or the ELCR; the offset is added to this port.
    Pic(u16),
    IoApic,
    Lapic,
    /// virtio-mmio slot n (`acpi::VirtioMmioSlot::standard(n)`).
    Virtio(u8),
}

/// The PC platform's devices (none on a minimal machine).
struct Pc {
    pit: Pit,
    rtc: Rtc,
    pm: AcpiPm,
    chip: IrqChip,
}

/// The VM's device clock (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DeviceClock {
    /// Device time = node time + offset (wrapping), once anchored.
    offset: u64,
    anchored: bool,
    /// Latest device time handed out (or restored).
    last: u64,
}

impl DeviceClock {
    fn starting_at(ns: u64) -> Self {
        Self {
            offset: 0,
            anchored: false,
            last: ns,
        }
    }

    fn device_ns(&mut self, node_ns: u64) -> u64 {
        if !self.anchored {
            self.offset = self.last.wrapping_sub(node_ns);
            self.anchored = true;
        }
        self.last = self.last.max(node_ns.wrapping_add(self.offset));
        self.last
    }
}

/// Sink for devices that cannot print (a read never transmits).
struct NoConsole;
impl LineSink for NoConsole {
    fn line(&mut self, _: &str) {}
}

/// The devices of one VM.
pub struct Devices {
    machine: Machine,
    com1: Uart16550,
    pc: Option<Box<Pc>>,
    ports: Bus<Target>,
    mmio: Bus<Target>,
    clock: DeviceClock,
    lines: IrqLines,
    /// Line levels the interrupt controllers last saw.
    delivered: u16,
    requests: Requests,
    /// virtio-blk disks, slot n at `acpi::VirtioMmioSlot::standard(n)`.
    virtio: Vec<VirtioBlk>,
    /// Their interrupt levels as the I/O APIC last saw them (bit n = slot n).
    virtio_lines: u8,
    /// Bounce buffer for virtio requests (not state).
    scratch: Vec<u8>,
    /// Accesses to addresses no device claims (for diagnostics).
    pub unclaimed_accesses: u64,
}

impl fmt::Debug for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Devices")
            .field("machine", &self.machine)
            .field("device_ns", &self.clock.last)
            .field("unclaimed_accesses", &self.unclaimed_accesses)
            .finish()
    }
}

impl Default for Devices {
    fn default() -> Self {
        Self::new()
    }
}

impl Devices {
    /// Version byte at the start of [`Devices::save`] output.
    pub const SAVE_VERSION: u8 = 2;

    /// The minimal machine (COM1 only) in its reset state.
    pub fn new() -> Self {
        Self::with_machine(Machine::Minimal, 0)
    }

    /// The PC machine in its reset state; the RTC reads `wall_clock_ns`
    /// (nanoseconds since 1970-01-01 UTC) now.
    pub fn pc(wall_clock_ns: u64) -> Self {
        Self::with_machine(Machine::Pc, wall_clock_ns)
    }

    fn with_machine(machine: Machine, wall_clock_ns: u64) -> Self {
        let mut ports = Bus::new(0x1_0000);
        let mut mmio = Bus::new(u64::MAX);
        let layout = |ports: &mut Bus<Target>, base: u16, len: u16, t: Target| {
            ports
                .insert(u64::from(base), u64::from(len), t)
                .expect("fixed machine layout has no overlaps");
        };
        layout(
            &mut ports,
            COM1_PORT,
            Uart16550::PORTS,
            Target::Dev(Dev::Com1, 0),
        );
        let pc = match machine {
            Machine::Minimal => None,
            Machine::Pc => {
                layout(
                    &mut ports,
                    pic::MASTER_PORT,
                    2,
                    Target::Pic(pic::MASTER_PORT),
                );
                layout(&mut ports, pic::SLAVE_PORT, 2, Target::Pic(pic::SLAVE_PORT));
                layout(&mut ports, pic::ELCR_PORT, 2, Target::Pic(pic::ELCR_PORT));
                layout(&mut ports, pit::PIT_PORT, 4, Target::Dev(Dev::Pit, 0));
                layout(&mut ports, pit::PORT_61, 1, Target::Dev(Dev::Pit, 1));
                layout(&mut ports, rtc::RTC_PORT, 2, Target::Dev(Dev::Rtc, 0));
                layout(
                    &mut ports,
                    acpi_pm::PM_BASE_PORT,
                    acpi_pm::PM_PORTS,
                    Target::Dev(Dev::AcpiPm, 0),
                );
                mmio.insert(
                    ioapic::IOAPIC_BASE,
                    ioapic::IOAPIC_WINDOW_BYTES,
                    Target::IoApic,
                )
                .expect("fixed machine layout has no overlaps");
                mmio.insert(lapic::LAPIC_BASE, lapic::LAPIC_PAGE_BYTES, Target::Lapic)
                    .expect("fixed machine layout has no overlaps");
                Some(Box::new(Pc {
                    pit: Pit::new(),
                    rtc: Rtc::new(wall_clock_ns, 0),
                    pm: AcpiPm::new(),
                    chip: IrqChip::new(),
                }))
            }
        };
        Self {
            machine,
            com1: Uart16550::new(),
            pc,
            ports,
            mmio,
            clock: DeviceClock::starting_at(0),
            lines: IrqLines::default(),
            delivered: 0,
            requests: Requests::default(),
            virtio: Vec::new(),
            virtio_lines: 0,
            scratch: Vec::new(),
            unclaimed_accesses: 0,
        }
    }

    /// Add a virtio-blk disk of `capacity_bytes` in the next virtio-mmio
    /// slot; returns the slot. Its bytes come from the disk handed to
    /// [`Devices::process_virtio`] at index `slot`.
    pub fn add_virtio_blk(&mut self, capacity_bytes: u64, read_only: bool) -> Option<u8> {
        let slot = u8::try_from(self.virtio.len()).ok()?;
        if usize::from(slot) >= MAX_VIRTIO_SLOTS {
            return None;
        }
        let s = acpi::VirtioMmioSlot::standard(slot);
        self.mmio
            .insert(s.base, virtio_mmio::WINDOW_BYTES, Target::Virtio(slot))
            .ok()?;
        self.virtio.push(VirtioBlk::new(capacity_bytes, read_only));
        Some(slot)
    }

    /// Whether a device claims MMIO address `gpa` (an exit there is an
    /// access to emulate).
    pub fn claims_mmio(&self, gpa: u64) -> bool {
        match self.mmio.lookup(gpa) {
            Some(bus::Hit {
                target: Target::Virtio(_),
                ..
            }) => true,
            Some(_) => self.pc.is_some(),
            None => false,
        }
    }

    /// The virtio-blk device in `slot`.
    pub fn virtio_blk(&self, slot: u8) -> Option<&VirtioBlk> {
        self.virtio.get(usize::from(slot))
    }

    /// The virtio-mmio slots in use (for the ACPI tables).
    pub fn virtio_slots(&self) -> Vec<acpi::VirtioMmioSlot> {
        (0..self.virtio.len() as u8)
            .map(acpi::VirtioMmioSlot::standard)
            .collect()
    }

    /// Whether a virtio device was notified and waits for
    /// [`Devices::process_virtio`].
    pub fn virtio_pending(&self) -> bool {
        self.virtio.iter().any(VirtioBlk::has_work)
    }

    /// A disk whose store is full holds a request back: `(slot, why)` of
    /// the first (each [`Devices::process_virtio`] retries them).
    pub fn store_full(&self) -> Option<(u8, &str)> {
        self.virtio
            .iter()
            .enumerate()
            .find_map(|(i, d)| Some((i as u8, d.store_full()?)))
    }

    /// Serve the virtio requests the guest made available: slot n's disk
    /// is `disks[n]` (missing: every request fails). Called after the
    /// access that notified, with the VM's memory.
    pub fn process_virtio(
        &mut self,
        mem: &mut dyn hvcore::mem::GuestMemory,
        disks: &mut [alloc::boxed::Box<dyn vstorage::VirtualDisk>],
    ) {
        for (i, dev) in self.virtio.iter_mut().enumerate() {
            if dev.has_work() {
                let disk = disks
                    .get_mut(i)
                    .map(|d| &mut **d as &mut dyn vstorage::VirtualDisk);
                dev.process(mem, disk, &mut self.scratch);
            }
        }
        self.sync_virtio_lines();
    }

    /// Hand virtio interrupt level changes to the I/O APIC (GSI 16 + n).
    /// A machine without interrupt controllers has none: its guest polls
    /// the used ring.
    fn sync_virtio_lines(&mut self) {
        let mut levels = 0u8;
        for (i, dev) in self.virtio.iter().enumerate() {
            if dev.interrupt_line() {
                levels |= 1 << i;
            }
        }
        let changed = levels ^ self.virtio_lines;
        self.virtio_lines = levels;
        let Some(pc) = self.pc.as_mut() else {
            return;
        };
        for i in 0..self.virtio.len() as u8 {
            if changed & (1 << i) != 0 {
                let gsi = acpi::VirtioMmioSlot::standard(i).gsi;
                pc.chip.set_gsi(gsi as u8, levels & (1 << i) != 0);
            }
        }
    }

    /// Which machine this is.
    pub fn machine(&self) -> Machine {
        self.machine
    }

    /// COM1.
    pub fn com1(&self) -> &Uart16550 {
        &self.com1
    }

    /// The interrupt controllers (PC machine only).
    pub fn irq_chip(&self) -> Option<&IrqChip> {
        self.pc.as_ref().map(|pc| &pc.chip)
    }

    /// Take the power requests the guest made since the last call.
    pub fn take_requests(&mut self) -> Requests {
        core::mem::take(&mut self.requests)
    }

    /// The device clock at node time `now_ns`.
    pub fn device_ns(&mut self, now_ns: u64) -> u64 {
        self.clock.device_ns(now_ns)
    }

    fn irq_line(&self, dev: Dev) -> Option<u8> {
        match (self.machine, dev) {
            (Machine::Minimal, _) => None,
            (Machine::Pc, Dev::Com1) => Some(COM1_IRQ),
            (Machine::Pc, Dev::Pit) => Some(PIT_IRQ),
            (Machine::Pc, Dev::Rtc) => Some(RTC_IRQ),
            (Machine::Pc, Dev::AcpiPm) => Some(SCI_IRQ),
        }
    }

    /// Run `f` on device `dev` with a context at device time `dev_ns`, then
    /// propagate its line changes.
    fn with_device<R>(
        &mut self,
        dev: Dev,
        dev_ns: u64,
        console: &mut dyn LineSink,
        f: impl FnOnce(&mut dyn Device, &mut DeviceCtx<'_>) -> R,
    ) -> Option<R> {
        let line = self.irq_line(dev);
        let device: &mut dyn Device = match dev {
            Dev::Com1 => &mut self.com1,
            Dev::Pit => &mut self.pc.as_mut()?.pit,
            Dev::Rtc => &mut self.pc.as_mut()?.rtc,
            Dev::AcpiPm => &mut self.pc.as_mut()?.pm,
        };
        let mut ctx = DeviceCtx {
            now_ns: dev_ns,
            irq: IrqPin {
                lines: &mut self.lines,
                line,
            },
            console,
            requests: &mut self.requests,
        };
        let r = f(device, &mut ctx);
        self.propagate();
        Some(r)
    }

    /// Hand line changes and pulses to the interrupt controllers.
    fn propagate(&mut self) {
        let changed = self.lines.levels ^ self.delivered;
        let pulses = core::mem::take(&mut self.lines.pulses);
        self.delivered = self.lines.levels;
        let Some(pc) = self.pc.as_mut() else {
            return;
        };
        for irq in 0..irq::ISA_IRQS {
            let bit = 1u16 << irq;
            let high = self.lines.levels & bit != 0;
            if changed & bit != 0 {
                pc.chip.set_isa_irq(irq, high);
            }
            if pulses & bit != 0 && !high {
                pc.chip.set_isa_irq(irq, true);
                pc.chip.set_isa_irq(irq, false);
            }
        }
    }

    fn unclaimed(&mut self, what: &str, addr: u64) {
        self.unclaimed_accesses = self.unclaimed_accesses.saturating_add(1);
        log::trace!("unclaimed {what} {addr:#x}");
    }

    /// Guest `in` of `size` bytes (1, 2 or 4; anything else is treated as
    /// 4) from `port` at node time `now_ns`. Unclaimed bytes read 0xff.
    pub fn port_read(&mut self, now_ns: u64, port: u16, size: u8) -> u32 {
        let dev_ns = self.clock.device_ns(now_ns);
        let mut data = [0xffu8; 4];
        let n = usize::from(size.clamp(1, 4));
        self.port_access(dev_ns, port, &mut data[..n], None);
        u32::from_le_bytes(data)
            & match n {
                1 => 0xff,
                2 => 0xffff,
                _ => u32::MAX,
            }
    }

    /// Guest `out` of the low `size` bytes of `value` to `port` at node
    /// time `now_ns`; transmitted console lines go to `sink`.
    pub fn port_write(
        &mut self,
        now_ns: u64,
        port: u16,
        size: u8,
        value: u32,
        sink: &mut dyn LineSink,
    ) {
        let dev_ns = self.clock.device_ns(now_ns);
        let n = usize::from(size.clamp(1, 4));
        let mut data = value.to_le_bytes();
        self.port_access(dev_ns, port, &mut data[..n], Some(sink));
    }

    /// Guest `in` at the device clock's last time (for callers that do not
    /// read the clock on every exit; timer-driven devices want
    /// [`Devices::port_read`]).
    pub fn io_in(&mut self, port: u16, size: u8) -> u32 {
        let now = self.clock.last.wrapping_sub(self.clock.offset);
        self.port_read(now, port, size)
    }

    /// Guest `out` at the device clock's last time (see [`Devices::io_in`]).
    pub fn io_out(&mut self, port: u16, size: u8, value: u32, sink: &mut dyn LineSink) {
        let now = self.clock.last.wrapping_sub(self.clock.offset);
        self.port_write(now, port, size, value, sink);
    }

    /// One port access: whole if it fits one region, else byte by byte.
    /// `sink` is `Some` for writes.
    fn port_access(
        &mut self,
        dev_ns: u64,
        port: u16,
        data: &mut [u8],
        mut sink: Option<&mut dyn LineSink>,
    ) {
        let hit = self.ports.lookup(u64::from(port));
        match hit {
            Some(h) if h.left >= data.len() as u64 => {
                self.dispatch_port(dev_ns, h.target, h.offset, data, sink);
            }
            _ if data.len() > 1 => {
                for (i, b) in data.iter_mut().enumerate() {
                    let p = port.wrapping_add(i as u16);
                    let s = sink.as_mut().map(|s| &mut **s as &mut dyn LineSink);
                    self.port_access(dev_ns, p, core::slice::from_mut(b), s);
                }
            }
            _ => {
                if port != POST_PORT {
                    self.unclaimed("I/O port", u64::from(port));
                }
                if sink.is_none() {
                    data.fill(0xff);
                }
            }
        }
    }

    fn dispatch_port(
        &mut self,
        dev_ns: u64,
        target: Target,
        offset: u64,
        data: &mut [u8],
        sink: Option<&mut dyn LineSink>,
    ) {
        match target {
            Target::Dev(dev, region) => {
                let write = sink.is_some();
                let mut quiet = NoConsole;
                let console: &mut dyn LineSink = match sink {
                    Some(s) => s,
                    None => &mut quiet,
                };
                let done = self.with_device(dev, dev_ns, console, |d, ctx| {
                    if write {
                        d.write(region, offset, data, ctx);
                    } else {
                        d.read(region, offset, data, ctx);
                    }
                });
                if done.is_none() && !write {
                    data.fill(0xff);
                }
            }
            Target::Pic(base) => {
                let Some(pc) = self.pc.as_mut() else {
                    data.fill(0xff);
                    return;
                };
                // The 8259 and ELCR registers are byte-wide.
                for (i, b) in data.iter_mut().enumerate() {
                    let port = base + offset as u16 + i as u16;
                    if sink.is_some() {
                        pc.chip.pic_write(port, *b);
                    } else {
                        *b = pc.chip.pic_read(port);
                    }
                }
            }
            Target::IoApic | Target::Lapic | Target::Virtio(_) => data.fill(0xff),
        }
    }

    /// Guest read of `data.len()` bytes (1, 2, 4 or 8) of MMIO at `gpa`.
    /// Unclaimed reads return all-ones.
    pub fn mmio_read(&mut self, now_ns: u64, gpa: u64, data: &mut [u8]) {
        let dev_ns = self.clock.device_ns(now_ns);
        self.mmio_access(dev_ns, gpa, data, false);
    }

    /// Guest write of `data` to MMIO at `gpa`. Unclaimed writes are dropped.
    pub fn mmio_write(&mut self, now_ns: u64, gpa: u64, data: &[u8]) {
        let dev_ns = self.clock.device_ns(now_ns);
        let mut buf = [0u8; 8];
        let n = data.len().min(8);
        buf[..n].copy_from_slice(&data[..n]);
        self.mmio_access(dev_ns, gpa, &mut buf[..n], true);
    }

    fn mmio_access(&mut self, dev_ns: u64, gpa: u64, data: &mut [u8], write: bool) {
        let hit = self
            .mmio
            .lookup(gpa)
            .filter(|h| h.left >= data.len() as u64);
        if let Some(bus::Hit {
            target: Target::Virtio(slot),
            offset,
            ..
        }) = hit
        {
            if let Some(dev) = self.virtio.get_mut(usize::from(slot)) {
                if write {
                    dev.mmio_write(offset, data);
                } else {
                    dev.mmio_read(offset, data);
                }
            }
            self.sync_virtio_lines();
            return;
        }
        let (Some(hit), Some(pc)) = (hit, self.pc.as_mut()) else {
            self.unclaimed("MMIO", gpa);
            if !write {
                data.fill(0xff);
            }
            return;
        };
        // Both controllers have 32-bit registers: split into the dwords the
        // access covers, with a byte mask for partial ones.
        let start = hit.offset;
        let end = start + data.len() as u64;
        let mut dword = start & !3;
        while dword < end {
            let lo = start.max(dword);
            let hi = end.min(dword + 4);
            let reg = match hit.target {
                Target::IoApic => pc.chip.ioapic.mmio_read(dword),
                _ => pc.chip.lapic.mmio_read(dword, dev_ns),
            };
            let mut bytes = reg.to_le_bytes();
            for a in lo..hi {
                let d = (a - start) as usize;
                let b = (a - dword) as usize;
                if write {
                    bytes[b] = data[d];
                } else {
                    data[d] = bytes[b];
                }
            }
            if write {
                let value = u32::from_le_bytes(bytes);
                match hit.target {
                    Target::IoApic => pc.chip.ioapic_write(dword, value),
                    _ => pc.chip.lapic_write(dword, value, dev_ns),
                }
            }
            dword += 4;
        }
    }

    /// Run every device timer up to node time `now_ns`; timer interrupts
    /// become pending.
    pub fn advance(&mut self, now_ns: u64) {
        let dev_ns = self.clock.device_ns(now_ns);
        let mut quiet = NoConsole;
        for dev in [Dev::Pit, Dev::Rtc, Dev::AcpiPm] {
            self.with_device(dev, dev_ns, &mut quiet, |d, ctx| d.advance(ctx));
        }
        if let Some(pc) = self.pc.as_mut() {
            pc.chip.lapic.advance(dev_ns);
        }
    }

    /// Node time at which [`Devices::advance`] next has work (the HLT wake
    /// time), if any timer is armed.
    pub fn next_event_ns(&self) -> Option<u64> {
        let pc = self.pc.as_ref()?;
        let dev = [
            pc.pit.next_event_ns(),
            pc.rtc.next_event_ns(),
            pc.pm.next_event_ns(),
            pc.chip.lapic.next_event_ns(),
        ]
        .into_iter()
        .flatten()
        .min()?;
        // Device time to node time; an event already due is due now.
        Some(dev.max(self.clock.last).wrapping_sub(self.clock.offset))
    }

    /// Whether an interrupt or NMI is waiting, whether or not the guest
    /// can take it (a halted vCPU wakes up).
    pub fn interrupt_pending(&self) -> bool {
        self.pc.as_ref().is_some_and(|pc| pc.chip.has_pending())
    }

    /// The one call the vCPU loop makes before entering the guest: the
    /// event to inject now, if the guest can take it (see
    /// [`InterruptPoll`]).
    pub fn poll_interrupt(&mut self, ready: Readiness) -> InterruptPoll {
        match self.pc.as_mut() {
            Some(pc) => pc.chip.poll(ready),
            None => InterruptPoll::Idle,
        }
    }

    /// RDMSR IA32_TSC_DEADLINE (0 on a machine without a local APIC).
    pub fn read_tsc_deadline(&self) -> u64 {
        self.pc
            .as_ref()
            .map_or(0, |pc| pc.chip.lapic.read_tsc_deadline())
    }

    /// WRMSR IA32_TSC_DEADLINE at node time `now_ns`, when the guest TSC
    /// reads `guest_tsc` and runs at `tsc_khz`.
    pub fn write_tsc_deadline(&mut self, now_ns: u64, deadline: u64, guest_tsc: u64, tsc_khz: u64) {
        let dev_ns = self.clock.device_ns(now_ns);
        if let Some(pc) = self.pc.as_mut() {
            pc.chip
                .lapic
                .write_tsc_deadline(dev_ns, deadline, guest_tsc, tsc_khz);
        }
    }

    /// Host console input for COM1 at node time `now_ns`: how many bytes
    /// the receive FIFO took (offer the rest again later).
    pub fn console_input(&mut self, now_ns: u64, bytes: &[u8]) -> usize {
        self.clock.device_ns(now_ns);
        let taken = self.com1.receive_input(bytes);
        let level = self.com1.interrupt_line();
        self.drive_line(Dev::Com1, level);
        taken
    }

    /// The ACPI power button was pressed at node time `now_ns` (a graceful
    /// shutdown request the guest sees as a fixed-feature event).
    pub fn press_power_button(&mut self, now_ns: u64) {
        self.clock.device_ns(now_ns);
        let level = match self.pc.as_mut() {
            Some(pc) => {
                pc.pm.press_power_button();
                pc.pm.sci_level()
            }
            None => return,
        };
        self.drive_line(Dev::AcpiPm, level);
    }

    /// Set `dev`'s line outside an access (host-side events) and propagate.
    fn drive_line(&mut self, dev: Dev, level: bool) {
        if let Some(line) = self.irq_line(dev) {
            IrqPin {
                lines: &mut self.lines,
                line: Some(line),
            }
            .set(level);
            self.propagate();
        }
    }

    /// Every device's state as `(kind, instance, version, payload)`
    /// records, in a fixed order.
    pub fn save_records(&self) -> Vec<DeviceRecord> {
        let mut out = Vec::new();
        let mut push = |dev: &dyn Snapshot, instance: u16| {
            let mut payload = Vec::new();
            dev.save_state(&mut payload);
            out.push(DeviceRecord {
                kind: dev.kind(),
                instance,
                version: dev.state_version(),
                payload,
            });
        };
        push(&self.com1, 0);
        if let Some(pc) = &self.pc {
            push(&pc.chip.pic, 0);
            push(&pc.pit, 0);
            push(&pc.rtc, 0);
            push(&pc.pm, 0);
            push(&pc.chip.ioapic, 0);
            push(&pc.chip.lapic, 0);
        }
        for (i, dev) in self.virtio.iter().enumerate() {
            push(dev, i as u16);
        }
        out
    }

    /// Serialise the whole set (the migration stream's device record).
    pub fn save(&self) -> Vec<u8> {
        let records = self.save_records();
        let mut out = Vec::new();
        let mut w = StateWriter::new(&mut out);
        w.u8(Self::SAVE_VERSION)
            .u8(self.machine.code())
            .u64(self.clock.last)
            .u16(self.lines.levels)
            .u16(self.delivered)
            .u16(records.len() as u16);
        for r in &records {
            w.u16(r.kind.code())
                .u16(r.instance)
                .u16(r.version)
                .u32(r.payload.len() as u32)
                .bytes(&r.payload);
        }
        out
    }

    /// Rebuild a set from [`Devices::save`] output. Every byte is checked:
    /// the machine must be known, every one of its devices present exactly
    /// once and no other, each record's version and payload accepted by
    /// its model.
    pub fn restore(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = StateReader::new(bytes);
        let version = r.u8()?;
        if version == 1 {
            return Self::restore_v1(bytes);
        }
        if version != Self::SAVE_VERSION {
            return Err(StateError::UnsupportedVersion {
                what: "device set",
                version: u32::from(version),
            });
        }
        let machine_code = r.u8()?;
        let machine = Machine::from_code(machine_code).ok_or(StateError::BadValue {
            what: "machine",
            value: u64::from(machine_code),
        })?;
        let clock_ns = r.u64()?;
        let levels = r.u16()?;
        let delivered = r.u16()?;
        let count = usize::from(r.u16()?);
        if count > MAX_RECORDS {
            return Err(StateError::LengthOverCap {
                what: "device records",
                len: count as u64,
            });
        }
        let mut records = Vec::with_capacity(count);
        for _ in 0..count {
            let code = r.u16()?;
            let kind = DeviceKind::from_code(code).ok_or(StateError::UnknownKind(code))?;
            let instance = r.u16()?;
            let version = r.u16()?;
            let len = r.u32()? as usize;
            if len > MAX_RECORD_BYTES {
                return Err(StateError::LengthOverCap {
                    what: "device record",
                    len: len as u64,
                });
            }
            let payload = r.take(len)?.to_vec();
            records.push(DeviceRecord {
                kind,
                instance,
                version,
                payload,
            });
        }
        r.finish()?;
        let mut d = Self::with_machine(machine, 0);
        // The virtio slots the records name exist before they restore
        // (their capacity comes from the records).
        let disks = records
            .iter()
            .filter(|r| r.kind == DeviceKind::VirtioBlk)
            .count();
        for _ in 0..disks {
            d.add_virtio_blk(0, false)
                .ok_or(StateError::LengthOverCap {
                    what: "virtio slots",
                    len: disks as u64,
                })?;
        }
        d.restore_records(&records)?;
        // The I/O APIC's restored pins already hold these levels.
        d.virtio_lines = d
            .virtio
            .iter()
            .enumerate()
            .filter(|(_, v)| v.interrupt_line())
            .fold(0, |acc, (i, _)| acc | (1 << i));
        d.clock = DeviceClock::starting_at(clock_ns);
        if machine == Machine::Minimal && (levels | delivered) != 0 {
            return Err(StateError::BadValue {
                what: "interrupt lines of a machine without controllers",
                value: u64::from(levels | delivered),
            });
        }
        d.lines.levels = levels;
        d.delivered = delivered;
        Ok(d)
    }

    /// Restore every device of this machine from `records`.
    pub fn restore_records(&mut self, records: &[DeviceRecord]) -> Result<(), StateError> {
        let expected = self.save_records();
        let mut seen = alloc::vec![false; expected.len()];
        for rec in records {
            let i = expected
                .iter()
                .position(|e| e.kind == rec.kind && e.instance == rec.instance)
                .ok_or(StateError::UnknownInstance {
                    kind: rec.kind.code(),
                    instance: rec.instance,
                })?;
            if core::mem::replace(&mut seen[i], true) {
                return Err(StateError::Duplicate {
                    kind: rec.kind.code(),
                    instance: rec.instance,
                });
            }
        }
        if seen.contains(&false) {
            return Err(StateError::Incomplete(
                "a device of this machine has no saved state",
            ));
        }
        // Restore into copies first so a refusal changes nothing.
        let mut com1 = self.com1.clone();
        let mut pc_parts = self.pc.as_ref().map(|pc| {
            (
                pc.chip.pic.clone(),
                pc.pit.clone(),
                pc.rtc.clone(),
                pc.pm.clone(),
                pc.chip.ioapic.clone(),
                pc.chip.lapic.clone(),
            )
        });
        let mut virtio = self.virtio.clone();
        for rec in records {
            let target: &mut dyn Snapshot = match (rec.kind, pc_parts.as_mut()) {
                (DeviceKind::Uart16550, _) => &mut com1,
                (DeviceKind::VirtioBlk, _) => virtio.get_mut(usize::from(rec.instance)).ok_or(
                    StateError::UnknownInstance {
                        kind: rec.kind.code(),
                        instance: rec.instance,
                    },
                )?,
                (DeviceKind::Pic, Some(p)) => &mut p.0,
                (DeviceKind::Pit, Some(p)) => &mut p.1,
                (DeviceKind::Rtc, Some(p)) => &mut p.2,
                (DeviceKind::AcpiPm, Some(p)) => &mut p.3,
                (DeviceKind::IoApic, Some(p)) => &mut p.4,
                (DeviceKind::Lapic, Some(p)) => &mut p.5,
                (kind, None) => {
                    return Err(StateError::UnknownInstance {
                        kind: kind.code(),
                        instance: rec.instance,
                    })
                }
            };
            target.restore_state(rec.version, &rec.payload)?;
        }
        self.com1 = com1;
        self.virtio = virtio;
        if let (Some(pc), Some((pic, pit, rtc, pm, ioapic, lapic))) = (self.pc.as_mut(), pc_parts) {
            pc.pit = pit;
            pc.rtc = rtc;
            pc.pm = pm;
            pc.chip = IrqChip::from_parts(pic, ioapic, lapic);
        }
        Ok(())
    }

    /// Format 1: `[1][u16 len][UART state]`.
    fn restore_v1(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = StateReader::new(bytes);
        r.u8()?;
        let len = usize::from(r.u16()?);
        let uart = r.take(len)?;
        r.finish()?;
        let mut d = Self::new();
        d.com1.restore_state(1, uart)?;
        Ok(d)
    }
}

/// The MMIO bus of a device set at one instant, for [`mmio::emulate`].
pub struct MmioAt<'a> {
    pub devices: &'a mut Devices,
    /// Node time of the access.
    pub now_ns: u64,
}

impl mmio::MmioBus for MmioAt<'_> {
    fn read(&mut self, gpa: u64, data: &mut [u8]) {
        self.devices.mmio_read(self.now_ns, gpa, data);
    }
    fn write(&mut self, gpa: u64, data: &[u8]) {
        self.devices.mmio_write(self.now_ns, gpa, data);
    }
}

impl Devices {
    /// Complete the instruction in `insn_bytes` (fetched at the guest's
    /// RIP, see [`walk::fetch`]) whose data access at `gpa` faulted: the
    /// device access, the register result and RIP. On error nothing was
    /// accessed; the VM must stop with the error and the bytes.
    pub fn emulate_mmio(
        &mut self,
        now_ns: u64,
        insn_bytes: &[u8],
        mode: mmio::CpuMode,
        regs: &mut hvcore::vcpu::Regs,
        gpa: u64,
    ) -> Result<mmio::MmioInsn, mmio::DecodeError> {
        let mut bus = MmioAt {
            devices: self,
            now_ns,
        };
        mmio::emulate(insn_bytes, mode, regs, gpa, &mut bus)
    }
}

/// One device's saved state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRecord {
    pub kind: DeviceKind,
    pub instance: u16,
    pub version: u16,
    pub payload: Vec<u8>,
}

#[cfg(test)]
mod tests;
