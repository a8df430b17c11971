//! The Linux guest cases (`linux-boot`, `linux-migrate`; issue 15): an
//! unmodified Debian kernel with the runner's initramfs, booted on the PC
//! machine ([`Vm::create_linux`]), driven through its serial console like
//! a user at a terminal.
//!
//! The node gets the kernel and the initramfs as boot modules 1 and 2
//! (module 0 is the test kernel); qemu-runner builds them
//! (`linux_image`) and passes them only when a Linux case is asked for.
//! The cases are not in `tests=all`: they need the image and minutes of
//! emulated time.
//!
//! * `linux-boot`: the shell comes up (its banner line); the node prints
//!   the boot time; `uname -r` is the kernel's version, `/proc/cpuinfo`
//!   shows one processor, and the MD5 of a file written to tmpfs is right.
//!   The VM has a virtio-blk disk (a VHDX in node memory, described to
//!   Linux in the ACPI tables): the guest `dd`s a file to `/dev/vda`,
//!   drops its page cache and reads it back (Linux's driver waits for the
//!   device's interrupts); afterwards the node reads the VHDX and finds
//!   the same bytes.
//! * `linux-migrate`: the same, then a shell loop prints a counter and the
//!   time every 100 ms while the VM live-migrates within the node
//!   (verification mode); after it the counter goes on, the clock did not
//!   go back, the checksum of the file written before still matches, the
//!   disk reads back on the destination and takes a second write there,
//!   and
//!   `dmesg` has no `BUG`/`WARNING`/`soft lockup`/`clocksource ...
//!   unstable` line.
//!
//! Commands are typed into COM1's receive FIFO ([`Vm::console_input`]) a
//! few bytes at a time as the guest drains it; answers are lines starting
//! with a tag (`R:`, `N:`, ...), which the terminal's echo of the typed
//! command never does.

use crate::loader::bzimage;
use crate::migrate::{self, Faults};
use crate::vm::{StopReason, Vm};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use hvcore::host::Host;
use migration::policy::NS_PER_S;
use migration::{MigrationResult, Policy};

pub use hvcore::abi::case::{LINUX as CASES, LINUX_BOOT, LINUX_MIGRATE};
/// Guest RAM of the case VMs.
pub const RAM_MIB: u64 = 128;
/// The line the initramfs' `/init` prints when the shell starts (the
/// runner's `linux_image::BANNER`).
pub const BANNER: &str = "hvmigrate-linux: shell ready";
/// Time for the kernel to reach the shell.
pub const BOOT_TIMEOUT_NS: u64 = 240 * NS_PER_S;
/// Time for one command's answer.
pub const COMMAND_TIMEOUT_NS: u64 = 60 * NS_PER_S;
/// The file the cases checksum: `seq 1 20000` in tmpfs, and its MD5.
pub const FILE_COMMAND: &str = "seq 1 20000 > /tmp/f";
pub const FILE_MD5: &str = "e071f707df7bbeee2a6a1eb48011ddd0";
/// The case VM's disk (`/dev/vda`, in node memory).
pub const DISK_BYTES: u64 = 8 << 20;
/// The guest writes `seq 1 DISK_SEQ_LAST` (588,895 bytes) at offset 0 of
/// its disk before any migration, and again at [`DISK_SECOND_OFFSET`]
/// after one.
pub const DISK_SEQ_LAST: u32 = 100_000;
pub const DISK_SECOND_OFFSET: u64 = 4 << 20;
/// `dmesg` lines that fail `linux-migrate`.
pub use hvcore::abi::case::LINUX_DMESG_BAD as DMESG_BAD;

/// Run Linux case `name` with kernel `kernel` and initramfs `initrd`.
pub fn run(host: &mut dyn Host, name: &str, kernel: &[u8], initrd: &[u8]) -> Result<(), String> {
    let release = bzimage::parse(kernel)
        .ok()
        .and_then(|b| b.version)
        .and_then(|v| v.split_whitespace().next())
        .map(String::from)
        .ok_or_else(|| String::from("boot module 1 is no bzImage with a version string"))?;
    let mut vm = Vm::create_linux(host, name, RAM_MIB << 20, kernel, initrd, "")
        .map_err(|e| format!("cannot create VM {name}: {e}"))?;
    let disk_file = attach_disk(&mut vm)?;
    vm.start();
    let mut con = Console::default();
    let migrate = name == LINUX_MIGRATE;
    let (result, mut vm) = match boot_and_check(host, &mut vm, &mut con, &release) {
        Err(e) => (Err(e), vm),
        Ok(()) if migrate => migrate_and_check(host, vm, &mut con),
        Ok(()) => (Ok(()), vm),
    };
    vm.stop(host, StopReason::Requested);
    // Destroying the VM closes its disk (the VHDX's log is cleared).
    vm.destroy();
    result.and_then(|()| check_disk_file(&disk_file.bytes(), migrate))
}

