//! The guest ABI: what a guest kernel started by this hypervisor can rely on.
//!
//! Shared by the VMM (`vmm-service`), which builds the initial guest state,
//! and the guest test kernel (`tests/guest`), which consumes it. Pure data and
//! encoders: no pointers are dereferenced here.
//!
//! # Start state
//! The boot vCPU starts in 64-bit long mode, interrupts disabled, with:
//! * guest RAM at `[0, ram_bytes)`, identity-mapped by 2 MiB pages over the
//!   first 4 GiB (page tables at [`GUEST_PML4_GPA`]..);
//! * a GDT at [`GUEST_GDT_GPA`]: selector 0x08 = 64-bit code, 0x10 = data;
//! * RDI = [`BOOT_PARAMS_GPA`], a page holding [`BootParams`] followed by the
//!   command line;
//! * RSP = [`GUEST_INITIAL_RSP`]; the kernel ELF loaded at its physical
//!   addresses (at or above [`GUEST_KERNEL_MIN_GPA`]).
//!
//! # Hypercalls
//! `vmmcall` (AMD) or `vmcall` (Intel): number in RAX, arguments in RDI, RSI,
//! RDX, R10; result in RAX (values >= [`HC_ERR_FIRST`] are errors), extra
//! results in RDI and RSI where noted.

/// GPA of the guest PML4; PDPT and four page directories follow it.
pub const GUEST_PML4_GPA: u64 = 0x1000;
/// GPA of the guest GDT.
pub const GUEST_GDT_GPA: u64 = 0x7000;
/// GPA of the boot parameters page.
pub const BOOT_PARAMS_GPA: u64 = 0x8000;
/// Offset of the command line within the boot parameters page.
pub const CMDLINE_OFFSET: u64 = 0x100;
/// Longest command line passed to a guest, in bytes.
pub const CMDLINE_MAX: usize = 0xf00;
/// Initial guest stack pointer (the stack grows down from here).
pub const GUEST_INITIAL_RSP: u64 = 0x8_0000;
/// Lowest GPA a guest kernel may be loaded at.
pub const GUEST_KERNEL_MIN_GPA: u64 = 0x10_0000;

/// COM1 base port: the emulated 16550 UART.
pub const COM1_PORT: u16 = 0x3f8;

/// `"HVBOOT01"` little-endian.
pub const BOOT_PARAMS_MAGIC: u64 = u64::from_le_bytes(*b"HVBOOT01");

/// Boot parameters at [`BOOT_PARAMS_GPA`], encoded little-endian as six u64s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BootParams {
    /// Guest RAM size in bytes.
    pub ram_bytes: u64,
    /// GPA of the command line (UTF-8, not NUL-terminated).
    pub cmdline_gpa: u64,
    /// Command line length in bytes.
    pub cmdline_len: u64,
    /// Number of vCPUs.
    pub vcpus: u64,
    /// First GPA after the loaded kernel image (start of free RAM).
    pub kernel_end_gpa: u64,
}

impl BootParams {
    /// Encoded size in bytes.
    pub const SIZE: usize = 48;

    /// Encode (magic first).
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        let words = [
            BOOT_PARAMS_MAGIC,
            self.ram_bytes,
            self.cmdline_gpa,
            self.cmdline_len,
            self.vcpus,
            self.kernel_end_gpa,
        ];
        for (chunk, w) in out.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Decode; `None` if the magic is wrong.
    pub fn from_bytes(bytes: &[u8; Self::SIZE]) -> Option<Self> {
        let mut words = [0u64; 6];
        for (w, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *w = u64::from_le_bytes(b);
        }
        if words[0] != BOOT_PARAMS_MAGIC {
            return None;
        }
        Some(Self {
            ram_bytes: words[1],
            cmdline_gpa: words[2],
            cmdline_len: words[3],
            vcpus: words[4],
            kernel_end_gpa: words[5],
        })
    }
}

