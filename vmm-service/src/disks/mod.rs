//! A VM's virtual disks as the node keeps them: VHDX files opened through
//! vstorage over whatever storage the node has, handed to the VM's
//! virtio-blk devices as [`vstorage::VirtualDisk`]s.
//!
//! [`MemFile`] is a file in node memory with shared handles: the node can
//! keep one to read the file's bytes (the whole VHDX, as a host tool
//! would) while a VM's disk writes through another. The test cases use it;
//! a node without a store has nothing else.

use crate::vm::Vm;
use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use hvmgmt::proto::DiskInfo;
use vstorage::vhdx::{self, CreateParams, Vhdx};
use vstorage::{BlockIo, DiskError, IoError, MemIo, VirtualDisk};

/// Largest disk a node keeps in its own memory (the node heap is small).
pub const MEM_DISK_MAX_MIB: u64 = 16;
/// The pseudo-store of disks in node memory.
pub const MEMORY_STORE: &str = "memory";

/// The file operations disks need where their files live (the node's
/// stores). A location is `STORE:path`.
pub trait FileStore {
    /// Whether `store` exists here.
    fn has_store(&self, store: &str) -> bool;
    /// The store new disks go to when none is named.
    fn default_store(&self) -> Option<String>;
    /// Create `to`'s partial file (a new one; its directory is made) and
    /// open it read-write.
    fn create_partial(&self, to: &str) -> Result<Box<dyn BlockIo>, String>;
    /// Create `to`'s partial file like [`FileStore::create_partial`],
    /// but for a file that may exist already and is to be replaced whole
    /// (a VM's own configuration file being rewritten): the commit
    /// renames over it.
    fn replace_partial(&self, to: &str) -> Result<Box<dyn BlockIo>, String>;
    /// Give `to`'s partial file (its data flushed) its final name,
    /// durably (replacing a file of that name).
    fn commit_partial(&self, to: &str) -> Result<(), String>;
    /// Delete `to`'s partial file (best effort: a node's boot removes what
    /// is left).
    fn remove_partial(&self, to: &str);
    /// Delete the file at `at`, durably.
    fn remove(&self, at: &str) -> Result<(), String>;
    /// Bytes the file at `at` occupies, if known.
    fn file_bytes(&self, at: &str) -> Option<u64>;
    /// The whole file at `at`, refused if longer than `max_bytes`.
    fn read(&self, at: &str, max_bytes: usize) -> Result<Vec<u8>, String>;
    /// Open the existing file at `at` read-write (a disk being imported).
    fn open(&self, at: &str) -> Result<Box<dyn BlockIo>, String>;
}

/// Where a disk's file is.
#[derive(Clone, Debug)]
pub enum Backing {
    /// In node memory (lost when the node stops).
    Memory { name: String, file: MemFile },
    /// A file on a store: `STORE:path`.
    File { location: String },
}

/// What the node knows of one of a VM's disks besides the disk itself.
#[derive(Clone, Debug)]
pub struct DiskMeta {
    pub backing: Backing,
    pub fixed: bool,
    pub virtual_bytes: u64,
    /// The VHDX's payload block size (a copy is made with the same).
    pub block_bytes: u32,
    /// `STORE:path` of the checkpoint (a differencing VHDX whose parent is
    /// the file above) the VM writes to, if it has one
    /// (`crate::checkpoint`).
    pub checkpoint: Option<String>,
}

impl DiskMeta {
    /// `STORE:path` (or `memory:NAME`).
    pub fn location(&self) -> String {
        match &self.backing {
            Backing::Memory { name, .. } => format!("{MEMORY_STORE}:{name}"),
            Backing::File { location } => location.clone(),
        }
    }
    /// The file's own name (the last part of its path).
    pub fn file_name(&self) -> String {
        let loc = self.location();
        let path = loc.split_once(':').map_or(loc.as_str(), |(_, p)| p);
        path.rsplit('/').next().unwrap_or(path).into()
    }
    /// Bytes of the file now (0 when the node cannot tell).
    pub fn file_bytes(&self, files: Option<&dyn FileStore>) -> u64 {
        match &self.backing {
            Backing::Memory { file, .. } => file.len().unwrap_or(0),
            Backing::File { location } => files.and_then(|f| f.file_bytes(location)).unwrap_or(0),
        }
    }
    /// As the API lists it.
    pub fn info(&self, slot: u8, files: Option<&dyn FileStore>) -> DiskInfo {
        DiskInfo {
            slot,
            location: self.location(),
            kind: if self.fixed { "fixed" } else { "dynamic" }.into(),
            virtual_bytes: self.virtual_bytes,
            file_bytes: self.file_bytes(files),
        }
    }
}

