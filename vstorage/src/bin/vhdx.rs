//! `vhdx`: inspect, create, convert, check, read, write, merge and copy VHDX
//! images. Arguments are parsed by clap: `--help` on every subcommand, and a
//! usage error is one line on stderr with exit status 2. Every other
//! failure is one line on stderr and exit status 1, except that `check`
//! uses 2 for a file it can read but finds corrupt. No input panics.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vstorage::fsops::{self, HostFileOps};
use vstorage::io::{BlockIo, DiskError, FileIo, RawDisk, VirtualDisk};
use vstorage::vhdx::host::{
    create_differencing_path, create_path, open_for_merge, open_path, parent_display,
};
use vstorage::vhdx::{log_replay_needed, CreateParams, OpenOptions, Vhdx};

#[derive(Parser, Debug)]
#[command(
    name = "vhdx",
    version,
    about = "Inspect, create, convert, check, read, write, merge and copy VHDX images",
    after_help = "SIZE takes K/M/G/T suffixes (powers of 1024); BYTE is 0-255 or 0xNN.\n\
                  Exit status: 0 ok; 1 the command failed; 2 a usage error, or `check` found the file corrupt."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print a file's parameters as one JSON object
    Info {
        /// The VHDX file
        file: PathBuf,
    },
    /// Create a dynamic, fixed or differencing VHDX (truncating FILE)
    Create {
        /// The file to create
        file: PathBuf,
        /// Virtual size (required unless --parent)
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        size: Option<u64>,
        /// Payload block size, a power of two from 1M to 256M [default: 32M, or the parent's]
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        block_size: Option<u64>,
        /// Allocate every block now (the file takes its full size on disk)
        #[arg(long, conflicts_with = "parent")]
        fixed: bool,
        /// Logical sector size [default: 512]
        #[arg(long, value_name = "512|4096", value_parser = parse_sector)]
        logical_sector_size: Option<u32>,
        /// Make a differencing disk of this parent
        #[arg(long, value_name = "PARENT")]
        parent: Option<PathBuf>,
    },
    /// Convert between VHDX and raw (by extension), copying allocated data only
    Convert {
        /// The source image (.vhdx/.avhdx or raw)
        input: PathBuf,
        /// The image to write (.vhdx/.avhdx or raw)
        output: PathBuf,
    },
    /// Check a file's consistency: 0 consistent, 2 corrupt, 1 unreadable
    Check {
        /// The VHDX file
        file: PathBuf,
        /// Replay a pending log first (writes the file)
        #[arg(long)]
        repair: bool,
    },
    /// Read a range of the virtual disk (any alignment)
    Read {
        /// The disk (.vhdx/.avhdx or raw)
        file: PathBuf,
        /// First byte
        #[arg(long, value_name = "N", value_parser = parse_size)]
        offset: u64,
        /// Number of bytes
        #[arg(long, value_name = "N", value_parser = parse_size)]
        length: u64,
        /// Write the bytes here instead of stdout
        #[arg(long, value_name = "F")]
        output: Option<PathBuf>,
    },
    /// Write bytes into the virtual disk (any alignment)
    Write(WriteArgs),
    /// Fold a differencing disk into its parent, then delete it
    Merge {
        /// The differencing disk
        child: PathBuf,
    },
    /// Copy a disk to a new file of the same kind in one unbuffered pass
    Copy {
        /// The disk to copy
        src: PathBuf,
        /// The new file (must not exist)
        dst: PathBuf,
        /// Draw a progress bar on stderr (when stdout is a terminal)
        #[arg(long)]
        progress: bool,
    },
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("payload").required(true).args(["input", "pattern"])))]
struct WriteArgs {
    /// The disk (.vhdx/.avhdx or raw)
    file: PathBuf,
    /// First byte
    #[arg(long, value_name = "N", value_parser = parse_size)]
    offset: u64,
    /// Take the bytes from this file
    #[arg(long, value_name = "F")]
    input: Option<PathBuf>,
    /// Write this byte, --length times
    #[arg(long, value_name = "BYTE", value_parser = parse_byte, requires = "length")]
    pattern: Option<u8>,
    /// Number of bytes (with --pattern)
    #[arg(long, value_name = "N", value_parser = parse_size, conflicts_with = "input")]
    length: Option<u64>,
}

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

