//! Sealed frames: the migration link's integrity and (optional)
//! confidentiality layer, between the authenticated handshake (the node's)
//! and the stream ([`crate::stream`]).
//!
//! # Wire format (docs/DESIGN.md, "Live migration between nodes")
//!
//! ```text
//! frame = len:u32 BE | kind:u8 | body (len bytes, at most FRAME_BODY_MAX) | tag:16
//! kind  = 1 control (a JSON message) | 2 stream bytes | 3 disk message (a
//!         shared-nothing migration's remote disk, the node's
//!         `migrate::remote_disk`), + 0x80 when `body` is ciphertext
//! tag   = ChaCha20-Poly1305 (RFC 8439) under the session key,
//!         nonce = direction ('C' source -> destination, 'S' back) 0 0 0 | seq:u64 BE,
//!         associated data = len | kind, and the body itself when not encrypted
//! ```
//!
//! `seq` counts the frames of one direction from 0, so a frame that is
//! altered, dropped, replayed, reordered, or reflected back to its sender
//! fails its tag; the session key is fresh per connection (both sides'
//! handshake nonces), so a frame of another migration fails too. The
//! stream's own CRCs stay: they name faults, the tags name tampering.
//!
//! Encryption is negotiated by the first control message (the source's
//! `open`): until [`Sealer::set_encrypt`] both directions are plaintext;
//! afterwards every frame must be encrypted exactly when the migration is,
//! so a frame that downgrades (or upgrades) is refused even though its
//! kind byte is authenticated anyway.
//!
//! Invariants: decoding never panics on bytes from the network; it holds
//! at most one partial frame, [`CONTROL_QUEUE_MAX`] control messages and
//! the stream bytes of the frames fed in one call; the first error poisons
//! the sealer (the connection cannot be trusted after it).

use crate::error::TransportError;
use crate::transport::Transport;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
use core::fmt;

/// Length of the frame header (`len` and `kind`).
pub const HEADER_BYTES: usize = 5;
/// Length of a frame's tag.
pub const TAG_BYTES: usize = 16;
/// Largest frame body.
pub const FRAME_BODY_MAX: usize = 64 * 1024;
/// Largest control message.
pub const CONTROL_MAX: usize = 16 * 1024;
/// Control messages received and not yet taken, at most.
pub const CONTROL_QUEUE_MAX: usize = 8;
/// Disk messages received and not yet taken, at most (the sender keeps
/// far fewer in flight: its window of unacknowledged disk bytes).
pub const DISK_QUEUE_MAX: usize = 256;
/// Bytes a frame adds to its body.
pub const FRAME_OVERHEAD: usize = HEADER_BYTES + TAG_BYTES;

const KIND_CONTROL: u8 = 1;
const KIND_STREAM: u8 = 2;
const KIND_DISK: u8 = 3;
const KIND_ENCRYPTED: u8 = 0x80;
/// Bytes pulled from the inner transport per receive.
const RECV_CHUNK: usize = 64 * 1024;

/// Which end of the link this sealer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The source (the connecting side): its frames use direction `C`.
    Source,
    /// The destination: direction `S`.
    Destination,
}

impl End {
    fn byte(self) -> u8 {
        match self {
            End::Source => b'C',
            End::Destination => b'S',
        }
    }
    fn peer(self) -> End {
        match self {
            End::Source => End::Destination,
            End::Destination => End::Source,
        }
    }
}

/// Why a received frame was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealError {
    /// A frame announced a body over [`FRAME_BODY_MAX`].
    TooLarge { frame: u64, len: u32 },
    /// Unknown frame kind.
    BadKind { frame: u64, kind: u8 },
    /// The tag did not verify: the frame was altered, replayed, reordered,
    /// reflected, or not sealed with this session's key.
    Integrity { frame: u64 },
    /// The frame's encryption differs from the migration's.
    Mode { frame: u64, encrypted: bool },
    /// A control message over [`CONTROL_MAX`], or more than
    /// [`CONTROL_QUEUE_MAX`] of them waiting.
    ControlOverflow { frame: u64 },
    /// More than [`DISK_QUEUE_MAX`] disk messages waiting.
    DiskOverflow { frame: u64 },
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SealError::TooLarge { frame, len } => write!(
                f,
                "sealed frame {frame}: body of {len} bytes exceeds {FRAME_BODY_MAX}"
            ),
            SealError::BadKind { frame, kind } => {
                write!(f, "sealed frame {frame}: unknown kind {kind:#04x}")
            }
            SealError::Integrity { frame } => write!(
                f,
                "integrity check failed on sealed frame {frame}: the stream was altered, \
                 replayed or reordered, or the peer does not hold the session key"
            ),
            SealError::Mode { frame, encrypted } => write!(
                f,
                "sealed frame {frame} is {} but the migration is {}",
                if *encrypted {
                    "encrypted"
                } else {
                    "not encrypted"
                },
                if *encrypted {
                    "not encrypted"
                } else {
                    "encrypted"
                }
            ),
            SealError::ControlOverflow { frame } => write!(
                f,
                "sealed frame {frame}: control message too large or too many waiting"
            ),
            SealError::DiskOverflow { frame } => {
                write!(f, "sealed frame {frame}: too many disk messages waiting")
            }
        }
    }
}

