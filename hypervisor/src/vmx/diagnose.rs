//! Why a VM entry failed: the VM-instruction error or the failed-entry
//! exit reason, and the first VMCS field that fails one of the entry
//! checks this backend can repeat in software, for a readable
//! `VmExit::EntryFailed` (Intel SDM vol. 3C, 27.2 and 27.3; 31.4 for the
//! instruction errors).

use super::controls::ENTRY_IA32E_MODE_GUEST;
use super::vcpu::VmxVcpu;
use super::vmcs::{self, *};
use super::world_switch::SwitchEnd;
use hvcore::vcpu::{EntryFailure, VmExit};
use hvcore::vmx::exit::{EXIT_INVALID_GUEST_STATE, EXIT_MACHINE_CHECK, EXIT_MSR_LOADING};
use hvcore::x86::{is_valid_pat, EferFlags};

impl VmxVcpu {
    /// An `EntryFailed` exit for an entry that did not happen or failed its
    /// checks, naming the field where the software checks find one.
    pub(super) fn entry_failed(&mut self, end: SwitchEnd) -> VmExit {
        let (what, raw) = match end {
            SwitchEnd::FailInvalid => ("VMLAUNCH/VMRESUME: no current VMCS (VMfailInvalid)", 0),
            SwitchEnd::FailValid => {
                let code = self.read(VM_INSTRUCTION_ERROR);
                (vmcs::instruction_error_name(code), code)
            }
            SwitchEnd::Exited => {
                let reason = self.read(EXIT_REASON) & 0xffff;
                let what = match reason as u32 {
                    EXIT_INVALID_GUEST_STATE => "VM entry failed: invalid guest state",
                    EXIT_MSR_LOADING => "VM entry failed: MSR loading",
                    EXIT_MACHINE_CHECK => "VM entry failed: machine-check event",
                    _ => "VM entry failed",
                };
                (what, reason)
            }
        };
        let field = self.diagnose();
        log::error!(
            "vmx: {what} (code {raw:#x}); first suspicious field: {field:?}, exit qualification {:#x}",
            self.read(EXIT_QUALIFICATION)
        );
        VmExit::EntryFailed {
            reason: EntryFailure {
                what,
                raw,
                field: field.map(u64::from),
            },
        }
    }

    /// The first VMCS field that fails one of the VM-entry checks this
    /// backend can repeat in software (Intel SDM vol. 3C, 27.2.1 controls,
    /// 27.2.2 host state, 27.3.1 guest state); `None` if all pass.
    fn diagnose(&self) -> Option<u32> {
        let f = &self.features;
        let ctl = |field: u32| self.read(field) as u32;
        let checks: [(u32, bool); 5] = [
            (PIN_BASED_CONTROLS, f.pin.accepts(ctl(PIN_BASED_CONTROLS))),
            (
                PRIMARY_PROC_CONTROLS,
                f.proc.accepts(ctl(PRIMARY_PROC_CONTROLS)),
            ),
            (
                SECONDARY_PROC_CONTROLS,
                f.proc2.accepts(ctl(SECONDARY_PROC_CONTROLS)),
            ),
            (EXIT_CONTROLS, f.exit.accepts(ctl(EXIT_CONTROLS))),
            (ENTRY_CONTROLS, f.entry.accepts(ctl(ENTRY_CONTROLS))),
        ];
        if let Some((field, _)) = checks.iter().find(|(_, ok)| !ok) {
            return Some(*field);
        }
        let fixed = |v: u64, f0: u64, f1: u64| v & f0 == f0 && v & !f1 == 0;
        if !fixed(self.read(HOST_CR0), f.cr0_fixed0, f.cr0_fixed1) {
            return Some(HOST_CR0);
        }
        if !fixed(self.read(HOST_CR4), f.cr4_fixed0, f.cr4_fixed1) {
            return Some(HOST_CR4);
        }
        if self.read(HOST_TR_SELECTOR) == 0 {
            return Some(HOST_TR_SELECTOR);
        }
        if !fixed(self.read(GUEST_CR0), f.cr0_fixed0, f.cr0_fixed1) {
            return Some(GUEST_CR0);
        }
        if !fixed(self.read(GUEST_CR4), f.cr4_fixed0, f.cr4_fixed1) {
            return Some(GUEST_CR4);
        }
        let efer = self.read(GUEST_EFER);
        let ia32e = self.read(ENTRY_CONTROLS) & u64::from(ENTRY_IA32E_MODE_GUEST) != 0;
        let (lma, lme) = (
            efer & EferFlags::LONG_MODE_ACTIVE.bits() != 0,
            efer & EferFlags::LONG_MODE_ENABLE.bits() != 0,
        );
        if lma != ia32e || lme != ia32e {
            return Some(GUEST_EFER);
        }
        if self.read(GUEST_RFLAGS) & 2 == 0 {
            return Some(GUEST_RFLAGS);
        }
        let cs_ar = self.read(GUEST_CS_AR);
        if ia32e && cs_ar & (1 << 13) != 0 && cs_ar & (1 << 14) != 0 {
            return Some(GUEST_CS_AR);
        }
        if self.read(GUEST_TR_AR) & 0x1f != 0xb {
            return Some(GUEST_TR_AR);
        }
        if self.read(VMCS_LINK_POINTER) != u64::MAX {
            return Some(VMCS_LINK_POINTER);
        }
        if !is_valid_pat(self.read(GUEST_PAT)) {
            return Some(GUEST_PAT);
        }
        None
    }
}
