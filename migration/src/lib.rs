//! Live migration logic: the pre-copy engine, the versioned migration
//! stream and the vendor-neutral VM state records.
//!
//! Role: everything about moving a running VM that does not touch the
//! machine. The hypervisor implements small traits and drives two
//! step-wise state machines, lending them the VM and the link for each
//! step (the engines own neither):
//! - source: [`MigratableVm`] (pages, dirty log, throttle, pause/resume,
//!   saving vCPU and device state) and [`Transport`]; driven by
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
//! let mut m = Migration::new(&vm,         let mut r = Receiver::new(now);
//!                 policy, now);
//! loop {                                  loop {
//!     match m.step(&mut vm, &mut link,        match r.step(&mut empty_vm, &mut link, now) {
//!                  now) {                         RecvProgress::Busy => {}
//!         Progress::Busy => {}                    RecvProgress::Waiting => run_guests(),
//!         Progress::Waiting { max_ns } =>         RecvProgress::Finished(_) => break,
//!             run_guests_for(max_ns),         }
//!         Progress::Finished(_) => break, }
//!     }                                   // r.outcome(): completed -> VM runs here
//! }
//! print("migration-report {}", m.report().to_json());
//! // completed: remove the (paused) source VM; cancelled/failed: it runs on,
//! // unless m.in_doubt() (paused; ask the destination, then
//! // m.resolve_in_doubt(..)).
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
pub mod seal;
pub mod source;
pub mod state;
pub mod stream;
pub mod transport;
mod wire;

pub use bitmap::DirtyBitmap;
pub use error::{MigrationError, StreamError, TransportError, VmError};
pub use policy::Policy;
pub use receiver::{DestinationVm, DigestCheck, ReceiveOutcome, Receiver, RecvProgress};
pub use report::{MigrationReport, MigrationResult, PausePhases};
pub use source::{MigratableVm, Migration, Progress, Stage, Status};
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
