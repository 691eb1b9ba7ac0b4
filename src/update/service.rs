//! The updater inside the daemon: runs started through the control API or by the schedule
//! (`ARENA_UPDATE_WINDOW`), one at a time, on a thread of their own (a hung NAS or service stalls
//! the run, never the mount or the control API); an install waits while its target is open
//! through the mount; what ran, what is available and what failed are kept for status and
//! metrics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use super::manifest::{Manifest, Model};
use super::store::now;
use super::window::Windows;
use super::{Outcome, Settings, Updater};
use crate::config::Live;
use crate::worker::{Reason, Worker};

/// What a run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Ask the services.
    Check,
    /// Check, download, verify, install.
    Apply,
    /// Put the previous versions back.
    Rollback,
}

/// Why a run cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No manifest configured.
    #[error(
        "no manifest: set ARENA_UPDATE_MANIFEST (env file, environment or -o update_manifest=)"
    )]
    NoManifest,
    /// The manifest cannot be used.
    #[error("{0}")]
    BadManifest(String),
    /// An id that the manifest does not have.
    #[error("{0}")]
    UnknownModel(String),
    /// Another run is going on.
    #[error("an update run ({0:?}) is going on; wait for it to end")]
    AlreadyRunning(Kind),
    /// Endpoints or tokens that cannot be used.
    #[error("{0}")]
    Settings(String),
}

/// One model of a running run.
#[derive(Clone, Debug, Serialize)]
pub struct ModelProgress {
    /// The model's id.
    pub id: String,
    /// `waiting`, `working`, `downloading`, `waiting_for_readers` (the target is open through
    /// the mount), `done`.
    pub state: &'static str,
    /// Bytes downloaded so far (with what an earlier attempt left).
    pub done_bytes: u64,
    /// The file's size, when known.
    pub total_bytes: Option<u64>,
}

/// A run going on.
#[derive(Clone, Debug, Serialize)]
pub struct Running {
    /// What it does.
    pub kind: Kind,
    /// Started by the schedule (else through the API).
    pub scheduled: bool,
    /// Only says what it would do.
    pub dry_run: bool,
    /// When it started (seconds since the epoch).
    pub started_at: u64,
    /// Its models.
    pub models: Vec<ModelProgress>,
}

/// The last run that ended.
#[derive(Clone, Debug, Serialize)]
pub struct Finished {
    /// What it did.
    pub kind: Kind,
    /// Started by the schedule.
    pub scheduled: bool,
    /// When it started and ended.
    pub started_at: u64,
    /// When it ended.
    pub finished_at: u64,
    /// A number that grows with each run (to tell runs apart).
    pub run: u64,
    /// What it did to each model.
    pub outcomes: Vec<Outcome>,
}

/// The updater's part of `/arena/status` and `/arena/update/status`.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// The manifest configured.
    pub manifest: Option<PathBuf>,
    /// The windows configured.
    pub window: Option<String>,
    /// Whether a window is open now.
    pub window_open: bool,
    /// The run going on.
    pub running: Option<Running>,
    /// The last run that ended.
    pub last: Option<Finished>,
    /// Models whose last check found a version other than the installed one.
    pub available: Vec<String>,
    /// When the last check of any model was (seconds since the epoch).
    pub last_check_at: Option<u64>,
    /// Bytes downloaded since the daemon started.
    pub downloaded_bytes: u64,
    /// Failures since the daemon started, by reason.
    pub failures: BTreeMap<&'static str, u64>,
    /// How many times the schedule looked at the window (it does every second while a
    /// manifest and a window are set).
    pub schedule_ticks: u64,
}

#[derive(Default)]
struct Inner {
    running: Option<Running>,
    last: Option<Finished>,
    available: BTreeMap<String, bool>,
    last_check_at: Option<u64>,
    runs: u64,
    /// A scheduled run started in the window open now.
    window_done: bool,
}

/// Whether a NAS-relative path is open through the mount.
pub type IsOpen = Box<dyn Fn(&Path) -> bool + Send + Sync>;

/// The daemon's updater.
pub struct UpdateService {
    nas_dir: PathBuf,
    live: Arc<Live>,
    worker: Arc<Worker>,
    is_open: IsOpen,
    inner: Mutex<Inner>,
    downloaded: AtomicU64,
    failures: Mutex<BTreeMap<&'static str, u64>>,
    ticks: AtomicU64,
    /// How long a run started through the API waits for readers of a target (scheduled runs
    /// wait while their window is open).
    pub max_reader_wait: Duration,
}

