//! The link benchmark (`bench-link-receive`, `bench-link-send`): jobs that
//! measure the migration link, raw frames first, then one TCP stream.
//!
//! Each job is a step-wise state machine driven once per node loop round
//! ([`LinkBench::drive`]) over a [`SocketPump`], the same byte mover the
//! management server uses:
//! * receive: a pump on a listener at `port`; count what arrives (the bytes
//!   are dropped) until `bytes` came, the stream ended, or it stalled;
//! * send: raw frames (one blocking platform call, timed by the platform),
//!   then connect to `peer:port` and, every round, fill the socket's send
//!   buffer through the pump (so the stack, not this job, sets the pace)
//!   until `bytes` were sent and acknowledged.
//!
//! Both sides report the migration NIC's counters over their TCP phase
//! (frames each way, stack polls, device notifications, bad checksums):
//! few frames per poll on the sender means the node loop, not the link,
//! sets the pace.
//!
//! A job ends exactly once (completed, failed, or cancelled through the job
//! table) and releases its socket then. A stream that moves nothing for
//! [`BENCH_STALL_NS`] fails, so no job holds a socket for ever.

use super::jobs::JobTable;
use super::proto::{parse_ipv4, ApiError, Body, ErrorCode, JobKind, Outcome};
use crate::pump::SocketPump;
use alloc::format;
use alloc::vec::Vec;
use hvcore::host::{Host, NetStack, NicRole, NicStats, TcpState};

/// Most bytes one benchmark stream carries.
pub const BENCH_BYTES_MAX: u64 = 1 << 30;
/// Most raw frames one benchmark sends.
pub const BENCH_FRAMES_MAX: u64 = 1_000_000;
/// Size of a raw benchmark frame (a full Ethernet frame).
pub const BENCH_FRAME_BYTES: usize = 1514;
/// A benchmark stream that moves nothing for this long fails.
pub const BENCH_STALL_NS: u64 = 10_000_000_000;
/// Receive buffer of the receiving pump (drained every round).
const RECV_BUFFER_BYTES: usize = 64 * 1024;
/// Send queue of the sending pump (topped up every round).
const SEND_QUEUE_BYTES: usize = 64 * 1024;
/// What the sender sends.
const FILL: [u8; 8192] = [0x5a; 8192];

fn err(code: ErrorCode, message: impl Into<alloc::string::String>) -> Outcome {
    Outcome::Error(ApiError::new(code, message))
}

fn mb_per_s(bytes: u64, ns: u64) -> u64 {
    let r = u128::from(bytes) * 1000 / u128::from(ns.max(1));
    u64::try_from(r).unwrap_or(u64::MAX)
}

/// The migration NIC's counters now.
fn mig_stats(net: &dyn NetStack) -> NicStats {
    net.stats(NicRole::Migration).unwrap_or_default()
}

/// What the migration NIC did between `before` and `after`, as
/// `key=value` words short enough for a job's result text: frames out and
/// in, stack polls, device notifications (both queues), TCP frames dropped
/// for a bad checksum.
fn stack_counters(before: &NicStats, after: &NicStats) -> alloc::string::String {
    let d = |f: fn(&NicStats) -> u64| f(after).saturating_sub(f(before));
    format!(
        "out={} in={} polls={} kicks={} csum_bad={}",
        d(|s| s.tx_frames),
        d(|s| s.rx_frames),
        d(|s| s.polls),
        d(|s| s.tx_kicks) + d(|s| s.rx_kicks),
        d(|s| s.rx_bad_checksums),
    )
}

fn job_outcome(jobs: &JobTable, job: u64, now: u64) -> Outcome {
    match jobs.info(job, now) {
        Some(j) => Outcome::Ok(Body::Job(j)),
        None => Outcome::Ok(Body::Done),
    }
}

/// One benchmark job's side of the work.
#[derive(Debug)]
enum Work {
    Receive(ReceiveJob),
    Send(SendJob),
}

