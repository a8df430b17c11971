//! `qemu-runner bench storage [--json]`: storage live migration of a VM's
//! disk between two stores of one node, measured against the node's own
//! plain 9P copy and `qemu-img convert` on the host (issue 12's benchmark).
//!
//! On node a of the running cluster (or of one booted for the run): a VM
//! with a 1 GiB dynamic VHDX on store `local` runs `disk-verify` until its
//! guest has written 512 MiB (64 rounds of 8 MiB). Then two scenarios, each
//! one `vm-move-storage` with `keep_source` (so the source can be measured
//! after the switch):
//!
//! | scenario | the VM | move |
//! |---|---|---|
//! | `writes` | runs on: the guest writes 8 MiB a round while the copy runs (writes behind the cursor mirrored); stopped once the job is seen completed | `local` -> `shared:bench-storage` |
//! | `idle` | stopped: nothing written | `shared:bench-storage` -> `local:bench-storage` |
//!
//! Per scenario: the bytes the job copied (the source's allocated bytes)
//! over the job's wall time (which, for `writes`, includes the guest's
//! slices between the copy's steps), next to, in the same run, the
//! node's store benchmark's plain read+write copy of a file of the data's
//! size (544 MiB) on store `local` (`store-bench`: its copy phase, timed
//! inside its own steps; run right before and right after each move, the
//! move held against the mean of the two, as the node's speed drifts by
//! 2-3x within minutes on a shared machine) and `qemu-img convert` of the source VHDX to a new VHDX on
//! the host; the ratios to both; and the destination's allocated size (the
//! host's `st_blocks`) against the source's. Goals: >= 0.8 x the plain
//! copy; allocated within 1 %.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hvmgmt::auth::ClusterKey;
use hvmgmt::proto::{Body, JobInfo, JobState, Request};
use serde::Serialize;

use crate::cluster;
use crate::hvctl::{self, Client};

/// The VM's disk, the data its guest writes before the moves, the span
/// `disk-verify` writes a round.
pub const DISK_MIB: u64 = 1024;
pub const DATA_MIB: u64 = 512;
const SPAN_MIB: u64 = 8;
/// The VM and its memory.
const VM: &str = "bstore";
const VM_MIB: u64 = 16;
/// Longest wait for the guest to write its data.
const FILL_WAIT: Duration = Duration::from_secs(3600);
/// Where the moves put the file (directory on each store).
const DIR: &str = "bench-storage";

/// The store benchmark's figures (`store-bench`'s result line).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PlainCopy {
    pub write_mb_per_s: u64,
    pub read_mb_per_s: u64,
    pub copy_mb_per_s: u64,
    pub mib: u64,
}

impl PlainCopy {
    /// From `write_mb_per_s=W read_mb_per_s=R copy_mb_per_s=C ... mib=M`.
    pub fn parse(result: &str) -> Option<Self> {
        let field = |k: &str| -> Option<u64> {
            result
                .split_whitespace()
                .find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
        };
        Some(PlainCopy {
            write_mb_per_s: field("write_mb_per_s")?,
            read_mb_per_s: field("read_mb_per_s")?,
            copy_mb_per_s: field("copy_mb_per_s")?,
            mib: field("mib")?,
        })
    }
}

/// What one move measured (before the comparisons).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Move {
    pub scenario: String,
    pub from: String,
    pub to: String,
    /// `completed`, or the job's end state and error.
    pub result: String,
    /// Bytes the job copied (the source's allocated bytes) and its time.
    pub bytes: u64,
    pub elapsed_ms: u64,
    /// Host-side allocated bytes of the source and the destination files.
    pub source_allocated: u64,
    pub dest_allocated: u64,
    /// `disk-verify` rounds the guest completed while the move ran, and
    /// whether it reported a failure.
    pub guest_rounds: u64,
    pub guest_failed: bool,
    /// Where the node says the copy's time went (its `storage copy:`
    /// line for the job; empty when it printed none).
    pub copy_report: String,
}

