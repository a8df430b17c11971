//! The VMCS: field encodings, the VMX instructions that reach it
//! (VMREAD, VMWRITE, VMPTRLD, VMCLEAR) and the TLB invalidation
//! instructions (INVEPT, INVVPID).
//!
//! A VMCS is opaque memory (Intel SDM vol. 3C, 25.2: only its first 8 bytes,
//! revision identifier and abort indicator, have a defined layout); every
//! field is reached through VMREAD/VMWRITE of the *current* VMCS. This
//! module keeps track of which VMCS is current on this CPU
//! ([`make_current`]), so a vCPU can make its own current before touching
//! fields, and two VMs can take turns on one CPU.
//!
//! Field encodings: Intel SDM vol. 3D, Appendix B (tables B-1 to B-14).

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};
use hvcore::addr::Hpa;

// 16-bit control fields (Appendix B.1.1).
pub const VPID: u32 = 0x0000;
// 16-bit guest-state fields (B.1.2).
pub const GUEST_ES_SELECTOR: u32 = 0x0800;
pub const GUEST_CS_SELECTOR: u32 = 0x0802;
pub const GUEST_SS_SELECTOR: u32 = 0x0804;
pub const GUEST_DS_SELECTOR: u32 = 0x0806;
pub const GUEST_FS_SELECTOR: u32 = 0x0808;
pub const GUEST_GS_SELECTOR: u32 = 0x080a;
pub const GUEST_LDTR_SELECTOR: u32 = 0x080c;
pub const GUEST_TR_SELECTOR: u32 = 0x080e;
pub const GUEST_PML_INDEX: u32 = 0x0812;
// 16-bit host-state fields (B.1.3).
pub const HOST_ES_SELECTOR: u32 = 0x0c00;
pub const HOST_CS_SELECTOR: u32 = 0x0c02;
pub const HOST_SS_SELECTOR: u32 = 0x0c04;
pub const HOST_DS_SELECTOR: u32 = 0x0c06;
pub const HOST_FS_SELECTOR: u32 = 0x0c08;
pub const HOST_GS_SELECTOR: u32 = 0x0c0a;
pub const HOST_TR_SELECTOR: u32 = 0x0c0c;
// 64-bit control fields (B.2.1).
pub const IO_BITMAP_A: u32 = 0x2000;
pub const IO_BITMAP_B: u32 = 0x2002;
pub const MSR_BITMAP: u32 = 0x2004;
pub const PML_ADDRESS: u32 = 0x200e;
pub const TSC_OFFSET: u32 = 0x2010;
pub const EPT_POINTER: u32 = 0x201a;
// 64-bit read-only data field (B.2.2).
pub const GUEST_PHYSICAL_ADDRESS: u32 = 0x2400;
// 64-bit guest-state fields (B.2.3).
pub const VMCS_LINK_POINTER: u32 = 0x2800;
pub const GUEST_DEBUGCTL: u32 = 0x2802;
pub const GUEST_PAT: u32 = 0x2804;
pub const GUEST_EFER: u32 = 0x2806;
// 64-bit host-state fields (B.2.4).
pub const HOST_PAT: u32 = 0x2c00;
pub const HOST_EFER: u32 = 0x2c02;
// 32-bit control fields (B.3.1).
pub const PIN_BASED_CONTROLS: u32 = 0x4000;
pub const PRIMARY_PROC_CONTROLS: u32 = 0x4002;
pub const EXCEPTION_BITMAP: u32 = 0x4004;
pub const CR3_TARGET_COUNT: u32 = 0x400a;
pub const EXIT_CONTROLS: u32 = 0x400c;
pub const EXIT_MSR_STORE_COUNT: u32 = 0x400e;
pub const EXIT_MSR_LOAD_COUNT: u32 = 0x4010;
pub const ENTRY_CONTROLS: u32 = 0x4012;
pub const ENTRY_MSR_LOAD_COUNT: u32 = 0x4014;
pub const ENTRY_INTERRUPTION_INFO: u32 = 0x4016;
pub const ENTRY_EXCEPTION_ERROR_CODE: u32 = 0x4018;
pub const ENTRY_INSTRUCTION_LENGTH: u32 = 0x401a;
pub const SECONDARY_PROC_CONTROLS: u32 = 0x401e;
// 32-bit read-only data fields (B.3.2).
pub const VM_INSTRUCTION_ERROR: u32 = 0x4400;
pub const EXIT_REASON: u32 = 0x4402;
pub const EXIT_INTERRUPTION_INFO: u32 = 0x4404;
pub const IDT_VECTORING_INFO: u32 = 0x4408;
pub const IDT_VECTORING_ERROR_CODE: u32 = 0x440a;
pub const EXIT_INSTRUCTION_LENGTH: u32 = 0x440c;
// 32-bit guest-state fields (B.3.3).
pub const GUEST_ES_LIMIT: u32 = 0x4800;
pub const GUEST_CS_LIMIT: u32 = 0x4802;
pub const GUEST_SS_LIMIT: u32 = 0x4804;
pub const GUEST_DS_LIMIT: u32 = 0x4806;
pub const GUEST_FS_LIMIT: u32 = 0x4808;
pub const GUEST_GS_LIMIT: u32 = 0x480a;
pub const GUEST_LDTR_LIMIT: u32 = 0x480c;
pub const GUEST_TR_LIMIT: u32 = 0x480e;
pub const GUEST_GDTR_LIMIT: u32 = 0x4810;
pub const GUEST_IDTR_LIMIT: u32 = 0x4812;
pub const GUEST_ES_AR: u32 = 0x4814;
pub const GUEST_CS_AR: u32 = 0x4816;
pub const GUEST_SS_AR: u32 = 0x4818;
pub const GUEST_DS_AR: u32 = 0x481a;
pub const GUEST_FS_AR: u32 = 0x481c;
pub const GUEST_GS_AR: u32 = 0x481e;
pub const GUEST_LDTR_AR: u32 = 0x4820;
pub const GUEST_TR_AR: u32 = 0x4822;
pub const GUEST_INTERRUPTIBILITY: u32 = 0x4824;
pub const GUEST_ACTIVITY_STATE: u32 = 0x4826;
pub const GUEST_SYSENTER_CS: u32 = 0x482a;
pub const GUEST_PREEMPTION_TIMER: u32 = 0x482e;
// 32-bit host-state field (B.3.4).
pub const HOST_SYSENTER_CS: u32 = 0x4c00;
// Natural-width control fields (B.4.1).
pub const CR0_GUEST_HOST_MASK: u32 = 0x6000;
pub const CR4_GUEST_HOST_MASK: u32 = 0x6002;
pub const CR0_READ_SHADOW: u32 = 0x6004;
pub const CR4_READ_SHADOW: u32 = 0x6006;
// Natural-width read-only data field (B.4.2).
pub const EXIT_QUALIFICATION: u32 = 0x6400;
// Natural-width guest-state fields (B.4.3).
pub const GUEST_CR0: u32 = 0x6800;
pub const GUEST_CR3: u32 = 0x6802;
pub const GUEST_CR4: u32 = 0x6804;
pub const GUEST_ES_BASE: u32 = 0x6806;
pub const GUEST_CS_BASE: u32 = 0x6808;
pub const GUEST_SS_BASE: u32 = 0x680a;
pub const GUEST_DS_BASE: u32 = 0x680c;
pub const GUEST_FS_BASE: u32 = 0x680e;
pub const GUEST_GS_BASE: u32 = 0x6810;
pub const GUEST_LDTR_BASE: u32 = 0x6812;
pub const GUEST_TR_BASE: u32 = 0x6814;
pub const GUEST_GDTR_BASE: u32 = 0x6816;
pub const GUEST_IDTR_BASE: u32 = 0x6818;
pub const GUEST_DR7: u32 = 0x681a;
pub const GUEST_RSP: u32 = 0x681c;
pub const GUEST_RIP: u32 = 0x681e;
pub const GUEST_RFLAGS: u32 = 0x6820;
pub const GUEST_PENDING_DEBUG: u32 = 0x6822;
pub const GUEST_SYSENTER_ESP: u32 = 0x6824;
pub const GUEST_SYSENTER_EIP: u32 = 0x6826;
// Natural-width host-state fields (B.4.4).
pub const HOST_CR0: u32 = 0x6c00;
pub const HOST_CR3: u32 = 0x6c02;
pub const HOST_CR4: u32 = 0x6c04;
pub const HOST_FS_BASE: u32 = 0x6c06;
pub const HOST_GS_BASE: u32 = 0x6c08;
pub const HOST_TR_BASE: u32 = 0x6c0a;
pub const HOST_GDTR_BASE: u32 = 0x6c0c;
pub const HOST_IDTR_BASE: u32 = 0x6c0e;
pub const HOST_SYSENTER_ESP: u32 = 0x6c10;
pub const HOST_SYSENTER_EIP: u32 = 0x6c12;
/// Written by the world switch itself, just before VMLAUNCH/VMRESUME.
pub const HOST_RSP: u32 = 0x6c14;
/// Written by the world switch itself.
pub const HOST_RIP: u32 = 0x6c16;

