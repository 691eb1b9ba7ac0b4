//! The endpoints of the control API.
//!
//! Everything that touches the NAS or the cache index runs on the blocking pool, so one slow
//! NAS call never stalls the other endpoints (a status request still answers while a resolve
//! waits on a hung NFS server).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Shared;
use super::error::{ApiError, Body, WorkflowBody};
use crate::cache::{TrimReport, TrimRequest, Usage};
use crate::config::{CacheState, Discovery, PrefetchStrategy};
use crate::discover::{WorkflowReport, locate};
use crate::models::{self, ModelRef};
use crate::policy::Decision;
use crate::reload::ReloadError;
use crate::stats::{StatsSnapshot, Totals};
use crate::worker::{JobInfo, Outcome, Planned, Reason};
use crate::workflow::{ModelStatus, WorkflowError};

/// The `status` of every successful answer, as the original node's clients expect.
pub const SUCCESS: &str = "success";

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("request failed: {e}")))
}

/// Runs `f`, which reads the NAS, on the NAS pool within `nas_timeout`, as the file system does
/// (from the blocking pool, which waits for it): a hung NAS costs the request a
/// `503 NAS_UNAVAILABLE`, and the call left behind holds no lock that other endpoints need.
async fn on_nas<T: Send + 'static>(
    s: &Shared,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let (pool, health, timeout) = (s.nas_io.clone(), s.health.clone(), s.nas_timeout);
    let answer = blocking(move || {
        if health.offline() {
            return Err(crate::vfs::nasio::Waited::GaveUp);
        }
        pool.call(timeout, &|| health.offline(), f)
    })
    .await?;
    answer.unwrap_or_else(|waited| {
        let why = match waited {
            crate::vfs::nasio::Waited::GaveUp => "the NAS is offline".to_string(),
            crate::vfs::nasio::Waited::Busy => "every NAS thread is stuck".to_string(),
            crate::vfs::nasio::Waited::TimedOut => format!(
                "the NAS did not answer within {:.1} s",
                timeout.as_secs_f64()
            ),
        };
        s.health.kick();
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "NAS_UNAVAILABLE",
            why,
        ))
    })
}

/// A model reference in a request: `{"category":..,"filename":..}` or `"category/filename"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RefJson {
    /// The object form of the original API.
    Object {
        /// Category key or folder name.
        category: String,
        /// Path below the category folder.
        filename: String,
    },
    /// `category/filename`.
    Path(String),
}

/// A validated reference and the NAS file it names, if any.
#[derive(Clone, Debug, Serialize)]
pub struct Named {
    /// Category key.
    pub category: String,
    /// Path below the category folder.
    pub filename: String,
    /// The NAS-relative path it resolves to (`None`: not found).
    pub path: Option<PathBuf>,
}

/// Most model references one request may carry (duplicates included), and most entries a
/// workflow may name. Every reference costs NAS lookups; a list longer than this is refused
/// (`413 TOO_MANY_MODELS`) before any of them is looked at.
pub const MAX_REFERENCES: usize = 10_000;

/// The reference list of a request: up to [`MAX_REFERENCES`] are kept, the rest only counted
/// (so an oversized list costs neither memory nor validation).
#[derive(Debug, Default)]
pub struct RefList {
    /// The references kept.
    pub refs: Vec<RefJson>,
    /// How many the request held.
    pub count: usize,
}

impl<'de> Deserialize<'de> for RefList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = RefList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of model references")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RefList, A::Error> {
                let mut list = RefList::default();
                while list.count < MAX_REFERENCES {
                    match seq.next_element::<RefJson>()? {
                        Some(r) => list.refs.push(r),
                        None => return Ok(list),
                    }
                    list.count += 1;
                }
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    list.count += 1;
                }
                Ok(list)
            }
        }
        d.deserialize_seq(Visit)
    }
}

/// `413 TOO_MANY_MODELS`: `count` references (or workflow entries) where at most
/// [`MAX_REFERENCES`] are taken.
fn too_many(count: usize, what: &str) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "TOO_MANY_MODELS",
        format!("{count} {what}; at most {MAX_REFERENCES} are taken in one request"),
    )
    .with("count", count)
    .with("limit", MAX_REFERENCES)
}

/// Validates a request's list: refuses one over [`MAX_REFERENCES`], then as [`validate`].
fn validate_list(list: &RefList) -> Result<Vec<ModelRef>, ApiError> {
    if list.count > MAX_REFERENCES {
        return Err(too_many(list.count, "model references"));
    }
    validate(&list.refs)
}

/// Validates every reference (one bad reference refuses the request, naming it) and removes
/// duplicates, keeping the first of each.
fn validate(refs: &[RefJson]) -> Result<Vec<ModelRef>, ApiError> {
    let mut out: Vec<ModelRef> = Vec::with_capacity(refs.len());
    let mut seen: HashSet<ModelRef> = HashSet::with_capacity(refs.len());
    for (i, r) in refs.iter().enumerate() {
        let parsed = match r {
            RefJson::Object { category, filename } => models::parse(category, filename),
            RefJson::Path(p) => models::parse_path(p),
        };
        let m = parsed.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "INVALID_REFERENCE",
                format!("model {}: {e}", i + 1),
            )
            .with("index", i)
        })?;
        if !seen.contains(&m) {
            seen.insert(m.clone());
            out.push(m);
        }
    }
    Ok(out)
}

/// Finds each reference on the NAS (blocking).
fn find_all(s: &Shared, refs: Vec<ModelRef>) -> Vec<Named> {
    refs.into_iter()
        .map(|r| Named {
            path: r.resolve(&s.nas),
            category: r.category,
            filename: r.filename,
        })
        .collect()
}

