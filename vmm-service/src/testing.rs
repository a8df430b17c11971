//! Test doubles: guest memory over a `Vec<u8>` with a dirty record, a vCPU
//! that keeps registers and counts what was done to it, a partition that
//! replays a scripted guest, and a host with a simulated clock that captures
//! console output.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::Cell;
use hvcore::addr::{Gpa, Hpa, PAGE_SIZE};
use hvcore::host::{
    CpuidResult, CpuidSource, DirtyMode, Host, HostError, Partition, PartitionStats,
};
use hvcore::mem::{check_guest_range, GuestMemory, MemError};
use hvcore::vcpu::{LongModeEntry, Regs, UnknownMsr, Vcpu, VcpuCaps, Vendor, VmExit};

/// Guest RAM in a vector; records written frames while logging is on.
pub struct FakeMemory {
    bytes: Vec<u8>,
    pub logging: bool,
    pub dirty: BTreeSet<u64>,
}

impl FakeMemory {
    pub fn new(ram_bytes: u64) -> Self {
        Self {
            bytes: vec![0; ram_bytes as usize],
            logging: false,
            dirty: BTreeSet::new(),
        }
    }
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// A write by the guest itself (hardware write protection records it).
    pub fn guest_write(&mut self, gpa: Gpa, data: &[u8]) {
        self.write(gpa, data).expect("guest write inside RAM");
    }
    /// A write that escapes the dirty log (simulates a hypervisor bug).
    pub fn write_unlogged(&mut self, gpa: Gpa, data: &[u8]) {
        let s = gpa.0 as usize;
        self.bytes[s..s + data.len()].copy_from_slice(data);
    }
}

impl GuestMemory for FakeMemory {
    fn ram_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemError> {
        check_guest_range(gpa, buf.len() as u64, self.ram_bytes())?;
        let s = gpa.0 as usize;
        buf.copy_from_slice(&self.bytes[s..s + buf.len()]);
        Ok(())
    }
    fn write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), MemError> {
        check_guest_range(gpa, data.len() as u64, self.ram_bytes())?;
        let s = gpa.0 as usize;
        self.bytes[s..s + data.len()].copy_from_slice(data);
        if self.logging && !data.is_empty() {
            let first = gpa.0 / PAGE_SIZE;
            let last = (gpa.0 + data.len() as u64 - 1) / PAGE_SIZE;
            self.dirty.extend(first..=last);
        }
        Ok(())
    }
}

/// A vCPU that only keeps state.
#[derive(Default)]
pub struct FakeVcpu {
    pub regs: Regs,
    pub skips: u64,
    pub injected: Vec<(u8, Option<u32>)>,
    pub msrs: BTreeMap<u32, u64>,
    pub entry: Option<LongModeEntry>,
}

impl Vcpu for FakeVcpu {
    fn run(&mut self) -> VmExit {
        VmExit::Hlt
    }
    fn regs(&self) -> &Regs {
        &self.regs
    }
    fn regs_mut(&mut self) -> &mut Regs {
        &mut self.regs
    }
    fn skip_instruction(&mut self) {
        self.skips += 1;
        self.regs.rip += 3;
    }
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        self.injected.push((vector, error_code));
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
        self.entry = Some(*entry);
        self.regs = Regs {
            rip: entry.rip,
            rsp: entry.rsp,
            rdi: entry.rdi,
            rflags: 0x2,
            ..Regs::default()
        };
    }
    fn flush_nested_tlb(&mut self) {}
    fn nested_root(&self) -> Hpa {
        Hpa(0)
    }
    fn caps(&self) -> VcpuCaps {
        VcpuCaps::default()
    }
}

/// A host CPU that reports SVM and VMX and nothing else interesting.
pub struct FakeCpuid;

impl CpuidSource for FakeCpuid {
    fn host_cpuid(&self, leaf: u32, _subleaf: u32) -> CpuidResult {
        match leaf {
            1 => CpuidResult {
                ecx: 1 << 5,
                ..CpuidResult::default()
            },
            0x8000_0001 => CpuidResult {
                ecx: 1 << 2,
                ..CpuidResult::default()
            },
            _ => CpuidResult::default(),
        }
    }
}

/// The scripted guest: called once per `Partition::run` with the vCPU and
/// memory, returns the exit to report.
pub type Program = Box<dyn FnMut(&mut FakeVcpu, &mut FakeMemory) -> VmExit>;

/// A guest that spins until the timer preempts it, for ever.
pub fn spinner() -> Program {
    Box::new(|_, _| VmExit::ExternalInterrupt)
}

/// A guest that writes `text` to COM1 one byte per exit, then reports
/// `HC_TEST_RESULT` ok.
pub fn printer(text: &'static str) -> Program {
    let mut i = 0;
    Box::new(move |v, _| {
        use hvcore::vcpu::{IoAccess, IoDir};
        if let Some(&b) = text.as_bytes().get(i) {
            i += 1;
            v.regs.rax = u64::from(b);
            VmExit::Io(IoAccess {
                port: 0x3f8,
                size: 1,
                dir: IoDir::Out,
                string: false,
                rep: false,
            })
        } else {
            v.regs.rax = hvcore::abi::HC_TEST_RESULT;
            (v.regs.rdi, v.regs.rsi, v.regs.rdx) = (0, 0, 0);
            VmExit::Hypercall
        }
    })
}

