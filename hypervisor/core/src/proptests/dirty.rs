//! `DirtyLog` against a model: the set of frames written since the last
//! collection, and the permission every frame must have.
//!
//! Guest writes are simulated the way the partition handles them: if the
//! nested table says the frame is not writable, the write faults and goes
//! to `on_write_fault`; it lands only if that resolved the fault.

use crate::addr::{Gfn, Gpa, Hpa, PAGE_SIZE};
use crate::dirty::{DirtyLog, FaultOutcome};
use crate::npt::{EntryFormat, NestedPageTable};
use crate::svm::NptFormat;
use crate::testing::{test_memory, TestAlloc, TestMem};
use crate::vmx::EptFormat;
use alloc::collections::BTreeSet;
use alloc::vec;
use alloc::vec::Vec;
use proptest::prelude::*;

/// How one stretch of guest RAM is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Writable, host side 2 MiB aligned like the guest side (large leaves).
    WritableLarge,
    /// Writable, host side offset by 4 KiB (4 KiB leaves only).
    WritableSmall,
    /// Read-only (a "ROM").
    ReadOnly,
    /// Not mapped (a hole).
    Hole,
}

#[derive(Clone, Debug)]
struct Layout {
    ram_pages: u64,
    /// `ram_bytes` is `ram_pages * 4096 - short_bytes`.
    short_bytes: u64,
    /// Stretches: (first frame, kind); sorted, the first at 0.
    stretches: Vec<(u64, Kind)>,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        3 => Just(Kind::WritableLarge),
        2 => Just(Kind::WritableSmall),
        1 => Just(Kind::ReadOnly),
        1 => Just(Kind::Hole),
    ]
}

fn layout() -> impl Strategy<Value = Layout> {
    (256..=1280u64, prop_oneof![Just(0u64), 1..4096u64])
        .prop_flat_map(|(ram_pages, short_bytes)| {
            (
                Just(ram_pages),
                Just(short_bytes),
                kind(),
                prop::collection::vec((1..ram_pages, kind()), 0..4),
            )
        })
        .prop_map(|(ram_pages, short_bytes, first, cuts)| {
            let mut stretches = vec![(0, first)];
            stretches.extend(cuts);
            stretches.sort_by_key(|s| s.0);
            stretches.dedup_by_key(|s| s.0);
            Layout {
                ram_pages,
                short_bytes,
                stretches,
            }
        })
}

#[derive(Clone, Debug)]
enum Op {
    /// The guest writes frame `gfn` (up to 16 frames past RAM).
    GuestWrite(u64),
    /// The hypervisor writes `[gpa, gpa+len)`.
    HvWrite(u64, u64),
    Collect,
    Enable,
    Disable,
}

fn ops(ram_pages: u64) -> impl Strategy<Value = Vec<Op>> {
    let ram = ram_pages * PAGE_SIZE;
    let op = prop_oneof![
        8 => (0..ram_pages + 16).prop_map(Op::GuestWrite),
        2 => (0..ram + 0x4000, prop_oneof![0..0x3000u64, 0..0x6_0000u64, Just(u64::MAX)])
            .prop_map(|(gpa, len)| Op::HvWrite(gpa, len)),
        2 => Just(Op::Collect),
        1 => Just(Op::Enable),
        1 => Just(Op::Disable),
    ];
    // Start with logging on most of the time, so rounds happen.
    (any::<bool>(), prop::collection::vec(op, 1..48)).prop_map(|(enable_first, mut v)| {
        if enable_first {
            v.insert(0, Op::Enable);
        }
        v
    })
}

/// Original mapping of each frame: `None` (hole) or `(hfn, writable)`.
fn map_layout<F: EntryFormat>(
    layout: &Layout,
    npt: &mut NestedPageTable<F>,
    mem: &mut TestMem,
    alloc: &mut TestAlloc,
) -> Vec<Option<(u64, bool)>> {
    let mut orig = vec![None; layout.ram_pages as usize];
    for (i, &(start, kind)) in layout.stretches.iter().enumerate() {
        let end = layout
            .stretches
            .get(i + 1)
            .map_or(layout.ram_pages, |s| s.0);
        // Host frames: 1 GiB up, so large stretches line up with the guest.
        let hfn = match kind {
            Kind::WritableSmall => 0x4_0000 + start + 1,
            _ => 0x4_0000 + start,
        };
        let writable = match kind {
            Kind::Hole => continue,
            Kind::ReadOnly => false,
            Kind::WritableLarge | Kind::WritableSmall => true,
        };
        npt.map(
            mem,
            alloc,
            Gfn(start).gpa(),
            Hpa(hfn * PAGE_SIZE),
            (end - start) * PAGE_SIZE,
            writable,
        )
        .unwrap();
        for f in start..end {
            orig[f as usize] = Some((hfn + f - start, writable));
        }
    }
    orig
}

struct Model {
    orig: Vec<Option<(u64, bool)>>,
    enabled: bool,
    /// Written since the last collection (guest or hypervisor).
    written: BTreeSet<u64>,
    /// Unprotected by a fault since the last collection.
    faulted: BTreeSet<u64>,
}

impl Model {
    /// The permission frame `gfn` must have: `None` if unmapped.
    fn writable(&self, gfn: u64) -> Option<bool> {
        let (_, w) = (*self.orig.get(gfn as usize)?)?;
        Some(if self.enabled && w {
            self.faulted.contains(&gfn)
        } else {
            w
        })
    }
}

