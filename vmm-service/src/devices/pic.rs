//! The two cascaded 8259A programmable interrupt controllers of a PC
//! (master at ports 0x20-0x21, slave at 0xa0-0xa1 on master input 2) and
//! the edge/level control registers (ELCR, ports 0x4d0-0x4d1).
//!
//! A pure state machine: inputs are line levels ([`PicPair::set_irq`]),
//! outputs are "the master's INT pin is up" ([`PicPair::has_interrupt`])
//! and the vector an interrupt acknowledge cycle returns
//! ([`PicPair::acknowledge`]). Linux drives it in the classic way: probe
//! (write IMR, read it back), ICW1-ICW4 initialisation with vector bases
//! 0x30/0x38, OCW1 masks, OCW2 non-specific and specific EOIs, OCW3 IRR/ISR
//! reads (its spurious-interrupt check reads ISR).
//!
//! Edge-triggered inputs latch IRR on a rising edge and keep it until the
//! acknowledge; level-triggered inputs (ELCR bit set) mirror the line.
//! Priority is rotating-capable: `lowest` is the input with the lowest
//! priority (7 after initialisation). Special mask mode, poll mode, and
//! automatic EOI are modelled; the buffered/microprocessor-mode bits of
//! ICW4 have no effect on a PC.
//!
//! Reference: Intel 8259A data sheet (order 231468), "Programming the
//! 8259A" (ICW1-4, OCW1-3); ELCR: Intel 82371AB (PIIX4) data sheet, 4.1.14.

use super::state::{expect_version, DeviceKind, Snapshot, StateError, StateReader, StateWriter};
use alloc::vec::Vec;

/// Master I/O base.
pub const MASTER_PORT: u16 = 0x20;
/// Slave I/O base.
pub const SLAVE_PORT: u16 = 0xa0;
/// ELCR ports (master, then slave).
pub const ELCR_PORT: u16 = 0x4d0;
/// IRQs 0, 1, 2 (master) and 8, 13 (slave) are always edge-triggered on a
/// PC: their ELCR bits are read-only zero.
const ELCR_MASK: [u8; 2] = [0xf8, 0xde];
/// Master input the slave's INT output is wired to.
const CASCADE_IRQ: u8 = 2;

/// Initialisation sequence position.
const INIT_NONE: u8 = 0;
const INIT_ICW2: u8 = 2;
const INIT_ICW3: u8 = 3;
const INIT_ICW4: u8 = 4;

/// One 8259A.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Pic8259 {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Input levels as last seen (edge detection).
    lines: u8,
    /// Level-triggered inputs (ELCR).
    elcr: u8,
    /// ICW2 vector base (bits 7:3).
    base: u8,
    /// Input with the lowest priority.
    lowest: u8,
    init_step: u8,
    icw4_needed: bool,
    single: bool,
    auto_eoi: bool,
    rotate_on_aeoi: bool,
    special_fully_nested: bool,
    special_mask: bool,
    /// OCW3: reads of the command port return ISR rather than IRR.
    read_isr: bool,
    /// OCW3 poll command armed for the next command-port read.
    poll: bool,
}

impl Pic8259 {
    fn new() -> Self {
        Self {
            lowest: 7,
            ..Self::default()
        }
    }

    /// Priority rank of input `irq` (0 = highest).
    fn rank(&self, irq: u8) -> u8 {
        irq.wrapping_sub(self.lowest).wrapping_sub(1) & 7
    }

    /// The input of highest priority among `bits`.
    fn highest(&self, bits: u8) -> Option<u8> {
        (0..8u8)
            .map(|r| (self.lowest + 1 + r) & 7)
            .find(|&irq| bits & (1 << irq) != 0)
    }

    /// The input this chip would interrupt with now.
    fn pending(&self) -> Option<u8> {
        let irq = self.highest(self.irr & !self.imr)?;
        let mut in_service = self.isr;
        if self.special_mask {
            // Special mask mode: masked in-service levels do not block.
            in_service &= !self.imr;
        }
        if self.special_fully_nested {
            // The master lets the slave interrupt while the slave's own
            // cascade level is in service.
            in_service &= !(1 << CASCADE_IRQ);
        }
        match self.highest(in_service) {
            Some(busy) if self.rank(busy) <= self.rank(irq) => None,
            _ => Some(irq),
        }
    }

