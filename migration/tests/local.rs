//! Single-threaded, deterministic end-to-end tests: the source engine and
//! the receiver stepped alternately over a `MemPipe` (the in-node local
//! migration shape), with a simulated clock that advances with the bytes
//! sent, and a fake guest that dirties pages at a set rate (slowed by the
//! throttle) whenever the engine touches it.

use migration::policy::{NS_PER_MS, NS_PER_S};
use migration::seal::{End, SealError, SealedLink, Sealer};
use migration::stream::{Record, MAGIC_DEST, SUPPORTED_VERSIONS, UNSEALED_VERSIONS};
use migration::{
    DestinationVm, DeviceState, DigestCheck, DirtyBitmap, MemPipe, MigratableVm, Migration,
    MigrationError, MigrationResult, Page, Policy, Progress, Receiver, RecvProgress, Transport,
    TransportError, VcpuState, VmConfig, VmError, PAGE_SIZE,
};
use std::cell::Cell;
use std::ops::Deref;
use std::rc::Rc;

#[derive(Clone)]
struct SimClock(Rc<Cell<u64>>);

impl SimClock {
    fn idle(&self, max_ns: u64) {
        self.0.set(self.0.get() + max_ns.clamp(1, NS_PER_MS));
    }
}

/// The source engine with the VM and link it is lent on every step, and
/// the simulated clock: what the node's migration job holds.
struct Src<'a, T: Transport> {
    m: Migration,
    vm: &'a mut FakeVm,
    link: T,
    time: Rc<Cell<u64>>,
}

impl<'a, T: Transport> Src<'a, T> {
    fn new(vm: &'a mut FakeVm, link: T, time: &Rc<Cell<u64>>, policy: Policy) -> Self {
        let m = Migration::new(&*vm, policy, time.get());
        Src {
            m,
            vm,
            link,
            time: time.clone(),
        }
    }
    fn step(&mut self) -> Progress {
        self.m.step(&mut *self.vm, &mut self.link, self.time.get())
    }
    fn cancel(&mut self) -> bool {
        self.m
            .cancel(&mut *self.vm, &mut self.link, self.time.get())
    }
}

impl<T: Transport> Deref for Src<'_, T> {
    type Target = Migration;
    fn deref(&self) -> &Migration {
        &self.m
    }
}

/// The receiving engine with its VM and link.
struct Dst<'a, D: DestinationVm, T: Transport> {
    r: Receiver,
    vm: &'a mut D,
    link: T,
    time: Rc<Cell<u64>>,
}

impl<'a, D: DestinationVm, T: Transport> Dst<'a, D, T> {
    fn new(vm: &'a mut D, link: T, time: &Rc<Cell<u64>>) -> Self {
        Dst {
            r: Receiver::new(time.get()),
            vm,
            link,
            time: time.clone(),
        }
    }
    fn with_digest_check(mut self, check: DigestCheck) -> Self {
        self.r = self.r.with_digest_check(check);
        self
    }
    fn step(&mut self) -> RecvProgress {
        self.r.step(&mut *self.vm, &mut self.link, self.time.get())
    }
    fn run_to_completion(&mut self) -> &migration::ReceiveOutcome {
        while !matches!(self.step(), RecvProgress::Finished(_)) {}
        self.r.outcome()
    }
}

impl<D: DestinationVm, T: Transport> Deref for Dst<'_, D, T> {
    type Target = Receiver;
    fn deref(&self) -> &Receiver {
        &self.r
    }
}

/// A `MemPipe` end whose sends take `bytes / bandwidth` of simulated time;
/// sealed (frames with tags, as between nodes) when it has a sealer.
struct SlowPipe {
    pipe: MemPipe,
    time: Rc<Cell<u64>>,
    bytes_per_s: u64,
    seal: Option<(Sealer, Option<SealError>)>,
    /// Sends written in place into the pipe's queue, and receives lent
    /// from it (stream bytes parsed where they lie).
    lent_sends: u64,
    lent_recvs: u64,
}

impl SlowPipe {
    fn raw_send(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        let ns = bytes.len() as u64 * NS_PER_S / self.bytes_per_s;
        self.time.set(self.time.get() + ns.max(1));
        self.pipe.send(bytes)
    }
}

/// The pipe without the sealing (what a [`SealedLink`] runs over).
struct Raw<'a>(&'a mut SlowPipe);