fn paths_of(named: &[Named]) -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    named
        .iter()
        .filter_map(|n| n.path.clone())
        .filter(|p| seen.insert(p.clone()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// GET /arena/status

/// The required set sent with `POST /arena/autopatch`.
#[derive(Debug, Default)]
pub struct Autopatch {
    /// The models of the last `start`, as found on the NAS.
    pub models: Vec<Named>,
    /// When it was started (seconds since the epoch).
    pub started_at: Option<u64>,
    /// When it was stopped, if it was.
    pub stopped_at: Option<u64>,
}

impl Autopatch {
    fn paths(&self) -> Vec<PathBuf> {
        paths_of(&self.models)
    }

    fn active(&self) -> bool {
        self.started_at.is_some() && self.stopped_at.is_none()
    }
}

/// Most clients with a required set of their own; stopped sets make room for new clients.
const MAX_CLIENTS: usize = 256;

/// The required sets: the one of requests without a client id (the original's single set) and
/// one per client id. The worker's required set is the union of those started and not stopped.
#[derive(Debug, Default)]
pub struct RequiredSets {
    legacy: Autopatch,
    clients: BTreeMap<String, Autopatch>,
}

impl RequiredSets {
    fn get(&self, client: Option<&str>) -> Option<&Autopatch> {
        match client {
            None => Some(&self.legacy),
            Some(c) => self.clients.get(c),
        }
    }

    fn get_mut(&mut self, client: Option<&str>) -> Option<&mut Autopatch> {
        match client {
            None => Some(&mut self.legacy),
            Some(c) => self.clients.get_mut(c),
        }
    }

    /// The set of `client`, made if new (refused past [`MAX_CLIENTS`] active clients).
    fn slot(&mut self, client: Option<&str>) -> Result<&mut Autopatch, ApiError> {
        let Some(c) = client else {
            return Ok(&mut self.legacy);
        };
        if !self.clients.contains_key(c) && self.clients.len() >= MAX_CLIENTS {
            let stopped = self
                .clients
                .iter()
                .find(|(_, a)| !a.active())
                .map(|(k, _)| k.clone());
            match stopped {
                Some(k) => {
                    self.clients.remove(&k);
                }
                None => {
                    return Err(ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "TOO_MANY_CLIENTS",
                        format!(
                            "{MAX_CLIENTS} clients have a required set running; stop one first"
                        ),
                    ));
                }
            }
        }
        Ok(self.clients.entry(c.to_owned()).or_default())
    }

    /// Files of the sets started and not stopped, other than `client`'s.
    fn others(&self, client: Option<&str>) -> HashSet<PathBuf> {
        let legacy = (client.is_some() && self.legacy.active()).then_some(&self.legacy);
        self.clients
            .iter()
            .filter(|(k, a)| Some(k.as_str()) != client && a.active())
            .map(|(_, a)| a)
            .chain(legacy)
            .flat_map(Autopatch::paths)
            .collect()
    }

    /// Files of every set started and not stopped.
    fn union(&self) -> Vec<PathBuf> {
        let mut seen = HashSet::new();
        std::iter::once(&self.legacy)
            .chain(self.clients.values())
            .filter(|a| a.active())
            .flat_map(Autopatch::paths)
            .filter(|p| seen.insert(p.clone()))
            .collect()
    }
}

/// Checks a client id: 1 to 64 characters of letters, digits and `._:-`.
fn check_client(id: Option<&str>) -> Result<Option<&str>, ApiError> {
    match id {
        None => Ok(None),
        Some(c)
            if !c.is_empty()
                && c.len() <= 64
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b)) =>
        {
            Ok(Some(c))
        }
        Some(c) => Err(ApiError::bad_request(format!(
            "client_id {c:?}: use 1 to 64 letters, digits, '.', '_', ':' or '-'"
        ))),
    }
}

/// The `autopatch_status` block of the status.
#[derive(Debug, Serialize)]
pub struct AutopatchStatus {
    /// `idle` (never started), `running` (copies of the set queued or running), `done` (none
    /// left) or `stopped`.
    pub state: &'static str,
    /// Models in the set.
    pub required_models: usize,
    /// Of them, found on the NAS.
    pub found: usize,
    /// References that name nothing on the NAS.
    pub not_found: Vec<String>,
    /// Files of the set whose copy is complete.
    pub complete: usize,
    /// Files of the set queued or being copied.
    pub copying: usize,
    /// When the set was sent (seconds since the epoch).
    pub started_at: Option<u64>,
    /// The original's key: a required set was started and not stopped.
    pub started: bool,
    /// The original's key: model loads go through the cache. Always true while the daemon
    /// answers: the mount takes the place of the node's patch of ComfyUI's model paths.
    pub patched: bool,
    /// The original's key: the copy worker runs (the daemon is not stopping and caching is not
    /// off).
    pub copy_worker_running: bool,
    /// The original's key: the settings were loaded (always true once the daemon answers).
    pub settings_initialized: bool,
}

fn autopatch_status(s: &Shared, ap: &Autopatch) -> AutopatchStatus {
    let paths = ap.paths();
    let copying = s.worker.busy_count(&paths);
    let complete = paths
        .iter()
        .filter(|p| s.cache.store().get(p).is_some_and(|e| e.is_complete()))
        .count();
    let state = match (ap.started_at, ap.stopped_at) {
        (None, _) => "idle",
        (Some(_), Some(_)) => "stopped",
        _ if copying > 0 => "running",
        _ => "done",
    };
    AutopatchStatus {
        state,
        required_models: ap.models.len(),
        found: ap.models.iter().filter(|m| m.path.is_some()).count(),
        not_found: ap
            .models
            .iter()
            .filter(|m| m.path.is_none())
            .map(|m| format!("{}/{}", m.category, m.filename))
            .collect(),
        complete,
        copying,
        started_at: ap.started_at,
        started: ap.started_at.is_some() && ap.stopped_at.is_none(),
        patched: true,
        copy_worker_running: s.worker.is_running() && s.live.settings().state() != CacheState::Gray,
        settings_initialized: true,
    }
}

/// Threads of the NAS call pool.
#[derive(Debug, Serialize)]
pub struct NasThreads {
    /// Threads alive.
    pub alive: usize,
    /// Of them, in a NAS call (a hung NAS keeps them).
    pub busy: usize,
}

