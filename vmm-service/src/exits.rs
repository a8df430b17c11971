//! Generic exit handling, as the service sees it.
//!
//! `hvcore::exit` (being written alongside this crate) owns the policy: CPUID
//! values shown to the guest, MSR access, string I/O, decoding what the
//! service must act on. Until it lands, this module carries a minimal
//! stand-in with the same shape (`handle`, `Handled`, `io_out_value`,
//! `complete_io_in`), so the worker in [`crate::vm`] is written against that
//! shape and switches over by replacing this file's body.
//!
//! Contract the worker relies on:
//! * `Resume`: the exit was dealt with (RIP advanced or an exception queued).
//! * `Halted`: HLT, RIP already past it.
//! * `Preempted`: a host interrupt (the LAPIC timer); nothing to do.
//! * `Io`: port I/O the device models must answer; the worker calls
//!   [`complete_io_in`] or [`complete_io_out`], which advance RIP.
//! * `Hypercall`: the worker handles it and advances RIP itself.
//! * `Stop`: the guest cannot continue.

use hvcore::abi::{CPUID_HV_LEAF, HV_SIGNATURE};
use hvcore::addr::Gpa;
use hvcore::host::{CpuidResult, CpuidSource};
use hvcore::vcpu::{Access, EntryFailure, IoAccess, IoDir, Vcpu, VmExit};

/// #UD, #GP vectors (AMD APM vol. 2, 8.2).
const VECTOR_UD: u8 = 6;
const VECTOR_GP: u8 = 13;

/// Why an exit ends the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStop {
    /// Shutdown: the guest triple-faulted.
    TripleFault,
    /// The CPU refused to enter the guest.
    EntryFailed(EntryFailure),
    /// An exit code the backend could not decode.
    UnknownExit { raw: u64 },
    /// A nested page fault the partition did not resolve: the guest touched
    /// memory it does not have.
    BadNestedAccess { gpa: Gpa, access: Access },
    /// The nested page table is malformed (a hypervisor bug).
    NestedMisconfig { gpa: Gpa },
}

/// What the service has to do after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    /// Nothing: re-enter the guest.
    Resume,
    /// The guest executed HLT.
    Halted,
    /// A host interrupt ended the run (time to check the slice).
    Preempted,
    /// Port I/O for the device models.
    Io(IoAccess),
    /// A hypercall for the service.
    Hypercall,
    /// The guest cannot continue.
    Stop(ExitStop),
}

/// Deal with everything generic about `exit`.
pub fn handle(exit: VmExit, vcpu: &mut dyn Vcpu, cpuid: &dyn CpuidSource) -> Handled {
    match exit {
        VmExit::Io(io) if io.string => {
            vcpu.inject_exception(VECTOR_UD, None);
            Handled::Resume
        }
        VmExit::Io(io) => Handled::Io(io),
        VmExit::Cpuid { leaf, subleaf } => {
            let r = guest_cpuid(cpuid, leaf, subleaf);
            let regs = vcpu.regs_mut();
            regs.rax = u64::from(r.eax);
            regs.rbx = u64::from(r.ebx);
            regs.rcx = u64::from(r.ecx);
            regs.rdx = u64::from(r.edx);
            vcpu.skip_instruction();
            Handled::Resume
        }
        VmExit::MsrRead { msr } => {
            match vcpu.read_msr(msr) {
                Ok(v) => {
                    let regs = vcpu.regs_mut();
                    regs.rax = v & 0xffff_ffff;
                    regs.rdx = v >> 32;
                    vcpu.skip_instruction();
                }
                Err(_) => vcpu.inject_exception(VECTOR_GP, Some(0)),
            }
            Handled::Resume
        }
        VmExit::MsrWrite { msr, value } => {
            match vcpu.write_msr(msr, value) {
                Ok(()) => vcpu.skip_instruction(),
                Err(_) => vcpu.inject_exception(VECTOR_GP, Some(0)),
            }
            Handled::Resume
        }
        VmExit::Hlt => {
            vcpu.skip_instruction();
            Handled::Halted
        }
        VmExit::Hypercall => Handled::Hypercall,
        VmExit::ExternalInterrupt => Handled::Preempted,
        VmExit::NestedFault { gpa, access } => {
            Handled::Stop(ExitStop::BadNestedAccess { gpa, access })
        }
        VmExit::NestedMisconfig { gpa } => Handled::Stop(ExitStop::NestedMisconfig { gpa }),
        VmExit::Shutdown => Handled::Stop(ExitStop::TripleFault),
        VmExit::EntryFailed { reason } => Handled::Stop(ExitStop::EntryFailed(reason)),
        VmExit::Unknown { raw } => Handled::Stop(ExitStop::UnknownExit { raw }),
    }
}

