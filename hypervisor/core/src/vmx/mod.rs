//! Intel VMX, the logic half: the EPT entry format and pointer, the VM-exit
//! decoder, and the conversions between VMCS encodings and the state
//! record.
//!
//! The platform backend (`hypervisor::vmx`) owns the VMCS and the world
//! switch; it reads the exit reason, qualification, guest-physical
//! address, instruction length and interruption information with VMREAD
//! and hands those plain values to [`exit::decode_exit`], so every decoding
//! decision is host-tested (and fuzzed: `hypervisor/core/fuzz`).

mod ept;
pub mod exit;
pub mod flush;
pub mod pml;

pub use ept::*;
