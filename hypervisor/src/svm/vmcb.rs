//! The Virtual Machine Control Block: one 4 KiB page per vCPU, a 1 KiB
//! control area (intercepts, exit information, nested paging, event
//! injection) followed by the state-save area (guest segment, control and
//! system registers). AMD APM vol. 2, Appendix B (tables B-1 and B-2).
//!
//! Invariants: a `Vmcb` lives in its own 4 KiB-aligned host frame (VMRUN
//! takes its physical address; the hypervisor identity-maps memory, so the
//! frame's address is both). Fields are plain memory: the CPU reads them at
//! VMRUN and writes them at #VMEXIT, never while the hypervisor holds a
//! reference (VMRUN only runs from `SvmVcpu::run`, which has `&mut self`).

use core::mem::{offset_of, size_of};

/// A segment register in the save area (AMD APM vol. 2, Appendix B, table
/// B-2): the state record's segment, which has this layout (selector +0x0,
/// packed attributes +0x2, limit +0x4, base +0x8).
pub use hvcore::vcpu_state::Segment;
const _: () = assert!(size_of::<Segment>() == 16);
const _: () = assert!(offset_of!(Segment, attrib) == 0x2);
const _: () = assert!(offset_of!(Segment, base) == 0x8);

/// VMCB control area. AMD APM vol. 2, Appendix B, table B-1.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct ControlArea {
    /// +0x000 intercept reads of CR0-15 (bits 15:0) and writes (31:16).
    pub intercept_cr: u32,
    /// +0x004 intercept reads of DR0-15 (bits 15:0) and writes (31:16).
    pub intercept_dr: u32,
    /// +0x008 intercept exception vectors 0-31.
    pub intercept_exceptions: u32,
    /// +0x00c INTR, NMI, ..., CPUID, HLT, IOIO_PROT, MSR_PROT, SHUTDOWN.
    pub intercept_misc1: u32,
    /// +0x010 VMRUN, VMMCALL, VMLOAD, VMSAVE, STGI, CLGI, ..., XSETBV.
    pub intercept_misc2: u32,
    /// +0x014 INVLPGB, PCID, MCOMMIT, TLBSYNC, ...
    pub intercept_misc3: u32,
    /// +0x018 reserved.
    _reserved_018: [u8; 0x03c - 0x018],
    /// +0x03c PAUSE filter threshold.
    pub pause_filter_threshold: u16,
    /// +0x03e PAUSE filter count.
    pub pause_filter_count: u16,
    /// +0x040 physical base of the I/O permission map (4 KiB aligned).
    pub iopm_base_pa: u64,
    /// +0x048 physical base of the MSR permission map (4 KiB aligned).
    pub msrpm_base_pa: u64,
    /// +0x050 TSC offset added to guest RDTSC.
    pub tsc_offset: u64,
    /// +0x058 guest ASID (must be non-zero for VMRUN).
    pub guest_asid: u32,
    /// +0x05c TLB_CONTROL (byte 0); bytes 1-3 reserved.
    pub tlb_control: u32,
    /// +0x060 V_TPR, V_IRQ, VGIF, V_INTR_PRIO, V_IGN_TPR, V_INTR_MASKING
    /// (bit 24), AVIC enable, V_INTR_VECTOR (39:32).
    pub int_control: u64,
    /// +0x068 interrupt shadow (bit 0), guest interrupt mask (bit 1).
    pub interrupt_shadow: u64,
    /// +0x070 EXITCODE.
    pub exit_code: u64,
    /// +0x078 EXITINFO1.
    pub exit_info1: u64,
    /// +0x080 EXITINFO2.
    pub exit_info2: u64,
    /// +0x088 EXITINTINFO: an event whose delivery the exit interrupted.
    pub exit_int_info: u64,
    /// +0x090 NP_ENABLE (bit 0), SEV (1), SEV-ES (2), ...
    pub np_control: u64,
    /// +0x098 AVIC APIC_BAR.
    pub avic_apic_bar: u64,
    /// +0x0a0 guest physical address of the GHCB.
    pub ghcb_pa: u64,
    /// +0x0a8 EVENTINJ: event injected on the next VMRUN.
    pub event_inj: u64,
    /// +0x0b0 N_CR3: host-physical root of the nested page table.
    pub n_cr3: u64,
    /// +0x0b8 LBR virtualization enable (bit 0), virtualized VMSAVE/VMLOAD (1).
    pub lbr_virt: u64,
    /// +0x0c0 VMCB clean bits (31:0); 63:32 reserved.
    pub clean_bits: u64,
    /// +0x0c8 nRIP: next sequential RIP (with NRIPS).
    pub next_rip: u64,
    /// +0x0d0 number of guest instruction bytes fetched (decode assists).
    pub insn_len: u8,
    /// +0x0d1 guest instruction bytes.
    pub insn_bytes: [u8; 15],
    /// +0x0e0 AVIC APIC backing page pointer.
    pub avic_backing_page: u64,
    /// +0x0e8 reserved.
    _reserved_0e8: u64,
    /// +0x0f0 AVIC logical table pointer.
    pub avic_logical_table: u64,
    /// +0x0f8 AVIC physical table pointer.
    pub avic_physical_table: u64,
    /// +0x100 reserved.
    _reserved_100: u64,
    /// +0x108 VMSA pointer (SEV-ES).
    pub vmsa_pa: u64,
    /// +0x110 reserved up to the host-reserved tail.
    _reserved_110: [u8; 0x3e0 - 0x110],
    /// +0x3e0 reserved for host usage.
    _host_reserved: [u8; 0x400 - 0x3e0],
}
const _: () = assert!(size_of::<ControlArea>() == 0x400);
const _: () = assert!(offset_of!(ControlArea, iopm_base_pa) == 0x040);
const _: () = assert!(offset_of!(ControlArea, guest_asid) == 0x058);
const _: () = assert!(offset_of!(ControlArea, exit_code) == 0x070);
const _: () = assert!(offset_of!(ControlArea, np_control) == 0x090);
const _: () = assert!(offset_of!(ControlArea, event_inj) == 0x0a8);
const _: () = assert!(offset_of!(ControlArea, n_cr3) == 0x0b0);
const _: () = assert!(offset_of!(ControlArea, next_rip) == 0x0c8);
const _: () = assert!(offset_of!(ControlArea, vmsa_pa) == 0x108);

