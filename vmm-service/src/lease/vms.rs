//! Leases taken by VMs whose disks are on a shared store (docs/DESIGN.md
//! "Leases"): the glue between [`super::Lease`] and the node.
//!
//! Which stores are shared: the store named [`SHARED_STORE`] (`shared`),
//! the one `cluster up` exports to every node from one host directory. A
//! node's other stores are its own. A VM with a disk there holds one lease,
//! `shared:vms/VM/VM.lease`, beside its files ([`lease_location`]).
//!
//! Invariants:
//! - a VM with a disk on a shared store runs only while its node owns the
//!   lease and may write ([`super::Lease::may_write`]); otherwise it is held
//!   ([`Vm::lease_hold`], `vm list`: `paused`, reason `lease`) and its
//!   disks' writes fail at the I/O layer: every file of such a disk is
//!   opened through a [`GatedIo`] on the VM's [`WriteGate`], closed the
//!   moment the node is fenced, so not even a VHDX close on drop reaches
//!   the store;
//! - the node loop ([`tick`]) renews owned leases, fences a VM whose
//!   renewal says lost (or that could not renew in time), retries a lease
//!   it waits for, and adopts a lease handed to it by a migration;
//! - a lease handed over by a live migration is taken back only if the
//!   file still holds exactly the hand-over record (the destination never
//!   adopted it, [`super::Lease::take_back`]); otherwise the node waits
//!   for it like any other (expiry, then settle).

use super::{Acquire, Lease, LeaseFile, LeaseRecord, Renewal, Timing, MAX_RECORD_BYTES};
use crate::disks::{Backing, DiskMeta};
use crate::store::{StorePath, Stores};
use crate::vm::Vm;
use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::cell::Cell;
use serde::{Deserialize, Serialize};
use vstorage::vhdx::{DiskKind, OpenOptions, Vhdx};
use vstorage::{BlockIo, IoError, VirtualDisk};

/// The store every node of a cluster sees (`cluster up` exports
/// `STATE/stores/shared/` to each as `shared`).
pub const SHARED_STORE: &str = "shared";

/// How often a node that waits for a lease reads it (ms).
const POLL_MS: u64 = 500;

/// Whether `store` is seen by other nodes too (its VMs take leases).
pub fn is_shared_store(store: &str) -> bool {
    store == SHARED_STORE
}

/// The store of a `STORE:path` location.
pub fn store_of(location: &str) -> &str {
    location.split_once(':').map_or(location, |(s, _)| s)
}

/// Where VM `vm`'s lease on `store` lives.
pub fn lease_location(store: &str, vm: &str) -> String {
    format!("{store}:vms/{vm}/{vm}.lease")
}

/// The shared store of `vm`'s disks, if any is on one.
pub fn shared_store(vm: &Vm) -> Option<String> {
    vm.disk_meta().iter().find_map(|m| match &m.backing {
        Backing::File { location } if is_shared_store(store_of(location)) => {
            Some(store_of(location).to_string())
        }
        _ => None,
    })
}

/// Whether every disk of `vm` is on a shared store (and it has one).
pub fn all_disks_shared(vm: &Vm) -> bool {
    !vm.disk_meta().is_empty()
        && vm.disk_meta().iter().all(|m| match &m.backing {
            Backing::File { location } => is_shared_store(store_of(location)),
            Backing::Memory { .. } => false,
        })
}

/// Open while the node may write a VM's shared disks. Clones share it.
#[derive(Clone, Debug)]
pub struct WriteGate(Rc<Cell<bool>>);

impl Default for WriteGate {
    fn default() -> Self {
        WriteGate(Rc::new(Cell::new(true)))
    }
}

impl WriteGate {
    pub fn open(&self) {
        self.0.set(true);
    }
    pub fn close(&self) {
        self.0.set(false);
    }
    pub fn is_open(&self) -> bool {
        self.0.get()
    }
}

/// A disk's file behind a [`WriteGate`]: reads always pass, anything that
/// changes the file fails while the gate is closed.
pub struct GatedIo {
    inner: Box<dyn BlockIo>,
    gate: WriteGate,
}

impl GatedIo {
    pub fn new(inner: Box<dyn BlockIo>, gate: WriteGate) -> Self {
        GatedIo { inner, gate }
    }
    fn check(&self, op: &'static str) -> Result<(), IoError> {
        if self.gate.is_open() {
            Ok(())
        } else {
            Err(IoError::Host {
                op,
                detail: "fenced: this node does not hold the VM's lease".into(),
            })
        }
    }
}

