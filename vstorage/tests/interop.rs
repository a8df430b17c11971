//! Interoperability with QEMU's VHDX driver (qemu-img / qemu-io 7.2).
//!
//! Images QEMU makes and writes must read back through `vhdx convert`
//! byte-identical to `qemu-img convert -O raw`; images our CLI makes and writes
//! must pass `qemu-img check` and `qemu-img compare` against the expected raw
//! bytes; a log our engine left pending must be replayed (by us, and by QEMU)
//! into an image QEMU accepts.
//!
//! QEMU limits worked around, each asserted so a change is noticed:
//! - QEMU refuses VHDX files with 4096-byte logical sectors (ENOTSUP). For
//!   those, QEMU checks a copy whose logical-sector metadata item says 512:
//!   with one chunk the BAT layout is the same, so every structure QEMU
//!   validates (headers, region tables, log, BAT, payload) is ours, unchanged.
//! - QEMU cannot open differencing files at all; the child is checked through
//!   our reader and the merged parent through QEMU.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vstorage::io::{FileIo, VirtualDisk};
use vstorage::vhdx::{OpenOptions, Vhdx};

fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found: install qemu-utils (apt-get install qemu-utils) to run the VHDX interop tests");
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "process panicked: {err}");
    out
}

fn ok(cmd: &mut Command) -> Output {
    let dbg = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{dbg} failed ({:?}): {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn vhdx() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhdx"))
}
fn qemu_img() -> Command {
    Command::new(tool("qemu-img"))
}
fn qemu_io() -> Command {
    Command::new(tool("qemu-io"))
}

fn qemu_check(img: &Path) {
    let out = ok(qemu_img().args(["check", "-f", "vhdx"]).arg(img));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("No errors"), "qemu-img check: {s}");
}

fn qemu_compare(img: &Path, raw: &Path) {
    ok(qemu_img()
        .args(["compare", "-f", "vhdx", "-F", "raw"])
        .arg(img)
        .arg(raw));
}

/// Deterministic writes `(offset, len, byte)` spread over a disk of `size`.
fn plan(size: u64, sector: u64) -> Vec<(u64, u64, u8)> {
    let mib = 1u64 << 20;
    let v = vec![
        (0, 64 << 10, 0x11u8),
        (5 * mib - sector, mib + 2 * sector, 0x22),
        (size / 2 + 7 * sector, 3 * sector, 0x33),
        (size - 4 * sector, 4 * sector, 0x44),
        (5 * mib, sector, 0x55), // overwrite inside an allocated block
    ];
    v.into_iter().filter(|w| w.0 + w.1 <= size).collect()
}

fn apply(model: &mut [u8], w: &[(u64, u64, u8)]) {
    for &(o, l, b) in w {
        model[o as usize..(o + l) as usize].fill(b);
    }
}

fn info_field(img: &Path, key: &str) -> String {
    let out = ok(vhdx().arg("info").arg(img));
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    let pat = format!("\"{key}\":");
    let start = s
        .find(&pat)
        .unwrap_or_else(|| panic!("{key} missing in {s}"))
        + pat.len();
    let rest = &s[start..];
    let end = rest.find([',', '}']).unwrap();
    rest[..end].trim_matches('"').to_string()
}

