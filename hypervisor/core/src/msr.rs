//! The guest's MSR view: a small fixed table, written once for every
//! vendor.
//!
//! Three kinds of MSR:
//! * **fixed**: values the policy supplies itself (APIC base, MTRR
//!   capability and default type, MISC_ENABLE, microcode revision); writes
//!   are accepted and dropped where real hardware would accept them;
//! * **delegated**: architectural state the backend keeps in its VMCB/VMCS
//!   or save area (EFER, PAT, SYSCALL/SYSENTER, segment bases, TSC,
//!   TSC_AUX). Written values are checked here first (reserved bits,
//!   canonical addresses), since a backend copies them into hardware state
//!   and a bad value there fails the next VM entry instead of faulting the
//!   guest;
//! * **device**: registers of an emulated device that the guest reaches
//!   through an MSR (IA32_TSC_DEADLINE, the local APIC timer's deadline):
//!   [`crate::exit::handle`] hands them to the caller, whose device models
//!   answer (a VM without a local APIC faults them);
//! * **everything else**: `#GP(0)`, like a CPU without that MSR. The
//!   x2APIC range (0x800-0x8FF) is in it: CPUID shows no x2APIC, and an
//!   x2APIC MSR access on a CPU in xAPIC mode faults.
//!
//! Numbers and layouts: Intel SDM vol. 4 (Table 2-2, architectural MSRs)
//! and AMD APM vol. 2, Appendix A. The numbers are plain `u32` constants
//! here rather than the `x86_64` crate's `Msr` values: that type hides its
//! number, and the guest-facing table must match on it. The platform reads
//! and writes MSRs through the crate's `Msr`.

use crate::vcpu::Vcpu;
use crate::x86::EFER_GUEST;
pub use crate::x86::{is_canonical, is_valid_pat};

pub const IA32_TSC: u32 = 0x10;
pub const IA32_APIC_BASE: u32 = 0x1b;
pub const IA32_BIOS_SIGN_ID: u32 = 0x8b;
pub const IA32_MTRRCAP: u32 = 0xfe;
pub const IA32_SYSENTER_CS: u32 = 0x174;
pub const IA32_SYSENTER_ESP: u32 = 0x175;
pub const IA32_SYSENTER_EIP: u32 = 0x176;
pub const IA32_MISC_ENABLE: u32 = 0x1a0;
pub const IA32_PAT: u32 = 0x277;
pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
pub const IA32_EFER: u32 = 0xc000_0080;
pub const IA32_STAR: u32 = 0xc000_0081;
pub const IA32_LSTAR: u32 = 0xc000_0082;
pub const IA32_CSTAR: u32 = 0xc000_0083;
pub const IA32_FMASK: u32 = 0xc000_0084;
pub const IA32_FS_BASE: u32 = 0xc000_0100;
pub const IA32_GS_BASE: u32 = 0xc000_0101;
pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const IA32_TSC_AUX: u32 = 0xc000_0103;

/// APIC base the guest sees: base 0xFEE0_0000, global enable (bit 11), BSP
/// (bit 8). Read-only: only a write of this same value is accepted.
pub const APIC_BASE_VALUE: u64 = 0xfee0_0900;
/// MTRRcap: no variable ranges (VCNT = 0), no fixed ranges, no WC, no SMRR,
/// so the guest touches no other MTRR.
pub const MTRRCAP_VALUE: u64 = 0;
/// MTRRdefType: MTRRs enabled (bit 11), default type WB (6).
pub const MTRR_DEF_TYPE_VALUE: u64 = 0x806;
/// MISC_ENABLE: fast strings (bit 0), BTS and PEBS unavailable (bits 11,
/// 12).
pub const MISC_ENABLE_VALUE: u64 = 0x1801;

/// What the policy makes of one MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrClass {
    /// Value supplied by the policy.
    Fixed(u64),
    /// Kept by the backend ([`Vcpu::read_msr`] / [`Vcpu::write_msr`]).
    Delegated,
    /// A device register: the caller's device models answer.
    Device,
    /// Not present: #GP.
    Absent,
}

/// Classify `msr`.
pub fn classify(msr: u32) -> MsrClass {
    match msr {
        IA32_APIC_BASE => MsrClass::Fixed(APIC_BASE_VALUE),
        IA32_MTRRCAP => MsrClass::Fixed(MTRRCAP_VALUE),
        IA32_MTRR_DEF_TYPE => MsrClass::Fixed(MTRR_DEF_TYPE_VALUE),
        IA32_MISC_ENABLE => MsrClass::Fixed(MISC_ENABLE_VALUE),
        IA32_BIOS_SIGN_ID => MsrClass::Fixed(0),
        IA32_TSC | IA32_SYSENTER_CS | IA32_SYSENTER_ESP | IA32_SYSENTER_EIP | IA32_PAT
        | IA32_EFER | IA32_STAR | IA32_LSTAR | IA32_CSTAR | IA32_FMASK | IA32_FS_BASE
        | IA32_GS_BASE | IA32_KERNEL_GS_BASE | IA32_TSC_AUX => MsrClass::Delegated,
        IA32_TSC_DEADLINE => MsrClass::Device,
        _ => MsrClass::Absent,
    }
}

/// The guest's RDMSR of `msr`, or `None` for #GP (device MSRs included:
/// the caller answers them before asking here).
pub fn read(vcpu: &dyn Vcpu, msr: u32) -> Option<u64> {
    match classify(msr) {
        MsrClass::Fixed(v) => Some(v),
        MsrClass::Delegated => vcpu.read_msr(msr).ok(),
        MsrClass::Device | MsrClass::Absent => None,
    }
}

/// Whether the value of a WRMSR to a policy-handled `msr` is one the CPU
/// would accept.
pub fn write_allowed(msr: u32, value: u64) -> bool {
    match msr {
        IA32_APIC_BASE => value == APIC_BASE_VALUE,
        IA32_MTRRCAP => false,
        // Reserved bits 63:12 and 9:8; the type must be a valid one.
        IA32_MTRR_DEF_TYPE => value & !0xcff == 0 && matches!(value & 0xff, 0 | 1 | 4 | 5 | 6),
        IA32_MISC_ENABLE | IA32_BIOS_SIGN_ID => true,
        // Reserved bits here; the state-dependent rule (LME while paging)
        // is the backend's, through `x86::efer_after_write`.
        IA32_EFER => value & !EFER_GUEST.bits() == 0,
        IA32_PAT => is_valid_pat(value),
        IA32_SYSENTER_ESP | IA32_SYSENTER_EIP | IA32_LSTAR | IA32_CSTAR | IA32_FS_BASE
        | IA32_GS_BASE | IA32_KERNEL_GS_BASE => is_canonical(value),
        IA32_TSC_AUX | IA32_FMASK => value >> 32 == 0,
        // The backend keeps the low 16 bits of SYSENTER_CS.
        IA32_STAR | IA32_TSC | IA32_SYSENTER_CS => true,
        _ => false,
    }
}

/// The guest's WRMSR of `value` to `msr`; `false` for #GP.
pub fn write(vcpu: &mut dyn Vcpu, msr: u32, value: u64) -> bool {
    if !write_allowed(msr, value) {
        return false;
    }
    match classify(msr) {
        // Accepted and dropped: the value reads back fixed.
        MsrClass::Fixed(_) => true,
        MsrClass::Delegated => vcpu.write_msr(msr, value).is_ok(),
        MsrClass::Device | MsrClass::Absent => false,
    }
}
