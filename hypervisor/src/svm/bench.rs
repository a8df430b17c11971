//! Raw world-switch benchmark: a throwaway VM whose only instruction is
//! `vmmcall`, entered and left `n` times with no exit decoding and no
//! dispatch. The ratio to the hypercall round trip through the whole service
//! shows what exit handling costs on top of the bare VMRUN/#VMEXIT.
//!
//! The guest runs in the same mode as real guests (64-bit, paging on, the
//! guest ABI's layout) so both sides of the ratio pay the same nested
//! translation costs.

use super::Svm;
use crate::partition::GenericPartition;
use hvcore::addr::Gpa;
use hvcore::host::{HostError, Partition};
use hvcore::svm::exit::{EXIT_INTR, EXIT_VMMCALL};
use hvcore::vcpu::LongModeEntry;

/// GPA of the guest's code: `vmmcall` (0f 01 d9).
const CODE_GPA: u64 = 0x1_0000;
/// Guest page tables: PML4, PDPT, PD (one 2 MiB identity page).
const PML4_GPA: u64 = 0x1000;
/// Guest GDT: null, 64-bit code (0x08), data (0x10).
const GDT_GPA: u64 = 0x7000;
/// Guest RAM of the throwaway VM (one 2 MiB chunk).
const RAM_BYTES: u64 = 2 << 20;

/// Run `iterations` VMMCALL round trips; returns the elapsed nanoseconds.
/// Timer interrupts that exit the guest in between are taken and not
/// counted.
pub fn raw_roundtrips(iterations: u64) -> Result<u64, HostError> {
    let mut part = GenericPartition::<Svm>::new(RAM_BYTES)?;
    let m = part.memory();
    let words = [
        (PML4_GPA, 0x2000 | 0x23),             // P|RW|A -> PDPT
        (0x2000, 0x3000 | 0x23),               // -> PD
        (0x3000, 0xe3),                        // P|RW|A|D|PS: 2 MiB at 0
        (GDT_GPA + 8, 0x00af_9b00_0000_ffff),  // code, accessed
        (GDT_GPA + 16, 0x00cf_9300_0000_ffff), // data, accessed
    ];
    for (gpa, value) in words {
        m.write_u64(Gpa(gpa), value)
            .map_err(|_| HostError::Backend("raw bench: writing guest tables"))?;
    }
    m.write(Gpa(CODE_GPA), &[0x0f, 0x01, 0xd9])
        .map_err(|_| HostError::Backend("raw bench: writing guest code"))?;
    part.vcpu().reset_long_mode(&LongModeEntry {
        rip: CODE_GPA,
        rsp: 0x8000,
        rdi: 0,
        cr3: Gpa(PML4_GPA),
        gdt_base: Gpa(GDT_GPA),
        gdt_limit: 23,
        rsi: 0,
        code_selector: hvcore::vcpu::SELECTORS_ABI.0,
        data_selector: hvcore::vcpu::SELECTORS_ABI.1,
    });
    let vcpu = part.backend_vcpu();
    let start = crate::time::now_ns();
    let mut done = 0;
    while done < iterations {
        vcpu.set_rip(CODE_GPA);
        match vcpu.enter_raw() {
            EXIT_VMMCALL => done += 1,
            EXIT_INTR => {}
            _ => return Err(HostError::Backend("raw bench: unexpected exit")),
        }
    }
    Ok(crate::time::now_ns().saturating_sub(start))
}
