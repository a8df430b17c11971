//! virtio-drivers' platform glue for the guest: DMA from a fixed pool in
//! `.bss` (the guest has no heap; memory is identity-mapped, so a buffer's
//! address is its guest-physical address) and the virtio-blk disk at
//! virtio-mmio slot 0 (0xd000_0000, docs/DESIGN.md "Devices").
//!
//! The disk is polled: virtio-drivers' blocking calls spin on the used
//! ring. The test kernel's machine has no interrupt controllers, so no
//! interrupt could reach it anyway; a Linux guest gets the slot's GSI.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// Guest-physical base of virtio-mmio slot `n`.
pub const fn slot_base(n: u64) -> u64 {
    0xd000_0000 + n * 0x1000
}
/// Bytes of a slot's register window.
const SLOT_BYTES: usize = 0x200;

/// Pages of the DMA pool: queue memory of a few devices.
const POOL_PAGES: usize = 16;

#[repr(C, align(4096))]
struct Pool([u8; POOL_PAGES * PAGE_SIZE]);

static mut POOL: Pool = Pool([0; POOL_PAGES * PAGE_SIZE]);
/// Pages of the pool handed out (never returned: devices live for ever).
static USED_PAGES: AtomicUsize = AtomicUsize::new(0);

/// The guest's [`Hal`].
pub struct GuestHal;

// SAFETY: `dma_alloc` hands out disjoint, zeroed, page-aligned ranges of a
// static pool that nothing else uses, identity-mapped so the physical
// address equals the pointer; `share` returns a buffer's own address
// (identity map, no bounce buffers), valid while the caller holds it.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let first = USED_PAGES.fetch_add(pages, Ordering::SeqCst);
        if first + pages > POOL_PAGES {
            crate::fail!("virtio DMA pool exhausted ({} pages)", POOL_PAGES);
        }
        // SAFETY: only the address of the pool is taken; `first + pages`
        // was checked to lie inside it.
        let base = unsafe { (&raw mut POOL.0).cast::<u8>().add(first * PAGE_SIZE) };
        let Some(ptr) = NonNull::new(base) else {
            crate::fail!("virtio DMA pool at address 0");
        };
        (base as PhysAddr, ptr)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // Identity map: the slot's physical address is its address.
        match NonNull::new(paddr as *mut u8) {
            Some(p) => p,
            None => crate::fail!("virtio MMIO at address 0"),
        }
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// The driver type of a disk.
pub type Disk = VirtIOBlk<GuestHal, MmioTransport<'static>>;

/// Open the virtio-blk disk in slot `n`, or fail the case naming why.
pub fn open_disk(n: u64) -> Disk {
    let Some(header) = NonNull::new(slot_base(n) as *mut VirtIOHeader) else {
        crate::fail!("virtio slot at address 0");
    };
    // SAFETY: the slot's window is device memory the hypervisor emulates
    // (identity-mapped by the start state's 4 GiB map), used by nothing
    // else in this kernel, for the kernel's whole life.
    let transport = match unsafe { MmioTransport::new(header, SLOT_BYTES) } {
        Ok(t) => t,
        Err(e) => crate::fail!("virtio slot {}: {}", n, e),
    };
    match VirtIOBlk::<GuestHal, _>::new(transport) {
        Ok(d) => d,
        Err(e) => crate::fail!("virtio-blk in slot {}: {}", n, e),
    }
}
