//! Engine tests: round trips, differencing, log replay, a crash-simulating
//! store and property tests against an in-memory model.

use super::disk::*;
use super::format::*;
use crate::io::{BlockIo, DiskError, IoError, MemIo, VirtualDisk};
use alloc::vec;
use alloc::vec::Vec;

fn new_disk(size: u64, block: u32, ls: u32) -> Vhdx<MemIo> {
    let mut p = CreateParams::dynamic(size);
    p.block_size = block;
    p.logical_sector_size = ls;
    p.guid_seed = 42;
    create(MemIo::new(), &p).unwrap()
}

fn bytes_of(d: &mut Vhdx<MemIo>) -> Vec<u8> {
    d.close().unwrap();
    d.io().as_slice().to_vec()
}

#[test]
fn dynamic_round_trip_and_reopen() {
    let mut d = new_disk(64 << 20, 1 << 20, 512);
    assert_eq!(d.kind(), DiskKind::Dynamic);
    let mut z = vec![1u8; 4096];
    d.read(0, &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    let data: Vec<u8> = (0..3 * 512 + (1 << 20)).map(|i| (i * 7) as u8).collect();
    let data = &data[..(data.len() / 512) * 512];
    d.write((1 << 20) - 1024, data).unwrap();
    let mut back = vec![0u8; data.len()];
    d.read((1 << 20) - 1024, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(d.allocated_ranges().unwrap(), vec![(0, 3 << 20)]);
    let img = bytes_of(&mut d);
    let mut r = Vhdx::open(MemIo::from_vec(img), OpenOptions::read_only()).unwrap();
    assert!(r.header().log_guid.is_zero());
    let mut back2 = vec![0u8; data.len()];
    r.read((1 << 20) - 1024, &mut back2).unwrap();
    assert_eq!(back2, data);
    assert!(r.write(0, &[0u8; 512]).is_err());
}

#[test]
fn fixed_disk_preallocates() {
    let mut p = CreateParams::dynamic(8 << 20);
    p.block_size = 2 << 20;
    p.fixed = true;
    let mut d = create(MemIo::new(), &p).unwrap();
    assert_eq!(d.kind(), DiskKind::Fixed);
    let len = d.io().len().unwrap();
    d.write(4096, &[9u8; 4096]).unwrap();
    assert_eq!(d.io().len().unwrap(), len);
}

#[test]
fn sector_4096_rejects_512_aligned_io() {
    let mut d = new_disk(16 << 20, 1 << 20, 4096);
    assert!(matches!(
        d.write(512, &[0u8; 512]),
        Err(DiskError::Request(_))
    ));
    d.write(4096, &[3u8; 4096]).unwrap();
    let mut b = [0u8; 4096];
    d.read(4096, &mut b).unwrap();
    assert_eq!(b, [3u8; 4096]);
}

#[test]
fn guids_change_on_first_write_only() {
    let mut d = new_disk(8 << 20, 1 << 20, 512);
    let h0 = d.header().clone();
    d.write(0, &[1u8; 512]).unwrap();
    let h1 = d.header().clone();
    assert_ne!(h0.file_write_guid, h1.file_write_guid);
    assert_ne!(h0.data_write_guid, h1.data_write_guid);
    assert!(
        h1.log_guid.is_zero(),
        "nothing committed through the log yet"
    );
    d.write(512, &[1u8; 512]).unwrap();
    assert_eq!(d.header().data_write_guid, h1.data_write_guid);
    assert_eq!(d.header().file_write_guid, h1.file_write_guid);
    d.close().unwrap();
    assert!(d.header().log_guid.is_zero());
    assert_eq!(d.header().data_write_guid, h1.data_write_guid);
}

fn diff_pair(ls: u32) -> (Vhdx<MemIo>, Vhdx<MemIo>) {
    let mut base = new_disk(8 << 20, 1 << 20, ls);
    base.write(0, &vec![0x11u8; 3 << 20]).unwrap();
    base.close().unwrap();
    let base_img = base.io().as_slice().to_vec();
    let base = Vhdx::open(MemIo::from_vec(base_img.clone()), OpenOptions::read_only()).unwrap();
    let spec = ParentSpec {
        data_write_guid: base.header().data_write_guid,
        relative_path: Some("base.vhdx".into()),
        absolute_path: None,
        virtual_size: base.virtual_size(),
        logical_sector_size: base.logical_sector_size(),
        physical_sector_size: base.physical_sector_size(),
        disk_id: base.disk_id(),
    };
    let mut p = CreateParams::dynamic(0);
    p.block_size = 2 << 20;
    p.parent = Some(spec);
    let mut child = create(MemIo::new(), &p).unwrap();
    child.attach_parent(base).unwrap();
    let parent_rw = Vhdx::open(MemIo::from_vec(base_img), OpenOptions::read_write(5)).unwrap();
    (child, parent_rw)
}

#[test]
fn differencing_reads_fall_through_and_merge() {
    for ls in [512u32, 4096] {
        let (mut child, parent_rw) = diff_pair(ls);
        assert_eq!(child.kind(), DiskKind::Differencing);
        let s = ls as usize;
        let mut b = vec![0u8; 4 * s];
        child.read(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0x11));
        // One sector in the middle of a block: copy-on-write per sector.
        child.write(s as u64, &vec![0x22u8; s]).unwrap();
        child.read(0, &mut b).unwrap();
        assert!(b[..s].iter().all(|&x| x == 0x11));
        assert!(b[s..2 * s].iter().all(|&x| x == 0x22));
        assert!(b[2 * s..].iter().all(|&x| x == 0x11));
        // A whole block lands fully present; past the parent's data reads zero.
        child.write(4 << 20, &vec![0x33u8; 2 << 20]).unwrap();
        let mut e = vec![0u8; s];
        child.read(7 << 20, &mut e).unwrap();
        assert!(e.iter().all(|&x| x == 0));
        // Reopen the child and re-attach.
        let img = bytes_of(&mut child);
        let parent_ro = child.take_parent().unwrap();
        let mut c2 = Vhdx::open(MemIo::from_vec(img), OpenOptions::read_only()).unwrap();
        c2.attach_parent(parent_ro).unwrap();
        c2.read(0, &mut b).unwrap();
        assert!(b[s..2 * s].iter().all(|&x| x == 0x22) && b[0] == 0x11);
        // Merge into a writable parent.
        drop(c2.take_parent());
        let guid_before = parent_rw.header().data_write_guid;
        c2.attach_parent(parent_rw).unwrap();
        c2.merge_into_parent().unwrap();
        let mut merged = c2.take_parent().unwrap();
        assert_ne!(merged.header().data_write_guid, guid_before);
        merged.read(0, &mut b).unwrap();
        assert!(b[s..2 * s].iter().all(|&x| x == 0x22) && b[0] == 0x11 && b[2 * s] == 0x11);
        let mut big = vec![0u8; 2 << 20];
        merged.read(4 << 20, &mut big).unwrap();
        assert!(big.iter().all(|&x| x == 0x33));
    }
}

/// A differencing disk's own ranges to the sector: a sector in a block is
/// that sector (not the block), a whole block is the block, runs in
/// neighbouring blocks join; the parent's data is not counted.
#[test]
fn present_ranges_are_the_childs_own_sectors() {
    for ls in [512u64, 4096] {
        let (mut child, _) = diff_pair(ls as u32);
        assert_eq!(child.present_ranges().unwrap(), []);
        child.write(ls, &vec![0x22u8; ls as usize]).unwrap();
        child.write(3 * ls, &vec![0x23u8; 2 * ls as usize]).unwrap();
        child.write(4 << 20, &vec![0x33u8; 2 << 20]).unwrap();
        // The last sector of block 1 and the first of block 3 (2 MiB
        // blocks) join the run of the whole block 2.
        child
            .write((4 << 20) - ls, &vec![0x44u8; ls as usize])
            .unwrap();
        child.write(6 << 20, &vec![0x55u8; ls as usize]).unwrap();
        assert_eq!(
            child.present_ranges().unwrap(),
            [
                (ls, ls),
                (3 * ls, 2 * ls),
                ((4 << 20) - ls, ls + (2 << 20) + ls),
            ],
            "sector size {ls}"
        );
    }
}

#[test]
fn wrong_parent_is_refused() {
    let (mut child, _) = diff_pair(512);
    let other = new_disk(8 << 20, 1 << 20, 512);
    drop(child.take_parent());
    let err = child.attach_parent(other).unwrap_err();
    assert!(err.to_string().contains("parent_linkage"), "{err}");
}

#[test]
fn pending_log_is_replayed_read_only_in_memory_and_on_disk() {
    let mut d = new_disk(16 << 20, 1 << 20, 512);
    d.write(0, &[1u8; 512]).unwrap();
    d.debug_stop_before_apply();
    d.write(5 << 20, &[7u8; 1024]).unwrap();
    assert!(d.flush().is_err());
    let img = d.io().as_slice().to_vec();
    drop(d);
    assert!(log_replay_needed(&MemIo::from_vec(img.clone())).unwrap());
    // Read-only: replayed in memory, file untouched.
    let mut r = Vhdx::open(MemIo::from_vec(img.clone()), OpenOptions::read_only()).unwrap();
    assert!(r.log_was_replayed());
    let mut b = [0u8; 1024];
    r.read(5 << 20, &mut b).unwrap();
    assert_eq!(b, [7u8; 1024]);
    assert_eq!(r.io().as_slice(), &img[..]);
    // Read-write: replayed on disk; a second replay of the same log is a no-op.
    let mut w = Vhdx::open(MemIo::from_vec(img.clone()), OpenOptions::read_write(3)).unwrap();
    assert!(w.log_was_replayed());
    w.read(5 << 20, &mut b).unwrap();
    assert_eq!(b, [7u8; 1024]);
    let after = bytes_of(&mut w);
    assert!(!log_replay_needed(&MemIo::from_vec(after)).unwrap());
}

#[test]
fn corrupt_structures_are_named() {
    let mut d = new_disk(16 << 20, 1 << 20, 512);
    d.write(0, &[1u8; 512]).unwrap();
    let img = bytes_of(&mut d);
    let open = |b: Vec<u8>| Vhdx::open(MemIo::from_vec(b), OpenOptions::read_only()).map(|_| ());
    let mut x = img.clone();
    x[0] = b'X';
    assert!(matches!(open(x), Err(DiskError::Open(m)) if m.contains("not a VHDX")));
    let mut x = img.clone();
    x[HEADER1_OFFSET as usize + 100] ^= 1;
    x[HEADER2_OFFSET as usize + 100] ^= 1;
    assert!(matches!(open(x), Err(DiskError::Corrupt(m)) if m.contains("no valid header")));
    let mut x = img.clone();
    x[REGION1_OFFSET as usize + 40] ^= 1;
    x[REGION2_OFFSET as usize + 40] ^= 1;
    assert!(
        matches!(open(x), Err(DiskError::Corrupt(m)) if m.contains("region table checksum mismatch"))
    );
    // BAT entry 0 pointing past the end.
    let mut x = img.clone();
    let far = BatEntry::new(PAYLOAD_FULLY_PRESENT, 1 << 40)
        .0
        .to_le_bytes();
    x[3 << 20..(3 << 20) + 8].copy_from_slice(&far);
    assert!(
        matches!(open(x), Err(DiskError::Corrupt(m)) if m == "BAT entry 0 points past end of file")
    );
    // Only header 1 damaged: header 2 still opens.
    let mut x = img.clone();
    x[HEADER1_OFFSET as usize + 100] ^= 1;
    open(x).unwrap();
    // Truncated.
    assert!(matches!(
        open(img[..100_000].to_vec()),
        Err(DiskError::Corrupt(_))
    ));
}

/// A store that keeps durable and volatile state apart: writes land in
/// `volatile` and reach `durable` only on flush; a crash loses the rest.
#[derive(Clone)]
struct CrashIo {
    state: alloc::rc::Rc<core::cell::RefCell<CrashState>>,
}

/// A write or truncate not yet flushed.
#[derive(Clone)]
enum PendingOp {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

struct CrashState {
    durable: Vec<u8>,
    volatile: Vec<u8>,
    /// Unflushed operations in issue order: a crash may persist any subset
    /// (real disks reorder writes between flushes).
    pending: Vec<PendingOp>,
    /// Operations (writes/set_len/flush) left before the crash; None = never.
    ops_left: Option<u64>,
    crashed: bool,
    /// The failing operation is a one-off error; the store keeps working.
    transient: bool,
}

impl CrashIo {
    fn new(bytes: Vec<u8>, ops_before_crash: Option<u64>) -> Self {
        CrashIo {
            state: alloc::rc::Rc::new(core::cell::RefCell::new(CrashState {
                durable: bytes.clone(),
                volatile: bytes,
                pending: Vec::new(),
                ops_left: ops_before_crash,
                crashed: false,
                transient: false,
            })),
        }
    }
    fn tick(&self) -> Result<(), IoError> {
        let mut s = self.state.borrow_mut();
        if s.crashed {
            return Err(IoError::Host {
                op: "io",
                detail: "crashed".into(),
            });
        }
        if let Some(n) = s.ops_left {
            if n == 0 && s.transient {
                s.ops_left = None;
                return Err(IoError::Host {
                    op: "io",
                    detail: "transient failure".into(),
                });
            }
            if n == 0 {
                s.crashed = true;
                return Err(IoError::Host {
                    op: "io",
                    detail: "crashed".into(),
                });
            }
            s.ops_left = Some(n - 1);
        }
        Ok(())
    }
    /// The durable bytes after a crash that lost every unflushed operation.
    fn durable(&self) -> Vec<u8> {
        self.state.borrow().durable.clone()
    }
    /// The durable bytes after a crash that persisted the unflushed
    /// operations `keep` selects (by issue index), in issue order.
    fn durable_with(&self, keep: impl Fn(usize) -> bool) -> Vec<u8> {
        let s = self.state.borrow();
        let mut m = MemIo::from_vec(s.durable.clone());
        for (i, op) in s.pending.iter().enumerate() {
            if keep(i) {
                match op {
                    PendingOp::Write(o, d) => m.write_at(*o, d).unwrap(),
                    PendingOp::SetLen(l) => m.set_len(*l).unwrap(),
                }
            }
        }
        m.into_vec()
    }
}

impl BlockIo for CrashIo {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let s = self.state.borrow();
        if s.crashed {
            return Err(IoError::Host {
                op: "read",
                detail: "crashed".into(),
            });
        }
        let range = usize::try_from(offset)
            .ok()
            .and_then(|a| Some(a..a.checked_add(buf.len())?))
            .filter(|r| r.end <= s.volatile.len());
        match range {
            Some(r) => {
                buf.copy_from_slice(&s.volatile[r]);
                Ok(())
            }
            None => Err(IoError::OutOfRange {
                offset,
                len_bytes: buf.len() as u64,
                store_len: s.volatile.len() as u64,
            }),
        }
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.tick()?;
        let mut s = self.state.borrow_mut();
        let mut m = MemIo::from_vec(core::mem::take(&mut s.volatile));
        let r = m.write_at(offset, data);
        s.volatile = m.into_vec();
        if r.is_ok() {
            s.pending.push(PendingOp::Write(offset, data.to_vec()));
        }
        r
    }
    fn flush(&mut self) -> Result<(), IoError> {
        self.tick()?;
        let mut s = self.state.borrow_mut();
        s.durable = s.volatile.clone();
        s.pending.clear();
        Ok(())
    }
    fn len(&self) -> Result<u64, IoError> {
        Ok(self.state.borrow().volatile.len() as u64)
    }
    fn set_len(&mut self, len: u64) -> Result<(), IoError> {
        self.tick()?;
        let mut s = self.state.borrow_mut();
        s.volatile.resize(len as usize, 0);
        s.pending.push(PendingOp::SetLen(len));
        Ok(())
    }
}

/// Crash at every possible operation during a write sequence; after each,
/// the durable image must open cleanly, every write that was followed by a
/// completed flush must read back, and replay must be idempotent.
#[test]
fn crash_at_every_point_keeps_flushed_writes() {
    let mut base = new_disk(16 << 20, 1 << 20, 512);
    base.write(0, &[0xEEu8; 512]).unwrap();
    let base_img = bytes_of(&mut base);
    // (offset, byte, len): allocations, in-place writes, multi-block writes.
    let plan: [(u64, u8, usize); 5] = [
        (0, 1, 512),
        (3 << 20, 2, 4096),
        ((5 << 20) - 512, 3, 2048),
        (3 << 20, 4, 512),
        (9 << 20, 5, 512),
    ];
    let mut point = 0u64;
    loop {
        let io = CrashIo::new(base_img.clone(), Some(point));
        let probe = io.clone();
        let mut flushed: Vec<(u64, u8, usize)> = Vec::new();
        // The write whose flush did not complete may or may not persist.
        let mut inflight: Option<(u64, u8, usize)> = None;
        let mut crashed = false;
        match Vhdx::open(io, OpenOptions::read_write(point + 100)) {
            Err(_) => crashed = true,
            Ok(mut d) => {
                for &(o, b, l) in &plan {
                    inflight = Some((o, b, l));
                    if d.write(o, &vec![b; l]).is_err() || d.flush().is_err() {
                        crashed = true;
                        break;
                    }
                    inflight = None;
                    flushed.push((o, b, l));
                }
                if !crashed && d.close().is_err() {
                    crashed = true;
                }
                core::mem::forget(d);
            }
        }
        for (variant, img) in [
            probe.durable(),
            probe.durable_with(|i| i % 2 == 0),
            probe.durable_with(|i| i % 2 == 1),
        ]
        .into_iter()
        .enumerate()
        {
            let point = (point, variant);
            // Reopen twice read-write (idempotent replay), then verify.
            let mut img2 = img.clone();
            for round in 0..2 {
                let mut d = Vhdx::open(
                    MemIo::from_vec(img2.clone()),
                    OpenOptions::read_write(round),
                )
                .unwrap_or_else(|e| panic!("crash point {point:?}: reopen failed: {e}"));
                d.close().unwrap();
                img2 = d.io().as_slice().to_vec();
            }
            let mut d = Vhdx::open(MemIo::from_vec(img2), OpenOptions::read_only()).unwrap();
            let expect = flushed.clone();
            // Later writes overwrite earlier ones: check sector by sector.
            let mut model: alloc::collections::BTreeMap<u64, u8> =
                alloc::collections::BTreeMap::new();
            model.insert(0, 0xEE);
            for (o, b, l) in expect {
                for s in 0..(l as u64 / 512) {
                    model.insert(o + s * 512, b);
                }
            }
            for (&o, &b) in &model {
                let mut buf = [0u8; 512];
                d.read(o, &mut buf).unwrap();
                let newer = inflight
                    .filter(|&(io, _, il)| o >= io && o < io + il as u64)
                    .map(|(_, ib, _)| ib);
                assert!(
                    buf.iter().all(|&x| x == b)
                        || newer.is_some_and(|n| buf.iter().all(|&x| x == n)),
                    "crash point {point:?}: sector at {o} lost its flushed data"
                );
            }
        }
        if !crashed {
            break;
        }
        point += 1;
        assert!(point < 500, "crash loop did not terminate");
    }
    // The plan crosses allocations, in-place writes and header updates.
    assert!(point > 30, "only {point} crash points exercised");
    {}
}

#[test]
fn rejects_bad_create_params() {
    let mut p = CreateParams::dynamic(1 << 20);
    p.block_size = 3 << 20;
    assert!(matches!(create(MemIo::new(), &p), Err(DiskError::Open(_))));
    let mut p = CreateParams::dynamic(1000);
    p.block_size = 1 << 20;
    assert!(matches!(create(MemIo::new(), &p), Err(DiskError::Open(_))));
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Write { sector: u64, count: u64, byte: u8 },
        Read { sector: u64, count: u64 },
        Reopen,
    }

    fn op(max_sectors: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..max_sectors, 1u64..64, any::<u8>()).prop_map(move |(s, c, b)| Op::Write {
                sector: s,
                count: c.min(max_sectors - s),
                byte: b
            }),
            3 => (0..max_sectors, 1u64..64).prop_map(move |(s, c)| Op::Read {
                sector: s,
                count: c.min(max_sectors - s)
            }),
            1 => Just(Op::Reopen),
        ]
    }

    /// Runs a read or write `o` on `d` and the flat `model`; a read must
    /// match it.
    fn run_io(d: &mut Vhdx<MemIo>, model: &mut [u8], o: &Op, ls: u32) -> Result<(), TestCaseError> {
        let max = model.len() as u64 / u64::from(ls);
        let (Op::Write { sector, count, .. } | Op::Read { sector, count }) = *o else {
            return Ok(());
        };
        let s = sector % max;
        let c = count.min(max - s).max(1);
        let off = s * u64::from(ls);
        let range = off as usize..(off + c * u64::from(ls)) as usize;
        if let Op::Write { byte, .. } = *o {
            d.write(off, &vec![byte; range.len()]).unwrap();
            model[range].fill(byte);
        } else {
            let mut b = vec![0u8; range.len()];
            d.read(off, &mut b).unwrap();
            prop_assert_eq!(&b[..], &model[range]);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// Reads always match a flat byte-array model; the BAT never points two
        /// blocks at the same place and allocation stays 1 MiB aligned.
        #[test]
        fn matches_flat_model(ls in prop_oneof![Just(512u32), Just(4096u32)],
                              ops in proptest::collection::vec(op(6 << 11), 1..40)) {
            let size = 6u64 << 20;
            let mut d = new_disk(size, 1 << 20, ls);
            let mut model = vec![0u8; size as usize];
            for o in ops {
                match o {
                    Op::Write { .. } | Op::Read { .. } => run_io(&mut d, &mut model, &o, ls)?,
                    Op::Reopen => {
                        let img = bytes_of(&mut d);
                        d = Vhdx::open(MemIo::from_vec(img), OpenOptions::read_write(9)).unwrap();
                    }
                }
            }
            let img = bytes_of(&mut d);
            prop_assert_eq!(img.len() as u64 % MIB, 0);
            let mut r = Vhdx::open(MemIo::from_vec(img), OpenOptions::read_only()).unwrap();
            let mut all = vec![0u8; size as usize];
            r.read(0, &mut all).unwrap();
            prop_assert!(all == model);
        }

        /// A differencing child over a parent with data: reads match the
        /// parent overlaid with the child's writes (sector-granular
        /// copy-on-write through the sector bitmap), across reopen, and a
        /// merge leaves the parent equal to the model.
        #[test]
        fn differencing_matches_overlay_model(ls in prop_oneof![Just(512u32), Just(4096u32)],
                                              child_block in prop_oneof![Just(1u32 << 20), Just(2u32 << 20)],
                                              ops in proptest::collection::vec(op(6 << 11), 1..30)) {
            let size = 6u64 << 20;
            let mut parent = new_disk(size, 1 << 20, ls);
            let mut model = vec![0u8; size as usize];
            for (i, chunk) in model.chunks_mut(1 << 20).enumerate().step_by(2) {
                chunk.fill(0x10 + i as u8);
                parent.write((i as u64) << 20, chunk).unwrap();
            }
            let pimg = bytes_of(&mut parent);
            let p_ro = Vhdx::open(MemIo::from_vec(pimg.clone()), OpenOptions::read_only()).unwrap();
            let mut cp = CreateParams::dynamic(0);
            cp.block_size = child_block;
            cp.parent = Some(ParentSpec {
                data_write_guid: p_ro.header().data_write_guid,
                relative_path: Some("p.vhdx".into()),
                absolute_path: None,
                virtual_size: size,
                logical_sector_size: ls,
                physical_sector_size: 4096,
                disk_id: p_ro.disk_id(),
            });
            let mut child = create(MemIo::new(), &cp).unwrap();
            child.attach_parent(p_ro).unwrap();
            for o in ops {
                match o {
                    Op::Write { .. } | Op::Read { .. } => run_io(&mut child, &mut model, &o, ls)?,
                    Op::Reopen => {
                        let img = bytes_of(&mut child);
                        let p = child.take_parent().unwrap();
                        child = Vhdx::open(MemIo::from_vec(img), OpenOptions::read_write(4)).unwrap();
                        child.attach_parent(p).unwrap();
                    }
                }
            }
            let mut all = vec![0u8; size as usize];
            child.read(0, &mut all).unwrap();
            prop_assert!(all == model);
            // The parent file never changed.
            let p = child.take_parent().unwrap();
            prop_assert!(p.io().as_slice() == &pimg[..]);
            drop(p);
            let p_rw = Vhdx::open(MemIo::from_vec(pimg), OpenOptions::read_write(8)).unwrap();
            child.attach_parent(p_rw).unwrap();
            child.merge_into_parent().unwrap();
            let mut merged = child.take_parent().unwrap();
            merged.read(0, &mut all).unwrap();
            prop_assert!(all == model);
        }
    }
}

