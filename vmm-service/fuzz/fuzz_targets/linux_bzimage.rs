//! Bytes as a Linux kernel image: the boot-protocol setup header parser
//! and, for an accepted image, the guest layout. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm_service::devices::fuzzing::fuzz_bzimage(data);
});
