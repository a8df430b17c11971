//! The disk cases. `virtio-blk` writes the shared pattern
//! (`hvcore::abi::fill_disk_pattern`, round 1) over the first MiB of its
//! disk, flushes, reads it back, and reports progress; the node live-
//! migrates the VM (the device's state travels in the stream); the guest
//! then reads round 1 back through the migrated device, writes round 2
//! over the second half MiB, flushes and checks the whole MiB. The node
//! checks the same bytes in the VHDX behind the disk.

use hvcore::abi::{fill_disk_pattern, DISK_SECTOR_BYTES};

use super::migrate::{status, Sweeper};
use crate::layout::{align_down, PAGE_BYTES};
use crate::virtio::{open_disk, Disk};
use crate::{fail, println, report, Env};

/// Seed of the `virtio-blk` case's pattern (the node checks with it).
pub const VIRTIO_BLK_SEED: u64 = 0x5eed_b10c;
/// Sectors the `virtio-blk` case writes (1 MiB).
pub const VIRTIO_BLK_SECTORS: u64 = 2048;
/// Bytes per request.
const REQUEST_BYTES: usize = 64 << 10;
const REQUEST_SECTORS: u64 = (REQUEST_BYTES / DISK_SECTOR_BYTES) as u64;

/// One request's buffer and its expected contents (in `.bss`: the stack
/// is 64 KiB).
static mut BUF: [u8; REQUEST_BYTES] = [0; REQUEST_BYTES];
static mut EXPECT: [u8; REQUEST_BYTES] = [0; REQUEST_BYTES];

fn buffers() -> (
    &'static mut [u8; REQUEST_BYTES],
    &'static mut [u8; REQUEST_BYTES],
) {
    let (buf, expect) = (&raw mut BUF, &raw mut EXPECT);
    // SAFETY: the guest is single-threaded and only the disk cases use
    // these buffers, through this one call per case.
    unsafe { (&mut *buf, &mut *expect) }
}

/// Write round `round` of the pattern over `[first, first + sectors)`.
fn write_pattern(disk: &mut Disk, buf: &mut [u8], seed: u64, round: u64, first: u64, sectors: u64) {
    let mut s = first;
    while s < first + sectors {
        let n = REQUEST_SECTORS.min(first + sectors - s);
        let bytes = &mut buf[..n as usize * DISK_SECTOR_BYTES];
        fill_disk_pattern(seed, round, s, bytes);
        if let Err(e) = disk.write_blocks(s as usize, bytes) {
            fail!("write of sectors {}..{}: {}", s, s + n, e);
        }
        s += n;
    }
}

/// Read `[first, first + sectors)` and compare with round `round`;
/// `Err((sector, byte))` names the first difference.
fn check_pattern(
    disk: &mut Disk,
    buf: &mut [u8],
    expect: &mut [u8],
    seed: u64,
    round: u64,
    first: u64,
    sectors: u64,
) -> Result<(), (u64, usize)> {
    let mut s = first;
    while s < first + sectors {
        let n = REQUEST_SECTORS.min(first + sectors - s);
        let len = n as usize * DISK_SECTOR_BYTES;
        if let Err(e) = disk.read_blocks(s as usize, &mut buf[..len]) {
            fail!("read of sectors {}..{}: {}", s, s + n, e);
        }
        fill_disk_pattern(seed, round, s, &mut expect[..len]);
        if let Some(i) = (0..len).find(|&i| buf[i] != expect[i]) {
            return Err((s + (i / DISK_SECTOR_BYTES) as u64, i % DISK_SECTOR_BYTES));
        }
        s += n;
    }
    Ok(())
}

