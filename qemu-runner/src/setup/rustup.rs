//! The Rust side of `setup`: the pinned toolchain has every target and
//! component `rust-toolchain.toml` names, and (for fuzzing) a pinned
//! nightly and `cargo-fuzz` are installed.
//!
//! rustup adds the `targets` and `components` of `rust-toolchain.toml` only
//! when it installs the toolchain itself; a machine whose image already has
//! the pinned release lacks `x86_64-unknown-none` (shared/PLATFORM.md,
//! "Toolchain"). So the runner asks rustup what is installed and adds what
//! is missing, printing each command before it runs it. When rustup is
//! missing or a command fails (offline), the error names the exact command
//! to run by hand.
//!
//! The decisions (what is missing, which commands fix it) are pure
//! functions of rustup's output; the commands run through [`Exec`], so the
//! tests drive the whole check over a fake rustup.

use std::path::Path;
use std::process::{Command, Stdio};

use serde::Deserialize;

/// The nightly `cargo fuzz` runs on, pinned so a run is reproducible (the
/// nightly of the same weeks as the 1.95 release; any later one works too).
pub const FUZZ_NIGHTLY: &str = "nightly-2026-05-20";
/// The `cargo-fuzz` release installed when it is missing.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// `[toolchain]` of `rust-toolchain.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Toolchain {
    pub channel: String,
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default)]
    pub components: Vec<String>,
}

#[derive(Deserialize)]
struct ToolchainFile {
    toolchain: Toolchain,
}

impl Toolchain {
    /// Parse the text of a `rust-toolchain.toml`.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str::<ToolchainFile>(text)
            .map(|f| f.toolchain)
            .map_err(|e| format!("rust-toolchain.toml: {e}"))
    }

    /// The workspace's pin.
    pub fn pinned(workspace_root: &Path) -> Result<Self, String> {
        let path = workspace_root.join("rust-toolchain.toml");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text)
    }
}

/// What a command printed and whether it succeeded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Captured {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// How the checks run commands (the real system, or a test double).
pub trait Exec {
    /// Run and capture; `Err` if the program could not be started.
    fn capture(&mut self, program: &str, args: &[String]) -> std::io::Result<Captured>;
    /// Run with its output on the terminal; `Ok(success)`.
    fn run(&mut self, program: &str, args: &[String]) -> std::io::Result<bool>;
}

/// Runs commands for real. `rustup` and `cargo` are the ones on `PATH`
/// (rustup's proxies), with the toolchain the runner itself was started
/// with taken out of the environment, so `cargo +TOOLCHAIN` and
/// `--toolchain` decide.
pub struct System;

impl System {
    fn command(program: &str, args: &[String]) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTUP_TOOLCHAIN_SOURCE")
            .current_dir(crate::cargo::workspace_root());
        cmd
    }
}

impl Exec for System {
    fn capture(&mut self, program: &str, args: &[String]) -> std::io::Result<Captured> {
        let out = Self::command(program, args).stdin(Stdio::null()).output()?;
        Ok(Captured {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn run(&mut self, program: &str, args: &[String]) -> std::io::Result<bool> {
        Ok(Self::command(program, args)
            .stdin(Stdio::null())
            .status()?
            .success())
    }
}

fn strings(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// The names `rustup target list --installed` printed (one a line).
fn listed(output: &str) -> impl Iterator<Item = &str> {
    output.lines().map(str::trim).filter(|l| !l.is_empty())
}

/// Targets of `wanted` that `rustup target list --installed` output lacks.
pub fn missing_targets<'a>(wanted: &'a [String], installed: &str) -> Vec<&'a str> {
    wanted
        .iter()
        .map(String::as_str)
        .filter(|t| !listed(installed).any(|l| l == *t))
        .collect()
}

/// Components of `wanted` that `rustup component list --installed` output
/// lacks. rustup prints host components with the host triple appended
/// (`rustfmt-x86_64-unknown-linux-gnu`); the host is read from the `rustc-`
/// line, which every installed toolchain has.
pub fn missing_components<'a>(wanted: &'a [String], installed: &str) -> Vec<&'a str> {
    let host = listed(installed).find_map(|l| l.strip_prefix("rustc-"));
    let has = |c: &str| {
        listed(installed).any(|l| {
            l == c
                || l.strip_prefix(c)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|rest| match host {
                        Some(h) => rest == h,
                        // No rustc line: accept anything triple-shaped.
                        None => rest.split('-').count() >= 3,
                    })
        })
    };
    wanted
        .iter()
        .map(String::as_str)
        .filter(|c| !has(c))
        .collect()
}

