//! The destination's side: connections being accepted ([`Accepting`]: the
//! handshake, then one `open` or `query`), receiving jobs ([`Incoming`])
//! and the record of migrations this node accepted ([`Records`]), which
//! answers a source in doubt.
//!
//! An `open` is checked before any page moves and refused naming the
//! reason: a name taken here, a configuration this node cannot run
//! faithfully (CPU vendor, a CPUID feature the guest saw, the device list),
//! not enough memory, or this node at its migration limit (`busy`: the
//! source waits and asks again). Only then is the empty VM created (listed
//! `incoming`) and the receiving job started.
//!
//! A receiving job ends when its engine does: resumed (the VM runs here,
//! recorded `resumed`) or not (the VM is removed, recorded `discarded`). A
//! `query` for a migration still receiving makes this node decide now: it
//! discards its copy; so every answer it gives is final.

use super::adapt::DestVm;
use super::channel::REFUSE_BUSY;
use super::channel::{check_name, Conn, Control, Holds, HsProgress, Open};
use super::remote_disk::{error_message, DiskSink, DISK_STALL_NS};
use super::set::Migrations;
use super::{
    check_cpuid, incoming_mark, vm_config, ENGINE_SLICE_NS, NEGOTIATION_TIMEOUT_NS, RECORDS_MAX,
};
use crate::disks::FileStore;
use crate::mgmt::jobs::{JobError, JobTable};
use crate::mgmt::proto::{Direction, JobKind, MigrationInfo, MigrationReport as ApiReport, Phase};
use crate::vm::{Bookkeeping, Vm};
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use hvcore::host::Host;
use migration::policy::NS_PER_MS;
use migration::{
    DestinationVm, DeviceState, MigrationError, MigrationResult, Page, Receiver, RecvProgress,
    TransportError, VcpuState, VmConfig, VmError,
};

/// A connection being accepted.
pub struct Accepting {
    conn: Conn,
    since: u64,
}

impl Accepting {
    pub(super) fn new(conn: Conn, now: u64) -> Self {
        Self { conn, since: now }
    }
}

/// What this node did with a migration it accepted.
#[derive(Debug, Default)]
pub struct Records {
    list: VecDeque<(String, bool)>,
}

impl Records {
    fn add(&mut self, id: &str, resumed: bool) {
        if self.list.len() >= RECORDS_MAX {
            self.list.pop_front();
        }
        self.list.push_back((id.into(), resumed));
    }
    /// `Some(true)`: resumed here; `Some(false)`: discarded; `None`: not
    /// accepted in this boot (or forgotten).
    pub fn get(&self, id: &str) -> Option<bool> {
        self.list
            .iter()
            .rev()
            .find(|(i, _)| i == id)
            .map(|(_, r)| *r)
    }
}

/// One incoming migration.
pub struct Incoming {
    pub job: u64,
    pub id: String,
    pub vm: String,
    pub from: String,
    conn: Conn,
    rx: Receiver,
    accepted: VmConfig,
    bookkeeping: Option<Bookkeeping>,
    encrypt: bool,
    verify: bool,
    downtime_limit_ms: u64,
    holds: Holds,
    /// `accept` goes out at this node time (the accept hold); `None` once
    /// it went.
    accept_at: Option<u64>,
    /// The VM's disks on the shared store, opened here once the lease
    /// handed over with `lease_epoch` (the source's `paused`) is adopted.
    disks: Vec<crate::lease::vms::SharedDisk>,
    lease_epoch: Option<u64>,
    /// The lease, read and its adoption staged when the migration was
    /// accepted, so that `go` leaves one rename.
    lease: Option<crate::lease::vms::VmLease>,
    /// The VM resumed here and [`Migrations::arrive_shared`] ran.
    arrived: bool,
    /// A shared-nothing move: the disks received here (partial files
    /// until the VM's state is whole, then committed; deleted unless the
    /// VM resumes here).
    sink: Option<DiskSink>,
    /// The disk copy runs (the receiver starts at `storage-copied`).
    storage: bool,
    /// The last time a disk message arrived (the copy's stall clock).
    storage_seen: u64,
    /// Why this node gave the migration up, when it did (its own words).
    failure: Option<String>,
}

