//! Arbitrary bytes into a destination `Receiver` (decoder plus the
//! record application and digest verification): it must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = migration::fuzzing::fuzz_receive(data);
});
