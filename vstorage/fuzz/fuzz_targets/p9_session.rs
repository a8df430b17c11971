//! `cargo +nightly fuzz run p9_session` from `vstorage/`: a whole client
//! session (version, attach, walk, open, read, write, readdir, ...) against
//! a server whose every reply comes from the input; the format is
//! described in `vstorage/src/p9/fuzz.rs`. Seeds: `fuzz/seeds/p9_session/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vstorage::p9::fuzz::session(data);
});
