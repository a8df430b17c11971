//! The few x86-64 instructions the guest needs, wrapped once, on the
//! `x86_64` crate (port I/O, CR3, CS) and `core::arch` (CPUID, RDTSC).
//! Wrappers that cannot break memory safety (CPUID, RDTSC, reading
//! registers) are safe functions; port output is `unsafe` because a port
//! can start DMA or reset the machine.

use core::arch::asm;
use x86_64::instructions::port::Port;
use x86_64::instructions::segmentation::{Segment, CS};
use x86_64::registers::control::Cr3;

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
    // `__cpuid_count` saves and restores RBX, which LLVM reserves; CPUID
    // itself has no memory effects.
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    Cpuid {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// Read the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only writes EDX:EAX (CR4.TSD is clear at CPL 0 anyway).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Read CR3 (the guest page-table root).
pub fn read_cr3() -> u64 {
    let (frame, flags) = Cr3::read_raw();
    frame.start_address().as_u64() | u64::from(flags)
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
    CS::get_reg().0
}

/// Write one byte to an I/O port.
///
/// # Safety
/// The caller must know what the device at `port` does with the write.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller vouches for the port; OUT touches no memory.
    unsafe { Port::<u8>::new(port).write(value) };
}

/// Read one byte from an I/O port.
///
/// # Safety
/// The caller must know what the device at `port` does on a read.
pub unsafe fn inb(port: u16) -> u8 {
    // SAFETY: the caller vouches for the port; IN touches no memory.
    unsafe { Port::<u8>::new(port).read() }
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