/// The node's running link benchmark jobs.
#[derive(Debug, Default)]
pub struct LinkBench {
    work: Vec<Work>,
}

impl LinkBench {
    /// No benchmark running.
    pub fn new() -> Self {
        Self::default()
    }
    /// Whether a benchmark is under way (the node loop must not idle).
    pub fn is_active(&self) -> bool {
        !self.work.is_empty()
    }

    /// `bench-link-receive`: listen on the migration NIC at `port`.
    pub fn receive(
        &mut self,
        jobs: &mut JobTable,
        host: &mut dyn Host,
        port: u16,
        bytes: u64,
    ) -> Outcome {
        if bytes == 0 || bytes > BENCH_BYTES_MAX || port == 0 {
            return err(
                ErrorCode::InvalidArgument,
                "bytes must be 1 B to 1 GiB, port non-zero",
            );
        }
        let now = host.now_ns();
        let Some(net) = host.net() else {
            return err(ErrorCode::Unsupported, "this node has no network");
        };
        let socket = match net.tcp_listen(NicRole::Migration, port) {
            Ok(s) => s,
            Err(e) => return err(ErrorCode::NoResources, format!("cannot listen: {e}")),
        };
        let pump = SocketPump::new(socket, RECV_BUFFER_BYTES, 0, now);
        match jobs.submit(JobKind::LinkBench, "", bytes, true, now) {
            Ok(job) => {
                self.work.push(Work::Receive(ReceiveJob {
                    job,
                    pump,
                    port,
                    first: None,
                }));
                job_outcome(jobs, job, now)
            }
            Err(_) => {
                pump.release(net);
                err(ErrorCode::NoResources, "the job table is full")
            }
        }
    }

    /// `bench-link-send`: raw frames, then `bytes` over TCP to `peer:port`.
    pub fn send(
        &mut self,
        jobs: &mut JobTable,
        host: &mut dyn Host,
        peer: &str,
        port: u16,
        bytes: u64,
        frames: u64,
    ) -> Outcome {
        let Some(addr) = parse_ipv4(peer) else {
            return err(ErrorCode::InvalidArgument, "peer must be an IPv4 address");
        };
        if bytes == 0 || bytes > BENCH_BYTES_MAX || frames > BENCH_FRAMES_MAX || port == 0 {
            return err(
                ErrorCode::InvalidArgument,
                format!(
                    "bytes must be 1 B to 1 GiB, frames at most {BENCH_FRAMES_MAX}, port non-zero"
                ),
            );
        }
        if host.net().is_none() {
            return err(ErrorCode::Unsupported, "this node has no network");
        }
        let now = host.now_ns();
        match jobs.submit(JobKind::LinkBench, "", bytes, true, now) {
            Ok(job) => {
                self.work.push(Work::Send(SendJob {
                    job,
                    peer: addr,
                    port,
                    frames,
                    raw: None,
                    pump: None,
                    queued: 0,
                    start: None,
                }));
                job_outcome(jobs, job, now)
            }
            Err(_) => err(ErrorCode::NoResources, "the job table is full"),
        }
    }

    /// Advance every benchmark job one step (call every loop round); a job
    /// that ended releases its socket.
    pub fn drive(&mut self, jobs: &mut JobTable, host: &mut dyn Host) {
        if self.work.is_empty() {
            return;
        }
        let now = host.now_ns();
        for mut w in core::mem::take(&mut self.work) {
            let goes_on = match &mut w {
                Work::Receive(r) => r.step(jobs, host, now),
                Work::Send(s) => s.step(jobs, host, now),
            };
            if goes_on {
                self.work.push(w);
                continue;
            }
            let pump = match w {
                Work::Receive(r) => Some(r.pump),
                Work::Send(s) => s.pump,
            };
            if let (Some(p), Some(net)) = (pump, host.net()) {
                p.release(net);
            }
        }
    }
}

