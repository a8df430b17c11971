//! Helpers for the host integration tests in `tests/`: they drive
//! qemu-runner exactly as a user would (`cargo run -p qemu-runner -- ...`
//! from the workspace root) and assert on what it prints.
//!
//! Booting needs QEMU: [`require_qemu`] fails the test with instructions
//! when it is missing, so a machine without it never reports a pass. Runs
//! are serialised ([`runner`] holds a process-wide lock): each boots a node
//! under TCG and they would only compete for the same cores.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

pub mod cluster;
pub mod files;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/integration lies two levels below the workspace root")
        .to_path_buf()
}

/// A small tmpfs mounted at a directory (a store that fills), lazily
/// unmounted when dropped (QEMU may still hold it then). Needs root, as
/// the tests have here and in CI.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mount a tmpfs of `mib` MiB at `at` (made if missing).
    pub fn mount(at: &Path, mib: u64) -> Self {
        std::fs::create_dir_all(at).unwrap_or_else(|e| panic!("{}: {e}", at.display()));
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}M"), "tmpfs"])
            .arg(at)
            .output()
            .expect("mount(8)");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (the tests run as root here and in CI): {out:?}"
        );
        Tmpfs(at.into())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Panic with instructions unless `qemu-system-x86_64` runs.
pub fn require_qemu() {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "qemu-system-x86_64 is not installed, and these tests boot hvmigrate nodes under QEMU. \
         Install the emulators with `cargo run -p qemu-runner -- setup` (as root) and run the tests again."
    );
}

/// What one runner invocation printed.
#[derive(Debug)]
pub struct Run {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The last non-empty stdout line.
    pub fn last_line(&self) -> &str {
        self.stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
    }

    /// Whether stdout has `line` as a whole line (ignoring `\r`).
    pub fn has_line(&self, line: &str) -> bool {
        self.stdout
            .lines()
            .any(|l| l.trim_end_matches('\r') == line)
    }

    /// Both streams, for assertion messages.
    pub fn transcript(&self) -> String {
        format!(
            "exit code {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// `cargo run -q -p qemu-runner -- ARGS` in the workspace root.
pub fn runner(args: &[&str]) -> Run {
    run_cargo(&["run", "-q", "-p", "qemu-runner", "--"], args, &[])
}

/// `cargo run -q --bin hvctl -- ARGS` in the workspace root (the README's
/// client command), with extra environment variables.
pub fn hvctl_bin(args: &[&str], env: &[(&str, &str)]) -> Run {
    run_cargo(&["run", "-q", "--bin", "hvctl", "--"], args, env)
}

/// The command of [`hvctl_bin`], to start in the background.
pub fn hvctl_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = cargo();
    cmd.args(["run", "-q", "--bin", "hvctl", "--"]).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    cmd
}

/// Run cargo with `pre` then `args`, one runner invocation at a time.
pub fn run_cargo(pre: &[&str], args: &[&str], env: &[(&str, &str)]) -> Run {
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut cmd = cargo();
    cmd.args(pre).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Run::from(cmd.output().expect("running cargo"))
}

impl From<std::process::Output> for Run {
    fn from(out: std::process::Output) -> Self {
        Run {
            success: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}
