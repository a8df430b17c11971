//! Decoding a VM exit: from the exit reason, qualification, guest-physical
//! address, instruction length, interruption information and the guest
//! registers to the vendor-neutral [`VmExit`] (or an action the backend
//! takes itself); and the conversions between VMCS encodings (access
//! rights, interruption information) and the state record.
//!
//! Exit reasons: Intel SDM vol. 3D, Appendix C; qualifications: vol. 3C,
//! 28.2.1; event formats: 25.8.3 and 25.9.2. Invariant: every function
//! here is total (never panics, whatever the values: they come from the CPU
//! on the guest's behalf), which the host tests and the fuzz target
//! `hypervisor/core/fuzz/fuzz_targets/exit_decode.rs` check.

use crate::addr::Gpa;
use crate::vcpu::{Access, IoAccess, IoDir, Regs, VmExit};
use crate::x86::{Cr4Flags, ATTR_CODE64, ATTR_DATA, ATTR_TSS_BUSY, EVENT_ERROR_VALID, EVENT_VALID};
use vmstate::{EventKind, PendingEvent, Segment};

/// CR4.VMXE: owned by the host, shown clear to the guest.
const CR4_VMXE: Cr4Flags = Cr4Flags::VIRTUAL_MACHINE_EXTENSIONS;

// Basic exit reasons (Intel SDM vol. 3D, Appendix C).
pub const EXIT_EXCEPTION_OR_NMI: u32 = 0;
pub const EXIT_EXTERNAL_INTERRUPT: u32 = 1;
pub const EXIT_TRIPLE_FAULT: u32 = 2;
pub const EXIT_INTERRUPT_WINDOW: u32 = 7;
pub const EXIT_NMI_WINDOW: u32 = 8;
pub const EXIT_GETSEC: u32 = 11;
pub const EXIT_CPUID: u32 = 10;
pub const EXIT_HLT: u32 = 12;
pub const EXIT_INVD: u32 = 13;
pub const EXIT_VMCALL: u32 = 18;
pub const EXIT_VMCLEAR: u32 = 19;
pub const EXIT_VMXON: u32 = 27;
pub const EXIT_CR_ACCESS: u32 = 28;
pub const EXIT_IO: u32 = 30;
pub const EXIT_RDMSR: u32 = 31;
pub const EXIT_WRMSR: u32 = 32;
pub const EXIT_INVALID_GUEST_STATE: u32 = 33;
pub const EXIT_MSR_LOADING: u32 = 34;
pub const EXIT_MWAIT: u32 = 36;
pub const EXIT_MONITOR: u32 = 39;
pub const EXIT_MACHINE_CHECK: u32 = 41;
pub const EXIT_EPT_VIOLATION: u32 = 48;
pub const EXIT_EPT_MISCONFIG: u32 = 49;
pub const EXIT_INVEPT: u32 = 50;
pub const EXIT_INVVPID: u32 = 53;
pub const EXIT_PREEMPTION_TIMER: u32 = 52;
pub const EXIT_XSETBV: u32 = 55;
pub const EXIT_PML_FULL: u32 = 62;
/// Exit-reason bit 31: the exit is a VM-entry failure (28.2.1).
pub const EXIT_REASON_ENTRY_FAILURE: u64 = 1 << 31;

// Interruption-information format (25.8.3 entry, 25.9.2 exit): the
// event word both vendors share (`x86::Injection`).
/// Valid (bit 31).
pub const INTR_INFO_VALID: u64 = EVENT_VALID as u64;
/// Deliver error code (bit 11).
pub const INTR_INFO_ERROR_VALID: u64 = EVENT_ERROR_VALID as u64;
/// Interruption type NMI.
pub const INTR_TYPE_NMI: u64 = (EventKind::Nmi.raw() as u64) << 8;
/// The interruption-type field (bits 10:8).
pub const INTR_TYPE_MASK: u64 = 7 << 8;

