//! The source's job: a VM leaves this node.
//!
//! Phases: `Queued` (a slot under the node's limit, or the destination's:
//! it answered `busy`) -> `Connecting` (TCP to the peer's migration port,
//! or an in-memory pipe for a move within the node) -> `Handshake`
//! (mutual authentication) -> `Opening` (the destination checks the VM)
//! -> (a quick move: `QuickCopy`, [`super::quick`]: the disks' bases,
//! then with the VM paused their checkpoints' data, to the destination)
//! -> `Running` (the pre-copy engine) -> `Done`, or `InDoubt` after `go`
//! without `resumed`, until the destination's answer (or the operator's
//! `job-resolve`) settles it.
//!
//! Before `Running` nothing has touched the VM: a failure there only ends
//! the job. In `Running` the engine's way back resumes the VM; after the
//! commit point only the destination's word moves the VM either way.

use super::adapt::SourceVm;
use super::channel::{ConfigMsg, Conn, Control, Holds, HsProgress, Open, Paused, REFUSE_BUSY};
use super::incoming::Accepting;
use super::remote_disk::{Mirrors, RemoteLink, DISK_STALL_NS, PING_NS};
use super::set::{Migrations, MoveRequest};
use super::wire::Wire;
use super::{
    outgoing_mark, Faults, BUSY_RETRY_NS, ENGINE_SLICE_NS, NEGOTIATION_TIMEOUT_NS,
    QUERY_INTERVAL_NS,
};
use crate::mgmt::jobs::JobTable;
use crate::mgmt::proto::{
    ApiError, Direction, ErrorCode, JobState, MigrationInfo, MigrationReport as ApiReport, Phase,
};
use crate::vm::Vm;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use hvcore::host::Host;
use hvmgmt::auth::ReplayGuard;
use migration::policy::NS_PER_MS;
use migration::{
    MemPipe, Migration, MigrationReport, MigrationResult, Policy, Progress, Stage, TransportError,
    VmConfig,
};

/// Where a source job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutPhase {
    Queued,
    Connecting,
    Handshake,
    Opening,
    /// A shared-nothing move: the disks are being mirrored to the
    /// destination (before the memory engine starts).
    Storage,
    /// A quick move copies the VM's disks before the engine starts.
    QuickCopy,
    Running,
    InDoubt,
    Done,
}

/// A question to the destination about an in-doubt switch-over.
pub(super) struct Query {
    conn: Conn,
    started_ns: u64,
    sent: bool,
}

/// One outgoing migration.
pub struct Outgoing {
    pub job: u64,
    /// The migration id (hex).
    pub id: String,
    pub vm: String,
    pub to: String,
    /// The destination's migration address; `None` for a move within the
    /// node.
    pub addr: Option<[u8; 4]>,
    policy: Policy,
    encrypt: bool,
    faults: Faults,
    holds: Holds,
    config: VmConfig,
    guest: String,
    pub phase: OutPhase,
    conn: Option<Conn>,
    engine: Option<Migration>,
    /// Start of the negotiation (its deadline).
    since: u64,
    retry_at: u64,
    paused_sent: bool,
    peer_boot: Option<[u8; 16]>,
    query: Option<Query>,
    next_query_ns: u64,
    /// What the job says while in doubt.
    doubt: Option<String>,
    /// The engine's error that left it in doubt (peer named).
    doubt_cause: Option<String>,
    /// How it ended (`Done`).
    ended: Option<Phase>,
    /// The VM's disks on the shared store (a move to another node): the
    /// destination opens them; the lease passes at the pause.
    pub disks: Vec<crate::lease::vms::SharedDisk>,
    /// Its identity and kernel arguments, for the destination's file.
    carried: crate::vmconfig::Carried,
    /// A shared-nothing move: the disks the destination creates, and
    /// where (`STORE[:DIR]`; `None`: its default store).
    pub create_disks: Vec<super::remote_disk::DiskSpec>,
    pub store: Option<String>,
    /// The VM's disks mirrored to the destination (from `accept` until
    /// the job ends).
    mirrors: Option<Mirrors>,
    /// The mirrors' last figures once they are gone, so that the ended
    /// job still shows its disk bytes.
    storage_done: (u64, u64),
    /// When the disk copy started (its timeout).
    storage_since: u64,
    /// Disk data acknowledged when last seen, and since when it has
    /// not moved while some was outstanding (the stall clock).
    acked_seen: (u64, u64),
    /// When the last barrier went out as a sign of life.
    pinged_at: u64,
    /// A quick move (`--quick`): its disk work once the destination
    /// accepted (`QuickCopy`), kept until the move ends.
    pub quick: bool,
    quick_src: Option<super::quick::QuickSource>,
}

impl Outgoing {
    pub(super) fn new(
        job: u64,
        id: String,
        vm: &Vm,
        req: MoveRequest,
        addr: Option<[u8; 4]>,
        config: VmConfig,
        now: u64,
    ) -> Self {
        Self {
            job,
            id,
            vm: req.vm,
            to: req.to,
            addr,
            policy: req.policy,
            encrypt: req.encrypt,
            faults: req.faults,
            holds: req.holds,
            config,
            guest: vm.label().into(),
            phase: OutPhase::Queued,
            conn: None,
            engine: None,
            since: now,
            retry_at: now,
            paused_sent: false,
            peer_boot: None,
            query: None,
            next_query_ns: now,
            doubt: None,
            doubt_cause: None,
            ended: None,
            disks: Vec::new(),
            carried: crate::vmconfig::Carried::of(vm),
            create_disks: Vec::new(),
            store: None,
            mirrors: None,
            storage_done: (0, 0),
            storage_since: now,
            acked_seen: (0, now),
            pinged_at: now,
            quick: req.quick,
            quick_src: None,
        }
    }

