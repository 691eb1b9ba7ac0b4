//! What a tracked model's source offers now: its version, download URL, SHA-256 and size, from
//! the Hugging Face Hub's API or CivitAI's, without downloading.

use serde::Deserialize;

use super::http::{Http, HttpError, encode, encode_path};
use super::manifest::{Model, Source};

/// The file a source offers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Remote {
    /// The version: the Hub's commit, or CivitAI's version id.
    pub version: String,
    /// Where to download it (the first hop; redirects are followed at each attempt).
    pub url: String,
    /// Its SHA-256 (lowercase hex), where the service gives one.
    pub sha256: Option<String>,
    /// Its size: exact from the Hub, rounded to a KiB from CivitAI.
    pub size: Option<u64>,
    /// Whether `size` is exact.
    pub size_exact: bool,
}

/// Why a source could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Login or access needed; the message says what to do.
    #[error("{0}")]
    Access(String),
    /// The repository, revision, model, version or file does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The service said something this updater cannot use.
    #[error("{0}")]
    Unusable(String),
    /// The service did not answer, or answered an error.
    #[error(transparent)]
    Http(#[from] HttpError),
}

impl RemoteError {
    /// A short reason, for metrics and status.
    pub fn reason(&self) -> &'static str {
        match self {
            RemoteError::Access(_) => "access",
            RemoteError::NotFound(_) => "not_found",
            RemoteError::Unusable(_) => "unusable",
            RemoteError::Http(_) => "http",
        }
    }
}

#[derive(Deserialize)]
struct HfInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<HfSibling>,
}

#[derive(Deserialize)]
struct HfSibling {
    rfilename: String,
    size: Option<u64>,
    lfs: Option<HfLfs>,
}

#[derive(Deserialize)]
struct HfLfs {
    sha256: String,
    size: u64,
}

#[derive(Deserialize)]
struct CivitaiModel {
    #[serde(rename = "modelVersions", default)]
    model_versions: Vec<CivitaiVersion>,
}

#[derive(Deserialize)]
struct CivitaiVersion {
    id: u64,
    #[serde(default)]
    availability: Option<String>,
    #[serde(default)]
    files: Vec<CivitaiFile>,
}

#[derive(Deserialize)]
struct CivitaiFile {
    name: String,
    #[serde(rename = "sizeKB")]
    size_kb: Option<f64>,
    #[serde(default)]
    primary: Option<bool>,
    #[serde(default)]
    hashes: std::collections::HashMap<String, String>,
    #[serde(rename = "downloadUrl")]
    download_url: String,
}

/// Turns a 401/403/404 into what the user should do.
fn explain(model: &Model, what: &str, token: bool, e: HttpError) -> RemoteError {
    let id = &model.id;
    match (model.source.service(), e.status()) {
        ("huggingface", Some(401)) if !token => RemoteError::Access(format!(
            "{id}: {what} is gated or private: set HF_TOKEN (or ARENA_HF_TOKEN_FILE) to a token of an account that has access"
        )),
        ("huggingface", Some(401 | 403)) => RemoteError::Access(format!(
            "{id}: the token has no access to {what}: accept its terms on its page with the token's account, or use a token with read access"
        )),
        ("civitai", Some(401)) if !token => RemoteError::Access(format!(
            "{id}: {what} requires you to be logged in: set CIVITAI_TOKEN (or ARENA_CIVITAI_TOKEN_FILE) to an API key"
        )),
        ("civitai", Some(401 | 403)) => RemoteError::Access(format!(
            "{id}: the API key has no access to {what} (early access, or a paid model)"
        )),
        (_, Some(404)) => RemoteError::NotFound(format!("{id}: {what} was not found")),
        _ => RemoteError::Http(e),
    }
}

/// Checks what `model`'s source offers now.
pub fn resolve(
    http: &Http,
    hf_base: &str,
    civitai_base: &str,
    tokens: (bool, bool),
    model: &Model,
) -> Result<Remote, RemoteError> {
    match &model.source {
        Source::Hf {
            repo,
            path,
            revision,
        } => {
            let what = format!("{repo} at {revision}");
            let url = format!(
                "{hf_base}/api/models/{repo}/revision/{}?blobs=true",
                encode(revision)
            );
            let info: HfInfo = http
                .json(&url)
                .map_err(|e| explain(model, &what, tokens.0, e))?;
            if info.sha.len() < 7 || !info.sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(RemoteError::Unusable(format!(
                    "{}: the Hub answered a commit {:?} for {what}",
                    model.id, info.sha
                )));
            }
            let file = info
                .siblings
                .iter()
                .find(|s| &s.rfilename == path)
                .ok_or_else(|| {
                    RemoteError::NotFound(format!("{}: no file {path} in {what}", model.id))
                })?;
            let (sha256, size) = match &file.lfs {
                Some(lfs) => (Some(lfs.sha256.to_ascii_lowercase()), Some(lfs.size)),
                None => (None, file.size),
            };
            Ok(Remote {
                version: info.sha.clone(),
                // Pinned to the commit: a branch that moves meanwhile does not mix versions.
                url: format!(
                    "{hf_base}/{repo}/resolve/{}/{}",
                    info.sha,
                    encode_path(path)
                ),
                sha256,
                size,
                size_exact: size.is_some(),
            })
        }
        Source::Civitai {
            model_id,
            version,
            file,
        } => {
            let v: CivitaiVersion = match version {
                Some(vid) => http
                    .json(&format!("{civitai_base}/api/v1/model-versions/{vid}"))
                    .map_err(|e| explain(model, &format!("CivitAI version {vid}"), tokens.1, e))?,
                None => {
                    let m: CivitaiModel = http
                        .json(&format!("{civitai_base}/api/v1/models/{model_id}"))
                        .map_err(|e| {
                            explain(model, &format!("CivitAI model {model_id}"), tokens.1, e)
                        })?;
                    m.model_versions.into_iter().next().ok_or_else(|| {
                        RemoteError::NotFound(format!(
                            "{}: CivitAI model {model_id} has no versions",
                            model.id
                        ))
                    })?
                }
            };
            if v.availability.as_deref() == Some("EarlyAccess") && !tokens.1 {
                return Err(RemoteError::Access(format!(
                    "{}: CivitAI version {} is in early access: set CIVITAI_TOKEN to the API key of an account that has it",
                    model.id, v.id
                )));
            }
            let chosen = match file {
                Some(name) => v.files.iter().find(|f| &f.name == name),
                None => v
                    .files
                    .iter()
                    .find(|f| f.primary == Some(true))
                    .or_else(|| (v.files.len() == 1).then(|| &v.files[0])),
            }
            .ok_or_else(|| {
                RemoteError::NotFound(format!(
                    "{}: CivitAI version {} has no {} file (it has: {})",
                    model.id,
                    v.id,
                    file.as_deref().unwrap_or("primary"),
                    v.files
                        .iter()
                        .map(|f| f.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            let sha256 = chosen
                .hashes
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("sha256"))
                .map(|(_, v)| v.to_ascii_lowercase());
            Ok(Remote {
                version: v.id.to_string(),
                url: chosen.download_url.clone(),
                sha256,
                size: chosen.size_kb.map(|kb| (kb * 1024.0).round() as u64),
                size_exact: false,
            })
        }
    }
}
