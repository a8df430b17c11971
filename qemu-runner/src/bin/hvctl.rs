//! `hvctl`: the management client (see `qemu_runner::hvctl`).

use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(qemu_runner::hvctl::main())
}
