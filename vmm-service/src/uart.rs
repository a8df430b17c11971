//! An emulated 16550A UART (the guest's COM1 console).
//!
//! A pure state machine over its eight byte-wide registers. Transmission is
//! instantaneous: THR is always empty (LSR.THRE and LSR.TEMT always set), and
//! every transmitted byte goes to a [`LineBuffer`] that hands complete,
//! sanitised lines to a [`LineSink`]. The receive FIFO fills from the host
//! ([`Uart16550::receive_input`], the VM's console input) and, in loopback
//! mode (MCR bit 4), from the transmitter, which drivers use to probe the
//! chip.
//!
//! Interrupt output ([`Uart16550::interrupt_line`]): the INTR pin is up
//! while an enabled interrupt condition is pending (received data, THR
//! empty) and, as on every PC, it reaches the interrupt controller only
//! through the OUT2 gate (MCR bit 3). THR empty is raised when THRE
//! interrupts are enabled or a byte is written, and cleared by reading IIR
//! while it is the reported source.
//!
//! Invariants: the receive FIFO holds at most [`RX_FIFO_BYTES`] bytes, the
//! pending line at most [`LINE_MAX_BYTES`] printable ASCII bytes, and only
//! the register bits a 16550A implements are ever stored. Guest writes are
//! never rejected (reserved bits are masked), so no guest access can fail.
//!
//! Register layout: National Semiconductor PC16550D data sheet, table II.

use crate::devices::state::{DeviceKind, Snapshot, StateError};
use crate::devices::{Device, DeviceCtx};
use alloc::vec::Vec;

/// Depth of the receive FIFO (16550A).
pub const RX_FIFO_BYTES: usize = 16;
/// Longest line handed to the sink; a longer run is flushed at this length.
pub const LINE_MAX_BYTES: usize = 200;

/// Register offsets from the base port.
const REG_DATA: u8 = 0; // RBR (read) / THR (write); DLL when LCR.DLAB
const REG_IER: u8 = 1; // DLM when LCR.DLAB
const REG_IIR_FCR: u8 = 2;
const REG_LCR: u8 = 3;
const REG_MCR: u8 = 4;
const REG_LSR: u8 = 5;
const REG_MSR: u8 = 6;
const REG_SCR: u8 = 7;

const LCR_DLAB: u8 = 0x80;
const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const IER_MASK: u8 = 0x0f;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;
const MCR_MASK: u8 = 0x1f;
const FCR_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;
const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const IIR_FIFO: u8 = 0xc0;
/// MSR with no loopback: carrier, data set ready and clear to send asserted,
/// as if a terminal were attached.
const MSR_CONNECTED: u8 = 0xb0;

/// Receiver of complete console lines.
pub trait LineSink {
    /// One complete line, printable ASCII only, without the line ending.
    fn line(&mut self, line: &str);
}

/// Collects transmitted bytes into lines.
///
/// `\n` ends a line, `\r` is dropped, tab becomes a space, other control
/// characters (including ESC, so no terminal escape sequences reach the node
/// console) are dropped, and bytes >= 0x80 become `?`. A line reaching
/// [`LINE_MAX_BYTES`] is flushed as it stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LineBuffer {
    buf: Vec<u8>,
}

impl LineBuffer {
    /// Feed one transmitted byte.
    pub fn push(&mut self, byte: u8, sink: &mut dyn LineSink) {
        match byte {
            b'\n' => self.flush(sink),
            b'\t' => self.put(b' ', sink),
            0x20..=0x7e => self.put(byte, sink),
            0x80..=0xff => self.put(b'?', sink),
            _ => {}
        }
    }

    /// Bytes waiting for a line ending.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    fn put(&mut self, byte: u8, sink: &mut dyn LineSink) {
        self.buf.push(byte);
        if self.buf.len() >= LINE_MAX_BYTES {
            self.flush(sink);
        }
    }

    /// Emit the pending bytes as a line (an empty line too, for `\n`).
    fn flush(&mut self, sink: &mut dyn LineSink) {
        // Only printable ASCII is ever stored, so this cannot fail.
        let line = core::str::from_utf8(&self.buf).unwrap_or("");
        sink.line(line);
        self.buf.clear();
    }
}

