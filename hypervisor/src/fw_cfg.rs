//! QEMU's firmware configuration device (QEMU `docs/specs/fw_cfg.rst`): how
//! the runner hands a node its cluster key without putting it on the
//! command line, which `ps` shows every local user
//! (`-fw_cfg name=opt/hvmigrate/key,file=PATH`).
//!
//! The x86 interface: a 16-bit selector register at I/O port 0x510 picks an
//! item, and 8-bit reads of the data register at port 0x511 return its
//! bytes in order (past the end they read 0). Item 0x0000 is the signature
//! `"QEMU"`; item 0x0019 is the file directory: a big-endian `u32` count,
//! then 64-byte entries (`u32` size and `u16` selector, both big-endian, a
//! reserved `u16`, a NUL-terminated name of at most 56 bytes).
//!
//! The directory and file bytes come from the emulator, not a guest, but
//! are still parsed with checked lengths and bounded work: at most
//! [`MAX_FILES`] entries are looked at and a file larger than the caller's
//! limit is refused, not read. The ports are touched only when CPUID says a
//! hypervisor is present (bit 31 of leaf 1 ECX; QEMU sets it, bare metal
//! does not), so a real machine's ports 0x510/0x511 are left alone.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use x86_64::instructions::port::Port;

const SELECTOR_PORT: u16 = 0x510;
const DATA_PORT: u16 = 0x511;
const SELECT_SIGNATURE: u16 = 0x0000;
const SELECT_FILE_DIR: u16 = 0x0019;
const SIGNATURE: &[u8; 4] = b"QEMU";
const ENTRY_BYTES: usize = 64;
const NAME_BYTES: usize = 56;
/// Most directory entries looked at (QEMU's default is 32 slots, its
/// maximum 4096).
pub const MAX_FILES: u32 = 4096;
/// The cluster key's file name.
pub const KEY_FILE: &str = "opt/hvmigrate/key";
/// Largest key file read (a 64-byte key is 128 hex digits).
pub const KEY_FILE_MAX_BYTES: u32 = 1024;

/// Access to the device's two registers.
pub trait FwCfgIo {
    /// Select item `key` and rewind its read offset.
    fn select(&mut self, key: u16);
    /// The next byte of the selected item.
    fn read_byte(&mut self) -> u8;
}

/// Why a file could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FwCfgError {
    /// The file is larger than the caller accepts.
    TooLarge { size: u32, max: u32 },
}

impl fmt::Display for FwCfgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FwCfgError::TooLarge { size, max } => {
                write!(f, "{size} bytes, more than the {max} accepted")
            }
        }
    }
}

/// The device, if `io` answers with QEMU's signature.
pub struct FwCfg<I: FwCfgIo> {
    io: I,
}

impl<I: FwCfgIo> FwCfg<I> {
    /// `Some` when the signature item reads `"QEMU"`.
    pub fn probe(mut io: I) -> Option<Self> {
        io.select(SELECT_SIGNATURE);
        let mut sig = [0u8; 4];
        sig.iter_mut().for_each(|b| *b = io.read_byte());
        (&sig == SIGNATURE).then_some(Self { io })
    }

    fn read_into(&mut self, buf: &mut [u8]) {
        buf.iter_mut().for_each(|b| *b = self.io.read_byte());
    }

    /// The selector and size of file `name`, from the directory.
    pub fn find(&mut self, name: &str) -> Option<(u16, u32)> {
        if name.len() >= NAME_BYTES {
            return None;
        }
        self.io.select(SELECT_FILE_DIR);
        let mut count = [0u8; 4];
        self.read_into(&mut count);
        let count = u32::from_be_bytes(count).min(MAX_FILES);
        let mut entry = [0u8; ENTRY_BYTES];
        for _ in 0..count {
            self.read_into(&mut entry);
            let raw_name = &entry[8..];
            let len = raw_name.iter().position(|b| *b == 0).unwrap_or(NAME_BYTES);
            if &raw_name[..len] == name.as_bytes() {
                let size = u32::from_be_bytes([entry[0], entry[1], entry[2], entry[3]]);
                let select = u16::from_be_bytes([entry[4], entry[5]]);
                return Some((select, size));
            }
        }
        None
    }

    /// The bytes of file `name`: `Ok(None)` when there is no such file.
    pub fn read_file(&mut self, name: &str, max_bytes: u32) -> Result<Option<Vec<u8>>, FwCfgError> {
        let Some((select, size)) = self.find(name) else {
            return Ok(None);
        };
        if size > max_bytes {
            return Err(FwCfgError::TooLarge {
                size,
                max: max_bytes,
            });
        }
        self.io.select(select);
        let mut bytes = vec![0u8; size as usize];
        self.read_into(&mut bytes);
        Ok(Some(bytes))
    }
}

/// The registers at ports 0x510/0x511.
pub struct PortIo(());

impl FwCfgIo for PortIo {
    fn select(&mut self, key: u16) {
        // SAFETY: only reached through `cluster_key`, after CPUID reported a
        // hypervisor (QEMU's fw_cfg ports on its `pc` and `q35` machines);
        // the selector write has no side effect beyond choosing the item.
        unsafe { Port::<u16>::new(SELECTOR_PORT).write(key) }
    }
    fn read_byte(&mut self) -> u8 {
        // SAFETY: as in `select`: reading the data register only advances
        // the item's read offset.
        unsafe { Port::<u8>::new(DATA_PORT).read() }
    }
}

/// Whether CPUID reports a hypervisor (CPUID.01H:ECX[31], reserved for
/// this use by Intel and AMD).
fn under_hypervisor() -> bool {
    crate::cpu::cpuid(1, 0).ecx & (1 << 31) != 0
}

