//! `hvctl`: the management API's command-line client (docs/MANAGEMENT.md).
//!
//! The protocol and authentication are `vmm_service::mgmt`'s own code (the
//! same state machines the node runs), driven here over a blocking TCP
//! stream with timeouts. The node's address and the cluster key come from
//! the cluster state ([`crate::cluster`]) unless `--addr`/`--key` are given.
//!
//! Output: one human-readable table or line per command; with `--json` the
//! reply body as the node sent it (or `{"error":...}`), so scripts never
//! parse tables. Exit status: 0 on success, 1 when the node answered with an
//! error or could not be reached, 2 on a usage error.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use vmm_service::mgmt::auth::{ClusterKey, Nonce};
use vmm_service::mgmt::conn::{ClientConn, ClientEvent};
use vmm_service::mgmt::proto::{
    ApiError, Body, JobInfo, JobState, NodeInfo, Outcome, Request, VmInfo,
};

/// Time to connect and for each reply.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub const USAGE: &str = "\
usage: hvctl [--node NAME | --addr HOST:PORT --key HEX] [--json] [--state-dir DIR] COMMAND

commands:
  node info                       name, CPU vendor, CPUs, memory, version
  vm list                         the node's VMs
  vm create NAME --memory SIZE [--guest CASE]
                                  SIZE in MiB, or with a unit (64M, 1G); the
                                  guest is the heartbeat guest unless named
  vm start|stop|delete NAME
  vm console NAME [--lines N]     the VM's last console lines
  job list [--watch]              jobs with a progress bar each; --watch
                                  redraws them until none is queued or running
  job watch ID                    a live progress bar until the job ends
  job cancel ID
  host get
  host set [--max-migrations N] [--max-storage-migrations N]

The node's address and the cluster key come from the cluster state written by
`qemu-runner cluster up` (default state directory: target/cluster, or
$HVMIGRATE_CLUSTER_DIR).";

/// 32 unpredictable bytes from the host's kernel.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], String> {
    let mut buf = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    Ok(buf)
}

/// An authenticated connection to one node.
pub struct Client {
    stream: TcpStream,
    conn: ClientConn,
    /// The node's name from its greeting.
    pub node: String,
}

impl Client {
    /// Connect to `addr` and authenticate with `key` (mutually: the node
    /// must prove it holds the key too).
    pub fn connect(addr: &str, key: &ClusterKey) -> Result<Self, String> {
        let sock: SocketAddr = addr
            .to_socket_addrs()
            .map_err(|e| format!("{addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("{addr}: no address"))?;
        let stream = TcpStream::connect_timeout(&sock, IO_TIMEOUT)
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|_| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| format!("{addr}: {e}"))?;
        let nonce: Nonce = random_bytes()?;
        let mut c = Client {
            stream,
            conn: ClientConn::new(key.clone(), nonce),
            node: String::new(),
        };
        loop {
            for ev in c.read_events(addr)? {
                if let ClientEvent::Authenticated { node } = ev {
                    c.node = node;
                    return Ok(c);
                }
            }
        }
    }

    fn flush(&mut self) -> Result<(), String> {
        let out = self.conn.take_output();
        if !out.is_empty() {
            self.stream
                .write_all(&out)
                .map_err(|e| format!("sending to the node: {e}"))?;
        }
        Ok(())
    }

    fn read_events(&mut self, what: &str) -> Result<Vec<ClientEvent>, String> {
        self.flush()?;
        let mut buf = [0u8; 16 * 1024];
        let n = self.stream.read(&mut buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                format!("{what}: no answer within {} s", IO_TIMEOUT.as_secs())
            }
            _ => format!("{what}: {e}"),
        })?;
        if n == 0 {
            return Err(format!("{what}: the node closed the connection"));
        }
        let events = self.conn.receive(&buf[..n]).map_err(|e| e.to_string())?;
        self.flush()?;
        Ok(events)
    }

    /// Send one request and wait for its reply.
    pub fn call(&mut self, request: Request) -> Result<Outcome, String> {
        let id = self.conn.request(request).map_err(|e| e.to_string())?;
        loop {
            for ev in self.read_events("request")? {
                if let ClientEvent::Response(r) = ev {
                    if r.id == id {
                        return Ok(r.outcome);
                    }
                }
            }
        }
    }

    /// [`Client::call`], with an error reply turned into `Err`.
    pub fn call_ok(&mut self, request: Request) -> Result<Body, String> {
        match self.call(request)? {
            Outcome::Ok(body) => Ok(body),
            Outcome::Error(e) => Err(e.to_string()),
        }
    }
}

