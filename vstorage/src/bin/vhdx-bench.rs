//! `vhdx-bench`: printed throughput figures for the storage engine (not a
//! timed test: nothing here passes or fails on a number).
//!
//! Run from the workspace root (release build; files go to $TMPDIR or /tmp):
//!
//! ```text
//! cargo run --release -p vstorage --bin vhdx-bench -- copy          # or: random-write, mirror, open, all
//! cargo run --release -p vstorage --bin vhdx-bench -- copy --size-mib 512 --runs 5
//! ```
//!
//! - `open`: a crafted dynamic VHDX whose BAT has `--blocks` entries (half
//!   allocated, half zero-state blocks that keep file offsets, all at
//!   distinct descending offsets; the file is sparse) is opened read-only;
//!   then a differencing disk whose parent locator claims 3,000 entries of
//!   64 KiB strings is refused. Prints the time of each (peak memory is
//!   asserted by `tests/open_limits.rs`, which counts allocations).
//! - `copy`: a dynamic VHDX filled with data is copied by the one-pass engine
//!   (`vhdx copy`, unbuffered) and, in the same run, by a plain sequential
//!   copy of its file through the same `O_DIRECT` path (read 1 MiB, write 1
//!   MiB). Prints both rates in MB/s of disk data moved and the ratio.
//! - `random-write`: random 4 KiB writes (one flush at the end) into a
//!   dynamic VHDX and into a raw file of the same size, both unbuffered.
//!   Prints IOPS of each and the ratio.
//! - `mirror`: storage live migration of the same filled VHDX, alone and
//!   with a guest thread doing durable random 4 KiB writes through the
//!   mirror the whole time. Prints copy MB/s both ways, the guest's IOPS and
//!   write latency (median, 99th percentile) while mirrored, and how many
//!   writes were mirrored.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use vstorage::copy::{cli_copy, open_disk};
use vstorage::io::{BlockIo, FileIo, RawDisk, VirtualDisk};
use vstorage::mirror::{MigrationOptions, StorageMigration};
use vstorage::vhdx::{self, CreateParams, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;

#[derive(Parser, Debug)]
#[command(
    name = "vhdx-bench",
    about = "Printed figures for the storage engine (run a release build; files go to $TMPDIR or /tmp)"
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

/// Options every benchmark takes.
#[derive(clap::Args, Debug, Clone, Copy)]
struct Opts {
    /// Disk size in MiB (copy, random-write, mirror)
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    size_mib: u64,
    /// Runs of each measurement
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Random 4 KiB writes (random-write)
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    writes: u64,
    /// BAT entries of the crafted file (open)
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..=4_000_000))]
    blocks: u64,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// One-pass copy engine against a plain O_DIRECT file copy (MB/s)
    Copy(#[command(flatten)] Opts),
    /// Random 4 KiB writes into a dynamic VHDX and a raw file (IOPS)
    RandomWrite(#[command(flatten)] Opts),
    /// Storage live migration with and without a guest writing through the mirror
    Mirror(#[command(flatten)] Opts),
    /// Opening a crafted 200k-entry BAT, and refusing a 3,000-entry parent locator
    Open(#[command(flatten)] Opts),
    /// copy, random-write, mirror and open in turn
    All(#[command(flatten)] Opts),
}

fn main() -> ExitCode {
    let cli = match vstorage::cli::parse::<Cli>("vhdx-bench") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let dir = std::env::var_os("TMPDIR")
        .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
        .join(format!("vhdx-bench-{}", std::process::id()));
    let result = std::fs::create_dir_all(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))
        .and_then(|()| match &cli.bench {
            Bench::Copy(o) => bench_copy(&dir, o),
            Bench::RandomWrite(o) => bench_random_write(&dir, o),
            Bench::Mirror(o) => bench_mirror(&dir, o),
            Bench::Open(o) => bench_open(&dir, o),
            Bench::All(o) => bench_copy(&dir, o)
                .and_then(|()| bench_random_write(&dir, o))
                .and_then(|()| bench_mirror(&dir, o))
                .and_then(|()| bench_open(&dir, o)),
        });
    // Best effort: the benchmark's own result is what matters.
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhdx-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Deterministic non-zero filler (xorshift), so no chunk looks empty.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for w in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = (x | 0x0101_0101_0101_0101).to_le_bytes();
        w.copy_from_slice(&b[..w.len()]);
    }
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// A row of a table: name, one figure per run, and whether more is better
/// (throughput) or less (latency), which decides the "best" column.
type Row<'a> = (&'a str, &'a [f64], bool);

/// Prints a table: one row per series, one column per run, then best and median.
fn table(unit: &str, runs: u32, rows: &[Row<'_>], prec: usize) {
    let head: String = (1..=runs)
        .map(|r| format!("{:>9}", format!("run{r}")))
        .collect();
    println!("  {unit:<34}{head}{:>9}{:>9}", "best", "median");
    for &(name, v, more_is_better) in rows {
        let cells: String = v.iter().map(|x| format!("{x:>9.prec$}")).collect();
        let top = if more_is_better {
            best(v)
        } else {
            v.iter().copied().fold(f64::INFINITY, f64::min)
        };
        println!("  {name:<34}{cells}{top:>9.prec$}{:>9.prec$}", median(v));
    }
}

/// `a / b` as a percentage, for bests and for medians.
fn ratio(label: &str, a: &[f64], b: &[f64]) {
    let pct = |x: f64, y: f64| 100.0 * x / y.max(1e-9);
    println!(
        "  ratio {label}: {:.0}% of best, {:.0}% of median",
        pct(best(a), best(b)),
        pct(median(a), median(b))
    );
}

fn mb_per_s(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / 1e6 / t.as_secs_f64().max(1e-9)
}

/// A dynamic VHDX of `size` bytes, every block written.
fn make_source(path: &Path, size: u64) -> Result<(), String> {
    let mut d = vhdx::host::create_path(path, &CreateParams::dynamic(size)).map_err(err)?;
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB);
        fill(&mut buf[..n as usize], off / MIB + 1);
        d.write(off, &buf[..n as usize]).map_err(err)?;
        off += n;
    }
    d.flush().map_err(err)?;
    d.close().map_err(err)
}

/// Plain sequential file copy through the same unbuffered path the engine
/// uses: 1 MiB reads, 1 MiB writes, one flush. Returns bytes moved.
fn plain_copy(src: &Path, dst: &Path) -> Result<u64, String> {
    let input = FileIo::open_direct(src, false).map_err(err)?;
    drop(FileIo::create(dst).map_err(err)?);
    let mut output = FileIo::open_direct(dst, true).map_err(err)?;
    let len = input.len().map_err(err)?;
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(MIB) as usize;
        input.read_at(off, &mut buf[..n]).map_err(err)?;
        output.write_at(off, &buf[..n]).map_err(err)?;
        off += n as u64;
    }
    output.flush().map_err(err)?;
    Ok(len)
}

fn bench_copy(dir: &Path, o: &Opts) -> Result<(), String> {
    let size = o.size_mib * MIB;
    let src = dir.join("source.vhdx");
    make_source(&src, size)?;
    let direct = FileIo::open_direct(&src, false).map_err(err)?.is_direct();
    let file_len = std::fs::metadata(&src).map_err(err)?.len();
    println!(
        "copy: {} MiB dynamic VHDX, all blocks written ({} MiB file), in {}; O_DIRECT: {}",
        o.size_mib,
        file_len / MIB,
        dir.display(),
        if direct {
            "yes"
        } else {
            "no (fell back to buffered)"
        }
    );
    let mut engine = Vec::new();
    let mut plain = Vec::new();
    for run in 0..o.runs {
        // Alternate the order so neither always runs on a warmer device.
        for which in if run % 2 == 0 { [0, 1] } else { [1, 0] } {
            let dst = dir.join(if which == 0 {
                "engine.vhdx"
            } else {
                "plain.bin"
            });
            let t = Instant::now();
            if which == 0 {
                cli_copy(&src, &dst, false)?;
                engine.push(mb_per_s(size, t.elapsed()));
            } else {
                let bytes = plain_copy(&src, &dst)?;
                plain.push(mb_per_s(bytes, t.elapsed()));
            }
            std::fs::remove_file(&dst).map_err(err)?;
        }
    }
    table(
        "MB/s",
        o.runs,
        &[
            ("vhdx copy engine", &engine, true),
            ("plain sequential copy (O_DIRECT)", &plain, true),
        ],
        1,
    );
    ratio("engine / plain", &engine, &plain);
    std::fs::remove_file(&src).map_err(err)
}

/// Random 4 KiB-aligned offsets inside `size` bytes (xorshift, fixed seed).
fn offsets(size: u64, n: u64) -> Vec<u64> {
    let slots = size / 4096;
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % slots) * 4096
        })
        .collect()
}

