//! Authentication: the cluster key, nonces, the mutual challenge-response
//! and the tags that bind every later frame to the authenticated session.
//!
//! Handshake (docs/MANAGEMENT.md, "Authentication"), with `K` the cluster
//! key, `Sn` the server's nonce and `Cn` the client's (32 bytes each):
//! * server proof of nothing yet: it sends `Sn`;
//! * client proof: `HMAC(K, "hvmigrate-mgmt/1 client" || Sn || Cn)`;
//! * server proof: `HMAC(K, "hvmigrate-mgmt/1 server" || Sn || Cn)`, sent
//!   only after the client's proof checked out;
//! * session key: `HMAC(K, "hvmigrate-mgmt/1 session" || Sn || Cn)`.
//!
//! The distinct labels stop a proof being reflected back as the other side's;
//! a fresh `Sn` per connection makes a recorded client proof useless on any
//! other connection; the [`ReplayGuard`] additionally refuses a client nonce
//! seen recently in a handshake that succeeded. After the handshake each frame carries
//! `HMAC(session, direction || seq || body)`: a frame cannot be forged,
//! replayed, reordered or reflected without the key.
//!
//! Tags are compared in constant time (`Mac::verify_slice`).

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::fmt;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Length of a nonce, a proof and a tag.
pub const NONCE_BYTES: usize = 32;
/// Length of an HMAC-SHA256 tag.
pub const TAG_BYTES: usize = 32;
/// Shortest and longest cluster key.
pub const KEY_MIN_BYTES: usize = 16;
pub const KEY_MAX_BYTES: usize = 64;
/// Client nonces a [`ReplayGuard`] remembers.
pub const REPLAY_WINDOW: usize = 256;

/// The labels of one protocol's handshake: the same challenge-response
/// serves the management API and the migration link between nodes, each
/// under its own labels, so a proof or session key of one is worthless in
/// the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Domain {
    client: &'static [u8],
    server: &'static [u8],
    session: &'static [u8],
}

/// The management API (docs/MANAGEMENT.md, "Authentication").
pub const MGMT: Domain = Domain {
    client: b"hvmigrate-mgmt/1 client",
    server: b"hvmigrate-mgmt/1 server",
    session: b"hvmigrate-mgmt/1 session",
};

/// The migration link between nodes (docs/DESIGN.md, "Live migration
/// between nodes").
pub const MIGRATION: Domain = Domain {
    client: b"hvmigrate-mig/1 client",
    server: b"hvmigrate-mig/1 server",
    session: b"hvmigrate-mig/1 session",
};

/// A nonce.
pub type Nonce = [u8; NONCE_BYTES];
/// A proof or frame tag.
pub type Tag = [u8; TAG_BYTES];

/// Source of unpredictable bytes, provided by the platform (RDRAND where the
/// CPU has it, else TSC jitter mixed) and by tests (deterministic).
pub trait Entropy {
    /// Fill `buf` with unpredictable bytes.
    fn fill(&mut self, buf: &mut [u8]);
}

/// Errors of key parsing and authentication.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// The key is not an even number of hex digits.
    KeyNotHex,
    /// The key is shorter or longer than allowed.
    KeyLength { bytes: usize },
    /// A proof did not verify: the peer does not hold the cluster key.
    BadProof,
    /// The client nonce was seen before (a replayed handshake) or equals the
    /// server's.
    ReplayedNonce,
    /// A session frame's tag did not verify.
    BadTag,
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::KeyNotHex => write!(f, "the cluster key must be hex digits"),
            AuthError::KeyLength { bytes } => write!(
                f,
                "the cluster key has {bytes} bytes; it needs {KEY_MIN_BYTES} to {KEY_MAX_BYTES} (32 to 128 hex digits)"
            ),
            AuthError::BadProof => write!(f, "authentication failed: wrong cluster key"),
            AuthError::ReplayedNonce => write!(f, "authentication failed: replayed nonce"),
            AuthError::BadTag => write!(f, "a frame's authentication tag did not verify"),
        }
    }
}

/// The cluster key. Its bytes are never printed (`Debug` redacts).
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey(Vec<u8>);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey(<{} bytes>)", self.0.len())
    }
}

