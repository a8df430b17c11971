//! `linux_image`: the Linux guest image, built from Debian packages without
//! installing anything into the host system.
//!
//! [`build`] downloads Debian's kernel (`linux-image-*-amd64`, the package
//! `linux-image-amd64` depends on) and `busybox-static` with
//! `apt-get download`, unpacks them with `dpkg-deb -x` into
//! `target/linux-guest/`, and writes an initramfs (newc cpio, uncompressed,
//! by [`CpioWriter`]) holding busybox, a small `/init`, `/dev/console`, and
//! the kernel modules the guest needs ([`GUEST_MODULES`] and what they
//! depend on). Everything is cached: the packages are downloaded once, and
//! the initramfs is rebuilt only when its recipe ([`RECIPE_VERSION`]) or the
//! unpacked packages change.
//!
//! Module dependencies: a Debian package ships no `modules.dep` (depmod runs
//! at installation), so the `depends=` field of each module's `.modinfo`
//! ELF section is read instead, and the modules are loaded by `/init` with
//! `insmod` in dependency order. Parameters on the kernel command line of
//! the form `MODULE.PARAM=VALUE` are passed to `insmod`, as `modprobe`
//! would.
//!
//! The guest's `/init` mounts /proc, /sys and /dev (devtmpfs), installs the
//! busybox applets, loads the modules, prints [`BANNER`] on the console
//! and starts a shell on it with job control (`setsid cttyhack sh`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The cache directory under the cargo target directory.
pub const CACHE_DIR: &str = "linux-guest";
/// The metapackage naming the current kernel package.
pub const KERNEL_META_PACKAGE: &str = "linux-image-amd64";
/// Busybox, statically linked.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Modules the guest loads at boot (the virtio-mmio transport and the
/// virtio block driver); their dependencies are added.
pub const GUEST_MODULES: &[&str] = &["virtio_mmio", "virtio_blk"];
/// The line `/init` prints when the shell is about to start.
pub const BANNER: &str = "hvmigrate-linux: shell ready";
/// Bumped whenever the initramfs contents change for the same packages.
pub const RECIPE_VERSION: u32 = 2;
/// The kernel argument (`vm create --linux --append hvmigrate.ticks=1`)
/// that makes `/init` print a counter line every second, in the
/// background, for watching a VM through `vm console` (which takes no
/// input): [`TICK_PREFIX`]`N clock SECONDS dmesg-bad COUNT`, COUNT being
/// the `dmesg` lines matching `hvcore::abi::case::LINUX_DMESG_BAD`.
pub const TICKS_ARG: &str = "hvmigrate.ticks=1";
pub const TICK_PREFIX: &str = "hvmigrate-linux: tick ";

/// What [`build`] produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxImage {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The initramfs (newc cpio).
    pub initramfs: PathBuf,
    /// `uname -r` of the kernel.
    pub release: String,
    /// Modules in the initramfs, in load order.
    pub modules: Vec<String>,
}

/// Why the image could not be built.
#[derive(Debug)]
pub enum ImageError {
    /// A host command failed (what, and its output).
    Command { what: String, detail: String },
    /// A file operation failed.
    Io { path: PathBuf, error: io::Error },
    /// The packages do not hold what they should.
    Content(String),
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageError::Command { what, detail } => write!(f, "{what} failed: {detail}"),
            ImageError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            ImageError::Content(m) => write!(f, "Linux guest image: {m}"),
        }
    }
}

impl std::error::Error for ImageError {}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |error| ImageError::Io {
        path: path.to_path_buf(),
        error,
    }
}

// ---------------------------------------------------------------------------
// newc cpio

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
/// The newc magic.
const NEWC_MAGIC: &[u8; 6] = b"070701";
/// The name of the archive's last entry.
const TRAILER: &str = "TRAILER!!!";

