//! Software emulation of the instructions guests use to access MMIO.
//!
//! A nested page fault on a device page tells the hypervisor the
//! guest-physical address and whether it was a read or a write, but not
//! the width, the register or the value: those are in the instruction.
//! SVM's decode assists (and VMX's exit qualification for some exits)
//! would help, but QEMU's TCG SVM has none, so the VMM decodes the
//! instruction itself ([`decode`], a pure function over its bytes) and
//! completes it against the register file ([`emulate`]).
//!
//! Forms decoded (Intel SDM vol. 2, one-byte opcode map A-2 and two-byte
//! map A-3; 64-bit mode rules in 2.2.1), all with a memory operand:
//! * `88`/`89` MOV r/m, reg; `8A`/`8B` MOV reg, r/m (8/16/32/64 bits);
//! * `C6 /0 ib` and `C7 /0 iw/id` MOV r/m, imm (imm32 sign-extended for 64);
//! * `0F B6`/`0F B7` MOVZX and `0F BE`/`0F BF` MOVSX loads;
//! * `63` MOVSXD (64-bit mode);
//! * `86`/`87` XCHG r/m, reg (the locked exchange some APIC code uses);
//! * `A0`-`A3` MOV with a direct address (moffs);
//! * `38`-`3B` CMP and `84`/`85` TEST with a register, `80`/`81`/`83 /7`
//!   CMP and `F6`/`F7 /0` TEST with an immediate: a read that only sets
//!   the arithmetic flags (compilers fold a load of a register they may
//!   read freely, such as virtio-drivers' `ReadPure` fields, into the
//!   comparison);
//! * prefixes: operand size `66`, address size `67`, segment overrides,
//!   `F0`/`F2`/`F3` (ignored: with these opcodes they change nothing the
//!   device sees), and REX in 64-bit mode (only when it directly precedes
//!   the opcode; an earlier one is ignored, as the CPU does).
//!
//! This covers Linux's `readb/w/l/q` and `writeb/w/l/q` (a `mov` to or
//! from a register, any addressing form), the local APIC accessors (`mov`,
//! or `xchg` on CPUs with the 11AP erratum) and what compilers emit for
//! volatile loads (including `movzbl`/`movzwl`). Anything else is
//! [`DecodeError::Unsupported`], which stops the VM with the instruction
//! bytes in the reason (STYLE 4, category 3): guessing would corrupt the
//! guest silently.
//!
//! The memory operand's address is not computed: the fault already gave
//! the guest-physical address. Only its length matters (ModRM, SIB and
//! displacement bytes).

use core::fmt;
use hvcore::vcpu::Regs;

/// The most bytes an x86 instruction can have.
pub const MAX_INSN_BYTES: usize = 15;

/// How the CPU decodes: 64-bit mode (CS.L = 1) or 32-bit protected or
/// compatibility mode (CS.D = 1). 16-bit code never touches our MMIO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    Long64,
    Protected32,
}

/// A general register operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegRef {
    /// 0 = RAX ... 15 = R15 (SDM encoding order).
    pub index: u8,
    /// AH, CH, DH or BH: bits 15:8 of registers 0-3.
    pub high8: bool,
}

/// How a load fills its destination register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extend {
    /// Same width as the access.
    None,
    /// Zero-extended to the destination width.
    Zero,
    /// Sign-extended to the destination width.
    Sign,
}

/// The source of a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Reg(RegRef),
    /// Already sign-extended to the access width.
    Imm(u64),
}

/// What the instruction does to memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioOp {
    /// Read `size` bytes into `dest`, `dest_width` bytes wide.
    Load {
        size: u8,
        dest: RegRef,
        dest_width: u8,
        extend: Extend,
    },
    /// Write `size` bytes.
    Store { size: u8, src: Source },
    /// Read `size` bytes, write `reg`'s, then `reg` = what was read.
    Exchange { size: u8, reg: RegRef },
    /// Read `size` bytes and set the arithmetic flags of `mem - src`
    /// (`src - mem` when `reversed`) or, for `test`, of `mem & src`.
    Compare {
        size: u8,
        src: Source,
        reversed: bool,
        test: bool,
    },
}

impl MmioOp {
    /// Bytes accessed.
    pub fn size(&self) -> u8 {
        match *self {
            MmioOp::Load { size, .. }
            | MmioOp::Store { size, .. }
            | MmioOp::Exchange { size, .. }
            | MmioOp::Compare { size, .. } => size,
        }
    }
    /// Whether memory is written.
    pub fn writes(&self) -> bool {
        matches!(self, MmioOp::Store { .. } | MmioOp::Exchange { .. })
    }
}

/// A decoded instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioInsn {
    /// Length in bytes (RIP advances by this).
    pub len: u8,
    pub op: MmioOp,
}

