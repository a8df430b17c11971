//! The migration stream: framing, record types, the encoder and the
//! incremental, validating decoder.
//!
//! # Wire format
//!
//! A migration uses one bidirectional byte channel ([`crate::Transport`]).
//! Each direction is its own stream: an 8-byte magic, then records.
//!
//! ```text
//! record  = header payload crc
//! header  = type:u16 flags:u16 len:u32        (little endian, 8 bytes)
//! payload = len bytes, layout by type (below)
//! crc     = CRC-32 (IEEE, as crc32fast) over header and payload, u32 LE
//! ```
//!
//! `flags` bit 0 is OPTIONAL; the other bits are reserved and must be zero.
//! A record of a type this version does not know is skipped if it is
//! OPTIONAL (after its length cap of [`MAX_OPTIONAL_RECORD_BYTES`] and its
//! CRC are checked) and is an error naming the type otherwise. Version 1
//! defines no optional records; the flag lets later versions add hints
//! (e.g. progress, compression dictionaries) that old peers may ignore.
//!
//! Record payloads (all integers little endian):
//!
//! | type     | name          | payload |
//! |----------|---------------|---------|
//! | `0x0001` | offer         | `n:u8` (1..=16), `n` x `version:u16` |
//! | `0x0002` | select        | `version:u16` |
//! | `0x0010` | configuration | `ram_bytes:u64 vcpus:u32 ndev:u16 ncpuid:u16`, `ndev` x (`kind:u16 instance:u16 version:u32`), `ncpuid` x (`leaf subleaf eax ebx ecx edx`: u32 each) |
//! | `0x0020` | memory data   | `start_gfn:u64 pages:u32` (1..=[`MAX_DATA_RUN_PAGES`]), then `pages` x 4096 bytes (version 5: the record's CRC covers header, `start_gfn` and `pages` only) |
//! | `0x0021` | memory zero   | `start_gfn:u64 pages:u32` (1..=[`MAX_ZERO_RUN_PAGES`]); no page bytes |
//! | `0x0022` | memory verify | `digest:u64`: the [`crate::digest`] of the source's whole memory, read with the VM paused after the last memory record (version 2, verification mode only) |
//! | `0x0030` | vCPU          | [`VcpuState`] (fixed fields, then `xsave_len:u32` and the XSAVE bytes); its interruptibility byte: bit 0 STI/MOV-SS shadow, bit 1 NMIs blocked (version 3 only) |
//! | `0x0040` | device        | `kind:u16 instance:u16 version:u32 len:u32`, `len` bytes |
//! | `0x00f0` | end           | `digest:u64` ([`crate::digest`]) |
//! | `0x00f1` | go            | empty: the destination may resume the VM |
//! | `0x0101` | ready         | `digest:u64`: the destination verified it and holds all state |
//! | `0x0102` | resumed       | empty: the VM runs at the destination |
//! | `0x0103` | progress      | `applied:u64`: bytes of the source's stream (magic included) the destination has decoded and applied (version 4 only; before `ready`) |
//! | `0x01ff` | abort         | `len:u16` (<= 256), UTF-8 reason |
//!
//! # State machine
//!
//! ```text
//! destination -> source ("HVMIGDST")     source -> destination ("HVMIGSRC")
//!
//! D: magic, offer(versions) ──────────▶ S: picks the highest common version
//!                                        S: magic, select(v), configuration
//!                                           D creates the empty VM
//!                                        S: memory* (pass 0: every page, zero
//!                                           pages as markers; passes 1..: the
//!                                           pages the dirty log reported)
//!                                        -- source pauses the VM --
//!                                        S: memory* (last dirty pages),
//!                                           [verification mode: S reads
//!                                           and hashes its whole memory,
//!                                           verify(digest)],
//!                                           vCPU(0) .. vCPU(n-1),
//!                                           device(d0) .. device(dk) in
//!                                           configuration order, end(digest)
//! D: progress(applied)* ◀───────────── (while memory arrives, version 4:
//!                                         the source keeps what it sent
//!                                         beyond `applied` bounded)
//! D: verifies digest (and, after a
//!    verify record, re-reads its whole
//!    memory: it must hash to the
//!    source's memory digest too),
//!    restores state,
//!    ready(digest) ◀──────────────────── (source waits)
//!                                        S: go           <- commit point
//! D: resumes the VM, resumed ─────────▶ S: releases the VM (done)
//! ```
//!
//! Either side may send `abort(reason)` instead of its next record (after
//! its magic); then both sides stop, the destination discards its VM and the
//! source resumes its own. Each direction ends with its last record
//! (`go`/`abort`, resp. `resumed`/`abort`); bytes after that are an error.
//! Why a three-message switch-over (`ready`, `go`, `resumed`) rather than
//! the destination resuming on `end`: the source must know who runs the VM.
//! Until it sends `go` the destination will never resume, so the source can
//! always take the VM back.
//!
//! Failure semantics: before the source sends `go`, any failure (bad bytes,
//! transport error, timeout, refusal by either VM) leaves the VM running at
//! the source. After `go`, the destination owns the VM: only an `abort`
//! from it (its resume failed and it discarded the VM) sends the VM back to
//! the source; if the source instead loses the channel or times out before
//! `resumed` arrives, the outcome is in doubt and the source stays paused
//! ([`crate::MigrationError::InDoubt`]) for management to resolve. The
//! destination, once resumed, keeps running even if `resumed` cannot be
//! delivered.
//!
//! Version 5 (only over a link that authenticates every byte,
//! [`crate::Transport::authenticated`]: the node's sealed frames). Page
//! bytes are the bulk of a stream and each per-byte pass costs (under
//! emulation most of all), so the link's Poly1305 tag is their one check
//! on each side: a memory data record's CRC covers its first 20 bytes
//! (the header and the run) and not its pages, and without verification
//! mode the end digest names each data page by its place in the stream
//! ([`crate::digest::page_hash_at`]), so neither side reads a page's bytes
//! for a checksum. Every other record keeps its whole CRC. What each check
//! is for: the tag, that the bytes read are the bytes the peer sealed, in
//! order (any change, loss, replay on the way); the CRCs, that a record's
//! framing and fields are what the encoder wrote (faults in code paths
//! that never saw a tag, e.g. an unsealed pipe); the end digest, that the
//! destination applied the same last copy of every page the source sent
//! (engine bookkeeping); verification mode, that both memories hold the
//! same bytes (a missed dirty page, a faulty write). A destination offers
//! version 5 only over such a link (and when it folds its digest from
//! hashes kept while writing, [`crate::DigestCheck::HashOnWrite`]); a
//! select of 5 anywhere else is refused
//! ([`StreamError::VersionNeedsSealedLink`]).
//!
//! Verification mode (`Policy::verify_memory`, version 2): the end digest
//! covers the pages the source *sent*; the verify digest covers what the
//! source's memory *holds* at switch-over. They differ exactly when a page
//! changed at the source without being sent again (a write the dirty log
//! missed). The source compares page by page before sending the verify
//! record and aborts, naming the stale frames, if any differs; the
//! destination compares the verify digest with its own memory before it
//! may answer `ready`, and aborts if they differ. Either way the VM keeps
//! running at the source and the migration fails instead of resuming a
//! stale copy. The digest travels in the stream, so a remote destination
//! checks it the same way as a local one.
//!
//! The [`Decoder`] enforces this machine, the caps and the configuration:
//! memory runs must lie inside the configured RAM, at most one verify
//! record follows the last memory record (version 2 only; no memory after
//! it), vCPU records arrive in id order and number exactly `vcpus`, device
//! records match the configured devices in order and version. It never
//! panics on input and buffers at most one record plus the caller's last
//! chunk.

use crate::error::StreamError;
use crate::state::{
    DeviceDesc, DeviceState, VcpuState, VcpuWire, VmConfig, MAX_DEVICE_PAYLOAD, MAX_XSAVE_BYTES,
    VCPU_FIXED_BYTES,
};
use crate::wire::{put_u16, put_u32, put_u64, put_u8, Reader};
use crate::PAGE_SIZE;
use alloc::borrow::ToOwned;
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

