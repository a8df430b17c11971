//! Allocation: where a write's payload goes (in place, reused zero-state
//! space, or new space at the end of the file), and the BAT and sector
//! bitmap changes it stages for the next commit.
//!
//! Invariant: new payload is written (and, at commit, flushed) before the
//! BAT entry that makes it visible, so a crash never exposes stale bytes.

use super::*;

/// A set of BAT indices as a bitmap: one bit per entry, allocated only when
/// the first index is inserted.
#[derive(Debug, Default)]
pub(super) struct IndexSet {
    words: Vec<u64>,
}

impl IndexSet {
    /// Inserts `i` of a BAT with `entries` entries.
    pub(super) fn insert(&mut self, i: u64, entries: u64) {
        if self.words.is_empty() {
            self.words = vec![0; entries.div_ceil(64) as usize];
        }
        if let Some(w) = self.words.get_mut((i / 64) as usize) {
            *w |= 1 << (i % 64);
        }
    }
    pub(super) fn contains(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    fn remove(&mut self, i: u64) {
        if let Some(w) = self.words.get_mut((i / 64) as usize) {
            *w &= !(1 << (i % 64));
        }
    }
}

impl<B: BlockIo> Vhdx<B> {
    fn set_bat_entry(&mut self, i: u64, e: BatEntry, dirty: &mut BTreeSet<usize>) {
        let off = i as usize * 8;
        wr64(&mut self.bat, off, e.0);
        dirty.insert(off / LOG_SECTOR);
    }

    /// Reserves `len` bytes of new file space (1 MiB aligned) and extends the
    /// file with zeros to cover it.
    fn allocate(&mut self, len: u64) -> Result<u64, DiskError> {
        let off = self.alloc_end;
        let end = off
            .checked_add(len)
            .ok_or_else(|| DiskError::Request("file would grow past 2^64 bytes".into()))?;
        if self.io.len()? < end {
            self.io.set_len(end)?;
        }
        self.alloc_end = end;
        self.file_len = self.file_len.max(end);
        Ok(off)
    }

    fn write_zeros(&mut self, off: u64, len: u64) -> Result<(), DiskError> {
        self.apply_write(&LogWrite::Zero {
            file_offset: off,
            len,
        })
    }

    /// Sets `count` sector bitmap bits from `bit` in the bitmap at `sb_off`,
    /// staging modified 4 KiB pages in `pages`.
    fn set_bits(
        &self,
        sb_off: u64,
        bit: u64,
        count: u64,
        pages: &mut BTreeMap<u64, Vec<u8>>,
    ) -> Result<(), DiskError> {
        let page_bits = (LOG_SECTOR * 8) as u64;
        let mut b = bit;
        let end = bit + count;
        while b < end {
            let page_off = sb_off + (b / page_bits) * LOG_SECTOR as u64;
            let first = b % page_bits;
            let n = (page_bits - first).min(end - b);
            let staged = pages.contains_key(&page_off);
            let mut page = match pages.remove(&page_off) {
                Some(p) => p,
                None => {
                    let mut p = vec![0u8; LOG_SECTOR];
                    self.read_file(page_off, &mut p)?;
                    p
                }
            };
            let mut changed = false;
            for k in first..first + n {
                if let Some(byte) = page.get_mut((k / 8) as usize) {
                    changed |= *byte & (1 << (k % 8)) == 0;
                    *byte |= 1 << (k % 8);
                }
            }
            // Rewriting sectors already present costs no log entry.
            if changed || staged {
                pages.insert(page_off, page);
            }
            b += n;
        }
        Ok(())
    }

