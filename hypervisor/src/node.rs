//! `Node`: the platform as the root-partition service sees it
//! ([`hvcore::host::Host`]).
//!
//! Holds what the boot path learned (command line, modules, vendor, the
//! cluster key from QEMU's fw_cfg), the entropy pool ([`crate::rng`]) and
//! the NICs ([`crate::net`]), and forwards partition creation and the raw
//! benchmark to [`crate::virt`]. Module bytes stay where the loader put them
//! (excluded from the frame allocator), so `module()` hands out slices of
//! the identity map.

use crate::bootinfo::{BootInfo, MAX_MODULES};
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use hvcore::entropy::{EntropyError, Sources};
use hvcore::host::{CpuidResult, CpuidSource, Host, HostError, NetStack, Partition, StoreChannel};
use hvcore::vcpu::Vendor;

/// The node.
pub struct Node {
    vendor: Vendor,
    cmdline: String,
    modules: [(u64, u64); MAX_MODULES],
    module_count: usize,
    cpus: u32,
    entropy: crate::rng::NodeEntropy,
    /// The cluster key from fw_cfg (`opt/hvmigrate/key`).
    cluster_key: Option<String>,
    net: Option<crate::net::NodeNet>,
    /// Store devices not yet handed to the service (`take_stores`).
    stores: Vec<crate::virtio_9p::StoreDevice>,
    /// Receive counter at the last `idle` and when it last moved.
    idle_rx: (u64, u64),
}

/// After a frame arrived, the node polls without halting for this long
/// (halting waits for the next timer tick, which would cap throughput).
const BUSY_AFTER_RX_NS: u64 = 50_000_000;

impl Node {
    /// Build the node from the boot information (call after the heap is up).
    pub fn new(info: &BootInfo) -> Self {
        let mut modules = [(0, 0); MAX_MODULES];
        for (slot, m) in modules.iter_mut().zip(info.modules()) {
            *slot = (m.start, m.end);
        }
        let mut entropy = crate::rng::NodeEntropy::init();
        // smoltcp's seed picks TCP initial sequence numbers and ports: from
        // the pool when it has a source, else (no management API is served
        // then) from the TSC.
        let mut seed = [0u8; 8];
        let net_seed = match entropy.fill(&mut seed) {
            Ok(()) => u64::from_le_bytes(seed),
            Err(_) => crate::cpu::rdtsc(),
        };
        let cluster_key = crate::fw_cfg::cluster_key();
        if cluster_key.is_some() {
            log::info!("fw_cfg: cluster key from {}", crate::fw_cfg::KEY_FILE);
        }
        Node {
            vendor: crate::cpu::vendor(),
            cmdline: String::from(info.cmdline()),
            modules,
            module_count: info.modules().len(),
            cpus: crate::acpi::read_madt(info.rsdp).map_or(1, |m| m.cpus.max(1)),
            entropy,
            cluster_key,
            net: match crate::net::NodeNet::init(info.cmdline(), crate::time::now_ns(), net_seed) {
                Ok(net) => net,
                Err(e) => {
                    log::error!("net: {e}; the node has no network");
                    None
                }
            },
            stores: crate::virtio_9p::init(),
            idle_rx: (0, 0),
        }
    }
}

impl CpuidSource for Node {
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        crate::cpu::cpuid(leaf, subleaf)
    }
    fn tsc_khz(&self) -> u64 {
        // No TSC scaling: the guest's TSC ticks at the node's.
        crate::time::tsc_hz() / 1000
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

    fn wall_clock_ns(&self) -> u64 {
        crate::time::wall_clock_ns()
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

    fn cpu_count(&self) -> u32 {
        self.cpus
    }

    fn entropy(&mut self, buf: &mut [u8]) {
        if let Err(e) = self.entropy.fill(buf) {
            // The Host contract: callers check `entropy_sources` first.
            panic!("entropy requested on a node without a source: {e}");
        }
    }

    fn entropy_sources(&self) -> Result<Sources, EntropyError> {
        self.entropy.sources()
    }

    fn cluster_key(&self) -> Option<&str> {
        self.cluster_key.as_deref()
    }

    fn net(&mut self) -> Option<&mut dyn NetStack> {
        self.net.as_mut().map(|n| n as &mut dyn NetStack)
    }

    fn idle(&mut self) {
        // NICs are polled, not interrupt-driven: while frames keep coming,
        // return at once so the next poll is not a timer tick away.
        let now = crate::time::now_ns();
        if let Some(net) = &self.net {
            let rx = net.rx_frames();
            if rx != self.idle_rx.0 {
                self.idle_rx = (rx, now);
            }
            if now.saturating_sub(self.idle_rx.1) < BUSY_AFTER_RX_NS {
                return;
            }
        }
        // The LAPIC timer ticks periodically, so this returns within one
        // tick period.
        crate::interrupts::wait_for_interrupt();
    }

    fn take_stores(&mut self) -> Vec<Box<dyn StoreChannel>> {
        crate::virtio_9p::channels(core::mem::take(&mut self.stores))
    }
}
