//! The VHDX write-ahead log (MS-VHDX 2.3): building entries, finding the
//! active sequence and turning it into a replay plan.
//!
//! Pure logic over byte slices: the caller reads the log region and applies
//! the plan. Invariants kept by the writer (see `disk.rs`): every entry is a
//! complete sequence of its own (its tail points to itself) and is applied and
//! flushed before the next one is written, so replaying only the newest valid
//! entry is always correct and replaying it twice changes nothing.

use super::format::{checksum_with_hole, rd32, rd64, wr32, wr64, Guid};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// Log sector size (MS-VHDX 2.3.1).
pub const LOG_SECTOR: usize = 4096;
const ENTRY_SIGNATURE: &[u8; 4] = b"loge";
const DATA_DESC_SIGNATURE: &[u8; 4] = b"desc";
const ZERO_DESC_SIGNATURE: &[u8; 4] = b"zero";
const DATA_SECTOR_SIGNATURE: &[u8; 4] = b"data";
/// Descriptors in the first descriptor sector (after the 64-byte header).
const FIRST_SECTOR_DESCS: usize = 126;
/// Descriptors in each further descriptor sector.
const MORE_SECTOR_DESCS: usize = 128;

/// One write a log entry carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogWrite {
    /// Write these 4096 bytes at the 4 KiB-aligned file offset.
    Data {
        /// Destination.
        file_offset: u64,
        /// Exactly 4096 bytes.
        data: Vec<u8>,
    },
    /// Zero `len` bytes (multiple of 4 KiB) at the 4 KiB-aligned offset.
    Zero {
        /// Destination.
        file_offset: u64,
        /// Bytes to zero.
        len: u64,
    },
}

/// Descriptor sectors needed for `n` descriptors.
pub fn descriptor_sectors(n: usize) -> usize {
    if n <= FIRST_SECTOR_DESCS {
        1
    } else {
        1 + (n - FIRST_SECTOR_DESCS).div_ceil(MORE_SECTOR_DESCS)
    }
}

/// Bytes an entry holding `writes` occupies in the log.
pub fn entry_len(writes: &[LogWrite]) -> usize {
    let data = writes
        .iter()
        .filter(|w| matches!(w, LogWrite::Data { .. }))
        .count();
    (descriptor_sectors(writes.len()) + data) * LOG_SECTOR
}

/// Parameters of one entry being built.
#[derive(Debug, Clone, Copy)]
pub struct EntryParams {
    /// Entry sequence number (> 0).
    pub sequence_number: u64,
    /// Offset of the tail entry within the log.
    pub tail: u32,
    /// The header's LogGuid.
    pub log_guid: Guid,
    /// File size known durable when the entry is written (multiple of 1 MiB).
    pub flushed_file_offset: u64,
    /// File size all structures fit in (multiple of 1 MiB).
    pub last_file_offset: u64,
}

/// Serializes one log entry. `Data` writes must carry exactly 4096 bytes.
pub fn build_entry(p: &EntryParams, writes: &[LogWrite]) -> Vec<u8> {
    let desc_sectors = descriptor_sectors(writes.len());
    let mut b = vec![0u8; entry_len(writes)];
    b[0..4].copy_from_slice(ENTRY_SIGNATURE);
    let total = b.len() as u32;
    wr32(&mut b, 8, total);
    wr32(&mut b, 12, p.tail);
    wr64(&mut b, 16, p.sequence_number);
    wr32(&mut b, 24, writes.len() as u32);
    b[32..48].copy_from_slice(&p.log_guid.0);
    wr64(&mut b, 48, p.flushed_file_offset);
    wr64(&mut b, 56, p.last_file_offset);
    let mut data_idx = 0usize;
    for (i, w) in writes.iter().enumerate() {
        let d = descriptor_offset(i);
        match w {
            LogWrite::Zero { file_offset, len } => {
                b[d..d + 4].copy_from_slice(ZERO_DESC_SIGNATURE);
                wr64(&mut b, d + 8, *len);
                wr64(&mut b, d + 16, *file_offset);
            }
            LogWrite::Data { file_offset, data } => {
                b[d..d + 4].copy_from_slice(DATA_DESC_SIGNATURE);
                let mut sector = [0u8; LOG_SECTOR];
                let n = data.len().min(LOG_SECTOR);
                sector[..n].copy_from_slice(&data[..n]);
                wr32(&mut b, d + 4, rd32(&sector, 4092));
                wr64(&mut b, d + 8, rd64(&sector, 0));
                wr64(&mut b, d + 16, *file_offset);
                let s = (desc_sectors + data_idx) * LOG_SECTOR;
                b[s..s + 4].copy_from_slice(DATA_SECTOR_SIGNATURE);
                wr32(&mut b, s + 4, (p.sequence_number >> 32) as u32);
                b[s + 8..s + 4092].copy_from_slice(&sector[8..4092]);
                wr32(&mut b, s + 4092, p.sequence_number as u32);
                data_idx += 1;
            }
        }
        wr64(&mut b, d + 24, p.sequence_number);
    }
    let c = checksum_with_hole(&b, 4);
    wr32(&mut b, 4, c);
    b
}

