//! Request and response types of the management protocol, version
//! [`PROTOCOL_VERSION`] (docs/MANAGEMENT.md has the wire examples).
//!
//! Bodies are JSON (serde_json without std). JSON was chosen over a binary
//! codec because `hvctl --json` can print what the node sent unchanged and
//! the protocol reads in a packet dump; frames are small and rare, so its
//! cost does not matter. Unknown fields are ignored (a newer client may add
//! optional ones); unknown operations parse as errors and get a
//! `bad-request` reply.
//!
//! Every string and list the node accepts is capped ([`NAME_MAX`],
//! [`GUEST_MAX`]); values are checked by the handlers before use.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// The protocol version this code speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The magic string of the server's greeting.
pub const MAGIC: &str = "hvmigrate-mgmt";
/// Longest VM name accepted (the node checks it equals its own limit).
pub const NAME_MAX: usize = 32;
/// Longest guest case name accepted.
pub const GUEST_MAX: usize = 32;
/// Longest extra Linux command line accepted ([`LinuxBoot::append`]).
pub const APPEND_MAX: usize = 256;
/// Most console input bytes a VM holds back for its guest to read.
pub const CONSOLE_INPUT_MAX: usize = 1024;
/// Most console lines a console request returns (the node keeps this many
/// per VM).
pub const CONSOLE_LINES_MAX: u32 = 32;
/// Longest error detail copied from a parser message into a reply.
pub const DETAIL_MAX: usize = 120;

/// Handshake, server -> client: the first frame on every connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: String,
    /// Protocol versions the server speaks.
    pub versions: Vec<u32>,
    /// The node's name.
    pub node: String,
    /// The server's nonce, 64 hex digits.
    pub nonce: String,
}

/// Handshake, client -> server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    /// The version the client chose from [`Hello::versions`].
    pub version: u32,
    /// The client's nonce, 64 hex digits.
    pub nonce: String,
    /// The client's proof, 64 hex digits.
    pub proof: String,
}

/// Handshake, server -> client, after a valid [`Auth`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The server's proof, 64 hex digits.
    pub proof: String,
}

/// Any handshake message (the frame body is one of these).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Handshake {
    Hello(Hello),
    Auth(Auth),
    Welcome(Welcome),
    /// The server refused (then closes, or waits for an `auth`).
    Error(ApiError),
}

/// A request: an id the reply echoes and the operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFrame {
    pub id: u64,
    pub request: Request,
}

/// The arguments of [`Request::VmMove`] (its fields sit beside `op` on
/// the wire). `None` = the default; [`VmMove::to`] gives a move with
/// every option at its default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMove {
    pub name: String,
    pub to: String,
    /// Longest acceptable pause at the switch-over (default 300).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Rate limit of the stream in MiB/s (default 0 = none).
    #[serde(default)]
    pub bandwidth_mib_s: Option<u64>,
    /// Give up (the VM runs on here) after this long (default 600).
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Encrypt the stream (default: authenticated only).
    #[serde(default)]
    pub encrypt: Option<bool>,
    /// Verification mode (default on).
    #[serde(default)]
    pub verify: Option<bool>,
    /// Test knobs (docs/MANAGEMENT.md, "Test knobs"): the destination
    /// waits this many ms before `accept`, before `ready`, and after
    /// resuming the VM before `resumed` (0..60000, default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug_hold_accept_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug_hold_ready_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug_hold_resumed_ms: Option<u64>,
    /// Shared-nothing: mirror the VM's disks to the destination's
    /// store first, then move memory and state (docs/MANAGEMENT.md).
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub include_storage: bool,
    /// With `include_storage`: where the disks go on the destination,
    /// `STORE[:DIR]` (default: its default store, `STORE:vms/NAME/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Quick storage migration (docs/MANAGEMENT.md): the VM's disks go
    /// to the destination's store through checkpoints, then the VM is
    /// saved and its memory and state follow.
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub quick: bool,
}

impl VmMove {
    /// Move VM `name` to node `to`, every option at its default.
    pub fn to(name: &str, to: &str) -> Self {
        Self {
            name: name.into(),
            to: to.into(),
            ..Self::default()
        }
    }
}