impl Transport for Raw<'_> {
    fn send(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        self.0.raw_send(bytes)
    }
    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        self.0.pipe.recv(buf)
    }
    fn send_window(&self) -> usize {
        self.0.pipe.send_window()
    }
    fn acked_bytes(&self) -> u64 {
        self.0.pipe.acked_bytes()
    }
    /// Into the pipe's queue in place (the time the bytes take counted as
    /// for `send`).
    fn send_with(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Option<Result<(), TransportError>> {
        let mut wrote = 0;
        let r = self.0.pipe.send_with(len, &mut |room| {
            wrote = fill(room);
            wrote
        });
        let ns = wrote as u64 * NS_PER_S / self.0.bytes_per_s;
        self.0.time.set(self.0.time.get() + ns.max(1));
        self.0.lent_sends += 1;
        r
    }
    fn recv_in_place(
        &mut self,
        open: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Option<Result<usize, TransportError>> {
        self.0.pipe.recv_in_place(open)
    }
}

impl SlowPipe {
    /// Run `f` on the sealed view of the pipe (or the pipe itself).
    fn with<R>(&mut self, f: impl FnOnce(&mut dyn Transport) -> R) -> R {
        match self.seal.take() {
            None => f(&mut Raw(self)),
            Some((mut sealer, mut refused)) => {
                let r = f(&mut SealedLink {
                    sealer: &mut sealer,
                    inner: &mut Raw(self),
                    refused: &mut refused,
                });
                self.seal = Some((sealer, refused));
                r
            }
        }
    }
}

impl Transport for SlowPipe {
    fn send(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        self.with(|t| t.send(bytes))
    }
    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        self.with(|t| t.recv(buf))
    }
    fn send_window(&self) -> usize {
        self.pipe.send_window()
    }
    fn acked_bytes(&self) -> u64 {
        self.pipe.acked_bytes()
    }
    fn authenticated(&self) -> bool {
        self.seal.is_some()
    }
    fn send_with(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Option<Result<(), TransportError>> {
        self.with(|t| t.send_with(len, fill))
    }
    fn recv_lent(
        &mut self,
        take: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Option<Result<usize, TransportError>> {
        let r = self.with(|t| t.recv_lent(take));
        if matches!(r, Some(Ok(n)) if n > 0) {
            self.lent_recvs += 1;
        }
        r
    }
}

struct FakeVm {
    cfg: VmConfig,
    mem: Vec<Page>,
    time: Rc<Cell<u64>>,
    /// Guest writes per second at throttle 0, over pages `0..working_set`.
    write_rate: u64,
    working_set: u64,
    last_ns: u64,
    counter: u64,
    log: Option<DirtyBitmap>,
    throttle: u8,
    paused: bool,
    pauses: u32,
    resumes: u32,
    fail_save_vcpus: bool,
    mem_at_pause: Option<Vec<Page>>,
    /// A broken dirty log: writes to this frame are never reported.
    lose_dirty: Option<u64>,
    /// Writes the log lost.
    lost_writes: u64,
    /// Simulated time of the last `stop_dirty_log`.
    log_stopped_ns: Option<u64>,
}

impl FakeVm {
    fn new(time: &Rc<Cell<u64>>, pages: u64) -> Self {
        let mut mem = vec![[0u8; PAGE_SIZE]; pages as usize];
        // Every fourth page carries data; the rest stay zero.
        for (g, p) in mem.iter_mut().enumerate().filter(|(g, _)| g % 4 == 0) {
            for (i, b) in p.iter_mut().enumerate() {
                *b = (i as u64 ^ (g as u64 * 0x9e37)) as u8 | 1;
            }
        }
        let mut cfg = migration::fuzzing::sample_config();
        cfg.ram_bytes = pages * PAGE_SIZE as u64;
        FakeVm {
            cfg,
            mem,
            time: time.clone(),
            write_rate: 0,
            working_set: pages,
            last_ns: time.get(),
            counter: 0,
            log: None,
            throttle: 0,
            paused: false,
            pauses: 0,
            resumes: 0,
            fail_save_vcpus: false,
            mem_at_pause: None,
            lose_dirty: None,
            lost_writes: 0,
            log_stopped_ns: None,
        }
    }

    /// Let the guest run up to the current simulated time.
    fn run_guest(&mut self) {
        let now = self.time.get();
        let dt = now.saturating_sub(self.last_ns);
        self.last_ns = now;
        if self.paused || self.write_rate == 0 {
            return;
        }
        let writes = self.write_rate * dt / NS_PER_S * u64::from(100 - self.throttle) / 100;
        for _ in 0..writes {
            self.counter += 1;
            let g = (self.counter * 7919) % self.working_set;
            let off = (self.counter % PAGE_SIZE as u64) as usize;
            self.mem[g as usize][off] = (self.counter as u8) | 1;
            if let Some(log) = &mut self.log {
                if self.lose_dirty == Some(g) {
                    self.lost_writes += 1;
                } else {
                    log.set(g);
                }
            }
        }
    }
}

impl MigratableVm for FakeVm {
    fn config(&self) -> VmConfig {
        self.cfg.clone()
    }
    fn read_page(&mut self, gfn: u64, buf: &mut Page) -> Result<(), VmError> {
        self.run_guest();
        *buf = *self
            .mem
            .get(gfn as usize)
            .ok_or(VmError::at("gfn out of range", gfn))?;
        Ok(())
    }
    fn start_dirty_log(&mut self) -> Result<&'static str, VmError> {
        self.log = Some(DirtyBitmap::new(self.mem.len() as u64));
        Ok("test-log")
    }
    fn collect_dirty(&mut self, out: &mut DirtyBitmap) -> Result<(), VmError> {
        self.run_guest();
        let log = self.log.as_mut().ok_or(VmError::new("dirty log off"))?;
        out.union_with(log);
        log.clear_all();
        Ok(())
    }
    fn stop_dirty_log(&mut self) {
        self.log = None;
        self.log_stopped_ns = Some(self.time.get());
    }
    fn set_throttle(&mut self, pct: u8) {
        self.run_guest();
        self.throttle = pct;
    }
    fn pause(&mut self) -> Result<(), VmError> {
        self.run_guest();
        self.paused = true;
        self.pauses += 1;
        self.mem_at_pause = Some(self.mem.clone());
        Ok(())
    }
    fn resume(&mut self) {
        self.last_ns = self.time.get();
        self.paused = false;
        self.resumes += 1;
    }
    fn save_vcpus(&mut self) -> Result<Vec<VcpuState>, VmError> {
        if self.fail_save_vcpus {
            return Err(VmError::at("vCPU would not stop", 1));
        }
        Ok((0..self.cfg.vcpus)
            .map(migration::fuzzing::sample_vcpu)
            .collect())
    }
    fn save_devices(&mut self) -> Result<Vec<DeviceState>, VmError> {
        Ok(self
            .cfg
            .devices
            .iter()
            .map(|d| DeviceState {
                kind: d.kind,
                instance: d.instance,
                version: d.version,
                payload: vec![d.kind as u8; 33],
            })
            .collect())
    }
}

#[derive(Default)]
struct FakeDest {
    mem: Vec<Page>,
    prepared: bool,
    vcpus: Vec<VcpuState>,
    devices: Vec<DeviceState>,
    running: bool,
    discarded: bool,
    corrupt_gfn: Option<u64>,
    /// A stray write: writing the first gfn also flips a byte of the second.
    alias: Option<(u64, u64)>,
    refuse_devices: bool,
    fail_resume: bool,
    /// Pages read back (`read_page`).
    reads: u64,
}

impl DestinationVm for FakeDest {
    fn prepare(&mut self, config: &VmConfig) -> Result<(), VmError> {
        self.mem = vec![[0u8; PAGE_SIZE]; config.ram_pages() as usize];
        self.prepared = true;
        Ok(())
    }
    fn write_page(&mut self, gfn: u64, data: &Page) -> Result<(), VmError> {
        let p = self
            .mem
            .get_mut(gfn as usize)
            .ok_or(VmError::at("gfn", gfn))?;
        *p = *data;
        if self.corrupt_gfn == Some(gfn) {
            p[0] ^= 0xff;
        }
        if let Some((w, victim)) = self.alias {
            if w == gfn {
                self.mem[victim as usize][7] ^= 1;
            }
        }
        Ok(())
    }
    fn zero_page(&mut self, gfn: u64) -> Result<(), VmError> {
        *self
            .mem
            .get_mut(gfn as usize)
            .ok_or(VmError::at("gfn", gfn))? = [0; PAGE_SIZE];
        Ok(())
    }
    fn read_page(&mut self, gfn: u64, buf: &mut Page) -> Result<(), VmError> {
        *buf = *self.mem.get(gfn as usize).ok_or(VmError::at("gfn", gfn))?;
        self.reads += 1;
        Ok(())
    }
    fn restore_vcpus(&mut self, vcpus: &[VcpuState]) -> Result<(), VmError> {
        self.vcpus = vcpus.to_vec();
        Ok(())
    }
    fn restore_devices(&mut self, devices: &[DeviceState]) -> Result<(), VmError> {
        if self.refuse_devices {
            return Err(VmError::at("device state version unsupported", 7));
        }
        self.devices = devices.to_vec();
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        if self.fail_resume {
            return Err(VmError::new("vCPU entry failed"));
        }
        self.running = true;
        Ok(())
    }
    fn discard(&mut self) {
        self.discarded = true;
        self.mem.clear();
    }
}

struct Setup {
    time: Rc<Cell<u64>>,
    vm: FakeVm,
    dest: FakeDest,
    policy: Policy,
    bytes_per_s: u64,
    fail_after: Option<u64>,
    check: DigestCheck,
    /// The receiver's test holds (ready, resumed), ns.
    holds: (u64, u64),
    /// Both ends seal the link (stream version 5).
    sealed: bool,
}

impl Setup {
    fn new(pages: u64) -> Self {
        let time = Rc::new(Cell::new(1_000 * NS_PER_S));
        Setup {
            vm: FakeVm::new(&time, pages),
            time,
            dest: FakeDest::default(),
            // Every migration test verifies the memory at switch-over.
            policy: Policy {
                verify_memory: true,
                ..Policy::default()
            },
            bytes_per_s: 100 << 20,
            fail_after: None,
            check: DigestCheck::HashOnWrite,
            holds: (0, 0),
            sealed: false,
        }
    }

    /// Run both sides to the end; returns the two outcomes and the parts.
    fn run(&mut self) -> (Src<'_, SlowPipe>, Dst<'_, FakeDest, SlowPipe>) {
        let (a, b) = MemPipe::pair();
        if let Some(n) = self.fail_after {
            a.fail_after(n);
        }
        let key = [3u8; 32];
        let seal = |end| self.sealed.then(|| (Sealer::new(&key, end), None));
        let src_t = SlowPipe {
            pipe: a,
            time: self.time.clone(),
            bytes_per_s: self.bytes_per_s,
            seal: seal(End::Source),
            lent_sends: 0,
            lent_recvs: 0,
        };
        let dst_t = SlowPipe {
            pipe: b,
            time: self.time.clone(),
            bytes_per_s: self.bytes_per_s,
            seal: seal(End::Destination),
            lent_sends: 0,
            lent_recvs: 0,
        };
        let clock = SimClock(self.time.clone());
        let mut mig = Src::new(&mut self.vm, src_t, &self.time, self.policy);
        let mut rx = Dst::new(&mut self.dest, dst_t, &self.time).with_digest_check(self.check);
        rx.r = rx.r.with_holds(self.holds.0, self.holds.1);
        for _ in 0..5_000_000 {
            let s = mig.step();
            let r = rx.step();
            match (s, r) {
                (Progress::Finished(_), RecvProgress::Finished(_)) => return (mig, rx),
                (Progress::Busy, _) | (_, RecvProgress::Busy) => {}
                (Progress::Waiting { max_ns }, _) => clock.idle(max_ns),
                (Progress::Finished(_), RecvProgress::Waiting) => clock.idle(NS_PER_MS),
            }
        }
        panic!("migration did not finish");
    }
}

fn assert_source_intact(vm: &FakeVm) {
    assert!(!vm.paused, "source must run again");
    assert_eq!(vm.throttle, 0, "throttle removed");
    assert!(vm.log.is_none(), "dirty log stopped");
}

#[test]
fn idle_vm_sends_about_its_data_once() {
    let mut s = Setup::new(2048); // 8 MiB, 3/4 zero pages
    let original = s.vm.mem.clone();
    let (mig, rx) = s.run();
    let report = mig.report().clone();
    assert_eq!(
        report.result,
        MigrationResult::Completed,
        "{:?}",
        mig.error()
    );
    assert_eq!(rx.outcome().result, MigrationResult::Completed);
    drop((mig, rx));
    assert_eq!(s.dest.mem, original);
    assert!(s.dest.running && !s.dest.discarded);
    assert!(
        s.vm.paused,
        "the source stays paused: it is released to be removed"
    );
    assert_eq!(s.dest.vcpus.len(), 2);
    assert_eq!(s.dest.vcpus[1], migration::fuzzing::sample_vcpu(1));
    assert_eq!(report.passes, 2, "{report:?}");
    assert_eq!(report.pages_per_pass, vec![2048, 0]);
    assert_eq!(report.zero_pages, 1536);
    let data_bytes = 512 * PAGE_SIZE as u64;
    assert!(
        report.bytes_sent <= data_bytes + data_bytes / 50,
        "{} bytes",
        report.bytes_sent
    );
    assert!(report.bytes_sent as f64 <= 1.1 * report.ram_bytes as f64);
    let json = report.to_json();
    assert!(
        json.contains("\"result\":\"completed\",\"error\":null"),
        "{json}"
    );
}

#[test]
fn the_receivers_holds_delay_only_its_answers() {
    let mut s = Setup::new(512);
    s.holds = (2 * NS_PER_S, 3 * NS_PER_S);
    let start = s.time.get();
    let (mig, rx) = s.run();
    let report = mig.report().clone();
    assert_eq!(
        report.result,
        MigrationResult::Completed,
        "{:?}",
        mig.error()
    );
    assert_eq!(rx.outcome().result, MigrationResult::Completed);
    drop((mig, rx));
    // The source stays paused through the `ready` hold.
    assert!(report.downtime_ms >= 2000, "{report:?}");
    assert!(s.time.get() - start >= 5 * NS_PER_S);
    assert!(s.dest.running && !s.dest.discarded);
}

#[test]
fn a_destination_holding_its_resumed_keeps_the_vm_on_cancel_and_link_loss() {
    for cut in [false, true] {
        let time = Rc::new(Cell::new(1_000 * NS_PER_S));
        let mut vm = FakeVm::new(&time, 256);
        let mut dest = FakeDest::default();
        let (a, b) = MemPipe::pair();
        let mut mig = Src::new(&mut vm, a, &time, Policy::default());
        let mut rx = Dst::new(&mut dest, b, &time);
        rx.r = rx.r.with_holds(0, 10 * NS_PER_S);
        let mut resumed = false;
        for _ in 0..1_000_000 {
            let _ = mig.step();
            let r = rx.step();
            assert!(!matches!(r, RecvProgress::Finished(_)), "held");
            if rx.vm.running {
                resumed = true;
                break;
            }
            time.set(time.get() + 1000);
        }
        assert!(resumed, "go resumed the VM at once");
        assert_eq!(rx.outcome().result, MigrationResult::Completed);
        if cut {
            let Dst { r, vm, link, .. } = &mut rx;
            r.link_failed(&mut **vm, link, TransportError::Broken("cut"));
        } else {
            let Dst { r, vm, link, .. } = &mut rx;
            assert!(!r.cancel(&mut **vm, link, MigrationError::Cancelled));
        }
        assert!(matches!(
            rx.step(),
            RecvProgress::Finished(MigrationResult::Completed)
        ));
        assert!(rx.resumed());
        drop((mig, rx));
        assert!(
            dest.running && !dest.discarded,
            "the VM runs on at the destination"
        );
    }
}

#[test]
fn busy_vm_converges_and_the_image_matches_at_pause() {
    let mut s = Setup::new(4096);
    s.vm.write_rate = 20_000; // pages/s, vs ~25k pages/s of bandwidth
    s.vm.working_set = 1024;
    s.policy.downtime_limit_ns = 20 * NS_PER_MS;
    s.policy.switch_over_cost_ns = NS_PER_MS;
    let (mig, rx) = s.run();
    let report = mig.report().clone();
    assert_eq!(
        report.result,
        MigrationResult::Completed,
        "{:?}",
        mig.error()
    );
    let verified = rx.outcome().verified_digest;
    drop((mig, rx));
    assert!(verified.is_some());
    assert_eq!(&s.dest.mem, s.vm.mem_at_pause.as_ref().unwrap());
    assert!(report.passes >= 3, "{report:?}");
    assert!(report.verified, "{report:?}");
    assert!(report.expected_downtime_ms <= 20, "{report:?}");
    assert!(report.downtime_ms <= 40, "{report:?}");
}

/// Over a sealed link the stream is version 5 (page bytes under the
/// link's MAC only, the end digest by stream position): a busy VM still
/// arrives exactly as it was at the pause, with and without verification
/// mode (which keeps content hashes and re-reads both memories); over a
/// plain pipe it stays version 4.
#[test]
fn a_sealed_link_speaks_version_5_and_the_image_matches() {
    for (sealed, verify) in [(true, false), (true, true), (false, false)] {
        let mut s = Setup::new(2048);
        s.sealed = sealed;
        s.vm.write_rate = 20_000;
        s.vm.working_set = 512;
        s.policy.verify_memory = verify;
        let (mig, rx) = s.run();
        let report = mig.report().clone();
        assert_eq!(
            report.result,
            MigrationResult::Completed,
            "{:?}",
            mig.error()
        );
        assert_eq!(mig.version(), if sealed { 5 } else { 4 });
        assert!(report.passes >= 2, "{report:?}");
        // Pages were read into the pipe's queue and sealed there (one
        // frame of at most 15 data pages per send), and applied from where
        // they were opened; over the plain pipe the pages are written in
        // place too, but nothing is lent to the receiver.
        let pages = report.pages_per_pass.iter().sum::<u64>() - report.zero_pages;
        assert!(
            mig.link.lent_sends >= pages / 15,
            "{} lent sends for {pages} data pages",
            mig.link.lent_sends
        );
        assert_eq!(rx.link.lent_recvs > 0, sealed, "{}", rx.link.lent_recvs);
        let verified = (rx.outcome().verified_digest, rx.outcome().memory_verified);
        drop((mig, rx));
        assert!(verified.0.is_some());
        assert_eq!(verified.1, verify);
        assert_eq!(&s.dest.mem, s.vm.mem_at_pause.as_ref().unwrap());
        assert_eq!(s.dest.reads, if verify { 2048 } else { 0 });
    }
}

/// A receiver that re-reads memory for its digest (`FullImageAtEnd`)
/// cannot check version 5's positional digest, so it does not offer it.
#[test]
fn a_full_image_receiver_keeps_version_4_on_a_sealed_link() {
    let mut s = Setup::new(256);
    s.sealed = true;
    s.policy.verify_memory = false;
    s.check = DigestCheck::FullImageAtEnd;
    let (mig, rx) = s.run();
    assert_eq!(mig.report().result, MigrationResult::Completed);
    assert_eq!(mig.version(), 4);
    drop((mig, rx));
    assert_eq!(s.dest.mem, s.vm.mem);
}

#[test]
fn a_dirtier_faster_than_the_link_is_throttled_then_completes() {
    let mut s = Setup::new(512);
    s.bytes_per_s = 2 << 20; // ~500 pages/s
    s.vm.write_rate = 20_000;
    s.vm.working_set = 512;
    s.policy.downtime_limit_ns = 100 * NS_PER_MS;
    let (mig, _rx) = s.run();
    let report = mig.report().clone();
    assert_eq!(
        report.result,
        MigrationResult::Completed,
        "{:?}",
        mig.error()
    );
    assert!(report.throttle_pct >= 50, "{report:?}");
    let p = &report.pages_per_pass;
    assert!(p[p.len() - 1] < p[1], "{report:?}");
    drop(mig);
    assert_eq!(&s.dest.mem, s.vm.mem_at_pause.as_ref().unwrap());
}

#[test]
fn timeout_cancels_and_the_vm_stays_at_the_source() {
    let mut s = Setup::new(4096);
    s.bytes_per_s = 1 << 20;
    s.policy.timeout_ns = 2 * NS_PER_S;
    let original = s.vm.mem.clone();
    let (mig, rx) = s.run();
    assert_eq!(mig.report().result, MigrationResult::Cancelled);
    assert!(matches!(
        mig.error(),
        Some(MigrationError::Timeout { limit_ms: 2000 })
    ));
    assert!(mig
        .report()
        .to_json()
        .contains("\"result\":\"cancelled\",\"error\":\"migration did not finish within"));
    assert_eq!(
        rx.outcome().result,
        MigrationResult::Cancelled,
        "the source told the destination"
    );
    drop((mig, rx));
    assert_source_intact(&s.vm);
    assert_eq!(s.vm.mem, original);
    assert!(s.dest.discarded && !s.dest.running);
}

#[test]
fn transport_failure_at_any_byte_leaves_exactly_one_vm_running() {
    // Size of a clean run's main stream.
    let total = {
        let mut s = Setup::new(64);
        let (mig, _) = s.run();
        assert_eq!(mig.report().result, MigrationResult::Completed);
        mig.report().bytes_sent
    };
    let mut in_doubt = 0;
    for n in (0..total + 16).step_by(397).chain(total - 40..total + 2) {
        let mut s = Setup::new(64);
        s.fail_after = Some(n);
        let original = s.vm.mem.clone();
        let (mig, rx) = s.run();
        let result = mig.report().result;
        let doubt = matches!(mig.error(), Some(MigrationError::InDoubt(_)));
        let rx_result = rx.outcome().result;
        drop((mig, rx));
        assert_eq!(s.vm.mem, original, "the source's memory is only read");
        if n >= total {
            assert_eq!(result, MigrationResult::Completed);
            continue;
        }
        assert_eq!(result, MigrationResult::Failed, "fail after {n}");
        if doubt {
            // The go order went out: the source must not run.
            in_doubt += 1;
            assert!(s.vm.paused);
        } else {
            assert_source_intact(&s.vm);
            assert!(!s.dest.running, "fail after {n}: both running");
            assert_eq!(rx_result, MigrationResult::Failed);
            assert!(s.dest.discarded || !s.dest.prepared);
        }
    }
    assert!(in_doubt >= 1, "the sweep covers the go record");
}

#[test]
fn failure_then_a_second_migration_completes() {
    let mut s = Setup::new(512);
    s.vm.write_rate = 2000;
    s.fail_after = Some(300_000);
    let (mig, _) = s.run();
    assert_eq!(mig.report().result, MigrationResult::Failed);
    assert!(mig
        .report()
        .to_json()
        .contains("\"error\":\"transport failed: injected failure\""));
    drop(mig);
    assert_source_intact(&s.vm);
    s.fail_after = None;
    s.dest = FakeDest::default();
    let (mig, _) = s.run();
    assert_eq!(
        mig.report().result,
        MigrationResult::Completed,
        "{:?}",
        mig.error()
    );
    drop(mig);
    assert_eq!(&s.dest.mem, s.vm.mem_at_pause.as_ref().unwrap());
}

#[test]
fn destination_refusal_sends_the_vm_back() {
    let mut s = Setup::new(256);
    s.dest.refuse_devices = true;
    let (mig, rx) = s.run();
    assert_eq!(mig.report().result, MigrationResult::Failed);
    let msg = mig.report().error.clone().unwrap();
    assert!(
        msg.contains(
            "peer aborted the migration: VM operation failed: device state version unsupported"
        ),
        "{msg}"
    );
    assert_eq!(rx.outcome().result, MigrationResult::Failed);
    drop((mig, rx));
    assert_source_intact(&s.vm);
    assert_eq!(s.vm.resumes, 1);
    assert!(s.dest.discarded && !s.dest.running);
}

#[test]
fn corrupted_destination_memory_fails_the_digest() {
    let mut s = Setup::new(256);
    s.dest.corrupt_gfn = Some(8);
    let (mig, rx) = s.run();
    assert_eq!(mig.report().result, MigrationResult::Failed);
    let e = rx.outcome().error.clone().unwrap();
    assert!(e.contains("final memory digest mismatch"), "{e}");
    drop((mig, rx));
    assert_source_intact(&s.vm);
    assert!(!s.dest.running);
}

#[test]
fn source_vm_failure_during_switch_over_resumes_it() {
    let mut s = Setup::new(256);
    s.vm.fail_save_vcpus = true;
    let (mig, rx) = s.run();
    assert_eq!(mig.report().result, MigrationResult::Failed);
    assert_eq!(
        mig.report().error.as_deref(),
        Some("VM operation failed: vCPU would not stop (0x1)")
    );
    assert_eq!(
        rx.outcome().result,
        MigrationResult::Cancelled,
        "the source aborted"
    );
    drop((mig, rx));
    assert_eq!((s.vm.pauses, s.vm.resumes), (1, 1));
    assert_source_intact(&s.vm);
    assert!(s.dest.discarded);
}

#[test]
fn operator_cancel_and_version_mismatch() {
    let time = Rc::new(Cell::new(0));
    let mut vm = FakeVm::new(&time, 64);
    let (a, mut b) = MemPipe::pair();
    let mut mig = Src::new(&mut vm, a, &time, Policy::default());
    // A destination that only speaks a future version (one above the
    // newest this source supports).
    let future = SUPPORTED_VERSIONS.iter().max().unwrap() + 1;
    let mut offer = Vec::from(MAGIC_DEST);
    Record::Offer {
        versions: vec![future],
    }
    .encode(&mut offer);
    b.send(&offer).unwrap();
    // Bounded: a source that took the offer would wait for ever here.
    for _ in 0..1_000 {
        if !matches!(mig.step(), Progress::Busy | Progress::Waiting { .. }) {
            break;
        }
    }
    assert_eq!(
        mig.report().error.as_deref(),
        Some(
            format!(
                "protocol error: no common protocol version: destination offers [{future}], \
                 source supports {UNSEALED_VERSIONS:?}; upgrade one side"
            )
            .as_str()
        )
    );
    // The destination was told why.
    let mut buf = vec![0u8; 4096];
    let n = b.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("no common protocol version"));
    drop(mig);

    let (a, b) = MemPipe::pair();
    let mut fresh_dest = FakeDest::default();
    let mut mig = Src::new(&mut vm, a, &time, Policy::default());
    let mut rx = Dst::new(&mut fresh_dest, b, &time);
    for _ in 0..6 {
        mig.step();
        rx.step();
    }
    assert!(mig.cancel());
    assert!(!mig.cancel());
    assert_eq!(mig.report().result, MigrationResult::Cancelled);
    while !matches!(rx.step(), RecvProgress::Finished(_)) {}
    assert_eq!(rx.outcome().result, MigrationResult::Cancelled);
    drop(mig);
    assert_source_intact(&vm);
}

