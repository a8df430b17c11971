//! `qemu-runner bench migrate [--json]`: live migration between two nodes,
//! measured the way a user of the guest would see it (issue 13 item 4).
//!
//! One cluster of two nodes (the running one, or one booted for the run):
//! first the link itself (`bench link`: raw frames, then one TCP stream,
//! node a to node b), then four scenarios, each a fresh VM on node a moved
//! to node b with `vm-move` at the default downtime limit and no bandwidth
//! cap:
//!
//! | scenario | guest | heartbeat |
//! |---|---|---|
//! | `64mib-idle`, `256mib-idle` | `heartbeat` (prints and sleeps) | about 1 s |
//! | `64mib-busy`, `256mib-busy` | `busy-verify` (rewrites 16 MiB, checks itself after the move) | 10 ms |
//!
//! The moves run without verification mode unless `--verify` (QEMU's own
//! migration, beside it, checks nothing beyond its stream either); each
//! line shows where the pause went (the report's `pause_us`).
//!
//! Per scenario: the job's total time, the report's downtime next to the
//! largest gap between consecutive heartbeats as they arrived in the nodes'
//! serial logs (timed here, by a thread that tails both logs every
//! millisecond, so it is the pause the guest's console showed, plus at
//! most a period of the heartbeat), the guest's worst stall during
//! pre-copy (the largest such gap between beats both printed on node a
//! after the move began), bytes sent per byte of RAM, the
//! pre-copy rate and its ratio to the TCP rate `bench link` measured on
//! the same link in the same run.
//!
//! The pre-copy rate is estimated from the report: bytes sent less the
//! last pass's pages (sent while the VM was paused), over total time less
//! downtime. Zero pages travel as markers, so an idle guest's "rate" is
//! mostly markers and reads low against the link.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hvmgmt::auth::ClusterKey;
use hvmgmt::proto::{Body, JobState, MigrationReport, Outcome, PausePhases, Request, VmMove};
use serde::Serialize;

use crate::cluster;
use crate::hvctl::{self, Client};
use crate::markers;

/// Bytes and raw frames of the link measurement before the scenarios.
const LINK_BYTES: u64 = 64 << 20;
const LINK_FRAMES: u64 = 50_000;
/// How long a VM runs on node a before it is moved (busy: dirties its
/// buffer meanwhile).
const WARM_UP: Duration = Duration::from_secs(2);
/// Longest wait for a VM's first heartbeat, and for the beats after it
/// arrived on node b.
const BEAT_WAIT: Duration = Duration::from_secs(60);
/// Heartbeats counted on node b after the move before the window closes.
const BEATS_AFTER: usize = 3;
/// Give up on one migration after this long (the node's own timeout).
const MOVE_TIMEOUT_S: u64 = 900;
/// How often the tailer reads the serial logs.
const TAIL_EVERY: Duration = Duration::from_millis(1);

/// What a scenario's VM does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// `heartbeat`: a line about once a second, nothing else.
    Idle,
    /// `busy-verify`: rewrites a buffer, a line every 10 ms.
    Busy,
}

impl Workload {
    fn guest(self) -> &'static str {
        match self {
            Workload::Idle => "heartbeat",
            Workload::Busy => "busy-verify",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Workload::Idle => "idle",
            Workload::Busy => "busy",
        }
    }
    fn heartbeat_period_ms(self) -> u64 {
        match self {
            Workload::Idle => 1000,
            Workload::Busy => 10,
        }
    }
}

/// One scenario: guest RAM and workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scenario {
    pub mib: u64,
    pub workload: Workload,
}

/// The scenarios, in the order they run.
pub const SCENARIOS: [Scenario; 4] = [
    Scenario {
        mib: 64,
        workload: Workload::Idle,
    },
    Scenario {
        mib: 256,
        workload: Workload::Idle,
    },
    Scenario {
        mib: 64,
        workload: Workload::Busy,
    },
    Scenario {
        mib: 256,
        workload: Workload::Busy,
    },
];

impl Scenario {
    fn label(&self) -> String {
        format!("{}mib-{}", self.mib, self.workload.name())
    }
    /// The VM's name (short: the node tags its console lines with it).
    fn vm(&self) -> String {
        format!("bm{}{}", self.mib, &self.workload.name()[..1])
    }
}

/// The link figures of the same run (`bench link`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Link {
    pub raw_frames_per_s: u64,
    pub raw_mb_per_s: u64,
    pub tcp_mb_per_s: u64,
}

impl Link {
    /// The figures from `bench link`'s report (its first line).
    pub fn parse(report: &str) -> Option<Self> {
        let field = |k: &str| -> Option<u64> {
            report
                .split_whitespace()
                .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))?
                .parse()
                .ok()
        };
        Some(Self {
            raw_frames_per_s: field("raw_frames_per_s")?,
            raw_mb_per_s: field("raw_frame_mb_per_s")?,
            tcp_mb_per_s: field("tcp_mb_per_s")?,
        })
    }
}

