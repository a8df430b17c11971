//! VM configuration files across live migration (`crate::vmconfig`):
//! two managed nodes whose stores are the 9P server double over real
//! temporary directories (`shared` the same directory for both). A VM
//! whose disks and file are on the shared store keeps its file and its
//! id on the destination; a VM whose file is on the source's own store
//! leaves it behind (removed) and gets a new one on the destination.

use super::*;
use crate::lease::Timing;
use crate::store::testing::DirChannel;
use crate::store::{parse_specs, Stores};
use hvcore::host::StoreChannel;

struct Stored {
    p: Pair,
    shared: tempfile::TempDir,
    local: [tempfile::TempDir; 2],
}

impl Stored {
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
            let node = &mut p.n[i];
            node.node.set_stores(Stores::attach(channels, &specs, name));
            // Short lease times, as in shared.rs.
            node.node.set_lease_timing(Timing {
                renew_ms: 10,
                expire_ms: 100,
                settle_ms: 30,
                margin_ms: 10,
            });
        }
        Stored { p, shared, local }
    }

    fn files(&mut self, i: usize, vm: &str) -> crate::mgmt::proto::VmFiles {
        let v = self.p.n[i]
            .vms()
            .into_iter()
            .find(|v| v.name == vm)
            .unwrap_or_else(|| panic!("no VM {vm} on node {i}"));
        *v.files
            .expect("a node with stores keeps a configuration file")
    }

    fn moved(&mut self, vm: &str) {
        let id = self.p.start_move(Pair::move_req(vm));
        let j = self.p.until_ended(id);
        assert_eq!(j.state, JobState::Completed, "{j:?}");
        self.p.rounds(20);
        assert!(self.p.a().vms().iter().all(|v| v.name != vm));
    }
}

#[test]
fn a_shared_store_vm_keeps_its_configuration_and_id_across_a_move() {
    let mut s = Stored::new();
    s.p.a().ok(Request::VmCreate {
        name: "s".into(),
        memory_mib: 4,
        guest: None,
        linux: None,
    });
    s.p.a().ok(Request::VmDiskCreate {
        name: "s".into(),
        size_mib: 4,
        store: Some("shared".into()),
        fixed: None,
    });
    let job = match s.p.a().ok(Request::VmMoveStorage {
        name: "s".into(),
        to: None,
        vhd: Vec::new(),
        config: Some("shared".into()),
        snapshots: None,
        keep_source: None,
        bandwidth_mib_s: None,
    }) {
        Body::Job(j) => j.id,
        other => panic!("{other:?}"),
    };
    s.p.until(1000, "the config move", |p| {
        p.a().job(job).state == JobState::Completed
    });
    let on_a = s.files(0, "s");
    assert_eq!(on_a.config.as_deref(), Some("shared:vms/s/s.vmcfg"));
    assert!(!s.local[0].path().join("vms/s/s.vmcfg").exists());
    s.p.a().ok(Request::VmStart { name: "s".into() });
    s.p.rounds(50);

    s.moved("s");
    assert_eq!(s.files(1, "s"), on_a, "the same file and id on b");
    let text = std::fs::read_to_string(s.shared.path().join("vms/s/s.vmcfg")).unwrap();
    let cfg = crate::vmconfig::VmConfig::parse(text.as_bytes()).unwrap();
    assert_eq!(cfg.id.to_string(), on_a.vm_id);
    assert_eq!(cfg.disks[0].location, "shared:vms/s/s-0.vhdx");
    assert!(!s.local[1].path().join("vms/s/s.vmcfg").exists());
    assert!(s
        .p
        .b()
        .host
        .console
        .contains("its configuration shared:vms/s/s.vmcfg"));
}

#[test]
fn a_vm_whose_file_is_on_the_sources_store_gets_a_new_one_there() {
    let mut s = Stored::new();
    s.p.started("v");
    let on_a = s.files(0, "v");
    assert_eq!(on_a.config.as_deref(), Some("local:vms/v/v.vmcfg"));
    assert!(s.local[0].path().join("vms/v/v.vmcfg").exists());
    s.moved("v");
    assert!(
        !s.local[0].path().join("vms/v/v.vmcfg").exists(),
        "a's file went with the VM"
    );
    let on_b = s.files(1, "v");
    assert_eq!(on_b.config.as_deref(), Some("local:vms/v/v.vmcfg"));
    assert_ne!(
        on_b.vm_id, on_a.vm_id,
        "the stream does not carry the id yet"
    );
    let text = std::fs::read_to_string(s.local[1].path().join("vms/v/v.vmcfg")).unwrap();
    let cfg = crate::vmconfig::VmConfig::parse(text.as_bytes()).unwrap();
    assert_eq!((cfg.name.as_str(), cfg.memory_mib), ("v", 4));
    assert_eq!(cfg.id.to_string(), on_b.vm_id);
}
