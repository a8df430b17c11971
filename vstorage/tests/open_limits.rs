//! Resource limits of opening hostile VHDX files, measured for real: a
//! counting global allocator records the peak of live heap bytes while a
//! file opens, and the wall time is taken around the same call.
//!
//! - A BAT of 200,000 payload entries (half allocated, half zero-state with
//!   file offsets, at distinct descending offsets) opens in O(n log n) time
//!   and in memory proportional to the BAT itself (MS-VHDX 2.5).
//! - A parent locator claiming 3,000 entries of 64 KiB keys and values is
//!   refused as corrupt, quickly and in well under 50 MB.
//!
//! The figures are printed (`cargo test --release -p vstorage --test
//! open_limits -- --nocapture`); the time bounds are generous in debug builds.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vstorage::io::{DiskError, FileIo, VirtualDisk};
use vstorage::vhdx::{crafted, OpenOptions, Vhdx};

/// Counts live heap bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::SeqCst) + n;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

fn shrank(n: usize) {
    LIVE.fetch_sub(n, Ordering::SeqCst);
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged and only adds bookkeeping, so `System`'s guarantees hold.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract; passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (hence `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `realloc`'s contract; passed on as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One measurement at a time: the counters are process-wide.
static MEASURE: Mutex<()> = Mutex::new(());

/// Runs `f`, returning its result, the wall time and the peak of heap
/// bytes allocated on top of what was live when it started.
fn measure<T>(f: impl FnOnce() -> T) -> (T, Duration, usize) {
    let _g = MEASURE.lock().unwrap_or_else(|e| e.into_inner());
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let t = Instant::now();
    let r = f();
    let el = t.elapsed();
    let peak = PEAK.load(Ordering::SeqCst).saturating_sub(base);
    (r, el, peak)
}

const MB: f64 = 1e6;
const BLOCKS: u64 = 200_000;

/// Debug builds are ~10-30x slower than release: scale the time bounds.
fn time_bound(release: Duration) -> Duration {
    if cfg!(debug_assertions) {
        release * 20
    } else {
        release
    }
}

#[test]
fn bat_of_200k_crafted_entries_opens_fast_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bat-stress.vhdx");
    let apparent = crafted::bat_stress_file(&path, BLOCKS).unwrap();
    let on_disk = std::fs::metadata(&path).unwrap().len();
    assert_eq!(on_disk, apparent);
    let (d, took, peak) = measure(|| {
        Vhdx::open(
            FileIo::open(&path, false).unwrap(),
            OpenOptions::read_only(),
        )
    });
    let mut d = d.unwrap();
    let bat_bytes = d.geometry().bat_entries() * 8;
    println!(
        "open of a {BLOCKS}-block crafted BAT ({:.1} MB BAT): {:.1} ms, peak heap {:.1} MB",
        bat_bytes as f64 / MB,
        took.as_secs_f64() * 1e3,
        peak as f64 / MB
    );
    // The BAT is held in memory (padded to 4 KiB pages); open may add at
    // most as much again for its checks, plus a fixed amount for headers,
    // tables and metadata.
    let bound = 2 * bat_bytes as usize + (4 << 20);
    assert!(
        peak <= bound,
        "open used {peak} bytes of heap at its peak, above {bound}"
    );
    assert!(
        took < time_bound(Duration::from_secs(1)),
        "open took {took:?}"
    );
    // The file opened with what it says: every other block allocated, the
    // zero-state ones read as zeros, and they are reused by a write.
    assert_eq!(d.virtual_size(), BLOCKS << 20);
    let ranges = d.allocated_ranges().unwrap();
    assert_eq!(ranges.len() as u64, BLOCKS / 2);
    let mut buf = vec![0xFFu8; 4096];
    d.read(1 << 20, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    drop(d);
    let mut w = Vhdx::open(
        FileIo::open(&path, true).unwrap(),
        OpenOptions::read_write(3),
    )
    .unwrap();
    w.write(1 << 20, &[0x5A; 4096]).unwrap();
    w.close().unwrap();
    drop(w);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        apparent,
        "the zero-state block's own space was reused, the file did not grow"
    );
}

#[test]
fn parent_locator_of_3000_entries_is_refused_cheaply() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locator-bomb.vhdx");
    std::fs::write(&path, crafted::locator_bomb(3000).unwrap()).unwrap();
    let (r, took, peak) = measure(|| {
        Vhdx::open(
            FileIo::open(&path, false).unwrap(),
            OpenOptions::read_only(),
        )
    });
    println!(
        "open of a 3,000-entry parent locator: refused in {:.1} ms, peak heap {:.1} MB",
        took.as_secs_f64() * 1e3,
        peak as f64 / MB
    );
    match r {
        Err(DiskError::Corrupt(m)) => assert!(m.contains("parent locator"), "{m}"),
        other => panic!("expected a corruption error, got {other:?}"),
    }
    assert!(peak < 50_000_000, "refusing it used {peak} bytes");
    assert!(
        took < time_bound(Duration::from_millis(500)),
        "refusing it took {took:?}"
    );
}
