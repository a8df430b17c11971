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
use super::{maps, SvmFeatures, EFER_SVME};
use crate::fpu::FxArea;
use core::ptr::NonNull;
use hvcore::addr::{Gfn, Hpa};
use hvcore::host::HostError;
use hvcore::mem::{FrameAlloc, PhysMem};
use hvcore::msr::{
    IA32_CSTAR, IA32_EFER, IA32_FMASK, IA32_FS_BASE, IA32_GS_BASE, IA32_KERNEL_GS_BASE, IA32_LSTAR,
    IA32_PAT, IA32_STAR, IA32_SYSENTER_CS, IA32_SYSENTER_EIP, IA32_SYSENTER_ESP, IA32_TSC,
    IA32_TSC_AUX,
};
use hvcore::npt::NestedPageTable;
use hvcore::partition::PartitionVcpu;
use hvcore::svm::entry;
use hvcore::svm::exit::{
    decode_exit, deliver_exception, injection, reinjection, Decoded, Delivery, EVENT_TYPE_INTR,
    EVENT_TYPE_NMI, EVENT_VALID,
};
use hvcore::vcpu::{
    EntryFailure, EventReadiness, GuestMode, LongModeEntry, Regs, StateError, UnknownMsr, Vcpu,
    VcpuCaps, VcpuState, VmExit,
};
use hvcore::vcpu_state::{LONG_MODE_CR0, LONG_MODE_CR4, LONG_MODE_EFER};
use hvcore::x86::{
    efer_after_write, Cr0Flags, Cr4Flags, EferFlags, ATTR_CODE64, ATTR_DATA, ATTR_LDT,
    ATTR_TSS_BUSY, PAT_DEFAULT,
};

/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;
/// The vector of an NMI (AMD APM vol. 2, 8.2).
const NMI_VECTOR: u64 = 2;

/// Real-mode code segment after INIT: present, code, execute/read, accessed.
const ATTR_CODE16: u16 = 0x009b;

/// One SVM vCPU.
pub struct SvmVcpu {
    /// The VMCB, in a frame this vCPU owns (identity-mapped).
    pub(super) vmcb: NonNull<Vmcb>,
    pub(super) regs: Regs,
    pub(super) asid: super::Asid,
    pub(super) features: SvmFeatures,
    /// Next RIP of the last exit's instruction as decoded in software
    /// (`None` when the exit was not an instruction intercept).
    pub(super) next_rip: Option<u64>,
    /// Flush this guest's nested translations on the next VMRUN.
    pub(super) flush_pending: bool,
    /// The guest's TSC_AUX (RDTSCP's ECX). Not in the VMCB: loaded into the
    /// physical MSR before VMRUN when the CPU has RDTSCP.
    pub(super) tsc_aux: u32,
    /// The guest's DR0-DR3: neither VMRUN nor #VMEXIT switches them
    /// (15.5.1), so they are loaded before entry when another guest's are
    /// in the registers, and read back after every exit.
    pub(super) dr: [u64; 4],
    /// Exits handled inside `run` without returning (#UD for SVM
    /// instructions, INVD), for the partition's exit count.
    pub(super) resolved_exits: u64,
    pub(super) fx: FxArea,
    /// The guest runs the handler of an NMI we injected: SVM keeps NMI
    /// blocking hidden, so it is tracked here, from the injection to the
    /// guest's next IRET (intercepted while this is set).
    pub(super) nmi_blocked: bool,
    /// The caller asked for an NMI window ([`VmExit::NmiWindow`] at the
    /// guest's IRET).
    pub(super) nmi_window: bool,
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
            nmi_blocked: false,
            nmi_window: false,
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

    pub(super) fn vmcb(&self) -> &Vmcb {
        // SAFETY: `vmcb` points at a frame this vCPU owns exclusively for its
        // whole life; the CPU writes it only inside `run`, which holds
        // `&mut self`, so no reference is live then.
        unsafe { self.vmcb.as_ref() }
    }

