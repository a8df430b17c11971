//! One end of a migration link ([`Conn`]): the mutual authentication with
//! the cluster key, then sealed frames carrying control messages
//! ([`Control`]) and the migration stream (docs/DESIGN.md, "Live
//! migration between nodes").
//!
//! Handshake (frames of `u32 BE length | JSON`, at most
//! [`HANDSHAKE_FRAME_MAX`] bytes, read exactly so that no byte of the
//! sealed stream behind them is consumed): the destination (server) sends
//! `hello` with its nonce and boot id; the source (client) answers `auth`
//! with its nonce and proof; the destination checks it (constant time, and
//! the client nonce against the node's replay window) and answers
//! `welcome` with its own proof, or `error` and gives up. The source checks
//! the destination's proof. Both derive the session key. The proofs and the
//! key are hvmgmt's challenge-response under the migration link's labels
//! (`hvmgmt::auth::MIGRATION`): the same primitives as the management API,
//! not a second implementation.
//!
//! Then every byte is a sealed frame (`migration::seal`). A `Conn` never
//! blocks: the job calls [`Conn::handshake`] until it is ready and then
//! reads controls and lends [`Conn::link`] to its engine.

use super::wire::Wire;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use hvmgmt::auth::{
    hex_decode, hex_encode, nonce_from_hex, ClusterKey, Nonce, ReplayGuard, MIGRATION,
};
use migration::seal::{End, SealError, SealedLink, Sealer};
use migration::{CpuidEntry, DeviceDesc, Transport, TransportError, VmConfig};
use serde::{Deserialize, Serialize};

/// The handshake's magic.
pub const MAGIC: &str = "hvmigrate-mig";
/// The link protocol version.
pub const VERSION: u32 = 1;
/// Largest handshake frame body.
pub const HANDSHAKE_FRAME_MAX: usize = 4096;

/// Handshake messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Handshake {
    Hello {
        magic: String,
        versions: Vec<u32>,
        node: String,
        nonce: String,
        /// The destination's boot id (hex).
        boot: String,
    },
    Auth {
        version: u32,
        node: String,
        nonce: String,
        proof: String,
    },
    Welcome {
        proof: String,
    },
    Error {
        code: String,
        message: String,
    },
}

/// The configuration record as control messages carry it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigMsg {
    pub ram_bytes: u64,
    pub vcpus: u32,
    /// `[kind, instance, version]` per device.
    pub devices: Vec<[u32; 3]>,
    /// `[leaf, subleaf, eax, ebx, ecx, edx]` per CPUID entry.
    pub cpuid: Vec<[u32; 6]>,
}

impl ConfigMsg {
    pub fn from_config(c: &VmConfig) -> Self {
        Self {
            ram_bytes: c.ram_bytes,
            vcpus: c.vcpus,
            devices: c
                .devices
                .iter()
                .map(|d| [u32::from(d.kind), u32::from(d.instance), d.version])
                .collect(),
            cpuid: c
                .cpuid
                .iter()
                .map(|e| [e.leaf, e.subleaf, e.eax, e.ebx, e.ecx, e.edx])
                .collect(),
        }
    }

    /// The configuration, checked against the stream's own caps.
    pub fn to_config(&self) -> Result<VmConfig, String> {
        let mut devices = Vec::new();
        for d in &self.devices {
            let (Ok(kind), Ok(instance)) = (u16::try_from(d[0]), u16::try_from(d[1])) else {
                return Err("device kind or instance out of range".into());
            };
            devices.push(DeviceDesc {
                kind,
                instance,
                version: d[2],
            });
        }
        let c = VmConfig {
            ram_bytes: self.ram_bytes,
            vcpus: self.vcpus,
            devices,
            cpuid: self
                .cpuid
                .iter()
                .map(|e| CpuidEntry {
                    leaf: e[0],
                    subleaf: e[1],
                    eax: e[2],
                    ebx: e[3],
                    ecx: e[4],
                    edx: e[5],
                })
                .collect(),
        };
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }
}

