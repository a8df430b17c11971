//! Fuzz harness shared by the cargo-fuzz target and the plain corpus test:
//! opens arbitrary bytes as a VHDX and exercises reads and writes. Its only
//! assertion is read-after-write; any panic is a bug.

use super::disk::{OpenOptions, Vhdx};
use crate::io::{MemIo, VirtualDisk};
use alloc::vec;

/// Opens `data` as a VHDX (read-only, then read-write) and does I/O.
/// Returns whether it opened (for corpus statistics).
pub fn fuzz_harness(data: &[u8]) -> bool {
    let limit = data.len() as u64 + (8 << 20);
    let Ok(mut d) = Vhdx::open(
        MemIo::from_vec(data.to_vec()).with_limit(limit),
        OpenOptions::read_only(),
    ) else {
        return false;
    };
    {
        let ss = u64::from(d.logical_sector_size());
        let mut buf = vec![0u8; ss as usize * 2];
        let size = d.virtual_size();
        for off in [0, size / 2, size.saturating_sub(2 * ss)] {
            let off = off - off % ss;
            let _ = d.read(off, &mut buf);
        }
        let _ = d.allocated_ranges();
        let _ = d.verify();
        let _ = d.write(0, &buf);
    }
    if let Ok(mut d) = Vhdx::open(
        MemIo::from_vec(data.to_vec()).with_limit(limit),
        OpenOptions::read_write(1),
    ) {
        let ss = d.logical_sector_size() as usize;
        let size = d.virtual_size();
        let pattern = vec![0xA5u8; ss * 3];
        let off = (size / 3) - (size / 3) % ss as u64;
        if d.write(off, &pattern).is_ok() {
            let mut back = vec![0u8; ss * 3];
            if d.read(off, &mut back).is_ok() {
                assert_eq!(back, pattern, "read-after-write mismatch");
            }
        }
        if d.parent_locator().is_some() {
            let _ = d.update_parent_paths(Some("fuzz\\p.vhdx".into()), None);
        }
        let _ = d.close();
    }
    true
}
