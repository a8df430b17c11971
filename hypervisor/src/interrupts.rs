//! Host interrupts and exceptions: the IDT, its assembly entry stubs and
//! the Rust dispatcher.
//!
//! * Every one of the 256 vectors has a 16-byte stub (`hv_isr_stubs + 16 *
//!   vector`) that pushes a zero error code when the CPU does not push one,
//!   then the vector number, and jumps to a common path that saves all
//!   general-purpose registers into a [`TrapFrame`] and calls
//!   [`hv_interrupt_dispatch`]. (`extern "x86-interrupt"` needs nightly.)
//! * Exceptions (0-31) and unexpected vectors are hypervisor faults: the
//!   frame, CR0/CR2/CR3/CR4 are printed after `HYPERVISOR FAULT: vector N
//!   (name) error_code=... rip=...`, then `hvmigrate: shutdown code=3` and
//!   power-off. #DF, NMI and #MC run on their own IST stacks.
//! * [`TIMER_VECTOR`] is the LAPIC timer: the handler counts the tick, runs
//!   the optional hook and sends EOI. It takes no lock, allocates nothing and
//!   prints nothing, so it is safe wherever interrupts are opened — in
//!   particular right after `#VMEXIT` + `stgi` with IF=1, where the SVM
//!   backend deliberately lets a pending tick in.
//! * The legacy 8259 PICs are remapped to 0xE0-0xEF and fully masked; a
//!   spurious IRQ 7/15 from them, and the LAPIC spurious vector, are ignored.
//!
//! Host interrupts stay masked except in such deliberate windows.

pub use crate::vectors::{PIC_BASE_VECTOR, SPURIOUS_VECTOR, TIMER_VECTOR};
use crate::{cpu, gdt, serial};
use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use x86_64::instructions::port::Port;
use x86_64::instructions::tables::lidt;
use x86_64::structures::DescriptorTablePointer;
use x86_64::VirtAddr;

// Vectors whose exceptions push an error code (AMD APM vol. 2, 8.2;
// Intel SDM vol. 3A, table 6-1): #DF 8, #TS 10, #NP 11, #SS 12, #GP 13,
// #PF 14, #AC 17, #CP 21, #VC 29, #SX 30.
global_asm!(
    r#"
    .section .text.hv_isr, "ax"
    .code64
    .balign 16
    .global hv_isr_stubs
hv_isr_stubs:
    .set hv_vec, 0
    .rept 256
    .balign 16
    .if (hv_vec == 8) | (hv_vec == 10) | (hv_vec == 11) | (hv_vec == 12) | (hv_vec == 13) | (hv_vec == 14) | (hv_vec == 17) | (hv_vec == 21) | (hv_vec == 29) | (hv_vec == 30)
    .else
    push 0
    .endif
    push hv_vec
    jmp hv_isr_common
    .set hv_vec, hv_vec + 1
    .endr

    .balign 16
hv_isr_common:
    // The CPU aligned RSP to 16 before pushing its 5-quadword frame; with
    // error code and vector that is 56 bytes, plus 15 registers = 176: the
    // call below sees a 16-byte aligned stack.
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
    call hv_interrupt_dispatch
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
"#
);

/// Registers saved by the entry path, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub r15: u64,        // 0x00
    pub r14: u64,        // 0x08
    pub r13: u64,        // 0x10
    pub r12: u64,        // 0x18
    pub r11: u64,        // 0x20
    pub r10: u64,        // 0x28
    pub r9: u64,         // 0x30
    pub r8: u64,         // 0x38
    pub rbp: u64,        // 0x40
    pub rdi: u64,        // 0x48
    pub rsi: u64,        // 0x50
    pub rdx: u64,        // 0x58
    pub rcx: u64,        // 0x60
    pub rbx: u64,        // 0x68
    pub rax: u64,        // 0x70
    pub vector: u64,     // 0x78
    pub error_code: u64, // 0x80
    // Pushed by the CPU (AMD APM vol. 2, 8.9.3; Intel SDM vol. 3A, 6.14.2).
    pub rip: u64,    // 0x88
    pub cs: u64,     // 0x90
    pub rflags: u64, // 0x98
    pub rsp: u64,    // 0xA0
    pub ss: u64,     // 0xA8
}
const _: () = assert!(core::mem::size_of::<TrapFrame>() == 0xB0);

/// One 16-byte interrupt-gate descriptor (AMD APM vol. 2, 4.8.4 figure
/// 4-24; Intel SDM vol. 3A, 6.14.1).
#[repr(C)]
#[derive(Clone, Copy)]
struct IdtEntry {
    offset_low: u16,  // 0x0
    selector: u16,    // 0x2
    ist: u8,          // 0x4 bits 2:0
    type_attr: u8,    // 0x5 P | DPL | type
    offset_mid: u16,  // 0x6
    offset_high: u32, // 0x8
    _reserved: u32,   // 0xC
}
const _: () = assert!(core::mem::size_of::<IdtEntry>() == 16);

impl IdtEntry {
    const EMPTY: IdtEntry = IdtEntry {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        _reserved: 0,
    };