impl Incoming {
    fn info(&self, phase: Phase) -> MigrationInfo {
        MigrationInfo {
            direction: Direction::Incoming,
            peer: self.from.clone(),
            phase,
            pass: 0,
            bytes_sent: self.rx.outcome().bytes_received,
            bytes_remaining: 0,
            dirty_rate_bytes_per_s: 0,
            bandwidth_bytes_per_s: 0,
            eta_ms: None,
            throttle_pct: 0,
            downtime_limit_ms: self.downtime_limit_ms,
            encrypted: self.encrypt,
            verify: self.verify,
            storage_bytes_copied: self.sink.as_ref().map_or(0, |s| s.applied),
            storage_bytes_total: 0,
            checkpoint_bytes: 0,
        }
    }

    fn phase(&self) -> Phase {
        if self.accept_at.is_some() {
            Phase::Negotiating
        } else if self.rx.awaiting_go() {
            Phase::SwitchingOver
        } else {
            Phase::Copying
        }
    }

    fn vm_index(&self, vms: &[Vm]) -> Option<usize> {
        vms.iter()
            .position(|v| v.migration_mark() == Some(incoming_mark(self.job)))
    }
}

/// The arriving VM for one receiver step, with the disks it receives (a
/// shared-nothing or quick move): their files keep their partial names
/// until `go`, and are named (flushed, renamed, the directory synced:
/// [`DiskSink::commit`]) on `go` before the VM resumes and before
/// `resumed` goes out. So a node that stops before `go` leaves only
/// partial files, which its next boot removes (`Stores::boot`), and the
/// files of a VM that resumed here always have their names. A commit that
/// fails refuses the resume: this node discards the VM, the source learns
/// it and resumes its copy.
struct Arriving<'a> {
    dest: DestVm<'a>,
    sink: Option<&'a mut DiskSink>,
    /// Why the commit failed (the job's error).
    failure: &'a mut Option<String>,
}

impl DestinationVm for Arriving<'_> {
    fn prepare(&mut self, config: &VmConfig) -> Result<(), VmError> {
        self.dest.prepare(config)
    }
    fn write_page(&mut self, gfn: u64, data: &Page) -> Result<(), VmError> {
        self.dest.write_page(gfn, data)
    }
    fn zero_page(&mut self, gfn: u64) -> Result<(), VmError> {
        self.dest.zero_page(gfn)
    }
    fn read_page(&mut self, gfn: u64, buf: &mut Page) -> Result<(), VmError> {
        self.dest.read_page(gfn, buf)
    }
    fn restore_vcpus(&mut self, vcpus: &[VcpuState]) -> Result<(), VmError> {
        self.dest.restore_vcpus(vcpus)
    }
    fn restore_devices(&mut self, devices: &[DeviceState]) -> Result<(), VmError> {
        self.dest.restore_devices(devices)
    }
    fn resume(&mut self) -> Result<(), VmError> {
        if let Some(sink) = self.sink.as_deref_mut().filter(|s| !s.is_committed()) {
            if let Err(e) = sink.commit() {
                *self.failure = Some(format!("cannot commit the VM's disks here: {e}"));
                return Err(VmError::new("the VM's disks could not be committed"));
            }
        }
        self.dest.resume()
    }
    fn discard(&mut self) {
        self.dest.discard()
    }
}

/// A refusal of an `open`: its code and why.
struct Refusal {
    code: &'static str,
    message: String,
}

fn refuse(code: &'static str, message: String) -> Refusal {
    Refusal { code, message }
}

