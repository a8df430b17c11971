//! Deterministic fuzz corpus: the harnesses of `migration/fuzz` run over
//! valid streams and many thousands of mutations of them (bit flips,
//! truncations, length/count/type overwrites, record reordering), with and
//! without CRC repair so mutated payloads reach the parsers. The assertion
//! is that nothing panics (a panic fails the test), that valid streams
//! decode, and that every mutation either decodes or errors cleanly.

use migration::fuzzing::{
    decode_all, decode_fed, decode_lent, fix_crcs, fuzz_decode, fuzz_receive, fuzz_seeds,
    sample_streams,
};
use migration::stream::{Direction, CRC_BYTES, HEADER_BYTES};
use migration::MigrationResult;
use std::path::Path;

/// xorshift64*: deterministic randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// (start, total length) of each record after the magic.
fn records(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 8;
    while pos + HEADER_BYTES <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().unwrap()) as usize;
        let total = HEADER_BYTES + len + CRC_BYTES;
        out.push((pos, total));
        pos += total;
    }
    assert_eq!(pos, bytes.len());
    out
}

/// The harness's control byte; `chunk_log2` in 0..16.
fn ctl(dir: Direction, fix: bool, chunk_log2: usize) -> u8 {
    let d = u8::from(dir == Direction::DestToSource);
    let f = if fix { 2 } else { 0 };
    d | f | ((chunk_log2 as u8 & 0xf) << 2)
}

/// A chunk size for the decoder feed: tiny chunks (1-8 bytes, slow in a
/// debug build) now and then, larger ones mostly.
fn chunk_log2(rng: &mut Rng) -> usize {
    if rng.below(32) == 0 {
        rng.below(4)
    } else {
        4 + rng.below(12)
    }
}

/// Run the harnesses on `bytes` as a stream of direction `dir`.
fn run(dir: Direction, bytes: &[u8], fix: bool, chunk_log2: usize, receiver: bool) {
    let mut input = Vec::with_capacity(bytes.len() + 1);
    input.push(ctl(dir, fix, chunk_log2));
    input.extend_from_slice(bytes);
    // Fed into the decoder, then lent in pieces as well (control bit 6).
    for lent in [0, 0x40] {
        input[0] = (input[0] & !0x40) | lent;
        fuzz_decode(&input);
        if receiver && dir == Direction::SourceToDest {
            let _ = fuzz_receive(&input);
        }
    }
}

#[test]
fn valid_samples_decode_completely() {
    for (dir, bytes) in sample_streams() {
        let n = records(&bytes).len() as u64;
        for chunk in [1, 2, 5, 64, 1 << 20] {
            assert_eq!(decode_all(dir, &bytes, chunk), (n, true));
        }
        run(dir, &bytes, false, 6, true);
    }
    // The receive harness's destination keeps what is written: the two
    // complete source streams (version 1, and version 2 with the verify
    // record) get through the digest checks to `go` and resume; the
    // aborted one is cancelled.
    let samples = sample_streams();
    let receive = |i: usize| {
        let mut input = vec![ctl(Direction::SourceToDest, false, 12)];
        input.extend_from_slice(&samples[i].1);
        fuzz_receive(&input)
    };
    assert_eq!(receive(0), Some(MigrationResult::Completed));
    assert_eq!(receive(1), Some(MigrationResult::Cancelled));
    assert_eq!(receive(3), Some(MigrationResult::Completed));
    // The same where the link lends its bytes (pages applied where they
    // lie), in pieces of 1 byte to 32 KiB: records cut by a piece's end
    // go through the decoder's buffer.
    for piece_log2 in [0, 3, 7, 12, 15] {
        let lent = |i: usize| {
            let mut input = vec![ctl(Direction::SourceToDest, false, piece_log2) | 0x40];
            input.extend_from_slice(&samples[i].1);
            fuzz_receive(&input)
        };
        assert_eq!(lent(0), Some(MigrationResult::Completed), "{piece_log2}");
        assert_eq!(lent(1), Some(MigrationResult::Cancelled), "{piece_log2}");
        assert_eq!(lent(3), Some(MigrationResult::Completed), "{piece_log2}");
    }
    // Decoded where they lie: the same records at the same stream offsets.
    for (dir, bytes) in &samples {
        for piece in [1, 5, 64, 4096, 1 << 20] {
            let (fed, fed_end) = decode_fed(*dir, bytes, piece);
            let (lent, lent_end) = decode_lent(*dir, bytes, piece);
            assert_eq!(fed, lent, "{piece}");
            assert!(fed_end.is_ok() && lent_end.is_ok(), "{piece}");
            assert_eq!(lent.len(), records(bytes).len());
        }
    }
}

