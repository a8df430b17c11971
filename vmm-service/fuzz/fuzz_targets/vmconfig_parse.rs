//! Bytes as a VM configuration file (read from a store, perhaps edited on
//! the host): the parser must refuse or accept without panicking, and
//! what it accepts must render back to the same configuration.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm_service::vmconfig::fuzz_parse(data);
});
