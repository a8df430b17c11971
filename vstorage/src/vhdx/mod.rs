//! The VHDX format engine (MS-VHDX): dynamic, fixed and differencing disks,
//! the write-ahead log, and merge.
//!
//! `format`, `layout` and `log` are pure parsers/serializers and arithmetic;
//! `disk` moves bytes through a [`crate::BlockIo`]. All file-derived values
//! are bounded before use; no input panics (see `fuzz_harness`).

pub mod disk;
pub mod format;
mod fuzz;
#[cfg(feature = "std")]
pub mod host;
pub mod layout;
pub mod log;

pub use disk::{create, log_replay_needed, CreateParams, DiskKind, OpenOptions, ParentSpec, Vhdx};
pub use format::{Guid, GuidGen, ParentLocator};
#[doc(hidden)]
pub use fuzz::fuzz_harness;

#[cfg(test)]
mod tests;
