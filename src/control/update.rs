//! `POST /arena/update/check|apply|rollback`, `GET /arena/update/status`: the model updater
//! (docs/updater.md). Runs go on in the background; status says how far they are and what the
//! last one did.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Shared;
use super::error::{ApiError, Body};
use crate::update::service::{Kind, StartError};

/// Body of the run endpoints (all fields optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunBody {
    /// The models' ids (all of the manifest's when absent or empty).
    #[serde(default)]
    pub ids: Vec<String>,
    /// `apply` only: say what would be installed, change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

impl From<StartError> for ApiError {
    fn from(e: StartError) -> Self {
        let (status, code) = match &e {
            StartError::NoManifest => (StatusCode::CONFLICT, "NO_MANIFEST"),
            StartError::BadManifest(_) => (StatusCode::UNPROCESSABLE_ENTITY, "BAD_MANIFEST"),
            StartError::UnknownModel(_) => (StatusCode::NOT_FOUND, "UNKNOWN_MODEL"),
            StartError::AlreadyRunning(_) => (StatusCode::CONFLICT, "ALREADY_RUNNING"),
            StartError::Settings(_) => (StatusCode::UNPROCESSABLE_ENTITY, "CONFIG_ERROR"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

async fn start(s: Shared, kind: Kind, body: RunBody) -> Result<Json<Value>, ApiError> {
    if kind != Kind::Apply && body.dry_run {
        return Err(ApiError::bad_request("dry_run is for apply only"));
    }
    // Reading the manifest (a local file) and starting the thread: off the async workers.
    let running =
        tokio::task::spawn_blocking(move || s.update.start(kind, &body.ids, body.dry_run, false))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(json!({"status": "success", "started": running})))
}

/// `POST /arena/update/check`.
pub(super) async fn check(
    State(s): State<Shared>,
    Body(body): Body<RunBody>,
) -> Result<Json<Value>, ApiError> {
    start(s, Kind::Check, body).await
}

/// `POST /arena/update/apply`.
pub(super) async fn apply(
    State(s): State<Shared>,
    Body(body): Body<RunBody>,
) -> Result<Json<Value>, ApiError> {
    start(s, Kind::Apply, body).await
}

/// `POST /arena/update/rollback`.
pub(super) async fn rollback(
    State(s): State<Shared>,
    Body(body): Body<RunBody>,
) -> Result<Json<Value>, ApiError> {
    start(s, Kind::Rollback, body).await
}

/// `GET /arena/update/status`.
pub(super) async fn status(State(s): State<Shared>) -> Json<Value> {
    let mut v = serde_json::to_value(s.update.status()).unwrap_or_default();
    v["status"] = json!("success");
    Json(v)
}