fn descriptor_offset(i: usize) -> usize {
    if i < FIRST_SECTOR_DESCS {
        64 + i * 32
    } else {
        let j = i - FIRST_SECTOR_DESCS;
        (1 + j / MORE_SECTOR_DESCS) * LOG_SECTOR + (j % MORE_SECTOR_DESCS) * 32
    }
}

/// A validated entry found in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedEntry {
    /// Offset of the entry within the log.
    pub position: u32,
    /// Entry length in bytes.
    pub length: u32,
    /// Offset of its sequence's tail within the log.
    pub tail: u32,
    /// Sequence number.
    pub sequence_number: u64,
    /// File size known durable when written.
    pub flushed_file_offset: u64,
    /// File size all structures fit in.
    pub last_file_offset: u64,
    /// The writes, in order.
    pub writes: Vec<LogWrite>,
}

/// Copies `len` bytes of the circular `log` starting at `pos` (wrapping).
fn ring_read(log: &[u8], pos: usize, len: usize) -> Option<Vec<u8>> {
    if log.is_empty() || len > log.len() || pos >= log.len() {
        return None;
    }
    let mut out = Vec::with_capacity(len);
    let first = (log.len() - pos).min(len);
    out.extend_from_slice(log.get(pos..pos + first)?);
    out.extend_from_slice(log.get(..len - first)?);
    Some(out)
}

/// Validates the entry at `pos` of `log` against `guid`.
pub fn parse_entry(log: &[u8], pos: usize, guid: &Guid) -> Result<ParsedEntry, String> {
    let head = ring_read(log, pos, 64).ok_or("entry header out of range")?;
    if &head[0..4] != ENTRY_SIGNATURE {
        return Err("no entry signature".into());
    }
    let length = rd32(&head, 8) as usize;
    let tail = rd32(&head, 12);
    let seq = rd64(&head, 16);
    let count = rd32(&head, 24) as usize;
    if length == 0 || !length.is_multiple_of(LOG_SECTOR) || length > log.len() {
        return Err(format!("entry length {length} invalid"));
    }
    if !(tail as usize).is_multiple_of(LOG_SECTOR) || tail as usize >= log.len() {
        return Err(format!("entry tail {tail} invalid"));
    }
    if seq == 0 {
        return Err("entry sequence number is zero".into());
    }
    if Guid::read(&head, 32) != *guid {
        return Err("entry LogGuid does not match the header".into());
    }
    let sectors = length / LOG_SECTOR;
    if count > sectors * MORE_SECTOR_DESCS {
        return Err(format!("descriptor count {count} too large for entry"));
    }
    let desc_sectors = descriptor_sectors(count);
    if desc_sectors > sectors {
        return Err("descriptors overflow entry".into());
    }
    let entry = ring_read(log, pos, length).ok_or("entry out of range")?;
    if rd32(&entry, 4) != checksum_with_hole(&entry, 4) {
        return Err("entry checksum mismatch".into());
    }
    let mut writes = Vec::new();
    let mut data_idx = 0usize;
    for i in 0..count {
        let d = descriptor_offset(i);
        let sig = entry.get(d..d + 4).ok_or("descriptor out of range")?;
        if rd64(&entry, d + 24) != seq {
            return Err(format!("descriptor {i} sequence number mismatch"));
        }
        let file_offset = rd64(&entry, d + 16);
        if !file_offset.is_multiple_of(LOG_SECTOR as u64) {
            return Err(format!("descriptor {i} file offset not 4 KiB aligned"));
        }
        if sig == ZERO_DESC_SIGNATURE {
            let len = rd64(&entry, d + 8);
            if !len.is_multiple_of(LOG_SECTOR as u64) {
                return Err(format!("zero descriptor {i} length not 4 KiB aligned"));
            }
            writes.push(LogWrite::Zero { file_offset, len });
        } else if sig == DATA_DESC_SIGNATURE {
            let s = (desc_sectors + data_idx) * LOG_SECTOR;
            let sector = entry
                .get(s..s + LOG_SECTOR)
                .ok_or_else(|| format!("data sector for descriptor {i} lies outside the entry"))?;
            if &sector[0..4] != DATA_SECTOR_SIGNATURE
                || rd32(sector, 4) != (seq >> 32) as u32
                || rd32(sector, 4092) != seq as u32
            {
                return Err(format!("data sector for descriptor {i} is torn"));
            }
            let mut data = sector.to_vec();
            data[0..8].copy_from_slice(&rd64(&entry, d + 8).to_le_bytes());
            data[4092..4096].copy_from_slice(&rd32(&entry, d + 4).to_le_bytes());
            writes.push(LogWrite::Data { file_offset, data });
            data_idx += 1;
        } else {
            return Err(format!("descriptor {i} has an unknown signature"));
        }
    }
    if desc_sectors + data_idx != sectors {
        return Err("entry length does not match its descriptors".into());
    }
    Ok(ParsedEntry {
        position: pos as u32,
        length: length as u32,
        tail,
        sequence_number: seq,
        flushed_file_offset: rd64(&head, 48),
        last_file_offset: rd64(&head, 56),
        writes,
    })
}

