//! `qemu-runner bench modes [--json]`: one VM moved from node a to node b
//! by each of the three ways a VM with a disk moves between nodes (issue
//! 14's benchmark), side by side.
//!
//! One cluster of two nodes (the running one, or one booted for the run).
//! Per mode a fresh VM on node a: 64 MiB of RAM, a 256 MiB dynamic VHDX,
//! guest `disk-beat`, which writes 128 MiB of its disk before its first
//! heartbeat and then prints `heartbeat N` every 10 ms (and reads the data
//! back after the move). Once it beats, it is moved by:
//!
//! | mode | the disk | command |
//! |---|---|---|
//! | `shared-store` | on store `shared` | `vm move VM --to b` (only memory and state move; b opens the same VHDX) |
//! | `shared-nothing` | on a's `local` | `vm move VM --to b --include-storage` (the disk is mirrored to b's `local`) |
//! | `quick` | on a's `local` | `vm move VM --to b --quick` (checkpoint, base copied, the VM saved, differencing disk and state copied) |
//!
//! Per mode: the job's total time (its `elapsed_ms` on node a, the whole
//! job), the downtime as the guest saw it (its heartbeats timed as they
//! arrived in the nodes' serial logs, by `bench migrate`'s tailer: the gap
//! from its last beat on node a to its first on node b) next to the
//! report's `downtime_ms`, the guest's worst stall on node a while the
//! move copied (a shared-nothing or quick move copies the disk on the
//! node's one CPU between the guest's turns), the bytes that crossed the
//! link and where that figure comes from ([`link_bytes`]), and the
//! guest's own check of its data after the move. Then whether the
//! expected order shared-store < shared-nothing < quick in (heartbeat)
//! downtime holds.
//!
//! Every mode runs the real command. A mode the nodes do not support yet
//! (the request has no such flag in this build, or the node refuses it)
//! is a row `not available: <why>`, and the order is checked only when
//! all three were measured.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hvmgmt::proto::{Body, JobInfo, JobState, Outcome, PausePhases, Request};
use serde::Serialize;

use crate::bench_migrate::{
    client, guest_line, move_request, pause_text, remove_vm, start_until_beat, Arrivals,
    MoveWindow, Tailer,
};
use crate::cluster;
use crate::hvctl;

/// The VM: RAM, disk, and what its guest writes before the move.
pub const VM_MIB: u64 = 64;
pub const DISK_MIB: u64 = 256;
pub const WRITTEN_MIB: u64 = 128;
/// The guest that writes [`WRITTEN_MIB`] and then beats.
pub const GUEST: &str = "disk-beat";
/// Longest wait for the first heartbeat (the guest writes 128 MiB first).
const FILL_WAIT: Duration = Duration::from_secs(900);
/// How long the VM beats on node a before it is moved.
const WARM_UP: Duration = Duration::from_secs(2);
/// Longest wait for the guest's check of its data after the move.
const CHECK_WAIT: Duration = Duration::from_secs(300);

/// How a VM moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    SharedStore,
    SharedNothing,
    Quick,
}

/// The modes, in the expected order of their downtime.
pub const MODES: [Mode; 3] = [Mode::SharedStore, Mode::SharedNothing, Mode::Quick];

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::SharedStore => "shared-store",
            Mode::SharedNothing => "shared-nothing",
            Mode::Quick => "quick",
        }
    }
    /// The VM's name (short: the node tags its console lines with it).
    fn vm(self) -> &'static str {
        match self {
            Mode::SharedStore => "bmshared",
            Mode::SharedNothing => "bmnothing",
            Mode::Quick => "bmquick",
        }
    }
    /// Where the VM's disk is created on node a.
    fn store(self) -> &'static str {
        match self {
            Mode::SharedStore => "shared",
            Mode::SharedNothing | Mode::Quick => "local",
        }
    }
    /// The `vm-move` field this mode sets besides a plain move, as hvctl
    /// sends it (`--include-storage`, `--quick`).
    fn flag(self) -> Option<&'static str> {
        match self {
            Mode::SharedStore => None,
            Mode::SharedNothing => Some("include_storage"),
            Mode::Quick => Some("quick"),
        }
    }
    /// The command it stands for.
    pub fn command(self) -> String {
        let flag = match self {
            Mode::SharedStore => "",
            Mode::SharedNothing => " --include-storage",
            Mode::Quick => " --quick",
        };
        format!("hvctl --node a vm move {} --to b{flag}", self.vm())
    }
}

