//! Links the bare-metal image with `linker.ld` (only for `x86_64-unknown-none`;
//! the host build of this crate is an empty `main`).

fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let script = format!("{manifest_dir}/linker.ld");
    println!("cargo:rerun-if-changed={script}");
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bins=-T{script}");
        // One PT_LOAD whose file offset stays small, so the Multiboot header
        // lands inside the first 8 KiB of the file (Multiboot spec 0.6.96, 3.1.1).
        println!("cargo:rustc-link-arg-bins=-zmax-page-size=0x1000");
        println!("cargo:rustc-link-arg-bins=--no-dynamic-linker");
    }
}
