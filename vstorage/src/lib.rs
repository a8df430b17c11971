//! Virtual storage: the VHDX engine, volumes, write mirroring, the
//! one-pass copy engine used by storage live migration, and the 9P2000.L
//! client through which a node reaches its stores ([`p9`]).
//!
//! Logic only (no_std + alloc, no unsafe). Host files come in through the
//! `std` feature ([`io::FileIo`]); everything else reaches storage through the
//! [`BlockIo`] trait and presents disks through [`VirtualDisk`].
#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod io;
pub mod vhdx;

#[cfg(feature = "cli")]
pub mod cli;
pub mod copy;
#[cfg(feature = "std")]
pub mod fsops;
pub mod mirror;
pub mod p9;

#[cfg(feature = "std")]
pub use io::FileIo;
pub use io::{BlockIo, DiskError, IoError, MemIo, RawDisk, VirtualDisk};
