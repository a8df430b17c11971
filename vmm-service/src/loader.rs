//! Guest kernel loader: an ELF64 x86-64 executable into guest RAM.
//!
//! The image is an allegation (it came from a boot module): the `elf` crate
//! bounds-checks every table against the byte slice, and this module checks
//! what the crate does not know about, namely that every `PT_LOAD` segment
//! lies inside guest RAM at or above [`GUEST_KERNEL_MIN_GPA`], does not
//! overlap another, has `p_filesz <= p_memsz`, file bytes inside the image,
//! and is linked for the identity map the guest starts on (`p_vaddr ==
//! p_paddr`); and that the entry point lies in an executable segment.
//! Segments are copied by `p_paddr` through [`GuestMemory`]; the part of
//! `p_memsz` past `p_filesz` (bss) is zero-filled.
//!
//! ELF format: System V ABI, "Object Files" and "Program Loading" chapters.
//!
//! Linux guests are loaded by [`linux`] (bzImage, [`bzimage`] parses its
//! setup header) instead.

pub mod bzimage;
pub mod linux;

use alloc::string::{String, ToString};
use core::fmt;
use elf::abi::{EM_X86_64, ET_EXEC, PF_X, PT_LOAD};
use elf::endian::LittleEndian;
use elf::file::Class;
use elf::segment::ProgramHeader;
use elf::ElfBytes;
use hvcore::abi::GUEST_KERNEL_MIN_GPA;
use hvcore::addr::Gpa;
use hvcore::mem::{GuestMemory, MemError};

/// Most program headers an image may have.
pub const MAX_PROGRAM_HEADERS: usize = 64;
/// Most `PT_LOAD` segments an image may have.
pub const MAX_LOAD_SEGMENTS: usize = 16;

/// Why an image could not be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// Not a well-formed ELF file (the parser's finding, as text).
    Malformed(String),
    /// ELF, but not 64-bit.
    NotElf64,
    /// Not an x86-64 image (`e_machine` given).
    WrongMachine(u16),
    /// Not an executable (`e_type` given): relocatable and shared objects
    /// cannot be loaded at fixed physical addresses.
    NotExecutable(u16),
    /// More program headers than [`MAX_PROGRAM_HEADERS`].
    TooManyProgramHeaders(usize),
    /// More `PT_LOAD` segments than [`MAX_LOAD_SEGMENTS`].
    TooManyLoadSegments,
    /// No `PT_LOAD` segment at all.
    NoLoadSegments,
    /// A segment with more file bytes than memory bytes.
    FileSizeOverMemSize {
        index: usize,
        filesz: u64,
        memsz: u64,
    },
    /// A segment whose file bytes lie outside the image.
    FileRangeOutsideImage {
        index: usize,
        offset: u64,
        filesz: u64,
        image_len: usize,
    },
    /// A segment below [`GUEST_KERNEL_MIN_GPA`].
    BelowMinimum { index: usize, paddr: u64 },
    /// A segment reaching past guest RAM.
    OutsideRam {
        index: usize,
        paddr: u64,
        memsz: u64,
        ram_bytes: u64,
    },
    /// A segment whose virtual and physical addresses differ.
    NotIdentityLinked {
        index: usize,
        vaddr: u64,
        paddr: u64,
    },
    /// Two segments overlap in guest memory.
    Overlap { first: usize, second: usize },
    /// The entry point is not inside an executable segment.
    EntryOutsideCode { entry: u64 },
    /// Writing guest memory failed.
    Memory(MemError),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Malformed(e) => write!(f, "malformed ELF: {e}"),
            LoadError::NotElf64 => write!(f, "not a 64-bit ELF"),
            LoadError::WrongMachine(m) => write!(f, "ELF machine {m} is not x86-64 ({EM_X86_64})"),
            LoadError::NotExecutable(t) => {
                write!(f, "ELF type {t} is not an executable (ET_EXEC); link the kernel statically at fixed addresses")
            }
            LoadError::TooManyProgramHeaders(n) => {
                write!(f, "{n} program headers (at most {MAX_PROGRAM_HEADERS})")
            }
            LoadError::TooManyLoadSegments => {
                write!(f, "more than {MAX_LOAD_SEGMENTS} PT_LOAD segments")
            }
            LoadError::NoLoadSegments => write!(f, "no PT_LOAD segment"),
            LoadError::FileSizeOverMemSize { index, filesz, memsz } => write!(
                f,
                "segment {index}: p_filesz {filesz:#x} is larger than p_memsz {memsz:#x}"
            ),
            LoadError::FileRangeOutsideImage { index, offset, filesz, image_len } => write!(
                f,
                "segment {index}: file bytes {offset:#x}+{filesz:#x} outside the {image_len}-byte image"
            ),
            LoadError::BelowMinimum { index, paddr } => write!(
                f,
                "segment {index}: p_paddr {paddr:#x} is below the lowest kernel address {GUEST_KERNEL_MIN_GPA:#x}"
            ),
            LoadError::OutsideRam { index, paddr, memsz, ram_bytes } => write!(
                f,
                "segment {index}: {paddr:#x}+{memsz:#x} does not fit in {} MiB of guest RAM",
                ram_bytes >> 20
            ),
            LoadError::NotIdentityLinked { index, vaddr, paddr } => write!(
                f,
                "segment {index}: p_vaddr {vaddr:#x} != p_paddr {paddr:#x} (the guest starts identity-mapped)"
            ),
            LoadError::Overlap { first, second } => {
                write!(f, "segments {first} and {second} overlap")
            }
            LoadError::EntryOutsideCode { entry } => {
                write!(f, "entry point {entry:#x} is not inside an executable PT_LOAD segment")
            }
            LoadError::Memory(e) => write!(f, "writing guest memory: {e}"),
        }
    }
}

