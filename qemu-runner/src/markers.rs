//! The node's serial markers (docs/DESIGN.md, "Node serial markers"), parsed
//! one line at a time, and [`SerialLog`], which folds a run's lines into the
//! facts the commands report on.
//!
//! Markers count only at the start of a line: a guest's console output is
//! prefixed `[VMNAME] ` by the node, so a guest cannot fake a node marker.
//! Carriage returns and ANSI colour sequences are removed first.

/// How one case ended, as the node reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaseResult {
    Ok,
    Failed(String),
}

/// `bench exits: hypercall_roundtrips_per_s=X raw_roundtrips_per_s=Y ratio_pct=Z`
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BenchExits {
    pub hypercall_per_s: f64,
    pub raw_per_s: f64,
    pub ratio_pct: f64,
}

/// `dirty-rate: t_ms=T pages_per_s=P mib_per_s=M exits=E`
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DirtyRate {
    pub t_ms: f64,
    pub pages_per_s: f64,
    pub mib_per_s: f64,
    pub exits: f64,
}

/// `hvmigrate: node NAME up: vendor amd|intel, CPUS cpus, MIB MiB free`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeUp {
    pub name: String,
    pub vendor: String,
    pub cpus: u32,
    pub free_mib: u64,
}

/// One classified serial line.
#[derive(Clone, Debug, PartialEq)]
pub enum Marker {
    NodeUp(NodeUp),
    /// `[VM] text`: a line a guest's UART emitted.
    Console {
        vm: String,
        text: String,
    },
    /// `case NAME: ok` / `case NAME: FAILED: reason`.
    Case {
        name: String,
        result: CaseResult,
    },
    /// `N passed, N failed` (the node's own total).
    Totals {
        passed: u32,
        failed: u32,
    },
    BenchExits(BenchExits),
    DirtyRate(DirtyRate),
    /// `hvmigrate: shutdown code=N`.
    Shutdown {
        code: i64,
    },
    /// `HYPERVISOR FAULT: ...` (the whole line).
    Fault(String),
    /// `HYPERVISOR PANIC...` (the whole line).
    Panic(String),
    /// Anything else (log lines, register dumps).
    Other,
}

/// Remove `\r` and ANSI escape sequences (`ESC [ ... letter`) and trailing
/// whitespace.
pub fn clean_line(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\x1b' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            c => out.push(c),
        }
    }
    out.truncate(out.trim_end().len());
    out
}

/// Value of `key=` among space-separated `key=value` words.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_ascii_whitespace()
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn num(text: &str, key: &str) -> Option<f64> {
    field(text, key)?.parse().ok()
}

/// `N passed, N failed` (alone on the line).
pub fn parse_totals(line: &str) -> Option<(u32, u32)> {
    let (passed, rest) = line.split_once(" passed, ")?;
    let failed = rest.strip_suffix(" failed")?;
    Some((passed.parse().ok()?, failed.parse().ok()?))
}

fn parse_node_up(rest: &str) -> Option<NodeUp> {
    // rest = "NAME up: vendor amd, 1 cpus, 957 MiB free"
    let (name, rest) = rest.split_once(" up: vendor ")?;
    let mut parts = rest.split(", ");
    let vendor = parts.next()?;
    let cpus = parts.next()?.strip_suffix(" cpus")?.parse().ok()?;
    let free_mib = parts.next()?.strip_suffix(" MiB free")?.parse().ok()?;
    Some(NodeUp {
        name: name.to_string(),
        vendor: vendor.to_string(),
        cpus,
        free_mib,
    })
}