/// The source's request to send a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    /// The migration id (32 hex digits), drawn by the source.
    pub id: String,
    pub vm: String,
    pub guest: String,
    pub config: ConfigMsg,
    pub encrypt: bool,
    pub verify: bool,
    /// The test knobs of `vm-move` (docs/MANAGEMENT.md, "Test knobs").
    #[serde(default)]
    pub holds: Holds,
    /// The VM's disks on the shared store, which the destination opens
    /// where they are (only memory and state move); empty for a VM
    /// without disks.
    #[serde(default)]
    pub disks: Vec<crate::lease::vms::SharedDisk>,
    /// The VM's identity (`vmconfig::VmId`, GUID form), which the
    /// destination keeps in the configuration file it writes; `None` from
    /// a source that keeps none (or predates this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    /// A Linux VM's extra kernel arguments (guest `linux` only), for the
    /// same file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// A shared-nothing move (`--include-storage`): the disks the
    /// destination creates and receives over this link
    /// ([`super::remote_disk`]); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub create_disks: Vec<super::remote_disk::DiskSpec>,
    /// Where they go on the destination, `STORE[:DIR]` (`None`: its
    /// default store's layout, `STORE:vms/VM/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

/// When the destination answers, for the two-node failure tests: it waits
/// this many ms before `accept`, before `ready`, and after resuming the VM
/// before `resumed`. They never change what a migration does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holds {
    pub accept_ms: u64,
    pub ready_ms: u64,
    pub resumed_ms: u64,
}

/// Largest hold, ms.
pub const HOLD_MS_MAX: u64 = 60_000;

impl Holds {
    /// The holds as sent, capped at [`HOLD_MS_MAX`] (they come off the
    /// network).
    pub fn capped(self) -> Self {
        Self {
            accept_ms: self.accept_ms.min(HOLD_MS_MAX),
            ready_ms: self.ready_ms.min(HOLD_MS_MAX),
            resumed_ms: self.resumed_ms.min(HOLD_MS_MAX),
        }
    }
}

/// The source's bookkeeping at the pause.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paused {
    pub completed: u64,
    pub failed: u64,
    pub console: Vec<String>,
    /// The VM's worker counters (`VmCounters`), so the destination's
    /// listing continues them.
    pub exits: u64,
    pub hypercalls: u64,
    pub progress_reports: u64,
    pub last_progress: u64,
    pub slices: u64,
    pub console_lines: u64,
    pub dirty_log_refused: u64,
    /// Console input the guest had not read (`Bookkeeping::console_input`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub console_input: Vec<u8>,
    /// A VM on the shared store: the epoch of the lease record the source
    /// wrote naming the destination (docs/DESIGN.md "Leases"), which the
    /// destination adopts at `go` before it writes the VM's disks.
    #[serde(default)]
    pub lease_epoch: Option<u64>,
}

impl Paused {
    /// The message for `b`.
    pub fn from_bookkeeping(b: crate::vm::Bookkeeping) -> Self {
        let c = b.counters;
        Self {
            completed: b.migrations.completed,
            failed: b.migrations.failed,
            console: b.console,
            exits: c.exits,
            hypercalls: c.hypercalls,
            progress_reports: c.progress_reports,
            last_progress: c.last_progress,
            slices: c.slices,
            console_lines: c.console_lines,
            dirty_log_refused: c.dirty_log_refused,
            console_input: b.console_input,
            lease_epoch: None,
        }
    }

