//! Powering the node off: the one exit path of the hypervisor.
//!
//! Order (docs/DESIGN.md, "Power-off"): print `hvmigrate: shutdown code=N`,
//! write the code to QEMU's `isa-debug-exit` (port 0xf4; QEMU exits with
//! `(code << 1) | 1`), write "Shutdown" to Bochs's port 0x8900, then stop the
//! CPU with interrupts off for ever. On a machine with neither device the
//! last step is what happens.
//!
//! Imports nothing of the interrupt layer (which calls in here): CLI comes
//! straight from the `x86_64` crate.

use crate::{cpu, serial};
use x86_64::instructions::interrupts;
use x86_64::instructions::port::Port;

/// QEMU `-device isa-debug-exit,iobase=0xf4,iosize=0x04`.
const QEMU_DEBUG_EXIT_PORT: u16 = 0xf4;
/// Bochs's power-off port: writing the string "Shutdown" ends the simulation.
const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;

/// Print the shutdown marker and power off with `code` (0 = success).
pub fn shutdown(code: u8) -> ! {
    interrupts::disable();
    serial::write_fmt(format_args!("hvmigrate: shutdown code={code}\n"));
    power_off(code)
}

/// Power off without printing anything.
pub fn power_off(code: u8) -> ! {
    interrupts::disable();
    serial::flush();
    // SAFETY: both ports belong to emulator power-off devices that this node
    // owns; on hardware without them the writes are ignored.
    unsafe {
        Port::<u32>::new(QEMU_DEBUG_EXIT_PORT).write(u32::from(code));
        for b in b"Shutdown" {
            Port::<u8>::new(BOCHS_SHUTDOWN_PORT).write(*b);
        }
    }
    halt_forever()
}

/// `cli; hlt` for ever.
pub fn halt_forever() -> ! {
    loop {
        interrupts::disable();
        cpu::hlt();
    }
}