// Guest segment access rights in the VMCS format (25.4.1, table 25-2):
// type 3:0, S 4, DPL 6:5, P 7, L 13, D/B 14, G 15, unusable 16.
/// Unusable (bit 16).
pub const AR_UNUSABLE: u64 = 1 << 16;
/// 64-bit code: execute/read, accessed, S, P, L, G.
pub const AR_CODE64: u64 = attrib_to_ar(ATTR_CODE64);
/// Data: read/write, accessed, S, P, D/B, G.
pub const AR_DATA: u64 = attrib_to_ar(ATTR_DATA);
/// Busy 64-bit TSS, P.
pub const AR_TSS_BUSY: u64 = attrib_to_ar(ATTR_TSS_BUSY);

/// What one VM exit means, decoded from the exit reason, qualification,
/// guest-physical address, instruction length and the guest registers
/// alone (no VMCS access, so host tests can feed it arbitrary values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Report `exit`; `len` is the length of the instruction that caused
    /// it, if it was an instruction.
    Exit { exit: VmExit, len: Option<u64> },
    /// The exit is a VM-entry failure with this basic reason.
    EntryFailed { reason: u32, qualification: u64 },
    /// Raise #UD in the guest and re-enter.
    InjectUd,
    /// Raise #GP(0) in the guest and re-enter.
    InjectGp,
    /// Step over an instruction of this many bytes and re-enter.
    Skip(u64),
    /// MOV from CR8 into general register `gpr`: it reads 0; then skip.
    ReadCr8 { gpr: u8, len: u64 },
    /// The PML buffer is full: drain it and re-enter.
    PmlFull,
}

/// Decode one VM exit (Intel SDM vol. 3C, 28.2; exit qualifications in
/// 28.2.1, tables 28-3 (CR access), 28-5 (I/O), 28-7 (EPT violation)).
/// Never panics, whatever the values.
pub fn decode_exit(
    reason_field: u64,
    qual: u64,
    gpa: u64,
    len: u64,
    intr_info: u64,
    regs: &Regs,
) -> Decoded {
    let reason = (reason_field & 0xffff) as u32;
    if reason_field & EXIT_REASON_ENTRY_FAILURE != 0 {
        return Decoded::EntryFailed {
            reason,
            qualification: qual,
        };
    }
    // Instruction lengths are 1..=15 (28.2.5); anything else is not an
    // instruction exit we can step over.
    let len = (1..=15).contains(&len).then_some(len);
    let insn = |exit| Decoded::Exit { exit, len };
    let event = |exit| Decoded::Exit { exit, len: None };
    match reason {
        // The VMX-preemption timer is the host's time slice (see
        // `preemption_timer_value`): report it like the timer interrupt.
        EXIT_EXTERNAL_INTERRUPT | EXIT_PREEMPTION_TIMER => event(VmExit::ExternalInterrupt),
        // NMI exiting: the NMI was the host's; report it like an interrupt
        // (the host has nothing to do for it). Exceptions are not
        // intercepted (exception bitmap 0), so anything else is unknown.
        EXIT_EXCEPTION_OR_NMI if intr_info & INTR_TYPE_MASK == INTR_TYPE_NMI => {
            event(VmExit::ExternalInterrupt)
        }
        EXIT_TRIPLE_FAULT => event(VmExit::Shutdown),
        // 26.7.5 / 26.7.6: the windows the backend opened are open.
        EXIT_INTERRUPT_WINDOW => event(VmExit::InterruptWindow),
        EXIT_NMI_WINDOW => event(VmExit::NmiWindow),
        EXIT_CPUID => insn(VmExit::Cpuid {
            leaf: regs.rax as u32,
            subleaf: regs.rcx as u32,
        }),
        EXIT_HLT => insn(VmExit::Hlt),
        EXIT_VMCALL => insn(VmExit::Hypercall),
        EXIT_IO => {
            // Table 28-5: bits 2:0 size - 1, 3 direction (1 = IN), 4
            // string, 5 REP, 31:16 port. Size code 2 is not a real access;
            // it decodes to 3 bytes, which the handler answers with #UD.
            let io = IoAccess {
                port: (qual >> 16) as u16,
                size: (qual & 7) as u8 + 1,
                dir: if qual & (1 << 3) != 0 {
                    IoDir::In
                } else {
                    IoDir::Out
                },
                string: qual & (1 << 4) != 0,
                rep: qual & (1 << 5) != 0,
            };
            insn(VmExit::Io(io))
        }
        EXIT_RDMSR => insn(VmExit::MsrRead {
            msr: regs.rcx as u32,
        }),
        EXIT_WRMSR => insn(VmExit::MsrWrite {
            msr: regs.rcx as u32,
            value: (regs.rdx << 32) | (regs.rax & 0xffff_ffff),
        }),
        // Table 28-7: bits 0/1/2 read/write/fetch, 3/4/5 the translation
        // allowed read/write/execute (any set = present).
        EXIT_EPT_VIOLATION => event(VmExit::NestedFault {
            gpa: Gpa(gpa),
            access: Access {
                write: qual & (1 << 1) != 0,
                exec: qual & (1 << 2) != 0,
                present: qual & (0b111 << 3) != 0,
            },
        }),
        EXIT_EPT_MISCONFIG => event(VmExit::NestedMisconfig { gpa: Gpa(gpa) }),
        EXIT_CR_ACCESS => decode_cr_access(qual, len, regs),
        EXIT_PML_FULL => Decoded::PmlFull,
        // INVD (0f 08): nothing to do for a guest without its own cache.
        EXIT_INVD => match len {
            Some(n) => Decoded::Skip(n),
            None => event(VmExit::Unknown {
                raw: u64::from(reason),
            }),
        },
        // The guest's CPUID shows no VMX, SMX or MONITOR: these raise #UD
        // for it. XSETBV too: VM entry does not switch XCR0, so a guest
        // may not change it (the CPUID policy keeps XSAVE hidden).
        EXIT_VMCLEAR..=EXIT_VMXON
        | EXIT_INVEPT
        | EXIT_INVVPID
        | EXIT_GETSEC
        | EXIT_MONITOR
        | EXIT_MWAIT
        | EXIT_XSETBV => Decoded::InjectUd,
        _ => event(VmExit::Unknown {
            raw: u64::from(reason),
        }),
    }
}

