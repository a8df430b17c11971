//! [`Migrations`]: the node's migration jobs, its listener on the
//! migration NIC and its record of migrations it accepted. The node loop
//! calls [`Migrations::drive`] once per round; the management handlers
//! call [`Migrations::start`], [`Migrations::cancel`] and
//! [`Migrations::resolve`].

use super::channel::{Conn, Holds};
use super::incoming::{Accepting, Incoming, Records};
use super::outgoing::{OutPhase, Outgoing};
use super::wire::Wire;
use super::{outgoing_mark, vm_config, Faults, ACCEPTING_MAX, DRAIN_TIMEOUT_NS};
use crate::mgmt::jobs::{JobError, JobTable};
use crate::mgmt::proto::{ApiError, ErrorCode, JobKind, JobState, Keep};
use crate::mgmt::server::HostEntropy;
use crate::node::Peer;
use crate::vm::{Vm, VmState};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use hvcore::host::{Host, NetStack, NicRole, SocketId, TcpState};
use hvmgmt::auth::{fresh_nonce, hex_encode, ClusterKey, Nonce, ReplayGuard};
use migration::{MigrationReport, Policy};

/// What `vm-move` asks for.
#[derive(Clone, Debug)]
pub struct MoveRequest {
    pub vm: String,
    /// A peer's name, or this node's own.
    pub to: String,
    pub policy: Policy,
    pub encrypt: bool,
    /// Test hooks (moves within the node only).
    pub faults: Faults,
    /// Test knobs passed to the destination.
    pub holds: Holds,
    /// Shared-nothing: the disks move too (mirrored to the destination's
    /// store first), to `store` (`STORE[:DIR]`; `None`: its default).
    pub include_storage: bool,
    pub store: Option<String>,
    /// Quick storage migration (`--quick`, [`super::quick`]): the disks
    /// go first through checkpoints, then memory with the VM paused.
    pub quick: bool,
}

/// A connection that is done but may still hold bytes for its peer.
pub(super) struct Draining {
    pub wire: Wire,
    pub until_ns: u64,
}

/// The node's migrations.
pub struct Migrations {
    pub(super) me: String,
    pub(super) key: ClusterKey,
    pub(super) boot: [u8; 16],
    pub(super) port: u16,
    pub(super) peers: Vec<Peer>,
    /// Accept connections on the migration NIC (a managed node).
    listen: bool,
    listener: Option<SocketId>,
    pub(super) nonces: u64,
    pub(super) replay: ReplayGuard,
    pub(super) records: Records,
    pub(super) accepting: Vec<Accepting>,
    pub(super) draining: Vec<Draining>,
    pub(super) outgoing: Vec<Outgoing>,
    pub(super) incoming: Vec<Incoming>,
    /// Reports of outgoing migrations that ended, newest last (a few).
    pub(super) finished: Vec<(u64, MigrationReport)>,
    /// The node's stores (a VM on the shared store moves without its
    /// files: the destination opens them there).
    pub(super) stores: Option<alloc::rc::Rc<crate::store::Stores>>,
    /// This node as its leases name it.
    pub(crate) lease_node: crate::lease::vms::LeaseNode,
}

/// Reports of ended outgoing migrations kept for [`Migrations::report`].
const FINISHED_KEPT: usize = 8;

impl Migrations {
    /// The migrations of node `me`. `listen`: accept migrations from peers
    /// on the migration NIC at `port` (a managed node; the test and demo
    /// modes move VMs only within the node). The boot id is drawn here.
    pub fn new(
        host: &mut dyn Host,
        me: &str,
        key: ClusterKey,
        port: u16,
        peers: Vec<Peer>,
        listen: bool,
    ) -> Self {
        let mut boot = [0u8; 16];
        host.entropy(&mut boot);
        let mut inc = [0u8; 8];
        inc.copy_from_slice(&boot[..8]);
        let lease_node = crate::lease::vms::LeaseNode {
            name: me.into(),
            incarnation: u64::from_le_bytes(inc),
            timing: crate::lease::Timing::DEFAULT,
        };
        Self {
            me: me.into(),
            key,
            boot,
            port,
            peers,
            listen,
            listener: None,
            nonces: 0,
            replay: ReplayGuard::new(),
            records: Records::default(),
            accepting: Vec::new(),
            draining: Vec::new(),
            outgoing: Vec::new(),
            incoming: Vec::new(),
            finished: Vec::new(),
            stores: None,
            lease_node,
        }
    }

