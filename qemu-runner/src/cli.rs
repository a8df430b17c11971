//! The command line: `qemu-runner COMMAND [OPTIONS] [ARGS]`, declared with
//! clap's derive API. clap generates `--help` for every command (and `help
//! COMMAND ...`), the shell completions (`completions SHELL`) and the usage
//! errors, which exit with status 2.
//!
//! What a flag means is said once, on its field; defaults are the
//! constants below.

use std::ffi::OsStr;
use std::time::Duration;

use clap::builder::{PossibleValue, TypedValueParser};
use clap::{Args, Parser, Subcommand};

use crate::accel::Accel;
use crate::arch::Arch;

/// Default `guest-test` timeout in seconds: generous, TCG is slow and CI
/// shares cores.
pub const DEFAULT_TEST_TIMEOUT_SECS: u64 = 300;
/// [`DEFAULT_TEST_TIMEOUT_SECS`] as a duration.
pub const DEFAULT_TEST_TIMEOUT: Duration = Duration::from_secs(DEFAULT_TEST_TIMEOUT_SECS);
/// Default `bench exits` timeout in seconds.
pub const DEFAULT_BENCH_TIMEOUT_SECS: u64 = 180;
/// Default `bench dirty` timeout in seconds (three 2 s windows of node
/// time, which take minutes of wall time under Bochs).
pub const DEFAULT_BENCH_DIRTY_TIMEOUT_SECS: u64 = 900;
/// How long `demo` watches the node unless told otherwise.
pub const DEFAULT_DEMO_SECONDS: u64 = 30;
/// Default `bench link` volume and raw frame count.
pub const BENCH_DEFAULT_MIB: u64 = 64;
pub const BENCH_DEFAULT_FRAMES: u64 = 50_000;
/// Seconds each fuzz target runs unless told otherwise.
pub const DEFAULT_FUZZ_SECONDS: u64 = 45;

/// The text after the top-level help: how to run it, the case names.
fn after_help() -> String {
    format!(
        "Run it from the workspace as `cargo run -p qemu-runner -- COMMAND`; `help COMMAND`\n\
         or `COMMAND --help` describes each command.\n\n\
         cases: {}",
        hvcore::abi::case::ALL.join(" ")
    )
}

/// Builds the hypervisor image and the guest test kernel, boots hvmigrate
/// nodes under QEMU and Bochs, runs the guest tests, the demo, the
/// benchmarks and the whole suite.
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(name = "qemu-runner", version, after_help = after_help())]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Check (and install what is missing of) the Rust target and components
    /// rust-toolchain.toml pins, the fuzzing nightly with cargo-fuzz, and the
    /// Debian packages (QEMU, Bochs, GRUB tools; as root)
    Setup,
    /// Build the hypervisor image and the guest kernel, print their paths
    Build,
    /// Boot one node, serial console on the terminal (no timeout unless
    /// --timeout is given)
    Node(NodeArgs),
    /// Boot a node that runs the guest test cases (all when none are named)
    /// and summarise them
    GuestTest(GuestTestArgs),
    /// Install/build as needed; act 1: a node shows a busy guest's dirty-page
    /// rate and migrates it within itself; act 2: two nodes, the busy VM
    /// moved from a to b with a progress bar; both summarised
    Demo(DemoArgs),
    /// Benchmarks
    #[command(subcommand)]
    Bench(Bench),
    /// A cluster of nodes in the background, linked for migration
    #[command(subcommand)]
    Cluster(Cluster),
    /// The management client (the same as the hvctl binary)
    Hvctl(Box<crate::hvctl::Cli>),
    /// The whole suite: setup, fmt, clippy (host and bare-metal), host tests,
    /// fuzzing, guest tests
    Test,
    /// Run the cargo-fuzz targets for a bounded time each (the nightly and
    /// cargo-fuzz are installed by setup)
    Fuzz(FuzzArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions {
        /// The shell to complete for
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `--arch`: parsed by [`Arch`]'s `FromStr` (its message names every
/// path); the names are offered to help and completions.
#[derive(Clone)]
pub struct ArchParser;

impl TypedValueParser for ArchParser {
    type Value = Arch;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<Arch, clap::Error> {
        let text = value.to_str().ok_or_else(|| {
            clap::Error::raw(clap::error::ErrorKind::InvalidUtf8, "--arch is not UTF-8\n")
                .with_cmd(cmd)
        })?;
        text.parse::<Arch>().map_err(|e| {
            clap::Error::raw(clap::error::ErrorKind::InvalidValue, format!("{e}\n")).with_cmd(cmd)
        })
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(
            [Arch::Svm, Arch::Vmx, Arch::SvmBochs]
                .into_iter()
                .map(|a| PossibleValue::new(a.name()).help(a.describe())),
        ))
    }
}

/// A positive whole number (counts, seconds, MiB).
fn positive(s: &str) -> Result<u64, String> {
    s.parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("needs a positive whole number, got {s:?}"))
}