    /// Progress for the job table.
    pub(super) fn info(&self) -> MigrationInfo {
        let st = self
            .engine
            .as_ref()
            .map(Migration::status)
            .unwrap_or_default();
        let phase = match self.phase {
            OutPhase::Queued => Phase::Queued,
            OutPhase::Connecting => Phase::Connecting,
            OutPhase::Handshake | OutPhase::Opening => Phase::Negotiating,
            OutPhase::Storage => Phase::Copying,
            OutPhase::QuickCopy => Phase::Copying,
            OutPhase::InDoubt => Phase::InDoubt,
            OutPhase::Done => self.ended.unwrap_or(Phase::Failed),
            OutPhase::Running => match self.engine.as_ref().map(Migration::stage) {
                Some(Stage::Copying) => Phase::Copying,
                Some(Stage::FinalCopy) => Phase::FinalCopy,
                Some(Stage::SwitchingOver) | Some(Stage::Finished) => Phase::SwitchingOver,
                Some(Stage::Handshake) | None => Phase::Negotiating,
            },
        };
        let eta_ms = (st.bandwidth_bytes_per_s > 0 && self.phase == OutPhase::Running).then(|| {
            u64::try_from(
                u128::from(st.bytes_remaining) * 1000 / u128::from(st.bandwidth_bytes_per_s),
            )
            .unwrap_or(u64::MAX)
        });
        let storage = match (&self.mirrors, &self.quick_src) {
            (Some(m), _) => m.bytes(),
            (None, Some(q)) => quick_bytes(q),
            (None, None) => self.storage_done,
        };
        MigrationInfo {
            direction: Direction::Outgoing,
            peer: self.to.clone(),
            phase,
            pass: st.pass,
            bytes_sent: st.bytes_sent,
            bytes_remaining: if self.phase == OutPhase::Queued {
                self.config.ram_bytes
            } else {
                st.bytes_remaining
            },
            dirty_rate_bytes_per_s: st.dirty_rate_bytes_per_s,
            bandwidth_bytes_per_s: st.bandwidth_bytes_per_s,
            eta_ms,
            throttle_pct: st.throttle_pct,
            downtime_limit_ms: self.policy.downtime_limit_ns / NS_PER_MS,
            encrypted: self.encrypt,
            verify: self.policy.verify_memory,
            storage_bytes_copied: storage.0,
            storage_bytes_total: storage.1,
            checkpoint_bytes: self
                .quick_src
                .as_ref()
                .map_or(0, |q| q.progress().child_bytes),
        }
    }

    /// The mirrors, taken as the job ends (their figures kept).
    fn take_mirrors(&mut self) -> Option<Mirrors> {
        let m = self.mirrors.take();
        if let Some(m) = &m {
            self.storage_done = m.bytes();
        }
        m
    }

    /// The quick move's disk work, taken as the job ends (its figures
    /// kept, as [`Outgoing::take_mirrors`]).
    fn take_quick(&mut self) -> Option<super::quick::QuickSource> {
        let q = self.quick_src.take();
        if let Some(q) = &q {
            self.storage_done = quick_bytes(q);
        }
        q
    }

    pub(super) fn publish(&self, jobs: &mut JobTable) {
        jobs.set_migration(self.job, self.info());
    }

    fn vm_index(&self, vms: &[Vm]) -> Option<usize> {
        vms.iter()
            .position(|v| v.migration_mark() == Some(outgoing_mark(self.job)))
    }

    /// The index of the VM it moves (the job's set).
    pub(super) fn vm_index_of(&self, vms: &[Vm]) -> Option<usize> {
        self.vm_index(vms)
    }
}

/// A quick move's disk bytes: the bases, then what the checkpoints held.
fn quick_bytes(q: &super::quick::QuickSource) -> (u64, u64) {
    let p = q.progress();
    (p.base_done + p.fold_done, p.base_total + p.fold_total)
}

/// The engine's report as the API shows it.
pub(super) fn api_report(r: &MigrationReport) -> ApiReport {
    ApiReport {
        passes: r.passes,
        pages_per_pass: r.pages_per_pass.clone(),
        bytes_sent: r.bytes_sent,
        zero_pages: r.zero_pages,
        ram_bytes: r.ram_bytes,
        total_ms: r.total_ms,
        downtime_ms: r.downtime_ms,
        expected_downtime_ms: r.expected_downtime_ms,
        throttle_pct: r.throttle_pct,
        result: r.result.as_str().into(),
        error: r.error.clone(),
        dirty_tracker: r.dirty_tracker.clone(),
        verified: r.verified,
        pause_us: {
            let p = r.pause_us;
            crate::mgmt::proto::PausePhases {
                harvest: p.harvest,
                last_pages: p.last_pages,
                verify: p.verify,
                state: p.state,
                drain: p.drain,
                ready: p.ready,
                resumed: p.resumed,
            }
        },
    }
}

impl Migrations {
    /// Open a connection to `o`'s destination (a pipe to this node's own
    /// acceptor for a move within the node).
    fn connect(
        &mut self,
        host: &mut dyn Host,
        o: &Outgoing,
        faults: Faults,
    ) -> Result<Conn, String> {
        let now = host.now_ns();
        let nonce = self.nonce(host);
        let wire = match o.addr {
            None => {
                let (a, b) = MemPipe::pair();
                if let Some(n) = faults.fail_after_bytes {
                    a.fail_after(n);
                }
                let server_nonce = self.nonce(host);
                let server =
                    Conn::server(Wire::Pipe(b), &self.me, &self.key, server_nonce, self.boot);
                self.accepting.push(Accepting::new(server, now));
                Wire::Pipe(a)
            }
            Some(addr) => {
                let Some(net) = host.net() else {
                    return Err("this node has no migration NIC".into());
                };
                Wire::connect(net, addr, self.port, now)
                    .map_err(|e| format!("cannot open a connection to node {}: {e}", o.to))?
            }
        };
        Ok(Conn::client(wire, &self.me, &o.to, &self.key, nonce))
    }

    fn addr_text(&self, o: &Outgoing) -> String {
        match o.addr {
            Some([a, b, c, d]) => format!("{a}.{b}.{c}.{d}:{}", self.port),
            None => "this node".into(),
        }
    }

