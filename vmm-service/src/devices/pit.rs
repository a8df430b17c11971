//! The 8254 programmable interval timer (ports 0x40-0x43) and system
//! control port B (0x61: channel 2's gate, the speaker enable, the refresh
//! toggle and channel 2's output).
//!
//! Counters are computed from the device clock, not stepped: a channel
//! remembers when it started counting ([`PIT_HZ`] ticks per second) and
//! every read derives the count and the output level from the time since.
//! Channel 0 drives ISA IRQ 0: each rising edge of its output is one pulse,
//! and a channel that fell several periods behind (the VM was not
//! scheduled) signals once, keeping its phase.
//!
//! What Linux 6.1 does with it, all modelled: the clock-event device on
//! channel 0 in mode 2 (periodic) or mode 0 (one-shot) and its shutdown
//! (mode 0, count 0); TSC calibration on channel 2 in mode 0 with the gate
//! raised through port 0x61, polling OUT2 (bit 5) or reading the counter
//! MSB (`quick_pit_calibrate`); the counter-latch and read-back commands.
//! The reload value 0 means 65536; BCD counting is accepted and reported
//! in the status byte but counts in binary.
//!
//! Reference: Intel 82C54 data sheet (order 231244): modes 0-5, "Read
//! Operations", "Read-Back Command"; port 0x61: IBM PC/AT technical
//! reference, "System Control Port B".

use super::state::{expect_version, DeviceKind, Snapshot, StateError, StateReader, StateWriter};
use super::{Device, DeviceCtx};
use alloc::vec::Vec;

/// First counter port; the control word register is at +3.
pub const PIT_PORT: u16 = 0x40;
/// System control port B.
pub const PORT_61: u16 = 0x61;
/// Counter input clock.
pub const PIT_HZ: u64 = 1_193_182;
/// Refresh request toggle period of port 0x61 bit 4 (15.085 us).
const REFRESH_NS: u64 = 15_085;

/// Ticks in `ns` nanoseconds.
fn ticks_in(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PIT_HZ) / 1_000_000_000) as u64
}

/// Nanoseconds until `ticks` ticks have passed (rounded up).
fn ns_for(ticks: u64) -> u64 {
    (u128::from(ticks) * 1_000_000_000)
        .div_ceil(u128::from(PIT_HZ))
        .min(u128::from(u64::MAX)) as u64
}

