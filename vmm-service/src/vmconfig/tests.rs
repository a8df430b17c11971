//! The configuration format against hand-written files (accepted and
//! refused, each refusal naming its line), and crash-safe rewriting: a
//! rewrite that stops at any point leaves the old file or the new one.

use super::*;
use crate::storage_migration::testing::MemFiles;
use alloc::boxed::Box;
use alloc::vec;
use core::cell::Cell;
use vstorage::{BlockIo, IoError};

const SAMPLE: &str = "hvmigrate-vm 1
name=d
id=5f0c1a9e-3b27-4d6e-8a41-0c9d2e7b6f13
memory_mib=64
guest=disk-verify
disk.0=dynamic local:vms/d/d-0.vhdx
disk.1=fixed shared:cfg/d-1.vhdx
snapshots=local:vms/d/snapshots
";

fn sample() -> VmConfig {
    VmConfig {
        name: "d".into(),
        id: VmId([
            0x5f, 0x0c, 0x1a, 0x9e, 0x3b, 0x27, 0x4d, 0x6e, 0x8a, 0x41, 0x0c, 0x9d, 0x2e, 0x7b,
            0x6f, 0x13,
        ]),
        memory_mib: 64,
        boot: Boot::Guest("disk-verify".into()),
        disks: vec![
            DiskEntry {
                fixed: false,
                location: "local:vms/d/d-0.vhdx".into(),
                checkpoint: None,
            },
            DiskEntry {
                fixed: true,
                location: "shared:cfg/d-1.vhdx".into(),
                checkpoint: None,
            },
        ],
        snapshots: "local:vms/d/snapshots".into(),
    }
}

#[test]
fn the_sample_parses_and_renders_to_the_same_text() {
    let cfg = VmConfig::parse(SAMPLE.as_bytes()).unwrap();
    assert_eq!(cfg, sample());
    assert_eq!(cfg.render(), SAMPLE);
}

#[test]
fn keys_may_come_in_any_order_and_linux_keeps_its_append() {
    let text = "hvmigrate-vm 1
snapshots=shared:snaps
append=hvmigrate.ticks=1 quiet
guest=linux
memory_mib=256
id=00000000-0000-0000-0000-0000000000ff
name=lx
";
    let cfg = VmConfig::parse(text.as_bytes()).unwrap();
    assert_eq!(
        cfg.boot,
        Boot::Linux {
            append: "hvmigrate.ticks=1 quiet".into()
        }
    );
    assert!(cfg.disks.is_empty());
    assert_eq!(VmConfig::parse(cfg.render().as_bytes()).unwrap(), cfg);
    assert_eq!(cfg.id.to_string(), "00000000-0000-0000-0000-0000000000ff");
}

/// SAMPLE with line `n` (from 1) replaced by `with` (None: removed).
fn edit(n: usize, with: Option<&str>) -> String {
    let mut out = String::new();
    for (i, l) in SAMPLE.lines().enumerate() {
        match (i + 1 == n, with) {
            (true, Some(w)) => out.push_str(w),
            (true, None) => continue,
            (false, _) => out.push_str(l),
        }
        out.push('\n');
    }
    out
}

