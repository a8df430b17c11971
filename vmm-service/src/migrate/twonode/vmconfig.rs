//! VM configuration files across live migration (`crate::vmconfig`):
//! two managed nodes whose stores are the 9P server double over real
//! temporary directories (`shared` the same directory for both). A VM
//! whose disks and file are on the shared store keeps its file and its
//! id on the destination; a VM whose file is on the source's own store
//! leaves it behind (removed) and gets a new one on the destination with
//! the id (and a Linux VM's kernel arguments) the `open` carried.

use super::*;

impl Stored {
    fn vm_files(&mut self, i: usize, vm: &str) -> crate::mgmt::proto::VmFiles {
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

    /// Move `vm` from node `from` to the other one; the source's job.
    fn move_from(&mut self, from: usize, vm: &str) -> JobInfo {
        let to = ["a", "b"][1 - from];
        let req = Mv {
            to: Some(to),
            ..Mv::default()
        }
        .req(vm);
        let id = match self.p.n[from].ok(req) {
            Body::Job(j) => j.id,
            other => panic!("{other:?}"),
        };
        self.p.until(400_000, "the move ends", |p| {
            !matches!(
                p.n[from].job(id).state,
                JobState::Queued | JobState::Running
            )
        });
        self.p.rounds(20);
        self.p.n[from].job(id)
    }

    /// The configuration file of `vm` on node `i`'s own store, parsed.
    fn local_file(&self, i: usize, vm: &str) -> crate::vmconfig::VmConfig {
        let at = self.local[i].path().join(format!("vms/{vm}/{vm}.vmcfg"));
        let text = std::fs::read_to_string(&at).unwrap_or_else(|e| panic!("{at:?}: {e}"));
        crate::vmconfig::VmConfig::parse(text.as_bytes()).unwrap()
    }
}

#[test]
fn a_shared_store_vm_keeps_its_configuration_and_id_across_a_move() {
    let mut s = Stored::new();
    assert!(matches!(
        s.p.a().create_with_disk("s", Some("shared")),
        Outcome::Ok(_)
    ));
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
    let on_a = s.vm_files(0, "s");
    assert_eq!(on_a.config.as_deref(), Some("shared:vms/s/s.vmcfg"));
    assert!(!s.local[0].path().join("vms/s/s.vmcfg").exists());
    s.p.a().ok(Request::VmStart { name: "s".into() });
    s.p.rounds(50);

    s.moved("s");
    assert_eq!(s.vm_files(1, "s"), on_a, "the same file and id on b");
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
    let on_a = s.vm_files(0, "v");
    assert_eq!(on_a.config.as_deref(), Some("local:vms/v/v.vmcfg"));
    assert!(s.local[0].path().join("vms/v/v.vmcfg").exists());
    s.moved("v");
    assert!(
        !s.local[0].path().join("vms/v/v.vmcfg").exists(),
        "a's file went with the VM"
    );
    let on_b = s.vm_files(1, "v");
    assert_eq!(on_b.config.as_deref(), Some("local:vms/v/v.vmcfg"));
    assert_eq!(on_b.vm_id, on_a.vm_id, "the open carried the id");
    let text = std::fs::read_to_string(s.local[1].path().join("vms/v/v.vmcfg")).unwrap();
    let cfg = crate::vmconfig::VmConfig::parse(text.as_bytes()).unwrap();
    assert_eq!((cfg.name.as_str(), cfg.memory_mib), ("v", 4));
    assert_eq!(cfg.id.to_string(), on_b.vm_id);
}

/// A Linux VM (the node's image, kernel arguments given at creation)
/// moved a -> b -> a over nodes that share no file: each destination's
/// file has the VM's id and its `append`, each source's file is removed.
#[test]
fn a_linux_vm_keeps_its_id_and_kernel_arguments_across_a_to_b_to_a() {
    use crate::loader::bzimage::test_image;
    use crate::mgmt::proto::LinuxBoot;
    use crate::vmconfig::Boot;
    let mut s = Stored::new();
    for n in &mut s.p.n {
        n.host.more_modules = vec![test_image(b"\xf4"), b"initramfs".to_vec()];
    }
    let append = "hvmigrate.ticks=1 quiet";
    s.p.a().ok(Request::VmCreate {
        name: "lx".into(),
        memory_mib: 64,
        guest: None,
        linux: Some(LinuxBoot {
            append: append.into(),
        }),
    });
    s.p.a().ok(Request::VmStart { name: "lx".into() });
    s.p.rounds(50);
    let id = s.vm_files(0, "lx").vm_id;
    let linux = Boot::Linux {
        append: append.into(),
    };
    assert_eq!(s.local_file(0, "lx").boot, linux);

    for (from, to) in [(0, 1), (1, 0)] {
        let j = s.move_from(from, "lx");
        assert_eq!(j.state, JobState::Completed, "{j:?}");
        assert!(s.p.n[from].vms().iter().all(|v| v.name != "lx"));
        assert!(
            !s.local[from].path().join("vms/lx/lx.vmcfg").exists(),
            "the source's file went with the VM"
        );
        let on = s.vm_files(to, "lx");
        assert_eq!(
            (on.vm_id.as_str(), on.config.as_deref()),
            (id.as_str(), Some("local:vms/lx/lx.vmcfg"))
        );
        let cfg = s.local_file(to, "lx");
        assert_eq!((cfg.id.to_string(), &cfg.boot), (id.clone(), &linux));
        assert_eq!(s.p.n[to].vm_state("lx").as_deref(), Some("running"));
    }
}

/// A VM whose id is already a VM's on the destination (under another
/// name) is refused before anything moves, naming that VM; it runs on.
#[test]
fn a_vm_whose_id_is_taken_on_the_destination_is_refused() {
    let mut s = Stored::new();
    s.p.started("v");
    s.p.b().ok(Request::VmCreate {
        name: "w".into(),
        memory_mib: 4,
        guest: None,
        linux: None,
    });
    let id = s.vm_files(0, "v").vm_id;
    let vm_id = crate::vmconfig::VmId::parse(&id).unwrap();
    let w = s.p.n[1]
        .node
        .vms_mut()
        .iter_mut()
        .find(|v| v.name() == "w")
        .unwrap();
    w.placement_mut().unwrap().id = vm_id;
    let j = s.move_from(0, "v");
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    let e = j.error.unwrap_or_default();
    assert!(
        e.contains(&format!("VM w on node b has the id {id}")),
        "{e}"
    );
    assert_eq!(s.p.a().vm_state("v").as_deref(), Some("running"));
    assert_eq!(s.vm_files(0, "v").vm_id, id);
    assert!(s.p.b().vms().iter().all(|v| v.name != "v"));
}

/// An `open` from a source that predates `vm_id` and `append` still
/// parses (both `None`: the destination draws a new id), and a source
/// without them sends neither key.
#[test]
fn an_open_without_the_carried_fields_parses() {
    use super::super::channel::{Control, Open};
    let old = r#"{"open":{"id":"00","vm":"v","guest":"hello","config":{"ram_bytes":4194304,"vcpus":1,"devices":[],"cpuid":[]},"encrypt":false,"verify":true}}"#;
    let Control::Open(open) = serde_json::from_str::<Control>(old).unwrap() else {
        panic!("not an open")
    };
    assert_eq!(
        (open.vm_id.as_deref(), open.append.as_deref()),
        (None, None)
    );
    let text = serde_json::to_string(&Control::Open(Open {
        vm_id: None,
        append: None,
        ..open.clone()
    }))
    .unwrap();
    assert!(
        !text.contains("vm_id") && !text.contains("append"),
        "{text}"
    );
    let with = Open {
        vm_id: Some("5f0c1a9e-3b27-4d6e-8a41-0c9d2e7b6f13".into()),
        append: Some("quiet".into()),
        ..open
    };
    let back: Control =
        serde_json::from_str(&serde_json::to_string(&Control::Open(with.clone())).unwrap())
            .unwrap();
    assert_eq!(back, Control::Open(with));
}