impl From<MemError> for LoadError {
    fn from(e: MemError) -> Self {
        LoadError::Memory(e)
    }
}

/// What was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Entry point (a GPA: the guest starts identity-mapped).
    pub entry: u64,
    /// First byte after the highest loaded segment.
    pub end_gpa: u64,
    /// Number of `PT_LOAD` segments copied.
    pub segments: usize,
}

/// A checked `PT_LOAD` segment.
#[derive(Clone, Copy, Debug)]
struct Segment {
    index: usize,
    offset: usize,
    filesz: usize,
    paddr: u64,
    end: u64,
    exec: bool,
}

/// Validate `image` against a guest of `ram_bytes` without writing anything.
pub fn check(image: &[u8], ram_bytes: u64) -> Result<LoadedKernel, LoadError> {
    let mut segs = [None; MAX_LOAD_SEGMENTS];
    let (kernel, _) = parse(image, ram_bytes, &mut segs)?;
    Ok(kernel)
}

/// Validate `image` and copy its segments into `mem`.
pub fn load(image: &[u8], mem: &mut dyn GuestMemory) -> Result<LoadedKernel, LoadError> {
    let mut segs = [None; MAX_LOAD_SEGMENTS];
    let (kernel, n) = parse(image, mem.ram_bytes(), &mut segs)?;
    static ZEROS: [u8; 4096] = [0; 4096];
    for seg in segs.iter().take(n).flatten() {
        // In bounds: checked in `parse`.
        let bytes = image.get(seg.offset..seg.offset + seg.filesz).ok_or(
            LoadError::FileRangeOutsideImage {
                index: seg.index,
                offset: seg.offset as u64,
                filesz: seg.filesz as u64,
                image_len: image.len(),
            },
        )?;
        mem.write(Gpa(seg.paddr), bytes)?;
        let mut gpa = seg.paddr + seg.filesz as u64;
        while gpa < seg.end {
            let chunk = (seg.end - gpa).min(ZEROS.len() as u64);
            mem.write(Gpa(gpa), &ZEROS[..chunk as usize])?;
            gpa += chunk;
        }
    }
    Ok(kernel)
}

