//! Applying settings while mounted: re-reading the env file when it changes, and the work that
//! settings start by themselves (eager copies, the prefetch allow-list).
//!
//! The env file is checked every [`CHECK_INTERVAL`] by one `stat` (mtime, size, inode), which
//! is no polling storm. New settings apply to new opens and new copy jobs; copies already
//! running finish under the limits they read chunk by chunk (concurrency, bandwidth, budget).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::cache::Cache;
use crate::config::{self, CacheMode, CacheState, Inputs, Live, PrefetchStrategy};
use crate::models;
use crate::policy::Decision;
use crate::source::{DirEntryKind, Nas};
use crate::worker::{Reason, RequestError, Worker};

/// How often the env file is checked for changes.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

type Stamp = (i64, i64, u64, u64);

/// Watches the env file and applies new settings.
pub struct Reloader {
    inputs: Inputs,
    path: Option<PathBuf>,
    stamp: Option<Stamp>,
    live: Arc<Live>,
    cache: Arc<Cache>,
    worker: Arc<Worker>,
    nas: Arc<Nas>,
    /// Where each key's value came from at the last reload.
    sources: std::collections::BTreeMap<&'static str, config::Source>,
}

/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// No env file is in use (the original's `NO_ENV`).
    #[error(
        "no env file to read (give --env FILE, set ARENA_ENV_FILE, or create {})",
        config::DEFAULT_ENV_FILE
    )]
    NoEnv,
    /// The file could not be read; the settings in force stay.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
}

fn stamp(path: &Path) -> Option<Stamp> {
    let md = std::fs::metadata(path).ok()?;
    Some((md.mtime(), md.mtime_nsec(), md.size(), md.ino()))
}

impl Reloader {
    /// Starts watching the env file that `inputs` resolve to (if any).
    pub fn new(
        inputs: Inputs,
        live: Arc<Live>,
        cache: Arc<Cache>,
        worker: Arc<Worker>,
        nas: Arc<Nas>,
    ) -> Self {
        let path = inputs.env_file_path().map(|(p, _)| p);
        let stamp = path.as_deref().and_then(stamp);
        Self {
            inputs,
            path,
            stamp,
            live,
            cache,
            worker,
            nas,
            sources: Default::default(),
        }
    }

    /// Where `env`'s value came from at the last reload (the env file, the daemon's environment
    /// or a `-o` option, which win over the file, or the default).
    pub fn source_of(&self, env: &str) -> config::Source {
        self.sources
            .get(env)
            .cloned()
            .unwrap_or(config::Source::Default)
    }

    /// The env file in use, if any.
    pub fn env_file(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Reloads if the env file changed since the last look. Returns whether it reloaded.
    pub fn check(&mut self) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        let now = stamp(path);
        if now == self.stamp {
            return false;
        }
        self.stamp = now;
        match self.reload() {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "env file changed but cannot be read; keeping the settings in force");
                false
            }
        }
    }

    /// Re-reads the settings now. Returns the keys that changed (`KEY: old -> new`).
    pub fn reload(&mut self) -> Result<Vec<String>, ReloadError> {
        if self.path.is_none() {
            return Err(ReloadError::NoEnv);
        }
        let loaded = config::load(&self.inputs)?;
        for w in &loaded.warnings {
            tracing::warn!("config: {w}");
        }
        self.sources = loaded.sources;
        let old = self.live.settings();
        let new = loaded.settings;
        let changed: Vec<String> = config::KEYS
            .iter()
            .filter_map(|k| {
                let (a, b) = (
                    config::display_value(&old, k.env),
                    config::display_value(&new, k.env),
                );
                (a != b).then(|| format!("{}: {a} -> {b}", k.env))
            })
            .collect();
        for k in ["ARENA_CACHE_ROOT", "ARENA_NAS_ROOT", "ARENA_CACHE_IDENTITY"] {
            if changed.iter().any(|c| c.starts_with(k)) {
                tracing::warn!(key = k, "changes to this key apply at the next mount");
            }
        }
        self.live.replace(new);
        if changed.is_empty() {
            tracing::info!("configuration reloaded; nothing changed");
        } else {
            tracing::info!(changes = %changed.join("; "), "configuration reloaded");
            self.cache.enforce_limits();
            // Off this thread: the NAS is listed and stated for it, and the reloader's lock
            // must not wait on a hung NAS.
            let (live, nas, worker) = (self.live.clone(), self.nas.clone(), self.worker.clone());
            let spawned = std::thread::Builder::new()
                .name("arenafs-start-work".into())
                .spawn(move || start_work(&live, &nas, &worker));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot queue the copies the new settings ask for");
            }
        }
        Ok(changed)
    }
}