/// A crash at any point of a log replay leaves a file whose next replay gives
/// the same disk contents: replay is idempotent.
#[test]
fn crash_during_replay_is_recovered_by_replaying_again() {
    let mut d = new_disk(16 << 20, 1 << 20, 512);
    d.write(0, &[1u8; 512]).unwrap();
    d.write(3 << 20, &[2u8; 4096]).unwrap();
    d.debug_stop_before_apply();
    d.write(5 << 20, &[7u8; 1024]).unwrap();
    assert!(d.flush().is_err());
    let img = d.io().as_slice().to_vec();
    drop(d);
    let read_all = |bytes: Vec<u8>| {
        let mut d = Vhdx::open(MemIo::from_vec(bytes), OpenOptions::read_write(1)).unwrap();
        let mut all = vec![0u8; 16 << 20];
        d.read(0, &mut all).unwrap();
        d.close().unwrap();
        (all, d.io().as_slice().to_vec())
    };
    let (reference, replayed) = read_all(img.clone());
    assert_eq!(&reference[5 << 20..(5 << 20) + 1024], &[7u8; 1024]);
    // Replaying an already replayed file changes nothing it shows.
    assert_eq!(read_all(replayed).0, reference);
    let mut point = 0u64;
    loop {
        let io = CrashIo::new(img.clone(), Some(point));
        let probe = io.clone();
        let finished = match Vhdx::open(io, OpenOptions::read_write(point)) {
            Ok(mut d) => {
                let ok = d.close().is_ok();
                core::mem::forget(d);
                ok
            }
            Err(_) => false,
        };
        let (after, _) = read_all(probe.durable());
        assert!(after == reference, "crash point {point}: contents differ");
        if finished {
            break;
        }
        point += 1;
        assert!(point < 200);
    }
}

