//! Booting a node under Bochs (docs/DESIGN.md, "Boot"; flags from
//! shared/PLATFORM.md): Intel VT-x with EPT (`--arch vmx`, CPU model
//! `corei7_skylake_x`) and a second AMD-V implementation (`--arch
//! svm-bochs`, model `ryzen`, which has NRIPS and flush-by-ASID that QEMU
//! TCG lacks).
//!
//! Bochs has no `-kernel`: [`BochsRun::prepare`] builds a GRUB rescue ISO
//! (`grub-mkrescue`) whose `grub.cfg` boots the hypervisor image through
//! Multiboot1 with the node command line and the guest kernel as module 0,
//! and writes a bochsrc that boots it from the CD-ROM with COM1 going to a
//! file. Bochs's debugger build runs with a command file holding `c`
//! (continue); it always exits with status 1, so, as with QEMU, pass/fail
//! is decided from the serial markers only.
//!
//! [`BochsRun::command`] is a small `sh` wrapper that starts Bochs in the
//! background and `exec`s `tail -F` on the serial file until Bochs exits,
//! so the caller sees COM1 as the command's stdout, line by line, exactly
//! like QEMU's `-serial stdio`; killing the command's process group (the
//! runner's timeout) kills Bochs with it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::arch::Arch;
use crate::qemu::NodeSpec;

/// The Bochs binary (Debian's build with the internal debugger).
pub const BOCHS: &str = "bochs-bin";
/// The ISO builder.
pub const GRUB_MKRESCUE: &str = "grub-mkrescue";
/// System BIOS and VGA BIOS (Debian packages `bochsbios`, `vgabios`).
pub const BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
pub const VGA_BIOS: &str = "/usr/share/bochs/VGABIOS-lgpl-latest";
/// Node RAM under Bochs unless `--memory` asks for something other than
/// the QEMU default: the test suite needs about 130 MiB of guest RAM at a
/// time, and a larger machine only slows Bochs's boot.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Emulated instructions per second (also the TSC rate the node measures).
pub const IPS: u64 = 100_000_000;
/// A guest-test run under Bochs gets at least this long: the whole VMX
/// suite takes about 3 minutes on an idle 2-core machine (measured),
/// much more than under QEMU.
pub const MIN_TEST_TIMEOUT_SECS: u64 = 900;

/// The Bochs CPU model that provides `arch`, or `None` for a QEMU path.
pub fn cpu_model(arch: Arch) -> Option<&'static str> {
    match arch {
        Arch::Vmx => Some("corei7_skylake_x"),
        Arch::SvmBochs => Some("ryzen"),
        Arch::Svm => None,
    }
}

/// Node RAM for a run that asked for `requested_mib` (see
/// [`DEFAULT_MEMORY_MIB`]).
pub fn memory_mib(requested_mib: u64) -> u64 {
    if requested_mib == crate::qemu::DEFAULT_MEMORY_MIB {
        DEFAULT_MEMORY_MIB
    } else {
        requested_mib
    }
}

/// GRUB's menu: boot at once, the hypervisor by Multiboot1 with the node
/// command line, the guest kernel as module 0. Refuses characters GRUB's
/// script language would interpret.
pub fn grub_cfg(cmdline: &str) -> Result<String, String> {
    if let Some(c) = cmdline
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || " =,._-/:+".contains(*c)))
    {
        return Err(format!(
            "the node command line {cmdline:?} contains {c:?}, which cannot be passed through grub.cfg"
        ));
    }
    Ok(format!(
        "set timeout=0\n\
         set default=0\n\
         menuentry \"hvmigrate\" {{\n\
         \x20 multiboot /boot/hvmigrate {cmdline}\n\
         \x20 module /boot/guest-kernel\n\
         \x20 boot\n\
         }}\n"
    ))
}

