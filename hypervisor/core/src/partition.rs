//! The vendor-neutral partition logic: the run loop that resolves
//! dirty-log write faults without leaving the partition, and dirty logging
//! in both modes (nested-page write protection; Intel PML), with the TLB
//! flush every permission change requires.
//!
//! The platform's `GenericPartition` owns the guest RAM, the nested table
//! and the vCPU; for each call it lends them to [`PartitionCore`] as a
//! [`Nested`] (plus the platform's [`PhysMem`] and [`FrameAlloc`]), so the
//! whole protocol runs on the host in the tests below with doubles.
//!
//! Invariants (each step below keeps them):
//! * after any operation that reduced nested-table permissions (enable,
//!   collect-and-clear) or reset the hardware dirty flags (PML arming), the
//!   vCPU has been told to flush ([`Vcpu::flush_nested_tlb`]) before it
//!   runs again: on hardware a stale writable translation would let the
//!   guest write a page without a fault, i.e. without the dirty log seeing
//!   it;
//! * a resolved write fault only *grows* permissions: no flush, unless the
//!   frame was writable already, i.e. the fault came from a stale
//!   read-only translation the CPU still holds: then a flush drops it
//!   (Intel documents that an EPT violation invalidates the faulting
//!   mapping itself, SDM vol. 3C, 29.4.3.1; the flush makes the outcome
//!   independent of the vendor, and such faults are rare);
//! * in PML mode the dirty set and its semantics are the same as with
//!   write protection: hardware-logged frames join [`DirtyLog`]'s dirty set
//!   before collection, and exactly the collected frames are re-armed.

use crate::addr::{Gfn, PAGE_SIZE};
use crate::dirty::{DirtyLog, FaultOutcome};
use crate::host::{DirtyMode, HostError, PartitionStats};
use crate::mem::{FrameAlloc, PhysMem};
use crate::npt::{EntryFormat, NestedPageTable, NptError};
use crate::vcpu::{Vcpu, VmExit};
use alloc::vec;

/// What a backend's vCPU adds to [`Vcpu`] for the partition: its
/// nested-entry format and hardware dirty logging. A backend without PML
/// answers [`PartitionVcpu::pml_arm`] with an error and has nothing to
/// drain or stop (it reports `caps().pml == false`, so the partition never
/// asks).
pub trait PartitionVcpu: Vcpu {
    /// Nested page-table entry format (AMD NPT, Intel EPT).
    type Format: EntryFormat;
    /// Start hardware dirty logging if it is off, then arm every frame set
    /// in `gfns` (bit n = guest frame n), which the dirty log has just
    /// write-protected: give write access back with the hardware's dirty
    /// tracking reset, so the next write is logged without a fault. Queues
    /// the flush that makes the reset dirty flags visible to the CPU.
    fn pml_arm(
        &mut self,
        npt: &NestedPageTable<Self::Format>,
        mem: &mut dyn PhysMem,
        frames: &mut dyn FrameAlloc,
        gfns: &[u64],
    ) -> Result<(), HostError>;
    /// Hand every frame the hardware logged as written since the last
    /// drain to `mark`.
    fn pml_drain(&mut self, mark: &mut dyn FnMut(Gfn));
    /// Stop hardware dirty logging.
    fn pml_stop(&mut self, frames: &mut dyn FrameAlloc);
    /// Exits the backend handled inside `Vcpu::run` without returning
    /// (e.g. a full PML log drained), counted into
    /// [`PartitionStats::exits`].
    fn resolved_exits(&self) -> u64;
}

/// The parts of a partition one operation works on, lent by the platform.
pub struct Nested<'a, V: PartitionVcpu> {
    pub vcpu: &'a mut V,
    pub npt: &'a mut NestedPageTable<V::Format>,
    /// The dirty log (the platform's guest-memory writes mark it too).
    pub dirty: &'a mut DirtyLog,
    pub mem: &'a mut dyn PhysMem,
    pub frames: &'a mut dyn FrameAlloc,
}

/// Why a dirty-log operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLogError {
    /// The nested table could not be updated (the platform names the
    /// memory it lacked).
    Table(NptError),
    /// The backend refused (no PML, no memory for its log page) or the
    /// caller's bitmap is too small.
    Backend(HostError),
}

