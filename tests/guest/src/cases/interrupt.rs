//! `interrupt`: the guest takes external interrupts from the emulated
//! local APIC (the VM has the PC machine). Its timer, programmed through
//! the xAPIC page (MMIO the hypervisor decodes in software), must
//! 1. wake a `sti; hlt`;
//! 2. stay pending while RFLAGS.IF = 0 (nothing delivered however long the
//!    guest runs with interrupts off), and arrive right after `sti`
//!    without a HLT (the interrupt-window exit).
//!
//! Waits are measured with the TSC at the rate CPUID 0x4000_0010 reports.

use core::arch::asm;

use crate::idt::{timer_ticks, TIMER_VECTOR};
use crate::{arch, fail, println, report};

/// The xAPIC page (its reset base).
const LAPIC_GPA: u64 = 0xfee0_0000;
const SVR: u64 = 0xf0;
const LVT_TIMER: u64 = 0x320;
const INITIAL_COUNT: u64 = 0x380;
const CURRENT_COUNT: u64 = 0x390;
const DIVIDE_CONFIG: u64 = 0x3e0;
/// One millisecond of the emulated APIC bus (1 GHz) at divide-by-1.
const COUNT_1MS: u32 = 1_000_000;

fn lapic_write(reg: u64, value: u32) {
    // SAFETY: the xAPIC page is device memory the hypervisor emulates; the
    // identity map covers it. A 32-bit aligned store, as the APIC wants.
    unsafe { ((LAPIC_GPA + reg) as *mut u32).write_volatile(value) }
}

fn lapic_read(reg: u64) -> u32 {
    // SAFETY: as in `lapic_write`, a 32-bit aligned load.
    unsafe { ((LAPIC_GPA + reg) as *const u32).read_volatile() }
}

fn sti() {
    // SAFETY: the IDT has the timer's gate; the case wants interrupts on.
    unsafe { asm!("sti", options(nomem, nostack)) }
}

fn cli() {
    // SAFETY: only masks interrupts.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

pub fn run() -> ! {
    let khz = u64::from(arch::cpuid(0x4000_0010, 0).eax);
    if khz == 0 {
        fail!("CPUID 0x40000010 reports no TSC rate");
    }
    let ms = |n: u64| n * khz;
    lapic_write(SVR, 0x1ff); // APIC software-enabled, spurious vector 0xff
    lapic_write(DIVIDE_CONFIG, 0xb); // divide by 1
    lapic_write(LVT_TIMER, u32::from(TIMER_VECTOR)); // one-shot, unmasked

    // 1. HLT wakes on the timer.
    lapic_write(INITIAL_COUNT, COUNT_1MS);
    let start = arch::rdtsc();
    while timer_ticks() == 0 {
        // SAFETY: STI's shadow covers the HLT: the interrupt cannot slip
        // in between and leave the HLT waiting for nothing.
        unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
        if arch::rdtsc() - start > ms(5000) {
            fail!("no timer interrupt woke the HLT within 5 s");
        }
    }
    let woke_ms = (arch::rdtsc() - start) / khz;

    // 2. Held while IF = 0 ...
    cli();
    lapic_write(INITIAL_COUNT, COUNT_1MS);
    let start = arch::rdtsc();
    while arch::rdtsc() - start < ms(30) {
        core::hint::spin_loop();
    }
    if timer_ticks() != 1 {
        fail!(
            "an interrupt was delivered with RFLAGS.IF = 0 ({} ticks)",
            timer_ticks()
        );
    }
    let count = lapic_read(CURRENT_COUNT);
    if count != 0 {
        fail!("the one-shot timer still counts ({count}) after 30 ms");
    }
    // ... and taken once interrupts are on, without a HLT.
    sti();
    let start = arch::rdtsc();
    while timer_ticks() < 2 {
        if arch::rdtsc() - start > ms(5000) {
            cli();
            fail!("the pending timer interrupt did not arrive within 5 s of STI");
        }
        core::hint::spin_loop();
    }
    cli();
    let late_us = (arch::rdtsc() - start) * 1000 / khz;
    if timer_ticks() != 2 {
        fail!("expected 2 timer interrupts, took {}", timer_ticks());
    }
    println!(
        "interrupt: HLT woke after {woke_ms} ms; held with IF=0, taken {late_us} us after STI"
    );
    report::ok("local APIC timer interrupts delivered")
}
