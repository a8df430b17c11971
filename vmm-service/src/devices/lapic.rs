//! The local APIC of the (single) vCPU: interrupt acceptance and priority,
//! EOI, the local vector table, self-IPIs and the APIC timer in one-shot,
//! periodic and TSC-deadline modes.
//!
//! Reached through the xAPIC MMIO page at [`LAPIC_BASE`] (32-bit registers
//! on 16-byte boundaries) and, once the guest has switched the APIC to
//! x2APIC mode, through MSRs 0x800-0x8ff ([`Lapic::x2apic_read`]). Linux
//! 6.1 under a hypervisor it does not recognise keeps the xAPIC: without
//! interrupt remapping it enables x2APIC only when the hypervisor vouches
//! for it (`x86_init.hyper.x2apic_available`), so the MMIO page is the
//! path that matters. The timer deadline MSR (IA32_TSC_DEADLINE, 0x6e0)
//! is [`Lapic::write_tsc_deadline`].
//!
//! Time: every method that can observe the timer takes `now_ns`, the VM's
//! device clock in nanoseconds. The timer counts at [`APIC_BUS_HZ`] (1 GHz:
//! one tick per nanosecond before the divider), a frequency the guest
//! learns by calibration against the TSC or from CPUID leaf 0x15's crystal
//! field (docs/DESIGN.md, "Devices"). A periodic timer never fires more
//! often than every [`MIN_PERIOD_NS`], whatever the guest programs: a
//! guard against a guest turning the node into an interrupt pump.
//!
//! Interrupt acceptance follows the SDM's priority rules: a vector in IRR
//! is delivered when its priority class is above the processor priority
//! (PPR = max(TPR, class of the highest in-service vector)); acceptance
//! moves it to ISR; EOI clears the highest ISR bit and, if that vector was
//! level-triggered (TMR), the caller broadcasts the EOI to the I/O APIC.
//! While the APIC is software-disabled (SVR bit 8 clear) fixed interrupts
//! are dropped and every LVT entry stays masked.
//!
//! Reference: Intel SDM vol. 3A, chapter 11 ("Advanced Programmable
//! Interrupt Controller"): 11.4.1 (register map, Table 11-1), 11.5.1 (LVT),
//! 11.5.4 (timer), 11.5.4.1 (TSC-deadline), 11.6.1 (ICR), 11.8.3-11.8.5
//! (IRR/ISR/TMR, priorities, EOI), 11.12 (x2APIC MSR map).

use super::state::{expect_version, DeviceKind, Snapshot, StateError, StateReader, StateWriter};
use alloc::vec::Vec;

/// Guest-physical base of the xAPIC register page (IA32_APIC_BASE).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Bytes of the register page.
pub const LAPIC_PAGE_BYTES: u64 = 0x1000;
/// APIC timer input clock.
pub const APIC_BUS_HZ: u64 = 1_000_000_000;
/// Shortest period of a periodic timer.
pub const MIN_PERIOD_NS: u64 = 50_000;
/// Version register: version 0x14 (integrated APIC), 6 LVT entries (max
/// LVT index 5), no EOI-broadcast suppression.
pub const LAPIC_VERSION: u32 = 0x0005_0014;
/// First x2APIC MSR.
pub const X2APIC_MSR_FIRST: u32 = 0x800;
/// Last x2APIC MSR.
pub const X2APIC_MSR_LAST: u32 = 0x8ff;
/// The TSC-deadline MSR.
pub const IA32_TSC_DEADLINE: u32 = 0x6e0;

const REG_ID: u64 = 0x20;
const REG_VERSION: u64 = 0x30;
const REG_TPR: u64 = 0x80;
const REG_APR: u64 = 0x90;
const REG_PPR: u64 = 0xa0;
const REG_EOI: u64 = 0xb0;
const REG_RRD: u64 = 0xc0;
const REG_LDR: u64 = 0xd0;
const REG_DFR: u64 = 0xe0;
const REG_SVR: u64 = 0xf0;
const REG_ISR: u64 = 0x100;
const REG_TMR: u64 = 0x180;
const REG_IRR: u64 = 0x200;
const REG_ESR: u64 = 0x280;
const REG_ICR_LOW: u64 = 0x300;
const REG_ICR_HIGH: u64 = 0x310;
const REG_LVT_TIMER: u64 = 0x320;
const REG_LVT_ERROR: u64 = 0x370;
const REG_TIMER_INITIAL: u64 = 0x380;
const REG_TIMER_CURRENT: u64 = 0x390;
const REG_TIMER_DIVIDE: u64 = 0x3e0;
/// x2APIC only: self IPI (MSR 0x83f).
const REG_SELF_IPI: u64 = 0x3f0;

const SVR_ENABLE: u32 = 1 << 8;
const SVR_WRITABLE: u32 = 0x3ff;
const LVT_MASKED: u32 = 1 << 16;
/// Writable bits per LVT entry: timer, thermal, performance, LINT0, LINT1,
/// error (SDM Figure 11-8).
const LVT_WRITABLE: [u32; 6] = [
    0x0007_00ff,
    0x0001_07ff,
    0x0001_07ff,
    0x0001_a7ff,
    0x0001_a7ff,
    0x0001_00ff,
];
const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_LINT1: usize = 4;
/// ESR bits: send and receive illegal vector.
const ESR_SEND_ILLEGAL: u32 = 1 << 5;
const ESR_RECEIVE_ILLEGAL: u32 = 1 << 6;
/// ICR bits software can write (low half): vector, delivery mode,
/// destination mode, level, trigger, shorthand.
const ICR_WRITABLE: u32 = 0x000c_cfff;

