//! The command line: `qemu-runner COMMAND [OPTIONS] [ARGS]`. Hand-rolled
//! (a handful of flags do not warrant a parser dependency) and unit-tested.

use std::time::Duration;

use crate::arch::Arch;

/// Default `guest-test` timeout: generous, TCG is slow and CI shares cores.
pub const DEFAULT_TEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Default `bench exits` timeout.
pub const DEFAULT_BENCH_TIMEOUT: Duration = Duration::from_secs(180);
/// Default `bench dirty` timeout (three 2 s windows of node time, which
/// take minutes of wall time under Bochs).
pub const DEFAULT_BENCH_DIRTY_TIMEOUT: Duration = Duration::from_secs(900);
/// How long `demo` watches the node unless told otherwise.
pub const DEFAULT_DEMO_SECONDS: u64 = 30;

pub const USAGE: &str = "\
usage: cargo run -p qemu-runner -- COMMAND [OPTIONS]

commands:
  setup                          check the Debian packages (QEMU, Bochs, GRUB
                                 tools); installs them when run as root
  build                          build the hypervisor image and the guest kernel
  node [--arch svm] [--append ARGS] [--memory MIB] [--timeout S]
                                 boot one node, serial console on the terminal
                                 (no timeout unless --timeout is given)
  guest-test [--arch svm] [CASE...] [--timeout S]
                                 boot a node that runs the guest test cases
                                 (all when none are named) and summarise them
  demo [--seconds S]             install/build as needed, boot the demo node and
                                 summarise the dirty-page rate it tracks
  bench exits [--arch svm] [--timeout S]
                                 hypercall vs raw VMRUN round trips per second
  bench dirty [--arch vmx] [--timeout S]
                                 cost of dirty tracking a page-rewriting guest:
                                 untracked, write protection and (where the CPU
                                 has it, e.g. --arch vmx) PML, side by side
  cluster up [--nodes N] [--arch svm] [--no-build] [--state-dir DIR]
                                 boot N nodes (default 2, named a, b) in the
                                 background, linked for migration; returns
                                 when every node answers its management API
  cluster status [--json]        name, state, management address per node
  cluster down                   stop the nodes (their logs stay)
  bench link [--mib N] [--frames N]
                                 N MiB (default 64) from node a to node b over
                                 TCP, next to the link's raw frame rate
                                 (boots a cluster for the run if none is up)
  hvctl ARGS                     the management client (same as the hvctl
                                 binary; `hvctl --help`)
  test                           the whole suite: setup check, fmt, clippy (host
                                 and bare-metal), host tests, guest tests

options:
  --arch svm|vmx|svm-bochs       virtualization path: AMD-V under QEMU (default),
                                 Intel VT-x under Bochs, AMD-V under Bochs
  --no-build                     use the images already built
  -h, --help                     this text

cases: hello cpuid memory dirty-log bad-msr triple-fault two-vms
       local-migrate-idle local-migrate-busy local-migrate-abort local-migrate-converge";

/// A parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cmd {
    Help,
    Setup,
    Build,
    Node {
        arch: Arch,
        append: String,
        memory_mib: u64,
        timeout: Option<Duration>,
        build: bool,
    },
    GuestTest {
        arch: Arch,
        cases: Vec<String>,
        timeout: Duration,
        build: bool,
    },
    Demo {
        arch: Arch,
        seconds: u64,
        build: bool,
    },
    BenchExits {
        arch: Arch,
        timeout: Duration,
        build: bool,
    },
    BenchDirty {
        arch: Arch,
        timeout: Duration,
        build: bool,
    },
    Test,
}

/// Options seen on the command line (each subcommand accepts a subset).
#[derive(Default)]
struct Opts {
    arch: Option<Arch>,
    append: Option<String>,
    memory_mib: Option<u64>,
    timeout: Option<Duration>,
    seconds: Option<u64>,
    no_build: bool,
    help: bool,
    positional: Vec<String>,
    seen: Vec<&'static str>,
}

fn parse_number(flag: &str, value: &str) -> Result<u64, String> {
    value
        .parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{flag} needs a positive whole number, got {value:?}"))
}