/// Writes a newc ("SVR4 with no CRC") cpio archive, the format the Linux
/// initramfs unpacker reads (Documentation/driver-api/early-userspace/
/// buffer-format.rst): per entry a 110-byte ASCII header (magic `070701`,
/// then 13 eight-digit hex fields), the NUL-terminated name padded to 4
/// bytes, the data padded to 4 bytes; a `TRAILER!!!` entry ends it.
///
/// Entries get distinct inode numbers and one link each (no hard links),
/// owner root, modification time 0 (reproducible output). Names are
/// relative (`bin/busybox`), as the kernel expects.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        if name.is_empty() || name.contains('\0') || name.starts_with('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio entry name {name:?}"),
            ));
        }
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry over 4 GiB"))?;
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut header = Vec::with_capacity(110 + name.len() + 4);
        header.extend_from_slice(NEWC_MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        while header.len() % 4 != 0 {
            header.push(0);
        }
        self.out.write_all(&header)?;
        self.out.write_all(data)?;
        let pad = (4 - data.len() % 4) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        self.written += (header.len() + data.len() + pad) as u64;
        Ok(())
    }

    /// A directory.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Write the trailer and return the writer and the archive's size.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.entry(TRAILER, 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok((self.out, self.written))
    }
}

/// One entry of a parsed newc archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpioEntry {
    pub name: String,
    pub mode: u32,
    pub nlink: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

/// Parse a newc archive up to its trailer (tests and diagnostics: the
/// reader the kernel uses has the same rules).
pub fn parse_cpio(mut bytes: &[u8]) -> Result<Vec<CpioEntry>, String> {
    let mut entries = Vec::new();
    let start_len = bytes.len();
    loop {
        let at = start_len - bytes.len();
        if bytes.len() < 110 {
            return Err(format!("truncated header at {at}"));
        }
        if &bytes[..6] != NEWC_MAGIC {
            return Err(format!("bad magic at {at}"));
        }
        let mut f = [0u32; 13];
        for (i, v) in f.iter_mut().enumerate() {
            let s = std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i])
                .map_err(|_| format!("non-ASCII field {i} at {at}"))?;
            *v = u32::from_str_radix(s, 16).map_err(|_| format!("bad hex field {i} at {at}"))?;
        }
        let (mode, nlink, size) = (f[1], f[4], f[6] as usize);
        let rdev = (f[9], f[10]);
        let namesize = f[11] as usize;
        let name_end = 110 + namesize;
        let data_start = name_end.next_multiple_of(4);
        let data_end = data_start + size;
        if namesize == 0 || bytes.len() < data_end {
            return Err(format!("entry at {at} runs past the end"));
        }
        if bytes[name_end - 1] != 0 {
            return Err(format!("name at {at} not NUL-terminated"));
        }
        let name = String::from_utf8_lossy(&bytes[110..name_end - 1]).into_owned();
        let data = bytes[data_start..data_end].to_vec();
        bytes = &bytes[data_end.next_multiple_of(4).min(bytes.len())..];
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(CpioEntry {
            name,
            mode,
            nlink,
            rdev,
            data,
        });
    }
}

// ---------------------------------------------------------------------------
// Kernel modules

/// The `.modinfo` section of an ELF64 little-endian object, if any.
pub fn modinfo_section(elf: &[u8]) -> Result<Option<&[u8]>, String> {
    let u16_at = |o: usize| -> Result<u16, String> {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| format!("truncated ELF at {o}"))
    };
    let u32_at = |o: usize| -> Result<u32, String> {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .ok_or_else(|| format!("truncated ELF at {o}"))
    };
    let u64_at = |o: usize| -> Result<usize, String> {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
            .ok_or_else(|| format!("truncated ELF at {o}"))
    };
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Err("not a 64-bit little-endian ELF object".into());
    }
    let shoff = u64_at(0x28)?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    let shstrndx = usize::from(u16_at(0x3e)?);
    if shentsize < 64 || shnum > 4096 || shstrndx >= shnum {
        return Err("bad section header table".into());
    }
    let section = |i: usize| -> Result<(u32, usize, usize), String> {
        let base = shoff
            .checked_add(i.checked_mul(shentsize).ok_or("overflow")?)
            .ok_or("overflow")?;
        Ok((u32_at(base)?, u64_at(base + 0x18)?, u64_at(base + 0x20)?))
    };
    let bytes_of = |off: usize, size: usize| -> Result<&[u8], String> {
        off.checked_add(size)
            .and_then(|end| elf.get(off..end))
            .ok_or_else(|| "section outside the file".to_string())
    };
    let (_, str_off, str_size) = section(shstrndx)?;
    let strtab = bytes_of(str_off, str_size)?;
    for i in 0..shnum {
        let (name_off, off, size) = section(i)?;
        let name = strtab
            .get(name_off as usize..)
            .and_then(|s| s.split(|&b| b == 0).next())
            .unwrap_or(&[]);
        if name == b".modinfo" {
            return Ok(Some(bytes_of(off, size)?));
        }
    }
    Ok(None)
}

