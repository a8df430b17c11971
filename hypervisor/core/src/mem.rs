//! Memory access traits: how logic code reaches host-physical frames and
//! guest memory without touching the machine itself.
//!
//! * [`FrameAlloc`] hands out zeroed 4 KiB host frames (page tables, VMCBs).
//! * [`PhysMem`] reads and writes 64-bit words of host-physical memory (page
//!   table entries). The platform implements it over its identity map; tests
//!   implement it over a `BTreeMap` and can record every write.
//! * [`GuestMemory`] is the fallible, bounds-checked view of one VM's RAM used
//!   by device models and the VMM. Every write through it must be recorded in
//!   the VM's dirty log while logging is on: hardware write-protection never
//!   sees writes made by the hypervisor itself.

use crate::addr::{Gpa, Hpa};
use core::fmt;

/// Errors from memory traits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemError {
    /// No free host frames left.
    OutOfFrames,
    /// The guest range `[gpa, gpa+len)` is not backed by guest RAM.
    OutOfRange {
        /// Start of the rejected range.
        gpa: Gpa,
        /// Length of the rejected range in bytes.
        len_bytes: u64,
    },
}

impl fmt::Display for MemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemError::OutOfFrames => write!(f, "out of host memory frames"),
            MemError::OutOfRange { gpa, len_bytes } => {
                write!(f, "guest range {gpa}+{len_bytes:#x} is outside guest RAM")
            }
        }
    }
}

/// Allocator of zero-filled 4 KiB host frames.
pub trait FrameAlloc {
    /// A fresh zeroed 4 KiB-aligned frame.
    fn alloc_frame(&mut self) -> Result<Hpa, MemError>;
    /// Return a frame obtained from [`FrameAlloc::alloc_frame`].
    fn free_frame(&mut self, hpa: Hpa);
}

/// Word access to host-physical memory (page-table frames).
pub trait PhysMem {
    /// Read the aligned u64 at `hpa`.
    fn read_u64(&self, hpa: Hpa) -> u64;
    /// Write the aligned u64 at `hpa`.
    fn write_u64(&mut self, hpa: Hpa, value: u64);
}

/// Fallible access to one VM's guest-physical RAM.
///
/// Implementations bounds-check every access against guest RAM and mark every
/// page they write in the dirty log when logging is enabled.
pub trait GuestMemory {
    /// Size of guest RAM in bytes (RAM occupies `[0, ram_bytes)`).
    fn ram_bytes(&self) -> u64;
    /// Copy guest bytes at `gpa` into `buf`.
    fn read(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemError>;
    /// Copy `data` into guest memory at `gpa` (marks the dirty log).
    fn write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), MemError>;

    /// Read a little-endian u64.
    fn read_u64(&self, gpa: Gpa) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// Write a little-endian u64.
    fn write_u64(&mut self, gpa: Gpa, value: u64) -> Result<(), MemError> {
        self.write(gpa, &value.to_le_bytes())
    }
}

/// Check that `[gpa, gpa+len)` lies inside `[0, ram_bytes)`; the one bounds
/// check every [`GuestMemory`] implementation uses.
pub fn check_guest_range(gpa: Gpa, len_bytes: u64, ram_bytes: u64) -> Result<(), MemError> {
    match gpa.as_u64().checked_add(len_bytes) {
        Some(end) if end <= ram_bytes => Ok(()),
        _ => Err(MemError::OutOfRange { gpa, len_bytes }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_check() {
        assert!(check_guest_range(Gpa(0), 4096, 4096).is_ok());
        assert!(check_guest_range(Gpa(1), 4096, 4096).is_err());
        assert!(check_guest_range(Gpa(u64::MAX), 2, u64::MAX).is_err());
    }
}
