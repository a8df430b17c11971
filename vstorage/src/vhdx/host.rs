//! Host helpers (std only): open a VHDX file with its parent chain, create
//! dynamic/fixed/differencing files, and seed GUID generation.
//!
//! Parent paths are stored the MS-VHDX way ('\'-separated): `relative_path`
//! relative to the child's directory and `absolute_win32_path` as
//! `\\?\` + the absolute host path. Resolution tries them in that order
//! (MS-VHDX 2.6.2.6.3); `volume_path` has no meaning on this host.

use super::disk::{create, CreateParams, OpenOptions, ParentSpec, Vhdx};
use super::format::ParentLocator;
use crate::io::{DiskError, FileIo};
use std::path::{Component, Path, PathBuf};

/// Longest parent chain followed.
pub const MAX_CHAIN_DEPTH: usize = 32;

/// A seed for GUIDs from /dev/urandom, the clock and the process id.
pub fn new_seed() -> u64 {
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (u64::from(std::process::id()) << 32);
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let mut b = [0u8; 8];
        if std::io::Read::read_exact(&mut f, &mut b).is_ok() {
            seed ^= u64::from_le_bytes(b);
        }
    }
    seed
}

fn host_err(what: &str, path: &Path, e: impl std::fmt::Display) -> DiskError {
    DiskError::Open(format!("{what} {}: {e}", path.display()))
}

fn open_file(path: &Path, writable: bool, direct: bool) -> Result<FileIo, DiskError> {
    let r = if direct {
        FileIo::open_direct(path, writable)
    } else {
        FileIo::open(path, writable)
    };
    r.map_err(|e| host_err("cannot open", path, e))
}

/// Where the parent of `child` is, per its locator.
pub fn resolve_parent(child: &Path, locator: &ParentLocator) -> Result<PathBuf, DiskError> {
    let dir = child.parent().unwrap_or(Path::new("."));
    let mut tried = Vec::new();
    if let Some(rel) = locator.get("relative_path") {
        let p = dir.join(rel.replace('\\', "/"));
        if p.is_file() {
            return Ok(p);
        }
        tried.push(p.display().to_string());
    }
    if let Some(abs) = locator.get("absolute_win32_path") {
        let s = abs
            .strip_prefix("\\\\?\\")
            .unwrap_or(abs)
            .replace('\\', "/");
        let p = if s.starts_with('/') {
            PathBuf::from(s)
        } else {
            PathBuf::from(format!("/{s}"))
        };
        if p.is_file() {
            return Ok(p);
        }
        tried.push(p.display().to_string());
    }
    if tried.is_empty() {
        return Err(DiskError::Open(
            "parent locator has no relative_path or absolute_win32_path".into(),
        ));
    }
    Err(DiskError::Open(format!(
        "parent of {} not found (tried {})",
        child.display(),
        tried.join(", ")
    )))
}

/// The parent path recorded in `d` as this host would resolve it, or the raw
/// stored value when it cannot be found.
pub fn parent_display(child: &Path, d: &Vhdx<FileIo>) -> Option<String> {
    let pl = d.parent_locator()?;
    match resolve_parent(child, pl) {
        Ok(p) => Some(p.display().to_string()),
        Err(_) => pl
            .get("relative_path")
            .or_else(|| pl.get("absolute_win32_path"))
            .map(str::to_string),
    }
}

/// Opens `path` (buffered) and its parent chain read-only.
pub fn open_path(path: &Path, writable: bool) -> Result<Vhdx<FileIo>, DiskError> {
    open_chain(path, writable, false, false, 0)
}

/// Like [`open_path`] with `O_DIRECT` where the filesystem allows it.
pub fn open_path_direct(path: &Path, writable: bool) -> Result<Vhdx<FileIo>, DiskError> {
    open_chain(path, writable, false, true, 0)
}

/// Opens a differencing disk with its immediate parent writable (for merge).
pub fn open_for_merge(path: &Path) -> Result<Vhdx<FileIo>, DiskError> {
    open_chain(path, false, true, false, 0)
}