/// A parsed hvctl command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub node: Option<String>,
    pub addr: Option<String>,
    pub key: Option<String>,
    pub json: bool,
    pub state_dir: Option<String>,
    pub action: Action,
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Help,
    Request(Request),
    /// `job watch ID`: poll until the job ends.
    Watch(u64),
    /// `job list --watch`: redraw every job until none is live.
    WatchAll,
}

/// Parse a size: plain MiB, or with a K/M/G (binary) suffix.
pub fn parse_size_mib(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul_kib) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        None => (s, 1024),
        Some((i, _)) => {
            let unit = s[i..].to_ascii_lowercase();
            let mul = match unit.trim_end_matches("ib").trim_end_matches('b') {
                "k" => 1,
                "m" => 1024,
                "g" => 1024 * 1024,
                _ => return Err(format!("unknown size unit in {s:?} (use M or G)")),
            };
            (&s[..i], mul)
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?} is not a number with an optional M/G unit"))?;
    let kib = n
        .checked_mul(mul_kib)
        .ok_or_else(|| format!("size {s:?} is too large"))?;
    if kib == 0 || kib % 1024 != 0 {
        return Err(format!("size {s:?} must be a positive whole number of MiB"));
    }
    Ok(kib / 1024)
}

fn number(flag: &str, v: &str) -> Result<u64, String> {
    v.parse()
        .map_err(|_| format!("{flag} needs a whole number, got {v:?}"))
}

/// Parse hvctl's arguments (after the program name).
pub fn parse(args: &[String]) -> Result<Invocation, String> {
    let mut inv = Invocation {
        node: None,
        addr: None,
        key: None,
        json: false,
        state_dir: None,
        action: Action::Help,
    };
    let mut words = Vec::new();
    let mut flags: Vec<(String, String)> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if a.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = || -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--json" => inv.json = true,
            "--watch" => flags.push((flag, String::new())),
            "-h" | "--help" => return Ok(inv),
            "--node" => inv.node = Some(value()?),
            "--addr" => inv.addr = Some(value()?),
            "--key" => inv.key = Some(value()?),
            "--state-dir" => inv.state_dir = Some(value()?),
            "--memory"
            | "--guest"
            | "--lines"
            | "--max-migrations"
            | "--max-storage-migrations" => {
                let v = value()?;
                flags.push((flag, v));
            }
            f if f.starts_with('-') => return Err(format!("unknown option {a:?}")),
            _ => words.push(a.clone()),
        }
    }
    let flag = |name: &str| {
        flags
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, v)| v.clone())
    };
    let allowed = |names: &[&str]| -> Result<(), String> {
        match flags.iter().find(|(f, _)| !names.contains(&f.as_str())) {
            Some((f, _)) => Err(format!("{} does not take {f}", words.join(" "))),
            None => Ok(()),
        }
    };
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let name = |i: usize| -> Result<String, String> {
        w.get(i)
            .map(|s| s.to_string())
            .ok_or_else(|| format!("{} needs a VM name", w[..i].join(" ")))
    };
    let id = |i: usize| -> Result<u64, String> {
        w.get(i)
            .ok_or_else(|| format!("{} needs a job id", w[..i].join(" ")))
            .and_then(|v| number("job id", v))
    };
    let request = match w.as_slice() {
        [] => return Ok(inv),
        ["help"] => return Ok(inv),
        ["node", "info"] => Request::NodeInfo,
        ["vm", "list"] => Request::VmList,
        ["vm", "create", ..] => {
            allowed(&["--memory", "--guest"])?;
            let memory = flag("--memory").ok_or("vm create needs --memory SIZE")?;
            Request::VmCreate {
                name: name(2)?,
                memory_mib: parse_size_mib(&memory)?,
                guest: flag("--guest"),
            }
        }
        ["vm", "start", ..] => Request::VmStart { name: name(2)? },
        ["vm", "stop", ..] => Request::VmStop { name: name(2)? },
        ["vm", "delete", ..] => Request::VmDelete { name: name(2)? },
        ["vm", "console", ..] => {
            allowed(&["--lines"])?;
            let lines = match flag("--lines") {
                Some(v) => Some(number("--lines", &v)?.min(u64::from(u32::MAX)) as u32),
                None => None,
            };
            Request::VmConsole {
                name: name(2)?,
                lines,
            }
        }
        ["job", "list"] if flag("--watch").is_some() => {
            allowed(&["--watch"])?;
            inv.action = Action::WatchAll;
            return Ok(inv);
        }
        ["job", "list"] => Request::JobList,
        ["job", "cancel", ..] => Request::JobCancel { id: id(2)? },
        ["job", "watch", ..] => {
            inv.action = Action::Watch(id(2)?);
            return Ok(inv);
        }
        ["host", "get"] => Request::HostGet,
        ["host", "set"] => {
            allowed(&["--max-migrations", "--max-storage-migrations"])?;
            let n = |f: &str| -> Result<Option<u32>, String> {
                flag(f)
                    .map(|v| {
                        number(f, &v)
                            .and_then(|n| u32::try_from(n).map_err(|_| format!("{f} is too large")))
                    })
                    .transpose()
            };
            let (live, storage) = (n("--max-migrations")?, n("--max-storage-migrations")?);
            if live.is_none() && storage.is_none() {
                return Err(
                    "host set needs --max-migrations N and/or --max-storage-migrations N".into(),
                );
            }
            Request::HostSet {
                max_live_migrations: live,
                max_storage_migrations: storage,
            }
        }
        other => return Err(format!("unknown command {:?}", other.join(" "))),
    };
    if !matches!(
        request,
        Request::VmCreate { .. } | Request::VmConsole { .. } | Request::HostSet { .. }
    ) {
        allowed(&[])?;
    }
    inv.action = Action::Request(request);
    Ok(inv)
}