/// One end's sealing state: the session's cipher, both sequence numbers,
/// the negotiated mode and what was received.
///
/// Received bytes land once in `rx` (straight from the inner transport in
/// [`Sealer::pull`]); each complete frame's tag is checked there in place
/// (and a ciphertext body decrypted in place), and a stream frame's body is
/// then read from there by [`Sealer::read_stream`]: no copy between the
/// transport's bytes and the reader's buffer.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
    end: End,
    send_seq: u64,
    recv_seq: u64,
    encrypt: Option<bool>,
    /// Received bytes: `rx[..rx_len]` are valid, of which `rx[..checked]`
    /// are whole frames already verified; the rest is an incomplete frame.
    rx: Vec<u8>,
    rx_len: usize,
    checked: usize,
    /// Verified stream bodies in `rx` not yet read, in order (`start..end`).
    stream: VecDeque<(usize, usize)>,
    /// Bytes in `stream`.
    stream_len: usize,
    controls: VecDeque<Vec<u8>>,
    /// Disk messages received and not yet taken.
    disks: VecDeque<Vec<u8>>,
    error: Option<SealError>,
    /// Sealed frames of the last stream send (reused, never shrunk).
    tx: Vec<u8>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("end", &self.end)
            .field("send_seq", &self.send_seq)
            .field("recv_seq", &self.recv_seq)
            .field("encrypt", &self.encrypt)
            .finish()
    }
}

