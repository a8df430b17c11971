//! Vendor-neutral checks and conversions behind [`Vcpu::save_state`] and
//! [`Vcpu::restore_state`], written once for both backends.
//!
//! A [`VcpuState`] arriving for restore is an allegation (a migration
//! stream, STYLE 4): [`check`] holds it against the architecture before a
//! backend writes a single field, so a bad record is refused with a
//! [`StateError`] instead of failing VM entry or faulting the hypervisor
//! (an MXCSR with reserved bits set makes FXRSTOR raise #GP in the host).
//! Backends add their own limits (VMX without unrestricted guest needs
//! paging on).
//!
//! FPU state: both backends keep the guest's x87/SSE state as a 512-byte
//! FXSAVE image and never let the guest enable XSAVE (CPUID hides it,
//! XSETBV raises #UD), so XCR0 is x87|SSE for every guest. The record holds
//! it as the standard-form XSAVE image for that XCR0: the FXSAVE image
//! (legacy region) followed by the 64-byte XSAVE header with XSTATE_BV = 3
//! (Intel SDM vol. 1, 13.4; AMD APM vol. 2, 11.5.2).
//!
//! [`Vcpu::save_state`]: crate::vcpu::Vcpu::save_state
//! [`Vcpu::restore_state`]: crate::vcpu::Vcpu::restore_state

use crate::vcpu::{LongModeEntry, Regs, StateError};
use crate::x86::{
    is_canonical, is_valid_pat, Cr0Flags, Cr4Flags, EferFlags, RFlags, ATTR_CODE64, ATTR_DATA,
    ATTR_LDT, ATTR_TSS_BUSY, CR0_DEFINED, CR4_GUEST, EFER_GUEST, PAT_DEFAULT,
};
use alloc::vec::Vec;
pub use vmstate::{EventKind, FpuState, Msrs, PendingEvent, Segment, TableReg, VcpuState};

/// Size of an FXSAVE image.
pub const FXSAVE_BYTES: usize = 512;
/// Size of the standard-form XSAVE image for XCR0 = x87|SSE (legacy region
/// plus header).
pub const XSAVE_BYTES: usize = FXSAVE_BYTES + 64;
/// XCR0 of every guest: x87 (bit 0) and SSE (bit 1).
pub const GUEST_XCR0: u64 = 0b11;
/// Offset of MXCSR in the FXSAVE image.
const MXCSR_OFFSET: usize = 24;
/// Offset of XSTATE_BV (the XSAVE header's first field).
const XSTATE_BV_OFFSET: usize = FXSAVE_BYTES;
/// MXCSR bits that may be set (MXCSR_MASK of CPUs with DAZ; bits 31:16 are
/// reserved and make FXRSTOR raise #GP).
pub const MXCSR_VALID: u32 = 0xffff;

/// Segment attribute: present (VMCB packed form, bit 7).
pub const ATTR_P: u16 = Segment::ATTR_P;
/// Segment attribute: 64-bit code (L, bit 9).
pub const ATTR_L: u16 = Segment::ATTR_L;
/// Segment attribute: default size (D/B, bit 10).
pub const ATTR_DB: u16 = Segment::ATTR_DB;

