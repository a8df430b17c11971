//! The socket pump: the one piece of the node that moves bytes between a
//! [`NetStack`] TCP socket and the code speaking a protocol over it (the
//! management server, the link benchmark; migration streams next).
//!
//! A [`SocketPump`] owns one socket and two bounded buffers. Protocol code
//! never calls the socket: it takes what arrived from
//! [`SocketPump::received`] / [`SocketPump::consume`], queues what it wants
//! sent with [`SocketPump::queue`] (at most [`SocketPump::send_room`]), and
//! its owner calls [`SocketPump::read`] and [`SocketPump::flush`] once per
//! round of the node loop:
//! * `read` takes bytes from the socket while the receive buffer has room,
//!   so a consumer that stops taking bytes closes the TCP window
//!   (back-pressure instead of unbounded memory);
//! * `flush` hands queued bytes to the socket and keeps what the stack did
//!   not take (partial sends) for the next round;
//! * both notice the end of the connection: the peer's FIN once everything
//!   before it was read ([`SocketPump::peer_done`]), a reset or a failed
//!   call ([`SocketPump::is_broken`]).
//!
//! Neither blocks: a socket still connecting (or listening, for a pump
//! created on a listener) moves nothing yet. Every byte moved either way
//! counts as progress ([`SocketPump::last_progress_ns`]), which the owners'
//! deadlines use. The socket is released exactly once, by
//! [`SocketPump::release`], which consumes the pump.

use alloc::vec::Vec;
use hvcore::host::{NetStack, SocketId, TcpState};

/// One TCP socket with its receive and send buffers.
#[derive(Debug)]
pub struct SocketPump {
    socket: SocketId,
    /// The receive buffer: `rx_cap` bytes once the first read made it;
    /// `rx[rx_head..rx_end]` were received and not yet consumed. The socket
    /// writes straight into its free tail (one copy out of the stack; a
    /// stream moves every byte through here). Consuming moves only
    /// `rx_head`: the unconsumed bytes are moved to the front once per
    /// read, and only when the free tail is short, so a consumer taking
    /// small pieces costs no more than one taking everything (it used to
    /// move the whole rest on every `consume`: a 2 KiB reader of a full
    /// 256 KiB buffer moved ~60 times the bytes it read).
    rx: Vec<u8>,
    rx_head: usize,
    rx_end: usize,
    rx_cap: usize,
    /// The send queue: `tx[tx_head..tx_end]` wait for the socket;
    /// `tx[tx_end..]` is room a sender may write in place
    /// ([`SocketPump::queue_with`]). The queued bytes move to the front
    /// only when the room behind them is short.
    tx: Vec<u8>,
    tx_head: usize,
    tx_end: usize,
    tx_cap: usize,
    /// The peer sent its FIN and every byte before it was read from the
    /// socket.
    eof: bool,
    /// The connection was reset, closed under us, or a call failed.
    broken: bool,
    last_progress_ns: u64,
    received_total: u64,
    sent_total: u64,
}

impl SocketPump {
    /// A pump for `socket` (connected, connecting or listening) that buffers
    /// at most `rx_cap` received and `tx_cap` queued bytes.
    pub fn new(socket: SocketId, rx_cap: usize, tx_cap: usize, now_ns: u64) -> Self {
        Self {
            socket,
            rx: Vec::new(),
            rx_head: 0,
            rx_end: 0,
            rx_cap,
            tx: Vec::new(),
            tx_head: 0,
            tx_end: 0,
            tx_cap,
            eof: false,
            broken: false,
            last_progress_ns: now_ns,
            received_total: 0,
            sent_total: 0,
        }
    }

    /// The socket.
    pub fn socket(&self) -> SocketId {
        self.socket
    }
    /// The socket's state as the stack reports it.
    pub fn state(&self, net: &dyn NetStack) -> TcpState {
        net.tcp_state(self.socket)
    }
    /// Bytes queued and not yet acknowledged by the peer (in the stack).
    pub fn unacked(&self, net: &dyn NetStack) -> usize {
        net.tcp_unacked(self.socket)
    }

