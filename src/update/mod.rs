//! The model updater: tracked models (a TOML manifest) are checked against the Hugging Face Hub
//! and CivitAI, downloaded next to their targets on the NAS, verified, installed with one
//! rename, and rolled back on demand. Docs: docs/updater.md.
//!
//! # Layout
//! - [`manifest`]: the manifest, checked with line numbers.
//! - [`http`]: requests with per-host tokens, manual redirects, rate limits and retries.
//! - [`remote`]: what a source offers now (version, URL, SHA-256, size).
//! - [`download`]: staged, resumable, verified downloads.
//! - [`store`]: the versions area, installs, rollbacks, per-model state and locks.
//! - [`window`]: update windows (`Mon-Fri 02:00-05:00`).
//! - [`service`]: the daemon's side: runs in the background, the schedule, the gate that waits
//!   while a target is open through the mount, status and metrics.

pub mod download;
pub mod http;
pub mod manifest;
pub mod remote;
pub mod service;
pub mod store;
pub mod window;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};

use self::http::{Http, Service};
use self::manifest::Model;
use self::remote::Remote;
use self::store::{ModelStore, Version};

/// Where the services are and the tokens for them.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The Hub's base URL (`HF_ENDPOINT`, as Hugging Face's own tools read it).
    pub hf_endpoint: String,
    /// CivitAI's base URL (`ARENA_CIVITAI_ENDPOINT`).
    pub civitai_endpoint: String,
    hf_token: Option<String>,
    civitai_token: Option<String>,
}

/// Reads a token file, refusing one that others can read.
fn token_file(path: &Path) -> Result<String, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "token file {} has mode {mode:o}: others could read it; chmod 600 it",
            path.display()
        ));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    Ok(text.trim().to_string())
}

impl Settings {
    /// From the settings (env file, `ARENA_*` environment, `-o`) and the variables Hugging
    /// Face's tools read: `ARENA_HF_ENDPOINT` else `HF_ENDPOINT`; `HF_TOKEN` else
    /// `ARENA_HF_TOKEN_FILE`; `CIVITAI_TOKEN` else `ARENA_CIVITAI_TOKEN_FILE`.
    pub fn resolve(cfg: &crate::config::Settings) -> Result<Settings, String> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let token = |direct: &str, file: &Option<PathBuf>| -> Result<Option<String>, String> {
            match (var(direct), file) {
                (Some(t), _) => Ok(Some(t.trim().to_string())),
                (None, Some(f)) => token_file(f).map(Some),
                (None, None) => Ok(None),
            }
        };
        Ok(Settings {
            hf_endpoint: cfg
                .hf_endpoint
                .clone()
                .or_else(|| var("HF_ENDPOINT"))
                .unwrap_or_else(|| "https://huggingface.co".into()),
            civitai_endpoint: cfg
                .civitai_endpoint
                .clone()
                .unwrap_or_else(|| "https://civitai.com".into()),
            hf_token: token("HF_TOKEN", &cfg.hf_token_file)?,
            civitai_token: token("CIVITAI_TOKEN", &cfg.civitai_token_file)?,
        })
    }
}

/// What one command did to one model.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// The model's id.
    pub id: String,
    /// Its target, `category/path`.
    pub target: String,
    /// `up_to_date`, `available`, `installed`, `adopted`, `would_install`, `rolled_back`,
    /// `status` or `failed`.
    pub action: &'static str,
    /// What is installed (after the command).
    pub installed: Option<Version>,
    /// What the service offers (check, apply).
    pub offered: Option<Remote>,
    /// Bytes downloaded by this command.
    pub fetched_bytes: u64,
    /// Whether the SHA-256 was checked against a known one.
    pub verified: Option<bool>,
    /// Why it failed.
    pub error: Option<String>,
    /// A short reason for failures (`access`, `sha256`, `html`, ...).
    pub reason: Option<&'static str>,
    /// The state kept on the NAS (status).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<store::State>,
}

impl Outcome {
    fn new(model: &Model, action: &'static str) -> Self {
        Outcome {
            id: model.id.clone(),
            target: format!("{}/{}", model.target.category, model.target.filename),
            action,
            installed: None,
            offered: None,
            fetched_bytes: 0,
            verified: None,
            error: None,
            reason: None,
            state: None,
        }
    }

