//! `setup` (also the first step of `demo` and `test`): make sure this
//! machine has what the runner's commands need, installing what is
//! missing and printing each install command before it runs it:
//! * the Rust side ([`rustup`]): the pinned toolchain's targets and
//!   components, and for fuzzing a pinned nightly with cargo-fuzz;
//! * the Debian packages ([`apt`]): QEMU, Bochs, GRUB tools.
//!
//! Where it cannot install (not root, offline, no rustup) it fails with the
//! exact command to run.

pub mod apt;
pub mod rustup;

pub use apt::PACKAGES;

/// What a command needs set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Build and boot: the pinned toolchain complete, the packages.
    Boot,
    /// Everything `test` runs: also the fuzzing nightly and cargo-fuzz.
    All,
}

/// Check and install. `Ok` with one line per part.
pub fn ensure(needs: Needs) -> Result<String, String> {
    let mut exec = rustup::System;
    let tc = rustup::Toolchain::pinned(&crate::cargo::workspace_root())?;
    let mut done = vec![rustup::ensure_toolchain(&mut exec, &tc)?];
    if needs == Needs::All {
        done.push(rustup::ensure_fuzz_tools(&mut exec)?);
    }
    done.push(apt::ensure_packages()?);
    Ok(done.join("; "))
}
