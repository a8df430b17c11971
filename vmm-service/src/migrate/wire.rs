//! The byte carrier under a migration link: one TCP connection on the
//! migration NIC through the node's socket pump ([`SocketPump`], the same
//! pump the management server and the link benchmark use), or, for a move
//! within the node, an in-memory [`MemPipe`].
//!
//! Either way it is a `migration::Transport`: sends queue (the engine's
//! flow control keeps page data within [`Wire::send_window`]), receives
//! never block, and `acked_bytes` counts what the peer acknowledged: for
//! TCP the bytes handed to the socket minus those the stack still holds
//! unacknowledged (`NetStack::tcp_unacked`), sampled each time the job
//! services the wire; for the pipe the bytes the other end took.
//!
//! The job calls [`Wire::service`] around its engine steps: it moves queued
//! bytes into the socket, lets the stack transmit and read, and refreshes
//! the counters. Nothing here blocks or holds the host.

use crate::pump::SocketPump;
use alloc::collections::VecDeque;
use hvcore::host::{NetStack, NicRole, SocketId, TcpState};
use migration::{MemPipe, Transport, TransportError};

/// Bytes the wire accepts beyond what the socket holds before its send
/// window closes (the engine then waits).
pub const WINDOW_BYTES: usize = 1 << 20;
/// Sends beyond the window (control records ignore it) are still taken up
/// to this much; beyond it the link counts as broken.
pub const PENDING_MAX: usize = 8 << 20;
/// Receive buffer of the pump.
const RX_BYTES: usize = 256 << 10;
/// Send queue of the pump: the whole send window, so page data goes from
/// the sealer's frames into it directly.
const TX_BYTES: usize = WINDOW_BYTES + (64 << 10);

/// A TCP connection through a socket pump.
#[derive(Debug)]
pub struct TcpWire {
    pump: SocketPump,
    /// Accepted by `send`, not yet in the pump.
    pending: VecDeque<u8>,
    state: TcpState,
    acked: u64,
    unacked: usize,
}

impl TcpWire {
    fn new(socket: SocketId, now_ns: u64) -> Self {
        Self {
            pump: SocketPump::new(socket, RX_BYTES, TX_BYTES, now_ns),
            pending: VecDeque::new(),
            state: TcpState::Connecting,
            acked: 0,
            unacked: 0,
        }
    }

    fn service(&mut self, net: &mut dyn NetStack, now_ns: u64) {
        loop {
            if !self.pending.is_empty() {
                let (front, _) = self.pending.as_slices();
                let n = self.pump.queue(front);
                self.pending.drain(..n);
            }
            if self.pump.flush(net, now_ns) == 0 || self.pending.is_empty() {
                break;
            }
        }
        self.pump.read(net, now_ns);
        self.state = self.pump.state(net);
        self.unacked = self.pump.unacked(net);
        let acked = self.pump.sent_total().saturating_sub(self.unacked as u64);
        self.acked = self.acked.max(acked);
    }

    fn broken(&self) -> bool {
        self.pump.is_broken() || self.state == TcpState::Closed
    }
}

/// What a migration link runs over.
#[derive(Debug)]
pub enum Wire {
    Tcp(TcpWire),
    Pipe(MemPipe),
    /// Handed on ([`Wire::take`]): nothing moves any more.
    Gone,
}

impl Wire {
    /// A connection to `addr:port` on the migration NIC.
    pub fn connect(
        net: &mut dyn NetStack,
        addr: [u8; 4],
        port: u16,
        now_ns: u64,
    ) -> Result<Wire, hvcore::host::NetError> {
        let s = net.tcp_connect(NicRole::Migration, addr, port)?;
        Ok(Wire::Tcp(TcpWire::new(s, now_ns)))
    }

    /// A connection that arrived on a listener.
    pub fn accepted(socket: SocketId, now_ns: u64) -> Wire {
        Wire::Tcp(TcpWire::new(socket, now_ns))
    }

    /// The connection, leaving [`Wire::Gone`] behind.
    pub fn take(&mut self) -> Option<Wire> {
        match core::mem::replace(self, Wire::Gone) {
            Wire::Gone => None,
            w => Some(w),
        }
    }

    /// Move bytes between the pump and the socket, let the stack work, and
    /// refresh the counters (TCP; a pipe needs nothing).
    pub fn service(&mut self, net: Option<&mut dyn NetStack>, now_ns: u64) {
        if let (Wire::Tcp(t), Some(net)) = (self, net) {
            net.poll(now_ns);
            t.service(net, now_ns);
            net.poll(now_ns);
        }
    }