    fn failed(model: &Model, reason: &'static str, error: String) -> Self {
        tracing::warn!(id = %model.id, reason, error = %error, "update failed");
        Outcome {
            error: Some(error),
            reason: Some(reason),
            ..Outcome::new(model, "failed")
        }
    }
}

/// The updater over a NAS directory.
pub struct Updater {
    nas: PathBuf,
    http: Http,
    settings: Settings,
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

impl Updater {
    /// An updater acting on the NAS directory `nas`.
    pub fn new(nas: &Path, settings: Settings) -> Result<Updater, String> {
        let services = vec![
            Service::new(
                "huggingface",
                &settings.hf_endpoint,
                settings.hf_token.clone(),
            )?,
            Service::new(
                "civitai",
                &settings.civitai_endpoint,
                settings.civitai_token.clone(),
            )?,
        ];
        Ok(Updater {
            nas: nas.to_path_buf(),
            http: Http::new(services, Duration::from_secs(60)),
            settings,
        })
    }

    /// Makes retries wait `base`, 2×`base`, ... (tests).
    pub fn with_backoff(mut self, base: Duration) -> Self {
        self.http = self.http.with_backoff(base);
        self
    }

    fn hf(&self) -> String {
        self.settings.hf_endpoint.trim_end_matches('/').to_string()
    }

    fn civitai(&self) -> String {
        self.settings
            .civitai_endpoint
            .trim_end_matches('/')
            .to_string()
    }

    fn offered(&self, model: &Model) -> Result<Remote, remote::RemoteError> {
        let tokens = (
            self.settings.hf_token.is_some(),
            self.settings.civitai_token.is_some(),
        );
        remote::resolve(&self.http, &self.hf(), &self.civitai(), tokens, model)
    }

    /// The NAS directory.
    pub fn nas(&self) -> &Path {
        &self.nas
    }

    fn target(&self, model: &Model) -> PathBuf {
        self.nas.join(model.target_path(&self.nas))
    }

    /// Whether what the service offers differs from what is installed.
    fn differs(installed: Option<&Version>, offered: &Remote, target: &Path) -> bool {
        match installed {
            Some(v) => {
                v.version != offered.version
                    || std::fs::metadata(target).map(|m| m.len()).ok() != Some(v.size)
            }
            None => true,
        }
    }

    /// Asks the service what it offers; records the check in the model's state.
    pub fn check(&self, model: &Model) -> Outcome {
        tracing::info!(id = %model.id, service = model.source.service(), "update check");
        let result = self.offered(model);
        let target = self.target(model);
        let store = ModelStore::open(&self.nas, &model.id);
        let mut state = match &store {
            Ok(s) => s.state().unwrap_or_default(),
            Err(_) => store::peek(&self.nas, &model.id).unwrap_or_default(),
        };
        let outcome = match &result {
            Ok(offered) => {
                let available = Self::differs(state.installed.as_ref(), offered, &target);
                state.last_check = Some(store::Checked {
                    at: store::now(),
                    version: Some(offered.version.clone()),
                    available,
                    error: None,
                });
                Outcome {
                    installed: state.installed.clone(),
                    offered: Some(offered.clone()),
                    ..Outcome::new(model, if available { "available" } else { "up_to_date" })
                }
            }
            Err(e) => {
                state.last_check = Some(store::Checked {
                    at: store::now(),
                    version: None,
                    available: false,
                    error: Some(e.to_string()),
                });
                Outcome {
                    installed: state.installed.clone(),
                    ..Outcome::failed(model, e.reason(), e.to_string())
                }
            }
        };
        if let Ok(s) = &store
            && let Err(e) = s.save(&state)
        {
            tracing::warn!(id = %model.id, error = %e, "cannot record the check");
        }
        outcome
    }

