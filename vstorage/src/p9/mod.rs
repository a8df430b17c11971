//! A 9P2000.L client: how a node reaches its stores (host directories
//! exported by QEMU's `-fsdev local` + `virtio-9p-pci`, docs/DESIGN.md
//! "Node stores").
//!
//! Logic only, like the rest of the crate: the client speaks to a
//! [`Transport`] (one whole request in, one whole reply out), which is the
//! virtio-9p device on the node (`hypervisor/src/virtio_9p.rs`, reached
//! through `hvcore::host::StoreChannel`) and a server double in tests.
//! Parts:
//! * [`wire`]: message encoding and the validating reply decoder (fuzzed:
//!   `vstorage/fuzz/fuzz_targets/p9_reply.rs`, `p9_session.rs`);
//! * [`client`]: version/attach, fids, and the operations (walk,
//!   lopen/lcreate, read/write in msize-bounded messages, fsync,
//!   getattr/setattr, statfs, rename/renameat, unlinkat, mkdir, readdir,
//!   clunk);
//! * [`server`] (`std`): a server double over a real host directory;
//! * [`fuzz`]: the harnesses the fuzz targets and the corpus test share.
//!
//! Everything the server sends is an allegation: see [`wire`] for the
//! checks and [`client`] for the bounds on memory and fids.

pub mod client;
pub mod fuzz;
#[cfg(feature = "std")]
pub mod server;
pub mod wire;

pub use client::{
    check_name, errno, errno_name, split_path, Client, Fid, Opened, P9Error, Transport,
    TransportError,
};
pub use wire::{open_flags, Attr, DirEntry, Op, ProtoError, Qid, StatFs};
