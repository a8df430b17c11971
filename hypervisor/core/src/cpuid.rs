//! The guest's CPUID view: the host's values filtered by a fixed policy.
//!
//! The guest sees the host CPU, minus what this hypervisor does not
//! emulate, plus the hypervisor leaves:
//! * `CPUID.1:ECX[31]` "hypervisor present" is set (Intel SDM vol. 2A, CPUID,
//!   Table 3-10 marks it "not used"; every hypervisor sets it);
//! * VMX (`1:ECX[5]`) and SVM (`8000_0001h:ECX[2]`) are cleared and the SVM
//!   feature leaf 8000_000Ah reads zero: no nested virtualization;
//! * MONITOR/MWAIT (`1:ECX[3]`, leaf 5) and x2APIC (`1:ECX[21]`) are cleared:
//!   not emulated (the local APIC is the xAPIC page, emulated through MMIO
//!   decoding; its x2APIC MSRs stay #GP);
//! * what a guest needs to skip timer calibration, matching the emulated
//!   local APIC: TSC-deadline timer (`1:ECX[24]`) and always-running APIC
//!   timer ARAT (`6:EAX[2]`) are set; leaf 0x15 reports the TSC rate (a
//!   "crystal" of 1 GHz, the emulated APIC bus, times `tsc_khz / 1e6`) and
//!   the highest basic leaf is raised to 0x15 if lower (leaves the host
//!   does not have then read zero); the initial APIC ID (`1:EBX[31:24]`)
//!   is 0, the emulated LAPIC's; TSC_ADJUST (`7:EBX[1]`) is cleared (the
//!   MSR is not emulated). Without a known TSC rate
//!   ([`CpuidSource::tsc_khz`] = 0) leaf 0x15 reads zero;
//! * OSXSAVE (`1:ECX[27]`) is cleared: it mirrors the guest's CR4.OSXSAVE,
//!   which exit handling cannot see, and reporting 1 to a guest that never
//!   set CR4.OSXSAVE would make its XGETBV fault. A guest that checks it
//!   after setting CR4.OSXSAVE sees XSAVE as unusable, which is safe;
//! * XSAVE (`1:ECX[26]`) and every feature whose register state lives only in
//!   XSAVE components (AVX, FMA, F16C, AVX2, AVX-512, MPX, PKU, AMX, AMD's
//!   XOP/FMA4) are cleared and the XSAVE leaf 0Dh reads zero: the world
//!   switch saves x87/SSE state with FXSAVE only and the migration record
//!   carries only that, so a guest using YMM/ZMM registers would have them
//!   silently corrupted between VMs and lost on migration; its XSETBV gets
//!   #UD;
//! * the architectural performance-monitoring leaf 0Ah reads zero (no PMU);
//! * MCE and MCA (`1:EDX[7,14]`, the same bits of `8000_0001h:EDX`) are
//!   cleared: the machine-check MSRs are not emulated, and Linux panics
//!   ("MCA architectural violation") when one it was promised faults;
//! * `CPUID(0x4000_0000)` returns EAX = 0x4000_0010 (highest hypervisor
//!   leaf) and the signature [`crate::abi::HV_SIGNATURE`] in EBX, ECX, EDX
//!   (not KVM's or any other hypervisor's: guests use no paravirtual
//!   interface here); `CPUID(0x4000_0010)` is the timing leaf other
//!   hypervisors define too: EAX = TSC kHz, EBX = APIC bus kHz (1 GHz);
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
/// CPUID.1:ECX bit 24: TSC-deadline mode of the APIC timer.
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:EBX bits 31:24: the initial APIC ID.
pub const LEAF1_EBX_APIC_ID: u32 = 0xff << 24;
/// CPUID.6:EAX bit 2: ARAT, the APIC timer keeps running in deep C-states
/// (Intel SDM vol. 2A, CPUID, Table 3-8, leaf 06H).
pub const LEAF6_EAX_ARAT: u32 = 1 << 2;
/// CPUID.7.0:EBX bit 1: IA32_TSC_ADJUST.
pub const LEAF7_EBX_TSC_ADJUST: u32 = 1 << 1;
/// The TSC/crystal leaf (Intel SDM vol. 2A, CPUID, leaf 15H: TSC =
/// ECX * EBX / EAX Hz).
pub const TSC_LEAF: u32 = 0x15;
/// The "crystal" leaf 0x15 names: the emulated local APIC's 1 GHz bus.
pub const CRYSTAL_HZ: u32 = 1_000_000_000;
/// Leaf 0x15 EAX: the ratio's denominator (EBX = TSC kHz over it gives
/// TSC Hz = ECX * kHz / 1e6 = kHz * 1000).
pub const TSC_RATIO_DENOMINATOR: u32 = 1_000_000;
/// The hypervisor timing leaf: EAX = TSC kHz, EBX = APIC bus kHz.
pub const HV_TIMING_LEAF: u32 = 0x4000_0010;
/// The APIC bus the emulated local APIC counts at, in kHz.
pub const APIC_BUS_KHZ: u32 = 1_000_000;
/// CPUID.1:ECX bits whose state lives in XSAVE components beyond x87/SSE:
/// FMA (12), XSAVE (26), AVX (28), F16C (29) (Intel SDM vol. 2A, CPUID,
/// Table 3-10).
pub const LEAF1_ECX_XSAVE_FEATURES: u32 = (1 << 12) | (1 << 26) | (1 << 28) | (1 << 29);
/// CPUID.7.0:EBX bits needing XSAVE state: AVX2 (5), MPX (14), AVX-512
/// F/DQ/IFMA/PF/ER/CD/BW/VL (16, 17, 21, 26, 27, 28, 30, 31).
pub const LEAF7_EBX_XSAVE_FEATURES: u32 = (1 << 5)
    | (1 << 14)
    | (1 << 16)
    | (1 << 17)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