    /// One round of a source job.
    pub(super) fn step_outgoing(
        &mut self,
        o: &mut Outgoing,
        host: &mut dyn Host,
        vms: &mut Vec<Vm>,
        jobs: &mut JobTable,
    ) {
        let now = host.now_ns();
        let Some(vi) = o.vm_index(vms) else {
            // Nothing can remove a marked VM; should it be gone anyway, the
            // job cannot go on.
            self.end_without_engine(o, host, vms, jobs, "the VM is gone from this node", false);
            return;
        };
        match o.phase {
            OutPhase::Queued => match jobs.state(o.job) {
                Some(JobState::Queued) => {}
                Some(JobState::Running) if now >= o.retry_at => {
                    match self.connect(host, o, o.faults) {
                        Ok(c) => {
                            o.conn = Some(c);
                            o.phase = OutPhase::Connecting;
                            o.since = now;
                        }
                        Err(e) => self.end_without_engine(o, host, vms, jobs, &e, false),
                    }
                }
                Some(JobState::Running) => {}
                // Cancelled (or gone) while queued.
                _ => {
                    vms[vi].set_migration_mark(None);
                    o.ended = Some(Phase::Cancelled);
                    o.phase = OutPhase::Done;
                }
            },
            OutPhase::Connecting | OutPhase::Handshake | OutPhase::Opening => {
                self.negotiate(o, host, vms, jobs, now)
            }
            OutPhase::Storage => self.run_storage(o, host, vms, jobs),
            OutPhase::QuickCopy => self.quick_copy(o, host, vms, jobs),
            OutPhase::Running => self.run_engine(o, host, vms, jobs),
            OutPhase::InDoubt => self.ask(o, host, vms, jobs, now),
            OutPhase::Done => {}
        }
        if o.phase != OutPhase::Done {
            o.publish(jobs);
        }
    }

    fn negotiate(
        &mut self,
        o: &mut Outgoing,
        host: &mut dyn Host,
        vms: &mut [Vm],
        jobs: &mut JobTable,
        now: u64,
    ) {
        let Some(mut conn) = o.conn.take() else {
            return self.end_without_engine(o, host, vms, jobs, "no connection", false);
        };
        conn.wire.service(host.net(), now);
        let late = now.saturating_sub(o.since) > NEGOTIATION_TIMEOUT_NS;
        let secs = NEGOTIATION_TIMEOUT_NS / 1_000_000_000;
        let fail = |why: String| Err::<(), String>(why);
        let r: Result<(), String> = (|| {
            if o.phase == OutPhase::Connecting {
                if conn.wire.is_open() {
                    o.phase = OutPhase::Handshake;
                } else if conn.wire.is_broken() {
                    return fail(format!(
                        "node {} refused the connection at {} (not a managed node, or not listening)",
                        o.to,
                        self.addr_text(o)
                    ));
                } else if late {
                    return fail(format!(
                        "cannot reach node {} at {}: no connection within {secs} s",
                        o.to,
                        self.addr_text(o)
                    ));
                } else {
                    return Ok(());
                }
            }
            if o.phase == OutPhase::Handshake {
                // The source's replay window is unused (it checks proofs only).
                match conn.handshake(&mut ReplayGuard::new()) {
                    HsProgress::Pending if late => {
                        return fail(format!(
                            "node {} did not complete the authentication within {secs} s",
                            o.to
                        ))
                    }
                    HsProgress::Pending => return Ok(()),
                    HsProgress::Failed(why) => return fail(why),
                    HsProgress::Ready => {
                        o.peer_boot = conn.peer_boot;
                        let open = Control::Open(Open {
                            id: o.id.clone(),
                            vm: o.vm.clone(),
                            guest: o.guest.clone(),
                            config: ConfigMsg::from_config(&o.config),
                            encrypt: o.encrypt,
                            verify: o.policy.verify_memory,
                            holds: o.holds,
                            disks: o.disks.clone(),
                            vm_id: o.carried.id.map(|i| i.to_string()),
                            append: o.carried.append.clone(),
                            create_disks: o.create_disks.clone(),
                            store: o.store.clone(),
                        });
                        conn.send_control(&open)
                            .map_err(|e| format!("link to {} lost: {e}", o.to))?;
                        conn.set_encrypt(o.encrypt);
                        conn.wire.service(host.net(), now);
                        o.phase = OutPhase::Opening;
                    }
                }
            }
            // Opening: the destination's verdict.
            match conn.next_control(true) {
                Ok(Some(Control::Accept {})) => {
                    let Some(vi) = o.vm_index(vms) else {
                        return fail("the VM is gone from this node".into());
                    };
                    let vm = &mut vms[vi];
                    if o.quick {
                        // The checkpoints now: the guest writes them while
                        // the bases copy.
                        let files = self.files().ok_or("this node has no stores")?;
                        let q = super::quick::QuickSource::start(vm, &files)
                            .map_err(|e| format!("cannot start the quick move: {e}"))?;
                        o.quick_src = Some(q);
                        o.phase = OutPhase::QuickCopy;
                        jobs.set_note(o.job, None);
                        return Ok(());
                    }
                    jobs.set_note(o.job, None);
                    if !o.create_disks.is_empty() {
                        // Shared-nothing: the disks first, mirrored.
                        let m = Mirrors::install(vm)
                            .map_err(|e| format!("cannot mirror the VM's disks to {}: {e}", o.to))?
                            .with_rate(o.policy.max_bandwidth_bytes_per_s);
                        o.mirrors = Some(m);
                        o.phase = OutPhase::Storage;
                        o.storage_since = now;
                        return Ok(());
                    }
                    if !o.disks.is_empty() {
                        // Shared store: the hand-over's record is written
                        // now, so the pause only renames it into place.
                        if let Some(l) = vm.lease_mut() {
                            l.prepare_hand_over(&o.to, now / NS_PER_MS);
                        }
                    }
                    let engine = Migration::new(
                        &SourceVm {
                            vm,
                            config: &o.config,
                        },
                        o.policy,
                        now,
                    );
                    o.engine = Some(engine);
                    o.phase = OutPhase::Running;
                    Ok(())
                }
                Ok(Some(Control::Refuse { code, message })) => {
                    let message: String = message.chars().take(200).collect();
                    if code == REFUSE_BUSY {
                        o.phase = OutPhase::Queued;
                        o.retry_at = now.saturating_add(BUSY_RETRY_NS);
                        jobs.set_note(
                            o.job,
                            Some(&format!("waiting for node {}: {message}", o.to)),
                        );
                        return Err(String::new());
                    }
                    fail(format!("node {} refused: {message}", o.to))
                }
                Ok(Some(_)) => fail(format!("node {} broke the protocol", o.to)),
                Ok(None) if conn.wire.is_broken() => fail(format!(
                    "link to {} lost while it checked the VM: {}",
                    o.to,
                    conn.broken_reason("connection reset")
                )),
                Ok(None) if late => fail(format!(
                    "node {} did not answer the migration request within {secs} s",
                    o.to
                )),
                Ok(None) => Ok(()),
                Err(e) => fail(format!(
                    "link to {} lost while it checked the VM: {e}",
                    o.to
                )),
            }
        })();
        match r {
            Ok(()) => o.conn = Some(conn),
            // Busy: back to the queue phase, the connection goes.
            Err(why) if why.is_empty() => {
                self.drain(conn.wire, now);
            }
            Err(why) => {
                self.drain(conn.wire, now);
                self.end_without_engine(o, host, vms, jobs, &why, false);
            }
        }
    }

