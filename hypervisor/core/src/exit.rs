//! Exit handling, written once for every vendor.
//!
//! A backend decodes its exit into a [`VmExit`]; the partition resolves
//! dirty-log write faults itself; everything else comes to [`handle`],
//! which does what needs no device or VM state (CPUID, MSRs, HLT,
//! exceptions, window exits) and tells the caller what is left
//! ([`Handled`]): port I/O, MMIO (a nested fault on guest-physical memory
//! that is not RAM), device MSRs and hypercalls.
//!
//! RIP rules: an instruction the handler completes is skipped here. An
//! instruction that faults (#GP for an MSR, #UD for string I/O) is *not*
//! skipped, so the exception is delivered with RIP at the faulting
//! instruction, as on hardware. Port I/O and hypercalls are left to the
//! caller, who skips after doing the work ([`complete_io_in`] does both for
//! `in`).
//!
//! Guest register values are allegations: nothing here panics on them, and
//! every value written back is built from the policy, not echoed blindly.

use crate::addr::Gpa;
use crate::host::{CpuidResult, CpuidSource};
use crate::msr;
use crate::vcpu::{Access, EntryFailure, IoAccess, Vcpu, VmExit};
use core::fmt;

pub use crate::cpuid::guest_cpuid;

/// Vector of #UD (invalid opcode).
pub const VECTOR_UD: u8 = 6;
/// Vector of #GP (general protection).
pub const VECTOR_GP: u8 = 13;

/// Why a VM must stop (category 3 of shared/STYLE.md section 4: stop that
/// VM and report it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest triple-faulted (SVM shutdown intercept / VMX exit 2).
    TripleFault,
    /// The CPU refused to enter the guest.
    EntryFailed(EntryFailure),
    /// The backend could not decode the exit.
    UnknownExit(u64),
    /// The guest touched guest-physical memory that is not RAM (or wrote a
    /// read-only page) and no device claims it.
    BadNestedAccess { gpa: Gpa, access: Access },
    /// The nested table is malformed (EPT misconfiguration): a hypervisor
    /// bug, the VM cannot continue.
    NestedMisconfig { gpa: Gpa },
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::TripleFault => write!(f, "triple fault (shutdown)"),
            StopReason::EntryFailed(e) => write!(f, "VM entry failed: {e}"),
            StopReason::UnknownExit(raw) => write!(f, "unhandled exit code {raw:#x}"),
            StopReason::BadNestedAccess { gpa, access } => {
                let what = if access.exec {
                    "instruction fetch from"
                } else if access.write {
                    "write to"
                } else {
                    "read of"
                };
                let why = if access.present {
                    "a page without that permission"
                } else {
                    "unmapped guest-physical memory"
                };
                write!(f, "{what} {why} at {gpa}")
            }
            StopReason::NestedMisconfig { gpa } => write!(
                f,
                "nested page table misconfiguration at {gpa} (hypervisor bug)"
            ),
        }
    }
}

/// What is left for the caller after [`handle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    /// Re-enter the guest.
    Resume,
    /// The guest executed HLT (RIP already past it): wait for an event.
    Halted,
    /// The host took an interrupt (time slice over): schedule, then resume.
    Preempted,
    /// Port I/O for a device model. RIP is not advanced: after the access,
    /// `out` calls [`Vcpu::skip_instruction`], `in` calls
    /// [`complete_io_in`].
    Io(IoAccess),
    /// A hypercall (number in RAX). RIP is not advanced: the caller sets
    /// the result registers and skips.
    Hypercall,
    /// A data access to guest-physical memory that is not RAM (nothing is
    /// mapped there): MMIO for a device model. RIP is not advanced: the
    /// caller emulates the instruction (which advances it) or stops the VM.
    Mmio { gpa: Gpa, access: Access },
    /// RDMSR of a device MSR ([`msr::MsrClass::Device`]): the caller
    /// answers with [`complete_msr_read`] or faults it with
    /// [`refuse_msr`].
    DeviceMsrRead { msr: u32 },
    /// WRMSR of `value` to a device MSR: the caller completes it with
    /// [`Vcpu::skip_instruction`] or faults it with [`refuse_msr`].
    DeviceMsrWrite { msr: u32, value: u64 },
    /// The VM cannot continue.
    Stop(StopReason),
}

