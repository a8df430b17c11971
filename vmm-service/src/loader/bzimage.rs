//! The Linux x86 boot protocol's setup header: parse and validate a
//! bzImage for the 64-bit entry.
//!
//! The image is an allegation (it came from a boot module or a store), so
//! [`parse`] checks every field the loader will use before anything is
//! written to guest memory, and never panics or reads out of bounds on any
//! input (it is a fuzz target: `vmm_service::loader::bzimage::parse`):
//! * the boot sector flag 0xAA55 and the "HdrS" magic, protocol >= 2.12
//!   (the first with `xloadflags`), a bzImage (LOADED_HIGH), the 64-bit
//!   entry (XLF_KERNEL_64), a relocatable kernel;
//! * the setup header's extent (the jump at 0x200) inside the setup code
//!   and inside `boot_params`' header slot (it ends by 0x290);
//! * setup sectors (0 means 4) and the protected-mode part after them, at
//!   least `syssize` paragraphs long;
//! * `kernel_alignment` a power of two from 4 KiB to 1 GiB, `min_alignment`
//!   between 12 and it, `pref_address` aligned, `init_size` covering the
//!   protected-mode part and at most [`MAX_INIT_SIZE`], `cmdline_size`
//!   non-zero, the payload inside the protected-mode part;
//! * the version string (if any) inside the setup code, printable ASCII.
//!
//! Reference: Documentation/arch/x86/boot.rst in the Linux tree ("The
//! Real-Mode Kernel Header", "Details of Header Fields", "64-bit Boot
//! Protocol").

use core::fmt;

/// Offset of the setup header in the image (and in `boot_params`).
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// `boot_params` ends its header slot here (`edd_mbr_sig_buffer` follows).
pub const SETUP_HEADER_LIMIT: usize = 0x290;
/// Bytes of the image read as the header (through `kernel_info_offset`).
const HEADER_READ_END: usize = 0x26c;
/// The "HdrS" magic.
pub const HEADER_MAGIC: u32 = 0x5372_6448;
/// Lowest protocol with the 64-bit entry and `xloadflags`.
pub const MIN_PROTOCOL: u16 = 0x020c;
/// `loadflags` bit 0: protected-mode code loaded at 1 MiB (bzImage).
pub const LOADED_HIGH: u8 = 1 << 0;
/// `xloadflags` bit 0: the 64-bit entry point at +0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// `xloadflags` bit 1: kernel, boot_params, command line and initrd may be
/// above 4 GiB.
pub const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;
/// Largest `init_size` accepted.
pub const MAX_INIT_SIZE: u32 = 1 << 30;
/// Offset of the 64-bit entry from the protected-mode kernel's start.
pub const ENTRY_64_OFFSET: u64 = 0x200;

/// The setup header fields the loader uses, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetupHeader {
    /// Setup sectors (0 in the image means 4).
    pub setup_sects: u8,
    /// Protected-mode code size in 16-byte paragraphs.
    pub syssize: u32,
    /// Boot protocol version, e.g. 0x020f.
    pub version: u16,
    pub loadflags: u8,
    /// Highest byte address an initrd may occupy.
    pub initrd_addr_max: u32,
    pub kernel_alignment: u32,
    /// Minimum alignment as a power of two.
    pub min_alignment: u8,
    pub xloadflags: u16,
    /// Longest command line, without the terminating NUL.
    pub cmdline_size: u32,
    pub payload_offset: u32,
    pub payload_length: u32,
    pub pref_address: u64,
    /// Bytes from the load address the kernel needs before it reads its
    /// memory map.
    pub init_size: u32,
    /// End of the setup header (exclusive): 0x202 + the jump's offset.
    pub header_end: usize,
}

/// A validated bzImage, borrowing the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BzImage<'a> {
    pub header: SetupHeader,
    /// The setup header bytes, `[0x1f1, header_end)` of the image: the
    /// loader copies them into `boot_params`.
    pub header_bytes: &'a [u8],
    /// The protected-mode kernel (everything after the setup code).
    pub kernel: &'a [u8],
    /// The kernel's version string, if it has a printable one.
    pub version: Option<&'a str>,
}