/// The `vm-move` request of `mode`: the plain move with the mode's flag
/// set to true. `Err` when this build's request has no such field (the
/// mode is not built yet: the field would be dropped, and the move would
/// be another mode's).
pub fn mode_request(mode: Mode, vm: &str) -> Result<Request, String> {
    let plain = move_request(vm, false);
    let Some(flag) = mode.flag() else {
        return Ok(plain);
    };
    let mut v = serde_json::to_value(&plain).map_err(|e| e.to_string())?;
    if let Some(o) = v.as_object_mut() {
        o.insert(flag.into(), serde_json::Value::Bool(true));
    }
    let req: Request = serde_json::from_value(v).map_err(|e| e.to_string())?;
    let kept = serde_json::to_value(&req)
        .ok()
        .and_then(|v| v.get(flag).cloned())
        == Some(serde_json::Value::Bool(true));
    if kept {
        Ok(req)
    } else {
        Err(format!(
            "this build's vm-move request has no '{flag}' field ({} is not built yet)",
            mode.command()
        ))
    }
}

/// The job's field with the disk bytes a move copied over the link
/// (`MigrationInfo`, shared-nothing and quick moves; read by name, so
/// that a build without it still runs).
pub const STORAGE_BYTES_FIELD: &str = "storage_bytes_copied";

/// The bytes that crossed the link for a move, from its job on node a,
/// and where the figure comes from: the report's `bytes_sent` (the
/// migration stream: memory and device state), plus the disk bytes the
/// job's migration info counts when it has them.
pub fn link_bytes(job: &JobInfo) -> Option<(u64, String)> {
    let r = job.report.as_deref()?;
    let disk = job
        .migration
        .as_deref()
        .and_then(|m| serde_json::to_value(m).ok())
        .and_then(|m| m.get(STORAGE_BYTES_FIELD)?.as_u64())
        .filter(|&b| b > 0);
    Some(match disk {
        Some(d) => (
            r.bytes_sent.saturating_add(d),
            format!(
                "report.bytes_sent {} (memory and state) + migration.{STORAGE_BYTES_FIELD} {d} (disks)",
                r.bytes_sent
            ),
        ),
        None => (
            r.bytes_sent,
            "report.bytes_sent (the migration stream: memory and state)".into(),
        ),
    })
}

/// One mode's figures (`--json`: one object per mode).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Figures {
    pub mode: String,
    pub command: String,
    /// `completed`, the job's end state, `error` or `not available`.
    pub result: String,
    pub error: Option<String>,
    pub ram_mib: u64,
    pub disk_mib: u64,
    pub written_mib: u64,
    /// The job's wall time on node a.
    pub total_ms: Option<u64>,
    /// The downtime as the guest saw it: the gap between its last
    /// heartbeat on node a and its first on node b ([`switch_gap`]).
    pub heartbeat_gap_ms: Option<u64>,
    /// The guest's worst stall on node a while the move copied (the
    /// largest gap between two beats both from a after the move began).
    pub stall_before_ms: Option<u64>,
    /// The largest gap between any two beats from just before the move
    /// until a few after it (`bench migrate`'s heartbeat gap).
    pub largest_gap_ms: Option<u64>,
    pub report_downtime_ms: Option<u64>,
    /// Where the report's downtime went, µs per phase.
    pub pause_us: Option<PausePhases>,
    pub link_bytes: Option<u64>,
    pub link_bytes_source: Option<String>,
    /// The guest's check of its data after the move (node b's
    /// `disk-beat: ...` line).
    pub guest_check: Option<String>,
    /// Whether shared-store < shared-nothing < quick in heartbeat
    /// downtime (`None`: not all three measured).
    pub order_holds: Option<bool>,
}

