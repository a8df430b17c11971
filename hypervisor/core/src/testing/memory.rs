//! [`TestMem`] and [`TestAlloc`]: a recording frame store.

use crate::addr::{Hpa, PAGE_SIZE};
use crate::mem::{FrameAlloc, MemError, PhysMem};
use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;

/// First host-physical address the allocator hands out. Far above any
/// region a test declares for guest RAM, so the two never collide.
pub const ALLOC_BASE: u64 = 0x10_0000_0000;

const WORDS: usize = (PAGE_SIZE / 8) as usize;

#[derive(Default)]
struct Store {
    /// Contents of live (or region) frames written so far (absent = zero),
    /// by frame number; a freed frame's entry is removed.
    frames: BTreeMap<u64, Box<[u64; WORDS]>>,
    /// Frames currently allocated, by frame number.
    live: BTreeSet<u64>,
    /// Frames freed and not yet handed out again (LIFO).
    free_list: Vec<u64>,
    /// Next never-used frame number.
    next: u64,
    /// Cap on live frames.
    limit: Option<usize>,
    allocs: u64,
    frees: u64,
    /// Declared non-allocator regions `[start, end)` (frame numbers).
    regions: Vec<(u64, u64)>,
    writes: Vec<(Hpa, u64)>,
    record: bool,
}

impl Store {
    fn check(&self, hpa: Hpa, what: &str) -> u64 {
        assert!(hpa.is_aligned(8), "{what} of unaligned {hpa:?}");
        let frame = hpa.0 / PAGE_SIZE;
        let ok = self.live.contains(&frame)
            || self.regions.iter().any(|&(s, e)| frame >= s && frame < e);
        assert!(
            ok,
            "{what} of {hpa:?}: frame not allocated (freed or stray)"
        );
        frame
    }
}

/// [`PhysMem`] over the shared frame store; clones share it.
#[derive(Clone)]
pub struct TestMem(Rc<RefCell<Store>>);

/// [`FrameAlloc`] over the shared frame store.
pub struct TestAlloc(Rc<RefCell<Store>>);

/// A fresh, empty frame store: its memory view and its allocator. Writes
/// are recorded from the start.
pub fn test_memory() -> (TestMem, TestAlloc) {
    let store = Rc::new(RefCell::new(Store {
        next: ALLOC_BASE / PAGE_SIZE,
        record: true,
        ..Store::default()
    }));
    (TestMem(store.clone()), TestAlloc(store))
}

impl TestMem {
    /// Allow access to `[hpa, hpa+len_bytes)` (page aligned) outside the
    /// allocator, e.g. frames standing for guest RAM.
    pub fn add_region(&self, hpa: Hpa, len_bytes: u64) {
        assert!(hpa.is_aligned(PAGE_SIZE) && len_bytes.is_multiple_of(PAGE_SIZE));
        let start = hpa.0 / PAGE_SIZE;
        self.0
            .borrow_mut()
            .regions
            .push((start, start + len_bytes / PAGE_SIZE));
    }

    /// Every `(address, value)` written since the last call, in order.
    pub fn take_writes(&self) -> Vec<(Hpa, u64)> {
        core::mem::take(&mut self.0.borrow_mut().writes)
    }

    /// Number of writes recorded and not yet taken.
    pub fn write_count(&self) -> usize {
        self.0.borrow().writes.len()
    }

    /// Turn write recording on or off (large tests save memory).
    pub fn set_recording(&self, on: bool) {
        self.0.borrow_mut().record = on;
    }
}

impl PhysMem for TestMem {
    fn read_u64(&self, hpa: Hpa) -> u64 {
        let s = self.0.borrow();
        let word = (hpa.page_offset() / 8) as usize;
        // Fast path: a frame written before (live or in a region).
        if hpa.is_aligned(8) {
            if let Some(f) = s.frames.get(&(hpa.0 / PAGE_SIZE)) {
                return f[word];
            }
        }
        s.check(hpa, "read");
        0
    }

