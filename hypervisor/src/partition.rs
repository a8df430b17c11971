//! The vendor-neutral partition: one VM's guest RAM, nested page table,
//! dirty log and vCPU, implementing [`hvcore::host::Partition`].
//!
//! Generic over a small [`Backend`] (SVM today, VMX later): the backend
//! names its nested-entry format and creates/destroys its vCPU; everything
//! else — RAM, the nested table, dirty logging, the run loop that resolves
//! dirty-log faults — is written once here.
//!
//! Invariants:
//! * guest RAM is `[0, ram_bytes)`, backed by zeroed, 2 MiB-aligned host
//!   chunks of 2 MiB (chunk i backs GPA `[i*2M, (i+1)*2M)`), mapped writable
//!   at GPA 0 with 2 MiB leaves (4 KiB leaves for a partial last chunk);
//! * the hypervisor identity-maps host memory, so a chunk's HPA is also the
//!   address the hypervisor copies through;
//! * every write through [`GuestMemory`] is recorded in the dirty log while
//!   logging is on (the nested table never sees it);
//! * `Drop` returns every frame (RAM chunks, table frames, the vCPU's
//!   control structures) to the frame allocator.

use crate::mem::{self as host_mem, IdentityPhysMem as IdentityMem, PlatformFrames};
use alloc::vec::Vec;
use hvcore::addr::{Gfn, Gpa, Hpa, LARGE_PAGE_SIZE, PAGE_SIZE};
use hvcore::dirty::{DirtyLog, FaultOutcome};
use hvcore::host::{DirtyMode, HostError, Partition, PartitionStats};
use hvcore::mem::{check_guest_range, FrameAlloc, GuestMemory, MemError};
use hvcore::npt::{EntryFormat, NestedPageTable};
use hvcore::vcpu::{Vcpu, VmExit};

/// Largest guest RAM a partition may have: the guest ABI identity-maps the
/// first 4 GiB.
pub const MAX_RAM_BYTES: u64 = 4 << 30;
/// 4 KiB frames per guest RAM chunk (2 MiB, also its alignment).
const CHUNK_PAGES: u64 = LARGE_PAGE_SIZE / PAGE_SIZE;

/// What a virtualization backend supplies to the generic partition.
pub trait Backend {
    /// Nested page-table entry format (AMD NPT, Intel EPT).
    type Format: EntryFormat;
    /// The backend's vCPU.
    type Vcpu: Vcpu;
    /// A vCPU whose nested paging uses the table rooted at `nested_root`.
    fn create_vcpu(frames: &mut dyn FrameAlloc, nested_root: Hpa) -> Result<Self::Vcpu, HostError>;
    /// Free the vCPU's control structures.
    fn destroy_vcpu(vcpu: Self::Vcpu, frames: &mut dyn FrameAlloc);

    // Hardware dirty logging ([`DirtyMode::Pml`]), used only when
    // `Vcpu::caps().pml` says the backend has it; the defaults are what a
    // backend without it does (refuse, nothing to drain or stop).

    /// Start hardware dirty logging if it is off, then arm every frame set
    /// in `gfns` (bit n = guest frame n), which the dirty log has just
    /// write-protected: give write access back with the hardware's own
    /// dirty tracking reset, so the next write is logged without a fault.
    fn pml_arm(
        vcpu: &mut Self::Vcpu,
        npt: &NestedPageTable<Self::Format>,
        frames: &mut dyn FrameAlloc,
        gfns: &[u64],
    ) -> Result<(), HostError> {
        let _ = (vcpu, npt, frames, gfns);
        Err(HostError::Backend("PML not available"))
    }
    /// Hand every frame the hardware logged as written since the last
    /// drain to `mark`.
    fn pml_drain(vcpu: &mut Self::Vcpu, mark: &mut dyn FnMut(Gfn)) {
        let _ = (vcpu, mark);
    }
    /// Stop hardware dirty logging.
    fn pml_stop(vcpu: &mut Self::Vcpu, frames: &mut dyn FrameAlloc) {
        let _ = (vcpu, frames);
    }
    /// Exits the backend handled inside `Vcpu::run` without returning
    /// (e.g. a full PML log drained), counted into [`PartitionStats::exits`].
    fn resolved_exits(vcpu: &Self::Vcpu) -> u64 {
        let _ = vcpu;
        0
    }
}

