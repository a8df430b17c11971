//! A generic 4-level nested page table (AMD NPT / Intel EPT) over
//! host-physical frames.
//!
//! The walker is written once; what differs between vendors is only the bit
//! layout of an entry, supplied by an [`EntryFormat`]
//! ([`crate::svm::NptFormat`], [`crate::vmx::EptFormat`]). Table frames come
//! from a [`FrameAlloc`] and are read and written only through [`PhysMem`], so
//! tests run the same code over a `BTreeMap` of frames
//! (`hvcore::testing`, feature `testing`).
//!
//! Layout: four levels indexed by guest-physical address bits 47:39, 38:30,
//! 29:21 and 20:12 (AMD APM vol. 2, 5.3.3 and 15.25.5; Intel SDM vol. 3C,
//! 29.3.2). Leaves are 4 KiB (level 1) or 2 MiB (level 2, "large"); 1 GiB
//! leaves are never created.
//!
//! Invariants:
//! * every present non-leaf entry points at a table frame this table
//!   allocated and owns; [`NestedPageTable::destroy`] frees exactly those;
//! * a table frame is fully written before the entry linking it is, so the
//!   hardware never walks a half-built table;
//! * permissions live in the leaves only: non-leaf entries grant full access;
//! * mapped host frames (guest RAM) are never owned or freed here.
//!
//! The caller flushes the nested TLB after it reduced permissions or split a
//! leaf ([`crate::vcpu::Vcpu::flush_nested_tlb`]); nothing here can.

use crate::addr::{Gfn, Gpa, Hpa, LARGE_PAGE_SIZE, PAGE_SIZE};
use crate::mem::{FrameAlloc, MemError, PhysMem};
use core::fmt;
use core::marker::PhantomData;

/// Entries per table (4 KiB / 8 bytes).
pub const ENTRIES: u64 = 512;
/// Guest-physical addresses a 4-level table can translate: `[0, 2^48)`.
pub const GPA_LIMIT: u64 = 1 << 48;
/// Largest host-physical address an entry can hold: bits 51:12
/// (architectural MAXPHYADDR limit of 52 bits).
pub const HPA_LIMIT: u64 = 1 << 52;

/// Mask of bits 51:12, the address field of a table pointer or 4 KiB leaf.
pub const ADDR_MASK_4K: u64 = 0x000f_ffff_ffff_f000;
/// Mask of bits 51:21, the address field of a 2 MiB leaf.
pub const ADDR_MASK_2M: u64 = 0x000f_ffff_ffe0_0000;

/// Bit layout of one vendor's nested page-table entries.
///
/// All functions are pure encoders/decoders of a raw 64-bit entry. The walker
/// only calls [`EntryFormat::is_large`] on entries of the page-directory level
/// (bit 7 means "PAT" in an AMD 4 KiB leaf).
pub trait EntryFormat {
    /// Short name for messages ("NPT", "EPT").
    const NAME: &'static str;
    /// A non-leaf entry pointing at the next-level table `table` (4 KiB
    /// aligned), granting every access (leaves decide).
    fn table_entry(table: Hpa) -> u64;
    /// A 4 KiB leaf mapping the frame at `hpa` (4 KiB aligned), readable and
    /// executable, writable if `writable`.
    fn leaf_4k(hpa: Hpa, writable: bool) -> u64;
    /// A 2 MiB leaf (page-directory level) mapping `hpa` (2 MiB aligned).
    fn leaf_2m(hpa: Hpa, writable: bool) -> u64;
    /// Whether the entry is present (translates anything at all).
    fn is_present(entry: u64) -> bool;
    /// Whether a present page-directory entry is a 2 MiB leaf.
    fn is_large(entry: u64) -> bool;
    /// Whether a present leaf allows writes.
    fn is_writable(entry: u64) -> bool;
    /// `entry` with write permission set or cleared, every other bit kept.
    fn with_writable(entry: u64, writable: bool) -> u64;

