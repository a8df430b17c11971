//! `hvctl`: the management client (see `qemu_runner::hvctl`).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    ExitCode::from(qemu_runner::hvctl::main_with(&args))
}
