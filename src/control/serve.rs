//! The accept loop of a control listener: HTTP/1.1 with a bounded number of connections, a
//! deadline for request headers, half-closed clients answered, and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::Limits;

/// Refused connections answered at once (each for at most [`LINGER`]); past that, more are
/// closed without an answer.
const REFUSALS: usize = 64;

/// How long a refused connection is kept to read its request and deliver the answer.
const LINGER: Duration = Duration::from_secs(2);

/// A listener of the control API.
pub(super) trait Listener: Send + 'static {
    /// A connection.
    type Io: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    /// Takes the next connection.
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        Ok(tokio::net::UnixListener::accept(self).await?.0)
    }
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        let (s, _) = tokio::net::TcpListener::accept(self).await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

/// Serves `app` on `listener` until `stop` turns true, then lets the requests in flight finish
/// (idle connections close at once) and returns once every connection is closed.
pub(super) async fn serve<L: Listener>(
    listener: L,
    app: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let places = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(REFUSALS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // A client may shut its sending side once its request is out; it still gets the answer.
        .half_close(true);
    loop {
        let io = tokio::select! {
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok(io) => io,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(error = %e, "control listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            match refusals.clone().try_acquire_owned() {
                Ok(slot) => {
                    tokio::spawn(refuse(io, limits.max_connections, slot));
                }
                Err(_) => drop(io),
            }
            continue;
        };
        let conn = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(app.clone()));
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(place);
        });
    }
    drop(listener);
    // Every place back: every connection closed.
    let _ = places.acquire_many(limits.max_connections as u32).await;
}

/// Returns once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

/// Answers the request of a connection over the cap with `503 TOO_MANY_CONNECTIONS` and closes
/// it; a client that sends no request within [`LINGER`] is closed without an answer.
async fn refuse<I: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    io: I,
    limit: usize,
    _slot: OwnedSemaphorePermit,
) {
    let body = serde_json::json!({
        "status": "error",
        "code": "TOO_MANY_CONNECTIONS",
        "message": format!(
            "this listener serves at most {limit} connections at once; try again shortly"
        ),
    })
    .to_string();
    let service = hyper::service::service_fn(move |_req| {
        let body = body.clone();
        async move {
            hyper::Response::builder()
                .status(hyper::StatusCode::SERVICE_UNAVAILABLE)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header(hyper::header::RETRY_AFTER, "1")
                .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(LINGER)
        .keep_alive(false)
        .half_close(true);
    let _ = tokio::time::timeout(LINGER, http.serve_connection(TokioIo::new(io), service)).await;
}