/// `GET /arena/status`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Always "success" when the daemon answers.
    pub status: &'static str,
    /// The daemon's version.
    pub version: &'static str,
    /// `ARENA_AUTO_CACHE_ENABLED`.
    pub enabled: bool,
    /// gray, green or red.
    pub cache_state: CacheState,
    /// `ARENA_CACHE_DISCOVERY`.
    pub discovery_mode: Discovery,
    /// `ARENA_CACHE_PREFETCH_STRATEGY`.
    pub prefetch_strategy: PrefetchStrategy,
    /// `ARENA_CACHE_MAX_CONCURRENCY`.
    pub max_concurrency: usize,
    /// Files in the required set.
    pub required_models_count: usize,
    /// Bytes background copies fetched since start (what the byte budget counts).
    pub session_bytes_downloaded: u64,
    /// `ARENA_CACHE_SESSION_BYTE_BUDGET` (0 = none).
    pub session_byte_budget: u64,
    /// The required set (of requests without a client id) and its progress.
    pub autopatch_status: AutopatchStatus,
    /// The required set of each client id, and its progress.
    pub clients: BTreeMap<String, AutopatchStatus>,
    /// Mount point.
    pub mountpoint: PathBuf,
    /// NAS directory.
    pub nas_dir: PathBuf,
    /// Cache directory.
    pub cache_dir: PathBuf,
    /// Whether complete copies are served with kernel passthrough.
    pub passthrough_available: bool,
    /// Whether the NAS is offline (complete copies are served as last-known-good, the rest
    /// fails with EIO).
    pub offline: bool,
    /// Why, and since when.
    pub nas_health: crate::health::HealthReport,
    /// Threads of the NAS call pool: alive, and busy with a call (stuck ones included).
    pub nas_threads: NasThreads,
    /// Entries in the cache index.
    pub cache_entries: usize,
    /// Entries whose copy is complete.
    pub cache_complete_entries: usize,
    /// Bytes of cached data (sizes of all copies).
    pub cache_used_bytes: u64,
    /// The size the cache may reach now.
    pub cache_limit_bytes: u64,
    /// Space figures.
    pub usage: Usage,
    /// Copies running (with progress) and queued.
    pub jobs: Vec<JobInfo>,
    /// Queued copies.
    pub queue_length: usize,
    /// Counters since start.
    pub stats: StatsSnapshot,
    /// The HTTP source of background copies (with `ARENA_HTTP_SOURCE`): bytes fetched over
    /// HTTP and fallbacks to the NAS by reason; `stats.bytes_fetched` less its bytes came from
    /// the NAS directly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_source: Option<crate::httpsrc::HttpSourceStatus>,
    /// The model updater (with a manifest configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update: Option<crate::update::service::Status>,
}

pub(super) async fn status(State(s): State<Shared>) -> Result<Json<Status>, ApiError> {
    let health = s.health.report();
    let sh = s.clone();
    let (usage, entries, complete, used, (autopatch, clients)) = blocking(move || {
        (
            sh.cache.usage(),
            sh.cache.store().len(),
            sh.cache.store().complete_count(),
            sh.cache.store().used_bytes(),
            {
                let sets = sh.autopatch.lock();
                let clients = sets
                    .clients
                    .iter()
                    .map(|(k, a)| (k.clone(), autopatch_status(&sh, a)))
                    .collect::<BTreeMap<_, _>>();
                (autopatch_status(&sh, &sets.legacy), clients)
            },
        )
    })
    .await?;
    let settings = s.live.settings();
    let stats = s.stats.snapshot();
    Ok(Json(Status {
        status: SUCCESS,
        version: env!("CARGO_PKG_VERSION"),
        enabled: settings.enabled,
        cache_state: settings.state(),
        discovery_mode: settings.discovery,
        prefetch_strategy: settings.prefetch,
        max_concurrency: settings.max_concurrency,
        required_models_count: s.worker.required_len(),
        session_bytes_downloaded: stats.session_bytes_downloaded,
        session_byte_budget: settings.session_byte_budget,
        autopatch_status: autopatch,
        clients,
        mountpoint: s.mountpoint.clone(),
        nas_dir: s.nas_dir.clone(),
        cache_dir: s.cache_dir.clone(),
        passthrough_available: s.passthrough.load(Ordering::Relaxed),
        offline: health.offline,
        nas_health: health,
        nas_threads: {
            let (alive, busy) = s.nas_io.threads();
            NasThreads { alive, busy }
        },
        cache_entries: entries,
        cache_complete_entries: complete,
        cache_used_bytes: used,
        cache_limit_bytes: usage.limit(),
        usage,
        jobs: s.worker.jobs(),
        queue_length: s.worker.queue_len(),
        stats,
        http_source: s.cache.http_source().map(|h| h.status()),
        update: Some(s.update.status()).filter(|u| u.manifest.is_some()),
    }))
}

// ---------------------------------------------------------------------------------------------
// GET /arena/stats, GET /arena/jobs

/// `GET /arena/stats`: counters since start (flat, per category) and totals over all runs.
#[derive(Debug, Serialize)]
pub struct StatsReport {
    /// Always "success".
    pub status: &'static str,
    /// Counters since this daemon started.
    #[serde(flatten)]
    pub since_start: StatsSnapshot,
    /// Per category since start.
    pub categories: std::collections::BTreeMap<String, crate::stats::CategoryStats>,
    /// Earlier runs plus this one (persisted in the cache index).
    pub totals: Totals,
}

pub(super) async fn stats(State(s): State<Shared>) -> Json<StatsReport> {
    let now = s.stats.since_start();
    Json(StatsReport {
        status: SUCCESS,
        since_start: now.overall,
        categories: now.categories,
        totals: s.stats.totals(),
    })
}

pub(super) async fn jobs(State(s): State<Shared>) -> Json<Value> {
    let jobs = s.worker.jobs();
    let running = jobs.iter().filter(|j| j.state == "running").count();
    Json(json!({
        "status": SUCCESS,
        "running": running,
        "queue_length": s.worker.queue_len(),
        "jobs": jobs,
    }))
}

// ---------------------------------------------------------------------------------------------
// POST /arena/resolve, POST /arena/prefetch

/// Body of `/arena/resolve` and `/arena/prefetch`.
#[derive(Debug, Deserialize)]
pub struct ModelsBody {
    /// The references.
    pub models: RefList,
}

/// One model in a resolve or prefetch answer.
#[derive(Debug, Serialize)]
pub struct ModelAnswer {
    /// Category key.
    pub category: String,
    /// Path below the category folder.
    pub filename: String,
    /// `found` or `not_found`.
    pub status: &'static str,
    /// NAS-relative path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Size on the NAS.
    pub size: u64,
    /// `complete`, `partial` or `none`.
    pub cached: &'static str,
    /// Bytes already in the cache.
    pub cached_bytes: u64,
    /// Whether a prefetch would copy it (resolve) or queued it (prefetch).
    pub copy: bool,
    /// `queued`, `complete`, `already_queued`, `not_found`, `caching_off`, `disabled`,
    /// `category_not_allowed`, `too_small`, `excluded`, `hardcoded`, `budget_exceeded`,
    /// `no_space`.
    pub reason: &'static str,
}

