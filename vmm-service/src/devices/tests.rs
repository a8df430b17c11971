//! Tests of the device set as a whole, and the context double the device
//! models' own tests use.

use super::*;
use alloc::string::String;
use alloc::vec::Vec;
use irq::Readiness;

/// Collects console lines.
#[derive(Default)]
pub(crate) struct Lines(pub Vec<String>);
impl LineSink for Lines {
    fn line(&mut self, line: &str) {
        self.0.push(line.into());
    }
}

/// A [`DeviceCtx`] maker for one device on line 0: counts pulses, tracks
/// the line level and the requests.
#[derive(Default)]
pub(crate) struct Harness {
    lines: IrqLines,
    pub pulses: u32,
    pub level: bool,
    pub console: Lines,
    pub requests: Requests,
}

impl Harness {
    /// Run `f` with a context at device time `now`.
    pub fn at<R>(&mut self, now: u64, f: impl FnOnce(&mut DeviceCtx<'_>) -> R) -> R {
        let r = {
            let mut ctx = DeviceCtx {
                now_ns: now,
                irq: IrqPin {
                    lines: &mut self.lines,
                    line: Some(0),
                },
                console: &mut self.console,
                requests: &mut self.requests,
            };
            f(&mut ctx)
        };
        if self.lines.pulses & 1 != 0 {
            self.pulses += 1;
            self.lines.pulses = 0;
        }
        self.level = self.lines.levels & 1 != 0;
        r
    }
}

const READY: Readiness = Readiness {
    interrupt: true,
    nmi: true,
};

#[test]
fn unknown_ports_read_all_ones_and_drop_writes() {
    let mut d = Devices::new();
    let mut out = Lines::default();
    assert_eq!(d.io_in(0x60, 1), 0xff);
    assert_eq!(d.io_in(0x60, 2), 0xffff);
    assert_eq!(d.io_in(0xcf8, 4), 0xffff_ffff);
    d.io_out(0x21, 1, 0xff, &mut out);
    d.io_out(0xf4, 4, 0, &mut out);
    assert_eq!(d.unclaimed_accesses, 1 + 2 + 4 + 1 + 4);
    // POST port: quiet.
    d.io_out(POST_PORT, 1, 0x12, &mut out);
    assert_eq!(d.io_in(POST_PORT, 1), 0xff);
    assert_eq!(d.unclaimed_accesses, 12);
    assert_eq!(d.com1(), &Uart16550::new(), "no stray write reached COM1");
    assert!(out.0.is_empty());
    // No MMIO devices at all on the minimal machine.
    let mut b = [0u8; 4];
    d.mmio_read(0, lapic::LAPIC_BASE + 0x30, &mut b);
    assert_eq!(b, [0xff; 4]);
    d.mmio_write(0, lapic::LAPIC_BASE + 0xb0, &[0; 4]);
    assert_eq!(d.poll_interrupt(READY), InterruptPoll::Idle);
    assert_eq!(d.next_event_ns(), None);
}

#[test]
fn com1_is_on_its_ports() {
    let mut d = Devices::new();
    let mut out = Lines::default();
    for &b in b"hi\n" {
        d.io_out(COM1_PORT, 1, u32::from(b), &mut out);
    }
    assert_eq!(out.0, ["hi"]);
    assert_eq!(d.io_in(COM1_PORT + 5, 1) & 0x60, 0x60);
    // A word write to SCR and the port above it: SCR gets the low byte,
    // the byte past COM1 is unclaimed.
    d.io_out(COM1_PORT + 7, 2, 0xabcd, &mut out);
    assert_eq!(d.io_in(COM1_PORT + 7, 1), 0xcd);
    assert_eq!(d.io_in(COM1_PORT + 7, 2), 0xffcd);
    assert_eq!(d.unclaimed_accesses, 2);
    // A word access inside COM1 reaches two registers.
    d.io_out(COM1_PORT + 3, 2, 0x0b03, &mut out); // LCR 3, MCR 0x0b
    assert_eq!(d.io_in(COM1_PORT + 3, 2), 0x0b03);
}

/// Linux's early boot on the PC machine: COM1 interrupt through the 8259
/// (virtual wire), then through the I/O APIC.
#[test]
fn com1_interrupt_reaches_the_vcpu() {
    let mut d = Devices::pc(0);
    let mut out = Lines::default();
    // 8259 init, vector base 0x30.
    for (port, v) in [
        (0x20, 0x11),
        (0x21, 0x30),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xa0, 0x11),
        (0xa1, 0x38),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0x21, 0x00),
        (0xa1, 0x00),
    ] {
        d.port_write(0, port, 1, v, &mut out);
    }
    // UART: OUT2 and THRE interrupt enabled -> IRQ 4.
    d.port_write(0, COM1_PORT + 4, 1, 0x08, &mut out);
    assert!(!d.interrupt_pending());
    d.port_write(0, COM1_PORT + 1, 1, 0x02, &mut out);
    assert!(d.interrupt_pending());
    assert_eq!(
        d.poll_interrupt(Readiness {
            interrupt: false,
            nmi: true
        }),
        InterruptPoll::Blocked
    );
    assert_eq!(d.poll_interrupt(READY), InterruptPoll::Vector(0x34));
    // The handler reads IIR (THRE cleared, line down) and EOIs.
    assert_eq!(d.port_read(0, COM1_PORT + 2, 1) & 0xf, 0x2);
    d.port_write(0, 0x20, 1, 0x20, &mut out);
    assert!(!d.interrupt_pending());
    // Now the I/O APIC: LINT0 masked, pin 4 -> vector 0x24.
    let lapic = lapic::LAPIC_BASE;
    d.mmio_write(0, lapic + 0x350, &0x1_0700u32.to_le_bytes());
    d.mmio_write(0, ioapic::IOAPIC_BASE, &0x18u32.to_le_bytes());
    d.mmio_write(0, ioapic::IOAPIC_BASE + 0x10, &0x24u32.to_le_bytes());
    d.port_write(0, COM1_PORT, 1, u32::from(b'x'), &mut out);
    assert_eq!(d.poll_interrupt(READY), InterruptPoll::Vector(0x24));
    // LAPIC EOI through the emulated MMIO write of Linux's
    // native_apic_mem_write (mov %edi, abs32).
    let mut regs = hvcore::vcpu::Regs::default();
    d.emulate_mmio(
        0,
        &[0x89, 0x3c, 0x25, 0xb0, 0x00, 0xe0, 0xfe],
        mmio::CpuMode::Long64,
        &mut regs,
        lapic + 0xb0,
    )
    .unwrap();
    assert_eq!(regs.rip, 7);
    let mut isr = [0u8; 4];
    d.mmio_read(0, lapic + 0x110, &mut isr);
    assert_eq!(isr, [0; 4], "vector 0x24 retired");
}

