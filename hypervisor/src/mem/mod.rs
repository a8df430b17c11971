//! Host physical memory: the frame allocator, the identity map and the heap.
//!
//! The hypervisor identity-maps physical memory (`Hpa` == host virtual
//! address, docs/DESIGN.md), so a frame's address is also a pointer to it.
//!
//! * [`init_frames`] builds the frame bitmap ([`frames::FrameBitmap`]) from
//!   the boot memory map, excluding the low 1 MiB, the image, the modules and
//!   the bitmap's own storage. Loader structures need no exclusion: boot info
//!   was copied out before this runs.
//! * [`alloc_frame`]/[`free_frame`] hand out zeroed 4 KiB frames;
//!   [`alloc_contiguous`]/[`free_contiguous`] aligned runs (guest RAM in
//!   2 MiB-aligned chunks, so nested paging can use 2 MiB leaves).
//! * [`PlatformFrames`] and [`IdentityPhysMem`] implement hvcore's
//!   [`FrameAlloc`] and [`PhysMem`] over the above.
//!
//! Lock order: the frame lock is a leaf (nothing is called with it held
//! except memory zeroing). Interrupt handlers never allocate.

pub mod frames;
pub mod heap;
pub mod paging;

use crate::bootinfo::{BootInfo, MemKind};
use core::sync::atomic::{AtomicU64, Ordering};
use frames::{align_up, first_fit, FrameBitmap, FRAME_BYTES};
use hvcore::addr::Hpa;
use hvcore::mem::{FrameAlloc, MemError, PhysMem};
use spin::Mutex;

/// Physical memory above this is ignored (bounds the bitmap to 8 MiB).
pub const MAX_PHYS_BYTES: u64 = 1 << 38;
/// What the boot page tables map (entry.rs in hvboot): the first 4 GiB.
pub const BOOT_MAPPED_BYTES: u64 = 1 << 32;
/// Low memory left to firmware and real-mode structures.
pub const LOW_RESERVED_BYTES: u64 = 1 << 20;

static FRAMES: Mutex<Option<FrameBitmap<'static>>> = Mutex::new(None);
/// End of tracked physical memory (set once by [`init_frames`]); every
/// address below `max(this, 4 GiB)` is identity-mapped.
static PHYS_LIMIT: AtomicU64 = AtomicU64::new(0);

/// Why memory setup failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemInitError {
    /// The memory map lists no usable RAM above 1 MiB.
    NoUsableMemory,
    /// No usable range below 4 GiB can hold the frame bitmap.
    NoRoomForBitmap { bytes: u64 },
    /// Not enough frames for the host page tables or the heap.
    OutOfFrames(&'static str),
}

impl core::fmt::Display for MemInitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MemInitError::NoUsableMemory => {
                write!(f, "no usable RAM above 1 MiB in the memory map")
            }
            MemInitError::NoRoomForBitmap { bytes } => {
                write!(
                    f,
                    "no usable range below 4 GiB holds the {bytes}-byte frame bitmap"
                )
            }
            MemInitError::OutOfFrames(what) => write!(f, "out of memory while setting up {what}"),
        }
    }
}

/// Set up the frame allocator from the boot memory map. `image` is the
/// physical range of the loaded hypervisor image.
pub fn init_frames(info: &BootInfo, image: (u64, u64)) -> Result<(), MemInitError> {
    let top = info.max_usable_end().min(MAX_PHYS_BYTES);
    if top <= LOW_RESERVED_BYTES {
        return Err(MemInitError::NoUsableMemory);
    }
    let frames = top / FRAME_BYTES;
    let words = FrameBitmap::words_for(frames);
    let bitmap_bytes = align_up(words as u64 * 8, FRAME_BYTES);

    let mut excluded = [(0u64, 0u64); 2 + crate::bootinfo::MAX_MODULES];
    excluded[0] = (0, LOW_RESERVED_BYTES);
    excluded[1] = image;
    for (slot, m) in excluded[2..].iter_mut().zip(info.modules()) {
        *slot = (m.start, m.end);
    }
    let excluded = &excluded[..2 + info.modules().len()];
    let usable_low = info
        .regions()
        .iter()
        .filter(|r| r.kind == MemKind::Usable)
        .map(|r| (r.base, r.end().min(BOOT_MAPPED_BYTES)));
    let storage = first_fit(
        usable_low,
        excluded,
        bitmap_bytes,
        FRAME_BYTES,
        LOW_RESERVED_BYTES,
    )
    .ok_or(MemInitError::NoRoomForBitmap {
        bytes: bitmap_bytes,
    })?;

    // SAFETY: [storage, storage + bitmap_bytes) is usable RAM below 4 GiB
    // (identity-mapped by the boot tables), overlaps neither the image nor a
    // module nor firmware memory, and is reserved in the bitmap below, so
    // nothing else ever aliases it. u64 alignment holds (page aligned).
    let bits: &'static mut [u64] =
        unsafe { core::slice::from_raw_parts_mut(storage as *mut u64, words) };
    let mut bitmap = FrameBitmap::new(bits, frames);
    for r in info.regions().iter().filter(|r| r.kind == MemKind::Usable) {
        bitmap.add_free(r.base, r.end());
    }
    // Anything the map also lists as non-usable wins over an overlapping
    // usable entry.
    for r in info.regions().iter().filter(|r| r.kind != MemKind::Usable) {
        bitmap.reserve(r.base, r.end());
    }
    for (start, end) in excluded {
        bitmap.reserve(*start, *end);
    }
    bitmap.reserve(storage, storage + bitmap_bytes);
    if bitmap.free_frames() == 0 {
        return Err(MemInitError::NoUsableMemory);
    }
    PHYS_LIMIT.store(bitmap.frames() * FRAME_BYTES, Ordering::Relaxed);
    *FRAMES.lock() = Some(bitmap);
    Ok(())
}