    /// The bookkeeping it carries (console lines capped).
    pub fn into_bookkeeping(self) -> crate::vm::Bookkeeping {
        crate::vm::Bookkeeping {
            migrations: crate::vm::MigrationCounters {
                completed: self.completed,
                failed: self.failed,
            },
            console: self
                .console
                .into_iter()
                .take(crate::vm::RECENT_LINES)
                .map(|l| l.chars().take(crate::uart::LINE_MAX_BYTES).collect())
                .collect(),
            counters: crate::vm::VmCounters {
                exits: self.exits,
                hypercalls: self.hypercalls,
                progress_reports: self.progress_reports,
                last_progress: self.last_progress,
                slices: self.slices,
                console_lines: self.console_lines,
                dirty_log_refused: self.dirty_log_refused,
            },
            console_input: self
                .console_input
                .into_iter()
                .take(crate::vm::CONSOLE_INPUT_MAX)
                .collect(),
        }
    }
}

/// Control messages (sealed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Control {
    Open(Open),
    Accept {},
    Refuse {
        code: String,
        message: String,
    },
    Query {
        id: String,
    },
    Answer {
        id: String,
        state: String,
    },
    Paused(Paused),
    /// A shared-nothing move: every disk is copied and current on the
    /// destination (its last flush acknowledged); the memory engine
    /// starts now (the destination starts its receiver).
    StorageCopied {},
}

/// A VM name from a peer, checked like a local one.
pub fn check_name(name: &str) -> Result<(), String> {
    if crate::vm::name_ok(name) {
        Ok(())
    } else {
        let shown: String = name.chars().take(crate::vm::NAME_MAX).collect();
        Err(format!(
            "'{shown}' is not a VM name (1 to {} characters of a-z, 0-9, -)",
            crate::vm::NAME_MAX
        ))
    }
}

/// Refusal code: the destination is at its migration limit (the source
/// waits and asks again).
pub const REFUSE_BUSY: &str = "busy";

/// Which end of the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The source, which connected.
    Client,
    /// The destination, which accepted.
    Server,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// Server: send `hello`.
    Start,
    /// Server: `hello` sent, waiting for `auth`.
    AwaitAuth,
    /// Client: waiting for `hello`.
    AwaitHello,
    /// Client: `auth` sent, waiting for `welcome`.
    AwaitWelcome {
        server: Nonce,
    },
    Ready,
    Failed(String),
}

/// How the handshake stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HsProgress {
    Pending,
    Ready,
    /// It failed: why, for the job's error.
    Failed(String),
}

/// One end of a migration link.
pub struct Conn {
    pub wire: Wire,
    state: State,
    me: String,
    key: ClusterKey,
    nonce: Nonce,
    boot: [u8; 16],
    /// A handshake frame being read.
    hs: Vec<u8>,
    /// The peer's node name, once it authenticated (the client checks it
    /// against the name it connected to).
    pub peer: Option<String>,
    /// The server's boot id, learnt from its `hello` (client).
    pub peer_boot: Option<[u8; 16]>,
    /// Who the client expects to reach.
    expect: Option<String>,
    sealer: Option<Sealer>,
    /// The first sealed frame refused, if any (why the link broke).
    pub refused: Option<SealError>,
}

impl Conn {
    /// The source's end: it connected over `wire` to the node named
    /// `expect`, with its own `nonce`.
    pub fn client(wire: Wire, me: &str, expect: &str, key: &ClusterKey, nonce: Nonce) -> Self {
        Self::new(wire, Role::Client, me, Some(expect), key, nonce, [0; 16])
    }

    /// The destination's end of a connection that arrived, with its nonce
    /// and its boot id.
    pub fn server(wire: Wire, me: &str, key: &ClusterKey, nonce: Nonce, boot: [u8; 16]) -> Self {
        Self::new(wire, Role::Server, me, None, key, nonce, boot)
    }

    fn new(
        wire: Wire,
        role: Role,
        me: &str,
        expect: Option<&str>,
        key: &ClusterKey,
        nonce: Nonce,
        boot: [u8; 16],
    ) -> Self {
        Self {
            wire,
            state: match role {
                Role::Server => State::Start,
                Role::Client => State::AwaitHello,
            },
            me: me.into(),
            key: key.clone(),
            nonce,
            boot,
            hs: Vec::new(),
            peer: None,
            peer_boot: None,
            expect: expect.map(Into::into),
            sealer: None,
            refused: None,
        }
    }