/// Why a disk could not be made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateError {
    /// The request asks for something impossible here.
    Invalid(String),
    /// The node lacks the room.
    NoResources(String),
}

/// Largest disk on a store.
pub const STORE_DISK_MAX_MIB: u64 = 64 << 10;

/// Create a new disk for `vm` (not started) and attach it: a VHDX of
/// `size_mib` MiB on `store` (`None`: the node's default store, else its
/// memory), fixed or dynamic. On a store the file is
/// `vms/VM/VM-SLOT.vhdx`, written under its partial name and named only
/// once created and flushed.
pub fn create_for_vm(
    vm: &mut Vm,
    files: Option<&dyn FileStore>,
    size_mib: u64,
    store: Option<&str>,
    fixed: bool,
) -> Result<DiskInfo, CreateError> {
    let store: String = match (store, files) {
        (Some(s), _) => s.into(),
        (None, Some(f)) => f.default_store().unwrap_or_else(|| MEMORY_STORE.into()),
        (None, None) => MEMORY_STORE.into(),
    };
    if store != MEMORY_STORE {
        let Some(files) = files.filter(|f| f.has_store(&store)) else {
            let shown: String = store.chars().take(32).collect();
            return Err(CreateError::Invalid(format!(
                "no store '{shown}' on this node"
            )));
        };
        return create_on_store(vm, files, &store, size_mib, fixed);
    }
    if size_mib == 0 || size_mib > MEM_DISK_MAX_MIB {
        return Err(CreateError::Invalid(format!(
            "a disk in node memory is 1 to {MEM_DISK_MAX_MIB} MiB"
        )));
    }
    let slot = vm.disk_count();
    let name = format!("{}-{slot}.vhdx", vm.name());
    let bytes = size_mib << 20;
    let (mut disk, file) =
        new_mem_vhdx(bytes).map_err(|e| CreateError::NoResources(format!("{e}")))?;
    if fixed {
        // Every block allocated now: write zeros over the whole disk.
        let zeros = alloc::vec![0u8; 1 << 20];
        let mut at = 0;
        while at < bytes {
            vstorage::VirtualDisk::write(&mut disk, at, &zeros)
                .map_err(|e| CreateError::NoResources(format!("{e}")))?;
            at += 1 << 20;
        }
        vstorage::VirtualDisk::flush(&mut disk)
            .map_err(|e| CreateError::NoResources(format!("{e}")))?;
    }
    let meta = DiskMeta {
        backing: Backing::Memory { name, file },
        fixed,
        virtual_bytes: bytes,
        block_bytes: MEM_BLOCK_BYTES,
        checkpoint: None,
    };
    let info = meta.info(slot as u8, None);
    vm.attach_disk(Box::new(disk), meta)
        .ok_or_else(|| CreateError::NoResources("every virtio slot of the VM is taken".into()))?;
    Ok(info)
}

