//! Hostile-but-well-formed VHDX files for resource-limit tests and the
//! `vhdx-bench open` figures (hidden from the docs: not an API).
//!
//! - [`bat_stress_file`]: a dynamic disk whose BAT has one entry per 1 MiB
//!   payload block, alternating fully present blocks and zero-state blocks
//!   that still carry a file offset, all at distinct offsets in descending
//!   order. The file is sparse: only its first few MiB hold bytes.
//! - [`locator_bomb`]: a differencing disk whose parent locator claims
//!   `entries` distinct keys, each key and value 64 KiB long, all pointing
//!   into one 1 MiB metadata item.

use super::disk::{create, CreateParams, ParentSpec};
use super::format::*;
use crate::io::{BlockIo, DiskError, FileIo, MemIo};
use alloc::vec;
use alloc::vec::Vec;
use std::path::Path;

/// Where [`create`] puts the BAT (after the header section, log and metadata).
const BAT_OFFSET: u64 = 3 * MIB;

/// Writes the BAT stress file at `path` (truncating it): `blocks` payload
/// blocks of 1 MiB. Returns the file's apparent length.
pub fn bat_stress_file(path: &Path, blocks: u64) -> Result<u64, DiskError> {
    let mut p = CreateParams::dynamic(blocks * MIB);
    p.block_size = MIB as u32;
    p.guid_seed = 7;
    let io = FileIo::create(path)?;
    let mut d = create(io, &p)?;
    d.close()?;
    let geo = d.geometry();
    drop(d);
    let bat_bytes = geo.bat_entries() * 8;
    let payload_start = BAT_OFFSET + bat_bytes.div_ceil(MIB) * MIB;
    let mut bat = vec![0u8; bat_bytes as usize];
    for block in 0..geo.payload_blocks {
        let off = payload_start + (geo.payload_blocks - 1 - block) * MIB;
        let state = if block % 2 == 0 {
            PAYLOAD_FULLY_PRESENT
        } else {
            PAYLOAD_ZERO
        };
        wr64(
            &mut bat,
            (geo.payload_index(block) * 8) as usize,
            BatEntry::new(state, off).0,
        );
    }
    let mut io = FileIo::open(path, true)?;
    io.write_at(BAT_OFFSET, &bat)?;
    let len = payload_start + geo.payload_blocks * MIB;
    io.set_len(len)?;
    io.flush()?;
    Ok(len)
}

/// The bytes of a differencing VHDX whose parent locator has `entries`
/// distinct 64 KiB keys and values (see the module docs).
pub fn locator_bomb(entries: u16) -> Result<Vec<u8>, DiskError> {
    let mut p = CreateParams::dynamic(8 * MIB);
    p.block_size = MIB as u32;
    p.guid_seed = 9;
    p.parent = Some(ParentSpec {
        data_write_guid: GuidGen::new(1).next_guid(),
        relative_path: Some("parent.vhdx".into()),
        absolute_path: None,
        virtual_size: 8 * MIB,
        logical_sector_size: 512,
        physical_sector_size: 4096,
        disk_id: GuidGen::new(2).next_guid(),
    });
    let mut d = create(MemIo::new(), &p)?;
    d.close()?;
    let mut file = d.io().as_slice().to_vec();
    drop(d);
    let meta_off = 2 * MIB as usize;
    let region = &mut file[meta_off..meta_off + MIB as usize];
    let mut table = parse_metadata_table(region, MIB as u32).map_err(DiskError::Corrupt)?;

    // The locator: header, `entries` table rows, then the strings. Key i
    // starts 2*i bytes into a run of distinct UTF-16 units (each one three
    // bytes of UTF-8), so every key differs; every value is the same run.
    let n = usize::from(entries);
    let table_end = 20 + 12 * n;
    let str_len: usize = 65534;
    let strings = table_end;
    let item_len = strings + 2 * n + str_len;
    let mut item = vec![0u8; item_len];
    item[..16].copy_from_slice(&VHDX_PARENT_LOCATOR_TYPE.0);
    wr16(&mut item, 18, entries);
    for i in 0..n {
        let row = 20 + 12 * i;
        wr32(&mut item, row, (strings + 2 * i) as u32);
        wr32(&mut item, row + 4, strings as u32);
        wr16(&mut item, row + 8, str_len as u16);
        wr16(&mut item, row + 10, str_len as u16);
    }
    for (k, unit) in item[strings..].chunks_exact_mut(2).enumerate() {
        let u = 0x4E00 + (k % 0x5000) as u16;
        unit.copy_from_slice(&u.to_le_bytes());
    }
    let used_end = table
        .iter()
        .map(|e| e.offset as usize + e.length as usize)
        .max()
        .unwrap_or(METADATA_TABLE_SIZE);
    let at = used_end.div_ceil(8) * 8;
    if at + item_len > MIB as usize {
        return Err(DiskError::Request(
            "locator bomb does not fit in the metadata region".into(),
        ));
    }
    region[at..at + item_len].copy_from_slice(&item);
    for e in table.iter_mut().filter(|e| e.item_id == PARENT_LOCATOR) {
        e.offset = at as u32;
        e.length = item_len as u32;
    }
    let t = build_metadata_table(&table);
    region[..METADATA_TABLE_SIZE].copy_from_slice(&t);
    Ok(file)
}