/// The module names a `.modinfo` section's `depends=` field lists.
pub fn modinfo_depends(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|&b| b == 0)
        .filter_map(|f| f.strip_prefix(b"depends="))
        .flat_map(|d| d.split(|&b| b == b','))
        .filter(|d| !d.is_empty())
        .map(|d| module_key(&String::from_utf8_lossy(d)))
        .collect()
}

/// Module names compare with `-` and `_` equal (as modprobe does).
pub fn module_key(name: &str) -> String {
    name.replace('-', "_")
}

/// `wanted` and everything they depend on, dependencies first. `deps`
/// gives a module's direct dependencies, `None` if the module is unknown.
/// Modules in `builtin` are satisfied without loading.
pub fn module_load_order(
    wanted: &[&str],
    deps: &dyn Fn(&str) -> Option<Vec<String>>,
    builtin: &BTreeSet<String>,
) -> Result<Vec<String>, String> {
    fn visit(
        m: &str,
        deps: &dyn Fn(&str) -> Option<Vec<String>>,
        builtin: &BTreeSet<String>,
        state: &mut BTreeMap<String, bool>,
        order: &mut Vec<String>,
        path: &mut Vec<String>,
    ) -> Result<(), String> {
        if builtin.contains(m) {
            return Ok(());
        }
        match state.get(m) {
            Some(true) => return Ok(()),
            Some(false) => {
                return Err(format!(
                    "module dependency cycle: {} -> {m}",
                    path.join(" -> ")
                ))
            }
            None => {}
        }
        state.insert(m.to_string(), false);
        path.push(m.to_string());
        let list = deps(m)
            .ok_or_else(|| format!("module {m} not found (wanted by {})", path.join(" <- ")))?;
        for d in list {
            visit(&d, deps, builtin, state, order, path)?;
        }
        path.pop();
        state.insert(m.to_string(), true);
        order.push(m.to_string());
        Ok(())
    }
    let mut state = BTreeMap::new();
    let mut order = Vec::new();
    for w in wanted {
        visit(
            &module_key(w),
            deps,
            builtin,
            &mut state,
            &mut order,
            &mut Vec::new(),
        )?;
    }
    Ok(order)
}

// ---------------------------------------------------------------------------
// The initramfs

/// The guest's `/init`.
pub fn init_script() -> String {
    format!(
        r#"#!/bin/sh
# hvmigrate Linux guest init (written by qemu-runner's linux_image).
export PATH=/bin:/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
for m in $(cat /etc/modules-order); do
    args=""
    for a in $(cat /proc/cmdline); do
        case "$a" in "$m".*) args="$args ${{a#"$m".}}" ;; esac
    done
    insmod /lib/modules/"$m".ko $args || echo "hvmigrate-linux: insmod $m failed"
done
echo "hvmigrate-linux: $(uname -r) up $(cut -d' ' -f1 /proc/uptime)s"
case " $(cat /proc/cmdline) " in
*" {TICKS_ARG} "*)
    (i=0; while true; do
        i=$((i+1))
        echo "{TICK_PREFIX}$i clock $(date +%s) dmesg-bad $(dmesg | grep -cE '{DMESG_BAD}')"
        sleep 1
    done) &
    ;;
esac
echo "{BANNER}"
exec setsid cttyhack /bin/sh
"#,
        DMESG_BAD = hvcore::abi::case::LINUX_DMESG_BAD
    )
}

/// A counter line of `/init`'s ticker ([`TICKS_ARG`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tick {
    /// Counts from 1, one a second.
    pub n: u64,
    /// The guest's clock (`date +%s`).
    pub clock_s: u64,
    /// `dmesg` lines matching `LINUX_DMESG_BAD` so far.
    pub dmesg_bad: u64,
}