/// VMCB state-save area (at VMCB offset 0x400). AMD APM vol. 2, Appendix B,
/// table B-2. Offsets below are relative to the save area.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct SaveArea {
    /// +0x000
    pub es: Segment,
    /// +0x010
    pub cs: Segment,
    /// +0x020
    pub ss: Segment,
    /// +0x030
    pub ds: Segment,
    /// +0x040 (VMLOAD/VMSAVE)
    pub fs: Segment,
    /// +0x050 (VMLOAD/VMSAVE)
    pub gs: Segment,
    /// +0x060 only base and limit are used.
    pub gdtr: Segment,
    /// +0x070 (VMLOAD/VMSAVE)
    pub ldtr: Segment,
    /// +0x080 only base and limit are used.
    pub idtr: Segment,
    /// +0x090 (VMLOAD/VMSAVE)
    pub tr: Segment,
    /// +0x0a0 reserved.
    _reserved_0a0: [u8; 0x0cb - 0x0a0],
    /// +0x0cb current privilege level.
    pub cpl: u8,
    /// +0x0cc reserved.
    _reserved_0cc: u32,
    /// +0x0d0 EFER (SVME must be set for VMRUN).
    pub efer: u64,
    /// +0x0d8 reserved.
    _reserved_0d8: [u8; 0x148 - 0x0d8],
    /// +0x148
    pub cr4: u64,
    /// +0x150
    pub cr3: u64,
    /// +0x158
    pub cr0: u64,
    /// +0x160
    pub dr7: u64,
    /// +0x168
    pub dr6: u64,
    /// +0x170
    pub rflags: u64,
    /// +0x178
    pub rip: u64,
    /// +0x180 reserved.
    _reserved_180: [u8; 0x1d8 - 0x180],
    /// +0x1d8
    pub rsp: u64,
    /// +0x1e0 S_CET.
    pub s_cet: u64,
    /// +0x1e8 SSP.
    pub ssp: u64,
    /// +0x1f0 ISST_ADDR.
    pub isst_addr: u64,
    /// +0x1f8 RAX (VMRUN loads it; the other GPRs are the hypervisor's job).
    pub rax: u64,
    /// +0x200 (VMLOAD/VMSAVE from here to SYSENTER_EIP)
    pub star: u64,
    /// +0x208
    pub lstar: u64,
    /// +0x210
    pub cstar: u64,
    /// +0x218
    pub sfmask: u64,
    /// +0x220
    pub kernel_gs_base: u64,
    /// +0x228
    pub sysenter_cs: u64,
    /// +0x230
    pub sysenter_esp: u64,
    /// +0x238
    pub sysenter_eip: u64,
    /// +0x240
    pub cr2: u64,
    /// +0x248 reserved.
    _reserved_248: [u8; 0x268 - 0x248],
    /// +0x268 guest PAT (used with nested paging).
    pub g_pat: u64,
    /// +0x270 DBGCTL.
    pub dbgctl: u64,
    /// +0x278 BR_FROM.
    pub br_from: u64,
    /// +0x280 BR_TO.
    pub br_to: u64,
    /// +0x288 LASTEXCPFROM.
    pub last_excp_from: u64,
    /// +0x290 LASTEXCPTO.
    pub last_excp_to: u64,
    /// +0x298 reserved up to the end of the page.
    _reserved_298: [u8; 0xc00 - 0x298],
}
const _: () = assert!(size_of::<SaveArea>() == 0xc00);
const _: () = assert!(offset_of!(SaveArea, cpl) == 0x0cb);
const _: () = assert!(offset_of!(SaveArea, efer) == 0x0d0);
const _: () = assert!(offset_of!(SaveArea, cr4) == 0x148);
const _: () = assert!(offset_of!(SaveArea, rip) == 0x178);
const _: () = assert!(offset_of!(SaveArea, rsp) == 0x1d8);
const _: () = assert!(offset_of!(SaveArea, rax) == 0x1f8);
const _: () = assert!(offset_of!(SaveArea, cr2) == 0x240);
const _: () = assert!(offset_of!(SaveArea, g_pat) == 0x268);