/// One scenario's figures (`--json`: one object per scenario).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Figures {
    pub scenario: String,
    pub ram_mib: u64,
    pub workload: String,
    pub guest: String,
    /// `completed`, or how the migration ended.
    pub result: String,
    pub error: Option<String>,
    pub total_ms: u64,
    pub report_downtime_ms: u64,
    /// Largest gap between consecutive heartbeats from just before the
    /// move until [`BEATS_AFTER`] beats after it; `None` if fewer than two
    /// beats were seen.
    pub heartbeat_gap_ms: Option<u64>,
    /// The guest's worst stall during pre-copy: the largest gap between
    /// consecutive heartbeats that both arrived from node a after the move
    /// began (before the first one from node b); `None` if fewer than two.
    pub precopy_gap_ms: Option<u64>,
    pub heartbeat_period_ms: u64,
    pub passes: u32,
    pub bytes_sent: u64,
    pub ram_bytes: u64,
    pub bytes_per_ram: f64,
    pub precopy_mb_per_s: u64,
    pub link_raw_frames_per_s: u64,
    pub link_raw_mb_per_s: u64,
    pub link_tcp_mb_per_s: u64,
    /// Pre-copy rate / TCP rate of the same link in the same run.
    pub ratio_to_tcp: f64,
    /// Verification mode was on (`--verify`).
    pub verified: bool,
    /// Where the downtime went, µs per phase (the report's `pause_us`).
    pub pause_us: PausePhases,
    /// busy-verify's verdict on node b (`busy-verify: migration 1 ok`).
    pub guest_verdict: Option<String>,
    /// QEMU's own migration of a comparable guest, same run.
    pub qemu: Option<QemuFigures>,
    pub qemu_error: Option<String>,
}

/// The pre-copy rate in MB/s a report implies (see the module doc).
pub fn precopy_mb_per_s(r: &MigrationReport) -> u64 {
    let last_pass = r.pages_per_pass.last().copied().unwrap_or(0) * 4096;
    let bytes = r.bytes_sent.saturating_sub(last_pass);
    let ms = r.total_ms.saturating_sub(r.downtime_ms).max(1);
    bytes / 1000 / ms
}

/// Figures from a report, the heartbeat gap and the link.
pub fn figures(
    s: &Scenario,
    r: &MigrationReport,
    (gap_ms, precopy_gap_ms): (Option<u64>, Option<u64>),
    link: &Link,
    verdict: Option<String>,
) -> Figures {
    let precopy = precopy_mb_per_s(r);
    Figures {
        scenario: s.label(),
        ram_mib: s.mib,
        workload: s.workload.name().into(),
        guest: s.workload.guest().into(),
        result: r.result.clone(),
        error: r.error.clone(),
        total_ms: r.total_ms,
        report_downtime_ms: r.downtime_ms,
        heartbeat_gap_ms: gap_ms,
        precopy_gap_ms,
        heartbeat_period_ms: s.workload.heartbeat_period_ms(),
        passes: r.passes,
        bytes_sent: r.bytes_sent,
        ram_bytes: r.ram_bytes,
        bytes_per_ram: ratio(r.bytes_sent, r.ram_bytes),
        precopy_mb_per_s: precopy,
        link_raw_frames_per_s: link.raw_frames_per_s,
        link_raw_mb_per_s: link.raw_mb_per_s,
        link_tcp_mb_per_s: link.tcp_mb_per_s,
        ratio_to_tcp: ratio(precopy, link.tcp_mb_per_s),
        verified: r.verified,
        pause_us: r.pause_us,
        guest_verdict: verdict,
        qemu: None,
        qemu_error: None,
    }
}

/// `a / b` to two decimals (0 when `b` is 0).
fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        return 0.0;
    }
    (a as f64 / b as f64 * 100.0).round() / 100.0
}

/// Heartbeats as they arrived: number -> arrival (the first if twice).
pub type Arrivals = BTreeMap<u64, Instant>;

/// The largest gap between consecutive heartbeats (by number) whose
/// arrivals are both within `from..=to`.
pub fn largest_gap(beats: &Arrivals, from: Instant, to: Instant) -> Option<Duration> {
    let inside: Vec<Instant> = beats
        .values()
        .copied()
        .filter(|t| *t >= from && *t <= to)
        .collect();
    inside
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
}

/// The largest gap between consecutive heartbeats within `from..=to`
/// among those numbered below `first_on_b` (the first beat node b printed:
/// the ones before it were printed on node a, before the switch-over).
pub fn precopy_gap(
    beats: &Arrivals,
    first_on_b: Option<u64>,
    from: Instant,
    to: Instant,
) -> Option<Duration> {
    let before: Arrivals = beats
        .range(..first_on_b.unwrap_or(u64::MAX))
        .map(|(n, t)| (*n, *t))
        .collect();
    largest_gap(&before, from, to)
}

