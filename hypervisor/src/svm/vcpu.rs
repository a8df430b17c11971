//! `SvmVcpu`: one guest vCPU on AMD SVM, with its VMCB, ASID and register
//! file, decoding #VMEXITs into the vendor-neutral [`VmExit`].
//!
//! Invariants:
//! * the VMCB frame and the ASID are owned by this vCPU until
//!   [`SvmVcpu::destroy`];
//! * between runs, [`Regs`] is authoritative for the GPRs, RIP, RSP and
//!   RFLAGS; `run` copies RAX/RSP/RIP/RFLAGS into the VMCB before VMRUN and
//!   back after #VMEXIT;
//! * the VMCB's EFER always has SVME set (VMRUN refuses a guest without it,
//!   AMD APM vol. 2, 15.5.1); the guest never sees it: EFER accesses are
//!   intercepted and [`Vcpu::read_msr`] masks it;
//! * nothing a guest does panics here: unexpected exits decode to
//!   `Unknown`, SVM instructions get #UD.

use super::vmcb::*;
use super::world_switch::world_switch;
use super::{maps, SvmFeatures, EFER_SVME, MSR_EFER};
use core::ptr::NonNull;
use hvcore::addr::{Gpa, Hpa};
use hvcore::host::HostError;
use hvcore::mem::FrameAlloc;
use hvcore::msr::{
    IA32_CSTAR, IA32_FMASK, IA32_FS_BASE, IA32_GS_BASE, IA32_KERNEL_GS_BASE, IA32_LSTAR, IA32_PAT,
    IA32_STAR, IA32_SYSENTER_CS, IA32_SYSENTER_EIP, IA32_SYSENTER_ESP, IA32_TSC, IA32_TSC_AUX,
};
// The MSR value checks are the vendor-neutral policy's (hvcore::msr), so the
// two can never disagree on what the guest may write.
use hvcore::msr::{is_canonical as canonical, is_valid_pat as valid_pat};
use hvcore::vcpu::{
    Access, EntryFailure, IoAccess, IoDir, LongModeEntry, Regs, StateError, UnknownMsr, Vcpu,
    VcpuCaps, VcpuState, VmExit,
};
use hvcore::vcpu_state::{self, EventKind, PendingEvent, TableReg, FXSAVE_BYTES};

/// Power-on PAT value. AMD APM vol. 2, 7.8.2.
const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;

// EFER bits. AMD APM vol. 2, 3.1.7.
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

// CR0/CR4 bits. AMD APM vol. 2, 3.1.1 and 3.7.1.
const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;

// VMCB segment attributes (descriptor bits 47:40 -> 7:0, 55:52 -> 11:8).
/// Present, DPL 0, code/data, execute/read, accessed; L=1 (64-bit), G=1.
const ATTR_CODE64: u16 = 0x0a9b;
/// Present, DPL 0, code/data, read/write, accessed; D/B=1, G=1.
const ATTR_DATA: u16 = 0x0c93;
/// Present, busy 64-bit TSS.
const ATTR_TSS_BUSY: u16 = 0x008b;
/// Present LDT.
const ATTR_LDT: u16 = 0x0082;
/// Real-mode code segment after INIT: present, code, execute/read, accessed.
const ATTR_CODE16: u16 = 0x009b;

/// 512-byte FXSAVE image of the guest's x87/SSE state: VMRUN does not
/// switch it (AMD APM vol. 2, 15.5.1), so the vCPU keeps its own.
#[repr(C, align(16))]
struct FxArea([u8; 512]);