/// The whole VMCB page.
#[repr(C, align(4096))]
pub struct Vmcb {
    /// +0x000
    pub control: ControlArea,
    /// +0x400
    pub save: SaveArea,
}
const _: () = assert!(size_of::<Vmcb>() == 0x1000);
const _: () = assert!(offset_of!(Vmcb, save) == 0x400);

// Intercept bits, AMD APM vol. 2, Appendix B, table B-1 (offsets 0x00c/0x010).
/// misc1 bit 0: physical INTR.
pub const INTERCEPT_INTR: u32 = 1 << 0;
/// misc1 bit 1: physical NMI.
pub const INTERCEPT_NMI: u32 = 1 << 1;
/// misc1 bit 4: VINTR, a virtual interrupt about to be taken (15.21.4).
pub const INTERCEPT_VINTR: u32 = 1 << 4;
/// misc1 bit 20: IRET.
pub const INTERCEPT_IRET: u32 = 1 << 20;
/// misc1 bit 18: CPUID.
pub const INTERCEPT_CPUID: u32 = 1 << 18;
/// misc1 bit 22: INVD.
pub const INTERCEPT_INVD: u32 = 1 << 22;
/// misc1 bit 24: HLT.
pub const INTERCEPT_HLT: u32 = 1 << 24;
/// misc1 bit 27: IN/OUT via the IOPM.
pub const INTERCEPT_IOIO_PROT: u32 = 1 << 27;
/// misc1 bit 28: RDMSR/WRMSR via the MSRPM.
pub const INTERCEPT_MSR_PROT: u32 = 1 << 28;
/// misc1 bit 31: shutdown (triple fault).
pub const INTERCEPT_SHUTDOWN: u32 = 1 << 31;
/// `intercept_exceptions` bit for #DF (vector 8). AMD APM vol. 2, 15.12.
pub const INTERCEPT_EXC_DF: u32 = 1 << 8;
/// `intercept_exceptions` bit for #GP (vector 13).
pub const INTERCEPT_EXC_GP: u32 = 1 << 13;
/// misc2 bit 0: VMRUN (mandatory: VMRUN fails without it).
pub const INTERCEPT_VMRUN: u32 = 1 << 0;
/// misc2 bit 1: VMMCALL.
pub const INTERCEPT_VMMCALL: u32 = 1 << 1;
/// misc2 bit 2: VMLOAD.
pub const INTERCEPT_VMLOAD: u32 = 1 << 2;
/// misc2 bit 3: VMSAVE.
pub const INTERCEPT_VMSAVE: u32 = 1 << 3;
/// misc2 bit 4: STGI.
pub const INTERCEPT_STGI: u32 = 1 << 4;
/// misc2 bit 5: CLGI.
pub const INTERCEPT_CLGI: u32 = 1 << 5;
/// misc2 bit 6: SKINIT.
pub const INTERCEPT_SKINIT: u32 = 1 << 6;
/// misc2 bit 10: MONITOR.
pub const INTERCEPT_MONITOR: u32 = 1 << 10;
/// misc2 bit 11: MWAIT.
pub const INTERCEPT_MWAIT: u32 = 1 << 11;
/// misc2 bit 12: MWAIT when armed.
pub const INTERCEPT_MWAIT_ARMED: u32 = 1 << 12;
/// misc2 bit 13: XSETBV.
pub const INTERCEPT_XSETBV: u32 = 1 << 13;
/// misc1 bit 26: INVLPGA.
pub const INTERCEPT_INVLPGA: u32 = 1 << 26;

/// int_control bit 24: V_INTR_MASKING. With it, the guest's RFLAGS.IF masks
/// only virtual interrupts; physical ones stay under the host's IF and GIF
/// (AMD APM vol. 2, 15.21.1), so a guest running with IF=0 is still
/// preempted by the host timer.
pub const V_INTR_MASKING: u64 = 1 << 24;
/// int_control bit 8: V_IRQ, a virtual interrupt is pending (15.21.4).
pub const V_IRQ: u64 = 1 << 8;
/// int_control bits 19:16: V_INTR_PRIO, the pending virtual interrupt's
/// priority (compared with V_TPR unless V_IGN_TPR).
pub const V_INTR_PRIO_MAX: u64 = 0xf << 16;
/// int_control bit 20: V_IGN_TPR, the virtual interrupt ignores V_TPR.
pub const V_IGN_TPR: u64 = 1 << 20;
/// np_control bit 0: nested paging enable (AMD APM vol. 2, 15.25.3).
pub const NP_ENABLE: u64 = 1 << 0;

/// TLB_CONTROL values (AMD APM vol. 2, 15.16.1).
pub use hvcore::svm::entry::{TLB_CONTROL_FLUSH_ALL, TLB_CONTROL_FLUSH_ASID, TLB_CONTROL_NONE};
