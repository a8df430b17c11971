//! Differencing disks (MS-VHDX 2.6.2.6): the parent and its identity
//! check, reads that fall through to it, locator path updates, the data
//! ranges of a chain, and merging a child into its parent.

use super::*;

impl<B: BlockIo> Vhdx<B> {
    /// Attaches the parent of a differencing disk, checking its identity
    /// (DataWriteGuid against parent_linkage/parent_linkage2) and sector size.
    pub fn attach_parent(&mut self, parent: Vhdx<B>) -> Result<(), DiskError> {
        let Some(pl) = &self.params.parent_locator else {
            return Err(open_err("not a differencing disk"));
        };
        let have = parent.header.data_write_guid;
        let ok = ["parent_linkage", "parent_linkage2"]
            .iter()
            .filter_map(|k| pl.get(k))
            .filter_map(Guid::parse)
            .any(|g| g == have);
        if !ok {
            return Err(open_err(format!(
                "parent's DataWriteGuid {have} does not match the child's parent_linkage {}",
                pl.get("parent_linkage").unwrap_or("?")
            )));
        }
        if parent.logical_sector_size() != self.logical_sector_size() {
            return Err(open_err(format!(
                "parent logical sector size {} differs from the child's {}",
                parent.logical_sector_size(),
                self.logical_sector_size()
            )));
        }
        self.parent = Some(Box::new(parent));
        Ok(())
    }

    /// The attached parent, if any.
    pub fn parent(&self) -> Option<&Vhdx<B>> {
        self.parent.as_deref()
    }

    /// Detaches and returns the parent.
    pub fn take_parent(&mut self) -> Option<Vhdx<B>> {
        self.parent.take().map(|b| *b)
    }

    pub(super) fn read_parent(&mut self, voff: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let Some(p) = self.parent.as_deref_mut() else {
            return Err(open_err(
                "differencing disk has no parent attached (open it with its parent chain)",
            ));
        };
        let psize = p.virtual_size();
        let avail = psize.saturating_sub(voff).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        if !head.is_empty() {
            p.read(voff, head)?;
        }
        tail.fill(0);
        Ok(())
    }

    /// Rewrites the parent locator's `relative_path` and
    /// `absolute_win32_path` (MS-VHDX 2.6.2.6.3: stale paths are updated once
    /// a chain opens). The new item goes after the last metadata item and the
    /// table entry is repointed, both through the log. Other keys are kept.
    pub fn update_parent_paths(
        &mut self,
        relative: Option<String>,
        absolute: Option<String>,
    ) -> Result<(), DiskError> {
        let Some(old) = self.params.parent_locator.clone() else {
            return Err(DiskError::Request("not a differencing disk".into()));
        };
        let mut pl = old.clone();
        pl.entries
            .retain(|(k, _)| k != "relative_path" && k != "absolute_win32_path");
        if let Some(r) = relative {
            pl.entries.push(("relative_path".into(), r));
        }
        if let Some(a) = absolute {
            pl.entries.push(("absolute_win32_path".into(), a));
        }
        if pl == old {
            return Ok(());
        }
        pl.check_limits().map_err(DiskError::Request)?;
        let item = pl.to_bytes();
        let region_len = u64::from(self.regions.metadata.length);
        let used_end = self
            .meta_entries
            .iter()
            .map(|e| u64::from(e.offset) + u64::from(e.length))
            .max()
            .unwrap_or(0)
            .max(METADATA_TABLE_SIZE as u64);
        let at = used_end.div_ceil(8) * 8;
        if at + item.len() as u64 > region_len || item.len() as u64 > MIB {
            return Err(DiskError::Request(
                "no room in the metadata region for the new parent locator".into(),
            ));
        }
        let Some(pos) = self
            .meta_entries
            .iter()
            .position(|e| e.item_id == PARENT_LOCATOR && !e.is_user)
        else {
            return Err(corrupt("parent locator entry vanished"));
        };
        self.begin_modification(false)?;
        let mut entries = self.meta_entries.clone();
        if let Some(e) = entries.get_mut(pos) {
            e.offset = at as u32;
            e.length = item.len() as u32;
        }
        // Stage the touched 4 KiB pages of the metadata region.
        let base = self.regions.metadata.file_offset;
        let page = LOG_SECTOR as u64;
        let mut pages: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut stage = |this: &Self, off_in_region: u64, bytes: &[u8]| -> Result<(), DiskError> {
            let mut done = 0u64;
            while done < bytes.len() as u64 {
                let cur = off_in_region + done;
                let p = cur - cur % page;
                let b = match pages.entry(p) {
                    alloc::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    alloc::collections::btree_map::Entry::Vacant(v) => {
                        let mut b = vec![0u8; LOG_SECTOR];
                        this.read_file(base + p, &mut b)?;
                        v.insert(b)
                    }
                };
                let n = (page - (cur - p)).min(bytes.len() as u64 - done);
                let s = (cur - p) as usize;
                b[s..s + n as usize].copy_from_slice(&bytes[done as usize..(done + n) as usize]);
                done += n;
            }
            Ok(())
        };
        stage(self, at, &item)?;
        // The table itself: only its used part changes.
        let table = build_metadata_table(&entries);
        let table_used = 32 + 32 * entries.len();
        stage(self, 0, &table[..table_used])?;
        let writes = pages
            .into_iter()
            .map(|(p, data)| LogWrite::Data {
                file_offset: base + p,
                data,
            })
            .collect();
        self.commit(writes)?;
        self.meta_entries = entries;
        self.params.parent_locator = Some(pl);
        Ok(())
    }

