//! The VHDX format engine (MS-VHDX): dynamic, fixed and differencing disks,
//! the write-ahead log, and merge.
//!
//! `format`, `layout` and `log` are pure parsers/serializers and arithmetic
//! (what a structure says, where a virtual range lives, what a log entry
//! holds); `disk` moves bytes through a [`crate::BlockIo`] in the order the
//! crash-safety rules need. All file-derived values are bounded before use and
//! no input panics (see the `fuzz` harnesses, run by the cargo-fuzz targets
//! in `vstorage/fuzz/` and, over their seeds and regressions, by
//! `tests/fuzz_corpus.rs`).
//!
//! Using it:
//! - [`Vhdx::open`] / [`create`] over any `BlockIo`; with `std`,
//!   [`host::open_path`] (or `open_path_direct`) opens a file with its parent
//!   chain and [`host::create_path`] / [`host::create_differencing_path`]
//!   make new files.
//! - [`Vhdx`] implements [`crate::VirtualDisk`]. Writes are durable after
//!   `flush()`; block allocations (BAT and sector bitmap changes) are
//!   committed through the log at that flush, so another opener of the same
//!   file sees them only after it.
//! - Call [`Vhdx::close`] (drop does it best-effort) so the header's LogGuid
//!   is cleared and other implementations (QEMU) can open the file read-only.
//! - A file with a pending log is replayed on open: on disk when writable, in
//!   memory when read-only ([`log_replay_needed`] tells beforehand).

#[cfg(feature = "std")]
#[doc(hidden)]
pub mod crafted;
pub mod disk;
pub mod format;
#[doc(hidden)]
pub mod fuzz;
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