    /// Address of the next-level table of a present non-leaf entry.
    fn table_address(entry: u64) -> Hpa {
        Hpa(entry & ADDR_MASK_4K)
    }
    /// Address of the frame a present leaf of size `size` maps.
    fn leaf_address(entry: u64, size: PageSize) -> Hpa {
        match size {
            PageSize::Size4K => Hpa(entry & ADDR_MASK_4K),
            PageSize::Size2M => Hpa(entry & ADDR_MASK_2M),
        }
    }
}

/// Size of a leaf mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB, a page-table (level 1) entry.
    Size4K,
    /// 2 MiB, a page-directory (level 2) entry with the large bit.
    Size2M,
}

impl PageSize {
    /// Size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => PAGE_SIZE,
            PageSize::Size2M => LARGE_PAGE_SIZE,
        }
    }
}

/// Result of [`NestedPageTable::translate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Host-physical address of the translated byte (leaf frame + offset).
    pub hpa: Hpa,
    /// Size of the leaf that maps it.
    pub size: PageSize,
    /// Whether the leaf allows writes.
    pub writable: bool,
}

/// Errors of nested page-table operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NptError {
    /// Allocating a table frame failed.
    Mem(MemError),
    /// `gpa`, `hpa` or `len_bytes` is not a multiple of 4 KiB.
    Misaligned { gpa: Gpa, hpa: Hpa, len_bytes: u64 },
    /// Part of the guest range is already mapped (first mapped page given).
    Overlap { gpa: Gpa },
    /// The guest frame is not mapped.
    NotMapped { gpa: Gpa },
    /// The guest range leaves the 48-bit guest-physical space.
    GpaOutOfRange { gpa: Gpa, len_bytes: u64 },
    /// The host range leaves the 52-bit host-physical space.
    HpaOutOfRange { hpa: Hpa, len_bytes: u64 },
    /// A dirty bitmap passed in is shorter than guest RAM needs.
    BitmapTooSmall {
        needed_words: usize,
        len_words: usize,
    },
}

impl From<MemError> for NptError {
    fn from(e: MemError) -> Self {
        NptError::Mem(e)
    }
}

impl fmt::Display for NptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NptError::Mem(e) => write!(f, "nested page table: {e}"),
            NptError::Misaligned {
                gpa,
                hpa,
                len_bytes,
            } => write!(
                f,
                "nested mapping {gpa}->{hpa}+{len_bytes:#x} is not 4 KiB aligned"
            ),
            NptError::Overlap { gpa } => {
                write!(f, "guest-physical page {gpa} is already mapped")
            }
            NptError::NotMapped { gpa } => {
                write!(f, "guest-physical page {gpa} is not mapped")
            }
            NptError::GpaOutOfRange { gpa, len_bytes } => write!(
                f,
                "guest range {gpa}+{len_bytes:#x} exceeds the 48-bit guest-physical space"
            ),
            NptError::HpaOutOfRange { hpa, len_bytes } => write!(
                f,
                "host range {hpa}+{len_bytes:#x} exceeds the 52-bit host-physical space"
            ),
            NptError::BitmapTooSmall {
                needed_words,
                len_words,
            } => write!(
                f,
                "dirty bitmap has {len_words} words, guest RAM needs {needed_words}"
            ),
        }
    }
}

/// Index into the table of `level` (4 = PML4 .. 1 = PT) for `gpa`.
const fn index(gpa: u64, level: u32) -> u64 {
    (gpa >> (12 + 9 * (level - 1))) & (ENTRIES - 1)
}

/// Bytes of guest-physical space one entry of `level` covers.
const fn entry_span(level: u32) -> u64 {
    1 << (12 + 9 * (level - 1))
}

/// Host-physical address of entry `idx` of the table at `table`.
const fn entry_addr(table: Hpa, idx: u64) -> Hpa {
    Hpa(table.0 + idx * 8)
}

/// Where a walk for one GPA ended.
enum Walk {
    /// A leaf entry at `slot` of size `size`.
    Leaf {
        slot: Hpa,
        entry: u64,
        size: PageSize,
    },
    /// A non-present entry at `level`; nothing mapped in its span.
    Hole { level: u32 },
}

/// A 4-level nested page table in the format `F`.
pub struct NestedPageTable<F: EntryFormat> {
    root: Hpa,
    /// Table frames owned (root included).
    table_frames: u64,
    _format: PhantomData<fn() -> F>,
}