/// A replay that fails half way (the store dies) must leave the log
/// replayable: dropping the half-opened disk may not clear LogGuid.
#[test]
fn failed_replay_keeps_the_log() {
    let mut d = new_disk(16 << 20, 1 << 20, 512);
    d.write(0, &[1u8; 512]).unwrap();
    d.debug_stop_before_apply();
    d.write(5 << 20, &[7u8; 1024]).unwrap();
    assert!(d.flush().is_err());
    let img = d.io().as_slice().to_vec();
    drop(d);
    for point in 0..12 {
        let io = CrashIo::new(img.clone(), Some(point / 2));
        // Odd points: a one-off error, after which the store works again (so
        // a careless drop could still rewrite the header).
        io.state.borrow_mut().transient = point % 2 == 1;
        let probe = io.clone();
        if Vhdx::open(io, OpenOptions::read_write(1)).is_ok() {
            break;
        }
        let mut probe = probe;
        probe.flush().unwrap_or(());
        // Whatever the crash point, the durable file still replays to the data.
        let mut r = Vhdx::open(MemIo::from_vec(probe.durable()), OpenOptions::read_only()).unwrap();
        let mut b = [0u8; 1024];
        r.read(5 << 20, &mut b).unwrap();
        assert!(b == [7u8; 1024], "crash point {point}: replayed data lost");
    }
}