fn reason_of(o: &Outcome) -> &'static str {
    match o {
        Outcome::Queued => "queued",
        Outcome::Complete => "complete",
        Outcome::AlreadyQueued => "already_queued",
        Outcome::NotFound => "not_found",
        Outcome::CachingOff => "caching_off",
        Outcome::NotAllowed(d) => match d {
            Decision::Cache => "queued",
            Decision::Disabled => "disabled",
            Decision::CategoryNotAllowed => "category_not_allowed",
            Decision::TooSmall => "too_small",
            Decision::Excluded => "excluded",
            Decision::Hardcoded => "hardcoded",
        },
    }
}

fn answer(n: &Named, p: Option<&Planned>) -> ModelAnswer {
    let (size, missing, outcome) = match p {
        Some(p) => (p.size, p.missing, p.outcome.clone()),
        None => (0, 0, Outcome::NotFound),
    };
    let found = outcome != Outcome::NotFound;
    let cached_bytes = if found { size - missing.min(size) } else { 0 };
    ModelAnswer {
        category: n.category.clone(),
        filename: n.filename.clone(),
        status: if found { "found" } else { "not_found" },
        path: n.path.clone(),
        size,
        cached: match (found, missing) {
            (false, _) => "none",
            (true, 0) => "complete",
            _ if cached_bytes > 0 => "partial",
            _ => "none",
        },
        cached_bytes,
        copy: matches!(outcome, Outcome::Queued | Outcome::AlreadyQueued),
        reason: reason_of(&outcome),
    }
}

/// Totals of a resolve.
#[derive(Debug, Serialize)]
pub struct ResolveTotals {
    /// Models asked about.
    pub models: usize,
    /// Of them, found on the NAS.
    pub found: usize,
    /// Of them, naming nothing on the NAS.
    pub not_found: usize,
    /// Sum of the sizes of the files found.
    pub size_bytes: u64,
    /// Bytes of them already cached.
    pub cached_bytes: u64,
    /// Bytes a prefetch would fetch.
    pub to_fetch_bytes: u64,
    /// What is left of the byte budget (`null`: no budget).
    pub budget_remaining: Option<u64>,
    /// Whether the bytes to fetch fit in the budget.
    pub within_budget: bool,
    /// Whether they fit in the cache (after evicting what may be evicted, the answer may still
    /// be yes when this is false).
    pub fits_free_space: bool,
}

fn plan_answers(named: &[Named], planned: &[Planned]) -> Vec<ModelAnswer> {
    let by_path: HashMap<&PathBuf, &Planned> = planned.iter().map(|p| (&p.path, p)).collect();
    named
        .iter()
        .map(|n| {
            answer(
                n,
                n.path.as_ref().and_then(|path| by_path.get(path).copied()),
            )
        })
        .collect()
}

pub(super) async fn resolve(
    State(s): State<Shared>,
    Body(body): Body<ModelsBody>,
) -> Result<Json<Value>, ApiError> {
    let sh = s.clone();
    on_nas(&s, move || resolve_now(&sh, &body)).await.map(Json)
}

/// The whole of `/arena/resolve` (blocking: it reads the NAS, and its work grows with the list).
fn resolve_now(s: &Shared, body: &ModelsBody) -> Result<Value, ApiError> {
    let refs = validate_list(&body.models)?;
    let named = find_all(s, refs);
    let planned = s.worker.plan(&paths_of(&named));
    let usage = s.cache.usage();
    let mut models = plan_answers(&named, &planned);
    let settings = s.live.settings();
    let to_fetch: u64 = planned.iter().map(Planned::to_fetch).sum();
    let budget = (settings.session_byte_budget > 0)
        .then(|| s.worker.budget_remaining(settings.session_byte_budget));
    let within_budget = budget.is_none_or(|b| to_fetch <= b);
    if !within_budget {
        for m in models.iter_mut().filter(|m| m.reason == "queued") {
            m.copy = false;
            m.reason = "budget_exceeded";
        }
    }
    let totals = ResolveTotals {
        models: named.len(),
        found: named.iter().filter(|n| n.path.is_some()).count(),
        not_found: named.iter().filter(|n| n.path.is_none()).count(),
        size_bytes: planned.iter().map(|p| p.size).sum(),
        cached_bytes: models.iter().map(|m| m.cached_bytes).sum(),
        to_fetch_bytes: to_fetch,
        budget_remaining: budget,
        within_budget,
        fits_free_space: usage.fits(to_fetch),
    };
    Ok(json!({
        "status": SUCCESS,
        "dry_run": true,
        "cache_state": settings.state(),
        "models": models,
        "totals": totals,
    }))
}

pub(super) async fn prefetch(
    State(s): State<Shared>,
    Body(body): Body<ModelsBody>,
) -> Result<Json<Value>, ApiError> {
    let sh = s.clone();
    on_nas(&s, move || prefetch_now(&sh, &body)).await.map(Json)
}

/// The whole of `/arena/prefetch` (blocking).
fn prefetch_now(s: &Shared, body: &ModelsBody) -> Result<Value, ApiError> {
    let refs = validate_list(&body.models)?;
    if refs.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "EMPTY_REQUIRED_SET",
            "no models to prefetch",
        ));
    }
    let named = find_all(s, refs);
    let planned = s
        .worker
        .request(&paths_of(&named), Reason::Prefetch, true)?;
    let models = plan_answers(&named, &planned);
    let queued = models.iter().filter(|m| m.reason == "queued").count();
    Ok(json!({
        "status": SUCCESS,
        "queued": queued,
        "bytes_to_fetch": planned.iter().map(Planned::to_fetch).sum::<u64>(),
        "models": models,
    }))
}

// ---------------------------------------------------------------------------------------------
// POST /arena/autopatch

/// Body of `/arena/autopatch`.
#[derive(Debug, Deserialize)]
pub struct AutopatchBody {
    /// `start` or `stop`.
    pub action: String,
    /// The models the workflow needs (`start`).
    #[serde(default)]
    pub required_models: RefList,
    /// Whose set this is (one ComfyUI instance of several on a mount). Without it, the one set
    /// of the original.
    #[serde(default)]
    pub client_id: Option<String>,
}