impl<F: EntryFormat> fmt::Debug for NestedPageTable<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NestedPageTable")
            .field("format", &F::NAME)
            .field("root", &self.root)
            .field("table_frames", &self.table_frames)
            .finish()
    }
}

impl<F: EntryFormat> NestedPageTable<F> {
    /// An empty table: one zeroed root frame, nothing mapped.
    pub fn new(alloc: &mut dyn FrameAlloc, mem: &mut dyn PhysMem) -> Result<Self, NptError> {
        let root = alloc.alloc_frame()?;
        // The allocator promises a zeroed frame; write it anyway so a table is
        // never built on stale entries whatever the allocator does.
        for i in 0..ENTRIES {
            mem.write_u64(entry_addr(root, i), 0);
        }
        Ok(Self {
            root,
            table_frames: 1,
            _format: PhantomData,
        })
    }

    /// Host-physical address of the top-level table (what goes into the VMCB
    /// `N_CR3` / the EPTP).
    pub fn root(&self) -> Hpa {
        self.root
    }

    /// Number of table frames this table owns (root included).
    pub fn table_frames(&self) -> u64 {
        self.table_frames
    }

    /// Map `[gpa, gpa+len_bytes)` to `[hpa, hpa+len_bytes)`, using 2 MiB
    /// leaves where both sides are 2 MiB aligned and the rest of the range
    /// covers 2 MiB, else 4 KiB leaves.
    ///
    /// The whole range is checked first: on `Misaligned`, `*OutOfRange` or
    /// `Overlap` nothing is changed. On `Mem` (out of frames) a prefix of the
    /// range may be mapped; the table stays consistent and `destroy` frees
    /// everything.
    pub fn map(
        &mut self,
        mem: &mut dyn PhysMem,
        alloc: &mut dyn FrameAlloc,
        gpa: Gpa,
        hpa: Hpa,
        len_bytes: u64,
        writable: bool,
    ) -> Result<(), NptError> {
        if !gpa.is_aligned(PAGE_SIZE)
            || !hpa.is_aligned(PAGE_SIZE)
            || !len_bytes.is_multiple_of(PAGE_SIZE)
        {
            return Err(NptError::Misaligned {
                gpa,
                hpa,
                len_bytes,
            });
        }
        match gpa.0.checked_add(len_bytes) {
            Some(end) if end <= GPA_LIMIT => {}
            _ => return Err(NptError::GpaOutOfRange { gpa, len_bytes }),
        }
        match hpa.0.checked_add(len_bytes) {
            Some(end) if end <= HPA_LIMIT => {}
            _ => return Err(NptError::HpaOutOfRange { hpa, len_bytes }),
        }
        if let Some(mapped) = self.first_mapped(mem, gpa.0, gpa.0 + len_bytes) {
            return Err(NptError::Overlap { gpa: Gpa(mapped) });
        }

        let mut off = 0;
        while off < len_bytes {
            let g = gpa.0 + off;
            let h = hpa.0 + off;
            let left = len_bytes - off;
            if g.is_multiple_of(LARGE_PAGE_SIZE)
                && h.is_multiple_of(LARGE_PAGE_SIZE)
                && left >= LARGE_PAGE_SIZE
            {
                let pd = self.table_for(mem, alloc, g, 2)?;
                let slot = entry_addr(pd, index(g, 2));
                // The overlap check saw nothing mapped in this 2 MiB span, so
                // the slot is empty or points at a table with no leaves (none
                // is ever created that way, but do not leak one): only an
                // empty slot takes the large leaf.
                if !F::is_present(mem.read_u64(slot)) {
                    mem.write_u64(slot, F::leaf_2m(Hpa(h), writable));
                    off += LARGE_PAGE_SIZE;
                    continue;
                }
            }
            let pt = self.table_for(mem, alloc, g, 1)?;
            mem.write_u64(entry_addr(pt, index(g, 1)), F::leaf_4k(Hpa(h), writable));
            off += PAGE_SIZE;
        }
        Ok(())
    }

