//! Checkpoints of a running VM's disks: every write from a moment on goes
//! to a differencing VHDX (the *child*) whose parent is the disk's file
//! as it was then (the *base*, never written again while the checkpoint
//! stands), and the child can be folded back into the base (merged) with
//! the VM running. Quick storage migration (MISSION "Quick storage
//! migration") copies the frozen base while the guest writes to the child.
//!
//! ```text
//!   take:  flush the VM's disk ─> close it ─> reopen the base read-write
//!          ─> create the child (partial name, then named) ─> config names
//!          the child (checkpoint.N) ─> the VM's disk is the chain
//!   merge: the child's sectors written into the base and flushed ─> the
//!          VM's disk is the base ─> config without checkpoint.N ─> child
//!          file deleted
//! ```
//!
//! The guest notices nothing: its virtio-blk device stays as it is and only
//! the disk behind the slot is exchanged, between two of its requests (the
//! node has one thread), as storage migration does. The child goes to the
//! VM's snapshot location (`snapshots=` of its configuration file) as
//! `VM-SLOT-checkpoint.avhdx`.
//!
//! Invariants: the VM's disk reads, at every instant, what the guest
//! wrote; the configuration file names the chain (`checkpoint.N`) from
//! before the child is written until after it is merged, so a node that
//! restarts opens the right files ([`open_chain`]); a failed step leaves
//! the VM on what it had (the base before the chain is in place, the chain
//! while a merge has not completed).
//!
//! Limits: disks on the shared store take no checkpoint (their files
//! reopen behind the VM's lease, which knows only one file per disk); a
//! merge runs to its end in one call (it blocks the node for as long as
//! the child's data takes to write).

use crate::disks::{Backing, Detached, FileStore};
use crate::vm::Vm;
use crate::vmconfig;
use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use vstorage::vhdx::{self, CreateParams, OpenOptions, ParentSpec, Vhdx};
use vstorage::{BlockIo, VirtualDisk};

/// A disk file on a store, opened.
pub type StoreDisk = Vhdx<Box<dyn BlockIo>>;

/// The checkpoint file of disk `slot` of VM `vm` in the snapshot location
/// `snapshots` (`STORE:DIR`).
pub fn child_location(snapshots: &str, vm: &str, slot: u8) -> String {
    vmconfig::file_in(snapshots, &format!("{vm}-{slot}-checkpoint.avhdx"))
}

/// Open the file at `location` as a read-write VHDX (`seed` seeds the GUIDs
/// its first write draws).
fn open_rw(files: &dyn FileStore, location: &str, seed: u64) -> Result<StoreDisk, String> {
    let io = files
        .open(location)
        .map_err(|e| format!("cannot open {location}: {e}"))?;
    Vhdx::open(io, OpenOptions::read_write(seed))
        .map_err(|e| format!("{location} is not a usable VHDX: {e}"))
}

/// Open a disk with a checkpoint as it was left (a node's start, an
/// import): the base `base` and the child `child` over it, both read-write,
/// the child's parent identity checked.
pub fn open_chain(
    files: &dyn FileStore,
    base: &str,
    child: &str,
    seed: u64,
) -> Result<StoreDisk, String> {
    let parent = open_rw(files, base, seed)?;
    let mut disk = open_rw(files, child, seed ^ 0x0c4e_c4b0)?;
    if disk.kind() != vhdx::DiskKind::Differencing {
        return Err(format!("{child} is not a differencing disk"));
    }
    disk.attach_parent(parent)
        .map_err(|e| format!("{child} is not a checkpoint of {base}: {e}"))?;
    Ok(disk)
}