/// Architectural checks common to both backends. Nothing is changed.
pub fn check(s: &VcpuState) -> Result<(), StateError> {
    let err = |what, value| Err(StateError::new(what, value));
    let Some(cr0) = Cr0Flags::from_bits(s.cr0) else {
        return err("CR0 reserved bits", s.cr0 & !CR0_DEFINED.bits());
    };
    if cr0.contains(Cr0Flags::NOT_WRITE_THROUGH) && !cr0.contains(Cr0Flags::CACHE_DISABLE) {
        return err("CR0.NW without CR0.CD", s.cr0);
    }
    if cr0.contains(Cr0Flags::PAGING) && !cr0.contains(Cr0Flags::PROTECTED_MODE_ENABLE) {
        return err("CR0.PG without CR0.PE", s.cr0);
    }
    if s.cr4 & !CR4_GUEST.bits() != 0 {
        return err("CR4 bits this hypervisor does not offer", s.cr4);
    }
    let cr4 = Cr4Flags::from_bits_truncate(s.cr4);
    if s.cr8 > 15 {
        return err("CR8 above 15", s.cr8);
    }
    if s.efer & !EFER_GUEST.bits() != 0 {
        return err("EFER bits this hypervisor does not offer", s.efer);
    }
    let efer = EferFlags::from_bits_truncate(s.efer);
    let long = efer.contains(EferFlags::LONG_MODE_ENABLE) && cr0.contains(Cr0Flags::PAGING);
    if long != efer.contains(EferFlags::LONG_MODE_ACTIVE) {
        return err("EFER.LMA disagrees with EFER.LME and CR0.PG", s.efer);
    }
    if long && !cr4.contains(Cr4Flags::PHYSICAL_ADDRESS_EXTENSION) {
        return err("long mode with CR4.PAE clear", s.cr4);
    }
    if long && s.cs.attrib & ATTR_L != 0 && s.cs.attrib & ATTR_DB != 0 {
        return err("CS has both L and D set", u64::from(s.cs.attrib));
    }
    for seg in s.segments() {
        if seg.attrib & !Segment::ATTR_DEFINED != 0 {
            return err("segment attribute bits 15:12", u64::from(seg.attrib));
        }
    }
    if s.cs.attrib & ATTR_P == 0 {
        return err("CS not present", u64::from(s.cs.attrib));
    }
    if s.tr.attrib & ATTR_P == 0 || !matches!(s.tr.attrib & 0x1f, 0x03 | 0x0b) {
        return err("TR is not a present busy TSS", u64::from(s.tr.attrib));
    }
    for base in [
        s.fs.base,
        s.gs.base,
        s.ldtr.base,
        s.tr.base,
        s.gdtr.base,
        s.idtr.base,
        s.msrs.lstar,
        s.msrs.cstar,
        s.msrs.kernel_gs_base,
        s.msrs.sysenter_esp,
        s.msrs.sysenter_eip,
    ] {
        if !is_canonical(base) {
            return err("non-canonical base address or MSR", base);
        }
    }
    if !is_valid_pat(s.msrs.pat) {
        return err("PAT memory type", s.msrs.pat);
    }
    if s.msrs.sfmask >> 32 != 0 {
        return err("SFMASK bits 63:32", s.msrs.sfmask);
    }
    if s.msrs.sysenter_cs >> 16 != 0 {
        return err("SYSENTER_CS bits 63:16", s.msrs.sysenter_cs);
    }
    if s.msrs.tsc_aux >> 32 != 0 {
        return err("TSC_AUX bits 63:32", s.msrs.tsc_aux);
    }
    if s.dr6 >> 32 != 0 || s.dr7 >> 32 != 0 {
        return err("DR6/DR7 bits 63:32", s.dr6 | s.dr7);
    }
    if s.dr.iter().any(|&d| !is_canonical(d)) {
        return err("non-canonical DR0-DR3", s.dr[0]);
    }
    // Bit 1 is always 1; bits 63:22 (and 15, 5, 3) are reserved.
    if s.regs.rflags & 2 == 0 || RFlags::from_bits(s.regs.rflags & !2).is_none() {
        return err("RFLAGS reserved bits", s.regs.rflags);
    }
    if !is_canonical(s.regs.rip) {
        return err("non-canonical RIP", s.regs.rip);
    }
    if let Some(ev) = s.pending_event {
        check_event(&ev)?;
    }
    fxsave_image(&s.fpu).map(|_| ())
}

