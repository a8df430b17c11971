//! Versioned device state: the byte format every device model saves and
//! restores, and the checked reader that restores it.
//!
//! A device's state is a record `(kind, instance, version, payload)`:
//! `kind` names the model ([`DeviceKind`], numbers never reused), `instance`
//! tells two devices of one kind apart (COM1 is UART instance 0), `version`
//! is the payload format. The payload is the model's own little-endian field
//! list, written with [`StateWriter`] and read back with [`StateReader`],
//! which turns every short read, bad flag and leftover byte into a
//! [`StateError`] instead of a panic: saved state arrives over the
//! migration stream and is an allegation like any other guest-derived
//! input. A model checks each value it reads against what the device can
//! hold (register masks, FIFO caps) before accepting it, and on error
//! changes nothing.

use alloc::vec::Vec;
use core::fmt;

/// Device models, as numbered in saved state. Numbers are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeviceKind {
    /// 16550A UART.
    Uart16550,
    /// The two cascaded 8259A interrupt controllers and the ELCR.
    Pic,
    /// The 8254 interval timer and port 0x61 (speaker gate, OUT2).
    Pit,
    /// The MC146818 real-time clock and CMOS RAM.
    Rtc,
    /// The I/O APIC.
    IoApic,
    /// The local APIC of vCPU `instance`.
    Lapic,
    /// The ACPI fixed-hardware registers (PM1 event/control, PM timer).
    AcpiPm,
    /// A virtio-blk disk on virtio-mmio slot `instance`.
    VirtioBlk,
}

impl DeviceKind {
    /// Every kind, in saved-state order.
    pub const ALL: [DeviceKind; 8] = [
        DeviceKind::Uart16550,
        DeviceKind::Pic,
        DeviceKind::Pit,
        DeviceKind::Rtc,
        DeviceKind::IoApic,
        DeviceKind::Lapic,
        DeviceKind::AcpiPm,
        DeviceKind::VirtioBlk,
    ];

    /// The number in saved state.
    pub const fn code(self) -> u16 {
        match self {
            DeviceKind::Uart16550 => 1,
            DeviceKind::Pic => 2,
            DeviceKind::Pit => 3,
            DeviceKind::Rtc => 4,
            DeviceKind::IoApic => 5,
            DeviceKind::Lapic => 6,
            DeviceKind::AcpiPm => 7,
            DeviceKind::VirtioBlk => 8,
        }
    }

    /// The kind numbered `code`, if any.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }

    /// Its name in messages.
    pub const fn name(self) -> &'static str {
        match self {
            DeviceKind::Uart16550 => "16550 UART",
            DeviceKind::Pic => "8259 PIC",
            DeviceKind::Pit => "8254 PIT",
            DeviceKind::Rtc => "RTC/CMOS",
            DeviceKind::IoApic => "I/O APIC",
            DeviceKind::Lapic => "local APIC",
            DeviceKind::AcpiPm => "ACPI PM registers",
            DeviceKind::VirtioBlk => "virtio-blk",
        }
    }
}

/// Why saved device state was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateError {
    /// The state ended before all fields were read.
    Truncated,
    /// A format version this build does not read.
    UnsupportedVersion { what: &'static str, version: u32 },
    /// A length or count over its cap.
    LengthOverCap { what: &'static str, len: u64 },
    /// A field holding a value the device can never be in.
    BadValue { what: &'static str, value: u64 },
    /// Bytes after the last field.
    TrailingBytes(usize),
    /// A record of a kind this build does not know.
    UnknownKind(u16),
    /// A record for a device this machine cannot have (kind, instance).
    UnknownInstance { kind: u16, instance: u16 },
    /// Two records for the same device.
    Duplicate { kind: u16, instance: u16 },
    /// A device another one needs is missing (e.g. an I/O APIC without a
    /// local APIC).
    Incomplete(&'static str),
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Truncated => write!(f, "device state truncated"),
            StateError::UnsupportedVersion { what, version } => {
                write!(f, "{what} state version {version} is not supported")
            }
            StateError::LengthOverCap { what, len } => {
                write!(f, "device state: {what} length {len} over its cap")
            }
            StateError::BadValue { what, value } => {
                write!(f, "device state: invalid {what} {value:#x}")
            }
            StateError::TrailingBytes(n) => write!(f, "device state: {n} trailing bytes"),
            StateError::UnknownKind(k) => write!(f, "device state: unknown device kind {k}"),
            StateError::UnknownInstance { kind, instance } => {
                write!(
                    f,
                    "device state: no device kind {kind} instance {instance} on this machine"
                )
            }
            StateError::Duplicate { kind, instance } => {
                write!(
                    f,
                    "device state: two records for kind {kind} instance {instance}"
                )
            }
            StateError::Incomplete(what) => write!(f, "device state: {what}"),
        }
    }
}

/// Appends little-endian fields to a state buffer.
pub struct StateWriter<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> StateWriter<'a> {
    /// Write into `out` (appending).
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Self { out }
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.out.push(v);
        self
    }
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.out.extend_from_slice(v);
        self
    }
    /// An optional u64 as a flag byte and the value (0 when absent).
    pub fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        self.bool(v.is_some()).u64(v.unwrap_or(0))
    }
}

