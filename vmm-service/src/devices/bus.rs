//! Address decoding for the port I/O and MMIO buses: which device region
//! answers an address.
//!
//! A [`Bus`] is a sorted list of non-overlapping ranges, each naming a
//! target (a device and one of its regions). Insertion refuses overlaps
//! and empty or wrapping ranges, so a lookup finds at most one range; it is
//! a binary search, so it costs the same for every VM whatever its device
//! count. The machine layout is fixed when the VM is built, so the bus has
//! no removal.

use alloc::vec::Vec;

/// One decoded range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range<T> {
    /// First address.
    pub base: u64,
    /// Length in bytes (ports count one byte each).
    pub len: u64,
    /// Who answers it.
    pub target: T,
}

impl<T> Range<T> {
    /// One past the last address (no overflow: checked at insertion).
    pub fn end(&self) -> u64 {
        self.base + self.len
    }
}

/// Why a range could not be added (a machine-layout bug, caught by the
/// unit tests of every layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusError {
    /// Length 0 or `base + len` past the end of the address space.
    BadRange { base: u64, len: u64 },
    /// Overlaps the range starting at `other`.
    Overlap { base: u64, other: u64 },
}

/// A sorted, non-overlapping set of ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bus<T> {
    ranges: Vec<Range<T>>,
    /// Addresses are below this (0x1_0000 for ports).
    limit: u64,
}

/// A hit: the range's target and the offset of the address inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit<T> {
    pub target: T,
    pub offset: u64,
    /// Bytes from the address to the end of the range.
    pub left: u64,
}

impl<T: Copy> Bus<T> {
    /// An empty bus of addresses `[0, limit)`.
    pub fn new(limit: u64) -> Self {
        Self {
            ranges: Vec::new(),
            limit,
        }
    }

    /// Add `[base, base+len)` answered by `target`.
    pub fn insert(&mut self, base: u64, len: u64, target: T) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|&e| len != 0 && e <= self.limit);
        let Some(end) = end else {
            return Err(BusError::BadRange { base, len });
        };
        let at = self.ranges.partition_point(|r| r.base < base);
        if let Some(prev) = at.checked_sub(1).and_then(|i| self.ranges.get(i)) {
            if prev.end() > base {
                return Err(BusError::Overlap {
                    base,
                    other: prev.base,
                });
            }
        }
        if let Some(next) = self.ranges.get(at) {
            if next.base < end {
                return Err(BusError::Overlap {
                    base,
                    other: next.base,
                });
            }
        }
        self.ranges.insert(at, Range { base, len, target });
        Ok(())
    }

    /// The range holding `addr`, if any.
    pub fn lookup(&self, addr: u64) -> Option<Hit<T>> {
        let at = self.ranges.partition_point(|r| r.base <= addr);
        let r = self.ranges.get(at.checked_sub(1)?)?;
        (addr < r.end()).then(|| Hit {
            target: r.target,
            offset: addr - r.base,
            left: r.end() - addr,
        })
    }

    /// All ranges, in address order.
    pub fn ranges(&self) -> &[Range<T>] {
        &self.ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_the_one_range() {
        let mut b = Bus::new(0x1_0000);
        b.insert(0x3f8, 8, 'u').unwrap();
        b.insert(0x20, 2, 'p').unwrap();
        b.insert(0x40, 4, 't').unwrap();
        b.insert(0x28, 0x18, 'q').unwrap();
        assert_eq!(
            b.lookup(0x3fa),
            Some(Hit {
                target: 'u',
                offset: 2,
                left: 6
            })
        );
        assert_eq!(b.lookup(0x3f8).unwrap().offset, 0);
        assert_eq!(b.lookup(0x3ff).unwrap().left, 1);
        assert_eq!(b.lookup(0x400), None);
        assert_eq!(b.lookup(0x3f7), None);
        assert_eq!(b.lookup(0x21).unwrap().target, 'p');
        assert_eq!(b.lookup(0x22), None);
        assert_eq!(b.lookup(0x3f).unwrap().target, 'q');
        assert_eq!(b.lookup(0), None);
        assert_eq!(b.lookup(u64::MAX), None);
        let bases: Vec<u64> = b.ranges().iter().map(|r| r.base).collect();
        assert_eq!(bases, [0x20, 0x28, 0x40, 0x3f8]);
    }

    #[test]
    fn insert_refuses_overlaps_and_bad_ranges() {
        let mut b = Bus::new(0x1_0000);
        b.insert(0x40, 4, 1).unwrap();
        for (base, len) in [(0x3f, 2), (0x43, 1), (0x40, 4), (0x30, 0x100)] {
            assert!(
                matches!(b.insert(base, len, 2), Err(BusError::Overlap { .. })),
                "{base:#x}+{len}"
            );
        }
        assert_eq!(
            b.insert(0x10, 0, 2),
            Err(BusError::BadRange { base: 0x10, len: 0 })
        );
        assert!(b.insert(0xffff, 2, 2).is_err());
        assert!(b.insert(0xffff, 1, 2).is_ok());
        let mut m = Bus::new(u64::MAX);
        assert!(m.insert(u64::MAX - 1, 2, 0).is_err());
        assert!(m.insert(0xfee0_0000, 0x1000, 0).is_ok());
        // Adjacent ranges are fine.
        b.insert(0x3c, 4, 3).unwrap();
        b.insert(0x44, 4, 4).unwrap();
        assert_eq!(b.lookup(0x3f).unwrap().target, 3);
        assert_eq!(b.lookup(0x44).unwrap().target, 4);
    }

    /// Random inserts against a byte-map model.
    #[test]
    fn matches_a_model() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..50 {
            let mut b = Bus::new(512);
            let mut model = [None::<u32>; 512];
            for id in 0..40u32 {
                let base = next() % 512;
                let len = next() % 40;
                let free = len > 0
                    && base + len <= 512
                    && (base..base + len).all(|a| model[a as usize].is_none());
                assert_eq!(b.insert(base, len, id).is_ok(), free);
                if free {
                    for a in base..base + len {
                        model[a as usize] = Some(id);
                    }
                }
            }
            for a in 0..600u64 {
                let want = model.get(a as usize).copied().flatten();
                assert_eq!(b.lookup(a).map(|h| h.target), want, "addr {a}");
            }
        }
    }
}
