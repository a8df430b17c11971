//! Intel VT-x (VMX) backend: detection and VMXON, the capability MSRs the
//! controls are adjusted against, VPIDs, the shared I/O and MSR bitmaps, the
//! VMCS and the vCPU (`VmxVcpu`, an [`hvcore::vcpu::Vcpu`]) with EPT and
//! optional page-modification logging.
//!
//! Files: `vcpu.rs` (the vCPU: entry, exit, MSRs, reset), `setup.rs`
//! (VMCS controls and host state), `controls.rs` (control bits),
//! `state.rs` (the state record), `pml.rs` (page-modification logging),
//! `diagnose.rs` (failed entries), `vmcs.rs` (VMREAD/VMWRITE/INVEPT),
//! `world_switch.rs`. Decoding exits, VMCS encodings, the flush plan and
//! PML arming are logic in [`hvcore::vmx`].
//!
//! Nothing VMX-specific leaves this module: the rest of the hypervisor sees
//! [`hvcore::vcpu::VmExit`] and the vendor-neutral partition
//! ([`crate::partition`]), which uses [`Vmx`] as its backend.
//!
//! Invariants:
//! * [`enable`] runs once per boot before any VMCS exists; it puts the boot
//!   CPU (the only one that runs guests for now) into VMX root operation
//!   with CR0/CR4 adjusted to the fixed-bit MSRs (Intel SDM vol. 3C, 24.7
//!   and 24.8) and never leaves it;
//! * every control value written to a VMCS went through [`Allowed::adjust`]
//!   against the TRUE capability MSRs when the CPU has them (24.6.1 /
//!   Appendix A.3), and the backend refuses a CPU that cannot give it the
//!   controls it needs;
//! * every vCPU has its own VPID >= 1 while it exists; a recycled VPID is
//!   flushed (INVVPID) before its new owner's first entry.

pub mod bench;
pub mod controls;
mod diagnose;
pub mod maps;
pub mod pml;
mod setup;
mod state;
pub mod vcpu;
pub mod vmcs;
mod world_switch;

pub use vcpu::VmxVcpu;

use crate::cpu::{cpuid, rdmsr, read_cr0, read_cr4, wrmsr};
use core::arch::asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};
use hvcore::addr::Hpa;
use hvcore::host::HostError;
use hvcore::vcpu::VcpuCaps;
use hvcore::x86::Cr4Flags;

// Capability and control MSRs. Intel SDM vol. 4, table 2-2; vol. 3C,
// Appendix A.
const MSR_FEATURE_CONTROL: u32 = 0x3a;
const MSR_VMX_BASIC: u32 = 0x480;
const MSR_VMX_PINBASED_CTLS: u32 = 0x481;
const MSR_VMX_PROCBASED_CTLS: u32 = 0x482;
const MSR_VMX_EXIT_CTLS: u32 = 0x483;
const MSR_VMX_ENTRY_CTLS: u32 = 0x484;
const MSR_VMX_CR0_FIXED0: u32 = 0x486;
const MSR_VMX_CR0_FIXED1: u32 = 0x487;
const MSR_VMX_CR4_FIXED0: u32 = 0x488;
const MSR_VMX_CR4_FIXED1: u32 = 0x489;
const MSR_VMX_PROCBASED_CTLS2: u32 = 0x48b;
const MSR_VMX_EPT_VPID_CAP: u32 = 0x48c;
const MSR_VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
const MSR_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
const MSR_VMX_TRUE_EXIT_CTLS: u32 = 0x48f;
const MSR_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;

/// IA32_FEATURE_CONTROL bit 0: lock; bit 2: VMXON outside SMX allowed
/// (Intel SDM vol. 3C, 24.7).
const FEATURE_CONTROL_LOCK: u64 = 1 << 0;
const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;
/// CR4.VMXE (Intel SDM vol. 3A, 2.5).
pub(crate) const CR4_VMXE: u64 = Cr4Flags::VIRTUAL_MACHINE_EXTENSIONS.bits();
/// CR4.OSFXSR: FXSAVE/FXRSTOR include the SSE state (the vCPU switches
/// the guest's x87/SSE state with them).
const CR4_OSFXSR: u64 = Cr4Flags::OSFXSR.bits();

// IA32_VMX_EPT_VPID_CAP bits (Intel SDM vol. 3D, A.10).
const EPT_CAP_WALK_4: u64 = 1 << 6;
const EPT_CAP_WB: u64 = 1 << 14;
const EPT_CAP_2M: u64 = 1 << 16;
const EPT_CAP_INVEPT: u64 = 1 << 20;
const EPT_CAP_AD: u64 = 1 << 21;
const EPT_CAP_INVEPT_SINGLE: u64 = 1 << 25;
const EPT_CAP_INVEPT_ALL: u64 = 1 << 26;
const VPID_CAP_INVVPID: u64 = 1 << 32;
const VPID_CAP_SINGLE: u64 = 1 << 41;
const VPID_CAP_ALL: u64 = 1 << 42;

