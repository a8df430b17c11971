//! The engines' views of a [`Vm`]: [`SourceVm`] (`migration::MigratableVm`)
//! and [`DestVm`] (`migration::DestinationVm`), made for one engine step
//! from a VM the job borrows out of the node's VM table.
//!
//! Source: pages through the VM's `GuestMemory`; the dirty log claimed from
//! the guest with [`Vm::claim_dirty_log`] in the best mode the backend has
//! (PML when `Vcpu::caps().pml`, else nested write protection); pause = not
//! scheduled; throttle = the scheduler's duty cycle ([`Vm::set_throttle`]);
//! vCPU state through `Vcpu::save_state`, device state through
//! `Devices::save`.
//!
//! Destination: an empty VM the receiving job created when it accepted the
//! migration (MISSION "Live migration" step 1), with the RAM size of the
//! accepted configuration; not runnable until `go`. Resuming it requires
//! the source's bookkeeping (migration counters and console history, the
//! `paused` control message), which it adopts.

use super::{DEVICE_KIND_PORT_BUS, TRACKER_PML, TRACKER_WRITE_PROTECT};
use crate::devices::Devices;
use crate::vm::{Bookkeeping, Vm};
use alloc::vec;
use alloc::vec::Vec;
use hvcore::addr::Gpa;
use hvcore::host::DirtyMode;
use migration::{
    DestinationVm, DeviceState, DirtyBitmap, MigratableVm, Page, VcpuState, VmConfig, VmError,
    PAGE_SIZE,
};

fn page_gpa(gfn: u64) -> Result<Gpa, VmError> {
    gfn.checked_mul(PAGE_SIZE as u64)
        .map(Gpa)
        .ok_or(VmError::at("page outside guest RAM", gfn))
}

/// The VM being migrated away, for one engine step.
pub struct SourceVm<'a> {
    pub vm: &'a mut Vm,
    /// Its configuration record (fixed when the job started).
    pub config: &'a VmConfig,
}

impl MigratableVm for SourceVm<'_> {
    fn config(&self) -> VmConfig {
        self.config.clone()
    }

    fn read_page(&mut self, gfn: u64, buf: &mut Page) -> Result<(), VmError> {
        let gpa = page_gpa(gfn)?;
        self.vm
            .partition()
            .memory()
            .read(gpa, &mut buf[..])
            .map_err(|_| VmError::at("page outside guest RAM", gfn))
    }

    fn start_dirty_log(&mut self) -> Result<&'static str, VmError> {
        // The best tracker the backend has: PML logs writes in hardware
        // without a fault per page; write protection works everywhere.
        if self.vm.partition().vcpu().caps().pml {
            match self.vm.claim_dirty_log(DirtyMode::Pml) {
                Ok(()) => return Ok(TRACKER_PML),
                Err(e) => log::warn!("migrate: PML refused ({e}), using write protection"),
            }
        }
        self.vm
            .claim_dirty_log(DirtyMode::WriteProtect)
            .map_err(|_| VmError::new("cannot enable dirty logging (out of memory?)"))?;
        Ok(TRACKER_WRITE_PROTECT)
    }

    fn collect_dirty(&mut self, out: &mut DirtyBitmap) -> Result<(), VmError> {
        let vm = &mut *self.vm;
        out.with_words_mut(|words| vm.collect_dirty(words))
            .map(|_| ())
            .map_err(|_| VmError::new("collecting the dirty log failed"))
    }

    fn stop_dirty_log(&mut self) {
        self.vm.release_dirty_log();
    }

    fn set_throttle(&mut self, pct: u8) {
        self.vm.set_throttle(pct);
    }

    fn pause(&mut self) -> Result<(), VmError> {
        if self.vm.stop_reason().is_some() {
            return Err(VmError::new("the VM stopped"));
        }
        self.vm.pause();
        Ok(())
    }

    fn resume(&mut self) {
        self.vm.resume();
    }

    fn save_vcpus(&mut self) -> Result<Vec<VcpuState>, VmError> {
        let mut s = self.vm.partition().vcpu().save_state();
        s.id = 0;
        Ok(vec![s])
    }

    fn save_devices(&mut self) -> Result<Vec<DeviceState>, VmError> {
        Ok(vec![DeviceState {
            kind: DEVICE_KIND_PORT_BUS,
            instance: 0,
            version: u32::from(Devices::SAVE_VERSION),
            payload: self.vm.devices().save(),
        }])
    }
}