impl BlockIo for GatedIo {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.check("write")?;
        self.inner.write_at(offset, data)
    }
    fn flush(&mut self) -> Result<(), IoError> {
        self.check("flush")?;
        self.inner.flush()
    }
    fn len(&self) -> Result<u64, IoError> {
        self.inner.len()
    }
    fn set_len(&mut self, len: u64) -> Result<(), IoError> {
        self.check("truncate")?;
        self.inner.set_len(len)
    }
    fn allocate(&mut self, offset: u64, len_bytes: u64) -> Result<(), IoError> {
        self.check("allocate")?;
        self.inner.allocate(offset, len_bytes)
    }
}

/// A lease file on a node store: read whole, created exclusively, replaced
/// by writing `NAME.tmp-NODE` and renaming it over the lease, each change
/// made durable with a directory fsync. A record staged ahead of a
/// migration's pause waits in `NAME.next-NODE` (written and fsynced; only
/// the rename and the directory fsync are left for the pause).
pub struct StoreLeaseFile {
    stores: Rc<Stores>,
    at: StorePath,
    tmp: StorePath,
    next: StorePath,
    dir: StorePath,
}

impl StoreLeaseFile {
    /// The lease at `location` as node `node` writes it.
    pub fn new(stores: Rc<Stores>, location: &str, node: &str) -> Result<Self, String> {
        let at = StorePath::parse(location).map_err(|e| e.to_string())?;
        let (dir, name) = at
            .path
            .rsplit_once('/')
            .map_or(("", at.path.as_str()), |(d, n)| (d, n));
        let tmp = StorePath::new(&at.store, &format!("{dir}/{name}.tmp-{node}"))
            .map_err(|e| e.to_string())?;
        let next = StorePath::new(&at.store, &format!("{dir}/{name}.next-{node}"))
            .map_err(|e| e.to_string())?;
        let dir = StorePath {
            store: at.store.clone(),
            path: dir.into(),
        };
        Ok(StoreLeaseFile {
            stores,
            at,
            tmp,
            next,
            dir,
        })
    }

    fn write_whole(&self, mut f: crate::store::StoreFile, bytes: &[u8]) -> Result<(), String> {
        f.write_at(0, bytes).map_err(|e| e.to_string())?;
        f.flush().map_err(|e| e.to_string())
    }
}

impl LeaseFile for StoreLeaseFile {
    fn read(&self) -> Result<Option<Vec<u8>>, String> {
        let f = match self.stores.open(&self.at, false) {
            Ok(f) => f,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", self.at)),
        };
        let len = f.len().map_err(|e| e.to_string())?;
        let len = (len as usize).min(MAX_RECORD_BYTES + 1);
        let mut buf = vec![0u8; len];
        f.read_at(0, &mut buf).map_err(|e| e.to_string())?;
        Ok(Some(buf))
    }
    fn create_new(&self, bytes: &[u8]) -> Result<bool, String> {
        self.stores
            .mkdir_all(&self.dir)
            .map_err(|e| format!("{}: {e}", self.dir))?;
        let f = match self.stores.create(&self.at, true) {
            Ok(f) => f,
            Err(e) if e.is_exists() => return Ok(false),
            Err(e) => return Err(format!("{}: {e}", self.at)),
        };
        self.write_whole(f, bytes)?;
        self.stores.sync_dir(&self.dir).map_err(|e| e.to_string())?;
        Ok(true)
    }
    fn replace(&self, bytes: &[u8]) -> Result<(), String> {
        let f = self
            .stores
            .create(&self.tmp, false)
            .map_err(|e| format!("{}: {e}", self.tmp))?;
        self.write_whole(f, bytes)?;
        self.stores
            .rename(&self.tmp, &self.at)
            .map_err(|e| format!("{}: {e}", self.at))?;
        self.stores.sync_dir(&self.dir).map_err(|e| e.to_string())
    }
    fn stage(&self, bytes: &[u8]) -> Result<(), String> {
        let f = self
            .stores
            .create(&self.next, false)
            .map_err(|e| format!("{}: {e}", self.next))?;
        self.write_whole(f, bytes)
    }
    fn commit_staged(&self) -> Result<(), String> {
        self.stores
            .rename(&self.next, &self.at)
            .map_err(|e| format!("{}: {e}", self.at))?;
        self.stores.sync_dir(&self.dir).map_err(|e| e.to_string())
    }
    fn unstage(&self) -> Result<(), String> {
        match self.stores.remove(&self.next) {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(format!("{}: {e}", self.next)),
        }
    }
    fn remove(&self) -> Result<(), String> {
        match self.stores.remove(&self.at) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(format!("{}: {e}", self.at)),
        }
        self.stores.sync_dir(&self.dir).map_err(|e| e.to_string())
    }
}

