//! Request bodies after a real handshake: each input line goes to the node
//! as a correctly tagged session frame, so the JSON parsing and every
//! request handler run (against the test doubles of a node with three
//! VMs). Every body must get exactly one reply and the session must go on.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm_service::mgmt::fuzzing::fuzz_session(data);
});
