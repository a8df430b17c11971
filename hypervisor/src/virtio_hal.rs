//! `virtio-drivers`' [`Hal`] for this hypervisor's virtio devices (the NICs
//! of `net`, the entropy device of `rng`): DMA memory from the frame
//! allocator, and addresses that need no translation because the host
//! identity-maps physical memory and the MMIO holes (`Hpa` == host virtual
//! address; mem/paging.rs maps non-RAM uncached). There is no IOMMU, so
//! sharing a buffer is just handing out its address.

use crate::mem;
use core::ptr::NonNull;
use hvcore::addr::Hpa;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// The HAL (no state: everything goes through the global allocators).
pub struct VirtioHal;

/// Highest address the host page tables map for MMIO (mem/paging.rs maps
/// at least the first 4 GiB).
const MMIO_MAPPED_END: u64 = 1 << 32;

// SAFETY: `dma_alloc` returns zeroed, page-aligned, identity-mapped frames
// owned by the caller until `dma_dealloc`; MMIO addresses are identity-mapped
// (checked below); shared buffers are identity-mapped heap memory.
unsafe impl Hal for VirtioHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(hpa) = mem::alloc_contiguous(pages as u64, 1) else {
            // The driver has no way to report this; a node that cannot get
            // a few pages for its NIC at boot is broken (STYLE 4, case 4).
            panic!("virtio: out of memory for {pages} DMA pages");
        };
        let Some(ptr) = NonNull::new(hpa.as_u64() as *mut u8) else {
            panic!("virtio: frame allocator returned address 0");
        };
        (hpa.as_u64(), ptr)
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        mem::free_contiguous(Hpa(paddr), pages as u64);
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        let end = paddr.checked_add(size as u64);
        assert!(
            end.is_some_and(|e| e <= MMIO_MAPPED_END) && paddr != 0,
            "virtio BAR at {paddr:#x} (+{size:#x}) is outside the identity map"
        );
        match NonNull::new(paddr as *mut u8) {
            Some(p) => p,
            None => unreachable!("checked non-zero above"),
        }
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        // Identity map: the virtual address is the physical one.
        buffer.as_ptr() as *mut u8 as u64
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

const _: () = assert!(PAGE_SIZE == 4096);
