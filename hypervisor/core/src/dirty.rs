//! The dirty log: which guest RAM frames were written since the last
//! collection, tracked by write-protecting guest pages in the nested page
//! table.
//!
//! Protocol (one VM, pre-copy migration):
//! 1. [`DirtyLog::enable`] write-protects every RAM frame that is mapped
//!    writable (splitting 2 MiB leaves) and empties the dirty set; the
//!    caller flushes the nested TLB.
//! 2. The guest's first write to a protected frame takes a nested write
//!    fault; the partition calls [`DirtyLog::on_write_fault`], which marks
//!    the frame and gives write access back, and re-enters the guest.
//! 3. Writes by the hypervisor or a device model never fault: whoever writes
//!    calls [`DirtyLog::mark_range`] (via its `GuestMemory`).
//! 4. [`DirtyLog::collect_and_clear`] hands out the set, empties it and
//!    protects exactly those frames again; the caller flushes the nested TLB
//!    before the guest runs again, so no write of the next round is lost.
//! 5. [`DirtyLog::disable`] gives write access back everywhere it was taken.
//!
//! Invariants while enabled:
//! * *tracked* = the RAM frames that were mapped writable at `enable`; only
//!   they are ever protected or unprotected here, so frames the VMM mapped
//!   read-only (or left unmapped) keep exactly their permissions;
//! * a tracked frame is writable in the table only if it is in the dirty
//!   set (never the other way round: a frame can be dirty via `mark_range`
//!   and still protected);
//! * every tracked 2 MiB leaf was split at `enable`, so faults, collection
//!   and disable never allocate.
//!
//! Guest RAM is `[0, ram_bytes)`; map it before enabling (frames mapped
//! later are not tracked until the next `enable`).

use crate::addr::{Gfn, Gpa, PAGE_SIZE};
use crate::mem::{FrameAlloc, PhysMem};
use crate::npt::{EntryFormat, NestedPageTable, NptError, GPA_LIMIT};
use alloc::vec;
use alloc::vec::Vec;

/// What [`DirtyLog::on_write_fault`] made of a nested write fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// A logged frame: marked dirty and writable again; re-enter the guest
    /// (no TLB flush needed: permissions only grew).
    Resolved,
    /// Not a dirty-log fault (logging off, outside RAM, or a frame that was
    /// never writable): handle it as an ordinary nested fault.
    NotOurs,
}

/// Dirty bitmap over guest frames `[0, ram_pages)`.
#[derive(Clone, Debug)]
pub struct DirtyLog {
    ram_pages: u64,
    enabled: bool,
    /// Dirty set, bit n = guest frame n.
    dirty: Vec<u64>,
    /// Frames write-protected by `enable` (meaningful while enabled).
    tracked: Vec<u64>,
}

fn bit(words: &[u64], n: u64) -> bool {
    words
        .get((n / 64) as usize)
        .is_some_and(|w| w & (1 << (n % 64)) != 0)
}

fn set_bit(words: &mut [u64], n: u64) {
    if let Some(w) = words.get_mut((n / 64) as usize) {
        *w |= 1 << (n % 64);
    }
}

/// Calls `f(n)` for each set bit `n` of `words`, in increasing order.
fn for_each_bit(words: &[u64], mut f: impl FnMut(u64)) {
    for (i, &w) in words.iter().enumerate() {
        let mut rest = w;
        while rest != 0 {
            let b = rest.trailing_zeros() as u64;
            f(i as u64 * 64 + b);
            rest &= rest - 1;
        }
    }
}

impl DirtyLog {
    /// A disabled log for guest RAM `[0, ram_bytes)` (a partial last page
    /// counts as a frame; sizes beyond the 48-bit guest-physical space are
    /// clamped to it).
    pub fn new(ram_bytes: u64) -> Self {
        let ram_pages = ram_bytes.min(GPA_LIMIT).div_ceil(PAGE_SIZE);
        let words = ram_pages.div_ceil(64) as usize;
        Self {
            ram_pages,
            enabled: false,
            dirty: vec![0; words],
            tracked: vec![0; words],
        }
    }

    /// Guest frames covered.
    pub fn ram_pages(&self) -> u64 {
        self.ram_pages
    }

    /// Length in u64 words a bitmap for [`DirtyLog::collect_and_clear`]
    /// needs at least.
    pub fn bitmap_words(&self) -> usize {
        self.dirty.len()
    }