fn check_event(ev: &PendingEvent) -> Result<(), StateError> {
    let v = u64::from(ev.vector);
    match ev.kind {
        EventKind::Exception if ev.vector >= 32 || ev.vector == 2 => {
            Err(StateError::new("exception vector", v))
        }
        EventKind::Exception
            if ev.error_code.is_some() != crate::x86::exception_has_error_code(ev.vector) =>
        {
            Err(StateError::new("exception error code presence", v))
        }
        EventKind::Nmi if ev.vector != 2 => Err(StateError::new("NMI vector", v)),
        EventKind::ExternalInterrupt | EventKind::SoftwareInterrupt if ev.error_code.is_some() => {
            Err(StateError::new("interrupt with an error code", v))
        }
        EventKind::ExternalInterrupt if ev.vector < 32 => {
            Err(StateError::new("external interrupt vector below 32", v))
        }
        _ => Ok(()),
    }
}

/// CR0 of a vCPU after `reset_long_mode`: PE MP ET NE WP PG.
pub const LONG_MODE_CR0: Cr0Flags = Cr0Flags::PROTECTED_MODE_ENABLE
    .union(Cr0Flags::MONITOR_COPROCESSOR)
    .union(Cr0Flags::EXTENSION_TYPE)
    .union(Cr0Flags::NUMERIC_ERROR)
    .union(Cr0Flags::WRITE_PROTECT)
    .union(Cr0Flags::PAGING);
/// CR4 of a vCPU after `reset_long_mode`: PAE OSFXSR OSXMMEXCPT.
pub const LONG_MODE_CR4: Cr4Flags = Cr4Flags::PHYSICAL_ADDRESS_EXTENSION
    .union(Cr4Flags::OSFXSR)
    .union(Cr4Flags::OSXMMEXCPT_ENABLE);
/// EFER of a vCPU after `reset_long_mode`: LME LMA NXE.
pub const LONG_MODE_EFER: EferFlags = EferFlags::LONG_MODE_ENABLE
    .union(EferFlags::LONG_MODE_ACTIVE)
    .union(EferFlags::NO_EXECUTE_ENABLE);

/// TR's attributes as the CPU uses them: a loaded TR is always a busy TSS
/// (LTR sets the busy bit, AMD APM vol. 2, 12.2.5; Intel SDM vol. 2A,
/// LTR). QEMU's TCG keeps the descriptor's type from before LTR set the
/// bit in its TR cache (and so in the VMCB), which would make a running
/// Linux guest's state fail [`check`] and VM entry on VMX: an available
/// TSS type (1 or 9) is reported as the busy one (3 or 11).
pub const fn tr_attrib_busy(attrib: u16) -> u16 {
    match attrib & 0x1f {
        0x01 | 0x09 => attrib | 0x02,
        _ => attrib,
    }
}

/// The registers after `reset_long_mode`: RIP, RSP, RDI and RSI from
/// `entry`, RFLAGS with only its always-one bit 1 (interrupts off), the
/// rest 0.
pub fn long_mode_regs(entry: &LongModeEntry) -> Regs {
    Regs {
        rip: entry.rip,
        rsp: entry.rsp,
        rdi: entry.rdi,
        rsi: entry.rsi,
        rflags: 2,
        ..Regs::default()
    }
}

/// The state both backends' `reset_long_mode` give a vCPU, as a record
/// (TSC 0): 64-bit code at CPL 0, flat data segments, paging with PAE, NX,
/// x87/SSE in their initial state. Test doubles use it as their reset
/// state.
pub fn long_mode_state(entry: &LongModeEntry) -> VcpuState {
    let data = Segment {
        selector: entry.data_selector,
        attrib: ATTR_DATA,
        limit: 0xffff_ffff,
        base: 0,
    };
    let fx = initial_fxsave();
    VcpuState {
        regs: long_mode_regs(entry),
        es: data,
        ss: data,
        ds: data,
        fs: data,
        gs: data,
        cs: Segment {
            selector: entry.code_selector,
            attrib: ATTR_CODE64,
            limit: 0xffff_ffff,
            base: 0,
        },
        tr: Segment {
            selector: 0,
            attrib: ATTR_TSS_BUSY,
            limit: 0x67,
            base: 0,
        },
        ldtr: Segment {
            attrib: ATTR_LDT,
            ..Segment::default()
        },
        gdtr: TableReg {
            base: entry.gdt_base.as_u64(),
            limit: entry.gdt_limit,
        },
        cr0: LONG_MODE_CR0.bits(),
        cr3: entry.cr3.as_u64(),
        cr4: LONG_MODE_CR4.bits(),
        efer: LONG_MODE_EFER.bits(),
        dr6: 0xffff_0ff0,
        dr7: 0x400,
        msrs: Msrs {
            pat: PAT_DEFAULT,
            ..Msrs::default()
        },
        fpu: fpu_from_fxsave(&fx),
        ..VcpuState::default()
    }
}