/// A thread that tails the nodes' serial logs and timestamps one VM's
/// heartbeats as they arrive (`bench modes` uses it too).
pub(crate) struct Tailer {
    beats: Arc<Mutex<Arrivals>>,
    /// The lowest heartbeat number seen in the second log (node b's).
    first_on_b: Arc<Mutex<Option<u64>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tailer {
    /// Heartbeats of VM `vm` on a node's serial log.
    pub(crate) fn start(logs: Vec<PathBuf>, vm: &str) -> Self {
        Self::start_with_prefix(logs, format!("[{vm}] heartbeat "))
    }

    /// Lines `PREFIX N`.
    fn start_with_prefix(logs: Vec<PathBuf>, prefix: String) -> Self {
        let beats = Arc::new(Mutex::new(Arrivals::new()));
        let first_on_b = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, s, on_b) = (beats.clone(), stop.clone(), first_on_b.clone());
        // Per log: the offset read so far and the unfinished line, taken
        // before `start` returns (inside the thread, lines appended right
        // after `start` could be taken for old ones).
        let mut state: Vec<(u64, String)> = logs
            .iter()
            .map(|p| (std::fs::metadata(p).map_or(0, |m| m.len()), String::new()))
            .collect();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for (i, (path, (offset, partial))) in logs.iter().zip(state.iter_mut()).enumerate()
                {
                    let Some(text) = read_from(path, offset) else {
                        continue;
                    };
                    let now = Instant::now();
                    partial.push_str(&text);
                    while let Some(end) = partial.find('\n') {
                        let line: String = partial.drain(..=end).collect();
                        let clean = markers::clean_line(line.trim_end());
                        if let Some(n) = clean
                            .strip_prefix(&prefix)
                            .and_then(|n| n.parse::<u64>().ok())
                        {
                            if let Ok(mut m) = b.lock() {
                                m.entry(n).or_insert(now);
                            }
                            if i == 1 {
                                if let Ok(mut f) = on_b.lock() {
                                    *f = Some(f.map_or(n, |f: u64| f.min(n)));
                                }
                            }
                        }
                    }
                }
                std::thread::sleep(TAIL_EVERY);
            }
        });
        Self {
            beats,
            first_on_b,
            stop,
            thread: Some(thread),
        }
    }

    pub(crate) fn first_on_b(&self) -> Option<u64> {
        self.first_on_b.lock().ok().and_then(|f| *f)
    }

    pub(crate) fn snapshot(&self) -> Arrivals {
        self.beats.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Wait until `enough` holds for the beats seen, at most `wait`.
    pub(crate) fn wait_for(&self, wait: Duration, enough: impl Fn(&Arrivals) -> bool) -> bool {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if enough(&self.snapshot()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        enough(&self.snapshot())
    }
}

impl Drop for Tailer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The bytes appended to `path` since `offset` (advanced), as text.
fn read_from(path: &Path, offset: &mut u64) -> Option<String> {
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    if len <= *offset {
        return None;
    }
    f.seek(SeekFrom::Start(*offset)).ok()?;
    let mut buf = Vec::new();
    f.take(len - *offset).read_to_end(&mut buf).ok()?;
    *offset += buf.len() as u64;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// A node's client.
pub(crate) fn client(dir: &Path, node: &str) -> Result<Client, String> {
    let (addr, key) = cluster::resolve_target(dir.to_str(), Some(node), None, None)?;
    Client::connect(
        &addr,
        &ClusterKey::from_hex(&key).map_err(|e| e.to_string())?,
    )
}

/// Run one scenario on the cluster in `dir`.
fn run_scenario(
    dir: &Path,
    s: &Scenario,
    link: &Link,
    verify: bool,
    quiet: bool,
) -> Result<Figures, String> {
    let state = cluster::load(dir)?;
    let logs: Vec<PathBuf> = state.nodes.iter().take(2).map(|n| n.log.clone()).collect();
    let vm = s.vm();
    let mut a = client(dir, "a")?;
    let tail = Tailer::start(logs.clone(), &vm);
    a.call_ok(Request::VmCreate {
        name: vm.clone(),
        memory_mib: s.mib,
        guest: Some(s.workload.guest().into()),
        linux: None,
    })?;
    start_until_beat(&mut a, &tail, &vm, BEAT_WAIT)?;
    std::thread::sleep(WARM_UP);
    let window = MoveWindow::open(&tail);
    let job = match a.call(move_request(&vm, verify))? {
        Outcome::Ok(Body::Job(j)) => j,
        Outcome::Error(e) => return Err(format!("node a refused to move {vm}: {e}")),
        Outcome::Ok(other) => return Err(format!("unexpected reply to vm-move: {other:?}")),
    };
    if !quiet {
        println!(
            "bench migrate: {}: moving {vm} ({} MiB, {}) from a to b, job {}",
            s.label(),
            s.mib,
            s.workload.guest(),
            job.id
        );
    }
    let job = hvctl::follow(&mut a, job.id, true)?;
    let (gap, precopy_gap) = window.close(&tail);
    let report = job.report.as_deref().cloned().ok_or_else(|| {
        format!(
            "the move of {vm} ended {:?} without a report: {}",
            job.state,
            job.error.clone().unwrap_or_default()
        )
    })?;
    let verdict = if s.workload == Workload::Busy && job.state == JobState::Completed {
        let b_log = logs.get(1).cloned().unwrap_or_default();
        guest_line(&b_log, &vm, BEAT_WAIT, |l| {
            l.starts_with("busy-verify: ") && !l.contains("workload over")
        })
    } else {
        None
    };
    drop(tail);
    remove_vm(dir, &vm);
    Ok(figures(s, &report, (gap, precopy_gap), link, verdict))
}

/// The last line of VM `vm` (without its `[vm] ` tag) in the serial log
/// `log` that `wanted` takes, waiting for one at most `wait`.
pub(crate) fn guest_line(
    log: &Path,
    vm: &str,
    wait: Duration,
    wanted: impl Fn(&str) -> bool,
) -> Option<String> {
    let deadline = Instant::now() + wait;
    let tag = format!("[{vm}] ");
    loop {
        let serial = std::fs::read(log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let said = serial.lines().rev().find_map(|l| {
            markers::clean_line(l)
                .strip_prefix(&tag)
                .filter(|c| wanted(c))
                .map(str::to_string)
        });
        if said.is_some() || Instant::now() > deadline {
            return said;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Start VM `vm` on `a` and wait (at most `wait`) for its first
/// heartbeat.
pub(crate) fn start_until_beat(
    a: &mut Client,
    tail: &Tailer,
    vm: &str,
    wait: Duration,
) -> Result<(), String> {
    a.call_ok(Request::VmStart { name: vm.into() })?;
    if !tail.wait_for(wait, |b| !b.is_empty()) {
        return Err(format!("VM {vm} printed no heartbeat on node a"));
    }
    Ok(())
}

/// `vm-move` of `vm` from a to b at the default downtime limit, no
/// bandwidth cap, verification mode iff `verify`.
pub(crate) fn move_request(vm: &str, verify: bool) -> Request {
    Request::VmMove(VmMove {
        timeout_s: Some(MOVE_TIMEOUT_S),
        verify: Some(verify),
        ..VmMove::to(vm, "b")
    })
}

/// The heartbeats of a move: from just before it starts until
/// [`BEATS_AFTER`] beats after it ended.
pub(crate) struct MoveWindow {
    last_before: u64,
    from: Instant,
}

impl MoveWindow {
    /// Right before the move is asked for.
    pub(crate) fn open(tail: &Tailer) -> Self {
        Self {
            last_before: tail.snapshot().keys().last().copied().unwrap_or(0),
            from: Instant::now(),
        }
    }

    /// After the move ended: wait for the beats after it (a failed move:
    /// they go on on node a); the largest heartbeat gap and the worst
    /// pre-copy stall, ms.
    pub(crate) fn close(&self, tail: &Tailer) -> (Option<u64>, Option<u64>) {
        let after = |b: &Arrivals| b.range(self.last_before + 1..).count() > BEATS_AFTER;
        tail.wait_for(BEAT_WAIT, after);
        let to = Instant::now();
        let beats = tail.snapshot();
        let gap = largest_gap(&beats, self.from, to).map(|d| d.as_millis() as u64);
        let precopy =
            precopy_gap(&beats, tail.first_on_b(), self.from, to).map(|d| d.as_millis() as u64);
        (gap, precopy)
    }
}

/// Stop and delete VM `vm` wherever it is now (b, then a).
pub(crate) fn remove_vm(dir: &Path, vm: &str) {
    for node in ["b", "a"] {
        if let Ok(mut c) = client(dir, node) {
            let _ = c.call(Request::VmStop { name: vm.into() });
            let _ = c.call(Request::VmDelete { name: vm.into() });
        }
    }
}

/// Where the pause went, in ms: `harvest 1.2, last pages 30.0, ...`.
pub fn pause_text(p: &PausePhases) -> String {
    let phases = [
        ("harvest", p.harvest),
        ("last pages", p.last_pages),
        ("verify", p.verify),
        ("state", p.state),
        ("drain", p.drain),
        ("ready", p.ready),
        ("resumed", p.resumed),
    ];
    phases
        .iter()
        .map(|(name, us)| format!("{name} {:.1}", *us as f64 / 1000.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One scenario's human-readable line.
pub fn text_line(f: &Figures) -> String {
    format!(
        "{:<11} {:<9} total {:>6} ms  downtime: report {:>4} ms, heartbeats {} (period {} ms; worst pre-copy stall {})  sent {:.2} x RAM in {} passes  pre-copy {} MB/s = {:.2} x TCP ({} MB/s; raw {} frames/s){}",
        f.scenario,
        f.result,
        f.total_ms,
        f.report_downtime_ms,
        f.heartbeat_gap_ms
            .map_or("?".to_string(), |g| format!("{g} ms")),
        f.heartbeat_period_ms,
        f.precopy_gap_ms
            .map_or("?".to_string(), |g| format!("{g} ms")),
        f.bytes_per_ram,
        f.passes,
        f.precopy_mb_per_s,
        f.ratio_to_tcp,
        f.link_tcp_mb_per_s,
        f.link_raw_frames_per_s,
        f.guest_verdict
            .as_deref()
            .map(|v| format!("  guest: {v}"))
            .unwrap_or_default()
    ) + &format!(
        "\n{:<11} pause (ms{}): {}",
        "",
        if f.verified { ", memory verified" } else { "" },
        pause_text(&f.pause_us)
    ) + &match (&f.qemu, &f.qemu_error) {
        (Some(q), _) => format!(
            "\n{:<11} QEMU 7.2   total {:>6} ms  downtime: QEMU {:>4} ms, heartbeats {}  sent {:.2} x RAM  {:.0} Mbit/s",
            "", q.total_ms,
            q.downtime_ms,
            q.heartbeat_gap_ms.map_or("?".to_string(), |g| format!("{g} ms")),
            q.bytes_per_ram,
            q.mbps
        ),
        (None, Some(e)) => format!("\n{:<11} QEMU 7.2   error: {e}", ""),
        (None, None) => String::new(),
    }
}

/// `bench migrate`: on the running cluster, or on one booted for the run.
/// Prints a line per scenario, or with `json` one JSON object per line.
pub fn run(
    state_dir_arg: Option<&str>,
    json: bool,
    verify: bool,
    build: bool,
) -> Result<u8, String> {
    cluster::on_cluster(state_dir_arg, build, 2, |dir| run_on(dir, json, verify))
}

fn run_on(dir: &Path, json: bool, verify: bool) -> Result<u8, String> {
    let report = cluster::bench_link_quiet(dir, LINK_BYTES, LINK_FRAMES, json)?;
    let link =
        Link::parse(&report).ok_or_else(|| format!("bench link gave no figures: {report}"))?;
    if !json {
        println!("{report}");
    }
    let tsc_hz = host_tsc_hz();
    let mut failed = 0;
    for s in &SCENARIOS {
        match run_scenario(dir, s, &link, verify, json) {
            Ok(mut f) => {
                let compared = tsc_hz
                    .clone()
                    .and_then(|hz| qemu_migrate(s, hz, &dir.join(format!("qemu-{}", s.label()))));
                match compared {
                    Ok(q) => f.qemu = Some(q),
                    Err(e) => f.qemu_error = Some(e),
                }
                if f.result != "completed" {
                    failed += 1;
                }
                if json {
                    println!("{}", serde_json::to_string(&f).unwrap_or_default());
                } else {
                    println!("{}", text_line(&f));
                }
            }
            Err(e) => {
                failed += 1;
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"scenario": s.label(), "result": "error", "error": e})
                    );
                } else {
                    println!("{:<11} error: {e}", s.label());
                }
            }
        }
    }
    Ok(u8::from(failed > 0))
}

// ---------------------------------------------------------------------
// QEMU's own live migration of a comparable guest, for comparison.

/// The comparison guest (`bench_migrate_guest.S`, assembled): 215 bytes.
pub const QEMU_GUEST: [u8; 215] = [
    0x02, 0xb0, 0xad, 0x1b, 0x03, 0x00, 0x01, 0x00, 0xfb, 0x4f, 0x51, 0xe4, 0x00, 0x00, 0x10, 0x00,
    0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x10, 0x00,
    0x01, 0x00, 0x00, 0x00, 0x80, 0xc3, 0xc9, 0x01, 0x00, 0x00, 0x00, 0x00, 0xfa, 0xbc, 0x00, 0x00,
    0x09, 0x00, 0x31, 0xdb, 0xbf, 0x00, 0x00, 0x40, 0x00, 0x0f, 0x31, 0x89, 0xc6, 0x89, 0xd5, 0xb9,
    0x40, 0x00, 0x00, 0x00, 0x80, 0x3d, 0x20, 0x00, 0x10, 0x00, 0x00, 0x74, 0x17, 0xfe, 0x07, 0x81,
    0xc7, 0x00, 0x10, 0x00, 0x00, 0x81, 0xff, 0x00, 0x00, 0x40, 0x01, 0x72, 0x05, 0xbf, 0x00, 0x00,
    0x40, 0x00, 0xe2, 0xe9, 0x0f, 0x31, 0x50, 0x52, 0x29, 0xf0, 0x19, 0xea, 0x3b, 0x15, 0x28, 0x00,
    0x10, 0x00, 0x77, 0x0e, 0x72, 0x08, 0x3b, 0x05, 0x24, 0x00, 0x10, 0x00, 0x73, 0x04, 0x5a, 0x58,
    0xeb, 0xbd, 0x5d, 0x5e, 0x43, 0xb9, 0xcc, 0x00, 0x10, 0x00, 0x8a, 0x01, 0x84, 0xc0, 0x74, 0x08,
    0xe8, 0x24, 0x00, 0x00, 0x00, 0x41, 0xeb, 0xf2, 0x89, 0xd8, 0xb9, 0x0a, 0x00, 0x00, 0x00, 0x6a,
    0x0a, 0x31, 0xd2, 0xf7, 0xf1, 0x80, 0xc2, 0x30, 0x52, 0x85, 0xc0, 0x75, 0xf4, 0x58, 0xe8, 0x06,
    0x00, 0x00, 0x00, 0x3c, 0x0a, 0x75, 0xf6, 0xeb, 0x86, 0x52, 0x50, 0x66, 0xba, 0xfd, 0x03, 0xec,
    0xa8, 0x20, 0x74, 0xfb, 0x58, 0x66, 0xba, 0xf8, 0x03, 0xee, 0x5a, 0xc3, 0x68, 0x65, 0x61, 0x72,
    0x74, 0x62, 0x65, 0x61, 0x74, 0x20, 0x00,
];
/// Offsets of the patched fields in [`QEMU_GUEST`].
const GUEST_BUSY_AT: usize = 32;
const GUEST_PERIOD_AT: usize = 36;
/// The downtime limit both migrations are given (vm-move's default).
pub const DOWNTIME_LIMIT_MS: u64 = 300;

/// The comparison guest for `workload`, its heartbeat every period of
/// `tsc_hz` host TSC ticks.
pub fn qemu_guest(workload: Workload, tsc_hz: u64) -> Vec<u8> {
    let mut g = QEMU_GUEST.to_vec();
    g[GUEST_BUSY_AT] = u8::from(workload == Workload::Busy);
    let period = tsc_hz / 1000 * workload.heartbeat_period_ms();
    g[GUEST_PERIOD_AT..GUEST_PERIOD_AT + 8].copy_from_slice(&period.to_le_bytes());
    g
}

/// The host TSC's rate (QEMU's TCG hands the guest the host's TSC).
fn host_tsc_hz() -> Result<u64, String> {
    #[cfg(target_arch = "x86_64")]
    {
        let start = Instant::now();
        // SAFETY: RDTSC has no memory effects and exists on every x86_64.
        let t0 = unsafe { core::arch::x86_64::_rdtsc() };
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: as above.
        let t1 = unsafe { core::arch::x86_64::_rdtsc() };
        let ns = start.elapsed().as_nanos().max(1);
        Ok((u128::from(t1.wrapping_sub(t0)) * 1_000_000_000 / ns) as u64)
    }
    #[cfg(not(target_arch = "x86_64"))]
    Err("the QEMU comparison needs an x86_64 host (its guest reads the host TSC)".into())
}

/// QEMU's figures for one scenario (`query-migrate` once completed).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct QemuFigures {
    pub status: String,
    pub total_ms: u64,
    pub downtime_ms: u64,
    pub setup_ms: u64,
    pub transferred_bytes: u64,
    pub ram_bytes: u64,
    pub bytes_per_ram: f64,
    pub mbps: f64,
    pub heartbeat_gap_ms: Option<u64>,
}

impl QemuFigures {
    /// From a `query-migrate` reply's `return` object.
    pub fn from_query(v: &serde_json::Value) -> Self {
        let n = |p: &str| {
            v.pointer(p)
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
        };
        let transferred = n("/ram/transferred");
        let total = n("/ram/total");
        Self {
            status: v["status"].as_str().unwrap_or("?").to_string(),
            total_ms: n("/total-time"),
            downtime_ms: n("/downtime"),
            setup_ms: n("/setup-time"),
            transferred_bytes: transferred,
            ram_bytes: total,
            bytes_per_ram: ratio(transferred, total),
            mbps: v
                .pointer("/ram/mbps")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(0.0),
            heartbeat_gap_ms: None,
        }
    }
}

/// A QMP connection (QEMU's JSON monitor, docs/interop/qmp-spec).
struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Self, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("QMP {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut q = Self {
            reader: std::io::BufReader::new(stream),
            writer,
        };
        q.line()?; // the greeting
        q.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<serde_json::Value, String> {
        use std::io::BufRead;
        let mut l = String::new();
        self.reader
            .read_line(&mut l)
            .map_err(|e| format!("QMP: {e}"))?;
        if l.is_empty() {
            return Err("QMP: QEMU closed the monitor".into());
        }
        serde_json::from_str(&l).map_err(|e| format!("QMP: {e}: {l}"))
    }

    /// Run a command; its `return` value (events on the way are skipped).
    fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        use std::io::Write;
        let req = serde_json::json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{req}").map_err(|e| format!("QMP: {e}"))?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {command}: {e}"));
            }
        }
    }
}