    fn write_u64(&mut self, hpa: Hpa, value: u64) {
        let mut s = self.0.borrow_mut();
        let frame = hpa.0 / PAGE_SIZE;
        let word = (hpa.page_offset() / 8) as usize;
        if !(hpa.is_aligned(8) && s.frames.contains_key(&frame)) {
            s.check(hpa, "write");
        }
        if s.record {
            s.writes.push((hpa, value));
        }
        s.frames
            .entry(frame)
            .or_insert_with(|| Box::new([0; WORDS]))[word] = value;
    }
}

impl TestAlloc {
    /// Cap the number of live frames (`None`: unlimited).
    pub fn set_limit(&mut self, max_live_frames: Option<usize>) {
        self.0.borrow_mut().limit = max_live_frames;
    }

    /// Frames currently allocated.
    pub fn live(&self) -> usize {
        self.0.borrow().live.len()
    }

    /// Allocations so far.
    pub fn allocs(&self) -> u64 {
        self.0.borrow().allocs
    }

    /// Frees so far.
    pub fn frees(&self) -> u64 {
        self.0.borrow().frees
    }

    /// Whether `hpa` is the start of a live allocated frame.
    pub fn is_live(&self, hpa: Hpa) -> bool {
        hpa.is_aligned(PAGE_SIZE) && self.0.borrow().live.contains(&(hpa.0 / PAGE_SIZE))
    }
}

impl FrameAlloc for TestAlloc {
    fn alloc_frame(&mut self) -> Result<Hpa, MemError> {
        let mut s = self.0.borrow_mut();
        if s.limit.is_some_and(|l| s.live.len() >= l) {
            return Err(MemError::OutOfFrames);
        }
        let frame = match s.free_list.pop() {
            Some(f) => f,
            None => {
                s.next += 1;
                s.next - 1
            }
        };
        // A reused frame comes back zeroed, as the trait promises.
        s.frames.remove(&frame);
        s.live.insert(frame);
        s.allocs += 1;
        Ok(Hpa(frame * PAGE_SIZE))
    }

    fn free_frame(&mut self, hpa: Hpa) {
        let mut s = self.0.borrow_mut();
        assert!(hpa.is_aligned(PAGE_SIZE), "free of unaligned {hpa:?}");
        let frame = hpa.0 / PAGE_SIZE;
        assert!(
            s.live.remove(&frame),
            "free of {hpa:?}: not allocated (double free?)"
        );
        s.frees += 1;
        // Contents go with the frame: the fast path in `read_u64` and
        // `write_u64` only finds frames that are live (or in a region).
        s.frames.remove(&frame);
        s.free_list.push(frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_zeroes_reused_frames_and_counts() {
        let (mut mem, mut alloc) = test_memory();
        let a = alloc.alloc_frame().unwrap();
        mem.write_u64(Hpa(a.0 + 8), 42);
        assert_eq!(mem.read_u64(Hpa(a.0 + 8)), 42);
        alloc.free_frame(a);
        let b = alloc.alloc_frame().unwrap();
        assert_eq!(a, b);
        assert_eq!(mem.read_u64(Hpa(b.0 + 8)), 0);
        assert_eq!((alloc.allocs(), alloc.frees(), alloc.live()), (2, 1, 1));
        assert_eq!(mem.take_writes(), alloc::vec![(Hpa(a.0 + 8), 42)]);
        alloc.set_limit(Some(1));
        assert_eq!(alloc.alloc_frame(), Err(MemError::OutOfFrames));
    }

    #[test]
    #[should_panic(expected = "not allocated")]
    fn use_after_free_panics() {
        let (mut mem, mut alloc) = test_memory();
        let a = alloc.alloc_frame().unwrap();
        alloc.free_frame(a);
        mem.write_u64(a, 1);
    }

    #[test]
    fn regions_are_accessible() {
        let (mut mem, _alloc) = test_memory();
        mem.add_region(Hpa(0x1000), 0x2000);
        mem.write_u64(Hpa(0x2ff8), 7);
        assert_eq!(mem.read_u64(Hpa(0x2ff8)), 7);
    }
}