/// Why an image is not a bootable bzImage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BzImageError {
    /// Shorter than its header.
    TooShort { len: usize },
    /// No 0xAA55 boot flag or no "HdrS" magic.
    NotLinux,
    /// Boot protocol older than 2.12.
    ProtocolTooOld { version: u16 },
    /// A zImage (protected-mode code at 64 KiB), not a bzImage.
    NotBzImage,
    /// No 64-bit entry point.
    No64BitEntry,
    /// Not relocatable.
    NotRelocatable,
    /// The jump at 0x200 is not a short jump, or the header it delimits is
    /// not inside the setup code and `boot_params`' header slot.
    BadHeaderExtent { end: usize },
    /// The setup code or the protected-mode part lies past the image's end.
    Truncated { needed: u64, len: usize },
    /// A field outside what the protocol allows.
    BadField { field: &'static str, value: u64 },
}

impl fmt::Display for BzImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BzImageError::TooShort { len } => {
                write!(f, "{len} bytes is too short for a Linux kernel image")
            }
            BzImageError::NotLinux => {
                write!(f, "not a Linux kernel image (no boot flag or HdrS magic)")
            }
            BzImageError::ProtocolTooOld { version } => write!(
                f,
                "boot protocol {}.{:02} is older than 2.12 (no 64-bit entry)",
                version >> 8,
                version & 0xff
            ),
            BzImageError::NotBzImage => write!(f, "a zImage, not a bzImage"),
            BzImageError::No64BitEntry => {
                write!(f, "the kernel has no 64-bit entry point (XLF_KERNEL_64)")
            }
            BzImageError::NotRelocatable => write!(f, "the kernel is not relocatable"),
            BzImageError::BadHeaderExtent { end } => {
                write!(
                    f,
                    "setup header ends at {end:#x}, outside the setup code or boot_params"
                )
            }
            BzImageError::Truncated { needed, len } => {
                write!(f, "image is {len} bytes but its header needs {needed}")
            }
            BzImageError::BadField { field, value } => {
                write!(
                    f,
                    "setup header field {field} has an invalid value {value:#x}"
                )
            }
        }
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from(u32_at(b, o)) | (u64::from(u32_at(b, o + 4)) << 32)
}

fn bad(field: &'static str, value: u64) -> BzImageError {
    BzImageError::BadField { field, value }
}

/// Parse and validate `image`.
pub fn parse(image: &[u8]) -> Result<BzImage<'_>, BzImageError> {
    if image.len() < HEADER_READ_END {
        return Err(BzImageError::TooShort { len: image.len() });
    }
    if u16_at(image, 0x1fe) != 0xaa55 || u32_at(image, 0x202) != HEADER_MAGIC {
        return Err(BzImageError::NotLinux);
    }
    let version = u16_at(image, 0x206);
    if version < MIN_PROTOCOL {
        return Err(BzImageError::ProtocolTooOld { version });
    }
    let loadflags = image[0x211];
    if loadflags & LOADED_HIGH == 0 {
        return Err(BzImageError::NotBzImage);
    }
    let xloadflags = u16_at(image, 0x236);
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BzImageError::No64BitEntry);
    }
    if image[0x234] == 0 {
        return Err(BzImageError::NotRelocatable);
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => n,
    };
    let setup_bytes = (usize::from(setup_sects) + 1) * 512;
    if image.len() <= setup_bytes {
        return Err(BzImageError::Truncated {
            needed: setup_bytes as u64 + 1,
            len: image.len(),
        });
    }
    // The header's length is given by the short jump over it.
    let header_end = 0x202 + usize::from(image[0x201]);
    if image[0x200] != 0xeb
        || !(HEADER_READ_END..=SETUP_HEADER_LIMIT).contains(&header_end)
        || header_end > setup_bytes
    {
        return Err(BzImageError::BadHeaderExtent { end: header_end });
    }
    let kernel = &image[setup_bytes..];
    let syssize = u32_at(image, 0x1f4);
    let sys_bytes = u64::from(syssize) * 16;
    if syssize == 0 || sys_bytes > kernel.len() as u64 {
        return Err(BzImageError::Truncated {
            needed: setup_bytes as u64 + sys_bytes,
            len: image.len(),
        });
    }
    let kernel_alignment = u32_at(image, 0x230);
    if !kernel_alignment.is_power_of_two() || !(0x1000..=1 << 30).contains(&kernel_alignment) {
        return Err(bad("kernel_alignment", u64::from(kernel_alignment)));
    }
    let min_alignment = image[0x235];
    if min_alignment != 0
        && !(12..=kernel_alignment.trailing_zeros() as u8).contains(&min_alignment)
    {
        return Err(bad("min_alignment", u64::from(min_alignment)));
    }
    let min_align = 1u64 << min_alignment.max(12);
    let pref_address = u64_at(image, 0x258);
    if !pref_address.is_multiple_of(min_align) || pref_address >= 1 << 46 {
        return Err(bad("pref_address", pref_address));
    }
    let init_size = u32_at(image, 0x260);
    if u64::from(init_size) < kernel.len() as u64 || init_size > MAX_INIT_SIZE {
        return Err(bad("init_size", u64::from(init_size)));
    }
    let cmdline_size = u32_at(image, 0x238);
    if cmdline_size == 0 {
        return Err(bad("cmdline_size", 0));
    }
    let payload_offset = u32_at(image, 0x248);
    let payload_length = u32_at(image, 0x24c);
    if u64::from(payload_offset) + u64::from(payload_length) > kernel.len() as u64 {
        return Err(bad("payload_offset", u64::from(payload_offset)));
    }
    let initrd_addr_max = u32_at(image, 0x22c);
    if initrd_addr_max < 0x10_0000 {
        return Err(bad("initrd_addr_max", u64::from(initrd_addr_max)));
    }
    // kernel_version: offset from 0x200 of a NUL-terminated string inside
    // the setup code. A bad one is dropped, not an error: it is cosmetic.
    let version_offset = usize::from(u16_at(image, 0x20e));
    let version_string = (version_offset != 0)
        .then(|| image.get(0x200 + version_offset..setup_bytes))
        .flatten()
        .and_then(|s| {
            let end = s.iter().take(256).position(|&b| b == 0)?;
            let s = &s[..end];
            s.iter()
                .all(|b| (0x20..0x7f).contains(b))
                .then(|| core::str::from_utf8(s).ok())
                .flatten()
        });
    Ok(BzImage {
        header: SetupHeader {
            setup_sects,
            syssize,
            version,
            loadflags,
            initrd_addr_max,
            kernel_alignment,
            min_alignment,
            xloadflags,
            cmdline_size,
            payload_offset,
            payload_length,
            pref_address,
            init_size,
            header_end,
        },
        header_bytes: &image[SETUP_HEADER_OFFSET..header_end],
        kernel,
        version: version_string,
    })
}