#[test]
fn truncations_never_panic() {
    let mut cases = 0;
    for (dir, bytes) in sample_streams() {
        let recs = records(&bytes);
        // Every cut around every record boundary and header, then a stride.
        let mut cuts: Vec<usize> = recs
            .iter()
            .flat_map(|&(start, total)| {
                (start.saturating_sub(2)..start + HEADER_BYTES + 14)
                    .chain(start + total - 5..start + total)
            })
            .chain((0..bytes.len()).step_by(61))
            .filter(|&c| c < bytes.len())
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        for cut in cuts {
            let (n, done) = decode_all(dir, &bytes[..cut], 7);
            assert!(!done, "a truncated stream never ends cleanly");
            assert!(n <= recs.len() as u64);
            run(dir, &bytes[..cut], false, cut % 16, cut % 5 == 0);
            cases += 1;
        }
    }
    assert!(cases > 500, "{cases}");
}

#[test]
fn bit_flips_never_panic() {
    let mut rng = Rng(0x5eed_0001);
    let mut cases = 0;
    for (dir, bytes) in sample_streams() {
        let flips = if bytes.len() > 4096 { 2500 } else { 1500 };
        for i in 0..flips {
            let mut m = bytes.clone();
            for _ in 0..1 + rng.below(3) {
                let bit = rng.below(m.len() * 8);
                m[bit / 8] ^= 1 << (bit % 8);
            }
            // Without repair the CRC (or the magic) catches the flip...
            if i % 4 == 0 {
                let (_, done) = decode_all(dir, &m, 4096);
                assert!(!done || m == bytes);
            }
            // ...with repair the payload parsers and the state machine see it.
            run(dir, &m, true, chunk_log2(&mut rng), i % 16 == 0);
            cases += 1;
        }
    }
    assert!(cases >= 6500);
}

#[test]
fn field_overwrites_never_panic() {
    let mut rng = Rng(0x5eed_0002);
    let interesting: [u64; 12] = [
        0,
        1,
        2,
        63,
        64,
        65,
        255,
        4096,
        65536,
        0x7fff_ffff,
        0xffff_ffff,
        u64::MAX,
    ];
    let mut cases = 0;
    for (dir, bytes) in sample_streams() {
        let recs = records(&bytes);
        for &(start, total) in &recs {
            let len = (total - HEADER_BYTES - CRC_BYTES) as u64;
            // Length field: boundary values and near misses.
            for v in interesting
                .iter()
                .copied()
                .chain([len.wrapping_sub(1), len + 1, len * 2])
            {
                for fix in [false, true] {
                    let mut m = bytes.clone();
                    m[start + 4..start + 8].copy_from_slice(&(v as u32).to_le_bytes());
                    run(dir, &m, fix, 3, false);
                    cases += 1;
                }
            }
            // Type and flags fields.
            for t in [
                0u16, 1, 2, 0x10, 0x20, 0x21, 0x22, 0x30, 0x40, 0xf0, 0xf1, 0x101, 0x102, 0x1ff,
                0x7777,
            ] {
                for flags in [0u16, 1, 2] {
                    let mut m = bytes.clone();
                    m[start..start + 2].copy_from_slice(&t.to_le_bytes());
                    m[start + 2..start + 4].copy_from_slice(&flags.to_le_bytes());
                    run(dir, &m, true, 12, false);
                    cases += 1;
                }
            }
            // Count-like fields inside the payload: interesting values at
            // random offsets, in 1, 2, 4 and 8 byte widths.
            let payload = start + HEADER_BYTES..start + total - CRC_BYTES;
            if payload.is_empty() {
                continue;
            }
            for _ in 0..60 {
                let width = [1usize, 2, 4, 8][rng.below(4)];
                let off = payload.start + rng.below(payload.len());
                let v = interesting[rng.below(interesting.len())].to_le_bytes();
                let mut m = bytes.clone();
                let end = (off + width).min(payload.end);
                m[off..end].copy_from_slice(&v[..end - off]);
                run(dir, &m, true, chunk_log2(&mut rng), rng.below(8) == 0);
                cases += 1;
            }
        }
    }
    assert!(cases >= 1500, "{cases}");
}

