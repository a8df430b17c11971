//! The MC146818 real-time clock and its CMOS RAM (index port 0x70, data
//! port 0x71), on ISA IRQ 8.
//!
//! Linux needs it at boot: `read_persistent_clock64` reads the date and
//! time (waiting for the update-in-progress flag to clear; a missing RTC
//! reads UIP stuck at 1, and the kernel gives up with "Unable to read
//! current time from RTC" and starts in 1970), and the rtc-cmos driver
//! probes registers A-D. The clock runs from the device clock: the date is
//! `wall_offset + device time`, so it advances while the VM runs and
//! continues from the saved value after a migration. Time registers are
//! computed on every read in the format register B selects (BCD or
//! binary, 12- or 24-hour); setting the time is the usual sequence (SET
//! bit, write the registers, clear SET), or a single register write.
//! Register A's UIP bit is set during the last 244 us of every second, as
//! on the chip. Update-ended, alarm and periodic flags (register C) are
//! evaluated lazily and raise IRQ 8 while enabled in register B, until
//! register C is read.
//!
//! The century lives at CMOS index 0x32 (the FADT's CENTURY field says so).
//!
//! Reference: Motorola MC146818A data sheet ("Address Map", "Registers
//! A-D", "Update Cycle"); the century byte: ACPI 6.5, 5.2.9 (FADT CENTURY).

use super::state::{expect_version, DeviceKind, Snapshot, StateError, StateReader, StateWriter};
use super::{Device, DeviceCtx};
use alloc::vec::Vec;

/// Index port; the data port follows.
pub const RTC_PORT: u16 = 0x70;
/// CMOS index of the century byte.
pub const CENTURY_INDEX: u8 = 0x32;

const REG_SECONDS: usize = 0x00;
const REG_SECONDS_ALARM: usize = 0x01;
const REG_MINUTES: usize = 0x02;
const REG_MINUTES_ALARM: usize = 0x03;
const REG_HOURS: usize = 0x04;
const REG_HOURS_ALARM: usize = 0x05;
const REG_WEEKDAY: usize = 0x06;
const REG_DAY: usize = 0x07;
const REG_MONTH: usize = 0x08;
const REG_YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const D_VRT: u8 = 0x80;
/// Alarm register values with both top bits set match any value.
const ALARM_ANY: u8 = 0xc0;

const NS_PER_SEC: u64 = 1_000_000_000;
/// Length of the update cycle, during which UIP is set.
const UPDATE_NS: u64 = 244_000;
/// Widest gap over which alarm matches are searched second by second.
const ALARM_SEARCH_SECS: u64 = 86_400;

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day counted from 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A broken-down UTC time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 0 = Sunday.
    pub weekday: u32,
}

impl DateTime {
    /// The time `secs` seconds after the epoch.
    pub fn from_unix(secs: u64) -> Self {
        let days = (secs / 86_400) as i64;
        let rem = (secs % 86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem / 60 % 60,
            second: rem % 60,
            weekday: ((days + 4).rem_euclid(7)) as u32,
        }
    }

    /// Seconds after the epoch (None before 1970 or for invalid fields).
    pub fn to_unix(&self) -> Option<u64> {
        let days_in_month = match self.month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if self.year % 4 == 0 && (self.year % 100 != 0 || self.year % 400 == 0) => 29,
            2 => 28,
            _ => return None,
        };
        if self.day == 0
            || self.day > days_in_month
            || self.hour > 23
            || self.minute > 59
            || self.second > 59
        {
            return None;
        }
        let days = days_from_civil(self.year, self.month, self.day);
        let secs = days
            .checked_mul(86_400)?
            .checked_add(i64::from(self.hour * 3600 + self.minute * 60 + self.second))?;
        u64::try_from(secs).ok()
    }
}

fn to_bcd(v: u32) -> u8 {
    (((v / 10 % 10) << 4) | (v % 10)) as u8
}

fn from_bcd(v: u8) -> Option<u32> {
    let (hi, lo) = (v >> 4, v & 0xf);
    (hi < 10 && lo < 10).then_some(u32::from(hi) * 10 + u32::from(lo))
}