/// Zero `count` frames at `hpa`.
///
/// # Safety
/// The frames must be identity-mapped and owned by the caller.
unsafe fn zero_frames(hpa: u64, count: u64) {
    // SAFETY: per the contract the range is mapped and exclusively ours.
    unsafe { core::ptr::write_bytes(hpa as *mut u8, 0, (count * FRAME_BYTES) as usize) };
}

/// One zeroed 4 KiB frame, or `None` when memory is exhausted.
pub fn alloc_frame() -> Option<Hpa> {
    let frame = FRAMES.lock().as_mut()?.alloc()?;
    let hpa = frame * FRAME_BYTES;
    // SAFETY: the allocator just handed this frame to us; all RAM is
    // identity-mapped (paging::init runs before anything above 4 GiB can be
    // handed out by the low-first single-frame search).
    unsafe { zero_frames(hpa, 1) };
    Some(Hpa(hpa))
}

/// Return a frame from [`alloc_frame`]. Panics on a double free.
pub fn free_frame(hpa: Hpa) {
    assert!(hpa.is_aligned(FRAME_BYTES), "freeing unaligned frame {hpa}");
    if let Some(b) = FRAMES.lock().as_mut() {
        b.free_range(hpa.as_u64() / FRAME_BYTES, 1);
    }
}

/// `pages` zeroed consecutive frames whose address is a multiple of
/// `align_pages` frames (a power of two; 512 = 2 MiB). Taken from the top of
/// memory down.
pub fn alloc_contiguous(pages: u64, align_pages: u64) -> Option<Hpa> {
    let first = FRAMES
        .lock()
        .as_mut()?
        .alloc_contiguous(pages, align_pages)?;
    let hpa = first * FRAME_BYTES;
    // SAFETY: freshly allocated, identity-mapped (see alloc_frame).
    unsafe { zero_frames(hpa, pages) };
    Some(Hpa(hpa))
}

/// Like [`alloc_contiguous`] but without zeroing (for the heap, whose
/// allocator never hands out uninitialised memory as initialised).
pub(crate) fn alloc_contiguous_uninit(pages: u64, align_pages: u64) -> Option<Hpa> {
    let first = FRAMES
        .lock()
        .as_mut()?
        .alloc_contiguous(pages, align_pages)?;
    Some(Hpa(first * FRAME_BYTES))
}

/// Return a run from [`alloc_contiguous`]. Panics on a double free.
pub fn free_contiguous(hpa: Hpa, pages: u64) {
    assert!(
        hpa.is_aligned(FRAME_BYTES),
        "freeing unaligned frames {hpa}"
    );
    if let Some(b) = FRAMES.lock().as_mut() {
        b.free_range(hpa.as_u64() / FRAME_BYTES, pages);
    }
}

/// (total, free) bytes managed by the frame allocator.
pub fn memory_stats() -> (u64, u64) {
    match FRAMES.lock().as_ref() {
        Some(b) => (
            b.managed_frames() * FRAME_BYTES,
            b.free_frames() * FRAME_BYTES,
        ),
        None => (0, 0),
    }
}

/// Every address below this is identity-mapped (lock-free: [`PhysMem`]
/// accesses are frequent).
fn phys_limit() -> u64 {
    PHYS_LIMIT.load(Ordering::Relaxed).max(BOOT_MAPPED_BYTES)
}

/// [`FrameAlloc`] over the platform frame allocator.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlatformFrames;

impl FrameAlloc for PlatformFrames {
    fn alloc_frame(&mut self) -> Result<Hpa, MemError> {
        alloc_frame().ok_or(MemError::OutOfFrames)
    }
    fn free_frame(&mut self, hpa: Hpa) {
        free_frame(hpa);
    }
}

/// [`PhysMem`] over the identity map. Meant for page-table frames the caller
/// owns (from [`PlatformFrames`]); an unaligned address or one outside
/// physical memory is a broken invariant and panics.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdentityPhysMem;

impl IdentityPhysMem {
    fn check(hpa: Hpa) -> *mut u64 {
        assert!(
            hpa.is_aligned(8) && hpa.as_u64() < phys_limit(),
            "PhysMem access to {hpa} outside RAM or unaligned"
        );
        hpa.as_u64() as *mut u64
    }
}

impl PhysMem for IdentityPhysMem {
    fn read_u64(&self, hpa: Hpa) -> u64 {
        let p = Self::check(hpa);
        // SAFETY: aligned and inside identity-mapped physical memory; a
        // volatile read because hardware (the CPU's table walker) shares it.
        unsafe { p.read_volatile() }
    }
    fn write_u64(&mut self, hpa: Hpa, value: u64) {
        let p = Self::check(hpa);
        // SAFETY: as above; callers only name page-table frames they own.
        unsafe { p.write_volatile(value) }
    }
}
