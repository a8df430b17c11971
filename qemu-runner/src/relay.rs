//! The migration-link relay: every node's migration NIC is a QEMU `-netdev
//! stream` connection to this relay, one Unix socket per node in the
//! cluster's state directory (`link-NAME.sock`), and the relay forwards the
//! Ethernet frames between them in QEMU's framing (u32 big-endian length,
//! then the frame). `cluster up` starts it as a background `qemu-runner`
//! process (`cluster relay`, hidden) before the nodes, for any number of
//! nodes.
//!
//! Why a relay rather than QEMU sockets joined directly: the runner must be
//! able to cut one node's link and restore it (`cluster link cut|restore`,
//! the migration tests' fault injection on the real link), must see and
//! refuse anything else that tries to join, and a node restarted by
//! `cluster start` must find its link again (QEMU 7.2's stream backend does
//! not reconnect, but a restarted QEMU connects afresh to its socket).
//!
//! Invariants:
//! * Only the nodes the runner started take part. A connection on node N's
//!   socket is attached only if its peer process (`SO_PEERCRED`) is the pid
//!   the runner registered for N (`expect N PID`) and runs under the relay's
//!   own uid. A connection from any other process is never read from: it
//!   waits at most [`Timing::pending_max`] for its pid to be registered
//!   (QEMU connects before the runner, which only learns the pid when the
//!   process exists, can register it), then is closed and counted as
//!   refused. The sockets are mode 0600 in the 0700 state directory.
//! * One connection per node: attaching a node's new connection (a restarted
//!   QEMU) closes the previous one.
//! * Forwarding: a frame addressed to a node's MAC goes to that node only;
//!   broadcast, multicast and unknown destinations go to every other node.
//! * A cut node neither sends nor receives: its frames are read and dropped
//!   (so its QEMU never blocks), frames for it are dropped and its queue is
//!   emptied, as if its cable were pulled. `restore` resumes forwarding. A
//!   cut belongs to the node's port and outlives its restart.
//! * No peer stalls the others: each node has its own bounded output queue
//!   ([`Timing::queue_bytes`]) and writer thread. A full queue whose node
//!   took a frame within [`Timing::stall`] is waited for (back-pressure: a
//!   busy node that reads loses nothing, as on QEMU's direct TCP link); a
//!   node that has not taken a frame for that long has what is sent to it
//!   dropped and counted, so the sender goes on serving everyone else.
//!
//! Control: one request line per connection on `relay.sock` (same uid only),
//! answered with one line, `ok`, `ok JSON` or `error MESSAGE`:
//! `expect NAME PID`, `cut NAME`, `restore NAME`, `status` (JSON: a
//! [`PortStatus`] per node).

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Largest frame forwarded (QEMU 7.2's stream/socket backends send at most
/// 69632 bytes; Ethernet frames on the link are at most 1514). A longer
/// length prefix is not QEMU's framing: the connection is closed.
pub const FRAME_MAX: usize = 69632;
/// The control socket's file name in the state directory.
pub const CONTROL_SOCKET: &str = "relay.sock";
/// Connections waiting for their pid's registration, per node; more are
/// refused at once.
pub const PENDING_PER_PORT: usize = 4;
/// Time a control client has to send its request and take the answer.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes the writer hands to one `write` system call.
const WRITE_BATCH: usize = 64 * 1024;
/// How often the acceptor polls its listeners and expires waiting
/// connections.
const POLL: Duration = Duration::from_millis(10);

/// Node `name`'s link socket file name (relative to the state directory).
pub fn link_socket_name(name: &str) -> String {
    format!("link-{name}.sock")
}

/// The relay's time and space limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timing {
    /// A node that has not taken a frame for this long while its queue is
    /// full has frames for it dropped instead of waited for.
    pub stall: Duration,
    /// Longest wait of an unregistered connection before it is refused.
    pub pending_max: Duration,
    /// Bytes queued per node (frames with their length prefix).
    pub queue_bytes: usize,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            // Longer than a busy node's pause between polls of its NIC,
            // short enough that a stuck peer costs the others one hiccup.
            stall: Duration::from_millis(500),
            // `cluster up` registers a node right after spawning it.
            pending_max: Duration::from_secs(10),
            // Far above what the nodes' TCP windows keep in flight.
            queue_bytes: 1 << 20,
        }
    }
}

/// One node's port: its name and its migration NIC's MAC address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub name: String,
    pub mac: [u8; 6],
}