/// Each commit takes a fresh LogGuid before it writes an entry (so entries
/// of an earlier commit or session never join its sequence) and clears it
/// once applied: a crash inside a commit leaves that commit's LogGuid,
/// the next commit after the replay uses another one.
#[test]
fn each_commit_takes_a_fresh_log_guid() {
    let mut d = new_disk(8 << 20, 1 << 20, 512);
    d.write(0, &[1u8; 512]).unwrap();
    d.debug_stop_before_apply();
    assert!(d.flush().is_err(), "crashed inside the commit");
    let session1 = d.header().log_guid;
    assert!(!session1.is_zero());
    let img = d.io().as_slice().to_vec();
    core::mem::forget(d);
    let mut d = Vhdx::open(MemIo::from_vec(img), OpenOptions::read_write(2)).unwrap();
    assert!(d.header().log_guid.is_zero(), "replayed and cleared");
    d.write(2 << 20, &[2u8; 512]).unwrap();
    d.debug_stop_before_apply();
    assert!(d.flush().is_err());
    assert_ne!(d.header().log_guid, session1);
    assert!(!d.header().log_guid.is_zero());
    let img = d.io().as_slice().to_vec();
    core::mem::forget(d);
    let mut r = Vhdx::open(MemIo::from_vec(img), OpenOptions::read_only()).unwrap();
    let mut b = [0u8; 512];
    r.read(0, &mut b).unwrap();
    assert_eq!(b, [1u8; 512]);
    r.read(2 << 20, &mut b).unwrap();
    assert_eq!(b, [2u8; 512]);
}

