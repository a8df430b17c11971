//! VM configuration files: what a node needs to register a VM whose files
//! are on a store (Hyper-V's `.vmcx`, for `Import-VM` and
//! `Move-VMStorage -VirtualMachinePath`), as a small versioned text file.
//!
//! Format (version 1; at most [`FILE_MAX`] bytes of UTF-8, `\n` line
//! ends, the last line ended too, no blank lines, no comments):
//!
//! ```text
//! hvmigrate-vm 1
//! name=d
//! id=5f0c1a9e-3b27-4d6e-8a41-0c9d2e7b6f13
//! memory_mib=64
//! guest=disk-verify
//! disk.0=dynamic local:vms/d/d-0.vhdx
//! snapshots=local:vms/d/snapshots
//! ```
//!
//! Keys, each at most once: `name` (a VM name), `id` (the VM's identity,
//! 128 bits drawn at creation, kept across every move and import; GUID
//! form, lowercase), `memory_mib` ([`MEMORY_MIB_MIN`] to
//! [`MEMORY_MIB_MAX`]), `guest` (a guest case name, or `linux`), `append`
//! (only with `guest=linux`: the extra kernel arguments, printable,
//! at most [`APPEND_MAX`] bytes), `disk.N` (slot N, 0 to
//! [`DISKS_MAX`] - 1, slots contiguous from 0; `dynamic` or `fixed`, one
//! space, the file's `STORE:path`), `checkpoint.N` (the `STORE:path` of
//! disk N's checkpoint, a differencing VHDX over disk N's file that the
//! VM writes to; `crate::checkpoint`) and `snapshots` (`STORE:DIR`, where
//! the VM's checkpoint files go). `name`, `id`, `memory_mib`, `guest` and
//! `snapshots` are required. A value is at most [`VALUE_MAX`] bytes.
//! Anything else (another first line or version, an unknown or repeated
//! key, a line without `=`, a path with `..` or an empty part) is an
//! error naming the line: the file is an allegation (it may have been
//! edited on the host, or written by a newer node), and
//! [`VmConfig::parse`] never panics on it (fuzzed: `vmconfig_parse`).
//!
//! Writing ([`write`]) is crash-safe: the whole file goes to its partial
//! name and is renamed over the old one (`FileStore::replace_partial`,
//! `commit_partial`), so a reader finds the old file or the new one,
//! never a mix.

use crate::disks::FileStore;
use crate::store::StorePath;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use vstorage::BlockIo;

/// The first line's magic word.
pub const MAGIC: &str = "hvmigrate-vm";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Largest configuration file.
pub const FILE_MAX: usize = 4096;
/// Longest value of a key.
pub const VALUE_MAX: usize = 320;
/// Most disks (virtio slots) of a VM.
pub const DISKS_MAX: usize = crate::devices::MAX_VIRTIO_SLOTS;
/// Bounds of `memory_mib` (the management API's).
pub const MEMORY_MIB_MIN: u64 = 4;
pub const MEMORY_MIB_MAX: u64 = 4096;
/// Longest `append`.
pub const APPEND_MAX: usize = hvmgmt::proto::APPEND_MAX;
/// Longest guest case name.
pub const GUEST_MAX: usize = hvmgmt::proto::GUEST_MAX;
/// The `guest` of a VM that boots Linux.
pub const LINUX: &str = "linux";
/// A configuration file's extension.
pub const EXTENSION: &str = "vmcfg";

/// A VM's identity: 128 bits, written as a GUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmId(pub [u8; 16]);