/// One disk of a VM on a shared store as a live migration's `open`
/// carries it: where it is and what the destination must find there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedDisk {
    /// `STORE:path`.
    pub location: String,
    pub virtual_bytes: u64,
    pub block_bytes: u32,
    /// The VHDX's disk id (page 83 data), 32 hex digits.
    pub disk_id: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What the file at `location` is (opened read-only: another node may
/// be writing it; a pending log is replayed in memory only).
pub fn describe(stores: &Stores, location: &str) -> Result<SharedDisk, String> {
    let at = StorePath::parse(location).map_err(|e| e.to_string())?;
    let f = stores
        .open(&at, false)
        .map_err(|e| format!("{location}: {e}"))?;
    let d = Vhdx::open(f, OpenOptions::read_only()).map_err(|e| format!("{location}: {e}"))?;
    Ok(SharedDisk {
        location: location.into(),
        virtual_bytes: d.virtual_size_bytes(),
        block_bytes: d.block_size(),
        disk_id: hex(&d.disk_id().0),
    })
}

/// Check that this node sees `want` as the source does (a shared store
/// here, the same file: size, block size, disk id).
pub fn check_disk(stores: &Stores, want: &SharedDisk) -> Result<(), String> {
    let store = store_of(&want.location);
    if !is_shared_store(store) {
        return Err(format!(
            "disk {} is not on a shared store",
            want.location.chars().take(120).collect::<String>()
        ));
    }
    if !stores.contains(store) {
        return Err(format!("this node does not see store {store}"));
    }
    let have = describe(stores, &want.location)?;
    if have != *want {
        return Err(format!(
            "{} here is another disk ({} bytes, {} byte blocks, id {}) than the source's \
             ({} bytes, {} byte blocks, id {})",
            want.location,
            have.virtual_bytes,
            have.block_bytes,
            have.disk_id,
            want.virtual_bytes,
            want.block_bytes,
            want.disk_id
        ));
    }
    Ok(())
}

/// Disks opened for a VM and what the node knows of them (same index).
pub type OpenedDisks = (Vec<Box<dyn VirtualDisk>>, Vec<DiskMeta>);

/// A disk's file opened read-write behind `gate`, as the VM writes it.
pub type SharedVhdx = Vhdx<GatedIo>;

/// Open `disks` read-write behind `gate` (a migration's destination
/// after it adopted the lease), checking each is still the disk the
/// source named.
pub fn open_disks(
    stores: &Stores,
    disks: &[SharedDisk],
    gate: &WriteGate,
    seed: u64,
) -> Result<OpenedDisks, String> {
    let mut out: Vec<Box<dyn VirtualDisk>> = Vec::new();
    let mut meta = Vec::new();
    for (i, want) in disks.iter().enumerate() {
        let at = StorePath::parse(&want.location).map_err(|e| e.to_string())?;
        let f = stores
            .open(&at, true)
            .map_err(|e| format!("{}: {e}", want.location))?;
        let io = GatedIo::new(Box::new(f), gate.clone());
        let d = Vhdx::open(io, OpenOptions::read_write(seed ^ i as u64))
            .map_err(|e| format!("{}: {e}", want.location))?;
        if d.virtual_size_bytes() != want.virtual_bytes
            || d.block_size() != want.block_bytes
            || (!want.disk_id.is_empty() && hex(&d.disk_id().0) != want.disk_id)
        {
            return Err(format!(
                "{} is not the disk the source named",
                want.location
            ));
        }
        meta.push(DiskMeta {
            backing: Backing::File {
                location: want.location.clone(),
            },
            fixed: d.kind() == DiskKind::Fixed,
            virtual_bytes: want.virtual_bytes,
            block_bytes: want.block_bytes,
            checkpoint: None,
        });
        out.push(Box::new(d));
    }
    Ok((out, meta))
}

/// Where a VM stands with its lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Owned: renewed by the node loop.
    Held,
    /// Wanted (the VM is held until it is owned): polled.
    Acquiring,
    /// Lost (another node's record, or removed): the VM stays held until
    /// the operator resumes (which asks again) or stops it.
    Lost(String),
    /// Given to a live migration's destination (the VM is paused):
    /// the record written, and this node's record before it.
    HandedOver {
        handed: LeaseRecord,
        before: LeaseRecord,
    },
    /// Handed to this node by a live migration (epoch): to adopt, then
    /// the disks open.
    Adopting { epoch: u64, disks: Vec<SharedDisk> },
}

