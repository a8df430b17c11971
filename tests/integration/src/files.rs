//! What the tests check on the host's side of a store: the files below a
//! directory and `qemu-img`'s verdict on a VHDX the nodes wrote.

use std::path::Path;
use std::process::Command;

/// `qemu-img ARGS`: whether it succeeded, and its stdout then stderr.
pub fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (qemu-utils; `qemu-runner setup` installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Panic unless `qemu-img check` finds the VHDX at `file` without errors.
pub fn check_vhdx(file: &Path) {
    let path = file.to_str().expect("utf-8 path");
    let (ok, text) = qemu_img(&["check", "-f", "vhdx", path]);
    assert!(
        ok && text.contains("No errors"),
        "qemu-img check {}: {text}",
        file.display()
    );
}

/// Every file below `dir`, relative to it, sorted (none if `dir` does not
/// exist).
pub fn files_in(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if let Ok(rel) = p.strip_prefix(root) {
                out.push(rel.display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}
