//! `fuzz` (and the `fuzz` step of `test`): every cargo-fuzz target of the
//! workspace, coverage-guided, for a bounded time each.
//!
//! Targets are discovered, never listed: every `CRATE/fuzz/fuzz_targets/
//! NAME.rs` below the workspace root (CRATE may be nested, e.g.
//! `hypervisor/core`). For each fuzz crate the runner
//! 1. builds all its targets with `cargo +NIGHTLY fuzz build` into
//!    `target/fuzz/` (the pinned nightly and cargo-fuzz come from `setup`);
//! 2. per target, replays every file of `CRATE/fuzz/regressions/NAME/`
//!    (each must run without a crash);
//! 3. runs libFuzzer for the target's share of time on a scratch corpus
//!    under `target/fuzz-corpus/` seeded from `CRATE/fuzz/seeds/NAME/`, so
//!    the repository is only ever read.
//!
//! A crash (or a hang past [`INPUT_TIMEOUT_SECS`], or running out of
//! memory) fails the step: the input is printed in hex with its path and
//! copied to `CRATE/fuzz/regressions/NAME/` under libFuzzer's name
//! (`crash-<sha1>`), where it becomes a regression input every later run
//! replays first. libFuzzer's own output goes to a log file per target;
//! its last lines are printed when a target fails.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::setup::rustup::FUZZ_NIGHTLY;

/// One input may take this long before libFuzzer calls it a hang.
pub const INPUT_TIMEOUT_SECS: u64 = 25;
/// Memory one fuzz process may use before libFuzzer calls it out of memory.
pub const RSS_LIMIT_MB: u64 = 2048;
/// Fuzzing time the `test` step spends in total (builds come on top): the
/// per-target time shrinks when many targets share it.
pub const TEST_STEP_FUZZ_BUDGET: Duration = Duration::from_secs(360);
/// The least a target gets, however many there are.
pub const MIN_TARGET_TIME: Duration = Duration::from_secs(15);
/// Bytes of a crashing input printed in hex (the whole file is kept).
pub const HEX_DUMP_MAX: usize = 4096;

/// One fuzz target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The crate's path relative to the workspace root (`migration`,
    /// `hypervisor/core`).
    pub krate: String,
    /// The cargo-fuzz project directory (`ROOT/CRATE/fuzz`).
    pub fuzz_dir: PathBuf,
    /// The target's name (its file stem in `fuzz_targets/`).
    pub name: String,
}

impl Target {
    /// `CRATE/NAME`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.krate, self.name)
    }

    pub fn seeds(&self) -> PathBuf {
        self.fuzz_dir.join("seeds").join(&self.name)
    }

    pub fn regressions(&self) -> PathBuf {
        self.fuzz_dir.join("regressions").join(&self.name)
    }

    /// A file-name-safe form of [`Target::id`].
    fn slug(&self) -> String {
        self.id().replace('/', "-")
    }
}

/// Directories never searched for fuzz crates.
fn skipped(name: &str) -> bool {
    name.starts_with('.') || name == "target" || name == "node_modules"
}