/// One scenario's line (`--json`: one object).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Figures {
    pub scenario: String,
    pub result: String,
    pub from: String,
    pub to: String,
    pub copied_mib: u64,
    pub elapsed_ms: u64,
    pub move_mb_per_s: u64,
    /// The plain copy the move is held against: the mean of the two
    /// measured right before and right after it (both below).
    pub plain_copy_mb_per_s: u64,
    pub plain_copy_before_mb_per_s: u64,
    pub plain_copy_after_mb_per_s: u64,
    pub ratio_to_plain_copy: f64,
    pub qemu_img_convert_mb_per_s: u64,
    pub ratio_to_qemu_img: f64,
    pub source_allocated_bytes: u64,
    pub dest_allocated_bytes: u64,
    /// (destination - source) / source, in percent.
    pub allocated_diff_pct: f64,
    pub guest_rounds_during_move: u64,
    pub guest_failed: bool,
    /// Goals met: >= 0.8 x the plain copy, allocated within 1 %.
    pub rate_goal_met: bool,
    pub allocated_goal_met: bool,
    /// The node's account of the copy: steps and the time inside them,
    /// chunks, zero chunks not written, read/write/flush times.
    pub copy_report: String,
}

fn mb_per_s(bytes: u64, ms: u64) -> u64 {
    bytes / 1000 / ms.max(1)
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        (a as f64 / b as f64 * 100.0).round() / 100.0
    }
}

/// The figures of move `m` against the plain copy and `qemu-img convert`
/// (MB/s) of the same run.
pub fn figures(m: &Move, plain: &PlainCopy, qemu_img_mb_per_s: u64) -> Figures {
    let rate = mb_per_s(m.bytes, m.elapsed_ms);
    let diff = if m.source_allocated == 0 {
        0.0
    } else {
        let d = (m.dest_allocated as f64 - m.source_allocated as f64) * 100.0
            / m.source_allocated as f64;
        (d * 100.0).round() / 100.0
    };
    let ratio_plain = ratio(rate, plain.copy_mb_per_s);
    Figures {
        scenario: m.scenario.clone(),
        result: m.result.clone(),
        from: m.from.clone(),
        to: m.to.clone(),
        copied_mib: m.bytes >> 20,
        elapsed_ms: m.elapsed_ms,
        move_mb_per_s: rate,
        plain_copy_mb_per_s: plain.copy_mb_per_s,
        plain_copy_before_mb_per_s: plain.copy_mb_per_s,
        plain_copy_after_mb_per_s: plain.copy_mb_per_s,
        ratio_to_plain_copy: ratio_plain,
        qemu_img_convert_mb_per_s: qemu_img_mb_per_s,
        ratio_to_qemu_img: ratio(rate, qemu_img_mb_per_s),
        source_allocated_bytes: m.source_allocated,
        dest_allocated_bytes: m.dest_allocated,
        allocated_diff_pct: diff,
        guest_rounds_during_move: m.guest_rounds,
        guest_failed: m.guest_failed,
        rate_goal_met: ratio_plain >= 0.8,
        allocated_goal_met: diff.abs() <= 1.0,
        copy_report: m.copy_report.clone(),
    }
}

/// One scenario's human-readable line.
pub fn text_line(f: &Figures) -> String {
    format!(
        "{:<7} {:<9} {} -> {}: {} MiB in {} ms = {} MB/s = {:.2} x plain 9P copy ({} MB/s: {} before, {} after), {:.2} x qemu-img convert ({} MB/s)  allocated {} -> {} MiB ({:+.2} %)  guest rounds during the move {}{}{}",
        f.scenario,
        f.result,
        f.from,
        f.to,
        f.copied_mib,
        f.elapsed_ms,
        f.move_mb_per_s,
        f.ratio_to_plain_copy,
        f.plain_copy_mb_per_s,
        f.plain_copy_before_mb_per_s,
        f.plain_copy_after_mb_per_s,
        f.ratio_to_qemu_img,
        f.qemu_img_convert_mb_per_s,
        f.source_allocated_bytes >> 20,
        f.dest_allocated_bytes >> 20,
        f.allocated_diff_pct,
        f.guest_rounds_during_move,
        if f.guest_failed { "  GUEST FAILED" } else { "" },
        match (f.rate_goal_met, f.allocated_goal_met) {
            (true, true) => "  (goals met)",
            (false, true) => "  (rate under the 0.8 x goal)",
            (true, false) => "  (allocated off by more than 1 %)",
            (false, false) => "  (rate and allocation goals missed)",
        }
    )
}

