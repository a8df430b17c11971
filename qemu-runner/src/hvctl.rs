//! `hvctl`: the management API's command-line client (docs/MANAGEMENT.md).
//!
//! The protocol and authentication are `hvmgmt`'s code (the
//! same state machines the node runs), driven here over a blocking TCP
//! stream with timeouts. The node's address and the cluster key come from
//! the cluster state ([`crate::cluster`]) unless `--addr`/`--key` are given.
//!
//! The command line is declared with clap's derive API ([`Cli`]): generated
//! help for every command (`hvctl help vm create`), shell completions
//! (`hvctl completions bash`), usage errors with exit status 2. Live
//! progress (`job watch`, `job list --watch`) is drawn by indicatif on a
//! terminal and never with `--json` or into a pipe, where a line per change
//! is printed instead.
//!
//! Output: one human-readable table or line per command; with `--json` the
//! reply body as the node sent it (or `{"error":...}`), so scripts never
//! parse tables. Exit status: 0 on success, 1 when the node answered with an
//! error or could not be reached, 2 on a usage error.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser, Subcommand};
use hvmgmt::auth::{ClusterKey, Nonce};
use hvmgmt::client::{ClientConn, ClientEvent};
use hvmgmt::proto::{ApiError, Body, JobInfo, JobState, NodeInfo, Outcome, Request, VmInfo};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Time to connect and for each reply.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The management client of an hvmigrate cluster (docs/MANAGEMENT.md).
///
/// The node's address and the cluster key come from the cluster state
/// written by `qemu-runner cluster up` unless --addr and --key are given.
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(name = "hvctl", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// The node to talk to, by its name in the cluster state (default a)
    #[arg(long, global = true, value_name = "NAME")]
    pub node: Option<String>,
    /// The node's management address instead of the cluster state's
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub addr: Option<String>,
    /// The cluster key (64 hex digits) instead of the cluster state's
    #[arg(long, global = true, value_name = "HEX")]
    pub key: Option<String>,
    /// Print the node's reply as JSON (errors as {"error":...})
    #[arg(long, global = true)]
    pub json: bool,
    /// Cluster state directory (default target/cluster, or
    /// $HVMIGRATE_CLUSTER_DIR)
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<String>,
    #[command(subcommand)]
    pub command: Option<HvCommand>,
}