    /// Whether the handshake completed.
    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    fn send_hs(&mut self, m: &Handshake) -> Result<(), TransportError> {
        let body = serde_json::to_vec(m).unwrap_or_default();
        let mut out = Vec::new();
        // Our own messages are far below the frame limit.
        let _ = hvmgmt::wire::encode(&body, &mut out);
        self.wire.send(&out)
    }

    /// Read one handshake frame, exactly its bytes; `Ok(None)` while it is
    /// incomplete.
    fn recv_hs(&mut self) -> Result<Option<Handshake>, String> {
        loop {
            let need = if self.hs.len() < 4 {
                4 - self.hs.len()
            } else {
                let len =
                    u32::from_be_bytes([self.hs[0], self.hs[1], self.hs[2], self.hs[3]]) as usize;
                if len > HANDSHAKE_FRAME_MAX {
                    return Err(format!("handshake frame of {len} bytes"));
                }
                4 + len - self.hs.len()
            };
            if need == 0 {
                let body = core::mem::take(&mut self.hs);
                return serde_json::from_slice(&body[4..])
                    .map(Some)
                    .map_err(|e| format!("bad handshake message: {}", hvmgmt::proto::detail(&e)));
            }
            let mut buf = [0u8; 512];
            let take = need.min(buf.len());
            let n = self
                .wire
                .recv(&mut buf[..take])
                .map_err(|e| format!("connection lost during the handshake ({e})"))?;
            if n == 0 {
                return Ok(None);
            }
            self.hs.extend_from_slice(&buf[..n]);
        }
    }

    /// Advance the handshake as far as the received bytes allow.
    pub fn handshake(&mut self, replay: &mut ReplayGuard) -> HsProgress {
        loop {
            let r = self.hs_step(replay);
            match r {
                Ok(true) => continue,
                Ok(false) => break,
                Err(why) => {
                    self.state = State::Failed(why);
                    break;
                }
            }
        }
        match &self.state {
            State::Ready => HsProgress::Ready,
            State::Failed(w) => HsProgress::Failed(w.clone()),
            _ => HsProgress::Pending,
        }
    }

