//! The job table: long-running operations (migrations, the link benchmark)
//! with their progress, and the host's limits on simultaneous migrations.
//!
//! As in Hyper-V, a host runs at most `max_live_migrations` live migrations
//! and `max_storage_migrations` storage migrations at once; further requests
//! are accepted and wait as `queued`, and start in submission order when a
//! slot frees ([`JobTable::schedule`]). Lowering a limit never stops a
//! running job; it only holds back queued ones. Other kinds (the link
//! benchmark) are not limited.
//!
//! States: `queued` -> `running` -> `completed` | `failed` | `cancelled`;
//! `queued` -> `cancelled`. A final state never changes. The owner of a
//! running job (the code doing the work) reports progress and the end; a
//! cancel marks the job `cancelled` at once, and the owner sees it through
//! [`JobTable::is_running`] at its next step and stops. Reports on a job that
//! is no longer running are ignored.
//!
//! The table holds at most [`JOBS_MAX`] jobs: ended jobs are forgotten,
//! oldest first, to make room; when every entry is live, submitting fails.

use super::proto::{HostSettings, JobInfo, JobKind, JobState, MigrationInfo, MigrationReport};
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;

/// Most jobs remembered (live and ended).
pub const JOBS_MAX: usize = 64;
/// Highest limit a host setting accepts.
pub const LIMIT_MAX: u32 = 16;
/// Default limits (Hyper-V's defaults: two of each).
pub const DEFAULT_SETTINGS: HostSettings = HostSettings {
    max_live_migrations: 2,
    max_storage_migrations: 2,
};
/// Longest error or result text kept (shown whole by `job-show`: an
/// in-doubt note with the operator's choices runs to about 400 bytes).
pub const TEXT_MAX: usize = 1024;
/// Longest error or result text in a `job-list` reply (every job's must
/// fit one frame); a longer one ends in `...`, and `job-show` has it whole.
pub const LIST_TEXT_MAX: usize = 200;

/// Why a job operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobError {
    /// No job with that id.
    NotFound,
    /// Every table entry is a live job.
    TableFull,
    /// The job cannot be cancelled (already ended, or not cancellable).
    NotCancellable,
    /// A limit outside 1..=[`LIMIT_MAX`].
    BadLimit,
    /// No slot under the host's limit now (and the job was not queued).
    AtLimit,
}

#[derive(Clone, Debug)]
struct Job {
    id: u64,
    kind: JobKind,
    vm: String,
    state: JobState,
    bytes_done: u64,
    bytes_total: u64,
    started_ns: Option<u64>,
    ended_ns: Option<u64>,
    error: Option<String>,
    result: Option<String>,
    cancellable: bool,
    migration: Option<Box<MigrationInfo>>,
    report: Option<Box<MigrationReport>>,
}

/// The job table and the host settings.
#[derive(Debug)]
pub struct JobTable {
    jobs: VecDeque<Job>,
    next_id: u64,
    settings: HostSettings,
}

impl Default for JobTable {
    fn default() -> Self {
        Self::new()
    }
}

fn capped(s: &str) -> String {
    cut(s, TEXT_MAX)
}

/// `s` cut to at most `max` bytes at a character boundary.
fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].into()
}

/// `s` for a `job-list` line: whole if short, else cut with `...`.
fn listed(s: &str) -> String {
    if s.len() <= LIST_TEXT_MAX {
        return s.into();
    }
    let mut t = cut(s, LIST_TEXT_MAX - 3);
    t.push_str("...");
    t
}

impl JobTable {
    /// An empty table with the default settings.
    pub fn new() -> Self {
        Self {
            jobs: VecDeque::new(),
            next_id: 1,
            settings: DEFAULT_SETTINGS,
        }
    }

    /// The host settings.
    pub fn settings(&self) -> HostSettings {
        self.settings
    }