impl VmId {
    /// Parses the lowercase GUID form `8-4-4-4-12` hex digits.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != 36 {
            return None;
        }
        let mut out = [0u8; 16];
        let mut n = 0;
        let mut i = 0;
        while i < b.len() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if b[i] != b'-' {
                    return None;
                }
                i += 1;
                continue;
            }
            let hi = hex(b[i])?;
            let lo = hex(*b.get(i + 1)?)?;
            *out.get_mut(n)? = hi << 4 | lo;
            n += 1;
            i += 2;
        }
        (n == 16).then_some(VmId(out))
    }
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What a VM boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// A guest case of the guest test kernel.
    Guest(String),
    /// The node's Linux image, with these extra kernel arguments.
    Linux { append: String },
}

/// One disk: its slot is its index in [`VmConfig::disks`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskEntry {
    pub fixed: bool,
    /// `STORE:path` of its VHDX.
    pub location: String,
    /// `STORE:path` of its checkpoint: a differencing VHDX over
    /// `location` that holds every write since it was taken
    /// (`crate::checkpoint`); the disk is the two together.
    pub checkpoint: Option<String>,
}

/// A VM's configuration as its file holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub name: String,
    pub id: VmId,
    pub memory_mib: u64,
    pub boot: Boot,
    pub disks: Vec<DiskEntry>,
    /// `STORE:DIR` of the VM's checkpoint files.
    pub snapshots: String,
}

/// Why a configuration file was refused (`line` counts from 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    TooLarge {
        bytes: usize,
    },
    NotText,
    /// The first line is not `hvmigrate-vm N`.
    NotAConfig,
    UnsupportedVersion(String),
    /// A line that is not `key=value` (or has a `\r`, or is empty).
    BadLine {
        line: usize,
    },
    UnknownKey {
        line: usize,
        key: String,
    },
    Duplicate {
        line: usize,
        key: String,
    },
    TooLong {
        line: usize,
        key: String,
    },
    BadValue {
        line: usize,
        key: String,
        why: String,
    },
    Missing(&'static str),
    /// Disk slots must run 0, 1, ... without a gap.
    SlotGap {
        slot: usize,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::TooLarge { bytes } => write!(
                f,
                "a VM configuration file is at most {FILE_MAX} bytes; this one has {bytes}"
            ),
            ConfigError::NotText => f.write_str("not a text file (invalid UTF-8)"),
            ConfigError::NotAConfig => write!(
                f,
                "not a VM configuration file (its first line is not '{MAGIC} {VERSION}')"
            ),
            ConfigError::UnsupportedVersion(v) => write!(
                f,
                "VM configuration version '{v:.20}' is not supported (this node reads version {VERSION})"
            ),
            ConfigError::BadLine { line } => {
                write!(f, "line {line}: expected key=value")
            }
            ConfigError::UnknownKey { line, key } => {
                write!(f, "line {line}: unknown key '{key:.40}'")
            }
            ConfigError::Duplicate { line, key } => {
                write!(f, "line {line}: '{key:.40}' given twice")
            }
            ConfigError::TooLong { line, key } => {
                write!(f, "line {line}: the value of '{key:.40}' is longer than {VALUE_MAX} bytes")
            }
            ConfigError::BadValue { line, key, why } => {
                write!(f, "line {line}: {key:.40}: {why}")
            }
            ConfigError::Missing(key) => write!(f, "'{key}' is missing"),
            ConfigError::SlotGap { slot } => {
                write!(f, "disk slots must run from 0 without a gap: disk.{slot} is missing")
            }
        }
    }
}

/// Checks a `STORE:path` that names a file or directory below a store's
/// root (not the root itself).
pub fn check_location(s: &str) -> Result<(), String> {
    if !s.contains(':') {
        return Err(format!("'{s:.80}' is not STORE:path"));
    }
    let p = StorePath::parse(s).map_err(|e| e.to_string())?;
    if p.path.is_empty() {
        return Err(format!("'{s:.80}' names a store, not a file"));
    }
    // `StorePath` drops empty parts; a file names them exactly.
    if p.to_string() != s {
        return Err(format!("'{s:.80}' is not in its plain form ({p})"));
    }
    Ok(())
}

