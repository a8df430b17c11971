//! Backend selection: creates partitions on whichever virtualization
//! extension this CPU offers (SVM now, VMX later).
//!
//! Placeholder until the SVM backend lands: reports that no backend exists.

use alloc::boxed::Box;
use hvcore::host::{HostError, Partition};

/// Create a partition with `ram_bytes` of zeroed guest RAM and one vCPU.
pub fn create_partition(ram_bytes: u64) -> Result<Box<dyn Partition>, HostError> {
    let _ = ram_bytes;
    Err(HostError::NoVirtualization)
}

/// Bare world-switch round trips, for `bench exits`.
pub fn bench_raw_roundtrips(iterations: u64) -> Result<u64, HostError> {
    let _ = iterations;
    Err(HostError::NoVirtualization)
}
