//! The management server: the node's management connections, each a
//! [`ServerConn`] (the protocol) over a [`SocketPump`] (the bytes), in a
//! bounded set of slots on the management NIC.
//!
//! Polled by the node loop between VM time slices, in steps so that network
//! access and request handling never hold the host at once: (1) with the
//! [`NetStack`]: poll, notice a new connection on the listener; (2) with the
//! host: a fresh nonce for it; (3) with the [`NetStack`]: admit it, run
//! every connection's deadline, read; (4) with the host: answer complete
//! requests; (5) with the [`NetStack`]: send, release connections that are
//! finished, past their closing deadline or gone, and keep a listener open
//! while a connection could be admitted.
//!
//! Slots (docs/MANAGEMENT.md, "Limits"): at most [`CONNECTIONS_MAX`]
//! connections, of which at most [`UNAUTHENTICATED_MAX`] are not
//! authenticated sessions (still in the handshake, or closing). A new
//! connection that would exceed either budget takes the slot of a closing
//! connection, else of the oldest one still in its handshake
//! ([`make_room`]); authenticated sessions are never evicted, so peers that
//! never authenticate (or reconnect whenever they are dropped) cannot lock
//! out a client holding the key. Every state has a deadline (conn.rs:
//! handshake 10 s, idle session 120 s, closing 5 s), so every slot frees
//! on its own too. When every slot is an authenticated session no listener
//! is open (the stack refuses connections) until one ends.

use super::auth::{fresh_nonce, ClusterKey, Entropy, ReplayGuard};
use super::conn::ServerConn;
use super::proto::{ErrorCode, Request};
use super::service::Managed;
use crate::pump::SocketPump;
use alloc::vec::Vec;
use hvcore::host::{Host, NetStack, NicRole, SocketId, TcpState};

/// Most management connections served at once.
pub const CONNECTIONS_MAX: usize = 4;
/// Most of them that may be unauthenticated (in the handshake or closing).
pub const UNAUTHENTICATED_MAX: usize = 2;
/// Bytes read from one connection per round.
pub const READ_CHUNK: usize = 4096;
/// Replies handed to one connection's socket buffer per round at most; the
/// rest waits in the connection (whose own limit stops it reading).
pub const SEND_QUEUE_BYTES: usize = 64 * 1024;

/// What a slot holds, for the admission policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    /// An authenticated session: never evicted.
    Session,
    /// Waiting for the client's `auth`.
    Handshake,
    /// Closing: its last reply is on the way out.
    Closing,
}

/// Admission: the slot to give up (by index into `slots`, oldest first) so
/// that one more connection fits; `Ok(None)` when it fits as it is, `Err`
/// when it cannot be admitted because every slot is an authenticated
/// session.
pub fn make_room(slots: &[SlotKind]) -> Result<Option<usize>, Full> {
    let unauthenticated = slots.iter().filter(|k| **k != SlotKind::Session).count();
    if slots.len() < CONNECTIONS_MAX && unauthenticated < UNAUTHENTICATED_MAX {
        return Ok(None);
    }
    slots
        .iter()
        .position(|k| *k == SlotKind::Closing)
        .or_else(|| slots.iter().position(|k| *k == SlotKind::Handshake))
        .map(Some)
        .ok_or(Full)
}

/// Every slot is an authenticated session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full;

/// A connection being served.
#[derive(Debug)]
struct Slot {
    pump: SocketPump,
    conn: ServerConn,
}

impl Slot {
    fn kind(&self) -> SlotKind {
        if self.conn.is_authenticated() {
            SlotKind::Session
        } else if self.conn.is_closing() {
            SlotKind::Closing
        } else {
            SlotKind::Handshake
        }
    }

    /// Move the connection's output to the socket as far as it goes.
    fn send(&mut self, net: &mut dyn NetStack, now_ns: u64) {
        loop {
            let n = self.pump.queue(self.conn.output());
            self.conn.consume_output(n);
            if self.pump.flush(net, now_ns) == 0 || n == 0 {
                return;
            }
        }
    }

    /// Whether the slot is free: finished, past its closing deadline, or
    /// the connection is gone.
    fn is_done(&self) -> bool {
        self.pump.is_broken()
            || self.conn.is_expired()
            || (self.conn.is_finished() && self.pump.queued() == 0)
    }
}

/// Entropy drawn from the host (`Host::entropy`): the management
/// server's nonces and the migration link's.
pub(crate) struct HostEntropy<'a>(pub &'a mut dyn Host);