    /// A shared-nothing move's disk copy (phase `Storage`): copy chunk by
    /// chunk within the job's slice, move disk messages and their acks;
    /// once every disk is current on the destination (its last flush
    /// acknowledged), say so and start the memory engine with the mirror
    /// still in place. A failure gives the VM its own disks back.
    fn run_storage(
        &mut self,
        o: &mut Outgoing,
        host: &mut dyn Host,
        vms: &mut [Vm],
        jobs: &mut JobTable,
    ) {
        let Some(mut conn) = o.conn.take() else {
            return self.end_without_engine(o, host, vms, jobs, "no connection", false);
        };
        let Some(vi) = o.vm_index(vms) else {
            o.conn = Some(conn);
            return self.end_without_engine(o, host, vms, jobs, "the VM is gone", false);
        };
        let start = host.now_ns();
        conn.wire.service(host.net(), start);
        let r: Result<bool, String> = (|| {
            let to = &o.to;
            let lost = |e: String| format!("link to {to} lost during the disk copy: {e}");
            if vms[vi].stop_reason().is_some() {
                return Err("the VM stopped during the disk copy".into());
            }
            if start.saturating_sub(o.storage_since) > o.policy.timeout_ns {
                return Err(format!(
                    "the disk copy to {to} did not complete within {} s",
                    o.policy.timeout_ns / 1_000_000_000
                ));
            }
            if conn.wire.is_broken() {
                return Err(lost(conn.broken_reason("connection reset")));
            }
            let Some(m) = o.mirrors.as_mut() else {
                return Err("the disks' mirror is gone".into());
            };
            exchange(&mut conn, &m.link, true).map_err(&lost)?;
            ack_stall(&m.link, &mut o.acked_seen, start, to)?;
            if start.saturating_sub(o.pinged_at) >= PING_NS {
                o.pinged_at = start;
                m.link.ping();
            }
            let done = {
                let h: &dyn Host = &*host;
                m.step(&|| h.now_ns(), start.saturating_add(ENGINE_SLICE_NS))
                    .map_err(|e| format!("the disk copy to {to} failed: {e}"))?
            };
            exchange(&mut conn, &m.link, false).map_err(&lost)?;
            Ok(done)
        })();
        let now = host.now_ns();
        conn.wire.service(host.net(), now);
        match r {
            Ok(false) => o.conn = Some(conn),
            Ok(true) => {
                if let Err(e) = conn.send_control(&Control::StorageCopied {}) {
                    o.conn = Some(conn);
                    let why = format!("link to {} lost: {e}", o.to);
                    return self.end_without_engine(o, host, vms, jobs, &why, false);
                }
                conn.wire.service(host.net(), now);
                let engine = Migration::new(
                    &SourceVm {
                        vm: &mut vms[vi],
                        config: &o.config,
                    },
                    o.policy,
                    now,
                );
                o.engine = Some(engine);
                o.phase = OutPhase::Running;
                o.conn = Some(conn);
            }
            Err(why) => {
                o.conn = Some(conn);
                self.end_without_engine(o, host, vms, jobs, &why, false);
            }
        }
    }

    /// Delete the disk files `files` of VM `vm`, which now runs elsewhere
    /// with its own copies.
    fn delete_files(&self, host: &mut dyn Host, vm: &str, files: &[String]) {
        let Some(stores) = self.stores.clone() else {
            return;
        };
        let store = crate::store::StoreFiles::new(stores);
        for at in files {
            let line = match crate::disks::FileStore::remove(&store, at) {
                Ok(()) => format!("vmm-service: VM {vm} left this node: its disk {at} deleted\n"),
                Err(e) => {
                    format!(
                        "vmm-service: VM {vm} left this node: cannot delete its disk {at}: {e}\n"
                    )
                }
            };
            host.console_write(&line);
        }
    }

    /// End a job whose engine never started: the VM was not touched.
    fn end_without_engine(
        &mut self,
        o: &mut Outgoing,
        host: &mut dyn Host,
        vms: &mut [Vm],
        jobs: &mut JobTable,
        why: &str,
        cancelled: bool,
    ) {
        let now = host.now_ns();
        if let Some(c) = o.conn.take() {
            self.drain(c.wire, now);
        }
        let kept = self.quick_abort(o, vms);
        let why = &match kept {
            Some(k) => format!("{why}; {k}"),
            None => String::from(why),
        };
        if let Some(vi) = o.vm_index(vms) {
            if let Some(m) = o.take_mirrors() {
                m.restore(&mut vms[vi]);
            }
            vms[vi].set_migration_mark(None);
            if o.phase != OutPhase::Queued || jobs.state(o.job) == Some(JobState::Running) {
                vms[vi].note_failed_migration();
            }
        }
        let report = failed_report(o.config.ram_bytes, why, cancelled);
        print_report(host, &report);
        jobs.set_report(o.job, api_report(&report));
        self.keep_report(o.job, report);
        o.ended = Some(if cancelled {
            Phase::Cancelled
        } else {
            Phase::Failed
        });
        o.phase = OutPhase::Done;
        o.publish(jobs);
        if cancelled {
            if jobs.state(o.job) == Some(JobState::Queued) {
                let _ = jobs.cancel(o.job, now);
            } else {
                jobs.cancelled(o.job, why, now);
            }
        } else {
            jobs.fail(o.job, why, now);
        }
        host.console_write(&format!(
            "vmm-service: VM {} stays here: {why} (job {})\n",
            o.vm, o.job
        ));
    }

