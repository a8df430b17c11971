//! Host simulation of a live migration with real threads and real time.
//!
//! - Source: a 64 MiB guest image (a quarter of it data, the rest zero
//!   pages) in atomics, with a dirty log (one bit per page) that the
//!   "hardware" sets after each write, as write-protected nested page
//!   tables would.
//! - Guest: a std thread writing one byte in each page of a working set, in
//!   a loop, at a settable rate scaled by `(100 - throttle) / 100`; pausing
//!   waits for its current batch to finish.
//! - Link: a pair of channels with a bandwidth limit on the source's sends
//!   and an optional failure after N bytes.
//! - Destination: a `Receiver` in its own thread writing into a Vec<u8>.
//!
//! The assertions are what an operator would check: the migration
//! completes (or is cancelled / fails as it should), the destination's
//! memory equals the source's memory at the moment it was paused, the
//! digest was verified, and after any failure the source runs on with its
//! memory untouched.

use migration::policy::{NS_PER_MS, NS_PER_S};
use migration::{
    DestinationVm, DeviceState, DirtyBitmap, MigratableVm, Migration, MigrationError,
    MigrationReport, MigrationResult, Page, Policy, Progress, ReceiveOutcome, Receiver,
    RecvProgress, Transport, TransportError, VcpuState, VmConfig, VmError, PAGE_SIZE,
};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::*};
use std::sync::mpsc::{channel, Receiver as Rx, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const RAM_BYTES: u64 = 64 << 20;
const PAGES: u64 = RAM_BYTES / PAGE_SIZE as u64;
const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;

/// Guest memory and the dirty log, shared by the guest thread and the VM
/// handle the engine uses.
struct Guest {
    words: Vec<AtomicU64>,
    dirty: Vec<AtomicU64>,
    logging: AtomicBool,
    paused: AtomicBool,
    throttle: AtomicU8,
    /// Page writes per second at throttle 0.
    rate: AtomicU64,
    working_set: (u64, u64),
    stop: AtomicBool,
    /// Held by the guest thread while it writes a batch.
    running: Mutex<()>,
    writes: AtomicU64,
}

impl Guest {
    fn new(working_set: (u64, u64)) -> Arc<Self> {
        let words: Vec<AtomicU64> = (0..PAGES as usize * WORDS_PER_PAGE)
            .map(|i| {
                let page = (i / WORDS_PER_PAGE) as u64;
                // Data in the first quarter of RAM; zero pages elsewhere.
                let v = if page < PAGES / 4 {
                    (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
                } else {
                    0
                };
                AtomicU64::new(v)
            })
            .collect();
        Arc::new(Guest {
            words,
            dirty: (0..PAGES.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            logging: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            throttle: AtomicU8::new(0),
            rate: AtomicU64::new(0),
            working_set,
            stop: AtomicBool::new(false),
            running: Mutex::new(()),
            writes: AtomicU64::new(0),
        })
    }

    fn image(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RAM_BYTES as usize);
        for w in &self.words {
            out.extend_from_slice(&w.load(Acquire).to_le_bytes());
        }
        out
    }

    /// The guest: one byte in every page of the working set, in a loop.
    fn spawn(self: &Arc<Self>) -> thread::JoinHandle<()> {
        let g = self.clone();
        thread::spawn(move || {
            let (first, count) = g.working_set;
            let mut next = 0u64;
            let mut counter = 0u64;
            let mut last = Instant::now();
            let mut credit = 0f64;
            while !g.stop.load(Acquire) {
                thread::sleep(Duration::from_micros(200));
                let now = Instant::now();
                let dt = now.duration_since(last).as_secs_f64();
                last = now;
                let _batch = g.running.lock().unwrap();
                if g.paused.load(Acquire) {
                    credit = 0.0;
                    continue;
                }
                let pct = f64::from(100 - g.throttle.load(Acquire).min(100)) / 100.0;
                credit += g.rate.load(Acquire) as f64 * pct * dt;
                while credit >= 1.0 {
                    credit -= 1.0;
                    counter += 1;
                    let page = first + next;
                    next = (next + 1) % count;
                    let byte = (counter * 8 + 3) as usize % PAGE_SIZE;
                    let w = &g.words[page as usize * WORDS_PER_PAGE + byte / 8];
                    let mut bytes = w.load(Relaxed).to_le_bytes();
                    bytes[byte % 8] = (counter as u8) | 1;
                    w.store(u64::from_le_bytes(bytes), Release);
                    // The write-protection fault marks the page dirty.
                    if g.logging.load(Acquire) {
                        g.dirty[(page / 64) as usize].fetch_or(1 << (page % 64), AcqRel);
                    }
                    g.writes.fetch_add(1, Relaxed);
                }
            }
        })
    }
}

/// The handle the engine drives (what the hypervisor will implement).
struct SimVm {
    guest: Arc<Guest>,
    at_pause: Option<Vec<u8>>,
    resumed: u32,
}

impl MigratableVm for SimVm {
    fn config(&self) -> VmConfig {
        let mut c = migration::fuzzing::sample_config();
        c.ram_bytes = RAM_BYTES;
        c
    }
    fn read_page(&mut self, gfn: u64, buf: &mut Page) -> Result<(), VmError> {
        let start = usize::try_from(gfn).map_err(|_| VmError::at("gfn", gfn))? * WORDS_PER_PAGE;
        let words = self
            .guest
            .words
            .get(start..start + WORDS_PER_PAGE)
            .ok_or(VmError::at("gfn", gfn))?;
        for (dst, w) in buf.chunks_exact_mut(8).zip(words) {
            dst.copy_from_slice(&w.load(Acquire).to_le_bytes());
        }
        Ok(())
    }
    fn start_dirty_log(&mut self) -> Result<&'static str, VmError> {
        self.guest.logging.store(true, Release);
        Ok("test-log")
    }
    fn collect_dirty(&mut self, out: &mut DirtyBitmap) -> Result<(), VmError> {
        let words: Vec<u64> = self.guest.dirty.iter().map(|w| w.swap(0, AcqRel)).collect();
        out.union_words(0, &words);
        Ok(())
    }
    fn stop_dirty_log(&mut self) {
        self.guest.logging.store(false, Release);
    }
    fn set_throttle(&mut self, pct: u8) {
        self.guest.throttle.store(pct, Release);
    }
    fn pause(&mut self) -> Result<(), VmError> {
        self.guest.paused.store(true, Release);
        // Wait for the batch in progress: after this, memory is frozen.
        drop(self.guest.running.lock().unwrap());
        self.at_pause = Some(self.guest.image());
        Ok(())
    }
    fn resume(&mut self) {
        self.guest.paused.store(false, Release);
        self.resumed += 1;
    }
    fn save_vcpus(&mut self) -> Result<Vec<VcpuState>, VmError> {
        Ok((0..2).map(migration::fuzzing::sample_vcpu).collect())
    }
    fn save_devices(&mut self) -> Result<Vec<DeviceState>, VmError> {
        Ok(self
            .config()
            .devices
            .iter()
            .map(|d| DeviceState {
                kind: d.kind,
                instance: d.instance,
                version: d.version,
                payload: vec![9; 200],
            })
            .collect())
    }
}

#[derive(Default)]
struct SimDest {
    mem: Vec<u8>,
    running: bool,
    discarded: bool,
    vcpus: usize,
}

impl SimDest {
    fn page_mut(&mut self, gfn: u64) -> Result<&mut [u8], VmError> {
        let start = gfn as usize * PAGE_SIZE;
        self.mem
            .get_mut(start..start + PAGE_SIZE)
            .ok_or(VmError::at("gfn", gfn))
    }
}

impl DestinationVm for SimDest {
    fn prepare(&mut self, config: &VmConfig) -> Result<(), VmError> {
        self.mem = vec![0; config.ram_bytes as usize];
        Ok(())
    }
    fn write_page(&mut self, gfn: u64, data: &Page) -> Result<(), VmError> {
        self.page_mut(gfn)?.copy_from_slice(data);
        Ok(())
    }
    fn zero_page(&mut self, gfn: u64) -> Result<(), VmError> {
        self.page_mut(gfn)?.fill(0);
        Ok(())
    }
    fn read_page(&mut self, gfn: u64, buf: &mut Page) -> Result<(), VmError> {
        buf.copy_from_slice(self.page_mut(gfn)?);
        Ok(())
    }
    fn restore_vcpus(&mut self, vcpus: &[VcpuState]) -> Result<(), VmError> {
        self.vcpus = vcpus.len();
        Ok(())
    }
    fn restore_devices(&mut self, _devices: &[DeviceState]) -> Result<(), VmError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.running = true;
        Ok(())
    }
    fn discard(&mut self) {
        self.discarded = true;
        self.mem = Vec::new();
    }
}

