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
    /// The inner transport lends its received bytes
    /// ([`Transport::recv_in_place`]).
    in_place: bool,
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
            in_place: false,
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

    /// Seal the frame laid out in `frame` (header room, body, tag room:
    /// [`FRAME_OVERHEAD`] bytes more than the body) in place: header,
    /// tag, and the body encrypted when the migration is.
    fn seal_frame(&mut self, kind: u8, frame: &mut [u8]) {
        let encrypt = self.encrypt == Some(true);
        let kind = if encrypt { kind | KIND_ENCRYPTED } else { kind };
        let body_len = frame.len().saturating_sub(FRAME_OVERHEAD);
        let (sealed, tag_room) = frame.split_at_mut(HEADER_BYTES + body_len);
        sealed[..4].copy_from_slice(&(body_len as u32).to_be_bytes());
        sealed[4] = kind;
        let n = nonce(self.end, self.send_seq);
        self.send_seq = self.send_seq.wrapping_add(1);
        let tag = if encrypt {
            let (header, body) = sealed.split_at_mut(HEADER_BYTES);
            self.cipher.encrypt_in_place_detached(&n, header, body)
        } else {
            self.cipher.encrypt_in_place_detached(&n, sealed, &mut [])
        };
        // Encryption fails only for messages beyond ChaCha20's 256 GiB
        // limit; a frame is at most 64 KiB.
        match tag {
            Ok(tag) => tag_room.copy_from_slice(&tag),
            Err(_) => unreachable!("ChaCha20-Poly1305 seals any frame of at most 64 KiB"),
        }
    }

    /// Append `payload` sealed as one or more frames of `kind` to `out`.
    fn seal(&mut self, kind: u8, payload: &[u8], out: &mut Vec<u8>) {
        // An empty payload makes no frame (a control message is never
        // empty; stream sends of nothing make none).
        for piece in payload.chunks(FRAME_BODY_MAX) {
            let start = out.len();
            out.extend_from_slice(&[0; HEADER_BYTES]);
            out.extend_from_slice(piece);
            out.extend_from_slice(&[0; TAG_BYTES]);
            self.seal_frame(kind, &mut out[start..]);
        }
    }

    /// Seal stream bytes as frames straight into `out`, which holds at
    /// least [`Sealer::sealed_len`] of them (a transport's send queue:
    /// one copy of the bytes, not two); returns the bytes written.
    pub fn seal_stream_into(&mut self, bytes: &[u8], out: &mut [u8]) -> usize {
        let mut at = 0;
        for piece in bytes.chunks(FRAME_BODY_MAX) {
            let end = at + piece.len() + FRAME_OVERHEAD;
            let Some(frame) = out.get_mut(at..end) else {
                break;
            };
            frame[HEADER_BYTES..HEADER_BYTES + piece.len()].copy_from_slice(piece);
            self.seal_frame(KIND_STREAM, frame);
            at = end;
        }
        at
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

    /// The frame whose header starts `avail` (frame number `frame`):
    /// `None` while incomplete, else its kind (without the encryption bit)
    /// and body length; refused when the header is bad or the frame's
    /// encryption is not the migration's.
    fn frame_at(&self, avail: &[u8], frame: u64) -> Result<Option<(u8, usize)>, SealError> {
        let Some(h) = avail.get(..HEADER_BYTES) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let kind = h[4];
        if len as usize > FRAME_BODY_MAX {
            return Err(SealError::TooLarge { frame, len });
        }
        let base = kind & !KIND_ENCRYPTED;
        if base != KIND_CONTROL && base != KIND_STREAM && base != KIND_DISK {
            return Err(SealError::BadKind { frame, kind });
        }
        if avail.len() < HEADER_BYTES + len as usize + TAG_BYTES {
            return Ok(None);
        }
        let encrypted = kind & KIND_ENCRYPTED != 0;
        if self.encrypt.unwrap_or(false) != encrypted {
            return Err(SealError::Mode { frame, encrypted });
        }
        Ok(Some((base, len as usize)))
    }

    /// Verify the whole frame `sealed` (header, body, tag) as the next one
    /// received, decrypting its body in place: one pass over the body
    /// (the tag, and the decryption only after the tag verified).
    fn open_frame(&mut self, sealed: &mut [u8]) -> Result<(), SealError> {
        let frame = self.recv_seq;
        let body_end = sealed.len().saturating_sub(TAG_BYTES);
        let (sealed, tag) = sealed.split_at_mut(body_end);
        let tag = Tag::clone_from_slice(tag);
        let n = nonce(self.end.peer(), frame);
        let ok = if sealed.get(4).is_some_and(|k| k & KIND_ENCRYPTED != 0) {
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
        Ok(())
    }

    /// Queue a verified control or disk message (`base` its kind).
    fn queue_message(&mut self, base: u8, body: &[u8], frame: u64) -> Result<(), SealError> {
        if base == KIND_CONTROL {
            if body.len() > CONTROL_MAX || self.controls.len() >= CONTROL_QUEUE_MAX {
                return Err(SealError::ControlOverflow { frame });
            }
            self.controls.push_back(body.to_vec());
        } else {
            if self.disks.len() >= DISK_QUEUE_MAX {
                return Err(SealError::DiskOverflow { frame });
            }
            self.disks.push_back(body.to_vec());
        }
        Ok(())
    }

    /// Check and open every complete frame behind `checked`, in place.
    fn decode(&mut self) -> Result<(), SealError> {
        loop {
            let pos = self.checked;
            let frame = self.recv_seq;
            let Some((base, len)) = self.frame_at(&self.rx[pos..self.rx_len], frame)? else {
                break;
            };
            let total = HEADER_BYTES + len + TAG_BYTES;
            let mut rx = core::mem::take(&mut self.rx);
            let opened = self.open_frame(&mut rx[pos..pos + total]);
            self.rx = rx;
            opened?;
            self.checked = pos + total;
            let body = (pos + HEADER_BYTES, pos + HEADER_BYTES + len);
            if base == KIND_STREAM {
                if body.1 > body.0 {
                    self.stream.push_back(body);
                    self.stream_len += body.1 - body.0;
                }
            } else {
                let rx = core::mem::take(&mut self.rx);
                let queued = self.queue_message(base, &rx[body.0..body.1], frame);
                self.rx = rx;
                queued?;
            }
        }
        Ok(())
    }

    /// Whether nothing received waits here: no stream bytes unread and no
    /// partial frame (the next frame may then be opened where it lies).
    fn drained(&self) -> bool {
        self.stream_len == 0 && self.checked == self.rx_len
    }

    /// Open the complete frames at the front of `bytes` (an inner
    /// transport's receive buffer, changed in place: bodies decrypted)
    /// as the next ones received: stream bodies are copied into `out`
    /// while they fit, control and disk messages queue. Stops before an
    /// incomplete frame and before a stream body that does not fit the
    /// rest of `out`. Returns the bytes of `bytes` used and the stream
    /// bytes written; an error poisons the sealer.
    pub fn open_in_place(&mut self, bytes: &mut [u8], out: &mut [u8]) -> Opened {
        let mut wrote = 0;
        let room = out.len();
        self.open_frames(
            bytes,
            &mut |len, so_far| len <= room - so_far,
            &mut |body| {
                out[wrote..wrote + body.len()].copy_from_slice(body);
                wrote += body.len();
                true
            },
        )
    }

    /// Open the complete frames at the front of `bytes` (as
    /// [`Sealer::open_in_place`]) and lend each stream body where it
    /// lies to `take`, which takes it whole and says whether it wants
    /// another (no copy here at all). Returns the bytes of `bytes` used
    /// and the stream bytes lent.
    pub fn open_lending(
        &mut self,
        bytes: &mut [u8],
        take: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Opened {
        self.open_frames(bytes, &mut |_, _| true, take)
    }

    /// Open frames from the front of `bytes` while `fits(body length,
    /// stream bytes so far)` lets a stream frame in (else `no_room`) and
    /// `deliver` (given each non-empty stream body) wants more.
    fn open_frames(
        &mut self,
        bytes: &mut [u8],
        fits: &mut dyn FnMut(usize, usize) -> bool,
        deliver: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Opened {
        let mut o = Opened::default();
        if let Some(e) = self.error {
            o.error = Some(e);
            return o;
        }
        let (mut used, mut wrote) = (0, 0);
        loop {
            let frame = self.recv_seq;
            let (base, len) = match self.frame_at(&bytes[used..], frame) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    self.error = Some(e);
                    o.error = Some(e);
                    break;
                }
            };
            if base == KIND_STREAM && !fits(len, wrote) {
                o.no_room = true;
                break;
            }
            let total = HEADER_BYTES + len + TAG_BYTES;
            let sealed = &mut bytes[used..used + total];
            let mut more = true;
            let r = self.open_frame(sealed).and_then(|()| {
                let body = &sealed[HEADER_BYTES..HEADER_BYTES + len];
                if base == KIND_STREAM {
                    if !body.is_empty() {
                        more = deliver(body);
                    }
                    Ok(())
                } else {
                    self.queue_message(base, body, frame)
                }
            });
            if let Err(e) = r {
                self.error = Some(e);
                o.error = Some(e);
                break;
            }
            used += total;
            if base == KIND_STREAM {
                wrote += len;
            }
            if !more {
                break;
            }
        }
        o.used = used;
        o.wrote = wrote;
        o
    }

    /// Bytes the partial frame in the buffer still lacks (its header
    /// first), at least 1.
    fn missing(&self) -> usize {
        let have = &self.rx[self.checked..self.rx_len];
        match have.get(..HEADER_BYTES) {
            None => HEADER_BYTES - have.len(),
            Some(h) => {
                let len =
                    (u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize).min(FRAME_BODY_MAX);
                (HEADER_BYTES + len + TAG_BYTES).saturating_sub(have.len())
            }
        }
        .max(1)
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
        self.pull_at_most(inner, RECV_CHUNK)
    }

    fn pull_at_most<T: Transport + ?Sized>(
        &mut self,
        inner: &mut T,
        max: usize,
    ) -> Result<usize, SealedError> {
        if let Some(e) = self.error {
            return Err(SealedError::Seal(e));
        }
        self.compact();
        let end = self.rx_len + max;
        if self.rx.len() < end {
            self.rx.resize(end, 0);
        }
        let mut got = 0;
        while got < max {
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

/// What [`Sealer::open_in_place`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Opened {
    /// Bytes of the lent buffer used (whole frames).
    pub used: usize,
    /// Stream bytes written to the caller's buffer.
    pub wrote: usize,
    /// It stopped at a stream frame whose body did not fit.
    pub no_room: bool,
    /// A frame was refused (the sealer is poisoned).
    pub error: Option<SealError>,
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
        if bytes.is_empty() {
            return self.inner.send(&[]);
        }
        // Sealed straight into the inner transport's send queue when it
        // lends room (one copy of the bytes), else through `tx`.
        let need = Sealer::sealed_len(bytes.len());
        let sealer = &mut *self.sealer;
        if let Some(r) = self
            .inner
            .send_with(need, &mut |room| sealer.seal_stream_into(bytes, room))
        {
            return r;
        }
        let mut out = core::mem::take(&mut self.sealer.tx);
        out.clear();
        self.sealer.seal_stream(bytes, &mut out);
        let r = self.inner.send(&out);
        self.sealer.tx = out;
        r
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        if self.sealer.stream_pending() == 0 {
            // Nothing waits here: open the next frames where they lie in
            // the inner transport's buffer, straight into `buf` (one copy
            // fewer). A frame that does not fit `buf` takes the way
            // through this sealer's buffer.
            let mut pull_max = RECV_CHUNK;
            if self.sealer.drained() {
                let sealer = &mut *self.sealer;
                let mut opened = Opened::default();
                let lent = self.inner.recv_in_place(&mut |bytes| {
                    opened = sealer.open_in_place(bytes, buf);
                    opened.used
                });
                if let Some(r) = lent {
                    sealer.in_place = true;
                    if let Some(e) = opened.error {
                        self.refused.get_or_insert(e);
                        if opened.wrote == 0 {
                            return Err(TransportError::Broken(
                                "a sealed frame failed its integrity check",
                            ));
                        }
                    }
                    if opened.wrote > 0 || (!opened.no_room && opened.error.is_none()) {
                        return r.map(|_| opened.wrote).or_else(|e| {
                            if opened.wrote > 0 {
                                Ok(opened.wrote)
                            } else {
                                Err(e)
                            }
                        });
                    }
                }
            } else if self.sealer.in_place {
                // Complete the partial frame only, so the next ones are
                // opened in place again.
                pull_max = self.sealer.missing();
            }
            match self.sealer.pull_at_most(&mut *self.inner, pull_max) {
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

    /// One stream frame of at most [`FRAME_BODY_MAX`] bytes of body,
    /// whose body `fill` writes straight into the inner transport's send
    /// queue; it is sealed there in place (the MAC's pass over the body
    /// is the only one). `None` when `len` is over one frame's body or
    /// the inner transport cannot lend.
    fn send_with(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Option<Result<(), TransportError>> {
        if len == 0 || len > FRAME_BODY_MAX {
            return None;
        }
        let sealer = &mut *self.sealer;
        self.inner.send_with(len + FRAME_OVERHEAD, &mut |room| {
            let Some(body) = room.get_mut(HEADER_BYTES..HEADER_BYTES + len) else {
                return 0;
            };
            let n = fill(body).min(len);
            if n == 0 {
                return 0; // No frame (and no sequence number) for nothing.
            }
            sealer.seal_frame(KIND_STREAM, &mut room[..n + FRAME_OVERHEAD]);
            n + FRAME_OVERHEAD
        })
    }

    /// Stream bodies lent where their frames were opened, in the inner
    /// transport's receive buffer, when nothing waits in this sealer's
    /// own (else `None`: [`Transport::recv`] takes that first).
    fn recv_lent(
        &mut self,
        take: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Option<Result<usize, TransportError>> {
        if !self.sealer.drained() {
            return None;
        }
        let sealer = &mut *self.sealer;
        let mut opened = Opened::default();
        let r = self.inner.recv_in_place(&mut |bytes| {
            opened = sealer.open_lending(bytes, take);
            opened.used
        })?;
        sealer.in_place = true;
        if let Some(e) = opened.error {
            self.refused.get_or_insert(e);
            if opened.wrote == 0 {
                return Some(Err(TransportError::Broken(
                    "a sealed frame failed its integrity check",
                )));
            }
        }
        Some(match r {
            Err(e) if opened.wrote == 0 => Err(e),
            _ => Ok(opened.wrote),
        })
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

    /// Frames opened where they lie in the pipe's queue: whole, split at
    /// any byte (a partial frame waits there, or is completed through the
    /// sealer's buffer when an earlier pull left it there), bigger than
    /// the reader's buffer (through the sealer's buffer), and control
    /// messages between them: every stream byte arrives once, in order,
    /// and a tampered frame is still refused.
    #[test]
    fn frames_are_opened_in_the_pipes_queue() {
        for encrypt in [false, true] {
            let (mut a, mut b) = pair(Some(encrypt));
            let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 4099) as u8).collect();
            let mut wire = Vec::new();
            let mut cut = 0;
            for (k, piece) in payload.chunks(70_001).enumerate() {
                a.seal_stream(piece, &mut wire);
                if k == 1 {
                    a.seal_control(b"{\"paused\":{}}", &mut wire);
                    cut = wire.len() - 3;
                }
            }
            let (mut tx, mut rx) = MemPipe::pair();
            let mut refused = None;
            let mut got = Vec::new();
            let mut piece_at = 0;
            for round in 0..10_000usize {
                if piece_at < wire.len() {
                    // Uneven pieces; one ends 3 bytes before the control
                    // frame's end.
                    let mut end = (piece_at + 1 + round * 7919 % 50_000).min(wire.len());
                    if piece_at < cut && end > cut {
                        end = cut;
                    }
                    tx.send(&wire[piece_at..end]).unwrap();
                    piece_at = end;
                }
                let mut buf = vec![0u8; if round % 5 == 0 { 100 } else { 64 << 10 }];
                let mut link = SealedLink {
                    sealer: &mut b,
                    inner: &mut rx,
                    refused: &mut refused,
                };
                let n = link.recv(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
                if piece_at == wire.len() && got.len() == payload.len() {
                    break;
                }
            }
            assert_eq!(got, payload, "encrypt {encrypt}");
            assert_eq!(b.take_control().as_deref(), Some(&b"{\"paused\":{}}"[..]));
            assert!(refused.is_none());
            // A flipped bit in a frame opened in place.
            let (mut a, mut b) = pair(Some(encrypt));
            let mut wire = Vec::new();
            a.seal_stream(&payload[..1000], &mut wire);
            wire[300] ^= 1;
            tx.send(&wire).unwrap();
            let mut link = SealedLink {
                sealer: &mut b,
                inner: &mut rx,
                refused: &mut refused,
            };
            assert!(link.recv(&mut [0u8; 4096]).is_err());
            assert!(matches!(refused, Some(SealError::Integrity { frame: 0 })));
        }
    }

    /// Stream bodies written in place into the pipe's queue
    /// (`send_with`, sealed there) and lent where they were opened
    /// (`recv_lent`) arrive byte-exact, in order, between frames sent the
    /// other way and control messages; a piece over one frame's body is
    /// not lent room, a fill of nothing makes no frame; a frame cut short
    /// is never lent, and the cut shows once the sender is gone; a
    /// tampered frame is refused.
    #[test]
    fn bodies_sealed_in_place_are_lent_byte_exact() {
        for encrypt in [false, true] {
            let (mut a, mut b) = pair(Some(encrypt));
            let (mut tx, mut rx) = MemPipe::pair();
            let (mut ra, mut rb) = (None, None);
            let payload: Vec<u8> = (0..400_000u32).map(|i| (i * 11 + i / 509) as u8).collect();
            let mut sent = 0;
            for (k, piece) in payload.chunks(61_000).enumerate() {
                let mut la = SealedLink {
                    sealer: &mut a,
                    inner: &mut tx,
                    refused: &mut ra,
                };
                assert!(
                    la.send_with(FRAME_BODY_MAX + 1, &mut |_| 1).is_none(),
                    "more than one frame's body"
                );
                assert!(
                    la.send_with(100, &mut |_| 0).unwrap().is_ok(),
                    "nothing written"
                );
                if k % 2 == 0 {
                    la.send_with(piece.len() + 500, &mut |room| {
                        room[..piece.len()].copy_from_slice(piece);
                        piece.len()
                    })
                    .unwrap()
                    .unwrap();
                } else {
                    la.send(piece).unwrap();
                }
                sent += piece.len();
                if k == 3 {
                    let mut c = Vec::new();
                    a.seal_control(b"{\"paused\":{}}", &mut c);
                    tx.send(&c).unwrap();
                }
            }
            assert_eq!(sent, payload.len());
            let mut got = Vec::new();
            for _ in 0..100 {
                let mut lb = SealedLink {
                    sealer: &mut b,
                    inner: &mut rx,
                    refused: &mut rb,
                };
                let mut pieces = 0;
                let n = lb
                    .recv_lent(&mut |body| {
                        assert!(body.len() <= FRAME_BODY_MAX);
                        got.extend_from_slice(body);
                        pieces += 1;
                        pieces < 3
                    })
                    .unwrap()
                    .unwrap();
                if n == 0 {
                    break;
                }
            }
            assert_eq!(got, payload, "encrypt {encrypt}");
            assert_eq!(b.take_control().as_deref(), Some(&b"{\"paused\":{}}"[..]));
            assert!(rb.is_none());

            // A frame cut short: nothing of it is lent while it waits,
            // and the end of the link shows once the sender is gone.
            let mut wire = Vec::new();
            a.seal_stream(&payload[..5000], &mut wire);
            tx.send(&wire[..wire.len() - 1]).unwrap();
            let mut lb = SealedLink {
                sealer: &mut b,
                inner: &mut rx,
                refused: &mut rb,
            };
            let mut lent = 0;
            let n = lb.recv_lent(&mut |body| {
                lent += body.len();
                true
            });
            assert_eq!((n, lent), (Some(Ok(0)), 0));
            drop(tx);
            let mut lb = SealedLink {
                sealer: &mut b,
                inner: &mut rx,
                refused: &mut rb,
            };
            assert_eq!(
                lb.recv_lent(&mut |_| true),
                Some(Err(TransportError::Closed))
            );
            assert_eq!(lent, 0);

            // A flipped bit: refused, nothing lent.
            let (mut a, mut b) = pair(Some(encrypt));
            let (mut tx, mut rx) = MemPipe::pair();
            let mut wire = Vec::new();
            a.seal_stream(&payload[..3000], &mut wire);
            wire[HEADER_BYTES + 10] ^= 4;
            tx.send(&wire).unwrap();
            let mut lb = SealedLink {
                sealer: &mut b,
                inner: &mut rx,
                refused: &mut rb,
            };
            assert!(matches!(lb.recv_lent(&mut |_| true), Some(Err(_))));
            assert!(matches!(rb, Some(SealError::Integrity { frame: 0 })));
        }
    }

    /// Sealing straight into a transport's queue writes the same frames
    /// as sealing into a buffer of its own, encrypted or not.
    #[test]
    fn sealing_in_place_writes_the_same_frames() {
        let payload: Vec<u8> = (0..150_000u32).map(|i| (i * 13 + i / 997) as u8).collect();
        for encrypt in [false, true] {
            let (mut a, _) = pair(Some(encrypt));
            let (mut b, _) = pair(Some(encrypt));
            let mut own = Vec::new();
            a.seal_stream(&payload, &mut own);
            let mut room = vec![0u8; Sealer::sealed_len(payload.len())];
            assert_eq!(b.seal_stream_into(&payload, &mut room), room.len());
            assert_eq!(own, room, "encrypt {encrypt}");
            // Too little room: whole frames only.
            let mut short = vec![0u8; FRAME_BODY_MAX + FRAME_OVERHEAD + 10];
            assert_eq!(
                b.seal_stream_into(&payload, &mut short),
                FRAME_BODY_MAX + FRAME_OVERHEAD
            );
        }
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
