//! Raw world-switch benchmark: a throwaway VM whose only instruction is
//! `vmmcall`, entered and left `n` times with no exit decoding and no
//! dispatch. The ratio to the hypercall round trip through the whole service
//! shows what exit handling costs on top of the bare VMRUN/#VMEXIT.

use super::vmcb::{EXIT_INTR, EXIT_VMMCALL};
use super::Svm;
use crate::partition::GenericPartition;
use hvcore::addr::Gpa;
use hvcore::host::{HostError, Partition};

/// GPA of the guest's code: `vmmcall` (0f 01 d9).
const CODE_GPA: u64 = 0x1000;
/// Guest RAM of the throwaway VM (one 2 MiB chunk).
const RAM_BYTES: u64 = 2 << 20;

/// Run `iterations` VMMCALL round trips; returns the elapsed nanoseconds.
/// Timer interrupts that exit the guest in between are taken and not
/// counted.
pub fn raw_roundtrips(iterations: u64) -> Result<u64, HostError> {
    let mut part = GenericPartition::<Svm>::new(RAM_BYTES)?;
    part.memory()
        .write(Gpa(CODE_GPA), &[0x0f, 0x01, 0xd9])
        .map_err(|_| HostError::Backend("raw bench: writing guest code"))?;
    let vcpu = part.backend_vcpu();
    // Real mode, flat: CS base 0, paging off, so RIP is the GPA.
    vcpu.set_real_mode_ip(CODE_GPA);
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