pub(super) async fn autopatch(
    State(s): State<Shared>,
    Body(body): Body<AutopatchBody>,
) -> Result<Json<Value>, ApiError> {
    let client = check_client(body.client_id.as_deref())?.map(str::to_owned);
    match body.action.as_str() {
        "start" => autopatch_start(s, body.required_models, client).await,
        "stop" => {
            let sh = s.clone();
            let who = client.clone();
            let cancelled = blocking(move || stop_required(&sh, who.as_deref())).await?;
            tracing::info!(
                cancelled,
                client = client.as_deref(),
                "required set stopped"
            );
            let mut answer = json!({"status": SUCCESS, "action": "stop", "cancelled": cancelled});
            if let Some(c) = client {
                answer["client_id"] = json!(c);
            }
            Ok(Json(answer))
        }
        other => Err(ApiError::bad_request(format!(
            "unknown action {other:?}: use \"start\" or \"stop\""
        ))),
    }
}

/// Stops the required set of `client`: its copies are cancelled, but for files another started
/// set also needs, which keep copying. Returns how many copies were cancelled.
fn stop_required(s: &Shared, client: Option<&str>) -> usize {
    let mut sets = s.autopatch.lock();
    let others = sets.others(client);
    let Some(ap) = sets.get(client) else {
        return 0;
    };
    let mine: Vec<PathBuf> = ap
        .paths()
        .into_iter()
        .filter(|p| !others.contains(p))
        .collect();
    let n = s.worker.cancel(&mine);
    if let Some(ap) = sets.get_mut(client)
        && ap.active()
    {
        ap.stopped_at = Some(crate::cache::live::now_secs());
    }
    s.worker.set_required(&sets.union());
    n
}

async fn autopatch_start(
    s: Shared,
    refs: RefList,
    client: Option<String>,
) -> Result<Json<Value>, ApiError> {
    let sh = s.clone();
    on_nas(&s, move || {
        autopatch_start_now(&sh, &refs, client.as_deref())
    })
    .await
    .map(Json)
}

/// The whole of `autopatch start` (blocking).
fn autopatch_start_now(
    s: &Shared,
    refs: &RefList,
    client: Option<&str>,
) -> Result<Value, ApiError> {
    let refs = validate_list(refs)?;
    let named = find_all(s, refs);
    let planned = start_required(s, named.clone(), client)?;
    let models = plan_answers(&named, &planned);
    let queued = models.iter().filter(|m| m.reason == "queued").count();
    let not_found = models.iter().filter(|m| m.status == "not_found").count();
    let mut answer = json!({
        "status": SUCCESS,
        "action": "start",
        "required_models_count": models.len(),
        "queued": queued,
        "not_found": not_found,
        "bytes_to_fetch": planned.iter().map(Planned::to_fetch).sum::<u64>(),
        "models": models,
    });
    if let Some(c) = client {
        answer["client_id"] = json!(c);
    }
    Ok(answer)
}

/// Makes `named` the required set of `client` and queues its copies (blocking). Refused, with
/// nothing changed, when it is empty (`EMPTY_REQUIRED_SET`), while the client's previous set
/// still copies (`ALREADY_RUNNING`), within the client's cooldown (`COOLDOWN_ACTIVE`) or over the
/// budget (`BUDGET_EXCEEDED`). Without a client id this is the original's one set.
fn start_required(
    s: &Shared,
    named: Vec<Named>,
    client: Option<&str>,
) -> Result<Vec<Planned>, ApiError> {
    if named.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "EMPTY_REQUIRED_SET",
            "no models in the required set: nothing to start",
        ));
    }
    // The NAS is looked at before the sets are locked: a hung NAS must not hold the lock that
    // `status` needs.
    let paths = paths_of(&named);
    let planned = s.worker.plan(&paths);
    let mut sets = s.autopatch.lock();
    if let Some(ap) = sets.get(client) {
        let previous = ap.paths();
        if ap.stopped_at.is_none() && s.worker.busy_with(&previous) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "ALREADY_RUNNING",
                "the previous required set is still copying; stop it first",
            )
            .with("copying", previous.len()));
        }
    }
    // The slot is taken before the copies are queued: a refusal there queues nothing.
    let slot = sets.slot(client)?;
    let planned = s
        .worker
        .commit_as(planned, Reason::Required, true, client)?;
    tracing::info!(
        models = named.len(),
        found = paths.len(),
        client,
        queued = planned
            .iter()
            .filter(|p| p.outcome == Outcome::Queued)
            .count(),
        "required set started"
    );
    *slot = Autopatch {
        models: named,
        started_at: Some(crate::cache::live::now_secs()),
        stopped_at: None,
    };
    s.worker.set_required(&sets.union());
    Ok(planned)
}

// ---------------------------------------------------------------------------------------------
// POST /arena/workflow

/// Query of `/arena/workflow` (for bodies that cannot carry it, such as a PNG).
#[derive(Debug, Default, Deserialize)]
pub struct WorkflowQuery {
    /// `resolve` (default) or `prefetch`.
    pub action: Option<String>,
    /// Whose required set a prefetch makes (see `/arena/autopatch`).
    pub client_id: Option<String>,
    /// The prefetch strategy for this request's copies (the override node's): with
    /// `prefetch_allowlist` the allow-list's files join the prompt's models; `lazy` (or none)
    /// asks for the prompt's models only.
    pub prefetch_strategy: Option<String>,
}

