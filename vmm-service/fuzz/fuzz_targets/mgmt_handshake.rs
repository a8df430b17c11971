//! Bytes from a peer that has not authenticated, into the management
//! server's connection (and, as a hostile node's, into the client's): a
//! control byte (piece size, deadlines, a peer that never reads) and the
//! stream. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm_service::mgmt::fuzzing::fuzz_handshake(data);
});