/// The node's `storage copy:` line for job `job` of VM `vm` in `serial`
/// (what follows the prefix, without the job suffix).
pub fn copy_report(serial: &str, vm: &str, job: u64) -> String {
    let prefix = format!("vmm-service: VM {vm}: storage copy: ");
    let suffix = format!(" (job {job})");
    serial
        .lines()
        .filter_map(|l| {
            crate::markers::clean_line(l)
                .strip_prefix(&prefix)?
                .strip_suffix(&suffix)
                .map(str::to_string)
        })
        .next_back()
        .unwrap_or_default()
}

/// `disk-verify`'s last ok round of VM `vm` in `serial`, and whether it
/// reported a failure.
pub fn guest_rounds(serial: &str, vm: &str) -> (u64, bool) {
    let tag = format!("[{vm}] disk-verify: ");
    let mut last = 0;
    let mut failed = false;
    for l in serial.lines().filter_map(|l| {
        crate::markers::clean_line(l)
            .strip_prefix(&tag)
            .map(str::to_string)
    }) {
        if let Some(n) = l
            .strip_prefix("round ")
            .and_then(|r| r.strip_suffix(" ok"))
            .and_then(|n| n.parse().ok())
        {
            last = n;
        }
        failed |= l.starts_with("FAILED");
    }
    (last, failed)
}

fn client(dir: &Path, node: &str) -> Result<Client, String> {
    let (addr, key) = cluster::resolve_target(dir.to_str(), Some(node), None, None)?;
    Client::connect(
        &addr,
        &ClusterKey::from_hex(&key).map_err(|e| e.to_string())?,
    )
}

/// The host file behind `STORE:path` on node a (`local` is the node's
/// own directory).
fn host_path(dir: &Path, location: &str) -> Result<PathBuf, String> {
    let (store, path) = location
        .split_once(':')
        .ok_or_else(|| format!("not a store location: {location}"))?;
    let root = dir.join("stores").join(match store {
        "local" => "a",
        other => other,
    });
    Ok(root.join(path))
}