/// The bochsrc for one node (shared/PLATFORM.md, "bochsrc essentials").
pub fn bochsrc(model: &str, memory_mib: u64, iso: &Path, serial: &Path) -> String {
    format!(
        "megs: {memory_mib}\n\
         cpu: model={model}, count=1, ips={IPS}, reset_on_triple_fault=0\n\
         romimage: file={BIOS}\n\
         vgaromimage: file={VGA_BIOS}\n\
         ata0-master: type=cdrom, path={}, status=inserted\n\
         boot: cdrom\n\
         com1: enabled=1, mode=file, dev={}\n\
         port_e9_hack: enabled=1\n\
         clock: sync=none\n\
         speaker: enabled=0\n\
         sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy\n\
         error: action=ignore\n\
         log: /dev/null\n\
         display_library: rfb, options=\"timeout=0\"\n",
        iso.display(),
        serial.display()
    )
}

/// The wrapper: Bochs in the background (its own chatter to a log file,
/// killed if the wrapper dies), COM1's file followed until Bochs exits.
/// `$1` bochsrc, `$2` debugger command file, `$3` Bochs log, `$4` serial.
/// The shell stays Bochs's parent and reaps it, so `tail --pid` sees it
/// gone (a zombie child of `tail` itself would look alive for ever).
const WRAPPER: &str =
    "setpriv --pdeathsig KILL bochs-bin -q -f \"$1\" -rc \"$2\" </dev/null >\"$3\" 2>&1 &\n\
                       b=$!\n\
                       tail -n +1 --pid=$b -F \"$4\" 2>/dev/null &\n\
                       t=$!\n\
                       wait $b\n\
                       wait $t\n";

/// One prepared Bochs boot: a scratch directory with the ISO, bochsrc,
/// debugger commands and (once running) the serial and Bochs log files.
/// Dropping it removes the directory.
#[derive(Debug)]
pub struct BochsRun {
    dir: PathBuf,
    keep: bool,
}

static RUNS: AtomicU32 = AtomicU32::new(0);