    fn set_line(&mut self, irq: u8, level: bool) {
        let bit = 1u8 << irq;
        if self.elcr & bit != 0 {
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && self.lines & bit == 0 {
            self.irr |= bit;
        }
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// Acknowledge cycle for `irq`: IRR to ISR (unless automatic EOI).
    fn ack(&mut self, irq: u8) {
        let bit = 1u8 << irq;
        if self.elcr & bit == 0 {
            self.irr &= !bit;
        }
        if self.auto_eoi {
            if self.rotate_on_aeoi {
                self.lowest = irq;
            }
        } else {
            self.isr |= bit;
        }
    }

    fn eoi(&mut self, irq: u8, rotate: bool) {
        self.isr &= !(1 << irq);
        if rotate {
            self.lowest = irq;
        }
    }

    fn read(&mut self, port_offset: u8) -> u8 {
        if port_offset == 0 {
            if self.poll {
                self.poll = false;
                return match self.pending() {
                    Some(irq) => {
                        self.ack(irq);
                        0x80 | irq
                    }
                    None => 0,
                };
            }
            if self.read_isr {
                self.isr
            } else {
                self.irr
            }
        } else {
            self.imr
        }
    }

    fn write(&mut self, port_offset: u8, value: u8) {
        if port_offset == 0 {
            if value & 0x10 != 0 {
                // ICW1: restart initialisation; the chip forgets pending
                // edges, masks and in-service state.
                self.init_step = INIT_ICW2;
                self.icw4_needed = value & 0x01 != 0;
                self.single = value & 0x02 != 0;
                self.imr = 0;
                self.isr = 0;
                self.irr &= self.elcr & self.lines;
                self.lowest = 7;
                self.special_mask = false;
                self.read_isr = false;
                self.poll = false;
                self.auto_eoi = false;
                self.rotate_on_aeoi = false;
                self.special_fully_nested = false;
            } else if value & 0x08 != 0 {
                // OCW3.
                if value & 0x04 != 0 {
                    self.poll = true;
                }
                if value & 0x02 != 0 {
                    self.read_isr = value & 0x01 != 0;
                }
                if value & 0x40 != 0 {
                    self.special_mask = value & 0x20 != 0;
                }
            } else {
                // OCW2.
                let level = value & 7;
                match value >> 5 {
                    0 => self.rotate_on_aeoi = false,
                    4 => self.rotate_on_aeoi = true,
                    1 | 5 => {
                        if let Some(irq) = self.highest(self.isr) {
                            self.eoi(irq, value >> 5 == 5);
                        }
                    }
                    3 => self.eoi(level, false),
                    7 => self.eoi(level, true),
                    6 => self.lowest = level,
                    _ => {}
                }
            }
        } else {
            match self.init_step {
                INIT_ICW2 => {
                    self.base = value & 0xf8;
                    self.init_step = if !self.single {
                        INIT_ICW3
                    } else if self.icw4_needed {
                        INIT_ICW4
                    } else {
                        INIT_NONE
                    };
                }
                INIT_ICW3 => {
                    // Cascade wiring is fixed on a PC.
                    self.init_step = if self.icw4_needed {
                        INIT_ICW4
                    } else {
                        INIT_NONE
                    };
                }
                INIT_ICW4 => {
                    self.auto_eoi = value & 0x02 != 0;
                    self.special_fully_nested = value & 0x10 != 0;
                    self.init_step = INIT_NONE;
                }
                _ => self.imr = value,
            }
        }
    }

    fn save(&self, w: &mut StateWriter<'_>) {
        w.u8(self.irr)
            .u8(self.isr)
            .u8(self.imr)
            .u8(self.lines)
            .u8(self.elcr)
            .u8(self.base)
            .u8(self.lowest)
            .u8(self.init_step)
            .u8(self.flags());
    }

    fn flags(&self) -> u8 {
        [
            self.icw4_needed,
            self.single,
            self.auto_eoi,
            self.rotate_on_aeoi,
            self.special_fully_nested,
            self.special_mask,
            self.read_isr,
            self.poll,
        ]
        .iter()
        .enumerate()
        .fold(0, |acc, (i, &f)| acc | (u8::from(f) << i))
    }

    fn restore(r: &mut StateReader<'_>, elcr_mask: u8) -> Result<Self, StateError> {
        let irr = r.u8()?;
        let isr = r.u8()?;
        let imr = r.u8()?;
        let lines = r.u8()?;
        let elcr = r.u8_masked("ELCR", elcr_mask)?;
        let base = r.u8_masked("PIC vector base", 0xf8)?;
        let lowest = r.u8_masked("PIC lowest priority", 7)?;
        let init_step = r.u8()?;
        if !matches!(init_step, INIT_NONE | INIT_ICW2 | INIT_ICW3 | INIT_ICW4) {
            return Err(StateError::BadValue {
                what: "PIC init step",
                value: u64::from(init_step),
            });
        }
        let f = r.u8()?;
        let bit = |i: u8| f & (1 << i) != 0;
        Ok(Self {
            irr,
            isr,
            imr,
            lines,
            elcr,
            base,
            lowest,
            init_step,
            icw4_needed: bit(0),
            single: bit(1),
            auto_eoi: bit(2),
            rotate_on_aeoi: bit(3),
            special_fully_nested: bit(4),
            special_mask: bit(5),
            read_isr: bit(6),
            poll: bit(7),
        })
    }
}

/// Master and slave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PicPair {
    chips: [Pic8259; 2],
}

impl Default for PicPair {
    fn default() -> Self {
        Self::new()
    }
}

impl PicPair {
    /// Saved-state format version.
    pub const STATE_VERSION: u16 = 1;

