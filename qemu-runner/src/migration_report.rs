//! The node's `migration-report {JSON}` lines (docs/DESIGN.md, "Node serial
//! markers"): read back into the `migration` crate's own
//! [`MigrationReport`] (its `serde` feature; the node writes the line with
//! `MigrationReport::to_json`) and rendered as the readable summary the
//! `demo` prints. A line that does not parse is reported as such, never a
//! panic.

pub use migration::{MigrationReport, MigrationResult};

/// The line's prefix.
pub const PREFIX: &str = "migration-report ";

/// Parse one serial line; `None` if it is not a well-formed report line.
pub fn parse_line(line: &str) -> Option<MigrationReport> {
    let json = line.trim_end().strip_prefix(PREFIX)?;
    serde_json::from_str(json).ok()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The readable summary of one migration.
pub fn render(r: &MigrationReport) -> String {
    let mut out = format!("live migration: {}", r.result.as_str());
    if let Some(e) = &r.error {
        out.push_str(&format!(" ({e})"));
    }
    out.push('\n');
    let passes: Vec<String> = r
        .pages_per_pass
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let what = if i == 0 {
                "all"
            } else if i + 1 == r.pages_per_pass.len() && r.result == MigrationResult::Completed {
                "final, paused"
            } else {
                "dirty"
            };
            format!("{p} ({what})")
        })
        .collect();
    out.push_str(&format!(
        "  passes:        {}: {}\n",
        r.passes,
        if passes.is_empty() {
            "none".to_string()
        } else {
            passes.join(", ")
        }
    ));
    out.push_str(&format!(
        "  sent:          {:.1} MiB for {:.0} MiB of RAM ({:.2} x), {} zero pages as markers\n",
        mib(r.bytes_sent),
        mib(r.ram_bytes),
        r.bytes_sent as f64 / (r.ram_bytes.max(1)) as f64,
        r.zero_pages
    ));
    out.push_str(&format!(
        "  time:          {} ms in total; downtime {} ms (expected {} ms)\n",
        r.total_ms, r.downtime_ms, r.expected_downtime_ms
    ));
    out.push_str(&format!(
        "  dirty pages:   tracked by {}; memory {}\n",
        r.dirty_tracker
            .as_deref()
            .unwrap_or("nothing (never started)"),
        if r.verified {
            "verified at switch-over (source and destination hash equal)"
        } else {
            "not verified"
        }
    ));
    out.push_str(&format!(
        "  throttle:      {}\n",
        if r.throttle_pct == 0 {
            "none (the guest ran at full speed)".to_string()
        } else {
            format!("{} % of the guest's CPU time taken", r.throttle_pct)
        }
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "migration-report {\"passes\":3,\"pages_per_pass\":[16384,4100,434],\"bytes_sent\":34603008,\"zero_pages\":12269,\"ram_bytes\":67108864,\"total_ms\":3396,\"downtime_ms\":69,\"expected_downtime_ms\":27,\"throttle_pct\":20,\"result\":\"completed\",\"error\":null}";

    #[test]
    fn parses_the_node_line() {
        let r = parse_line(LINE).unwrap();
        assert_eq!(r.passes, 3);
        assert_eq!(r.pages_per_pass, [16384, 4100, 434]);
        assert_eq!(r.bytes_sent, 34603008);
        assert_eq!((r.downtime_ms, r.expected_downtime_ms), (69, 27));
        assert_eq!(r.throttle_pct, 20);
        assert_eq!(r.result, MigrationResult::Completed);
        assert_eq!(r.error, None);
        let s = render(&r);
        assert!(s.starts_with("live migration: completed\n"));
        assert!(s.contains("3: 16384 (all), 4100 (dirty), 434 (final, paused)"));
        assert!(s.contains("33.0 MiB for 64 MiB of RAM (0.52 x)"));
        assert!(s.contains("downtime 69 ms (expected 27 ms)"));
        assert!(s.contains("20 % of the guest's CPU time taken"));
        // A line of an older node has neither tracker nor verification.
        assert_eq!((r.dirty_tracker.as_deref(), r.verified), (None, false));
        assert!(s.contains("tracked by nothing (never started); memory not verified"));
        let newer = LINE.replace(
            "\"error\":null}",
            "\"error\":null,\"dirty_tracker\":\"pml\",\"verified\":true}",
        );
        let r = parse_line(&newer).unwrap();
        assert_eq!(
            (r.dirty_tracker.as_deref(), r.verified),
            (Some("pml"), true)
        );
        assert!(render(&r).contains("tracked by pml; memory verified at switch-over"));
    }

    #[test]
    fn failed_reports_and_garbage() {
        let line = "migration-report {\"passes\":0,\"pages_per_pass\":[],\"bytes_sent\":32898,\"zero_pages\":263,\"ram_bytes\":67108864,\"total_ms\":53,\"downtime_ms\":0,\"expected_downtime_ms\":0,\"throttle_pct\":0,\"result\":\"failed\",\"error\":\"transport failed: \\\"injected\\\" failure\\u0001\"}";
        let r = parse_line(line).unwrap();
        assert_eq!(r.result, MigrationResult::Failed);
        assert_eq!(
            r.error.as_deref(),
            Some("transport failed: \"injected\" failure\u{1}")
        );
        assert!(render(&r).contains("passes:        0: none"));
        for bad in [
            "",
            "migration-report ",
            "migration-report {",
            "migration-report {\"passes\":x}",
            "migration-report {\"passes\":1}",
            "migration-report {\"passes\":3,\"pages_per_pass\":[],\"bytes_sent\":0,\"zero_pages\":0,\"ram_bytes\":0,\"total_ms\":0,\"downtime_ms\":0,\"expected_downtime_ms\":0,\"throttle_pct\":0,\"result\":\"exploded\",\"error\":null}",
            "migration-report {\"passes\":-1,\"pages_per_pass\":[],\"bytes_sent\":0,\"zero_pages\":0,\"ram_bytes\":0,\"total_ms\":0,\"downtime_ms\":0,\"expected_downtime_ms\":0,\"throttle_pct\":0,\"result\":\"failed\",\"error\":null}",
            "[vm] migration-report {}",
        ] {
            assert_eq!(parse_line(bad), None, "{bad}");
        }
        for cut in 0..LINE.len() {
            assert_eq!(parse_line(&LINE[..cut]), None, "cut at {cut}");
        }
    }

    /// What the node writes (`to_json`) is what the runner reads.
    #[test]
    fn round_trips_the_nodes_own_writer() {
        let r = MigrationReport {
            passes: 4,
            pages_per_pass: vec![16384, 512, 40, 3],
            bytes_sent: 70_000_000,
            zero_pages: 100,
            ram_bytes: 64 << 20,
            total_ms: 5000,
            downtime_ms: 12,
            expected_downtime_ms: 9,
            throttle_pct: 45,
            result: MigrationResult::Cancelled,
            error: Some("operator said \"stop\"\n\u{7}".into()),
            dirty_tracker: Some("write-protect".into()),
            verified: false,
            pause_us: migration::PausePhases {
                harvest: 1,
                last_pages: 2,
                verify: 3,
                state: 4,
                drain: 5,
                ready: 6,
                resumed: 7,
            },
        };
        assert_eq!(parse_line(&format!("{PREFIX}{}", r.to_json())), Some(r));
    }
}
