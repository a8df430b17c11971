//! ACPI tables: the MADT, to count processors and find the LAPIC.
//!
//! Uses the `acpi` crate (5.2, no default features: raw tables, no AML).
//! Its [`AcpiHandler`] maps physical regions; with the identity map that
//! is the address itself. The RSDP comes from the boot information (PVH
//! `rsdp_paddr`, or the BIOS-area scan for Multiboot). Table contents are
//! firmware allegations: entry counts are capped.

use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use core::ptr::NonNull;

/// Most MADT entries looked at.
const MAX_MADT_ENTRIES: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct IdentityHandler;

impl AcpiHandler for IdentityHandler {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        let virt =
            NonNull::new(physical_address as *mut T).expect("ACPI table at physical address 0");
        // SAFETY: physical memory is identity-mapped (all RAM and the first
        // 4 GiB, where firmware puts ACPI tables); the acpi crate only reads.
        unsafe { PhysicalMapping::new(physical_address, virt, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// What the MADT says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MadtInfo {
    /// Enabled or online-capable processors (xAPIC and x2APIC entries).
    pub cpus: u32,
    /// LAPIC physical address (with the 64-bit override applied).
    pub lapic_address: u64,
    /// I/O APICs listed.
    pub ioapics: u32,
}

/// Why ACPI could not be read.
#[derive(Debug)]
pub enum AcpiInfoError {
    /// The loader gave no RSDP and the BIOS scan found none.
    NoRsdp,
    /// The acpi crate rejected the tables.
    Tables(acpi::AcpiError),
}

impl core::fmt::Display for AcpiInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AcpiInfoError::NoRsdp => write!(f, "no ACPI RSDP found"),
            AcpiInfoError::Tables(e) => write!(f, "ACPI tables unusable: {e:?}"),
        }
    }
}

/// Read the MADT through the RSDP at `rsdp`.
pub fn read_madt(rsdp: Option<u64>) -> Result<MadtInfo, AcpiInfoError> {
    let rsdp = rsdp.ok_or(AcpiInfoError::NoRsdp)?;
    // SAFETY: `rsdp` came from the loader or from a checksummed BIOS-area
    // scan; the crate validates signature and checksum before trusting it,
    // and every address it maps is identity-mapped.
    let tables = unsafe { AcpiTables::from_rsdp(IdentityHandler, rsdp as usize) }
        .map_err(AcpiInfoError::Tables)?;
    let madt = tables.find_table::<Madt>().map_err(AcpiInfoError::Tables)?;
    let madt = madt.get();
    let mut info = MadtInfo {
        cpus: 0,
        lapic_address: u64::from(madt.local_apic_address),
        ioapics: 0,
    };
    for entry in madt.entries().take(MAX_MADT_ENTRIES) {
        match entry {
            // Flags bit 0 enabled, bit 1 online capable (ACPI 6.4, 5.2.12.2).
            MadtEntry::LocalApic(e) if e.flags & 0b11 != 0 => info.cpus += 1,
            MadtEntry::LocalX2Apic(e) if e.flags & 0b11 != 0 => info.cpus += 1,
            MadtEntry::IoApic(_) => info.ioapics += 1,
            MadtEntry::LocalApicAddressOverride(e) => info.lapic_address = e.local_apic_address,
            _ => {}
        }
    }
    Ok(info)
}
