//! Error types of the migration crate: one enum per concern, all `no_std`,
//! all with messages an operator can act on.
//!
//! - [`StreamError`]: the bytes on the wire are not a valid migration stream
//!   (STYLE 4, home 3: abort *that migration*, the VM keeps running at the
//!   source). Record numbers count records from 0 after the 8-byte magic, in
//!   one direction of the stream.
//! - [`TransportError`]: the byte channel failed.
//! - [`VmError`]: the hypervisor refused an operation on the VM.
//! - [`MigrationError`]: why a whole migration ended without completing; it
//!   wraps the three above and adds the engine's own reasons.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// The migration stream violated the protocol. Never a panic: every decoder
/// path that meets bad bytes returns one of these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamError {
    /// The first 8 bytes were not the expected magic.
    BadMagic { found: [u8; 8], expected: [u8; 8] },
    /// The two ends have no protocol version in common.
    NoCommonVersion {
        offered: Vec<u16>,
        supported: &'static [u16],
    },
    /// The source selected a version this decoder does not implement.
    UnsupportedVersion { record: u64, version: u16 },
    /// The source selected a version whose page bytes only the link's MAC
    /// covers ([`crate::stream::SEALED_VERSION`]) over a link that does not
    /// authenticate its bytes (this destination did not offer it).
    VersionNeedsSealedLink { record: u64, version: u16 },
    /// A record's CRC32 did not match its header and payload.
    CrcMismatch {
        record: u64,
        stored: u32,
        computed: u32,
    },
    /// A record announced more payload than its type allows.
    RecordTooLong {
        record: u64,
        kind: &'static str,
        len: u32,
        cap: u32,
    },
    /// A mandatory record of a type this version does not know.
    UnknownRecord { record: u64, raw_type: u16 },
    /// A record arrived in a state where it is not allowed.
    UnexpectedRecord {
        record: u64,
        kind: &'static str,
        state: &'static str,
    },
    /// A record's payload ended before a field.
    Truncated { record: u64, field: &'static str },
    /// A record's payload had bytes left after its last field.
    TrailingPayload {
        record: u64,
        kind: &'static str,
        extra: usize,
    },
    /// A memory run longer than the per-record cap.
    RunTooLong { record: u64, pages: u64, cap: u64 },
    /// A memory run outside the VM's RAM.
    GfnOutOfRange {
        record: u64,
        start_gfn: u64,
        pages: u64,
        ram_pages: u64,
    },
    /// A count or size field above its cap.
    OverCap {
        record: u64,
        what: &'static str,
        value: u64,
        cap: u64,
    },
    /// A field holds a value outside its domain.
    InvalidValue {
        record: u64,
        what: &'static str,
        value: u64,
    },
    /// vCPU records must arrive with ids 0, 1, 2, ... in order.
    VcpuOutOfOrder {
        record: u64,
        expected: u32,
        found: u32,
    },
    /// A device record that does not match the next device of the
    /// configuration record (devices are sent in configuration order).
    DeviceMismatch {
        record: u64,
        kind: u16,
        instance: u16,
    },
    /// The end record arrived before all vCPU or device state.
    MissingState {
        record: u64,
        what: &'static str,
        expected: u64,
        found: u64,
    },
    /// Bytes arrived after the stream's last record.
    TrailingBytes { len: usize },
    /// The transport ended in the middle of the stream.
    Incomplete { record: u64, state: &'static str },
    /// The image the destination holds does not hash to the source's digest.
    DigestMismatch { stream: u64, computed: u64 },
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use StreamError::*;
        match self {
            BadMagic { found, expected } => write!(
                f,
                "not a migration stream: magic {:02x?} (expected {:02x?} = {:?})",
                found,
                expected,
                core::str::from_utf8(expected).unwrap_or("?")
            ),
            NoCommonVersion { offered, supported } => write!(
                f,
                "no common protocol version: destination offers {offered:?}, \
                 source supports {supported:?}; upgrade one side"
            ),
            UnsupportedVersion { record, version } => write!(
                f,
                "record {record}: source selected protocol version {version}, \
                 which this destination does not support"
            ),
            VersionNeedsSealedLink { record, version } => write!(
                f,
                "record {record}: source selected protocol version {version}, whose page \
                 bytes only a sealed link's MAC covers, but this link is not sealed \
                 (the destination did not offer it)"
            ),
            CrcMismatch {
                record,
                stored,
                computed,
            } => write!(
                f,
                "record {record}: CRC mismatch (stored {stored:#010x}, computed \
                 {computed:#010x}); the stream was corrupted in transit"
            ),
            RecordTooLong {
                record,
                kind,
                len,
                cap,
            } => write!(
                f,
                "record {record}: {kind} record of {len} bytes exceeds cap {cap}"
            ),
            UnknownRecord { record, raw_type } => write!(
                f,
                "record {record}: unknown mandatory record type {raw_type:#06x}; \
                 the source speaks a newer protocol"
            ),
            UnexpectedRecord {
                record,
                kind,
                state,
            } => {
                write!(
                    f,
                    "record {record}: {kind} record not allowed while {state}"
                )
            }
            Truncated { record, field } => {
                write!(f, "record {record}: payload ends before field `{field}`")
            }
            TrailingPayload {
                record,
                kind,
                extra,
            } => write!(
                f,
                "record {record}: {kind} record has {extra} unexpected bytes after its last field"
            ),
            RunTooLong { record, pages, cap } => write!(
                f,
                "record {record}: memory run of {pages} pages exceeds cap {cap}"
            ),
            GfnOutOfRange {
                record,
                start_gfn,
                pages,
                ram_pages,
            } => write!(
                f,
                "record {record}: memory run of {pages} pages at gfn {start_gfn:#x} \
                 lies outside guest RAM of {ram_pages} pages"
            ),
            OverCap {
                record,
                what,
                value,
                cap,
            } => {
                write!(f, "record {record}: {what} of {value} exceeds cap {cap}")
            }
            InvalidValue {
                record,
                what,
                value,
            } => {
                write!(f, "record {record}: invalid {what} {value:#x}")
            }
            VcpuOutOfOrder {
                record,
                expected,
                found,
            } => write!(
                f,
                "record {record}: vCPU state for vCPU {found} where vCPU {expected} was expected"
            ),
            DeviceMismatch {
                record,
                kind,
                instance,
            } => write!(
                f,
                "record {record}: device state for kind {kind:#x} instance {instance} \
                 does not match the next device of the configuration"
            ),
            MissingState {
                record,
                what,
                expected,
                found,
            } => write!(
                f,
                "record {record}: end of stream after {found} of {expected} {what} records"
            ),
            TrailingBytes { len } => {
                write!(f, "{len} bytes after the end of the migration stream")
            }
            Incomplete { record, state } => write!(
                f,
                "stream ended at record {record} while {state}; the connection was lost"
            ),
            DigestMismatch { stream, computed } => write!(
                f,
                "final memory digest mismatch: source sent {stream:#018x}, destination \
                 memory hashes to {computed:#018x}"
            ),
        }
    }
}

