//! `VmxVcpu`: one guest vCPU on Intel VT-x, with its VMCS, VPID, EPT
//! pointer and register file, decoding VM exits into the vendor-neutral
//! [`VmExit`].
//!
//! Invariants:
//! * the VMCS frame, the VPID and (while logging) the PML page are owned by
//!   this vCPU until [`VmxVcpu::destroy`]; every VMCS access first makes
//!   this vCPU's VMCS current ([`vmcs::make_current`]);
//! * between runs, [`Regs`] is authoritative for the GPRs, RIP, RSP and
//!   RFLAGS; `enter` writes RSP/RIP/RFLAGS to the VMCS before entry and
//!   reads them back after the exit;
//! * the guest's CR4.VMXE is always set (VMX operation requires it, Intel
//!   SDM vol. 3C, 24.8) and never visible: the CR4 guest/host mask owns
//!   the bit and the read shadow shows it clear (25.6.6); a guest write
//!   that sets it gets #GP, as on a CPU without VMX;
//! * the SYSCALL MSRs (STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE) and
//!   TSC_AUX, which VM entry does not switch, are kept here and loaded into
//!   the physical MSRs before entry when they differ (the host never uses
//!   them);
//! * nothing a guest does panics here: unexpected exits decode to
//!   `Unknown`, VMX instructions get #UD.

use super::vmcs::{self, *};
use super::world_switch::{world_switch, SwitchEnd};
use super::{maps, VmxFeatures, CR4_VMXE, INV_ALL, INV_SINGLE};
use crate::cpu::{rdmsr, read_cr0, read_cr3, read_cr4, wrmsr};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use hvcore::addr::{Gfn, Gpa, Hpa, PAGE_SIZE};
use hvcore::host::HostError;
use hvcore::mem::FrameAlloc;
use hvcore::msr::{
    IA32_CSTAR, IA32_EFER, IA32_FMASK, IA32_FS_BASE, IA32_GS_BASE, IA32_KERNEL_GS_BASE, IA32_LSTAR,
    IA32_PAT, IA32_STAR, IA32_SYSENTER_CS, IA32_SYSENTER_EIP, IA32_SYSENTER_ESP, IA32_TSC,
    IA32_TSC_AUX,
};
use hvcore::vcpu::{
    Access, EntryFailure, IoAccess, IoDir, LongModeEntry, Regs, StateError, UnknownMsr, Vcpu,
    VcpuCaps, VcpuState, VmExit,
};
use hvcore::vcpu_state::{self, EventKind, PendingEvent, TableReg, FXSAVE_BYTES};

// Pin-based controls (Intel SDM vol. 3C, 25.6.1, table 25-5).
pub const PIN_EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
pub const PIN_NMI_EXITING: u32 = 1 << 3;
pub const PIN_PREEMPTION_TIMER: u32 = 1 << 6;
// Primary processor-based controls (25.6.2, table 25-6).
pub const PROC_USE_TSC_OFFSETTING: u32 = 1 << 3;
pub const PROC_HLT_EXITING: u32 = 1 << 7;
pub const PROC_MWAIT_EXITING: u32 = 1 << 10;
pub const PROC_CR8_LOAD_EXITING: u32 = 1 << 19;
pub const PROC_CR8_STORE_EXITING: u32 = 1 << 20;
pub const PROC_USE_IO_BITMAPS: u32 = 1 << 25;
pub const PROC_USE_MSR_BITMAPS: u32 = 1 << 28;
pub const PROC_MONITOR_EXITING: u32 = 1 << 29;
pub const PROC_SECONDARY_CONTROLS: u32 = 1 << 31;
// Secondary processor-based controls (25.6.2, table 25-7).
pub const PROC2_ENABLE_EPT: u32 = 1 << 1;
pub const PROC2_ENABLE_RDTSCP: u32 = 1 << 3;
pub const PROC2_ENABLE_VPID: u32 = 1 << 5;
pub const PROC2_ENABLE_INVPCID: u32 = 1 << 12;
pub const PROC2_ENABLE_PML: u32 = 1 << 17;
// VM-exit controls (25.7.1, table 25-13).
pub const EXIT_HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
pub const EXIT_SAVE_PAT: u32 = 1 << 18;
pub const EXIT_LOAD_PAT: u32 = 1 << 19;
pub const EXIT_SAVE_EFER: u32 = 1 << 20;
pub const EXIT_LOAD_EFER: u32 = 1 << 21;
// VM-entry controls (25.8.1, table 25-15).
pub const ENTRY_IA32E_MODE_GUEST: u32 = 1 << 9;
pub const ENTRY_LOAD_PAT: u32 = 1 << 14;
pub const ENTRY_LOAD_EFER: u32 = 1 << 15;

// Basic exit reasons (Intel SDM vol. 3D, Appendix C).
pub const EXIT_EXCEPTION_OR_NMI: u32 = 0;
pub const EXIT_EXTERNAL_INTERRUPT: u32 = 1;
pub const EXIT_TRIPLE_FAULT: u32 = 2;
pub const EXIT_GETSEC: u32 = 11;
pub const EXIT_CPUID: u32 = 10;
pub const EXIT_HLT: u32 = 12;
pub const EXIT_INVD: u32 = 13;
pub const EXIT_VMCALL: u32 = 18;
pub const EXIT_VMCLEAR: u32 = 19;
pub const EXIT_VMXON: u32 = 27;
pub const EXIT_CR_ACCESS: u32 = 28;
pub const EXIT_IO: u32 = 30;
pub const EXIT_RDMSR: u32 = 31;
pub const EXIT_WRMSR: u32 = 32;
pub const EXIT_INVALID_GUEST_STATE: u32 = 33;
pub const EXIT_MSR_LOADING: u32 = 34;
pub const EXIT_MWAIT: u32 = 36;
pub const EXIT_MONITOR: u32 = 39;
pub const EXIT_MACHINE_CHECK: u32 = 41;
pub const EXIT_EPT_VIOLATION: u32 = 48;
pub const EXIT_EPT_MISCONFIG: u32 = 49;
pub const EXIT_INVEPT: u32 = 50;
pub const EXIT_INVVPID: u32 = 53;
pub const EXIT_PREEMPTION_TIMER: u32 = 52;
pub const EXIT_XSETBV: u32 = 55;
pub const EXIT_PML_FULL: u32 = 62;
/// Exit-reason bit 31: the exit is a VM-entry failure (28.2.1).
const EXIT_REASON_ENTRY_FAILURE: u64 = 1 << 31;

// Interruption-information format (25.8.3 entry, 25.9.2 exit).
const INTR_INFO_VALID: u64 = 1 << 31;
const INTR_INFO_ERROR_VALID: u64 = 1 << 11;
const INTR_TYPE_EXTERNAL: u64 = 0 << 8;
const INTR_TYPE_NMI: u64 = 2 << 8;
const INTR_TYPE_HW_EXCEPTION: u64 = 3 << 8;
const INTR_TYPE_MASK: u64 = 7 << 8;

/// Power-on PAT value (Intel SDM vol. 3A, 13.12.4).
const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;

// EFER bits (Intel SDM vol. 3A, 2.2.1).
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

// CR0/CR4 bits (Intel SDM vol. 3A, 2.5).
const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;

// Guest segment access rights in the VMCS format (25.4.1, table 25-2):
// type 3:0, S 4, DPL 6:5, P 7, L 13, D/B 14, G 15, unusable 16.
/// 64-bit code: execute/read, accessed, S, P, L, G.
const AR_CODE64: u64 = 0xa09b;
/// Data: read/write, accessed, S, P, D/B, G.
const AR_DATA: u64 = 0xc093;
/// Busy 64-bit TSS, P.
const AR_TSS_BUSY: u64 = 0x008b;
/// Unusable (LDTR).
const AR_UNUSABLE: u64 = 1 << 16;

/// The EPT pointer's accessed/dirty enable (Intel SDM vol. 3C, 25.6.11).
const EPTP_AD: u64 = hvcore::vmx::EPTP_AD;

/// Entries of the PML buffer (Intel SDM vol. 3C, 29.3.6).
const PML_ENTRIES: u64 = 512;

/// The SYSCALL-family MSRs the vCPU switches in software, in
/// [`SyscallMsrs`] order.
const SYSCALL_MSRS: [u32; 5] = [
    IA32_STAR,
    IA32_LSTAR,
    IA32_CSTAR,
    IA32_FMASK,
    IA32_KERNEL_GS_BASE,
];

/// Values now in the physical SYSCALL MSRs and TSC_AUX (`u64::MAX` =
/// unknown, e.g. the host's boot value).
static LOADED: [AtomicU64; 6] = [
    AtomicU64::new(u64::MAX),
    AtomicU64::new(u64::MAX),
    AtomicU64::new(u64::MAX),
    AtomicU64::new(u64::MAX),
    AtomicU64::new(u64::MAX),
    AtomicU64::new(u64::MAX),
];

/// 512-byte FXSAVE image of the guest's x87/SSE state: VM entry does not
/// switch it, so the vCPU keeps its own.
#[repr(C, align(16))]
struct FxArea([u8; 512]);
const _: () = assert!(core::mem::size_of::<FxArea>() == 512);

