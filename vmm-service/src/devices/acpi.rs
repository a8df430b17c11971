//! The ACPI tables describing [`super::Machine::Pc`] to its guest: RSDP,
//! RSDT and XSDT, FADT (+ FACS and a DSDT), and MADT. Pure bytes: the
//! loader writes them into guest memory at [`ACPI_TABLES_GPA`] (inside the
//! BIOS area the E820 map reserves, where Linux also scans for the RSDP)
//! and passes the RSDP's address in the boot parameters.
//!
//! What they say, and why:
//! * MADT: one local APIC (ID 0) at [`LAPIC_BASE`], one I/O APIC (ID
//!   [`IOAPIC_ID`], GSI base 0) at [`IOAPIC_BASE`], the dual-8259 flag
//!   (PCAT_COMPAT), the ISA overrides IRQ 0 -> GSI 2 (edge) and IRQ 9 ->
//!   GSI 9 (level, active high: the SCI), LINT1 as NMI. Linux builds its
//!   interrupt routing from this.
//! * FADT (revision 6): a legacy (not hardware-reduced) platform, so Linux
//!   keeps the 8259 and the PIT; SCI on IRQ 9; always in ACPI mode
//!   (SMI_CMD = 0); PM1a event/control and the PM timer at the
//!   [`super::acpi_pm`] ports; no C2/C3 (latencies above the limits); the
//!   RTC century byte at CMOS 0x32; IAPC_BOOT_ARCH: legacy devices, no
//!   8042 (Linux then skips probing a keyboard controller), no VGA.
//! * DSDT: `\_S5` = {5, 5, 0, 0}, the sleep type the PM1 control register
//!   takes for power-off, and one `\_SB.VRnn` device per virtio-mmio
//!   device ([`VirtioMmioSlot`]: `_HID` "LNRO0005", a 32-bit fixed memory
//!   range and one level-triggered, active-high interrupt). Debian's kernel
//!   finds virtio-mmio devices only this way (it is built without
//!   `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`). COM1, the RTC and the timers are
//!   found at their legacy addresses.
//! * No HPET, MCFG or SRAT: the guest sees none of those.
//!
//! Reference: ACPI 6.5: 5.2.5.3 (RSDP), 5.2.6 (header), 5.2.7/5.2.8
//! (RSDT/XSDT), 5.2.9 (FADT, Table 5.9), 5.2.10 (FACS), 5.2.12 (MADT and
//! its structures), 5.2.3.2 (GAS), 20.2.5.4 (AML PackageOp encoding).

use super::acpi_pm::{PM1_CNT_PORT, PM_BASE_PORT, PM_TMR_PORT, SLP_TYP_S5};
use super::ioapic::{IOAPIC_BASE, IOAPIC_ID};
use super::irq::isa_gsi;
use super::lapic::LAPIC_BASE;
use super::rtc::CENTURY_INDEX;
use super::{PIT_IRQ, SCI_IRQ};
use alloc::vec::Vec;

/// Where the loader puts the tables (RSDP first).
pub const ACPI_TABLES_GPA: u64 = 0xe_0000;
/// Most bytes the tables occupy.
pub const ACPI_TABLES_MAX_BYTES: usize = 0x2000;

const OEM_ID: &[u8; 6] = b"HVMIGR";
const OEM_TABLE_ID: &[u8; 8] = b"HVMIGRAT";
const CREATOR_ID: &[u8; 4] = b"HVMG";
const HEADER_BYTES: usize = 36;

/// Where the machine puts virtio-mmio device `n`: `VIRTIO_MMIO_BASE + n *
/// VIRTIO_MMIO_STRIDE`, interrupt GSI `VIRTIO_MMIO_FIRST_GSI + n` (I/O APIC
/// pins 16-23 are free of ISA devices).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Address distance between two virtio-mmio devices.
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// GSI of virtio-mmio device 0.
pub const VIRTIO_MMIO_FIRST_GSI: u32 = 16;
/// Most virtio-mmio devices the tables describe (one GSI each, 16-23).
pub const MAX_VIRTIO_MMIO: usize = 8;