/// A VM's lease as its node keeps it.
pub struct VmLease {
    lease: Lease,
    file: Box<dyn LeaseFile>,
    location: String,
    phase: Phase,
    next_poll_ms: u64,
    /// This node held the lease before (its disks were opened then).
    had_it: bool,
    /// The lease came back after a time without it: the VM's disks must
    /// be opened again before it writes (another node may have).
    reopen: bool,
}

impl core::fmt::Debug for VmLease {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VmLease")
            .field("location", &self.location)
            .field("phase", &self.phase)
            .finish()
    }
}

/// Who this node is, for its leases.
#[derive(Clone, Debug)]
pub struct LeaseNode {
    pub name: String,
    /// Drawn at boot: a restarted node does not own what it held.
    pub incarnation: u64,
    pub timing: Timing,
}

impl VmLease {
    /// The lease of `vm` at `location` (not asked for yet).
    pub fn new(vm: &str, node: &LeaseNode, location: &str, file: Box<dyn LeaseFile>) -> Self {
        VmLease {
            lease: Lease::new(vm, &node.name, node.incarnation, node.timing),
            file,
            location: location.into(),
            phase: Phase::Acquiring,
            next_poll_ms: 0,
            had_it: false,
            reopen: false,
        }
    }
    /// For a VM whose disks came onto the shared store while it ran
    /// (storage migration): once the lease is its own, its disk files are
    /// opened again, through its write gate.
    pub fn reopen_when_owned(&mut self) {
        self.had_it = true;
    }
    /// The lease file's location.
    pub fn location(&self) -> &str {
        &self.location
    }
    pub fn phase(&self) -> &Phase {
        &self.phase
    }
    /// Whether the node may write the VM's disks at `now_ms`.
    pub fn may_write(&self, now_ms: u64) -> bool {
        self.phase == Phase::Held && self.lease.may_write(now_ms)
    }

    /// Ask for the lease now (`vm start`, `vm disk-create`, `vm resume`):
    /// `Ok` once owned; otherwise why not, naming the holder.
    /// A lease gained after it was not held (lost, or waited for) means
    /// the VM's open disks may be stale: the caller reopens them
    /// ([`regain`]).
    pub fn acquire(&mut self, now_ms: u64) -> Result<(), String> {
        let r = match self.lease.state() {
            super::State::Idle => self.lease.acquire(now_ms, &*self.file),
            _ => self.lease.poll(now_ms, &*self.file),
        };
        match r {
            Ok(Acquire::Owned) => {
                if self.phase != Phase::Held {
                    self.reopen = self.had_it;
                }
                self.had_it = true;
                self.phase = Phase::Held;
                Ok(())
            }
            Ok(other) => {
                if !matches!(self.phase, Phase::Lost(_)) {
                    self.phase = Phase::Acquiring;
                }
                Err(self.describe(&other))
            }
            Err(e) => Err(format!("cannot read the lease {}: {e}", self.location)),
        }
    }

    fn describe(&self, a: &Acquire) -> String {
        match a {
            Acquire::Owned => "owned".into(),
            Acquire::Held { owner, claim_in_ms } => format!(
                "its disks are leased by node {} ({}); this node may take the lease over \
                 only if that node stops renewing it (in {} s at the earliest)",
                owner.as_deref().unwrap_or("(unreadable lease file)"),
                self.location,
                claim_in_ms.div_ceil(1000)
            ),
            Acquire::Settling { in_ms } => format!(
                "this node claimed the expired lease {}; it owns it if the claim holds \
                 in {} s",
                self.location,
                in_ms.div_ceil(1000)
            ),
        }
    }