#[test]
fn pc_machine_answers_linux_probes() {
    let mut d = Devices::pc(1_700_000_000 * 1_000_000_000);
    let mut out = Lines::default();
    // 8259 probe.
    d.port_write(0, 0xa1, 1, 0xff, &mut out);
    d.port_write(0, 0x21, 1, 0xfb, &mut out);
    assert_eq!(d.port_read(0, 0x21, 1), 0xfb);
    // LAPIC version and ID through MMIO, any access width.
    let mut b = [0u8; 4];
    d.mmio_read(0, lapic::LAPIC_BASE + 0x30, &mut b);
    assert_eq!(u32::from_le_bytes(b), lapic::LAPIC_VERSION);
    let mut b1 = [0u8; 1];
    d.mmio_read(0, lapic::LAPIC_BASE + 0x32, &mut b1);
    assert_eq!(b1[0], 0x05);
    let mut b8 = [0u8; 8];
    d.mmio_read(0, lapic::LAPIC_BASE + 0x30, &mut b8);
    assert_eq!(
        u64::from_le_bytes(b8),
        0x0005_0014,
        "next dword is reserved"
    );
    // Past the end of the page: unclaimed.
    d.mmio_read(0, lapic::LAPIC_BASE + 0xffe, &mut b);
    assert_eq!(b, [0xff; 4]);
    // I/O APIC version.
    d.mmio_write(0, ioapic::IOAPIC_BASE, &[1, 0, 0, 0]);
    d.mmio_read(0, ioapic::IOAPIC_BASE + 0x10, &mut b);
    assert_eq!(u32::from_le_bytes(b), ioapic::IOAPIC_VERSION);
    // RTC: UIP clear most of the time, year 2023 (BCD 0x23).
    d.port_write(0, 0x70, 1, 0x0a, &mut out);
    assert_eq!(d.port_read(0, 0x71, 1) & 0x80, 0);
    d.port_write(0, 0x70, 1, 0x09, &mut out);
    assert_eq!(d.port_read(0, 0x71, 1), 0x23);
    // PM timer counts with the device clock.
    let t0 = d.port_read(1_000_000, acpi_pm::PM_TMR_PORT, 4);
    let t1 = d.port_read(2_000_000, acpi_pm::PM_TMR_PORT, 4);
    assert!((3579..=3580).contains(&(t1 - t0)), "{}", t1 - t0);
    // PCI configuration space and the keyboard controller are absent.
    assert_eq!(d.port_read(0, 0xcfc, 4), 0xffff_ffff);
    assert_eq!(d.port_read(0, 0x64, 1), 0xff);
    // Arbitrary MMIO reads all-ones.
    d.mmio_read(0, 0xd000_0000, &mut b);
    assert_eq!(b, [0xff; 4]);
}