/// `virtio-blk`.
pub fn virtio_blk() -> ! {
    let mut disk = open_disk(0);
    let (buf, expect) = buffers();
    let capacity = disk.capacity();
    if capacity < VIRTIO_BLK_SECTORS {
        fail!(
            "disk has {} sectors, the case needs {}",
            capacity,
            VIRTIO_BLK_SECTORS
        );
    }
    write_pattern(&mut disk, buf, VIRTIO_BLK_SEED, 1, 0, VIRTIO_BLK_SECTORS);
    if let Err(e) = disk.flush() {
        fail!("flush: {}", e);
    }
    if let Err((sector, byte)) = check_pattern(
        &mut disk,
        buf,
        expect,
        VIRTIO_BLK_SEED,
        1,
        0,
        VIRTIO_BLK_SECTORS,
    ) {
        fail!("read back: sector {} byte {} differs", sector, byte);
    }
    println!(
        "virtio-blk: {} sectors of {} written, flushed and read back",
        VIRTIO_BLK_SECTORS, capacity
    );
    if crate::hypercall::progress(1).is_err() {
        fail!("HC_PROGRESS failed");
    }
    // The node migrates the VM now.
    loop {
        let (completed, failed) = super::migrate::status();
        if failed > 0 {
            fail!("the migration failed");
        }
        if completed > 0 {
            break;
        }
        core::hint::spin_loop();
    }
    let half = VIRTIO_BLK_SECTORS / 2;
    if let Err((sector, byte)) = check_pattern(
        &mut disk,
        buf,
        expect,
        VIRTIO_BLK_SEED,
        1,
        0,
        VIRTIO_BLK_SECTORS,
    ) {
        fail!(
            "after the migration: sector {} byte {} differs",
            sector,
            byte
        );
    }
    write_pattern(&mut disk, buf, VIRTIO_BLK_SEED, 2, half, half);
    if let Err(e) = disk.flush() {
        fail!("flush after the migration: {}", e);
    }
    let checks = [(1, 0), (2, half)];
    for (round, first) in checks {
        if let Err((sector, byte)) =
            check_pattern(&mut disk, buf, expect, VIRTIO_BLK_SEED, round, first, half)
        {
            fail!("after round 2: sector {} byte {} differs", sector, byte);
        }
    }
    println!("virtio-blk: after the migration the disk reads back and takes writes");
    report::ok("disk written, migrated and read back")
}

/// Bytes of one `disk-verify` span: a round writes one span.
const SPAN_BYTES: u64 = 8 << 20;
/// Seed of `disk-verify`'s pattern.
pub const DISK_VERIFY_SEED: u64 = 0xd15c_7e57;

/// Largest memory model of `disk-verify`.
const DISK_VERIFY_MEMORY_BYTES: u64 = 8 << 20;

/// `disk-verify`: for ever, round N writes the pattern of round N over
/// span (N - 1) % S of the disk (S spans of 8 MiB, the last one shorter),
/// flushes, then reads back that span and the next one and checks each
/// against the round that last wrote it (a span never written reads
/// zeros). Prints `disk-verify: round N ok`; on a difference prints
/// `disk-verify: FAILED round N: sector S byte B differs (span written by
/// round R)` and reports failure. Memory too: after each round it sweeps
/// a buffer of up to 8 MiB (busy-verify's workload), and when the count
/// of completed or failed migrations grew it checks every byte of it,
/// printing `disk-verify: migration N ok` (`failed migration N: memory
/// ok`) or a `disk-verify: FAILED migration N: page ...` line.
pub fn disk_verify(env: &Env) -> ! {
    let free = env.params.ram_bytes.saturating_sub(env.free_start);
    let bytes = align_down(DISK_VERIFY_MEMORY_BYTES.min(free / 2), PAGE_BYTES);
    if bytes < PAGE_BYTES {
        fail!("disk-verify: no free RAM for the memory model");
    }
    let mut memory = Sweeper::new(env, 0, bytes);
    let mut seen = status();
    let mut disk = open_disk(0);
    let (buf, expect) = buffers();
    let sectors = disk.capacity();
    let span_sectors = SPAN_BYTES / DISK_SECTOR_BYTES as u64;
    let spans = sectors.div_ceil(span_sectors);
    if spans == 0 {
        fail!("disk-verify: the disk is empty");
    }
    println!(
        "disk-verify: {} MiB disk, {} spans of {} MiB",
        (sectors * DISK_SECTOR_BYTES as u64) >> 20,
        spans,
        SPAN_BYTES >> 20
    );
    let span_range = |k: u64| {
        let first = k * span_sectors;
        (first, span_sectors.min(sectors - first))
    };
    let mut round = 0u64;
    loop {
        round += 1;
        let span = (round - 1) % spans;
        let (first, n) = span_range(span);
        write_pattern(&mut disk, buf, DISK_VERIFY_SEED, round, first, n);
        if let Err(e) = disk.flush() {
            fail!("disk-verify: FAILED round {}: flush: {}", round, e);
        }
        for k in [span, (span + 1) % spans] {
            let (first, n) = span_range(k);
            let writer = crate::layout::last_writer(round, k, spans);
            let checked = if writer == 0 {
                check_zero(&mut disk, buf, first, n)
            } else {
                check_pattern(&mut disk, buf, expect, DISK_VERIFY_SEED, writer, first, n)
            };
            if let Err((sector, byte)) = checked {
                println!(
                    "disk-verify: FAILED round {}: sector {} byte {} differs (span written by round {})",
                    round, sector, byte, writer
                );
                fail!("disk-verify: round {}: sector {} differs", round, sector);
            }
        }
        println!("disk-verify: round {} ok", round);
        for page in 0..memory.pages {
            memory.touch(page);
        }
        memory.sweeps += 1;
        let now = status();
        if now != seen {
            super::busy_verify::check("disk-verify", &memory, 0, seen, now);
            seen = now;
        }
    }
}

