//! x86 architecture facts the `x86_64` crate does not have, written once
//! for both vendors and the vendor-neutral checks.
//!
//! Register flags come from the `x86_64` crate ([`Cr0Flags`], [`Cr4Flags`],
//! [`EferFlags`], [`RFlags`], re-exported here so users need one import);
//! what it lacks lives here: address and PAT validity, which exceptions push
//! an error code, IDT gate reach, the EFER write rule, the event-injection
//! word both vendors share, and the packed segment attributes of a 64-bit
//! guest. Nothing here touches the machine (only the crate's types are
//! used, never its instructions).

pub use vmstate::{EventKind, PendingEvent};
pub use x86_64::registers::control::{Cr0Flags, Cr4Flags};
pub use x86_64::registers::model_specific::EferFlags;
pub use x86_64::registers::rflags::RFlags;

/// Whether `addr` is canonical for 48-bit linear addresses (bits 63:47
/// all equal; Intel SDM vol. 1, 3.3.7.1; AMD APM vol. 2, 5.3.1).
pub const fn is_canonical(addr: u64) -> bool {
    let top = addr >> 47;
    top == 0 || top == 0x1_ffff
}

/// Whether every byte of a PAT value is a valid memory type (0, 1, 4, 5, 6
/// or 7; Intel SDM vol. 3A, 13.12.2; AMD APM vol. 2, 7.8.1).
pub const fn is_valid_pat(value: u64) -> bool {
    let mut i = 0;
    while i < 8 {
        let t = (value >> (i * 8)) & 0xff;
        if !matches!(t, 0 | 1 | 4 | 5 | 6 | 7) {
            return false;
        }
        i += 1;
    }
    true
}

/// The PAT after power-on and INIT (Intel SDM vol. 3A, 13.12.4; AMD APM
/// vol. 2, 7.8.2).
pub const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;

/// Whether exception `vector` pushes an error code: #DF 8, #TS 10, #NP 11,
/// #SS 12, #GP 13, #PF 14, #AC 17, #CP 21, #VC 29, #SX 30 (Intel SDM vol.
/// 3A, table 6-1; AMD APM vol. 2, 8.2). VM entry checks the
/// deliver-error-code bit against this (Intel SDM vol. 3C, 27.2.1.3).
pub const fn exception_has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Whether an IDT of `limit` bytes holds the gate for `vector` (16-byte
/// gates in long mode, 8-byte gates otherwise; Intel SDM vol. 3A, 6.10 and
/// 6.14.1, AMD APM vol. 2, 8.2).
pub const fn idt_delivers(limit: u32, long_mode: bool, vector: u8) -> bool {
    let gate: u64 = if long_mode { 16 } else { 8 };
    limit as u64 >= vector as u64 * gate + gate - 1
}

/// CR0 bits that exist: PE MP EM TS ET NE WP AM NW CD PG (all the crate
/// names).
pub const CR0_DEFINED: Cr0Flags = Cr0Flags::all();

/// CR4 bits a guest may have here: VME PVI TSD DE PSE PAE MCE PGE PCE
/// OSFXSR OSXMMEXCPT UMIP FSGSBASE PCIDE SMEP SMAP. Not OSXSAVE (XSAVE is
/// hidden) nor VMXE/SMXE (no nested virtualization).
pub const CR4_GUEST: Cr4Flags = Cr4Flags::VIRTUAL_8086_MODE_EXTENSIONS
    .union(Cr4Flags::PROTECTED_MODE_VIRTUAL_INTERRUPTS)
    .union(Cr4Flags::TIMESTAMP_DISABLE)
    .union(Cr4Flags::DEBUGGING_EXTENSIONS)
    .union(Cr4Flags::PAGE_SIZE_EXTENSION)
    .union(Cr4Flags::PHYSICAL_ADDRESS_EXTENSION)
    .union(Cr4Flags::MACHINE_CHECK_EXCEPTION)
    .union(Cr4Flags::PAGE_GLOBAL)
    .union(Cr4Flags::PERFORMANCE_MONITOR_COUNTER)
    .union(Cr4Flags::OSFXSR)
    .union(Cr4Flags::OSXMMEXCPT_ENABLE)
    .union(Cr4Flags::USER_MODE_INSTRUCTION_PREVENTION)
    .union(Cr4Flags::FSGSBASE)
    .union(Cr4Flags::PCID)
    .union(Cr4Flags::SUPERVISOR_MODE_EXECUTION_PROTECTION)
    .union(Cr4Flags::SUPERVISOR_MODE_ACCESS_PREVENTION);

/// EFER bits a guest may have: SCE, LME, LMA, NXE. SVME is refused (SVM is
/// hidden from the guest), as is everything else.
pub const EFER_GUEST: EferFlags = EferFlags::SYSTEM_CALL_EXTENSIONS
    .union(EferFlags::LONG_MODE_ENABLE)
    .union(EferFlags::LONG_MODE_ACTIVE)
    .union(EferFlags::NO_EXECUTE_ENABLE);

/// The guest's EFER after its WRMSR of `value`, given the current EFER and
/// whether paging is on; `None` for #GP. Reserved bits fault; LME may not
/// change while paging is on; LMA is read-only (the CPU sets it), so it
/// keeps its current value (AMD APM vol. 2, 3.1.7; Intel SDM vol. 3A,
/// 2.2.1 and 10.8.5).
pub const fn efer_after_write(current: EferFlags, paging: bool, value: u64) -> Option<EferFlags> {
    if value & !EFER_GUEST.bits() != 0 {
        return None;
    }
    let lme = EferFlags::LONG_MODE_ENABLE.bits();
    if paging && (value ^ current.bits()) & lme != 0 {
        return None;
    }
    let lma = current.bits() & EferFlags::LONG_MODE_ACTIVE.bits();
    let writable = EFER_GUEST.bits() & !EferFlags::LONG_MODE_ACTIVE.bits();
    Some(EferFlags::from_bits_truncate((value & writable) | lma))
}

/// An event as both vendors' injection formats encode it: bits 7:0
/// vector, 10:8 type ([`EventKind::raw`]), 11 deliver error code, 31 valid
/// (AMD EVENTINJ, APM vol. 2, 15.20, whose bits 63:32 then hold the error
/// code; VMX VM-entry interruption information, Intel SDM vol. 3C, 25.8.3,
/// with the error code in its own field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Injection {
    /// The 32-bit event word.
    pub info: u32,
    /// The error code to deliver, when bit 11 is set.
    pub error_code: Option<u32>,
}