impl BochsRun {
    /// Build the ISO and configuration for booting `spec` on the Bochs
    /// model of `arch`, in a fresh directory under `scratch`.
    pub fn prepare(spec: &NodeSpec, arch: Arch, scratch: &Path) -> Result<Self, String> {
        let model =
            cpu_model(arch).ok_or_else(|| format!("--arch {arch} does not run on Bochs"))?;
        let cfg = grub_cfg(&spec.cmdline)?;
        let n = RUNS.fetch_add(1, Ordering::Relaxed);
        let dir = scratch.join(format!("bochs-{}-{n}", std::process::id()));
        let run = BochsRun {
            dir: dir.clone(),
            keep: std::env::var_os("HVMIGRATE_KEEP_BOCHS").is_some(),
        };
        let boot = dir.join("iso/boot");
        let io = |what: &str, e: std::io::Error| format!("{what} in {}: {e}", dir.display());
        fs::create_dir_all(boot.join("grub")).map_err(|e| io("creating the ISO tree", e))?;
        fs::copy(&spec.hypervisor, boot.join("hvmigrate"))
            .map_err(|e| io("copying the hypervisor image", e))?;
        fs::copy(&spec.guest_kernel, boot.join("guest-kernel"))
            .map_err(|e| io("copying the guest kernel", e))?;
        fs::write(boot.join("grub/grub.cfg"), cfg).map_err(|e| io("writing grub.cfg", e))?;
        let out = Command::new(GRUB_MKRESCUE)
            .arg("-o")
            .arg(run.iso())
            .arg(dir.join("iso"))
            .output()
            .map_err(|e| {
                format!("running {GRUB_MKRESCUE}: {e}; install the emulators with `cargo run -p qemu-runner -- setup` (as root)")
            })?;
        if !out.status.success() {
            return Err(format!(
                "{GRUB_MKRESCUE} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        fs::write(
            run.rc(),
            bochsrc(
                model,
                memory_mib(spec.memory_mib),
                &run.iso(),
                &run.serial(),
            ),
        )
        .map_err(|e| io("writing bochsrc", e))?;
        fs::write(dir.join("debugger.cmd"), "c\n").map_err(|e| io("writing debugger.cmd", e))?;
        fs::write(run.serial(), "").map_err(|e| io("creating the serial file", e))?;
        Ok(run)
    }

    fn iso(&self) -> PathBuf {
        self.dir.join("hv.iso")
    }

    fn rc(&self) -> PathBuf {
        self.dir.join("bochsrc")
    }

    /// Where COM1's output goes.
    pub fn serial(&self) -> PathBuf {
        self.dir.join("serial.txt")
    }

    /// Bochs's own messages (panics, CPU errors) end up here.
    pub fn bochs_log(&self) -> PathBuf {
        self.dir.join("bochs.out")
    }

    /// The command to spawn: COM1's lines on its stdout.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(WRAPPER)
            .arg("hvmigrate-bochs")
            .arg(self.rc())
            .arg(self.dir.join("debugger.cmd"))
            .arg(self.bochs_log())
            .arg(self.serial());
        cmd
    }

    /// The command as a user would type it (for logs).
    pub fn display(&self) -> String {
        format!(
            "{BOCHS} -q -f {} -rc {} (COM1 -> {})",
            self.rc().display(),
            self.dir.join("debugger.cmd").display(),
            self.serial().display()
        )
    }
}

impl Drop for BochsRun {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether Bochs and the ISO tools can be run at all.
pub fn available() -> bool {
    let runs = |prog: &str, arg: &str| {
        Command::new(prog)
            .arg(arg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok()
    };
    runs(BOCHS, "--help") && runs(GRUB_MKRESCUE, "--version") && runs("xorriso", "--version")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models() {
        assert_eq!(cpu_model(Arch::Vmx), Some("corei7_skylake_x"));
        assert_eq!(cpu_model(Arch::SvmBochs), Some("ryzen"));
        assert_eq!(cpu_model(Arch::Svm), None);
        assert_eq!(memory_mib(crate::qemu::DEFAULT_MEMORY_MIB), 256);
        assert_eq!(memory_mib(512), 512);
    }

    #[test]
    fn grub_menu() {
        let cfg = grub_cfg("mode=test tests=hello,cpuid").unwrap();
        assert!(cfg.starts_with("set timeout=0\n"));
        assert!(cfg.contains("  multiboot /boot/hvmigrate mode=test tests=hello,cpuid\n"));
        assert!(cfg.contains("  module /boot/guest-kernel\n"));
        assert!(grub_cfg("mode=test; reboot").unwrap_err().contains("';'"));
        assert!(grub_cfg("name=$x").is_err());
    }

    #[test]
    fn platform_md_bochsrc() {
        let rc = bochsrc(
            "corei7_skylake_x",
            256,
            Path::new("/t/hv.iso"),
            Path::new("/t/serial.txt"),
        );
        for line in [
            "megs: 256",
            "cpu: model=corei7_skylake_x, count=1, ips=100000000, reset_on_triple_fault=0",
            "romimage: file=/usr/share/bochs/BIOS-bochs-latest",
            "ata0-master: type=cdrom, path=/t/hv.iso, status=inserted",
            "boot: cdrom",
            "com1: enabled=1, mode=file, dev=/t/serial.txt",
            "clock: sync=none",
            "display_library: rfb, options=\"timeout=0\"",
        ] {
            assert!(rc.lines().any(|l| l == line), "missing {line:?} in\n{rc}");
        }
    }

    /// The wrapper streams a file another process appends to, and ends
    /// when that process does (a stand-in for Bochs: `sh`).
    #[test]
    fn wrapper_follows_the_serial_file_until_the_writer_exits() {
        let dir = std::env::temp_dir().join(format!("bochs-wrapper-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let serial = dir.join("serial.txt");
        fs::write(&serial, "").unwrap();
        let wrapper = WRAPPER.replace(
            "setpriv --pdeathsig KILL bochs-bin -q -f \"$1\" -rc \"$2\"",
            "sh -c 'echo one >>\"$4\"; sleep 0.3; echo two >>\"$4\"' x \"$1\" \"$2\" \"$3\" \"$4\"",
        );
        let out = Command::new("sh")
            .arg("-c")
            .arg(wrapper)
            .arg("t")
            .arg("rc")
            .arg("cmd")
            .arg(dir.join("log"))
            .arg(&serial)
            .output()
            .unwrap();
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "one\ntwo\n");
    }
}
