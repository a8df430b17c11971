//! The interrupt path of a PC: device lines -> 8259 pair and I/O APIC ->
//! local APIC -> the one vector the vCPU should take next.
//!
//! ```text
//!  ISA IRQ n ──┬─> 8259 pair input n ──INTR─┬─> LAPIC LINT0 (ExtINT) ──┐
//!              │                            └─> I/O APIC pin 0 (ExtINT) ─┤
//!              └─> I/O APIC pin gsi(n) ──message──> LAPIC IRR ───────────┴─> poll()
//! ```
//! `gsi(0) = 2` (the PIT's override in the MADT), `gsi(n) = n` otherwise;
//! the 8259's output is wired to I/O APIC pin 0 as on PC chipsets.
//! [`IrqChip`] owns the three controllers and does the wiring as plain
//! method calls (no shared pointers): a line change goes to both the PIC
//! and the I/O APIC, the I/O APIC's messages go to the LAPIC, the LAPIC's
//! EOIs of level-triggered vectors go back to the I/O APIC.
//!
//! The vCPU loop asks one question before each entry: [`IrqChip::poll`]
//! with whether the guest can take an interrupt now (RFLAGS.IF set, no
//! STI/MOV-SS shadow, no event already being injected) and an NMI. It gets
//! the NMI or vector to inject (already acknowledged at its controller, so
//! it must be injected), or [`InterruptPoll::Blocked`] (request an
//! interrupt-window exit), or nothing.

use super::ioapic::{ApicMessage, DeliveryMode, IoApic};
use super::lapic::Lapic;
use super::pic::PicPair;
use alloc::vec::Vec;

/// Number of ISA interrupt lines.
pub const ISA_IRQS: u8 = 16;
/// The I/O APIC input the 8259's INTR output is wired to (ExtINT mode
/// there is Linux's fallback "timer through the 8259A").
pub const PIC_INTR_GSI: u8 = 0;

/// The I/O APIC input an ISA IRQ is wired to (the MADT's interrupt source
/// overrides must say the same).
pub const fn isa_gsi(irq: u8) -> u8 {
    if irq == 0 {
        2
    } else {
        irq
    }
}

/// What the guest can take right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    /// A maskable interrupt: RFLAGS.IF = 1, no interrupt shadow, no event
    /// pending injection.
    pub interrupt: bool,
    /// An NMI: not inside an NMI handler (no NMI blocking), no event
    /// pending injection.
    pub nmi: bool,
}

/// The answer to "what should the vCPU take next?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptPoll {
    /// Nothing is pending.
    Idle,
    /// Something is pending but the guest cannot take it now: ask the
    /// backend for an interrupt-window (or NMI-window) exit.
    Blocked,
    /// Inject this external-interrupt vector now. It was acknowledged at
    /// its controller (LAPIC ISR or 8259 ISR set), so it must be injected.
    Vector(u8),
    /// Inject an NMI now.
    Nmi,
}

/// PIC, I/O APIC and local APIC, wired together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IrqChip {
    pub pic: PicPair,
    pub ioapic: IoApic,
    pub lapic: Lapic,
    /// Scratch list of I/O APIC messages (kept to avoid allocating).
    messages: Vec<ApicMessage>,
}

impl Default for IrqChip {
    fn default() -> Self {
        Self::new()
    }
}

impl IrqChip {
    /// Controllers in their power-on state, LAPIC ID 0.
    pub fn new() -> Self {
        Self {
            pic: PicPair::new(),
            ioapic: IoApic::new(),
            lapic: Lapic::new(0),
            messages: Vec::new(),
        }
    }

    /// The three controllers, restored, wired together.
    pub fn from_parts(pic: PicPair, ioapic: IoApic, lapic: Lapic) -> Self {
        Self {
            pic,
            ioapic,
            lapic,
            messages: Vec::new(),
        }
    }

    /// ISA line `irq` changed to `level`.
    pub fn set_isa_irq(&mut self, irq: u8, level: bool) {
        if irq >= ISA_IRQS {
            return;
        }
        self.pic.set_irq(irq, level);
        let mut msgs = core::mem::take(&mut self.messages);
        self.ioapic.set_pin(isa_gsi(irq), level, &mut msgs);
        self.ioapic
            .set_pin(PIC_INTR_GSI, self.pic.has_interrupt(), &mut msgs);
        self.deliver(&mut msgs);
        self.messages = msgs;
    }

    /// An I/O APIC input above the ISA lines (a virtio-mmio slot's GSI)
    /// changed to `level`.
    pub fn set_gsi(&mut self, gsi: u8, level: bool) {
        if gsi < ISA_IRQS {
            return;
        }
        let mut msgs = core::mem::take(&mut self.messages);
        self.ioapic.set_pin(gsi, level, &mut msgs);
        self.deliver(&mut msgs);
        self.messages = msgs;
    }

