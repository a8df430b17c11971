//! AMD SVM nested paging: the entry format of the nested page table.
//!
//! AMD nested paging walks the nested table with the ordinary long-mode
//! page-table format (AMD APM vol. 2, 15.25.5 "Nested Table Walk"; entry
//! fields in 5.4.1, 4 KiB and 2 MiB translation in 5.3.3 and 5.3.4). Every
//! nested access is treated as a user-mode access, so each level needs the
//! U/S bit or the walk faults (APM vol. 2, 15.25.5; observed under QEMU TCG,
//! see shared/PLATFORM.md). No-execute is left clear; accessed and dirty
//! bits are left to the hardware and ignored here.

use crate::addr::Hpa;
use crate::npt::{EntryFormat, ADDR_MASK_2M, ADDR_MASK_4K};

/// Present (APM vol. 2, 5.4.1).
pub const PTE_P: u64 = 1 << 0;
/// Read/write: writes allowed when set.
pub const PTE_RW: u64 = 1 << 1;
/// User/supervisor: user access allowed when set (required on every nested
/// level).
pub const PTE_US: u64 = 1 << 2;
/// Accessed (set by the hardware).
pub const PTE_A: u64 = 1 << 5;
/// Dirty (set by the hardware, leaves only).
pub const PTE_D: u64 = 1 << 6;
/// Page size: a page-directory entry with PS maps a 2 MiB page
/// (APM vol. 2, 5.3.4). In a 4 KiB PTE this bit is PAT instead.
pub const PTE_PS: u64 = 1 << 7;
/// No-execute.
pub const PTE_NX: u64 = 1 << 63;

/// The AMD nested page-table entry format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NptFormat;

impl EntryFormat for NptFormat {
    const NAME: &'static str = "NPT";

    fn table_entry(table: Hpa) -> u64 {
        (table.0 & ADDR_MASK_4K) | PTE_P | PTE_RW | PTE_US
    }

    fn leaf_4k(hpa: Hpa, writable: bool) -> u64 {
        (hpa.0 & ADDR_MASK_4K) | PTE_P | PTE_US | if writable { PTE_RW } else { 0 }
    }

    fn leaf_2m(hpa: Hpa, writable: bool) -> u64 {
        (hpa.0 & ADDR_MASK_2M) | PTE_P | PTE_US | PTE_PS | if writable { PTE_RW } else { 0 }
    }

    fn is_present(entry: u64) -> bool {
        entry & PTE_P != 0
    }

    fn is_large(entry: u64) -> bool {
        entry & PTE_PS != 0
    }

    fn is_writable(entry: u64) -> bool {
        entry & PTE_RW != 0
    }

    fn with_writable(entry: u64, writable: bool) -> u64 {
        if writable {
            entry | PTE_RW
        } else {
            entry & !PTE_RW
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::npt::PageSize;

    #[test]
    fn encodings() {
        assert_eq!(NptFormat::table_entry(Hpa(0x1234_5000)), 0x1234_5007);
        assert_eq!(NptFormat::leaf_4k(Hpa(0x5000), true), 0x5007);
        assert_eq!(NptFormat::leaf_4k(Hpa(0x5000), false), 0x5005);
        assert_eq!(NptFormat::leaf_2m(Hpa(0x20_0000), true), 0x20_0087);
        let e = NptFormat::leaf_2m(Hpa(0x4020_0000), false);
        assert!(NptFormat::is_present(e) && NptFormat::is_large(e));
        assert!(!NptFormat::is_writable(e));
        assert!(NptFormat::is_writable(NptFormat::with_writable(e, true)));
        assert_eq!(
            NptFormat::leaf_address(e | PTE_A | PTE_D, PageSize::Size2M),
            Hpa(0x4020_0000)
        );
        assert!(!NptFormat::is_present(0));
    }
}
