//! A client for the control socket (HTTP/1.1 over a unix socket, with `hyper`), used by the CLI
//! and the tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(120);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens at the socket.
    #[error("no arenafs daemon answers at {socket} ({reason}); is the file system mounted?")]
    NoDaemon {
        /// The socket tried.
        socket: PathBuf,
        /// What connecting said.
        reason: String,
    },
    /// The daemon answered with an error.
    #[error("{code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The error code (`COOLDOWN_ACTIVE`, ...).
        code: String,
        /// The message.
        message: String,
        /// The whole body.
        body: Value,
    },
    /// Anything else (timeouts, a broken answer).
    #[error("control socket {socket}: {message}")]
    Other {
        /// The socket.
        socket: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// A raw answer.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Content type.
    pub content_type: String,
    /// Body.
    pub body: Vec<u8>,
}

/// Sends one request and returns the answer whatever its status.
pub fn raw(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Reply, ClientError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| other(socket, e))?;
    rt.block_on(async {
        tokio::time::timeout(TIMEOUT, send(socket, method, path, body))
            .await
            .map_err(|_| other(socket, format!("no answer within {TIMEOUT:?}")))?
    })
}

fn other(socket: &Path, e: impl std::fmt::Display) -> ClientError {
    ClientError::Other {
        socket: socket.to_path_buf(),
        message: e.to_string(),
    }
}

async fn send(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Reply, ClientError> {
    let stream =
        tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| ClientError::NoDaemon {
                socket: socket.to_path_buf(),
                reason: e.to_string(),
            })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| other(socket, e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "arenafs");
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| other(socket, e))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| other(socket, e))?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| other(socket, e))?
        .to_bytes()
        .to_vec();
    Ok(Reply {
        status,
        content_type,
        body,
    })
}

/// Sends a request and decodes a JSON answer; an error answer becomes [`ClientError::Api`].
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, ClientError> {
    let body = body.map(|b| serde_json::to_vec(b).expect("JSON values serialize"));
    call_bytes(socket, method, path, body)
}

/// Like [`call`], with a body of any bytes (a workflow file, JSON or PNG).
pub fn call_bytes(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Value, ClientError> {
    let reply = raw(socket, method, path, body)?;
    let json: Value = serde_json::from_slice(&reply.body).map_err(|e| {
        other(
            socket,
            format!("{path}: HTTP {}: not JSON ({e})", reply.status),
        )
    })?;
    if (200..300).contains(&reply.status) {
        return Ok(json);
    }
    Err(ClientError::Api {
        status: reply.status,
        code: json["code"].as_str().unwrap_or("ERROR").to_string(),
        message: json["message"].as_str().unwrap_or("").to_string(),
        body: json,
    })
}

/// `GET path`; returns the body of a 2xx answer as text.
pub fn get(socket: &Path, path: &str) -> anyhow::Result<String> {
    let reply = raw(socket, "GET", path, None)?;
    let text = String::from_utf8_lossy(&reply.body).into_owned();
    if !(200..300).contains(&reply.status) {
        anyhow::bail!("{path}: HTTP {}: {text}", reply.status);
    }
    Ok(text)
}
