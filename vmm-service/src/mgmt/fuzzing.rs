//! Fuzz harnesses of the management protocol, shared by `vmm-service/fuzz`
//! (libFuzzer, nightly) and the seed test below (stable, every `cargo
//! test`). Not API: built for tests and with the `testing` feature only.
//! Each harness returns normally for every input; a panic (or a failed
//! assertion of the protocol's promises) is a bug.
//!
//! * [`fuzz_handshake`] (target `mgmt_handshake`): bytes from a peer that
//!   has not authenticated, into the server's connection state machine, and
//!   the same bytes as a hostile node's into the client's.
//! * [`fuzz_session`] (target `mgmt_session`): a real handshake with the
//!   cluster key first, then every input line as a correctly tagged session
//!   frame, so the JSON parsing and every request handler run against a
//!   node (the test doubles) holding a few VMs.

use super::auth::{ClusterKey, Nonce, ReplayGuard, TAG_BYTES};
use super::conn::{ServerConn, OUTPUT_HIGH_BYTES};
use super::proto::{Body, Outcome, Request, RequestFrame};
use super::rig::{Rig, KEY};
use super::wire::{FRAME_BODY_MAX, HEADER_BYTES};
use alloc::vec::Vec;
use hvcore::host::Host;
use hvmgmt::client::{ClientConn, ClientEvent};

/// The server nonce of [`fuzz_handshake`]'s connection (fixed, so that a
/// seed can hold a client stream that authenticates).
pub const SERVER_NONCE: Nonce = [0x5e; 32];
/// The client nonce of [`fuzz_handshake`]'s client side.
pub const CLIENT_NONCE: Nonce = [0xc1; 32];
/// Request bodies [`fuzz_session`] sends per input at most.
pub const SESSION_REQUESTS_MAX: usize = 32;
/// Largest VM the fuzzed node can create (the doubles allocate guest RAM
/// for real).
pub const SESSION_RAM_LIMIT_BYTES: u64 = 16 << 20;

fn key() -> ClusterKey {
    ClusterKey::from_hex(KEY).unwrap_or_else(|_| unreachable!("a valid key"))
}

/// Control byte, then the peer's bytes. Control bits 0-3: log2 of the size
/// of the pieces the bytes arrive in (1 byte to 32 KiB); bit 4: a second of
/// node time passes before each piece (deadlines fire); bit 5: the peer
/// never reads (replies pile up against the back-pressure limit).
pub fn fuzz_handshake(data: &[u8]) {
    let Some((&ctl, bytes)) = data.split_first() else {
        return;
    };
    let piece = 1usize << (ctl & 0x0f);
    let ticking = ctl & 0x10 != 0;
    let never_reads = ctl & 0x20 != 0;
    let key = key();

    let mut server = ServerConn::new("a", SERVER_NONCE, 0);
    let mut replay = ReplayGuard::new();
    let mut answered = 0usize;
    let mut handler = |_: Request| {
        answered += 1;
        Outcome::Ok(Body::Done)
    };
    let mut now = 0u64;
    for chunk in bytes.chunks(piece) {
        if ticking {
            now += 1_000_000_000;
            server.tick(now);
        }
        server.receive(chunk, &key, &mut replay, &mut handler);
        // Back-pressure holds: at most one reply beyond the mark.
        assert!(server.output().len() <= OUTPUT_HIGH_BYTES + HEADER_BYTES + FRAME_BODY_MAX);
        if !never_reads {
            let n = server.output().len();
            server.consume_output(n);
        }
    }
    // A request costs at least a header and a tag.
    assert!(answered <= bytes.len() / (HEADER_BYTES + TAG_BYTES));
    assert!(server.requests() >= answered as u64);

    let mut client = ClientConn::new(key, CLIENT_NONCE);
    for chunk in bytes.chunks(piece) {
        if client.receive(chunk).is_err() {
            break;
        }
    }
}