impl FxArea {
    /// The state after INIT: FCW = 0x37f, MXCSR = 0x1f80 (Intel SDM vol. 3A,
    /// 10.1, table 10-1; FXSAVE layout in vol. 1, 10.5.1).
    fn initial() -> Self {
        let mut a = [0u8; 512];
        a[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        a[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        Self(a)
    }
}

/// Page-modification logging state while it is on.
struct PmlState {
    /// The 4 KiB log the CPU writes GPAs into.
    page: Hpa,
    /// GPAs drained at PML-full exits, not yet handed out.
    overflow: Vec<u64>,
}

/// One VMX vCPU.
pub struct VmxVcpu {
    /// The VMCS region, in a frame this vCPU owns (identity-mapped).
    vmcs: Hpa,
    regs: Regs,
    vpid: u16,
    features: VmxFeatures,
    /// The EPT pointer (A/D bit set only while PML is on).
    eptp: u64,
    /// Secondary controls as written (PML is toggled at run time).
    proc2: u32,
    launched: bool,
    /// Length of the instruction the last exit reported, if any.
    exit_len: Option<u64>,
    /// INVEPT before the next entry (permissions were reduced).
    flush_ept: bool,
    /// INVVPID before the next entry (new VPID owner, or reset).
    flush_vpid: bool,
    /// STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE.
    syscall_msrs: [u64; 5],
    tsc_aux: u32,
    /// The guest's CR2: VM entry and exit do not switch it (Intel SDM vol.
    /// 3C, 27.3 and 28.3 name no CR2), so it is loaded before entry and read
    /// back after the exit, keeping it per vCPU.
    cr2: u64,
    fx: FxArea,
    pml: Option<PmlState>,
    /// VMWRITE failures during set-up (a VMCS field this CPU lacks).
    setup_error: Option<u32>,
    /// Exits handled inside `run` (PML full, #UD for VMX instructions,
    /// INVD, CR8).
    resolved_exits: u64,
}

/// What one VM exit means, decoded from the exit reason, qualification,
/// guest-physical address, instruction length and the guest registers
/// alone (no VMCS access, so host tests can feed it arbitrary values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Report `exit`; `len` is the length of the instruction that caused
    /// it, if it was an instruction.
    Exit { exit: VmExit, len: Option<u64> },
    /// The exit is a VM-entry failure with this basic reason.
    EntryFailed { reason: u32, qualification: u64 },
    /// Raise #UD in the guest and re-enter.
    InjectUd,
    /// Raise #GP(0) in the guest and re-enter.
    InjectGp,
    /// Step over an instruction of this many bytes and re-enter.
    Skip(u64),
    /// MOV from CR8 into general register `gpr`: it reads 0; then skip.
    ReadCr8 { gpr: u8, len: u64 },
    /// The PML buffer is full: drain it and re-enter.
    PmlFull,
}

/// Decode one VM exit (Intel SDM vol. 3C, 28.2; exit qualifications in
/// 28.2.1, tables 28-3 (CR access), 28-5 (I/O), 28-7 (EPT violation)).
/// Never panics, whatever the values.
pub fn decode_exit(
    reason_field: u64,
    qual: u64,
    gpa: u64,
    len: u64,
    intr_info: u64,
    regs: &Regs,
) -> Decoded {
    let reason = (reason_field & 0xffff) as u32;
    if reason_field & EXIT_REASON_ENTRY_FAILURE != 0 {
        return Decoded::EntryFailed {
            reason,
            qualification: qual,
        };
    }
    // Instruction lengths are 1..=15 (28.2.5); anything else is not an
    // instruction exit we can step over.
    let len = (1..=15).contains(&len).then_some(len);
    let insn = |exit| Decoded::Exit { exit, len };
    let event = |exit| Decoded::Exit { exit, len: None };
    match reason {
        // The VMX-preemption timer is the host's time slice (see
        // `preemption_timer_value`): report it like the timer interrupt.
        EXIT_EXTERNAL_INTERRUPT | EXIT_PREEMPTION_TIMER => event(VmExit::ExternalInterrupt),
        // NMI exiting: the NMI was the host's; report it like an interrupt
        // (the host has nothing to do for it). Exceptions are not
        // intercepted (exception bitmap 0), so anything else is unknown.
        EXIT_EXCEPTION_OR_NMI if intr_info & INTR_TYPE_MASK == INTR_TYPE_NMI => {
            event(VmExit::ExternalInterrupt)
        }
        EXIT_TRIPLE_FAULT => event(VmExit::Shutdown),
        EXIT_CPUID => insn(VmExit::Cpuid {
            leaf: regs.rax as u32,
            subleaf: regs.rcx as u32,
        }),
        EXIT_HLT => insn(VmExit::Hlt),
        EXIT_VMCALL => insn(VmExit::Hypercall),
        EXIT_IO => {
            // Table 28-5: bits 2:0 size - 1, 3 direction (1 = IN), 4
            // string, 5 REP, 31:16 port. Size code 2 is not a real access;
            // it decodes to 3 bytes, which the handler answers with #UD.
            let io = IoAccess {
                port: (qual >> 16) as u16,
                size: (qual & 7) as u8 + 1,
                dir: if qual & (1 << 3) != 0 {
                    IoDir::In
                } else {
                    IoDir::Out
                },
                string: qual & (1 << 4) != 0,
                rep: qual & (1 << 5) != 0,
            };
            insn(VmExit::Io(io))
        }
        EXIT_RDMSR => insn(VmExit::MsrRead {
            msr: regs.rcx as u32,
        }),
        EXIT_WRMSR => insn(VmExit::MsrWrite {
            msr: regs.rcx as u32,
            value: (regs.rdx << 32) | (regs.rax & 0xffff_ffff),
        }),
        // Table 28-7: bits 0/1/2 read/write/fetch, 3/4/5 the translation
        // allowed read/write/execute (any set = present).
        EXIT_EPT_VIOLATION => event(VmExit::NestedFault {
            gpa: Gpa(gpa),
            access: Access {
                write: qual & (1 << 1) != 0,
                exec: qual & (1 << 2) != 0,
                present: qual & (0b111 << 3) != 0,
            },
        }),
        EXIT_EPT_MISCONFIG => event(VmExit::NestedMisconfig { gpa: Gpa(gpa) }),
        EXIT_CR_ACCESS => decode_cr_access(qual, len, regs),
        EXIT_PML_FULL => Decoded::PmlFull,
        // INVD (0f 08): nothing to do for a guest without its own cache.
        EXIT_INVD => match len {
            Some(n) => Decoded::Skip(n),
            None => event(VmExit::Unknown {
                raw: u64::from(reason),
            }),
        },
        // The guest's CPUID shows no VMX, SMX or MONITOR: these raise #UD
        // for it. XSETBV too: VM entry does not switch XCR0, so a guest
        // may not change it (the CPUID policy keeps XSAVE hidden).
        EXIT_VMCLEAR..=EXIT_VMXON
        | EXIT_INVEPT
        | EXIT_INVVPID
        | EXIT_GETSEC
        | EXIT_MONITOR
        | EXIT_MWAIT
        | EXIT_XSETBV => Decoded::InjectUd,
        _ => event(VmExit::Unknown {
            raw: u64::from(reason),
        }),
    }
}

/// Decode a control-register access (table 28-3: bits 3:0 CR, 5:4 type
/// (0 MOV to CR, 1 MOV from CR), 11:8 general register).
fn decode_cr_access(qual: u64, len: Option<u64>, regs: &Regs) -> Decoded {
    let cr = qual & 0xf;
    let kind = (qual >> 4) & 3;
    let gpr = ((qual >> 8) & 0xf) as u8;
    let unknown = Decoded::Exit {
        exit: VmExit::Unknown {
            raw: u64::from(EXIT_CR_ACCESS),
        },
        len: None,
    };
    let Some(len) = len else {
        return unknown;
    };
    match (cr, kind) {
        // Only the guest/host-owned bit (VMXE) differing from the shadow
        // makes MOV to CR4 exit: the guest tried to set it (25.6.6).
        (4, 0) => {
            let value = gpr_value(regs, gpr);
            if value & CR4_VMXE != 0 {
                Decoded::InjectGp
            } else {
                // Cannot happen with the mask we set; keep the guest going.
                Decoded::Skip(len)
            }
        }
        // CR8 (the TPR) is not virtualised: writes are dropped, reads
        // return 0, so the guest cannot reach the host's LAPIC.
        (8, 0) => Decoded::Skip(len),
        (8, 1) => Decoded::ReadCr8 { gpr, len },
        _ => unknown,
    }
}

/// General register `n` in the encoding of table 28-3 (0 RAX, 1 RCX, 2
/// RDX, 3 RBX, 4 RSP, 5 RBP, 6 RSI, 7 RDI, 8-15 R8-R15).
fn gpr_value(regs: &Regs, n: u8) -> u64 {
    let mut r = *regs;
    *gpr_mut(&mut r, n)
}

fn gpr_mut(regs: &mut Regs, n: u8) -> &mut u64 {
    match n & 0xf {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

/// Whether `v` is a canonical 48-bit virtual address.
fn canonical(v: u64) -> bool {
    let top = (v as i64) >> 47;
    top == 0 || top == -1
}

/// Whether every entry of a PAT value is a defined memory type (0, 1, 4-7).
fn valid_pat(v: u64) -> bool {
    v.to_le_bytes().iter().all(|&t| matches!(t, 0 | 1 | 4..=7))
}

/// Whether vector `v` pushes an error code in protected mode (Intel SDM
/// vol. 3A, table 6-1); VM entry checks the deliver-error-code bit against
/// it (27.2.1.3).
fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10..=14 | 17 | 21)
}

impl VmxVcpu {
    /// A vCPU with its VMCS set up (controls, host state, a long-mode guest
    /// state with CR3 = 0) using the EPT rooted at `nested_root`;
    /// [`Vcpu::reset_long_mode`] prepares it for a kernel.
    pub fn new(
        frames: &mut dyn FrameAlloc,
        features: &VmxFeatures,
        nested_root: Hpa,
    ) -> Result<Self, HostError> {
        let vpid = if features.vpid() {
            super::alloc_vpid().ok_or(HostError::Backend("out of VPIDs"))?
        } else {
            0
        };
        let frame = match frames.alloc_frame() {
            Ok(f) => f,
            Err(_) => {
                super::free_vpid(vpid);
                let (_, free_bytes) = crate::mem::memory_stats();
                return Err(HostError::OutOfMemory {
                    requested_bytes: PAGE_SIZE,
                    free_bytes,
                });
            }
        };
        // 25.2 / 25.11.3: the revision identifier goes into the first 31
        // bits; then VMCLEAR initialises the launch state.
        // SAFETY: a fresh, zeroed, identity-mapped frame this vCPU owns.
        unsafe { (frame.as_u64() as *mut u32).write_volatile(features.revision) };
        let mut vcpu = Self {
            vmcs: frame,
            regs: Regs::default(),
            vpid,
            features: *features,
            eptp: hvcore::vmx::eptp(nested_root, false),
            proc2: 0,
            launched: false,
            exit_len: None,
            flush_ept: true,
            flush_vpid: true,
            syscall_msrs: [0; 5],
            tsc_aux: 0,
            cr2: 0,
            fx: FxArea::initial(),
            pml: None,
            setup_error: None,
            resolved_exits: 0,
        };
        // SAFETY: the region is ours and carries the revision identifier;
        // VMX is on (`super::enable` ran before any vCPU is created).
        let r = unsafe { vmcs::clear(frame).and_then(|()| vmcs::make_current(frame)) };
        if r.is_err() {
            vcpu.destroy(frames);
            return Err(HostError::Backend("VMCLEAR/VMPTRLD of a new VMCS failed"));
        }
        if let Err(e) = vcpu.init_vmcs() {
            vcpu.destroy(frames);
            return Err(e);
        }
        Ok(vcpu)
    }

