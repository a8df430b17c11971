//! The hypervisor's platform layer: the thin part that touches the machine.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod virt;