/// The FXSAVE image of x87/SSE state after INIT: FCW = 0x37f, MXCSR =
/// 0x1f80, everything else 0 (Intel SDM vol. 3A, table 10-1; AMD APM vol.
/// 2, 11.5.2).
pub fn initial_fxsave() -> [u8; FXSAVE_BYTES] {
    let mut fx = [0u8; FXSAVE_BYTES];
    fx[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
    fx[MXCSR_OFFSET..MXCSR_OFFSET + 4].copy_from_slice(&0x1f80u32.to_le_bytes());
    fx
}

/// The record's FPU state for a 512-byte FXSAVE image.
pub fn fpu_from_fxsave(fx: &[u8; FXSAVE_BYTES]) -> FpuState {
    let mut xsave = Vec::with_capacity(XSAVE_BYTES);
    xsave.extend_from_slice(fx);
    xsave.resize(XSAVE_BYTES, 0);
    xsave[XSTATE_BV_OFFSET..XSTATE_BV_OFFSET + 8].copy_from_slice(&GUEST_XCR0.to_le_bytes());
    FpuState {
        xcr0: GUEST_XCR0,
        xsave,
    }
}

/// The FXSAVE image to load for the record's FPU state: XCR0 must be
/// x87|SSE, the image at least the legacy region, the header (if present)
/// may only mark x87/SSE, and MXCSR must be loadable. A component whose
/// XSTATE_BV bit is clear is in its initial state (Intel SDM vol. 1,
/// 13.8.1): that part of the image is reset.
pub fn fxsave_image(fpu: &FpuState) -> Result<[u8; FXSAVE_BYTES], StateError> {
    if fpu.xcr0 != GUEST_XCR0 {
        return Err(StateError::new("XCR0 other than x87|SSE", fpu.xcr0));
    }
    let Some(legacy) = fpu.xsave.get(..FXSAVE_BYTES) else {
        return Err(StateError::new(
            "XSAVE image shorter than its legacy region",
            fpu.xsave.len() as u64,
        ));
    };
    let mut fx = [0u8; FXSAVE_BYTES];
    fx.copy_from_slice(legacy);
    let bv = match fpu.xsave.get(XSTATE_BV_OFFSET..XSTATE_BV_OFFSET + 8) {
        Some(b) => {
            let mut w = [0u8; 8];
            w.copy_from_slice(b);
            u64::from_le_bytes(w)
        }
        // A bare legacy image: both components as given.
        None => GUEST_XCR0,
    };
    if bv & !GUEST_XCR0 != 0 {
        return Err(StateError::new("XSTATE_BV beyond XCR0", bv));
    }
    if bv & 1 == 0 {
        // x87 initial: FCW 0x37f, status/tag/opcode/pointers and ST0-7 zero.
        fx[0..24].fill(0);
        fx[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        fx[32..160].fill(0);
    }
    if bv & 2 == 0 {
        // SSE initial: XMM0-15 zero (MXCSR is kept, as XRSTOR does).
        fx[160..416].fill(0);
    }
    let mut m = [0u8; 4];
    m.copy_from_slice(&fx[MXCSR_OFFSET..MXCSR_OFFSET + 4]);
    let mxcsr = u32::from_le_bytes(m);
    if mxcsr & !MXCSR_VALID != 0 {
        return Err(StateError::new("MXCSR reserved bits", u64::from(mxcsr)));
    }
    // MXCSR_MASK (bytes 28-31) is ignored by FXRSTOR: clear it.
    fx[28..32].fill(0);
    Ok(fx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long_mode_state() -> VcpuState {
        let mut s = super::long_mode_state(&LongModeEntry {
            rip: 0x10_0000,
            rsp: 0x8_0000,
            rdi: 0x8000,
            cr3: crate::addr::Gpa(0x1000),
            rsi: 0,
            gdt_base: crate::addr::Gpa(0x7000),
            gdt_limit: 0x17,
            code_selector: crate::vcpu::SELECTORS_ABI.0,
            data_selector: crate::vcpu::SELECTORS_ABI.1,
        });
        s.tsc = 12345;
        s
    }

    #[test]
    fn tr_is_reported_busy() {
        // A 64-bit TSS as QEMU's TCG caches it after LTR: available.
        assert_eq!(tr_attrib_busy(0x89), 0x8b);
        assert_eq!(tr_attrib_busy(0x81), 0x83);
        assert_eq!(tr_attrib_busy(0x8b), 0x8b);
        // Not a TSS: left as it is (check refuses it).
        assert_eq!(tr_attrib_busy(0x93), 0x93);
        let mut s = long_mode_state();
        s.tr.attrib = 0x89;
        assert!(check(&s).is_err());
        s.tr.attrib = tr_attrib_busy(s.tr.attrib);
        assert_eq!(check(&s), Ok(()));
    }

    #[test]
    fn a_long_mode_guest_passes() {
        assert_eq!(check(&long_mode_state()), Ok(()));
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        type Edit = fn(&mut VcpuState);
        let cases: [(Edit, &str); 14] = [
            (|s| s.cr0 |= 1 << 40, "CR0 reserved bits"),
            (|s| s.cr4 |= 1 << 18, "CR4 bits"),
            (|s| s.efer |= 1 << 12, "EFER bits"),
            (|s| s.efer &= !(1 << 10), "EFER.LMA"),
            (|s| s.cs.attrib |= ATTR_DB, "CS has both"),
            (|s| s.ds.attrib |= 1 << 13, "segment attribute"),
            (|s| s.tr.attrib = 0x89, "TR is not"),
            (|s| s.fs.base = 1 << 47, "non-canonical"),
            (|s| s.msrs.pat = 2, "PAT"),
            (|s| s.regs.rflags = 0, "RFLAGS"),
            (
                |s| {
                    s.pending_event = Some(PendingEvent {
                        vector: 13,
                        kind: EventKind::Exception,
                        error_code: None,
                    })
                },
                "error code presence",
            ),
            (|s| s.fpu.xcr0 = 7, "XCR0"),
            (|s| s.fpu.xsave[26] = 1, "MXCSR reserved"),
            (|s| s.fpu.xsave.truncate(100), "shorter"),
        ];
        for (edit, what) in cases {
            let mut s = long_mode_state();
            edit(&mut s);
            let e = check(&s).unwrap_err();
            assert!(e.what.contains(what), "{what}: got {e}");
        }
    }

    #[test]
    fn fxsave_round_trips_and_init_components_reset() {
        let mut fx = [0u8; FXSAVE_BYTES];
        for (i, b) in fx.iter_mut().enumerate() {
            *b = i as u8;
        }
        fx[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        fx[28..32].fill(0);
        let fpu = fpu_from_fxsave(&fx);
        assert_eq!(fpu.xsave.len(), XSAVE_BYTES);
        assert_eq!(fxsave_image(&fpu).unwrap(), fx);
        let mut no_sse = fpu.clone();
        no_sse.xsave[XSTATE_BV_OFFSET] = 1;
        let img = fxsave_image(&no_sse).unwrap();
        assert!(img[160..416].iter().all(|&b| b == 0));
        assert_eq!(&img[0..160], &fx[0..160]);
        let mut bare = fpu;
        bare.xsave.truncate(FXSAVE_BYTES);
        assert_eq!(fxsave_image(&bare).unwrap(), fx);
    }
}