    /// VMCLEAR the VMCS and return its frame, the PML page and the VPID.
    pub fn destroy(mut self, frames: &mut dyn FrameAlloc) {
        // SAFETY: our own region; VMCLEAR writes back any cached state, so
        // the frame can be reused as plain memory afterwards.
        let _ = unsafe { vmcs::clear(self.vmcs) };
        if let Some(p) = self.pml.take() {
            frames.free_frame(p.page);
        }
        super::free_vpid(self.vpid);
        frames.free_frame(self.vmcs);
    }

    /// Make this vCPU's VMCS current. Cannot fail for a VMCS `new`
    /// accepted; a failure is a broken hypervisor invariant.
    fn load(&self) {
        // SAFETY: `self.vmcs` is the VMCS region this vCPU owns, cleared
        // in `new`; VMX is on.
        if unsafe { vmcs::make_current(self.vmcs) }.is_err() {
            panic!("vmx: VMPTRLD of a live VMCS at {} failed", self.vmcs);
        }
    }

    fn read(&self, field: u32) -> u64 {
        self.load();
        vmcs::read(field)
    }

    fn write(&mut self, field: u32, value: u64) {
        self.load();
        if vmcs::write(field, value).is_err() {
            log::warn!("vmx: VMWRITE of field {field:#x} = {value:#x} failed");
            self.setup_error.get_or_insert(field);
        }
    }

    /// One control field, adjusted to what the CPU allows; `Err` names
    /// the control field if a bit we need is not available.
    fn control(
        &mut self,
        field: u32,
        allowed: super::Allowed,
        required: u32,
        optional: u32,
    ) -> Result<u32, HostError> {
        let value = allowed.adjust(required | (optional & allowed.may_be_one));
        if value & required != required {
            log::error!(
                "vmx: control field {field:#x}: need {required:#x}, CPU allows {:#x}",
                allowed.may_be_one
            );
            return Err(HostError::Backend(
                "the CPU lacks a VMX control this backend needs",
            ));
        }
        self.write(field, u64::from(value));
        Ok(value)
    }

    /// Controls, host state and a default guest state. Intel SDM vol. 3C,
    /// 25.6-25.8 (controls), 25.5 (host state), 26.2 (what entry checks).
    fn init_vmcs(&mut self) -> Result<(), HostError> {
        let f = self.features;
        let pin = self.control(
            PIN_BASED_CONTROLS,
            f.pin,
            PIN_EXTERNAL_INTERRUPT_EXITING | PIN_NMI_EXITING,
            PIN_PREEMPTION_TIMER,
        )?;
        if pin & PIN_PREEMPTION_TIMER != 0 {
            // Reloaded from this field at every VM entry (no "save timer
            // value" exit control), so each entry gets one full slice.
            self.write(GUEST_PREEMPTION_TIMER, preemption_timer_value());
        }
        self.control(
            PRIMARY_PROC_CONTROLS,
            f.proc,
            PROC_HLT_EXITING
                | PROC_USE_TSC_OFFSETTING
                | PROC_MWAIT_EXITING
                | PROC_MONITOR_EXITING
                | PROC_CR8_LOAD_EXITING
                | PROC_CR8_STORE_EXITING
                | PROC_USE_IO_BITMAPS
                | PROC_USE_MSR_BITMAPS
                | PROC_SECONDARY_CONTROLS,
            0,
        )?;
        let vpid = if f.vpid() { PROC2_ENABLE_VPID } else { 0 };
        self.proc2 = self.control(
            SECONDARY_PROC_CONTROLS,
            f.proc2,
            PROC2_ENABLE_EPT | vpid,
            PROC2_ENABLE_RDTSCP | PROC2_ENABLE_INVPCID,
        )?;
        self.control(
            EXIT_CONTROLS,
            f.exit,
            EXIT_HOST_ADDRESS_SPACE_SIZE
                | EXIT_SAVE_PAT
                | EXIT_LOAD_PAT
                | EXIT_SAVE_EFER
                | EXIT_LOAD_EFER,
            0,
        )?;
        self.control(
            ENTRY_CONTROLS,
            f.entry,
            ENTRY_IA32E_MODE_GUEST | ENTRY_LOAD_PAT | ENTRY_LOAD_EFER,
            0,
        )?;
        self.write(EXCEPTION_BITMAP, 0);
        self.write(CR3_TARGET_COUNT, 0);
        self.write(EXIT_MSR_STORE_COUNT, 0);
        self.write(EXIT_MSR_LOAD_COUNT, 0);
        self.write(ENTRY_MSR_LOAD_COUNT, 0);
        self.write(ENTRY_INTERRUPTION_INFO, 0);
        self.write(IO_BITMAP_A, maps::hpa(&maps::IO_BITMAP_A).as_u64());
        self.write(IO_BITMAP_B, maps::hpa(&maps::IO_BITMAP_B).as_u64());
        self.write(MSR_BITMAP, maps::hpa(&maps::MSR_BITMAP).as_u64());
        self.write(TSC_OFFSET, 0);
        self.write(EPT_POINTER, self.eptp);
        if f.vpid() {
            self.write(VPID, u64::from(self.vpid));
        }
        // CR4.VMXE belongs to the host; the guest reads it as clear.
        self.write(CR0_GUEST_HOST_MASK, 0);
        self.write(CR4_GUEST_HOST_MASK, CR4_VMXE | f.cr4_fixed0);

        // 25.5: host state, this CPU's current values. RSP/RIP are written
        // by the world switch.
        let (idtr_base, _) = sidt();
        self.write(HOST_CR0, read_cr0());
        self.write(HOST_CR3, read_cr3());
        self.write(HOST_CR4, read_cr4());
        let code = u64::from(crate::gdt::CODE_SELECTOR);
        let data = u64::from(crate::gdt::DATA_SELECTOR);
        self.write(HOST_CS_SELECTOR, code);
        self.write(HOST_SS_SELECTOR, data);
        self.write(HOST_DS_SELECTOR, data);
        self.write(HOST_ES_SELECTOR, data);
        self.write(HOST_FS_SELECTOR, 0);
        self.write(HOST_GS_SELECTOR, 0);
        // 26.2.3: the host TR selector must not be 0 (the GDT's 64-bit TSS).
        self.write(HOST_TR_SELECTOR, u64::from(crate::gdt::TSS_SELECTOR));
        // SAFETY: FS_BASE, GS_BASE, PAT and EFER exist on every 64-bit VMX
        // CPU (vol. 4, table 2-2).
        let (fs, gs, pat, efer) = unsafe {
            (
                rdmsr(IA32_FS_BASE),
                rdmsr(IA32_GS_BASE),
                rdmsr(IA32_PAT),
                rdmsr(IA32_EFER),
            )
        };
        self.write(HOST_FS_BASE, fs);
        self.write(HOST_GS_BASE, gs);
        self.write(HOST_TR_BASE, crate::gdt::tss_base());
        self.write(HOST_GDTR_BASE, crate::gdt::gdt_base());
        self.write(HOST_IDTR_BASE, idtr_base);
        self.write(HOST_SYSENTER_CS, 0);
        self.write(HOST_SYSENTER_ESP, 0);
        self.write(HOST_SYSENTER_EIP, 0);
        self.write(HOST_PAT, pat);
        self.write(HOST_EFER, efer);

        self.reset_long_mode(&LongModeEntry {
            rip: 0,
            rsp: 0,
            rdi: 0,
            cr3: Gpa(0),
            gdt_base: Gpa(0),
            gdt_limit: 0,
        });
        match self.setup_error {
            Some(field) => {
                log::error!("vmx: VMCS set-up: VMWRITE of field {field:#x} failed");
                Err(HostError::Backend("VMWRITE failed while setting up a VMCS"))
            }
            None => Ok(()),
        }
    }