fn check_frame<F: EntryFormat>(
    npt: &NestedPageTable<F>,
    mem: &TestMem,
    model: &Model,
    gfn: u64,
) -> Result<(), TestCaseError> {
    let t = npt.translate(mem, Gfn(gfn).gpa());
    let want_hpa = model
        .orig
        .get(gfn as usize)
        .copied()
        .flatten()
        .map(|(hfn, _)| Hpa(hfn * PAGE_SIZE));
    prop_assert_eq!(t.map(|t| t.hpa), want_hpa, "{} frame {:#x}", F::NAME, gfn);
    prop_assert_eq!(
        t.map(|t| t.writable),
        model.writable(gfn),
        "{} permission of frame {:#x} (enabled {})",
        F::NAME,
        gfn,
        model.enabled
    );
    Ok(())
}

fn check_all<F: EntryFormat>(
    npt: &NestedPageTable<F>,
    mem: &TestMem,
    model: &Model,
) -> Result<(), TestCaseError> {
    for gfn in 0..model.orig.len() as u64 + 4 {
        check_frame(npt, mem, model, gfn)?;
    }
    Ok(())
}

fn run<F: EntryFormat>(layout: Layout, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let (mut mem, mut alloc) = test_memory();
    mem.set_recording(false);
    let mut npt = NestedPageTable::<F>::new(&mut alloc, &mut mem).unwrap();
    let orig = map_layout(&layout, &mut npt, &mut mem, &mut alloc);
    let ram_bytes = layout.ram_pages * PAGE_SIZE - layout.short_bytes;
    let mut log = DirtyLog::new(ram_bytes);
    prop_assert_eq!(log.ram_pages(), layout.ram_pages);
    let words = log.bitmap_words();
    let mut model = Model {
        orig,
        enabled: false,
        written: BTreeSet::new(),
        faulted: BTreeSet::new(),
    };
    let ram_end = layout.ram_pages * PAGE_SIZE;

    for op in ops {
        let allocs_before = alloc.allocs();
        match op {
            Op::GuestWrite(gfn) => {
                match npt.translate(&mem, Gfn(gfn).gpa()) {
                    Some(t) if t.writable => {
                        if model.enabled {
                            model.written.insert(gfn);
                        }
                    }
                    t => {
                        let out = log
                            .on_write_fault(
                                &mut npt,
                                &mut mem,
                                &mut alloc,
                                Gpa(gfn * PAGE_SIZE + 0x10),
                            )
                            .unwrap();
                        let ours = t.is_some()
                            && model.enabled
                            && model.orig[gfn as usize].is_some_and(|(_, w)| w);
                        if ours {
                            prop_assert_eq!(out, FaultOutcome::Resolved, "frame {:#x}", gfn);
                            model.written.insert(gfn);
                            model.faulted.insert(gfn);
                        } else {
                            prop_assert_eq!(out, FaultOutcome::NotOurs, "frame {:#x}", gfn);
                        }
                    }
                }
                check_frame(&npt, &mem, &model, gfn)?;
            }
            Op::HvWrite(gpa, len) => {
                log.mark_range(Gpa(gpa), len);
                if model.enabled && len > 0 {
                    let last = gpa.saturating_add(len - 1).min(ram_end - 1);
                    for f in gpa / PAGE_SIZE..=last / PAGE_SIZE {
                        model.written.insert(f);
                    }
                }
            }
            Op::Collect => {
                let mut out = vec![0u64; words + 1];
                let n = log
                    .collect_and_clear(&mut npt, &mut mem, &mut alloc, &mut out)
                    .unwrap();
                let mut got = BTreeSet::new();
                for (i, w) in out.iter().enumerate() {
                    for b in 0..64 {
                        if w & (1 << b) != 0 {
                            got.insert(i as u64 * 64 + b);
                        }
                    }
                }
                let missing: Vec<_> = model.written.difference(&got).collect();
                let extra: Vec<_> = got.difference(&model.written).collect();
                prop_assert!(
                    missing.is_empty() && extra.is_empty(),
                    "{}: missing {:x?} extra {:x?}",
                    F::NAME,
                    missing,
                    extra
                );
                prop_assert_eq!(n, got.len() as u64);
                prop_assert_eq!(log.dirty_count(), 0);
                model.written.clear();
                model.faulted.clear();
                check_all(&npt, &mem, &model)?;
            }
            Op::Enable => {
                log.enable(&mut npt, &mut mem, &mut alloc).unwrap();
                prop_assert!(log.enabled());
                model.enabled = true;
                model.written.clear();
                model.faulted.clear();
                check_all(&npt, &mem, &model)?;
            }
            Op::Disable => {
                log.disable(&mut npt, &mut mem, &mut alloc).unwrap();
                prop_assert!(!log.enabled());
                model.enabled = false;
                model.written.clear();
                model.faulted.clear();
                check_all(&npt, &mem, &model)?;
            }
        }
        if !matches!(op, Op::Enable) {
            // Only enable's first splits allocate; the fault path never does.
            prop_assert_eq!(alloc.allocs(), allocs_before, "{:?} allocated", op);
        }
        prop_assert_eq!(log.dirty_count(), model.written.len() as u64);
    }
    check_all(&npt, &mem, &model)?;
    npt.destroy(&mut mem, &mut alloc);
    prop_assert_eq!(alloc.live(), 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(28))]

    #[test]
    fn dirty_log_npt_matches_model(
        (layout, ops) in layout().prop_flat_map(|l| (Just(l.clone()), ops(l.ram_pages)))
    ) {
        run::<NptFormat>(layout, ops)?;
    }

    #[test]
    fn dirty_log_ept_matches_model(
        (layout, ops) in layout().prop_flat_map(|l| (Just(l.clone()), ops(l.ram_pages)))
    ) {
        run::<EptFormat>(layout, ops)?;
    }
}