/// A virtio-mmio device to describe to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    /// Guest-physical base of its register window (below 4 GiB).
    pub base: u64,
    /// Bytes of the window (0x200 is the virtio-mmio register file).
    pub len: u32,
    /// Its interrupt (I/O APIC input).
    pub gsi: u32,
}

impl VirtioMmioSlot {
    /// Device `n` at the machine's standard place.
    pub fn standard(n: u8) -> Self {
        Self {
            base: VIRTIO_MMIO_BASE + u64::from(n) * VIRTIO_MMIO_STRIDE,
            len: 0x200,
            gsi: VIRTIO_MMIO_FIRST_GSI + u32::from(n),
        }
    }
}

/// The tables as one blob to place at its base address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    /// Guest-physical address of `bytes[0]` (the RSDP).
    pub base_gpa: u64,
    pub bytes: Vec<u8>,
}

impl AcpiTables {
    /// Address of the RSDP.
    pub fn rsdp_gpa(&self) -> u64 {
        self.base_gpa
    }
}

/// Checksum byte that makes `bytes` sum to 0.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

/// A table under construction: header with placeholder length/checksum.
fn table(signature: &[u8; 4], revision: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(128);
    t.extend_from_slice(signature);
    t.extend_from_slice(&0u32.to_le_bytes());
    t.push(revision);
    t.push(0);
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    debug_assert_eq!(t.len(), HEADER_BYTES);
    t
}

/// Fill in length and checksum.
fn finish(mut t: Vec<u8>) -> Vec<u8> {
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = 0;
    t[9] = checksum(&t);
    t
}

/// Generic Address Structure for a system I/O register block.
fn gas_io(port: u16, bit_width: u8, access_size: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = bit_width;
    g[3] = access_size;
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn put(t: &mut [u8], off: usize, bytes: &[u8]) {
    t[off..off + bytes.len()].copy_from_slice(bytes);
}

fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let mut t = table(b"FACP", 6);
    t.resize(276, 0);
    put(&mut t, 36, &(facs as u32).to_le_bytes());
    put(&mut t, 40, &(dsdt as u32).to_le_bytes());
    put(&mut t, 46, &u16::from(SCI_IRQ).to_le_bytes());
    // SMI_CMD, ACPI_ENABLE, ACPI_DISABLE stay 0: always in ACPI mode.
    put(&mut t, 56, &u32::from(PM_BASE_PORT).to_le_bytes());
    put(&mut t, 64, &u32::from(PM1_CNT_PORT).to_le_bytes());
    put(&mut t, 76, &u32::from(PM_TMR_PORT).to_le_bytes());
    t[88] = 4; // PM1_EVT_LEN
    t[89] = 2; // PM1_CNT_LEN
    t[91] = 4; // PM_TMR_LEN
    put(&mut t, 96, &101u16.to_le_bytes()); // no C2
    put(&mut t, 98, &1001u16.to_le_bytes()); // no C3
    t[108] = CENTURY_INDEX;
    // IAPC_BOOT_ARCH: LEGACY_DEVICES (0), VGA not present (2); 8042 absent.
    put(&mut t, 109, &0b101u16.to_le_bytes());
    // Flags: WBINVD (0), PROC_C1 (2), SLP_BUTTON (5: no fixed sleep button).
    put(
        &mut t,
        112,
        &((1u32 << 0) | (1 << 2) | (1 << 5)).to_le_bytes(),
    );
    t[131] = 5; // FADT minor version (ACPI 6.5)
    put(&mut t, 132, &facs.to_le_bytes());
    put(&mut t, 140, &dsdt.to_le_bytes());
    put(&mut t, 148, &gas_io(PM_BASE_PORT, 32, 2));
    put(&mut t, 172, &gas_io(PM1_CNT_PORT, 16, 2));
    put(&mut t, 208, &gas_io(PM_TMR_PORT, 32, 3));
    finish(t)
}

fn facs() -> Vec<u8> {
    let mut t = alloc::vec![0u8; 64];
    put(&mut t, 0, b"FACS");
    put(&mut t, 4, &64u32.to_le_bytes());
    t[32] = 2; // version
    t
}

