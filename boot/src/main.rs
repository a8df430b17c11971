//! The bootable image (built for `x86_64-unknown-none`; a no-op on the host).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}