#[test]
fn timers_drive_interrupts_and_the_wake_time() {
    let mut d = Devices::pc(0);
    let mut out = Lines::default();
    let base = 1_000_000_000; // node time the VM starts at
                              // LAPIC one-shot: vector 0xec, divide by 1, 100 us.
    let lapic = lapic::LAPIC_BASE;
    d.mmio_write(base, lapic + 0x3e0, &0xbu32.to_le_bytes());
    d.mmio_write(base, lapic + 0x320, &0xecu32.to_le_bytes());
    d.mmio_write(base, lapic + 0x380, &100_000u32.to_le_bytes());
    assert_eq!(d.next_event_ns(), Some(base + 100_000));
    d.advance(base + 99_999);
    assert!(!d.interrupt_pending());
    d.advance(base + 100_000);
    assert_eq!(d.poll_interrupt(READY), InterruptPoll::Vector(0xec));
    assert_eq!(d.next_event_ns(), None);
    // PIT periodic on IRQ 0 through the 8259.
    let t = base + 100_000;
    for (port, v) in [
        (0x20, 0x11),
        (0x21, 0x30),
        (0x21, 0x04),
        (0x21, 0x01),
        (0x21, 0xfe),
    ] {
        d.port_write(t, port, 1, v, &mut out);
    }
    d.port_write(t, 0x43, 1, 0x34, &mut out);
    d.port_write(t, 0x40, 1, 0xa9, &mut out);
    d.port_write(t, 0x40, 1, 0x04, &mut out); // 1193: 1 ms
    let tick = d.next_event_ns().unwrap();
    assert!((t + 999_000..=t + 1_000_100).contains(&tick), "{tick}");
    d.advance(tick);
    assert_eq!(d.poll_interrupt(READY), InterruptPoll::Vector(0x30));
    // The time stamp of a saved set continues on a node whose clock reads
    // something else entirely.
    let saved = d.save();
    let mut r = Devices::restore(&saved).unwrap();
    let elsewhere = 77;
    assert_eq!(r.device_ns(elsewhere), d.device_ns(tick));
    let next_here = d.next_event_ns().unwrap() - tick;
    let next_there = r.next_event_ns().unwrap() - elsewhere;
    assert_eq!(next_here, next_there);
}

#[test]
fn save_restore_round_trips_every_device() {
    let mut d = Devices::pc(1_700_000_000 * 1_000_000_000);
    let mut out = Lines::default();
    d.port_write(5, COM1_PORT + 7, 1, 0x5a, &mut out);
    d.port_write(5, 0x21, 1, 0x3c, &mut out);
    d.port_write(5, 0x43, 1, 0x34, &mut out);
    d.port_write(5, 0x40, 1, 0x10, &mut out);
    d.mmio_write(5, lapic::LAPIC_BASE + 0x80, &0x20u32.to_le_bytes());
    d.mmio_write(5, ioapic::IOAPIC_BASE, &[0x12, 0, 0, 0]);
    for &b in b"partial" {
        d.port_write(5, COM1_PORT, 1, u32::from(b), &mut out);
    }
    let saved = d.save();
    let r = Devices::restore(&saved).unwrap();
    assert_eq!(r.machine(), Machine::Pc);
    assert_eq!(r.save_records(), d.save_records());
    assert_eq!(r.save(), saved);
    assert_eq!(r.com1().pending_line(), b"partial");
    let kinds: Vec<DeviceKind> = d.save_records().iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        [
            DeviceKind::Uart16550,
            DeviceKind::Pic,
            DeviceKind::Pit,
            DeviceKind::Rtc,
            DeviceKind::AcpiPm,
            DeviceKind::IoApic,
            DeviceKind::Lapic
        ]
    );
    // Minimal machine round-trips too.
    let m = Devices::new();
    let r = Devices::restore(&m.save()).unwrap();
    assert_eq!(r.machine(), Machine::Minimal);
    assert_eq!(r.save(), m.save());
}

