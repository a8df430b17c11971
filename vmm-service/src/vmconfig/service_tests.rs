//! VM configuration files through the managed node's handlers, over
//! files in memory (`MemFiles`, the stores' double): written at create,
//! rewritten on every change, moved by `vm-move-storage` only when
//! named (or with `to`), deleted with the VM (its disks kept), a rewrite
//! during a disk's move that leaves a whole configuration at every
//! instant, and `vm-import` on a second node that shares the store.

use super::*;
use crate::mgmt::rig::Rig;
use crate::storage_migration::testing::MemFiles;
use alloc::boxed::Box;
use alloc::rc::Rc;
use core::cell::RefCell;
use hvmgmt::proto::{Body, ErrorCode, JobState, Outcome, Request, VmInfo};
use vstorage::vhdx::{OpenOptions, Vhdx};
use vstorage::{BlockIo, MemIo, VirtualDisk};

fn node(files: &MemFiles) -> Rig {
    let mut r = Rig::new();
    r.node.set_file_store(Box::new(files.clone()));
    r
}

fn call(r: &mut Rig, req: Request) -> Outcome {
    r.node.handle(&mut r.host, req)
}

fn code(o: &Outcome) -> Option<ErrorCode> {
    match o {
        Outcome::Error(e) => Some(e.code),
        Outcome::Ok(_) => None,
    }
}

fn message(o: &Outcome) -> String {
    match o {
        Outcome::Error(e) => e.message.clone(),
        Outcome::Ok(b) => panic!("accepted: {b:?}"),
    }
}

fn vm_info(o: Outcome) -> VmInfo {
    match o {
        Outcome::Ok(Body::Vm(v)) => v,
        o => panic!("{o:?}"),
    }
}

fn create(r: &mut Rig, name: &str) -> VmInfo {
    vm_info(call(
        r,
        Request::VmCreate {
            name: name.into(),
            memory_mib: 8,
            guest: Some("disk-verify".into()),
            linux: None,
        },
    ))
}

fn add_disk(r: &mut Rig, name: &str, store: Option<&str>, fixed: bool) {
    let o = call(
        r,
        Request::VmDiskCreate {
            name: name.into(),
            size_mib: 4,
            store: store.map(Into::into),
            fixed: Some(fixed),
        },
    );
    assert!(matches!(o, Outcome::Ok(Body::Disks { .. })), "{o:?}");
}

fn move_storage(
    r: &mut Rig,
    to: Option<&str>,
    config: Option<&str>,
    snapshots: Option<&str>,
    keep_source: bool,
) -> Outcome {
    call(
        r,
        Request::VmMoveStorage {
            name: "d".into(),
            to: to.map(Into::into),
            vhd: Vec::new(),
            config: config.map(Into::into),
            snapshots: snapshots.map(Into::into),
            keep_source: keep_source.then_some(true),
            bandwidth_mib_s: None,
        },
    )
}

/// A move of VM d, run to its end; the job's summary.
fn moved(
    r: &mut Rig,
    to: Option<&str>,
    config: Option<&str>,
    snapshots: Option<&str>,
    keep_source: bool,
) -> String {
    let o = move_storage(r, to, config, snapshots, keep_source);
    let Outcome::Ok(Body::Job(j)) = o else {
        panic!("{o:?}")
    };
    for _ in 0..100 {
        r.node.drive_jobs(&mut r.host);
        let Outcome::Ok(Body::Job(now)) = call(r, Request::JobShow { id: j.id }) else {
            panic!()
        };
        if now.state.is_final() {
            assert_eq!(now.state, JobState::Completed, "{now:?}");
            return now.result.unwrap_or_default();
        }
    }
    panic!("job {} did not end", j.id)
}

/// (config, snapshots) as `vm-disk-list` shows them.
fn placed(r: &mut Rig, name: &str) -> (Option<String>, Option<String>) {
    match call(r, Request::VmDiskList { name: name.into() }) {
        Outcome::Ok(Body::Disks {
            config, snapshots, ..
        }) => (config, snapshots),
        o => panic!("{o:?}"),
    }
}

fn disk_locations(cfg: &VmConfig) -> Vec<&str> {
    cfg.disks.iter().map(|d| d.location.as_str()).collect()
}

