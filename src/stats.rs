//! Counters: since this daemon started, per category, and totals persisted across restarts.
//!
//! Hits are opens served from a complete SSD copy (through passthrough or user space); misses are
//! opens of a cacheable file without a complete copy. Bytes read through passthrough never reach
//! the daemon, so `bytes_from_ssd` counts user-space reads only.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Live counters (relaxed atomics: they are statistics, not synchronisation).
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[$doc])* pub $name: AtomicU64,)*
            categories: Mutex<BTreeMap<String, CategoryStats>>,
            earlier: Mutex<Totals>,
        }

        /// A point-in-time copy of [`Stats`].
        #[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
        #[serde(default)]
        pub struct StatsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Stats {
            /// Copies every counter (since start).
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl StatsSnapshot {
            /// Field-wise sum.
            pub fn plus(&self, o: &StatsSnapshot) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name + o.$name,)* }
            }
        }
    };
}

counters! {
    /// Opens of a complete copy answered with kernel passthrough.
    opens_passthrough,
    /// Opens of a complete copy served by user-space reads from the SSD.
    opens_ssd,
    /// Opens of an allowed file whose copy is not complete (reads fill the cache).
    opens_filling,
    /// Opens of files not cached by policy (read from the NAS).
    opens_nas,
    /// Bytes returned to readers from the SSD by user-space reads.
    bytes_from_ssd,
    /// Bytes returned to readers straight from the NAS (policy or fallback).
    bytes_from_nas,
    /// Bytes fetched from the NAS into the cache (by readers and the worker).
    bytes_fetched,
    /// Background copy jobs completed.
    copies_completed,
    /// Background copy jobs that stopped with an error.
    copies_failed,
    /// Background copy attempts retried after a NAS error.
    copy_retries,
    /// Cache copies dropped because the NAS file changed.
    stale_dropped,
    /// Copies evicted (LRU, limits, trim).
    evictions,
    /// Copies not made because they could not fit.
    copies_no_space,
    /// Times a background copy waited for a reader using the NAS.
    worker_yields,
    /// Bytes background copies fetched from the NAS (counts against the byte budget).
    session_bytes_downloaded,
    /// Read requests that failed with an error.
    read_errors,
}

/// Counters of one category.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct CategoryStats {
    /// Opens served from a complete copy.
    pub hits: u64,
    /// Opens of a cacheable file without a complete copy.
    pub misses: u64,
    /// Bytes fetched from the NAS into the cache.
    pub bytes_fetched: u64,
    /// Copies completed by the worker.
    pub copies_completed: u64,
    /// Copies evicted or trimmed.
    pub evictions: u64,
}

impl CategoryStats {
    fn plus(&self, o: &CategoryStats) -> CategoryStats {
        CategoryStats {
            hits: self.hits + o.hits,
            misses: self.misses + o.misses,
            bytes_fetched: self.bytes_fetched + o.bytes_fetched,
            copies_completed: self.copies_completed + o.copies_completed,
            evictions: self.evictions + o.evictions,
        }
    }
}

/// What is persisted across restarts, and what `GET /arena/stats` reports.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Totals {
    /// Overall counters.
    pub overall: StatsSnapshot,
    /// Per category key.
    pub categories: BTreeMap<String, CategoryStats>,
}

impl Stats {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Updates the counters of `category` (files outside any category count as "other").
    pub fn category(&self, category: Option<&str>, f: impl FnOnce(&mut CategoryStats)) {
        let mut c = self.categories.lock();
        f(c.entry(category.unwrap_or("other").to_string())
            .or_default());
    }

    /// Counters since start, per category.
    pub fn since_start(&self) -> Totals {
        Totals {
            overall: self.snapshot(),
            categories: self.categories.lock().clone(),
        }
    }

    /// Sets what earlier runs counted (loaded from the cache index at start).
    pub fn set_earlier(&self, earlier: Totals) {
        *self.earlier.lock() = earlier;
    }

    /// Earlier runs plus this one: what is persisted and reported as totals.
    pub fn totals(&self) -> Totals {
        let earlier = self.earlier.lock().clone();
        let now = self.since_start();
        let mut categories = earlier.categories;
        for (k, v) in now.categories {
            let e = categories.entry(k).or_default();
            *e = e.plus(&v);
        }
        Totals {
            overall: earlier.overall.plus(&now.overall),
            categories,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_earlier_runs() {
        let s = Stats::default();
        Stats::add(&s.opens_passthrough, 2);
        s.category(Some("loras"), |c| c.hits += 2);
        s.category(None, |c| c.misses += 1);
        let first = s.totals();
        let json = serde_json::to_string(&first).unwrap();
        let s2 = Stats::default();
        s2.set_earlier(serde_json::from_str(&json).unwrap());
        Stats::add(&s2.opens_passthrough, 1);
        s2.category(Some("loras"), |c| c.hits += 1);
        let t = s2.totals();
        assert_eq!(t.overall.opens_passthrough, 3);
        assert_eq!(t.categories["loras"].hits, 3);
        assert_eq!(t.categories["other"].misses, 1);
        assert_eq!(s2.since_start().overall.opens_passthrough, 1);
        // Old persisted records with fewer fields still load.
        let old: Totals = serde_json::from_str(r#"{"overall":{"opens_nas":4}}"#).unwrap();
        assert_eq!(old.overall.opens_nas, 4);
    }
}
