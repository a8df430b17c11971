//! Opening a file: the header section, the active log (MS-VHDX 2.3.3),
//! region tables, metadata and the BAT, each checked against the file
//! before use, and [`Vhdx::verify`]'s deeper checks.
//!
//! Invariant: after [`Vhdx::open`] returns, every allocated BAT entry points
//! inside the file, no two structures overlap, and the zero-state entries
//! whose space may be reused are known. Opening costs O(n log n) time and
//! memory proportional to the BAT, whatever the file says.

use super::*;

/// What a file extent holds, for overlap messages (named only when one is
/// reported, so validating a BAT allocates nothing per entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extent {
    Header,
    Log,
    BatRegion,
    MetadataRegion,
    /// An allocated BAT entry, by index.
    Entry(u32),
}

/// Result of reading the header section.
struct Headers {
    header: Header,
    slot: u8,
}

fn read_headers<B: BlockIo>(io: &B) -> Result<Headers, DiskError> {
    let len = io.len()?;
    if len < REGION2_OFFSET + KIB64 {
        let mut sig = [0u8; 8];
        if len >= 8 {
            io.read_at(0, &mut sig)?;
        }
        if &sig != FILE_SIGNATURE {
            return Err(open_err("not a VHDX file (no \"vhdxfile\" signature)"));
        }
        return Err(corrupt(format!(
            "file is {len} bytes, too short for the VHDX header section"
        )));
    }
    let id = read_struct(io, FILE_ID_OFFSET, 8, "file identifier")?;
    if id.as_slice() != FILE_SIGNATURE {
        return Err(open_err("not a VHDX file (no \"vhdxfile\" signature)"));
    }
    let h1 = Header::parse(&read_struct(io, HEADER1_OFFSET, HEADER_SIZE, "header 1")?);
    let h2 = Header::parse(&read_struct(io, HEADER2_OFFSET, HEADER_SIZE, "header 2")?);
    let (header, slot) = match (h1, h2) {
        (Ok(a), Ok(b)) => {
            if b.sequence_number > a.sequence_number {
                (b, 1)
            } else {
                (a, 0)
            }
        }
        (Ok(a), Err(_)) => (a, 0),
        (Err(_), Ok(b)) => (b, 1),
        (Err(e1), Err(e2)) => {
            return Err(corrupt(format!(
                "no valid header (header 1: {e1}; header 2: {e2})"
            )))
        }
    };
    if header.version != 1 {
        return Err(open_err(format!(
            "unsupported VHDX version {} (only 1 is known)",
            header.version
        )));
    }
    Ok(Headers { header, slot })
}

/// Checks the header's log location against the file.
fn check_log_location(h: &Header, file_len: u64) -> Result<(), DiskError> {
    let end = h.log_offset.checked_add(u64::from(h.log_length));
    if h.log_offset < MIB
        || !h.log_offset.is_multiple_of(MIB)
        || h.log_length == 0
        || !u64::from(h.log_length).is_multiple_of(MIB)
        || u64::from(h.log_length) > MAX_LOG_BYTES
    {
        return Err(corrupt(format!(
            "log at offset {} length {} is not a 1 MiB-aligned region of at most 256 MiB",
            h.log_offset, h.log_length
        )));
    }
    match end {
        Some(e) if e <= file_len => Ok(()),
        _ => Err(corrupt(format!(
            "log at offset {} length {} runs past the end of the file",
            h.log_offset, h.log_length
        ))),
    }
}