#[test]
fn restore_rejects_bad_sets() {
    let d = Devices::pc(0);
    let saved = d.save();
    for len in 0..saved.len() {
        assert!(Devices::restore(&saved[..len]).is_err(), "len {len}");
    }
    let mut v = saved.clone();
    v.push(0);
    assert_eq!(
        Devices::restore(&v).unwrap_err(),
        StateError::TrailingBytes(1)
    );
    let mut v = saved.clone();
    v[0] = 3;
    assert!(matches!(
        Devices::restore(&v),
        Err(StateError::UnsupportedVersion { .. })
    ));
    let mut v = saved.clone();
    v[1] = 9; // machine
    assert!(Devices::restore(&v).is_err());
    // A PC set claiming to be minimal has records the machine lacks.
    let mut v = saved.clone();
    v[1] = 0;
    assert!(matches!(
        Devices::restore(&v),
        Err(StateError::UnknownInstance { .. })
    ));
    // Drop the last record (the LAPIC): incomplete.
    let records = d.save_records();
    let mut short = Devices::pc(0);
    assert_eq!(
        short.restore_records(&records[..records.len() - 1]),
        Err(StateError::Incomplete(
            "a device of this machine has no saved state"
        ))
    );
    let mut dup = records.clone();
    dup.push(records[0].clone());
    assert!(matches!(
        short.restore_records(&dup),
        Err(StateError::Duplicate { .. })
    ));
    // A record a model refuses leaves the set unchanged.
    let mut bad = records.clone();
    bad[6].payload[0] ^= 0xff;
    bad[6].version = 9;
    let before = short.save();
    assert!(short.restore_records(&bad).is_err());
    assert_eq!(short.save(), before);
    // Unknown kind code.
    let mut v = saved.clone();
    let first_record = 1 + 1 + 8 + 2 + 2 + 2;
    v[first_record] = 0xee;
    assert_eq!(
        Devices::restore(&v).unwrap_err(),
        StateError::UnknownKind(0xee)
    );
    // Oversized record length.
    let mut v = saved.clone();
    v[first_record + 6..first_record + 10].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        Devices::restore(&v),
        Err(StateError::LengthOverCap { .. })
    ));
    // No bit flip panics.
    for i in 0..saved.len() {
        for bit in 0..8 {
            let mut v = saved.clone();
            v[i] ^= 1 << bit;
            let _ = Devices::restore(&v);
        }
    }
}

/// The format before per-device records: `[1][u16 len][UART state]`.
#[test]
fn version_1_state_still_restores() {
    let mut u = Uart16550::new();
    let mut out = Lines::default();
    for &b in b"abc" {
        u.write(0, b, &mut out);
    }
    let uart = u.save();
    let mut v1 = alloc::vec![1u8];
    v1.extend_from_slice(&(uart.len() as u16).to_le_bytes());
    v1.extend_from_slice(&uart);
    let d = Devices::restore(&v1).unwrap();
    assert_eq!(d.machine(), Machine::Minimal);
    assert_eq!(d.com1(), &u);
    v1.push(0);
    assert_eq!(
        Devices::restore(&v1).unwrap_err(),
        StateError::TrailingBytes(1)
    );
}