/// INVEPT/INVVPID types (Intel SDM vol. 3C, 31.3).
pub(crate) const INV_SINGLE: u64 = 1;
pub(crate) const INV_ALL: u64 = 2;

/// The allowed-0 and allowed-1 settings of one 32-bit control field
/// (Intel SDM vol. 3D, A.3-A.5: bits 31:0 of the capability MSR are the
/// bits that must be 1, bits 63:32 the bits that may be 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allowed {
    pub must_be_one: u32,
    pub may_be_one: u32,
}

impl Allowed {
    /// From a capability MSR value.
    pub const fn from_msr(v: u64) -> Self {
        Self {
            must_be_one: v as u32,
            may_be_one: (v >> 32) as u32,
        }
    }

    /// `desired` with the must-be-one bits set and the must-be-zero bits
    /// cleared (Intel SDM vol. 3C, 24.6.1; algorithm of vol. 3D, A.3.3).
    pub const fn adjust(self, desired: u32) -> u32 {
        (desired | self.must_be_one) & self.may_be_one
    }

    /// Whether `value` is a setting the CPU accepts.
    pub const fn accepts(self, value: u32) -> bool {
        value & self.must_be_one == self.must_be_one && value & !self.may_be_one == 0
    }

    /// Whether the control `bit` may be 1.
    pub const fn can_set(self, bit: u32) -> bool {
        self.may_be_one & bit != 0
    }
}

/// What this CPU's VMX offers, read once from the capability MSRs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxFeatures {
    /// VMCS revision identifier (IA32_VMX_BASIC bits 30:0).
    pub revision: u32,
    /// The TRUE control MSRs exist (IA32_VMX_BASIC bit 55).
    pub true_ctls: bool,
    pub pin: Allowed,
    pub proc: Allowed,
    pub proc2: Allowed,
    pub exit: Allowed,
    pub entry: Allowed,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    /// IA32_VMX_EPT_VPID_CAP (0 without secondary controls).
    pub ept_vpid: u64,
}

impl VmxFeatures {
    pub fn ept_2m(&self) -> bool {
        self.ept_vpid & EPT_CAP_2M != 0
    }
    pub fn invept_single(&self) -> bool {
        self.ept_vpid & (EPT_CAP_INVEPT | EPT_CAP_INVEPT_SINGLE)
            == (EPT_CAP_INVEPT | EPT_CAP_INVEPT_SINGLE)
    }
    pub fn invept_all(&self) -> bool {
        self.ept_vpid & (EPT_CAP_INVEPT | EPT_CAP_INVEPT_ALL)
            == (EPT_CAP_INVEPT | EPT_CAP_INVEPT_ALL)
    }
    pub fn vpid(&self) -> bool {
        self.proc2.can_set(controls::PROC2_ENABLE_VPID)
            && self.ept_vpid & VPID_CAP_INVVPID != 0
            && self.ept_vpid & (VPID_CAP_SINGLE | VPID_CAP_ALL) != 0
    }
    pub fn invvpid_single(&self) -> bool {
        self.ept_vpid & VPID_CAP_SINGLE != 0
    }
    /// Page-modification logging: the secondary control and EPT A/D flags
    /// (PML logs when the CPU sets an EPT dirty flag; Intel SDM vol. 3C,
    /// 29.3.6).
    pub fn pml(&self) -> bool {
        self.proc2.can_set(controls::PROC2_ENABLE_PML) && self.ept_vpid & EPT_CAP_AD != 0
    }
}

/// Whether CPUID reports VMX (CPUID.1:ECX[5]; Intel SDM vol. 3C, 24.6).
pub fn cpu_has_vmx() -> bool {
    cpuid(1, 0).ecx & (1 << 5) != 0
}

