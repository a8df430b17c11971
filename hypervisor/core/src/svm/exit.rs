//! Decoding a #VMEXIT: from the exit code, EXITINFO1/2 and the guest
//! registers to the vendor-neutral [`VmExit`] (or an action the backend
//! takes itself), and the event encodings the VMCB uses (EVENTINJ,
//! EXITINTINFO).
//!
//! Exit codes: AMD APM vol. 2, Appendix C; EXITINFO: 15.7-15.13 and
//! 15.25.6; events: 15.20 and 15.7.2. Invariant: every function here is
//! total (never panics, whatever the values: they come from the CPU on
//! the guest's behalf), which the host tests and the fuzz target
//! `hypervisor/core/fuzz/fuzz_targets/exit_decode.rs` check.

use crate::addr::Gpa;
use crate::vcpu::{Access, IoAccess, IoDir, Regs, VmExit};
use crate::x86::{Injection, EVENT_ERROR_VALID as EV_BIT, EVENT_VALID as V_BIT};
use vmstate::PendingEvent;

/// EVENTINJ / EXITINTINFO valid bit. AMD APM vol. 2, 15.20.
pub const EVENT_VALID: u64 = V_BIT as u64;
/// EVENTINJ error-code-valid bit.
pub const EVENT_ERROR_VALID: u64 = EV_BIT as u64;
/// EVENTINJ type: external interrupt.
pub const EVENT_TYPE_INTR: u64 = 0 << 8;
/// EVENTINJ type: NMI.
pub const EVENT_TYPE_NMI: u64 = 2 << 8;
/// EVENTINJ type: exception.
pub const EVENT_TYPE_EXCEPTION: u64 = 3 << 8;
/// EVENTINJ type: software interrupt (INTn).
pub const EVENT_TYPE_SOFT_INT: u64 = 4 << 8;

// Exit codes, AMD APM vol. 2, Appendix C.
/// Physical interrupt.
pub const EXIT_INTR: u64 = 0x60;
/// Physical NMI.
pub const EXIT_NMI: u64 = 0x61;
/// Virtual interrupt (the V_IRQ the VMM set is deliverable: an interrupt
/// window).
pub const EXIT_VINTR: u64 = 0x64;
/// CPUID.
pub const EXIT_CPUID: u64 = 0x72;
/// IRET (the end of the guest's NMI handler: an NMI window).
pub const EXIT_IRET: u64 = 0x74;
/// INVD.
pub const EXIT_INVD: u64 = 0x76;
/// HLT.
pub const EXIT_HLT: u64 = 0x78;
/// INVLPGA.
pub const EXIT_INVLPGA: u64 = 0x7a;
/// IN/OUT/INS/OUTS.
pub const EXIT_IOIO: u64 = 0x7b;
/// RDMSR/WRMSR.
pub const EXIT_MSR: u64 = 0x7c;
/// Shutdown (triple fault).
pub const EXIT_SHUTDOWN: u64 = 0x7f;
/// VMRUN.
pub const EXIT_VMRUN: u64 = 0x80;
/// VMMCALL.
pub const EXIT_VMMCALL: u64 = 0x81;
/// VMLOAD.
pub const EXIT_VMLOAD: u64 = 0x82;
/// VMSAVE.
pub const EXIT_VMSAVE: u64 = 0x83;
/// STGI.
pub const EXIT_STGI: u64 = 0x84;
/// CLGI.
pub const EXIT_CLGI: u64 = 0x85;
/// SKINIT.
pub const EXIT_SKINIT: u64 = 0x86;
/// MONITOR.
pub const EXIT_MONITOR: u64 = 0x8a;
/// MWAIT.
pub const EXIT_MWAIT: u64 = 0x8b;
/// MWAIT when armed.
pub const EXIT_MWAIT_ARMED: u64 = 0x8c;
/// XSETBV.
pub const EXIT_XSETBV: u64 = 0x8d;
/// Nested page fault.
pub const EXIT_NPF: u64 = 0x400;
/// VMRUN found invalid guest state (-1).
pub const EXIT_INVALID: u64 = u64::MAX;
/// Exception intercepts: EXCP_BASE (0x40) + vector. AMD APM vol. 2,
/// Appendix C. EXITINFO1 holds the error code.
pub const EXIT_EXCP_DF: u64 = 0x40 + 8;
/// #GP intercept.
pub const EXIT_EXCP_GP: u64 = 0x40 + 13;