/// Every fuzz target below `root`, sorted by crate and name. Searches at
/// most `max_depth` directory levels (fuzz crates sit one or two below).
pub fn discover(root: &Path, max_depth: usize) -> Vec<Target> {
    fn walk(root: &Path, dir: &Path, depth: usize, out: &mut Vec<Target>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut subdirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter(|e| !skipped(&e.file_name().to_string_lossy()))
            .map(|e| e.path())
            .collect();
        subdirs.sort();
        for sub in subdirs {
            let is_fuzz_crate = sub.file_name().is_some_and(|n| n == "fuzz")
                && sub.join("Cargo.toml").is_file()
                && sub.join("fuzz_targets").is_dir();
            if is_fuzz_crate {
                let krate = dir
                    .strip_prefix(root)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let Ok(files) = std::fs::read_dir(sub.join("fuzz_targets")) else {
                    continue;
                };
                let mut names: Vec<String> = files
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "rs"))
                    .filter_map(|p| Some(p.file_stem()?.to_string_lossy().into_owned()))
                    .collect();
                names.sort();
                out.extend(names.into_iter().map(|name| Target {
                    krate: krate.clone(),
                    fuzz_dir: sub.clone(),
                    name,
                }));
            } else if depth > 1 {
                walk(root, &sub, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, max_depth, &mut out);
    out
}

/// The targets `wanted` names (`NAME` or `CRATE/NAME`; all when empty).
pub fn select(all: &[Target], wanted: &[String]) -> Result<Vec<Target>, String> {
    if wanted.is_empty() {
        return Ok(all.to_vec());
    }
    let mut out: Vec<Target> = Vec::new();
    for w in wanted {
        let hits: Vec<&Target> = all
            .iter()
            .filter(|t| t.id() == *w || t.name == *w)
            .collect();
        if hits.is_empty() {
            return Err(format!(
                "no fuzz target {w:?}; the workspace has: {}",
                all.iter().map(Target::id).collect::<Vec<_>>().join(" ")
            ));
        }
        for t in hits {
            if !out.contains(t) {
                out.push(t.clone());
            }
        }
    }
    Ok(out)
}

/// Time per target: `requested`, shrunk so `count` targets fit `budget`
/// (never under [`MIN_TARGET_TIME`]).
pub fn per_target_time(requested: Duration, count: usize, budget: Option<Duration>) -> Duration {
    match budget {
        Some(b) if count > 0 => {
            let share = b / u32::try_from(count).unwrap_or(u32::MAX);
            requested.min(share).max(MIN_TARGET_TIME.min(requested))
        }
        _ => requested,
    }
}

/// `offset: 16 bytes in hex  |ascii|` lines.
pub fn hex_dump(bytes: &[u8], max: usize) -> String {
    let mut out = String::new();
    for (i, chunk) in bytes[..bytes.len().min(max)].chunks(16).enumerate() {
        let _ = write!(out, "{:08x}: ", i * 16);
        for b in chunk {
            let _ = write!(out, "{b:02x} ");
        }
        for _ in chunk.len()..16 {
            out.push_str("   ");
        }
        out.push('|');
        out.extend(chunk.iter().map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                char::from(b)
            } else {
                '.'
            }
        }));
        out.push_str("|\n");
    }
    if bytes.len() > max {
        let _ = writeln!(out, "... {} more bytes", bytes.len() - max);
    }
    out
}

/// What libFuzzer's output says about a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Inputs executed.
    pub runs: Option<u64>,
    /// Coverage (edges) at the end.
    pub cov: Option<u64>,
    /// Corpus entries at the end.
    pub corpus: Option<u64>,
}

/// Read the last status line (`#N  DONE cov: X ft: Y corp: Z/...`) and the
/// final stats (`stat::number_of_executed_units: N`).
pub fn parse_stats(log: &str) -> Stats {
    let mut s = Stats::default();
    let field = |line: &str, key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    for line in log.lines() {
        if line.starts_with('#') {
            if let Some(v) = field(line, "cov:") {
                s.cov = Some(v);
            }
            if let Some(v) = field(line, "corp:") {
                s.corpus = Some(v);
            }
            if let Some(v) = field(line, "#") {
                s.runs = Some(v);
            }
        }
        if let Some(v) = field(line, "stat::number_of_executed_units:") {
            s.runs = Some(v);
        }
    }
    s
}