    fn run_engine(
        &mut self,
        o: &mut Outgoing,
        host: &mut dyn Host,
        vms: &mut Vec<Vm>,
        jobs: &mut JobTable,
    ) {
        let (Some(mut conn), Some(mut engine)) = (o.conn.take(), o.engine.take()) else {
            return self.end_without_engine(o, host, vms, jobs, "lost its engine", false);
        };
        let Some(vi) = o.vm_index(vms) else {
            o.conn = Some(conn);
            o.engine = Some(engine);
            return self.end_without_engine(
                o,
                host,
                vms,
                jobs,
                "the VM is gone from this node",
                false,
            );
        };
        let start = host.now_ns();
        let mut finished = false;
        loop {
            let now = host.now_ns();
            conn.wire.service(host.net(), now);
            let vm = &mut vms[vi];
            let mut src = SourceVm {
                vm,
                config: &o.config,
            };
            if !engine.committed() && src.vm.stop_reason().is_some() {
                let mut link = conn.link().expect("handshake done");
                engine.cancel(&mut src, &mut link, now);
                finished = true;
                o.doubt = Some("the VM stopped during the migration".into());
                break;
            }
            if conn.wire.is_broken() {
                let why = TransportError::Broken("connection reset");
                let mut link = conn.link().expect("handshake done");
                engine.link_failed(&mut src, &mut link, why, now);
            }
            if let Some(m) = o.mirrors.as_ref().filter(|_| !engine.committed()) {
                // Guest writes still go to the destination's disks: move
                // them and their acks. The engine steps only with every
                // disk message on the wire, so those written before the
                // pause precede the VM's state there.
                let r = exchange(&mut conn, &m.link, false)
                    .and_then(|()| ack_stall(&m.link, &mut o.acked_seen, now, &o.to))
                    .map(|()| m.link.outbox_empty());
                match r {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(why) => {
                        let mut link = conn.link().expect("handshake done");
                        engine.cancel(&mut src, &mut link, now);
                        finished = true;
                        o.doubt = Some(format!("the VM's disks on {}: {why}", o.to));
                        break;
                    }
                }
            }
            let before = (engine.stage(), engine.status().pass);
            let step = {
                let mut link = conn.link().expect("handshake done");
                engine.step(&mut src, &mut link, now)
            };
            let after = (engine.stage(), engine.status().pass);
            if after != before {
                log::debug!(
                    "migrate job {}: {:?} pass {} at {} ms, {} bytes sent",
                    o.job,
                    after.0,
                    after.1,
                    host.now_ns() / 1_000_000,
                    engine.status().bytes_sent
                );
            }
            if engine.vm_paused() && !o.paused_sent {
                o.paused_sent = true;
                let mut paused = Paused::from_bookkeeping(src.vm.bookkeeping());
                if !o.disks.is_empty() {
                    // The VM's files stay where they are: write them out,
                    // stop writing and name the destination in the lease.
                    match Self::hand_over(src.vm, &o.to, &*host, o.job) {
                        Ok(epoch) => paused.lease_epoch = Some(epoch),
                        Err(why) => {
                            let mut link = conn.link().expect("handshake done");
                            engine.cancel(&mut src, &mut link, now);
                            finished = true;
                            o.doubt = Some(format!(
                                "the lease on the VM's disks could not be handed to {}: {why}",
                                o.to
                            ));
                            break;
                        }
                    }
                }
                let paused = Control::Paused(paused);
                // A failed send shows up as a broken link at the next step.
                let _ = conn.send_control(&paused);
            }
            match step {
                Progress::Finished(_) => {
                    finished = true;
                    break;
                }
                Progress::Waiting { .. } => break,
                Progress::Busy if host.now_ns().saturating_sub(start) >= ENGINE_SLICE_NS => break,
                Progress::Busy => {}
            }
        }
        let now = host.now_ns();
        conn.wire.service(host.net(), now);
        o.engine = Some(engine);
        if !finished {
            o.conn = Some(conn);
            return;
        }
        let now = host.now_ns();
        let refused = conn.refused;
        self.drain(conn.wire, now);
        let engine = o.engine.as_ref().expect("just put back");
        if engine.in_doubt() {
            o.phase = OutPhase::InDoubt;
            o.next_query_ns = now;
            o.doubt_cause = named_report(engine, &o.to).error;
            let note = doubt_note(o, None);
            jobs.set_note(o.job, Some(&note));
            jobs.set_cancellable(o.job, false);
            host.console_write(&format!("vmm-service: job {}: {note}\n", o.job));
            o.doubt = Some(note);
            return;
        }
        let mut report = named_report(engine, &o.to);
        if let (Some(r), MigrationResult::Failed) = (refused, report.result) {
            // The engine saw a broken link; say why it broke.
            report.error = Some(format!(
                "{}: {r}",
                report.error.as_deref().unwrap_or("the link failed")
            ));
        }
        if let Some(why) = o
            .doubt
            .take()
            .filter(|_| report.result != MigrationResult::Completed)
        {
            report.error = Some(why);
        }
        self.finish_outgoing(o, host, vms, jobs, report, false);
    }

    /// The node's stores as files (checkpoints, their deletion).
    fn files(&self) -> Option<crate::store::StoreFiles> {
        self.stores.clone().map(crate::store::StoreFiles::new)
    }

    /// A quick move that ends before the VM runs at the destination: the
    /// VM runs on here, its checkpoints merged back (or kept: the text
    /// says so).
    fn quick_abort(&self, o: &mut Outgoing, vms: &mut [Vm]) -> Option<String> {
        let q = o.take_quick()?;
        let vi = o.vm_index(vms)?;
        match self.files() {
            Some(files) => q.abort(&mut vms[vi], &files, true),
            None => Some("its checkpoints are kept (no stores)".into()),
        }
    }

