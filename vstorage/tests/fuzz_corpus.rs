//! Stable-Rust fuzz corpus runner: the whole-file harness over valid seed
//! images and thousands of deterministic mutations of them (bit flips,
//! truncations, field overwrites in headers, region tables, metadata, BAT and
//! log, with and without fixed-up checksums), and every cargo-fuzz target's
//! committed seeds and regression inputs (`fuzz/seeds/TARGET/`,
//! `fuzz/regressions/TARGET/`) through the same harness the target calls.
//! The harnesses panic on any bug; this test only has to finish.

use vstorage::io::MemIo;
use vstorage::vhdx::format::{checksum_with_hole, wr32, wr64};
use vstorage::vhdx::fuzz::{self, Templates};
use vstorage::vhdx::{OpenOptions, Vhdx};

const MIB: usize = 1 << 20;

/// SplitMix64: deterministic mutation choices.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// Valid whole-file images to mutate: the fuzz targets' templates.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    Templates::new().images()
}

/// Recomputes the header, region table and (first) log entry checksums so
/// mutations reach the code past the checksum checks.
fn fix_checksums(b: &mut [u8], seed: &[u8]) {
    for (off, len) in [
        (64 << 10, 4096),
        (128 << 10, 4096),
        (192 << 10, 65536),
        (256 << 10, 65536),
    ] {
        if b.len() >= off + len && b[off..off + len] != seed[off..off + len] {
            let c = checksum_with_hole(&b[off..off + len], 4);
            wr32(&mut b[off..off + len], 4, c);
        }
    }
    // Log entry at the start of the log (1 MiB in our layout).
    if b.len() >= MIB + 64 && &b[MIB..MIB + 4] == b"loge" {
        let len = u32::from_le_bytes(b[MIB + 8..MIB + 12].try_into().unwrap()) as usize;
        if len > 0 && len <= MIB && b.len() >= MIB + len {
            let c = checksum_with_hole(&b[MIB..MIB + len], 4);
            wr32(&mut b[MIB..MIB + len], 4, c);
        }
    }
}

/// Offsets of interesting fields in our layout.
fn field_offsets(b: &[u8]) -> Vec<usize> {
    let mut v = Vec::new();
    for h in [64usize << 10, 128 << 10] {
        v.extend([h + 8, h + 48, h + 64, h + 66, h + 68, h + 72]);
    }
    for rt in [192usize << 10, 256 << 10] {
        v.extend([
            rt + 8,
            rt + 16,
            rt + 32,
            rt + 40,
            rt + 44,
            rt + 48,
            rt + 64,
            rt + 72,
            rt + 76,
        ]);
    }
    let meta = 2 * MIB;
    v.extend([meta + 10]);
    for i in 0..6 {
        let e = meta + 32 + i * 32;
        v.extend([e, e + 16, e + 20, e + 24]);
    }
    for i in 0..6 {
        v.push(meta + (64 << 10) + i * 8);
    }
    // Parent locator fields (sixth item, if any).
    for i in 0..8 {
        v.push(meta + (64 << 10) + 48 + i * 4);
    }
    let bat = 3 * MIB;
    for i in 0..8 {
        v.push(bat + i * 8);
    }
    v.push(bat + 4096 * 8 * 8); // sector bitmap entry for 1 MiB blocks, 512-byte sectors
    for f in [
        0usize, 8, 12, 16, 24, 32, 48, 56, 64, 72, 80, 88, 4096, 4100, 8188,
    ] {
        v.push(MIB + f);
    }
    v.retain(|&o| o + 8 <= b.len());
    v
}

const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    6,
    7,
    0xFF,
    0xFFFF,
    0xFFFF_FFFF,
    u64::MAX,
    1 << 20,
    (1 << 20) + 1,
    1 << 32,
    1 << 46,
    (64 << 40) + 512,
];

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    let fields = field_offsets(&b);
    let n_mut = 1 + rng.below(3);
    for _ in 0..n_mut {
        match rng.below(6) {
            // Bit flip anywhere in the structures (first 4 MiB) or payload.
            0 | 1 => {
                let limit = b.len().min(5 * MIB) as u64;
                let at = rng.below(limit) as usize;
                b[at] ^= 1 << rng.below(8);
            }
            // Overwrite a known field with an interesting or random value.
            2 | 3 => {
                let at = fields[rng.below(fields.len() as u64) as usize];
                let v = if rng.below(2) == 0 {
                    INTERESTING[rng.below(INTERESTING.len() as u64) as usize]
                } else {
                    rng.next() >> rng.below(64)
                };
                if rng.below(2) == 0 {
                    wr64(&mut b, at, v);
                } else {
                    wr32(&mut b, at, v as u32);
                }
            }
            // Truncate.
            4 => {
                let at = rng.below(b.len() as u64) as usize;
                b.truncate(at);
            }
            // Byte-fill a run.
            _ => {
                let at = rng.below(b.len().min(4 * MIB) as u64) as usize;
                let len = (rng.below(64) as usize).min(b.len() - at);
                let v = rng.next() as u8;
                b[at..at + len].fill(v);
            }
        }
    }
    if rng.below(3) != 0 {
        fix_checksums(&mut b, seed);
    }
    b
}