/// The byte channel between source and destination failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportError {
    /// The peer closed the channel.
    Closed,
    /// The channel broke (network error, injected failure, ...).
    Broken(&'static str),
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::Closed => write!(f, "transport closed by peer"),
            TransportError::Broken(why) => write!(f, "transport failed: {why}"),
        }
    }
}

/// The hypervisor could not perform an operation on the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmError {
    /// What failed, in words.
    pub what: &'static str,
    /// A value that locates the failure (a gfn, a vCPU id, a device kind).
    pub value: Option<u64>,
}

impl VmError {
    /// An error without a locating value.
    pub const fn new(what: &'static str) -> Self {
        Self { what, value: None }
    }
    /// An error located by `value`.
    pub const fn at(what: &'static str, value: u64) -> Self {
        Self {
            what,
            value: Some(value),
        }
    }
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.value {
            Some(v) => write!(f, "{} ({v:#x})", self.what),
            None => write!(f, "{}", self.what),
        }
    }
}

/// Why a migration did not complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationError {
    /// The peer's bytes violated the protocol.
    Stream(StreamError),
    /// The channel failed.
    Transport(TransportError),
    /// The source VM (or destination VM, on the receiving side) refused.
    Vm(VmError),
    /// The overall time limit expired before switch-over completed.
    Timeout { limit_ms: u64 },
    /// The operator cancelled the migration.
    Cancelled,
    /// The other side aborted and said why.
    PeerAborted(String),
    /// The VM produced state that does not match its configuration.
    InconsistentVm {
        what: &'static str,
        expected: u64,
        found: u64,
    },
    /// The destination confirmed a digest other than the one we sent.
    DigestDisagreement { sent: u64, confirmed: u64 },
    /// Verification mode, at the source: with the VM paused, `stale_pages`
    /// frames hold something other than what was last sent for them (the
    /// dirty log missed writes); `first_gfns` names the first few.
    StalePages {
        stale_pages: u64,
        first_gfns: Vec<u64>,
    },
    /// Verification mode, at the destination: its memory does not hash to
    /// the source's memory digest from the verify record.
    MemoryMismatch { source: u64, destination: u64 },
    /// Verification mode was asked for, but the destination speaks only a
    /// protocol version without the verify record.
    VerificationUnsupported { version: u16 },
    /// Something failed (the wrapped error) after the source told the
    /// destination to resume and before the destination confirmed: the
    /// destination may be running.
    /// The source stays paused; management must find out which side runs.
    InDoubt(alloc::boxed::Box<MigrationError>),
    /// The link moved nothing (no byte acknowledged or received) for
    /// `silent_ms` while the engine waited for `waiting_for`.
    LinkStalled {
        silent_ms: u64,
        waiting_for: &'static str,
    },
    /// After an in-doubt switch-over (the wrapped first cause), the
    /// destination said it discarded its copy: the VM resumed at the source.
    DiscardedAfterGo(alloc::boxed::Box<MigrationError>),
}