/// The files libFuzzer wrote into `dir` for a finding (`crash-`, `leak-`,
/// `timeout-`, `oom-`, `slow-unit-`), sorted.
pub fn artifacts(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().is_some_and(|n| {
                        let n = n.to_string_lossy();
                        ["crash-", "leak-", "timeout-", "oom-", "slow-unit-"]
                            .iter()
                            .any(|pre| n.starts_with(pre))
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Keep a finding as a regression input of `target`; returns where.
pub fn keep_as_regression(target: &Target, artifact: &Path) -> Result<PathBuf, String> {
    let dir = target.regressions();
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let name = artifact.file_name().ok_or("artifact without a file name")?;
    let dest = dir.join(name);
    std::fs::copy(artifact, &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    Ok(dest)
}

/// Files in `dir` (not recursive), sorted; none if it does not exist.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// How one target's run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetResult {
    pub id: String,
    pub result: Result<String, String>,
}

/// All targets' results.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub targets: Vec<TargetResult>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.targets.iter().all(|t| t.result.is_ok())
    }

    /// One `fuzz CRATE/NAME: ok (...)` or `FAILED: ...` line per target.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for t in &self.targets {
            match &t.result {
                Ok(what) => {
                    let _ = writeln!(out, "fuzz {}: ok ({what})", t.id);
                }
                Err(why) => {
                    let _ = writeln!(out, "fuzz {}: FAILED: {why}", t.id);
                }
            }
        }
        out
    }
}

/// `cargo +NIGHTLY ...` in `dir`, with the runner's own toolchain choice
/// removed from the environment.
fn nightly_cargo(dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{FUZZ_NIGHTLY}"))
        .current_dir(dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTUP_TOOLCHAIN_SOURCE")
        .env_remove("CARGO")
        .stdin(Stdio::null());
    cmd
}

/// The host triple cargo-fuzz builds for.
const HOST_TRIPLE: &str = "x86_64-unknown-linux-gnu";

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Build every target of the fuzz crate at `fuzz_dir`.
fn build(fuzz_dir: &Path, target_dir: &Path) -> Result<(), String> {
    let crate_dir = fuzz_dir.parent().ok_or("fuzz dir without a parent")?;
    // --fuzz-dir: the crate directory need not have a Cargo.toml of its own.
    let args = [
        "fuzz".to_string(),
        "build".to_string(),
        "--fuzz-dir".to_string(),
        fuzz_dir.display().to_string(),
        "--target-dir".to_string(),
        target_dir.display().to_string(),
    ];
    eprintln!(
        "qemu-runner: (in {}) cargo +{FUZZ_NIGHTLY} {}",
        crate_dir.display(),
        args.join(" ")
    );
    let status = nightly_cargo(crate_dir)
        .args(&args)
        .status()
        .map_err(|e| format!("running cargo +{FUZZ_NIGHTLY} fuzz: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "`cargo +{FUZZ_NIGHTLY} fuzz build` in {} failed ({status})",
            crate_dir.display()
        ))
    }
}

