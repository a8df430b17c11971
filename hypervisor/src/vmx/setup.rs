//! Setting up a VMCS: the control fields adjusted to what the CPU allows,
//! the host state, and a default guest state (Intel SDM vol. 3C, 25.5-25.8;
//! 26.2 for what VM entry checks). Also the VMX-preemption timer's count.

use super::controls::*;
use super::vcpu::VmxVcpu;
use super::vmcs::*;
use super::{maps, CR4_VMXE};
use crate::cpu::{rdmsr, read_cr0, read_cr3, read_cr4};
use hvcore::addr::Gpa;
use hvcore::host::HostError;
use hvcore::msr::{IA32_EFER, IA32_FS_BASE, IA32_GS_BASE, IA32_PAT};
use hvcore::vcpu::{LongModeEntry, Vcpu};

impl VmxVcpu {
    /// One control field, adjusted to what the CPU allows; `Err` names
    /// the control field if a bit we need is not available.
    fn control(
        &mut self,
        field: u32,
        allowed: super::Allowed,
        required: u32,
        optional: u32,
    ) -> Result<u32, HostError> {
        let value = allowed.adjust(required | (optional & allowed.may_be_one));
        if value & required != required {
            log::error!(
                "vmx: control field {field:#x}: need {required:#x}, CPU allows {:#x}",
                allowed.may_be_one
            );
            return Err(HostError::Backend(
                "the CPU lacks a VMX control this backend needs",
            ));
        }
        self.write(field, u64::from(value));
        Ok(value)
    }

    /// Controls, host state and a default guest state. Intel SDM vol. 3C,
    /// 25.6-25.8 (controls), 25.5 (host state), 26.2 (what entry checks).
    pub(super) fn init_vmcs(&mut self) -> Result<(), HostError> {
        let f = self.features;
        let pin = self.control(
            PIN_BASED_CONTROLS,
            f.pin,
            PIN_EXTERNAL_INTERRUPT_EXITING | PIN_NMI_EXITING,
            // Virtual NMIs (25.6.1): the guest's IRET ends the blocking of
            // an NMI we injected, and NMI-window exiting exists.
            PIN_PREEMPTION_TIMER | PIN_VIRTUAL_NMIS,
        )?;
        self.virtual_nmis = pin & PIN_VIRTUAL_NMIS != 0;
        if pin & PIN_PREEMPTION_TIMER != 0 {
            // Reloaded from this field at every VM entry (no "save timer
            // value" exit control), so each entry gets one full slice.
            self.write(GUEST_PREEMPTION_TIMER, preemption_timer_value());
        }
        self.proc1 = self.control(
            PRIMARY_PROC_CONTROLS,
            f.proc,
            PROC_HLT_EXITING
                | PROC_USE_TSC_OFFSETTING
                | PROC_MWAIT_EXITING
                | PROC_MONITOR_EXITING
                | PROC_CR8_LOAD_EXITING
                | PROC_CR8_STORE_EXITING
                | PROC_USE_IO_BITMAPS
                | PROC_USE_MSR_BITMAPS
                | PROC_SECONDARY_CONTROLS,
            0,
        )?;
        let vpid = if f.vpid() { PROC2_ENABLE_VPID } else { 0 };
        self.proc2 = self.control(
            SECONDARY_PROC_CONTROLS,
            f.proc2,
            PROC2_ENABLE_EPT | vpid,
            PROC2_ENABLE_RDTSCP | PROC2_ENABLE_INVPCID,
        )?;
        self.control(
            EXIT_CONTROLS,
            f.exit,
            EXIT_HOST_ADDRESS_SPACE_SIZE
                | EXIT_SAVE_PAT
                | EXIT_LOAD_PAT
                | EXIT_SAVE_EFER
                | EXIT_LOAD_EFER,
            0,
        )?;
        self.control(
            ENTRY_CONTROLS,
            f.entry,
            ENTRY_IA32E_MODE_GUEST | ENTRY_LOAD_PAT | ENTRY_LOAD_EFER,
            0,
        )?;
        self.write(EXCEPTION_BITMAP, 0);
        self.write(CR3_TARGET_COUNT, 0);
        self.write(EXIT_MSR_STORE_COUNT, 0);
        self.write(EXIT_MSR_LOAD_COUNT, 0);
        self.write(ENTRY_MSR_LOAD_COUNT, 0);
        self.write(ENTRY_INTERRUPTION_INFO, 0);
        self.write(IO_BITMAP_A, maps::hpa(&maps::IO_BITMAP_A).as_u64());
        self.write(IO_BITMAP_B, maps::hpa(&maps::IO_BITMAP_B).as_u64());
        self.write(MSR_BITMAP, maps::hpa(&maps::MSR_BITMAP).as_u64());
        self.write(TSC_OFFSET, 0);
        self.write(EPT_POINTER, self.eptp);
        if f.vpid() {
            self.write(VPID, u64::from(self.vpid));
        }
        // CR4.VMXE belongs to the host; the guest reads it as clear.
        self.write(CR0_GUEST_HOST_MASK, 0);
        self.write(CR4_GUEST_HOST_MASK, CR4_VMXE | f.cr4_fixed0);

        // 25.5: host state, this CPU's current values. RSP/RIP are written
        // by the world switch.
        let idtr_base = x86_64::instructions::tables::sidt().base.as_u64();
        self.write(HOST_CR0, read_cr0());
        self.write(HOST_CR3, read_cr3());
        self.write(HOST_CR4, read_cr4());
        let code = u64::from(crate::gdt::CODE_SELECTOR);
        let data = u64::from(crate::gdt::DATA_SELECTOR);
        self.write(HOST_CS_SELECTOR, code);
        self.write(HOST_SS_SELECTOR, data);
        self.write(HOST_DS_SELECTOR, data);
        self.write(HOST_ES_SELECTOR, data);
        self.write(HOST_FS_SELECTOR, 0);
        self.write(HOST_GS_SELECTOR, 0);
        // 26.2.3: the host TR selector must not be 0 (the GDT's 64-bit TSS).
        self.write(HOST_TR_SELECTOR, u64::from(crate::gdt::TSS_SELECTOR));
        // SAFETY: FS_BASE, GS_BASE, PAT and EFER exist on every 64-bit VMX
        // CPU (vol. 4, table 2-2).
        let (fs, gs, pat, efer) = unsafe {
            (
                rdmsr(IA32_FS_BASE),
                rdmsr(IA32_GS_BASE),
                rdmsr(IA32_PAT),
                rdmsr(IA32_EFER),
            )
        };
        self.write(HOST_FS_BASE, fs);
        self.write(HOST_GS_BASE, gs);
        self.write(HOST_TR_BASE, crate::gdt::tss_base());
        self.write(HOST_GDTR_BASE, crate::gdt::gdt_base());
        self.write(HOST_IDTR_BASE, idtr_base);
        self.write(HOST_SYSENTER_CS, 0);
        self.write(HOST_SYSENTER_ESP, 0);
        self.write(HOST_SYSENTER_EIP, 0);
        self.write(HOST_PAT, pat);
        self.write(HOST_EFER, efer);

        self.reset_long_mode(&LongModeEntry {
            rip: 0,
            rsp: 0,
            rdi: 0,
            cr3: Gpa(0),
            gdt_base: Gpa(0),
            gdt_limit: 0,
            rsi: 0,
            code_selector: hvcore::vcpu::SELECTORS_ABI.0,
            data_selector: hvcore::vcpu::SELECTORS_ABI.1,
        });
        match self.setup_error {
            Some(field) => {
                log::error!("vmx: VMCS set-up: VMWRITE of field {field:#x} failed");
                Err(HostError::Backend("VMWRITE failed while setting up a VMCS"))
            }
            None => Ok(()),
        }
    }
}

