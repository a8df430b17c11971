//! The I/O bitmaps and the MSR bitmap shared by every VMX guest. Intel SDM
//! vol. 3C, 25.6.4 (I/O bitmaps) and 25.6.9 (MSR bitmaps).
//!
//! All are immutable statics: the CPU only reads them, and the hypervisor
//! identity-maps memory, so a static's address is its physical address.

use hvcore::addr::Hpa;

/// One 4 KiB bitmap page.
#[repr(C, align(4096))]
pub struct BitmapPage(pub [u8; 4096]);
const _: () = assert!(core::mem::size_of::<BitmapPage>() == 4096);

/// I/O bitmap A (ports 0000-7fff) and B (8000-ffff): every port exits;
/// every device a guest sees is a model in the VMM.
pub static IO_BITMAP_A: BitmapPage = BitmapPage([0xff; 4096]);
pub static IO_BITMAP_B: BitmapPage = BitmapPage([0xff; 4096]);

/// MSRs the guest reads and writes directly: their guest values live in
/// VMCS guest-state fields that VM entry loads and VM exit saves (Intel
/// SDM vol. 3C, 25.4.1 and 28.3.1), so the host's are never exposed and
/// `Vcpu::read_msr` finds them in the VMCS. Everything else exits (EFER
/// and PAT too, so the policy in hvcore validates every write).
const PASS_THROUGH: [u32; 5] = [
    0x0000_0174, // SYSENTER_CS
    0x0000_0175, // SYSENTER_ESP
    0x0000_0176, // SYSENTER_EIP
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
];

/// Byte offsets of the read bitmaps for low (0000_0000-0000_1fff) and high
/// (c000_0000-c000_1fff) MSRs; the write bitmaps follow at +0x800.
/// Intel SDM vol. 3C, 25.6.9.
pub const fn msr_bitmap_bit(msr: u32) -> Option<usize> {
    match msr {
        0x0000_0000..=0x0000_1fff => Some(msr as usize),
        0xc000_0000..=0xc000_1fff => Some(0x400 * 8 + (msr - 0xc000_0000) as usize),
        _ => None,
    }
}

const fn build_msr_bitmap() -> BitmapPage {
    let mut map = [0xffu8; 4096];
    let mut i = 0;
    while i < PASS_THROUGH.len() {
        if let Some(bit) = msr_bitmap_bit(PASS_THROUGH[i]) {
            map[bit / 8] &= !(1 << (bit % 8));
            map[0x800 + bit / 8] &= !(1 << (bit % 8));
        }
        i += 1;
    }
    BitmapPage(map)
}

/// The shared MSR bitmap.
pub static MSR_BITMAP: BitmapPage = build_msr_bitmap();

/// Physical address of a bitmap page.
pub fn hpa(page: &'static BitmapPage) -> Hpa {
    Hpa(page as *const BitmapPage as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intercepted(msr: u32) -> (bool, bool) {
        let bit = msr_bitmap_bit(msr).unwrap();
        (
            MSR_BITMAP.0[bit / 8] & (1 << (bit % 8)) != 0,
            MSR_BITMAP.0[0x800 + bit / 8] & (1 << (bit % 8)) != 0,
        )
    }

    #[test]
    fn msr_bitmap_layout() {
        assert_eq!(msr_bitmap_bit(0), Some(0));
        assert_eq!(msr_bitmap_bit(0xc000_0000), Some(0x2000));
        assert_eq!(msr_bitmap_bit(0xc001_0000), None);
        assert_eq!(intercepted(0xc000_0080), (true, true), "EFER");
        assert_eq!(intercepted(0x277), (true, true), "PAT");
        assert_eq!(intercepted(0xc000_0100), (false, false), "FS_BASE");
        assert_eq!(intercepted(0x174), (false, false), "SYSENTER_CS");
        assert_eq!(intercepted(0xc000_0082), (true, true), "LSTAR");
        assert!(IO_BITMAP_A
            .0
            .iter()
            .chain(&IO_BITMAP_B.0)
            .all(|&b| b == 0xff));
    }
}