/// Why an instruction could not be emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes ended inside the instruction (the fetch stopped at an
    /// unmapped page, or the guest's code is garbage).
    Truncated,
    /// More than 15 bytes (the CPU would have raised #GP).
    TooLong,
    /// An opcode this decoder does not emulate (`0x0fXX` for two-byte
    /// opcodes).
    Unsupported { opcode: u16 },
    /// The ModRM names a register, not memory (cannot have faulted on
    /// MMIO).
    RegisterOperand,
    /// 16-bit addressing (a `67` prefix in 32-bit mode).
    Addressing16,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "instruction bytes end inside the instruction"),
            DecodeError::TooLong => write!(f, "instruction longer than 15 bytes"),
            DecodeError::Unsupported { opcode } => {
                write!(f, "opcode {opcode:#x} is not an emulated MMIO access")
            }
            DecodeError::RegisterOperand => write!(f, "register operand where memory was accessed"),
            DecodeError::Addressing16 => write!(f, "16-bit addressing is not emulated"),
        }
    }
}

/// Byte cursor over the instruction.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn next(&mut self) -> Result<u8, DecodeError> {
        if self.pos >= MAX_INSN_BYTES {
            return Err(DecodeError::TooLong);
        }
        let b = *self.bytes.get(self.pos).ok_or(DecodeError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }
    fn skip(&mut self, n: usize) -> Result<(), DecodeError> {
        for _ in 0..n {
            self.next()?;
        }
        Ok(())
    }
    fn le(&mut self, n: usize) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for i in 0..n {
            v |= u64::from(self.next()?) << (8 * i);
        }
        Ok(v)
    }
}

/// Prefix state.
#[derive(Clone, Copy, Default)]
struct Prefixes {
    opsize: bool,
    addrsize: bool,
    /// REX bits W, R, X, B (0 if no REX).
    rex: u8,
    has_rex: bool,
}