/// Whether `rustup toolchain list` output has `name` (printed with the
/// host triple and maybe `(default)` / `(active)` after it).
pub fn toolchain_listed(list: &str, name: &str) -> bool {
    listed(list).any(|l| {
        let first = l.split_whitespace().next().unwrap_or("");
        first == name
            || first
                .strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|triple| triple.split('-').count() >= 3)
    })
}

/// What rustup reported about the pinned toolchain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Installed {
    /// The toolchain itself is not installed.
    NoToolchain,
    /// Installed, with these `--installed` listings.
    Lists { targets: String, components: String },
}

/// The rustup commands (argument lists) that complete `tc` from `state`;
/// empty when nothing is missing.
pub fn plan(tc: &Toolchain, state: &Installed) -> Vec<Vec<String>> {
    match state {
        Installed::NoToolchain => {
            let mut args = strings(&["toolchain", "install", &tc.channel, "--profile", "minimal"]);
            if !tc.targets.is_empty() {
                args.extend(["--target".to_string(), tc.targets.join(",")]);
            }
            if !tc.components.is_empty() {
                args.extend(["--component".to_string(), tc.components.join(",")]);
            }
            vec![args]
        }
        Installed::Lists {
            targets,
            components,
        } => {
            let mut cmds = Vec::new();
            let t = missing_targets(&tc.targets, targets);
            if !t.is_empty() {
                let mut args = strings(&["target", "add", "--toolchain", &tc.channel]);
                args.extend(t.iter().map(|s| s.to_string()));
                cmds.push(args);
            }
            let c = missing_components(&tc.components, components);
            if !c.is_empty() {
                let mut args = strings(&["component", "add", "--toolchain", &tc.channel]);
                args.extend(c.iter().map(|s| s.to_string()));
                cmds.push(args);
            }
            cmds
        }
    }
}

/// A command as the user would type it.
pub fn shown(program: &str, args: &[String]) -> String {
    std::iter::once(program)
        .chain(args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

fn rustup_present(exec: &mut dyn Exec) -> bool {
    exec.capture("rustup", &strings(&["--version"]))
        .is_ok_and(|c| c.ok)
}

/// Ask rustup what `tc` has.
pub fn query(exec: &mut dyn Exec, tc: &Toolchain) -> Result<Installed, String> {
    let list = |exec: &mut dyn Exec, what: &str| -> Result<Captured, String> {
        let args = strings(&[what, "list", "--installed", "--toolchain", &tc.channel]);
        exec.capture("rustup", &args)
            .map_err(|e| format!("running `{}`: {e}", shown("rustup", &args)))
    };
    let targets = list(exec, "target")?;
    if !targets.ok {
        if targets.stderr.contains("not installed") {
            return Ok(Installed::NoToolchain);
        }
        return Err(format!(
            "`rustup target list --installed --toolchain {}` failed: {}",
            tc.channel,
            targets.stderr.trim()
        ));
    }
    let components = list(exec, "component")?;
    if !components.ok {
        return Err(format!(
            "`rustup component list --installed --toolchain {}` failed: {}",
            tc.channel,
            components.stderr.trim()
        ));
    }
    Ok(Installed::Lists {
        targets: targets.stdout,
        components: components.stdout,
    })
}

/// Run one install command, printing it first; on failure the message
/// says how to run it by hand.
fn install(exec: &mut dyn Exec, program: &str, args: &[String]) -> Result<(), String> {
    let line = shown(program, args);
    eprintln!("qemu-runner: {line}");
    match exec.run(program, args) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "`{line}` failed (offline? it downloads from the Rust project's servers); \
             once the network is reachable run:\n  {line}"
        )),
        Err(e) => Err(format!("running `{line}`: {e}; run it by hand:\n  {line}")),
    }
}

/// Everything `tc` needs, in one command, for the rustup-less message.
fn full_install_line(tc: &Toolchain) -> String {
    plan(tc, &Installed::NoToolchain)
        .first()
        .map(|args| shown("rustup", args))
        .unwrap_or_default()
}

