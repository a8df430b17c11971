//! A sequence of guest MMIO instructions against the local APIC and I/O
//! APIC pages: the instruction decoder, the emulation and the register
//! interfaces, with time passing and interrupts taken. Must never panic;
//! the state must still save and restore.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm_service::devices::fuzzing::fuzz_mmio(data);
});
