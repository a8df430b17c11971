//! [`FakeVcpu`] and [`FakeCpuid`]: a recording vCPU and a table-driven
//! CPUID source.

use crate::addr::Hpa;
use crate::host::{CpuidResult, CpuidSource};
use crate::vcpu::{
    EventReadiness, GuestMode, LongModeEntry, Regs, StateError, UnknownMsr, Vcpu, VcpuCaps,
    VcpuState, VmExit,
};
use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;

/// A vCPU that runs nothing: [`Vcpu::run`] returns queued exits, every
/// side effect is recorded.
#[derive(Clone, Debug)]
pub struct FakeVcpu {
    pub regs: Regs,
    /// Exits `run` returns in order; when empty, `run` returns `Hlt`.
    pub exits: VecDeque<VmExit>,
    /// Bytes `skip_instruction` adds to RIP.
    pub insn_len: u64,
    /// Calls of `skip_instruction`.
    pub skips: u32,
    /// Exceptions queued, in order.
    pub injected: Vec<(u8, Option<u32>)>,
    /// External interrupt vectors queued, in order.
    pub interrupts: Vec<u8>,
    /// NMIs queued.
    pub nmis: u32,
    /// An event is queued for the next `run` (which delivers it).
    pub event_queued: bool,
    /// An STI/MOV-SS interrupt shadow is in effect.
    pub shadow: bool,
    /// The guest runs its NMI handler (until a test clears it).
    pub nmi_blocked: bool,
    /// The windows last asked for: (interrupt, NMI).
    pub windows: (bool, bool),
    /// What `guest_mode` returns.
    pub mode: GuestMode,
    /// MSRs the "backend" keeps; others answer `UnknownMsr`.
    pub msrs: BTreeMap<u32, u64>,
    /// Calls of `flush_nested_tlb`.
    pub flushes: u32,
    /// Calls of `run`.
    pub runs: u32,
    /// Last `reset_long_mode` argument.
    pub reset: Option<LongModeEntry>,
    pub nested_root: Hpa,
    pub caps: VcpuCaps,
    /// What `save_state` returns besides the registers (which come from
    /// `regs`); `restore_state` stores here after the shared checks.
    pub state: VcpuState,
}

