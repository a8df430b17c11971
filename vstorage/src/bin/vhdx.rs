fn main() {
    eprintln!("vhdx: not built yet");
    std::process::exit(1);
}
