//! `GET /metrics`: the Prometheus text exposition format (version 0.0.4).
//!
//! The counters live in [`crate::stats::Stats`] as plain atomics that the data path bumps; this
//! module only renders them, so a scrape costs a few loads and one `statfs` of the cache.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::Shared;
use crate::config::CacheState;
use crate::stats::HistogramSnapshot;

/// Content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Builds the exposition text.
#[derive(Default)]
struct Text(String);

impl Text {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.head(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A metric with one sample per value of `label`.
    fn labelled<V: std::fmt::Display>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (String, V)>,
    ) {
        self.head(name, kind, help);
        for (value, n) in samples {
            self.sample(name, &[(label, &value)], n);
        }
    }

    fn histogram(&mut self, name: &str, label: &str, series: &[(&str, HistogramSnapshot)]) {
        for (value, h) in series {
            for (bound, count) in &h.buckets {
                self.sample(
                    &format!("{name}_bucket"),
                    &[(label, value), ("le", &bound.to_string())],
                    count,
                );
            }
            self.sample(
                &format!("{name}_bucket"),
                &[(label, value), ("le", "+Inf")],
                h.count,
            );
            self.sample(&format!("{name}_sum"), &[(label, value)], h.sum_secs);
            self.sample(&format!("{name}_count"), &[(label, value)], h.count);
        }
    }
}

