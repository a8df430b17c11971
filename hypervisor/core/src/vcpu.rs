//! The vendor-neutral virtual CPU.
//!
//! A backend (SVM in `hypervisor::svm`, VMX in `hypervisor::vmx`) implements
//! [`Vcpu`]: it enters the guest, and on the way out decodes its own exit
//! codes into one [`VmExit`]. Exit *handling* is written once, in
//! [`crate::exit`], against this trait; nothing outside the backends ever sees
//! a VMCB, a VMCS or an exit qualification.
//!
//! Register contract: [`Vcpu::regs`] is the authoritative copy of the general
//! registers, RIP, RSP and RFLAGS while the vCPU is outside the guest. A
//! backend loads it before entry and stores it after exit (SVM keeps
//! RAX/RSP/RIP/RFLAGS in the VMCB; VMX keeps RSP/RIP/RFLAGS in the VMCS).

use crate::addr::{Gpa, Hpa};
use core::fmt;
/// The register file (general registers, RIP, RSP, RFLAGS) and the state
/// record, from the bottom crate the migration stream shares.
pub use vmstate::{Regs, VcpuState};

/// Direction of a port I/O access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoDir {
    /// `in`: the guest reads from the port.
    In,
    /// `out`: the guest writes to the port.
    Out,
}

/// A decoded port I/O exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoAccess {
    /// Port number.
    pub port: u16,
    /// Access width in bytes: 1, 2 or 4.
    pub size: u8,
    /// Direction.
    pub dir: IoDir,
    /// `ins`/`outs` (string form). Not emulated: the handler injects #UD.
    pub string: bool,
    /// `rep` prefix present.
    pub rep: bool,
}

/// What a nested page fault was trying to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Access {
    /// The faulting access was a write.
    pub write: bool,
    /// The faulting access was an instruction fetch.
    pub exec: bool,
    /// The translation existed (a permission fault, e.g. write to a
    /// write-protected page), rather than being absent.
    pub present: bool,
}

/// Why the guest left. One enum for every vendor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// Port I/O. For `Out` the value is in `regs().rax` (low `size` bytes).
    Io(IoAccess),
    /// CPUID with leaf `regs().rax` and subleaf `regs().rcx` (copied here).
    Cpuid { leaf: u32, subleaf: u32 },
    /// RDMSR of `msr`.
    MsrRead { msr: u32 },
    /// WRMSR of `value` to `msr`.
    MsrWrite { msr: u32, value: u64 },
    /// HLT.
    Hlt,
    /// VMMCALL / VMCALL. Number in RAX, arguments in RDI, RSI, RDX, R10.
    Hypercall,
    /// Nested (NPT/EPT) page fault.
    NestedFault { gpa: Gpa, access: Access },
    /// EPT misconfiguration: a hypervisor bug in the nested tables.
    NestedMisconfig { gpa: Gpa },
    /// Triple fault / shutdown: the guest is dead.
    Shutdown,
    /// A physical interrupt arrived for the host (e.g. the preemption timer).
    ExternalInterrupt,
    /// The guest became able to take an external interrupt (the window
    /// [`Vcpu::set_event_windows`] asked for: SVM VINTR intercept, VMX
    /// interrupt-window exiting). The backend has closed the window.
    InterruptWindow,
    /// The guest became able to take an NMI (SVM: its IRET; VMX: NMI-window
    /// exiting). The backend has closed the window.
    NmiWindow,
    /// The CPU refused to enter the guest.
    EntryFailed { reason: EntryFailure },
    /// An exit code this backend does not decode.
    Unknown { raw: u64 },
}

/// Why a VM entry failed, as far as the backend can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryFailure {
    /// Vendor-neutral summary.
    pub what: &'static str,
    /// Raw vendor code (SVM exit code, VMX instruction error / exit reason).
    pub raw: u64,
    /// The failing VMCS field or VMCB offset when known.
    pub field: Option<u64>,
}

impl fmt::Display for EntryFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {:#x}", self.what, self.raw)?;
        if let Some(field) = self.field {
            write!(f, ", field {field:#x}")?;
        }
        write!(f, ")")
    }
}

/// An MSR the backend does not keep: the handler injects #GP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownMsr(pub u32);

/// Why a backend refused a [`VcpuState`] in [`Vcpu::restore_state`]
/// (nothing was changed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateError {
    /// The field or check that failed.
    pub what: &'static str,
    /// The offending value.
    pub value: u64,
}

impl StateError {
    /// `what` with `value`.
    pub fn new(what: &'static str, value: u64) -> Self {
        Self { what, value }
    }
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vCPU state refused: {} ({:#x})", self.what, self.value)
    }
}

/// The state a vCPU starts in: 64-bit long mode, paging on, interrupts off.
/// The VMM builds the guest page tables and GDT in guest memory first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongModeEntry {
    /// Entry point.
    pub rip: u64,
    /// Initial stack pointer.
    pub rsp: u64,
    /// First argument register (boot parameters GPA).
    pub rdi: u64,
    /// Second argument register (Linux: the zero page GPA).
    pub rsi: u64,
    /// Guest CR3: GPA of the PML4.
    pub cr3: Gpa,
    /// Guest GDT base (GPA) and limit.
    pub gdt_base: Gpa,
    pub gdt_limit: u16,
    /// CS: a 64-bit code descriptor of that GDT ([`SELECTORS_ABI`] for
    /// the project's guests, [`SELECTORS_LINUX`] for Linux's boot
    /// protocol).
    pub code_selector: u16,
    /// DS, ES, SS, FS, GS: a flat data descriptor of that GDT.
    pub data_selector: u16,
}

