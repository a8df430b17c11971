//! Node time: the TSC, calibrated once at boot against PIT channel 2.
//!
//! Calibration reads PIT channel 2's count (8254 datasheet: counter-latch
//! command, then low and high byte) together with the TSC and the LAPIC
//! timer's current count, once at the start and once ~20 ms of PIT time
//! later, and divides. Each reading is bracketed by two RDTSCs and retried
//! until the bracket is tight, so a CPU that is held up between
//! instructions (an emulator thread descheduled on a busy host) disturbs
//! neither end: the PIT, TSC and LAPIC all keep counting meanwhile, only the
//! pairing matters. Channel 2 runs in mode 0 from 0xFFFF (55 ms before it
//! wraps); its gate is port 0x61 bit 0, the speaker (bit 1) stays off.
//!
//! [`now_ns`] is `(rdtsc - tsc_at_boot) * 1e9 / tsc_hz`; it is monotonic on
//! one CPU (invariant TSC on hardware; emulators tick it from their clock).
//! Before calibration it returns 0.
//!
//! Wall clock: [`calibrate`] also reads the CMOS real-time clock once (MC146818
//! registers 0-9, after waiting out an update in progress) and keeps it as
//! nanoseconds since 1970-01-01 UTC at that instant; [`wall_clock_ns`] adds
//! the node time since. The CMOS clock is taken to be UTC (QEMU's and Bochs'
//! default).

use crate::{cpu, lapic};
use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::instructions::port::Port;

const PIT_HZ: u64 = 1_193_182;
/// PIT ticks to measure over: 20 ms.
const PIT_INTERVAL: u64 = 23_864;
/// Upper bound on PIT polls while waiting (guards against a PIT that does
/// not count; each poll is a few I/O exits in an emulator).
const MAX_POLLS: u64 = 10_000_000;
/// Attempts per bracketed reading; the tightest bracket wins.
const READ_TRIES: usize = 8;

static TSC_BOOT: AtomicU64 = AtomicU64::new(0);
static TSC_HZ: AtomicU64 = AtomicU64::new(0);
/// Wall clock at node time [`WALL_AT_NS`], ns since 1970 (0 = unknown).
static WALL_NS: AtomicU64 = AtomicU64::new(0);
static WALL_AT_NS: AtomicU64 = AtomicU64::new(0);

/// Result of [`calibrate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Calibration {
    /// TSC frequency in Hz.
    pub tsc_hz: u64,
    /// LAPIC timer counts per second at divide-by-16.
    pub lapic_timer_hz: u64,
    /// Whether the PIT measurement succeeded (else fallback values).
    pub measured: bool,
}

/// Record the boot TSC (node time 0). Call first thing at boot.
pub fn mark_boot() {
    TSC_BOOT.store(cpu::rdtsc(), Ordering::Relaxed);
}

/// One simultaneous reading of the three counters.
#[derive(Clone, Copy)]
struct Reading {
    /// TSC midway through the bracket.
    tsc: u64,
    /// Bracket width in TSC ticks.
    width: u64,
    pit: u16,
    lapic: u32,
}

/// Latch and read PIT channel 2's count with the LAPIC count, bracketed by
/// RDTSC.
fn read_once() -> Reading {
    let t0 = cpu::rdtsc();
    // SAFETY: ports 0x42/0x43 are PIT channel 2, used only by calibration.
    let (pit, lapic) = unsafe {
        Port::<u8>::new(0x43).write(0b1000_0000); // counter latch, channel 2
        let lo = Port::<u8>::new(0x42).read();
        let hi = Port::<u8>::new(0x42).read();
        (u16::from_le_bytes([lo, hi]), lapic::current_count())
    };
    let t1 = cpu::rdtsc();
    Reading {
        tsc: t0 + (t1 - t0) / 2,
        width: t1 - t0,
        pit,
        lapic,
    }
}

/// The tightest of [`READ_TRIES`] readings.
fn read_best() -> Reading {
    let mut best = read_once();
    for _ in 1..READ_TRIES {
        let r = read_once();
        if r.width < best.width {
            best = r;
        }
    }
    best
}

/// Measure TSC and LAPIC timer rates against PIT channel 2. Needs
/// [`lapic::init`] first. Interrupts must be masked.
pub fn calibrate() -> Calibration {
    let cal = rates(measure());
    TSC_HZ.store(cal.tsc_hz, Ordering::Relaxed);
    if let Some(wall) = read_cmos() {
        WALL_AT_NS.store(now_ns(), Ordering::Relaxed);
        WALL_NS.store(wall, Ordering::Relaxed);
    }
    cal
}