impl Figures {
    fn new(mode: Mode) -> Self {
        Self {
            mode: mode.name().into(),
            command: mode.command(),
            ram_mib: VM_MIB,
            disk_mib: DISK_MIB,
            written_mib: WRITTEN_MIB,
            ..Self::default()
        }
    }

    /// Measured (a move ran, whatever its end).
    fn measured(&self) -> bool {
        !matches!(self.result.as_str(), "not available" | "error")
    }
}

/// The gap across the switch-over: from the last heartbeat before
/// `first_on_b` (the first beat node b printed; the ones before it came
/// from node a) to that one. `None` if the guest never beat on b.
pub fn switch_gap(beats: &Arrivals, first_on_b: Option<u64>) -> Option<Duration> {
    let n = first_on_b?;
    let on_b = beats.get(&n)?;
    let (_, on_a) = beats.range(..n).next_back()?;
    Some(on_b.saturating_duration_since(*on_a))
}

/// Whether the heartbeat downtimes rise in the order of [`MODES`]: `None`
/// unless every mode completed with a gap.
pub fn order_holds(rows: &[Figures]) -> Option<bool> {
    let gaps: Option<Vec<u64>> = rows
        .iter()
        .map(|f| f.heartbeat_gap_ms.filter(|_| f.result == "completed"))
        .collect();
    let gaps = gaps.filter(|g| g.len() == MODES.len())?;
    Some(gaps.windows(2).all(|w| w[0] < w[1]))
}

/// The host directories a VM of this bench may have files in.
fn vm_dirs(dir: &Path, vm: &str) -> Vec<PathBuf> {
    ["a", "b", "shared"]
        .iter()
        .map(|s| dir.join("stores").join(s).join("vms").join(vm))
        .collect()
}