/// APIC timer modes (LVT timer bits 18:17).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
    /// Encoding 3: reserved; the timer does not run.
    Reserved,
}

/// Why an x2APIC MSR access must fault (#GP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct X2ApicFault;

/// The local APIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lapic {
    id: u32,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: [u32; 8],
    tmr: [u32; 8],
    irr: [u32; 8],
    /// ESR as last latched by a write, and errors since.
    esr: u32,
    esr_pending: u32,
    lvt: [u32; 6],
    icr: u64,
    timer_initial: u32,
    timer_divide: u32,
    /// Device time the count was `timer_start_count`.
    timer_start_ns: u64,
    /// The count at `timer_start_ns` (the initial count, or where a divide
    /// change found it).
    timer_start_count: u32,
    /// Next expiry, if armed.
    timer_next_ns: Option<u64>,
    /// IA32_TSC_DEADLINE as last written (0 = disarmed, or fired).
    tsc_deadline: u64,
    nmi_pending: bool,
    x2apic: bool,
}

impl Lapic {
    /// Saved-state format version.
    pub const STATE_VERSION: u16 = 1;

    /// The APIC of the boot CPU as firmware leaves it: APIC ID `id`,
    /// software-enabled with spurious vector 0xff, LINT0 in ExtINT mode and
    /// LINT1 in NMI mode ("virtual wire", so the 8259 reaches the CPU until
    /// the OS switches to the I/O APIC), every other LVT masked.
    pub fn new(id: u8) -> Self {
        let mut lvt = [LVT_MASKED; 6];
        lvt[LVT_LINT0] = 0x700;
        lvt[LVT_LINT1] = 0x400;
        Self {
            id: u32::from(id),
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: SVR_ENABLE | 0xff,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            esr_pending: 0,
            lvt,
            icr: 0,
            timer_initial: 0,
            timer_divide: 0,
            timer_start_ns: 0,
            timer_start_count: 0,
            timer_next_ns: None,
            tsc_deadline: 0,
            nmi_pending: false,
            x2apic: false,
        }
    }

    fn enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    fn highest(bits: &[u32; 8]) -> Option<u8> {
        (0..8)
            .rev()
            .find(|&i| bits[i] != 0)
            .map(|i| (i as u32 * 32 + 31 - bits[i].leading_zeros()) as u8)
    }

    fn set_bit(bits: &mut [u32; 8], v: u8) {
        bits[usize::from(v >> 5)] |= 1 << (v & 31);
    }
    fn clear_bit(bits: &mut [u32; 8], v: u8) {
        bits[usize::from(v >> 5)] &= !(1 << (v & 31));
    }
    fn test_bit(bits: &[u32; 8], v: u8) -> bool {
        bits[usize::from(v >> 5)] & (1 << (v & 31)) != 0
    }

    /// Processor priority (SDM 11.8.3.1).
    fn ppr(&self) -> u32 {
        let isrv = Self::highest(&self.isr).map_or(0, u32::from);
        if (self.tpr & 0xf0) >= (isrv & 0xf0) {
            self.tpr & 0xff
        } else {
            isrv & 0xf0
        }
    }

