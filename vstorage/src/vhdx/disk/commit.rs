//! The write-ahead log (MS-VHDX 2.3): replay at open, header updates, and
//! committing metadata changes (BAT and sector bitmap pages) through log
//! entries.
//!
//! Invariant: each entry is its own complete sequence (tail = itself),
//! written and flushed before it is applied, and applied and flushed before
//! the next one is written, so replaying the newest valid entry is always
//! correct and idempotent.

use super::*;

impl<B: BlockIo> Vhdx<B> {
    pub(super) fn replay(&mut self, seq: Vec<log::ParsedEntry>) -> Result<(), DiskError> {
        let last = seq.last().map(|e| e.last_file_offset).unwrap_or(0);
        self.log_replayed = true;
        if self.writable {
            // FileWriteGuid changes before the log playback modifies the file.
            self.update_header(|h, g| h.file_write_guid = g.next_guid())?;
            self.session_file = true;
            for e in &seq {
                for w in &e.writes {
                    self.apply_write(w)?;
                }
            }
            if self.io.len()? < last {
                self.io.set_len(last)?;
            }
            self.io.flush()?;
            self.update_header(|h, _| h.log_guid = Guid::ZERO)?;
            self.file_len = self.io.len()?;
        } else {
            for e in &seq {
                for w in &e.writes {
                    match w {
                        LogWrite::Data { file_offset, data } => {
                            self.overlay.insert(*file_offset, data.clone());
                        }
                        LogWrite::Zero { file_offset, len } => {
                            let pages = len / LOG_SECTOR as u64;
                            if pages > MAX_OVERLAY_PAGES as u64 {
                                return Err(open_err(
                                    "log zeroes too much to replay in memory; open read-write to replay it",
                                ));
                            }
                            for p in 0..pages {
                                self.overlay.insert(
                                    file_offset + p * LOG_SECTOR as u64,
                                    vec![0u8; LOG_SECTOR],
                                );
                            }
                        }
                    }
                    if self.overlay.len() > MAX_OVERLAY_PAGES {
                        return Err(open_err(
                            "log too large to replay in memory; open read-write to replay it",
                        ));
                    }
                }
            }
            self.file_len = self.file_len.max(last);
        }
        Ok(())
    }

    pub(super) fn apply_write(&mut self, w: &LogWrite) -> Result<(), DiskError> {
        match w {
            LogWrite::Data { file_offset, data } => self.io.write_at(*file_offset, data)?,
            LogWrite::Zero { file_offset, len } => {
                let zeros = vec![0u8; COPY_CHUNK];
                let mut done = 0u64;
                while done < *len {
                    let n = (*len - done).min(COPY_CHUNK as u64) as usize;
                    self.io.write_at(file_offset + done, &zeros[..n])?;
                    done += n as u64;
                }
            }
        }
        Ok(())
    }

    /// Writes a header update: the non-current slot gets sequence + 1 and
    /// becomes current after a flush. Done twice so both copies agree.
    fn update_header(
        &mut self,
        f: impl FnOnce(&mut Header, &mut GuidGen),
    ) -> Result<(), DiskError> {
        let mut h = self.header.clone();
        f(&mut h, &mut self.guids);
        for _ in 0..2 {
            h.sequence_number = self
                .header
                .sequence_number
                .checked_add(1)
                .ok_or_else(|| corrupt("header sequence number overflow"))?;
            let slot = 1 - self.current_slot;
            let off = if slot == 0 {
                HEADER1_OFFSET
            } else {
                HEADER2_OFFSET
            };
            self.io.write_at(off, &h.to_bytes())?;
            self.io.flush()?;
            self.header = h.clone();
            self.current_slot = slot;
        }
        Ok(())
    }

    /// Header work before the first modification of a session.
    pub(super) fn begin_modification(&mut self, user_visible: bool) -> Result<(), DiskError> {
        self.check_usable()?;
        if !self.writable {
            return Err(DiskError::Request("disk is opened read-only".into()));
        }
        let new_file = !self.session_file;
        let new_data = user_visible && !self.session_data;
        if new_file || new_data {
            self.update_header(|h, g| {
                if new_file {
                    h.file_write_guid = g.next_guid();
                }
                if new_data {
                    h.data_write_guid = g.next_guid();
                }
                h.log_version = 0;
            })?;
            self.session_file = true;
            self.session_data |= user_visible;
        }
        Ok(())
    }

    /// Test hook: the next metadata commit (a flush, or close) writes and
    /// flushes its log entry, then stops as if the machine crashed before
    /// applying it.
    #[doc(hidden)]
    pub fn debug_stop_before_apply(&mut self) {
        self.stop_before_apply = true;
    }

    /// Commits metadata writes through the log.
    ///
    /// The log is in use only for the length of one commit: a fresh
    /// LogGuid is written to the header before the first entry (so entries
    /// left by earlier commits or sessions can never join this sequence),
    /// and once every entry is applied and flushed the LogGuid is cleared
    /// again (MS-VHDX 2.3.1: a zero LogGuid means nothing to replay).
    /// Between commits the file is therefore clean: a host tool such as
    /// `qemu-img check` opens it read-only while the disk is in use,
    /// instead of finding a log it would have to replay. Cost: two header
    /// updates per commit; data written into allocated blocks commits
    /// nothing.
    pub(super) fn commit(&mut self, writes: Vec<LogWrite>) -> Result<(), DiskError> {
        if writes.is_empty() {
            return Ok(());
        }
        let r = self.update_header(|h, g| {
            h.log_guid = g.next_guid();
            h.log_version = 0;
        });
        if let Err(e) = &r {
            self.poisoned = Some(e.to_string());
        }
        r?;
        self.log_head = 0;
        self.log_seq = 1;
        self.session_log = true;
        self.commit_entries(writes)?;
        let r = self.update_header(|h, _| h.log_guid = Guid::ZERO);
        if let Err(e) = &r {
            self.poisoned = Some(e.to_string());
        }
        r?;
        self.session_log = false;
        Ok(())
    }