/// The empty VM receiving a migration, for one engine step.
pub struct DestVm<'a> {
    pub vm: &'a mut Vm,
    /// The configuration the destination accepted (the `open` message's).
    pub accepted: &'a VmConfig,
    /// The source's bookkeeping, once its `paused` message arrived.
    pub bookkeeping: &'a mut Option<Bookkeeping>,
    /// Set when the engine discards the VM: the job removes it from the
    /// VM table after the step.
    pub discarded: &'a mut bool,
}

impl DestinationVm for DestVm<'_> {
    fn prepare(&mut self, config: &VmConfig) -> Result<(), VmError> {
        // The VM was created for the accepted configuration; the stream's
        // must be the same one.
        if config != self.accepted {
            return Err(VmError::new(
                "the stream's configuration differs from the one the destination accepted",
            ));
        }
        Ok(())
    }

    fn write_page(&mut self, gfn: u64, data: &Page) -> Result<(), VmError> {
        let gpa = page_gpa(gfn)?;
        self.vm
            .partition()
            .memory()
            .write(gpa, &data[..])
            .map_err(|_| VmError::at("page outside guest RAM", gfn))
    }

    fn zero_page(&mut self, gfn: u64) -> Result<(), VmError> {
        self.write_page(gfn, &[0u8; PAGE_SIZE])
    }

    fn read_page(&mut self, gfn: u64, buf: &mut Page) -> Result<(), VmError> {
        let gpa = page_gpa(gfn)?;
        self.vm
            .partition()
            .memory()
            .read(gpa, &mut buf[..])
            .map_err(|_| VmError::at("page outside guest RAM", gfn))
    }

    fn restore_vcpus(&mut self, vcpus: &[VcpuState]) -> Result<(), VmError> {
        let [state] = vcpus else {
            return Err(VmError::at("vCPU count", vcpus.len() as u64));
        };
        self.vm
            .partition()
            .vcpu()
            .restore_state(state)
            .map_err(|e| VmError::at(e.what, e.value))
    }

    fn restore_devices(&mut self, devices: &[DeviceState]) -> Result<(), VmError> {
        let [d] = devices else {
            return Err(VmError::at("device count", devices.len() as u64));
        };
        if d.kind != DEVICE_KIND_PORT_BUS || d.instance != 0 {
            return Err(VmError::at("unknown device", u64::from(d.kind)));
        }
        let restored = Devices::restore(&d.payload)
            .map_err(|_| VmError::new("device state refused by the port bus"))?;
        self.vm.set_devices(restored);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        let Some(b) = self.bookkeeping.take() else {
            return Err(VmError::new(
                "the source sent no VM bookkeeping (its paused message) before go",
            ));
        };
        self.vm.adopt(&b);
        self.vm.start();
        Ok(())
    }

    fn discard(&mut self) {
        *self.discarded = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeHost;

    #[test]
    fn the_destination_refuses_another_configuration_and_needs_the_bookkeeping() {
        let mut host = FakeHost::new();
        let mut vm = Vm::create_empty(&mut host, "d", 4 << 20).unwrap();
        let accepted = super::super::vm_config(&host, 4 << 20);
        let mut book = None;
        let mut discarded = false;
        let mut d = DestVm {
            vm: &mut vm,
            accepted: &accepted,
            bookkeeping: &mut book,
            discarded: &mut discarded,
        };
        assert!(d.prepare(&accepted).is_ok());
        let mut bigger = accepted.clone();
        bigger.ram_bytes = 8 << 20;
        assert!(d.prepare(&bigger).is_err());
        // A vCPU record the architecture forbids is refused by name.
        let mut bad = VcpuState::default();
        bad.regs.rflags = 2;
        let e = d.restore_vcpus(&[bad]).unwrap_err();
        assert!(e.what.contains("TR") || e.what.contains("CS"), "{e}");
        let e = d.resume().unwrap_err();
        assert!(e.what.contains("no VM bookkeeping"), "{e}");
        *d.bookkeeping = Some(Bookkeeping {
            migrations: crate::vm::MigrationCounters {
                completed: 2,
                failed: 1,
            },
            console: vec!["heartbeat 7".into()],
            counters: crate::vm::VmCounters {
                console_lines: 7,
                ..Default::default()
            },
            console_input: b"ls\n".to_vec(),
        });
        d.resume().unwrap();
        d.discard();
        assert!(discarded);
        assert!(vm.is_runnable());
        assert_eq!(vm.migrations().completed, 3);
        assert_eq!(vm.recent_lines().collect::<Vec<_>>(), ["heartbeat 7"]);
        assert_eq!(vm.console_input_queued(), 3, "unread console input arrives");
    }
}