fn random_writes(d: &mut dyn VirtualDisk, offs: &[u64]) -> Result<Duration, String> {
    let mut buf = vec![0u8; 4096];
    fill(&mut buf, 7);
    let t = Instant::now();
    for &o in offs {
        d.write(o, &buf).map_err(err)?;
    }
    d.flush().map_err(err)?;
    Ok(t.elapsed())
}

fn bench_random_write(dir: &Path, o: &Opts) -> Result<(), String> {
    let size = o.size_mib * MIB;
    let offs = offsets(size, o.writes);
    println!(
        "random-write: {} random 4 KiB writes over {} MiB, unbuffered, one flush at the end",
        o.writes, o.size_mib
    );
    let mut vhdx_iops = Vec::new();
    let mut raw_iops = Vec::new();
    for _ in 0..o.runs {
        let vp = dir.join("rw.vhdx");
        drop(vhdx::host::create_path(&vp, &CreateParams::dynamic(size)).map_err(err)?);
        let mut v = vhdx::host::open_path_direct(&vp, true).map_err(err)?;
        let t = random_writes(&mut v, &offs)?;
        v.close().map_err(err)?;
        drop(v);
        vhdx_iops.push(o.writes as f64 / t.as_secs_f64().max(1e-9));
        std::fs::remove_file(&vp).map_err(err)?;

        let rp = dir.join("rw.raw");
        drop(FileIo::create(&rp).map_err(err)?);
        let io = FileIo::open_direct(&rp, true).map_err(err)?;
        let mut r = RawDisk::create(io, size).map_err(err)?;
        let t = random_writes(&mut r, &offs)?;
        raw_iops.push(o.writes as f64 / t.as_secs_f64().max(1e-9));
        drop(r);
        std::fs::remove_file(&rp).map_err(err)?;
    }
    table(
        "IOPS",
        o.runs,
        &[
            ("dynamic VHDX", &vhdx_iops, true),
            ("raw file", &raw_iops, true),
        ],
        0,
    );
    ratio("VHDX / raw", &vhdx_iops, &raw_iops);
    Ok(())
}

