//! ACPI fixed-hardware registers: PM1a event block (status and enable),
//! PM1a control block, and the 24-bit PM timer, at I/O ports
//! [`PM_BASE_PORT`].. (the FADT in [`super::acpi`] points at them). The SCI
//! is ISA IRQ 9.
//!
//! A platform that is not "hardware-reduced" must have these (ACPICA
//! refuses a FADT without PM1a blocks), and they earn their keep: the PM
//! timer is a clock source Linux can calibrate and verify against, the
//! power button is a clean way to ask the guest to shut down, and the
//! sleep control is how the guest powers itself off (`poweroff` writes
//! SLP_TYP = 5 from the DSDT's `\_S5` package, then SLP_EN).
//!
//! The platform is always in ACPI mode (the FADT's SMI_CMD is 0), so
//! SCI_EN reads 1 and cannot be cleared. Status bits are write-one-to-
//! clear; TMR_STS is set when the timer's bit 23 changes.
//!
//! Reference: ACPI 6.5, 4.8.3 (PM1 event/control registers, Tables 4.15-
//! 4.19), 4.8.3.3 (PM timer), 7.4.2 (\_Sx sleep types).

use super::state::{expect_version, DeviceKind, Snapshot, StateError, StateReader, StateWriter};
use super::{Device, DeviceCtx};
use alloc::vec::Vec;

/// First port: PM1a_EVT_BLK (status at +0, enable at +2).
pub const PM_BASE_PORT: u16 = 0x600;
/// PM1a_CNT_BLK.
pub const PM1_CNT_PORT: u16 = PM_BASE_PORT + 4;
/// PM_TMR_BLK.
pub const PM_TMR_PORT: u16 = PM_BASE_PORT + 8;
/// Ports the device claims.
pub const PM_PORTS: u16 = 12;
/// PM timer frequency.
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// SLP_TYP value of S5 (soft off), as the DSDT's `\_S5` package says.
pub const SLP_TYP_S5: u16 = 5;

/// PM1 status/enable bits.
pub const TMR_STS: u16 = 1 << 0;
pub const PWRBTN_STS: u16 = 1 << 8;
/// Enable bits that exist: TMR, GBL, PWRBTN, SLPBTN, RTC.
const EN_MASK: u16 = 0x0721;
/// Status bits that exist: TMR, BM, GBL, PWRBTN, SLPBTN, RTC, WAK.
const STS_MASK: u16 = 0x8731;
const CNT_SCI_EN: u16 = 1 << 0;
const CNT_SLP_EN: u16 = 1 << 13;
/// Control bits kept: SCI_EN, BM_RLD, SLP_TYP.
const CNT_KEPT: u16 = 0x1c03;

fn timer_ticks(now: u64) -> u64 {
    (u128::from(now) * u128::from(PM_TIMER_HZ) / 1_000_000_000) as u64
}

/// The PM1a registers and the PM timer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiPm {
    sts: u16,
    en: u16,
    cnt: u16,
    /// Device time TMR_STS was evaluated through.
    checked_ns: u64,
}

impl Default for AcpiPm {
    fn default() -> Self {
        Self::new()
    }
}

impl AcpiPm {
    /// Saved-state format version.
    pub const STATE_VERSION: u16 = 1;

    /// Reset state: ACPI mode, nothing enabled or pending.
    pub fn new() -> Self {
        Self {
            sts: 0,
            en: 0,
            cnt: CNT_SCI_EN,
            checked_ns: 0,
        }
    }

    /// The 24-bit PM timer at device time `now`.
    pub fn timer(now: u64) -> u32 {
        (timer_ticks(now) & 0xff_ffff) as u32
    }

    /// The power button was pressed.
    pub fn press_power_button(&mut self) {
        self.sts |= PWRBTN_STS;
    }

    /// Level of the SCI.
    pub fn sci_level(&self) -> bool {
        self.cnt & CNT_SCI_EN != 0 && self.sts & self.en & EN_MASK != 0
    }

    fn update_timer_status(&mut self, now: u64) {
        if now <= self.checked_ns {
            return;
        }
        if timer_ticks(now) >> 23 != timer_ticks(self.checked_ns) >> 23 {
            self.sts |= TMR_STS;
        }
        self.checked_ns = now;
    }