    /// The vector the APIC would present to the CPU now, if any.
    pub fn pending_vector(&self) -> Option<u8> {
        let v = Self::highest(&self.irr)?;
        (u32::from(v) & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    /// The CPU took `vector` (from [`Lapic::pending_vector`]): IRR -> ISR.
    pub fn acknowledge(&mut self, vector: u8) {
        Self::clear_bit(&mut self.irr, vector);
        Self::set_bit(&mut self.isr, vector);
    }

    /// A fixed (or lowest-priority) interrupt arrives. Vectors 0-15 are
    /// illegal (ESR); a software-disabled APIC drops it.
    pub fn accept(&mut self, vector: u8, level: bool) {
        if vector < 16 {
            self.esr_pending |= ESR_RECEIVE_ILLEGAL;
            return;
        }
        if !self.enabled() {
            return;
        }
        Self::set_bit(&mut self.irr, vector);
        if level {
            Self::set_bit(&mut self.tmr, vector);
        } else {
            Self::clear_bit(&mut self.tmr, vector);
        }
    }

    /// An NMI arrives.
    pub fn accept_nmi(&mut self) {
        self.nmi_pending = true;
    }

    /// Take a pending NMI (the caller injects it).
    pub fn take_nmi(&mut self) -> bool {
        core::mem::take(&mut self.nmi_pending)
    }

    /// Whether an NMI is waiting.
    pub fn nmi_pending(&self) -> bool {
        self.nmi_pending
    }

    /// Whether LINT0 passes the 8259's INTR to the CPU (ExtINT, unmasked).
    pub fn accepts_pic(&self) -> bool {
        let l = self.lvt[LVT_LINT0];
        l & LVT_MASKED == 0 && (l >> 8) & 7 == 7
    }

    /// Whether a message for `dest` in physical or logical mode reaches this
    /// APIC (SDM 11.6.2).
    pub fn matches(&self, dest: u8, logical: bool) -> bool {
        if !logical {
            return u32::from(dest) == self.id || dest == 0xff;
        }
        if self.x2apic {
            // 8-bit destinations of the I/O APIC cannot name an x2APIC
            // cluster beyond 0: compare the low byte of the logical ID.
            return (self.x2apic_ldr() as u8) & dest != 0;
        }
        let logical_id = (self.ldr >> 24) as u8;
        if dest == 0xff {
            return true;
        }
        match self.dfr >> 28 {
            // Flat model: a bit mask.
            0xf => logical_id & dest != 0,
            // Cluster model: cluster in the high nibble, mask in the low.
            _ => (logical_id >> 4) == (dest >> 4) && (logical_id & dest & 0x0f) != 0,
        }
    }

    fn x2apic_ldr(&self) -> u32 {
        ((self.id >> 4) << 16) | (1 << (self.id & 0xf))
    }

    fn timer_mode(&self) -> TimerMode {
        match (self.lvt[LVT_TIMER] >> 17) & 3 {
            0 => TimerMode::OneShot,
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::Reserved,
        }
    }

    /// Timer input divider from the divide configuration register (SDM
    /// Figure 11-10).
    fn divisor(&self) -> u64 {
        let code = ((self.timer_divide & 8) >> 1) | (self.timer_divide & 3);
        1 << ((code + 1) & 7)
    }

    fn ns_per_count(&self) -> u64 {
        self.divisor() * (1_000_000_000 / APIC_BUS_HZ)
    }

    fn period_ns(&self) -> u64 {
        u64::from(self.timer_initial) * self.ns_per_count()
    }

    /// Current count register: counting down from `timer_start_count`,
    /// then (periodic) from the initial count again.
    fn current_count(&self, now_ns: u64) -> u32 {
        if self.timer_initial == 0 {
            return 0;
        }
        let ticks = now_ns.saturating_sub(self.timer_start_ns) / self.ns_per_count();
        let start = u64::from(self.timer_start_count);
        match self.timer_mode() {
            TimerMode::OneShot => start.saturating_sub(ticks) as u32,
            TimerMode::Periodic if ticks < start => (start - ticks) as u32,
            TimerMode::Periodic => {
                let initial = u64::from(self.timer_initial);
                (initial - (ticks - start) % initial) as u32
            }
            _ => 0,
        }
    }

    /// Count down from `count` starting now.
    fn start_timer(&mut self, now_ns: u64, count: u32) {
        self.timer_start_ns = now_ns;
        self.timer_start_count = count;
        self.timer_next_ns = match self.timer_mode() {
            TimerMode::OneShot | TimerMode::Periodic if self.timer_initial != 0 => {
                let mut ns = u64::from(count) * self.ns_per_count();
                if self.timer_mode() == TimerMode::Periodic {
                    ns = ns.max(MIN_PERIOD_NS);
                }
                Some(now_ns.saturating_add(ns))
            }
            _ => None,
        };
    }

    fn fire_timer(&mut self) {
        let lvt = self.lvt[LVT_TIMER];
        if lvt & LVT_MASKED == 0 {
            self.accept(lvt as u8, false);
        }
    }

    /// Run the timer up to `now_ns`: fire what expired. A periodic timer
    /// that fell several periods behind fires once and keeps its phase.
    pub fn advance(&mut self, now_ns: u64) {
        let Some(next) = self.timer_next_ns else {
            return;
        };
        if now_ns < next {
            return;
        }
        self.fire_timer();
        match self.timer_mode() {
            TimerMode::Periodic if self.timer_initial != 0 => {
                let period = self.period_ns().max(MIN_PERIOD_NS);
                let missed = (now_ns - next) / period + 1;
                self.timer_next_ns = Some(next.saturating_add(missed.saturating_mul(period)));
            }
            TimerMode::TscDeadline => {
                self.tsc_deadline = 0;
                self.timer_next_ns = None;
            }
            _ => self.timer_next_ns = None,
        }
    }

    /// When [`Lapic::advance`] next has work, if ever.
    pub fn next_event_ns(&self) -> Option<u64> {
        self.timer_next_ns
    }

    /// RDMSR IA32_TSC_DEADLINE: the armed deadline, 0 when disarmed or not
    /// in TSC-deadline mode.
    pub fn read_tsc_deadline(&self) -> u64 {
        match self.timer_mode() {
            TimerMode::TscDeadline => self.tsc_deadline,
            _ => 0,
        }
    }

    /// WRMSR IA32_TSC_DEADLINE of `deadline` (guest TSC units) at device
    /// time `now_ns`, when the guest's TSC reads `guest_tsc` and runs at
    /// `tsc_khz`. Ignored outside TSC-deadline mode (SDM 11.5.4.1); 0
    /// disarms; a deadline already passed fires at the next advance.
    pub fn write_tsc_deadline(&mut self, now_ns: u64, deadline: u64, guest_tsc: u64, tsc_khz: u64) {
        if self.timer_mode() != TimerMode::TscDeadline {
            return;
        }
        self.tsc_deadline = deadline;
        if deadline == 0 {
            self.timer_next_ns = None;
            return;
        }
        let ahead_ticks = deadline.saturating_sub(guest_tsc);
        let ahead_ns = if tsc_khz == 0 {
            0
        } else {
            // ticks * 1e6 / kHz, in 128 bits: no overflow for any u64.
            (u128::from(ahead_ticks) * 1_000_000 / u128::from(tsc_khz)).min(u128::from(u64::MAX))
                as u64
        };
        self.timer_next_ns = Some(now_ns.saturating_add(ahead_ns));
    }

    /// EOI: retire the highest in-service vector. Returns it if it was
    /// level-triggered (the caller broadcasts the EOI to the I/O APIC).
    fn eoi(&mut self) -> Option<u8> {
        let v = Self::highest(&self.isr)?;
        Self::clear_bit(&mut self.isr, v);
        Self::test_bit(&self.tmr, v).then(|| {
            Self::clear_bit(&mut self.tmr, v);
            v
        })
    }

    /// The ICR was written: deliver the IPI if it targets this CPU.
    fn send_ipi(&mut self) {
        let low = self.icr as u32;
        let vector = low as u8;
        let mode = (low >> 8) & 7;
        let shorthand = (low >> 18) & 3;
        let to_self = match shorthand {
            0 => {
                let dest = if self.x2apic {
                    (self.icr >> 32) as u32
                } else {
                    (self.icr >> 56) as u32
                };
                let logical = low & (1 << 11) != 0;
                if self.x2apic && !logical {
                    dest == self.id || dest == 0xffff_ffff
                } else {
                    self.matches(dest as u8, logical)
                }
            }
            1 | 2 => true,
            _ => false,
        };
        if !to_self {
            // No other CPUs: INIT/SIPI/IPIs to others go nowhere.
            return;
        }
        match mode {
            0 | 1 => {
                if vector < 16 {
                    self.esr_pending |= ESR_SEND_ILLEGAL;
                } else {
                    self.accept(vector, false);
                }
            }
            4 => self.nmi_pending = true,
            _ => {}
        }
    }

    fn read_register(&self, offset: u64, now_ns: u64) -> u32 {
        match offset {
            REG_ID => {
                if self.x2apic {
                    self.id
                } else {
                    self.id << 24
                }
            }
            REG_VERSION => LAPIC_VERSION,
            REG_TPR => self.tpr,
            REG_APR | REG_RRD | REG_EOI => 0,
            REG_PPR => self.ppr(),
            REG_LDR => {
                if self.x2apic {
                    self.x2apic_ldr()
                } else {
                    self.ldr
                }
            }
            REG_DFR => self.dfr,
            REG_SVR => self.svr,
            0x100..=0x170 => self.isr[((offset - REG_ISR) >> 4) as usize],
            0x180..=0x1f0 => self.tmr[((offset - REG_TMR) >> 4) as usize],
            0x200..=0x270 => self.irr[((offset - REG_IRR) >> 4) as usize],
            REG_ESR => self.esr,
            REG_ICR_LOW => self.icr as u32,
            REG_ICR_HIGH => (self.icr >> 32) as u32,
            REG_LVT_TIMER..=REG_LVT_ERROR => self.lvt[((offset - REG_LVT_TIMER) >> 4) as usize],
            REG_TIMER_INITIAL => self.timer_initial,
            REG_TIMER_CURRENT => self.current_count(now_ns),
            REG_TIMER_DIVIDE => self.timer_divide,
            _ => 0,
        }
    }

    /// Write a register; returns a level-triggered vector an EOI retired.
    fn write_register(&mut self, offset: u64, value: u32, now_ns: u64) -> Option<u8> {
        match offset {
            REG_ID if !self.x2apic => self.id = value >> 24,
            REG_TPR => self.tpr = value & 0xff,
            REG_EOI => return self.eoi(),
            REG_LDR if !self.x2apic => self.ldr = value & 0xff00_0000,
            REG_DFR if !self.x2apic => self.dfr = value | 0x0fff_ffff,
            REG_SVR => {
                self.svr = value & SVR_WRITABLE;
                if !self.enabled() {
                    for l in &mut self.lvt {
                        *l |= LVT_MASKED;
                    }
                }
            }
            REG_ESR => {
                self.esr = core::mem::take(&mut self.esr_pending);
            }
            REG_ICR_LOW => {
                self.icr = (self.icr & !0xffff_ffff) | u64::from(value & ICR_WRITABLE);
                self.send_ipi();
            }
            REG_ICR_HIGH if !self.x2apic => {
                self.icr = (self.icr & 0xffff_ffff) | (u64::from(value & 0xff00_0000) << 32);
            }
            REG_LVT_TIMER..=REG_LVT_ERROR => {
                let i = ((offset - REG_LVT_TIMER) >> 4) as usize;
                let mut v = value & LVT_WRITABLE[i];
                if !self.enabled() {
                    v |= LVT_MASKED;
                }
                let old_mode = self.timer_mode();
                self.lvt[i] = v;
                if i == LVT_TIMER && self.timer_mode() != old_mode {
                    // A mode change disarms the timer (SDM 11.5.4.1).
                    self.timer_initial = 0;
                    self.timer_start_count = 0;
                    self.timer_next_ns = None;
                    self.tsc_deadline = 0;
                }
            }
            REG_TIMER_INITIAL => {
                if matches!(self.timer_mode(), TimerMode::OneShot | TimerMode::Periodic) {
                    self.timer_initial = value;
                    self.start_timer(now_ns, value);
                }
            }
            REG_TIMER_DIVIDE => {
                // The count continues from where it is, at the new rate.
                let current = self.current_count(now_ns);
                self.timer_divide = value & 0xb;
                if self.timer_next_ns.is_some()
                    && self.timer_initial != 0
                    && matches!(self.timer_mode(), TimerMode::OneShot | TimerMode::Periodic)
                {
                    self.start_timer(now_ns, current);
                }
            }
            REG_SELF_IPI if self.x2apic => {
                let v = value as u8;
                if v < 16 {
                    self.esr_pending |= ESR_SEND_ILLEGAL;
                } else {
                    self.accept(v, false);
                }
            }
            _ => {}
        }
        None
    }

    /// Guest read of the 32-bit register at `offset` of the MMIO page
    /// (registers sit on 16-byte boundaries; other offsets read 0). In
    /// x2APIC mode the page is not decoded: all-ones.
    pub fn mmio_read(&self, offset: u64, now_ns: u64) -> u32 {
        if self.x2apic {
            return u32::MAX;
        }
        if offset & 0xf != 0 {
            return 0;
        }
        self.read_register(offset, now_ns)
    }

    /// Guest write to the MMIO page; returns a level-triggered vector whose
    /// EOI the caller must broadcast to the I/O APIC.
    pub fn mmio_write(&mut self, offset: u64, value: u32, now_ns: u64) -> Option<u8> {
        if self.x2apic || offset & 0xf != 0 || offset == REG_SELF_IPI {
            return None;
        }
        self.write_register(offset, value, now_ns)
    }

    /// Switch between xAPIC and x2APIC register interfaces (IA32_APIC_BASE
    /// bit 10, kept by the MSR policy).
    pub fn set_x2apic(&mut self, on: bool) {
        self.x2apic = on;
    }

    /// RDMSR of an x2APIC register (SDM 11.12.1.2).
    pub fn x2apic_read(&self, msr: u32, now_ns: u64) -> Result<u64, X2ApicFault> {
        let offset = self.x2apic_offset(msr)?;
        match offset {
            REG_EOI | REG_SELF_IPI | REG_DFR | REG_ICR_HIGH => Err(X2ApicFault),
            REG_ICR_LOW => Ok(self.icr),
            _ => Ok(u64::from(self.read_register(offset, now_ns))),
        }
    }

    /// WRMSR of an x2APIC register; `Ok(Some(v))` as for
    /// [`Lapic::mmio_write`].
    pub fn x2apic_write(
        &mut self,
        msr: u32,
        value: u64,
        now_ns: u64,
    ) -> Result<Option<u8>, X2ApicFault> {
        let offset = self.x2apic_offset(msr)?;
        let read_only = matches!(
            offset,
            REG_ID | REG_VERSION | REG_PPR | REG_LDR | REG_DFR | REG_ICR_HIGH | REG_TIMER_CURRENT
        ) || (0x100..=0x270).contains(&offset);
        if read_only || (offset != REG_ICR_LOW && value >> 32 != 0) {
            return Err(X2ApicFault);
        }
        if offset == REG_EOI && value != 0 {
            return Err(X2ApicFault);
        }
        if offset == REG_ICR_LOW {
            self.icr = value & (0xffff_ffff_0000_0000 | u64::from(ICR_WRITABLE));
            self.send_ipi();
            return Ok(None);
        }
        Ok(self.write_register(offset, value as u32, now_ns))
    }

    fn x2apic_offset(&self, msr: u32) -> Result<u64, X2ApicFault> {
        if !self.x2apic || !(X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&msr) {
            return Err(X2ApicFault);
        }
        let offset = u64::from(msr - X2APIC_MSR_FIRST) << 4;
        let known = matches!(
            offset,
            REG_ID
                | REG_VERSION
                | REG_TPR
                | REG_PPR
                | REG_EOI
                | REG_LDR
                | REG_SVR
                | REG_ESR
                | REG_ICR_LOW
                | REG_TIMER_INITIAL
                | REG_TIMER_CURRENT
                | REG_TIMER_DIVIDE
                | REG_SELF_IPI
        ) || (0x100..=0x270).contains(&offset)
            || (REG_LVT_TIMER..=REG_LVT_ERROR).contains(&offset);
        if known {
            Ok(offset)
        } else {
            Err(X2ApicFault)
        }
    }
}

impl Snapshot for Lapic {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Lapic
    }
    fn state_version(&self) -> u16 {
        Self::STATE_VERSION
    }
    fn save_state(&self, out: &mut Vec<u8>) {
        let mut w = StateWriter::new(out);
        w.u32(self.id)
            .u32(self.tpr)
            .u32(self.ldr)
            .u32(self.dfr)
            .u32(self.svr);
        for bits in [&self.isr, &self.tmr, &self.irr] {
            for word in bits {
                w.u32(*word);
            }
        }
        w.u32(self.esr).u32(self.esr_pending);
        for l in self.lvt {
            w.u32(l);
        }
        w.u64(self.icr)
            .u32(self.timer_initial)
            .u32(self.timer_divide)
            .u64(self.timer_start_ns)
            .u32(self.timer_start_count)
            .opt_u64(self.timer_next_ns)
            .u64(self.tsc_deadline)
            .bool(self.nmi_pending)
            .bool(self.x2apic);
    }
    fn restore_state(&mut self, version: u16, bytes: &[u8]) -> Result<(), StateError> {
        expect_version("local APIC", version, Self::STATE_VERSION)?;
        let mut r = StateReader::new(bytes);
        let id = r.u32()?;
        let tpr = r.u32_masked("TPR", 0xff)?;
        let ldr = r.u32()?;
        let dfr = r.u32()?;
        let svr = r.u32_masked("SVR", SVR_WRITABLE)?;
        let mut read_bits = || -> Result<[u32; 8], StateError> {
            let mut b = [0u32; 8];
            for w in &mut b {
                *w = r.u32()?;
            }
            Ok(b)
        };
        let isr = read_bits()?;
        let tmr = read_bits()?;
        let irr = read_bits()?;
        // Vectors 0-15 can never be pending or in service.
        if (isr[0] | irr[0]) & 0xffff != 0 {
            return Err(StateError::BadValue {
                what: "APIC vector below 16",
                value: u64::from(isr[0] | irr[0]),
            });
        }
        let esr = r.u32_masked("ESR", ESR_SEND_ILLEGAL | ESR_RECEIVE_ILLEGAL)?;
        let esr_pending = r.u32_masked("ESR", ESR_SEND_ILLEGAL | ESR_RECEIVE_ILLEGAL)?;
        let mut lvt = [0u32; 6];
        for (i, l) in lvt.iter_mut().enumerate() {
            *l = r.u32_masked("LVT entry", LVT_WRITABLE[i])?;
        }
        let icr = r.u64()?;
        if (icr as u32) & !ICR_WRITABLE != 0 {
            return Err(StateError::BadValue {
                what: "ICR",
                value: icr,
            });
        }
        let timer_initial = r.u32()?;
        let timer_divide = r.u32_masked("timer divide", 0xb)?;
        let timer_start_ns = r.u64()?;
        let timer_start_count = r.u32()?;
        if timer_start_count > timer_initial {
            return Err(StateError::BadValue {
                what: "timer count",
                value: u64::from(timer_start_count),
            });
        }
        let timer_next_ns = r.opt_u64("timer deadline")?;
        let tsc_deadline = r.u64()?;
        let nmi_pending = r.bool("NMI pending")?;
        let x2apic = r.bool("x2APIC mode")?;
        r.finish()?;
        if !x2apic && (ldr & 0x00ff_ffff != 0 || dfr | 0xf000_0000 != 0xffff_ffff) {
            return Err(StateError::BadValue {
                what: "LDR/DFR",
                value: (u64::from(ldr) << 32) | u64::from(dfr),
            });
        }
        *self = Self {
            id,
            tpr,
            ldr,
            dfr,
            svr,
            isr,
            tmr,
            irr,
            esr,
            esr_pending,
            lvt,
            icr,
            timer_initial,
            timer_divide,
            timer_start_ns,
            timer_start_count,
            timer_next_ns,
            tsc_deadline,
            nmi_pending,
            x2apic,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(a: &mut Lapic, off: u64, v: u32, now: u64) -> Option<u8> {
        a.mmio_write(off, v, now)
    }
    fn r(a: &Lapic, off: u64, now: u64) -> u32 {
        a.mmio_read(off, now)
    }

    #[test]
    fn identification_and_reset_state() {
        let a = Lapic::new(0);
        assert_eq!(r(&a, REG_ID, 0), 0);
        assert_eq!(r(&a, REG_VERSION, 0), 0x50014);
        assert_eq!(r(&a, REG_SVR, 0), 0x1ff);
        assert_eq!(r(&a, 0x350, 0), 0x700, "LINT0 ExtINT (virtual wire)");
        assert_eq!(r(&a, 0x360, 0), 0x400, "LINT1 NMI");
        assert_eq!(r(&a, REG_LVT_TIMER, 0), LVT_MASKED);
        assert_eq!(r(&a, REG_DFR, 0), 0xffff_ffff);
        assert!(a.accepts_pic());
        assert_eq!(r(&a, 0x24, 0), 0, "unaligned offsets read 0");
        assert_eq!(Lapic::new(3).mmio_read(REG_ID, 0), 0x0300_0000);
    }

    #[test]
    fn priority_acceptance_and_eoi() {
        let mut a = Lapic::new(0);
        a.accept(0x31, false);
        a.accept(0x51, true);
        assert_eq!(a.pending_vector(), Some(0x51));
        a.acknowledge(0x51);
        assert_eq!(r(&a, REG_PPR, 0), 0x50);
        // 0x31's class is below the in-service 0x51: held.
        assert_eq!(a.pending_vector(), None);
        a.accept(0x62, false);
        assert_eq!(a.pending_vector(), Some(0x62), "higher class nests");
        a.acknowledge(0x62);
        assert_eq!(w(&mut a, REG_EOI, 0, 0), None, "0x62 edge: no broadcast");
        assert_eq!(w(&mut a, REG_EOI, 0, 0), Some(0x51), "level: broadcast");
        assert_eq!(a.pending_vector(), Some(0x31));
        // TPR blocks classes at or below it.
        w(&mut a, REG_TPR, 0x30, 0);
        assert_eq!(a.pending_vector(), None);
        w(&mut a, REG_TPR, 0x20, 0);
        assert_eq!(a.pending_vector(), Some(0x31));
        a.acknowledge(0x31);
        assert_eq!(r(&a, REG_ISR + 0x10, 0), 1 << 17);
        assert_eq!(r(&a, REG_IRR + 0x10, 0), 0);
        assert_eq!(w(&mut a, REG_EOI, 0, 0), None);
        assert_eq!(
            w(&mut a, REG_EOI, 0, 0),
            None,
            "EOI with nothing in service"
        );
    }

    #[test]
    fn illegal_vectors_set_esr_and_disabled_apic_drops() {
        let mut a = Lapic::new(0);
        a.accept(5, false);
        assert_eq!(a.pending_vector(), None);
        assert_eq!(r(&a, REG_ESR, 0), 0, "latched only by an ESR write");
        w(&mut a, REG_ESR, 0, 0);
        assert_eq!(r(&a, REG_ESR, 0), ESR_RECEIVE_ILLEGAL);
        w(&mut a, REG_ESR, 0, 0);
        assert_eq!(r(&a, REG_ESR, 0), 0);
        w(&mut a, REG_SVR, 0xff, 0);
        assert_eq!(r(&a, 0x350, 0) & LVT_MASKED, LVT_MASKED, "LVTs masked");
        assert!(!a.accepts_pic());
        a.accept(0x40, false);
        assert_eq!(a.pending_vector(), None);
        w(&mut a, 0x350, 0x700, 0);
        assert_eq!(r(&a, 0x350, 0), 0x10700, "cannot unmask while disabled");
        w(&mut a, REG_SVR, 0x1ff, 0);
        w(&mut a, 0x350, 0x700, 0);
        assert!(a.accepts_pic());
    }

    #[test]
    fn one_shot_timer_counts_and_fires_once() {
        let mut a = Lapic::new(0);
        w(&mut a, REG_TIMER_DIVIDE, 0x3, 0); // divide by 16
        w(&mut a, REG_LVT_TIMER, 0xec, 0);
        w(&mut a, REG_TIMER_INITIAL, 1000, 100);
        assert_eq!(r(&a, REG_TIMER_CURRENT, 100), 1000);
        assert_eq!(r(&a, REG_TIMER_CURRENT, 100 + 160), 990);
        assert_eq!(a.next_event_ns(), Some(100 + 16_000));
        a.advance(100 + 15_999);
        assert_eq!(a.pending_vector(), None);
        a.advance(100 + 16_000);
        assert_eq!(a.pending_vector(), Some(0xec));
        assert_eq!(a.next_event_ns(), None);
        assert_eq!(r(&a, REG_TIMER_CURRENT, 50_000), 0);
        // Masked timer: counts, does not interrupt.
        let mut a = Lapic::new(0);
        w(&mut a, REG_LVT_TIMER, 0x100ec, 0);
        w(&mut a, REG_TIMER_INITIAL, 10, 0);
        a.advance(1_000);
        assert_eq!(a.pending_vector(), None);
        // Initial count 0 stops it.
        w(&mut a, REG_TIMER_INITIAL, 0, 0);
        assert_eq!(a.next_event_ns(), None);
    }

    #[test]
    fn periodic_timer_keeps_its_phase() {
        let mut a = Lapic::new(0);
        w(&mut a, REG_TIMER_DIVIDE, 0xb, 0); // divide by 1
        w(&mut a, REG_LVT_TIMER, (1 << 17) | 0xef, 0);
        w(&mut a, REG_TIMER_INITIAL, 1_000_000, 0); // 1 ms
        assert_eq!(r(&a, REG_TIMER_CURRENT, 250_000), 750_000);
        assert_eq!(r(&a, REG_TIMER_CURRENT, 1_250_000), 750_000);
        a.advance(1_000_000);
        assert_eq!(a.pending_vector(), Some(0xef));
        assert_eq!(a.next_event_ns(), Some(2_000_000));
        a.acknowledge(0xef);
        w(&mut a, REG_EOI, 0, 0);
        // Late by 3.5 periods: one interrupt, next on the original grid.
        a.advance(5_500_000);
        assert_eq!(a.pending_vector(), Some(0xef));
        assert_eq!(a.next_event_ns(), Some(6_000_000));
        // A tiny period is clamped.
        w(&mut a, REG_TIMER_INITIAL, 1, 10_000_000);
        assert_eq!(a.next_event_ns(), Some(10_000_000 + MIN_PERIOD_NS));
        // Mode change disarms, and leaves a state that migrates (a count
        // left over from the old mode was refused by restore once).
        w(&mut a, REG_LVT_TIMER, 0xef, 10_000_000);
        assert_eq!(a.next_event_ns(), None);
        assert_eq!(r(&a, REG_TIMER_INITIAL, 0), 0);
        assert_eq!(r(&a, REG_TIMER_CURRENT, 10_000_000), 0);
        let mut s = Vec::new();
        a.save_state(&mut s);
        let mut b = Lapic::new(0);
        b.restore_state(Lapic::STATE_VERSION, &s).unwrap();
        assert_eq!(b, a);
    }

    #[test]
    fn divide_change_keeps_the_count() {
        let mut a = Lapic::new(0);
        w(&mut a, REG_TIMER_DIVIDE, 0xb, 0); // by 1
        w(&mut a, REG_LVT_TIMER, 0xe0, 0);
        w(&mut a, REG_TIMER_INITIAL, 1000, 0);
        w(&mut a, REG_TIMER_DIVIDE, 0x0, 400); // by 2, 600 left
        assert_eq!(r(&a, REG_TIMER_CURRENT, 400), 600);
        assert_eq!(a.next_event_ns(), Some(400 + 1200));
        for (code, div) in [
            (0, 2),
            (1, 4),
            (2, 8),
            (3, 16),
            (8, 32),
            (9, 64),
            (10, 128),
            (11, 1),
        ] {
            let mut a = Lapic::new(0);
            w(&mut a, REG_TIMER_DIVIDE, code, 0);
            assert_eq!(a.divisor(), div);
        }
    }

    #[test]
    fn tsc_deadline_mode() {
        let mut a = Lapic::new(0);
        // Not in TSC-deadline mode: ignored.
        a.write_tsc_deadline(0, 5000, 1000, 2_000_000);
        assert_eq!(a.read_tsc_deadline(), 0);
        w(&mut a, REG_LVT_TIMER, (2 << 17) | 0xec, 0);
        // 2 GHz TSC: 4000 ticks ahead = 2000 ns.
        a.write_tsc_deadline(100, 5000, 1000, 2_000_000);
        assert_eq!(a.read_tsc_deadline(), 5000);
        assert_eq!(a.next_event_ns(), Some(2100));
        // TMICT writes do nothing in this mode.
        w(&mut a, REG_TIMER_INITIAL, 5, 100);
        assert_eq!(r(&a, REG_TIMER_INITIAL, 100), 0);
        a.advance(2100);
        assert_eq!(a.pending_vector(), Some(0xec));
        assert_eq!(a.read_tsc_deadline(), 0, "cleared when it fires");
        // In the past: fires at once.
        a.write_tsc_deadline(3000, 10, 1000, 2_000_000);
        assert_eq!(a.next_event_ns(), Some(3000));
        a.write_tsc_deadline(3000, 0, 1000, 2_000_000);
        assert_eq!(a.next_event_ns(), None);
        // Huge values do not overflow.
        a.write_tsc_deadline(u64::MAX - 5, u64::MAX, 0, 1);
        assert_eq!(a.next_event_ns(), Some(u64::MAX));
    }

    #[test]
    fn self_ipis_and_destinations() {
        let mut a = Lapic::new(0);
        w(&mut a, REG_ICR_LOW, (1 << 18) | 0x80, 0); // self, fixed
        assert_eq!(a.pending_vector(), Some(0x80));
        w(&mut a, REG_ICR_LOW, (3 << 18) | 0x81, 0); // all but self
        assert_eq!(r(&a, REG_IRR + 0x40, 0), 1);
        w(&mut a, REG_ICR_HIGH, 0x0100_0000, 0);
        w(&mut a, REG_ICR_LOW, 0x82, 0); // physical dest 1: not us
        w(&mut a, REG_ICR_HIGH, 0, 0);
        w(&mut a, REG_ICR_LOW, 0x400, 0); // NMI to self
        assert!(a.take_nmi());
        assert!(!a.take_nmi());
        assert_eq!(r(&a, REG_ICR_LOW, 0) & (1 << 12), 0, "never busy");
        w(&mut a, REG_ICR_LOW, (1 << 18) | 0x05, 0);
        w(&mut a, REG_ESR, 0, 0);
        assert_eq!(r(&a, REG_ESR, 0), ESR_SEND_ILLEGAL);
        // Logical flat: LDR bit 0.
        w(&mut a, REG_LDR, 0x0100_0000, 0);
        assert!(a.matches(0x01, true) && a.matches(0x03, true));
        assert!(!a.matches(0x02, true));
        assert!(a.matches(0, false) && a.matches(0xff, false));
        assert!(!a.matches(1, false));
        // Cluster model.
        w(&mut a, REG_DFR, 0x0fff_ffff, 0);
        w(&mut a, REG_LDR, 0x2100_0000, 0);
        assert!(a.matches(0x21, true) && a.matches(0x23, true));
        assert!(!a.matches(0x11, true));
        assert_eq!(r(&a, REG_DFR, 0), 0x0fff_ffff);
    }

    #[test]
    fn x2apic_msrs() {
        let mut a = Lapic::new(0);
        assert_eq!(
            a.x2apic_read(0x802, 0),
            Err(X2ApicFault),
            "off in xAPIC mode"
        );
        a.set_x2apic(true);
        assert_eq!(a.mmio_read(REG_VERSION, 0), u32::MAX);
        assert_eq!(a.x2apic_read(0x803, 0), Ok(u64::from(LAPIC_VERSION)));
        assert_eq!(a.x2apic_read(0x80d, 0), Ok(1), "LDR derived from the ID");
        assert_eq!(a.x2apic_read(0x80e, 0), Err(X2ApicFault), "no DFR");
        assert_eq!(
            a.x2apic_write(0x802, 5, 0),
            Err(X2ApicFault),
            "ID read-only"
        );
        assert_eq!(
            a.x2apic_write(0x80b, 1, 0),
            Err(X2ApicFault),
            "EOI of non-zero"
        );
        assert_eq!(a.x2apic_write(0x83f, 0x91, 0), Ok(None));
        assert_eq!(a.pending_vector(), Some(0x91));
        a.acknowledge(0x91);
        assert_eq!(a.x2apic_write(0x80b, 0, 0), Ok(None));
        assert_eq!(a.x2apic_write(0x830, 0x0000_0000_0004_0092, 0), Ok(None));
        assert_eq!(a.pending_vector(), Some(0x92));
        assert_eq!(a.x2apic_read(0x830, 0), Ok(0x40092));
        assert_eq!(a.x2apic_write(0x808, 1 << 32, 0), Err(X2ApicFault));
        assert_eq!(a.x2apic_read(0x8ff, 0), Err(X2ApicFault));
        assert_eq!(a.x2apic_read(0x900, 0), Err(X2ApicFault));
    }

    #[test]
    fn save_restore() {
        let mut a = Lapic::new(0);
        w(&mut a, REG_LVT_TIMER, (1 << 17) | 0xef, 0);
        w(&mut a, REG_TIMER_INITIAL, 5000, 7);
        a.accept(0x40, true);
        a.acknowledge(0x40);
        a.accept(0x41, false);
        w(&mut a, REG_LDR, 0x0100_0000, 0);
        let mut s = Vec::new();
        a.save_state(&mut s);
        let mut b = Lapic::new(0);
        b.restore_state(1, &s).unwrap();
        assert_eq!(b, a);
        for n in 0..s.len() {
            assert!(b.restore_state(1, &s[..n]).is_err());
        }
        assert_eq!(b, a);
        let mut bad = s.clone();
        bad[20] = 1; // ISR bit for vector 0
        assert!(Lapic::new(0).restore_state(1, &bad).is_err());
        assert!(Lapic::new(0).restore_state(2, &s).is_err());
    }

    /// Random MMIO traffic and time never panic; IRR and ISR never hold a
    /// vector below 16.
    #[test]
    fn random_programming_never_panics() {
        let mut rng = 0xda94_2042_e4dd_58b5u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut a = Lapic::new(0);
        let mut now = 0u64;
        for _ in 0..50_000 {
            let x = next();
            now = now.saturating_add(x % 3000);
            let off = ((x >> 8) % 0x1000) & !0x3;
            match x % 6 {
                0 | 1 => {
                    a.mmio_write(off, (x >> 24) as u32, now);
                }
                2 => {
                    a.mmio_read(off, now);
                }
                3 => a.advance(now),
                4 => {
                    if let Some(v) = a.pending_vector() {
                        a.acknowledge(v);
                    }
                }
                _ => {
                    a.set_x2apic(x & 0x100 != 0);
                    let _ = a.x2apic_write(0x800 + (x >> 20) as u32 % 0x100, x >> 30, now);
                    let _ = a.x2apic_read(0x800 + (x >> 40) as u32 % 0x100, now);
                    a.write_tsc_deadline(now, x >> 3, x >> 5, (x >> 50) % 5_000_000);
                }
            }
            assert_eq!((a.irr[0] | a.isr[0]) & 0xffff, 0);
        }
    }
}
