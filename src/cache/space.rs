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

/// Candidates an eviction pass keeps (the oldest copies not kept for another reason).
const EVICTION_BATCH: usize = 64;

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

    /// The bytes to free before `need` more fit (0: they fit).
    pub fn deficit(&self, need: u64) -> u64 {
        let by_max = if self.max == 0 {
            0
        } else {
            (self.used + need).saturating_sub(self.max)
        };
        let by_disk = (self.reserve + self.pending + need).saturating_sub(self.free);
        by_max.max(by_disk)
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
        // Copies being filled (few); the index is asked without the live map locked.
        let filling: Vec<_> = self
            .live
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for cf in filling {
            let map = cf.map();
            pending += map.len() - map.present_bytes();
            if !self.store.contains(cf.rel()) {
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

    /// The paths that must not be evicted now (open through the mount or being filled): a
    /// snapshot, so that the index is scanned without other locks taken.
    fn busy_paths(&self) -> std::collections::HashSet<PathBuf> {
        let mut busy: std::collections::HashSet<PathBuf> =
            self.open.lock().keys().cloned().collect();
        busy.extend(
            self.live
                .lock()
                .iter()
                .filter(|(_, w)| w.strong_count() > 0)
                .map(|(p, _)| p.clone()),
        );
        busy
    }

    fn evict(&self, rel: &Path, reason: &str) -> bool {
        let size = self.store.size_of(rel).unwrap_or(0);
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
    /// Returns false (evicting nothing) when evicting every evictable copy would not be enough.
    ///
    /// The oldest copies are found by a pass over the index that keeps a few candidates (more
    /// passes, each keeping four times as many, only when those few do not free enough): no
    /// copy of the recency order is made, and the pass runs only when the cache is full.
    pub fn make_room(&self, rel: &Path, need: u64) -> bool {
        let _guard = self.space.lock();
        let usage = self.usage();
        let deficit = usage.deficit(need);
        if deficit == 0 {
            return true;
        }
        let pins = glob_set(&self.settings.settings().pin);
        let busy = self.busy_paths();
        let keep = |p: &Path| p == rel || busy.contains(p) || pins.is_match(p);
        let mut limit = EVICTION_BATCH;
        let chosen = loop {
            let candidates = self.store.oldest(limit, keep);
            let mut freed = 0;
            let enough = candidates.iter().position(|c| {
                freed += c.size;
                freed >= deficit
            });
            match enough {
                Some(i) => break candidates[..=i].to_vec(),
                None if candidates.len() < limit => {
                    tracing::info!(
                        path = %rel.display(),
                        bytes = need,
                        limit = usage.limit(),
                        "copy does not fit in the cache; serving it from the NAS"
                    );
                    return false;
                }
                None => limit *= 4,
            }
        };
        for c in chosen {
            if self.usage().fits(need) {
                break;
            }
            self.evict(&c.path, "make room");
        }
        self.usage().fits(need)
    }

    /// Evicts least recently used copies until the cache is within its limits again (after a
    /// settings change, or when something else filled the SSD). Returns how many were evicted.
    pub fn enforce_limits(&self) -> usize {
        self.store.retry_removals();
        let _guard = self.space.lock();
        if self.usage().fits(0) {
            return 0;
        }
        let pins = glob_set(&self.settings.settings().pin);
        let mut kept = self.busy_paths();
        let mut evicted = 0;
        loop {
            let candidates = self
                .store
                .oldest(EVICTION_BATCH, |p| kept.contains(p) || pins.is_match(p));
            if candidates.is_empty() {
                break;
            }
            for c in candidates {
                if self.usage().fits(0) {
                    return evicted;
                }
                if self.evict(&c.path, "over the limit") {
                    evicted += 1;
                } else {
                    kept.insert(c.path); // busy since, or failed: not chosen again
                }
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
        let candidates = match &req.file {
            Some(f) => self
                .store
                .get(f)
                .map(|r| super::Aged {
                    path: f.clone(),
                    id: r.id,
                    size: r.identity.size,
                    last_access: r.last_access,
                })
                .into_iter()
                .collect(),
            None => self.store.by_age(|p, a| {
                want_cat.is_none_or(|c| category_of(p) == Some(c))
                    && req
                        .older_than
                        .is_none_or(|d| now.saturating_sub(a.last_access) >= d.as_secs())
            }),
        };
        for e in candidates {
            let p = e.path;
            let named = req.file.is_some();
            if !named && req.to_bytes.is_some_and(|t| remaining <= t) {
                break;
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
                bytes: e.size,
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

    /// More copies must go than one pass keeps: later passes keep more; pinned and open copies
    /// stay; nothing goes when even all of the others would not be enough.
    #[test]
    fn make_room_beyond_one_batch() {
        let n = EVICTION_BATCH * 5;
        let paths: Vec<String> = (0..n).map(|i| format!("loras/{i:04}")).collect();
        let entries: Vec<(&str, u64, u64)> = paths
            .iter()
            .enumerate()
            .map(|(i, p)| (p.as_str(), 10, 1000 + i as u64))
            .collect();
        let settings = Settings {
            max_bytes: 10 * n as u64,
            min_free: Some(0),
            pin: vec!["loras/0001".into()],
            ..Settings::default()
        };
        let (_d, c) = cache(&entries, settings);
        c.open_ref(Path::new("loras/0000"));
        // Asking for more than all but the open and the pinned copy: refused, nothing goes.
        assert!(!c.make_room(Path::new("x"), 10 * (n as u64 - 1)));
        assert_eq!(c.store.len(), n);
        // Room for three batches' worth: the oldest go, the open and pinned ones stay.
        let need = 10 * 3 * EVICTION_BATCH as u64;
        assert!(c.make_room(Path::new("x"), need));
        assert_eq!(c.store.len(), n - 3 * EVICTION_BATCH);
        assert!(c.store.get(Path::new("loras/0000")).is_some());
        assert!(c.store.get(Path::new("loras/0001")).is_some());
        let oldest_left = (2..n)
            .find(|i| c.store.get(Path::new(&paths[*i])).is_some())
            .unwrap();
        assert_eq!(oldest_left, 2 + 3 * EVICTION_BATCH, "the oldest went first");
        assert_eq!(
            c.store.reserved_bytes(),
            10 * (n - 3 * EVICTION_BATCH) as u64
        );
    }
}