impl MigrationError {
    /// The error in words, with a lost or silent link named after the node
    /// at its other end: `link to b lost: transport failed: connection
    /// reset` instead of the bare transport error (the engines know no node
    /// names; the node that runs them does).
    pub fn describe(&self, peer: &str) -> alloc::string::String {
        alloc::format!(
            "{}",
            Described {
                e: self,
                peer: Some(peer)
            }
        )
    }

    /// Whether the link failed (closed, broken or silent), here or as the
    /// first cause of an in-doubt switch-over.
    pub fn is_link_loss(&self) -> bool {
        match self {
            MigrationError::Transport(_) | MigrationError::LinkStalled { .. } => true,
            MigrationError::InDoubt(e) | MigrationError::DiscardedAfterGo(e) => e.is_link_loss(),
            _ => false,
        }
    }
}

/// [`MigrationError`]'s text, with the peer's name when it is known.
struct Described<'a> {
    e: &'a MigrationError,
    peer: Option<&'a str>,
}

impl fmt::Display for MigrationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Described {
            e: self,
            peer: None,
        }
        .fmt(f)
    }
}

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = |e| Described { e, peer: self.peer };
        match self.e {
            MigrationError::Stream(e) => write!(f, "protocol error: {e}"),
            MigrationError::Transport(e) => match self.peer {
                Some(p) => write!(f, "link to {p} lost: {e}"),
                None => write!(f, "{e}"),
            },
            MigrationError::Vm(e) => write!(f, "VM operation failed: {e}"),
            MigrationError::Timeout { limit_ms } => write!(
                f,
                "migration did not finish within its {limit_ms} ms time limit; \
                 the VM keeps running at the source"
            ),
            MigrationError::Cancelled => write!(f, "migration cancelled by the operator"),
            MigrationError::PeerAborted(why) => write!(f, "peer aborted the migration: {why}"),
            MigrationError::InconsistentVm {
                what,
                expected,
                found,
            } => write!(
                f,
                "VM state inconsistent with its configuration: {found} {what} saved, \
                 {expected} configured"
            ),
            MigrationError::DigestDisagreement { sent, confirmed } => write!(
                f,
                "destination confirmed memory digest {confirmed:#018x}, source sent {sent:#018x}"
            ),
            MigrationError::StalePages {
                stale_pages,
                first_gfns,
            } => {
                write!(
                    f,
                    "memory verification failed: {stale_pages} pages at the source differ \
                     from what was sent (the dirty log missed writes); first gfns"
                )?;
                for g in first_gfns {
                    write!(f, " {g:#x}")?;
                }
                write!(f, "; the VM keeps running at the source")
            }
            MigrationError::MemoryMismatch {
                source,
                destination,
            } => write!(
                f,
                "memory verification failed: the source's memory hashes to {source:#018x}, \
                 the destination's to {destination:#018x}"
            ),
            MigrationError::VerificationUnsupported { version } => write!(
                f,
                "memory verification was requested, but the destination speaks protocol \
                 version {version}, which has no verify record; upgrade it or migrate \
                 without verification"
            ),
            MigrationError::InDoubt(e) => write!(
                f,
                "switch-over in doubt after the go order was sent ({}): the \
                 destination may be running; the source stays paused",
                inner(e)
            ),
            MigrationError::LinkStalled {
                silent_ms,
                waiting_for,
            } => {
                match self.peer {
                    Some(p) => write!(f, "link to {p} lost: ")?,
                    None => write!(f, "link lost: ")?,
                }
                write!(
                    f,
                    "nothing moved for {} s while waiting for {waiting_for}",
                    silent_ms / 1000
                )
            }
            MigrationError::DiscardedAfterGo(e) => write!(
                f,
                "the switch-over failed ({}) and the destination discarded its copy: \
                 the VM runs at the source",
                inner(e)
            ),
        }
    }
}

