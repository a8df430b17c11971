//! `VmxVcpu`'s state record: the VMCS guest-state area plus what VMX
//! leaves to the VMM, converted to and from the vendor-neutral
//! [`VcpuState`] (Intel SDM vol. 3C, 25.4).
//!
//! Invariant: `restore` checks everything first (the vendor-neutral
//! [`vcpu_state::check`], then the VMX fixed bits) before it writes a
//! field.

use super::vcpu::VmxVcpu;
use super::vmcs::*;
use super::CR4_VMXE;
use hvcore::vcpu::{StateError, VcpuState};
use hvcore::vcpu_state::{self, Msrs, Segment, TableReg};
use hvcore::vmx::exit::{
    ar_to_attrib, attrib_to_ar, event_in, event_out, interruptibility_in, interruptibility_out,
};
use hvcore::x86::EferFlags;

/// Guest segment fields (selector, base, limit, access rights) in record
/// order: ES CS SS DS FS GS LDTR TR.
pub(super) const SEGMENT_FIELDS: [(u32, u32, u32, u32); 8] = [
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

impl VmxVcpu {
    /// The VMCS guest-state area (Intel SDM vol. 3C, 25.4) plus what VMX
    /// leaves to the VMM: the GPRs, CR2, the FXSAVE image, the SYSCALL MSRs
    /// and TSC_AUX (kept here), DR0-DR3 and DR6 (the physical registers,
    /// never switched). CR4 as the guest sees it: masked bits from the read
    /// shadow (25.6.6). The pending event is the entry interruption field,
    /// where `enter` re-queues an interrupted delivery (29.2.1).
    pub(super) fn save(&self) -> VcpuState {
        let mut segs = [Segment::default(); 8];
        for (out, &(sel, base, limit, ar)) in segs.iter_mut().zip(&SEGMENT_FIELDS) {
            *out = Segment {
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
            msrs: Msrs {
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
            // Blocking by STI or MOV SS, and by NMI, 25.4.2.
            interrupt_shadow: interruptibility_out(intr).0,
            nmi_blocked: interruptibility_out(intr).1,
            // 25.6.5: the guest reads the TSC plus TSC_OFFSET.
            tsc: crate::cpu::rdtsc().wrapping_add(self.read(TSC_OFFSET)),
        }
    }

    pub(super) fn restore(&mut self, st: &VcpuState) -> Result<(), StateError> {
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
        if st.efer & EferFlags::LONG_MODE_ACTIVE.bits() == 0 {
            return Err(StateError::new(
                "not in long mode (EFER.LMA clear)",
                st.efer,
            ));
        }
        let tsc_aux = u32::try_from(st.msrs.tsc_aux)
            .map_err(|_| StateError::new("TSC_AUX bits 63:32", st.msrs.tsc_aux))?;
        for (seg, &(sel, base, limit, ar)) in st.segments().iter().zip(&SEGMENT_FIELDS) {
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
        // 26.3.1.5: what VM entry accepts (interruptibility_in).
        let intr = interruptibility_in(
            st.interrupt_shadow,
            st.regs.rflags,
            st.nmi_blocked,
            self.virtual_nmis,
            st.pending_event.as_ref(),
        );
        self.write(GUEST_INTERRUPTIBILITY, intr);
        let (info, code) = st.pending_event.as_ref().map_or((0, 0), event_in);
        self.write(ENTRY_INTERRUPTION_INFO, info);
        self.write(ENTRY_EXCEPTION_ERROR_CODE, code);
        // A software interrupt is delivered as if INT n (2 bytes) ran.
        self.write(ENTRY_INSTRUCTION_LENGTH, 2);
        // The guest's TSC continues from the saved value.
        self.write(TSC_OFFSET, st.tsc.wrapping_sub(crate::cpu::rdtsc()));
        self.fx.0 = fx;
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
