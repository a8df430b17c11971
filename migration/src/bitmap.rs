//! [`DirtyBitmap`]: one bit per guest frame, the currency between the
//! hypervisor's dirty log and the pre-copy engine.
//!
//! Invariant: bits at or beyond `len` are always zero, so `count()` and
//! iteration never report frames outside the VM. Out-of-range `set` calls
//! are ignored and reported by the return value (a frame number from the
//! hypervisor's dirty log is still checked, never trusted to index).

use alloc::vec;
use alloc::vec::Vec;

/// A fixed-length set of guest frame numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    len: u64,
}

impl DirtyBitmap {
    /// An empty bitmap for `pages` frames (gfn `0..pages`).
    pub fn new(pages: u64) -> Self {
        let words = usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX);
        Self {
            words: vec![0; words],
            len: pages,
        }
    }

    /// Number of frames covered.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Covers no frames.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Mark `gfn`. Returns false (and changes nothing) if out of range.
    pub fn set(&mut self, gfn: u64) -> bool {
        if gfn >= self.len {
            return false;
        }
        if let Some(w) = self.words.get_mut((gfn / 64) as usize) {
            *w |= 1 << (gfn % 64);
        }
        true
    }

    /// Mark `count` frames from `start` (clipped to the bitmap).
    pub fn set_range(&mut self, start: u64, count: u64) {
        let end = start.saturating_add(count).min(self.len);
        for gfn in start..end {
            self.set(gfn);
        }
    }

    /// Unmark `gfn` (no-op if out of range).
    pub fn clear(&mut self, gfn: u64) {
        if let Some(w) = self.words.get_mut((gfn / 64) as usize) {
            *w &= !(1 << (gfn % 64));
        }
    }

    /// Whether `gfn` is marked.
    pub fn test(&self, gfn: u64) -> bool {
        gfn < self.len
            && self
                .words
                .get((gfn / 64) as usize)
                .is_some_and(|w| w & (1 << (gfn % 64)) != 0)
    }

    /// Number of marked frames at or after `from`.
    pub fn count_from(&self, from: u64) -> u64 {
        let Ok(first) = usize::try_from(from / 64) else {
            return 0;
        };
        let Some(words) = self.words.get(first..) else {
            return 0;
        };
        let mut n: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        if let Some(w) = words.first() {
            let below = (1u64 << (from % 64)) - 1;
            n -= u64::from((w & below).count_ones());
        }
        n
    }

    /// Number of marked frames.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Unmark everything.
    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }

    /// Mark everything.
    pub fn set_all(&mut self) {
        self.words.fill(!0);
        self.mask_tail();
    }

    /// Add every frame marked in `other` (frames beyond `self.len()` are
    /// dropped).
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        // Restore the invariant if `other` was longer.
        self.mask_tail();
    }

    /// The first marked frame at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut idx = (from / 64) as usize;
        let mut word = *self.words.get(idx)? & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                return Some(idx as u64 * 64 + u64::from(word.trailing_zeros()));
            }
            idx += 1;
            word = *self.words.get(idx)?;
        }
    }

    /// Marked frames in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let mut next = 0u64;
        core::iter::from_fn(move || {
            let g = self.next_set(next)?;
            next = g + 1;
            Some(g)
        })
    }

    /// OR in raw dirty-log words: bit `i % 64` of `words[i / 64]` is frame
    /// `first_word * 64 + i`. Words beyond the bitmap and bits beyond
    /// `len()` are dropped, so the invariant holds whatever the log says.
    pub fn union_words(&mut self, first_word: usize, words: &[u64]) {
        for (i, w) in words.iter().enumerate() {
            if let Some(dst) = first_word
                .checked_add(i)
                .and_then(|j| self.words.get_mut(j))
            {
                *dst |= *w;
            }
        }
        self.mask_tail();
    }

    /// Let a word-based dirty log OR itself straight into the bitmap (e.g.
    /// `out.with_words_mut(|w| partition.collect_dirty(w))` with hvcore's
    /// `Partition`). Bit `g % 64` of word `g / 64` is frame `g`; the slice
    /// has `len().div_ceil(64)` words. Bits beyond `len()` set by `f` are
    /// cleared afterwards, so the invariant holds whatever the log does.
    pub fn with_words_mut<R>(&mut self, f: impl FnOnce(&mut [u64]) -> R) -> R {
        let r = f(&mut self.words);
        self.mask_tail();
        r
    }

    fn mask_tail(&mut self) {
        let tail = self.len % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1 << tail) - 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// xorshift64*: deterministic randomness without a dependency.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed >> 12;
        *seed ^= *seed << 25;
        *seed ^= *seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    #[test]
    fn matches_a_set_model() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in [0u64, 1, 63, 64, 65, 130, 1000] {
            let mut b = DirtyBitmap::new(len);
            let mut model = BTreeSet::new();
            for _ in 0..2000 {
                let g = rng(&mut seed) % (len + 3);
                match rng(&mut seed) % 5 {
                    0 | 1 => {
                        assert_eq!(b.set(g), g < len);
                        if g < len {
                            model.insert(g);
                        }
                    }
                    2 => {
                        b.clear(g);
                        model.remove(&g);
                    }
                    3 => {
                        let n = rng(&mut seed) % 70;
                        b.set_range(g, n);
                        for x in g..(g + n).min(len) {
                            model.insert(x);
                        }
                    }
                    _ => {
                        let from = rng(&mut seed) % (len + 2);
                        assert_eq!(b.next_set(from), model.range(from..).next().copied());
                        assert_eq!(b.count_from(from), model.range(from..).count() as u64);
                    }
                }
                assert_eq!(b.test(g), model.contains(&g));
            }
            assert_eq!(b.count(), model.len() as u64);
            assert!(b.iter().eq(model.iter().copied()));
            let mut w = DirtyBitmap::new(len);
            w.union_words(0, &[!0u64; 40]);
            assert_eq!(w.count(), len);
            let mut w = DirtyBitmap::new(len);
            let words = w.with_words_mut(|words| {
                words.fill(!0);
                words.len()
            });
            assert_eq!(words as u64, len.div_ceil(64));
            assert_eq!(w.count(), len);
            b.set_all();
            assert_eq!(b.count(), len);
            let mut c = DirtyBitmap::new(len / 2);
            c.union_with(&b);
            assert_eq!(c.count(), len / 2);
            b.clear_all();
            assert_eq!(b.count(), 0);
            assert_eq!(b.iter().next(), None);
        }
    }
}