/// Fills in what the cache holds and what a prefetch would copy (blocking).
fn cache_facts(s: &Shared, report: &mut WorkflowReport) {
    let paths: Vec<PathBuf> = {
        let mut seen: HashSet<&PathBuf> = HashSet::new();
        report
            .models
            .iter()
            .filter(|m| m.size.is_some())
            .filter_map(|m| m.nas_path.as_ref())
            .filter(|p| seen.insert(*p))
            .cloned()
            .collect()
    };
    let planned = s.worker.plan(&paths);
    let by_path: HashMap<&PathBuf, &Planned> = planned.iter().map(|p| (&p.path, p)).collect();
    let settings = s.live.settings();
    let budget = (settings.session_byte_budget > 0)
        .then(|| s.worker.budget_remaining(settings.session_byte_budget));
    let exec_fetch: u64 = report
        .exec_paths()
        .iter()
        .filter_map(|p| by_path.get(p))
        .map(|p| p.to_fetch())
        .sum();
    let over_budget = budget.is_some_and(|b| exec_fetch > b);
    for m in &mut report.models {
        let Some(p) = m.nas_path.as_ref().and_then(|np| by_path.get(np)) else {
            continue;
        };
        let cached = p.size - p.missing.min(p.size);
        m.cached_bytes = Some(cached);
        m.cache = Some(match (p.missing, cached) {
            (0, _) => "complete",
            (_, 0) => "none",
            _ => "partial",
        });
        let (copy, why) = if m.model.status != ModelStatus::Exec {
            (false, "not_exec")
        } else {
            match reason_of(&p.outcome) {
                "queued" if over_budget => (false, "budget_exceeded"),
                r @ ("queued" | "already_queued") => (true, r),
                r => (false, r),
            }
        };
        m.copy = Some(copy);
        m.why = Some(why);
    }
    report.totals.budget_remaining = budget;
    report.total(true);
}

/// The allow-list's files as required-set entries (blocking: it resolves them on the NAS), and
/// how many there are in `count`. A missing or unreadable allow-list is a clear error: the
/// request asked for it.
fn allowlist_named(s: &Shared, count: &mut Option<usize>) -> Result<Vec<Named>, ApiError> {
    let path = s.live.settings().prefetch_allowlist.clone();
    let refs = crate::reload::read_allowlist(path.as_deref()).map_err(|e| {
        ApiError::new(
            StatusCode::CONFLICT,
            "NO_ALLOWLIST",
            format!("prefetch_allowlist asked for, but {e}"),
        )
    })?;
    let named: Vec<Named> = refs
        .into_iter()
        .map(|r| Named {
            path: r.resolve(&s.nas),
            category: r.category,
            filename: r.filename,
        })
        .collect();
    *count = Some(named.len());
    Ok(named)
}

pub(super) async fn workflow(
    State(s): State<Shared>,
    query: Result<Query<WorkflowQuery>, axum::extract::rejection::QueryRejection>,
    WorkflowBody(body): WorkflowBody,
) -> Result<Json<Value>, ApiError> {
    let Query(mut q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let client = check_client(q.client_id.take().as_deref())?.map(str::to_owned);
    let with_allowlist = match q.prefetch_strategy.take().as_deref() {
        None | Some("lazy") => false,
        Some("prefetch_allowlist") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown prefetch_strategy {other:?}: use \"lazy\" or \"prefetch_allowlist\""
            )));
        }
    };
    let bad =
        |e: WorkflowError| ApiError::new(StatusCode::BAD_REQUEST, "BAD_WORKFLOW", e.to_string());
    // Parsing up to 64 MiB and resolving take a while: on the blocking pool, so that `status`
    // and `/metrics` answer meanwhile.
    let (resolution, action) = blocking(move || {
        if body.starts_with(b"\x89PNG\r\n\x1a\n") {
            let resolution = crate::workflow::resolve_png(&body).map_err(bad)?;
            return Ok((resolution, q.action));
        }
        let mut value: Value = serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "BAD_JSON",
                format!("the request body is not a JSON workflow: {e}"),
            )
        })?;
        let mut action = q.action;
        if let Some(obj) = value.as_object_mut()
            && let Some(a) = obj.remove("action")
        {
            action = Some(
                a.as_str()
                    .ok_or_else(|| ApiError::bad_request("action must be a string"))?
                    .to_string(),
            );
        }
        let resolution = crate::workflow::Resolver::default()
            .resolve_value(value)
            .map_err(bad)?;
        Ok::<_, ApiError>((resolution, action))
    })
    .await??;
    if resolution.models.len() > MAX_REFERENCES {
        return Err(too_many(
            resolution.models.len(),
            "model entries in the workflow",
        ));
    }
    let prefetch = match action.as_deref() {
        None | Some("resolve") => false,
        Some("prefetch") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown action {other:?}: use \"resolve\" or \"prefetch\""
            )));
        }
    };
    let sh = s.clone();
    on_nas(&s, move || {
        let sh = &sh;
        let mut report = locate(resolution, Some(&sh.nas));
        let mut planned = None;
        let mut allowlist = None;
        if prefetch {
            let mut named: Vec<Named> = report
                .models
                .iter()
                .filter(|m| m.model.status == ModelStatus::Exec)
                .filter_map(|m| {
                    Some(Named {
                        category: m.model.category.clone()?,
                        filename: m.model.path.clone()?,
                        path: m.nas_path.clone().filter(|_| m.size.is_some()),
                    })
                })
                .collect();
            if with_allowlist {
                named.extend(allowlist_named(sh, &mut allowlist)?);
            }
            planned = Some(start_required(sh, named, client.as_deref())?);
        }
        cache_facts(sh, &mut report);
        let mut answer =
            serde_json::to_value(&report).map_err(|e| ApiError::internal(e.to_string()))?;
        answer["status"] = json!(SUCCESS);
        answer["action"] = json!(if prefetch { "prefetch" } else { "resolve" });
        if let Some(planned) = planned {
            answer["queued"] = json!(
                planned
                    .iter()
                    .filter(|p| p.outcome == Outcome::Queued)
                    .count()
            );
            answer["bytes_to_fetch"] = json!(planned.iter().map(Planned::to_fetch).sum::<u64>());
        }
        if let Some(added) = allowlist {
            answer["allowlist"] = json!(added);
        }
        Ok(Json(answer))
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// POST /arena/trim, POST /arena/reload

/// Body of `/arena/trim`: at least one of the criteria.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrimBody {
    /// Evict least recently used copies until the cache holds at most this many bytes.
    pub to_bytes: Option<u64>,
    /// Remove copies not used for this many seconds.
    pub older_than_secs: Option<u64>,
    /// Remove the copies of this category.
    pub category: Option<String>,
    /// Remove the copy of this model (`category/filename` or the object form).
    pub file: Option<RefJson>,
    /// Only report what would go.
    #[serde(default)]
    pub dry_run: bool,
}

/// The answer of `/arena/trim`.
#[derive(Debug, Serialize)]
pub struct TrimAnswer {
    /// Always "success".
    pub status: &'static str,
    /// What was (or would be) removed.
    #[serde(flatten)]
    pub report: TrimReport,
}

pub(super) async fn trim(
    State(s): State<Shared>,
    Body(body): Body<TrimBody>,
) -> Result<Json<TrimAnswer>, ApiError> {
    if body.to_bytes.is_none()
        && body.older_than_secs.is_none()
        && body.category.is_none()
        && body.file.is_none()
    {
        return Err(ApiError::bad_request(
            "say what to trim: to_bytes, older_than_secs, category or file",
        ));
    }
    if let Some(c) = &body.category
        && (c.is_empty() || c.contains(['/', '\0']) || c == "..")
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_REFERENCE",
            format!("not a category: {c:?}"),
        ));
    }
    let file = match &body.file {
        Some(r) => Some(validate(std::slice::from_ref(r))?.remove(0)),
        None => None,
    };
    let sh = s.clone();
    let report = blocking(move || {
        // A named file is looked up where ComfyUI would find it; a copy only exists for a path
        // that is (or was) on the NAS, so the candidates that have a cache entry are the ones.
        let files: Vec<Option<PathBuf>> = match file {
            Some(m) => {
                let mut c: Vec<Option<PathBuf>> = m
                    .candidates()
                    .into_iter()
                    .filter(|p| sh.cache.store().get(p).is_some())
                    .map(Some)
                    .collect();
                if c.is_empty() {
                    c.push(Some(m.candidates().remove(0)));
                }
                c
            }
            None => vec![None],
        };
        let mut total = TrimReport {
            dry_run: body.dry_run,
            ..Default::default()
        };
        for f in files {
            let r = sh.cache.trim(&TrimRequest {
                to_bytes: body.to_bytes,
                older_than: body.older_than_secs.map(Duration::from_secs),
                category: body.category.clone(),
                file: f,
                dry_run: body.dry_run,
            });
            total.freed_bytes += r.freed_bytes;
            total.removed.extend(r.removed);
            total.skipped_busy += r.skipped_busy;
            total.skipped_pinned += r.skipped_pinned;
        }
        total
    })
    .await?;
    tracing::info!(
        removed = report.removed.len(),
        freed = report.freed_bytes,
        dry_run = report.dry_run,
        "trim"
    );
    Ok(Json(TrimAnswer {
        status: SUCCESS,
        report,
    }))
}

