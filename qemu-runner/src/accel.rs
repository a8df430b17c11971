//! `--accel`: how QEMU runs a node's CPU (docs/DESIGN.md, "Boot").
//!
//! * `tcg` (default): QEMU emulates the CPU, `-cpu qemu64,+svm,+npt,+rdrand`:
//!   AMD-V with nested paging on any host, the path every test runs on, and
//!   RDRAND for the node's entropy pool (TCG has no RDSEED).
//! * `kvm`: `-accel kvm -cpu host`: the node runs on the host's CPU under
//!   KVM and its hypervisor gets the host's own virtualization extension
//!   through *nested* virtualization: an Intel host gives VT-x (the VMX
//!   backend), an AMD host AMD-V (the SVM backend).
//!
//! `kvm` needs `/dev/kvm` (readable and writable) and `kvm_intel` or
//! `kvm_amd` loaded with its `nested` parameter on (`Y` or `1`). A
//! `/dev/kvm` without either module (a paravirtual KVM such as `kvm_pvm`,
//! as on this project's machines) cannot run a hypervisor inside a guest:
//! the check refuses it with a message naming what is missing, before
//! QEMU ever opens the device. The check reads a root directory it is
//! given, so the tests run it over fake `/dev` and `/sys` trees.

use std::path::Path;

use clap::ValueEnum;

/// A QEMU accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    /// Emulated AMD-V (`-cpu qemu64,+svm,+npt,+rdrand`), any host.
    Tcg,
    /// The host's CPU under nested KVM (`-cpu host`).
    Kvm,
}

/// The host CPU's vendor, as KVM's module tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostVendor {
    Intel,
    Amd,
}

impl HostVendor {
    /// The kernel module that drives this vendor's virtualization.
    pub fn module(self) -> &'static str {
        match self {
            HostVendor::Intel => "kvm_intel",
            HostVendor::Amd => "kvm_amd",
        }
    }

    /// What the node's hypervisor runs on under `-cpu host`.
    pub fn backend(self) -> &'static str {
        match self {
            HostVendor::Intel => "Intel VT-x (the vmx backend)",
            HostVendor::Amd => "AMD-V (the svm backend)",
        }
    }
}

impl Accel {
    /// The spelling on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }

    /// QEMU's `-accel` and `-cpu` arguments.
    pub fn qemu_args(self) -> [&'static str; 4] {
        match self {
            Accel::Tcg => ["-accel", "tcg", "-cpu", "qemu64,+svm,+npt,+rdrand"],
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
        }
    }
}

/// `Y` or `1` (the two spellings kvm_intel and kvm_amd use).
fn param_on(text: &str) -> bool {
    matches!(text.trim(), "Y" | "y" | "1")
}

fn readable_writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) reads the NUL-terminated path and touches nothing
    // else; it does not open the file.
    unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) == 0 }
}

/// Check that `--accel kvm` can run a hypervisor on the host whose file
/// system is at `root` (`/` for real). `Ok` names the vendor; `Err` says
/// what is missing, where.
pub fn check_kvm(root: &Path) -> Result<HostVendor, String> {
    let refuse = |why: String| {
        Err(format!(
            "--accel kvm refused: {why}. The node's hypervisor needs nested virtualization; \
             run without --accel (TCG emulates AMD-V on any host)"
        ))
    };
    let dev = root.join("dev/kvm");
    if !dev.exists() {
        return refuse(format!(
            "{} does not exist (no KVM on this host)",
            dev.display()
        ));
    }
    if !readable_writable(&dev) {
        return refuse(format!(
            "{} is not readable and writable by this user (add it to the kvm group)",
            dev.display()
        ));
    }
    let modules = root.join("sys/module");
    for vendor in [HostVendor::Intel, HostVendor::Amd] {
        let dir = modules.join(vendor.module());
        if !dir.is_dir() {
            continue;
        }
        let param = dir.join("parameters/nested");
        return match std::fs::read_to_string(&param) {
            Ok(v) if param_on(&v) => Ok(vendor),
            Ok(v) => refuse(format!(
                "{} is loaded with nested virtualization off ({} is {:?}); turn it on with \
                 `modprobe -r {m} && modprobe {m} nested=1` (as root, no VM running)",
                vendor.module(),
                param.display(),
                v.trim(),
                m = vendor.module()
            )),
            Err(e) => refuse(format!(
                "{} is loaded but {} cannot be read ({e})",
                vendor.module(),
                param.display()
            )),
        };
    }
    let mut others: Vec<String> = std::fs::read_dir(&modules)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n == "kvm" || n.starts_with("kvm_"))
                .collect()
        })
        .unwrap_or_default();
    others.sort();
    refuse(format!(
        "{} exists, but neither kvm_intel nor kvm_amd is loaded ({} and {} are missing; \
         KVM modules here: {}), so this KVM cannot run a hypervisor inside a guest",
        dev.display(),
        modules.join("kvm_intel").display(),
        modules.join("kvm_amd").display(),
        if others.is_empty() {
            "none".to_string()
        } else {
            others.join(", ")
        }
    ))
}