/// Read the capability MSRs. Only call when [`cpu_has_vmx`].
fn read_features() -> VmxFeatures {
    // SAFETY: every VMX CPU has the basic, control and fixed-bit MSRs
    // (Intel SDM vol. 3D, A.1-A.8); the secondary and EPT/VPID MSRs exist
    // when bit 63 of the primary controls' MSR says secondary controls
    // may be used (A.3.3), the TRUE MSRs when IA32_VMX_BASIC bit 55 is set.
    unsafe {
        let basic = rdmsr(MSR_VMX_BASIC);
        let true_ctls = basic & (1 << 55) != 0;
        let pick = |plain: u32, tru: u32| rdmsr(if true_ctls { tru } else { plain });
        let proc = Allowed::from_msr(pick(MSR_VMX_PROCBASED_CTLS, MSR_VMX_TRUE_PROCBASED_CTLS));
        let has_proc2 = proc.can_set(controls::PROC_SECONDARY_CONTROLS);
        VmxFeatures {
            revision: (basic & 0x7fff_ffff) as u32,
            true_ctls,
            pin: Allowed::from_msr(pick(MSR_VMX_PINBASED_CTLS, MSR_VMX_TRUE_PINBASED_CTLS)),
            proc,
            proc2: if has_proc2 {
                Allowed::from_msr(rdmsr(MSR_VMX_PROCBASED_CTLS2))
            } else {
                Allowed::default()
            },
            exit: Allowed::from_msr(pick(MSR_VMX_EXIT_CTLS, MSR_VMX_TRUE_EXIT_CTLS)),
            entry: Allowed::from_msr(pick(MSR_VMX_ENTRY_CTLS, MSR_VMX_TRUE_ENTRY_CTLS)),
            cr0_fixed0: rdmsr(MSR_VMX_CR0_FIXED0),
            cr0_fixed1: rdmsr(MSR_VMX_CR0_FIXED1),
            cr4_fixed0: rdmsr(MSR_VMX_CR4_FIXED0),
            cr4_fixed1: rdmsr(MSR_VMX_CR4_FIXED1),
            ept_vpid: if has_proc2 {
                rdmsr(MSR_VMX_EPT_VPID_CAP)
            } else {
                0
            },
        }
    }
}

/// Why this CPU's VMX cannot run our guests, or `Ok`.
fn check_features(f: &VmxFeatures) -> Result<(), HostError> {
    if !f.proc2.can_set(controls::PROC2_ENABLE_EPT) {
        return Err(HostError::Backend("VMX without EPT"));
    }
    if f.ept_vpid & (EPT_CAP_WALK_4 | EPT_CAP_WB) != (EPT_CAP_WALK_4 | EPT_CAP_WB) {
        return Err(HostError::Backend(
            "EPT without 4-level walks or write-back paging structures",
        ));
    }
    if !f.invept_single() && !f.invept_all() {
        return Err(HostError::Backend("EPT without INVEPT"));
    }
    if !f.ept_2m() {
        // 2 MiB EPT leaves are what the partition maps guest RAM with.
        return Err(HostError::Backend("EPT without 2 MiB pages"));
    }
    Ok(())
}

/// Whether this CPU can run VMX guests with EPT (IA32_FEATURE_CONTROL is
/// checked by [`enable`], which reports a locked-off VMX as an error).
pub fn available() -> bool {
    cpu_has_vmx() && check_features(&read_features()).is_ok()
}

/// A 4 KiB page the CPU owns (the VMXON region).
#[repr(C, align(4096))]
struct HwPage(UnsafeCell<[u8; 4096]>);

// SAFETY: written once by `enable` (revision identifier) before VMXON on
// the one CPU that runs guests, then used only by the CPU.
unsafe impl Sync for HwPage {}

/// The VMXON region (Intel SDM vol. 3C, 25.11.5).
static VMXON_REGION: HwPage = HwPage(UnsafeCell::new([0; 4096]));

static ENABLED: AtomicBool = AtomicBool::new(false);
static FEATURES: spin::Once<VmxFeatures> = spin::Once::new();
/// Serialises `enable`.
static ENABLE_LOCK: spin::Mutex<()> = spin::Mutex::new(());