pub(super) async fn reload(State(s): State<Shared>) -> Result<Json<Value>, ApiError> {
    let sh = s.clone();
    let result = blocking(move || sh.reloader.lock().reload()).await?;
    match result {
        Ok(changed) => Ok(Json(json!({"status": SUCCESS, "changed": changed}))),
        Err(e @ ReloadError::NoEnv) => {
            Err(ApiError::new(StatusCode::CONFLICT, "NO_ENV", e.to_string()))
        }
        Err(e @ ReloadError::Config(_)) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "CONFIG_ERROR",
            format!("{e}; the settings in force stay"),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// GET, POST /arena/settings

/// Keys that apply when mounting only: not changed through the API.
const MOUNT_ONLY: &[&str] = &["ARENA_NAS_ROOT", "ARENA_CACHE_ROOT", "ARENA_CACHE_IDENTITY"];

pub(super) async fn settings_get(State(s): State<Shared>) -> Result<Json<Value>, ApiError> {
    let live = s.live.settings();
    let env = s.reloader.lock().env_file().map(Path::to_path_buf);
    let values: BTreeMap<&str, String> = crate::config::KEYS
        .iter()
        .map(|k| (k.env, crate::config::display_value(&live, k.env)))
        .collect();
    let writable = env.as_deref().is_some_and(crate::envfile::writable);
    Ok(Json(json!({
        "status": SUCCESS,
        "env_file": env,
        "writable": writable,
        "settings": values,
    })))
}

/// Body of `POST /arena/settings`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsBody {
    /// Key (env or `-o` name) to value (string, number or boolean).
    pub settings: serde_json::Map<String, Value>,
}

/// Changes settings: checked as the env file's lines are (all or none), written to the env file
/// (the lines of these keys rewritten, the rest kept), then applied as a reload applies them.
pub(super) async fn settings_set(
    State(s): State<Shared>,
    Body(body): Body<SettingsBody>,
) -> Result<Json<Value>, ApiError> {
    if body.settings.is_empty() {
        return Err(ApiError::bad_request("no settings given"));
    }
    let mut changes: Vec<(&'static str, String)> = Vec::new();
    let mut warnings = Vec::new();
    for (k, v) in &body.settings {
        let value = match v {
            Value::String(s) => s.clone(),
            Value::Bool(b) => if *b { "1" } else { "0" }.to_owned(),
            Value::Number(n) => n.to_string(),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "{k}: give a string, a number or a boolean"
                )));
            }
        };
        if value.contains(['\n', '\r', '\0']) {
            return Err(ApiError::bad_request(format!("{k}: one line, please")));
        }
        let (env, w) = crate::config::check_value(k, &value).map_err(|m| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "CONFIG_ERROR",
                format!("{m}; nothing was changed"),
            )
        })?;
        if MOUNT_ONLY.contains(&env) {
            return Err(ApiError::bad_request(format!(
                "{env} applies when mounting: change it in the env file and mount again"
            )));
        }
        warnings.extend(w.into_iter().map(|m| format!("{env}: {m}")));
        changes.retain(|(e, _)| *e != env);
        changes.push((env, value));
    }
    let sh = s.clone();
    blocking(move || {
        let mut reloader = sh.reloader.lock();
        let path = reloader
            .env_file()
            .map(Path::to_path_buf)
            .ok_or_else(|| ApiError::new(StatusCode::CONFLICT, "NO_ENV", ReloadError::NoEnv.to_string()))?;
        let unwritable = |e: std::io::Error| {
            ApiError::new(
                StatusCode::CONFLICT,
                "ENV_NOT_WRITABLE",
                format!("cannot write {}: {e}; nothing was changed", path.display()),
            )
        };
        let text = std::fs::read_to_string(&path).map_err(unwritable)?;
        crate::envfile::replace(&path, &crate::envfile::edit(&text, &changes))
            .map_err(unwritable)?;
        let changed = reloader.reload().map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "CONFIG_ERROR",
                format!("{e}; the settings in force stay"),
            )
        })?;
        // The daemon's environment and -o options win over the file.
        let overridden: Vec<String> = changes
            .iter()
            .filter_map(|(env, _)| match reloader.source_of(env) {
                crate::config::Source::Environment => {
                    Some(format!("{env} (set by the daemon's environment)"))
                }
                crate::config::Source::Option => Some(format!("{env} (set by a -o option)")),
                _ => None,
            })
            .collect();
        tracing::info!(env_file = %path.display(), changes = ?changes, "settings changed through the control API");
        Ok(Json(json!({
            "status": SUCCESS,
            "env_file": path,
            "changed": changed,
            "overridden": overridden,
            "warnings": warnings,
        })))
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// Fallbacks