/// The operations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    NodeInfo,
    VmList,
    VmCreate {
        name: String,
        memory_mib: u64,
        /// Guest case run by the guest kernel; `None` = `heartbeat`.
        #[serde(default)]
        guest: Option<String>,
        /// Boot Linux instead of the guest kernel: the kernel and
        /// initramfs the node was given at boot (`guest` must be unset).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        linux: Option<LinuxBoot>,
    },
    /// Give VM `name` (created, not started) a new virtual disk: a VHDX
    /// of `size_mib` on store `store` (default: the node's own store; a
    /// node without stores keeps small disks in its memory), dynamic
    /// unless `fixed`. The guest sees it as the next virtio-blk device.
    VmDiskCreate {
        name: String,
        size_mib: u64,
        #[serde(default)]
        store: Option<String>,
        #[serde(default)]
        fixed: Option<bool>,
    },
    /// The VM's virtual disks.
    VmDiskList {
        name: String,
    },
    /// Storage live migration of VM `name` (a job): every disk to `to`
    /// (`STORE[:DIR]`, each keeping its file name), and/or the disks named
    /// in `vhd` (`SOURCE=STORE:path`, SOURCE a disk's location or slot) to
    /// their own places; disks not named stay. The sources are deleted
    /// after the switch unless `keep_source`. `config` (`STORE[:DIR]`):
    /// where the VM's configuration file goes; `snapshots`
    /// (`STORE[:DIR]`): where its checkpoint files go; `to` moves both
    /// too unless named.
    VmMoveStorage {
        name: String,
        #[serde(default)]
        to: Option<String>,
        #[serde(default)]
        vhd: Vec<String>,
        #[serde(default)]
        config: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snapshots: Option<String>,
        #[serde(default)]
        keep_source: Option<bool>,
        /// Rate limit of the copy in MiB/s (default 0 = none; guest
        /// writes are mirrored whatever the limit).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bandwidth_mib_s: Option<u64>,
    },
    /// Register the VM that the configuration file at `path`
    /// (`STORE:path`) describes, in place (Hyper-V's `Import-VM`
    /// -Register): state `created`, its disks opened where the file
    /// names them.
    VmImport {
        path: String,
    },
    VmStart {
        name: String,
    },
    VmStop {
        name: String,
    },
    /// Run VM `name` on after a pause of its own (`pause_reason`): for
    /// `store full`, serve the waiting disk request again now; refused
    /// with `no-resources` if the store is still full.
    VmResume {
        name: String,
    },
    VmDelete {
        name: String,
    },
    VmConsole {
        name: String,
        /// Last lines wanted (capped at [`CONSOLE_LINES_MAX`]).
        #[serde(default)]
        lines: Option<u32>,
    },
    /// Type `text` into VM `name`'s console (COM1's receive side): queued
    /// in the node until the guest reads it, at most
    /// [`CONSOLE_INPUT_MAX`] bytes waiting per VM (refused whole with
    /// `no-resources` beyond). Refused while the VM migrates or once it
    /// stopped.
    VmConsoleInput {
        name: String,
        text: String,
    },
    /// Live-migrate VM `name` to node `to` (a peer's name, or this node's
    /// own for a move within the node); a job.
    VmMove(VmMove),
    JobList,
    /// One job, with its migration report once it ended.
    JobShow {
        id: u64,
    },
    JobCancel {
        id: u64,
    },
    /// Decide a migration in doubt: which copy of the VM is the one.
    JobResolve {
        id: u64,
        keep: Keep,
    },
    HostGet,
    HostSet {
        #[serde(default)]
        max_live_migrations: Option<u32>,
        #[serde(default)]
        max_storage_migrations: Option<u32>,
    },
    /// Link benchmark, receiving side: accept one TCP stream on the
    /// migration NIC at `port` and count its bytes (a job).
    BenchLinkReceive {
        port: u16,
        bytes: u64,
    },
    /// Link benchmark, sending side: raw frames, then `bytes` over TCP to
    /// `peer:port` on the migration NIC (a job).
    BenchLinkSend {
        peer: String,
        port: u16,
        bytes: u64,
        frames: u64,
    },
    /// The node's stores with their file systems' figures.
    StoreList,
    /// Store benchmark: write, read back, copy and write as a VHDX `mib`
    /// MiB on `store` (a job; `keep` leaves the files for inspection).
    StoreBench {
        store: String,
        mib: u64,
        #[serde(default)]
        keep: bool,
    },
}

