//! The guest test kernel: one ELF for every test case, the case picked by the
//! command line (`case=NAME [role=a|b]`, docs/DESIGN.md "Test cases").
//!
//! Built for `x86_64-unknown-none` it is the kernel; on the host it is an
//! empty `main` whose unit tests exercise the pure modules (`cmdline`,
//! `fmtbuf`, `layout`, `rng`).
//!
//! Start (hvcore::abi): 64-bit mode, interrupts off, identity map, RDI = boot
//! params GPA. `_start` zeroes `.bss`, switches to the kernel's own 64 KiB
//! stack and calls [`guest_main`], which decides the hypercall instruction,
//! installs the IDT, validates the boot params and runs the case. Every case
//! ends in `HC_TEST_RESULT` (or runs for ever); a panic reports failure.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg_attr(not(target_os = "none"), allow(dead_code))]
mod cmdline;
#[cfg_attr(not(target_os = "none"), allow(dead_code))]
mod fmtbuf;
#[cfg_attr(not(target_os = "none"), allow(dead_code))]
mod layout;
#[cfg_attr(not(target_os = "none"), allow(dead_code))]
mod rng;

#[cfg(target_os = "none")]
mod arch;
#[cfg(target_os = "none")]
mod cases;
#[cfg(target_os = "none")]
mod hypercall;
#[cfg(target_os = "none")]
mod idt;
#[cfg(target_os = "none")]
mod report;
#[cfg(target_os = "none")]
#[macro_use]
mod serial;
#[cfg(target_os = "none")]
mod virtio;

#[cfg(not(target_os = "none"))]
fn main() {}

/// Bytes of the kernel stack (in `.bss`, page-aligned so a dirty-log round
/// can touch whole pages of it).
#[cfg(target_os = "none")]
const STACK_BYTES: usize = 64 * 1024;

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
.section .bss.guest_stack,"aw",@nobits
.balign 4096
.global guest_stack_bottom
guest_stack_bottom:
    .skip {stack_bytes}
.global guest_stack_top
guest_stack_top:

.section .text._start,"ax",@progbits
.global _start
_start:
    cli
    cld
    mov r12, rdi
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    xor eax, eax
    rep stosb
    lea rsp, [rip + guest_stack_top]
    xor ebp, ebp
    mov rdi, r12
    call guest_main
2:
    cli
    hlt
    jmp 2b
"#,
    stack_bytes = const STACK_BYTES,
);

#[cfg(target_os = "none")]
extern "C" {
    static guest_stack_bottom: u8;
    static guest_stack_top: u8;
    static __kernel_end: u8;
}

/// What every case may use: the validated boot parameters and the memory
/// facts derived from them.
#[cfg(target_os = "none")]
pub struct Env<'a> {
    /// The boot parameters (magic checked, sizes sane).
    pub params: hvcore::abi::BootParams,
    /// The parsed command line.
    pub args: cmdline::GuestArgs<'a>,
    /// First free GPA (page-aligned), after the kernel image and its `.bss`.
    pub free_start: u64,
    /// The kernel stack `[bottom, top)`.
    pub stack_bottom: u64,
    pub stack_top: u64,
}

/// Called by `_start` on the kernel stack with RDI = boot params GPA.
#[cfg(target_os = "none")]
#[no_mangle]
extern "C" fn guest_main(boot_params_gpa: u64) -> ! {
    use hvcore::abi::{BootParams, CMDLINE_MAX};

    hypercall::init();
    idt::init();

    let mut raw = [0u8; BootParams::SIZE];
    // SAFETY: the boot params page is guest RAM below 1 MiB, identity-mapped
    // (abi.rs start state); a copy is taken and validated before use.
    unsafe {
        core::ptr::copy_nonoverlapping(boot_params_gpa as *const u8, raw.as_mut_ptr(), raw.len())
    };
    let Some(params) = BootParams::from_bytes(&raw) else {
        fail!("bad boot params magic at GPA {:#x}", boot_params_gpa);
    };
    // The identity map covers 4 GiB: RAM beyond it is unreachable.
    if params.ram_bytes == 0 || params.ram_bytes > 4 << 30 {
        fail!("boot params: implausible ram_bytes {:#x}", params.ram_bytes);
    }
    let cmdline_len = params.cmdline_len.min(CMDLINE_MAX as u64);
    if params
        .cmdline_gpa
        .checked_add(cmdline_len)
        .is_none_or(|end| end > params.ram_bytes)
    {
        fail!(
            "boot params: command line at {:#x} (+{}) is outside RAM",
            params.cmdline_gpa,
            cmdline_len
        );
    }
    // SAFETY: the range was checked to lie in guest RAM, which is identity
    // mapped; the VMM wrote it before starting us and nothing writes it now.
    let line = unsafe {
        core::slice::from_raw_parts(params.cmdline_gpa as *const u8, cmdline_len as usize)
    };
    let Ok(line) = core::str::from_utf8(line) else {
        fail!("command line is not UTF-8");
    };

    // Linker-script and asm symbols: only their addresses are used.
    let (stack_bottom, stack_top, image_end) = (
        &raw const guest_stack_bottom as u64,
        &raw const guest_stack_top as u64,
        &raw const __kernel_end as u64,
    );
    let env = Env {
        params,
        args: cmdline::parse(line),
        free_start: layout::free_start(params.kernel_end_gpa, image_end),
        stack_bottom,
        stack_top,
    };
    if env.free_start >= params.ram_bytes {
        fail!(
            "no free RAM: image ends at {:#x}, RAM at {:#x}",
            env.free_start,
            params.ram_bytes
        );
    }
    cases::run(&env)
}

/// `hvcore` links `alloc`, so a global allocator must exist; the guest
/// never allocates, and one that always fails makes any attempt a clear
/// failure (allocation error -> panic -> failed case) rather than silent.
#[cfg(target_os = "none")]
struct NoAlloc;

// SAFETY: `alloc` always returns null, which GlobalAlloc allows (allocation
// failure); `dealloc` is never reached with a pointer from `alloc`.
#[cfg(target_os = "none")]
unsafe impl core::alloc::GlobalAlloc for NoAlloc {
    unsafe fn alloc(&self, _layout: core::alloc::Layout) -> *mut u8 {
        core::ptr::null_mut()
    }
    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: core::alloc::Layout) {}
}

#[cfg(target_os = "none")]
#[global_allocator]
static ALLOCATOR: NoAlloc = NoAlloc;

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    match info.location() {
        Some(loc) => fail!("panic at {}:{}: {}", loc.file(), loc.line(), info.message()),
        None => fail!("panic: {}", info.message()),
    }
}