/// Enter VMX root operation on this CPU (idempotent). Intel SDM vol. 3C,
/// 24.7 (enabling and entering VMX operation) and 24.8 (restrictions).
pub fn enable() -> Result<VmxFeatures, HostError> {
    let _guard = ENABLE_LOCK.lock();
    if ENABLED.load(Ordering::Acquire) {
        return FEATURES
            .get()
            .copied()
            .ok_or(HostError::Backend("VMX enabled without features"));
    }
    if !cpu_has_vmx() {
        return Err(HostError::NoVirtualization);
    }
    // SAFETY: IA32_FEATURE_CONTROL exists on every CPU with VMX (vol. 4,
    // table 2-2).
    let fc = unsafe { rdmsr(MSR_FEATURE_CONTROL) };
    if fc & FEATURE_CONTROL_LOCK == 0 {
        // SAFETY: unlocked: enabling VMXON outside SMX and locking is what
        // firmware normally does (24.7); it changes nothing else.
        unsafe {
            wrmsr(
                MSR_FEATURE_CONTROL,
                fc | FEATURE_CONTROL_LOCK | FEATURE_CONTROL_VMX_OUTSIDE_SMX,
            )
        };
    } else if fc & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
        return Err(HostError::Backend(
            "VMX is disabled by the firmware (IA32_FEATURE_CONTROL is locked with VMXON outside SMX off); enable VT-x in the firmware setup",
        ));
    }
    let f = read_features();
    check_features(&f)?;
    // 24.8: CR0 and CR4 must satisfy the fixed-bit MSRs in VMX operation.
    // GRUB leaves CR0.NE clear (shared/PLATFORM.md); FIXED0 requires it.
    let cr0 = read_cr0() | f.cr0_fixed0;
    let cr4 = read_cr4() | f.cr4_fixed0 | CR4_VMXE | CR4_OSFXSR;
    if cr0 & !f.cr0_fixed1 != 0 || cr4 & !f.cr4_fixed1 != 0 {
        return Err(HostError::Backend(
            "host CR0/CR4 cannot satisfy the VMX fixed bits",
        ));
    }
    let region = VMXON_REGION.0.get();
    // SAFETY: CR0.NE/PE/PG and CR4.VMXE/OSFXSR only change error reporting
    // and enable VMXON/FXSAVE state; the VMXON region is a static 4 KiB
    // aligned page used for nothing else, written (revision identifier,
    // 25.11.5) before VMXON reads it.
    unsafe {
        asm!("mov cr0, {}", in(reg) cr0, options(nostack, preserves_flags));
        asm!("mov cr4, {}", in(reg) cr4, options(nostack, preserves_flags));
        (region as *mut u32).write_volatile(f.revision);
    }
    let pa = region as u64;
    let flags: u64;
    // SAFETY: CR4.VMXE is set, feature control allows VMXON, the region is
    // initialised (above). Intel SDM vol. 3C, 31.3 (VMXON).
    unsafe {
        asm!(
            "vmxon [{p}]",
            "pushfq",
            "pop {fl}",
            p = in(reg) &pa,
            fl = out(reg) flags,
        );
    }
    if flags & 0x41 != 0 {
        return Err(HostError::Backend("VMXON failed"));
    }
    ENABLED.store(true, Ordering::Release);
    log::info!(
        "vmx: enabled: revision {:#x} true_ctls={} vpid={} pml={} invept_single={} proc2={:#x} ept_vpid_cap={:#x}",
        f.revision,
        f.true_ctls,
        f.vpid(),
        f.pml(),
        f.invept_single(),
        f.proc2.may_be_one,
        f.ept_vpid
    );
    Ok(*FEATURES.call_once(|| f))
}

/// Vendor-neutral capabilities derived from the VMX features.
pub fn caps(f: &VmxFeatures) -> VcpuCaps {
    VcpuCaps {
        // The VM-exit instruction-length field (Intel SDM vol. 3C, 28.2.5).
        next_rip: true,
        flush_by_asid: f.vpid() && f.invept_single(),
        pml: f.pml(),
    }
}

/// VPIDs handed out, bit n = VPID n in use (VPID 0 is the host's).
static VPIDS: spin::Mutex<[u64; VPID_WORDS]> = spin::Mutex::new([1, 0, 0, 0]);
const VPID_WORDS: usize = 4;

/// A free VPID, or `None`.
pub(crate) fn alloc_vpid() -> Option<u16> {
    let mut map = VPIDS.lock();
    (1..VPID_WORDS * 64)
        .find(|&a| map[a / 64] & (1 << (a % 64)) == 0)
        .inspect(|&a| map[a / 64] |= 1 << (a % 64))
        .map(|a| a as u16)
}

/// Return a VPID from [`alloc_vpid`].
pub(crate) fn free_vpid(vpid: u16) {
    let a = usize::from(vpid);
    if a != 0 && a < VPID_WORDS * 64 {
        VPIDS.lock()[a / 64] &= !(1 << (a % 64));
    }
}

/// The VMX backend of the vendor-neutral partition.
pub struct Vmx;

impl crate::partition::Backend for Vmx {
    type Vcpu = VmxVcpu;

    fn create_vcpu(
        frames: &mut dyn hvcore::mem::FrameAlloc,
        nested_root: Hpa,
    ) -> Result<VmxVcpu, HostError> {
        let f = enable()?;
        VmxVcpu::new(frames, &f, nested_root)
    }

    fn destroy_vcpu(vcpu: VmxVcpu, frames: &mut dyn hvcore::mem::FrameAlloc) {
        vcpu.destroy(frames);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_adjustment() {
        // Bits 1, 2, 4 must be one; bits 0-7 and 31 may be one.
        let a = Allowed::from_msr(0x8000_00ff_0000_0016);
        assert_eq!(a.adjust(0), 0x16);
        assert_eq!(a.adjust(1 << 31 | 1 << 9 | 1), 0x8000_0017);
        assert!(a.accepts(0x16));
        assert!(!a.accepts(0x06));
        assert!(!a.accepts(0x116));
        assert!(a.can_set(1 << 31) && !a.can_set(1 << 30));
    }
}