/// What one #VMEXIT means, decoded from the exit code, EXITINFO1/2 and the
/// guest registers alone (no VMCB access, so the host tests can feed it
/// arbitrary values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Report `exit`; `next_rip` is the software-decoded RIP after the
    /// intercepted instruction, if it was one.
    Exit { exit: VmExit, next_rip: Option<u64> },
    /// VMRUN refused the guest state (VMEXIT_INVALID).
    Invalid,
    /// Raise #UD in the guest and re-enter.
    InjectUd,
    /// Step over an instruction of this many bytes and re-enter.
    Skip(u64),
    /// An intercepted contributory exception (#GP) or #DF on its way into
    /// the guest, with its error code.
    Exception { vector: u8, error_code: u32 },
}

/// Decode one #VMEXIT (AMD APM vol. 2, Appendix C exit codes; 15.7-15.13
/// and 15.25.6 for EXITINFO). Never panics, whatever the values.
pub fn decode_exit(code: u64, info1: u64, info2: u64, regs: &Regs) -> Decoded {
    let rip = regs.rip;
    // Instruction lengths without NRIPS (AMD APM vol. 3 opcode maps):
    // CPUID 0f a2, RDMSR 0f 32, WRMSR 0f 30, HLT f4, VMMCALL 0f 01 d9.
    // Prefixed forms are not decoded (none of our guests emits them).
    let insn = |exit, len: u64| Decoded::Exit {
        exit,
        next_rip: Some(rip.wrapping_add(len)),
    };
    let event = |exit| Decoded::Exit {
        exit,
        next_rip: None,
    };
    match code {
        // Both stay pending until STGI, then the host's IDT takes them.
        EXIT_INTR | EXIT_NMI => event(VmExit::ExternalInterrupt),
        // 15.21.4: the VINTR intercept fires before the guest takes the
        // virtual interrupt the backend raised to open the window.
        EXIT_VINTR => event(VmExit::InterruptWindow),
        // 15.9: the IRET intercept fires before the IRET executes; the
        // backend intercepts it only while the guest's NMI handler runs.
        EXIT_IRET => event(VmExit::NmiWindow),
        EXIT_CPUID => insn(
            VmExit::Cpuid {
                leaf: regs.rax as u32,
                subleaf: regs.rcx as u32,
            },
            2,
        ),
        EXIT_HLT => insn(VmExit::Hlt, 1),
        EXIT_VMMCALL => insn(VmExit::Hypercall, 3),
        EXIT_IOIO => match decode_ioio(info1) {
            // 15.10.2: EXITINFO2 holds the next RIP.
            Some(io) => Decoded::Exit {
                exit: VmExit::Io(io),
                next_rip: Some(info2),
            },
            None => event(VmExit::Unknown { raw: code }),
        },
        EXIT_MSR => {
            let msr = regs.rcx as u32;
            // 15.11: EXITINFO1 = 0 for RDMSR, 1 for WRMSR.
            let exit = if info1 & 1 == 0 {
                VmExit::MsrRead { msr }
            } else {
                VmExit::MsrWrite {
                    msr,
                    value: (regs.rdx << 32) | (regs.rax & 0xffff_ffff),
                }
            };
            insn(exit, 2)
        }
        // 15.25.6: EXITINFO1 is a #PF-style error code (bit 0 P, bit 1 W,
        // bit 4 instruction fetch), EXITINFO2 the GPA.
        EXIT_NPF => event(VmExit::NestedFault {
            gpa: Gpa(info2),
            access: Access {
                present: info1 & 1 != 0,
                write: info1 & (1 << 1) != 0,
                exec: info1 & (1 << 4) != 0,
            },
        }),
        EXIT_SHUTDOWN => event(VmExit::Shutdown),
        EXIT_INVALID => Decoded::Invalid,
        // 15.12: EXITINFO1 holds the exception's error code.
        EXIT_EXCP_GP => Decoded::Exception {
            vector: 13,
            error_code: info1 as u32,
        },
        EXIT_EXCP_DF => Decoded::Exception {
            vector: 8,
            error_code: 0,
        },
        // The guest's CPUID shows no SVM and no MONITOR, so these raise #UD
        // for it. XSETBV too: VMRUN does not switch XCR0, so a guest may
        // not change it (the CPUID policy must keep XSAVE hidden).
        EXIT_VMRUN | EXIT_VMLOAD | EXIT_VMSAVE | EXIT_STGI | EXIT_CLGI | EXIT_SKINIT
        | EXIT_INVLPGA | EXIT_MONITOR | EXIT_MWAIT | EXIT_MWAIT_ARMED | EXIT_XSETBV => {
            Decoded::InjectUd
        }
        // INVD (0f 08): nothing to do for a guest without its own cache.
        EXIT_INVD => Decoded::Skip(2),
        _ => event(VmExit::Unknown { raw: code }),
    }
}

