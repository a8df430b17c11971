//! The I/O APIC: 24 interrupt inputs, each routed by its redirection-table
//! entry to a vector on a local APIC.
//!
//! Registers are reached through the MMIO window at [`IOAPIC_BASE`]: the
//! index register IOREGSEL (offset 0x00), the data window IOWIN (0x10) and
//! the EOI register (0x40, version 0x20 parts). Register 0 is the ID, 1 the
//! version (0x0017_0020: 24 entries, version 0x20), 2 the arbitration ID,
//! 0x10 + 2n / 0x11 + 2n the low and high halves of entry n.
//!
//! Delivery: an input's *asserted* state is its line level XOR the entry's
//! polarity (bit 13, active low). An edge-triggered entry sends one
//! [`ApicMessage`] per rising edge of the asserted state while unmasked
//! (edges while masked are lost, as on the real part). A level-triggered
//! entry sends one message while asserted, unmasked and Remote IRR clear,
//! sets Remote IRR, and sends again only after the local APIC's EOI for its
//! vector ([`IoApic::eoi`]) if the input is still asserted.
//!
//! Reference: Intel 82093AA I/O APIC data sheet (order 290566), 3.0
//! (registers) and 3.2.4 (redirection table); the EOI register of version
//! 0x20: Intel ICH9 data sheet, 13.5.5.

use super::state::{expect_version, DeviceKind, Snapshot, StateError, StateReader, StateWriter};
use alloc::vec::Vec;

/// Guest-physical base of the register window.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Bytes of the window.
pub const IOAPIC_WINDOW_BYTES: u64 = 0x1000;
/// Number of inputs (GSIs 0-23).
pub const IOAPIC_PINS: usize = 24;
/// The APIC ID the machine gives the I/O APIC (the boot CPU's local APIC
/// is 0).
pub const IOAPIC_ID: u8 = 1;
/// Version register: max redirection entry 23, version 0x20.
pub const IOAPIC_VERSION: u32 = ((IOAPIC_PINS as u32 - 1) << 16) | 0x20;

const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARB: u8 = 0x02;
const REG_REDIR: u8 = 0x10;

const ENTRY_MASKED: u64 = 1 << 16;
const ENTRY_LEVEL: u64 = 1 << 15;
const ENTRY_REMOTE_IRR: u64 = 1 << 14;
const ENTRY_ACTIVE_LOW: u64 = 1 << 13;
const ENTRY_DELIVERY_STATUS: u64 = 1 << 12;
const ENTRY_LOGICAL: u64 = 1 << 11;
/// Bits software can write: vector, delivery mode, destination mode,
/// polarity, trigger mode, mask, destination.
const ENTRY_WRITABLE: u64 = 0xff00_0000_0001_afff;

/// Delivery modes of redirection entries and interrupt commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    StartUp,
    ExtInt,
    /// The reserved encoding 3.
    Reserved,
}

impl DeliveryMode {
    /// Decode bits 10:8.
    pub fn from_bits(bits: u64) -> Self {
        match bits & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            7 => DeliveryMode::ExtInt,
            _ => DeliveryMode::Reserved,
        }
    }
}

/// An interrupt message from the I/O APIC to the local APICs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApicMessage {
    pub vector: u8,
    pub mode: DeliveryMode,
    /// Destination field (physical APIC ID or logical mask).
    pub dest: u8,
    /// Logical destination mode.
    pub logical: bool,
    /// Level-triggered (the local APIC sets TMR and broadcasts its EOI).
    pub level: bool,
}

/// The I/O APIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoApic {
    id: u8,
    select: u8,
    entries: [u64; IOAPIC_PINS],
    /// Raw input line levels.
    lines: u32,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

impl IoApic {
    /// Saved-state format version.
    pub const STATE_VERSION: u16 = 1;

    /// Reset state: every entry masked.
    pub fn new() -> Self {
        Self {
            id: IOAPIC_ID,
            select: 0,
            entries: [ENTRY_MASKED; IOAPIC_PINS],
            lines: 0,
        }
    }

