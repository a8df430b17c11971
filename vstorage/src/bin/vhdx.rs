//! `vhdx`: inspect, create, convert, check, read, write, merge and copy VHDX
//! images. Every failure is one line on stderr and exit status 1 (`check`
//! uses 2 for a file it can read but finds corrupt). No input panics.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use vstorage::io::{BlockIo, DiskError, FileIo, RawDisk, VirtualDisk};
use vstorage::vhdx::host::{
    create_differencing_path, create_path, open_for_merge, open_path, parent_display,
};
use vstorage::vhdx::{log_replay_needed, CreateParams, OpenOptions, Vhdx};

const USAGE: &str = "usage: vhdx <command> ...
  info FILE
  create FILE --size SIZE [--block-size SIZE] [--fixed] [--logical-sector-size 512|4096] [--parent PARENT]
  convert IN OUT
  check FILE [--repair]
  read FILE --offset N --length N [--output F]
  write FILE --offset N (--input F | --pattern BYTE --length N)
  merge CHILD
  copy SRC DST [--progress]
SIZE takes K/M/G/T suffixes (powers of 1024); BYTE is 0-255 or 0xNN.";

/// How a command failed: exit status and message.
struct Fail(u8, String);

impl From<DiskError> for Fail {
    fn from(e: DiskError) -> Self {
        Fail(1, e.to_string())
    }
}

fn fail<T>(msg: impl Into<String>) -> Result<T, Fail> {
    Err(Fail(1, msg.into()))
}

/// Parses `123`, `4K`, `32M`, `1G`, `2T` (optionally with `B`/`iB`).
fn parse_size(s: &str) -> Result<u64, Fail> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        Some('T' | 't') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: u64 = if let Some(h) = num.strip_prefix("0x") {
        u64::from_str_radix(h, 16).ok()
    } else {
        num.parse().ok()
    }
    .ok_or_else(|| Fail(1, format!("invalid size {s:?}")))?;
    n.checked_mul(mult)
        .ok_or_else(|| Fail(1, format!("size {s:?} is too large")))
}

fn parse_byte(s: &str) -> Result<u8, Fail> {
    let v = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u8::from_str_radix(h, 16).ok()
    } else {
        s.parse::<u8>().ok()
    };
    v.ok_or_else(|| Fail(1, format!("invalid byte {s:?} (0-255 or 0x00-0xff)")))
}

/// Parsed `--flag value` options and positional arguments.
struct Args {
    pos: Vec<String>,
    opts: Vec<(String, Option<String>)>,
}

impl Args {
    /// `flags` take no value; every other `--x` takes one.
    fn parse(raw: &[String], flags: &[&str], valued: &[&str]) -> Result<Args, Fail> {
        let mut pos = Vec::new();
        let mut opts = Vec::new();
        let mut it = raw.iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                if flags.contains(&name) {
                    opts.push((name.to_string(), None));
                } else if valued.contains(&name) {
                    let v = it
                        .next()
                        .ok_or_else(|| Fail(1, format!("--{name} needs a value")))?;
                    opts.push((name.to_string(), Some(v.clone())));
                } else {
                    return fail(format!("unknown option --{name}"));
                }
            } else {
                pos.push(a.clone());
            }
        }
        Ok(Args { pos, opts })
    }
    fn get(&self, name: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }
    fn has(&self, name: &str) -> bool {
        self.opts.iter().any(|(n, _)| n == name)
    }
    fn positional(&self, n: usize, what: &str) -> Result<Vec<PathBuf>, Fail> {
        if self.pos.len() != n {
            return fail(format!(
                "expected {what}, got {} argument(s) (see `vhdx --help`)",
                self.pos.len()
            ));
        }
        Ok(self.pos.iter().map(PathBuf::from).collect())
    }
}

fn is_vhdx(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("vhdx") || e.eq_ignore_ascii_case("avhdx"))
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn must_exist(p: &Path) -> Result<(), Fail> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => fail(format!("{}: not a regular file", p.display())),
        Err(e) => fail(format!("{}: {e}", p.display())),
    }
}

fn cmd_info(a: &Args) -> Result<(), Fail> {
    let f = &a.positional(1, "FILE")?[0];
    must_exist(f)?;
    let io = FileIo::open(f, false).map_err(|e| Fail(1, format!("{}: {e}", f.display())))?;
    let pending = log_replay_needed(&io)?;
    let d = Vhdx::open(io, OpenOptions::read_only())?;
    let parent = parent_display(f, &d);
    println!(
        "{{\"virtual_size\":{},\"block_size\":{},\"logical_sector_size\":{},\"physical_sector_size\":{},\"kind\":\"{}\",\"parent\":{},\"log_replay_needed\":{}}}",
        d.virtual_size(),
        d.block_size(),
        d.logical_sector_size(),
        d.physical_sector_size(),
        d.kind().as_str(),
        parent.as_deref().map(json_str).unwrap_or_else(|| "null".into()),
        pending
    );
    Ok(())
}