impl Migrations {
    /// One round of a connection being accepted; `None` once it became a
    /// job or ended.
    pub(super) fn step_accepting(
        &mut self,
        mut a: Accepting,
        host: &mut dyn Host,
        vms: &mut Vec<Vm>,
        jobs: &mut JobTable,
    ) -> Option<Accepting> {
        let now = host.now_ns();
        a.conn.wire.service(host.net(), now);
        match a.conn.handshake(&mut self.replay) {
            HsProgress::Pending => {
                if now.saturating_sub(a.since) > NEGOTIATION_TIMEOUT_NS || a.conn.wire.is_broken() {
                    a.conn.wire.release(host.net());
                    return None;
                }
                return Some(a);
            }
            HsProgress::Failed(why) => {
                host.console_write(&format!("vmm-service: migration link: {why}\n"));
                self.drain(a.conn.wire, now);
                return None;
            }
            HsProgress::Ready => {}
        }
        let peer = a.conn.peer.clone().unwrap_or_default();
        match a.conn.next_control(true) {
            Ok(None) => {
                if now.saturating_sub(a.since) > NEGOTIATION_TIMEOUT_NS || a.conn.wire.is_broken() {
                    a.conn.wire.release(host.net());
                    return None;
                }
                Some(a)
            }
            Ok(Some(Control::Open(open))) => {
                self.accept_open(a.conn, &peer, open, host, vms, jobs);
                None
            }
            Ok(Some(Control::Query { id })) => {
                let state = self.answer(&id, host, vms, jobs);
                let _ = a.conn.send_control(&Control::Answer {
                    id,
                    state: state.into(),
                });
                a.conn.wire.service(host.net(), now);
                self.drain(a.conn.wire, now);
                None
            }
            Ok(Some(_)) | Err(_) => {
                self.drain(a.conn.wire, now);
                None
            }
        }
    }

    /// Check an `open`, and start receiving or refuse.
    fn accept_open(
        &mut self,
        mut conn: Conn,
        peer: &str,
        open: Open,
        host: &mut dyn Host,
        vms: &mut Vec<Vm>,
        jobs: &mut JobTable,
    ) {
        let now = host.now_ns();
        match self.check_open(peer, &open, host, vms, jobs) {
            Err(r) => {
                let shown: String = open.vm.chars().take(crate::vm::NAME_MAX).collect();
                if r.code != REFUSE_BUSY {
                    host.console_write(&format!(
                        "vmm-service: refused VM {shown} from {peer}: {}\n",
                        r.message
                    ));
                }
                let _ = conn.send_control(&Control::Refuse {
                    code: r.code.into(),
                    message: r.message,
                });
                conn.wire.service(host.net(), now);
                self.drain(conn.wire, now);
            }
            Ok((job, config, sink)) => {
                let holds = open.holds.capped();
                host.console_write(&format!(
                    "vmm-service: VM {} arriving from {peer} (job {job})\n",
                    open.vm
                ));
                let mut x = Incoming {
                    job,
                    id: open.id,
                    vm: open.vm,
                    from: peer.into(),
                    conn,
                    rx: Receiver::new(now),
                    accepted: config,
                    bookkeeping: None,
                    encrypt: open.encrypt,
                    verify: open.verify,
                    downtime_limit_ms: 0,
                    holds,
                    accept_at: Some(now.saturating_add(holds.accept_ms * NS_PER_MS)),
                    disks: open.disks,
                    lease_epoch: None,
                    lease: None,
                    arrived: false,
                    storage: sink.is_some(),
                    sink,
                    storage_seen: now,
                    failure: None,
                };
                if !x.disks.is_empty() && peer != self.me {
                    self.prepare_adopt(&mut x, &*host);
                }
                jobs.set_migration(job, x.info(x.phase()));
                self.incoming.push(x);
            }
        }
    }

