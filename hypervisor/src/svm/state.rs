//! `SvmVcpu`'s state record: the VMCB save area plus what lives outside
//! it, converted to and from the vendor-neutral [`VcpuState`] (AMD APM
//! vol. 2, 15.5 and Appendix B).
//!
//! Invariant: `restore` checks everything first (the vendor-neutral
//! [`vcpu_state::check`], then what this CPU can run) and changes nothing
//! on `Err`.

use super::vcpu::SvmVcpu;
use super::vmcb::{Segment, INTERCEPT_IRET};
use super::EFER_SVME;
use hvcore::svm::exit::{event_in, event_out, nmi_blocked_in};
use hvcore::vcpu::{StateError, VcpuState};
use hvcore::vcpu_state::{self, Msrs, TableReg};

impl SvmVcpu {
    /// The VMCB save area plus what lives outside it: the GPRs, the FXSAVE
    /// image (VMRUN does not switch x87/SSE state, the vCPU does), TSC_AUX,
    /// DR0-DR3 (never switched: the physical registers) and the pending
    /// event (EVENTINJ, where `enter` re-queues an interrupted delivery
    /// from EXITINTINFO). AMD APM vol. 2, 15.5 and Appendix B.
    pub(super) fn save(&self) -> VcpuState {
        let v = self.vmcb();
        let (c, s) = (&v.control, &v.save);
        VcpuState {
            id: 0,
            regs: self.regs,
            es: s.es,
            cs: s.cs,
            ss: s.ss,
            ds: s.ds,
            fs: s.fs,
            gs: s.gs,
            ldtr: s.ldtr,
            // TCG caches TR with its pre-LTR (available) type.
            tr: Segment {
                attrib: vcpu_state::tr_attrib_busy(s.tr.attrib),
                ..s.tr
            },
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
            msrs: Msrs {
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
            // Kept by the backend (15.21.5): set by an NMI's injection,
            // cleared at the handler's intercepted IRET.
            nmi_blocked: self.nmi_blocked,
            // 15.30.4 (TSC offset): the guest reads host TSC + TSC_OFFSET.
            tsc: crate::cpu::rdtsc().wrapping_add(c.tsc_offset),
        }
    }

    pub(super) fn restore(&mut self, st: &VcpuState) -> Result<(), StateError> {
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
        s.es = st.es;
        s.cs = st.cs;
        s.ss = st.ss;
        s.ds = st.ds;
        s.fs = st.fs;
        s.gs = st.gs;
        s.ldtr = st.ldtr;
        s.tr = st.tr;
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
        // NMI blocking lasts until the handler's IRET, which is
        // intercepted to see it (15.21.5); no NMI window is pending.
        let nmi_blocked = nmi_blocked_in(st.nmi_blocked, st.pending_event.as_ref());
        if nmi_blocked {
            c.intercept_misc1 |= INTERCEPT_IRET;
        } else {
            c.intercept_misc1 &= !INTERCEPT_IRET;
        }
        // The guest's TSC continues from the saved value.
        c.tsc_offset = st.tsc.wrapping_sub(crate::cpu::rdtsc());
        self.fx.0 = fx;
        self.tsc_aux = tsc_aux;
        self.nmi_blocked = nmi_blocked;
        self.nmi_window = false;
        self.regs = st.regs;
        self.next_rip = None;
        self.flush_pending = true;
        // Loaded into the registers by the next entry.
        self.dr = st.dr;
        Ok(())
    }
}