/// One counter.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Channel {
    mode: u8,
    /// 1 = LSB only, 2 = MSB only, 3 = LSB then MSB.
    access: u8,
    bcd: bool,
    /// Reload value as written (0 = 65536).
    reload: u16,
    /// A count was written since the control word.
    loaded: bool,
    /// Counting since this device time (None: stopped).
    running_since: Option<u64>,
    /// Ticks counted before `running_since`.
    base_ticks: u64,
    gate: bool,
    latch: Option<u16>,
    latch_msb_next: bool,
    status_latch: Option<u8>,
    read_msb_next: bool,
    write_msb_next: bool,
    write_lsb: u8,
    /// Rising output edges already signalled.
    fired: u64,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Self {
            mode: 0,
            access: 3,
            bcd: false,
            reload: 0,
            loaded: false,
            running_since: None,
            base_ticks: 0,
            gate,
            latch: None,
            latch_msb_next: false,
            status_latch: None,
            read_msb_next: false,
            write_msb_next: false,
            write_lsb: 0,
            fired: 0,
        }
    }

    fn period(&self) -> u64 {
        match self.reload {
            0 => 0x1_0000,
            n => u64::from(n),
        }
    }

    fn ticks(&self, now: u64) -> u64 {
        self.base_ticks.saturating_add(
            self.running_since
                .map_or(0, |s| ticks_in(now.saturating_sub(s))),
        )
    }

    /// Modes whose counting stops while the gate is low.
    fn gate_pauses(&self) -> bool {
        matches!(self.mode, 0 | 2 | 3 | 4)
    }

    /// Modes started by a rising gate edge.
    fn gate_triggered(&self) -> bool {
        matches!(self.mode, 1 | 5)
    }

    /// Whether the counter has started (loaded and, for modes 1 and 5,
    /// triggered).
    fn started(&self) -> bool {
        self.loaded && (self.running_since.is_some() || self.base_ticks > 0)
    }

    fn value(&self, now: u64) -> u16 {
        if !self.started() {
            return self.reload;
        }
        let n = self.period();
        let t = self.ticks(now);
        let v = match self.mode {
            2 => n - t % n,
            3 => {
                let t = t % n;
                let high = n.div_ceil(2);
                if t < high {
                    n.saturating_sub(2 * t)
                } else {
                    n.saturating_sub(2 * (t - high))
                }
            }
            _ => n.wrapping_sub(t),
        };
        v as u16
    }

    fn output(&self, now: u64) -> bool {
        if !self.loaded {
            // After a control word: mode 0 output low, others high.
            return self.mode != 0;
        }
        if !self.started() {
            // Waiting for the gate: only mode 0's output is low.
            return self.mode != 0;
        }
        let n = self.period();
        let t = self.ticks(now);
        match self.mode {
            0 | 1 => t >= n,
            2 => t % n != n - 1,
            3 => t % n < n.div_ceil(2),
            _ => t != n,
        }
    }

    /// Rising output edges since counting started.
    fn edges(&self, now: u64) -> u64 {
        if !self.started() {
            return 0;
        }
        let n = self.period();
        let t = self.ticks(now);
        match self.mode {
            0 | 1 => u64::from(t >= n),
            2 | 3 => t / n,
            _ => u64::from(t > n),
        }
    }

    /// Device time of the next rising edge, if counting and one will come.
    fn next_edge_ns(&self) -> Option<u64> {
        let since = self.running_since?;
        if !self.loaded {
            return None;
        }
        let n = self.period();
        let target_ticks = match self.mode {
            0 | 1 if self.fired == 0 => n,
            2 | 3 => self.fired.saturating_add(1).saturating_mul(n),
            4 | 5 if self.fired == 0 => n + 1,
            _ => return None,
        };
        let ahead = target_ticks.checked_sub(self.base_ticks)?;
        Some(since.saturating_add(ns_for(ahead)))
    }

    fn start(&mut self, now: u64) {
        self.base_ticks = 0;
        self.fired = 0;
        self.running_since = if self.gate_triggered() || (self.gate_pauses() && !self.gate) {
            None
        } else {
            Some(now)
        };
    }

    fn load(&mut self, reload: u16, now: u64) {
        self.reload = reload;
        self.loaded = true;
        self.start(now);
        if self.gate_triggered() && self.gate {
            // Modes 1 and 5 wait for the next rising gate edge.
            self.running_since = None;
        }
    }

    fn set_gate(&mut self, gate: bool, now: u64) {
        if gate == self.gate {
            return;
        }
        self.gate = gate;
        if !self.loaded {
            return;
        }
        match (self.mode, gate) {
            (0 | 4, false) => {
                self.base_ticks = self.ticks(now);
                self.running_since = None;
            }
            (0 | 4, true) => self.running_since = Some(now),
            (2 | 3, false) => {
                self.base_ticks = 0;
                self.running_since = None;
            }
            (1 | 2 | 3 | 5, true) => {
                self.base_ticks = 0;
                self.fired = 0;
                self.running_since = Some(now);
            }
            _ => {}
        }
    }

    fn control(&mut self, value: u8) {
        let access = (value >> 4) & 3;
        let mut mode = (value >> 1) & 7;
        if mode >= 6 {
            mode -= 4;
        }
        *self = Self {
            mode,
            access,
            bcd: value & 1 != 0,
            reload: self.reload,
            gate: self.gate,
            ..Self::new(self.gate)
        };
    }

    fn latch_count(&mut self, now: u64) {
        if self.latch.is_none() {
            self.latch = Some(self.value(now));
            self.latch_msb_next = false;
        }
    }

    fn latch_status(&mut self, now: u64) {
        if self.status_latch.is_none() {
            self.status_latch = Some(
                (u8::from(self.output(now)) << 7)
                    | (u8::from(!self.loaded) << 6)
                    | (self.access << 4)
                    | (self.mode << 1)
                    | u8::from(self.bcd),
            );
        }
    }

    fn read(&mut self, now: u64) -> u8 {
        if let Some(s) = self.status_latch.take() {
            return s;
        }
        if let Some(l) = self.latch {
            let [lsb, msb] = l.to_le_bytes();
            return match self.access {
                1 => {
                    self.latch = None;
                    lsb
                }
                2 => {
                    self.latch = None;
                    msb
                }
                _ if !self.latch_msb_next => {
                    self.latch_msb_next = true;
                    lsb
                }
                _ => {
                    self.latch = None;
                    self.latch_msb_next = false;
                    msb
                }
            };
        }
        let [lsb, msb] = self.value(now).to_le_bytes();
        match self.access {
            1 => lsb,
            2 => msb,
            _ => {
                self.read_msb_next = !self.read_msb_next;
                if self.read_msb_next {
                    lsb
                } else {
                    msb
                }
            }
        }
    }

    fn write(&mut self, value: u8, now: u64) {
        match self.access {
            1 => self.load(u16::from(value), now),
            2 => self.load(u16::from(value) << 8, now),
            _ if !self.write_msb_next => {
                self.write_lsb = value;
                self.write_msb_next = true;
                if self.mode == 0 {
                    // Mode 0: writing the first byte stops the count.
                    self.base_ticks = self.ticks(now);
                    self.running_since = None;
                }
            }
            _ => {
                self.write_msb_next = false;
                self.load(u16::from_le_bytes([self.write_lsb, value]), now);
            }
        }
    }

    fn save(&self, w: &mut StateWriter<'_>) {
        let flags = [
            self.bcd,
            self.loaded,
            self.gate,
            self.latch_msb_next,
            self.read_msb_next,
            self.write_msb_next,
        ]
        .iter()
        .enumerate()
        .fold(0u8, |acc, (i, &f)| acc | (u8::from(f) << i));
        w.u8(self.mode)
            .u8(self.access)
            .u8(flags)
            .u16(self.reload)
            .opt_u64(self.running_since)
            .u64(self.base_ticks)
            .opt_u64(self.latch.map(u64::from))
            .opt_u64(self.status_latch.map(u64::from))
            .u8(self.write_lsb)
            .u64(self.fired);
    }

    fn restore(r: &mut StateReader<'_>) -> Result<Self, StateError> {
        let mode = r.u8()?;
        let access = r.u8()?;
        if mode > 5 || !(1..=3).contains(&access) {
            return Err(StateError::BadValue {
                what: "PIT mode/access",
                value: (u64::from(mode) << 8) | u64::from(access),
            });
        }
        let flags = r.u8_masked("PIT flags", 0x3f)?;
        let bit = |i: u8| flags & (1 << i) != 0;
        let reload = r.u16()?;
        let running_since = r.opt_u64("PIT start")?;
        let base_ticks = r.u64()?;
        let latch = r.opt_u64("PIT latch")?;
        let status_latch = r.opt_u64("PIT status latch")?;
        if latch.is_some_and(|l| l > 0xffff) || status_latch.is_some_and(|s| s > 0xff) {
            return Err(StateError::BadValue {
                what: "PIT latch",
                value: latch.or(status_latch).unwrap_or(0),
            });
        }
        let write_lsb = r.u8()?;
        let fired = r.u64()?;
        Ok(Self {
            mode,
            access,
            bcd: bit(0),
            reload,
            loaded: bit(1),
            running_since,
            base_ticks,
            gate: bit(2),
            latch: latch.map(|l| l as u16),
            latch_msb_next: bit(3),
            status_latch: status_latch.map(|s| s as u8),
            read_msb_next: bit(4),
            write_msb_next: bit(5),
            write_lsb,
            fired,
        })
    }
}

