//! A fixed-capacity `fmt::Write` sink for messages built without a heap
//! (test-result messages are at most 256 bytes, see `HC_TEST_RESULT`).
//! Output that does not fit is cut at a UTF-8 character boundary, so the
//! contents are always valid UTF-8.

use core::fmt;

/// A string buffer of `N` bytes that silently truncates.
pub struct FmtBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> FmtBuf<N> {
    /// An empty buffer.
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
        }
    }

    /// The text written so far.
    pub fn as_str(&self) -> &str {
        // Only whole characters are ever copied in (see `write_str`).
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }

    /// The text written so far, as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> Default for FmtBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> fmt::Write for FmtBuf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = N - self.len;
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        // Truncation is not an error: a shortened message beats none.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn formats() {
        let mut b = FmtBuf::<32>::new();
        write!(b, "case {} at {:#x}", 7, 0x1000).unwrap();
        assert_eq!(b.as_str(), "case 7 at 0x1000");
    }

    #[test]
    fn truncates_at_capacity() {
        let mut b = FmtBuf::<4>::new();
        write!(b, "abcdef").unwrap();
        assert_eq!(b.as_str(), "abcd");
        write!(b, "more").unwrap();
        assert_eq!(b.as_bytes(), b"abcd");
    }

    #[test]
    fn never_splits_a_character() {
        let mut b = FmtBuf::<5>::new();
        // 'é' is two bytes: "abcd" + half of 'é' must not be stored.
        write!(b, "abcdé").unwrap();
        assert_eq!(b.as_str(), "abcd");
    }
}