#[test]
fn harness_survives_seeds_and_mutations() {
    let seeds = seeds();
    for (name, s) in &seeds {
        // Seeds are valid images.
        Vhdx::open(MemIo::from_vec(s.clone()), OpenOptions::read_only())
            .unwrap_or_else(|e| panic!("seed {name} does not open: {e}"));
        vstorage::vhdx::fuzz_harness(s);
    }
    let per_seed = std::env::var("VHDX_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400u64);
    let start = std::time::Instant::now();
    let mut opened = 0u64;
    let mut total = 0u64;
    for (i, (_, s)) in seeds.iter().enumerate() {
        let mut rng = Rng(0xC0FFEE + i as u64);
        for _ in 0..per_seed {
            let m = mutate(s, &mut rng);
            if vstorage::vhdx::fuzz_harness(&m) {
                opened += 1;
            }
            total += 1;
        }
    }
    // Mutations must reach past the checksums often enough to matter.
    assert!(
        opened * 10 > total,
        "only {opened} of {total} mutants opened"
    );
    eprintln!(
        "{total} mutants, {opened} opened, {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn short_and_empty_inputs() {
    for len in [0usize, 1, 8, 4096, 65536, 300 << 10] {
        let mut b = vec![0u8; len];
        if len >= 8 {
            b[..8].copy_from_slice(b"vhdxfile");
        }
        vstorage::vhdx::fuzz_harness(&b);
    }
}

/// The cargo-fuzz targets' directory.
fn fuzz_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Files of `fuzz/<kind>/<target>/`, sorted (none if it does not exist).
fn inputs(kind: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_dir().join(kind).join(target);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.path().is_file())
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        std::fs::read(e.path()).unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// One log entry for the `vhdx_log_replay` seeds: it rewrites BAT page 0
/// of the template (block 0 at 4 MiB, block 1 at 5 MiB, as `create` laid
/// them out), moving block 1 to new space at 6 MiB and growing the file to
/// 7 MiB (with `zero_too`, that space is zeroed by the entry as well).
fn log_seed(zero_too: bool) -> Vec<u8> {
    use vstorage::vhdx::format::{BatEntry, Guid, PAYLOAD_FULLY_PRESENT};
    use vstorage::vhdx::log::{build_entry, EntryParams, LogWrite};
    let mut page = vec![0u8; 4096];
    for (i, off) in [(0usize, 4u64), (1, 6)] {
        let e = BatEntry::new(PAYLOAD_FULLY_PRESENT, off << 20).0;
        page[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
    }
    let mut writes = vec![LogWrite::Data {
        file_offset: 3 << 20,
        data: page,
    }];
    if zero_too {
        writes.push(LogWrite::Zero {
            file_offset: 6 << 20,
            len: 1 << 20,
        });
    }
    let p = EntryParams {
        sequence_number: 1,
        tail: 0,
        log_guid: Guid::ZERO,
        flushed_file_offset: 6 << 20,
        last_file_offset: 7 << 20,
    };
    // Flag byte 1: the harness fills in its LogGuid and the checksum.
    let mut input = vec![1u8];
    input.extend(build_entry(&p, &writes));
    input
}

/// The committed seed inputs, by target (regenerate the files with
/// `VSTORAGE_WRITE_FUZZ_SEEDS=1 cargo test -p vstorage --test fuzz_corpus`).
fn seed_inputs() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let patch = |sel: u8, flags: u8, off: u32, bytes: &[u8]| {
        let mut v = vec![sel, flags];
        v.extend(off.to_le_bytes());
        v.push(bytes.len() as u8);
        v.extend(bytes);
        v
    };
    let op = |o: u8, sector: u16, fill: u8| [o, (sector >> 8) as u8, sector as u8, fill];
    let ops = |sel: u8, list: &[[u8; 4]]| {
        let mut v = vec![sel];
        for o in list {
            v.extend(o);
        }
        v
    };
    let mut raw = vec![5u8];
    raw.extend(b"vhdxfile");
    raw.resize(200, 0);
    vec![
        ("vhdx_open", "dynamic", vec![0, 0]),
        ("vhdx_open", "sector4096", vec![1, 0]),
        ("vhdx_open", "fixed", vec![2, 0]),
        ("vhdx_open", "differencing", vec![3, 0]),
        ("vhdx_open", "pending-log", vec![4, 0]),
        ("vhdx_open", "raw-short", raw),
        // BAT entry 1 of the dynamic template made zero-state with space.
        (
            "vhdx_open",
            "zero-block",
            patch(0, 1, 3 << 20 | 8, &((5u64 << 20) | 2).to_le_bytes()),
        ),
        // Header 1's log offset changed, checksums fixed.
        (
            "vhdx_open",
            "log-offset",
            patch(0, 1, (64 << 10) + 72, &(3u64 << 20).to_le_bytes()),
        ),
        (
            "vhdx_io",
            "dynamic",
            ops(
                0,
                &[
                    op(0, 7, 0x11),
                    op(1, 0, 3),
                    op(2, 0, 0),
                    op(3, 0, 0),
                    op(1, 7, 1),
                ],
            ),
        ),
        (
            "vhdx_io",
            "sector4096",
            ops(
                1,
                &[op(0, 300, 0x22), op(4, 0, 0), op(0, 1000, 9), op(1, 299, 4)],
            ),
        ),
        (
            "vhdx_io",
            "fixed-crash",
            ops(2, &[op(0, 5, 0x33), op(5, 4000, 0x44), op(1, 4000, 2)]),
        ),
        (
            "vhdx_io",
            "differencing",
            ops(
                3,
                &[op(0, 3, 0x55), op(1, 0, 15), op(5, 6000, 7), op(4, 0, 0)],
            ),
        ),
        ("vhdx_log_replay", "bat-page", log_seed(false)),
        ("vhdx_log_replay", "bat-page-and-zero", log_seed(true)),
        ("vhdx_log_replay", "empty", vec![0]),
    ]
}

fn run_target(t: &Templates, target: &str, data: &[u8]) {
    match target {
        "vhdx_open" => {
            fuzz::open(t, data);
        }
        "vhdx_io" => fuzz::io(t, data),
        "vhdx_log_replay" => fuzz::log_replay(t, data),
        other => panic!("no harness for {other}"),
    }
}

const TARGETS: [&str; 3] = ["vhdx_open", "vhdx_io", "vhdx_log_replay"];

/// Every fuzz target has committed seeds equal to what `seed_inputs`
/// builds, and each seed and regression input runs through its harness
/// (the same code the cargo-fuzz targets call) without a failure.
#[test]
fn fuzz_seeds_and_regressions_run_clean() {
    let t = Templates::new();
    let want = seed_inputs();
    if std::env::var_os("VSTORAGE_WRITE_FUZZ_SEEDS").is_some() {
        for (target, name, data) in &want {
            let dir = fuzz_dir().join("seeds").join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), data).unwrap();
        }
    }
    for target in TARGETS {
        assert!(
            fuzz_dir()
                .join("fuzz_targets")
                .join(format!("{target}.rs"))
                .is_file(),
            "{target} has no cargo-fuzz target"
        );
        let seeds = inputs("seeds", target);
        let expected: Vec<_> = want.iter().filter(|s| s.0 == target).collect();
        assert_eq!(seeds.len(), expected.len(), "{target}: seeds on disk");
        for (_, name, data) in expected {
            let on_disk = seeds.iter().find(|s| s.0 == *name);
            assert_eq!(on_disk.map(|s| &s.1), Some(data), "{target}/{name}");
        }
        for (name, data) in seeds.iter().chain(&inputs("regressions", target)) {
            assert!(data.len() <= 16 << 10, "{target}/{name} is not small");
            run_target(&t, target, data);
        }
    }
    // The seeds reach the code past the checksums: the log seeds replay.
    for (name, data) in inputs("seeds", "vhdx_log_replay") {
        let img = fuzz::log_image(&t, &data);
        let d = Vhdx::open(img, OpenOptions::read_only()).unwrap();
        assert_eq!(d.log_was_replayed(), name != "empty", "{name}");
    }
    for (name, data) in inputs("seeds", "vhdx_open") {
        if name != "raw-short" {
            assert!(fuzz::open(&t, &data), "seed {name} does not open");
        }
    }
}