/// Attach the disk `base` with its checkpoint `child` to `vm` (not
/// started) as its next disk (an import of a VM whose configuration names
/// a checkpoint): the VM writes to the child, the configuration keeps
/// naming both.
pub fn attach_chain(
    vm: &mut Vm,
    files: &dyn FileStore,
    base: &str,
    child: &str,
    seed: u64,
) -> Result<hvmgmt::proto::DiskInfo, String> {
    if crate::lease::vms::is_shared_store(crate::lease::vms::store_of(base)) {
        return Err(format!(
            "{base} is on the shared store: its disks take no checkpoint here"
        ));
    }
    let disk = open_chain(files, base, child, seed)?;
    let fixed = disk
        .parent()
        .is_some_and(|p| p.kind() == vhdx::DiskKind::Fixed);
    let meta = crate::disks::DiskMeta {
        backing: Backing::File {
            location: base.into(),
        },
        fixed,
        virtual_bytes: disk.virtual_size_bytes(),
        block_bytes: disk.parent().map_or(disk.block_size(), |p| p.block_size()),
        checkpoint: Some(child.into()),
    };
    let slot = vm.disk_count();
    let info = meta.info(slot as u8, Some(files));
    vm.attach_disk(Box::new(disk), meta)
        .ok_or_else(|| String::from("every virtio slot of the VM is taken"))?;
    Ok(info)
}

/// The ranges a differencing disk defines itself (not its parent's), to
/// the sector (`Vhdx::present_ranges`): what a merge writes.
pub fn own_ranges(chain: &mut StoreDisk) -> Result<Vec<(u64, u64)>, String> {
    chain.present_ranges().map_err(|e| format!("{e}"))
}

/// A checkpoint taken by this node and still standing: the handle to its
/// chain, to watch it and to merge it.
pub struct Checkpoint {
    vm: String,
    slot: u8,
    base: String,
    child: String,
    chain: Rc<RefCell<StoreDisk>>,
}

impl core::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("vm", &self.vm)
            .field("slot", &self.slot)
            .field("base", &self.base)
            .field("child", &self.child)
            .finish_non_exhaustive()
    }
}

/// Take a checkpoint of disk `slot` of `vm` (running or not): from the
/// return on, the guest's writes go to the child, the base is frozen.
/// On failure the VM keeps its disk as it was (the child, if made, is
/// deleted).
pub fn take(vm: &mut Vm, files: &dyn FileStore, slot: u8) -> Result<Checkpoint, String> {
    let meta = vm
        .disk_meta()
        .get(usize::from(slot))
        .cloned()
        .ok_or_else(|| format!("VM {} has no disk {slot}", vm.name()))?;
    let Backing::File { location: base } = &meta.backing else {
        return Err(format!(
            "disk {slot} of VM {} is in node memory: a checkpoint needs a store",
            vm.name()
        ));
    };
    if let Some(c) = &meta.checkpoint {
        return Err(format!("disk {slot} has a checkpoint already ({c})"));
    }
    if crate::lease::vms::is_shared_store(crate::lease::vms::store_of(base)) {
        return Err(format!(
            "{base} is on the shared store: its disks take no checkpoint here"
        ));
    }
    let Some(snapshots) = vm.placement().map(|p| p.snapshots.clone()) else {
        return Err(format!(
            "VM {} has no configuration file: no snapshot location",
            vm.name()
        ));
    };
    let child = child_location(&snapshots, vm.name(), slot);
    if files.file_bytes(&child).is_some() {
        return Err(format!("{child} exists: remove it first"));
    }
    let seed = meta.virtual_bytes ^ u64::from(slot) << 56 ^ 0x5eed_c4ec;
    // Everything the guest wrote is in the base file before it is closed.
    let disk = vm.disk_mut(slot).ok_or("the disk is gone")?;
    disk.flush()
        .map_err(|e| format!("cannot flush disk {slot}: {e}"))?;
    let sector = disk.logical_sector_size();
    let old = vm
        .replace_disk(
            slot,
            Box::new(Detached {
                size: meta.virtual_bytes,
                sector,
            }),
        )
        .ok_or("the disk is gone")?;
    drop(old);
    let parent = match open_rw(files, base, seed) {
        Ok(p) => p,
        Err(e) => {
            // Once more: the file opened a moment ago.
            let again = open_rw(files, base, seed)
                .map_err(|e2| format!("{e}; the disk is unusable until the VM restarts: {e2}"))?;
            vm.replace_disk(slot, Box::new(again));
            return Err(e);
        }
    };
    let made = make_child(files, &child, &parent, meta.block_bytes, seed);
    let mut disk = match made {
        Ok(d) => d,
        Err(e) => {
            vm.replace_disk(slot, Box::new(parent));
            return Err(e);
        }
    };
    if let Err(e) = disk.attach_parent(parent) {
        drop(disk);
        let _ = files.remove(&child);
        let base_again = open_rw(files, base, seed)?;
        vm.replace_disk(slot, Box::new(base_again));
        return Err(format!("cannot attach the checkpoint to {base}: {e}"));
    }
    // The configuration names the chain before the child holds a write.
    if let Some(m) = vm.disk_meta_mut().get_mut(usize::from(slot)) {
        m.checkpoint = Some(child.clone());
    }
    if let Err(e) = vmconfig::save(vm, files) {
        if let Some(m) = vm.disk_meta_mut().get_mut(usize::from(slot)) {
            m.checkpoint = None;
        }
        let parent = disk.take_parent();
        drop(disk);
        let _ = files.remove(&child);
        if let Some(p) = parent {
            vm.replace_disk(slot, Box::new(p));
        }
        return Err(format!(
            "cannot record the checkpoint in the VM's configuration: {e}"
        ));
    }
    let chain = Rc::new(RefCell::new(disk));
    vm.replace_disk(slot, Box::new(chain.clone()));
    Ok(Checkpoint {
        vm: vm.name().into(),
        slot,
        base: base.clone(),
        child,
        chain,
    })
}

