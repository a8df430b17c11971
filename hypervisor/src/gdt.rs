//! The host GDT and 64-bit TSS, built with the `x86_64` crate's
//! descriptor-table structures.
//!
//! Layout (selectors): 0x00 null, 0x08 64-bit code (DPL 0), 0x10 data
//! (DPL 0), 0x18 the 16-byte TSS descriptor. The TSS carries IST stacks for
//! the exceptions that must not run on a possibly broken stack: #DF (IST1),
//! NMI (IST2) and #MC (IST3). TR is loaded with a non-zero selector because
//! VMX requires a usable host TR (Intel SDM vol. 3C, 26.2.3) and SVM's
//! VMSAVE/VMLOAD of TR assumes one (AMD APM vol. 2, 15.5.2).
//!
//! Single CPU: one GDT, one TSS. They are built once in [`init`] (before
//! LGDT/LTR) in `spin::Once` cells and never changed afterwards (the CPU
//! sets the TSS descriptor's busy bit in the GDT itself).

use core::cell::UnsafeCell;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::{load_tss, sgdt};
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::{PrivilegeLevel, VirtAddr};

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

#[repr(C, align(16))]
struct IstStacks(UnsafeCell<[[u8; IST_STACK_BYTES]; 3]>);
// SAFETY: Rust code never reads or writes the stacks; only the CPU uses
// them, as interrupt stacks, and only their address is taken here.
unsafe impl Sync for IstStacks {}

static IST_STACKS: IstStacks = IstStacks(UnsafeCell::new([[0; IST_STACK_BYTES]; 3]));
static TSS: spin::Once<TaskStateSegment> = spin::Once::new();
static GDT: spin::Once<GlobalDescriptorTable> = spin::Once::new();

/// The TSS: no I/O bitmap, the IST stack tops (16-byte aligned).
fn build_tss() -> TaskStateSegment {
    let mut tss = TaskStateSegment::new();
    let stacks = IST_STACKS.0.get() as u64;
    for (i, slot) in [IST_DOUBLE_FAULT, IST_NMI, IST_MACHINE_CHECK]
        .into_iter()
        .enumerate()
    {
        let top = stacks + ((i + 1) * IST_STACK_BYTES) as u64;
        tss.interrupt_stack_table[usize::from(slot) - 1] = VirtAddr::new(top);
    }
    tss
}

/// The GDT; the selectors `append` returns are the constants above.
fn build_gdt(tss: &'static TaskStateSegment) -> GlobalDescriptorTable {
    let mut gdt = GlobalDescriptorTable::new();
    // Long-mode code (P, DPL 0, S, execute/read, L; AMD APM vol. 2, 4.8.1)
    // and flat data (P, DPL 0, S, read/write, G, D/B).
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    // An available 64-bit TSS descriptor (type 9, AMD APM vol. 2, 4.8.3).
    let tss = gdt.append(Descriptor::tss_segment(tss));
    debug_assert_eq!(
        (code.0, data.0, tss.0),
        (CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR)
    );
    gdt
}

/// Base address of the loaded GDT (for VMCS host-state fields).
pub fn gdt_base() -> u64 {
    sgdt().base.as_u64()
}

/// Base address of the TSS (for VMCS host-state fields); 0 before
/// [`init`].
pub fn tss_base() -> u64 {
    TSS.get().map_or(0, |t| t as *const TaskStateSegment as u64)
}

/// Build GDT and TSS, load them, reload the segment registers and TR.
/// Call once, early, with interrupts disabled.
pub fn init() {
    let tss = TSS.call_once(build_tss);
    let gdt = GDT.call_once(|| build_gdt(tss));
    gdt.load();
    let code = SegmentSelector::new(CODE_SELECTOR >> 3, PrivilegeLevel::Ring0);
    let data = SegmentSelector::new(DATA_SELECTOR >> 3, PrivilegeLevel::Ring0);
    let tss = SegmentSelector::new(TSS_SELECTOR >> 3, PrivilegeLevel::Ring0);
    // SAFETY: the GDT just loaded has the code and data descriptors at the
    // same selectors the boot stub used, so reloading CS (a far return) and
    // the data segments keeps execution flat; the TSS descriptor is
    // available (not busy), so LTR succeeds, and the TSS is a static.
    unsafe {
        CS::set_reg(code);
        DS::set_reg(data);
        ES::set_reg(data);
        SS::set_reg(data);
        load_tss(tss);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_and_tss_descriptor() {
        static T: spin::Once<TaskStateSegment> = spin::Once::new();
        let tss = T.call_once(build_tss);
        let gdt = build_gdt(tss);
        let e = gdt.entries();
        assert_eq!(e.len(), 5);
        assert_eq!(e[1].raw(), 0x00af_9b00_0000_ffff, "64-bit code");
        assert_eq!(e[2].raw(), 0x00cf_9300_0000_ffff, "flat data");
        // TSS descriptor: limit 0x67, type 9 present, base split over both
        // quadwords (AMD APM vol. 2, 4.8.3 figure 4-22).
        let base = tss as *const TaskStateSegment as u64;
        let (low, high) = (e[3].raw(), e[4].raw());
        assert_eq!(low & 0xffff, 0x67);
        assert_eq!((low >> 40) & 0xff, 0x89);
        assert_eq!((low >> 16) & 0xff_ffff, base & 0xff_ffff);
        assert_eq!(low >> 56, (base >> 24) & 0xff);
        assert_eq!(high, base >> 32);
        let ist1 = tss.interrupt_stack_table[0].as_u64();
        assert_eq!(ist1 % 16, 0);
        assert_eq!(
            tss.interrupt_stack_table[1].as_u64() - ist1,
            IST_STACK_BYTES as u64
        );
    }
}
