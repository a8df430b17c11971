//! Placeholder for the one-pass copy engine (owned by the storage-migration
//! work); replaced by the real engine.
use std::path::Path;

/// Copies `src` to `dst` (VHDX or raw by extension).
pub fn cli_copy(_src: &Path, _dst: &Path, _progress: bool) -> Result<(), String> {
    Err("copy engine not built yet".into())
}