/// Give the case VM its disk: a dynamic VHDX of [`DISK_BYTES`] in node
/// memory, the guest's `/dev/vda`. The handle returned reads the file.
fn attach_disk(vm: &mut Vm) -> Result<crate::disks::MemFile, String> {
    let (disk, file) = crate::disks::new_mem_vhdx(DISK_BYTES)
        .map_err(|e| format!("cannot create the disk: {e}"))?;
    let meta = crate::disks::DiskMeta {
        backing: crate::disks::Backing::Memory {
            name: format!("{}-0.vhdx", vm.name()),
            file: file.clone(),
        },
        fixed: false,
        virtual_bytes: DISK_BYTES,
        block_bytes: crate::disks::MEM_BLOCK_BYTES,
        checkpoint: None,
    };
    vm.attach_disk(alloc::boxed::Box::new(disk), meta)
        .ok_or("no virtio slot for the disk")?;
    Ok(file)
}

/// The bytes of `seq 1 DISK_SEQ_LAST` (what the guest writes to its disk).
fn disk_data() -> Vec<u8> {
    let mut v = Vec::new();
    for i in 1..=DISK_SEQ_LAST {
        v.extend_from_slice(format!("{i}\n").as_bytes());
    }
    v
}

/// The case's disk as the host reads it: the VHDX opens and verifies, the
/// data the guest wrote is at offset 0 (and, after a migration, at
/// [`DISK_SECOND_OFFSET`]), and nothing else was written.
fn check_disk_file(file: &[u8], migrated: bool) -> Result<(), String> {
    use vstorage::vhdx::{OpenOptions, Vhdx};
    use vstorage::{MemIo, VirtualDisk};
    let mut disk = Vhdx::open(MemIo::from_vec(file.to_vec()), OpenOptions::read_only())
        .map_err(|e| format!("the disk's VHDX does not open: {e}"))?;
    disk.verify()
        .map_err(|e| format!("the disk's VHDX does not verify: {e}"))?;
    // The data, then zeros to the end of its last sector.
    let mut want = disk_data();
    want.resize(want.len().next_multiple_of(512), 0);
    let mut got = alloc::vec![0u8; want.len()];
    let mut places = alloc::vec![0u64];
    if migrated {
        places.push(DISK_SECOND_OFFSET);
    }
    for at in places {
        disk.read(at, &mut got)
            .map_err(|e| format!("reading the VHDX: {e}"))?;
        if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
            return Err(format!(
                "the VHDX holds other bytes than Linux wrote at offset {}",
                at + i as u64
            ));
        }
    }
    let mut tail = alloc::vec![0u8; 4096];
    disk.read(DISK_BYTES - 4096, &mut tail)
        .map_err(|e| format!("reading the VHDX: {e}"))?;
    if tail.iter().any(|&b| b != 0) {
        return Err("the VHDX has data at its end, where Linux wrote nothing".into());
    }
    Ok(())
}

/// Boot to the shell, print the boot time, check `uname -r`, the CPU
/// count and a tmpfs file's checksum.
fn boot_and_check(
    host: &mut dyn Host,
    vm: &mut Vm,
    con: &mut Console,
    release: &str,
) -> Result<(), String> {
    let start = host.now_ns();
    con.wait(host, vm, start + BOOT_TIMEOUT_NS, |l| {
        l.trim_end() == BANNER
    })?;
    let ms = (host.now_ns() - start) / 1_000_000;
    host.console_write(&format!(
        "linux: {} reached the shell in {}.{:03} s\n",
        vm.name(),
        ms / 1000,
        ms % 1000
    ));
    let r = con.ask(host, vm, "echo R:$(uname -r)", "R:")?;
    if r != release {
        return Err(format!("uname -r says {r:?}, the kernel is {release:?}"));
    }
    let n = con.ask(host, vm, "echo N:$(grep -c processor /proc/cpuinfo)", "N:")?;
    if n != "1" {
        return Err(format!("/proc/cpuinfo lists {n} processors, expected 1"));
    }
    check_file(host, vm, con, true)?;
    con.type_line(host, vm, &format!("seq 1 {DISK_SEQ_LAST} > /tmp/d"))?;
    check_disk(host, vm, con, 0, true)
}

