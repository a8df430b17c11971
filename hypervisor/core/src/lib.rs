//! hvcore: the hypervisor's logic, kept apart from the hardware so that plain
//! `cargo test` on the host exercises it.
//!
//! Nothing here touches the machine: no asm, no MMIO, no globals, no
//! `unsafe`. Hardware is reached only through small traits (`PhysMem`,
//! `FrameAlloc`, `Vcpu`, `NestedPaging`, `GuestMemory`) that the platform
//! layer (`hypervisor` crate) implements and tests implement with doubles.
//!
//! Vendor detail (AMD SVM, Intel VMX) is confined to the `svm` and `vmx`
//! modules of this crate and of the platform crate; everything else speaks the
//! vendor-neutral [`vcpu::VmExit`].
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod abi;
pub mod addr;
pub mod cpuid;
pub mod dirty;
pub mod entropy;
pub mod exit;
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
pub mod mem;
pub mod msr;
pub mod npt;
pub mod partition;
#[cfg(test)]
mod proptests;
pub mod svm;
pub mod vcpu;
pub mod vcpu_state;
pub mod vmx;
pub mod x86;

#[cfg(any(test, feature = "testing"))]
pub mod testing;