    /// Give the lease up (the VM stopped or was deleted).
    pub fn release(&mut self) -> Result<(), String> {
        self.phase = Phase::Acquiring;
        self.lease.release(&*self.file)
    }

    /// Ahead of handing the lease to `node` (the migration's memory copy,
    /// the VM running): stage the hand-over's record
    /// ([`super::Lease::prepare_hand_over`]).
    pub fn prepare_hand_over(&mut self, node: &str, now_ms: u64) {
        if self.phase == Phase::Held {
            self.lease.prepare_hand_over(node, now_ms, &*self.file);
        }
    }

    /// Ahead of adopting the lease from node `from` (a live migration's
    /// destination accepting it): stage the adoption
    /// ([`super::Lease::prepare_adopt`]).
    pub fn prepare_adopt(&mut self, from: &str, now_ms: u64) {
        self.lease.prepare_adopt(from, now_ms, &*self.file);
    }

    /// Hand the lease to `node` at `now_ms` (a live migration's
    /// switch-over): the VM is paused, its disks flushed. Returns the
    /// epoch the destination must find.
    pub fn hand_over(&mut self, node: &str, now_ms: u64) -> Result<u64, String> {
        let before = match (&self.phase, self.lease.owned_record()) {
            (Phase::Held, Some(r)) => r.clone(),
            _ => {
                return Err(format!(
                    "this node does not hold the lease {}",
                    self.location
                ))
            }
        };
        // What the hand-over writes (whether or not the write lands, the
        // way back recognises both records).
        let handed = LeaseRecord {
            vm: before.vm.clone(),
            owner: node.into(),
            incarnation: 0,
            epoch: before.epoch.saturating_add(1),
            counter: 0,
        };
        let r = self.lease.hand_over(node, now_ms, &*self.file);
        self.phase = Phase::HandedOver {
            handed: handed.clone(),
            before,
        };
        r.map(|r| r.epoch)
    }

    /// Expect the lease handed over with `epoch` (a live migration's
    /// destination at `go`); `disks` open once adopted.
    pub fn expect_hand_over(&mut self, epoch: u64, disks: Vec<SharedDisk>) {
        self.phase = Phase::Adopting { epoch, disks };
        self.next_poll_ms = 0;
    }
}

/// The migration that handed `vm`'s lease over did not reach its commit
/// point (or the destination said it discarded the VM): take the lease
/// back if the destination never adopted it, else wait for it (the VM is
/// held meanwhile). Called before the VM runs again.
pub fn take_back(vm: &mut Vm, now_ms: u64) {
    let Some(l) = vm.lease_mut() else {
        return;
    };
    let Phase::HandedOver { handed, before } = l.phase.clone() else {
        return;
    };
    match l.lease.take_back(&handed, &before, now_ms, &*l.file) {
        Ok(()) => {
            l.phase = Phase::Held;
            vm.set_lease_hold(None);
        }
        Err(e) => {
            l.phase = Phase::Acquiring;
            l.next_poll_ms = 0;
            vm.set_lease_hold(Some(format!("waiting for the lease: {e}")));
        }
    }
}

/// Whether the destination of `vm`'s hand-over adopted the lease: it
/// processed `go`, runs the VM and may have written its disks, so this
/// (source) copy is stale and must never run again. `Some(why)` if so.
pub fn adopted_elsewhere(vm: &Vm) -> Option<String> {
    let l = vm.lease()?;
    let Phase::HandedOver { handed, .. } = &l.phase else {
        return None;
    };
    let bytes = l.file.read().ok()??;
    let r = LeaseRecord::decode(&bytes).ok()?;
    (r.owner == handed.owner && r.epoch == handed.epoch && r.incarnation != 0).then(|| {
        format!(
            "node {} adopted the lease on the VM's disks ({}, epoch {}): it ran the VM after \
             the switch-over",
            r.owner, l.location, r.epoch
        )
    })
}