/// Handle one exit. Never panics.
pub fn handle(exit: VmExit, vcpu: &mut dyn Vcpu, cpuid: &dyn CpuidSource) -> Handled {
    match exit {
        VmExit::Io(io) => {
            if io.string || !matches!(io.size, 1 | 2 | 4) {
                // INS/OUTS are not emulated (and a width other than 1, 2
                // or 4 cannot be a real port access).
                vcpu.inject_exception(VECTOR_UD, None);
                Handled::Resume
            } else {
                Handled::Io(io)
            }
        }
        VmExit::Cpuid { leaf, subleaf } => {
            let r: CpuidResult = guest_cpuid(cpuid, leaf, subleaf);
            // CPUID writes the 32-bit registers, which zero-extends.
            let regs = vcpu.regs_mut();
            regs.rax = u64::from(r.eax);
            regs.rbx = u64::from(r.ebx);
            regs.rcx = u64::from(r.ecx);
            regs.rdx = u64::from(r.edx);
            vcpu.skip_instruction();
            Handled::Resume
        }
        VmExit::MsrRead { msr: index } if msr::classify(index) == msr::MsrClass::Device => {
            Handled::DeviceMsrRead { msr: index }
        }
        VmExit::MsrWrite { msr: index, value } if msr::classify(index) == msr::MsrClass::Device => {
            Handled::DeviceMsrWrite { msr: index, value }
        }
        VmExit::MsrRead { msr: index } => {
            match msr::read(vcpu, index) {
                Some(value) => complete_msr_read(vcpu, value),
                None => refuse_msr(vcpu),
            }
            Handled::Resume
        }
        VmExit::MsrWrite { msr: index, value } => {
            if msr::write(vcpu, index, value) {
                vcpu.skip_instruction();
            } else {
                refuse_msr(vcpu);
            }
            Handled::Resume
        }
        VmExit::Hlt => {
            vcpu.skip_instruction();
            Handled::Halted
        }
        VmExit::Hypercall => Handled::Hypercall,
        // Nothing mapped there and not an instruction fetch: MMIO.
        VmExit::NestedFault { gpa, access } if !access.present && !access.exec => {
            Handled::Mmio { gpa, access }
        }
        VmExit::NestedFault { gpa, access } => {
            Handled::Stop(StopReason::BadNestedAccess { gpa, access })
        }
        // The guest can take what the caller waits to inject: it polls
        // its interrupt controllers before the next entry anyway.
        VmExit::InterruptWindow | VmExit::NmiWindow => Handled::Resume,
        VmExit::NestedMisconfig { gpa } => Handled::Stop(StopReason::NestedMisconfig { gpa }),
        VmExit::Shutdown => Handled::Stop(StopReason::TripleFault),
        VmExit::ExternalInterrupt => Handled::Preempted,
        VmExit::EntryFailed { reason } => Handled::Stop(StopReason::EntryFailed(reason)),
        VmExit::Unknown { raw } => Handled::Stop(StopReason::UnknownExit(raw)),
    }
}

/// Complete an RDMSR that read `value`: EDX:EAX, the upper halves of RAX
/// and RDX cleared; then skip the instruction.
pub fn complete_msr_read(vcpu: &mut dyn Vcpu, value: u64) {
    let regs = vcpu.regs_mut();
    regs.rax = value & 0xffff_ffff;
    regs.rdx = value >> 32;
    vcpu.skip_instruction();
}

/// Fault an RDMSR/WRMSR as a CPU without that MSR does: #GP(0), RIP left
/// at the instruction.
pub fn refuse_msr(vcpu: &mut dyn Vcpu) {
    vcpu.inject_exception(VECTOR_GP, Some(0));
}

/// Mask of the low `size` bytes (1, 2, or otherwise 4).
const fn io_mask(size: u8) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    }
}