    /// A quick move's disks ([`super::quick`]): the bases go to the
    /// destination's new disks while the guest writes the checkpoints;
    /// then the VM is paused and the checkpoints' data follows; once
    /// every disk is durable there, `storage-copied` and the memory engine
    /// (`Policy::pause_at_once`: one pass, the VM already paused).
    fn quick_copy(
        &mut self,
        o: &mut Outgoing,
        host: &mut dyn Host,
        vms: &mut [Vm],
        jobs: &mut JobTable,
    ) {
        let (Some(mut conn), Some(vi)) = (o.conn.take(), o.vm_index(vms)) else {
            return self.end_without_engine(o, host, vms, jobs, "lost its connection", false);
        };
        let now = host.now_ns();
        conn.wire.service(host.net(), now);
        let r = match o.quick_src.as_mut() {
            None => Err(String::from("lost its disk copy")),
            Some(_) if conn.wire.is_broken() => Err(format!(
                "link to {} lost during the disk copy: {}",
                o.to,
                conn.broken_reason("connection reset")
            )),
            Some(_) if vms[vi].stop_reason().is_some() => {
                Err(String::from("the VM stopped during the disk copy"))
            }
            Some(q)
                if q.started_at()
                    .is_some_and(|s| now.saturating_sub(s) > o.policy.timeout_ns) =>
            {
                Err(format!(
                    "the disk copy to {} did not complete within {} s",
                    o.to,
                    o.policy.timeout_ns / 1_000_000_000
                ))
            }
            Some(q) => {
                let h: &dyn Host = &*host;
                let clock = || h.now_ns();
                q.step(
                    &mut vms[vi],
                    &mut conn,
                    &clock,
                    now.saturating_add(ENGINE_SLICE_NS),
                )
                .map_err(|e| format!("disk copy to {}: {e}", o.to))
            }
        };
        let later = host.now_ns();
        conn.wire.service(host.net(), later);
        let r = r.and_then(|copied| {
            if !copied {
                return Ok(());
            }
            // Every disk is whole and durable there; the VM is paused.
            conn.send_control(&Control::StorageCopied {})
                .map_err(|e| format!("link to {} lost: {e}", o.to))?;
            let engine = Migration::new(
                &SourceVm {
                    vm: &mut vms[vi],
                    config: &o.config,
                },
                o.policy,
                host.now_ns(),
            );
            o.engine = Some(engine);
            o.phase = OutPhase::Running;
            Ok(())
        });
        o.conn = Some(conn);
        if let Err(why) = r {
            self.end_without_engine(o, host, vms, jobs, &why, false);
        }
    }

    /// The switch-over of a VM on the shared store (paused): flush its disks,
    /// close its write gate and hand its lease to `to`. Returns the epoch the
    /// destination adopts. The node log says what each step took.
    fn hand_over(vm: &mut Vm, to: &str, host: &dyn Host, job: u64) -> Result<u64, String> {
        let t0 = host.now_ns();
        for slot in 0..vm.disk_count() {
            if let Some(d) = vm.disk_mut(slot as u8) {
                d.flush().map_err(|e| format!("disk {slot}: {e}"))?;
            }
        }
        // From here until the way back decides, nothing is written.
        vm.disk_gate().close();
        let t1 = host.now_ns();
        let r = match vm.lease_mut() {
            Some(l) => l.hand_over(to, t1 / NS_PER_MS),
            None => Err("the VM holds no lease".into()),
        };
        let t2 = host.now_ns();
        log::info!(
            "migrate job {job}: switch-over on the shared store: disks flushed in {} us, \
             lease handed to {to} in {} us",
            (t1 - t0) / 1000,
            (t2 - t1) / 1000
        );
        r
    }

    /// The engine ended (completed, failed or cancelled; not in doubt).
    fn finish_outgoing(
        &mut self,
        o: &mut Outgoing,
        host: &mut dyn Host,
        vms: &mut Vec<Vm>,
        jobs: &mut JobTable,
        mut report: MigrationReport,
        by_operator: bool,
    ) {
        let now = host.now_ns();
        let mut quick_text = String::new();
        if let Some(q) = &o.quick_src {
            // The pause began before the disks' last data went, the move
            // with the disks' copy.
            if report.result == MigrationResult::Completed {
                if let Some(p) = q.paused_at() {
                    report.downtime_ms = now.saturating_sub(p) / NS_PER_MS;
                }
                if let Some(s) = q.started_at() {
                    report.total_ms = now.saturating_sub(s) / NS_PER_MS;
                }
            }
            let p = q.progress();
            quick_text = format!(
                " (quick: {} MiB of bases copied while the checkpoint grew to {} MiB; {} MiB of \
                 it written during the downtime)",
                p.base_total >> 20,
                p.child_max >> 20,
                p.fold_total >> 20
            );
        }
        print_report(host, &report);
        o.publish(jobs);
        jobs.set_report(o.job, api_report(&report));
        let vi = o.vm_index(vms);
        match report.result {
            MigrationResult::Completed => {
                // The VM runs at the destination: this copy goes.
                let mirrors = o.take_mirrors();
                if let Some(vi) = vi {
                    vms.remove(vi).destroy();
                }
                if let Some(m) = mirrors {
                    // Shared-nothing: its disks are the destination's
                    // now; the mirror is broken, this node's files go.
                    let files = m.files.clone();
                    drop(m);
                    self.delete_files(host, &o.vm, &files);
                }
                // Its files here go: the checkpoints and the bases.
                if let (Some(q), Some(files)) = (o.take_quick(), self.files()) {
                    for left in q.finish(&files) {
                        log::warn!("quick migration: cannot delete {left}");
                    }
                }
                let how = if by_operator {
                    " (the operator said it runs there)"
                } else {
                    ""
                };
                let text = format!(
                    "moved to {}{how}: {} passes, {} bytes, downtime {} ms, {} ms in all{quick_text}",
                    o.to, report.passes, report.bytes_sent, report.downtime_ms, report.total_ms
                );
                jobs.complete(o.job, Some(&text), now);
                o.ended = Some(Phase::Completed);
                host.console_write(&format!(
                    "vmm-service: VM {} moved to {} (job {})\n",
                    o.vm, o.to, o.job
                ));
            }
            result => {
                if let Some(k) = self.quick_abort(o, vms) {
                    report.error = Some(format!(
                        "{}; {k}",
                        report.error.as_deref().unwrap_or("failed")
                    ));
                }
                if let Some(vi) = vi {
                    if let Some(m) = o.take_mirrors() {
                        // Its own disks back (they hold every write).
                        m.restore(&mut vms[vi]);
                    }
                    vms[vi].set_migration_mark(None);
                    vms[vi].note_failed_migration();
                    // Before it runs again: its lease back (or wait for it).
                    crate::lease::vms::take_back(&mut vms[vi], now / NS_PER_MS);
                }
                let why = report.error.clone().unwrap_or_else(|| "failed".into());
                if result == MigrationResult::Cancelled && why.contains("cancelled by the operator")
                {
                    jobs.cancelled(o.job, &why, now);
                    o.ended = Some(Phase::Cancelled);
                } else {
                    jobs.fail(o.job, &why, now);
                    o.ended = Some(if result == MigrationResult::Cancelled {
                        Phase::Cancelled
                    } else {
                        Phase::Failed
                    });
                }
                host.console_write(&format!(
                    "vmm-service: VM {} stays here: {why} (job {})\n",
                    o.vm, o.job
                ));
            }
        }
        self.keep_report(o.job, report);
        o.phase = OutPhase::Done;
        o.publish(jobs);
    }