    /// The 8259's INTR output drives I/O APIC input 0: follow it after
    /// anything that may have changed it.
    fn sync_pic_output(&mut self) {
        let mut msgs = core::mem::take(&mut self.messages);
        self.ioapic
            .set_pin(PIC_INTR_GSI, self.pic.has_interrupt(), &mut msgs);
        self.deliver(&mut msgs);
        self.messages = msgs;
    }

    /// Guest read of a PIC or ELCR port.
    pub fn pic_read(&mut self, port: u16) -> u8 {
        let v = self.pic.read_port(port);
        self.sync_pic_output();
        v
    }

    /// Guest write of a PIC or ELCR port.
    pub fn pic_write(&mut self, port: u16, value: u8) {
        self.pic.write_port(port, value);
        self.sync_pic_output();
    }

    /// Deliver (and drain) I/O APIC messages to the local APIC.
    pub fn deliver(&mut self, msgs: &mut Vec<ApicMessage>) {
        for m in msgs.drain(..) {
            let ours = self.lapic.matches(m.dest, m.logical);
            match m.mode {
                // Lowest priority with one CPU is that CPU, whatever the
                // destination names.
                DeliveryMode::LowestPriority => self.lapic.accept(m.vector, m.level),
                DeliveryMode::Fixed if ours => self.lapic.accept(m.vector, m.level),
                DeliveryMode::Nmi if ours => self.lapic.accept_nmi(),
                // Not for this CPU.
                DeliveryMode::Fixed | DeliveryMode::Nmi => {}
                // ExtINT: the CPU asks the 8259 for the vector; modelled
                // as a route evaluated in `pic_interrupt`, since the
                // 8259's output is a level the CPU samples.
                // SMI, INIT, start-up and the reserved mode: nothing a
                // single running vCPU acts on.
                _ => {}
            }
        }
    }

    /// The LAPIC retired level-triggered `vector`: tell the I/O APIC.
    pub fn eoi_broadcast(&mut self, vector: u8) {
        let mut msgs = core::mem::take(&mut self.messages);
        self.ioapic.eoi(vector, &mut msgs);
        self.deliver(&mut msgs);
        self.messages = msgs;
    }

    /// Guest write to the I/O APIC window.
    pub fn ioapic_write(&mut self, offset: u64, value: u32) {
        let mut msgs = core::mem::take(&mut self.messages);
        self.ioapic.mmio_write(offset, value, &mut msgs);
        self.deliver(&mut msgs);
        self.messages = msgs;
    }

    /// Guest write to the LAPIC page at device time `now_ns`.
    pub fn lapic_write(&mut self, offset: u64, value: u32, now_ns: u64) {
        if let Some(v) = self.lapic.mmio_write(offset, value, now_ns) {
            self.eoi_broadcast(v);
        }
    }

    /// Whether the 8259's INTR reaches the CPU now: through LINT0 in
    /// ExtINT mode, or through I/O APIC pin 0 in ExtINT mode.
    fn pic_interrupt(&self) -> bool {
        self.pic.has_interrupt()
            && (self.lapic.accepts_pic() || self.ioapic.extint_route(PIC_INTR_GSI))
    }

    /// Whether anything could interrupt the vCPU (ignoring whether it can
    /// take it): a HLT ends when this is true.
    pub fn has_pending(&self) -> bool {
        self.lapic.nmi_pending() || self.lapic.pending_vector().is_some() || self.pic_interrupt()
    }

