//! The non-test guests, which run for ever: `heartbeat` (the `mode=node`
//! VM), `dirty-demo` (what the demo's dirty-rate display tracks) and
//! `bench-hypercall` (the exits benchmark's hypercall loop).

use hvcore::abi::HV_SIGNATURE;

use crate::arch::{cpuid, rdtsc};
use crate::hypercall::{self, err_name};
use crate::layout::PAGE_BYTES;
use crate::{fail, println, Env};

/// Assumed TSC rate when nothing tells us better.
const DEFAULT_TSC_HZ: u64 = 2_000_000_000;

/// Best guess of the TSC frequency: the de facto hypervisor timing leaf
/// 0x4000_0010 (EAX = TSC kHz) when our vendor leaf reaches it, else CPUID
/// 0x15 (TSC/crystal ratio), else 0x16 (base MHz), else a fixed guess. Only
/// used for "about once a second" pacing.
pub(crate) fn tsc_hz() -> u64 {
    let hv = cpuid(0x4000_0000, 0);
    let mut sig = [0u8; 12];
    sig[0..4].copy_from_slice(&hv.ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&hv.ecx.to_le_bytes());
    sig[8..12].copy_from_slice(&hv.edx.to_le_bytes());
    if &sig == HV_SIGNATURE && hv.eax >= 0x4000_0010 {
        let khz = cpuid(0x4000_0010, 0).eax;
        if khz != 0 {
            return u64::from(khz) * 1000;
        }
    }
    let max_leaf = cpuid(0, 0).eax;
    if max_leaf >= 0x15 {
        let l = cpuid(0x15, 0);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax);
        }
    }
    if max_leaf >= 0x16 {
        let mhz = cpuid(0x16, 0).eax & 0xffff;
        if mhz != 0 {
            return u64::from(mhz) * 1_000_000;
        }
    }
    DEFAULT_TSC_HZ
}

/// `heartbeat N` lines, N = 1, 2, 3, ..., one per period of guest time
/// (TSC) when [`Beats::tick`] is called often enough; far behind (the VM
/// did not run for a while) it goes on from now instead of printing a
/// burst. Its state lives in guest memory, so it continues across
/// migrations.
pub(crate) struct Beats {
    period: u64,
    next: u64,
    n: u64,
}

impl Beats {
    /// `per_s` beats a second, the first one period from now.
    pub(crate) fn new(per_s: u64) -> Self {
        let period = (tsc_hz() / per_s.max(1)).max(1);
        Self {
            period,
            next: rdtsc().wrapping_add(period),
            n: 0,
        }
    }

    /// Print the next beat if it is due; whether it did.
    pub(crate) fn tick(&mut self) -> bool {
        let now = rdtsc();
        if (now.wrapping_sub(self.next) as i64) < 0 {
            return false;
        }
        self.n += 1;
        println!("heartbeat {}", self.n);
        self.next = self.next.wrapping_add(self.period);
        if (now.wrapping_sub(self.next) as i64) >= 0 {
            self.next = now.wrapping_add(self.period);
        }
        true
    }
}

/// `heartbeat`: print `heartbeat N` about once a second, for ever.
pub fn heartbeat() -> ! {
    let period = tsc_hz();
    let mut deadline = rdtsc();
    let mut n: u64 = 0;
    loop {
        n += 1;
        println!("heartbeat {}", n);
        deadline = deadline.wrapping_add(period);
        while (rdtsc().wrapping_sub(deadline) as i64) < 0 {
            core::hint::spin_loop();
        }
    }
}

/// Buffer the demo guest dirties.
const DEMO_BUFFER_BYTES: u64 = 16 << 20;

/// `dirty-demo`: increment one byte in every page of a 16 MiB buffer, in a
/// loop, for ever; a line every few seconds shows it is alive.
pub fn dirty_demo(env: &Env) -> ! {
    let start = env.free_start;
    let end = start.saturating_add(DEMO_BUFFER_BYTES);
    if end > env.params.ram_bytes {
        fail!(
            "dirty-demo: the 16 MiB buffer at {:#x} does not fit in RAM ({:#x})",
            start,
            env.params.ram_bytes
        );
    }
    let pages = DEMO_BUFFER_BYTES / PAGE_BYTES;
    println!(
        "dirty-demo: incrementing one byte in each of {} pages (16 MiB at GPA {:#x}..{:#x})",
        pages, start, end
    );
    let report_every = tsc_hz().saturating_mul(5);
    let mut next_report = rdtsc().wrapping_add(report_every);
    let mut pass: u64 = 0;
    loop {
        for page in 0..pages {
            let p = (start + page * PAGE_BYTES) as *mut u8;
            // SAFETY: the buffer is free guest RAM below ram_bytes (checked
            // above), identity-mapped, owned by no Rust object.
            unsafe { p.write_volatile(p.read_volatile().wrapping_add(1)) };
        }
        pass += 1;
        if (rdtsc().wrapping_sub(next_report) as i64) >= 0 {
            println!("dirty-demo: {} passes over the buffer", pass);
            next_report = rdtsc().wrapping_add(report_every);
        }
    }
}

/// `bench-hypercall`: `HC_NOP` in a loop, for ever, checking each answer.
pub fn bench_hypercall() -> ! {
    println!("bench-hypercall: calling HC_NOP in a loop");
    let mut i: u64 = 0;
    loop {
        let r = hypercall::nop(i);
        if r.rax != i.wrapping_add(1) {
            fail!("HC_NOP({}) returned {:#x} ({})", i, r.rax, err_name(r.rax));
        }
        i = i.wrapping_add(1);
    }
}
