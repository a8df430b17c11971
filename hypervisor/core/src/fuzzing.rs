//! Fuzz harnesses shared by the cargo-fuzz targets (`hypervisor/core/fuzz`,
//! nightly) and the deterministic host tests below (stable), so both run
//! the same code.
//!
//! The input of [`fuzz_exit_decode`] is the raw exit fields as the CPU
//! hands them over, little-endian:
//!
//! | bytes | SVM (byte 0 even)        | VMX (byte 0 odd)              |
//! |-------|--------------------------|-------------------------------|
//! | 1..9  | exit code                | exit reason field             |
//! | 9..17 | EXITINFO1                | exit qualification            |
//! | 17..25| EXITINFO2                | guest-physical address        |
//! | 25..33| EXITINTINFO              | instruction length            |
//! | 33..41| IDTR limit, long mode bit 32 | exit interruption info    |
//! | 41..  | guest registers in `Regs` order (RAX RBX RCX RDX ... RIP RFLAGS) ||
//!
//! Missing bytes read as zero. Invariants checked: no panic; I/O sizes
//! are ones the handler can meet (1, 2, 4 for SVM, 1..=8 for VMX, whose
//! size field has a reserved code); instruction lengths are 1..=15; an
//! event the record cannot name decodes to `None` and a named one survives
//! the round trip.

use crate::svm::exit as svm;
use crate::vcpu::{Regs, VmExit};
use crate::vmx::exit as vmx;

/// Field `i` (8 bytes from offset `1 + 8 * i`), zero-extended.
fn field(data: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    let start = 1 + 8 * i;
    if let Some(rest) = data.get(start..) {
        let n = rest.len().min(8);
        w[..n].copy_from_slice(&rest[..n]);
    }
    u64::from_le_bytes(w)
}

/// The guest registers from fields 5 onwards, in [`Regs`] order.
fn regs(data: &[u8]) -> Regs {
    let mut r = Regs::default();
    for (i, slot) in r.fields_mut().into_iter().enumerate() {
        *slot = field(data, 5 + i);
    }
    r
}

/// One exit's raw fields through the decoder of the vendor byte 0 names.
pub fn fuzz_exit_decode(data: &[u8]) {
    let vendor_vmx = data.first().is_some_and(|b| b & 1 == 1);
    let r = regs(data);
    let f = |i| field(data, i);
    if vendor_vmx {
        match vmx::decode_exit(f(0), f(1), f(2), f(3), f(4), &r) {
            vmx::Decoded::Exit { exit, len } => {
                assert!(len.is_none_or(|l| (1..=15).contains(&l)));
                check_exit(&exit, 1..=8);
            }
            vmx::Decoded::Skip(len) | vmx::Decoded::ReadCr8 { len, .. } => {
                assert!((1..=15).contains(&len));
            }
            _ => {}
        }
        let info = f(4);
        if let Some(ev) = vmx::event_out(info, f(1)) {
            assert_eq!(
                vmx::event_out(vmx::event_in(&ev).0, f(1) & 0xffff_ffff),
                Some(ev)
            );
        }
        let _ = vmx::ar_to_attrib(f(1));
        let _ = vmx::attrib_to_ar(f(1) as u16);
    } else {
        if let svm::Decoded::Exit {
            exit: VmExit::Io(io),
            ..
        } = svm::decode_exit(f(0), f(1), f(2), &r)
        {
            assert!(matches!(io.size, 1 | 2 | 4));
        }
        let reinject = svm::reinjection(f(3));
        // Reserved bits 30:12 of EVENTINJ are never set by us.
        assert_eq!(reinject & 0x7fff_f000, 0);
        if let Some(ev) = svm::event_out(f(3)) {
            let back = svm::event_out(svm::event_in(&ev));
            assert_eq!(back, Some(ev));
        }
        let vector = f(2) as u8;
        let limit = f(4) as u32;
        let long_mode = f(4) & (1 << 32) != 0;
        match svm::deliver_exception(vector, f(1) as u32, limit, long_mode) {
            svm::Delivery::Inject { vector: v, .. } => assert!(v == vector || v == 8),
            svm::Delivery::Shutdown => {}
        }
    }
}

fn check_exit(exit: &VmExit, io_sizes: core::ops::RangeInclusive<u8>) {
    if let VmExit::Io(io) = exit {
        assert!(io_sizes.contains(&io.size));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed seeds and a stream of xorshift-generated inputs, on
    /// stable, through the same harness the fuzz target runs.
    #[test]
    fn seeds_and_random_inputs_decode_without_panic() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/exit_decode");
        let mut seeds = 0;
        for entry in std::fs::read_dir(dir).expect("seed directory") {
            let bytes = std::fs::read(entry.expect("seed").path()).expect("seed bytes");
            fuzz_exit_decode(&bytes);
            seeds += 1;
        }
        assert!(seeds >= 4, "seeds for both vendors are committed");
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = [0u8; 41 + 18 * 8];
        for i in 0..20_000 {
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            // Small codes and reasons often, so the decoders' arms are hit.
            if i % 2 == 0 {
                buf[1] = (i / 2 % 80) as u8;
                buf[2..9].fill(0);
            }
            let len = i % buf.len();
            fuzz_exit_decode(&buf[..len]);
            fuzz_exit_decode(&buf);
        }
    }

    #[test]
    fn fields_read_little_endian_and_short_input_is_zero() {
        let mut d = [0u8; 20];
        d[0] = 1;
        d[1] = 0x30;
        d[9] = 0x08;
        assert_eq!(field(&d, 0), 0x30);
        assert_eq!(field(&d, 1), 0x08);
        assert_eq!(field(&d, 2), 0);
        assert_eq!(field(&[], 0), 0);
        let r = regs(&d);
        assert_eq!(r, Regs::default());
    }
}