/// Queues what the settings ask for by themselves: the allow-list (`prefetch_allowlist`) and
/// every allowed file within the byte budget (`eager`).
pub fn start_work(live: &Live, nas: &Nas, worker: &Worker) {
    let s = live.settings();
    if s.state() != CacheState::Red {
        return;
    }
    if s.prefetch == PrefetchStrategy::PrefetchAllowlist {
        queue_allowlist(s.prefetch_allowlist.as_deref(), nas, worker);
    }
    if s.mode == CacheMode::Eager {
        if s.session_byte_budget == 0 {
            tracing::warn!(
                "ARENA_CACHE_MODE=eager needs ARENA_CACHE_SESSION_BYTE_BUDGET (it used to fill disks); copying on demand only"
            );
        } else {
            queue_eager(live, nas, worker);
        }
    }
}

/// Reads the allow-list: its references, with a warning logged for each bad line. Errors say
/// why there is none (not configured, unreadable).
pub fn read_allowlist(path: Option<&Path>) -> Result<Vec<models::ModelRef>, String> {
    let Some(path) = path else {
        return Err("ARENA_CACHE_PREFETCH_ALLOWLIST is not set".into());
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read the prefetch allow-list {}: {e}",
            path.display()
        )
    })?;
    let (refs, warnings) = models::read_list(&text);
    for w in warnings {
        tracing::warn!(file = %path.display(), "allow-list {w}");
    }
    Ok(refs)
}

fn queue_allowlist(path: Option<&Path>, nas: &Nas, worker: &Worker) {
    let refs = match read_allowlist(path) {
        Ok(refs) => refs,
        Err(e) => {
            tracing::warn!(
                "ARENA_CACHE_PREFETCH_STRATEGY=prefetch_allowlist, but {e}; nothing to prefetch"
            );
            return;
        }
    };
    let mut paths = Vec::new();
    for r in refs {
        match r.resolve(nas) {
            Some(p) => paths.push(p),
            None => {
                tracing::warn!(category = %r.category, filename = %r.filename, "allow-list entry not found on the NAS")
            }
        }
    }
    match worker.request(&paths, Reason::Allowlist, false) {
        Ok(planned) => tracing::info!(files = planned.len(), "allow-list queued"),
        Err(e @ RequestError::BudgetExceeded { .. }) => {
            tracing::warn!(error = %e, "allow-list not queued (BUDGET_EXCEEDED)")
        }
        Err(e) => tracing::warn!(error = %e, "allow-list not queued"),
    }
}

/// Walks the allowed categories and queues files, in walk order, while they fit in what is left
/// of the byte budget.
fn queue_eager(live: &Live, nas: &Nas, worker: &Worker) {
    let s = live.settings();
    let policy = live.policy();
    let mut left = worker.budget_remaining(s.session_byte_budget);
    let mut queued = 0;
    let mut stack: Vec<PathBuf> = policy
        .categories()
        .flat_map(|c| {
            let own = [c];
            let folders: Vec<&str> = match crate::policy::category_folders(c) {
                [] => own.to_vec(),
                f => f.to_vec(),
            };
            folders.into_iter().map(PathBuf::from).collect::<Vec<_>>()
        })
        .collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = nas.read_dir(&dir) else {
            continue;
        };
        for (name, kind, _) in entries {
            let rel = dir.join(&name);
            match kind {
                DirEntryKind::Dir => stack.push(rel),
                DirEntryKind::File => {
                    let Ok(st) = nas.stat(&rel) else { continue };
                    let size = st.st_size as u64;
                    if policy.decide(&rel, size) != Decision::Cache || size > left {
                        continue;
                    }
                    if worker.enqueue(&rel, Reason::Eager, size) {
                        left -= size;
                        queued += 1;
                    }
                }
                _ => {}
            }
        }
    }
    tracing::info!(
        files = queued,
        "eager mode: copies queued within the byte budget"
    );
}