    /// The node's stores (`Managed::set_stores`).
    pub fn set_stores(&mut self, stores: alloc::rc::Rc<crate::store::Stores>) {
        self.stores = Some(stores);
    }

    /// A fresh nonce from the host's entropy.
    pub(super) fn nonce(&mut self, host: &mut dyn Host) -> Nonce {
        self.nonces += 1;
        fresh_nonce(&mut HostEntropy(host), self.nonces)
    }

    /// Whether any migration or connection is under way (the node loop
    /// must keep polling rather than idle).
    pub fn is_active(&self) -> bool {
        !(self.outgoing.is_empty()
            && self.incoming.is_empty()
            && self.accepting.is_empty()
            && self.draining.is_empty())
    }

    /// The report of outgoing job `job`, once it ended.
    pub fn report(&self, job: u64) -> Option<&MigrationReport> {
        self.finished
            .iter()
            .rev()
            .find(|(j, _)| *j == job)
            .map(|(_, r)| r)
    }

    pub(super) fn keep_report(&mut self, job: u64, r: MigrationReport) {
        if self.finished.len() >= FINISHED_KEPT {
            self.finished.remove(0);
        }
        self.finished.push((job, r));
    }

    /// `vm-move`: check the request, submit the job (queued when the node
    /// is at its limit) and mark the VM. Returns the job id.
    pub fn start(
        &mut self,
        host: &mut dyn Host,
        vms: &mut [Vm],
        jobs: &mut JobTable,
        req: MoveRequest,
    ) -> Result<u64, ApiError> {
        let now = host.now_ns();
        let shown: String = req.vm.chars().take(crate::vm::NAME_MAX).collect();
        let Some(i) = vms
            .iter()
            .position(|v| v.name() == req.vm && v.migration_mark().is_none_or(|m| !m.incoming))
        else {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no VM named '{shown}' on this node"),
            ));
        };
        if let Some(m) = vms[i].migration_mark() {
            return Err(migrating(&req.vm, m.job));
        }
        match vms[i].state() {
            VmState::Running | VmState::Halted => {}
            VmState::Created => {
                return Err(ApiError::new(
                    ErrorCode::InvalidState,
                    format!(
                        "VM {} has not been started: only a running VM moves",
                        req.vm
                    ),
                ))
            }
            VmState::Stopped(_) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidState,
                    format!("VM {} has stopped", req.vm),
                ))
            }
        }
        let addr = if req.to == self.me {
            None
        } else {
            match self.peers.iter().find(|p| p.name == req.to) {
                Some(p) => Some(p.addr),
                None => {
                    let shown: String = req.to.chars().take(crate::vm::NAME_MAX).collect();
                    let known: Vec<String> = self.peers.iter().map(|p| p.name.clone()).collect();
                    return Err(ApiError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "'{shown}' is not a node this node knows (peers: {}; or '{}' itself)",
                            if known.is_empty() {
                                String::from("none")
                            } else {
                                known.join(", ")
                            },
                            self.me
                        ),
                    ));
                }
            }
        };
        // Only memory and state cross to another node: its disks would stay
        // behind (shared-nothing migration, which mirrors them over first,
        // is issue 14). A move within the node keeps them (the receiving
        // VM adopts the source's disks).
        let mut shared_disks = Vec::new();
        let mut create_disks = Vec::new();
        if req.quick {
            // Quick storage migration: the disks are copied to the
            // destination's store through checkpoints (super::quick).
            if req.include_storage {
                return Err(ApiError::new(
                    ErrorCode::InvalidArgument,
                    "--quick and --include-storage are two ways to move the disks: pick one",
                ));
            }
            if let Some(store) = &req.store {
                let name = store.split_once(':').map_or(store.as_str(), |(s, _)| s);
                crate::store::check_store_name(name).map_err(|e| {
                    ApiError::new(ErrorCode::InvalidArgument, format!("--store: {e}"))
                })?;
                if store.len() > 200 || store.contains("..") {
                    return Err(ApiError::new(
                        ErrorCode::InvalidArgument,
                        format!("--store {store:.80}: not a STORE[:DIR]"),
                    ));
                }
            }
            if addr.is_none() {
                return Err(ApiError::new(
                    ErrorCode::InvalidArgument,
                    "a quick move goes to another node (to move disks within the node: \
                     vm move-storage)",
                ));
            }
            if self
                .stores
                .as_ref()
                .is_none_or(|s| s.iter().next().is_none())
            {
                return Err(ApiError::new(
                    ErrorCode::InvalidState,
                    "this node has no stores: a quick move copies disk files",
                ));
            }
            create_disks = super::quick::QuickSource::specs_of(&mut vms[i])
                .map_err(|e| ApiError::new(ErrorCode::InvalidState, e))?;
        } else if req.include_storage {
            create_disks = self.shared_nothing(&mut vms[i], &req, addr.is_some())?;
        } else if addr.is_some() && crate::lease::vms::all_disks_shared(&vms[i]) {
            // Only memory and state move; the destination opens the same
            // files on the shared store, and the lease passes at the
            // switch-over.
            let now_ms = now / migration::policy::NS_PER_MS;
            if !vms[i].lease().is_some_and(|l| l.may_write(now_ms)) {
                return Err(ApiError::new(
                    ErrorCode::InvalidState,
                    format!(
                        "VM {} does not hold the lease on its disks on this node ({}): it \
                         cannot hand them over",
                        req.vm,
                        vms[i].lease_hold().unwrap_or("no lease taken")
                    ),
                ));
            }
            let Some(stores) = self.stores.as_deref() else {
                return Err(ApiError::new(
                    ErrorCode::InvalidState,
                    "this node has no stores",
                ));
            };
            for m in vms[i].disk_meta() {
                let d = crate::lease::vms::describe(stores, &m.location()).map_err(|e| {
                    ApiError::new(
                        ErrorCode::InvalidState,
                        format!("VM {}'s disk cannot be described: {e}", req.vm),
                    )
                })?;
                shared_disks.push(d);
            }
        } else if addr.is_some() && vms[i].disk_count() > 0 {
            let n = vms[i].disk_count();
            return Err(ApiError::new(
                ErrorCode::Unsupported,
                format!(
                    "VM {} has {n} virtual disk{}, which would not follow it to node {}: a \
                     move to another node carries memory and device state only; move them \
                     with it with --include-storage (include_storage); the VM stays here",
                    req.vm,
                    if n == 1 { "" } else { "s" },
                    req.to
                ),
            ));
        }
        if addr.is_some() && req.faults != Faults::default() {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "fault injection applies to moves within the node only",
            ));
        }
        let ram_bytes = vms[i].ram_bytes();
        let job = jobs
            .submit(JobKind::LiveMigration, &req.vm, ram_bytes, true, now)
            .map_err(|e| match e {
                JobError::TableFull => {
                    ApiError::new(ErrorCode::NoResources, "the job table is full")
                }
                _ => ApiError::new(ErrorCode::NoResources, "cannot add a job"),
            })?;
        let mut raw = [0u8; 16];
        raw.copy_from_slice(&self.nonce(host)[..16]);
        let config = vm_config(&*host, ram_bytes);
        vms[i].set_migration_mark(Some(outgoing_mark(job)));
        let store = req.store.clone();
        let mut o = Outgoing::new(job, hex_encode(&raw), &vms[i], req, addr, config, now);
        o.disks = shared_disks;
        o.create_disks = create_disks;
        o.store = store;
        o.publish(jobs);
        host.console_write(&format!(
            "vmm-service: VM {} moving to {} (job {job})\n",
            o.vm, o.to
        ));
        self.outgoing.push(o);
        Ok(job)
    }

    /// The checks of a shared-nothing move (`include_storage`) of `vm`;
    /// the disks the destination is to create.
    fn shared_nothing(
        &self,
        vm: &mut Vm,
        req: &MoveRequest,
        to_peer: bool,
    ) -> Result<Vec<super::remote_disk::DiskSpec>, ApiError> {
        let bad = |m: String| Err(ApiError::new(ErrorCode::InvalidArgument, m));
        if !to_peer {
            return bad(format!(
                "--include-storage moves the disks to another node; {} is this node (use \
                 vm move-storage within it)",
                self.me
            ));
        }
        if let Some(store) = &req.store {
            let name = store.split_once(':').map_or(store.as_str(), |(s, _)| s);
            crate::store::check_store_name(name)
                .map_err(|e| ApiError::new(ErrorCode::InvalidArgument, format!("--store: {e}")))?;
            if store.len() > 200 || store.contains("..") {
                return bad(format!("--store {store:.80}: not a STORE[:DIR]"));
            }
        }
        if vm.disk_count() == 0 {
            return bad(format!(
                "VM {} has no disks: move it without --include-storage",
                req.vm
            ));
        }
        if crate::lease::vms::all_disks_shared(vm) {
            return Err(ApiError::new(
                ErrorCode::Unsupported,
                format!(
                    "VM {}'s disks are on the shared store: move it without \
                     --include-storage (the destination opens them there)",
                    req.vm
                ),
            ));
        }
        if let Some(m) = vm.disk_meta().iter().find(|m| m.checkpoint.is_some()) {
            return Err(ApiError::new(
                ErrorCode::InvalidState,
                format!(
                    "VM {}'s disk {} has a checkpoint: merge it first",
                    req.vm,
                    m.location()
                ),
            ));
        }
        Ok(super::remote_disk::Mirrors::specs(vm))
    }

    /// `job-cancel` of a live migration: stop it in any phase before the
    /// commit point (the VM runs on here).
    pub fn cancel(
        &mut self,
        host: &mut dyn Host,
        vms: &mut Vec<Vm>,
        jobs: &mut JobTable,
        job: u64,
    ) -> Result<(), ApiError> {
        let now = host.now_ns();
        if let Some(i) = self.outgoing.iter().position(|o| o.job == job) {
            let mut o = self.outgoing.remove(i);
            let r = self.cancel_outgoing(&mut o, host, vms, jobs, now);
            if o.phase != OutPhase::Done {
                self.outgoing.insert(i, o);
            }
            return r;
        }
        if let Some(i) = self.incoming.iter().position(|x| x.job == job) {
            let mut x = self.incoming.remove(i);
            self.cancel_incoming(&mut x, host, vms, jobs, now);
            return Ok(());
        }
        match jobs.state(job) {
            None => Err(ApiError::new(ErrorCode::NotFound, format!("no job {job}"))),
            Some(_) => Err(ApiError::new(
                ErrorCode::InvalidState,
                format!("job {job} has ended"),
            )),
        }
    }

    /// `job-resolve`: the operator's decision for a migration in doubt.
    pub fn resolve(
        &mut self,
        host: &mut dyn Host,
        vms: &mut Vec<Vm>,
        jobs: &mut JobTable,
        job: u64,
        keep: Keep,
    ) -> Result<(), ApiError> {
        let now = host.now_ns();
        let Some(i) = self.outgoing.iter().position(|o| o.job == job) else {
            return match jobs.state(job) {
                None => Err(ApiError::new(ErrorCode::NotFound, format!("no job {job}"))),
                Some(_) => Err(ApiError::new(
                    ErrorCode::InvalidState,
                    format!("job {job} is not a migration in doubt"),
                )),
            };
        };
        if self.outgoing[i].phase != OutPhase::InDoubt {
            return Err(ApiError::new(
                ErrorCode::InvalidState,
                format!("job {job} is not a migration in doubt"),
            ));
        }
        if keep == Keep::Source {
            let stale = self.outgoing[i]
                .vm_index_of(vms)
                .and_then(|vi| crate::lease::vms::adopted_elsewhere(&vms[vi]));
            if let Some(why) = stale {
                return Err(ApiError::new(
                    ErrorCode::InvalidState,
                    format!(
                        "{why}, so its disks may hold writes this paused copy never saw: \
                         keep the destination"
                    ),
                ));
            }
        }
        let mut o = self.outgoing.remove(i);
        self.settle(
            &mut o,
            host,
            vms,
            jobs,
            keep == Keep::Destination,
            true,
            now,
        );
        Ok(())
    }

    /// One round: accept connections, advance every handshake and job,
    /// deliver what finished connections still hold.
    pub fn drive(&mut self, host: &mut dyn Host, vms: &mut Vec<Vm>, jobs: &mut JobTable) {
        let now = host.now_ns();
        let mut arrived = None;
        if self.listen {
            if let Some(net) = host.net() {
                net.poll(now);
                arrived = self.take_arrival(net);
            }
        }
        if let Some(socket) = arrived {
            let nonce = self.nonce(host);
            let conn = Conn::server(
                Wire::accepted(socket, now),
                &self.me,
                &self.key,
                nonce,
                self.boot,
            );
            self.accepting.push(Accepting::new(conn, now));
        }
        for mut o in core::mem::take(&mut self.outgoing) {
            self.step_outgoing(&mut o, host, vms, jobs);
            if o.phase != OutPhase::Done {
                self.outgoing.push(o);
            }
        }
        for a in core::mem::take(&mut self.accepting) {
            if let Some(a) = self.step_accepting(a, host, vms, jobs) {
                self.accepting.push(a);
            }
        }
        for mut x in core::mem::take(&mut self.incoming) {
            if self.step_incoming(&mut x, host, vms, jobs) {
                self.incoming.push(x);
            }
        }
        let now = host.now_ns();
        for mut d in core::mem::take(&mut self.draining) {
            d.wire.service(host.net(), now);
            if d.wire.in_flight() == 0 || d.wire.is_broken() || now >= d.until_ns {
                d.wire.release(host.net());
            } else {
                self.draining.push(d);
            }
        }
        if self.listen {
            if let Some(net) = host.net() {
                self.keep_listening(net);
            }
        }
    }

    /// Hand a finished connection over to deliver its last bytes.
    pub(super) fn drain(&mut self, wire: Wire, now: u64) {
        self.draining.push(Draining {
            wire,
            until_ns: now.saturating_add(DRAIN_TIMEOUT_NS),
        });
    }

    /// The listener's connection, if a peer connected to it.
    fn take_arrival(&mut self, net: &mut dyn NetStack) -> Option<SocketId> {
        let l = self.listener?;
        match net.tcp_state(l) {
            TcpState::Listening => None,
            TcpState::Closed => {
                self.listener = None;
                net.tcp_release(l);
                None
            }
            _ => {
                self.listener = None;
                Some(l)
            }
        }
    }

    fn keep_listening(&mut self, net: &mut dyn NetStack) {
        let room = self.accepting.len() < ACCEPTING_MAX;
        match (room, self.listener) {
            (true, None) => self.listener = net.tcp_listen(NicRole::Migration, self.port).ok(),
            (false, Some(l)) => {
                self.listener = None;
                net.tcp_release(l);
            }
            _ => {}
        }
    }

    /// The migration moving VM `vm` of this node, if any (for the API's
    /// `vm-migrating` refusals).
    pub fn job_of(vm: &Vm) -> Option<u64> {
        vm.migration_mark().map(|m| m.job)
    }

    /// Whether job `job` is a live migration this node is still working on.
    pub fn owns(&self, job: u64) -> bool {
        self.outgoing.iter().any(|o| o.job == job) || self.incoming.iter().any(|x| x.job == job)
    }

    /// The state of a job as the job table has it (tests).
    pub fn job_state(jobs: &JobTable, job: u64) -> Option<JobState> {
        jobs.state(job)
    }
}

/// The refusal of a request that would change a migrating VM.
pub fn migrating(vm: &str, job: u64) -> ApiError {
    ApiError::new(
        ErrorCode::VmMigrating,
        format!("VM {vm} is migrating (job {job})"),
    )
}