    fn asserted(&self, pin: usize) -> bool {
        let line = self.lines & (1 << pin) != 0;
        line != (self.entries[pin] & ENTRY_ACTIVE_LOW != 0)
    }

    fn message(&self, pin: usize) -> ApicMessage {
        let e = self.entries[pin];
        ApicMessage {
            vector: e as u8,
            mode: DeliveryMode::from_bits(e >> 8),
            dest: (e >> 56) as u8,
            logical: e & ENTRY_LOGICAL != 0,
            level: e & ENTRY_LEVEL != 0,
        }
    }

    /// A level entry's pending delivery, if its conditions hold now.
    fn service_level(&mut self, pin: usize, out: &mut Vec<ApicMessage>) {
        let e = self.entries[pin];
        if e & ENTRY_LEVEL != 0 && e & (ENTRY_MASKED | ENTRY_REMOTE_IRR) == 0 && self.asserted(pin)
        {
            self.entries[pin] |= ENTRY_REMOTE_IRR;
            out.push(self.message(pin));
        }
    }

    /// Drive input `pin` to `level`; messages to deliver go to `out`.
    pub fn set_pin(&mut self, pin: u8, level: bool, out: &mut Vec<ApicMessage>) {
        let pin = usize::from(pin);
        if pin >= IOAPIC_PINS {
            return;
        }
        let was = self.asserted(pin);
        if level {
            self.lines |= 1 << pin;
        } else {
            self.lines &= !(1 << pin);
        }
        let e = self.entries[pin];
        if e & ENTRY_LEVEL != 0 {
            self.service_level(pin, out);
        } else if !was && self.asserted(pin) && e & ENTRY_MASKED == 0 {
            out.push(self.message(pin));
        }
    }

