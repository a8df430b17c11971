//! Ending a case: print the outcome on COM1 (so it shows on the node console)
//! and report it with `HC_TEST_RESULT`, which stops the VM. Should the VM be
//! resumed anyway, the vCPU halts for good.

use core::fmt::{self, Write};

use crate::fmtbuf::FmtBuf;

/// `HC_TEST_RESULT` messages are at most 256 bytes.
pub type Message = FmtBuf<256>;

/// Report success and stop.
pub fn ok(msg: &str) -> ! {
    crate::hypercall::test_result(true, msg.as_bytes());
    crate::arch::halt_forever()
}

/// Report failure and stop.
pub fn fail(args: fmt::Arguments) -> ! {
    let mut msg = Message::new();
    let _ = msg.write_fmt(args);
    crate::println!("guest: FAILED: {}", msg.as_str());
    crate::hypercall::test_result(false, msg.as_bytes());
    crate::arch::halt_forever()
}

/// Fail the running case with a formatted reason.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => ($crate::report::fail(format_args!($($arg)*)));
}