/// Stopping the dirty log gives write access back to every frame (work in
/// proportion to RAM): it happens once the destination confirmed, not
/// during the pause. Here the destination holds its `ready` for 50 ms; a
/// log stopped with the last pages would have stopped that long before the
/// end.
#[test]
fn the_dirty_log_stops_after_the_switch_over_not_in_the_pause() {
    let mut s = Setup::new(1024);
    s.policy.verify_memory = false;
    s.holds = (50 * NS_PER_MS, 0);
    let (mig, _) = s.run();
    let r = mig.report().clone();
    assert_eq!(r.result, MigrationResult::Completed, "{:?}", mig.error());
    assert!(r.pause_us.ready >= 50_000, "{:?}", r.pause_us);
    drop(mig);
    let end = s.time.get();
    let stopped = s.vm.log_stopped_ns.expect("the log was stopped");
    assert!(
        end.saturating_sub(stopped) < 10 * NS_PER_MS,
        "stopped {} ms before the end",
        (end - stopped) / NS_PER_MS
    );
    assert!(s.vm.log.is_none());
}

/// Without verification the destination hashes pages as it writes them
/// and never reads its memory back (one checksum pass per page); with it,
/// exactly one full re-read at the end record.
#[test]
fn the_destination_reads_memory_back_only_to_verify() {
    for verify in [false, true] {
        let mut s = Setup::new(512);
        s.vm.write_rate = 20_000;
        s.vm.working_set = 128;
        s.policy.verify_memory = verify;
        let (mig, rx) = s.run();
        assert_eq!(mig.report().result, MigrationResult::Completed);
        assert!(mig.report().passes >= 2);
        assert_eq!(rx.outcome().memory_verified, verify);
        drop((mig, rx));
        assert_eq!(
            s.dest.reads,
            if verify { 512 } else { 0 },
            "verify {verify}"
        );
    }
}