/// Request bodies, one per line (at most [`SESSION_REQUESTS_MAX`]), each
/// sent as a tagged session frame on an authenticated connection to a node
/// holding three VMs (created, running, stopped). Every body gets exactly
/// one reply, with the body's id when it parses as a request, and the
/// session goes on.
pub fn fuzz_session(data: &[u8]) {
    let mut rig = Rig::new();
    rig.host.ram_limit_bytes = Some(SESSION_RAM_LIMIT_BYTES);
    for (name, start, stop) in [
        ("idle", false, false),
        ("web", true, false),
        ("db", true, true),
    ] {
        let create = Request::VmCreate {
            name: name.into(),
            memory_mib: 4,
            guest: None,
            linux: None,
        };
        assert!(matches!(
            rig.node.handle(&mut rig.host, create),
            Outcome::Ok(_)
        ));
        if start {
            rig.node
                .handle(&mut rig.host, Request::VmStart { name: name.into() });
        }
        if stop {
            rig.node
                .handle(&mut rig.host, Request::VmStop { name: name.into() });
        }
    }
    let (s, mut client, handshake) = rig.connect(KEY, 1);
    assert_eq!(handshake, Ok(()));
    for body in data.split(|b| *b == b'\n').take(SESSION_REQUESTS_MAX) {
        if client.send_payload(body).is_err() {
            // Longer than a frame holds: the client refuses to send it.
            continue;
        }
        let id = serde_json::from_slice::<RequestFrame>(body)
            .ok()
            .map(|f| f.id);
        // A reply takes one round; a second reply would show up with the
        // next body's and fail the count there.
        let mut replies = Vec::new();
        for _ in 0..3 {
            let events = rig
                .exchange(s, &mut client, 1)
                .unwrap_or_else(|e| panic!("the session broke: {e}"));
            replies.extend(events.into_iter().filter_map(|e| match e {
                ClientEvent::Response(r) => Some(r),
                ClientEvent::Authenticated { .. } => None,
            }));
            if !replies.is_empty() {
                break;
            }
        }
        assert_eq!(replies.len(), 1, "one reply per request");
        if let Some(id) = id {
            assert_eq!(replies[0].id, id, "the reply carries the request's id");
        }
        // The VMs run between requests, as on a node.
        let deadline = rig.host.now_ns() + 1_000_000;
        rig.node.run_vms(&mut rig.host, deadline);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Run every file in `fuzz/seeds/TARGET` and `fuzz/regressions/TARGET`
    /// through `harness`; returns how many ran.
    fn run_corpus(target: &str, harness: fn(&[u8])) -> usize {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut ran = 0;
        for kind in ["seeds", "regressions"] {
            let Ok(dir) = std::fs::read_dir(base.join(kind).join(target)) else {
                continue;
            };
            let mut files: Vec<_> = dir.map(|e| e.unwrap().path()).collect();
            files.sort();
            for f in files {
                let bytes = std::fs::read(&f).unwrap();
                harness(&bytes);
                ran += 1;
            }
        }
        ran
    }

    #[test]
    fn handshake_corpus_runs_clean() {
        assert!(run_corpus("mgmt_handshake", fuzz_handshake) >= 3);
    }

    #[test]
    fn the_valid_handshake_seed_reaches_the_handler() {
        // The seed the fuzzer mutates into session frames must stay a
        // stream that authenticates against the harness's nonce and key.
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/mgmt_handshake/valid_session");
        let bytes = std::fs::read(path).unwrap();
        let mut s = ServerConn::new("a", SERVER_NONCE, 0);
        let mut handler = |_: Request| Outcome::Ok(Body::Done);
        s.receive(&bytes[1..], &key(), &mut ReplayGuard::new(), &mut handler);
        assert!(s.is_authenticated());
        assert_eq!(s.requests(), 3);
    }

    #[test]
    fn session_corpus_runs_clean() {
        assert!(run_corpus("mgmt_session", fuzz_session) >= 3);
    }
}
