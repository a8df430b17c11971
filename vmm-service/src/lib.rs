//! The root partition service: everything the node does with VMs.
//!
//! Logic only (no unsafe, no hardware): it reaches the machine through
//! `hvcore::host::Host` and `Partition`, so `cargo test -p vmm-service`
//! runs it against doubles. Parts:
//! * [`loader`]: the guest kernel ELF into guest RAM, or a Linux bzImage
//!   and initramfs with its boot parameters and ACPI tables;
//! * [`start`]: the guest's start state (page tables, GDT, boot params);
//! * [`uart`], [`devices`]: device models (UART, the PC platform: 8259,
//!   8254, RTC, ACPI PM, I/O APIC, local APIC), the port I/O and MMIO
//!   buses, the interrupt path and the MMIO instruction emulator;
//! * [`hypercall`]: the hypercalls (generic exits are `hvcore::exit`'s);
//! * [`vm`]: a VM, its lifecycle and its worker loop;
//! * [`sched`]: round-robin time slices over VMs;
//! * [`migrate`]: live migration of a VM within the node;
//! * [`cases`], [`node`]: the node modes (test cases, demo, benchmark,
//!   heartbeat node, managed node);
//! * [`mgmt`]: the management API (server, jobs, handlers; the protocol
//!   itself is the `hvmgmt` crate);
//! * [`lease`]: which node may write a VM's files on a shared store
//!   (delta leases over a lease file; not yet taken by VMs);
//! * [`store`]: the node's stores (host directories over 9P2000.L) and
//!   their files as `vstorage::BlockIo`;
//! * [`checkpoint`]: checkpoints of a running VM's disks (a differencing
//!   child takes the writes; merged back into its base);
//! * [`vmconfig`]: VM configuration files on stores (format, parser,
//!   crash-safe writes);
//! * [`pump`]: the one piece that moves bytes between TCP sockets and the
//!   protocols spoken over them.
//!
//! Guest behaviour never panics the service: whatever a guest does ends in
//! an error return to it, an injected exception, or that VM being stopped
//! with a reason.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod cases;
pub mod checkpoint;
pub mod devices;
pub mod disks;
pub mod hypercall;
pub mod lease;
pub mod linux_cases;
pub mod loader;
pub mod mgmt;
pub mod migrate;
pub mod node;
pub mod pump;
pub mod sched;
pub mod start;
pub mod storage_migration;
pub mod store;
pub mod uart;
pub mod vm;
pub mod vmconfig;

/// Test doubles (host, partition, vCPU, memory, network): the host tests'
/// and, with the `testing` feature, the fuzz harnesses'. Not API.
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;

use hvcore::host::Host;

/// Run the node's service for ever (or until the node shuts down): the mode
/// named on the node command line, then power off with its exit code.
pub fn run(host: &mut dyn Host) -> ! {
    let code = node::main(host);
    host.shutdown(code)
}