/// The 16550A state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uart16550 {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fcr: u8,
    /// Overrun happened since LSR was last read.
    overrun: bool,
    /// THR-empty interrupt condition pending (cleared by reading IIR while it
    /// is the reported source, or by writing THR).
    thre_pending: bool,
    rx: Vec<u8>,
    line: LineBuffer,
}

impl Default for Uart16550 {
    fn default() -> Self {
        Self::new()
    }
}

impl Uart16550 {
    /// Version byte at the start of [`Uart16550::save`] output.
    pub const SAVE_VERSION: u8 = 1;
    /// Number of I/O ports the UART occupies.
    pub const PORTS: u16 = 8;

    /// A UART in its reset state (115200 8N1 divisor, FIFO off).
    pub fn new() -> Self {
        Self {
            ier: 0,
            lcr: 0x03,
            mcr: 0,
            scr: 0,
            dll: 1,
            dlm: 0,
            fcr: 0,
            overrun: false,
            thre_pending: false,
            rx: Vec::new(),
            line: LineBuffer::default(),
        }
    }

    /// Guest read of register `reg` (0..=7; higher offsets read all-ones).
    pub fn read(&mut self, reg: u8) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match reg {
            REG_DATA if dlab => self.dll,
            REG_DATA => {
                if self.rx.is_empty() {
                    0
                } else {
                    self.rx.remove(0)
                }
            }
            REG_IER if dlab => self.dlm,
            REG_IER => self.ier,
            REG_IIR_FCR => {
                let fifo = if self.fcr & FCR_ENABLE != 0 {
                    IIR_FIFO
                } else {
                    0
                };
                let id = self.interrupt_id();
                if id == IIR_THRE {
                    // PC16550D: reading IIR clears a THRE interrupt it reports.
                    self.thre_pending = false;
                }
                fifo | id
            }
            REG_LCR => self.lcr,
            REG_MCR => self.mcr,
            REG_LSR => {
                let mut lsr = LSR_THRE | LSR_TEMT;
                if !self.rx.is_empty() {
                    lsr |= LSR_DR;
                }
                if self.overrun {
                    lsr |= LSR_OE;
                    self.overrun = false;
                }
                lsr
            }
            REG_MSR => {
                if self.mcr & MCR_LOOP != 0 {
                    // Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
                    let m = self.mcr;
                    ((m & 0x01) << 5) | ((m & 0x02) << 3) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
                } else {
                    MSR_CONNECTED
                }
            }
            REG_SCR => self.scr,
            _ => 0xff,
        }
    }

    /// Guest write of `value` to register `reg`; transmitted bytes go to
    /// `sink` line by line. Writes to read-only registers are dropped.
    pub fn write(&mut self, reg: u8, value: u8, sink: &mut dyn LineSink) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match reg {
            REG_DATA if dlab => self.dll = value,
            REG_DATA => {
                if self.mcr & MCR_LOOP != 0 {
                    self.receive(value);
                } else {
                    self.line.push(value, sink);
                }
                // The byte left at once: THR is empty again.
                self.thre_pending = true;
            }
            REG_IER if dlab => self.dlm = value,
            REG_IER => {
                let was = self.ier;
                self.ier = value & IER_MASK;
                if self.ier & IER_THRE != 0 && was & IER_THRE == 0 {
                    // Enabling the THRE interrupt with THR empty raises it.
                    self.thre_pending = true;
                }
            }
            REG_IIR_FCR => {
                if value & FCR_CLEAR_RX != 0 {
                    self.rx.clear();
                }
                // Keep the enable and trigger-level bits; clear bits self-reset.
                self.fcr = value & 0xc9;
            }
            REG_LCR => self.lcr = value,
            REG_MCR => self.mcr = value & MCR_MASK,
            REG_SCR => self.scr = value,
            _ => {}
        }
    }

    /// Bytes transmitted since the last complete line.
    pub fn pending_line(&self) -> &[u8] {
        self.line.pending()
    }

    /// Host input for the guest: as many of `bytes` as the receive FIFO
    /// has room for; returns how many it took. Host input never overruns:
    /// what does not fit waits on the host side.
    pub fn receive_input(&mut self, bytes: &[u8]) -> usize {
        let room = RX_FIFO_BYTES - self.rx.len();
        let n = room.min(bytes.len());
        self.rx.extend_from_slice(&bytes[..n]);
        n
    }

    /// The level of the UART's interrupt line as the PIC sees it: an
    /// enabled condition pending, gated by OUT2.
    pub fn interrupt_line(&self) -> bool {
        self.mcr & MCR_OUT2 != 0 && self.interrupt_id() != IIR_NONE
    }

    fn receive(&mut self, byte: u8) {
        if self.rx.len() >= RX_FIFO_BYTES {
            self.overrun = true;
        } else {
            self.rx.push(byte);
        }
    }

    /// Highest-priority pending interrupt source, as IIR bits 3:0.
    fn interrupt_id(&self) -> u8 {
        if self.ier & IER_RDA != 0 && !self.rx.is_empty() {
            IIR_RDA
        } else if self.ier & IER_THRE != 0 && self.thre_pending {
            IIR_THRE
        } else {
            IIR_NONE
        }
    }

    /// Serialise the device state: a version byte, then the registers, the
    /// receive FIFO and the pending output line, each list length-prefixed.
    pub fn save(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.rx.len() + self.line.buf.len());
        out.push(Self::SAVE_VERSION);
        out.extend_from_slice(&[
            self.ier,
            self.lcr,
            self.mcr,
            self.scr,
            self.dll,
            self.dlm,
            self.fcr,
            u8::from(self.overrun),
            u8::from(self.thre_pending),
        ]);
        // Both lengths are capped far below 256 (RX_FIFO_BYTES, LINE_MAX_BYTES).
        out.push(self.rx.len() as u8);
        out.extend_from_slice(&self.rx);
        out.push(self.line.buf.len() as u8);
        out.extend_from_slice(&self.line.buf);
        out
    }

    /// Rebuild a UART from [`Uart16550::save`] output. Every field is
    /// checked; on error nothing is changed.
    pub fn restore(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = crate::devices::state::StateReader::new(bytes);
        let version = r.u8()?;
        if version != Self::SAVE_VERSION {
            return Err(StateError::UnsupportedVersion {
                what: "UART",
                version: u32::from(version),
            });
        }
        let ier = r.u8()?;
        let lcr = r.u8()?;
        let mcr = r.u8()?;
        let scr = r.u8()?;
        let dll = r.u8()?;
        let dlm = r.u8()?;
        let fcr = r.u8()?;
        let overrun = r.bool("overrun flag")?;
        let thre_pending = r.bool("THRE pending flag")?;
        let bad = |what, value: u8| StateError::BadValue {
            what,
            value: u64::from(value),
        };
        if ier & !IER_MASK != 0 {
            return Err(bad("IER", ier));
        }
        if mcr & !MCR_MASK != 0 {
            return Err(bad("MCR", mcr));
        }
        if fcr & !0xc9 != 0 {
            return Err(bad("FCR", fcr));
        }
        let rx_len = usize::from(r.u8()?);
        if rx_len > RX_FIFO_BYTES {
            return Err(StateError::LengthOverCap {
                what: "receive FIFO",
                len: rx_len as u64,
            });
        }
        let rx = r.take(rx_len)?.to_vec();
        let line_len = usize::from(r.u8()?);
        if line_len >= LINE_MAX_BYTES {
            return Err(StateError::LengthOverCap {
                what: "pending line",
                len: line_len as u64,
            });
        }
        let line = r.take(line_len)?;
        if let Some(&b) = line.iter().find(|b| !(0x20..=0x7e).contains(*b)) {
            return Err(bad("pending line byte", b));
        }
        let line = LineBuffer { buf: line.to_vec() };
        r.finish()?;
        Ok(Self {
            ier,
            lcr,
            mcr,
            scr,
            dll,
            dlm,
            fcr,
            overrun,
            thre_pending,
            rx,
            line,
        })
    }
}

