//! The node console: COM1 (I/O port 0x3F8), 115200 8N1, behind one lock.
//!
//! Every line the hypervisor prints (log records, serial markers, guest
//! console lines forwarded by the service) goes through [`write_str`] /
//! [`write_fmt`], which hold the lock for the whole message so lines from
//! different places never interleave. The timer interrupt never prints, so
//! taking the lock with interrupts enabled cannot deadlock; the fault path,
//! which may interrupt a holder, uses [`write_fmt_emergency`].
//!
//! Before [`init`] (or when no UART answers) output is dropped.

use core::fmt::{self, Write};
use spin::Mutex;
use uart_16550::backend::PioBackend;
use uart_16550::spec::registers::LSR;
use uart_16550::{BaudRate, Config, Uart16550};

/// COM1 base port.
pub const COM1_PORT: u16 = 0x3F8;

struct Console {
    uart: Option<Uart16550<PioBackend>>,
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if let Some(uart) = self.uart.as_mut() {
            for chunk in s.as_bytes().split_inclusive(|b| *b == b'\n') {
                match chunk.split_last() {
                    // Terminals want CR LF; the markers are matched per line,
                    // so a trailing CR is harmless to parsers.
                    Some((b'\n', body)) => {
                        uart.send_bytes_exact(body);
                        uart.send_bytes_exact(b"\r\n");
                    }
                    _ => uart.send_bytes_exact(chunk),
                }
            }
        }
        Ok(())
    }
}

static CONSOLE: Mutex<Console> = Mutex::new(Console { uart: None });

/// Initialise COM1. Returns whether a UART answered.
pub fn init() -> bool {
    // SAFETY: COM1's eight ports belong to the hypervisor's console for the
    // whole run; nothing else drives them.
    let uart = unsafe { Uart16550::new_port(COM1_PORT) };
    let Ok(mut uart) = uart else {
        return false;
    };
    // 115200 baud: the crate's default is 9600, which Bochs emulates
    // faithfully (about 1 ms per character of simulated time).
    let config = Config {
        baud_rate: BaudRate::Baud115200,
        ..Config::default()
    };
    if uart.init(config).is_err() {
        return false;
    }
    CONSOLE.lock().uart = Some(uart);
    true
}

/// Write `s` to the console as is.
pub fn write_str(s: &str) {
    let _ = CONSOLE.lock().write_str(s);
}

/// Write formatted text to the console under one lock hold.
pub fn write_fmt(args: fmt::Arguments<'_>) {
    let _ = CONSOLE.lock().write_fmt(args);
}

/// Write from a context that may have interrupted a lock holder (the fault
/// handler, the panic handler). Breaks the lock if it is held: a torn line is
/// better than a silent hang. Single CPU: the holder cannot be running.
pub fn write_fmt_emergency(args: fmt::Arguments<'_>) {
    if CONSOLE.is_locked() {
        // SAFETY: the only CPU is here, so the holder is suspended below us
        // and will never observe the broken lock before power-off.
        unsafe { CONSOLE.force_unlock() };
    }
    let _ = CONSOLE.lock().write_fmt(args);
}

/// Wait until the UART has shifted out every byte (LSR.TEMT), bounded, so
/// that a power-off right after does not cut the last line (Bochs models
/// the transmit time of each character).
pub fn flush() {
    if CONSOLE.is_locked() {
        // SAFETY: as in `write_fmt_emergency`: single CPU, power-off path.
        unsafe { CONSOLE.force_unlock() };
    }
    let mut console = CONSOLE.lock();
    if let Some(uart) = console.uart.as_mut() {
        for _ in 0..1_000_000 {
            if uart.lsr().contains(LSR::TRANSMITTER_EMPTY) {
                break;
            }
            core::hint::spin_loop();
        }
    }
}

/// `print!` to the console (no log prefix).
#[macro_export]
macro_rules! console_print {
    ($($arg:tt)*) => {
        $crate::serial::write_fmt(format_args!($($arg)*))
    };
}