/// One storage migration of `src` to `dst`, with a guest writing random
/// 4 KiB blocks through the mirror until the copy is done when `with_guest`.
/// Returns (copy MB/s, guest write latencies, mirrored writes).
fn one_migration(
    src: &Path,
    dst: &Path,
    size: u64,
    with_guest: bool,
) -> Result<(f64, Vec<Duration>, u64), String> {
    let disk = open_disk(src, true).map_err(err)?;
    let opts = MigrationOptions {
        keep_source: true,
        ..MigrationOptions::default()
    };
    let m = StorageMigration::start(disk, src, dst, opts).map_err(|(e, _)| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let guest = with_guest.then(|| {
        let mut disk = m.disk();
        let stop = Arc::clone(&stop);
        let offs = offsets(size, 1 << 16);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            fill(&mut buf, 9);
            let mut lat = Vec::new();
            for &o in offs.iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let t = Instant::now();
                if disk.write(o, &buf).is_err() {
                    break;
                }
                lat.push(t.elapsed());
            }
            lat
        })
    });
    let t = Instant::now();
    let copied = m.run_copy();
    let elapsed = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let lat = match guest {
        Some(g) => g.join().map_err(|_| "guest thread panicked".to_string())?,
        None => Vec::new(),
    };
    copied.map_err(err)?;
    let mirrored = m.progress().mirrored_writes;
    m.complete().map_err(err)?;
    drop(m);
    std::fs::remove_file(dst).map_err(err)?;
    Ok((mb_per_s(size, elapsed), lat, mirrored))
}