fn cmd_create(a: &Args) -> Result<(), Fail> {
    let f = &a.positional(1, "FILE")?[0];
    let block = a
        .get("block-size")
        .map(parse_size)
        .transpose()?
        .map(|b| u32::try_from(b).map_err(|_| Fail(1, format!("block size {b} too large"))))
        .transpose()?;
    if let Some(parent) = a.get("parent") {
        if a.has("fixed") {
            return fail("--fixed cannot be combined with --parent");
        }
        let parent = Path::new(parent);
        must_exist(parent)?;
        let mut d = create_differencing_path(f, parent, block)?;
        if let Some(s) = a.get("size") {
            if parse_size(s)? != d.virtual_size() {
                let _ = std::fs::remove_file(f);
                return fail("--size must match the parent's size (or be omitted) with --parent");
            }
        }
        d.close()?;
        return Ok(());
    }
    let size = parse_size(
        a.get("size")
            .ok_or_else(|| Fail(1, "--size is required".into()))?,
    )?;
    let mut p = CreateParams::dynamic(size);
    if let Some(b) = block {
        p.block_size = b;
    }
    p.fixed = a.has("fixed");
    if let Some(ls) = a.get("logical-sector-size") {
        p.logical_sector_size = match ls {
            "512" => 512,
            "4096" | "4K" | "4k" => 4096,
            _ => return fail(format!("logical sector size {ls:?} is not 512 or 4096")),
        };
    }
    p.physical_sector_size = 4096;
    p.validate()?;
    let r = create_path(f, &p);
    match r {
        Ok(mut d) => Ok(d.close()?),
        Err(e) => {
            // Only reached after the file was (re)created: remove the stub.
            let _ = std::fs::remove_file(f);
            Err(e.into())
        }
    }
}

/// A source for convert: a VHDX chain or a raw file (tail padded to a sector).
enum Source {
    Vhdx(Box<Vhdx<FileIo>>),
    Raw { io: FileIo, len: u64 },
}

impl Source {
    fn size(&self) -> u64 {
        match self {
            Source::Vhdx(d) => d.virtual_size(),
            Source::Raw { len, .. } => len.div_ceil(512) * 512,
        }
    }
    fn sector(&self) -> u32 {
        match self {
            Source::Vhdx(d) => d.logical_sector_size(),
            Source::Raw { .. } => 512,
        }
    }
    fn ranges(&mut self) -> Result<Vec<(u64, u64)>, Fail> {
        Ok(match self {
            Source::Vhdx(d) => d.allocated_ranges()?,
            Source::Raw { .. } => vec![(0, self.size())],
        })
    }
    fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<(), Fail> {
        match self {
            Source::Vhdx(d) => Ok(d.read(off, buf)?),
            Source::Raw { io, len } => {
                let have = len.saturating_sub(off).min(buf.len() as u64) as usize;
                io.read_at(off, &mut buf[..have]).map_err(DiskError::from)?;
                buf[have..].fill(0);
                Ok(())
            }
        }
    }
}

fn cmd_convert(a: &Args) -> Result<(), Fail> {
    let p = a.positional(2, "IN OUT")?;
    let (inp, out) = (&p[0], &p[1]);
    must_exist(inp)?;
    if std::fs::canonicalize(inp).ok() == std::fs::canonicalize(out).ok() {
        return fail("input and output are the same file");
    }
    let mut src = if is_vhdx(inp) {
        Source::Vhdx(Box::new(open_path(inp, false)?))
    } else {
        let io =
            FileIo::open(inp, false).map_err(|e| Fail(1, format!("{}: {e}", inp.display())))?;
        let len = io.len().map_err(DiskError::from)?;
        if len == 0 {
            return fail(format!("{}: raw image is empty", inp.display()));
        }
        Source::Raw { io, len }
    };
    let size = src.size();
    let mut dst: Box<dyn VirtualDisk> = if is_vhdx(out) {
        let mut p = CreateParams::dynamic(size);
        p.logical_sector_size = src.sector();
        if let Source::Vhdx(d) = &src {
            p.block_size = d.block_size();
            p.physical_sector_size = d.physical_sector_size();
        }
        Box::new(create_path(out, &p)?)
    } else {
        let io = FileIo::create(out).map_err(|e| Fail(1, format!("{}: {e}", out.display())))?;
        Box::new(RawDisk::create(io, size)?)
    };
    let chunk = 1usize << 20;
    let mut buf = vec![0u8; chunk];
    for (off, len) in src.ranges()? {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk as u64) as usize;
            let b = &mut buf[..n];
            src.read(off + done, b)?;
            // Leave all-zero chunks unwritten: they read as zeros already.
            if b.iter().any(|&x| x != 0) {
                dst.write(off + done, b)?;
            }
            done += n as u64;
        }
    }
    dst.flush()?;
    Ok(())
}

