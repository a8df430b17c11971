//! Physical frame bookkeeping: a bitmap over all 4 KiB frames below the
//! highest usable address (bit set = frame free).
//!
//! Pure logic (no unsafe, no hardware): the platform hands it the storage
//! for the bitmap and the free/used ranges derived from the boot memory map,
//! and it answers allocation requests. Host tests drive it directly.
//!
//! Invariants: `free_frames` equals the number of set bits; only frames
//! below `frames` are ever set; [`FrameBitmap::free_range`] of a frame that
//! is already free is a caller bug and panics (a double free would hand one
//! frame to two owners — a broken hypervisor invariant).

/// Frame size in bytes.
pub const FRAME_BYTES: u64 = 4096;

/// Round `v` up to a multiple of `align` (a power of two); saturates.
pub const fn align_up(v: u64, align: u64) -> u64 {
    match v.checked_add(align - 1) {
        Some(x) => x & !(align - 1),
        None => !(align - 1),
    }
}

/// Round `v` down to a multiple of `align` (a power of two).
pub const fn align_down(v: u64, align: u64) -> u64 {
    v & !(align - 1)
}

/// The bitmap allocator. Frame numbers are physical address / 4 KiB.
pub struct FrameBitmap<'a> {
    bits: &'a mut [u64],
    frames: u64,
    free_frames: u64,
    managed_frames: u64,
    /// Word index where the next single-frame search starts.
    hint: usize,
}

impl<'a> FrameBitmap<'a> {
    /// Words of storage needed to track `frames` frames.
    pub const fn words_for(frames: u64) -> usize {
        frames.div_ceil(64) as usize
    }

    /// A bitmap with every frame used. `bits` must hold at least
    /// [`Self::words_for`]`(frames)` words; extra words are ignored.
    pub fn new(bits: &'a mut [u64], frames: u64) -> Self {
        let words = Self::words_for(frames).min(bits.len());
        let bits = &mut bits[..words];
        bits.fill(0);
        let frames = frames.min(words as u64 * 64);
        FrameBitmap {
            bits,
            frames,
            free_frames: 0,
            managed_frames: 0,
            hint: 0,
        }
    }

    /// Frames tracked (free or not).
    pub fn frames(&self) -> u64 {
        self.frames
    }
    /// Frames currently free.
    pub fn free_frames(&self) -> u64 {
        self.free_frames
    }
    /// Frames ever made available by [`Self::add_free`] minus those taken
    /// back by [`Self::reserve`]: the allocator's total.
    pub fn managed_frames(&self) -> u64 {
        self.managed_frames
    }

    fn is_free(&self, frame: u64) -> bool {
        self.bits[(frame / 64) as usize] & (1 << (frame % 64)) != 0
    }

    fn set(&mut self, frame: u64, free: bool) {
        let w = &mut self.bits[(frame / 64) as usize];
        let mask = 1u64 << (frame % 64);
        if free {
            *w |= mask;
        } else {
            *w &= !mask;
        }
    }

    /// Frames fully inside the byte range `[start, end)`, clipped to the
    /// bitmap.
    fn inner_frames(&self, start: u64, end: u64) -> (u64, u64) {
        let first = align_up(start, FRAME_BYTES) / FRAME_BYTES;
        let last = (align_down(end, FRAME_BYTES) / FRAME_BYTES).min(self.frames);
        (first, last.max(first))
    }

    /// Frames touched by the byte range `[start, end)`, clipped.
    fn outer_frames(&self, start: u64, end: u64) -> (u64, u64) {
        let first = (align_down(start, FRAME_BYTES) / FRAME_BYTES).min(self.frames);
        let last = (align_up(end, FRAME_BYTES) / FRAME_BYTES).min(self.frames);
        (first, last.max(first))
    }

    /// Set frames `[first, last)` free or used, a word at a time; returns
    /// how many frames changed state.
    fn set_range(&mut self, first: u64, last: u64, free: bool) -> u64 {
        let mut changed = 0u64;
        let mut f = first;
        while f < last {
            let word = (f / 64) as usize;
            let bit = f % 64;
            let n = (64 - bit).min(last - f);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let w = &mut self.bits[word];
            if free {
                changed += u64::from((!*w & mask).count_ones());
                *w |= mask;
            } else {
                changed += u64::from((*w & mask).count_ones());
                *w &= !mask;
            }
            f += n;
        }
        changed
    }

    /// Mark the whole frames inside byte range `[start, end)` free (usable
    /// RAM from the memory map). Overlaps with free frames are harmless.
    pub fn add_free(&mut self, start: u64, end: u64) {
        let (first, last) = self.inner_frames(start, end);
        let n = self.set_range(first, last, true);
        self.free_frames += n;
        self.managed_frames += n;
    }

    /// Mark every frame touched by byte range `[start, end)` used for good
    /// (firmware areas, the image, modules, the bitmap itself).
    pub fn reserve(&mut self, start: u64, end: u64) {
        let (first, last) = self.outer_frames(start, end);
        let n = self.set_range(first, last, false);
        self.free_frames -= n;
        self.managed_frames -= n;
    }