/// Why a VMX instruction failed (Intel SDM vol. 3C, 31.2 "Conventions").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxFail {
    /// VMfailInvalid (CF = 1): no current VMCS, or a bad operand.
    Invalid,
    /// VMfailValid (ZF = 1): the reason is in the VM-instruction error
    /// field of the current VMCS.
    Valid,
}

/// Decode RFLAGS after a VMX instruction (CF = bit 0, ZF = bit 6).
fn check(rflags: u64) -> Result<(), VmxFail> {
    if rflags & 1 != 0 {
        Err(VmxFail::Invalid)
    } else if rflags & (1 << 6) != 0 {
        Err(VmxFail::Valid)
    } else {
        Ok(())
    }
}

/// The VMCS that is current on this (the only guest-running) CPU.
static CURRENT: AtomicU64 = AtomicU64::new(0);

/// Read a field of the current VMCS; 0 if the read fails (an unsupported
/// field: the callers only read fields every VMX CPU has).
pub fn read(field: u32) -> u64 {
    let value: u64;
    let flags: u64;
    // SAFETY: VMREAD only reads the current VMCS into a register; it
    // cannot fault in VMX root operation at CPL 0 (the only place this
    // code runs once `super::enable` succeeded, which every caller
    // requires) and touches no memory.
    unsafe {
        asm!(
            "vmread {v}, {f}",
            "pushfq",
            "pop {fl}",
            f = in(reg) u64::from(field),
            v = out(reg) value,
            fl = out(reg) flags,
        );
    }
    if check(flags).is_ok() {
        value
    } else {
        0
    }
}