/// `vm-create`'s Linux guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinuxBoot {
    /// Kernel arguments after the node's own (`console=ttyS0`, the TSC
    /// rate), at most [`APPEND_MAX`] bytes.
    #[serde(default)]
    pub append: String,
}

/// A reply: the request's id (0 when the request could not be parsed) and
/// the outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResponseFrame {
    pub id: u64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Success with a body, or an error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Ok(Body),
    Error(ApiError),
}

/// Reply bodies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "body", rename_all = "kebab-case")]
pub enum Body {
    NodeInfo(NodeInfo),
    VmList {
        vms: Vec<VmInfo>,
    },
    Vm(VmInfo),
    Console {
        vm: String,
        lines: Vec<String>,
    },
    Disks {
        vm: String,
        disks: Vec<DiskInfo>,
        /// The VM's configuration file and snapshot location (a node
        /// that keeps configurations in files).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snapshots: Option<String>,
    },
    JobList {
        jobs: Vec<JobInfo>,
    },
    Job(JobInfo),
    Host(HostSettings),
    StoreList {
        stores: Vec<StoreInfo>,
    },
    Done,
}

/// One store as listed (`store-list`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreInfo {
    /// The store's name (`local`, `shared`, ...): what `STORE:path` names.
    pub name: String,
    /// The mount tag of its virtio-9p device.
    pub tag: String,
    /// The directory on the machine that exports it, as told at boot
    /// (empty when unknown).
    pub host_path: String,
    /// Its file system's size, free bytes (for unprivileged writers) and
    /// used bytes; all zero when `error` is set.
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub used_bytes: u64,
    /// Why the store cannot be used, if it cannot.
    pub error: Option<String>,
}

/// `node-info`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// `amd` or `intel`.
    pub cpu_vendor: String,
    pub cpus: u32,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
    /// Software version (the crate version).
    pub version: String,
    pub protocol_version: u32,
    /// Management and migration addresses, as configured at boot.
    pub mgmt_addr: String,
    pub migration_addr: String,
    /// The nodes VMs can move to, `NAME@IPv4` (its `peers=`).
    #[serde(default)]
    pub peers: Vec<String>,
}

/// One VM as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    /// `created`, `running`, `halted`, `paused`, `incoming` or `stopped`.
    pub state: String,
    /// Why it stopped (stopped VMs only).
    pub stop_reason: Option<String>,
    pub memory_mib: u64,
    pub guest: String,
    pub exits: u64,
    pub console_lines: u64,
    /// The job moving it (either end of a live migration), else `None`.
    #[serde(default)]
    pub migration_job: Option<u64>,
    /// Why a `paused` VM is paused, when not by a live migration: `store
    /// full` (a disk's store filled; the node retries every second and
    /// the VM runs on once the write succeeds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_reason: Option<String>,
    /// The store's error while `store full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_detail: Option<String>,
    /// Its identity, configuration file and snapshot location (a node
    /// with stores keeps them per VM; absent on a node that keeps VM
    /// configurations in memory). Boxed: every reply body carries the
    /// largest variant's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<alloc::boxed::Box<VmFiles>>,
}

/// A VM's identity and files ([`VmInfo::files`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmFiles {
    /// Its identity, kept across storage moves and imports (GUID form).
    pub vm_id: String,
    /// Its configuration file, `STORE:path` (`None`: none could be
    /// written on this node).
    pub config: Option<String>,
    /// Where its checkpoint files go, `STORE:DIR`.
    pub snapshots: String,
}

/// One virtual disk of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Its virtio-mmio slot (the guest's disk number).
    pub slot: u8,
    /// Where its file is: `STORE:path`, or `memory:NAME` for a disk in
    /// the node's memory.
    pub location: String,
    /// `dynamic` or `fixed`.
    pub kind: String,
    /// Size the guest sees.
    pub virtual_bytes: u64,
    /// Bytes of the file (what it occupies on its store).
    pub file_bytes: u64,
}