fn open_chain(
    path: &Path,
    writable: bool,
    parent_writable: bool,
    direct: bool,
    depth: usize,
) -> Result<Vhdx<FileIo>, DiskError> {
    if depth > MAX_CHAIN_DEPTH {
        return Err(DiskError::Open(format!(
            "parent chain deeper than {MAX_CHAIN_DEPTH} (a loop?)"
        )));
    }
    let io = open_file(path, writable, direct)?;
    let opts = if writable {
        OpenOptions::read_write(new_seed())
    } else {
        OpenOptions::read_only()
    };
    let mut d = Vhdx::open(io, opts).map_err(|e| name(path, e))?;
    if let Some(pl) = d.parent_locator() {
        let pp = resolve_parent(path, pl)?;
        let parent = open_chain(&pp, parent_writable, false, direct, depth + 1)?;
        d.attach_parent(parent).map_err(|e| name(path, e))?;
        // Once the chain opens, stale locator paths are brought up to date
        // (MS-VHDX 2.6.2.6.3); only when we may write the child anyway.
        if writable {
            let (rel, abs) = locator_paths(path, &pp)?;
            d.update_parent_paths(Some(rel), Some(abs))?;
        }
    }
    Ok(d)
}

/// Prefixes an error with the file it concerns.
fn name(path: &Path, e: DiskError) -> DiskError {
    let p = path.display();
    match e {
        DiskError::Open(m) => DiskError::Open(format!("{p}: {m}")),
        DiskError::Corrupt(m) => DiskError::Corrupt(format!("{p}: {m}")),
        other => other,
    }
}

/// Creates (truncating) a dynamic or fixed VHDX at `path` (a fixed one
/// with its space allocated) and syncs its directory.
pub fn create_path(path: &Path, params: &CreateParams) -> Result<Vhdx<FileIo>, DiskError> {
    // Refuse bad parameters before truncating anything.
    params.validate()?;
    let io = FileIo::create(path).map_err(|e| host_err("cannot create", path, e))?;
    let mut p = params.clone();
    if p.guid_seed == 0 {
        p.guid_seed = new_seed();
    }
    let d = create(io, &p)?;
    // The new name is durable before anyone relies on the file.
    crate::fsops::created(&crate::fsops::HostFileOps, path)
        .map_err(|e| host_err("cannot sync the directory of", path, e))?;
    Ok(d)
}

/// `to` expressed relative to directory `from` (both absolute).
fn relative_to(to: &Path, from: &Path) -> PathBuf {
    let t: Vec<Component> = to.components().collect();
    let f: Vec<Component> = from.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    out
}

/// The `relative_path` (from the child's directory) and
/// `absolute_win32_path` values naming `parent` for `child`.
pub fn locator_paths(child: &Path, parent: &Path) -> Result<(String, String), DiskError> {
    let parent_abs =
        std::fs::canonicalize(parent).map_err(|e| host_err("cannot resolve", parent, e))?;
    let child_dir = child
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let child_dir_abs =
        std::fs::canonicalize(child_dir).map_err(|e| host_err("cannot resolve", child_dir, e))?;
    let rel = relative_to(&parent_abs, &child_dir_abs)
        .to_string_lossy()
        .replace('/', "\\");
    let abs = format!(
        "\\\\?\\{}",
        parent_abs
            .to_string_lossy()
            .trim_start_matches('/')
            .replace('/', "\\")
    );
    Ok((rel, abs))
}

/// Creates a differencing VHDX at `child` whose parent is `parent`.
pub fn create_differencing_path(
    child: &Path,
    parent: &Path,
    block_size: Option<u32>,
) -> Result<Vhdx<FileIo>, DiskError> {
    if let (Ok(a), Ok(b)) = (std::fs::canonicalize(child), std::fs::canonicalize(parent)) {
        if a == b {
            return Err(DiskError::Open(format!(
                "{} cannot be its own parent",
                child.display()
            )));
        }
    }
    let pd = open_path(parent, false)?;
    let (rel, abs) = locator_paths(child, parent)?;
    let spec = ParentSpec {
        data_write_guid: pd.header().data_write_guid,
        relative_path: Some(rel),
        absolute_path: Some(abs),
        virtual_size: pd.virtual_size_bytes(),
        logical_sector_size: pd.logical_sector_bytes(),
        physical_sector_size: pd.physical_sector_size(),
        disk_id: pd.disk_id(),
    };
    let mut p = CreateParams::dynamic(spec.virtual_size);
    p.block_size = block_size.unwrap_or(pd.block_size());
    p.parent = Some(spec);
    drop(pd);
    let mut d = create_path(child, &p)?;
    let parent = open_path(parent, false)?;
    d.attach_parent(parent)?;
    Ok(d)
}
