//! Quick storage migration between two managed nodes whose stores are the
//! 9P server double over real temporary directories (`vm move --quick`,
//! `super::super::quick`): the VM's disk on a's own store goes to b's
//! through a checkpoint while the guest writes, then the VM is saved and
//! resumes on b on the merged base. Checked on the files: b's base holds
//! every write from before and after the checkpoint, a keeps none of the
//! VM's files, b's configuration names the base; a link that breaks
//! during the base copy leaves the VM running on a with its data and no
//! file on b.

use super::*;
use crate::store::testing::DirChannel;
use crate::store::{parse_specs, Stores};
use hvcore::host::StoreChannel;

const MIB: u64 = 1 << 20;
const DISK_MIB: u64 = 16;

struct Quick {
    p: Pair,
    local: [tempfile::TempDir; 2],
    _shared: tempfile::TempDir,
}

impl Quick {
    fn new() -> Self {
        let mut p = Pair::new();
        let shared = tempfile::tempdir().unwrap();
        let local = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        for (i, name) in ["a", "b"].into_iter().enumerate() {
            let l = DirChannel::new(name, local[i].path(), 65536);
            let s = DirChannel::new("shared", shared.path(), 65536);
            let channels: Vec<Box<dyn StoreChannel>> = vec![Box::new(l), Box::new(s)];
            let specs = parse_specs(&format!(
                "store=local:{name}:/srv/{name} store=shared:shared:/srv/shared"
            ))
            .0;
            p.n[i]
                .node
                .set_stores(Stores::attach(channels, &specs, name));
        }
        Quick {
            p,
            local,
            _shared: shared,
        }
    }

    /// VM `name` (4 MiB, a writer) with a 16 MiB disk on a's own store,
    /// started.
    fn started(&mut self, name: &str) {
        self.p.a().ok(Request::VmCreate {
            name: name.into(),
            memory_mib: 4,
            guest: None,
            linux: None,
        });
        self.p.a().ok(Request::VmDiskCreate {
            name: name.into(),
            size_mib: DISK_MIB,
            store: Some("local".into()),
            fixed: None,
        });
        self.p.a().ok(Request::VmStart { name: name.into() });
        self.p.rounds(20);
    }

    /// The guest's disk on node `i` (through the VM's own disk).
    fn disk(&mut self, i: usize, vm: &str) -> &mut dyn vstorage::VirtualDisk {
        let v = self.p.n[i]
            .node
            .vms_mut()
            .iter_mut()
            .find(|v| v.name() == vm)
            .unwrap_or_else(|| panic!("no VM {vm} on node {i}"));
        v.disk_mut(0).unwrap()
    }

    /// A guest write (from the test) into `model` too.
    fn write(&mut self, vm: &str, model: &mut [u8], at: u64, tag: u8, len: u64) {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(29) ^ tag).collect();
        let d = self.disk(0, vm);
        d.write(at, &data).unwrap();
        d.flush().unwrap();
        model[at as usize..(at + len) as usize].copy_from_slice(&data);
    }

    /// The files below node `i`'s own store, relative, sorted.
    fn files(&self, i: usize) -> Vec<String> {
        fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else if let Ok(r) = p.strip_prefix(root) {
                    out.push(r.display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(self.local[i].path(), self.local[i].path(), &mut out);
        out.sort();
        out
    }

    /// The virtual disk in the VHDX at `rel` on node `i`'s store.
    fn file_reads(&self, i: usize, rel: &str) -> Vec<u8> {
        let bytes = std::fs::read(self.local[i].path().join(rel)).unwrap();
        let mut d = vstorage::vhdx::Vhdx::open(
            vstorage::MemIo::from_vec(bytes),
            vstorage::vhdx::OpenOptions::read_only(),
        )
        .unwrap();
        let mut all = vec![0u8; (DISK_MIB * MIB) as usize];
        vstorage::VirtualDisk::read(&mut d, 0, &mut all).unwrap();
        all
    }

    fn start_quick(&mut self, vm: &str) -> u64 {
        let req = Mv {
            quick: true,
            ..Mv::default()
        }
        .req(vm);
        self.p.start_move(req)
    }
}

/// `got` equals `want`, or the first difference is named.
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: byte {i} is {} not {}", got[i], want[i]);
    }
}

