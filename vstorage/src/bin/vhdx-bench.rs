//! `vhdx-bench`: printed throughput figures for the storage engine (not a
//! timed test: nothing here passes or fails on a number).
//!
//! Run from the workspace root (release build; files go to $TMPDIR or /tmp):
//!
//! ```text
//! cargo run --release -p vstorage --bin vhdx-bench -- copy          # or: random-write, mirror, all
//! cargo run --release -p vstorage --bin vhdx-bench -- copy --size-mib 512 --runs 5
//! ```
//!
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

use vstorage::copy::{cli_copy, open_disk};
use vstorage::io::{BlockIo, FileIo, RawDisk, VirtualDisk};
use vstorage::mirror::{MigrationOptions, StorageMigration};
use vstorage::vhdx::{self, CreateParams};

const MIB: u64 = 1 << 20;
const USAGE: &str =
    "usage: vhdx-bench copy|random-write|all [--size-mib N] [--runs N] [--writes N]";

struct Opts {
    size_mib: u64,
    runs: u32,
    writes: u64,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = parse(&args).and_then(|(cmd, opts)| {
        let dir = std::env::var_os("TMPDIR")
            .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
            .join(format!("vhdx-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let r = match cmd.as_str() {
            "copy" => bench_copy(&dir, &opts),
            "random-write" => bench_random_write(&dir, &opts),
            "mirror" => bench_mirror(&dir, &opts),
            "all" => bench_copy(&dir, &opts)
                .and_then(|()| bench_random_write(&dir, &opts))
                .and_then(|()| bench_mirror(&dir, &opts)),
            other => Err(format!("unknown benchmark {other:?}\n{USAGE}")),
        };
        // Best effort: the benchmark's own result is what matters.
        let _ = std::fs::remove_dir_all(&dir);
        r
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhdx-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse(args: &[String]) -> Result<(String, Opts), String> {
    let mut opts = Opts {
        size_mib: 256,
        runs: 3,
        writes: 20_000,
    };
    let mut cmd = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|&v| v > 0)
                .ok_or_else(|| format!("{name} needs a positive number\n{USAGE}"))
        };
        match a.as_str() {
            "--size-mib" => opts.size_mib = num(a)?.min(64 * 1024),
            "--runs" => opts.runs = u32::try_from(num(a)?.min(100)).unwrap_or(100),
            "--writes" => opts.writes = num(a)?.min(10_000_000),
            "-h" | "--help" => return Err(USAGE.to_string()),
            c if cmd.is_none() && !c.starts_with('-') => cmd = Some(c.to_string()),
            other => return Err(format!("unexpected argument {other:?}\n{USAGE}")),
        }
    }
    Ok((cmd.ok_or(USAGE)?, opts))
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