    /// Load the guest's SYSCALL MSRs and TSC_AUX into the CPU where they
    /// differ from what is there.
    fn load_guest_msrs(&self) {
        let rdtscp = self.proc2 & PROC2_ENABLE_RDTSCP != 0;
        for (i, (&msr, &value)) in SYSCALL_MSRS.iter().zip(&self.syscall_msrs).enumerate() {
            if LOADED[i].load(Ordering::Relaxed) != value {
                // SAFETY: architectural MSRs of every 64-bit CPU; the
                // values were validated by `write_msr`; the host never uses
                // SYSCALL or SWAPGS.
                unsafe { wrmsr(msr, value) };
                LOADED[i].store(value, Ordering::Relaxed);
            }
        }
        if rdtscp && LOADED[5].load(Ordering::Relaxed) != u64::from(self.tsc_aux) {
            // SAFETY: RDTSCP is enabled for the guest, so the CPU has
            // TSC_AUX; the host never reads it.
            unsafe { wrmsr(IA32_TSC_AUX, u64::from(self.tsc_aux)) };
            LOADED[5].store(u64::from(self.tsc_aux), Ordering::Relaxed);
        }
    }

    /// Pending TLB invalidations before an entry (Intel SDM vol. 3C,
    /// 29.4.3.3 and 29.4.3.4): INVEPT after EPT permissions were reduced
    /// (single context when supported, else global), INVVPID when the VPID
    /// is new to this vCPU or the guest was reset.
    fn flush_tlbs(&mut self) {
        if core::mem::take(&mut self.flush_ept) {
            let r = if self.features.invept_single() {
                vmcs::invept(INV_SINGLE, self.eptp)
            } else {
                vmcs::invept(INV_ALL, 0)
            };
            if r.is_err() {
                log::warn!("vmx: INVEPT failed");
            }
        }
        if core::mem::take(&mut self.flush_vpid) && self.features.vpid() {
            let r = if self.features.invvpid_single() {
                vmcs::invvpid(INV_SINGLE, self.vpid)
            } else {
                vmcs::invvpid(INV_ALL, 0)
            };
            if r.is_err() {
                log::warn!("vmx: INVVPID failed");
            }
        }
    }

    /// One entry/exit round trip with the register file copied in and out.
    fn enter(&mut self) -> SwitchEnd {
        self.load();
        let regs = self.regs;
        self.write(GUEST_RSP, regs.rsp);
        self.write(GUEST_RIP, regs.rip);
        self.write(GUEST_RFLAGS, regs.rflags);
        self.flush_tlbs();
        self.load_guest_msrs();
        if crate::cpu::read_cr2() != self.cr2 {
            crate::cpu::write_cr2(self.cr2);
        }
        // SAFETY: VMX is on and the VMCS is current and complete (`new`
        // and `reset_long_mode`); its EPT maps only this partition's RAM;
        // the host IDT is live (installed before any VM exists).
        // FXRSTOR/FXSAVE use our 16-byte aligned 512-byte area; the host
        // does not use x87/SSE state (soft-float target).
        let end = unsafe {
            core::arch::asm!("fxrstor64 [{}]", in(reg) self.fx.0.as_ptr(), options(nostack, readonly));
            let end = world_switch(&mut self.regs, self.launched);
            core::arch::asm!("fxsave64 [{}]", in(reg) self.fx.0.as_mut_ptr(), options(nostack));
            end
        };
        self.cr2 = crate::cpu::read_cr2();
        if end != SwitchEnd::Exited {
            return end;
        }
        self.launched = true;
        self.regs.rsp = vmcs::read(GUEST_RSP);
        self.regs.rip = vmcs::read(GUEST_RIP);
        self.regs.rflags = vmcs::read(GUEST_RFLAGS);
        // An event whose delivery the exit interrupted (e.g. an EPT
        // violation on the stack while delivering an exception) is in the
        // IDT-vectoring information (Intel SDM vol. 3C, 28.2.4) and must be
        // injected again by the VMM (29.2.1, "event reinjection"); VM exit
        // cleared the entry interruption field.
        let idt = vmcs::read(IDT_VECTORING_INFO);
        if idt & INTR_INFO_VALID != 0 {
            // Bit 12 is undefined in IDT-vectoring information.
            let _ = vmcs::write(ENTRY_INTERRUPTION_INFO, idt & !(1 << 12));
            if idt & INTR_INFO_ERROR_VALID != 0 {
                let _ = vmcs::write(
                    ENTRY_EXCEPTION_ERROR_CODE,
                    vmcs::read(IDT_VECTORING_ERROR_CODE),
                );
            }
            let _ = vmcs::write(
                ENTRY_INSTRUCTION_LENGTH,
                vmcs::read(EXIT_INSTRUCTION_LENGTH),
            );
        }
        SwitchEnd::Exited
    }

    /// Enter the guest once without decoding; returns the basic exit
    /// reason, or `None` if the entry failed (raw round-trip benchmark).
    pub fn enter_raw(&mut self) -> Option<u32> {
        match self.enter() {
            SwitchEnd::Exited => Some((vmcs::read(EXIT_REASON) & 0xffff) as u32),
            _ => None,
        }
    }

    /// Set RIP (raw benchmark loop).
    pub fn set_rip(&mut self, rip: u64) {
        self.regs.rip = rip;
    }

    /// An `EntryFailed` exit for an entry that did not happen or failed its
    /// checks, naming the field where the software checks find one.
    fn entry_failed(&mut self, end: SwitchEnd) -> VmExit {
        let (what, raw) = match end {
            SwitchEnd::FailInvalid => ("VMLAUNCH/VMRESUME: no current VMCS (VMfailInvalid)", 0),
            SwitchEnd::FailValid => {
                let code = self.read(VM_INSTRUCTION_ERROR);
                (vmcs::instruction_error_name(code), code)
            }
            SwitchEnd::Exited => {
                let reason = self.read(EXIT_REASON) & 0xffff;
                let what = match reason as u32 {
                    EXIT_INVALID_GUEST_STATE => "VM entry failed: invalid guest state",
                    EXIT_MSR_LOADING => "VM entry failed: MSR loading",
                    EXIT_MACHINE_CHECK => "VM entry failed: machine-check event",
                    _ => "VM entry failed",
                };
                (what, reason)
            }
        };
        let field = self.diagnose();
        log::error!(
            "vmx: {what} (code {raw:#x}); first suspicious field: {field:?}, exit qualification {:#x}",
            self.read(EXIT_QUALIFICATION)
        );
        VmExit::EntryFailed {
            reason: EntryFailure {
                what,
                raw,
                field: field.map(u64::from),
            },
        }
    }

