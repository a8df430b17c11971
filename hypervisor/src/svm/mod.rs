//! AMD SVM backend: detection and enabling, the VMCB, the permission maps
//! and the vCPU (`SvmVcpu`, an [`hvcore::vcpu::Vcpu`]).
//!
//! Files: `vcpu.rs` (the vCPU: VMCB set-up, VMRUN, MSRs, reset),
//! `state.rs` (the state record), `vmcb.rs` (the layout), `maps.rs`,
//! `world_switch.rs`. Decoding #VMEXITs, EVENTINJ encodings and the
//! TLB_CONTROL / next-RIP decisions are logic in [`hvcore::svm`].
//!
//! Nothing SVM-specific leaves this module: the rest of the hypervisor sees
//! [`hvcore::vcpu::VmExit`] and the vendor-neutral partition
//! ([`crate::partition`]), which uses [`Svm`] as its backend.
//!
//! Invariants:
//! * [`enable`] runs once per boot before any VMRUN; it sets EFER.SVME and
//!   VM_HSAVE_PA on the boot CPU, the only CPU that runs guests for now (the
//!   host save area and host-state page are per CPU and live in statics);
//! * every VMCB has an ASID >= 1 of its own while it exists (recycled when
//!   a vCPU is destroyed; a new owner flushes on its first VMRUN), or, once
//!   they run out, the shared top ASID with a flush on every VMRUN;
//! * the I/O and MSR permission maps are immutable statics shared by all
//!   guests: every port is intercepted, and every MSR except those the VMCB
//!   switches (FS/GS/KernelGS base, the SYSCALL/SYSENTER MSRs);
//! * guest state VMRUN does not switch is switched in software around each
//!   run: x87/SSE by FXSAVE/FXRSTOR (so [`enable`] sets the host's
//!   CR4.OSFXSR; the host itself never uses those registers), DR0-DR3 and
//!   TSC_AUX lazily, only when another guest's values are loaded.

pub mod bench;
mod maps;
mod state;
pub mod vcpu;
pub mod vmcb;
mod world_switch;

pub use vcpu::SvmVcpu;

use crate::cpu::{cpuid, rdmsr, wrmsr};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use hvcore::addr::Hpa;
use hvcore::host::HostError;
use hvcore::msr::IA32_TSC_AUX;
use hvcore::vcpu::VcpuCaps;
use hvcore::x86::{Cr4Flags, EferFlags};
use x86_64::registers::model_specific::Efer;

/// VM_CR: SVM lock and disable bits. AMD APM vol. 2, 15.30.1.
const MSR_VM_CR: u32 = 0xc001_0114;
/// VM_HSAVE_PA: host save area. AMD APM vol. 2, 15.30.4.
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
/// EFER.SVME. AMD APM vol. 2, 15.4.
pub(crate) const EFER_SVME: u64 = EferFlags::SECURE_VIRTUAL_MACHINE_ENABLE.bits();
/// VM_CR.SVMDIS.
const VM_CR_SVMDIS: u64 = 1 << 4;

/// Set bits in CR4.
///
/// # Safety
/// The bits must be supported by this CPU and harmless to the running
/// hypervisor.
unsafe fn set_cr4_bits(bits: Cr4Flags) {
    // SAFETY: the caller guarantees the bits are supported and harmless;
    // PAE stays set (only bits are added).
    unsafe { crate::cpu::write_cr4(crate::cpu::read_cr4() | bits.bits()) };
}

/// SVM feature identification, CPUID 0x8000_000A. AMD APM vol. 3, E.4.9.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvmFeatures {
    /// EDX[0]: nested paging.
    pub nested_paging: bool,
    /// EDX[3]: NRIPS, nRIP saved on #VMEXIT.
    pub nrips: bool,
    /// EDX[5]: VMCB clean bits.
    pub vmcb_clean: bool,
    /// EDX[6]: TLB_CONTROL flush by ASID.
    pub flush_by_asid: bool,
    /// EDX[7]: decode assists.
    pub decode_assists: bool,
    /// EBX: number of ASIDs (ASID 0 is the host's).
    pub asids: u32,
}

/// SVM features of this CPU, or `None` if SVM is absent or disabled.
pub fn features() -> Option<SvmFeatures> {
    // AMD APM vol. 2, 15.4: CPUID Fn8000_0001 ECX[2] = SVM.
    if cpuid(0x8000_0000, 0).eax < 0x8000_000a {
        return None;
    }
    if cpuid(0x8000_0001, 0).ecx & (1 << 2) == 0 {
        return None;
    }
    // SAFETY: VM_CR exists on every CPU that reports SVM.
    let vm_cr = unsafe { rdmsr(MSR_VM_CR) };
    if vm_cr & VM_CR_SVMDIS != 0 {
        return None;
    }
    let r = cpuid(0x8000_000a, 0);
    let (ebx, edx) = (r.ebx, r.edx);
    Some(SvmFeatures {
        nested_paging: edx & (1 << 0) != 0,
        nrips: edx & (1 << 3) != 0,
        vmcb_clean: edx & (1 << 5) != 0,
        flush_by_asid: edx & (1 << 6) != 0,
        decode_assists: edx & (1 << 7) != 0,
        asids: ebx,
    })
}