/// Classify one line (already cleaned or not: it is cleaned here).
pub fn parse_line(raw: &str) -> Marker {
    let line = clean_line(raw);
    let line = line.as_str();
    if let Some(rest) = line.strip_prefix("case ") {
        if let Some((name, outcome)) = rest.split_once(": ") {
            if !name.is_empty() && !name.contains(' ') {
                let result = if outcome == "ok" {
                    Some(CaseResult::Ok)
                } else {
                    outcome.strip_prefix("FAILED").map(|reason| {
                        CaseResult::Failed(reason.trim_start_matches(':').trim().to_string())
                    })
                };
                if let Some(result) = result {
                    return Marker::Case {
                        name: name.to_string(),
                        result,
                    };
                }
            }
        }
    }
    if let Some((passed, failed)) = parse_totals(line) {
        return Marker::Totals { passed, failed };
    }
    if let Some(rest) = line.strip_prefix("bench exits:") {
        if let (Some(h), Some(r), Some(p)) = (
            num(rest, "hypercall_roundtrips_per_s"),
            num(rest, "raw_roundtrips_per_s"),
            num(rest, "ratio_pct"),
        ) {
            return Marker::BenchExits(BenchExits {
                hypercall_per_s: h,
                raw_per_s: r,
                ratio_pct: p,
            });
        }
    }
    if let Some(rest) = line.strip_prefix("dirty-rate:") {
        if let (Some(t), Some(p), Some(m), Some(e)) = (
            num(rest, "t_ms"),
            num(rest, "pages_per_s"),
            num(rest, "mib_per_s"),
            num(rest, "exits"),
        ) {
            return Marker::DirtyRate(DirtyRate {
                t_ms: t,
                pages_per_s: p,
                mib_per_s: m,
                exits: e,
            });
        }
    }
    if let Some(rest) = line.strip_prefix("hvmigrate: shutdown code=") {
        if let Ok(code) = rest.trim().parse() {
            return Marker::Shutdown { code };
        }
    }
    if let Some(rest) = line.strip_prefix("hvmigrate: node ") {
        if let Some(up) = parse_node_up(rest) {
            return Marker::NodeUp(up);
        }
    }
    if line.starts_with("HYPERVISOR FAULT") {
        return Marker::Fault(line.to_string());
    }
    if line.starts_with("HYPERVISOR PANIC") {
        return Marker::Panic(line.to_string());
    }
    if let Some(rest) = line.strip_prefix('[') {
        if let Some((vm, text)) = rest.split_once(']') {
            // Log lines look like `[   0.000000] INFO ...`: a VM name has no
            // spaces and is followed by exactly one space.
            if !vm.is_empty() && !vm.contains(char::is_whitespace) {
                let text = text.strip_prefix(' ').unwrap_or(text);
                return Marker::Console {
                    vm: vm.to_string(),
                    text: text.to_string(),
                };
            }
        }
    }
    Marker::Other
}

/// Everything a run's serial output said that the runner reports on.
#[derive(Clone, Debug, Default)]
pub struct SerialLog {
    pub node_up: Option<NodeUp>,
    /// Case results in the order reported (first report of a name wins).
    pub cases: Vec<(String, CaseResult)>,
    /// `(vm, text)` console lines.
    pub console: Vec<(String, String)>,
    pub totals: Option<(u32, u32)>,
    pub bench: Option<BenchExits>,
    pub dirty_rates: Vec<DirtyRate>,
    pub shutdown: Option<i64>,
    /// First `HYPERVISOR FAULT` / `HYPERVISOR PANIC` line.
    pub fault: Option<String>,
    pub lines: usize,
}

impl SerialLog {
    /// Fold in one raw line; returns its classification.
    pub fn push(&mut self, raw: &str) -> Marker {
        self.lines += 1;
        let marker = parse_line(raw);
        match &marker {
            Marker::NodeUp(up) => self.node_up = Some(up.clone()),
            Marker::Console { vm, text } => self.console.push((vm.clone(), text.clone())),
            Marker::Case { name, result } => {
                if !self.cases.iter().any(|(n, _)| n == name) {
                    self.cases.push((name.clone(), result.clone()));
                }
            }
            Marker::Totals { passed, failed } => self.totals = Some((*passed, *failed)),
            Marker::BenchExits(b) => self.bench = Some(*b),
            Marker::DirtyRate(d) => self.dirty_rates.push(*d),
            Marker::Shutdown { code } => self.shutdown = Some(*code),
            Marker::Fault(l) | Marker::Panic(l) => {
                if self.fault.is_none() {
                    self.fault = Some(l.clone());
                }
            }
            Marker::Other => {}
        }
        marker
    }

    /// Fold in a whole transcript (for tests and saved logs).
    pub fn from_text(text: &str) -> Self {
        let mut log = Self::default();
        for line in text.lines() {
            log.push(line);
        }
        log
    }

    /// The node's result for `case`, if it reported one.
    pub fn case(&self, name: &str) -> Option<&CaseResult> {
        self.cases.iter().find(|(n, _)| n == name).map(|(_, r)| r)
    }

    /// Whether VM `vm` printed exactly `text` as a console line.
    pub fn has_console_line(&self, vm: &str, text: &str) -> bool {
        self.console.iter().any(|(v, t)| v == vm && t == text)
    }
}

/// The `heartbeat N` numbers VM `vm` printed in a node's serial text
/// (`[vm] heartbeat N`, in order; a half-written last line is skipped).
pub fn heartbeats(serial: &str, vm: &str) -> Vec<u64> {
    let prefix = format!("[{vm}] heartbeat ");
    // Only whole lines: a log read while QEMU writes it may end in the
    // first digits of the next heartbeat (`heartbeat 4` of `heartbeat 440`).
    serial
        .split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .filter_map(|l| clean_line(l).strip_prefix(&prefix)?.parse().ok())
        .collect()
}

