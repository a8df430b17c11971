//! Fuzz harnesses shared by the cargo-fuzz targets (`vstorage/fuzz/`) and
//! the stable tests that replay their seeds and regressions
//! (`tests/fuzz_corpus.rs`). Any panic is a bug; the assertions are the
//! oracles: read-after-write, a flat model of the disk, and in-memory log
//! replay agreeing with on-disk replay.
//!
//! Inputs are small. Rather than whole files (megabytes), `open` and
//! `log_replay` inputs describe changes to valid images built once
//! ([`Templates`]), so the fuzzer spends its time past the checksums:
//!
//! - `open`: byte 0 picks a template (`% 6`; 5 means "the rest of the input
//!   is the whole file"), byte 1 bit 0 asks for checksums to be fixed after
//!   patching, then patches `[u32 LE offset][u8 len][len bytes]` (offset
//!   modulo the image length plus 64 KiB; len 0 truncates there).
//! - `io`: byte 0 picks a disk (`% 4`: dynamic, 4096-byte sectors, fixed,
//!   differencing over a parent), then operations of 4 bytes each (opcode,
//!   sector, count, fill byte) run against the disk and a flat model.
//! - `log_replay`: byte 0 bit 0 asks for log entries to be fixed up (the
//!   header's LogGuid and the entry checksum filled in at every 4 KiB-aligned
//!   "loge"); the rest is the log region's contents, on an image whose
//!   header names a log.
//!
//! Images live in a [`PageIo`]: only the 4 KiB pages that hold bytes are
//! stored, so copying a 5 MiB template costs a few dozen pages and a run
//! takes well under a millisecond.

use super::disk::{create, CreateParams, OpenOptions, ParentSpec, Vhdx};
use super::format::{checksum_with_hole, rd32, wr32, Guid, Header, MIB};
use crate::io::{BlockIo, IoError, MemIo, VirtualDisk};
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

const PAGE: u64 = 4096;

/// A sparse in-memory store: pages never written read as zeros.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageIo {
    pages: BTreeMap<u64, Vec<u8>>,
    len: u64,
    limit: u64,
}

impl PageIo {
    /// A store holding `bytes` (all-zero pages are not kept).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut io = PageIo {
            pages: BTreeMap::new(),
            len: bytes.len() as u64,
            limit: bytes.len() as u64 + (16 << 20),
        };
        for (i, page) in bytes.chunks(PAGE as usize).enumerate() {
            if page.iter().any(|&b| b != 0) {
                let mut p = page.to_vec();
                p.resize(PAGE as usize, 0);
                io.pages.insert(i as u64, p);
            }
        }
        io
    }

    /// A copy of the pages of `d`'s store (after it was closed or dropped).
    fn of(d: &Vhdx<PageIo>) -> Self {
        d.io().clone()
    }

    /// Calls `f(offset within the request, page index, offset within the
    /// page, length)` for each page piece of `[offset, offset + len)`.
    fn pieces(offset: u64, len: u64, mut f: impl FnMut(usize, u64, usize, usize)) {
        let mut cur = offset;
        let end = offset + len;
        while cur < end {
            let within = cur % PAGE;
            let n = (PAGE - within).min(end - cur);
            f(
                (cur - offset) as usize,
                cur / PAGE,
                within as usize,
                n as usize,
            );
            cur += n;
        }
    }
}

impl BlockIo for PageIo {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(IoError::OutOfRange {
                offset,
                len_bytes: buf.len() as u64,
                store_len: self.len,
            });
        }
        Self::pieces(offset, buf.len() as u64, |at, page, within, n| {
            let dst = &mut buf[at..at + n];
            match self.pages.get(&page) {
                Some(p) => dst.copy_from_slice(&p[within..within + n]),
                None => dst.fill(0),
            }
        });
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.limit)
            .ok_or(IoError::Host {
                op: "write",
                detail: String::from("past the store's limit"),
            })?;
        let pages = &mut self.pages;
        Self::pieces(offset, data.len() as u64, |at, page, within, n| {
            let src = &data[at..at + n];
            // No scan for all-zero data: an instrumented byte loop costs
            // more than the page it would save.
            let p = pages
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE as usize]);
            p[within..within + n].copy_from_slice(src);
        });
        self.len = self.len.max(end);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }

    fn len(&self) -> Result<u64, IoError> {
        Ok(self.len)
    }

    fn set_len(&mut self, len: u64) -> Result<(), IoError> {
        if len > self.limit {
            return Err(IoError::Host {
                op: "set_len",
                detail: String::from("past the store's limit"),
            });
        }
        if len < self.len {
            let first_gone = len.div_ceil(PAGE);
            self.pages.retain(|&p, _| p < first_gone);
            if let Some(p) = self.pages.get_mut(&(len / PAGE)) {
                p[(len % PAGE) as usize..].fill(0);
            }
        }
        self.len = len;
        Ok(())
    }

    fn allocate(&mut self, offset: u64, len_bytes: u64) -> Result<(), IoError> {
        let end = offset.checked_add(len_bytes).ok_or(IoError::Host {
            op: "allocate",
            detail: String::from("offset overflows"),
        })?;
        if end > self.len {
            self.set_len(end)?;
        }
        Ok(())
    }
}

