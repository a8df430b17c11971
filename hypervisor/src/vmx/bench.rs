//! Raw world-switch benchmark: a throwaway VM whose only instruction is
//! `vmcall`, entered and left `n` times with no exit decoding and no
//! dispatch. The ratio to the hypercall round trip through the whole
//! service shows what exit handling costs on top of the bare VM entry/exit.
//!
//! Without unrestricted guest the vCPU cannot run in real mode, so the
//! guest gets a minimal long-mode set-up: one PML4, one PDPT and one page
//! directory identity-mapping the first 2 MiB, and a GDT.

use super::Vmx;
use crate::partition::GenericPartition;
use hvcore::addr::Gpa;
use hvcore::host::{HostError, Partition};
use hvcore::vcpu::LongModeEntry;
use hvcore::vmx::exit::EXIT_EXTERNAL_INTERRUPT;
use hvcore::vmx::exit::EXIT_VMCALL;

/// GPA of the guest's code: `vmcall` (0f 01 c1).
const CODE_GPA: u64 = 0x1_0000;
/// Guest RAM of the throwaway VM (one 2 MiB chunk).
const RAM_BYTES: u64 = 2 << 20;

/// Run `iterations` VMCALL round trips; returns the elapsed nanoseconds.
/// Timer interrupts that exit the guest in between are taken and not
/// counted.
pub fn raw_roundtrips(iterations: u64) -> Result<u64, HostError> {
    let mut part = GenericPartition::<Vmx>::new(RAM_BYTES)?;
    let m = part.memory();
    let e = |_| HostError::Backend("raw bench: writing guest memory");
    // PML4 at 0x1000 -> PDPT at 0x2000 -> PD at 0x3000 -> 2 MiB page 0
    // (P|RW|A, and D|PS on the leaf so the CPU never writes them).
    m.write_u64(Gpa(0x1000), 0x2000 | 0x23).map_err(e)?;
    m.write_u64(Gpa(0x2000), 0x3000 | 0x23).map_err(e)?;
    m.write_u64(Gpa(0x3000), 0xe3).map_err(e)?;
    m.write_u64(Gpa(0x7008), 0x00af_9b00_0000_ffff).map_err(e)?;
    m.write_u64(Gpa(0x7010), 0x00cf_9300_0000_ffff).map_err(e)?;
    m.write(Gpa(CODE_GPA), &[0x0f, 0x01, 0xc1]).map_err(e)?;
    let vcpu = part.backend_vcpu();
    hvcore::vcpu::Vcpu::reset_long_mode(
        vcpu,
        &LongModeEntry {
            rip: CODE_GPA,
            rsp: 0x8000,
            rdi: 0,
            cr3: Gpa(0x1000),
            gdt_base: Gpa(0x7000),
            gdt_limit: 23,
            rsi: 0,
            code_selector: hvcore::vcpu::SELECTORS_ABI.0,
            data_selector: hvcore::vcpu::SELECTORS_ABI.1,
        },
    );
    let start = crate::time::now_ns();
    let mut done = 0;
    while done < iterations {
        vcpu.set_rip(CODE_GPA);
        match vcpu.enter_raw() {
            Some(EXIT_VMCALL) => done += 1,
            Some(EXIT_EXTERNAL_INTERRUPT) => {}
            _ => return Err(HostError::Backend("raw bench: unexpected exit")),
        }
    }
    Ok(crate::time::now_ns().saturating_sub(start))
}