/// The value an `out` of `size` bytes writes: the low `size` bytes of RAX.
pub fn io_out_value(vcpu: &dyn Vcpu, size: u8) -> u32 {
    // Truncation intended: the port sees at most EAX.
    (vcpu.regs().rax as u32) & io_mask(size)
}

/// Complete an `in` of `size` bytes that read `value`: merge it into RAX as
/// the CPU does (AL/AX keep the upper bits of RAX; EAX zero-extends into
/// RAX, Intel SDM vol. 1, 3.4.1.1), then skip the instruction.
pub fn complete_io_in(vcpu: &mut dyn Vcpu, size: u8, value: u32) {
    let regs = vcpu.regs_mut();
    regs.rax = match size {
        1 | 2 => {
            let mask = u64::from(io_mask(size));
            (regs.rax & !mask) | (u64::from(value) & mask)
        }
        _ => u64::from(value),
    };
    vcpu.skip_instruction();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::HV_SIGNATURE;
    use crate::cpuid::*;
    use crate::msr::*;
    use crate::testing::{FakeCpuid, FakeVcpu};
    use crate::vcpu::IoDir;
    use proptest::prelude::*;

    const GARBAGE: u64 = 0xdead_beef_dead_beef;

    fn cpuid(host: &FakeCpuid, leaf: u32, subleaf: u32) -> (FakeVcpu, CpuidResult) {
        let mut v = FakeVcpu::new();
        v.regs.rax = GARBAGE;
        v.regs.rbx = GARBAGE;
        v.regs.rcx = GARBAGE;
        v.regs.rdx = GARBAGE;
        assert_eq!(
            handle(VmExit::Cpuid { leaf, subleaf }, &mut v, host),
            Handled::Resume
        );
        assert_eq!((v.skips, v.regs.rip), (1, 0x1002));
        assert!(v.injected.is_empty());
        for r in [v.regs.rax, v.regs.rbx, v.regs.rcx, v.regs.rdx] {
            assert_eq!(r >> 32, 0, "upper half of a CPUID result register");
        }
        let r = CpuidResult {
            eax: v.regs.rax as u32,
            ebx: v.regs.rbx as u32,
            ecx: v.regs.rcx as u32,
            edx: v.regs.rdx as u32,
        };
        (v, r)
    }

    #[test]
    fn cpuid_feature_policy() {
        let ones = FakeCpuid::all_ones();
        let (_, r) = cpuid(&ones, 1, 0);
        assert_eq!(
            r.ecx,
            !(LEAF1_ECX_VMX
                | LEAF1_ECX_MONITOR
                | LEAF1_ECX_X2APIC
                | LEAF1_ECX_OSXSAVE
                | LEAF1_ECX_XSAVE_FEATURES)
        );
        // The initial APIC ID is the emulated local APIC's: 0; no
        // machine-check architecture.
        assert_eq!(
            (r.eax, r.ebx, r.edx),
            (!0, !LEAF1_EBX_APIC_ID, !(EDX_MCE | EDX_MCA))
        );
        let (_, r) = cpuid(&FakeCpuid::default(), 1, 0);
        assert_eq!(r.ecx, LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE);
        let (_, r) = cpuid(&ones, 0x8000_0001, 0);
        assert_eq!(r.ecx, !(EXT1_ECX_SVM | EXT1_ECX_XSAVE_FEATURES));
        assert_eq!(r.edx, !(EDX_MCE | EDX_MCA));
        for leaf in [5, 0xa, 0xd, 0x8000_000a] {
            assert_eq!(
                cpuid(&ones, leaf, 0).1,
                CpuidResult::default(),
                "leaf {leaf:#x}"
            );
        }
        // Leaf 7: only the features with XSAVE-managed state are hidden.
        let r = cpuid(&ones, 7, 0).1;
        assert_eq!(r.ebx, !(LEAF7_EBX_XSAVE_FEATURES | LEAF7_EBX_TSC_ADJUST));
        assert_eq!(r.ecx, !LEAF7_ECX_XSAVE_FEATURES);
        assert_eq!(r.edx, !LEAF7_EDX_XSAVE_FEATURES);
        assert_eq!(r.ebx & (1 << 5), 0, "AVX2 hidden");
        assert_eq!(r.ebx & (1 << 0), 1, "FSGSBASE passes through");
        // Pass-through, subleaf respected.
        assert_eq!(cpuid(&ones, 7, 1).1, CpuidResult::default());
    }

    #[test]
    fn cpuid_timing_policy() {
        // A host whose highest basic leaf is 0xd and that knows its TSC.
        let mut host = FakeCpuid::all_ones();
        host.tsc_khz = 2_500_000;
        assert_eq!(cpuid(&host, 0, 0).1.eax, TSC_LEAF, "raised to 0x15");
        // Leaf 0x15: TSC Hz = ECX * EBX / EAX.
        let r = cpuid(&host, TSC_LEAF, 0).1;
        assert_eq!(
            u64::from(r.ecx) * u64::from(r.ebx) / u64::from(r.eax),
            2_500_000_000
        );
        // A leaf above the host's highest but below ours reads zero, not
        // the host's answer for an out-of-range leaf.
        host.leaves.insert(
            (0x10, 0),
            CpuidResult {
                eax: !0,
                ebx: !0,
                ecx: !0,
                edx: !0,
            },
        );
        assert_eq!(cpuid(&host, 0x10, 0).1, CpuidResult::default());
        assert_eq!(cpuid(&host, 6, 0).1.eax & LEAF6_EAX_ARAT, LEAF6_EAX_ARAT);
        let r = cpuid(&host, HV_TIMING_LEAF, 0).1;
        assert_eq!((r.eax, r.ebx), (2_500_000, APIC_BUS_KHZ));
        // Unknown rate: leaf 0x15 reads zero, the guest calibrates.
        host.tsc_khz = 0;
        assert_eq!(cpuid(&host, TSC_LEAF, 0).1, CpuidResult::default());
        host.tsc_khz = u64::MAX;
        assert_eq!(cpuid(&host, TSC_LEAF, 0).1, CpuidResult::default());
    }

    #[test]
    fn device_msrs_go_to_the_caller() {
        let cpu = FakeCpuid::default();
        let mut v = FakeVcpu::new();
        assert_eq!(
            handle(
                VmExit::MsrRead {
                    msr: IA32_TSC_DEADLINE
                },
                &mut v,
                &cpu
            ),
            Handled::DeviceMsrRead {
                msr: IA32_TSC_DEADLINE
            }
        );
        assert_eq!(
            handle(
                VmExit::MsrWrite {
                    msr: IA32_TSC_DEADLINE,
                    value: 7
                },
                &mut v,
                &cpu
            ),
            Handled::DeviceMsrWrite {
                msr: IA32_TSC_DEADLINE,
                value: 7
            }
        );
        assert_eq!((v.skips, v.injected.len()), (0, 0), "left to the caller");
        complete_msr_read(&mut v, 0x1_0000_0002);
        assert_eq!((v.regs.rax, v.regs.rdx, v.skips), (2, 1, 1));
        refuse_msr(&mut v);
        assert_eq!(v.injected, [(VECTOR_GP, Some(0))]);
        // x2APIC MSRs are absent (#GP through the normal path).
        assert_eq!(
            handle(VmExit::MsrRead { msr: 0x802 }, &mut v, &cpu),
            Handled::Resume
        );
        assert_eq!(v.injected.len(), 2);
    }

    #[test]
    fn cpuid_signature_leaf() {
        let ones = FakeCpuid::all_ones();
        let (_, r) = cpuid(&ones, 0x4000_0000, 0);
        assert_eq!(r.eax, HV_TIMING_LEAF);
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&r.ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
        sig[8..].copy_from_slice(&r.edx.to_le_bytes());
        assert_eq!(&sig, HV_SIGNATURE);
        assert_eq!(&sig, b"hvmigrateHV!");
        for leaf in [
            0x4000_0001,
            0x4000_000f,
            0x4000_0011,
            0x4000_0100,
            0x4fff_ffff,
        ] {
            assert_eq!(
                cpuid(&ones, leaf, 0).1,
                CpuidResult::default(),
                "leaf {leaf:#x}"
            );
        }
    }

    fn rdmsr(v: &mut FakeVcpu, msr: u32) -> Option<u64> {
        v.regs.rax = GARBAGE;
        v.regs.rdx = GARBAGE;
        let (rip, skips, n) = (v.regs.rip, v.skips, v.injected.len());
        let cpu = FakeCpuid::default();
        assert_eq!(handle(VmExit::MsrRead { msr }, v, &cpu), Handled::Resume);
        if v.injected.len() > n {
            assert_eq!(v.injected[n..], [(VECTOR_GP, Some(0))]);
            assert_eq!((v.regs.rip, v.skips), (rip, skips), "RIP moved on #GP");
            assert_eq!((v.regs.rax, v.regs.rdx), (GARBAGE, GARBAGE));
            None
        } else {
            assert_eq!((v.regs.rip, v.skips), (rip + 2, skips + 1));
            assert_eq!((v.regs.rax >> 32, v.regs.rdx >> 32), (0, 0));
            Some(v.regs.rdx << 32 | v.regs.rax)
        }
    }

    fn wrmsr(v: &mut FakeVcpu, msr: u32, value: u64) -> bool {
        let (rip, skips, n) = (v.regs.rip, v.skips, v.injected.len());
        let cpu = FakeCpuid::default();
        assert_eq!(
            handle(VmExit::MsrWrite { msr, value }, v, &cpu),
            Handled::Resume
        );
        if v.injected.len() > n {
            assert_eq!(v.injected[n..], [(VECTOR_GP, Some(0))]);
            assert_eq!((v.regs.rip, v.skips), (rip, skips), "RIP moved on #GP");
            false
        } else {
            assert_eq!((v.regs.rip, v.skips), (rip + 2, skips + 1));
            true
        }
    }

    #[test]
    fn unknown_msr_injects_gp_without_advancing() {
        let mut v = FakeVcpu::new();
        assert_eq!(rdmsr(&mut v, 0xc0de_0001), None);
        assert!(!wrmsr(&mut v, 0xc0de_0001, 5));
        // Delegated by policy but not kept by this backend.
        v.msrs.remove(&IA32_TSC_AUX);
        assert_eq!(rdmsr(&mut v, IA32_TSC_AUX), None);
        assert!(!wrmsr(&mut v, IA32_TSC_AUX, 1));
        // x2APIC and MTRR ranges are absent.
        assert_eq!(rdmsr(&mut v, 0x802), None);
        assert_eq!(rdmsr(&mut v, 0x200), None);
        assert_eq!(v.injected.len(), 6);
    }

    #[test]
    fn fixed_msrs() {
        let mut v = FakeVcpu::new();
        assert_eq!(rdmsr(&mut v, IA32_APIC_BASE), Some(0xfee0_0900));
        assert_eq!(rdmsr(&mut v, IA32_MTRRCAP), Some(0));
        assert_eq!(rdmsr(&mut v, IA32_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(rdmsr(&mut v, IA32_MISC_ENABLE), Some(MISC_ENABLE_VALUE));
        assert!(wrmsr(&mut v, IA32_APIC_BASE, 0xfee0_0900));
        assert!(!wrmsr(&mut v, IA32_APIC_BASE, 0xfee0_0100));
        assert!(!wrmsr(&mut v, IA32_MTRRCAP, 0));
        assert!(wrmsr(&mut v, IA32_MTRR_DEF_TYPE, 0xc06));
        assert!(!wrmsr(&mut v, IA32_MTRR_DEF_TYPE, 0x1806));
        assert!(!wrmsr(&mut v, IA32_MTRR_DEF_TYPE, 0x802));
        assert_eq!(rdmsr(&mut v, IA32_MTRR_DEF_TYPE), Some(0x806));
    }

    #[test]
    fn delegated_msrs_are_validated_then_kept_by_the_backend() {
        let mut v = FakeVcpu::new();
        assert_eq!(rdmsr(&mut v, IA32_PAT), Some(0x0007_0406_0007_0406));
        assert!(wrmsr(&mut v, IA32_PAT, 0x0001_0506_0007_0406));
        assert_eq!(rdmsr(&mut v, IA32_PAT), Some(0x0001_0506_0007_0406));
        assert!(!wrmsr(&mut v, IA32_PAT, 0x0002_0000_0000_0000));
        assert!(wrmsr(&mut v, IA32_EFER, 0xd01));
        assert!(!wrmsr(&mut v, IA32_EFER, 0xd01 | 1 << 12), "EFER.SVME");
        assert_eq!(v.msrs[&IA32_EFER], 0xd01);
        assert!(wrmsr(&mut v, IA32_LSTAR, 0xffff_8000_0000_1000));
        assert!(!wrmsr(&mut v, IA32_LSTAR, 0x0000_8000_0000_0000));
        assert!(!wrmsr(&mut v, IA32_FS_BASE, 0x1234_0000_0000_0000));
        assert!(!wrmsr(&mut v, IA32_TSC_AUX, 1 << 32));
        assert!(wrmsr(&mut v, IA32_STAR, u64::MAX));
    }

    #[test]
    fn hlt_interrupt_shutdown_and_stops() {
        let cpu = FakeCpuid::default();
        let mut v = FakeVcpu::new();
        assert_eq!(handle(VmExit::Hlt, &mut v, &cpu), Handled::Halted);
        assert_eq!((v.skips, v.regs.rip), (1, 0x1002));
        assert_eq!(
            handle(VmExit::ExternalInterrupt, &mut v, &cpu),
            Handled::Preempted
        );
        assert_eq!(handle(VmExit::Hypercall, &mut v, &cpu), Handled::Hypercall);
        assert_eq!(v.skips, 1, "interrupt and hypercall do not skip");
        let h = handle(VmExit::Shutdown, &mut v, &cpu);
        assert_eq!(h, Handled::Stop(StopReason::TripleFault));
        assert_eq!(
            StopReason::TripleFault.to_string(),
            "triple fault (shutdown)"
        );
        let access = Access {
            write: true,
            exec: false,
            present: false,
        };
        let h = handle(
            VmExit::NestedFault {
                gpa: Gpa(0xfee0_0000),
                access,
            },
            &mut v,
            &cpu,
        );
        // Nothing mapped there: MMIO, left to the caller's devices.
        assert_eq!(
            h,
            Handled::Mmio {
                gpa: Gpa(0xfee0_0000),
                access
            }
        );
        assert_eq!(v.skips, 1, "MMIO is not skipped here");
        // An instruction fetch from there is no device access.
        let fetch = Access {
            exec: true,
            ..access
        };
        let h = handle(
            VmExit::NestedFault {
                gpa: Gpa(0xfee0_0000),
                access: fetch,
            },
            &mut v,
            &cpu,
        );
        let Handled::Stop(reason) = h else {
            panic!("{h:?}")
        };
        assert_eq!(
            reason.to_string(),
            "instruction fetch from unmapped guest-physical memory at 0xfee00000"
        );
        for w in [VmExit::InterruptWindow, VmExit::NmiWindow] {
            assert_eq!(handle(w, &mut v, &cpu), Handled::Resume);
        }
        assert_eq!(v.skips, 1, "window exits do not skip");
        let reason = EntryFailure {
            what: "invalid guest state",
            raw: 0x21,
            field: Some(0x6800),
        };
        let h = handle(VmExit::EntryFailed { reason }, &mut v, &cpu);
        assert_eq!(h, Handled::Stop(StopReason::EntryFailed(reason)));
        assert_eq!(
            StopReason::EntryFailed(reason).to_string(),
            "VM entry failed: invalid guest state (code 0x21, field 0x6800)"
        );
        let h = handle(VmExit::Unknown { raw: 0x7f }, &mut v, &cpu);
        assert_eq!(h, Handled::Stop(StopReason::UnknownExit(0x7f)));
        assert_eq!(
            StopReason::UnknownExit(0x7f).to_string(),
            "unhandled exit code 0x7f"
        );
        let h = handle(VmExit::NestedMisconfig { gpa: Gpa(0x1000) }, &mut v, &cpu);
        assert_eq!(
            h,
            Handled::Stop(StopReason::NestedMisconfig { gpa: Gpa(0x1000) })
        );
        assert_eq!((v.skips, v.injected.len()), (1, 0));
    }

    fn io(size: u8, dir: IoDir, string: bool) -> IoAccess {
        IoAccess {
            port: 0x3f8,
            size,
            dir,
            string,
            rep: string,
        }
    }

    #[test]
    fn port_io() {
        let cpu = FakeCpuid::default();
        let mut v = FakeVcpu::new();
        let a = io(1, IoDir::Out, false);
        assert_eq!(handle(VmExit::Io(a), &mut v, &cpu), Handled::Io(a));
        assert_eq!((v.skips, v.injected.len()), (0, 0));
        let s = io(1, IoDir::In, true);
        assert_eq!(handle(VmExit::Io(s), &mut v, &cpu), Handled::Resume);
        assert_eq!(v.injected, [(VECTOR_UD, None)]);
        assert_eq!((v.skips, v.regs.rip), (0, 0x1000));
        let odd = io(3, IoDir::In, false);
        assert_eq!(handle(VmExit::Io(odd), &mut v, &cpu), Handled::Resume);
        assert_eq!(v.injected.len(), 2);
    }

    #[test]
    fn io_widths() {
        let mut v = FakeVcpu::new();
        v.regs.rax = 0xffff_ffff_8765_4321;
        assert_eq!(io_out_value(&v, 1), 0x21);
        assert_eq!(io_out_value(&v, 2), 0x4321);
        assert_eq!(io_out_value(&v, 4), 0x8765_4321);
        let ones = u64::MAX;
        for (size, want) in [
            (1, 0xffff_ffff_ffff_ff78),
            (2, 0xffff_ffff_ffff_5678),
            (4, 0x0000_0000_1234_5678),
        ] {
            v.regs.rax = ones;
            complete_io_in(&mut v, size, 0x1234_5678);
            assert_eq!(v.regs.rax, want, "in of {size} bytes");
        }
        assert_eq!((v.skips, v.regs.rip), (3, 0x1006));
    }

    fn any_exit() -> impl Strategy<Value = VmExit> {
        prop_oneof![
            (
                any::<u16>(),
                any::<u8>(),
                any::<bool>(),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(|(port, size, out, string, rep)| VmExit::Io(IoAccess {
                    port,
                    size,
                    dir: if out { IoDir::Out } else { IoDir::In },
                    string,
                    rep,
                })),
            (any::<u32>(), any::<u32>())
                .prop_map(|(leaf, subleaf)| VmExit::Cpuid { leaf, subleaf }),
            any::<u32>().prop_map(|msr| VmExit::MsrRead { msr }),
            (any::<u32>(), any::<u64>()).prop_map(|(msr, value)| VmExit::MsrWrite { msr, value }),
            Just(VmExit::Hlt),
            Just(VmExit::Hypercall),
            Just(VmExit::Shutdown),
            Just(VmExit::ExternalInterrupt),
            any::<u64>().prop_map(|raw| VmExit::Unknown { raw }),
            (any::<u64>(), any::<[bool; 3]>()).prop_map(|(g, [write, exec, present])| {
                VmExit::NestedFault {
                    gpa: Gpa(g),
                    access: Access {
                        write,
                        exec,
                        present,
                    },
                }
            }),
        ]
    }

    proptest! {
        /// Any exit with any register contents: no panic, and an injected
        /// fault never comes with a skipped instruction.
        #[test]
        fn handle_never_panics(exit in any_exit(), rax in any::<u64>(), rip in any::<u64>()) {
            let cpu = FakeCpuid::all_ones();
            let mut v = FakeVcpu::new();
            v.regs.rax = rax;
            v.regs.rip = rip;
            let h = handle(exit, &mut v, &cpu);
            prop_assert!(v.skips <= 1);
            if !v.injected.is_empty() {
                prop_assert_eq!(v.skips, 0);
                prop_assert_eq!(v.regs.rip, rip);
                prop_assert_eq!(h, Handled::Resume);
            }
            if let Handled::Stop(r) = h {
                prop_assert!(!r.to_string().is_empty());
            }
        }
    }
}