/// Pages go from guest memory straight into the batch the transport gets,
/// the records built in place: long data runs (split at the record's page
/// cap), zero runs, alternation and single pages all arrive intact (the
/// decoder checks every record's CRC, the end digest every page).
#[test]
fn in_place_batches_carry_every_run_shape() {
    let mut s = Setup::new(600);
    for (g, p) in s.vm.mem.iter_mut().enumerate() {
        let data = g < 150 || (200..400).contains(&g) && g % 2 == 0 || g == 599 || g == 450;
        *p = if data {
            let mut page = [0u8; PAGE_SIZE];
            for (i, b) in page.iter_mut().enumerate() {
                *b = (i as u64 ^ (g as u64 * 131)) as u8 | 0x40;
            }
            page
        } else {
            [0u8; PAGE_SIZE]
        };
    }
    for step_pages in [1, 7, 64, 1000] {
        let mut t = Setup::new(600);
        t.vm.mem = s.vm.mem.clone();
        t.policy.verify_memory = false;
        t.policy.step_pages = step_pages;
        let (mig, rx) = t.run();
        assert_eq!(
            mig.report().result,
            MigrationResult::Completed,
            "{:?}",
            mig.error()
        );
        let zero = mig.report().zero_pages;
        drop((mig, rx));
        assert_eq!(t.dest.mem, t.vm.mem, "step_pages {step_pages}");
        assert!(zero >= 600 - 150 - 100 - 2, "{zero}");
    }
}