    /// The local APIC's EOI of a level-triggered `vector`: clear Remote IRR
    /// of the entries using it and redeliver those still asserted.
    pub fn eoi(&mut self, vector: u8, out: &mut Vec<ApicMessage>) {
        for pin in 0..IOAPIC_PINS {
            let e = self.entries[pin];
            if e & ENTRY_REMOTE_IRR != 0 && e as u8 == vector {
                self.entries[pin] &= !ENTRY_REMOTE_IRR;
                self.service_level(pin, out);
            }
        }
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID => u32::from(self.id & 0x0f) << 24,
            REG_VERSION => IOAPIC_VERSION,
            REG_ARB => u32::from(self.id & 0x0f) << 24,
            r if r >= REG_REDIR && usize::from(r - REG_REDIR) < 2 * IOAPIC_PINS => {
                let i = usize::from(r - REG_REDIR);
                let mut e = self.entries[i / 2];
                // Delivery is instantaneous: never "send pending".
                e &= !ENTRY_DELIVERY_STATUS;
                (e >> (32 * (i % 2))) as u32
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, value: u32, out: &mut Vec<ApicMessage>) {
        match self.select {
            REG_ID => self.id = ((value >> 24) & 0x0f) as u8,
            r if r >= REG_REDIR && usize::from(r - REG_REDIR) < 2 * IOAPIC_PINS => {
                let i = usize::from(r - REG_REDIR);
                let pin = i / 2;
                let shift = 32 * (i % 2);
                let old = self.entries[pin];
                let mut e = (old & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
                e = (e & ENTRY_WRITABLE) | (old & ENTRY_REMOTE_IRR);
                if e & ENTRY_LEVEL == 0 {
                    // Remote IRR is meaningless for edge entries.
                    e &= !ENTRY_REMOTE_IRR;
                }
                self.entries[pin] = e;
                // Unmasking an asserted level input delivers it now.
                self.service_level(pin, out);
            }
            _ => {}
        }
    }

    /// Guest read of the 32-bit register at `offset` in the window.
    pub fn mmio_read(&self, offset: u64) -> u32 {
        match offset {
            0x00 => u32::from(self.select),
            0x10 => self.read_register(),
            _ => 0,
        }
    }

    /// Guest write of the 32-bit register at `offset` in the window.
    pub fn mmio_write(&mut self, offset: u64, value: u32, out: &mut Vec<ApicMessage>) {
        match offset {
            0x00 => self.select = value as u8,
            0x10 => self.write_register(value, out),
            0x40 => self.eoi(value as u8, out),
            _ => {}
        }
    }

    /// Whether input `pin` is routed, unmasked, in ExtINT mode (the CPU
    /// then takes the 8259's vector).
    pub fn extint_route(&self, pin: u8) -> bool {
        self.entries.get(usize::from(pin)).is_some_and(|&e| {
            e & ENTRY_MASKED == 0 && DeliveryMode::from_bits(e >> 8) == DeliveryMode::ExtInt
        })
    }

    /// Redirection entry `pin` (diagnostics and tests).
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.entries.get(pin).copied()
    }
}

impl Snapshot for IoApic {
    fn kind(&self) -> DeviceKind {
        DeviceKind::IoApic
    }
    fn state_version(&self) -> u16 {
        Self::STATE_VERSION
    }
    fn save_state(&self, out: &mut Vec<u8>) {
        let mut w = StateWriter::new(out);
        w.u8(self.id).u8(self.select).u32(self.lines);
        for e in self.entries {
            w.u64(e);
        }
    }
    fn restore_state(&mut self, version: u16, bytes: &[u8]) -> Result<(), StateError> {
        expect_version("I/O APIC", version, Self::STATE_VERSION)?;
        let mut r = StateReader::new(bytes);
        let id = r.u8_masked("I/O APIC ID", 0x0f)?;
        let select = r.u8()?;
        let lines = r.u32_masked("I/O APIC lines", (1 << IOAPIC_PINS) - 1)?;
        let mut entries = [0u64; IOAPIC_PINS];
        for e in &mut entries {
            let v = r.u64()?;
            if v & !(ENTRY_WRITABLE | ENTRY_REMOTE_IRR) != 0
                || (v & ENTRY_REMOTE_IRR != 0 && v & ENTRY_LEVEL == 0)
            {
                return Err(StateError::BadValue {
                    what: "redirection entry",
                    value: v,
                });
            }
            *e = v;
        }
        r.finish()?;
        *self = Self {
            id,
            select,
            entries,
            lines,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(io: &mut IoApic, pin: u8, entry: u64) -> Vec<ApicMessage> {
        let mut out = Vec::new();
        io.mmio_write(0, u32::from(0x10 + 2 * pin + 1), &mut out);
        io.mmio_write(0x10, (entry >> 32) as u32, &mut out);
        io.mmio_write(0, u32::from(0x10 + 2 * pin), &mut out);
        io.mmio_write(0x10, entry as u32, &mut out);
        out
    }

    fn read_reg(io: &mut IoApic, reg: u8) -> u32 {
        io.mmio_write(0, u32::from(reg), &mut Vec::new());
        io.mmio_read(0x10)
    }

    #[test]
    fn identification_registers() {
        let mut io = IoApic::new();
        assert_eq!(read_reg(&mut io, 0), 0x0100_0000);
        assert_eq!(read_reg(&mut io, 1), 0x0017_0020);
        assert_eq!(read_reg(&mut io, 0x10), 0x0001_0000, "masked at reset");
        assert_eq!(read_reg(&mut io, 0x10 + 48), 0, "past the table");
        io.mmio_write(0, 0, &mut Vec::new());
        io.mmio_write(0x10, 0x0f00_0000, &mut Vec::new());
        assert_eq!(read_reg(&mut io, 0), 0x0f00_0000);
        assert_eq!(io.mmio_read(0), 0);
        assert_eq!(io.mmio_read(0x20), 0);
    }

    #[test]
    fn edge_entry_delivers_each_rising_edge() {
        let mut io = IoApic::new();
        assert!(program(&mut io, 2, 0x30).is_empty());
        let mut out = Vec::new();
        io.set_pin(2, true, &mut out);
        io.set_pin(2, true, &mut out);
        assert_eq!(
            out,
            [ApicMessage {
                vector: 0x30,
                mode: DeliveryMode::Fixed,
                dest: 0,
                logical: false,
                level: false
            }]
        );
        io.set_pin(2, false, &mut out);
        io.set_pin(2, true, &mut out);
        assert_eq!(out.len(), 2);
        // Masked: the edge is lost.
        program(&mut io, 2, 0x30 | ENTRY_MASKED);
        io.set_pin(2, false, &mut out);
        io.set_pin(2, true, &mut out);
        assert_eq!(out.len(), 2);
        // Active low: the falling edge of the line is the assertion.
        program(
            &mut io,
            3,
            0x31 | ENTRY_ACTIVE_LOW | (1 << 56) | ENTRY_LOGICAL,
        );
        io.set_pin(3, true, &mut out);
        assert_eq!(out.len(), 2);
        io.set_pin(3, false, &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!((out[2].dest, out[2].logical), (1, true));
    }

    #[test]
    fn level_entry_waits_for_eoi() {
        let mut io = IoApic::new();
        program(&mut io, 9, 0x41 | ENTRY_LEVEL);
        let mut out = Vec::new();
        io.set_pin(9, true, &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].level);
        assert_ne!(read_reg(&mut io, 0x10 + 18) as u64 & ENTRY_REMOTE_IRR, 0);
        io.set_pin(9, true, &mut out);
        assert_eq!(out.len(), 1, "Remote IRR holds it");
        io.eoi(0x41, &mut out);
        assert_eq!(out.len(), 2, "still asserted: delivered again");
        io.set_pin(9, false, &mut out);
        io.mmio_write(0x40, 0x41, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(read_reg(&mut io, 0x10 + 18) as u64 & ENTRY_REMOTE_IRR, 0);
        // Unmasking an asserted level line delivers it.
        program(&mut io, 10, 0x42 | ENTRY_LEVEL | ENTRY_MASKED);
        io.set_pin(10, true, &mut out);
        assert_eq!(out.len(), 2);
        let more = program(&mut io, 10, 0x42 | ENTRY_LEVEL);
        assert_eq!(more.len(), 1);
        // Other vectors' EOIs leave it alone.
        io.eoi(0x43, &mut out);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn software_cannot_set_read_only_bits() {
        let mut io = IoApic::new();
        program(&mut io, 0, !(ENTRY_MASKED | ENTRY_LEVEL));
        let e = io.entry(0).unwrap();
        assert_eq!(e & (ENTRY_REMOTE_IRR | ENTRY_DELIVERY_STATUS), 0);
        assert_eq!(e & 0x00ff_ffff_fffe_0000, 0);
        assert_eq!(io.entry(24), None);
        let mut out = Vec::new();
        io.set_pin(24, true, &mut out);
        io.set_pin(200, true, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn save_restore() {
        let mut io = IoApic::new();
        program(&mut io, 9, 0x41 | ENTRY_LEVEL);
        io.set_pin(9, true, &mut Vec::new());
        io.mmio_write(0, 0x13, &mut Vec::new());
        let mut s = Vec::new();
        io.save_state(&mut s);
        let mut r = IoApic::new();
        r.restore_state(1, &s).unwrap();
        assert_eq!(r, io);
        for n in 0..s.len() {
            assert!(r.restore_state(1, &s[..n]).is_err());
        }
        let mut bad = s.clone();
        bad[6 + 8 * 3 + 1] = 0x40; // Remote IRR on an edge entry
        assert!(IoApic::new().restore_state(1, &bad).is_err());
        assert!(IoApic::new().restore_state(9, &s).is_err());
    }
}
