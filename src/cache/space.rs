//! Keeping the cache bounded: capacity, least-recently-used eviction, and trim (DESIGN.md §2.5).
//!
//! Capacity is the smaller of `ARENA_CACHE_MAX_GB` and what the SSD can hold while keeping the
//! free-space reserve. A copy is accounted at its full size from the moment it starts (a sparse
//! file still grows to it), and a copy that cannot fit after evicting everything evictable is not
//! started. Eviction takes the least recently used copies first and never a copy that is open
//! through the mount, being filled, or pinned.

use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::Duration;

use serde::Serialize;

use super::Cache;
use super::live::now_secs;
use crate::policy::{category_key, category_of, glob_set};
use crate::stats::Stats;

/// Space figures of the cache, in bytes.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// Sum of the sizes of all copies (complete or not).
    pub used: u64,
    /// Bytes of copies not yet fetched (they will still be written).
    pub pending: u64,
    /// `ARENA_CACHE_MAX_GB` in bytes (0 = unlimited).
    pub max: u64,
    /// Free space on the cache file system.
    pub free: u64,
    /// Free space to keep.
    pub reserve: u64,
}

impl Usage {
    /// Whether `need` more bytes fit.
    pub fn fits(&self, need: u64) -> bool {
        (self.max == 0 || self.used + need <= self.max)
            && self.free >= self.reserve + self.pending + need
    }

    /// The effective limit: the size the cache may reach.
    pub fn limit(&self) -> u64 {
        let by_disk = (self.used + self.free).saturating_sub(self.reserve + self.pending);
        if self.max == 0 {
            by_disk
        } else {
            by_disk.min(self.max)
        }
    }
}

/// What to trim.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct TrimRequest {
    /// Evict least recently used copies until the cache holds at most this many bytes.
    pub to_bytes: Option<u64>,
    /// Remove copies not used for this long.
    #[serde(default, with = "opt_secs")]
    pub older_than: Option<Duration>,
    /// Remove the copies of this category (key or folder name).
    pub category: Option<String>,
    /// Remove the copy of this NAS-relative path (pinned or not).
    pub file: Option<PathBuf>,
    /// Only report what would go.
    #[serde(default)]
    pub dry_run: bool,
}

mod opt_secs {
    use serde::Deserialize;
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<std::time::Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(std::time::Duration::from_secs))
    }
}

/// One copy trimmed (or that would be).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TrimItem {
    /// NAS-relative path.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Last use, seconds since the epoch.
    pub last_access: u64,
}

/// What a trim did.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct TrimReport {
    /// Copies removed (or that would be, in a dry run).
    pub removed: Vec<TrimItem>,
    /// Bytes freed (or that would be).
    pub freed_bytes: u64,
    /// Whether nothing was removed on purpose.
    pub dry_run: bool,
    /// Matching copies kept because they are open or being filled.
    pub skipped_busy: usize,
    /// Matching copies kept because they are pinned.
    pub skipped_pinned: usize,
}

impl Cache {
    /// Current space figures.
    pub fn usage(&self) -> Usage {
        let settings = self.settings.settings();
        let (free, total) = match nix::sys::statvfs::statvfs(self.store.dir()) {
            Ok(s) => (
                s.blocks_available() * s.fragment_size(),
                s.blocks() * s.fragment_size(),
            ),
            Err(_) => (0, 0),
        };
        let mut used = self.store.reserved_bytes();
        let mut pending = 0;
        for cf in self.live.lock().values().filter_map(Weak::upgrade) {
            let map = cf.map();
            pending += map.len() - map.present_bytes();
            if self.store.get(cf.rel()).is_none() {
                used += map.len(); // not indexed yet
            }
        }
        Usage {
            used,
            pending,
            max: settings.max_bytes,
            free,
            reserve: settings.min_free.unwrap_or(total / 20),
        }
    }

    pub(super) fn is_busy(&self, rel: &Path) -> bool {
        self.open.lock().contains_key(rel)
            || self
                .live
                .lock()
                .get(rel)
                .is_some_and(|w| w.strong_count() > 0)
    }

    /// Least recently used first.
    fn lru_order(&self) -> Vec<PathBuf> {
        self.lru
            .lock()
            .iter()
            .rev()
            .map(|(p, _)| p.clone())
            .collect()
    }