fn parse(
    image: &[u8],
    ram_bytes: u64,
    segs: &mut [Option<Segment>; MAX_LOAD_SEGMENTS],
) -> Result<(LoadedKernel, usize), LoadError> {
    let file = ElfBytes::<LittleEndian>::minimal_parse(image).map_err(malformed)?;
    let ehdr = &file.ehdr;
    if ehdr.class != Class::ELF64 {
        return Err(LoadError::NotElf64);
    }
    if ehdr.e_machine != EM_X86_64 {
        return Err(LoadError::WrongMachine(ehdr.e_machine));
    }
    if ehdr.e_type != ET_EXEC {
        return Err(LoadError::NotExecutable(ehdr.e_type));
    }
    let table = file.segments().ok_or(LoadError::NoLoadSegments)?;
    if table.len() > MAX_PROGRAM_HEADERS {
        return Err(LoadError::TooManyProgramHeaders(table.len()));
    }
    let mut n = 0;
    for index in 0..table.len() {
        let ph = table.get(index).map_err(malformed)?;
        if ph.p_type != PT_LOAD || ph.p_memsz == 0 {
            continue;
        }
        let seg = check_segment(index, &ph, image.len(), ram_bytes)?;
        let slot = segs.get_mut(n).ok_or(LoadError::TooManyLoadSegments)?;
        *slot = Some(seg);
        n += 1;
    }
    if n == 0 {
        return Err(LoadError::NoLoadSegments);
    }
    let loaded = &segs[..n];
    for (i, a) in loaded.iter().flatten().enumerate() {
        for b in loaded[i + 1..].iter().flatten() {
            if a.paddr < b.end && b.paddr < a.end {
                return Err(LoadError::Overlap {
                    first: a.index,
                    second: b.index,
                });
            }
        }
    }
    let entry = ehdr.e_entry;
    let in_code = loaded
        .iter()
        .flatten()
        .any(|s| s.exec && s.paddr <= entry && entry < s.end);
    if !in_code {
        return Err(LoadError::EntryOutsideCode { entry });
    }
    let end_gpa = loaded.iter().flatten().map(|s| s.end).max().unwrap_or(0);
    Ok((
        LoadedKernel {
            entry,
            end_gpa,
            segments: n,
        },
        n,
    ))
}

fn malformed(e: elf::ParseError) -> LoadError {
    LoadError::Malformed(e.to_string())
}

fn check_segment(
    index: usize,
    ph: &ProgramHeader,
    image_len: usize,
    ram_bytes: u64,
) -> Result<Segment, LoadError> {
    if ph.p_filesz > ph.p_memsz {
        return Err(LoadError::FileSizeOverMemSize {
            index,
            filesz: ph.p_filesz,
            memsz: ph.p_memsz,
        });
    }
    let outside = LoadError::FileRangeOutsideImage {
        index,
        offset: ph.p_offset,
        filesz: ph.p_filesz,
        image_len,
    };
    let offset = usize::try_from(ph.p_offset).map_err(|_| outside.clone())?;
    let filesz = usize::try_from(ph.p_filesz).map_err(|_| outside.clone())?;
    match offset.checked_add(filesz) {
        Some(end) if end <= image_len => {}
        _ => return Err(outside),
    }
    if ph.p_vaddr != ph.p_paddr {
        return Err(LoadError::NotIdentityLinked {
            index,
            vaddr: ph.p_vaddr,
            paddr: ph.p_paddr,
        });
    }
    if ph.p_paddr < GUEST_KERNEL_MIN_GPA {
        return Err(LoadError::BelowMinimum {
            index,
            paddr: ph.p_paddr,
        });
    }
    let end = match ph.p_paddr.checked_add(ph.p_memsz) {
        Some(end) if end <= ram_bytes => end,
        _ => {
            return Err(LoadError::OutsideRam {
                index,
                paddr: ph.p_paddr,
                memsz: ph.p_memsz,
                ram_bytes,
            })
        }
    };
    Ok(Segment {
        index,
        offset,
        filesz,
        paddr: ph.p_paddr,
        end,
        exec: ph.p_flags & PF_X != 0,
    })
}

/// Build small ELF images for tests (here and in other modules) and the
/// test doubles (`testing`).
#[cfg(any(test, feature = "testing"))]
pub(crate) mod build {
    use alloc::vec::Vec;

    /// One program header to emit.
    #[derive(Clone, Copy)]
    pub struct Ph {
        pub p_type: u32,
        pub flags: u32,
        pub paddr: u64,
        pub vaddr: u64,
        pub data: &'static [u8],
        pub memsz: u64,
    }

    impl Ph {
        pub fn load(paddr: u64, data: &'static [u8], memsz: u64, flags: u32) -> Self {
            Ph {
                p_type: 1,
                flags,
                paddr,
                vaddr: paddr,
                data,
                memsz,
            }
        }
    }