/// Report a test result and stop the VM. RDI = 0 ok / 1 failed, RSI = GPA of
/// a UTF-8 message, RDX = its length (<= 256).
pub const HC_TEST_RESULT: u64 = 1;
/// Enable dirty logging for this VM (clears the dirty set). RDI picks the
/// tracker: [`DIRTY_TRACKER_WRITE_PROTECT`] or [`DIRTY_TRACKER_PML`]
/// ([`HC_ERR_UNSUPPORTED`] on a CPU without PML). The three dirty-log calls
/// return [`HC_ERR_BUSY`] while a live migration of the VM owns the log.
pub const HC_DIRTY_LOG_ENABLE: u64 = 2;
/// `HC_DIRTY_LOG_ENABLE` tracker: nested-page write protection (always
/// available).
pub const DIRTY_TRACKER_WRITE_PROTECT: u64 = 0;
/// `HC_DIRTY_LOG_ENABLE` tracker: Intel page-modification logging.
pub const DIRTY_TRACKER_PML: u64 = 1;
/// Collect-and-clear the dirty set and compare it with the guest's own
/// bitmap at GPA RDI, RSI bytes long (bit n = guest frame n written). Returns
/// 0 in RAX when equal, else the number of differing frames; RDI = frames the
/// hypervisor missed, RSI = frames it reported extra.
pub const HC_DIRTY_LOG_CHECK: u64 = 3;
/// Disable dirty logging.
pub const HC_DIRTY_LOG_DISABLE: u64 = 4;
/// The hypervisor writes byte RSI over the page at GPA RDI (a write by the
/// hypervisor into guest memory, which the dirty log must record).
pub const HC_FILL_PAGE: u64 = 5;
/// Progress report: RDI = counter. Used to observe time-sharing.
pub const HC_PROGRESS: u64 = 6;
/// Does nothing and returns RDI + 1 (round-trip benchmark).
pub const HC_NOP: u64 = 7;
/// Live migrations of this VM so far: RAX = completed ones (the VM runs on
/// their destination), RDI = failed or cancelled ones (the VM stayed where
/// it was). A guest polls it to learn that it was moved.
pub const HC_MIGRATION_STATUS: u64 = 8;

/// First error value returned in RAX.
pub const HC_ERR_FIRST: u64 = u64::MAX - 15;
/// Unknown hypercall number.
pub const HC_ERR_UNKNOWN: u64 = u64::MAX;
/// Invalid argument (bad GPA, length over a cap).
pub const HC_ERR_INVALID: u64 = u64::MAX - 1;
/// The hypercall is valid but failed in the hypervisor.
pub const HC_ERR_FAILED: u64 = u64::MAX - 2;
/// The resource is in use by the hypervisor (the dirty log during a live
/// migration of this VM); try again later.
pub const HC_ERR_BUSY: u64 = u64::MAX - 3;
/// The hypervisor or CPU lacks the feature asked for (e.g. PML).
pub const HC_ERR_UNSUPPORTED: u64 = u64::MAX - 4;

/// Our CPUID vendor leaf: `CPUID(0x4000_0000)` returns the highest hypervisor
/// leaf in EAX and this signature in EBX, ECX, EDX.
pub const CPUID_HV_LEAF: u32 = 0x4000_0000;
/// The 12-byte hypervisor signature.
pub const HV_SIGNATURE: &[u8; 12] = b"hvmigrateHV!";