    /// The checks of an `open`, then the VM and the job. Nothing is
    /// created unless every check passed.
    fn check_open(
        &mut self,
        peer: &str,
        open: &Open,
        host: &mut dyn Host,
        vms: &mut Vec<Vm>,
        jobs: &mut JobTable,
    ) -> Result<(u64, VmConfig, Option<DiskSink>), Refusal> {
        let now = host.now_ns();
        check_name(&open.vm).map_err(|m| refuse("invalid-argument", m))?;
        // A move within this node: the name is the source's own.
        let local = peer == self.me
            && self
                .outgoing
                .iter()
                .any(|o| o.id == open.id && o.vm == open.vm && o.addr.is_none());
        if !local && vms.iter().any(|v| v.name() == open.vm) {
            return Err(refuse(
                "already-exists",
                format!("a VM named {} exists on node {}", open.vm, self.me),
            ));
        }
        let carried = crate::vmconfig::Carried::from_open(
            open.vm_id.as_deref(),
            open.append.as_deref(),
            &open.guest,
        )
        .map_err(|m| refuse("invalid-argument", m))?;
        if let Some(id) = carried.id.filter(|_| !local) {
            let taken = vms.iter().find(|v| {
                v.placement().map(|p| p.id) == Some(id)
                    || v.carried().and_then(|c| c.id) == Some(id)
            });
            if let Some(v) = taken {
                return Err(refuse(
                    "already-exists",
                    format!("VM {} on node {} has the id {id}", v.name(), self.me),
                ));
            }
        }
        if self.incoming.iter().any(|x| x.id == open.id) || self.records.get(&open.id).is_some() {
            return Err(refuse(
                "invalid-state",
                "this migration was accepted before".into(),
            ));
        }
        let config = open
            .config
            .to_config()
            .map_err(|m| refuse("invalid-argument", format!("bad configuration: {m}")))?;
        let ours = vm_config(&*host, config.ram_bytes);
        if config.vcpus != ours.vcpus {
            return Err(refuse(
                "unsupported",
                format!(
                    "the VM has {} vCPUs; this node runs VMs of {}",
                    config.vcpus, ours.vcpus
                ),
            ));
        }
        if config.devices != ours.devices {
            return Err(refuse(
                "unsupported",
                "the VM's devices (or their state versions) differ from this node's".into(),
            ));
        }
        check_cpuid(&*host, &config.cpuid).map_err(|m| refuse("unsupported", m))?;
        if open.disks.len() > crate::devices::MAX_VIRTIO_SLOTS {
            return Err(refuse("invalid-argument", "too many disks".into()));
        }
        if !open.disks.is_empty() {
            // Its files stay on the shared store: this node must see the
            // same ones (read-only now; written only after the lease).
            let Some(stores) = self.stores.as_deref() else {
                return Err(refuse(
                    "unsupported",
                    format!(
                        "the VM's disks are on a shared store and node {} has no stores",
                        self.me
                    ),
                ));
            };
            for d in &open.disks {
                crate::lease::vms::check_disk(stores, d)
                    .map_err(|m| refuse("unsupported", format!("the VM's disk: {m}")))?;
            }
        }
        let (_, free) = host.memory_stats();
        if free < config.ram_bytes {
            return Err(refuse(
                "no-resources",
                format!(
                    "not enough memory for {} MiB ({} MiB free)",
                    config.ram_bytes >> 20,
                    free >> 20
                ),
            ));
        }
        // At the limit: "busy" before anything is made here (the source
        // asks again, every second; each time the disks would be made
        // and removed again).
        let limit = jobs.settings().max_live_migrations;
        let me = self.me.clone();
        let busy = || {
            refuse(
                REFUSE_BUSY,
                format!("node {me} is at its limit of {limit} simultaneous migrations"),
            )
        };
        if !local && !jobs.has_room(JobKind::LiveMigration) {
            return Err(busy());
        }
        // A shared-nothing move: its disks are created here first (as
        // partial files), or the VM is refused naming why.
        let mut sink = match (&open.create_disks[..], self.stores.clone()) {
            ([], _) => None,
            (_, None) => {
                return Err(refuse(
                    "unsupported",
                    format!("node {} has no stores for the VM's disks", self.me),
                ))
            }
            (specs, Some(stores)) => {
                let store_files = crate::store::StoreFiles::new(stores.clone());
                let store = open.store.clone().or_else(|| store_files.default_store());
                if let Some(store) = store {
                    let name = store.split_once(':').map_or(store.as_str(), |(s, _)| s);
                    if let Ok(st) = stores.statfs(name) {
                        super::remote_disk::check_space(name, st.free_bytes(), specs).map_err(
                            |m| {
                                refuse(
                                    "no-resources",
                                    format!(
                                        "cannot create the VM's disks on node {}: {m}",
                                        self.me
                                    ),
                                )
                            },
                        )?;
                    }
                }
                let files: alloc::rc::Rc<dyn FileStore> = alloc::rc::Rc::new(store_files);
                let sink = DiskSink::create(files, &open.vm, open.store.as_deref(), specs)
                    .map_err(|m| {
                        refuse(
                            "no-resources",
                            format!("cannot create the VM's disks on node {}: {m}", self.me),
                        )
                    })?;
                Some(sink)
            }
        };
        let unwind = |sink: &mut Option<DiskSink>| {
            if let Some(s) = sink.as_mut() {
                s.discard();
            }
        };
        let job = match jobs.start_now(JobKind::LiveMigration, &open.vm, 0, true, local, now) {
            Ok(j) => j,
            Err(JobError::AtLimit) => {
                unwind(&mut sink);
                return Err(busy());
            }
            Err(_) => {
                unwind(&mut sink);
                return Err(refuse("no-resources", "the job table is full".into()));
            }
        };
        let mut vm = match Vm::create_empty(host, &open.vm, config.ram_bytes) {
            Ok(v) => v,
            Err(e) => {
                let m = format!("cannot create the VM: {e}");
                jobs.fail(job, &m, now);
                unwind(&mut sink);
                return Err(refuse("no-resources", m));
            }
        };
        vm.set_label(
            &open
                .guest
                .chars()
                .take(crate::mgmt::proto::GUEST_MAX)
                .collect::<String>(),
        );
        vm.set_migration_mark(Some(incoming_mark(job)));
        vm.set_carried(Some(carried));
        vms.push(vm);
        Ok((job, config, sink))
    }