/// The 8254 and port 0x61.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pit {
    channels: [Channel; 3],
    /// Port 0x61 bits 0-3 as written (bit 0 is channel 2's gate).
    port61: u8,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// Saved-state format version.
    pub const STATE_VERSION: u16 = 1;

    /// Power-on state: no channel counting (firmware has not programmed
    /// it), channel 2's gate low.
    pub fn new() -> Self {
        Self {
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            port61: 0,
        }
    }

    fn control(&mut self, value: u8, now: u64) {
        let sel = value >> 6;
        if sel == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear statuses,
            // bits 1-3 select channels.
            for (i, ch) in self.channels.iter_mut().enumerate() {
                if value & (2 << i) != 0 {
                    if value & 0x20 == 0 {
                        ch.latch_count(now);
                    }
                    if value & 0x10 == 0 {
                        ch.latch_status(now);
                    }
                }
            }
            return;
        }
        let ch = &mut self.channels[usize::from(sel)];
        if (value >> 4) & 3 == 0 {
            ch.latch_count(now);
        } else {
            ch.control(value);
        }
    }

    fn read_port61(&self, now: u64) -> u8 {
        let refresh = u8::from((now / REFRESH_NS) & 1 == 1) << 4;
        let out2 = u8::from(self.channels[2].output(now)) << 5;
        (self.port61 & 0x0f) | refresh | out2
    }

    fn signal(&mut self, ctx: &mut DeviceCtx<'_>) {
        let ch = &mut self.channels[0];
        let edges = ch.edges(ctx.now_ns);
        if edges > ch.fired {
            ch.fired = edges;
            ctx.irq.pulse();
        }
    }
}