/// One end of the simulated link.
struct Link {
    tx: Option<Sender<Vec<u8>>>,
    rx: Rx<Vec<u8>>,
    pending: Vec<u8>,
    pos: usize,
    bytes_per_s: u64,
    start: Instant,
    sent: u64,
    fail: Fail,
}

/// When the source's end of the link breaks.
#[derive(Clone)]
enum Fail {
    Never,
    /// After this many bytes (the crossing send delivers its prefix).
    AfterBytes(u64),
    /// At the first send once the guest is paused (during switch-over).
    WhenPaused(Arc<Guest>),
}

fn link(bytes_per_s: u64, fail: Fail) -> (Link, Link) {
    let (atx, brx) = channel();
    let (btx, arx) = channel();
    let end = |tx, rx, fail| Link {
        tx: Some(tx),
        rx,
        pending: Vec::new(),
        pos: 0,
        bytes_per_s,
        start: Instant::now(),
        sent: 0,
        fail,
    };
    (end(atx, arx, fail), end(btx, brx, Fail::Never))
}

impl Transport for Link {
    fn send(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        let tx = self
            .tx
            .as_ref()
            .ok_or(TransportError::Broken("link down"))?;
        let mut n = bytes.len();
        let limit = match &self.fail {
            Fail::Never => None,
            Fail::AfterBytes(n) => Some(*n),
            Fail::WhenPaused(g) => g.paused.load(Acquire).then_some(self.sent),
        };
        if let Some(limit) = limit {
            if self.sent + n as u64 > limit {
                n = (limit - self.sent) as usize;
                let _ = tx.send(bytes[..n].to_vec());
                self.tx = None; // The peer sees the channel close.
                return Err(TransportError::Broken("injected failure"));
            }
        }
        self.sent += n as u64;
        // Bandwidth: this byte may leave no earlier than sent / rate.
        let due = Duration::from_nanos(self.sent * NS_PER_S / self.bytes_per_s);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            thread::sleep(wait);
        }
        tx.send(bytes.to_vec()).map_err(|_| TransportError::Closed)
    }

    fn send_window(&self) -> usize {
        usize::MAX // `send` blocks for bandwidth.
    }

    fn acked_bytes(&self) -> u64 {
        // `send` returns once the link took the bytes at its rate.
        self.sent
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        if self.pos == self.pending.len() {
            match self.rx.try_recv() {
                Ok(v) => {
                    self.pending = v;
                    self.pos = 0;
                }
                Err(TryRecvError::Empty) => return Ok(0),
                Err(TryRecvError::Disconnected) => return Err(TransportError::Closed),
            }
        }
        let n = buf.len().min(self.pending.len() - self.pos);
        buf[..n].copy_from_slice(&self.pending[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Nanoseconds since `start`.
fn now_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

struct Outcome {
    report: MigrationReport,
    error: Option<MigrationError>,
    vm: SimVm,
    received: ReceiveOutcome,
    dest: SimDest,
}

/// Migrate `vm` to a fresh destination over a link of `bytes_per_s`, in
/// verification mode (every migration test checks the whole memory at
/// switch-over).
fn migrate(vm: SimVm, policy: Policy, bytes_per_s: u64, fail: Fail) -> Outcome {
    let policy = Policy {
        verify_memory: true,
        ..policy
    };
    let (src_end, dst_end) = link(bytes_per_s, fail);
    let start = Instant::now();
    let dest_thread = thread::spawn(move || {
        let mut dest = SimDest::default();
        let mut dst_end = dst_end;
        let mut rx = Receiver::new(now_ns(start));
        loop {
            match rx.step(&mut dest, &mut dst_end, now_ns(start)) {
                RecvProgress::Finished(_) => break,
                RecvProgress::Waiting => thread::sleep(Duration::from_micros(50)),
                RecvProgress::Busy => {}
            }
        }
        (rx.outcome().clone(), dest)
    });
    let mut vm = vm;
    let mut src_end = src_end;
    let mut mig = Migration::new(&vm, policy, now_ns(start));
    loop {
        match mig.step(&mut vm, &mut src_end, now_ns(start)) {
            Progress::Finished(_) => break,
            Progress::Waiting { max_ns } => {
                thread::sleep(Duration::from_nanos(max_ns.clamp(50_000, NS_PER_MS)))
            }
            Progress::Busy => {}
        }
    }
    let report = mig.report().clone();
    let error = mig.error().cloned();
    drop(src_end); // Lets a waiting destination see the end of the channel.
    let (received, dest) = dest_thread.join().unwrap();
    println!("migration-report {}", report.to_json());
    Outcome {
        report,
        error,
        vm,
        received,
        dest,
    }
}

fn fresh(working_set: (u64, u64), rate: u64) -> (Arc<Guest>, thread::JoinHandle<()>, SimVm) {
    let guest = Guest::new(working_set);
    guest.rate.store(rate, Release);
    let t = guest.spawn();
    let vm = SimVm {
        guest: guest.clone(),
        at_pause: None,
        resumed: 0,
    };
    (guest, t, vm)
}

fn stop(guest: &Guest, t: thread::JoinHandle<()>) {
    guest.stop.store(true, Release);
    t.join().unwrap();
}

fn assert_completed_with_exact_image(o: &Outcome) {
    assert_eq!(o.report.result, MigrationResult::Completed, "{:?}", o.error);
    assert_eq!(
        o.received.result,
        MigrationResult::Completed,
        "{:?}",
        o.received.error
    );
    assert!(o.received.verified_digest.is_some(), "digest verified");
    assert!(
        o.report.verified && o.received.memory_verified,
        "memory verified"
    );
    assert!(o.dest.running && o.dest.vcpus == 2);
    let at_pause = o.vm.at_pause.as_ref().expect("paused");
    assert!(
        o.dest.mem == *at_pause,
        "destination image differs from the source at pause time"
    );
    assert!(
        o.vm.guest.paused.load(Acquire),
        "source stays paused, released for removal"
    );
}

fn assert_back_at_source(o: &Outcome) {
    assert!(!o.vm.guest.paused.load(Acquire), "source runs");
    assert_eq!(o.vm.guest.throttle.load(Acquire), 0, "throttle removed");
    assert!(!o.vm.guest.logging.load(Acquire), "dirty log stopped");
    assert!(!o.dest.running, "destination must not run");
}

const LINK: u64 = 64 << 20;

#[test]
fn idle_vm_costs_data_pages_plus_markers() {
    let (guest, t, vm) = fresh((0, 1), 0);
    let original = guest.image();
    let o = migrate(vm, Policy::default(), LINK, Fail::Never);
    stop(&guest, t);
    assert_completed_with_exact_image(&o);
    assert!(o.dest.mem == original);
    let r = &o.report;
    assert_eq!(r.zero_pages, PAGES * 3 / 4);
    assert_eq!(r.pages_per_pass, vec![PAGES, 0]);
    assert!((r.bytes_sent as f64) <= 1.1 * RAM_BYTES as f64);
    // Data pages once, plus framing and markers: < 1% overhead.
    let data = RAM_BYTES / 4;
    assert!(
        r.bytes_sent <= data + data / 100,
        "{} bytes for {} data bytes",
        r.bytes_sent,
        data
    );
}

#[test]
fn busy_vm_converges_and_the_destination_matches_the_paused_source() {
    // 4 MiB working set rewritten at 10k pages/s.
    let (guest, t, vm) = fresh((1024, 1024), 10_000);
    let policy = Policy {
        timeout_ns: 60 * NS_PER_S,
        ..Policy::default()
    };
    let o = migrate(vm, policy, LINK, Fail::Never);
    stop(&guest, t);
    assert_completed_with_exact_image(&o);
    assert!(o.report.passes >= 2, "{:?}", o.report);
    assert!(guest.writes.load(Relaxed) > 0);
}

#[test]
fn too_fast_dirtier_is_throttled_then_completes() {
    // Rewrites an 8 MiB working set at 200k pages/s: faster than the link
    // (16k pages/s) can follow, so passes stop shrinking.
    let (guest, t, vm) = fresh((0, 2048), 200_000);
    let policy = Policy {
        downtime_limit_ns: 50 * NS_PER_MS,
        timeout_ns: 120 * NS_PER_S,
        ..Policy::default()
    };
    let o = migrate(vm, policy, LINK, Fail::Never);
    stop(&guest, t);
    assert_completed_with_exact_image(&o);
    assert!(o.report.throttle_pct >= 50, "{:?}", o.report);
    let p = &o.report.pages_per_pass;
    assert!(p[1] >= 1024, "the dirtier outran the link at first: {p:?}");
    assert!(*p.last().unwrap() < p[1], "{p:?}");
}

#[test]
fn throttle_slows_the_dirtier() {
    let (guest, t, _vm) = fresh((0, 4096), 100_000);
    let rate = |pct: u8| {
        guest.throttle.store(pct, Release);
        thread::sleep(Duration::from_millis(20));
        // Divide by the time that really passed: on a loaded machine a
        // 200 ms sleep can last much longer.
        let (before, start) = (guest.writes.load(Relaxed), Instant::now());
        thread::sleep(Duration::from_millis(200));
        let (after, took) = (guest.writes.load(Relaxed), start.elapsed());
        (after - before) as f64 / took.as_secs_f64()
    };
    let full = rate(0);
    let slowed = rate(80);
    stop(&guest, t);
    assert!(full > 50_000.0, "{full}");
    assert!(slowed < full * 0.4, "{slowed} vs {full}");
}

#[test]
fn injected_failure_then_a_second_migration_completes() {
    let (guest, t, vm) = fresh((0, 1), 0);
    let original = guest.image();
    let o = migrate(vm, Policy::default(), LINK, Fail::AfterBytes(8 << 20));
    assert_eq!(o.report.result, MigrationResult::Failed);
    assert_eq!(
        o.report.error.as_deref(),
        Some("transport failed: injected failure")
    );
    assert!(o
        .report
        .to_json()
        .contains("\"result\":\"failed\",\"error\":\"transport failed: injected failure\""));
    assert_back_at_source(&o);
    assert_eq!(o.received.result, MigrationResult::Failed);
    assert!(o.dest.discarded);
    assert!(guest.image() == original, "source memory untouched");
    assert_eq!(o.vm.resumed, 0, "never paused, nothing to resume");

    // Second attempt: the link dies during switch-over, after the pause.
    let o = migrate(
        o.vm,
        Policy::default(),
        LINK,
        Fail::WhenPaused(guest.clone()),
    );
    assert_eq!(o.report.result, MigrationResult::Failed);
    assert!(o.vm.at_pause.is_some(), "it got as far as the pause");
    assert_eq!(o.vm.resumed, 1, "the source was resumed");
    assert_back_at_source(&o);
    assert!(o.dest.discarded);
    assert!(guest.image() == original, "source memory untouched");

    // Third attempt, now with a running guest, completes.
    guest.rate.store(10_000, Release);
    let o = migrate(o.vm, Policy::default(), LINK, Fail::Never);
    stop(&guest, t);
    assert_completed_with_exact_image(&o);
}

#[test]
fn timeout_cancels_and_the_source_keeps_running() {
    let (guest, t, vm) = fresh((0, 512), 5_000);
    let policy = Policy {
        timeout_ns: NS_PER_S,
        ..Policy::default()
    };
    let o = migrate(vm, policy, 4 << 20, Fail::Never);
    stop(&guest, t);
    assert_eq!(
        o.report.result,
        MigrationResult::Cancelled,
        "{:?}",
        o.report
    );
    assert!(matches!(
        o.error,
        Some(MigrationError::Timeout { limit_ms: 1000 })
    ));
    assert_back_at_source(&o);
    assert_eq!(o.received.result, MigrationResult::Cancelled);
    assert!(o.dest.discarded);
}
