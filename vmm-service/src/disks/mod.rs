//! A VM's virtual disks as the node keeps them: VHDX files opened through
//! vstorage over whatever storage the node has, handed to the VM's
//! virtio-blk devices as [`vstorage::VirtualDisk`]s.
//!
//! [`MemFile`] is a file in node memory with shared handles: the node can
//! keep one to read the file's bytes (the whole VHDX, as a host tool
//! would) while a VM's disk writes through another. The test cases use it;
//! a node without a store has nothing else.

use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;
use vstorage::vhdx::{self, CreateParams, Vhdx};
use vstorage::{BlockIo, DiskError, IoError, MemIo};

/// A file in node memory; clones are handles on the same bytes.
#[derive(Clone, Debug)]
pub struct MemFile(Rc<RefCell<MemIo>>);

impl MemFile {
    /// An empty file that may grow to `limit_bytes`.
    pub fn new(limit_bytes: u64) -> Self {
        Self(Rc::new(RefCell::new(MemIo::new().with_limit(limit_bytes))))
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
pub const VHDX_OVERHEAD_BYTES: u64 = 16 << 20;

/// Payload block size of disks in node memory: the smallest VHDX allows,
/// so a few writes do not take 32 MiB of node heap each.
pub const MEM_BLOCK_BYTES: u32 = 1 << 20;

/// A new dynamic VHDX of `size_bytes` in node memory (1 MiB blocks): the
/// disk, and a handle on its file.
pub fn new_mem_vhdx(size_bytes: u64) -> Result<(Vhdx<MemFile>, MemFile), DiskError> {
    let file = MemFile::new(size_bytes.saturating_add(VHDX_OVERHEAD_BYTES));
    let params = CreateParams {
        block_size: MEM_BLOCK_BYTES,
        ..CreateParams::dynamic(size_bytes)
    };
    let disk = vhdx::create(file.clone(), &params)?;
    Ok((disk, file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstorage::vhdx::OpenOptions;
    use vstorage::VirtualDisk;

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
