//! Fuzz harnesses of the device models and the Linux loader, shared by
//! `vmm-service/fuzz` (libFuzzer, nightly) and the seed tests below
//! (stable, every `cargo test`). Not API: built for tests and with the
//! `testing` feature only. Each harness returns normally for every input;
//! a panic (or a failed assertion) is a bug.
//!
//! * [`fuzz_bzimage`] (target `linux_bzimage`): bytes as a kernel image
//!   into `bzimage::parse`, and an accepted one through `linux::plan`.
//! * [`fuzz_mmio`] (target `device_mmio`): a sequence of MMIO
//!   instructions, each decoded and completed against the local APIC and
//!   I/O APIC pages of a PC machine, with time passing and interrupts
//!   taken; the state must still save and restore afterwards.
//! * [`fuzz_device_state`] (target `device_state`): bytes as a migration
//!   stream's device record into `Devices::restore`; an accepted set must
//!   run (accesses, timers, interrupts) and save to what restores to the
//!   same bytes.

use super::irq::Readiness;
use super::mmio::CpuMode;
use super::{ioapic, lapic, Devices};
use crate::loader::{bzimage, linux};
use crate::uart::LineSink;
use hvcore::vcpu::Regs;

/// Bytes per instruction record of [`fuzz_mmio`].
pub const MMIO_RECORD_BYTES: usize = 24;
/// Instructions [`fuzz_mmio`] runs per input at most.
pub const MMIO_RECORDS_MAX: usize = 256;

struct Quiet;
impl LineSink for Quiet {
    fn line(&mut self, _: &str) {}
}

/// A kernel image: parse, and plan an accepted one into a few RAM sizes.
pub fn fuzz_bzimage(data: &[u8]) {
    let Ok(bz) = bzimage::parse(data) else {
        return;
    };
    assert!(u64::from(bz.header.init_size) >= bz.kernel.len() as u64);
    for ram in [64u64 << 20, 256 << 20, linux::LINUX_MAX_RAM_BYTES] {
        if let Ok(l) = linux::plan(&bz, ram, data.len() as u64, linux::BASE_CMDLINE) {
            assert!(l.kernel_end_gpa <= ram);
            assert!(l.initrd_gpa >= l.kernel_end_gpa);
            assert!(l.initrd_gpa + l.initrd_len <= ram);
        }
    }
}

/// Records of [`MMIO_RECORD_BYTES`]: byte 0 bit 0 = 32-bit mode, bit 1 =
/// local APIC page (else I/O APIC), bits 2-7 = microseconds that pass
/// first; bytes 1-2 = offset in the page; bytes 3-6 = a value every
/// general register is set to; bytes 7-21 = the instruction.
pub fn fuzz_mmio(data: &[u8]) {
    let mut d = Devices::pc(1_700_000_000_000_000_000);
    let mut now = 0u64;
    for r in data.chunks(MMIO_RECORD_BYTES).take(MMIO_RECORDS_MAX) {
        let byte = |i: usize| r.get(i).copied().unwrap_or(0);
        let ctl = byte(0);
        now += u64::from(ctl >> 2) * 1000;
        let mode = if ctl & 1 != 0 {
            CpuMode::Protected32
        } else {
            CpuMode::Long64
        };
        let base = if ctl & 2 != 0 {
            lapic::LAPIC_BASE
        } else {
            ioapic::IOAPIC_BASE
        };
        let offset = u64::from(u16::from_le_bytes([byte(1), byte(2)])) & 0xfff;
        let value = u64::from(u32::from_le_bytes([byte(3), byte(4), byte(5), byte(6)]));
        let mut regs = Regs {
            rax: value,
            rbx: value,
            rcx: value,
            rdx: value,
            rsi: value,
            rdi: value,
            rbp: value,
            r8: value,
            rip: 0x1000,
            ..Regs::default()
        };
        let insn = r.get(7..22).unwrap_or(&[]);
        if let Ok(i) = d.emulate_mmio(now, insn, mode, &mut regs, base + offset) {
            assert!(usize::from(i.len) <= insn.len());
            assert_eq!(regs.rip, 0x1000 + u64::from(i.len));
        }
        d.advance(now);
        let _ = d.poll_interrupt(Readiness {
            interrupt: ctl & 4 != 0,
            nmi: true,
        });
    }
    let saved = d.save();
    let again = Devices::restore(&saved).map(|r| r.save());
    assert_eq!(again.as_deref(), Ok(&saved[..]));
}