impl ClusterKey {
    /// Parse hex digits (either case).
    pub fn from_hex(hex: &str) -> Result<Self, AuthError> {
        let bytes = hex_decode(hex).ok_or(AuthError::KeyNotHex)?;
        Self::from_bytes(&bytes)
    }
    /// From raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, AuthError> {
        if !(KEY_MIN_BYTES..=KEY_MAX_BYTES).contains(&bytes.len()) {
            return Err(AuthError::KeyLength { bytes: bytes.len() });
        }
        Ok(Self(bytes.to_vec()))
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> HmacSha256 {
        let mut m = keyed(&self.0);
        m.update(label);
        for p in parts {
            m.update(p);
        }
        m
    }

    /// The client's proof over the two nonces (management API).
    pub fn client_proof(&self, server: &Nonce, client: &Nonce) -> Tag {
        self.client_proof_in(&MGMT, server, client)
    }
    /// The server's proof over the two nonces (management API).
    pub fn server_proof(&self, server: &Nonce, client: &Nonce) -> Tag {
        self.server_proof_in(&MGMT, server, client)
    }
    /// Check a client's proof in constant time (management API).
    pub fn verify_client(&self, server: &Nonce, client: &Nonce, proof: &[u8]) -> bool {
        self.verify_client_in(&MGMT, server, client, proof)
    }
    /// Check a server's proof in constant time (management API).
    pub fn verify_server(&self, server: &Nonce, client: &Nonce, proof: &[u8]) -> bool {
        self.verify_server_in(&MGMT, server, client, proof)
    }

    /// The client's proof in `domain`.
    pub fn client_proof_in(&self, domain: &Domain, server: &Nonce, client: &Nonce) -> Tag {
        self.mac(domain.client, &[server, client])
            .finalize()
            .into_bytes()
            .into()
    }
    /// The server's proof in `domain`.
    pub fn server_proof_in(&self, domain: &Domain, server: &Nonce, client: &Nonce) -> Tag {
        self.mac(domain.server, &[server, client])
            .finalize()
            .into_bytes()
            .into()
    }
    /// Check a client's proof in `domain`, in constant time.
    pub fn verify_client_in(
        &self,
        domain: &Domain,
        server: &Nonce,
        client: &Nonce,
        proof: &[u8],
    ) -> bool {
        self.mac(domain.client, &[server, client])
            .verify_slice(proof)
            .is_ok()
    }
    /// Check a server's proof in `domain`, in constant time.
    pub fn verify_server_in(
        &self,
        domain: &Domain,
        server: &Nonce,
        client: &Nonce,
        proof: &[u8],
    ) -> bool {
        self.mac(domain.server, &[server, client])
            .verify_slice(proof)
            .is_ok()
    }
    /// The session key in `domain` after a successful handshake (fresh for
    /// every pair of nonces).
    pub fn session_key_in(&self, domain: &Domain, server: &Nonce, client: &Nonce) -> Tag {
        self.mac(domain.session, &[server, client])
            .finalize()
            .into_bytes()
            .into()
    }
    /// The management session after a successful handshake.
    pub fn session(&self, server: &Nonce, client: &Nonce, side: Side) -> Session {
        let key = self.session_key_in(&MGMT, server, client);
        Session {
            key,
            side,
            send_seq: 0,
            recv_seq: 0,
        }
    }
}

fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length (RFC 2104, 2); this cannot fail.
    match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts every key length"),
    }
}

/// Which end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

impl Side {
    fn byte(self) -> u8 {
        match self {
            Side::Client => b'C',
            Side::Server => b'S',
        }
    }
    fn other(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }
}

/// An authenticated session: tags outgoing frames and checks incoming ones,
/// each direction with its own sequence number.
#[derive(Clone)]
pub struct Session {
    key: Tag,
    side: Side,
    send_seq: u64,
    recv_seq: u64,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("side", &self.side)
            .field("send_seq", &self.send_seq)
            .field("recv_seq", &self.recv_seq)
            .finish()
    }
}

impl Session {
    fn frame_mac(&self, sender: Side, seq: u64, body: &[u8]) -> HmacSha256 {
        let mut m = keyed(&self.key);
        m.update(&[sender.byte()]);
        m.update(&seq.to_be_bytes());
        m.update(body);
        m
    }