/// The receiving side.
#[derive(Debug)]
struct ReceiveJob {
    job: u64,
    /// Made on the listener: it moves bytes once a peer connected.
    pump: SocketPump,
    port: u16,
    /// When the first bytes arrived, and the NIC's counters then.
    first: Option<(u64, NicStats)>,
}

impl ReceiveJob {
    /// One step; false once the job has ended.
    fn step(&mut self, jobs: &mut JobTable, host: &mut dyn Host, now: u64) -> bool {
        let job = self.job;
        let Some(net) = host.net() else {
            return false;
        };
        if !jobs.is_running(job) {
            return false;
        }
        let pump = &mut self.pump;
        // Drain what arrived: the bytes only count.
        loop {
            let n = pump.read(net, now);
            if n == 0 {
                break;
            }
            if self.first.is_none() {
                self.first = Some((now, mig_stats(net)));
            }
            pump.consume(n);
        }
        let received = pump.received_total();
        jobs.progress(job, received, None);
        let total = jobs.info(job, now).map_or(0, |j| j.bytes_total);
        if received >= total || pump.peer_done() || pump.is_broken() {
            let (first_ns, before) = self.first.unwrap_or((now, NicStats::default()));
            let ns = now.saturating_sub(first_ns);
            let after = mig_stats(net);
            let text = format!(
                "received {received} bytes on port {} in {} ms: tcp_mb_per_s={}; raw benchmark frames received so far: {}; {}",
                self.port,
                ns / 1_000_000,
                mb_per_s(received, ns),
                after.rx_bench_frames,
                stack_counters(&before, &after),
            );
            if received >= total {
                jobs.complete(job, Some(&text), now);
            } else if pump.is_broken() && received == 0 {
                jobs.fail(job, "the stream was reset before any data", now);
            } else {
                jobs.fail(job, &format!("stream ended early: {text}"), now);
            }
            return false;
        }
        if self.first.is_some() && now.saturating_sub(pump.last_progress_ns()) > BENCH_STALL_NS {
            jobs.fail(job, "the stream stalled for 10 s", now);
            return false;
        }
        true
    }
}

/// The sending side.
#[derive(Debug)]
struct SendJob {
    job: u64,
    peer: [u8; 4],
    port: u16,
    frames: u64,
    /// Raw frames sent and the nanoseconds they took.
    raw: Option<(u64, u64)>,
    /// Made when the TCP phase starts.
    pump: Option<SocketPump>,
    /// Bytes queued into the pump so far.
    queued: u64,
    /// When the stream opened, and the NIC's counters then.
    start: Option<(u64, NicStats)>,
}

