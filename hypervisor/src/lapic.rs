//! The local APIC in xAPIC (MMIO) mode: enable, EOI, and the periodic
//! preemption timer.
//!
//! Register offsets: Intel SDM vol. 3A, table 11-1; AMD APM vol. 2, 16.3.
//! The MMIO page is mapped uncached by [`crate::mem::paging`]. The timer
//! counts at the bus/core crystal rate divided by 16; its rate is measured
//! against the PIT in [`crate::time::calibrate`].
//!
//! Interrupt-context functions ([`eoi`], [`count_tick`]) touch only atomics
//! and the EOI register.

use crate::vectors::{SPURIOUS_VECTOR, TIMER_VECTOR};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};
use volatile::VolatilePtr;
use x86_64::registers::model_specific::{ApicBase, ApicBaseFlags};

const REG_ID: u64 = 0x20;
const REG_TPR: u64 = 0x80;
const REG_EOI: u64 = 0xB0;
const REG_SVR: u64 = 0xF0;
const REG_LVT_TIMER: u64 = 0x320;
const REG_LVT_LINT0: u64 = 0x350;
const REG_LVT_LINT1: u64 = 0x360;
const REG_TIMER_INITIAL: u64 = 0x380;
const REG_TIMER_CURRENT: u64 = 0x390;
const REG_TIMER_DIVIDE: u64 = 0x3E0;

const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
const SVR_APIC_ENABLE: u32 = 1 << 8;
/// Divide configuration value for divide-by-16 (Intel SDM vol. 3A,
/// figure 11-10).
const DIVIDE_BY_16: u32 = 0b0011;

static BASE: AtomicU64 = AtomicU64::new(0);
static TICKS: AtomicU64 = AtomicU64::new(0);
static PERIOD_NS: AtomicU64 = AtomicU64::new(0);

/// Why the LAPIC cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LapicError {
    /// Firmware left the LAPIC in x2APIC mode (MSR interface only).
    X2ApicMode,
}

impl core::fmt::Display for LapicError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LapicError::X2ApicMode => {
                write!(f, "firmware enabled x2APIC mode; only xAPIC is supported")
            }
        }
    }
}

/// The 32-bit register at offset `reg` of the LAPIC page.
fn register(reg: u64) -> VolatilePtr<'static, u32> {
    let base = BASE.load(Ordering::Relaxed);
    let Some(ptr) = NonNull::new((base + reg) as *mut u32) else {
        panic!("lapic: register {reg:#x} accessed before init");
    };
    // SAFETY: `base` is the LAPIC MMIO page set by `init` (identity-mapped,
    // uncached, never unmapped); `reg` is one of the 16-byte aligned
    // register offsets above, so the pointer is valid and aligned for a
    // 32-bit access for the rest of the hypervisor's life.
    unsafe { VolatilePtr::new(ptr) }
}

fn read(reg: u64) -> u32 {
    register(reg).read()
}

fn write(reg: u64, value: u32) {
    register(reg).write(value)
}

/// Enable the LAPIC at the address IA32_APIC_BASE holds (the MADT's
/// address is only cross-checked by the caller). Masks LINT0/LINT1 (the
/// legacy PIC's ExtINT path) and the timer. Returns the LAPIC's physical
/// address.
pub fn init() -> Result<u64, LapicError> {
    // IA32_APIC_BASE (Intel SDM vol. 3A, 11.4.4) exists on every CPU with
    // an APIC (CPUID.1:EDX[9], present on all long-mode CPUs).
    let (frame, flags) = ApicBase::read();
    if flags.contains(ApicBaseFlags::X2APIC_ENABLE) {
        return Err(LapicError::X2ApicMode);
    }
    if !flags.contains(ApicBaseFlags::LAPIC_ENABLE) {
        // SAFETY: setting the global enable bit keeps the address unchanged.
        unsafe { ApicBase::write(frame, flags | ApicBaseFlags::LAPIC_ENABLE) };
    }
    let base = frame.start_address().as_u64();
    BASE.store(base, Ordering::Relaxed);
    write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    write(REG_LVT_LINT0, LVT_MASKED);
    write(REG_LVT_LINT1, LVT_MASKED);
    write(REG_TPR, 0);
    write(REG_SVR, SVR_APIC_ENABLE | u32::from(SPURIOUS_VECTOR));
    Ok(base)
}

/// This CPU's xAPIC ID.
pub fn id() -> u32 {
    read(REG_ID) >> 24
}

/// End of interrupt (interrupt context).
pub fn eoi() {
    write(REG_EOI, 0);
}

/// Count one timer tick (interrupt context).
pub fn count_tick() {
    TICKS.fetch_add(1, Ordering::Relaxed);
}

/// Timer ticks taken since the timer started.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// The timer period in nanoseconds (0 before [`start_periodic`]).
pub fn period_ns() -> u64 {
    PERIOD_NS.load(Ordering::Relaxed)
}

/// Start a free-running down-count (divide by 16, masked, one-shot) for
/// calibration; read it back with [`current_count`].
pub fn start_calibration_count() {
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    write(REG_TIMER_INITIAL, u32::MAX);
}

/// The timer's current count.
pub fn current_count() -> u32 {
    read(REG_TIMER_CURRENT)
}

/// Start the periodic timer on [`TIMER_VECTOR`] with
/// `period_ns`, given the measured count rate (`counts_per_s` at divide by
/// 16). Interrupts still need to be opened by the caller to be taken.
pub fn start_periodic(counts_per_s: u64, period_ns: u64) {
    let count = (u128::from(counts_per_s) * u128::from(period_ns) / 1_000_000_000)
        .clamp(1, u128::from(u32::MAX)) as u32;
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write(REG_LVT_TIMER, LVT_PERIODIC | u32::from(TIMER_VECTOR));
    write(REG_TIMER_INITIAL, count);
    PERIOD_NS.store(period_ns, Ordering::Relaxed);
}

/// Stop the timer (masked, count 0).
pub fn stop_timer() {
    write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    write(REG_TIMER_INITIAL, 0);
}