    /// Ranges of the virtual disk that may hold data in this file or, for a
    /// differencing disk, its parent chain. Merged and sorted.
    pub fn data_ranges(&mut self) -> Result<Vec<(u64, u64)>, DiskError> {
        let g = self.geo;
        let bs = u64::from(g.block_size);
        let mut v: Vec<(u64, u64)> = Vec::new();
        for block in 0..g.payload_blocks {
            let e = self.bat_entry(g.payload_index(block));
            if matches!(
                e.payload_state(),
                PayloadState::FullyPresent | PayloadState::PartiallyPresent
            ) {
                let start = block * bs;
                v.push((start, bs.min(g.virtual_size - start)));
            }
        }
        if let Some(p) = self.parent.as_deref_mut() {
            let limit = g.virtual_size;
            for (o, l) in p.data_ranges()? {
                if o < limit {
                    v.push((o, l.min(limit - o)));
                }
            }
        }
        v.sort();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (o, l) in v {
            if let Some(last) = out.last_mut() {
                if o <= last.0 + last.1 {
                    let end = (o + l).max(last.0 + last.1);
                    last.1 = end - last.0;
                    continue;
                }
            }
            out.push((o, l));
        }
        Ok(out)
    }

    /// Runs `(offset in block, length, from this file?)` of payload block
    /// `block` (`len` bytes of it in use) that this file defines: the
    /// whole block when fully present, the sectors its bitmap marks when
    /// partially present, zeros (`false`) for a block the file says is
    /// zero or unmapped, nothing when not present.
    fn block_runs(&mut self, block: u64, len: u64) -> Result<Vec<(u64, u64, bool)>, DiskError> {
        let g = self.geo;
        let ss = u64::from(g.sector_size);
        let e = self.bat_entry(g.payload_index(block));
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        match e.payload_state() {
            PayloadState::FullyPresent => runs.push((0, len, true)),
            PayloadState::PartiallyPresent => {
                let sb = self.bat_entry(g.bitmap_index(block / g.chunk_ratio));
                let bits = self.get_bits(sb.file_offset(), g.bitmap_bit(block, 0), len / ss)?;
                let mut i = 0usize;
                while i < bits.len() {
                    let mut j = i;
                    while j < bits.len() && bits[j] == bits[i] {
                        j += 1;
                    }
                    if bits[i] {
                        runs.push((i as u64 * ss, (j - i) as u64 * ss, true));
                    }
                    i = j;
                }
            }
            PayloadState::NotPresent => {}
            _ => runs.push((0, len, false)),
        }
        Ok(runs)
    }

    /// The ranges of the virtual disk this differencing disk defines
    /// itself, to the sector (partially present blocks by their sector
    /// bitmap; not its parent's): exactly what a merge writes. Sorted,
    /// merged.
    pub fn present_ranges(&mut self) -> Result<Vec<(u64, u64)>, DiskError> {
        self.check_usable()?;
        let g = self.geo;
        let bs = u64::from(g.block_size);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for block in 0..g.payload_blocks {
            let start = block * bs;
            let len = bs.min(g.virtual_size - start);
            for (o, l, _) in self.block_runs(block, len)? {
                let at = start + o;
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == at => last.1 += l,
                    _ => out.push((at, l)),
                }
            }
        }
        Ok(out)
    }

    /// Folds this differencing disk into its attached parent: every sector
    /// present in the child is written to the parent, then the parent is
    /// flushed. The parent must have been opened writable. The child is left
    /// unchanged (its parent linkage no longer matches afterwards).
    pub fn merge_into_parent(&mut self) -> Result<(), DiskError> {
        self.check_usable()?;
        let g = self.geo;
        let bs = u64::from(g.block_size);
        let Some(mut parent) = self.parent.take() else {
            return Err(open_err("merge needs the parent attached"));
        };
        let r = (|| -> Result<(), DiskError> {
            let psize = parent.virtual_size();
            let mut buf = vec![0u8; COPY_CHUNK];
            for block in 0..g.payload_blocks {
                let e = self.bat_entry(g.payload_index(block));
                let start = block * bs;
                let len = bs
                    .min(g.virtual_size - start)
                    .min(psize.saturating_sub(start));
                if len == 0 {
                    continue;
                }
                // Runs (offset in block, length, from child file?) to copy.
                for (o, l, from_file) in self.block_runs(block, len)? {
                    let mut done = 0u64;
                    while done < l {
                        let n = (l - done).min(COPY_CHUNK as u64) as usize;
                        let chunk = &mut buf[..n];
                        if from_file {
                            self.read_file(e.file_offset() + o + done, chunk)?;
                        } else {
                            chunk.fill(0);
                        }
                        parent.write(start + o + done, chunk)?;
                        done += n as u64;
                    }
                }
            }
            parent.flush()
        })();
        self.parent = Some(parent);
        r
    }
}
