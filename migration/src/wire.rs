//! Little-endian field readers and writers for record payloads.
//!
//! Invariant: [`Reader`] never indexes out of bounds; every read is checked
//! and a short payload becomes [`StreamError::Truncated`] naming the field.

use crate::error::StreamError;
use alloc::vec::Vec;

/// A bounds-checked cursor over one record's payload.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    record: u64,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], record: u64) -> Self {
        Self {
            buf,
            pos: 0,
            record,
        }
    }

    pub(crate) fn record(&self) -> u64 {
        self.record
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    pub(crate) fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], StreamError> {
        let end = self.pos.checked_add(n).ok_or(StreamError::Truncated {
            record: self.record,
            field,
        })?;
        let out = self.buf.get(self.pos..end).ok_or(StreamError::Truncated {
            record: self.record,
            field,
        })?;
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], StreamError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N, field)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, StreamError> {
        Ok(self.array::<1>(field)?[0])
    }
    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, StreamError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, StreamError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, StreamError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// The payload must be fully consumed.
    pub(crate) fn finish(self, kind: &'static str) -> Result<(), StreamError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(StreamError::TrailingPayload {
                record: self.record,
                kind,
                extra,
            }),
        }
    }
}

pub(crate) fn put_u8(out: &mut Vec<u8>, v: u8) {
    out.push(v);
}
pub(crate) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