/// Event word bit 11: deliver an error code.
pub const EVENT_ERROR_VALID: u32 = 1 << 11;
/// Event word bit 31: valid.
pub const EVENT_VALID: u32 = 1 << 31;

/// The injection of `vector` as the hypervisor raises it in a guest:
/// vector 2 as an NMI, 0-31 as a hardware exception (with an error code
/// exactly when the vector pushes one; `error_code` or 0), 32-255 as an
/// external interrupt (no error code).
pub const fn event_injection(vector: u8, error_code: Option<u32>) -> Injection {
    let kind = match vector {
        2 => EventKind::Nmi,
        0..=31 => EventKind::Exception,
        _ => EventKind::ExternalInterrupt,
    };
    let mut info = vector as u32 | (kind.raw() as u32) << 8 | EVENT_VALID;
    let code = if matches!(kind, EventKind::Exception) && exception_has_error_code(vector) {
        info |= EVENT_ERROR_VALID;
        Some(match error_code {
            Some(c) => c,
            None => 0,
        })
    } else {
        None
    };
    Injection {
        info,
        error_code: code,
    }
}

/// A pending event from its event word and error code; `None` if the word
/// is not valid or its type is none the record names (reserved 1,
/// privileged software exception 5, software exception 6, other 7: our
/// exits never leave those pending for a guest without INT1/INT3/INTO).
pub const fn pending_event(info: u32, error_code: u32) -> Option<PendingEvent> {
    if info & EVENT_VALID == 0 {
        return None;
    }
    let Some(kind) = EventKind::from_raw(((info >> 8) & 7) as u8) else {
        return None;
    };
    Some(PendingEvent {
        vector: info as u8,
        kind,
        error_code: if info & EVENT_ERROR_VALID != 0 {
            Some(error_code)
        } else {
            None
        },
    })
}

/// A pending event as its event word and error code.
pub const fn event_word(ev: &PendingEvent) -> Injection {
    let mut info = ev.vector as u32 | (ev.kind.raw() as u32) << 8 | EVENT_VALID;
    if ev.error_code.is_some() {
        info |= EVENT_ERROR_VALID;
    }
    Injection {
        info,
        error_code: ev.error_code,
    }
}

