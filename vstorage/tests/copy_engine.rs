//! The offline copy drivers ([`copy_disk`] and the host's pipelined
//! variant) against memory disks: same bytes, sparse plans, cancellation,
//! and faults on either side ending in an error rather than a hang.

use vstorage::copy::{copy_disk, copy_disk_pipelined, CopyError, CopyOptions};
use vstorage::io::{MemIo, RawDisk, VirtualDisk};
use vstorage::mirror::fault::{FaultPlan, FaultyDisk};

const SIZE: u64 = 1 << 20;
const K: u64 = 1024;

fn opts(chunk: u32, skip: bool) -> CopyOptions {
    CopyOptions {
        chunk_bytes: chunk,
        skip_zero_chunks: skip,
    }
}

fn source(map: Option<Vec<(u64, u64)>>, plan: FaultPlan) -> FaultyDisk<RawDisk<MemIo>> {
    let mut d = RawDisk::create(MemIo::new(), SIZE).unwrap();
    let data: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8 | 1).collect();
    d.write(0, &data).unwrap();
    // Leave one zero quarter, to be skipped when asked.
    d.write(256 * K, &vec![0; 256 * K as usize]).unwrap();
    FaultyDisk::new(
        d,
        FaultPlan {
            allocated: map,
            ..plan
        },
    )
}

fn dest(plan: FaultPlan) -> FaultyDisk<RawDisk<MemIo>> {
    FaultyDisk::new(RawDisk::create(MemIo::new(), SIZE).unwrap(), plan)
}

fn bytes(d: &mut dyn VirtualDisk) -> Vec<u8> {
    let mut v = vec![0u8; d.virtual_size() as usize];
    d.read(0, &mut v).unwrap();
    v
}

#[test]
fn both_drivers_copy_the_plan_and_only_the_plan() {
    let map = vec![(0, 256 * K), (768 * K, 128 * K)];
    for pipelined in [false, true] {
        for chunk in [4096, 65536, 256 << 10] {
            let mut src = source(Some(map.clone()), FaultPlan::default());
            let mut dst = dest(FaultPlan::default());
            let mut last = (0, 0);
            let progress = |d, t| {
                last = (d, t);
                true
            };
            let n = if pipelined {
                copy_disk_pipelined(&mut src, &mut dst, opts(chunk, false), progress)
            } else {
                copy_disk(&mut src, &mut dst, opts(chunk, false), progress)
            }
            .unwrap();
            assert_eq!(n, 384 * K);
            assert_eq!(last, (n, n));
            let (s, d) = (bytes(&mut src), bytes(&mut dst));
            for &(o, l) in &map {
                let r = o as usize..(o + l) as usize;
                assert!(s[r.clone()] == d[r], "pipelined {pipelined} chunk {chunk}");
            }
            assert!(d[(256 * K as usize)..(768 * K as usize)]
                .iter()
                .all(|&b| b == 0));
            assert_eq!(dst.counts().flushes, 1);
        }
    }
}

#[test]
fn zero_chunks_are_skipped_only_when_asked() {
    for skip in [false, true] {
        let mut src = source(None, FaultPlan::default());
        let mut dst = dest(FaultPlan::default());
        copy_disk_pipelined(&mut src, &mut dst, opts(256 << 10, skip), |_, _| true).unwrap();
        assert!(bytes(&mut src) == bytes(&mut dst));
        assert_eq!(dst.counts().writes, if skip { 3 } else { 4 });
    }
}

#[test]
fn faults_and_cancel_end_the_copy_with_an_error() {
    for pipelined in [false, true] {
        let run = |src: &mut FaultyDisk<RawDisk<MemIo>>,
                   dst: &mut FaultyDisk<RawDisk<MemIo>>,
                   stop_after: u64| {
            let o = opts(65536, false);
            let progress = |done, _| done < stop_after;
            if pipelined {
                copy_disk_pipelined(src, dst, o, progress)
            } else {
                copy_disk(src, dst, o, progress)
            }
        };
        let mut src = source(
            None,
            FaultPlan {
                fail_read: Some(5),
                ..FaultPlan::default()
            },
        );
        let r = run(&mut src, &mut dest(FaultPlan::default()), u64::MAX);
        assert!(
            matches!(r, Err(CopyError::SourceRead { offset: 262144, .. })),
            "{r:?}"
        );

        let mut dst = dest(FaultPlan {
            fail_write: Some(7),
            ..FaultPlan::default()
        });
        let r = run(&mut source(None, FaultPlan::default()), &mut dst, u64::MAX);
        assert!(
            matches!(r, Err(CopyError::DestWrite { offset: 393216, .. })),
            "{r:?}"
        );

        let mut dst = dest(FaultPlan {
            fail_flush: Some(1),
            ..FaultPlan::default()
        });
        let r = run(&mut source(None, FaultPlan::default()), &mut dst, u64::MAX);
        assert!(matches!(r, Err(CopyError::DestFlush(_))), "{r:?}");

        let mut src = source(None, FaultPlan::default());
        let r = run(&mut src, &mut dest(FaultPlan::default()), 65536 * 3);
        assert_eq!(r, Err(CopyError::Cancelled));
        // The reader stopped soon after: at most the read-ahead beyond.
        assert!(src.counts().reads <= 3 + 3, "{:?}", src.counts());
    }
}
