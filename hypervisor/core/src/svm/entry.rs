//! What the SVM backend decides around each VMRUN, as plain functions: the
//! TLB flush to request, the VMCB clean bits to claim, and where RIP goes
//! after an intercepted instruction.
//!
//! These are the places where real hardware differs from QEMU's TCG (no
//! NRIPS, no clean bits, no flush-by-ASID, and every world switch flushes
//! the TLB, so a missing flush is never seen there). docs/DESIGN.md, "Real
//! hardware and KVM nested", lists them.

/// TLB_CONTROL: do nothing (AMD APM vol. 2, 15.16.1).
pub const TLB_CONTROL_NONE: u32 = 0;
/// TLB_CONTROL: flush the entire TLB, every ASID (works on every SVM CPU).
pub const TLB_CONTROL_FLUSH_ALL: u32 = 1;
/// TLB_CONTROL: flush this guest's ASID only (needs CPUID Fn8000_000A
/// EDX[6] FlushByAsid).
pub const TLB_CONTROL_FLUSH_ASID: u32 = 3;

/// VMCB clean bits (offset 0xC0, bits 31:0) claimed on every VMRUN: none.
/// Each set bit (AMD APM vol. 2, 15.15) lets the CPU keep a cached copy of
/// a VMCB field group; the backend changes intercepts, TSC offset, ASID, nested CR3, CR/DR
/// values, EFER, segments and EVENTINJ between runs, and tracking every
/// such write per group is where a stale-cache bug would hide, so it
/// claims nothing is clean and the CPU reloads everything (correct on
/// every CPU, with or without the feature; the cost is a few cache lines
/// per VMRUN).
pub const CLEAN_BITS: u64 = 0;

/// The TLB_CONTROL value for the next VMRUN.
///
/// A flush is needed when the nested page table's permissions were
/// reduced since the last run (`flush_pending`: dirty-log write
/// protection, collect-and-clear, a new or reset guest) and, always, when
/// the vCPU shares its ASID with other vCPUs (another guest's translations
/// may be cached under it). Flush-by-ASID limits the flush to this guest
/// where the CPU has it; otherwise the whole TLB goes.
pub const fn tlb_control(flush_pending: bool, shared_asid: bool, flush_by_asid: bool) -> u32 {
    if !flush_pending && !shared_asid {
        TLB_CONTROL_NONE
    } else if flush_by_asid {
        TLB_CONTROL_FLUSH_ASID
    } else {
        TLB_CONTROL_FLUSH_ALL
    }
}

/// RIP after an intercepted instruction: the CPU's nRIP (VMCB offset 0xC8)
/// when it has NRIPS and stored one (AMD APM vol. 2, 15.7.1: only
/// instruction intercepts store it; the backend zeroes the field before
/// each VMRUN, so 0 means "not stored"), else the address after the
/// instruction as decoded in software (`software`).
pub const fn next_rip(nrips: bool, hw_next_rip: u64, software: u64) -> u64 {
    if nrips && hw_next_rip != 0 {
        hw_next_rip
    } else {
        software
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permission_reduction_is_always_followed_by_a_flush() {
        for by_asid in [false, true] {
            for shared in [false, true] {
                let c = tlb_control(true, shared, by_asid);
                assert_ne!(c, TLB_CONTROL_NONE);
                assert_eq!(c == TLB_CONTROL_FLUSH_ASID, by_asid);
            }
        }
    }

    #[test]
    fn shared_asids_flush_on_every_run_and_own_ones_only_when_asked() {
        assert_eq!(tlb_control(false, true, true), TLB_CONTROL_FLUSH_ASID);
        assert_eq!(tlb_control(false, true, false), TLB_CONTROL_FLUSH_ALL);
        assert_eq!(tlb_control(false, false, true), TLB_CONTROL_NONE);
        assert_eq!(tlb_control(false, false, false), TLB_CONTROL_NONE);
    }

    #[test]
    fn next_rip_prefers_the_cpu_only_when_it_reported_one() {
        // A prefixed CPUID (3 bytes) decoded in software as 2: the CPU's
        // value wins when it has NRIPS.
        assert_eq!(next_rip(true, 0x1003, 0x1002), 0x1003);
        // TCG: NRIPS absent, nRIP reads 0.
        assert_eq!(next_rip(false, 0, 0x1002), 0x1002);
        // A CPU without NRIPS whose field holds garbage is not believed.
        assert_eq!(next_rip(false, 0x5555, 0x1002), 0x1002);
        // NRIPS but nothing stored (not an instruction intercept).
        assert_eq!(next_rip(true, 0, 0x1002), 0x1002);
    }
}