impl UpdateService {
    /// The updater of the NAS at `nas_dir`.
    pub fn new(nas_dir: &Path, live: Arc<Live>, worker: Arc<Worker>, is_open: IsOpen) -> Self {
        UpdateService {
            nas_dir: nas_dir.to_path_buf(),
            live,
            worker,
            is_open,
            inner: Mutex::new(Inner::default()),
            downloaded: AtomicU64::new(0),
            failures: Mutex::new(BTreeMap::new()),
            ticks: AtomicU64::new(0),
            max_reader_wait: Duration::from_secs(600),
        }
    }

    fn windows(&self) -> Option<Windows> {
        self.live
            .settings()
            .update_window
            .as_deref()
            .and_then(|w| Windows::parse(w).ok())
    }

    /// What the updater is doing and did (no NAS call).
    pub fn status(&self) -> Status {
        let s = self.live.settings();
        let inner = self.inner.lock();
        Status {
            manifest: s.update_manifest.clone(),
            window: s.update_window.clone(),
            window_open: self.windows().is_some_and(|w| w.open_now()),
            running: inner.running.clone(),
            last: inner.last.clone(),
            available: inner
                .available
                .iter()
                .filter(|(_, a)| **a)
                .map(|(id, _)| id.clone())
                .collect(),
            last_check_at: inner.last_check_at,
            downloaded_bytes: self.downloaded.load(Ordering::Relaxed),
            failures: self.failures.lock().clone(),
            schedule_ticks: self.ticks.load(Ordering::Relaxed),
        }
    }

    /// Starts a run of `kind` over `ids` (all models for none), in the background.
    pub fn start(
        self: &Arc<Self>,
        kind: Kind,
        ids: &[String],
        dry_run: bool,
        scheduled: bool,
    ) -> Result<Running, StartError> {
        let s = self.live.settings();
        let path = s.update_manifest.clone().ok_or(StartError::NoManifest)?;
        let manifest = Manifest::load(&path).map_err(|e| StartError::BadManifest(e.to_string()))?;
        let models: Vec<Model> = manifest
            .select(ids)
            .map_err(StartError::UnknownModel)?
            .into_iter()
            .cloned()
            .collect();
        let settings = Settings::resolve(&s).map_err(StartError::Settings)?;
        let updater = Updater::new(&self.nas_dir, settings).map_err(StartError::Settings)?;
        let running = Running {
            kind,
            scheduled,
            dry_run,
            started_at: now(),
            models: models
                .iter()
                .map(|m| ModelProgress {
                    id: m.id.clone(),
                    state: "waiting",
                    done_bytes: 0,
                    total_bytes: None,
                })
                .collect(),
        };
        {
            let mut inner = self.inner.lock();
            if let Some(r) = &inner.running {
                return Err(StartError::AlreadyRunning(r.kind));
            }
            inner.running = Some(running.clone());
        }
        tracing::info!(
            ?kind,
            scheduled,
            dry_run,
            models = models.len(),
            "update run started"
        );
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("arenafs-update".into())
            .spawn(move || me.run(kind, updater, models, dry_run, scheduled));
        if let Err(e) = spawned {
            self.inner.lock().running = None;
            return Err(StartError::Settings(format!("cannot start a thread: {e}")));
        }
        Ok(running)
    }

    fn set(&self, i: usize, state: &'static str, done: Option<(u64, Option<u64>)>) {
        if let Some(r) = self.inner.lock().running.as_mut()
            && let Some(p) = r.models.get_mut(i)
        {
            p.state = state;
            if let Some((d, t)) = done {
                p.done_bytes = d;
                p.total_bytes = t;
            }
        }
    }