    /// The answer to a source in doubt about migration `id`.
    fn answer(
        &mut self,
        id: &str,
        host: &mut dyn Host,
        vms: &mut Vec<Vm>,
        jobs: &mut JobTable,
    ) -> &'static str {
        if let Some(i) = self.incoming.iter().position(|x| x.id == id) {
            // Still receiving or waiting for `go`: decide now. The source
            // asks only after losing the link, so whatever it sent after
            // that is never read.
            let mut x = self.incoming.remove(i);
            let why = MigrationError::PeerAborted(
                "the source lost the link and asked what happened: discarded".into(),
            );
            self.abandon_incoming(&mut x, host, vms, jobs, why);
        }
        match self.records.get(id) {
            Some(true) => "resumed",
            Some(false) => "discarded",
            None => "unknown",
        }
    }

    /// One round of a receiving job; false once it ended.
    pub(super) fn step_incoming(
        &mut self,
        x: &mut Incoming,
        host: &mut dyn Host,
        vms: &mut Vec<Vm>,
        jobs: &mut JobTable,
    ) -> bool {
        let start = host.now_ns();
        let Some(vi) = x.vm_index(vms) else {
            let why = MigrationError::PeerAborted("the destination VM is gone".into());
            self.abandon_incoming(x, host, vms, jobs, why);
            return false;
        };
        if let Some(at) = x.accept_at {
            let now = host.now_ns();
            x.conn.wire.service(host.net(), now);
            if x.conn.wire.is_broken() || x.conn.wire.peer_closed() {
                let why = MigrationError::Transport(TransportError::Broken(
                    "the source closed the connection before the migration was accepted",
                ));
                self.abandon_incoming(x, host, vms, jobs, why);
                return false;
            }
            if now < at {
                return true;
            }
            // Accepted: from here every frame is sealed as the source
            // asked, and the receiver's stall clock starts now.
            x.conn.set_encrypt(x.encrypt);
            if x.conn.send_control(&Control::Accept {}).is_err() {
                // The link broke: the engine fails at its first step.
            }
            x.conn.wire.service(host.net(), now);
            x.rx = Receiver::new(now)
                .with_holds(x.holds.ready_ms * NS_PER_MS, x.holds.resumed_ms * NS_PER_MS);
            x.accept_at = None;
            jobs.set_migration(x.job, x.info(x.phase()));
        }
        if x.storage {
            return self.receive_disks(x, host, vms, jobs);
        }
        let mut discarded = false;
        let mut finished = false;
        loop {
            let now = host.now_ns();
            x.conn.wire.service(host.net(), now);
            let broken = x.conn.wire.is_broken();
            let Some(mut link) = x.conn.link() else {
                break;
            };
            let mut dest = Arriving {
                dest: DestVm {
                    vm: &mut vms[vi],
                    accepted: &x.accepted,
                    bookkeeping: &mut x.bookkeeping,
                    discarded: &mut discarded,
                },
                sink: x.sink.as_mut(),
                failure: &mut x.failure,
            };
            if broken {
                x.rx.link_failed(
                    &mut dest,
                    &mut link,
                    TransportError::Broken("connection reset"),
                );
            }
            let p = x.rx.step(&mut dest, &mut link, now);
            if x.sink.is_some() {
                // Guest writes of the pre-copy (in order with the stream:
                // all of them precede the state); the disks are committed
                // once the state is whole, and are the VM's at `go`.
                if let Err(why) = Self::disks_during_memory(x, &mut vms[vi]) {
                    let _ = x.conn.send_disk(&error_message(&why));
                    x.failure = Some(why.clone());
                    self.abandon_incoming(x, host, vms, jobs, MigrationError::PeerAborted(why));
                    return false;
                }
            }
            if !x.arrived && !x.disks.is_empty() && x.rx.resumed() {
                // Past `go`: before the guest runs here, hold it until
                // the lease is adopted and its disks are open.
                x.arrived = true;
                self.arrive_shared(x, &mut vms[vi], host);
            }
            // Control messages that arrived with the stream.
            while let Ok(Some(c)) = x.conn.next_control(false) {
                if let Control::Paused(p) = c {
                    x.lease_epoch = p.lease_epoch;
                    x.bookkeeping = Some(p.into_bookkeeping());
                }
            }
            match p {
                RecvProgress::Finished(_) => {
                    finished = true;
                    break;
                }
                RecvProgress::Waiting => break,
                RecvProgress::Busy if host.now_ns().saturating_sub(start) >= ENGINE_SLICE_NS => {
                    break
                }
                RecvProgress::Busy => {}
            }
        }
        let now = host.now_ns();
        x.conn.wire.service(host.net(), now);
        if !finished {
            jobs.set_migration(x.job, x.info(x.phase()));
            return true;
        }
        self.finish_incoming(x, host, vms, jobs);
        false
    }

    /// A shared-nothing move's disk copy, before the receiver starts:
    /// apply the source's disk messages, answer its barriers once the
    /// disks are flushed; at `storage-copied` the receiver starts. A bad
    /// message, a disk error, a lost link or a silent source for
    /// [`DISK_STALL_NS`] ends the job (the partial
    /// files go). False once it ended.
    fn receive_disks(
        &mut self,
        x: &mut Incoming,
        host: &mut dyn Host,
        vms: &mut Vec<Vm>,
        jobs: &mut JobTable,
    ) -> bool {
        let start = host.now_ns();
        x.conn.wire.service(host.net(), start);
        let from = x.from.clone();
        let lost = |e: String| format!("link to {from} lost during the disk copy: {e}");
        let r: Result<(), String> = (|| {
            let Some(sink) = x.sink.as_mut() else {
                return Err("no disks to receive".into());
            };
            while let Some(body) = x.conn.next_disk(true).map_err(&lost)? {
                x.storage_seen = start;
                if let Some(reply) = sink.apply(&body)? {
                    x.conn.send_disk(&reply).map_err(|e| lost(e.to_string()))?;
                }
                if host.now_ns().saturating_sub(start) >= ENGINE_SLICE_NS {
                    break;
                }
            }
            while let Some(c) = x.conn.next_control(false).map_err(&lost)? {
                match c {
                    Control::StorageCopied {} => {
                        x.storage = false;
                        // The memory copy starts: the receiver's stall
                        // clock with it.
                        x.rx = Receiver::new(start).with_holds(
                            x.holds.ready_ms * NS_PER_MS,
                            x.holds.resumed_ms * NS_PER_MS,
                        );
                    }
                    _ => {
                        return Err(format!(
                            "node {from} broke the protocol during the disk copy"
                        ))
                    }
                }
            }
            if x.storage && (x.conn.wire.is_broken() || x.conn.wire.peer_closed()) {
                return Err(lost(x.conn.broken_reason("connection reset")));
            }
            if x.storage && start.saturating_sub(x.storage_seen) > DISK_STALL_NS {
                return Err(format!(
                    "node {from} sent no disk data for {} s",
                    DISK_STALL_NS / 1_000_000_000
                ));
            }
            Ok(())
        })();
        let now = host.now_ns();
        x.conn.wire.service(host.net(), now);
        match r {
            Ok(()) => {
                jobs.set_migration(x.job, x.info(x.phase()));
                true
            }
            Err(why) => {
                let _ = x.conn.send_disk(&error_message(&why));
                x.conn.wire.service(host.net(), now);
                x.failure = Some(why.clone());
                self.abandon_incoming(x, host, vms, jobs, MigrationError::PeerAborted(why));
                false
            }
        }
    }

    /// The disks of a shared-nothing (or quick) move while memory moves:
    /// apply the source's messages, give the files (committed at `go`,
    /// [`Arriving`]) to the VM once it resumed here.
    fn disks_during_memory(x: &mut Incoming, vm: &mut Vm) -> Result<(), String> {
        let Some(sink) = x.sink.as_mut() else {
            return Ok(());
        };
        while let Some(body) = x.conn.next_disk(false)? {
            if let Some(reply) = sink.apply(&body)? {
                // A lost link shows up in the receiver.
                let _ = x.conn.send_disk(&reply);
            }
        }
        if x.rx.resumed() {
            if let Some(sink) = x.sink.take() {
                let (disks, meta) = sink.into_disks();
                vm.set_disks(disks, meta);
            }
        }
        Ok(())
    }

    /// Give up a receiving job for `why` (its VM is discarded).
    fn abandon_incoming(
        &mut self,
        x: &mut Incoming,
        host: &mut dyn Host,
        vms: &mut Vec<Vm>,
        jobs: &mut JobTable,
        why: MigrationError,
    ) {
        let mut discarded = false;
        if let Some(vi) = x.vm_index(vms) {
            if let Some(mut link) = x.conn.link() {
                let mut dest = DestVm {
                    vm: &mut vms[vi],
                    accepted: &x.accepted,
                    bookkeeping: &mut x.bookkeeping,
                    discarded: &mut discarded,
                };
                x.rx.cancel(&mut dest, &mut link, why);
            }
        }
        self.finish_incoming(x, host, vms, jobs);
    }

    /// `job-cancel` of a receiving job (before it resumed the VM).
    pub(super) fn cancel_incoming(
        &mut self,
        x: &mut Incoming,
        host: &mut dyn Host,
        vms: &mut Vec<Vm>,
        jobs: &mut JobTable,
        _now: u64,
    ) {
        self.abandon_incoming(x, host, vms, jobs, MigrationError::Cancelled);
    }

    /// The lease of the VM on the shared store as this node holds it.
    fn shared_lease(&self, x: &Incoming) -> Result<crate::lease::vms::VmLease, String> {
        use crate::lease::vms;
        let store = vms::store_of(&x.disks[0].location);
        let at = vms::lease_location(store, &x.vm);
        let stores = self.stores.clone().ok_or("no stores")?;
        let file = vms::StoreLeaseFile::new(stores, &at, &self.me)?;
        Ok(vms::VmLease::new(
            &x.vm,
            &self.lease_node,
            &at,
            alloc::boxed::Box::new(file),
        ))
    }

    /// A VM on the shared store is accepted: read its lease and stage the
    /// adoption of the hand-over to come now, before the migration even
    /// starts, so that `go` leaves one rename
    /// (`crate::lease::Lease::prepare_adopt`).
    fn prepare_adopt(&self, x: &mut Incoming, host: &dyn Host) {
        let t0 = host.now_ns();
        if let Ok(mut l) = self.shared_lease(x) {
            l.prepare_adopt(&x.from, t0 / NS_PER_MS);
            x.lease = Some(l);
        }
        log::debug!(
            "migrate job {}: lease adoption staged in {} us",
            x.job,
            (host.now_ns() - t0) / 1000
        );
    }

    /// A VM on the shared store arrived (past `go`): it may write its
    /// disks only once it adopted the lease the source handed over, so it
    /// is held until then; the first try is now, the node loop retries
    /// (`crate::lease::vms::tick`).
    fn arrive_shared(&mut self, x: &mut Incoming, vm: &mut Vm, host: &mut dyn Host) {
        use crate::lease::vms;
        let t0 = host.now_ns();
        let now_ms = t0 / NS_PER_MS;
        vm.set_lease_hold(Some(String::from("waiting for the hand-over of the lease")));
        let lease = match x.lease.take() {
            Some(l) => Ok(l),
            None => self.shared_lease(x),
        };
        let mut lease = match lease {
            Ok(l) => l,
            Err(e) => {
                vm.set_lease_hold(Some(format!("no lease file: {e}")));
                return;
            }
        };
        match x.lease_epoch {
            Some(epoch) => lease.expect_hand_over(epoch, x.disks.clone()),
            None => {
                // No hand-over named: take the lease like any node.
                vm.set_lease_hold(Some("the source handed over no lease".into()));
            }
        }
        *vm.lease_mut() = Some(lease);
        let seed = host.now_ns();
        let line = vms::tick(vm, now_ms, self.stores.as_deref(), seed);
        log::info!(
            "migrate job {}: lease adopted and disks opened in {} us",
            x.job,
            (host.now_ns() - t0) / 1000
        );
        if let Some(line) = line {
            host.console_write(&line);
        }
    }

    /// The receiving engine ended: keep the VM (it runs) or remove it.
    fn finish_incoming(
        &mut self,
        x: &mut Incoming,
        host: &mut dyn Host,
        vms: &mut Vec<Vm>,
        jobs: &mut JobTable,
    ) {
        let now = host.now_ns();
        let out = x.rx.outcome().clone();
        let resumed = out.result == MigrationResult::Completed;
        let vi = x.vm_index(vms);
        // A lost link is named after the source (`link to a lost: ...`).
        let mut error = x.failure.clone().or_else(|| {
            x.rx.error()
                .map(|e| e.describe(&x.from))
                .or_else(|| out.error.clone())
        });
        if let (Some(r), false) = (x.conn.refused, resumed) {
            error = Some(format!(
                "{}: {r}",
                error.as_deref().unwrap_or("link failed")
            ));
        }
        let report = ApiReport {
            bytes_sent: out.bytes_received,
            ram_bytes: x.accepted.ram_bytes,
            result: out.result.as_str().into(),
            error: error.clone(),
            verified: out.memory_verified,
            ..ApiReport::default()
        };
        jobs.set_report(x.job, report);
        self.records.add(&x.id, resumed);
        if let Some(wire) = x.conn.wire.take() {
            self.drain(wire, now);
        }
        if resumed {
            if let Some(vi) = vi {
                vms[vi].set_migration_mark(None);
                // A move within the node: the source copy (paused past its
                // commit point, never to run again) hands its disks over
                // before the guest runs here.
                if let Some(si) = (0..vms.len()).find(|&i| i != vi && vms[i].name() == x.vm) {
                    let (dest, source) = if vi < si {
                        let (a, b) = vms.split_at_mut(si);
                        (&mut a[vi], &mut b[0])
                    } else {
                        let (a, b) = vms.split_at_mut(vi);
                        (&mut b[0], &mut a[si])
                    };
                    dest.adopt_disks(source);
                }
            }
            jobs.set_migration(x.job, x.info(Phase::Completed));
            jobs.complete(
                x.job,
                Some(&format!(
                    "received from {}: {} bytes, memory verified: {}",
                    x.from, out.bytes_received, out.memory_verified
                )),
                now,
            );
            host.console_write(&format!(
                "vmm-service: VM {} arrived from {} and runs here (job {})\n",
                x.vm, x.from, x.job
            ));
        } else {
            if let Some(vi) = vi {
                vms.remove(vi).destroy();
            }
            if let Some(mut sink) = x.sink.take() {
                // Its disks here go with it (partial, or committed for a
                // VM that did not resume here).
                sink.discard();
            }
            let why = error.unwrap_or_else(|| "failed".into());
            let phase = if out.result == MigrationResult::Cancelled {
                Phase::Cancelled
            } else {
                Phase::Failed
            };
            jobs.set_migration(x.job, x.info(phase));
            if matches!(x.rx.error(), Some(MigrationError::Cancelled)) {
                jobs.cancelled(x.job, &why, now);
            } else {
                jobs.fail(x.job, &why, now);
            }
            host.console_write(&format!(
                "vmm-service: VM {} from {} discarded here: {why} (job {})\n",
                x.vm, x.from, x.job
            ));
        }
    }
}
