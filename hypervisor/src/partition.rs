//! The vendor-neutral partition: one VM's guest RAM, nested page table,
//! dirty log and vCPU, implementing [`hvcore::host::Partition`].
//!
//! Generic over a small [`Backend`] (SVM, VMX): the backend creates and
//! destroys its vCPU, an [`hvcore::partition::PartitionVcpu`] naming its
//! nested-entry format and hardware dirty logging. Guest RAM and the
//! nested table live here; the run loop that resolves dirty-log faults and
//! dirty logging in both modes (with the TLB flushes they need) are logic,
//! [`hvcore::partition::PartitionCore`], host-tested there.
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
use hvcore::addr::{Gpa, Hpa, LARGE_PAGE_SIZE, PAGE_SIZE};
use hvcore::dirty::DirtyLog;
use hvcore::host::{DirtyMode, HostError, Partition, PartitionStats};
use hvcore::mem::{check_guest_range, FrameAlloc, GuestMemory, MemError};
use hvcore::npt::NestedPageTable;
use hvcore::partition::{DirtyLogError, Nested, PartitionCore, PartitionVcpu};
use hvcore::vcpu::{Vcpu, VmExit};

/// Largest guest RAM a partition may have: the guest ABI identity-maps the
/// first 4 GiB.
pub const MAX_RAM_BYTES: u64 = 4 << 30;
/// 4 KiB frames per guest RAM chunk (2 MiB, also its alignment).
const CHUNK_PAGES: u64 = LARGE_PAGE_SIZE / PAGE_SIZE;

/// What a virtualization backend supplies to the generic partition.
pub trait Backend {
    /// The backend's vCPU.
    type Vcpu: PartitionVcpu;
    /// A vCPU whose nested paging uses the table rooted at `nested_root`.
    fn create_vcpu(frames: &mut dyn FrameAlloc, nested_root: Hpa) -> Result<Self::Vcpu, HostError>;
    /// Free the vCPU's control structures.
    fn destroy_vcpu(vcpu: Self::Vcpu, frames: &mut dyn FrameAlloc);
}

/// The nested-entry format of backend `B`.
type FormatOf<B> = <<B as Backend>::Vcpu as PartitionVcpu>::Format;

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
    npt: Option<NestedPageTable<FormatOf<B>>>,
    /// `None` only during `Drop`.
    vcpu: Option<B::Vcpu>,
    /// Dirty-logging mode and counters; the logic behind `run` and the
    /// dirty-log calls.
    core: PartitionCore,
    /// The platform's host memory and frames, lent to the core (both
    /// zero-sized handles).
    mem: IdentityMem,
    frames: PlatformFrames,
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
            core: PartitionCore::new(),
            mem: IdentityMem,
            frames: PlatformFrames,
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
        let mut npt =
            NestedPageTable::<FormatOf<B>>::new(&mut frames, &mut mem).map_err(npt_err)?;
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

    /// The core and the parts it works on, lent for one call; `None` only
    /// during `Drop`.
    fn parts(&mut self) -> Option<(&mut PartitionCore, Nested<'_, B::Vcpu>)> {
        let (Some(vcpu), Some(npt)) = (self.vcpu.as_mut(), self.npt.as_mut()) else {
            return None;
        };
        Some((
            &mut self.core,
            Nested {
                vcpu,
                npt,
                dirty: &mut self.ram.dirty,
                mem: &mut self.mem,
                frames: &mut self.frames,
            },
        ))
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
        match self.parts() {
            Some((core, n)) => core.run(n),
            None => VmExit::EntryFailed {
                reason: hvcore::vcpu::EntryFailure {
                    what: "partition has no vCPU",
                    raw: 0,
                    field: None,
                },
            },
        }
    }

    fn enable_dirty_log(&mut self, mode: DirtyMode) -> Result<(), HostError> {
        let Some((core, n)) = self.parts() else {
            return Err(HostError::Backend("partition has no vCPU"));
        };
        core.enable_dirty_log(n, mode).map_err(dirty_err)
    }

    fn disable_dirty_log(&mut self) {
        if let Some((core, n)) = self.parts() {
            core.disable_dirty_log(n);
        }
    }

    fn dirty_log_enabled(&self) -> bool {
        self.ram.dirty.enabled()
    }

    fn collect_dirty(&mut self, bitmap: &mut [u64]) -> Result<u64, HostError> {
        let Some((core, n)) = self.parts() else {
            return Err(HostError::Backend("partition has no vCPU"));
        };
        core.collect_dirty(n, bitmap).map_err(dirty_err)
    }

    fn stats(&self) -> PartitionStats {
        let resolved = self.vcpu.as_ref().map_or(0, PartitionVcpu::resolved_exits);
        self.core.stats(resolved)
    }
}

/// Map a dirty-log error to the platform error.
fn dirty_err(e: DirtyLogError) -> HostError {
    match e {
        DirtyLogError::Table(hvcore::npt::NptError::BitmapTooSmall { needed_words, .. }) => {
            HostError::InvalidSize {
                what: "dirty bitmap words (too few)",
                value: needed_words as u64,
            }
        }
        DirtyLogError::Table(e) => npt_err(e),
        DirtyLogError::Backend(e) => e,
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