fn allocated(path: &Path) -> Result<u64, String> {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn serial(dir: &Path) -> String {
    std::fs::read(dir.join("node-a.log"))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn location(c: &mut Client) -> Result<String, String> {
    match c.call_ok(Request::VmDiskList { name: VM.into() })? {
        Body::Disks { disks, .. } => disks
            .first()
            .map(|d| d.location.clone())
            .ok_or_else(|| format!("VM {VM} has no disk")),
        other => Err(format!("unexpected reply to vm-disk-list: {other:?}")),
    }
}

fn job(reply: Body, what: &str) -> Result<JobInfo, String> {
    match reply {
        Body::Job(j) => Ok(j),
        other => Err(format!("unexpected reply to {what}: {other:?}")),
    }
}

/// Move the VM's disk to `to` (keeping the source) and measure it. With
/// `stop_after` the VM is stopped as soon as the job is seen completed,
/// before the files are measured: after the switch the guest writes to the
/// destination alone, and what it wrote there in the meantime (up to one
/// job poll, 250 ms, and the stop) counts as destination allocation.
fn measure_move(
    dir: &Path,
    c: &mut Client,
    scenario: &str,
    to: &str,
    quiet: bool,
    stop_after: bool,
) -> Result<Move, String> {
    let from = location(c)?;
    let (rounds_before, _) = guest_rounds(&serial(dir), VM);
    let j = job(
        c.call_ok(Request::VmMoveStorage {
            name: VM.into(),
            to: Some(to.into()),
            vhd: Vec::new(),
            config: None,
            snapshots: None,
            keep_source: Some(true),
            bandwidth_mib_s: None,
        })?,
        "vm-move-storage",
    )?;
    if !quiet {
        println!(
            "bench storage: {scenario}: moving {VM}'s disk {from} -> {to}, job {}",
            j.id
        );
    }
    let j = hvctl::follow(c, j.id, true)?;
    if stop_after {
        c.call_ok(Request::VmStop { name: VM.into() })?;
    }
    let log = serial(dir);
    let (rounds_after, failed) = guest_rounds(&log, VM);
    let dest = location(c)?;
    let result = match j.state {
        JobState::Completed => "completed".to_string(),
        s => format!("{s:?}: {}", j.error.clone().unwrap_or_default()).to_lowercase(),
    };
    Ok(Move {
        scenario: scenario.into(),
        from: from.clone(),
        to: dest.clone(),
        result,
        bytes: j.bytes_total,
        elapsed_ms: j.elapsed_ms,
        source_allocated: allocated(&host_path(dir, &from)?)?,
        dest_allocated: allocated(&host_path(dir, &dest)?).unwrap_or(0),
        guest_rounds: rounds_after.saturating_sub(rounds_before),
        guest_failed: failed,
        copy_report: copy_report(&log, VM, j.id),
    })
}

/// `qemu-img convert` of `src` to a new dynamic VHDX: MB/s of `bytes`.
fn qemu_img_convert(src: &Path, bytes: u64) -> Result<u64, String> {
    let dst = src.with_extension("qemu-img.vhdx");
    let _ = std::fs::remove_file(&dst);
    let start = Instant::now();
    let out = std::process::Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "vhdx",
            "-O",
            "vhdx",
            "-o",
            "subformat=dynamic",
        ])
        .arg(src)
        .arg(&dst)
        .output()
        .map_err(|e| format!("qemu-img: {e}"))?;
    let ms = start.elapsed().as_millis() as u64;
    let _ = std::fs::remove_file(&dst);
    if !out.status.success() {
        return Err(format!(
            "qemu-img convert: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(mb_per_s(bytes, ms))
}

/// The node's store benchmark of `mib` MiB on `store`.
fn store_bench(c: &mut Client, store: &str, mib: u64) -> Result<PlainCopy, String> {
    let j = job(
        c.call_ok(Request::StoreBench {
            store: store.into(),
            mib,
            keep: false,
        })?,
        "store-bench",
    )?;
    let j = hvctl::follow(c, j.id, true)?;
    let result = j.result.clone().unwrap_or_default();
    PlainCopy::parse(&result).ok_or_else(|| {
        format!(
            "store-bench ended {:?} without figures: {result} {}",
            j.state,
            j.error.unwrap_or_default()
        )
    })
}

/// `bench storage`: on the running cluster, or on one booted for the run.
pub fn run(state_dir_arg: Option<&str>, json: bool, build: bool) -> Result<u8, String> {
    cluster::on_cluster(state_dir_arg, build, 1, |dir| {
        let result = run_on(dir, json);
        if let Ok(mut c) = client(dir, "a") {
            let _ = c.call(Request::VmStop { name: VM.into() });
            let _ = c.call(Request::VmDelete { name: VM.into() });
        }
        for store in ["a", "shared"] {
            let _ = std::fs::remove_dir_all(dir.join("stores").join(store).join(DIR));
            let _ = std::fs::remove_dir_all(dir.join("stores").join(store).join("vms").join(VM));
        }
        result
    })
}

fn run_on(dir: &Path, json: bool) -> Result<u8, String> {
    let mut c = client(dir, "a")?;
    // A leftover of an interrupted run.
    let _ = c.call(Request::VmStop { name: VM.into() });
    let _ = c.call(Request::VmDelete { name: VM.into() });
    c.call_ok(Request::VmCreate {
        name: VM.into(),
        memory_mib: VM_MIB,
        guest: Some("disk-verify".into()),
        linux: None,
    })?;
    c.call_ok(Request::VmDiskCreate {
        name: VM.into(),
        size_mib: DISK_MIB,
        store: Some("local".into()),
        fixed: None,
    })?;
    c.call_ok(Request::VmStart { name: VM.into() })?;
    let rounds = DATA_MIB / SPAN_MIB;
    if !json {
        println!("bench storage: {VM} writes {DATA_MIB} MiB of its {DISK_MIB} MiB disk ({rounds} rounds of disk-verify)");
    }
    let start = Instant::now();
    let mut shown = 0;
    loop {
        let (done, failed) = guest_rounds(&serial(dir), VM);
        if failed {
            return Err(format!("{VM}: disk-verify failed while writing its data"));
        }
        if done >= rounds {
            break;
        }
        if start.elapsed() > FILL_WAIT {
            return Err(format!(
                "{VM} wrote only {done} of {rounds} rounds in {FILL_WAIT:?}"
            ));
        }
        if !json && done >= shown + 8 {
            shown = done;
            println!(
                "  round {done} of {rounds} ({} s)",
                start.elapsed().as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // The yardstick, a plain copy of a file as large as the data, on the
    // same store, is measured right before and right after each move:
    // on a shared machine the node's speed drifts by 2-3x within minutes,
    // so a move is held against the mean of the two around it.
    let mib = DATA_MIB + 32;
    let plain_0 = store_bench(&mut c, "local", mib)?;
    let writes = measure_move(dir, &mut c, "writes", &format!("shared:{DIR}"), json, true)?;
    let plain_1 = store_bench(&mut c, "local", mib)?;
    let idle = measure_move(dir, &mut c, "idle", &format!("local:{DIR}"), json, false)?;
    let plain_2 = store_bench(&mut c, "local", mib)?;
    let around = |a: &PlainCopy, b: &PlainCopy| PlainCopy {
        write_mb_per_s: (a.write_mb_per_s + b.write_mb_per_s) / 2,
        read_mb_per_s: (a.read_mb_per_s + b.read_mb_per_s) / 2,
        copy_mb_per_s: (a.copy_mb_per_s + b.copy_mb_per_s) / 2,
        mib: a.mib,
    };
    let plain = [around(&plain_0, &plain_1), around(&plain_1, &plain_2)];
    // The idle move's kept source: closed cleanly at the switch (the
    // destination is still open, its log in use).
    let qemu = qemu_img_convert(&host_path(dir, &idle.from)?, idle.bytes)?;
    let mut failed = 0;
    if !json {
        for (when, p) in [
            ("before the moves", &plain_0),
            ("between them", &plain_1),
            ("after them", &plain_2),
        ] {
            println!(
                "plain 9P copy on the node {when} (store-bench, {} MiB): write {} MB/s, read {} MB/s, copy {} MB/s",
                p.mib, p.write_mb_per_s, p.read_mb_per_s, p.copy_mb_per_s
            );
        }
        println!("qemu-img convert on the host: {qemu} MB/s");
    }
    let runs = [(&plain_0, &plain_1), (&plain_1, &plain_2)];
    for ((m, plain), (before, after)) in [(&writes, &plain[0]), (&idle, &plain[1])]
        .into_iter()
        .zip(runs)
    {
        let mut f = figures(m, plain, qemu);
        f.plain_copy_before_mb_per_s = before.copy_mb_per_s;
        f.plain_copy_after_mb_per_s = after.copy_mb_per_s;
        if f.result != "completed" || f.guest_failed {
            failed += 1;
        }
        if json {
            println!("{}", serde_json::to_string(&f).unwrap_or_default());
        } else {
            println!("{}", text_line(&f));
            if !f.copy_report.is_empty() {
                println!("        copy: {}", f.copy_report);
            }
        }
    }
    Ok(u8::from(failed > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_bench_results_parse() {
        let p = PlainCopy::parse(
            "write_mb_per_s=120 read_mb_per_s=300 copy_mb_per_s=90 vhdx_write_mb_per_s=100 mib=520",
        )
        .unwrap();
        assert_eq!(
            p,
            PlainCopy {
                write_mb_per_s: 120,
                read_mb_per_s: 300,
                copy_mb_per_s: 90,
                mib: 520
            }
        );
        assert_eq!(PlainCopy::parse("write_mb_per_s=1 mib=2"), None);
        assert_eq!(PlainCopy::parse(""), None);
    }

    #[test]
    fn figures_and_their_line() {
        let m = Move {
            scenario: "idle".into(),
            from: "shared:bench-storage/bstore-0.vhdx".into(),
            to: "local:bench-storage/bstore-0.vhdx".into(),
            result: "completed".into(),
            bytes: 520 << 20,
            elapsed_ms: 10_000,
            source_allocated: 1000 << 20,
            dest_allocated: 1005 << 20,
            guest_rounds: 0,
            guest_failed: false,
            copy_report: String::new(),
        };
        let plain = PlainCopy {
            copy_mb_per_s: 60,
            ..PlainCopy::default()
        };
        let f = figures(&m, &plain, 200);
        assert_eq!(f.move_mb_per_s, 54);
        assert_eq!(f.copied_mib, 520);
        assert_eq!(f.ratio_to_plain_copy, 0.9);
        assert_eq!(f.ratio_to_qemu_img, 0.27);
        assert_eq!(f.allocated_diff_pct, 0.5);
        assert!(f.rate_goal_met && f.allocated_goal_met);
        let line = text_line(&f);
        assert!(line.starts_with("idle    completed shared:"), "{line}");
        assert!(
            line.contains("= 54 MB/s = 0.90 x plain 9P copy (60 MB/s: 60 before, 60 after)"),
            "{line}"
        );
        assert!(
            line.contains("allocated 1000 -> 1005 MiB (+0.50 %)"),
            "{line}"
        );
        assert!(line.ends_with("(goals met)"), "{line}");
        let slow = figures(
            &Move {
                elapsed_ms: 20_000,
                ..m
            },
            &plain,
            0,
        );
        assert!(!slow.rate_goal_met);
        assert_eq!(slow.ratio_to_qemu_img, 0.0);
        assert!(text_line(&slow).ends_with("(rate under the 0.8 x goal)"));
        let json = serde_json::to_string(&f).unwrap();
        assert!(json.contains("\"ratio_to_plain_copy\":0.9"), "{json}");
    }

    #[test]
    fn guest_rounds_are_read_from_the_serial_log() {
        let log = "[bstore] disk-verify: 1024 MiB disk, 128 spans of 8 MiB\n\
                   [bstore] disk-verify: round 1 ok\r\n\
                   [other] disk-verify: round 9 ok\n\
                   [bstore] disk-verify: round 2 ok\n";
        assert_eq!(guest_rounds(log, "bstore"), (2, false));
        let bad = format!("{log}[bstore] disk-verify: FAILED round 3: sector 1 byte 2 differs\n");
        assert_eq!(guest_rounds(&bad, "bstore"), (2, true));
        assert_eq!(
            host_path(Path::new("/s"), "local:vms/x/x-0.vhdx").unwrap(),
            Path::new("/s/stores/a/vms/x/x-0.vhdx")
        );
        assert_eq!(
            host_path(Path::new("/s"), "shared:b/x.vhdx").unwrap(),
            Path::new("/s/stores/shared/b/x.vhdx")
        );
        assert!(host_path(Path::new("/s"), "nocolon").is_err());
        let node = "vmm-service: VM bstore: storage copy: 3 steps (40 ms), 2 chunks (job 1)\r\n\
                    vmm-service: VM other: storage copy: 9 steps (job 2)\n\
                    vmm-service: VM bstore: storage copy: 5 steps (60 ms), 4 chunks (job 2)\n";
        assert_eq!(copy_report(node, "bstore", 1), "3 steps (40 ms), 2 chunks");
        assert_eq!(copy_report(node, "bstore", 2), "5 steps (60 ms), 4 chunks");
        assert_eq!(copy_report(node, "bstore", 3), "");
    }
}