/// The RTC and CMOS RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rtc {
    cmos: [u8; 128],
    index: u8,
    nmi_disabled: bool,
    /// Wall-clock nanoseconds = device time + this (wrapping).
    wall_offset: u64,
    /// SET is on: the time registers in `cmos` hold the (frozen) time.
    frozen: bool,
    /// Register C's PF, AF, UF bits.
    flags: u8,
    /// Device time the flags were evaluated through.
    checked_ns: u64,
}

impl Rtc {
    /// Saved-state format version.
    pub const STATE_VERSION: u16 = 1;

    /// A clock that reads `wall_ns` (since the epoch) at device time
    /// `now_ns`: 24-hour BCD mode, periodic rate 1024 Hz, no interrupts
    /// enabled, valid RAM.
    pub fn new(wall_ns: u64, now_ns: u64) -> Self {
        let mut cmos = [0u8; 128];
        cmos[REG_A] = 0x26;
        cmos[REG_B] = B_24H;
        Self {
            cmos,
            index: 0,
            nmi_disabled: false,
            wall_offset: wall_ns.wrapping_sub(now_ns),
            frozen: false,
            flags: 0,
            checked_ns: now_ns,
        }
    }

    fn wall_ns(&self, now: u64) -> u64 {
        now.wrapping_add(self.wall_offset)
    }

    fn binary(&self) -> bool {
        self.cmos[REG_B] & B_BINARY != 0
    }

