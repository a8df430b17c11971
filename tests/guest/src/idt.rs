//! A minimal IDT for the 32 exception vectors: 64-bit interrupt gates (AMD
//! APM vol. 2, 4.8.4 and 8.9) whose asm stubs save the general registers and
//! call one Rust handler with an [`ExceptionFrame`].
//!
//! The handler resolves a #GP the `bad-msr` case asked for (count it, skip
//! the 2-byte `rdmsr`); every other exception is unexpected and fails the
//! case with its vector, error code and RIP.
//!
//! Vector [`TIMER_VECTOR`] is the `interrupt` case's local APIC timer: its
//! stub counts the interrupt ([`timer_ticks`]) and writes the APIC's EOI
//! register (an MMIO store the hypervisor emulates).

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Saved state at the stub's call into Rust, lowest address first: the 15
/// registers the stub pushed (R15 last), the vector and error code it pushed
/// (0 for vectors without one), then the CPU's interrupt frame.
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}
const _: () = assert!(core::mem::size_of::<ExceptionFrame>() == 22 * 8);

// Stubs: vectors 8, 10-14, 17, 21, 29 and 30 push an error code (AMD APM
// vol. 2, 8.2); the others push a 0 in its place so one frame layout fits
// all. 15 pushes + vector + error code + the CPU's 5 words = 22 words; the
// CPU aligned RSP to 16 before its pushes, so RSP is 16-aligned at `call`.
global_asm!(
    r#"
.section .text.guest_isr,"ax",@progbits
.macro GUEST_ISR_NOERR vec
guest_isr_\vec:
    push 0
    push \vec
    jmp guest_isr_common
.endm
.macro GUEST_ISR_ERR vec
guest_isr_\vec:
    push \vec
    jmp guest_isr_common
.endm
GUEST_ISR_NOERR 0
GUEST_ISR_NOERR 1
GUEST_ISR_NOERR 2
GUEST_ISR_NOERR 3
GUEST_ISR_NOERR 4
GUEST_ISR_NOERR 5
GUEST_ISR_NOERR 6
GUEST_ISR_NOERR 7
GUEST_ISR_ERR 8
GUEST_ISR_NOERR 9
GUEST_ISR_ERR 10
GUEST_ISR_ERR 11
GUEST_ISR_ERR 12
GUEST_ISR_ERR 13
GUEST_ISR_ERR 14
GUEST_ISR_NOERR 15
GUEST_ISR_NOERR 16
GUEST_ISR_ERR 17
GUEST_ISR_NOERR 18
GUEST_ISR_NOERR 19
GUEST_ISR_NOERR 20
GUEST_ISR_ERR 21
GUEST_ISR_NOERR 22
GUEST_ISR_NOERR 23
GUEST_ISR_NOERR 24
GUEST_ISR_NOERR 25
GUEST_ISR_NOERR 26
GUEST_ISR_NOERR 27
GUEST_ISR_NOERR 28
GUEST_ISR_ERR 29
GUEST_ISR_ERR 30
GUEST_ISR_NOERR 31
guest_isr_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    cld
    call guest_exception_handler
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq

.section .rodata.guest_isr_table,"a",@progbits
.balign 8
.global guest_isr_table
guest_isr_table:
    .quad guest_isr_0, guest_isr_1, guest_isr_2, guest_isr_3
    .quad guest_isr_4, guest_isr_5, guest_isr_6, guest_isr_7
    .quad guest_isr_8, guest_isr_9, guest_isr_10, guest_isr_11
    .quad guest_isr_12, guest_isr_13, guest_isr_14, guest_isr_15
    .quad guest_isr_16, guest_isr_17, guest_isr_18, guest_isr_19
    .quad guest_isr_20, guest_isr_21, guest_isr_22, guest_isr_23
    .quad guest_isr_24, guest_isr_25, guest_isr_26, guest_isr_27
    .quad guest_isr_28, guest_isr_29, guest_isr_30, guest_isr_31
"#
);

extern "C" {
    /// The 32 stub addresses, defined in the asm above.
    static guest_isr_table: [u64; EXCEPTIONS];
    /// The timer interrupt's stub, defined below.
    fn guest_irq_timer();
}

/// Interrupts taken on [`TIMER_VECTOR`].
static TIMER_TICKS: AtomicU64 = AtomicU64::new(0);

/// The local APIC's EOI register (xAPIC page at its reset base).
pub const LAPIC_EOI_GPA: u64 = 0xfee0_00b0;

// Count the interrupt, EOI through the APIC page (`mov [rax], ecx`: an
// MMIO store), return. Interrupt gate: IF is clear until the IRETQ.
global_asm!(
    r#"
.section .text.guest_irq,"ax",@progbits
.global guest_irq_timer
guest_irq_timer:
    push rax
    push rcx
    lock inc qword ptr [rip + {ticks}]
    mov rax, {eoi}
    xor ecx, ecx
    mov dword ptr [rax], ecx
    pop rcx
    pop rax
    iretq
"#,
    ticks = sym TIMER_TICKS,
    eoi = const LAPIC_EOI_GPA,
);

