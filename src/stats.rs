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
            /// Latency of reads served in user space, by where their bytes came from.
            pub read_latency: ReadLatency,
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
    /// Opens of complete copies served while the NAS was offline (last-known-good).
    opens_offline,
    /// Opens for writing (written through to the NAS).
    opens_write,
    /// Bytes written to the NAS by user-space writer handles (passthrough writes never reach
    /// the daemon).
    bytes_written,
    /// NAS calls answered without the NAS: past the deadline, or no free NAS thread.
    nas_timeouts,
    /// Lookups, attributes and opens answered from the cache index because the NAS did not
    /// answer (offline or hung).
    index_answers,
}

/// Upper bounds, in seconds, of the read latency histogram buckets (plus `+Inf`).
pub const LATENCY_BOUNDS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// A latency histogram with the buckets of [`LATENCY_BOUNDS`].
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// A point-in-time copy of a [`Histogram`], with cumulative bucket counts.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations <= bound)`.
    pub buckets: Vec<(f64, u64)>,
    /// Observations.
    pub count: u64,
    /// Sum of the observations, seconds.
    pub sum_secs: f64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BOUNDS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// Cumulative counts, as Prometheus wants them.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0;
        let buckets = LATENCY_BOUNDS
            .iter()
            .zip(&self.buckets)
            .map(|(b, c)| {
                acc += c.load(Ordering::Relaxed);
                (*b, acc)
            })
            .collect();
        HistogramSnapshot {
            buckets,
            count: self.count.load(Ordering::Relaxed),
            sum_secs: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// Read latency by source of the bytes.
#[derive(Debug, Default)]
pub struct ReadLatency {
    /// Reads of a complete copy (user space; passthrough reads never reach the daemon).
    pub ssd: Histogram,
    /// Reads of a copy being filled (from the SSD where present, else fetched from the NAS).
    pub fill: Histogram,
    /// Reads straight from the NAS (files not cached by policy).
    pub nas: Histogram,
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

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        for us in [50, 50, 700, 30_000, 9_000_000] {
            h.observe(std::time::Duration::from_micros(us));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.buckets[0], (0.0001, 2));
        assert_eq!(s.buckets[3], (0.001, 3));
        assert_eq!(s.buckets[8], (0.05, 4));
        // 9 s is above every bound: only in +Inf (the count).
        assert_eq!(s.buckets.last().unwrap().1, 4);
        assert!((s.sum_secs - 9.0308).abs() < 1e-9);
    }
}
