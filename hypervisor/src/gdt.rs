//! The host GDT and 64-bit TSS.
//!
//! Layout (selectors): 0x00 null, 0x08 64-bit code (DPL 0), 0x10 data
//! (DPL 0), 0x18 the 16-byte TSS descriptor. The TSS carries IST stacks for
//! the exceptions that must not run on a possibly broken stack: #DF (IST1),
//! NMI (IST2) and #MC (IST3). TR is loaded with a non-zero selector because
//! VMX requires a usable host TR (Intel SDM vol. 3C, 26.2.3) and SVM's
//! VMSAVE/VMLOAD of TR assumes one (AMD APM vol. 2, 15.5.2).
//!
//! Single CPU: one GDT, one TSS. They are written once in [`init`] before
//! LGDT/LTR and never again (the CPU sets the TSS descriptor's busy bit).

use core::arch::asm;
use core::cell::UnsafeCell;
use core::mem::size_of;

/// 64-bit code segment selector.
pub const CODE_SELECTOR: u16 = 0x08;
/// Data segment selector (DS/ES/SS).
pub const DATA_SELECTOR: u16 = 0x10;
/// TSS selector (TR).
pub const TSS_SELECTOR: u16 = 0x18;

/// IST slot (1-based, as the IDT names it) for #DF.
pub const IST_DOUBLE_FAULT: u8 = 1;
/// IST slot for NMI.
pub const IST_NMI: u8 = 2;
/// IST slot for #MC.
pub const IST_MACHINE_CHECK: u8 = 3;

const IST_STACK_BYTES: usize = 16 * 1024;

/// 64-bit TSS (AMD APM vol. 2, 12.2.5 figure 12-8; Intel SDM vol. 3A, 8.7).
#[repr(C, packed(4))]
pub struct Tss {
    _reserved0: u32, // 0x00
    rsp: [u64; 3],   // 0x04 RSP0-2
    _reserved1: u64, // 0x1C
    ist: [u64; 7],   // 0x24 IST1-7
    _reserved2: u64, // 0x5C
    _reserved3: u16, // 0x64
    iomap_base: u16, // 0x66
}
const _: () = assert!(size_of::<Tss>() == 0x68);

#[repr(C, align(16))]
struct IstStacks([[u8; IST_STACK_BYTES]; 3]);

#[repr(C, align(16))]
struct Tables {
    gdt: [u64; 5],
    tss: Tss,
}

/// Interior-mutable static storage written only during single-threaded init.
struct InitCell<T>(UnsafeCell<T>);
// SAFETY: written only by `init` on the single boot CPU before any
// interrupt is enabled; afterwards only the CPU reads it.
unsafe impl<T> Sync for InitCell<T> {}

static TABLES: InitCell<Tables> = InitCell(UnsafeCell::new(Tables {
    gdt: [0; 5],
    tss: Tss {
        _reserved0: 0,
        rsp: [0; 3],
        _reserved1: 0,
        ist: [0; 7],
        _reserved2: 0,
        _reserved3: 0,
        iomap_base: size_of::<Tss>() as u16, // no I/O bitmap
    },
}));
static IST_STACKS: InitCell<IstStacks> =
    InitCell(UnsafeCell::new(IstStacks([[0; IST_STACK_BYTES]; 3])));

/// Long-mode code descriptor: P, DPL 0, S, type execute/read, L
/// (AMD APM vol. 2, 4.8.1).
const CODE64: u64 = 0x00AF_9A00_0000_FFFF;
/// Data descriptor: P, DPL 0, S, type read/write, G, D/B.
const DATA: u64 = 0x00CF_9200_0000_FFFF;

/// The two quadwords of an available 64-bit TSS descriptor (type 9)
/// (AMD APM vol. 2, 4.8.3 figure 4-22).
fn tss_descriptor(base: u64, limit: u32) -> [u64; 2] {
    let low = u64::from(limit & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | (0x89 << 40) // P, DPL 0, type 9
        | (u64::from((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56);
    [low, base >> 32]
}

#[repr(C, packed)]
struct DescriptorTablePointer {
    limit: u16,
    base: u64,
}

/// Base address of the GDT (for VMCS host-state fields).
pub fn gdt_base() -> u64 {
    TABLES.0.get() as u64
}

/// Base address of the TSS (for VMCS host-state fields).
pub fn tss_base() -> u64 {
    // SAFETY: only the address of the field is taken, nothing is read.
    unsafe { core::ptr::addr_of!((*TABLES.0.get()).tss) as u64 }
}

/// Fill in GDT and TSS, load them, reload the segment registers and TR.
/// Call once, early, with interrupts disabled.
pub fn init() {
    let stacks = IST_STACKS.0.get() as u64;
    let tables = TABLES.0.get();
    // SAFETY: single-threaded boot, interrupts off: nothing else accesses
    // TABLES. The pointers come from the statics themselves.
    unsafe {
        for (i, slot) in [IST_DOUBLE_FAULT, IST_NMI, IST_MACHINE_CHECK]
            .into_iter()
            .enumerate()
        {
            // Stack tops, 16-byte aligned.
            (*tables).tss.ist[usize::from(slot) - 1] = stacks + ((i + 1) * IST_STACK_BYTES) as u64;
        }
        let tss = tss_descriptor(tss_base(), size_of::<Tss>() as u32 - 1);
        (*tables).gdt = [0, CODE64, DATA, tss[0], tss[1]];
    }
    let ptr = DescriptorTablePointer {
        limit: (size_of::<[u64; 5]>() - 1) as u16,
        base: gdt_base(),
    };
    // SAFETY: the GDT above has the code and data descriptors at the same
    // selectors the boot stub used, so reloading CS (far return) and the
    // data segments keeps execution flat; the TSS descriptor is available
    // (not busy) so LTR succeeds.
    unsafe {
        asm!(
            "lgdt [{ptr}]",
            "push {code}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {data:e}",
            "mov es, {data:e}",
            "mov ss, {data:e}",
            "ltr {tss:x}",
            ptr = in(reg) &ptr,
            code = in(reg) u64::from(CODE_SELECTOR),
            data = in(reg) u32::from(DATA_SELECTOR),
            tss = in(reg) TSS_SELECTOR,
            tmp = out(reg) _,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tss_descriptor_fields() {
        let d = tss_descriptor(0x1234_5678_9ABC_DEF0, 0x67);
        assert_eq!(d[0] & 0xFFFF, 0x67);
        assert_eq!((d[0] >> 16) & 0xFF_FFFF, 0xBC_DEF0);
        assert_eq!((d[0] >> 40) & 0xFF, 0x89);
        assert_eq!(d[0] >> 56, 0x9A);
        assert_eq!(d[1], 0x1234_5678);
    }
}