    /// Frame body for `payload`: its tag followed by the payload.
    pub fn seal(&mut self, payload: &[u8]) -> Vec<u8> {
        let tag = self
            .frame_mac(self.side, self.send_seq, payload)
            .finalize()
            .into_bytes();
        self.send_seq = self.send_seq.wrapping_add(1);
        let mut body = Vec::with_capacity(TAG_BYTES + payload.len());
        body.extend_from_slice(&tag);
        body.extend_from_slice(payload);
        body
    }

    /// Check a received frame body and return its payload.
    pub fn open<'a>(&mut self, body: &'a [u8]) -> Result<&'a [u8], AuthError> {
        let (tag, payload) = body.split_at_checked(TAG_BYTES).ok_or(AuthError::BadTag)?;
        self.frame_mac(self.side.other(), self.recv_seq, payload)
            .verify_slice(tag)
            .map_err(|_| AuthError::BadTag)?;
        self.recv_seq = self.recv_seq.wrapping_add(1);
        Ok(payload)
    }
}

/// Recently seen client nonces (per node, across connections).
#[derive(Debug, Default)]
pub struct ReplayGuard {
    seen: VecDeque<Nonce>,
}

impl ReplayGuard {
    /// An empty guard.
    pub fn new() -> Self {
        Self::default()
    }
    /// Whether `nonce` is within the window.
    pub fn seen(&self, nonce: &Nonce) -> bool {
        self.seen.contains(nonce)
    }
    /// Remember `nonce` (the oldest one is forgotten when the window is
    /// full). Record only nonces of handshakes whose proof verified: a
    /// window anyone can write to can be flushed of real nonces, or made to
    /// refuse a client's nonce before the client uses it.
    pub fn record(&mut self, nonce: Nonce) {
        if self.seen(&nonce) {
            return;
        }
        if self.seen.len() >= REPLAY_WINDOW {
            self.seen.pop_front();
        }
        self.seen.push_back(nonce);
    }
}

/// Fresh nonces: platform entropy whitened through SHA-256 together with a
/// counter, so even a weak source never repeats a nonce within a boot.
pub struct NonceSource<'a> {
    entropy: &'a mut dyn Entropy,
    counter: u64,
}

impl<'a> NonceSource<'a> {
    /// Nonces drawn from `entropy`.
    pub fn new(entropy: &'a mut dyn Entropy) -> Self {
        Self {
            entropy,
            counter: 0,
        }
    }
    /// The next nonce.
    pub fn next_nonce(&mut self, counter_base: u64) -> Nonce {
        let mut raw = [0u8; 64];
        self.entropy.fill(&mut raw);
        self.counter = self.counter.wrapping_add(1);
        let mut h = Sha256::new();
        h.update(raw);
        h.update(counter_base.to_be_bytes());
        h.update(self.counter.to_be_bytes());
        h.finalize().into()
    }
}

/// A nonce from `entropy`, whitened with `counter` (which the caller never
/// repeats within a boot).
pub fn fresh_nonce(entropy: &mut dyn Entropy, counter: u64) -> Nonce {
    NonceSource::new(entropy).next_nonce(counter)
}

