//! `NestedPageTable` against a map `gfn -> (hfn, writable)` plus the set of
//! 2 MiB chunks that must still be one large leaf.

use crate::addr::{Gfn, Gpa, Hpa, PAGE_SIZE};
use crate::npt::{EntryFormat, NestedPageTable, NptError, PageSize, Translation};
use crate::svm::NptFormat;
use crate::testing::{test_memory, TestAlloc, TestMem};
use crate::vmx::EptFormat;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use proptest::prelude::*;

/// Frames per 2 MiB.
const LARGE: u64 = 512;
/// Bases (in frames) of the guest regions ops land in: low memory, across
/// the 512 GiB boundary (a second PML4 entry), the top of the 48-bit space.
const REGIONS: [u64; 3] = [0, (1 << 27) - 4096, (1 << 36) - 16384];

#[derive(Clone, Debug)]
enum Op {
    Map {
        region: usize,
        gfn: u64,
        pages: u64,
        hfn: u64,
        writable: bool,
    },
    /// Change a mapped frame (`Index` into the model) or, if the model is
    /// empty or `probe` is set, an arbitrary one.
    SetWritable {
        pick: prop::sample::Index,
        probe: Option<(usize, u64)>,
        writable: bool,
    },
}

fn frame_offset() -> impl Strategy<Value = u64> {
    prop_oneof![(0..16u64).prop_map(|k| k * LARGE), 0..8192u64]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (
            0..REGIONS.len(),
            frame_offset(),
            prop_oneof![1..=8u64, 500..=1300u64],
            prop_oneof![(1..64u64).prop_map(|k| k * LARGE), 1..100_000u64],
            any::<bool>()
        )
            .prop_map(|(region, gfn, pages, hfn, writable)| Op::Map {
                region,
                gfn,
                pages,
                hfn,
                writable
            }),
        2 => (
            any::<prop::sample::Index>(),
            prop::option::weighted(0.2, (0..REGIONS.len(), 0..10_000u64)),
            any::<bool>()
        )
            .prop_map(|(pick, probe, writable)| Op::SetWritable {
                pick,
                probe,
                writable
            }),
    ]
}

#[derive(Default)]
struct Model {
    frames: BTreeMap<u64, (u64, bool)>,
    /// First frames of 2 MiB chunks mapped by one large leaf.
    large: BTreeSet<u64>,
}

impl Model {
    fn expect(&self, gfn: u64) -> Option<Translation> {
        let &(hfn, writable) = self.frames.get(&gfn)?;
        let size = if self.large.contains(&(gfn & !(LARGE - 1))) {
            PageSize::Size2M
        } else {
            PageSize::Size4K
        };
        Some(Translation {
            hpa: Hpa(hfn * PAGE_SIZE + 0x18),
            size,
            writable,
        })
    }
}

fn check<F: EntryFormat>(
    npt: &NestedPageTable<F>,
    mem: &TestMem,
    model: &Model,
    gfn: u64,
) -> Result<(), TestCaseError> {
    let Some(gpa) = gfn.checked_mul(PAGE_SIZE) else {
        return Ok(()); // gfn -1 of frame 0
    };
    let got = npt.translate(mem, Gpa(gpa + 0x18));
    prop_assert_eq!(got, model.expect(gfn), "{} gfn {:#x}", F::NAME, gfn);
    Ok(())
}

fn run<F: EntryFormat>(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let (mut mem, mut alloc): (TestMem, TestAlloc) = test_memory();
    mem.set_recording(false);
    let mut npt = NestedPageTable::<F>::new(&mut alloc, &mut mem).unwrap();
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Map {
                region,
                gfn,
                pages,
                hfn,
                writable,
            } => {
                let g = REGIONS[region] + gfn;
                let r = npt.map(
                    &mut mem,
                    &mut alloc,
                    Gfn(g).gpa(),
                    Hpa(hfn * PAGE_SIZE),
                    pages * PAGE_SIZE,
                    writable,
                );
                match model.frames.range(g..g + pages).next() {
                    Some((&first, _)) => {
                        prop_assert_eq!(
                            r,
                            Err(NptError::Overlap {
                                gpa: Gfn(first).gpa()
                            })
                        );
                    }
                    None => {
                        prop_assert_eq!(r, Ok(()));
                        let mut off = 0;
                        while off < pages {
                            let (gg, hh) = (g + off, hfn + off);
                            if gg % LARGE == 0 && hh % LARGE == 0 && pages - off >= LARGE {
                                model.large.insert(gg);
                                for i in 0..LARGE {
                                    model.frames.insert(gg + i, (hh + i, writable));
                                }
                                off += LARGE;
                            } else {
                                model.frames.insert(gg, (hh, writable));
                                off += 1;
                            }
                        }
                    }
                }
                for gfn in [
                    g.wrapping_sub(1),
                    g,
                    g + pages / 2,
                    g + pages - 1,
                    g + pages,
                ] {
                    check(&npt, &mem, &model, gfn)?;
                }
            }
            Op::SetWritable {
                pick,
                probe,
                writable,
            } => {
                let gfn = match (probe, model.frames.len()) {
                    (Some(_), _) | (None, 0) => {
                        let (region, off) = probe.unwrap_or((0, 0));
                        REGIONS[region] + off
                    }
                    (None, n) => *model.frames.keys().nth(pick.index(n)).unwrap(),
                };
                let r = npt.set_writable(&mut mem, &mut alloc, Gfn(gfn), writable);
                match model.frames.get_mut(&gfn) {
                    None => prop_assert_eq!(
                        r,
                        Err(NptError::NotMapped {
                            gpa: Gfn(gfn).gpa()
                        })
                    ),
                    Some(e) => {
                        let changed = e.1 != writable;
                        prop_assert_eq!(r, Ok(changed));
                        e.1 = writable;
                        if changed {
                            model.large.remove(&(gfn & !(LARGE - 1)));
                        }
                    }
                }
                let chunk = gfn & !(LARGE - 1);
                for g in [gfn.wrapping_sub(1), gfn, gfn + 1, chunk, chunk + LARGE - 1] {
                    check(&npt, &mem, &model, g)?;
                }
            }
        }
    }
    // Everything, and the frames around every run of mapped frames.
    for &gfn in model.frames.keys() {
        check(&npt, &mem, &model, gfn)?;
        if !model.frames.contains_key(&(gfn + 1)) {
            check(&npt, &mem, &model, gfn + 1)?;
        }
    }
    prop_assert_eq!(alloc.live() as u64, npt.table_frames());
    npt.destroy(&mut mem, &mut alloc);
    prop_assert_eq!(alloc.live(), 0);
    prop_assert_eq!(alloc.allocs(), alloc.frees());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn npt_matches_model(ops in prop::collection::vec(op(), 1..16)) {
        run::<NptFormat>(ops)?;
    }

    #[test]
    fn ept_matches_model(ops in prop::collection::vec(op(), 1..16)) {
        run::<EptFormat>(ops)?;
    }
}