#[test]
fn rate_limit_is_respected() {
    let mut s = Setup::new(1024);
    s.bytes_per_s = 1 << 30;
    s.policy.max_bandwidth_bytes_per_s = 8 << 20;
    let start = s.time.get();
    let (mig, _) = s.run();
    let r = mig.report().clone();
    assert_eq!(r.result, MigrationResult::Completed);
    let elapsed_ns = s.time.get() - start;
    let floor_ns = r.bytes_sent * NS_PER_S / (8 << 20);
    assert!(
        elapsed_ns + 10 * NS_PER_MS >= floor_ns,
        "{elapsed_ns} < {floor_ns}"
    );
}

#[test]
fn full_image_check_catches_a_stray_write_after_the_fact() {
    // Writing page 40 also corrupts page 4, which was written (and read
    // back) earlier in pass 0.
    let mut s = Setup::new(256);
    s.dest.alias = Some((40, 4));
    s.check = DigestCheck::FullImageAtEnd;
    let (mig, rx) = s.run();
    assert_eq!(mig.report().result, MigrationResult::Failed);
    let e = rx.outcome().error.clone().unwrap();
    assert!(e.contains("final memory digest mismatch"), "{e}");
    drop((mig, rx));
    assert_source_intact(&s.vm);
    assert!(!s.dest.running);

    // The same stray write before the page is written is caught by the
    // default check too (the read-back sees the page as finally written).
    let mut s = Setup::new(256);
    s.dest.alias = Some((4, 40));
    s.dest.corrupt_gfn = None;
    let (mig, _) = s.run();
    // Page 40 is written after 4 in pass 0, overwriting the stray flip: the
    // image is right and the migration completes.
    assert_eq!(mig.report().result, MigrationResult::Completed);
}

/// A transport whose source side can be cut at a chosen moment.
struct Cuttable {
    pipe: MemPipe,
    cut: Rc<Cell<bool>>,
}

impl Transport for Cuttable {
    fn send(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        if self.cut.get() {
            return Err(TransportError::Broken("cable pulled"));
        }
        self.pipe.send(bytes)
    }
    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        if self.cut.get() {
            return Err(TransportError::Broken("cable pulled"));
        }
        self.pipe.recv(buf)
    }
    fn send_window(&self) -> usize {
        self.pipe.send_window()
    }
    fn acked_bytes(&self) -> u64 {
        self.pipe.acked_bytes()
    }
}