impl Snapshot for Uart16550 {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Uart16550
    }
    /// The payload is [`Uart16550::save`]'s output, which carries its own
    /// version byte too (it predates the record format).
    fn state_version(&self) -> u16 {
        u16::from(Self::SAVE_VERSION)
    }
    fn save_state(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.save());
    }
    fn restore_state(&mut self, version: u16, bytes: &[u8]) -> Result<(), StateError> {
        crate::devices::state::expect_version("UART", version, u16::from(Self::SAVE_VERSION))?;
        *self = Self::restore(bytes)?;
        Ok(())
    }
}

impl Device for Uart16550 {
    /// Byte-wide registers: a wider access reads consecutive registers.
    fn read(&mut self, _region: u8, offset: u64, data: &mut [u8], ctx: &mut DeviceCtx<'_>) {
        for (i, b) in data.iter_mut().enumerate() {
            let reg = offset.saturating_add(i as u64);
            *b = if reg < u64::from(Self::PORTS) {
                Uart16550::read(self, reg as u8)
            } else {
                0xff
            };
        }
        ctx.irq.set(self.interrupt_line());
    }

    fn write(&mut self, _region: u8, offset: u64, data: &[u8], ctx: &mut DeviceCtx<'_>) {
        for (i, &b) in data.iter().enumerate() {
            let reg = offset.saturating_add(i as u64);
            if reg < u64::from(Self::PORTS) {
                Uart16550::write(self, reg as u8, b, &mut *ctx.console);
            }
        }
        ctx.irq.set(self.interrupt_line());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    #[derive(Default)]
    struct Lines(Vec<String>);
    impl LineSink for Lines {
        fn line(&mut self, line: &str) {
            self.0.push(line.into());
        }
    }

    fn send(uart: &mut Uart16550, s: &[u8], sink: &mut Lines) {
        for &b in s {
            assert_ne!(uart.read(REG_LSR) & LSR_THRE, 0);
            uart.write(REG_DATA, b, sink);
        }
    }

    #[test]
    fn lines_are_collected_and_sanitised() {
        let mut u = Uart16550::new();
        let mut out = Lines::default();
        send(
            &mut u,
            b"Hello\r\nbad\x1b[31mcolour\x07\tok\xff\n",
            &mut out,
        );
        send(&mut u, b"partial", &mut out);
        assert_eq!(out.0, ["Hello", "bad[31mcolour ok?"]);
        assert_eq!(u.pending_line(), b"partial");
    }

    #[test]
    fn long_lines_flush_at_cap() {
        let mut u = Uart16550::new();
        let mut out = Lines::default();
        let long = [b'x'; LINE_MAX_BYTES * 2 + 5];
        send(&mut u, &long, &mut out);
        assert_eq!(out.0.len(), 2);
        assert!(out.0.iter().all(|l| l.len() == LINE_MAX_BYTES));
        assert_eq!(u.pending_line().len(), 5);
    }

    #[test]
    fn registers_behave_like_a_16550() {
        let mut u = Uart16550::new();
        let mut out = Lines::default();
        // LSR: transmitter always empty, no data.
        assert_eq!(u.read(REG_LSR), LSR_THRE | LSR_TEMT);
        // Divisor latch behind DLAB.
        u.write(REG_LCR, 0x83, &mut out);
        u.write(REG_DATA, 0x0c, &mut out);
        u.write(REG_IER, 0x00, &mut out);
        assert_eq!((u.read(REG_DATA), u.read(REG_IER)), (0x0c, 0x00));
        u.write(REG_LCR, 0x03, &mut out);
        assert!(
            out.0.is_empty() && u.pending_line().is_empty(),
            "DLL write is not data"
        );
        // Scratch register.
        u.write(REG_SCR, 0x5a, &mut out);
        assert_eq!(u.read(REG_SCR), 0x5a);
        // IER keeps only its four bits; IIR reports no interrupt.
        u.write(REG_IER, 0xf0, &mut out);
        assert_eq!(u.read(REG_IER), 0);
        assert_eq!(u.read(REG_IIR_FCR), IIR_NONE);
        // FIFO enable shows in IIR.
        u.write(REG_IIR_FCR, 0x07, &mut out);
        assert_eq!(u.read(REG_IIR_FCR), IIR_FIFO | IIR_NONE);
        // THRE interrupt: raised when enabled, cleared by reading IIR.
        u.write(REG_IER, IER_THRE, &mut out);
        assert_eq!(u.read(REG_IIR_FCR) & 0x0f, IIR_THRE);
        assert_eq!(u.read(REG_IIR_FCR) & 0x0f, IIR_NONE);
        // MSR: a terminal is attached.
        assert_eq!(u.read(REG_MSR), MSR_CONNECTED);
        // LSR is read-only.
        u.write(REG_LSR, 0, &mut out);
        assert_eq!(u.read(REG_LSR), LSR_THRE | LSR_TEMT);
        // Offsets past the eight registers read all-ones.
        assert_eq!(u.read(8), 0xff);
    }

    #[test]
    fn loopback_receives_and_overruns() {
        let mut u = Uart16550::new();
        let mut out = Lines::default();
        u.write(REG_MCR, MCR_LOOP | 0x0f, &mut out);
        assert_eq!(u.read(REG_MSR), 0xf0);
        for i in 0..RX_FIFO_BYTES as u8 + 1 {
            u.write(REG_DATA, i, &mut out);
        }
        assert!(out.0.is_empty() && u.pending_line().is_empty());
        assert_eq!(u.read(REG_LSR), LSR_THRE | LSR_TEMT | LSR_DR | LSR_OE);
        assert_eq!(u.read(REG_LSR) & LSR_OE, 0, "OE clears on read");
        u.write(REG_IER, IER_RDA, &mut out);
        assert_eq!(u.read(REG_IIR_FCR), IIR_RDA);
        for i in 0..RX_FIFO_BYTES as u8 {
            assert_eq!(u.read(REG_DATA), i);
        }
        assert_eq!(u.read(REG_LSR) & LSR_DR, 0);
        assert_eq!(u.read(REG_DATA), 0);
    }

    #[test]
    fn save_restore_round_trip() {
        let mut u = Uart16550::new();
        let mut out = Lines::default();
        u.write(REG_SCR, 0x42, &mut out);
        u.write(REG_IIR_FCR, 0xc1, &mut out);
        u.write(REG_MCR, MCR_LOOP, &mut out);
        u.write(REG_DATA, b'z', &mut out);
        u.write(REG_MCR, 0x03, &mut out);
        send(&mut u, b"half a li", &mut out);
        let saved = u.save();
        assert_eq!(saved[0], Uart16550::SAVE_VERSION);
        let mut r = Uart16550::restore(&saved).unwrap();
        assert_eq!(r, u);
        send(&mut r, b"ne\n", &mut out);
        assert_eq!(out.0, ["half a line"]);
        assert_eq!(r.read(REG_DATA), b'z');
    }

    /// Random register traffic: never panics, the FIFO and the pending line
    /// stay within their caps, every emitted line is clean, and save/restore
    /// round-trips at any point.
    #[test]
    fn random_register_traffic() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut u = Uart16550::new();
        let mut out = Lines::default();
        for i in 0..200_000 {
            let r = next();
            let reg = (r % 10) as u8; // includes two offsets past the UART
            if r & 0x100 != 0 {
                u.write(reg, (r >> 16) as u8, &mut out);
            } else {
                let _ = u.read(reg);
            }
            assert!(u.rx.len() <= RX_FIFO_BYTES);
            assert!(u.pending_line().len() < LINE_MAX_BYTES);
            if i % 1000 == 0 {
                assert_eq!(Uart16550::restore(&u.save()).as_ref(), Ok(&u));
            }
        }
        assert!(!out.0.is_empty());
        for line in &out.0 {
            assert!(line.len() <= LINE_MAX_BYTES);
            assert!(line.bytes().all(|b| (0x20..0x7f).contains(&b)), "{line:?}");
        }
    }