#[test]
fn the_configuration_is_written_at_create_and_rewritten_with_each_disk() {
    let files = MemFiles::new(64 << 20);
    let mut r = node(&files);
    let v = create(&mut r, "d");
    let f = v
        .files
        .expect("a node with stores keeps a configuration file");
    assert_eq!(f.config.as_deref(), Some("local:vms/d/d.vmcfg"));
    assert_eq!(f.snapshots, "local:vms/d/snapshots");
    let cfg = read(&files, "local:vms/d/d.vmcfg").unwrap();
    assert_eq!(
        (cfg.name.as_str(), cfg.memory_mib, &cfg.boot),
        ("d", 8, &Boot::Guest("disk-verify".into()))
    );
    assert_eq!(cfg.id.to_string(), f.vm_id);
    assert!(cfg.disks.is_empty());
    add_disk(&mut r, "d", None, false);
    // (A disk made on the shared store takes the VM's lease, which the
    // stores' double does not serve: both on `local` here.)
    add_disk(&mut r, "d", Some("local"), true);
    let cfg = read(&files, "local:vms/d/d.vmcfg").unwrap();
    assert_eq!(
        cfg.disks,
        [
            DiskEntry {
                fixed: false,
                location: "local:vms/d/d-0.vhdx".into(),
                checkpoint: None
            },
            DiskEntry {
                fixed: true,
                location: "local:vms/d/d-1.vhdx".into(),
                checkpoint: None
            }
        ]
    );
    assert_eq!(
        placed(&mut r, "d"),
        (
            Some("local:vms/d/d.vmcfg".into()),
            Some("local:vms/d/snapshots".into())
        )
    );
    // Another VM gets another identity.
    let e = create(&mut r, "e").files.unwrap();
    assert_ne!(e.vm_id, f.vm_id);
    // Deleted like Hyper-V's Remove-VM: the configuration goes, the
    // disks stay.
    assert_eq!(
        call(&mut r, Request::VmDelete { name: "d".into() }),
        Outcome::Ok(Body::Done)
    );
    assert_eq!(
        files.names(),
        [
            "local:vms/d/d-0.vhdx",
            "local:vms/d/d-1.vhdx",
            "local:vms/e/e.vmcfg"
        ]
    );
    // A configuration file already where a new VM's would go is never
    // replaced: it may be a VM to import.
    write(&files, "local:vms/x/x.vmcfg", &{
        let mut c = cfg.clone();
        c.name = "x".into();
        c
    })
    .unwrap();
    let o = call(
        &mut r,
        Request::VmCreate {
            name: "x".into(),
            memory_mib: 8,
            guest: None,
            linux: None,
        },
    );
    assert_eq!(code(&o), Some(ErrorCode::AlreadyExists));
    assert!(
        message(&o).contains("vm import local:vms/x/x.vmcfg"),
        "{o:?}"
    );
    assert_eq!(r.node.vm_count(), 1);
}

#[test]
fn a_node_without_stores_keeps_configurations_in_memory() {
    let mut r = Rig::new();
    let v = create(&mut r, "d");
    assert_eq!(v.files, None);
    assert_eq!(placed(&mut r, "d"), (None, None));
    let o = move_storage(&mut r, None, Some("shared"), None, false);
    assert_eq!(code(&o), Some(ErrorCode::Unsupported));
    assert!(message(&o).contains("in memory"), "{o:?}");
    let o = call(
        &mut r,
        Request::VmImport {
            path: "shared:vms/d/d.vmcfg".into(),
        },
    );
    assert_eq!(code(&o), Some(ErrorCode::Unsupported));
}