    /// An ELF64 LE x86-64 executable with `phs` and entry `entry`; segment
    /// data follows the program header table.
    pub fn elf(entry: u64, phs: &[Ph]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&2u16.to_le_bytes()); // e_type ET_EXEC
        out.extend_from_slice(&62u16.to_le_bytes()); // e_machine x86-64
        out.extend_from_slice(&1u32.to_le_bytes()); // e_version
        out.extend_from_slice(&entry.to_le_bytes());
        out.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        out.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
        out.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
        out.extend_from_slice(&(phs.len() as u16).to_le_bytes());
        out.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
        out.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
        out.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
        assert_eq!(out.len(), 64);
        let mut data_off = 64 + 56 * phs.len() as u64;
        for ph in phs {
            out.extend_from_slice(&ph.p_type.to_le_bytes());
            out.extend_from_slice(&ph.flags.to_le_bytes());
            out.extend_from_slice(&data_off.to_le_bytes());
            out.extend_from_slice(&ph.vaddr.to_le_bytes());
            out.extend_from_slice(&ph.paddr.to_le_bytes());
            out.extend_from_slice(&(ph.data.len() as u64).to_le_bytes());
            out.extend_from_slice(&ph.memsz.to_le_bytes());
            out.extend_from_slice(&0x1000u64.to_le_bytes());
            data_off += ph.data.len() as u64;
        }
        for ph in phs {
            out.extend_from_slice(ph.data);
        }
        out
    }

    /// A minimal valid kernel: code at 1 MiB, data + bss at 2 MiB.
    pub fn kernel() -> Vec<u8> {
        elf(
            0x10_0000,
            &[
                Ph::load(0x10_0000, &[0xf4, 0xeb, 0xfd], 0x10, 5),
                Ph::load(0x20_0000, b"data!", 0x3000, 6),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::build::{elf, kernel, Ph};
    use super::*;
    use crate::testing::FakeMemory;

    const RAM: u64 = 4 << 20;

    #[test]
    fn loads_segments_and_zeroes_bss() {
        let mut mem = FakeMemory::new(RAM);
        // Dirty the bss region first: the loader must zero it.
        mem.write(Gpa(0x20_0000), &[0xaa; 0x3000]).unwrap();
        let k = load(&kernel(), &mut mem).unwrap();
        assert_eq!(
            k,
            LoadedKernel {
                entry: 0x10_0000,
                end_gpa: 0x20_3000,
                segments: 2
            }
        );
        assert_eq!(&mem.bytes()[0x10_0000..0x10_0004], &[0xf4, 0xeb, 0xfd, 0]);
        assert_eq!(&mem.bytes()[0x20_0000..0x20_0005], b"data!");
        assert!(mem.bytes()[0x20_0005..0x20_3000].iter().all(|&b| b == 0));
        assert_eq!(mem.bytes()[0x20_3000], 0);
        assert_eq!(check(&kernel(), RAM), Ok(k));
    }

    #[test]
    fn non_load_and_empty_segments_are_skipped() {
        let img = elf(
            0x10_0000,
            &[
                Ph {
                    p_type: 4,
                    ..Ph::load(0, b"note", 4, 4)
                },
                Ph::load(0x30_0000, b"", 0, 6),
                Ph::load(0x10_0000, b"\xf4", 1, 5),
            ],
        );
        assert_eq!(check(&img, RAM).unwrap().segments, 1);
    }

    fn err(img: &[u8]) -> LoadError {
        let mut mem = FakeMemory::new(RAM);
        let e = load(img, &mut mem).unwrap_err();
        assert!(
            mem.bytes().iter().all(|&b| b == 0),
            "nothing written on error"
        );
        e
    }

    #[test]
    fn rejects_bad_images() {
        let code = |paddr| Ph::load(paddr, b"\xf4", 1, 5);
        assert!(matches!(err(b""), LoadError::Malformed(_)));
        assert!(matches!(err(b"\x7fELF"), LoadError::Malformed(_)));
        assert!(matches!(err(&[0u8; 64]), LoadError::Malformed(_)));
        let mut img = kernel();
        img[18] = 3; // e_machine i386
        assert_eq!(err(&img), LoadError::WrongMachine(3));
        let mut img = kernel();
        img[16] = 3; // ET_DYN
        assert_eq!(err(&img), LoadError::NotExecutable(3));
        let mut img = kernel();
        img[4] = 1; // ELFCLASS32
        assert!(matches!(
            err(&img),
            LoadError::Malformed(_) | LoadError::NotElf64
        ));
        assert_eq!(err(&elf(0x10_0000, &[])), LoadError::NoLoadSegments);
        assert_eq!(
            err(&elf(0x1000, &[code(0x1000)])),
            LoadError::BelowMinimum {
                index: 0,
                paddr: 0x1000
            }
        );
        assert!(matches!(
            err(&elf(RAM - 1, &[Ph::load(RAM - 1, b"\xf4", 2, 5)])),
            LoadError::OutsideRam { .. }
        ));
        assert!(matches!(
            err(&elf(
                0x10_0000,
                &[Ph::load(0x10_0000, b"\xf4", u64::MAX, 5)]
            )),
            LoadError::OutsideRam { .. }
        ));
        assert!(matches!(
            err(&elf(0x10_0000, &[Ph::load(0x10_0000, b"abcd", 2, 5)])),
            LoadError::FileSizeOverMemSize { .. }
        ));
        assert_eq!(
            err(&elf(
                0x10_0000,
                &[Ph {
                    vaddr: 0xffff_8000_0010_0000,
                    ..code(0x10_0000)
                }]
            )),
            LoadError::NotIdentityLinked {
                index: 0,
                vaddr: 0xffff_8000_0010_0000,
                paddr: 0x10_0000
            }
        );
        assert_eq!(
            err(&elf(
                0x10_0000,
                &[Ph::load(0x10_0000, b"\xf4", 0x2000, 5), code(0x10_1000)]
            )),
            LoadError::Overlap {
                first: 0,
                second: 1
            }
        );
        assert_eq!(
            err(&elf(0x20_0000, &[code(0x10_0000)])),
            LoadError::EntryOutsideCode { entry: 0x20_0000 }
        );
        // Entry in a non-executable segment.
        assert!(matches!(
            err(&elf(0x10_0000, &[Ph::load(0x10_0000, b"\xf4", 1, 6)])),
            LoadError::EntryOutsideCode { .. }
        ));
        // File bytes past the end of the image.
        let mut img = kernel();
        let off = 64 + 8; // p_offset of segment 0
        let past = img.len() as u64 - 1;
        img[off..off + 8].copy_from_slice(&past.to_le_bytes());
        assert!(matches!(err(&img), LoadError::FileRangeOutsideImage { .. }));
        // Truncated program header table.
        let img = kernel();
        assert!(matches!(err(&img[..100]), LoadError::Malformed(_)));
        // Too many segments.
        let many: alloc::vec::Vec<Ph> = (0..MAX_LOAD_SEGMENTS as u64 + 1)
            .map(|i| code(0x10_0000 + i * 0x1000))
            .collect();
        assert_eq!(err(&elf(0x10_0000, &many)), LoadError::TooManyLoadSegments);
        let many: alloc::vec::Vec<Ph> = (0..MAX_PROGRAM_HEADERS + 1)
            .map(|_| Ph {
                p_type: 4,
                ..code(0)
            })
            .collect();
        assert_eq!(
            err(&elf(0x10_0000, &many)),
            LoadError::TooManyProgramHeaders(65)
        );
        // Every error has a message.
        assert!(!alloc::format!("{}", err(b"")).is_empty());
    }

    /// Mutate every byte of the headers of a valid image (and random bytes
    /// elsewhere) and load the result: an error or a load within RAM, never
    /// a panic.
    #[test]
    fn mutated_images_never_panic() {
        let good = kernel();
        let header_len = 64 + 56 * 2;
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut images = alloc::vec::Vec::new();
        for i in 0..header_len {
            for v in [0x00, 0xff, 0x80, 0x01, 0x7f] {
                let mut img = good.clone();
                img[i] = v;
                images.push(img);
            }
        }
        for _ in 0..2000 {
            let mut img = good.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % img.len();
                img[i] = next() as u8;
            }
            let cut = (next() as usize) % (img.len() + 1);
            if next() % 8 == 0 {
                img.truncate(cut);
            }
            images.push(img);
        }
        let mut ok = 0;
        for img in &images {
            let mut mem = FakeMemory::new(RAM);
            if let Ok(k) = load(img, &mut mem) {
                assert!(k.end_gpa <= RAM && k.entry >= GUEST_KERNEL_MIN_GPA);
                ok += 1;
            }
        }
        assert!(ok > 0 && ok < images.len());
    }
}