/// What to put in EVENTINJ after an exit whose EXITINTINFO is `info`
/// (AMD APM vol. 2, 15.7.2): the interrupted event again, except events
/// raised by an instruction (INTn, INT3, INTO), which are dropped: RIP
/// still points at the instruction, so the guest raises them again by
/// re-executing it (re-injecting them would need the instruction length,
/// which TCG's missing NRIPS does not give).
pub fn reinjection(info: u64) -> u64 {
    if info & EVENT_VALID == 0 {
        return 0;
    }
    let vector = info & 0xff;
    let kind = info & (7 << 8);
    let software =
        kind == EVENT_TYPE_SOFT_INT || (kind == EVENT_TYPE_EXCEPTION && matches!(vector, 3 | 4));
    if software {
        0
    } else {
        // Reserved bits 30:12 must be zero in EVENTINJ.
        info & !0x7fff_f000
    }
}

/// Decode EXITINFO1 of an IOIO exit (AMD APM vol. 2, 15.10.2, figure
/// 15-2): bit 0 IN, bit 2 string, bit 3 REP, bits 4-6 size, 31:16 port.
pub fn decode_ioio(info1: u64) -> Option<IoAccess> {
    let size = if info1 & (1 << 4) != 0 {
        1
    } else if info1 & (1 << 5) != 0 {
        2
    } else if info1 & (1 << 6) != 0 {
        4
    } else {
        return None;
    };
    Some(IoAccess {
        port: (info1 >> 16) as u16,
        size,
        dir: if info1 & 1 != 0 {
            IoDir::In
        } else {
            IoDir::Out
        },
        string: info1 & (1 << 2) != 0,
        rep: info1 & (1 << 3) != 0,
    })
}

/// EVENTINJ (AMD APM vol. 2, 15.20) as a pending event, `None` if not
/// valid. Types the record cannot name (reserved 1, 5-7) read as none.
pub fn event_out(ev: u64) -> Option<PendingEvent> {
    crate::x86::pending_event(ev as u32, (ev >> 32) as u32)
}

/// EVENTINJ: the shared event word, bits 63:32 the error code.
fn eventinj(i: Injection) -> u64 {
    u64::from(i.info) | (u64::from(i.error_code.unwrap_or(0)) << 32)
}

/// A pending event as EVENTINJ.
pub fn event_in(ev: &PendingEvent) -> u64 {
    eventinj(crate::x86::event_word(ev))
}

/// The exception the hypervisor raises as `vector` (with the error code
/// when the vector pushes one) as EVENTINJ.
pub fn injection(vector: u8, error_code: Option<u32>) -> u64 {
    eventinj(crate::x86::event_injection(vector, error_code))
}

/// What becomes of an intercepted #GP or #DF on its way into the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Inject this exception (with this error code) and re-enter.
    Inject { vector: u8, error_code: u32 },
    /// Not even #DF can be delivered: the guest is triple-faulted.
    Shutdown,
}

/// Delivery of an intercepted exception `vector` to a guest whose IDT
/// limit is `idt_limit` (AMD APM vol. 2, 8.2.9): a #GP whose gate is
/// beyond the limit becomes #DF; a #DF that cannot be delivered is a
/// shutdown. Only the IDT-limit failure is decided here; any other
/// delivery failure still reaches the CPU's own SHUTDOWN intercept.
pub fn deliver_exception(vector: u8, error_code: u32, idt_limit: u32, long_mode: bool) -> Delivery {
    use crate::x86::idt_delivers;
    if idt_delivers(idt_limit, long_mode, vector) {
        Delivery::Inject { vector, error_code }
    } else if vector != 8 && idt_delivers(idt_limit, long_mode, 8) {
        Delivery::Inject {
            vector: 8,
            error_code: 0,
        }
    } else {
        Delivery::Shutdown
    }
}