/// A disk in use is clean after every flush: its file, copied without a
/// close (as a host tool reads a running VM's disk), has no log to replay
/// and holds every flushed write, new blocks included.
#[test]
fn a_flushed_disk_in_use_needs_no_replay() {
    let mut d = new_disk(16 << 20, 1 << 20, 512);
    for (i, at) in [0u64, 5 << 20, 9 << 20].into_iter().enumerate() {
        d.write(at, &[i as u8 + 1; 4096]).unwrap();
        d.flush().unwrap();
        assert!(d.header().log_guid.is_zero(), "after flush {i}");
        let img = d.io().as_slice().to_vec();
        let mut r = Vhdx::open(MemIo::from_vec(img), OpenOptions::read_only()).unwrap();
        let mut b = [0u8; 4096];
        r.read(at, &mut b).unwrap();
        assert_eq!(b, [i as u8 + 1; 4096]);
        r.verify().unwrap();
    }
}

/// Counts flushes; everything else goes to a MemIo.
struct CountIo {
    inner: MemIo,
    flushes: alloc::rc::Rc<core::cell::Cell<u32>>,
}

impl BlockIo for CountIo {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.inner.write_at(offset, data)
    }
    fn flush(&mut self) -> Result<(), IoError> {
        self.flushes.set(self.flushes.get() + 1);
        self.inner.flush()
    }
    fn len(&self) -> Result<u64, IoError> {
        self.inner.len()
    }
    fn set_len(&mut self, len: u64) -> Result<(), IoError> {
        self.inner.set_len(len)
    }
}

