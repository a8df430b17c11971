//! Stable-Rust fuzz corpus runner: the `vhdx_open` fuzz harness over valid
//! seed images and thousands of deterministic mutations of them (bit flips,
//! truncations, field overwrites in headers, region tables, metadata, BAT and
//! log, with and without fixed-up checksums). The harness panics on any bug;
//! this test only has to finish.

use vstorage::io::{MemIo, VirtualDisk};
use vstorage::vhdx::format::{checksum_with_hole, wr32, wr64};
use vstorage::vhdx::{create, CreateParams, OpenOptions, ParentSpec, Vhdx};

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

fn image(p: &CreateParams, writes: &[(u64, usize, u8)]) -> Vec<u8> {
    let mut d = create(MemIo::new(), p).unwrap();
    for &(o, l, b) in writes {
        d.write(o, &vec![b; l]).unwrap();
    }
    d.close().unwrap();
    d.io().as_slice().to_vec()
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let mut p = CreateParams::dynamic(3 << 20);
    p.block_size = 1 << 20;
    p.guid_seed = 1;
    out.push((
        "dynamic",
        image(&p, &[(0, 4096, 1), ((2 << 20) + 512, 512, 2)]),
    ));
    let mut f = p.clone();
    f.fixed = true;
    f.virtual_size = 2 << 20;
    out.push(("fixed", image(&f, &[(512, 512, 3)])));
    let mut s4 = p.clone();
    s4.logical_sector_size = 4096;
    out.push(("sector4096", image(&s4, &[(4096, 4096, 4)])));
    // A differencing child with a partially present block.
    let parent = Vhdx::open(MemIo::from_vec(out[0].1.clone()), OpenOptions::read_only()).unwrap();
    let mut c = p.clone();
    c.parent = Some(ParentSpec {
        data_write_guid: parent.header().data_write_guid,
        relative_path: Some("p.vhdx".into()),
        absolute_path: Some("\\\\?\\tmp\\p.vhdx".into()),
        virtual_size: parent.virtual_size(),
        logical_sector_size: 512,
        physical_sector_size: 4096,
        disk_id: parent.disk_id(),
    });
    let mut child = create(MemIo::new(), &c).unwrap();
    child.attach_parent(parent).unwrap();
    child.write(1024, &[5u8; 1024]).unwrap();
    child.close().unwrap();
    out.push(("differencing", child.io().as_slice().to_vec()));
    // A pending log: entry flushed, not applied.
    let mut d = create(MemIo::new(), &p).unwrap();
    d.write(0, &[6u8; 512]).unwrap();
    d.debug_stop_before_apply();
    d.write(1 << 20, &[7u8; 512]).unwrap();
    assert!(d.flush().is_err());
    out.push(("pending-log", d.io().as_slice().to_vec()));
    out
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