    /// The first VMCS field that fails one of the VM-entry checks this
    /// backend can repeat in software (Intel SDM vol. 3C, 27.2.1 controls,
    /// 27.2.2 host state, 27.3.1 guest state); `None` if all pass.
    fn diagnose(&self) -> Option<u32> {
        let f = &self.features;
        let ctl = |field: u32| self.read(field) as u32;
        let checks: [(u32, bool); 5] = [
            (PIN_BASED_CONTROLS, f.pin.accepts(ctl(PIN_BASED_CONTROLS))),
            (
                PRIMARY_PROC_CONTROLS,
                f.proc.accepts(ctl(PRIMARY_PROC_CONTROLS)),
            ),
            (
                SECONDARY_PROC_CONTROLS,
                f.proc2.accepts(ctl(SECONDARY_PROC_CONTROLS)),
            ),
            (EXIT_CONTROLS, f.exit.accepts(ctl(EXIT_CONTROLS))),
            (ENTRY_CONTROLS, f.entry.accepts(ctl(ENTRY_CONTROLS))),
        ];
        if let Some((field, _)) = checks.iter().find(|(_, ok)| !ok) {
            return Some(*field);
        }
        let fixed = |v: u64, f0: u64, f1: u64| v & f0 == f0 && v & !f1 == 0;
        if !fixed(self.read(HOST_CR0), f.cr0_fixed0, f.cr0_fixed1) {
            return Some(HOST_CR0);
        }
        if !fixed(self.read(HOST_CR4), f.cr4_fixed0, f.cr4_fixed1) {
            return Some(HOST_CR4);
        }
        if self.read(HOST_TR_SELECTOR) == 0 {
            return Some(HOST_TR_SELECTOR);
        }
        if !fixed(self.read(GUEST_CR0), f.cr0_fixed0, f.cr0_fixed1) {
            return Some(GUEST_CR0);
        }
        if !fixed(self.read(GUEST_CR4), f.cr4_fixed0, f.cr4_fixed1) {
            return Some(GUEST_CR4);
        }
        let efer = self.read(GUEST_EFER);
        let ia32e = self.read(ENTRY_CONTROLS) & u64::from(ENTRY_IA32E_MODE_GUEST) != 0;
        if (efer & EFER_LMA != 0) != ia32e || (efer & EFER_LME != 0) != ia32e {
            return Some(GUEST_EFER);
        }
        if self.read(GUEST_RFLAGS) & 2 == 0 {
            return Some(GUEST_RFLAGS);
        }
        let cs_ar = self.read(GUEST_CS_AR);
        if ia32e && cs_ar & (1 << 13) != 0 && cs_ar & (1 << 14) != 0 {
            return Some(GUEST_CS_AR);
        }
        if self.read(GUEST_TR_AR) & 0x1f != 0xb {
            return Some(GUEST_TR_AR);
        }
        if self.read(VMCS_LINK_POINTER) != u64::MAX {
            return Some(VMCS_LINK_POINTER);
        }
        if !valid_pat(self.read(GUEST_PAT)) {
            return Some(GUEST_PAT);
        }
        None
    }

    /// Decode the last exit. `None` for exits handled here (VMX
    /// instructions, INVD, CR8, PML full), which re-enter the guest.
    fn decode(&mut self) -> Option<VmExit> {
        self.exit_len = None;
        let d = decode_exit(
            vmcs::read(EXIT_REASON),
            vmcs::read(EXIT_QUALIFICATION),
            vmcs::read(GUEST_PHYSICAL_ADDRESS),
            vmcs::read(EXIT_INSTRUCTION_LENGTH),
            vmcs::read(EXIT_INTERRUPTION_INFO),
            &self.regs,
        );
        match d {
            Decoded::Exit { exit, len } => {
                self.exit_len = len;
                Some(exit)
            }
            Decoded::EntryFailed { .. } => Some(self.entry_failed(SwitchEnd::Exited)),
            Decoded::InjectUd => {
                self.inject_exception(6, None);
                None
            }
            Decoded::InjectGp => {
                self.inject_exception(13, Some(0));
                None
            }
            Decoded::Skip(len) => {
                self.exit_len = Some(len);
                self.skip_instruction();
                None
            }
            Decoded::ReadCr8 { gpr, len } => {
                *gpr_mut(&mut self.regs, gpr) = 0;
                self.exit_len = Some(len);
                self.skip_instruction();
                None
            }
            Decoded::PmlFull => {
                self.pml_drain_buffer(None);
                None
            }
        }
    }

    /// Start page-modification logging (Intel SDM vol. 3C, 29.3.6): a log
    /// page, index 511, EPT A/D flags on, the PML control set. Idempotent.
    pub fn pml_start(&mut self, frames: &mut dyn FrameAlloc) -> Result<(), HostError> {
        if self.pml.is_some() {
            return Ok(());
        }
        if !self.features.pml() {
            return Err(HostError::Backend("PML not available"));
        }
        let page = frames.alloc_frame().map_err(|_| HostError::OutOfMemory {
            requested_bytes: PAGE_SIZE,
            free_bytes: crate::mem::memory_stats().1,
        })?;
        self.pml = Some(PmlState {
            page,
            overflow: Vec::new(),
        });
        self.write(PML_ADDRESS, page.as_u64());
        self.write(GUEST_PML_INDEX, PML_ENTRIES - 1);
        self.eptp |= EPTP_AD;
        self.write(EPT_POINTER, self.eptp);
        self.proc2 |= PROC2_ENABLE_PML;
        self.write(SECONDARY_PROC_CONTROLS, u64::from(self.proc2));
        self.flush_ept = true;
        Ok(())
    }

    /// Stop page-modification logging and free the log page.
    pub fn pml_stop(&mut self, frames: &mut dyn FrameAlloc) {
        let Some(p) = self.pml.take() else {
            return;
        };
        self.proc2 &= !PROC2_ENABLE_PML;
        self.write(SECONDARY_PROC_CONTROLS, u64::from(self.proc2));
        self.eptp &= !EPTP_AD;
        self.write(EPT_POINTER, self.eptp);
        self.flush_ept = true;
        frames.free_frame(p.page);
    }

    /// Whether PML is on.
    pub fn pml_active(&self) -> bool {
        self.pml.is_some()
    }

    /// Move the logged GPAs out of the PML page (entries index+1..=511,
    /// 29.3.6) to `mark`, or into the overflow list when `mark` is `None`;
    /// reset the index.
    fn pml_drain_buffer(&mut self, mut mark: Option<&mut dyn FnMut(Gfn)>) {
        let index = self.read(GUEST_PML_INDEX) & 0xffff;
        let Some(p) = self.pml.as_mut() else {
            return;
        };
        // The CPU decrements the index after each entry; 0xffff (or any
        // value >= 512) means the page is full.
        let first = if index >= PML_ENTRIES { 0 } else { index + 1 };
        for i in first..PML_ENTRIES {
            // SAFETY: the PML page is a frame this vCPU owns; the CPU writes
            // it only while the guest runs, which it does not now.
            let gpa = unsafe { ((p.page.as_u64() + i * 8) as *const u64).read_volatile() };
            match mark.as_mut() {
                Some(m) => m(Gfn(gpa / PAGE_SIZE)),
                None => {
                    if p.overflow.try_reserve(1).is_ok() {
                        p.overflow.push(gpa);
                    } else {
                        log::error!("vmx: PML overflow list: out of heap; a dirty page is lost");
                    }
                }
            }
        }
        let _ = vmcs::write(GUEST_PML_INDEX, PML_ENTRIES - 1);
    }

    /// Hand every GPA logged since the last drain to `mark`.
    pub fn pml_drain(&mut self, mark: &mut dyn FnMut(Gfn)) {
        if let Some(p) = self.pml.as_mut() {
            for gpa in p.overflow.drain(..) {
                mark(Gfn(gpa / PAGE_SIZE));
            }
        }
        self.pml_drain_buffer(Some(mark));
    }

    /// The current EPT pointer (host-physical root plus flags).
    pub fn eptp(&self) -> u64 {
        self.eptp
    }