/// A minimal valid bzImage for tests: `setup_sects` 4, a 64 KiB
/// protected-mode part whose first bytes are `code`, protocol 2.15.
#[cfg(test)]
pub(crate) fn test_image(code: &[u8]) -> alloc::vec::Vec<u8> {
    let setup = 5 * 512;
    let kernel_len = 0x1_0000;
    let mut img = alloc::vec![0u8; setup + kernel_len];
    img[0x1f1] = 4;
    img[0x1f4..0x1f8].copy_from_slice(&((kernel_len / 16) as u32).to_le_bytes());
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x200] = 0xeb;
    img[0x201] = 0x6a; // header ends at 0x26c
    img[0x202..0x206].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x20e..0x210].copy_from_slice(&0x0600u16.to_le_bytes());
    img[0x800..0x810].copy_from_slice(b"6.1.0-test (x)\0\0");
    img[0x211] = LOADED_HIGH;
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
    img[0x234] = 1;
    img[0x235] = 21;
    img[0x236..0x238].copy_from_slice(&(XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G).to_le_bytes());
    img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    img[0x248..0x24c].copy_from_slice(&0x100u32.to_le_bytes());
    img[0x24c..0x250].copy_from_slice(&0x1000u32.to_le_bytes());
    img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
    img[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes());
    img[setup..setup + code.len()].copy_from_slice(code);
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_valid_image() {
        let img = test_image(b"\xfa\xf4");
        let bz = parse(&img).unwrap();
        assert_eq!(bz.header.version, 0x020f);
        assert_eq!(bz.header.setup_sects, 4);
        assert_eq!(bz.header.header_end, 0x26c);
        assert_eq!(bz.header_bytes.len(), 0x26c - 0x1f1);
        assert_eq!(bz.kernel.len(), 0x1_0000);
        assert_eq!(&bz.kernel[..2], b"\xfa\xf4");
        assert_eq!(bz.header.pref_address, 0x100_0000);
        assert_eq!(bz.header.init_size, 0x40_0000);
        assert_eq!(bz.version, Some("6.1.0-test (x)"));
        // setup_sects 0 means 4.
        let mut img0 = img.clone();
        img0[0x1f1] = 0;
        assert_eq!(parse(&img0).unwrap().header.setup_sects, 4);
    }

    fn err(img: &[u8]) -> BzImageError {
        parse(img).unwrap_err()
    }

    #[test]
    fn rejects_every_bad_field() {
        let good = test_image(b"");
        let with = |off: usize, bytes: &[u8]| {
            let mut v = good.clone();
            v[off..off + bytes.len()].copy_from_slice(bytes);
            v
        };
        assert_eq!(err(&good[..0x200]), BzImageError::TooShort { len: 0x200 });
        assert_eq!(err(&with(0x1fe, &[0, 0])), BzImageError::NotLinux);
        assert_eq!(err(&with(0x202, b"HdrX")), BzImageError::NotLinux);
        assert_eq!(
            err(&with(0x206, &0x020bu16.to_le_bytes())),
            BzImageError::ProtocolTooOld { version: 0x020b }
        );
        assert_eq!(err(&with(0x211, &[0])), BzImageError::NotBzImage);
        assert_eq!(err(&with(0x236, &[2, 0])), BzImageError::No64BitEntry);
        assert_eq!(err(&with(0x234, &[0])), BzImageError::NotRelocatable);
        assert!(matches!(
            err(&with(0x1f1, &[200])),
            BzImageError::Truncated { .. }
        ));
        assert!(matches!(
            err(&good[..5 * 512]),
            BzImageError::Truncated { .. }
        ));
        assert!(matches!(
            err(&with(0x1f4, &[0, 0, 0, 0])),
            BzImageError::Truncated { .. }
        ));
        assert!(matches!(
            err(&with(0x1f4, &0x1001u32.to_le_bytes())),
            BzImageError::Truncated { .. }
        ));
        assert_eq!(
            err(&with(0x200, &[0xe9])),
            BzImageError::BadHeaderExtent { end: 0x26c }
        );
        assert!(matches!(
            err(&with(0x201, &[0x10])),
            BzImageError::BadHeaderExtent { .. }
        ));
        assert!(matches!(
            err(&with(0x201, &[0xff])),
            BzImageError::BadHeaderExtent { .. }
        ));
        for (off, bytes, field) in [
            (0x230, &0x30_0000u32.to_le_bytes()[..], "kernel_alignment"),
            (0x230, &0x800u32.to_le_bytes()[..], "kernel_alignment"),
            (0x235, &[22u8][..], "min_alignment"),
            (0x235, &[5u8][..], "min_alignment"),
            (0x258, &0x100_1000u64.to_le_bytes()[..], "pref_address"),
            (0x260, &0x8000u32.to_le_bytes()[..], "init_size"),
            (0x260, &(MAX_INIT_SIZE + 1).to_le_bytes()[..], "init_size"),
            (0x238, &0u32.to_le_bytes()[..], "cmdline_size"),
            (0x248, &0xffffu32.to_le_bytes()[..], "payload_offset"),
            (0x22c, &0xfffffu32.to_le_bytes()[..], "initrd_addr_max"),
        ] {
            assert!(
                matches!(err(&with(off, bytes)), BzImageError::BadField { field: f, .. } if f == field),
                "{field} at {off:#x}"
            );
        }
        // A bad version string is dropped, not fatal.
        let v = with(0x20e, &0xffffu16.to_le_bytes());
        assert_eq!(parse(&v).unwrap().version, None);
        let v = with(0x800, b"\x01bad\0");
        assert_eq!(parse(&v).unwrap().version, None);
        for e in [
            BzImageError::NotLinux,
            bad("x", 1),
            BzImageError::TooShort { len: 1 },
        ] {
            assert!(!alloc::format!("{e}").is_empty());
        }
    }

    /// Mutations of every header byte and random bytes: never a panic; an
    /// accepted image always satisfies the invariants the loader relies on.
    #[test]
    fn mutated_images_never_panic() {
        let good = test_image(b"\xf4");
        let mut rng = 0x3c6e_f372_fe94_f82bu64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let check = |img: &[u8]| {
            if let Ok(bz) = parse(img) {
                let h = bz.header;
                assert!(h.version >= MIN_PROTOCOL);
                assert!(h.kernel_alignment.is_power_of_two());
                assert!(u64::from(h.init_size) >= bz.kernel.len() as u64);
                assert!(h.header_end <= SETUP_HEADER_LIMIT);
                assert_eq!(bz.header_bytes.len(), h.header_end - SETUP_HEADER_OFFSET);
            }
        };
        for i in 0x1f0..0x270 {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut img = good.clone();
                img[i] = v;
                check(&img);
            }
        }
        for _ in 0..5000 {
            let mut img = good.clone();
            for _ in 0..(next() % 6 + 1) {
                let i = 0x1f0 + (next() as usize) % 0x80;
                img[i] = next() as u8;
            }
            if next() % 4 == 0 {
                img.truncate((next() as usize) % img.len());
            }
            check(&img);
        }
    }
}
