//! The byte channel a migration runs over, and an in-memory implementation.
//!
//! [`Transport`] is bidirectional: the source sends the main stream and
//! receives the back channel; the destination the reverse. `send` delivers
//! all bytes or fails; `recv` never blocks (it returns `Ok(0)` when nothing
//! has arrived), because both engines run step by step, interleaved with
//! guest execution on one CPU. `send_window` is the flow control for
//! transports that cannot block: the source engine sends page data only
//! when the window has room for it (small control records ignore it).
//!
//! [`MemPipe`] connects two endpoints inside one address space (tests, and
//! the in-node local migration). It is single-threaded (`Rc<RefCell<_>>`)
//! and can break the link after a given number of bytes to test the way
//! back. Invariant: once broken, the link stays broken in both directions;
//! bytes already delivered before the break can still be received.

use crate::error::TransportError;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;

/// A fallible, bidirectional byte channel.
pub trait Transport {
    /// Deliver all of `bytes` or fail. May block (e.g. for bandwidth).
    fn send(&mut self, bytes: &[u8]) -> Result<(), TransportError>;
    /// Copy up to `buf.len()` received bytes into `buf`; `Ok(0)` when none
    /// are waiting. Never blocks.
    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError>;
    /// Bytes `send` accepts now without blocking or queueing beyond the
    /// transport's budget. A transport whose `send` blocks (e.g. a socket)
    /// returns `usize::MAX`.
    fn send_window(&self) -> usize;
    /// Of the bytes `send` accepted, how many the peer has acknowledged
    /// (TCP) or taken (a pipe) so far; never decreases. The engine's
    /// bandwidth estimate and its stall detection count these, not bytes
    /// queued locally.
    fn acked_bytes(&self) -> u64;
    /// Whether every byte `recv` hands out was checked by a MAC under a
    /// key only the two ends hold, in order, before it is handed out (a
    /// sealed link: [`crate::seal::SealedLink`]). Then the stream may
    /// leave page bytes to that MAC ([`crate::stream::SEALED_VERSION`]).
    /// Default: not.
    fn authenticated(&self) -> bool {
        false
    }
    /// Send `len` bytes that `fill` writes straight into the transport's
    /// send queue (it gets room for `len` bytes and returns how many it
    /// wrote), saving the copy out of a buffer of the caller's; `None`
    /// when the transport cannot lend such room now (nothing was sent:
    /// the caller uses [`Transport::send`]). A sealed link lends one
    /// frame's body at a time: at most [`crate::seal::FRAME_BODY_MAX`]
    /// bytes per call. Default: never.
    fn send_with(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Option<Result<(), TransportError>> {
        let _ = (len, fill);
        None
    }
    /// Lend the bytes received and not yet taken to `open`, which may
    /// change them in place and returns how many it used: those are taken
    /// (a receiver that opens frames where they lie saves a copy).
    /// `Some(Ok(used))`, or `Some(Err)` when the link is down and `open`
    /// used nothing (bytes that arrived before a break are lent first);
    /// `None` when the transport cannot lend (the caller uses
    /// [`Transport::recv`]). Default: never.
    fn recv_in_place(
        &mut self,
        open: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Option<Result<usize, TransportError>> {
        let _ = open;
        None
    }
    /// Lend received stream bytes, in order, piece by piece, to `take`:
    /// it takes each piece whole (what it cannot use now it copies) and
    /// returns whether it wants another. A receiver that parses records
    /// where they lie saves the copy into a buffer of its own.
    /// `Some(Ok(lent))`, `Some(Err)` when the link is down and nothing
    /// was lent (bytes that arrived before a break are lent first); `None`
    /// when the transport cannot lend now (the caller uses
    /// [`Transport::recv`]). Default: never (a sealed link lends the
    /// bodies of the frames it opened in place:
    /// [`crate::seal::SealedLink`]).
    fn recv_lent(
        &mut self,
        take: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Option<Result<usize, TransportError>> {
        let _ = take;
        None
    }
}

impl<T: Transport + ?Sized> Transport for &mut T {
    fn send(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        (**self).send(bytes)
    }
    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        (**self).recv(buf)
    }
    fn send_window(&self) -> usize {
        (**self).send_window()
    }
    fn acked_bytes(&self) -> u64 {
        (**self).acked_bytes()
    }
    fn authenticated(&self) -> bool {
        (**self).authenticated()
    }
    fn send_with(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Option<Result<(), TransportError>> {
        (**self).send_with(len, fill)
    }
    fn recv_in_place(
        &mut self,
        open: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Option<Result<usize, TransportError>> {
        (**self).recv_in_place(open)
    }
    fn recv_lent(
        &mut self,
        take: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Option<Result<usize, TransportError>> {
        (**self).recv_lent(take)
    }
}

/// A byte queue in one buffer: `buf[head..end]` are queued, `buf[end..]`
/// is room a sender may write in place ([`Fifo::spare`]). Taken bytes
/// move the head; what is left moves to the front only when it is no
/// more than what was taken, or the room is short (each byte moves about
/// once at most).
#[derive(Debug, Default)]
struct Fifo {
    buf: Vec<u8>,
    head: usize,
    end: usize,
}

impl Fifo {
    fn len(&self) -> usize {
        self.end - self.head
    }
    fn spare(&mut self, n: usize) -> &mut [u8] {
        let live = self.len();
        if self.head > 0 && (self.head >= live || self.end + n > self.buf.len()) {
            self.buf.copy_within(self.head..self.end, 0);
            self.head = 0;
            self.end = live;
        }
        if self.buf.len() < self.end + n {
            self.buf.resize(self.end + n, 0);
        }
        &mut self.buf[self.end..self.end + n]
    }
    fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }
    fn pop_into(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.len());
        out[..n].copy_from_slice(&self.buf[self.head..self.head + n]);
        self.head += n;
        if self.head == self.end {
            self.head = 0;
            self.end = 0;
        }
        n
    }
}

#[derive(Debug, Default)]
struct Shared {
    /// Bytes in flight towards end 0 and end 1.
    queues: [Fifo; 2],
    /// The link broke (injected failure or `break_link`).
    broken: bool,
    /// An endpoint was dropped.
    closed: [bool; 2],
    /// Bytes end `i` may still send before the link breaks.
    budget: [Option<u64>; 2],
    /// Total bytes sent by end `i`.
    sent: [u64; 2],
    /// Total bytes end `i` received (took out of its queue).
    taken: [u64; 2],
    /// Bytes the pipe holds in each direction before `send_window` is 0.
    capacity: usize,
}

/// One end of an in-memory pipe.
#[derive(Debug)]
pub struct MemPipe {
    shared: Rc<RefCell<Shared>>,
    me: usize,
}

impl MemPipe {
    /// Default flow-control budget per direction.
    pub const DEFAULT_CAPACITY: usize = 4 << 20;

    /// Two connected endpoints with [`MemPipe::DEFAULT_CAPACITY`].
    pub fn pair() -> (MemPipe, MemPipe) {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }

    /// Smallest capacity: the source engine needs a window of 16 pages.
    pub const MIN_CAPACITY: usize = 128 << 10;

    /// Two connected endpoints whose `send_window` allows `capacity` bytes
    /// (at least [`MemPipe::MIN_CAPACITY`]) in flight per direction; sends
    /// beyond it are still accepted.
    pub fn with_capacity(capacity: usize) -> (MemPipe, MemPipe) {
        let capacity = capacity.max(Self::MIN_CAPACITY);
        let shared = Rc::new(RefCell::new(Shared {
            capacity,
            ..Shared::default()
        }));
        (
            MemPipe {
                shared: shared.clone(),
                me: 0,
            },
            MemPipe { shared, me: 1 },
        )
    }

    /// Break the link once this end has sent `bytes` more bytes: the send
    /// that crosses the limit delivers the bytes up to it and fails.
    pub fn fail_after(&self, bytes: u64) {
        self.shared.borrow_mut().budget[self.me] = Some(bytes);
    }

    /// Break the link now.
    pub fn break_link(&self) {
        self.shared.borrow_mut().broken = true;
    }

    /// Bytes this end has sent.
    pub fn bytes_sent(&self) -> u64 {
        self.shared.borrow().sent[self.me]
    }

    /// Bytes waiting to be received by this end.
    pub fn pending(&self) -> usize {
        self.shared.borrow().queues[self.me].len()
    }
}

impl Drop for MemPipe {
    fn drop(&mut self) {
        self.shared.borrow_mut().closed[self.me] = true;
    }
}

impl MemPipe {
    /// Send `len` bytes that `fill` writes into the peer's queue (the
    /// bytes up to an injected failure are delivered).
    fn send_in_place(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<(), TransportError> {
        let mut s = self.shared.borrow_mut();
        if s.broken {
            return Err(TransportError::Broken("link down"));
        }
        let peer = 1 - self.me;
        if s.closed[peer] {
            return Err(TransportError::Closed);
        }
        let Shared {
            queues,
            budget,
            sent,
            broken,
            ..
        } = &mut *s;
        let q = &mut queues[peer];
        let written = fill(q.spare(len)).min(len);
        let mut n = written;
        let mut fail = false;
        if let Some(b) = budget[self.me] {
            let w = written as u64;
            if w > b {
                n = b as usize;
                fail = true;
            }
            budget[self.me] = Some(b.saturating_sub(w));
        }
        q.filled(n);
        sent[self.me] += n as u64;
        if fail {
            *broken = true;
            return Err(TransportError::Broken("injected failure"));
        }
        Ok(())
    }
}

impl Transport for MemPipe {
    fn send(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        self.send_in_place(bytes.len(), |room| {
            room.copy_from_slice(bytes);
            bytes.len()
        })
    }

    /// Written straight into the peer's queue.
    fn send_with(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Option<Result<(), TransportError>> {
        Some(self.send_in_place(len, fill))
    }

    fn send_window(&self) -> usize {
        let s = self.shared.borrow();
        s.capacity.saturating_sub(s.queues[1 - self.me].len())
    }

    fn acked_bytes(&self) -> u64 {
        self.shared.borrow().taken[1 - self.me]
    }

    /// The front of this end's queue, in place.
    fn recv_in_place(
        &mut self,
        open: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Option<Result<usize, TransportError>> {
        let mut s = self.shared.borrow_mut();
        let down = if s.broken {
            Some(TransportError::Broken("link down"))
        } else if s.closed[1 - self.me] {
            Some(TransportError::Closed)
        } else {
            None
        };
        let q = &mut s.queues[self.me];
        let used = if q.len() == 0 {
            0
        } else {
            let (head, end) = (q.head, q.end);
            let used = open(&mut q.buf[head..end]).min(end - head);
            q.head += used;
            if q.head == q.end {
                q.head = 0;
                q.end = 0;
            }
            used
        };
        s.taken[self.me] += used as u64;
        Some(match down {
            Some(e) if used == 0 => Err(e),
            _ => Ok(used),
        })
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        let mut s = self.shared.borrow_mut();
        let q = &mut s.queues[self.me];
        if q.len() == 0 {
            if s.broken {
                return Err(TransportError::Broken("link down"));
            }
            if s.closed[1 - self.me] {
                return Err(TransportError::Closed);
            }
            return Ok(0);
        }
        // One slice copy (every byte of a local migration passes here).
        let n = q.pop_into(buf);
        s.taken[self.me] += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_flow_both_ways() {
        let (mut a, mut b) = MemPipe::pair();
        assert_eq!(a.send_window(), MemPipe::DEFAULT_CAPACITY);
        a.send(b"hello").unwrap();
        b.send(b"hi").unwrap();
        assert_eq!(a.send_window(), MemPipe::DEFAULT_CAPACITY - 5);
        let mut buf = [0u8; 3];
        assert_eq!(b.recv(&mut buf).unwrap(), 3);
        assert_eq!(&buf, b"hel");
        assert_eq!(
            (a.acked_bytes(), b.acked_bytes()),
            (3, 0),
            "taken by the peer"
        );
        assert_eq!(b.recv(&mut buf).unwrap(), 2);
        assert_eq!(b.recv(&mut buf).unwrap(), 0);
        assert_eq!(a.recv(&mut buf).unwrap(), 2);
        drop(a);
        assert_eq!(b.recv(&mut buf), Err(TransportError::Closed));
        assert_eq!(b.send(b"x"), Err(TransportError::Closed));
    }

    #[test]
    fn injected_failure_delivers_prefix_then_breaks() {
        let (mut a, mut b) = MemPipe::pair();
        a.fail_after(4);
        a.send(b"ab").unwrap();
        assert!(a.send(b"cdef").is_err());
        assert_eq!(a.bytes_sent(), 4);
        let mut buf = [0u8; 8];
        assert_eq!(b.recv(&mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"abcd");
        assert!(b.recv(&mut buf).is_err());
        assert!(b.send(b"x").is_err());
    }
}
