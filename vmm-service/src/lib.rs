//! The root partition service.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

use hvcore::host::Host;

/// Run the node's service loop for ever (or until the node shuts down).
pub fn run(host: &mut dyn Host) -> ! {
    host.console_write("vmm-service: not built yet\n");
    host.shutdown(1)
}
