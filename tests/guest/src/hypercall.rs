//! Hypercalls (hvcore::abi): number in RAX, arguments in RDI, RSI, RDX, R10;
//! results in RAX, RDI, RSI. AMD uses `vmmcall`, Intel `vmcall` (AMD APM
//! vol. 3 "VMMCALL"; Intel SDM vol. 2B "VMCALL"); the wrong one is #UD, so
//! the vendor is decided once, from CPUID leaf 0, before any call.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

use hvcore::abi;

/// Set once by [`init`]; only read afterwards.
static USE_VMCALL: AtomicBool = AtomicBool::new(false);

/// Pick the instruction from the CPU vendor (`GenuineIntel` -> `vmcall`).
pub fn init() {
    let id = crate::arch::cpuid(0, 0);
    let intel = id.ebx.to_le_bytes() == *b"Genu"
        && id.edx.to_le_bytes() == *b"ineI"
        && id.ecx.to_le_bytes() == *b"ntel";
    USE_VMCALL.store(intel, Ordering::Relaxed);
}

/// What a hypercall returned.
#[derive(Clone, Copy, Debug)]
pub struct HcResult {
    pub rax: u64,
    pub rdi: u64,
    pub rsi: u64,
}

impl HcResult {
    /// Whether RAX holds an error value (>= `HC_ERR_FIRST`).
    pub fn is_err(&self) -> bool {
        self.rax >= abi::HC_ERR_FIRST
    }
}

/// Name of an error value in RAX, for messages.
pub fn err_name(rax: u64) -> &'static str {
    match rax {
        abi::HC_ERR_UNKNOWN => "unknown hypercall",
        abi::HC_ERR_INVALID => "invalid argument",
        abi::HC_ERR_FAILED => "failed",
        abi::HC_ERR_BUSY => "busy",
        abi::HC_ERR_UNSUPPORTED => "unsupported",
        _ => "error",
    }
}

/// Make a raw hypercall.
///
/// # Safety
/// The hypervisor may read or write guest memory named by the arguments
/// (`HC_FILL_PAGE` writes a whole page): such memory must not hold anything
/// the guest still needs, and buffers it reads must be valid for their
/// length.
pub unsafe fn raw(nr: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> HcResult {
    let (rax, rdi, rsi);
    if USE_VMCALL.load(Ordering::Relaxed) {
        // SAFETY: the caller vouches for the memory effects; the asm block
        // is not `nomem`, so the compiler assumes memory may change.
        unsafe {
            asm!("vmcall", inout("rax") nr => rax, inout("rdi") a0 => rdi,
                 inout("rsi") a1 => rsi, inout("rdx") a2 => _, inout("r10") a3 => _,
                 options(nostack));
        }
    } else {
        // SAFETY: as above.
        unsafe {
            asm!("vmmcall", inout("rax") nr => rax, inout("rdi") a0 => rdi,
                 inout("rsi") a1 => rsi, inout("rdx") a2 => _, inout("r10") a3 => _,
                 options(nostack));
        }
    }
    HcResult { rax, rdi, rsi }
}

/// `HC_TEST_RESULT`: report and stop. Returns only if the hypervisor let the
/// VM run on (then the caller halts).
pub fn test_result(ok: bool, msg: &[u8]) {
    let len = msg.len().min(256) as u64;
    // SAFETY: the hypervisor only reads `len` bytes of `msg` (identity map:
    // its address is its GPA).
    unsafe {
        raw(
            abi::HC_TEST_RESULT,
            u64::from(!ok),
            msg.as_ptr() as u64,
            len,
            0,
        )
    };
}

/// `HC_DIRTY_LOG_ENABLE(tracker)` (`abi::DIRTY_TRACKER_*`).
pub fn dirty_log_enable(tracker: u64) -> HcResult {
    // SAFETY: no guest memory is named.
    unsafe { raw(abi::HC_DIRTY_LOG_ENABLE, tracker, 0, 0, 0) }
}

/// `HC_DIRTY_LOG_DISABLE`.
pub fn dirty_log_disable() -> HcResult {
    // SAFETY: no guest memory is named.
    unsafe { raw(abi::HC_DIRTY_LOG_DISABLE, 0, 0, 0, 0) }
}

/// `HC_DIRTY_LOG_CHECK` against `bitmap` (bit n = frame n).
pub fn dirty_log_check(bitmap: &[u64]) -> HcResult {
    // SAFETY: the hypervisor only reads the bitmap, valid for its length.
    unsafe {
        raw(
            abi::HC_DIRTY_LOG_CHECK,
            bitmap.as_ptr() as u64,
            (bitmap.len() * 8) as u64,
            0,
            0,
        )
    }
}

/// `HC_FILL_PAGE`: the hypervisor writes `byte` over the page at `gpa`.
///
/// # Safety
/// The page at `gpa` must hold nothing the guest still needs.
pub unsafe fn fill_page(gpa: u64, byte: u8) -> HcResult {
    // SAFETY: the caller gives the page up.
    unsafe { raw(abi::HC_FILL_PAGE, gpa, u64::from(byte), 0, 0) }
}

/// `HC_PROGRESS(counter)`.
pub fn progress(counter: u64) -> HcResult {
    // SAFETY: no guest memory is named.
    unsafe { raw(abi::HC_PROGRESS, counter, 0, 0, 0) }
}

/// `HC_NOP(x)`: returns x + 1 in RAX.
pub fn nop(x: u64) -> HcResult {
    // SAFETY: no guest memory is named.
    unsafe { raw(abi::HC_NOP, x, 0, 0, 0) }
}

/// `HC_MIGRATION_STATUS`: RAX = completed migrations of this VM, RDI =
/// failed or cancelled ones.
pub fn migration_status() -> HcResult {
    // SAFETY: no guest memory is named.
    unsafe { raw(abi::HC_MIGRATION_STATUS, 0, 0, 0, 0) }
}