/// IA32_VMX_MISC: bits 4:0 give the rate of the VMX-preemption timer
/// (Intel SDM vol. 3D, A.6).
const MSR_VMX_MISC: u32 = 0x485;
/// The guest's time slice when no interrupt comes first.
const PREEMPTION_SLICE_NS: u64 = 4_000_000;

/// The VMX-preemption timer count for one time slice: it counts down by 1
/// every 2^X TSC ticks, X = IA32_VMX_MISC[4:0] (Intel SDM vol. 3C, 26.5.1),
/// and exits the guest (reason 52) at 0 whatever the guest's RFLAGS.IF.
///
/// External-interrupt exiting alone should make the host's timer interrupt
/// exit the guest whatever its IF too (25.6.1), and does on hardware;
/// Bochs 2.7 however computes its interrupt mask while loading the guest's
/// RFLAGS, before it counts the CPU as in VMX non-root operation, so a guest
/// spinning with IF = 0 (the `dirty-demo` guest) never exited there. The
/// preemption timer gives the CPU back in both.
fn preemption_timer_value() -> u64 {
    // SAFETY: IA32_VMX_MISC exists on every VMX CPU (vol. 3D, A.6).
    let rate = unsafe { rdmsr(MSR_VMX_MISC) } & 0x1f;
    let slice = match crate::lapic::period_ns() {
        0 => PREEMPTION_SLICE_NS,
        p => p,
    };
    let tsc_ticks = u128::from(crate::time::tsc_hz()) * u128::from(slice) / 1_000_000_000;
    let count = (tsc_ticks >> rate).clamp(1, u128::from(u32::MAX));
    count as u64
}