impl From<NptError> for DirtyLogError {
    fn from(e: NptError) -> Self {
        DirtyLogError::Table(e)
    }
}

/// The partition's own state besides its parts: the dirty-logging mode
/// and the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartitionCore {
    /// Dirty logging runs in [`DirtyMode::Pml`]: tracked frames stay
    /// writable and the backend's log feeds the dirty set.
    pml: bool,
    stats: PartitionStats,
}

impl PartitionCore {
    /// A partition that has not run and logs nothing.
    pub const fn new() -> Self {
        Self {
            pml: false,
            stats: PartitionStats {
                exits: 0,
                dirty_faults: 0,
            },
        }
    }

    /// Whether dirty logging is in PML mode.
    pub fn pml(&self) -> bool {
        self.pml
    }

    /// Run the vCPU until an exit the partition does not resolve itself:
    /// write faults on frames the dirty log tracks are recorded, write
    /// access is given back, and the guest re-enters at the faulting write.
    pub fn run<V: PartitionVcpu>(&mut self, n: Nested<'_, V>) -> VmExit {
        loop {
            let exit = n.vcpu.run();
            self.stats.exits += 1;
            if let VmExit::NestedFault { gpa, access } = exit {
                if access.write && access.present {
                    let stale = n.npt.translate(n.mem, gpa).is_some_and(|t| t.writable);
                    match n.dirty.on_write_fault(n.npt, n.mem, n.frames, gpa) {
                        Ok(FaultOutcome::Resolved) => {
                            // Permissions only grew; the faulting write is
                            // retried on re-entry.
                            if stale {
                                n.vcpu.flush_nested_tlb();
                            }
                            self.stats.dirty_faults += 1;
                            continue;
                        }
                        Ok(FaultOutcome::NotOurs) => {}
                        Err(e) => log::error!("partition: dirty-log fault at {gpa} failed: {e}"),
                    }
                }
            }
            return exit;
        }
    }

    /// Start dirty logging (every frame clean and tracked) in `mode`, or
    /// switch mode (the dirty set is kept).
    pub fn enable_dirty_log<V: PartitionVcpu>(
        &mut self,
        n: Nested<'_, V>,
        mode: DirtyMode,
    ) -> Result<(), DirtyLogError> {
        if mode == DirtyMode::Pml && !n.vcpu.caps().pml {
            return Err(DirtyLogError::Backend(HostError::Backend(
                "PML not available",
            )));
        }
        n.dirty.enable(n.npt, n.mem, n.frames)?;
        // Every tracked frame was write-protected.
        n.vcpu.flush_nested_tlb();
        if mode == DirtyMode::Pml {
            // Same tracked set and dirty set as write protection; the
            // backend then gives write access back to every tracked frame
            // and logs writes in hardware instead of faulting on them.
            let all = vec![u64::MAX; n.dirty.bitmap_words()];
            if let Err(e) = n.vcpu.pml_arm(n.npt, n.mem, n.frames, &all) {
                self.disable_dirty_log(n);
                return Err(DirtyLogError::Backend(e));
            }
        } else if self.pml {
            self.stop_pml(n.vcpu, n.frames);
        }
        self.pml = mode == DirtyMode::Pml;
        Ok(())
    }

    /// Stop dirty logging: every frame writable again, PML off.
    pub fn disable_dirty_log<V: PartitionVcpu>(&mut self, n: Nested<'_, V>) {
        self.stop_pml(n.vcpu, n.frames);
        if let Err(e) = n.dirty.disable(n.npt, n.mem, n.frames) {
            log::error!("partition: disabling the dirty log: {e}");
        }
        // Permissions only grew; a flush keeps the TLB state simple anyway.
        n.vcpu.flush_nested_tlb();
    }

