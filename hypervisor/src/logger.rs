//! `log` backend: one console line per record, `[seconds] LEVEL target: msg`.
//!
//! The level comes from the node command line (`log=error|warn|info|debug|
//! trace`, default `info`). Time is node time from [`crate::time::now_ns`]
//! (0 until the TSC is calibrated).

use log::{LevelFilter, Log, Metadata, Record};

struct ConsoleLogger;

static LOGGER: ConsoleLogger = ConsoleLogger;

impl Log for ConsoleLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let ns = crate::time::now_ns();
        crate::serial::write_fmt(format_args!(
            "[{:4}.{:06}] {:5} {}: {}\n",
            ns / 1_000_000_000,
            (ns % 1_000_000_000) / 1000,
            record.level(),
            record.target(),
            record.args()
        ));
    }

    fn flush(&self) {}
}

/// Parse a `log=` value; `None` for an unknown level name.
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    match s {
        "off" => Some(LevelFilter::Off),
        "error" => Some(LevelFilter::Error),
        "warn" => Some(LevelFilter::Warn),
        "info" => Some(LevelFilter::Info),
        "debug" => Some(LevelFilter::Debug),
        "trace" => Some(LevelFilter::Trace),
        _ => None,
    }
}

/// Install the console logger at `level`. A second call only changes the
/// level.
pub fn init(level: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        assert_eq!(parse_level("debug"), Some(LevelFilter::Debug));
        assert_eq!(parse_level("loud"), None);
    }
}