/// Step both sides until the source has committed; the destination gets
/// `go` and resumes, but the link dies before the source reads `resumed`:
/// exactly one VM runs, and the source reports the doubt instead of
/// resuming.
#[test]
fn link_loss_after_go_leaves_the_source_paused_in_doubt() {
    let time = Rc::new(Cell::new(0));
    let mut vm = FakeVm::new(&time, 64);
    let mut dest = FakeDest::default();
    let (a, b) = MemPipe::pair();
    let cut = Rc::new(Cell::new(false));
    let clock = SimClock(time.clone());
    let src_t = Cuttable {
        pipe: a,
        cut: cut.clone(),
    };
    let mut mig = Src::new(&mut vm, src_t, &time, Policy::default());
    let mut rx = Dst::new(&mut dest, b, &time);
    while !mig.committed() {
        assert!(!matches!(mig.step(), Progress::Finished(_)));
        rx.step();
        clock.idle(1000);
    }
    assert!(!mig.cancel(), "no cancel past the commit point");
    while !matches!(rx.step(), RecvProgress::Finished(_)) {}
    assert_eq!(rx.outcome().result, MigrationResult::Completed);
    cut.set(true);
    while !matches!(mig.step(), Progress::Finished(_)) {}
    assert_eq!(mig.report().result, MigrationResult::Failed);
    assert!(
        matches!(mig.error(), Some(MigrationError::InDoubt(_))),
        "{:?}",
        mig.error()
    );
    let msg = mig.report().error.clone().unwrap();
    assert!(
        msg.starts_with(
            "switch-over in doubt after the go order was sent (transport failed: cable pulled)"
        ),
        "{msg}"
    );
    assert!(mig.vm_paused());
    drop((mig, rx));
    assert!(vm.paused && vm.resumes == 0, "the source must not resume");
    assert!(dest.running);
}

/// The in-node shape: one thread steps both sides over a small `MemPipe`;
/// flow control keeps the bytes in flight within the pipe's capacity.
#[test]
fn in_node_migration_respects_the_pipe_capacity() {
    struct Watch {
        pipe: MemPipe,
        peak: Rc<Cell<usize>>,
    }
    impl Transport for Watch {
        fn send(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
            self.pipe.send(bytes)?;
            let queued = MemPipe::MIN_CAPACITY - self.pipe.send_window().min(MemPipe::MIN_CAPACITY);
            self.peak.set(self.peak.get().max(queued));
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
            self.pipe.recv(buf)
        }
        fn send_window(&self) -> usize {
            self.pipe.send_window()
        }
        fn acked_bytes(&self) -> u64 {
            self.pipe.acked_bytes()
        }
    }
    let time = Rc::new(Cell::new(0));
    let mut vm = FakeVm::new(&time, 1024);
    vm.write_rate = 5_000;
    let mut dest = FakeDest::default();
    let (a, b) = MemPipe::with_capacity(0); // clamped to MIN_CAPACITY
    let peak = Rc::new(Cell::new(0));
    let src_t = Watch {
        pipe: a,
        peak: peak.clone(),
    };
    let mut mig = Src::new(&mut vm, src_t, &time, Policy::default());
    let mut rx = Dst::new(&mut dest, b, &time);
    loop {
        time.set(time.get() + 20_000); // the guest and the clock move on
        let s = mig.step();
        let r = rx.step();
        if let (Progress::Finished(_), RecvProgress::Finished(_)) = (s, r) {
            break;
        }
    }
    assert_eq!(
        mig.report().result,
        MigrationResult::Completed,
        "{:?}",
        mig.error()
    );
    assert!(
        peak.get() <= MemPipe::MIN_CAPACITY,
        "{} bytes queued",
        peak.get()
    );
    assert!(
        peak.get() >= MemPipe::MIN_CAPACITY / 2,
        "the window was used: {}",
        peak.get()
    );
    drop((mig, rx));
    assert_eq!(&dest.mem, vm.mem_at_pause.as_ref().unwrap());
}

/// After `go`, silence from the destination until the time limit: in doubt,
/// the source stays paused.
#[test]
fn silence_after_go_times_out_in_doubt() {
    let time = Rc::new(Cell::new(0));
    let mut vm = FakeVm::new(&time, 64);
    let mut dest = FakeDest::default();
    let (a, b) = MemPipe::pair();
    let clock = SimClock(time.clone());
    let policy = Policy {
        timeout_ns: 5 * NS_PER_S,
        ..Policy::default()
    };
    let mut mig = Src::new(&mut vm, a, &time, policy);
    let mut rx = Dst::new(&mut dest, b, &time);
    while !mig.committed() {
        mig.step();
        rx.step();
        clock.idle(1000);
    }
    // The destination hangs: it is never stepped again.
    time.set(time.get() + 6 * NS_PER_S);
    assert_eq!(mig.step(), Progress::Finished(MigrationResult::Failed));
    let msg = mig.report().error.clone().unwrap();
    assert!(msg.contains("in doubt") && msg.contains("5000 ms"), "{msg}");
    assert!(mig.vm_paused());
    drop((mig, rx));
    assert_eq!(vm.resumes, 0);
}

/// The destination's resume fails after `go`: it says so and discards, and
/// only then does the source take the VM back.
#[test]
fn failed_resume_at_the_destination_sends_the_vm_back() {
    let mut s = Setup::new(128);
    s.dest.fail_resume = true;
    let (mig, rx) = s.run();
    assert!(mig.committed());
    assert_eq!(mig.report().result, MigrationResult::Failed);
    let msg = mig.report().error.clone().unwrap();
    assert!(
        msg.contains("peer aborted the migration: VM operation failed: vCPU entry failed"),
        "{msg}"
    );
    assert_eq!(rx.outcome().result, MigrationResult::Failed);
    drop((mig, rx));
    assert_source_intact(&s.vm);
    assert_eq!(s.vm.resumes, 1);
    assert!(s.dest.discarded && !s.dest.running);
}

/// A busy guest whose dirty log loses every write to one frame: without
/// verification the migration "completes" with that frame stale at the
/// destination; with verification it fails, names the frame, and the VM
/// keeps running at the source.
#[test]
fn verification_fails_a_migration_that_missed_a_dirty_page() {
    let lost = 77;
    let setup = |verify: bool| {
        let mut s = Setup::new(1024);
        s.vm.write_rate = 20_000;
        s.vm.working_set = 256;
        s.vm.lose_dirty = Some(lost);
        s.policy.downtime_limit_ns = 20 * NS_PER_MS;
        s.policy.switch_over_cost_ns = NS_PER_MS;
        s.policy.verify_memory = verify;
        s
    };

    // Without verification: completed, and page 77 differs from the
    // source's memory at the pause.
    let mut s = setup(false);
    let (mig, _) = s.run();
    assert_eq!(mig.report().result, MigrationResult::Completed);
    assert!(!mig.report().verified);
    drop(mig);
    assert!(s.vm.lost_writes > 0, "the guest wrote the frame meanwhile");
    let at_pause = s.vm.mem_at_pause.as_ref().unwrap();
    let stale: Vec<usize> = (0..at_pause.len())
        .filter(|&g| s.dest.mem[g] != at_pause[g])
        .collect();
    assert_eq!(stale, [lost as usize], "silently stale");

    // With verification: failed before the commit point, naming the frame.
    let mut s = setup(true);
    let original_policy = s.policy;
    let (mig, rx) = s.run();
    let report = mig.report().clone();
    assert_eq!(report.result, MigrationResult::Failed, "{report:?}");
    assert!(!report.verified && !mig.committed());
    assert!(
        matches!(
            mig.error(),
            Some(MigrationError::StalePages { stale_pages: 1, first_gfns }) if first_gfns == &[lost]
        ),
        "{:?}",
        mig.error()
    );
    let msg = report.error.clone().unwrap();
    assert_eq!(
        msg,
        "memory verification failed: 1 pages at the source differ from what was sent \
         (the dirty log missed writes); first gfns 0x4d; the VM keeps running at the source"
    );
    assert!(report.to_json().contains("\"result\":\"failed\""));
    assert_eq!(rx.outcome().result, MigrationResult::Cancelled);
    assert!(rx.outcome().error.as_deref().unwrap().contains("0x4d"));
    drop((mig, rx));
    assert_source_intact(&s.vm);
    assert_eq!((s.vm.pauses, s.vm.resumes), (1, 1));
    assert!(s.dest.discarded && !s.dest.running);
    assert!(original_policy.verify_memory);
}