#[test]
fn console_input_and_power_requests() {
    let mut d = Devices::pc(0);
    let mut out = Lines::default();
    // Linux's 8250 with interrupts: RDA enabled, OUT2 on, pin 4 -> 0x24.
    d.mmio_write(0, lapic::LAPIC_BASE + 0x350, &0x1_0700u32.to_le_bytes());
    d.mmio_write(0, ioapic::IOAPIC_BASE, &0x18u32.to_le_bytes());
    d.mmio_write(0, ioapic::IOAPIC_BASE + 0x10, &0x24u32.to_le_bytes());
    d.port_write(0, COM1_PORT + 4, 1, 0x08, &mut out);
    d.port_write(0, COM1_PORT + 1, 1, 0x01, &mut out);
    assert_eq!(d.console_input(0, b"uname -r\n"), 9);
    assert_eq!(d.poll_interrupt(READY), InterruptPoll::Vector(0x24));
    let mut got = Vec::new();
    while d.port_read(0, COM1_PORT + 5, 1) & 1 != 0 {
        got.push(d.port_read(0, COM1_PORT, 1) as u8);
    }
    assert_eq!(got, b"uname -r\n");
    // Power-off through PM1a_CNT (SLP_TYP 5 | SLP_EN).
    assert_eq!(d.take_requests(), Requests::default());
    d.port_write(0, acpi_pm::PM1_CNT_PORT, 2, (5 << 10) | (1 << 13), &mut out);
    assert!(d.take_requests().power_off);
    assert_eq!(d.take_requests(), Requests::default());
    // Power button: SCI on IRQ 9 once enabled (pin 9 level, vector 0x29).
    d.mmio_write(0, ioapic::IOAPIC_BASE, &0x22u32.to_le_bytes());
    d.mmio_write(
        0,
        ioapic::IOAPIC_BASE + 0x10,
        &(0x29u32 | (1 << 15)).to_le_bytes(),
    );
    d.port_write(0, acpi_pm::PM_BASE_PORT + 2, 2, 1 << 8, &mut out);
    d.press_power_button(0);
    // 0x29 is in the priority class of the in-service 0x24: EOI it first.
    assert_eq!(d.poll_interrupt(READY), InterruptPoll::Idle);
    d.mmio_write(0, lapic::LAPIC_BASE + 0xb0, &[0; 4]);
    assert_eq!(d.poll_interrupt(READY), InterruptPoll::Vector(0x29));
    // Minimal machine: no interrupt, input still lands in the FIFO.
    let mut m = Devices::new();
    assert_eq!(m.console_input(0, b"x"), 1);
    assert_eq!(m.poll_interrupt(READY), InterruptPoll::Idle);
    m.press_power_button(0);
}

#[test]
fn device_clock_never_goes_backwards() {
    let mut d = Devices::pc(0);
    assert_eq!(d.device_ns(500), 0, "starts at 0");
    assert_eq!(d.device_ns(1500), 1000);
    assert_eq!(
        d.device_ns(700),
        1000,
        "node clock stepping back is ignored"
    );
    assert_eq!(d.device_ns(2500), 2000);
}

/// Random port and MMIO traffic over the PC machine: never a panic, and
/// the set always restores from its own save.
#[test]
fn random_traffic_over_the_pc_machine() {
    let mut rng = 0xa076_1d64_78bd_642fu64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let ports = [
        0x20u16, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x70, 0x71, 0x3f8,
        0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x600, 0x602, 0x604, 0x608, 0x80, 0xcf8,
    ];
    let mut d = Devices::pc(1_700_000_000 * 1_000_000_000);
    let mut out = Lines::default();
    let mut now = 0u64;
    for i in 0..40_000 {
        let x = next();
        now += x % 20_000;
        let size = [1u8, 2, 4][(x >> 4) as usize % 3];
        match x % 6 {
            0 => {
                let p = ports[(x >> 8) as usize % ports.len()];
                d.port_write(now, p, size, (x >> 32) as u32, &mut out);
            }
            1 => {
                let p = ports[(x >> 8) as usize % ports.len()];
                d.port_read(now, p, size);
            }
            2 => {
                let base = if x & 0x100 != 0 {
                    lapic::LAPIC_BASE
                } else {
                    ioapic::IOAPIC_BASE
                };
                let gpa = base + ((x >> 12) & 0x3ff) * 4;
                d.mmio_write(
                    now,
                    gpa,
                    &((x >> 32) as u32).to_le_bytes()[..usize::from(size)],
                );
            }
            3 => d.advance(now),
            4 => {
                let _ = d.poll_interrupt(Readiness {
                    interrupt: x & 0x100 != 0,
                    nmi: x & 0x200 != 0,
                });
            }
            _ => {
                let _ = d.next_event_ns();
            }
        }
        if i % 4000 == 0 {
            let saved = d.save();
            let r = Devices::restore(&saved).expect("own save restores");
            assert_eq!(r.save(), saved);
        }
    }
}