/// Open `vm`'s disks on the shared store again (the lease came back after
/// a time without it: what the node cached of each VHDX may be stale).
/// The old handles go first, behind a closed gate, so their close on drop
/// writes nothing.
fn reopen(vm: &mut Vm, stores: &Stores, seed: u64) -> Result<(), String> {
    if !all_disks_shared(vm) {
        return Ok(());
    }
    let want: Vec<SharedDisk> = vm
        .disk_meta()
        .iter()
        .map(|m| SharedDisk {
            location: m.location(),
            virtual_bytes: m.virtual_bytes,
            block_bytes: m.block_bytes,
            disk_id: String::new(),
        })
        .collect();
    vm.disk_gate().close();
    let (old, meta) = vm.take_disks();
    drop(old);
    vm.disk_gate().open();
    match open_disks(stores, &want, vm.disk_gate(), seed) {
        Ok((d, m)) => {
            vm.set_disks(d, m);
            Ok(())
        }
        Err(e) => {
            vm.disk_gate().close();
            // No disk until it opens; the VM stays held.
            vm.set_disks(Vec::new(), meta);
            Err(e)
        }
    }
}

/// Whether `vm`'s lease came back and its disks need opening again
/// ([`tick`] does it; callers that acquire outside it use [`regain`]).
pub fn regain(vm: &mut Vm, stores: &Stores, seed: u64) -> Result<(), String> {
    let Some(l) = vm.lease_mut() else {
        return Ok(());
    };
    if !l.reopen {
        return Ok(());
    }
    l.reopen = false;
    let r = reopen(vm, stores, seed);
    if r.is_err() {
        if let Some(l) = vm.lease_mut() {
            l.reopen = true;
        }
    }
    r
}

/// One round of the node loop for `vm`'s lease at `now_ms` (see the module
/// doc). Returns a line for the node console when the VM was held or let
/// go.
pub fn tick(vm: &mut Vm, now_ms: u64, stores: Option<&Stores>, seed: u64) -> Option<String> {
    let mut l = vm.lease_mut().take()?;
    let before = vm.lease_hold().map(String::from);
    let mut hold: Option<Option<String>> = None;
    match l.phase.clone() {
        Phase::Held => match l.lease.renew(now_ms, &*l.file) {
            Renewal::Held if l.lease.may_write(now_ms) => hold = Some(None),
            Renewal::Held => {
                hold = Some(Some("the lease was not renewed in time".into()));
            }
            Renewal::Lost(why) => {
                l.phase = Phase::Lost(why.clone());
                hold = Some(Some(format!("lease lost: {why}")));
            }
            Renewal::Failed(e) if !l.lease.may_write(now_ms) => {
                hold = Some(Some(format!("lease renewal failed: {e}")));
            }
            Renewal::Failed(_) => {}
        },
        Phase::Acquiring if now_ms >= l.next_poll_ms => {
            l.next_poll_ms = now_ms + POLL_MS;
            hold = Some(match l.acquire(now_ms) {
                Ok(()) => None,
                Err(e) => Some(format!("waiting for the lease: {e}")),
            });
        }
        _ => {}
    }
    if l.phase == Phase::Held && l.reopen {
        hold = Some(match stores.map(|s| reopen(vm, s, seed)) {
            Some(Ok(())) => {
                l.reopen = false;
                None
            }
            Some(Err(e)) => Some(format!("cannot open its disks again: {e}")),
            None => Some("this node has no stores".into()),
        });
    }
    match l.phase.clone() {
        Phase::Adopting { epoch, disks } if now_ms >= l.next_poll_ms => {
            l.next_poll_ms = now_ms + POLL_MS;
            let adopted = if l.lease.owned_record().is_some_and(|r| r.epoch == epoch) {
                Ok(())
            } else {
                l.lease.adopt(epoch, now_ms, &*l.file)
            };
            hold = Some(match adopted {
                Err(e) => Some(format!("waiting for the hand-over of the lease: {e}")),
                Ok(()) => match stores {
                    None => Some("this node has no stores".into()),
                    Some(stores) => match open_disks(stores, &disks, vm.disk_gate(), seed) {
                        Ok((d, m)) => {
                            vm.set_disks(d, m);
                            l.phase = Phase::Held;
                            l.had_it = true;
                            None
                        }
                        Err(e) => Some(format!("cannot open the VM's disks: {e}")),
                    },
                },
            });
        }
        _ => {}
    }
    if let Some(h) = hold {
        if h != before {
            vm.set_lease_hold(h);
        }
    }
    let after = vm.lease_hold().map(String::from);
    *vm.lease_mut() = Some(l);
    match (before, after) {
        (None, Some(why)) => Some(format!("vm {} paused: lease: {why}\n", vm.name())),
        (Some(_), None) => Some(format!("vm {} runs again: it holds its lease\n", vm.name())),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