/// Skip the ModRM memory operand (SIB and displacement); returns the reg
/// field (with REX.R).
fn modrm(c: &mut Cursor<'_>, p: &Prefixes, mode: CpuMode) -> Result<(u8, u8), DecodeError> {
    let m = c.next()?;
    let (md, reg, rm) = (m >> 6, (m >> 3) & 7, m & 7);
    if md == 3 {
        return Err(DecodeError::RegisterOperand);
    }
    if mode == CpuMode::Protected32 && p.addrsize {
        return Err(DecodeError::Addressing16);
    }
    let mut disp = match md {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    if rm == 4 {
        let sib = c.next()?;
        if md == 0 && sib & 7 == 5 {
            disp = 4;
        }
    } else if md == 0 && rm == 5 {
        // disp32, RIP-relative in 64-bit mode.
        disp = 4;
    }
    c.skip(disp)?;
    let reg_full = reg | ((p.rex & 4) << 1);
    Ok((reg_full, (m >> 3) & 7))
}

fn reg8(index: u8, p: &Prefixes) -> RegRef {
    if !p.has_rex && (4..8).contains(&index) {
        RegRef {
            index: index - 4,
            high8: true,
        }
    } else {
        RegRef {
            index,
            high8: false,
        }
    }
}

fn full(index: u8) -> RegRef {
    RegRef {
        index,
        high8: false,
    }
}

/// Decode the instruction at the start of `bytes` (up to 15 bytes; more
/// are ignored).
pub fn decode(bytes: &[u8], mode: CpuMode) -> Result<MmioInsn, DecodeError> {
    let mut c = Cursor { bytes, pos: 0 };
    let mut p = Prefixes::default();
    let opcode = loop {
        let b = c.next()?;
        match b {
            0x66 => p.opsize = true,
            0x67 => p.addrsize = true,
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0xf0 | 0xf2 | 0xf3 => {}
            0x40..=0x4f if mode == CpuMode::Long64 => {
                // A REX counts only right before the opcode: read it and
                // look at what follows.
                p.rex = b & 0xf;
                p.has_rex = true;
                let next = c.next()?;
                if matches!(
                    next,
                    0x66 | 0x67
                        | 0x26
                        | 0x2e
                        | 0x36
                        | 0x3e
                        | 0x64
                        | 0x65
                        | 0xf0
                        | 0xf2
                        | 0xf3
                        | 0x40..=0x4f
                ) {
                    p.rex = 0;
                    p.has_rex = false;
                    c.pos -= 1;
                    continue;
                }
                break next;
            }
            _ => break b,
        }
    };
    let rex_w = p.rex & 8 != 0;
    let opsize: u8 = if mode == CpuMode::Long64 && rex_w {
        8
    } else if p.opsize {
        2
    } else {
        4
    };
    let op = match opcode {
        0x86..=0x8b => {
            let (reg, _) = modrm(&mut c, &p, mode)?;
            let byte = opcode & 1 == 0;
            let (size, r) = if byte {
                (1, reg8(reg, &p))
            } else {
                (opsize, full(reg))
            };
            match opcode {
                0x88 | 0x89 => MmioOp::Store {
                    size,
                    src: Source::Reg(r),
                },
                0x8a | 0x8b => MmioOp::Load {
                    size,
                    dest: r,
                    dest_width: size,
                    extend: Extend::None,
                },
                _ => MmioOp::Exchange { size, reg: r },
            }
        }
        0x38..=0x3b | 0x84 | 0x85 => {
            let (reg, _) = modrm(&mut c, &p, mode)?;
            let (size, r) = if opcode & 1 == 0 {
                (1, reg8(reg, &p))
            } else {
                (opsize, full(reg))
            };
            MmioOp::Compare {
                size,
                src: Source::Reg(r),
                reversed: matches!(opcode, 0x3a | 0x3b),
                test: opcode >= 0x84,
            }
        }
        0x80 | 0x81 | 0x83 | 0xf6 | 0xf7 => {
            let (_, ext) = modrm(&mut c, &p, mode)?;
            let test = opcode >= 0xf6;
            if (test && ext != 0) || (!test && ext != 7) {
                return Err(DecodeError::Unsupported {
                    opcode: u16::from(opcode),
                });
            }
            let sext = |v: u64, from: u8| -> u64 {
                let shift = 64 - 8 * u32::from(from);
                (((v << shift) as i64) >> shift) as u64
            };
            let (size, imm) = match opcode {
                0x80 | 0xf6 => (1, c.le(1)?),
                0x83 => (opsize, sext(c.le(1)?, 1) & mask(opsize)),
                _ if opsize == 2 => (2, c.le(2)?),
                _ => (opsize, sext(c.le(4)?, 4) & mask(opsize)),
            };
            MmioOp::Compare {
                size,
                src: Source::Imm(imm),
                reversed: false,
                test,
            }
        }
        0xc6 | 0xc7 => {
            let (_, ext) = modrm(&mut c, &p, mode)?;
            if ext != 0 {
                return Err(DecodeError::Unsupported {
                    opcode: u16::from(opcode),
                });
            }
            let (size, imm) = if opcode == 0xc6 {
                (1, c.le(1)?)
            } else if opsize == 2 {
                (2, c.le(2)?)
            } else {
                let v = c.le(4)?;
                // imm32, sign-extended to 64 bits for a 64-bit store.
                let v = if opsize == 8 {
                    v as u32 as i32 as i64 as u64
                } else {
                    v
                };
                (opsize, v)
            };
            MmioOp::Store {
                size,
                src: Source::Imm(imm),
            }
        }
        0x63 if mode == CpuMode::Long64 => {
            let (reg, _) = modrm(&mut c, &p, mode)?;
            MmioOp::Load {
                size: 4,
                dest: full(reg),
                dest_width: opsize,
                extend: if opsize == 8 {
                    Extend::Sign
                } else {
                    Extend::None
                },
            }
        }
        0xa0..=0xa3 => {
            let addr_bytes = match (mode, p.addrsize) {
                (CpuMode::Long64, false) => 8,
                (CpuMode::Long64, true) | (CpuMode::Protected32, false) => 4,
                (CpuMode::Protected32, true) => return Err(DecodeError::Addressing16),
            };
            c.skip(addr_bytes)?;
            let size = if opcode & 1 == 0 { 1 } else { opsize };
            let rax = full(0);
            if opcode < 0xa2 {
                MmioOp::Load {
                    size,
                    dest: rax,
                    dest_width: size,
                    extend: Extend::None,
                }
            } else {
                MmioOp::Store {
                    size,
                    src: Source::Reg(rax),
                }
            }
        }
        0x0f => {
            let op2 = c.next()?;
            let (size, extend) = match op2 {
                0xb6 => (1, Extend::Zero),
                0xb7 => (2, Extend::Zero),
                0xbe => (1, Extend::Sign),
                0xbf => (2, Extend::Sign),
                _ => {
                    return Err(DecodeError::Unsupported {
                        opcode: 0x0f00 | u16::from(op2),
                    })
                }
            };
            let (reg, _) = modrm(&mut c, &p, mode)?;
            MmioOp::Load {
                size,
                dest: full(reg),
                dest_width: opsize,
                extend,
            }
        }
        _ => {
            return Err(DecodeError::Unsupported {
                opcode: u16::from(opcode),
            })
        }
    };
    Ok(MmioInsn {
        len: c.pos as u8,
        op,
    })
}

/// Register `index` of `regs` (SDM order: RAX, RCX, RDX, RBX, RSP, RBP,
/// RSI, RDI, R8-R15).
pub fn reg_mut(regs: &mut Regs, index: u8) -> &mut u64 {
    match index & 15 {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

fn mask(width: u8) -> u64 {
    match width {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

/// Read a register operand of `width` bytes.
fn get(regs: &mut Regs, r: RegRef, width: u8) -> u64 {
    let v = *reg_mut(regs, r.index);
    if r.high8 {
        (v >> 8) & 0xff
    } else {
        v & mask(width)
    }
}

/// Write a register operand of `width` bytes with the CPU's rules: 8- and
/// 16-bit writes keep the other bits, 32-bit writes zero the upper half
/// (SDM vol. 1, 3.4.1.1).
fn set(regs: &mut Regs, r: RegRef, width: u8, value: u64) {
    let slot = reg_mut(regs, r.index);
    *slot = match (width, r.high8) {
        (1, true) => (*slot & !0xff00) | ((value & 0xff) << 8),
        (1, false) | (2, _) => (*slot & !mask(width)) | (value & mask(width)),
        (4, _) => value & 0xffff_ffff,
        _ => value,
    };
}

const CF: u64 = 1 << 0;
const PF: u64 = 1 << 2;
const AF: u64 = 1 << 4;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const OF: u64 = 1 << 11;
/// The flags CMP and TEST write (SDM vol. 1, 3.4.3.1).
const ARITH_FLAGS: u64 = CF | PF | AF | ZF | SF | OF;

/// ZF, SF and PF of a result of `size` bytes.
fn result_flags(r: u64, size: u8) -> u64 {
    let top = 1u64 << (8 * u32::from(size) - 1);
    let mut f = 0;
    if r & mask(size) == 0 {
        f |= ZF;
    }
    if r & top != 0 {
        f |= SF;
    }
    // PF: even number of set bits in the low byte.
    if (r as u8).count_ones().is_multiple_of(2) {
        f |= PF;
    }
    f
}

/// Flags of `a - b` at `size` bytes (CMP).
fn sub_flags(a: u64, b: u64, size: u8) -> u64 {
    let m = mask(size);
    let (a, b) = (a & m, b & m);
    let r = a.wrapping_sub(b) & m;
    let top = 1u64 << (8 * u32::from(size) - 1);
    let mut f = result_flags(r, size);
    if a < b {
        f |= CF;
    }
    if (a ^ b) & (a ^ r) & top != 0 {
        f |= OF;
    }
    if (a ^ b ^ r) & 0x10 != 0 {
        f |= AF;
    }
    f
}

/// Flags of a logical result (TEST): CF and OF clear, AF left clear.
fn logic_flags(r: u64, size: u8) -> u64 {
    result_flags(r & mask(size), size)
}

/// The device side of an emulated access.
pub trait MmioBus {
    /// Read `data.len()` bytes at `gpa`.
    fn read(&mut self, gpa: u64, data: &mut [u8]);
    /// Write `data` at `gpa`.
    fn write(&mut self, gpa: u64, data: &[u8]);
}

/// Emulate the MMIO instruction in `bytes` that faulted on `gpa`: do the
/// access on `bus`, update the destination register and advance RIP.
/// On error nothing was accessed and no register changed.
pub fn emulate(
    bytes: &[u8],
    mode: CpuMode,
    regs: &mut Regs,
    gpa: u64,
    bus: &mut dyn MmioBus,
) -> Result<MmioInsn, DecodeError> {
    let insn = decode(bytes, mode)?;
    let size = insn.op.size();
    let n = usize::from(size);
    match insn.op {
        MmioOp::Load {
            dest,
            dest_width,
            extend,
            ..
        } => {
            let mut buf = [0u8; 8];
            bus.read(gpa, &mut buf[..n]);
            let raw = u64::from_le_bytes(buf);
            let value = match extend {
                Extend::Sign => {
                    let shift = 64 - 8 * u32::from(size);
                    (((raw << shift) as i64) >> shift) as u64
                }
                _ => raw,
            };
            set(regs, dest, dest_width, value);
        }
        MmioOp::Store { src, .. } => {
            let value = match src {
                Source::Reg(r) => get(regs, r, size),
                Source::Imm(v) => v,
            };
            bus.write(gpa, &value.to_le_bytes()[..n]);
        }
        MmioOp::Exchange { reg, .. } => {
            let mut buf = [0u8; 8];
            bus.read(gpa, &mut buf[..n]);
            let new = get(regs, reg, size);
            bus.write(gpa, &new.to_le_bytes()[..n]);
            set(regs, reg, size, u64::from_le_bytes(buf));
        }
        MmioOp::Compare {
            src,
            reversed,
            test,
            ..
        } => {
            let mut buf = [0u8; 8];
            bus.read(gpa, &mut buf[..n]);
            let mem = u64::from_le_bytes(buf);
            let other = match src {
                Source::Reg(r) => get(regs, r, size),
                Source::Imm(v) => v,
            };
            let flags = if test {
                logic_flags(mem & other, size)
            } else if reversed {
                sub_flags(other, mem, size)
            } else {
                sub_flags(mem, other, size)
            };
            regs.rflags = (regs.rflags & !ARITH_FLAGS) | flags;
        }
    }
    regs.rip = match mode {
        CpuMode::Long64 => regs.rip.wrapping_add(u64::from(insn.len)),
        CpuMode::Protected32 => (regs.rip.wrapping_add(u64::from(insn.len))) & 0xffff_ffff,
    };
    Ok(insn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// A device double: reads return a fixed pattern, writes are recorded.
    #[derive(Default)]
    struct Bus {
        reads: Vec<(u64, usize)>,
        writes: Vec<(u64, Vec<u8>)>,
        pattern: u64,
    }
    impl MmioBus for Bus {
        fn read(&mut self, gpa: u64, data: &mut [u8]) {
            self.reads.push((gpa, data.len()));
            data.copy_from_slice(&self.pattern.to_le_bytes()[..data.len()]);
        }
        fn write(&mut self, gpa: u64, data: &[u8]) {
            self.writes.push((gpa, data.to_vec()));
        }
    }

    fn regs() -> Regs {
        Regs {
            rax: 0x1111_1111_1111_1111,
            rcx: 0x2222_2222_2222_2222,
            rdx: 0x3333_3333_3333_3333,
            rbx: 0x4444_4444_4444_4444,
            rsp: 0x5555_5555_5555_5555,
            rbp: 0x6666_6666_6666_6666,
            rsi: 0x7777_7777_7777_7777,
            rdi: 0x8888_8888_8888_8888,
            r8: 0x9999_9999_9999_9999,
            r9: 0xaaaa_aaaa_aaaa_aaaa,
            r10: 0xbbbb_bbbb_bbbb_bbbb,
            r11: 0xcccc_cccc_cccc_cccc,
            r12: 0xdddd_dddd_dddd_dddd,
            r13: 0xeeee_eeee_eeee_eeee,
            r14: 0x0f0f_0f0f_0f0f_0f0f,
            r15: 0xf0f0_f0f0_f0f0_f0f0,
            rip: 0x1000,
            rflags: 2,
        }
    }

    fn run(bytes: &[u8], pattern: u64) -> (Regs, Bus, MmioInsn) {
        let mut r = regs();
        let mut bus = Bus {
            pattern,
            ..Bus::default()
        };
        let insn = emulate(bytes, CpuMode::Long64, &mut r, 0xfee0_00b0, &mut bus)
            .unwrap_or_else(|e| panic!("{bytes:02x?}: {e}"));
        assert_eq!(r.rip, 0x1000 + u64::from(insn.len));
        (r, bus, insn)
    }

    /// What Linux's accessors compile to, from disassembled 6.1 code.
    #[test]
    fn linux_accessors() {
        // writel: mov %eax,(%rdx)
        let (r, bus, i) = run(&[0x89, 0x02], 0);
        assert_eq!(i.len, 2);
        assert_eq!(
            bus.writes,
            [(0xfee0_00b0, 0x1111_1111u32.to_le_bytes().to_vec())]
        );
        assert_eq!(r.rax, regs().rax);
        // readl: mov (%rax),%eax — zero-extends into RAX.
        let (r, _, _) = run(&[0x8b, 0x00], 0xdead_beef_cafe_f00d);
        assert_eq!(r.rax, 0xcafe_f00d);
        // native_apic_mem_write: mov %edi,0xffffffffff5fd0b0 (SIB, no base).
        let (_, bus, i) = run(&[0x89, 0x3c, 0x25, 0xb0, 0xd0, 0x5f, 0xff], 0);
        assert_eq!(i.len, 7);
        assert_eq!(bus.writes[0].1, 0x8888_8888u32.to_le_bytes());
        // native_apic_mem_read: mov 0xffffffffff5fd030,%eax
        let (r, _, i) = run(&[0x8b, 0x04, 0x25, 0x30, 0xd0, 0x5f, 0xff], 0x0005_0014);
        assert_eq!((i.len, r.rax), (7, 0x0005_0014));
        // readb: mov (%rdi),%al — keeps the rest of RAX.
        let (r, _, _) = run(&[0x8a, 0x07], 0xab);
        assert_eq!(r.rax, 0x1111_1111_1111_11ab);
        // writew: mov %si,0x10(%rdi)
        let (_, bus, i) = run(&[0x66, 0x89, 0x77, 0x10], 0);
        assert_eq!(
            (i.len, bus.writes[0].1.clone()),
            (4, 0x7777u16.to_le_bytes().to_vec())
        );
        // readw: mov 0x10(%rdi),%ax
        let (r, _, _) = run(&[0x66, 0x8b, 0x47, 0x10], 0xbeef);
        assert_eq!(r.rax, 0x1111_1111_1111_beef);
        // readq / writeq: mov (%rdi),%rax / mov %rsi,(%rdi)
        let (r, _, _) = run(&[0x48, 0x8b, 0x07], 0x0123_4567_89ab_cdef);
        assert_eq!(r.rax, 0x0123_4567_89ab_cdef);
        let (_, bus, _) = run(&[0x48, 0x89, 0x37], 0);
        assert_eq!(bus.writes[0].1, regs().rsi.to_le_bytes());
        // REX.R/REX.B: mov %r9d,0x40(%r12) (SIB for r12).
        let (_, bus, i) = run(&[0x45, 0x89, 0x4c, 0x24, 0x40], 0);
        assert_eq!(i.len, 5);
        assert_eq!(bus.writes[0].1, 0xaaaa_aaaau32.to_le_bytes());
        // mov 0x0(%r13),%r10d: r13 with mod 01 (no RIP-relative).
        let (r, _, i) = run(&[0x45, 0x8b, 0x55, 0x00], 0x42);
        assert_eq!((i.len, r.r10), (4, 0x42));
        // RIP-relative: mov 0x1234(%rip),%ecx
        let (r, _, i) = run(&[0x8b, 0x0d, 0x34, 0x12, 0, 0], 7);
        assert_eq!((i.len, r.rcx), (6, 7));
        // Index register and disp32: mov %ebx,0x1000(%rax,%rcx,4)
        let (_, bus, i) = run(&[0x89, 0x9c, 0x88, 0, 0x10, 0, 0], 0);
        assert_eq!(i.len, 7);
        assert_eq!(bus.writes[0].1, 0x4444_4444u32.to_le_bytes());
    }

    #[test]
    fn immediates_and_extensions() {
        // movl $0x1,0x70(%rax)
        let (_, bus, i) = run(&[0xc7, 0x40, 0x70, 1, 0, 0, 0], 0);
        assert_eq!(
            (i.len, bus.writes[0].1.clone()),
            (7, 1u32.to_le_bytes().to_vec())
        );
        // movq $-1,(%rax): imm32 sign-extended.
        let (_, bus, _) = run(&[0x48, 0xc7, 0x00, 0xff, 0xff, 0xff, 0xff], 0);
        assert_eq!(bus.writes[0].1, [0xff; 8]);
        // movw $0x1234,(%rax)
        let (_, bus, i) = run(&[0x66, 0xc7, 0x00, 0x34, 0x12], 0);
        assert_eq!((i.len, bus.writes[0].1.clone()), (5, [0x34, 0x12].to_vec()));
        // movb $0x5,(%rax)
        let (_, bus, _) = run(&[0xc6, 0x00, 5], 0);
        assert_eq!(bus.writes[0].1, [5]);
        // movzbl (%rax),%edx / movzwl (%rax),%edx
        let (r, _, _) = run(&[0x0f, 0xb6, 0x10], 0xfff0);
        assert_eq!(r.rdx, 0xf0);
        let (r, _, _) = run(&[0x0f, 0xb7, 0x10], 0x1_8001);
        assert_eq!(r.rdx, 0x8001);
        // movsbl / movswq
        let (r, _, _) = run(&[0x0f, 0xbe, 0x10], 0x80);
        assert_eq!(r.rdx, 0xffff_ff80);
        let (r, _, _) = run(&[0x48, 0x0f, 0xbf, 0x10], 0x8000);
        assert_eq!(r.rdx, 0xffff_ffff_ffff_8000);
        // movzbw: 16-bit destination keeps the upper bits.
        let (r, _, _) = run(&[0x66, 0x0f, 0xb6, 0x10], 0x7f);
        assert_eq!(r.rdx, 0x3333_3333_3333_007f);
        // movslq (%rax),%rcx
        let (r, _, _) = run(&[0x48, 0x63, 0x08], 0x8000_0000);
        assert_eq!(r.rcx, 0xffff_ffff_8000_0000);
    }

    #[test]
    fn byte_registers_with_and_without_rex() {
        // mov %ah,(%rdi): no REX, reg 4 is AH.
        let (_, bus, _) = run(&[0x88, 0x27], 0);
        assert_eq!(bus.writes[0].1, [0x11]);
        let mut r = regs();
        r.rax = 0xaabb;
        let mut bus = Bus::default();
        emulate(&[0x88, 0x27], CpuMode::Long64, &mut r, 0, &mut bus).unwrap();
        assert_eq!(bus.writes[0].1, [0xaa]);
        // mov %spl,(%rdi): REX makes reg 4 SPL.
        let (_, bus, _) = run(&[0x40, 0x88, 0x27], 0);
        assert_eq!(bus.writes[0].1, [0x55]);
        // mov (%rdi),%bh: writes bits 15:8 of RBX.
        let (r, _, _) = run(&[0x8a, 0x3f], 0x9a);
        assert_eq!(r.rbx, 0x4444_4444_4444_9a44);
        // mov (%rdi),%r15b
        let (r, _, _) = run(&[0x44, 0x8a, 0x3f], 0x9a);
        assert_eq!(r.r15, 0xf0f0_f0f0_f0f0_f09a);
    }

    /// CMP/TEST with a memory operand: one read, no write, only the
    /// arithmetic flags change (values checked against what the CPU sets).
    #[test]
    fn compare_and_test_set_flags() {
        const ALL: u64 = CF | PF | AF | ZF | SF | OF;
        // cmpl $0x0,0x40(%rax,%rcx,4) (virtio-drivers' queue_used): 0 -> ZF PF.
        let (r, bus, i) = run(&[0x83, 0x7c, 0x88, 0x40, 0x00], 0);
        assert_eq!(i.len, 5);
        assert_eq!((bus.reads.len(), bus.writes.len()), (1, 0));
        assert_eq!(r.rflags & ALL, ZF | PF);
        assert_eq!(r.rax, regs().rax, "no register changes");
        // Non-zero: ZF clear.
        let (r, _, _) = run(&[0x83, 0x7c, 0x88, 0x40, 0x00], 1);
        assert_eq!(r.rflags & ZF, 0);
        // cmp $1,(%rax) with 0 in memory: 0 - 1 borrows, sign, AF, PF.
        let (r, _, _) = run(&[0x83, 0x38, 0x01], 0);
        assert_eq!(r.rflags & ALL, CF | SF | AF | PF);
        // cmpl $0x80000000,(%rax) with 0x7fffffff: overflow.
        let (r, _, _) = run(&[0x81, 0x38, 0, 0, 0, 0x80], 0x7fff_ffff);
        assert_eq!(r.rflags & (OF | CF | SF), OF | CF | SF);
        // cmp (%rax),%ecx (3B: reg - mem), ecx = 0x22222222 > 0x10.
        let (r, _, _) = run(&[0x3b, 0x08], 0x10);
        assert_eq!(r.rflags & (CF | ZF | SF), 0);
        // testb $0x1,(%rdx) / test %eax,(%rdx).
        let (r, _, i) = run(&[0xf6, 0x02, 0x01], 0xfe);
        assert_eq!((i.len, r.rflags & ZF), (3, ZF));
        let (r, _, _) = run(&[0x85, 0x02], 0x0100_0000);
        assert_eq!(r.rflags & (ZF | CF | OF), 0);
        // Other /digit forms (add, or, ...) are still refused.
        assert!(matches!(
            decode(&[0x83, 0x00, 0x01], CpuMode::Long64),
            Err(DecodeError::Unsupported { opcode: 0x83 })
        ));
    }

    #[test]
    fn exchange_and_moffs() {
        // xchg %eax,(%rdx)
        let (r, bus, _) = run(&[0x87, 0x02], 0x5555_0000);
        assert_eq!(bus.reads, [(0xfee0_00b0, 4)]);
        assert_eq!(bus.writes[0].1, 0x1111_1111u32.to_le_bytes());
        assert_eq!(r.rax, 0x5555_0000);
        // mov 0xfee00020,%eax (A1 with 8-byte address in 64-bit mode)
        let (r, _, i) = run(&[0xa1, 0x20, 0, 0xe0, 0xfe, 0, 0, 0, 0], 0x0300_0000);
        assert_eq!((i.len, r.rax), (9, 0x0300_0000));
        // 67 A3: 4-byte address.
        let (_, bus, i) = run(&[0x67, 0xa3, 0x20, 0, 0xe0, 0xfe], 0);
        assert_eq!(i.len, 6);
        assert_eq!(bus.writes[0].1, 0x1111_1111u32.to_le_bytes());
        // 32-bit mode: 66 A1 is a 16-bit load with a 4-byte address.
        let mut r = regs();
        let mut bus = Bus {
            pattern: 0xabcd,
            ..Bus::default()
        };
        let i = emulate(
            &[0x66, 0xa1, 0, 0, 0xc0, 0xfe],
            CpuMode::Protected32,
            &mut r,
            0,
            &mut bus,
        )
        .unwrap();
        assert_eq!((i.len, r.rax & 0xffff), (6, 0xabcd));
    }

    #[test]
    fn prefixes() {
        // Segment override and lock-less rep prefixes are skipped.
        let (_, _, i) = run(&[0x64, 0x89, 0x02], 0);
        assert_eq!(i.len, 3);
        let (_, bus, i) = run(&[0xf3, 0x89, 0x02], 0);
        assert_eq!((i.len, bus.writes.len()), (3, 1));
        // A REX followed by another prefix is ignored (a 16-bit store).
        let (_, bus, i) = run(&[0x48, 0x66, 0x89, 0x02], 0);
        assert_eq!((i.len, bus.writes[0].1.len()), (4, 2));
        // 66 + REX.W: REX.W wins.
        let (_, bus, _) = run(&[0x66, 0x48, 0x89, 0x02], 0);
        assert_eq!(bus.writes[0].1.len(), 8);
        // In 32-bit mode 0x48 is DEC EAX, not REX.
        assert_eq!(
            decode(&[0x48, 0x89, 0x02], CpuMode::Protected32),
            Err(DecodeError::Unsupported { opcode: 0x48 })
        );
        // 32-bit mode: 16-bit addressing refused.
        assert_eq!(
            decode(&[0x67, 0x89, 0x07], CpuMode::Protected32),
            Err(DecodeError::Addressing16)
        );
        // 32-bit mode, 32-bit addressing: disp32 without RIP.
        let i = decode(&[0x89, 0x05, 0, 0, 0xe0, 0xfe], CpuMode::Protected32).unwrap();
        assert_eq!(i.len, 6);
    }

    #[test]
    fn refuses_what_it_does_not_emulate() {
        let cases: [(&[u8], DecodeError); 10] = [
            (&[], DecodeError::Truncated),
            (&[0x89], DecodeError::Truncated),
            (&[0x89, 0x04], DecodeError::Truncated),
            (&[0x89, 0x80, 1, 2], DecodeError::Truncated),
            (&[0xc7, 0x00, 1, 2], DecodeError::Truncated),
            (&[0x89, 0xc0], DecodeError::RegisterOperand),
            (&[0x01, 0x00], DecodeError::Unsupported { opcode: 0x01 }),
            (
                &[0x0f, 0xae, 0x38],
                DecodeError::Unsupported { opcode: 0x0fae },
            ),
            (
                &[0xc7, 0x08, 0, 0, 0, 0],
                DecodeError::Unsupported { opcode: 0xc7 },
            ),
            (&[0x66; 16], DecodeError::TooLong),
        ];
        for (bytes, want) in cases {
            assert_eq!(decode(bytes, CpuMode::Long64), Err(want), "{bytes:02x?}");
            let mut r = regs();
            let mut bus = Bus::default();
            assert!(emulate(bytes, CpuMode::Long64, &mut r, 0, &mut bus).is_err());
            assert_eq!(r, regs(), "no register changed");
            assert!(bus.reads.is_empty() && bus.writes.is_empty());
        }
        for e in [
            DecodeError::Truncated,
            DecodeError::Unsupported { opcode: 1 },
        ] {
            assert!(!alloc::format!("{e}").is_empty());
        }
        // Twelve prefixes and a 2-byte MOV: fine; 13 and a 3-byte one: too long.
        let mut ok = [0x66u8; 15];
        ok[12] = 0x89;
        ok[13] = 0x07;
        ok[14] = 0x90;
        assert_eq!(decode(&ok, CpuMode::Long64).unwrap().len, 14);
        let mut long = [0x66u8; 16];
        long[13] = 0x89;
        long[14] = 0x47;
        long[15] = 0x10;
        assert_eq!(decode(&long, CpuMode::Long64), Err(DecodeError::TooLong));
        // 0x63 is ARPL outside 64-bit mode.
        assert!(decode(&[0x63, 0x00], CpuMode::Protected32).is_err());
    }

    /// Every ModRM/SIB combination with a memory operand, against the
    /// length rule written out independently.
    #[test]
    fn modrm_lengths_exhaustive() {
        for modrm in 0u8..=255 {
            for sib in [0x00u8, 0x05, 0x25, 0x24, 0xe5] {
                let bytes = [0x8b, modrm, sib, 1, 2, 3, 4, 5];
                let md = modrm >> 6;
                let rm = modrm & 7;
                let got = decode(&bytes, CpuMode::Long64);
                if md == 3 {
                    assert_eq!(got, Err(DecodeError::RegisterOperand));
                    continue;
                }
                let sib_len = usize::from(rm == 4);
                let disp = match (md, rm, sib & 7) {
                    (0, 4, 5) => 4,
                    (0, 5, _) => 4,
                    (0, _, _) => 0,
                    (1, _, _) => 1,
                    _ => 4,
                };
                let len = 2 + sib_len + disp;
                assert_eq!(
                    got.unwrap().len as usize,
                    len,
                    "modrm {modrm:#x} sib {sib:#x}"
                );
            }
        }
    }

    /// Random bytes: never a panic, and any decoded length is within the
    /// input and at most 15.
    #[test]
    fn random_bytes_never_panic() {
        let mut rng = 0x0123_4567_89ab_cdefu64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let interesting = [
            0x66, 0x67, 0x48, 0x4c, 0x41, 0x0f, 0x88, 0x89, 0x8a, 0x8b, 0xc6, 0xc7, 0xa1, 0xa3,
            0x86, 0x63, 0xf3,
        ];
        let mut ok = 0;
        for _ in 0..200_000 {
            let n = (next() % 17) as usize;
            let bytes: Vec<u8> = (0..n)
                .map(|_| {
                    let x = next();
                    if x & 1 == 0 {
                        interesting[(x >> 8) as usize % interesting.len()]
                    } else {
                        (x >> 16) as u8
                    }
                })
                .collect();
            for mode in [CpuMode::Long64, CpuMode::Protected32] {
                if let Ok(i) = decode(&bytes, mode) {
                    assert!(usize::from(i.len) <= bytes.len().min(MAX_INSN_BYTES));
                    assert!(matches!(i.op.size(), 1 | 2 | 4 | 8));
                    ok += 1;
                    let mut r = regs();
                    let mut bus = Bus::default();
                    emulate(&bytes, mode, &mut r, 0, &mut bus).unwrap();
                    assert!(bus.writes.len() + bus.reads.len() > 0);
                }
            }
        }
        assert!(ok > 1000, "{ok}");
    }
}
