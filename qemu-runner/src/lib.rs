//! qemu-runner: the host tool that builds the images, boots hvmigrate nodes
//! under an emulator and judges runs by their serial markers
//! (docs/DESIGN.md, "qemu-runner" and "Node serial markers").
//!
//! The logic is here, in the library, and unit-tested over captured serial
//! text: argument parsing ([`cli`], clap), `--accel kvm`'s host check
//! ([`accel`]), the fuzz step ([`fuzz`]), marker parsing ([`markers`],
//! [`migration_report`]), verdicts
//! and reports ([`summary`]), command construction ([`qemu`], [`cargo`],
//! [`setup`]) and the emulator process handling ([`process`]); the
//! cluster of background nodes ([`cluster`]), the migration-link relay
//! between them ([`relay`]) and the management client ([`hvctl`]).
//! `main.rs` only wires them into commands.

pub mod accel;
pub mod arch;
pub mod bench_migrate;
pub mod bench_modes;
pub mod bench_storage;
pub mod bochs;
pub mod cargo;
pub mod cli;
pub mod cluster;
pub mod demo;
#[cfg(test)]
mod fake_node;
pub mod fuzz;
pub mod hvctl;
pub mod linux_image;
pub mod markers;
pub mod migration_report;
pub mod process;
pub mod qemu;
pub mod relay;
pub mod setup;
pub mod summary;