    #[test]
    fn restore_rejects_bad_input() {
        let mut u = Uart16550::new();
        let mut out = Lines::default();
        send(&mut u, b"abc", &mut out);
        let good = u.save();
        assert_eq!(Uart16550::restore(&[]), Err(StateError::Truncated));
        for len in 0..good.len() {
            assert_eq!(
                Uart16550::restore(&good[..len]),
                Err(StateError::Truncated),
                "len {len}"
            );
        }
        let mut v = good.clone();
        v[0] = 9;
        assert_eq!(
            Uart16550::restore(&v),
            Err(StateError::UnsupportedVersion {
                what: "UART",
                version: 9
            })
        );
        let mut v = good.clone();
        v.push(0);
        assert_eq!(Uart16550::restore(&v), Err(StateError::TrailingBytes(1)));
        let mut v = good.clone();
        v[8] = 2; // overrun flag
        assert!(matches!(
            Uart16550::restore(&v),
            Err(StateError::BadValue { .. })
        ));
        let mut v = good.clone();
        v[1] = 0xff; // IER
        assert!(matches!(
            Uart16550::restore(&v),
            Err(StateError::BadValue { .. })
        ));
        let mut v = good.clone();
        v[10] = 200; // rx length
        assert!(matches!(
            Uart16550::restore(&v),
            Err(StateError::LengthOverCap { .. })
        ));
        let mut v = good.clone();
        let last = v.len() - 1;
        v[last] = 0x1b; // control byte in the pending line
        assert!(matches!(
            Uart16550::restore(&v),
            Err(StateError::BadValue { .. })
        ));
        // No byte flip may panic.
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut v = good.clone();
                v[i] ^= 1 << bit;
                let _ = Uart16550::restore(&v);
            }
        }
    }

    #[test]
    fn interrupt_line_follows_conditions_and_out2() {
        let mut u = Uart16550::new();
        let mut out = Lines::default();
        u.write(REG_IER, IER_THRE | IER_RDA, &mut out);
        assert!(!u.interrupt_line(), "OUT2 low: the PIC never sees it");
        u.write(REG_MCR, MCR_OUT2, &mut out);
        assert!(u.interrupt_line(), "THR empty");
        assert_eq!(u.read(REG_IIR_FCR), IIR_THRE);
        assert!(!u.interrupt_line(), "reading IIR cleared THRE");
        u.write(REG_DATA, b'x', &mut out);
        assert!(u.interrupt_line(), "the byte left: THR empty again");
        u.read(REG_IIR_FCR);
        // Linux's THRE test: disable and re-enable THRE re-asserts it.
        u.write(REG_IER, 0, &mut out);
        u.write(REG_IER, IER_THRE, &mut out);
        assert_eq!(u.read(REG_IIR_FCR), IIR_THRE);
        // Received data.
        u.write(REG_IER, IER_RDA, &mut out);
        assert_eq!(u.receive_input(b"ls\n"), 3);
        assert!(u.interrupt_line());
        assert_eq!(u.read(REG_IIR_FCR), IIR_RDA);
        assert_eq!(u.read(REG_LSR) & LSR_DR, LSR_DR);
        assert_eq!(
            [u.read(REG_DATA), u.read(REG_DATA), u.read(REG_DATA)],
            *b"ls\n"
        );
        assert!(!u.interrupt_line());
    }

    #[test]
    fn host_input_fills_the_fifo_and_never_overruns() {
        let mut u = Uart16550::new();
        let input = [b'a'; 40];
        assert_eq!(u.receive_input(&input), RX_FIFO_BYTES);
        assert_eq!(u.receive_input(&input), 0);
        assert_eq!(u.read(REG_LSR) & LSR_OE, 0);
        u.read(REG_DATA);
        assert_eq!(u.receive_input(&input), 1);
    }
}
