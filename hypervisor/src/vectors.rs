//! The host's interrupt vectors: who raises what where.
//!
//! A leaf module (it imports nothing) so that the interrupt dispatcher
//! ([`crate::interrupts`]) and the devices it dispatches for
//! ([`crate::lapic`]) both name the vectors without importing each other.

/// LAPIC timer vector.
pub const TIMER_VECTOR: u8 = 0x20;
/// LAPIC spurious-interrupt vector (low nibble all ones, as older xAPICs
/// require: Intel SDM vol. 3A, 11.9).
pub const SPURIOUS_VECTOR: u8 = 0xFF;
/// Where the masked legacy PICs are parked.
pub const PIC_BASE_VECTOR: u8 = 0xE0;
