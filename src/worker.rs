//! The copy scheduler: completes cache copies in the background under the limits of the settings.
//!
//! A tokio task dispatches jobs from a de-duplicated queue, at most `ARENA_CACHE_MAX_CONCURRENCY`
//! at once (read anew for every dispatch, so a reload applies to new jobs). Each job runs on the
//! blocking pool and fetches, chunk by chunk and in file order, what no reader has fetched,
//! through the same [`CacheFile::ensure_chunk`] the readers use, so no chunk is fetched twice.
//!
//! Before each chunk a job
//! - waits while a reader is waiting on the NAS (foreground reads first: a cold model load is
//!   not slowed down by copies of other files),
//! - takes its bytes from the bandwidth cap (`ARENA_CACHE_BWLIMIT_MBPS`), and
//! - stops if the run's byte budget (`ARENA_CACHE_SESSION_BYTE_BUDGET`) would be exceeded.
//!
//! A job that fails on a NAS error is retried with exponential backoff; a copy is never marked
//! complete unless every chunk was written (the chunk map decides, not the job).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::Serialize;

use crate::cache::file::Chunk;
use crate::cache::{Cache, CacheFile, FetchError, Found};
use crate::config::{CacheState, Live};
use crate::policy::{Decision, category_of};
use crate::source::Nas;
use crate::stats::Stats;

/// Attempts per job before giving up on NAS errors.
const MAX_ATTEMPTS: u32 = 4;
/// First retry delay; doubles per attempt.
const RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest a copy waits for readers before it fetches a chunk anyway, so that a reader that
/// never stops cannot starve copies forever.
const MAX_YIELD: Duration = Duration::from_secs(30);

/// Why a copy was queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A reader loaded it for real (read past the threshold).
    Loaded,
    /// It is in the required set.
    Required,
    /// An explicit prefetch.
    Prefetch,
    /// Eager mode at start.
    Eager,
    /// The prefetch allow-list.
    Allowlist,
}

/// Why a bulk request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// Within the cooldown of the previous bulk request.
    #[error(
        "a bulk request came {elapsed_ms} ms after the previous one; retry in {retry_after_ms} ms"
    )]
    CooldownActive {
        /// Milliseconds until a request is accepted.
        retry_after_ms: u64,
        /// Milliseconds since the previous request.
        elapsed_ms: u64,
    },
    /// The bytes to copy exceed what is left of the budget.
    #[error(
        "copying needs {needed} bytes but only {remaining} are left of the session byte budget"
    )]
    BudgetExceeded {
        /// Bytes the request would fetch.
        needed: u64,
        /// Bytes left of the budget.
        remaining: u64,
    },
}

/// One file of a bulk request.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Planned {
    /// NAS-relative path.
    pub path: PathBuf,
    /// Size on the NAS (0 when not found).
    pub size: u64,
    /// Bytes not yet in the cache.
    pub missing: u64,
    /// Queued, or why not.
    pub outcome: Outcome,
}

impl Planned {
    fn not_found(p: &Path) -> Self {
        Self {
            path: p.to_path_buf(),
            size: 0,
            missing: 0,
            outcome: Outcome::NotFound,
        }
    }

    /// Bytes a request would fetch for this file.
    pub fn to_fetch(&self) -> u64 {
        match self.outcome {
            Outcome::Queued => self.missing,
            _ => 0,
        }
    }
}

/// What a bulk request did with one file.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Queued for copying.
    Queued,
    /// Already complete.
    Complete,
    /// Already queued or running.
    AlreadyQueued,
    /// Not on the NAS (or not a regular file).
    NotFound,
    /// The policy does not cache it.
    NotAllowed(Decision),
    /// Caching is in the green or gray state.
    CachingOff,
}

/// Progress of a running copy.
#[derive(Debug)]
struct Progress {
    reason: Reason,
    total: u64,
    done: AtomicU64,
    fetched: AtomicU64,
    started: Instant,
}

/// A running or queued copy, as the status API shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct JobInfo {
    /// NAS-relative path.
    pub path: PathBuf,
    /// Why it was queued.
    pub reason: Reason,
    /// "running" or "queued".
    pub state: &'static str,
    /// File size.
    pub total_bytes: u64,
    /// Bytes present in the cache.
    pub done_bytes: u64,
    /// Fetch rate of this job, bytes/s.
    pub rate_bytes_per_sec: f64,
    /// Estimated seconds left at that rate.
    pub eta_secs: Option<f64>,
}