    /// Translate `gpa`, or `None` if it is not mapped.
    pub fn translate(&self, mem: &dyn PhysMem, gpa: Gpa) -> Option<Translation> {
        if gpa.0 >= GPA_LIMIT {
            return None;
        }
        match self.walk(mem, gpa.0) {
            Walk::Leaf { entry, size, .. } => Some(Translation {
                hpa: Hpa(F::leaf_address(entry, size).0 + (gpa.0 & (size.bytes() - 1))),
                size,
                writable: F::is_writable(entry),
            }),
            Walk::Hole { .. } => None,
        }
    }

    /// Give or take write permission for the 4 KiB guest frame `gfn`,
    /// splitting the 2 MiB leaf that maps it first if its permission must
    /// change. Returns whether the frame's permission changed.
    ///
    /// The caller flushes the nested TLB when write access was removed.
    pub fn set_writable(
        &mut self,
        mem: &mut dyn PhysMem,
        alloc: &mut dyn FrameAlloc,
        gfn: Gfn,
        writable: bool,
    ) -> Result<bool, NptError> {
        let gpa = gfn.0.checked_mul(PAGE_SIZE).filter(|&g| g < GPA_LIMIT);
        let Some(g) = gpa else {
            return Err(NptError::NotMapped {
                gpa: Gpa(gfn.0.wrapping_mul(PAGE_SIZE)),
            });
        };
        match self.walk(mem, g) {
            Walk::Hole { .. } => Err(NptError::NotMapped { gpa: Gpa(g) }),
            Walk::Leaf { entry, .. } if F::is_writable(entry) == writable => Ok(false),
            Walk::Leaf {
                slot,
                entry,
                size: PageSize::Size4K,
            } => {
                mem.write_u64(slot, F::with_writable(entry, writable));
                Ok(true)
            }
            Walk::Leaf {
                slot,
                entry,
                size: PageSize::Size2M,
            } => {
                let pt = self.split(mem, alloc, slot, entry)?;
                let pte = entry_addr(pt, index(g, 1));
                let e = mem.read_u64(pte);
                mem.write_u64(pte, F::with_writable(e, writable));
                Ok(true)
            }
        }
    }

    /// Free every table frame (never the mapped guest frames).
    pub fn destroy(self, mem: &mut dyn PhysMem, alloc: &mut dyn FrameAlloc) {
        Self::free_table(mem, alloc, self.root, 4);
    }

    /// Free the table at `table` of `level` and every table below it.
    fn free_table(mem: &mut dyn PhysMem, alloc: &mut dyn FrameAlloc, table: Hpa, level: u32) {
        if level > 1 {
            for i in 0..ENTRIES {
                let e = mem.read_u64(entry_addr(table, i));
                if !F::is_present(e) || (level == 2 && F::is_large(e)) {
                    continue;
                }
                Self::free_table(mem, alloc, F::table_address(e), level - 1);
            }
        }
        alloc.free_frame(table);
    }

    /// Walk to the leaf for `gpa` (< 2^48) or the first hole.
    fn walk(&self, mem: &dyn PhysMem, gpa: u64) -> Walk {
        let mut table = self.root;
        let mut level = 4;
        loop {
            let slot = entry_addr(table, index(gpa, level));
            let entry = mem.read_u64(slot);
            if !F::is_present(entry) {
                return Walk::Hole { level };
            }
            if level == 1 {
                return Walk::Leaf {
                    slot,
                    entry,
                    size: PageSize::Size4K,
                };
            }
            if level == 2 && F::is_large(entry) {
                return Walk::Leaf {
                    slot,
                    entry,
                    size: PageSize::Size2M,
                };
            }
            table = F::table_address(entry);
            level -= 1;
        }
    }

    /// First mapped 4 KiB page in `[start, end)` (page aligned, < 2^48),
    /// skipping whole holes at once.
    fn first_mapped(&self, mem: &dyn PhysMem, start: u64, end: u64) -> Option<u64> {
        let mut g = start;
        while g < end {
            match self.walk(mem, g) {
                Walk::Leaf { .. } => return Some(g),
                Walk::Hole { level } => {
                    let span = entry_span(level);
                    g = (g & !(span - 1)) + span;
                }
            }
        }
        None
    }