    /// One transition; `Ok(true)` when it made one.
    fn hs_step(&mut self, replay: &mut ReplayGuard) -> Result<bool, String> {
        let lost = |e: TransportError| format!("connection lost during the handshake ({e})");
        match self.state.clone() {
            State::Start => {
                let hello = Handshake::Hello {
                    magic: MAGIC.into(),
                    versions: alloc::vec![VERSION],
                    node: self.me.clone(),
                    nonce: hex_encode(&self.nonce),
                    boot: hex_encode(&self.boot),
                };
                self.send_hs(&hello).map_err(lost)?;
                self.state = State::AwaitAuth;
                Ok(true)
            }
            State::AwaitAuth => {
                let Some(m) = self.recv_hs()? else {
                    return Ok(false);
                };
                let Handshake::Auth {
                    version,
                    node,
                    nonce,
                    proof,
                } = m
                else {
                    return Err("expected the source's auth message".into());
                };
                let node: String = node.chars().take(crate::vm::NAME_MAX).collect();
                if version != VERSION {
                    let _ = self.send_hs(&Handshake::Error {
                        code: "unsupported-version".into(),
                        message: format!("this node speaks migration link version {VERSION}"),
                    });
                    return Err(format!("node '{node}' asked for link version {version}"));
                }
                let client = nonce_from_hex(&nonce);
                let proof = hex_decode(&proof).unwrap_or_default();
                let ok = client.is_some_and(|c| {
                    c != self.nonce
                        && !replay.seen(&c)
                        && self
                            .key
                            .verify_client_in(&MIGRATION, &self.nonce, &c, &proof)
                });
                let Some(client) = client.filter(|_| ok) else {
                    let _ = self.send_hs(&Handshake::Error {
                        code: "auth-failed".into(),
                        message: "authentication failed: the nodes do not share the cluster key"
                            .into(),
                    });
                    return Err(format!(
                        "refused a migration connection from '{node}': authentication failed \
                         (it does not hold the cluster key)"
                    ));
                };
                replay.record(client);
                let proof = self.key.server_proof_in(&MIGRATION, &self.nonce, &client);
                self.send_hs(&Handshake::Welcome {
                    proof: hex_encode(&proof),
                })
                .map_err(lost)?;
                let k = self.key.session_key_in(&MIGRATION, &self.nonce, &client);
                self.sealer = Some(Sealer::new(&k, End::Destination));
                self.peer = Some(node);
                self.state = State::Ready;
                Ok(true)
            }
            State::AwaitHello => {
                let Some(m) = self.recv_hs()? else {
                    return Ok(false);
                };
                let expect = self.expect.clone().unwrap_or_default();
                let Handshake::Hello {
                    magic,
                    versions,
                    node,
                    nonce,
                    boot,
                } = m
                else {
                    return Err(format!(
                        "node {expect} did not greet as a migration endpoint"
                    ));
                };
                if magic != MAGIC {
                    return Err(format!("node {expect} is not a migration endpoint"));
                }
                if !versions.contains(&VERSION) {
                    return Err(format!(
                        "node {expect} speaks migration link versions {versions:?}, this node {VERSION}"
                    ));
                }
                if node != expect {
                    let shown: String = node.chars().take(crate::vm::NAME_MAX).collect();
                    return Err(format!(
                        "the node at {expect}'s address calls itself '{shown}'"
                    ));
                }
                let Some(server) = nonce_from_hex(&nonce) else {
                    return Err(format!("node {expect} sent a malformed nonce"));
                };
                let boot = hex_decode(&boot)
                    .and_then(|b| <[u8; 16]>::try_from(b).ok())
                    .ok_or_else(|| format!("node {expect} sent a malformed boot id"))?;
                self.peer_boot = Some(boot);
                let proof = self.key.client_proof_in(&MIGRATION, &server, &self.nonce);
                self.send_hs(&Handshake::Auth {
                    version: VERSION,
                    node: self.me.clone(),
                    nonce: hex_encode(&self.nonce),
                    proof: hex_encode(&proof),
                })
                .map_err(lost)?;
                self.state = State::AwaitWelcome { server };
                Ok(true)
            }
            State::AwaitWelcome { server } => {
                let expect = self.expect.clone().unwrap_or_default();
                let Some(m) = self.recv_hs()? else {
                    return Ok(false);
                };
                match m {
                    Handshake::Welcome { proof } => {
                        let proof = hex_decode(&proof).unwrap_or_default();
                        if !self
                            .key
                            .verify_server_in(&MIGRATION, &server, &self.nonce, &proof)
                        {
                            return Err(format!(
                                "node {expect} could not prove it holds the cluster key"
                            ));
                        }
                        let k = self.key.session_key_in(&MIGRATION, &server, &self.nonce);
                        self.sealer = Some(Sealer::new(&k, End::Source));
                        self.peer = Some(expect);
                        self.state = State::Ready;
                        Ok(true)
                    }
                    Handshake::Error { message, .. } => {
                        let m: String = message.chars().take(160).collect();
                        Err(format!(
                            "node {expect} refused the migration connection: {m}"
                        ))
                    }
                    _ => Err(format!("node {expect} broke the handshake")),
                }
            }
            State::Ready | State::Failed(_) => Ok(false),
        }
    }

    /// Send a control message (after the handshake).
    pub fn send_control(&mut self, c: &Control) -> Result<(), TransportError> {
        let Some(sealer) = self.sealer.as_mut() else {
            return Err(TransportError::Broken("not authenticated"));
        };
        let body = serde_json::to_vec(c).unwrap_or_default();
        let mut out = Vec::new();
        sealer.seal_control(&body, &mut out);
        self.wire.send(&out)
    }