/// A saved device set from the stream.
pub fn fuzz_device_state(data: &[u8]) {
    let Ok(mut d) = Devices::restore(data) else {
        return;
    };
    let saved = d.save();
    let again = Devices::restore(&saved).map(|r| r.save());
    assert_eq!(again.as_deref(), Ok(&saved[..]));
    // The restored state must run: every port and register, time, and
    // interrupts, far into the future too.
    let mut out = Quiet;
    for now in [0u64, 1_000_000, 10_000_000_000, u64::MAX / 2] {
        for port in [
            0x20u16, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x40, 0x41, 0x42, 0x61, 0x71, 0x3f8, 0x3fa,
            0x3fd, 0x600, 0x604, 0x608,
        ] {
            d.port_read(now, port, 1);
        }
        d.port_write(now, 0x3f8, 1, u32::from(b'x'), &mut out);
        let mut b = [0u8; 4];
        for off in (0..0x400).step_by(0x10) {
            d.mmio_read(now, lapic::LAPIC_BASE + off, &mut b);
        }
        d.advance(now);
        let _ = d.next_event_ns();
        // Take and retire what is pending. Bounded: a level-triggered line
        // that stays up re-raises its vector after every EOI, as on
        // hardware (the guest's handler would quiet the device).
        for _ in 0..64 {
            match d.poll_interrupt(Readiness {
                interrupt: true,
                nmi: true,
            }) {
                super::irq::InterruptPoll::Vector(_) => {
                    d.mmio_write(now, lapic::LAPIC_BASE + 0xb0, &[0; 4]);
                    d.port_write(now, 0xa0, 1, 0x20, &mut out);
                    d.port_write(now, 0x20, 1, 0x20, &mut out);
                }
                super::irq::InterruptPoll::Nmi => {}
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Run every file in `fuzz/seeds/TARGET` and `fuzz/regressions/TARGET`
    /// through `harness`; returns how many ran.
    fn run_corpus(target: &str, harness: fn(&[u8])) -> usize {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut ran = 0;
        for kind in ["seeds", "regressions"] {
            let Ok(dir) = std::fs::read_dir(base.join(kind).join(target)) else {
                continue;
            };
            let mut files: Vec<_> = dir.map(|e| e.unwrap().path()).collect();
            files.sort();
            for f in files {
                harness(&std::fs::read(&f).unwrap());
                ran += 1;
            }
        }
        ran
    }

    #[test]
    fn bzimage_corpus_runs_clean() {
        assert!(run_corpus("linux_bzimage", fuzz_bzimage) >= 1);
        // The seed is a bzImage the loader accepts.
        let seed = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/linux_bzimage/minimal"),
        )
        .unwrap();
        assert!(bzimage::parse(&seed).is_ok());
        fuzz_bzimage(&bzimage::test_image(b"\xf4"));
    }

    #[test]
    fn mmio_corpus_runs_clean() {
        assert!(run_corpus("device_mmio", fuzz_mmio) >= 1);
    }

    /// The MMIO seed is what Linux does to its APICs at boot: the
    /// instructions decode and program a timer interrupt that arrives.
    #[test]
    fn mmio_seed_programs_the_lapic_timer() {
        let seed = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/device_mmio/linux_apic_setup"),
        )
        .unwrap();
        assert_eq!(seed.len() % MMIO_RECORD_BYTES, 0);
        let mut d = Devices::pc(0);
        let mut now = 0;
        for r in seed.chunks(MMIO_RECORD_BYTES) {
            now += u64::from(r[0] >> 2) * 1000;
            let base = if r[0] & 2 != 0 {
                lapic::LAPIC_BASE
            } else {
                ioapic::IOAPIC_BASE
            };
            let off = u64::from(u16::from_le_bytes([r[1], r[2]]));
            let value = u64::from(u32::from_le_bytes([r[3], r[4], r[5], r[6]]));
            let mut regs = Regs {
                rax: value,
                ..Regs::default()
            };
            d.emulate_mmio(now, &r[7..22], CpuMode::Long64, &mut regs, base + off)
                .unwrap();
        }
        d.advance(now + 1_000_000_000);
        assert_eq!(
            d.poll_interrupt(Readiness {
                interrupt: true,
                nmi: true
            }),
            super::super::irq::InterruptPoll::Vector(0xec)
        );
    }

    #[test]
    fn device_state_corpus_runs_clean() {
        assert!(run_corpus("device_state", fuzz_device_state) >= 2);
        fuzz_device_state(&Devices::pc(0).save());
        fuzz_device_state(&Devices::new().save());
    }
}
