//! `cargo +nightly fuzz run vhdx_io` from `vstorage/`; the input format is
//! described in `vstorage/src/vhdx/fuzz.rs`. Seeds: `fuzz/seeds/vhdx_io/`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vstorage::vhdx::fuzz::{self, Templates};

static TEMPLATES: OnceLock<Templates> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    fuzz::io(TEMPLATES.get_or_init(Templates::new), data);
});