#[test]
fn qemu_tools_are_installed() {
    let out = ok(qemu_img().arg("--version"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("qemu-img version"));
    tool("qemu-io");
}

#[test]
fn qemu_made_images_read_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    let size = 40u64 << 20;
    let mut n = 0;
    for block in ["1M", "8M", "32M"] {
        for sub in ["dynamic", "fixed"] {
            for zero in ["on", "off"] {
                n += 1;
                let img = dir.path().join(format!("q{n}.vhdx"));
                ok(qemu_img()
                    .args(["create", "-q", "-f", "vhdx", "-o"])
                    .arg(format!(
                        "subformat={sub},block_size={block},block_state_zero={zero}"
                    ))
                    .arg(&img)
                    .arg(size.to_string()));
                let mut io = qemu_io();
                io.args(["-f", "vhdx"]);
                for (o, l, b) in plan(size, 512) {
                    io.arg("-c").arg(format!("write -P 0x{b:02x} {o} {l}"));
                }
                ok(io.arg(&img));
                let theirs = dir.path().join(format!("q{n}.qemu.raw"));
                let ours = dir.path().join(format!("q{n}.ours.raw"));
                ok(qemu_img()
                    .args(["convert", "-f", "vhdx", "-O", "raw"])
                    .arg(&img)
                    .arg(&theirs));
                ok(vhdx().arg("convert").arg(&img).arg(&ours));
                let a = std::fs::read(&theirs).unwrap();
                let b = std::fs::read(&ours).unwrap();
                assert_eq!(a.len(), b.len(), "{block} {sub} zero={zero}: size");
                assert!(a == b, "{block} {sub} zero={zero}: contents differ");
                let mut model = vec![0u8; size as usize];
                apply(&mut model, &plan(size, 512));
                assert!(
                    b == model,
                    "{block} {sub} zero={zero}: not the written data"
                );
                assert_eq!(info_field(&img, "virtual_size"), size.to_string());
                let want_bs: u64 = match block {
                    "1M" => 1 << 20,
                    "8M" => 8 << 20,
                    _ => 32 << 20,
                };
                assert_eq!(info_field(&img, "block_size"), want_bs.to_string());
                assert_eq!(info_field(&img, "kind"), sub);
                assert_eq!(info_field(&img, "log_replay_needed"), "false");

                // Our writes into QEMU's image: QEMU still accepts it and sees them.
                ok(vhdx().arg("write").arg(&img).args([
                    "--offset",
                    "12M",
                    "--pattern",
                    "0x66",
                    "--length",
                    "1536",
                ]));
                apply(&mut model, &[(12 << 20, 1536, 0x66)]);
                let expect = dir.path().join(format!("q{n}.expect.raw"));
                std::fs::write(&expect, &model).unwrap();
                qemu_check(&img);
                qemu_compare(&img, &expect);
            }
        }
    }
}

/// Creates an image with our CLI, writes the plan through it and returns the model.
fn make_ours(img: &Path, size: u64, args: &[&str], sector: u64) -> Vec<u8> {
    ok(vhdx()
        .arg("create")
        .arg(img)
        .args(["--size", &size.to_string()])
        .args(args));
    let mut model = vec![0u8; size as usize];
    for (o, l, b) in plan(size, sector) {
        ok(vhdx().arg("write").arg(img).args([
            "--offset",
            &o.to_string(),
            "--pattern",
            &format!("{b}"),
            "--length",
            &l.to_string(),
        ]));
        apply(&mut model, &[(o, l, b)]);
    }
    // Unaligned write through --input (read-modify-write of edge sectors).
    let input = img.with_extension("input");
    let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&input, &bytes).unwrap();
    let off = 3 * (1u64 << 20) + 100;
    ok(vhdx()
        .arg("write")
        .arg(img)
        .args(["--offset", &off.to_string(), "--input"])
        .arg(&input));
    model[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
    model
}

#[test]
fn our_images_pass_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let size = 48u64 << 20;
    let cases: &[&[&str]] = &[
        &["--block-size", "1M"],
        &["--block-size", "2M"],
        &["--block-size", "32M"],
        &["--block-size", "256M"],
        &["--block-size", "4M", "--fixed"],
        &[],
    ];
    for (i, args) in cases.iter().enumerate() {
        let img = dir.path().join(format!("o{i}.vhdx"));
        let model = make_ours(&img, size, args, 512);
        let expect = dir.path().join(format!("o{i}.raw"));
        std::fs::write(&expect, &model).unwrap();
        qemu_check(&img);
        qemu_compare(&img, &expect);
        // Our own reader agrees too (vhdx read to stdout).
        let out =
            ok(vhdx()
                .arg("read")
                .arg(&img)
                .args(["--offset", "0", "--length", &size.to_string()]));
        assert!(out.stdout == model, "case {args:?}: vhdx read differs");
        if args.contains(&"--fixed") {
            assert_eq!(info_field(&img, "kind"), "fixed");
        }
    }
}