/// Job kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    LiveMigration,
    StorageMigration,
    LinkBench,
    StoreBench,
}

/// Job states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Waiting for a free slot under the host's limits.
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }
}

/// One job as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: u64,
    pub kind: JobKind,
    pub vm: String,
    pub state: JobState,
    pub percent: u8,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub elapsed_ms: u64,
    pub error: Option<String>,
    pub cancellable: bool,
    /// Free-form result (e.g. the link benchmark's figures).
    #[serde(default)]
    pub result: Option<String>,
    /// Live migrations: where it stands (boxed: most jobs list without).
    #[serde(default)]
    pub migration: Option<alloc::boxed::Box<MigrationInfo>>,
    /// Live migrations that ended, in `job-show` only: the report.
    #[serde(default)]
    pub report: Option<alloc::boxed::Box<MigrationReport>>,
}

/// Which end of a live migration a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// This node is the source: the VM leaves.
    Outgoing,
    /// This node is the destination: the VM arrives.
    Incoming,
}

/// Where a live migration stands (docs/MANAGEMENT.md, "Live migration").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Waiting for a slot here, or for the destination to have one.
    Queued,
    /// Opening the connection to the destination.
    Connecting,
    /// Authentication and the destination's checks.
    Negotiating,
    /// Pre-copy passes; the VM runs.
    Copying,
    /// The VM is paused: last pages, verification, vCPU and device state.
    FinalCopy,
    /// The ready / go / resumed exchange.
    SwitchingOver,
    /// The link failed after `go` and before `resumed`: the source keeps
    /// its copy paused until the destination says what it did.
    InDoubt,
    Completed,
    Failed,
    Cancelled,
}

/// A live migration's progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationInfo {
    pub direction: Direction,
    /// The other node's name.
    pub peer: String,
    pub phase: Phase,
    /// The pass under way, 0 = the full copy.
    pub pass: u32,
    /// Stream bytes so far (received, on the destination).
    pub bytes_sent: u64,
    /// The rest of this pass plus the pages dirtied since (estimate).
    pub bytes_remaining: u64,
    /// How fast the guest dirtied memory in the last pass.
    pub dirty_rate_bytes_per_s: u64,
    /// Stream bytes per second the destination acknowledged.
    pub bandwidth_bytes_per_s: u64,
    /// `bytes_remaining` at that bandwidth, `None` while unknown.
    pub eta_ms: Option<u64>,
    /// Share of its time the guest is held back.
    pub throttle_pct: u8,
    pub downtime_limit_ms: u64,
    pub encrypted: bool,
    pub verify: bool,
    /// A shared-nothing move: disk bytes copied to the destination and
    /// to copy (allocated data; 0 and 0 for a move without disks).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub storage_bytes_copied: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub storage_bytes_total: u64,
    /// A quick move: bytes its checkpoints hold (to the sector), growing
    /// while the bases copy; what the downtime writes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub checkpoint_bytes: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A finished live migration's report (the source engine's
/// `migration-report`; on the destination only the fields it knows).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationReport {
    pub passes: u32,
    pub pages_per_pass: Vec<u64>,
    pub bytes_sent: u64,
    pub zero_pages: u64,
    pub ram_bytes: u64,
    pub total_ms: u64,
    pub downtime_ms: u64,
    pub expected_downtime_ms: u64,
    pub throttle_pct: u8,
    /// `completed`, `failed` or `cancelled`.
    pub result: String,
    pub error: Option<String>,
    /// `write-protect`, `pml`, or `None` (the destination).
    pub dirty_tracker: Option<String>,
    pub verified: bool,
    /// Where the downtime went (µs per phase; zeros on the destination
    /// and from older nodes).
    #[serde(default)]
    pub pause_us: PausePhases,
}

/// The phases of a migration's pause, in µs of the source's clock (the
/// `migration` crate's `PausePhases`, docs/DESIGN.md): they add up to
/// `downtime_ms`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PausePhases {
    /// Stopping the vCPUs and the last collection of the dirty log.
    pub harvest: u64,
    /// The last dirty pages.
    pub last_pages: u64,
    /// Verification mode's re-read of the whole memory.
    pub verify: u64,
    /// vCPU and device state.
    pub state: u64,
    /// Until the destination acknowledged every byte.
    pub drain: u64,
    /// Until the destination answered `ready`.
    pub ready: u64,
    /// From `go` to `resumed`.
    pub resumed: u64,
}