impl FxArea {
    /// The state after INIT: FCW = 0x37f, MXCSR = 0x1f80 (AMD APM vol. 2,
    /// 11.5.2; vol. 5 FXSAVE layout).
    fn initial() -> Self {
        let mut a = [0u8; 512];
        a[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        a[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        Self(a)
    }
}

/// One SVM vCPU.
pub struct SvmVcpu {
    /// The VMCB, in a frame this vCPU owns (identity-mapped).
    vmcb: NonNull<Vmcb>,
    regs: Regs,
    asid: super::Asid,
    features: SvmFeatures,
    /// Next RIP of the last exit's instruction as decoded in software
    /// (`None` when the exit was not an instruction intercept).
    next_rip: Option<u64>,
    /// Flush this guest's nested translations on the next VMRUN.
    flush_pending: bool,
    /// The guest's TSC_AUX (RDTSCP's ECX). Not in the VMCB: loaded into the
    /// physical MSR before VMRUN when the CPU has RDTSCP.
    tsc_aux: u32,
    /// The guest's DR0-DR3: neither VMRUN nor #VMEXIT switches them
    /// (15.5.1), so they are loaded before entry when another guest's are
    /// in the registers, and read back after every exit.
    dr: [u64; 4],
    /// Exits handled inside `run` without returning (#UD for SVM
    /// instructions, INVD), for the partition's exit count.
    resolved_exits: u64,
    fx: FxArea,
}

impl SvmVcpu {
    /// A vCPU in the INIT state using the nested page table at
    /// `nested_root`; [`Vcpu::reset_long_mode`] prepares it for a kernel.
    pub fn new(
        frames: &mut dyn FrameAlloc,
        features: &SvmFeatures,
        nested_root: Hpa,
    ) -> Result<Self, HostError> {
        let asid = super::alloc_asid(features.asids);
        let frame = match frames.alloc_frame() {
            Ok(f) => f,
            Err(_) => {
                super::free_asid(asid);
                return Err(HostError::OutOfMemory {
                    requested_bytes: 4096,
                    free_bytes: 0,
                });
            }
        };
        // The frame allocator hands out identity-mapped, 4 KiB-aligned,
        // zeroed frames.
        let Some(vmcb) = NonNull::new(frame.as_u64() as *mut Vmcb) else {
            super::free_asid(asid);
            return Err(HostError::Backend(
                "frame allocator returned frame 0 for a VMCB",
            ));
        };
        let mut vcpu = Self {
            vmcb,
            regs: Regs::default(),
            asid,
            features: *features,
            next_rip: None,
            flush_pending: true,
            tsc_aux: 0,
            dr: [0; 4],
            resolved_exits: 0,
            fx: FxArea::initial(),
        };
        vcpu.init_vmcb(nested_root);
        Ok(vcpu)
    }

    /// Return the VMCB frame and the ASID.
    pub fn destroy(self, frames: &mut dyn FrameAlloc) {
        super::free_asid(self.asid);
        frames.free_frame(Hpa(self.vmcb.as_ptr() as u64));
    }

    /// Physical address of the VMCB.
    pub fn vmcb_hpa(&self) -> Hpa {
        Hpa(self.vmcb.as_ptr() as u64)
    }

    fn vmcb(&self) -> &Vmcb {
        // SAFETY: `vmcb` points at a frame this vCPU owns exclusively for its
        // whole life; the CPU writes it only inside `run`, which holds
        // `&mut self`, so no reference is live then.
        unsafe { self.vmcb.as_ref() }
    }

    fn vmcb_mut(&mut self) -> &mut Vmcb {
        // SAFETY: as in `vmcb`; `&mut self` makes this the only reference.
        unsafe { self.vmcb.as_mut() }
    }

    /// Control area and an INIT-like save area. AMD APM vol. 2, 15.5 and
    /// table 14-1 (processor state after INIT).
    fn init_vmcb(&mut self, nested_root: Hpa) {
        let asid = self.asid.value();
        let v = self.vmcb_mut();
        let c = &mut v.control;
        // 15.9-15.13: instruction and event intercepts. VMRUN is mandatory;
        // the other SVM instructions, MONITOR/MWAIT, XSETBV and INVD would
        // otherwise reach real hardware state (the guest's EFER.SVME is set).
        c.intercept_misc1 = INTERCEPT_INTR
            | INTERCEPT_NMI
            | INTERCEPT_CPUID
            | INTERCEPT_INVD
            | INTERCEPT_HLT
            | INTERCEPT_INVLPGA
            | INTERCEPT_IOIO_PROT
            | INTERCEPT_MSR_PROT
            | INTERCEPT_SHUTDOWN;
        c.intercept_misc2 = INTERCEPT_VMRUN
            | INTERCEPT_VMMCALL
            | INTERCEPT_VMLOAD
            | INTERCEPT_VMSAVE
            | INTERCEPT_STGI
            | INTERCEPT_CLGI
            | INTERCEPT_SKINIT
            | INTERCEPT_MONITOR
            | INTERCEPT_MWAIT
            | INTERCEPT_MWAIT_ARMED
            | INTERCEPT_XSETBV;
        // #GP and #DF are intercepted so that a guest whose IDT cannot even
        // deliver them is stopped as triple-faulted by us (see
        // `idt_delivers`): Bochs 2.7 ends the whole emulator on a guest
        // shutdown instead of taking the SHUTDOWN intercept. Neither fires
        // in a healthy guest's normal operation.
        c.intercept_exceptions = INTERCEPT_EXC_GP | INTERCEPT_EXC_DF;
        c.iopm_base_pa = maps::iopm_hpa().as_u64();
        c.msrpm_base_pa = maps::msrpm_hpa().as_u64();
        c.guest_asid = asid;
        c.tlb_control = TLB_CONTROL_FLUSH_ALL;
        c.int_control = V_INTR_MASKING;
        // 15.25.3: nested paging on, N_CR3 = root of the nested table.
        c.np_control = NP_ENABLE;
        c.n_cr3 = nested_root.as_u64();
        c.event_inj = 0;
        c.clean_bits = 0;

        let s = &mut v.save;
        let data16 = Segment {
            selector: 0,
            attrib: 0x0093,
            limit: 0xffff,
            base: 0,
        };
        s.es = data16;
        s.ss = data16;
        s.ds = data16;
        s.fs = data16;
        s.gs = data16;
        s.cs = Segment {
            selector: 0xf000,
            attrib: ATTR_CODE16,
            limit: 0xffff,
            base: 0xffff_0000,
        };
        s.gdtr = Segment {
            limit: 0xffff,
            ..Segment::default()
        };
        s.idtr = s.gdtr;
        s.ldtr = Segment {
            selector: 0,
            attrib: ATTR_LDT,
            limit: 0xffff,
            base: 0,
        };
        s.tr = Segment {
            selector: 0,
            attrib: ATTR_TSS_BUSY,
            limit: 0xffff,
            base: 0,
        };
        s.cpl = 0;
        s.efer = EFER_SVME;
        s.cr0 = CR0_ET | (1 << 30) | (1 << 29); // CD | NW | ET
        s.cr3 = 0;
        s.cr4 = 0;
        s.cr2 = 0;
        s.dr6 = 0xffff_0ff0;
        s.dr7 = 0x400;
        s.g_pat = PAT_DEFAULT;
        self.regs = Regs {
            rip: 0xfff0,
            rflags: 2,
            ..Regs::default()
        };
    }

    /// One VMRUN/#VMEXIT round trip with the register file copied in and out.
    fn enter(&mut self) {
        let shared = matches!(self.asid, super::Asid::Shared(_));
        let flush = core::mem::take(&mut self.flush_pending) || shared;
        let tlb = if !flush {
            TLB_CONTROL_NONE
        } else if self.features.flush_by_asid {
            TLB_CONTROL_FLUSH_ASID
        } else {
            TLB_CONTROL_FLUSH_ALL
        };
        let regs = self.regs;
        let v = self.vmcb_mut();
        v.save.rax = regs.rax;
        v.save.rsp = regs.rsp;
        v.save.rip = regs.rip;
        v.save.rflags = regs.rflags;
        v.control.tlb_control = tlb;
        // 15.15: no clean bits claimed, the CPU reloads every field.
        v.control.clean_bits = 0;
        v.control.next_rip = 0;
        let vmcb = self.vmcb_hpa();
        super::load_tsc_aux(self.tsc_aux);
        super::load_debug_regs(self.dr);
        // SAFETY: `enable` ran (a vCPU is only created through it); the VMCB
        // is ours, its nested table maps only this partition's RAM, and the
        // host IDT is live (the platform installs it before any VM exists).
        // FXRSTOR/FXSAVE use our 16-byte aligned 512-byte area; the host does
        // not use x87/SSE state (soft-float target), so nothing of the host's
        // is lost.
        unsafe {
            core::arch::asm!("fxrstor64 [{}]", in(reg) self.fx.0.as_ptr(), options(nostack, readonly));
            world_switch(&mut self.regs, vmcb, super::host_state_vmcb());
            core::arch::asm!("fxsave64 [{}]", in(reg) self.fx.0.as_mut_ptr(), options(nostack));
        }
        self.dr = super::read_debug_regs();
        let v = self.vmcb_mut();
        let (rax, rsp, rip, rflags) = (v.save.rax, v.save.rsp, v.save.rip, v.save.rflags);
        // An event whose delivery the exit interrupted (e.g. a #NPF on the
        // stack while delivering an exception) is delivered again on the next
        // VMRUN (15.7.2); the CPU does not do that by itself.
        v.control.event_inj = reinjection(v.control.exit_int_info);
        self.regs.rax = rax;
        self.regs.rsp = rsp;
        self.regs.rip = rip;
        self.regs.rflags = rflags;
    }

    /// Exits handled inside `run` so far.
    pub fn resolved_exits(&self) -> u64 {
        self.resolved_exits
    }

    /// Set RIP (raw benchmark loop).
    pub fn set_rip(&mut self, rip: u64) {
        self.regs.rip = rip;
    }

    /// Exit code of the last #VMEXIT (raw, for benchmarks and diagnostics).
    pub fn last_exit_code(&self) -> u64 {
        self.vmcb().control.exit_code
    }

    /// Enter the guest once without decoding (raw round-trip benchmark).
    pub fn enter_raw(&mut self) -> u64 {
        self.enter();
        self.vmcb().control.exit_code
    }

    /// Decode the last #VMEXIT. `None` for exits handled here (SVM
    /// instructions the guest may not use, INVD), which re-enter the guest.
    fn decode(&mut self) -> Option<VmExit> {
        let c = &self.vmcb().control;
        let (code, info1, info2) = (c.exit_code, c.exit_info1, c.exit_info2);
        self.next_rip = None;
        match decode_exit(code, info1, info2, &self.regs) {
            Decoded::Exit { exit, next_rip } => {
                self.next_rip = next_rip;
                Some(exit)
            }
            Decoded::Invalid => Some(VmExit::EntryFailed {
                reason: EntryFailure {
                    what: diagnose_invalid(self.vmcb()),
                    raw: code,
                    field: None,
                },
            }),
            Decoded::InjectUd => {
                self.inject_exception(6, None);
                None
            }
            Decoded::Skip(len) => {
                self.regs.rip = self.regs.rip.wrapping_add(len);
                None
            }
            Decoded::Exception { vector, error_code } => {
                let s = &self.vmcb().save;
                let (limit, long_mode) = (s.idtr.limit, s.efer & EFER_LMA != 0);
                // AMD APM vol. 2, 8.2.9: a #GP whose delivery fails becomes
                // #DF; a #DF whose delivery fails is a shutdown. Only the
                // IDT-limit failure is decided here; any other delivery
                // failure still reaches the CPU's own SHUTDOWN intercept.
                if idt_delivers(limit, long_mode, vector) {
                    self.inject_exception(vector, Some(error_code));
                    None
                } else if vector != 8 && idt_delivers(limit, long_mode, 8) {
                    self.inject_exception(8, Some(0));
                    None
                } else {
                    Some(VmExit::Shutdown)
                }
            }
        }
    }
}

/// Whether an IDT of `limit` bytes holds the gate for `vector` (16-byte
/// gates in long mode, 8-byte gates otherwise; Intel SDM vol. 3A, 6.10 and
/// 6.14.1, AMD APM vol. 2, 8.2).
fn idt_delivers(limit: u32, long_mode: bool, vector: u8) -> bool {
    let gate = if long_mode { 16 } else { 8 };
    u64::from(limit) >= u64::from(vector) * gate + gate - 1
}

/// What one #VMEXIT means, decoded from the exit code, EXITINFO1/2 and the
/// guest registers alone (no VMCB access, so the host tests can feed it
/// arbitrary values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decoded {
    /// Report `exit`; `next_rip` is the software-decoded RIP after the
    /// intercepted instruction, if it was one.
    Exit { exit: VmExit, next_rip: Option<u64> },
    /// VMRUN refused the guest state (VMEXIT_INVALID).
    Invalid,
    /// Raise #UD in the guest and re-enter.
    InjectUd,
    /// Step over an instruction of this many bytes and re-enter.
    Skip(u64),
    /// An intercepted contributory exception (#GP) or #DF on its way into
    /// the guest, with its error code.
    Exception { vector: u8, error_code: u32 },
}

/// Decode one #VMEXIT (AMD APM vol. 2, Appendix C exit codes; 15.7-15.13
/// and 15.25.6 for EXITINFO). Never panics, whatever the values.
fn decode_exit(code: u64, info1: u64, info2: u64, regs: &Regs) -> Decoded {
    let rip = regs.rip;
    // Instruction lengths without NRIPS (AMD APM vol. 3 opcode maps):
    // CPUID 0f a2, RDMSR 0f 32, WRMSR 0f 30, HLT f4, VMMCALL 0f 01 d9.
    // Prefixed forms are not decoded (none of our guests emits them).
    let insn = |exit, len: u64| Decoded::Exit {
        exit,
        next_rip: Some(rip.wrapping_add(len)),
    };
    let event = |exit| Decoded::Exit {
        exit,
        next_rip: None,
    };
    match code {
        // Both stay pending until STGI, then the host's IDT takes them.
        EXIT_INTR | EXIT_NMI => event(VmExit::ExternalInterrupt),
        EXIT_CPUID => insn(
            VmExit::Cpuid {
                leaf: regs.rax as u32,
                subleaf: regs.rcx as u32,
            },
            2,
        ),
        EXIT_HLT => insn(VmExit::Hlt, 1),
        EXIT_VMMCALL => insn(VmExit::Hypercall, 3),
        EXIT_IOIO => match decode_ioio(info1) {
            // 15.10.2: EXITINFO2 holds the next RIP.
            Some(io) => Decoded::Exit {
                exit: VmExit::Io(io),
                next_rip: Some(info2),
            },
            None => event(VmExit::Unknown { raw: code }),
        },
        EXIT_MSR => {
            let msr = regs.rcx as u32;
            // 15.11: EXITINFO1 = 0 for RDMSR, 1 for WRMSR.
            let exit = if info1 & 1 == 0 {
                VmExit::MsrRead { msr }
            } else {
                VmExit::MsrWrite {
                    msr,
                    value: (regs.rdx << 32) | (regs.rax & 0xffff_ffff),
                }
            };
            insn(exit, 2)
        }
        // 15.25.6: EXITINFO1 is a #PF-style error code (bit 0 P, bit 1 W,
        // bit 4 instruction fetch), EXITINFO2 the GPA.
        EXIT_NPF => event(VmExit::NestedFault {
            gpa: Gpa(info2),
            access: Access {
                present: info1 & 1 != 0,
                write: info1 & (1 << 1) != 0,
                exec: info1 & (1 << 4) != 0,
            },
        }),
        EXIT_SHUTDOWN => event(VmExit::Shutdown),
        EXIT_INVALID => Decoded::Invalid,
        // 15.12: EXITINFO1 holds the exception's error code.
        EXIT_EXCP_GP => Decoded::Exception {
            vector: 13,
            error_code: info1 as u32,
        },
        EXIT_EXCP_DF => Decoded::Exception {
            vector: 8,
            error_code: 0,
        },
        // The guest's CPUID shows no SVM and no MONITOR, so these raise #UD
        // for it. XSETBV too: VMRUN does not switch XCR0, so a guest may
        // not change it (the CPUID policy must keep XSAVE hidden).
        EXIT_VMRUN | EXIT_VMLOAD | EXIT_VMSAVE | EXIT_STGI | EXIT_CLGI | EXIT_SKINIT
        | EXIT_INVLPGA | EXIT_MONITOR | EXIT_MWAIT | EXIT_MWAIT_ARMED | EXIT_XSETBV => {
            Decoded::InjectUd
        }
        // INVD (0f 08): nothing to do for a guest without its own cache.
        EXIT_INVD => Decoded::Skip(2),
        _ => event(VmExit::Unknown { raw: code }),
    }
}

/// What to put in EVENTINJ after an exit whose EXITINTINFO is `info`
/// (AMD APM vol. 2, 15.7.2): the interrupted event again, except events
/// raised by an instruction (INTn, INT3, INTO), which are dropped: RIP
/// still points at the instruction, so the guest raises them again by
/// re-executing it (re-injecting them would need the instruction length,
/// which TCG's missing NRIPS does not give).
fn reinjection(info: u64) -> u64 {
    if info & EVENT_VALID == 0 {
        return 0;
    }
    let vector = info & 0xff;
    let kind = info & (7 << 8);
    let software =
        kind == EVENT_TYPE_SOFT_INT || (kind == EVENT_TYPE_EXCEPTION && matches!(vector, 3 | 4));
    if software {
        0
    } else {
        // Reserved bits 30:12 must be zero in EVENTINJ.
        info & !0x7fff_f000
    }
}

/// Decode EXITINFO1 of an IOIO exit (AMD APM vol. 2, 15.10.2, figure
/// 15-2): bit 0 IN, bit 2 string, bit 3 REP, bits 4-6 size, 31:16 port.
fn decode_ioio(info1: u64) -> Option<IoAccess> {
    let size = if info1 & (1 << 4) != 0 {
        1
    } else if info1 & (1 << 5) != 0 {
        2
    } else if info1 & (1 << 6) != 0 {
        4
    } else {
        return None;
    };
    Some(IoAccess {
        port: (info1 >> 16) as u16,
        size,
        dir: if info1 & 1 != 0 {
            IoDir::In
        } else {
            IoDir::Out
        },
        string: info1 & (1 << 2) != 0,
        rep: info1 & (1 << 3) != 0,
    })
}

/// Name the first VMRUN consistency check (AMD APM vol. 2, 15.5.1) the VMCB
/// fails, for a readable `EntryFailed`.
fn diagnose_invalid(v: &Vmcb) -> &'static str {
    let s = &v.save;
    let c = &v.control;
    if s.efer & EFER_SVME == 0 {
        "VMRUN: guest EFER.SVME is clear"
    } else if s.cr0 & (1 << 29) != 0 && s.cr0 & (1 << 30) == 0 {
        "VMRUN: guest CR0.NW set with CR0.CD clear"
    } else if s.cr0 >> 32 != 0 {
        "VMRUN: guest CR0[63:32] not zero"
    } else if s.dr6 >> 32 != 0 || s.dr7 >> 32 != 0 {
        "VMRUN: guest DR6/DR7[63:32] not zero"
    } else if s.efer & EFER_LME != 0 && s.cr0 & CR0_PG != 0 && s.cr4 & CR4_PAE == 0 {
        "VMRUN: long mode with CR4.PAE clear"
    } else if s.efer & EFER_LME != 0 && s.cr0 & CR0_PG != 0 && s.cr0 & CR0_PE == 0 {
        "VMRUN: long mode with CR0.PE clear"
    } else if s.efer & EFER_LME != 0
        && s.cr0 & CR0_PG != 0
        && s.cs.attrib & (1 << 9) != 0
        && s.cs.attrib & (1 << 10) != 0
    {
        "VMRUN: guest CS has both L and D set"
    } else if c.intercept_misc2 & INTERCEPT_VMRUN == 0 {
        "VMRUN: VMRUN intercept clear"
    } else if c.guest_asid == 0 {
        "VMRUN: guest ASID is 0"
    } else if c.event_inj & EVENT_VALID != 0 && (c.event_inj >> 8) & 7 == 1 {
        "VMRUN: illegal event injection type"
    } else {
        "VMRUN: invalid guest state (VMEXIT_INVALID)"
    }
}

