//! The Debian side of `setup`: the emulators and boot tools (Debian
//! packages, shared/PLATFORM.md). As root it installs what is missing; as
//! anyone else it prints the exact command to run and fails.
//!
//! The `qemu-utils/bookworm` pin: machines of this kind may carry a newer
//! qemu-utils from backports, which conflicts with bookworm's
//! qemu-system-x86 7.2; installing both from bookworm together (allowing
//! the downgrade) keeps qemu-img/qemu-io at 7.2 and present. On a release
//! without a `bookworm` suite the pin fails and the plain names are tried.

use std::process::{Command, Stdio};

/// Packages every runner command may need (QEMU now; Bochs, GRUB ISO tools
/// for the VT-x path; qemu-utils for disk images).
pub const PACKAGES: [&str; 9] = [
    "qemu-system-x86",
    "qemu-utils",
    "bochs",
    "bochsbios",
    "vgabios",
    "grub-pc-bin",
    "grub-common",
    "xorriso",
    "mtools",
];

/// `apt-get install` arguments, with or without the qemu-utils pin.
pub fn install_args(pin_bookworm: bool) -> Vec<String> {
    let mut args: Vec<String> = ["install", "-y", "--allow-downgrades"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for p in PACKAGES {
        if pin_bookworm && p == "qemu-utils" {
            args.push("qemu-utils/bookworm".into());
        } else {
            args.push(p.into());
        }
    }
    args
}

/// The command a non-root user is told to run.
pub fn manual_command() -> String {
    format!(
        "sudo sh -c 'apt-get update && apt-get {}'",
        install_args(true).join(" ")
    )
}

/// Packages of `wanted` that `dpkg-query -W -f '${Package} ${Status}\n'`
/// output does not list as installed.
pub fn missing_from_dpkg_output<'a>(output: &str, wanted: &[&'a str]) -> Vec<&'a str> {
    wanted
        .iter()
        .copied()
        .filter(|pkg| {
            !output.lines().any(|line| {
                let mut words = line.split_whitespace();
                words
                    .next()
                    .is_some_and(|name| name.split(':').next() == Some(*pkg))
                    && line.trim_end().ends_with("install ok installed")
            })
        })
        .collect()
}

/// Missing packages, or `Err` if this is not a dpkg system.
pub fn missing_packages() -> Result<Vec<&'static str>, String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${Status}\n"])
        .args(PACKAGES)
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("dpkg-query not available ({e}): not a Debian system?"))?;
    // dpkg-query exits 1 when some package is unknown; its stdout still
    // lists the known ones.
    Ok(missing_from_dpkg_output(
        &String::from_utf8_lossy(&out.stdout),
        &PACKAGES,
    ))
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and has no side effects.
    unsafe { libc::geteuid() == 0 }
}

fn apt_get(args: &[String]) -> Result<(), String> {
    eprintln!("qemu-runner: apt-get {}", args.join(" "));
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("running apt-get: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "apt-get {} failed ({status})",
            args.first().map_or("", |s| s.as_str())
        ))
    }
}

/// Check, and install when root. `Ok` with a one-line description.
pub fn ensure_packages() -> Result<String, String> {
    let missing = match missing_packages() {
        Ok(m) => m,
        Err(why) => {
            // Not Debian: all we can check is the emulator itself.
            return if crate::qemu::available() {
                Ok(format!(
                    "{why}; {} is present, skipping the package check",
                    crate::qemu::QEMU
                ))
            } else {
                Err(format!(
                    "{why}; install QEMU 7.2 ({}) by hand",
                    crate::qemu::QEMU
                ))
            };
        }
    };
    if missing.is_empty() {
        return Ok(format!("all {} packages installed", PACKAGES.len()));
    }
    eprintln!("qemu-runner: missing packages: {}", missing.join(" "));
    if !is_root() {
        return Err(format!(
            "missing packages: {}; as root run:\n  {}",
            missing.join(" "),
            manual_command()
        ));
    }
    apt_get(&["update".to_string()])?;
    if let Err(pinned) = apt_get(&install_args(true)) {
        eprintln!("qemu-runner: {pinned}; retrying without the qemu-utils/bookworm pin");
        apt_get(&install_args(false))?;
    }
    let still = missing_packages()?;
    if !still.is_empty() {
        return Err(format!(
            "still missing after apt-get install: {}",
            still.join(" ")
        ));
    }
    if !crate::qemu::available() {
        return Err(format!(
            "{} does not run after installing",
            crate::qemu::QEMU
        ));
    }
    Ok(format!("installed {}", missing.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_command() {
        assert_eq!(
            install_args(true).join(" "),
            "install -y --allow-downgrades qemu-system-x86 qemu-utils/bookworm bochs bochsbios vgabios \
             grub-pc-bin grub-common xorriso mtools"
        );
        assert!(install_args(false).contains(&"qemu-utils".to_string()));
        assert!(manual_command()
            .starts_with("sudo sh -c 'apt-get update && apt-get install -y --allow-downgrades"));
    }

    #[test]
    fn dpkg_parsing() {
        let out = "qemu-system-x86 install ok installed\n\
                   qemu-utils deinstall ok config-files\n\
                   bochs:amd64 install ok installed\n";
        assert_eq!(
            missing_from_dpkg_output(out, &["qemu-system-x86", "qemu-utils", "bochs", "mtools"]),
            ["qemu-utils", "mtools"]
        );
        assert!(missing_from_dpkg_output(out, &["qemu-system-x86"]).is_empty());
    }
}
