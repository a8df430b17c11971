//! The hypervisor's heap: a first-fit allocator (`linked_list_allocator`)
//! over one contiguous run of frames, behind a spin lock.
//!
//! The `#[global_allocator]` lives in the image crate (hvboot) as
//! [`GlobalHeap`], which forwards to the one [`Heap`] here. Interrupt
//! handlers never allocate, so the lock cannot be re-entered.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{self, NonNull};
use spin::Mutex;

static HEAP: Mutex<linked_list_allocator::Heap> = Mutex::new(linked_list_allocator::Heap::empty());

/// Install `bytes` (rounded to whole frames) of frames as the heap.
pub fn init(bytes: u64) -> Result<(), super::MemInitError> {
    let pages = bytes.div_ceil(super::frames::FRAME_BYTES);
    let base = super::alloc_contiguous_uninit(pages, 1)
        .ok_or(super::MemInitError::OutOfFrames("the heap"))?;
    let mut heap = HEAP.lock();
    // SAFETY: the run is identity-mapped and now owned by the heap for the
    // rest of the run (never freed); `init` is called once (the heap is
    // empty, checked by size()).
    unsafe {
        assert_eq!(heap.size(), 0, "heap initialised twice");
        heap.init(
            base.as_u64() as *mut u8,
            (pages * super::frames::FRAME_BYTES) as usize,
        );
    }
    Ok(())
}

/// (size, used) bytes of the heap.
pub fn stats() -> (usize, usize) {
    let h = HEAP.lock();
    (h.size(), h.used())
}

/// The global allocator: forwards to the heap above. An exhausted heap
/// returns null (the `alloc` crate then reports allocation failure).
pub struct GlobalHeap;

// SAFETY: allocation and deallocation go through linked_list_allocator's
// Heap under a lock; it returns blocks that satisfy `layout` and do not
// overlap live blocks.
unsafe impl GlobalAlloc for GlobalHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HEAP.lock()
            .allocate_first_fit(layout)
            .map_or(ptr::null_mut(), NonNull::as_ptr)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(p) = NonNull::new(ptr) {
            // SAFETY: GlobalAlloc's contract: `ptr` came from `alloc` with
            // this `layout`.
            unsafe { HEAP.lock().deallocate(p, layout) };
        }
    }
}
