//! Leases: which node may write a VM's files on a store that several
//! nodes see (the shared store), so that two nodes never write one VHDX at
//! once (docs/DESIGN.md "Leases").
//!
//! A lease is one small file beside the VM's files, holding a
//! [`LeaseRecord`]: the VM, its owner (node name and the owner's boot
//! incarnation), an epoch that grows by one each time ownership changes,
//! and a counter the owner bumps on every renewal. The store offers no
//! compare-and-swap, only an exclusive create and an atomic replace (write
//! a temporary file, rename it over the lease), so ownership works as a
//! delta lease and depends on time measured by each node's own monotonic
//! clock, never on the clocks agreeing:
//!
//! - a free lease (no file) is taken by an exclusive create;
//! - the owner renews every `renew_ms`: it reads the record, and if it is
//!   still its own writes it back with the counter bumped; a record that
//!   is not its own any more means it lost the lease ([`Lease::renew`]
//!   answers [`Renewal::Lost`]);
//! - the owner may write the VM's files only while its last renewal began
//!   less than `expire_ms - margin_ms` ago ([`Lease::may_write`]): it
//!   stops on its own before anyone else can take over;
//! - another node treats a lease as abandoned only after it has seen the
//!   same record for `expire_ms` (read by read, on its own clock). Then it
//!   writes a claim (itself, the next epoch), waits `settle_ms` and reads
//!   again: still its claim, it owns the lease; anything else, it watches
//!   that record instead. Of two nodes claiming at once the last rename
//!   wins and the other sees it on its re-read.
//!
//! Safety rests on [`Timing::check`]: `settle_ms` longer than
//! `renew_ms` plus `margin_ms` (an owner that a late claim overwrote
//! notices at its next renewal, before the claimant starts writing), and
//! `margin_ms` covering the store's latency.
//!
//! Handing a lease over (live migration on a shared store): the owner
//! writes the record with the destination as owner and the next epoch
//! ([`Lease::hand_over`]) and stops writing; the destination adopts it
//! ([`Lease::adopt`]) when it finds itself named with that epoch. Both
//! records can be staged ahead, outside the migration's pause, under a
//! side name ([`LeaseFile::stage`]), so that inside it each is one
//! rename ([`Lease::prepare_hand_over`], [`Lease::prepare_adopt`]; why
//! that keeps the guarantees: docs/DESIGN.md "Leases").
//!
//! Everything read from the store is untrusted: a record that does not
//! parse is an error naming the file's problem, never a panic, and is
//! treated as held by an unknown owner.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// Largest lease file read or written.
pub const MAX_RECORD_BYTES: usize = 512;
/// The first line of a lease file.
const MAGIC: &str = "hvmigrate-lease 1";

/// What a lease file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// The VM whose files the lease covers.
    pub vm: String,
    /// The owning node's name.
    pub owner: String,
    /// The owner's boot incarnation (a random number drawn at boot): a
    /// node that restarted does not own what its former self held.
    pub incarnation: u64,
    /// Grows by one at every change of owner.
    pub epoch: u64,
    /// Bumped by the owner at every renewal.
    pub counter: u64,
}

