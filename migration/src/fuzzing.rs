//! Fuzz harnesses shared by `migration/fuzz` (libFuzzer) and the
//! deterministic corpus test in `migration/tests/` (stable CI).
//!
//! Not API: hidden from the docs. Each harness must return normally for
//! every input; a panic is a bug.

use crate::error::StreamError;
use crate::error::VmError;
use crate::receiver::{DestinationVm, Receiver, RecvProgress};
use crate::report::MigrationResult;
use crate::state::{DeviceState, VcpuState, VmConfig};
use crate::stream::{Decoder, Direction, Item, Record, CRC_BYTES, HEADER_BYTES};
use crate::transport::{MemPipe, Transport};
use crate::Page;
use alloc::vec::Vec;

/// Rewrite every record's CRC that fits in `bytes` (after the 8-byte
/// magic) so that mutated payloads get past the CRC check and reach the
/// parsers.
pub fn fix_crcs(bytes: &mut [u8]) {
    let mut pos = 8usize;
    while let Some(h) = bytes.get(pos..pos + HEADER_BYTES) {
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let Some(end) = pos.checked_add(HEADER_BYTES + len) else {
            return;
        };
        let Some(body) = bytes.get(pos..end) else {
            return;
        };
        let crc = crc32fast::hash(body).to_le_bytes();
        let Some(slot) = bytes.get_mut(end..end + CRC_BYTES) else {
            return;
        };
        slot.copy_from_slice(&crc);
        pos = end + CRC_BYTES;
    }
}

/// Control byte, then stream bytes. Control bit 0: direction (0 = source to
/// destination); bit 1: fix CRCs first; bits 2-5: log2 of the chunk size
/// the bytes are fed in (1 byte to 32 KiB); bit 6: also decode them as a
/// receiver over a lending link does ([`decode_lent`], pieces of the same
/// size) and require the same records and the same ending; bit 7: unused.
pub fn fuzz_decode(data: &[u8]) {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let dir = if ctl & 1 == 0 {
        Direction::SourceToDest
    } else {
        Direction::DestToSource
    };
    let chunk = 1usize << ((ctl >> 2) & 0xf);
    let mut input = rest.to_vec();
    if ctl & 2 != 0 {
        fix_crcs(&mut input);
    }
    if ctl & 0x40 == 0 {
        decode_all(dir, &input, chunk);
        return;
    }
    let (fed, fed_end) = decode_fed(dir, &input, chunk);
    let (lent, lent_end) = decode_lent(dir, &input, chunk);
    assert!(
        fed == lent,
        "records differ where they were parsed in place"
    );
    assert_eq!(
        fed_end.is_ok(),
        lent_end.is_ok(),
        "{fed_end:?} / {lent_end:?}"
    );
    if let Err(e) = lent_end {
        let _ = alloc::format!("{e}");
    }
}

/// A record decoded by [`decode_fed`] or [`decode_lent`]: memory pages
/// copied out, with the stream offset of their first byte.
pub type Decoded = (Record, u64);

/// Decode `input` fed in `chunk`-byte pieces into the decoder's buffer;
/// returns the records and how decoding ended (`Ok` only when the
/// stream ended cleanly).
pub fn decode_fed(
    dir: Direction,
    input: &[u8],
    chunk: usize,
) -> (Vec<Decoded>, Result<(), StreamError>) {
    let mut d = Decoder::new(dir);
    let mut out = Vec::new();
    for c in input.chunks(chunk.max(1)) {
        d.feed(c);
        if let Err(e) = drain(&mut d, &mut out) {
            return (out, Err(e));
        }
    }
    let end = d.finish();
    (out, end)
}

/// Decode `input` as a receiver over a lending link does
/// ([`crate::Transport::recv_lent`]): each `piece`-byte piece is parsed
/// where it lies while the decoder buffers nothing
/// ([`Decoder::next_item_in`]); what follows a record cut by the piece's
/// end is fed, and decoded from the decoder's buffer until that is empty.
pub fn decode_lent(
    dir: Direction,
    input: &[u8],
    piece: usize,
) -> (Vec<Decoded>, Result<(), StreamError>) {
    let mut d = Decoder::new(dir);
    let mut out = Vec::new();
    for p in input.chunks(piece.max(1)) {
        let mut at = 0;
        while at < p.len() {
            match d.next_item_in(&p[at..]) {
                Ok((item, used)) => {
                    at += used;
                    match item {
                        Some(i) => out.push(owned(i)),
                        None => break,
                    }
                }
                Err(e) => return (out, Err(e)),
            }
        }
        d.feed(&p[at..]);
        if let Err(e) = drain(&mut d, &mut out) {
            return (out, Err(e));
        }
    }
    let end = d.finish();
    (out, end)
}