impl From<StreamError> for MigrationError {
    fn from(e: StreamError) -> Self {
        MigrationError::Stream(e)
    }
}
impl From<TransportError> for MigrationError {
    fn from(e: TransportError) -> Self {
        MigrationError::Transport(e)
    }
}
impl From<VmError> for MigrationError {
    fn from(e: VmError) -> Self {
        MigrationError::Vm(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::boxed::Box;
    use alloc::string::ToString;

    #[test]
    fn a_lost_link_is_named_after_the_peer() {
        let stalled = MigrationError::LinkStalled {
            silent_ms: 8_200,
            waiting_for: "the destination to acknowledge data",
        };
        assert_eq!(
            stalled.describe("b"),
            "link to b lost: nothing moved for 8 s while waiting for the destination to \
             acknowledge data"
        );
        // Without a name (the engines' own text) it stays as it was.
        assert!(stalled
            .to_string()
            .starts_with("link lost: nothing moved for 8 s"));
        let reset = MigrationError::Transport(TransportError::Broken("connection reset"));
        assert_eq!(
            reset.describe("b"),
            "link to b lost: transport failed: connection reset"
        );
        let doubt = MigrationError::InDoubt(Box::new(reset.clone()));
        assert!(doubt.is_link_loss());
        assert!(
            doubt
                .describe("b")
                .starts_with("switch-over in doubt after the go order was sent (link to b lost: "),
            "{}",
            doubt.describe("b")
        );
        // Other errors read the same with or without a peer.
        let other = MigrationError::Timeout { limit_ms: 5 };
        assert!(!other.is_link_loss());
        assert_eq!(other.describe("b"), other.to_string());
    }
}