/// Write `/tmp/d` to the disk at `offset` (when `write`; then `sync`),
/// drop the page cache and read the range back from the device: the same
/// MD5 as the file, so the bytes went through virtio-blk and its
/// interrupts both ways.
fn check_disk(
    host: &mut dyn Host,
    vm: &mut Vm,
    con: &mut Console,
    offset: u64,
    write: bool,
) -> Result<(), String> {
    let blocks = offset / (64 << 10);
    let len = disk_data().len();
    let want = con.ask(host, vm, "echo M:$(md5sum < /tmp/d)", "M:")?;
    if write {
        let rc = con.ask(
            host,
            vm,
            &format!("dd if=/tmp/d of=/dev/vda bs=64k seek={blocks} 2>/dev/null; echo W:$?"),
            "W:",
        )?;
        if rc != "0" {
            let devs = con.ask(host, vm, "echo L:$(ls /dev | grep vd)", "L:")?;
            return Err(format!(
                "dd to /dev/vda failed (exit {rc}); the guest's vd devices: {devs:?}"
            ));
        }
        con.type_line(host, vm, "sync")?;
    }
    let got = con.ask(
        host,
        vm,
        &format!(
            "echo 3 > /proc/sys/vm/drop_caches; echo V:$(dd if=/dev/vda bs=64k skip={blocks} \
             2>/dev/null | head -c {len} | md5sum)"
        ),
        "V:",
    )?;
    let first = |s: &str| s.split_whitespace().next().map(String::from);
    if first(&got).is_none() || first(&got) != first(&want) {
        return Err(format!(
            "/dev/vda at offset {offset} reads back with MD5 {got:?}, the data written has {want:?}"
        ));
    }
    Ok(())
}

/// Write (when `create`) and checksum the tmpfs file.
fn check_file(
    host: &mut dyn Host,
    vm: &mut Vm,
    con: &mut Console,
    create: bool,
) -> Result<(), String> {
    if create {
        con.type_line(host, vm, FILE_COMMAND)?;
    }
    let sum = con.ask(host, vm, "echo S:$(md5sum < /tmp/f)", "S:")?;
    if sum.split_whitespace().next() != Some(FILE_MD5) {
        return Err(format!("md5sum of /tmp/f is {sum:?}, expected {FILE_MD5}"));
    }
    Ok(())
}

/// Start the counter loop, migrate, check the loop, the file and dmesg.
/// The VM that runs at the end (the migration's destination, or the
/// source if it failed) comes back with the result.
fn migrate_and_check(
    host: &mut dyn Host,
    mut vm: Vm,
    con: &mut Console,
) -> (Result<(), String>, Vm) {
    let r = (|| {
        con.type_line(
            host,
            &mut vm,
            "i=0; while true; do i=$((i+1)); echo T:$i $(date +%s); sleep 0.1; done &",
        )?;
        let deadline = host.now_ns() + COMMAND_TIMEOUT_NS;
        con.wait(host, &mut vm, deadline, |l| {
            tick(l).is_some_and(|(i, _)| i >= 10)
        })?;
        Ok::<(), String>(())
    })();
    if let Err(e) = r {
        return (Err(e), vm);
    }
    let before = con.ticks().last().copied().unwrap_or_default();
    let policy = Policy {
        verify_memory: true,
        timeout_ns: 120 * NS_PER_S,
        ..Policy::default()
    };
    let out = migrate::migrate_local(host, vm, policy, Faults::default());
    let mut vm = out.vm;
    if out.report.result != MigrationResult::Completed || !out.report.verified {
        let e = format!(
            "migration {} (verified {}): {}",
            out.report.result.as_str(),
            out.report.verified,
            out.report.error.as_deref().unwrap_or("no reason given")
        );
        return (Err(e), vm);
    }
    host.console_write(&format!(
        "linux: {} migrated: downtime {} ms, {} bytes sent\n",
        vm.name(),
        out.report.downtime_ms,
        out.report.bytes_sent
    ));
    let r = (|| {
        let deadline = host.now_ns() + COMMAND_TIMEOUT_NS;
        con.wait(host, &mut vm, deadline, |l| {
            tick(l).is_some_and(|(i, _)| i >= before.0 + 10)
        })?;
        con.type_line(host, &mut vm, "kill $!")?;
        let ticks = con.ticks();
        for w in ticks.windows(2) {
            let ((i0, t0), (i1, t1)) = (w[0], w[1]);
            if i1 <= i0 {
                return Err(format!("the counter went from {i0} to {i1}"));
            }
            if t1 < t0 {
                return Err(format!(
                    "the guest clock went back from {t0} to {t1} (counter {i1})"
                ));
            }
        }
        check_file(host, &mut vm, con, false)?;
        // The disk written before the move reads back on the destination,
        // and takes a write there.
        check_disk(host, &mut vm, con, 0, false)?;
        check_disk(host, &mut vm, con, DISK_SECOND_OFFSET, true)?;
        let bad = con.ask(
            host,
            &mut vm,
            &format!("echo D:$(dmesg | grep -cE '{DMESG_BAD}')"),
            "D:",
        )?;
        if bad != "0" {
            let first = con.ask(
                host,
                &mut vm,
                &format!("echo E:$(dmesg | grep -E '{DMESG_BAD}' | head -n 1)"),
                "E:",
            )?;
            return Err(format!("dmesg has {bad} bad lines, the first: {first}"));
        }
        host.console_write(&format!(
            "linux: {} counted {} -> {} across the migration\n",
            vm.name(),
            before.0,
            ticks.last().map_or(0, |t| t.0)
        ));
        Ok(())
    })();
    (r, vm)
}