#[test]
fn config_and_snapshots_move_only_when_named() {
    let files = MemFiles::new(64 << 20);
    let mut r = node(&files);
    create(&mut r, "d");
    add_disk(&mut r, "d", None, false);
    let id = read(&files, "local:vms/d/d.vmcfg").unwrap().id;

    // --config alone: the file moves, the disk and the snapshot location
    // stay.
    let summary = moved(&mut r, None, Some("shared:cfg"), None, false);
    assert_eq!(
        summary,
        "moved config local:vms/d/d.vmcfg -> shared:cfg/d.vmcfg"
    );
    assert_eq!(
        files.names(),
        ["local:vms/d/d-0.vhdx", "shared:cfg/d.vmcfg"]
    );
    let cfg = read(&files, "shared:cfg/d.vmcfg").unwrap();
    assert_eq!(disk_locations(&cfg), ["local:vms/d/d-0.vhdx"]);
    assert_eq!(
        (cfg.id, cfg.snapshots.as_str()),
        (id, "local:vms/d/snapshots")
    );

    // --snapshots alone: recorded in the file where it is.
    let summary = moved(&mut r, None, None, Some("shared:snaps"), false);
    assert_eq!(
        summary,
        "moved snapshots local:vms/d/snapshots -> shared:snaps"
    );
    assert_eq!(
        files.names(),
        ["local:vms/d/d-0.vhdx", "shared:cfg/d.vmcfg"]
    );
    let cfg = read(&files, "shared:cfg/d.vmcfg").unwrap();
    assert_eq!(cfg.snapshots, "shared:snaps");
    assert_eq!(disk_locations(&cfg), ["local:vms/d/d-0.vhdx"]);
    assert_eq!(
        placed(&mut r, "d"),
        (
            Some("shared:cfg/d.vmcfg".into()),
            Some("shared:snaps".into())
        )
    );

    // Already there, or a store the node lacks: refused, nothing moves.
    for (config, snapshots) in [
        (Some("shared:cfg"), None),
        (None, Some("shared:snaps")),
        (Some("nowhere:cfg"), None),
        (None, Some("shared:")),
        (Some("shared:a/../b"), None),
    ] {
        let o = move_storage(&mut r, None, config, snapshots, false);
        assert_eq!(
            code(&o),
            Some(ErrorCode::InvalidArgument),
            "{config:?} {snapshots:?}: {o:?}"
        );
    }

    // --to: everything, into one directory.
    let summary = moved(&mut r, Some("local:final"), None, None, false);
    assert_eq!(
        summary,
        "moved local:vms/d/d-0.vhdx -> local:final/d-0.vhdx, snapshots shared:snaps -> local:final/snapshots, config shared:cfg/d.vmcfg -> local:final/d.vmcfg"
    );
    assert_eq!(
        files.names(),
        ["local:final/d-0.vhdx", "local:final/d.vmcfg"]
    );
    let cfg = read(&files, "local:final/d.vmcfg").unwrap();
    assert_eq!(disk_locations(&cfg), ["local:final/d-0.vhdx"]);
    assert_eq!(
        (cfg.id, cfg.snapshots.as_str()),
        (id, "local:final/snapshots")
    );

    // --keep-source keeps the old file; a file in the way is refused
    // before anything moves.
    moved(&mut r, None, Some("shared:kept"), None, true);
    assert_eq!(
        files.names(),
        [
            "local:final/d-0.vhdx",
            "local:final/d.vmcfg",
            "shared:kept/d.vmcfg"
        ]
    );
    let o = move_storage(&mut r, None, Some("local:final"), None, false);
    assert_eq!(code(&o), Some(ErrorCode::InvalidArgument));
    assert!(message(&o).contains("local:final/d.vmcfg exists"), "{o:?}");
    assert_eq!(
        placed(&mut r, "d").0.as_deref(),
        Some("shared:kept/d.vmcfg")
    );
}

/// The stores' double, checked after every change to a file: at every
/// instant a node could stop, the VM's configuration file (one of its
/// places) parses and names disks whose files are whole VHDXs.
struct Watched {
    inner: MemFiles,
    /// The disk lists of the configurations seen, in order, deduplicated.
    seen: Rc<RefCell<Vec<Vec<String>>>>,
}

impl Watched {
    fn check(&self) {
        let names = self.inner.names();
        let configs: Vec<&String> = names.iter().filter(|n| n.ends_with(".vmcfg")).collect();
        assert!(!configs.is_empty(), "no configuration among {names:?}");
        for at in configs {
            let cfg = read(&self.inner, at).unwrap();
            for d in &cfg.disks {
                let bytes = self.inner.bytes(&d.location);
                let mut disk = Vhdx::open(MemIo::from_vec(bytes), OpenOptions::read_only())
                    .unwrap_or_else(|e| panic!("{at} names {}: {e}", d.location));
                disk.verify().unwrap();
                assert_eq!(disk.virtual_size(), 4 << 20);
            }
            let list: Vec<String> = cfg.disks.iter().map(|d| d.location.clone()).collect();
            let mut seen = self.seen.borrow_mut();
            if seen.last() != Some(&list) {
                seen.push(list);
            }
        }
    }
}