    /// Exits handled inside [`Vcpu::run`] so far.
    pub fn resolved_exits(&self) -> u64 {
        self.resolved_exits
    }
}

/// Guest segment fields (selector, base, limit, access rights) in record
/// order: ES CS SS DS FS GS LDTR TR.
const SEGMENT_FIELDS: [(u32, u32, u32, u32); 8] = [
    (
        GUEST_ES_SELECTOR,
        GUEST_ES_BASE,
        GUEST_ES_LIMIT,
        GUEST_ES_AR,
    ),
    (
        GUEST_CS_SELECTOR,
        GUEST_CS_BASE,
        GUEST_CS_LIMIT,
        GUEST_CS_AR,
    ),
    (
        GUEST_SS_SELECTOR,
        GUEST_SS_BASE,
        GUEST_SS_LIMIT,
        GUEST_SS_AR,
    ),
    (
        GUEST_DS_SELECTOR,
        GUEST_DS_BASE,
        GUEST_DS_LIMIT,
        GUEST_DS_AR,
    ),
    (
        GUEST_FS_SELECTOR,
        GUEST_FS_BASE,
        GUEST_FS_LIMIT,
        GUEST_FS_AR,
    ),
    (
        GUEST_GS_SELECTOR,
        GUEST_GS_BASE,
        GUEST_GS_LIMIT,
        GUEST_GS_AR,
    ),
    (
        GUEST_LDTR_SELECTOR,
        GUEST_LDTR_BASE,
        GUEST_LDTR_LIMIT,
        GUEST_LDTR_AR,
    ),
    (
        GUEST_TR_SELECTOR,
        GUEST_TR_BASE,
        GUEST_TR_LIMIT,
        GUEST_TR_AR,
    ),
];

/// VMX access rights (Intel SDM vol. 3C, 25.4.1, table 25-2: bits 7:0,
/// 15:12, unusable 16) in the record's packed VMCB form; an unusable
/// segment reads as not present.
fn ar_to_attrib(ar: u64) -> u16 {
    let mut a = ((ar & 0xff) | ((ar >> 4) & 0xf00)) as u16;
    if ar & AR_UNUSABLE != 0 {
        a &= !vcpu_state::ATTR_P;
    }
    a
}

/// The packed form as VMX access rights; not present = unusable.
fn attrib_to_ar(a: u16) -> u64 {
    let a = u64::from(a);
    let mut ar = (a & 0xff) | ((a & 0xf00) << 4);
    if a & u64::from(vcpu_state::ATTR_P) == 0 {
        ar |= AR_UNUSABLE;
    }
    ar
}

/// VM-entry interruption information (25.8.3) as a pending event.
fn event_out(info: u64, error_code: u64) -> Option<PendingEvent> {
    if info & INTR_INFO_VALID == 0 {
        return None;
    }
    let kind = match (info >> 8) & 7 {
        0 => EventKind::ExternalInterrupt,
        2 => EventKind::Nmi,
        3 => EventKind::Exception,
        4 => EventKind::SoftwareInterrupt,
        // Privileged and other software exceptions are not stored by our
        // exits (IDT vectoring re-injection keeps their type); none of them
        // can be pending for a guest that has no INT1/INT3/INTO.
        _ => return None,
    };
    Some(PendingEvent {
        vector: info as u8,
        kind,
        error_code: (info & INTR_INFO_ERROR_VALID != 0).then_some(error_code as u32),
    })
}

/// IA32_VMX_MISC: bits 4:0 give the rate of the VMX-preemption timer
/// (Intel SDM vol. 3D, A.6).
const MSR_VMX_MISC: u32 = 0x485;
/// The guest's time slice when no interrupt comes first.
const PREEMPTION_SLICE_NS: u64 = 4_000_000;

/// The VMX-preemption timer count for one time slice: it counts down by 1
/// every 2^X TSC ticks, X = IA32_VMX_MISC[4:0] (Intel SDM vol. 3C, 26.5.1),
/// and exits the guest (reason 52) at 0 whatever the guest's RFLAGS.IF.
///
/// External-interrupt exiting alone should make the host's timer interrupt
/// exit the guest whatever its IF too (25.6.1), and does on hardware;
/// Bochs 2.7 however computes its interrupt mask while loading the guest's
/// RFLAGS, before it counts the CPU as in VMX non-root operation, so a guest
/// spinning with IF = 0 (the `dirty-demo` guest) never exited there. The
/// preemption timer gives the CPU back in both.
fn preemption_timer_value() -> u64 {
    // SAFETY: IA32_VMX_MISC exists on every VMX CPU (vol. 3D, A.6).
    let rate = unsafe { rdmsr(MSR_VMX_MISC) } & 0x1f;
    let slice = match crate::lapic::period_ns() {
        0 => PREEMPTION_SLICE_NS,
        p => p,
    };
    let tsc_ticks = u128::from(crate::time::tsc_hz()) * u128::from(slice) / 1_000_000_000;
    let count = (tsc_ticks >> rate).clamp(1, u128::from(u32::MAX));
    count as u64
}

/// The host IDTR (base, limit).
fn sidt() -> (u64, u16) {
    let mut buf = [0u8; 10];
    // SAFETY: SIDT stores 10 bytes into the local buffer.
    unsafe { core::arch::asm!("sidt [{}]", in(reg) buf.as_mut_ptr(), options(nostack)) };
    let limit = u16::from_le_bytes([buf[0], buf[1]]);
    let mut base = [0u8; 8];
    base.copy_from_slice(&buf[2..10]);
    (u64::from_le_bytes(base), limit)
}

impl Vcpu for VmxVcpu {
    fn run(&mut self) -> VmExit {
        loop {
            match self.enter() {
                SwitchEnd::Exited => {}
                end => return self.entry_failed(end),
            }
            if let Some(exit) = self.decode() {
                return exit;
            }
            self.resolved_exits += 1;
        }
    }

    fn regs(&self) -> &Regs {
        &self.regs
    }

    fn regs_mut(&mut self) -> &mut Regs {
        &mut self.regs
    }

    fn skip_instruction(&mut self) {
        let Some(len) = self.exit_len.take() else {
            log::warn!("vmx: skip_instruction after an exit without an instruction length");
            return;
        };
        self.regs.rip = self.regs.rip.wrapping_add(len);
        // 27.3.1.5 (interruptibility state): stepping over an instruction ends blocking by
        // STI and by MOV SS, as executing it would have.
        let intr = self.read(GUEST_INTERRUPTIBILITY);
        if intr & 3 != 0 {
            self.write(GUEST_INTERRUPTIBILITY, intr & !3);
        }
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        // 25.8.3: vector 7:0, type 10:8, deliver error code 11, valid 31.
        let kind = match vector {
            2 => INTR_TYPE_NMI,
            0..=31 => INTR_TYPE_HW_EXCEPTION,
            _ => INTR_TYPE_EXTERNAL,
        };
        let mut info = u64::from(vector) | kind | INTR_INFO_VALID;
        if kind == INTR_TYPE_HW_EXCEPTION && has_error_code(vector) {
            info |= INTR_INFO_ERROR_VALID;
            self.write(
                ENTRY_EXCEPTION_ERROR_CODE,
                u64::from(error_code.unwrap_or(0)),
            );
        }
        let old = self.read(ENTRY_INTERRUPTION_INFO);
        if old & INTR_INFO_VALID != 0 {
            log::debug!("vmx: injecting vector {vector} replaces pending event {old:#x}");
        }
        self.write(ENTRY_INTERRUPTION_INFO, info);
    }

    fn read_msr(&self, msr: u32) -> Result<u64, UnknownMsr> {
        if let Some(i) = SYSCALL_MSRS.iter().position(|&m| m == msr) {
            return Ok(self.syscall_msrs[i]);
        }
        Ok(match msr {
            IA32_EFER => self.read(GUEST_EFER),
            IA32_PAT => self.read(GUEST_PAT),
            IA32_SYSENTER_CS => self.read(GUEST_SYSENTER_CS),
            IA32_SYSENTER_ESP => self.read(GUEST_SYSENTER_ESP),
            IA32_SYSENTER_EIP => self.read(GUEST_SYSENTER_EIP),
            IA32_FS_BASE => self.read(GUEST_FS_BASE),
            IA32_GS_BASE => self.read(GUEST_GS_BASE),
            // 25.6.5: the guest's RDTSC reads the TSC plus TSC_OFFSET.
            IA32_TSC => crate::cpu::rdtsc().wrapping_add(self.read(TSC_OFFSET)),
            IA32_TSC_AUX => u64::from(self.tsc_aux),
            _ => return Err(UnknownMsr(msr)),
        })
    }

    fn write_msr(&mut self, msr: u32, value: u64) -> Result<(), UnknownMsr> {
        let bad = Err(UnknownMsr(msr));
        if let Some(i) = SYSCALL_MSRS.iter().position(|&m| m == msr) {
            let ok = match msr {
                IA32_FMASK => value >> 32 == 0,
                IA32_STAR => true,
                _ => canonical(value),
            };
            if !ok {
                return bad;
            }
            self.syscall_msrs[i] = value;
            return Ok(());
        }
        match msr {
            IA32_TSC => {
                let offset = value.wrapping_sub(crate::cpu::rdtsc());
                self.write(TSC_OFFSET, offset);
            }
            IA32_TSC_AUX => {
                self.tsc_aux = u32::try_from(value).map_err(|_| UnknownMsr(msr))?;
            }
            IA32_EFER => {
                // Intel SDM vol. 3A, 2.2.1: reserved bits #GP; LMA is
                // read-only; LME may not change while paging is on (and
                // paging cannot be off: CR0.PG is fixed to 1 without
                // unrestricted guest).
                let cur = self.read(GUEST_EFER);
                if value & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0 {
                    return bad;
                }
                if (value ^ cur) & EFER_LME != 0 {
                    return bad;
                }
                self.write(
                    GUEST_EFER,
                    (value & (EFER_SCE | EFER_LME | EFER_NXE)) | (cur & EFER_LMA),
                );
            }
            IA32_PAT if valid_pat(value) => self.write(GUEST_PAT, value),
            IA32_SYSENTER_CS => self.write(GUEST_SYSENTER_CS, value & 0xffff),
            IA32_SYSENTER_ESP if canonical(value) => self.write(GUEST_SYSENTER_ESP, value),
            IA32_SYSENTER_EIP if canonical(value) => self.write(GUEST_SYSENTER_EIP, value),
            IA32_FS_BASE if canonical(value) => self.write(GUEST_FS_BASE, value),
            IA32_GS_BASE if canonical(value) => self.write(GUEST_GS_BASE, value),
            _ => return bad,
        }
        Ok(())
    }

