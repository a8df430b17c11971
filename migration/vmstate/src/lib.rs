//! vmstate: the vendor-neutral records of one vCPU's state, the bottom of
//! the crate graph.
//!
//! Both the hypervisor logic (`hvcore`: the `Vcpu` trait saves and restores
//! a [`VcpuState`], and [`Regs`] is the register file every backend keeps)
//! and the migration engine (`migration`: its stream encodes these records)
//! depend on this crate; it depends on nothing. The SVM and VMX backends
//! convert their VMCB / VMCS contents to and from these records; nothing
//! vendor-specific is in them.
//!
//! Conventions the backends follow:
//! - Segment attributes use the 12-bit packed form of the AMD VMCB (AMD APM
//!   vol. 2, 15.5.1 "Segment attributes"): bits 0-3 type, 4 S, 5-6 DPL, 7 P,
//!   8 AVL, 9 L, 10 D/B, 11 G. The VMX backend packs its access-rights field
//!   (Intel SDM vol. 3C, 25.4.1, bits 0-7 and 12-15) into the same form and
//!   maps "unusable" (bit 16) to P = 0.
//! - FS/GS base are the `base` of `fs`/`gs` (they *are* IA32_FS_BASE and
//!   IA32_GS_BASE); IA32_KERNEL_GS_BASE is in [`Msrs`].
//! - The FPU/SSE/AVX state is the standard (non-compacted) XSAVE image for
//!   the saved XCR0, opaque here, at most [`MAX_XSAVE_BYTES`].
//! - `tsc` is the value the guest would read with RDTSC at save time; the
//!   destination derives its own TSC offset from it.
//!
//! Invariant: these are plain data. Nothing here checks architectural
//! consistency: a record that arrives from outside is an allegation, held
//! against the architecture by `hvcore::vcpu_state::check` before a backend
//! loads it, and its wire form is bounds-checked by the migration stream.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::vec::Vec;

/// Largest XSAVE image (covers every XCR0 component defined today, AMX
/// included, with room to spare).
pub const MAX_XSAVE_BYTES: usize = 16 * 1024;

/// General-purpose registers plus RSP, RIP and RFLAGS: the register file a
/// backend keeps for its vCPU and the record's registers, one struct.
///
/// `#[repr(C)]`: the backends' world-switch assembly addresses the fields
/// by offset (8 bytes each, in declaration order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Regs {
    pub rax: u64,    // 0x00
    pub rbx: u64,    // 0x08
    pub rcx: u64,    // 0x10
    pub rdx: u64,    // 0x18
    pub rsi: u64,    // 0x20
    pub rdi: u64,    // 0x28
    pub rbp: u64,    // 0x30
    pub r8: u64,     // 0x38
    pub r9: u64,     // 0x40
    pub r10: u64,    // 0x48
    pub r11: u64,    // 0x50
    pub r12: u64,    // 0x58
    pub r13: u64,    // 0x60
    pub r14: u64,    // 0x68
    pub r15: u64,    // 0x70
    pub rsp: u64,    // 0x78
    pub rip: u64,    // 0x80
    pub rflags: u64, // 0x88
}
const _: () = assert!(core::mem::size_of::<Regs>() == 18 * 8);

impl Regs {
    /// Number of fields.
    pub const FIELDS: usize = 18;

    /// The values in declaration order (RAX .. R15, RSP, RIP, RFLAGS).
    pub fn fields(&self) -> [u64; Self::FIELDS] {
        [
            self.rax,
            self.rbx,
            self.rcx,
            self.rdx,
            self.rsi,
            self.rdi,
            self.rbp,
            self.r8,
            self.r9,
            self.r10,
            self.r11,
            self.r12,
            self.r13,
            self.r14,
            self.r15,
            self.rsp,
            self.rip,
            self.rflags,
        ]
    }

    /// The fields in declaration order, for filling them one by one.
    pub fn fields_mut(&mut self) -> [&mut u64; Self::FIELDS] {
        [
            &mut self.rax,
            &mut self.rbx,
            &mut self.rcx,
            &mut self.rdx,
            &mut self.rsi,
            &mut self.rdi,
            &mut self.rbp,
            &mut self.r8,
            &mut self.r9,
            &mut self.r10,
            &mut self.r11,
            &mut self.r12,
            &mut self.r13,
            &mut self.r14,
            &mut self.r15,
            &mut self.rsp,
            &mut self.rip,
            &mut self.rflags,
        ]
    }
}

/// A segment register including its hidden (descriptor-cache) part.
///
/// `#[repr(C)]` in the layout of a VMCB save-area segment (AMD APM vol. 2,
/// Appendix B, table B-2), so the SVM backend's VMCB holds these directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Segment {
    /// +0x0 selector.
    pub selector: u16,
    /// +0x2 packed attributes, AMD VMCB form (see the module docs). Bits
    /// 12-15 must be zero.
    pub attrib: u16,
    /// +0x4 limit (expanded, in bytes).
    pub limit: u32,
    /// +0x8 base.
    pub base: u64,
}
const _: () = assert!(core::mem::size_of::<Segment>() == 16);

impl Segment {
    /// Attribute: present (bit 7).
    pub const ATTR_P: u16 = 1 << 7;
    /// Attribute: 64-bit code (L, bit 9).
    pub const ATTR_L: u16 = 1 << 9;
    /// Attribute: default operand size (D/B, bit 10).
    pub const ATTR_DB: u16 = 1 << 10;
    /// Attribute bits that exist (15:12 are zero in the packed form).
    pub const ATTR_DEFINED: u16 = 0x0fff;
}