impl SendJob {
    /// One step; false once the job has ended.
    fn step(&mut self, jobs: &mut JobTable, host: &mut dyn Host, now: u64) -> bool {
        let job = self.job;
        if !jobs.is_running(job) {
            return false;
        }
        let Some(net) = host.net() else {
            return false;
        };
        // Phase 1: raw frames (blocking, measured by the platform).
        if self.raw.is_none() {
            match net.raw_bench_send(NicRole::Migration, self.frames, BENCH_FRAME_BYTES) {
                Ok(ns) => self.raw = Some((self.frames, ns)),
                Err(e) => {
                    jobs.fail(job, &format!("raw frames: {e}"), now);
                    return false;
                }
            }
            return true;
        }
        // Phase 2: TCP. The connect timeout counts from the first TCP step
        // (the raw phase took the node's time before it).
        if self.pump.is_none() {
            match net.tcp_connect(NicRole::Migration, self.peer, self.port) {
                Ok(id) => self.pump = Some(SocketPump::new(id, 0, SEND_QUEUE_BYTES, now)),
                Err(e) => {
                    jobs.fail(job, &format!("cannot connect: {e}"), now);
                    return false;
                }
            }
        }
        let Some(pump) = self.pump.as_mut() else {
            return false;
        };
        let total = jobs.info(job, now).map_or(0, |j| j.bytes_total);
        match pump.state(net) {
            TcpState::Open | TcpState::PeerClosed if !pump.is_broken() => {}
            TcpState::Connecting | TcpState::Listening => {
                if now.saturating_sub(pump.last_progress_ns()) > BENCH_STALL_NS {
                    jobs.fail(job, "the peer did not accept within 10 s", now);
                    return false;
                }
                return true;
            }
            _ => {
                let sent = pump.sent_total();
                let msg = format!("the connection closed after {sent} of {total} bytes");
                jobs.fail(job, &msg, now);
                return false;
            }
        }
        let (start_ns, before) = *self.start.get_or_insert_with(|| (now, mig_stats(net)));
        // Fill the socket's send buffer: the next poll sends as much as the
        // window and the device take.
        loop {
            while self.queued < total && pump.send_room() > 0 {
                let want = (total - self.queued).min(FILL.len() as u64) as usize;
                self.queued += pump.queue(&FILL[..want]) as u64;
            }
            if pump.flush(net, now) == 0 || pump.queued() > 0 {
                break;
            }
        }
        let sent = pump.sent_total();
        jobs.progress(job, sent, None);
        if sent >= total && pump.queued() == 0 && pump.unacked(net) == 0 {
            let ns = now.saturating_sub(start_ns);
            let (n, raw_ns) = self.raw.unwrap_or((0, 1));
            let raw_bytes = n * BENCH_FRAME_BYTES as u64;
            let text = format!(
                "tcp_bytes={total} tcp_ms={} tcp_mb_per_s={} raw_frames={n} raw_frame_bytes={BENCH_FRAME_BYTES} raw_ms={} raw_mb_per_s={} raw_frames_per_s={} {}",
                ns / 1_000_000,
                mb_per_s(total, ns),
                raw_ns / 1_000_000,
                mb_per_s(raw_bytes, raw_ns),
                u128::from(n) * 1_000_000_000 / u128::from(raw_ns.max(1)),
                stack_counters(&before, &mig_stats(net)),
            );
            jobs.complete(job, Some(&text), now);
            host.console_write(&format!("bench link: {text}\n"));
            return false;
        }
        if now.saturating_sub(pump.last_progress_ns()) > BENCH_STALL_NS {
            jobs.fail(job, "the stream stalled for 10 s", now);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::proto::{JobState, Request};
    use super::super::rig::Rig;
    use super::*;
    use hvcore::host::SocketId;

    fn code(o: &Outcome) -> Option<ErrorCode> {
        match o {
            Outcome::Error(e) => Some(e.code),
            Outcome::Ok(_) => None,
        }
    }

    #[test]
    fn link_bench_jobs_measure_and_report() {
        let mut r = Rig::new();
        let o = r.node.handle(
            &mut r.host,
            Request::BenchLinkReceive {
                port: 7100,
                bytes: 100_000,
            },
        );
        let Outcome::Ok(Body::Job(rx)) = o else {
            panic!("{o:?}")
        };
        let o = r.node.handle(
            &mut r.host,
            Request::BenchLinkSend {
                peer: "192.168.100.2".into(),
                port: 7100,
                bytes: 100_000,
                frames: 50,
            },
        );
        let Outcome::Ok(Body::Job(tx)) = o else {
            panic!("{o:?}")
        };
        assert!(r.node.has_bench_work());
        // Fake wire: move the sender's bytes into the receiver's socket.
        let rx_sock = r.net().peer_connect(7100).unwrap();
        for _ in 0..20 {
            r.round();
            let tx_sock: Vec<u32> = r
                .net()
                .sockets
                .iter()
                .filter(|(_, s)| s.remote.is_some() && !s.tx.is_empty())
                .map(|(id, _)| *id)
                .collect();
            for id in tx_sock {
                let bytes = r.net().peer_take(SocketId(id));
                r.net().peer_send(rx_sock, &bytes);
            }
            r.host.clock.set(r.host.now_ns() + 1_000_000);
        }
        let now = r.host.now_ns();
        let t = r.node.jobs().info(tx.id, now).unwrap();
        assert_eq!(t.state, JobState::Completed, "{t:?}");
        let text = t.result.unwrap();
        assert!(
            text.contains("tcp_bytes=100000") && text.contains("raw_frames=50"),
            "{text}"
        );
        assert!(text.contains("raw_mb_per_s=1514"), "{text}");
        // The stack's counters over the TCP phase (the fake's are zero).
        assert!(
            text.ends_with(" out=0 in=0 polls=0 kicks=0 csum_bad=0"),
            "{text}"
        );
        let j = r.node.jobs().info(rx.id, now).unwrap();
        assert_eq!(
            (j.state, j.bytes_done, j.percent),
            (JobState::Completed, 100_000, 100)
        );
        assert!(!r.node.has_bench_work());
        assert!(r.host.console.contains("bench link: tcp_bytes=100000"));
        // Bad arguments and a node without a network.
        let bad = Request::BenchLinkSend {
            peer: "300.1.1.1".into(),
            port: 1,
            bytes: 1,
            frames: 1,
        };
        assert_eq!(
            code(&r.node.handle(&mut r.host, bad)),
            Some(ErrorCode::InvalidArgument)
        );
        r.host.net = None;
        let o = r
            .node
            .handle(&mut r.host, Request::BenchLinkReceive { port: 1, bytes: 1 });
        assert_eq!(code(&o), Some(ErrorCode::Unsupported));
    }

    #[test]
    fn streams_that_stall_or_reset_fail_and_release_their_sockets() {
        let mut r = Rig::new();
        let send = Request::BenchLinkSend {
            peer: "192.168.100.2".into(),
            port: 7200,
            bytes: 8 << 20,
            frames: 0,
        };
        let Outcome::Ok(Body::Job(tx)) = r.node.handle(&mut r.host, send) else {
            panic!()
        };
        // The receiving peer never reads: the first round fills the socket.
        r.round(); // raw phase
        r.round(); // connect, send what fits
        let sock = r
            .net()
            .sockets
            .iter()
            .find(|(_, s)| s.port == 7200)
            .map(|(id, _)| SocketId(*id))
            .unwrap();
        r.net().peer_window(sock, 0);
        let now = r.host.now_ns();
        let sent = r.node.jobs().info(tx.id, now).unwrap().bytes_done;
        // One round filled the socket's whole send buffer, not just the
        // pump's queue: the stack sets the pace.
        assert_eq!(sent, r.net().socket_buffer as u64);
        assert_eq!(r.net().peer_take(sock).len(), 4 << 20);
        for _ in 0..3 {
            r.round();
        }
        let now = r.host.now_ns();
        assert_eq!(r.node.jobs().info(tx.id, now).unwrap().bytes_done, sent);
        r.advance(BENCH_STALL_NS + 1);
        r.round();
        let now = r.host.now_ns();
        let j = r.node.jobs().info(tx.id, now).unwrap();
        assert_eq!(j.state, JobState::Failed, "{j:?}");
        assert!(j.error.unwrap().contains("stalled"));
        assert!(r.net().released(sock));

        // A receiver whose peer connects and resets.
        let rx = Request::BenchLinkReceive {
            port: 7300,
            bytes: 10,
        };
        let Outcome::Ok(Body::Job(rx)) = r.node.handle(&mut r.host, rx) else {
            panic!()
        };
        let s = r.net().peer_connect(7300).unwrap();
        r.round();
        r.net().sockets.get_mut(&s.0).unwrap().state = TcpState::Closed;
        r.round();
        let now = r.host.now_ns();
        let j = r.node.jobs().info(rx.id, now).unwrap();
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(
            j.error.as_deref(),
            Some("the stream was reset before any data")
        );
        assert!(r.net().released(s));
        assert!(!r.node.has_bench_work());
    }
}