fn owned(item: Item<'_>) -> Decoded {
    match item {
        Item::Record(r) => (r, 0),
        Item::Pages {
            start_gfn,
            data,
            offset,
            ..
        } => (
            Record::MemData {
                start_gfn,
                data: data.to_vec(),
            },
            offset,
        ),
    }
}

/// Decode what the decoder buffers.
fn drain(d: &mut Decoder, out: &mut Vec<Decoded>) -> Result<(), StreamError> {
    while let Some(i) = d.next_item()? {
        out.push(owned(i));
    }
    Ok(())
}

/// Decode `input` fed in `chunk`-byte pieces; returns the records decoded
/// and whether the stream ended cleanly.
pub fn decode_all(dir: Direction, input: &[u8], chunk: usize) -> (u64, bool) {
    let mut d = Decoder::new(dir);
    for c in input.chunks(chunk.max(1)) {
        d.feed(c);
        loop {
            match d.next_record() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    // Formatting the message must not panic either.
                    let _ = alloc::format!("{e}");
                    return (d.records(), false);
                }
            }
        }
    }
    (d.records(), d.finish().is_ok())
}

/// A destination that keeps only the pages written (a map, so its memory
/// is bounded by the input, not by the configured RAM): the digests of a
/// valid stream match, and mutations reach the state restore, the verify
/// comparison and the go/resume path.
#[derive(Default)]
struct SparseVm {
    pages: alloc::collections::BTreeMap<u64, alloc::boxed::Box<Page>>,
}

impl DestinationVm for SparseVm {
    fn prepare(&mut self, config: &VmConfig) -> Result<(), VmError> {
        // Refuse what a small host would refuse, so a fuzzed configuration
        // cannot make the harness hash a terabyte of RAM: 1 MiB keeps an
        // execution (a full-image check reads every page) under a
        // millisecond; the sample streams have 8 pages.
        if config.ram_bytes > 1 << 20 {
            return Err(VmError::new("not enough memory on this host"));
        }
        Ok(())
    }
    fn write_page(&mut self, gfn: u64, data: &Page) -> Result<(), VmError> {
        self.pages.insert(gfn, alloc::boxed::Box::new(*data));
        Ok(())
    }
    fn zero_page(&mut self, gfn: u64) -> Result<(), VmError> {
        self.pages.remove(&gfn);
        Ok(())
    }
    fn read_page(&mut self, gfn: u64, buf: &mut Page) -> Result<(), VmError> {
        match self.pages.get(&gfn) {
            Some(p) => buf.copy_from_slice(&p[..]),
            None => buf.fill(0),
        }
        Ok(())
    }
    fn restore_vcpus(&mut self, _vcpus: &[VcpuState]) -> Result<(), VmError> {
        Ok(())
    }
    fn restore_devices(&mut self, _devices: &[DeviceState]) -> Result<(), VmError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        Ok(())
    }
    fn discard(&mut self) {}
}

/// A pipe end that lends what it received in pieces of `piece` bytes
/// ([`Transport::recv_lent`]), as a sealed link lends frame bodies.
struct Lending {
    pipe: MemPipe,
    piece: Option<usize>,
}

