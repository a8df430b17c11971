//! Arbitrary bytes into the migration stream decoder (either direction,
//! any chunking, CRCs optionally repaired): it must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    migration::fuzzing::fuzz_decode(data);
});