    pub(super) fn vmcb_mut(&mut self) -> &mut Vmcb {
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
        s.cr0 = (Cr0Flags::EXTENSION_TYPE | Cr0Flags::CACHE_DISABLE | Cr0Flags::NOT_WRITE_THROUGH)
            .bits();
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
        let pending = core::mem::take(&mut self.flush_pending);
        let tlb = entry::tlb_control(pending, shared, self.features.flush_by_asid);
        let regs = self.regs;
        let v = self.vmcb_mut();
        v.save.rax = regs.rax;
        v.save.rsp = regs.rsp;
        v.save.rip = regs.rip;
        v.save.rflags = regs.rflags;
        v.control.tlb_control = tlb;
        // 15.15: no clean bits claimed, the CPU reloads every field.
        v.control.clean_bits = entry::CLEAN_BITS;
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
            self.fx.load();
            world_switch(&mut self.regs, vmcb, super::host_state_vmcb());
            self.fx.store();
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
            Decoded::Exit {
                exit: VmExit::InterruptWindow,
                ..
            } => {
                // 15.21.4: drop the virtual interrupt that opened the
                // window before the guest takes it; the caller injects
                // the real one.
                let c = &mut self.vmcb_mut().control;
                c.int_control &= !(V_IRQ | V_INTR_PRIO_MAX | V_IGN_TPR);
                c.intercept_misc1 &= !INTERCEPT_VINTR;
                Some(VmExit::InterruptWindow)
            }
            Decoded::Exit {
                exit: VmExit::NmiWindow,
                ..
            } => {
                // The guest's IRET ends its NMI handler (the IRET itself
                // runs on re-entry: the intercept is checked before it).
                self.nmi_blocked = false;
                self.vmcb_mut().control.intercept_misc1 &= !INTERCEPT_IRET;
                if core::mem::take(&mut self.nmi_window) {
                    Some(VmExit::NmiWindow)
                } else {
                    None
                }
            }
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
                let software = self.regs.rip.wrapping_add(len);
                let hw = self.vmcb().control.next_rip;
                self.regs.rip = entry::next_rip(self.features.nrips, hw, software);
                None
            }
            Decoded::Exception { vector, error_code } => {
                let s = &self.vmcb().save;
                let long_mode = s.efer & EferFlags::LONG_MODE_ACTIVE.bits() != 0;
                match deliver_exception(vector, error_code, s.idtr.limit, long_mode) {
                    Delivery::Inject { vector, error_code } => {
                        self.inject_exception(vector, Some(error_code));
                        None
                    }
                    Delivery::Shutdown => Some(VmExit::Shutdown),
                }
            }
        }
    }
}