    /// Waits while `rel` is open through the mount: a scheduled run while its window is open,
    /// a run started through the API up to `max_reader_wait`.
    fn wait_for_readers(&self, i: usize, rel: &Path, scheduled: bool) -> Result<(), String> {
        let started = Instant::now();
        let mut said = false;
        while (self.is_open)(rel) {
            if !said {
                tracing::info!(path = %rel.display(), "update waits: the target is open through the mount");
                self.set(i, "waiting_for_readers", None);
                said = true;
            }
            if scheduled && !self.windows().is_some_and(|w| w.open_now()) {
                return Err(format!(
                    "{} stayed open through the mount until the window closed; the verified download is kept for the next run",
                    rel.display()
                ));
            }
            if !scheduled && started.elapsed() > self.max_reader_wait {
                return Err(format!(
                    "{} stayed open through the mount for {} s; the verified download is kept for the next run",
                    rel.display(),
                    self.max_reader_wait.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Queues a copy of a new version that the settings want cached ahead (pinned, or in the
    /// prefetch allow-list).
    fn queue_copy(&self, model: &Model, size: u64) {
        let rel = model.target_path(&self.nas_dir);
        let s = self.live.settings();
        let pinned = crate::policy::glob_set(&s.pin).is_match(&rel);
        let listed = s.prefetch_allowlist.as_deref().is_some_and(|p| {
            crate::reload::read_allowlist(Some(p)).is_ok_and(|refs| {
                refs.iter().any(|r| {
                    r.category == model.target.category && r.filename == model.target.filename
                })
            })
        });
        if (pinned || listed) && self.worker.enqueue(&rel, Reason::Prefetch, size) {
            tracing::info!(path = %rel.display(), pinned, listed, "the new version is queued for copying");
        }
    }

    fn run(
        &self,
        kind: Kind,
        updater: Updater,
        models: Vec<Model>,
        dry_run: bool,
        scheduled: bool,
    ) {
        let started_at = now();
        let mut outcomes = Vec::new();
        for (i, model) in models.iter().enumerate() {
            self.set(i, "working", None);
            let outcome = match kind {
                Kind::Check => updater.check(model),
                Kind::Rollback => updater.rollback(model),
                Kind::Apply => {
                    let mut progress = |done: u64, total: Option<u64>| {
                        self.set(i, "downloading", Some((done, total)));
                    };
                    let gate = |rel: &Path| self.wait_for_readers(i, rel, scheduled);
                    updater.apply_gated(model, dry_run, &mut progress, &gate)
                }
            };
            self.downloaded
                .fetch_add(outcome.fetched_bytes, Ordering::Relaxed);
            if let Some(reason) = outcome.reason {
                *self.failures.lock().entry(reason).or_default() += 1;
            }
            {
                let mut inner = self.inner.lock();
                match outcome.action {
                    "available" | "would_install" => {
                        inner.available.insert(model.id.clone(), true);
                    }
                    "up_to_date" | "installed" | "adopted" | "rolled_back" => {
                        inner.available.insert(model.id.clone(), false);
                    }
                    _ => {}
                }
                if matches!(kind, Kind::Check | Kind::Apply) {
                    inner.last_check_at = Some(now());
                }
            }
            if outcome.action == "installed"
                && let Some(v) = &outcome.installed
            {
                self.queue_copy(model, v.size);
            }
            self.set(i, "done", None);
            outcomes.push(outcome);
        }
        let failed = outcomes.iter().filter(|o| o.action == "failed").count();
        tracing::info!(
            ?kind,
            scheduled,
            models = outcomes.len(),
            failed,
            "update run ended"
        );
        let mut inner = self.inner.lock();
        inner.runs += 1;
        inner.last = Some(Finished {
            kind,
            scheduled,
            started_at,
            finished_at: now(),
            run: inner.runs,
            outcomes,
        });
        inner.running = None;
    }

    /// Looks at the window every second; once per opening of a window, starts an apply run of
    /// every model (it checks first, and installs what is newer).
    pub fn schedule(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("arenafs-update-schedule".into())
            .spawn(move || {
                while let Some(me) = me.upgrade() {
                    me.tick();
                    drop(me);
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the update schedule");
        }
    }

    fn tick(self: &Arc<Self>) {
        let s = self.live.settings();
        if s.update_manifest.is_none() {
            return;
        }
        let Some(windows) = self.windows() else {
            return;
        };
        self.ticks.fetch_add(1, Ordering::Relaxed);
        if !windows.open_now() {
            self.inner.lock().window_done = false;
            return;
        }
        if self.inner.lock().window_done {
            return;
        }
        match self.start(Kind::Apply, &[], false, true) {
            Ok(_) => self.inner.lock().window_done = true,
            Err(StartError::AlreadyRunning(_)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "scheduled update not started");
                self.inner.lock().window_done = true;
            }
        }
    }

    /// Each model's "an update is available" from its last check (for `/metrics`).
    pub fn available_by_model(&self) -> Vec<(String, bool)> {
        self.inner
            .lock()
            .available
            .iter()
            .map(|(id, a)| (id.clone(), *a))
            .collect()
    }
}