fn cmd_check(a: &Args) -> Result<(), Fail> {
    let f = &a.positional(1, "FILE")?[0];
    must_exist(f)?;
    let repair = a.has("repair");
    let io = FileIo::open(f, false).map_err(|e| Fail(1, format!("{}: {e}", f.display())))?;
    let to_fail = |e: DiskError| match e {
        DiskError::Corrupt(m) => Fail(2, format!("{}: corrupt: {m}", f.display())),
        other => Fail(1, format!("{}: {other}", f.display())),
    };
    let pending = log_replay_needed(&io).map_err(to_fail)?;
    drop(io);
    if pending {
        if !repair {
            return Err(Fail(
                2,
                format!(
                    "{}: log replay needed (run `vhdx check --repair`)",
                    f.display()
                ),
            ));
        }
        let io = FileIo::open(f, true).map_err(|e| Fail(1, format!("{}: {e}", f.display())))?;
        let mut d = Vhdx::open(
            io,
            OpenOptions::read_write(vstorage::vhdx::host::new_seed()),
        )
        .map_err(to_fail)?;
        d.close().map_err(to_fail)?;
        println!("{}: log replayed", f.display());
    }
    let mut d = open_path(f, false).map_err(to_fail)?;
    d.verify().map_err(to_fail)?;
    // Walk every allocated range so sector bitmaps and block offsets are read.
    let ranges = d.allocated_ranges().map_err(to_fail)?;
    let ss = d.logical_sector_size() as usize;
    let mut b = vec![0u8; ss];
    for (off, _) in ranges {
        d.read(off, &mut b).map_err(to_fail)?;
    }
    println!("{}: consistent", f.display());
    Ok(())
}

/// Reads `[offset, offset+len)` of any alignment into `out`, one chunk at a time.
fn read_range(
    d: &mut dyn VirtualDisk,
    offset: u64,
    len: u64,
    out: &mut dyn FnMut(&[u8]) -> Result<(), Fail>,
) -> Result<(), Fail> {
    let ss = u64::from(d.logical_sector_size());
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= d.virtual_size())
        .ok_or_else(|| {
            Fail(
                1,
                format!(
                    "range {offset}+{len} runs past the end of the {}-byte disk",
                    d.virtual_size()
                ),
            )
        })?;
    let chunk = 1u64 << 20;
    let mut cur = offset;
    let mut buf = Vec::new();
    while cur < end {
        let a_start = cur - cur % ss;
        let a_end = ((cur + chunk).min(end)).div_ceil(ss) * ss;
        buf.resize((a_end - a_start) as usize, 0);
        d.read(a_start, &mut buf)?;
        let take_end = (cur + chunk).min(end);
        out(&buf[(cur - a_start) as usize..(take_end - a_start) as usize])?;
        cur = take_end;
    }
    Ok(())
}

fn open_any(f: &Path, writable: bool) -> Result<Box<dyn VirtualDisk>, Fail> {
    must_exist(f)?;
    if is_vhdx(f) {
        Ok(Box::new(open_path(f, writable)?))
    } else {
        let io = FileIo::open(f, writable).map_err(|e| Fail(1, format!("{}: {e}", f.display())))?;
        Ok(Box::new(RawDisk::open(io)?))
    }
}

fn cmd_read(a: &Args) -> Result<(), Fail> {
    let f = &a.positional(1, "FILE")?[0];
    let offset = parse_size(
        a.get("offset")
            .ok_or_else(|| Fail(1, "--offset is required".into()))?,
    )?;
    let len = parse_size(
        a.get("length")
            .ok_or_else(|| Fail(1, "--length is required".into()))?,
    )?;
    let mut d = open_any(f, false)?;
    let mut sink: Box<dyn Write> = match a.get("output") {
        Some(o) => Box::new(std::fs::File::create(o).map_err(|e| Fail(1, format!("{o}: {e}")))?),
        None => Box::new(std::io::stdout().lock()),
    };
    read_range(d.as_mut(), offset, len, &mut |b| {
        sink.write_all(b)
            .map_err(|e| Fail(1, format!("write to output failed: {e}")))
    })?;
    sink.flush()
        .map_err(|e| Fail(1, format!("write to output failed: {e}")))
}

/// Where `write` takes its bytes from, streamed a chunk at a time.
enum Payload {
    Pattern(u8),
    File(std::fs::File),
}