/// Virtual size of every template disk: two blocks (each run copies and
/// compares whole disks, so this is what a run costs).
const SIZE: u64 = 2 * MIB;
/// Where `create` puts the log, and its length.
const LOG_OFFSET: usize = MIB as usize;
const LOG_LEN: usize = MIB as usize;
/// The LogGuid of the `log_replay` image.
const FUZZ_LOG_GUID: Guid = Guid([0x5A; 16]);

/// Valid images the harnesses start from (built once per process).
#[derive(Debug, Clone)]
pub struct Templates {
    dynamic: PageIo,
    sector4096: PageIo,
    fixed: PageIo,
    parent: PageIo,
    child: PageIo,
    pending_log: PageIo,
    /// What the `io` disks (dynamic, 4096-byte sectors, fixed,
    /// differencing over `parent`) read as, in that order.
    io_models: [Vec<u8>; 4],
}

fn params(ls: u32, fixed: bool) -> CreateParams {
    let mut p = CreateParams::dynamic(SIZE);
    p.block_size = MIB as u32;
    p.logical_sector_size = ls;
    p.fixed = fixed;
    p.guid_seed = 1;
    p
}

fn image(p: &CreateParams, writes: &[(u64, usize, u8)]) -> PageIo {
    let Ok(mut d) = create(PageIo::default().with_limit(64 << 20), p) else {
        return PageIo::default();
    };
    for &(o, l, b) in writes {
        let _ = d.write(o, &vec![b; l]);
    }
    let _ = d.close();
    PageIo::of(&d)
}

impl PageIo {
    fn with_limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }
}

impl Templates {
    /// Builds the templates (a few milliseconds).
    pub fn new() -> Self {
        let dynamic = image(&params(512, false), &[(0, 4096, 1), (MIB + 512, 512, 2)]);
        let sector4096 = image(&params(4096, false), &[(4096, 4096, 4)]);
        let fixed = image(&params(512, true), &[(512, 512, 3)]);
        let parent = dynamic.clone();
        let child = (|| {
            let p = Vhdx::open(parent.clone(), OpenOptions::read_only()).ok()?;
            let mut c = params(512, false);
            c.parent = Some(ParentSpec {
                data_write_guid: p.header().data_write_guid,
                relative_path: Some("p.vhdx".into()),
                absolute_path: Some("\\\\?\\tmp\\p.vhdx".into()),
                virtual_size: SIZE,
                logical_sector_size: 512,
                physical_sector_size: 4096,
                disk_id: p.disk_id(),
            });
            let mut child = create(PageIo::default().with_limit(64 << 20), &c).ok()?;
            child.attach_parent(p).ok()?;
            child.write(1024, &[5u8; 1024]).ok()?;
            child.close().ok()?;
            Some(PageIo::of(&child))
        })()
        .unwrap_or_default();
        let pending_log = (|| {
            let mut d = create(PageIo::default().with_limit(64 << 20), &params(512, false)).ok()?;
            d.write(0, &[6u8; 512]).ok()?;
            d.debug_stop_before_apply();
            d.write(MIB, &[7u8; 512]).ok()?;
            let _ = d.flush();
            Some(PageIo::of(&d))
        })()
        .unwrap_or_default();
        let mut t = Templates {
            dynamic,
            sector4096,
            fixed,
            parent,
            child,
            pending_log,
            io_models: Default::default(),
        };
        for sel in 0..4u8 {
            let (io, differencing) = t.io_disk(sel);
            let model = (|| {
                let mut d = Vhdx::open(io.clone(), OpenOptions::read_only()).ok()?;
                if differencing {
                    d.attach_parent(Vhdx::open(t.parent.clone(), OpenOptions::read_only()).ok()?)
                        .ok()?;
                }
                let mut m = vec![0u8; SIZE as usize];
                d.read(0, &mut m).ok()?;
                Some(m)
            })();
            t.io_models[usize::from(sel)] = model.unwrap_or_default();
        }
        t
    }