/// A counter line `T:i seconds`.
fn tick(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("T:")?;
    let (i, t) = rest.split_once(' ')?;
    Some((i.parse().ok()?, t.trim().parse().ok()?))
}

/// Every console line of the case's VM, collected as it runs.
#[derive(Default)]
struct Console {
    /// Lines the VM had printed when last collected.
    seen: u64,
    lines: Vec<String>,
    /// Lines already matched by `wait`.
    consumed: usize,
}

impl Console {
    /// Collect the lines printed since the last call (the VM keeps the
    /// last `RECENT_LINES`; the case collects after every slice).
    fn collect(&mut self, vm: &Vm) {
        let total = vm.counters().console_lines;
        let new = usize::try_from(total.saturating_sub(self.seen)).unwrap_or(usize::MAX);
        self.seen = total;
        let recent: Vec<&str> = vm.recent_lines().collect();
        let from = recent.len().saturating_sub(new);
        self.lines
            .extend(recent[from..].iter().map(|l| l.to_string()));
    }

    /// Run the VM until a new line satisfies `pred`; that line.
    fn wait(
        &mut self,
        host: &mut dyn Host,
        vm: &mut Vm,
        deadline_ns: u64,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<String, String> {
        loop {
            self.collect(vm);
            if let Some(k) = self.lines[self.consumed..].iter().position(|l| pred(l)) {
                self.consumed += k + 1;
                return Ok(self.lines[self.consumed - 1].clone());
            }
            if let Some(r) = vm.stop_reason() {
                return Err(format!("vm {} stopped: {r}", vm.name()));
            }
            let now = host.now_ns();
            if now >= deadline_ns {
                let last = self.lines.last().map_or("", String::as_str);
                return Err(format!("timeout; last console line: {last:?}"));
            }
            vm.run_slice(
                host,
                now.saturating_add(crate::sched::SLICE_NS).min(deadline_ns),
            );
        }
    }

    /// Type `text` and Enter into the guest's console.
    fn type_line(&mut self, host: &mut dyn Host, vm: &mut Vm, text: &str) -> Result<(), String> {
        let mut bytes = Vec::from(text.as_bytes());
        bytes.push(b'\n');
        let deadline = host.now_ns() + COMMAND_TIMEOUT_NS;
        let mut at = 0;
        while at < bytes.len() {
            at += vm.console_input(host, &bytes[at..]);
            if at == bytes.len() {
                break;
            }
            if let Some(r) = vm.stop_reason() {
                return Err(format!("vm {} stopped: {r}", vm.name()));
            }
            let now = host.now_ns();
            if now >= deadline {
                return Err(format!("the guest did not read its console input {text:?}"));
            }
            vm.run_slice(host, now.saturating_add(crate::sched::SLICE_NS));
            self.collect(vm);
        }
        Ok(())
    }

    /// Type `command` and return the rest of the first new line starting
    /// with `tag`.
    fn ask(
        &mut self,
        host: &mut dyn Host,
        vm: &mut Vm,
        command: &str,
        tag: &str,
    ) -> Result<String, String> {
        self.type_line(host, vm, command)?;
        let deadline = host.now_ns() + COMMAND_TIMEOUT_NS;
        let line = self
            .wait(host, vm, deadline, |l| l.starts_with(tag))
            .map_err(|e| format!("{command}: {e}"))?;
        Ok(line[tag.len()..].trim().to_string())
    }

    /// Every counter line so far.
    fn ticks(&self) -> Vec<(u64, u64)> {
        self.lines.iter().filter_map(|l| tick(l)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_lines() {
        assert_eq!(tick("T:12 1796323507"), Some((12, 1_796_323_507)));
        assert_eq!(tick("/ # echo T:$i $(date +%s)"), None);
        assert_eq!(tick("T:x 1"), None);
    }
}
