//! The bare-metal side of the image: `hv_boot_main`, the global allocator
//! and the panic handler.

use hypervisor::bootinfo::{self, BootInfo, BootMem};
use hypervisor::mem::heap::GlobalHeap;
use hypervisor::{logger, mem, power, serial};

#[global_allocator]
static ALLOCATOR: GlobalHeap = GlobalHeap;

/// Reads loader structures through the boot identity map (first 4 GiB).
struct IdentityBootMem;

impl BootMem for IdentityBootMem {
    fn read(&self, pa: u64, buf: &mut [u8]) -> bool {
        match pa.checked_add(buf.len() as u64) {
            Some(end) if end <= mem::BOOT_MAPPED_BYTES => {
                // SAFETY: the range is inside the boot identity map; loader
                // structures and the BIOS area are plain memory, read once.
                unsafe {
                    core::ptr::copy_nonoverlapping(pa as *const u8, buf.as_mut_ptr(), buf.len());
                }
                true
            }
            _ => false,
        }
    }
}

/// Heap size: an eighth of free memory, between 4 and 64 MiB.
fn heap_bytes(free_bytes: u64) -> u64 {
    (free_bytes / 8).clamp(4 << 20, 64 << 20)
}

/// Called by the 64-bit trampoline in entry.rs with the loader's magic (or
/// the PVH marker) and the physical address of its information structure.
#[no_mangle]
extern "C" fn hv_boot_main(magic: u32, info_pa: u32) -> ! {
    let serial_ok = serial::init();
    let info = match bootinfo::parse(&IdentityBootMem, magic, u64::from(info_pa)) {
        Ok(info) => info,
        Err(e) => {
            serial::write_fmt(format_args!("HYPERVISOR PANIC: boot information: {e}\n"));
            power::shutdown(3);
        }
    };
    let level = bootinfo::cmdline_value(info.cmdline(), "log")
        .and_then(logger::parse_level)
        .unwrap_or(log::LevelFilter::Info);
    logger::init(level);
    log::info!(
        "hvmigrate booting via {:?}: cmdline \"{}\", {} modules, {} MiB usable",
        info.protocol,
        info.cmdline(),
        info.modules().len(),
        info.usable_bytes() >> 20
    );
    if !serial_ok {
        // Nobody will read this, but the flow stays the same.
        log::warn!("no UART answered at COM1");
    }
    for r in info.regions() {
        log::debug!("memory {:#014x}-{:#014x} {:?}", r.base, r.end(), r.kind);
    }
    for (i, m) in info.modules().iter().enumerate() {
        log::debug!(
            "module {i}: {:#x}-{:#x} \"{}\"",
            m.start,
            m.end,
            m.cmdline()
        );
    }

    platform_init(&info)
}

fn platform_init(info: &BootInfo) -> ! {
    let image = crate::entry::image_range();
    if let Err(e) = mem::init_frames(info, image) {
        panic!("memory: {e}");
    }
    match mem::paging::init(info, image) {
        Ok(mapped) => log::debug!("host page tables: {} GiB identity-mapped", mapped >> 30),
        Err(e) => panic!("host paging: {e}"),
    }
    let (_, free) = mem::memory_stats();
    if let Err(e) = mem::heap::init(heap_bytes(free)) {
        panic!("heap: {e}");
    }
    log::debug!("heap: {} KiB", mem::heap::stats().0 >> 10);

    let name = bootinfo::cmdline_value(info.cmdline(), "name").unwrap_or("a");
    let cpus = 1;
    let (_, free) = mem::memory_stats();
    let mut node = hypervisor::node::Node::new(info);
    let vendor = match hvcore::host::Host::vendor(&node) {
        hvcore::vcpu::Vendor::Amd => "amd",
        hvcore::vcpu::Vendor::Intel => "intel",
    };
    serial::write_fmt(format_args!(
        "hvmigrate: node {name} up: vendor {vendor}, {cpus} cpus, {} MiB free\n",
        free >> 20
    ));
    vmm_service::run(&mut node)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    hypervisor::interrupts::disable();
    serial::write_fmt_emergency(format_args!("HYPERVISOR PANIC: {info}\n"));
    power::shutdown(3)
}
