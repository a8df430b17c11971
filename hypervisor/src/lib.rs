//! The hypervisor's platform layer: the thin part that touches the machine.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod acpi;
pub mod bootinfo;
pub mod cpu;
pub mod fpu;
pub mod fw_cfg;
pub mod gdt;
pub mod interrupts;
pub mod lapic;
pub mod logger;
pub mod mem;
pub mod net;
pub mod node;
pub mod partition;
pub mod pci;
pub mod power;
pub mod rng;
pub mod serial;
pub mod svm;
pub mod time;
pub mod vectors;
pub mod virt;
pub mod virtio_9p;
pub mod virtio_hal;
pub mod vmx;