const AFTER_HELP: &str = "\
The node's address and the cluster key come from the cluster state written by
`qemu-runner cluster up` (default state directory: target/cluster, or
$HVMIGRATE_CLUSTER_DIR). Exit status: 0 success, 1 the node answered with an
error or could not be reached, 2 usage error.";

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum HvCommand {
    /// The node itself
    #[command(subcommand)]
    Node(NodeCmd),
    /// The node's virtual machines
    #[command(subcommand)]
    Vm(VmCmd),
    /// Long-running operations (migrations, benchmarks) and their progress
    #[command(subcommand)]
    Job(JobCmd),
    /// Host-wide settings
    #[command(subcommand)]
    Host(HostCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions {
        /// The shell to complete for
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum NodeCmd {
    /// Name, CPU vendor, CPUs, memory, version, addresses
    Info,
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum VmCmd {
    /// The node's VMs
    List,
    /// Create a VM (stopped)
    Create {
        /// The VM's name
        name: String,
        /// Guest memory: MiB, or with a unit (64M, 1G)
        #[arg(long, value_name = "SIZE", value_parser = parse_size_mib)]
        memory: u64,
        /// The guest test kernel's case to run (default: the heartbeat guest)
        #[arg(long, value_name = "CASE")]
        guest: Option<String>,
    },
    /// Start a VM
    Start {
        /// The VM's name
        name: String,
    },
    /// Stop a VM
    Stop {
        /// The VM's name
        name: String,
    },
    /// Delete a stopped VM
    Delete {
        /// The VM's name
        name: String,
    },
    /// The VM's last console lines
    Console {
        /// The VM's name
        name: String,
        /// How many lines (default: all the node keeps)
        #[arg(long, value_name = "N")]
        lines: Option<u64>,
    },
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum JobCmd {
    /// Jobs with a progress bar each
    List {
        /// Redraw them until none is queued or running
        #[arg(long)]
        watch: bool,
    },
    /// A live progress bar until the job ends (exit 0 only if it completed)
    Watch {
        /// The job's id
        id: u64,
    },
    /// Cancel a job (the VM stays where it was)
    Cancel {
        /// The job's id
        id: u64,
    },
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum HostCmd {
    /// The host's limits
    Get,
    /// Change the host's limits
    #[command(group(clap::ArgGroup::new("limits").required(true).multiple(true)))]
    Set {
        /// Live migrations at once
        #[arg(long, value_name = "N", group = "limits")]
        max_migrations: Option<u32>,
        /// Storage migrations at once
        #[arg(long, value_name = "N", group = "limits")]
        max_storage_migrations: Option<u32>,
    },
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
    /// `completions SHELL`.
    Completions(clap_complete::Shell),
}

impl Cli {
    /// The action this command line asks for.
    pub fn action(&self) -> Action {
        let Some(cmd) = &self.command else {
            return Action::Help;
        };
        Action::Request(match cmd {
            HvCommand::Completions { shell } => return Action::Completions(*shell),
            HvCommand::Node(NodeCmd::Info) => Request::NodeInfo,
            HvCommand::Vm(vm) => match vm {
                VmCmd::List => Request::VmList,
                VmCmd::Create {
                    name,
                    memory,
                    guest,
                } => Request::VmCreate {
                    name: name.clone(),
                    memory_mib: *memory,
                    guest: guest.clone(),
                },
                VmCmd::Start { name } => Request::VmStart { name: name.clone() },
                VmCmd::Stop { name } => Request::VmStop { name: name.clone() },
                VmCmd::Delete { name } => Request::VmDelete { name: name.clone() },
                VmCmd::Console { name, lines } => Request::VmConsole {
                    name: name.clone(),
                    lines: lines.map(|n| n.min(u64::from(u32::MAX)) as u32),
                },
            },
            HvCommand::Job(JobCmd::List { watch: true }) => return Action::WatchAll,
            HvCommand::Job(JobCmd::List { watch: false }) => Request::JobList,
            HvCommand::Job(JobCmd::Watch { id }) => return Action::Watch(*id),
            HvCommand::Job(JobCmd::Cancel { id }) => Request::JobCancel { id: *id },
            HvCommand::Host(HostCmd::Get) => Request::HostGet,
            HvCommand::Host(HostCmd::Set {
                max_migrations,
                max_storage_migrations,
            }) => Request::HostSet {
                max_live_migrations: *max_migrations,
                max_storage_migrations: *max_storage_migrations,
            },
        })
    }
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

/// Parse hvctl's arguments (after the program name).
pub fn parse<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Cli::try_parse_from(std::iter::once("hvctl".into()).chain(args.into_iter().map(Into::into)))
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

/// Whether live bars are drawn: on a terminal, never with `--json`.
fn live_bars(json: bool) -> bool {
    use std::io::IsTerminal;
    !json && std::io::stdout().is_terminal()
}

/// A job's live bar (indicatif): the job's fields before and after it.
fn job_bar(multi: Option<&MultiProgress>) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::stdout());
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:20}] {pos:>3}%  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("#>."),
    );
    match multi {
        Some(m) => m.add(bar),
        None => bar,
    }
}

/// Set `bar` to `job`.
fn draw_job(bar: &ProgressBar, j: &JobInfo) {
    bar.set_prefix(format!(
        "{:>4}  {:<17} {:<12} {:<9}",
        j.id,
        kind_word(j),
        if j.vm.is_empty() { "-" } else { &j.vm },
        state_word(j.state)
    ));
    bar.set_position(u64::from(j.percent.min(100)));
    bar.set_message(format!(
        "{} / {}  {:.1} s{}",
        mib(j.bytes_done),
        mib(j.bytes_total),
        j.elapsed_ms as f64 / 1000.0,
        if j.cancellable { "  (cancellable)" } else { "" },
    ));
}

/// Watch job `id` until it ends: a live indicatif bar on a terminal, a
/// line per change otherwise, the final job as JSON with `--json`.
pub fn watch(client: &mut Client, id: u64, json: bool) -> Result<u8, String> {
    let bar = live_bars(json).then(|| job_bar(None));
    let mut last = String::new();
    let start = Instant::now();
    loop {
        let job = match client.call(Request::JobList)? {
            Outcome::Ok(Body::JobList { jobs }) => jobs.into_iter().find(|j| j.id == id),
            Outcome::Ok(_) => None,
            Outcome::Error(e) => return Ok(print_error(json, &e)),
        };
        let Some(job) = job else {
            if let Some(b) = &bar {
                b.abandon();
            }
            return Err(format!("no job {id} on node {}", client.node));
        };
        let line = job_line(&job);
        let first = line.lines().next().unwrap_or("").to_string();
        match &bar {
            Some(b) => draw_job(b, &job),
            None if !json && first != last => println!("{first}"),
            None => {}
        }
        last = first;
        if job.state.is_final() {
            if let Some(b) = &bar {
                b.finish();
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

/// Show every job until none is queued or running: a live indicatif bar
/// per job on a terminal, the whole table per change otherwise, the final
/// list as JSON with `--json`.
pub fn watch_all(client: &mut Client, json: bool) -> Result<u8, String> {
    let multi =
        live_bars(json).then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout()));
    let mut bars: Vec<(u64, ProgressBar)> = Vec::new();
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
        } else if let Some(m) = &multi {
            if jobs.is_empty() && bars.is_empty() {
                println!("no jobs");
            }
            for j in &jobs {
                let bar = match bars.iter().find(|(id, _)| *id == j.id) {
                    Some((_, b)) => b.clone(),
                    None => {
                        let b = job_bar(Some(m));
                        bars.push((j.id, b.clone()));
                        b
                    }
                };
                draw_job(&bar, j);
                if j.state.is_final() && !bar.is_finished() {
                    bar.finish();
                }
            }
            if !live {
                for j in &jobs {
                    for extra in job_line(j).lines().skip(1) {
                        println!("{extra}");
                    }
                }
                return Ok(0);
            }
        } else {
            let text = render(&Body::JobList { jobs });
            if text != last {
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

/// The hvctl binary: parse `std::env::args` and run; the exit status.
pub fn main() -> u8 {
    match Cli::try_parse() {
        Ok(cli) => run_cli(&cli),
        Err(e) => usage_exit(&e),
    }
}

/// Print a clap outcome (help, version or a usage error) and give its exit
/// status: 0 for help and version, 2 for usage errors.
pub fn usage_exit(e: &clap::Error) -> u8 {
    let _ = e.print();
    u8::try_from(e.exit_code()).unwrap_or(2)
}

/// Run a parsed hvctl command line; returns the exit status.
pub fn run_cli(cli: &Cli) -> u8 {
    match cli.action() {
        Action::Help => {
            let _ = Cli::command().print_help();
            return 0;
        }
        Action::Completions(shell) => {
            clap_complete::generate(shell, &mut Cli::command(), "hvctl", &mut std::io::stdout());
            return 0;
        }
        _ => {}
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if cli.json {
                let err = ApiError::new(hvmgmt::proto::ErrorCode::Unsupported, e);
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

fn run(cli: &Cli) -> Result<u8, String> {
    let (addr, key) = crate::cluster::resolve_target(
        cli.state_dir.as_deref(),
        cli.node.as_deref(),
        cli.addr.as_deref(),
        cli.key.as_deref(),
    )?;
    let key = ClusterKey::from_hex(&key).map_err(|e| e.to_string())?;
    let mut client = Client::connect(&addr, &key)?;
    match cli.action() {
        Action::Help | Action::Completions(_) => Ok(0),
        Action::Watch(id) => watch(&mut client, id, cli.json),
        Action::WatchAll => watch_all(&mut client, cli.json),
        Action::Request(req) => {
            let outcome = client.call(req)?;
            match &outcome {
                Outcome::Ok(body) => {
                    if cli.json {
                        println!("{}", render_json(&outcome));
                    } else {
                        println!("{}", render(body));
                    }
                    Ok(0)
                }
                Outcome::Error(e) => Ok(print_error(cli.json, e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Cli, String> {
        parse(s.split_whitespace()).map_err(|e| e.to_string())
    }

    fn usage_error(s: &str) -> String {
        let e = parse(s.split_whitespace()).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{s}: {e}");
        e.to_string()
    }

    #[test]
    fn commands_parse() {
        let i = p("--node b --json vm create web --memory 64M --guest hello").unwrap();
        assert_eq!((i.node.as_deref(), i.json), (Some("b"), true));
        assert_eq!(
            i.action(),
            Action::Request(Request::VmCreate {
                name: "web".into(),
                memory_mib: 64,
                guest: Some("hello".into())
            })
        );
        assert_eq!(
            p("vm create x --memory=1G").unwrap().action(),
            Action::Request(Request::VmCreate {
                name: "x".into(),
                memory_mib: 1024,
                guest: None
            })
        );
        // The connection options may also follow the command.
        let i = p("vm list --json --node c --state-dir /s").unwrap();
        assert_eq!(
            (i.node.as_deref(), i.json, i.state_dir.as_deref()),
            (Some("c"), true, Some("/s"))
        );
        assert_eq!(p("job watch 7").unwrap().action(), Action::Watch(7));
        assert_eq!(p("job list --watch").unwrap().action(), Action::WatchAll);
        assert_eq!(
            p("job list").unwrap().action(),
            Action::Request(Request::JobList)
        );
        assert_eq!(
            p("vm console web --lines 5").unwrap().action(),
            Action::Request(Request::VmConsole {
                name: "web".into(),
                lines: Some(5)
            })
        );
        assert_eq!(
            p("host set --max-migrations 3").unwrap().action(),
            Action::Request(Request::HostSet {
                max_live_migrations: Some(3),
                max_storage_migrations: None
            })
        );
        assert_eq!(
            p("completions zsh").unwrap().action(),
            Action::Completions(clap_complete::Shell::Zsh)
        );
        for (args, err) in [
            ("vm create x", "--memory <SIZE>"),
            ("vm start", "<NAME>"),
            ("job cancel x", "invalid value 'x'"),
            ("vm list --memory 3", "unexpected argument '--memory'"),
            ("vm list --watch", "unexpected argument '--watch'"),
            ("host set", "--max-migrations"),
            ("host set --max-migrations 99999999999", "invalid value"),
            ("fly away", "unrecognized subcommand 'fly'"),
            ("--bogus", "unexpected argument '--bogus'"),
            ("vm create x --memory 3T", "unit"),
        ] {
            let e = usage_error(args);
            assert!(e.contains(err), "{args}: {e}");
        }
        assert_eq!(p("").unwrap().action(), Action::Help);
    }

    #[test]
    fn help_for_every_command() {
        for line in [
            "--help",
            "help",
            "help vm create",
            "vm create --help",
            "help job watch",
        ] {
            let e = parse(line.split_whitespace()).unwrap_err();
            assert_eq!(e.exit_code(), 0, "{line}");
            let text = e.to_string();
            assert!(text.contains("Usage: hvctl"), "{line}: {text}");
        }
        let create = parse(["help", "vm", "create"]).unwrap_err().to_string();
        for word in [
            "Usage: hvctl vm create [OPTIONS] --memory <SIZE> <NAME>",
            "--guest <CASE>",
            "64M, 1G",
            "--node <NAME>",
            "--json",
        ] {
            assert!(create.contains(word), "{word} missing in:\n{create}");
        }
        // Every subcommand has a description and every option a help line.
        fn walk(cmd: &mut clap::Command, path: &str) -> usize {
            let help = cmd.render_long_help().to_string();
            assert!(help.contains("Usage:"), "{path}");
            assert!(
                cmd.get_about().is_some() || path == "hvctl",
                "{path} has no description"
            );
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" {
                    assert!(arg.get_help().is_some(), "{path}: {id} has no help");
                }
            }
            let names: Vec<String> = cmd
                .get_subcommands()
                .map(|s| s.get_name().to_string())
                .collect();
            1 + names
                .iter()
                .map(|n| walk(cmd.find_subcommand_mut(n).unwrap(), &format!("{path} {n}")))
                .sum::<usize>()
        }
        let mut cmd = Cli::command();
        cmd.build();
        assert!(walk(&mut cmd, "hvctl") >= 20);
    }

    #[test]
    fn completions_name_the_commands() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "hvctl", &mut out);
            let text = String::from_utf8(out).unwrap();
            for word in ["vm", "create", "memory", "max-storage-migrations"] {
                assert!(text.contains(word), "{shell}: {word}");
            }
        }
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
            kind: hvmgmt::proto::JobKind::LiveMigration,
            vm: "web".into(),
            state: JobState::Running,
            percent: 50,
            bytes_done: 1 << 20,
            bytes_total: 2 << 20,
            elapsed_ms: 1500,
            error: None,
            cancellable: true,
            result: None,
            migration: None,
            report: None,
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