fn nonce(end: End, seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[0] = end.byte();
    n[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::from(n)
}

impl Sealer {
    /// A sealer for `end` under the 32-byte session `key`.
    pub fn new(key: &[u8; 32], end: End) -> Self {
        Self {
            cipher: ChaCha20Poly1305::new(key.into()),
            end,
            send_seq: 0,
            recv_seq: 0,
            encrypt: None,
            rx: Vec::new(),
            rx_len: 0,
            checked: 0,
            stream: VecDeque::new(),
            stream_len: 0,
            controls: VecDeque::new(),
            disks: VecDeque::new(),
            error: None,
            tx: Vec::new(),
        }
    }

    /// Fix the migration's mode: from now on frames in both directions are
    /// encrypted exactly when `on`.
    pub fn set_encrypt(&mut self, on: bool) {
        self.encrypt = Some(on);
    }

    /// Whether frames are encrypted (`None`: not negotiated yet).
    pub fn encrypted(&self) -> Option<bool> {
        self.encrypt
    }

    /// Append `payload` sealed as one or more frames of `kind` to `out`.
    fn seal(&mut self, kind: u8, payload: &[u8], out: &mut Vec<u8>) {
        let encrypt = self.encrypt == Some(true);
        // An empty payload still makes one frame (a control message is
        // never empty; stream sends of nothing make none).
        let mut pieces = payload.chunks(FRAME_BODY_MAX).peekable();
        if pieces.peek().is_none() {
            return;
        }
        for piece in pieces {
            let start = out.len();
            let kind = if encrypt { kind | KIND_ENCRYPTED } else { kind };
            out.extend_from_slice(&(piece.len() as u32).to_be_bytes());
            out.push(kind);
            out.extend_from_slice(piece);
            let n = nonce(self.end, self.send_seq);
            self.send_seq = self.send_seq.wrapping_add(1);
            let tag = if encrypt {
                let (header, body) = out[start..].split_at_mut(HEADER_BYTES);
                self.cipher.encrypt_in_place_detached(&n, header, body)
            } else {
                self.cipher
                    .encrypt_in_place_detached(&n, &out[start..], &mut [])
            };
            // Encryption fails only for messages beyond ChaCha20's 256 GiB
            // limit; a frame is at most 64 KiB.
            match tag {
                Ok(tag) => out.extend_from_slice(&tag),
                Err(_) => unreachable!("ChaCha20-Poly1305 seals any frame of at most 64 KiB"),
            }
        }
    }

    /// Append `message` sealed as one control frame (at most
    /// [`CONTROL_MAX`] bytes; the caller's messages are small).
    pub fn seal_control(&mut self, message: &[u8], out: &mut Vec<u8>) {
        self.seal(
            KIND_CONTROL,
            &message[..message.len().min(CONTROL_MAX)],
            out,
        );
    }

    /// Append `message` sealed as one disk frame (at most
    /// [`FRAME_BODY_MAX`] bytes; the caller's messages fit).
    pub fn seal_disk(&mut self, message: &[u8], out: &mut Vec<u8>) {
        self.seal(
            KIND_DISK,
            &message[..message.len().min(FRAME_BODY_MAX)],
            out,
        );
    }

    /// Append stream bytes sealed as frames.
    pub fn seal_stream(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.seal(KIND_STREAM, bytes, out);
    }

    /// Bytes the sealed form of `payload_bytes` of stream takes at most.
    pub fn sealed_len(payload_bytes: usize) -> usize {
        payload_bytes + payload_bytes.div_ceil(FRAME_BODY_MAX).max(1) * FRAME_OVERHEAD
    }

    /// Take received bytes: complete frames are checked and opened (stream
    /// bytes become readable, control messages queue); an incomplete one
    /// waits for more.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), SealError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.compact();
        let end = self.rx_len + bytes.len();
        if self.rx.len() < end {
            self.rx.resize(end, 0);
        }
        self.rx[self.rx_len..end].copy_from_slice(bytes);
        self.rx_len = end;
        self.decode_checked()
    }

    /// Drop what was read and checked from the front of `rx`, when that is
    /// at least as much as what is left (so each byte is moved at most
    /// about once, and `rx` stays within twice what it holds).
    fn compact(&mut self) {
        let head = self.stream.front().map_or(self.checked, |r| r.0);
        if head == 0 || head < self.rx_len - head {
            return;
        }
        self.rx.copy_within(head..self.rx_len, 0);
        self.rx_len -= head;
        self.checked -= head;
        for r in &mut self.stream {
            r.0 -= head;
            r.1 -= head;
        }
    }

    fn decode_checked(&mut self) -> Result<(), SealError> {
        let r = self.decode();
        if let Err(e) = r {
            // Poisoned: what was not checked is dropped; stream bytes
            // checked before stay readable.
            self.error = Some(e);
            self.rx_len = self.checked;
        }
        r
    }

    /// Check and open every complete frame behind `checked`, in place.
    fn decode(&mut self) -> Result<(), SealError> {
        loop {
            let pos = self.checked;
            let avail = &self.rx[pos..self.rx_len];
            let Some(h) = avail.get(..HEADER_BYTES) else {
                break;
            };
            let frame = self.recv_seq;
            let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            let kind = h[4];
            if len as usize > FRAME_BODY_MAX {
                return Err(SealError::TooLarge { frame, len });
            }
            let base = kind & !KIND_ENCRYPTED;
            if base != KIND_CONTROL && base != KIND_STREAM && base != KIND_DISK {
                return Err(SealError::BadKind { frame, kind });
            }
            let total = HEADER_BYTES + len as usize + TAG_BYTES;
            if avail.len() < total {
                break;
            }
            let encrypted = kind & KIND_ENCRYPTED != 0;
            if self.encrypt.unwrap_or(false) != encrypted {
                return Err(SealError::Mode { frame, encrypted });
            }
            let body_end = HEADER_BYTES + len as usize;
            let tag = Tag::clone_from_slice(&avail[body_end..total]);
            let n = nonce(self.end.peer(), frame);
            let sealed = &mut self.rx[pos..pos + body_end];
            // One pass over the body: the tag (and, encrypted, the
            // decryption in place, only after the tag verified).
            let ok = if encrypted {
                let (header, body) = sealed.split_at_mut(HEADER_BYTES);
                self.cipher
                    .decrypt_in_place_detached(&n, header, body, &tag)
                    .is_ok()
            } else {
                self.cipher
                    .decrypt_in_place_detached(&n, sealed, &mut [], &tag)
                    .is_ok()
            };
            if !ok {
                return Err(SealError::Integrity { frame });
            }
            self.recv_seq = self.recv_seq.wrapping_add(1);
            self.checked = pos + total;
            let body = (pos + HEADER_BYTES, pos + body_end);
            if base == KIND_CONTROL {
                if len as usize > CONTROL_MAX || self.controls.len() >= CONTROL_QUEUE_MAX {
                    return Err(SealError::ControlOverflow { frame });
                }
                self.controls.push_back(self.rx[body.0..body.1].to_vec());
            } else if base == KIND_DISK {
                if self.disks.len() >= DISK_QUEUE_MAX {
                    return Err(SealError::DiskOverflow { frame });
                }
                self.disks.push_back(self.rx[body.0..body.1].to_vec());
            } else if body.1 > body.0 {
                self.stream.push_back(body);
                self.stream_len += body.1 - body.0;
            }
        }
        Ok(())
    }

    /// The next control message received, oldest first.
    pub fn take_control(&mut self) -> Option<Vec<u8>> {
        self.controls.pop_front()
    }

    /// The next disk message received, oldest first.
    pub fn take_disk(&mut self) -> Option<Vec<u8>> {
        self.disks.pop_front()
    }

    /// Stream bytes received and not yet read.
    pub fn stream_pending(&self) -> usize {
        self.stream_len
    }

    /// Read received stream bytes into `buf` (straight from the frames
    /// they arrived in).
    pub fn read_stream(&mut self, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() {
            let Some(r) = self.stream.front_mut() else {
                break;
            };
            let k = (r.1 - r.0).min(buf.len() - n);
            buf[n..n + k].copy_from_slice(&self.rx[r.0..r.0 + k]);
            r.0 += k;
            n += k;
            if r.0 == r.1 {
                self.stream.pop_front();
            }
        }
        self.stream_len -= n;
        n
    }

    /// The error that poisoned the sealer, if any.
    pub fn error(&self) -> Option<SealError> {
        self.error
    }

    /// Pull what the inner transport has into the sealer (one chunk,
    /// received straight into the sealer's buffer) and open the frames
    /// that completed. `Ok(0)`: nothing arrived.
    pub fn pull<T: Transport + ?Sized>(&mut self, inner: &mut T) -> Result<usize, SealedError> {
        if let Some(e) = self.error {
            return Err(SealedError::Seal(e));
        }
        self.compact();
        let end = self.rx_len + RECV_CHUNK;
        if self.rx.len() < end {
            self.rx.resize(end, 0);
        }
        let mut got = 0;
        while got < RECV_CHUNK {
            let at = self.rx_len;
            let n = match inner.recv(&mut self.rx[at..end]) {
                Ok(n) => n.min(end - at),
                // What arrived before a close or reset counts first (a
                // refusal followed at once by the peer's close): the
                // error repeats at the next pull.
                Err(_) if got > 0 => break,
                Err(e) => return Err(SealedError::Transport(e)),
            };
            if n == 0 {
                break;
            }
            got += n;
            self.rx_len += n;
        }
        if got > 0 {
            self.decode_checked().map_err(SealedError::Seal)?;
        }
        Ok(got)
    }
}