/// `job-resolve`: which copy of a VM in doubt is the one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Keep {
    /// The VM does not run on the destination: resume it here.
    Source,
    /// It runs on the destination: delete the paused copy here.
    Destination,
}

/// Host settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSettings {
    pub max_live_migrations: u32,
    pub max_storage_migrations: u32,
}

/// Error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The frame is not a valid message of this protocol.
    BadRequest,
    /// A request arrived before authentication.
    Unauthenticated,
    /// The proof was wrong or the nonce replayed (the node closes).
    AuthFailed,
    /// No common protocol version.
    UnsupportedVersion,
    /// A frame's size, or the connection's traffic, is over a limit.
    TooLarge,
    /// No such VM or job.
    NotFound,
    /// The name is taken.
    AlreadyExists,
    /// Not possible in the current state (e.g. deleting a running VM).
    InvalidState,
    /// A value is out of range.
    InvalidArgument,
    /// A table is full or the host lacks memory.
    NoResources,
    /// The operation needs something this node does not have (a NIC).
    Unsupported,
    /// The VM is being moved by a live migration (either end).
    VmMigrating,
}

/// An error reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl core::fmt::Display for ApiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let code = serde_json::to_string(&self.code).unwrap_or_default();
        write!(f, "{} ({})", self.message, code.trim_matches('"'))
    }
}

