//! The server end of a management connection: bytes in, bytes out, no I/O
//! of its own (the server moves them through a socket pump).
//!
//! States, each with a deadline so that no connection holds a slot of the
//! node for ever:
//! * `AwaitAuth` (the greeting with the server nonce is queued on
//!   creation): authenticate within [`HANDSHAKE_TIMEOUT_NS`];
//! * `Ready` (authenticated session; every request gets exactly one reply
//!   with the request's id): a request at least every [`SESSION_IDLE_NS`];
//! * `Closing` (the last reply is queued; the transport releases the
//!   connection once it is sent): the peer has [`CLOSING_TIMEOUT_NS`] to
//!   take it, then `Closed`: released with whatever was not sent (a peer
//!   that never reads its replies gets nothing more).
//!
//! A wrong proof, a replayed nonce, a version mismatch, an oversized frame,
//! a frame whose tag does not verify, [`PREAUTH_ERRORS_MAX`]
//! unauthenticated requests or a missed deadline move it to `Closing` with
//! an error reply. A malformed request in `Ready` gets an error reply and
//! the connection carries on. The client end is `hvmgmt::client`.
//!
//! Replay window ([`ReplayGuard`], per node): a client nonce seen in a
//! handshake that succeeded recently is refused; a nonce is recorded only
//! after its proof verified, so forged `auth` messages can neither push real
//! nonces out of the window nor get a legitimate client's nonce refused.
//!
//! Back-pressure: the server stops taking frames while more than
//! [`OUTPUT_HIGH_BYTES`] of replies wait to be sent; transports read only
//! while [`ServerConn::wants_input`].

use alloc::format;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;
use hvmgmt::auth::{
    hex_decode, hex_encode, nonce_from_hex, AuthError, ClusterKey, Nonce, ReplayGuard, Session,
    Side, TAG_BYTES,
};
use hvmgmt::proto::{
    detail, to_json, ApiError, ErrorCode, Handshake, Hello, Outcome, Request, RequestFrame,
    ResponseFrame, Welcome, MAGIC, PROTOCOL_VERSION,
};
use hvmgmt::wire::{self, FrameDecoder, FrameError};
use serde::Deserialize;

/// Unauthenticated frames tolerated before the server closes.
pub const PREAUTH_ERRORS_MAX: u32 = 3;
/// Time a client has to authenticate.
pub const HANDSHAKE_TIMEOUT_NS: u64 = 10_000_000_000;
/// Time an authenticated session may stay without a request.
pub const SESSION_IDLE_NS: u64 = 120_000_000_000;
/// Time a closing connection has to take its last reply.
pub const CLOSING_TIMEOUT_NS: u64 = 5_000_000_000;
/// Queued output above which the server takes no more requests.
pub const OUTPUT_HIGH_BYTES: usize = 256 * 1024;

#[derive(Debug)]
enum ServerState {
    AwaitAuth,
    Ready(Session),
    Closing,
    /// The closing deadline passed: release now.
    Closed,
}

/// The server end of one management connection.
#[derive(Debug)]
pub struct ServerConn {
    state: ServerState,
    nonce: Nonce,
    decoder: FrameDecoder,
    out: Vec<u8>,
    preauth_errors: u32,
    /// The current state's deadline.
    deadline_ns: u64,
    /// Node time at the last [`ServerConn::tick`] (or creation).
    now_ns: u64,
    requests: u64,
}

/// The handler the server calls for each authenticated request.
pub type Handler<'a> = dyn FnMut(Request) -> Outcome + 'a;

impl ServerConn {
    /// A new connection for node `node` with a fresh `nonce`, accepted at
    /// `now_ns`; the greeting is queued.
    pub fn new(node: &str, nonce: Nonce, now_ns: u64) -> Self {
        let mut c = Self {
            state: ServerState::AwaitAuth,
            nonce,
            decoder: FrameDecoder::new(),
            out: Vec::new(),
            preauth_errors: 0,
            deadline_ns: now_ns.saturating_add(HANDSHAKE_TIMEOUT_NS),
            now_ns,
            requests: 0,
        };
        let hello = Handshake::Hello(Hello {
            magic: MAGIC.into(),
            versions: vec![PROTOCOL_VERSION],
            node: node.into(),
            nonce: hex_encode(&nonce),
        });
        c.queue_plain(&to_json(&hello));
        c
    }

