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
use super::{VmxFeatures, CR4_VMXE, INV_ALL, INV_SINGLE};
use crate::cpu::wrmsr;
use crate::fpu::FxArea;
use core::sync::atomic::{AtomicU64, Ordering};
use hvcore::addr::{Hpa, PAGE_SIZE};
use hvcore::host::HostError;
use hvcore::mem::FrameAlloc;
use hvcore::msr::{
    IA32_CSTAR, IA32_EFER, IA32_FMASK, IA32_FS_BASE, IA32_GS_BASE, IA32_KERNEL_GS_BASE, IA32_LSTAR,
    IA32_PAT, IA32_STAR, IA32_SYSENTER_CS, IA32_SYSENTER_EIP, IA32_SYSENTER_ESP, IA32_TSC,
    IA32_TSC_AUX,
};
use hvcore::vcpu::{
    EventReadiness, GuestMode, LongModeEntry, Regs, StateError, UnknownMsr, Vcpu, VcpuCaps,
    VcpuState, VmExit,
};
use hvcore::vcpu_state::{LONG_MODE_CR0, LONG_MODE_CR4, LONG_MODE_EFER};
use hvcore::vmx::exit::{
    decode_exit, gpr_mut, Decoded, AR_CODE64, AR_DATA, AR_TSS_BUSY, AR_UNUSABLE,
    INTR_INFO_ERROR_VALID, INTR_INFO_VALID, INTR_TYPE_NMI,
};
use hvcore::vmx::flush::{flush_plan, FlushCaps, Invalidation};
use hvcore::x86::{efer_after_write, event_injection, EferFlags, PAT_DEFAULT};

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
    /// Primary controls as written (the window exits are toggled at run
    /// time).
    pub(super) proc1: u32,
    /// Secondary controls as written (PML is toggled at run time).
    pub(super) proc2: u32,
    /// The CPU has virtual NMIs (and NMI-window exiting): without them an
    /// injected NMI stays blocked forever (26.3, IRET), so none is
    /// injected.
    pub(super) virtual_nmis: bool,
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
            proc1: 0,
            proc2: 0,
            virtual_nmis: false,
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
            Decoded::Exit {
                exit: exit @ (VmExit::InterruptWindow | VmExit::NmiWindow),
                ..
            } => {
                // 26.7.5 / 26.7.6: close the window that exited.
                let bit = if exit == VmExit::InterruptWindow {
                    PROC_INTERRUPT_WINDOW_EXITING
                } else {
                    PROC_NMI_WINDOW_EXITING
                };
                self.set_proc1_bit(bit, false);
                Some(exit)
            }
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

    /// Set or clear one primary processor-based control (the window
    /// exits), if the CPU allows it to be 1.
    fn set_proc1_bit(&mut self, bit: u32, on: bool) {
        let value = if on && self.features.proc.may_be_one & bit != 0 {
            self.proc1 | bit
        } else {
            self.proc1 & !bit
        };
        if value != self.proc1 {
            self.proc1 = value;
            self.write(PRIMARY_PROC_CONTROLS, u64::from(value));
        }
    }

    /// The current EPT pointer (host-physical root plus flags).
    pub fn eptp(&self) -> u64 {
        self.eptp
    }
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

    fn inject_interrupt(&mut self, vector: u8) {
        // 25.8.3: vector, type 0 (external interrupt), valid.
        let old = self.read(ENTRY_INTERRUPTION_INFO);
        if old & INTR_INFO_VALID != 0 {
            log::warn!("vmx: interrupt {vector} replaces pending event {old:#x}");
        }
        self.write(ENTRY_INTERRUPTION_INFO, u64::from(vector) | INTR_INFO_VALID);
    }

    fn inject_nmi(&mut self) {
        // 25.8.3: vector 2, type 2 (NMI), valid.
        self.write(ENTRY_INTERRUPTION_INFO, 2 | INTR_TYPE_NMI | INTR_INFO_VALID);
    }

    fn readiness(&self) -> EventReadiness {
        // 25.4.2, table 25-3: interruptibility bit 0 blocking by STI, 1 by
        // MOV SS, 3 by NMI. One event per entry.
        let intr = self.read(GUEST_INTERRUPTIBILITY);
        let free = self.read(ENTRY_INTERRUPTION_INFO) & INTR_INFO_VALID == 0;
        EventReadiness {
            interrupt: free && intr & 0b11 == 0 && self.regs.rflags & (1 << 9) != 0,
            nmi: free && self.virtual_nmis && intr & 0b1011 == 0,
        }
    }

    fn set_event_windows(&mut self, interrupt: bool, nmi: bool) {
        self.set_proc1_bit(PROC_INTERRUPT_WINDOW_EXITING, interrupt);
        self.set_proc1_bit(PROC_NMI_WINDOW_EXITING, nmi && self.virtual_nmis);
    }

    fn guest_mode(&self) -> GuestMode {
        // 25.4.1: access rights bit 13 L, bit 14 D/B.
        let cs = self.read(GUEST_CS_AR);
        GuestMode {
            cr0: self.read(GUEST_CR0),
            cr3: self.read(GUEST_CR3),
            cr4: self.read(GUEST_CR4),
            efer: self.read(GUEST_EFER),
            cs_long: cs & (1 << 13) != 0,
            cs_db: cs & (1 << 14) != 0,
        }
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
            self.write(sel, u64::from(entry.data_selector));
            self.write(base, 0);
            self.write(limit, 0xffff_ffff);
            self.write(ar, AR_DATA);
        }
        self.write(GUEST_CS_SELECTOR, u64::from(entry.code_selector));
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
        self.set_event_windows(false, false);
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
