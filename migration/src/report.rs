//! [`MigrationReport`]: what a migration did, as one JSON line.
//!
//! Hand-written JSON (no serde in this `no_std` crate: thirteen fixed fields
//! do not justify a dependency). The node prints the line prefixed
//! `migration-report `. Field order and names are fixed:
//! `passes`, `pages_per_pass`, `bytes_sent`, `zero_pages`, `ram_bytes`,
//! `total_ms`, `downtime_ms`, `expected_downtime_ms`, `throttle_pct`,
//! `result` (`"completed"` | `"cancelled"` | `"failed"`), `error` (string or
//! `null`), `dirty_tracker` (the tracker the source's dirty log used, e.g.
//! `"write-protect"` or `"pml"`, or `null` if it never started),
//! `verified` (`true` once verification mode found the source's memory
//! equal to what was sent, see `Policy::verify_memory`), `pause_us`
//! (where the downtime went, [`PausePhases`]: an object of seven
//! microsecond counts `harvest`, `last_pages`, `verify`, `state`, `drain`,
//! `ready`, `resumed`).
//!
//! With the `serde` feature the types also derive serde's traits, so host
//! tools read the line back into this same type (`serde_json::from_str`).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

/// How a migration ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum MigrationResult {
    /// The VM runs at the destination; the source may be removed.
    Completed,
    /// Stopped by the operator or the time limit; the VM runs at the source.
    Cancelled,
    /// Stopped by an error. The VM runs at the source, except when the
    /// error is `InDoubt` (see [`crate::MigrationError::InDoubt`]).
    Failed,
}

impl MigrationResult {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationResult::Completed => "completed",
            MigrationResult::Cancelled => "cancelled",
            MigrationResult::Failed => "failed",
        }
    }
}

/// Where the downtime went, in microseconds of the source's clock, from
/// the pause to the destination's `resumed`, phase after phase (their sum
/// is the downtime; all 0 if the VM was never paused). Each phase runs
/// from the first engine step in it to the first step of the next, so the
/// node's other work between steps counts where it delayed the migration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PausePhases {
    /// Stopping the vCPUs and the last collection of the dirty log.
    pub harvest: u64,
    /// The last dirty pages handed to the transport.
    pub last_pages: u64,
    /// Verification mode: re-reading and hashing the whole memory (0 when
    /// off).
    pub verify: u64,
    /// Saving vCPU and device state, sending it and the end record.
    pub state: u64,
    /// Until the destination acknowledged every byte sent (data in flight
    /// at the pause, and the state).
    pub drain: u64,
    /// Until its `ready`: it applied the last records, checked the digest
    /// (in verification mode: re-read its whole memory) and loaded the
    /// state.
    pub ready: u64,
    /// From `go` to its `resumed`.
    pub resumed: u64,
}

impl PausePhases {
    /// The phases' names and values, in order.
    pub fn named(&self) -> [(&'static str, u64); 7] {
        [
            ("harvest", self.harvest),
            ("last_pages", self.last_pages),
            ("verify", self.verify),
            ("state", self.state),
            ("drain", self.drain),
            ("ready", self.ready),
            ("resumed", self.resumed),
        ]
    }
}

/// Statistics and outcome of one migration, from the source's view.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MigrationReport {
    /// Copy passes, the final (paused) one included.
    pub passes: u32,
    /// Pages sent per pass (data and zero markers).
    pub pages_per_pass: Vec<u64>,
    /// Bytes written to the transport, framing included.
    pub bytes_sent: u64,
    /// Pages sent as zero markers (over all passes).
    pub zero_pages: u64,
    /// Guest RAM size.
    pub ram_bytes: u64,
    /// Start to end.
    pub total_ms: u64,
    /// Source pause to the arrival of the destination's `resumed` (an upper
    /// bound on the guest's pause). 0 if the VM was never paused.
    pub downtime_ms: u64,
    /// The estimate that triggered switch-over (or the last one computed).
    pub expected_downtime_ms: u64,
    /// Throttle in force at the end of pre-copy.
    pub throttle_pct: u8,
    /// Outcome.
    pub result: MigrationResult,
    /// Why it did not complete.
    pub error: Option<String>,
    /// The dirty tracker the source used ([`crate::MigratableVm::start_dirty_log`]).
    /// (Absent in lines of older nodes: read as `None`.)
    #[cfg_attr(feature = "serde", serde(default))]
    pub dirty_tracker: Option<String>,
    /// Verification mode ran at switch-over and found no stale page.
    /// (Absent in lines of older nodes: read as `false`.)
    #[cfg_attr(feature = "serde", serde(default))]
    pub verified: bool,
    /// Where the downtime went. (Absent in lines of older nodes: zeros.)
    #[cfg_attr(feature = "serde", serde(default))]
    pub pause_us: PausePhases,
}

