//! A VM's port I/O bus: which device model answers which port.
//!
//! Accesses are split into byte accesses to consecutive ports, as an ISA bus
//! does with a wide access to byte-wide devices. A port no device claims
//! reads all-ones and drops writes (STYLE 4, rule 2): that is what a guest
//! probing absent hardware sees on a real machine. Port 0x80 (the POST code
//! port guests write as an I/O delay) is silently ignored.

use crate::uart::{LineSink, RestoreError, Uart16550};
use alloc::vec::Vec;
use hvcore::abi::COM1_PORT;

/// The BIOS POST diagnostic port.
pub const POST_PORT: u16 = 0x80;

/// The devices of one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Devices {
    /// COM1, the guest console.
    pub com1: Uart16550,
    /// Accesses to ports no device claims (for diagnostics).
    pub unclaimed_accesses: u64,
}

impl Devices {
    /// Fresh devices in their reset state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Guest `in` of `size` bytes (1, 2 or 4; anything else is treated as 4)
    /// from `port`. Unclaimed bytes read 0xff.
    pub fn io_in(&mut self, port: u16, size: u8) -> u32 {
        let mut value = 0u32;
        for i in 0..size.clamp(1, 4) {
            let byte = self.read_byte(port.wrapping_add(u16::from(i)));
            value |= u32::from(byte) << (8 * u32::from(i));
        }
        value
    }

    /// Guest `out` of the low `size` bytes of `value` to `port`.
    pub fn io_out(&mut self, port: u16, size: u8, value: u32, sink: &mut dyn LineSink) {
        for i in 0..size.clamp(1, 4) {
            let byte = (value >> (8 * u32::from(i))) as u8;
            self.write_byte(port.wrapping_add(u16::from(i)), byte, sink);
        }
    }

    /// Version byte at the start of [`Devices::save`] output.
    pub const SAVE_VERSION: u8 = 1;

    /// Serialise the device state: a version byte, then each device's own
    /// versioned state with a little-endian u16 length in front.
    pub fn save(&self) -> Vec<u8> {
        let com1 = self.com1.save();
        let mut out = Vec::with_capacity(3 + com1.len());
        out.push(Self::SAVE_VERSION);
        // A UART state is a few hundred bytes at most.
        out.extend_from_slice(&(com1.len() as u16).to_le_bytes());
        out.extend_from_slice(&com1);
        out
    }

    /// Rebuild the devices from [`Devices::save`] output; every byte is
    /// checked.
    pub fn restore(bytes: &[u8]) -> Result<Self, RestoreError> {
        let (&version, rest) = bytes.split_first().ok_or(RestoreError::Truncated)?;
        if version != Self::SAVE_VERSION {
            return Err(RestoreError::UnsupportedVersion(version));
        }
        let len = rest.get(..2).ok_or(RestoreError::Truncated)?;
        let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
        let com1 = rest.get(2..2 + len).ok_or(RestoreError::Truncated)?;
        let trailing = rest.len() - 2 - len;
        if trailing != 0 {
            return Err(RestoreError::TrailingBytes(trailing));
        }
        Ok(Self {
            com1: Uart16550::restore(com1)?,
            unclaimed_accesses: 0,
        })
    }

    fn com1_reg(port: u16) -> Option<u8> {
        let off = port.checked_sub(COM1_PORT)?;
        (off < Uart16550::PORTS).then_some(off as u8)
    }

    fn read_byte(&mut self, port: u16) -> u8 {
        if let Some(reg) = Self::com1_reg(port) {
            return self.com1.read(reg);
        }
        if port != POST_PORT {
            self.unclaimed(port);
        }
        0xff
    }

    fn write_byte(&mut self, port: u16, value: u8, sink: &mut dyn LineSink) {
        if let Some(reg) = Self::com1_reg(port) {
            self.com1.write(reg, value, sink);
        } else if port != POST_PORT {
            self.unclaimed(port);
        }
    }

    fn unclaimed(&mut self, port: u16) {
        self.unclaimed_accesses = self.unclaimed_accesses.saturating_add(1);
        log::trace!("unclaimed I/O port {port:#x}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use alloc::vec::Vec;

    #[derive(Default)]
    struct Lines(Vec<String>);
    impl LineSink for Lines {
        fn line(&mut self, line: &str) {
            self.0.push(line.into());
        }
    }

    #[test]
    fn unknown_ports_read_all_ones_and_drop_writes() {
        let mut d = Devices::new();
        let mut out = Lines::default();
        assert_eq!(d.io_in(0x60, 1), 0xff);
        assert_eq!(d.io_in(0x60, 2), 0xffff);
        assert_eq!(d.io_in(0xcf8, 4), 0xffff_ffff);
        d.io_out(0x21, 1, 0xff, &mut out);
        d.io_out(0xf4, 4, 0, &mut out);
        assert_eq!(d.unclaimed_accesses, 1 + 2 + 4 + 1 + 4);
        // POST port: quiet.
        d.io_out(POST_PORT, 1, 0x12, &mut out);
        assert_eq!(d.io_in(POST_PORT, 1), 0xff);
        assert_eq!(d.unclaimed_accesses, 12);
        assert_eq!(d.com1, Uart16550::new(), "no stray write reached COM1");
        assert!(out.0.is_empty());
    }

    #[test]
    fn save_restore() {
        let mut d = Devices::new();
        let mut out = Lines::default();
        for &b in b"abc" {
            d.io_out(COM1_PORT, 1, u32::from(b), &mut out);
        }
        d.io_out(COM1_PORT + 7, 1, 0x77, &mut out);
        let saved = d.save();
        let r = Devices::restore(&saved).unwrap();
        assert_eq!(r.com1, d.com1);
        for len in 0..saved.len() {
            assert!(Devices::restore(&saved[..len]).is_err());
        }
        let mut v = saved.clone();
        v.push(0);
        assert_eq!(Devices::restore(&v), Err(RestoreError::TrailingBytes(1)));
        let mut v = saved.clone();
        v[0] = 2;
        assert_eq!(
            Devices::restore(&v),
            Err(RestoreError::UnsupportedVersion(2))
        );
        let mut v = saved.clone();
        v[3] = 7; // the UART's own version byte
        assert_eq!(
            Devices::restore(&v),
            Err(RestoreError::UnsupportedVersion(7))
        );
        for i in 0..saved.len() {
            for bit in 0..8 {
                let mut v = saved.clone();
                v[i] ^= 1 << bit;
                let _ = Devices::restore(&v);
            }
        }
    }

    #[test]
    fn com1_is_on_its_ports() {
        let mut d = Devices::new();
        let mut out = Lines::default();
        for &b in b"hi\n" {
            d.io_out(COM1_PORT, 1, u32::from(b), &mut out);
        }
        assert_eq!(out.0, ["hi"]);
        assert_eq!(d.io_in(COM1_PORT + 5, 1) & 0x60, 0x60);
        // A word write to SCR and the port above it (past COM1's eight ports
        // at 0x3ff/0x400 boundary check): SCR gets the low byte only.
        d.io_out(COM1_PORT + 7, 2, 0xabcd, &mut out);
        assert_eq!(d.io_in(COM1_PORT + 7, 1), 0xcd);
        assert_eq!(d.io_in(COM1_PORT + 7, 2), 0xffcd);
        assert_eq!(d.unclaimed_accesses, 2);
    }
}
