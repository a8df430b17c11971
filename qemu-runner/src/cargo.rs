//! Finding the workspace and its build outputs, and building the images.
//!
//! The runner builds with plain `cargo` in the workspace, so it honours a
//! `CARGO_TARGET_DIR` the user set (or a configured `build.target-dir`):
//! the target directory comes from that variable, else from `cargo
//! metadata`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The bare-metal target both images are built for.
pub const TARGET: &str = "x86_64-unknown-none";
/// The hypervisor image's file name (bin of package `hvboot`).
pub const HYPERVISOR_BIN: &str = "hvmigrate";
/// The guest test kernel's file name (bin of package `guest-kernel`).
pub const GUEST_BIN: &str = "guest-kernel";

/// The workspace root (this crate lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("qemu-runner lives inside the workspace")
        .to_path_buf()
}

/// The `cargo` to run: the one that started us, if any.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// The string value of `"key":"..."` in a JSON document (first occurrence,
/// basic escapes decoded). Enough for `cargo metadata`'s top-level paths.
pub fn json_string_field(json: &str, key: &str) -> Option<String> {
    let needle = format!("\"{key}\":");
    let start = json.find(&needle)? + needle.len();
    let rest = json[start..].trim_start().strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.chars();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
}

/// The target directory cargo builds into.
pub fn target_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        // cargo resolves a relative CARGO_TARGET_DIR against its cwd, which
        // for our builds is the workspace root.
        return Ok(if dir.is_absolute() {
            dir
        } else {
            workspace_root().join(dir)
        });
    }
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .map_err(|e| format!("running cargo metadata: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let json = String::from_utf8_lossy(&out.stdout);
    json_string_field(&json, "target_directory")
        .map(PathBuf::from)
        .ok_or_else(|| "cargo metadata printed no target_directory".to_string())
}

/// Where the release images land.
#[derive(Clone, Debug)]
pub struct Images {
    pub hypervisor: PathBuf,
    pub guest_kernel: PathBuf,
}

impl Images {
    pub fn locate() -> Result<Self, String> {
        let dir = target_dir()?.join(TARGET).join("release");
        Ok(Self {
            hypervisor: dir.join(HYPERVISOR_BIN),
            guest_kernel: dir.join(GUEST_BIN),
        })
    }

    /// `Err` naming the first missing image.
    pub fn check(&self) -> Result<(), String> {
        for p in [&self.hypervisor, &self.guest_kernel] {
            if !p.is_file() {
                return Err(format!(
                    "{} does not exist; build it with `cargo run -p qemu-runner -- build`",
                    p.display()
                ));
            }
        }
        Ok(())
    }
}

/// The build command for both images.
pub fn build_args() -> [&'static str; 8] {
    [
        "build",
        "--release",
        "--target",
        TARGET,
        "-p",
        "hvboot",
        "-p",
        "guest-kernel",
    ]
}

/// Build both images (cargo's progress goes to the terminal).
pub fn build() -> Result<Images, String> {
    eprintln!("qemu-runner: cargo {}", build_args().join(" "));
    let status = cargo()
        .args(build_args())
        .status()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building the images failed ({status})"));
    }
    let images = Images::locate()?;
    images.check()?;
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_fields() {
        let json = r#"{"packages":[],"target_directory":"/work/main/target","version":1,"workspace_root":"/a \"q\"\\b\u00e9"}"#;
        assert_eq!(
            json_string_field(json, "target_directory").as_deref(),
            Some("/work/main/target")
        );
        assert_eq!(
            json_string_field(json, "workspace_root").as_deref(),
            Some("/a \"q\"\\bé")
        );
        assert_eq!(json_string_field(json, "missing"), None);
        assert_eq!(json_string_field(r#"{"version": 1}"#, "version"), None);
        assert_eq!(json_string_field(r#"{"k": "unterminated"#, "k"), None);
    }

    #[test]
    fn workspace_root_has_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
    }

    #[test]
    fn build_command_matches_the_documented_one() {
        assert_eq!(
            build_args().join(" "),
            "build --release --target x86_64-unknown-none -p hvboot -p guest-kernel"
        );
    }
}