/// Parse a ticker line (the node's `[vm] ` prefix removed); `None` for
/// any other line, the terminal's echo of a command included. The first
/// line after the shell starts follows its prompt (`/ # `, which ends in
/// no newline, and the cursor query), so text before the counter is
/// allowed unless it is a command typed at that prompt.
pub fn parse_tick(line: &str) -> Option<Tick> {
    let at = line.find(TICK_PREFIX)?;
    if line[..at].contains("echo") {
        return None;
    }
    let rest = line[at + TICK_PREFIX.len()..].trim_end();
    let mut w = rest.split(' ');
    let n = w.next()?.parse().ok()?;
    let clock_s = (w.next()? == "clock").then(|| w.next())??.parse().ok()?;
    let dmesg_bad = (w.next()? == "dmesg-bad")
        .then(|| w.next())??
        .parse()
        .ok()?;
    w.next().is_none().then_some(Tick {
        n,
        clock_s,
        dmesg_bad,
    })
}

/// Write the initramfs: busybox, `/init`, `/dev/console`, and `modules`
/// as `(name, .ko bytes)` in load order.
pub fn write_initramfs<W: Write>(
    out: W,
    busybox: &[u8],
    modules: &[(String, Vec<u8>)],
) -> io::Result<(W, u64)> {
    let mut c = CpioWriter::new(out);
    for d in [
        "bin",
        "sbin",
        "dev",
        "etc",
        "lib",
        "lib/modules",
        "proc",
        "sys",
        "tmp",
        "root",
    ] {
        c.dir(d, if d == "tmp" { 0o1777 } else { 0o755 })?;
    }
    // The kernel opens /dev/console before running /init; devtmpfs comes
    // later.
    c.char_dev("dev/console", 0o600, 5, 1)?;
    c.file("bin/busybox", 0o755, busybox)?;
    c.symlink("bin/sh", "busybox")?;
    c.file("init", 0o755, init_script().as_bytes())?;
    let mut order = String::new();
    for (name, ko) in modules {
        c.file(&format!("lib/modules/{name}.ko"), 0o644, ko)?;
        order.push_str(name);
        order.push('\n');
    }
    c.file("etc/modules-order", 0o644, order.as_bytes())?;
    c.finish()
}

// ---------------------------------------------------------------------------
// Packages