fn create_on_store(
    vm: &mut Vm,
    files: &dyn FileStore,
    store: &str,
    size_mib: u64,
    fixed: bool,
) -> Result<DiskInfo, CreateError> {
    if size_mib == 0 || size_mib > STORE_DISK_MAX_MIB {
        return Err(CreateError::Invalid(format!(
            "a disk is 1 to {STORE_DISK_MAX_MIB} MiB"
        )));
    }
    if vm.disk_count() >= crate::devices::MAX_VIRTIO_SLOTS {
        return Err(CreateError::NoResources(
            "every virtio slot of the VM is taken".into(),
        ));
    }
    let slot = vm.disk_count();
    let location = format!("{store}:vms/{0}/{0}-{slot}.vhdx", vm.name());
    let file = files
        .create_partial(&location)
        .map_err(CreateError::NoResources)?;
    // A disk other nodes can see writes only while the VM's lease allows
    // (crate::lease::vms).
    let file: Box<dyn BlockIo> = if crate::lease::vms::is_shared_store(store) {
        Box::new(crate::lease::vms::GatedIo::new(
            file,
            vm.disk_gate().clone(),
        ))
    } else {
        file
    };
    let bytes = size_mib << 20;
    let params = CreateParams {
        fixed,
        guid_seed: bytes ^ slot as u64,
        ..CreateParams::dynamic(bytes)
    };
    let made = vhdx::create(file, &params).and_then(|mut d| {
        vstorage::VirtualDisk::flush(&mut d)?;
        Ok(d)
    });
    let disk = match made {
        Ok(d) => d,
        Err(e) => {
            files.remove_partial(&location);
            return Err(CreateError::NoResources(format!(
                "cannot create {location}: {e}"
            )));
        }
    };
    if let Err(e) = files.commit_partial(&location) {
        drop(disk);
        files.remove_partial(&location);
        return Err(CreateError::NoResources(format!(
            "cannot name {location}: {e}"
        )));
    }
    let meta = DiskMeta {
        backing: Backing::File { location },
        fixed,
        virtual_bytes: bytes,
        block_bytes: params.block_size,
        checkpoint: None,
    };
    let info = meta.info(slot as u8, Some(files));
    vm.attach_disk(Box::new(disk), meta)
        .ok_or_else(|| CreateError::NoResources("every virtio slot of the VM is taken".into()))?;
    Ok(info)
}

/// Attach the existing VHDX at `location` (`STORE:path`) to `vm` (not
/// started) as its next disk, opened read-write (a VM being imported).
/// Opening writes nothing unless the file has a log to replay (a node
/// stopped mid-update); the header is first updated by the guest's first
/// write. `guid_seed` seeds the GUIDs that write draws.
pub fn attach_existing(
    vm: &mut Vm,
    files: &dyn FileStore,
    location: &str,
    guid_seed: u64,
) -> Result<DiskInfo, String> {
    let io = files
        .open(location)
        .map_err(|e| format!("cannot open {location}: {e}"))?;
    // As for a new disk: one other nodes can see writes only while the
    // VM's lease allows (crate::lease::vms). Such a file is opened
    // read-only here: a read-write open writes (a new file GUID, a replay
    // of the log another node may be appending to), and this node does not
    // hold the lease yet; `vm start` takes it and opens the file again,
    // read-write behind the VM's gate (`lease::vms::regain`).
    let shared = crate::lease::vms::is_shared_store(crate::lease::vms::store_of(location));
    let io: Box<dyn BlockIo> = if shared {
        Box::new(crate::lease::vms::GatedIo::new(io, vm.disk_gate().clone()))
    } else {
        io
    };
    let opts = if shared {
        vhdx::OpenOptions::read_only()
    } else {
        vhdx::OpenOptions::read_write(guid_seed)
    };
    let disk = Vhdx::open(io, opts).map_err(|e| format!("{location} is not a usable VHDX: {e}"))?;
    let fixed = match disk.kind() {
        vhdx::DiskKind::Dynamic => false,
        vhdx::DiskKind::Fixed => true,
        vhdx::DiskKind::Differencing => {
            return Err(format!(
                "{location} is a differencing disk: a VM's disks here are dynamic or fixed"
            ))
        }
    };
    let meta = DiskMeta {
        backing: Backing::File {
            location: location.into(),
        },
        fixed,
        virtual_bytes: disk.virtual_size_bytes(),
        block_bytes: disk.block_size(),
        checkpoint: None,
    };
    let slot = vm.disk_count();
    let info = meta.info(slot as u8, Some(files));
    vm.attach_disk(Box::new(disk), meta)
        .ok_or_else(|| String::from("every virtio slot of the VM is taken"))?;
    Ok(info)
}

/// The disks of `vm` as the API lists them.
pub fn list(vm: &Vm, files: Option<&dyn FileStore>) -> Vec<DiskInfo> {
    vm.disk_meta()
        .iter()
        .enumerate()
        .map(|(i, m)| m.info(i as u8, files))
        .collect()
}

/// A file in node memory; clones are handles on the same bytes.
#[derive(Clone, Debug)]
pub struct MemFile(Rc<RefCell<MemIo>>);