#[test]
fn a_quick_move_brings_the_disk_with_every_write_and_leaves_nothing_on_a() {
    let mut q = Quick::new();
    q.started("v");
    let mut model = vec![0u8; (DISK_MIB * MIB) as usize];
    // 12 MiB of data: the base copy spans several rounds (the remote
    // target's window is 2 MiB).
    q.write("v", &mut model, 0, 1, 8 * MIB);
    q.write("v", &mut model, 10 * MIB + 4096, 2, 4 * MIB);
    assert_eq!(q.files(0), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
    let id = q.start_quick("v");
    // Until the guest is saved it writes (the checkpoint takes it): over
    // the base's data, into holes, zeros over data.
    let mut writes = 0u64;
    let mut growth = Vec::new();
    q.p.until(400_000, "the VM is saved", |p| {
        // The job shows the checkpoint's growth while the bases copy.
        let grown = p.a().job(id).migration.map_or(0, |m| m.checkpoint_bytes);
        if grown > 0 {
            growth.push(grown);
        }
        let Some(v) = p.n[0].node.vms_mut().iter_mut().find(|v| v.name() == "v") else {
            return true;
        };
        if v.is_paused() {
            return true;
        }
        if v.disk_meta()[0].checkpoint.is_some() && writes < 6 {
            let at = [4096, 15 * MIB, 9 * MIB + 8192, MIB, 0, 11 * MIB + 65536][writes as usize];
            let tag = 40 + writes as u8;
            let data: Vec<u8> = if writes == 4 {
                vec![0u8; 4096]
            } else {
                (0..8192u64)
                    .map(|i| (i as u8).wrapping_mul(31) ^ tag)
                    .collect()
            };
            let d = v.disk_mut(0).unwrap();
            d.write(at, &data).unwrap();
            d.flush().unwrap();
            model[at as usize..at as usize + data.len()].copy_from_slice(&data);
            writes += 1;
        }
        false
    });
    assert_eq!(writes, 6, "the guest wrote during the base copy");
    assert!(
        growth.windows(2).all(|w| w[0] <= w[1]) && growth[growth.len() - 1] > growth[0],
        "the checkpoint grew while the bases copied: {growth:?}"
    );
    let j = q.p.until_ended(id);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
    let r = j.report.clone().unwrap();
    assert!(r.downtime_ms > 0, "{r:?}");
    // The ended job keeps its disk bytes: the bases and what was folded.
    let m = j.migration.clone().unwrap();
    assert!(
        m.storage_bytes_copied > 0 && m.storage_bytes_copied == m.storage_bytes_total,
        "{m:?}"
    );
    let text = j.result.clone().unwrap_or_default();
    assert!(
        text.contains("quick:") && text.contains("checkpoint grew"),
        "{text}"
    );
    q.p.rounds(20);
    assert!(q.p.a().vms().is_empty(), "v left a");
    assert_eq!(q.p.b().vm_state("v").as_deref(), Some("running"));
    // b runs on the merged base: what the guest sees, and the file.
    let mut seen = vec![0u8; model.len()];
    q.disk(1, "v").read(0, &mut seen).unwrap();
    same(&seen, &model, "the guest's disk on b");
    assert!(q.files(0).is_empty(), "a keeps {:?}", q.files(0));
    assert_eq!(q.files(1), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
    q.disk(1, "v").flush().unwrap();
    same(&q.file_reads(1, "vms/v/v-0.vhdx"), &model, "b's base file");
    let cfg = std::fs::read_to_string(q.local[1].path().join("vms/v/v.vmcfg")).unwrap();
    assert!(
        cfg.contains("disk.0=dynamic local:vms/v/v-0.vhdx\n"),
        "{cfg}"
    );
    assert!(!cfg.contains("checkpoint"), "{cfg}");
}

#[test]
fn a_link_broken_during_the_base_copy_leaves_the_vm_on_a_and_nothing_on_b() {
    let mut q = Quick::new();
    q.started("v");
    let mut model = vec![0u8; (DISK_MIB * MIB) as usize];
    q.write("v", &mut model, 0, 1, 12 * MIB);
    let id = q.start_quick("v");
    // The base copy is under way: the checkpoint stands, b has a partial
    // file.
    q.p.until(400_000, "the base copy runs", |p| {
        p.n[0]
            .node
            .vms()
            .iter()
            .any(|v| v.name() == "v" && v.disk_meta()[0].checkpoint.is_some())
            && p.a()
                .job(id)
                .migration
                .is_some_and(|m| m.phase == Phase::Copying)
    });
    q.p.rounds(2);
    assert!(
        q.files(1).iter().any(|f| f.contains("partial")),
        "b receives into a partial file: {:?}",
        q.files(1)
    );
    // The guest writes its checkpoint; then the connection breaks.
    q.write("v", &mut model, 13 * MIB, 7, 8192);
    for s in q.p.n[0].net().sockets.values_mut() {
        if s.remote.is_some() && !s.released {
            s.state = TcpState::Closed;
        }
    }
    let j = q.p.until_ended(id);
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    let err = j.error.clone().unwrap_or_default();
    assert!(err.contains("lost"), "{err}");
    q.p.rounds(50);
    // The VM runs on at a, on its base with the checkpoint merged back.
    assert_eq!(q.p.a().vm_state("v").as_deref(), Some("running"));
    let mut seen = vec![0u8; model.len()];
    q.disk(0, "v").read(0, &mut seen).unwrap();
    same(&seen, &model, "the guest's disk on a");
    q.disk(0, "v").flush().unwrap();
    assert_eq!(q.files(0), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
    same(&q.file_reads(0, "vms/v/v-0.vhdx"), &model, "a's base file");
    let cfg = std::fs::read_to_string(q.local[0].path().join("vms/v/v.vmcfg")).unwrap();
    assert!(!cfg.contains("checkpoint"), "{cfg}");
    // Nothing of it on b.
    assert!(q.files(1).is_empty(), "b keeps {:?}", q.files(1));
    assert!(q.p.b().vm_state("v").is_none());
}

#[test]
fn a_link_broken_during_the_memory_copy_resumes_the_vm_on_a_with_its_checkpoint_merged() {
    let mut q = Quick::new();
    q.started("v");
    let mut model = vec![0u8; (DISK_MIB * MIB) as usize];
    q.write("v", &mut model, 0, 1, 12 * MIB);
    let id = q.start_quick("v");
    // The guest writes its checkpoint while the base copies.
    q.p.until(400_000, "the checkpoint stands", |p| {
        p.n[0]
            .node
            .vms()
            .iter()
            .any(|v| v.name() == "v" && v.disk_meta()[0].checkpoint.is_some())
    });
    q.write("v", &mut model, 14 * MIB + 512, 9, 4096);
    // The disks are on b; the memory moves with the VM saved.
    q.p.until_phase(id, Phase::FinalCopy);
    assert!(
        q.files(1).iter().any(|f| f.contains("partial")),
        "{:?}",
        q.files(1)
    );
    for s in q.p.n[0].net().sockets.values_mut() {
        if s.remote.is_some() && !s.released {
            s.state = TcpState::Closed;
        }
    }
    let j = q.p.until_ended(id);
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    q.p.rounds(50);
    assert_eq!(q.p.a().vm_state("v").as_deref(), Some("running"));
    let mut seen = vec![0u8; model.len()];
    q.disk(0, "v").read(0, &mut seen).unwrap();
    same(&seen, &model, "the guest's disk on a");
    q.disk(0, "v").flush().unwrap();
    assert_eq!(q.files(0), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
    same(
        &q.file_reads(0, "vms/v/v-0.vhdx"),
        &model,
        "a's base file, merged",
    );
    assert!(q.files(1).is_empty(), "b keeps {:?}", q.files(1));
    assert!(q.p.b().vm_state("v").is_none());
}

#[test]
fn a_cancel_during_the_base_copy_leaves_the_vm_on_a_with_its_checkpoint_merged() {
    let mut q = Quick::new();
    q.started("v");
    let mut model = vec![0u8; (DISK_MIB * MIB) as usize];
    q.write("v", &mut model, 0, 1, 12 * MIB);
    let id = q.start_quick("v");
    q.p.until(400_000, "the checkpoint stands", |p| {
        p.n[0]
            .node
            .vms()
            .iter()
            .any(|v| v.name() == "v" && v.disk_meta()[0].checkpoint.is_some())
    });
    q.write("v", &mut model, 5 * MIB, 3, 8192);
    q.p.a().ok(Request::JobCancel { id });
    let j = q.p.until_ended(id);
    assert_eq!(j.state, JobState::Cancelled, "{j:?}");
    q.p.rounds(50);
    assert_eq!(q.p.a().vm_state("v").as_deref(), Some("running"));
    let mut seen = vec![0u8; model.len()];
    q.disk(0, "v").read(0, &mut seen).unwrap();
    same(&seen, &model, "the guest's disk on a");
    q.disk(0, "v").flush().unwrap();
    assert_eq!(q.files(0), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
    same(
        &q.file_reads(0, "vms/v/v-0.vhdx"),
        &model,
        "a's base file, merged",
    );
    assert!(q.files(1).is_empty(), "b keeps {:?}", q.files(1));
    // And it can move again afterwards.
    let again = q.start_quick("v");
    let j = q.p.until_ended(again);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
    q.p.rounds(20);
    let mut seen = vec![0u8; model.len()];
    q.disk(1, "v").read(0, &mut seen).unwrap();
    same(&seen, &model, "the guest's disk on b");
}

#[test]
fn an_in_doubt_quick_move_kept_at_the_destination_deletes_the_sources_files() {
    let mut q = Quick::new();
    q.started("v");
    let mut model = vec![0u8; (DISK_MIB * MIB) as usize];
    q.write("v", &mut model, 0, 1, 12 * MIB);
    let req = Mv {
        quick: true,
        resumed_ms: 5000,
        ..Mv::default()
    }
    .req("v");
    let id = q.p.start_move(req);
    q.p.until(400_000, "b resumed", |p| {
        p.b().vm_state("v").as_deref() == Some("running")
    });
    // b runs the VM but holds its `resumed`: the link goes.
    q.p.cut = true;
    q.p.until_phase(id, Phase::InDoubt);
    assert!(
        q.files(0).contains(&"vms/v/v-0.vhdx".to_string()),
        "kept while in doubt"
    );
    q.p.a().ok(Request::JobResolve {
        id,
        keep: Keep::Destination,
    });
    let j = q.p.until_ended(id);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
    q.p.rounds(20);
    assert!(q.p.a().vms().is_empty());
    assert!(q.files(0).is_empty(), "a keeps {:?}", q.files(0));
    let mut seen = vec![0u8; model.len()];
    q.disk(1, "v").read(0, &mut seen).unwrap();
    same(&seen, &model, "the guest's disk on b");
}

#[test]
fn a_disk_copy_past_the_moves_timeout_fails_and_the_vm_stays() {
    let mut q = Quick::new();
    q.started("v");
    let mut model = vec![0u8; (DISK_MIB * MIB) as usize];
    q.write("v", &mut model, 0, 1, 12 * MIB);
    let req = Mv {
        quick: true,
        timeout_s: Some(1),
        ..Mv::default()
    }
    .req("v");
    let id = q.p.start_move(req);
    q.p.until(400_000, "the checkpoint stands", |p| {
        p.n[0]
            .node
            .vms()
            .iter()
            .any(|v| v.name() == "v" && v.disk_meta()[0].checkpoint.is_some())
    });
    // The link goes silent: the copy can no longer end (the 8 s ack
    // stall would come later than the 1 s timeout).
    q.p.cut = true;
    let j = q.p.until_ended(id);
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    let err = j.error.clone().unwrap_or_default();
    assert!(err.contains("did not complete within 1 s"), "{err}");
    assert_eq!(q.p.a().vm_state("v").as_deref(), Some("running"));
    let mut seen = vec![0u8; model.len()];
    q.disk(0, "v").read(0, &mut seen).unwrap();
    same(&seen, &model, "the guest's disk on a");
    assert_eq!(q.files(0), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
}