impl LeaseRecord {
    /// The record as the file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        format!(
            "{MAGIC}\nvm={}\nowner={}\nincarnation={}\nepoch={}\ncounter={}\n",
            self.vm, self.owner, self.incarnation, self.epoch, self.counter
        )
        .into_bytes()
    }

    /// Parse a lease file's bytes (untrusted).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(format!(
                "lease file of {} bytes (at most {MAX_RECORD_BYTES})",
                bytes.len()
            ));
        }
        let text = core::str::from_utf8(bytes).map_err(|_| "lease file is not UTF-8")?;
        let mut lines = text.lines();
        if lines.next() != Some(MAGIC) {
            return Err(format!("lease file does not start with {MAGIC:?}"));
        }
        let mut fields: [Option<&str>; 5] = [None; 5];
        const KEYS: [&str; 5] = ["vm", "owner", "incarnation", "epoch", "counter"];
        for line in lines {
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("lease file line {line:.40?} is not KEY=VALUE"))?;
            let i = KEYS
                .iter()
                .position(|key| *key == k)
                .ok_or_else(|| format!("lease file has an unknown key {k:.40?}"))?;
            if fields[i].replace(v).is_some() {
                return Err(format!("lease file names {k} twice"));
            }
        }
        let get = |i: usize| fields[i].ok_or_else(|| format!("lease file lacks {}", KEYS[i]));
        let number = |i: usize| -> Result<u64, String> {
            get(i)?
                .parse()
                .map_err(|_| format!("lease file's {} is not a number", KEYS[i]))
        };
        let name = |i: usize| -> Result<String, String> {
            let v = get(i)?;
            if v.is_empty() || v.len() > 64 || !v.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!("lease file's {} is not a name", KEYS[i]));
            }
            Ok(v.to_string())
        };
        Ok(LeaseRecord {
            vm: name(0)?,
            owner: name(1)?,
            incarnation: number(2)?,
            epoch: number(3)?,
            counter: number(4)?,
        })
    }
}

/// The operations a lease needs on its file (the store's, or a double).
/// Each is synchronous; an `Err` is the store's failure as a message.
pub trait LeaseFile {
    /// The file's bytes (at most [`MAX_RECORD_BYTES`] + 1 of them), or
    /// `None` if there is no file.
    fn read(&self) -> Result<Option<Vec<u8>>, String>;
    /// Create the file with `bytes` only if there is none, durably:
    /// `Ok(false)` if it existed.
    fn create_new(&self, bytes: &[u8]) -> Result<bool, String>;
    /// Replace the file's contents with `bytes` atomically and durably (a
    /// reader sees the old or the new contents, whole).
    fn replace(&self, bytes: &[u8]) -> Result<(), String>;
    /// Delete the file, durably.
    fn remove(&self) -> Result<(), String>;
    /// Write `bytes` durably under this node's side name, leaving the
    /// lease as it is: a later [`LeaseFile::commit_staged`] puts them in
    /// place with one rename. A file without side names says so (`Err`);
    /// the caller then replaces.
    fn stage(&self, bytes: &[u8]) -> Result<(), String> {
        let _ = bytes;
        Err("this lease file cannot stage".into())
    }
    /// Put the staged bytes in place as [`LeaseFile::replace`] would
    /// (atomically, durably).
    fn commit_staged(&self) -> Result<(), String> {
        Err("this lease file cannot stage".into())
    }
    /// Delete what was staged and never put in place, if anything.
    fn unstage(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A record staged ahead of a hand-over or an adoption (so that the step
/// inside the migration's pause is one rename), and when the record it
/// follows was read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Staged {
    record: LeaseRecord,
    read_ms: u64,
}

/// The lease's times, in ms of each node's own monotonic clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How often the owner renews.
    pub renew_ms: u64,
    /// How long another node must see one record unchanged before it may
    /// claim the lease.
    pub expire_ms: u64,
    /// How long a claimant waits before reading its claim back.
    pub settle_ms: u64,
    /// Slack for the store's latency and clock rates.
    pub margin_ms: u64,
}

impl Timing {
    /// The node's defaults: renew every second, take over after 10 s.
    pub const DEFAULT: Timing = Timing {
        renew_ms: 1_000,
        expire_ms: 10_000,
        settle_ms: 3_000,
        margin_ms: 1_000,
    };