/// The guest test cases by name: the node's `tests=` list and `case NAME:`
/// results, the guest kernel's `case=` argument and qemu-runner's
/// `guest-test` all use these spellings (docs/DESIGN.md, "Test cases").
pub mod case {
    pub const HELLO: &str = "hello";
    pub const CPUID: &str = "cpuid";
    pub const MEMORY: &str = "memory";
    pub const DIRTY_LOG: &str = "dirty-log";
    pub const BAD_MSR: &str = "bad-msr";
    pub const TRIPLE_FAULT: &str = "triple-fault";
    pub const TWO_VMS: &str = "two-vms";
    /// External interrupts from the emulated local APIC (PC machine).
    pub const INTERRUPT: &str = "interrupt";
    pub const LOCAL_MIGRATE_IDLE: &str = "local-migrate-idle";
    pub const LOCAL_MIGRATE_BUSY: &str = "local-migrate-busy";
    pub const LOCAL_MIGRATE_ABORT: &str = "local-migrate-abort";
    pub const LOCAL_MIGRATE_CONVERGE: &str = "local-migrate-converge";
    pub const LOCAL_MIGRATE_TAMPER: &str = "local-migrate-tamper";
    pub const VIRTIO_BLK: &str = "virtio-blk";

    /// The Linux guest cases: not in [`ALL`] (they need the Linux image
    /// as boot modules 1 and 2, and minutes of emulated time).
    pub const LINUX_BOOT: &str = "linux-boot";
    pub const LINUX_MIGRATE: &str = "linux-migrate";
    pub const LINUX: [&str; 2] = [LINUX_BOOT, LINUX_MIGRATE];
    /// `dmesg` lines (an extended regular expression) that mean the Linux
    /// guest is unwell: the cases' check, and the counter lines the
    /// guest's init prints with `hvmigrate.ticks=1`.
    pub const LINUX_DMESG_BAD: &str = "BUG|WARNING|soft lockup|clocksource.*unstable";

    /// Every test case, in the order `tests=all` runs them.
    pub const ALL: [&str; 14] = [
        HELLO,
        CPUID,
        MEMORY,
        DIRTY_LOG,
        BAD_MSR,
        TRIPLE_FAULT,
        TWO_VMS,
        INTERRUPT,
        LOCAL_MIGRATE_IDLE,
        LOCAL_MIGRATE_BUSY,
        LOCAL_MIGRATE_ABORT,
        LOCAL_MIGRATE_CONVERGE,
        LOCAL_MIGRATE_TAMPER,
        VIRTIO_BLK,
    ];
}

/// Bytes of a disk sector as the disk guests address it (virtio-blk).
pub const DISK_SECTOR_BYTES: usize = 512;

/// The 8 bytes at byte `word * 8` of disk sector `sector` as the disk
/// guests (`virtio-blk`, `disk-verify`) write them in round `round` with
/// seed `seed`, little-endian: splitmix64 of the four mixed together, so
/// every word of every sector of every round differs and the node can
/// check a disk's bytes without the guest.
pub fn disk_pattern_word(seed: u64, round: u64, sector: u64, word: u64) -> u64 {
    let mut z = seed
        ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ sector.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ word.wrapping_mul(0x1656_67b1_9e37_79f9);
    // splitmix64's finaliser (Steele, Lea, Flood, OOPSLA 2014).
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fill `buf` (whole sectors) with the pattern of the sectors starting at
/// `first_sector`.
pub fn fill_disk_pattern(seed: u64, round: u64, first_sector: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        let byte = i as u64 * 8;
        let sector = first_sector + byte / DISK_SECTOR_BYTES as u64;
        let word = (byte % DISK_SECTOR_BYTES as u64) / 8;
        chunk.copy_from_slice(&disk_pattern_word(seed, round, sector, word).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_params_round_trip() {
        let p = BootParams {
            ram_bytes: 64 << 20,
            cmdline_gpa: BOOT_PARAMS_GPA + CMDLINE_OFFSET,
            cmdline_len: 10,
            vcpus: 1,
            kernel_end_gpa: 0x30_0000,
        };
        assert_eq!(BootParams::from_bytes(&p.to_bytes()), Some(p));
        let mut bad = p.to_bytes();
        bad[0] ^= 1;
        assert_eq!(BootParams::from_bytes(&bad), None);
    }
}