impl Transport for Lending {
    fn send(&mut self, bytes: &[u8]) -> Result<(), crate::TransportError> {
        self.pipe.send(bytes)
    }
    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, crate::TransportError> {
        self.pipe.recv(buf)
    }
    fn send_window(&self) -> usize {
        self.pipe.send_window()
    }
    fn acked_bytes(&self) -> u64 {
        self.pipe.acked_bytes()
    }
    fn recv_lent(
        &mut self,
        take: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Option<Result<usize, crate::TransportError>> {
        let piece = self.piece?.max(1);
        self.pipe.recv_in_place(&mut |bytes| {
            let mut used = 0;
            for p in bytes.chunks(piece) {
                used += p.len();
                if !take(p) {
                    break;
                }
            }
            used
        })
    }
}

/// Run a [`Receiver`] over `data` (source-to-destination bytes, CRCs fixed
/// if control bit 1 is set, as in [`fuzz_decode`]; with bit 6 the link
/// lends them in pieces of the size bits 2-5 give, as [`fuzz_decode`]'s
/// chunks); returns how it ended (`None`: still running after the step
/// budget, or no input).
pub fn fuzz_receive(data: &[u8]) -> Option<MigrationResult> {
    let (&ctl, rest) = data.split_first()?;
    let mut input: Vec<u8> = rest.to_vec();
    if ctl & 2 != 0 {
        fix_crcs(&mut input);
    }
    let (mut src, dst) = MemPipe::pair();
    let dst = Lending {
        pipe: dst,
        piece: (ctl & 0x40 != 0).then(|| 1usize << ((ctl >> 2) & 0xf)),
    };
    let _ = src.send(&input);
    // The source end stays open while the receiver consumes the input, so
    // its offer, `ready` and `resumed` can be sent; once it waits for more
    // bytes, the source hangs up. (Dropping it first made the receiver's
    // first send, the offer, fail: it never decoded a record.)
    let mut src = Some(src);
    let mut dst = dst;
    let mut vm = SparseVm::default();
    let mut rx = Receiver::new(0);
    for _ in 0..100_000 {
        match rx.step(&mut vm, &mut dst, 0) {
            RecvProgress::Finished(r) => return Some(r),
            RecvProgress::Waiting => drop(src.take()),
            RecvProgress::Busy => {}
        }
    }
    None
}

/// A small, fully valid configuration: 8 pages of RAM, 2 vCPUs, 2 devices.
pub fn sample_config() -> VmConfig {
    use crate::state::{CpuidEntry, DeviceDesc};
    VmConfig {
        ram_bytes: 8 * crate::PAGE_SIZE as u64,
        vcpus: 2,
        devices: alloc::vec![
            DeviceDesc {
                kind: 1,
                instance: 0,
                version: 1
            },
            DeviceDesc {
                kind: 7,
                instance: 3,
                version: 2
            },
        ],
        cpuid: alloc::vec![
            CpuidEntry {
                leaf: 0,
                subleaf: 0,
                eax: 0xd,
                ebx: 0x6874_7541,
                ecx: 0x444d_4163,
                edx: 0x6974_6e65
            },
            CpuidEntry {
                leaf: 1,
                subleaf: 0,
                eax: 0x00a2_0f12,
                ebx: 0x0002_0800,
                ecx: 0xfed8_3203,
                edx: 0x178b_fbff
            },
            CpuidEntry {
                leaf: 7,
                subleaf: 0,
                eax: 0,
                ebx: 0x219c_97a9,
                ecx: 0,
                edx: 0
            },
        ],
    }
}

/// A vCPU state with every field distinct.
pub fn sample_vcpu(id: u32) -> VcpuState {
    use crate::state::{EventKind, FpuState, Msrs, PendingEvent, Regs, Segment, TableReg};
    let k = u64::from(id) << 32;
    let seg = |n: u16| Segment {
        selector: n * 8,
        attrib: 0x0a9b,
        limit: 0xffff_ffff,
        base: k | u64::from(n),
    };
    VcpuState {
        id,
        regs: Regs {
            rax: k | 1,
            rbx: 2,
            rcx: 3,
            rdx: 4,
            rsi: 5,
            rdi: 6,
            rbp: 7,
            r8: 8,
            r9: 9,
            r10: 10,
            r11: 11,
            r12: 12,
            r13: 13,
            r14: 14,
            r15: 15,
            rsp: 0x8000,
            rip: 0x10_0000,
            rflags: 0x202,
        },
        es: seg(2),
        cs: seg(1),
        ss: seg(2),
        ds: seg(2),
        fs: seg(3),
        gs: seg(4),
        ldtr: Segment::default(),
        tr: seg(5),
        gdtr: TableReg {
            base: 0x1000,
            limit: 0x37,
        },
        idtr: TableReg {
            base: 0x2000,
            limit: 0xfff,
        },
        cr0: 0x8000_0031,
        cr2: 0xdead_b000,
        cr3: 0x3000,
        cr4: 0x6a0,
        cr8: 0,
        efer: 0xd01,
        dr: [1, 2, 3, 4],
        dr6: 0xffff_0ff0,
        dr7: 0x400,
        msrs: Msrs {
            pat: 0x0007_0406_0007_0406,
            star: 0x0023_0010 << 32,
            lstar: 0xffff_8000_0000_1000,
            cstar: 0,
            sfmask: 0x4700,
            kernel_gs_base: 0xffff_8000_0000_2000,
            tsc_aux: u64::from(id),
            sysenter_cs: 0x10,
            sysenter_esp: 0x9000,
            sysenter_eip: 0x1234,
        },
        fpu: FpuState {
            xcr0: 7,
            xsave: (0..576u32).map(|i| (i * 13 + id) as u8).collect(),
        },
        pending_event: (id == 0).then_some(PendingEvent {
            vector: 14,
            kind: EventKind::Exception,
            error_code: Some(2),
        }),
        interrupt_shadow: id == 1,
        nmi_blocked: false,
        tsc: 0x1_0000_0000 + u64::from(id),
    }
}

/// Valid streams of every shape, for corpus tests and fuzz seeds:
/// a complete source stream (version 1), an aborted one, the back channel,
/// and a complete version-2 stream with the memory verify record.
pub fn sample_streams() -> Vec<(Direction, Vec<u8>)> {
    use crate::digest::{page_hash, ImageDigest};
    use crate::stream::{encode_mem_data, encode_mem_zero, Record, MAGIC_DEST, MAGIC_SOURCE};
    let cfg = sample_config();
    let pages = cfg.ram_pages();
    // Final image: pages 0, 1 and 5 carry a pattern, the rest are zero.
    let mut image = alloc::vec![[0u8; crate::PAGE_SIZE]; pages as usize];
    for (g, p) in image.iter_mut().enumerate() {
        if matches!(g, 0 | 1 | 5) {
            for (i, b) in p.iter_mut().enumerate() {
                *b = (i ^ (g * 31)) as u8;
            }
        }
    }
    let digest = ImageDigest::of_hashes(
        &(0..pages)
            .map(|g| page_hash(g, &image[g as usize]))
            .collect::<Vec<_>>(),
    );
    let mut s = Vec::from(MAGIC_SOURCE);
    Record::Select { version: 1 }.encode(&mut s);
    let select_end = s.len();
    Record::Config(cfg.clone()).encode(&mut s);
    let mut two = Vec::new();
    two.extend_from_slice(&image[0]);
    two.extend_from_slice(&image[1]);
    encode_mem_data(0, &two, &mut s);
    encode_mem_zero(2, 6, &mut s);
    encode_mem_data(5, &[7u8; crate::PAGE_SIZE], &mut s); // later overwritten
    encode_mem_data(5, &image[5], &mut s);
    let abort_prefix = s.clone();
    let memory_end = s.len();
    for id in 0..cfg.vcpus {
        Record::Vcpu(alloc::boxed::Box::new(sample_vcpu(id))).encode(&mut s);
    }
    for d in &cfg.devices {
        let payload = (0..100u8).map(|i| i ^ d.kind as u8).collect();
        Record::Device(DeviceState {
            kind: d.kind,
            instance: d.instance,
            version: d.version,
            payload,
        })
        .encode(&mut s);
    }
    Record::End { digest }.encode(&mut s);
    Record::Go.encode(&mut s);

    // The same stream in version 2 with the verify record after the memory
    // (the source's memory equals the image sent).
    let mut v2 = Vec::from(MAGIC_SOURCE);
    Record::Select { version: 2 }.encode(&mut v2);
    v2.extend_from_slice(&s[select_end..memory_end]);
    Record::MemVerify { digest }.encode(&mut v2);
    v2.extend_from_slice(&s[memory_end..]);

    let mut aborted = abort_prefix;
    Record::Abort {
        reason: "operator cancelled".into(),
    }
    .encode(&mut aborted);

    let mut back = Vec::from(MAGIC_DEST);
    Record::Offer {
        versions: alloc::vec![1, 2, 3, 4],
    }
    .encode(&mut back);
    Record::Progress { applied: 131_072 }.encode(&mut back);
    Record::Ready { digest }.encode(&mut back);
    Record::Resumed.encode(&mut back);
    alloc::vec![
        (Direction::SourceToDest, s),
        (Direction::SourceToDest, aborted),
        (Direction::DestToSource, back),
        (Direction::SourceToDest, v2)
    ]
}

/// The seed corpus of the cargo-fuzz targets (`migration/fuzz/seeds/TARGET/NAME`):
/// each sample stream behind a control byte for the harness. `decode` gets
/// every stream twice (plain, and with CRC repair so that mutations reach
/// the parsers), `receive` the source-to-destination ones with CRC repair.
/// `tests/corpus.rs` checks that the files on disk are exactly these.
pub fn fuzz_seeds() -> Vec<(&'static str, alloc::string::String, Vec<u8>)> {
    const NAMES: [&str; 4] = ["v1-complete", "v1-aborted", "back-channel", "v2-verified"];
    let mut out = Vec::new();
    for ((dir, bytes), name) in sample_streams().into_iter().zip(NAMES) {
        let d = u8::from(dir == Direction::DestToSource);
        // 4 KiB feed chunks (control bits 2-5 = 12).
        let chunk = 12 << 2;
        // Bit 6: also parsed where the bytes lie, in 4 KiB pieces.
        for (fix, suffix) in [(0u8, ""), (2, "-fixcrc"), (0x42, "-lent")] {
            let mut seed = Vec::with_capacity(bytes.len() + 1);
            seed.push(d | fix | chunk);
            seed.extend_from_slice(&bytes);
            out.push(("decode", alloc::format!("{name}{suffix}"), seed.clone()));
            if dir == Direction::SourceToDest && fix != 0 {
                out.push(("receive", alloc::format!("{name}{suffix}"), seed));
            }
        }
    }
    out
}