fn bad(line: usize, key: &str, why: impl Into<String>) -> ConfigError {
    ConfigError::BadValue {
        line,
        key: key.into(),
        why: why.into(),
    }
}

/// The slot number of key `key` (`PREFIX` and a slot, 0 to
/// [`DISKS_MAX`] - 1, no leading zero).
fn slot_of(line: usize, key: &str, prefix: &str) -> Result<usize, ConfigError> {
    let slot = key.strip_prefix(prefix).unwrap_or_default();
    slot.parse::<usize>()
        .ok()
        .filter(|&s| s < DISKS_MAX && (s == 0 || !slot.starts_with('0')))
        .filter(|_| slot.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| bad(line, key, format!("disk slots are 0 to {}", DISKS_MAX - 1)))
}

impl VmConfig {
    /// Parses and checks a configuration file (see the module doc).
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        if bytes.len() > FILE_MAX {
            return Err(ConfigError::TooLarge { bytes: bytes.len() });
        }
        let text = core::str::from_utf8(bytes).map_err(|_| ConfigError::NotText)?;
        let Some(body) = text.strip_suffix('\n') else {
            return Err(match text.lines().next() {
                Some(first) if first.starts_with(MAGIC) => ConfigError::BadLine {
                    line: text.split('\n').count(),
                },
                _ => ConfigError::NotAConfig,
            });
        };
        let mut lines = body.split('\n');
        let first = lines.next().unwrap_or_default();
        let version = first
            .strip_prefix(MAGIC)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or(ConfigError::NotAConfig)?;
        if version != "1" {
            return Err(ConfigError::UnsupportedVersion(version.into()));
        }
        let mut name = None;
        let mut id = None;
        let mut memory = None;
        let mut guest: Option<String> = None;
        let mut append: Option<(usize, String)> = None;
        let mut snapshots = None;
        let mut disks: [Option<DiskEntry>; DISKS_MAX] = Default::default();
        let mut checkpoints: [Option<(usize, String)>; DISKS_MAX] = Default::default();
        for (i, l) in lines.enumerate() {
            let line = i + 2;
            if l.contains('\r') {
                return Err(ConfigError::BadLine { line });
            }
            let (key, value) = l.split_once('=').ok_or(ConfigError::BadLine { line })?;
            if value.len() > VALUE_MAX {
                return Err(ConfigError::TooLong {
                    line,
                    key: key.into(),
                });
            }
            let dup = || ConfigError::Duplicate {
                line,
                key: key.into(),
            };
            match key {
                "name" => {
                    if !crate::vm::name_ok(value) {
                        return Err(bad(
                            line,
                            key,
                            "a VM name is 1 to 32 characters of a-z, 0-9 and '-'",
                        ));
                    }
                    if name.replace(String::from(value)).is_some() {
                        return Err(dup());
                    }
                }
                "id" => {
                    let v = VmId::parse(value).ok_or_else(|| {
                        bad(line, key, "not an id (8-4-4-4-12 lowercase hex digits)")
                    })?;
                    if id.replace(v).is_some() {
                        return Err(dup());
                    }
                }
                "memory_mib" => {
                    let v = value
                        .parse::<u64>()
                        .ok()
                        .filter(|v| (MEMORY_MIB_MIN..=MEMORY_MIB_MAX).contains(v))
                        .filter(|_| !value.starts_with('+') && !value.starts_with('0'))
                        .ok_or_else(|| {
                            bad(
                                line,
                                key,
                                format!("not a number from {MEMORY_MIB_MIN} to {MEMORY_MIB_MAX}"),
                            )
                        })?;
                    if memory.replace(v).is_some() {
                        return Err(dup());
                    }
                }
                "guest" => {
                    let ok = !value.is_empty()
                        && value.len() <= GUEST_MAX
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                    if !ok {
                        return Err(bad(
                            line,
                            key,
                            format!("a guest is 1 to {GUEST_MAX} characters of a-z, 0-9 and '-'"),
                        ));
                    }
                    if guest.replace(value.into()).is_some() {
                        return Err(dup());
                    }
                }
                "append" => {
                    if value.len() > APPEND_MAX || value.chars().any(char::is_control) {
                        return Err(bad(
                            line,
                            key,
                            format!("at most {APPEND_MAX} printable characters"),
                        ));
                    }
                    if append.replace((line, value.into())).is_some() {
                        return Err(dup());
                    }
                }
                "snapshots" => {
                    check_location(value).map_err(|e| bad(line, key, e))?;
                    if snapshots.replace(String::from(value)).is_some() {
                        return Err(dup());
                    }
                }
                _ if key.starts_with("checkpoint.") => {
                    let slot = slot_of(line, key, "checkpoint.")?;
                    check_location(value).map_err(|e| bad(line, key, e))?;
                    if checkpoints[slot].replace((line, value.into())).is_some() {
                        return Err(dup());
                    }
                }
                _ => {
                    if !key.starts_with("disk.") {
                        return Err(ConfigError::UnknownKey {
                            line,
                            key: key.chars().take(40).collect(),
                        });
                    }
                    let slot = slot_of(line, key, "disk.")?;
                    let (kind, location) = value
                        .split_once(' ')
                        .ok_or_else(|| bad(line, key, "expected KIND STORE:path"))?;
                    let fixed = match kind {
                        "dynamic" => false,
                        "fixed" => true,
                        _ => return Err(bad(line, key, "the kind is 'dynamic' or 'fixed'")),
                    };
                    check_location(location).map_err(|e| bad(line, key, e))?;
                    let entry = DiskEntry {
                        fixed,
                        location: location.into(),
                        checkpoint: None,
                    };
                    if disks[slot].replace(entry).is_some() {
                        return Err(dup());
                    }
                }
            }
        }
        let guest = guest.ok_or(ConfigError::Missing("guest"))?;
        let boot = match (guest.as_str(), append) {
            (LINUX, append) => Boot::Linux {
                append: append.map(|(_, a)| a).unwrap_or_default(),
            },
            (_, Some((line, _))) => {
                return Err(bad(line, "append", "only a Linux VM (guest=linux) has one"))
            }
            (_, None) => Boot::Guest(guest),
        };
        for (slot, c) in checkpoints.into_iter().enumerate() {
            let Some((line, at)) = c else { continue };
            let Some(d) = disks[slot].as_mut() else {
                return Err(bad(
                    line,
                    "checkpoint",
                    format!("checkpoint.{slot} without disk.{slot}"),
                ));
            };
            if at == d.location {
                return Err(bad(
                    line,
                    "checkpoint",
                    "a disk cannot be its own checkpoint",
                ));
            }
            d.checkpoint = Some(at);
        }
        let count = disks.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
        let mut list = Vec::with_capacity(count);
        for (slot, d) in disks.into_iter().take(count).enumerate() {
            list.push(d.ok_or(ConfigError::SlotGap { slot })?);
        }
        Ok(VmConfig {
            name: name.ok_or(ConfigError::Missing("name"))?,
            id: id.ok_or(ConfigError::Missing("id"))?,
            memory_mib: memory.ok_or(ConfigError::Missing("memory_mib"))?,
            boot,
            disks: list,
            snapshots: snapshots.ok_or(ConfigError::Missing("snapshots"))?,
        })
    }

    /// The file's text (what [`VmConfig::parse`] reads back).
    pub fn render(&self) -> String {
        let mut s = format!(
            "{MAGIC} {VERSION}\nname={}\nid={}\nmemory_mib={}\n",
            self.name, self.id, self.memory_mib
        );
        match &self.boot {
            Boot::Guest(g) => s.push_str(&format!("guest={g}\n")),
            Boot::Linux { append } if append.is_empty() => s.push_str("guest=linux\n"),
            Boot::Linux { append } => s.push_str(&format!("guest=linux\nappend={append}\n")),
        }
        for (slot, d) in self.disks.iter().enumerate() {
            let kind = if d.fixed { "fixed" } else { "dynamic" };
            s.push_str(&format!("disk.{slot}={kind} {}\n", d.location));
            if let Some(c) = &d.checkpoint {
                s.push_str(&format!("checkpoint.{slot}={c}\n"));
            }
        }
        s.push_str(&format!("snapshots={}\n", self.snapshots));
        s
    }
}