    /// The next control message. With `pull`, first read what the wire has
    /// (when no engine does: stream bytes read now stay queued for it).
    pub fn next_control(&mut self, pull: bool) -> Result<Option<Control>, String> {
        let Some(sealer) = self.sealer.as_mut() else {
            return Ok(None);
        };
        if pull && sealer.stream_pending() == 0 {
            if let Err(e) = sealer.pull(&mut self.wire) {
                return Err(match e {
                    migration::seal::SealedError::Seal(s) => {
                        self.refused.get_or_insert(s);
                        s.to_string()
                    }
                    migration::seal::SealedError::Transport(t) => t.to_string(),
                });
            }
        }
        match sealer.take_control() {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("bad control message: {}", hvmgmt::proto::detail(&e))),
        }
    }

    /// Send a disk message ([`super::remote_disk`]; after the handshake).
    pub fn send_disk(&mut self, body: &[u8]) -> Result<(), TransportError> {
        let Some(sealer) = self.sealer.as_mut() else {
            return Err(TransportError::Broken("not authenticated"));
        };
        let mut out = Vec::new();
        sealer.seal_disk(body, &mut out);
        self.wire.send(&out)
    }

    /// The next disk message received. With `pull`, first read what the
    /// wire has (when no engine does; stream bytes read now stay queued).
    pub fn next_disk(&mut self, pull: bool) -> Result<Option<Vec<u8>>, String> {
        let Some(sealer) = self.sealer.as_mut() else {
            return Ok(None);
        };
        if let Some(d) = sealer.take_disk() {
            return Ok(Some(d));
        }
        if pull {
            if let Err(e) = sealer.pull(&mut self.wire) {
                return Err(match e {
                    migration::seal::SealedError::Seal(s) => {
                        self.refused.get_or_insert(s);
                        s.to_string()
                    }
                    migration::seal::SealedError::Transport(t) => t.to_string(),
                });
            }
        }
        Ok(sealer.take_disk())
    }

    /// Fix the migration's encryption (after the `open`).
    pub fn set_encrypt(&mut self, on: bool) {
        if let Some(s) = self.sealer.as_mut() {
            s.set_encrypt(on);
        }
    }

    /// The engine's view of the link for one step. `None` before the
    /// handshake completed.
    pub fn link(&mut self) -> Option<SealedLink<'_, Wire>> {
        let sealer = self.sealer.as_mut()?;
        Some(SealedLink {
            sealer,
            inner: &mut self.wire,
            refused: &mut self.refused,
        })
    }

    /// Why the link broke, in words: a refused frame if there was one.
    pub fn broken_reason(&self, fallback: &str) -> String {
        match self.refused {
            Some(e) => e.to_string(),
            None => fallback.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvmgmt::auth::TestEntropy;
    use migration::MemPipe;

    fn key(b: u8) -> ClusterKey {
        ClusterKey::from_bytes(&[b; 16]).unwrap()
    }

    fn nonce(seed: u64) -> Nonce {
        hvmgmt::auth::fresh_nonce(&mut TestEntropy(seed), seed)
    }

    fn pair(ka: &ClusterKey, kb: &ClusterKey) -> (Conn, Conn) {
        let (p, q) = MemPipe::pair();
        (
            Conn::client(Wire::Pipe(p), "a", "b", ka, nonce(1)),
            Conn::server(Wire::Pipe(q), "b", kb, nonce(2), [9; 16]),
        )
    }

    fn run(a: &mut Conn, b: &mut Conn, replay: &mut ReplayGuard) -> (HsProgress, HsProgress) {
        let mut ra = ReplayGuard::new();
        for _ in 0..10 {
            b.handshake(replay);
            a.handshake(&mut ra);
        }
        (a.handshake(&mut ra), b.handshake(replay))
    }

    #[test]
    fn the_handshake_authenticates_both_ends_then_controls_flow_sealed() {
        let k = key(1);
        let (mut a, mut b) = pair(&k, &k);
        let mut replay = ReplayGuard::new();
        assert_eq!(
            run(&mut a, &mut b, &mut replay),
            (HsProgress::Ready, HsProgress::Ready)
        );
        assert_eq!(b.peer.as_deref(), Some("a"));
        assert_eq!(a.peer_boot, Some([9; 16]));
        let open = Control::Query { id: "00".into() };
        a.send_control(&open).unwrap();
        assert_eq!(b.next_control(true), Ok(Some(open)));
        b.set_encrypt(true);
        a.set_encrypt(true);
        b.send_control(&Control::Accept {}).unwrap();
        assert_eq!(a.next_control(true), Ok(Some(Control::Accept {})));
        assert_eq!(
            serde_json::to_string(&Control::Accept {}).unwrap(),
            r#"{"accept":{}}"#
        );
    }

    #[test]
    fn a_wrong_key_is_refused_on_both_sides_and_a_replayed_nonce_too() {
        let (mut a, mut b) = pair(&key(1), &key(2));
        let mut replay = ReplayGuard::new();
        let (pa, pb) = run(&mut a, &mut b, &mut replay);
        assert_eq!(
            pa,
            HsProgress::Failed(
                "node b refused the migration connection: authentication failed: the nodes do \
                 not share the cluster key"
                    .into()
            )
        );
        assert_eq!(
            pb,
            HsProgress::Failed(
                "refused a migration connection from 'a': authentication failed (it does not \
                 hold the cluster key)"
                    .into()
            )
        );
        assert!(b.next_control(true).unwrap().is_none(), "nothing sealed");
        // The same client nonce twice (a replayed handshake): refused.
        let k = key(1);
        let mut replay = ReplayGuard::new();
        let (mut a, mut b) = pair(&k, &k);
        assert_eq!(run(&mut a, &mut b, &mut replay).1, HsProgress::Ready);
        let (mut a, mut b) = pair(&k, &k);
        assert!(matches!(
            run(&mut a, &mut b, &mut replay).1,
            HsProgress::Failed(_)
        ));
        // A server that does not prove the key (it answers with a wrong
        // proof): the client gives up.
        let (p, mut q) = MemPipe::pair();
        let mut c = Conn::client(Wire::Pipe(p), "a", "b", &k, nonce(5));
        let hello = Handshake::Hello {
            magic: MAGIC.into(),
            versions: alloc::vec![1],
            node: "b".into(),
            nonce: hex_encode(&nonce(6)),
            boot: hex_encode(&[0; 16]),
        };
        let welcome = Handshake::Welcome {
            proof: hex_encode(&[0; 32]),
        };
        for m in [hello, welcome] {
            let mut out = Vec::new();
            hvmgmt::wire::encode(&serde_json::to_vec(&m).unwrap(), &mut out).unwrap();
            q.send(&out).unwrap();
        }
        assert_eq!(
            c.handshake(&mut ReplayGuard::new()),
            HsProgress::Failed("node b could not prove it holds the cluster key".into())
        );
        // Impostors and garbage.
        let (p, mut q) = MemPipe::pair();
        let mut c = Conn::client(Wire::Pipe(p), "a", "b", &k, nonce(7));
        q.send(&[0xff, 0xff, 0xff, 0xff]).unwrap();
        assert!(matches!(
            c.handshake(&mut ReplayGuard::new()),
            HsProgress::Failed(m) if m.starts_with("handshake frame of")
        ));
    }

    #[test]
    fn configurations_round_trip_and_are_checked() {
        let host = crate::testing::FakeHost::new();
        let c = super::super::vm_config(&host, 64 << 20);
        let m = ConfigMsg::from_config(&c);
        assert_eq!(m.to_config().unwrap(), c);
        let mut bad = m.clone();
        bad.devices.push([70_000, 0, 1]);
        assert!(bad.to_config().is_err());
        let mut bad = m;
        bad.ram_bytes = 4095;
        assert!(bad.to_config().unwrap_err().contains("RAM size"));
    }
}
