//! `cargo +nightly fuzz run vhdx_log_replay` from `vstorage/`; the input format is
//! described in `vstorage/src/vhdx/fuzz.rs`. Seeds: `fuzz/seeds/vhdx_log_replay/`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vstorage::vhdx::fuzz::{self, Templates};

static TEMPLATES: OnceLock<Templates> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    fuzz::log_replay(TEMPLATES.get_or_init(Templates::new), data);
});
