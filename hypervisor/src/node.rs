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
use hvcore::host::{CpuidResult, CpuidSource, Host, HostError, NetStack, Partition};
use hvcore::vcpu::Vendor;

/// The node.
pub struct Node {
    vendor: Vendor,
    cmdline: String,
    modules: [(u64, u64); MAX_MODULES],
    module_count: usize,
    cpus: u32,
    entropy_calls: u64,
    net: Option<crate::net::NodeNet>,
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
        Node {
            vendor: crate::cpu::vendor(),
            cmdline: String::from(info.cmdline()),
            modules,
            module_count: info.modules().len(),
            cpus: crate::acpi::read_madt(info.rsdp).map_or(1, |m| m.cpus.max(1)),
            entropy_calls: 0,
            net: match crate::net::NodeNet::init(
                info.cmdline(),
                crate::time::now_ns(),
                crate::cpu::rdtsc(),
            ) {
                Ok(net) => net,
                Err(e) => {
                    log::error!("net: {e}; the node has no network");
                    None
                }
            },
            idle_rx: (0, 0),
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

    fn cpu_count(&self) -> u32 {
        self.cpus
    }

    fn entropy(&mut self, buf: &mut [u8]) {
        self.entropy_calls = self.entropy_calls.wrapping_add(1);
        fill_entropy(buf, self.entropy_calls);
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
}

/// Whether the CPU has RDRAND (CPUID.01H:ECX[30], Intel SDM vol. 2B, RDRAND;
/// AMD APM vol. 3, E.3.2).
fn has_rdrand() -> bool {
    crate::cpu::cpuid(1, 0).ecx & (1 << 30) != 0
}

/// One RDRAND value, `None` when the DRNG is exhausted (CF = 0; Intel's DRNG
/// guide recommends 10 retries).
///
/// # Safety
/// The CPU must support RDRAND ([`has_rdrand`]).
#[target_feature(enable = "rdrand")]
unsafe fn rdrand64() -> Option<u64> {
    for _ in 0..10 {
        let mut v = 0u64;
        // Safe here: this function is compiled with the `rdrand` feature.
        if core::arch::x86_64::_rdrand64_step(&mut v) == 1 {
            return Some(v);
        }
    }
    None
}

/// Fill `buf` from RDRAND when present, mixed with TSC readings taken around
/// work of varying length (the jitter of which is the entropy when RDRAND is
/// absent, as under QEMU's `qemu64` CPU). The management protocol whitens the
/// result with SHA-256 and a counter, so nonces never repeat within a boot.
fn fill_entropy(buf: &mut [u8], call: u64) {
    let rdrand = has_rdrand();
    let mut state = crate::cpu::rdtsc() ^ call.rotate_left(32);
    for chunk in buf.chunks_mut(8) {
        // xorshift steps between TSC reads vary the gaps between them.
        for _ in 0..(state & 0x3f) + 8 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
        }
        let mut v = state ^ crate::cpu::rdtsc().wrapping_mul(0x9e37_79b9_7f4a_7c15);
        if rdrand {
            // SAFETY: CPUID reported RDRAND.
            if let Some(r) = unsafe { rdrand64() } {
                v ^= r;
            }
        }
        state = state.rotate_left(17) ^ v;
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
}
