//! A managed node on the test doubles, with clients talking to it over the
//! fake network: what the host tests of the server and the handlers and the
//! fuzz harnesses drive. Not API (built for tests and with the `testing`
//! feature only).

use super::auth::{fresh_nonce, ClusterKey, TestEntropy};
use super::proto::{Outcome, Request, ResponseFrame};
use super::server::MgmtServer;
use super::service::{Managed, NodeIdentity};
use crate::testing::{FakeHost, FakeNet};
use alloc::vec::Vec;
use hvcore::host::{Host, SocketId};
use hvmgmt::client::{ClientConn, ClientError, ClientEvent};

/// The node's cluster key.
pub const KEY: &str = "00112233445566778899aabbccddeeff";
/// The management port.
pub const PORT: u16 = 7000;
/// The rig node's migration port.
pub const MIG_PORT: u16 = 7100;

/// A node named `a` with a fake NIC, its VM table and its server.
pub struct Rig {
    pub host: FakeHost,
    pub node: Managed,
    pub server: MgmtServer,
}

impl Default for Rig {
    fn default() -> Self {
        Self::new()
    }
}

impl Rig {
    /// A node with no VMs and no connection.
    pub fn new() -> Self {
        let mut host = FakeHost::new();
        host.net = Some(FakeNet::new());
        host.ns_per_run = 100_000;
        let image = host.module.clone().unwrap_or_default();
        let identity = NodeIdentity {
            name: "a".into(),
            ..NodeIdentity::default()
        };
        let key = ClusterKey::from_hex(KEY).unwrap_or_else(|_| unreachable!("a valid key"));
        let node = Managed::new(&mut host, identity, image, key.clone(), MIG_PORT);
        Rig {
            host,
            node,
            server: MgmtServer::new(key, PORT),
        }
    }

    /// The fake network (the node always has one here).
    pub fn net(&mut self) -> &mut FakeNet {
        self.host
            .net
            .as_mut()
            .unwrap_or_else(|| unreachable!("the rig's host has a network"))
    }

    /// One round of the node loop's network side.
    pub fn round(&mut self) {
        self.server.poll(&mut self.host, &mut self.node);
        self.node.drive_jobs(&mut self.host);
    }

    /// Advance the clock by `ns`.
    pub fn advance(&mut self, ns: u64) {
        let now = self.host.now_ns();
        self.host.clock.set(now + ns);
    }

    /// A peer connects, if a listener is open after a round.
    pub fn open(&mut self) -> Option<SocketId> {
        self.round();
        self.net().peer_connect(PORT)
    }

    /// A client with `key` (hex) on a new connection, through the
    /// handshake; the socket, the client and how the handshake ended.
    pub fn connect(
        &mut self,
        key: &str,
        seed: u64,
    ) -> (SocketId, ClientConn, Result<(), ClientError>) {
        let s = self.open().unwrap_or_else(|| panic!("no listener open"));
        let key = ClusterKey::from_hex(key).unwrap_or_else(|e| panic!("{e}"));
        let mut c = ClientConn::new(key, fresh_nonce(&mut TestEntropy(seed), 1));
        let r = self.handshake(s, &mut c);
        (s, c, r)
    }

    /// Run the handshake of `c` on socket `s`.
    pub fn handshake(&mut self, s: SocketId, c: &mut ClientConn) -> Result<(), ClientError> {
        for _ in 0..6 {
            self.round();
            let bytes = self.net().peer_take(s);
            c.receive(&bytes)?;
            let out = c.take_output();
            self.net().peer_send(s, &out);
            if c.is_ready() {
                return Ok(());
            }
        }
        Err(ClientError::NotReady)
    }

    /// Send what `c` queued and run `rounds` rounds; the events `c` saw.
    pub fn exchange(
        &mut self,
        s: SocketId,
        c: &mut ClientConn,
        rounds: usize,
    ) -> Result<Vec<ClientEvent>, ClientError> {
        let out = c.take_output();
        self.net().peer_send(s, &out);
        let mut events = Vec::new();
        for _ in 0..rounds {
            self.round();
            let bytes = self.net().peer_take(s);
            events.extend(c.receive(&bytes)?);
        }
        Ok(events)
    }

    /// One request and its reply (panics without one: tests only).
    pub fn call(&mut self, s: SocketId, c: &mut ClientConn, req: Request) -> Outcome {
        let id = c.request(req).unwrap_or_else(|e| panic!("{e}"));
        let out = c.take_output();
        self.net().peer_send(s, &out);
        for _ in 0..4 {
            self.round();
            let bytes = self.net().peer_take(s);
            for ev in c.receive(&bytes).unwrap_or_else(|e| panic!("{e}")) {
                if let ClientEvent::Response(ResponseFrame { id: got, outcome }) = ev {
                    assert_eq!(got, id);
                    return outcome;
                }
            }
        }
        panic!("no reply");
    }
}