    /// Both chips in their power-on state (uninitialised, nothing masked,
    /// nothing pending).
    pub fn new() -> Self {
        Self {
            chips: [Pic8259::new(), Pic8259::new()],
        }
    }

    /// Drive ISA input `irq` (0-15) to `level`.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            0..=7 => self.chips[0].set_line(irq, level),
            8..=15 => {
                self.chips[1].set_line(irq - 8, level);
                self.update_cascade();
            }
            _ => {}
        }
    }

    /// The slave's INT output drives master input 2. The slave holds INT
    /// until its request is acknowledged or withdrawn, so the master sees
    /// the cascade as a level: its IRR bit follows the slave's output.
    fn update_cascade(&mut self) {
        let up = self.chips[1].pending().is_some();
        let master = &mut self.chips[0];
        let bit = 1u8 << CASCADE_IRQ;
        if up {
            master.irr |= bit;
            master.lines |= bit;
        } else {
            master.irr &= !bit;
            master.lines &= !bit;
        }
    }

    /// Whether the master's INT output is asserted.
    pub fn has_interrupt(&self) -> bool {
        self.chips[0].pending().is_some()
    }

    /// The interrupt acknowledge cycle: the vector of the highest-priority
    /// request, now in service. With nothing pending (the request went
    /// away) the chip answers with its IRQ 7 vector, as the real part does
    /// (a "spurious" interrupt the guest recognises by an empty ISR).
    pub fn acknowledge(&mut self) -> u8 {
        let [master, slave] = &mut self.chips;
        let vector = match master.pending() {
            Some(CASCADE_IRQ) if !master.single => {
                master.ack(CASCADE_IRQ);
                match slave.pending() {
                    Some(irq) => {
                        slave.ack(irq);
                        slave.base | irq
                    }
                    None => slave.base | 7,
                }
            }
            Some(irq) => {
                master.ack(irq);
                master.base | irq
            }
            None => master.base | 7,
        };
        self.update_cascade();
        vector
    }

    /// Guest read of a PIC port (`0x20`, `0x21`, `0xa0`, `0xa1`, `0x4d0`,
    /// `0x4d1`); other ports read all-ones.
    pub fn read_port(&mut self, port: u16) -> u8 {
        let v = match port {
            0x20 | 0x21 => self.chips[0].read((port & 1) as u8),
            0xa0 | 0xa1 => self.chips[1].read((port & 1) as u8),
            0x4d0 | 0x4d1 => self.chips[usize::from(port & 1)].elcr,
            _ => 0xff,
        };
        // A poll read may have acknowledged a slave interrupt.
        self.update_cascade();
        v
    }

    /// Guest write of a PIC port.
    pub fn write_port(&mut self, port: u16, value: u8) {
        match port {
            0x20 | 0x21 => self.chips[0].write((port & 1) as u8, value),
            0xa0 | 0xa1 => self.chips[1].write((port & 1) as u8, value),
            0x4d0 | 0x4d1 => {
                let i = usize::from(port & 1);
                let chip = &mut self.chips[i];
                chip.elcr = value & ELCR_MASK[i];
                // A level input now mirrors its line.
                chip.irr = (chip.irr & !chip.elcr) | (chip.lines & chip.elcr);
            }
            _ => {}
        }
        self.update_cascade();
    }

    /// The master's vector base (ICW2), for tests and diagnostics.
    pub fn vector_bases(&self) -> (u8, u8) {
        (self.chips[0].base, self.chips[1].base)
    }
}

