//! The few x86-64 instructions the guest needs, wrapped once. Wrappers that
//! cannot break memory safety (CPUID, RDTSC, reading registers) are safe
//! functions; port output is `unsafe` because a port can start DMA or reset
//! the machine.

use core::arch::asm;

/// The four CPUID result registers.
#[derive(Clone, Copy, Debug)]
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Execute CPUID for `leaf`/`subleaf` (AMD APM vol. 3, "CPUID").
pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    let (eax, ebx, ecx, edx): (u32, u64, u32, u32);
    // SAFETY: CPUID only writes the four result registers; RBX is reserved
    // by LLVM, so it is saved in a scratch register and swapped back.
    unsafe {
        asm!(
            "mov {tmp}, rbx",
            "cpuid",
            "xchg {tmp}, rbx",
            tmp = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nostack, preserves_flags),
        );
    }
    Cpuid {
        eax,
        ebx: ebx as u32,
        ecx,
        edx,
    }
}

/// Read the time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC only writes EDX:EAX.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Read CR3 (the guest page-table root).
pub fn read_cr3() -> u64 {
    let cr3: u64;
    // SAFETY: reading CR3 has no side effects (we run at CPL 0).
    unsafe { asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags)) };
    cr3
}

/// Read the current stack pointer.
pub fn read_rsp() -> u64 {
    let rsp: u64;
    // SAFETY: copies RSP into a register; nothing else changes.
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) };
    rsp
}

/// Read the CS selector.
pub fn read_cs() -> u16 {
    let cs: u16;
    // SAFETY: copies CS into a register; nothing else changes.
    unsafe { asm!("mov {:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs
}

/// Write one byte to an I/O port.
///
/// # Safety
/// The caller must know what the device at `port` does with the write.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller vouches for the port; OUT touches no memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Read one byte from an I/O port.
///
/// # Safety
/// The caller must know what the device at `port` does on a read.
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: the caller vouches for the port; IN touches no memory.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Write the byte at `gpa` back unchanged, which makes its page dirty for
/// the hypervisor's write tracking without changing memory contents.
///
/// # Safety
/// `gpa` must be mapped, writable guest RAM. Concurrent writers would race,
/// but the guest has one vCPU and runs with interrupts disabled.
pub unsafe fn touch_byte(gpa: u64) {
    // SAFETY: the caller guarantees the byte is mapped and writable; the
    // load and store are in asm, so no Rust reference is involved and the
    // stored value equals the loaded one.
    unsafe {
        asm!(
            "mov {tmp}, byte ptr [{p}]",
            "mov byte ptr [{p}], {tmp}",
            p = in(reg) gpa,
            tmp = out(reg_byte) _,
            options(nostack, preserves_flags),
        );
    }
}

/// Stop this vCPU for good (the hypervisor sees HLT with interrupts off).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: CLI/HLT only stop this CPU; nothing in memory changes.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}