/// Decode a control-register access (table 28-3: bits 3:0 CR, 5:4 type
/// (0 MOV to CR, 1 MOV from CR), 11:8 general register).
fn decode_cr_access(qual: u64, len: Option<u64>, regs: &Regs) -> Decoded {
    let cr = qual & 0xf;
    let kind = (qual >> 4) & 3;
    let gpr = ((qual >> 8) & 0xf) as u8;
    let unknown = Decoded::Exit {
        exit: VmExit::Unknown {
            raw: u64::from(EXIT_CR_ACCESS),
        },
        len: None,
    };
    let Some(len) = len else {
        return unknown;
    };
    match (cr, kind) {
        // Only the guest/host-owned bit (VMXE) differing from the shadow
        // makes MOV to CR4 exit: the guest tried to set it (25.6.6).
        (4, 0) => {
            let value = gpr_value(regs, gpr);
            if value & CR4_VMXE.bits() != 0 {
                Decoded::InjectGp
            } else {
                // Cannot happen with the mask we set; keep the guest going.
                Decoded::Skip(len)
            }
        }
        // CR8 (the TPR) is not virtualised: writes are dropped, reads
        // return 0, so the guest cannot reach the host's LAPIC.
        (8, 0) => Decoded::Skip(len),
        (8, 1) => Decoded::ReadCr8 { gpr, len },
        _ => unknown,
    }
}

/// General register `n` in the encoding of table 28-3 (0 RAX, 1 RCX, 2
/// RDX, 3 RBX, 4 RSP, 5 RBP, 6 RSI, 7 RDI, 8-15 R8-R15).
pub fn gpr_value(regs: &Regs, n: u8) -> u64 {
    let mut r = *regs;
    *gpr_mut(&mut r, n)
}