/// Magic opening the source -> destination stream.
pub const MAGIC_SOURCE: [u8; 8] = *b"HVMIGSRC";
/// Magic opening the destination -> source stream.
pub const MAGIC_DEST: [u8; 8] = *b"HVMIGDST";
/// Protocol versions this implementation speaks, ascending.
pub const SUPPORTED_VERSIONS: &[u16] = &[1, 2, 3, 4, 5];
/// The versions spoken over a link that does not authenticate every byte
/// ([`crate::Transport::authenticated`]): all but [`SEALED_VERSION`].
pub const UNSEALED_VERSIONS: &[u16] = &[1, 2, 3, 4];
/// First protocol version with the memory verify record.
pub const VERIFY_VERSION: u16 = 2;
/// First protocol version whose vCPU records carry NMI blocking (bit 1 of
/// the interruptibility byte).
pub const NMI_STATE_VERSION: u16 = 3;
/// First protocol version with the destination's progress record (the
/// source bounds what it sent beyond what the destination applied).
pub const PROGRESS_VERSION: u16 = 4;
/// First protocol version whose memory data records leave their page bytes
/// to the link's MAC (the record CRC covers the record's head only) and
/// whose end digest identifies each data page by where it travelled in the
/// stream ([`crate::digest::page_hash_at`]); only over an authenticated
/// link (module docs, "Version 5").
pub const SEALED_VERSION: u16 = 5;

/// The versions a side speaks over a link that is (or is not)
/// authenticated.
pub const fn versions_for(authenticated: bool) -> &'static [u16] {
    if authenticated {
        SUPPORTED_VERSIONS
    } else {
        UNSEALED_VERSIONS
    }
}
/// Record header length.
pub const HEADER_BYTES: usize = 8;
/// Record trailer (CRC) length.
pub const CRC_BYTES: usize = 4;
/// Header flag: a peer that does not know the type may skip the record.
pub const FLAG_OPTIONAL: u16 = 1;
/// Most pages in one memory data record (256 KiB of page bytes).
pub const MAX_DATA_RUN_PAGES: u64 = 64;
/// Most pages in one zero marker (256 MiB of guest RAM).
pub const MAX_ZERO_RUN_PAGES: u64 = 65536;
/// Most versions in one offer.
pub const MAX_OFFERED_VERSIONS: usize = 16;
/// Longest abort reason in bytes.
pub const MAX_ABORT_REASON_BYTES: usize = 256;
/// Largest optional record of an unknown type that is skipped.
pub const MAX_OPTIONAL_RECORD_BYTES: u32 = 64 * 1024;

mod ty {
    pub const OFFER: u16 = 0x0001;
    pub const SELECT: u16 = 0x0002;
    pub const CONFIG: u16 = 0x0010;
    pub const MEM_DATA: u16 = 0x0020;
    pub const MEM_ZERO: u16 = 0x0021;
    pub const MEM_VERIFY: u16 = 0x0022;
    pub const VCPU: u16 = 0x0030;
    pub const DEVICE: u16 = 0x0040;
    pub const END: u16 = 0x00f0;
    pub const GO: u16 = 0x00f1;
    pub const READY: u16 = 0x0101;
    pub const RESUMED: u16 = 0x0102;
    pub const PROGRESS: u16 = 0x0103;
    pub const ABORT: u16 = 0x01ff;
}

/// Name and payload cap of a known record type.
fn type_info(t: u16) -> Option<(&'static str, u32)> {
    let (name, cap) = match t {
        ty::OFFER => ("offer", 1 + 2 * MAX_OFFERED_VERSIONS),
        ty::SELECT => ("select", 2),
        ty::CONFIG => ("configuration", VmConfig::MAX_ENCODED),
        ty::MEM_DATA => ("memory data", 12 + MAX_DATA_RUN_PAGES as usize * PAGE_SIZE),
        ty::MEM_ZERO => ("memory zero", 12),
        ty::MEM_VERIFY => ("memory verify", 8),
        ty::VCPU => ("vCPU", VCPU_FIXED_BYTES + MAX_XSAVE_BYTES),
        ty::DEVICE => ("device", 12 + MAX_DEVICE_PAYLOAD),
        ty::END => ("end", 8),
        ty::GO => ("go", 0),
        ty::READY => ("ready", 8),
        ty::RESUMED => ("resumed", 0),
        ty::PROGRESS => ("progress", 8),
        ty::ABORT => ("abort", 2 + MAX_ABORT_REASON_BYTES),
        _ => return None,
    };
    // Every cap above is far below 4 GiB.
    Some((name, u32::try_from(cap).unwrap_or(u32::MAX)))
}

/// Largest record on the wire, header and CRC included.
pub const MAX_RECORD_BYTES: usize =
    HEADER_BYTES + 12 + MAX_DATA_RUN_PAGES as usize * PAGE_SIZE + CRC_BYTES;

/// One decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Destination: the protocol versions it accepts.
    Offer { versions: Vec<u16> },
    /// Source: the version the rest of the stream uses.
    Select { version: u16 },
    /// Source: the VM's configuration.
    Config(VmConfig),
    /// Source: `data.len() / 4096` pages starting at `start_gfn`.
    MemData { start_gfn: u64, data: Vec<u8> },
    /// Source: `pages` zero pages starting at `start_gfn`.
    MemZero { start_gfn: u64, pages: u64 },
    /// Source (version 2, verification mode): the digest of its whole
    /// memory, read with the VM paused after the last memory record.
    MemVerify { digest: u64 },
    /// Source: one vCPU's state.
    Vcpu(Box<VcpuState>),
    /// Source: one device's state.
    Device(DeviceState),
    /// Source: all state sent; `digest` covers the final memory image.
    End { digest: u64 },
    /// Source: commit; the destination may resume.
    Go,
    /// Destination: image verified, state restored, waiting for `go`.
    Ready { digest: u64 },
    /// Destination: the VM runs here now.
    Resumed,
    /// Destination (version 4): stream bytes it has decoded and applied.
    Progress { applied: u64 },
    /// Either side: the migration is abandoned.
    Abort { reason: String },
}

