//! The QEMU command line for one node (docs/DESIGN.md, "Boot"; flags from
//! shared/PLATFORM.md): TCG with SVM and nested paging (or, with `--accel
//! kvm`, the host CPU under KVM: [`crate::accel`]), the hypervisor image
//! as `-kernel`, the guest kernel as the first boot module (`-initrd`), the
//! node command line as `-append`, COM1 on stdout, the `isa-debug-exit`
//! device the node powers off through (QEMU then exits with
//! `(code << 1) | 1`, so pass/fail is read from serial markers instead), and
//! a `virtio-rng-pci` entropy device (with RDRAND, the node's entropy
//! sources).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::accel::Accel;

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// The entropy device every node gets (QEMU fills it from the host's
/// `getrandom()`).
pub const ENTROPY_DEVICE: &str = "virtio-rng-pci";
/// Node RAM unless `--memory` says otherwise.
pub const DEFAULT_MEMORY_MIB: u64 = 1024;

/// What to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    pub hypervisor: PathBuf,
    pub guest_kernel: PathBuf,
    /// Boot modules after the guest kernel (the Linux cases: bzImage and
    /// initramfs as modules 1 and 2).
    pub modules: Vec<PathBuf>,
    /// The node command line (`mode=... name=...`).
    pub cmdline: String,
    pub memory_mib: u64,
    pub accel: Accel,
}

/// QEMU's arguments for `spec`.
pub fn args(spec: &NodeSpec) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    let mut args: Vec<String> = spec.accel.qemu_args().map(String::from).into();
    args.push("-m".into());
    args.push(format!("{}M", spec.memory_mib));
    args.extend(["-kernel".to_string(), path(&spec.hypervisor)]);
    // QEMU's Multiboot loader takes the modules comma-separated.
    let modules = std::iter::once(&spec.guest_kernel)
        .chain(&spec.modules)
        .map(|p| path(p))
        .collect::<Vec<_>>()
        .join(",");
    args.extend(["-initrd".to_string(), modules]);
    args.extend(["-append".to_string(), spec.cmdline.clone()]);
    args.extend(
        [
            "-serial",
            "stdio",
            "-display",
            "none",
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-device",
            ENTROPY_DEVICE,
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args
}

/// One store a node is given (docs/DESIGN.md, "Node stores"): host
/// directory `path` exported over virtio-9p with mount tag `tag`, named
/// `name` on the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStore {
    pub name: String,
    pub tag: String,
    pub path: PathBuf,
}

/// QEMU's arguments exporting `store` as device number `index`:
/// `-fsdev local,id=stN,path=DIR,security_model=none -device
/// virtio-9p-pci,fsdev=stN,mount_tag=TAG` (commas in the path doubled, as
/// QEMU's option syntax wants).
pub fn store_args(index: usize, store: &NodeStore) -> [String; 4] {
    let path = store.path.display().to_string().replace(',', ",,");
    [
        "-fsdev".into(),
        format!("local,id=st{index},path={path},security_model=none"),
        "-device".into(),
        format!("virtio-9p-pci,fsdev=st{index},mount_tag={}", store.tag),
    ]
}

/// The node command line's word for `store`: `store=NAME:TAG:PATH`, the
/// path percent-encoded except `A-Z a-z 0-9 / . _ -` (the command line is
/// split at spaces).
pub fn store_word(store: &NodeStore) -> String {
    let mut path = String::new();
    for b in store.path.display().to_string().bytes() {
        if b.is_ascii_alphanumeric() || b"/._-".contains(&b) {
            path.push(char::from(b));
        } else {
            path.push_str(&format!("%{b:02X}"));
        }
    }
    format!("store={}:{}:{path}", store.name, store.tag)
}

/// The command to spawn.
pub fn command(spec: &NodeSpec) -> Command {
    let mut cmd = Command::new(QEMU);
    cmd.args(args(spec));
    cmd
}

/// The command as a user would type it (for logs and error messages).
pub fn display(spec: &NodeSpec) -> String {
    let quote = |a: &str| {
        if a.is_empty() || a.contains([' ', '"', '\'']) {
            format!("\"{}\"", a.replace('"', "\\\""))
        } else {
            a.to_string()
        }
    };
    std::iter::once(QEMU.to_string())
        .chain(args(spec).iter().map(|a| quote(a)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether the QEMU binary can be run at all.
pub fn available() -> bool {
    Command::new(QEMU)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> NodeSpec {
        NodeSpec {
            modules: Vec::new(),
            hypervisor: "/t/x86_64-unknown-none/release/hvmigrate".into(),
            guest_kernel: "/t/x86_64-unknown-none/release/guest-kernel".into(),
            cmdline: "mode=test tests=hello,cpuid".into(),
            memory_mib: DEFAULT_MEMORY_MIB,
            accel: Accel::Tcg,
        }
    }

    #[test]
    fn design_md_command_line() {
        assert_eq!(
            display(&spec()),
            "qemu-system-x86_64 -accel tcg -cpu qemu64,+svm,+npt,+rdrand -m 1024M \
             -kernel /t/x86_64-unknown-none/release/hvmigrate \
             -initrd /t/x86_64-unknown-none/release/guest-kernel \
             -append \"mode=test tests=hello,cpuid\" -serial stdio -display none -no-reboot \
             -device isa-debug-exit,iobase=0xf4,iosize=0x04 -device virtio-rng-pci"
        );
    }

    #[test]
    fn kvm_runs_the_host_cpu() {
        let line = display(&NodeSpec {
            accel: Accel::Kvm,
            ..spec()
        });
        assert!(
            line.starts_with("qemu-system-x86_64 -accel kvm -cpu host -m 1024M -kernel "),
            "{line}"
        );
        assert!(!line.contains("tcg") && !line.contains("+svm"), "{line}");
    }

    #[test]
    fn stores_are_exported_and_named() {
        let s = NodeStore {
            name: "local".into(),
            tag: "a".into(),
            path: "/t/my stores,x/a".into(),
        };
        assert_eq!(
            store_args(0, &s).join(" "),
            "-fsdev local,id=st0,path=/t/my stores,,x/a,security_model=none -device virtio-9p-pci,fsdev=st0,mount_tag=a"
        );
        assert_eq!(store_word(&s), "store=local:a:/t/my%20stores%2Cx/a");
    }

    #[test]
    fn cmdline_is_one_argument() {
        let a = args(&NodeSpec {
            memory_mib: 256,
            cmdline: String::new(),
            ..spec()
        });
        let i = a.iter().position(|x| x == "-append").unwrap();
        assert_eq!(a[i + 1], "");
        assert!(a.contains(&"256M".to_string()));
    }
}