pub fn gpr_mut(regs: &mut Regs, n: u8) -> &mut u64 {
    match n & 0xf {
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

/// VMX access rights (Intel SDM vol. 3C, 25.4.1, table 25-2: bits 7:0,
/// 15:12, unusable 16) in the record's packed VMCB form; an unusable
/// segment reads as not present.
pub const fn ar_to_attrib(ar: u64) -> u16 {
    let a = ((ar & 0xff) | ((ar >> 4) & 0xf00)) as u16;
    if ar & AR_UNUSABLE != 0 {
        a & !Segment::ATTR_P
    } else {
        a
    }
}

/// The packed form as VMX access rights; not present = unusable.
pub const fn attrib_to_ar(a: u16) -> u64 {
    let unusable = a & Segment::ATTR_P == 0;
    let a = a as u64;
    let ar = (a & 0xff) | ((a & 0xf00) << 4);
    if unusable {
        ar | AR_UNUSABLE
    } else {
        ar
    }
}

/// VM-entry interruption information (25.8.3) as a pending event.
pub fn event_out(info: u64, error_code: u64) -> Option<PendingEvent> {
    // Types 5 and 6 (software exceptions) read as none: IDT-vectoring
    // re-injection keeps their type without going through the record.
    crate::x86::pending_event(info as u32, error_code as u32)
}

/// A pending event as VM-entry interruption information and the
/// exception error code field (25.8.3).
pub fn event_in(ev: &PendingEvent) -> (u64, u64) {
    let i = crate::x86::event_word(ev);
    (u64::from(i.info), u64::from(i.error_code.unwrap_or(0)))
}

/// Guest interruptibility state (Intel SDM vol. 3C, 25.4.2, table 25-3)
/// as the record's (interrupt shadow, NMIs blocked): bit 0 blocking by
/// STI, bit 1 by MOV SS, bit 3 by NMI (with virtual NMIs: virtual-NMI
/// blocking, the only NMIs guests get here).
pub fn interruptibility_out(intr: u64) -> (bool, bool) {
    (intr & 0b11 != 0, intr & 0b1000 != 0)
}

/// The record's shadow and NMI blocking as an interruptibility state VM
/// entry accepts (26.3.1.5): STI blocking needs RFLAGS.IF = 1, MOV-SS
/// blocking stands for either otherwise; NMI blocking is set only with
/// `virtual_nmis` and not beside an NMI being injected (`pending`), whose
/// delivery blocks NMIs itself.
pub fn interruptibility_in(
    shadow: bool,
    rflags: u64,
    nmi_blocked: bool,
    virtual_nmis: bool,
    pending: Option<&PendingEvent>,
) -> u64 {
    let sti = match (shadow, rflags & (1 << 9) != 0) {
        (false, _) => 0,
        (true, true) => 0b1,
        (true, false) => 0b10,
    };
    let nmi_pending = pending.is_some_and(|e| e.kind == EventKind::Nmi);
    let nmi = if nmi_blocked && virtual_nmis && !nmi_pending {
        0b1000
    } else {
        0
    };
    sti | nmi
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interruptibility_round_trips_what_entry_accepts() {
        const IF: u64 = 1 << 9;
        let nmi = PendingEvent {
            vector: 2,
            kind: EventKind::Nmi,
            error_code: None,
        };
        assert_eq!(interruptibility_out(0b1001), (true, true));
        assert_eq!(interruptibility_out(0b10), (true, false));
        assert_eq!(interruptibility_out(0b100), (false, false), "SMI");
        assert_eq!(interruptibility_in(true, IF, true, true, None), 0b1001);
        assert_eq!(interruptibility_in(true, 0, false, true, None), 0b10);
        assert_eq!(interruptibility_in(false, IF, true, false, None), 0);
        assert_eq!(interruptibility_in(false, IF, true, true, Some(&nmi)), 0);
        for intr in [0, 0b1, 0b1000, 0b1001] {
            let (shadow, blocked) = interruptibility_out(intr);
            assert_eq!(
                interruptibility_in(shadow, IF, blocked, true, None),
                intr,
                "{intr:#b}"
            );
        }
    }

    fn regs() -> Regs {
        Regs {
            rax: 0xdead_beef_0000_0001,
            rcx: 0xc000_0080,
            rdx: 0x1234,
            rip: 0x1000,
            ..Regs::default()
        }
    }

    #[test]
    fn window_exits_carry_no_instruction() {
        let regs = Regs::default();
        for (reason, exit) in [
            (EXIT_INTERRUPT_WINDOW, VmExit::InterruptWindow),
            (EXIT_NMI_WINDOW, VmExit::NmiWindow),
        ] {
            // A stale instruction length in the VMCS is not used.
            assert_eq!(
                decode_exit(u64::from(reason), 0, 0, 3, 0, &regs),
                Decoded::Exit { exit, len: None }
            );
        }
    }

    #[test]
    fn exit_decoding() {
        let r = regs();
        assert_eq!(
            decode_exit(u64::from(EXIT_CPUID), 0, 0, 2, 0, &r),
            Decoded::Exit {
                exit: VmExit::Cpuid {
                    leaf: 1,
                    subleaf: 0xc000_0080
                },
                len: Some(2)
            }
        );
        assert_eq!(
            decode_exit(u64::from(EXIT_WRMSR), 0, 0, 2, 0, &r),
            Decoded::Exit {
                exit: VmExit::MsrWrite {
                    msr: 0xc000_0080,
                    value: 0x1234_0000_0001
                },
                len: Some(2)
            }
        );
        // PLATFORM.md: a write to a read-only EPT page, qualification 0x1aa.
        assert_eq!(
            decode_exit(u64::from(EXIT_EPT_VIOLATION), 0x1aa, 0x20_5000, 0, 0, &r),
            Decoded::Exit {
                exit: VmExit::NestedFault {
                    gpa: Gpa(0x20_5000),
                    access: Access {
                        write: true,
                        exec: false,
                        present: true
                    }
                },
                len: None
            }
        );
        // out dx, al to 0x3f8: size 1, OUT, port in 31:16.
        assert_eq!(
            decode_exit(u64::from(EXIT_IO), 0x3f8 << 16, 0, 1, 0, &r),
            Decoded::Exit {
                exit: VmExit::Io(IoAccess {
                    port: 0x3f8,
                    size: 1,
                    dir: IoDir::Out,
                    string: false,
                    rep: false
                }),
                len: Some(1)
            }
        );
        // rep insd from 0x1f0.
        let Decoded::Exit {
            exit: VmExit::Io(io),
            ..
        } = decode_exit(
            u64::from(EXIT_IO),
            (0x1f0 << 16) | (1 << 5) | (1 << 4) | (1 << 3) | 3,
            0,
            2,
            0,
            &r,
        )
        else {
            panic!()
        };
        assert_eq!(
            (io.size, io.dir, io.string, io.rep),
            (4, IoDir::In, true, true)
        );
        assert_eq!(
            decode_exit(u64::from(EXIT_VMCALL), 0, 0, 3, 0, &r),
            Decoded::Exit {
                exit: VmExit::Hypercall,
                len: Some(3)
            }
        );
        assert_eq!(
            decode_exit(u64::from(EXIT_TRIPLE_FAULT), 0, 0, 0, 0, &r),
            Decoded::Exit {
                exit: VmExit::Shutdown,
                len: None
            }
        );
        assert_eq!(
            decode_exit(0x8000_0021, 0, 0, 0, 0, &r),
            Decoded::EntryFailed {
                reason: 33,
                qualification: 0
            }
        );
        assert_eq!(
            decode_exit(24, 0, 0, 3, 0, &r),
            Decoded::InjectUd,
            "VMRESUME"
        );
        assert_eq!(
            decode_exit(u64::from(EXIT_PML_FULL), 0, 0, 0, 0, &r),
            Decoded::PmlFull
        );
        assert_eq!(
            decode_exit(u64::from(EXIT_PREEMPTION_TIMER), 0, 0, 0, 0, &r),
            Decoded::Exit {
                exit: VmExit::ExternalInterrupt,
                len: None
            }
        );
        // NMI exit (interruption type 2) vs an unexpected exception exit.
        assert_eq!(
            decode_exit(0, 0, 0, 0, 0x8000_0202, &r),
            Decoded::Exit {
                exit: VmExit::ExternalInterrupt,
                len: None
            }
        );
        assert_eq!(
            decode_exit(0, 0, 0, 0, 0x8000_030d, &r),
            Decoded::Exit {
                exit: VmExit::Unknown { raw: 0 },
                len: None
            }
        );
    }

    #[test]
    fn cr_access() {
        let mut r = regs();
        r.rbx = CR4_VMXE.bits() | 0x20;
        // MOV CR4, RBX (gpr 3) setting VMXE: #GP.
        assert_eq!(
            decode_exit(u64::from(EXIT_CR_ACCESS), 4 | (3 << 8), 0, 3, 0, &r),
            Decoded::InjectGp
        );
        // MOV R9, CR8: reads 0.
        assert_eq!(
            decode_exit(
                u64::from(EXIT_CR_ACCESS),
                8 | (1 << 4) | (9 << 8),
                0,
                4,
                0,
                &r
            ),
            Decoded::ReadCr8 { gpr: 9, len: 4 }
        );
        assert_eq!(
            decode_exit(u64::from(EXIT_CR_ACCESS), 8, 0, 4, 0, &r),
            Decoded::Skip(4)
        );
        let mut x = r;
        *gpr_mut(&mut x, 4) = 7;
        assert_eq!(x.rsp, 7);
    }

    /// Every exit reason, qualification and register value decodes without
    /// a panic (xorshift-driven), and I/O sizes are 1..=8.
    #[test]
    fn exit_decoding_never_panics() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..20_000u64 {
            let reason = if i % 2 == 0 { i / 2 % 70 } else { next() };
            let r = Regs {
                rax: next(),
                rcx: next(),
                rdx: next(),
                rip: next(),
                ..Regs::default()
            };
            let d = decode_exit(reason, next(), next(), next() % 20, next(), &r);
            if let Decoded::Exit {
                exit: VmExit::Io(io),
                len,
            } = d
            {
                assert!((1..=8).contains(&io.size));
                assert!(len.is_none_or(|l| (1..=15).contains(&l)));
            }
        }
    }

    #[test]
    fn access_rights_and_packed_attributes() {
        assert_eq!(AR_CODE64, 0xa09b);
        assert_eq!(AR_DATA, 0xc093);
        assert_eq!(AR_TSS_BUSY, 0x008b);
        assert_eq!(ar_to_attrib(AR_CODE64), ATTR_CODE64);
        // Not present <-> unusable.
        assert_eq!(
            attrib_to_ar(0x0082 & !Segment::ATTR_P),
            0x0002 | AR_UNUSABLE
        );
        assert_eq!(ar_to_attrib(AR_UNUSABLE | 0x93) & Segment::ATTR_P, 0);
    }

    #[test]
    fn pending_events_round_trip_through_interruption_info() {
        for ev in [
            PendingEvent {
                vector: 14,
                kind: EventKind::Exception,
                error_code: Some(2),
            },
            PendingEvent {
                vector: 0x30,
                kind: EventKind::ExternalInterrupt,
                error_code: None,
            },
        ] {
            let (info, code) = event_in(&ev);
            assert_eq!(event_out(info, code), Some(ev));
        }
        // Software exception (type 6): not a record kind.
        assert_eq!(event_out(INTR_INFO_VALID | (6 << 8) | 3, 0), None);
    }
}
