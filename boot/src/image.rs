//! The bare-metal side of the image: `hv_boot_main`, the global allocator
//! and the panic handler.

use hypervisor::bootinfo::{self, BootInfo, BootMem};
use hypervisor::mem::heap::GlobalHeap;
use hypervisor::{acpi, gdt, interrupts, lapic, logger, mem, power, serial, time};

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
    time::mark_boot();
    let serial_ok = serial::init();
    let info = match bootinfo::parse(&IdentityBootMem, magic, u64::from(info_pa)) {
        Ok(info) => info,
        Err(e) => {
            serial::write_fmt(format_args!("HYPERVISOR PANIC: boot information: {e}\n"));
            power::shutdown(3);
        }
    };
    let log_arg = bootinfo::cmdline_value(info.cmdline(), "log");
    let level = log_arg.and_then(logger::parse_level);
    logger::init(level.unwrap_or(log::LevelFilter::Info));
    if let (Some(arg), None) = (log_arg, level) {
        log::warn!("log={arg} is not a level (error, warn, info, debug, trace); using info");
    }
    log::info!(
        "hvmigrate booting via {:?}: cmdline \"{}\", {} modules, {} MiB usable",
        info.protocol,
        Redacted(info.cmdline()),
        info.modules().len(),
        info.usable_bytes() >> 20
    );
    if !serial_ok {
        // Nobody will read this, but the flow stays the same.
        log::warn!("no UART answered at COM1");
    }
    if info.regions_dropped > 0 {
        log::warn!(
            "memory map: {} entries beyond the first {} ignored",
            info.regions_dropped,
            bootinfo::MAX_MEM_REGIONS
        );
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

/// Preemption timer period.
const TIMER_PERIOD_NS: u64 = 4_000_000;

fn platform_init(info: &BootInfo) -> ! {
    gdt::init();
    interrupts::init();
    // LAPIC and clock first, so that every later log line has a real time.
    let lapic_base = lapic::init().unwrap_or_else(|e| panic!("LAPIC: {e}"));
    let cal = time::calibrate();
    if !cal.measured {
        log::warn!("PIT calibration failed; assuming a 1 GHz TSC");
    }
    log::debug!(
        "TSC {} MHz, LAPIC timer {} kHz (/16), calibrated at {} us",
        cal.tsc_hz / 1_000_000,
        cal.lapic_timer_hz / 1000,
        time::now_ns() / 1000
    );

    let layout = crate::entry::image_layout();
    log::debug!(
        "image {:#x}-{:#x} (text to {:#x}, rodata to {:#x}), stack guard page {:#x}",
        layout.start,
        layout.end,
        layout.rodata_start,
        layout.data_start,
        layout.stack_guard
    );
    if let Err(e) = mem::init_frames(info, (layout.start, layout.end)) {
        panic!("memory: {e}");
    }
    match mem::paging::init(info, &layout) {
        Ok(mapped) => log::debug!("host page tables: {} GiB identity-mapped", mapped >> 30),
        Err(e) => panic!("host paging: {e}"),
    }
    let (_, free) = mem::memory_stats();
    if let Err(e) = mem::heap::init(heap_bytes(free)) {
        panic!("heap: {e}");
    }
    log::debug!("heap: {} KiB", mem::heap::stats().0 >> 10);

    let madt = match acpi::read_madt(info.rsdp) {
        Ok(m) => {
            log::debug!(
                "ACPI MADT: {} cpus, {} I/O APICs, LAPIC at {:#x}",
                m.cpus,
                m.ioapics,
                m.lapic_address
            );
            if m.lapic_address != lapic_base {
                log::warn!(
                    "MADT LAPIC address {:#x} differs from IA32_APIC_BASE {lapic_base:#x}",
                    m.lapic_address
                );
            }
            Some(m)
        }
        Err(e) => {
            log::warn!("{e}; assuming one CPU");
            None
        }
    };
    lapic::start_periodic(cal.lapic_timer_hz, TIMER_PERIOD_NS);
    if log::log_enabled!(log::Level::Debug) {
        check_timer();
    }
    if let Some(kind) = bootinfo::cmdline_value(info.cmdline(), "fault-test") {
        log::info!("fault-test={kind}: faulting on purpose");
        interrupts::trigger_test_fault(kind);
        log::warn!("fault-test={kind}: unknown kind (int3, ud, pf, gp)");
    }
    // Backend smoke test instead of the service: `selftest=1`, or `=2` with
    // the timer-preemption check.
    if let Some(level) = bootinfo::cmdline_value(info.cmdline(), "selftest") {
        let passed = hypervisor::virt::selftest::run(level == "2");
        serial::write_fmt(format_args!(
            "selftest: {}\n",
            if passed { "ok" } else { "FAILED" }
        ));
        hypervisor::power::shutdown(if passed { 0 } else { 1 });
    }

    let name = bootinfo::cmdline_value(info.cmdline(), "name").unwrap_or("a");
    let cpus = madt.map_or(1, |m| m.cpus.max(1));
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

/// Debug check that the preemption timer ticks: open interrupts for 40 ms
/// of node time and report the ticks taken.
fn check_timer() {
    let start_ticks = lapic::ticks();
    let start = time::now_ns();
    while time::now_ns() - start < 40_000_000 {
        interrupts::wait_for_interrupt();
    }
    log::debug!(
        "timer: {} ticks in 40 ms (period {} us)",
        lapic::ticks() - start_ticks,
        lapic::period_ns() / 1000
    );
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    hypervisor::interrupts::disable();
    match info.location() {
        Some(at) => serial::write_fmt_emergency(format_args!(
            "HYPERVISOR PANIC: {} at {}:{}\n",
            info.message(),
            at.file(),
            at.line()
        )),
        None => serial::write_fmt_emergency(format_args!("HYPERVISOR PANIC: {}\n", info.message())),
    }
    power::shutdown(3)
}

/// The command line with the cluster key's value left out: the serial log
/// is kept in files and shown to users, the key is a secret.
struct Redacted<'a>(&'a str);

impl core::fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, word) in self.0.split_ascii_whitespace().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            if word.starts_with("key=") {
                write!(f, "{sep}key=<redacted>")?;
            } else {
                write!(f, "{sep}{word}")?;
            }
        }
        Ok(())
    }
}
