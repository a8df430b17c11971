//! Host interrupt control (IDT and handlers come in the next step).

use core::arch::asm;

/// Mask maskable interrupts (`cli`).
pub fn disable() {
    // SAFETY: CLI only clears RFLAGS.IF.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// Unmask maskable interrupts (`sti`).
pub fn enable() {
    // SAFETY: STI only sets RFLAGS.IF; the IDT handles every vector.
    unsafe { asm!("sti", options(nomem, nostack)) };
}

/// Whether RFLAGS.IF is set.
pub fn are_enabled() -> bool {
    crate::cpu::rflags() & (1 << 9) != 0
}