    /// In doubt: ask the destination, every [`QUERY_INTERVAL_NS`].
    fn ask(
        &mut self,
        o: &mut Outgoing,
        host: &mut dyn Host,
        vms: &mut Vec<Vm>,
        jobs: &mut JobTable,
        now: u64,
    ) {
        if o.query.is_none() {
            if now < o.next_query_ns {
                return;
            }
            // A VM on the shared store: the lease answers for a
            // destination that cannot (it may be down): adopted there, the
            // VM is the destination's.
            if let Some(why) = o
                .vm_index(vms)
                .filter(|_| !o.disks.is_empty())
                .and_then(|vi| crate::lease::vms::adopted_elsewhere(&vms[vi]))
            {
                host.console_write(&format!(
                    "vmm-service: job {}: {why}; this copy is deleted\n",
                    o.job
                ));
                self.settle(o, host, vms, jobs, true, false, now);
                return;
            }
            match self.connect(host, o, Faults::default()) {
                Ok(conn) => {
                    o.query = Some(Query {
                        conn,
                        started_ns: now,
                        sent: false,
                    })
                }
                Err(e) => {
                    o.next_query_ns = now.saturating_add(QUERY_INTERVAL_NS);
                    self.note_doubt(o, jobs, &e);
                    return;
                }
            }
        }
        let Some(mut q) = o.query.take() else {
            return;
        };
        q.conn.wire.service(host.net(), now);
        let answer: Result<Option<String>, String> = (|| {
            if !q.conn.is_ready() {
                if q.conn.wire.is_broken() {
                    return Err(format!("node {} refused the connection", o.to));
                }
                if !q.conn.wire.is_open() {
                    return Ok(None);
                }
                match q.conn.handshake(&mut ReplayGuard::new()) {
                    HsProgress::Ready => {}
                    HsProgress::Pending => return Ok(None),
                    HsProgress::Failed(w) => return Err(w),
                }
            }
            if !q.sent {
                q.conn
                    .send_control(&Control::Query { id: o.id.clone() })
                    .map_err(|e| e.to_string())?;
                q.sent = true;
                q.conn.wire.service(host.net(), now);
            }
            match q.conn.next_control(true)? {
                Some(Control::Answer { id, state }) if id == o.id => Ok(Some(state)),
                Some(_) => Err(format!("node {} answered something else", o.to)),
                None if q.conn.wire.is_broken() => Err(format!("link to {} lost", o.to)),
                None => Ok(None),
            }
        })();
        let late = now.saturating_sub(q.started_ns) > NEGOTIATION_TIMEOUT_NS;
        match answer {
            Ok(None) if !late => {
                o.query = Some(q);
            }
            Ok(None) | Err(_) => {
                let why = match answer {
                    Err(e) => e,
                    _ => format!("node {} did not answer within 10 s", o.to),
                };
                self.drain(q.conn.wire, now);
                o.next_query_ns = now.saturating_add(QUERY_INTERVAL_NS);
                self.note_doubt(o, jobs, &why);
            }
            Ok(Some(state)) => {
                let same_boot = q.conn.peer_boot.is_some() && q.conn.peer_boot == o.peer_boot;
                self.drain(q.conn.wire, now);
                match state.as_str() {
                    "resumed" => self.settle(o, host, vms, jobs, true, false, now),
                    "discarded" => self.settle(o, host, vms, jobs, false, false, now),
                    // It never accepted this migration in this boot: it
                    // never resumed it.
                    "unknown" if same_boot => self.settle(o, host, vms, jobs, false, false, now),
                    _ => {
                        o.next_query_ns = now.saturating_add(5 * QUERY_INTERVAL_NS);
                        let note = format!(
                            "node {} restarted after the switch-over and cannot tell whether it ran \
                             VM {}: check `vm list` on {}, then `job resolve {} --keep \
                             destination` if it runs there (this paused copy is deleted) or \
                             `--keep source` if it does not (it resumes here)",
                            o.to, o.vm, o.to, o.job
                        );
                        jobs.set_note(o.job, Some(&note));
                        o.doubt = Some(note);
                    }
                }
            }
        }
    }

    fn note_doubt(&self, o: &mut Outgoing, jobs: &mut JobTable, why: &str) {
        let note = doubt_note(o, Some(why));
        jobs.set_note(o.job, Some(&note));
        o.doubt = Some(note);
    }