/// GDTR or IDTR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TableReg {
    pub base: u64,
    pub limit: u16,
}

/// The MSRs a guest uses that are not part of another field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Msrs {
    pub pat: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub tsc_aux: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
}

impl Msrs {
    /// Number of fields.
    pub const FIELDS: usize = 10;

    /// The values in declaration order.
    pub fn fields(&self) -> [u64; Self::FIELDS] {
        [
            self.pat,
            self.star,
            self.lstar,
            self.cstar,
            self.sfmask,
            self.kernel_gs_base,
            self.tsc_aux,
            self.sysenter_cs,
            self.sysenter_esp,
            self.sysenter_eip,
        ]
    }

    /// From the values in declaration order.
    pub fn from_fields(m: [u64; Self::FIELDS]) -> Self {
        Self {
            pat: m[0],
            star: m[1],
            lstar: m[2],
            cstar: m[3],
            sfmask: m[4],
            kernel_gs_base: m[5],
            tsc_aux: m[6],
            sysenter_cs: m[7],
            sysenter_esp: m[8],
            sysenter_eip: m[9],
        }
    }
}

/// How a pending event is delivered.
///
/// [`EventKind::raw`] is the event-type field of both vendors' injection
/// formats, which agree on these four: AMD EVENTINJ TYPE (AMD APM vol. 2,
/// 15.20) and the VMX interruption type (Intel SDM vol. 3C, 25.8.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// External (maskable) interrupt: type 0.
    ExternalInterrupt,
    /// Non-maskable interrupt: type 2.
    Nmi,
    /// Hardware exception (vector < 32): type 3.
    Exception,
    /// Software interrupt (INTn): type 4.
    SoftwareInterrupt,
}

impl EventKind {
    /// The 3-bit event type.
    pub const fn raw(self) -> u8 {
        match self {
            EventKind::ExternalInterrupt => 0,
            EventKind::Nmi => 2,
            EventKind::Exception => 3,
            EventKind::SoftwareInterrupt => 4,
        }
    }

    /// The kind for an event type; `None` for the types no record names
    /// (1 reserved, 5 privileged software exception, 6 software exception,
    /// 7 other).
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0 => Some(EventKind::ExternalInterrupt),
            2 => Some(EventKind::Nmi),
            3 => Some(EventKind::Exception),
            4 => Some(EventKind::SoftwareInterrupt),
            _ => None,
        }
    }
}

/// An event the vCPU had accepted but not yet delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingEvent {
    pub vector: u8,
    pub kind: EventKind,
    pub error_code: Option<u32>,
}

/// FPU/SSE/AVX/... state: an opaque XSAVE image and the XCR0 it was saved
/// with.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct FpuState {
    pub xcr0: u64,
    /// Standard-form XSAVE image, at most [`MAX_XSAVE_BYTES`].
    pub xsave: Vec<u8>,
}

/// Everything needed to continue one vCPU elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct VcpuState {
    /// vCPU index, 0-based; records arrive in index order.
    pub id: u32,
    pub regs: Regs,
    pub es: Segment,
    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ldtr: Segment,
    pub tr: Segment,
    pub gdtr: TableReg,
    pub idtr: TableReg,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    /// DR0-DR3.
    pub dr: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
    pub msrs: Msrs,
    pub fpu: FpuState,
    pub pending_event: Option<PendingEvent>,
    /// The vCPU is in an interrupt shadow (after STI / MOV SS).
    pub interrupt_shadow: bool,
    /// NMIs are blocked: the guest runs an NMI handler (until its IRET).
    /// AMD APM vol. 2, 15.21.5 (the hypervisor tracks it, intercepting
    /// IRET); Intel SDM vol. 3C, 25.4.2 (interruptibility bit 3).
    pub nmi_blocked: bool,
    /// Guest-visible TSC at save time.
    pub tsc: u64,
}

impl VcpuState {
    /// The segment registers in record order: ES CS SS DS FS GS LDTR TR.
    pub fn segments(&self) -> [&Segment; 8] {
        [
            &self.es, &self.cs, &self.ss, &self.ds, &self.fs, &self.gs, &self.ldtr, &self.tr,
        ]
    }

    /// The segment registers in record order, for filling them.
    pub fn segments_mut(&mut self) -> [&mut Segment; 8] {
        [
            &mut self.es,
            &mut self.cs,
            &mut self.ss,
            &mut self.ds,
            &mut self.fs,
            &mut self.gs,
            &mut self.ldtr,
            &mut self.tr,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regs_fields_follow_declaration_order() {
        let mut r = Regs::default();
        for (i, f) in r.fields_mut().into_iter().enumerate() {
            *f = i as u64 + 1;
        }
        assert_eq!((r.rax, r.r15, r.rsp, r.rip, r.rflags), (1, 15, 16, 17, 18));
        assert_eq!(r.fields()[7], r.r8);
    }

    #[test]
    fn msrs_round_trip_through_fields() {
        let m = Msrs::from_fields([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!((m.pat, m.tsc_aux, m.sysenter_eip), (1, 7, 10));
        assert_eq!(Msrs::from_fields(m.fields()), m);
    }

    #[test]
    fn event_types_round_trip_and_unnamed_types_are_none() {
        for k in [
            EventKind::ExternalInterrupt,
            EventKind::Nmi,
            EventKind::Exception,
            EventKind::SoftwareInterrupt,
        ] {
            assert_eq!(EventKind::from_raw(k.raw()), Some(k));
        }
        for raw in [1, 5, 6, 7, 8, 255] {
            assert_eq!(EventKind::from_raw(raw), None);
        }
    }
}
