//! The world switch: `vmrun` with the host's and the guest's register state
//! swapped around it, and an interrupt window afterwards.
//!
//! What VMRUN and #VMEXIT do and do not switch (AMD APM vol. 2, 15.5.1 and
//! 15.6): VMRUN saves the host's RAX, RSP, RIP, RFLAGS, CR0/3/4, EFER, GDTR,
//! IDTR, CS/SS/DS/ES to the host save area (VM_HSAVE_PA) and loads the
//! guest's from the VMCB (RAX included); #VMEXIT reverses that. The other
//! general registers are not touched: this routine saves the host's
//! callee-saved ones on its stack and loads/stores the guest's from a
//! [`Regs`](hvcore::vcpu::Regs). FS, GS, TR, LDTR, KernelGsBase, STAR, LSTAR,
//! CSTAR, SFMASK and SYSENTER_* are switched only by VMLOAD/VMSAVE (15.5.2):
//! the host's go to a separate host-state VMCB page around the guest's.
//!
//! Interrupts (15.17, 15.21.1): CLGI holds off interrupts from before the
//! host state is saved until after it is restored; RFLAGS.IF is set before
//! VMRUN because with V_INTR_MASKING the host's IF at VMRUN decides whether
//! physical interrupts exit the guest. After the host state is back, STGI
//! with IF=1 lets a pending interrupt (the LAPIC timer that caused an INTR
//! exit) be taken by the host's IDT; then the caller's RFLAGS are restored.

use hvcore::addr::Hpa;
use hvcore::vcpu::Regs;

core::arch::global_asm!(
    ".section .text.hv_svm_world_switch,\"ax\",@progbits",
    ".global hv_svm_world_switch",
    ".type hv_svm_world_switch,@function",
    "hv_svm_world_switch:",
    // rdi = *mut Regs, rsi = guest VMCB PA, rdx = host-state VMCB PA.
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "pushfq",
    "push rdi", // [rsp+16] after the next two pushes
    "push rdx", // [rsp+8]
    "push rsi", // [rsp+0]
    "clgi",
    "mov rax, rdx",
    "vmsave rax", // host FS/GS/TR/LDTR/KernelGsBase/STAR/.../SYSENTER
    "mov rax, rsi",
    "vmload rax", // guest's
    "sti",        // GIF=0 still blocks delivery; IF=1 arms INTR exits
    // Guest GPRs (offsets of hvcore::vcpu::Regs, asserted below).
    "mov rbx, [rdi + 8]",
    "mov rcx, [rdi + 16]",
    "mov rdx, [rdi + 24]",
    "mov rsi, [rdi + 32]",
    "mov rbp, [rdi + 48]",
    "mov r8, [rdi + 56]",
    "mov r9, [rdi + 64]",
    "mov r10, [rdi + 72]",
    "mov r11, [rdi + 80]",
    "mov r12, [rdi + 88]",
    "mov r13, [rdi + 96]",
    "mov r14, [rdi + 104]",
    "mov r15, [rdi + 112]",
    "mov rdi, [rdi + 40]",
    "vmrun rax",
    // #VMEXIT: RAX = guest VMCB PA, RSP/RIP/RFLAGS are the host's again,
    // GIF = 0; the other GPRs still hold guest values.
    "push rdi",
    "mov rdi, [rsp + 24]",
    "mov [rdi + 8], rbx",
    "mov [rdi + 16], rcx",
    "mov [rdi + 24], rdx",
    "mov [rdi + 32], rsi",
    "pop qword ptr [rdi + 40]",
    "mov [rdi + 48], rbp",
    "mov [rdi + 56], r8",
    "mov [rdi + 64], r9",
    "mov [rdi + 72], r10",
    "mov [rdi + 80], r11",
    "mov [rdi + 88], r12",
    "mov [rdi + 96], r13",
    "mov [rdi + 104], r14",
    "mov [rdi + 112], r15",
    "vmsave rax", // guest FS/GS/... back into its VMCB
    "mov rax, [rsp + 8]",
    "vmload rax", // host's
    "stgi",       // IF=1: a pending host interrupt is taken here
    "nop",
    "cli",
    "add rsp, 24",
    "popfq", // the caller's IF
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
    ".size hv_svm_world_switch, . - hv_svm_world_switch",
);

extern "C" {
    fn hv_svm_world_switch(regs: *mut Regs, guest_vmcb: u64, host_vmcb: u64);
}

// The asm above hard-codes these offsets.
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(Regs, rax) == 0);
    assert!(offset_of!(Regs, rbx) == 8);
    assert!(offset_of!(Regs, rcx) == 16);
    assert!(offset_of!(Regs, rdx) == 24);
    assert!(offset_of!(Regs, rsi) == 32);
    assert!(offset_of!(Regs, rdi) == 40);
    assert!(offset_of!(Regs, rbp) == 48);
    assert!(offset_of!(Regs, r8) == 56);
    assert!(offset_of!(Regs, r15) == 112);
};

/// Run the guest of `guest_vmcb` once, until the next #VMEXIT.
///
/// # Safety
/// SVM must be enabled on this CPU (EFER.SVME, VM_HSAVE_PA set);
/// `guest_vmcb` must be the physical address of a valid, exclusively owned
/// VMCB whose nested page table maps only memory the guest may own; and
/// `host_vmcb` the physical address of this CPU's host-state page. The host
/// IDT must be able to take any pending interrupt (the routine opens an
/// interrupt window after the exit).
pub unsafe fn world_switch(regs: &mut Regs, guest_vmcb: Hpa, host_vmcb: Hpa) {
    // SAFETY: the caller upholds the contract above; the routine preserves
    // all callee-saved registers and the caller's RFLAGS, and touches only
    // `regs` and the two VMCB pages.
    unsafe { hv_svm_world_switch(regs, guest_vmcb.as_u64(), host_vmcb.as_u64()) }
}
