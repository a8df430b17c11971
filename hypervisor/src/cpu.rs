//! Thin wrappers over single CPU instructions: CPUID, MSRs, control
//! registers, the TSC and port I/O.
//!
//! Port I/O and MSR writes can change machine state arbitrarily, so they are
//! `unsafe fn`s whose callers state why the access is sound; reads that have
//! no side effects on this platform (CPUID, control registers, RDTSC) are
//! safe.

use core::arch::asm;
use hvcore::host::CpuidResult;
use hvcore::vcpu::Vendor;
use x86_64::registers::model_specific::Msr;

/// Execute CPUID with `leaf` in EAX and `subleaf` in ECX.
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    // core::arch::x86_64::__cpuid_count saves and restores RBX, which LLVM
    // reserves; CPUID itself has no memory effects.
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    CpuidResult {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// The CPU vendor from CPUID leaf 0 ("AuthenticAMD" / "GenuineIntel").
/// Unknown vendors are classified by which virtualization extension they
/// advertise (SVM: CPUID 0x80000001 ECX[2]; otherwise Intel).
pub fn vendor() -> Vendor {
    let r = cpuid(0, 0);
    let mut id = [0u8; 12];
    id[0..4].copy_from_slice(&r.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&r.edx.to_le_bytes());
    id[8..12].copy_from_slice(&r.ecx.to_le_bytes());
    match &id {
        b"AuthenticAMD" => Vendor::Amd,
        b"GenuineIntel" => Vendor::Intel,
        _ if cpuid(0x8000_0001, 0).ecx & (1 << 2) != 0 => Vendor::Amd,
        _ => Vendor::Intel,
    }
}

/// Read an MSR.
///
/// # Safety
/// `msr` must exist on this CPU (RDMSR of an unknown MSR raises #GP).
pub unsafe fn rdmsr(msr: u32) -> u64 {
    // SAFETY: the caller guarantees the MSR exists; RDMSR reads only.
    unsafe { Msr::new(msr).read() }
}

/// Write an MSR.
///
/// # Safety
/// `msr` must exist and `value` must be valid for it, and the new value must
/// not break the hypervisor's own execution (e.g. clearing EFER.LME).
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller guarantees the write is valid and harmless.
    unsafe { Msr::new(msr).write(value) }
}

macro_rules! read_cr {
    ($name:ident, $reg:literal) => {
        #[doc = concat!("Read ", $reg, ".")]
        pub fn $name() -> u64 {
            let v: u64;
            // SAFETY: reading a control register at CPL 0 has no side effects.
            unsafe {
                asm!(concat!("mov {}, ", $reg), out(reg) v, options(nomem, nostack, preserves_flags));
            }
            v
        }
    };
}
read_cr!(read_cr0, "cr0");
read_cr!(read_cr2, "cr2");
read_cr!(read_cr3, "cr3");
read_cr!(read_cr4, "cr4");

/// Load CR3 (switches the host address space and flushes non-global TLB
/// entries).
///
/// # Safety
/// `pml4_hpa` must be the physical address of a valid PML4 that maps the
/// running code, stack and all data the hypervisor uses, as before.
pub unsafe fn write_cr3(pml4_hpa: u64) {
    // SAFETY: the caller guarantees the new tables keep everything mapped.
    unsafe {
        asm!("mov cr3, {}", in(reg) pml4_hpa, options(nostack, preserves_flags));
    }
}

/// Load CR0.
///
/// # Safety
/// `value` must keep protected mode, paging and long mode on and be valid
/// for this CPU (reserved bits clear, fixed VMX bits respected).
pub unsafe fn write_cr0(value: u64) {
    // SAFETY: the caller guarantees the value is valid and harmless.
    unsafe {
        asm!("mov cr0, {}", in(reg) value, options(nostack, preserves_flags));
    }
}

/// Load CR4.
///
/// # Safety
/// `value` must keep PAE on and only set bits this CPU supports.
pub unsafe fn write_cr4(value: u64) {
    // SAFETY: the caller guarantees the value is valid and harmless.
    unsafe {
        asm!("mov cr4, {}", in(reg) value, options(nostack, preserves_flags));
    }
}

/// Load CR2 (the page-fault address; VMX does not switch it, so a vCPU
/// restores its guest's value before entry).
pub fn write_cr2(value: u64) {
    // SAFETY: CR2 only reports the last page-fault address; writing it has
    // no effect on translation or protection.
    unsafe {
        asm!("mov cr2, {}", in(reg) value, options(nomem, nostack, preserves_flags));
    }
}

/// Read DR0-DR3. Neither world switch swaps them (the VMCB and VMCS hold
/// only DR6/DR7), so they are whatever a guest last wrote; the hypervisor
/// never uses them.
pub fn read_dr0_3() -> [u64; 4] {
    let (a, b, c, d): (u64, u64, u64, u64);
    // SAFETY: reading debug registers at CPL 0 has no side effects.
    unsafe {
        asm!("mov {}, dr0", "mov {}, dr1", "mov {}, dr2", "mov {}, dr3",
            out(reg) a, out(reg) b, out(reg) c, out(reg) d,
            options(nomem, nostack, preserves_flags));
    }
    [a, b, c, d]
}

/// Load DR0-DR3 (breakpoint addresses; they take effect only where DR7
/// enables them, and the host's DR7 enables none).
pub fn write_dr0_3(dr: [u64; 4]) {
    // SAFETY: breakpoint addresses without DR7 enables change nothing the
    // host observes; guests' DR7 comes from their own VMCB/VMCS.
    unsafe {
        asm!("mov dr0, {}", "mov dr1, {}", "mov dr2, {}", "mov dr3, {}",
            in(reg) dr[0], in(reg) dr[1], in(reg) dr[2], in(reg) dr[3],
            options(nomem, nostack, preserves_flags));
    }
}

/// Read DR6 (VMX keeps the guest's DR6 in the physical register).
pub fn read_dr6() -> u64 {
    let v: u64;
    // SAFETY: reading a debug register at CPL 0 has no side effects.
    unsafe {
        asm!("mov {}, dr6", out(reg) v, options(nomem, nostack, preserves_flags));
    }
    v
}

/// Load DR6.
pub fn write_dr6(value: u64) {
    // SAFETY: DR6 is a status register; the host never reads it.
    unsafe {
        asm!("mov dr6, {}", in(reg) value, options(nomem, nostack, preserves_flags));
    }
}

/// Read the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects (CR4.TSD is clear at CPL 0 anyway).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Read RFLAGS.
pub fn rflags() -> u64 {
    let v: u64;
    // SAFETY: pushfq/pop only touches the stack slot it pushes.
    unsafe {
        asm!("pushfq", "pop {}", out(reg) v, options(preserves_flags));
    }
    v
}

/// Whether the CPU has NX (CPUID 0x80000001 EDX[20]).
pub fn has_nx() -> bool {
    cpuid(0x8000_0000, 0).eax >= 0x8000_0001 && cpuid(0x8000_0001, 0).edx & (1 << 20) != 0
}

/// Halt until the next interrupt (returns at once if one is pending and
/// interrupts are enabled).
pub fn hlt() {
    // SAFETY: HLT only waits; the caller decides whether IF is set.
    unsafe {
        asm!("hlt", options(nomem, nostack, preserves_flags));
    }
}