/// Rewrites the logical sector size metadata item of a VHDX file.
fn patch_logical_sector(img: &Path, to: u32) -> Vec<u8> {
    let mut b = std::fs::read(img).unwrap();
    let rd32 = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let rd64 = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let rt = 192 << 10;
    let meta_guid = vstorage::vhdx::format::METADATA_REGION.0;
    let lss_guid = vstorage::vhdx::format::LOGICAL_SECTOR_SIZE.0;
    let mut meta = 0usize;
    for i in 0..rd32(&b, rt + 8) as usize {
        let o = rt + 16 + i * 32;
        if b[o..o + 16] == meta_guid {
            meta = rd64(&b, o + 16) as usize;
        }
    }
    assert!(meta != 0);
    let n = u16::from_le_bytes([b[meta + 10], b[meta + 11]]) as usize;
    let mut patched = false;
    for i in 0..n {
        let o = meta + 32 + i * 32;
        if b[o..o + 16] == lss_guid {
            let at = meta + rd32(&b, o + 16) as usize;
            b[at..at + 4].copy_from_slice(&to.to_le_bytes());
            patched = true;
        }
    }
    assert!(patched);
    b
}

#[test]
fn logical_sector_4096_images_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let size = 24u64 << 20;
    for block in ["1M", "8M"] {
        let img = dir.path().join(format!("s4k-{block}.vhdx"));
        let model = make_ours(
            &img,
            size,
            &["--block-size", block, "--logical-sector-size", "4096"],
            4096,
        );
        assert_eq!(info_field(&img, "logical_sector_size"), "4096");
        // Our reader returns exactly what was written.
        let raw = dir.path().join(format!("s4k-{block}.raw"));
        ok(vhdx().arg("convert").arg(&img).arg(&raw));
        assert!(std::fs::read(&raw).unwrap() == model);
        // QEMU 7.2 refuses 4096-byte logical sectors outright...
        let out = run(qemu_img().args(["info", "-f", "vhdx"]).arg(&img));
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not supported"),
            "QEMU now opens 4096-sector VHDX: check it directly instead"
        );
        // ...so it validates every other structure through a copy that only
        // differs in the logical sector size item.
        let as512 = dir.path().join(format!("s4k-{block}-as512.vhdx"));
        std::fs::write(&as512, patch_logical_sector(&img, 512)).unwrap();
        qemu_check(&as512);
        qemu_compare(&as512, &raw);
    }
}

