//! Live migration logic: the pre-copy engine, the versioned migration
//! stream and the vendor-neutral VM state records.
//!
//! Role: everything about moving a running VM that does not touch the
//! machine. The hypervisor implements three small traits and drives two
//! step-wise state machines:
//! - source: [`MigratableVm`] (pages, dirty log, throttle, pause/resume,
//!   saving vCPU and device state), [`Transport`], [`Clock`]; driven by
//!   [`Migration::step`];
//! - destination: [`DestinationVm`] and [`Transport`]; driven by
//!   [`Receiver::step`].
//!
//! The wire format and its state machine are documented in [`stream`], the
//! final memory digest in [`digest`], the pre-copy policy in [`policy`].
//! Verification mode (`Policy::verify_memory`, protocol version 2) checks
//! the whole memory at switch-over on both sides, so a write the dirty log
//! missed fails the migration instead of leaving a stale page behind
//! ([`stream`], "Verification mode").
//!
//! How a node drives it (sketch; `tests/local.rs` runs exactly this shape,
//! `tests/simulation.rs` the two-host shape with threads):
//!
//! ```text
//! // source host                          // destination host
//! let mut m = Migration::new(vm, link,    let mut r = Receiver::new(empty_vm, link);
//!                 clock, policy);
//! loop {                                  loop {
//!     match m.step() {                        match r.step() {
//!         Progress::Busy => {}                    RecvProgress::Busy => {}
//!         Progress::Waiting { max_ns } =>         RecvProgress::Waiting => run_guests(),
//!             run_guests_for(max_ns),             RecvProgress::Finished(_) => break,
//!         Progress::Finished(_) => break,     }
//!     }                                   }
//! }                                       // r.outcome(): completed -> VM runs here
//! print("migration-report {}", m.report().to_json());
//! // completed: remove the (paused) source VM; cancelled/failed: it runs on,
//! // unless m.error() is InDoubt (paused; ask the destination).
//! ```
//!
//! Invariants:
//! - No panic on stream bytes (STYLE 4): the decoder bounds every length and
//!   count and returns [`StreamError`]. Fuzzed by `migration/fuzz` and by the
//!   corpus test `tests/corpus.rs`.
//! - Until the commit point (the source sends `go`) the VM is running, or
//!   can be resumed, at the source: every failure leads back there.
//! - Guest frames are plain `u64` frame numbers here (`gfn`), the value of
//!   `hvcore::addr::Gfn`; the crate stays free of hypervisor dependencies.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod bitmap;
pub mod digest;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod policy;
pub mod receiver;
pub mod report;
pub mod source;
pub mod state;
pub mod stream;
pub mod transport;
mod wire;

pub use bitmap::DirtyBitmap;
pub use error::{MigrationError, StreamError, TransportError, VmError};
pub use policy::Policy;
pub use receiver::{DestinationVm, DigestCheck, ReceiveOutcome, Receiver, RecvProgress};
pub use report::{MigrationReport, MigrationResult};
pub use source::{Clock, MigratableVm, Migration, Progress};
pub use state::{
    CpuidEntry, DeviceDesc, DeviceState, EventKind, FpuState, Msrs, PendingEvent, Regs, Segment,
    TableReg, VcpuState, VmConfig,
};
pub use stream::{Decoder, Direction, Record};
pub use transport::{MemPipe, Transport};

/// Bytes per guest page.
pub const PAGE_SIZE: usize = 4096;

/// One guest page.
pub type Page = [u8; PAGE_SIZE];