    /// OR the frames written since the last collection into `bitmap` (bit
    /// n = guest frame n), clear them and track them again; the number
    /// collected.
    pub fn collect_dirty<V: PartitionVcpu>(
        &mut self,
        n: Nested<'_, V>,
        bitmap: &mut [u64],
    ) -> Result<u64, DirtyLogError> {
        let dirty = n.dirty;
        let r = if self.pml {
            if bitmap.len() < dirty.bitmap_words() {
                return Err(DirtyLogError::Backend(HostError::InvalidSize {
                    what: "dirty bitmap words (too few)",
                    value: dirty.bitmap_words() as u64,
                }));
            }
            // Whatever the hardware logged joins the dirty set; collection
            // then write-protects exactly the collected frames, which are
            // re-armed (writable, hardware dirty flag clear) at once.
            n.vcpu
                .pml_drain(&mut |gfn| dirty.mark_range(gfn.gpa(), PAGE_SIZE));
            let mut collected = vec![0u64; dirty.bitmap_words()];
            let r = dirty.collect_and_clear(n.npt, n.mem, n.frames, &mut collected);
            if let Err(e) = n.vcpu.pml_arm(n.npt, n.mem, n.frames, &collected) {
                log::error!("partition: re-arming PML: {e}");
            }
            for (out, c) in bitmap.iter_mut().zip(&collected) {
                *out |= c;
            }
            r
        } else {
            dirty.collect_and_clear(n.npt, n.mem, n.frames, bitmap)
        };
        // Frames were write-protected again: stale writable translations
        // must go before the guest runs (even on a partial failure).
        n.vcpu.flush_nested_tlb();
        Ok(r?)
    }

    /// The counters; `resolved` adds the exits the backend handled inside
    /// its run (see [`PartitionVcpu::resolved_exits`]).
    pub fn stats(&self, resolved: u64) -> PartitionStats {
        PartitionStats {
            exits: self.stats.exits + resolved,
            ..self.stats
        }
    }

