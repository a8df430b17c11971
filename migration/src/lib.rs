//! Live migration: the pre-copy engine, the versioned stream format and
//! vendor-neutral VM state records.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;