/// The record's segment for a VMCB segment (the record uses the VMCB's
/// packed attribute form).
fn seg_out(s: &Segment) -> vcpu_state::Segment {
    vcpu_state::Segment {
        selector: s.selector,
        attrib: s.attrib,
        limit: s.limit,
        base: s.base,
    }
}

fn seg_in(s: &vcpu_state::Segment) -> Segment {
    Segment {
        selector: s.selector,
        attrib: s.attrib,
        limit: s.limit,
        base: s.base,
    }
}

/// EVENTINJ (AMD APM vol. 2, 15.20) as a pending event, `None` if not
/// valid. Types the record cannot name (reserved 1, 5-7) read as none.
fn event_out(ev: u64) -> Option<PendingEvent> {
    if ev & EVENT_VALID == 0 {
        return None;
    }
    let kind = match (ev >> 8) & 7 {
        0 => EventKind::ExternalInterrupt,
        2 => EventKind::Nmi,
        3 => EventKind::Exception,
        4 => EventKind::SoftwareInterrupt,
        _ => return None,
    };
    Some(PendingEvent {
        vector: ev as u8,
        kind,
        error_code: (ev & EVENT_ERROR_VALID != 0).then_some((ev >> 32) as u32),
    })
}

/// A pending event as EVENTINJ.
fn event_in(ev: &PendingEvent) -> u64 {
    let kind: u64 = match ev.kind {
        EventKind::ExternalInterrupt => 0,
        EventKind::Nmi => 2,
        EventKind::Exception => 3,
        EventKind::SoftwareInterrupt => 4,
    };
    let mut v = u64::from(ev.vector) | (kind << 8) | EVENT_VALID;
    if let Some(code) = ev.error_code {
        v |= EVENT_ERROR_VALID | (u64::from(code) << 32);
    }
    v
}