/// AML PkgLength for a package whose contents (after the PkgLength) are
/// `contents` bytes: the encoded length counts itself (ACPI 6.5, 20.2.4).
fn pkg_length(contents: usize) -> Vec<u8> {
    if contents < 0x3f {
        return alloc::vec![(contents + 1) as u8];
    }
    for extra in 1..=3usize {
        let total = contents + 1 + extra;
        if total < 1 << (4 + 8 * extra) {
            let mut v = alloc::vec![((extra as u8) << 6) | (total & 0xf) as u8];
            for i in 0..extra {
                v.push((total >> (4 + 8 * i)) as u8);
            }
            return v;
        }
    }
    unreachable!("AML packages here are far below 256 MiB")
}

/// `op` (one or two bytes), PkgLength, `body`.
fn aml_package(op: &[u8], body: &[u8]) -> Vec<u8> {
    let mut v = op.to_vec();
    v.extend_from_slice(&pkg_length(body.len()));
    v.extend_from_slice(body);
    v
}

/// `Device (VRnn) { _HID "LNRO0005", _UID n, _CRS { Memory32Fixed,
/// Interrupt (level, active high, exclusive) } }`.
fn virtio_device(n: usize, slot: &VirtioMmioSlot) -> Vec<u8> {
    let hex = b"0123456789ABCDEF";
    let mut body = alloc::vec![b'V', b'R', hex[(n >> 4) & 0xf], hex[n & 0xf]];
    // Name (_HID, "LNRO0005")
    body.extend_from_slice(&[0x08, b'_', b'H', b'I', b'D', 0x0d]);
    body.extend_from_slice(b"LNRO0005\0");
    // Name (_UID, n)
    body.extend_from_slice(&[0x08, b'_', b'U', b'I', b'D', 0x0a, n as u8]);
    // Name (_CRS, ResourceTemplate () { ... })
    let mut res = Vec::new();
    res.extend_from_slice(&[0x86, 0x09, 0x00, 0x01]); // Memory32Fixed, read/write
    res.extend_from_slice(&(slot.base as u32).to_le_bytes());
    res.extend_from_slice(&slot.len.to_le_bytes());
    // Extended interrupt: consumer, level, active high, exclusive; 1 GSI.
    res.extend_from_slice(&[0x89, 0x06, 0x00, 0x01, 0x01]);
    res.extend_from_slice(&slot.gsi.to_le_bytes());
    res.extend_from_slice(&[0x79, 0x00]); // end tag
    let mut buffer = alloc::vec![0x0a, res.len() as u8];
    buffer.extend_from_slice(&res);
    body.extend_from_slice(&[0x08, b'_', b'C', b'R', b'S']);
    body.extend_from_slice(&aml_package(&[0x11], &buffer));
    aml_package(&[0x5b, 0x82], &body)
}

fn dsdt(virtio: &[VirtioMmioSlot]) -> Vec<u8> {
    let mut t = table(b"DSDT", 2);
    // Name (_S5_, Package (4) { 5, 5, 0, 0 })
    let s5 = SLP_TYP_S5 as u8;
    t.extend_from_slice(&[
        0x08, b'_', b'S', b'5', b'_', // NameOp "_S5_"
        0x12, 0x08, 0x04, // PackageOp, PkgLength 8, 4 elements
        0x0a, s5, 0x0a, s5, // BytePrefix 5, BytePrefix 5
        0x00, 0x00, // ZeroOp, ZeroOp
    ]);
    if !virtio.is_empty() {
        // Scope (\_SB) { Device ... }
        let mut body = alloc::vec![0x5c, b'_', b'S', b'B', b'_'];
        for (n, slot) in virtio.iter().take(MAX_VIRTIO_MMIO).enumerate() {
            body.extend_from_slice(&virtio_device(n, slot));
        }
        t.extend_from_slice(&aml_package(&[0x10], &body));
    }
    finish(t)
}