/// Rewriting sectors a differencing child already holds goes in place with
/// no log entry (its flush is one store flush); a new sector in the same
/// block logs its bitmap on flush.
#[test]
fn rewrite_of_present_sectors_needs_no_log_entry() {
    let (mut child, _) = diff_pair(512);
    child.write(4096, &[1u8; 512]).unwrap();
    let img = bytes_of(&mut child);
    let parent = child.take_parent().unwrap();
    let flushes = alloc::rc::Rc::new(core::cell::Cell::new(0));
    let io = CountIo {
        inner: MemIo::from_vec(img),
        flushes: flushes.clone(),
    };
    let mut c = Vhdx::open(io, OpenOptions::read_write(3)).unwrap();
    let pio = CountIo {
        inner: MemIo::from_vec(parent.io().as_slice().to_vec()),
        flushes: alloc::rc::Rc::new(core::cell::Cell::new(0)),
    };
    c.attach_parent(Vhdx::open(pio, OpenOptions::read_only()).unwrap())
        .unwrap();
    c.write(4096, &[2u8; 512]).unwrap(); // first write: header updates flush
    c.flush().unwrap();
    let before = flushes.get();
    c.write(4096, &[3u8; 512]).unwrap();
    c.flush().unwrap();
    assert_eq!(
        flushes.get(),
        before + 1,
        "rewrite of a present sector logged"
    );
    c.write(8192, &[4u8; 512]).unwrap();
    c.flush().unwrap();
    assert!(
        flushes.get() > before + 2,
        "new sector did not log its bitmap"
    );
    let mut b = [0u8; 512];
    c.read(4096, &mut b).unwrap();
    assert_eq!(b, [3u8; 512]);
}

#[test]
fn parent_paths_update_through_the_log() {
    let (mut child, _) = diff_pair(512);
    let before = child.parent_locator().unwrap().clone();
    let data_guid = child.header().data_write_guid;
    child
        .update_parent_paths(
            Some("..\\new\\base.vhdx".into()),
            Some("\\\\?\\x\\base.vhdx".into()),
        )
        .unwrap();
    let img = bytes_of(&mut child);
    let r = Vhdx::open(MemIo::from_vec(img), OpenOptions::read_only()).unwrap();
    let pl = r.parent_locator().unwrap();
    assert_eq!(pl.get("relative_path"), Some("..\\new\\base.vhdx"));
    assert_eq!(pl.get("absolute_win32_path"), Some("\\\\?\\x\\base.vhdx"));
    assert_eq!(pl.get("parent_linkage"), before.get("parent_linkage"));
    // Not user-visible: DataWriteGuid unchanged by a locator update alone.
    assert_eq!(r.header().data_write_guid, data_guid);
}

mod prop_crash {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

        /// Random writes and flushes, then a crash at a random store
        /// operation: the image reopens cleanly, every sector holds a value
        /// it could hold (its value as of the last completed flush, or one
        /// written after it), and nothing else.
        #[test]
        fn random_crash_leaves_only_possible_contents(
            ops in proptest::collection::vec((0u64..48, 1u64..12, 1u8..255, any::<bool>()), 1..16),
            crash_at in 0u64..400,
            subset in any::<u64>(),
        ) {
            let sectors = (12u64 << 20) / 512;
            let base = {
                let mut d = new_disk(12 << 20, 1 << 20, 512);
                bytes_of(&mut d)
            };
            let io = CrashIo::new(base, Some(crash_at));
            let probe = io.clone();
            // Possible values per touched sector; untouched sectors are zero.
            let mut possible: alloc::collections::BTreeMap<u64, Vec<u8>> = Default::default();
            if let Ok(mut d) = Vhdx::open(io, OpenOptions::read_write(crash_at)) {
                for (slot, count, byte, flush) in ops {
                    // Spread over blocks: slot picks a 256 KiB region.
                    let first = (slot * 512) % (sectors - count);
                    for s in first..first + count {
                        possible.entry(s).or_insert_with(|| vec![0]).push(byte);
                    }
                    if d.write(first * 512, &vec![byte; (count * 512) as usize]).is_err() {
                        break;
                    }
                    if flush {
                        if d.flush().is_err() {
                            break;
                        }
                        // Durable now: only the last value remains possible.
                        for s in first..first + count {
                            possible.insert(s, vec![byte]);
                        }
                        for v in possible.values_mut() {
                            let last = *v.last().unwrap_or(&0);
                            *v = vec![last];
                        }
                    }
                }
                let _ = d.close();
                core::mem::forget(d);
            }
            // Any subset of the unflushed operations may have persisted.
            let img = probe.durable_with(|i| subset.rotate_left(i as u32 % 64) & 1 == 1);
            let mut d = Vhdx::open(MemIo::from_vec(img), OpenOptions::read_write(7))
                .map_err(|e| TestCaseError::fail(format!("reopen: {e}")))?;
            let mut all = vec![0u8; 12 << 20];
            d.read(0, &mut all).unwrap();
            for s in 0..sectors {
                let sec = &all[(s * 512) as usize..((s + 1) * 512) as usize];
                let v = sec[0];
                prop_assert!(sec.iter().all(|&x| x == v), "sector {} torn", s);
                let ok = possible.get(&s).map_or(v == 0, |p| p.contains(&v));
                prop_assert!(ok, "sector {} holds {} not in {:?}", s, v, possible.get(&s));
            }
        }
    }
}