/// A progress bar: `[#########...........]  45%`.
pub fn progress_bar(percent: u8, width: usize) -> String {
    let filled = usize::from(percent.min(100)) * width / 100;
    format!(
        "[{}{}] {:>3}%",
        "#".repeat(filled),
        ".".repeat(width - filled),
        percent.min(100)
    )
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn state_word(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Completed => "completed",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

fn kind_word(j: &JobInfo) -> String {
    serde_json::to_string(&j.kind)
        .unwrap_or_default()
        .trim_matches('"')
        .to_string()
}

/// One line per job.
pub fn job_line(j: &JobInfo) -> String {
    let mut line = format!(
        "{:>4}  {:<17} {:<12} {:<9} {}  {} / {}  {:.1} s{}",
        j.id,
        kind_word(j),
        if j.vm.is_empty() { "-" } else { &j.vm },
        state_word(j.state),
        progress_bar(j.percent, 20),
        mib(j.bytes_done),
        mib(j.bytes_total),
        j.elapsed_ms as f64 / 1000.0,
        if j.cancellable { "  (cancellable)" } else { "" },
    );
    if let Some(e) = &j.error {
        line.push_str(&format!("\n      error: {e}"));
    }
    if let Some(r) = &j.result {
        line.push_str(&format!("\n      result: {r}"));
    }
    line
}

fn vm_line(v: &VmInfo) -> String {
    let mut line = format!(
        "{:<20} {:<8} {:>6} MiB  guest {:<16} exits {:<10} console lines {}",
        v.name, v.state, v.memory_mib, v.guest, v.exits, v.console_lines
    );
    if let Some(r) = &v.stop_reason {
        line.push_str(&format!("  ({r})"));
    }
    line
}

fn node_text(n: &NodeInfo) -> String {
    format!(
        "node {}\n  cpu vendor   {}\n  cpus         {}\n  memory       {} total, {} free\n  version      {} (protocol {})\n  management   {}\n  migration    {}",
        n.name,
        n.cpu_vendor,
        n.cpus,
        mib(n.memory_total_bytes),
        mib(n.memory_free_bytes),
        n.version,
        n.protocol_version,
        n.mgmt_addr,
        n.migration_addr
    )
}

/// The human-readable form of a reply body.
pub fn render(body: &Body) -> String {
    match body {
        Body::NodeInfo(n) => node_text(n),
        Body::VmList { vms } if vms.is_empty() => "no VMs".into(),
        Body::VmList { vms } => vms.iter().map(vm_line).collect::<Vec<_>>().join("\n"),
        Body::Vm(v) => vm_line(v),
        Body::Console { vm, lines } if lines.is_empty() => format!("(VM {vm} has printed nothing)"),
        Body::Console { lines, .. } => lines.join("\n"),
        Body::JobList { jobs } if jobs.is_empty() => "no jobs".into(),
        Body::JobList { jobs } => jobs.iter().map(job_line).collect::<Vec<_>>().join("\n"),
        Body::Job(j) => job_line(j),
        Body::Host(h) => format!(
            "max live migrations     {}\nmax storage migrations  {}",
            h.max_live_migrations, h.max_storage_migrations
        ),
        Body::Done => "done".into(),
    }
}

/// The JSON form of an outcome.
pub fn render_json(outcome: &Outcome) -> String {
    serde_json::to_string_pretty(outcome).unwrap_or_default()
}

/// Print an error the way the output mode wants; returns exit status 1.
fn print_error(json: bool, e: &ApiError) -> u8 {
    if json {
        println!("{}", render_json(&Outcome::Error(e.clone())));
    } else {
        eprintln!("hvctl: {e}");
    }
    1
}

/// Watch job `id` with a live progress bar until it ends (redrawn in place
/// on a terminal, a line per change otherwise).
pub fn watch(client: &mut Client, id: u64, json: bool) -> Result<u8, String> {
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal() && !json;
    let mut last = String::new();
    let start = Instant::now();
    loop {
        let job = match client.call(Request::JobList)? {
            Outcome::Ok(Body::JobList { jobs }) => jobs.into_iter().find(|j| j.id == id),
            Outcome::Ok(_) => None,
            Outcome::Error(e) => return Ok(print_error(json, &e)),
        };
        let Some(job) = job else {
            return Err(format!("no job {id} on node {}", client.node));
        };
        let line = job_line(&job);
        let first = line.lines().next().unwrap_or("").to_string();
        if tty {
            print!("\r{first}");
            let _ = std::io::stdout().flush();
        } else if !json && first != last {
            println!("{first}");
        }
        last = first;
        if job.state.is_final() {
            if tty {
                println!();
            }
            if json {
                println!("{}", render_json(&Outcome::Ok(Body::Job(job.clone()))));
            } else {
                for extra in line.lines().skip(1) {
                    println!("{extra}");
                }
            }
            return Ok(u8::from(job.state != JobState::Completed));
        }
        if start.elapsed() > Duration::from_secs(3600) {
            return Err("gave up watching after an hour".into());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Redraw every job until none is queued or running (in place on a
/// terminal, a block per change otherwise).
pub fn watch_all(client: &mut Client, json: bool) -> Result<u8, String> {
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal() && !json;
    let mut drawn = 0usize;
    let mut last = String::new();
    let start = Instant::now();
    loop {
        let jobs = match client.call(Request::JobList)? {
            Outcome::Ok(Body::JobList { jobs }) => jobs,
            Outcome::Ok(_) => Vec::new(),
            Outcome::Error(e) => return Ok(print_error(json, &e)),
        };
        let live = jobs.iter().any(|j| !j.state.is_final());
        if json {
            if !live {
                println!("{}", render_json(&Outcome::Ok(Body::JobList { jobs })));
                return Ok(0);
            }
        } else {
            let text = render(&Body::JobList { jobs });
            if tty {
                if drawn > 0 {
                    // Cursor up over the previous drawing, clear to the end.
                    print!("\x1b[{drawn}A\x1b[J");
                }
                println!("{text}");
                drawn = text.lines().count();
            } else if text != last {
                println!("{text}\n");
            }
            last = text;
            let _ = std::io::stdout().flush();
            if !live {
                return Ok(0);
            }
        }
        if start.elapsed() > Duration::from_secs(3600) {
            return Err("gave up watching after an hour".into());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Run hvctl with `args`; returns the exit status.
pub fn main_with(args: &[String]) -> u8 {
    let inv = match parse(args) {
        Ok(inv) => inv,
        Err(e) => {
            eprintln!("hvctl: {e}\n\n{USAGE}");
            return 2;
        }
    };
    if inv.action == Action::Help {
        println!("{USAGE}");
        return 0;
    }
    match run(&inv) {
        Ok(code) => code,
        Err(e) => {
            if inv.json {
                let err = ApiError::new(vmm_service::mgmt::proto::ErrorCode::Unsupported, e);
                println!(
                    "{}",
                    serde_json::json!({ "error": { "message": err.message } })
                );
            } else {
                eprintln!("hvctl: {e}");
            }
            1
        }
    }
}

fn run(inv: &Invocation) -> Result<u8, String> {
    let (addr, key) = crate::cluster::resolve_target(
        inv.state_dir.as_deref(),
        inv.node.as_deref(),
        inv.addr.as_deref(),
        inv.key.as_deref(),
    )?;
    let key = ClusterKey::from_hex(&key).map_err(|e| e.to_string())?;
    let mut client = Client::connect(&addr, &key)?;
    match &inv.action {
        Action::Help => Ok(0),
        Action::Watch(id) => watch(&mut client, *id, inv.json),
        Action::WatchAll => watch_all(&mut client, inv.json),
        Action::Request(req) => {
            let outcome = client.call(req.clone())?;
            match &outcome {
                Outcome::Ok(body) => {
                    if inv.json {
                        println!("{}", render_json(&outcome));
                    } else {
                        println!("{}", render(body));
                    }
                    Ok(0)
                }
                Outcome::Error(e) => Ok(print_error(inv.json, e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Invocation, String> {
        parse(&s.split_whitespace().map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn commands_parse() {
        let i = p("--node b --json vm create web --memory 64M --guest hello").unwrap();
        assert_eq!((i.node.as_deref(), i.json), (Some("b"), true));
        assert_eq!(
            i.action,
            Action::Request(Request::VmCreate {
                name: "web".into(),
                memory_mib: 64,
                guest: Some("hello".into())
            })
        );
        assert_eq!(
            p("vm create x --memory=1G").unwrap().action,
            Action::Request(Request::VmCreate {
                name: "x".into(),
                memory_mib: 1024,
                guest: None
            })
        );
        assert_eq!(p("job watch 7").unwrap().action, Action::Watch(7));
        assert_eq!(p("job list --watch").unwrap().action, Action::WatchAll);
        assert!(p("vm list --watch").is_err());
        assert_eq!(
            p("host set --max-migrations 3").unwrap().action,
            Action::Request(Request::HostSet {
                max_live_migrations: Some(3),
                max_storage_migrations: None
            })
        );
        for (args, err) in [
            ("vm create x", "needs --memory"),
            ("vm start", "needs a VM name"),
            ("job cancel x", "whole number"),
            ("vm list --memory 3", "does not take"),
            ("host set", "needs --max"),
            ("fly away", "unknown command"),
            ("--bogus", "unknown option"),
            ("vm create x --memory 3T", "unit"),
        ] {
            let e = p(args).unwrap_err();
            assert!(e.contains(err), "{args}: {e}");
        }
        assert_eq!(p("").unwrap().action, Action::Help);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_mib("64"), Ok(64));
        assert_eq!(parse_size_mib("64MiB"), Ok(64));
        assert_eq!(parse_size_mib("2g"), Ok(2048));
        assert_eq!(parse_size_mib("2048K"), Ok(2));
        assert!(parse_size_mib("1K").is_err());
        assert!(parse_size_mib("0").is_err());
        assert!(parse_size_mib("x").is_err());
        assert!(parse_size_mib("99999999999999999G").is_err());
    }

    #[test]
    fn bars_and_lines() {
        assert_eq!(progress_bar(0, 10), "[..........]   0%");
        assert_eq!(progress_bar(45, 10), "[####......]  45%");
        assert_eq!(progress_bar(200, 10), "[##########] 100%");
        let j = JobInfo {
            id: 3,
            kind: vmm_service::mgmt::proto::JobKind::LiveMigration,
            vm: "web".into(),
            state: JobState::Running,
            percent: 50,
            bytes_done: 1 << 20,
            bytes_total: 2 << 20,
            elapsed_ms: 1500,
            error: None,
            cancellable: true,
            result: None,
        };
        let l = job_line(&j);
        assert!(l.contains("live-migration") && l.contains("running"), "{l}");
        assert!(
            l.contains("1.0 MiB / 2.0 MiB") && l.contains("1.5 s"),
            "{l}"
        );
        assert!(l.contains("(cancellable)"));
    }
}