/// Whether this CPU can run SVM guests with nested paging.
pub fn available() -> bool {
    features().is_some_and(|f| f.nested_paging && f.asids >= 2)
}

/// A 4 KiB page the CPU reads and writes behind the compiler's back.
#[repr(C, align(4096))]
struct HwPage(UnsafeCell<[u8; 4096]>);

// SAFETY: the pages are touched only by the CPU (VMRUN/#VMEXIT and
// VMSAVE/VMLOAD) on the one CPU that runs guests; Rust code never reads or
// writes through them, it only takes their address.
unsafe impl Sync for HwPage {}

impl HwPage {
    /// Physical address (the hypervisor identity-maps memory: HPA == VA).
    fn hpa(&self) -> Hpa {
        Hpa(self.0.get() as u64)
    }
}

/// VM_HSAVE_PA target: where VMRUN saves host state. Its format is the
/// CPU's own (AMD APM vol. 2, 15.30.4); software must not touch it.
static HOST_SAVE_AREA: HwPage = HwPage(UnsafeCell::new([0; 4096]));
/// Host-state VMCB for VMSAVE/VMLOAD of the host's FS/GS/TR/LDTR/syscall
/// MSRs around each guest run (AMD APM vol. 2, 15.5.2).
static HOST_STATE_VMCB: HwPage = HwPage(UnsafeCell::new([0; 4096]));

static ENABLED: AtomicBool = AtomicBool::new(false);
static FEATURES: spin::Once<SvmFeatures> = spin::Once::new();

/// Enable SVM on this CPU (idempotent): EFER.SVME and VM_HSAVE_PA.
pub fn enable() -> Result<SvmFeatures, HostError> {
    let f = features().ok_or(HostError::NoVirtualization)?;
    if !f.nested_paging {
        return Err(HostError::Backend("SVM without nested paging"));
    }
    if f.asids < 2 {
        return Err(HostError::Backend("SVM reports no guest ASIDs"));
    }
    if !ENABLED.load(Ordering::Acquire) {
        // SAFETY: SVM is present and not disabled (checked above); setting
        // EFER.SVME only makes the SVM instructions legal (AMD APM vol. 2,
        // 15.4), and VM_HSAVE_PA gets a page-aligned static page nothing
        // else uses (15.30.4).
        // CR4.OSFXSR makes the vCPU's FXSAVE/FXRSTOR switch the guest's
        // SSE registers too; the host (a soft-float target) never uses them.
        unsafe {
            Efer::update(|f| f.insert(EferFlags::SECURE_VIRTUAL_MACHINE_ENABLE));
            wrmsr(MSR_VM_HSAVE_PA, HOST_SAVE_AREA.hpa().as_u64());
            // CR4.OSFXSR: FXSAVE/FXRSTOR include the SSE state (AMD APM
            // vol. 2, 3.7.1).
            set_cr4_bits(Cr4Flags::OSFXSR);
        }
        HAS_RDTSCP.store(
            cpuid(0x8000_0001, 0).edx & (1 << 27) != 0,
            Ordering::Relaxed,
        );
        ENABLED.store(true, Ordering::Release);
        log::info!(
            "svm: enabled: asids={} nrips={} flush_by_asid={} clean_bits={} decode_assists={}",
            f.asids,
            f.nrips,
            f.flush_by_asid,
            f.vmcb_clean,
            f.decode_assists
        );
    }
    Ok(*FEATURES.call_once(|| f))
}

/// Whether the CPU has RDTSCP/TSC_AUX (CPUID Fn8000_0001 EDX[27]).
static HAS_RDTSCP: AtomicBool = AtomicBool::new(false);
/// The value in this CPU's TSC_AUX (the host does not use it).
static LOADED_TSC_AUX: AtomicU64 = AtomicU64::new(u64::MAX);

/// Put the guest's TSC_AUX into the physical MSR before VMRUN (VMRUN does
/// not switch it and RDTSCP is not intercepted); skipped when already there
/// or when the CPU has no RDTSCP (then only RDMSR sees it, through the
/// backend).
pub(crate) fn load_tsc_aux(value: u32) {
    if !HAS_RDTSCP.load(Ordering::Relaxed)
        || LOADED_TSC_AUX.load(Ordering::Relaxed) == u64::from(value)
    {
        return;
    }
    // SAFETY: TSC_AUX exists (RDTSCP reported); the host never reads it.
    unsafe { wrmsr(IA32_TSC_AUX, u64::from(value)) };
    LOADED_TSC_AUX.store(u64::from(value), Ordering::Relaxed);
}