/// Finds the active sequence (MS-VHDX 2.3.3): starting from each candidate
/// tail, extend a sequence of valid entries with consecutive sequence numbers;
/// it is valid when its head's tail lies inside it; the newest valid one wins.
/// Returns the entries tail first; `Ok(None)` when there is no valid sequence.
///
/// Work is bounded: every position is parsed at most once (results are
/// cached), checksummed bytes are capped at a few times the log length and
/// extension steps at a few per position, so a crafted log cannot make the
/// scan quadratic. Exceeding a budget is reported as an error.
pub fn find_active_sequence(log: &[u8], guid: &Guid) -> Result<Option<Vec<ParsedEntry>>, String> {
    let positions = log.len() / LOG_SECTOR;
    if positions == 0 {
        return Ok(None);
    }
    let mut cache: Vec<Option<Option<ParsedEntry>>> = vec![None; positions];
    let mut crc_budget = (log.len() as u64).saturating_mul(4);
    let mut step_budget = (positions as u64).saturating_mul(64).saturating_add(4096);
    let mut entry_at = |pos: usize| -> Result<Option<ParsedEntry>, String> {
        let slot = cache
            .get_mut(pos / LOG_SECTOR)
            .ok_or("log position out of range")?;
        if let Some(e) = slot {
            return Ok(e.clone());
        }
        // Charge the checksum work before doing it.
        let claimed = ring_read(log, pos, 12)
            .map(|h| rd32(&h, 8) as u64)
            .unwrap_or(0);
        let parsed = if claimed > crc_budget {
            None
        } else {
            let r = parse_entry(log, pos, guid).ok();
            if r.is_some() {
                crc_budget -= claimed;
            }
            r
        };
        *slot = Some(parsed.clone());
        Ok(parsed)
    };
    let mut best: Option<Vec<ParsedEntry>> = None;
    let mut tail = 0usize;
    let mut old_tail = 0usize;
    loop {
        let mut seq: Vec<ParsedEntry> = Vec::new();
        let mut head = tail;
        while seq.len() < positions {
            step_budget = step_budget
                .checked_sub(1)
                .ok_or("log scan exceeded its work budget (overlapping entries)")?;
            let Some(e) = entry_at(head)? else { break };
            if let Some(prev) = seq.last() {
                if prev.sequence_number.checked_add(1) != Some(e.sequence_number) {
                    break;
                }
            }
            head = (head + e.length as usize) % log.len();
            seq.push(e);
        }
        let start = seq
            .last()
            .and_then(|h| seq.iter().position(|e| e.position == h.tail));
        let newer = |b: &Option<Vec<ParsedEntry>>, s: &[ParsedEntry]| match (b, s.last()) {
            (Some(b), Some(h)) => b
                .last()
                .is_none_or(|x| h.sequence_number > x.sequence_number),
            (None, Some(_)) => true,
            _ => false,
        };
        match start {
            Some(i) => {
                let s = &seq[i..];
                if newer(&best, s) {
                    best = Some(s.to_vec());
                }
                tail = head;
            }
            None => {
                tail += LOG_SECTOR;
                if tail >= log.len() {
                    tail = 0;
                }
            }
        }
        if tail <= old_tail {
            break;
        }
        old_tail = tail;
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(seq: u64, tail: u32, guid: Guid) -> EntryParams {
        EntryParams {
            sequence_number: seq,
            tail,
            log_guid: guid,
            flushed_file_offset: 1 << 20,
            last_file_offset: 4 << 20,
        }
    }

    #[test]
    fn entry_round_trip() {
        let g = Guid([5; 16]);
        let data: Vec<u8> = (0..4096).map(|i| i as u8).collect();
        let writes = vec![
            LogWrite::Data {
                file_offset: 3 << 20,
                data: data.clone(),
            },
            LogWrite::Zero {
                file_offset: 8 << 20,
                len: 8192,
            },
        ];
        let e = build_entry(&params(0x1_0000_0002, 0, g), &writes);
        let mut log = vec![0u8; 1 << 20];
        log[..e.len()].copy_from_slice(&e);
        let p = parse_entry(&log, 0, &g).unwrap();
        assert_eq!(p.writes, writes);
        assert!(parse_entry(&log, 0, &Guid([6; 16])).is_err());
        log[5000] ^= 1;
        assert!(parse_entry(&log, 0, &g).is_err());
    }

    #[test]
    fn many_descriptors_span_sectors() {
        let g = Guid([1; 16]);
        let writes: Vec<LogWrite> = (0..300)
            .map(|i| LogWrite::Zero {
                file_offset: i * 4096,
                len: 4096,
            })
            .collect();
        let e = build_entry(&params(1, 0, g), &writes);
        assert_eq!(e.len(), 3 * 4096);
        let p = parse_entry(&e, 0, &g).unwrap();
        assert_eq!(p.writes, writes);
    }

    #[test]
    fn newest_sequence_wins_and_wraps() {
        let g = Guid([2; 16]);
        let mut log = vec![0u8; 64 * 1024];
        let w = |v: u8| {
            vec![LogWrite::Data {
                file_offset: 0,
                data: vec![v; 4096],
            }]
        };
        // seq 1 at 0, seq 2 at 8K (tail 0: a two-entry sequence), seq 3 wraps at 60K.
        let e1 = build_entry(&params(1, 0, g), &w(1));
        log[..8192].copy_from_slice(&e1);
        let e2 = build_entry(&params(2, 0, g), &w(2));
        log[8192..16384].copy_from_slice(&e2);
        let s = find_active_sequence(&log, &g).unwrap().unwrap();
        assert_eq!(
            s.iter().map(|e| e.sequence_number).collect::<Vec<_>>(),
            vec![1, 2]
        );
        let e3 = build_entry(&params(3, 60 * 1024, g), &w(3));
        log[60 * 1024..].copy_from_slice(&e3[..4096]);
        log[..4096].copy_from_slice(&e3[4096..]);
        let s = find_active_sequence(&log, &g).unwrap().unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].sequence_number, 3);
        assert!(find_active_sequence(&log, &Guid([9; 16]))
            .unwrap()
            .is_none());
    }

    /// Every position holds a valid entry continuing the previous one, but
    /// every head's tail points at a torn entry: the naive scan is quadratic.
    #[test]
    fn crafted_log_cannot_make_the_scan_quadratic() {
        let g = Guid([3; 16]);
        let n = 1024usize;
        let mut log = vec![0u8; n * LOG_SECTOR];
        for i in 1..n {
            let e = build_entry(&params(i as u64, 0, g), &[]);
            log[i * LOG_SECTOR..(i + 1) * LOG_SECTOR].copy_from_slice(&e);
        }
        let t = std::time::Instant::now();
        let r = find_active_sequence(&log, &g);
        assert!(r.is_err() || r.unwrap().is_none());
        assert!(t.elapsed().as_secs() < 5);
    }
}
