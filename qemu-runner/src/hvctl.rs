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
//! of state, phase or pass (of percent: at most one a second) is printed
//! instead.
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
use hvmgmt::proto::{
    ApiError, Body, JobInfo, JobState, Keep, MigrationInfo, MigrationReport, NodeInfo, Outcome,
    Phase, Request, StoreInfo, VmInfo, VmMove, CONSOLE_LINES_MAX,
};
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
    /// The node's stores (host directories it keeps VM files in)
    #[command(subcommand)]
    Store(StoreCmd),
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
        #[arg(long, value_name = "CASE", conflicts_with = "linux")]
        guest: Option<String>,
        /// Boot Linux instead: the Debian kernel and initramfs the node was
        /// given at boot (`cluster up` passes them), to a shell on the
        /// console
        #[arg(long)]
        linux: bool,
        /// Extra Linux kernel arguments (`hvmigrate.ticks=1`: the guest
        /// prints a counter and its clock every second)
        #[arg(
            long,
            value_name = "ARGS",
            requires = "linux",
            allow_hyphen_values = true
        )]
        append: Option<String>,
        /// Give it a new virtual disk (a VHDX) of this size: MiB, or with a
        /// unit (256M, 1G)
        #[arg(long, value_name = "SIZE", value_parser = parse_size_mib)]
        disk: Option<u64>,
        /// The store the disk's file goes to (default: the node's own)
        #[arg(long, value_name = "NAME", requires = "disk")]
        store: Option<String>,
        /// Allocate the whole disk now (a fixed VHDX) instead of as written
        #[arg(long, requires = "disk")]
        fixed: bool,
    },
    /// A VM's virtual disks
    #[command(subcommand)]
    Disk(DiskCmd),
    /// Move a VM's files (disks, configuration file, snapshot location) to
    /// another store or directory while it runs (storage live migration,
    /// a job: every guest write is mirrored to both copies, one pass
    /// copies the rest, then the VM switches to the new files and the old
    /// ones are deleted); items not named stay
    #[command(name = "move-storage")]
    MoveStorage {
        /// The VM's name
        name: String,
        /// Where everything goes (every disk, keeping its file name, the
        /// configuration file and the snapshot location): STORE or
        /// STORE:DIR (STORE alone: STORE:vms/NAME)
        #[arg(
            long,
            value_name = "STORE[:DIR]",
            required_unless_present_any = ["vhd", "config", "snapshots"]
        )]
        to: Option<String>,
        /// One disk to its own place: SOURCE=STORE:PATH, SOURCE being the
        /// disk's location (`vm disk list`) or its slot number; repeatable
        #[arg(long, value_name = "SRC=DST")]
        vhd: Vec<String>,
        /// Where the VM's configuration file goes: STORE or STORE:DIR
        /// (overrides --to for it)
        #[arg(long, value_name = "STORE[:DIR]")]
        config: Option<String>,
        /// Where the VM's checkpoint files go (its snapshot location):
        /// STORE or STORE:DIR (overrides --to for it)
        #[arg(long, value_name = "STORE[:DIR]")]
        snapshots: Option<String>,
        /// Keep the source files after the switch
        #[arg(long)]
        keep_source: bool,
        /// Rate limit of the copy in MiB/s (node default: none; guest
        /// writes are mirrored whatever the limit)
        #[arg(long, value_name = "MIB/S", value_parser = clap::value_parser!(u64).range(1..=100_000))]
        bandwidth: Option<u64>,
        /// Follow the job until it ends; exit 0 only if it completed
        #[arg(long)]
        wait: bool,
    },
    /// Register on this node the VM a configuration file on a store
    /// describes, in place (like Hyper-V's Import-VM -Register): it is
    /// listed `created` (off), its disks where the file names them
    Import {
        /// The configuration file: STORE:PATH (e.g. shared:vms/d/d.vmcfg)
        #[arg(value_name = "STORE:PATH")]
        path: String,
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
    /// Run a paused VM on: for `store full`, retry its disk's waiting
    /// write now (refused while the store is still full)
    Resume {
        /// The VM's name
        name: String,
    },
    /// Delete a stopped VM
    Delete {
        /// The VM's name
        name: String,
    },
    /// Live-migrate a running VM to another node while it runs (a job: its
    /// id is printed; --wait follows it)
    Move {
        /// The VM's name
        name: String,
        /// The destination node: one of this node's peers (`node info`), or
        /// `auto`: the peer with the most free memory that can run the VM
        /// (same CPU vendor, room for its RAM, and the shared store if its
        /// disks are there)
        #[arg(long, value_name = "NODE|auto")]
        to: String,
        /// Longest acceptable pause of the guest at the switch-over, in ms
        /// (node default 300)
        #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=60_000))]
        downtime_ms: Option<u64>,
        /// Rate limit of the migration stream in MiB/s (node default: none)
        #[arg(long, value_name = "MIB/S", value_parser = clap::value_parser!(u64).range(1..=100_000))]
        bandwidth: Option<u64>,
        /// Give up (the VM runs on here) if it has not switched over after S
        /// seconds (node default 600)
        #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(1..=86_400))]
        timeout: Option<u64>,
        /// Encrypt the stream (ChaCha20-Poly1305); it is always
        /// authenticated
        #[arg(long)]
        encrypt: bool,
        /// Skip verification mode (both nodes hashing the whole memory at the
        /// switch-over; on by default)
        #[arg(long)]
        no_verify: bool,
        /// Follow the job with a live progress bar until it ends; exit 0 only
        /// if the VM then runs on the destination
        #[arg(long)]
        wait: bool,
        /// Quick storage migration: the VM's disks (on this node's store)
        /// are copied to the destination's store through a checkpoint while
        /// the VM runs, then the VM is saved, the checkpoint's data and its
        /// memory follow, and it resumes there (downtime grows with what
        /// the guest writes during the copy)
        #[arg(long, group = "disk_mode", conflicts_with = "include_storage")]
        quick: bool,
        /// Test knob: the destination waits MS before accepting
        #[arg(long, hide = true, value_name = "MS", value_parser = clap::value_parser!(u64).range(0..=60_000))]
        debug_hold_accept_ms: Option<u64>,
        /// Test knob: the destination waits MS before `ready`
        #[arg(long, hide = true, value_name = "MS", value_parser = clap::value_parser!(u64).range(0..=60_000))]
        debug_hold_ready_ms: Option<u64>,
        /// Test knob: the destination waits MS after resuming before `resumed`
        #[arg(long, hide = true, value_name = "MS", value_parser = clap::value_parser!(u64).range(0..=60_000))]
        debug_hold_resumed_ms: Option<u64>,
        /// Shared-nothing: mirror the VM's disks to the destination's store
        /// while it runs, then move memory and state; its files here are
        /// deleted once it runs there
        #[arg(long, group = "disk_mode")]
        include_storage: bool,
        /// With --include-storage or --quick: where the disks go on the
        /// destination, STORE[:DIR] (default: its default store,
        /// STORE:vms/NAME/)
        #[arg(long, value_name = "STORE[:DIR]", requires = "disk_mode")]
        store: Option<String>,
    },
    /// The VM's last console lines; with --send, type into its console
    /// and print what the guest prints in answer
    Console {
        /// The VM's name
        name: String,
        /// How many lines (default: all the node keeps)
        #[arg(long, value_name = "N", conflicts_with = "send")]
        lines: Option<u64>,
        /// Type TEXT and Enter into the console (at most 1024 bytes
        /// waiting per VM), then print the lines the guest prints until it
        /// is quiet for half a second
        #[arg(long, value_name = "TEXT")]
        send: Option<String>,
        /// With --send: no Enter after TEXT
        #[arg(long, requires = "send")]
        no_newline: bool,
        /// With --send: wait at most MS for the answer (default 5000)
        #[arg(long, value_name = "MS", requires = "send", value_parser = clap::value_parser!(u64).range(0..=600_000))]
        wait_ms: Option<u64>,
    },
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum DiskCmd {
    /// Each disk: slot, file location, kind, size, file size
    List {
        /// The VM's name
        name: String,
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
    /// A live progress bar until the job ends (exit 0 only if it completed):
    /// percent, pass, MiB sent and remaining, dirty rate, ETA
    Watch {
        /// The job's id
        id: u64,
    },
    /// One job, with a migration's report once it ended
    Show {
        /// The job's id
        id: u64,
    },
    /// Cancel a job (a migration cancelled before its switch-over leaves the
    /// VM running where it was)
    Cancel {
        /// The job's id
        id: u64,
    },
    /// Decide a migration left in doubt (the link failed after the
    /// switch-over and the destination restarted): which copy is the VM
    Resolve {
        /// The job's id (on the source node)
        id: u64,
        /// source: the VM does not run on the destination, resume it here;
        /// destination: it runs there, delete the paused copy here
        #[arg(long, value_enum)]
        keep: KeepArg,
    },
}

/// `job resolve --keep`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepArg {
    Source,
    Destination,
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

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum StoreCmd {
    /// Name, mount tag, free, used and total bytes, host directory
    List,
    /// Time plain 9P writes, reads and a copy on a store, and write a VHDX
    /// there (a job; the node prints its figures)
    Bench {
        /// The store (default local)
        #[arg(long, value_name = "NAME", default_value = "local")]
        store: String,
        /// How much data, in MiB (1 to 1024)
        #[arg(long, value_name = "N", default_value_t = 64)]
        mib: u64,
        /// Keep the files (bench-NODE.raw, .copy, .vhdx) for inspection
        #[arg(long)]
        keep: bool,
        /// Wait for the job and exit 0 only if it completed
        #[arg(long)]
        wait: bool,
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
    /// `vm move ... --wait`: send the request, then follow the job.
    MoveAndWait(Request),
    /// `vm create ... --disk SIZE`: create the VM, then its disk (the VM
    /// is deleted again if the disk cannot be made).
    CreateWithDisk(Request, Request),
    /// A request that starts a job, then follow the job (`--wait`: `vm
    /// move-storage`, `store bench`).
    RequestAndWatch(Request),
    /// `vm console NAME --send TEXT`: type `text` (Enter included unless
    /// `--no-newline`), then print the guest's new lines.
    ConsoleSend {
        name: String,
        text: String,
        wait_ms: u64,
    },
}

/// `vm console --send`: longest wait for the guest's answer.
pub const CONSOLE_WAIT_MS_DEFAULT: u64 = 5000;
/// `vm console --send`: the answer is complete once no new line came for
/// this long.
const CONSOLE_QUIET_MS: u64 = 500;

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
                    linux,
                    append,
                    disk,
                    store,
                    fixed,
                } => {
                    let create = Request::VmCreate {
                        name: name.clone(),
                        memory_mib: *memory,
                        guest: guest.clone(),
                        linux: linux.then(|| hvmgmt::proto::LinuxBoot {
                            append: append.clone().unwrap_or_default(),
                        }),
                    };
                    let Some(size_mib) = disk else {
                        return Action::Request(create);
                    };
                    return Action::CreateWithDisk(
                        create,
                        Request::VmDiskCreate {
                            name: name.clone(),
                            size_mib: *size_mib,
                            store: store.clone(),
                            fixed: fixed.then_some(true),
                        },
                    );
                }
                VmCmd::Disk(DiskCmd::List { name }) => Request::VmDiskList { name: name.clone() },
                VmCmd::MoveStorage {
                    name,
                    to,
                    vhd,
                    config,
                    snapshots,
                    keep_source,
                    bandwidth,
                    wait,
                } => {
                    let request = Request::VmMoveStorage {
                        name: name.clone(),
                        to: to.clone(),
                        vhd: vhd.clone(),
                        config: config.clone(),
                        snapshots: snapshots.clone(),
                        keep_source: keep_source.then_some(true),
                        bandwidth_mib_s: *bandwidth,
                    };
                    if *wait {
                        return Action::RequestAndWatch(request);
                    }
                    request
                }
                VmCmd::Import { path } => Request::VmImport { path: path.clone() },
                VmCmd::Start { name } => Request::VmStart { name: name.clone() },
                VmCmd::Stop { name } => Request::VmStop { name: name.clone() },
                VmCmd::Resume { name } => Request::VmResume { name: name.clone() },
                VmCmd::Delete { name } => Request::VmDelete { name: name.clone() },
                VmCmd::Move {
                    name,
                    to,
                    downtime_ms,
                    bandwidth,
                    timeout,
                    encrypt,
                    no_verify,
                    wait,
                    quick,
                    debug_hold_accept_ms,
                    debug_hold_ready_ms,
                    debug_hold_resumed_ms,
                    include_storage,
                    store,
                } => {
                    let request = Request::VmMove(VmMove {
                        name: name.clone(),
                        to: to.clone(),
                        downtime_ms: *downtime_ms,
                        bandwidth_mib_s: *bandwidth,
                        timeout_s: *timeout,
                        encrypt: encrypt.then_some(true),
                        verify: no_verify.then_some(false),
                        debug_hold_accept_ms: *debug_hold_accept_ms,
                        debug_hold_ready_ms: *debug_hold_ready_ms,
                        debug_hold_resumed_ms: *debug_hold_resumed_ms,
                        include_storage: *include_storage,
                        store: store.clone(),
                        quick: *quick,
                    });
                    if *wait {
                        return Action::MoveAndWait(request);
                    }
                    request
                }
                VmCmd::Console {
                    name,
                    send: Some(text),
                    no_newline,
                    wait_ms,
                    ..
                } => {
                    let mut text = text.clone();
                    if !no_newline {
                        text.push('\n');
                    }
                    return Action::ConsoleSend {
                        name: name.clone(),
                        text,
                        wait_ms: wait_ms.unwrap_or(CONSOLE_WAIT_MS_DEFAULT),
                    };
                }
                VmCmd::Console { name, lines, .. } => Request::VmConsole {
                    name: name.clone(),
                    lines: lines.map(|n| n.min(u64::from(u32::MAX)) as u32),
                },
            },
            HvCommand::Job(JobCmd::List { watch: true }) => return Action::WatchAll,
            HvCommand::Job(JobCmd::List { watch: false }) => Request::JobList,
            HvCommand::Job(JobCmd::Watch { id }) => return Action::Watch(*id),
            HvCommand::Job(JobCmd::Show { id }) => Request::JobShow { id: *id },
            HvCommand::Job(JobCmd::Cancel { id }) => Request::JobCancel { id: *id },
            HvCommand::Job(JobCmd::Resolve { id, keep }) => Request::JobResolve {
                id: *id,
                keep: match keep {
                    KeepArg::Source => Keep::Source,
                    KeepArg::Destination => Keep::Destination,
                },
            },
            HvCommand::Store(StoreCmd::List) => Request::StoreList,
            HvCommand::Store(StoreCmd::Bench {
                store,
                mib,
                keep,
                wait,
            }) => {
                let req = Request::StoreBench {
                    store: store.clone(),
                    mib: *mib,
                    keep: *keep,
                };
                if *wait {
                    return Action::RequestAndWatch(req);
                }
                req
            }
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

/// One line per job (more for a migration: where it stands, an error, a
/// result).
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
    if let Some(m) = &j.migration {
        line.push_str(&format!(
            "\n      {} {}: {}",
            match m.direction {
                hvmgmt::proto::Direction::Outgoing => "to",
                hvmgmt::proto::Direction::Incoming => "from",
            },
            m.peer,
            migration_progress(m)
        ));
    }
    if let Some(e) = &j.error {
        line.push_str(&format!("\n      error: {e}"));
    }
    if let Some(r) = &j.result {
        line.push_str(&format!("\n      result: {r}"));
    }
    line
}