#[test]
fn differencing_child_reads_through_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    let size = 40u64 << 20;
    let base = dir.path().join("base.vhdx");
    let mut model = make_ours(&base, size, &["--block-size", "2M"], 512);
    let sub = dir.path().join("snap");
    std::fs::create_dir(&sub).unwrap();
    let child = sub.join("child.avhdx");
    ok(vhdx()
        .arg("create")
        .arg(&child)
        .args(["--block-size", "1M", "--parent"])
        .arg(&base));
    assert_eq!(info_field(&child, "kind"), "differencing");
    assert!(info_field(&child, "parent").ends_with("base.vhdx"));
    // Unwritten: the child reads as its parent.
    let raw = dir.path().join("child.raw");
    ok(vhdx().arg("convert").arg(&child).arg(&raw));
    assert!(std::fs::read(&raw).unwrap() == model);
    // Sector-granular copy-on-write, partial and whole blocks.
    let writes = [
        (512u64, 512u64, 0xA1u8),
        ((5 << 20) + 1024, 4096, 0xA2),
        (8 << 20, 1 << 20, 0xA3),
        (size - 512, 512, 0xA4),
    ];
    for (o, l, b) in writes {
        ok(vhdx().arg("write").arg(&child).args([
            "--offset",
            &o.to_string(),
            "--pattern",
            &b.to_string(),
            "--length",
            &l.to_string(),
        ]));
    }
    let parent_before = std::fs::read(&base).unwrap();
    let mut child_model = model.clone();
    apply(&mut child_model, &writes);
    ok(vhdx().arg("convert").arg(&child).arg(&raw));
    assert!(std::fs::read(&raw).unwrap() == child_model);
    // Writes landed in the child only: the parent file is untouched.
    assert!(std::fs::read(&base).unwrap() == parent_before);
    ok(vhdx().arg("check").arg(&child));

    // Parent found by absolute path when the child moves where its relative
    // path leads nowhere; by relative path when both move together.
    let deep = dir.path().join("a/b");
    std::fs::create_dir_all(&deep).unwrap();
    let lone = deep.join("lone.avhdx");
    std::fs::rename(&child, &lone).unwrap();
    ok(vhdx().arg("convert").arg(&lone).arg(&raw));
    assert!(std::fs::read(&raw).unwrap() == child_model);
    std::fs::rename(&lone, &child).unwrap();
    let moved = dir.path().join("moved");
    std::fs::create_dir_all(moved.join("snap")).unwrap();
    std::fs::rename(&base, moved.join("base.vhdx")).unwrap();
    let lone = moved.join("snap/child.avhdx");
    std::fs::rename(&child, &lone).unwrap();
    ok(vhdx().arg("convert").arg(&lone).arg(&raw));
    assert!(std::fs::read(&raw).unwrap() == child_model);

    // Its absolute path is stale now; opening the child writable rewrites the
    // locator (through the log), so it is found again after moving alone.
    ok(vhdx().arg("write").arg(&lone).args([
        "--offset",
        "512",
        "--pattern",
        "0xa1",
        "--length",
        "512",
    ]));
    let deeper = dir.path().join("c/d");
    std::fs::create_dir_all(&deeper).unwrap();
    let far = deeper.join("far.avhdx");
    std::fs::rename(&lone, &far).unwrap();
    ok(vhdx().arg("convert").arg(&far).arg(&raw));
    assert!(std::fs::read(&raw).unwrap() == child_model);
    std::fs::rename(&far, &lone).unwrap();
    ok(vhdx().arg("check").arg(&lone));

    // A parent written after the fork no longer matches the child's linkage.
    let base = moved.join("base.vhdx");
    let saved = std::fs::read(&base).unwrap();
    ok(vhdx()
        .arg("write")
        .arg(&base)
        .args(["--offset", "0", "--pattern", "1", "--length", "512"]));
    let out = run(vhdx()
        .arg("read")
        .arg(&lone)
        .args(["--offset", "0", "--length", "512"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("parent_linkage"));
    std::fs::write(&base, &saved).unwrap();

    // QEMU cannot open differencing files (so this is checked through us).
    assert!(!run(qemu_img().args(["info", "-f", "vhdx"]).arg(&lone))
        .status
        .success());

    // Merge folds the child into its parent; QEMU checks the result.
    ok(vhdx().arg("merge").arg(&lone));
    assert!(!lone.exists(), "merged child is removed");
    model = child_model;
    let expect = dir.path().join("merged.raw");
    std::fs::write(&expect, &model).unwrap();
    qemu_check(&base);
    qemu_compare(&base, &expect);
}

#[test]
fn differencing_with_4096_sectors_merges() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16u64 << 20;
    let base = dir.path().join("b4k.vhdx");
    let mut model = make_ours(
        &base,
        size,
        &["--block-size", "1M", "--logical-sector-size", "4096"],
        4096,
    );
    let child = dir.path().join("c4k.avhdx");
    ok(vhdx().arg("create").arg(&child).arg("--parent").arg(&base));
    assert_eq!(info_field(&child, "logical_sector_size"), "4096");
    ok(vhdx().arg("write").arg(&child).args([
        "--offset",
        "8192",
        "--pattern",
        "0xc4",
        "--length",
        "4096",
    ]));
    apply(&mut model, &[(8192, 4096, 0xC4)]);
    ok(vhdx().arg("merge").arg(&child));
    let raw = dir.path().join("m.raw");
    ok(vhdx().arg("convert").arg(&base).arg(&raw));
    assert!(std::fs::read(&raw).unwrap() == model);
    let as512 = dir.path().join("b4k-as512.vhdx");
    std::fs::write(&as512, patch_logical_sector(&base, 512)).unwrap();
    qemu_check(&as512);
    qemu_compare(&as512, &raw);
}

