//! Opens arbitrary bytes as a VHDX through `MemIo` and does reads and writes.
//! Run with `cargo +nightly fuzz run vhdx_open` from `vstorage/`; the same
//! harness runs on stable over a mutation corpus in `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vstorage::vhdx::fuzz_harness(data);
});