/// The active log sequence of a file, if its header names a log.
fn pending_log<B: BlockIo>(io: &B, h: &Header) -> Result<Option<Vec<log::ParsedEntry>>, DiskError> {
    if h.log_guid.is_zero() {
        return Ok(None);
    }
    if h.log_version != 0 {
        return Err(open_err(format!(
            "unsupported log version {} with a log to replay",
            h.log_version
        )));
    }
    let file_len = io.len()?;
    check_log_location(h, file_len)?;
    let log_bytes = read_struct(io, h.log_offset, h.log_length as usize, "log")?;
    // A LogGuid with no valid entry means the writer crashed between setting
    // the GUID and flushing its first entry: nothing was applied, so there is
    // nothing to replay (QEMU treats it the same way).
    let Some(seq) = log::find_active_sequence(&log_bytes, &h.log_guid).map_err(corrupt)? else {
        return Ok(None);
    };
    let head = seq.last().ok_or_else(|| corrupt("empty log sequence"))?;
    if file_len < head.flushed_file_offset {
        return Err(corrupt(format!(
            "file is {file_len} bytes but the log says at least {} were flushed: the file was truncated",
            head.flushed_file_offset
        )));
    }
    // A replay may extend the file (MS-VHDX 2.3.3), but a log is written by
    // one allocation at a time: refuse one that would grow the file by more
    // than MAX_REPLAY_GROWTH rather than write that many zeros.
    for e in &seq {
        let last = e.last_file_offset;
        if last > file_len.saturating_add(MAX_REPLAY_GROWTH) {
            return Err(corrupt(format!(
                "log entry {} would grow the file from {file_len} to {last} bytes",
                e.sequence_number
            )));
        }
        for w in &e.writes {
            let (off, len) = match w {
                LogWrite::Data { file_offset, .. } => (*file_offset, LOG_SECTOR as u64),
                LogWrite::Zero { file_offset, len } => (*file_offset, *len),
            };
            let end = off.checked_add(len);
            if off < HEADER2_OFFSET + KIB64 || end.is_none_or(|x| x > last.max(file_len)) {
                return Err(corrupt(format!(
                    "log entry {} writes {len} bytes at offset {off}, outside the file structures",
                    e.sequence_number
                )));
            }
        }
    }
    Ok(Some(seq))
}

/// Fetches the active log for diagnostics: `true` when a replay is pending.
pub fn log_replay_needed<B: BlockIo>(io: &B) -> Result<bool, DiskError> {
    let h = read_headers(io)?;
    Ok(pending_log(io, &h.header)?.is_some())
}

impl<B: BlockIo> Vhdx<B> {
    /// Opens a VHDX. A pending log is replayed: on disk when writable, in
    /// memory otherwise. A differencing disk needs [`Vhdx::attach_parent`]
    /// before reads that fall through to the parent.
    pub fn open(io: B, opts: OpenOptions) -> Result<Self, DiskError> {
        let hs = read_headers(&io)?;
        let mut v = Vhdx {
            io,
            writable: opts.writable,
            header: hs.header,
            current_slot: hs.slot,
            params: DiskParams {
                file: FileParameters {
                    block_size: MIN_BLOCK_SIZE,
                    leave_blocks_allocated: false,
                    has_parent: false,
                },
                virtual_size: 0,
                disk_id: Guid::ZERO,
                logical_sector_size: 512,
                physical_sector_size: 512,
                parent_locator: None,
            },
            geo: Geometry::new(MIN_BLOCK_SIZE, 512, 512, false)
                .ok_or_else(|| corrupt("internal geometry"))?,
            regions: Regions {
                bat: RegionEntry {
                    guid: BAT_REGION,
                    file_offset: 0,
                    length: 0,
                    required: true,
                },
                metadata: RegionEntry {
                    guid: METADATA_REGION,
                    file_offset: 0,
                    length: 0,
                    required: true,
                },
            },
            bat: Vec::new(),
            meta_entries: Vec::new(),
            pending_bat: BTreeSet::new(),
            pending_sb: BTreeMap::new(),
            reusable: IndexSet::default(),
            log_offset: 0,
            log_length: 0,
            log_head: 0,
            log_seq: 1,
            overlay: BTreeMap::new(),
            file_len: 0,
            alloc_end: 0,
            guids: GuidGen::new(opts.guid_seed),
            session_file: false,
            session_data: false,
            session_log: false,
            log_replayed: false,
            parent: None,
            poisoned: None,
            // Until open succeeds, drop must leave the file alone: a
            // half-done replay has to stay replayable.
            crashed: true,
            stop_before_apply: false,
        };
        v.file_len = v.io.len()?;
        if let Some(seq) = pending_log(&v.io, &v.header)? {
            v.replay(seq)?;
        }
        check_log_location(&v.header, v.file_len)?;
        v.log_offset = v.header.log_offset;
        v.log_length = v.header.log_length;
        v.load_structures()?;
        v.crashed = false;
        Ok(v)
    }