/// The child of `parent` at `child`: created under its partial name,
/// flushed, then named.
fn make_child(
    files: &dyn FileStore,
    child: &str,
    parent: &StoreDisk,
    block_bytes: u32,
    seed: u64,
) -> Result<StoreDisk, String> {
    let spec = ParentSpec {
        data_write_guid: parent.header().data_write_guid,
        // The node opens the chain by the names in the VM's configuration;
        // the locator names the base for other tools, beside the child.
        relative_path: None,
        absolute_path: None,
        virtual_size: parent.virtual_size_bytes(),
        logical_sector_size: parent.logical_sector_bytes(),
        physical_sector_size: parent.physical_sector_size(),
        disk_id: parent.disk_id(),
    };
    let params = CreateParams {
        block_size: block_bytes,
        parent: Some(spec),
        guid_seed: seed ^ 0x0c4e_c4b0,
        ..CreateParams::dynamic(parent.virtual_size_bytes())
    };
    let file = files.create_partial(child)?;
    let made = vhdx::create(file, &params).and_then(|mut d| {
        d.flush()?;
        Ok(d)
    });
    let disk = match made {
        Ok(d) => d,
        Err(e) => {
            files.remove_partial(child);
            return Err(format!("cannot create {child}: {e}"));
        }
    };
    if let Err(e) = files.commit_partial(child) {
        drop(disk);
        files.remove_partial(child);
        return Err(format!("cannot name {child}: {e}"));
    }
    Ok(disk)
}

impl Checkpoint {
    /// The VM it belongs to.
    pub fn vm(&self) -> &str {
        &self.vm
    }
    /// The disk slot.
    pub fn slot(&self) -> u8 {
        self.slot
    }
    /// `STORE:path` of the base (frozen while the checkpoint stands).
    pub fn base(&self) -> &str {
        &self.base
    }
    /// `STORE:path` of the child.
    pub fn child(&self) -> &str {
        &self.child
    }

    /// The disk's virtual size and logical sector size.
    pub fn geometry(&self) -> (u64, u32) {
        let c = self.chain.borrow();
        (c.virtual_size(), c.logical_sector_size())
    }