/// Verification on a busy guest with a sound log: several dirty passes,
/// then the whole memory is checked on both sides and the migration
/// completes with the image equal to the source's memory at the pause.
#[test]
fn verification_passes_when_the_log_is_sound() {
    let mut s = Setup::new(4096);
    s.vm.write_rate = 20_000;
    s.vm.working_set = 1024;
    s.policy.downtime_limit_ns = 20 * NS_PER_MS;
    s.policy.switch_over_cost_ns = NS_PER_MS;
    s.policy.verify_memory = true;
    let (mig, rx) = s.run();
    let report = mig.report().clone();
    assert_eq!(
        report.result,
        MigrationResult::Completed,
        "{:?}",
        mig.error()
    );
    assert!(report.verified && report.passes >= 3, "{report:?}");
    assert_eq!(report.dirty_tracker.as_deref(), Some("test-log"));
    assert!(report
        .to_json()
        .contains(",\"dirty_tracker\":\"test-log\",\"verified\":true,\"pause_us\":{\"harvest\":"));
    // Where the pause went: the phases add up to the downtime (the
    // simulated clock moves only while the engines wait: for the link,
    // during the last pages).
    let p = report.pause_us;
    let sum_us: u64 = p.named().iter().map(|(_, us)| us).sum();
    assert!(
        sum_us / 1000 <= report.downtime_ms && report.downtime_ms <= sum_us / 1000 + 7,
        "{p:?} vs {} ms",
        report.downtime_ms
    );
    assert!(p.last_pages > 0, "{p:?}");
    assert!(rx.outcome().memory_verified);
    drop((mig, rx));
    assert_eq!(&s.dest.mem, s.vm.mem_at_pause.as_ref().unwrap());
}

/// Verification needs protocol version 2: a version-1 destination is
/// refused when it is asked for, and still served without it.
#[test]
fn verification_needs_a_version_2_destination() {
    for verify in [true, false] {
        let time = Rc::new(Cell::new(0));
        let mut vm = FakeVm::new(&time, 64);
        let (a, mut b) = MemPipe::pair();
        let policy = Policy {
            verify_memory: verify,
            ..Policy::default()
        };
        let mut mig = Src::new(&mut vm, a, &time, policy);
        let mut offer = Vec::from(MAGIC_DEST);
        Record::Offer { versions: vec![1] }.encode(&mut offer);
        b.send(&offer).unwrap();
        for _ in 0..20 {
            mig.step();
        }
        let mut got = vec![0u8; 1 << 20];
        let n = b.recv(&mut got).unwrap();
        let mut d = migration::Decoder::new(migration::Direction::SourceToDest);
        d.feed(&got[..n]);
        let mut recs = Vec::new();
        while let Ok(Some(r)) = d.next_record() {
            recs.push(r);
        }
        if verify {
            assert_eq!(mig.report().result, MigrationResult::Failed);
            assert_eq!(
                mig.error(),
                Some(&MigrationError::VerificationUnsupported { version: 1 })
            );
            assert!(
                matches!(recs.last(), Some(Record::Abort { .. })),
                "{recs:?}"
            );
        } else {
            assert!(!matches!(mig.step(), Progress::Finished(_)));
            assert_eq!(recs[0], Record::Select { version: 1 });
        }
    }
}

/// The destination's side of verification: a verify record whose digest
/// is not what the destination's memory hashes to (a source whose memory
/// differs from the image it sent) is refused before `ready`; the VM is
/// discarded, never resumed, and the source is told why.
#[test]
fn destination_refuses_memory_that_does_not_match_the_source() {
    use migration::stream::{Direction, MAGIC_SOURCE};
    let good = migration::fuzzing::sample_streams().remove(3).1;
    let mut d = migration::Decoder::new(Direction::SourceToDest);
    d.feed(&good);
    let mut recs = Vec::new();
    while let Some(r) = d.next_record().unwrap() {
        recs.push(r);
    }
    for wrong in [false, true] {
        let mut stream = Vec::from(MAGIC_SOURCE);
        for r in &recs {
            match r {
                Record::MemVerify { digest } if wrong => {
                    Record::MemVerify { digest: digest ^ 1 }.encode(&mut stream)
                }
                r => r.encode(&mut stream),
            }
        }
        let (mut src, dst) = MemPipe::pair();
        src.send(&stream).unwrap();
        let mut dest = FakeDest::default();
        let time = Rc::new(Cell::new(0));
        let mut rx = Dst::new(&mut dest, dst, &time);
        let out = rx.run_to_completion().clone();
        drop(rx);
        let mut back = vec![0u8; 4096];
        let n = src.recv(&mut back).unwrap();
        let back = String::from_utf8_lossy(&back[..n]).into_owned();
        if wrong {
            assert_eq!(out.result, MigrationResult::Failed);
            let e = out.error.unwrap();
            assert!(
                e.starts_with("memory verification failed: the source's memory hashes to"),
                "{e}"
            );
            assert!(!out.memory_verified && out.verified_digest.is_none());
            assert!(dest.discarded && !dest.running);
            assert!(back.contains("memory verification failed"), "{back}");
        } else {
            assert_eq!(out.result, MigrationResult::Completed, "{:?}", out.error);
            assert!(out.memory_verified);
            assert!(dest.running);
        }
    }
}

/// A link that goes silent at a chosen moment without an error (a cable
/// pulled with TCP still retrying): sends are taken and never delivered,
/// nothing arrives, nothing more is acknowledged.
struct Silent {
    pipe: MemPipe,
    silent: Rc<Cell<bool>>,
    acked_at_cut: Cell<Option<u64>>,
}

impl Transport for Silent {
    fn send(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        if self.silent.get() {
            return Ok(());
        }
        self.pipe.send(bytes)
    }
    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        if self.silent.get() {
            return Ok(0);
        }
        self.pipe.recv(buf)
    }
    fn send_window(&self) -> usize {
        self.pipe.send_window()
    }
    fn acked_bytes(&self) -> u64 {
        if self.silent.get() {
            let a = self.acked_at_cut.get().unwrap_or(self.pipe.acked_bytes());
            self.acked_at_cut.set(Some(a));
            return a;
        }
        self.pipe.acked_bytes()
    }
}