impl FileStore for Watched {
    fn has_store(&self, store: &str) -> bool {
        self.inner.has_store(store)
    }
    fn default_store(&self) -> Option<String> {
        self.inner.default_store()
    }
    fn create_partial(&self, to: &str) -> Result<Box<dyn BlockIo>, String> {
        self.inner.create_partial(to)
    }
    fn replace_partial(&self, to: &str) -> Result<Box<dyn BlockIo>, String> {
        self.inner.replace_partial(to)
    }
    fn commit_partial(&self, to: &str) -> Result<(), String> {
        let r = self.inner.commit_partial(to);
        self.check();
        r
    }
    fn remove_partial(&self, to: &str) {
        self.inner.remove_partial(to)
    }
    fn remove(&self, at: &str) -> Result<(), String> {
        let r = self.inner.remove(at);
        self.check();
        r
    }
    fn file_bytes(&self, at: &str) -> Option<u64> {
        self.inner.file_bytes(at)
    }
    fn read(&self, at: &str, max_bytes: usize) -> Result<Vec<u8>, String> {
        self.inner.read(at, max_bytes)
    }
    fn open(&self, at: &str) -> Result<Box<dyn BlockIo>, String> {
        self.inner.open(at)
    }
}

#[test]
fn a_disk_move_leaves_a_whole_configuration_at_every_instant() {
    let files = MemFiles::new(64 << 20);
    let mut r = node(&files);
    create(&mut r, "d");
    add_disk(&mut r, "d", None, false);
    add_disk(&mut r, "d", None, false);
    // Data in the disks, so the copy has something to do.
    for slot in 0..2u8 {
        let disk = r.node.vms_mut()[0].disk_mut(slot).unwrap();
        disk.write(512 * 1024, &[0x5a + slot; 8192]).unwrap();
        disk.flush().unwrap();
    }
    let seen = Rc::new(RefCell::new(Vec::new()));
    r.node.set_file_store(Box::new(Watched {
        inner: files.clone(),
        seen: seen.clone(),
    }));
    moved(&mut r, Some("shared"), None, None, false);
    // Disk by disk, each named in the configuration only once whole,
    // then the configuration itself moved.
    assert_eq!(
        *seen.borrow(),
        [
            vec!["local:vms/d/d-0.vhdx", "local:vms/d/d-1.vhdx"],
            vec!["shared:vms/d/d-0.vhdx", "local:vms/d/d-1.vhdx"],
            vec!["shared:vms/d/d-0.vhdx", "shared:vms/d/d-1.vhdx"],
        ]
    );
    assert_eq!(
        files.names(),
        [
            "shared:vms/d/d-0.vhdx",
            "shared:vms/d/d-1.vhdx",
            "shared:vms/d/d.vmcfg"
        ]
    );
    let disk = r.node.vms_mut()[0].disk_mut(1).unwrap();
    let mut b = [0u8; 8192];
    disk.read(512 * 1024, &mut b).unwrap();
    assert_eq!(b, [0x5b; 8192]);
}