impl MemFile {
    /// An empty file that may grow to `limit_bytes`, all of it reserved
    /// now: the node heap is small and a growing vector would double its
    /// allocation (an allocation failure halts the node), so a file that
    /// cannot have its room fails here, cleanly.
    pub fn new(limit_bytes: u64) -> Result<Self, IoError> {
        let mut bytes = Vec::new();
        usize::try_from(limit_bytes)
            .ok()
            .and_then(|n| bytes.try_reserve_exact(n).ok())
            .ok_or_else(|| IoError::Host {
                op: "create",
                detail: format!(
                    "no room for a {} MiB file in node memory",
                    limit_bytes >> 20
                ),
            })?;
        Ok(Self(Rc::new(RefCell::new(
            MemIo::from_vec(bytes).with_limit(limit_bytes),
        ))))
    }
    /// A copy of the file's bytes now.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.borrow().as_slice().to_vec()
    }
}

impl BlockIo for MemFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.0.borrow().read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.0.borrow_mut().write_at(offset, data)
    }
    fn flush(&mut self) -> Result<(), IoError> {
        self.0.borrow_mut().flush()
    }
    fn len(&self) -> Result<u64, IoError> {
        self.0.borrow().len()
    }
    fn set_len(&mut self, len: u64) -> Result<(), IoError> {
        self.0.borrow_mut().set_len(len)
    }
}

/// Bytes a VHDX file needs beyond its payload at most (headers, log,
/// BAT, metadata, sector bitmaps), generously.
pub const VHDX_OVERHEAD_BYTES: u64 = 8 << 20;

/// Payload block size of disks in node memory: the smallest VHDX allows,
/// so a few writes do not take 32 MiB of node heap each.
pub const MEM_BLOCK_BYTES: u32 = 1 << 20;

/// A new dynamic VHDX of `size_bytes` in node memory (1 MiB blocks): the
/// disk, and a handle on its file.
pub fn new_mem_vhdx(size_bytes: u64) -> Result<(Vhdx<MemFile>, MemFile), DiskError> {
    let file = MemFile::new(size_bytes.saturating_add(VHDX_OVERHEAD_BYTES))?;
    let params = CreateParams {
        block_size: MEM_BLOCK_BYTES,
        ..CreateParams::dynamic(size_bytes)
    };
    let disk = vhdx::create(file.clone(), &params)?;
    Ok((disk, file))
}

/// Stands in for a VM's disk for the instant it is exchanged (storage
/// migration's switch, a checkpoint taken or merged): same geometry, no I/O.
pub struct Detached {
    pub size: u64,
    pub sector: u32,
}

impl VirtualDisk for Detached {
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn logical_sector_size(&self) -> u32 {
        self.sector
    }
    fn read(&mut self, _: u64, _: &mut [u8]) -> Result<(), DiskError> {
        Err(DiskError::Request("the disk is being exchanged".into()))
    }
    fn write(&mut self, _: u64, _: &[u8]) -> Result<(), DiskError> {
        Err(DiskError::Request("the disk is being exchanged".into()))
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstorage::vhdx::OpenOptions;
    use vstorage::VirtualDisk;

    /// The largest memory disk, written full, fits in the room its file
    /// reserved (a write past it would be an I/O error, not a bigger
    /// allocation).
    #[test]
    fn a_full_memory_disk_fits_its_reservation() {
        let bytes = MEM_DISK_MAX_MIB << 20;
        let (mut disk, file) = new_mem_vhdx(bytes).unwrap();
        let chunk = alloc::vec![0x5au8; 1 << 20];
        for at in (0..bytes).step_by(1 << 20) {
            disk.write(at, &chunk).unwrap();
        }
        disk.flush().unwrap();
        assert!(file.len().unwrap() <= bytes + VHDX_OVERHEAD_BYTES);
        assert!(MemFile::new(u64::MAX).is_err(), "no room is an error");
    }

    #[test]
    fn the_handle_sees_what_the_disk_wrote() {
        let (mut disk, file) = new_mem_vhdx(4 << 20).unwrap();
        disk.write(4096, &[7u8; 512]).unwrap();
        disk.flush().unwrap();
        drop(disk);
        let mut again =
            Vhdx::open(MemIo::from_vec(file.bytes()), OpenOptions::read_only()).unwrap();
        let mut b = [0u8; 512];
        again.read(4096, &mut b).unwrap();
        assert_eq!(b, [7u8; 512]);
        again.verify().unwrap();
    }
}
