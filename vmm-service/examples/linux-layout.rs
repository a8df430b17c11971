//! What the Linux loader makes of a kernel and an initramfs, without a VM:
//! `cargo run -p vmm-service --example linux-layout -- KERNEL [INITRAMFS]`
//! (the image `cargo run -p qemu-runner --example linux-image` builds).
//! Prints the validated setup header and the guest layout for a few RAM
//! sizes.

use vmm_service::loader::{bzimage, linux};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(kernel_path) = args.first() else {
        eprintln!("usage: linux-layout KERNEL [INITRAMFS]");
        std::process::exit(2);
    };
    let kernel = std::fs::read(kernel_path).unwrap_or_else(|e| {
        eprintln!("{kernel_path}: {e}");
        std::process::exit(1)
    });
    let initrd_len = args
        .get(1)
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .unwrap_or(0);
    let bz = match bzimage::parse(&kernel) {
        Ok(bz) => bz,
        Err(e) => {
            println!("refused: {e}");
            std::process::exit(1);
        }
    };
    let h = bz.header;
    println!(
        "protocol {}.{:02}, setup {} sectors, protected-mode part {} KiB, init_size {} KiB",
        h.version >> 8,
        h.version & 0xff,
        h.setup_sects,
        bz.kernel.len() / 1024,
        h.init_size / 1024
    );
    println!(
        "pref_address {:#x}, alignment {:#x} (min 2^{}), xloadflags {:#x}, cmdline_size {}",
        h.pref_address, h.kernel_alignment, h.min_alignment, h.xloadflags, h.cmdline_size
    );
    println!("version {}", bz.version.unwrap_or("(none)"));
    let cmdline = linux::kernel_cmdline("", None);
    for ram_mib in [64u64, 128, 256] {
        match linux::plan(&bz, ram_mib << 20, initrd_len, &cmdline) {
            Ok(l) => println!(
                "{ram_mib} MiB: kernel {:#x}..{:#x}, initramfs at {:#x}",
                l.kernel_gpa, l.kernel_end_gpa, l.initrd_gpa
            ),
            Err(e) => println!("{ram_mib} MiB: {e}"),
        }
    }
}