/// A zero-state block whose file space still holds old bytes is reused by a
/// write. Whatever subset of unflushed writes a crash keeps, the block reads
/// as zeros or the new data, never the old bytes: the zero fill and the data
/// are durable before the BAT entry that exposes the space.
#[test]
fn reused_space_never_leaks_old_bytes_after_a_crash() {
    let mut p = CreateParams::dynamic(4 << 20);
    p.block_size = 1 << 20;
    p.fixed = true;
    let mut d = create(MemIo::new(), &p).unwrap();
    d.write(0, &vec![0x99u8; 1 << 20]).unwrap();
    let mut img = bytes_of(&mut d);
    // Turn block 0 into PAYLOAD_BLOCK_ZERO, keeping its (stale) file space.
    let bat = 3 << 20;
    let e = u64::from_le_bytes(img[bat..bat + 8].try_into().unwrap());
    img[bat..bat + 8].copy_from_slice(&((e & !7) | u64::from(PAYLOAD_ZERO)).to_le_bytes());
    let mut point = 0u64;
    loop {
        let io = CrashIo::new(img.clone(), Some(point));
        let probe = io.clone();
        let mut done = false;
        if let Ok(mut d) = Vhdx::open(io, OpenOptions::read_write(point)) {
            let mut probe_read = [0u8; 512];
            d.read(4096, &mut probe_read).unwrap();
            assert_eq!(probe_read, [0u8; 512], "zero block reads zeros");
            done = d.write(8192, &[0x42u8; 1024]).is_ok() && d.flush().is_ok() && d.close().is_ok();
            core::mem::forget(d);
        }
        for keep in [0u64, 1, 2] {
            let img2 = probe.durable_with(|i| match keep {
                0 => false,
                1 => i % 2 == 0,
                _ => i % 2 == 1,
            });
            let mut r = Vhdx::open(MemIo::from_vec(img2), OpenOptions::read_only())
                .unwrap_or_else(|e| panic!("point {point}/{keep}: {e}"));
            let mut all = vec![0u8; 1 << 20];
            r.read(0, &mut all).unwrap();
            assert!(
                all.iter().all(|&x| x == 0 || x == 0x42),
                "point {point}/{keep}: old bytes visible"
            );
            if done && keep == 0 {
                assert!(all[8192..9216].iter().all(|&x| x == 0x42));
            }
        }
        if done {
            break;
        }
        point += 1;
        assert!(point < 200);
    }
}

/// Allocations spread over many BAT pages are committed in batches even
/// without a flush, so pending metadata stays bounded.
#[test]
fn many_pending_pages_commit_in_batches() {
    let stride = 512u64 << 20; // one BAT page of 1 MiB blocks
    let mut d = new_disk(80 * stride, 1 << 20, 512);
    for i in 0..80u64 {
        d.write(i * stride, &[i as u8 + 1; 512]).unwrap();
    }
    // No flush, no close: only what was committed is in the file's BAT.
    let img = d.io().as_slice().to_vec();
    core::mem::forget(d);
    let mut r = Vhdx::open(MemIo::from_vec(img), OpenOptions::read_only()).unwrap();
    let mut visible = 0;
    for i in 0..80u64 {
        let mut b = [0u8; 512];
        r.read(i * stride, &mut b).unwrap();
        if b == [i as u8 + 1; 512] {
            visible += 1;
        } else {
            assert_eq!(b, [0u8; 512], "block {i}: neither old nor new");
        }
    }
    assert!(visible >= 64, "only {visible} allocations committed");
    assert!(visible < 80, "everything committed without a flush");
}

/// Zero-state entries that keep a file offset are reused only when their
/// space is free: two naming the same space share it out once, and one
/// whose space holds another block's data allocates anew.
#[test]
fn zero_state_space_is_reused_once_and_never_over_live_data() {
    let mb = 1u64 << 20;
    let mut p = CreateParams::dynamic(4 * mb);
    p.block_size = mb as u32;
    p.fixed = true;
    let mut d = create(MemIo::new(), &p).unwrap();
    d.write(3 * mb, &vec![0x33u8; mb as usize]).unwrap();
    let mut img = bytes_of(&mut d);
    let bat = 3usize << 20;
    let entry = |img: &[u8], b: usize| {
        BatEntry(u64::from_le_bytes(
            img[bat + 8 * b..bat + 8 * b + 8].try_into().unwrap(),
        ))
    };
    let (b0, b3) = (entry(&img, 0), entry(&img, 3));
    let set = |img: &mut [u8], b: usize, e: BatEntry| {
        img[bat + 8 * b..bat + 8 * b + 8].copy_from_slice(&e.0.to_le_bytes())
    };
    set(&mut img, 0, BatEntry::new(PAYLOAD_ZERO, b0.file_offset()));
    set(&mut img, 1, BatEntry::new(PAYLOAD_ZERO, b0.file_offset()));
    set(
        &mut img,
        2,
        BatEntry::new(PAYLOAD_UNMAPPED, b3.file_offset()),
    );
    let len = img.len() as u64;
    let mut d = Vhdx::open(MemIo::from_vec(img), OpenOptions::read_write(5)).unwrap();
    for b in 0..3u64 {
        d.write(b * mb + 4096, &[b as u8 + 1; 512]).unwrap();
    }
    d.flush().unwrap();
    assert_eq!(
        d.io().len().unwrap(),
        len + 2 * mb,
        "one block reused its space, two were allocated at the end"
    );
    let mut all = vec![0u8; 4 * mb as usize];
    d.read(0, &mut all).unwrap();
    for b in 0..3usize {
        let blk = &all[b * mb as usize..(b + 1) * mb as usize];
        assert!(
            blk[4096..4608].iter().all(|&x| x == b as u8 + 1),
            "block {b}"
        );
        assert!(
            blk[..4096].iter().chain(&blk[4608..]).all(|&x| x == 0),
            "block {b}"
        );
    }
    assert!(
        all[3 * mb as usize..].iter().all(|&x| x == 0x33),
        "block 3 kept"
    );
    let img = bytes_of(&mut d);
    let e = |b| entry(&img, b);
    assert_eq!(e(0).file_offset(), b0.file_offset());
    assert!(e(1).file_offset() >= len && e(2).file_offset() >= len);
}