/// One word of case names (`hello` or `hello,cpuid`), checked.
fn case_word(s: &str) -> Result<String, String> {
    for name in s.split(',').filter(|n| !n.is_empty()) {
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "bad case name {name:?} (letters, digits, '-' and '_' only)"
            ));
        }
    }
    Ok(s.to_string())
}

/// The virtualization path of a boot.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct ArchArg {
    /// Virtualization path: AMD-V under QEMU, Intel VT-x under Bochs, AMD-V
    /// under Bochs
    #[arg(long, value_name = "ARCH", default_value = "svm", value_parser = ArchParser)]
    pub arch: Arch,
}

/// How QEMU runs the node's CPU.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct AccelArg {
    /// QEMU accelerator: tcg (emulated AMD-V, any host) or kvm (`-cpu host`
    /// under nested KVM: the host's own VT-x or AMD-V; needs /dev/kvm and the
    /// kvm_intel/kvm_amd `nested` parameter)
    #[arg(long, value_name = "ACCEL", value_enum, default_value_t = Accel::Tcg)]
    pub accel: Accel,
}

/// Whether to build the images first.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct BuildArg {
    /// Use the images already built
    #[arg(long)]
    pub no_build: bool,
}

impl BuildArg {
    pub fn build(&self) -> bool {
        !self.no_build
    }
}

#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct NodeArgs {
    #[command(flatten)]
    pub arch: ArchArg,
    #[command(flatten)]
    pub accel: AccelArg,
    /// The node command line, e.g. "mode=test tests=hello log=debug" (the
    /// default runs a heartbeat VM for ever)
    #[arg(
        long,
        value_name = "ARGS",
        default_value = "",
        allow_hyphen_values = true
    )]
    pub append: String,
    /// Node RAM in MiB
    #[arg(long = "memory", value_name = "MIB", default_value_t = crate::qemu::DEFAULT_MEMORY_MIB, value_parser = positive)]
    pub memory_mib: u64,
    /// Stop the node after S seconds
    #[arg(long, value_name = "S", value_parser = positive)]
    pub timeout: Option<u64>,
    #[command(flatten)]
    pub build: BuildArg,
}

#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct GuestTestArgs {
    #[command(flatten)]
    pub arch: ArchArg,
    #[command(flatten)]
    pub accel: AccelArg,
    /// Cases to run, as words or comma-separated (all when none are named)
    #[arg(value_name = "CASE", value_parser = case_word)]
    pub cases: Vec<String>,
    /// Give up after S seconds (Bochs gets at least its own minimum)
    #[arg(long, value_name = "S", default_value_t = DEFAULT_TEST_TIMEOUT_SECS, value_parser = positive)]
    pub timeout: u64,
    #[command(flatten)]
    pub build: BuildArg,
}

impl GuestTestArgs {
    /// The named cases, split at commas, each once, in order.
    pub fn case_names(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for name in self
            .cases
            .iter()
            .flat_map(|w| w.split(','))
            .filter(|n| !n.is_empty())
        {
            if !out.iter().any(|c| c == name) {
                out.push(name.to_string());
            }
        }
        out
    }
}

