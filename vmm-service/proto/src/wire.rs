//! Framing: every message is a 4-byte big-endian body length followed by the
//! body. Bodies are at most [`FRAME_BODY_MAX`] bytes; a longer length prefix
//! means the peer is broken or hostile, and the stream cannot be resynced,
//! so the decoder reports it once and the connection is closed.

use alloc::vec::Vec;
use core::fmt;

/// Largest frame body accepted or produced.
pub const FRAME_BODY_MAX: usize = 64 * 1024;
/// Length of the length prefix.
pub const HEADER_BYTES: usize = 4;

/// Framing errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// A length prefix above [`FRAME_BODY_MAX`].
    TooLong { len: u64 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLong { len } => write!(
                f,
                "frame of {len} bytes is longer than the limit of {FRAME_BODY_MAX}"
            ),
        }
    }
}

/// Append one frame holding `body` to `out`. Bodies longer than
/// [`FRAME_BODY_MAX`] are a caller bug on our side and are refused.
pub fn encode(body: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    if body.len() > FRAME_BODY_MAX {
        return Err(FrameError::TooLong {
            len: body.len() as u64,
        });
    }
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// Reassembles frames from a byte stream delivered in arbitrary pieces.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    failed: bool,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Append received bytes. Nothing is decoded here; call
    /// [`FrameDecoder::next_frame`]. The buffer holds at most one frame in
    /// progress plus what the caller pushes between two calls.
    pub fn push(&mut self, bytes: &[u8]) {
        if !self.failed {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete frame body, `Ok(None)` when more bytes are needed.
    /// After an error the decoder stays failed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.failed {
            return Err(FrameError::TooLong { len: 0 });
        }
        let Some(header) = self.buf.get(..HEADER_BYTES) else {
            return Ok(None);
        };
        let mut len_bytes = [0u8; HEADER_BYTES];
        len_bytes.copy_from_slice(header);
        let len = u32::from_be_bytes(len_bytes) as usize;
        if len > FRAME_BODY_MAX {
            self.failed = true;
            self.buf = Vec::new();
            return Err(FrameError::TooLong { len: len as u64 });
        }
        if self.buf.len() < HEADER_BYTES + len {
            return Ok(None);
        }
        let body = self.buf[HEADER_BYTES..HEADER_BYTES + len].to_vec();
        self.buf.drain(..HEADER_BYTES + len);
        Ok(Some(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_any_split() {
        let mut stream = Vec::new();
        encode(b"hello", &mut stream).unwrap();
        encode(b"", &mut stream).unwrap();
        encode(&[7u8; 300], &mut stream).unwrap();
        for piece in 1..stream.len() {
            let mut d = FrameDecoder::new();
            let mut frames = Vec::new();
            for chunk in stream.chunks(piece) {
                d.push(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    frames.push(f);
                }
            }
            assert_eq!(frames, [b"hello".to_vec(), Vec::new(), [7u8; 300].to_vec()]);
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn oversized_frames_are_refused_both_ways() {
        let mut out = Vec::new();
        assert!(encode(&alloc::vec![0; FRAME_BODY_MAX + 1], &mut out).is_err());
        assert!(out.is_empty());
        let mut d = FrameDecoder::new();
        d.push(&((FRAME_BODY_MAX as u32 + 1).to_be_bytes()));
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLong {
                len: FRAME_BODY_MAX as u64 + 1
            })
        );
        d.push(b"more");
        assert!(d.next_frame().is_err(), "a failed decoder stays failed");
        assert_eq!(d.buffered(), 0);
    }
}