/// One node's link as `status` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortStatus {
    pub name: String,
    /// The registered pid.
    pub expected_pid: Option<u32>,
    /// The pid of the attached connection (none: the node is not linked).
    pub connected_pid: Option<u32>,
    pub cut: bool,
    /// Frames the node sent, and frames delivered to it.
    pub frames_in: u64,
    pub frames_out: u64,
    /// Frames for this node dropped because it stopped reading (a cut's
    /// drops are not counted).
    pub dropped: u64,
    /// Connections refused on this node's socket.
    pub refused: u64,
    /// Connections waiting for their pid's registration.
    pub pending: usize,
}

/// A control request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlRequest {
    Expect { node: String, pid: u32 },
    Cut { node: String },
    Restore { node: String },
    Status,
}

impl ControlRequest {
    /// Parse one request line.
    pub fn parse(line: &str) -> Result<Self, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["expect", node, pid] => Ok(Self::Expect {
                node: node.to_string(),
                pid: pid
                    .parse()
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| format!("bad pid {pid:?}"))?,
            }),
            ["cut", node] => Ok(Self::Cut {
                node: node.to_string(),
            }),
            ["restore", node] => Ok(Self::Restore {
                node: node.to_string(),
            }),
            ["status"] => Ok(Self::Status),
            _ => Err(format!(
                "unknown request {:?} (expect NAME PID | cut NAME | restore NAME | status)",
                line.chars().take(80).collect::<String>()
            )),
        }
    }

    /// The request line (without the newline).
    pub fn line(&self) -> String {
        match self {
            Self::Expect { node, pid } => format!("expect {node} {pid}"),
            Self::Cut { node } => format!("cut {node}"),
            Self::Restore { node } => format!("restore {node}"),
            Self::Status => "status".into(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking relay thread leaves consistent data behind (every
    // critical section is a few assignments): keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A socket path the kernel accepts: `dir/name` itself when it fits
/// `sun_path` (108 bytes with its NUL), else the same file reached through
/// `/proc/self/fd/N/name` with `N` the returned open directory (keep it open
/// while using the path).
pub fn socket_path(dir: &Path, name: &str) -> Result<(PathBuf, Option<File>), String> {
    let full = dir.join(name);
    if full.as_os_str().len() < 100 {
        return Ok((full, None));
    }
    let d = File::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let short = PathBuf::from(format!("/proc/self/fd/{}/{name}", d.as_raw_fd()));
    Ok((short, Some(d)))
}

/// The peer process of a Unix socket: `(pid, uid)`.
pub fn peer_credentials(s: &UnixStream) -> Option<(u32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(SO_PEERCRED) writes at most `len` bytes (the size
    // of `cred`, a live local) into `cred` and updates `len`; the
    // descriptor is borrowed from `s` and open for the whole call.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast::<libc::c_void>(),
            &raw mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some((cred.pid as u32, cred.uid))
}

fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Per-node counters, shared by the port and its connections.
#[derive(Default)]
struct Counters {
    frames_in: AtomicU64,
    frames_out: AtomicU64,
    dropped: AtomicU64,
    refused: AtomicU64,
}

/// An attached node connection's output side.
struct OutQueue {
    /// Frames with their length prefix, shared between destinations.
    frames: VecDeque<Arc<Vec<u8>>>,
    bytes: usize,
    /// The node last took a frame (or its queue last went from empty to
    /// non-empty) at this instant.
    progress: Instant,
    cut: bool,
    closed: bool,
}

struct Conn {
    id: u64,
    pid: u32,
    stream: UnixStream,
    queue: Mutex<OutQueue>,
    /// The writer waits here for frames.
    ready: Condvar,
    /// Senders wait here for room.
    room: Condvar,
    counters: Arc<Counters>,
}

impl Conn {
    /// Queue `frame` for this node (see the module doc for when it waits
    /// and when it drops).
    fn push(&self, frame: &Arc<Vec<u8>>, timing: &Timing) {
        let mut q = lock(&self.queue);
        loop {
            if q.closed || q.cut {
                return;
            }
            if q.frames.is_empty() || q.bytes + frame.len() <= timing.queue_bytes {
                if q.frames.is_empty() {
                    q.progress = Instant::now();
                }
                q.bytes += frame.len();
                q.frames.push_back(Arc::clone(frame));
                self.ready.notify_one();
                return;
            }
            let idle = q.progress.elapsed();
            if idle >= timing.stall {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            q = self
                .room
                .wait_timeout(q, timing.stall - idle)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn set_cut(&self, cut: bool) {
        let mut q = lock(&self.queue);
        q.cut = cut;
        if cut {
            q.frames.clear();
            q.bytes = 0;
        }
        self.room.notify_all();
    }

    fn close(&self) {
        let mut q = lock(&self.queue);
        q.closed = true;
        q.frames.clear();
        q.bytes = 0;
        drop(q);
        self.ready.notify_all();
        self.room.notify_all();
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

struct Pending {
    stream: UnixStream,
    pid: u32,
    since: Instant,
}

struct Port {
    spec: PortSpec,
    expected_pid: Option<u32>,
    cut: bool,
    conn: Option<Arc<Conn>>,
    pending: Vec<Pending>,
    counters: Arc<Counters>,
}

struct State {
    ports: Vec<Port>,
    next_conn: u64,
}

struct Shared {
    timing: Timing,
    state: Mutex<State>,
    stop: AtomicBool,
}

/// A running relay (threads in this process). [`Relay::stop`] (or drop)
/// ends it.
pub struct Relay {
    shared: Arc<Shared>,
    dir: PathBuf,
    names: Vec<String>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Bind `dir/link-NAME.sock` for every port and `dir/relay.sock`, and
    /// start serving.
    pub fn start(dir: &Path, ports: Vec<PortSpec>, timing: Timing) -> Result<Self, String> {
        if ports.is_empty() {
            return Err("the relay needs at least one node".into());
        }
        for (i, p) in ports.iter().enumerate() {
            if ports[..i]
                .iter()
                .any(|q| q.name == p.name || q.mac == p.mac)
            {
                return Err(format!("node {} is named twice", p.name));
            }
        }
        let bind = |name: &str| -> Result<UnixListener, String> {
            let (path, _dir) = socket_path(dir, name)?;
            let _ = fs::remove_file(&path);
            let l = UnixListener::bind(&path)
                .map_err(|e| format!("{}: {e}", dir.join(name).display()))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("{}: {e}", dir.join(name).display()))?;
            l.set_nonblocking(true)
                .map_err(|e| format!("{}: {e}", dir.join(name).display()))?;
            Ok(l)
        };
        let mut listeners = Vec::new();
        for p in &ports {
            listeners.push(bind(&link_socket_name(&p.name))?);
        }
        let control = bind(CONTROL_SOCKET)?;
        let names = ports.iter().map(|p| p.name.clone()).collect();
        let shared = Arc::new(Shared {
            timing,
            state: Mutex::new(State {
                ports: ports
                    .into_iter()
                    .map(|spec| Port {
                        spec,
                        expected_pid: None,
                        cut: false,
                        conn: None,
                        pending: Vec::new(),
                        counters: Arc::default(),
                    })
                    .collect(),
                next_conn: 0,
            }),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name("relay-accept".into())
            .spawn(move || accept_loop(&s, &listeners, &control))
            .map_err(|e| format!("starting the relay: {e}"))?;
        Ok(Self {
            shared,
            dir: dir.to_path_buf(),
            names,
            acceptor: Some(acceptor),
        })
    }

    /// Serve one control request (as the control socket would).
    pub fn request(&self, req: &ControlRequest) -> Result<String, String> {
        handle_control(&self.shared, req)
    }

    /// Every node's link.
    pub fn status(&self) -> Vec<PortStatus> {
        status(&self.shared)
    }

    /// Stop serving: close every connection and remove the sockets.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let mut st = lock(&self.shared.state);
        for p in &mut st.ports {
            if let Some(c) = p.conn.take() {
                c.close();
            }
            for w in p.pending.drain(..) {
                let _ = w.stream.shutdown(Shutdown::Both);
            }
        }
        drop(st);
        for n in self
            .names
            .iter()
            .map(|n| link_socket_name(n))
            .chain([CONTROL_SOCKET.to_string()])
        {
            if let Ok((path, _d)) = socket_path(&self.dir, &n) {
                let _ = fs::remove_file(path);
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(shared: &Arc<Shared>, listeners: &[UnixListener], control: &UnixListener) {
    while !shared.stop.load(Ordering::SeqCst) {
        for (i, l) in listeners.iter().enumerate() {
            while let Ok((s, _)) = l.accept() {
                new_connection(shared, i, s);
            }
        }
        while let Ok((s, _)) = control.accept() {
            let sh = Arc::clone(shared);
            let _ = std::thread::Builder::new()
                .name("relay-control".into())
                .spawn(move || serve_control(&sh, s));
        }
        expire_pending(shared);
        std::thread::sleep(POLL);
    }
}

fn refuse(counters: &Counters, s: &UnixStream) {
    counters.refused.fetch_add(1, Ordering::Relaxed);
    let _ = s.shutdown(Shutdown::Both);
}

fn new_connection(shared: &Arc<Shared>, port: usize, s: UnixStream) {
    let mut st = lock(&shared.state);
    let p = &mut st.ports[port];
    let counters = Arc::clone(&p.counters);
    let creds = peer_credentials(&s).filter(|&(_, uid)| uid == own_uid());
    let (Some((pid, _)), Ok(())) = (creds, s.set_nonblocking(false)) else {
        refuse(&counters, &s);
        return;
    };
    if p.expected_pid == Some(pid) {
        attach(shared, &mut st, port, s, pid);
    } else if p.pending.len() >= PENDING_PER_PORT {
        refuse(&counters, &s);
    } else {
        p.pending.push(Pending {
            stream: s,
            pid,
            since: Instant::now(),
        });
    }
}

fn expire_pending(shared: &Shared) {
    let max = shared.timing.pending_max;
    let mut st = lock(&shared.state);
    for p in &mut st.ports {
        let counters = Arc::clone(&p.counters);
        p.pending.retain(|w| {
            let keep = w.since.elapsed() < max;
            if !keep {
                refuse(&counters, &w.stream);
            }
            keep
        });
    }
}

/// Make `s` node `port`'s connection (closing any previous one) and start
/// its reader and writer threads.
fn attach(shared: &Arc<Shared>, st: &mut State, port: usize, s: UnixStream, pid: u32) {
    let id = st.next_conn;
    st.next_conn += 1;
    let p = &mut st.ports[port];
    let (Ok(reader), Ok(writer)) = (s.try_clone(), s.try_clone()) else {
        refuse(&p.counters, &s);
        return;
    };
    let conn = Arc::new(Conn {
        id,
        pid,
        stream: s,
        queue: Mutex::new(OutQueue {
            frames: VecDeque::new(),
            bytes: 0,
            progress: Instant::now(),
            cut: p.cut,
            closed: false,
        }),
        ready: Condvar::new(),
        room: Condvar::new(),
        counters: Arc::clone(&p.counters),
    });
    if let Some(old) = p.conn.replace(Arc::clone(&conn)) {
        old.close();
    }
    let name = p.spec.name.clone();
    let (sh, c) = (Arc::clone(shared), Arc::clone(&conn));
    let spawned = std::thread::Builder::new()
        .name(format!("relay-rx-{name}"))
        .spawn(move || read_loop(&sh, port, &c, reader))
        .and_then(|_| {
            let c = Arc::clone(&conn);
            std::thread::Builder::new()
                .name(format!("relay-tx-{name}"))
                .spawn(move || write_loop(&c, writer))
        });
    if spawned.is_err() {
        conn.close();
    }
}

/// Read node `port`'s frames and hand each to its destinations' queues.
fn read_loop(shared: &Shared, port: usize, conn: &Arc<Conn>, stream: UnixStream) {
    // Frames are small: read them out of 64 KiB chunks, not one system call
    // each.
    let mut stream = std::io::BufReader::with_capacity(64 * 1024, stream);
    loop {
        let mut len = [0u8; 4];
        if stream.read_exact(&mut len).is_err() {
            break;
        }
        let n = u32::from_be_bytes(len) as usize;
        if n > FRAME_MAX {
            break;
        }
        let mut frame = vec![0u8; 4 + n];
        frame[..4].copy_from_slice(&len);
        if stream.read_exact(&mut frame[4..]).is_err() {
            break;
        }
        let frame = Arc::new(frame);
        let dests: Vec<Arc<Conn>> = {
            let st = lock(&shared.state);
            let me = &st.ports[port];
            if me.conn.as_ref().is_none_or(|c| c.id != conn.id) {
                break; // replaced by a newer connection
            }
            me.counters.frames_in.fetch_add(1, Ordering::Relaxed);
            if me.cut {
                continue;
            }
            let dst: Option<[u8; 6]> = frame.get(4..10).and_then(|d| d.try_into().ok());
            let to = dst.and_then(|d| st.ports.iter().position(|p| p.spec.mac == d));
            st.ports
                .iter()
                .enumerate()
                .filter(|&(i, p)| i != port && !p.cut && to.is_none_or(|t| t == i))
                .filter_map(|(_, p)| p.conn.clone())
                .collect()
        };
        for d in dests {
            d.push(&frame, &shared.timing);
        }
    }
    let mut st = lock(&shared.state);
    let me = &mut st.ports[port];
    if me.conn.as_ref().is_some_and(|c| c.id == conn.id) {
        me.conn = None;
    }
    drop(st);
    conn.close();
}

/// Write a node's queued frames to it, as many as are queued (up to
/// [`WRITE_BATCH`] bytes) in one system call.
fn write_loop(conn: &Conn, mut stream: UnixStream) {
    let mut batch: Vec<u8> = Vec::with_capacity(WRITE_BATCH + 4 + FRAME_MAX);
    loop {
        batch.clear();
        let mut frames = 0u64;
        {
            let mut q = lock(&conn.queue);
            loop {
                if q.closed {
                    return;
                }
                if !q.frames.is_empty() {
                    break;
                }
                q = conn.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            while batch.len() < WRITE_BATCH {
                let Some(f) = q.frames.pop_front() else { break };
                q.bytes -= f.len();
                batch.extend_from_slice(&f);
                frames += 1;
            }
        }
        // Room freed: senders waiting for it may go on.
        conn.room.notify_all();
        if stream.write_all(&batch).is_err() {
            conn.close();
            return;
        }
        conn.counters
            .frames_out
            .fetch_add(frames, Ordering::Relaxed);
        lock(&conn.queue).progress = Instant::now();
        conn.room.notify_all();
    }
}

fn port_index(st: &State, node: &str) -> Result<usize, String> {
    st.ports
        .iter()
        .position(|p| p.spec.name == node)
        .ok_or_else(|| {
            let names: Vec<&str> = st.ports.iter().map(|p| p.spec.name.as_str()).collect();
            format!("no node {node:?} on the link (nodes: {})", names.join(", "))
        })
}

fn status(shared: &Shared) -> Vec<PortStatus> {
    let st = lock(&shared.state);
    st.ports
        .iter()
        .map(|p| PortStatus {
            name: p.spec.name.clone(),
            expected_pid: p.expected_pid,
            connected_pid: p.conn.as_ref().map(|c| c.pid),
            cut: p.cut,
            frames_in: p.counters.frames_in.load(Ordering::Relaxed),
            frames_out: p.counters.frames_out.load(Ordering::Relaxed),
            dropped: p.counters.dropped.load(Ordering::Relaxed),
            refused: p.counters.refused.load(Ordering::Relaxed),
            pending: p.pending.len(),
        })
        .collect()
}

fn handle_control(shared: &Arc<Shared>, req: &ControlRequest) -> Result<String, String> {
    match req {
        ControlRequest::Status => serde_json::to_string(&status(shared)).map_err(|e| e.to_string()),
        ControlRequest::Expect { node, pid } => {
            let mut st = lock(&shared.state);
            let i = port_index(&st, node)?;
            let p = &mut st.ports[i];
            p.expected_pid = Some(*pid);
            if p.conn.as_ref().is_some_and(|c| c.pid != *pid) {
                if let Some(old) = p.conn.take() {
                    old.close();
                }
            }
            if let Some(w) = p.pending.iter().position(|w| w.pid == *pid) {
                let w = p.pending.remove(w);
                attach(shared, &mut st, i, w.stream, *pid);
            }
            Ok(String::new())
        }
        ControlRequest::Cut { node } | ControlRequest::Restore { node } => {
            let cut = matches!(req, ControlRequest::Cut { .. });
            let mut st = lock(&shared.state);
            let i = port_index(&st, node)?;
            let p = &mut st.ports[i];
            p.cut = cut;
            if let Some(c) = &p.conn {
                c.set_cut(cut);
            }
            Ok(String::new())
        }
    }
}

fn serve_control(shared: &Arc<Shared>, s: UnixStream) {
    if peer_credentials(&s).is_none_or(|(_, uid)| uid != own_uid()) {
        return;
    }
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(CONTROL_TIMEOUT));
    let _ = s.set_write_timeout(Some(CONTROL_TIMEOUT));
    let Ok(w) = s.try_clone() else { return };
    let mut line = String::new();
    let mut r = BufReader::new(s.take(256));
    if r.read_line(&mut line).is_err() {
        return;
    }
    let answer = match ControlRequest::parse(&line).and_then(|q| handle_control(shared, &q)) {
        Ok(body) if body.is_empty() => "ok\n".to_string(),
        Ok(body) => format!("ok {body}\n"),
        Err(e) => format!("error {}\n", e.replace('\n', " ")),
    };
    let mut w = w;
    let _ = w.write_all(answer.as_bytes());
}

/// Send `req` to the relay serving `dir`; its answer's body.
pub fn control(dir: &Path, req: &ControlRequest) -> Result<String, String> {
    let (path, _d) = socket_path(dir, CONTROL_SOCKET)?;
    let mut s = UnixStream::connect(&path).map_err(|e| {
        format!(
            "the link relay ({}): {e}",
            dir.join(CONTROL_SOCKET).display()
        )
    })?;
    s.set_read_timeout(Some(CONTROL_TIMEOUT))
        .and_then(|_| s.set_write_timeout(Some(CONTROL_TIMEOUT)))
        .map_err(|e| format!("the link relay: {e}"))?;
    s.write_all(format!("{}\n", req.line()).as_bytes())
        .map_err(|e| format!("the link relay: {e}"))?;
    let mut answer = String::new();
    BufReader::new(s.take(1 << 20))
        .read_line(&mut answer)
        .map_err(|e| format!("the link relay: {e}"))?;
    let answer = answer.trim_end();
    if answer == "ok" {
        Ok(String::new())
    } else if let Some(body) = answer.strip_prefix("ok ") {
        Ok(body.to_string())
    } else if let Some(e) = answer.strip_prefix("error ") {
        Err(format!("the link relay: {e}"))
    } else {
        Err(format!("the link relay gave no answer to {:?}", req.line()))
    }
}

/// [`control`] with `status`, parsed.
pub fn control_status(dir: &Path) -> Result<Vec<PortStatus>, String> {
    let body = control(dir, &ControlRequest::Status)?;
    serde_json::from_str(&body).map_err(|e| format!("the link relay's status: {e}"))
}

/// `cluster relay`: serve until killed.
pub fn run(dir: &Path, ports: Vec<PortSpec>) -> Result<(), String> {
    let _relay = Relay::start(dir, ports, Timing::default())?;
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(i: u8) -> [u8; 6] {
        [0x52, 0x54, 0, 0, 1, i]
    }

    fn ports(n: u8) -> Vec<PortSpec> {
        (1..=n)
            .map(|i| PortSpec {
                name: char::from(b'a' + i - 1).to_string(),
                mac: mac(i),
            })
            .collect()
    }

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Self {
            let d = std::env::temp_dir().join(format!("hvm-relay-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn fast() -> Timing {
        Timing {
            stall: Duration::from_millis(200),
            pending_max: Duration::from_millis(300),
            queue_bytes: 64 * 1024,
        }
    }

    /// A frame from `src` to `dst` (node index 1..) with a payload tag.
    fn frame(dst: [u8; 6], src: u8, tag: u32, len: usize) -> Vec<u8> {
        let mut f = Vec::with_capacity(4 + len);
        f.extend_from_slice(&(len as u32).to_be_bytes());
        f.extend_from_slice(&dst);
        f.extend_from_slice(&mac(src));
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(&tag.to_be_bytes());
        f.resize(4 + len, 0xee);
        f
    }

    const BCAST: [u8; 6] = [0xff; 6];

    /// Connect as node `name` (this process's pid, registered first).
    fn join(relay: &Relay, dir: &Path, name: &str) -> UnixStream {
        relay
            .request(&ControlRequest::Expect {
                node: name.into(),
                pid: std::process::id(),
            })
            .unwrap();
        let s = UnixStream::connect(dir.join(link_socket_name(name))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        wait_for(relay, |st| {
            st.iter()
                .any(|p| p.name == name && p.connected_pid.is_some())
        });
        s
    }

    fn wait_for(relay: &Relay, what: impl Fn(&[PortStatus]) -> bool) {
        let end = Instant::now() + Duration::from_secs(5);
        while !what(&relay.status()) {
            assert!(
                Instant::now() < end,
                "relay never got there: {:?}",
                relay.status()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Read one frame's tag (`None` on timeout or close).
    fn recv_tag(s: &mut UnixStream) -> Option<u32> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).ok()?;
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut f).ok()?;
        Some(u32::from_be_bytes(f[14..18].try_into().ok()?))
    }

    fn silent(s: &mut UnixStream, for_ms: u64) -> bool {
        s.set_read_timeout(Some(Duration::from_millis(for_ms)))
            .unwrap();
        let got = recv_tag(s);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        got.is_none()
    }

    #[test]
    fn forwards_unicast_to_its_node_and_broadcast_to_all_others() {
        let d = Dir::new("fwd");
        let relay = Relay::start(&d.0, ports(3), fast()).unwrap();
        let (mut a, mut b, mut c) = (
            join(&relay, &d.0, "a"),
            join(&relay, &d.0, "b"),
            join(&relay, &d.0, "c"),
        );
        a.write_all(&frame(mac(2), 1, 7, 60)).unwrap();
        assert_eq!(recv_tag(&mut b), Some(7));
        assert!(silent(&mut c, 200), "unicast to b reached c");
        c.write_all(&frame(BCAST, 3, 8, 1514)).unwrap();
        assert_eq!(recv_tag(&mut a), Some(8));
        assert_eq!(recv_tag(&mut b), Some(8));
        assert!(silent(&mut c, 100), "a broadcast came back to its sender");
        wait_for(&relay, |st| st[0].frames_out == 1);
        let st = relay.status();
        assert_eq!((st[0].frames_in, st[0].frames_out), (1, 1));
        assert_eq!((st[2].frames_in, st[2].frames_out), (1, 0));
        // Not QEMU's framing: that connection is closed.
        a.write_all(&(FRAME_MAX as u32 + 1).to_be_bytes()).unwrap();
        assert!(closed(&mut a));
        wait_for(&relay, |st| st[0].connected_pid.is_none());
    }

    #[test]
    fn cut_drops_both_ways_and_restore_resumes() {
        let d = Dir::new("cut");
        let relay = Relay::start(&d.0, ports(3), fast()).unwrap();
        let (mut a, mut b, mut c) = (
            join(&relay, &d.0, "a"),
            join(&relay, &d.0, "b"),
            join(&relay, &d.0, "c"),
        );
        control_ok(&d.0, "cut b");
        assert!(relay.status()[1].cut);
        a.write_all(&frame(mac(2), 1, 1, 100)).unwrap();
        a.write_all(&frame(BCAST, 1, 2, 100)).unwrap();
        b.write_all(&frame(mac(1), 2, 3, 100)).unwrap();
        b.write_all(&frame(BCAST, 2, 4, 100)).unwrap();
        // c still hears a's broadcast; b hears nothing, nobody hears b.
        assert_eq!(recv_tag(&mut c), Some(2));
        assert!(silent(&mut b, 300), "a cut node received a frame");
        assert!(silent(&mut a, 100), "a cut node's frame got through");
        assert!(silent(&mut c, 100), "a cut node's broadcast got through");
        wait_for(&relay, |st| st[1].frames_in == 2);
        control_ok(&d.0, "restore b");
        b.write_all(&frame(mac(1), 2, 5, 100)).unwrap();
        assert_eq!(recv_tag(&mut a), Some(5));
        a.write_all(&frame(mac(2), 1, 6, 100)).unwrap();
        assert_eq!(recv_tag(&mut b), Some(6), "restored: b hears a again");
        // Dropped by the cut is not "dropped because it stopped reading".
        assert_eq!(relay.status()[1].dropped, 0);
        // Control errors are answered, not fatal.
        let err = control(&d.0, &ControlRequest::parse("cut z").unwrap()).unwrap_err();
        assert!(err.contains("no node \"z\""), "{err}");
        assert!(ControlRequest::parse("cut").is_err());
        assert!(ControlRequest::parse("expect a 0").is_err());
    }

    fn control_ok(dir: &Path, line: &str) {
        control(dir, &ControlRequest::parse(line).unwrap()).unwrap();
    }

    #[test]
    fn a_cut_outlives_a_restart_of_the_node() {
        let d = Dir::new("restart");
        let relay = Relay::start(&d.0, ports(2), fast()).unwrap();
        let mut a = join(&relay, &d.0, "a");
        let b = join(&relay, &d.0, "b");
        control_ok(&d.0, "cut b");
        drop(b); // the node dies
        wait_for(&relay, |st| st[1].connected_pid.is_none());
        let mut b = join(&relay, &d.0, "b"); // and boots again
        a.write_all(&frame(mac(2), 1, 1, 100)).unwrap();
        assert!(silent(&mut b, 300));
        control_ok(&d.0, "restore b");
        a.write_all(&frame(mac(2), 1, 2, 100)).unwrap();
        assert_eq!(recv_tag(&mut b), Some(2));
    }

    #[test]
    fn a_node_that_stops_reading_does_not_stall_the_others() {
        let d = Dir::new("stall");
        let timing = fast();
        let relay = Relay::start(&d.0, ports(3), timing.clone()).unwrap();
        let mut a = join(&relay, &d.0, "a");
        let mut b = join(&relay, &d.0, "b");
        let _c = join(&relay, &d.0, "c"); // never reads
                                          // Broadcasts fill c's queue and its socket buffer many times over;
                                          // b, which reads, must get every one of them, promptly.
        let count: u32 = 3000;
        let sender = std::thread::spawn(move || {
            for t in 0..count {
                a.write_all(&frame(BCAST, 1, t, 1514)).unwrap();
            }
            a
        });
        let start = Instant::now();
        for t in 0..count {
            assert_eq!(recv_tag(&mut b), Some(t), "b lost or reordered a frame");
        }
        let took = start.elapsed();
        let _a = sender.join().unwrap();
        // One stall interval at most, plus the copying itself.
        assert!(
            took < timing.stall * 2 + Duration::from_secs(3),
            "b waited {took:?} behind c"
        );
        // The counter moves just after the write that b has already read.
        wait_for(&relay, |st| st[1].frames_out == u64::from(count));
        let st = relay.status();
        assert!(st[2].dropped > 0, "{st:?}");
        assert_eq!(st[1].dropped, 0, "{st:?}");
    }

    #[test]
    fn a_slow_reader_gets_back_pressure_not_loss() {
        let d = Dir::new("slow");
        // The stall limit is far above the reader's pauses even when a loaded
        // machine does not schedule it for a while: this test is about
        // back-pressure, not about giving up on a stopped reader.
        let timing = Timing {
            stall: Duration::from_secs(10),
            ..fast()
        };
        let relay = Relay::start(&d.0, ports(2), timing).unwrap();
        let mut a = join(&relay, &d.0, "a");
        let mut b = join(&relay, &d.0, "b");
        let count: u32 = 400; // 600 KB: ten times b's queue
        let sender = std::thread::spawn(move || {
            for t in 0..count {
                a.write_all(&frame(mac(2), 1, t, 1514)).unwrap();
            }
        });
        for t in 0..count {
            if t % 40 == 0 {
                std::thread::sleep(Duration::from_millis(20)); // slow, not stopped
            }
            assert_eq!(recv_tag(&mut b), Some(t));
        }
        sender.join().unwrap();
        assert_eq!(relay.status()[1].dropped, 0);
    }

    #[test]
    fn unknown_connections_are_refused() {
        let d = Dir::new("refuse");
        let relay = Relay::start(&d.0, ports(2), fast()).unwrap();
        let mut a = join(&relay, &d.0, "a");
        // Node b is registered as another process: a connection from this
        // one is never attached, never read, and closed after pending_max.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        control_ok(&d.0, &format!("expect b {}", other.id()));
        let mut intruder = UnixStream::connect(d.0.join(link_socket_name("b"))).unwrap();
        intruder
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = intruder.write_all(&frame(mac(1), 2, 66, 100));
        a.write_all(&frame(mac(2), 1, 1, 100)).unwrap();
        assert!(silent(&mut a, 200), "an unknown peer's frame got through");
        assert_eq!(relay.status()[1].pending, 1);
        assert_eq!(recv_tag(&mut intruder), None, "the relay closed it");
        let st = relay.status();
        assert_eq!((st[1].refused, st[1].pending), (1, 0), "{st:?}");
        assert_eq!(st[1].connected_pid, None);
        // More than PENDING_PER_PORT at once: the extra ones at once, the
        // others when their time is up.
        let waiting: Vec<UnixStream> = (0..PENDING_PER_PORT + 2)
            .map(|_| UnixStream::connect(d.0.join(link_socket_name("b"))).unwrap())
            .collect();
        wait_for(&relay, |st| st[1].refused >= 3);
        assert_eq!(relay.status()[1].pending, PENDING_PER_PORT);
        wait_for(&relay, |st| st[1].pending == 0);
        assert_eq!(relay.status()[1].refused, 3 + PENDING_PER_PORT as u64);
        drop(waiting);
        // Registration after connecting (QEMU is faster than the runner):
        // the waiting connection is attached then.
        let mut b = UnixStream::connect(d.0.join(link_socket_name("b"))).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        wait_for(&relay, |st| st[1].pending == 1);
        let _ = other.kill();
        let _ = other.wait();
        control_ok(&d.0, &format!("expect b {}", std::process::id()));
        let me = Some(std::process::id());
        wait_for(&relay, |st| st[1].connected_pid == me);
        b.write_all(&frame(mac(1), 2, 9, 100)).unwrap();
        assert_eq!(recv_tag(&mut a), Some(9));
        // A new connection of the registered process (a restarted node)
        // replaces the old one, which is closed.
        let mut again = UnixStream::connect(d.0.join(link_socket_name("a"))).unwrap();
        again
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert!(closed(&mut a), "the replaced connection stays open");
        b.write_all(&frame(mac(1), 2, 10, 100)).unwrap();
        assert_eq!(recv_tag(&mut again), Some(10));
    }

    /// Whether the relay closed `s` (a read returns end of file).
    fn closed(s: &mut UnixStream) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    }

    #[test]
    fn socket_paths_of_any_length() {
        let d = Dir::new("long");
        let deep = d.0.join("x".repeat(60)).join("y".repeat(60));
        fs::create_dir_all(&deep).unwrap();
        let relay = Relay::start(&deep, ports(1), fast()).unwrap();
        assert_eq!(control_status(&deep).unwrap()[0].name, "a");
        drop(relay);
        assert!(control_status(&deep).is_err());
        assert!(Relay::start(&d.0, Vec::new(), fast()).is_err());
    }
}
