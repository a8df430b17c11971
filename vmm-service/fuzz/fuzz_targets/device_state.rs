//! Bytes as the migration stream's device record: restore, then run the
//! restored devices. Must never panic; what restores must save to bytes
//! that restore the same.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm_service::devices::fuzzing::fuzz_device_state(data);
});