    fn load_structures(&mut self) -> Result<(), DiskError> {
        // Region tables: the first valid copy wins.
        let mut errors = Vec::new();
        let mut regions = None;
        for (i, off) in [REGION1_OFFSET, REGION2_OFFSET].into_iter().enumerate() {
            let mut b = vec![0u8; REGION_TABLE_SIZE];
            self.read_file(off, &mut b)?;
            match parse_region_table(&b) {
                Ok(r) => {
                    regions = Some(r);
                    break;
                }
                Err(RegionError::Unsupported(m)) => return Err(open_err(m)),
                Err(RegionError::Corrupt(m)) => errors.push(format!("region table {}: {m}", i + 1)),
            }
        }
        let regions = regions.ok_or_else(|| corrupt(errors.join("; ")))?;
        self.regions = regions;
        for r in [regions.bat, regions.metadata] {
            let end = r.file_offset.checked_add(u64::from(r.length));
            if end.is_none_or(|e| e > self.file_len) {
                return Err(corrupt(format!(
                    "{} region at offset {} length {} runs past the end of the file",
                    if r.guid == BAT_REGION {
                        "BAT"
                    } else {
                        "metadata"
                    },
                    r.file_offset,
                    r.length
                )));
            }
        }
        // Metadata.
        let meta_off = regions.metadata.file_offset;
        let mut table = vec![0u8; METADATA_TABLE_SIZE];
        if (regions.metadata.length as usize) < METADATA_TABLE_SIZE {
            return Err(corrupt("metadata region smaller than its 64 KiB table"));
        }
        self.read_file(meta_off, &mut table)?;
        let entries = parse_metadata_table(&table, regions.metadata.length).map_err(corrupt)?;
        let entries_saved = entries.clone();
        let params = {
            let this = &*self;
            parse_disk_params(&entries, |e| {
                let mut b = vec![0u8; e.length as usize];
                this.read_file(meta_off + u64::from(e.offset), &mut b)
                    .map_err(|e| MetadataError::Corrupt(e.to_string()))?;
                Ok(b)
            })
        }
        .map_err(|e| match e {
            MetadataError::Corrupt(m) => corrupt(m),
            MetadataError::Unsupported(m) => open_err(m),
        })?;
        let geo = Geometry::new(
            params.file.block_size,
            params.logical_sector_size,
            params.virtual_size,
            params.file.has_parent,
        )
        .ok_or_else(|| corrupt("disk parameters out of range"))?;
        // BAT.
        let entries = geo.bat_entries();
        let need = entries * 8;
        if need > u64::from(regions.bat.length) {
            return Err(corrupt(format!(
                "BAT region of {} bytes cannot hold the {entries} entries the disk needs",
                regions.bat.length
            )));
        }
        if need > MAX_BAT_BYTES {
            return Err(open_err("BAT larger than 1 GiB is not supported"));
        }
        let padded = need.div_ceil(LOG_SECTOR as u64) * LOG_SECTOR as u64;
        let mut bat = vec![0u8; padded as usize];
        self.read_file(regions.bat.file_offset, &mut bat)?;
        self.params = params;
        self.meta_entries = entries_saved;
        self.geo = geo;
        self.bat = bat;
        self.validate_layout()?;
        Ok(())
    }

