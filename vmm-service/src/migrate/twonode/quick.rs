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

const MIB: u64 = 1 << 20;
const DISK_MIB: u64 = 16;

/// The checkpoint of VM `vm`'s first disk on node `i` stands.
fn has_checkpoint(p: &mut Pair, i: usize, vm: &str) -> bool {
    p.n[i]
        .node
        .vms()
        .iter()
        .any(|v| v.name() == vm && v.disk_meta()[0].checkpoint.is_some())
}

fn start_quick(q: &mut Stored, vm: &str) -> u64 {
    let req = Mv {
        quick: true,
        ..Mv::default()
    }
    .req(vm);
    q.p.start_move(req)
}

#[test]
fn a_quick_move_brings_the_disk_with_every_write_and_leaves_nothing_on_a() {
    let mut q = Stored::new();
    q.started("v", Some("local"), DISK_MIB);
    // 12 MiB of data: the base copy spans several rounds (the remote
    // target's window is 2 MiB).
    q.write(0, "v", 0, &pattern(8 * MIB, 1));
    q.write(0, "v", 10 * MIB + 4096, &pattern(4 * MIB, 2));
    assert_eq!(q.files(0), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
    let id = start_quick(&mut q, "v");
    // Until the guest is saved it writes (the checkpoint takes it): over
    // the base's data, into holes, zeros over data.
    let model = q.images.get_mut("v").unwrap();
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
    q.check_disk(1, "v");
    assert!(q.files(0).is_empty(), "a keeps {:?}", q.files(0));
    assert_eq!(q.files(1), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
    q.disk(1, "v").flush().unwrap();
    q.check_file(1, "vms/v/v-0.vhdx", "v");
    let cfg = std::fs::read_to_string(q.local[1].path().join("vms/v/v.vmcfg")).unwrap();
    assert!(
        cfg.contains("disk.0=dynamic local:vms/v/v-0.vhdx\n"),
        "{cfg}"
    );
    assert!(!cfg.contains("checkpoint"), "{cfg}");
}

#[test]
fn a_link_broken_during_the_base_copy_leaves_the_vm_on_a_and_nothing_on_b() {
    let mut q = Stored::new();
    q.started("v", Some("local"), DISK_MIB);
    q.write(0, "v", 0, &pattern(12 * MIB, 1));
    let id = start_quick(&mut q, "v");
    // The base copy is under way: the checkpoint stands, b has a partial
    // file.
    q.p.until(400_000, "the base copy runs", |p| {
        has_checkpoint(p, 0, "v")
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
    q.write(0, "v", 13 * MIB, &pattern(8192, 7));
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
    q.check_disk(0, "v");
    q.disk(0, "v").flush().unwrap();
    assert_eq!(q.files(0), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
    q.check_file(0, "vms/v/v-0.vhdx", "v");
    let cfg = std::fs::read_to_string(q.local[0].path().join("vms/v/v.vmcfg")).unwrap();
    assert!(!cfg.contains("checkpoint"), "{cfg}");
    // Nothing of it on b.
    assert!(q.files(1).is_empty(), "b keeps {:?}", q.files(1));
    assert!(q.p.b().vm_state("v").is_none());
}

#[test]
fn a_link_broken_during_the_memory_copy_resumes_the_vm_on_a_with_its_checkpoint_merged() {
    let mut q = Stored::new();
    q.started("v", Some("local"), DISK_MIB);
    q.write(0, "v", 0, &pattern(12 * MIB, 1));
    let id = start_quick(&mut q, "v");
    // The guest writes its checkpoint while the base copies.
    q.p.until(400_000, "the checkpoint stands", |p| {
        has_checkpoint(p, 0, "v")
    });
    q.write(0, "v", 14 * MIB + 512, &pattern(4096, 9));
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
    q.check_disk(0, "v");
    q.disk(0, "v").flush().unwrap();
    assert_eq!(q.files(0), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
    q.check_file(0, "vms/v/v-0.vhdx", "v");
    assert!(q.files(1).is_empty(), "b keeps {:?}", q.files(1));
    assert!(q.p.b().vm_state("v").is_none());
}

#[test]
fn a_cancel_during_the_base_copy_leaves_the_vm_on_a_with_its_checkpoint_merged() {
    let mut q = Stored::new();
    q.started("v", Some("local"), DISK_MIB);
    q.write(0, "v", 0, &pattern(12 * MIB, 1));
    let id = start_quick(&mut q, "v");
    q.p.until(400_000, "the checkpoint stands", |p| {
        has_checkpoint(p, 0, "v")
    });
    q.write(0, "v", 5 * MIB, &pattern(8192, 3));
    q.p.a().ok(Request::JobCancel { id });
    let j = q.p.until_ended(id);
    assert_eq!(j.state, JobState::Cancelled, "{j:?}");
    q.p.rounds(50);
    assert_eq!(q.p.a().vm_state("v").as_deref(), Some("running"));
    q.check_disk(0, "v");
    q.disk(0, "v").flush().unwrap();
    assert_eq!(q.files(0), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
    q.check_file(0, "vms/v/v-0.vhdx", "v");
    assert!(q.files(1).is_empty(), "b keeps {:?}", q.files(1));
    // And it can move again afterwards.
    let again = start_quick(&mut q, "v");
    let j = q.p.until_ended(again);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
    q.p.rounds(20);
    q.check_disk(1, "v");
}

#[test]
fn an_in_doubt_quick_move_kept_at_the_destination_deletes_the_sources_files() {
    let mut q = Stored::new();
    q.started("v", Some("local"), DISK_MIB);
    q.write(0, "v", 0, &pattern(12 * MIB, 1));
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
    q.check_disk(1, "v");
}

#[test]
fn a_disk_copy_past_the_moves_timeout_fails_and_the_vm_stays() {
    let mut q = Stored::new();
    q.started("v", Some("local"), DISK_MIB);
    q.write(0, "v", 0, &pattern(12 * MIB, 1));
    let req = Mv {
        quick: true,
        timeout_s: Some(1),
        ..Mv::default()
    }
    .req("v");
    let id = q.p.start_move(req);
    q.p.until(400_000, "the checkpoint stands", |p| {
        has_checkpoint(p, 0, "v")
    });
    // The link goes silent: the copy can no longer end (the 8 s ack
    // stall would come later than the 1 s timeout).
    q.p.cut = true;
    let j = q.p.until_ended(id);
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    let err = j.error.clone().unwrap_or_default();
    assert!(err.contains("did not complete within 1 s"), "{err}");
    assert_eq!(q.p.a().vm_state("v").as_deref(), Some("running"));
    q.check_disk(0, "v");
    assert_eq!(q.files(0), ["vms/v/v-0.vhdx", "vms/v/v.vmcfg"]);
}