/// The guest's view of CPUID: the host's, with the hypervisor-present bit
/// set, our vendor leaf, and SVM/VMX hidden (no nested virtualization).
pub fn guest_cpuid(src: &dyn CpuidSource, leaf: u32, subleaf: u32) -> CpuidResult {
    let word = |i: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&HV_SIGNATURE[i * 4..i * 4 + 4]);
        u32::from_le_bytes(b)
    };
    match leaf {
        CPUID_HV_LEAF => CpuidResult {
            eax: CPUID_HV_LEAF,
            ebx: word(0),
            ecx: word(1),
            edx: word(2),
        },
        0x4000_0001..=0x4000_00ff => CpuidResult::default(),
        1 => {
            let mut r = src.host_cpuid(leaf, subleaf);
            r.ecx = (r.ecx | 1 << 31) & !(1 << 5);
            r
        }
        0x8000_0001 => {
            let mut r = src.host_cpuid(leaf, subleaf);
            r.ecx &= !(1 << 2);
            r
        }
        _ => src.host_cpuid(leaf, subleaf),
    }
}

/// The value an `out` wrote: the low `size` bytes of RAX.
pub fn io_out_value(vcpu: &dyn Vcpu, io: &IoAccess) -> u32 {
    (vcpu.regs().rax & size_mask(io.size)) as u32
}

/// Finish an `in`: merge `value` into RAX as the instruction would (a 32-bit
/// `in` zero-extends into RAX, 8/16-bit ones keep the upper bits) and
/// advance RIP.
pub fn complete_io_in(vcpu: &mut dyn Vcpu, io: &IoAccess, value: u32) {
    debug_assert_eq!(io.dir, IoDir::In);
    let regs = vcpu.regs_mut();
    regs.rax = match io.size {
        1 => (regs.rax & !0xff) | u64::from(value & 0xff),
        2 => (regs.rax & !0xffff) | u64::from(value & 0xffff),
        _ => u64::from(value),
    };
    vcpu.skip_instruction();
}

/// Finish an `out`: advance RIP.
pub fn complete_io_out(vcpu: &mut dyn Vcpu) {
    vcpu.skip_instruction();
}

fn size_mask(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FakeCpuid, FakeVcpu};

    #[test]
    fn cpuid_policy() {
        let src = FakeCpuid;
        let r = guest_cpuid(&src, 1, 0);
        assert_ne!(r.ecx & (1 << 31), 0);
        assert_eq!(r.ecx & (1 << 5), 0);
        assert_eq!(guest_cpuid(&src, 0x8000_0001, 0).ecx & 4, 0);
        let hv = guest_cpuid(&src, CPUID_HV_LEAF, 0);
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&hv.ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&hv.ecx.to_le_bytes());
        sig[8..].copy_from_slice(&hv.edx.to_le_bytes());
        assert_eq!(&sig, HV_SIGNATURE);
    }

    #[test]
    fn io_in_merges_by_size() {
        let mut v = FakeVcpu::default();
        let io = |size| IoAccess {
            port: 0x3f8,
            size,
            dir: IoDir::In,
            string: false,
            rep: false,
        };
        v.regs.rax = 0x1122_3344_5566_7788;
        complete_io_in(&mut v, &io(1), 0xab);
        assert_eq!(v.regs.rax, 0x1122_3344_5566_77ab);
        complete_io_in(&mut v, &io(2), 0xcdef);
        assert_eq!(v.regs.rax, 0x1122_3344_5566_cdef);
        complete_io_in(&mut v, &io(4), 0xffff_ffff);
        assert_eq!(v.regs.rax, 0xffff_ffff);
        assert_eq!(v.skips, 3);
        v.regs.rax = 0x1234_5678_9abc;
        assert_eq!(io_out_value(&v, &io(1)), 0xbc);
        assert_eq!(io_out_value(&v, &io(4)), 0x5678_9abc);
    }

    #[test]
    fn unknown_msr_injects_gp_and_string_io_ud() {
        let mut v = FakeVcpu::default();
        assert_eq!(
            handle(VmExit::MsrRead { msr: 0xc0de_0001 }, &mut v, &FakeCpuid),
            Handled::Resume
        );
        assert_eq!(v.injected, [(13, Some(0))]);
        assert_eq!(v.skips, 0);
        let io = IoAccess {
            port: 0x3f8,
            size: 1,
            dir: IoDir::Out,
            string: true,
            rep: true,
        };
        assert_eq!(handle(VmExit::Io(io), &mut v, &FakeCpuid), Handled::Resume);
        assert_eq!(v.injected[1], (6, None));
        assert_eq!(
            handle(VmExit::Shutdown, &mut v, &FakeCpuid),
            Handled::Stop(ExitStop::TripleFault)
        );
    }
}
