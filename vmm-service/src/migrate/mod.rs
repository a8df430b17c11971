//! Live migration on the node: every migration is two jobs that the node's
//! main loop steps between the management server and the VM scheduler
//! ([`Migrations::drive`]), so other VMs keep running and the API answers
//! (progress, cancel, other requests) while VMs move.
//!
//! * the *source* job ([`outgoing`]) on the node the VM leaves: it connects
//!   to the destination, authenticates, asks it to take the VM (`open`),
//!   then steps the pre-copy engine (`migration::Migration`) with the VM
//!   borrowed out of the node's VM table and the link lent for the step;
//! * the *receiving* job ([`incoming`]) on the node the VM goes to: it
//!   accepts the connection, authenticates, checks the `open` (name, memory,
//!   CPU compatibility, its limit) before any page moves, creates the empty
//!   VM (listed `incoming`) and steps the receiving engine
//!   (`migration::Receiver`).
//!
//! A move within the node is the same two jobs over an in-memory pipe
//! ([`local`]: the test cases and the demo use it): one code path. Between
//! nodes the link is TCP on the migration NIC through the socket pump
//! ([`wire`]), authenticated with the cluster key and sealed frame by
//! frame ([`channel`], `migration::seal`). docs/DESIGN.md ("Live migration
//! between nodes") has the protocol; docs/MANAGEMENT.md the API.
//!
//! Invariants:
//! * until the source sends `go` every failure (link cut or silent, the
//!   destination refusing, dying or timing out, a cancel, a timeout) leaves
//!   the VM running at the source with its memory untouched (the engine
//!   only reads it) and the job failed or cancelled naming the cause;
//! * the destination resumes only on `go`; the source VM leaves the VM
//!   table only once the destination said `resumed`;
//! * after `go` without `resumed` the job is in doubt: the source keeps its
//!   copy paused and asks the destination (a new connection, `query`),
//!   which answers from its record of migrations it accepted and decides
//!   any it is still waiting on (discards it); the source acts only on
//!   that answer ([`outgoing`]);
//! * while a migration moves a VM (either end) no request changes it: the
//!   VM carries a [`MigrationMark`] and the API refuses with
//!   `vm-migrating`;
//! * the guest's dirty-log hypercalls are refused (`HC_ERR_BUSY`) while
//!   the migration owns the log; with `Policy::verify_memory` a write the
//!   log missed anyway fails the migration at the switch-over;
//! * one `migration-report {json}` line per outgoing migration on the
//!   node console.

pub mod adapt;
pub mod channel;
pub mod incoming;
pub mod local;
pub mod outgoing;
pub mod quick;
pub mod remote_disk;
pub mod wire;

mod set;
#[cfg(test)]
mod twonode;

pub use local::{migrate_local, run_until, Faults, LocalOutcome};
pub use set::{migrating, Migrations, MoveRequest};

use crate::devices::Devices;
use crate::vm::MigrationMark;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use hvcore::cpuid::guest_cpuid;
use hvcore::host::CpuidSource;
use migration::{CpuidEntry, DeviceDesc, VmConfig};

/// `dirty_tracker` of the report: nested-page write protection.
pub const TRACKER_WRITE_PROTECT: &str = "write-protect";
/// `dirty_tracker` of the report: Intel page-modification logging.
pub const TRACKER_PML: &str = "pml";

/// Device kind of the port I/O bus state ([`Devices::save`]), the one
/// device record of our VMs.
pub const DEVICE_KIND_PORT_BUS: u16 = 1;
/// Most engine time per job per round of the node loop before the guests
/// run again. The node has one CPU: against [`GUEST_SLICE_NS`] of guest
/// time this gives a migration about 60% of it while its guest runs (QEMU
/// runs its migration on a thread of its own beside the vCPUs); a 2 ms
/// slice held pre-copy of a busy guest to a third of the CPU (bench
/// migrate: 5-9 MB/s).
pub const ENGINE_SLICE_NS: u64 = 6_000_000;
/// Guest time per round of the node loop while migrations run.
pub const GUEST_SLICE_NS: u64 = 4_000_000;
/// Connecting, authenticating and the destination's answer to `open`
/// must take at most this long.
pub const NEGOTIATION_TIMEOUT_NS: u64 = 10_000_000_000;
/// A source in doubt asks the destination this often.
pub const QUERY_INTERVAL_NS: u64 = 2_000_000_000;
/// A source the destination answered `busy` asks again after this long.
pub const BUSY_RETRY_NS: u64 = 1_000_000_000;
/// A finished connection has this long to deliver its last bytes.
pub const DRAIN_TIMEOUT_NS: u64 = 5_000_000_000;
/// Migrations a destination remembers for in-doubt questions.
pub const RECORDS_MAX: usize = 64;
/// Connections a node serves before they become jobs (handshake, `open`
/// or `query`).
pub const ACCEPTING_MAX: usize = 4;

/// The CPUID leaves the configuration record carries: what the guest may
/// have cached (vendor, feature flags) and the destination must show too.
pub const CPUID_LEAVES: [(u32, u32); 6] = [
    (0, 0),
    (1, 0),
    (7, 0),
    (0x8000_0000, 0),
    (0x8000_0001, 0),
    (0x8000_0007, 0),
];