impl Record {
    /// Wire name of the record type.
    pub fn name(&self) -> &'static str {
        type_info(self.raw_type()).map_or("?", |(n, _)| n)
    }

    fn raw_type(&self) -> u16 {
        match self {
            Record::Offer { .. } => ty::OFFER,
            Record::Select { .. } => ty::SELECT,
            Record::Config(_) => ty::CONFIG,
            Record::MemData { .. } => ty::MEM_DATA,
            Record::MemZero { .. } => ty::MEM_ZERO,
            Record::MemVerify { .. } => ty::MEM_VERIFY,
            Record::Vcpu(_) => ty::VCPU,
            Record::Device(_) => ty::DEVICE,
            Record::End { .. } => ty::END,
            Record::Go => ty::GO,
            Record::Ready { .. } => ty::READY,
            Record::Resumed => ty::RESUMED,
            Record::Progress { .. } => ty::PROGRESS,
            Record::Abort { .. } => ty::ABORT,
        }
    }

    /// Append this record, framed, to `out`. The caller keeps values within
    /// the caps (the engine validates VM-provided state first); an
    /// over-cap value is encoded anyway and the peer rejects it.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let t = self.raw_type();
        match self {
            Record::Offer { versions } => frame(out, t, 0, |o| {
                put_u8(o, u8::try_from(versions.len()).unwrap_or(u8::MAX));
                for v in versions {
                    put_u16(o, *v);
                }
            }),
            Record::Select { version } => frame(out, t, 0, |o| put_u16(o, *version)),
            Record::Config(c) => frame(out, t, 0, |o| {
                o.reserve(c.encoded_len());
                c.encode(o)
            }),
            Record::MemData { start_gfn, data } => encode_mem_data(*start_gfn, data, out),
            Record::MemZero { start_gfn, pages } => encode_mem_zero(*start_gfn, *pages, out),
            Record::Vcpu(v) => frame(out, t, 0, |o| {
                o.reserve(v.encoded_len());
                v.encode(o)
            }),
            Record::Device(d) => frame(out, t, 0, |o| {
                o.reserve(d.encoded_len());
                d.encode(o)
            }),
            Record::End { digest } | Record::Ready { digest } | Record::MemVerify { digest } => {
                frame(out, t, 0, |o| put_u64(o, *digest))
            }
            Record::Progress { applied } => frame(out, t, 0, |o| put_u64(o, *applied)),
            Record::Go | Record::Resumed => frame(out, t, 0, |_| {}),
            Record::Abort { reason } => frame(out, t, 0, |o| {
                let bytes = truncate_utf8(reason, MAX_ABORT_REASON_BYTES);
                put_u16(o, bytes.len() as u16);
                o.extend_from_slice(bytes.as_bytes());
            }),
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes ending on a character
/// boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Append a framed record whose payload `body` writes.
fn frame(out: &mut Vec<u8>, t: u16, flags: u16, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    put_u16(out, t);
    put_u16(out, flags);
    put_u32(out, 0);
    body(out);
    let len = out.len() - start - HEADER_BYTES;
    out[start + 4..start + 8].copy_from_slice(&(len as u32).to_le_bytes());
    let crc = crc32fast::hash(&out[start..]);
    put_u32(out, crc);
}

/// Append a memory data record for the pages in `data` (a whole number of
/// pages, at most [`MAX_DATA_RUN_PAGES`]) starting at `start_gfn`.
pub fn encode_mem_data(start_gfn: u64, data: &[u8], out: &mut Vec<u8>) {
    out.reserve(HEADER_BYTES + 12 + data.len() + CRC_BYTES);
    frame(out, ty::MEM_DATA, 0, |o| {
        put_u64(o, start_gfn);
        put_u32(o, (data.len() / PAGE_SIZE) as u32);
        o.extend_from_slice(data);
    });
}

/// Bytes before the first page of a memory data record: header,
/// `start_gfn`, `pages`.
pub const MEM_DATA_HEAD_BYTES: usize = HEADER_BYTES + 12;
/// Bytes of a whole zero marker record.
pub const MEM_ZERO_RECORD_BYTES: usize = HEADER_BYTES + 12 + CRC_BYTES;

/// The first [`MEM_DATA_HEAD_BYTES`] of a memory data record of `pages`
/// pages from `start_gfn`, for an encoder that puts the page bytes in
/// place itself (the record's CRC then covers these bytes and the pages;
/// [`crate::digest::crc32_append_page`] builds it from the pages' CRCs).
/// The same bytes as [`encode_mem_data`] writes.
pub fn mem_data_head(start_gfn: u64, pages: u32) -> [u8; MEM_DATA_HEAD_BYTES] {
    let payload = 12 + pages as usize * PAGE_SIZE;
    let mut h = [0u8; MEM_DATA_HEAD_BYTES];
    h[0..2].copy_from_slice(&ty::MEM_DATA.to_le_bytes());
    h[4..8].copy_from_slice(&(payload as u32).to_le_bytes());
    h[8..16].copy_from_slice(&start_gfn.to_le_bytes());
    h[16..20].copy_from_slice(&pages.to_le_bytes());
    h
}

/// A whole zero marker record, the bytes [`encode_mem_zero`] appends.
pub fn mem_zero_record(start_gfn: u64, pages: u32) -> [u8; MEM_ZERO_RECORD_BYTES] {
    let mut r = [0u8; MEM_ZERO_RECORD_BYTES];
    r[0..2].copy_from_slice(&ty::MEM_ZERO.to_le_bytes());
    r[4..8].copy_from_slice(&12u32.to_le_bytes());
    r[8..16].copy_from_slice(&start_gfn.to_le_bytes());
    r[16..20].copy_from_slice(&pages.to_le_bytes());
    let crc = crc32fast::hash(&r[..20]);
    r[20..24].copy_from_slice(&crc.to_le_bytes());
    r
}

/// Append a zero marker for `pages` pages starting at `start_gfn`.
pub fn encode_mem_zero(start_gfn: u64, pages: u64, out: &mut Vec<u8>) {
    frame(out, ty::MEM_ZERO, 0, |o| {
        put_u64(o, start_gfn);
        put_u32(o, u32::try_from(pages).unwrap_or(u32::MAX));
    });
}

/// Append a record of arbitrary type and flags (for tests of unknown and
/// optional records).
#[doc(hidden)]
pub fn encode_raw(t: u16, flags: u16, payload: &[u8], out: &mut Vec<u8>) {
    frame(out, t, flags, |o| o.extend_from_slice(payload));
}

/// The source's choice: the highest version both sides support.
pub fn negotiate(offered: &[u16], supported: &'static [u16]) -> Result<u16, StreamError> {
    offered
        .iter()
        .copied()
        .filter(|v| supported.contains(v))
        .max()
        .ok_or_else(|| StreamError::NoCommonVersion {
            offered: offered.to_owned(),
            supported,
        })
}

/// What [`Decoder::next_item`] yields.
#[derive(Debug, PartialEq, Eq)]
pub enum Item<'a> {
    /// A memory data record: `data.len() / 4096` pages from `start_gfn`,
    /// lent from the decoder's buffer; each page's CRC-32
    /// (`crc32fast::hash(page)`) before version 5, none from version 5 on
    /// (the link's MAC covered the bytes); `offset`: where the first page's
    /// bytes are in the stream (magic included), which a version-5 page
    /// hash names ([`crate::digest::page_hash_at`]).
    Pages {
        start_gfn: u64,
        data: &'a [u8],
        page_crcs: &'a [u32],
        offset: u64,
    },
    /// Any other record.
    Record(Record),
}

/// A decoded record inside the decoder: memory data by position.
enum Next {
    Pages {
        start_gfn: u64,
        at: usize,
        pages: usize,
    },
    Record(Record),
}

/// Which direction a [`Decoder`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The main stream: configuration, memory, state.
    SourceToDest,
    /// The back channel: offer, ready, resumed.
    DestToSource,
}

impl Direction {
    /// The magic this direction opens with.
    pub const fn magic(self) -> [u8; 8] {
        match self {
            Direction::SourceToDest => MAGIC_SOURCE,
            Direction::DestToSource => MAGIC_DEST,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Magic,
    // Source -> destination.
    Select,
    Config,
    Memory,
    /// After the verify record: no more memory, vCPU state next.
    Verified,
    Vcpus,
    Devices,
    AwaitGo,
    // Destination -> source.
    Offer,
    AwaitReady,
    AwaitResumed,
    Done,
}

impl State {
    fn describe(self) -> &'static str {
        match self {
            State::Magic => "waiting for the stream magic",
            State::Select => "waiting for the version selection",
            State::Config => "waiting for the VM configuration",
            State::Memory => "receiving memory",
            State::Verified => "expecting vCPU state after the memory verify record",
            State::Vcpus => "receiving vCPU state",
            State::Devices => "receiving device state",
            State::AwaitGo => "waiting for the go order",
            State::Offer => "waiting for the version offer",
            State::AwaitReady => "waiting for the destination to be ready",
            State::AwaitResumed => "waiting for the resume confirmation",
            State::Done => "the stream has ended",
        }
    }
}

/// Incremental decoder for one direction of a migration stream.
///
/// Feed bytes in any chunking with [`Decoder::feed`], then call
/// [`Decoder::next_record`] until it returns `Ok(None)`. After the first
/// error the decoder is poisoned and keeps returning that error.
#[derive(Debug)]
pub struct Decoder {
    dir: Direction,
    /// Received bytes: `buf[pos..end]` are not yet decoded; `buf[end..]`
    /// is room a caller may receive into ([`Decoder::spare`]).
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// Stream bytes dropped from the front of `buf` so far: `buf[i]` is
    /// byte `base + i` of the stream.
    base: u64,
    /// The versions a select record may name.
    versions: &'static [u16],
    /// The CRC-32 of each page of the last memory data record.
    page_crcs: [u32; MAX_DATA_RUN_PAGES as usize],
    record: u64,
    state: State,
    error: Option<StreamError>,
    version: u16,
    ram_pages: u64,
    vcpus: u32,
    vcpus_seen: u32,
    devices: Vec<DeviceDesc>,
    devices_seen: usize,
    aborted: bool,
}

impl Decoder {
    /// A decoder expecting the start of a `dir` stream.
    pub fn new(dir: Direction) -> Self {
        Self {
            dir,
            buf: Vec::new(),
            pos: 0,
            end: 0,
            base: 0,
            versions: SUPPORTED_VERSIONS,
            page_crcs: [0; MAX_DATA_RUN_PAGES as usize],
            record: 0,
            state: State::Magic,
            error: None,
            version: 0,
            ram_pages: 0,
            vcpus: 0,
            vcpus_seen: 0,
            devices: Vec::new(),
            devices_seen: 0,
            aborted: false,
        }
    }

    /// Accept only these versions in the select record (a receiver over a
    /// link that is not authenticated: [`UNSEALED_VERSIONS`]); a select
    /// of another supported version is refused naming why. Default: all of
    /// [`SUPPORTED_VERSIONS`].
    pub fn set_versions(&mut self, versions: &'static [u16]) {
        self.versions = versions;
    }

    /// Append received bytes. Call [`Decoder::next_record`] until it yields
    /// `Ok(None)` before feeding more, so at most one partial record and one
    /// chunk are buffered.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.spare(bytes.len()).copy_from_slice(bytes);
        self.filled(bytes.len());
    }