/// Reads fields written by [`StateWriter`], checking every one.
pub struct StateReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> StateReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }
    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let end = self.pos.checked_add(n).ok_or(StateError::Truncated)?;
        let s = self.bytes.get(self.pos..end).ok_or(StateError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A flag byte: 0 or 1, anything else is `BadValue(what)`.
    pub fn bool(&mut self, what: &'static str) -> Result<bool, StateError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(StateError::BadValue {
                what,
                value: u64::from(v),
            }),
        }
    }
    /// A byte whose bits outside `mask` must be clear.
    pub fn u8_masked(&mut self, what: &'static str, mask: u8) -> Result<u8, StateError> {
        let v = self.u8()?;
        if v & !mask != 0 {
            return Err(StateError::BadValue {
                what,
                value: u64::from(v),
            });
        }
        Ok(v)
    }
    /// A u32 whose bits outside `mask` must be clear.
    pub fn u32_masked(&mut self, what: &'static str, mask: u32) -> Result<u32, StateError> {
        let v = self.u32()?;
        if v & !mask != 0 {
            return Err(StateError::BadValue {
                what,
                value: u64::from(v),
            });
        }
        Ok(v)
    }
    /// An optional u64 written by [`StateWriter::opt_u64`].
    pub fn opt_u64(&mut self, what: &'static str) -> Result<Option<u64>, StateError> {
        let present = self.bool(what)?;
        let v = self.u64()?;
        match (present, v) {
            (true, v) => Ok(Some(v)),
            (false, 0) => Ok(None),
            (false, v) => Err(StateError::BadValue { what, value: v }),
        }
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }
    /// Succeeds only if every byte was read.
    pub fn finish(self) -> Result<(), StateError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(StateError::TrailingBytes(n)),
        }
    }
}

/// A version check: `Ok` if `version` is `expected`.
pub fn expect_version(what: &'static str, version: u16, expected: u16) -> Result<(), StateError> {
    if version == expected {
        Ok(())
    } else {
        Err(StateError::UnsupportedVersion {
            what,
            version: u32::from(version),
        })
    }
}

/// Saved-state behaviour shared by every device model (the interrupt
/// controllers too, which are not on the generic bus).
pub trait Snapshot {
    /// Which model this is.
    fn kind(&self) -> DeviceKind;
    /// Version of the payload [`Snapshot::save_state`] writes.
    fn state_version(&self) -> u16;
    /// Append the device's state.
    fn save_state(&self, out: &mut Vec<u8>);
    /// Replace the device's state with a saved one of `version`. Every
    /// field is checked; on error the device is unchanged.
    fn restore_state(&mut self, version: u16, bytes: &[u8]) -> Result<(), StateError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_are_distinct() {
        for k in DeviceKind::ALL {
            assert_eq!(DeviceKind::from_code(k.code()), Some(k));
            assert!(!k.name().is_empty());
        }
        let mut codes: Vec<u16> = DeviceKind::ALL.iter().map(|k| k.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), DeviceKind::ALL.len());
        assert_eq!(DeviceKind::from_code(0), None);
        assert_eq!(DeviceKind::from_code(999), None);
    }

    #[test]
    fn writer_and_reader_agree() {
        let mut buf = Vec::new();
        StateWriter::new(&mut buf)
            .u8(7)
            .bool(true)
            .u16(0xbeef)
            .u32(0xdead_beef)
            .u64(u64::MAX - 1)
            .opt_u64(Some(5))
            .opt_u64(None)
            .bytes(b"xy");
        let mut r = StateReader::new(&buf);
        assert_eq!(r.u8().unwrap(), 7);
        assert!(r.bool("b").unwrap());
        assert_eq!(r.u16().unwrap(), 0xbeef);
        assert_eq!(r.u32().unwrap(), 0xdead_beef);
        assert_eq!(r.u64().unwrap(), u64::MAX - 1);
        assert_eq!(r.opt_u64("o").unwrap(), Some(5));
        assert_eq!(r.opt_u64("o").unwrap(), None);
        assert_eq!(r.take(2).unwrap(), b"xy");
        assert_eq!(r.u8(), Err(StateError::Truncated));
        r.finish().unwrap();
    }

    #[test]
    fn reader_rejects_bad_fields() {
        assert_eq!(
            StateReader::new(&[2]).bool("flag"),
            Err(StateError::BadValue {
                what: "flag",
                value: 2
            })
        );
        assert!(StateReader::new(&[0x10]).u8_masked("m", 0x0f).is_err());
        assert!(StateReader::new(&[0, 1, 0, 0, 0, 0, 0, 0, 0])
            .opt_u64("o")
            .is_err());
        assert_eq!(
            StateReader::new(&[1, 2]).finish(),
            Err(StateError::TrailingBytes(2))
        );
        assert_eq!(StateReader::new(&[1]).u32(), Err(StateError::Truncated));
        let mut r = StateReader::new(&[1, 2, 3]);
        assert_eq!(r.take(usize::MAX), Err(StateError::Truncated));
        assert_eq!(r.remaining(), 3);
        assert!(expect_version("x", 2, 1).is_err());
        assert!(expect_version("x", 1, 1).is_ok());
        for e in [
            StateError::Truncated,
            StateError::UnknownKind(9),
            StateError::Incomplete("x"),
            StateError::Duplicate {
                kind: 1,
                instance: 0,
            },
        ] {
            assert!(!alloc::format!("{e}").is_empty());
        }
    }
}