    /// Change the limits (`None` keeps one); queued jobs that now fit start.
    pub fn set_limits(
        &mut self,
        live: Option<u32>,
        storage: Option<u32>,
        now_ns: u64,
    ) -> Result<HostSettings, JobError> {
        let ok = |v: Option<u32>| v.is_none_or(|v| (1..=LIMIT_MAX).contains(&v));
        if !ok(live) || !ok(storage) {
            return Err(JobError::BadLimit);
        }
        if let Some(v) = live {
            self.settings.max_live_migrations = v;
        }
        if let Some(v) = storage {
            self.settings.max_storage_migrations = v;
        }
        self.schedule(now_ns);
        Ok(self.settings)
    }

    fn limit(&self, kind: JobKind) -> Option<usize> {
        match kind {
            JobKind::LiveMigration => Some(self.settings.max_live_migrations as usize),
            JobKind::StorageMigration => Some(self.settings.max_storage_migrations as usize),
            JobKind::LinkBench | JobKind::StoreBench => None,
        }
    }

    fn running(&self, kind: JobKind) -> usize {
        self.jobs
            .iter()
            .filter(|j| j.kind == kind && j.state == JobState::Running)
            .count()
    }

    /// Whether a job of `kind` could start now ([`JobTable::start_now`]
    /// without `beyond_limit`): its kind is under the host's limit.
    pub fn has_room(&self, kind: JobKind) -> bool {
        self.limit(kind).is_none_or(|l| self.running(kind) < l)
    }

    /// Submit a job; it is queued and, if a slot is free, started at once.
    pub fn submit(
        &mut self,
        kind: JobKind,
        vm: &str,
        bytes_total: u64,
        cancellable: bool,
        now_ns: u64,
    ) -> Result<u64, JobError> {
        self.make_room()?;
        let id = self.push(kind, vm, bytes_total, cancellable, JobState::Queued, None);
        self.schedule(now_ns);
        Ok(id)
    }

    /// Start a job now or not at all: `AtLimit` when its kind is at the
    /// host's limit (unless `beyond_limit`: the destination's half of a
    /// move within this node, which the source's job already counts).
    pub fn start_now(
        &mut self,
        kind: JobKind,
        vm: &str,
        bytes_total: u64,
        cancellable: bool,
        beyond_limit: bool,
        now_ns: u64,
    ) -> Result<u64, JobError> {
        if !beyond_limit && !self.has_room(kind) {
            return Err(JobError::AtLimit);
        }
        self.make_room()?;
        Ok(self.push(
            kind,
            vm,
            bytes_total,
            cancellable,
            JobState::Running,
            Some(now_ns),
        ))
    }

    fn make_room(&mut self) -> Result<(), JobError> {
        if self.jobs.len() >= JOBS_MAX {
            let ended = self.jobs.iter().position(|j| j.state.is_final());
            match ended {
                Some(i) => {
                    self.jobs.remove(i);
                }
                None => return Err(JobError::TableFull),
            }
        }
        Ok(())
    }

    fn push(
        &mut self,
        kind: JobKind,
        vm: &str,
        bytes_total: u64,
        cancellable: bool,
        state: JobState,
        started_ns: Option<u64>,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.jobs.push_back(Job {
            id,
            kind,
            vm: capped(vm),
            state,
            bytes_done: 0,
            bytes_total,
            started_ns,
            ended_ns: None,
            error: None,
            result: None,
            cancellable,
            migration: None,
            report: None,
        });
        id
    }

    /// A live migration's progress (any state: the last one stays).
    pub fn set_migration(&mut self, id: u64, info: MigrationInfo) {
        if let Some(j) = self.get_mut(id) {
            j.bytes_done = info.bytes_sent;
            j.bytes_total = info.bytes_sent.saturating_add(info.bytes_remaining);
            j.migration = Some(Box::new(info));
        }
    }

    /// A live migration's report (shown by `job-show`).
    pub fn set_report(&mut self, id: u64, mut report: MigrationReport) {
        if let Some(j) = self.get_mut(id) {
            report.error = report.error.as_deref().map(capped);
            j.report = Some(Box::new(report));
        }
    }

    /// A running job's note (e.g. what it waits for), or none.
    pub fn set_note(&mut self, id: u64, note: Option<&str>) {
        if let Some(j) = self.get_mut(id).filter(|j| j.state == JobState::Running) {
            j.error = note.map(capped);
        }
    }

