//! Build the Linux guest image (downloads on first use) and print what the
//! loader sees in it: `cargo run -p qemu-runner --example linux-image`.
//! The runner's `linux-boot` case will call the same library function.

use qemu_runner::linux_image;
use std::path::PathBuf;
use vmm_service::loader::{bzimage, linux};

fn main() {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let target = target.canonicalize().unwrap_or(target);
    let started = std::time::Instant::now();
    let image = match linux_image::build(&target, &mut |line| eprintln!("{line}")) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("linux-image: {e}");
            std::process::exit(1);
        }
    };
    let kernel = std::fs::read(&image.kernel).expect("read the kernel");
    let initrd_len = std::fs::metadata(&image.initramfs)
        .expect("initramfs")
        .len();
    println!("release    {}", image.release);
    println!(
        "kernel     {} ({} KiB)",
        image.kernel.display(),
        kernel.len() / 1024
    );
    println!(
        "initramfs  {} ({} KiB)",
        image.initramfs.display(),
        initrd_len / 1024
    );
    println!("modules    {}", image.modules.join(" "));
    match bzimage::parse(&kernel) {
        Ok(bz) => {
            let h = bz.header;
            println!(
                "bzImage    protocol {}.{:02}, setup {} sectors, protected-mode part {} KiB, init_size {} KiB",
                h.version >> 8,
                h.version & 0xff,
                h.setup_sects,
                bz.kernel.len() / 1024,
                h.init_size / 1024
            );
            println!(
                "           pref_address {:#x}, alignment {:#x} (min 2^{}), xloadflags {:#x}, cmdline_size {}",
                h.pref_address, h.kernel_alignment, h.min_alignment, h.xloadflags, h.cmdline_size
            );
            println!("           version {}", bz.version.unwrap_or("(none)"));
            let cmdline = linux::kernel_cmdline("", None);
            for ram_mib in [64u64, 128, 256] {
                match linux::plan(&bz, ram_mib << 20, initrd_len, &cmdline) {
                    Ok(l) => println!(
                        "layout     {ram_mib} MiB: kernel {:#x}..{:#x}, initramfs at {:#x}",
                        l.kernel_gpa, l.kernel_end_gpa, l.initrd_gpa
                    ),
                    Err(e) => println!("layout     {ram_mib} MiB: {e}"),
                }
            }
        }
        Err(e) => println!("bzImage    refused: {e}"),
    }
    println!("took       {:.1} s", started.elapsed().as_secs_f64());
}