    /// The 12 register bytes as the guest reads them.
    fn bytes(&mut self, now: u64) -> [u8; 12] {
        self.update_timer_status(now);
        let mut b = [0xffu8; 12];
        b[0..2].copy_from_slice(&self.sts.to_le_bytes());
        b[2..4].copy_from_slice(&self.en.to_le_bytes());
        b[4..6].copy_from_slice(&self.cnt.to_le_bytes());
        b[8..12].copy_from_slice(&Self::timer(now).to_le_bytes());
        b
    }
}

impl Device for AcpiPm {
    fn read(&mut self, _region: u8, offset: u64, data: &mut [u8], ctx: &mut DeviceCtx<'_>) {
        let regs = self.bytes(ctx.now_ns);
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset + i as u64)
                .ok()
                .and_then(|o| regs.get(o).copied())
                .unwrap_or(0xff);
        }
        ctx.irq.set(self.sci_level());
    }

    fn write(&mut self, _region: u8, offset: u64, data: &[u8], ctx: &mut DeviceCtx<'_>) {
        self.update_timer_status(ctx.now_ns);
        // Assemble the written bytes per 16-bit register with a byte mask.
        let mut value = [0u16; 3];
        let mut mask = [0u16; 3];
        for (i, &b) in data.iter().enumerate() {
            let o = offset + i as u64;
            if o < 6 {
                let (reg, shift) = ((o / 2) as usize, 8 * (o % 2));
                value[reg] |= u16::from(b) << shift;
                mask[reg] |= 0xff << shift;
            }
        }
        self.sts &= !(value[0] & mask[0] & STS_MASK);
        self.en = (self.en & !mask[1]) | (value[1] & mask[1] & EN_MASK);
        if mask[2] != 0 {
            let written = (self.cnt & !mask[2]) | (value[2] & mask[2]);
            self.cnt = (written & CNT_KEPT) | CNT_SCI_EN;
            if value[2] & mask[2] & CNT_SLP_EN != 0 && (written >> 10) & 7 == SLP_TYP_S5 {
                ctx.requests.power_off = true;
            }
        }
        ctx.irq.set(self.sci_level());
    }

    fn advance(&mut self, ctx: &mut DeviceCtx<'_>) {
        self.update_timer_status(ctx.now_ns);
        ctx.irq.set(self.sci_level());
    }

    fn next_event_ns(&self) -> Option<u64> {
        if self.en & TMR_STS == 0 || self.sts & TMR_STS != 0 {
            return None;
        }
        // Next change of bit 23.
        let next_ticks = (timer_ticks(self.checked_ns) >> 23).checked_add(1)? << 23;
        let ns = (u128::from(next_ticks) * 1_000_000_000).div_ceil(u128::from(PM_TIMER_HZ));
        u64::try_from(ns).ok()
    }
}