/// What a node keeps of a VM's configuration besides the VM itself
/// (`Vm::placement`): its identity, where its file is, where its
/// checkpoints go, and what it boots (the VM's memory, name and disks it
/// knows itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub id: VmId,
    /// `STORE:path` of its configuration file; `None` when the node could
    /// not write one (a VM that arrived by live migration where a file of
    /// its name was in the way).
    pub at: Option<String>,
    /// `STORE:DIR` of its checkpoint files.
    pub snapshots: String,
    pub boot: Boot,
}

/// What a VM moving to another node brings of its configuration (the
/// `open` control's `vm_id` and `append`): the destination writes them
/// into the file it makes for the VM (`Managed::settle_placements`), so
/// the VM keeps its identity and a Linux VM its kernel arguments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    pub id: Option<VmId>,
    /// Only for a Linux VM.
    pub append: Option<String>,
}

impl Carried {
    /// What VM `vm` carries (nothing if the node keeps no file for it).
    pub fn of(vm: &crate::vm::Vm) -> Self {
        let Some(p) = vm.placement() else {
            return Self::default();
        };
        Self {
            id: Some(p.id),
            append: match &p.boot {
                Boot::Linux { append } => Some(append.clone()),
                Boot::Guest(_) => None,
            },
        }
    }