impl Device for Pit {
    /// Region 0: ports 0x40-0x43; region 1: port 0x61. Byte-wide.
    fn read(&mut self, region: u8, offset: u64, data: &mut [u8], ctx: &mut DeviceCtx<'_>) {
        let now = ctx.now_ns;
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i as u64;
            *b = match (region, off) {
                (0, 0..=2) => self.channels[off as usize].read(now),
                (1, 0) => self.read_port61(now),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, region: u8, offset: u64, data: &[u8], ctx: &mut DeviceCtx<'_>) {
        let now = ctx.now_ns;
        for (i, &b) in data.iter().enumerate() {
            let off = offset + i as u64;
            match (region, off) {
                (0, 0..=2) => self.channels[off as usize].write(b, now),
                (0, 3) => self.control(b, now),
                (1, 0) => {
                    self.port61 = b & 0x0f;
                    self.channels[2].set_gate(b & 1 != 0, now);
                }
                _ => {}
            }
        }
        // A reprogrammed channel 0 starts its edge count again.
        self.signal(ctx);
    }

    fn advance(&mut self, ctx: &mut DeviceCtx<'_>) {
        self.signal(ctx);
    }

    fn next_event_ns(&self) -> Option<u64> {
        self.channels[0].next_edge_ns()
    }
}

impl Snapshot for Pit {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Pit
    }
    fn state_version(&self) -> u16 {
        Self::STATE_VERSION
    }
    fn save_state(&self, out: &mut Vec<u8>) {
        let mut w = StateWriter::new(out);
        for ch in &self.channels {
            ch.save(&mut w);
        }
        w.u8(self.port61);
    }
    fn restore_state(&mut self, version: u16, bytes: &[u8]) -> Result<(), StateError> {
        expect_version("PIT", version, Self::STATE_VERSION)?;
        let mut r = StateReader::new(bytes);
        let channels = [
            Channel::restore(&mut r)?,
            Channel::restore(&mut r)?,
            Channel::restore(&mut r)?,
        ];
        let port61 = r.u8_masked("port 0x61", 0x0f)?;
        r.finish()?;
        if channels[2].gate != (port61 & 1 != 0) {
            return Err(StateError::BadValue {
                what: "channel 2 gate vs port 0x61",
                value: u64::from(port61),
            });
        }
        *self = Self { channels, port61 };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::tests::Harness;

    fn out(p: &mut Pit, h: &mut Harness, now: u64, port: u16, v: u8) {
        let (region, off) = if port == PORT_61 {
            (1, 0)
        } else {
            (0, u64::from(port - PIT_PORT))
        };
        h.at(now, |ctx| p.write(region, off, &[v], ctx));
    }
    fn inb(p: &mut Pit, h: &mut Harness, now: u64, port: u16) -> u8 {
        let (region, off) = if port == PORT_61 {
            (1, 0)
        } else {
            (0, u64::from(port - PIT_PORT))
        };
        let mut b = [0u8];
        h.at(now, |ctx| p.read(region, off, &mut b, ctx));
        b[0]
    }

    #[test]
    fn periodic_channel_0_pulses_irq0() {
        let mut p = Pit::new();
        let mut h = Harness::default();
        assert_eq!(p.next_event_ns(), None, "idle until programmed");
        // Linux: mode 2, LATCH = 1193182 / 250 = 4773 (HZ = 250).
        out(&mut p, &mut h, 0, 0x43, 0x34);
        out(&mut p, &mut h, 0, 0x40, (4773 & 0xff) as u8);
        out(&mut p, &mut h, 0, 0x40, (4773 >> 8) as u8);
        let period = p.next_event_ns().unwrap();
        assert!((3_999_000..=4_001_000).contains(&period), "{period}");
        h.at(period - 1, |ctx| p.advance(ctx));
        assert_eq!(h.pulses, 0);
        h.at(period, |ctx| p.advance(ctx));
        assert_eq!(h.pulses, 1);
        // Ten periods late: one pulse, the next on the original grid.
        h.at(period * 11 + 5, |ctx| p.advance(ctx));
        assert_eq!(h.pulses, 2);
        let next = p.next_event_ns().unwrap();
        assert!(next > period * 11 && next <= period * 12 + 1, "{next}");
    }

    #[test]
    fn one_shot_fires_once_and_shutdown_stops() {
        let mut p = Pit::new();
        let mut h = Harness::default();
        out(&mut p, &mut h, 0, 0x43, 0x30);
        out(&mut p, &mut h, 0, 0x40, 100);
        out(&mut p, &mut h, 0, 0x40, 0);
        let at = p.next_event_ns().unwrap();
        assert_eq!(at, ns_for(100));
        h.at(at + 1_000_000, |ctx| p.advance(ctx));
        assert_eq!(h.pulses, 1);
        assert_eq!(p.next_event_ns(), None);
        h.at(at + 9_000_000, |ctx| p.advance(ctx));
        assert_eq!(h.pulses, 1);
        // Linux's shutdown: mode 0, count 0 (65536): fires once, 55 ms on.
        out(&mut p, &mut h, 20_000_000, 0x43, 0x30);
        out(&mut p, &mut h, 20_000_000, 0x40, 0);
        assert_eq!(p.next_event_ns(), None, "first byte stops the count");
        out(&mut p, &mut h, 20_000_000, 0x40, 0);
        assert_eq!(p.next_event_ns(), Some(20_000_000 + ns_for(0x1_0000)));
    }

    /// Linux's pit_calibrate_tsc / quick_pit_calibrate on channel 2.
    #[test]
    fn channel_2_calibration_sequence() {
        let mut p = Pit::new();
        let mut h = Harness::default();
        let t0 = 1_000_000;
        let v61 = inb(&mut p, &mut h, t0, PORT_61);
        out(&mut p, &mut h, t0, PORT_61, (v61 & !0x02) | 0x01);
        out(&mut p, &mut h, t0, 0x43, 0xb0);
        let latch = 11932u16; // 10 ms
        out(&mut p, &mut h, t0, 0x42, latch as u8);
        out(&mut p, &mut h, t0, 0x42, (latch >> 8) as u8);
        assert_eq!(inb(&mut p, &mut h, t0 + 5_000_000, PORT_61) & 0x20, 0);
        assert_eq!(
            inb(&mut p, &mut h, t0 + 10_001_000, PORT_61) & 0x20,
            0x20,
            "OUT2 high after the count"
        );
        // quick_pit_calibrate: count 0xffff, read LSB then MSB.
        out(&mut p, &mut h, t0, 0x43, 0xb0);
        out(&mut p, &mut h, t0, 0x42, 0xff);
        out(&mut p, &mut h, t0, 0x42, 0xff);
        let read = |p: &mut Pit, h: &mut Harness, now| {
            let lsb = inb(p, h, now, 0x42);
            let msb = inb(p, h, now, 0x42);
            u16::from_le_bytes([lsb, msb])
        };
        assert_eq!(read(&mut p, &mut h, t0), 0xffff);
        let v = read(&mut p, &mut h, t0 + 1_000_000);
        assert_eq!(v, 0xffff - ticks_in(1_000_000) as u16);
        // Gate low pauses mode 0.
        out(&mut p, &mut h, t0 + 1_000_000, PORT_61, 0);
        assert_eq!(read(&mut p, &mut h, t0 + 3_000_000), v);
        out(&mut p, &mut h, t0 + 3_000_000, PORT_61, 1);
        assert_eq!(
            read(&mut p, &mut h, t0 + 4_000_000),
            0xffff - ticks_in(2_000_000) as u16
        );
        assert_eq!(h.pulses, 0, "channel 2 is not on IRQ 0");
    }

    #[test]
    fn latch_and_read_back() {
        let mut p = Pit::new();
        let mut h = Harness::default();
        out(&mut p, &mut h, 0, 0x43, 0x34);
        out(&mut p, &mut h, 0, 0x40, 0x00);
        out(&mut p, &mut h, 0, 0x40, 0x10); // 4096
        out(&mut p, &mut h, 1000, 0x43, 0x00); // latch after 1 tick
        let lsb = inb(&mut p, &mut h, 500_000, 0x40);
        let msb = inb(&mut p, &mut h, 500_000, 0x40);
        assert_eq!(u16::from_le_bytes([lsb, msb]), 4095, "latched, not live");
        // Read-back: status and count of channel 0.
        out(&mut p, &mut h, 1000, 0x43, 0b1100_0010);
        let status = inb(&mut p, &mut h, 1000, 0x40);
        assert_eq!(status, 0x80 | 0x30 | (2 << 1), "OUT high, LSB/MSB, mode 2");
        let lsb = inb(&mut p, &mut h, 900_000, 0x40);
        let msb = inb(&mut p, &mut h, 900_000, 0x40);
        assert_eq!(u16::from_le_bytes([lsb, msb]), 4095);
        // Null count right after a control word.
        out(&mut p, &mut h, 0, 0x43, 0b0001_0000); // ch0 LSB only, mode 0
        out(&mut p, &mut h, 0, 0x43, 0b1110_0010); // status only
        assert_eq!(inb(&mut p, &mut h, 0, 0x40), 0x40 | 0x10);
        // Port 0x61 refresh toggle moves with time.
        let a = inb(&mut p, &mut h, 0, PORT_61) & 0x10;
        let b = inb(&mut p, &mut h, REFRESH_NS, PORT_61) & 0x10;
        assert_ne!(a, b);
        // Out-of-range offsets read all-ones.
        let mut x = [0u8; 2];
        h.at(0, |ctx| p.read(1, 0, &mut x, ctx));
        assert_eq!(x[1], 0xff);
    }

    #[test]
    fn save_restore() {
        let mut p = Pit::new();
        let mut h = Harness::default();
        out(&mut p, &mut h, 0, PORT_61, 1);
        out(&mut p, &mut h, 0, 0x43, 0x34);
        out(&mut p, &mut h, 0, 0x40, 0x9b);
        out(&mut p, &mut h, 0, 0x40, 0x2e);
        out(&mut p, &mut h, 10, 0x43, 0x00);
        let mut s = Vec::new();
        p.save_state(&mut s);
        let mut q = Pit::new();
        q.restore_state(1, &s).unwrap();
        assert_eq!(q, p);
        for n in 0..s.len() {
            assert!(Pit::new().restore_state(1, &s[..n]).is_err());
        }
        let mut bad = s.clone();
        *bad.last_mut().unwrap() = 0; // gate bit disagrees
        assert!(Pit::new().restore_state(1, &bad).is_err());
        let mut bad = s.clone();
        bad[0] = 7;
        assert!(Pit::new().restore_state(1, &bad).is_err());
    }

    #[test]
    fn random_programming_never_panics() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut p = Pit::new();
        let mut h = Harness::default();
        let mut now = 0u64;
        for _ in 0..50_000 {
            let x = next();
            now = now.saturating_add(x % 100_000);
            let port = [0x40, 0x41, 0x42, 0x43, PORT_61][(x >> 8) as usize % 5];
            if x & 1 == 0 {
                out(&mut p, &mut h, now, port, (x >> 16) as u8);
            } else {
                inb(&mut p, &mut h, now, port);
            }
            h.at(now, |ctx| p.advance(ctx));
            if let Some(t) = p.next_event_ns() {
                assert!(t >= now || p.channels[0].fired < p.channels[0].edges(t));
            }
        }
    }
}
