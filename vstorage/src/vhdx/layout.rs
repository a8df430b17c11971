//! Geometry of a VHDX: how virtual offsets map to payload blocks, chunks and
//! BAT entries (MS-VHDX 2.4, 2.5), and how a request resolves into pieces.
//!
//! Invariant: a [`Geometry`] is only built from validated parameters (block
//! size a power of two in 1..=256 MiB, sector 512/4096, size <= 64 TiB), so
//! the arithmetic below cannot overflow.

use super::format::{
    BatEntry, BitmapState, PayloadState, MAX_BLOCK_SIZE, MAX_VIRTUAL_SIZE, MIN_BLOCK_SIZE,
    PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT, SECTORS_PER_BITMAP_BLOCK,
};

/// Where one block-contained piece of a read comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadSource {
    /// This file, at the offset.
    File(u64),
    /// Zeros (unallocated in a non-differencing disk, or a zero-state block).
    Zero,
    /// The parent disk at the same virtual offset.
    Parent,
    /// Sector by sector: from this file at `file_offset` where the bit
    /// (`first_bit` onward in the bitmap at `bitmap_file_offset`) is set,
    /// from the parent where it is clear.
    Bitmap {
        /// File offset of the piece's first byte.
        file_offset: u64,
        /// File offset of the chunk's sector bitmap block.
        bitmap_file_offset: u64,
        /// Bit of the piece's first sector in that bitmap.
        first_bit: u64,
    },
}

/// One block-contained piece of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPiece {
    /// Offset of the piece within the request buffer.
    pub buf_offset: u64,
    /// Virtual disk offset.
    pub virtual_offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Where the bytes are.
    pub source: ReadSource,
}

/// Sectors a write must mark present in a sector bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapMark {
    /// BAT index of the chunk's sector bitmap entry.
    pub bitmap_index: u64,
    /// The bitmap block's file offset; `None` when it must be allocated.
    pub bitmap_file_offset: Option<u64>,
    /// First bit to set.
    pub first_bit: u64,
    /// Number of bits (sectors) to set.
    pub sectors: u64,
}