pub(super) async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        format!("no endpoint {}", uri.path()),
    )
}

pub(super) async fn method_not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        format!("{} does not take {method}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(files: &[&str], active: bool) -> Autopatch {
        Autopatch {
            models: files
                .iter()
                .map(|f| Named {
                    category: "loras".into(),
                    filename: (*f).into(),
                    path: Some(PathBuf::from(format!("loras/{f}"))),
                })
                .collect(),
            started_at: Some(1),
            stopped_at: (!active).then_some(2),
        }
    }

    #[test]
    fn required_sets_union_and_others() {
        let mut sets = RequiredSets::default();
        *sets.slot(None).unwrap() = set(&["a", "b"], true);
        *sets.slot(Some("x")).unwrap() = set(&["b", "c"], true);
        *sets.slot(Some("y")).unwrap() = set(&["d"], false);
        let p = |f: &str| PathBuf::from(format!("loras/{f}"));
        assert_eq!(
            sets.union(),
            [p("a"), p("b"), p("c")],
            "stopped sets are not required"
        );
        assert_eq!(
            sets.others(Some("x")),
            [p("a"), p("b")].into_iter().collect()
        );
        assert_eq!(sets.others(None), [p("b"), p("c")].into_iter().collect());
        assert!(sets.get(Some("z")).is_none());
        assert!(check_client(Some("gpu-0:a_b.c")).is_ok());
        for bad in ["", "../x", "a b", &"x".repeat(65)] {
            assert!(check_client(Some(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_stopped_client_makes_room_for_a_new_one() {
        let mut sets = RequiredSets::default();
        for i in 0..MAX_CLIENTS {
            *sets.slot(Some(&format!("c{i}"))).unwrap() = set(&["a"], true);
        }
        assert!(sets.slot(Some("new")).is_err());
        sets.slot(Some("c7")).unwrap().stopped_at = Some(3);
        assert!(sets.slot(Some("new")).is_ok());
        assert!(sets.get(Some("c7")).is_none());
        assert_eq!(sets.clients.len(), MAX_CLIENTS);
    }

    fn list(n: usize, dup: usize) -> RefList {
        let refs: Vec<String> = (0..n)
            .map(|i| format!("\"loras/m{}.safetensors\"", i % dup))
            .collect();
        serde_json::from_str(&format!("[{}]", refs.join(","))).unwrap()
    }

    #[test]
    fn a_list_over_the_limit_is_counted_not_kept() {
        let at = list(MAX_REFERENCES, usize::MAX);
        assert_eq!((at.count, at.refs.len()), (MAX_REFERENCES, MAX_REFERENCES));
        assert_eq!(validate_list(&at).unwrap().len(), MAX_REFERENCES);
        let over = list(MAX_REFERENCES + 5, usize::MAX);
        assert_eq!(over.count, MAX_REFERENCES + 5);
        assert_eq!(over.refs.len(), MAX_REFERENCES);
        let e = validate_list(&over).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::PAYLOAD_TOO_LARGE, "TOO_MANY_MODELS")
        );
        assert_eq!(e.extra["count"], MAX_REFERENCES + 5);
        assert_eq!(e.extra["limit"], MAX_REFERENCES);
        // What lies past the limit is skipped, whatever it is.
        let odd: RefList = serde_json::from_str(&format!(
            "[{}{}]",
            "\"loras/a\",".repeat(MAX_REFERENCES),
            r#"{"x":[1,2]},null,7"#
        ))
        .unwrap();
        assert_eq!(odd.count, MAX_REFERENCES + 3);
        assert!(serde_json::from_str::<RefList>("{}").is_err());
    }

    #[test]
    fn duplicates_go_keeping_the_first_of_each_in_order() {
        let refs: Vec<RefJson> = serde_json::from_value(json!([
            "loras/b.safetensors",
            {"category": "loras", "filename": "a.safetensors"},
            "loras/b.safetensors",
            "loras/a.safetensors",
            "vae/c.safetensors",
        ]))
        .unwrap();
        let names: Vec<String> = validate(&refs)
            .unwrap()
            .into_iter()
            .map(|m| format!("{}/{}", m.category, m.filename))
            .collect();
        assert_eq!(
            names,
            [
                "loras/b.safetensors",
                "loras/a.safetensors",
                "vae/c.safetensors"
            ]
        );
        // Linear: a whole list of distinct references is quick (quadratic took minutes).
        let start = std::time::Instant::now();
        assert_eq!(validate(&list(MAX_REFERENCES, 7).refs).unwrap().len(), 7);
        assert_eq!(
            validate(&list(MAX_REFERENCES, usize::MAX).refs)
                .unwrap()
                .len(),
            MAX_REFERENCES
        );
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn answers_follow_the_request_order() {
        let named: Vec<Named> = ["b", "a", "gone"]
            .iter()
            .map(|n| Named {
                category: "loras".into(),
                filename: format!("{n}.safetensors"),
                path: (*n != "gone").then(|| PathBuf::from(format!("loras/{n}.safetensors"))),
            })
            .collect();
        let planned = vec![
            Planned {
                path: PathBuf::from("loras/a.safetensors"),
                size: 10,
                missing: 0,
                outcome: Outcome::Complete,
            },
            Planned {
                path: PathBuf::from("loras/b.safetensors"),
                size: 20,
                missing: 20,
                outcome: Outcome::Queued,
            },
        ];
        let a = plan_answers(&named, &planned);
        assert_eq!(
            a.iter().map(|m| (m.size, m.reason)).collect::<Vec<_>>(),
            [(20, "queued"), (10, "complete"), (0, "not_found")]
        );
    }
}
