//! `vhdx copy` end to end on real files: raw and VHDX (dynamic, fixed,
//! differencing) sources, checked by reading both disks' virtual bytes back
//! and, where qemu-img is installed, by `qemu-img compare`.

use std::path::{Path, PathBuf};
use std::process::Command;

use vstorage::copy::{cli_copy, open_disk, HostDisk};
use vstorage::io::VirtualDisk;
use vstorage::vhdx::{self, CreateParams, DiskKind};

const MIB: u64 = 1 << 20;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let base = std::env::var_os("TMPDIR").map_or_else(std::env::temp_dir, PathBuf::from);
        let p = base.join(format!("vstorage-copy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A recognisable 64 KiB pattern for `tag`.
fn pattern(tag: u64) -> Vec<u8> {
    (0..64 * 1024u64)
        .map(|i| (i.wrapping_mul(31) ^ tag.wrapping_mul(0x9E37)) as u8 | 1)
        .collect()
}

/// Writes patterns at a few scattered offsets, leaving most of the disk empty.
fn scatter(d: &mut dyn VirtualDisk) -> Vec<u64> {
    let size = d.virtual_size();
    let offsets = vec![0, 3 * MIB + 4096, size / 2, size - 64 * 1024];
    for (i, &o) in offsets.iter().enumerate() {
        d.write(o, &pattern(i as u64)).unwrap();
    }
    d.flush().unwrap();
    offsets
}

fn virtual_bytes(path: &Path) -> Vec<u8> {
    let mut d = open_disk(path, false).unwrap();
    let mut v = vec![0u8; d.virtual_size() as usize];
    for (i, chunk) in v.chunks_mut(MIB as usize).enumerate() {
        d.read(i as u64 * MIB, chunk).unwrap();
    }
    v
}

fn assert_same_disk(a: &Path, b: &Path) {
    assert_same_bytes(a, b);
    qemu_compare(a, b);
}

fn assert_same_bytes(a: &Path, b: &Path) {
    let (va, vb) = (virtual_bytes(a), virtual_bytes(b));
    assert_eq!(va.len(), vb.len(), "virtual sizes differ");
    assert!(va == vb, "{} and {} differ", a.display(), b.display());
}

/// `qemu-img compare` agrees, when qemu-img is installed.
fn qemu_compare(a: &Path, b: &Path) {
    let fmt = |p: &Path| {
        if p.extension().is_some_and(|e| e == "vhdx") {
            "vhdx"
        } else {
            "raw"
        }
    };
    let out = Command::new("qemu-img")
        .args(["compare", "-f", fmt(a), "-F", fmt(b)])
        .arg(a)
        .arg(b)
        .output();
    match out {
        Ok(o) => assert!(
            o.status.success(),
            "qemu-img compare {} {}: {}{}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => eprintln!("qemu-img not run ({e}); compared virtual bytes only"),
    }
}

fn new_vhdx(path: &Path, size: u64, fixed: bool) -> vhdx::Vhdx<vstorage::FileIo> {
    let mut p = CreateParams::dynamic(size);
    p.block_size = 2 << 20;
    p.fixed = fixed;
    vhdx::host::create_path(path, &p).unwrap()
}

#[test]
fn dynamic_vhdx_copy_keeps_parameters_and_sparseness() {
    let t = TempDir::new("dyn");
    let (src, dst) = (t.path("src.vhdx"), t.path("dst.vhdx"));
    let mut d = new_vhdx(&src, 64 * MIB, false);
    scatter(&mut d);
    d.close().unwrap();
    drop(d);
    cli_copy(&src, &dst, false).unwrap();
    assert_same_disk(&src, &dst);
    let (HostDisk::Vhdx(mut s), HostDisk::Vhdx(mut c)) = (
        open_disk(&src, false).unwrap(),
        open_disk(&dst, false).unwrap(),
    ) else {
        panic!("both are VHDX")
    };
    assert_eq!(c.kind(), DiskKind::Dynamic);
    assert_eq!(c.block_size(), s.block_size());
    assert_eq!(c.physical_sector_size(), s.physical_sector_size());
    assert_eq!(c.logical_sector_size(), s.logical_sector_size());
    assert_eq!(c.data_ranges().unwrap(), s.data_ranges().unwrap());
    let len = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert!(
        len(&dst) <= len(&src),
        "the copy allocated more than the source"
    );
}

#[test]
fn fixed_and_differencing_sources() {
    let t = TempDir::new("fixdiff");
    let fixed = t.path("fixed.vhdx");
    let mut d = new_vhdx(&fixed, 16 * MIB, true);
    scatter(&mut d);
    drop(d);
    let fixed_copy = t.path("fixed-copy.vhdx");
    cli_copy(&fixed, &fixed_copy, false).unwrap();
    assert_same_disk(&fixed, &fixed_copy);
    let HostDisk::Vhdx(c) = open_disk(&fixed_copy, false).unwrap() else {
        panic!("VHDX")
    };
    assert_eq!(c.kind(), DiskKind::Fixed);
    drop(c);

    // A differencing disk copies flattened: parent and child in one file.
    let child = t.path("child.vhdx");
    let mut c = vhdx::host::create_differencing_path(&child, &fixed, None).unwrap();
    c.write(MIB, &pattern(77)).unwrap();
    c.flush().unwrap();
    drop(c);
    let flat = t.path("flat.vhdx");
    cli_copy(&child, &flat, true).unwrap();
    // qemu-img cannot open VHDX differencing disks: compare with the engine,
    // and let qemu-img check the flattened copy against the parent's data.
    assert_same_bytes(&child, &flat);
    let qemu_view = t.path("qemu-view.vhdx");
    cli_copy(&flat, &qemu_view, false).unwrap();
    assert_same_disk(&flat, &qemu_view);
    let HostDisk::Vhdx(f) = open_disk(&flat, false).unwrap() else {
        panic!("VHDX")
    };
    assert_eq!(f.kind(), DiskKind::Dynamic);
}

#[test]
fn raw_to_raw_and_across_formats() {
    let t = TempDir::new("raw");
    let raw = t.path("disk.img");
    {
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(8 * MIB).unwrap();
    }
    let mut d = open_disk(&raw, true).unwrap();
    scatter(&mut d);
    drop(d);
    let raw_copy = t.path("copy.img");
    cli_copy(&raw, &raw_copy, false).unwrap();
    assert_same_disk(&raw, &raw_copy);
    let as_vhdx = t.path("from-raw.vhdx");
    cli_copy(&raw, &as_vhdx, false).unwrap();
    assert_same_disk(&raw, &as_vhdx);
    let back = t.path("back.img");
    cli_copy(&as_vhdx, &back, false).unwrap();
    assert_same_disk(&raw, &back);
}

#[test]
fn errors_are_one_line_and_leave_no_destination() {
    let t = TempDir::new("err");
    let missing = t.path("missing.vhdx");
    let dst = t.path("dst.vhdx");
    let e = cli_copy(&missing, &dst, false).unwrap_err();
    assert!(e.contains("missing.vhdx") && !e.contains('\n'), "{e}");
    assert!(!dst.exists());

    // Not a VHDX despite its name.
    let bogus = t.path("bogus.vhdx");
    std::fs::write(&bogus, vec![0xAB; 1 << 20]).unwrap();
    let e = cli_copy(&bogus, &dst, false).unwrap_err();
    assert!(e.contains("bogus.vhdx") && !e.contains('\n'), "{e}");
    assert!(!dst.exists());

    // An existing destination is never replaced.
    let src = t.path("src.vhdx");
    drop(new_vhdx(&src, 4 * MIB, false));
    std::fs::write(&dst, b"keep me").unwrap();
    let e = cli_copy(&src, &dst, false).unwrap_err();
    assert!(e.contains("dst.vhdx") && !e.contains('\n'), "{e}");
    assert_eq!(std::fs::read(&dst).unwrap(), b"keep me");

    // A destination in a missing directory.
    let e = cli_copy(&src, &t.path("no/such/dir.vhdx"), false).unwrap_err();
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn vhdx_binary_copy_with_progress() {
    let t = TempDir::new("bin");
    let (src, dst) = (t.path("src.vhdx"), t.path("dst.vhdx"));
    let mut d = new_vhdx(&src, 32 * MIB, false);
    scatter(&mut d);
    drop(d);
    let out = Command::new(env!("CARGO_BIN_EXE_vhdx"))
        .arg("copy")
        .arg(&src)
        .arg(&dst)
        .arg("--progress")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vhdx copy failed: {stderr}");
    // stdout is a pipe here, not a terminal: the bar (indicatif, drawn on
    // stderr; see copy::host's test of what it draws) stays hidden.
    assert!(stderr.is_empty(), "{stderr:?}");
    assert_same_disk(&src, &dst);

    // Failure: non-zero exit, one line naming the problem, no destination.
    let out = Command::new(env!("CARGO_BIN_EXE_vhdx"))
        .arg("copy")
        .arg(t.path("nope.vhdx"))
        .arg(t.path("out.vhdx"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("nope.vhdx"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(!t.path("out.vhdx").exists());
}

/// Every subcommand of both tools prints generated help (exit 0), through
/// `--help` and through `help SUBCOMMAND`.
#[test]
fn every_subcommand_has_help() {
    /// (subcommand, words its help must show)
    type Subs<'a> = &'a [(&'a str, &'a [&'a str])];
    let tools: [(&str, Subs); 2] = [
        (
            env!("CARGO_BIN_EXE_vhdx"),
            &[
                ("info", &["<FILE>"]),
                (
                    "create",
                    &[
                        "--size",
                        "--block-size",
                        "--fixed",
                        "--logical-sector-size",
                        "--parent",
                    ],
                ),
                ("convert", &["<INPUT>", "<OUTPUT>"]),
                ("check", &["--repair"]),
                ("read", &["--offset", "--length", "--output"]),
                ("write", &["--offset", "--input", "--pattern", "--length"]),
                ("merge", &["<CHILD>"]),
                ("copy", &["<SRC>", "<DST>", "--progress"]),
            ],
        ),
        (
            env!("CARGO_BIN_EXE_vhdx-bench"),
            &[
                ("copy", &["--size-mib", "--runs"]),
                ("random-write", &["--writes"]),
                ("mirror", &["--size-mib"]),
                ("open", &["--blocks", "--runs"]),
                ("all", &["--size-mib"]),
            ],
        ),
    ];
    for (exe, subs) in tools {
        let name = std::path::Path::new(exe)
            .file_name()
            .unwrap()
            .to_string_lossy();
        let top = Command::new(exe).arg("--help").output().unwrap();
        assert!(top.status.success());
        let top = String::from_utf8_lossy(&top.stdout);
        for (sub, words) in subs {
            assert!(top.contains(sub), "{name} --help lists {sub}: {top}");
            for args in [vec![*sub, "--help"], vec!["help", *sub]] {
                let out = Command::new(exe).args(&args).output().unwrap();
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(out.status.success(), "{name} {args:?}");
                assert!(text.contains(&format!("Usage: {name} {sub}")), "{text}");
                for w in *words {
                    assert!(text.contains(w), "{name} {args:?} mentions {w}: {text}");
                }
            }
        }
        // A usage error: one line on stderr, exit status 2.
        let out = Command::new(exe).arg("--no-such-option").output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: {err}");
        assert!(err.starts_with(&format!("{name}: ")), "{err}");
    }
}