/// Write a field of the current VMCS.
pub fn write(field: u32, value: u64) -> Result<(), VmxFail> {
    let flags: u64;
    // SAFETY: VMWRITE changes only the current VMCS, which belongs to the
    // vCPU that made it current; a bad value is caught at VM entry, not
    // here. VMX root operation at CPL 0, as for `read`.
    unsafe {
        asm!(
            "vmwrite {f}, {v}",
            "pushfq",
            "pop {fl}",
            f = in(reg) u64::from(field),
            v = in(reg) value,
            fl = out(reg) flags,
        );
    }
    check(flags)
}

/// Make the VMCS at `vmcs` current (VMPTRLD), unless it already is.
///
/// # Safety
/// `vmcs` must be a VMCS region (revision identifier written, VMCLEARed
/// once) owned by the caller, and VMX must be on.
pub unsafe fn make_current(vmcs: Hpa) -> Result<(), VmxFail> {
    if CURRENT.load(Ordering::Relaxed) == vmcs.as_u64() {
        return Ok(());
    }
    let pa = vmcs.as_u64();
    let flags: u64;
    // SAFETY: the caller guarantees `vmcs` is a VMCS region it owns.
    // Intel SDM vol. 3C, 31.3 (VMPTRLD): the operand is the memory holding
    // the physical address.
    unsafe {
        asm!(
            "vmptrld [{p}]",
            "pushfq",
            "pop {fl}",
            p = in(reg) &pa,
            fl = out(reg) flags,
        );
    }
    check(flags)?;
    CURRENT.store(pa, Ordering::Relaxed);
    Ok(())
}