struct Job {
    rel: PathBuf,
    reason: Reason,
    /// Size on the NAS when queued.
    size: u64,
    attempts: u32,
    not_before: Instant,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    queued: HashSet<PathBuf>,
    running: HashMap<PathBuf, Arc<Progress>>,
    cancelled: HashSet<PathBuf>,
    required: HashSet<PathBuf>,
    /// The last accepted bulk request, per client id (`None`: requests without one).
    last_bulk: HashMap<Option<String>, Instant>,
    stopping: bool,
}

/// Counts readers waiting on the NAS; copies wait while there are any.
#[derive(Debug, Default)]
pub struct Foreground {
    active: AtomicUsize,
    lock: Mutex<()>,
    idle: Condvar,
}

/// Held by a reader while it reads from the NAS.
pub struct ForegroundGuard<'a>(&'a Foreground);

impl Foreground {
    /// Marks a reader as waiting on the NAS until the guard drops.
    pub fn enter(&self) -> ForegroundGuard<'_> {
        self.active.fetch_add(1, Ordering::AcqRel);
        ForegroundGuard(self)
    }

    /// Waits until no reader waits on the NAS (at most `max`); returns whether it waited.
    pub fn wait_idle(&self, max: Duration) -> bool {
        if self.active.load(Ordering::Acquire) == 0 {
            return false;
        }
        let deadline = Instant::now() + max;
        let mut g = self.lock.lock();
        while self.active.load(Ordering::Acquire) > 0 {
            if self.idle.wait_until(&mut g, deadline).timed_out() {
                break;
            }
        }
        true
    }
}

impl Drop for ForegroundGuard<'_> {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _g = self.0.lock.lock();
            self.0.idle.notify_all();
        }
    }
}

/// A token bucket over all background copies.
struct Bandwidth {
    available: f64,
    last: Instant,
}

/// The copy scheduler of one mount.
pub struct Worker {
    live: Arc<Live>,
    nas: Arc<Nas>,
    cache: Arc<Cache>,
    stats: Arc<Stats>,
    state: Mutex<State>,
    wake: tokio::sync::Notify,
    foreground: Arc<Foreground>,
    bandwidth: Mutex<Bandwidth>,
    stopped: AtomicBool,
    rt: tokio::runtime::Handle,
    health: std::sync::OnceLock<Arc<crate::health::Health>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").finish_non_exhaustive()
    }
}

impl Worker {
    /// Starts the dispatcher on `rt`.
    pub fn start(
        rt: tokio::runtime::Handle,
        live: Arc<Live>,
        nas: Arc<Nas>,
        cache: Arc<Cache>,
        stats: Arc<Stats>,
        foreground: Arc<Foreground>,
    ) -> Arc<Self> {
        let worker = Arc::new(Self {
            live,
            nas,
            cache,
            stats,
            state: Mutex::new(State::default()),
            wake: tokio::sync::Notify::new(),
            foreground,
            bandwidth: Mutex::new(Bandwidth {
                available: 0.0,
                last: Instant::now(),
            }),
            stopped: AtomicBool::new(false),
            rt: rt.clone(),
            health: std::sync::OnceLock::new(),
        });
        let w = worker.clone();
        rt.spawn(async move { w.dispatch().await });
        worker
    }

    /// Starts no copy while `health` says the NAS is offline.
    pub fn watch_health(&self, health: Arc<crate::health::Health>) {
        let _ = self.health.set(health);
    }

    fn nas_offline(&self) -> bool {
        self.health.get().is_some_and(|h| h.offline())
    }

    /// Readers register here while they wait on the NAS.
    pub fn foreground(&self) -> &Foreground {
        &self.foreground
    }