/// Guest RAM: the host chunks backing it and the dirty log every
/// hypervisor write is recorded in. This is the partition's
/// [`GuestMemory`].
pub struct GuestRam {
    ram_bytes: u64,
    /// Host address of the 2 MiB chunk backing GPA `[i*2M, (i+1)*2M)`.
    chunks: Vec<Hpa>,
    dirty: DirtyLog,
}

impl GuestRam {
    /// Call `f(hpa, offset_in_buf, len)` for each chunk-contiguous piece of
    /// `[gpa, gpa+len)`, after the bounds check.
    fn for_each_piece(
        &self,
        gpa: Gpa,
        len: usize,
        mut f: impl FnMut(Hpa, usize, usize),
    ) -> Result<(), MemError> {
        check_guest_range(gpa, len as u64, self.ram_bytes)?;
        let mut done = 0usize;
        while done < len {
            let g = gpa.as_u64() + done as u64;
            let chunk = (g / LARGE_PAGE_SIZE) as usize;
            let off = g % LARGE_PAGE_SIZE;
            let n = ((LARGE_PAGE_SIZE - off) as usize).min(len - done);
            // In range: `g < ram_bytes` and the chunks cover ram_bytes.
            let base = self.chunks.get(chunk).ok_or(MemError::OutOfRange {
                gpa,
                len_bytes: len as u64,
            })?;
            f(Hpa(base.as_u64() + off), done, n);
            done += n;
        }
        Ok(())
    }
}

impl GuestMemory for GuestRam {
    fn ram_bytes(&self) -> u64 {
        self.ram_bytes
    }

    fn read(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemError> {
        let len = buf.len();
        self.for_each_piece(gpa, len, |hpa, at, n| {
            // SAFETY: `hpa..hpa+n` lies inside a RAM chunk this partition
            // owns (bounds-checked above), identity-mapped; the guest may
            // write it concurrently only while running, and it is not
            // running while the hypervisor holds `&self`.
            unsafe {
                core::ptr::copy_nonoverlapping(hpa.as_u64() as *const u8, buf[at..].as_mut_ptr(), n)
            }
        })
    }

    fn write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), MemError> {
        self.for_each_piece(gpa, data.len(), |hpa, at, n| {
            // SAFETY: as in `read`: an owned, identity-mapped RAM chunk, in
            // bounds, not concurrently accessed.
            unsafe {
                core::ptr::copy_nonoverlapping(data[at..].as_ptr(), hpa.as_u64() as *mut u8, n)
            }
        })?;
        // Hardware write protection never sees this write: record it.
        self.dirty.mark_range(gpa, data.len() as u64);
        Ok(())
    }
}

/// One VM's hardware side on backend `B`.
pub struct GenericPartition<B: Backend> {
    ram: GuestRam,
    /// `None` only during `Drop`.
    npt: Option<NestedPageTable<B::Format>>,
    /// `None` only during `Drop`.
    vcpu: Option<B::Vcpu>,
    stats: PartitionStats,
    /// Dirty logging runs in [`DirtyMode::Pml`]: tracked frames stay
    /// writable and the backend's log feeds the dirty set.
    pml: bool,
}

impl<B: Backend> GenericPartition<B> {
    /// A partition with `ram_bytes` of zeroed guest RAM at GPA 0 and one
    /// vCPU. On failure everything allocated so far is returned.
    pub fn new(ram_bytes: u64) -> Result<Self, HostError> {
        if ram_bytes == 0 || !ram_bytes.is_multiple_of(PAGE_SIZE) || ram_bytes > MAX_RAM_BYTES {
            return Err(HostError::InvalidSize {
                what: "guest RAM bytes (multiple of 4 KiB, at most 4 GiB)",
                value: ram_bytes,
            });
        }
        let n_chunks = ram_bytes.div_ceil(LARGE_PAGE_SIZE) as usize;
        let mut chunks = Vec::new();
        chunks
            .try_reserve_exact(n_chunks)
            .map_err(|_| HostError::Backend("heap exhausted for the chunk list"))?;
        let mut part = Self {
            ram: GuestRam {
                ram_bytes,
                chunks,
                dirty: DirtyLog::new(ram_bytes),
            },
            npt: None,
            vcpu: None,
            stats: PartitionStats::default(),
            pml: false,
        };
        // From here on `Drop` cleans up whatever exists.
        for _ in 0..n_chunks {
            // Zeroed by the allocator.
            let Some(chunk) = host_mem::alloc_contiguous(CHUNK_PAGES, CHUNK_PAGES) else {
                let (_, free_bytes) = host_mem::memory_stats();
                return Err(HostError::OutOfMemory {
                    requested_bytes: ram_bytes,
                    free_bytes,
                });
            };
            part.ram.chunks.push(chunk);
        }
        let (mut mem, mut frames) = (IdentityMem, PlatformFrames);
        let mut npt = NestedPageTable::<B::Format>::new(&mut frames, &mut mem).map_err(npt_err)?;
        let mut result = Ok(());
        for (i, chunk) in part.ram.chunks.iter().enumerate() {
            let gpa = i as u64 * LARGE_PAGE_SIZE;
            let len = (ram_bytes - gpa).min(LARGE_PAGE_SIZE);
            if let Err(e) = npt.map(&mut mem, &mut frames, Gpa(gpa), *chunk, len, true) {
                result = Err(npt_err(e));
                break;
            }
        }
        let root = npt.root();
        part.npt = Some(npt);
        result?;
        part.vcpu = Some(B::create_vcpu(&mut frames, root)?);
        Ok(part)
    }

