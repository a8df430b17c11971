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

use super::controls::PROC2_ENABLE_PML;
use super::vmcs::{self, EPT_POINTER, GUEST_PML_INDEX, PML_ADDRESS, SECONDARY_PROC_CONTROLS};
use super::VmxVcpu;
use crate::mem::IdentityPhysMem;
use alloc::vec::Vec;
use hvcore::addr::{Gfn, Hpa, PAGE_SIZE};
use hvcore::host::HostError;
use hvcore::mem::{FrameAlloc, PhysMem};
use hvcore::npt::{NestedPageTable, ADDR_MASK_4K};
use hvcore::vmx::EPTP_AD;
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
/// in `gfns` (bit n = guest frame n): writable, dirty flag clear. Queues an
/// INVEPT: cached translations may still carry the old dirty flags.
pub fn arm(
    vcpu: &mut VmxVcpu,
    npt: &NestedPageTable<EptFormat>,
    frames: &mut dyn FrameAlloc,
    gfns: &[u64],
) -> Result<(), HostError> {
    vcpu.pml_start(frames)?;
    arm_frames(&mut IdentityPhysMem, npt.root(), gfns);
    hvcore::vcpu::Vcpu::flush_nested_tlb(vcpu);
    Ok(())
}

/// The table side of [`arm`]: for every frame set in `gfns` that the EPT
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

/// Entries of the PML buffer (Intel SDM vol. 3C, 29.3.6).
const PML_ENTRIES: u64 = 512;

/// Page-modification logging state while it is on.
pub(super) struct PmlState {
    /// The 4 KiB log the CPU writes GPAs into.
    pub(super) page: Hpa,
    /// GPAs drained at PML-full exits, not yet handed out.
    overflow: Vec<u64>,
}

impl VmxVcpu {
    /// Start page-modification logging (Intel SDM vol. 3C, 29.3.6): a log
    /// page, index 511, EPT A/D flags on, the PML control set. Idempotent.
    pub fn pml_start(&mut self, frames: &mut dyn FrameAlloc) -> Result<(), HostError> {
        if self.pml.is_some() {
            return Ok(());
        }
        if !self.features.pml() {
            return Err(HostError::Backend("PML not available"));
        }
        let page = frames.alloc_frame().map_err(|_| HostError::OutOfMemory {
            requested_bytes: PAGE_SIZE,
            free_bytes: crate::mem::memory_stats().1,
        })?;
        self.pml = Some(PmlState {
            page,
            overflow: Vec::new(),
        });
        self.write(PML_ADDRESS, page.as_u64());
        self.write(GUEST_PML_INDEX, PML_ENTRIES - 1);
        self.eptp |= EPTP_AD;
        self.write(EPT_POINTER, self.eptp);
        self.proc2 |= PROC2_ENABLE_PML;
        self.write(SECONDARY_PROC_CONTROLS, u64::from(self.proc2));
        self.flush_ept = true;
        Ok(())
    }

    /// Stop page-modification logging and free the log page.
    pub fn pml_stop(&mut self, frames: &mut dyn FrameAlloc) {
        let Some(p) = self.pml.take() else {
            return;
        };
        self.proc2 &= !PROC2_ENABLE_PML;
        self.write(SECONDARY_PROC_CONTROLS, u64::from(self.proc2));
        self.eptp &= !EPTP_AD;
        self.write(EPT_POINTER, self.eptp);
        self.flush_ept = true;
        frames.free_frame(p.page);
    }

    /// Whether PML is on.
    pub fn pml_active(&self) -> bool {
        self.pml.is_some()
    }

    /// Move the logged GPAs out of the PML page (entries index+1..=511,
    /// 29.3.6) to `mark`, or into the overflow list when `mark` is `None`;
    /// reset the index.
    pub(super) fn pml_drain_buffer(&mut self, mut mark: Option<&mut dyn FnMut(Gfn)>) {
        let index = self.read(GUEST_PML_INDEX) & 0xffff;
        let Some(p) = self.pml.as_mut() else {
            return;
        };
        // The CPU decrements the index after each entry; 0xffff (or any
        // value >= 512) means the page is full.
        let first = if index >= PML_ENTRIES { 0 } else { index + 1 };
        for i in first..PML_ENTRIES {
            // SAFETY: the PML page is a frame this vCPU owns; the CPU writes
            // it only while the guest runs, which it does not now.
            let gpa = unsafe { ((p.page.as_u64() + i * 8) as *const u64).read_volatile() };
            match mark.as_mut() {
                Some(m) => m(Gfn(gpa / PAGE_SIZE)),
                None => {
                    if p.overflow.try_reserve(1).is_ok() {
                        p.overflow.push(gpa);
                    } else {
                        log::error!("vmx: PML overflow list: out of heap; a dirty page is lost");
                    }
                }
            }
        }
        let _ = vmcs::write(GUEST_PML_INDEX, PML_ENTRIES - 1);
    }

    /// Hand every GPA logged since the last drain to `mark`.
    pub fn pml_drain(&mut self, mark: &mut dyn FnMut(Gfn)) {
        if let Some(p) = self.pml.as_mut() {
            for gpa in p.overflow.drain(..) {
                mark(Gfn(gpa / PAGE_SIZE));
            }
        }
        self.pml_drain_buffer(Some(mark));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use hvcore::addr::{Gfn, Gpa};
    use hvcore::dirty::DirtyLog;
    use hvcore::mem::MemError;

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
}