/// Parses `123`, `4K`, `32M`, `1G`, `2T` (optionally with `B`/`iB`), or hex `0x...`.
fn parse_size(s: &str) -> Result<u64, String> {
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
    .ok_or_else(|| format!("invalid size {s:?}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn parse_byte(s: &str) -> Result<u8, String> {
    let v = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u8::from_str_radix(h, 16).ok()
    } else {
        s.parse::<u8>().ok()
    };
    v.ok_or_else(|| format!("invalid byte {s:?} (0-255 or 0x00-0xff)"))
}

fn parse_sector(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" | "4K" | "4k" => Ok(4096),
        _ => Err(format!("logical sector size {s:?} is not 512 or 4096")),
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

fn cmd_info(f: &Path) -> Result<(), Fail> {
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

fn cmd_create(
    f: &Path,
    size: Option<u64>,
    block_size: Option<u64>,
    fixed: bool,
    logical_sector_size: Option<u32>,
    parent: Option<&Path>,
) -> Result<(), Fail> {
    let block = block_size
        .map(|b| u32::try_from(b).map_err(|_| Fail(1, format!("block size {b} too large"))))
        .transpose()?;
    if let Some(parent) = parent {
        must_exist(parent)?;
        let mut d = create_differencing_path(f, parent, block)?;
        if size.is_some_and(|s| s != d.virtual_size()) {
            drop(d);
            let _ = std::fs::remove_file(f);
            return fail("--size must match the parent's size (or be omitted) with --parent");
        }
        d.close()?;
        return Ok(());
    }
    let size = size.ok_or_else(|| Fail(1, "--size is required".into()))?;
    let mut p = CreateParams::dynamic(size);
    if let Some(b) = block {
        p.block_size = b;
    }
    p.fixed = fixed;
    if let Some(ls) = logical_sector_size {
        p.logical_sector_size = ls;
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

fn cmd_convert(inp: &Path, out: &Path) -> Result<(), Fail> {
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
    // The new file's name is durable before we report success.
    fsops::created(&HostFileOps, out).map_err(|e| Fail(1, format!("{}: {e}", out.display())))?;
    Ok(())
}

fn cmd_check(f: &Path, repair: bool) -> Result<(), Fail> {
    must_exist(f)?;
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

/// One step over an unaligned range: the bytes `[from, to)` and the whole
/// sectors `[start, end)` that cover them (at most 1 MiB of bytes).
struct Window {
    start: u64,
    end: u64,
    from: u64,
    to: u64,
}

impl Window {
    /// Where the window's bytes lie in a buffer holding its sectors.
    fn bytes(&self) -> std::ops::Range<usize> {
        (self.from - self.start) as usize..(self.to - self.start) as usize
    }
}

/// The windows covering `[offset, offset+len)` of `d`, in order; `what`
/// ("read", "write") names the request in the error for a range past the end.
fn windows(
    d: &dyn VirtualDisk,
    offset: u64,
    len: u64,
    what: &str,
) -> Result<impl Iterator<Item = Window>, Fail> {
    let ss = u64::from(d.logical_sector_size());
    let size = d.virtual_size();
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= size)
        .ok_or_else(|| {
            Fail(
                1,
                format!(
                    "{what} of {len} bytes at {offset} runs past the end of the {size}-byte disk"
                ),
            )
        })?;
    let mut cur = offset;
    Ok(std::iter::from_fn(move || {
        if cur >= end {
            return None;
        }
        let to = (cur + (1 << 20)).min(end);
        let w = Window {
            start: cur - cur % ss,
            end: to.div_ceil(ss) * ss,
            from: cur,
            to,
        };
        cur = to;
        Some(w)
    }))
}

/// Reads `[offset, offset+len)` of any alignment into `out`, one chunk at a time.
fn read_range(
    d: &mut dyn VirtualDisk,
    offset: u64,
    len: u64,
    out: &mut dyn FnMut(&[u8]) -> Result<(), Fail>,
) -> Result<(), Fail> {
    let mut buf = Vec::new();
    for w in windows(d, offset, len, "read")? {
        buf.resize((w.end - w.start) as usize, 0);
        d.read(w.start, &mut buf)?;
        out(&buf[w.bytes()])?;
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

fn cmd_read(f: &Path, offset: u64, len: u64, output: Option<&Path>) -> Result<(), Fail> {
    let mut d = open_any(f, false)?;
    let mut sink: Box<dyn Write> = match output {
        Some(o) => Box::new(
            std::fs::File::create(o).map_err(|e| Fail(1, format!("{}: {e}", o.display())))?,
        ),
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

fn cmd_write(w: &WriteArgs) -> Result<(), Fail> {
    let (f, offset) = (&w.file, w.offset);
    let (mut payload, len) = match (&w.input, w.pattern, w.length) {
        (Some(i), None, None) => {
            let h = std::fs::File::open(i).map_err(|e| Fail(1, format!("{}: {e}", i.display())))?;
            let len = h
                .metadata()
                .map_err(|e| Fail(1, format!("{}: {e}", i.display())))?
                .len();
            (Payload::File(h), len)
        }
        (None, Some(b), Some(len)) => (Payload::Pattern(b), len),
        // clap's argument group and `requires` rule out the rest.
        _ => return fail("give exactly one of --input F or --pattern BYTE --length N"),
    };
    let mut d = open_any(f, true)?;
    let mut buf = Vec::new();
    for w in windows(d.as_ref(), offset, len, "write")? {
        buf.resize((w.end - w.start) as usize, 0);
        // Read-modify-write of partial edge sectors.
        if w.start != w.from || w.end != w.to {
            d.read(w.start, &mut buf)?;
        }
        payload.fill(&mut buf[w.bytes()])?;
        d.write(w.start, &buf)?;
    }
    d.flush()?;
    Ok(())
}

fn cmd_merge(f: &Path) -> Result<(), Fail> {
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

fn cmd_copy(src: &Path, dst: &Path, progress: bool) -> Result<(), Fail> {
    // Dispatch point: the one-pass copy engine lives in vstorage::copy.
    vstorage::copy::cli_copy(src, dst, progress).map_err(|m| Fail(1, m))
}

fn run(cmd: Cmd) -> Result<(), Fail> {
    match cmd {
        Cmd::Info { file } => cmd_info(&file),
        Cmd::Create {
            file,
            size,
            block_size,
            fixed,
            logical_sector_size,
            parent,
        } => cmd_create(
            &file,
            size,
            block_size,
            fixed,
            logical_sector_size,
            parent.as_deref(),
        ),
        Cmd::Convert { input, output } => cmd_convert(&input, &output),
        Cmd::Check { file, repair } => cmd_check(&file, repair),
        Cmd::Read {
            file,
            offset,
            length,
            output,
        } => cmd_read(&file, offset, length, output.as_deref()),
        Cmd::Write(w) => cmd_write(&w),
        Cmd::Merge { child } => cmd_merge(&child),
        Cmd::Copy { src, dst, progress } => cmd_copy(&src, &dst, progress),
    }
}

fn main() -> ExitCode {
    let cli = match vstorage::cli::parse::<Cli>("vhdx") {
        Ok(c) => c,
        Err(code) => return code,
    };
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("vhdx: {msg}");
            ExitCode::from(code)
        }
    }
}