/// A QEMU process, killed when dropped.
struct QemuProcess(std::process::Child);

impl Drop for QemuProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_qemu(
    work: &Path,
    name: &str,
    mib: u64,
    incoming: Option<u16>,
) -> Result<QemuProcess, String> {
    let mut cmd = std::process::Command::new(crate::qemu::QEMU);
    cmd.current_dir(work).args([
        "-accel",
        "tcg",
        "-m",
        &format!("{mib}M"),
        "-kernel",
        "guest.bin",
        "-serial",
        &format!("file:{name}.log"),
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-qmp",
        &format!("unix:{name}.qmp,server=on,wait=off"),
    ]);
    if let Some(port) = incoming {
        cmd.args(["-incoming", &format!("tcp:127.0.0.1:{port}")]);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    cmd.spawn()
        .map(QemuProcess)
        .map_err(|e| format!("{}: {e}", crate::qemu::QEMU))
}

/// Migrate the comparison guest of `s` between two QEMU processes on this
/// machine with QEMU's own live migration (downtime limit
/// [`DOWNTIME_LIMIT_MS`], no bandwidth cap: vm-move's defaults).
pub fn qemu_migrate(s: &Scenario, tsc_hz: u64, work: &Path) -> Result<QemuFigures, String> {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work).map_err(|e| format!("{}: {e}", work.display()))?;
    std::fs::write(work.join("guest.bin"), qemu_guest(s.workload, tsc_hz))
        .map_err(|e| e.to_string())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let _dst = spawn_qemu(work, "dst", s.mib, Some(port))?;
    let _src = spawn_qemu(work, "src", s.mib, None)?;
    let tail = Tailer::start_with_prefix(
        vec![work.join("src.log"), work.join("dst.log")],
        "heartbeat ".into(),
    );
    if !tail.wait_for(BEAT_WAIT, |b| !b.is_empty()) {
        return Err("the QEMU guest printed no heartbeat".into());
    }
    std::thread::sleep(WARM_UP);
    let mut qmp = Qmp::connect(&work.join("src.qmp"))?;
    qmp.execute(
        "migrate-set-parameters",
        serde_json::json!({"downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": 1u64 << 40}),
    )?;
    let last_before = tail.snapshot().keys().last().copied().unwrap_or(0);
    let from = Instant::now();
    qmp.execute(
        "migrate",
        serde_json::json!({"uri": format!("tcp:127.0.0.1:{port}")}),
    )?;
    let deadline = Instant::now() + Duration::from_secs(MOVE_TIMEOUT_S);
    let status = loop {
        let q = qmp.execute("query-migrate", serde_json::json!({}))?;
        let st = q["status"].as_str().unwrap_or("").to_string();
        if matches!(st.as_str(), "completed" | "failed" | "cancelled") {
            break q;
        }
        if Instant::now() > deadline {
            let _ = qmp.execute("migrate_cancel", serde_json::json!({}));
            return Err(format!(
                "QEMU's migration did not end within {MOVE_TIMEOUT_S} s"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut f = QemuFigures::from_query(&status);
    tail.wait_for(BEAT_WAIT, |b| {
        b.range(last_before + 1..).count() > BEATS_AFTER
    });
    f.heartbeat_gap_ms =
        largest_gap(&tail.snapshot(), from, Instant::now()).map(|d| d.as_millis() as u64);
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> MigrationReport {
        MigrationReport {
            passes: 3,
            pages_per_pass: vec![16384, 2000, 100],
            bytes_sent: 80_000_000,
            zero_pages: 0,
            ram_bytes: 64 << 20,
            total_ms: 1010,
            downtime_ms: 10,
            expected_downtime_ms: 8,
            throttle_pct: 0,
            result: "completed".into(),
            error: None,
            dirty_tracker: Some("write-protect".into()),
            verified: true,
            pause_us: PausePhases {
                harvest: 100,
                last_pages: 2500,
                verify: 0,
                state: 50,
                drain: 4000,
                ready: 3000,
                resumed: 350,
            },
        }
    }

    #[test]
    fn link_figures_come_from_the_bench_link_report() {
        let r = "bench link: tcp_mb_per_s=142 raw_frame_mb_per_s=196 raw_frames_per_s=130051 tcp_pct_of_raw=72 (tcp 1 bytes)\nbench link: node b received";
        assert_eq!(
            Link::parse(r),
            Some(Link {
                raw_frames_per_s: 130051,
                raw_mb_per_s: 196,
                tcp_mb_per_s: 142
            })
        );
        assert_eq!(Link::parse("bench link: tcp_mb_per_s=?"), None);
    }

    #[test]
    fn figures_from_a_report() {
        let link = Link {
            raw_frames_per_s: 100_000,
            raw_mb_per_s: 150,
            tcp_mb_per_s: 100,
        };
        let s = SCENARIOS[2];
        let f = figures(
            &s,
            &report(),
            (Some(17), Some(12)),
            &link,
            Some("ok".into()),
        );
        // (80,000,000 - 100 pages) bytes over 1000 ms of pre-copy.
        assert_eq!(f.precopy_mb_per_s, 79);
        assert_eq!(f.ratio_to_tcp, 0.79);
        assert_eq!(f.bytes_per_ram, 1.19);
        assert_eq!(
            (f.scenario.as_str(), f.guest.as_str()),
            ("64mib-busy", "busy-verify")
        );
        assert_eq!((f.heartbeat_gap_ms, f.heartbeat_period_ms), (Some(17), 10));
        assert_eq!(f.precopy_gap_ms, Some(12));
        assert!(text_line(&f).contains("worst pre-copy stall 12 ms"));
        let json = serde_json::to_value(&f).unwrap();
        for k in [
            "ratio_to_tcp",
            "heartbeat_gap_ms",
            "precopy_gap_ms",
            "report_downtime_ms",
            "total_ms",
            "bytes_per_ram",
            "precopy_mb_per_s",
            "link_raw_frames_per_s",
            "link_tcp_mb_per_s",
        ] {
            assert!(json.get(k).is_some(), "{k} missing: {json}");
        }
        assert!(text_line(&f).contains("pre-copy 79 MB/s = 0.79 x TCP"));
        // Nothing measured: no division by zero.
        let zero = MigrationReport {
            total_ms: 0,
            bytes_sent: 0,
            ram_bytes: 0,
            ..report()
        };
        let f = figures(&s, &zero, (None, None), &Link::default(), None);
        assert_eq!(
            (f.precopy_mb_per_s, f.ratio_to_tcp, f.bytes_per_ram),
            (0, 0.0, 0.0)
        );
    }

    #[test]
    fn the_largest_gap_counts_only_beats_inside_the_window() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let beats: Arrivals = [
            (1, at(0)),
            (2, at(10)),
            (3, at(20)),
            (4, at(95)),
            (5, at(105)),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            largest_gap(&beats, at(0), at(200)),
            Some(Duration::from_millis(75))
        );
        // The pause before the window does not count.
        assert_eq!(
            largest_gap(&beats, at(95), at(200)),
            Some(Duration::from_millis(10))
        );
        assert_eq!(largest_gap(&beats, at(96), at(200)), None);
        // Before the switch-over: the beats numbered below node b's first
        // (here 5), so the gap across the pause (4 -> 5) is not one.
        assert_eq!(
            precopy_gap(&beats, Some(5), at(0), at(200)),
            Some(Duration::from_millis(75))
        );
        assert_eq!(
            precopy_gap(&beats, Some(4), at(0), at(200)),
            Some(Duration::from_millis(10))
        );
        assert_eq!(precopy_gap(&beats, Some(2), at(0), at(200)), None);
    }

    #[test]
    fn the_tailer_timestamps_heartbeats_as_they_are_appended() {
        let dir = std::env::temp_dir().join(format!("hvm-bench-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (la, lb) = (dir.join("a.log"), dir.join("b.log"));
        std::fs::write(&la, "[vm] heartbeat 1\n").unwrap();
        std::fs::write(&lb, "").unwrap();
        let t = Tailer::start(vec![la.clone(), lb.clone()], "vm");
        let append = |p: &Path, s: &str| {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(p).unwrap();
            f.write_all(s.as_bytes()).unwrap();
        };
        append(&la, "[vm] heartbeat 2\n[other] heartbeat 9\n[vm] heart");
        // The rest of line 3 comes 30 ms after the tailer saw line 2 (a
        // fixed sleep after the append alone failed on a loaded machine:
        // the tailer's thread saw line 2 late, then both lines at once).
        assert!(t.wait_for(Duration::from_secs(5), |b| b.contains_key(&2)));
        std::thread::sleep(Duration::from_millis(30));
        append(&la, "beat 3\n");
        append(&lb, "[vm] heartbeat 4\r\n");
        assert!(t.wait_for(Duration::from_secs(5), |b| b.len() == 3));
        let b = t.snapshot();
        // Lines already in the log before the tailer started are not
        // timed; the split line counts when its end arrived.
        assert_eq!(b.keys().copied().collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(t.first_on_b(), Some(4), "beat 4 came from the second log");
        assert!(b[&3] - b[&2] >= Duration::from_millis(25));
        drop(t);
        std::fs::remove_dir_all(&dir).ok();
    }
    #[test]
    fn the_qemu_guest_is_a_multiboot_kernel_with_patched_fields() {
        let g = qemu_guest(Workload::Busy, 2_000_000_000);
        let word = |at: usize| u32::from_le_bytes(g[at..at + 4].try_into().unwrap());
        // Multiboot1: magic, flags (a.out kludge), checksum sums to 0.
        assert_eq!(word(0), 0x1BAD_B002);
        assert_eq!(word(4), 0x0001_0003);
        assert_eq!(word(0).wrapping_add(word(4)).wrapping_add(word(8)), 0);
        // Loaded and entered at 1 MiB + the entry's offset.
        assert_eq!((word(12), word(16)), (0x10_0000, 0x10_0000));
        assert!(word(28) > 0x10_0000 && word(28) < 0x10_0000 + g.len() as u32);
        assert_eq!(g[GUEST_BUSY_AT], 1);
        let period = |g: &[u8]| u64::from_le_bytes(g[36..44].try_into().unwrap());
        assert_eq!(period(&g), 20_000_000, "10 ms of a 2 GHz TSC");
        let idle = qemu_guest(Workload::Idle, 2_000_000_000);
        assert_eq!((idle[GUEST_BUSY_AT], period(&idle)), (0, 2_000_000_000));
        assert!(g.ends_with(b"heartbeat \0"));
    }

    #[test]
    fn the_embedded_qemu_guest_is_its_source_assembled() {
        // Only where binutils is installed (the bytes are what it made).
        let dir = std::env::temp_dir().join(format!("hvm-bench-guest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/bench_migrate_guest.S");
        let ok = |c: &mut std::process::Command| c.status().is_ok_and(|s| s.success());
        if !ok(std::process::Command::new("as")
            .arg("--32")
            .arg("-o")
            .arg(dir.join("g.o"))
            .arg(&src))
        {
            eprintln!("no `as` for 32-bit x86: not compared");
            return;
        }
        assert!(ok(std::process::Command::new("ld")
            .args([
                "-m",
                "elf_i386",
                "-Ttext=0x100000",
                "--oformat",
                "binary",
                "-o"
            ])
            .arg(dir.join("g.bin"))
            .arg(dir.join("g.o"))));
        assert_eq!(std::fs::read(dir.join("g.bin")).unwrap(), QEMU_GUEST);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn qemu_figures_from_query_migrate() {
        let v = serde_json::json!({
            "status": "completed", "total-time": 1234, "downtime": 45, "setup-time": 3,
            "ram": {"transferred": 70_000_000u64, "total": 67_108_864u64, "mbps": 812.5}
        });
        let q = QemuFigures::from_query(&v);
        assert_eq!(
            (q.status.as_str(), q.total_ms, q.downtime_ms, q.setup_ms),
            ("completed", 1234, 45, 3)
        );
        assert_eq!(
            (q.transferred_bytes, q.bytes_per_ram, q.mbps),
            (70_000_000, 1.04, 812.5)
        );
        assert_eq!(QemuFigures::from_query(&serde_json::json!({})).status, "?");
    }
}
