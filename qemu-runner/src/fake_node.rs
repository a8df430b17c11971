//! A stand-in node for the client's tests: it speaks the management
//! protocol's server side (hvmgmt's handshake primitives and session tags,
//! docs/MANAGEMENT.md) on 127.0.0.1 and answers each request with what the
//! test's handler returns, recording every request it got.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use hvmgmt::auth::{hex_decode, hex_encode, nonce_from_hex, ClusterKey, Nonce, Side};
use hvmgmt::proto::{
    to_json, Handshake, Hello, Outcome, Request, RequestFrame, ResponseFrame, Welcome, MAGIC,
    PROTOCOL_VERSION,
};
use hvmgmt::wire::{self, FrameDecoder};

/// What the node answers to a request.
pub type Handler = Box<dyn FnMut(&Request) -> Outcome + Send>;

/// A fake node serving on a free port until dropped with the test.
pub struct FakeNode {
    pub addr: String,
    /// Every request, in order.
    pub requests: Arc<Mutex<Vec<Request>>>,
}

impl FakeNode {
    /// Serve as node `name` with cluster key `key_hex`.
    pub fn start(name: &str, key_hex: &str, handler: Handler) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(Mutex::new(handler));
        let key = ClusterKey::from_hex(key_hex).unwrap();
        let (name, reqs) = (name.to_string(), Arc::clone(&requests));
        std::thread::spawn(move || {
            for (n, conn) in (1u8..).zip(listener.incoming()) {
                let Ok(conn) = conn else { return };
                let (key, name, reqs, handler) = (
                    key.clone(),
                    name.clone(),
                    Arc::clone(&reqs),
                    Arc::clone(&handler),
                );
                std::thread::spawn(move || {
                    let _ = serve(conn, &key, &name, [n; 32], &reqs, &handler);
                });
            }
        });
        Self { addr, requests }
    }

    /// The requests so far.
    pub fn seen(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

fn next_frame(s: &mut TcpStream, dec: &mut FrameDecoder) -> Option<Vec<u8>> {
    loop {
        if let Ok(Some(f)) = dec.next_frame() {
            return Some(f);
        }
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).ok().filter(|&n| n > 0)?;
        dec.push(&buf[..n]);
    }
}

fn send(s: &mut TcpStream, body: &[u8]) -> Option<()> {
    let mut out = Vec::new();
    wire::encode(body, &mut out).ok()?;
    s.write_all(&out).ok()
}

fn serve(
    mut s: TcpStream,
    key: &ClusterKey,
    name: &str,
    server: Nonce,
    requests: &Mutex<Vec<Request>>,
    handler: &Mutex<Handler>,
) -> Option<()> {
    let mut dec = FrameDecoder::new();
    let hello = Handshake::Hello(Hello {
        magic: MAGIC.into(),
        versions: vec![PROTOCOL_VERSION],
        node: name.into(),
        nonce: hex_encode(&server),
    });
    send(&mut s, &to_json(&hello))?;
    let Ok(Handshake::Auth(auth)) = serde_json::from_slice(&next_frame(&mut s, &mut dec)?) else {
        return None;
    };
    let client = nonce_from_hex(&auth.nonce)?;
    if !key.verify_client(&server, &client, &hex_decode(&auth.proof)?) {
        return None;
    }
    let welcome = Handshake::Welcome(Welcome {
        proof: hex_encode(&key.server_proof(&server, &client)),
    });
    send(&mut s, &to_json(&welcome))?;
    let mut session = key.session(&server, &client, Side::Server);
    loop {
        let body = next_frame(&mut s, &mut dec)?;
        let frame: RequestFrame = serde_json::from_slice(session.open(&body).ok()?).ok()?;
        requests.lock().ok()?.push(frame.request.clone());
        let outcome = (handler.lock().ok()?)(&frame.request);
        let reply = ResponseFrame {
            id: frame.id,
            outcome,
        };
        send(&mut s, &session.seal(&to_json(&reply)))?;
    }
}