#[test]
fn import_registers_a_vm_from_its_file_on_a_store_both_nodes_see() {
    let files = MemFiles::new(64 << 20);
    let mut a = node(&files);
    create(&mut a, "d");
    add_disk(&mut a, "d", None, false);
    moved(&mut a, None, Some("shared:cfg"), None, false);
    {
        let disk = a.node.vms_mut()[0].disk_mut(0).unwrap();
        disk.write(4096, &[0xc3; 4096]).unwrap();
        disk.flush().unwrap();
    }
    let on_a = vm_info(call(&mut a, Request::VmList).pipe_first());
    let path = "shared:cfg/d.vmcfg";
    assert_eq!(
        code(&call(&mut a, Request::VmImport { path: path.into() })),
        Some(ErrorCode::AlreadyExists),
        "registered here already"
    );

    // Node b sees the same files (the double stands for a store both
    // nodes see; the lease of a disk on `shared` is lease/vms.rs's, tested
    // there and in the cluster test).
    let mut b = node(&files);
    let v = vm_info(call(&mut b, Request::VmImport { path: path.into() }));
    assert_eq!(
        (v.name.as_str(), v.state.as_str(), v.memory_mib),
        ("d", "created", 8)
    );
    assert_eq!(v.guest, "disk-verify");
    assert_eq!(v.files, on_a.files, "same identity, same file");
    assert!(b
        .host
        .console
        .contains("VM d imported from shared:cfg/d.vmcfg"));
    match call(&mut b, Request::VmDiskList { name: "d".into() }) {
        Outcome::Ok(Body::Disks { disks, config, .. }) => {
            assert_eq!(disks.len(), 1);
            assert_eq!(disks[0].location, "local:vms/d/d-0.vhdx");
            assert_eq!(
                (disks[0].kind.as_str(), disks[0].virtual_bytes),
                ("dynamic", 4 << 20)
            );
            assert_eq!(config.as_deref(), Some(path));
        }
        o => panic!("{o:?}"),
    }
    // The disk is the one a's VM wrote.
    let mut got = [0u8; 4096];
    b.node.vms_mut()[0]
        .disk_mut(0)
        .unwrap()
        .read(4096, &mut got)
        .unwrap();
    assert_eq!(got, [0xc3; 4096]);
    // Twice: refused; the file is untouched.
    let before = files.bytes(path);
    let o = call(&mut b, Request::VmImport { path: path.into() });
    assert_eq!(code(&o), Some(ErrorCode::AlreadyExists));
    assert!(
        message(&o).contains("registered on this node already"),
        "{o:?}"
    );
    assert_eq!(files.bytes(path), before);
    assert_eq!(b.node.vm_count(), 1);

    // Refusals on a third node: no file, a bad file, a missing disk.
    let mut c = node(&files);
    let o = call(
        &mut c,
        Request::VmImport {
            path: "shared:cfg/none.vmcfg".into(),
        },
    );
    assert_eq!(code(&o), Some(ErrorCode::NotFound));
    for (at, text) in [
        ("shared:bad/v2.vmcfg", "hvmigrate-vm 2\nname=d\n"),
        (
            "shared:bad/junk.vmcfg",
            "hvmigrate-vm 1\nname=d\ncolour=blue\n",
        ),
    ] {
        let mut f = files.create_partial(at).unwrap();
        f.write_at(0, text.as_bytes()).unwrap();
        files.commit_partial(at).unwrap();
        let o = call(&mut c, Request::VmImport { path: at.into() });
        assert_eq!(code(&o), Some(ErrorCode::InvalidArgument), "{at}");
        assert!(
            message(&o).contains("not supported")
                || message(&o).contains("line 3: unknown key 'colour'"),
            "{o:?}"
        );
    }
    let big = "shared:bad/big.vmcfg";
    let mut f = files.create_partial(big).unwrap();
    f.write_at(0, &[b'#'; FILE_MAX + 1]).unwrap();
    files.commit_partial(big).unwrap();
    let o = call(&mut c, Request::VmImport { path: big.into() });
    assert_eq!(code(&o), Some(ErrorCode::InvalidArgument));
    assert!(
        message(&o).contains("at most 4096 bytes; this one has 4097"),
        "{o:?}"
    );
    let mut lost = read(&files, path).unwrap();
    lost.name = "lost".into();
    lost.id = VmId([7; 16]);
    lost.disks[0].location = "local:vms/lost/lost-0.vhdx".into();
    write(&files, "shared:cfg/lost.vmcfg", &lost).unwrap();
    let o = call(
        &mut c,
        Request::VmImport {
            path: "shared:cfg/lost.vmcfg".into(),
        },
    );
    assert_eq!(code(&o), Some(ErrorCode::NotFound));
    assert!(message(&o).contains("disk 0 is missing"), "{o:?}");
    for bad in ["shared", "shared:", "nowhere:x.vmcfg", "shared:../x.vmcfg"] {
        let o = call(&mut c, Request::VmImport { path: bad.into() });
        assert_eq!(code(&o), Some(ErrorCode::InvalidArgument), "{bad}: {o:?}");
    }
    assert_eq!(c.node.vm_count(), 0);
}

/// The first VM of a `vm-list` reply as a single `vm` reply.
trait PipeFirst {
    fn pipe_first(self) -> Outcome;
}

impl PipeFirst for Outcome {
    fn pipe_first(self) -> Outcome {
        match self {
            Outcome::Ok(Body::VmList { vms }) => Outcome::Ok(Body::Vm(vms[0].clone())),
            o => o,
        }
    }
}