/// The DR0-DR3 values in this CPU's registers (the host does not use them).
static LOADED_DR: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// Put a guest's DR0-DR3 into the registers before VMRUN, unless they are
/// there already (VMRUN switches only DR6/DR7, AMD APM vol. 2, 15.5.1).
pub(crate) fn load_debug_regs(dr: [u64; 4]) {
    if (0..4).all(|i| LOADED_DR[i].load(Ordering::Relaxed) == dr[i]) {
        return;
    }
    // The host's DR7 (restored by #VMEXIT) enables no breakpoint, and the
    // guest's comes from its VMCB.
    crate::cpu::write_dr0_3(dr);
    for (slot, v) in LOADED_DR.iter().zip(dr) {
        slot.store(v, Ordering::Relaxed);
    }
}

/// Read DR0-DR3 after #VMEXIT: the guest may have written them.
pub(crate) fn read_debug_regs() -> [u64; 4] {
    let dr = crate::cpu::read_dr0_3();
    for (slot, v) in LOADED_DR.iter().zip(dr) {
        slot.store(v, Ordering::Relaxed);
    }
    dr
}

/// CR4 bits this CPU implements: those of every x86-64 CPU (VME ..
/// OSXMMEXCPT) plus PCIDE, FSGSBASE, SMEP, SMAP and UMIP where CPUID
/// Fn0000_0001 ECX / Fn0000_0007_0 EBX, ECX report them.
pub(crate) fn host_cr4_bits() -> u64 {
    // VME .. OSXMMEXCPT: bits 0-10.
    let mut bits = Cr4Flags::from_bits_truncate(0x7ff);
    bits.set(Cr4Flags::PCID, cpuid(1, 0).ecx & (1 << 17) != 0);
    if cpuid(0, 0).eax >= 7 {
        let l7 = cpuid(7, 0);
        bits.set(Cr4Flags::FSGSBASE, l7.ebx & 1 != 0);
        bits.set(
            Cr4Flags::SUPERVISOR_MODE_EXECUTION_PROTECTION,
            l7.ebx & (1 << 7) != 0,
        );
        bits.set(
            Cr4Flags::SUPERVISOR_MODE_ACCESS_PREVENTION,
            l7.ebx & (1 << 20) != 0,
        );
        bits.set(
            Cr4Flags::USER_MODE_INSTRUCTION_PREVENTION,
            l7.ecx & (1 << 2) != 0,
        );
    }
    bits.bits()
}

/// Physical address of this CPU's host-state VMCB page.
pub(crate) fn host_state_vmcb() -> Hpa {
    HOST_STATE_VMCB.hpa()
}

/// Vendor-neutral capabilities derived from the SVM features.
pub fn caps(f: &SvmFeatures) -> VcpuCaps {
    VcpuCaps {
        next_rip: f.nrips,
        flush_by_asid: f.flush_by_asid,
        pml: false,
    }
}

/// ASIDs handed out, bit n = ASID n in use (ASID 0 is the host's).
static ASIDS: spin::Mutex<[u64; ASID_WORDS]> = spin::Mutex::new([1, 0, 0, 0]);
/// At most this many ASIDs are tracked (plenty for the VMs of one node).
const ASID_WORDS: usize = 4;

/// A guest's address-space ID (AMD APM vol. 2, 15.16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Asid {
    /// Used by this vCPU alone: its TLB entries survive other guests' runs.
    Own(u32),
    /// The top ASID, kept back for when the others run out and shared by
    /// every vCPU that got none: such a vCPU flushes its ASID on every VMRUN,
    /// so sharing costs speed, never isolation.
    Shared(u32),
}

impl Asid {
    /// The value for the VMCB's GUEST_ASID.
    pub(crate) fn value(self) -> u32 {
        match self {
            Asid::Own(a) | Asid::Shared(a) => a,
        }
    }
}

/// An ASID for a new vCPU on a CPU with `limit` ASIDs (>= 2).
pub(crate) fn alloc_asid(limit: u32) -> Asid {
    let mut map = ASIDS.lock();
    let top = (limit as usize).min(ASID_WORDS * 64) - 1;
    match (1..top).find(|&a| map[a / 64] & (1 << (a % 64)) == 0) {
        Some(a) => {
            map[a / 64] |= 1 << (a % 64);
            Asid::Own(a as u32)
        }
        None => {
            log::debug!("svm: ASIDs exhausted, sharing ASID {top} (flush on every VMRUN)");
            Asid::Shared(top as u32)
        }
    }
}

/// Return an ASID from [`alloc_asid`].
pub(crate) fn free_asid(asid: Asid) {
    if let Asid::Own(a) = asid {
        let a = a as usize;
        if a != 0 && a < ASID_WORDS * 64 {
            ASIDS.lock()[a / 64] &= !(1 << (a % 64));
        }
    }
}

/// The SVM backend of the vendor-neutral partition.
pub struct Svm;

impl crate::partition::Backend for Svm {
    type Vcpu = SvmVcpu;

    fn create_vcpu(
        frames: &mut dyn hvcore::mem::FrameAlloc,
        nested_root: Hpa,
    ) -> Result<SvmVcpu, HostError> {
        let f = enable()?;
        SvmVcpu::new(frames, &f, nested_root)
    }

    fn destroy_vcpu(vcpu: SvmVcpu, frames: &mut dyn hvcore::mem::FrameAlloc) {
        vcpu.destroy(frames);
    }
}