/// Leaves `img` with a log entry written and flushed but not applied, as if
/// the host died right after the log flush. Returns the expected contents.
fn crash_with_pending_log(img: &Path, size: u64) -> Vec<u8> {
    let model_writes = [(0u64, 4096u64, 0x77u8), (9 << 20, 8192, 0x78)];
    ok(vhdx()
        .arg("create")
        .arg(img)
        .args(["--size", &size.to_string(), "--block-size", "1M"]));
    let io = FileIo::open(img, true).unwrap();
    let mut d = Vhdx::open(io, OpenOptions::read_write(77)).unwrap();
    d.write(0, &[0x77; 4096]).unwrap();
    d.debug_stop_before_apply();
    d.write(9 << 20, &[0x78; 8192]).unwrap();
    assert!(d.flush().is_err());
    drop(d);
    let mut model = vec![0u8; size as usize];
    apply(&mut model, &model_writes);
    model
}

#[test]
fn pending_log_is_replayed_and_then_passes_qemu_check() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16u64 << 20;
    let img = dir.path().join("crashed.vhdx");
    let model = crash_with_pending_log(&img, size);
    let expect = dir.path().join("expect.raw");
    std::fs::write(&expect, &model).unwrap();
    let pristine = std::fs::read(&img).unwrap();

    assert_eq!(info_field(&img, "log_replay_needed"), "true");
    // QEMU sees our log too: it refuses to open the file read-only.
    let out = run(qemu_img().args(["check", "-f", "vhdx"]).arg(&img));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("log"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Read-only access replays in memory without touching the file.
    let raw = dir.path().join("ro.raw");
    ok(vhdx().arg("convert").arg(&img).arg(&raw));
    assert!(std::fs::read(&raw).unwrap() == model);
    assert!(std::fs::read(&img).unwrap() == pristine);
    // check reports it; --repair replays it; a second repair is a no-op.
    let out = run(vhdx().arg("check").arg(&img));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("log replay needed"));
    ok(vhdx().arg("check").arg(&img).arg("--repair"));
    assert_eq!(info_field(&img, "log_replay_needed"), "false");
    ok(vhdx().arg("check").arg(&img).arg("--repair"));
    qemu_check(&img);
    qemu_compare(&img, &expect);

    // QEMU replays the very same log (opening read-write) to the same result.
    let theirs = dir.path().join("qemu-replayed.vhdx");
    std::fs::write(&theirs, &pristine).unwrap();
    ok(qemu_io()
        .args(["-f", "vhdx", "-c", "read 0 512"])
        .arg(&theirs));
    qemu_check(&theirs);
    qemu_compare(&theirs, &expect);
}

#[test]
fn raw_to_vhdx_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("in.img");
    let mut data = vec![0u8; (10 << 20) + 1000];
    for (i, b) in data.iter_mut().enumerate().skip(3 << 20).take(5000) {
        *b = (i % 200) as u8 + 1;
    }
    let n = data.len();
    data[n - 10..].fill(9);
    std::fs::write(&raw, &data).unwrap();
    let img = dir.path().join("out.vhdx");
    ok(vhdx().arg("convert").arg(&raw).arg(&img));
    qemu_check(&img);
    // A raw file that is not a whole number of sectors is padded with zeros.
    let mut padded = data.clone();
    padded.resize(n.div_ceil(512) * 512, 0);
    let padded_path = dir.path().join("padded.raw");
    std::fs::write(&padded_path, &padded).unwrap();
    qemu_compare(&img, &padded_path);
    let back = dir.path().join("back.raw");
    ok(vhdx().arg("convert").arg(&img).arg(&back));
    assert!(std::fs::read(&back).unwrap() == padded);
    // Sparse: only the blocks holding data were allocated.
    let d = Vhdx::open(FileIo::open(&img, false).unwrap(), OpenOptions::read_only()).unwrap();
    assert_eq!(d.virtual_size(), padded.len() as u64);
    assert!(std::fs::metadata(&img).unwrap().len() < 80 << 20);
}

