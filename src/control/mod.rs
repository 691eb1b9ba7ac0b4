//! The control socket: HTTP/1.1 + JSON over a unix socket, one per mount.
//!
//! Endpoints (docs/control-api.md): `GET /arena/status`, `GET /arena/stats`, `GET /arena/jobs`,
//! `GET /metrics`, `POST /arena/autopatch`, `POST /arena/resolve`, `POST /arena/prefetch`,
//! `POST /arena/trim`, `POST /arena/reload`, `POST /arena/workflow`. An optional TCP listener serves the same router
//! behind a guard that only lets reads through unless a bearer token is configured. Each listener
//! serves a bounded number of connections and drops clients that are slow to send their request
//! headers ([`Limits`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::{get, post};
use parking_lot::Mutex;

pub mod api;
pub mod client;
pub mod error;
pub mod metrics;
mod serve;
pub mod update;

use crate::cache::Cache;
use crate::config::Live;
use crate::reload::Reloader;
use crate::source::Nas;
use crate::stats::Stats;
use crate::worker::Worker;

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
    /// NAS directory as given.
    pub nas_dir: PathBuf,
    /// The NAS.
    pub nas: Arc<Nas>,
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
    /// Re-reads the env file on `POST /arena/reload`.
    pub reloader: Arc<Mutex<Reloader>>,
    /// The required set of `POST /arena/autopatch`.
    pub autopatch: Arc<Mutex<api::RequiredSets>>,
    /// Whether the NAS is there.
    pub health: Arc<crate::health::Health>,
    /// The pool that runs NAS calls within the deadline (shared with the file system).
    pub nas_io: Arc<crate::vfs::nasio::NasIo>,
    /// The deadline of a NAS call (`nas_timeout`).
    pub nas_timeout: std::time::Duration,
    /// The model updater.
    pub update: Arc<crate::update::service::UpdateService>,
}

/// The router of the control API.
pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/arena/status", get(api::status))
        .route("/arena/stats", get(api::stats))
        .route("/arena/jobs", get(api::jobs))
        .route("/metrics", get(metrics::metrics))
        .route("/arena/autopatch", post(api::autopatch))
        .route(
            "/arena/settings",
            get(api::settings_get).post(api::settings_set),
        )
        .route("/arena/resolve", post(api::resolve))
        .route("/arena/prefetch", post(api::prefetch))
        .route("/arena/trim", post(api::trim))
        .route("/arena/reload", post(api::reload))
        .route("/arena/update/check", post(update::check))
        .route("/arena/update/apply", post(update::apply))
        .route("/arena/update/rollback", post(update::rollback))
        .route("/arena/update/status", get(update::status))
        .route(
            "/arena/workflow",
            post(api::workflow).layer(DefaultBodyLimit::max(crate::workflow::MAX_WORKFLOW_BYTES)),
        )
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(DefaultBodyLimit::max(error::BODY_LIMIT))
        .with_state(shared)
}

/// Where and how the control API listens.
#[derive(Clone, Debug, Default)]
pub struct Listen {
    /// The unix socket (always).
    pub socket: PathBuf,
    /// Group to give the socket (name or number).
    pub socket_group: Option<String>,
    /// Optional TCP address.
    pub tcp: Option<std::net::SocketAddr>,
    /// Bearer token that allows changes over TCP (without one, TCP is read-only).
    pub token: Option<String>,
    /// Bounds on the connections of each listener.
    pub limits: Limits,
}

/// How each listener takes connections.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once per listener; more are answered `503 TOO_MANY_CONNECTIONS`
    /// and closed.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, and to start the next request
    /// on a kept-alive connection; then the connection is closed.
    pub header_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            header_timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// Reads a token file: the first line, trimmed; refuses an empty one.
pub fn read_token(path: &Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} holds no token", path.display()),
        ));
    }
    Ok(token)
}

/// Resolves a group name or number.
fn group_id(group: &str) -> std::io::Result<nix::unistd::Gid> {
    if let Ok(n) = group.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(n));
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no group named {group:?}"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Over TCP, only reads are open to all; changes need `Authorization: Bearer <token>`, and are
/// refused outright when no token is configured.
async fn tcp_guard(
    State(token): State<Option<Arc<str>>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{Method, StatusCode};
    use axum::response::IntoResponse;
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return next.run(req).await;
    }
    let Some(token) = token else {
        return error::ApiError::new(
            StatusCode::FORBIDDEN,
            "READ_ONLY",
            "the TCP listener is read-only; configure token_file to allow changes, or use the unix socket",
        )
        .into_response();
    };
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return error::ApiError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "changes over TCP need Authorization: Bearer <token>",
        )
        .into_response();
    }
    next.run(req).await
}

/// Compares without leaking, through timing, how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A running control server; dropping it stops the server and removes the socket.
pub struct Server {
    path: PathBuf,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
    done: std::sync::mpsc::Receiver<()>,
}

/// How long unmounting waits for control requests in flight.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(3);

impl Server {
    /// Binds the unix socket (mode 0660, group as configured) and the TCP address if any, and
    /// serves in a background thread. A stale socket of a dead daemon is replaced.
    pub fn start(listen: &Listen, shared: Shared) -> std::io::Result<Self> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let path = &listen.socket;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if let Ok(md) = std::fs::symlink_metadata(path) {
            if !md.file_type().is_socket() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("another daemon answers at {}", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let gid = listen.socket_group.as_deref().map(group_id).transpose()?;
        let std_listener = std::os::unix::net::UnixListener::bind(path)?;
        let fix = (|| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
            if let Some(gid) = gid {
                nix::unistd::chown(path, None, Some(gid))?;
            }
            std_listener.set_nonblocking(true)
        })();
        if let Err(e) = fix {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        let tcp = match listen.tcp {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr).inspect_err(|_| {
                    let _ = std::fs::remove_file(path);
                })?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        let token: Option<Arc<str>> = listen.token.as_deref().map(Arc::from);
        let limits = listen.limits;
        let (tx, rx) = tokio::sync::watch::channel(false);
        let app = router(shared);
        let (done_tx, done) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("arenafs-control".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(async move {
                    let unix = async {
                        match tokio::net::UnixListener::from_std(std_listener) {
                            Ok(l) => serve::serve(l, app.clone(), limits, rx.clone()).await,
                            Err(e) => tracing::error!(error = %e, "control socket unusable"),
                        }
                    };
                    let tcp = async {
                        let Some(l) = tcp else { return };
                        match tokio::net::TcpListener::from_std(l) {
                            Ok(l) => {
                                let guarded = app
                                    .clone()
                                    .layer(axum::middleware::from_fn_with_state(token, tcp_guard));
                                serve::serve(l, guarded, limits, rx.clone()).await
                            }
                            Err(e) => tracing::error!(error = %e, "control TCP listener unusable"),
                        }
                    };
                    tokio::join!(unix, tcp);
                });
                let _ = done_tx.send(());
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            shutdown: Some(tx),
            thread: Some(thread),
            done,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        // A client that holds a request half-sent must not keep the daemon from exiting.
        let _ = std::fs::remove_file(&self.path);
        match self.done.recv_timeout(DRAIN) {
            Ok(()) => {
                if let Some(t) = self.thread.take() {
                    let _ = t.join();
                }
            }
            Err(_) => tracing::warn!("control requests still open at exit; not waiting for them"),
        }
    }
}