    fn reset_long_mode(&mut self, entry: &LongModeEntry) {
        let f = self.features;
        // 27.3.1.2 / 27.3.1.3: segment registers of a 64-bit guest at CPL 0.
        // ES, SS, DS, FS, GS are flat data (the first six of the record
        // order, less CS); CS, TR and LDTR are set below.
        for &(sel, base, limit, ar) in SEGMENT_FIELDS[..6]
            .iter()
            .filter(|f| f.0 != GUEST_CS_SELECTOR)
        {
            self.write(sel, 0x10);
            self.write(base, 0);
            self.write(limit, 0xffff_ffff);
            self.write(ar, AR_DATA);
        }
        self.write(GUEST_CS_SELECTOR, 0x08);
        self.write(GUEST_CS_BASE, 0);
        self.write(GUEST_CS_LIMIT, 0xffff_ffff);
        self.write(GUEST_CS_AR, AR_CODE64);
        self.write(GUEST_TR_SELECTOR, 0);
        self.write(GUEST_TR_BASE, 0);
        self.write(GUEST_TR_LIMIT, 0x67);
        self.write(GUEST_TR_AR, AR_TSS_BUSY);
        self.write(GUEST_LDTR_SELECTOR, 0);
        self.write(GUEST_LDTR_BASE, 0);
        self.write(GUEST_LDTR_LIMIT, 0);
        self.write(GUEST_LDTR_AR, AR_UNUSABLE);
        self.write(GUEST_GDTR_BASE, entry.gdt_base.as_u64());
        self.write(GUEST_GDTR_LIMIT, u64::from(entry.gdt_limit));
        self.write(GUEST_IDTR_BASE, 0);
        self.write(GUEST_IDTR_LIMIT, 0);
        // 27.3.1.1: CR0/CR4 obey the fixed-bit MSRs (CR0.PE/NE/PG, CR4.VMXE).
        let cr0 =
            (CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG | f.cr0_fixed0) & f.cr0_fixed1;
        let cr4_guest = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
        let cr4 = (cr4_guest | CR4_VMXE | f.cr4_fixed0) & f.cr4_fixed1;
        self.write(GUEST_CR0, cr0);
        self.write(CR0_READ_SHADOW, cr0);
        self.write(GUEST_CR4, cr4);
        self.write(CR4_READ_SHADOW, cr4_guest);
        self.write(GUEST_CR3, entry.cr3.as_u64());
        self.write(GUEST_DR7, 0x400);
        self.write(GUEST_DEBUGCTL, 0);
        self.write(GUEST_EFER, EFER_LME | EFER_LMA | EFER_NXE);
        self.write(GUEST_PAT, PAT_DEFAULT);
        self.write(GUEST_SYSENTER_CS, 0);
        self.write(GUEST_SYSENTER_ESP, 0);
        self.write(GUEST_SYSENTER_EIP, 0);
        // 27.3.1.5: active, nothing blocking, no pending debug exceptions,
        // no VMCS shadowing (link pointer all ones).
        self.write(GUEST_ACTIVITY_STATE, 0);
        self.write(GUEST_INTERRUPTIBILITY, 0);
        self.write(GUEST_PENDING_DEBUG, 0);
        self.write(VMCS_LINK_POINTER, u64::MAX);
        self.write(ENTRY_INTERRUPTION_INFO, 0);
        self.write(TSC_OFFSET, 0);
        self.syscall_msrs = [0; 5];
        self.tsc_aux = 0;
        self.cr2 = 0;
        self.regs = Regs {
            rip: entry.rip,
            rsp: entry.rsp,
            rdi: entry.rdi,
            rflags: 2,
            ..Regs::default()
        };
        self.fx = FxArea::initial();
        self.exit_len = None;
        self.flush_ept = true;
        self.flush_vpid = true;
    }

    fn flush_nested_tlb(&mut self) {
        self.flush_ept = true;
    }

    fn nested_root(&self) -> Hpa {
        Hpa(self.eptp & hvcore::npt::ADDR_MASK_4K)
    }

    fn caps(&self) -> VcpuCaps {
        super::caps(&self.features)
    }

    /// The VMCS guest-state area (Intel SDM vol. 3C, 25.4) plus what VMX
    /// leaves to the VMM: the GPRs, CR2, the FXSAVE image, the SYSCALL MSRs
    /// and TSC_AUX (kept here), DR0-DR3 and DR6 (the physical registers,
    /// never switched). CR4 as the guest sees it: masked bits from the read
    /// shadow (25.6.6). The pending event is the entry interruption field,
    /// where `enter` re-queues an interrupted delivery (29.2.1).
    fn save_state(&self) -> VcpuState {
        let mut segs = [vcpu_state::Segment::default(); 8];
        for (out, &(sel, base, limit, ar)) in segs.iter_mut().zip(&SEGMENT_FIELDS) {
            *out = vcpu_state::Segment {
                selector: self.read(sel) as u16,
                attrib: ar_to_attrib(self.read(ar)),
                limit: self.read(limit) as u32,
                base: self.read(base),
            };
        }
        let mask = self.read(CR4_GUEST_HOST_MASK);
        let cr4 = (self.read(GUEST_CR4) & !mask) | (self.read(CR4_READ_SHADOW) & mask);
        let m = &self.syscall_msrs;
        let intr = self.read(GUEST_INTERRUPTIBILITY);
        VcpuState {
            id: 0,
            regs: self.regs,
            es: segs[0],
            cs: segs[1],
            ss: segs[2],
            ds: segs[3],
            fs: segs[4],
            gs: segs[5],
            ldtr: segs[6],
            tr: segs[7],
            gdtr: TableReg {
                base: self.read(GUEST_GDTR_BASE),
                limit: self.read(GUEST_GDTR_LIMIT) as u16,
            },
            idtr: TableReg {
                base: self.read(GUEST_IDTR_BASE),
                limit: self.read(GUEST_IDTR_LIMIT) as u16,
            },
            cr0: self.read(GUEST_CR0),
            cr2: self.cr2,
            cr3: self.read(GUEST_CR3),
            cr4,
            // CR8 loads and stores exit and read 0 (`Decoded::ReadCr8`): no
            // task priority is kept.
            cr8: 0,
            efer: self.read(GUEST_EFER),
            dr: crate::cpu::read_dr0_3(),
            dr6: crate::cpu::read_dr6(),
            dr7: self.read(GUEST_DR7),
            msrs: vcpu_state::Msrs {
                pat: self.read(GUEST_PAT),
                star: m[0],
                lstar: m[1],
                cstar: m[2],
                sfmask: m[3],
                kernel_gs_base: m[4],
                tsc_aux: u64::from(self.tsc_aux),
                sysenter_cs: self.read(GUEST_SYSENTER_CS),
                sysenter_esp: self.read(GUEST_SYSENTER_ESP),
                sysenter_eip: self.read(GUEST_SYSENTER_EIP),
            },
            fpu: vcpu_state::fpu_from_fxsave(&self.fx.0),
            pending_event: event_out(
                self.read(ENTRY_INTERRUPTION_INFO),
                self.read(ENTRY_EXCEPTION_ERROR_CODE),
            ),
            // Blocking by STI (bit 0) or by MOV SS (bit 1), 25.4.2.
            interrupt_shadow: intr & 3 != 0,
            // 25.6.5: the guest reads the TSC plus TSC_OFFSET.
            tsc: crate::cpu::rdtsc().wrapping_add(self.read(TSC_OFFSET)),
        }
    }