#[test]
fn cli_failures_are_one_line_with_status() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.vhdx");
    let junk = dir.path().join("junk.vhdx");
    std::fs::write(&junk, vec![0x5Au8; 300 << 10]).unwrap();
    let good = dir.path().join("good.vhdx");
    ok(vhdx()
        .arg("create")
        .arg(&good)
        .args(["--size", "8M", "--block-size", "1M"]));
    let corrupt = dir.path().join("corrupt.vhdx");
    let mut b = std::fs::read(&good).unwrap();
    for h in [64usize << 10, 128 << 10] {
        b[h + 200] ^= 0xFF;
    }
    std::fs::write(&corrupt, &b).unwrap();
    let bad_bat = dir.path().join("badbat.vhdx");
    let mut b = std::fs::read(&good).unwrap();
    b[3 << 20..(3 << 20) + 8].copy_from_slice(&((1u64 << 40) | 6).to_le_bytes());
    std::fs::write(&bad_bat, &b).unwrap();

    // Region table 2 valid but different from table 1.
    let split = dir.path().join("split.vhdx");
    let mut b = std::fs::read(&good).unwrap();
    let rt2 = 256usize << 10;
    b[rt2 + 16 + 24..rt2 + 16 + 28].copy_from_slice(&(2u32 << 20).to_le_bytes());
    let c = vstorage::vhdx::format::checksum_with_hole(&b[rt2..rt2 + 65536], 4);
    b[rt2 + 4..rt2 + 8].copy_from_slice(&c.to_le_bytes());
    std::fs::write(&split, &b).unwrap();

    let cases: Vec<(Vec<std::ffi::OsString>, i32, &str)> = vec![
        (
            vec!["check".into(), split.clone().into()],
            2,
            "region table 2 differs",
        ),
        (
            vec!["info".into(), missing.clone().into()],
            1,
            "missing.vhdx",
        ),
        (vec!["info".into(), junk.clone().into()], 1, "not a VHDX"),
        (
            vec!["check".into(), missing.clone().into()],
            1,
            "missing.vhdx",
        ),
        (vec!["check".into(), junk.clone().into()], 1, "not a VHDX"),
        (
            vec!["check".into(), corrupt.clone().into()],
            2,
            "no valid header",
        ),
        (
            vec!["check".into(), bad_bat.clone().into()],
            2,
            "BAT entry 0 points past end of file",
        ),
        (
            vec!["info".into(), corrupt.clone().into()],
            1,
            "no valid header",
        ),
        (
            vec![
                "create".into(),
                dir.path().join("x.vhdx").into(),
                "--size".into(),
                "12Q".into(),
            ],
            2,
            "invalid size",
        ),
        (
            vec![
                "create".into(),
                dir.path().join("x.vhdx").into(),
                "--size".into(),
                "8M".into(),
                "--block-size".into(),
                "3M".into(),
            ],
            1,
            "block size",
        ),
        (
            vec![
                "create".into(),
                dir.path().join("x.vhdx").into(),
                "--size".into(),
                "8M".into(),
                "--logical-sector-size".into(),
                "1024".into(),
            ],
            2,
            "512 or 4096",
        ),
        (
            vec![
                "read".into(),
                good.clone().into(),
                "--offset".into(),
                "8M".into(),
                "--length".into(),
                "1".into(),
            ],
            1,
            "past the end",
        ),
        (
            vec![
                "write".into(),
                good.clone().into(),
                "--offset".into(),
                "0".into(),
                "--pattern".into(),
                "256".into(),
                "--length".into(),
                "1".into(),
            ],
            2,
            "invalid byte",
        ),
        (
            vec![
                "write".into(),
                good.clone().into(),
                "--offset".into(),
                "0".into(),
            ],
            2,
            "<--input <F>|--pattern <BYTE>>",
        ),
        (
            vec!["merge".into(), good.clone().into()],
            1,
            "not a differencing disk",
        ),
        (vec!["frobnicate".into()], 2, "unrecognized subcommand"),
        (
            vec![
                "create".into(),
                good.clone().into(),
                "--parent".into(),
                good.clone().into(),
            ],
            1,
            "its own parent",
        ),
        (
            vec!["info".into(), good.clone().into(), "--bogus".into()],
            2,
            "unexpected argument '--bogus'",
        ),
        (
            vec![
                "convert".into(),
                missing.clone().into(),
                dir.path().join("o.raw").into(),
            ],
            1,
            "missing.vhdx",
        ),
    ];
    for (args, code, needle) in cases {
        let out = run(vhdx().args(&args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(err.starts_with("vhdx: "), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
    ok(vhdx().arg("check").arg(&good));
    // Bad parameters never truncate an existing file.
    let before = std::fs::read(&good).unwrap();
    let out = run(vhdx().arg("create").arg(&good).args(["--size", "1000"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(std::fs::read(&good).unwrap() == before);
    // Hex and decimal BYTE, K suffix.
    ok(vhdx().arg("write").arg(&good).args([
        "--offset",
        "1K",
        "--pattern",
        "0xfe",
        "--length",
        "1K",
    ]));
    let out = ok(vhdx()
        .arg("read")
        .arg(&good)
        .args(["--offset", "1024", "--length", "1024"]));
    assert!(out.stdout.iter().all(|&x| x == 0xFE) && out.stdout.len() == 1024);
    let outf = dir.path().join("r.bin");
    ok(vhdx()
        .arg("read")
        .arg(&good)
        .args(["--offset", "1000", "--length", "100", "--output"])
        .arg(&outf));
    let r = std::fs::read(&outf).unwrap();
    assert!(r[..24].iter().all(|&x| x == 0) && r[24..].iter().all(|&x| x == 0xFE));
}

/// QEMU leaves a log pending when the BAT write after its log flush fails
/// (blkdebug injects EIO there); we replay QEMU's log, read-only in memory
/// and then on disk, and QEMU accepts the result with the data in place.
#[test]
fn qemu_pending_log_is_replayed_by_us() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.vhdx");
    ok(qemu_img()
        .args(["create", "-q", "-f", "vhdx", "-o", "block_size=1M"])
        .arg(&img)
        .arg("16M"));
    let bytes = std::fs::read(&img).unwrap();
    let regions = vstorage::vhdx::format::parse_region_table(&bytes[192 << 10..256 << 10]).unwrap();
    let bat_sector = regions.bat.file_offset / 512;
    let cfg = dir.path().join("blkdebug.cfg");
    std::fs::write(
        &cfg,
        format!("[inject-error]\nevent = \"pwritev\"\nerrno = \"5\"\nsector = \"{bat_sector}\"\nonce = \"on\"\n"),
    )
    .unwrap();
    let out = run(qemu_io().args(["-c", "write -P 0x5a 0 64k"]).arg(format!(
        "blkdebug:{}:{}",
        cfg.display(),
        img.display()
    )));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Input/output error")
            || String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
        "blkdebug did not fail the BAT write"
    );
    assert_eq!(info_field(&img, "log_replay_needed"), "true");
    let mut model = vec![0u8; 16 << 20];
    model[..64 << 10].fill(0x5a);
    let raw = dir.path().join("ro.raw");
    ok(vhdx().arg("convert").arg(&img).arg(&raw));
    assert!(std::fs::read(&raw).unwrap() == model, "in-memory replay");
    ok(vhdx().arg("check").arg(&img).arg("--repair"));
    let expect = dir.path().join("expect.raw");
    std::fs::write(&expect, &model).unwrap();
    qemu_check(&img);
    qemu_compare(&img, &expect);
}