fn refused(text: &str) -> String {
    match VmConfig::parse(text.as_bytes()) {
        Ok(c) => panic!("accepted {text:?} as {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_files_are_refused_with_the_line_and_the_reason() {
    let cases: Vec<(String, &str)> = vec![
        (
            edit(1, Some("hvmigrate-vm 2")),
            "version '2' is not supported",
        ),
        (edit(1, Some("hvmigrate-vm")), "not a VM configuration file"),
        (
            edit(1, Some("hvmigrate-lease 1")),
            "not a VM configuration file",
        ),
        (edit(2, Some("name=D")), "line 2: name: a VM name is"),
        (edit(2, Some("name=")), "line 2: name:"),
        (edit(2, None), "'name' is missing"),
        (
            edit(3, Some("id=5F0C1A9E-3B27-4D6E-8A41-0C9D2E7B6F13")),
            "line 3: id: not an id",
        ),
        (
            edit(3, Some("id=5f0c1a9e3b274d6e8a410c9d2e7b6f13")),
            "line 3: id: not an id",
        ),
        (edit(3, None), "'id' is missing"),
        (
            edit(4, Some("memory_mib=3")),
            "line 4: memory_mib: not a number from 4 to 4096",
        ),
        (edit(4, Some("memory_mib=4097")), "line 4: memory_mib"),
        (edit(4, Some("memory_mib=064")), "line 4: memory_mib"),
        (edit(4, Some("memory_mib=+64")), "line 4: memory_mib"),
        (
            edit(4, Some("memory_mib=18446744073709551617")),
            "line 4: memory_mib",
        ),
        (edit(5, Some("guest=Disk")), "line 5: guest:"),
        (edit(5, None), "'guest' is missing"),
        (
            edit(6, Some("disk.0=dynamic local:vms/../etc/d-0.vhdx")),
            "line 6: disk.0:",
        ),
        (
            edit(6, Some("disk.0=dynamic local:vms//d/d-0.vhdx")),
            "line 6: disk.0: 'local:vms//d/d-0.vhdx' is not in its plain form",
        ),
        (
            edit(6, Some("disk.0=dynamic local:")),
            "line 6: disk.0: 'local:' names a store",
        ),
        (
            edit(6, Some("disk.0=dynamic vms/d/d-0.vhdx")),
            "line 6: disk.0: 'vms/d/d-0.vhdx' is not STORE:path",
        ),
        (
            edit(6, Some("disk.0=sparse local:x.vhdx")),
            "line 6: disk.0: the kind is",
        ),
        (
            edit(6, Some("disk.0=local:x.vhdx")),
            "line 6: disk.0: expected KIND STORE:path",
        ),
        (
            edit(6, Some("disk.8=dynamic local:x.vhdx")),
            "line 6: disk.8: disk slots are 0 to 7",
        ),
        (
            edit(6, Some("disk.01=dynamic local:x.vhdx")),
            "line 6: disk.01: disk slots",
        ),
        (
            edit(6, Some("disk.-1=dynamic local:x.vhdx")),
            "line 6: disk.-1: disk slots",
        ),
        (
            edit(6, Some("disk.1=dynamic local:x.vhdx")),
            "line 7: 'disk.1' given twice",
        ),
        (edit(6, None), "disk.0 is missing"),
        (
            edit(6, Some("Disk.0=dynamic local:x.vhdx")),
            "line 6: unknown key 'Disk.0'",
        ),
        (
            edit(6, Some("memory_mib=64")),
            "line 6: 'memory_mib' given twice",
        ),
        (
            edit(6, Some("append=quiet")),
            "line 6: append: only a Linux VM",
        ),
        (edit(6, Some("")), "line 6: expected key=value"),
        (edit(6, Some("# a comment")), "line 6: expected key=value"),
        (edit(6, Some("name=d\r")), "line 6: expected key=value"),
        (
            edit(8, Some("snapshots=local")),
            "line 8: snapshots: 'local' is not STORE:path",
        ),
        (
            edit(8, Some("snapshots=BIG:x")),
            "line 8: snapshots: 'BIG' is not a store name",
        ),
        (edit(8, None), "'snapshots' is missing"),
        (
            edit(
                8,
                Some(&format!("snapshots=local:{}", "a".repeat(VALUE_MAX))),
            ),
            "line 8: the value of 'snapshots' is longer than",
        ),
        (SAMPLE.trim_end().into(), "line 8: expected key=value"),
        (String::new(), "not a VM configuration file"),
        (
            format!("{SAMPLE}{}\n", "x".repeat(FILE_MAX)),
            "at most 4096 bytes",
        ),
    ];
    for (text, want) in cases {
        let got = refused(&text);
        assert!(got.contains(want), "{text:?}: got '{got}', want '{want}'");
    }
    assert_eq!(VmConfig::parse(&[0xff, 0xfe]), Err(ConfigError::NotText));
}

#[test]
fn locations_follow_the_disk_layout() {
    assert_eq!(default_location("local", "d"), "local:vms/d/d.vmcfg");
    assert_eq!(default_snapshots("shared", "d"), "shared:vms/d/snapshots");
    assert_eq!(dir_in("shared", "d"), "shared:vms/d");
    assert_eq!(dir_in("shared:cfg/", "d"), "shared:cfg");
    assert_eq!(dir_in("shared:", "d"), "shared:");
    assert_eq!(file_in("shared:", "d.vmcfg"), "shared:d.vmcfg");
    assert_eq!(file_in("shared:cfg", "d.vmcfg"), "shared:cfg/d.vmcfg");
    assert_eq!(file_name("local:vms/d/d.vmcfg"), "d.vmcfg");
}

/// `MemFiles` that fails the `fail_at`-th operation of a rewrite (the
/// partial's creation, its write, its flush, the commit) and every
/// later one, as a node that stops there would leave it.
struct Faulty {
    inner: MemFiles,
    ops: Rc<Cell<usize>>,
    fail_at: usize,
}

impl Faulty {
    fn tick(ops: &Cell<usize>, fail_at: usize) -> Result<(), String> {
        ops.set(ops.get() + 1);
        if ops.get() >= fail_at {
            Err("the node stopped".into())
        } else {
            Ok(())
        }
    }
}

struct FaultyIo {
    inner: Box<dyn BlockIo>,
    ops: Rc<Cell<usize>>,
    fail_at: usize,
}

impl BlockIo for FaultyIo {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        Faulty::tick(&self.ops, self.fail_at).map_err(|detail| IoError::Host {
            op: "write",
            detail,
        })?;
        self.inner.write_at(offset, data)
    }
    fn flush(&mut self) -> Result<(), IoError> {
        Faulty::tick(&self.ops, self.fail_at).map_err(|detail| IoError::Host {
            op: "flush",
            detail,
        })?;
        self.inner.flush()
    }
    fn len(&self) -> Result<u64, IoError> {
        self.inner.len()
    }
    fn set_len(&mut self, len: u64) -> Result<(), IoError> {
        self.inner.set_len(len)
    }
}

impl FileStore for Faulty {
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
        Self::tick(&self.ops, self.fail_at)?;
        Ok(Box::new(FaultyIo {
            inner: self.inner.replace_partial(to)?,
            ops: self.ops.clone(),
            fail_at: self.fail_at,
        }))
    }
    fn commit_partial(&self, to: &str) -> Result<(), String> {
        Self::tick(&self.ops, self.fail_at)?;
        self.inner.commit_partial(to)
    }
    fn remove_partial(&self, to: &str) {
        self.inner.remove_partial(to)
    }
    fn remove(&self, at: &str) -> Result<(), String> {
        self.inner.remove(at)
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

use alloc::rc::Rc;

#[test]
fn a_rewrite_stopped_anywhere_leaves_the_old_file_or_the_new_one() {
    const AT: &str = "local:vms/d/d.vmcfg";
    let old = sample();
    let mut new = sample();
    new.disks[0].location = "shared:vms/d/d-0.vhdx".into();
    new.snapshots = "shared:snaps".into();
    let mut outcomes = Vec::new();
    for fail_at in 1..=5 {
        let files = MemFiles::new(1 << 20);
        write(&files, AT, &old).unwrap();
        let faulty = Faulty {
            inner: files.clone(),
            ops: Rc::new(Cell::new(0)),
            fail_at,
        };
        let result = write(&faulty, AT, &new);
        let now = read(&files, AT).unwrap();
        match result {
            Ok(()) => assert_eq!(now, new, "fail_at {fail_at}"),
            Err(e) => {
                assert!(e.contains("the node stopped"), "{e}");
                assert_eq!(now, old, "fail_at {fail_at}");
            }
        }
        // Nothing but the configuration is left (no partial file).
        assert_eq!(files.names(), [AT], "fail_at {fail_at}");
        outcomes.push(now == new);
    }
    // Four operations can fail; the fifth run goes through.
    assert_eq!(outcomes, [false, false, false, false, true]);
}

#[test]
fn a_first_write_makes_the_file_and_reads_back() {
    let files = MemFiles::new(1 << 20);
    write(&files, "shared:cfg/d.vmcfg", &sample()).unwrap();
    assert_eq!(files.bytes("shared:cfg/d.vmcfg"), SAMPLE.as_bytes());
    assert_eq!(read(&files, "shared:cfg/d.vmcfg").unwrap(), sample());
    let e = read(&files, "shared:cfg/none.vmcfg").unwrap_err();
    assert!(e.contains("no such file"), "{e}");
}

#[test]
fn the_fuzz_corpus_keeps_its_round_trip() {
    use std::path::Path;
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for kind in ["seeds", "regressions"] {
        let Ok(dir) = std::fs::read_dir(base.join(kind).join("vmconfig_parse")) else {
            continue;
        };
        for f in dir {
            let data = std::fs::read(f.unwrap().path()).unwrap();
            fuzz_parse(&data);
            n += 1;
        }
    }
    assert!(n >= 2, "seeds found: {n}");
    fuzz_parse(SAMPLE.as_bytes());
}

/// The `open` control's id and kernel arguments, as a peer sends them:
/// checked like a file's.
#[test]
fn carried_fields_from_a_peer_are_checked() {
    let id = "5f0c1a9e-3b27-4d6e-8a41-0c9d2e7b6f13";
    let c = Carried::from_open(Some(id), Some("quiet"), LINUX).unwrap();
    assert_eq!(
        (c.id.map(|i| i.to_string()), c.append.as_deref()),
        (Some(id.to_string()), Some("quiet"))
    );
    assert_eq!(
        Carried::from_open(None, None, "hello"),
        Ok(Carried::default())
    );
    for (vm_id, append, guest, why) in [
        (
            Some("5F0C1A9E-3B27-4D6E-8A41-0C9D2E7B6F13"),
            None,
            "hello",
            "is not a VM id",
        ),
        (Some(""), None, "hello", "is not a VM id"),
        (None, Some("quiet"), "hello", "not a Linux VM"),
        (None, Some("a\nb"), LINUX, "printable"),
    ] {
        let e = Carried::from_open(vm_id, append, guest).unwrap_err();
        assert!(e.contains(why), "{e}");
    }
    let long = "x".repeat(APPEND_MAX + 1);
    assert!(Carried::from_open(None, Some(&long), LINUX).is_err());
}

#[test]
fn a_checkpoint_is_kept_with_its_disk_and_refused_without_one() {
    let text = SAMPLE.replace(
        "disk.1=",
        "checkpoint.0=local:vms/d/snapshots/d-0-checkpoint.vhdx\ndisk.1=",
    );
    let cfg = VmConfig::parse(text.as_bytes()).unwrap();
    assert_eq!(
        cfg.disks[0].checkpoint.as_deref(),
        Some("local:vms/d/snapshots/d-0-checkpoint.vhdx")
    );
    assert_eq!(cfg.disks[1].checkpoint, None);
    assert_eq!(cfg.render(), text);
    let alone = SAMPLE.replace("disk.1=", "checkpoint.2=local:x.vhdx\ndisk.1=");
    assert!(refused(&alone).contains("checkpoint.2 without disk.2"));
    let twice = text.replace(
        "disk.1=",
        "checkpoint.0=local:vms/d/snapshots/other.vhdx\ndisk.1=",
    );
    assert!(refused(&twice).contains("line 8: 'checkpoint.0' given twice"));
    let own = SAMPLE.replace("disk.1=", "checkpoint.0=local:vms/d/d-0.vhdx\ndisk.1=");
    assert!(refused(&own).contains("its own checkpoint"));
    let bad_slot = SAMPLE.replace("disk.1=", "checkpoint.09=local:x.vhdx\ndisk.1=");
    assert!(refused(&bad_slot).contains("disk slots are 0 to"));
}