fn madt() -> Vec<u8> {
    let mut t = table(b"APIC", 3);
    t.extend_from_slice(&(LAPIC_BASE as u32).to_le_bytes());
    t.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT
                                              // Processor local APIC: UID 0, APIC ID 0, enabled.
    t.extend_from_slice(&[0, 8, 0, 0]);
    t.extend_from_slice(&1u32.to_le_bytes());
    // I/O APIC.
    t.extend_from_slice(&[1, 12, IOAPIC_ID, 0]);
    t.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source overrides (bus 0 = ISA). Flags: MPS INTI, polarity
    // bits 1:0 (01 high), trigger bits 3:2 (01 edge, 11 level).
    for (irq, flags) in [(PIT_IRQ, 0x0005u16), (SCI_IRQ, 0x000d)] {
        t.extend_from_slice(&[2, 10, 0, irq]);
        t.extend_from_slice(&u32::from(isa_gsi(irq)).to_le_bytes());
        t.extend_from_slice(&flags.to_le_bytes());
    }
    // Local APIC NMI: all processors, LINT1.
    t.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    finish(t)
}

fn rsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = table(b"RSDT", 1);
    for &e in entries {
        t.extend_from_slice(&(e as u32).to_le_bytes());
    }
    finish(t)
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = table(b"XSDT", 1);
    for &e in entries {
        t.extend_from_slice(&e.to_le_bytes());
    }
    finish(t)
}