    /// Checks every BAT entry and that no two structures overlap, then finds
    /// the zero-state blocks whose file space may be reused.
    ///
    /// Time O(n log n) and memory 4 bytes per allocated or zero-state entry
    /// on top of the BAT itself, whatever the entries say: entries are kept
    /// as `u32` BAT indices sorted by file offset, and a message naming an
    /// extent is formatted only when it is reported.
    fn validate_layout(&mut self) -> Result<(), DiskError> {
        let g = self.geo;
        let diff = g.has_parent;
        let fixed = self.fixed_extents();
        let entries = g.bat_entries();
        // MAX_BAT_BYTES keeps the entry count far below 2^32.
        let idx32 = |i: u64| u32::try_from(i).map_err(|_| corrupt("BAT too large"));
        let mut allocated: Vec<u32> = Vec::new();
        let mut zero_candidates: Vec<u32> = Vec::new();
        let mut partial_without_sb: Option<u64> = None;
        for i in 0..entries {
            let e = self.bat_entry(i);
            if e.reserved_bits() != 0 {
                return Err(corrupt(format!("BAT entry {i} has reserved bits set")));
            }
            match g.classify_index(i) {
                Ok(block) => {
                    if block >= g.payload_blocks {
                        if e.raw_state() != 0 {
                            return Err(corrupt(format!(
                                "BAT entry {i} describes block {block} past the end of the disk"
                            )));
                        }
                        continue;
                    }
                    match e.payload_state() {
                        PayloadState::Reserved(s) => {
                            return Err(corrupt(format!("BAT entry {i} has reserved state {s}")))
                        }
                        PayloadState::PartiallyPresent if !diff => {
                            return Err(corrupt(format!(
                                "BAT entry {i} is partially present in a non-differencing disk"
                            )))
                        }
                        PayloadState::PartiallyPresent => {
                            let chunk = block / g.chunk_ratio;
                            let sb = self.bat_entry(g.bitmap_index(chunk));
                            if sb.bitmap_state() != BitmapState::Present {
                                partial_without_sb.get_or_insert(chunk);
                            }
                        }
                        PayloadState::FullyPresent => {}
                        PayloadState::NotPresent => continue,
                        PayloadState::Zero | PayloadState::Unmapped | PayloadState::Undefined => {
                            if e.file_offset() != 0 {
                                zero_candidates.push(idx32(i)?);
                            }
                            continue;
                        }
                    }
                }
                Err(_) => match e.bitmap_state() {
                    BitmapState::NotPresent => continue,
                    BitmapState::Reserved(s) => {
                        return Err(corrupt(format!("BAT entry {i} has reserved state {s}")))
                    }
                    BitmapState::Present if !diff => {
                        return Err(corrupt(format!(
                            "BAT entry {i} has a sector bitmap in a non-differencing disk"
                        )))
                    }
                    BitmapState::Present => {}
                },
            }
            let off = e.file_offset();
            if off < MIB {
                return Err(corrupt(format!(
                    "BAT entry {i} points into the header section"
                )));
            }
            match self.entry_extent(i) {
                Some((_, end)) if end <= self.file_len => allocated.push(idx32(i)?),
                _ => return Err(corrupt(format!("BAT entry {i} points past end of file"))),
            }
        }
        if let Some(c) = partial_without_sb {
            return Err(corrupt(format!(
                "chunk {c} has partially present blocks but no sector bitmap"
            )));
        }
        // Overlaps: with both lists sorted by start, only neighbours in the
        // merged order can overlap.
        let by_offset = |this: &Self, v: &mut Vec<u32>| {
            v.sort_unstable_by_key(|&i| (this.bat_entry(u64::from(i)).file_offset(), i));
        };
        by_offset(self, &mut allocated);
        let mut prev: Option<(u64, u64, Extent)> = None;
        let mut top = 0u64;
        let (mut fi, mut ai) = (0usize, 0usize);
        loop {
            let next_fixed = fixed.get(fi).copied();
            let next_alloc = allocated.get(ai).and_then(|&i| {
                let (s, e) = self.entry_extent(u64::from(i))?;
                Some((s, e, Extent::Entry(i)))
            });
            let cur = match (next_fixed, next_alloc) {
                (Some(f), Some(a)) if (f.0, f.1) <= (a.0, a.1) => {
                    fi += 1;
                    f
                }
                (_, Some(a)) => {
                    ai += 1;
                    a
                }
                (Some(f), None) => {
                    fi += 1;
                    f
                }
                (None, None) => break,
            };
            if let Some(p) = prev {
                if cur.0 < p.1 {
                    return Err(corrupt(format!(
                        "{} overlaps {}",
                        self.describe_extent(p.2),
                        self.describe_extent(cur.2)
                    )));
                }
            }
            top = top.max(cur.1);
            prev = Some(cur);
        }
        // Zero-state blocks with file space: reusable when the space is
        // free. Taken in file order; a candidate is checked against the
        // next occupied extent of each sorted list (their ends ascend too,
        // as they do not overlap) and against the last one accepted.
        let bs = u64::from(g.block_size);
        by_offset(self, &mut zero_candidates);
        let (mut fi, mut ai) = (0usize, 0usize);
        let mut last_reused_end = 0u64;
        let mut reusable = IndexSet::default();
        for &i in &zero_candidates {
            let off = self.bat_entry(u64::from(i)).file_offset();
            let Some(end) = off.checked_add(bs) else {
                continue;
            };
            if off < MIB || end > self.file_len || off < last_reused_end {
                continue;
            }
            while fixed.get(fi).is_some_and(|f| f.1 <= off) {
                fi += 1;
            }
            while allocated
                .get(ai)
                .and_then(|&a| self.entry_extent(u64::from(a)))
                .is_some_and(|x| x.1 <= off)
            {
                ai += 1;
            }
            let clash = fixed.get(fi).is_some_and(|f| f.0 < end)
                || allocated
                    .get(ai)
                    .and_then(|&a| self.entry_extent(u64::from(a)))
                    .is_some_and(|x| x.0 < end);
            if !clash {
                reusable.insert(u64::from(i), entries);
                last_reused_end = end;
                top = top.max(end);
            }
        }
        self.reusable = reusable;
        self.alloc_end =
            round_up_mib(top.max(self.file_len)).ok_or_else(|| corrupt("file too large"))?;
        Ok(())
    }