/// Code and data selectors of the project's guest ABI (`abi.rs`): 0x08
/// 64-bit code, 0x10 data.
pub const SELECTORS_ABI: (u16, u16) = (0x08, 0x10);
/// Code and data selectors of Linux's 64-bit boot protocol
/// (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol": `__BOOT_CS`
/// 0x10, `__BOOT_DS` 0x18).
pub const SELECTORS_LINUX: (u16, u16) = (0x10, 0x18);

/// Whether the guest could take an event injected now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventReadiness {
    /// A maskable external interrupt: RFLAGS.IF = 1, no STI/MOV-SS
    /// interrupt shadow, and no event already queued for the next entry.
    pub interrupt: bool,
    /// An NMI: NMIs not blocked (no NMI handler running), no shadow that
    /// blocks them, no event already queued.
    pub nmi: bool,
}

/// What the MMIO emulator needs to read the guest's instruction: the
/// registers that select and root its paging, and how CS decodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestMode {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    /// EFER as the guest sees it (LMA included).
    pub efer: u64,
    /// CS.L: 64-bit code.
    pub cs_long: bool,
    /// CS.D: 32-bit default operand size (when not 64-bit).
    pub cs_db: bool,
}

/// Optional hardware features, queried explicitly (never `cfg`-gated).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuCaps {
    /// The CPU reports the next RIP on exits (SVM NRIPS; always on VMX).
    pub next_rip: bool,
    /// TLB flush limited to this guest's ASID/VPID is available.
    pub flush_by_asid: bool,
    /// Page-modification logging (Intel PML) is available.
    pub pml: bool,
}

/// Physical CPU vendor, as reported to management.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Amd,
    Intel,
}

/// One virtual CPU of one VM.
pub trait Vcpu {
    /// Enter the guest and run until the next exit.
    fn run(&mut self) -> VmExit;
    /// Registers (authoritative while outside the guest).
    fn regs(&self) -> &Regs;
    /// Mutable registers.
    fn regs_mut(&mut self) -> &mut Regs;
    /// Advance RIP past the instruction that caused the last exit. Uses the
    /// CPU-provided next RIP where available, otherwise the length the backend
    /// decoded in software (no NRIPS under QEMU TCG).
    fn skip_instruction(&mut self);
    /// Queue a hardware exception for delivery on the next entry.
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>);
    /// Queue external interrupt `vector` for delivery on the next entry
    /// (SVM EVENTINJ type INTR, VMX entry interruption type external).
    /// The CPU delivers it whatever the guest's RFLAGS.IF: call only when
    /// [`Vcpu::readiness`] says `interrupt`.
    fn inject_interrupt(&mut self, vector: u8);
    /// Queue an NMI for delivery on the next entry; NMIs are blocked until
    /// the guest's IRET. Call only when [`Vcpu::readiness`] says `nmi`.
    fn inject_nmi(&mut self);
    /// Whether the guest could take an external interrupt or an NMI now
    /// (between runs).
    fn readiness(&self) -> EventReadiness;
    /// Ask for an exit ([`VmExit::InterruptWindow`] / [`VmExit::NmiWindow`])
    /// as soon as the guest can take an interrupt / an NMI; `false` closes
    /// the window. The backend closes a window itself when it exits for
    /// it.
    fn set_event_windows(&mut self, interrupt: bool, nmi: bool);
    /// The guest's paging registers and code mode (between runs).
    fn guest_mode(&self) -> GuestMode;
    /// Read an architectural MSR the backend keeps in its guest state.
    fn read_msr(&self, msr: u32) -> Result<u64, UnknownMsr>;
    /// Write an architectural MSR the backend keeps in its guest state.
    fn write_msr(&mut self, msr: u32, value: u64) -> Result<(), UnknownMsr>;
    /// Put the vCPU into 64-bit long mode at `entry`.
    fn reset_long_mode(&mut self, entry: &LongModeEntry);
    /// Flush guest translations derived from the nested tables before the
    /// next entry (after permissions were reduced).
    fn flush_nested_tlb(&mut self);
    /// Host-physical root of this vCPU's nested page table.
    fn nested_root(&self) -> Hpa;
    /// Optional features of this vCPU's backend.
    fn caps(&self) -> VcpuCaps;
    /// Everything the guest can observe of this vCPU, vendor-neutral (call
    /// between runs). `id` is left 0: the caller numbers its vCPUs.
    fn save_state(&self) -> VcpuState;
    /// Load a saved state (between runs). The values are checked first; on
    /// `Err` the vCPU is unchanged. The guest's TSC continues from
    /// `state.tsc`.
    fn restore_state(&mut self, state: &VcpuState) -> Result<(), StateError>;
}