    /// Whether logging is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether `gfn` is in the dirty set now.
    pub fn is_dirty(&self, gfn: Gfn) -> bool {
        bit(&self.dirty, gfn.0)
    }

    /// Number of frames in the dirty set now.
    pub fn dirty_count(&self) -> u64 {
        self.dirty.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Start logging (or start a new round if already on): write-protect
    /// every RAM frame mapped writable, splitting 2 MiB leaves, and empty
    /// the dirty set. The caller flushes the nested TLB.
    ///
    /// On error (out of frames while splitting) every frame protected so far
    /// is writable again and logging stays off.
    pub fn enable<F: EntryFormat>(
        &mut self,
        npt: &mut NestedPageTable<F>,
        mem: &mut dyn PhysMem,
        alloc: &mut dyn FrameAlloc,
    ) -> Result<(), NptError> {
        self.dirty.fill(0);
        if self.enabled {
            // Tracked frames are split already: protecting them cannot fail
            // for want of memory.
            return self.protect_tracked(npt, mem, alloc);
        }
        self.tracked.fill(0);
        for n in 0..self.ram_pages {
            let Some(t) = npt.translate(mem, Gfn(n).gpa()) else {
                continue;
            };
            if !t.writable {
                continue;
            }
            if let Err(e) = npt.set_writable(mem, alloc, Gfn(n), false) {
                // Undo: frames before `n` are split, so this cannot fail.
                let _ = self.unprotect_tracked(npt, mem, alloc);
                self.tracked.fill(0);
                return Err(e);
            }
            set_bit(&mut self.tracked, n);
        }
        self.enabled = true;
        Ok(())
    }

    /// Stop logging: give write access back to every frame `enable` took it
    /// from, empty the set. Does nothing if logging is off.
    pub fn disable<F: EntryFormat>(
        &mut self,
        npt: &mut NestedPageTable<F>,
        mem: &mut dyn PhysMem,
        alloc: &mut dyn FrameAlloc,
    ) -> Result<(), NptError> {
        if !self.enabled {
            return Ok(());
        }
        let r = self.unprotect_tracked(npt, mem, alloc);
        self.enabled = false;
        self.dirty.fill(0);
        self.tracked.fill(0);
        r
    }

    /// A nested write fault at `gpa`. If logging is on and `gpa` is a
    /// tracked RAM frame: mark it dirty, make it writable, `Resolved`. Else
    /// `NotOurs` and nothing changes.
    pub fn on_write_fault<F: EntryFormat>(
        &mut self,
        npt: &mut NestedPageTable<F>,
        mem: &mut dyn PhysMem,
        alloc: &mut dyn FrameAlloc,
        gpa: Gpa,
    ) -> Result<FaultOutcome, NptError> {
        let gfn = Gfn::containing(gpa);
        if !self.enabled || gfn.0 >= self.ram_pages || !bit(&self.tracked, gfn.0) {
            return Ok(FaultOutcome::NotOurs);
        }
        set_bit(&mut self.dirty, gfn.0);
        // Already writable (a stale translation on the faulting side) is
        // fine: the write is recorded and the guest retries.
        npt.set_writable(mem, alloc, gfn, true)?;
        Ok(FaultOutcome::Resolved)
    }

    /// Record a write of `[gpa, gpa+len_bytes)` by the hypervisor or a
    /// device model. The part outside RAM is ignored; so is everything while
    /// logging is off.
    pub fn mark_range(&mut self, gpa: Gpa, len_bytes: u64) {
        if !self.enabled || len_bytes == 0 {
            return;
        }
        let first = gpa.0 / PAGE_SIZE;
        let last = gpa
            .0
            .saturating_add(len_bytes - 1)
            .min(self.ram_pages.saturating_mul(PAGE_SIZE).saturating_sub(1))
            / PAGE_SIZE;
        if first >= self.ram_pages {
            return;
        }
        let mut n = first;
        while n <= last {
            // Whole words at once where the range allows.
            if n.is_multiple_of(64) && last - n >= 63 {
                if let Some(w) = self.dirty.get_mut((n / 64) as usize) {
                    *w = u64::MAX;
                }
                n += 64;
            } else {
                set_bit(&mut self.dirty, n);
                n += 1;
            }
        }
    }

    /// OR the dirty set into `out` (bit n = guest frame n), empty the set and
    /// write-protect exactly those frames again. Returns how many frames
    /// were dirty. The caller flushes the nested TLB before the guest runs.
    ///
    /// `out` must have at least [`DirtyLog::bitmap_words`] words; with
    /// logging off the set is empty and this returns 0.
    pub fn collect_and_clear<F: EntryFormat>(
        &mut self,
        npt: &mut NestedPageTable<F>,
        mem: &mut dyn PhysMem,
        alloc: &mut dyn FrameAlloc,
        out: &mut [u64],
    ) -> Result<u64, NptError> {
        if out.len() < self.dirty.len() {
            return Err(NptError::BitmapTooSmall {
                needed_words: self.dirty.len(),
                len_words: out.len(),
            });
        }
        let mut count = 0;
        let mut first_err = None;
        for (i, word) in self.dirty.iter_mut().enumerate() {
            let w = core::mem::take(word);
            if w == 0 {
                continue;
            }
            out[i] |= w;
            count += u64::from(w.count_ones());
            // Only tracked frames were ever made writable here.
            let mut rest = w & self.tracked[i];
            while rest != 0 {
                let n = i as u64 * 64 + u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                if let Err(e) = npt.set_writable(mem, alloc, Gfn(n), false) {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(count),
        }
    }

    fn protect_tracked<F: EntryFormat>(
        &self,
        npt: &mut NestedPageTable<F>,
        mem: &mut dyn PhysMem,
        alloc: &mut dyn FrameAlloc,
    ) -> Result<(), NptError> {
        self.set_tracked(npt, mem, alloc, false)
    }

    fn unprotect_tracked<F: EntryFormat>(
        &self,
        npt: &mut NestedPageTable<F>,
        mem: &mut dyn PhysMem,
        alloc: &mut dyn FrameAlloc,
    ) -> Result<(), NptError> {
        self.set_tracked(npt, mem, alloc, true)
    }

    /// Set every tracked frame's permission; keeps going past errors and
    /// returns the first.
    fn set_tracked<F: EntryFormat>(
        &self,
        npt: &mut NestedPageTable<F>,
        mem: &mut dyn PhysMem,
        alloc: &mut dyn FrameAlloc,
        writable: bool,
    ) -> Result<(), NptError> {
        let mut first_err = None;
        for_each_bit(&self.tracked, |n| {
            if let Err(e) = npt.set_writable(mem, alloc, Gfn(n), writable) {
                first_err.get_or_insert(e);
            }
        });
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{Hpa, PAGE_SIZE};
    use crate::npt::PageSize;
    use crate::svm::NptFormat;
    use crate::testing::{test_memory, TestAlloc, TestMem};

    const MIB: u64 = 1 << 20;

    fn w(
        log: &mut DirtyLog,
        npt: &mut NestedPageTable<NptFormat>,
        mem: &mut TestMem,
        alloc: &mut TestAlloc,
        gpa: u64,
    ) -> FaultOutcome {
        log.on_write_fault(npt, mem, alloc, Gpa(gpa)).unwrap()
    }

    #[test]
    fn round_trip_on_a_large_page_vm() {
        let (mut mem, mut alloc) = test_memory();
        let mut npt = NestedPageTable::<NptFormat>::new(&mut alloc, &mut mem).unwrap();
        // 4 MiB RAM; the last 64 KiB are read-only (a "ROM").
        npt.map(
            &mut mem,
            &mut alloc,
            Gpa(0),
            Hpa(0x4000_0000),
            4 * MIB - 0x1_0000,
            true,
        )
        .unwrap();
        npt.map(
            &mut mem,
            &mut alloc,
            Gpa(4 * MIB - 0x1_0000),
            Hpa(0x5000_0000),
            0x1_0000,
            false,
        )
        .unwrap();
        let mut log = DirtyLog::new(4 * MIB);
        assert_eq!((log.ram_pages(), log.bitmap_words()), (1024, 16));
        log.enable(&mut npt, &mut mem, &mut alloc).unwrap();
        assert!(log.enabled());
        let t = npt.translate(&mem, Gpa(0x3000)).unwrap();
        assert_eq!((t.size, t.writable), (PageSize::Size4K, false));

        assert_eq!(
            w(&mut log, &mut npt, &mut mem, &mut alloc, 0x3008),
            FaultOutcome::Resolved
        );
        assert!(npt.translate(&mem, Gpa(0x3000)).unwrap().writable);
        // The ROM and addresses past RAM are not ours.
        assert_eq!(
            w(&mut log, &mut npt, &mut mem, &mut alloc, 4 * MIB - 0x1000),
            FaultOutcome::NotOurs
        );
        assert_eq!(
            w(&mut log, &mut npt, &mut mem, &mut alloc, 4 * MIB),
            FaultOutcome::NotOurs
        );
        log.mark_range(Gpa(0x10_0ff0), 0x20); // frames 0x100 and 0x101
        log.mark_range(Gpa(4 * MIB - 0x800), 0x1000); // last frame, clipped
        assert_eq!(log.dirty_count(), 4);

        let mut out = vec![0u64; 16];
        out[0] = 1; // OR semantics: bits already set stay.
        assert_eq!(
            log.collect_and_clear(&mut npt, &mut mem, &mut alloc, &mut out)
                .unwrap(),
            4
        );
        assert_eq!(out[0], 1 | 1 << 3);
        assert_eq!(out[4], 0b11);
        assert_eq!(out[15], 1 << 63);
        assert_eq!(log.dirty_count(), 0);
        assert!(!npt.translate(&mem, Gpa(0x3000)).unwrap().writable);
        assert_eq!(
            log.collect_and_clear(&mut npt, &mut mem, &mut alloc, &mut [0; 15]),
            Err(NptError::BitmapTooSmall {
                needed_words: 16,
                len_words: 15
            })
        );

        log.disable(&mut npt, &mut mem, &mut alloc).unwrap();
        assert!(npt.translate(&mem, Gpa(0x3000)).unwrap().writable);
        assert!(!npt.translate(&mem, Gpa(4 * MIB - 0x1000)).unwrap().writable);
        assert_eq!(
            w(&mut log, &mut npt, &mut mem, &mut alloc, 0x3000),
            FaultOutcome::NotOurs
        );
        // Faults and collection never allocated: only enable's splits did.
        npt.destroy(&mut mem, &mut alloc);
        assert_eq!(alloc.live(), 0);
    }

    #[test]
    fn mark_range_sets_exactly_the_touched_frames() {
        // Every start and end frame around word boundaries, against a
        // naive loop; RAM ends mid-word (300 frames, partial last page).
        let (mut mem, mut alloc) = test_memory();
        let mut npt = NestedPageTable::<NptFormat>::new(&mut alloc, &mut mem).unwrap();
        let ram_bytes = 300 * PAGE_SIZE - 100;
        let mut log = DirtyLog::new(ram_bytes);
        log.mark_range(Gpa(0), ram_bytes);
        assert_eq!(log.dirty_count(), 0, "marks while disabled");
        log.enable(&mut npt, &mut mem, &mut alloc).unwrap();
        let mut out = vec![0u64; log.bitmap_words()];
        for first in (0..=2).chain(60..=68).chain(126..=130).chain(250..305) {
            for last in first..305 {
                for (off, tail) in [(0, 0), (7, 1)] {
                    let gpa = first * PAGE_SIZE + off;
                    let len = (last - first) * PAGE_SIZE + PAGE_SIZE - off - tail;
                    log.mark_range(Gpa(gpa), len);
                    let mut want = vec![0u64; out.len()];
                    for f in first..=last.min(299) {
                        want[(f / 64) as usize] |= 1 << (f % 64);
                    }
                    assert_eq!(log.dirty, want, "{gpa:#x}+{len:#x}");
                    out.fill(0);
                    let n = log
                        .collect_and_clear(&mut npt, &mut mem, &mut alloc, &mut out)
                        .unwrap();
                    assert_eq!(out, want);
                    assert_eq!(n, (last.min(299) + 1).saturating_sub(first));
                }
            }
        }
        log.mark_range(Gpa(u64::MAX - 5), u64::MAX);
        log.mark_range(Gpa(299 * PAGE_SIZE), u64::MAX);
        assert_eq!(log.dirty_count(), 1);
    }

    #[test]
    fn enable_out_of_frames_rolls_back() {
        let (mut mem, mut alloc) = test_memory();
        let mut npt = NestedPageTable::<NptFormat>::new(&mut alloc, &mut mem).unwrap();
        npt.map(&mut mem, &mut alloc, Gpa(0), Hpa(0), 8 * MIB, true)
            .unwrap();
        // Root, PDPT, PD + room for two of the four page tables.
        alloc.set_limit(Some(5));
        let mut log = DirtyLog::new(8 * MIB);
        assert!(matches!(
            log.enable(&mut npt, &mut mem, &mut alloc),
            Err(NptError::Mem(_))
        ));
        assert!(!log.enabled());
        for n in 0..2048 {
            assert!(
                npt.translate(&mem, Gfn(n).gpa()).unwrap().writable,
                "frame {n}"
            );
        }
    }
}
