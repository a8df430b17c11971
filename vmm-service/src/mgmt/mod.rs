//! The management API: what `hvctl` (and later other nodes) talk to over TCP.
//!
//! Logic only: every part consumes and produces bytes or values, so the
//! node's network wiring is thin and the host tests run both ends in memory.
//! The protocol is specified in `docs/MANAGEMENT.md`. Its shared half (the
//! frames, the authentication, the request and response types and the
//! client end) is the `hvmgmt` crate, re-exported here as [`wire`], [`auth`]
//! and [`proto`]; the node's half is here:
//! * [`conn`]: the server's connection state machine ([`conn::ServerConn`]),
//!   with a deadline in every state;
//! * [`server`]: the management server: connection slots over socket pumps
//!   (`crate::pump`), admission and eviction;
//! * [`service`]: the request handlers over the node's VM table;
//! * [`jobs`]: the job table and the host's migration limits with queueing;
//! * [`bench`]: the link benchmark's jobs.
//!
//! Invariants: bytes from the network are allegations (STYLE 4): every
//! length and count is capped, anything malformed ends in an error reply
//! (or, when the stream can no longer be trusted, in closing that one
//! connection), never in a panic. The cluster key never leaves the node:
//! only HMACs over fresh nonces and frame contents cross the wire.

pub use hvmgmt::{auth, proto, wire};

pub mod bench;
pub mod conn;
pub mod jobs;
pub mod server;
pub mod service;

#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod rig;

// The protocol's limits are the VM table's: a name the protocol accepts
// must be one a VM can have, and a console request may ask for every line
// the node keeps.
const _: () = assert!(proto::NAME_MAX == crate::vm::NAME_MAX);
const _: () = assert!(proto::CONSOLE_LINES_MAX as usize == crate::vm::RECENT_LINES);