    /// Leave PML mode (the dirty log itself is left as it is).
    fn stop_pml<V: PartitionVcpu>(&mut self, vcpu: &mut V, frames: &mut dyn FrameAlloc) {
        if core::mem::take(&mut self.pml) {
            vcpu.pml_stop(frames);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{Gpa, Hpa};
    use crate::svm::NptFormat;
    use crate::testing::{test_memory, FakeVcpu, TestAlloc, TestMem};
    use crate::vcpu::{Access, LongModeEntry, Regs, StateError, UnknownMsr, VcpuCaps, VcpuState};
    use alloc::vec::Vec;

    /// A [`FakeVcpu`] with a fake hardware dirty log: `arm` records what
    /// was armed (and makes those frames writable, as the backend does),
    /// `drain` hands out `logged`.
    struct Pv {
        v: FakeVcpu,
        armed: Vec<Vec<u64>>,
        logged: Vec<Gfn>,
        stopped: u32,
        arm_fails: bool,
    }

    impl Vcpu for Pv {
        fn run(&mut self) -> VmExit {
            self.v.run()
        }
        fn regs(&self) -> &Regs {
            self.v.regs()
        }
        fn regs_mut(&mut self) -> &mut Regs {
            self.v.regs_mut()
        }
        fn skip_instruction(&mut self) {
            self.v.skip_instruction()
        }
        fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
            self.v.inject_exception(vector, error_code)
        }
        fn inject_interrupt(&mut self, vector: u8) {
            self.v.inject_interrupt(vector)
        }
        fn inject_nmi(&mut self) {
            self.v.inject_nmi()
        }
        fn readiness(&self) -> crate::vcpu::EventReadiness {
            self.v.readiness()
        }
        fn set_event_windows(&mut self, interrupt: bool, nmi: bool) {
            self.v.set_event_windows(interrupt, nmi)
        }
        fn guest_mode(&self) -> crate::vcpu::GuestMode {
            self.v.guest_mode()
        }
        fn read_msr(&self, msr: u32) -> Result<u64, UnknownMsr> {
            self.v.read_msr(msr)
        }
        fn write_msr(&mut self, msr: u32, value: u64) -> Result<(), UnknownMsr> {
            self.v.write_msr(msr, value)
        }
        fn reset_long_mode(&mut self, entry: &LongModeEntry) {
            self.v.reset_long_mode(entry)
        }
        fn flush_nested_tlb(&mut self) {
            self.v.flush_nested_tlb()
        }
        fn nested_root(&self) -> Hpa {
            self.v.nested_root()
        }
        fn caps(&self) -> VcpuCaps {
            self.v.caps()
        }
        fn save_state(&self) -> VcpuState {
            self.v.save_state()
        }
        fn restore_state(&mut self, state: &VcpuState) -> Result<(), StateError> {
            self.v.restore_state(state)
        }
    }

    impl PartitionVcpu for Pv {
        type Format = NptFormat;
        fn pml_arm(
            &mut self,
            npt: &NestedPageTable<NptFormat>,
            mem: &mut dyn PhysMem,
            frames: &mut dyn FrameAlloc,
            gfns: &[u64],
        ) -> Result<(), HostError> {
            if self.arm_fails {
                return Err(HostError::Backend("no log page"));
            }
            let _ = (npt, mem, frames);
            self.armed.push(gfns.to_vec());
            self.v.flush_nested_tlb();
            Ok(())
        }
        fn pml_drain(&mut self, mark: &mut dyn FnMut(Gfn)) {
            for g in self.logged.drain(..) {
                mark(g);
            }
        }
        fn pml_stop(&mut self, _frames: &mut dyn FrameAlloc) {
            self.stopped += 1;
        }
        fn resolved_exits(&self) -> u64 {
            3
        }
    }

    const RAM: u64 = 4 << 20;
    const RAM_HPA: u64 = 0x4000_0000;

    struct Fixture {
        vcpu: Pv,
        npt: NestedPageTable<NptFormat>,
        dirty: DirtyLog,
        mem: TestMem,
        frames: TestAlloc,
        core: PartitionCore,
    }

    impl Fixture {
        fn new(pml: bool) -> Self {
            let (mut mem, mut frames) = test_memory();
            mem.add_region(Hpa(RAM_HPA), RAM);
            mem.set_recording(false);
            let mut npt = NestedPageTable::new(&mut frames, &mut mem).unwrap();
            npt.map(&mut mem, &mut frames, Gpa(0), Hpa(RAM_HPA), RAM, true)
                .unwrap();
            let mut v = FakeVcpu::new();
            v.caps.pml = pml;
            Self {
                vcpu: Pv {
                    v,
                    armed: Vec::new(),
                    logged: Vec::new(),
                    stopped: 0,
                    arm_fails: false,
                },
                npt,
                dirty: DirtyLog::new(RAM),
                mem,
                frames,
                core: PartitionCore::new(),
            }
        }
        fn parts(&mut self) -> (&mut PartitionCore, Nested<'_, Pv>) {
            (
                &mut self.core,
                Nested {
                    vcpu: &mut self.vcpu,
                    npt: &mut self.npt,
                    dirty: &mut self.dirty,
                    mem: &mut self.mem,
                    frames: &mut self.frames,
                },
            )
        }
        fn writable(&self, gfn: u64) -> bool {
            self.npt
                .translate(&self.mem, Gfn(gfn).gpa())
                .unwrap()
                .writable
        }
        fn flushes(&self) -> u32 {
            self.vcpu.v.flushes
        }
    }

    fn write_fault(gfn: u64) -> VmExit {
        VmExit::NestedFault {
            gpa: Gpa(gfn * PAGE_SIZE + 8),
            access: Access {
                write: true,
                exec: false,
                present: true,
            },
        }
    }

    #[test]
    fn write_protection_round_trip_flushes_after_every_reduction() {
        let mut f = Fixture::new(false);
        let (core, n) = f.parts();
        core.enable_dirty_log(n, DirtyMode::WriteProtect).unwrap();
        assert_eq!(f.flushes(), 1, "enable write-protected everything");
        assert!(!f.writable(5) && !f.writable(700));
        // Two tracked writes fault and are resolved inside run (no flush:
        // permissions only grew); a halt comes out.
        f.vcpu
            .v
            .exits
            .extend([write_fault(5), write_fault(700), VmExit::Hlt]);
        let (core, n) = f.parts();
        assert_eq!(core.run(n), VmExit::Hlt);
        assert_eq!(f.flushes(), 1);
        assert!(f.writable(5) && f.writable(700) && !f.writable(6));
        assert_eq!(
            f.core.stats(3),
            PartitionStats {
                exits: 3 + 3,
                dirty_faults: 2
            }
        );
        let mut bitmap = vec![0u64; f.dirty.bitmap_words()];
        let (core, n) = f.parts();
        assert_eq!(core.collect_dirty(n, &mut bitmap).unwrap(), 2);
        assert_eq!(f.flushes(), 2, "collection write-protected them again");
        assert_eq!(bitmap[0], 1 << 5);
        assert_eq!(bitmap[700 / 64], 1 << (700 % 64));
        assert!(!f.writable(5) && !f.writable(700));
        let (core, n) = f.parts();
        core.disable_dirty_log(n);
        assert!(f.writable(5) && f.writable(6));
    }

    #[test]
    fn a_fault_on_a_frame_already_writable_drops_the_stale_translation() {
        let mut f = Fixture::new(false);
        let (core, n) = f.parts();
        core.enable_dirty_log(n, DirtyMode::WriteProtect).unwrap();
        // The first fault makes frame 5 writable; the second one can only
        // come from a read-only translation the TLB kept.
        f.vcpu
            .v
            .exits
            .extend([write_fault(5), write_fault(5), VmExit::Hlt]);
        let (core, n) = f.parts();
        assert_eq!(core.run(n), VmExit::Hlt);
        assert_eq!(f.flushes(), 2, "one for enable, one for the stale entry");
        assert_eq!(f.core.stats(0).dirty_faults, 2);
    }

    #[test]
    fn faults_outside_the_log_and_reads_reach_the_caller() {
        let mut f = Fixture::new(false);
        let read = VmExit::NestedFault {
            gpa: Gpa(0x5000),
            access: Access::default(),
        };
        f.vcpu.v.exits.extend([write_fault(5), read]);
        let (core, n) = f.parts();
        assert_eq!(core.run(n), write_fault(5), "logging is off");
        let (core, n) = f.parts();
        assert_eq!(core.run(n), read);
        assert_eq!(f.core.stats(0).dirty_faults, 0);
    }

    #[test]
    fn pml_arms_everything_then_exactly_the_collected_frames() {
        let mut f = Fixture::new(true);
        let (core, n) = f.parts();
        core.enable_dirty_log(n, DirtyMode::Pml).unwrap();
        assert!(f.core.pml());
        assert_eq!(f.vcpu.armed.len(), 1);
        assert!(f.vcpu.armed[0].iter().all(|&w| w == u64::MAX));
        // The enable's flush and the arm's: the dirty flags were reset.
        assert_eq!(f.flushes(), 2);
        // The hardware logged frames 9 and 300; the hypervisor wrote 12.
        f.vcpu.logged = vec![Gfn(9), Gfn(300)];
        f.dirty.mark_range(Gfn(12).gpa(), 1);
        let mut bitmap = vec![0u64; f.dirty.bitmap_words()];
        let (core, n) = f.parts();
        assert_eq!(core.collect_dirty(n, &mut bitmap).unwrap(), 3);
        assert_eq!(bitmap[0], (1 << 9) | (1 << 12));
        assert_eq!(bitmap[300 / 64], 1 << (300 % 64));
        assert_eq!(f.vcpu.armed[1], bitmap, "re-armed what was collected");
        assert_eq!(f.flushes(), 4, "the arm's flush and the collection's");
        let (core, n) = f.parts();
        core.disable_dirty_log(n);
        assert_eq!(f.vcpu.stopped, 1);
        assert!(!f.core.pml());
    }

    #[test]
    fn pml_refusals_leave_logging_off() {
        // No PML in the caps: refused before anything changes.
        let mut f = Fixture::new(false);
        let (core, n) = f.parts();
        assert!(core.enable_dirty_log(n, DirtyMode::Pml).is_err());
        assert!(!f.dirty.enabled() && f.flushes() == 0);
        // PML reported but arming fails (no log page): undone.
        let mut f = Fixture::new(true);
        f.vcpu.arm_fails = true;
        let (core, n) = f.parts();
        assert!(matches!(
            core.enable_dirty_log(n, DirtyMode::Pml),
            Err(DirtyLogError::Backend(HostError::Backend("no log page")))
        ));
        assert!(!f.dirty.enabled() && !f.core.pml() && f.writable(5));
        // A bitmap too small for the RAM is refused in PML mode too.
        let mut f = Fixture::new(true);
        let (core, n) = f.parts();
        core.enable_dirty_log(n, DirtyMode::Pml).unwrap();
        let (core, n) = f.parts();
        assert!(core.collect_dirty(n, &mut [0u64; 1]).is_err());
    }
}