/// Lower-case hex of `bytes`.
pub fn hex_encode(bytes: &[u8]) -> alloc::string::String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = alloc::string::String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Bytes of a hex string; `None` unless it is an even number of hex digits.
pub fn hex_decode(hex: &str) -> Option<Vec<u8>> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let bytes = hex.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks_exact(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// A fixed-size nonce from hex, `None` unless exactly [`NONCE_BYTES`].
pub fn nonce_from_hex(hex: &str) -> Option<Nonce> {
    if hex.len() != NONCE_BYTES * 2 {
        return None;
    }
    hex_decode(hex)?.try_into().ok()
}

/// Deterministic entropy for tests: xorshift64 from a seed.
#[derive(Clone, Debug)]
pub struct TestEntropy(pub u64);

impl Entropy for TestEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ClusterKey {
        ClusterKey::from_hex("00112233445566778899aabbccddeeff").unwrap()
    }

    #[test]
    fn keys_parse_with_limits_and_never_print() {
        assert_eq!(ClusterKey::from_hex("zz"), Err(AuthError::KeyNotHex));
        assert_eq!(ClusterKey::from_hex("abc"), Err(AuthError::KeyNotHex));
        assert_eq!(
            ClusterKey::from_hex("0011"),
            Err(AuthError::KeyLength { bytes: 2 })
        );
        assert!(ClusterKey::from_bytes(&[1; 65]).is_err());
        assert!(ClusterKey::from_hex(&"AB".repeat(64)).is_ok());
        let dbg = alloc::format!("{:?}", key());
        assert_eq!(dbg, "ClusterKey(<16 bytes>)");
    }

    #[test]
    fn proofs_are_directional_and_key_bound() {
        let (s, c) = ([1u8; 32], [2u8; 32]);
        let k = key();
        let cp = k.client_proof(&s, &c);
        assert!(k.verify_client(&s, &c, &cp));
        assert!(!k.verify_server(&s, &c, &cp), "no reflection");
        assert!(!k.verify_client(&c, &s, &cp), "nonces are ordered");
        let other = ClusterKey::from_bytes(&[9; 16]).unwrap();
        assert!(!other.verify_client(&s, &c, &cp));
        assert!(!k.verify_client(&s, &c, &cp[..31]));
        let sp = k.server_proof(&s, &c);
        assert!(k.verify_server(&s, &c, &sp));
        assert_ne!(cp, sp);
        // The migration link's proofs and keys are its own.
        let mp = k.client_proof_in(&MIGRATION, &s, &c);
        assert_ne!(mp, cp);
        assert!(!k.verify_client(&s, &c, &mp));
        assert!(k.verify_client_in(&MIGRATION, &s, &c, &mp));
        assert!(!k.verify_server_in(&MIGRATION, &s, &c, &mp));
        assert_ne!(
            k.session_key_in(&MIGRATION, &s, &c),
            k.session_key_in(&MGMT, &s, &c)
        );
        assert_ne!(
            k.session_key_in(&MIGRATION, &s, &c),
            k.session_key_in(&MIGRATION, &c, &s)
        );
    }

    #[test]
    fn session_frames_reject_tamper_replay_and_reflection() {
        let (s, c) = ([3u8; 32], [4u8; 32]);
        let mut client = key().session(&s, &c, Side::Client);
        let mut server = key().session(&s, &c, Side::Server);
        let f1 = client.seal(b"one");
        let f2 = client.seal(b"two");
        assert_eq!(server.open(&f1), Ok(&b"one"[..]));
        assert_eq!(server.open(&f1), Err(AuthError::BadTag), "replay");
        let mut bad = f2.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(server.open(&bad), Err(AuthError::BadTag), "tamper");
        assert_eq!(server.open(&f2), Ok(&b"two"[..]));
        let r = server.seal(b"reply");
        assert_eq!(server.clone().open(&r), Err(AuthError::BadTag), "reflect");
        assert_eq!(client.open(&r), Ok(&b"reply"[..]));
        assert_eq!(client.open(&[0; 5]), Err(AuthError::BadTag));
    }

    #[test]
    fn replay_guard_window() {
        let mut g = ReplayGuard::new();
        assert!(!g.seen(&[1; 32]));
        g.record([1; 32]);
        assert!(g.seen(&[1; 32]));
        g.record([1; 32]);
        for i in 0..REPLAY_WINDOW as u32 - 1 {
            let mut n = [0u8; 32];
            n[..4].copy_from_slice(&i.to_be_bytes());
            n[31] = 0xff;
            g.record(n);
        }
        assert!(g.seen(&[1; 32]), "a repeated record takes no second place");
        g.record([2; 32]);
        assert!(!g.seen(&[1; 32]), "forgotten after the window");
    }

    #[test]
    fn nonces_differ_even_from_constant_entropy() {
        struct Zero;
        impl Entropy for Zero {
            fn fill(&mut self, buf: &mut [u8]) {
                buf.fill(0);
            }
        }
        let mut z = Zero;
        let mut src = NonceSource::new(&mut z);
        let a = src.next_nonce(0);
        let b = src.next_nonce(0);
        assert_ne!(a, b);
        assert_ne!(fresh_nonce(&mut Zero, 1), fresh_nonce(&mut Zero, 2));
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(hex_encode(&[0, 0xab, 0x7f]), "00ab7f");
        assert_eq!(hex_decode("00AB7f"), Some(alloc::vec![0, 0xab, 0x7f]));
        assert_eq!(hex_decode("0g"), None);
        assert_eq!(nonce_from_hex(&"11".repeat(32)), Some([0x11; 32]));
        assert_eq!(nonce_from_hex(&"11".repeat(31)), None);
        assert_eq!(nonce_from_hex(&"é".repeat(32)), None);
    }
}