/// VMCLEAR `vmcs`: flush its cached state to memory, set its launch state
/// to clear, and forget it as current.
///
/// # Safety
/// `vmcs` must be a VMCS region owned by the caller; VMX must be on.
pub unsafe fn clear(vmcs: Hpa) -> Result<(), VmxFail> {
    let pa = vmcs.as_u64();
    let flags: u64;
    // SAFETY: the caller owns the region; VMCLEAR writes only it.
    // Intel SDM vol. 3C, 31.3 (VMCLEAR).
    unsafe {
        asm!(
            "vmclear [{p}]",
            "pushfq",
            "pop {fl}",
            p = in(reg) &pa,
            fl = out(reg) flags,
        );
    }
    let _ = CURRENT.compare_exchange(pa, 0, Ordering::Relaxed, Ordering::Relaxed);
    check(flags)
}

/// INVEPT type 1 (single context) or 2 (global). Intel SDM vol. 3C,
/// 31.3 (INVEPT) and 29.4.3.1.
pub fn invept(kind: u64, eptp: u64) -> Result<(), VmxFail> {
    let desc: [u64; 2] = [eptp, 0];
    let flags: u64;
    // SAFETY: INVEPT only invalidates cached translations; the descriptor
    // is a local 128-bit value. Callers pass a type the CPU reported.
    unsafe {
        asm!(
            "invept {k}, [{d}]",
            "pushfq",
            "pop {fl}",
            k = in(reg) kind,
            d = in(reg) desc.as_ptr(),
            fl = out(reg) flags,
        );
    }
    check(flags)
}

/// INVVPID type 1 (single context) or 2 (all contexts). Intel SDM vol. 3C,
/// 31.3 (INVVPID).
pub fn invvpid(kind: u64, vpid: u16) -> Result<(), VmxFail> {
    let desc: [u64; 2] = [u64::from(vpid), 0];
    let flags: u64;
    // SAFETY: as for `invept`: cached translations only, local descriptor.
    unsafe {
        asm!(
            "invvpid {k}, [{d}]",
            "pushfq",
            "pop {fl}",
            k = in(reg) kind,
            d = in(reg) desc.as_ptr(),
            fl = out(reg) flags,
        );
    }
    check(flags)
}

/// What the VM-instruction error number means (Intel SDM vol. 3C, 31.4,
/// table 31-1).
pub fn instruction_error_name(code: u64) -> &'static str {
    match code {
        2 => "VMLAUNCH with a non-clear VMCS",
        3 => "VMRESUME with a non-launched VMCS",
        5 => "VMRESUME after VMXOFF",
        7 => "VM entry with invalid control field(s)",
        8 => "VM entry with invalid host-state field(s)",
        9 => "VMPTRLD with an invalid physical address",
        11 => "VMPTRLD with an incorrect VMCS revision identifier",
        12 => "VMREAD/VMWRITE of an unsupported VMCS component",
        13 => "VMWRITE to a read-only VMCS component",
        26 => "VM entry with events blocked by MOV SS",
        28 => "invalid operand to INVEPT/INVVPID",
        _ => "VM entry failed (VM-instruction error)",
    }
}