fn bench_mirror(dir: &Path, o: &Opts) -> Result<(), String> {
    let size = o.size_mib * MIB;
    let src = dir.join("mirror-source.vhdx");
    make_source(&src, size)?;
    let dst = dir.join("mirror-dest.vhdx");
    println!(
        "mirror: storage live migration of a {} MiB dynamic VHDX (all blocks written), 1 MiB chunks;",
        o.size_mib
    );
    println!("  the guest does durable random 4 KiB writes through the mirror during the copy");
    let (mut alone, mut busy, mut iops) = (Vec::new(), Vec::new(), Vec::new());
    let (mut p50, mut p99, mut mirrored) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..o.runs {
        alone.push(one_migration(&src, &dst, size, false)?.0);
        let (rate, mut lat, n) = one_migration(&src, &dst, size, true)?;
        busy.push(rate);
        let total: Duration = lat.iter().sum();
        iops.push(lat.len() as f64 / total.as_secs_f64().max(1e-9));
        lat.sort();
        let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e3);
        p50.push(ms(lat.get(lat.len() / 2)));
        p99.push(ms(lat.get(lat.len() * 99 / 100)));
        mirrored.push(n as f64);
    }
    table(
        "copy MB/s",
        o.runs,
        &[
            ("no guest I/O", &alone, true),
            ("guest writing", &busy, true),
        ],
        1,
    );
    ratio("copy with / without guest writes", &busy, &alone);
    table(
        "guest writes during the copy",
        o.runs,
        &[
            ("IOPS", &iops, true),
            ("latency p50 (ms)", &p50, false),
            ("latency p99 (ms)", &p99, false),
            ("writes mirrored", &mirrored, true),
        ],
        1,
    );
    std::fs::remove_file(&src).map_err(err)
}

/// Opens the crafted BAT file `o.runs` times and refuses the locator bomb
/// as often; prints milliseconds per open.
fn bench_open(dir: &Path, o: &Opts) -> Result<(), String> {
    let path = dir.join("bat-stress.vhdx");
    let len = vhdx::crafted::bat_stress_file(&path, o.blocks).map_err(err)?;
    let bomb = dir.join("locator-bomb.vhdx");
    std::fs::write(&bomb, vhdx::crafted::locator_bomb(3000).map_err(err)?).map_err(err)?;
    println!(
        "open: a {}-block dynamic VHDX, BAT half allocated and half zero-state with offsets ({} MiB sparse file);",
        o.blocks,
        len / MIB
    );
    println!(
        "  a differencing VHDX whose parent locator claims 3,000 entries of 64 KiB keys and values"
    );
    let (mut open_ms, mut refuse_ms) = (Vec::new(), Vec::new());
    for _ in 0..o.runs {
        let io = FileIo::open(&path, false).map_err(err)?;
        let t = Instant::now();
        let d = Vhdx::open(io, OpenOptions::read_only()).map_err(err)?;
        open_ms.push(t.elapsed().as_secs_f64() * 1e3);
        drop(d);
        let io = FileIo::open(&bomb, false).map_err(err)?;
        let t = Instant::now();
        if Vhdx::open(io, OpenOptions::read_only()).is_ok() {
            return Err("the 3,000-entry parent locator was accepted".into());
        }
        refuse_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    table(
        "ms",
        o.runs,
        &[
            ("open of the crafted BAT", &open_ms, false),
            ("refusal of the locator bomb", &refuse_ms, false),
        ],
        1,
    );
    std::fs::remove_file(&path).map_err(err)?;
    std::fs::remove_file(&bomb).map_err(err)
}
