//! Writes the 9P fuzz targets' seeds (`vstorage/fuzz/seeds/p9_reply/`,
//! `p9_session/`): replies of every kind recorded from the server double
//! over a scratch directory laid out as the session harness expects.
//! `tests/p9_fuzz_corpus.rs` checks the committed seeds still reach the
//! code they were made for.

use std::fs;
use std::path::Path;

use vstorage::p9::fuzz::record_session;
use vstorage::p9::server::DirServer;

fn main() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let scratch = tempfile::tempdir().expect("temp dir");
    fs::create_dir(scratch.path().join("dir")).unwrap();
    fs::write(scratch.path().join("dir/disk.vhdx"), vec![7u8; 12_000]).unwrap();
    fs::write(scratch.path().join("dir/a"), b"a").unwrap();
    let script = record_session(DirServer::new(scratch.path(), 8192)).expect("session");
    let dir = seeds.join("p9_session");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("full-session"), &script).unwrap();

    // Each recorded reply as a `reply` seed: op selector (bit 7: fix the
    // size), count, reply.
    let dir = seeds.join("p9_reply");
    fs::create_dir_all(&dir).unwrap();
    let mut pos = 0;
    let mut n = 0;
    while pos + 2 <= script.len() {
        let len = u16::from_le_bytes([script[pos], script[pos + 1]]) as usize;
        let reply = &script[pos + 2..pos + 2 + len];
        pos += 2 + len;
        let kind = reply[4];
        let op = vstorage::p9::Op::ALL
            .iter()
            .position(|o| o.r() == kind)
            .unwrap_or(0) as u8;
        let mut seed = vec![op];
        seed.extend_from_slice(&20_000u32.to_le_bytes());
        seed.extend_from_slice(reply);
        fs::write(dir.join(format!("reply-{n:02}-type-{kind}")), seed).unwrap();
        n += 1;
    }
    println!("wrote {} bytes of session and {n} replies", script.len());
}