/// A live spinner for a target (drawn on a terminal only).
fn spinner(id: &str, time: Duration) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(time.as_secs()),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} fuzz {prefix} [{bar:30}] {pos}/{len} s")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("#>."),
    );
    bar.set_prefix(id.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Replay the target's regression inputs, then fuzz it for `time`.
fn run_target(t: &Target, binary: &Path, scratch: &Path, time: Duration) -> Result<String, String> {
    let log_dir = scratch.join("logs");
    let corpus = scratch.join("corpus").join(t.slug());
    let artifacts_dir = scratch.join("artifacts").join(t.slug());
    for d in [&log_dir, &corpus, &artifacts_dir] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let base = |cmd: &mut Command| {
        cmd.arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .stdin(Stdio::null());
    };

    // 1. Regression inputs, one process each so a failure names its file.
    let regressions = files_in(&t.regressions());
    for input in &regressions {
        let mut cmd = Command::new(binary);
        base(&mut cmd);
        let out = cmd
            .arg(input)
            .output()
            .map_err(|e| format!("running {}: {e}", binary.display()))?;
        if !out.status.success() {
            let bytes = std::fs::read(input).unwrap_or_default();
            println!(
                "fuzz {}: regression input {} fails ({}):\n{}\n{}",
                t.id(),
                input.display(),
                out.status,
                tail(&String::from_utf8_lossy(&out.stderr), 30),
                hex_dump(&bytes, HEX_DUMP_MAX)
            );
            return Err(format!(
                "regression input {} crashes again",
                input.display()
            ));
        }
    }

    // 2. Seeds into the scratch corpus.
    let seeds = files_in(&t.seeds());
    for s in &seeds {
        if let Some(name) = s.file_name() {
            std::fs::copy(s, corpus.join(name))
                .map_err(|e| format!("copying seed {}: {e}", s.display()))?;
        }
    }

    // 3. Fuzz.
    let log_path = log_dir.join(format!("{}.log", t.slug()));
    let log =
        std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut cmd = Command::new(binary);
    base(&mut cmd);
    cmd.arg(format!("-max_total_time={}", time.as_secs()))
        .arg(format!("-artifact_prefix={}/", artifacts_dir.display()))
        .arg("-print_final_stats=1")
        .arg(&corpus)
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    let bar = spinner(&t.id(), time);
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("running {}: {e}", binary.display()))?;
    // libFuzzer stops itself at -max_total_time; this only guards against
    // a process that never returns (each input is bounded by -timeout).
    let hard_limit = time + Duration::from_secs(INPUT_TIMEOUT_SECS * 2 + 60);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > hard_limit => {
                let _ = child.kill();
                let _ = child.wait();
                bar.finish_and_clear();
                return Err(format!(
                    "libFuzzer did not stop within {} s; log: {}",
                    hard_limit.as_secs(),
                    log_path.display()
                ));
            }
            Ok(None) => {
                bar.set_position(started.elapsed().as_secs().min(time.as_secs()));
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(format!("waiting for libFuzzer: {e}")),
        }
    };
    bar.finish_and_clear();
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let stats = parse_stats(&text);
    let found = artifacts(&artifacts_dir);
    if found.is_empty() && status.success() {
        let n = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
        return Ok(format!(
            "{:.0} s, {} runs, cov {}, corpus {} from {} seeds, {} regression inputs replayed",
            started.elapsed().as_secs_f64(),
            n(stats.runs),
            n(stats.cov),
            n(stats.corpus),
            seeds.len(),
            regressions.len()
        ));
    }
    println!(
        "fuzz {}: libFuzzer ended {status}; last lines of {}:\n{}",
        t.id(),
        log_path.display(),
        tail(&text, 40)
    );
    let mut kept = Vec::new();
    for a in &found {
        let bytes = std::fs::read(a).unwrap_or_default();
        let dest = keep_as_regression(t, a)?;
        println!(
            "fuzz {}: input {} ({} bytes), kept as {}:\n{}",
            t.id(),
            a.display(),
            bytes.len(),
            dest.display(),
            hex_dump(&bytes, HEX_DUMP_MAX)
        );
        kept.push(dest.display().to_string());
    }
    if kept.is_empty() {
        Err(format!(
            "libFuzzer ended {status} without an input file; log: {}",
            log_path.display()
        ))
    } else {
        Err(format!(
            "found a failing input, kept as {} (commit it with the fix)",
            kept.join(", ")
        ))
    }
}

/// Fuzz `wanted` (all when empty) for `time` each, or less when `budget`
/// (the total fuzzing time) is set and the targets would not fit it.
pub fn run_with_budget(
    wanted: &[String],
    time: Duration,
    budget: Option<Duration>,
) -> Result<Report, String> {
    let root = crate::cargo::workspace_root();
    let all = discover(&root, 4);
    if all.is_empty() {
        return Err(format!(
            "no fuzz targets found (*/fuzz/fuzz_targets/*.rs below {})",
            root.display()
        ));
    }
    let targets = select(&all, wanted)?;
    let each = per_target_time(time, targets.len(), budget);
    let target_dir = crate::cargo::target_dir()?;
    let build_dir = target_dir.join("fuzz");
    let scratch = target_dir.join("fuzz-corpus");
    println!(
        "fuzz: {} targets ({}), {} s each",
        targets.len(),
        targets.iter().map(Target::id).collect::<Vec<_>>().join(" "),
        each.as_secs()
    );
    let mut report = Report::default();
    let mut built: Vec<PathBuf> = Vec::new();
    for t in &targets {
        let result = (|| {
            if !built.contains(&t.fuzz_dir) {
                build(&t.fuzz_dir, &build_dir)?;
                built.push(t.fuzz_dir.clone());
            }
            let binary = build_dir.join(HOST_TRIPLE).join("release").join(&t.name);
            if !binary.is_file() {
                return Err(format!("the build left no {}", binary.display()));
            }
            run_target(t, &binary, &scratch, each)
        })();
        // Two crates may have targets of the same name: build again when
        // the next target's crate differs.
        if targets
            .iter()
            .any(|o| o.fuzz_dir != t.fuzz_dir && o.name == t.name)
        {
            built.retain(|d| d != &t.fuzz_dir);
        }
        match &result {
            Ok(what) => println!("fuzz {}: ok ({what})", t.id()),
            Err(why) => println!("fuzz {}: FAILED: {why}", t.id()),
        }
        report.targets.push(TargetResult { id: t.id(), result });
    }
    Ok(report)
}