/// Exception vectors with a stub of their own.
const EXCEPTIONS: usize = 32;
/// The `interrupt` case's timer vector.
pub const TIMER_VECTOR: u8 = 0x40;
/// Gates in the IDT: the exceptions and everything up to the timer.
const VECTORS: usize = TIMER_VECTOR as usize + 1;

/// Timer interrupts taken so far.
pub fn timer_ticks() -> u64 {
    TIMER_TICKS.load(Ordering::Relaxed)
}

/// One 16-byte IDT gate (AMD APM vol. 2, figure 4-24).
#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}
const _: () = assert!(core::mem::size_of::<Gate>() == 16);

/// Present, DPL 0, type 0xE (64-bit interrupt gate: IF cleared on entry).
const GATE_INTERRUPT: u8 = 0x8e;

impl Gate {
    const EMPTY: Gate = Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    fn interrupt(handler: u64, selector: u16) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector,
            ist: 0,
            type_attr: GATE_INTERRUPT,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

/// The LIDT operand (AMD APM vol. 3, "LIDT").
#[repr(C, packed)]
struct DescriptorTablePointer {
    limit: u16,
    base: u64,
}

#[repr(C, align(16))]
struct Idt(UnsafeCell<[Gate; VECTORS]>);

// SAFETY: the guest has one vCPU; the table is written only by `init`, before
// LIDT, and afterwards only read by the CPU.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([Gate::EMPTY; VECTORS]));

/// Set while the `bad-msr` case expects a #GP.
static EXPECT_GP: AtomicBool = AtomicBool::new(false);
/// #GPs taken while [`EXPECT_GP`] was set.
static GP_COUNT: AtomicU64 = AtomicU64::new(0);

/// Fill the IDT and load it.
pub fn init() {
    let cs = crate::arch::read_cs();
    // SAFETY: `guest_isr_table` is 32 initialised u64s in .rodata.
    let table = unsafe { &guest_isr_table };
    // SAFETY: nothing else accesses the IDT while `init` writes it (single
    // vCPU, interrupts disabled, the table is not loaded yet or its entries
    // are replaced by equal ones).
    let idt = unsafe { &mut *IDT.0.get() };
    for (gate, &handler) in idt.iter_mut().zip(table.iter()) {
        *gate = Gate::interrupt(handler, cs);
    }
    idt[usize::from(TIMER_VECTOR)] = Gate::interrupt(guest_irq_timer as *const () as u64, cs);
    let ptr = DescriptorTablePointer {
        limit: (core::mem::size_of::<[Gate; VECTORS]>() - 1) as u16,
        base: IDT.0.get() as u64,
    };
    // SAFETY: the IDT is a static that lives for ever and its gates point at
    // the stubs above, with the current code selector.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) };
}

/// Expect #GPs from now on (`bad-msr`), resetting the count.
pub fn expect_gp(on: bool) {
    GP_COUNT.store(0, Ordering::Relaxed);
    EXPECT_GP.store(on, Ordering::Relaxed);
}

/// #GPs counted since [`expect_gp`].
pub fn gp_count() -> u64 {
    GP_COUNT.load(Ordering::Relaxed)
}

/// Load an IDT with limit 0 and raise #UD: #UD cannot be delivered (#GP),
/// neither can that (#DF), nor that: a triple fault (shutdown).
pub fn triple_fault() {
    let ptr = DescriptorTablePointer { limit: 0, base: 0 };
    // SAFETY: deliberately destroys exception delivery; the VM shuts down at
    // the `ud2`. Should the hypervisor resume us anyway, execution continues
    // after the asm block (`ud2` is not `noreturn` here) and the caller
    // reports that.
    unsafe { asm!("lidt [{}]", "ud2", in(reg) &ptr, options(nostack)) };
}

fn vector_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        21 => "#CP",
        29 => "#VC",
        30 => "#SX",
        _ => "reserved",
    }
}

/// Called by `guest_isr_common` with the saved state.
#[no_mangle]
extern "C" fn guest_exception_handler(frame: &mut ExceptionFrame) {
    if frame.vector == 13 && EXPECT_GP.load(Ordering::Relaxed) {
        GP_COUNT.fetch_add(1, Ordering::Relaxed);
        // `rdmsr` is 0F 32: two bytes.
        frame.rip += 2;
        return;
    }
    crate::fail!(
        "unexpected exception {} ({}) error code {:#x} at RIP {:#x} RSP {:#x}",
        frame.vector,
        vector_name(frame.vector),
        frame.error_code,
        frame.rip,
        frame.rsp
    );
}