    /// The backend's own vCPU type (benchmarks and backend self-tests).
    pub fn backend_vcpu(&mut self) -> &mut B::Vcpu {
        self.vcpu_mut()
    }

    fn vcpu_mut(&mut self) -> &mut B::Vcpu {
        self.vcpu
            .as_mut()
            .expect("partition vCPU exists outside Drop")
    }

    /// Let the dirty log handle a nested fault; `true` if it was a logged
    /// write and the guest can simply resume.
    fn resolve_dirty_fault(&mut self, gpa: Gpa) -> bool {
        let Some(npt) = self.npt.as_mut() else {
            return false;
        };
        let dirty = &mut self.ram.dirty;
        let r = dirty.on_write_fault(npt, &mut IdentityMem, &mut PlatformFrames, gpa);
        match r {
            Ok(FaultOutcome::Resolved) => true,
            Ok(FaultOutcome::NotOurs) => false,
            Err(e) => {
                log::error!("partition: dirty-log fault at {gpa} failed: {e}");
                false
            }
        }
    }
}

impl<B: Backend> GenericPartition<B> {
    /// Leave PML mode (the dirty log itself is left as it is).
    fn stop_pml(&mut self) {
        if core::mem::take(&mut self.pml) {
            if let Some(vcpu) = self.vcpu.as_mut() {
                B::pml_stop(vcpu, &mut PlatformFrames);
            }
        }
    }
}

/// Map a nested-table error to the platform error (the message names the
/// step; details go to the log).
fn npt_err(e: hvcore::npt::NptError) -> HostError {
    log::warn!("partition: nested page table: {e}");
    match e {
        hvcore::npt::NptError::Mem(_) => {
            let (_, free_bytes) = host_mem::memory_stats();
            HostError::OutOfMemory {
                requested_bytes: PAGE_SIZE,
                free_bytes,
            }
        }
        _ => HostError::Backend("nested page table update failed"),
    }
}

impl<B: Backend> Partition for GenericPartition<B> {
    fn ram_bytes(&self) -> u64 {
        self.ram.ram_bytes
    }

    fn memory(&mut self) -> &mut dyn GuestMemory {
        &mut self.ram
    }

    fn vcpu(&mut self) -> &mut dyn Vcpu {
        self.vcpu_mut()
    }

    fn run(&mut self) -> VmExit {
        loop {
            let exit = self.vcpu_mut().run();
            self.stats.exits += 1;
            if let VmExit::NestedFault { gpa, access } = exit {
                if access.write && access.present && self.resolve_dirty_fault(gpa) {
                    // Permissions only grew: no flush needed; the faulting
                    // write is retried on re-entry.
                    self.stats.dirty_faults += 1;
                    continue;
                }
            }
            return exit;
        }
    }