    /// Room for `n` more bytes at the end of the buffer, for a caller that
    /// receives straight into it (no copy through a buffer of its own);
    /// then [`Decoder::filled`] with how many it wrote. The same contract
    /// as [`Decoder::feed`]: decode everything before asking again.
    pub fn spare(&mut self, n: usize) -> &mut [u8] {
        // Decoded bytes are dropped from the front when they are at least
        // as many as those left (each byte moves about once at most) or
        // the room is short; the buffer grows only to what it holds plus
        // `n`.
        let live = self.end - self.pos;
        if self.pos > 0 && (self.pos >= live || self.end + n > self.buf.len()) {
            self.buf.copy_within(self.pos..self.end, 0);
            self.base += self.pos as u64;
            self.pos = 0;
            self.end = live;
        }
        if self.buf.len() < self.end + n {
            self.buf.resize(self.end + n, 0);
        }
        &mut self.buf[self.end..self.end + n]
    }

    /// `n` bytes were written at the start of [`Decoder::spare`]'s room.
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The stream ended with its final record (`go`, `resumed` or `abort`).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The stream ended with an abort record.
    pub fn aborted(&self) -> bool {
        self.aborted
    }

    /// The negotiated protocol version (0 before the select record).
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Bytes held: at most one partial record plus the last chunk fed.
    pub fn buffered_bytes(&self) -> usize {
        self.end - self.pos
    }

    /// Number of records decoded so far.
    pub fn records(&self) -> u64 {
        self.record
    }

    /// The channel closed: an error unless the stream had ended.
    pub fn finish(&self) -> Result<(), StreamError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.state == State::Done {
            return Ok(());
        }
        Err(StreamError::Incomplete {
            record: self.record,
            state: self.state.describe(),
        })
    }

    /// The next complete record, `Ok(None)` if more bytes are needed.
    /// Memory data comes as [`Record::MemData`] with its own copy of the
    /// pages; [`Decoder::next_item`] lends them instead.
    pub fn next_record(&mut self) -> Result<Option<Record>, StreamError> {
        Ok(match self.next_item()? {
            None => None,
            Some(Item::Record(r)) => Some(r),
            Some(Item::Pages {
                start_gfn, data, ..
            }) => Some(Record::MemData {
                start_gfn,
                data: data.to_vec(),
            }),
        })
    }

    /// The next complete record, `Ok(None)` if more bytes are needed; a
    /// memory data record's pages are lent from the decoder's buffer, with
    /// the CRC of each page (the record's CRC was checked from them: one
    /// CRC pass over the page bytes, whose results the receiver's page
    /// hashes reuse).
    pub fn next_item(&mut self) -> Result<Option<Item<'_>>, StreamError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        match self.next_inner() {
            Ok(None) => Ok(None),
            Ok(Some(Next::Record(r))) => Ok(Some(Item::Record(r))),
            Ok(Some(Next::Pages {
                start_gfn,
                at,
                pages,
            })) => Ok(Some(Item::Pages {
                start_gfn,
                data: &self.buf[at..at + pages * PAGE_SIZE],
                page_crcs: if self.version >= SEALED_VERSION {
                    &[]
                } else {
                    &self.page_crcs[..pages]
                },
                offset: self.base + at as u64,
            })),
            Err(e) => {
                self.error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Decode the next record straight from `bytes`, the stream bytes
    /// that follow everything fed so far, where they lie (a transport's
    /// buffer: no copy into the decoder's). Only while nothing is
    /// buffered here: else it uses nothing (`Ok((None, 0))`) and the
    /// caller feeds `bytes` instead. Returns the record (memory pages lent
    /// from `bytes`), or `None` when `bytes` ends inside one, and the
    /// bytes used, which the caller must not pass again: what is left
    /// after a `None` is a partial record the caller feeds
    /// ([`Decoder::feed`]). The same checks, caps and errors as
    /// [`Decoder::next_item`].
    pub fn next_item_in<'b>(
        &'b mut self,
        bytes: &'b [u8],
    ) -> Result<(Option<Item<'b>>, usize), StreamError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.pos != self.end {
            return Ok((None, 0));
        }
        // The stream offset of `bytes[0]`; nothing buffered stays here.
        let start = self.base + self.end as u64;
        let (next, used) = match self.next_in(bytes) {
            Ok(r) => r,
            Err(e) => {
                self.error = Some(e.clone());
                return Err(e);
            }
        };
        self.base = start + used as u64;
        self.pos = 0;
        self.end = 0;
        let item = next.map(|n| match n {
            Next::Record(r) => Item::Record(r),
            Next::Pages {
                start_gfn,
                at,
                pages,
            } => Item::Pages {
                start_gfn,
                data: &bytes[at..at + pages * PAGE_SIZE],
                page_crcs: if self.version >= SEALED_VERSION {
                    &[]
                } else {
                    &self.page_crcs[..pages]
                },
                offset: start + at as u64,
            },
        });
        Ok((item, used))
    }

    /// A well-formed memory data record of `pages` (1..=64) pages whose
    /// head starts `whole`: its CRC from one pass over each page (kept in
    /// `page_crcs`) combined with the head's; from version 5 on the
    /// head's alone (the pages are the MAC's).
    fn mem_data_crc(&mut self, whole: &[u8], pages: usize) -> u32 {
        let head = &whole[..MEM_DATA_HEAD_BYTES];
        let mut crc = crc32fast::hash(head);
        if self.version >= SEALED_VERSION {
            return crc;
        }
        let first = MEM_DATA_HEAD_BYTES;
        for (i, page) in whole[first..first + pages * PAGE_SIZE]
            .chunks_exact(PAGE_SIZE)
            .enumerate()
        {
            let c = crc32fast::hash(page);
            self.page_crcs[i] = c;
            crc = crate::digest::crc32_append_page(crc, c);
        }
        crc
    }

    /// The next record from the buffered bytes (memory pages by their
    /// place in `buf`).
    fn next_inner(&mut self) -> Result<Option<Next>, StreamError> {
        let buf = core::mem::take(&mut self.buf);
        let r = self.next_in(&buf[self.pos..self.end]);
        self.buf = buf;
        let (next, used) = r?;
        let start = self.pos;
        self.pos += used;
        Ok(next.map(|n| match n {
            Next::Pages {
                start_gfn,
                at,
                pages,
            } => Next::Pages {
                start_gfn,
                at: start + at,
                pages,
            },
            r => r,
        }))
    }

    /// Decode the next record from the front of `avail`: the record
    /// (memory pages by their place in `avail`) or `None` when `avail`
    /// ends inside one, and the bytes used (the magic and skipped optional
    /// records count, also before a `None`).
    fn next_in(&mut self, avail: &[u8]) -> Result<(Option<Next>, usize), StreamError> {
        let mut used = 0;
        loop {
            let avail = &avail[used..];
            if self.state == State::Done {
                if avail.is_empty() {
                    return Ok((None, used));
                }
                return Err(StreamError::TrailingBytes { len: avail.len() });
            }
            if self.state == State::Magic {
                let Some(m) = avail.get(..8) else {
                    return Ok((None, used));
                };
                let mut found = [0u8; 8];
                found.copy_from_slice(m);
                let expected = self.dir.magic();
                if found != expected {
                    return Err(StreamError::BadMagic { found, expected });
                }
                used += 8;
                self.state = match self.dir {
                    Direction::SourceToDest => State::Select,
                    Direction::DestToSource => State::Offer,
                };
                continue;
            }
            let Some(h) = avail.get(..HEADER_BYTES) else {
                return Ok((None, used));
            };
            let t = u16::from_le_bytes([h[0], h[1]]);
            let flags = u16::from_le_bytes([h[2], h[3]]);
            let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            let record = self.record;
            if flags & !FLAG_OPTIONAL != 0 {
                return Err(StreamError::InvalidValue {
                    record,
                    what: "record flags",
                    value: u64::from(flags),
                });
            }
            let info = type_info(t);
            let (name, cap) = match info {
                Some(i) => i,
                None if flags & FLAG_OPTIONAL != 0 => ("optional", MAX_OPTIONAL_RECORD_BYTES),
                None => {
                    return Err(StreamError::UnknownRecord {
                        record,
                        raw_type: t,
                    })
                }
            };
            if len > cap {
                return Err(StreamError::RecordTooLong {
                    record,
                    kind: name,
                    len,
                    cap,
                });
            }
            let total = HEADER_BYTES + len as usize + CRC_BYTES;
            let Some(whole) = avail.get(..total) else {
                return Ok((None, used));
            };
            let body_end = HEADER_BYTES + len as usize;
            let stored = u32::from_le_bytes([
                whole[body_end],
                whole[body_end + 1],
                whole[body_end + 2],
                whole[body_end + 3],
            ]);
            // A memory data record of the right shape: its pages are CRC'd
            // one by one and lent, not copied.
            let run = (t == ty::MEM_DATA && len as usize >= 12).then(|| {
                let gfn = u64::from_le_bytes(whole[8..16].try_into().unwrap_or([0; 8]));
                let pages = u32::from_le_bytes(whole[16..20].try_into().unwrap_or([0; 4]));
                (gfn, pages as usize)
            });
            if let Some((start_gfn, pages)) = run.filter(|&(_, p)| {
                (1..=MAX_DATA_RUN_PAGES as usize).contains(&p) && len as usize == 12 + p * PAGE_SIZE
            }) {
                let computed = self.mem_data_crc(whole, pages);
                if stored != computed {
                    return Err(StreamError::CrcMismatch {
                        record,
                        stored,
                        computed,
                    });
                }
                match self.state {
                    State::Memory => self.check_run(record, start_gfn, pages as u64)?,
                    s => {
                        return Err(StreamError::UnexpectedRecord {
                            record,
                            kind: "memory data",
                            state: s.describe(),
                        })
                    }
                }
                let at = used + MEM_DATA_HEAD_BYTES;
                self.record += 1;
                return Ok((
                    Some(Next::Pages {
                        start_gfn,
                        at,
                        pages,
                    }),
                    used + total,
                ));
            }
            let computed = crc32fast::hash(&whole[..body_end]);
            if stored != computed {
                return Err(StreamError::CrcMismatch {
                    record,
                    stored,
                    computed,
                });
            }
            used += total;
            self.record += 1;
            if info.is_none() {
                continue; // Optional record of an unknown type: skipped.
            }
            let rec = parse(t, &whole[HEADER_BYTES..body_end], record)?;
            self.advance(&rec, record)?;
            return Ok((Some(Next::Record(rec)), used));
        }
    }

    /// Apply the state machine (module docs) to a well-formed record.
    fn advance(&mut self, rec: &Record, record: u64) -> Result<(), StreamError> {
        let unexpected = |s: State| StreamError::UnexpectedRecord {
            record,
            kind: rec.name(),
            state: s.describe(),
        };
        let s = self.state;
        match (s, rec) {
            (_, Record::Abort { .. }) => {
                self.aborted = true;
                self.state = State::Done;
            }
            (State::Offer, Record::Offer { .. }) => self.state = State::AwaitReady,
            (State::AwaitReady, Record::Ready { .. }) => self.state = State::AwaitResumed,
            (State::AwaitReady, Record::Progress { .. }) => {}
            (State::AwaitResumed, Record::Resumed) => self.state = State::Done,
            (State::Select, Record::Select { version }) => {
                if !SUPPORTED_VERSIONS.contains(version) {
                    return Err(StreamError::UnsupportedVersion {
                        record,
                        version: *version,
                    });
                }
                if !self.versions.contains(version) {
                    return Err(StreamError::VersionNeedsSealedLink {
                        record,
                        version: *version,
                    });
                }
                self.version = *version;
                self.state = State::Config;
            }
            (State::Config, Record::Config(c)) => {
                self.ram_pages = c.ram_pages();
                self.vcpus = c.vcpus;
                self.devices = c.devices.clone();
                self.state = State::Memory;
            }
            (State::Memory, Record::MemData { start_gfn, data }) => {
                self.check_run(record, *start_gfn, (data.len() / PAGE_SIZE) as u64)?
            }
            (State::Memory, Record::MemZero { start_gfn, pages }) => {
                self.check_run(record, *start_gfn, *pages)?
            }
            (State::Memory, Record::MemVerify { .. }) => {
                if self.version < VERIFY_VERSION {
                    return Err(unexpected(State::Memory));
                }
                self.state = State::Verified;
            }
            (State::Memory | State::Verified | State::Vcpus, Record::Vcpu(v)) => {
                if v.nmi_blocked && self.version < NMI_STATE_VERSION {
                    return Err(StreamError::InvalidValue {
                        record,
                        what: "NMI blocking (a version-3 field) in the vCPU record",
                        value: u64::from(self.version),
                    });
                }
                if v.id != self.vcpus_seen {
                    return Err(StreamError::VcpuOutOfOrder {
                        record,
                        expected: self.vcpus_seen,
                        found: v.id,
                    });
                }
                self.vcpus_seen += 1;
                self.state = if self.vcpus_seen == self.vcpus {
                    State::Devices
                } else {
                    State::Vcpus
                };
            }
            (
                State::Memory | State::Verified | State::Vcpus,
                Record::Device(_) | Record::End { .. },
            ) => {
                return Err(StreamError::MissingState {
                    record,
                    what: "vCPU",
                    expected: u64::from(self.vcpus),
                    found: u64::from(self.vcpus_seen),
                })
            }
            (State::Devices, Record::Device(d)) => match self.devices.get(self.devices_seen) {
                Some(want)
                    if want.kind == d.kind
                        && want.instance == d.instance
                        && want.version == d.version =>
                {
                    self.devices_seen += 1
                }
                _ => {
                    return Err(StreamError::DeviceMismatch {
                        record,
                        kind: d.kind,
                        instance: d.instance,
                    })
                }
            },
            (State::Devices, Record::End { .. }) => {
                if self.devices_seen != self.devices.len() {
                    return Err(StreamError::MissingState {
                        record,
                        what: "device",
                        expected: self.devices.len() as u64,
                        found: self.devices_seen as u64,
                    });
                }
                self.state = State::AwaitGo;
            }
            (State::AwaitGo, Record::Go) => self.state = State::Done,
            (s, _) => return Err(unexpected(s)),
        }
        Ok(())
    }

    fn check_run(&self, record: u64, start_gfn: u64, pages: u64) -> Result<(), StreamError> {
        match start_gfn.checked_add(pages) {
            Some(end) if end <= self.ram_pages => Ok(()),
            _ => Err(StreamError::GfnOutOfRange {
                record,
                start_gfn,
                pages,
                ram_pages: self.ram_pages,
            }),
        }
    }
}