impl Snapshot for PicPair {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Pic
    }
    fn state_version(&self) -> u16 {
        Self::STATE_VERSION
    }
    fn save_state(&self, out: &mut Vec<u8>) {
        let mut w = StateWriter::new(out);
        for chip in &self.chips {
            chip.save(&mut w);
        }
    }
    fn restore_state(&mut self, version: u16, bytes: &[u8]) -> Result<(), StateError> {
        expect_version("PIC", version, Self::STATE_VERSION)?;
        let mut r = StateReader::new(bytes);
        let master = Pic8259::restore(&mut r, ELCR_MASK[0])?;
        let slave = Pic8259::restore(&mut r, ELCR_MASK[1])?;
        r.finish()?;
        self.chips = [master, slave];
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's init_8259A(0): mask, ICW1-4 on both chips, vector bases
    /// 0x30 and 0x38.
    fn linux_init() -> PicPair {
        let mut p = PicPair::new();
        p.write_port(0x21, 0xff);
        p.write_port(0xa1, 0xff);
        for (cmd, data, base, icw3) in [(0x20, 0x21, 0x30, 0x04), (0xa0, 0xa1, 0x38, 0x02)] {
            p.write_port(cmd, 0x11);
            p.write_port(data, base);
            p.write_port(data, icw3);
            p.write_port(data, 0x01);
        }
        p.write_port(0x21, 0x00);
        p.write_port(0xa1, 0x00);
        p
    }

    #[test]
    fn linux_probe_reads_back_the_mask() {
        let mut p = PicPair::new();
        p.write_port(0xa1, 0xff);
        p.write_port(0x21, 0xfb);
        assert_eq!(p.read_port(0x21), 0xfb);
        assert_eq!(p.read_port(0xa1), 0xff);
        let p = linux_init();
        assert_eq!(p.vector_bases(), (0x30, 0x38));
    }

    #[test]
    fn edge_irq_is_delivered_once_and_eoi_releases_it() {
        let mut p = linux_init();
        assert!(!p.has_interrupt());
        p.set_irq(4, true);
        assert!(p.has_interrupt());
        assert_eq!(p.acknowledge(), 0x34);
        // In service: no new request, even while the line stays high.
        assert!(!p.has_interrupt());
        // OCW3 read ISR.
        p.write_port(0x20, 0x0b);
        assert_eq!(p.read_port(0x20), 0x10);
        p.write_port(0x20, 0x20); // non-specific EOI
        assert_eq!(p.read_port(0x20), 0);
        assert!(!p.has_interrupt(), "edge: no new edge, no request");
        p.set_irq(4, false);
        p.set_irq(4, true);
        assert!(p.has_interrupt());
    }

    #[test]
    fn priority_and_nesting() {
        let mut p = linux_init();
        p.set_irq(3, true);
        p.set_irq(1, true);
        assert_eq!(p.acknowledge(), 0x31, "IRQ1 before IRQ3");
        // IRQ3 is lower priority than the in-service IRQ1: held.
        assert!(!p.has_interrupt());
        p.set_irq(0, true);
        assert_eq!(p.acknowledge(), 0x30, "IRQ0 nests over IRQ1");
        p.write_port(0x20, 0x20); // EOI IRQ0
        p.write_port(0x20, 0x20); // EOI IRQ1
        assert_eq!(p.acknowledge(), 0x33);
        // Masked inputs do not interrupt; unmasking releases them.
        p.write_port(0x20, 0x63); // specific EOI 3
        p.write_port(0x21, 0x20);
        p.set_irq(5, true);
        assert!(!p.has_interrupt());
        p.write_port(0x21, 0x00);
        assert_eq!(p.acknowledge(), 0x35);
    }

    #[test]
    fn slave_cascades_through_irq2() {
        let mut p = linux_init();
        p.set_irq(12, true);
        assert!(p.has_interrupt());
        assert_eq!(p.acknowledge(), 0x3c);
        p.write_port(0xa0, 0x0b);
        assert_eq!(p.read_port(0xa0), 0x10);
        p.write_port(0x20, 0x0b);
        assert_eq!(p.read_port(0x20), 0x04, "cascade in service on master");
        // Slave masked: nothing reaches the master.
        p.write_port(0xa0, 0x20);
        p.write_port(0x20, 0x20);
        p.write_port(0xa1, 0xff);
        p.set_irq(12, false);
        p.set_irq(12, true);
        assert!(!p.has_interrupt());
        p.write_port(0xa1, 0x00);
        assert!(p.has_interrupt());
    }

    #[test]
    fn level_mode_follows_the_line() {
        let mut p = linux_init();
        p.write_port(0x4d1, 0xff);
        assert_eq!(p.read_port(0x4d1), 0xde, "IRQ 8 and 13 stay edge");
        p.write_port(0x4d0, 0xff);
        assert_eq!(p.read_port(0x4d0), 0xf8);
        p.set_irq(9, true);
        assert_eq!(p.acknowledge(), 0x39);
        p.write_port(0xa0, 0x20);
        p.write_port(0x20, 0x20);
        // Still asserted: requests again without a new edge.
        assert!(p.has_interrupt());
        p.set_irq(9, false);
        assert!(!p.has_interrupt());
    }

    #[test]
    fn spurious_acknowledge_answers_irq7() {
        let mut p = linux_init();
        assert_eq!(p.acknowledge(), 0x37);
        p.write_port(0x20, 0x0b);
        assert_eq!(p.read_port(0x20), 0, "spurious: ISR stays empty");
    }

    #[test]
    fn poll_mode_and_auto_eoi_and_rotation() {
        let mut p = linux_init();
        p.set_irq(6, true);
        p.write_port(0x20, 0x0c); // OCW3 poll
        assert_eq!(p.read_port(0x20), 0x86);
        p.write_port(0x20, 0x0b);
        assert_eq!(p.read_port(0x20), 0x40);
        p.write_port(0x20, 0x0c);
        assert_eq!(p.read_port(0x20), 0, "nothing to poll");
        // Automatic EOI.
        let mut p = PicPair::new();
        p.write_port(0x20, 0x13); // single, ICW4
        p.write_port(0x21, 0x08);
        p.write_port(0x21, 0x03); // AEOI
        p.set_irq(2, true);
        assert_eq!(p.acknowledge(), 0x0a);
        p.write_port(0x20, 0x0b);
        assert_eq!(p.read_port(0x20), 0);
        // Set priority: IRQ 3 lowest, so IRQ 4 outranks IRQ 0.
        let mut p = linux_init();
        p.write_port(0x20, 0xc3);
        p.set_irq(0, true);
        p.set_irq(4, true);
        assert_eq!(p.acknowledge(), 0x34);
    }

    #[test]
    fn save_restore_round_trips_and_checks() {
        let mut p = linux_init();
        p.write_port(0x4d1, 0x02);
        p.set_irq(9, true);
        p.set_irq(3, true);
        p.acknowledge();
        let mut s = Vec::new();
        p.save_state(&mut s);
        let mut q = PicPair::new();
        q.restore_state(1, &s).unwrap();
        assert_eq!(q, p);
        assert!(q.restore_state(2, &s).is_err());
        for n in 0..s.len() {
            assert!(q.restore_state(1, &s[..n]).is_err());
        }
        let mut bad = s.clone();
        bad[5] = 0x07; // vector base low bits
        assert!(q.restore_state(1, &bad).is_err());
        assert_eq!(q, p, "failed restore changes nothing");
    }

    /// Random port writes and line changes never panic and keep the
    /// invariants (ISR bits only ever come from acknowledges).
    #[test]
    fn random_programming_never_panics() {
        let mut rng = 0x853c_49e6_748f_ea9bu64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let ports = [0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x22];
        let mut p = PicPair::new();
        for _ in 0..20_000 {
            let r = next();
            match r % 4 {
                0 => p.write_port(ports[(r >> 8) as usize % ports.len()], (r >> 16) as u8),
                1 => {
                    p.read_port(ports[(r >> 8) as usize % ports.len()]);
                }
                2 => p.set_irq((r >> 8) as u8 % 17, r & 0x100 != 0),
                _ => {
                    if p.has_interrupt() {
                        p.acknowledge();
                    }
                }
            }
        }
    }
}
