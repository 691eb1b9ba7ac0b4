//! The control socket: HTTP/1.1 + JSON over a unix socket, one per mount.
//!
//! This first version serves the read-only endpoints the data path needs to be observed:
//! `GET /arena/status` and `GET /arena/stats`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

pub mod client;

use crate::cache::{Cache, Usage};
use crate::config::{CacheState, Live};
use crate::stats::{Stats, StatsSnapshot, Totals};
use crate::worker::{JobInfo, Worker};

/// Default directory of control sockets.
pub const SOCKET_DIR: &str = "/run/arenafs";

/// The default socket of the mount at `mountpoint`.
pub fn default_socket(mountpoint: &Path) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!(
        "{}.sock",
        crate::mount::systemd_escape_path(mountpoint)
    ))
}

/// What the endpoints read.
#[derive(Clone)]
pub struct Shared {
    /// Mount point.
    pub mountpoint: PathBuf,
    /// NAS directory.
    pub nas: PathBuf,
    /// Cache directory as given.
    pub cache_dir: PathBuf,
    /// The cache.
    pub cache: Arc<Cache>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Whether passthrough was negotiated and works.
    pub passthrough: Arc<AtomicBool>,
    /// The copy scheduler.
    pub worker: Arc<Worker>,
    /// The settings in force.
    pub live: Arc<Live>,
}

/// `GET /arena/status`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Always "ok" when the daemon answers.
    pub status: String,
    /// Mount point.
    pub mountpoint: PathBuf,
    /// NAS directory.
    pub nas_dir: PathBuf,
    /// Cache directory.
    pub cache_dir: PathBuf,
    /// Whether complete copies are served with kernel passthrough.
    pub passthrough_available: bool,
    /// Entries in the cache index.
    pub cache_entries: usize,
    /// Entries whose copy is complete.
    pub cache_complete_entries: usize,
    /// Bytes of cached data.
    pub cache_used_bytes: u64,
    /// Space figures (sizes of all copies, limit, free space, reserve).
    pub usage: Usage,
    /// The size the cache may reach now.
    pub cache_limit_bytes: u64,
    /// gray, green or red.
    pub cache_state: CacheState,
    /// Copies running and queued, with progress.
    pub jobs: Vec<JobInfo>,
    /// Queued copies.
    pub queue_length: usize,
    /// Files in the required set.
    pub required_models_count: usize,
    /// Counters since start.
    pub stats: StatsSnapshot,
}

async fn status(State(s): State<Shared>) -> Json<Status> {
    Json(Status {
        status: "ok".into(),
        mountpoint: s.mountpoint.clone(),
        nas_dir: s.nas.clone(),
        cache_dir: s.cache_dir.clone(),
        passthrough_available: s.passthrough.load(Ordering::Relaxed),
        cache_entries: s.cache.store().len(),
        cache_complete_entries: s.cache.store().complete_count(),
        cache_used_bytes: s.cache.store().used_bytes(),
        usage: s.cache.usage(),
        cache_limit_bytes: s.cache.usage().limit(),
        cache_state: s.live.settings().state(),
        jobs: s.worker.jobs(),
        queue_length: s.worker.queue_len(),
        required_models_count: s.worker.required_len(),
        stats: s.stats.snapshot(),
    })
}

/// `GET /arena/stats`: counters since start (flat, per category) and totals over all runs.
#[derive(Debug, Serialize)]
pub struct StatsReport {
    /// Counters since this daemon started.
    #[serde(flatten)]
    pub since_start: StatsSnapshot,
    /// Per category since start.
    pub categories: std::collections::BTreeMap<String, crate::stats::CategoryStats>,
    /// Earlier runs plus this one (persisted in the cache index).
    pub totals: Totals,
}

async fn stats(State(s): State<Shared>) -> Json<StatsReport> {
    let now = s.stats.since_start();
    Json(StatsReport {
        since_start: now.overall,
        categories: now.categories,
        totals: s.stats.totals(),
    })
}

/// The router of the control API.
pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/arena/status", get(status))
        .route("/arena/stats", get(stats))
        .with_state(shared)
}

/// A running control server; dropping it stops the server and removes the socket.
pub struct Server {
    path: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds `path` (mode 0660) and serves in a background thread.
    pub fn start(path: &Path, shared: Shared) -> std::io::Result<Self> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // A socket left by a daemon that died is ours to replace; anything else is not.
        if let Ok(md) = std::fs::symlink_metadata(path) {
            if md.file_type().is_socket() {
                std::fs::remove_file(path)?;
            } else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
        }
        let std_listener = std::os::unix::net::UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        std_listener.set_nonblocking(true)?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = router(shared);
        let thread = std::thread::Builder::new()
            .name("arenafs-control".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(async move {
                    let listener = match tokio::net::UnixListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "control socket unusable");
                            return;
                        }
                    };
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = rx.await;
                        })
                        .await;
                });
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
