//! Node stores: virtio-9p PCI devices (QEMU `-fsdev local,...` +
//! `-device virtio-9p-pci,fsdev=...,mount_tag=TAG`; docs/DESIGN.md "Node
//! stores") behind [`hvcore::host::StoreChannel`].
//!
//! `virtio-drivers`' `VirtIO9p` moves one whole 9P message out and one in
//! (`request`: a device-readable and a device-writable descriptor, polled
//! until the device has used them; no interrupts). This module adds only
//! the bounds: requests of at most [`MSG_MAX_BYTES`], and a reply length
//! the device reports is checked against the buffer it was given (the
//! driver compares it with the reply's size field but not with the
//! buffer). The 9P protocol itself, and every byte of the reply, is the
//! service's (`vstorage::p9`).
//!
//! Buffers are heap memory, which is identity-mapped and physically
//! contiguous (`mem::heap`), so the device reads and writes them in place.
//! QEMU requires the reply buffer to hold any reply the request may get
//! (it marks the device broken otherwise): the client always offers the
//! whole negotiated msize.

use crate::pci;
use crate::virtio_hal::VirtioHal;
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use hvcore::host::{StoreChannel, StoreIoError};
use virtio_drivers::device::virtio_9p::VirtIO9p;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::DeviceType;

/// Largest message either way: the msize cap offered to the client. QEMU
/// accepts any msize from 4096 up; 512 KiB moves a read or write of half a
/// megabyte per round trip (Linux's virtio client allows the same).
pub const MSG_MAX_BYTES: u32 = 512 * 1024;
/// Shortest 9P message (its header).
const HEADER_BYTES: usize = 7;

/// One store device.
pub struct StoreDevice {
    dev: VirtIO9p<VirtioHal, PciTransport>,
    tag: String,
}

/// Every virtio-9p device on bus 0, in slot order. A device the driver
/// refuses is logged and skipped (the node runs without that store).
pub fn init() -> Vec<StoreDevice> {
    let mut root = pci::root();
    let mut out = Vec::new();
    for df in pci::find_virtio(&mut root, DeviceType::_9P) {
        let transport = match PciTransport::new::<VirtioHal, _>(&mut root, df) {
            Ok(t) => t,
            Err(e) => {
                log::error!(
                    "virtio-9p at pci 00:{:02x}.{}: no modern PCI transport ({e:?}); store skipped",
                    df.device,
                    df.function
                );
                continue;
            }
        };
        match VirtIO9p::<VirtioHal, _>::new(transport) {
            Ok(dev) => {
                let tag = String::from(dev.mount_tag());
                log::info!(
                    "virtio-9p: store device '{tag}' at pci 00:{:02x}.{}",
                    df.device,
                    df.function
                );
                out.push(StoreDevice { dev, tag });
            }
            Err(e) => log::error!(
                "virtio-9p at pci 00:{:02x}.{}: initialisation failed ({e:?}); store skipped",
                df.device,
                df.function
            ),
        }
    }
    out
}

/// The devices as the service's channels.
pub fn channels(devices: Vec<StoreDevice>) -> Vec<Box<dyn StoreChannel>> {
    devices
        .into_iter()
        .map(|d| Box::new(d) as Box<dyn StoreChannel>)
        .collect()
}

impl StoreChannel for StoreDevice {
    fn tag(&self) -> &str {
        &self.tag
    }

    fn max_message_bytes(&self) -> u32 {
        MSG_MAX_BYTES
    }

    fn transact(&mut self, request: &[u8], reply: &mut [u8]) -> Result<usize, StoreIoError> {
        if request.len() < HEADER_BYTES || request.len() > MSG_MAX_BYTES as usize {
            return Err(StoreIoError::BadRequest {
                len: request.len(),
                max: MSG_MAX_BYTES,
            });
        }
        let room = reply.len().min(MSG_MAX_BYTES as usize);
        let reply = &mut reply[..room];
        let used = self.dev.request(request, reply).map_err(|e| match e {
            virtio_drivers::Error::InvalidParam => {
                StoreIoError::Device("reply buffer shorter than a 9P header")
            }
            virtio_drivers::Error::QueueFull | virtio_drivers::Error::NotReady => {
                StoreIoError::Device("virtqueue not ready")
            }
            virtio_drivers::Error::IoError => {
                StoreIoError::Device("the reply's size field disagrees with its length")
            }
            _ => StoreIoError::Device("request failed"),
        })?;
        let used = usize::try_from(used).map_err(|_| StoreIoError::Device("reply length"))?;
        if used > room {
            return Err(StoreIoError::Device(
                "the device reported a reply longer than its buffer",
            ));
        }
        Ok(used)
    }
}