    fn enable_dirty_log(&mut self, mode: DirtyMode) -> Result<(), HostError> {
        if mode == DirtyMode::Pml && !self.vcpu_mut().caps().pml {
            return Err(HostError::Backend("PML not available"));
        }
        let Some(npt) = self.npt.as_mut() else {
            return Err(HostError::Backend("partition has no nested page table"));
        };
        let dirty = &mut self.ram.dirty;
        dirty
            .enable(npt, &mut IdentityMem, &mut PlatformFrames)
            .map_err(npt_err)?;
        self.vcpu_mut().flush_nested_tlb();
        if mode == DirtyMode::Pml {
            // Same tracked set and dirty set as write protection; the
            // backend then gives write access back to every tracked frame
            // (all guest RAM is mapped writable, see the invariants) and
            // logs writes in hardware instead of faulting on them.
            let all = alloc::vec![u64::MAX; self.ram.dirty.bitmap_words()];
            let (Some(vcpu), Some(npt)) = (self.vcpu.as_mut(), self.npt.as_ref()) else {
                return Err(HostError::Backend("partition has no vCPU"));
            };
            if let Err(e) = B::pml_arm(vcpu, npt, &mut PlatformFrames, &all) {
                self.disable_dirty_log();
                return Err(e);
            }
        } else if self.pml {
            self.stop_pml();
        }
        self.pml = mode == DirtyMode::Pml;
        Ok(())
    }

    fn disable_dirty_log(&mut self) {
        self.stop_pml();
        let Some(npt) = self.npt.as_mut() else {
            return;
        };
        let dirty = &mut self.ram.dirty;
        if let Err(e) = dirty.disable(npt, &mut IdentityMem, &mut PlatformFrames) {
            log::error!("partition: disabling the dirty log: {e}");
        }
        // Permissions only grew; a flush keeps the TLB state simple anyway.
        self.vcpu_mut().flush_nested_tlb();
    }

    fn dirty_log_enabled(&self) -> bool {
        self.ram.dirty.enabled()
    }

    fn collect_dirty(&mut self, bitmap: &mut [u64]) -> Result<u64, HostError> {
        let Some(npt) = self.npt.as_mut() else {
            return Err(HostError::Backend("partition has no nested page table"));
        };
        let dirty = &mut self.ram.dirty;
        let r = if self.pml {
            if bitmap.len() < dirty.bitmap_words() {
                return Err(HostError::InvalidSize {
                    what: "dirty bitmap words (too few)",
                    value: dirty.bitmap_words() as u64,
                });
            }
            let Some(vcpu) = self.vcpu.as_mut() else {
                return Err(HostError::Backend("partition has no vCPU"));
            };
            // Whatever the hardware logged joins the dirty set; collection
            // then write-protects exactly the collected frames, which are
            // re-armed (writable, hardware dirty flag clear) at once.
            B::pml_drain(vcpu, &mut |gfn| dirty.mark_range(gfn.gpa(), PAGE_SIZE));
            let mut collected = alloc::vec![0u64; dirty.bitmap_words()];
            let r =
                dirty.collect_and_clear(npt, &mut IdentityMem, &mut PlatformFrames, &mut collected);
            if let Err(e) = B::pml_arm(vcpu, npt, &mut PlatformFrames, &collected) {
                log::error!("partition: re-arming PML: {e}");
            }
            for (out, c) in bitmap.iter_mut().zip(&collected) {
                *out |= c;
            }
            r
        } else {
            dirty.collect_and_clear(npt, &mut IdentityMem, &mut PlatformFrames, bitmap)
        };
        // Frames were write-protected again: stale writable translations
        // must go before the guest runs (even on a partial failure).
        self.vcpu_mut().flush_nested_tlb();
        r.map_err(|e| match e {
            hvcore::npt::NptError::BitmapTooSmall { needed_words, .. } => HostError::InvalidSize {
                what: "dirty bitmap words (too few)",
                value: needed_words as u64,
            },
            e => npt_err(e),
        })
    }

    fn stats(&self) -> PartitionStats {
        let resolved = self.vcpu.as_ref().map_or(0, B::resolved_exits);
        PartitionStats {
            exits: self.stats.exits + resolved,
            ..self.stats
        }
    }
}

impl<B: Backend> Drop for GenericPartition<B> {
    fn drop(&mut self) {
        let vcpu = self.vcpu.take();
        let npt = self.npt.take();
        if let Some(v) = vcpu {
            B::destroy_vcpu(v, &mut PlatformFrames);
        }
        if let Some(t) = npt {
            t.destroy(&mut IdentityMem, &mut PlatformFrames);
        }
        for chunk in self.ram.chunks.drain(..) {
            host_mem::free_contiguous(chunk, CHUNK_PAGES);
        }
    }
}