impl Snapshot for AcpiPm {
    fn kind(&self) -> DeviceKind {
        DeviceKind::AcpiPm
    }
    fn state_version(&self) -> u16 {
        Self::STATE_VERSION
    }
    fn save_state(&self, out: &mut Vec<u8>) {
        StateWriter::new(out)
            .u16(self.sts)
            .u16(self.en)
            .u16(self.cnt)
            .u64(self.checked_ns);
    }
    fn restore_state(&mut self, version: u16, bytes: &[u8]) -> Result<(), StateError> {
        expect_version("ACPI PM", version, Self::STATE_VERSION)?;
        let mut r = StateReader::new(bytes);
        let sts = r.u16()?;
        let en = r.u16()?;
        let cnt = r.u16()?;
        let checked_ns = r.u64()?;
        r.finish()?;
        if sts & !STS_MASK != 0
            || en & !EN_MASK != 0
            || cnt & !CNT_KEPT != 0
            || cnt & CNT_SCI_EN == 0
        {
            return Err(StateError::BadValue {
                what: "PM1 registers",
                value: (u64::from(sts) << 32) | (u64::from(en) << 16) | u64::from(cnt),
            });
        }
        *self = Self {
            sts,
            en,
            cnt,
            checked_ns,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::tests::Harness;

    fn read(pm: &mut AcpiPm, h: &mut Harness, now: u64, off: u64, n: usize) -> u32 {
        let mut b = [0u8; 4];
        h.at(now, |ctx| pm.read(0, off, &mut b[..n], ctx));
        u32::from_le_bytes(b)
    }
    fn write(pm: &mut AcpiPm, h: &mut Harness, now: u64, off: u64, v: &[u8]) {
        h.at(now, |ctx| pm.write(0, off, v, ctx));
    }

    #[test]
    fn pm_timer_counts_at_3_58_mhz_and_wraps_at_24_bits() {
        let mut pm = AcpiPm::new();
        let mut h = Harness::default();
        assert_eq!(read(&mut pm, &mut h, 0, 8, 4), 0);
        assert_eq!(read(&mut pm, &mut h, 1_000_000_000, 8, 4), 3_579_545);
        let wrap_ns = (1u64 << 24) * 1_000_000_000 / PM_TIMER_HZ + 1;
        assert!(read(&mut pm, &mut h, wrap_ns, 8, 4) < 10);
        assert_eq!(read(&mut pm, &mut h, wrap_ns, 11, 1), 0, "top byte is 0");
    }

    #[test]
    fn status_enable_and_sci() {
        let mut pm = AcpiPm::new();
        let mut h = Harness::default();
        assert_eq!(read(&mut pm, &mut h, 0, 4, 2), 1, "SCI_EN");
        pm.press_power_button();
        assert_eq!(read(&mut pm, &mut h, 0, 0, 2), u32::from(PWRBTN_STS));
        assert!(!h.level, "not enabled");
        write(&mut pm, &mut h, 0, 2, &[0x00, 0x01]); // PWRBTN_EN
        assert!(h.level);
        write(&mut pm, &mut h, 0, 0, &[0x00, 0x01]); // clear PWRBTN_STS
        assert!(!h.level);
        assert_eq!(read(&mut pm, &mut h, 0, 0, 4), 0x0100_0000);
        // TMR_STS when bit 23 changes; TMR_EN makes it an SCI.
        write(&mut pm, &mut h, 0, 2, &[0x01, 0x00]);
        let flip = pm.next_event_ns().unwrap();
        h.at(flip - 1, |ctx| pm.advance(ctx));
        assert!(!h.level);
        h.at(flip, |ctx| pm.advance(ctx));
        assert!(h.level);
        assert_eq!(pm.next_event_ns(), None);
        // SCI_EN cannot be cleared.
        write(&mut pm, &mut h, flip, 4, &[0, 0]);
        assert_eq!(read(&mut pm, &mut h, flip, 4, 2), 1);
        // Unused ports read all-ones.
        assert_eq!(read(&mut pm, &mut h, flip, 6, 2), 0xffff);
        assert_eq!(read(&mut pm, &mut h, flip, 11, 2), 0xff00);
    }

    #[test]
    fn s5_sleep_requests_power_off() {
        let mut pm = AcpiPm::new();
        let mut h = Harness::default();
        // Linux: SLP_TYP first, then SLP_TYP | SLP_EN.
        write(&mut pm, &mut h, 0, 4, &(5u16 << 10).to_le_bytes());
        assert!(!h.requests.power_off);
        assert_eq!(read(&mut pm, &mut h, 0, 4, 2), (5 << 10) | 1);
        write(
            &mut pm,
            &mut h,
            0,
            4,
            &((5u16 << 10) | CNT_SLP_EN).to_le_bytes(),
        );
        assert!(h.requests.power_off);
        assert_eq!(read(&mut pm, &mut h, 0, 4, 2) & u32::from(CNT_SLP_EN), 0);
        // Other sleep types are not supported: nothing happens.
        let mut pm = AcpiPm::new();
        let mut h = Harness::default();
        write(
            &mut pm,
            &mut h,
            0,
            4,
            &((3u16 << 10) | CNT_SLP_EN).to_le_bytes(),
        );
        assert!(!h.requests.power_off);
    }

    #[test]
    fn save_restore() {
        let mut pm = AcpiPm::new();
        let mut h = Harness::default();
        write(&mut pm, &mut h, 5, 2, &[0x21, 0x01]);
        pm.press_power_button();
        let mut s = Vec::new();
        pm.save_state(&mut s);
        let mut q = AcpiPm::new();
        q.restore_state(1, &s).unwrap();
        assert_eq!(q, pm);
        for n in 0..s.len() {
            assert!(AcpiPm::new().restore_state(1, &s[..n]).is_err());
        }
        let mut bad = s.clone();
        bad[4] = 0; // SCI_EN clear
        assert!(AcpiPm::new().restore_state(1, &bad).is_err());
    }
}