/// Parse a payload whose type is known and whose CRC matched.
fn parse(t: u16, payload: &[u8], record: u64) -> Result<Record, StreamError> {
    let mut r = Reader::new(payload, record);
    let rec = match t {
        ty::OFFER => {
            let n = r.u8("offer.count")?;
            if n == 0 || usize::from(n) > MAX_OFFERED_VERSIONS {
                return Err(StreamError::InvalidValue {
                    record,
                    what: "offered version count",
                    value: u64::from(n),
                });
            }
            let mut versions = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                versions.push(r.u16("offer.version")?);
            }
            Record::Offer { versions }
        }
        ty::SELECT => Record::Select {
            version: r.u16("select.version")?,
        },
        ty::CONFIG => Record::Config(VmConfig::decode(&mut r)?),
        ty::MEM_DATA | ty::MEM_ZERO => {
            let start_gfn = r.u64("memory.start_gfn")?;
            let pages = u64::from(r.u32("memory.pages")?);
            let cap = if t == ty::MEM_DATA {
                MAX_DATA_RUN_PAGES
            } else {
                MAX_ZERO_RUN_PAGES
            };
            if pages > cap {
                return Err(StreamError::RunTooLong { record, pages, cap });
            }
            if pages == 0 {
                return Err(StreamError::InvalidValue {
                    record,
                    what: "memory run length",
                    value: 0,
                });
            }
            if t == ty::MEM_ZERO {
                Record::MemZero { start_gfn, pages }
            } else {
                // pages <= 64, so this cannot overflow.
                let data = r.bytes(pages as usize * PAGE_SIZE, "memory.data")?.to_vec();
                Record::MemData { start_gfn, data }
            }
        }
        ty::VCPU => Record::Vcpu(Box::new(VcpuState::decode(&mut r)?)),
        ty::DEVICE => Record::Device(DeviceState::decode(&mut r)?),
        ty::MEM_VERIFY => Record::MemVerify {
            digest: r.u64("verify.digest")?,
        },
        ty::END => Record::End {
            digest: r.u64("end.digest")?,
        },
        ty::GO => Record::Go,
        ty::READY => Record::Ready {
            digest: r.u64("ready.digest")?,
        },
        ty::RESUMED => Record::Resumed,
        ty::PROGRESS => Record::Progress {
            applied: r.u64("progress.applied")?,
        },
        ty::ABORT => {
            let n = r.u16("abort.len")?;
            if usize::from(n) > MAX_ABORT_REASON_BYTES {
                return Err(StreamError::OverCap {
                    record,
                    what: "abort reason length",
                    value: u64::from(n),
                    cap: MAX_ABORT_REASON_BYTES as u64,
                });
            }
            let bytes = r.bytes(usize::from(n), "abort.reason")?;
            Record::Abort {
                reason: String::from_utf8_lossy(bytes).into_owned(),
            }
        }
        // type_info() returned Some for t, so t is one of the above.
        _ => {
            return Err(StreamError::UnknownRecord {
                record,
                raw_type: t,
            })
        }
    };
    let name = type_info(t).map_or("?", |(n, _)| n);
    r.finish(name)?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::{decode_all, sample_config, sample_streams, sample_vcpu};
    use alloc::string::ToString;
    use alloc::vec;

    /// The in-place encoder's pieces give the bytes of the appending one.
    #[test]
    fn in_place_memory_records_equal_the_encoders() {
        use crate::digest::crc32_append_page;
        let mut pages = vec![0u8; 3 * PAGE_SIZE];
        for (i, b) in pages.iter_mut().enumerate() {
            *b = (i * 11 + 5) as u8;
        }
        let mut want = Vec::new();
        encode_mem_data(0x1234, &pages, &mut want);
        let head = mem_data_head(0x1234, 3);
        let mut crc = crc32fast::hash(&head);
        for p in pages.chunks_exact(PAGE_SIZE) {
            crc = crc32_append_page(crc, crc32fast::hash(p));
        }
        let mut got = head.to_vec();
        got.extend_from_slice(&pages);
        got.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(got, want);
        let mut zero = Vec::new();
        encode_mem_zero(77, 9, &mut zero);
        assert_eq!(mem_zero_record(77, 9).to_vec(), zero);
    }

    fn decode(dir: Direction, bytes: &[u8]) -> Result<Vec<Record>, StreamError> {
        let mut d = Decoder::new(dir);
        d.feed(bytes);
        let mut out = Vec::new();
        while let Some(r) = d.next_record()? {
            out.push(r);
        }
        d.finish()?;
        Ok(out)
    }

    /// Stream prefix up to and including the configuration record.
    fn prefix() -> Vec<u8> {
        let mut s = Vec::from(MAGIC_SOURCE);
        Record::Select { version: 1 }.encode(&mut s);
        Record::Config(sample_config()).encode(&mut s);
        s
    }

    fn err_after_prefix(tail: &[u8]) -> StreamError {
        let mut s = prefix();
        s.extend_from_slice(tail);
        let mut d = Decoder::new(Direction::SourceToDest);
        d.feed(&s);
        loop {
            match d.next_record() {
                Ok(Some(_)) => {}
                Ok(None) => panic!("no error"),
                Err(e) => {
                    // Poisoned: the same error again.
                    assert_eq!(d.next_record(), Err(e.clone()));
                    return e;
                }
            }
        }
    }

    #[test]
    fn samples_round_trip_in_any_chunking() {
        for (dir, bytes) in sample_streams() {
            let whole = decode(dir, &bytes).unwrap();
            for chunk in [1, 3, 7, 4096, 100_000] {
                assert_eq!(decode_all(dir, &bytes, chunk), (whole.len() as u64, true));
            }
            let mut again = Vec::from(dir.magic());
            for r in &whole {
                r.encode(&mut again);
            }
            assert_eq!(again, bytes, "re-encoding is byte-identical");
        }
        let recs = decode(Direction::SourceToDest, &sample_streams()[0].1).unwrap();
        assert_eq!(recs[1], Record::Config(sample_config()));
        assert_eq!(recs[6], Record::Vcpu(Box::new(sample_vcpu(0))));
        assert_eq!(recs[7], Record::Vcpu(Box::new(sample_vcpu(1))));
        assert_eq!(recs.last(), Some(&Record::Go));
    }

    #[test]
    fn framing_errors_name_the_record() {
        let mut s = sample_streams().remove(0).1;
        let e = decode(Direction::DestToSource, &s).unwrap_err();
        assert!(matches!(e, StreamError::BadMagic { .. }), "{e}");
        // Flip a bit in the third record's payload (record 2: first memory).
        let off = prefix().len() + HEADER_BYTES + 20;
        s[off] ^= 0x10;
        let e = decode(Direction::SourceToDest, &s).unwrap_err();
        assert!(e.to_string().starts_with("record 2: CRC mismatch"), "{e}");
    }

    #[test]
    fn caps_are_enforced_before_buffering() {
        let mut hdr = Vec::new();
        put_u16(&mut hdr, ty::MEM_DATA);
        put_u16(&mut hdr, 0);
        put_u32(&mut hdr, u32::MAX);
        let e = err_after_prefix(&hdr);
        assert!(
            matches!(e, StreamError::RecordTooLong { record: 2, .. }),
            "{e}"
        );
        assert!(e
            .to_string()
            .contains("memory data record of 4294967295 bytes exceeds cap"));

        let mut run = Vec::new();
        let mut p = Vec::new();
        put_u64(&mut p, 0);
        put_u32(&mut p, 70_000);
        encode_raw(ty::MEM_DATA, 0, &p, &mut run);
        let e = err_after_prefix(&run);
        assert_eq!(
            e.to_string(),
            "record 2: memory run of 70000 pages exceeds cap 64"
        );

        let mut zero = Vec::new();
        encode_mem_zero(6, 3, &mut zero);
        let e = err_after_prefix(&zero);
        assert!(
            matches!(
                e,
                StreamError::GfnOutOfRange {
                    start_gfn: 6,
                    pages: 3,
                    ram_pages: 8,
                    ..
                }
            ),
            "{e}"
        );
        let mut wrap = Vec::new();
        encode_mem_zero(u64::MAX, 2, &mut wrap);
        assert!(matches!(
            err_after_prefix(&wrap),
            StreamError::GfnOutOfRange { .. }
        ));

        let mut short = Vec::new();
        encode_mem_data(0, &[0u8; 100], &mut short); // 0 pages claimed
        assert!(matches!(
            err_after_prefix(&short),
            StreamError::InvalidValue { .. }
        ));
        let mut p = Vec::new();
        put_u64(&mut p, 0);
        put_u32(&mut p, 2);
        p.extend_from_slice(&[1u8; PAGE_SIZE]);
        let mut trunc = Vec::new();
        encode_raw(ty::MEM_DATA, 0, &p, &mut trunc);
        assert!(matches!(
            err_after_prefix(&trunc),
            StreamError::Truncated {
                field: "memory.data",
                ..
            }
        ));

        let mut big = sample_vcpu(0);
        big.fpu.xsave = vec![0; crate::state::MAX_XSAVE_BYTES + 1];
        let mut v = Vec::new();
        big.encode(&mut v);
        let mut rec = Vec::new();
        encode_raw(ty::VCPU, 0, &v, &mut rec);
        let e = err_after_prefix(&rec);
        assert!(
            matches!(
                e,
                StreamError::RecordTooLong { .. } | StreamError::OverCap { .. }
            ),
            "{e}"
        );
    }

    #[test]
    fn unknown_types_error_unless_optional() {
        let mut r = Vec::new();
        encode_raw(0x7777, 0, b"hi", &mut r);
        let e = err_after_prefix(&r);
        assert_eq!(
            e,
            StreamError::UnknownRecord {
                record: 2,
                raw_type: 0x7777
            }
        );
        assert!(e.to_string().contains("0x7777"));

        let mut s = prefix();
        encode_raw(0x7777, FLAG_OPTIONAL, b"a hint", &mut s);
        encode_mem_zero(0, 8, &mut s);
        let mut d = Decoder::new(Direction::SourceToDest);
        d.feed(&s);
        let mut got = Vec::new();
        while let Some(r) = d.next_record().unwrap() {
            got.push(r);
        }
        assert_eq!(
            got.last(),
            Some(&Record::MemZero {
                start_gfn: 0,
                pages: 8
            })
        );

        let mut bad_flags = Vec::new();
        encode_raw(ty::GO, 0x8000, b"", &mut bad_flags);
        assert!(matches!(
            err_after_prefix(&bad_flags),
            StreamError::InvalidValue {
                what: "record flags",
                ..
            }
        ));
    }

    #[test]
    fn state_machine_order_is_enforced() {
        // vCPU 1 before vCPU 0.
        let mut r = Vec::new();
        Record::Vcpu(Box::new(sample_vcpu(1))).encode(&mut r);
        assert!(matches!(
            err_after_prefix(&r),
            StreamError::VcpuOutOfOrder {
                expected: 0,
                found: 1,
                ..
            }
        ));
        // End without vCPUs.
        let mut r = Vec::new();
        Record::End { digest: 0 }.encode(&mut r);
        let e = err_after_prefix(&r);
        assert_eq!(
            e.to_string(),
            "record 2: end of stream after 0 of 2 vCPU records"
        );
        // Memory after the first vCPU.
        let mut r = Vec::new();
        Record::Vcpu(Box::new(sample_vcpu(0))).encode(&mut r);
        encode_mem_zero(0, 1, &mut r);
        assert!(matches!(
            err_after_prefix(&r),
            StreamError::UnexpectedRecord { record: 3, .. }
        ));
        // Wrong device.
        let mut r = Vec::new();
        Record::Vcpu(Box::new(sample_vcpu(0))).encode(&mut r);
        Record::Vcpu(Box::new(sample_vcpu(1))).encode(&mut r);
        Record::Device(DeviceState {
            kind: 7,
            instance: 3,
            version: 2,
            payload: vec![],
        })
        .encode(&mut r);
        assert!(matches!(
            err_after_prefix(&r),
            StreamError::DeviceMismatch { kind: 7, .. }
        ));
        // A back-channel record in the main stream.
        let mut r = Vec::new();
        Record::Resumed.encode(&mut r);
        assert!(matches!(
            err_after_prefix(&r),
            StreamError::UnexpectedRecord {
                kind: "resumed",
                ..
            }
        ));
        // Config twice.
        let mut r = Vec::new();
        Record::Config(sample_config()).encode(&mut r);
        assert!(matches!(
            err_after_prefix(&r),
            StreamError::UnexpectedRecord {
                kind: "configuration",
                ..
            }
        ));
    }

    /// NMI blocking travels in version 3; a version-2 stream carrying it
    /// is refused (its peer would have read the byte as a bad boolean).
    #[test]
    fn nmi_blocking_only_in_version_3() {
        for (version, ok) in [(1u16, false), (2, false), (3, true)] {
            let mut s = Vec::from(MAGIC_SOURCE);
            Record::Select { version }.encode(&mut s);
            Record::Config(sample_config()).encode(&mut s);
            let blocked = VcpuState {
                nmi_blocked: true,
                interrupt_shadow: true,
                ..sample_vcpu(0)
            };
            Record::Vcpu(Box::new(blocked.clone())).encode(&mut s);
            let mut d = Decoder::new(Direction::SourceToDest);
            d.feed(&s);
            let mut last = None;
            let r = loop {
                match d.next_record() {
                    Ok(Some(rec)) => last = Some(rec),
                    Ok(None) => break Ok(last),
                    Err(e) => break Err(e),
                }
            };
            if ok {
                assert_eq!(r.unwrap(), Some(Record::Vcpu(Box::new(blocked))));
            } else {
                let e = r.unwrap_err();
                assert!(
                    e.to_string().contains("NMI blocking (a version-3 field)"),
                    "version {version}: {e}"
                );
            }
        }
    }

    /// Stream prefix of a version-2 stream, up to the configuration.
    fn prefix_v2() -> Vec<u8> {
        let mut s = Vec::from(MAGIC_SOURCE);
        Record::Select { version: 2 }.encode(&mut s);
        Record::Config(sample_config()).encode(&mut s);
        s
    }

    fn first_error(bytes: &[u8]) -> StreamError {
        let mut d = Decoder::new(Direction::SourceToDest);
        d.feed(bytes);
        loop {
            match d.next_record() {
                Ok(Some(_)) => {}
                Ok(None) => panic!("no error"),
                Err(e) => return e,
            }
        }
    }

    #[test]
    fn verify_record_only_in_version_2_after_the_memory() {
        // The sample version-2 stream: the verify record follows the last
        // memory record and carries the image digest.
        let v2 = sample_streams().remove(3).1;
        let recs = decode(Direction::SourceToDest, &v2).unwrap();
        let at = recs
            .iter()
            .position(|r| matches!(r, Record::MemVerify { .. }))
            .expect("verify record");
        assert!(matches!(recs[at - 1], Record::MemData { .. }));
        assert!(matches!(recs[at + 1], Record::Vcpu(_)));
        assert_eq!(recs[at].name(), "memory verify");
        let Record::End { digest } = recs[recs.len() - 2] else {
            panic!("{recs:?}")
        };
        assert_eq!(recs[at], Record::MemVerify { digest });

        let verify = {
            let mut r = Vec::new();
            Record::MemVerify { digest: 7 }.encode(&mut r);
            r
        };
        // Version 1 has no verify record.
        let mut s = prefix();
        s.extend_from_slice(&verify);
        let e = first_error(&s);
        assert_eq!(
            e.to_string(),
            "record 2: memory verify record not allowed while receiving memory"
        );
        // No memory after it, no second one.
        let mut s = prefix_v2();
        s.extend_from_slice(&verify);
        encode_mem_zero(0, 1, &mut s);
        assert!(matches!(
            first_error(&s),
            StreamError::UnexpectedRecord {
                record: 3,
                kind: "memory zero",
                ..
            }
        ));
        let mut s = prefix_v2();
        s.extend_from_slice(&verify);
        s.extend_from_slice(&verify);
        assert!(matches!(
            first_error(&s),
            StreamError::UnexpectedRecord {
                record: 3,
                kind: "memory verify",
                ..
            }
        ));
        // The vCPU state is still owed.
        let mut s = prefix_v2();
        s.extend_from_slice(&verify);
        Record::End { digest: 7 }.encode(&mut s);
        assert!(matches!(
            first_error(&s),
            StreamError::MissingState { what: "vCPU", .. }
        ));
        // A truncated payload is an error, not a panic.
        let mut s = prefix_v2();
        encode_raw(ty::MEM_VERIFY, 0, &[1, 2, 3], &mut s);
        assert!(matches!(
            first_error(&s),
            StreamError::Truncated {
                field: "verify.digest",
                ..
            }
        ));
    }

    #[test]
    fn stream_end_and_trailing_bytes() {
        let full = sample_streams().remove(0).1;
        let mut d = Decoder::new(Direction::SourceToDest);
        d.feed(&full[..full.len() - 1]);
        while let Some(_r) = d.next_record().unwrap() {}
        let e = d.finish().unwrap_err();
        assert!(
            matches!(
                e,
                StreamError::Incomplete {
                    state: "waiting for the go order",
                    ..
                }
            ),
            "{e}"
        );
        let mut extra = full.clone();
        extra.push(0);
        assert_eq!(
            decode(Direction::SourceToDest, &extra),
            Err(StreamError::TrailingBytes { len: 1 })
        );
        let aborted = sample_streams().remove(1).1;
        let mut d = Decoder::new(Direction::SourceToDest);
        d.feed(&aborted);
        let mut last = None;
        while let Some(r) = d.next_record().unwrap() {
            last = Some(r);
        }
        assert!(d.is_done() && d.aborted());
        assert_eq!(
            last,
            Some(Record::Abort {
                reason: "operator cancelled".into()
            })
        );
    }

    #[test]
    fn buffering_is_bounded_by_one_record() {
        // A valid stream of many full data records, fed in 10 KiB chunks.
        let mut s = Vec::from(MAGIC_SOURCE);
        Record::Select { version: 1 }.encode(&mut s);
        let mut cfg = sample_config();
        cfg.ram_bytes = 1024 * PAGE_SIZE as u64;
        Record::Config(cfg).encode(&mut s);
        let run = vec![0x5a; MAX_DATA_RUN_PAGES as usize * PAGE_SIZE];
        for i in 0..16 {
            encode_mem_data(i * MAX_DATA_RUN_PAGES, &run, &mut s);
        }
        let mut d = Decoder::new(Direction::SourceToDest);
        let mut peak = 0;
        let mut n = 0;
        for c in s.chunks(10 * 1024) {
            d.feed(c);
            peak = peak.max(d.buffered_bytes());
            while d.next_record().unwrap().is_some() {
                n += 1;
            }
        }
        assert_eq!(n, 18);
        assert!(peak <= MAX_RECORD_BYTES + 10 * 1024, "{peak}");
    }

    /// Memory data is lent from the decoder's buffer with each page's CRC
    /// (the same values as hashing the pages), the record's CRC is still
    /// checked from them, and the state machine still applies.
    #[test]
    fn pages_are_lent_with_their_crcs_and_still_checked() {
        let mut cfg = sample_config();
        cfg.ram_bytes = 256 * PAGE_SIZE as u64;
        let mut s = Vec::from(MAGIC_SOURCE);
        Record::Select { version: 3 }.encode(&mut s);
        Record::Config(cfg).encode(&mut s);
        let run: Vec<u8> = (0..3 * PAGE_SIZE)
            .map(|i| (i * 31 + i / 4096) as u8)
            .collect();
        let at = s.len();
        encode_mem_data(7, &run, &mut s);
        let mut d = Decoder::new(Direction::SourceToDest);
        // Received straight into the decoder, in uneven pieces.
        for c in s.chunks(1000) {
            d.spare(c.len()).copy_from_slice(c);
            d.filled(c.len());
        }
        assert!(matches!(
            d.next_item(),
            Ok(Some(Item::Record(Record::Select { .. })))
        ));
        assert!(matches!(
            d.next_item(),
            Ok(Some(Item::Record(Record::Config(_))))
        ));
        match d.next_item() {
            Ok(Some(Item::Pages {
                start_gfn,
                data,
                page_crcs,
                offset,
            })) => {
                assert_eq!(start_gfn, 7);
                assert_eq!(offset, (at + MEM_DATA_HEAD_BYTES) as u64, "in the stream");
                assert_eq!(data, &run[..]);
                let want: Vec<u32> = run.chunks(PAGE_SIZE).map(crc32fast::hash).collect();
                assert_eq!(page_crcs, &want[..]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(d.next_item(), Ok(None));
        // A flipped bit in the last page: refused by the record's CRC.
        let mut bad = s.clone();
        bad[at + MEM_DATA_HEAD_BYTES + 3 * PAGE_SIZE - 1] ^= 1;
        let e = decode(Direction::SourceToDest, &bad).unwrap_err();
        assert!(
            matches!(e, StreamError::CrcMismatch { record: 2, .. }),
            "{e}"
        );
        // Outside RAM, and after the vCPU state: refused as before.
        let mut far = s[..at].to_vec();
        encode_mem_data(255, &run, &mut far);
        assert!(matches!(
            decode(Direction::SourceToDest, &far),
            Err(StreamError::GfnOutOfRange { start_gfn: 255, .. })
        ));
        let mut late = s[..at].to_vec();
        Record::Vcpu(Box::new(sample_vcpu(0))).encode(&mut late);
        encode_mem_data(0, &run, &mut late);
        assert!(matches!(
            decode(Direction::SourceToDest, &late),
            Err(StreamError::UnexpectedRecord {
                record: 3,
                kind: "memory data",
                ..
            })
        ));
    }

    /// Version 5 (sealed links): a memory data record's CRC covers its head
    /// only, so altered page bytes pass the decoder (the link's MAC is
    /// their check) while an altered head still fails; the pages come
    /// without CRCs but with their stream offset. Version 4 still checks
    /// every page byte.
    #[test]
    fn version_5_leaves_page_bytes_to_the_link() {
        let mut cfg = sample_config();
        cfg.ram_bytes = 256 * PAGE_SIZE as u64;
        let run: Vec<u8> = (0..2 * PAGE_SIZE).map(|i| (i * 7 + 1) as u8).collect();
        for version in [4u16, 5] {
            let mut s = Vec::from(MAGIC_SOURCE);
            Record::Select { version }.encode(&mut s);
            Record::Config(cfg.clone()).encode(&mut s);
            let at = s.len();
            // What the source's batch writes: the head, the pages, the
            // CRC over the head alone (version 5) or over all of it.
            s.extend_from_slice(&mem_data_head(9, 2));
            s.extend_from_slice(&run);
            let crc = if version >= SEALED_VERSION {
                crc32fast::hash(&s[at..at + MEM_DATA_HEAD_BYTES])
            } else {
                crc32fast::hash(&s[at..])
            };
            s.extend_from_slice(&crc.to_le_bytes());
            let mut d = Decoder::new(Direction::SourceToDest);
            d.feed(&s);
            assert!(d.next_item().unwrap().is_some());
            assert!(d.next_item().unwrap().is_some());
            match d.next_item() {
                Ok(Some(Item::Pages {
                    start_gfn,
                    data,
                    page_crcs,
                    offset,
                })) => {
                    assert_eq!((start_gfn, data), (9, &run[..]));
                    assert_eq!(offset, (at + MEM_DATA_HEAD_BYTES) as u64);
                    assert_eq!(page_crcs.len(), if version == 5 { 0 } else { 2 });
                }
                other => panic!("version {version}: {other:?}"),
            }
            let mut page_flip = s.clone();
            page_flip[at + MEM_DATA_HEAD_BYTES + 5] ^= 1;
            let r = decode_prefix_records(&page_flip);
            if version == 5 {
                assert_eq!(r, Ok(3), "the page bytes are the MAC's");
            } else {
                assert!(matches!(r, Err(StreamError::CrcMismatch { .. })), "{r:?}");
            }
            let mut head_flip = s.clone();
            head_flip[at + 8] ^= 1; // start_gfn
            assert!(matches!(
                decode_prefix_records(&head_flip),
                Err(StreamError::CrcMismatch { record: 2, .. })
            ));
        }
    }

    /// Records decoded before the bytes ran out, or the first error.
    fn decode_prefix_records(bytes: &[u8]) -> Result<usize, StreamError> {
        let mut d = Decoder::new(Direction::SourceToDest);
        d.feed(bytes);
        let mut n = 0;
        while d.next_record()?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    /// A destination over a link that is not sealed offers versions 1-4;
    /// a source selecting 5 anyway is refused, saying why.
    #[test]
    fn version_5_is_refused_where_the_link_is_not_sealed() {
        assert_eq!(versions_for(false), UNSEALED_VERSIONS);
        assert_eq!(versions_for(true), SUPPORTED_VERSIONS);
        assert_eq!(negotiate(&[1, 2, 3, 4, 5], versions_for(false)), Ok(4));
        assert_eq!(negotiate(&[1, 2, 3, 4], versions_for(true)), Ok(4));
        let mut s = Vec::from(MAGIC_SOURCE);
        Record::Select { version: 5 }.encode(&mut s);
        let mut d = Decoder::new(Direction::SourceToDest);
        d.set_versions(UNSEALED_VERSIONS);
        d.feed(&s);
        let e = d.next_record().unwrap_err();
        assert_eq!(
            e,
            StreamError::VersionNeedsSealedLink {
                record: 0,
                version: 5
            }
        );
        assert!(e.to_string().contains("this link is not sealed"), "{e}");
        let mut d = Decoder::new(Direction::SourceToDest);
        d.feed(&s);
        assert_eq!(
            d.next_record(),
            Ok(Some(Record::Select { version: 5 })),
            "accepted by default"
        );
    }

    /// Progress records (version 4) belong to the back channel before
    /// `ready`; anywhere else they are refused.
    #[test]
    fn progress_only_in_the_back_channel_before_ready() {
        let mut b = Vec::from(MAGIC_DEST);
        Record::Offer { versions: vec![4] }.encode(&mut b);
        Record::Progress { applied: 9 }.encode(&mut b);
        Record::Progress { applied: 10 }.encode(&mut b);
        Record::Ready { digest: 1 }.encode(&mut b);
        let recs = decode(Direction::DestToSource, &{
            let mut all = b.clone();
            Record::Resumed.encode(&mut all);
            all
        })
        .unwrap();
        assert_eq!(recs[2], Record::Progress { applied: 10 });
        let mut late = b.clone();
        Record::Progress { applied: 11 }.encode(&mut late);
        assert!(matches!(
            decode(Direction::DestToSource, &late),
            Err(StreamError::UnexpectedRecord {
                kind: "progress",
                ..
            })
        ));
        let mut main = prefix();
        Record::Progress { applied: 1 }.encode(&mut main);
        assert!(matches!(
            err_after_prefix(&main[prefix().len()..]),
            StreamError::UnexpectedRecord {
                kind: "progress",
                ..
            }
        ));
    }

    #[test]
    fn version_negotiation() {
        assert_eq!(negotiate(&[1, 2, 3], &[1, 2]), Ok(2));
        assert_eq!(negotiate(&[3, 1], &[1]), Ok(1));
        let e = negotiate(&[2, 3], &[1]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no common protocol version: destination offers [2, 3], source supports [1]; upgrade one side"
        );
        let mut s = Vec::from(MAGIC_SOURCE);
        Record::Select { version: 9 }.encode(&mut s);
        assert_eq!(
            decode(Direction::SourceToDest, &s),
            Err(StreamError::UnsupportedVersion {
                record: 0,
                version: 9
            })
        );
        let mut b = Vec::from(MAGIC_DEST);
        Record::Offer { versions: vec![] }.encode(&mut b);
        assert!(matches!(
            decode(Direction::DestToSource, &b),
            Err(StreamError::InvalidValue { .. })
        ));
    }

    #[test]
    fn abort_reason_is_capped_on_a_char_boundary() {
        let reason: String = core::iter::repeat_n('é', 200).collect(); // 400 bytes
        let mut s = prefix();
        Record::Abort { reason }.encode(&mut s);
        let recs = decode(Direction::SourceToDest, &s).unwrap();
        match recs.last() {
            Some(Record::Abort { reason }) => assert_eq!(reason.len(), 256),
            other => panic!("{other:?}"),
        }
    }
}