    /// Present, DPL 0, 64-bit interrupt gate (type 0xE: IF cleared on entry).
    fn interrupt_gate(handler: u64, ist: u8) -> Self {
        IdtEntry {
            offset_low: handler as u16,
            selector: gdt::CODE_SELECTOR,
            ist: ist & 7,
            type_attr: 0x8E,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            _reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt([IdtEntry; 256]);

struct IdtCell(UnsafeCell<Idt>);
// SAFETY: written only by `init` on the single CPU with interrupts off;
// afterwards only the CPU reads it.
unsafe impl Sync for IdtCell {}

static IDT: IdtCell = IdtCell(UnsafeCell::new(Idt([IdtEntry::EMPTY; 256])));

unsafe extern "C" {
    static hv_isr_stubs: u8;
}

/// Fill and load the IDT, and park the legacy PICs. Call once after
/// [`gdt::init`], interrupts disabled.
pub fn init() {
    let stubs = core::ptr::addr_of!(hv_isr_stubs) as u64;
    let idt = IDT.0.get();
    for vector in 0..256u64 {
        let ist = match vector {
            2 => gdt::IST_NMI,
            8 => gdt::IST_DOUBLE_FAULT,
            18 => gdt::IST_MACHINE_CHECK,
            _ => 0,
        };
        // SAFETY: single CPU, interrupts off, IDT not yet loaded or only
        // being replaced entry by entry before LIDT below.
        unsafe { (*idt).0[vector as usize] = IdtEntry::interrupt_gate(stubs + 16 * vector, ist) };
    }
    let ptr = DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: VirtAddr::new(idt as u64),
    };
    // SAFETY: the IDT is fully populated with gates to valid stubs and is
    // a static, so it outlives its use.
    unsafe { lidt(&ptr) };
    park_legacy_pics();
}

/// Remap the two 8259A PICs to [`PIC_BASE_VECTOR`] and mask every line
/// (8259A datasheet, ICW1-ICW4 and OCW1): the LAPIC timer is the only
/// interrupt source the hypervisor uses.
fn park_legacy_pics() {
    // SAFETY: ports 0x20/0x21/0xA0/0xA1 are the PICs, owned by the
    // hypervisor; the sequence only remaps and masks them.
    unsafe {
        Port::<u8>::new(0x20).write(0x11); // ICW1: init, ICW4 follows
        Port::<u8>::new(0xA0).write(0x11);
        Port::<u8>::new(0x21).write(PIC_BASE_VECTOR); // ICW2: vector base
        Port::<u8>::new(0xA1).write(PIC_BASE_VECTOR + 8);
        Port::<u8>::new(0x21).write(4); // ICW3: slave on IRQ2
        Port::<u8>::new(0xA1).write(2);
        Port::<u8>::new(0x21).write(1); // ICW4: 8086 mode
        Port::<u8>::new(0xA1).write(1);
        Port::<u8>::new(0x21).write(0xFF); // OCW1: mask all
        Port::<u8>::new(0xA1).write(0xFF);
    }
}

/// Base address of the IDT (for VMCS host-state fields).
pub fn idt_base() -> u64 {
    IDT.0.get() as u64
}

// CLI and STI must be compiler barriers: no `nomem`. With `nomem` the
// compiler may move memory accesses across them, out of a section that
// relies on interrupts being masked ([`without`]), and may keep values in
// registers across a window in which a handler runs and writes memory. The
// `x86_64` crate's `disable`/`enable` are written that way.

/// Mask maskable interrupts (`cli`).
pub fn disable() {
    x86_64::instructions::interrupts::disable();
}

/// Unmask maskable interrupts (`sti`). Only after [`init`].
pub fn enable() {
    x86_64::instructions::interrupts::enable();
}

/// Whether RFLAGS.IF is set.
pub fn are_enabled() -> bool {
    x86_64::instructions::interrupts::are_enabled()
}

/// Run `f` with interrupts masked, restoring the previous state after.
pub fn without<R>(f: impl FnOnce() -> R) -> R {
    let was = are_enabled();
    disable();
    let r = f();
    if was {
        enable();
    }
    r
}

/// Open an interrupt window: `sti; hlt` until the next interrupt, then mask
/// again. The STI shadow makes the pair atomic (no wake-up is lost).
pub fn wait_for_interrupt() {
    // SAFETY: sets IF for the duration of HLT only; handlers are installed.
    // Not `nomem`: the handler that wakes us writes memory (tick count,
    // hook) while this block runs.
    unsafe { asm!("sti", "hlt", "cli", options(nostack)) };
}

static TIMER_HOOK: AtomicUsize = AtomicUsize::new(0);

/// Install `hook` to run on every timer tick (in interrupt context, after
/// the tick is counted, before EOI). It must not take locks, allocate or
/// print. Replaces any earlier hook.
pub fn set_timer_hook(hook: fn()) {
    TIMER_HOOK.store(hook as usize, Ordering::Release);
}

/// The Rust side of every vector.
#[no_mangle]
extern "C" fn hv_interrupt_dispatch(frame: &mut TrapFrame) {
    let vector = frame.vector as u8;
    match vector {
        TIMER_VECTOR => {
            crate::lapic::count_tick();
            let hook = TIMER_HOOK.load(Ordering::Acquire);
            if hook != 0 {
                // SAFETY: only `set_timer_hook` stores non-zero values, and
                // it stores `fn()` pointers.
                let hook: fn() = unsafe { core::mem::transmute::<usize, fn()>(hook) };
                hook();
            }
            crate::lapic::eoi();
        }
        // Spurious interrupts need no EOI (Intel SDM vol. 3A, 11.9; 8259A
        // spurious IRQ 7/15 likewise).
        SPURIOUS_VECTOR => {}
        v if (PIC_BASE_VECTOR..PIC_BASE_VECTOR + 16).contains(&v) => {}
        _ => fault(frame),
    }
}

/// Exception names (AMD APM vol. 2, table 8-1; Intel SDM vol. 3A, table 6-1).
pub fn vector_name(vector: u64) -> &'static str {
    match vector {
        0 => "divide error",
        1 => "debug",
        2 => "NMI",
        3 => "breakpoint",
        4 => "overflow",
        5 => "bound range",
        6 => "invalid opcode",
        7 => "device not available",
        8 => "double fault",
        10 => "invalid TSS",
        11 => "segment not present",
        12 => "stack fault",
        13 => "general protection",
        14 => "page fault",
        16 => "x87 floating point",
        17 => "alignment check",
        18 => "machine check",
        19 => "SIMD floating point",
        20 => "virtualization",
        21 => "control protection",
        28 => "hypervisor injection",
        29 => "VMM communication",
        30 => "security",
        9 | 15 | 22..=27 | 31 => "reserved",
        _ => "unexpected interrupt",
    }
}

static IN_FAULT: AtomicBool = AtomicBool::new(false);

fn fault(f: &TrapFrame) -> ! {
    if IN_FAULT.swap(true, Ordering::AcqRel) {
        // A fault while reporting a fault: do not recurse.
        crate::power::power_off(3);
    }
    serial::write_fmt_emergency(format_args!(
        "HYPERVISOR FAULT: vector {} ({}) error_code={:#x} rip={:#018x}\n\
         cs={:#06x} rflags={:#010x} rsp={:#018x} ss={:#06x}\n\
         rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n\
         rsi={:#018x} rdi={:#018x} rbp={:#018x} r8 ={:#018x}\n\
         r9 ={:#018x} r10={:#018x} r11={:#018x} r12={:#018x}\n\
         r13={:#018x} r14={:#018x} r15={:#018x}\n\
         cr0={:#018x} cr2={:#018x} cr3={:#018x} cr4={:#018x}\n",
        f.vector,
        vector_name(f.vector),
        f.error_code,
        f.rip,
        f.cs,
        f.rflags,
        f.rsp,
        f.ss,
        f.rax,
        f.rbx,
        f.rcx,
        f.rdx,
        f.rsi,
        f.rdi,
        f.rbp,
        f.r8,
        f.r9,
        f.r10,
        f.r11,
        f.r12,
        f.r13,
        f.r14,
        f.r15,
        cpu::read_cr0(),
        cpu::read_cr2(),
        cpu::read_cr3(),
        cpu::read_cr4(),
    ));
    crate::power::shutdown(3)
}

/// Deliberately fault in the hypervisor (node command line `fault-test=`):
/// `int3`, `ud` (ud2), `pf` (read of an unmapped address), `gp`
/// (non-canonical address), `wp` (write to the read-only text), `stack`
/// (overflow into the guard page: #PF that cannot be delivered on the
/// stack, so #DF on its IST stack) or `panic`. Unknown kinds return
/// without faulting.
pub fn trigger_test_fault(kind: &str) {
    match kind {
        "int3" => {
            // SAFETY: the breakpoint is the point; the fault handler never
            // returns, it powers the node off.
            unsafe { asm!("int3") }
        }
        "ud" => {
            // SAFETY: as above (#UD).
            unsafe { asm!("ud2") }
        }
        "pf" => {
            let p = 0x0000_7F00_0000_0000u64 as *const u64;
            // SAFETY: as above: the address is canonical but beyond the
            // identity map, so the read raises #PF and never completes.
            let _ = unsafe { p.read_volatile() };
        }
        "gp" => {
            let p = 0x8000_0000_0000_0000u64 as *const u64;
            // SAFETY: as above: a non-canonical address raises #GP.
            let _ = unsafe { p.read_volatile() };
        }
        "wp" => {
            let p = trigger_test_fault as *const () as *mut u8;
            // SAFETY: as above: text is mapped read-only and CR0.WP is set,
            // so the write raises #PF and never lands.
            unsafe { p.write_volatile(0xCC) };
        }
        "stack" => {
            // SAFETY: as above: RSP moves into the unmapped guard page below
            // the boot stack; the push faults, the #PF cannot be delivered
            // on that stack, the CPU raises #DF on IST1.
            unsafe {
                asm!(
                    "2:",
                    "sub rsp, 4096",
                    "push rax",
                    "jmp 2b",
                    options(noreturn)
                )
            }
        }
        "panic" => panic!("fault-test=panic"),
        _ => {}
    }
}