    /// The structures at fixed places, sorted by offset.
    fn fixed_extents(&self) -> [(u64, u64, Extent); 4] {
        let r = &self.regions;
        let mut v = [
            (0, MIB, Extent::Header),
            (
                self.log_offset,
                self.log_offset + u64::from(self.log_length),
                Extent::Log,
            ),
            (
                r.bat.file_offset,
                r.bat.file_offset + u64::from(r.bat.length),
                Extent::BatRegion,
            ),
            (
                r.metadata.file_offset,
                r.metadata.file_offset + u64::from(r.metadata.length),
                Extent::MetadataRegion,
            ),
        ];
        v.sort_unstable_by_key(|x| (x.0, x.1));
        v
    }

    /// File range `[start, end)` that allocated BAT entry `i` occupies, or
    /// `None` when it would overflow. The last payload block may be cut
    /// short by the end of the disk: other writers size the file to the
    /// data only.
    fn entry_extent(&self, i: u64) -> Option<(u64, u64)> {
        let g = self.geo;
        let bs = u64::from(g.block_size);
        let size = match g.classify_index(i) {
            Ok(block) => bs.min(g.virtual_size.saturating_sub(block * bs)),
            Err(_) => MIB,
        };
        let off = self.bat_entry(i).file_offset();
        Some((off, off.checked_add(size)?))
    }

    /// Names an extent for an error message.
    fn describe_extent(&self, x: Extent) -> String {
        match x {
            Extent::Header => "header section".into(),
            Extent::Log => "log".into(),
            Extent::BatRegion => "BAT region".into(),
            Extent::MetadataRegion => "metadata region".into(),
            Extent::Entry(i) => match self.geo.classify_index(u64::from(i)) {
                Ok(block) => format!("payload block {block} (BAT entry {i})"),
                Err(chunk) => format!("sector bitmap {chunk} (BAT entry {i})"),
            },
        }
    }

    /// Deeper consistency checks than open does (for `vhdx check`): both
    /// region table copies valid and identical, every sector bitmap of a
    /// partially present block readable, then the parent chain.
    pub fn verify(&mut self) -> Result<(), DiskError> {
        let mut tables = Vec::new();
        for (i, off) in [REGION1_OFFSET, REGION2_OFFSET].into_iter().enumerate() {
            let mut b = vec![0u8; REGION_TABLE_SIZE];
            self.read_file(off, &mut b)?;
            match parse_region_table(&b) {
                Ok(r) => tables.push(r),
                Err(RegionError::Corrupt(m) | RegionError::Unsupported(m)) => {
                    return Err(corrupt(format!("region table {}: {m}", i + 1)))
                }
            }
        }
        if tables.first() != tables.get(1) {
            return Err(corrupt("region table 2 differs from region table 1"));
        }
        let g = self.geo;
        for block in 0..g.payload_blocks {
            let e = self.bat_entry(g.payload_index(block));
            if e.payload_state() == PayloadState::PartiallyPresent {
                let sb = self.bat_entry(g.bitmap_index(block / g.chunk_ratio));
                self.get_bits(
                    sb.file_offset(),
                    g.bitmap_bit(block, 0),
                    g.sectors_per_block(),
                )?;
            }
        }
        if let Some(p) = self.parent.as_deref_mut() {
            p.verify()?;
        }
        Ok(())
    }
}
