//! Intel VMX extended page tables (EPT): the entry format.
//!
//! Formats from Intel SDM vol. 3C, 29.3.2 "EPT Translation Mechanism",
//! Tables 29-1 (PML4E), 29-3 (PDPTE referencing a PD), 29-4 (PDE mapping a
//! 2 MiB page), 29-5 (PDE referencing a PT) and 29-6 (PTE); numbered 28.2.2
//! in editions before 2023. An entry is present when any of bits 2:0 is set.
//! Leaves carry memory type WB (6) in bits 5:3 (29.3.7) with ignore-PAT
//! (bit 6) clear, so the guest's PAT still applies. Non-leaf entries must
//! keep bits 7:3 zero or the CPU reports an EPT misconfiguration (29.3.3.1).
//! Write-protection clears W only: write-without-read would itself be a
//! misconfiguration. Accessed/dirty bits (8, 9) are used only when the EPTP
//! enables them; this module neither sets nor reads them.

use crate::addr::Hpa;
use crate::npt::{EntryFormat, ADDR_MASK_2M, ADDR_MASK_4K};

/// Read access.
pub const EPT_R: u64 = 1 << 0;
/// Write access.
pub const EPT_W: u64 = 1 << 1;
/// Execute access.
pub const EPT_X: u64 = 1 << 2;
/// Shift of the memory-type field (bits 5:3) of a leaf.
pub const EPT_MEMTYPE_SHIFT: u64 = 3;
/// Memory type write-back (SDM vol. 3C, 29.3.7; the MTRR/PAT encoding).
pub const EPT_MEMTYPE_WB: u64 = 6;
/// Ignore the guest PAT memory type (leaves only). Left clear.
pub const EPT_IGNORE_PAT: u64 = 1 << 6;
/// A page-directory entry with bit 7 maps a 2 MiB page.
pub const EPT_LARGE: u64 = 1 << 7;
/// Accessed flag (with EPTP bit 6).
pub const EPT_A: u64 = 1 << 8;
/// Dirty flag (leaves, with EPTP bit 6).
pub const EPT_D: u64 = 1 << 9;

/// EPTP bits 2:0: memory type of the EPT paging structures, WB.
pub const EPTP_MEMTYPE_WB: u64 = 6;
/// EPTP bits 5:3: page-walk length minus one (3 = four levels).
pub const EPTP_WALK_4: u64 = 3 << 3;
/// EPTP bit 6: the CPU sets accessed/dirty flags in EPT entries (only if
/// IA32_VMX_EPT_VPID_CAP bit 21 allows it).
pub const EPTP_AD: u64 = 1 << 6;

/// The extended-page-table pointer for a table rooted at `root` (Intel SDM
/// vol. 3C, 25.6.11): WB paging structures, 4-level walk, A/D flags if
/// `accessed_dirty`. The caller checks WB and 4-level support in
/// IA32_VMX_EPT_VPID_CAP (bits 14 and 6).
pub const fn eptp(root: Hpa, accessed_dirty: bool) -> u64 {
    (root.0 & ADDR_MASK_4K)
        | EPTP_MEMTYPE_WB
        | EPTP_WALK_4
        | if accessed_dirty { EPTP_AD } else { 0 }
}

const LEAF_BASE: u64 = EPT_R | EPT_X | (EPT_MEMTYPE_WB << EPT_MEMTYPE_SHIFT);

/// The Intel EPT entry format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EptFormat;

impl EntryFormat for EptFormat {
    const NAME: &'static str = "EPT";

    fn table_entry(table: Hpa) -> u64 {
        (table.0 & ADDR_MASK_4K) | EPT_R | EPT_W | EPT_X
    }

    fn leaf_4k(hpa: Hpa, writable: bool) -> u64 {
        (hpa.0 & ADDR_MASK_4K) | LEAF_BASE | if writable { EPT_W } else { 0 }
    }

    fn leaf_2m(hpa: Hpa, writable: bool) -> u64 {
        (hpa.0 & ADDR_MASK_2M) | LEAF_BASE | EPT_LARGE | if writable { EPT_W } else { 0 }
    }

    fn is_present(entry: u64) -> bool {
        entry & (EPT_R | EPT_W | EPT_X) != 0
    }

    fn is_large(entry: u64) -> bool {
        entry & EPT_LARGE != 0
    }

    fn is_writable(entry: u64) -> bool {
        entry & EPT_W != 0
    }

    fn with_writable(entry: u64, writable: bool) -> u64 {
        if writable {
            entry | EPT_W
        } else {
            entry & !EPT_W
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::npt::PageSize;

    #[test]
    fn encodings() {
        assert_eq!(EptFormat::table_entry(Hpa(0x1234_5000)), 0x1234_5007);
        assert_eq!(EptFormat::leaf_4k(Hpa(0x5000), true), 0x5037);
        assert_eq!(EptFormat::leaf_4k(Hpa(0x5000), false), 0x5035);
        assert_eq!(EptFormat::leaf_2m(Hpa(0x20_0000), true), 0x20_00b7);
        let e = EptFormat::leaf_2m(Hpa(0x4020_0000), false);
        assert!(EptFormat::is_present(e) && EptFormat::is_large(e));
        assert!(!EptFormat::is_writable(e));
        assert_eq!(e & EPT_IGNORE_PAT, 0);
        assert_eq!(
            EptFormat::leaf_address(e | EPT_A | EPT_D, PageSize::Size2M),
            Hpa(0x4020_0000)
        );
        assert!(!EptFormat::is_present(EPT_LARGE | EPT_A));
        assert_eq!(eptp(Hpa(0x1234_5000), false), 0x1234_501e);
        assert_eq!(eptp(Hpa(0x1234_5000), true), 0x1234_505e);
    }
}
