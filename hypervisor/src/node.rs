//! `Node`: the platform as the root-partition service sees it
//! ([`hvcore::host::Host`]).
//!
//! Holds what the boot path learned (command line, modules, vendor) and
//! forwards partition creation and the raw benchmark to [`crate::virt`].
//! Module bytes stay where the loader put them (excluded from the frame
//! allocator), so `module()` hands out slices of the identity map.

use crate::bootinfo::{BootInfo, MAX_MODULES};
use alloc::boxed::Box;
use alloc::string::String;
use hvcore::host::{CpuidResult, CpuidSource, Host, HostError, Partition};
use hvcore::vcpu::Vendor;

/// The node.
pub struct Node {
    vendor: Vendor,
    cmdline: String,
    modules: [(u64, u64); MAX_MODULES],
    module_count: usize,
}

impl Node {
    /// Build the node from the boot information (call after the heap is up).
    pub fn new(info: &BootInfo) -> Self {
        let mut modules = [(0, 0); MAX_MODULES];
        for (slot, m) in modules.iter_mut().zip(info.modules()) {
            *slot = (m.start, m.end);
        }
        Node {
            vendor: crate::cpu::vendor(),
            cmdline: String::from(info.cmdline()),
            modules,
            module_count: info.modules().len(),
        }
    }
}

impl CpuidSource for Node {
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        crate::cpu::cpuid(leaf, subleaf)
    }
}

impl Host for Node {
    fn vendor(&self) -> Vendor {
        self.vendor
    }

    fn cmdline(&self) -> &str {
        &self.cmdline
    }

    fn module(&self, index: usize) -> Option<&[u8]> {
        let (start, end) = *self.modules[..self.module_count].get(index)?;
        let len = usize::try_from(end - start).ok()?;
        if start == 0 || len == 0 {
            return None;
        }
        // SAFETY: the loader placed the module at [start, end); the frame
        // allocator excluded that range, so nothing writes it, and all RAM
        // is identity-mapped. The slice lives as long as the node.
        Some(unsafe { core::slice::from_raw_parts(start as *const u8, len) })
    }

    fn create_partition(&mut self, ram_bytes: u64) -> Result<Box<dyn Partition>, HostError> {
        crate::virt::create_partition(ram_bytes)
    }

    fn now_ns(&self) -> u64 {
        crate::time::now_ns()
    }

    fn console_write(&mut self, s: &str) {
        crate::serial::write_str(s);
    }

    fn memory_stats(&self) -> (u64, u64) {
        crate::mem::memory_stats()
    }

    fn bench_raw_roundtrips(&mut self, iterations: u64) -> Result<u64, HostError> {
        crate::virt::bench_raw_roundtrips(iterations)
    }

    fn shutdown(&mut self, code: u8) -> ! {
        crate::power::shutdown(code)
    }
}
