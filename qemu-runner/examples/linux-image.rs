//! Build the Linux guest image (downloads on first use) and print where it
//! is: `cargo run -p qemu-runner --example linux-image`. The runner's Linux
//! cases will call the same library function. What the node's loader makes
//! of it: `cargo run -p vmm-service --example linux-layout -- KERNEL
//! INITRAMFS`.

use qemu_runner::linux_image;
use std::path::PathBuf;

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
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len() / 1024).unwrap_or(0);
    println!("release    {}", image.release);
    println!(
        "kernel     {} ({} KiB)",
        image.kernel.display(),
        size(&image.kernel)
    );
    println!(
        "initramfs  {} ({} KiB)",
        image.initramfs.display(),
        size(&image.initramfs)
    );
    println!("modules    {}", image.modules.join(" "));
    println!("took       {:.1} s", started.elapsed().as_secs_f64());
}
