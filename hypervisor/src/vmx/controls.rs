//! VMCS control-field bits the backend uses (Intel SDM vol. 3C, 25.6-25.8).
//! Every value written goes through [`super::Allowed::adjust`] against the
//! CPU's capability MSRs first.

// Pin-based controls (Intel SDM vol. 3C, 25.6.1, table 25-5).
pub const PIN_EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
pub const PIN_NMI_EXITING: u32 = 1 << 3;
pub const PIN_VIRTUAL_NMIS: u32 = 1 << 5;
pub const PIN_PREEMPTION_TIMER: u32 = 1 << 6;
// Primary processor-based controls (25.6.2, table 25-6).
pub const PROC_INTERRUPT_WINDOW_EXITING: u32 = 1 << 2;
pub const PROC_USE_TSC_OFFSETTING: u32 = 1 << 3;
pub const PROC_HLT_EXITING: u32 = 1 << 7;
pub const PROC_MWAIT_EXITING: u32 = 1 << 10;
pub const PROC_CR8_LOAD_EXITING: u32 = 1 << 19;
pub const PROC_CR8_STORE_EXITING: u32 = 1 << 20;
pub const PROC_NMI_WINDOW_EXITING: u32 = 1 << 22;
pub const PROC_USE_IO_BITMAPS: u32 = 1 << 25;
pub const PROC_USE_MSR_BITMAPS: u32 = 1 << 28;
pub const PROC_MONITOR_EXITING: u32 = 1 << 29;
pub const PROC_SECONDARY_CONTROLS: u32 = 1 << 31;
// Secondary processor-based controls (25.6.2, table 25-7).
pub const PROC2_ENABLE_EPT: u32 = 1 << 1;
pub const PROC2_ENABLE_RDTSCP: u32 = 1 << 3;
pub const PROC2_ENABLE_VPID: u32 = 1 << 5;
pub const PROC2_ENABLE_INVPCID: u32 = 1 << 12;
pub const PROC2_ENABLE_PML: u32 = 1 << 17;
// VM-exit controls (25.7.1, table 25-13).
pub const EXIT_HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
pub const EXIT_SAVE_PAT: u32 = 1 << 18;
pub const EXIT_LOAD_PAT: u32 = 1 << 19;
pub const EXIT_SAVE_EFER: u32 = 1 << 20;
pub const EXIT_LOAD_EFER: u32 = 1 << 21;
// VM-entry controls (25.8.1, table 25-15).
pub const ENTRY_IA32E_MODE_GUEST: u32 = 1 << 9;
pub const ENTRY_LOAD_PAT: u32 = 1 << 14;
pub const ENTRY_LOAD_EFER: u32 = 1 << 15;
