//! The device side of the vCPU loop: what [`crate::vm::Vm::run_slice`]
//! does with the exits `hvcore::exit::handle` leaves for device models,
//! and the interrupt delivery before each entry. Written against the
//! vendor-neutral [`Vcpu`] and [`Partition`] only.
//!
//! * [`deliver`]: before every entry of a VM with interrupt controllers,
//!   the next pending event is injected if the guest can take it now, else
//!   the backend is asked for the window exit that says when it can (an
//!   interrupt window for a vector, an NMI window for an NMI: never a
//!   window that is already open, which would exit forever);
//! * [`mmio`]: a data access to guest-physical memory that is not RAM is
//!   emulated in software: the instruction is fetched at RIP through the
//!   guest's page tables ([`walk::fetch`]) and decoded ([`super::mmio`]).
//!   There are no decode assists (TCG's SVM has none) and NRIPS is never
//!   used: the decoder's length advances RIP;
//! * [`msr_read`] / [`msr_write`]: IA32_TSC_DEADLINE, the local APIC
//!   timer's deadline, in guest TSC ticks.
//!
//! Failures: an instruction that cannot be fetched or decoded stops the
//! VM with an [`MmioError`] that names the address and the bytes (STYLE 4,
//! rule 3: the guest broke what we emulate; nothing was accessed).

use super::irq::{InterruptPoll, Readiness};
use super::mmio::{CpuMode, DecodeError, MAX_INSN_BYTES};
use super::walk::{self, Paging, WalkError};
use super::{Devices, Machine};
use core::fmt;
use hvcore::exit::{complete_msr_read, refuse_msr};
use hvcore::host::Partition;
use hvcore::msr::{IA32_TSC, IA32_TSC_DEADLINE};
use hvcore::vcpu::Vcpu;

/// EFER.LMA.
const EFER_LMA: u64 = 1 << 10;

/// Inject the next pending event into `vcpu` if it can take it, else open
/// the window that will say when it can. Machines without interrupt
/// controllers have nothing to deliver.
pub fn deliver(devices: &mut Devices, vcpu: &mut dyn Vcpu) {
    if devices.machine() != Machine::Pc {
        return;
    }
    let r = vcpu.readiness();
    let ready = Readiness {
        interrupt: r.interrupt,
        nmi: r.nmi,
    };
    match devices.poll_interrupt(ready) {
        InterruptPoll::Idle => vcpu.set_event_windows(false, false),
        InterruptPoll::Vector(v) => {
            vcpu.inject_interrupt(v);
            vcpu.set_event_windows(false, false);
        }
        InterruptPoll::Nmi => {
            vcpu.inject_nmi();
            vcpu.set_event_windows(false, false);
        }
        InterruptPoll::Blocked => {
            // The controllers put a pending NMI first.
            let nmi = devices
                .irq_chip()
                .is_some_and(|chip| chip.lapic.nmi_pending());
            vcpu.set_event_windows(!nmi && !r.interrupt, nmi && !r.nmi);
        }
    }
}

/// Why an MMIO access could not be emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioError {
    /// The instruction's bytes could not be read at RIP.
    Fetch { rip: u64, gpa: u64, err: WalkError },
    /// They are no instruction the emulator handles.
    Decode {
        rip: u64,
        gpa: u64,
        err: DecodeError,
        bytes: [u8; MAX_INSN_BYTES],
        len: usize,
    },
}

impl fmt::Display for MmioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmioError::Fetch { rip, gpa, err } => write!(
                f,
                "MMIO access to {gpa:#x}: cannot read the instruction at RIP {rip:#x}: {err}"
            ),
            MmioError::Decode {
                rip,
                gpa,
                err,
                bytes,
                len,
            } => {
                write!(
                    f,
                    "MMIO access to {gpa:#x}: cannot emulate the instruction at RIP {rip:#x} ({err}); bytes"
                )?;
                for b in &bytes[..*len] {
                    write!(f, " {b:02x}")?;
                }
                Ok(())
            }
        }
    }
}

/// Emulate the instruction whose data access at `gpa` faulted (nothing is
/// mapped there) at node time `now_ns`: the device access, the register
/// result and RIP.
pub fn mmio(
    devices: &mut Devices,
    partition: &mut dyn Partition,
    now_ns: u64,
    gpa: u64,
) -> Result<(), MmioError> {
    let (mode, rip) = {
        let vcpu = partition.vcpu();
        (vcpu.guest_mode(), vcpu.regs().rip)
    };
    let paging = Paging {
        cr0: mode.cr0,
        cr3: mode.cr3,
        cr4: mode.cr4,
        efer: mode.efer,
    };
    let cpu_mode = if mode.cs_long && mode.efer & EFER_LMA != 0 {
        CpuMode::Long64
    } else {
        CpuMode::Protected32
    };
    let mut bytes = [0u8; MAX_INSN_BYTES];
    let len = walk::fetch(partition.memory(), &paging, rip, &mut bytes)
        .map_err(|err| MmioError::Fetch { rip, gpa, err })?;
    let regs = partition.vcpu().regs_mut();
    devices
        .emulate_mmio(now_ns, &bytes[..len], cpu_mode, regs, gpa)
        .map(|_| ())
        .map_err(|err| MmioError::Decode {
            rip,
            gpa,
            err,
            bytes,
            len,
        })
}

/// RDMSR of device MSR `msr`: answered by the device models, #GP on a
/// machine without them.
pub fn msr_read(devices: &Devices, vcpu: &mut dyn Vcpu, msr: u32) {
    match msr {
        IA32_TSC_DEADLINE if devices.machine() == Machine::Pc => {
            complete_msr_read(vcpu, devices.read_tsc_deadline());
        }
        _ => refuse_msr(vcpu),
    }
}

/// WRMSR of `value` to device MSR `msr` at node time `now_ns`, the guest's
/// TSC running at `tsc_khz`.
pub fn msr_write(
    devices: &mut Devices,
    vcpu: &mut dyn Vcpu,
    now_ns: u64,
    msr: u32,
    value: u64,
    tsc_khz: u64,
) {
    match msr {
        IA32_TSC_DEADLINE if devices.machine() == Machine::Pc => {
            let Ok(guest_tsc) = vcpu.read_msr(IA32_TSC) else {
                refuse_msr(vcpu);
                return;
            };
            devices.write_tsc_deadline(now_ns, value, guest_tsc, tsc_khz);
            vcpu.skip_instruction();
        }
        _ => refuse_msr(vcpu),
    }
}