/// Errors of a [`SealedLink`]: the inner transport's, or a refused frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealedError {
    Transport(TransportError),
    Seal(SealError),
}

/// The engine's view of the link: stream bytes through a [`Sealer`] over
/// an inner transport, both lent for the step.
pub struct SealedLink<'a, T: Transport + ?Sized> {
    pub sealer: &'a mut Sealer,
    pub inner: &'a mut T,
    /// The first refused frame seen through this view (the transport error
    /// the engine sees is generic; the job reports this one).
    pub refused: &'a mut Option<SealError>,
}

impl<T: Transport + ?Sized> Transport for SealedLink<'_, T> {
    fn send(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        let mut out = core::mem::take(&mut self.sealer.tx);
        out.clear();
        self.sealer.seal_stream(bytes, &mut out);
        let r = self.inner.send(&out);
        self.sealer.tx = out;
        r
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        if self.sealer.stream_pending() == 0 {
            match self.sealer.pull(&mut *self.inner) {
                Ok(_) => {}
                Err(SealedError::Transport(e)) => {
                    // Frames that arrived before the break are still read.
                    if self.sealer.stream_pending() == 0 {
                        return Err(e);
                    }
                }
                Err(SealedError::Seal(e)) => {
                    self.refused.get_or_insert(e);
                    return Err(TransportError::Broken(
                        "a sealed frame failed its integrity check",
                    ));
                }
            }
        }
        Ok(self.sealer.read_stream(buf))
    }

    fn send_window(&self) -> usize {
        let w = self.inner.send_window();
        if w == usize::MAX {
            return w;
        }
        // What fits once sealed.
        let frames = w.div_ceil(FRAME_BODY_MAX + FRAME_OVERHEAD).max(1);
        w.saturating_sub(frames * FRAME_OVERHEAD)
    }

    fn acked_bytes(&self) -> u64 {
        self.inner.acked_bytes()
    }

    /// Every stream byte read through here was in a frame whose tag
    /// verified (in order: the nonce counts frames).
    fn authenticated(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::MemPipe;
    use alloc::vec;

    fn pair(encrypt: Option<bool>) -> (Sealer, Sealer) {
        let key = [7u8; 32];
        let mut a = Sealer::new(&key, End::Source);
        let mut b = Sealer::new(&key, End::Destination);
        if let Some(e) = encrypt {
            a.set_encrypt(e);
            b.set_encrypt(e);
        }
        (a, b)
    }

    #[test]
    fn frames_round_trip_in_both_modes_and_big_payloads_split() {
        for mode in [None, Some(false), Some(true)] {
            let (mut a, mut b) = pair(mode);
            let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
            let mut wire = Vec::new();
            a.seal_control(b"{\"open\":{}}", &mut wire);
            a.seal_stream(&big, &mut wire);
            a.seal_stream(&[], &mut wire);
            assert_eq!(
                wire.len(),
                11 + Sealer::sealed_len(big.len()) + FRAME_OVERHEAD
            );
            // Any chunking.
            for chunk in wire.chunks(1000) {
                b.feed(chunk).unwrap();
            }
            assert_eq!(b.take_control().unwrap(), b"{\"open\":{}}");
            assert_eq!(b.take_control(), None);
            let mut got = vec![0u8; big.len() + 10];
            assert_eq!(b.read_stream(&mut got), big.len());
            assert_eq!(&got[..big.len()], &big[..]);
            // Encrypted frames hide the payload; plaintext ones carry it.
            let hidden = !wire.windows(64).any(|w| w == &big[1000..1064]);
            assert_eq!(hidden, mode == Some(true), "{mode:?}");
            // And back.
            let mut back = Vec::new();
            b.seal_control(b"{\"accept\":{}}", &mut back);
            a.feed(&back).unwrap();
            assert_eq!(a.take_control().unwrap(), b"{\"accept\":{}}");
        }
    }

    #[test]
    fn altered_replayed_reordered_reflected_and_foreign_frames_are_refused() {
        let mut wire = Vec::new();
        let (mut a, _) = pair(Some(true));
        a.seal_stream(b"first", &mut wire);
        let first_len = wire.len();
        a.seal_stream(b"second", &mut wire);
        let (f1, f2) = wire.split_at(first_len);
        let fresh = || pair(Some(true)).1;
        // Altered: every byte position.
        for i in 0..f1.len() {
            let mut bad = f1.to_vec();
            bad[i] ^= 0x20;
            let mut b = fresh();
            let e = b.feed(&bad);
            assert!(e.is_err() || b.stream_pending() == 0, "byte {i}");
            if i >= HEADER_BYTES {
                assert_eq!(e, Err(SealError::Integrity { frame: 0 }), "byte {i}");
            }
        }
        // Reordered.
        let mut b = fresh();
        assert_eq!(b.feed(f2), Err(SealError::Integrity { frame: 0 }));
        // Replayed.
        let mut b = fresh();
        b.feed(f1).unwrap();
        assert_eq!(b.feed(f1), Err(SealError::Integrity { frame: 1 }));
        assert_eq!(
            b.feed(f2),
            Err(SealError::Integrity { frame: 1 }),
            "poisoned"
        );
        // Reflected back to its sender.
        let (mut a2, _) = pair(Some(true));
        assert_eq!(a2.feed(f1), Err(SealError::Integrity { frame: 0 }));
        // Another session's key.
        let mut other = Sealer::new(&[8u8; 32], End::Destination);
        other.set_encrypt(true);
        assert_eq!(other.feed(f1), Err(SealError::Integrity { frame: 0 }));
        // Unencrypted where encryption was agreed (a downgrade).
        let (mut plain, _) = pair(Some(false));
        let mut p = Vec::new();
        plain.seal_stream(b"x", &mut p);
        let mut b = fresh();
        assert_eq!(
            b.feed(&p),
            Err(SealError::Mode {
                frame: 0,
                encrypted: false
            })
        );
    }

    #[test]
    fn hostile_headers_are_bounded() {
        let (_, mut b) = pair(None);
        assert_eq!(
            b.feed(&[0, 1, 0, 1, 2]),
            Err(SealError::TooLarge {
                frame: 0,
                len: 65537
            })
        );
        let (_, mut b) = pair(None);
        assert_eq!(
            b.feed(&[0, 0, 0, 0, 9]),
            Err(SealError::BadKind { frame: 0, kind: 9 })
        );
        // Control messages pile up only to the limit.
        let (mut a, mut b) = pair(None);
        let mut wire = Vec::new();
        for _ in 0..=CONTROL_QUEUE_MAX {
            a.seal_control(b"{}", &mut wire);
        }
        assert_eq!(
            b.feed(&wire),
            Err(SealError::ControlOverflow {
                frame: CONTROL_QUEUE_MAX as u64
            })
        );
    }

    #[test]
    fn disk_messages_travel_beside_the_stream_in_their_own_bounded_queue() {
        for mode in [Some(false), Some(true)] {
            let (mut a, mut b) = pair(mode);
            let mut wire = Vec::new();
            a.seal_stream(b"pages", &mut wire);
            a.seal_disk(&[1, 2, 3], &mut wire);
            a.seal_control(b"{}", &mut wire);
            a.seal_disk(&[4], &mut wire);
            for chunk in wire.chunks(7) {
                b.feed(chunk).unwrap();
            }
            assert_eq!(b.take_disk().unwrap(), [1, 2, 3]);
            assert_eq!(b.take_disk().unwrap(), [4]);
            assert_eq!(b.take_disk(), None);
            assert_eq!(b.take_control().unwrap(), b"{}");
            let mut got = [0u8; 8];
            assert_eq!(b.read_stream(&mut got), 5);
            assert_eq!(&got[..5], b"pages");
        }
        let (mut a, mut b) = pair(None);
        let mut wire = Vec::new();
        for _ in 0..=DISK_QUEUE_MAX {
            a.seal_disk(&[0], &mut wire);
        }
        assert_eq!(
            b.feed(&wire),
            Err(SealError::DiskOverflow {
                frame: DISK_QUEUE_MAX as u64
            })
        );
    }

    #[test]
    fn the_engines_view_carries_stream_bytes_and_queues_controls() {
        let (mut a, mut b) = pair(Some(true));
        let (mut pa, mut pb) = MemPipe::pair();
        let (mut ra, mut rb) = (None, None);
        let mut la = SealedLink {
            sealer: &mut a,
            inner: &mut pa,
            refused: &mut ra,
        };
        la.send(b"records").unwrap();
        assert!(la.send_window() < MemPipe::DEFAULT_CAPACITY);
        let mut ctl = Vec::new();
        la.sealer.seal_control(b"{\"paused\":{}}", &mut ctl);
        la.inner.send(&ctl).unwrap();
        la.send(b" more").unwrap();
        let mut lb = SealedLink {
            sealer: &mut b,
            inner: &mut pb,
            refused: &mut rb,
        };
        let mut buf = [0u8; 64];
        let n = lb.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"records more");
        assert_eq!(lb.sealer.take_control().unwrap(), b"{\"paused\":{}}");
        assert_eq!(lb.recv(&mut buf), Ok(0));
        // A tampered frame: the view reports a broken link and keeps why.
        let mut forged = Vec::new();
        Sealer::new(&[1u8; 32], End::Source).seal_stream(b"evil", &mut forged);
        pa.send(&forged).unwrap();
        assert!(lb.recv(&mut buf).is_err());
        assert_eq!(
            rb,
            Some(SealError::Mode {
                frame: 3,
                encrypted: false
            })
        );
    }
}