    /// Whether these times keep two owners apart (see the module doc).
    pub fn check(&self) -> Result<(), String> {
        if self.renew_ms == 0 || self.margin_ms == 0 {
            return Err("lease times: renew and margin must be above 0".into());
        }
        if self.settle_ms <= self.renew_ms + self.margin_ms {
            return Err(format!(
                "lease times: settle {} ms must exceed renew {} ms + margin {} ms",
                self.settle_ms, self.renew_ms, self.margin_ms
            ));
        }
        if self.expire_ms <= self.renew_ms + 2 * self.margin_ms {
            return Err(format!(
                "lease times: expiry {} ms must exceed renew {} ms + twice the margin {} ms",
                self.expire_ms, self.renew_ms, self.margin_ms
            ));
        }
        Ok(())
    }
}

/// Where this node stands with one lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Not asked for yet, or released / handed over.
    Idle,
    /// Another node's (or an unreadable) record, seen unchanged since
    /// `since_ms`.
    Watching {
        seen: Result<LeaseRecord, String>,
        since_ms: u64,
    },
    /// This node wrote a claim at `at_ms` and reads it back after the
    /// settle time.
    Claiming { record: LeaseRecord, at_ms: u64 },
    /// This node owns the lease; the last record it wrote (a create,
    /// claim, renewal or adoption) was begun at `renewed_ms`, the instant
    /// from which other nodes may count their expiry.
    Owned {
        record: LeaseRecord,
        renewed_ms: u64,
    },
}

/// What [`Lease::acquire`] and [`Lease::poll`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// This node owns the lease now.
    Owned,
    /// Another node holds it: `owner` (`None` if the file is unreadable),
    /// and the earliest this node could claim it if nothing changes.
    Held {
        owner: Option<String>,
        claim_in_ms: u64,
    },
    /// A claim is written; ownership is known after `in_ms`.
    Settling { in_ms: u64 },
}

/// What [`Lease::renew`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Not due yet, or renewed.
    Held,
    /// The record names another owner or epoch: this node must not write
    /// (the reason, for the operator).
    Lost(String),
    /// The store did not answer; writes stay allowed until
    /// [`Lease::may_write`] says otherwise.
    Failed(String),
}

/// One node's view of one VM's lease.
pub struct Lease {
    vm: String,
    node: String,
    incarnation: u64,
    timing: Timing,
    state: State,
    staged: Option<Staged>,
}

impl Lease {
    /// The lease of `vm` as seen by `node` (in boot `incarnation`).
    pub fn new(vm: &str, node: &str, incarnation: u64, timing: Timing) -> Self {
        Lease {
            vm: vm.into(),
            node: node.into(),
            incarnation,
            timing,
            state: State::Idle,
            staged: None,
        }
    }

    /// Where this node stands.
    pub fn state(&self) -> &State {
        &self.state
    }

    fn record(&self, epoch: u64) -> LeaseRecord {
        LeaseRecord {
            vm: self.vm.clone(),
            owner: self.node.clone(),
            incarnation: self.incarnation,
            epoch,
            counter: 0,
        }
    }

    fn read(file: &dyn LeaseFile) -> Result<Option<Result<LeaseRecord, String>>, String> {
        Ok(file.read()?.map(|b| LeaseRecord::decode(&b)))
    }

    /// Ask for the lease at `now_ms`: a free lease is taken at once;
    /// otherwise the node starts watching the holder's record (call
    /// [`Lease::poll`] to go on).
    pub fn acquire(&mut self, now_ms: u64, file: &dyn LeaseFile) -> Result<Acquire, String> {
        if matches!(self.state, State::Owned { .. }) {
            return Ok(Acquire::Owned);
        }
        match Self::read(file)? {
            None => {
                let record = self.record(1);
                if file.create_new(&record.encode())? {
                    self.state = State::Owned {
                        record,
                        renewed_ms: now_ms,
                    };
                    return Ok(Acquire::Owned);
                }
                // Someone created it between the read and the create.
                let seen = Self::read(file)?.unwrap_or_else(|| Err("lease file vanished".into()));
                self.watch(seen, now_ms)
            }
            Some(seen) => self.watch(seen, now_ms),
        }
    }

    fn watch(&mut self, seen: Result<LeaseRecord, String>, now_ms: u64) -> Result<Acquire, String> {
        let owner = seen.as_ref().ok().map(|r| r.owner.clone());
        self.state = State::Watching {
            seen,
            since_ms: now_ms,
        };
        Ok(Acquire::Held {
            owner,
            claim_in_ms: self.timing.expire_ms,
        })
    }