fn parse_opts(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--" {
            o.positional.extend(it.by_ref().cloned());
            break;
        }
        if !arg.starts_with('-') || arg == "-" {
            o.positional.push(arg.clone());
            continue;
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value")),
            }
        };
        match flag {
            "--arch" => {
                o.arch = Some(value("--arch")?.parse()?);
                o.seen.push("--arch");
            }
            "--append" => {
                o.append = Some(value("--append")?);
                o.seen.push("--append");
            }
            "--memory" => {
                o.memory_mib = Some(parse_number("--memory", &value("--memory")?)?);
                o.seen.push("--memory");
            }
            "--timeout" => {
                o.timeout = Some(Duration::from_secs(parse_number(
                    "--timeout",
                    &value("--timeout")?,
                )?));
                o.seen.push("--timeout");
            }
            "--seconds" => {
                o.seconds = Some(parse_number("--seconds", &value("--seconds")?)?);
                o.seen.push("--seconds");
            }
            "--no-build" if inline.is_none() => {
                o.no_build = true;
                o.seen.push("--no-build");
            }
            "-h" | "--help" if inline.is_none() => o.help = true,
            _ => return Err(format!("unknown option {arg:?}")),
        }
    }
    Ok(o)
}

fn only(o: &Opts, command: &str, allowed: &[&str]) -> Result<(), String> {
    match o.seen.iter().find(|f| !allowed.contains(f)) {
        Some(f) => Err(format!("{command} does not take {f}")),
        None => Ok(()),
    }
}

fn no_positional(o: &Opts, command: &str) -> Result<(), String> {
    match o.positional.first() {
        Some(p) => Err(format!("{command} takes no argument {p:?}")),
        None => Ok(()),
    }
}

/// Case names from positional words (`hello cpuid` or `hello,cpuid`).
fn case_names(words: &[String]) -> Result<Vec<String>, String> {
    let mut cases = Vec::new();
    for name in words
        .iter()
        .flat_map(|w| w.split(','))
        .filter(|n| !n.is_empty())
    {
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "bad case name {name:?} (letters, digits, '-' and '_' only)"
            ));
        }
        if !cases.iter().any(|c| c == name) {
            cases.push(name.to_string());
        }
    }
    Ok(cases)
}

/// Parse the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Cmd, String> {
    let Some((command, rest)) = args.split_first() else {
        return Ok(Cmd::Help);
    };
    let o = parse_opts(rest)?;
    if o.help || command == "help" || command == "-h" || command == "--help" {
        return Ok(Cmd::Help);
    }
    let arch = o.arch.unwrap_or(Arch::Svm);
    let build = !o.no_build;
    match command.as_str() {
        "setup" => {
            only(&o, "setup", &[])?;
            no_positional(&o, "setup")?;
            Ok(Cmd::Setup)
        }
        "build" => {
            only(&o, "build", &[])?;
            no_positional(&o, "build")?;
            Ok(Cmd::Build)
        }
        "node" => {
            only(
                &o,
                "node",
                &["--arch", "--append", "--memory", "--timeout", "--no-build"],
            )?;
            no_positional(&o, "node")?;
            Ok(Cmd::Node {
                arch,
                append: o.append.unwrap_or_default(),
                memory_mib: o.memory_mib.unwrap_or(crate::qemu::DEFAULT_MEMORY_MIB),
                timeout: o.timeout,
                build,
            })
        }
        "guest-test" => {
            only(&o, "guest-test", &["--arch", "--timeout", "--no-build"])?;
            Ok(Cmd::GuestTest {
                arch,
                cases: case_names(&o.positional)?,
                timeout: o.timeout.unwrap_or(DEFAULT_TEST_TIMEOUT),
                build,
            })
        }
        "demo" => {
            only(&o, "demo", &["--arch", "--seconds", "--no-build"])?;
            no_positional(&o, "demo")?;
            Ok(Cmd::Demo {
                arch,
                seconds: o.seconds.unwrap_or(DEFAULT_DEMO_SECONDS),
                build,
            })
        }
        "bench" => {
            only(&o, "bench", &["--arch", "--timeout", "--no-build"])?;
            match o.positional.as_slice() {
                [what] if what == "exits" => Ok(Cmd::BenchExits {
                    arch,
                    timeout: o.timeout.unwrap_or(DEFAULT_BENCH_TIMEOUT),
                    build,
                }),
                [what] if what == "dirty" => Ok(Cmd::BenchDirty {
                    arch,
                    timeout: o.timeout.unwrap_or(DEFAULT_BENCH_DIRTY_TIMEOUT),
                    build,
                }),
                _ => {
                    Err("bench needs a benchmark name: `bench exits` or `bench dirty`".to_string())
                }
            }
        }
        "test" => {
            only(&o, "test", &[])?;
            no_positional(&o, "test")?;
            Ok(Cmd::Test)
        }
        other => Err(format!("unknown command {other:?}")),
    }
}