    /// Take one free frame; returns its frame number.
    pub fn alloc(&mut self) -> Option<u64> {
        let n = self.bits.len();
        for i in 0..n {
            let w = (self.hint + i) % n;
            let word = self.bits[w];
            if word != 0 {
                let frame = w as u64 * 64 + u64::from(word.trailing_zeros());
                self.set(frame, false);
                self.free_frames -= 1;
                self.hint = w;
                return Some(frame);
            }
        }
        None
    }

    /// Take `count` consecutive free frames whose first frame number is a
    /// multiple of `align` (a power of two, in frames). Searches from the
    /// top of memory down, so large allocations (guest RAM) stay away from
    /// the low frames single allocations come from first.
    pub fn alloc_contiguous(&mut self, count: u64, align: u64) -> Option<u64> {
        if count == 0 || !align.is_power_of_two() || count > self.free_frames {
            return None;
        }
        let top = self.frames.checked_sub(count)?;
        let mut start = align_down(top, align);
        loop {
            // Check [start, start + count) from its top: on a used frame,
            // jump below it.
            match (start..start + count).rev().find(|f| !self.is_free(*f)) {
                None => {
                    for f in start..start + count {
                        self.set(f, false);
                    }
                    self.free_frames -= count;
                    return Some(start);
                }
                Some(used) => {
                    // The next candidate must end at or below `used`; it is
                    // strictly lower than `start` because `used >= start`.
                    let below = used.checked_sub(count)?;
                    start = align_down(below, align);
                }
            }
        }
    }

    /// Return `count` frames starting at `first`.
    ///
    /// Panics if any of them is already free or outside the bitmap: a double
    /// free is a broken hypervisor invariant.
    pub fn free_range(&mut self, first: u64, count: u64) {
        let end = first.checked_add(count).expect("frame range overflows");
        assert!(
            end <= self.frames,
            "freeing frames {first:#x}+{count} outside the bitmap"
        );
        for f in first..end {
            assert!(!self.is_free(f), "double free of frame {f:#x}");
            self.set(f, true);
        }
        self.free_frames += count;
    }
}