/// Remove the VM and its files wherever they are.
fn clean(dir: &Path, vm: &str) {
    remove_vm(dir, vm);
    for d in vm_dirs(dir, vm) {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Move one VM by `mode`; `Err` only for what kept the move from running
/// (the row then says `error`).
fn run_mode(dir: &Path, mode: Mode, quiet: bool) -> Result<Figures, String> {
    let mut f = Figures::new(mode);
    let vm = mode.vm();
    let req = match mode_request(mode, vm) {
        Ok(r) => r,
        Err(e) => {
            f.result = "not available".into();
            f.error = Some(e);
            return Ok(f);
        }
    };
    let state = cluster::load(dir)?;
    let logs: Vec<PathBuf> = state.nodes.iter().take(2).map(|n| n.log.clone()).collect();
    let mut a = client(dir, "a")?;
    clean(dir, vm);
    let tail = Tailer::start(logs.clone(), vm);
    a.call_ok(Request::VmCreate {
        name: vm.into(),
        memory_mib: VM_MIB,
        guest: Some(GUEST.into()),
        linux: None,
    })?;
    a.call_ok(Request::VmDiskCreate {
        name: vm.into(),
        size_mib: DISK_MIB,
        store: Some(mode.store().into()),
        fixed: None,
    })?;
    if !quiet {
        println!(
            "bench modes: {}: VM {vm} ({VM_MIB} MiB, {DISK_MIB} MiB disk on {}) writes {WRITTEN_MIB} MiB",
            mode.name(),
            mode.store()
        );
    }
    start_until_beat(&mut a, &tail, vm, FILL_WAIT)?;
    std::thread::sleep(WARM_UP);
    let window = MoveWindow::open(&tail);
    let job = match a.call(req)? {
        Outcome::Ok(Body::Job(j)) => j,
        Outcome::Error(e) => {
            // The node refused the mode (not supported yet, or not for
            // this VM): no figure.
            f.result = "not available".into();
            f.error = Some(e.to_string());
            return Ok(f);
        }
        Outcome::Ok(other) => return Err(format!("unexpected reply to vm-move: {other:?}")),
    };
    if !quiet {
        println!(
            "bench modes: {}: {} (job {})",
            mode.name(),
            mode.command(),
            job.id
        );
    }
    let job = hvctl::follow(&mut a, job.id, true)?;
    let (largest, stall) = window.close(&tail);
    let gap = switch_gap(&tail.snapshot(), tail.first_on_b()).map(|d| d.as_millis() as u64);
    drop(tail);
    f.result = match job.state {
        JobState::Completed => "completed".into(),
        s => format!("{s:?}").to_lowercase(),
    };
    f.error = job.error.clone();
    f.total_ms = Some(job.elapsed_ms);
    f.heartbeat_gap_ms = gap;
    f.stall_before_ms = stall;
    f.largest_gap_ms = largest;
    f.report_downtime_ms = job.report.as_deref().map(|r| r.downtime_ms);
    f.pause_us = job.report.as_deref().map(|r| r.pause_us);
    if let Some((bytes, source)) = link_bytes(&job) {
        f.link_bytes = Some(bytes);
        f.link_bytes_source = Some(source);
    }
    if job.state == JobState::Completed {
        let b_log = logs.get(1).cloned().unwrap_or_default();
        f.guest_check = guest_line(&b_log, vm, CHECK_WAIT, |l| {
            l.starts_with("disk-beat: ") && !l.ends_with("written")
        })
        .or_else(|| Some("no check seen on node b".into()));
    }
    Ok(f)
}

fn ms(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| format!("{v} ms"))
}

/// The table: a header, a row per mode, the order's verdict.
pub fn table(rows: &[Figures]) -> String {
    let mut out = format!(
        "{:<15} {:>10} {:>22} {:>10} {:>20} {:>14}  {}\n",
        "mode",
        "total",
        "downtime (heartbeats)",
        "(report)",
        "worst stall before",
        "link bytes",
        "guest check"
    );
    for f in rows {
        if !f.measured() {
            out += &format!(
                "{:<15} {}: {}\n",
                f.mode,
                f.result,
                f.error.as_deref().unwrap_or("")
            );
            continue;
        }
        out += &format!(
            "{:<15} {:>10} {:>22} {:>10} {:>20} {:>14}  {}{}\n",
            f.mode,
            ms(f.total_ms),
            ms(f.heartbeat_gap_ms),
            ms(f.report_downtime_ms),
            ms(f.stall_before_ms),
            f.link_bytes.map_or("-".into(), |b| b.to_string()),
            f.guest_check.as_deref().unwrap_or("-"),
            if f.result == "completed" {
                String::new()
            } else {
                format!(
                    "  [{}: {}]",
                    f.result,
                    f.error.as_deref().unwrap_or("no error given")
                )
            }
        );
    }
    for f in rows.iter().filter(|f| f.measured()) {
        if let Some(p) = &f.pause_us {
            out += &format!(
                "{:<15} the report's pause (ms): {}\n",
                f.mode,
                pause_text(p)
            );
        }
    }
    let sources: Vec<String> = rows
        .iter()
        .filter_map(|f| Some(format!("{}: {}", f.mode, f.link_bytes_source.as_deref()?)))
        .collect();
    if !sources.is_empty() {
        out += &format!(
            "link bytes, from the job on node a: {}\n",
            sources.join("; ")
        );
    }
    out += &match order_holds(rows) {
        Some(true) => "expected order shared-store < shared-nothing < quick in downtime: holds".into(),
        Some(false) => {
            "expected order shared-store < shared-nothing < quick in downtime: does NOT hold".into()
        }
        None => "expected order shared-store < shared-nothing < quick in downtime: not checked (not every mode completed)".to_string(),
    };
    out
}

/// `bench modes`: on the running cluster, or on one booted for the run.
/// Prints the table, or with `json` one JSON object per mode.
pub fn run(state_dir_arg: Option<&str>, json: bool, build: bool) -> Result<u8, String> {
    cluster::on_cluster(state_dir_arg, build, 2, |dir| run_on(dir, json))
}

fn run_on(dir: &Path, json: bool) -> Result<u8, String> {
    let mut rows = Vec::new();
    for mode in MODES {
        let f = run_mode(dir, mode, json).unwrap_or_else(|e| Figures {
            result: "error".into(),
            error: Some(e),
            ..Figures::new(mode)
        });
        clean(dir, mode.vm());
        rows.push(f);
    }
    let order = order_holds(&rows);
    for f in &mut rows {
        f.order_holds = order;
    }
    if json {
        for f in &rows {
            println!("{}", serde_json::to_string(f).unwrap_or_default());
        }
    } else {
        println!("{}", table(&rows));
    }
    // A move that ran and failed, or a run that could not measure, fails
    // the bench; a mode not built yet does not.
    let failed = rows
        .iter()
        .any(|f| f.result == "error" || (f.measured() && f.result != "completed"));
    Ok(u8::from(failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(mode: Mode, result: &str, gap: Option<u64>) -> Figures {
        Figures {
            result: result.into(),
            heartbeat_gap_ms: gap,
            total_ms: Some(1000),
            report_downtime_ms: gap.map(|g| g / 2),
            ..Figures::new(mode)
        }
    }

    #[test]
    fn the_switch_gap_spans_the_last_beat_on_a_and_the_first_on_b() {
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Beats 1-3 on a (a stall of 400 ms between 2 and 3), 4-5 on b.
        let beats: Arrivals = [
            (1, at(0)),
            (2, at(10)),
            (3, at(410)),
            (4, at(530)),
            (5, at(540)),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            switch_gap(&beats, Some(4)),
            Some(Duration::from_millis(120))
        );
        assert_eq!(switch_gap(&beats, None), None, "never on b");
        assert_eq!(switch_gap(&beats, Some(1)), None, "no beat on a seen");
        assert_eq!(switch_gap(&beats, Some(9)), None);
    }

    #[test]
    fn the_order_is_checked_only_when_every_mode_completed() {
        let rows = |gaps: [Option<u64>; 3]| -> Vec<Figures> {
            MODES
                .iter()
                .zip(gaps)
                .map(|(m, g)| row(*m, "completed", g))
                .collect()
        };
        assert_eq!(
            order_holds(&rows([Some(50), Some(80), Some(900)])),
            Some(true)
        );
        assert_eq!(
            order_holds(&rows([Some(50), Some(40), Some(900)])),
            Some(false)
        );
        assert_eq!(
            order_holds(&rows([Some(50), Some(50), Some(900)])),
            Some(false)
        );
        assert_eq!(order_holds(&rows([Some(50), None, Some(900)])), None);
        let mut r = rows([Some(50), Some(80), Some(900)]);
        r[2].result = "not available".into();
        assert_eq!(order_holds(&r), None);
        r[2].result = "failed".into();
        assert_eq!(order_holds(&r), None);
    }

    #[test]
    fn the_table_shows_figures_and_unavailable_modes_with_the_nodes_words() {
        let mut rows = vec![
            row(Mode::SharedStore, "completed", Some(120)),
            row(Mode::SharedNothing, "not available", None),
            row(Mode::Quick, "failed", Some(40)),
        ];
        rows[0].link_bytes = Some(70_000_000);
        rows[0].link_bytes_source = Some("report.bytes_sent".into());
        rows[0].guest_check = Some("disk-beat: migration 1: 128 MiB read back ok".into());
        rows[0].pause_us = Some(PausePhases {
            harvest: 1500,
            ..PausePhases::default()
        });
        rows[1].error = Some("unsupported: --include-storage is not built".into());
        rows[2].error = Some("link to b lost".into());
        let t = table(&rows);
        assert!(
            t.contains(
                "shared-nothing  not available: unsupported: --include-storage is not built"
            ),
            "{t}"
        );
        assert!(t.contains("120 ms") && t.contains("70000000"), "{t}");
        assert!(t.contains("[failed: link to b lost]"), "{t}");
        assert!(
            t.contains("shared-store    the report's pause (ms): harvest 1.5, last pages 0.0"),
            "{t}"
        );
        assert!(
            t.contains("link bytes, from the job on node a: shared-store: report.bytes_sent"),
            "{t}"
        );
        assert!(t.ends_with("not checked (not every mode completed)"), "{t}");
        let json = serde_json::to_value(&rows[0]).unwrap();
        for k in [
            "mode",
            "total_ms",
            "heartbeat_gap_ms",
            "report_downtime_ms",
            "link_bytes",
            "link_bytes_source",
            "order_holds",
        ] {
            assert!(json.get(k).is_some(), "{k} missing: {json}");
        }
    }

    #[test]
    fn link_bytes_add_the_disk_bytes_when_the_job_counts_them() {
        let mut job: JobInfo = serde_json::from_value(serde_json::json!({
            "id": 1, "kind": "live-migration", "vm": "v", "state": "completed",
            "percent": 100, "bytes_done": 0, "bytes_total": 0, "elapsed_ms": 10,
            "error": null, "cancellable": false,
            "report": {"passes": 1, "pages_per_pass": [1], "bytes_sent": 1000,
                "zero_pages": 0, "ram_bytes": 4096, "total_ms": 10, "downtime_ms": 1,
                "expected_downtime_ms": 1, "throttle_pct": 0, "result": "completed",
                "error": null, "dirty_tracker": null, "verified": false}
        }))
        .unwrap();
        let (b, from) = link_bytes(&job).unwrap();
        assert_eq!(b, 1000);
        assert!(from.starts_with("report.bytes_sent"), "{from}");
        let mut m = serde_json::json!({
            "direction": "outgoing", "peer": "b", "phase": "completed", "pass": 1,
            "bytes_sent": 1000, "bytes_remaining": 0, "dirty_rate_bytes_per_s": 0,
            "bandwidth_bytes_per_s": 0, "eta_ms": null, "throttle_pct": 0,
            "downtime_limit_ms": 300, "encrypted": false, "verify": false
        });
        job.migration = Some(Box::new(serde_json::from_value(m.clone()).unwrap()));
        assert_eq!(
            link_bytes(&job).unwrap().0,
            1000,
            "no disk field: the stream alone"
        );
        m[STORAGE_BYTES_FIELD] = serde_json::json!(5000);
        if let Ok(info) = serde_json::from_value(m) {
            job.migration = Some(Box::new(info));
            // Only where this build's MigrationInfo has the field.
            if serde_json::to_value(job.migration.as_deref()).unwrap()[STORAGE_BYTES_FIELD] == 5000
            {
                let (b, from) = link_bytes(&job).unwrap();
                assert_eq!(b, 6000);
                assert!(from.contains("storage_bytes_copied 5000"), "{from}");
            }
        }
        job.report = None;
        assert_eq!(link_bytes(&job), None);
    }

    #[test]
    fn a_plain_move_is_the_shared_store_mode_and_flags_survive_only_if_the_request_has_them() {
        assert_eq!(
            mode_request(Mode::SharedStore, "v"),
            Ok(move_request("v", false))
        );
        for mode in [Mode::SharedNothing, Mode::Quick] {
            let flag = mode.flag().unwrap();
            match mode_request(mode, "v") {
                // Built: the request carries the flag.
                Ok(r) => assert_eq!(
                    serde_json::to_value(&r).unwrap()[flag],
                    serde_json::Value::Bool(true)
                ),
                // Not built: never a plain move in its place.
                Err(e) => assert!(e.contains(flag) && e.contains("not built yet"), "{e}"),
            }
        }
    }
}