    /// Whether the peer closed its side and everything it sent was read.
    pub fn peer_closed(&self) -> bool {
        match self {
            Wire::Tcp(t) => t.pump.peer_done(),
            Wire::Pipe(_) => false,
            Wire::Gone => true,
        }
    }

    /// Whether the connection is established (a pipe always is).
    pub fn is_open(&self) -> bool {
        match self {
            Wire::Tcp(t) => matches!(t.state, TcpState::Open | TcpState::PeerClosed),
            Wire::Pipe(_) => true,
            Wire::Gone => false,
        }
    }

    /// Whether the connection is gone (reset, closed, or refused).
    pub fn is_broken(&self) -> bool {
        match self {
            Wire::Tcp(t) => t.broken(),
            Wire::Pipe(_) => false,
            Wire::Gone => true,
        }
    }

    /// Bytes sent and not yet acknowledged (queued here or in the stack).
    pub fn in_flight(&self) -> usize {
        match self {
            Wire::Tcp(t) => t.pending.len() + t.pump.queued() + t.unacked,
            Wire::Pipe(p) => MemPipe::DEFAULT_CAPACITY.saturating_sub(p.send_window()),
            Wire::Gone => 0,
        }
    }

    /// Give the connection back to the stack (it closes gracefully).
    pub fn release(self, net: Option<&mut dyn NetStack>) {
        if let (Wire::Tcp(t), Some(net)) = (self, net) {
            t.pump.release(net);
        }
    }
}

impl Transport for Wire {
    fn send(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        match self {
            Wire::Pipe(p) => p.send(bytes),
            Wire::Gone => Err(TransportError::Broken("connection handed on")),
            Wire::Tcp(t) => {
                if t.broken() {
                    return Err(TransportError::Broken("connection reset"));
                }
                if t.pending.len() + bytes.len() > PENDING_MAX {
                    return Err(TransportError::Broken("send queue overflow"));
                }
                // Into the pump's queue when nothing waits before it (one
                // copy fewer); the rest waits here.
                let n = if t.pending.is_empty() {
                    t.pump.queue(bytes)
                } else {
                    0
                };
                t.pending.extend(&bytes[n..]);
                Ok(())
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        match self {
            Wire::Pipe(p) => p.recv(buf),
            Wire::Gone => Err(TransportError::Closed),
            Wire::Tcp(t) => {
                let got = t.pump.received();
                if got.is_empty() {
                    if t.broken() {
                        return Err(TransportError::Broken("connection reset"));
                    }
                    if t.pump.peer_done() {
                        return Err(TransportError::Closed);
                    }
                    return Ok(0);
                }
                let n = buf.len().min(got.len());
                buf[..n].copy_from_slice(&got[..n]);
                t.pump.consume(n);
                Ok(n)
            }
        }
    }

    fn send_window(&self) -> usize {
        match self {
            Wire::Pipe(p) => p.send_window(),
            Wire::Gone => 0,
            Wire::Tcp(t) => WINDOW_BYTES.saturating_sub(t.pending.len() + t.pump.queued()),
        }
    }

    fn acked_bytes(&self) -> u64 {
        match self {
            Wire::Pipe(p) => p.acked_bytes(),
            Wire::Gone => 0,
            Wire::Tcp(t) => t.acked,
        }
    }

    /// The pump's (or the pipe's) received bytes, in place: the sealer
    /// opens frames where they arrived.
    fn recv_in_place(
        &mut self,
        open: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Option<Result<usize, TransportError>> {
        match self {
            Wire::Pipe(p) => p.recv_in_place(open),
            Wire::Gone => Some(Err(TransportError::Closed)),
            Wire::Tcp(t) => {
                let got = t.pump.received_mut();
                let used = if got.is_empty() {
                    0
                } else {
                    let n = got.len();
                    open(got).min(n)
                };
                t.pump.consume(used);
                if used == 0 {
                    if t.broken() {
                        return Some(Err(TransportError::Broken("connection reset")));
                    }
                    if t.pump.fin_read() {
                        return Some(Err(TransportError::Closed));
                    }
                }
                Some(Ok(used))
            }
        }
    }

    /// Written straight into the pump's (or the pipe's) queue when it has
    /// room and nothing waits before it here: the sealer's frames go
    /// there without a buffer of their own.
    fn send_with(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Option<Result<(), TransportError>> {
        match self {
            Wire::Pipe(p) => p.send_with(len, fill),
            Wire::Gone => None,
            Wire::Tcp(t) => {
                if t.broken() || !t.pending.is_empty() {
                    return None;
                }
                t.pump.queue_with(len, fill).map(|_| Ok(()))
            }
        }
    }
}