/// `qemu-runner fuzz`: install the tools if needed, then fuzz.
pub fn run(wanted: &[String], time: Duration) -> Result<Report, String> {
    let what = crate::setup::rustup::ensure_fuzz_tools(&mut crate::setup::rustup::System)?;
    eprintln!("qemu-runner: setup: {what}");
    let report = run_with_budget(wanted, time, None)?;
    if report.targets.len() > 1 {
        // Each target's line was printed as it ended; the summary again,
        // after the logs of any failure.
        print!("\n{}", report.render());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    struct Tree(PathBuf);

    impl Tree {
        fn new(tag: &str, files: &[&str]) -> Self {
            let dir = std::env::temp_dir().join(format!("hvm-fuzz-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            for f in files {
                let p = dir.join(f);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(p, "").unwrap();
            }
            Tree(dir)
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn discovers_nested_crates_and_skips_build_dirs() {
        let t = Tree::new(
            "disc",
            &[
                "migration/fuzz/Cargo.toml",
                "migration/fuzz/fuzz_targets/receive.rs",
                "migration/fuzz/fuzz_targets/decode.rs",
                "migration/fuzz/fuzz_targets/notes.txt",
                "hypervisor/core/fuzz/Cargo.toml",
                "hypervisor/core/fuzz/fuzz_targets/exit_decode.rs",
                // Not fuzz crates: no Cargo.toml, or inside target/.
                "vstorage/fuzz/fuzz_targets/orphan.rs",
                "target/x/fuzz/Cargo.toml",
                "target/x/fuzz/fuzz_targets/built.rs",
                ".git/fuzz/Cargo.toml",
                ".git/fuzz/fuzz_targets/hidden.rs",
            ],
        );
        let ids: Vec<String> = discover(&t.0, 4).iter().map(Target::id).collect();
        assert_eq!(
            ids,
            [
                "hypervisor/core/exit_decode",
                "migration/decode",
                "migration/receive"
            ]
        );
        let d = &discover(&t.0, 4)[1];
        assert_eq!(d.seeds(), t.0.join("migration/fuzz/seeds/decode"));
        assert_eq!(
            d.regressions(),
            t.0.join("migration/fuzz/regressions/decode")
        );
    }

    #[test]
    fn the_workspace_has_targets() {
        let ids: Vec<String> = discover(&crate::cargo::workspace_root(), 4)
            .iter()
            .map(Target::id)
            .collect();
        for want in [
            "migration/decode",
            "migration/receive",
            "vstorage/vhdx_open",
            "vstorage/p9_reply",
            "vstorage/p9_session",
        ] {
            assert!(ids.iter().any(|i| i == want), "{want} not in {ids:?}");
        }
    }

    #[test]
    fn selection() {
        let t = |k: &str, n: &str| Target {
            krate: k.into(),
            fuzz_dir: PathBuf::from(k).join("fuzz"),
            name: n.into(),
        };
        let all = vec![t("a", "decode"), t("b", "decode"), t("b", "open")];
        assert_eq!(select(&all, &[]).unwrap().len(), 3);
        assert_eq!(select(&all, &["decode".into()]).unwrap().len(), 2);
        assert_eq!(
            select(&all, &["b/decode".into(), "decode".into()]).unwrap(),
            [t("b", "decode"), t("a", "decode")]
        );
        let e = select(&all, &["nope".into()]).unwrap_err();
        assert!(
            e.contains("no fuzz target \"nope\"") && e.contains("a/decode b/decode b/open"),
            "{e}"
        );
    }

    #[test]
    fn time_shares() {
        let s = Duration::from_secs;
        assert_eq!(per_target_time(s(45), 3, Some(s(420))), s(45));
        assert_eq!(per_target_time(s(45), 12, Some(s(420))), s(35));
        assert_eq!(per_target_time(s(45), 100, Some(s(420))), MIN_TARGET_TIME);
        assert_eq!(per_target_time(s(5), 100, Some(s(420))), s(5));
        assert_eq!(per_target_time(s(45), 100, None), s(45));
    }

    #[test]
    fn hex() {
        assert_eq!(
            hex_dump(b"AB\x00\xff", 4096),
            "00000000: 41 42 00 ff                                     |AB..|\n"
        );
        let d = hex_dump(&[7u8; 40], 32);
        assert_eq!(d.lines().count(), 3, "{d}");
        assert!(d.starts_with("00000000: 07 07"));
        assert!(d.contains("00000010: 07"));
        assert!(d.ends_with("... 8 more bytes\n"), "{d}");
        assert_eq!(hex_dump(&[], 10), "");
    }

    #[test]
    fn libfuzzer_stats() {
        let log = "INFO: Seed: 123\n\
                   #2\tINITED cov: 40 ft: 41 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   #1024\tpulse  cov: 210 ft: 400 corp: 55/2Kb lim: 14 exec/s: 512 rss: 40Mb\n\
                   #98765\tDONE   cov: 233 ft: 512 corp: 61/3Kb lim: 100 exec/s: 2194 rss: 60Mb\n\
                   Done 98765 runs in 45 second(s)\n\
                   stat::number_of_executed_units: 98766\n\
                   stat::new_units_added: 60\n";
        assert_eq!(
            parse_stats(log),
            Stats {
                runs: Some(98766),
                cov: Some(233),
                corpus: Some(61)
            }
        );
        assert_eq!(parse_stats("garbage\n#x cov:\n"), Stats::default());
    }

    #[test]
    fn findings_become_regression_inputs() {
        let tree = Tree::new(
            "art",
            &[
                "art/crash-0a1b",
                "art/timeout-22",
                "art/other.txt",
                "c/fuzz/Cargo.toml",
            ],
        );
        fs::write(tree.0.join("art/crash-0a1b"), b"\x01\x02boom").unwrap();
        let found = artifacts(&tree.0.join("art"));
        assert_eq!(
            found,
            [tree.0.join("art/crash-0a1b"), tree.0.join("art/timeout-22")]
        );
        let t = Target {
            krate: "c".into(),
            fuzz_dir: tree.0.join("c/fuzz"),
            name: "open".into(),
        };
        let kept = keep_as_regression(&t, &found[0]).unwrap();
        assert_eq!(kept, tree.0.join("c/fuzz/regressions/open/crash-0a1b"));
        assert_eq!(fs::read(&kept).unwrap(), b"\x01\x02boom");
        assert_eq!(files_in(&t.regressions()), [kept]);
    }

    #[test]
    fn report_lines() {
        let r = Report {
            targets: vec![
                TargetResult {
                    id: "m/decode".into(),
                    result: Ok("45 s".into()),
                },
                TargetResult {
                    id: "v/open".into(),
                    result: Err("found a failing input".into()),
                },
            ],
        };
        assert!(!r.passed());
        assert_eq!(
            r.render(),
            "fuzz m/decode: ok (45 s)\nfuzz v/open: FAILED: found a failing input\n"
        );
    }
}