/// Read CMOS register `reg` (port 0x70 index with NMI left enabled, 0x71
/// data).
fn cmos(reg: u8) -> u8 {
    // SAFETY: ports 0x70/0x71 are the RTC's index and data registers; the
    // node reads them only here, at boot, with interrupts masked.
    unsafe {
        Port::<u8>::new(0x70).write(reg);
        Port::<u8>::new(0x71).read()
    }
}

/// The CMOS date and time as ns since 1970, or `None` if it reads as no
/// valid date. MC146818: register 0xA bit 7 = update in progress; 0xB bit
/// 2 = binary (else BCD), bit 1 = 24-hour (else bit 7 of the hour is PM).
fn read_cmos() -> Option<u64> {
    let mut polls = 0;
    while cmos(0x0a) & 0x80 != 0 {
        polls += 1;
        if polls > 100_000 {
            return None;
        }
    }
    let raw = [cmos(0), cmos(2), cmos(4), cmos(7), cmos(8), cmos(9)];
    cmos_to_unix_ns(raw, cmos(0x0b))
}

/// `[sec, min, hour, day, month, year]` as the CMOS holds them, with
/// status register B, to ns since 1970 (years 2000-2099).
fn cmos_to_unix_ns(raw: [u8; 6], status_b: u8) -> Option<u64> {
    let binary = status_b & 0x04 != 0;
    let h24 = status_b & 0x02 != 0;
    let dec = |v: u8| -> u64 {
        if binary {
            u64::from(v)
        } else {
            u64::from(v >> 4) * 10 + u64::from(v & 0xf)
        }
    };
    let [sec, min, hour_raw, day, month, year] = raw;
    let pm = !h24 && hour_raw & 0x80 != 0;
    let mut hour = dec(hour_raw & 0x7f);
    if !h24 {
        hour %= 12;
        if pm {
            hour += 12;
        }
    }
    let (s, mi, d, mo, y) = (dec(sec), dec(min), dec(day), dec(month), 2000 + dec(year));
    if s > 59 || mi > 59 || hour > 23 || !(1..=31).contains(&d) || !(1..=12).contains(&mo) {
        return None;
    }
    // Days from 1970-01-01 to y-mo-d (proleptic Gregorian).
    let leap = |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
    let mut days: u64 = (1970..y).map(|y| if leap(y) { 366 } else { 365 }).sum();
    const MONTH_DAYS: [u64; 12] = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    for m in 1..mo {
        days += MONTH_DAYS[(m - 1) as usize] + u64::from(m == 2 && leap(y));
    }
    days += d - 1;
    Some((((days * 24 + hour) * 60 + mi) * 60 + s) * 1_000_000_000)
}

/// Wall-clock time now in ns since 1970-01-01 UTC, 0 if the CMOS clock
/// could not be read.
pub fn wall_clock_ns() -> u64 {
    let wall = WALL_NS.load(Ordering::Relaxed);
    if wall == 0 {
        return 0;
    }
    wall + now_ns().saturating_sub(WALL_AT_NS.load(Ordering::Relaxed))
}

/// The rates from one measurement `(TSC ticks, LAPIC counts, PIT ticks)`,
/// or the fallback guesses when there is none or it cannot be right.
///
/// The PIT count is 16 bits and keeps counting down past zero, so a CPU
/// held up for more than one PIT period (55 ms) between the start and the
/// end reading sees it wrapped: the 16-bit difference is then short, down
/// to zero (a division by zero, which would halt the node at boot). The
/// measurement loop stops only after [`PIT_INTERVAL`] ticks, so a shorter
/// difference means a wrap, and the measurement is not used.
fn rates(measured: Option<(u64, u64, u64)>) -> Calibration {
    match measured {
        Some((tsc_delta, lapic_delta, pit_delta))
            if tsc_delta > 0 && lapic_delta > 0 && pit_delta >= PIT_INTERVAL =>
        {
            Calibration {
                tsc_hz: (u128::from(tsc_delta) * u128::from(PIT_HZ) / u128::from(pit_delta)) as u64,
                lapic_timer_hz: (u128::from(lapic_delta) * u128::from(PIT_HZ)
                    / u128::from(pit_delta)) as u64,
                measured: true,
            }
        }
        // Conservative guesses that keep time moving; logged by the caller.
        _ => Calibration {
            tsc_hz: 1_000_000_000,
            lapic_timer_hz: 62_500_000,
            measured: false,
        },
    }
}

