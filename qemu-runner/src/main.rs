//! qemu-runner's commands (see `cli::USAGE`); the logic they use lives in
//! the library and is unit-tested there.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser};
use qemu_runner::accel::{self, Accel};
use qemu_runner::arch::{Arch, Emulator};
use qemu_runner::bochs;
use qemu_runner::cargo::{self, Images};
use qemu_runner::cli::{self, Bench, Cli, Command, DEFAULT_TEST_TIMEOUT};
use qemu_runner::cluster;
use qemu_runner::fuzz;
use qemu_runner::markers::{Marker, SerialLog};
use qemu_runner::migration_report;
use qemu_runner::process::{self, Control, RunEnd};
use qemu_runner::qemu::{self, NodeSpec};
use qemu_runner::setup;
use qemu_runner::summary::{self, Outcome, TestSummary, ALL_CASES};

/// Time the node gets to power off after its shutdown marker.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Time after a fault/panic marker to collect the register dump.
const FAULT_GRACE: Duration = Duration::from_secs(3);
/// Time after the node's own totals line for it to shut down.
const TOTALS_GRACE: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with status 0; usage errors to
            // stderr with status 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let Some(cmd) = cli.command else {
        let _ = Cli::command().print_help();
        return ExitCode::SUCCESS;
    };
    if let Some(arch) = cmd.arch() {
        if let Err(e) = arch.supported() {
            eprintln!("qemu-runner: {e}");
            return ExitCode::from(2);
        }
    }
    let result = match cmd {
        Command::Setup => setup::ensure(setup::Needs::All).map(|what| {
            println!("setup: {what}");
            true
        }),
        Command::Build => cargo::build().map(|images| {
            println!("hypervisor image: {}", images.hypervisor.display());
            println!("guest kernel:     {}", images.guest_kernel.display());
            true
        }),
        Command::Node(a) => node(
            a.arch.arch,
            a.accel.accel,
            &a.append,
            a.memory_mib,
            a.timeout.map(Duration::from_secs),
            a.build.build(),
        ),
        Command::GuestTest(a) => guest_test(
            a.arch.arch,
            a.accel.accel,
            &a.case_names(),
            Duration::from_secs(a.timeout),
            a.build.build(),
        ),
        Command::Demo(a) => demo(
            a.arch.arch,
            a.accel.accel,
            a.seconds,
            a.act,
            a.build.build(),
        ),
        Command::Bench(Bench::Dirty {
            arch,
            timeout,
            build,
        }) => bench_dirty(arch.arch, Duration::from_secs(timeout), build.build()),
        Command::Bench(Bench::Exits {
            arch,
            timeout,
            build,
        }) => bench_exits(arch.arch, Duration::from_secs(timeout), build.build()),
        Command::Bench(Bench::Link {
            mib,
            frames,
            state,
            build,
        }) => exit_with(cluster::run_bench_link(
            mib,
            frames,
            state.state_dir.as_deref(),
            build.build(),
        )),
        Command::Bench(Bench::Migrate {
            json,
            verify,
            state,
            build,
        }) => exit_with(qemu_runner::bench_migrate::run(
            state.state_dir.as_deref(),
            json,
            verify,
            build.build(),
        )),
        Command::Bench(Bench::Modes { json, state, build }) => exit_with(
            qemu_runner::bench_modes::run(state.state_dir.as_deref(), json, build.build()),
        ),
        Command::Bench(Bench::Storage { json, state, build }) => exit_with(
            qemu_runner::bench_storage::run(state.state_dir.as_deref(), json, build.build()),
        ),
        Command::Cluster(c) => exit_with(cluster::run_cli(&c)),
        Command::Hvctl(h) => return ExitCode::from(qemu_runner::hvctl::run_cli(&h)),
        Command::Test => Ok(test_suite()),
        Command::Fuzz(f) => {
            fuzz::run(&f.targets, Duration::from_secs(f.seconds)).map(|r| r.passed())
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "qemu-runner",
                &mut std::io::stdout(),
            );
            Ok(true)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("qemu-runner: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A command that reports its own exit status: `Ok(0)` is success.
fn exit_with(r: Result<u8, String>) -> Result<bool, String> {
    r.map(|code| code == 0)
}

/// A virtualization path with its images: what [`boot`] needs.
struct Target {
    arch: Arch,
    accel: Accel,
    images: Images,
    /// Boot modules after the guest kernel (the Linux image).
    modules: Vec<std::path::PathBuf>,
}

/// The path is supported, its emulator is installed (and, for `--accel
/// kvm`, the host has nested KVM) and the images are built (or, with
/// `build == false`, present).
fn prepare(arch: Arch, accel: Accel, build: bool) -> Result<Target, String> {
    arch.supported()?;
    if accel == Accel::Kvm && arch.emulator() != Emulator::Qemu {
        return Err(format!(
            "--accel kvm runs the node under QEMU on the host's CPU (Intel: VT-x, AMD: AMD-V);              --arch {arch} boots under Bochs, which has no KVM: leave --arch out"
        ));
    }
    accel::check(accel)?;
    match arch.emulator() {
        Emulator::Qemu => {
            if !qemu::available() {
                return Err(format!(
                    "{} not found; install the emulators with `cargo run -p qemu-runner -- setup` (as root)",
                    qemu::QEMU
                ));
            }
        }
        Emulator::Bochs => {
            if !bochs::available() {
                return Err(format!(
                    "{} or {} not found; install the emulators with `cargo run -p qemu-runner -- setup` (as root)",
                    bochs::BOCHS,
                    bochs::GRUB_MKRESCUE
                ));
            }
        }
    }
    let images = if build {
        cargo::build()?
    } else {
        let images = Images::locate()?;
        images.check()?;
        images
    };
    Ok(Target {
        arch,
        accel,
        images,
        modules: Vec::new(),
    })
}

/// Boot one node and feed its serial lines to `on_line` (after `log`
/// recorded them). Returns how the run ended and the folded log.
fn boot(
    target: &Target,
    cmdline: &str,
    memory_mib: u64,
    timeout: Option<Duration>,
    mut on_line: impl FnMut(&str, &Marker, &SerialLog) -> Control,
) -> Result<(RunEnd, SerialLog), String> {
    let spec = NodeSpec {
        hypervisor: target.images.hypervisor.clone(),
        guest_kernel: target.images.guest_kernel.clone(),
        modules: target.modules.clone(),
        cmdline: cmdline.to_string(),
        memory_mib,
        accel: target.accel,
    };
    // Lives until the run ends (its drop removes the ISO and serial file).
    let bochs_run;
    let command = match target.arch.emulator() {
        Emulator::Qemu => {
            eprintln!("qemu-runner: {}", qemu::display(&spec));
            qemu::command(&spec)
        }
        Emulator::Bochs if !spec.modules.is_empty() => {
            return Err("the Linux guest cases run under QEMU only (--arch svm)".into());
        }
        Emulator::Bochs => {
            let scratch = target
                .images
                .hypervisor
                .parent()
                .map_or_else(std::env::temp_dir, |p| p.to_path_buf());
            bochs_run = bochs::BochsRun::prepare(&spec, target.arch, &scratch)?;
            eprintln!("qemu-runner: {}", bochs_run.display());
            bochs_run.command()
        }
    };
    let mut log = SerialLog::default();
    let end = process::run_streaming(command, timeout, true, |line| {
        let marker = log.push(line);
        let control = match &marker {
            Marker::Shutdown { .. } => Control::StopAfter(SHUTDOWN_GRACE),
            Marker::Fault(_) | Marker::Panic(_) => Control::StopAfter(FAULT_GRACE),
            _ => Control::Continue,
        };
        match on_line(line, &marker, &log) {
            Control::Continue => control,
            asked => asked,
        }
    })
    .map_err(|e| format!("starting the {:?} emulator: {e}", target.arch.emulator()))?;
    if log.lines == 0 {
        eprintln!("qemu-runner: the node printed nothing on its serial port");
    } else if log.node_up.is_none() {
        eprintln!("qemu-runner: the node never printed its `hvmigrate: node ... up` banner");
    }
    Ok((end, log))
}

fn describe_end(end: &RunEnd, log: &SerialLog) -> String {
    let shutdown = log.shutdown.map_or_else(
        || "no shutdown marker".to_string(),
        |c| format!("shutdown code={c}"),
    );
    match end {
        RunEnd::Exited(code) => format!(
            "the emulator exited ({}; {shutdown})",
            code.map_or("signal".into(), |c| format!("code {c}"))
        ),
        RunEnd::TimedOut(t) => format!(
            "timed out after {} s and was killed ({shutdown})",
            t.as_secs()
        ),
        RunEnd::Stopped => format!("stopped by the runner ({shutdown})"),
    }
}

fn node(
    arch: Arch,
    accel: Accel,
    append: &str,
    memory_mib: u64,
    timeout: Option<Duration>,
    build: bool,
) -> Result<bool, String> {
    let target = prepare(arch, accel, build)?;
    let (end, log) = boot(&target, append, memory_mib, timeout, |_, _, _| {
        Control::Continue
    })?;
    eprintln!("qemu-runner: node {}", describe_end(&end, &log));
    // A node that is still running when the timeout ends it is fine (a
    // heartbeat node runs for ever); a fault or a non-zero shutdown is not.
    Ok(log.fault.is_none() && log.shutdown.is_none_or(|code| code == 0))
}

/// `guest-test`: run the cases in one node and judge them. `Ok(true)` only
/// if every requested case passed.
fn guest_test(
    arch: Arch,
    accel: Accel,
    cases: &[String],
    timeout: Duration,
    build: bool,
) -> Result<bool, String> {
    let mut target = prepare(arch, accel, build)?;
    let linux = cases
        .iter()
        .any(|c| hvcore::abi::case::LINUX.contains(&c.as_str()));
    if linux {
        // The Linux cases boot Debian's kernel with the runner's
        // initramfs, passed as boot modules 1 and 2 (built and cached
        // under target/linux-guest/, downloaded on first use).
        if arch.emulator() != Emulator::Qemu {
            return Err("the Linux guest cases run under QEMU only (--arch svm)".into());
        }
        let dir = qemu_runner::cargo::target_dir()?;
        let image = qemu_runner::linux_image::build(&dir, &mut |l| eprintln!("qemu-runner: {l}"))
            .map_err(|e| e.to_string())?;
        eprintln!(
            "qemu-runner: Linux guest {} ({}, {})",
            image.release,
            image.kernel.display(),
            image.initramfs.display()
        );
        target.modules = vec![image.kernel, image.initramfs];
    }
    let (requested, tests): (Vec<String>, String) = if cases.is_empty() {
        (
            ALL_CASES.iter().map(|c| c.to_string()).collect(),
            "all".to_string(),
        )
    } else {
        (cases.to_vec(), cases.join(","))
    };
    let cmdline = format!("mode=test tests={tests}");
    let mut linux_lines: Vec<String> = Vec::new();
    // Bochs runs the suite in minutes where QEMU takes seconds.
    let timeout = match arch.emulator() {
        Emulator::Qemu => timeout,
        Emulator::Bochs => timeout.max(Duration::from_secs(bochs::MIN_TEST_TIMEOUT_SECS)),
    };
    let (end, log) = boot(
        &target,
        &cmdline,
        qemu::DEFAULT_MEMORY_MIB,
        Some(timeout),
        |line, marker, _| {
            if line.starts_with("linux: ") {
                linux_lines.push(line.to_string());
            }
            match marker {
                Marker::Totals { .. } => Control::StopAfter(TOTALS_GRACE),
                _ => Control::Continue,
            }
        },
    )?;
    let verdict = TestSummary::build(&requested, &log, &end.describe());
    println!();
    // The Linux cases' figures (boot time to the shell, the migration).
    for line in linux_lines {
        println!("{line}");
    }
    println!(
        "guest-test --arch {arch}{}: node {}",
        match accel {
            Accel::Tcg => "",
            Accel::Kvm => " --accel kvm",
        },
        describe_end(&end, &log)
    );
    print!("{}", verdict.render());
    Ok(verdict.all_passed())
}

fn demo(
    arch: Arch,
    accel: Accel,
    seconds: u64,
    act: Option<u8>,
    build: bool,
) -> Result<bool, String> {
    let what = setup::ensure(setup::Needs::Boot)?;
    eprintln!("qemu-runner: setup: {what}");
    let target = prepare(arch, accel, build)?;
    let start = Instant::now();
    let one = act.is_none_or(|a| a == 1);
    let two = act.is_none_or(|a| a == 2);
    let first = if one {
        demo_local(&target, accel, seconds)?
    } else {
        true
    };
    let second = if two {
        if arch != Arch::Svm {
            println!("\ndemo: act 2 (two nodes) runs on the svm path only (QEMU)");
            true
        } else {
            if one {
                println!();
            }
            qemu_runner::demo::two_nodes(
                &cluster::Boot {
                    images: target.images.clone(),
                    accel,
                    modules: Vec::new(),
                },
                &qemu_runner::demo::state_dir(),
            )?
        }
    } else {
        true
    };
    if one && two {
        println!(
            "\ndemo: {} in {:.0} s",
            if first && second { "done" } else { "FAILED" },
            start.elapsed().as_secs_f64()
        );
    }
    Ok(first && second)
}

/// Act 1: one node (`mode=demo`) shows the busy guest's dirty rate, then
/// migrates it to a new VM on the same node.
fn demo_local(target: &Target, accel: Accel, seconds: u64) -> Result<bool, String> {
    println!(
        "hvmigrate demo, act 1: booting a node under QEMU ({}).\n\
         Its guest `dirty-demo` increments one byte in every page of a 16 MiB buffer, for ever;\n\
         the hypervisor tracks the pages it dirties (nested page tables write-protected, the\n\
         first write to a page in a round recorded) and prints the rate. Then it live-migrates\n\
         the busy VM to a new VM on the same node. Watching until the node ends the demo (at\n\
         most {seconds} s).\n",
        match accel {
            Accel::Tcg => "AMD-V with nested paging, emulated by TCG",
            Accel::Kvm => "the host's CPU under nested KVM: VT-x on Intel, AMD-V on AMD",
        }
    );
    let watch = Duration::from_secs(seconds);
    let mut reports = Vec::new();
    let (end, log) = boot(
        target,
        "mode=demo",
        qemu::DEFAULT_MEMORY_MIB,
        Some(watch + Duration::from_secs(120)),
        |line, marker, _| {
            if let Some(r) = migration_report::parse_line(line) {
                reports.push(r);
            }
            match marker {
                Marker::NodeUp(_) => Control::StopAfter(watch),
                _ => Control::Continue,
            }
        },
    )?;
    println!();
    println!("demo: node {}", describe_end(&end, &log));
    if let Some(fault) = &log.fault {
        println!("demo: FAILED: {fault}");
        return Ok(false);
    }
    for (vm, text) in log
        .console
        .iter()
        .filter(|(_, t)| t.starts_with("dirty-demo:"))
        .take(1)
    {
        println!("guest {vm} said: {text}");
    }
    print!("{}", summary::dirty_rate_report(&log.dirty_rates));
    println!();
    if reports.is_empty() {
        println!("no migration-report line: the node did not finish the live migration");
    }
    for r in &reports {
        print!("{}", migration_report::render(r));
    }
    let migrated = reports
        .iter()
        .any(|r| r.result == migration_report::MigrationResult::Completed);
    Ok(!log.dirty_rates.is_empty() && migrated)
}

fn bench_exits(arch: Arch, timeout: Duration, build: bool) -> Result<bool, String> {
    let target = prepare(arch, Accel::Tcg, build)?;
    let (end, log) = boot(
        &target,
        "mode=bench-exits",
        qemu::DEFAULT_MEMORY_MIB,
        Some(timeout),
        |_, marker, _| match marker {
            Marker::BenchExits(_) => Control::StopAfter(TOTALS_GRACE),
            _ => Control::Continue,
        },
    )?;
    println!();
    println!(
        "bench exits --arch {arch}: node {}",
        describe_end(&end, &log)
    );
    if let Some(fault) = &log.fault {
        println!("bench exits: FAILED: {fault}");
        return Ok(false);
    }
    match &log.bench {
        Some(b) => {
            print!("{}", summary::bench_report(b));
            Ok(true)
        }
        None => {
            println!("bench exits: FAILED: the node printed no `bench exits:` line");
            Ok(false)
        }
    }
}

/// `bench dirty`: the node's `mode=bench-dirty` (vmm-service), which tracks
/// a guest rewriting a 16 MiB buffer untracked, with nested write
/// protection and with PML, one after the other; its `bench dirty:` lines
/// are the result.
fn bench_dirty(arch: Arch, timeout: Duration, build: bool) -> Result<bool, String> {
    let target = prepare(arch, Accel::Tcg, build)?;
    let mut lines = Vec::new();
    let (end, log) = boot(
        &target,
        "mode=bench-dirty",
        qemu::DEFAULT_MEMORY_MIB,
        Some(timeout),
        |line, _, _| {
            if let Some(rest) = line.strip_prefix("bench dirty: ") {
                lines.push(rest.to_string());
            }
            Control::Continue
        },
    )?;
    println!();
    println!(
        "bench dirty --arch {arch}: node {}",
        describe_end(&end, &log)
    );
    if let Some(fault) = &log.fault {
        println!("bench dirty: FAILED: {fault}");
        return Ok(false);
    }
    let ok = log.shutdown == Some(0) && lines.iter().any(|l| l.starts_with("mode=write-protect"));
    println!(
        "bench dirty: the guest increments one byte in each 4 KiB page of a 16 MiB buffer as fast as it can; \
         the node collects the dirty log every {} ms (a pre-copy round) for {} s per mode",
        250, 2
    );
    for l in &lines {
        println!("  {l}");
    }
    if lines.iter().any(|l| l.contains("FAILED")) {
        println!("bench dirty: FAILED: a tracker missed pages the guest wrote (see above)");
    } else if !ok {
        println!("bench dirty: FAILED: the node did not finish the benchmark");
    }
    Ok(ok)
}

/// Run a cargo subcommand in the workspace; `Err` with its exit status.
fn cargo_step(args: &[&str]) -> Result<(), String> {
    let status = cargo::cargo()
        .args(args)
        .status()
        .map_err(|e| format!("running cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`cargo {}` failed ({status})", args.join(" ")))
    }
}

/// `test`: every check, in order, stopping at the first failure.
fn test_suite() -> bool {
    type Step = (&'static str, String, Box<dyn Fn() -> Result<(), String>>);
    let cargo_cmd =
        |args: &'static [&'static str]| -> (String, Box<dyn Fn() -> Result<(), String>>) {
            (
                format!("cargo {}", args.join(" ")),
                Box::new(move || cargo_step(args)),
            )
        };
    let mut steps: Vec<Step> = Vec::new();
    steps.push((
        "setup",
        "the Rust target and components rust-toolchain.toml pins and the fuzzing nightly (rustup, cargo install), the Debian packages (as root: install)".into(),
        Box::new(|| setup::ensure(setup::Needs::All).map(|what| println!("setup: {what}"))),
    ));
    for (name, args) in [
        ("fmt", &["fmt", "--all", "--check"][..]),
        (
            "clippy-host",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ][..],
        ),
        (
            "clippy-bare-metal",
            &[
                "clippy",
                "-p",
                "hvboot",
                "-p",
                "hypervisor",
                "-p",
                "guest-kernel",
                "--target",
                "x86_64-unknown-none",
                "--",
                "-D",
                "warnings",
            ][..],
        ),
        ("host-tests", &["test", "--workspace"][..]),
    ] {
        let (what, run) = cargo_cmd(args);
        steps.push((name, what, run));
    }
    steps.push((
        "fuzz",
        format!(
            "qemu-runner fuzz: every cargo-fuzz target, regression inputs first, then up to {} s each ({} s in all)",
            cli::DEFAULT_FUZZ_SECONDS,
            fuzz::TEST_STEP_FUZZ_BUDGET.as_secs()
        ),
        Box::new(|| {
            let report = fuzz::run_with_budget(
                &[],
                Duration::from_secs(cli::DEFAULT_FUZZ_SECONDS),
                Some(fuzz::TEST_STEP_FUZZ_BUDGET),
            )?;
            let failed = report.targets.iter().filter(|t| t.result.is_err()).count();
            if failed == 0 {
                Ok(())
            } else {
                Err(format!("{failed} fuzz target(s) failed (see above)"))
            }
        }),
    ));
    steps.push((
        "guest-tests",
        "qemu-runner guest-test --arch svm (all cases)".into(),
        Box::new(
            || match guest_test(Arch::Svm, Accel::Tcg, &[], DEFAULT_TEST_TIMEOUT, true) {
                Ok(true) => Ok(()),
                Ok(false) => Err("some guest cases failed (see the summary above)".into()),
                Err(e) => Err(e),
            },
        ),
    ));
    // Debian's kernel to a shell and across an in-node live migration
    // (issue 15), one node for both cases. The image is fetched on first
    // use (apt-get download, cached under target/linux-guest/), so a clean
    // clone needs nothing installed for it; the step prints the boot time
    // to the shell. QEMU only: Bochs would take far longer than the suite's
    // time to boot Linux.
    steps.push((
        "guest-tests-linux",
        format!(
            "qemu-runner guest-test --arch svm {} (Debian's kernel, image cached under target/linux-guest/)",
            hvcore::abi::case::LINUX.join(" ")
        ),
        Box::new(|| {
            let cases: Vec<String> = hvcore::abi::case::LINUX
                .iter()
                .map(|c| c.to_string())
                .collect();
            match guest_test(Arch::Svm, Accel::Tcg, &cases, DEFAULT_TEST_TIMEOUT, false) {
                Ok(true) => Ok(()),
                Ok(false) => Err("a Linux guest case failed (see the summary above)".into()),
                Err(e) => Err(e),
            }
        }),
    ));
    // One Bochs boot per suite (each takes minutes). Of the local-migrate
    // cases only the idle one runs under Bochs, on VMX (it checks the VMCS
    // state save/restore end to end in about a minute); the dirtying ones
    // take far longer than the suite's time there and run under QEMU
    // (docs/DESIGN.md).
    let bochs_cases = |migration: bool| {
        ALL_CASES
            .iter()
            .filter(move |c| {
                // virtio-blk migrates its VM too (with its disk).
                let migrates = c.starts_with("local-migrate-") || **c == "virtio-blk";
                !migrates || (migration && matches!(**c, "local-migrate-idle" | "virtio-blk"))
            })
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
    };
    for (arch, cases) in [
        (Arch::Vmx, bochs_cases(true)),
        (Arch::SvmBochs, bochs_cases(false)),
    ] {
        let name = match arch {
            Arch::Vmx => "guest-tests-vmx",
            _ => "guest-tests-svm-bochs",
        };
        let what = format!(
            "qemu-runner guest-test --arch {arch} {} (Bochs)",
            cases.join(" ")
        );
        steps.push((
            name,
            what,
            Box::new(move || {
                match guest_test(arch, Accel::Tcg, &cases, DEFAULT_TEST_TIMEOUT, false) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err("some guest cases failed (see the summary above)".into()),
                    Err(e) => Err(e),
                }
            }),
        ));
    }

    let total = steps.len();
    let suite_start = Instant::now();
    let mut outcomes: Vec<Outcome> = Vec::new();
    for (i, (name, what, run)) in steps.iter().enumerate() {
        println!("\n==> [{}/{total}] {name}: {what}", i + 1);
        let start = Instant::now();
        let result = run();
        let secs = start.elapsed().as_secs_f64();
        match &result {
            Ok(()) => println!("==> {name}: ok ({secs:.1} s)"),
            Err(e) => println!("==> {name}: FAILED ({secs:.1} s): {e}"),
        }
        let failed = result.is_err();
        outcomes.push(Outcome {
            name: name.to_string(),
            result,
        });
        if failed {
            break;
        }
    }
    println!(
        "\nqemu-runner test: {:.0} s",
        suite_start.elapsed().as_secs_f64()
    );
    if outcomes.len() < total {
        println!(
            "stopped at the first failing step; {} steps not run",
            total - outcomes.len()
        );
    }
    print!("{}", summary::steps_report(&outcomes));
    outcomes.iter().all(|o| o.result.is_ok())
}
