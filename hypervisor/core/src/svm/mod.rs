//! AMD SVM, the logic half: the nested page-table entry format and the
//! #VMEXIT decoder.
//!
//! The platform backend (`hypervisor::svm`) owns the VMCB and the world
//! switch; it reads the exit code, EXITINFO1/2 and EXITINTINFO out of the
//! VMCB and hands those plain values to [`exit::decode_exit`] and
//! [`exit::reinjection`], so every decoding decision is host-tested (and
//! fuzzed: `hypervisor/core/fuzz`).

pub mod entry;
pub mod exit;
mod npt;

pub use npt::*;
