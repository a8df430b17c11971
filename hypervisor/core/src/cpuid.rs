//! The guest's CPUID view: the host's values filtered by a fixed policy.
//!
//! The guest sees the host CPU, minus what this hypervisor does not
//! emulate, plus the hypervisor leaves:
//! * `CPUID.1:ECX[31]` "hypervisor present" is set (Intel SDM vol. 2A, CPUID,
//!   Table 3-10 marks it "not used"; every hypervisor sets it);
//! * VMX (`1:ECX[5]`) and SVM (`8000_0001h:ECX[2]`) are cleared and the SVM
//!   feature leaf 8000_000Ah reads zero: no nested virtualization;
//! * MONITOR/MWAIT (`1:ECX[3]`, leaf 5) and x2APIC (`1:ECX[21]`) are cleared:
//!   not emulated;
//! * OSXSAVE (`1:ECX[27]`) is cleared: it mirrors the guest's CR4.OSXSAVE,
//!   which exit handling cannot see, and reporting 1 to a guest that never
//!   set CR4.OSXSAVE would make its XGETBV fault. A guest that checks it
//!   after setting CR4.OSXSAVE sees XSAVE as unusable, which is safe;
//! * the architectural performance-monitoring leaf 0Ah reads zero (no PMU);
//! * `CPUID(0x4000_0000)` returns EAX = 0x4000_0000 (highest hypervisor
//!   leaf) and the signature [`crate::abi::HV_SIGNATURE`] in EBX, ECX, EDX;
//!   every other leaf in `0x4000_0000..=0x4FFF_FFFF` reads zero, hiding
//!   whatever hypervisor runs below us;
//! * everything else passes through.

use crate::abi::{CPUID_HV_LEAF, HV_SIGNATURE};
use crate::host::{CpuidResult, CpuidSource};

/// CPUID.1:ECX bit 3: MONITOR/MWAIT.
pub const LEAF1_ECX_MONITOR: u32 = 1 << 3;
/// CPUID.1:ECX bit 5: VMX.
pub const LEAF1_ECX_VMX: u32 = 1 << 5;
/// CPUID.1:ECX bit 21: x2APIC.
pub const LEAF1_ECX_X2APIC: u32 = 1 << 21;
/// CPUID.1:ECX bit 27: OSXSAVE (CR4.OSXSAVE set by the OS).
pub const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
/// CPUID.1:ECX bit 31: running under a hypervisor.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.8000_0001h:ECX bit 2: SVM (AMD APM vol. 3, E.4.2).
pub const EXT1_ECX_SVM: u32 = 1 << 2;

/// Highest hypervisor leaf we implement.
pub const HV_MAX_LEAF: u32 = CPUID_HV_LEAF;
/// Last leaf of the range reserved for hypervisors.
pub const HV_LEAF_LAST: u32 = 0x4fff_ffff;

/// The signature as the three registers hold it (little-endian words).
pub const fn hv_signature_regs() -> [u32; 3] {
    let s = HV_SIGNATURE;
    [
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
    ]
}

/// The guest's result for `CPUID(leaf, subleaf)`.
pub fn guest_cpuid(host: &dyn CpuidSource, leaf: u32, subleaf: u32) -> CpuidResult {
    if (CPUID_HV_LEAF..=HV_LEAF_LAST).contains(&leaf) {
        if leaf != CPUID_HV_LEAF {
            return CpuidResult::default();
        }
        let [ebx, ecx, edx] = hv_signature_regs();
        return CpuidResult {
            eax: HV_MAX_LEAF,
            ebx,
            ecx,
            edx,
        };
    }
    let mut r = host.host_cpuid(leaf, subleaf);
    match leaf {
        1 => {
            r.ecx |= LEAF1_ECX_HYPERVISOR;
            r.ecx &= !(LEAF1_ECX_MONITOR | LEAF1_ECX_VMX | LEAF1_ECX_X2APIC | LEAF1_ECX_OSXSAVE);
        }
        5 | 0xa | 0x8000_000a => r = CpuidResult::default(),
        0x8000_0001 => r.ecx &= !EXT1_ECX_SVM,
        _ => {}
    }
    r
}