impl Cmd {
    /// The path this command boots, if it boots one.
    pub fn arch(&self) -> Option<Arch> {
        match self {
            Cmd::Node { arch, .. }
            | Cmd::GuestTest { arch, .. }
            | Cmd::Demo { arch, .. }
            | Cmd::BenchExits { arch, .. }
            | Cmd::BenchDirty { arch, .. } => Some(*arch),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(line: &str) -> Result<Cmd, String> {
        let args: Vec<String> = line.split_whitespace().map(String::from).collect();
        parse(&args)
    }

    #[test]
    fn guest_test() {
        assert_eq!(
            p("guest-test --arch svm hello cpuid"),
            Ok(Cmd::GuestTest {
                arch: Arch::Svm,
                cases: vec!["hello".into(), "cpuid".into()],
                timeout: DEFAULT_TEST_TIMEOUT,
                build: true
            })
        );
        assert_eq!(
            p("guest-test hello,dirty-log --timeout=60 --no-build hello"),
            Ok(Cmd::GuestTest {
                arch: Arch::Svm,
                cases: vec!["hello".into(), "dirty-log".into()],
                timeout: Duration::from_secs(60),
                build: false
            })
        );
        assert!(matches!(p("guest-test"), Ok(Cmd::GuestTest { cases, .. }) if cases.is_empty()));
        assert!(p("guest-test 'bad name'").is_err());
        assert!(p("guest-test tests=all")
            .unwrap_err()
            .contains("bad case name"));
    }

    #[test]
    fn arch_is_an_enum() {
        assert_eq!(p("guest-test --arch vmx").unwrap().arch(), Some(Arch::Vmx));
        assert_eq!(
            p("bench exits --arch svm-bochs").unwrap().arch(),
            Some(Arch::SvmBochs)
        );
        assert!(p("guest-test --arch arm")
            .unwrap_err()
            .contains("unknown --arch"));
        assert!(p("guest-test --arch")
            .unwrap_err()
            .contains("needs a value"));
    }

    #[test]
    fn node() {
        assert_eq!(
            p("node --arch svm --append mode=demo --memory 512 --timeout 10"),
            Ok(Cmd::Node {
                arch: Arch::Svm,
                append: "mode=demo".into(),
                memory_mib: 512,
                timeout: Some(Duration::from_secs(10)),
                build: true
            })
        );
        let args: Vec<String> = ["node", "--append", "mode=test tests=hello log=debug"]
            .map(String::from)
            .into();
        assert!(
            matches!(parse(&args), Ok(Cmd::Node { append, timeout: None, memory_mib: 1024, .. })
            if append == "mode=test tests=hello log=debug")
        );
        assert!(p("node --memory 0").unwrap_err().contains("positive"));
        assert!(p("node extra").is_err());
    }

    #[test]
    fn bench_demo_test_setup_build() {
        assert!(matches!(
            p("bench exits --arch svm"),
            Ok(Cmd::BenchExits {
                arch: Arch::Svm,
                ..
            })
        ));
        assert!(p("bench").is_err());
        assert!(p("bench other").is_err());
        assert_eq!(
            p("bench dirty --arch vmx"),
            Ok(Cmd::BenchDirty {
                arch: Arch::Vmx,
                timeout: DEFAULT_BENCH_DIRTY_TIMEOUT,
                build: true
            })
        );
        assert_eq!(
            p("demo"),
            Ok(Cmd::Demo {
                arch: Arch::Svm,
                seconds: DEFAULT_DEMO_SECONDS,
                build: true
            })
        );
        assert_eq!(
            p("demo --seconds 5").unwrap(),
            Cmd::Demo {
                arch: Arch::Svm,
                seconds: 5,
                build: true
            }
        );
        assert_eq!(p("test"), Ok(Cmd::Test));
        assert_eq!(p("setup"), Ok(Cmd::Setup));
        assert_eq!(p("build"), Ok(Cmd::Build));
        assert!(p("test --timeout 5")
            .unwrap_err()
            .contains("does not take --timeout"));
        assert!(p("demo --memory 5").is_err());
    }

    #[test]
    fn help_and_errors() {
        assert_eq!(p(""), Ok(Cmd::Help));
        assert_eq!(p("--help"), Ok(Cmd::Help));
        assert_eq!(p("guest-test -h"), Ok(Cmd::Help));
        assert!(p("launch").unwrap_err().contains("unknown command"));
        assert!(p("guest-test --bogus")
            .unwrap_err()
            .contains("unknown option"));
    }
}