#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct DemoArgs {
    #[command(flatten)]
    pub arch: ArchArg,
    #[command(flatten)]
    pub accel: AccelArg,
    /// Watch act 1's node for at most S seconds
    #[arg(long, value_name = "S", default_value_t = DEFAULT_DEMO_SECONDS, value_parser = positive)]
    pub seconds: u64,
    /// Run only this act: 1 (one node: dirty rate, a migration within it)
    /// or 2 (two nodes: a busy VM moved from a to b)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=2))]
    pub act: Option<u8>,
    #[command(flatten)]
    pub build: BuildArg,
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Bench {
    /// Hypercall vs raw VMRUN round trips per second
    Exits {
        #[command(flatten)]
        arch: ArchArg,
        /// Give up after S seconds
        #[arg(long, value_name = "S", default_value_t = DEFAULT_BENCH_TIMEOUT_SECS, value_parser = positive)]
        timeout: u64,
        #[command(flatten)]
        build: BuildArg,
    },
    /// Cost of dirty tracking a page-rewriting guest: untracked, write
    /// protection and (where the CPU has it, e.g. --arch vmx) PML, side by
    /// side
    Dirty {
        #[command(flatten)]
        arch: ArchArg,
        /// Give up after S seconds
        #[arg(long, value_name = "S", default_value_t = DEFAULT_BENCH_DIRTY_TIMEOUT_SECS, value_parser = positive)]
        timeout: u64,
        #[command(flatten)]
        build: BuildArg,
    },
    /// N MiB from node a to node b over TCP, next to the link's raw frame
    /// rate (boots a cluster for the run if none is up)
    Link {
        /// MiB to send over TCP
        #[arg(long, value_name = "N", default_value_t = BENCH_DEFAULT_MIB, value_parser = positive)]
        mib: u64,
        /// Raw frames to send first
        #[arg(long, value_name = "N", default_value_t = BENCH_DEFAULT_FRAMES, value_parser = positive)]
        frames: u64,
        #[command(flatten)]
        state: StateDirArg,
        #[command(flatten)]
        build: BuildArg,
    },
    /// Live migration between two nodes: a 64 MiB and a 256 MiB VM, idle
    /// and busy, each moved from node a to b; total time, downtime (the
    /// report's and the largest heartbeat gap), bytes per RAM, pre-copy
    /// rate against the TCP rate of the same link (boots a cluster for the
    /// run if none is up)
    Migrate {
        /// One JSON object per scenario
        #[arg(long)]
        json: bool,
        /// Move in verification mode (vm-move's default: both nodes hash
        /// the whole memory during the pause); without it the moves check
        /// what QEMU's own migration checks, nothing beyond the stream
        #[arg(long)]
        verify: bool,
        #[command(flatten)]
        state: StateDirArg,
        #[command(flatten)]
        build: BuildArg,
    },
    /// One VM (64 MiB, a 256 MiB disk with 128 MiB written) moved from
    /// node a to b by each mode: shared-store live migration,
    /// shared-nothing (--include-storage), quick (--quick); total time,
    /// downtime (heartbeat gap and the report's), bytes over the link,
    /// whether shared-store < shared-nothing < quick in downtime (boots a
    /// cluster for the run if none is up)
    Modes {
        /// One JSON object per mode
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateDirArg,
        #[command(flatten)]
        build: BuildArg,
    },
    /// Storage live migration on node a: a 1 GiB VHDX holding 512 MiB
    /// (written by its disk-verify guest) moved between two stores with
    /// the guest writing, then idle; MB/s next to the node's plain 9P copy
    /// and qemu-img convert, allocated sizes (boots a cluster for the run
    /// if none is up)
    Storage {
        /// One JSON object per scenario
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateDirArg,
        #[command(flatten)]
        build: BuildArg,
    },
}

