//! Which TLB invalidations the VMX backend performs before a VM entry, as
//! a plain function (Intel SDM vol. 3C, 29.4.3: guest-physical and
//! combined mappings are tagged with the EPTP, linear and combined ones
//! with the VPID; neither is invalidated by VM entry or exit when VPIDs
//! are in use).
//!
//! Under Bochs and QEMU a missing invalidation is rarely seen; on hardware
//! and under KVM nested a stale writable EPT translation lets a guest
//! write past the dirty log, and a stale dirty flag keeps PML from logging
//! a page. docs/DESIGN.md, "Real hardware and KVM nested".

/// The INVEPT / INVVPID type to use (31.3: 1 single-context, 2 all
/// contexts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// Nothing to invalidate.
    None,
    /// This EPTP's (or this VPID's) mappings only.
    SingleContext,
    /// Every context's mappings (when single-context is not supported).
    AllContexts,
}

impl Invalidation {
    /// The instruction's type operand, `None` for no instruction.
    pub const fn kind(self) -> Option<u64> {
        match self {
            Invalidation::None => None,
            Invalidation::SingleContext => Some(1),
            Invalidation::AllContexts => Some(2),
        }
    }
}

/// What the CPU supports (IA32_VMX_EPT_VPID_CAP, Intel SDM vol. 3D, A.10)
/// and whether VPIDs are in use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushCaps {
    /// INVEPT single-context.
    pub invept_single: bool,
    /// The vCPU runs with a VPID of its own (otherwise VM entry and exit
    /// invalidate linear mappings themselves, 29.4.3.3).
    pub vpid: bool,
    /// INVVPID single-context.
    pub invvpid_single: bool,
}

/// The invalidations before the next entry: INVEPT when EPT permissions
/// were reduced (or the dirty flags PML relies on were reset) since the
/// last entry (`ept_changed`); INVVPID when the VPID's linear mappings may
/// belong to someone else (`vpid_stale`: a recycled VPID, a reset or a
/// restored guest), which matters only when VPIDs are in use.
pub const fn flush_plan(
    ept_changed: bool,
    vpid_stale: bool,
    caps: FlushCaps,
) -> (Invalidation, Invalidation) {
    let ept = if !ept_changed {
        Invalidation::None
    } else if caps.invept_single {
        Invalidation::SingleContext
    } else {
        Invalidation::AllContexts
    };
    let vpid = if !vpid_stale || !caps.vpid {
        Invalidation::None
    } else if caps.invvpid_single {
        Invalidation::SingleContext
    } else {
        Invalidation::AllContexts
    };
    (ept, vpid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ept_change_always_invalidates() {
        for single in [false, true] {
            let caps = FlushCaps {
                invept_single: single,
                ..FlushCaps::default()
            };
            let (ept, _) = flush_plan(true, false, caps);
            assert_ne!(ept, Invalidation::None);
            assert_eq!(ept == Invalidation::SingleContext, single);
            assert_eq!(flush_plan(false, false, caps).0, Invalidation::None);
        }
    }

    #[test]
    fn vpid_invalidation_only_with_vpids() {
        let with = FlushCaps {
            invept_single: true,
            vpid: true,
            invvpid_single: false,
        };
        assert_eq!(flush_plan(false, true, with).1, Invalidation::AllContexts);
        let single = FlushCaps {
            invvpid_single: true,
            ..with
        };
        assert_eq!(
            flush_plan(false, true, single).1,
            Invalidation::SingleContext
        );
        assert_eq!(flush_plan(false, false, single).1, Invalidation::None);
        let without = FlushCaps {
            vpid: false,
            ..single
        };
        assert_eq!(flush_plan(true, true, without).1, Invalidation::None);
        assert_eq!(Invalidation::SingleContext.kind(), Some(1));
        assert_eq!(Invalidation::AllContexts.kind(), Some(2));
        assert_eq!(Invalidation::None.kind(), None);
    }
}