    /// Read from the socket while the receive buffer has room; returns the
    /// bytes read.
    pub fn read(&mut self, net: &mut dyn NetStack, now_ns: u64) -> usize {
        match net.tcp_state(self.socket) {
            TcpState::Listening | TcpState::Connecting => return 0,
            // The stack reports `PeerClosed` while bytes remain to be read,
            // so a closed socket has nothing left.
            TcpState::Closed => {
                self.broken = true;
                return 0;
            }
            TcpState::Open | TcpState::PeerClosed => {}
        }
        if self.rx.len() < self.rx_cap {
            self.rx.resize(self.rx_cap, 0);
        }
        // Room at the tail: move what is left to the front when the tail
        // is under a quarter of the buffer (at most one move per read).
        if self.rx_head > 0 && self.rx_cap - self.rx_end < self.rx_cap / 4 {
            self.rx.copy_within(self.rx_head..self.rx_end, 0);
            self.rx_end -= self.rx_head;
            self.rx_head = 0;
        }
        let mut total = 0;
        while self.rx_end < self.rx_cap {
            match net.tcp_recv(self.socket, &mut self.rx[self.rx_end..]) {
                Ok(0) => {
                    if net.tcp_state(self.socket) == TcpState::PeerClosed {
                        self.eof = true;
                    }
                    break;
                }
                Ok(n) => {
                    // A stack that claims more than it was given is capped.
                    let n = n.min(self.rx_cap - self.rx_end);
                    self.rx_end += n;
                    total += n;
                }
                Err(_) => {
                    self.broken = true;
                    break;
                }
            }
        }
        if total > 0 {
            self.received_total += total as u64;
            self.last_progress_ns = now_ns;
        }
        total
    }

    /// Bytes received and not yet consumed.
    pub fn received(&self) -> &[u8] {
        &self.rx[self.rx_head..self.rx_end]
    }
    /// Bytes received and not yet consumed, for a consumer that works on
    /// them in place (e.g. decrypts them) before it consumes them.
    pub fn received_mut(&mut self) -> &mut [u8] {
        &mut self.rx[self.rx_head..self.rx_end]
    }
    /// The peer sent its FIN and everything before it was read from the
    /// socket (some of it may not be consumed yet).
    pub fn fin_read(&self) -> bool {
        self.eof
    }
    /// The consumer is done with the first `n` received bytes.
    pub fn consume(&mut self, n: usize) {
        self.rx_head += n.min(self.rx_end - self.rx_head);
        if self.rx_head == self.rx_end {
            self.rx_head = 0;
            self.rx_end = 0;
        }
    }
    /// Take every received byte.
    pub fn take_received(&mut self) -> Vec<u8> {
        let bytes = self.received().to_vec();
        self.rx_head = 0;
        self.rx_end = 0;
        bytes
    }