/// A partition running a [`Program`].
pub struct FakePartition {
    pub vcpu: FakeVcpu,
    pub mem: FakeMemory,
    pub program: Program,
    pub runs: u64,
    /// Shared simulated clock, advanced by `ns_per_run` on every run.
    pub clock: Rc<Cell<u64>>,
    pub ns_per_run: u64,
    pub dropped: Option<Rc<Cell<u64>>>,
}

impl FakePartition {
    pub fn new(ram_bytes: u64) -> Self {
        Self {
            vcpu: FakeVcpu::default(),
            mem: FakeMemory::new(ram_bytes),
            program: spinner(),
            runs: 0,
            clock: Rc::new(Cell::new(0)),
            ns_per_run: 1000,
            dropped: None,
        }
    }
}

impl Drop for FakePartition {
    fn drop(&mut self) {
        if let Some(d) = &self.dropped {
            d.set(d.get() + 1);
        }
    }
}

impl Partition for FakePartition {
    fn ram_bytes(&self) -> u64 {
        self.mem.ram_bytes()
    }
    fn memory(&mut self) -> &mut dyn GuestMemory {
        &mut self.mem
    }
    fn vcpu(&mut self) -> &mut dyn Vcpu {
        &mut self.vcpu
    }
    fn run(&mut self) -> VmExit {
        self.runs += 1;
        self.clock.set(self.clock.get() + self.ns_per_run);
        (self.program)(&mut self.vcpu, &mut self.mem)
    }
    fn enable_dirty_log(&mut self, _mode: DirtyMode) -> Result<(), HostError> {
        self.mem.logging = true;
        self.mem.dirty.clear();
        Ok(())
    }
    fn disable_dirty_log(&mut self) {
        self.mem.logging = false;
    }
    fn dirty_log_enabled(&self) -> bool {
        self.mem.logging
    }
    fn collect_dirty(&mut self, bitmap: &mut [u64]) -> Result<u64, HostError> {
        let n = self.mem.dirty.len() as u64;
        for gfn in core::mem::take(&mut self.mem.dirty) {
            bitmap[(gfn / 64) as usize] |= 1 << (gfn % 64);
        }
        Ok(n)
    }
    fn stats(&self) -> PartitionStats {
        PartitionStats {
            exits: self.runs,
            dirty_faults: 0,
        }
    }
}

/// A host with a simulated clock and captured console.
pub struct FakeHost {
    pub cmdline: String,
    pub module: Option<Vec<u8>>,
    pub console: String,
    pub clock: Rc<Cell<u64>>,
    /// Clock advance per guest run of partitions created here.
    pub ns_per_run: u64,
    /// Programs for the next partitions, in creation order (then spinners).
    pub programs: VecDeque<Program>,
    pub created: Vec<u64>,
    pub dropped: Rc<Cell<u64>>,
    pub fail_create: bool,
    pub raw_ns_per_roundtrip: u64,
}

impl FakeHost {
    pub fn new() -> Self {
        Self {
            cmdline: String::new(),
            module: Some(crate::loader::build::kernel()),
            console: String::new(),
            clock: Rc::new(Cell::new(1_000_000)),
            ns_per_run: 1000,
            programs: VecDeque::new(),
            created: Vec::new(),
            dropped: Rc::new(Cell::new(0)),
            fail_create: false,
            raw_ns_per_roundtrip: 10_000,
        }
    }
    /// Console lines.
    pub fn lines(&self) -> Vec<&str> {
        self.console.lines().collect()
    }
}

impl CpuidSource for FakeHost {
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        FakeCpuid.host_cpuid(leaf, subleaf)
    }
}

impl Host for FakeHost {
    fn vendor(&self) -> Vendor {
        Vendor::Amd
    }
    fn cmdline(&self) -> &str {
        &self.cmdline
    }
    fn module(&self, index: usize) -> Option<&[u8]> {
        (index == 0).then_some(self.module.as_deref()).flatten()
    }
    fn create_partition(&mut self, ram_bytes: u64) -> Result<Box<dyn Partition>, HostError> {
        if self.fail_create {
            return Err(HostError::NoVirtualization);
        }
        self.created.push(ram_bytes);
        let mut p = FakePartition::new(ram_bytes);
        p.clock = self.clock.clone();
        p.ns_per_run = self.ns_per_run;
        p.dropped = Some(self.dropped.clone());
        if let Some(prog) = self.programs.pop_front() {
            p.program = prog;
        }
        Ok(Box::new(p))
    }
    fn now_ns(&self) -> u64 {
        self.clock.get()
    }
    fn console_write(&mut self, s: &str) {
        self.console.push_str(s);
    }
    fn memory_stats(&self) -> (u64, u64) {
        (1 << 30, 1 << 29)
    }
    fn bench_raw_roundtrips(&mut self, iterations: u64) -> Result<u64, HostError> {
        let ns = iterations * self.raw_ns_per_roundtrip;
        self.clock.set(self.clock.get() + ns);
        Ok(ns)
    }
    fn shutdown(&mut self, code: u8) -> ! {
        panic!("shutdown({code})")
    }
}