/// CPUID.7.0:ECX bits needing XSAVE state: AVX512_VBMI (1), PKU (3), OSPKE
/// (4), AVX512_VBMI2 (6), VAES (9), VPCLMULQDQ (10), AVX512_VNNI (11),
/// AVX512_BITALG (12), AVX512_VPOPCNTDQ (14).
pub const LEAF7_ECX_XSAVE_FEATURES: u32 = (1 << 1)
    | (1 << 3)
    | (1 << 4)
    | (1 << 6)
    | (1 << 9)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 14);
/// CPUID.7.0:EDX bits needing XSAVE state: AVX512_4VNNIW (2), AVX512_4FMAPS
/// (3), AVX512_VP2INTERSECT (8), AMX-BF16 (22), AVX512_FP16 (23), AMX-TILE
/// (24), AMX-INT8 (25).
pub const LEAF7_EDX_XSAVE_FEATURES: u32 =
    (1 << 2) | (1 << 3) | (1 << 8) | (1 << 22) | (1 << 23) | (1 << 24) | (1 << 25);
/// CPUID.8000_0001h:ECX bits needing AVX state on AMD: XOP (11), FMA4 (16)
/// (AMD APM vol. 3, E.4.2).
pub const EXT1_ECX_XSAVE_FEATURES: u32 = (1 << 11) | (1 << 16);
/// CPUID.1:ECX bit 27: OSXSAVE (CR4.OSXSAVE set by the OS).
pub const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
/// CPUID.1:ECX bit 31: running under a hypervisor.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.8000_0001h:ECX bit 2: SVM (AMD APM vol. 3, E.4.2).
pub const EXT1_ECX_SVM: u32 = 1 << 2;
/// CPUID.1:EDX and CPUID.8000_0001:EDX bit 7: machine-check exception.
pub const EDX_MCE: u32 = 1 << 7;
/// CPUID.1:EDX and CPUID.8000_0001:EDX bit 14: machine-check architecture
/// (its MSRs, MCG_CAP 0x179 and up, are not emulated).
pub const EDX_MCA: u32 = 1 << 14;

/// Highest hypervisor leaf we implement.
pub const HV_MAX_LEAF: u32 = HV_TIMING_LEAF;
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
    // A rate above u32::MAX kHz (4 THz) is not a TSC: report none.
    let tsc_khz = u32::try_from(host.tsc_khz()).unwrap_or(0);
    if (CPUID_HV_LEAF..=HV_LEAF_LAST).contains(&leaf) {
        return match leaf {
            CPUID_HV_LEAF => {
                let [ebx, ecx, edx] = hv_signature_regs();
                CpuidResult {
                    eax: HV_MAX_LEAF,
                    ebx,
                    ecx,
                    edx,
                }
            }
            HV_TIMING_LEAF => CpuidResult {
                eax: tsc_khz,
                ebx: APIC_BUS_KHZ,
                ..CpuidResult::default()
            },
            _ => CpuidResult::default(),
        };
    }
    let host_max_basic = host.host_cpuid(0, 0).eax;
    if leaf == TSC_LEAF {
        return if tsc_khz == 0 {
            CpuidResult::default()
        } else {
            CpuidResult {
                eax: TSC_RATIO_DENOMINATOR,
                ebx: tsc_khz,
                ecx: CRYSTAL_HZ,
                edx: 0,
            }
        };
    }
    // Basic leaves the host lacks (the guest sees them because the highest
    // basic leaf was raised) start from zero, not from the host's answer
    // for an out-of-range leaf (Intel repeats its highest leaf).
    let mut r = if leaf < CPUID_HV_LEAF && leaf > host_max_basic {
        CpuidResult::default()
    } else {
        host.host_cpuid(leaf, subleaf)
    };
    match leaf {
        0 => r.eax = r.eax.max(TSC_LEAF),
        1 => {
            r.ecx |= LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE;
            r.ecx &= !(LEAF1_ECX_MONITOR
                | LEAF1_ECX_VMX
                | LEAF1_ECX_X2APIC
                | LEAF1_ECX_OSXSAVE
                | LEAF1_ECX_XSAVE_FEATURES);
            r.ebx &= !LEAF1_EBX_APIC_ID;
            r.edx &= !(EDX_MCE | EDX_MCA);
        }
        6 => r.eax |= LEAF6_EAX_ARAT,
        7 if subleaf == 0 => {
            r.ebx &= !(LEAF7_EBX_XSAVE_FEATURES | LEAF7_EBX_TSC_ADJUST);
            r.ecx &= !LEAF7_ECX_XSAVE_FEATURES;
            r.edx &= !LEAF7_EDX_XSAVE_FEATURES;
        }
        5 | 0xa | 0xd | 0x8000_000a => r = CpuidResult::default(),
        0x8000_0001 => {
            r.ecx &= !(EXT1_ECX_SVM | EXT1_ECX_XSAVE_FEATURES);
            r.edx &= !(EDX_MCE | EDX_MCA);
        }
        _ => {}
    }
    r
}
