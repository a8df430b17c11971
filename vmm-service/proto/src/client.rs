//! The client end of a management connection: bytes in, bytes out, no I/O
//! of its own (the caller moves bytes to and from its socket).
//!
//! States: `AwaitHello` (the node's greeting with its nonce) ->
//! `AwaitWelcome` (our proof sent) -> `Ready` (the node proved it holds the
//! cluster key too: mutual authentication; requests and replies are session
//! frames) or `Failed` (refused, or the node broke the protocol; nothing
//! more is accepted). Replies carry the id [`ClientConn::request`] returned.

use crate::auth::{hex_decode, hex_encode, nonce_from_hex, ClusterKey, Nonce, Session, Side};
use crate::proto::{
    detail, to_json, ApiError, Auth, Handshake, Request, RequestFrame, ResponseFrame, MAGIC,
    PROTOCOL_VERSION,
};
use crate::wire::{self, FrameDecoder};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// What the client end learned from received bytes.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientEvent {
    /// The handshake completed; the node's name.
    Authenticated { node: String },
    /// A reply.
    Response(ResponseFrame),
}

/// Why the client end gave up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// The node refused (wrong key, version, ...).
    Refused(ApiError),
    /// The node's proof was wrong: it does not hold the cluster key.
    ServerNotAuthenticated,
    /// The node broke the protocol.
    Protocol(String),
    /// A request before the handshake completed.
    NotReady,
    /// A request whose frame would exceed the frame limit (nothing sent).
    TooLarge { bytes: usize },
}

impl core::fmt::Display for ClientError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ClientError::Refused(e) => write!(f, "the node refused: {e}"),
            ClientError::ServerNotAuthenticated => write!(
                f,
                "the node could not prove it holds the cluster key (wrong key, or not our node)"
            ),
            ClientError::Protocol(m) => write!(f, "protocol error from the node: {m}"),
            ClientError::NotReady => write!(f, "not authenticated yet"),
            ClientError::TooLarge { bytes } => write!(
                f,
                "a request of {bytes} bytes does not fit in a frame (at most {} with its tag)",
                wire::FRAME_BODY_MAX
            ),
        }
    }
}

enum ClientState {
    AwaitHello,
    AwaitWelcome { server: Nonce },
    Ready(Session),
    Failed,
}

/// The client end of a management connection.
pub struct ClientConn {
    key: ClusterKey,
    nonce: Nonce,
    state: ClientState,
    decoder: FrameDecoder,
    out: Vec<u8>,
    next_id: u64,
    node: String,
}

impl ClientConn {
    /// A client holding `key`, with a fresh `nonce`.
    pub fn new(key: ClusterKey, nonce: Nonce) -> Self {
        Self {
            key,
            nonce,
            state: ClientState::AwaitHello,
            decoder: FrameDecoder::new(),
            out: Vec::new(),
            next_id: 1,
            node: String::new(),
        }
    }

    /// Whether the handshake completed.
    pub fn is_ready(&self) -> bool {
        matches!(self.state, ClientState::Ready(_))
    }