    /// Go on acquiring at `now_ms` (after [`Lease::acquire`] answered
    /// `Held` or `Settling`): watch the holder's record, claim it once it
    /// has not changed for the expiry time, confirm the claim after the
    /// settle time.
    pub fn poll(&mut self, now_ms: u64, file: &dyn LeaseFile) -> Result<Acquire, String> {
        match core::mem::replace(&mut self.state, State::Idle) {
            State::Idle => self.acquire(now_ms, file),
            State::Owned { record, renewed_ms } => {
                self.state = State::Owned { record, renewed_ms };
                Ok(Acquire::Owned)
            }
            State::Watching { seen, since_ms } => {
                let now_seen = match Self::read(file) {
                    Ok(s) => s,
                    Err(e) => {
                        self.state = State::Watching { seen, since_ms };
                        return Err(e);
                    }
                };
                let Some(now_seen) = now_seen else {
                    // Released: take it as a free lease.
                    return self.acquire(now_ms, file);
                };
                if now_seen != seen {
                    return self.watch(now_seen, now_ms);
                }
                let waited = now_ms.saturating_sub(since_ms);
                if waited < self.timing.expire_ms {
                    let owner = seen.as_ref().ok().map(|r| r.owner.clone());
                    self.state = State::Watching { seen, since_ms };
                    return Ok(Acquire::Held {
                        owner,
                        claim_in_ms: self.timing.expire_ms - waited,
                    });
                }
                let epoch = seen.as_ref().map_or(0, |r| r.epoch).saturating_add(1);
                let record = self.record(epoch);
                if let Err(e) = file.replace(&record.encode()) {
                    self.state = State::Watching { seen, since_ms };
                    return Err(e);
                }
                self.state = State::Claiming {
                    record,
                    at_ms: now_ms,
                };
                Ok(Acquire::Settling {
                    in_ms: self.timing.settle_ms,
                })
            }
            State::Claiming { record, at_ms } => {
                let waited = now_ms.saturating_sub(at_ms);
                if waited < self.timing.settle_ms {
                    self.state = State::Claiming { record, at_ms };
                    return Ok(Acquire::Settling {
                        in_ms: self.timing.settle_ms - waited,
                    });
                }
                let seen = match Self::read(file) {
                    Ok(s) => s,
                    Err(e) => {
                        self.state = State::Claiming { record, at_ms };
                        return Err(e);
                    }
                };
                match seen {
                    Some(Ok(r)) if r == record => {
                        // Others saw this record from the claim on: the
                        // write allowance counts from there.
                        self.state = State::Owned {
                            record,
                            renewed_ms: at_ms,
                        };
                        Ok(Acquire::Owned)
                    }
                    None => self.acquire(now_ms, file),
                    Some(other) => self.watch(other, now_ms),
                }
            }
        }
    }

    /// The owner's renewal at `now_ms` (call it often; it does nothing
    /// until `renew_ms` has passed since the last one).
    pub fn renew(&mut self, now_ms: u64, file: &dyn LeaseFile) -> Renewal {
        let State::Owned { record, renewed_ms } = &self.state else {
            return Renewal::Lost("this node does not hold the lease".into());
        };
        if now_ms.saturating_sub(*renewed_ms) < self.timing.renew_ms {
            return Renewal::Held;
        }
        let record = record.clone();
        match Self::read(file) {
            Err(e) => return Renewal::Failed(e),
            Ok(Some(Ok(r))) if r == record => {}
            Ok(seen) => {
                let why = match seen {
                    None => "the lease file was removed".to_string(),
                    Some(Err(e)) => e,
                    Some(Ok(r)) => format!(
                        "the lease of {} is held by {} (epoch {})",
                        r.vm, r.owner, r.epoch
                    ),
                };
                self.state = State::Idle;
                return Renewal::Lost(why);
            }
        }
        let next = LeaseRecord {
            counter: record.counter.wrapping_add(1),
            ..record
        };
        match file.replace(&next.encode()) {
            Ok(()) => {
                self.state = State::Owned {
                    record: next,
                    renewed_ms: now_ms,
                };
                Renewal::Held
            }
            Err(e) => Renewal::Failed(e),
        }
    }

