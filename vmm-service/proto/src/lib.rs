//! The management protocol of hvmigrate nodes (docs/MANAGEMENT.md), in a
//! crate of its own so that both ends depend on the same code: the node
//! (`vmm-service`, which adds the server's connection policy and the request
//! handlers) and the client (`hvctl` in `qemu-runner`), which needs nothing
//! else of the node.
//!
//! Logic only (no_std with alloc, no unsafe): every part consumes and
//! produces bytes or values, so the host tests run both ends in memory.
//! * [`wire`]: length-prefixed frames with a size cap;
//! * [`auth`]: the cluster key, nonces, the mutual HMAC-SHA256
//!   challenge-response, the per-frame tags of an authenticated session and
//!   the node's replay window;
//! * [`proto`]: versioned request and response types (JSON bodies);
//! * [`client`]: the client end's connection state machine.
//!
//! Invariants: bytes from the network are allegations (STYLE 4): every
//! length and count is capped, anything malformed ends in an error value,
//! never in a panic. The cluster key never leaves its holder: only HMACs
//! over fresh nonces and frame contents cross the wire.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod auth;
pub mod client;
pub mod proto;
pub mod wire;