/// Whether NMIs are blocked after restoring a vCPU whose record says
/// `nmi_blocked` and re-injects `pending`: SVM has no NMI-blocking field
/// the hypervisor can set (AMD APM vol. 2, 15.21.5), so the backend keeps
/// the blocking itself until it intercepts the handler's IRET, and an NMI
/// being injected blocks as its delivery will.
pub fn nmi_blocked_in(nmi_blocked: bool, pending: Option<&PendingEvent>) -> bool {
    nmi_blocked || pending.is_some_and(|e| e.kind == vmstate::EventKind::Nmi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmstate::EventKind;

    #[test]
    fn nmi_blocking_after_restore() {
        let ev = |kind| PendingEvent {
            vector: 2,
            kind,
            error_code: None,
        };
        assert!(nmi_blocked_in(true, None));
        assert!(!nmi_blocked_in(false, None));
        assert!(nmi_blocked_in(false, Some(&ev(EventKind::Nmi))));
        assert!(!nmi_blocked_in(
            false,
            Some(&ev(EventKind::ExternalInterrupt))
        ));
    }

    #[test]
    fn intercepted_gp_and_df_decode_with_error_code() {
        let regs = Regs::default();
        assert_eq!(
            decode_exit(EXIT_EXCP_GP, 0x18, 0, &regs),
            Decoded::Exception {
                vector: 13,
                error_code: 0x18
            }
        );
        assert_eq!(
            decode_exit(EXIT_EXCP_DF, 0, 0, &regs),
            Decoded::Exception {
                vector: 8,
                error_code: 0
            }
        );
    }

    #[test]
    fn undeliverable_exceptions_escalate() {
        // Long mode, IDT covering vectors 0..=8 only (limit 143).
        assert_eq!(
            deliver_exception(8, 0, 143, true),
            Delivery::Inject {
                vector: 8,
                error_code: 0
            }
        );
        assert_eq!(
            deliver_exception(13, 0x18, 143, true),
            Delivery::Inject {
                vector: 8,
                error_code: 0
            }
        );
        assert_eq!(
            deliver_exception(13, 0x18, 0xfff, true),
            Delivery::Inject {
                vector: 13,
                error_code: 0x18
            }
        );
        assert_eq!(deliver_exception(13, 0, 0, true), Delivery::Shutdown);
        assert_eq!(deliver_exception(8, 0, 142, true), Delivery::Shutdown);
    }

    #[test]
    fn ioio_decoding() {
        // out 0xe9, al: port 0xe9, SZ8, OUT.
        let io = decode_ioio((0xe9 << 16) | (1 << 4)).unwrap();
        assert_eq!(io.port, 0xe9);
        assert_eq!(io.size, 1);
        assert_eq!(io.dir, IoDir::Out);
        assert!(!io.string && !io.rep);
        // rep insw from 0x1f0.
        let io = decode_ioio((0x1f0 << 16) | (1 << 5) | (1 << 3) | (1 << 2) | 1).unwrap();
        assert_eq!(
            (io.port, io.size, io.dir, io.string, io.rep),
            (0x1f0, 2, IoDir::In, true, true)
        );
        assert_eq!(decode_ioio(0x3f8 << 16), None);
    }

    #[test]
    fn window_exits_carry_no_instruction() {
        // Neither is an instruction the backend steps over: the guest
        // resumes where it was and takes the injected event there.
        let regs = Regs::default();
        for (code, exit) in [
            (EXIT_VINTR, VmExit::InterruptWindow),
            (EXIT_IRET, VmExit::NmiWindow),
        ] {
            assert_eq!(
                decode_exit(code, 0, 0, &regs),
                Decoded::Exit {
                    exit,
                    next_rip: None
                }
            );
        }
    }

    #[test]
    fn exit_decoding() {
        let regs = Regs {
            rax: 0xdead_beef_0000_0001,
            rcx: 0xc000_0080,
            rdx: 0x1234,
            rip: 0x1000,
            ..Regs::default()
        };
        assert_eq!(
            decode_exit(EXIT_CPUID, 0, 0, &regs),
            Decoded::Exit {
                exit: VmExit::Cpuid {
                    leaf: 1,
                    subleaf: 0xc000_0080
                },
                next_rip: Some(0x1002)
            }
        );
        assert_eq!(
            decode_exit(EXIT_MSR, 1, 0, &regs),
            Decoded::Exit {
                exit: VmExit::MsrWrite {
                    msr: 0xc000_0080,
                    value: 0x1234_0000_0001
                },
                next_rip: Some(0x1002)
            }
        );
        assert_eq!(
            decode_exit(EXIT_NPF, 0x1_0000_0007, 0x20_5000, &regs),
            Decoded::Exit {
                exit: VmExit::NestedFault {
                    gpa: Gpa(0x20_5000),
                    access: Access {
                        present: true,
                        write: true,
                        exec: false
                    }
                },
                next_rip: None
            }
        );
        assert_eq!(
            decode_exit(EXIT_IOIO, (0x3f8 << 16) | (1 << 4), 0x1002, &regs),
            Decoded::Exit {
                exit: VmExit::Io(IoAccess {
                    port: 0x3f8,
                    size: 1,
                    dir: IoDir::Out,
                    string: false,
                    rep: false
                }),
                next_rip: Some(0x1002)
            }
        );
        assert_eq!(decode_exit(EXIT_VMRUN, 0, 0, &regs), Decoded::InjectUd);
        assert_eq!(decode_exit(EXIT_INVALID, 0, 0, &regs), Decoded::Invalid);
        assert_eq!(
            decode_exit(0x4e, 0, 0, &regs),
            Decoded::Exit {
                exit: VmExit::Unknown { raw: 0x4e },
                next_rip: None
            }
        );
    }

    /// Every exit code, EXITINFO and register value decodes without a
    /// panic (xorshift-driven, plus the edges).
    #[test]
    fn exit_decoding_never_panics() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let codes = [
            EXIT_INTR,
            EXIT_NMI,
            EXIT_CPUID,
            EXIT_HLT,
            EXIT_VMMCALL,
            EXIT_IOIO,
            EXIT_MSR,
            EXIT_NPF,
            EXIT_SHUTDOWN,
            EXIT_INVALID,
            EXIT_INVD,
            EXIT_XSETBV,
            0,
            u64::MAX - 1,
        ];
        for i in 0..20_000 {
            let code = if i % 2 == 0 {
                codes[i / 2 % codes.len()]
            } else {
                next()
            };
            let regs = Regs {
                rax: next(),
                rcx: next(),
                rdx: next(),
                rip: if i % 3 == 0 { u64::MAX } else { next() },
                ..Regs::default()
            };
            let d = decode_exit(code, next(), next(), &regs);
            if let Decoded::Exit {
                exit: VmExit::Io(io),
                ..
            } = d
            {
                assert!(matches!(io.size, 1 | 2 | 4));
            }
        }
    }

    #[test]
    fn event_reinjection() {
        assert_eq!(reinjection(0), 0);
        // #GP(0) whose delivery faulted: delivered again.
        let gp = 13 | EVENT_TYPE_EXCEPTION | EVENT_ERROR_VALID | EVENT_VALID;
        assert_eq!(reinjection(gp), gp);
        // External interrupt vector 0x30 and NMI: delivered again.
        assert_eq!(reinjection(0x30 | EVENT_VALID), 0x30 | EVENT_VALID);
        let nmi = 2 | EVENT_TYPE_NMI | EVENT_VALID;
        assert_eq!(reinjection(nmi), nmi);
        // INT 0x80, INT3, INTO: re-executed instead.
        assert_eq!(reinjection(0x80 | EVENT_TYPE_SOFT_INT | EVENT_VALID), 0);
        assert_eq!(reinjection(3 | EVENT_TYPE_EXCEPTION | EVENT_VALID), 0);
        assert_eq!(reinjection(4 | EVENT_TYPE_EXCEPTION | EVENT_VALID), 0);
    }

    #[test]
    fn pending_events_round_trip_through_eventinj() {
        for ev in [
            PendingEvent {
                vector: 13,
                kind: EventKind::Exception,
                error_code: Some(0x18),
            },
            PendingEvent {
                vector: 2,
                kind: EventKind::Nmi,
                error_code: None,
            },
            PendingEvent {
                vector: 0x80,
                kind: EventKind::SoftwareInterrupt,
                error_code: None,
            },
        ] {
            assert_eq!(event_out(event_in(&ev)), Some(ev));
        }
        assert_eq!(event_out(0x30), None, "not valid");
        assert_eq!(event_out(EVENT_VALID | (1 << 8)), None, "reserved type");
        assert_eq!(injection(13, Some(0x18)), 0x18_8000_0b0d);
        assert_eq!(injection(6, Some(0x18)), 0x8000_0306);
    }
}
