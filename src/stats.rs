//! Counters of one daemon run, readable through the control socket.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Live counters (relaxed atomics: they are statistics, not synchronisation).
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of [`Stats`].
        #[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Stats {
            /// Copies every counter.
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
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

impl Stats {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