/// The cluster key file's text (whitespace trimmed), when the node runs
/// under QEMU and was given one. Problems are logged, never fatal: the
/// service then reports that it has no key.
pub fn cluster_key() -> Option<alloc::string::String> {
    if !under_hypervisor() {
        return None;
    }
    let mut fw = FwCfg::probe(PortIo(()))?;
    key_from(&mut fw)
}

fn key_from<I: FwCfgIo>(fw: &mut FwCfg<I>) -> Option<alloc::string::String> {
    match fw.read_file(KEY_FILE, KEY_FILE_MAX_BYTES) {
        Ok(Some(bytes)) => match core::str::from_utf8(&bytes) {
            Ok(text) => Some(text.trim().into()),
            Err(_) => {
                log::error!("fw_cfg: {KEY_FILE} is not text; ignored");
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            log::error!("fw_cfg: {KEY_FILE}: {e}; ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;

    /// The device as QEMU models it: items by selector, a read offset that
    /// a selection rewinds, zeros past an item's end.
    #[derive(Default)]
    struct FakeDevice {
        items: BTreeMap<u16, Vec<u8>>,
        selected: u16,
        offset: usize,
        reads: usize,
    }

    impl FwCfgIo for &mut FakeDevice {
        fn select(&mut self, key: u16) {
            self.selected = key;
            self.offset = 0;
        }
        fn read_byte(&mut self) -> u8 {
            self.reads += 1;
            let b = self
                .items
                .get(&self.selected)
                .and_then(|i| i.get(self.offset))
                .copied()
                .unwrap_or(0);
            self.offset += 1;
            b
        }
    }

    fn entry(size: u32, select: u16, name: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&size.to_be_bytes());
        e.extend_from_slice(&select.to_be_bytes());
        e.extend_from_slice(&[0, 0]);
        let mut n = [0u8; NAME_BYTES];
        n[..name.len()].copy_from_slice(name);
        e.extend_from_slice(&n);
        e
    }

    fn device(files: &[(&[u8], u16, &[u8])], claimed_count: Option<u32>) -> FakeDevice {
        let mut d = FakeDevice::default();
        d.items.insert(SELECT_SIGNATURE, b"QEMU".to_vec());
        let mut dir = claimed_count
            .unwrap_or(files.len() as u32)
            .to_be_bytes()
            .to_vec();
        for (name, sel, data) in files {
            dir.extend(entry(data.len() as u32, *sel, name));
            d.items.insert(*sel, data.to_vec());
        }
        d.items.insert(SELECT_FILE_DIR, dir);
        d
    }

    #[test]
    fn finds_and_reads_the_key_file() {
        let key = b"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
        let mut d = device(
            &[
                (b"etc/boot-fail-wait", 0x20, &[1, 0, 0, 0]),
                (b"opt/hvmigrate/key", 0x21, key),
            ],
            None,
        );
        let mut fw = FwCfg::probe(&mut d).expect("signature");
        assert_eq!(fw.find("etc/boot-fail-wait"), Some((0x20, 4)));
        assert_eq!(
            key_from(&mut fw).as_deref(),
            Some("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
        );
        assert_eq!(fw.find("opt/hvmigrate"), None, "no prefix matches");
        assert_eq!(fw.read_file("opt/other", 100), Ok(None));
    }

    #[test]
    fn no_device_no_file_or_bad_files() {
        // Not QEMU: ports that read all-ones or zeros.
        let mut none = FakeDevice::default();
        assert!(FwCfg::probe(&mut none).is_none());
        // No key file.
        let mut d = device(&[(b"etc/x", 0x20, b"1")], None);
        assert_eq!(key_from(&mut FwCfg::probe(&mut d).unwrap()), None);
        // Too large: refused before any of it is read.
        let big = vec![b'a'; 5000];
        let mut d = device(&[(b"opt/hvmigrate/key", 0x20, &big)], None);
        {
            let mut fw = FwCfg::probe(&mut d).unwrap();
            assert_eq!(
                fw.read_file(KEY_FILE, KEY_FILE_MAX_BYTES),
                Err(FwCfgError::TooLarge {
                    size: 5000,
                    max: KEY_FILE_MAX_BYTES
                })
            );
            assert_eq!(key_from(&mut fw), None);
        }
        assert!(d.reads < 1000, "{} bytes read", d.reads);
        // Not text.
        let mut d = device(&[(b"opt/hvmigrate/key", 0x20, &[0xff, 0xfe])], None);
        assert_eq!(key_from(&mut FwCfg::probe(&mut d).unwrap()), None);
    }

    #[test]
    fn a_lying_directory_costs_bounded_work() {
        // Claims four billion entries; only MAX_FILES are looked at.
        let mut d = device(&[(b"etc/x", 0x20, b"1")], Some(u32::MAX));
        assert_eq!(
            FwCfg::probe(&mut d).unwrap().find("opt/hvmigrate/key"),
            None
        );
        assert!(
            d.reads <= 8 + (MAX_FILES as usize) * ENTRY_BYTES,
            "{}",
            d.reads
        );
        // A name without its NUL fills all 56 bytes and still compares.
        let long = [b'n'; NAME_BYTES];
        let mut d = device(&[(&long, 0x20, b"v")], None);
        let mut fw = FwCfg::probe(&mut d).unwrap();
        let name = core::str::from_utf8(&long).unwrap();
        assert_eq!(fw.find(name), None, "56 bytes is too long to be a name");
        assert_eq!(fw.find(&name[..55]), None);
    }
}