/// The heartbeats of one VM across nodes: `first..=last`, each once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatSpan {
    pub first: u64,
    pub last: u64,
}

/// Check heartbeats gathered from every node a VM ran on (each node's in
/// its own order): together they must be 1, 2, 3, ... with none missing
/// and none printed twice (twice means two copies of the VM ran), and each
/// node's must rise. `Err` names the first fault.
pub fn check_heartbeats(per_node: &[(&str, &[u64])]) -> Result<HeartbeatSpan, String> {
    for (node, beats) in per_node {
        if let Some(w) = beats.windows(2).find(|w| w[1] <= w[0]) {
            return Err(format!(
                "node {node}: heartbeat {} came after {}",
                w[1], w[0]
            ));
        }
    }
    let mut all: Vec<(u64, &str)> = per_node
        .iter()
        .flat_map(|(node, beats)| beats.iter().map(move |&b| (b, *node)))
        .collect();
    all.sort_unstable();
    let Some(&(first, _)) = all.first() else {
        return Err("no heartbeat at all".into());
    };
    if first != 1 {
        return Err(format!("the first heartbeat is {first}, not 1"));
    }
    for w in all.windows(2) {
        let ((a, na), (b, nb)) = (w[0], w[1]);
        if a == b {
            return Err(format!(
                "heartbeat {a} was printed twice (nodes {na} and {nb}): two copies of the VM ran"
            ));
        }
        if b != a + 1 {
            return Err(format!(
                "heartbeats {}..={} are missing (node {na} printed {a}, then node {nb} {b})",
                a + 1,
                b - 1
            ));
        }
    }
    Ok(HeartbeatSpan {
        first,
        last: all.last().map_or(first, |l| l.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_carriage_returns_and_colours() {
        assert_eq!(clean_line("case hello: ok\r"), "case hello: ok");
        assert_eq!(
            clean_line("\x1b[32mcase hello: ok\x1b[0m  "),
            "case hello: ok"
        );
    }

    #[test]
    fn case_lines() {
        assert_eq!(
            parse_line("case hello: ok\r"),
            Marker::Case {
                name: "hello".into(),
                result: CaseResult::Ok
            }
        );
        assert_eq!(
            parse_line("case dirty-log: FAILED: round 2: dirty sets differ in 3 frames"),
            Marker::Case {
                name: "dirty-log".into(),
                result: CaseResult::Failed("round 2: dirty sets differ in 3 frames".into())
            }
        );
        assert_eq!(
            parse_line("case x: FAILED"),
            Marker::Case {
                name: "x".into(),
                result: CaseResult::Failed(String::new())
            }
        );
        // Not markers: inside a console line, or a malformed outcome.
        assert!(matches!(
            parse_line("[hello] case hello: ok"),
            Marker::Console { .. }
        ));
        assert_eq!(parse_line("case hello: maybe"), Marker::Other);
        assert_eq!(parse_line("case two words: ok"), Marker::Other);
    }

    #[test]
    fn totals() {
        assert_eq!(
            parse_line("7 passed, 0 failed"),
            Marker::Totals {
                passed: 7,
                failed: 0
            }
        );
        assert_eq!(parse_totals("12 passed, 3 failed"), Some((12, 3)));
        assert_eq!(parse_totals("7 passed, 0 failed, 1 skipped"), None);
        assert_eq!(parse_totals("x passed, 0 failed"), None);
    }

    #[test]
    fn node_up_and_shutdown() {
        assert_eq!(
            parse_line("hvmigrate: node a up: vendor amd, 1 cpus, 957 MiB free\r"),
            Marker::NodeUp(NodeUp {
                name: "a".into(),
                vendor: "amd".into(),
                cpus: 1,
                free_mib: 957
            })
        );
        assert_eq!(
            parse_line("hvmigrate: shutdown code=0"),
            Marker::Shutdown { code: 0 }
        );
        assert_eq!(
            parse_line("hvmigrate: shutdown code=3\r"),
            Marker::Shutdown { code: 3 }
        );
    }

    #[test]
    fn bench_and_dirty_rate() {
        assert_eq!(
            parse_line("bench exits: hypercall_roundtrips_per_s=52000 raw_roundtrips_per_s=61000 ratio_pct=85.2"),
            Marker::BenchExits(BenchExits { hypercall_per_s: 52000.0, raw_per_s: 61000.0, ratio_pct: 85.2 })
        );
        assert_eq!(
            parse_line("bench exits: hypercall_roundtrips_per_s=oops"),
            Marker::Other
        );
        assert_eq!(
            parse_line("dirty-rate: t_ms=1000 pages_per_s=4096 mib_per_s=16 exits=4100"),
            Marker::DirtyRate(DirtyRate {
                t_ms: 1000.0,
                pages_per_s: 4096.0,
                mib_per_s: 16.0,
                exits: 4100.0
            })
        );
    }

    #[test]
    fn console_versus_log_lines() {
        assert_eq!(
            parse_line("[hello] Hello from the hvmigrate guest\r"),
            Marker::Console {
                vm: "hello".into(),
                text: "Hello from the hvmigrate guest".into()
            }
        );
        assert_eq!(
            parse_line("[two-vms-a] two-vms a: done"),
            Marker::Console {
                vm: "two-vms-a".into(),
                text: "two-vms a: done".into()
            }
        );
        assert_eq!(
            parse_line("[   0.000000] INFO  hvmigrate::image: booting"),
            Marker::Other
        );
        assert_eq!(
            parse_line("[vm0]"),
            Marker::Console {
                vm: "vm0".into(),
                text: String::new()
            }
        );
    }

    #[test]
    fn faults() {
        assert!(matches!(
            parse_line("HYPERVISOR FAULT: vector 14 (#PF)"),
            Marker::Fault(_)
        ));
        assert!(matches!(
            parse_line("HYPERVISOR PANIC at src/x.rs:3: boom"),
            Marker::Panic(_)
        ));
        assert_eq!(
            parse_line("[vm] HYPERVISOR FAULT: fake"),
            Marker::Console {
                vm: "vm".into(),
                text: "HYPERVISOR FAULT: fake".into()
            }
        );
    }

    /// A transcript shaped like a real `mode=test` boot.
    const TRANSCRIPT: &str = "\
[   0.000000] INFO  hvmigrate::image: hvmigrate booting via Multiboot1\r
hvmigrate: node a up: vendor amd, 1 cpus, 957 MiB free\r
[hello] Hello from the hvmigrate guest\r
case hello: ok\r
[cpuid] cpuid: hypervisor bit set\r
case cpuid: FAILED: CPUID.1:ECX[31] (hypervisor present) is 0\r
case hello: FAILED: duplicate report is ignored\r
1 passed, 1 failed\r
hvmigrate: shutdown code=1\r
";

    #[test]
    fn serial_log_folds_a_transcript() {
        let log = SerialLog::from_text(TRANSCRIPT);
        assert_eq!(log.node_up.as_ref().map(|n| n.free_mib), Some(957));
        assert_eq!(log.case("hello"), Some(&CaseResult::Ok));
        assert!(matches!(log.case("cpuid"), Some(CaseResult::Failed(r)) if r.contains("ECX[31]")));
        assert_eq!(log.case("memory"), None);
        assert_eq!(log.cases.len(), 2);
        assert!(log.has_console_line("hello", "Hello from the hvmigrate guest"));
        assert!(!log.has_console_line("cpuid", "Hello from the hvmigrate guest"));
        assert_eq!(log.totals, Some((1, 1)));
        assert_eq!(log.shutdown, Some(1));
        assert_eq!(log.fault, None);
        assert_eq!(log.lines, 9);
    }

    #[test]
    fn heartbeats_across_nodes() {
        let a = "[v] heartbeat 1\r\n[w] heartbeat 7\n[v] heartbeat 2\nhvmigrate: x\n[v] heartbeat 3\n[v] heartbeat 6\n[v] heartb";
        // Read while `heartbeat 440` was being written.
        assert_eq!(
            heartbeats("[v] heartbeat 439\r\n[v] heartbeat 4", "v"),
            vec![439]
        );
        let b = "[v] heartbeat 4\n[v] busy-verify: migration 1 ok\n[v] heartbeat 5\n";
        let (ha, hb) = (heartbeats(a, "v"), heartbeats(b, "v"));
        assert_eq!(ha, vec![1, 2, 3, 6]);
        assert_eq!(hb, vec![4, 5]);
        assert_eq!(
            check_heartbeats(&[("a", &ha), ("b", &hb)]),
            Ok(HeartbeatSpan { first: 1, last: 6 })
        );
        let e = check_heartbeats(&[("a", &[1, 2, 3]), ("b", &[3, 4])]).unwrap_err();
        assert!(
            e.contains("heartbeat 3 was printed twice (nodes a and b)"),
            "{e}"
        );
        let e = check_heartbeats(&[("a", &[1, 2]), ("b", &[5, 6])]).unwrap_err();
        assert!(e.contains("heartbeats 3..=4 are missing"), "{e}");
        let e = check_heartbeats(&[("a", &[2, 3])]).unwrap_err();
        assert!(e.contains("first heartbeat is 2"), "{e}");
        let e = check_heartbeats(&[("a", &[1, 3, 2])]).unwrap_err();
        assert!(e.contains("node a: heartbeat 2 came after 3"), "{e}");
        assert!(check_heartbeats(&[("a", &[])]).is_err());
    }
}