    /// The table of `level` (1 = PT, 2 = PD) covering `gpa`, creating the
    /// missing tables above it. The walk must not meet a leaf on the way
    /// (callers checked for overlap).
    fn table_for(
        &mut self,
        mem: &mut dyn PhysMem,
        alloc: &mut dyn FrameAlloc,
        gpa: u64,
        level: u32,
    ) -> Result<Hpa, NptError> {
        let mut table = self.root;
        let mut l = 4;
        while l > level {
            let slot = entry_addr(table, index(gpa, l));
            let entry = mem.read_u64(slot);
            table = if F::is_present(entry) {
                F::table_address(entry)
            } else {
                let t = self.new_table(mem, alloc)?;
                mem.write_u64(slot, F::table_entry(t));
                t
            };
            l -= 1;
        }
        Ok(table)
    }

    /// A fresh zeroed table frame, counted as owned.
    fn new_table(
        &mut self,
        mem: &mut dyn PhysMem,
        alloc: &mut dyn FrameAlloc,
    ) -> Result<Hpa, NptError> {
        let t = alloc.alloc_frame()?;
        for i in 0..ENTRIES {
            mem.write_u64(entry_addr(t, i), 0);
        }
        self.table_frames += 1;
        Ok(t)
    }

    /// Replace the 2 MiB leaf `entry` at `slot` by a page table of 512 4 KiB
    /// leaves with the same frames and permission; returns the page table.
    fn split(
        &mut self,
        mem: &mut dyn PhysMem,
        alloc: &mut dyn FrameAlloc,
        slot: Hpa,
        entry: u64,
    ) -> Result<Hpa, NptError> {
        let base = F::leaf_address(entry, PageSize::Size2M);
        let writable = F::is_writable(entry);
        let pt = alloc.alloc_frame()?;
        self.table_frames += 1;
        for i in 0..ENTRIES {
            mem.write_u64(
                entry_addr(pt, i),
                F::leaf_4k(Hpa(base.0 + i * PAGE_SIZE), writable),
            );
        }
        // Link only after the table is complete: the same translations
        // before and after, so a concurrent walk sees either form.
        mem.write_u64(slot, F::table_entry(pt));
        Ok(pt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svm::NptFormat;
    use crate::testing::test_memory;
    use crate::vmx::EptFormat;

    const MIB: u64 = 1 << 20;

    fn basic<F: EntryFormat>() {
        let (mut mem, mut alloc) = test_memory();
        let mut npt = NestedPageTable::<F>::new(&mut alloc, &mut mem).unwrap();
        // 4 MiB at GPA 0 -> HPA 2 MiB: two 2 MiB leaves.
        npt.map(&mut mem, &mut alloc, Gpa(0), Hpa(2 * MIB), 4 * MIB, true)
            .unwrap();
        let t = npt.translate(&mem, Gpa(0x1234)).unwrap();
        assert_eq!(t.hpa, Hpa(2 * MIB + 0x1234));
        assert_eq!(t.size, PageSize::Size2M);
        assert!(t.writable);
        // Root, PDPT, PD only.
        assert_eq!(npt.table_frames(), 3);
        // Unaligned HPA: 4 KiB leaves.
        npt.map(
            &mut mem,
            &mut alloc,
            Gpa(8 * MIB),
            Hpa(0x5000),
            2 * MIB,
            false,
        )
        .unwrap();
        let t = npt.translate(&mem, Gpa(8 * MIB + 0x1008)).unwrap();
        assert_eq!(
            (t.hpa, t.size, t.writable),
            (Hpa(0x6008), PageSize::Size4K, false)
        );
        assert_eq!(npt.translate(&mem, Gpa(10 * MIB)), None);
        assert_eq!(
            npt.map(&mut mem, &mut alloc, Gpa(3 * MIB), Hpa(0), 0x1000, true),
            Err(NptError::Overlap { gpa: Gpa(3 * MIB) })
        );
        assert!(matches!(
            npt.map(&mut mem, &mut alloc, Gpa(0x800), Hpa(0), 0x1000, true),
            Err(NptError::Misaligned { .. })
        ));
        assert!(matches!(
            npt.map(
                &mut mem,
                &mut alloc,
                Gpa(GPA_LIMIT - 0x1000),
                Hpa(0),
                0x2000,
                true
            ),
            Err(NptError::GpaOutOfRange { .. })
        ));
        // Split on a partial permission change.
        let g = Gfn::containing(Gpa(MIB + 0x3000));
        assert!(npt.set_writable(&mut mem, &mut alloc, g, false).unwrap());
        assert!(!npt.set_writable(&mut mem, &mut alloc, g, false).unwrap());
        let t = npt.translate(&mem, Gpa(MIB + 0x3000)).unwrap();
        assert_eq!(
            (t.hpa, t.size, t.writable),
            (Hpa(3 * MIB + 0x3000), PageSize::Size4K, false)
        );
        let t = npt.translate(&mem, Gpa(MIB + 0x4000)).unwrap();
        assert_eq!(
            (t.hpa, t.size, t.writable),
            (Hpa(3 * MIB + 0x4000), PageSize::Size4K, true)
        );
        assert_eq!(
            npt.set_writable(&mut mem, &mut alloc, Gfn(0x1000), true),
            Err(NptError::NotMapped {
                gpa: Gpa(0x100_0000)
            })
        );
        let frames = npt.table_frames();
        assert_eq!(alloc.live() as u64, frames);
        npt.destroy(&mut mem, &mut alloc);
        assert_eq!(alloc.live(), 0);
    }

    #[test]
    fn basic_npt() {
        basic::<NptFormat>();
    }

    #[test]
    fn basic_ept() {
        basic::<EptFormat>();
    }

    #[test]
    fn out_of_frames_is_an_error_and_destroy_still_frees() {
        let (mut mem, mut alloc) = test_memory();
        let mut npt = NestedPageTable::<NptFormat>::new(&mut alloc, &mut mem).unwrap();
        alloc.set_limit(Some(3));
        let r = npt.map(&mut mem, &mut alloc, Gpa(0), Hpa(0x1000), 4 * MIB, true);
        assert_eq!(r, Err(NptError::Mem(MemError::OutOfFrames)));
        npt.destroy(&mut mem, &mut alloc);
        assert_eq!(alloc.live(), 0);
    }

    #[test]
    fn lookups_and_no_op_changes_write_nothing() {
        let (mut mem, mut alloc) = test_memory();
        let mut npt = NestedPageTable::<NptFormat>::new(&mut alloc, &mut mem).unwrap();
        npt.map(&mut mem, &mut alloc, Gpa(0), Hpa(0), 2 * MIB, false)
            .unwrap();
        mem.take_writes();
        assert!(npt.translate(&mem, Gpa(0x1000)).is_some());
        assert!(!npt
            .set_writable(&mut mem, &mut alloc, Gfn(1), false)
            .unwrap());
        let _ = npt.map(&mut mem, &mut alloc, Gpa(0x1000), Hpa(0), 0x1000, true);
        assert_eq!(mem.write_count(), 0);
        assert_eq!(
            npt.translate(&mem, Gpa(0x1000)).unwrap().size,
            PageSize::Size2M
        );
    }

    #[test]
    fn table_is_complete_before_it_is_linked() {
        let (mut mem, mut alloc) = test_memory();
        let mut npt = NestedPageTable::<EptFormat>::new(&mut alloc, &mut mem).unwrap();
        npt.map(&mut mem, &mut alloc, Gpa(0), Hpa(0), 2 * MIB, true)
            .unwrap();
        mem.take_writes();
        npt.set_writable(&mut mem, &mut alloc, Gfn(5), false)
            .unwrap();
        let w = mem.take_writes();
        // 512 PTEs, then the PDE link, then the one permission change.
        assert_eq!(w.len(), 514);
        let pt = w[0].0.align_down(PAGE_SIZE);
        assert!(w[..512].iter().all(|(a, _)| a.align_down(PAGE_SIZE) == pt));
        assert_eq!(EptFormat::table_address(w[512].1), pt);
        assert_eq!(
            w[513],
            (Hpa(pt.0 + 5 * 8), EptFormat::leaf_4k(Hpa(0x5000), false))
        );
    }
}