    /// Downloads, verifies and installs what the service offers, unless it is installed.
    /// `progress(done, total)` follows the download.
    pub fn apply(
        &self,
        model: &Model,
        dry_run: bool,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Outcome {
        self.apply_gated(model, dry_run, progress, &|_| Ok(()))
    }

    /// [`Updater::apply`], with `gate(target)` asked after the download is verified and before
    /// it is installed (the daemon waits there while the target is open through the mount); an
    /// error from it leaves the verified download staged for the next run.
    pub fn apply_gated(
        &self,
        model: &Model,
        dry_run: bool,
        progress: &mut dyn FnMut(u64, Option<u64>),
        gate: &dyn Fn(&Path) -> Result<(), String>,
    ) -> Outcome {
        let store = match ModelStore::open(&self.nas, &model.id) {
            Ok(s) => s,
            Err(e) => return Outcome::failed(model, "busy", e.to_string()),
        };
        let mut state = match store.state() {
            Ok(s) => s,
            Err(e) => return Outcome::failed(model, "io", e.to_string()),
        };
        let offered = match self.offered(model) {
            Ok(o) => o,
            Err(e) => return Outcome::failed(model, e.reason(), e.to_string()),
        };
        let target = self.target(model);
        let with = |action| Outcome {
            offered: Some(offered.clone()),
            ..Outcome::new(model, action)
        };
        if !Self::differs(state.installed.as_ref(), &offered, &target) {
            return Outcome {
                installed: state.installed.clone(),
                ..with("up_to_date")
            };
        }
        // A file already there, with the bytes offered (installed by hand, or by another
        // node): adopted, not downloaded again.
        let want = model.sha256.clone().or_else(|| offered.sha256.clone());
        if let (Some(want), Ok(meta)) = (&want, std::fs::metadata(&target))
            && offered
                .size
                .is_none_or(|s| !offered.size_exact || s == meta.len())
            && sha256_of(&target).is_ok_and(|h| &h == want)
        {
            let v = Version {
                version: offered.version.clone(),
                sha256: Some(want.clone()),
                size: meta.len(),
                installed_at: store::now(),
            };
            if dry_run {
                return Outcome {
                    installed: state.installed.clone(),
                    ..with("up_to_date")
                };
            }
            state.installed = Some(v.clone());
            if let Err(e) = store.save(&state) {
                return Outcome::failed(model, "io", e.to_string());
            }
            tracing::info!(id = %model.id, version = %v.version, "update adopted: the file there is the one offered");
            return Outcome {
                installed: Some(v),
                verified: Some(true),
                ..with("adopted")
            };
        }
        if dry_run {
            return Outcome {
                installed: state.installed.clone(),
                ..with("would_install")
            };
        }
        tracing::info!(id = %model.id, version = %offered.version, url = %http::strip_query(&offered.url), "update download");
        let staged = match download::download(
            &self.http,
            &offered,
            model.sha256.as_deref(),
            &target,
            progress,
        ) {
            Ok(s) => s,
            Err(e) => return Outcome::failed(model, e.reason(), e.to_string()),
        };
        let v = Version {
            version: offered.version.clone(),
            sha256: Some(staged.sha256.clone()),
            size: staged.size,
            installed_at: store::now(),
        };
        if let Err(why) = gate(&model.target_path(&self.nas)) {
            return Outcome {
                fetched_bytes: staged.fetched,
                ..Outcome::failed(model, "in_use", why)
            };
        }
        match store.install(&target, &staged.path, v.clone(), model.keep) {
            Ok(_) => {
                download::forget_part(&target);
                tracing::info!(id = %model.id, version = %v.version, bytes = staged.size, fetched = staged.fetched, verified = staged.verified, "update installed");
                Outcome {
                    installed: Some(v),
                    fetched_bytes: staged.fetched,
                    verified: Some(staged.verified),
                    ..with("installed")
                }
            }
            Err(e) => Outcome::failed(model, "io", format!("install: {e}")),
        }
    }

    /// Puts the previous version back.
    pub fn rollback(&self, model: &Model) -> Outcome {
        let store = match ModelStore::open(&self.nas, &model.id) {
            Ok(s) => s,
            Err(e) => return Outcome::failed(model, "busy", e.to_string()),
        };
        match store.rollback(&self.target(model)) {
            Ok((_, back)) => {
                tracing::info!(id = %model.id, version = %back.version, "update rolled back");
                Outcome {
                    installed: Some(back),
                    ..Outcome::new(model, "rolled_back")
                }
            }
            Err(e) => Outcome::failed(model, "rollback", format!("rollback: {e}")),
        }
    }

    /// What is installed, kept and last checked.
    pub fn status(&self, model: &Model) -> Outcome {
        match store::peek(&self.nas, &model.id) {
            Ok(state) => Outcome {
                installed: state.installed.clone(),
                state: Some(state),
                ..Outcome::new(model, "status")
            },
            Err(e) => Outcome::failed(model, "io", e.to_string()),
        }
    }
}
