//! Creating files: parameters, their checks, and the initial layout
//! (header section, 1 MiB log, 1 MiB metadata region, BAT, then payload;
//! every block preallocated for a fixed disk).

use super::*;

/// What a new differencing disk records about its parent.
#[derive(Debug, Clone)]
pub struct ParentSpec {
    /// The parent's DataWriteGuid (becomes parent_linkage).
    pub data_write_guid: Guid,
    /// Path relative to the child's directory ('\'-separated), if any.
    pub relative_path: Option<String>,
    /// Absolute path (stored as absolute_win32_path), if any.
    pub absolute_path: Option<String>,
    /// Parent's virtual size.
    pub virtual_size: u64,
    /// Parent's logical sector size.
    pub logical_sector_size: u32,
    /// Parent's physical sector size.
    pub physical_sector_size: u32,
    /// Parent's page 83 id (virtual disk metadata is copied on fork).
    pub disk_id: Guid,
}

/// Parameters of a new file.
#[derive(Debug, Clone)]
pub struct CreateParams {
    /// Virtual size in bytes (ignored for differencing: the parent's is used).
    pub virtual_size: u64,
    /// Payload block size in bytes (power of two, 1..=256 MiB).
    pub block_size: u32,
    /// 512 or 4096.
    pub logical_sector_size: u32,
    /// 512 or 4096.
    pub physical_sector_size: u32,
    /// Allocate every block now (LeaveBlocksAllocated).
    pub fixed: bool,
    /// Make a differencing disk of this parent.
    pub parent: Option<ParentSpec>,
    /// Seed for GUIDs.
    pub guid_seed: u64,
}

impl CreateParams {
    /// Checks the parameters without touching any file; returns the geometry.
    pub fn validate(&self) -> Result<Geometry, DiskError> {
        let (virtual_size, ls, ps, has_parent) = match &self.parent {
            Some(p) => (
                p.virtual_size,
                p.logical_sector_size,
                p.physical_sector_size,
                true,
            ),
            None => (
                self.virtual_size,
                self.logical_sector_size,
                self.physical_sector_size,
                false,
            ),
        };
        check_sector_size("physical", ps).map_err(open_err)?;
        check_sector_size("logical", ls).map_err(open_err)?;
        let geo = Geometry::new(self.block_size, ls, virtual_size, has_parent).ok_or_else(|| {
            open_err(format!(
                "invalid parameters: size {virtual_size} must be a non-zero multiple of the {ls}-byte sector up to 64 TiB, block size {} a power of two from 1 MiB to 256 MiB",
                self.block_size
            ))
        })?;
        if geo.bat_entries() * 8 > MAX_BAT_BYTES {
            return Err(open_err(
                "disk too large for its block size (BAT over 1 GiB)",
            ));
        }
        Ok(geo)
    }

    /// A dynamic disk of `virtual_size` bytes with 32 MiB blocks and 512-byte sectors.
    pub fn dynamic(virtual_size: u64) -> Self {
        CreateParams {
            virtual_size,
            block_size: 32 << 20,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            fixed: false,
            parent: None,
            guid_seed: 0,
        }
    }
}

/// Writes a new, empty VHDX into `io` (truncating it) and opens it read-write.
pub fn create<B: BlockIo>(mut io: B, p: &CreateParams) -> Result<Vhdx<B>, DiskError> {
    let mut guids = GuidGen::new(p.guid_seed);
    let geo = p.validate()?;
    let (virtual_size, ls, ps, has_parent) = (
        geo.virtual_size,
        geo.sector_size,
        p.parent
            .as_ref()
            .map_or(p.physical_sector_size, |x| x.physical_sector_size),
        geo.has_parent,
    );
    let fixed = p.fixed && !has_parent;
    let log_off = MIB;
    let log_len = MIB;
    let meta_off = 2 * MIB;
    let meta_len = MIB;
    let bat_off = 3 * MIB;
    let bat_bytes = geo.bat_entries() * 8;
    if bat_bytes > MAX_BAT_BYTES {
        return Err(open_err(
            "disk too large for its block size (BAT over 1 GiB)",
        ));
    }
    let bat_len = round_up_mib(bat_bytes).ok_or_else(|| open_err("too large"))?;
    let payload_start = bat_off + bat_len;
    let mut parent_locator = None;
    let mut disk_id = guids.next_guid();
    if let Some(ps) = &p.parent {
        let mut entries = vec![(
            String::from("parent_linkage"),
            ps.data_write_guid.to_string(),
        )];
        if let Some(r) = &ps.relative_path {
            entries.push(("relative_path".into(), r.clone()));
        }
        if let Some(a) = &ps.absolute_path {
            entries.push(("absolute_win32_path".into(), a.clone()));
        }
        let pl = ParentLocator {
            locator_type: VHDX_PARENT_LOCATOR_TYPE,
            entries,
        };
        pl.check_limits().map_err(open_err)?;
        parent_locator = Some(pl);
        disk_id = ps.disk_id;
    }
    let params = DiskParams {
        file: FileParameters {
            block_size: p.block_size,
            leave_blocks_allocated: fixed,
            has_parent,
        },
        virtual_size,
        disk_id,
        logical_sector_size: ls,
        physical_sector_size: ps,
        parent_locator,
    };
    let meta = build_metadata_region(&params, meta_len as usize);
    let mut bat = vec![0u8; bat_len as usize];
    let mut end = payload_start;
    if fixed {
        for b in 0..geo.payload_blocks {
            let off = payload_start + b * u64::from(p.block_size);
            wr64(
                &mut bat,
                (geo.payload_index(b) * 8) as usize,
                BatEntry::new(PAYLOAD_FULLY_PRESENT, off).0,
            );
            end = off + u64::from(p.block_size);
        }
    }
    let regions = Regions {
        bat: RegionEntry {
            guid: BAT_REGION,
            file_offset: bat_off,
            length: bat_len as u32,
            required: true,
        },
        metadata: RegionEntry {
            guid: METADATA_REGION,
            file_offset: meta_off,
            length: meta_len as u32,
            required: true,
        },
    };
    io.set_len(0)?;
    if fixed {
        // Every block is in use from the start: reserve the space now, so
        // a write to a fixed disk never fails for lack of it.
        io.allocate(0, end)?;
    } else {
        io.set_len(end)?;
    }
    io.write_at(FILE_ID_OFFSET, &file_identifier("hvmigrate vstorage"))?;
    let rt = build_region_table(&regions);
    io.write_at(REGION1_OFFSET, &rt)?;
    io.write_at(REGION2_OFFSET, &rt)?;
    io.write_at(meta_off, &meta)?;
    io.write_at(bat_off, &bat)?;
    io.flush()?;
    let fw = guids.next_guid();
    let dw = guids.next_guid();
    for (i, off) in [HEADER1_OFFSET, HEADER2_OFFSET].into_iter().enumerate() {
        let h = Header {
            sequence_number: i as u64,
            file_write_guid: fw,
            data_write_guid: dw,
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: log_len as u32,
            log_offset: log_off,
        };
        io.write_at(off, &h.to_bytes())?;
    }
    io.flush()?;
    Vhdx::open(
        io,
        OpenOptions::read_write(guids.next_guid().0[0] as u64 ^ p.guid_seed.rotate_left(17)),
    )
}