    /// The disk `io` input byte 0 picks, and whether it is differencing.
    fn io_disk(&self, sel: u8) -> (&PageIo, bool) {
        match sel % 4 {
            0 => (&self.dynamic, false),
            1 => (&self.sector4096, false),
            2 => (&self.fixed, false),
            _ => (&self.child, true),
        }
    }
}

impl Templates {
    /// Each template as whole-file bytes, named (for whole-file mutation).
    pub fn images(&self) -> Vec<(&'static str, Vec<u8>)> {
        [
            ("dynamic", &self.dynamic),
            ("sector4096", &self.sector4096),
            ("fixed", &self.fixed),
            ("differencing", &self.child),
            ("pending-log", &self.pending_log),
        ]
        .into_iter()
        .map(|(name, io)| {
            let mut b = vec![0u8; io.len as usize];
            // Cannot fail: the whole length is in range.
            let _ = io.read_at(0, &mut b);
            (name, b)
        })
        .collect()
    }
}

impl Default for Templates {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads `len` bytes at `off` of `io`, runs `f` on them and writes them
/// back; nothing when the range is not all in the store.
fn edit(io: &mut PageIo, off: u64, len: usize, f: impl FnOnce(&mut [u8])) {
    let mut b = vec![0u8; len];
    if io.read_at(off, &mut b).is_ok() {
        f(&mut b);
        let _ = io.write_at(off, &b);
    }
}

/// Recomputes the checksums of both headers, both region tables and every
/// 4 KiB-aligned log entry of `io` (our layout: log at 1 MiB).
fn fix_checksums(io: &mut PageIo) {
    for (off, len) in [
        (64u64 << 10, 4096usize),
        (128 << 10, 4096),
        (192 << 10, 65536),
        (256 << 10, 65536),
    ] {
        edit(io, off, len, |s| {
            let c = checksum_with_hole(s, 4);
            wr32(s, 4, c);
        });
    }
    // The log up to its last page that holds bytes (the rest is zeros).
    let (first, last) = (
        LOG_OFFSET as u64 / PAGE,
        (LOG_OFFSET + LOG_LEN) as u64 / PAGE,
    );
    if let Some((&p, _)) = io.pages.range(first..last).next_back() {
        let len = ((p + 1) * PAGE) as usize - LOG_OFFSET;
        edit(io, LOG_OFFSET as u64, len, |log| fix_log_entries(log, None));
    }
}

/// Fills in the checksum (and, with `guid`, the LogGuid) of every
/// 4 KiB-aligned entry in `log` whose length fits.
fn fix_log_entries(log: &mut [u8], guid: Option<Guid>) {
    let mut pos = 0usize;
    while pos + 64 <= log.len() {
        if &log[pos..pos + 4] == b"loge" {
            let len = rd32(log, pos + 8) as usize;
            if len >= 4096 && len.is_multiple_of(4096) && pos + len <= log.len() {
                let e = &mut log[pos..pos + len];
                if let Some(g) = guid {
                    e[32..48].copy_from_slice(&g.0);
                }
                let c = checksum_with_hole(e, 4);
                wr32(e, 4, c);
            }
        }
        pos += 4096;
    }
}

/// The image an `open` input describes (see the module docs).
pub fn open_image(t: &Templates, data: &[u8]) -> PageIo {
    let (sel, flags, mut patches) = match data {
        [s, f, rest @ ..] => (*s % 6, *f, rest),
        [s] => (*s % 6, 0, &[][..]),
        [] => (0, 0, &[][..]),
    };
    let base = match sel {
        0 => &t.dynamic,
        1 => &t.sector4096,
        2 => &t.fixed,
        3 => &t.child,
        4 => &t.pending_log,
        _ => return PageIo::from_bytes(data.get(1..).unwrap_or(&[])),
    };
    let mut img = base.clone();
    while let [a, b, c, d, len, rest @ ..] = patches {
        let span = img.len + (64 << 10);
        let off = u64::from(u32::from_le_bytes([*a, *b, *c, *d])) % span;
        let n = usize::from(*len).min(rest.len());
        if n == 0 {
            let _ = img.set_len(off);
        } else {
            let _ = img.write_at(off, &rest[..n]);
        }
        patches = &rest[n..];
    }
    if flags & 1 != 0 {
        fix_checksums(&mut img);
    }
    img
}

/// `vhdx_open` target: a patched template (or raw file) through
/// [`harness`].
pub fn open(t: &Templates, data: &[u8]) -> bool {
    harness(open_image(t, data))
}

/// [`harness`] over a whole file's bytes (in a flat store: no page
/// bookkeeping for multi-megabyte inputs).
pub fn fuzz_harness(data: &[u8]) -> bool {
    let limit = data.len() as u64 + (8 << 20);
    harness(MemIo::from_vec(data.to_vec()).with_limit(limit))
}

/// Opens `img` as a VHDX (read-only, then read-write) and does I/O.
/// Returns whether it opened (for corpus statistics).
pub fn harness<B: BlockIo + Clone>(img: B) -> bool {
    let Ok(mut d) = Vhdx::open(img.clone(), OpenOptions::read_only()) else {
        return false;
    };
    {
        let ss = u64::from(d.logical_sector_size());
        let mut buf = vec![0u8; ss as usize * 2];
        let size = d.virtual_size();
        for off in [0, size / 2, size.saturating_sub(2 * ss)] {
            let off = off - off % ss;
            let _ = d.read(off, &mut buf);
        }
        let _ = d.allocated_ranges();
        let _ = d.verify();
        let _ = d.write(0, &buf);
    }
    if let Ok(mut d) = Vhdx::open(img, OpenOptions::read_write(1)) {
        let ss = d.logical_sector_size() as usize;
        let size = d.virtual_size();
        let pattern = vec![0xA5u8; ss * 3];
        let off = (size / 3) - (size / 3) % ss as u64;
        if d.write(off, &pattern).is_ok() {
            let mut back = vec![0u8; ss * 3];
            if d.read(off, &mut back).is_ok() {
                assert_eq!(back, pattern, "read-after-write mismatch");
            }
        }
        if d.parent_locator().is_some() {
            let _ = d.update_parent_paths(Some("fuzz\\p.vhdx".into()), None);
        }
        let _ = d.close();
    }
    true
}

/// A disk under test in `io`, reopened from its bytes when asked.
struct IoDisk<'t> {
    t: &'t Templates,
    differencing: bool,
    disk: Vhdx<PageIo>,
}

