//! Installed versions on the NAS: the versions area (`.arenafs-versions/<id>/`, hidden from the
//! mount), each model's state, installs and rollbacks. An install hard-links the old file into
//! the versions area, then renames the staged file over the target: a reader opening the target
//! meanwhile gets the old file or the new one, whole, never neither; a reader that has the old
//! file open keeps reading it. A lock file per model keeps two updaters (two farm nodes) from
//! acting on one model at once.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::source::RESERVED_PREFIX;

/// The versions area's folder name at the NAS root.
pub fn versions_dir(nas: &Path) -> PathBuf {
    nas.join(format!("{RESERVED_PREFIX}versions"))
}

/// The installed file, as the updater knows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Version {
    /// The service's version (the Hub's commit, CivitAI's version id), or `unknown` for a file
    /// that was there before the updater.
    pub version: String,
    /// SHA-256, when known.
    pub sha256: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// When it was installed (seconds since the epoch).
    pub installed_at: u64,
}

/// An old version kept for rollback.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Kept {
    /// Its file in the model's versions folder.
    pub file: String,
    /// What it was.
    #[serde(flatten)]
    pub what: Version,
    /// When it was replaced.
    pub replaced_at: u64,
}

/// The last check of a model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checked {
    /// When (seconds since the epoch).
    pub at: u64,
    /// The version the service offered.
    pub version: Option<String>,
    /// Whether it differs from the installed one.
    pub available: bool,
    /// Why the check failed.
    pub error: Option<String>,
}

/// A model's state, kept in its versions folder.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// What is installed.
    pub installed: Option<Version>,
    /// Old versions, newest first.
    #[serde(default)]
    pub history: Vec<Kept>,
    /// The last check.
    pub last_check: Option<Checked>,
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    crate::cache::live::now_secs()
}

/// One model's folder in the versions area, locked while held.
pub struct ModelStore {
    dir: PathBuf,
    /// Released when the store is dropped.
    _lock: nix::fcntl::Flock<File>,
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl ModelStore {
    /// Opens (creating) the folder of model `id` and takes its lock; another holder is an error
    /// at once, not a wait.
    pub fn open(nas: &Path, id: &str) -> io::Result<ModelStore> {
        let dir = versions_dir(nas).join(id);
        fs::create_dir_all(&dir)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(held) => Ok(ModelStore { dir, _lock: held }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "another update of {id} is running (lock {})",
                    dir.join("lock").display()
                ),
            )),
            Err((_, e)) => Err(io::Error::from(e)),
        }
    }

    /// The state (empty when none was written).
    pub fn state(&self) -> io::Result<State> {
        read_state(&self.dir)
    }

    /// Replaces the state (atomically, durably).
    pub fn save(&self, state: &State) -> io::Result<()> {
        let tmp = self.dir.join("state.json.tmp");
        {
            let mut f = File::create(&tmp)?;
            io::Write::write_all(
                &mut f,
                &serde_json::to_vec_pretty(state).expect("serializable"),
            )?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join("state.json"))?;
        sync_dir(&self.dir)
    }

    /// Keeps the current target (if any) as an old version: a hard link, so the target stays
    /// in place; where links are not possible, a rename (the target is missing until the
    /// caller renames the new file in).
    fn keep_current(&self, target: &Path, what: Version) -> io::Result<Option<Kept>> {
        if !target.is_file() {
            return Ok(None);
        }
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let short: String = what.version.chars().take(12).collect();
        let mut file = format!("{}-{short}-{name}", what.installed_at);
        let mut n = 1;
        while self.dir.join(&file).exists() {
            n += 1;
            file = format!("{}-{short}-{n}-{name}", what.installed_at);
        }
        let kept = self.dir.join(&file);
        if let Err(e) = fs::hard_link(target, &kept) {
            tracing::warn!(error = %e, "cannot hard-link the old version; moving it (the target is missing for a moment)");
            fs::rename(target, &kept)?;
        }
        Ok(Some(Kept {
            file,
            what,
            replaced_at: now(),
        }))
    }

    /// Installs `staged` (beside `target`, on the same file system) as `new`; keeps the old
    /// file, then the newest `keep` old versions.
    pub fn install(
        &self,
        target: &Path,
        staged: &Path,
        new: Version,
        keep: u32,
    ) -> io::Result<State> {
        let mut state = self.state()?;
        let current = current_version(target, state.installed.as_ref());
        let kept = match current {
            Some(c) => self.keep_current(target, c)?,
            None => None,
        };
        fs::rename(staged, target)?;
        if let Some(dir) = target.parent() {
            sync_dir(dir)?;
        }
        sync_dir(&self.dir)?;
        if let Some(k) = kept {
            state.history.insert(0, k);
        }
        for old in state
            .history
            .split_off((keep as usize).min(state.history.len()))
        {
            let _ = fs::remove_file(self.dir.join(&old.file));
        }
        state.installed = Some(new);
        self.save(&state)?;
        Ok(state)
    }

    /// Puts the newest kept version back over `target`; the replaced file becomes the newest
    /// kept one (a second rollback undoes the first).
    pub fn rollback(&self, target: &Path) -> io::Result<(State, Version)> {
        let mut state = self.state()?;
        if state.history.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no earlier version is kept (keep = 0, or nothing was replaced yet)",
            ));
        }
        let back = state.history.remove(0);
        let source = self.dir.join(&back.file);
        if !source.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("the kept version {} is gone", source.display()),
            ));
        }
        let current = current_version(target, state.installed.as_ref());
        let kept = match current {
            Some(c) => self.keep_current(target, c)?,
            None => None,
        };
        fs::rename(&source, target)?;
        if let Some(dir) = target.parent() {
            sync_dir(dir)?;
        }
        sync_dir(&self.dir)?;
        if let Some(k) = kept {
            state.history.insert(0, k);
        }
        let restored = Version {
            installed_at: now(),
            ..back.what
        };
        state.installed = Some(restored.clone());
        self.save(&state)?;
        Ok((state, restored))
    }
}