    /// The fields of an `open` from a peer for a VM of guest `guest`,
    /// checked: an id in GUID form, an `append` only for a Linux VM and
    /// valid as one.
    pub fn from_open(
        vm_id: Option<&str>,
        append: Option<&str>,
        guest: &str,
    ) -> Result<Self, String> {
        let id = match vm_id {
            None => None,
            Some(s) => Some(VmId::parse(s).ok_or_else(|| {
                let shown: String = s.chars().take(40).collect();
                format!("'{shown}' is not a VM id (8-4-4-4-12 lowercase hex digits)")
            })?),
        };
        if let Some(a) = append {
            if guest != LINUX {
                return Err("kernel arguments (append) for a VM that is not a Linux VM".into());
            }
            if a.len() > APPEND_MAX || a.chars().any(char::is_control) {
                return Err(format!(
                    "the VM's kernel arguments (append) are not at most {APPEND_MAX} printable characters"
                ));
            }
        }
        Ok(Self {
            id,
            append: append.map(String::from),
        })
    }
}

/// VM `vm`'s configuration as its file holds it.
pub fn of_vm(vm: &crate::vm::Vm, p: &Placement) -> VmConfig {
    VmConfig {
        name: vm.name().into(),
        id: p.id,
        memory_mib: vm.ram_bytes() >> 20,
        boot: p.boot.clone(),
        disks: vm
            .disk_meta()
            .iter()
            .map(|m| DiskEntry {
                fixed: m.fixed,
                location: m.location(),
                checkpoint: m.checkpoint.clone(),
            })
            .collect(),
        snapshots: p.snapshots.clone(),
    }
}

/// Rewrites VM `vm`'s configuration file (crash-safely, [`write`]) from
/// what the node knows of it now; nothing for a VM without one.
pub fn save(vm: &crate::vm::Vm, files: &dyn FileStore) -> Result<(), String> {
    let Some(p) = vm.placement() else {
        return Ok(());
    };
    let Some(at) = &p.at else {
        return Ok(());
    };
    write(files, at, &of_vm(vm, p))
}

