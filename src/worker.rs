//! Background completion of cache copies.
//!
//! Once a reader has touched an allowed file, a job here fetches the chunks no reader has fetched,
//! in file order, through the same [`CacheFile::ensure_chunk`] the readers use, so a chunk is never
//! fetched twice. At most `concurrency` copies run at once.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::cache::{Cache, CacheFile, FetchError};
use crate::source::Nas;
use crate::stats::Stats;

struct Queue {
    jobs: VecDeque<Arc<CacheFile>>,
    queued: HashSet<PathBuf>,
    stopping: bool,
}

/// The copy worker pool.
pub struct Worker {
    queue: Mutex<Queue>,
    cond: Condvar,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").finish_non_exhaustive()
    }
}

impl Worker {
    /// Starts `concurrency` copy threads.
    pub fn start(
        live: Arc<crate::config::Live>,
        nas: Arc<Nas>,
        cache: Arc<Cache>,
        stats: Arc<Stats>,
    ) -> Arc<Self> {
        let worker = Arc::new(Self {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                queued: HashSet::new(),
                stopping: false,
            }),
            cond: Condvar::new(),
            threads: Mutex::new(Vec::new()),
        });
        for i in 0..live.settings().max_concurrency.max(1) {
            let (w, nas, cache, stats) =
                (worker.clone(), nas.clone(), cache.clone(), stats.clone());
            let handle = std::thread::Builder::new()
                .name(format!("arenafs-copy-{i}"))
                .spawn(move || w.run(&nas, &cache, &stats))
                .expect("spawn copy thread");
            worker.threads.lock().push(handle);
        }
        worker
    }

    /// Queues completion of `cf` unless it is queued already.
    pub fn enqueue(&self, cf: Arc<CacheFile>) {
        let mut q = self.queue.lock();
        if q.stopping || !q.queued.insert(cf.rel().clone()) {
            return;
        }
        q.jobs.push_back(cf);
        self.cond.notify_one();
    }

    /// Stops the threads; copies in progress stop at the next chunk boundary.
    pub fn stop(&self) {
        {
            let mut q = self.queue.lock();
            q.stopping = true;
            q.jobs.clear();
        }
        self.cond.notify_all();
        for h in self.threads.lock().drain(..) {
            let _ = h.join();
        }
    }

    fn is_stopping(&self) -> bool {
        self.queue.lock().stopping
    }

    fn run(&self, nas: &Nas, cache: &Cache, stats: &Stats) {
        loop {
            let cf = {
                let mut q = self.queue.lock();
                loop {
                    if q.stopping {
                        return;
                    }
                    if let Some(cf) = q.jobs.pop_front() {
                        break cf;
                    }
                    self.cond.wait(&mut q);
                }
            };
            let ok = self.complete(nas, cache, stats, &cf);
            Stats::add(
                if ok {
                    &stats.copies_completed
                } else {
                    &stats.copies_failed
                },
                1,
            );
            cache.mark_dirty(&cf);
            self.queue.lock().queued.remove(cf.rel());
        }
    }

    fn complete(&self, nas: &Nas, cache: &Cache, stats: &Stats, cf: &Arc<CacheFile>) -> bool {
        let file = match nas.open_file(cf.rel()) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %cf.rel().display(), error = %e, "copy: cannot open NAS file");
                return false;
            }
        };
        let mut next = 0;
        while let Some(idx) = cf.next_missing(next) {
            if self.is_stopping() {
                return false;
            }
            match cf.ensure_chunk(idx, &file) {
                Ok(chunk) => {
                    if let crate::cache::file::Chunk::Fetched(buf) = chunk {
                        Stats::add(&stats.bytes_fetched, buf.len() as u64);
                    }
                    cache.mark_dirty(cf);
                }
                Err(FetchError::Changed) => {
                    Stats::add(&stats.stale_dropped, 1);
                    let _ = cache.discard(cf.rel());
                    return false;
                }
                Err(e) => {
                    tracing::warn!(path = %cf.rel().display(), error = %e, "copy stopped");
                    return false;
                }
            }
            next = idx + 1;
        }
        cf.is_complete()
    }
}
