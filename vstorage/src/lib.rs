//! Virtual storage: the VHDX engine, volumes, write mirroring and the
//! one-pass copy engine used by storage live migration.
#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;