    /// Whether this node may write the VM's files at `now_ms`: it owns
    /// the lease and renewed it recently enough that no other node can
    /// have claimed it.
    pub fn may_write(&self, now_ms: u64) -> bool {
        match &self.state {
            State::Owned { renewed_ms, .. } => {
                now_ms.saturating_sub(*renewed_ms)
                    < self.timing.expire_ms.saturating_sub(self.timing.margin_ms)
            }
            _ => false,
        }
    }

    /// The record a hand-over of `record` to `node` writes.
    fn handed(record: &LeaseRecord, node: &str) -> LeaseRecord {
        LeaseRecord {
            vm: record.vm.clone(),
            owner: node.into(),
            incarnation: 0,
            epoch: record.epoch.saturating_add(1),
            counter: 0,
        }
    }

    /// Stage `record` (see [`Staged`]); a file that cannot stage leaves
    /// nothing staged.
    fn stage(&mut self, record: LeaseRecord, read_ms: u64, file: &dyn LeaseFile) {
        self.staged = file
            .stage(&record.encode())
            .ok()
            .map(|()| Staged { record, read_ms });
    }

    /// Put `record` in place: by renaming what was staged if that is
    /// `record` (and the rename worked), else by a replace.
    fn put(&mut self, record: &LeaseRecord, file: &dyn LeaseFile) -> Result<(), String> {
        let staged = self.staged.take();
        if staged.is_some_and(|s| s.record == *record) && file.commit_staged().is_ok() {
            return Ok(());
        }
        file.replace(&record.encode())
    }

    /// Ahead of a hand-over to `node` (before the migration pauses the
    /// VM): write the record [`Lease::hand_over`] puts in place under a
    /// side name, so the hand-over is one rename. Writes nothing to the
    /// lease; harmless if the hand-over never comes.
    pub fn prepare_hand_over(&mut self, node: &str, now_ms: u64, file: &dyn LeaseFile) {
        if let State::Owned { record, .. } = &self.state {
            let next = Self::handed(record, node);
            self.stage(next, now_ms, file);
        }
    }

    /// The owner gives the lease to `node` (a live migration's switch-over
    /// on a shared store) at `now_ms`: the record names `node` with the
    /// next epoch; this node stops writing. Only an owner that may still
    /// write hands over (else another node may have claimed the lease).
    /// Returns the record the destination must find ([`Lease::adopt`]).
    pub fn hand_over(
        &mut self,
        node: &str,
        now_ms: u64,
        file: &dyn LeaseFile,
    ) -> Result<LeaseRecord, String> {
        let State::Owned { record, .. } = &self.state else {
            return Err("this node does not hold the lease".into());
        };
        let next = Self::handed(record, node);
        let fresh = self.may_write(now_ms);
        // No writes from here on, whatever the store says.
        self.state = State::Idle;
        if !fresh {
            self.staged = None;
            return Err("the lease was not renewed in time".into());
        }
        self.put(&next, file)?;
        Ok(next)
    }

    /// How long after [`Lease::prepare_adopt`]'s read its staged record
    /// may be renamed into place without a new read: `expire + settle -
    /// 2 margin` (docs/DESIGN.md "Leases").
    fn adopt_window_ms(&self) -> u64 {
        (self.timing.expire_ms + self.timing.settle_ms).saturating_sub(2 * self.timing.margin_ms)
    }