    /// Take the bytes to send.
    pub fn take_output(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.out)
    }

    /// Queue a request; returns its id.
    pub fn request(&mut self, request: Request) -> Result<u64, ClientError> {
        let id = self.next_id;
        let json = to_json(&RequestFrame { id, request });
        self.send_payload(&json)?;
        self.next_id += 1;
        Ok(id)
    }

    /// Queue a session frame carrying `payload` as it is, correctly tagged
    /// but not necessarily a valid request: what tests and the fuzz harness
    /// use to make the node parse arbitrary request bodies. Replies to it
    /// carry whatever id the node found in it (0 when none).
    pub fn send_payload(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        let ClientState::Ready(session) = &mut self.state else {
            return Err(ClientError::NotReady);
        };
        if payload.len() + crate::auth::TAG_BYTES > wire::FRAME_BODY_MAX {
            return Err(ClientError::TooLarge {
                bytes: payload.len(),
            });
        }
        let sealed = session.seal(payload);
        wire::encode(&sealed, &mut self.out).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    fn fail<T>(&mut self, e: ClientError) -> Result<T, ClientError> {
        self.state = ClientState::Failed;
        Err(e)
    }

    /// Bytes arrived from the node.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Vec<ClientEvent>, ClientError> {
        self.decoder.push(bytes);
        let mut events = Vec::new();
        loop {
            let body = match self.decoder.next_frame() {
                Ok(Some(b)) => b,
                Ok(None) => return Ok(events),
                Err(e) => return self.fail(ClientError::Protocol(e.to_string())),
            };
            match &mut self.state {
                ClientState::Failed => return Err(ClientError::NotReady),
                ClientState::Ready(session) => {
                    let payload = match session.open(&body) {
                        Ok(p) => p,
                        Err(e) => return self.fail(ClientError::Protocol(e.to_string())),
                    };
                    match serde_json::from_slice::<ResponseFrame>(payload) {
                        Ok(r) => events.push(ClientEvent::Response(r)),
                        Err(e) => return self.fail(ClientError::Protocol(detail(&e))),
                    }
                }
                ClientState::AwaitHello | ClientState::AwaitWelcome { .. } => {
                    let msg = match serde_json::from_slice::<Handshake>(&body) {
                        Ok(m) => m,
                        Err(e) => return self.fail(ClientError::Protocol(detail(&e))),
                    };
                    if let Some(ev) = self.handshake(msg)? {
                        events.push(ev);
                    }
                }
            }
        }
    }

    fn handshake(&mut self, msg: Handshake) -> Result<Option<ClientEvent>, ClientError> {
        match (&self.state, msg) {
            (_, Handshake::Error(e)) => self.fail(ClientError::Refused(e)),
            (ClientState::AwaitHello, Handshake::Hello(h)) => {
                if h.magic != MAGIC {
                    return self.fail(ClientError::Protocol("not an hvmigrate node".into()));
                }
                if !h.versions.contains(&PROTOCOL_VERSION) {
                    return self.fail(ClientError::Protocol(format!(
                        "the node speaks protocol versions {:?}, this client {PROTOCOL_VERSION}",
                        h.versions
                    )));
                }
                let Some(server) = nonce_from_hex(&h.nonce) else {
                    return self.fail(ClientError::Protocol("bad server nonce".into()));
                };
                let auth = Handshake::Auth(Auth {
                    version: PROTOCOL_VERSION,
                    nonce: hex_encode(&self.nonce),
                    proof: hex_encode(&self.key.client_proof(&server, &self.nonce)),
                });
                let _ = wire::encode(&to_json(&auth), &mut self.out);
                self.node = h.node;
                self.state = ClientState::AwaitWelcome { server };
                Ok(None)
            }
            (ClientState::AwaitWelcome { server }, Handshake::Welcome(w)) => {
                let server = *server;
                let proof = hex_decode(&w.proof).unwrap_or_default();
                if !self.key.verify_server(&server, &self.nonce, &proof) {
                    return self.fail(ClientError::ServerNotAuthenticated);
                }
                self.state =
                    ClientState::Ready(self.key.session(&server, &self.nonce, Side::Client));
                Ok(Some(ClientEvent::Authenticated {
                    node: self.node.clone(),
                }))
            }
            _ => self.fail(ClientError::Protocol("unexpected handshake message".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{fresh_nonce, TestEntropy};
    use crate::proto::{Hello, Welcome};
    use alloc::vec;

    fn key() -> ClusterKey {
        ClusterKey::from_hex("000102030405060708090a0b0c0d0e0f").unwrap()
    }

    #[test]
    fn a_node_without_the_key_is_refused_by_the_client() {
        // Server holds another key: the client's proof fails there first,
        // so fake a server that accepts anything and sends a bad proof.
        let mut e = TestEntropy(3);
        let mut client = ClientConn::new(key(), fresh_nonce(&mut e, 1));
        let mut bytes = Vec::new();
        let hello = Handshake::Hello(Hello {
            magic: MAGIC.into(),
            versions: vec![1],
            node: "evil".into(),
            nonce: "22".repeat(32),
        });
        wire::encode(&to_json(&hello), &mut bytes).unwrap();
        let welcome = Handshake::Welcome(Welcome {
            proof: "33".repeat(32),
        });
        wire::encode(&to_json(&welcome), &mut bytes).unwrap();
        assert_eq!(
            client.receive(&bytes),
            Err(ClientError::ServerNotAuthenticated)
        );
        assert!(client.request(Request::NodeInfo).is_err());
    }
}