/// Read `[first, first + sectors)` and require zeros.
fn check_zero(
    disk: &mut Disk,
    buf: &mut [u8],
    first: u64,
    sectors: u64,
) -> Result<(), (u64, usize)> {
    let mut s = first;
    while s < first + sectors {
        let n = REQUEST_SECTORS.min(first + sectors - s);
        let len = n as usize * DISK_SECTOR_BYTES;
        if let Err(e) = disk.read_blocks(s as usize, &mut buf[..len]) {
            fail!("read of sectors {}..{}: {}", s, s + n, e);
        }
        if let Some(i) = buf[..len].iter().position(|&b| b != 0) {
            return Err((s + (i / DISK_SECTOR_BYTES) as u64, i % DISK_SECTOR_BYTES));
        }
        s += n;
    }
    Ok(())
}

/// Bytes `disk-beat` writes before it beats.
pub const DISK_BEAT_BYTES: u64 = 128 << 20;
/// Seed of `disk-beat`'s pattern.
pub const DISK_BEAT_SEED: u64 = 0xd15c_bea7;
/// `disk-beat`'s heartbeats per second.
const DISK_BEAT_PER_S: u64 = 100;

/// `disk-beat` (the guest of `qemu-runner bench modes`): writes round 1
/// of the pattern over the first 128 MiB of its disk (all of a smaller
/// one), flushes and prints `disk-beat: N MiB written`; then, for ever,
/// `heartbeat N` every 10 ms, and whenever the count of completed or
/// failed migrations grows, reads the data back (beating between
/// requests) and prints `disk-beat: migration N: N MiB read back ok`, or
/// `disk-beat: FAILED ...` and reports failure.
pub fn disk_beat() -> ! {
    let mut disk = open_disk(0);
    let (buf, expect) = buffers();
    let sectors = disk
        .capacity()
        .min(DISK_BEAT_BYTES / DISK_SECTOR_BYTES as u64);
    if sectors == 0 {
        fail!("disk-beat: the disk is empty");
    }
    let mib = (sectors * DISK_SECTOR_BYTES as u64) >> 20;
    write_pattern(&mut disk, buf, DISK_BEAT_SEED, 1, 0, sectors);
    if let Err(e) = disk.flush() {
        fail!("disk-beat: flush: {}", e);
    }
    println!("disk-beat: {} MiB written", mib);
    let mut beats = super::endless::Beats::new(DISK_BEAT_PER_S);
    let mut seen = super::migrate::status();
    loop {
        if !beats.tick() {
            core::hint::spin_loop();
            continue;
        }
        let now = super::migrate::status();
        if now == seen {
            continue;
        }
        seen = now;
        // Request by request, beating in between.
        let mut s = 0;
        while s < sectors {
            let n = REQUEST_SECTORS.min(sectors - s);
            if let Err((sector, byte)) =
                check_pattern(&mut disk, buf, expect, DISK_BEAT_SEED, 1, s, n)
            {
                println!(
                    "disk-beat: FAILED after migration {}: sector {} byte {} differs",
                    now.0 + now.1,
                    sector,
                    byte
                );
                fail!("disk-beat: sector {} differs", sector);
            }
            s += n;
            beats.tick();
        }
        println!(
            "disk-beat: migration {}: {} MiB read back ok",
            now.0 + now.1,
            mib
        );
    }
}
