//! The world switch: VMLAUNCH/VMRESUME with the guest's general registers
//! loaded around it, and an interrupt window after the exit.
//!
//! What VM entry and VM exit switch (Intel SDM vol. 3C, 27.3 and 28.5): the
//! guest's and host's RSP, RIP, RFLAGS, control registers, segment
//! registers, GDTR/IDTR, TR, SYSENTER MSRs and (with the controls this
//! backend sets) EFER and PAT come from the VMCS. The other general
//! registers are not touched: this routine saves the host's callee-saved
//! ones on its stack and loads/stores the guest's from a
//! [`Regs`](hvcore::vcpu::Regs). HOST_RSP and HOST_RIP are written here,
//! right before entry, so the exit lands on this very stack frame.
//!
//! Interrupts: external interrupts exit the guest (pin-based control) and
//! are *not* acknowledged on exit, so the LAPIC still holds them; VM exit
//! clears RFLAGS.IF (28.5.3), so after the guest's registers are saved an
//! `sti; nop; cli` window lets the host IDT take the pending interrupt
//! (the preemption timer), like the SVM path does after STGI.
//!
//! Bochs 2.7 computes its interrupt mask while loading the guest's RFLAGS,
//! before it counts the CPU as in the guest, so an interrupt never exits a
//! guest running with IF = 0 there; the vCPU also arms the VMX-preemption
//! timer so the host gets the CPU back anyway (see `vcpu.rs`).

use hvcore::vcpu::Regs;

core::arch::global_asm!(
    ".section .text.hv_vmx_world_switch,\"ax\",@progbits",
    ".global hv_vmx_world_switch",
    ".type hv_vmx_world_switch,@function",
    "hv_vmx_world_switch:",
    // rdi = *mut Regs, rsi = launched (0: VMLAUNCH, else VMRESUME).
    // Returns rax = 0 after a VM exit, 1 on VMfailInvalid, 2 on
    // VMfailValid (the VMCS's instruction-error field says why).
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "pushfq",
    "push rdi",        // [rsp]: the Regs pointer, found again after the exit
    "mov rax, 0x6c14", // HOST_RSP
    "vmwrite rax, rsp",
    "mov rax, 0x6c16", // HOST_RIP
    "lea rdx, [rip + 2f]",
    "vmwrite rax, rdx",
    "test rsi, rsi", // flags survive the MOVs below
    "mov rax, [rdi + 0]",
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
    "jnz 3f",
    "vmlaunch",
    "jmp 4f",
    "3:",
    "vmresume",
    "4:",
    // Entry failed before the guest ran: CF = VMfailInvalid, ZF =
    // VMfailValid; the host's callee-saved registers are restored below.
    "mov eax, 1",
    "mov ecx, 2",
    "cmovz eax, ecx",
    "jmp 5f",
    "2:",
    // VM exit: RSP = HOST_RSP (so [rsp] is the Regs pointer), RFLAGS =
    // 0x2; the general registers still hold guest values.
    "push rdi",
    "mov rdi, [rsp + 8]",
    "mov [rdi + 0], rax",
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
    "sti", // a pending host interrupt is taken here
    "nop",
    "cli",
    "xor eax, eax",
    "5:",
    "add rsp, 8",
    "popfq", // the caller's IF
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
    ".size hv_vmx_world_switch, . - hv_vmx_world_switch",
);

extern "C" {
    fn hv_vmx_world_switch(regs: *mut Regs, launched: u64) -> u64;
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

/// How one entry attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchEnd {
    /// The guest ran and exited; the exit reason is in the VMCS.
    Exited,
    /// VMLAUNCH/VMRESUME failed with VMfailInvalid (no current VMCS).
    FailInvalid,
    /// VMLAUNCH/VMRESUME failed with VMfailValid (see the VM-instruction
    /// error field).
    FailValid,
}

/// Enter the guest of the current VMCS once, until the next VM exit.
///
/// # Safety
/// VMX must be on; the current VMCS must be fully initialised (controls,
/// host state for this CPU, guest state) and exclusively owned by the
/// caller, its EPT mapping only memory the guest may own; `launched` must
/// be its launch state. The host IDT must be able to take any pending
/// interrupt (the routine opens an interrupt window after the exit).
pub unsafe fn world_switch(regs: &mut Regs, launched: bool) -> SwitchEnd {
    // SAFETY: the caller upholds the contract; the routine preserves the
    // callee-saved registers and the caller's RFLAGS and writes only
    // `regs` and the current VMCS's HOST_RSP/HOST_RIP.
    match unsafe { hv_vmx_world_switch(regs, u64::from(launched)) } {
        0 => SwitchEnd::Exited,
        1 => SwitchEnd::FailInvalid,
        _ => SwitchEnd::FailValid,
    }
}