/// Where the cluster keeps its state.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct StateDirArg {
    /// Cluster state directory (default target/cluster, or
    /// $HVMIGRATE_CLUSTER_DIR)
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<String>,
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Cluster {
    /// Boot N nodes (named a, b, ...) in the background, linked for
    /// migration; returns when every node answers its management API
    Up {
        /// How many nodes (1 to 8)
        #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=crate::cluster::NODES_MAX as u64))]
        nodes: u64,
        #[command(flatten)]
        arch: ArchArg,
        #[command(flatten)]
        accel: AccelArg,
        #[command(flatten)]
        state: StateDirArg,
        #[command(flatten)]
        build: BuildArg,
    },
    /// Name, state and management address of each node
    Status {
        /// One JSON array instead of the table
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Stop the nodes (their logs stay)
    Down {
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Cut or restore a node's migration link at the relay (fault
    /// injection: its frames are dropped both ways while cut)
    #[command(subcommand)]
    Link(LinkCmd),
    /// Power a node off abruptly (its QEMU is killed: no shutdown)
    Kill {
        /// The node's name
        name: String,
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Boot a node that is not running again, empty, with the same
    /// addresses, ports and key; returns when it answers
    Start {
        /// The node's name
        name: String,
        /// Boot it with a fresh random key instead of the cluster's (fault
        /// injection: the other nodes must refuse to migrate to it; hvctl
        /// --node NAME uses that key)
        #[arg(long)]
        wrong_key: bool,
        #[command(flatten)]
        state: StateDirArg,
    },
    /// The migration-link relay of a cluster (started by `cluster up`)
    #[command(hide = true)]
    Relay {
        /// How many nodes (a, b, ...)
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=crate::cluster::NODES_MAX as u64))]
        nodes: u64,
        #[command(flatten)]
        state: StateDirArg,
    },
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum LinkCmd {
    /// Cut the node's migration link: its frames and frames for it are
    /// dropped, as if its cable were pulled
    Cut {
        /// The node's name
        #[arg(long, value_name = "NAME")]
        node: String,
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Restore the node's migration link
    Restore {
        /// The node's name
        #[arg(long, value_name = "NAME")]
        node: String,
        #[command(flatten)]
        state: StateDirArg,
    },
}

#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct FuzzArgs {
    /// Seconds of fuzzing per target (after its build and regression replay)
    #[arg(long, value_name = "N", default_value_t = DEFAULT_FUZZ_SECONDS, value_parser = positive)]
    pub seconds: u64,
    /// Targets to run, as NAME or CRATE/NAME (all discovered ones when none
    /// are named)
    #[arg(value_name = "TARGET")]
    pub targets: Vec<String>,
}

impl Command {
    /// The path this command boots, if it boots one.
    pub fn arch(&self) -> Option<Arch> {
        match self {
            Command::Node(a) => Some(a.arch.arch),
            Command::GuestTest(a) => Some(a.arch.arch),
            Command::Demo(a) => Some(a.arch.arch),
            Command::Bench(Bench::Exits { arch, .. } | Bench::Dirty { arch, .. }) => {
                Some(arch.arch)
            }
            _ => None,
        }
    }
}

/// Parse the arguments after the program name.
pub fn parse<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Cli::try_parse_from(
        std::iter::once("qemu-runner".into()).chain(args.into_iter().map(Into::into)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn p(line: &str) -> Result<Command, String> {
        parse(line.split_whitespace())
            .map(|c| c.command.expect("a command"))
            .map_err(|e| e.to_string())
    }

    fn usage_error(line: &str) -> String {
        let e = parse(line.split_whitespace()).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{line}: {e}");
        e.to_string()
    }

    #[test]
    fn guest_test() {
        let Command::GuestTest(g) = p("guest-test --arch svm hello cpuid").unwrap() else {
            panic!()
        };
        assert_eq!(g.arch.arch, Arch::Svm);
        assert_eq!(g.case_names(), ["hello", "cpuid"]);
        assert_eq!(g.timeout, DEFAULT_TEST_TIMEOUT_SECS);
        assert!(g.build.build());
        let Command::GuestTest(g) =
            p("guest-test hello,dirty-log --timeout=60 --no-build hello").unwrap()
        else {
            panic!()
        };
        assert_eq!(g.case_names(), ["hello", "dirty-log"]);
        assert_eq!((g.timeout, g.build.build()), (60, false));
        assert!(matches!(p("guest-test"), Ok(Command::GuestTest(g)) if g.case_names().is_empty()));
        assert!(usage_error("guest-test tests=all").contains("bad case name"));
    }

    #[test]
    fn arch_keeps_its_message() {
        assert_eq!(p("guest-test --arch vmx").unwrap().arch(), Some(Arch::Vmx));
        assert_eq!(
            p("bench exits --arch svm-bochs").unwrap().arch(),
            Some(Arch::SvmBochs)
        );
        assert!(usage_error("guest-test --arch arm")
            .contains("unknown --arch \"arm\" (expected one of: svm, vmx, svm-bochs)"));
        assert!(usage_error("guest-test --arch").contains("a value is required"));
    }

    #[test]
    fn node() {
        let Command::Node(n) =
            p("node --arch svm --append mode=demo --memory 512 --timeout 10").unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (n.append.as_str(), n.memory_mib, n.timeout),
            ("mode=demo", 512, Some(10))
        );
        let Command::Node(n) = parse(["node", "--append", "mode=test tests=hello log=debug"])
            .unwrap()
            .command
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(n.append, "mode=test tests=hello log=debug");
        assert_eq!((n.timeout, n.memory_mib), (None, 1024));
        assert_eq!(n.accel.accel, Accel::Tcg);
        assert!(usage_error("node --memory 0").contains("positive"));
        usage_error("node extra");
    }

    #[test]
    fn accel_on_the_four_boot_commands() {
        for line in [
            "node --accel kvm",
            "guest-test --accel kvm hello",
            "demo --accel kvm",
            "cluster up --accel kvm",
        ] {
            let cmd = p(line).unwrap();
            let accel = match &cmd {
                Command::Node(a) => a.accel.accel,
                Command::GuestTest(a) => a.accel.accel,
                Command::Demo(a) => a.accel.accel,
                Command::Cluster(Cluster::Up { accel, .. }) => accel.accel,
                _ => unreachable!(),
            };
            assert_eq!(accel, Accel::Kvm, "{line}");
        }
        assert!(usage_error("node --accel hvf").contains("invalid value"));
        usage_error("bench exits --accel kvm");
    }

    #[test]
    fn bench_demo_test_setup_build() {
        assert!(matches!(
            p("bench exits --arch svm"),
            Ok(Command::Bench(Bench::Exits {
                timeout: DEFAULT_BENCH_TIMEOUT_SECS,
                ..
            }))
        ));
        usage_error("bench");
        usage_error("bench other");
        assert!(matches!(
            p("bench dirty --arch vmx"),
            Ok(Command::Bench(Bench::Dirty { timeout: DEFAULT_BENCH_DIRTY_TIMEOUT_SECS, arch, .. })) if arch.arch == Arch::Vmx
        ));
        assert!(matches!(
            p("bench link --mib 8"),
            Ok(Command::Bench(Bench::Link {
                mib: 8,
                frames: BENCH_DEFAULT_FRAMES,
                ..
            }))
        ));
        assert!(matches!(
            p("bench migrate --json"),
            Ok(Command::Bench(Bench::Migrate { json: true, .. }))
        ));
        assert!(matches!(
            p("bench modes --json"),
            Ok(Command::Bench(Bench::Modes { json: true, .. }))
        ));
        assert!(matches!(
            p("bench storage --json --state-dir /x"),
            Ok(Command::Bench(Bench::Storage { json: true, state, .. })) if state.state_dir.as_deref() == Some("/x")
        ));
        assert!(matches!(p("demo"), Ok(Command::Demo(d)) if d.seconds == DEFAULT_DEMO_SECONDS));
        assert!(
            matches!(p("demo --seconds 5"), Ok(Command::Demo(d)) if d.seconds == 5 && d.act.is_none())
        );
        assert!(matches!(p("demo --act 2"), Ok(Command::Demo(d)) if d.act == Some(2)));
        usage_error("demo --act 3");
        usage_error("demo --act 0");
        assert_eq!(p("test"), Ok(Command::Test));
        assert_eq!(p("setup"), Ok(Command::Setup));
        assert_eq!(p("build"), Ok(Command::Build));
        assert!(usage_error("test --timeout 5").contains("--timeout"));
        usage_error("demo --memory 5");
        assert!(matches!(
            p("fuzz --seconds 3 decode vstorage/vhdx_open"),
            Ok(Command::Fuzz(f)) if f.seconds == 3 && f.targets == ["decode", "vstorage/vhdx_open"]
        ));
        assert!(matches!(p("fuzz"), Ok(Command::Fuzz(f)) if f.seconds == DEFAULT_FUZZ_SECONDS));
    }

    #[test]
    fn cluster_and_hvctl() {
        assert!(matches!(
            p("cluster up --nodes 3 --state-dir /s --no-build"),
            Ok(Command::Cluster(Cluster::Up { nodes: 3, state, build, .. }))
                if state.state_dir.as_deref() == Some("/s") && !build.build()
        ));
        usage_error("cluster up --nodes 9");
        usage_error("cluster up --nodes 0");
        assert!(matches!(
            p("cluster status --json"),
            Ok(Command::Cluster(Cluster::Status { json: true, .. }))
        ));
        assert!(matches!(
            p("cluster down --state-dir /s"),
            Ok(Command::Cluster(Cluster::Down { .. }))
        ));
        assert!(matches!(
            p("cluster relay --nodes 3 --state-dir /s"),
            Ok(Command::Cluster(Cluster::Relay { nodes: 3, .. }))
        ));
        assert!(matches!(
            p("cluster link cut --node b"),
            Ok(Command::Cluster(Cluster::Link(LinkCmd::Cut { node, .. }))) if node == "b"
        ));
        assert!(matches!(
            p("cluster link restore --node b --state-dir /s"),
            Ok(Command::Cluster(Cluster::Link(LinkCmd::Restore { node, state }))) if node == "b" && state.state_dir.as_deref() == Some("/s")
        ));
        assert!(matches!(
            p("cluster kill b"),
            Ok(Command::Cluster(Cluster::Kill { name, .. })) if name == "b"
        ));
        assert!(matches!(
            p("cluster start b"),
            Ok(Command::Cluster(Cluster::Start { name, wrong_key: false, .. })) if name == "b"
        ));
        assert!(matches!(
            p("cluster start b --wrong-key"),
            Ok(Command::Cluster(Cluster::Start {
                wrong_key: true,
                ..
            }))
        ));
        usage_error("cluster link cut");
        usage_error("cluster kill");
        // hvctl's own options may come before or after its command.
        let Command::Hvctl(h) = p("hvctl --state-dir /s --node b vm list --json").unwrap() else {
            panic!()
        };
        assert_eq!((h.node.as_deref(), h.json), (Some("b"), true));
    }

    #[test]
    fn help_and_errors() {
        assert_eq!(parse(Vec::<String>::new()).unwrap().command, None);
        for line in [
            "--help",
            "guest-test -h",
            "help guest-test",
            "help cluster up",
        ] {
            let e = parse(line.split_whitespace()).unwrap_err();
            assert_eq!(e.exit_code(), 0, "{line}");
            assert!(e.to_string().contains("Usage: qemu-runner"), "{line}: {e}");
        }
        assert!(usage_error("launch").contains("unrecognized subcommand"));
        assert!(usage_error("guest-test --bogus").contains("unexpected argument"));
    }

    /// Every command and subcommand has generated help that names it, its
    /// options and their meaning.
    #[test]
    fn every_subcommand_has_help() {
        fn walk(cmd: &mut clap::Command, path: &mut Vec<String>, seen: &mut usize) {
            let help = cmd.render_long_help().to_string();
            assert!(help.contains("Usage:"), "{path:?}:\n{help}");
            if !path.is_empty() {
                assert!(
                    cmd.get_about().is_some(),
                    "{path:?} has no description:\n{help}"
                );
            }
            for arg in cmd.get_arguments() {
                if arg.is_hide_set() || ["help", "version"].contains(&arg.get_id().as_str()) {
                    continue;
                }
                assert!(
                    arg.get_help().is_some(),
                    "{path:?} argument {} has no help",
                    arg.get_id()
                );
            }
            *seen += 1;
            let names: Vec<String> = cmd
                .get_subcommands()
                .map(|s| s.get_name().to_string())
                .collect();
            for name in names {
                let sub = cmd.find_subcommand_mut(&name).unwrap();
                path.push(name);
                walk(sub, path, seen);
                path.pop();
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let mut seen = 0;
        walk(&mut cmd, &mut Vec::new(), &mut seen);
        // qemu-runner's 12 commands, 6 bench, 4 cluster, hvctl's tree, help.
        assert!(seen > 30, "{seen}");
        let node = Cli::command()
            .find_subcommand_mut("node")
            .unwrap()
            .render_long_help()
            .to_string();
        for flag in [
            "--arch",
            "--accel",
            "--append",
            "--memory",
            "--timeout",
            "--no-build",
        ] {
            assert!(node.contains(flag), "{flag} missing in:\n{node}");
        }
        assert!(node.contains("svm-bochs"), "{node}");
    }

    #[test]
    fn completions_generate() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "qemu-runner", &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.contains("guest-test") && text.contains("accel"),
                "{shell}"
            );
        }
    }
}
