//! The I/O and MSR permission maps shared by every SVM guest. AMD APM vol. 2,
//! 15.10.1 (IOPM) and 15.11 (MSRPM).
//!
//! Both are immutable statics: the CPU only reads them, and the hypervisor
//! identity-maps memory, so a static's address is its physical address.

use hvcore::addr::Hpa;

/// IOPM: 12 KiB, one bit per port (plus the bits an access crossing port
/// 0xffff checks), set = intercept. All ports are intercepted: every device a
/// guest sees is a model in the VMM.
#[repr(C, align(4096))]
pub struct Iopm(pub [u8; 3 * 4096]);

/// MSRPM: 8 KiB, two bits per MSR (even = read, odd = write), set =
/// intercept, in three 2 KiB vectors for MSRs 0000_0000-0000_1fff,
/// c000_0000-c000_1fff and c001_0000-c001_1fff; MSRs outside always exit.
#[repr(C, align(4096))]
pub struct Msrpm(pub [u8; 2 * 4096]);

/// MSRs the guest reads and writes directly: VMRUN/VMLOAD/VMSAVE switch
/// them with the VMCB save area (AMD APM vol. 2, 15.5.2), so the host never
/// sees the guest's values and `Vcpu::read_msr` finds them in the VMCB.
/// EFER is deliberately absent: the guest must never see or clear SVME.
const PASS_THROUGH: [u32; 10] = [
    0x0000_0174, // SYSENTER_CS
    0x0000_0175, // SYSENTER_ESP
    0x0000_0176, // SYSENTER_EIP
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
    0xc000_0102, // KERNEL_GS_BASE
];

/// Bit index of `msr`'s read-intercept bit in the MSRPM, if it is covered.
pub const fn msrpm_bit(msr: u32) -> Option<usize> {
    let (vector, offset) = match msr {
        0x0000_0000..=0x0000_1fff => (0, msr),
        0xc000_0000..=0xc000_1fff => (1, msr - 0xc000_0000),
        0xc001_0000..=0xc001_1fff => (2, msr - 0xc001_0000),
        _ => return None,
    };
    Some(vector * 2048 * 8 + offset as usize * 2)
}

const fn build_msrpm() -> Msrpm {
    let mut map = [0xffu8; 2 * 4096];
    let mut i = 0;
    while i < PASS_THROUGH.len() {
        if let Some(bit) = msrpm_bit(PASS_THROUGH[i]) {
            // Clear both the read and the write bit.
            map[bit / 8] &= !(0b11 << (bit % 8));
        }
        i += 1;
    }
    Msrpm(map)
}

/// The shared IOPM.
pub static IOPM: Iopm = Iopm([0xff; 3 * 4096]);
/// The shared MSRPM.
pub static MSRPM: Msrpm = build_msrpm();

/// Physical address of [`IOPM`].
pub fn iopm_hpa() -> Hpa {
    Hpa(&IOPM as *const Iopm as u64)
}

/// Physical address of [`MSRPM`].
pub fn msrpm_hpa() -> Hpa {
    Hpa(&MSRPM as *const Msrpm as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msrpm_layout() {
        assert_eq!(msrpm_bit(0), Some(0));
        assert_eq!(msrpm_bit(0xc000_0000), Some(0x800 * 8));
        assert_eq!(msrpm_bit(0xc001_0000), Some(0x1000 * 8));
        assert_eq!(msrpm_bit(0xc002_0000), None);
        let efer = msrpm_bit(0xc000_0080).unwrap();
        assert_eq!((MSRPM.0[efer / 8] >> (efer % 8)) & 0b11, 0b11);
        let fs = msrpm_bit(0xc000_0100).unwrap();
        assert_eq!((MSRPM.0[fs / 8] >> (fs % 8)) & 0b11, 0);
    }
}
