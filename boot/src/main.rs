//! The bootable image `hvmigrate` (built for `x86_64-unknown-none`; a no-op
//! on the host so that workspace-wide host builds and tests still work).
//!
//! Boot flow (docs/DESIGN.md, "Boot"): the loader (QEMU `-kernel` via the
//! Multiboot1 header or the PVH note, or GRUB via Multiboot1) enters
//! `entry.rs` in 32-bit mode; the trampoline switches to 64-bit mode and
//! calls [`hv_boot_main`], which parses the boot information, brings up the
//! platform in `hypervisor` and hands the node to `vmm_service::run`.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod entry;
#[cfg(target_os = "none")]
mod image;

#[cfg(not(target_os = "none"))]
fn main() {}