fn rsdp(rsdt: u64, xsdt: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0);
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+ (XSDT present)
    r.extend_from_slice(&(rsdt as u32).to_le_bytes());
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt.to_le_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// Build the tables for placement at `base_gpa` (below 4 GiB, 64-byte
/// aligned), describing the virtio-mmio devices `virtio` (at most
/// [`MAX_VIRTIO_MMIO`]; more are left out).
pub fn build(base_gpa: u64, virtio: &[VirtioMmioSlot]) -> AcpiTables {
    debug_assert!(base_gpa.is_multiple_of(64) && base_gpa < 1 << 32);
    // Layout: RSDP, FACS (64-byte aligned), DSDT, FADT, MADT, RSDT, XSDT.
    let facs_off = 64u64;
    let dsdt_off = facs_off + 64;
    let dsdt = dsdt(virtio);
    let fadt_off = (dsdt_off + dsdt.len() as u64).next_multiple_of(16);
    let fadt = fadt(base_gpa + facs_off, base_gpa + dsdt_off);
    let madt_off = (fadt_off + fadt.len() as u64).next_multiple_of(16);
    let madt = madt();
    let rsdt_off = (madt_off + madt.len() as u64).next_multiple_of(16);
    let entries = [base_gpa + fadt_off, base_gpa + madt_off];
    let rsdt = rsdt(&entries);
    let xsdt_off = (rsdt_off + rsdt.len() as u64).next_multiple_of(16);
    let xsdt = xsdt(&entries);
    let rsdp = rsdp(base_gpa + rsdt_off, base_gpa + xsdt_off);

    let mut bytes = Vec::new();
    for (off, part) in [
        (0, rsdp),
        (facs_off, facs()),
        (dsdt_off, dsdt),
        (fadt_off, fadt),
        (madt_off, madt),
        (rsdt_off, rsdt),
        (xsdt_off, xsdt),
    ] {
        bytes.resize(off as usize, 0);
        bytes.extend_from_slice(&part);
    }
    debug_assert!(bytes.len() <= ACPI_TABLES_MAX_BYTES);
    AcpiTables { base_gpa, bytes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// The table at `gpa`: signature checked, checksum verified.
    fn table_at<'a>(t: &'a AcpiTables, gpa: u64, sig: &[u8; 4]) -> &'a [u8] {
        let off = (gpa - t.base_gpa) as usize;
        let len = u32_at(&t.bytes, off + 4) as usize;
        let tb = &t.bytes[off..off + len];
        assert_eq!(&tb[..4], sig);
        assert_eq!(
            tb.iter().fold(0u8, |a, &b| a.wrapping_add(b)),
            0,
            "{sig:?} checksum"
        );
        assert_eq!(&tb[10..16], OEM_ID);
        tb
    }

    #[test]
    fn rsdp_finds_every_table() {
        let t = build(ACPI_TABLES_GPA, &[]);
        assert!(t.bytes.len() <= ACPI_TABLES_MAX_BYTES);
        let r = &t.bytes[..36];
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(r[15], 2);
        assert_eq!(r[..20].iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        assert_eq!(r.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        assert_eq!(u32_at(r, 20), 36);
        assert_eq!(t.rsdp_gpa() % 16, 0, "RSDP on a 16-byte boundary");
        let xsdt = table_at(&t, u64_at(r, 24), b"XSDT");
        let rsdt = table_at(&t, u64::from(u32_at(r, 16)), b"RSDT");
        assert_eq!((xsdt.len() - 36) / 8, 2);
        assert_eq!((rsdt.len() - 36) / 4, 2);
        let fadt_gpa = u64_at(xsdt, 36);
        let madt_gpa = u64_at(xsdt, 44);
        assert_eq!(u64::from(u32_at(rsdt, 36)), fadt_gpa);
        assert_eq!(u64::from(u32_at(rsdt, 40)), madt_gpa);
        let fadt = table_at(&t, fadt_gpa, b"FACP");
        table_at(&t, madt_gpa, b"APIC");
        assert_eq!(fadt.len(), 276);
        let dsdt = table_at(&t, u64_at(fadt, 140), b"DSDT");
        assert_eq!(u64::from(u32_at(fadt, 40)), u64_at(fadt, 140));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        let facs_gpa = u64_at(fadt, 132);
        assert_eq!(facs_gpa % 64, 0, "FACS 64-byte aligned");
        assert_eq!(u64::from(u32_at(fadt, 36)), facs_gpa);
        let facs_off = (facs_gpa - t.base_gpa) as usize;
        assert_eq!(&t.bytes[facs_off..facs_off + 4], b"FACS");
        assert_eq!(u32_at(&t.bytes, facs_off + 4), 64);
    }

    #[test]
    fn fadt_points_at_the_pm_registers() {
        let t = build(ACPI_TABLES_GPA, &[]);
        let xsdt = table_at(&t, u64_at(&t.bytes, 24), b"XSDT");
        let fadt = table_at(&t, u64_at(xsdt, 36), b"FACP");
        assert_eq!(u16_at(fadt, 46), 9, "SCI_INT");
        assert_eq!(u32_at(fadt, 48), 0, "SMI_CMD: always ACPI mode");
        assert_eq!(u32_at(fadt, 56), 0x600);
        assert_eq!(u32_at(fadt, 64), 0x604);
        assert_eq!(u32_at(fadt, 76), 0x608);
        assert_eq!((fadt[88], fadt[89], fadt[91]), (4, 2, 4));
        assert_eq!(fadt[108], 0x32, "century");
        assert_eq!(u16_at(fadt, 109) & 0b10, 0, "no 8042");
        assert_eq!(u32_at(fadt, 112) & (1 << 20), 0, "not hardware-reduced");
        // The 64-bit blocks agree with the 32-bit ones.
        assert_eq!((fadt[148], u64_at(fadt, 152)), (1, 0x600));
        assert_eq!((fadt[172], u64_at(fadt, 176)), (1, 0x604));
        assert_eq!((fadt[208], u64_at(fadt, 212)), (1, 0x608));
        assert_eq!(fadt[8], 6, "revision");
    }

    #[test]
    fn madt_describes_the_interrupt_controllers() {
        let t = build(ACPI_TABLES_GPA, &[]);
        let xsdt = table_at(&t, u64_at(&t.bytes, 24), b"XSDT");
        let madt = table_at(&t, u64_at(xsdt, 44), b"APIC");
        assert_eq!(u32_at(madt, 36), 0xfee0_0000);
        assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");
        let mut entries = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let (ty, len) = (madt[off], usize::from(madt[off + 1]));
            assert!(len >= 2 && off + len <= madt.len());
            entries.push((ty, &madt[off..off + len]));
            off += len;
        }
        let types: Vec<u8> = entries.iter().map(|e| e.0).collect();
        assert_eq!(types, [0, 1, 2, 2, 4]);
        assert_eq!(entries[0].1, &[0, 8, 0, 0, 1, 0, 0, 0]);
        let io = entries[1].1;
        assert_eq!((io[2], u32_at(io, 4), u32_at(io, 8)), (1, 0xfec0_0000, 0));
        let iso0 = entries[2].1;
        assert_eq!((iso0[3], u32_at(iso0, 4), u16_at(iso0, 8)), (0, 2, 0x5));
        let iso9 = entries[3].1;
        assert_eq!((iso9[3], u32_at(iso9, 4), u16_at(iso9, 8)), (9, 9, 0xd));
        assert_eq!(entries[4].1, &[4, 6, 0xff, 0, 0, 1]);
    }

    #[test]
    fn dsdt_s5_package_encoding() {
        let d = dsdt(&[]);
        let aml = &d[HEADER_BYTES..];
        assert_eq!(
            aml,
            &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 5, 0x0a, 5, 0, 0]
        );
        // PkgLength counts itself and everything after it in the package.
        assert_eq!(usize::from(aml[6]), aml.len() - 6);
    }

    #[test]
    fn pkg_length_encoding() {
        assert_eq!(pkg_length(0), [1]);
        assert_eq!(pkg_length(62), [63]);
        // 63 + 1 does not fit one byte: two bytes, total 65 = 0x41.
        assert_eq!(pkg_length(63), [0x41, 0x04]);
        assert_eq!(pkg_length(0xffd), [0x4f, 0xff]);
        // 0xffe + 3 = 0x1001: nibble 1, then 0x00, then 0x01.
        assert_eq!(pkg_length(0xffe), [0x81, 0x00, 0x01]);
    }

    #[test]
    fn dsdt_describes_virtio_mmio_devices() {
        let slots = [VirtioMmioSlot::standard(0), VirtioMmioSlot::standard(1)];
        assert_eq!(
            slots[1],
            VirtioMmioSlot {
                base: 0xd000_1000,
                len: 0x200,
                gsi: 17
            }
        );
        let d = dsdt(&slots);
        assert_eq!(d.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        let aml = &d[HEADER_BYTES + 14..];
        // Scope (\_SB_) whose PkgLength covers the rest of the table.
        assert_eq!(aml[0], 0x10);
        let (len, n) = match aml[1] >> 6 {
            0 => (usize::from(aml[1] & 0x3f), 1),
            1 => (usize::from(aml[1] & 0xf) | (usize::from(aml[2]) << 4), 2),
            _ => panic!("longer PkgLength than expected"),
        };
        assert_eq!(len, aml.len() - 1, "PkgLength counts itself and the body");
        assert_eq!(&aml[1 + n..1 + n + 5], b"\\_SB_");
        // The first device, byte for byte.
        let dev = virtio_device(0, &slots[0]);
        assert_eq!(&aml[1 + n + 5..1 + n + 5 + dev.len()], &dev[..]);
        let mut want = alloc::vec![0x5b, 0x82, 0x3b]; // 59 = 1 + 58
        want.extend_from_slice(b"VR00");
        want.extend_from_slice(b"\x08_HID\x0dLNRO0005\0");
        want.extend_from_slice(b"\x08_UID\x0a\x00");
        want.extend_from_slice(b"\x08_CRS\x11\x1a\x0a\x17");
        want.extend_from_slice(&[0x86, 0x09, 0x00, 0x01, 0, 0, 0, 0xd0, 0, 2, 0, 0]);
        want.extend_from_slice(&[0x89, 0x06, 0x00, 0x01, 0x01, 16, 0, 0, 0]);
        want.extend_from_slice(&[0x79, 0x00]);
        assert_eq!(dev, want);
        assert_eq!(usize::from(dev[2]), dev.len() - 2);
        assert_eq!(aml.windows(8).filter(|w| w == b"LNRO0005").count(), 2);
        assert!(aml.windows(4).any(|w| w == b"VR01"));
        // The whole set fits, and more than eight are left out.
        let many: Vec<VirtioMmioSlot> = (0..10).map(VirtioMmioSlot::standard).collect();
        let t = build(ACPI_TABLES_GPA, &many);
        assert!(t.bytes.len() <= ACPI_TABLES_MAX_BYTES);
        assert_eq!(t.bytes.windows(8).filter(|w| w == b"LNRO0005").count(), 8);
    }
}