/// Without rustup: `rustc --print sysroot` has `lib/rustlib/TARGET` for
/// each target, or the message names the rustup command.
fn check_without_rustup(exec: &mut dyn Exec, tc: &Toolchain) -> Result<String, String> {
    let how = format!(
        "rustup not found; it installs the Rust {} toolchain with the target(s) {} and component(s) {} \
         this project pins (rust-toolchain.toml). Install rustup, then run:\n  {}",
        tc.channel,
        tc.targets.join(", "),
        tc.components.join(", "),
        full_install_line(tc)
    );
    let sysroot = match exec.capture("rustc", &strings(&["--print", "sysroot"])) {
        Ok(c) if c.ok => c.stdout.trim().to_string(),
        _ => return Err(how),
    };
    let absent: Vec<&str> = tc
        .targets
        .iter()
        .map(String::as_str)
        .filter(|t| !Path::new(&sysroot).join("lib/rustlib").join(t).is_dir())
        .collect();
    if absent.is_empty() {
        Ok(format!(
            "rustup not found; rustc's sysroot has {}",
            tc.targets.join(", ")
        ))
    } else {
        Err(how)
    }
}

/// Make sure `tc` has its targets and components, installing what is
/// missing. `Ok` with a one-line description.
pub fn ensure_toolchain(exec: &mut dyn Exec, tc: &Toolchain) -> Result<String, String> {
    if !rustup_present(exec) {
        return check_without_rustup(exec, tc);
    }
    let steps = plan(tc, &query(exec, tc)?);
    if steps.is_empty() {
        return Ok(format!(
            "Rust {} has {}",
            tc.channel,
            tc.targets
                .iter()
                .chain(&tc.components)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for args in &steps {
        install(exec, "rustup", args)?;
    }
    let still = plan(tc, &query(exec, tc)?);
    if let Some(args) = still.first() {
        return Err(format!(
            "rustup reported success but Rust {} still lacks what `{}` adds",
            tc.channel,
            shown("rustup", args)
        ));
    }
    Ok(format!(
        "installed into Rust {}: {}",
        tc.channel,
        steps
            .iter()
            .map(|a| shown("rustup", a))
            .collect::<Vec<_>>()
            .join("; ")
    ))
}

/// The commands that install `cargo fuzz`'s tools: the pinned nightly when
/// `rustup toolchain list` lacks it, `cargo-fuzz` when `cargo fuzz
/// --version` did not run. Each is `(program, args)`.
pub fn fuzz_plan(toolchains: &str, has_cargo_fuzz: bool) -> Vec<(&'static str, Vec<String>)> {
    let mut cmds = Vec::new();
    if !toolchain_listed(toolchains, FUZZ_NIGHTLY) {
        cmds.push((
            "rustup",
            strings(&["toolchain", "install", FUZZ_NIGHTLY, "--profile", "minimal"]),
        ));
    }
    if !has_cargo_fuzz {
        cmds.push((
            "cargo",
            strings(&[
                "install",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
                "--locked",
            ]),
        ));
    }
    cmds
}

fn cargo_fuzz_runs(exec: &mut dyn Exec) -> bool {
    let args = strings(&[&format!("+{FUZZ_NIGHTLY}"), "fuzz", "--version"]);
    exec.capture("cargo", &args).is_ok_and(|c| c.ok)
}

/// Make sure `cargo +FUZZ_NIGHTLY fuzz` runs, installing the nightly and
/// cargo-fuzz when missing.
pub fn ensure_fuzz_tools(exec: &mut dyn Exec) -> Result<String, String> {
    let manual = fuzz_plan("", false)
        .iter()
        .map(|(p, a)| format!("  {}", shown(p, a)))
        .collect::<Vec<_>>()
        .join("\n");
    if !rustup_present(exec) {
        return Err(format!(
            "rustup not found; fuzzing needs the pinned nightly and cargo-fuzz. Install rustup, then run:\n{manual}"
        ));
    }
    let list = exec
        .capture("rustup", &strings(&["toolchain", "list"]))
        .map_err(|e| format!("running `rustup toolchain list`: {e}"))?;
    // cargo-fuzz is a cargo subcommand of any toolchain: ask the pinned one.
    let has_fuzz = exec
        .capture("cargo", &strings(&["fuzz", "--version"]))
        .is_ok_and(|c| c.ok);
    let steps = fuzz_plan(&list.stdout, has_fuzz);
    if steps.is_empty() {
        return Ok(format!("{FUZZ_NIGHTLY} and cargo-fuzz present"));
    }
    for (program, args) in &steps {
        install(exec, program, args)?;
    }
    if !cargo_fuzz_runs(exec) {
        return Err(format!(
            "`cargo +{FUZZ_NIGHTLY} fuzz --version` still does not run after installing; run:\n{manual}"
        ));
    }
    Ok(format!(
        "installed {}",
        steps
            .iter()
            .map(|(p, a)| shown(p, a))
            .collect::<Vec<_>>()
            .join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "x86_64-unknown-linux-gnu";

    fn pinned() -> Toolchain {
        Toolchain::parse(
            "[toolchain]\nchannel = \"1.95.0\"\ntargets = [\"x86_64-unknown-none\"]\n\
             components = [\"rustfmt\", \"clippy\"]\nprofile = \"minimal\"\n",
        )
        .unwrap()
    }

    #[test]
    fn reads_the_workspace_pin() {
        let tc = Toolchain::pinned(&crate::cargo::workspace_root()).unwrap();
        assert!(!tc.channel.is_empty());
        assert!(tc.targets.iter().any(|t| t == "x86_64-unknown-none"));
        assert_eq!(pinned().components, ["rustfmt", "clippy"]);
        assert!(Toolchain::parse("[toolchain]\ntargets = []\n")
            .unwrap_err()
            .contains("channel"));
    }

    #[test]
    fn target_list_parsing() {
        let tc = pinned();
        let both = format!("{HOST}\nx86_64-unknown-none\n");
        assert!(missing_targets(&tc.targets, &both).is_empty());
        assert_eq!(
            missing_targets(&tc.targets, &format!("{HOST}\n")),
            ["x86_64-unknown-none"]
        );
        // A longer name that merely starts with the target does not count.
        assert_eq!(
            missing_targets(&tc.targets, "x86_64-unknown-none-elf\n"),
            ["x86_64-unknown-none"]
        );
    }

    #[test]
    fn component_list_parsing() {
        let tc = pinned();
        let full = format!(
            "cargo-{HOST}\nclippy-{HOST}\nrust-std-{HOST}\nrust-std-x86_64-unknown-none\n\
             rustc-{HOST}\nrustfmt-{HOST}\n"
        );
        assert!(missing_components(&tc.components, &full).is_empty());
        let minimal = format!("cargo-{HOST}\nrust-std-{HOST}\nrustc-{HOST}\n");
        assert_eq!(
            missing_components(&tc.components, &minimal),
            ["rustfmt", "clippy"]
        );
        // rust-std for another target is not the host's rust-std.
        let wanted = vec!["rust-std".to_string()];
        assert_eq!(
            missing_components(
                &wanted,
                &format!("rustc-{HOST}\nrust-std-x86_64-unknown-none\n")
            ),
            ["rust-std"]
        );
        // `rust-src` is not `rust`.
        let wanted = vec!["rust".to_string()];
        assert_eq!(
            missing_components(&wanted, &format!("rustc-{HOST}\nrust-src\n")),
            ["rust"]
        );
        assert!(missing_components(&wanted, "rust-src\nrust-aarch64-apple-darwin\n").is_empty());
    }

    #[test]
    fn plans() {
        let tc = pinned();
        let cmds = |s: &Installed| -> Vec<String> {
            plan(&tc, s).iter().map(|a| shown("rustup", a)).collect()
        };
        assert_eq!(
            cmds(&Installed::NoToolchain),
            ["rustup toolchain install 1.95.0 --profile minimal --target x86_64-unknown-none --component rustfmt,clippy"]
        );
        let no_target = Installed::Lists {
            targets: format!("{HOST}\n"),
            components: format!("rustc-{HOST}\nrustfmt-{HOST}\nclippy-{HOST}\n"),
        };
        assert_eq!(
            cmds(&no_target),
            ["rustup target add --toolchain 1.95.0 x86_64-unknown-none"]
        );
        let nothing = Installed::Lists {
            targets: format!("{HOST}\n"),
            components: format!("rustc-{HOST}\n"),
        };
        assert_eq!(
            cmds(&nothing),
            [
                "rustup target add --toolchain 1.95.0 x86_64-unknown-none",
                "rustup component add --toolchain 1.95.0 rustfmt clippy"
            ]
        );
        let all = Installed::Lists {
            targets: format!("{HOST}\nx86_64-unknown-none\n"),
            components: format!("rustc-{HOST}\nrustfmt-{HOST}\nclippy-{HOST}\n"),
        };
        assert!(plan(&tc, &all).is_empty());
    }

    #[test]
    fn toolchain_lists() {
        let list = format!("stable-{HOST} (default)\nnightly-{HOST}\n1.95.0-{HOST} (active)\n");
        assert!(toolchain_listed(&list, "1.95.0"));
        assert!(toolchain_listed(&list, "nightly"));
        assert!(!toolchain_listed(&list, FUZZ_NIGHTLY));
        assert!(toolchain_listed(
            &format!("{FUZZ_NIGHTLY}-{HOST}\n"),
            FUZZ_NIGHTLY
        ));
        assert!(!toolchain_listed(&list, "1.95"));
        let shown_cmds: Vec<String> = fuzz_plan(&list, false)
            .iter()
            .map(|(p, a)| shown(p, a))
            .collect();
        assert_eq!(
            shown_cmds,
            [
                format!("rustup toolchain install {FUZZ_NIGHTLY} --profile minimal"),
                format!("cargo install cargo-fuzz --version {CARGO_FUZZ_VERSION} --locked"),
            ]
        );
        assert!(fuzz_plan(&format!("{FUZZ_NIGHTLY}-{HOST}\n"), true).is_empty());
    }

    /// A rustup that keeps a toolchain's state and can be offline.
    #[derive(Default)]
    struct FakeRustup {
        absent: bool,
        offline: bool,
        toolchain: bool,
        targets: Vec<String>,
        components: Vec<String>,
        nightly: bool,
        cargo_fuzz: bool,
        ran: Vec<String>,
    }

    impl Exec for FakeRustup {
        fn capture(&mut self, program: &str, args: &[String]) -> std::io::Result<Captured> {
            if self.absent {
                return Err(std::io::Error::from(std::io::ErrorKind::NotFound));
            }
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let ok = |stdout: String| Captured {
                ok: true,
                stdout,
                stderr: String::new(),
            };
            Ok(match (program, a.as_slice()) {
                ("rustup", ["--version"]) => ok("rustup 1.29.0".into()),
                ("rustup", ["toolchain", "list"]) => ok(format!(
                    "stable-{HOST} (default)\n{}",
                    if self.nightly {
                        format!("{FUZZ_NIGHTLY}-{HOST}\n")
                    } else {
                        String::new()
                    }
                )),
                ("cargo", ["fuzz", "--version"]) => Captured {
                    ok: self.cargo_fuzz,
                    ..Captured::default()
                },
                ("cargo", [plus, "fuzz", "--version"]) if *plus == format!("+{FUZZ_NIGHTLY}") => {
                    Captured {
                        ok: self.cargo_fuzz && self.nightly,
                        ..Captured::default()
                    }
                }
                ("rustup", [_, "list", "--installed", "--toolchain", "1.95.0"])
                    if !self.toolchain =>
                {
                    Captured {
                        ok: false,
                        stdout: String::new(),
                        stderr: format!("error: toolchain '1.95.0-{HOST}' is not installed\n"),
                    }
                }
                ("rustup", ["target", "list", "--installed", ..]) => {
                    ok(format!("{HOST}\n{}", self.targets.join("\n")))
                }
                ("rustup", ["component", "list", "--installed", ..]) => ok(format!(
                    "rustc-{HOST}\ncargo-{HOST}\n{}",
                    self.components
                        .iter()
                        .map(|c| format!("{c}-{HOST}\n"))
                        .collect::<String>()
                )),
                _ => panic!("unexpected capture {program} {args:?}"),
            })
        }

        fn run(&mut self, program: &str, args: &[String]) -> std::io::Result<bool> {
            self.ran.push(shown(program, args));
            if self.offline {
                return Ok(false);
            }
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            match a.as_slice() {
                ["target", "add", "--toolchain", "1.95.0", rest @ ..] => {
                    self.targets.extend(rest.iter().map(|s| s.to_string()))
                }
                ["component", "add", "--toolchain", "1.95.0", rest @ ..] => {
                    self.components.extend(rest.iter().map(|s| s.to_string()))
                }
                ["toolchain", "install", FUZZ_NIGHTLY, "--profile", "minimal"] => {
                    self.nightly = true
                }
                ["install", "cargo-fuzz", ..] => self.cargo_fuzz = true,
                ["toolchain", "install", "1.95.0", ..] => {
                    self.toolchain = true;
                    self.targets.push("x86_64-unknown-none".into());
                    self.components.extend(["rustfmt".into(), "clippy".into()]);
                }
                _ => panic!("unexpected run {program} {args:?}"),
            }
            Ok(true)
        }
    }

    #[test]
    fn adds_the_missing_target_and_says_so() {
        let mut r = FakeRustup {
            toolchain: true,
            components: vec!["rustfmt".into(), "clippy".into()],
            ..FakeRustup::default()
        };
        let what = ensure_toolchain(&mut r, &pinned()).unwrap();
        assert_eq!(
            r.ran,
            ["rustup target add --toolchain 1.95.0 x86_64-unknown-none"]
        );
        assert!(what.contains("rustup target add"), "{what}");
        // Second run: nothing to do, nothing run.
        r.ran.clear();
        let what = ensure_toolchain(&mut r, &pinned()).unwrap();
        assert!(r.ran.is_empty());
        assert_eq!(what, "Rust 1.95.0 has x86_64-unknown-none, rustfmt, clippy");
    }

    #[test]
    fn installs_a_missing_toolchain_whole() {
        let mut r = FakeRustup::default();
        ensure_toolchain(&mut r, &pinned()).unwrap();
        assert_eq!(
            r.ran,
            ["rustup toolchain install 1.95.0 --profile minimal --target x86_64-unknown-none --component rustfmt,clippy"]
        );
    }

    #[test]
    fn offline_names_the_command() {
        let mut r = FakeRustup {
            toolchain: true,
            offline: true,
            ..FakeRustup::default()
        };
        let e = ensure_toolchain(&mut r, &pinned()).unwrap_err();
        assert!(
            e.contains("offline?")
                && e.ends_with("\n  rustup target add --toolchain 1.95.0 x86_64-unknown-none"),
            "{e}"
        );
    }

    #[test]
    fn installs_only_the_missing_fuzz_tool() {
        let mut r = FakeRustup {
            cargo_fuzz: true,
            ..FakeRustup::default()
        };
        let what = ensure_fuzz_tools(&mut r).unwrap();
        assert_eq!(
            r.ran,
            [format!(
                "rustup toolchain install {FUZZ_NIGHTLY} --profile minimal"
            )]
        );
        assert!(
            what.starts_with("installed rustup toolchain install"),
            "{what}"
        );
        r.ran.clear();
        assert_eq!(
            ensure_fuzz_tools(&mut r).unwrap(),
            format!("{FUZZ_NIGHTLY} and cargo-fuzz present")
        );
        assert!(r.ran.is_empty());
        let mut r = FakeRustup {
            nightly: true,
            ..FakeRustup::default()
        };
        ensure_fuzz_tools(&mut r).unwrap();
        assert_eq!(
            r.ran,
            [format!(
                "cargo install cargo-fuzz --version {CARGO_FUZZ_VERSION} --locked"
            )]
        );
        let mut offline = FakeRustup {
            offline: true,
            ..FakeRustup::default()
        };
        let e = ensure_fuzz_tools(&mut offline).unwrap_err();
        assert!(
            e.contains("offline?")
                && e.ends_with(&format!(
                    "rustup toolchain install {FUZZ_NIGHTLY} --profile minimal"
                )),
            "{e}"
        );
    }

    #[test]
    fn without_rustup_names_the_command() {
        let mut r = FakeRustup {
            absent: true,
            ..FakeRustup::default()
        };
        let e = ensure_toolchain(&mut r, &pinned()).unwrap_err();
        assert!(e.starts_with("rustup not found"), "{e}");
        assert!(
            e.ends_with("rustup toolchain install 1.95.0 --profile minimal --target x86_64-unknown-none --component rustfmt,clippy"),
            "{e}"
        );
        assert!(ensure_fuzz_tools(&mut r)
            .unwrap_err()
            .contains("cargo install cargo-fuzz"));
    }
}
