//! PCI configuration space through the legacy port mechanism (0xCF8 address,
//! 0xCFC data; PCI Local Bus Specification 3.0, 3.2.2.3.2), which QEMU's
//! `pc` and `q35` machines both provide, and discovery of virtio devices.
//!
//! The firmware (SeaBIOS) has assigned BARs before the hypervisor runs; this
//! module only reads them (through `virtio-drivers`' `PciRoot`) and enables
//! memory decoding and bus mastering on the devices the node drives.

use alloc::vec::Vec;
use virtio_drivers::transport::pci::bus::{Command, ConfigurationAccess, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::virtio_device_type;
use virtio_drivers::transport::DeviceType;
use x86_64::instructions::port::Port;

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;

/// Configuration access through ports 0xCF8/0xCFC. The node runs on one CPU
/// with interrupts masked outside `wait_for_interrupt`, so the two-step
/// address/data access is never interleaved.
pub struct PortCam;

impl PortCam {
    fn address(df: DeviceFunction, offset: u8) -> u32 {
        // Enable bit 31, bus 23:16, device 15:11, function 10:8, dword
        // register 7:2 (PCI 3.0, 3.2.2.3.2).
        (1 << 31)
            | (u32::from(df.bus) << 16)
            | (u32::from(df.device & 0x1f) << 11)
            | (u32::from(df.function & 0x7) << 8)
            | u32::from(offset & 0xfc)
    }
}

impl ConfigurationAccess for PortCam {
    fn read_word(&self, df: DeviceFunction, register_offset: u8) -> u32 {
        // SAFETY: 0xCF8/0xCFC are the PCI configuration ports on every PC
        // machine QEMU and Bochs emulate; only this module uses them.
        unsafe {
            Port::<u32>::new(CONFIG_ADDRESS).write(Self::address(df, register_offset));
            Port::<u32>::new(CONFIG_DATA).read()
        }
    }

    fn write_word(&mut self, df: DeviceFunction, register_offset: u8, data: u32) {
        // SAFETY: as in `read_word`; the callers write only the command
        // register and virtio's own configuration fields.
        unsafe {
            Port::<u32>::new(CONFIG_ADDRESS).write(Self::address(df, register_offset));
            Port::<u32>::new(CONFIG_DATA).write(data);
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortCam
    }
}

/// The PCI root over port configuration access.
pub fn root() -> PciRoot<PortCam> {
    PciRoot::new(PortCam)
}

/// Virtio devices of `kind` on bus 0, in slot order, with memory decoding
/// and bus mastering enabled.
pub fn find_virtio(root: &mut PciRoot<PortCam>, kind: DeviceType) -> Vec<DeviceFunction> {
    let found: Vec<DeviceFunction> = root
        .enumerate_bus(0)
        .filter(|(_, info)| virtio_device_type(info) == Some(kind))
        .map(|(df, _)| df)
        .collect();
    for df in &found {
        root.set_command(*df, Command::MEMORY_SPACE | Command::BUS_MASTER);
    }
    found
}