/// Escapes a label value (backslash, quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders every metric.
pub fn render(s: &Shared, nas_up: bool) -> String {
    let st = s.stats.snapshot();
    let cats = s.stats.since_start().categories;
    let usage = s.cache.usage();
    let settings = s.live.settings();
    let jobs = s.worker.jobs();
    let mut t = Text::default();

    t.head(
        "arenafs_build_info",
        "gauge",
        "Version of the running daemon.",
    );
    t.sample(
        "arenafs_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );

    t.head(
        "arenafs_opens_total",
        "counter",
        "Opens of files by how they were served: passthrough and ssd are cache hits, filling is a miss of a cacheable file, nas is a file not cached by policy.",
    );
    for (source, v) in [
        ("passthrough", st.opens_passthrough),
        ("ssd", st.opens_ssd),
        ("filling", st.opens_filling),
        ("nas", st.opens_nas),
    ] {
        t.sample("arenafs_opens_total", &[("source", source)], v);
    }

    t.one(
        "arenafs_opens_offline_total",
        "counter",
        "Opens of complete copies served while the NAS was offline (last-known-good).",
        st.opens_offline,
    );
    t.one(
        "arenafs_opens_write_total",
        "counter",
        "Opens for writing (written through to the NAS).",
        st.opens_write,
    );
    t.one(
        "arenafs_written_bytes_total",
        "counter",
        "Bytes written to the NAS by user-space writer handles (passthrough writes never reach the daemon).",
        st.bytes_written,
    );
    t.one(
        "arenafs_nas_calls_unanswered_total",
        "counter",
        "NAS calls answered without the NAS: past the deadline (nas_timeout), or no free NAS thread.",
        st.nas_timeouts,
    );
    t.one(
        "arenafs_index_answers_total",
        "counter",
        "Lookups, attributes, opens and listings answered from the cache index because the NAS did not answer.",
        st.index_answers,
    );
    let (alive, busy) = s.nas_io.threads();
    t.head(
        "arenafs_nas_threads",
        "gauge",
        "Threads of the NAS call pool: busy (a call in the NAS, stuck ones included) and idle.",
    );
    t.sample("arenafs_nas_threads", &[("state", "busy")], busy as u64);
    t.sample(
        "arenafs_nas_threads",
        &[("state", "idle")],
        alive.saturating_sub(busy) as u64,
    );

    t.head(
        "arenafs_cache_hits_total",
        "counter",
        "Opens of a cacheable file served from a complete SSD copy, by category.",
    );
    for (c, v) in &cats {
        t.sample("arenafs_cache_hits_total", &[("category", c)], v.hits);
    }
    t.head(
        "arenafs_cache_misses_total",
        "counter",
        "Opens of a cacheable file without a complete SSD copy, by category.",
    );
    for (c, v) in &cats {
        t.sample("arenafs_cache_misses_total", &[("category", c)], v.misses);
    }

    t.head(
        "arenafs_read_bytes_total",
        "counter",
        "Bytes returned to readers in user space, by tier (passthrough reads never reach the daemon).",
    );
    t.sample(
        "arenafs_read_bytes_total",
        &[("tier", "ssd")],
        st.bytes_from_ssd,
    );
    t.sample(
        "arenafs_read_bytes_total",
        &[("tier", "nas")],
        st.bytes_from_nas,
    );

    t.one(
        "arenafs_fetched_bytes_total",
        "counter",
        "Bytes fetched from the NAS into the cache, by readers and background copies.",
        st.bytes_fetched,
    );
    t.one(
        "arenafs_background_fetched_bytes_total",
        "counter",
        "Bytes background copies fetched from the NAS (what the session byte budget counts).",
        st.session_bytes_downloaded,
    );
    t.one(
        "arenafs_copies_completed_total",
        "counter",
        "Background copies completed.",
        st.copies_completed,
    );
    t.one(
        "arenafs_copies_failed_total",
        "counter",
        "Background copies that stopped with an error.",
        st.copies_failed,
    );
    t.one(
        "arenafs_copy_retries_total",
        "counter",
        "Background copy attempts retried after a NAS error.",
        st.copy_retries,
    );
    t.one(
        "arenafs_copies_no_space_total",
        "counter",
        "Copies not made because they could not fit in the cache.",
        st.copies_no_space,
    );
    t.one(
        "arenafs_evictions_total",
        "counter",
        "Copies evicted (LRU, limits, trim).",
        st.evictions,
    );
    t.one(
        "arenafs_stale_dropped_total",
        "counter",
        "Copies dropped because their NAS file changed.",
        st.stale_dropped,
    );
    t.one(
        "arenafs_worker_yields_total",
        "counter",
        "Times a background copy waited for a reader using the NAS.",
        st.worker_yields,
    );
    t.one(
        "arenafs_read_errors_total",
        "counter",
        "Read requests answered with an error (NAS errors, mostly).",
        st.read_errors,
    );

    t.one(
        "arenafs_cache_used_bytes",
        "gauge",
        "Sum of the sizes of all copies in the cache.",
        usage.used,
    );
    t.one(
        "arenafs_cache_limit_bytes",
        "gauge",
        "The size the cache may reach now (max size or disk minus reserve).",
        usage.limit(),
    );
    t.one(
        "arenafs_cache_free_bytes",
        "gauge",
        "Free space on the cache file system.",
        usage.free,
    );
    t.one(
        "arenafs_cache_entries",
        "gauge",
        "Entries in the cache index.",
        s.cache.store().len(),
    );
    t.one(
        "arenafs_cache_complete_entries",
        "gauge",
        "Entries whose copy is complete.",
        s.cache.store().complete_count(),
    );
    t.one(
        "arenafs_copies_running",
        "gauge",
        "Background copies running.",
        jobs.iter().filter(|j| j.state == "running").count(),
    );
    t.one(
        "arenafs_queue_length",
        "gauge",
        "Background copies queued.",
        s.worker.queue_len(),
    );
    t.one(
        "arenafs_required_models",
        "gauge",
        "Files in the required set.",
        s.worker.required_len(),
    );
    t.one(
        "arenafs_passthrough_available",
        "gauge",
        "1 when complete copies are served with kernel passthrough.",
        u8::from(s.passthrough.load(Ordering::Relaxed)),
    );
    t.one(
        "arenafs_nas_up",
        "gauge",
        "1 when the NAS is there; 0 in offline mode (complete copies served as last-known-good).",
        u8::from(nas_up),
    );
    t.head(
        "arenafs_cache_state",
        "gauge",
        "1 for the state the cache is in: gray (off), green (serve copies only), red (serve and make copies).",
    );
    let now = settings.state();
    for (name, state) in [
        ("gray", CacheState::Gray),
        ("green", CacheState::Green),
        ("red", CacheState::Red),
    ] {
        t.sample(
            "arenafs_cache_state",
            &[("state", name)],
            u8::from(now == state),
        );
    }

    t.head(
        "arenafs_read_duration_seconds",
        "histogram",
        "Latency of reads served in user space, by source: ssd (complete copy), fill (copy being filled), nas (not cached).",
    );
    let lat = &s.stats.read_latency;
    t.histogram(
        "arenafs_read_duration_seconds",
        "source",
        &[
            ("ssd", lat.ssd.snapshot()),
            ("fill", lat.fill.snapshot()),
            ("nas", lat.nas.snapshot()),
        ],
    );
    if let Some(h) = s.cache.http_source() {
        let h = h.status();
        t.one(
            "arenafs_http_source_bytes_total",
            "counter",
            "Bytes fetched over the HTTP source into the cache (the rest of arenafs_fetched_bytes_total came from the NAS directly).",
            h.bytes,
        );
        t.labelled(
            "arenafs_http_fallbacks_total",
            "counter",
            "Files whose copy fell back from the HTTP source to the NAS, by reason.",
            "reason",
            h.fallbacks.iter().map(|(r, n)| (r.to_string(), *n)),
        );
    }
    let up = s.update.status();
    if up.manifest.is_some() {
        t.labelled(
            "arenafs_update_available",
            "gauge",
            "Whether the last check of a tracked model found a version other than the installed one.",
            "id",
            s.update
                .available_by_model()
                .into_iter()
                .map(|(id, a)| (id, u8::from(a))),
        );
        t.one(
            "arenafs_update_last_check_timestamp_seconds",
            "gauge",
            "When the updater last checked a model.",
            up.last_check_at.unwrap_or(0),
        );
        t.one(
            "arenafs_update_downloaded_bytes_total",
            "counter",
            "Bytes the updater downloaded.",
            up.downloaded_bytes,
        );
        t.labelled(
            "arenafs_update_failures_total",
            "counter",
            "Updater failures, by reason.",
            "reason",
            up.failures.iter().map(|(r, n)| (r.to_string(), *n)),
        );
        t.one(
            "arenafs_update_running",
            "gauge",
            "Whether an update run is going on.",
            u8::from(up.running.is_some()),
        );
    }
    t.0
}

pub(super) async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    let nas_up = !s.health.offline();
    let body = tokio::task::spawn_blocking(move || render(&s, nas_up))
        .await
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
        let mut t = Text::default();
        t.sample("m", &[("category", "we\"ird")], 1);
        assert_eq!(t.0, "m{category=\"we\\\"ird\"} 1\n");
    }
}
