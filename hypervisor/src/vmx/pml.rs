//! Page-modification logging (Intel SDM vol. 3C, 29.3.6) as the partition's
//! faster dirty-tracking mode.
//!
//! With PML on, the CPU appends the GPA of every write that sets an EPT
//! dirty flag (bit 9 of a leaf, EPTP bit 6 enabling A/D flags, 29.3.5) to a
//! 512-entry log page and exits only when the log is full. Tracking a frame
//! therefore means: 4 KiB leaf, writable, dirty flag clear. The partition
//! keeps the dirty set and its semantics in [`hvcore::dirty::DirtyLog`]
//! exactly as for write protection; this module only *arms* frames (after
//! `DirtyLog::enable` or `collect_and_clear` write-protected them, it gives
//! write access back with the dirty flag clear) and the vCPU drains the log
//! into the set.
//!
//! One difference from write protection is architectural: with EPT A/D
//! flags on, the CPU's accesses to guest paging structures count as writes
//! (29.3.5), so frames holding guest page tables the CPU walked appear
//! dirty too. That only ever adds frames (a superset is safe for
//! migration).

use super::VmxVcpu;
use crate::mem::IdentityPhysMem;
use hvcore::addr::{Hpa, PAGE_SIZE};
use hvcore::host::HostError;
use hvcore::mem::{FrameAlloc, PhysMem};
use hvcore::npt::{NestedPageTable, ADDR_MASK_4K};
use hvcore::vmx::{EptFormat, EPT_D, EPT_LARGE, EPT_W};

/// Host address of the 4 KiB EPT leaf entry for `gpa`, or `None` when
/// `gpa` is unmapped or mapped by a 2 MiB leaf (Intel SDM vol. 3C, 29.3.2
/// walk; present = any of bits 2:0).
pub fn leaf_4k_slot(mem: &dyn PhysMem, root: Hpa, gpa: u64) -> Option<Hpa> {
    let mut table = root.as_u64();
    for level in (1..=4u32).rev() {
        let index = (gpa >> (12 + 9 * (level - 1))) & 511;
        let slot = Hpa(table + index * 8);
        let e = mem.read_u64(slot);
        if e & 0b111 == 0 {
            return None;
        }
        if level == 1 {
            return Some(slot);
        }
        if level == 2 && e & EPT_LARGE != 0 {
            return None;
        }
        table = e & ADDR_MASK_4K;
    }
    None
}

/// Start PML on `vcpu` if it is off, then arm every frame whose bit is set
/// in `gfns` (bit n = guest frame n): writable, dirty flag clear. Frames
/// mapped by 2 MiB leaves or unmapped are skipped (`DirtyLog::enable`
/// split every tracked one). Queues an INVEPT: cached translations may
/// still carry the old dirty flags.
pub fn arm(
    vcpu: &mut VmxVcpu,
    npt: &NestedPageTable<EptFormat>,
    frames: &mut dyn FrameAlloc,
    gfns: &[u64],
) -> Result<(), HostError> {
    vcpu.pml_start(frames)?;
    let mut mem = IdentityPhysMem;
    let root = npt.root();
    for (w, &word) in gfns.iter().enumerate() {
        let mut rest = word;
        while rest != 0 {
            let n = w as u64 * 64 + u64::from(rest.trailing_zeros());
            rest &= rest - 1;
            if let Some(slot) = leaf_4k_slot(&mem, root, n * PAGE_SIZE) {
                let e = mem.read_u64(slot);
                mem.write_u64(slot, (e | EPT_W) & !EPT_D);
            }
        }
    }
    hvcore::vcpu::Vcpu::flush_nested_tlb(vcpu);
    Ok(())
}
