//! Fuzz harnesses for the 9P client, shared by the cargo-fuzz targets
//! (`vstorage/fuzz/fuzz_targets/p9_reply.rs`, `p9_session.rs`) and the
//! stable test that replays their seeds (`tests/p9_fuzz_corpus.rs`). Any
//! panic is a bug; the assertions are the oracles (bounds the client
//! promises).
//!
//! Inputs:
//! - `reply`: byte 0 picks the operation (`% 17`, [`Op::ALL`]) and, in bit
//!   7, asks for the size field to be fixed up; bytes 1..5 are the count
//!   asked (LE); the rest is the reply.
//! - `session`: a script of server replies, each `len[2] LE` then `len`
//!   bytes (bit 15 of `len` asks for the size field and tag to be fixed up
//!   to match the request); the client connects (msize 8192) and runs a
//!   fixed sequence of operations ([`run_session`]) against it.

use super::client::{Client, Transport, TransportError, FIDS_MAX};
use super::wire::{open_flags, parse_reply, Expect, Op, Parsed, Reply, HEADER_BYTES};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// The `reply` harness.
pub fn reply(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let op = Op::ALL[usize::from(sel & 0x7f) % Op::ALL.len()];
    let (count, body) = match rest.split_first_chunk::<4>() {
        Some((c, b)) => (u32::from_le_bytes(*c), b),
        None => (0, rest),
    };
    let mut body = body.to_vec();
    if sel & 0x80 != 0 && body.len() >= 4 {
        let n = body.len() as u32;
        body[..4].copy_from_slice(&n.to_le_bytes());
    }
    let expect = Expect { op, tag: 1, count };
    match parse_reply(expect, &body) {
        Ok(Parsed::Ok(Reply::Read(d))) => assert!(d.len() <= count as usize),
        Ok(Parsed::Ok(Reply::Readdir(e))) => {
            // Every entry costs at least 24 bytes of the reply.
            assert!(e.len() * 24 <= body.len());
        }
        Ok(Parsed::Ok(Reply::Walk(q))) => assert!(q.len() <= count as usize),
        Ok(Parsed::Ok(Reply::Write(n))) => assert!(n <= count),
        _ => {}
    }
}

/// Replies read from a fuzz input, one per request.
#[derive(Debug)]
pub struct Script<'a> {
    data: &'a [u8],
    pos: usize,
    /// Requests seen.
    pub requests: usize,
}

impl<'a> Script<'a> {
    /// A script over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Script {
            data,
            pos: 0,
            requests: 0,
        }
    }
}

/// Most requests one session may send: the sequence is fixed, so a client
/// that loops on a server's replies shows up as more.
pub const SESSION_REQUESTS_MAX: usize = 4096;

impl Transport for Script<'_> {
    fn max_message_bytes(&self) -> u32 {
        8192
    }

    fn transact(&mut self, request: &[u8], reply: &mut [u8]) -> Result<usize, TransportError> {
        self.requests += 1;
        assert!(
            self.requests <= SESSION_REQUESTS_MAX,
            "the client sent more than {SESSION_REQUESTS_MAX} requests"
        );
        assert!(request.len() <= reply.len(), "request above msize");
        let Some(len) = self
            .data
            .get(self.pos..self.pos + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
        else {
            return Err(TransportError("script ended".into()));
        };
        self.pos += 2;
        let fix = len & 0x8000 != 0;
        let n = usize::from(len & 0x7fff)
            .min(self.data.len() - self.pos)
            .min(reply.len());
        reply[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        if fix && n >= HEADER_BYTES {
            reply[..4].copy_from_slice(&(n as u32).to_le_bytes());
            reply[5..7].copy_from_slice(&request[5..7]);
        }
        Ok(n)
    }
}

/// The operations a session runs (whatever fails, the next one runs).
pub fn run_session<T: Transport>(c: &mut Client<T>) {
    let root = c.root();
    let _ = c.statfs(root);
    if let Ok(f) = c.walk_path("dir/disk.vhdx") {
        let _ = c.lopen(f, open_flags::RDWR);
        let mut buf = vec![0u8; 20_000];
        if let Ok(n) = c.read(f, 0, &mut buf) {
            assert!(n <= buf.len());
        }
        let _ = c.write(f, 4096, &[0x5a; 10_000]);
        let _ = c.getattr(f);
        let _ = c.fsync(f);
        let _ = c.set_size(f, 1 << 20);
        let _ = c.clunk(f);
    }
    if let Ok(d) = c.walk_path("dir") {
        let _ = c.lopen(d, open_flags::RDONLY | open_flags::DIRECTORY);
        if let Ok(entries) = c.readdir(d) {
            assert!(entries.len() <= super::client::READDIR_ENTRIES_MAX + 2);
        }
        let _ = c.mkdir(d, "sub", 0o755);
        let _ = c.renameat(d, "a", d, "b");
        let _ = c.unlinkat(d, "b", false);
        let _ = c.clunk(d);
    }
    if let Ok(n) = c.walk(root, &[]) {
        let _ = c.lcreate(n, "new.vhdx", open_flags::RDWR | open_flags::CREAT, 0o644);
        let _ = c.rename(n, root, "renamed.vhdx");
        let _ = c.clunk(n);
    }
    assert!(c.fids_in_use() <= FIDS_MAX);
}

/// The `session` harness.
pub fn session(data: &[u8]) {
    let mut c = match Client::connect(Script::new(data), 8192, "") {
        Ok(c) => c,
        Err(e) => {
            // Every error renders as a message.
            let _ = String::from(alloc::format!("{e}").as_str());
            return;
        }
    };
    run_session(&mut c);
}

/// Records a real server's replies in the `session` script format (seed
/// generation: `cargo run -p vstorage --example p9_fuzz_seeds`).
#[derive(Debug)]
pub struct Recorder<T: Transport> {
    inner: T,
    /// The script so far.
    pub script: Vec<u8>,
}

impl<T: Transport> Recorder<T> {
    /// Records what `inner` answers.
    pub fn new(inner: T) -> Self {
        Recorder {
            inner,
            script: Vec::new(),
        }
    }
}

impl<T: Transport> Transport for Recorder<T> {
    fn max_message_bytes(&self) -> u32 {
        self.inner.max_message_bytes().min(8192)
    }
    fn transact(&mut self, request: &[u8], reply: &mut [u8]) -> Result<usize, TransportError> {
        let n = self.inner.transact(request, reply)?;
        let len = u16::try_from(n)
            .ok()
            .filter(|l| *l < 0x8000)
            .ok_or_else(|| TransportError("reply too long for a script".into()))?;
        self.script.extend_from_slice(&len.to_le_bytes());
        self.script.extend_from_slice(&reply[..n]);
        Ok(n)
    }
}

/// Records a whole [`run_session`] against `server`.
pub fn record_session<T: Transport>(server: T) -> Result<Vec<u8>, super::client::P9Error> {
    let mut c = Client::connect(Recorder::new(server), 8192, "")?;
    run_session(&mut c);
    Ok(core::mem::take(&mut c.transport_mut().script))
}