/// What one block-contained piece of a write needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritePlan {
    /// The block is in the file: write at `file_offset`, optionally marking
    /// the sectors present.
    InPlace {
        /// File offset of the piece's first byte.
        file_offset: u64,
        /// Sector bitmap update (partially present blocks).
        mark: Option<BitmapMark>,
    },
    /// The block needs file space. `reuse` is existing space of a zero-state
    /// block (the caller zero-fills around the data); otherwise allocate at the
    /// end of the file. Data goes at `offset_in_block`; afterwards the BAT
    /// entry becomes `new_state` at that space.
    Place {
        /// Existing space to reuse.
        reuse: Option<u64>,
        /// Offset of the data within the block.
        offset_in_block: u64,
        /// State the payload entry takes.
        new_state: u8,
        /// Sector bitmap update (new partially present block).
        mark: Option<BitmapMark>,
    },
}

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

    /// Resolves a read of `[offset, offset+len)` into block pieces; `bat`
    /// returns the entry at a BAT index. The caller moves the bytes.
    pub fn resolve_read<'a>(
        &'a self,
        bat: impl Fn(u64) -> BatEntry + 'a,
        offset: u64,
        len: u64,
    ) -> impl Iterator<Item = ReadPiece> + 'a {
        let bs = u64::from(self.block_size);
        self.split(offset, len).map(move |(block, within, n)| {
            let virtual_offset = block * bs + within;
            let e = bat(self.payload_index(block));
            let source = match e.payload_state() {
                PayloadState::FullyPresent => ReadSource::File(e.file_offset() + within),
                PayloadState::PartiallyPresent => ReadSource::Bitmap {
                    file_offset: e.file_offset() + within,
                    bitmap_file_offset: bat(self.bitmap_index(block / self.chunk_ratio))
                        .file_offset(),
                    first_bit: self.bitmap_bit(block, within),
                },
                PayloadState::NotPresent if self.has_parent => ReadSource::Parent,
                _ => ReadSource::Zero,
            };
            ReadPiece {
                buf_offset: virtual_offset - offset,
                virtual_offset,
                len: n,
                source,
            }
        })
    }

    /// Plans the write of `n` bytes at `within` in payload block `block`,
    /// whose entry is `entry`, the chunk's bitmap entry `bitmap`, and whether a
    /// zero-state entry's file space may be reused.
    pub fn plan_write(
        &self,
        block: u64,
        within: u64,
        n: u64,
        entry: BatEntry,
        bitmap: BatEntry,
        reusable: bool,
    ) -> WritePlan {
        let mark = || BitmapMark {
            bitmap_index: self.bitmap_index(block / self.chunk_ratio),
            bitmap_file_offset: (bitmap.bitmap_state() == BitmapState::Present)
                .then(|| bitmap.file_offset()),
            first_bit: self.bitmap_bit(block, within),
            sectors: n / u64::from(self.sector_size),
        };
        match entry.payload_state() {
            PayloadState::FullyPresent => WritePlan::InPlace {
                file_offset: entry.file_offset() + within,
                mark: None,
            },
            PayloadState::PartiallyPresent => WritePlan::InPlace {
                file_offset: entry.file_offset() + within,
                mark: Some(mark()),
            },
            state => {
                let whole = within == 0 && n == u64::from(self.block_size);
                // A differencing block not present here keeps the parent's
                // data for the sectors not written: copy-on-write per sector.
                let partial = self.has_parent && state == PayloadState::NotPresent && !whole;
                WritePlan::Place {
                    reuse: (reusable && state != PayloadState::NotPresent)
                        .then(|| entry.file_offset()),
                    offset_in_block: within,
                    new_state: if partial {
                        PAYLOAD_PARTIALLY_PRESENT
                    } else {
                        PAYLOAD_FULLY_PRESENT
                    },
                    mark: partial.then(mark),
                }
            }
        }
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
    fn resolve_and_plan() {
        use crate::vhdx::format::*;
        let g = Geometry::new(1 << 20, 512, 8 << 20, true).unwrap();
        let bat = |i: u64| match i {
            0 => BatEntry::new(PAYLOAD_FULLY_PRESENT, 10 << 20),
            1 => BatEntry::new(PAYLOAD_PARTIALLY_PRESENT, 11 << 20),
            2 => BatEntry::new(PAYLOAD_ZERO, 0),
            i if i == g.bitmap_index(0) => BatEntry::new(SB_PRESENT, 12 << 20),
            _ => BatEntry(0),
        };
        let v: alloc::vec::Vec<_> = g
            .resolve_read(bat, (1 << 20) - 512, (3 << 20) + 1024)
            .collect();
        assert_eq!(v[0].source, ReadSource::File((11 << 20) - 512));
        assert_eq!(
            v[1].source,
            ReadSource::Bitmap {
                file_offset: 11 << 20,
                bitmap_file_offset: 12 << 20,
                first_bit: 2048
            }
        );
        assert_eq!(v[2].source, ReadSource::Zero);
        assert_eq!(v[3].source, ReadSource::Parent);
        assert_eq!(v[3].buf_offset, (2 << 20) + 512);
        // Writing part of a block not present in a differencing disk.
        let p = g.plan_write(3, 512, 512, BatEntry(0), bat(g.bitmap_index(0)), false);
        assert_eq!(
            p,
            WritePlan::Place {
                reuse: None,
                offset_in_block: 512,
                new_state: PAYLOAD_PARTIALLY_PRESENT,
                mark: Some(BitmapMark {
                    bitmap_index: g.bitmap_index(0),
                    bitmap_file_offset: Some(12 << 20),
                    first_bit: 3 * 2048 + 1,
                    sectors: 1
                })
            }
        );
        // A whole block needs no bitmap.
        let p = g.plan_write(3, 0, 1 << 20, BatEntry(0), BatEntry(0), false);
        assert!(matches!(
            p,
            WritePlan::Place {
                new_state: PAYLOAD_FULLY_PRESENT,
                mark: None,
                ..
            }
        ));
        // A zero-state block with reusable space.
        let z = BatEntry::new(PAYLOAD_ZERO, 20 << 20);
        let p = g.plan_write(2, 0, 512, z, BatEntry(0), true);
        assert!(
            matches!(p, WritePlan::Place { reuse: Some(o), new_state: PAYLOAD_FULLY_PRESENT, .. } if o == 20 << 20)
        );
    }

    #[test]
    fn split_pieces() {
        let g = Geometry::new(1 << 20, 512, 8 << 20, false).unwrap();
        let v: alloc::vec::Vec<_> = g.split((1 << 20) - 512, 2048).collect();
        assert_eq!(v, [(0, (1 << 20) - 512, 512), (1, 0, 1536)]);
    }
}