    /// Whether the session is authenticated.
    pub fn is_authenticated(&self) -> bool {
        matches!(self.state, ServerState::Ready(_))
    }
    /// Whether the connection is closing (or closed): it takes no more
    /// requests.
    pub fn is_closing(&self) -> bool {
        matches!(self.state, ServerState::Closing | ServerState::Closed)
    }
    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }
    /// When the current state ends unless something happens first.
    pub fn deadline_ns(&self) -> u64 {
        self.deadline_ns
    }
    /// Whether the transport should read more bytes.
    pub fn wants_input(&self) -> bool {
        !self.is_closing() && self.out.len() < OUTPUT_HIGH_BYTES
    }
    /// Whether the connection is done here: closing with every byte taken
    /// by the transport, or closed.
    pub fn is_finished(&self) -> bool {
        match self.state {
            ServerState::Closing => self.out.is_empty(),
            ServerState::Closed => true,
            _ => false,
        }
    }
    /// Whether the closing deadline passed: the transport releases the
    /// connection even if bytes it took are still unsent.
    pub fn is_expired(&self) -> bool {
        matches!(self.state, ServerState::Closed)
    }
    /// Bytes waiting to be sent.
    pub fn output(&self) -> &[u8] {
        &self.out
    }
    /// The transport took the first `n` bytes of [`ServerConn::output`].
    pub fn consume_output(&mut self, n: usize) {
        self.out.drain(..n.min(self.out.len()));
    }
    /// Close without a reply (the peer went away, or the node is stopping).
    pub fn abort(&mut self) {
        self.state = ServerState::Closed;
        self.out.clear();
    }
    /// The peer will send nothing more: replies already queued still go
    /// out (within the closing deadline), then the connection closes.
    pub fn peer_closed(&mut self) {
        if !self.is_closing() {
            self.enter_closing();
        }
    }
    /// Close with an error reply (e.g. to make room for another
    /// connection).
    pub fn close_with(&mut self, code: ErrorCode, message: &str) {
        if !self.is_closing() {
            self.refuse(code, message);
        }
    }

    /// Time passes: a connection past its state's deadline moves on
    /// (handshake or idle session: closing with an error reply; closing:
    /// closed).
    pub fn tick(&mut self, now_ns: u64) {
        self.now_ns = now_ns;
        if now_ns < self.deadline_ns {
            return;
        }
        match self.state {
            ServerState::AwaitAuth => {
                self.refuse(ErrorCode::AuthFailed, "no authentication within 10 s");
            }
            ServerState::Ready(_) => {
                self.refuse(ErrorCode::InvalidState, "session idle for 120 s: closed");
            }
            ServerState::Closing => self.abort(),
            ServerState::Closed => {}
        }
    }

    /// Bytes arrived: buffer them and answer every complete frame (as long
    /// as output is below the high-water mark).
    pub fn receive(
        &mut self,
        bytes: &[u8],
        key: &ClusterKey,
        replay: &mut ReplayGuard,
        handler: &mut Handler<'_>,
    ) {
        if self.is_closing() {
            return;
        }
        self.decoder.push(bytes);
        self.process(key, replay, handler);
    }

    /// Answer frames already buffered (call after output drained).
    pub fn process(
        &mut self,
        key: &ClusterKey,
        replay: &mut ReplayGuard,
        handler: &mut Handler<'_>,
    ) {
        while self.wants_input() {
            let body = match self.decoder.next_frame() {
                Ok(Some(body)) => body,
                Ok(None) => return,
                Err(e @ FrameError::TooLong { .. }) => {
                    self.refuse(ErrorCode::TooLarge, &detail(&e));
                    return;
                }
            };
            match self.state {
                ServerState::AwaitAuth => self.handshake_frame(&body, key, replay),
                ServerState::Ready(_) => self.session_frame(&body, handler),
                ServerState::Closing | ServerState::Closed => return,
            }
        }
    }

    fn enter_closing(&mut self) {
        self.state = ServerState::Closing;
        self.deadline_ns = self.now_ns.saturating_add(CLOSING_TIMEOUT_NS);
    }

    fn queue_plain(&mut self, body: &[u8]) {
        if wire::encode(body, &mut self.out).is_err() {
            // Our own messages are far below the limit; if one were not,
            // the peer gets nothing rather than a broken frame.
            self.enter_closing();
        }
    }

    /// An error reply in the current phase, then close.
    fn refuse(&mut self, code: ErrorCode, message: &str) {
        let err = ApiError::new(code, message);
        self.reply_error(0, err);
        self.enter_closing();
    }

    fn reply_error(&mut self, id: u64, err: ApiError) {
        match &mut self.state {
            ServerState::Ready(_) => self.reply(id, Outcome::Error(err)),
            _ => self.queue_plain(&to_json(&Handshake::Error(err))),
        }
    }

    fn reply(&mut self, id: u64, outcome: Outcome) {
        let ServerState::Ready(session) = &mut self.state else {
            return;
        };
        let mut json = to_json(&ResponseFrame { id, outcome });
        if json.len() + TAG_BYTES > wire::FRAME_BODY_MAX {
            json = to_json(&ResponseFrame {
                id,
                outcome: Outcome::Error(ApiError::new(
                    ErrorCode::TooLarge,
                    "the reply would exceed the frame limit",
                )),
            });
        }
        let sealed = session.seal(&json);
        self.queue_plain(&sealed);
    }

    fn handshake_frame(&mut self, body: &[u8], key: &ClusterKey, replay: &mut ReplayGuard) {
        let auth = match serde_json::from_slice::<Handshake>(body) {
            Ok(Handshake::Auth(a)) => a,
            other => {
                self.preauth_errors += 1;
                let (code, msg) =
                    if other.is_err() && serde_json::from_slice::<RequestFrame>(body).is_err() {
                        (ErrorCode::BadRequest, "expected an auth message")
                    } else {
                        (
                            ErrorCode::Unauthenticated,
                            "authenticate first (auth with the cluster key)",
                        )
                    };
                if self.preauth_errors >= PREAUTH_ERRORS_MAX {
                    self.refuse(code, msg);
                } else {
                    self.reply_error(0, ApiError::new(code, msg));
                }
                return;
            }
        };
        if auth.version != PROTOCOL_VERSION {
            let msg = format!(
                "protocol version {} is not supported; this node speaks {PROTOCOL_VERSION}",
                auth.version
            );
            self.refuse(ErrorCode::UnsupportedVersion, &msg);
            return;
        }
        let Some(client_nonce) = nonce_from_hex(&auth.nonce) else {
            self.refuse(ErrorCode::BadRequest, "the nonce must be 64 hex digits");
            return;
        };
        if client_nonce == self.nonce || replay.seen(&client_nonce) {
            self.refuse(ErrorCode::AuthFailed, &AuthError::ReplayedNonce.to_string());
            return;
        }
        let proof = hex_decode(&auth.proof).unwrap_or_default();
        if !key.verify_client(&self.nonce, &client_nonce, &proof) {
            self.refuse(ErrorCode::AuthFailed, &AuthError::BadProof.to_string());
            return;
        }
        // Only a verified proof is remembered: a forged auth must not push
        // real nonces out of the window or get a real one refused.
        replay.record(client_nonce);
        let welcome = Handshake::Welcome(Welcome {
            proof: hex_encode(&key.server_proof(&self.nonce, &client_nonce)),
        });
        self.queue_plain(&to_json(&welcome));
        self.state = ServerState::Ready(key.session(&self.nonce, &client_nonce, Side::Server));
        self.deadline_ns = self.now_ns.saturating_add(SESSION_IDLE_NS);
    }

    fn session_frame(&mut self, body: &[u8], handler: &mut Handler<'_>) {
        let ServerState::Ready(session) = &mut self.state else {
            return;
        };
        let payload = match session.open(body) {
            Ok(p) => p,
            Err(e) => {
                self.refuse(ErrorCode::AuthFailed, &e.to_string());
                return;
            }
        };
        self.requests += 1;
        self.deadline_ns = self.now_ns.saturating_add(SESSION_IDLE_NS);
        match serde_json::from_slice::<RequestFrame>(payload) {
            Ok(frame) => {
                let outcome = handler(frame.request);
                self.reply(frame.id, outcome);
            }
            Err(e) => {
                #[derive(Deserialize)]
                struct IdOnly {
                    id: u64,
                }
                let id = serde_json::from_slice::<IdOnly>(payload).map_or(0, |f| f.id);
                let msg = format!("malformed request: {}", detail(&e));
                self.reply_error(id, ApiError::new(ErrorCode::BadRequest, msg));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use hvmgmt::auth::{fresh_nonce, TestEntropy};
    use hvmgmt::client::{ClientConn, ClientError, ClientEvent};
    use hvmgmt::proto::{Auth, Body, NodeInfo};

    fn key() -> ClusterKey {
        ClusterKey::from_hex("000102030405060708090a0b0c0d0e0f").unwrap()
    }

    fn echo(req: Request) -> Outcome {
        match req {
            Request::NodeInfo => Outcome::Ok(Body::NodeInfo(NodeInfo {
                name: "a".into(),
                cpu_vendor: "amd".into(),
                cpus: 1,
                memory_total_bytes: 1,
                memory_free_bytes: 1,
                version: "0".into(),
                protocol_version: 1,
                mgmt_addr: String::new(),
                migration_addr: String::new(),
                peers: alloc::vec::Vec::new(),
            })),
            _ => Outcome::Ok(Body::Done),
        }
    }

    struct Pair {
        server: ServerConn,
        client: ClientConn,
        replay: ReplayGuard,
        key: ClusterKey,
    }

    impl Pair {
        fn new(client_key: ClusterKey, seed: u64) -> Self {
            let mut e = TestEntropy(seed);
            Pair {
                server: ServerConn::new("a", fresh_nonce(&mut e, 1), 0),
                client: ClientConn::new(client_key, fresh_nonce(&mut e, 2)),
                replay: ReplayGuard::new(),
                key: key(),
            }
        }
        /// Shuttle bytes both ways until quiet; client events or error.
        fn pump(&mut self) -> Result<Vec<ClientEvent>, ClientError> {
            let mut events = Vec::new();
            for _ in 0..10 {
                let s2c = self.server.output().to_vec();
                self.server.consume_output(s2c.len());
                if !s2c.is_empty() {
                    events.extend(self.client.receive(&s2c)?);
                }
                let c2s = self.client.take_output();
                if c2s.is_empty() && self.server.output().is_empty() {
                    break;
                }
                self.server
                    .receive(&c2s, &self.key, &mut self.replay, &mut echo);
            }
            Ok(events)
        }
    }

    #[test]
    fn mutual_auth_then_requests() {
        let mut p = Pair::new(key(), 1);
        let ev = p.pump().unwrap();
        assert_eq!(ev, [ClientEvent::Authenticated { node: "a".into() }]);
        assert!(p.server.is_authenticated() && p.client.is_ready());
        let id1 = p.client.request(Request::NodeInfo).unwrap();
        let id2 = p.client.request(Request::VmList).unwrap();
        let ev = p.pump().unwrap();
        assert_eq!(ev.len(), 2);
        let ClientEvent::Response(r) = &ev[0] else {
            panic!()
        };
        assert_eq!(r.id, id1);
        assert!(matches!(r.outcome, Outcome::Ok(Body::NodeInfo(_))));
        let ClientEvent::Response(r) = &ev[1] else {
            panic!()
        };
        assert_eq!((r.id, &r.outcome), (id2, &Outcome::Ok(Body::Done)));
        assert_eq!(p.server.requests(), 2);
    }

    #[test]
    fn wrong_key_is_refused_and_the_connection_closes() {
        let mut p = Pair::new(ClusterKey::from_bytes(&[7; 16]).unwrap(), 2);
        let err = p.pump().unwrap_err();
        let ClientError::Refused(e) = err else {
            panic!("{err:?}")
        };
        assert_eq!(e.code, ErrorCode::AuthFailed);
        assert!(e.message.contains("wrong cluster key"));
        assert!(p.server.is_finished() && !p.server.is_authenticated());
    }

    #[test]
    fn replayed_handshake_is_refused() {
        // Record a good client's auth frame.
        let mut p = Pair::new(key(), 4);
        let hello = p.server.output().to_vec();
        p.server.consume_output(hello.len());
        p.client.receive(&hello).unwrap();
        let auth = p.client.take_output();
        p.server.receive(&auth, &p.key, &mut p.replay, &mut echo);
        assert!(p.server.is_authenticated());
        // Replay it on a fresh connection (new server nonce): refused.
        let mut s2 = ServerConn::new("a", [9; 32], 0);
        s2.receive(&auth, &p.key, &mut p.replay, &mut echo);
        assert!(!s2.is_authenticated());
        assert!(String::from_utf8_lossy(s2.output()).contains("auth-failed"));
        // Even a server that repeated its nonce (broken entropy) refuses the
        // replay: the client nonce is remembered.
        let mut e = TestEntropy(4);
        let mut s3 = ServerConn::new("a", fresh_nonce(&mut e, 1), 0);
        s3.receive(&auth, &p.key, &mut p.replay, &mut echo);
        assert!(!s3.is_authenticated());
        assert!(String::from_utf8_lossy(s3.output()).contains("replayed nonce"));
    }

    #[test]
    fn unauthenticated_requests_get_errors_then_the_door() {
        let mut s = ServerConn::new("a", [1; 32], 0);
        let greeting = s.output().len();
        s.consume_output(greeting);
        let mut replay = ReplayGuard::new();
        let mut frame = Vec::new();
        let req = RequestFrame {
            id: 1,
            request: Request::VmList,
        };
        wire::encode(&to_json(&req), &mut frame).unwrap();
        let mut called = false;
        let mut h = |_: Request| {
            called = true;
            Outcome::Ok(Body::Done)
        };
        s.receive(&frame, &key(), &mut replay, &mut h);
        let out = String::from_utf8_lossy(s.output()).into_owned();
        assert!(out.contains("unauthenticated"), "{out}");
        assert!(!s.is_finished());
        s.receive(&frame, &key(), &mut replay, &mut h);
        s.receive(&frame, &key(), &mut replay, &mut h);
        assert!(!s.wants_input());
        let n = s.output().len();
        s.consume_output(n);
        assert!(s.is_finished());
        assert!(!called, "no request reached the handler");
    }

    #[test]
    fn handshake_timeout_and_version_mismatch() {
        let mut s = ServerConn::new("a", [1; 32], 100);
        s.tick(100 + HANDSHAKE_TIMEOUT_NS - 1);
        assert!(s.wants_input());
        s.tick(100 + HANDSHAKE_TIMEOUT_NS);
        assert!(!s.wants_input());

        // An authenticated session that stays silent is closed too.
        let mut p = Pair::new(key(), 9);
        p.pump().unwrap();
        p.server.tick(SESSION_IDLE_NS - 1);
        assert!(p.server.wants_input());
        p.client.request(Request::VmList).unwrap();
        p.pump().unwrap();
        p.server.tick(SESSION_IDLE_NS + 5);
        p.server.tick(2 * SESSION_IDLE_NS - 2);
        assert!(p.server.wants_input(), "the request restarted the clock");
        p.server.tick(2 * SESSION_IDLE_NS - 1);
        assert!(!p.server.wants_input());

        let mut s = ServerConn::new("a", [1; 32], 0);
        let auth = Handshake::Auth(Auth {
            version: 2,
            nonce: "00".repeat(32),
            proof: String::new(),
        });
        let mut f = Vec::new();
        wire::encode(&to_json(&auth), &mut f).unwrap();
        s.receive(&f, &key(), &mut ReplayGuard::new(), &mut echo);
        assert!(String::from_utf8_lossy(s.output()).contains("unsupported-version"));
        assert!(!s.wants_input());
    }

    /// An auth frame for `server` from a client claiming `nonce` with a
    /// proof that does not verify.
    fn forged_auth(nonce: &Nonce) -> Vec<u8> {
        let auth = Handshake::Auth(Auth {
            version: PROTOCOL_VERSION,
            nonce: hex_encode(nonce),
            proof: "ab".repeat(32),
        });
        let mut f = Vec::new();
        wire::encode(&to_json(&auth), &mut f).unwrap();
        f
    }

    #[test]
    fn forged_auths_do_not_burn_a_clients_nonce() {
        // A client's nonce crosses the wire in clear: an attacker who sees
        // it (or guesses it) races the client with a forged proof.
        let mut p = Pair::new(key(), 11);
        let hello = p.server.output().to_vec();
        p.server.consume_output(hello.len());
        p.client.receive(&hello).unwrap();
        let auth = p.client.take_output();
        let body = &auth[wire::HEADER_BYTES..];
        let Ok(Handshake::Auth(a)) = serde_json::from_slice::<Handshake>(body) else {
            panic!()
        };
        let client_nonce = nonce_from_hex(&a.nonce).unwrap();
        let mut evil = ServerConn::new("a", [0x77; 32], 0);
        evil.receive(
            &forged_auth(&client_nonce),
            &p.key,
            &mut p.replay,
            &mut echo,
        );
        assert!(String::from_utf8_lossy(evil.output()).contains("wrong cluster key"));
        // The real client still gets in.
        p.server.receive(&auth, &p.key, &mut p.replay, &mut echo);
        assert!(
            p.server.is_authenticated(),
            "{:?}",
            String::from_utf8_lossy(p.server.output())
        );
    }

    #[test]
    fn forged_auths_do_not_flush_the_replay_window() {
        // A good handshake on a server whose entropy repeats its nonce.
        let server_nonce = [0x42; 32];
        let mut replay = ReplayGuard::new();
        let mut s = ServerConn::new("a", server_nonce, 0);
        let mut c = ClientConn::new(key(), [0x24; 32]);
        c.receive(s.output()).unwrap();
        let n = s.output().len();
        s.consume_output(n);
        let auth = c.take_output();
        s.receive(&auth, &key(), &mut replay, &mut echo);
        assert!(s.is_authenticated());
        // A window's worth of forged handshakes with fresh nonces...
        for i in 0..hvmgmt::auth::REPLAY_WINDOW as u32 + 1 {
            let mut nonce = [0u8; 32];
            nonce[..4].copy_from_slice(&i.to_be_bytes());
            let mut f = ServerConn::new("a", [0x99; 32], 0);
            f.receive(&forged_auth(&nonce), &key(), &mut replay, &mut echo);
            assert!(!f.is_authenticated());
        }
        // ...did not push the real nonce out: its replay is still refused.
        let mut again = ServerConn::new("a", server_nonce, 0);
        again.receive(&auth, &key(), &mut replay, &mut echo);
        assert!(!again.is_authenticated());
        assert!(String::from_utf8_lossy(again.output()).contains("replayed nonce"));
    }

    #[test]
    fn every_state_has_a_deadline_even_for_a_peer_that_never_reads() {
        // Handshake: 10 s, then a refusal the peer never takes; 5 s later
        // the connection is done although its output was never sent.
        let mut s = ServerConn::new("a", [1; 32], 1000);
        assert_eq!(s.deadline_ns(), 1000 + HANDSHAKE_TIMEOUT_NS);
        s.tick(1000 + HANDSHAKE_TIMEOUT_NS);
        assert!(s.is_closing() && !s.is_finished());
        s.tick(1000 + HANDSHAKE_TIMEOUT_NS + CLOSING_TIMEOUT_NS - 1);
        assert!(!s.is_finished(), "the peer still has time to read");
        s.tick(1000 + HANDSHAKE_TIMEOUT_NS + CLOSING_TIMEOUT_NS);
        assert!(s.is_finished() && s.is_expired());
        assert!(s.output().is_empty(), "unsent bytes are dropped");

        // An authenticated session whose client stops reading: its replies
        // pile up to the mark, it takes no more requests, the idle
        // deadline closes it and the closing deadline ends it.
        let mut p = Pair::new(key(), 12);
        p.pump().unwrap();
        p.server.tick(1);
        let mut n = 0;
        while p.server.wants_input() {
            p.client.request(Request::NodeInfo).unwrap();
            let bytes = p.client.take_output();
            p.server.receive(&bytes, &p.key, &mut p.replay, &mut echo);
            n += 1;
            assert!(n < 100_000);
        }
        assert!(p.server.output().len() >= OUTPUT_HIGH_BYTES);
        let t = p.server.deadline_ns();
        p.server.tick(t);
        assert!(p.server.is_closing() && !p.server.is_finished());
        p.server.tick(t + CLOSING_TIMEOUT_NS);
        assert!(p.server.is_expired());

        // A closing connection whose peer reads is done as soon as the
        // last byte went out, before its deadline.
        let mut s = ServerConn::new("a", [1; 32], 0);
        s.close_with(ErrorCode::NoResources, "make room");
        assert!(String::from_utf8_lossy(s.output()).contains("no-resources"));
        let n = s.output().len();
        s.consume_output(n);
        assert!(s.is_finished() && !s.is_expired());
    }

    #[test]
    fn a_peer_that_closes_still_gets_its_replies() {
        let mut p = Pair::new(key(), 13);
        p.pump().unwrap();
        p.client.request(Request::VmList).unwrap();
        let bytes = p.client.take_output();
        p.server.receive(&bytes, &p.key, &mut p.replay, &mut echo);
        p.server.peer_closed();
        assert!(p.server.is_closing() && !p.server.is_finished());
        let out = p.server.output().to_vec();
        p.server.consume_output(out.len());
        assert_eq!(p.client.receive(&out).unwrap().len(), 1);
        assert!(p.server.is_finished());
    }

    #[test]
    fn malformed_requests_after_auth_keep_the_session() {
        let mut p = Pair::new(key(), 5);
        p.pump().unwrap();
        // A well-tagged frame with garbage JSON: error reply with its id.
        p.client
            .send_payload(br#"{"id":42,"request":{"op":"nope"}}"#)
            .unwrap();
        p.client.send_payload(b"\xff\x00").unwrap();
        let ev = p.pump().unwrap();
        let ids: Vec<u64> = ev
            .iter()
            .map(|e| match e {
                ClientEvent::Response(ResponseFrame {
                    id,
                    outcome: Outcome::Error(err),
                }) => {
                    assert_eq!(err.code, ErrorCode::BadRequest);
                    *id
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, [42, 0]);
        // Still serving.
        p.client.request(Request::JobList).unwrap();
        assert_eq!(p.pump().unwrap().len(), 1);
    }

    #[test]
    fn a_forged_frame_closes_the_session() {
        let mut p = Pair::new(key(), 6);
        p.pump().unwrap();
        let mut forged = Vec::new();
        let mut body = vec![0u8; 32];
        body.extend_from_slice(&to_json(&RequestFrame {
            id: 1,
            request: Request::VmList,
        }));
        wire::encode(&body, &mut forged).unwrap();
        p.server.receive(&forged, &p.key, &mut p.replay, &mut echo);
        assert!(!p.server.wants_input());
        let out = p.server.output().to_vec();
        let ev = p.client.receive(&out).unwrap();
        let ClientEvent::Response(r) = &ev[0] else {
            panic!()
        };
        assert!(matches!(&r.outcome, Outcome::Error(e) if e.code == ErrorCode::AuthFailed));
    }

    #[test]
    fn oversized_frames_close_with_an_error() {
        let mut s = ServerConn::new("a", [1; 32], 0);
        s.receive(
            &[0xff, 0xff, 0xff, 0xff],
            &key(),
            &mut ReplayGuard::new(),
            &mut echo,
        );
        assert!(String::from_utf8_lossy(s.output()).contains("too-large"));
        assert!(!s.wants_input());
    }

    /// Mutation loop: random corruptions of a valid session's byte stream,
    /// at every phase. The server must never panic and must answer or close.
    #[test]
    fn mutated_streams_never_panic() {
        let mut rng = TestEntropy(0x9e37_79b9_7f4a_7c15);
        let mut rand = |n: usize| {
            let mut b = [0u8; 8];
            rng.fill(&mut b);
            (u64::from_le_bytes(b) % n.max(1) as u64) as usize
        };
        use hvmgmt::auth::Entropy;
        // A reference client stream: auth then three requests.
        let mut p = Pair::new(key(), 7);
        let hello = p.server.output().to_vec();
        p.client.receive(&hello).unwrap();
        let auth = p.client.take_output();
        let mut s = ServerConn::new("a", p.server.nonce, 0);
        s.receive(&auth, &p.key, &mut ReplayGuard::new(), &mut echo);
        let welcome = s.output().to_vec();
        p.client.receive(&welcome[hello.len()..]).unwrap();
        for r in [Request::NodeInfo, Request::VmList, Request::JobList] {
            p.client.request(r).unwrap();
        }
        let mut stream = auth.clone();
        stream.extend(p.client.take_output());
        for round in 0..3000 {
            let mut m = stream.clone();
            for _ in 0..1 + rand(4) {
                let pos = rand(m.len());
                match rand(5) {
                    0 => m[pos] ^= 1 << rand(8),
                    1 => m[pos] = rand(256) as u8,
                    2 => m.truncate(pos),
                    3 => {
                        let junk: Vec<u8> = (0..rand(40)).map(|_| rand(256) as u8).collect();
                        m.splice(pos..pos, junk);
                    }
                    _ => {
                        let end = (pos + rand(16)).min(m.len());
                        m.drain(pos..end);
                    }
                }
            }
            let mut s = ServerConn::new("a", p.server.nonce, 0);
            let mut replay = ReplayGuard::new();
            let mut answered = 0;
            let mut h = |_: Request| {
                answered += 1;
                Outcome::Ok(Body::Done)
            };
            for chunk in m.chunks(1 + rand(64)) {
                s.receive(chunk, &p.key, &mut replay, &mut h);
            }
            assert!(answered <= 3, "round {round}");
            assert!(!s.output().is_empty(), "round {round}: always a greeting");
        }
    }
}