impl<'t> IoDisk<'t> {
    fn open(t: &'t Templates, bytes: PageIo, differencing: bool, writable: bool) -> Self {
        let opts = if writable {
            OpenOptions::read_write(3)
        } else {
            OpenOptions::read_only()
        };
        let mut disk = Vhdx::open(bytes, opts).expect("template reopens");
        if differencing {
            let p = Vhdx::open(t.parent.clone(), OpenOptions::read_only()).expect("parent opens");
            disk.attach_parent(p).expect("parent attaches");
        }
        IoDisk {
            t,
            differencing,
            disk,
        }
    }

    /// Closes cleanly and reopens from the resulting bytes.
    fn reopen(self, writable: bool) -> Self {
        let mut d = self.disk;
        d.close().expect("close");
        IoDisk::open(self.t, PageIo::of(&d), self.differencing, writable)
    }

    /// Checks every sector against the model.
    fn check(&mut self, model: &[u8]) {
        let mut all = vec![0u8; model.len()];
        self.disk.read(0, &mut all).expect("read of the whole disk");
        assert!(all == model, "disk differs from the model");
    }
}

/// `vhdx_io` target: operations on a valid disk against a flat model.
pub fn io(t: &Templates, data: &[u8]) {
    let Some((&sel, mut ops)) = data.split_first() else {
        return;
    };
    let (bytes, differencing) = t.io_disk(sel);
    let mut d = IoDisk::open(t, bytes.clone(), differencing, true);
    let ss = u64::from(d.disk.logical_sector_size());
    let sectors = SIZE / ss;
    // What the disk reads as before any operation (read once per process).
    let mut model = t.io_models[usize::from(sel % 4)].clone();
    assert_eq!(model.len() as u64, SIZE, "template model");
    while let [op, a, b, fill, rest @ ..] = ops {
        ops = rest;
        // Sector numbers spread over the whole disk; up to 64 KiB a request.
        let first = (u64::from(*a) << 8 | u64::from(*b)) % sectors;
        let count = (u64::from(*fill % 16) + 1).min(sectors - first);
        let (off, len) = ((first * ss) as usize, (count * ss) as usize);
        match op % 6 {
            0 => {
                let buf = vec![*fill; len];
                d.disk.write(off as u64, &buf).expect("write");
                model[off..off + len].copy_from_slice(&buf);
            }
            1 => {
                let mut buf = vec![0u8; len];
                d.disk.read(off as u64, &mut buf).expect("read");
                assert!(buf == model[off..off + len], "read differs from the model");
            }
            2 => d.disk.flush().expect("flush"),
            3 => d = d.reopen(true),
            4 => {
                let mut r = d.reopen(false);
                r.check(&model);
                d = r.reopen(true);
            }
            _ => {
                // Crash after the next commit's log entry is flushed: the
                // write was acknowledged, so replay must keep it.
                let buf = vec![*fill ^ 0x80; len];
                d.disk.write(off as u64, &buf).expect("write");
                model[off..off + len].copy_from_slice(&buf);
                d.disk.debug_stop_before_apply();
                // Either nothing needed a commit (the flush succeeded) or
                // the commit stopped: then the disk counts as crashed and
                // dropping it leaves the store as it is.
                let _ = d.disk.flush();
                let bytes = PageIo::of(&d.disk);
                drop(d);
                d = IoDisk::open(t, bytes, differencing, true);
                d.check(&model);
            }
        }
    }
    // The last state, as a fresh read-only open of the file sees it.
    let mut r = d.reopen(false);
    r.check(&model);
}