    /// Reads `count` sector bitmap bits from `bit`.
    pub(super) fn get_bits(
        &self,
        sb_off: u64,
        bit: u64,
        count: u64,
    ) -> Result<Vec<bool>, DiskError> {
        let first_byte = bit / 8;
        let last_byte = (bit + count).div_ceil(8);
        let mut bytes = vec![0u8; (last_byte - first_byte) as usize];
        let start = sb_off + first_byte;
        self.read_file(start, &mut bytes)?;
        // Staged (uncommitted) bitmap pages win over the file.
        let end = start + bytes.len() as u64;
        let first_page = start - start % LOG_SECTOR as u64;
        for (&p, page) in self.pending_sb.range(first_page..end) {
            let lo = start.max(p);
            let hi = end.min(p + LOG_SECTOR as u64);
            if lo < hi {
                bytes[(lo - start) as usize..(hi - start) as usize]
                    .copy_from_slice(&page[(lo - p) as usize..(hi - p) as usize]);
            }
        }
        Ok((bit..bit + count)
            .map(|k| {
                let i = (k / 8 - first_byte) as usize;
                bytes.get(i).is_some_and(|b| b & (1 << (k % 8)) != 0)
            })
            .collect())
    }

    pub(super) fn write_inner(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.begin_modification(true)?;
        let mut dirty = core::mem::take(&mut self.pending_bat);
        let mut sb_pages = core::mem::take(&mut self.pending_sb);
        let r = self.place_writes(offset, data, &mut dirty, &mut sb_pages);
        self.pending_bat = dirty;
        self.pending_sb = sb_pages;
        r?;
        // Metadata is committed on flush (or close); a long run of
        // allocations without one is committed in batches.
        if self.pending_bat.len() + self.pending_sb.len() > MAX_PENDING_PAGES {
            self.commit_pending()?;
        }
        Ok(())
    }

    /// Writes the payload of one request and stages the metadata it changes.
    fn place_writes(
        &mut self,
        offset: u64,
        data: &[u8],
        dirty: &mut BTreeSet<usize>,
        sb_pages: &mut BTreeMap<u64, Vec<u8>>,
    ) -> Result<(), DiskError> {
        let g = self.geo;
        let bs = u64::from(g.block_size);
        let mut pos = 0usize;
        for (block, within, n) in g.split(offset, data.len() as u64) {
            let src = &data[pos..pos + n as usize];
            pos += n as usize;
            let idx = g.payload_index(block);
            let plan = g.plan_write(
                block,
                within,
                n,
                self.bat_entry(idx),
                self.bat_entry(g.bitmap_index(block / g.chunk_ratio)),
                self.reusable.contains(idx),
            );
            let mark = match plan {
                WritePlan::InPlace { file_offset, mark } => {
                    self.io.write_at(file_offset, src)?;
                    mark
                }
                WritePlan::Place {
                    reuse,
                    offset_in_block,
                    new_state,
                    mark,
                } => {
                    let fresh = reuse.is_none();
                    let end_before = self.alloc_end;
                    let placed = match reuse {
                        Some(off) => {
                            // The rest of the block must read as zeros.
                            let tail = offset_in_block + n;
                            self.write_zeros(off, offset_in_block)
                                .and_then(|()| self.write_zeros(off + tail, bs - tail))
                                .map(|()| off)
                        }
                        None => self.allocate(bs),
                    }
                    .and_then(|off| {
                        self.io.write_at(off + offset_in_block, src)?;
                        Ok(off)
                    });
                    let off = match placed {
                        Ok(off) => off,
                        Err(e) => {
                            // Nothing refers to the space yet: give it back,
                            // so a retry (the store was full) places the
                            // block in the same space.
                            self.alloc_end = end_before;
                            return Err(e);
                        }
                    };
                    if !fresh {
                        self.reusable.remove(idx);
                    }
                    self.set_bat_entry(idx, BatEntry::new(new_state, off), dirty);
                    mark
                }
            };
            if let Some(m) = mark {
                let sb_off = match m.bitmap_file_offset {
                    Some(o) => o,
                    None => {
                        let o = self.allocate(MIB)?;
                        // Zeros written now, not left a hole: the bitmap's
                        // later log apply then never needs new space on
                        // the store (a full store fails here, retryably,
                        // not half-way through a commit).
                        if let Err(e) = self.write_zeros(o, MIB) {
                            self.alloc_end = o;
                            return Err(e);
                        }
                        self.set_bat_entry(m.bitmap_index, BatEntry::new(SB_PRESENT, o), dirty);
                        o
                    }
                };
                self.set_bits(sb_off, m.first_bit, m.sectors, sb_pages)?;
            }
        }
        Ok(())
    }
}