    /// Whether a running job may be cancelled.
    pub fn set_cancellable(&mut self, id: u64, cancellable: bool) {
        if let Some(j) = self.get_mut(id) {
            j.cancellable = cancellable;
        }
    }

    /// The kind of job `id`.
    pub fn kind(&self, id: u64) -> Option<JobKind> {
        self.jobs.iter().find(|j| j.id == id).map(|j| j.kind)
    }

    /// A running job ended cancelled (its owner stopped it).
    pub fn cancelled(&mut self, id: u64, why: &str, now_ns: u64) {
        if let Some(j) = self.get_mut(id).filter(|j| j.state == JobState::Running) {
            j.state = JobState::Cancelled;
            j.error = Some(capped(why));
            j.ended_ns = Some(now_ns);
        }
        self.schedule(now_ns);
    }

    /// Start queued jobs, oldest first, while their kind is under its limit.
    /// Returns the ids started.
    pub fn schedule(&mut self, now_ns: u64) -> Vec<u64> {
        let mut started = Vec::new();
        for i in 0..self.jobs.len() {
            let kind = self.jobs[i].kind;
            if self.jobs[i].state != JobState::Queued {
                continue;
            }
            if self.limit(kind).is_some_and(|l| self.running(kind) >= l) {
                continue;
            }
            let job = &mut self.jobs[i];
            job.state = JobState::Running;
            job.started_ns = Some(now_ns);
            started.push(job.id);
        }
        started
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut Job> {
        self.jobs.iter_mut().find(|j| j.id == id)
    }

    /// Whether job `id` is running (its owner should go on working).
    pub fn is_running(&self, id: u64) -> bool {
        self.jobs
            .iter()
            .any(|j| j.id == id && j.state == JobState::Running)
    }

    /// State of job `id`.
    pub fn state(&self, id: u64) -> Option<JobState> {
        self.jobs.iter().find(|j| j.id == id).map(|j| j.state)
    }

    /// Ids of running jobs of `kind`, oldest first.
    pub fn running_ids(&self, kind: JobKind) -> Vec<u64> {
        self.jobs
            .iter()
            .filter(|j| j.kind == kind && j.state == JobState::Running)
            .map(|j| j.id)
            .collect()
    }

    /// Progress of a running job (bytes done, and the total if it changed).
    pub fn progress(&mut self, id: u64, bytes_done: u64, bytes_total: Option<u64>) {
        if let Some(j) = self.get_mut(id).filter(|j| j.state == JobState::Running) {
            if let Some(t) = bytes_total {
                j.bytes_total = t;
            }
            j.bytes_done = bytes_done.min(j.bytes_total.max(bytes_done));
        }
    }

    /// A running job ended well, with an optional result text.
    pub fn complete(&mut self, id: u64, result: Option<&str>, now_ns: u64) {
        if let Some(j) = self.get_mut(id).filter(|j| j.state == JobState::Running) {
            j.state = JobState::Completed;
            j.error = None;
            j.bytes_done = j.bytes_total.max(j.bytes_done);
            j.result = result.map(capped);
            j.ended_ns = Some(now_ns);
        }
        self.schedule(now_ns);
    }

    /// A running job failed.
    pub fn fail(&mut self, id: u64, error: &str, now_ns: u64) {
        if let Some(j) = self.get_mut(id).filter(|j| j.state == JobState::Running) {
            j.state = JobState::Failed;
            j.error = Some(capped(error));
            j.ended_ns = Some(now_ns);
        }
        self.schedule(now_ns);
    }

    /// Cancel a queued or running cancellable job.
    pub fn cancel(&mut self, id: u64, now_ns: u64) -> Result<(), JobError> {
        let j = self.get_mut(id).ok_or(JobError::NotFound)?;
        if j.state.is_final() || !j.cancellable {
            return Err(JobError::NotCancellable);
        }
        j.state = JobState::Cancelled;
        j.error = Some("cancelled by request".into());
        j.ended_ns = Some(now_ns);
        self.schedule(now_ns);
        Ok(())
    }

    /// One job, with its migration report if it has one (`job-show`).
    pub fn info(&self, id: u64, now_ns: u64) -> Option<JobInfo> {
        self.jobs.iter().find(|j| j.id == id).map(|j| {
            let mut i = info(j, now_ns);
            i.report = j.report.clone();
            i
        })
    }

    /// Every job, oldest first, without reports (`job-list`: a reply must
    /// fit a frame).
    pub fn list(&self, now_ns: u64) -> Vec<JobInfo> {
        self.jobs
            .iter()
            .map(|j| {
                let mut i = info(j, now_ns);
                i.error = i.error.as_deref().map(listed);
                i.result = i.result.as_deref().map(listed);
                i
            })
            .collect()
    }
}

fn info(j: &Job, now_ns: u64) -> JobInfo {
    let percent = if j.state == JobState::Completed {
        100
    } else if j.bytes_total == 0 {
        0
    } else {
        // 100 only once it completed.
        ((u128::from(j.bytes_done.min(j.bytes_total)) * 100 / u128::from(j.bytes_total)) as u8)
            .min(99)
    };
    let elapsed_ns = match (j.started_ns, j.ended_ns) {
        (Some(s), Some(e)) => e.saturating_sub(s),
        (Some(s), None) => now_ns.saturating_sub(s),
        _ => 0,
    };
    JobInfo {
        id: j.id,
        kind: j.kind,
        vm: j.vm.clone(),
        state: j.state,
        percent,
        bytes_done: j.bytes_done,
        bytes_total: j.bytes_total,
        elapsed_ms: elapsed_ns / 1_000_000,
        error: j.error.clone(),
        cancellable: j.cancellable && !j.state.is_final(),
        result: j.result.clone(),
        migration: j.migration.clone(),
        report: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(t: &JobTable) -> Vec<JobState> {
        t.list(0).iter().map(|j| j.state).collect()
    }

    #[test]
    fn migrations_beyond_the_limit_queue_and_start_in_order() {
        use JobState::*;
        let mut t = JobTable::new();
        let ids: Vec<u64> = (0..4)
            .map(|i| {
                t.submit(
                    JobKind::LiveMigration,
                    &alloc::format!("vm{i}"),
                    100,
                    true,
                    0,
                )
                .unwrap()
            })
            .collect();
        let s = t
            .submit(JobKind::StorageMigration, "vm9", 100, true, 0)
            .unwrap();
        assert_eq!(states(&t), [Running, Running, Queued, Queued, Running]);
        t.complete(ids[0], None, 10);
        assert_eq!(states(&t), [Completed, Running, Running, Queued, Running]);
        // Cancelling a queued job never starts it.
        t.cancel(ids[3], 11).unwrap();
        t.fail(ids[1], "destination went away", 12);
        assert_eq!(states(&t), [Completed, Failed, Running, Cancelled, Running]);
        assert_eq!(t.running_ids(JobKind::LiveMigration), [ids[2]]);
        assert_eq!(t.running_ids(JobKind::StorageMigration), [s]);
        // Benchmarks are not limited.
        for _ in 0..5 {
            t.submit(JobKind::LinkBench, "", 1, true, 0).unwrap();
        }
        assert_eq!(t.running_ids(JobKind::LinkBench).len(), 5);
    }

    #[test]
    fn limits_change_and_are_checked() {
        use JobState::*;
        let mut t = JobTable::new();
        assert_eq!(t.set_limits(Some(0), None, 0), Err(JobError::BadLimit));
        assert_eq!(t.set_limits(None, Some(17), 0), Err(JobError::BadLimit));
        assert_eq!(t.settings(), DEFAULT_SETTINGS);
        t.set_limits(Some(1), Some(1), 0).unwrap();
        for _ in 0..3 {
            t.submit(JobKind::LiveMigration, "v", 1, true, 0).unwrap();
        }
        assert_eq!(states(&t), [Running, Queued, Queued]);
        t.set_limits(Some(3), None, 5).unwrap();
        assert_eq!(states(&t), [Running, Running, Running]);
        t.set_limits(Some(1), None, 6).unwrap();
        assert_eq!(
            states(&t),
            [Running, Running, Running],
            "lowering stops nothing"
        );
        assert_eq!(
            t.settings(),
            HostSettings {
                max_live_migrations: 1,
                max_storage_migrations: 1
            }
        );
    }

    #[test]
    fn progress_percent_elapsed_and_cancel() {
        let mut t = JobTable::new();
        let id = t
            .submit(JobKind::StorageMigration, "db", 1000, true, 1_000_000)
            .unwrap();
        t.progress(id, 250, None);
        let j = t.info(id, 3_000_000).unwrap();
        assert_eq!((j.percent, j.bytes_done, j.elapsed_ms), (25, 250, 2));
        assert!(j.cancellable);
        t.progress(id, 500, Some(2000));
        assert_eq!(t.info(id, 0).unwrap().percent, 25);
        t.cancel(id, 5_000_000).unwrap();
        assert!(!t.is_running(id));
        t.progress(id, 2000, None); // ignored: not running
        t.complete(id, Some("x"), 6_000_000); // ignored
        let j = t.info(id, 9_000_000).unwrap();
        assert_eq!(j.state, JobState::Cancelled);
        assert_eq!((j.bytes_done, j.elapsed_ms, j.cancellable), (500, 4, false));
        assert_eq!(t.cancel(id, 0), Err(JobError::NotCancellable));
        assert_eq!(t.cancel(99, 0), Err(JobError::NotFound));
        let fixed = t.submit(JobKind::LinkBench, "", 0, false, 0).unwrap();
        assert_eq!(t.cancel(fixed, 0), Err(JobError::NotCancellable));
        t.complete(fixed, Some(&"r".repeat(TEXT_MAX + 300)), 1);
        let j = t.info(fixed, 0).unwrap();
        assert_eq!((j.percent, j.result.unwrap().len()), (100, TEXT_MAX));
    }

    /// An in-doubt note or a failure runs past 200 bytes: `job-show`
    /// (and its report) has it whole, `job-list` a cut marked `...`.
    #[test]
    fn long_texts_reach_job_show_whole() {
        let mut t = JobTable::new();
        let id = t.submit(JobKind::LiveMigration, "v", 1, true, 0).unwrap();
        let note = alloc::format!(
            "switch-over in doubt after the go order was sent (link to b lost: {}): the \
             destination may be running; VM v stays paused here and this node asks b every 2 s",
            "x".repeat(200)
        );
        assert!(note.len() > 300);
        t.set_note(id, Some(&note));
        assert_eq!(t.info(id, 0).unwrap().error.as_deref(), Some(note.as_str()));
        let listed = t.list(0)[0].error.clone().unwrap();
        assert_eq!(listed.len(), LIST_TEXT_MAX);
        assert!(listed.ends_with("...") && note.starts_with(&listed[..LIST_TEXT_MAX - 3]));
        t.set_report(
            id,
            MigrationReport {
                error: Some(note.clone()),
                ..MigrationReport::default()
            },
        );
        t.fail(id, &note, 1);
        let shown = t.info(id, 2).unwrap();
        assert_eq!(shown.error.as_deref(), Some(note.as_str()));
        assert_eq!(shown.report.unwrap().error.as_deref(), Some(note.as_str()));
        // Still bounded.
        t.set_report(
            id,
            MigrationReport {
                error: Some("y".repeat(5000)),
                ..MigrationReport::default()
            },
        );
        assert_eq!(
            t.info(id, 2).unwrap().report.unwrap().error.unwrap().len(),
            TEXT_MAX
        );
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = JobTable::new();
        t.set_limits(Some(LIMIT_MAX), None, 0).unwrap();
        let first = t.submit(JobKind::LiveMigration, "v", 1, true, 0).unwrap();
        t.complete(first, None, 0);
        for _ in 1..JOBS_MAX {
            t.submit(JobKind::LiveMigration, "v", 1, true, 0).unwrap();
        }
        // Full: the ended job makes room, then nothing does.
        t.submit(JobKind::LiveMigration, "v", 1, true, 0).unwrap();
        assert!(t.info(first, 0).is_none());
        assert_eq!(
            t.submit(JobKind::LiveMigration, "v", 1, true, 0),
            Err(JobError::TableFull)
        );
        assert_eq!(t.list(0).len(), JOBS_MAX);
    }
}