    fn encode(&self, v: u32) -> u8 {
        if self.binary() {
            v as u8
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> Option<u32> {
        if self.binary() {
            Some(u32::from(v))
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, hour: u32) -> u8 {
        if self.cmos[REG_B] & B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { 0x80 } else { 0 };
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> Option<u32> {
        if self.cmos[REG_B] & B_24H != 0 {
            return self.decode(v);
        }
        let h = self.decode(v & 0x7f)?;
        if !(1..=12).contains(&h) {
            return None;
        }
        Some(h % 12 + if v & 0x80 != 0 { 12 } else { 0 })
    }

    /// Time registers (and century) from the running clock.
    fn time_register(&self, reg: usize, now: u64) -> u8 {
        let t = DateTime::from_unix(self.wall_ns(now) / NS_PER_SEC);
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hour(t.hour),
            REG_WEEKDAY => self.encode(t.weekday + 1),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode((t.year.rem_euclid(100)) as u32),
            _ => self.encode((t.year.div_euclid(100)).clamp(0, 99) as u32),
        }
    }

    fn is_time_register(reg: usize) -> bool {
        matches!(
            reg,
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH | REG_YEAR
        ) || reg == usize::from(CENTURY_INDEX)
    }

    /// Copy the running time into the time registers.
    fn freeze(&mut self, now: u64) {
        for reg in [
            REG_SECONDS,
            REG_MINUTES,
            REG_HOURS,
            REG_WEEKDAY,
            REG_DAY,
            REG_MONTH,
            REG_YEAR,
            usize::from(CENTURY_INDEX),
        ] {
            self.cmos[reg] = self.time_register(reg, now);
        }
    }

    /// Run the clock from the time registers (an invalid date the guest
    /// wrote leaves the clock where it was).
    fn thaw(&mut self, now: u64) {
        let century = self.decode(self.cmos[usize::from(CENTURY_INDEX)]);
        let t = (|| {
            Some(DateTime {
                year: i64::from(century? * 100 + self.decode(self.cmos[REG_YEAR])?),
                month: self.decode(self.cmos[REG_MONTH])?,
                day: self.decode(self.cmos[REG_DAY])?,
                hour: self.decode_hour(self.cmos[REG_HOURS])?,
                minute: self.decode(self.cmos[REG_MINUTES])?,
                second: self.decode(self.cmos[REG_SECONDS])?,
                weekday: 0,
            })
        })();
        if let Some(secs) = t.and_then(|t| t.to_unix()) {
            let wall = secs.saturating_mul(NS_PER_SEC);
            self.wall_offset = wall.wrapping_sub(now);
            self.checked_ns = now;
        }
    }

    /// Periodic interrupt period from register A's rate (None = off).
    fn periodic_ns(&self) -> Option<u64> {
        let rate = u32::from(self.cmos[REG_A] & 0x0f);
        let rate = match rate {
            0 => return None,
            1 | 2 => rate + 7,
            r => r,
        };
        // 32768 Hz >> (rate - 1).
        Some((NS_PER_SEC << (rate - 1)) / 32_768)
    }

    fn alarm_matches(&self, secs: u64) -> bool {
        let t = DateTime::from_unix(secs);
        let check = |alarm: u8, value: u8| alarm & ALARM_ANY == ALARM_ANY || alarm == value;
        check(self.cmos[REG_SECONDS_ALARM], self.encode(t.second))
            && check(self.cmos[REG_MINUTES_ALARM], self.encode(t.minute))
            && check(self.cmos[REG_HOURS_ALARM], self.encode_hour(t.hour))
    }

    /// Set PF/AF/UF for what happened between `checked_ns` and `now`.
    fn update_flags(&mut self, now: u64) {
        if now <= self.checked_ns {
            return;
        }
        let last = self.checked_ns;
        self.checked_ns = now;
        if let Some(p) = self.periodic_ns() {
            if now / p > last / p {
                self.flags |= C_PF;
            }
        }
        if self.frozen {
            return;
        }
        let (s0, s1) = (
            self.wall_ns(last) / NS_PER_SEC,
            self.wall_ns(now) / NS_PER_SEC,
        );
        if s1 > s0 {
            self.flags |= C_UF;
            let alarm = if s1 - s0 > ALARM_SEARCH_SECS {
                true
            } else {
                (s0 + 1..=s1).any(|s| self.alarm_matches(s))
            };
            if alarm {
                self.flags |= C_AF;
            }
        }
    }

    fn irqf(&self) -> bool {
        let b = self.cmos[REG_B];
        (self.flags & C_PF != 0 && b & B_PIE != 0)
            || (self.flags & C_AF != 0 && b & B_AIE != 0)
            || (self.flags & C_UF != 0 && b & B_UIE != 0)
    }

    fn read_data(&mut self, now: u64) -> u8 {
        let reg = usize::from(self.index);
        if Self::is_time_register(reg) && !self.frozen {
            return self.time_register(reg, now);
        }
        match reg {
            REG_A => {
                let in_update =
                    !self.frozen && self.wall_ns(now) % NS_PER_SEC >= NS_PER_SEC - UPDATE_NS;
                (self.cmos[REG_A] & !A_UIP) | if in_update { A_UIP } else { 0 }
            }
            REG_C => {
                self.update_flags(now);
                let v = self.flags | if self.irqf() { C_IRQF } else { 0 };
                self.flags = 0;
                v
            }
            REG_D => D_VRT,
            _ => self.cmos[reg],
        }
    }

    fn write_data(&mut self, value: u8, now: u64) {
        let reg = usize::from(self.index);
        if Self::is_time_register(reg) {
            if self.frozen {
                self.cmos[reg] = value;
            } else {
                self.freeze(now);
                self.cmos[reg] = value;
                self.thaw(now);
            }
            return;
        }
        match reg {
            REG_A => self.cmos[REG_A] = value & !A_UIP,
            REG_B => {
                self.update_flags(now);
                let set = value & B_SET != 0;
                if set && !self.frozen {
                    self.freeze(now);
                }
                self.cmos[REG_B] = value;
                if !set && self.frozen {
                    self.frozen = false;
                    self.thaw(now);
                }
                self.frozen = set;
            }
            REG_C | REG_D => {}
            _ => self.cmos[reg] = value,
        }
    }

    fn next_flag_ns(&self) -> Option<u64> {
        if self.irqf() {
            // The line is up until register C is read.
            return None;
        }
        let b = self.cmos[REG_B];
        let mut next: Option<u64> = None;
        if b & B_PIE != 0 {
            if let Some(p) = self.periodic_ns() {
                next = Some((self.checked_ns / p + 1).saturating_mul(p));
            }
        }
        if b & (B_UIE | B_AIE) != 0 && !self.frozen {
            let wall = self.wall_ns(self.checked_ns);
            let to_next_second = NS_PER_SEC - wall % NS_PER_SEC;
            let t = self.checked_ns.saturating_add(to_next_second);
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        next
    }
}

impl Device for Rtc {
    /// Region 0: index port (offset 0) and data port (offset 1).
    fn read(&mut self, _region: u8, offset: u64, data: &mut [u8], ctx: &mut DeviceCtx<'_>) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match offset + i as u64 {
                // The index register is write-only on PCs.
                0 => 0xff,
                1 => self.read_data(ctx.now_ns),
                _ => 0xff,
            };
        }
        ctx.irq.set(self.irqf());
    }

    fn write(&mut self, _region: u8, offset: u64, data: &[u8], ctx: &mut DeviceCtx<'_>) {
        for (i, &b) in data.iter().enumerate() {
            match offset + i as u64 {
                0 => {
                    self.index = b & 0x7f;
                    self.nmi_disabled = b & 0x80 != 0;
                }
                1 => self.write_data(b, ctx.now_ns),
                _ => {}
            }
        }
        ctx.irq.set(self.irqf());
    }

    fn advance(&mut self, ctx: &mut DeviceCtx<'_>) {
        self.update_flags(ctx.now_ns);
        ctx.irq.set(self.irqf());
    }

    fn next_event_ns(&self) -> Option<u64> {
        self.next_flag_ns()
    }
}

impl Snapshot for Rtc {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Rtc
    }
    fn state_version(&self) -> u16 {
        Self::STATE_VERSION
    }
    fn save_state(&self, out: &mut Vec<u8>) {
        let mut w = StateWriter::new(out);
        w.bytes(&self.cmos)
            .u8(self.index)
            .bool(self.nmi_disabled)
            .u64(self.wall_offset)
            .bool(self.frozen)
            .u8(self.flags)
            .u64(self.checked_ns);
    }
    fn restore_state(&mut self, version: u16, bytes: &[u8]) -> Result<(), StateError> {
        expect_version("RTC", version, Self::STATE_VERSION)?;
        let mut r = StateReader::new(bytes);
        let cmos = r.array::<128>()?;
        let index = r.u8_masked("RTC index", 0x7f)?;
        let nmi_disabled = r.bool("NMI disable")?;
        let wall_offset = r.u64()?;
        let frozen = r.bool("RTC SET")?;
        let flags = r.u8_masked("RTC flags", C_PF | C_AF | C_UF)?;
        let checked_ns = r.u64()?;
        r.finish()?;
        if cmos[REG_A] & A_UIP != 0 || frozen != (cmos[REG_B] & B_SET != 0) {
            return Err(StateError::BadValue {
                what: "RTC register A/B",
                value: (u64::from(cmos[REG_A]) << 8) | u64::from(cmos[REG_B]),
            });
        }
        *self = Self {
            cmos,
            index,
            nmi_disabled,
            wall_offset,
            frozen,
            flags,
            checked_ns,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::tests::Harness;

    /// 2024-02-29 23:59:58 UTC, a Thursday.
    const LEAP_NIGHT: u64 = 1_709_251_198;

    fn reg(rtc: &mut Rtc, h: &mut Harness, now: u64, index: u8) -> u8 {
        h.at(now, |ctx| rtc.write(0, 0, &[index], ctx));
        let mut b = [0];
        h.at(now, |ctx| rtc.read(0, 1, &mut b, ctx));
        b[0]
    }
    fn set(rtc: &mut Rtc, h: &mut Harness, now: u64, index: u8, v: u8) {
        h.at(now, |ctx| rtc.write(0, 0, &[index, v], ctx));
    }

    #[test]
    fn calendar_conversions() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for days in [
            -1000, 0, 59, 60, 365, 10_956, 11_016, 19_782, 47_541, 2_932_896,
        ] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{days}");
        }
        let t = DateTime::from_unix(LEAP_NIGHT);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday),
            (2024, 2, 29, 23, 59, 58, 4)
        );
        assert_eq!(t.to_unix(), Some(LEAP_NIGHT));
        let bad = DateTime {
            month: 2,
            day: 30,
            ..t
        };
        assert_eq!(bad.to_unix(), None);
        assert_eq!(DateTime { year: 1969, ..t }.to_unix(), None);
        assert_eq!(DateTime::from_unix(951_782_400).day, 29, "2000 is leap");
    }

    #[test]
    fn reads_the_date_in_bcd_and_binary() {
        let mut h = Harness::default();
        let mut rtc = Rtc::new(LEAP_NIGHT * NS_PER_SEC, 0);
        let regs: Vec<u8> = [0, 2, 4, 6, 7, 8, 9, 0x32]
            .iter()
            .map(|&i| reg(&mut rtc, &mut h, 0, i))
            .collect();
        assert_eq!(regs, [0x58, 0x59, 0x23, 0x05, 0x29, 0x02, 0x24, 0x20]);
        // Two seconds later it is March.
        let regs: Vec<u8> = [0, 2, 4, 7, 8]
            .iter()
            .map(|&i| reg(&mut rtc, &mut h, 2 * NS_PER_SEC, i))
            .collect();
        assert_eq!(regs, [0x00, 0x00, 0x00, 0x01, 0x03]);
        // Binary, 12-hour: 11 PM.
        set(&mut rtc, &mut h, 0, 0x0b, B_BINARY);
        assert_eq!(reg(&mut rtc, &mut h, 0, 4), 0x80 | 11);
        assert_eq!(reg(&mut rtc, &mut h, 0, 0), 58);
        assert_eq!(reg(&mut rtc, &mut h, 0, 0x0d), 0x80);
        assert_eq!(reg(&mut rtc, &mut h, 0, 0x0a), 0x26);
        // UIP in the last 244 us of a second.
        assert_eq!(
            reg(&mut rtc, &mut h, NS_PER_SEC - 100_000, 0x0a) & A_UIP,
            A_UIP
        );
        // CMOS RAM.
        set(&mut rtc, &mut h, 0, 0x40, 0x5a);
        assert_eq!(reg(&mut rtc, &mut h, 0, 0x40), 0x5a);
        // The index port reads all-ones.
        let mut b = [0];
        h.at(0, |ctx| rtc.read(0, 0, &mut b, ctx));
        assert_eq!(b[0], 0xff);
    }

    #[test]
    fn setting_the_time() {
        let mut h = Harness::default();
        let mut rtc = Rtc::new(LEAP_NIGHT * NS_PER_SEC, 0);
        // Linux's mc146818_set_time: SET, write, clear SET.
        let b = reg(&mut rtc, &mut h, 0, 0x0b);
        set(&mut rtc, &mut h, 0, 0x0b, b | B_SET);
        for (i, v) in [
            (0, 0x30),
            (2, 0x15),
            (4, 0x08),
            (7, 0x01),
            (8, 0x01),
            (9, 0x25),
            (0x32, 0x20),
        ] {
            set(&mut rtc, &mut h, 0, i, v);
        }
        // Frozen while SET is on.
        assert_eq!(reg(&mut rtc, &mut h, 5 * NS_PER_SEC, 0), 0x30);
        set(&mut rtc, &mut h, 5 * NS_PER_SEC, 0x0b, b);
        assert_eq!(reg(&mut rtc, &mut h, 5 * NS_PER_SEC, 4), 0x08);
        assert_eq!(reg(&mut rtc, &mut h, 7 * NS_PER_SEC, 0), 0x32);
        assert_eq!(reg(&mut rtc, &mut h, 7 * NS_PER_SEC, 9), 0x25);
        // One register at a time.
        set(&mut rtc, &mut h, 7 * NS_PER_SEC, 2, 0x45);
        assert_eq!(reg(&mut rtc, &mut h, 7 * NS_PER_SEC, 2), 0x45);
        assert_eq!(reg(&mut rtc, &mut h, 7 * NS_PER_SEC, 4), 0x08);
        // Garbage is refused: the clock keeps running where it was.
        set(&mut rtc, &mut h, 7 * NS_PER_SEC, 8, 0x13);
        assert_eq!(reg(&mut rtc, &mut h, 7 * NS_PER_SEC, 8), 0x01);
    }

    #[test]
    fn update_alarm_and_periodic_interrupts() {
        let mut h = Harness::default();
        let mut rtc = Rtc::new(LEAP_NIGHT * NS_PER_SEC + 500_000_000, 0);
        assert_eq!(rtc.next_event_ns(), None);
        // Periodic flag off for now: PF is set at its rate whether or not
        // PIE is (it would show in register C).
        set(&mut rtc, &mut h, 0, 0x0a, 0x20);
        set(&mut rtc, &mut h, 0, 0x0b, B_24H | B_UIE);
        assert_eq!(rtc.next_event_ns(), Some(500_000_000));
        h.at(499_999_999, |ctx| rtc.advance(ctx));
        assert!(!h.level);
        h.at(500_000_000, |ctx| rtc.advance(ctx));
        assert!(h.level, "update-ended interrupt");
        assert_eq!(rtc.next_event_ns(), None, "held until C is read");
        assert_eq!(reg(&mut rtc, &mut h, 600_000_000, 0x0c), C_IRQF | C_UF);
        assert!(!h.level);
        assert_eq!(reg(&mut rtc, &mut h, 600_000_000, 0x0c), 0);
        // Alarm at 23:59:59 with don't-care hours.
        set(&mut rtc, &mut h, 0, 1, 0x59);
        set(&mut rtc, &mut h, 0, 3, 0x59);
        set(&mut rtc, &mut h, 0, 5, 0xc0);
        set(&mut rtc, &mut h, 600_000_000, 0x0b, B_24H | B_AIE);
        h.at(1_600_000_000, |ctx| rtc.advance(ctx));
        assert!(!h.level, "00:00:00 does not match");
        assert_eq!(reg(&mut rtc, &mut h, 1_600_000_000, 0x0c), C_UF);
        // A day later at 23:59:59.
        let t = 86_401 * NS_PER_SEC;
        h.at(t, |ctx| rtc.advance(ctx));
        assert!(h.level);
        assert_eq!(
            reg(&mut rtc, &mut h, t, 0x0c) & (C_IRQF | C_AF),
            C_IRQF | C_AF
        );
        // Periodic 1024 Hz.
        set(&mut rtc, &mut h, t, 0x0a, 0x26);
        set(&mut rtc, &mut h, t, 0x0b, B_24H | B_PIE);
        let p = rtc.periodic_ns().unwrap();
        assert_eq!(p, 976_562);
        let next = rtc.next_event_ns().unwrap();
        h.at(next, |ctx| rtc.advance(ctx));
        assert!(h.level);
        set(&mut rtc, &mut h, next, 0x0a, 0x20);
        assert_eq!(rtc.periodic_ns(), None);
    }

    #[test]
    fn save_restore() {
        let mut h = Harness::default();
        let mut rtc = Rtc::new(LEAP_NIGHT * NS_PER_SEC, 1000);
        set(&mut rtc, &mut h, 2000, 0x0b, B_24H | B_UIE);
        set(&mut rtc, &mut h, 2000, 0x10, 7);
        let mut s = Vec::new();
        rtc.save_state(&mut s);
        let mut r = Rtc::new(0, 0);
        r.restore_state(1, &s).unwrap();
        assert_eq!(r, rtc);
        for n in 0..s.len() {
            assert!(Rtc::new(0, 0).restore_state(1, &s[..n]).is_err());
        }
        let mut bad = s.clone();
        bad[0x0b] |= B_SET; // SET without the frozen flag
        assert!(Rtc::new(0, 0).restore_state(1, &bad).is_err());
    }

    #[test]
    fn random_traffic_never_panics() {
        let mut rng = 0x1234_5678_9abc_def1u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut h = Harness::default();
        let mut rtc = Rtc::new(LEAP_NIGHT * NS_PER_SEC, 0);
        let mut now = 0u64;
        for _ in 0..30_000 {
            let x = next();
            now = now.saturating_add(x % 50_000_000);
            let (off, v) = ((x >> 8) % 3, (x >> 16) as u8);
            if x & 1 == 0 {
                h.at(now, |ctx| rtc.write(0, off, &[v], ctx));
            } else {
                let mut b = [0];
                h.at(now, |ctx| rtc.read(0, off, &mut b, ctx));
            }
            h.at(now, |ctx| rtc.advance(ctx));
        }
    }
}