impl Default for FakeVcpu {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeVcpu {
    /// A vCPU at RIP 0x1000 with instruction length 2 that keeps EFER, PAT,
    /// the SYSCALL/SYSENTER MSRs, the segment bases, TSC and TSC_AUX.
    pub fn new() -> Self {
        use crate::msr::*;
        let msrs = [
            (IA32_EFER, 0x500),
            (IA32_PAT, 0x0007_0406_0007_0406),
            (IA32_TSC, 0),
            (IA32_TSC_AUX, 0),
            (IA32_STAR, 0),
            (IA32_LSTAR, 0),
            (IA32_CSTAR, 0),
            (IA32_FMASK, 0),
            (IA32_FS_BASE, 0),
            (IA32_GS_BASE, 0),
            (IA32_KERNEL_GS_BASE, 0),
            (IA32_SYSENTER_CS, 0),
            (IA32_SYSENTER_ESP, 0),
            (IA32_SYSENTER_EIP, 0),
        ]
        .into_iter()
        .collect();
        Self {
            regs: Regs {
                rip: 0x1000,
                ..Regs::default()
            },
            exits: VecDeque::new(),
            insn_len: 2,
            skips: 0,
            injected: Vec::new(),
            interrupts: Vec::new(),
            nmis: 0,
            event_queued: false,
            shadow: false,
            nmi_blocked: false,
            windows: (false, false),
            mode: GuestMode::default(),
            msrs,
            flushes: 0,
            runs: 0,
            reset: None,
            nested_root: Hpa(0),
            caps: VcpuCaps::default(),
            state: VcpuState::default(),
        }
    }
}

impl Vcpu for FakeVcpu {
    fn run(&mut self) -> VmExit {
        self.runs += 1;
        self.event_queued = false;
        self.exits.pop_front().unwrap_or(VmExit::Hlt)
    }
    fn regs(&self) -> &Regs {
        &self.regs
    }
    fn regs_mut(&mut self) -> &mut Regs {
        &mut self.regs
    }
    fn skip_instruction(&mut self) {
        self.skips += 1;
        self.regs.rip = self.regs.rip.wrapping_add(self.insn_len);
    }
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        self.injected.push((vector, error_code));
        self.event_queued = true;
    }
    fn inject_interrupt(&mut self, vector: u8) {
        self.interrupts.push(vector);
        self.event_queued = true;
    }
    fn inject_nmi(&mut self) {
        self.nmis += 1;
        self.nmi_blocked = true;
        self.event_queued = true;
    }
    fn readiness(&self) -> EventReadiness {
        const IF: u64 = 1 << 9;
        EventReadiness {
            interrupt: self.regs.rflags & IF != 0 && !self.shadow && !self.event_queued,
            nmi: !self.nmi_blocked && !self.shadow && !self.event_queued,
        }
    }
    fn set_event_windows(&mut self, interrupt: bool, nmi: bool) {
        self.windows = (interrupt, nmi);
    }
    fn guest_mode(&self) -> GuestMode {
        self.mode
    }
    fn read_msr(&self, msr: u32) -> Result<u64, UnknownMsr> {
        self.msrs.get(&msr).copied().ok_or(UnknownMsr(msr))
    }
    fn write_msr(&mut self, msr: u32, value: u64) -> Result<(), UnknownMsr> {
        match self.msrs.get_mut(&msr) {
            Some(v) => {
                *v = value;
                Ok(())
            }
            None => Err(UnknownMsr(msr)),
        }
    }
    fn reset_long_mode(&mut self, entry: &LongModeEntry) {
        self.reset = Some(*entry);
        self.state = crate::vcpu_state::long_mode_state(entry);
        self.regs = crate::vcpu_state::long_mode_regs(entry);
    }
    fn flush_nested_tlb(&mut self) {
        self.flushes += 1;
    }
    fn nested_root(&self) -> Hpa {
        self.nested_root
    }
    fn caps(&self) -> VcpuCaps {
        self.caps
    }
    fn save_state(&self) -> VcpuState {
        let mut s = self.state.clone();
        s.regs = self.regs;
        s.interrupt_shadow = self.shadow;
        s.nmi_blocked = self.nmi_blocked;
        s
    }
    fn restore_state(&mut self, state: &VcpuState) -> Result<(), StateError> {
        crate::vcpu_state::check(state)?;
        self.state = state.clone();
        self.regs = state.regs;
        self.shadow = state.interrupt_shadow;
        self.nmi_blocked = state.nmi_blocked;
        Ok(())
    }
}

/// A [`CpuidSource`] answering from a table; absent leaves read zero.
#[derive(Clone, Debug, Default)]
pub struct FakeCpuid {
    /// `(leaf, subleaf)` -> result.
    pub leaves: BTreeMap<(u32, u32), CpuidResult>,
    /// What `tsc_khz` answers.
    pub tsc_khz: u64,
}

impl FakeCpuid {
    /// Every feature bit set in leaves 1, 5, 7, 0xA, 0x8000_0001 and
    /// 0x8000_000A, plus a hypervisor leaf of some lower hypervisor: a
    /// worst case for the policy to filter.
    pub fn all_ones() -> Self {
        let ones = CpuidResult {
            eax: !0,
            ebx: !0,
            ecx: !0,
            edx: !0,
        };
        let mut leaves: BTreeMap<(u32, u32), CpuidResult> = [
            1,
            5,
            7,
            0xa,
            0x4000_0000,
            0x4000_0001,
            0x8000_0001,
            0x8000_000a,
        ]
        .into_iter()
        .map(|l| ((l, 0), ones))
        .collect();
        // Leaf 0: highest basic leaf 0xd (so 1, 5, 7 and 0xa are real).
        leaves.insert((0, 0), CpuidResult { eax: 0xd, ..ones });
        Self { leaves, tsc_khz: 0 }
    }
}

impl CpuidSource for FakeCpuid {
    fn tsc_khz(&self) -> u64 {
        self.tsc_khz
    }
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        self.leaves
            .get(&(leaf, subleaf))
            .copied()
            .unwrap_or_default()
    }
}