    /// Ahead of a hand-over from node `from` (when this node accepts the
    /// migration, at `now_ms`, before it answers): read the record, and
    /// if `from` holds it, stage what adopting its hand-over (the next
    /// epoch) writes, so that [`Lease::adopt`] in the pause is one rename
    /// with no read. Writes nothing to the lease.
    pub fn prepare_adopt(&mut self, from: &str, now_ms: u64, file: &dyn LeaseFile) {
        self.staged = None;
        if let Ok(Some(Ok(r))) = Self::read(file) {
            if r.owner == from && r.vm == self.vm && from != self.node {
                let record = LeaseRecord {
                    vm: r.vm,
                    owner: self.node.clone(),
                    incarnation: self.incarnation,
                    epoch: r.epoch.saturating_add(1),
                    counter: 0,
                };
                self.stage(record, now_ms, file);
            }
        }
    }

    /// The destination of a hand-over takes the lease at `now_ms` if the
    /// file names this node with `epoch`, and stamps its incarnation. A
    /// record staged by [`Lease::prepare_adopt`] for `epoch` stands for
    /// the read if its read is less than the adoption window old: the
    /// hand-over came after that read, so a claim on it cannot have
    /// settled yet, and the claimant yields to the rename.
    pub fn adopt(&mut self, epoch: u64, now_ms: u64, file: &dyn LeaseFile) -> Result<(), String> {
        if let Some(s) = self.staged.take() {
            if s.record.epoch == epoch
                && now_ms.saturating_sub(s.read_ms) < self.adopt_window_ms()
                && file.commit_staged().is_ok()
            {
                self.state = State::Owned {
                    record: s.record,
                    renewed_ms: now_ms,
                };
                return Ok(());
            }
        }
        match Self::read(file)? {
            Some(Ok(r)) if r.owner == self.node && r.epoch == epoch => {
                let record = LeaseRecord {
                    incarnation: self.incarnation,
                    ..r
                };
                file.replace(&record.encode())?;
                self.state = State::Owned {
                    record,
                    renewed_ms: now_ms,
                };
                Ok(())
            }
            Some(Ok(r)) => Err(format!(
                "the lease of {} names {} with epoch {}, not this node with epoch {epoch}",
                r.vm, r.owner, r.epoch
            )),
            Some(Err(e)) => Err(e),
            None => Err(format!("the lease of {} is gone", self.vm)),
        }
    }

    /// The former owner takes back a lease it handed over whose
    /// destination never adopted it (the migration failed before its
    /// commit point, so the destination never writes): only if the file
    /// still holds exactly `handed` (or `before`, this node's own record
    /// from before the hand-over, if the hand-over's write never landed)
    /// does it write itself as owner with the next epoch and own the lease
    /// from `now_ms`. Anything else is an error; the caller then acquires
    /// the lease like any other node.
    pub fn take_back(
        &mut self,
        handed: &LeaseRecord,
        before: &LeaseRecord,
        now_ms: u64,
        file: &dyn LeaseFile,
    ) -> Result<(), String> {
        match Self::read(file)? {
            Some(Ok(r)) if r == *handed || r == *before => {
                let record = self.record(handed.epoch.saturating_add(1));
                file.replace(&record.encode())?;
                self.state = State::Owned {
                    record,
                    renewed_ms: now_ms,
                };
                Ok(())
            }
            Some(Ok(r)) => Err(format!(
                "the lease of {} names {} with epoch {} now, not the hand-over to {}",
                r.vm, r.owner, r.epoch, handed.owner
            )),
            Some(Err(e)) => Err(e),
            None => Err(format!("the lease of {} is gone", self.vm)),
        }
    }

    /// The record this node holds, if it owns the lease.
    pub fn owned_record(&self) -> Option<&LeaseRecord> {
        match &self.state {
            State::Owned { record, .. } => Some(record),
            _ => None,
        }
    }

    /// The owner gives the lease up (the VM stopped or was deleted).
    pub fn release(&mut self, file: &dyn LeaseFile) -> Result<(), String> {
        // A hand-over staged for a move that never came goes too.
        self.staged = None;
        let _ = file.unstage();
        if !matches!(self.state, State::Owned { .. }) {
            return Ok(());
        }
        self.state = State::Idle;
        file.remove()
    }
}

pub mod vms;

#[cfg(test)]
mod tests;