impl Vcpu for SvmVcpu {
    fn run(&mut self) -> VmExit {
        loop {
            self.enter();
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
        let Some(decoded) = self.next_rip.take() else {
            log::warn!("svm: skip_instruction after an exit without an instruction length");
            return;
        };
        // 15.7.1: with NRIPS the CPU stores the next RIP on instruction
        // intercepts; TCG has none (nRIP reads 0), so fall back to ours.
        let hw = self.vmcb().control.next_rip;
        self.regs.rip = if self.features.nrips && hw != 0 {
            hw
        } else {
            decoded
        };
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        // 15.20: EVENTINJ = vector | type << 8 | EV << 11 | V << 31 |
        // error code << 32.
        let kind = match vector {
            2 => EVENT_TYPE_NMI,
            0..=31 => EVENT_TYPE_EXCEPTION,
            _ => EVENT_TYPE_INTR,
        };
        let mut ev = u64::from(vector) | kind | EVENT_VALID;
        if let Some(code) = error_code {
            ev |= EVENT_ERROR_VALID | (u64::from(code) << 32);
        }
        let v = self.vmcb_mut();
        if v.control.event_inj & EVENT_VALID != 0 {
            log::debug!(
                "svm: injecting vector {vector} replaces pending event {:#x}",
                v.control.event_inj
            );
        }
        v.control.event_inj = ev;
    }

    fn read_msr(&self, msr: u32) -> Result<u64, UnknownMsr> {
        let s = &self.vmcb().save;
        Ok(match msr {
            MSR_EFER => s.efer & !EFER_SVME,
            IA32_STAR => s.star,
            IA32_LSTAR => s.lstar,
            IA32_CSTAR => s.cstar,
            IA32_FMASK => s.sfmask,
            IA32_KERNEL_GS_BASE => s.kernel_gs_base,
            IA32_SYSENTER_CS => s.sysenter_cs,
            IA32_SYSENTER_ESP => s.sysenter_esp,
            IA32_SYSENTER_EIP => s.sysenter_eip,
            IA32_FS_BASE => s.fs.base,
            IA32_GS_BASE => s.gs.base,
            IA32_PAT => s.g_pat,
            // 15.12.4: the guest's RDTSC reads the host TSC plus TSC_OFFSET.
            IA32_TSC => crate::cpu::rdtsc().wrapping_add(self.vmcb().control.tsc_offset),
            IA32_TSC_AUX => u64::from(self.tsc_aux),
            _ => return Err(UnknownMsr(msr)),
        })
    }

    fn write_msr(&mut self, msr: u32, value: u64) -> Result<(), UnknownMsr> {
        let bad = Err(UnknownMsr(msr));
        match msr {
            IA32_TSC => {
                let offset = value.wrapping_sub(crate::cpu::rdtsc());
                self.vmcb_mut().control.tsc_offset = offset;
                return Ok(());
            }
            IA32_TSC_AUX => {
                self.tsc_aux = u32::try_from(value).map_err(|_| UnknownMsr(msr))?;
                return Ok(());
            }
            _ => {}
        }
        let s = &mut self.vmcb_mut().save;
        match msr {
            MSR_EFER => {
                // AMD APM vol. 2, 3.1.7: reserved bits (SVME included, the
                // guest has no SVM) #GP; LMA is read-only; LME may not
                // change while paging is on.
                if value & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0 {
                    return bad;
                }
                if s.cr0 & CR0_PG != 0 && (value ^ s.efer) & EFER_LME != 0 {
                    return bad;
                }
                s.efer =
                    (value & (EFER_SCE | EFER_LME | EFER_NXE)) | (s.efer & EFER_LMA) | EFER_SVME;
            }
            IA32_PAT if valid_pat(value) => s.g_pat = value,
            IA32_STAR => s.star = value,
            IA32_FMASK if value >> 32 == 0 => s.sfmask = value,
            IA32_SYSENTER_CS => s.sysenter_cs = value & 0xffff,
            IA32_LSTAR if canonical(value) => s.lstar = value,
            IA32_CSTAR if canonical(value) => s.cstar = value,
            IA32_KERNEL_GS_BASE if canonical(value) => s.kernel_gs_base = value,
            IA32_SYSENTER_ESP if canonical(value) => s.sysenter_esp = value,
            IA32_SYSENTER_EIP if canonical(value) => s.sysenter_eip = value,
            IA32_FS_BASE if canonical(value) => s.fs.base = value,
            IA32_GS_BASE if canonical(value) => s.gs.base = value,
            _ => return bad,
        }
        Ok(())
    }

    fn reset_long_mode(&mut self, entry: &LongModeEntry) {
        let v = self.vmcb_mut();
        let s = &mut v.save;
        let data = Segment {
            selector: 0x10,
            attrib: ATTR_DATA,
            limit: 0xffff_ffff,
            base: 0,
        };
        s.cs = Segment {
            selector: 0x08,
            attrib: ATTR_CODE64,
            limit: 0xffff_ffff,
            base: 0,
        };
        s.ds = data;
        s.es = data;
        s.ss = data;
        s.fs = data;
        s.gs = data;
        s.gdtr = Segment {
            selector: 0,
            attrib: 0,
            limit: u32::from(entry.gdt_limit),
            base: entry.gdt_base.as_u64(),
        };
        s.idtr = Segment::default();
        s.ldtr = Segment {
            selector: 0,
            attrib: ATTR_LDT,
            limit: 0,
            base: 0,
        };
        s.tr = Segment {
            selector: 0,
            attrib: ATTR_TSS_BUSY,
            limit: 0x67,
            base: 0,
        };
        s.cpl = 0;
        s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
        s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
        s.cr3 = entry.cr3.as_u64();
        s.cr2 = 0;
        s.efer = EFER_LME | EFER_LMA | EFER_NXE | EFER_SVME;
        s.dr6 = 0xffff_0ff0;
        s.dr7 = 0x400;
        s.g_pat = PAT_DEFAULT;
        s.star = 0;
        s.lstar = 0;
        s.cstar = 0;
        s.sfmask = 0;
        s.kernel_gs_base = 0;
        s.sysenter_cs = 0;
        s.sysenter_esp = 0;
        s.sysenter_eip = 0;
        v.control.event_inj = 0;
        v.control.interrupt_shadow = 0;
        self.regs = Regs {
            rip: entry.rip,
            rsp: entry.rsp,
            rdi: entry.rdi,
            rflags: 2,
            ..Regs::default()
        };
        self.fx = FxArea::initial();
        self.tsc_aux = 0;
        self.dr = [0; 4];
        self.next_rip = None;
        self.flush_pending = true;
    }

    fn flush_nested_tlb(&mut self) {
        self.flush_pending = true;
    }

    fn nested_root(&self) -> Hpa {
        Hpa(self.vmcb().control.n_cr3)
    }

    fn caps(&self) -> VcpuCaps {
        super::caps(&self.features)
    }

    /// The VMCB save area plus what lives outside it: the GPRs, the FXSAVE
    /// image (VMRUN does not switch x87/SSE state, the vCPU does), TSC_AUX,
    /// DR0-DR3 (never switched: the physical registers) and the pending
    /// event (EVENTINJ, where `enter` re-queues an interrupted delivery
    /// from EXITINTINFO). AMD APM vol. 2, 15.5 and Appendix B.
    fn save_state(&self) -> VcpuState {
        let v = self.vmcb();
        let (c, s) = (&v.control, &v.save);
        VcpuState {
            id: 0,
            regs: self.regs,
            es: seg_out(&s.es),
            cs: seg_out(&s.cs),
            ss: seg_out(&s.ss),
            ds: seg_out(&s.ds),
            fs: seg_out(&s.fs),
            gs: seg_out(&s.gs),
            ldtr: seg_out(&s.ldtr),
            tr: seg_out(&s.tr),
            gdtr: TableReg {
                base: s.gdtr.base,
                limit: s.gdtr.limit as u16,
            },
            idtr: TableReg {
                base: s.idtr.base,
                limit: s.idtr.limit as u16,
            },
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            // 15.21.2: with V_INTR_MASKING the guest's CR8 is V_TPR.
            cr8: c.int_control & 0xf,
            efer: s.efer & !EFER_SVME,
            dr: self.dr,
            dr6: s.dr6,
            dr7: s.dr7,
            msrs: vcpu_state::Msrs {
                pat: s.g_pat,
                star: s.star,
                lstar: s.lstar,
                cstar: s.cstar,
                sfmask: s.sfmask,
                kernel_gs_base: s.kernel_gs_base,
                tsc_aux: u64::from(self.tsc_aux),
                sysenter_cs: s.sysenter_cs,
                sysenter_esp: s.sysenter_esp,
                sysenter_eip: s.sysenter_eip,
            },
            fpu: vcpu_state::fpu_from_fxsave(&self.fx.0),
            pending_event: event_out(c.event_inj),
            interrupt_shadow: c.interrupt_shadow & 1 != 0,
            // 15.30.4 (TSC offset): the guest reads host TSC + TSC_OFFSET.
            tsc: crate::cpu::rdtsc().wrapping_add(c.tsc_offset),
        }
    }

    fn restore_state(&mut self, st: &VcpuState) -> Result<(), StateError> {
        vcpu_state::check(st)?;
        // What this CPU can run (VMRUN refuses the rest, 15.5.1): CR4 bits
        // of features it lacks, CR3 bits 63:52.
        let cr4_missing = st.cr4 & !super::host_cr4_bits();
        if cr4_missing != 0 {
            return Err(StateError::new("CR4 bits this CPU lacks", cr4_missing));
        }
        if st.cr3 >> 52 != 0 {
            return Err(StateError::new("CR3 bits 63:52", st.cr3));
        }
        let fx = vcpu_state::fxsave_image(&st.fpu)?;
        let tsc_aux = u32::try_from(st.msrs.tsc_aux)
            .map_err(|_| StateError::new("TSC_AUX bits 63:32", st.msrs.tsc_aux))?;
        let v = self.vmcb_mut();
        let (c, s) = (&mut v.control, &mut v.save);
        s.es = seg_in(&st.es);
        s.cs = seg_in(&st.cs);
        s.ss = seg_in(&st.ss);
        s.ds = seg_in(&st.ds);
        s.fs = seg_in(&st.fs);
        s.gs = seg_in(&st.gs);
        s.ldtr = seg_in(&st.ldtr);
        s.tr = seg_in(&st.tr);
        s.gdtr = Segment {
            base: st.gdtr.base,
            limit: u32::from(st.gdtr.limit),
            ..Segment::default()
        };
        s.idtr = Segment {
            base: st.idtr.base,
            limit: u32::from(st.idtr.limit),
            ..Segment::default()
        };
        // 15.5.1: the CPL is SS.DPL (the VMCB keeps it separately).
        s.cpl = ((st.ss.attrib >> 5) & 3) as u8;
        s.cr0 = st.cr0;
        s.cr2 = st.cr2;
        s.cr3 = st.cr3;
        s.cr4 = st.cr4;
        s.efer = st.efer | EFER_SVME;
        s.dr6 = st.dr6;
        s.dr7 = st.dr7;
        s.g_pat = st.msrs.pat;
        s.star = st.msrs.star;
        s.lstar = st.msrs.lstar;
        s.cstar = st.msrs.cstar;
        s.sfmask = st.msrs.sfmask;
        s.kernel_gs_base = st.msrs.kernel_gs_base;
        s.sysenter_cs = st.msrs.sysenter_cs;
        s.sysenter_esp = st.msrs.sysenter_esp;
        s.sysenter_eip = st.msrs.sysenter_eip;
        c.int_control = (c.int_control & !0xf) | (st.cr8 & 0xf);
        c.interrupt_shadow = u64::from(st.interrupt_shadow);
        c.event_inj = st.pending_event.as_ref().map_or(0, event_in);
        // The guest's TSC continues from the saved value.
        c.tsc_offset = st.tsc.wrapping_sub(crate::cpu::rdtsc());
        let mut area = [0u8; FXSAVE_BYTES];
        area.copy_from_slice(&fx);
        self.fx.0 = area;
        self.tsc_aux = tsc_aux;
        self.regs = st.regs;
        self.next_rip = None;
        self.flush_pending = true;
        // Loaded into the registers by the next entry.
        self.dr = st.dr;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intercepted_gp_and_df_decode_with_error_code() {
        let regs = Regs::default();
        assert_eq!(
            decode_exit(EXIT_EXCP_GP, 0x18, 0, &regs),
            Decoded::Exception {
                vector: 13,
                error_code: 0x18
            }
        );
        assert_eq!(
            decode_exit(EXIT_EXCP_DF, 0, 0, &regs),
            Decoded::Exception {
                vector: 8,
                error_code: 0
            }
        );
    }

    #[test]
    fn idt_limit_decides_delivery() {
        // Long mode: 16-byte gates; vector 8 needs bytes 128..=143.
        assert!(!idt_delivers(0, true, 8));
        assert!(!idt_delivers(142, true, 8));
        assert!(idt_delivers(143, true, 8));
        assert!(!idt_delivers(143, true, 13));
        assert!(idt_delivers(13 * 16 + 15, true, 13));
        // Legacy mode: 8-byte gates.
        assert!(idt_delivers(71, false, 8));
        assert!(!idt_delivers(70, false, 8));
        assert!(idt_delivers(0xfff, true, 255));
    }

    #[test]
    fn ioio_decoding() {
        // out 0xe9, al: port 0xe9, SZ8, OUT.
        let io = decode_ioio((0xe9 << 16) | (1 << 4)).unwrap();
        assert_eq!(io.port, 0xe9);
        assert_eq!(io.size, 1);
        assert_eq!(io.dir, IoDir::Out);
        assert!(!io.string && !io.rep);
        // rep insw from 0x1f0.
        let io = decode_ioio((0x1f0 << 16) | (1 << 5) | (1 << 3) | (1 << 2) | 1).unwrap();
        assert_eq!(
            (io.port, io.size, io.dir, io.string, io.rep),
            (0x1f0, 2, IoDir::In, true, true)
        );
        assert_eq!(decode_ioio(0x3f8 << 16), None);
    }

    #[test]
    fn exit_decoding() {
        let regs = Regs {
            rax: 0xdead_beef_0000_0001,
            rcx: 0xc000_0080,
            rdx: 0x1234,
            rip: 0x1000,
            ..Regs::default()
        };
        assert_eq!(
            decode_exit(EXIT_CPUID, 0, 0, &regs),
            Decoded::Exit {
                exit: VmExit::Cpuid {
                    leaf: 1,
                    subleaf: 0xc000_0080
                },
                next_rip: Some(0x1002)
            }
        );
        assert_eq!(
            decode_exit(EXIT_MSR, 1, 0, &regs),
            Decoded::Exit {
                exit: VmExit::MsrWrite {
                    msr: 0xc000_0080,
                    value: 0x1234_0000_0001
                },
                next_rip: Some(0x1002)
            }
        );
        assert_eq!(
            decode_exit(EXIT_NPF, 0x1_0000_0007, 0x20_5000, &regs),
            Decoded::Exit {
                exit: VmExit::NestedFault {
                    gpa: Gpa(0x20_5000),
                    access: Access {
                        present: true,
                        write: true,
                        exec: false
                    }
                },
                next_rip: None
            }
        );
        assert_eq!(
            decode_exit(EXIT_IOIO, (0x3f8 << 16) | (1 << 4), 0x1002, &regs),
            Decoded::Exit {
                exit: VmExit::Io(IoAccess {
                    port: 0x3f8,
                    size: 1,
                    dir: IoDir::Out,
                    string: false,
                    rep: false
                }),
                next_rip: Some(0x1002)
            }
        );
        assert_eq!(decode_exit(EXIT_VMRUN, 0, 0, &regs), Decoded::InjectUd);
        assert_eq!(decode_exit(EXIT_INVALID, 0, 0, &regs), Decoded::Invalid);
        assert_eq!(
            decode_exit(0x4e, 0, 0, &regs),
            Decoded::Exit {
                exit: VmExit::Unknown { raw: 0x4e },
                next_rip: None
            }
        );
    }

    /// Every exit code, EXITINFO and register value decodes without a
    /// panic (xorshift-driven, plus the edges).
    #[test]
    fn exit_decoding_never_panics() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let codes = [
            EXIT_INTR,
            EXIT_NMI,
            EXIT_CPUID,
            EXIT_HLT,
            EXIT_VMMCALL,
            EXIT_IOIO,
            EXIT_MSR,
            EXIT_NPF,
            EXIT_SHUTDOWN,
            EXIT_INVALID,
            EXIT_INVD,
            EXIT_XSETBV,
            0,
            u64::MAX - 1,
        ];
        for i in 0..20_000 {
            let code = if i % 2 == 0 {
                codes[i / 2 % codes.len()]
            } else {
                next()
            };
            let regs = Regs {
                rax: next(),
                rcx: next(),
                rdx: next(),
                rip: if i % 3 == 0 { u64::MAX } else { next() },
                ..Regs::default()
            };
            let d = decode_exit(code, next(), next(), &regs);
            if let Decoded::Exit {
                exit: VmExit::Io(io),
                ..
            } = d
            {
                assert!(matches!(io.size, 1 | 2 | 4));
            }
        }
    }

    #[test]
    fn event_reinjection() {
        assert_eq!(reinjection(0), 0);
        // #GP(0) whose delivery faulted: delivered again.
        let gp = 13 | EVENT_TYPE_EXCEPTION | EVENT_ERROR_VALID | EVENT_VALID;
        assert_eq!(reinjection(gp), gp);
        // External interrupt vector 0x30 and NMI: delivered again.
        assert_eq!(reinjection(0x30 | EVENT_VALID), 0x30 | EVENT_VALID);
        let nmi = 2 | EVENT_TYPE_NMI | EVENT_VALID;
        assert_eq!(reinjection(nmi), nmi);
        // INT 0x80, INT3, INTO: re-executed instead.
        assert_eq!(reinjection(0x80 | EVENT_TYPE_SOFT_INT | EVENT_VALID), 0);
        assert_eq!(reinjection(3 | EVENT_TYPE_EXCEPTION | EVENT_VALID), 0);
        assert_eq!(reinjection(4 | EVENT_TYPE_EXCEPTION | EVENT_VALID), 0);
    }

    #[test]
    fn msr_value_checks() {
        assert!(canonical(0xffff_8000_0000_0000));
        assert!(canonical(0x7fff_ffff_ffff));
        assert!(!canonical(0x8000_0000_0000));
        assert!(valid_pat(PAT_DEFAULT));
        assert!(!valid_pat(0x0000_0000_0000_0002));
    }
}