    /// The ranges the child holds, to the sector: what a merge writes.
    pub fn own_ranges(&self) -> Result<Vec<(u64, u64)>, String> {
        own_ranges(&mut self.chain.borrow_mut())
    }

    /// Bytes the child holds: the checkpoint's growth.
    pub fn child_bytes(&self) -> Result<u64, String> {
        Ok(self.own_ranges()?.iter().map(|r| r.1).sum())
    }

    /// Read through the chain (what the guest sees).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.chain
            .borrow_mut()
            .read(offset, buf)
            .map_err(|e| format!("{e}"))
    }

    /// Flush the child (the guest's writes durable in it).
    pub fn flush(&self) -> Result<(), String> {
        self.chain.borrow_mut().flush().map_err(|e| format!("{e}"))
    }

    /// Fold the child back into the base, the VM running or paused: the
    /// child's sectors written to the base and flushed, the VM's disk the
    /// base again, the configuration without the checkpoint, the child
    /// deleted. Returns the bytes the child held. On failure the VM stays
    /// on the chain (which still reads what the guest wrote: a partly
    /// merged base holds the child's own data where it was written) and
    /// the checkpoint is given back.
    pub fn merge(self, vm: &mut Vm, files: &dyn FileStore) -> Result<u64, (Self, String)> {
        if vm.name() != self.vm {
            let why = format!("the checkpoint is VM {}'s, not {}'s", self.vm, vm.name());
            return Err((self, why));
        }
        let held = match self.child_bytes() {
            Ok(n) => n,
            Err(e) => return Err((self, e)),
        };
        let merged = self.chain.borrow_mut().merge_into_parent();
        if let Err(e) = merged {
            let why = format!("cannot merge {} into {}: {e}", self.child, self.base);
            return Err((self, why));
        }
        // The base holds everything now: the VM's disk becomes the base.
        let (size, sector) = {
            let c = self.chain.borrow();
            (c.virtual_size(), c.logical_sector_size())
        };
        let handle = vm.replace_disk(self.slot, Box::new(Detached { size, sector }));
        drop(handle);
        let Self {
            vm: name,
            slot,
            base,
            child,
            chain,
        } = self;
        let mut disk = match Rc::try_unwrap(chain) {
            Ok(c) => c.into_inner(),
            Err(chain) => {
                vm.replace_disk(slot, Box::new(chain.clone()));
                let cp = Self {
                    vm: name,
                    slot,
                    base,
                    child,
                    chain,
                };
                return Err((cp, "the checkpoint's disk is shared elsewhere".into()));
            }
        };
        let Some(parent) = disk.take_parent() else {
            // Cannot happen: the merge needed the parent attached.
            let chain = Rc::new(RefCell::new(disk));
            vm.replace_disk(slot, Box::new(chain.clone()));
            let cp = Self {
                vm: name,
                slot,
                base,
                child,
                chain,
            };
            return Err((cp, "the checkpoint has no parent".into()));
        };
        drop(disk);
        vm.replace_disk(slot, Box::new(parent));
        if let Some(m) = vm.disk_meta_mut().get_mut(usize::from(slot)) {
            m.checkpoint = None;
        }
        // The base holds the child's data: a configuration still naming the
        // chain would be refused at the next start (the base's identity
        // changed), so the file is rewritten before the child goes; if the
        // rewrite fails, the child stays (a host tool can remove it).
        if let Err(e) = vmconfig::save(vm, files) {
            log::warn!(
                "checkpoint: merged {child} but cannot rewrite the configuration of {name}: {e}"
            );
            return Ok(held);
        }
        if let Err(e) = files.remove(&child) {
            log::warn!("checkpoint: cannot delete {child}: {e}");
        }
        Ok(held)
    }
}

#[cfg(test)]
pub(crate) mod tests;
