//! The management API: what `hvctl` (and later other nodes) talk to over TCP.
//!
//! Logic only: every part consumes and produces bytes or values, so the
//! node's network wiring is thin and the host tests run both ends in memory.
//! The protocol is specified in `docs/MANAGEMENT.md`; the parts are:
//! * [`wire`]: length-prefixed frames with a size cap;
//! * [`auth`]: the cluster key, nonces, the mutual HMAC-SHA256
//!   challenge-response and the per-frame tags of an authenticated session;
//! * [`proto`]: versioned request and response types (JSON bodies);
//! * [`conn`]: the connection state machines, server ([`conn::ServerConn`])
//!   and client ([`conn::ClientConn`]);
//! * [`jobs`]: the job table and the host's migration limits with queueing;
//! * [`service`]: the request handlers over the node's VM table.
//!
//! Invariants: bytes from the network are allegations (STYLE 4): every
//! length and count is capped, anything malformed ends in an error reply
//! (or, when the stream can no longer be trusted, in closing that one
//! connection), never in a panic. The cluster key never leaves the node:
//! only HMACs over fresh nonces and frame contents cross the wire.

pub mod auth;
pub mod conn;
pub mod jobs;
pub mod proto;
pub mod service;
pub mod wire;
