//! What the `vhdx` and `vhdx-bench` command lines share (feature `cli`):
//! clap parsing with errors in the tools' one-line form.

use clap::error::ErrorKind;
use clap::Parser;
use std::process::ExitCode;

/// Parses the process's arguments as `T`. Help and version go to stdout
/// (exit 0); the tool alone prints its help on stderr (exit 2); any other
/// usage error is one line, `NAME: MESSAGE (see `NAME --help`)`, on stderr
/// with exit status 2.
pub fn parse<T: Parser>(name: &str) -> Result<T, ExitCode> {
    T::try_parse().map_err(|e| {
        match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                let _ = e.print();
                return ExitCode::from(2);
            }
            _ => {}
        }
        eprintln!("{name}: {} (see `{name} --help`)", one_line(&e));
        ExitCode::from(2)
    })
}

/// clap's message without its usage and hint lines, on one line.
pub fn one_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let msg: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect();
    let msg = msg.join(" ");
    msg.strip_prefix("error: ").unwrap_or(&msg).to_string()
}