/// First address `a >= min_addr`, aligned to `align`, such that
/// `[a, a + bytes)` lies inside one of `usable` and overlaps none of
/// `excluded` (all ranges `[start, end)`). Used to place the bitmap itself
/// before any allocator exists.
pub fn first_fit(
    usable: impl Iterator<Item = (u64, u64)>,
    excluded: &[(u64, u64)],
    bytes: u64,
    align: u64,
    min_addr: u64,
) -> Option<u64> {
    for (start, end) in usable {
        let mut cand = align_up(start.max(min_addr), align);
        // Each pass either succeeds or moves past one excluded range, so the
        // loop runs at most excluded.len() + 1 times per region.
        for _ in 0..=excluded.len() {
            let Some(cand_end) = cand.checked_add(bytes) else {
                break;
            };
            if cand_end > end {
                break;
            }
            match excluded
                .iter()
                .find(|(xs, xe)| *xs < cand_end && cand < *xe)
            {
                None => return Some(cand),
                Some((_, xe)) => cand = align_up(*xe, align),
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    fn bitmap(storage: &mut Vec<u64>, frames: u64) -> FrameBitmap<'_> {
        storage.resize(FrameBitmap::words_for(frames), 0);
        FrameBitmap::new(storage, frames)
    }

    #[test]
    fn add_reserve_and_count() {
        let mut s = Vec::new();
        let mut b = bitmap(&mut s, 1000);
        b.add_free(0x10_0000 + 1, 0x20_0000 - 1); // partial frames ignored
        assert_eq!(b.free_frames(), 254);
        b.add_free(0x10_0000, 0x20_0000);
        assert_eq!(b.free_frames(), 256);
        b.reserve(0x10_0fff, 0x10_1001); // touches two frames
        assert_eq!(b.free_frames(), 254);
        assert_eq!(b.managed_frames(), 254);
        // Clipped to the bitmap (and add_free overrides earlier reserves:
        // the platform reserves after adding).
        b.add_free(0, u64::MAX);
        assert_eq!(b.free_frames(), 1000);
    }

    /// Word-at-a-time range updates against a per-frame model.
    #[test]
    fn ranges_match_a_per_frame_model() {
        let mut s = Vec::new();
        let frames = 700u64;
        let mut b = bitmap(&mut s, frames);
        let mut model = vec![false; frames as usize];
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..500 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let a = (x % (frames + 10)) * FRAME_BYTES + (x >> 40) % 3000;
            let len = (x >> 20) % (200 * FRAME_BYTES);
            let (start, end) = (a, a + len);
            if x & 1 == 0 {
                b.add_free(start, end);
                let first = start.div_ceil(FRAME_BYTES);
                let last = (end / FRAME_BYTES).min(frames);
                for f in first..last.max(first) {
                    model[f as usize] = true;
                }
            } else {
                b.reserve(start, end);
                let first = (start / FRAME_BYTES).min(frames);
                let last = end.div_ceil(FRAME_BYTES).min(frames);
                for f in first..last.max(first) {
                    model[f as usize] = false;
                }
            }
            let free = model.iter().filter(|m| **m).count() as u64;
            assert_eq!(b.free_frames(), free);
            assert_eq!(b.managed_frames(), free);
            for (f, m) in model.iter().enumerate() {
                assert_eq!(b.is_free(f as u64), *m, "frame {f}");
            }
        }
    }

    #[test]
    fn single_frames_are_distinct_and_freeable() {
        let mut s = Vec::new();
        let mut b = bitmap(&mut s, 300);
        b.add_free(0, 300 * FRAME_BYTES);
        let mut got: Vec<u64> = (0..300).map(|_| b.alloc().unwrap()).collect();
        assert_eq!(b.alloc(), None);
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), 300);
        b.free_range(17, 1);
        assert_eq!(b.alloc(), Some(17));
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_panics() {
        let mut s = Vec::new();
        let mut b = bitmap(&mut s, 64);
        b.add_free(0, 64 * FRAME_BYTES);
        b.free_range(3, 1);
    }

    #[test]
    fn contiguous_respects_alignment_and_holes() {
        let mut s = Vec::new();
        let mut b = bitmap(&mut s, 4096);
        b.add_free(0, 4096 * FRAME_BYTES);
        b.reserve(3000 * FRAME_BYTES, 3001 * FRAME_BYTES); // a hole
        let a = b.alloc_contiguous(512, 512).unwrap();
        assert_eq!(a % 512, 0);
        assert!(!(a..a + 512).contains(&3000));
        let c = b.alloc_contiguous(512, 512).unwrap();
        assert_ne!(a, c);
        assert_eq!(b.free_frames(), 4096 - 1 - 1024);
        b.free_range(a, 512);
        assert_eq!(b.alloc_contiguous(512, 512), Some(a));
    }

    #[test]
    fn contiguous_fails_cleanly() {
        let mut s = Vec::new();
        let mut b = bitmap(&mut s, 2048);
        b.add_free(0, 2048 * FRAME_BYTES);
        // Every 300th frame used: no aligned 512-run exists.
        for f in (0..2048).step_by(300) {
            b.reserve(f * FRAME_BYTES, f * FRAME_BYTES + 1);
        }
        assert_eq!(b.alloc_contiguous(512, 512), None);
        assert!(b.alloc_contiguous(200, 1).is_some());
        assert_eq!(b.alloc_contiguous(0, 1), None);
        assert_eq!(b.alloc_contiguous(1, 3), None);
    }

    /// Model check: random alloc/free sequences against a simple set.
    #[test]
    fn model_random_sequences() {
        let mut s = Vec::new();
        let frames = 3000u64;
        let mut b = bitmap(&mut s, frames);
        b.add_free(0, frames * FRAME_BYTES);
        b.reserve(100 * FRAME_BYTES, 120 * FRAME_BYTES);
        let mut owned: Vec<(u64, u64)> = Vec::new();
        let mut used = vec![false; frames as usize];
        used[100..120].fill(true);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match x % 4 {
                0 | 1 => {
                    let (count, align) = if x % 8 < 2 {
                        (1, 1)
                    } else {
                        (1 + (x >> 8) % 70, 1 << ((x >> 20) % 7))
                    };
                    if let Some(first) = b.alloc_contiguous(count, align) {
                        assert_eq!(first % align, 0);
                        for f in first..first + count {
                            assert!(!used[f as usize], "frame {f} handed out twice");
                            used[f as usize] = true;
                        }
                        owned.push((first, count));
                    } else if count == 1 && align == 1 {
                        assert!(
                            used.iter().all(|u| *u),
                            "single-frame request failed with free frames"
                        );
                    }
                }
                2 => {
                    if let Some(f) = b.alloc() {
                        assert!(!used[f as usize]);
                        used[f as usize] = true;
                        owned.push((f, 1));
                    }
                }
                _ => {
                    if !owned.is_empty() {
                        let (first, count) = owned.swap_remove((x >> 32) as usize % owned.len());
                        b.free_range(first, count);
                        for f in first..first + count {
                            used[f as usize] = false;
                        }
                    }
                }
            }
            assert_eq!(b.free_frames(), used.iter().filter(|u| !**u).count() as u64);
        }
    }

    #[test]
    fn first_fit_skips_exclusions() {
        let usable = [(0u64, 0x9_F000u64), (0x10_0000, 0x4000_0000)];
        let excluded = [
            (0, 0x10_0000),
            (0x10_0000, 0x30_0000),
            (0x30_0000, 0x30_1000),
        ];
        assert_eq!(
            first_fit(usable.iter().copied(), &excluded, 0x8000, 0x1000, 0x10_0000),
            Some(0x30_1000)
        );
        assert_eq!(
            first_fit(usable.iter().copied(), &excluded, 0x4000_0000, 0x1000, 0),
            None
        );
    }
}
