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

use super::controls::*;
use super::vmcs::{self, *};
use super::world_switch::{world_switch, SwitchEnd};
use super::{maps, VmxFeatures, CR4_VMXE, INV_ALL, INV_SINGLE};
use crate::cpu::{rdmsr, read_cr0, read_cr3, read_cr4, wrmsr};
use crate::fpu::FxArea;
use core::sync::atomic::{AtomicU64, Ordering};
use hvcore::addr::{Gpa, Hpa, PAGE_SIZE};
use hvcore::host::HostError;
use hvcore::mem::FrameAlloc;
use hvcore::msr::{
    IA32_CSTAR, IA32_EFER, IA32_FMASK, IA32_FS_BASE, IA32_GS_BASE, IA32_KERNEL_GS_BASE, IA32_LSTAR,
    IA32_PAT, IA32_STAR, IA32_SYSENTER_CS, IA32_SYSENTER_EIP, IA32_SYSENTER_ESP, IA32_TSC,
    IA32_TSC_AUX,
};
use hvcore::vcpu::{
    EntryFailure, LongModeEntry, Regs, StateError, UnknownMsr, Vcpu, VcpuCaps, VcpuState, VmExit,
};
use hvcore::vcpu_state::{LONG_MODE_CR0, LONG_MODE_CR4, LONG_MODE_EFER};
use hvcore::vmx::exit::{
    decode_exit, gpr_mut, Decoded, AR_CODE64, AR_DATA, AR_TSS_BUSY, AR_UNUSABLE,
    EXIT_INVALID_GUEST_STATE, EXIT_MACHINE_CHECK, EXIT_MSR_LOADING, INTR_INFO_ERROR_VALID,
    INTR_INFO_VALID,
};
use hvcore::vmx::flush::{flush_plan, FlushCaps, Invalidation};
use hvcore::x86::{efer_after_write, event_injection, is_valid_pat, EferFlags, PAT_DEFAULT};

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

/// One VMX vCPU.
pub struct VmxVcpu {
    /// The VMCS region, in a frame this vCPU owns (identity-mapped).
    pub(super) vmcs: Hpa,
    pub(super) regs: Regs,
    pub(super) vpid: u16,
    pub(super) features: VmxFeatures,
    /// The EPT pointer (A/D bit set only while PML is on).
    pub(super) eptp: u64,
    /// Secondary controls as written (PML is toggled at run time).
    pub(super) proc2: u32,
    pub(super) launched: bool,
    /// Length of the instruction the last exit reported, if any.
    pub(super) exit_len: Option<u64>,
    /// INVEPT before the next entry (permissions were reduced).
    pub(super) flush_ept: bool,
    /// INVVPID before the next entry (new VPID owner, or reset).
    pub(super) flush_vpid: bool,
    /// STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE.
    pub(super) syscall_msrs: [u64; 5],
    pub(super) tsc_aux: u32,
    /// The guest's CR2: VM entry and exit do not switch it (Intel SDM vol.
    /// 3C, 27.3 and 28.3 name no CR2), so it is loaded before entry and read
    /// back after the exit, keeping it per vCPU.
    pub(super) cr2: u64,
    pub(super) fx: FxArea,
    pub(super) pml: Option<super::pml::PmlState>,
    /// VMWRITE failures during set-up (a VMCS field this CPU lacks).
    pub(super) setup_error: Option<u32>,
    /// Exits handled inside `run` (PML full, #UD for VMX instructions,
    /// INVD, CR8).
    pub(super) resolved_exits: u64,
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

    pub(super) fn read(&self, field: u32) -> u64 {
        self.load();
        vmcs::read(field)
    }

