//! Page-modification logging (Intel SDM vol. 3C, 29.3.6) as the partition's
//! faster dirty-tracking mode: the log page and the VMCS fields.
//!
//! What to arm and which log entries to read is logic, in
//! [`hvcore::vmx::pml`] (with the architecture notes); the partition's use
//! of it ([`hvcore::partition`]) is host-tested there.

use super::controls::PROC2_ENABLE_PML;
use super::vmcs::{self, EPT_POINTER, GUEST_PML_INDEX, PML_ADDRESS, SECONDARY_PROC_CONTROLS};
use super::VmxVcpu;
use alloc::vec::Vec;
use hvcore::addr::{Gfn, Hpa, PAGE_SIZE};
use hvcore::host::HostError;
use hvcore::mem::{FrameAlloc, PhysMem};
use hvcore::npt::NestedPageTable;
use hvcore::partition::PartitionVcpu;
use hvcore::vmx::pml::{arm_frames, logged_entries, PML_ENTRIES};
use hvcore::vmx::{EptFormat, EPTP_AD};

/// Start PML on `vcpu` if it is off, then arm every frame whose bit is set
/// in `gfns` (bit n = guest frame n): writable, dirty flag clear. Queues an
/// INVEPT: cached translations may still carry the old dirty flags, and a
/// CPU that finds a dirty flag already set logs nothing.
pub fn arm(
    vcpu: &mut VmxVcpu,
    npt: &NestedPageTable<EptFormat>,
    mem: &mut dyn PhysMem,
    frames: &mut dyn FrameAlloc,
    gfns: &[u64],
) -> Result<(), HostError> {
    vcpu.pml_start(frames)?;
    arm_frames(mem, npt.root(), gfns);
    hvcore::vcpu::Vcpu::flush_nested_tlb(vcpu);
    Ok(())
}

/// Page-modification logging state while it is on.
pub(super) struct PmlState {
    /// The 4 KiB log the CPU writes GPAs into.
    pub(super) page: Hpa,
    /// GPAs drained at PML-full exits, not yet handed out.
    overflow: Vec<u64>,
}

impl VmxVcpu {
    /// Start page-modification logging (Intel SDM vol. 3C, 29.3.6): a log
    /// page, index 511, EPT A/D flags on, the PML control set. Idempotent.
    pub fn pml_start(&mut self, frames: &mut dyn FrameAlloc) -> Result<(), HostError> {
        if self.pml.is_some() {
            return Ok(());
        }
        if !self.features.pml() {
            return Err(HostError::Backend("PML not available"));
        }
        let page = frames.alloc_frame().map_err(|_| HostError::OutOfMemory {
            requested_bytes: PAGE_SIZE,
            free_bytes: crate::mem::memory_stats().1,
        })?;
        self.pml = Some(PmlState {
            page,
            overflow: Vec::new(),
        });
        self.write(PML_ADDRESS, page.as_u64());
        self.write(GUEST_PML_INDEX, PML_ENTRIES - 1);
        self.eptp |= EPTP_AD;
        self.write(EPT_POINTER, self.eptp);
        self.proc2 |= PROC2_ENABLE_PML;
        self.write(SECONDARY_PROC_CONTROLS, u64::from(self.proc2));
        self.flush_ept = true;
        Ok(())
    }

    /// Stop page-modification logging and free the log page.
    pub fn pml_stop(&mut self, frames: &mut dyn FrameAlloc) {
        let Some(p) = self.pml.take() else {
            return;
        };
        self.proc2 &= !PROC2_ENABLE_PML;
        self.write(SECONDARY_PROC_CONTROLS, u64::from(self.proc2));
        self.eptp &= !EPTP_AD;
        self.write(EPT_POINTER, self.eptp);
        self.flush_ept = true;
        frames.free_frame(p.page);
    }

    /// Whether PML is on.
    pub fn pml_active(&self) -> bool {
        self.pml.is_some()
    }

    /// Move the logged GPAs out of the PML page (entries index+1..=511,
    /// 29.3.6) to `mark`, or into the overflow list when `mark` is `None`;
    /// reset the index.
    pub(super) fn pml_drain_buffer(&mut self, mut mark: Option<&mut dyn FnMut(Gfn)>) {
        let index = self.read(GUEST_PML_INDEX) & 0xffff;
        let Some(p) = self.pml.as_mut() else {
            return;
        };
        for i in logged_entries(index) {
            // SAFETY: the PML page is a frame this vCPU owns; the CPU writes
            // it only while the guest runs, which it does not now. Read
            // volatile: the CPU, not Rust code, wrote it.
            let gpa = unsafe { ((p.page.as_u64() + i * 8) as *const u64).read_volatile() };
            match mark.as_mut() {
                Some(m) => m(Gfn(gpa / PAGE_SIZE)),
                None => {
                    if p.overflow.try_reserve(1).is_ok() {
                        p.overflow.push(gpa);
                    } else {
                        log::error!("vmx: PML overflow list: out of heap; a dirty page is lost");
                    }
                }
            }
        }
        let _ = vmcs::write(GUEST_PML_INDEX, PML_ENTRIES - 1);
    }

    /// Hand every GPA logged since the last drain to `mark`.
    pub fn pml_drain(&mut self, mark: &mut dyn FnMut(Gfn)) {
        if let Some(p) = self.pml.as_mut() {
            for gpa in p.overflow.drain(..) {
                mark(Gfn(gpa / PAGE_SIZE));
            }
        }
        self.pml_drain_buffer(Some(mark));
    }
}

/// The VMX vCPU's hardware dirty log for the partition.
impl PartitionVcpu for VmxVcpu {
    type Format = EptFormat;

    fn pml_arm(
        &mut self,
        npt: &NestedPageTable<EptFormat>,
        mem: &mut dyn PhysMem,
        frames: &mut dyn FrameAlloc,
        gfns: &[u64],
    ) -> Result<(), HostError> {
        arm(self, npt, mem, frames, gfns)
    }

    fn pml_drain(&mut self, mark: &mut dyn FnMut(Gfn)) {
        VmxVcpu::pml_drain(self, mark);
    }

    fn pml_stop(&mut self, frames: &mut dyn FrameAlloc) {
        VmxVcpu::pml_stop(self, frames);
    }

    fn resolved_exits(&self) -> u64 {
        self.resolved_exits
    }
}