impl Entropy for HostEntropy<'_> {
    fn fill(&mut self, buf: &mut [u8]) {
        self.0.entropy(buf);
    }
}

/// The management server on the management NIC.
pub struct MgmtServer {
    key: ClusterKey,
    port: u16,
    listener: Option<SocketId>,
    slots: Vec<Slot>,
    replay: ReplayGuard,
    nonces: u64,
    /// Connections accepted so far.
    pub accepted: u64,
    /// Connections closed to make room for a newer one.
    pub evicted: u64,
}

impl MgmtServer {
    /// A server for `key` on TCP `port`.
    pub fn new(key: ClusterKey, port: u16) -> Self {
        Self {
            key,
            port,
            listener: None,
            slots: Vec::new(),
            replay: ReplayGuard::new(),
            nonces: 0,
            accepted: 0,
            evicted: 0,
        }
    }

    /// Connections being served.
    pub fn connections(&self) -> usize {
        self.slots.len()
    }
    /// Authenticated sessions among them.
    pub fn sessions(&self) -> usize {
        self.kinds().filter(|k| *k == SlotKind::Session).count()
    }
    /// Whether a listener is open for the next connection.
    pub fn is_listening(&self) -> bool {
        self.listener.is_some()
    }

    fn kinds(&self) -> impl Iterator<Item = SlotKind> + '_ {
        self.slots.iter().map(Slot::kind)
    }

    /// One round of serving: network in, requests answered, network out.
    pub fn poll(&mut self, host: &mut dyn Host, node: &mut Managed) {
        let now = host.now_ns();
        // (1) A new connection on the listener?
        let arrived = {
            let Some(net) = host.net() else { return };
            net.poll(now);
            self.take_arrival(net)
        };
        // (2) Its nonce.
        let newcomer = arrived.map(|socket| {
            self.nonces += 1;
            let nonce = fresh_nonce(&mut HostEntropy(&mut *host), self.nonces);
            (socket, ServerConn::new(node.name(), nonce, now))
        });
        // (3) Admit, deadlines, read.
        let Some(net) = host.net() else { return };
        if let Some((socket, conn)) = newcomer {
            self.admit(net, socket, conn, now);
        }
        for s in &mut self.slots {
            s.conn.tick(now);
            if s.conn.wants_input() {
                s.pump.read(net, now);
            }
            if s.pump.peer_done() {
                // Nothing more will come: answer what arrived, then close.
                s.conn.peer_closed();
            }
        }
        // (4) Answer.
        for s in &mut self.slots {
            let bytes = s.pump.take_received();
            let mut handler = |req: Request| node.handle(&mut *host, req);
            if bytes.is_empty() {
                s.conn.process(&self.key, &mut self.replay, &mut handler);
            } else {
                s.conn
                    .receive(&bytes, &self.key, &mut self.replay, &mut handler);
            }
        }
        // (5) Send, release, listen.
        let Some(net) = host.net() else { return };
        let mut i = 0;
        while i < self.slots.len() {
            self.slots[i].send(net, now);
            if self.slots[i].is_done() {
                self.slots.remove(i).pump.release(net);
            } else {
                i += 1;
            }
        }
        self.keep_listening(net);
    }

    /// The listener's connection, if a peer connected to it.
    fn take_arrival(&mut self, net: &mut dyn NetStack) -> Option<SocketId> {
        let l = self.listener?;
        match net.tcp_state(l) {
            TcpState::Listening => None,
            TcpState::Closed => {
                self.listener = None;
                net.tcp_release(l);
                None
            }
            _ => {
                self.listener = None;
                self.accepted += 1;
                Some(l)
            }
        }
    }

    /// Give the new connection a slot, evicting as [`make_room`] says; when
    /// every slot is an authenticated session it is refused instead.
    fn admit(&mut self, net: &mut dyn NetStack, socket: SocketId, conn: ServerConn, now: u64) {
        let kinds: Vec<SlotKind> = self.kinds().collect();
        let mut slot = Slot {
            pump: SocketPump::new(socket, READ_CHUNK, SEND_QUEUE_BYTES, now),
            conn,
        };
        match make_room(&kinds) {
            Ok(None) => self.slots.push(slot),
            Ok(Some(victim)) => {
                self.evicted += 1;
                let mut old = self.slots.remove(victim);
                if old.kind() == SlotKind::Handshake {
                    old.conn.close_with(
                        ErrorCode::NoResources,
                        "too many unauthenticated connections: the oldest was closed",
                    );
                    old.send(net, now);
                }
                old.pump.release(net);
                self.slots.push(slot);
            }
            // Unreachable while `keep_listening` runs at the end of every
            // round (the slots cannot change between it and this), kept so
            // that a connection is never admitted beyond the budget.
            Err(Full) => {
                slot.conn.close_with(
                    ErrorCode::NoResources,
                    "every connection slot is held by an authenticated session",
                );
                slot.send(net, now);
                slot.pump.release(net);
            }
        }
    }

    /// A listener is open exactly while a new connection could be admitted.
    fn keep_listening(&mut self, net: &mut dyn NetStack) {
        let kinds: Vec<SlotKind> = self.kinds().collect();
        let wanted = make_room(&kinds).is_ok();
        match (wanted, self.listener) {
            // On failure (no socket free) try again next round.
            (true, None) => self.listener = net.tcp_listen(NicRole::Management, self.port).ok(),
            (false, Some(l)) => {
                self.listener = None;
                net.tcp_release(l);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::conn::{CLOSING_TIMEOUT_NS, HANDSHAKE_TIMEOUT_NS, SESSION_IDLE_NS};
    use super::super::proto::{Outcome, Request};
    use super::super::rig::{Rig, KEY, PORT};
    use super::*;
    use SlotKind::{Closing, Handshake, Session};

    #[test]
    fn admission_policy() {
        assert_eq!(make_room(&[]), Ok(None));
        assert_eq!(make_room(&[Session, Session, Handshake]), Ok(None));
        // The unauthenticated budget: the oldest handshake goes.
        assert_eq!(make_room(&[Handshake, Session, Handshake]), Ok(Some(0)));
        // A closing connection goes before any handshake.
        assert_eq!(make_room(&[Handshake, Closing]), Ok(Some(1)));
        assert_eq!(
            make_room(&[Session, Session, Session, Handshake]),
            Ok(Some(3))
        );
        assert_eq!(make_room(&[Session; CONNECTIONS_MAX]), Err(Full));
    }

    fn ok(o: &Outcome) -> bool {
        matches!(o, Outcome::Ok(_))
    }

    #[test]
    fn a_peer_that_never_reads_loses_its_slot() {
        let mut r = Rig::new();
        // It connects and never takes a byte (its window is zero).
        let deaf = r.open().unwrap();
        r.net().peer_window(deaf, 0);
        r.round();
        r.round();
        assert_eq!(r.server.connections(), 1);
        // An authenticated client that stops reading too.
        let (s, mut c, res) = r.connect(KEY, 1);
        res.unwrap();
        r.net().peer_window(s, 0);
        c.request(Request::VmList).unwrap();
        r.exchange(s, &mut c, 2).unwrap();
        assert_eq!(r.server.connections(), 2);
        // The handshake deadline closes the first; it never takes the
        // refusal, and the closing deadline frees its slot.
        r.advance(HANDSHAKE_TIMEOUT_NS);
        r.round();
        assert_eq!(r.server.connections(), 2, "closing, its refusal unsent");
        r.advance(CLOSING_TIMEOUT_NS);
        r.round();
        assert!(
            r.net().released(deaf),
            "released after the closing deadline"
        );
        assert_eq!(r.server.connections(), 1);
        // The silent session: idle deadline, then closing deadline.
        r.advance(SESSION_IDLE_NS);
        r.round();
        r.advance(CLOSING_TIMEOUT_NS);
        r.round();
        assert!(r.net().released(s));
        assert_eq!(r.server.connections(), 0);
    }

    #[test]
    fn reconnecting_peers_cannot_lock_out_a_client_with_the_key() {
        let mut r = Rig::new();
        r.net().max_sockets = 64;
        // A client authenticated before the attack.
        let (a, mut ca, res) = r.connect(KEY, 1);
        res.unwrap();
        // Four peers that never authenticate; each reconnects 10 s after
        // it connected (as soon as its last connection timed out), over two
        // minutes of node time. They take every listener they can.
        let mut attackers: Vec<(SocketId, u64)> = Vec::new();
        let mut late_client_served = false;
        for second in 0..120u64 {
            for _ in 0..4 {
                let now = r.host.now_ns();
                let due = attackers.len() < 4
                    || attackers
                        .iter()
                        .any(|(_, at)| now.saturating_sub(*at) >= HANDSHAKE_TIMEOUT_NS);
                if due {
                    if let Some(s) = r.open() {
                        attackers.retain(|(_, at)| now.saturating_sub(*at) < HANDSHAKE_TIMEOUT_NS);
                        attackers.push((s, now));
                    }
                }
            }
            assert!(
                r.server.connections() <= CONNECTIONS_MAX,
                "{}",
                r.server.connections()
            );
            // The authenticated client keeps being served.
            if second % 5 == 0 {
                assert!(
                    ok(&r.call(a, &mut ca, Request::NodeInfo)),
                    "second {second}"
                );
            }
            // A client arriving in the middle of the attack gets in.
            if second == 37 {
                let (b, mut cb, res) = r.connect(KEY, 2);
                res.unwrap_or_else(|e| panic!("the late client was locked out: {e}"));
                late_client_served = ok(&r.call(b, &mut cb, Request::VmList));
            }
            r.advance(1_000_000_000);
        }
        assert!(late_client_served);
        assert!(r.server.evicted > 0);
        assert!(r.server.sessions() >= 1);
    }

    #[test]
    fn sessions_are_never_evicted_and_a_full_house_stops_listening() {
        let mut r = Rig::new();
        r.net().max_sockets = 16;
        let mut clients = Vec::new();
        for seed in 0..CONNECTIONS_MAX as u64 {
            let (s, c, res) = r.connect(KEY, 10 + seed);
            res.unwrap();
            clients.push((s, c));
        }
        r.round();
        assert_eq!(r.server.sessions(), CONNECTIONS_MAX);
        assert!(!r.server.is_listening());
        assert!(r.net().peer_connect(PORT).is_none(), "refused by the stack");
        // Every session is still served.
        for (s, c) in &mut clients {
            assert!(ok(&r.call(*s, c, Request::JobList)));
        }
        // One goes quiet: after the idle deadline (and its last reply) its
        // slot frees and the listener comes back.
        let t = r.host.now_ns();
        for step in 1..=4 {
            r.advance(SESSION_IDLE_NS / 4);
            if step < 4 {
                for (s, c) in clients.iter_mut().skip(1) {
                    assert!(ok(&r.call(*s, c, Request::HostGet)));
                }
            }
        }
        assert!(r.host.now_ns() >= t + SESSION_IDLE_NS);
        r.round();
        r.round();
        assert_eq!(r.server.sessions(), CONNECTIONS_MAX - 1);
        assert!(r.server.is_listening());
        let (s, mut c, res) = r.connect(KEY, 99);
        res.unwrap();
        assert!(ok(&r.call(s, &mut c, Request::VmList)));
    }

    #[test]
    fn bad_key_and_garbage_connections_leave_the_node_serving() {
        let mut r = Rig::new();
        let (s_bad, _c, res) = r.connect("ffffffffffffffffffffffffffffffff", 3);
        assert!(
            matches!(res, Err(hvmgmt::client::ClientError::Refused(ref e)) if e.code == ErrorCode::AuthFailed),
            "{res:?}"
        );
        // Garbage, then a peer that just vanishes.
        let g = r.open().unwrap();
        r.net()
            .peer_send(g, b"\x00\x00\x00\x05hello GET / HTTP/1.0\r\n\r\n");
        r.round();
        r.round();
        let reply = r.net().peer_take(g);
        assert!(String::from_utf8_lossy(&reply).contains("bad-request"));
        let v = r.open().unwrap();
        r.net().peer_close(v);
        for _ in 0..3 {
            r.round();
        }
        // A good client is still served, and dead connections were released.
        let (s, mut c, ok_) = r.connect(KEY, 4);
        ok_.unwrap();
        assert!(ok(&r.call(s, &mut c, Request::VmList)));
        assert!(r.server.connections() <= 2, "{}", r.server.connections());
        assert!(r.net().released(s_bad), "refused connection released");
        assert!(r.net().released(v), "vanished peer released");
    }

    #[test]
    fn idle_handshakes_time_out_and_free_their_slots() {
        let mut r = Rig::new();
        r.net().max_sockets = 16;
        let mut held = Vec::new();
        for _ in 0..UNAUTHENTICATED_MAX {
            held.push(r.open().unwrap());
        }
        r.round();
        r.round();
        assert_eq!(r.server.connections(), UNAUTHENTICATED_MAX);
        // They time out, take their refusals (the fake peers read) and go.
        r.advance(HANDSHAKE_TIMEOUT_NS);
        r.round();
        r.round();
        assert_eq!(r.server.connections(), 0);
        for s in held {
            assert!(r.net().released(s));
            let reply = String::from_utf8_lossy(&r.net().peer_take(s)).into_owned();
            assert!(reply.contains("no authentication within 10 s"), "{reply}");
        }
        let (s, mut c, res) = r.connect(KEY, 5);
        res.unwrap();
        assert!(ok(&r.call(s, &mut c, Request::NodeInfo)));
    }
}