    /// Settle an in-doubt job: the VM runs at the destination (this copy
    /// goes) or not (it resumes here).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn settle(
        &mut self,
        o: &mut Outgoing,
        host: &mut dyn Host,
        vms: &mut Vec<Vm>,
        jobs: &mut JobTable,
        resumed_there: bool,
        by_operator: bool,
        now: u64,
    ) {
        if let Some(q) = o.query.take() {
            self.drain(q.conn.wire, now);
        }
        let Some(mut engine) = o.engine.take() else {
            return;
        };
        if let Some(vi) = o.vm_index(vms) {
            let mut src = SourceVm {
                vm: &mut vms[vi],
                config: &o.config,
            };
            engine.resolve_in_doubt(&mut src, resumed_there, now);
        }
        let mut report = named_report(&engine, &o.to);
        if by_operator && !resumed_there {
            report.error = Some(format!(
                "{} (decided by the operator)",
                report.error.as_deref().unwrap_or("in doubt")
            ));
        }
        o.engine = Some(engine);
        jobs.set_cancellable(o.job, true);
        self.finish_outgoing(o, host, vms, jobs, report, by_operator);
    }

    /// `job-cancel` of a source job.
    pub(super) fn cancel_outgoing(
        &mut self,
        o: &mut Outgoing,
        host: &mut dyn Host,
        vms: &mut Vec<Vm>,
        jobs: &mut JobTable,
        now: u64,
    ) -> Result<(), ApiError> {
        match o.phase {
            OutPhase::Queued
            | OutPhase::Connecting
            | OutPhase::Handshake
            | OutPhase::Opening
            | OutPhase::Storage
            | OutPhase::QuickCopy => {
                self.end_without_engine(o, host, vms, jobs, "cancelled by request", true);
                Ok(())
            }
            OutPhase::Running => {
                let (Some(mut conn), Some(mut engine)) = (o.conn.take(), o.engine.take()) else {
                    return Err(ApiError::new(ErrorCode::InvalidState, "no engine"));
                };
                if engine.committed() {
                    o.conn = Some(conn);
                    o.engine = Some(engine);
                    return Err(ApiError::new(
                        ErrorCode::InvalidState,
                        format!(
                            "job {} is past its commit point: VM {} belongs to node {} now",
                            o.job, o.vm, o.to
                        ),
                    ));
                }
                let Some(vi) = o.vm_index(vms) else {
                    return Err(ApiError::new(ErrorCode::InvalidState, "the VM is gone"));
                };
                {
                    let mut src = SourceVm {
                        vm: &mut vms[vi],
                        config: &o.config,
                    };
                    let mut link = conn.link().expect("handshake done");
                    engine.cancel(&mut src, &mut link, now);
                }
                conn.wire.service(host.net(), now);
                self.drain(conn.wire, now);
                let report = named_report(&engine, &o.to);
                o.engine = Some(engine);
                self.finish_outgoing(o, host, vms, jobs, report, false);
                Ok(())
            }
            OutPhase::InDoubt => Err(ApiError::new(
                ErrorCode::InvalidState,
                format!(
                    "job {} is past its commit point and in doubt: node {} decides (this node \
                     keeps asking), or `job-resolve` it",
                    o.job, o.to
                ),
            )),
            OutPhase::Done => Err(ApiError::new(
                ErrorCode::InvalidState,
                format!("job {} has ended", o.job),
            )),
        }
    }
}

/// What an in-doubt job says: the first cause (the engine's error, e.g.
/// `link to b lost: ...`), what this node does about it, and why its last
/// question went unanswered.
fn doubt_note(o: &Outgoing, last_attempt: Option<&str>) -> String {
    let mut note = match &o.doubt_cause {
        Some(cause) => format!("{cause}. "),
        None => format!(
            "switch-over in doubt: node {} has not confirmed that VM {} runs there. ",
            o.to, o.vm
        ),
    };
    note.push_str(&format!(
        "VM {} stays paused here; this node asks {} about it every {} s and acts on its answer",
        o.vm,
        o.to,
        QUERY_INTERVAL_NS / 1_000_000_000
    ));
    if let Some(why) = last_attempt {
        note.push_str(&format!(" (last attempt: {why})"));
    }
    note
}

/// The engine's report, its error naming the destination when the link
/// to it was lost (`link to b lost: ...`).
fn named_report(engine: &Migration, to: &str) -> MigrationReport {
    let mut report = engine.report().clone();
    if let Some(e) = engine.error() {
        report.error = Some(e.describe(to));
    }
    report
}

fn failed_report(ram_bytes: u64, error: &str, cancelled: bool) -> MigrationReport {
    MigrationReport {
        passes: 0,
        pages_per_pass: Vec::new(),
        bytes_sent: 0,
        zero_pages: 0,
        ram_bytes,
        total_ms: 0,
        downtime_ms: 0,
        expected_downtime_ms: 0,
        throttle_pct: 0,
        result: if cancelled {
            MigrationResult::Cancelled
        } else {
            MigrationResult::Failed
        },
        error: Some(error.into()),
        dirty_tracker: None,
        verified: false,
        pause_us: Default::default(),
    }
}

pub(super) fn print_report(host: &mut dyn Host, report: &MigrationReport) {
    let mut line = String::from("migration-report ");
    line.push_str(&report.to_json());
    line.push('\n');
    host.console_write(&line);
}

/// `Err` when disk data is outstanding and none was acknowledged for
/// [`DISK_STALL_NS`] (`seen`: the acknowledged count when last seen, and
/// since when).
fn ack_stall(link: &RemoteLink, seen: &mut (u64, u64), now: u64, to: &str) -> Result<(), String> {
    let (queued, acked) = link.bytes();
    if acked != seen.0 || (queued == acked && link.outbox_empty()) {
        *seen = (acked, now);
        return Ok(());
    }
    if now.saturating_sub(seen.1) > DISK_STALL_NS {
        return Err(format!(
            "node {to} acknowledged no disk write for {} s",
            DISK_STALL_NS / 1_000_000_000
        ));
    }
    Ok(())
}

/// Move queued disk messages to the wire and hand those from the
/// destination (acks, its error) to `link`; with `pull`, read the wire
/// first (no engine does).
fn exchange(conn: &mut Conn, link: &RemoteLink, pull: bool) -> Result<(), String> {
    link.pump(&mut |b| conn.send_disk(b).map_err(|e| e.to_string()))?;
    while let Some(body) = conn.next_disk(pull)? {
        link.receive(&body)?;
    }
    Ok(())
}