/// JSON of a value (our own types always serialize).
pub fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// A parser's message for an error reply, cut to [`DETAIL_MAX`] bytes (at
/// a character boundary): a peer's bytes must not make replies grow.
pub fn detail(e: &impl ToString) -> String {
    let mut s = e.to_string();
    if s.len() > DETAIL_MAX {
        let mut end = DETAIL_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Parse a dotted IPv4 address (`192.168.100.2`, as `bench-link-send`'s
/// `peer`): four decimal parts of one to three digits, each at most 255.
pub fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for b in &mut out {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        *b = p.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn requests_round_trip_and_read_well() {
        let r = RequestFrame {
            id: 7,
            request: Request::VmCreate {
                name: "web".into(),
                memory_mib: 64,
                guest: None,
                linux: None,
            },
        };
        let json = String::from_utf8(to_json(&r)).unwrap();
        assert_eq!(
            json,
            r#"{"id":7,"request":{"op":"vm-create","name":"web","memory_mib":64,"guest":null}}"#
        );
        let back: RequestFrame = serde_json::from_str(
            r#"{"id":7,"request":{"op":"vm-create","name":"web","memory_mib":64}}"#,
        )
        .unwrap();
        assert_eq!(back, r);
        let ops = [
            r#"{"op":"node-info"}"#,
            r#"{"op":"vm-list"}"#,
            r#"{"op":"vm-start","name":"x"}"#,
            r#"{"op":"vm-stop","name":"x"}"#,
            r#"{"op":"vm-delete","name":"x"}"#,
            r#"{"op":"vm-console","name":"x","lines":3}"#,
            r#"{"op":"job-list"}"#,
            r#"{"op":"job-cancel","id":3}"#,
            r#"{"op":"host-get"}"#,
            r#"{"op":"host-set","max_live_migrations":3}"#,
            r#"{"op":"vm-move","name":"v","to":"b"}"#,
            r#"{"op":"vm-move","name":"v","to":"b","downtime_ms":50,"bandwidth_mib_s":8,"timeout_s":60,"encrypt":true,"verify":false}"#,
            r#"{"op":"job-show","id":3}"#,
            r#"{"op":"job-resolve","id":3,"keep":"source"}"#,
            r#"{"op":"job-resolve","id":3,"keep":"destination"}"#,
            r#"{"op":"store-list"}"#,
            r#"{"op":"store-bench","store":"local","mib":64}"#,
        ];
        for op in ops {
            assert!(serde_json::from_str::<Request>(op).is_ok(), "{op}");
        }
        assert!(serde_json::from_str::<Request>(r#"{"op":"format-disk"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"job-resolve","id":3,"keep":"both"}"#)
                .is_err()
        );
    }

    /// The migration fields of a job as the contract shows them, and a
    /// job of an older node (no migration fields) still parses.
    #[test]
    fn migration_jobs_read_well() {
        let old = r#"{"id":1,"kind":"link-bench","vm":"","state":"running","percent":0,"bytes_done":0,"bytes_total":1,"elapsed_ms":0,"error":null,"cancellable":true}"#;
        let j: JobInfo = serde_json::from_str(old).unwrap();
        assert_eq!((j.migration, j.report, j.result), (None, None, None));
        let info = MigrationInfo {
            direction: Direction::Outgoing,
            peer: "b".into(),
            phase: Phase::FinalCopy,
            pass: 3,
            bytes_sent: 10,
            bytes_remaining: 5,
            dirty_rate_bytes_per_s: 7,
            bandwidth_bytes_per_s: 9,
            eta_ms: None,
            throttle_pct: 20,
            downtime_limit_ms: 300,
            encrypted: true,
            verify: true,
            storage_bytes_copied: 0,
            storage_bytes_total: 0,
            checkpoint_bytes: 0,
        };
        assert_eq!(
            String::from_utf8(to_json(&info)).unwrap(),
            r#"{"direction":"outgoing","peer":"b","phase":"final-copy","pass":3,"bytes_sent":10,"bytes_remaining":5,"dirty_rate_bytes_per_s":7,"bandwidth_bytes_per_s":9,"eta_ms":null,"throttle_pct":20,"downtime_limit_ms":300,"encrypted":true,"verify":true}"#
        );
        for (p, name) in [
            (Phase::Queued, "queued"),
            (Phase::Negotiating, "negotiating"),
            (Phase::SwitchingOver, "switching-over"),
            (Phase::InDoubt, "in-doubt"),
        ] {
            assert_eq!(to_json(&p), alloc::format!("\"{name}\"").into_bytes());
        }
        assert_eq!(to_json(&ErrorCode::VmMigrating), b"\"vm-migrating\"");
    }

    #[test]
    fn responses_round_trip() {
        let r = ResponseFrame {
            id: 1,
            outcome: Outcome::Ok(Body::VmList { vms: vec![] }),
        };
        let json = String::from_utf8(to_json(&r)).unwrap();
        assert_eq!(json, r#"{"id":1,"ok":{"body":"vm-list","vms":[]}}"#);
        assert_eq!(serde_json::from_str::<ResponseFrame>(&json).unwrap(), r);
        let e = ResponseFrame {
            id: 0,
            outcome: Outcome::Error(ApiError::new(ErrorCode::BadRequest, "no")),
        };
        let json = String::from_utf8(to_json(&e)).unwrap();
        assert_eq!(
            json,
            r#"{"id":0,"error":{"code":"bad-request","message":"no"}}"#
        );
        assert_eq!(serde_json::from_str::<ResponseFrame>(&json).unwrap(), e);
        assert_eq!(
            alloc::format!("{}", ApiError::new(ErrorCode::NotFound, "no VM x")),
            "no VM x (not-found)"
        );
    }

    #[test]
    fn details_are_cut_at_a_char_boundary() {
        assert_eq!(detail(&"short"), "short");
        let long = "é".repeat(100);
        let d = detail(&long);
        assert_eq!(d.len(), DETAIL_MAX);
        assert!(long.starts_with(&d));
        let odd = alloc::format!("x{long}");
        assert_eq!(detail(&odd).len(), DETAIL_MAX - 1);
    }

    #[test]
    fn ipv4_parsing() {
        assert_eq!(parse_ipv4("192.168.100.2"), Some([192, 168, 100, 2]));
        assert_eq!(parse_ipv4("0.0.0.0"), Some([0; 4]));
        for bad in [
            "",
            "1.2.3",
            "1.2.3.4.5",
            "256.1.1.1",
            "1..2.3",
            "a.b.c.d",
            "+1.2.3.4",
            "1.2.3.0004",
        ] {
            assert_eq!(parse_ipv4(bad), None, "{bad}");
        }
    }
}