    pub(super) fn write(&mut self, field: u32, value: u64) {
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
        let idtr_base = x86_64::instructions::tables::sidt().base.as_u64();
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
        let caps = FlushCaps {
            invept_single: self.features.invept_single(),
            vpid: self.features.vpid(),
            invvpid_single: self.features.invvpid_single(),
        };
        let ept_changed = core::mem::take(&mut self.flush_ept);
        let vpid_stale = core::mem::take(&mut self.flush_vpid);
        let (ept, vpid) = flush_plan(ept_changed, vpid_stale, caps);
        let r = match ept {
            Invalidation::None => Ok(()),
            Invalidation::SingleContext => vmcs::invept(INV_SINGLE, self.eptp),
            Invalidation::AllContexts => vmcs::invept(INV_ALL, 0),
        };
        if r.is_err() {
            log::warn!("vmx: INVEPT failed");
        }
        let r = match vpid {
            Invalidation::None => Ok(()),
            Invalidation::SingleContext => vmcs::invvpid(INV_SINGLE, self.vpid),
            Invalidation::AllContexts => vmcs::invvpid(INV_ALL, 0),
        };
        if r.is_err() {
            log::warn!("vmx: INVVPID failed");
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
            self.fx.load();
            let end = world_switch(&mut self.regs, self.launched);
            self.fx.store();
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
        let (lma, lme) = (
            efer & EferFlags::LONG_MODE_ACTIVE.bits() != 0,
            efer & EferFlags::LONG_MODE_ENABLE.bits() != 0,
        );
        if lma != ia32e || lme != ia32e {
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
        if !is_valid_pat(self.read(GUEST_PAT)) {
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

    /// The current EPT pointer (host-physical root plus flags).
    pub fn eptp(&self) -> u64 {
        self.eptp
    }
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
        // 25.8.3: vector 7:0, type 10:8, deliver error code 11, valid 31;
        // the deliver bit exactly for the vectors that push an error code
        // (VM entry checks it, 27.2.1.3), #VC and #SX included.
        let inj = event_injection(vector, error_code);
        let info = u64::from(inj.info);
        if let Some(code) = inj.error_code {
            self.write(ENTRY_EXCEPTION_ERROR_CODE, u64::from(code));
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
        // Values were checked by `hvcore::msr::write_allowed` (the
        // `Vcpu::write_msr` contract); only EFER's state-dependent rule is
        // left, shared with the SVM backend.
        if let Some(i) = SYSCALL_MSRS.iter().position(|&m| m == msr) {
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
                // Paging cannot be off: CR0.PG is fixed to 1 without
                // unrestricted guest.
                let current = EferFlags::from_bits_truncate(self.read(GUEST_EFER));
                let Some(efer) = efer_after_write(current, true, value) else {
                    return Err(UnknownMsr(msr));
                };
                self.write(GUEST_EFER, efer.bits());
            }
            IA32_PAT => self.write(GUEST_PAT, value),
            IA32_SYSENTER_CS => self.write(GUEST_SYSENTER_CS, value & 0xffff),
            IA32_SYSENTER_ESP => self.write(GUEST_SYSENTER_ESP, value),
            IA32_SYSENTER_EIP => self.write(GUEST_SYSENTER_EIP, value),
            IA32_FS_BASE => self.write(GUEST_FS_BASE, value),
            IA32_GS_BASE => self.write(GUEST_GS_BASE, value),
            _ => return Err(UnknownMsr(msr)),
        }
        Ok(())
    }

    fn reset_long_mode(&mut self, entry: &LongModeEntry) {
        let f = self.features;
        // 27.3.1.2 / 27.3.1.3: segment registers of a 64-bit guest at CPL 0.
        // ES, SS, DS, FS, GS are flat data (the first six of the record
        // order, less CS); CS, TR and LDTR are set below.
        for &(sel, base, limit, ar) in super::state::SEGMENT_FIELDS[..6]
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
        let cr0 = (LONG_MODE_CR0.bits() | f.cr0_fixed0) & f.cr0_fixed1;
        let cr4_guest = LONG_MODE_CR4.bits();
        let cr4 = (cr4_guest | CR4_VMXE | f.cr4_fixed0) & f.cr4_fixed1;
        self.write(GUEST_CR0, cr0);
        self.write(CR0_READ_SHADOW, cr0);
        self.write(GUEST_CR4, cr4);
        self.write(CR4_READ_SHADOW, cr4_guest);
        self.write(GUEST_CR3, entry.cr3.as_u64());
        self.write(GUEST_DR7, 0x400);
        self.write(GUEST_DEBUGCTL, 0);
        self.write(GUEST_EFER, LONG_MODE_EFER.bits());
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
        self.regs = hvcore::vcpu_state::long_mode_regs(entry);
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

    fn save_state(&self) -> VcpuState {
        self.save()
    }

    fn restore_state(&mut self, st: &VcpuState) -> Result<(), StateError> {
        self.restore(st)
    }
}
