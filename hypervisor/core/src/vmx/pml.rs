//! Page-modification logging, the logic half (Intel SDM vol. 3C, 29.3.6):
//! arming frames in the EPT and reading the log page's index.
//!
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

//!
//! The platform (`hypervisor::vmx::pml`) owns the log page and the VMCS
//! fields; what it does with them is decided here.

use crate::addr::{Hpa, PAGE_SIZE};
use crate::mem::PhysMem;
use crate::npt::ADDR_MASK_4K;
use crate::vmx::{EPT_D, EPT_LARGE, EPT_W};
use core::ops::Range;

/// Entries of the PML buffer (29.3.6).
pub const PML_ENTRIES: u64 = 512;

/// The log-page entries that hold GPAs for a PML index (the VMCS field
/// "PML index", 16 bits): the CPU writes entry `index` and then
/// decrements it, starting from 511, so entries `index+1..512` are
/// filled; an index of 512 or more (0xFFFF after the last entry) means
/// all 512 are.
pub const fn logged_entries(index: u64) -> Range<u64> {
    let index = index & 0xffff;
    let first = if index >= PML_ENTRIES { 0 } else { index + 1 };
    first..PML_ENTRIES
}

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

/// Arm frames for PML: for every frame set in `gfns` that the EPT
/// rooted at `root` maps with a 4 KiB leaf, set W and clear the dirty flag.
/// Frames mapped by 2 MiB leaves or unmapped are skipped
/// (`DirtyLog::enable` split every tracked one). Returns how many leaves
/// it armed.
pub fn arm_frames(mem: &mut dyn PhysMem, root: Hpa, gfns: &[u64]) -> u64 {
    let mut armed = 0;
    for (w, &word) in gfns.iter().enumerate() {
        let mut rest = word;
        while rest != 0 {
            let n = w as u64 * 64 + u64::from(rest.trailing_zeros());
            rest &= rest - 1;
            if let Some(slot) = leaf_4k_slot(mem, root, n * PAGE_SIZE) {
                let e = mem.read_u64(slot);
                mem.write_u64(slot, (e | EPT_W) & !EPT_D);
                armed += 1;
            }
        }
    }
    armed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{Gfn, Gpa};
    use crate::dirty::DirtyLog;
    use crate::mem::{FrameAlloc, MemError};
    use crate::npt::NestedPageTable;
    use crate::vmx::EptFormat;
    use alloc::collections::BTreeMap;

    /// Sparse host memory.
    #[derive(Default)]
    struct Mem(BTreeMap<u64, u64>);

    // A bump allocator above 1 GiB.

    impl PhysMem for Mem {
        fn read_u64(&self, hpa: Hpa) -> u64 {
            self.0.get(&hpa.as_u64()).copied().unwrap_or(0)
        }
        fn write_u64(&mut self, hpa: Hpa, value: u64) {
            self.0.insert(hpa.as_u64(), value);
        }
    }

    struct Frames(u64);

    impl FrameAlloc for Frames {
        fn alloc_frame(&mut self) -> Result<Hpa, MemError> {
            self.0 += PAGE_SIZE;
            Ok(Hpa(self.0))
        }
        fn free_frame(&mut self, _hpa: Hpa) {}
    }

    #[test]
    fn arming_after_the_dirty_log_protected_everything() {
        let (mut mem, mut frames) = (Mem::default(), Frames(1 << 30));
        let mut npt = NestedPageTable::<EptFormat>::new(&mut frames, &mut mem).unwrap();
        // 4 MiB of RAM: two 2 MiB leaves until the dirty log splits them.
        npt.map(
            &mut mem,
            &mut frames,
            Gpa(0),
            Hpa(0x4000_0000),
            4 << 20,
            true,
        )
        .unwrap();
        assert_eq!(leaf_4k_slot(&mem, npt.root(), 0x1000), None, "2 MiB leaf");
        let mut log = DirtyLog::new(4 << 20);
        log.enable(&mut npt, &mut mem, &mut frames).unwrap();
        // A stale dirty flag on frame 5 (as the CPU leaves it).
        let slot5 = leaf_4k_slot(&mem, npt.root(), 5 * PAGE_SIZE).unwrap();
        mem.write_u64(slot5, mem.read_u64(slot5) | EPT_D);
        // Arm frames 5 and 700, and one past RAM (ignored).
        let mut gfns = [0u64; 17];
        gfns[0] = 1 << 5;
        gfns[700 / 64] |= 1 << (700 % 64);
        gfns[16] = 1;
        assert_eq!(arm_frames(&mut mem, npt.root(), &gfns), 2);
        for gfn in 0..1024u64 {
            let t = npt.translate(&mem, Gfn(gfn).gpa()).unwrap();
            assert_eq!(t.writable, gfn == 5 || gfn == 700, "frame {gfn}");
            assert_eq!(t.hpa, Hpa(0x4000_0000 + gfn * PAGE_SIZE));
        }
        assert_eq!(mem.read_u64(slot5) & EPT_D, 0);
        // The leaf keeps its memory type and read/execute permission.
        assert_eq!(mem.read_u64(slot5) & 0x3f, 0x37);
    }

    #[test]
    fn logged_entries_follow_the_index() {
        assert_eq!(logged_entries(511), 512..512, "nothing logged");
        assert_eq!(logged_entries(509), 510..512);
        assert_eq!(logged_entries(0), 1..512);
        assert_eq!(logged_entries(0xffff), 0..512, "full");
        assert_eq!(logged_entries(512), 0..512);
        assert_eq!(logged_entries(0x1_0000 | 509), 510..512, "bits above 15");
    }
}