/// Name the first VMRUN consistency check (AMD APM vol. 2, 15.5.1) the VMCB
/// fails, for a readable `EntryFailed`.
fn diagnose_invalid(v: &Vmcb) -> &'static str {
    let s = &v.save;
    let c = &v.control;
    let cr0 = Cr0Flags::from_bits_retain(s.cr0);
    let long = s.efer & EferFlags::LONG_MODE_ENABLE.bits() != 0 && cr0.contains(Cr0Flags::PAGING);
    if s.efer & EFER_SVME == 0 {
        "VMRUN: guest EFER.SVME is clear"
    } else if cr0.contains(Cr0Flags::NOT_WRITE_THROUGH) && !cr0.contains(Cr0Flags::CACHE_DISABLE) {
        "VMRUN: guest CR0.NW set with CR0.CD clear"
    } else if s.cr0 >> 32 != 0 {
        "VMRUN: guest CR0[63:32] not zero"
    } else if s.dr6 >> 32 != 0 || s.dr7 >> 32 != 0 {
        "VMRUN: guest DR6/DR7[63:32] not zero"
    } else if long && s.cr4 & Cr4Flags::PHYSICAL_ADDRESS_EXTENSION.bits() == 0 {
        "VMRUN: long mode with CR4.PAE clear"
    } else if long && !cr0.contains(Cr0Flags::PROTECTED_MODE_ENABLE) {
        "VMRUN: long mode with CR0.PE clear"
    } else if long && s.cs.attrib & Segment::ATTR_L != 0 && s.cs.attrib & Segment::ATTR_DB != 0 {
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
        self.regs.rip = entry::next_rip(self.features.nrips, hw, decoded);
        // 15.21.5: the STI/MOV SS shadow covers one instruction; stepping
        // over it (the HLT of `sti; hlt`) ends the shadow, as executing it
        // would. Left set, it covered the guest's next instruction instead
        // (Bochs reports the shadow on a HLT intercept): a `cli` there ran
        // before the window could open, and the guest never took the
        // interrupt that should have ended its HLT.
        self.vmcb_mut().control.interrupt_shadow &= !1;
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        // 15.20: EVENTINJ = vector | type << 8 | EV << 11 | V << 31 |
        // error code << 32.
        let ev = injection(vector, error_code);
        let v = self.vmcb_mut();
        if v.control.event_inj & EVENT_VALID != 0 {
            log::debug!(
                "svm: injecting vector {vector} replaces pending event {:#x}",
                v.control.event_inj
            );
        }
        v.control.event_inj = ev;
    }

    fn inject_interrupt(&mut self, vector: u8) {
        // 15.20: EVENTINJ type 0 (INTR), no error code.
        let v = self.vmcb_mut();
        if v.control.event_inj & EVENT_VALID != 0 {
            log::warn!(
                "svm: interrupt {vector} replaces pending event {:#x}",
                v.control.event_inj
            );
        }
        v.control.event_inj = u64::from(vector) | EVENT_TYPE_INTR | EVENT_VALID;
    }

    fn inject_nmi(&mut self) {
        // 15.20: EVENTINJ type 2 (NMI), vector 2. Blocking lasts until the
        // handler's IRET, which we intercept to see it.
        let c = &mut self.vmcb_mut().control;
        c.event_inj = NMI_VECTOR | EVENT_TYPE_NMI | EVENT_VALID;
        c.intercept_misc1 |= INTERCEPT_IRET;
        self.nmi_blocked = true;
    }

    fn readiness(&self) -> EventReadiness {
        let c = &self.vmcb().control;
        // 15.20: one event per VMRUN; 15.21.5: the STI/MOV SS shadow
        // (interrupt_shadow bit 0) holds off interrupts and NMIs alike.
        let free = c.event_inj & EVENT_VALID == 0 && c.interrupt_shadow & 1 == 0;
        EventReadiness {
            interrupt: free && self.regs.rflags & RFLAGS_IF != 0,
            nmi: free && !self.nmi_blocked,
        }
    }

    fn set_event_windows(&mut self, interrupt: bool, nmi: bool) {
        let blocked = self.nmi_blocked;
        let c = &mut self.vmcb_mut().control;
        // 15.21.4: a pending virtual interrupt of the highest priority,
        // ignoring V_TPR, with the VINTR intercept: the CPU exits as soon
        // as the guest could take it (IF = 1, no shadow).
        if interrupt {
            c.int_control |= V_IRQ | V_INTR_PRIO_MAX | V_IGN_TPR;
            c.intercept_misc1 |= INTERCEPT_VINTR;
        } else {
            c.int_control &= !(V_IRQ | V_INTR_PRIO_MAX | V_IGN_TPR);
            c.intercept_misc1 &= !INTERCEPT_VINTR;
        }
        // The NMI window opens at the handler's IRET, intercepted while
        // an NMI is being handled (an unblocked guest can take one now).
        self.nmi_window = nmi && blocked;
    }

    fn guest_mode(&self) -> GuestMode {
        let s = &self.vmcb().save;
        GuestMode {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer & !EFER_SVME,
            cs_long: s.cs.attrib & Segment::ATTR_L != 0,
            cs_db: s.cs.attrib & Segment::ATTR_DB != 0,
        }
    }

    fn read_msr(&self, msr: u32) -> Result<u64, UnknownMsr> {
        let s = &self.vmcb().save;
        Ok(match msr {
            IA32_EFER => s.efer & !EFER_SVME,
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
        // Values were checked by `hvcore::msr::write_allowed` (the
        // `Vcpu::write_msr` contract); only EFER's state-dependent rule is
        // left, shared with the VMX backend.
        let s = &mut self.vmcb_mut().save;
        match msr {
            IA32_EFER => {
                let paging = s.cr0 & Cr0Flags::PAGING.bits() != 0;
                let current = EferFlags::from_bits_truncate(s.efer);
                let Some(efer) = efer_after_write(current, paging, value) else {
                    return bad;
                };
                s.efer = efer.bits() | EFER_SVME;
            }
            IA32_PAT => s.g_pat = value,
            IA32_STAR => s.star = value,
            IA32_FMASK => s.sfmask = value,
            IA32_SYSENTER_CS => s.sysenter_cs = value & 0xffff,
            IA32_LSTAR => s.lstar = value,
            IA32_CSTAR => s.cstar = value,
            IA32_KERNEL_GS_BASE => s.kernel_gs_base = value,
            IA32_SYSENTER_ESP => s.sysenter_esp = value,
            IA32_SYSENTER_EIP => s.sysenter_eip = value,
            IA32_FS_BASE => s.fs.base = value,
            IA32_GS_BASE => s.gs.base = value,
            _ => return bad,
        }
        Ok(())
    }

    fn reset_long_mode(&mut self, entry: &LongModeEntry) {
        let v = self.vmcb_mut();
        let s = &mut v.save;
        let data = Segment {
            selector: entry.data_selector,
            attrib: ATTR_DATA,
            limit: 0xffff_ffff,
            base: 0,
        };
        s.cs = Segment {
            selector: entry.code_selector,
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
        s.cr0 = LONG_MODE_CR0.bits();
        s.cr4 = LONG_MODE_CR4.bits();
        s.cr3 = entry.cr3.as_u64();
        s.cr2 = 0;
        s.efer = LONG_MODE_EFER.bits() | EFER_SVME;
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
        v.control.int_control &= !(V_IRQ | V_INTR_PRIO_MAX | V_IGN_TPR);
        v.control.intercept_misc1 &= !(INTERCEPT_VINTR | INTERCEPT_IRET);
        self.nmi_blocked = false;
        self.nmi_window = false;
        self.regs = hvcore::vcpu_state::long_mode_regs(entry);
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

    fn save_state(&self) -> VcpuState {
        self.save()
    }

    fn restore_state(&mut self, st: &VcpuState) -> Result<(), StateError> {
        self.restore(st)
    }
}

/// SVM has no hardware dirty log: the partition uses write protection
/// (`caps().pml` is false, so it never asks for PML).
impl PartitionVcpu for SvmVcpu {
    type Format = hvcore::svm::NptFormat;

    fn pml_arm(
        &mut self,
        _npt: &NestedPageTable<Self::Format>,
        _mem: &mut dyn PhysMem,
        _frames: &mut dyn FrameAlloc,
        _gfns: &[u64],
    ) -> Result<(), HostError> {
        Err(HostError::Backend("PML not available"))
    }

    fn pml_drain(&mut self, _mark: &mut dyn FnMut(Gfn)) {}

    fn pml_stop(&mut self, _frames: &mut dyn FrameAlloc) {}

    fn resolved_exits(&self) -> u64 {
        self.resolved_exits
    }
}
