//! Geometry of a VHDX: how virtual offsets map to payload blocks, chunks and
//! BAT entries (MS-VHDX 2.4, 2.5), and how a request resolves into pieces.
//!
//! Invariant: a [`Geometry`] is only built from validated parameters (block
//! size a power of two in 1..=256 MiB, sector 512/4096, size <= 64 TiB), so
//! the arithmetic below cannot overflow.

use super::format::{MAX_BLOCK_SIZE, MAX_VIRTUAL_SIZE, MIN_BLOCK_SIZE, SECTORS_PER_BITMAP_BLOCK};

/// Derived sizes of one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Payload block size in bytes.
    pub block_size: u32,
    /// Logical sector size in bytes.
    pub sector_size: u32,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Payload blocks per chunk (per sector bitmap block).
    pub chunk_ratio: u64,
    /// Number of payload blocks.
    pub payload_blocks: u64,
    /// Number of sector bitmap blocks.
    pub bitmap_blocks: u64,
    /// Differencing disk (changes the BAT entry count).
    pub has_parent: bool,
}

impl Geometry {
    /// Builds a geometry; `None` when a parameter is outside the spec.
    pub fn new(
        block_size: u32,
        sector_size: u32,
        virtual_size: u64,
        has_parent: bool,
    ) -> Option<Geometry> {
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
            || !block_size.is_power_of_two()
            || (sector_size != 512 && sector_size != 4096)
            || virtual_size == 0
            || virtual_size > MAX_VIRTUAL_SIZE
            || !virtual_size.is_multiple_of(u64::from(sector_size))
        {
            return None;
        }
        let chunk_ratio = SECTORS_PER_BITMAP_BLOCK * u64::from(sector_size) / u64::from(block_size);
        let payload_blocks = virtual_size.div_ceil(u64::from(block_size));
        let bitmap_blocks = payload_blocks.div_ceil(chunk_ratio);
        Some(Geometry {
            block_size,
            sector_size,
            virtual_size,
            chunk_ratio,
            payload_blocks,
            bitmap_blocks,
            has_parent,
        })
    }

    /// BAT entries the BAT region must hold (MS-VHDX 2.5).
    pub fn bat_entries(&self) -> u64 {
        if self.has_parent {
            self.bitmap_blocks * (self.chunk_ratio + 1)
        } else {
            self.payload_blocks + (self.payload_blocks - 1) / self.chunk_ratio
        }
    }

    /// BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT index of the sector bitmap block of chunk `chunk`.
    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// What a BAT index describes: `Ok(payload block)` or `Err(chunk)` for a
    /// sector bitmap entry.
    pub fn classify_index(&self, index: u64) -> Result<u64, u64> {
        let group = index / (self.chunk_ratio + 1);
        let within = index % (self.chunk_ratio + 1);
        if within == self.chunk_ratio {
            Err(group)
        } else {
            Ok(group * self.chunk_ratio + within)
        }
    }

    /// Logical sectors per payload block.
    pub fn sectors_per_block(&self) -> u64 {
        u64::from(self.block_size) / u64::from(self.sector_size)
    }

    /// Splits `[offset, offset+len)` at block boundaries into
    /// `(block, offset_in_block, len)` pieces.
    pub fn split(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        let bs = u64::from(self.block_size);
        let end = offset.saturating_add(len);
        let mut cur = offset;
        core::iter::from_fn(move || {
            if cur >= end {
                return None;
            }
            let block = cur / bs;
            let within = cur % bs;
            let n = (bs - within).min(end - cur);
            cur += n;
            Some((block, within, n))
        })
    }

    /// For payload block `block` and a byte offset in it: the bit index of
    /// its first sector within its chunk's sector bitmap.
    pub fn bitmap_bit(&self, block: u64, offset_in_block: u64) -> u64 {
        (block % self.chunk_ratio) * self.sectors_per_block()
            + offset_in_block / u64::from(self.sector_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ratio_and_entries() {
        let g = Geometry::new(32 << 20, 512, 10 << 30, false).unwrap();
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.payload_blocks, 320);
        assert_eq!(g.bat_entries(), 320 + 319 / 128);
        let d = Geometry::new(32 << 20, 512, 10 << 30, true).unwrap();
        assert_eq!(d.bat_entries(), 3 * 129);
        let g4 = Geometry::new(1 << 20, 4096, 1 << 30, false).unwrap();
        assert_eq!(g4.chunk_ratio, 32768);
        assert_eq!(g.payload_index(128), 129);
        assert_eq!(g.bitmap_index(0), 128);
        assert_eq!(g.classify_index(128), Err(0));
        assert_eq!(g.classify_index(129), Ok(128));
        assert!(Geometry::new(3 << 20, 512, 1 << 30, false).is_none());
        assert!(Geometry::new(1 << 20, 1024, 1 << 30, false).is_none());
        assert!(Geometry::new(1 << 20, 512, 513, false).is_none());
    }

    #[test]
    fn split_pieces() {
        let g = Geometry::new(1 << 20, 512, 8 << 20, false).unwrap();
        let v: alloc::vec::Vec<_> = g.split((1 << 20) - 512, 2048).collect();
        assert_eq!(v, [(0, (1 << 20) - 512, 512), (1, 0, 1536)]);
    }
}
