//! The node's `migration-report {JSON}` lines (docs/DESIGN.md, "Node serial
//! markers"; the object is `migration::MigrationReport::to_json`): parsed
//! into [`MigrationReport`] and rendered as the readable summary the `demo`
//! prints.
//!
//! The object is flat with fixed fields (numbers, one array of numbers, two
//! strings or null), so a small scanner reads it; a line that does not
//! parse is reported as such, never a panic.

/// One migration as the node reported it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MigrationReport {
    pub passes: u64,
    pub pages_per_pass: Vec<u64>,
    pub bytes_sent: u64,
    pub zero_pages: u64,
    pub ram_bytes: u64,
    pub total_ms: u64,
    pub downtime_ms: u64,
    pub expected_downtime_ms: u64,
    pub throttle_pct: u64,
    /// `completed`, `cancelled` or `failed`.
    pub result: String,
    pub error: Option<String>,
}

/// The line's prefix.
pub const PREFIX: &str = "migration-report ";

/// Parse one serial line; `None` if it is not a well-formed report line.
pub fn parse_line(line: &str) -> Option<MigrationReport> {
    let json = line.trim_end().strip_prefix(PREFIX)?;
    let mut s = Scanner {
        b: json.as_bytes(),
        i: 0,
    };
    let mut r = MigrationReport::default();
    s.expect(b'{')?;
    loop {
        let key = s.string()?;
        s.expect(b':')?;
        match key.as_str() {
            "pages_per_pass" => r.pages_per_pass = s.array()?,
            "result" => r.result = s.string()?,
            "error" => r.error = s.string_or_null()?,
            k => {
                let v = s.number()?;
                match k {
                    "passes" => r.passes = v,
                    "bytes_sent" => r.bytes_sent = v,
                    "zero_pages" => r.zero_pages = v,
                    "ram_bytes" => r.ram_bytes = v,
                    "total_ms" => r.total_ms = v,
                    "downtime_ms" => r.downtime_ms = v,
                    "expected_downtime_ms" => r.expected_downtime_ms = v,
                    "throttle_pct" => r.throttle_pct = v,
                    _ => {}
                }
            }
        }
        match s.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    (!r.result.is_empty()).then_some(r)
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn next(&mut self) -> Option<u8> {
        let c = *self.b.get(self.i)?;
        self.i += 1;
        Some(c)
    }
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
    fn expect(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }
    fn number(&mut self) -> Option<u64> {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        std::str::from_utf8(&self.b[start..self.i])
            .ok()?
            .parse()
            .ok()
    }
    fn array(&mut self) -> Option<Vec<u64>> {
        self.expect(b'[')?;
        let mut out = Vec::new();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Some(out);
        }
        loop {
            out.push(self.number()?);
            match self.next()? {
                b',' => {}
                b']' => return Some(out),
                _ => return None,
            }
        }
    }
    fn string_or_null(&mut self) -> Option<Option<String>> {
        if self.b[self.i..].starts_with(b"null") {
            self.i += 4;
            return Some(None);
        }
        self.string().map(Some)
    }
    /// A JSON string (RFC 8259, 7) with the escapes the node emits.
    fn string(&mut self) -> Option<String> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            match self.next()? {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => match self.next()? {
                    b'n' => out.push(b'\n'),
                    b'r' => out.push(b'\r'),
                    b't' => out.push(b'\t'),
                    b'u' => {
                        let hex = self.b.get(self.i..self.i + 4)?;
                        self.i += 4;
                        let v = u32::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(char::from_u32(v)?.encode_utf8(&mut buf).as_bytes());
                    }
                    c => out.push(c),
                },
                c => out.push(c),
            }
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The readable summary of one migration.
pub fn render(r: &MigrationReport) -> String {
    let mut out = format!("live migration: {}", r.result);
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
            } else if i + 1 == r.pages_per_pass.len() && r.result == "completed" {
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
        assert_eq!(r.result, "completed");
        assert_eq!(r.error, None);
        let s = render(&r);
        assert!(s.starts_with("live migration: completed\n"));
        assert!(s.contains("3: 16384 (all), 4100 (dirty), 434 (final, paused)"));
        assert!(s.contains("33.0 MiB for 64 MiB of RAM (0.52 x)"));
        assert!(s.contains("downtime 69 ms (expected 27 ms)"));
        assert!(s.contains("20 % of the guest's CPU time taken"));
    }

    #[test]
    fn failed_reports_and_garbage() {
        let line = "migration-report {\"passes\":0,\"pages_per_pass\":[],\"bytes_sent\":32898,\"zero_pages\":263,\"ram_bytes\":67108864,\"total_ms\":53,\"downtime_ms\":0,\"expected_downtime_ms\":0,\"throttle_pct\":0,\"result\":\"failed\",\"error\":\"transport failed: \\\"injected\\\" failure\\u0001\"}";
        let r = parse_line(line).unwrap();
        assert_eq!(r.result, "failed");
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
            "[vm] migration-report {}",
        ] {
            assert_eq!(parse_line(bad), None, "{bad}");
        }
        for cut in 0..LINE.len() {
            let _ = parse_line(&LINE[..cut]);
        }
    }
}