fn run(cmd: &mut Command, what: &str) -> Result<String, ImageError> {
    let out = cmd.output().map_err(|e| ImageError::Command {
        what: what.into(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(ImageError::Command {
            what: what.into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The kernel package `apt-cache depends linux-image-amd64` names.
pub fn kernel_package_from_depends(output: &str) -> Option<String> {
    output.lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends:")?.trim();
        (dep.starts_with("linux-image-") && dep.ends_with("-amd64")).then(|| dep.to_string())
    })
}

/// Whether `file` is a cached `.deb` of a concrete kernel package (not
/// the metapackage, not the cloud or realtime flavours).
pub fn is_kernel_deb(file: &str) -> bool {
    let Some(pkg) = file.split('_').next() else {
        return false;
    };
    file.ends_with(".deb")
        && pkg.starts_with("linux-image-")
        && pkg.ends_with("-amd64")
        && pkg != KERNEL_META_PACKAGE
        && !pkg.contains("-cloud-")
        && !pkg.contains("-rt-")
        && !pkg.contains("-dbg")
}

fn cached_deb(debs: &Path, is_it: impl Fn(&str) -> bool) -> Result<Option<PathBuf>, ImageError> {
    if !debs.exists() {
        return Ok(None);
    }
    let mut found: Vec<PathBuf> = fs::read_dir(debs)
        .map_err(io_err(debs))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&is_it))
        .collect();
    found.sort();
    Ok(found.pop())
}

/// The `.deb` of `package` in `debs`, downloaded if missing.
fn fetch_deb(
    debs: &Path,
    package: &str,
    is_it: impl Fn(&str) -> bool + Copy,
    log: &mut dyn FnMut(&str),
) -> Result<PathBuf, ImageError> {
    if let Some(p) = cached_deb(debs, is_it)? {
        return Ok(p);
    }
    fs::create_dir_all(debs).map_err(io_err(debs))?;
    log(&format!("linux image: apt-get download {package}"));
    run(
        Command::new("apt-get")
            .arg("download")
            .arg(package)
            .current_dir(debs),
        &format!("apt-get download {package}"),
    )?;
    cached_deb(debs, is_it)?.ok_or_else(|| {
        ImageError::Content(format!("apt-get download {package} left no matching .deb"))
    })
}

/// Unpack `deb` into `root` unless `marker` (a path inside `root`) exists.
fn unpack(
    deb: &Path,
    root: &Path,
    marker: &str,
    log: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    if root.join(marker).exists() {
        return Ok(());
    }
    fs::create_dir_all(root).map_err(io_err(root))?;
    log(&format!("linux image: dpkg-deb -x {}", deb.display()));
    run(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(root),
        &format!("dpkg-deb -x {}", deb.display()),
    )?;
    Ok(())
}

/// The single `vmlinuz-RELEASE` in `root/boot`.
fn find_kernel(root: &Path) -> Result<(PathBuf, String), ImageError> {
    let boot = root.join("boot");
    let mut found = Vec::new();
    for e in fs::read_dir(&boot).map_err(io_err(&boot))? {
        let e = e.map_err(io_err(&boot))?;
        if let Some(rel) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("vmlinuz-"))
        {
            found.push((e.path(), rel.to_string()));
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        n => Err(ImageError::Content(format!(
            "{} holds {n} kernels (expected one); remove {}",
            boot.display(),
            root.display()
        ))),
    }
}

/// Every `*.ko` under `dir`, by module key.
fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<(), ImageError> {
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let path = e.path();
        let ft = e.file_type().map_err(io_err(&path))?;
        if ft.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(stem) = e.file_name().to_str().and_then(|n| n.strip_suffix(".ko")) {
            index.insert(module_key(stem), path);
        }
    }
    Ok(())
}

/// Build (or find cached) the Linux guest image under `target_dir`.
/// Progress lines go to `log`.
pub fn build(target_dir: &Path, log: &mut dyn FnMut(&str)) -> Result<LinuxImage, ImageError> {
    let cache = target_dir.join(CACHE_DIR);
    let debs = cache.join("debs");
    let root = cache.join("root");

    let kernel_deb = match cached_deb(&debs, is_kernel_deb)? {
        Some(p) => p,
        None => {
            let out = run(
                Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]),
                "apt-cache depends linux-image-amd64",
            )?;
            let pkg = kernel_package_from_depends(&out).ok_or_else(|| {
                ImageError::Content(format!(
                    "apt-cache names no kernel package for {KERNEL_META_PACKAGE}"
                ))
            })?;
            fetch_deb(&debs, &pkg, is_kernel_deb, log)?
        }
    };
    let busybox_deb = fetch_deb(
        &debs,
        BUSYBOX_PACKAGE,
        |f| f.starts_with("busybox-static_") && f.ends_with(".deb"),
        log,
    )?;
    unpack(&kernel_deb, &root, "boot", log)?;
    unpack(&busybox_deb, &root, "bin/busybox", log)?;

    let (kernel, release) = find_kernel(&root)?;
    let mod_dir = root.join("lib/modules").join(&release);
    let mut index = BTreeMap::new();
    index_modules(&mod_dir.join("kernel"), &mut index)?;
    let builtin: BTreeSet<String> = fs::read_to_string(mod_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko").map(module_key))
        .collect();
    let deps = |m: &str| -> Option<Vec<String>> {
        let ko = fs::read(index.get(m)?).ok()?;
        let info = modinfo_section(&ko).ok()??;
        Some(modinfo_depends(info))
    };
    let order = module_load_order(GUEST_MODULES, &deps, &builtin).map_err(ImageError::Content)?;

    let stamp_path = cache.join("initramfs.stamp");
    let initramfs = cache.join("initramfs.cpio");
    let stamp = format!(
        "recipe {RECIPE_VERSION}\n{}\n{}\n{}\n",
        kernel_deb.display(),
        busybox_deb.display(),
        order.join(" ")
    );
    if initramfs.exists() && fs::read_to_string(&stamp_path).ok().as_deref() == Some(&stamp) {
        return Ok(LinuxImage {
            kernel,
            initramfs,
            release,
            modules: order,
        });
    }
    let busybox_path = root.join("bin/busybox");
    let busybox = fs::read(&busybox_path).map_err(io_err(&busybox_path))?;
    let mut modules = Vec::new();
    for m in &order {
        let p = &index[m];
        modules.push((m.clone(), fs::read(p).map_err(io_err(p))?));
    }
    let tmp = cache.join("initramfs.cpio.tmp");
    let file = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let (file, bytes) =
        write_initramfs(io::BufWriter::new(file), &busybox, &modules).map_err(io_err(&tmp))?;
    file.into_inner()
        .map_err(|e| ImageError::Io {
            path: tmp.clone(),
            error: e.into_error(),
        })?
        .sync_all()
        .map_err(io_err(&tmp))?;
    fs::rename(&tmp, &initramfs).map_err(io_err(&initramfs))?;
    fs::write(&stamp_path, stamp).map_err(io_err(&stamp_path))?;
    log(&format!(
        "linux image: initramfs {} ({} KiB, modules: {})",
        initramfs.display(),
        bytes / 1024,
        order.join(" ")
    ));
    Ok(LinuxImage {
        kernel,
        initramfs,
        release,
        modules: order,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_round_trip() {
        let mut c = CpioWriter::new(Vec::new());
        c.dir("bin", 0o755).unwrap();
        c.file("bin/hello", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        c.file("empty", 0o644, b"").unwrap();
        c.symlink("bin/sh", "busybox").unwrap();
        c.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let (bytes, size) = c.finish().unwrap();
        assert_eq!(size, bytes.len() as u64);
        assert_eq!(bytes.len() % 4, 0);
        let e = parse_cpio(&bytes).unwrap();
        let names: Vec<&str> = e.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["bin", "bin/hello", "empty", "bin/sh", "dev/console"]
        );
        assert_eq!(e[0].mode, 0o040755);
        assert_eq!(e[0].nlink, 2);
        assert_eq!(
            (e[1].mode, e[1].data.as_slice()),
            (0o100755, &b"#!/bin/sh\necho hi\n"[..])
        );
        assert_eq!(e[2].data, b"");
        assert_eq!(
            (e[3].mode, e[3].data.as_slice()),
            (0o120777, &b"busybox"[..])
        );
        assert_eq!((e[4].mode, e[4].rdev), (0o020600, (5, 1)));
    }

    /// The exact bytes of a one-file archive, laid out by hand from the
    /// format description.
    #[test]
    fn cpio_bytes_match_the_format() {
        let mut c = CpioWriter::new(Vec::new());
        c.file("ab", 0o644, b"xyz").unwrap();
        let (bytes, _) = c.finish().unwrap();
        let header = |f: [u32; 13]| -> String {
            let mut h = String::from("070701");
            for x in f {
                h.push_str(&format!("{x:08x}"));
            }
            h
        };
        let mut want = Vec::new();
        // ino 1, mode 0100644, uid, gid, nlink 1, mtime, size 3, dev
        // major/minor, rdev major/minor, namesize 3 ("ab\0"), check.
        want.extend_from_slice(header([1, 0o100644, 0, 0, 1, 0, 3, 0, 0, 0, 0, 3, 0]).as_bytes());
        want.extend_from_slice(b"ab\0\0\0\0"); // 110 + 3 = 113, padded to 116
        want.extend_from_slice(b"xyz\0");
        want.extend_from_slice(header([0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 11, 0]).as_bytes());
        want.extend_from_slice(b"TRAILER!!!\0\0\0\0"); // 110 + 11 = 121, padded to 124
        assert_eq!(header([0; 13]).len(), 110);
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&want)
        );
        assert_eq!(bytes, want);
    }

    #[test]
    fn cpio_rejects_bad_names_and_parser_rejects_garbage() {
        let mut c = CpioWriter::new(Vec::new());
        assert!(c.file("/abs", 0o644, b"").is_err());
        assert!(c.file("", 0o644, b"").is_err());
        assert!(c.file("a\0b", 0o644, b"").is_err());
        let (good, _) = {
            let mut c = CpioWriter::new(Vec::new());
            c.file("f", 0o644, b"data").unwrap();
            c.finish().unwrap()
        };
        for n in 0..good.len() {
            assert!(parse_cpio(&good[..n]).is_err(), "prefix {n}");
        }
        let mut bad = good.clone();
        bad[0] = b'1';
        assert!(parse_cpio(&bad).is_err());
        let mut bad = good.clone();
        bad[10] = b'g';
        assert!(parse_cpio(&bad).is_err());
    }

    #[test]
    fn ticker_lines() {
        assert_eq!(
            parse_tick("hvmigrate-linux: tick 12 clock 1796323507 dmesg-bad 0\r"),
            Some(Tick {
                n: 12,
                clock_s: 1_796_323_507,
                dmesg_bad: 0
            })
        );
        assert_eq!(
            parse_tick("/ # \u{1b}[6nhvmigrate-linux: tick 2 clock 1796338933 dmesg-bad 0"),
            Some(Tick {
                n: 2,
                clock_s: 1_796_338_933,
                dmesg_bad: 0
            })
        );
        for bad in [
            "hvmigrate-linux: tick 12 clock 1796323507",
            "hvmigrate-linux: tick 12 clock 1796323507 dmesg-bad 0 x",
            "hvmigrate-linux: tick x clock 1 dmesg-bad 0",
            "hvmigrate-linux: tick 1 time 1 dmesg-bad 0",
            "/ # echo hvmigrate-linux: tick 1 clock 1 dmesg-bad 0",
        ] {
            assert_eq!(parse_tick(bad), None, "{bad}");
        }
    }

    #[test]
    fn initramfs_holds_init_busybox_console_and_modules() {
        let modules = vec![
            ("virtio_ring".to_string(), b"ring".to_vec()),
            ("virtio".to_string(), b"virtio".to_vec()),
        ];
        let (bytes, _) = write_initramfs(Vec::new(), b"\x7fELFbusybox", &modules).unwrap();
        let e = parse_cpio(&bytes).unwrap();
        let get = |n: &str| {
            e.iter()
                .find(|x| x.name == n)
                .unwrap_or_else(|| panic!("{n}"))
        };
        assert_eq!(get("bin/busybox").data, b"\x7fELFbusybox");
        assert_eq!(get("bin/busybox").mode & 0o777, 0o755);
        assert_eq!(get("bin/sh").data, b"busybox");
        assert_eq!(get("dev/console").rdev, (5, 1));
        let init = String::from_utf8(get("init").data.clone()).unwrap();
        assert!(init.starts_with("#!/bin/sh\n"));
        assert!(init.contains(BANNER));
        // The ticker starts (in the background) before the shell.
        let ticker = init.find(&format!("*\" {TICKS_ARG} \"*)")).unwrap();
        assert!(ticker < init.find(BANNER).unwrap());
        assert!(init.contains(&format!(
            "echo \"{TICK_PREFIX}$i clock $(date +%s) dmesg-bad $(dmesg | grep -cE '{}')\"",
            hvcore::abi::case::LINUX_DMESG_BAD
        )));
        assert!(init.contains("mount -t devtmpfs devtmpfs /dev"));
        assert!(init.contains(r#"args="$args ${a#"$m".}""#));
        assert_eq!(get("init").mode, 0o100755);
        assert_eq!(get("lib/modules/virtio.ko").data, b"virtio");
        assert_eq!(get("etc/modules-order").data, b"virtio_ring\nvirtio\n");
        assert_eq!(get("tmp").mode, 0o041777);
        // Every directory comes before what is in it.
        for (i, x) in e.iter().enumerate() {
            if let Some((parent, _)) = x.name.rsplit_once('/') {
                assert!(e[..i].iter().any(|d| d.name == parent), "{}", x.name);
            }
        }
    }

    /// A minimal ELF64 with a section-name table and a .modinfo section.
    fn module_elf(modinfo: &[u8]) -> Vec<u8> {
        let shstr = b"\0.shstrtab\0.modinfo\0";
        let mut f = vec![0u8; 64];
        f[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        let shstr_off = f.len();
        f.extend_from_slice(shstr);
        let modinfo_off = f.len();
        f.extend_from_slice(modinfo);
        while !f.len().is_multiple_of(8) {
            f.push(0);
        }
        let shoff = f.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut s = vec![0u8; 64];
            s[0..4].copy_from_slice(&name.to_le_bytes());
            s[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            s[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            f.extend_from_slice(&s);
        };
        sh(0, 0, 0);
        sh(1, shstr_off, shstr.len());
        sh(11, modinfo_off, modinfo.len());
        f[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        f[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        f[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        f[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        f
    }

    #[test]
    fn modinfo_dependencies() {
        let elf = module_elf(
            b"license=GPL\0depends=virtio,virtio_ring\0name=virtio_mmio\0vermagic=6.1\0",
        );
        let info = modinfo_section(&elf).unwrap().unwrap();
        assert_eq!(modinfo_depends(info), ["virtio", "virtio_ring"]);
        let none = module_elf(b"depends=\0name=virtio_ring\0");
        assert!(modinfo_depends(modinfo_section(&none).unwrap().unwrap()).is_empty());
        assert!(modinfo_section(b"not elf").is_err());
        let mut bad = elf.clone();
        bad[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(modinfo_section(&bad).is_err());
        let mut cut = elf.clone();
        cut.truncate(elf.len() - 100); // into the section header table
        assert!(modinfo_section(&cut).is_err());
        // No .modinfo at all.
        let mut other = elf.clone();
        let shstr_off = 64;
        other[shstr_off + 11..shstr_off + 19].copy_from_slice(b".notinfo");
        assert_eq!(modinfo_section(&other).unwrap(), None);
    }

    #[test]
    fn load_order_puts_dependencies_first() {
        let graph: BTreeMap<&str, Vec<&str>> = [
            ("virtio_mmio", vec!["virtio", "virtio_ring"]),
            ("virtio_blk", vec!["virtio", "virtio_ring"]),
            ("virtio", vec!["virtio_ring"]),
            ("virtio_ring", vec![]),
        ]
        .into_iter()
        .collect();
        let deps = |m: &str| {
            graph
                .get(m)
                .map(|d| d.iter().map(|s| s.to_string()).collect())
        };
        let order =
            module_load_order(&["virtio_mmio", "virtio-blk"], &deps, &BTreeSet::new()).unwrap();
        assert_eq!(
            order,
            ["virtio_ring", "virtio", "virtio_mmio", "virtio_blk"]
        );
        let builtin: BTreeSet<String> = ["virtio_ring".to_string()].into_iter().collect();
        assert_eq!(
            module_load_order(&["virtio"], &deps, &builtin).unwrap(),
            ["virtio"]
        );
        assert!(module_load_order(&["nope"], &deps, &BTreeSet::new())
            .unwrap_err()
            .contains("not found"));
        let cyclic = |m: &str| {
            Some(vec![if m == "a" {
                "b".to_string()
            } else {
                "a".to_string()
            }])
        };
        assert!(module_load_order(&["a"], &cyclic, &BTreeSet::new())
            .unwrap_err()
            .contains("cycle"));
    }

    #[test]
    fn package_names() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
        assert_eq!(
            kernel_package_from_depends(out).as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
        assert_eq!(kernel_package_from_depends("linux-image-amd64\n"), None);
        assert!(is_kernel_deb(
            "linux-image-6.1.0-57-amd64_6.1.192-3_amd64.deb"
        ));
        assert!(!is_kernel_deb("linux-image-amd64_6.1.192-3_amd64.deb"));
        assert!(!is_kernel_deb(
            "linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64.deb"
        ));
        assert!(!is_kernel_deb(
            "linux-image-6.1.0-57-rt-amd64_6.1.192-3_amd64.deb"
        ));
        assert!(!is_kernel_deb("busybox-static_1.35_amd64.deb"));
        assert!(!is_kernel_deb(
            "linux-image-6.1.0-57-amd64_6.1.192-3_amd64.deb.part"
        ));
    }
}