    fn restore_state(&mut self, st: &VcpuState) -> Result<(), StateError> {
        vcpu_state::check(st)?;
        let fx = vcpu_state::fxsave_image(&st.fpu)?;
        let f = self.features;
        // Without unrestricted guest, CR0 must keep the fixed bits (PE, NE,
        // PG) and the entry control "IA-32e mode guest", always set here,
        // must match EFER.LMA (26.2.1.1, 26.3.1.1).
        if st.cr0 & f.cr0_fixed0 != f.cr0_fixed0 || st.cr0 & !f.cr0_fixed1 != 0 {
            return Err(StateError::new("CR0 outside the VMX fixed bits", st.cr0));
        }
        let cr4 = st.cr4 | CR4_VMXE | f.cr4_fixed0;
        if cr4 & !f.cr4_fixed1 != 0 {
            return Err(StateError::new("CR4 bits this CPU lacks", st.cr4));
        }
        if st.efer & (1 << 10) == 0 {
            return Err(StateError::new(
                "not in long mode (EFER.LMA clear)",
                st.efer,
            ));
        }
        let tsc_aux = u32::try_from(st.msrs.tsc_aux)
            .map_err(|_| StateError::new("TSC_AUX bits 63:32", st.msrs.tsc_aux))?;
        let segs = [
            &st.es, &st.cs, &st.ss, &st.ds, &st.fs, &st.gs, &st.ldtr, &st.tr,
        ];
        for (seg, &(sel, base, limit, ar)) in segs.iter().zip(&SEGMENT_FIELDS) {
            self.write(sel, u64::from(seg.selector));
            self.write(base, seg.base);
            self.write(limit, u64::from(seg.limit));
            self.write(ar, attrib_to_ar(seg.attrib));
        }
        self.write(GUEST_GDTR_BASE, st.gdtr.base);
        self.write(GUEST_GDTR_LIMIT, u64::from(st.gdtr.limit));
        self.write(GUEST_IDTR_BASE, st.idtr.base);
        self.write(GUEST_IDTR_LIMIT, u64::from(st.idtr.limit));
        self.write(GUEST_CR0, st.cr0);
        self.write(CR0_READ_SHADOW, st.cr0);
        self.write(GUEST_CR4, cr4);
        self.write(CR4_READ_SHADOW, st.cr4);
        self.write(GUEST_CR3, st.cr3);
        self.write(GUEST_EFER, st.efer);
        self.write(GUEST_DR7, st.dr7);
        self.write(GUEST_PAT, st.msrs.pat);
        self.write(GUEST_SYSENTER_CS, st.msrs.sysenter_cs);
        self.write(GUEST_SYSENTER_ESP, st.msrs.sysenter_esp);
        self.write(GUEST_SYSENTER_EIP, st.msrs.sysenter_eip);
        self.syscall_msrs = [
            st.msrs.star,
            st.msrs.lstar,
            st.msrs.cstar,
            st.msrs.sfmask,
            st.msrs.kernel_gs_base,
        ];
        self.tsc_aux = tsc_aux;
        // STI blocking needs RFLAGS.IF = 1 (26.3.1.5); MOV-SS blocking
        // stands for either otherwise.
        let shadow = match (st.interrupt_shadow, st.regs.rflags & (1 << 9) != 0) {
            (false, _) => 0,
            (true, true) => 1,
            (true, false) => 2,
        };
        self.write(GUEST_INTERRUPTIBILITY, shadow);
        let (info, code) = match st.pending_event {
            None => (0, 0),
            Some(ev) => {
                let kind = match ev.kind {
                    EventKind::ExternalInterrupt => INTR_TYPE_EXTERNAL,
                    EventKind::Nmi => INTR_TYPE_NMI,
                    EventKind::Exception => INTR_TYPE_HW_EXCEPTION,
                    EventKind::SoftwareInterrupt => 4 << 8,
                };
                let mut info = u64::from(ev.vector) | kind | INTR_INFO_VALID;
                if ev.error_code.is_some() {
                    info |= INTR_INFO_ERROR_VALID;
                }
                (info, u64::from(ev.error_code.unwrap_or(0)))
            }
        };
        self.write(ENTRY_INTERRUPTION_INFO, info);
        self.write(ENTRY_EXCEPTION_ERROR_CODE, code);
        // A software interrupt is delivered as if INT n (2 bytes) ran.
        self.write(ENTRY_INSTRUCTION_LENGTH, 2);
        // The guest's TSC continues from the saved value.
        self.write(TSC_OFFSET, st.tsc.wrapping_sub(crate::cpu::rdtsc()));
        let mut area = [0u8; FXSAVE_BYTES];
        area.copy_from_slice(&fx);
        self.fx.0 = area;
        self.cr2 = st.cr2;
        self.regs = st.regs;
        self.exit_len = None;
        self.flush_ept = true;
        self.flush_vpid = true;
        crate::cpu::write_dr0_3(st.dr);
        crate::cpu::write_dr6(st.dr6);
        match self.setup_error.take() {
            Some(field) => Err(StateError::new("VMWRITE failed", u64::from(field))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> Regs {
        Regs {
            rax: 0xdead_beef_0000_0001,
            rcx: 0xc000_0080,
            rdx: 0x1234,
            rip: 0x1000,
            ..Regs::default()
        }
    }

    #[test]
    fn exit_decoding() {
        let r = regs();
        assert_eq!(
            decode_exit(u64::from(EXIT_CPUID), 0, 0, 2, 0, &r),
            Decoded::Exit {
                exit: VmExit::Cpuid {
                    leaf: 1,
                    subleaf: 0xc000_0080
                },
                len: Some(2)
            }
        );
        assert_eq!(
            decode_exit(u64::from(EXIT_WRMSR), 0, 0, 2, 0, &r),
            Decoded::Exit {
                exit: VmExit::MsrWrite {
                    msr: 0xc000_0080,
                    value: 0x1234_0000_0001
                },
                len: Some(2)
            }
        );
        // PLATFORM.md: a write to a read-only EPT page, qualification 0x1aa.
        assert_eq!(
            decode_exit(u64::from(EXIT_EPT_VIOLATION), 0x1aa, 0x20_5000, 0, 0, &r),
            Decoded::Exit {
                exit: VmExit::NestedFault {
                    gpa: Gpa(0x20_5000),
                    access: Access {
                        write: true,
                        exec: false,
                        present: true
                    }
                },
                len: None
            }
        );
        // out dx, al to 0x3f8: size 1, OUT, port in 31:16.
        assert_eq!(
            decode_exit(u64::from(EXIT_IO), 0x3f8 << 16, 0, 1, 0, &r),
            Decoded::Exit {
                exit: VmExit::Io(IoAccess {
                    port: 0x3f8,
                    size: 1,
                    dir: IoDir::Out,
                    string: false,
                    rep: false
                }),
                len: Some(1)
            }
        );
        // rep insd from 0x1f0.
        let Decoded::Exit {
            exit: VmExit::Io(io),
            ..
        } = decode_exit(
            u64::from(EXIT_IO),
            (0x1f0 << 16) | (1 << 5) | (1 << 4) | (1 << 3) | 3,
            0,
            2,
            0,
            &r,
        )
        else {
            panic!()
        };
        assert_eq!(
            (io.size, io.dir, io.string, io.rep),
            (4, IoDir::In, true, true)
        );
        assert_eq!(
            decode_exit(u64::from(EXIT_VMCALL), 0, 0, 3, 0, &r),
            Decoded::Exit {
                exit: VmExit::Hypercall,
                len: Some(3)
            }
        );
        assert_eq!(
            decode_exit(u64::from(EXIT_TRIPLE_FAULT), 0, 0, 0, 0, &r),
            Decoded::Exit {
                exit: VmExit::Shutdown,
                len: None
            }
        );
        assert_eq!(
            decode_exit(0x8000_0021, 0, 0, 0, 0, &r),
            Decoded::EntryFailed {
                reason: 33,
                qualification: 0
            }
        );
        assert_eq!(
            decode_exit(24, 0, 0, 3, 0, &r),
            Decoded::InjectUd,
            "VMRESUME"
        );
        assert_eq!(
            decode_exit(u64::from(EXIT_PML_FULL), 0, 0, 0, 0, &r),
            Decoded::PmlFull
        );
        assert_eq!(
            decode_exit(u64::from(EXIT_PREEMPTION_TIMER), 0, 0, 0, 0, &r),
            Decoded::Exit {
                exit: VmExit::ExternalInterrupt,
                len: None
            }
        );
        // NMI exit (interruption type 2) vs an unexpected exception exit.
        assert_eq!(
            decode_exit(0, 0, 0, 0, 0x8000_0202, &r),
            Decoded::Exit {
                exit: VmExit::ExternalInterrupt,
                len: None
            }
        );
        assert_eq!(
            decode_exit(0, 0, 0, 0, 0x8000_030d, &r),
            Decoded::Exit {
                exit: VmExit::Unknown { raw: 0 },
                len: None
            }
        );
    }

    #[test]
    fn cr_access() {
        let mut r = regs();
        r.rbx = CR4_VMXE | 0x20;
        // MOV CR4, RBX (gpr 3) setting VMXE: #GP.
        assert_eq!(
            decode_exit(u64::from(EXIT_CR_ACCESS), 4 | (3 << 8), 0, 3, 0, &r),
            Decoded::InjectGp
        );
        // MOV R9, CR8: reads 0.
        assert_eq!(
            decode_exit(
                u64::from(EXIT_CR_ACCESS),
                8 | (1 << 4) | (9 << 8),
                0,
                4,
                0,
                &r
            ),
            Decoded::ReadCr8 { gpr: 9, len: 4 }
        );
        assert_eq!(
            decode_exit(u64::from(EXIT_CR_ACCESS), 8, 0, 4, 0, &r),
            Decoded::Skip(4)
        );
        let mut x = r;
        *gpr_mut(&mut x, 4) = 7;
        assert_eq!(x.rsp, 7);
    }

    /// Every exit reason, qualification and register value decodes without
    /// a panic (xorshift-driven), and I/O sizes are 1..=8.
    #[test]
    fn exit_decoding_never_panics() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..20_000u64 {
            let reason = if i % 2 == 0 { i / 2 % 70 } else { next() };
            let r = Regs {
                rax: next(),
                rcx: next(),
                rdx: next(),
                rip: next(),
                ..Regs::default()
            };
            let d = decode_exit(reason, next(), next(), next() % 20, next(), &r);
            if let Decoded::Exit {
                exit: VmExit::Io(io),
                len,
            } = d
            {
                assert!((1..=8).contains(&io.size));
                assert!(len.is_none_or(|l| (1..=15).contains(&l)));
            }
        }
    }

    #[test]
    fn error_code_vectors() {
        assert!(has_error_code(13) && has_error_code(14) && has_error_code(8));
        assert!(!has_error_code(6) && !has_error_code(3) && !has_error_code(32));
    }
}