    fn evict(&self, rel: &Path, reason: &str) -> bool {
        let size = self.store.get(rel).map(|e| e.identity.size).unwrap_or(0);
        match self.discard_if_idle(rel) {
            Ok(false) => false, // opened since it was chosen
            Ok(true) => {
                Stats::add(&self.stats.evictions, 1);
                self.stats.category(category_of(rel), |c| c.evictions += 1);
                tracing::info!(path = %rel.display(), bytes = size, reason, "evicted cache copy");
                true
            }
            Err(e) => {
                tracing::warn!(path = %rel.display(), error = %e, "could not evict");
                false
            }
        }
    }

    /// Makes room for a new copy of `need` bytes of `rel`, evicting least recently used copies.
    /// Returns false (evicting nothing more than it had to try) when it cannot fit.
    pub fn make_room(&self, rel: &Path, need: u64) -> bool {
        let _guard = self.space.lock();
        let usage = self.usage();
        if usage.fits(need) {
            return true;
        }
        // Check that evicting every evictable copy would be enough before evicting any.
        let pins = glob_set(&self.settings.settings().pin);
        let candidates: Vec<(PathBuf, u64)> = self
            .lru_order()
            .into_iter()
            .filter(|p| p != rel && !pins.is_match(p) && !self.is_busy(p))
            .filter_map(|p| self.store.get(&p).map(|e| (p, e.identity.size)))
            .collect();
        let evictable: u64 = candidates.iter().map(|(_, s)| s).sum();
        let best = Usage {
            used: usage.used.saturating_sub(evictable),
            free: usage.free + evictable,
            ..usage
        };
        if !best.fits(need) {
            tracing::info!(
                path = %rel.display(),
                bytes = need,
                limit = usage.limit(),
                "copy does not fit in the cache; serving it from the NAS"
            );
            return false;
        }
        for (p, _) in candidates {
            if self.usage().fits(need) {
                break;
            }
            self.evict(&p, "make room");
        }
        self.usage().fits(need)
    }

    /// Evicts least recently used copies until the cache is within its limits again (after a
    /// settings change, or when something else filled the SSD). Returns how many were evicted.
    pub fn enforce_limits(&self) -> usize {
        self.store.retry_removals();
        let _guard = self.space.lock();
        let pins = glob_set(&self.settings.settings().pin);
        let mut evicted = 0;
        for p in self.lru_order() {
            if self.usage().fits(0) {
                break;
            }
            if pins.is_match(&p) || self.is_busy(&p) {
                continue;
            }
            if self.evict(&p, "over the limit") {
                evicted += 1;
            }
        }
        evicted
    }