/// A virtio-blk disk on both machines: its slot answers on the MMIO bus
/// (the minimal machine too), a request completes through
/// `process_virtio`, the PC machine raises GSI 16 + slot, and the slot's
/// state round-trips through `save`/`restore` with the rest.
#[test]
fn virtio_blk_slots_on_the_bus_interrupt_and_migrate() {
    use crate::testing::FakeMemory;
    use hvcore::addr::Gpa;
    use hvcore::mem::GuestMemory;
    use vstorage::{MemIo, RawDisk, VirtualDisk};
    let base = acpi::VirtioMmioSlot::standard(0).base;
    let w = |d: &mut Devices, off: u64, v: u32| d.mmio_write(0, base + off, &v.to_le_bytes());
    let r = |d: &mut Devices, off: u64| {
        let mut b = [0u8; 4];
        d.mmio_read(0, base + off, &mut b);
        u32::from_le_bytes(b)
    };
    let mut m = Devices::new();
    assert!(!m.claims_mmio(base));
    assert_eq!(m.add_virtio_blk(1 << 20, false), Some(0));
    assert!(m.claims_mmio(base + 0x1ff) && !m.claims_mmio(base + 0x200));
    assert_eq!(r(&mut m, 0), virtio_mmio::MAGIC);
    assert_eq!(r(&mut m, 8), virtio_blk::DEVICE_ID);
    let mut d = Devices::pc(0);
    assert_eq!(d.add_virtio_blk(1 << 20, false), Some(0));
    assert_eq!(d.virtio_slots(), [acpi::VirtioMmioSlot::standard(0)]);
    // I/O APIC pin 16 -> vector 0x41, level, active high; LINT0 masked.
    d.mmio_write(0, lapic::LAPIC_BASE + 0x350, &0x1_0700u32.to_le_bytes());
    d.mmio_write(0, ioapic::IOAPIC_BASE, &0x30u32.to_le_bytes());
    d.mmio_write(
        0,
        ioapic::IOAPIC_BASE + 0x10,
        &(0x41u32 | (1 << 15)).to_le_bytes(),
    );
    // The driver: VERSION_1 + FLUSH, queue of 8 at 0x1000/0x2000/0x3000.
    for (off, v) in [
        (0x70, 3),
        (0x24, 0),
        (0x20, 1 << 9),
        (0x24, 1),
        (0x20, 1),
        (0x70, 0xb),
        (0x38, 8),
        (0x80, 0x1000),
        (0x90, 0x2000),
        (0xa0, 0x3000),
        (0x44, 1),
        (0x70, 0xf),
    ] {
        w(&mut d, off, v);
    }
    // One write request of sector 3: header 0x4000, data 0x5000, status
    // 0x6000.
    let mut mem = FakeMemory::new(1 << 20);
    let desc = |mem: &mut FakeMemory, i: u64, gpa: u64, len: u32, flags: u16, next: u16| {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&gpa.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        mem.write(Gpa(0x1000 + 16 * i), &b).unwrap();
    };
    let mut hdr = [0u8; 16];
    hdr[0] = 1;
    hdr[8] = 3;
    mem.write(Gpa(0x4000), &hdr).unwrap();
    mem.write(Gpa(0x5000), &[0x5a; 512]).unwrap();
    desc(&mut mem, 0, 0x4000, 16, 1, 1);
    desc(&mut mem, 1, 0x5000, 512, 1, 2);
    desc(&mut mem, 2, 0x6000, 1, 2, 0);
    mem.write(Gpa(0x2002), &1u16.to_le_bytes()).unwrap();
    w(&mut d, 0x50, 0);
    assert!(d.virtio_pending());
    let disk: alloc::boxed::Box<dyn VirtualDisk> =
        alloc::boxed::Box::new(RawDisk::create(MemIo::new(), 1 << 20).unwrap());
    let mut disks = alloc::vec![disk];
    assert_eq!(d.poll_interrupt(READY), InterruptPoll::Idle);
    d.process_virtio(&mut mem, &mut disks);
    assert!(!d.virtio_pending());
    let mut back = [0u8; 512];
    disks[0].read(3 * 512, &mut back).unwrap();
    assert_eq!(back, [0x5a; 512]);
    assert_eq!(d.poll_interrupt(READY), InterruptPoll::Vector(0x41));
    // Saved with the rest; restored with its slot and queue positions.
    let saved = d.save();
    let mut restored = Devices::restore(&saved).unwrap();
    assert_eq!(restored.save(), saved);
    let (a, b) = (restored.virtio_blk(0).unwrap(), d.virtio_blk(0).unwrap());
    assert_eq!((a.transport(), a.config()), (b.transport(), b.config()));
    assert_eq!(b.counters.bytes_written, 512);
    assert_eq!(r(&mut restored, 0x60), 1, "the interrupt is still pending");
    // A record for a slot that is not 0..n is refused.
    let mut records = d.save_records();
    records.last_mut().unwrap().instance = 3;
    let mut fresh = Devices::pc(0);
    fresh.add_virtio_blk(1 << 20, false);
    assert!(fresh.restore_records(&records).is_err());
}
