//! COM1 output: poll the line status register's "transmit holding register
//! empty" bit (LSR bit 5), then write the transmit holding register
//! (PC16550D data sheet, registers at base+5 and base+0).
//!
//! The writer keeps no state, so printing writes no guest memory except the
//! stack (the `dirty-log` case relies on that only indirectly: it prints
//! nothing during a round).

use core::fmt;

use hvcore::abi::COM1_PORT;

const THR: u16 = COM1_PORT;
const LSR: u16 = COM1_PORT + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;
/// Polls before writing anyway: a broken UART model must not hang the guest.
const MAX_POLLS: u32 = 100_000;

/// A zero-sized `fmt::Write` handle for COM1.
pub struct Com1;

impl Com1 {
    /// Send one byte.
    pub fn write_byte(byte: u8) {
        for _ in 0..MAX_POLLS {
            // SAFETY: reading COM1's LSR has no side effect on a 16550.
            if unsafe { crate::arch::inb(LSR) } & LSR_THR_EMPTY != 0 {
                break;
            }
        }
        // SAFETY: writing THR only transmits the byte.
        unsafe { crate::arch::outb(THR, byte) };
    }
}

impl fmt::Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(Com1::write_byte);
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    // Com1 never fails.
    let _ = fmt::Write::write_fmt(&mut Com1, args);
}

/// Print to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => ($crate::serial::_print(format_args!($($arg)*)));
}

/// Print a line to COM1 (`\n` only: the node's UART model splits on it).
#[macro_export]
macro_rules! println {
    () => ($crate::print!("\n"));
    ($($arg:tt)*) => ($crate::serial::_print(format_args!("{}\n", format_args!($($arg)*))));
}