    fn commit_entries(&mut self, writes: Vec<LogWrite>) -> Result<(), DiskError> {
        let max_entry = (self.log_length / 2) as usize;
        let mut groups: Vec<Vec<LogWrite>> = vec![Vec::new()];
        for w in writes {
            let g = groups.last_mut().ok_or_else(|| corrupt("internal"))?;
            g.push(w);
            if log::entry_len(g) > max_entry && g.len() > 1 {
                let w = g.pop().ok_or_else(|| corrupt("internal"))?;
                groups.push(vec![w]);
            }
        }
        for g in groups.into_iter().filter(|g| !g.is_empty()) {
            match self.commit_entry(&g) {
                Ok(()) => {}
                // The entry never became durable and nothing of it was
                // applied: the disk is as before this entry (earlier ones
                // are applied, and idempotent to commit again).
                Err(Entry::NotWritten(e)) if e.is_no_space() => return Err(e),
                Err(Entry::NotWritten(e) | Entry::Failed(e)) => {
                    self.poisoned = Some(e.to_string());
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn commit_entry(&mut self, writes: &[LogWrite]) -> Result<(), Entry> {
        let not_written = |e: DiskError| Entry::NotWritten(e);
        let failed = |e: DiskError| Entry::Failed(e);
        let (len, entry) = self.build_log_entry(writes).map_err(failed)?;
        self.io
            .write_at(self.log_offset + u64::from(self.log_head), &entry)
            .map_err(|e| not_written(e.into()))?;
        self.io.flush().map_err(|e| failed(e.into()))?;
        self.log_head += len;
        self.log_seq += 1;
        if self.stop_before_apply {
            self.crashed = true;
            return Err(Entry::Failed(DiskError::Io(crate::io::IoError::Host {
                op: "commit",
                detail: "simulated crash before applying the log".into(),
            })));
        }
        for w in writes {
            self.apply_write(w).map_err(failed)?;
        }
        self.io.flush().map_err(|e| failed(e.into()))?;
        Ok(())
    }

    /// The next log entry holding `writes` (its length, its bytes); moves
    /// the head to the log's start when it does not fit before the end.
    fn build_log_entry(&mut self, writes: &[LogWrite]) -> Result<(u32, Vec<u8>), DiskError> {
        let len = log::entry_len(writes) as u32;
        if len > self.log_length {
            return Err(corrupt("log too small for one entry"));
        }
        if self.log_head + len > self.log_length {
            self.log_head = 0;
        }
        let real_len = self.io.len()?;
        let p = EntryParams {
            sequence_number: self.log_seq,
            tail: self.log_head,
            log_guid: self.header.log_guid,
            flushed_file_offset: real_len & !(MIB - 1),
            last_file_offset: round_up_mib(self.alloc_end.max(real_len))
                .ok_or_else(|| corrupt("file too large"))?,
        };
        Ok((len, log::build_entry(&p, writes)))
    }

    fn bat_page_writes(&self, dirty: &BTreeSet<usize>) -> Vec<LogWrite> {
        dirty
            .iter()
            .filter_map(|&p| {
                let data = self.bat.get(p * LOG_SECTOR..(p + 1) * LOG_SECTOR)?.to_vec();
                Some(LogWrite::Data {
                    file_offset: self.regions.bat.file_offset + (p * LOG_SECTOR) as u64,
                    data,
                })
            })
            .collect()
    }

    /// Commits pending BAT and sector bitmap pages: data first (so no entry
    /// points at unwritten space), then one log transaction.
    ///
    /// A full store while the log entry is written leaves everything
    /// staged (the disk stays usable: the commit is tried again by the next
    /// flush); any other failure poisons the disk.
    pub(super) fn commit_pending(&mut self) -> Result<(), DiskError> {
        if self.pending_bat.is_empty() && self.pending_sb.is_empty() {
            return Ok(());
        }
        // A failed fsync may have dropped the data it was to make durable:
        // never retried.
        if let Err(e) = self.io.flush() {
            self.poisoned.get_or_insert_with(|| e.to_string());
            return Err(e.into());
        }
        let mut meta: Vec<LogWrite> = self
            .pending_sb
            .iter()
            .map(|(&file_offset, data)| LogWrite::Data {
                file_offset,
                data: data.clone(),
            })
            .collect();
        meta.extend(self.bat_page_writes(&self.pending_bat));
        self.commit(meta)?;
        self.pending_sb.clear();
        self.pending_bat.clear();
        Ok(())
    }

    /// Marks the file cleanly closed: flushes and clears LogGuid so other
    /// implementations need no replay. Idempotent; the disk stays usable (a
    /// later write starts a new log). Also closes the parent.
    pub fn close(&mut self) -> Result<(), DiskError> {
        if self.crashed {
            return Ok(());
        }
        if let Some(p) = self.parent.as_deref_mut() {
            p.close()?;
        }
        if self.writable && self.poisoned.is_none() {
            self.commit_pending()?;
        }
        if self.writable && self.poisoned.is_none() && !self.header.log_guid.is_zero() {
            self.io.flush()?;
            self.update_header(|h, _| h.log_guid = Guid::ZERO)?;
            self.session_log = false;
        }
        Ok(())
    }
}

/// How a log entry's commit failed.
enum Entry {
    /// Before the entry was durable: nothing of it is applied.
    NotWritten(DiskError),
    /// After it was (or while it was made) durable.
    Failed(DiskError),
}