/// A link that goes silent in the first pass, in a dirty pass, during
/// the final (paused) copy or while waiting for `ready`: the source notices
/// the stall after `stall_timeout_ns`, names it, and the VM runs on at the
/// source with its memory untouched; the receiver, hearing nothing, gives
/// up after its own stall timeout and discards its copy.
#[test]
fn a_silent_link_is_noticed_in_every_phase_before_the_commit_point() {
    use migration::Stage;
    type Cut = fn(&Src<'_, Silent>) -> bool;
    let points: [(&str, Cut); 4] = [
        ("first pass", |m| {
            m.status().pass == 0 && m.status().bytes_sent > 64 << 10
        }),
        ("dirty pass", |m| {
            m.status().pass >= 2 && m.stage() == Stage::Copying
        }),
        ("final copy", |m| m.stage() == Stage::FinalCopy),
        ("awaiting ready", |m| m.stage() == Stage::SwitchingOver),
    ];
    for (name, cut_when) in points {
        let time = Rc::new(Cell::new(0));
        let mut vm = FakeVm::new(&time, 512);
        vm.write_rate = 20_000;
        vm.working_set = 64;
        let original_data = vm.mem[1..].to_vec();
        let mut dest = FakeDest::default();
        let (a, b) = MemPipe::pair();
        let silent = Rc::new(Cell::new(false));
        let link = Silent {
            pipe: a,
            silent: silent.clone(),
            acked_at_cut: Cell::new(None),
        };
        // A budget the first dirty sets do not fit: dirty passes, then the
        // throttle, then the switch-over.
        let policy = Policy {
            downtime_limit_ns: 100_000,
            switch_over_cost_ns: 0,
            verify_memory: true,
            ..Policy::default()
        };
        let mut mig = Src::new(&mut vm, link, &time, policy);
        let mut rx = Dst::new(&mut dest, b, &time);
        let mut cut_at = None;
        let mut rx_done = false;
        for _ in 0..2_000_000 {
            if cut_at.is_none() && cut_when(&mig) {
                silent.set(true);
                cut_at = Some(time.get());
            }
            let s = mig.step();
            if !rx_done {
                rx_done = matches!(rx.step(), RecvProgress::Finished(_));
            }
            if let Progress::Finished(_) = s {
                break;
            }
            time.set(time.get() + 50_000);
        }
        let cut_at = cut_at.unwrap_or_else(|| panic!("{name}: never reached"));
        assert_eq!(mig.report().result, MigrationResult::Failed, "{name}");
        assert!(
            matches!(mig.error(), Some(MigrationError::LinkStalled { .. })),
            "{name}: {:?}",
            mig.error()
        );
        let e = mig.report().error.clone().unwrap();
        assert!(
            e.starts_with("link lost: nothing moved for 8 s"),
            "{name}: {e}"
        );
        let waited = time.get() - cut_at;
        assert!(
            (8 * NS_PER_S - NS_PER_MS..9 * NS_PER_S).contains(&waited),
            "{name}: {waited} ns"
        );
        assert!(!mig.committed());
        // The source's end stays open (silent), as a cut cable leaves it.
        let Src { link: _held, .. } = mig;
        assert_source_intact(&vm);
        // Memory outside the guest's working set is as it was.
        assert!(vm.mem[64..] == original_data[63..], "{name}");
        // The receiver hears nothing more and gives up after its stall
        // timeout, discarding its copy.
        time.set(time.get() + 31 * NS_PER_S);
        while !matches!(rx.step(), RecvProgress::Finished(_)) {}
        assert_eq!(rx.outcome().result, MigrationResult::Failed, "{name}");
        assert!(
            rx.outcome()
                .error
                .as_deref()
                .unwrap()
                .starts_with("link lost: nothing moved for"),
            "{name}: {:?}",
            rx.outcome().error
        );
        drop(rx);
        assert!(!dest.running, "{name}");
    }
}

/// In doubt after `go`: the destination's later answer settles it. It
/// resumed -> the migration completes and the source stays paused (to be
/// removed); it discarded -> the source resumes and the migration fails
/// naming both causes. An answer without doubt changes nothing.
#[test]
fn an_in_doubt_switch_over_is_settled_by_the_destinations_answer() {
    for resumed_there in [true, false] {
        let time = Rc::new(Cell::new(0));
        let mut vm = FakeVm::new(&time, 64);
        let mut dest = FakeDest::default();
        let (a, b) = MemPipe::pair();
        let cut = Rc::new(Cell::new(false));
        let src_t = Cuttable {
            pipe: a,
            cut: cut.clone(),
        };
        let mut mig = Src::new(&mut vm, src_t, &time, Policy::default());
        let mut rx = Dst::new(&mut dest, b, &time);
        while !mig.committed() {
            mig.step();
            rx.step();
            time.set(time.get() + 1000);
        }
        cut.set(true);
        while !matches!(mig.step(), Progress::Finished(_)) {}
        assert!(mig.in_doubt());
        let Src { mut m, vm: v, .. } = mig;
        m.resolve_in_doubt(&mut *v, resumed_there, time.get());
        assert!(!m.in_doubt());
        if resumed_there {
            assert_eq!(m.report().result, MigrationResult::Completed);
            assert_eq!(m.report().error, None);
            assert!(v.paused && v.resumes == 0, "the source stays paused");
        } else {
            assert_eq!(m.report().result, MigrationResult::Failed);
            let e = m.report().error.clone().unwrap();
            assert!(
                e.starts_with("the switch-over failed (transport failed: cable pulled)")
                    && e.ends_with("the destination discarded its copy: the VM runs at the source"),
                "{e}"
            );
            assert!(!v.paused && v.resumes == 1, "the source runs again");
        }
        // A second answer is ignored.
        m.resolve_in_doubt(&mut *v, !resumed_there, time.get());
        assert_eq!(v.resumes, u32::from(!resumed_there));
        drop(rx);
    }
}

/// Version 4: the destination reports what it applied, and the source
/// never runs further ahead of that than the in-flight cap, however much
/// room the transport has (here a 64 MiB pipe and a receiver stepped once
/// per eight source steps): what a pause would wait for stays bounded.
#[test]
fn the_source_stays_within_the_cap_of_what_the_destination_applied() {
    let time = Rc::new(Cell::new(0));
    let mut vm = FakeVm::new(&time, 16384); // 16 MiB of data pages
    let mut dest = FakeDest::default();
    let (a, b) = MemPipe::with_capacity(64 << 20);
    let mut mig = Src::new(&mut vm, a, &time, Policy::default());
    let mut rx = Dst::new(&mut dest, b, &time);
    let mut peak = 0u64;
    for i in 0..10_000_000u64 {
        time.set(time.get() + 20_000);
        let s = mig.step();
        let ahead = mig
            .report()
            .bytes_sent
            .saturating_sub(rx.outcome().bytes_received);
        peak = peak.max(ahead);
        if i % 8 == 0 && matches!(rx.step(), RecvProgress::Finished(_)) {
            while !matches!(mig.step(), Progress::Finished(_)) {}
            break;
        }
        if let Progress::Finished(_) = s {
            rx.run_to_completion();
            break;
        }
    }
    assert_eq!(
        mig.report().result,
        MigrationResult::Completed,
        "{:?}",
        mig.error()
    );
    let cap = migration::policy::IN_FLIGHT_MAX_BYTES;
    assert!(peak <= cap + (2 << 20), "{peak} bytes ahead");
    assert!(peak >= migration::policy::IN_FLIGHT_MIN_BYTES / 2, "{peak}");
    drop((mig, rx));
    assert_eq!(&dest.mem, vm.mem_at_pause.as_ref().unwrap());
}

/// Quick migration's memory move (`Policy::pause_at_once`): the VM pauses
/// before its first page goes, one pass sends all of it, and the image at
/// the destination is the one at the pause, however busy the guest was.
#[test]
fn pause_at_once_sends_one_paused_pass() {
    let mut s = Setup::new(2048);
    s.vm.write_rate = 50_000; // faster than the link: pre-copy would throttle
    s.vm.working_set = 2048;
    s.policy.pause_at_once = true;
    let (mig, rx) = s.run();
    let report = mig.report().clone();
    assert_eq!(
        report.result,
        MigrationResult::Completed,
        "{:?}",
        mig.error()
    );
    drop((mig, rx));
    assert_eq!(report.passes, 1, "{report:?}");
    assert_eq!(report.pages_per_pass, vec![2048]);
    assert_eq!(&s.dest.mem, s.vm.mem_at_pause.as_ref().unwrap());
    assert_eq!(s.vm.throttle, 0, "never throttled");
    // The pause spans the whole transfer.
    assert!(report.downtime_ms + 1 >= report.total_ms / 2, "{report:?}");
    assert!(s.dest.running);
}
