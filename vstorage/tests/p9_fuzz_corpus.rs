//! The 9P fuzz targets' committed seeds and regressions
//! (`fuzz/seeds/p9_*/`, `fuzz/regressions/p9_*/`) through the harnesses
//! the targets call, on stable Rust; and a check that the seeds still
//! reach what they were recorded for (`cargo run -p vstorage --example
//! p9_fuzz_seeds` rewrites them).

use std::path::PathBuf;

use vstorage::p9::fuzz::{self, run_session, Script};
use vstorage::p9::wire::{parse_reply, Expect, Parsed};
use vstorage::p9::{Client, Op};

fn inputs(kind: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut v: Vec<(String, Vec<u8>)> = rd
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn seeds_and_regressions_run_clean() {
    for kind in ["seeds", "regressions"] {
        for (_, data) in inputs(kind, "p9_reply") {
            fuzz::reply(&data);
        }
        for (_, data) in inputs(kind, "p9_session") {
            fuzz::session(&data);
        }
    }
}

#[test]
fn reply_seeds_are_valid_replies_of_every_kind() {
    let seeds = inputs("seeds", "p9_reply");
    assert!(seeds.len() >= 20, "{} seeds", seeds.len());
    let mut kinds = std::collections::BTreeSet::new();
    for (name, data) in &seeds {
        let op = Op::ALL[usize::from(data[0] & 0x7f) % Op::ALL.len()];
        let count = u32::from_le_bytes(data[1..5].try_into().unwrap());
        // Version replies carry NOTAG, the rest tag 1: take the reply's.
        let tag = u16::from_le_bytes([data[10], data[11]]);
        let parsed = parse_reply(Expect { op, tag, count }, &data[5..]);
        assert!(matches!(parsed, Ok(Parsed::Ok(_))), "{name}: {parsed:?}");
        kinds.insert(op.t());
    }
    assert!(kinds.len() >= 15, "{kinds:?}");
}

#[test]
fn the_session_seed_gets_through_every_operation() {
    let seeds = inputs("seeds", "p9_session");
    let (_, script) = seeds
        .iter()
        .find(|(n, _)| n == "full-session")
        .expect("fuzz/seeds/p9_session/full-session");
    let mut c = Client::connect(Script::new(script), 8192, "").expect("connect");
    let root = c.root();
    // The same calls run_session makes, checked one by one.
    assert!(c.statfs(root).unwrap().total_bytes() > 0);
    let f = c.walk_path("dir/disk.vhdx").unwrap();
    c.lopen(f, vstorage::p9::open_flags::RDWR).unwrap();
    let mut buf = vec![0u8; 20_000];
    assert_eq!(c.read(f, 0, &mut buf).unwrap(), 12_000);
    c.write(f, 4096, &[0x5a; 10_000]).unwrap();
    assert_eq!(c.getattr(f).unwrap().size, 14_096);
    c.fsync(f).unwrap();
    c.set_size(f, 1 << 20).unwrap();
    c.clunk(f).unwrap();
    let d = c.walk_path("dir").unwrap();
    c.lopen(
        d,
        vstorage::p9::open_flags::RDONLY | vstorage::p9::open_flags::DIRECTORY,
    )
    .unwrap();
    let names: Vec<String> = c.readdir(d).unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["a", "disk.vhdx"]);
    c.mkdir(d, "sub", 0o755).unwrap();
    c.renameat(d, "a", d, "b").unwrap();
    c.unlinkat(d, "b", false).unwrap();
    c.clunk(d).unwrap();
    let n = c.walk(root, &[]).unwrap();
    c.lcreate(n, "new.vhdx", 0o102, 0o644).unwrap();
    c.rename(n, root, "renamed.vhdx").unwrap();
    c.clunk(n).unwrap();
    // And run_session itself consumes the script exactly.
    let mut c = Client::connect(Script::new(script), 8192, "").unwrap();
    run_session(&mut c);
    let requests = c.transport().requests;
    assert!(requests >= 25, "{requests}");
}