/// What is at `target` now: the installed version when it still matches (by size), else an
/// unknown one.
fn current_version(target: &Path, installed: Option<&Version>) -> Option<Version> {
    let meta = fs::metadata(target).ok().filter(|m| m.is_file())?;
    match installed {
        Some(v) if v.size == meta.len() => Some(v.clone()),
        _ => Some(Version {
            version: "unknown".into(),
            sha256: None,
            size: meta.len(),
            installed_at: meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }),
    }
}

/// The state of model `id` without taking its lock (for status).
pub fn peek(nas: &Path, id: &str) -> io::Result<State> {
    read_state(&versions_dir(nas).join(id))
}

/// The state in a model's folder `dir` (empty when none was written).
fn read_state(dir: &Path) -> io::Result<State> {
    let path = dir.join("state.json");
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(version: &str, size: u64) -> Version {
        Version {
            version: version.into(),
            sha256: None,
            size,
            installed_at: 1,
        }
    }

    #[test]
    fn install_keeps_old_versions_and_rollback_swaps_them() {
        let nas = tempfile::tempdir().unwrap();
        let target = nas.path().join("loras/a.safetensors");
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        fs::write(&target, b"old").unwrap();
        let store = ModelStore::open(nas.path(), "a").unwrap();
        // A second holder is refused at once.
        let busy = ModelStore::open(nas.path(), "a").err().unwrap();
        assert_eq!(busy.kind(), io::ErrorKind::WouldBlock);

        let staged = nas.path().join("loras/.arenafs-part.a.safetensors");
        fs::write(&staged, b"new1").unwrap();
        // A reader of the old file keeps it whole.
        let mut reader = File::open(&target).unwrap();
        let st = store.install(&target, &staged, v("c1", 4), 1).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new1");
        let mut old = String::new();
        io::Read::read_to_string(&mut reader, &mut old).unwrap();
        assert_eq!(old, "old");
        assert_eq!(st.history.len(), 1);
        assert_eq!(st.history[0].what.version, "unknown");

        fs::write(&staged, b"new2!").unwrap();
        let st = store.install(&target, &staged, v("c2", 5), 1).unwrap();
        assert_eq!(st.history.len(), 1, "keep = 1");
        assert_eq!(st.history[0].what.version, "c1");
        let files = fs::read_dir(versions_dir(nas.path()).join("a"))
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                n != "lock" && n != "state.json"
            })
            .count();
        assert_eq!(files, 1, "the oldest was removed");

        let (st, back) = store.rollback(&target).unwrap();
        assert_eq!(back.version, "c1");
        assert_eq!(fs::read(&target).unwrap(), b"new1");
        assert_eq!(st.history[0].what.version, "c2");
        let (_, again) = store.rollback(&target).unwrap();
        assert_eq!(again.version, "c2");
        assert_eq!(fs::read(&target).unwrap(), b"new2!");
        drop(store);
        assert_eq!(
            peek(nas.path(), "a").unwrap().installed.unwrap().version,
            "c2"
        );
        let store = ModelStore::open(nas.path(), "a").unwrap();
        let mut st = store.state().unwrap();
        st.history.clear();
        store.save(&st).unwrap();
        assert_eq!(
            store.rollback(&target).err().unwrap().kind(),
            io::ErrorKind::NotFound
        );
    }
}