    /// Bytes [`SocketPump::queue`] accepts now.
    pub fn send_room(&self) -> usize {
        self.tx_cap.saturating_sub(self.queued())
    }
    /// Bytes queued and not yet handed to the socket.
    pub fn queued(&self) -> usize {
        self.tx_end - self.tx_head
    }
    /// Room for `n` more bytes behind the queued ones (`n` at most
    /// [`SocketPump::send_room`]).
    fn tx_spare(&mut self, n: usize) -> &mut [u8] {
        if self.tx_head > 0 && self.tx_end + n > self.tx_cap {
            self.tx.copy_within(self.tx_head..self.tx_end, 0);
            self.tx_end -= self.tx_head;
            self.tx_head = 0;
        }
        if self.tx.len() < self.tx_end + n {
            self.tx.resize(self.tx_end + n, 0);
        }
        &mut self.tx[self.tx_end..self.tx_end + n]
    }
    /// Queue as much of `bytes` as fits; returns how many were queued.
    pub fn queue(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.send_room());
        self.tx_spare(n).copy_from_slice(&bytes[..n]);
        self.tx_end += n;
        n
    }
    /// Queue `n` bytes that `fill` writes in place (it returns how many
    /// it wrote, at most `n`), when `n` fits ([`SocketPump::send_room`]);
    /// `None` (nothing queued) when it does not.
    pub fn queue_with(&mut self, n: usize, fill: impl FnOnce(&mut [u8]) -> usize) -> Option<usize> {
        if n > self.send_room() {
            return None;
        }
        let written = fill(self.tx_spare(n)).min(n);
        self.tx_end += written;
        Some(written)
    }

    /// Hand queued bytes to the socket until it takes no more; returns the
    /// bytes sent.
    pub fn flush(&mut self, net: &mut dyn NetStack, now_ns: u64) -> usize {
        match net.tcp_state(self.socket) {
            TcpState::Listening | TcpState::Connecting => return 0,
            TcpState::Closed => {
                self.broken = true;
                return 0;
            }
            TcpState::Open | TcpState::PeerClosed => {}
        }
        let mut total = 0;
        while self.tx_head < self.tx_end {
            match net.tcp_send(self.socket, &self.tx[self.tx_head..self.tx_end]) {
                Ok(0) => break,
                Ok(n) => {
                    let n = n.min(self.tx_end - self.tx_head);
                    self.tx_head += n;
                    if self.tx_head == self.tx_end {
                        self.tx_head = 0;
                        self.tx_end = 0;
                    }
                    total += n;
                }
                Err(_) => {
                    self.broken = true;
                    break;
                }
            }
        }
        if total > 0 {
            self.sent_total += total as u64;
            self.last_progress_ns = now_ns;
        }
        total
    }

    /// The peer closed its side and every byte it sent was consumed.
    pub fn peer_done(&self) -> bool {
        self.eof && self.rx_head == self.rx_end
    }
    /// The connection is gone: reset, closed under us, or a call failed.
    pub fn is_broken(&self) -> bool {
        self.broken
    }
    /// When bytes last moved either way (or the pump was made).
    pub fn last_progress_ns(&self) -> u64 {
        self.last_progress_ns
    }
    /// Bytes read from the socket so far.
    pub fn received_total(&self) -> u64 {
        self.received_total
    }
    /// Bytes handed to the socket so far.
    pub fn sent_total(&self) -> u64 {
        self.sent_total
    }

    /// Release the socket: the stack finishes a graceful close in the
    /// background (bytes it took are still delivered) and frees it.
    /// Whatever is still queued here is dropped.
    pub fn release(self, net: &mut dyn NetStack) {
        net.tcp_release(self.socket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeNet;
    use hvcore::host::NicRole;

    fn open_pump(net: &mut FakeNet, rx_cap: usize, tx_cap: usize) -> SocketPump {
        let l = net.tcp_listen(NicRole::Management, 9).unwrap();
        net.peer_connect(9).unwrap();
        let mut p = SocketPump::new(l, rx_cap, tx_cap, 0);
        // Still connecting: nothing moves, nothing breaks.
        net.peer_send(l, b"early");
        assert_eq!(p.read(net, 1), 0);
        assert_eq!(p.flush(net, 1), 0);
        assert!(!p.is_broken());
        net.poll(0);
        p
    }

    #[test]
    fn reads_are_bounded_by_the_consumer() {
        let mut net = FakeNet::new();
        let mut p = open_pump(&mut net, 10, 16);
        let s = p.socket();
        net.peer_send(s, b" and a longer tail");
        assert_eq!(p.read(&mut net, 5), 10);
        assert_eq!(p.received(), b"early and ");
        assert_eq!(p.read(&mut net, 6), 0, "full: the rest waits in the stack");
        p.consume(6);
        assert_eq!(p.read(&mut net, 7), 6);
        assert_eq!(p.take_received(), b"and a long");
        assert_eq!(p.read(&mut net, 8), 7);
        assert_eq!(p.received(), b"er tail");
        assert_eq!((p.received_total(), p.last_progress_ns()), (23, 8));
        assert!(!p.peer_done());
    }

    /// A consumer taking small pieces between reads gets every byte once,
    /// in order, and the buffer never holds more than its cap.
    #[test]
    fn small_consumers_get_every_byte_in_order() {
        let mut net = FakeNet::new();
        let mut p = open_pump(&mut net, 64, 16);
        let s = p.socket();
        let sent: Vec<u8> = (0..5000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        net.peer_send(s, &sent);
        let mut got = b"early".to_vec();
        p.read(&mut net, 1);
        p.consume(5);
        for round in 0..2000usize {
            p.read(&mut net, 2 + round as u64);
            assert!(p.received().len() <= 64);
            let take = (round * 13 % 29).min(p.received().len());
            got.extend_from_slice(&p.received()[..take]);
            p.consume(take);
        }
        got.extend_from_slice(&p.take_received());
        assert_eq!(&got[5..], &sent[..]);
    }

    #[test]
    fn partial_sends_keep_the_rest_in_order() {
        let mut net = FakeNet::new();
        net.send_room = 3;
        let mut p = open_pump(&mut net, 16, 8);
        let s = p.socket();
        assert_eq!(p.queue(b"0123456789"), 8, "queue is capped");
        assert_eq!(p.send_room(), 0);
        // The fake takes 3 bytes per call; with a window of 5 the peer's
        // side is full after two calls.
        net.peer_window(s, 5);
        assert_eq!(p.flush(&mut net, 3), 5);
        assert_eq!(p.flush(&mut net, 4), 0, "a peer that does not read");
        assert_eq!(p.last_progress_ns(), 3);
        assert_eq!(net.peer_take(s), b"01234");
        assert_eq!(p.queue(b"89"), 2);
        assert_eq!(p.flush(&mut net, 5), 5);
        assert_eq!(net.peer_take(s), b"56789");
        assert_eq!((p.queued(), p.sent_total()), (0, 10));
    }

    /// Bytes written in place join the queue in order, behind what was
    /// queued before, also when the queue's front moved and what is left
    /// must move to make room; more than the room is refused whole.
    #[test]
    fn bytes_written_in_place_keep_their_order() {
        let mut net = FakeNet::new();
        net.send_room = 4;
        let mut p = open_pump(&mut net, 16, 10);
        let s = p.socket();
        assert_eq!(p.queue(b"abc"), 3);
        let fill = |text: &'static [u8]| {
            move |room: &mut [u8]| {
                room[..text.len()].copy_from_slice(text);
                text.len()
            }
        };
        assert_eq!(p.queue_with(5, fill(b"defgh")), Some(5));
        assert_eq!(p.queue_with(3, fill(b"ijk")), None, "2 bytes of room");
        assert_eq!(p.queued(), 8);
        net.peer_window(s, 4);
        assert_eq!(p.flush(&mut net, 1), 4);
        let mut got = net.peer_take(s);
        // 4 sent from the front; 6 of room, of which only 2 behind the
        // queued bytes: they move to the front first.
        assert_eq!(p.queue_with(6, fill(b"ijklm")), Some(5), "wrote 5 of 6");
        assert_eq!(p.queued(), 9);
        for t in 2..10 {
            p.flush(&mut net, t);
            got.extend(net.peer_take(s));
        }
        assert_eq!(got, b"abcdefghijklm");
    }

    #[test]
    fn end_of_stream_and_resets_are_noticed() {
        let mut net = FakeNet::new();
        let mut p = open_pump(&mut net, 16, 16);
        let s = p.socket();
        net.peer_close(s);
        assert_eq!(p.read(&mut net, 1), 5, "bytes before the FIN are read");
        assert!(!p.peer_done(), "not yet consumed");
        p.consume(5);
        assert!(p.peer_done());
        assert!(!p.is_broken());
        // A reset (the stack reports Closed) breaks both directions.
        let mut q = open_pump(&mut net, 16, 16);
        let t = q.socket();
        q.queue(b"x");
        net.sockets.get_mut(&t.0).unwrap().state = TcpState::Closed;
        assert_eq!(q.flush(&mut net, 2), 0);
        assert!(q.is_broken());
        q.release(&mut net);
        assert!(net.released(t));
    }
}