/// The image a `log_replay` input describes (see the module docs).
pub fn log_image(t: &Templates, data: &[u8]) -> PageIo {
    let mut img = t.dynamic.clone();
    let (flags, log) = data.split_first().map_or((0, &[][..]), |(f, r)| (*f, r));
    let n = log.len().min(LOG_LEN);
    // The template's own old entries go; the input's bytes take their place.
    let (first, last) = (
        LOG_OFFSET as u64 / PAGE,
        (LOG_OFFSET + LOG_LEN) as u64 / PAGE,
    );
    img.pages.retain(|&p, _| p < first || p >= last);
    let mut region = log[..n].to_vec();
    region.resize(n.div_ceil(PAGE as usize) * PAGE as usize, 0);
    if flags & 1 != 0 {
        fix_log_entries(&mut region, Some(FUZZ_LOG_GUID));
    }
    let _ = img.write_at(LOG_OFFSET as u64, &region);
    for off in [64u64 << 10, 128 << 10] {
        edit(&mut img, off, 4096, |b| {
            if let Ok(h) = Header::parse(b) {
                let h = Header {
                    log_guid: FUZZ_LOG_GUID,
                    ..h
                };
                b.copy_from_slice(&h.to_bytes());
            }
        });
    }
    img
}

/// `vhdx_log_replay` target: the log is replayed in memory (read-only
/// open) and on disk (read-write open); when both open, they show the same
/// disk, and a second open after the on-disk replay shows it again.
pub fn log_replay(t: &Templates, data: &[u8]) {
    let img = log_image(t, data);
    let ro = Vhdx::open(img.clone(), OpenOptions::read_only());
    let rw = Vhdx::open(img, OpenOptions::read_write(5));
    let (Ok(mut ro), Ok(mut rw)) = (ro, rw) else {
        return;
    };
    let size = ro.virtual_size();
    if size != rw.virtual_size() || size > 64 * MIB {
        assert_eq!(size, rw.virtual_size(), "replays disagree on the size");
        return;
    }
    let (mut a, mut b) = (vec![0u8; size as usize], vec![0u8; size as usize]);
    let (ra, rb) = (ro.read(0, &mut a), rw.read(0, &mut b));
    assert_eq!(ra.is_ok(), rb.is_ok(), "replays disagree on readability");
    if ra.is_err() {
        return;
    }
    assert!(a == b, "in-memory and on-disk replay differ");
    if rw.close().is_err() {
        return;
    }
    let again = PageIo::of(&rw);
    let mut d = Vhdx::open(again, OpenOptions::read_only()).expect("a replayed file reopens");
    assert!(
        !d.log_was_replayed(),
        "the log was not cleared after replay"
    );
    d.read(0, &mut a).expect("a replayed file reads");
    assert!(a == b, "the replayed file changed on reopen");
}