#[test]
fn record_reordering_never_panics() {
    let mut rng = Rng(0x5eed_0003);
    let mut cases = 0;
    for (dir, bytes) in sample_streams() {
        let recs = records(&bytes);
        let pieces: Vec<&[u8]> = recs.iter().map(|&(s, t)| &bytes[s..s + t]).collect();
        for _ in 0..400 {
            let mut order: Vec<usize> = (0..pieces.len()).collect();
            match rng.below(3) {
                0 => {
                    let (a, b) = (rng.below(order.len()), rng.below(order.len()));
                    order.swap(a, b);
                }
                1 => {
                    let i = rng.below(order.len());
                    order.remove(i);
                }
                _ => {
                    let i = rng.below(order.len());
                    order.insert(rng.below(order.len()), order[i]);
                }
            }
            let mut m = bytes[..8].to_vec();
            for i in order {
                m.extend_from_slice(pieces[i]);
            }
            // Records are whole and CRC-valid: only the state machine stands
            // between them and the VM.
            run(dir, &m, false, chunk_log2(&mut rng), rng.below(4) == 0);
            cases += 1;
        }
    }
    assert!(cases >= 1200);
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = Rng(0x5eed_0004);
    for i in 0..3000 {
        let len = rng.below(600);
        let mut m: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Half of the inputs start with a correct magic to get further.
        if i % 2 == 0 && m.len() > 9 {
            let magic = if m[0] & 1 == 0 {
                b"HVMIGSRC"
            } else {
                b"HVMIGDST"
            };
            m[1..9].copy_from_slice(magic);
        }
        fuzz_decode(&m);
        let _ = fuzz_receive(&m);
        let mut fixed = m.clone();
        if fixed.len() > 1 {
            fix_crcs(&mut fixed[1..]);
        }
        fuzz_decode(&fixed);
    }
}

/// The cargo-fuzz seed corpus (`fuzz/seeds/TARGET/NAME`) is exactly
/// `fuzzing::fuzz_seeds()`, so the fuzzers start from valid streams of the
/// current encoder (the verify record included). After a change of the
/// encoder, rewrite the files with `HVMIGRATE_UPDATE_SEEDS=1 cargo test -p
/// migration --test corpus`.
#[test]
fn fuzz_seeds_are_the_current_sample_streams() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let update = std::env::var_os("HVMIGRATE_UPDATE_SEEDS").is_some();
    let seeds = fuzz_seeds();
    for target in ["decode", "receive"] {
        let dir = root.join(target);
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            for e in std::fs::read_dir(&dir).unwrap() {
                std::fs::remove_file(e.unwrap().path()).unwrap();
            }
        }
        let want: Vec<_> = seeds.iter().filter(|(t, _, _)| *t == target).collect();
        for (_, name, bytes) in &want {
            let path = dir.join(name);
            if update {
                std::fs::write(&path, bytes).unwrap();
            }
            let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (HVMIGRATE_UPDATE_SEEDS=1 writes it)",
                    path.display()
                )
            });
            assert!(
                on_disk == *bytes,
                "{} is stale (HVMIGRATE_UPDATE_SEEDS=1 rewrites it)",
                path.display()
            );
            // Every seed runs through both harnesses without a panic.
            fuzz_decode(bytes);
            let _ = fuzz_receive(bytes);
        }
        let files = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(files, want.len(), "{}: unexpected files", dir.display());
    }
    assert!(seeds.iter().any(|(_, n, _)| n == "v2-verified-fixcrc"));
}