impl Payload {
    fn fill(&mut self, dst: &mut [u8]) -> Result<(), Fail> {
        match self {
            Payload::Pattern(b) => {
                dst.fill(*b);
                Ok(())
            }
            Payload::File(f) => f
                .read_exact(dst)
                .map_err(|e| Fail(1, format!("reading --input failed: {e}"))),
        }
    }
}

fn cmd_write(a: &Args) -> Result<(), Fail> {
    let f = &a.positional(1, "FILE")?[0];
    let offset = parse_size(
        a.get("offset")
            .ok_or_else(|| Fail(1, "--offset is required".into()))?,
    )?;
    let (mut payload, len) = match (a.get("input"), a.get("pattern")) {
        (Some(i), None) => {
            if a.has("length") {
                return fail("--length goes with --pattern, not --input");
            }
            let h = std::fs::File::open(i).map_err(|e| Fail(1, format!("{i}: {e}")))?;
            let len = h
                .metadata()
                .map_err(|e| Fail(1, format!("{i}: {e}")))?
                .len();
            (Payload::File(h), len)
        }
        (None, Some(p)) => {
            let b = parse_byte(p)?;
            let len = parse_size(
                a.get("length")
                    .ok_or_else(|| Fail(1, "--pattern needs --length".into()))?,
            )?;
            (Payload::Pattern(b), len)
        }
        _ => return fail("give exactly one of --input F or --pattern BYTE --length N"),
    };
    let mut d = open_any(f, true)?;
    let ss = u64::from(d.logical_sector_size());
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= d.virtual_size())
        .ok_or_else(|| {
            Fail(
                1,
                format!(
                    "write of {len} bytes at {offset} runs past the end of the {}-byte disk",
                    d.virtual_size()
                ),
            )
        })?;
    let chunk = 1u64 << 20;
    let mut cur = offset;
    let mut buf = Vec::new();
    while cur < end {
        let a_start = cur - cur % ss;
        let take_end = (a_start + chunk).min(end);
        let a_end = take_end.div_ceil(ss) * ss;
        buf.resize((a_end - a_start) as usize, 0);
        // Read-modify-write of partial edge sectors.
        if a_start != cur || a_end != take_end {
            d.read(a_start, &mut buf)?;
        }
        payload.fill(&mut buf[(cur - a_start) as usize..(take_end - a_start) as usize])?;
        d.write(a_start, &buf)?;
        cur = take_end;
    }
    d.flush()?;
    Ok(())
}

fn cmd_merge(a: &Args) -> Result<(), Fail> {
    let f = &a.positional(1, "CHILD")?[0];
    must_exist(f)?;
    let mut d = open_for_merge(f)?;
    if d.parent().is_none() {
        return fail(format!("{}: not a differencing disk", f.display()));
    }
    let parent = parent_display(f, &d).unwrap_or_default();
    d.merge_into_parent()?;
    d.close()?;
    drop(d);
    // The child's linkage no longer matches the merged parent: remove it, as
    // Hyper-V does after a merge.
    std::fs::remove_file(f)
        .map_err(|e| Fail(1, format!("merged, but cannot remove {}: {e}", f.display())))?;
    println!("merged {} into {parent}", f.display());
    Ok(())
}

fn cmd_copy(a: &Args) -> Result<(), Fail> {
    let p = a.positional(2, "SRC DST")?;
    // Dispatch point: the one-pass copy engine lives in vstorage::copy.
    vstorage::copy::cli_copy(&p[0], &p[1], a.has("progress")).map_err(|m| Fail(1, m))
}

fn run(argv: &[String]) -> Result<(), Fail> {
    let Some((cmd, rest)) = argv.split_first() else {
        return fail("no command given (see `vhdx --help`)");
    };
    match cmd.as_str() {
        "info" => cmd_info(&Args::parse(rest, &[], &[])?),
        "create" => cmd_create(&Args::parse(
            rest,
            &["fixed"],
            &["size", "block-size", "logical-sector-size", "parent"],
        )?),
        "convert" => cmd_convert(&Args::parse(rest, &[], &[])?),
        "check" => cmd_check(&Args::parse(rest, &["repair"], &[])?),
        "read" => cmd_read(&Args::parse(rest, &[], &["offset", "length", "output"])?),
        "write" => cmd_write(&Args::parse(
            rest,
            &[],
            &["offset", "input", "pattern", "length"],
        )?),
        "merge" => cmd_merge(&Args::parse(rest, &[], &[])?),
        "copy" => cmd_copy(&Args::parse(rest, &["progress"], &[])?),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => fail(format!("unknown command {other:?} (see `vhdx --help`)")),
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    match run(&argv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("vhdx: {msg}");
            ExitCode::from(code)
        }
    }
}