/// (TSC ticks, LAPIC counts, PIT ticks) over one interval, or `None` if the
/// PIT does not count.
fn measure() -> Option<(u64, u64, u64)> {
    // SAFETY: port 0x61 bit 0 gates PIT channel 2 (bit 1, the speaker,
    // stays off); 0x42/0x43 program channel 2, used only here.
    let port_b = unsafe {
        let port_b = Port::<u8>::new(0x61).read();
        Port::<u8>::new(0x61).write((port_b & !0x02) | 0x01);
        Port::<u8>::new(0x43).write(0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
        Port::<u8>::new(0x42).write(0xFF);
        Port::<u8>::new(0x42).write(0xFF);
        port_b
    };
    lapic::start_calibration_count();
    let start = read_best();
    let mut polls = 0;
    let result = loop {
        let r = read_once();
        if u64::from(start.pit.wrapping_sub(r.pit)) >= PIT_INTERVAL {
            let end = read_best();
            break Some((
                end.tsc.wrapping_sub(start.tsc),
                u64::from(start.lapic.wrapping_sub(end.lapic)),
                u64::from(start.pit.wrapping_sub(end.pit)),
            ));
        }
        polls += 1;
        if polls == MAX_POLLS {
            break None;
        }
    };
    lapic::stop_timer();
    // SAFETY: restores port B with the gate and speaker off.
    unsafe { Port::<u8>::new(0x61).write(port_b & !0x03) };
    result
}

/// Calibrated TSC frequency (0 before [`calibrate`]).
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Monotonic nanoseconds since [`mark_boot`] (0 before calibration).
pub fn now_ns() -> u64 {
    let hz = TSC_HZ.load(Ordering::Relaxed);
    if hz == 0 {
        return 0;
    }
    let delta = cpu::rdtsc().saturating_sub(TSC_BOOT.load(Ordering::Relaxed));
    (u128::from(delta) * 1_000_000_000 / u128::from(hz)) as u64
}

/// Busy-wait `ns` nanoseconds (interrupts untouched).
pub fn spin_ns(ns: u64) {
    let end = now_ns().saturating_add(ns);
    while now_ns() < end {
        core::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_from_a_measurement() {
        let cal = rates(Some((40_000_000, 500_000, PIT_INTERVAL)));
        assert!(cal.measured);
        assert_eq!(cal.tsc_hz, 40_000_000 * PIT_HZ / PIT_INTERVAL);
        assert_eq!(cal.lapic_timer_hz, 500_000 * PIT_HZ / PIT_INTERVAL);
        assert!(!rates(None).measured);
    }

    #[test]
    fn cmos_dates() {
        // 2026-12-03 18:45:07 in BCD, 24-hour.
        let ns = cmos_to_unix_ns([0x07, 0x45, 0x18, 0x03, 0x12, 0x26], 0x02).unwrap();
        assert_eq!(ns / 1_000_000_000, 1_796_323_507);
        // The same in binary, 12-hour with PM.
        let ns2 = cmos_to_unix_ns([7, 45, 0x80 | 6, 3, 12, 26], 0x04).unwrap();
        assert_eq!(ns, ns2);
        // 2024-02-29 00:00:00 (leap day), BCD 24-hour.
        let leap = cmos_to_unix_ns([0, 0, 0, 0x29, 0x02, 0x24], 0x02).unwrap();
        assert_eq!(leap / 1_000_000_000, 1_709_164_800);
        // Garbage (an absent RTC reads all-ones) is no date.
        assert_eq!(cmos_to_unix_ns([0xff; 6], 0xff), None);
    }

    /// A PIT that wrapped between the start and the end reading gives a
    /// 16-bit difference below the interval, down to zero: fall back instead
    /// of dividing by it.
    #[test]
    fn wrapped_pit_falls_back() {
        for pit_delta in [0, 1, PIT_INTERVAL - 1] {
            let cal = rates(Some((40_000_000, 500_000, pit_delta)));
            assert!(!cal.measured, "pit_delta {pit_delta}");
            assert_eq!(cal.tsc_hz, 1_000_000_000);
        }
    }
}
