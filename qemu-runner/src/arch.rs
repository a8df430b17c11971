//! Which virtualization path a run exercises, and on which emulator.
//!
//! `svm` is AMD-V under QEMU TCG; `vmx` is Intel VT-x under Bochs and
//! `svm-bochs` AMD-V under Bochs's `ryzen` model (both booted by
//! [`crate::bochs`]: GRUB ISO, bochsrc, COM1 read from a file).

use std::fmt;
use std::str::FromStr;

/// A virtualization path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// AMD-V (SVM) with nested paging, under QEMU TCG.
    Svm,
    /// Intel VT-x (VMX) with EPT, under Bochs.
    Vmx,
    /// AMD-V under Bochs (a second SVM implementation: NRIPS, flush-by-ASID).
    SvmBochs,
}

/// The emulator that runs a node for an [`Arch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emulator {
    Qemu,
    Bochs,
}

impl Arch {
    /// Every accepted spelling, for help texts.
    pub const NAMES: &'static str = "svm, vmx, svm-bochs";

    /// The `--arch` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Svm => "svm",
            Arch::Vmx => "vmx",
            Arch::SvmBochs => "svm-bochs",
        }
    }

    /// One line for help texts.
    pub fn describe(self) -> &'static str {
        match self {
            Arch::Svm => "AMD-V with nested paging under QEMU (default)",
            Arch::Vmx => "Intel VT-x with EPT under Bochs",
            Arch::SvmBochs => "AMD-V under Bochs (model ryzen: NRIPS, flush-by-ASID)",
        }
    }

    /// The emulator this path runs on.
    pub fn emulator(self) -> Emulator {
        match self {
            Arch::Svm => Emulator::Qemu,
            Arch::Vmx | Arch::SvmBochs => Emulator::Bochs,
        }
    }

    /// `Ok` if this runner can boot the path yet, else a message for the user.
    pub fn supported(self) -> Result<(), String> {
        match self {
            Arch::Svm | Arch::Vmx | Arch::SvmBochs => Ok(()),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "svm" => Ok(Arch::Svm),
            "vmx" => Ok(Arch::Vmx),
            "svm-bochs" => Ok(Arch::SvmBochs),
            other => Err(format!(
                "unknown --arch {other:?} (expected one of: {})",
                Arch::NAMES
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        for arch in [Arch::Svm, Arch::Vmx, Arch::SvmBochs] {
            assert_eq!(arch.to_string().parse::<Arch>(), Ok(arch));
        }
        assert!("amd"
            .parse::<Arch>()
            .unwrap_err()
            .contains("svm, vmx, svm-bochs"));
    }

    #[test]
    fn every_path_is_supported_on_its_emulator() {
        assert_eq!(Arch::Svm.supported(), Ok(()));
        assert_eq!(Arch::Svm.emulator(), Emulator::Qemu);
        for arch in [Arch::Vmx, Arch::SvmBochs] {
            assert_eq!(arch.emulator(), Emulator::Bochs);
            assert_eq!(arch.supported(), Ok(()));
        }
    }
}