/// A new identity from the node's entropy pool.
pub fn new_id(host: &mut dyn hvcore::host::Host) -> VmId {
    let mut b = [0u8; 16];
    host.entropy(&mut b);
    VmId(b)
}

/// Where a new VM's configuration goes on `store`: beside its disks,
/// `STORE:vms/VM/VM.vmcfg`.
pub fn default_location(store: &str, vm: &str) -> String {
    format!("{store}:vms/{vm}/{vm}.{EXTENSION}")
}

/// A new VM's snapshot location on `store`: `STORE:vms/VM/snapshots`.
pub fn default_snapshots(store: &str, vm: &str) -> String {
    format!("{store}:vms/{vm}/snapshots")
}

/// `STORE[:DIR]` of a move as a directory: `STORE:DIR`, or with a store
/// alone the store's own layout for VM `vm`, `STORE:vms/VM`.
pub fn dir_in(to: &str, vm: &str) -> String {
    match to.split_once(':') {
        Some((store, dir)) => {
            let dir = dir.trim_matches('/');
            if dir.is_empty() {
                format!("{store}:")
            } else {
                format!("{store}:{dir}")
            }
        }
        None => format!("{to}:vms/{vm}"),
    }
}

/// A file named `name` in the directory `dir` (`STORE:DIR` or `STORE:`).
pub fn file_in(dir: &str, name: &str) -> String {
    if dir.ends_with(':') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// The last part of a location's path.
pub fn file_name(at: &str) -> &str {
    let path = at.split_once(':').map_or(at, |(_, p)| p);
    path.rsplit('/').next().unwrap_or(path)
}

/// Writes `cfg` at `at` crash-safely: the whole text to `at`'s partial
/// file, then renamed over `at` (replacing an older configuration there)
/// and made durable. Afterwards `at` holds the new file, or, if this
/// fails at any point, the old one (or none, if there was none).
pub fn write(files: &dyn FileStore, at: &str, cfg: &VmConfig) -> Result<(), String> {
    let text = cfg.render();
    if text.len() > FILE_MAX {
        return Err(format!(
            "the configuration of VM {} would take {} bytes (at most {FILE_MAX})",
            cfg.name,
            text.len()
        ));
    }
    // Never write what this node could not read back (e.g. a guest name
    // the parser refuses).
    VmConfig::parse(text.as_bytes())
        .map_err(|e| format!("the configuration of VM {} is not valid: {e}", cfg.name))?;
    let mut file = files.replace_partial(at)?;
    let written = file
        .write_at(0, text.as_bytes())
        .and_then(|()| file.flush())
        .map_err(|e| format!("cannot write {at}: {e}"));
    drop(file);
    if let Err(e) = written.and_then(|()| files.commit_partial(at)) {
        files.remove_partial(at);
        return Err(e);
    }
    Ok(())
}

/// Reads and parses the configuration file at `at`.
pub fn read(files: &dyn FileStore, at: &str) -> Result<VmConfig, String> {
    if let Some(bytes) = files.file_bytes(at).filter(|&b| b > FILE_MAX as u64) {
        let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
        return Err(format!("{at}: {}", ConfigError::TooLarge { bytes }));
    }
    let bytes = files.read(at, FILE_MAX + 1)?;
    VmConfig::parse(&bytes).map_err(|e| format!("{at}: {e}"))
}

/// The fuzz target `vmconfig_parse`: any bytes into the parser; whatever
/// it accepts renders to text that parses to the same configuration
/// (the harness's own assertion; not built into the node).
#[cfg(any(test, feature = "testing"))]
pub fn fuzz_parse(data: &[u8]) {
    if let Ok(cfg) = VmConfig::parse(data) {
        let text = cfg.render();
        assert_eq!(VmConfig::parse(text.as_bytes()).as_ref(), Ok(&cfg));
    }
}

#[cfg(test)]
mod service_tests;
#[cfg(test)]
mod tests;
