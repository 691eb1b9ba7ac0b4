//! Errors of the control API: `{"status":"error","code":"...","message":"..."}` with a fitting
//! HTTP status, plus the extractor that turns request bodies into typed JSON with such errors.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::worker::RequestError;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 8 * 1024 * 1024;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code (`BUDGET_EXCEEDED`, ...).
    pub code: &'static str,
    /// What happened, for people.
    pub message: String,
    /// Further fields of the body (`retry_after_ms`, `needed`, ...).
    pub extra: Map<String, Value>,
}

impl ApiError {
    /// An error without extra fields.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
        }
    }

    /// Adds a field to the body.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_string(), value.into());
        self
    }

    /// 400 `BAD_REQUEST`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
    }

    /// 500 `INTERNAL`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", message)
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let message = e.to_string();
        match e {
            RequestError::CooldownActive {
                retry_after_ms,
                elapsed_ms,
            } => Self::new(StatusCode::TOO_MANY_REQUESTS, "COOLDOWN_ACTIVE", message)
                .with("retry_after_ms", retry_after_ms)
                .with("elapsed_ms", elapsed_ms),
            RequestError::BudgetExceeded { needed, remaining } => {
                Self::new(StatusCode::CONFLICT, "BUDGET_EXCEEDED", message)
                    .with("needed", needed)
                    .with("remaining", remaining)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("status".into(), json!("error"));
        body.insert("code".into(), json!(self.code));
        body.insert("message".into(), json!(self.message));
        let retry_ms = self.extra.get("retry_after_ms").and_then(Value::as_u64);
        body.extend(self.extra);
        let mut resp = (self.status, axum::Json(Value::Object(body))).into_response();
        if let Some(ms) = retry_ms
            && let Ok(v) = HeaderValue::from_str(&ms.div_ceil(1000).max(1).to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

/// A JSON request body. Unlike `axum::Json` it does not insist on a content type (so `curl -d`
/// works) and answers every failure in the API's error format: 413 `PAYLOAD_TOO_LARGE` above
/// [`BODY_LIMIT`], 400 `BAD_JSON` for anything that is not the expected JSON.
pub struct Body<T>(pub T);

/// Reads a request body of at most `limit` bytes, answering failures in the API's format.
async fn read_body<S: Send + Sync>(
    req: Request,
    state: &S,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!("request bodies are limited to {limit} bytes here"),
        )
    };
    // A declared length over the limit is refused before anything is read.
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    Bytes::from_request(req, state).await.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::bad_request(r.body_text())
        }
    })
}

/// Bodies larger than this are parsed on the blocking pool, so that a large request never holds
/// up the thread that answers `status` and `/metrics`.
const PARSE_INLINE: usize = 64 * 1024;

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "BAD_JSON",
            format!("the request body is not valid: {e}"),
        )
    })
}

impl<S: Send + Sync, T: DeserializeOwned + Send + 'static> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state, BODY_LIMIT).await?;
        if bytes.len() <= PARSE_INLINE {
            return parse_json(&bytes).map(Body);
        }
        tokio::task::spawn_blocking(move || parse_json(&bytes))
            .await
            .map_err(|e| ApiError::internal(format!("request failed: {e}")))?
            .map(Body)
    }
}

/// A workflow body (JSON or PNG), up to [`crate::workflow::MAX_WORKFLOW_BYTES`].
pub struct WorkflowBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for WorkflowBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        read_body(req, state, crate::workflow::MAX_WORKFLOW_BYTES)
            .await
            .map(WorkflowBody)
    }
}