// Segment attributes of a 64-bit guest at CPL 0 in the packed form of the
// state record (descriptor bits 47:40 -> 7:0, 55:52 -> 11:8; see
// `vmstate::Segment`).
/// Present, DPL 0, code/data, execute/read, accessed; L=1 (64-bit), G=1.
pub const ATTR_CODE64: u16 = 0x0a9b;
/// Present, DPL 0, code/data, read/write, accessed; D/B=1, G=1.
pub const ATTR_DATA: u16 = 0x0c93;
/// Present, busy 64-bit TSS.
pub const ATTR_TSS_BUSY: u16 = 0x008b;
/// Present LDT.
pub const ATTR_LDT: u16 = 0x0082;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_addresses() {
        assert!(is_canonical(0xffff_8000_0000_0000));
        assert!(is_canonical(0x7fff_ffff_ffff));
        assert!(is_canonical(0));
        assert!(is_canonical(u64::MAX));
        assert!(!is_canonical(0x8000_0000_0000));
        assert!(!is_canonical(0xffff_7fff_ffff_ffff));
    }

    #[test]
    fn pat_memory_types() {
        assert!(is_valid_pat(PAT_DEFAULT));
        assert!(is_valid_pat(0x0101_0404_0505_0606));
        assert!(!is_valid_pat(0x0000_0000_0000_0002));
        assert!(!is_valid_pat(0x0300_0000_0000_0000));
        assert!(!is_valid_pat(0x0800_0000_0000_0000));
    }

    #[test]
    fn error_code_vectors_match_the_manuals() {
        let with: Vec<u8> = (0..=255u8)
            .filter(|&v| exception_has_error_code(v))
            .collect();
        assert_eq!(with, [8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
    }

    #[test]
    fn injection_words() {
        // #GP(0x18): hardware exception with its error code.
        let gp = event_injection(13, Some(0x18));
        assert_eq!(gp.info, 0x8000_0b0d);
        assert_eq!(gp.error_code, Some(0x18));
        // #UD: no error code even if one is offered.
        assert_eq!(event_injection(6, Some(5)).info, 0x8000_0306);
        assert_eq!(event_injection(6, Some(5)).error_code, None);
        // #VC (29) and #SX (30) push an error code: the word says so.
        for v in [29u8, 30] {
            let i = event_injection(v, None);
            assert_eq!(i.info & EVENT_ERROR_VALID, EVENT_ERROR_VALID, "vector {v}");
            assert_eq!(i.error_code, Some(0));
        }
        assert_eq!(event_injection(2, None).info, 0x8000_0202);
        assert_eq!(event_injection(0x30, Some(1)).info, 0x8000_0030);
    }

    #[test]
    fn efer_writes() {
        let long = EferFlags::LONG_MODE_ENABLE | EferFlags::LONG_MODE_ACTIVE;
        // SCE|NXE added; LMA kept.
        assert_eq!(
            efer_after_write(long, true, 0x901),
            Some(long | EferFlags::SYSTEM_CALL_EXTENSIONS | EferFlags::NO_EXECUTE_ENABLE)
        );
        // Writing LMA clear does not clear it.
        assert_eq!(efer_after_write(long, true, 0x100), Some(long));
        // LME may not change while paging is on, may while it is off.
        assert_eq!(efer_after_write(long, true, 0), None);
        assert_eq!(
            efer_after_write(EferFlags::empty(), false, 0x100),
            Some(EferFlags::LONG_MODE_ENABLE)
        );
        // SVME and other reserved bits fault.
        assert_eq!(efer_after_write(long, true, 0x1500), None);
        assert_eq!(efer_after_write(long, true, 1 << 63), None);
    }

    #[test]
    fn idt_limit_decides_delivery() {
        // Long mode: 16-byte gates; vector 8 needs bytes 128..=143.
        assert!(!idt_delivers(0, true, 8));
        assert!(!idt_delivers(142, true, 8));
        assert!(idt_delivers(143, true, 8));
        assert!(!idt_delivers(143, true, 13));
        assert!(idt_delivers(13 * 16 + 15, true, 13));
        // Legacy mode: 8-byte gates.
        assert!(idt_delivers(71, false, 8));
        assert!(!idt_delivers(70, false, 8));
        assert!(idt_delivers(0xfff, true, 255));
    }

    #[test]
    fn guest_register_masks() {
        assert_eq!(CR0_DEFINED.bits(), 0xe005_003f);
        assert_eq!(
            CR4_GUEST.bits(),
            0x7ff | (1 << 11) | (1 << 16) | (1 << 17) | (1 << 20) | (1 << 21)
        );
        assert_eq!(EFER_GUEST.bits(), 0xd01);
    }
}
