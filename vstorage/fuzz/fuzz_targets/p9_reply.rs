//! `cargo +nightly fuzz run p9_reply` from `vstorage/`: one 9P2000.L reply
//! through the validating decoder; the input format is described in
//! `vstorage/src/p9/fuzz.rs`. Seeds: `fuzz/seeds/p9_reply/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vstorage::p9::fuzz::reply(data);
});