    /// Removes copies by size, age, category or name; pinned copies only when named.
    pub fn trim(&self, req: &TrimRequest) -> TrimReport {
        let _guard = self.space.lock();
        let pins = glob_set(&self.settings.settings().pin);
        let now = now_secs();
        let want_cat = req.category.as_deref().map(category_key);
        let mut report = TrimReport {
            dry_run: req.dry_run,
            ..Default::default()
        };
        let mut remaining = self.store.reserved_bytes();
        for p in self.lru_order() {
            let Some(e) = self.store.get(&p) else {
                continue;
            };
            let named = req.file.as_deref() == Some(p.as_path());
            let matches = if req.file.is_some() {
                named
            } else {
                let by_cat = want_cat.is_none_or(|c| category_of(&p) == Some(c));
                let by_age = req
                    .older_than
                    .is_none_or(|d| now.saturating_sub(e.last_access) >= d.as_secs());
                let by_size = req.to_bytes.is_none_or(|t| remaining > t);
                by_cat && by_age && by_size
            };
            if !matches {
                continue;
            }
            if !named && pins.is_match(&p) {
                report.skipped_pinned += 1;
                continue;
            }
            if self.is_busy(&p) {
                report.skipped_busy += 1;
                continue;
            }
            let item = TrimItem {
                path: p.clone(),
                bytes: e.identity.size,
                last_access: e.last_access,
            };
            if req.dry_run || self.evict(&p, "trim") {
                remaining = remaining.saturating_sub(item.bytes);
                report.freed_bytes += item.bytes;
                report.removed.push(item);
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::cache::{ChunkMap, EntryRecord, Store};
    use crate::config::{Live, Settings};
    use crate::source::{Identity, IdentityRule};

    /// A cache with complete entries `(path, size, last access)`.
    fn cache(entries: &[(&str, u64, u64)], settings: Settings) -> (tempfile::TempDir, Arc<Cache>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for (i, (p, size, atime)) in entries.iter().enumerate() {
            let (id, _) = store.create_data_file(*size).unwrap();
            let mut map = ChunkMap::new(*size, 4);
            for c in 0..map.chunk_count() {
                map.set_present(c);
            }
            let rec = EntryRecord {
                id,
                identity: Identity {
                    size: *size,
                    mtime_ns: i as i64,
                    ino: i as u64,
                    ctime_ns: 0,
                },
                map,
                last_access: *atime,
                perms: None,
            };
            store.put(Path::new(p), &rec).unwrap();
        }
        let c = Cache::new(
            store,
            IdentityRule::SizeMtimeIno,
            4,
            Arc::new(Live::new(settings)),
            Arc::new(Stats::default()),
        );
        (dir, c)
    }

    fn names(r: &TrimReport) -> Vec<String> {
        r.removed
            .iter()
            .map(|i| i.path.display().to_string())
            .collect()
    }

    #[test]
    fn trim_to_size_in_lru_order_with_dry_run() {
        let (_d, c) = cache(
            &[
                ("loras/new", 100, 300),
                ("loras/old", 100, 100),
                ("vae/mid", 100, 200),
            ],
            Settings::default(),
        );
        let req = TrimRequest {
            to_bytes: Some(150),
            dry_run: true,
            ..Default::default()
        };
        let r = c.trim(&req);
        assert_eq!(names(&r), ["loras/old", "vae/mid"]);
        assert_eq!(r.freed_bytes, 200);
        assert_eq!(c.store.len(), 3, "dry run removes nothing");
        let r = c.trim(&TrimRequest {
            dry_run: false,
            ..req
        });
        assert_eq!(names(&r), ["loras/old", "vae/mid"]);
        assert_eq!(c.store.len(), 1);
        assert_eq!(c.stats.snapshot().evictions, 2);
    }

    #[test]
    fn trim_by_category_age_and_name_sparing_pins_and_open_files() {
        let now = now_secs();
        let settings = Settings {
            pin: vec!["loras/pinned".into()],
            ..Settings::default()
        };
        let (_d, c) = cache(
            &[
                ("loras/pinned", 10, now - 10_000),
                ("loras/open", 10, now - 10_000),
                ("loras/recent", 10, now),
                ("unet/x", 10, now - 10_000),
            ],
            settings,
        );
        c.open_ref(Path::new("loras/open"));
        let r = c.trim(&TrimRequest {
            category: Some("loras".into()),
            ..Default::default()
        });
        assert_eq!(names(&r), ["loras/recent"]);
        assert_eq!((r.skipped_pinned, r.skipped_busy), (1, 1));
        // Folder spellings map to keys; age selects.
        let r = c.trim(&TrimRequest {
            category: Some("diffusion_models".into()),
            older_than: Some(Duration::from_secs(3600)),
            dry_run: true,
            ..Default::default()
        });
        assert_eq!(names(&r), ["unet/x"]);
        // A pinned copy goes only when named.
        let r = c.trim(&TrimRequest {
            file: Some("loras/pinned".into()),
            ..Default::default()
        });
        assert_eq!(names(&r), ["loras/pinned"]);
        // Opening a file is a use: loras/open is recent now.
        c.close_ref(Path::new("loras/open"));
        let r = c.trim(&TrimRequest {
            older_than: Some(Duration::from_secs(60)),
            ..Default::default()
        });
        assert_eq!(names(&r), ["unet/x"]);
    }

    #[test]
    fn make_room_evicts_lru_and_refuses_what_cannot_fit() {
        let settings = Settings {
            max_bytes: 300,
            min_free: Some(0),
            ..Settings::default()
        };
        let (_d, c) = cache(
            &[("a/1", 100, 1), ("a/2", 100, 2), ("a/3", 100, 3)],
            settings,
        );
        assert!(c.make_room(Path::new("a/new"), 150));
        assert!(c.store.get(Path::new("a/1")).is_none());
        assert!(c.store.get(Path::new("a/2")).is_none());
        assert!(c.store.get(Path::new("a/3")).is_some());
        c.open_ref(Path::new("a/3"));
        assert!(
            !c.make_room(Path::new("a/big"), 250),
            "the open copy cannot go"
        );
        assert!(c.store.get(Path::new("a/3")).is_some());
        assert!(!c.make_room(Path::new("a/huge"), 301));
    }
}