/// The configuration record of one of our VMs on this host: RAM, one
/// vCPU, the port bus, and the CPUID leaves the guest sees here
/// ([`CPUID_LEAVES`], through the hypervisor's CPUID policy).
pub fn vm_config(host: &dyn CpuidSource, ram_bytes: u64) -> VmConfig {
    VmConfig {
        ram_bytes,
        vcpus: 1,
        devices: vec![DeviceDesc {
            kind: DEVICE_KIND_PORT_BUS,
            instance: 0,
            version: u32::from(Devices::SAVE_VERSION),
        }],
        cpuid: CPUID_LEAVES
            .iter()
            .map(|&(leaf, subleaf)| {
                let r = guest_cpuid(host, leaf, subleaf);
                CpuidEntry {
                    leaf,
                    subleaf,
                    eax: r.eax,
                    ebx: r.ebx,
                    ecx: r.ecx,
                    edx: r.edx,
                }
            })
            .collect(),
    }
}

/// Whether this host can run a VM whose guest saw `theirs` faithfully:
/// the same CPU vendor, and every feature flag the guest saw offered here
/// too (a guest may have cached them at boot). `Err` names the first
/// difference.
pub fn check_cpuid(host: &dyn CpuidSource, theirs: &[CpuidEntry]) -> Result<(), String> {
    for e in theirs {
        let ours = guest_cpuid(host, e.leaf, e.subleaf);
        match (e.leaf, e.subleaf) {
            (0, 0) if (ours.ebx, ours.edx, ours.ecx) != (e.ebx, e.edx, e.ecx) => {
                return Err(format!(
                    "the guest runs on a {} CPU, this node's is {}",
                    vendor(e.ebx, e.edx, e.ecx),
                    vendor(ours.ebx, ours.edx, ours.ecx)
                ));
            }
            (1, 0) | (7, 0) | (0x8000_0001, 0) | (0x8000_0007, 0) => {
                let regs = [
                    ("EBX", e.ebx, ours.ebx),
                    ("ECX", e.ecx, ours.ecx),
                    ("EDX", e.edx, ours.edx),
                ];
                for (name, want, have) in regs {
                    // Leaf 1 EBX holds the APIC ID and CLFLUSH size, not
                    // flags.
                    if (e.leaf, name) == (1, "EBX") {
                        continue;
                    }
                    let missing = want & !have;
                    if missing != 0 {
                        return Err(format!(
                            "the guest saw CPUID.{:#x}:{name} bit {}, which this node's CPU does not offer",
                            e.leaf,
                            missing.trailing_zeros()
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn vendor(ebx: u32, edx: u32, ecx: u32) -> String {
    let mut b = Vec::with_capacity(12);
    for r in [ebx, edx, ecx] {
        b.extend_from_slice(&r.to_le_bytes());
    }
    let s: String = b
        .iter()
        .map(|&c| if c.is_ascii_graphic() { c as char } else { '?' })
        .collect();
    s
}

/// The mark of a VM moved by outgoing job `job`.
pub(crate) fn outgoing_mark(job: u64) -> MigrationMark {
    MigrationMark {
        job,
        incoming: false,
    }
}

/// The mark of a VM filled by incoming job `job`.
pub(crate) fn incoming_mark(job: u64) -> MigrationMark {
    MigrationMark {
        job,
        incoming: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{svm_vmx_cpuid, FakeCpuid};
    use hvcore::host::CpuidResult;

    #[test]
    fn cpuid_compatibility_names_the_difference() {
        let mut a: FakeCpuid = svm_vmx_cpuid();
        a.leaves.insert(
            (0, 0),
            CpuidResult {
                eax: 0xd,
                ebx: u32::from_le_bytes(*b"Auth"),
                edx: u32::from_le_bytes(*b"enti"),
                ecx: u32::from_le_bytes(*b"cAMD"),
            },
        );
        a.leaves.insert(
            (7, 0),
            CpuidResult {
                ebx: (1 << 9) | (1 << 3),
                ..CpuidResult::default()
            },
        );
        let cfg = vm_config(&a, 4 << 20);
        assert_eq!(cfg.cpuid.len(), CPUID_LEAVES.len());
        assert_eq!(check_cpuid(&a, &cfg.cpuid), Ok(()));
        // More features here: fine.
        let mut more = a.clone();
        more.leaves.get_mut(&(7, 0)).unwrap().ebx |= 1 << 8;
        assert_eq!(check_cpuid(&more, &cfg.cpuid), Ok(()));
        // One the guest saw is missing.
        let mut less = a.clone();
        less.leaves.get_mut(&(7, 0)).unwrap().ebx = 1 << 3;
        assert_eq!(
            check_cpuid(&less, &cfg.cpuid),
            Err("the guest saw CPUID.0x7:EBX bit 9, which this node's CPU does not offer".into())
        );
        // Another vendor.
        let mut intel = a.clone();
        intel.leaves.insert(
            (0, 0),
            CpuidResult {
                eax: 0xd,
                ebx: u32::from_le_bytes(*b"Genu"),
                edx: u32::from_le_bytes(*b"ineI"),
                ecx: u32::from_le_bytes(*b"ntel"),
            },
        );
        assert_eq!(
            check_cpuid(&intel, &cfg.cpuid),
            Err("the guest runs on a AuthenticAMD CPU, this node's is GenuineIntel".into())
        );
        // The hypervisor's policy applies on both sides: VMX/SVM, which the
        // guest never sees, do not count.
        let mut no_svm = a.clone();
        no_svm.leaves.get_mut(&(0x8000_0001, 0)).unwrap().ecx = 0;
        assert_eq!(check_cpuid(&no_svm, &cfg.cpuid), Ok(()));
    }
}