    /// The next event to inject, acknowledging it at its controller.
    pub fn poll(&mut self, ready: Readiness) -> InterruptPoll {
        if self.lapic.nmi_pending() {
            if ready.nmi {
                self.lapic.take_nmi();
                return InterruptPoll::Nmi;
            }
            return InterruptPoll::Blocked;
        }
        if let Some(v) = self.lapic.pending_vector() {
            if !ready.interrupt {
                return InterruptPoll::Blocked;
            }
            self.lapic.acknowledge(v);
            return InterruptPoll::Vector(v);
        }
        if self.pic_interrupt() {
            if !ready.interrupt {
                return InterruptPoll::Blocked;
            }
            let v = self.pic.acknowledge();
            self.sync_pic_output();
            return InterruptPoll::Vector(v);
        }
        InterruptPoll::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READY: Readiness = Readiness {
        interrupt: true,
        nmi: true,
    };
    const IF_CLEAR: Readiness = Readiness {
        interrupt: false,
        nmi: true,
    };

    fn linux_pic(chip: &mut IrqChip) {
        for (cmd, data, base, icw3) in [(0x20, 0x21, 0x30, 0x04), (0xa0, 0xa1, 0x38, 0x02)] {
            chip.pic_write(cmd, 0x11);
            chip.pic_write(data, base);
            chip.pic_write(data, icw3);
            chip.pic_write(data, 0x01);
        }
    }

    fn ioapic_entry(chip: &mut IrqChip, pin: u8, entry: u64) {
        chip.ioapic_write(0, u32::from(0x11 + 2 * pin));
        chip.ioapic_write(0x10, (entry >> 32) as u32);
        chip.ioapic_write(0, u32::from(0x10 + 2 * pin));
        chip.ioapic_write(0x10, entry as u32);
    }

    #[test]
    fn pic_interrupts_arrive_through_virtual_wire() {
        let mut c = IrqChip::new();
        linux_pic(&mut c);
        assert_eq!(c.poll(READY), InterruptPoll::Idle);
        c.set_isa_irq(4, true);
        assert!(c.has_pending());
        assert_eq!(c.poll(IF_CLEAR), InterruptPoll::Blocked);
        assert_eq!(c.poll(READY), InterruptPoll::Vector(0x34));
        assert_eq!(c.poll(READY), InterruptPoll::Idle, "in service");
        // LINT0 masked (the OS moved to the I/O APIC): the PIC is cut off.
        c.pic.write_port(0x20, 0x20);
        c.lapic_write(0x350, 0x10700, 0);
        c.set_isa_irq(4, false);
        c.set_isa_irq(4, true);
        assert!(!c.has_pending());
        assert_eq!(c.poll(READY), InterruptPoll::Idle);
    }

    #[test]
    fn ioapic_route_with_the_timer_override() {
        let mut c = IrqChip::new();
        c.lapic_write(0x350, 0x10700, 0); // LINT0 masked
        ioapic_entry(&mut c, 2, 0x30); // PIT on pin 2
        ioapic_entry(&mut c, 4, 0x24);
        c.set_isa_irq(0, true);
        assert_eq!(c.poll(READY), InterruptPoll::Vector(0x30));
        c.set_isa_irq(0, false);
        c.set_isa_irq(4, true);
        assert_eq!(
            c.poll(READY),
            InterruptPoll::Idle,
            "0x24 below in-service 0x30"
        );
        c.lapic_write(0xb0, 0, 0);
        assert_eq!(c.poll(READY), InterruptPoll::Vector(0x24));
    }

    #[test]
    fn level_interrupt_eoi_reaches_the_ioapic() {
        let mut c = IrqChip::new();
        c.lapic_write(0x350, 0x10700, 0);
        ioapic_entry(&mut c, 9, 0x49 | (1 << 15));
        c.set_isa_irq(9, true);
        assert_eq!(c.poll(READY), InterruptPoll::Vector(0x49));
        // EOI while the line is still up: delivered again.
        c.lapic_write(0xb0, 0, 0);
        assert_eq!(c.poll(READY), InterruptPoll::Vector(0x49));
        c.set_isa_irq(9, false);
        c.lapic_write(0xb0, 0, 0);
        assert_eq!(c.poll(READY), InterruptPoll::Idle);
    }

    #[test]
    fn logical_destinations_and_other_modes() {
        let mut c = IrqChip::new();
        c.lapic_write(0x350, 0x10700, 0);
        c.lapic_write(0xd0, 0x0100_0000, 0); // logical ID bit 0
        ioapic_entry(&mut c, 5, 0x55 | (1 << 11) | (1 << 56));
        ioapic_entry(&mut c, 6, 0x56 | (1 << 11) | (2 << 56));
        ioapic_entry(&mut c, 7, 0x57 | (4 << 8)); // NMI
        c.set_isa_irq(6, true);
        assert_eq!(c.poll(READY), InterruptPoll::Idle, "not our logical ID");
        c.set_isa_irq(5, true);
        assert_eq!(c.poll(READY), InterruptPoll::Vector(0x55));
        c.set_isa_irq(7, true);
        assert_eq!(
            c.poll(Readiness {
                interrupt: true,
                nmi: false
            }),
            InterruptPoll::Blocked
        );
        assert_eq!(c.poll(READY), InterruptPoll::Nmi);
        // Out-of-range lines are ignored.
        c.set_isa_irq(16, true);
        c.set_isa_irq(255, true);
    }

    /// Linux's check_timer fallback: the PIT through the 8259, whose INTR
    /// reaches I/O APIC pin 0 in ExtINT mode, with LINT0 masked.
    #[test]
    fn extint_through_ioapic_pin_0() {
        let mut c = IrqChip::new();
        c.lapic_write(0x350, 0x10700, 0);
        linux_pic(&mut c);
        ioapic_entry(&mut c, 0, 7 << 8);
        c.set_isa_irq(0, true);
        assert!(c.has_pending());
        assert_eq!(c.poll(IF_CLEAR), InterruptPoll::Blocked);
        assert_eq!(c.poll(READY), InterruptPoll::Vector(0x30));
        assert_eq!(c.poll(READY), InterruptPoll::Idle);
        c.pic_write(0x20, 0x20);
        c.set_isa_irq(0, false);
        c.set_isa_irq(0, true);
        assert_eq!(c.poll(READY), InterruptPoll::Vector(0x30), "next tick");
    }
}