impl MigrationReport {
    /// The report as one line of JSON (no trailing newline).
    pub fn to_json(&self) -> String {
        let mut s = String::with_capacity(256);
        // Writing to a String cannot fail.
        let _ = write!(s, "{{\"passes\":{},\"pages_per_pass\":[", self.passes);
        for (i, p) in self.pages_per_pass.iter().enumerate() {
            let _ = write!(s, "{}{p}", if i == 0 { "" } else { "," });
        }
        let _ = write!(
            s,
            "],\"bytes_sent\":{},\"zero_pages\":{},\"ram_bytes\":{},\"total_ms\":{},\
             \"downtime_ms\":{},\"expected_downtime_ms\":{},\"throttle_pct\":{},\"result\":\"{}\",\"error\":",
            self.bytes_sent,
            self.zero_pages,
            self.ram_bytes,
            self.total_ms,
            self.downtime_ms,
            self.expected_downtime_ms,
            self.throttle_pct,
            self.result.as_str()
        );
        match &self.error {
            None => s.push_str("null"),
            Some(e) => json_string(&mut s, e),
        }
        s.push_str(",\"dirty_tracker\":");
        match &self.dirty_tracker {
            None => s.push_str("null"),
            Some(t) => json_string(&mut s, t),
        }
        let _ = write!(s, ",\"verified\":{},\"pause_us\":{{", self.verified);
        for (i, (name, us)) in self.pause_us.named().iter().enumerate() {
            let _ = write!(s, "{}\"{name}\":{us}", if i == 0 { "" } else { "," });
        }
        s.push_str("}}");
        s
    }
}

/// Append `text` as a JSON string literal (RFC 8259, section 7).
fn json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn json_line_has_exactly_the_fields() {
        let mut r = MigrationReport {
            passes: 3,
            pages_per_pass: vec![16384, 120, 7],
            bytes_sent: 123456,
            zero_pages: 9000,
            ram_bytes: 64 << 20,
            total_ms: 812,
            downtime_ms: 12,
            expected_downtime_ms: 10,
            throttle_pct: 20,
            result: MigrationResult::Completed,
            error: None,
            dirty_tracker: Some("pml".to_string()),
            verified: true,
            pause_us: PausePhases {
                harvest: 1,
                last_pages: 2,
                verify: 3,
                state: 4,
                drain: 5,
                ready: 6,
                resumed: 7,
            },
        };
        assert_eq!(
            r.to_json(),
            "{\"passes\":3,\"pages_per_pass\":[16384,120,7],\"bytes_sent\":123456,\
             \"zero_pages\":9000,\"ram_bytes\":67108864,\"total_ms\":812,\"downtime_ms\":12,\
             \"expected_downtime_ms\":10,\"throttle_pct\":20,\"result\":\"completed\",\"error\":null,\
             \"dirty_tracker\":\"pml\",\"verified\":true,\"pause_us\":{\"harvest\":1,\
             \"last_pages\":2,\"verify\":3,\"state\":4,\"drain\":5,\"ready\":6,\"resumed\":7}}"
        );
        r.result = MigrationResult::Failed;
        r.pages_per_pass.clear();
        r.error = Some("record 12: \"CRC\" mismatch\\\n\u{1}".to_string());
        r.dirty_tracker = None;
        r.verified = false;
        let j = r.to_json();
        assert!(j.contains("\"pages_per_pass\":[],"));
        assert!(j.ends_with(
            "\"result\":\"failed\",\"error\":\"record 12: \\\"CRC\\\" mismatch\\\\\\n\\u0001\",\
             \"dirty_tracker\":null,\"verified\":false,\"pause_us\":{\"harvest\":1,\
             \"last_pages\":2,\"verify\":3,\"state\":4,\"drain\":5,\"ready\":6,\"resumed\":7}}"
        ));
    }
}