/// A migration phase's word (`final-copy`).
pub fn phase_word(p: Phase) -> String {
    serde_json::to_string(&p)
        .unwrap_or_default()
        .trim_matches('"')
        .to_string()
}

/// A rate in MiB/s.
fn rate(bytes_per_s: u64) -> String {
    format!("{:.1} MiB/s", bytes_per_s as f64 / (1024.0 * 1024.0))
}

/// Milliseconds as a person reads them: `850 ms`, `4.2 s`, `3 min 20 s`.
pub fn duration_words(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

/// Where a migration stands, in one line: phase, pass, MiB sent and
/// remaining, the dirty rate, the link's rate, the ETA and any throttle.
pub fn migration_progress(m: &MigrationInfo) -> String {
    if m.storage_bytes_total > 0 && m.bytes_sent == 0 && m.phase == Phase::Copying {
        // Shared-nothing (or quick), the disk copy first.
        let mut s = format!(
            "copying disks: {} of {} copied",
            mib(m.storage_bytes_copied),
            mib(m.storage_bytes_total)
        );
        if m.checkpoint_bytes > 0 {
            // A quick move: what the guest wrote meanwhile, to go in the
            // downtime.
            s.push_str(&format!(", checkpoint {}", mib(m.checkpoint_bytes)));
        }
        return s;
    }
    let mut s = format!(
        "{}, pass {}: {} sent, {} left, dirty {}, link {}, ETA {}",
        phase_word(m.phase),
        m.pass,
        mib(m.bytes_sent),
        mib(m.bytes_remaining),
        rate(m.dirty_rate_bytes_per_s),
        rate(m.bandwidth_bytes_per_s),
        m.eta_ms.map_or_else(|| "?".to_string(), duration_words),
    );
    if m.throttle_pct > 0 {
        s.push_str(&format!(", guest throttled {}%", m.throttle_pct));
    }
    if m.storage_bytes_total > 0 {
        s.push_str(&format!(", disks {} copied", mib(m.storage_bytes_total)));
    }
    s
}

/// A migration report for a person (`job show`, the end of `vm move
/// --wait`, the demo).
pub fn report_text(r: &MigrationReport) -> String {
    let mut out = Vec::new();
    let checks = match (r.verified, r.dirty_tracker.as_deref()) {
        (true, Some(t)) => format!(" (memory verified; dirty pages tracked by {t})"),
        (true, None) => " (memory verified)".to_string(),
        (false, Some(t)) => format!(" (memory not verified; dirty pages tracked by {t})"),
        (false, None) => String::new(),
    };
    out.push(format!("  result        {}{checks}", r.result));
    if let Some(e) = &r.error {
        out.push(format!("  error         {e}"));
    }
    if r.passes > 0 {
        let pages: Vec<String> = r.pages_per_pass.iter().map(u64::to_string).collect();
        out.push(format!(
            "  passes        {} ({} pages)",
            r.passes,
            pages.join(", ")
        ));
    }
    out.push(format!(
        "  sent          {} for {} of guest RAM{}",
        mib(r.bytes_sent),
        mib(r.ram_bytes),
        if r.zero_pages > 0 {
            format!(" ({} zero pages sent as markers)", r.zero_pages)
        } else {
            String::new()
        }
    ));
    if r.total_ms > 0 {
        out.push(format!("  total time    {}", duration_words(r.total_ms)));
    }
    if r.downtime_ms > 0 || r.expected_downtime_ms > 0 {
        out.push(format!(
            "  downtime      {} (expected {})",
            duration_words(r.downtime_ms),
            duration_words(r.expected_downtime_ms)
        ));
    }
    if r.downtime_ms > 0 {
        out.push(format!(
            "  pause (ms)    {}",
            crate::bench_migrate::pause_text(&r.pause_us)
        ));
    }
    if r.throttle_pct > 0 {
        out.push(format!("  throttle      {}%", r.throttle_pct));
    }
    out.join("\n")
}

fn vm_line(v: &VmInfo) -> String {
    let mut line = format!(
        "{:<20} {:<8} {:>6} MiB  guest {:<16} exits {:<10} console lines {}",
        v.name, v.state, v.memory_mib, v.guest, v.exits, v.console_lines
    );
    if let Some(r) = &v.stop_reason {
        line.push_str(&format!("  ({r})"));
    }
    if let Some(r) = &v.pause_reason {
        line.push_str(&format!("  ({r})"));
    }
    line
}

fn node_text(n: &NodeInfo) -> String {
    format!(
        "node {}\n  cpu vendor   {}\n  cpus         {}\n  memory       {} total, {} free\n  version      {} (protocol {})\n  management   {}\n  migration    {}\n  peers        {}",
        n.name,
        n.cpu_vendor,
        n.cpus,
        mib(n.memory_total_bytes),
        mib(n.memory_free_bytes),
        n.version,
        n.protocol_version,
        n.mgmt_addr,
        n.migration_addr,
        if n.peers.is_empty() {
            "none (VMs can move only within this node)".to_string()
        } else {
            n.peers.join(", ")
        }
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
        Body::Job(j) => match &j.report {
            Some(r) => format!("{}\n{}", job_line(j), report_text(r)),
            None => job_line(j),
        },
        Body::Host(h) => format!(
            "max live migrations     {}\nmax storage migrations  {}",
            h.max_live_migrations, h.max_storage_migrations
        ),
        Body::Disks {
            vm,
            disks,
            config,
            snapshots,
        } => {
            let mut lines: Vec<String> = disks
                .iter()
                .map(|d| {
                    format!(
                        "disk {}  {:<40} {:<8} {:>6} MiB  file {}",
                        d.slot,
                        d.location,
                        d.kind,
                        d.virtual_bytes >> 20,
                        mib(d.file_bytes)
                    )
                })
                .collect();
            if lines.is_empty() {
                lines.push(format!("VM {vm} has no disks"));
            }
            if let Some(c) = config {
                lines.push(format!("config     {c}"));
            }
            if let Some(s) = snapshots {
                lines.push(format!("snapshots  {s}"));
            }
            lines.join("\n")
        }
        Body::StoreList { stores } if stores.is_empty() => "no stores".into(),
        Body::StoreList { stores } => store_table(stores),
        Body::Done => "done".into(),
    }
}

fn size(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else {
        mib(bytes)
    }
}

/// `store list`: a table, one store per line.
fn store_table(stores: &[StoreInfo]) -> String {
    let mut out = format!(
        "{:<12} {:<12} {:>11} {:>11} {:>11}  {}",
        "NAME", "TAG", "FREE", "USED", "TOTAL", "HOST PATH"
    );
    for st in stores {
        out.push('\n');
        let path = if st.host_path.is_empty() {
            "-"
        } else {
            &st.host_path
        };
        match &st.error {
            None => out.push_str(&format!(
                "{:<12} {:<12} {:>11} {:>11} {:>11}  {}",
                st.name,
                st.tag,
                size(st.free_bytes),
                size(st.used_bytes),
                size(st.total_bytes),
                path
            )),
            Some(e) => out.push_str(&format!(
                "{:<12} {:<12} unusable: {e}  {}",
                st.name, st.tag, path
            )),
        }
    }
    out
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
    bar.set_message(match &j.migration {
        Some(m) => format!(
            "{}  {:.1} s",
            migration_progress(m),
            j.elapsed_ms as f64 / 1000.0
        ),
        None => format!(
            "{} / {}  {:.1} s{}",
            mib(j.bytes_done),
            mib(j.bytes_total),
            j.elapsed_ms as f64 / 1000.0,
            if j.cancellable { "  (cancellable)" } else { "" },
        ),
    });
}

/// The one line `job watch` prints per change into a pipe.
pub fn progress_line(j: &JobInfo) -> String {
    let first = job_line(j).lines().next().unwrap_or_default().to_string();
    match &j.migration {
        Some(m) => format!("{first}  {}", migration_progress(m)),
        None => first,
    }
}

/// Whether a migration waits for the operator: in doubt, and the
/// destination can no longer tell whether it ran the VM (the job's error
/// then says to `job resolve` it; docs/MANAGEMENT.md, "Live migration").
pub fn awaits_operator(j: &JobInfo) -> bool {
    j.migration
        .as_ref()
        .is_some_and(|m| m.phase == Phase::InDoubt)
        && j.error
            .as_deref()
            .is_some_and(|e| e.contains("job-resolve") || e.contains("job resolve"))
}

/// Exit status for a followed job: 0 completed, 3 in doubt (the operator
/// must resolve it), 1 otherwise (failed, cancelled).
pub fn job_exit_status(j: &JobInfo) -> u8 {
    if j.state == JobState::Completed {
        0
    } else if awaits_operator(j) {
        3
    } else {
        1
    }
}

/// When `job watch` into a pipe prints a progress line: at every change
/// of state, phase or pass, and at most once a second for a change of
/// percent alone (a migration's percent moves four times a second).
#[derive(Default)]
pub struct LineThrottle {
    last: Option<(Step, u8, Instant)>,
}

/// A job's step: its state and a migration's phase and pass.
type Step = (JobState, Option<(Phase, u32)>);

/// Least time between two lines for a change of percent alone.
const PERCENT_LINE_EVERY: Duration = Duration::from_secs(1);

impl LineThrottle {
    /// Whether `j`, shown at `now`, gets a line (it is then the last).
    pub fn due(&mut self, j: &JobInfo, now: Instant) -> bool {
        let step: Step = (j.state, j.migration.as_ref().map(|m| (m.phase, m.pass)));
        let due = match self.last {
            None => true,
            Some((last, percent, at)) => {
                last != step
                    || (percent != j.percent && now.duration_since(at) >= PERCENT_LINE_EVERY)
            }
        };
        if due {
            self.last = Some((step, j.percent, now));
        }
        due
    }
}

/// Follow job `id` (`job-show` four times a second) until it ends or waits
/// for the operator: a live indicatif bar on a terminal, a line per change
/// of state, phase or pass (and of percent, at most once a second) into a
/// pipe, nothing with `--json`.
/// Returns the job as last shown (with its report once ended).
pub fn follow(client: &mut Client, id: u64, json: bool) -> Result<JobInfo, String> {
    let bar = live_bars(json).then(|| job_bar(None));
    let mut lines = LineThrottle::default();
    let start = Instant::now();
    loop {
        let job = match client.call(Request::JobShow { id }) {
            Ok(Outcome::Ok(Body::Job(j))) => j,
            other => {
                if let Some(b) = &bar {
                    b.abandon();
                }
                return Err(match other {
                    Ok(Outcome::Error(e)) => e.to_string(),
                    Ok(Outcome::Ok(body)) => format!("unexpected reply to job-show: {body:?}"),
                    Err(e) => e,
                });
            }
        };
        match &bar {
            Some(b) => draw_job(b, &job),
            None if !json && lines.due(&job, Instant::now()) => {
                println!("{}", progress_line(&job));
                let _ = std::io::stdout().flush();
            }
            None => {}
        }
        if job.state.is_final() || awaits_operator(&job) {
            if let Some(b) = &bar {
                b.finish();
            }
            return Ok(job);
        }
        if start.elapsed() > Duration::from_secs(24 * 3600) {
            return Err("gave up following the job after a day".into());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// What a followed job ended with, after its progress: its extra lines
/// (migration, error, result) and its report; the job as JSON with
/// `--json`.
fn print_end(j: &JobInfo, json: bool) {
    if json {
        println!("{}", render_json(&Outcome::Ok(Body::Job(j.clone()))));
        return;
    }
    for extra in job_line(j).lines().skip(1) {
        println!("{extra}");
    }
    if let Some(r) = &j.report {
        println!("{}", report_text(r));
    }
}

/// Watch job `id` until it ends ([`follow`]), then print how it ended.
/// The exit status of [`job_exit_status`].
pub fn watch(client: &mut Client, id: u64, json: bool) -> Result<u8, String> {
    let job = follow(client, id, json)?;
    print_end(&job, json);
    if !json && awaits_operator(&job) {
        eprintln!(
            "hvctl: job {id} is in doubt: see its error above, then `hvctl --node {} job resolve {id} --keep source|destination`",
            client.node
        );
    }
    Ok(job_exit_status(&job))
}

/// `vm console NAME --send TEXT`: note how many lines the VM has printed,
/// type `text`, then follow its line count until it has been quiet for
/// [`CONSOLE_QUIET_MS`] after a new line (or `wait_ms` passed) and print
/// the new lines (those the node still keeps).
fn console_send(
    cli: &Cli,
    client: &mut Client,
    name: &str,
    text: String,
    wait_ms: u64,
) -> Result<u8, String> {
    let before = find_vm(client, name)?.map_or(0, |v| v.console_lines);
    let sent = client.call(Request::VmConsoleInput {
        name: name.into(),
        text,
    })?;
    if let Outcome::Error(e) = &sent {
        return Ok(print_error(cli.json, e));
    }
    let start = std::time::Instant::now();
    let (mut seen, mut changed) = (before, start);
    loop {
        let now = std::time::Instant::now();
        let quiet = now.duration_since(changed).as_millis() as u64;
        if (seen > before && quiet >= CONSOLE_QUIET_MS)
            || now.duration_since(start).as_millis() as u64 >= wait_ms
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let Some(vm) = find_vm(client, name)? else {
            return Err(format!("VM {name} is no longer on node {}", client.node));
        };
        if vm.console_lines != seen {
            (seen, changed) = (vm.console_lines, std::time::Instant::now());
        }
    }
    let new = seen
        .saturating_sub(before)
        .min(u64::from(CONSOLE_LINES_MAX));
    let lines = if new == 0 {
        Vec::new()
    } else {
        match client.call_ok(Request::VmConsole {
            name: name.into(),
            lines: Some(new as u32),
        })? {
            Body::Console { lines, .. } => lines,
            other => return Err(format!("unexpected reply to vm-console: {other:?}")),
        }
    };
    if cli.json {
        println!(
            "{}",
            serde_json::json!({"ok": {"vm": name, "lines": lines}})
        );
    } else if lines.is_empty() {
        eprintln!("hvctl: VM {name} printed no line within {wait_ms} ms");
    } else {
        println!("{}", lines.join("\n"));
    }
    Ok(0)
}

/// VM `name` as node `client` lists it.
fn find_vm(client: &mut Client, name: &str) -> Result<Option<VmInfo>, String> {
    match client.call_ok(Request::VmList)? {
        Body::VmList { vms } => Ok(vms.into_iter().find(|v| v.name == name)),
        other => Err(format!("unexpected reply to vm-list: {other:?}")),
    }
}

/// The destination `vm move --to auto` names.
const AUTO: &str = "auto";

/// One peer as placement sees it: its `node info`, or why it could not be
/// asked.
type Candidate = (String, Result<NodeInfo, String>);

/// Placement (`vm move NAME --to auto`), as a cluster picks a node: of the
/// source's peers, the one with the most free memory among those that can
/// run the VM (the source's CPU vendor, free memory for all of its RAM);
/// ties go to the first name. The error names every peer and why it was
/// passed over.
fn choose_node(vm_bytes: u64, vendor: &str, peers: &[Candidate]) -> Result<String, String> {
    let mut best: Option<(&str, u64)> = None;
    let mut passed = Vec::new();
    for (name, info) in peers {
        match info {
            Err(e) => passed.push(format!("{name}: {e}")),
            Ok(n) if n.cpu_vendor != vendor => passed.push(format!(
                "{name}: {} CPU, the VM runs on {vendor}",
                n.cpu_vendor
            )),
            Ok(n) if n.memory_free_bytes < vm_bytes => passed.push(format!(
                "{name}: {} MiB free, the VM needs {} MiB",
                n.memory_free_bytes >> 20,
                vm_bytes.div_ceil(1 << 20)
            )),
            Ok(n) => {
                if best.is_none_or(|(_, free)| n.memory_free_bytes > free) {
                    best = Some((name, n.memory_free_bytes));
                }
            }
        }
    }
    match best {
        Some((name, _)) => Ok(name.to_string()),
        None if peers.is_empty() => Err("no node to move to: this node has no peers".into()),
        None => Err(format!("no node can take the VM ({})", passed.join("; "))),
    }
}

/// A `vm-move` request with `--to auto` gets the node [`choose_node`]
/// picks among the source's peers (each asked for its `node info`); any
/// other request is returned as it is.
fn place_if_auto(cli: &Cli, source: &mut Client, mut request: Request) -> Result<Request, String> {
    let name = match &request {
        Request::VmMove(VmMove { name, to, .. }) if to == AUTO => name.clone(),
        _ => return Ok(request),
    };
    if cli.addr.is_some() {
        return Err(
            "--to auto asks every node of the cluster: use --node with the cluster's state, not --addr"
                .into(),
        );
    }
    let vm = find_vm(source, &name)?
        .ok_or_else(|| format!("node {} has no VM named {name}", source.node))?;
    let here = match source.call_ok(Request::NodeInfo)? {
        Body::NodeInfo(n) => n,
        other => return Err(format!("unexpected reply to node-info: {other:?}")),
    };
    // A VM with disks on the shared store moves without them: only nodes
    // that see that store can run it.
    let needs = shared_stores_of(source, &name)?;
    let peers: Vec<Candidate> = here
        .peers
        .iter()
        .map(|p| {
            let peer = p.split_once('@').map_or(p.as_str(), |(n, _)| n).to_string();
            let info = ask_node_info(cli, &peer).and_then(|info| {
                match needs.iter().find(|s| !sees_store(cli, &peer, s)) {
                    Some(s) => Err(format!("does not see store {s}, where the VM's disks are")),
                    None => Ok(info),
                }
            });
            (peer, info)
        })
        .collect();
    let chosen = choose_node(vm.memory_mib << 20, &here.cpu_vendor, &peers)
        .map_err(|e| format!("vm move {name} --to auto: {e}"))?;
    if !cli.json {
        let free = peers
            .iter()
            .find(|(n, _)| *n == chosen)
            .and_then(|(_, i)| i.as_ref().ok())
            .map_or(0, |i| i.memory_free_bytes >> 20);
        println!(
            "placement: node {chosen} ({free} MiB free, the most of the nodes that can run {name})"
        );
    }
    if let Request::VmMove(VmMove { to, .. }) = &mut request {
        *to = chosen;
    }
    Ok(request)
}

/// The store every node of a cluster sees (docs/DESIGN.md "Leases": a
/// VM with disks there moves without them).
const SHARED_STORE: &str = "shared";

/// The shared stores VM `name`'s disks are on (none, or `shared`).
fn shared_stores_of(source: &mut Client, name: &str) -> Result<Vec<String>, String> {
    let disks = match source.call_ok(Request::VmDiskList { name: name.into() })? {
        Body::Disks { disks, .. } => disks,
        other => return Err(format!("unexpected reply to vm-disk-list: {other:?}")),
    };
    let mut out: Vec<String> = disks
        .iter()
        .filter_map(|d| d.location.split_once(':').map(|(s, _)| s.to_string()))
        .filter(|s| s == SHARED_STORE)
        .collect();
    out.dedup();
    Ok(out)
}

/// Whether the cluster's node `node` has store `store` (its `store list`).
fn sees_store(cli: &Cli, node: &str, store: &str) -> bool {
    let Ok((addr, key)) = crate::cluster::resolve_target(
        cli.state_dir.as_deref(),
        Some(node),
        None,
        cli.key.as_deref(),
    ) else {
        return false;
    };
    let Ok(key) = ClusterKey::from_hex(&key) else {
        return false;
    };
    match Client::connect(&addr, &key).and_then(|mut c| c.call_ok(Request::StoreList)) {
        Ok(Body::StoreList { stores }) => {
            stores.iter().any(|s| s.name == store && s.error.is_none())
        }
        _ => false,
    }
}

/// `node info` of the cluster's node `name`.
fn ask_node_info(cli: &Cli, name: &str) -> Result<NodeInfo, String> {
    let (addr, key) = crate::cluster::resolve_target(
        cli.state_dir.as_deref(),
        Some(name),
        None,
        cli.key.as_deref(),
    )?;
    let key = ClusterKey::from_hex(&key).map_err(|e| e.to_string())?;
    match Client::connect(&addr, &key)?.call_ok(Request::NodeInfo)? {
        Body::NodeInfo(n) => Ok(n),
        other => Err(format!("unexpected reply to node-info: {other:?}")),
    }
}

/// After a completed move: the VM runs on `to` (listed `running` or
/// `halted` there) and has left the source's list (within a few seconds).
fn check_moved(cli: &Cli, source: &mut Client, name: &str, to: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while find_vm(source, name)?.is_some() {
        if Instant::now() > deadline {
            return Err(format!(
                "the job completed but node {} still lists VM {name}",
                source.node
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if cli.addr.is_some() {
        // No cluster state to find the destination by name.
        return Ok(format!(
            "{name} has left node {}; check node {to} with --addr",
            source.node
        ));
    }
    let (addr, key) = crate::cluster::resolve_target(
        cli.state_dir.as_deref(),
        Some(to),
        None,
        cli.key.as_deref(),
    )?;
    let key = ClusterKey::from_hex(&key).map_err(|e| e.to_string())?;
    let mut dest = Client::connect(&addr, &key)?;
    match find_vm(&mut dest, name)? {
        Some(v) if v.state == "running" || v.state == "halted" => Ok(format!(
            "{name} runs on node {to} ({}) and no longer on node {}",
            v.state, source.node
        )),
        Some(v) => Err(format!(
            "the job completed but VM {name} is {} on node {to}",
            v.state
        )),
        None => Err(format!(
            "the job completed but node {to} does not list VM {name}"
        )),
    }
}

/// `vm move ... --wait`: start the move, follow it, then say where the VM
/// runs. Exit status 0 only if it runs on the destination (and left the
/// source); 3 if the move is in doubt; 1 otherwise.
fn move_and_wait(cli: &Cli, client: &mut Client, request: Request) -> Result<u8, String> {
    let Request::VmMove(VmMove { name, to, .. }) = &request else {
        return Err("not a move".into());
    };
    let (name, to) = (name.clone(), to.clone());
    let job = match client.call(request)? {
        Outcome::Ok(Body::Job(j)) => j,
        Outcome::Ok(other) => return Err(format!("unexpected reply to vm-move: {other:?}")),
        Outcome::Error(e) => return Ok(print_error(cli.json, &e)),
    };
    if !cli.json {
        println!(
            "job {}: moving VM {name} from node {} to node {to}",
            job.id, client.node
        );
    }
    let job = follow(client, job.id, cli.json)?;
    print_end(&job, cli.json);
    let status = job_exit_status(&job);
    match status {
        0 => match check_moved(cli, client, &name, &to) {
            Ok(where_) => {
                if !cli.json {
                    println!("{where_}");
                }
                Ok(0)
            }
            Err(e) => {
                eprintln!("hvctl: {e}");
                Ok(1)
            }
        },
        3 => {
            eprintln!(
                "hvctl: the move of {name} is in doubt: see the job's error; then `hvctl --node {} job resolve {} --keep source|destination`",
                client.node, job.id
            );
            Ok(3)
        }
        _ => {
            if !cli.json {
                let here = find_vm(client, &name)
                    .ok()
                    .flatten()
                    .map(|v| format!("; VM {name} is {} on node {}", v.state, client.node))
                    .unwrap_or_default();
                eprintln!(
                    "hvctl: VM {name} was not moved ({}){here}",
                    state_word(job.state)
                );
            }
            Ok(1)
        }
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
    let action = match cli.action() {
        Action::MoveAndWait(req) => Action::MoveAndWait(place_if_auto(cli, &mut client, req)?),
        Action::Request(req) => Action::Request(place_if_auto(cli, &mut client, req)?),
        other => other,
    };
    match action {
        Action::Help | Action::Completions(_) => Ok(0),
        Action::Watch(id) => watch(&mut client, id, cli.json),
        Action::WatchAll => watch_all(&mut client, cli.json),
        Action::MoveAndWait(req) => move_and_wait(cli, &mut client, req),
        Action::RequestAndWatch(req) => {
            let storage = matches!(req, Request::VmMoveStorage { .. });
            match client.call(req)? {
                Outcome::Ok(Body::Job(j)) => {
                    if storage && !cli.json {
                        println!("job {}: storage migration of VM {}", j.id, j.vm);
                    }
                    watch(&mut client, j.id, cli.json)
                }
                Outcome::Ok(other) if storage => Err(format!("unexpected reply: {other:?}")),
                Outcome::Ok(body) => {
                    println!("{}", render(&body));
                    Ok(0)
                }
                Outcome::Error(e) => Ok(print_error(cli.json, &e)),
            }
        }
        Action::ConsoleSend {
            name,
            text,
            wait_ms,
        } => console_send(cli, &mut client, &name, text, wait_ms),
        Action::CreateWithDisk(create, disk) => {
            let Request::VmCreate { name, .. } = &create else {
                return Err("not a create".into());
            };
            let name = name.clone();
            let vm = match client.call(create)? {
                Outcome::Ok(body) => body,
                Outcome::Error(e) => return Ok(print_error(cli.json, &e)),
            };
            match client.call(disk)? {
                Outcome::Ok(disks) => {
                    if cli.json {
                        println!("{}", serde_json::json!({"ok": {"vm": vm, "disks": disks}}));
                    } else {
                        println!("{}\n{}", render(&vm), render(&disks));
                    }
                    Ok(0)
                }
                Outcome::Error(e) => {
                    // No half-made VM left behind.
                    let _ = client.call(Request::VmDelete { name });
                    Ok(print_error(cli.json, &e))
                }
            }
        }
        Action::Request(req) => {
            let moving = matches!(req, Request::VmMove(_));
            let outcome = client.call(req)?;
            match &outcome {
                Outcome::Ok(body) => {
                    if cli.json {
                        println!("{}", render_json(&outcome));
                    } else if let (true, Body::Job(j)) = (moving, body) {
                        println!("job {}", j.id);
                        println!("{}", render(body));
                        println!(
                            "follow it with `hvctl --node {} job watch {}`",
                            client.node, j.id
                        );
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

    #[test]
    fn vm_create_with_a_disk_and_disk_list() {
        assert_eq!(
            p("vm create d --memory 64M --disk 256M --store shared --fixed --guest disk-verify")
                .unwrap()
                .action(),
            Action::CreateWithDisk(
                Request::VmCreate {
                    name: "d".into(),
                    memory_mib: 64,
                    guest: Some("disk-verify".into()),
                    linux: None
                },
                Request::VmDiskCreate {
                    name: "d".into(),
                    size_mib: 256,
                    store: Some("shared".into()),
                    fixed: Some(true)
                }
            )
        );
        assert_eq!(
            p("vm create d --memory 64 --disk 1G").unwrap().action(),
            Action::CreateWithDisk(
                Request::VmCreate {
                    name: "d".into(),
                    memory_mib: 64,
                    guest: None,
                    linux: None
                },
                Request::VmDiskCreate {
                    name: "d".into(),
                    size_mib: 1024,
                    store: None,
                    fixed: None
                }
            )
        );
        assert_eq!(
            p("vm disk list d").unwrap().action(),
            Action::Request(Request::VmDiskList { name: "d".into() })
        );
        assert_eq!(
            p("vm move-storage d --to shared:vms --vhd 0=local:x.vhdx --vhd local:a=shared:b --keep-source --bandwidth 2 --wait")
                .unwrap()
                .action(),
            Action::RequestAndWatch(Request::VmMoveStorage {
                name: "d".into(),
                to: Some("shared:vms".into()),
                vhd: vec!["0=local:x.vhdx".into(), "local:a=shared:b".into()],
                config: None,
                snapshots: None,
                keep_source: Some(true),
                bandwidth_mib_s: Some(2),
            })
        );
        assert_eq!(
            p("vm move-storage d --vhd 0=shared:y").unwrap().action(),
            Action::Request(Request::VmMoveStorage {
                name: "d".into(),
                to: None,
                vhd: vec!["0=shared:y".into()],
                config: None,
                snapshots: None,
                keep_source: None,
                bandwidth_mib_s: None,
            })
        );
        assert!(usage_error("vm move-storage d").contains("--to"));
        assert_eq!(
            p("vm create lx --memory 256M --linux --append hvmigrate.ticks=1")
                .unwrap()
                .action(),
            Action::Request(Request::VmCreate {
                name: "lx".into(),
                memory_mib: 256,
                guest: None,
                linux: Some(hvmgmt::proto::LinuxBoot {
                    append: "hvmigrate.ticks=1".into()
                })
            })
        );
        assert_eq!(
            p("vm create lx --memory 256M --linux").unwrap().action(),
            Action::Request(Request::VmCreate {
                name: "lx".into(),
                memory_mib: 256,
                guest: None,
                linux: Some(hvmgmt::proto::LinuxBoot::default())
            })
        );
        assert!(usage_error("vm create lx --memory 64 --append quiet").contains("--linux"));
        assert!(usage_error("vm create lx --memory 64 --linux --guest hello").contains("--guest"));
        assert!(usage_error("vm create d --memory 64 --fixed").contains("--disk"));
        assert!(usage_error("vm create d --memory 64 --store a").contains("--disk"));
        let text = render(&Body::Disks {
            vm: "d".into(),
            disks: vec![hvmgmt::proto::DiskInfo {
                slot: 0,
                location: "shared:vms/d/d-0.vhdx".into(),
                kind: "dynamic".into(),
                virtual_bytes: 256 << 20,
                file_bytes: 12 << 20,
            }],
            config: Some("shared:cfg/d.vmcfg".into()),
            snapshots: Some("local:vms/d/snapshots".into()),
        });
        assert!(text.starts_with("disk 0  shared:vms/d/d-0.vhdx"), "{text}");
        assert!(text.contains("256 MiB"), "{text}");
        assert!(text.contains("\nconfig     shared:cfg/d.vmcfg\n"), "{text}");
        assert!(
            text.ends_with("\nsnapshots  local:vms/d/snapshots"),
            "{text}"
        );
        assert_eq!(
            p("vm move-storage d --config shared:cfg --snapshots local:snaps")
                .unwrap()
                .action(),
            Action::Request(Request::VmMoveStorage {
                name: "d".into(),
                to: None,
                vhd: vec![],
                config: Some("shared:cfg".into()),
                snapshots: Some("local:snaps".into()),
                keep_source: None,
                bandwidth_mib_s: None,
            })
        );
        assert_eq!(
            p("vm import shared:cfg/d.vmcfg").unwrap().action(),
            Action::Request(Request::VmImport {
                path: "shared:cfg/d.vmcfg".into()
            })
        );
        assert!(usage_error("vm import").contains("STORE:PATH"));
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
                guest: Some("hello".into()),
                linux: None
            })
        );
        assert_eq!(
            p("vm create x --memory=1G").unwrap().action(),
            Action::Request(Request::VmCreate {
                name: "x".into(),
                memory_mib: 1024,
                guest: None,
                linux: None
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
            p("vm console web --send ls").unwrap().action(),
            Action::ConsoleSend {
                name: "web".into(),
                text: "ls\n".into(),
                wait_ms: CONSOLE_WAIT_MS_DEFAULT
            }
        );
        assert_eq!(
            p("vm console web --send q --no-newline --wait-ms 100")
                .unwrap()
                .action(),
            Action::ConsoleSend {
                name: "web".into(),
                text: "q".into(),
                wait_ms: 100
            }
        );
        assert!(usage_error("vm console web --no-newline").contains("--send"));
        assert!(usage_error("vm console web --send ls --lines 3").contains("--lines"));
        assert_eq!(
            p("host set --max-migrations 3").unwrap().action(),
            Action::Request(Request::HostSet {
                max_live_migrations: Some(3),
                max_storage_migrations: None
            })
        );
        assert_eq!(
            p("store list --node b").unwrap().action(),
            Action::Request(Request::StoreList)
        );
        assert_eq!(
            p("store bench").unwrap().action(),
            Action::Request(Request::StoreBench {
                store: "local".into(),
                mib: 64,
                keep: false
            })
        );
        assert_eq!(
            p("store bench --store shared --mib 8 --keep --wait")
                .unwrap()
                .action(),
            Action::RequestAndWatch(Request::StoreBench {
                store: "shared".into(),
                mib: 8,
                keep: true
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
            ("store bench --mib x", "invalid value 'x'"),
            ("store", "Usage: hvctl store"),
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
    fn store_table() {
        let st = |name: &str, error: Option<&str>| StoreInfo {
            name: name.into(),
            tag: "a".into(),
            host_path: "/srv/stores/a".into(),
            total_bytes: 100 << 30,
            free_bytes: 30 << 30,
            used_bytes: 512 << 20,
            error: error.map(Into::into),
        };
        let text = render(&Body::StoreList {
            stores: vec![st("local", None), st("broken", Some("9P attach: EACCES"))],
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("NAME") && lines[0].ends_with("HOST PATH"));
        assert!(
            lines[1].starts_with("local ")
                && lines[1].contains("30.0 GiB")
                && lines[1].contains("512.0 MiB")
                && lines[1].contains("100.0 GiB")
                && lines[1].ends_with("/srv/stores/a"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains("unusable: 9P attach: EACCES"),
            "{}",
            lines[2]
        );
        assert_eq!(render(&Body::StoreList { stores: vec![] }), "no stores");
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

    #[test]
    fn move_show_resolve_parse() {
        assert_eq!(
            p("--node a vm move v --to b").unwrap().action(),
            Action::Request(Request::VmMove(VmMove::to("v", "b")))
        );
        assert_eq!(
            p("vm move v --to b --downtime-ms 50 --bandwidth 8 --timeout 60 --encrypt --no-verify --wait --json")
                .unwrap()
                .action(),
            Action::MoveAndWait(Request::VmMove(VmMove { downtime_ms: Some(50), bandwidth_mib_s: Some(8), timeout_s: Some(60), encrypt: Some(true), verify: Some(false), ..VmMove::to("v", "b") }))
        );
        assert_eq!(
            p("vm move v --to b --include-storage --store local:x --wait")
                .unwrap()
                .action(),
            Action::MoveAndWait(Request::VmMove(VmMove {
                include_storage: true,
                store: Some("local:x".into()),
                ..VmMove::to("v", "b")
            }))
        );
        assert!(
            p("vm move v --to b --store local").is_err(),
            "--store needs --include-storage or --quick"
        );
        assert_eq!(
            p("vm move v --to b --quick --store local --wait")
                .unwrap()
                .action(),
            Action::MoveAndWait(Request::VmMove(VmMove {
                store: Some("local".into()),
                quick: true,
                ..VmMove::to("v", "b")
            }))
        );
        assert!(
            p("vm move v --to b --quick --include-storage").is_err(),
            "one way to move the disks"
        );
        assert_eq!(
            p("vm move v --to b --debug-hold-ready-ms 3000")
                .unwrap()
                .action(),
            Action::Request(Request::VmMove(VmMove {
                debug_hold_ready_ms: Some(3000),
                ..VmMove::to("v", "b")
            }))
        );
        assert_eq!(
            p("job show 4").unwrap().action(),
            Action::Request(Request::JobShow { id: 4 })
        );
        assert_eq!(
            p("job resolve 4 --keep destination").unwrap().action(),
            Action::Request(Request::JobResolve {
                id: 4,
                keep: Keep::Destination
            })
        );
        for (args, err) in [
            ("vm move v", "--to <NODE|auto>"),
            ("vm move --to b", "<NAME>"),
            ("vm move v --to b --downtime-ms 0", "invalid value"),
            ("vm move v --to b --bandwidth 0", "invalid value"),
            ("vm move v --to b --timeout x", "invalid value"),
            ("job resolve 4", "--keep"),
            ("job resolve 4 --keep both", "invalid value 'both'"),
            ("job show", "<ID>"),
        ] {
            let e = usage_error(args);
            assert!(e.contains(err), "{args}: {e}");
        }
        let help = parse(["help", "vm", "move"]).unwrap_err().to_string();
        for word in [
            "--downtime-ms <MS>",
            "--bandwidth <MIB/S>",
            "--encrypt",
            "--wait",
        ] {
            assert!(help.contains(word), "{word} missing in:\n{help}");
        }
    }

    fn migration(phase: Phase, pass: u32) -> MigrationInfo {
        MigrationInfo {
            direction: hvmgmt::proto::Direction::Outgoing,
            peer: "b".into(),
            phase,
            pass,
            bytes_sent: 40 << 20,
            bytes_remaining: 3 << 20,
            dirty_rate_bytes_per_s: 8 << 20,
            bandwidth_bytes_per_s: 20 << 20,
            eta_ms: Some(1500),
            throttle_pct: 0,
            downtime_limit_ms: 300,
            encrypted: false,
            verify: true,
            storage_bytes_copied: 0,
            storage_bytes_total: 0,
            checkpoint_bytes: 0,
        }
    }

    fn move_job(id: u64, state: JobState, phase: Phase, pass: u32, percent: u8) -> JobInfo {
        JobInfo {
            id,
            kind: hvmgmt::proto::JobKind::LiveMigration,
            vm: "v".into(),
            state,
            percent,
            bytes_done: 40 << 20,
            bytes_total: 43 << 20,
            elapsed_ms: 2500,
            error: None,
            cancellable: !state.is_final(),
            result: None,
            migration: Some(Box::new(migration(phase, pass))),
            report: None,
        }
    }

    fn report() -> MigrationReport {
        MigrationReport {
            passes: 3,
            pages_per_pass: vec![16384, 1200, 80],
            bytes_sent: 70 << 20,
            zero_pages: 12000,
            ram_bytes: 64 << 20,
            total_ms: 4200,
            downtime_ms: 120,
            expected_downtime_ms: 90,
            throttle_pct: 20,
            result: "completed".into(),
            error: None,
            dirty_tracker: Some("write-protect".into()),
            verified: true,
            pause_us: Default::default(),
        }
    }

    #[test]
    fn migration_progress_and_report_read_well() {
        let j = move_job(7, JobState::Running, Phase::Copying, 2, 45);
        let line = progress_line(&j);
        assert!(line.starts_with("   7  live-migration    v"), "{line}");
        for part in [
            "copying, pass 2",
            "40.0 MiB sent",
            "3.0 MiB left",
            "dirty 8.0 MiB/s",
            "link 20.0 MiB/s",
            "ETA 1.5 s",
        ] {
            assert!(line.contains(part), "{part} missing in {line}");
        }
        assert!(!line.contains("throttled"));
        let mut m = migration(Phase::FinalCopy, 4);
        m.throttle_pct = 30;
        m.eta_ms = None;
        let t = migration_progress(&m);
        assert!(
            t.starts_with("final-copy, pass 4") && t.contains("ETA ?"),
            "{t}"
        );
        assert!(t.ends_with("guest throttled 30%"), "{t}");
        // Shared-nothing: the disk copy first, then memory.
        let mut m = migration(Phase::Copying, 0);
        (m.bytes_sent, m.storage_bytes_copied, m.storage_bytes_total) = (0, 3 << 20, 8 << 20);
        assert_eq!(
            migration_progress(&m),
            "copying disks: 3.0 MiB of 8.0 MiB copied"
        );
        // A quick move: the checkpoint's growth.
        m.checkpoint_bytes = 2 << 20;
        assert_eq!(
            migration_progress(&m),
            "copying disks: 3.0 MiB of 8.0 MiB copied, checkpoint 2.0 MiB"
        );
        m.checkpoint_bytes = 0;
        m.bytes_sent = 1 << 20;
        assert!(
            migration_progress(&m).ends_with(", disks 8.0 MiB copied"),
            "{}",
            migration_progress(&m)
        );
        assert!(job_line(&j).contains("\n      to b: copying, pass 2"));
        let text = report_text(&report());
        for part in [
            "result        completed (memory verified; dirty pages tracked by write-protect)",
            "passes        3 (16384, 1200, 80 pages)",
            "sent          70.0 MiB for 64.0 MiB of guest RAM (12000 zero pages",
            "total time    4.2 s",
            "downtime      120 ms (expected 90 ms)",
            "throttle      20%",
        ] {
            assert!(text.contains(part), "{part} missing in:\n{text}");
        }
        let failed = MigrationReport {
            result: "failed".into(),
            error: Some("link to b lost".into()),
            verified: false,
            dirty_tracker: None,
            ..report()
        };
        assert!(report_text(&failed).contains("error         link to b lost"));
        // `job show` renders the report under the job.
        let mut done = move_job(7, JobState::Completed, Phase::Completed, 3, 100);
        done.report = Some(Box::new(report()));
        assert!(render(&Body::Job(done)).contains("downtime      120 ms"));
        assert_eq!(duration_words(61_500), "1 min 1 s");
    }

    #[test]
    fn piped_progress_lines_per_step_and_at_most_one_a_second_for_percent() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut l = LineThrottle::default();
        let j = |phase, pass, percent| move_job(1, JobState::Running, phase, pass, percent);
        assert!(l.due(&j(Phase::Copying, 0, 10), at(0)), "the first");
        assert!(!l.due(&j(Phase::Copying, 0, 10), at(2000)), "nothing new");
        assert!(
            !l.due(&j(Phase::Copying, 0, 11), at(500)),
            "percent too soon"
        );
        assert!(
            l.due(&j(Phase::Copying, 0, 12), at(1000)),
            "percent, a second on"
        );
        assert!(
            l.due(&j(Phase::Copying, 1, 12), at(1100)),
            "a new pass at once"
        );
        assert!(l.due(&j(Phase::FinalCopy, 1, 12), at(1200)), "a new phase");
        let mut done = j(Phase::Completed, 1, 100);
        done.state = JobState::Completed;
        assert!(l.due(&done, at(1300)), "the end");
    }

    #[test]
    fn exit_status_of_a_followed_job() {
        let mut j = move_job(1, JobState::Completed, Phase::Completed, 3, 100);
        assert_eq!(job_exit_status(&j), 0);
        j.state = JobState::Failed;
        assert_eq!(job_exit_status(&j), 1);
        j.state = JobState::Cancelled;
        assert_eq!(job_exit_status(&j), 1);
        let mut d = move_job(1, JobState::Running, Phase::InDoubt, 3, 99);
        assert!(
            !awaits_operator(&d),
            "in doubt, still asking the destination"
        );
        d.error = Some(
            "node b restarted since it accepted: look at its vm-list, then job-resolve".into(),
        );
        assert!(awaits_operator(&d));
        assert_eq!(job_exit_status(&d), 3);
    }

    /// `vm move --wait` against fake nodes a (source) and b: the requests
    /// it sends and its exit status for each ending.
    mod fake {
        use super::super::*;
        use super::{migration, move_job, report};
        use crate::fake_node::FakeNode;
        use hvmgmt::proto::{ErrorCode, Phase};

        const KEY: &str = "0101010101010101010101010101010101010101010101010101010101010101";

        fn vm(state: &str) -> VmInfo {
            VmInfo {
                name: "v".into(),
                state: state.into(),
                stop_reason: None,
                memory_mib: 64,
                guest: "busy-verify".into(),
                exits: 1,
                console_lines: 3,
                migration_job: None,
                pause_reason: None,
                pause_detail: None,
                files: None,
            }
        }

        /// Node a: `vm-move` gives job 7; `job-show` walks through
        /// `steps`; `vm-list` lists `left_on_a`.
        fn source(steps: Vec<JobInfo>, left_on_a: Option<VmInfo>) -> FakeNode {
            let mut step = 0;
            FakeNode::start(
                "a",
                KEY,
                Box::new(move |r| match r {
                    Request::VmMove(_) => Outcome::Ok(Body::Job(move_job(
                        7,
                        JobState::Queued,
                        Phase::Queued,
                        0,
                        0,
                    ))),
                    Request::JobShow { id: 7 } => {
                        let j = steps[step.min(steps.len() - 1)].clone();
                        step += 1;
                        Outcome::Ok(Body::Job(j))
                    }
                    Request::VmList => Outcome::Ok(Body::VmList {
                        vms: left_on_a.iter().cloned().collect(),
                    }),
                    _ => Outcome::Error(ApiError::new(ErrorCode::NotFound, "no")),
                }),
            )
        }

        fn dest(listed: Option<VmInfo>) -> FakeNode {
            FakeNode::start(
                "b",
                KEY,
                Box::new(move |r| match r {
                    Request::VmList => Outcome::Ok(Body::VmList {
                        vms: listed.iter().cloned().collect(),
                    }),
                    _ => Outcome::Error(ApiError::new(ErrorCode::NotFound, "no")),
                }),
            )
        }

        /// A state directory naming the two fake nodes.
        fn state_dir(tag: &str, a: &FakeNode, b: &FakeNode) -> std::path::PathBuf {
            let dir = std::env::temp_dir().join(format!("hvm-hvctl-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let node = |name: &str, n: &FakeNode| crate::cluster::NodeState {
                name: name.into(),
                pid: 0,
                mgmt_port: n.addr.rsplit(':').next().unwrap().parse().unwrap(),
                migration_ip: String::new(),
                log: dir.join("x"),
                qemu_args: Vec::new(),
                own_key: None,
            };
            let state = crate::cluster::ClusterState {
                key: KEY.into(),
                relay_pid: None,
                nodes: vec![node("a", a), node("b", b)],
            };
            std::fs::write(
                dir.join("cluster.json"),
                serde_json::to_string(&state).unwrap(),
            )
            .unwrap();
            dir
        }

        fn run_move(dir: &std::path::Path, extra: &str) -> u8 {
            let line = format!(
                "--state-dir {} --node a vm move v --to b --wait {extra}",
                dir.display()
            );
            run_cli(&parse(line.split_whitespace()).unwrap())
        }

        fn completed() -> JobInfo {
            let mut j = move_job(7, JobState::Completed, Phase::Completed, 3, 100);
            j.report = Some(Box::new(report()));
            j
        }

        #[test]
        fn a_move_that_lands_on_b_exits_0() {
            let a = source(
                vec![
                    move_job(7, JobState::Running, Phase::Copying, 0, 30),
                    move_job(7, JobState::Running, Phase::Copying, 1, 80),
                    move_job(7, JobState::Running, Phase::FinalCopy, 2, 97),
                    completed(),
                ],
                None,
            );
            let b = dest(Some(vm("running")));
            let dir = state_dir("ok", &a, &b);
            assert_eq!(
                run_move(&dir, "--downtime-ms 50 --bandwidth 8 --encrypt"),
                0
            );
            let seen = a.seen();
            assert_eq!(
                seen[0],
                Request::VmMove(VmMove {
                    downtime_ms: Some(50),
                    bandwidth_mib_s: Some(8),
                    encrypt: Some(true),
                    ..VmMove::to("v", "b")
                })
            );
            let shows = seen
                .iter()
                .filter(|r| **r == Request::JobShow { id: 7 })
                .count();
            assert_eq!(shows, 4, "{seen:?}");
            assert_eq!(seen.last(), Some(&Request::VmList), "a must have let go");
            assert_eq!(b.seen(), vec![Request::VmList], "b must list it");
            // JSON mode: the same checks, one JSON document.
            assert_eq!(run_move(&dir, "--json"), 0);
            std::fs::remove_dir_all(&dir).unwrap();
        }

        #[test]
        fn a_move_that_did_not_land_exits_1() {
            // Completed, but b lists the VM as not running.
            let a = source(vec![completed()], None);
            let b = dest(Some(vm("incoming")));
            let dir = state_dir("incoming", &a, &b);
            assert_eq!(run_move(&dir, ""), 1);
            // Completed, but a still lists it.
            let a2 = source(vec![completed()], Some(vm("running")));
            let dir2 = state_dir("still", &a2, &b);
            assert_eq!(run_move(&dir2, ""), 1);
            assert!(b.seen().len() == 1, "b is asked only when a let go");
            // Failed: the VM runs on a; b is not asked.
            let mut failed = move_job(7, JobState::Failed, Phase::Failed, 1, 40);
            failed.error = Some("link to b lost: no data acknowledged for 8 s".into());
            let a3 = source(vec![failed], Some(vm("running")));
            let b3 = dest(None);
            let dir3 = state_dir("failed", &a3, &b3);
            assert_eq!(run_move(&dir3, ""), 1);
            assert!(b3.seen().is_empty());
            for d in [dir, dir2, dir3] {
                std::fs::remove_dir_all(d).unwrap();
            }
        }

        #[test]
        fn refused_and_in_doubt_moves() {
            let refuse = FakeNode::start(
                "a",
                KEY,
                Box::new(|_| {
                    Outcome::Error(ApiError::new(
                        ErrorCode::VmMigrating,
                        "VM v is migrating (job 3)",
                    ))
                }),
            );
            let b = dest(None);
            let dir = state_dir("refused", &refuse, &b);
            assert_eq!(run_move(&dir, ""), 1);
            assert_eq!(refuse.seen().len(), 1, "no job to follow");
            let mut doubt = move_job(7, JobState::Running, Phase::InDoubt, 3, 99);
            doubt.migration = Some(Box::new(migration(Phase::InDoubt, 3)));
            doubt.error = Some("node b restarted: check it, then job-resolve".into());
            let a = source(vec![doubt], None);
            let dir2 = state_dir("doubt", &a, &b);
            assert_eq!(run_move(&dir2, ""), 3);
            assert!(b.seen().is_empty());
            for d in [dir, dir2] {
                std::fs::remove_dir_all(d).unwrap();
            }
        }

        fn info(name: &str, vendor: &str, free_mib: u64, peers: &[&str]) -> NodeInfo {
            NodeInfo {
                name: name.into(),
                cpu_vendor: vendor.into(),
                cpus: 1,
                memory_total_bytes: 512 << 20,
                memory_free_bytes: free_mib << 20,
                version: "0".into(),
                protocol_version: 1,
                mgmt_addr: String::new(),
                migration_addr: String::new(),
                peers: peers.iter().map(|p| format!("{p}@10.0.0.1")).collect(),
            }
        }

        /// A node answering `node-info` with `info`, `vm-list` with v, and
        /// `vm-move` with a queued job.
        fn node(info: NodeInfo) -> FakeNode {
            node_with(info, &[], &[])
        }

        /// [`node`], whose VM has disks at `disks` and which has stores
        /// `stores`.
        fn node_with(info: NodeInfo, disks: &[&str], stores: &[&str]) -> FakeNode {
            let name = info.name.clone();
            let disks: Vec<hvmgmt::proto::DiskInfo> = disks
                .iter()
                .enumerate()
                .map(|(i, l)| hvmgmt::proto::DiskInfo {
                    slot: i as u8,
                    location: (*l).into(),
                    kind: "dynamic".into(),
                    virtual_bytes: 1 << 20,
                    file_bytes: 1 << 20,
                })
                .collect();
            let stores: Vec<hvmgmt::proto::StoreInfo> = stores
                .iter()
                .map(|n| hvmgmt::proto::StoreInfo {
                    name: (*n).into(),
                    tag: (*n).into(),
                    host_path: String::new(),
                    total_bytes: 1 << 30,
                    free_bytes: 1 << 29,
                    used_bytes: 1 << 29,
                    error: None,
                })
                .collect();
            FakeNode::start(
                &name,
                KEY,
                Box::new(move |r| match r {
                    Request::NodeInfo => Outcome::Ok(Body::NodeInfo(info.clone())),
                    Request::VmDiskList { name } => Outcome::Ok(Body::Disks {
                        vm: name.clone(),
                        disks: disks.clone(),
                        config: None,
                        snapshots: None,
                    }),
                    Request::StoreList => Outcome::Ok(Body::StoreList {
                        stores: stores.clone(),
                    }),
                    Request::VmList => Outcome::Ok(Body::VmList {
                        vms: vec![vm("running")],
                    }),
                    Request::VmMove(_) => Outcome::Ok(Body::Job(move_job(
                        7,
                        JobState::Queued,
                        Phase::Queued,
                        0,
                        0,
                    ))),
                    _ => Outcome::Error(ApiError::new(ErrorCode::NotFound, "no")),
                }),
            )
        }

        fn cluster_dir(tag: &str, nodes: &[(&str, &FakeNode)]) -> std::path::PathBuf {
            let dir = std::env::temp_dir().join(format!("hvm-hvctl-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let state = crate::cluster::ClusterState {
                key: KEY.into(),
                relay_pid: None,
                nodes: nodes
                    .iter()
                    .map(|(name, n)| crate::cluster::NodeState {
                        name: (*name).into(),
                        pid: 0,
                        mgmt_port: n.addr.rsplit(':').next().unwrap().parse().unwrap(),
                        migration_ip: String::new(),
                        log: dir.join("x"),
                        qemu_args: Vec::new(),
                        own_key: None,
                    })
                    .collect(),
            };
            std::fs::write(
                dir.join("cluster.json"),
                serde_json::to_string(&state).unwrap(),
            )
            .unwrap();
            dir
        }

        fn moved_to(n: &FakeNode) -> Vec<String> {
            n.seen()
                .into_iter()
                .filter_map(|r| match r {
                    Request::VmMove(VmMove { to, .. }) => Some(to),
                    _ => None,
                })
                .collect()
        }

        /// `--to auto` for a VM with a disk on the shared store: d has the
        /// most room but does not see the store, so e gets it; a VM with
        /// its disk on a local store is placed by memory alone (and then
        /// refused by the source, which is not placement's business).
        #[test]
        fn to_auto_picks_only_nodes_that_see_the_shared_store() {
            let a = node_with(
                info("a", "amd", 400, &["d", "e"]),
                &["shared:vms/v/v-0.vhdx"],
                &["local", "shared"],
            );
            let d = node_with(info("d", "amd", 300, &[]), &[], &["local"]);
            let e = node_with(info("e", "amd", 200, &[]), &[], &["local", "shared"]);
            let dir = cluster_dir("auto-shared", &[("a", &a), ("d", &d), ("e", &e)]);
            let line = format!("--state-dir {} --node a vm move v --to auto", dir.display());
            assert_eq!(run_cli(&parse(line.split_whitespace()).unwrap()), 0);
            assert_eq!(moved_to(&a), ["e"]);
            assert_eq!(d.seen(), [Request::NodeInfo, Request::StoreList]);

            let only_d = node_with(
                info("a", "amd", 400, &["d"]),
                &["shared:vms/v/v-0.vhdx"],
                &["local", "shared"],
            );
            let dir2 = cluster_dir("auto-shared-none", &[("a", &only_d), ("d", &d)]);
            let line = format!(
                "--state-dir {} --node a vm move v --to auto",
                dir2.display()
            );
            assert_eq!(run_cli(&parse(line.split_whitespace()).unwrap()), 1);
            assert!(moved_to(&only_d).is_empty());

            let local = node_with(
                info("a", "amd", 400, &["d", "e"]),
                &["local:vms/v/v-0.vhdx"],
                &["local", "shared"],
            );
            let dir3 = cluster_dir("auto-local", &[("a", &local), ("d", &d), ("e", &e)]);
            let line = format!(
                "--state-dir {} --node a vm move v --to auto",
                dir3.display()
            );
            assert_eq!(run_cli(&parse(line.split_whitespace()).unwrap()), 0);
            assert_eq!(moved_to(&local), ["d"]);
            for dir in [dir, dir2, dir3] {
                std::fs::remove_dir_all(dir).unwrap();
            }
        }

        /// `--to auto`: b has too little memory, c is another vendor, d
        /// has the most room: the move goes to d, the others are only
        /// asked. With nowhere to go, nothing is requested and the exit is
        /// 1.
        #[test]
        fn to_auto_moves_to_the_peer_with_most_free_memory() {
            let a = node(info("a", "amd", 400, &["b", "c", "d", "e"]));
            let b = node(info("b", "amd", 32, &[]));
            let c = node(info("c", "intel", 900, &[]));
            let d = node(info("d", "amd", 300, &[]));
            let e = node(info("e", "amd", 200, &[]));
            let nodes = [("a", &a), ("b", &b), ("c", &c), ("d", &d), ("e", &e)];
            let dir = cluster_dir("auto", &nodes);
            let line = format!("--state-dir {} --node a vm move v --to auto", dir.display());
            assert_eq!(run_cli(&parse(line.split_whitespace()).unwrap()), 0);
            assert_eq!(moved_to(&a), ["d"]);
            for n in [&b, &c, &d, &e] {
                assert_eq!(n.seen(), [Request::NodeInfo], "peers are only asked");
            }

            let lone = node(info("a", "amd", 400, &["b", "c"]));
            let dir2 = cluster_dir("auto-none", &[("a", &lone), ("b", &b), ("c", &c)]);
            let line = format!(
                "--state-dir {} --node a vm move v --to auto --wait",
                dir2.display()
            );
            assert_eq!(run_cli(&parse(line.split_whitespace()).unwrap()), 1);
            assert!(moved_to(&lone).is_empty());
            for d in [dir, dir2] {
                std::fs::remove_dir_all(d).unwrap();
            }
        }
    }

    #[test]
    fn placement_names_why_each_peer_was_passed_over() {
        let peer = |name: &str, vendor: &str, free_mib: u64| -> Candidate {
            let mut n = hvmgmt_node(name);
            n.cpu_vendor = vendor.into();
            n.memory_free_bytes = free_mib << 20;
            (name.into(), Ok(n))
        };
        let vm = 64 << 20;
        // Most free memory wins; equal room goes to the first named.
        let got = choose_node(
            vm,
            "amd",
            &[
                peer("b", "amd", 100),
                peer("c", "amd", 300),
                peer("d", "amd", 300),
            ],
        );
        assert_eq!(got.unwrap(), "c");
        // Exactly the VM's RAM is enough.
        assert_eq!(
            choose_node(vm, "amd", &[peer("b", "amd", 64)]).unwrap(),
            "b"
        );
        let down: Candidate = (
            "e".into(),
            Err("cannot connect to 127.0.0.1:1: refused".into()),
        );
        let err = choose_node(
            vm,
            "amd",
            &[peer("b", "amd", 63), peer("c", "intel", 900), down],
        )
        .unwrap_err();
        assert!(err.contains("b: 63 MiB free, the VM needs 64 MiB"), "{err}");
        assert!(err.contains("c: intel CPU, the VM runs on amd"), "{err}");
        assert!(err.contains("e: cannot connect"), "{err}");
        assert!(choose_node(vm, "amd", &[])
            .unwrap_err()
            .contains("no peers"));
    }

    fn hvmgmt_node(name: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            cpu_vendor: String::new(),
            cpus: 1,
            memory_total_bytes: 1 << 30,
            memory_free_bytes: 0,
            version: "0".into(),
            protocol_version: 1,
            mgmt_addr: String::new(),
            migration_addr: String::new(),
            peers: Vec::new(),
        }
    }
}