/// A file on a file system like tmpfs: growing the file is free (a hole),
/// writing into a 4 KiB page never written before takes one page of the
/// store's space; a write that runs out writes the pages that fit, then
/// fails with `IoError::NoSpace`. `pages_left` is shared: the test frees
/// space by raising it.
struct SparseIo {
    inner: MemIo,
    written: alloc::collections::BTreeSet<u64>,
    pages_left: alloc::rc::Rc<core::cell::Cell<u64>>,
}

impl BlockIo for SparseIo {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        let end = offset + data.len() as u64;
        let mut at = offset;
        while at < end {
            let page = at / 4096;
            let next = ((page + 1) * 4096).min(end);
            if !self.written.contains(&page) {
                if self.pages_left.get() == 0 {
                    return Err(IoError::NoSpace {
                        op: "write",
                        detail: "sparse test file: no pages left".into(),
                    });
                }
                self.pages_left.set(self.pages_left.get() - 1);
                self.written.insert(page);
            }
            let from = (at - offset) as usize;
            self.inner
                .write_at(at, &data[from..from + (next - at) as usize])?;
            at = next;
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }
    fn len(&self) -> Result<u64, IoError> {
        self.inner.len()
    }
    fn set_len(&mut self, len: u64) -> Result<(), IoError> {
        self.written.retain(|&p| p * 4096 < len);
        self.inner.set_len(len)
    }
}

/// A store that fills under a dynamic disk (payload blocks, sector
/// bitmaps, log entries all hit it, with a few pages freed at a time):
/// every failed write or flush is `is_no_space`, leaves the disk usable,
/// and succeeds when tried again after space is freed; at every failure the
/// file as it is on the store opens (log replayed) with every flushed
/// write in it; at the end it verifies, holds exactly what was written,
/// and has no block allocated twice (no space leaked by the retries).
#[test]
fn a_full_store_fails_writes_retryably_and_loses_nothing() {
    for (grant, block) in [(5u64, 1u32 << 20), (61, 2 << 20)] {
        let size = 12u64 << 20;
        let pages_left = alloc::rc::Rc::new(core::cell::Cell::new(u64::MAX));
        let io = SparseIo {
            inner: MemIo::new(),
            written: Default::default(),
            pages_left: pages_left.clone(),
        };
        let mut p = CreateParams::dynamic(size);
        p.block_size = block;
        p.guid_seed = 9;
        let mut d = create(io, &p).unwrap();
        // The store is full from here on, but for what the test frees.
        pages_left.set(0);
        let mut model = vec![0u8; size as usize];
        let mut flushed = model.clone();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut failures = 0u32;
        for op in 0..120u32 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let sectors = 1 + rng % 24;
            let at = (rng >> 20) % (size / 512 - sectors) * 512;
            let data: Vec<u8> = (0..sectors * 512)
                .map(|i| (i as u32 ^ op.wrapping_mul(77)) as u8)
                .collect();
            let flush = op % 5 == 4;
            let mut tries = 0;
            loop {
                let r = if flush { d.flush() } else { d.write(at, &data) };
                match r {
                    Ok(()) => break,
                    Err(e) => {
                        assert!(e.is_no_space(), "op {op}: {e}");
                        failures += 1;
                        pages_left.set(grant);
                        tries += 1;
                        assert!(tries < 10_000, "op {op} never succeeds");
                        if failures % 7 != 1 {
                            continue;
                        }
                        // What is on the store now holds every flushed write.
                        let img = d.io().inner.as_slice().to_vec();
                        let mut r =
                            Vhdx::open(MemIo::from_vec(img), OpenOptions::read_only()).unwrap();
                        let mut back = vec![0u8; size as usize];
                        r.read(0, &mut back).unwrap();
                        for (i, (b, f)) in back.iter().zip(&flushed).enumerate() {
                            // Acknowledged but unflushed bytes may show, and
                            // so may the failed write's own (not acknowledged).
                            let failed_write = (!flush
                                && (at as usize..at as usize + data.len()).contains(&i))
                            .then(|| data[i - at as usize]);
                            if b != f && *b != model[i] && Some(*b) != failed_write {
                                panic!("op {op}: byte {i} is {b}, flushed {f}");
                            }
                        }
                    }
                }
            }
            if flush {
                flushed.copy_from_slice(&model);
            } else {
                model[at as usize..][..data.len()].copy_from_slice(&data);
            }
        }
        assert!(
            failures > 3,
            "grant {grant}: the store filled {failures} times"
        );
        pages_left.set(u64::MAX);
        d.flush().unwrap();
        let mut back = vec![0u8; size as usize];
        d.read(0, &mut back).unwrap();
        assert!(back == model, "grant {grant}: contents differ");
        d.close().unwrap();
        let img = d.io().inner.as_slice().to_vec();
        let file_len = img.len() as u64;
        let mut r = Vhdx::open(MemIo::from_vec(img), OpenOptions::read_only()).unwrap();
        r.verify().unwrap();
        r.read(0, &mut back).unwrap();
        assert!(back == model, "grant {grant}: reopened contents differ");
        // Allocated blocks end the file: nothing allocated and dropped.
        let blocks = r
            .allocated_ranges()
            .unwrap()
            .iter()
            .map(|(_, l)| l)
            .sum::<u64>()
            / u64::from(block);
        let payload_start = 4 << 20;
        assert!(
            file_len <= payload_start + blocks * u64::from(block),
            "grant {grant}: file {file_len} bytes for {blocks} blocks"
        );
    }
}