/// [`check_kvm`] on this host, when `accel` is `kvm`; prints what the node
/// will run on.
pub fn check(accel: Accel) -> Result<(), String> {
    if accel == Accel::Kvm {
        let vendor = check_kvm(Path::new("/"))?;
        eprintln!(
            "qemu-runner: --accel kvm: {} has nested=on; the node runs on {}",
            vendor.module(),
            vendor.backend()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;

    /// A fake root with the given files (path, content).
    struct FakeRoot(PathBuf);

    impl FakeRoot {
        fn new(tag: &str, files: &[(&str, &str)]) -> Self {
            let dir = std::env::temp_dir().join(format!("hvm-accel-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            for (path, text) in files {
                let p = dir.join(path);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(p, text).unwrap();
            }
            fs::create_dir_all(dir.join("sys/module")).unwrap();
            FakeRoot(dir)
        }
    }

    impl Drop for FakeRoot {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn nested_intel_and_amd_are_accepted() {
        let r = FakeRoot::new(
            "intel",
            &[
                ("dev/kvm", ""),
                ("sys/module/kvm/parameters/x", "0"),
                ("sys/module/kvm_intel/parameters/nested", "Y\n"),
            ],
        );
        assert_eq!(check_kvm(&r.0), Ok(HostVendor::Intel));
        let r = FakeRoot::new(
            "amd",
            &[
                ("dev/kvm", ""),
                ("sys/module/kvm_amd/parameters/nested", "1\n"),
            ],
        );
        assert_eq!(check_kvm(&r.0), Ok(HostVendor::Amd));
        assert_eq!(HostVendor::Amd.backend(), "AMD-V (the svm backend)");
    }

    #[test]
    fn nesting_off_is_refused_with_the_fix() {
        let r = FakeRoot::new(
            "off",
            &[
                ("dev/kvm", ""),
                ("sys/module/kvm_intel/parameters/nested", "N\n"),
            ],
        );
        let e = check_kvm(&r.0).unwrap_err();
        assert!(
            e.contains("kvm_intel is loaded with nested virtualization off"),
            "{e}"
        );
        assert!(e.contains("parameters/nested is \"N\""), "{e}");
        assert!(e.contains("modprobe kvm_intel nested=1"), "{e}");
        let r = FakeRoot::new(
            "amd0",
            &[
                ("dev/kvm", ""),
                ("sys/module/kvm_amd/parameters/nested", "0"),
            ],
        );
        assert!(check_kvm(&r.0).unwrap_err().contains("kvm_amd is loaded"));
    }

    #[test]
    fn no_device_or_no_vendor_module_is_refused() {
        let r = FakeRoot::new("nodev", &[("sys/module/kvm_intel/parameters/nested", "Y")]);
        let e = check_kvm(&r.0).unwrap_err();
        assert!(e.contains("dev/kvm does not exist"), "{e}");
        // This project's machines: /dev/kvm from a paravirtual module only.
        let r = FakeRoot::new(
            "pvm",
            &[
                ("dev/kvm", ""),
                ("sys/module/kvm/parameters/x", ""),
                ("sys/module/kvm_pvm/parameters/y", ""),
            ],
        );
        let e = check_kvm(&r.0).unwrap_err();
        assert!(
            e.contains("neither kvm_intel nor kvm_amd is loaded")
                && e.contains("KVM modules here: kvm, kvm_pvm")
                && e.contains("run without --accel"),
            "{e}"
        );
        // The module without its parameter file.
        let r = FakeRoot::new("noparam", &[("dev/kvm", ""), ("sys/module/kvm_amd/x", "")]);
        assert!(check_kvm(&r.0).unwrap_err().contains("cannot be read"));
    }

    #[test]
    fn qemu_arguments() {
        assert_eq!(
            Accel::Tcg.qemu_args(),
            ["-accel", "tcg", "-cpu", "qemu64,+svm,+npt,+rdrand"]
        );
        assert_eq!(Accel::Kvm.qemu_args(), ["-accel", "kvm", "-cpu", "host"]);
        assert_eq!(check(Accel::Tcg), Ok(()));
    }
}