    /// Queues a copy of `rel` (`size` bytes on the NAS, as last seen: what the status shows until
    /// the copy opens the file) unless it is queued or running. Returns whether it was queued.
    pub fn enqueue(&self, rel: &Path, reason: Reason, size: u64) -> bool {
        if self.live.settings().state() != CacheState::Red {
            return false;
        }
        let mut st = self.state.lock();
        if st.stopping || st.running.contains_key(rel) || !st.queued.insert(rel.to_path_buf()) {
            return false;
        }
        st.cancelled.remove(rel);
        st.queue.push_back(Job {
            rel: rel.to_path_buf(),
            reason,
            size,
            attempts: 0,
            not_before: Instant::now(),
        });
        drop(st);
        tracing::debug!(path = %rel.display(), ?reason, "copy queued");
        self.wake.notify_one();
        true
    }

    /// What a request for `paths` would do, without doing it: for each file its size, the bytes
    /// not yet cached and whether it would be queued (or why not).
    pub fn plan(&self, paths: &[PathBuf]) -> Vec<Planned> {
        let making = self.live.settings().state() == CacheState::Red;
        let policy = self.live.policy();
        let st = self.state.lock();
        let busy: HashSet<&PathBuf> = paths
            .iter()
            .filter(|p| st.queued.contains(*p) || st.running.contains_key(*p))
            .collect();
        drop(st);
        paths
            .iter()
            .map(|p| {
                let Ok(st) = self.nas.stat(p) else {
                    return Planned::not_found(p);
                };
                if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                    return Planned::not_found(p);
                }
                let size = st.st_size as u64;
                let missing = self.cache.missing_bytes(p, self.cache.rule().identity(&st));
                let outcome = match policy.decide(p, size) {
                    Decision::Cache if missing == 0 => Outcome::Complete,
                    Decision::Cache if !making => Outcome::CachingOff,
                    Decision::Cache if busy.contains(p) => Outcome::AlreadyQueued,
                    Decision::Cache => Outcome::Queued,
                    Decision::Disabled => Outcome::CachingOff,
                    d => Outcome::NotAllowed(d),
                };
                Planned {
                    path: p.clone(),
                    size,
                    missing,
                    outcome,
                }
            })
            .collect()
    }

    /// A bulk request (prefetch list, required set, allow-list): checks the cooldown and the
    /// byte budget for the whole list, then queues what needs copying. Nothing is queued when
    /// the request is refused.
    pub fn request(
        &self,
        paths: &[PathBuf],
        reason: Reason,
        bulk: bool,
    ) -> Result<Vec<Planned>, RequestError> {
        self.commit(self.plan(paths), reason, bulk)
    }

    /// The second half of [`Worker::request`], for a plan made beforehand (the NAS is looked at
    /// in [`Worker::plan`] only): checks the cooldown and the budget, then queues.
    pub fn commit(
        &self,
        planned: Vec<Planned>,
        reason: Reason,
        bulk: bool,
    ) -> Result<Vec<Planned>, RequestError> {
        self.commit_as(planned, reason, bulk, None)
    }

    /// [`Worker::commit`] for `client`: each client id has a cooldown of its own; requests
    /// without one share the original's.
    pub fn commit_as(
        &self,
        mut planned: Vec<Planned>,
        reason: Reason,
        bulk: bool,
        client: Option<&str>,
    ) -> Result<Vec<Planned>, RequestError> {
        let settings = self.live.settings();
        let mut st = self.state.lock();
        let client = client.map(str::to_owned);
        if bulk && let Some(&last) = st.last_bulk.get(&client) {
            let elapsed = last.elapsed();
            if elapsed < settings.cooldown {
                return Err(RequestError::CooldownActive {
                    retry_after_ms: (settings.cooldown - elapsed).as_millis() as u64,
                    elapsed_ms: elapsed.as_millis() as u64,
                });
            }
        }
        let needed: u64 = planned
            .iter()
            .filter(|p| !st.queued.contains(&p.path) && !st.running.contains_key(&p.path))
            .map(Planned::to_fetch)
            .sum();
        if settings.session_byte_budget > 0 {
            let remaining = self.budget_remaining(settings.session_byte_budget);
            if needed > remaining {
                return Err(RequestError::BudgetExceeded { needed, remaining });
            }
        }
        if bulk {
            // Forgets requests whose cooldown is long over (client ids are bounded by the API).
            let keep = settings.cooldown.max(Duration::from_secs(3600));
            st.last_bulk.retain(|_, t| t.elapsed() < keep);
            st.last_bulk.insert(client, Instant::now());
        }
        drop(st);
        for p in &mut planned {
            if p.outcome == Outcome::Queued && !self.enqueue(&p.path, reason, p.size) {
                p.outcome = Outcome::AlreadyQueued;
            }
        }
        Ok(planned)
    }

    /// Cancels queued and running copies of `paths` (running ones stop at the next chunk; what
    /// they fetched stays cached).
    pub fn cancel(&self, paths: &[PathBuf]) -> usize {
        let mut st = self.state.lock();
        let mut n = 0;
        let mut dequeued: HashSet<&PathBuf> = HashSet::new();
        for p in paths {
            if st.queued.remove(p) {
                dequeued.insert(p);
                n += 1;
            }
            if st.running.contains_key(p) {
                st.cancelled.insert(p.clone());
                n += 1;
            }
        }
        if !dequeued.is_empty() {
            st.queue.retain(|j| !dequeued.contains(&j.rel));
        }
        n
    }

    /// Cancels the copies of every path at or below `prefix`.
    pub fn cancel_under(&self, prefix: &Path) -> usize {
        let paths: Vec<PathBuf> = {
            let st = self.state.lock();
            st.queued
                .iter()
                .chain(st.running.keys())
                .filter(|p| p.starts_with(prefix))
                .cloned()
                .collect()
        };
        self.cancel(&paths)
    }

    /// Replaces the required set (the models the active workflow needs).
    pub fn set_required(&self, paths: &[PathBuf]) {
        self.state.lock().required = paths.iter().cloned().collect();
    }

    /// Whether `rel` is in the required set.
    pub fn is_required(&self, rel: &Path) -> bool {
        self.state.lock().required.contains(rel)
    }

    /// Number of files in the required set.
    pub fn required_len(&self) -> usize {
        self.state.lock().required.len()
    }

    /// Whether any of `paths` is queued or running.
    pub fn busy_with(&self, paths: &[PathBuf]) -> bool {
        let st = self.state.lock();
        paths
            .iter()
            .any(|p| st.queued.contains(p) || st.running.contains_key(p))
    }

    /// How many of `paths` are queued or running.
    pub fn busy_count(&self, paths: &[PathBuf]) -> usize {
        let st = self.state.lock();
        paths
            .iter()
            .filter(|p| st.queued.contains(*p) || st.running.contains_key(*p))
            .count()
    }

    /// Bytes left of the byte budget (`u64::MAX` without one).
    pub fn budget_remaining(&self, budget: u64) -> u64 {
        if budget == 0 {
            return u64::MAX;
        }
        budget.saturating_sub(self.stats.session_bytes_downloaded.load(Ordering::Relaxed))
    }

    /// Running copies first, then the queue.
    pub fn jobs(&self) -> Vec<JobInfo> {
        let st = self.state.lock();
        let mut out: Vec<JobInfo> = st
            .running
            .iter()
            .map(|(p, pr)| {
                let done = pr.done.load(Ordering::Relaxed);
                let secs = pr.started.elapsed().as_secs_f64().max(1e-3);
                let rate = pr.fetched.load(Ordering::Relaxed) as f64 / secs;
                JobInfo {
                    path: p.clone(),
                    reason: pr.reason,
                    state: "running",
                    total_bytes: pr.total,
                    done_bytes: done,
                    rate_bytes_per_sec: rate,
                    eta_secs: (rate > 0.0).then(|| pr.total.saturating_sub(done) as f64 / rate),
                }
            })
            .collect();
        out.extend(st.queue.iter().map(|j| JobInfo {
            path: j.rel.clone(),
            reason: j.reason,
            state: "queued",
            total_bytes: j.size,
            done_bytes: 0,
            rate_bytes_per_sec: 0.0,
            eta_secs: None,
        }));
        out
    }

    /// Number of queued (not running) copies.
    pub fn queue_len(&self) -> usize {
        self.state.lock().queue.len()
    }

    /// Whether the worker still dispatches copies (it has not been stopped).
    pub fn is_running(&self) -> bool {
        !self.stopped.load(Ordering::Acquire)
    }

    /// Stops dispatching; running copies stop at the next chunk. Waits for them.
    pub fn stop(&self) {
        {
            let mut st = self.state.lock();
            st.stopping = true;
            st.queue.clear();
            st.queued.clear();
        }
        self.stopped.store(true, Ordering::Release);
        self.wake.notify_one();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.state.lock().running.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    async fn dispatch(self: Arc<Self>) {
        loop {
            let mut next_due: Option<Instant> = None;
            {
                let mut st = self.state.lock();
                if st.stopping {
                    return;
                }
                let max = self.live.settings().max_concurrency;
                let now = Instant::now();
                if self.nas_offline() && !st.queue.is_empty() {
                    // Copies wait for the NAS to come back; look again in a second.
                    next_due = Some(now + Duration::from_secs(1));
                }
                while st.running.len() < max && !self.nas_offline() {
                    let Some(pos) = st.queue.iter().position(|j| j.not_before <= now) else {
                        next_due = st.queue.iter().map(|j| j.not_before).min();
                        break;
                    };
                    let job = st.queue.remove(pos).expect("position is valid");
                    st.queued.remove(&job.rel);
                    let progress = Arc::new(Progress {
                        reason: job.reason,
                        total: job.size,
                        done: AtomicU64::new(0),
                        fetched: AtomicU64::new(0),
                        started: Instant::now(),
                    });
                    st.running.insert(job.rel.clone(), progress);
                    let w = self.clone();
                    self.rt.spawn(async move {
                        let w2 = w.clone();
                        let result = tokio::task::spawn_blocking(move || w2.run_job(job)).await;
                        if let Err(e) = result {
                            tracing::error!(error = %e, "copy job panicked");
                        }
                        w.wake.notify_one();
                    });
                }
            }
            let sleep = next_due
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    fn run_job(&self, mut job: Job) {
        let result = self.copy(&job);
        let mut st = self.state.lock();
        st.running.remove(&job.rel);
        st.cancelled.remove(&job.rel);
        match result {
            Ok(()) => {}
            Err(JobError::Retry(e)) if job.attempts + 1 < MAX_ATTEMPTS && !st.stopping => {
                job.attempts += 1;
                Stats::add(&self.stats.copy_retries, 1);
                let delay = RETRY_BASE * 2u32.pow(job.attempts - 1);
                tracing::warn!(path = %job.rel.display(), error = %e, attempt = job.attempts, ?delay, "copy failed; retrying");
                job.not_before = Instant::now() + delay;
                if st.queued.insert(job.rel.clone()) {
                    st.queue.push_back(job);
                }
            }
            Err(JobError::Skipped(why)) => {
                tracing::info!(path = %job.rel.display(), why, "copy stopped");
            }
            // Not an attempt: the file is read from the NAS until its mtime is old enough.
            Err(JobError::NotYet(wait)) if !st.stopping => {
                tracing::debug!(path = %job.rel.display(), ?wait, "modified too recently to copy; waiting");
                job.not_before = Instant::now() + wait;
                if st.queued.insert(job.rel.clone()) {
                    st.queue.push_back(job);
                }
            }
            Err(e) => {
                Stats::add(&self.stats.copies_failed, 1);
                tracing::warn!(path = %job.rel.display(), error = %e, "copy failed");
            }
        }
    }

    fn copy(&self, job: &Job) -> Result<(), JobError> {
        let rel = &job.rel;
        let file = self.nas.open_file(rel).map_err(JobError::Retry)?;
        let st = nix::sys::stat::fstat(&file).map_err(|e| JobError::Retry(e.into()))?;
        let identity = self.cache.rule().identity(&st);
        let young = crate::source::unstable_for(&identity, self.live.settings().stable_after);
        if !young.is_zero() {
            return Err(JobError::NotYet(young));
        }
        if self.live.settings().state() != CacheState::Red {
            return Err(JobError::Skipped("caching is not active"));
        }
        if self.live.policy().decide(rel, identity.size) != Decision::Cache {
            return Err(JobError::Skipped("the policy does not cache it"));
        }
        let perms = Some(crate::cache::Perms::of(&st));
        let cf = match self.cache.find(rel, identity, perms, true, false) {
            Ok(Found::Partial(cf)) => cf,
            Ok(Found::Complete(_)) => return Ok(()),
            Ok(Found::None) => {
                Stats::add(&self.stats.copies_no_space, 1);
                return Err(JobError::Skipped("it does not fit in the cache"));
            }
            Err(e) => return Err(JobError::Cache(e.to_string())),
        };
        let progress = self.state.lock().running.get(rel).cloned();
        let progress = progress.map(|p| {
            Arc::new(Progress {
                reason: p.reason,
                total: identity.size,
                done: AtomicU64::new(cf.map().present_bytes()),
                fetched: AtomicU64::new(0),
                started: p.started,
            })
        });
        if let Some(p) = &progress {
            self.state.lock().running.insert(rel.clone(), p.clone());
        }
        let result = self.fill(&cf, &file, rel, progress.as_deref());
        self.cache.mark_dirty(&cf);
        if result.is_ok() && cf.is_complete() {
            Stats::add(&self.stats.copies_completed, 1);
            self.stats
                .category(category_of(rel), |c| c.copies_completed += 1);
        }
        result
    }

    fn fill(
        &self,
        cf: &Arc<CacheFile>,
        file: &std::fs::File,
        rel: &Path,
        progress: Option<&Progress>,
    ) -> Result<(), JobError> {
        let mut next = 0;
        while let Some(idx) = cf.next_missing(next) {
            if self.stopped.load(Ordering::Acquire) {
                return Err(JobError::Skipped("the daemon is stopping"));
            }
            if self.state.lock().cancelled.contains(rel) {
                return Err(JobError::Skipped("cancelled"));
            }
            if self.foreground.wait_idle(MAX_YIELD) {
                Stats::add(&self.stats.worker_yields, 1);
            }
            let settings = self.live.settings();
            let (start, end) = cf.map().chunk_range(idx);
            let len = end - start;
            if settings.session_byte_budget > 0
                && self.budget_remaining(settings.session_byte_budget) < len
            {
                return Err(JobError::Skipped(
                    "the session byte budget is spent (BUDGET_EXCEEDED)",
                ));
            }
            self.throttle(len, settings.bwlimit);
            match cf.ensure_chunk(idx, file) {
                Ok(Chunk::Fetched(n)) => {
                    Stats::add(&self.stats.bytes_fetched, n);
                    self.stats
                        .category(category_of(rel), |c| c.bytes_fetched += n);
                    Stats::add(&self.stats.session_bytes_downloaded, n);
                    if let Some(p) = progress {
                        p.fetched.fetch_add(n, Ordering::Relaxed);
                    }
                    self.cache.mark_dirty(cf);
                }
                Ok(Chunk::Present) => {}
                Err(FetchError::Changed) => {
                    Stats::add(&self.stats.stale_dropped, 1);
                    let _ = self.cache.discard(rel);
                    return Err(JobError::Skipped("the NAS file changed"));
                }
                Err(FetchError::Disabled | FetchError::NotCached) => {
                    return Err(JobError::Skipped("the cache copy was given up"));
                }
                Err(FetchError::Nas(e)) => return Err(JobError::Retry(e)),
            }
            if let Some(p) = progress {
                p.done.store(cf.map().present_bytes(), Ordering::Relaxed);
            }
            next = idx + 1;
        }
        Ok(())
    }

    /// Takes `bytes` from the bandwidth cap, sleeping as needed.
    fn throttle(&self, bytes: u64, limit: u64) {
        if limit == 0 {
            return;
        }
        let wait = {
            let mut b = self.bandwidth.lock();
            let now = Instant::now();
            let rate = limit as f64;
            // At most one second of burst.
            b.available = (b.available + now.duration_since(b.last).as_secs_f64() * rate).min(rate);
            b.last = now;
            b.available -= bytes as f64;
            if b.available < 0.0 {
                Duration::from_secs_f64(-b.available / rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error("{0}")]
    Retry(std::io::Error),
    #[error("not copied: {0}")]
    Skipped(&'static str),
    #[error("cache error: {0}")]
    Cache(String),
    /// The NAS file was modified too recently to copy (`ARENA_CACHE_STABLE_SECS`).
    #[error("modified too recently; again in {0:?}")]
    NotYet(Duration),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Store;
    use crate::config::Settings;
    use crate::source::IdentityRule;

    fn setup(settings: Settings) -> (tempfile::TempDir, tokio::runtime::Runtime, Arc<Worker>) {
        let dir = tempfile::tempdir().unwrap();
        let nas_dir = dir.path().join("nas");
        std::fs::create_dir_all(nas_dir.join("loras")).unwrap();
        for i in 0..3 {
            std::fs::write(
                nas_dir.join(format!("loras/f{i}.safetensors")),
                vec![i as u8; 1000],
            )
            .unwrap();
        }
        let live = Arc::new(Live::new(settings));
        let stats = Arc::new(Stats::default());
        let store = Store::open(&dir.path().join("cache")).unwrap();
        let cache = Cache::new(
            store,
            IdentityRule::SizeMtimeIno,
            4096,
            live.clone(),
            stats.clone(),
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let w = Worker::start(
            rt.handle().clone(),
            live,
            Arc::new(Nas::open(&nas_dir).unwrap()),
            cache,
            stats,
            Arc::new(Foreground::default()),
        );
        (dir, rt, w)
    }

    fn paths(n: &[usize]) -> Vec<PathBuf> {
        n.iter()
            .map(|i| PathBuf::from(format!("loras/f{i}.safetensors")))
            .collect()
    }

    #[test]
    fn cooldown_between_bulk_requests() {
        let (_d, _rt, w) = setup(Settings {
            min_size: 0,
            cooldown: Duration::from_secs(60),
            ..Settings::default()
        });
        let planned = w.request(&paths(&[0]), Reason::Prefetch, true).unwrap();
        assert_eq!(planned[0].outcome, Outcome::Queued);
        match w.request(&paths(&[1]), Reason::Prefetch, true) {
            Err(RequestError::CooldownActive { retry_after_ms, .. }) => {
                assert!(retry_after_ms > 50_000 && retry_after_ms <= 60_000)
            }
            other => panic!("{other:?}"),
        }
        // Not bulk (a single file loaded for real): no cooldown.
        assert!(w.request(&paths(&[1]), Reason::Loaded, false).is_ok());
        w.stop();
    }

    #[test]
    fn budget_refuses_the_whole_request_and_queues_nothing() {
        let (_d, _rt, w) = setup(Settings {
            min_size: 0,
            session_byte_budget: 1500,
            ..Settings::default()
        });
        match w.request(&paths(&[0, 1]), Reason::Prefetch, true) {
            Err(RequestError::BudgetExceeded { needed, remaining }) => {
                assert_eq!((needed, remaining), (2000, 1500))
            }
            other => panic!("{other:?}"),
        }
        assert!(w.jobs().is_empty());
        let planned = w
            .request(
                &[PathBuf::from("loras/none"), PathBuf::from("vae/x")],
                Reason::Prefetch,
                false,
            )
            .unwrap();
        assert_eq!(planned[0].outcome, Outcome::NotFound);
        w.stop();
    }

    #[test]
    fn nas_errors_are_retried_with_backoff_then_fail() {
        let (_d, _rt, w) = setup(Settings {
            min_size: 0,
            ..Settings::default()
        });
        // Not on the NAS: every attempt fails to open it.
        assert!(w.enqueue(Path::new("loras/gone.safetensors"), Reason::Prefetch, 123));
        // Queued, running or waiting to retry, it shows the size it was queued with (the job
        // leaves the list only under the lock that requeues it, after ≥ 7 s of backoff).
        assert_eq!(w.jobs()[0].total_bytes, 123);
        let start = Instant::now();
        while w.stats.copies_failed.load(Ordering::Relaxed) == 0 {
            assert!(start.elapsed() < Duration::from_secs(30), "never gave up");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            w.stats.copy_retries.load(Ordering::Relaxed),
            u64::from(MAX_ATTEMPTS - 1)
        );
        // 1 s + 2 s + 4 s of backoff.
        assert!(start.elapsed() >= Duration::from_secs(7));
        assert!(w.jobs().is_empty());
        w.stop();
    }

    #[test]
    fn green_state_makes_no_copies() {
        let (_d, _rt, w) = setup(Settings {
            min_size: 0,
            autopatch: false,
            ..Settings::default()
        });
        let planned = w.request(&paths(&[0]), Reason::Prefetch, true).unwrap();
        assert_eq!(planned[0].outcome, Outcome::CachingOff);
        assert!(!w.enqueue(Path::new("loras/f0.safetensors"), Reason::Loaded, 0));
        w.stop();
    }
}
