//! The cache as the filesystem sees it: finds a valid copy for a NAS file (checking its identity),
//! shares one [`CacheFile`] between all readers and the worker, and makes progress durable in the
//! background.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use super::{CacheFile, ChunkMap, Store, StoreError};
use crate::source::{Identity, IdentityRule};

/// Progress is made durable at least this often while a copy fills: a crash loses at most this
/// much fetching work, and one `fdatasync` + index commit per file per interval is cheap.
const FLUSH_INTERVAL: Duration = Duration::from_millis(500);

/// What the cache holds for a NAS file with a given identity.
#[derive(Debug)]
pub enum Found {
    /// A complete copy: its data file path.
    Complete(PathBuf),
    /// A partial copy, filling.
    Partial(Arc<CacheFile>),
    /// Nothing usable.
    None,
}

/// The SSD cache of one mount.
#[derive(Debug)]
pub struct Cache {
    store: Store,
    rule: IdentityRule,
    chunk_size: u64,
    live: Mutex<HashMap<PathBuf, Weak<CacheFile>>>,
    flush_tx: Mutex<Option<mpsc::Sender<Arc<CacheFile>>>>,
    flusher: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Cache {
    /// Wraps an opened store and starts the background flusher.
    pub fn new(store: Store, rule: IdentityRule, chunk_size: u64) -> Arc<Self> {
        let (tx, rx) = mpsc::channel::<Arc<CacheFile>>();
        let cache = Arc::new(Self {
            store,
            rule,
            chunk_size,
            live: Mutex::new(HashMap::new()),
            flush_tx: Mutex::new(Some(tx)),
            flusher: Mutex::new(None),
        });
        let weak = Arc::downgrade(&cache);
        let handle = std::thread::Builder::new()
            .name("arenafs-flush".into())
            .spawn(move || flusher(weak, rx))
            .expect("spawn flusher thread");
        *cache.flusher.lock() = Some(handle);
        cache
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The identity rule.
    pub fn rule(&self) -> IdentityRule {
        self.rule
    }

    /// Looks up a usable copy of `rel` whose NAS file now has `identity`. A copy recorded for
    /// another identity is dropped (the NAS file changed). With `create`, a missing copy is
    /// started.
    pub fn find(&self, rel: &Path, identity: Identity, create: bool) -> Result<Found, StoreError> {
        let mut live = self.live.lock();
        if let Some(cf) = live.get(rel).and_then(Weak::upgrade) {
            if cf.identity() == identity && !cf.is_disabled() {
                return Ok(if cf.is_complete() {
                    Found::Complete(self.store.data_path(cf.id()))
                } else {
                    Found::Partial(cf)
                });
            }
            live.remove(rel);
            if !cf.is_disabled() {
                tracing::info!(path = %rel.display(), "NAS file changed; dropping its cache copy");
            }
            cf.discard(&self.store)?;
        }
        if let Some(rec) = self.store.get(rel) {
            if rec.identity != identity {
                tracing::info!(path = %rel.display(), "NAS file changed; dropping its cache copy");
                self.store.remove(rel, rec.id)?;
            } else if rec.is_complete() {
                return Ok(Found::Complete(self.store.data_path(rec.id)));
            } else {
                match OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(self.store.data_path(rec.id))
                {
                    Ok(data) if data.metadata()?.len() == identity.size => {
                        let cf = Arc::new(CacheFile::new(
                            rel.to_path_buf(),
                            rec.id,
                            identity,
                            self.rule,
                            data,
                            rec.map,
                        ));
                        live.insert(rel.to_path_buf(), Arc::downgrade(&cf));
                        return Ok(Found::Partial(cf));
                    }
                    _ => {
                        tracing::warn!(path = %rel.display(), "cache data file missing or wrong size; dropping the entry");
                        self.store.remove(rel, rec.id)?;
                    }
                }
            }
        }
        if !create {
            return Ok(Found::None);
        }
        let (id, data) = self.store.create_data_file(identity.size)?;
        let cf = Arc::new(CacheFile::new(
            rel.to_path_buf(),
            id,
            identity,
            self.rule,
            data,
            ChunkMap::new(identity.size, self.chunk_size),
        ));
        live.insert(rel.to_path_buf(), Arc::downgrade(&cf));
        Ok(Found::Partial(cf))
    }

    /// Drops the copy of `rel` whatever its state (used when a complete copy turns out unusable).
    pub fn discard(&self, rel: &Path) -> Result<(), StoreError> {
        if let Some(cf) = self.live.lock().remove(rel).and_then(|w| w.upgrade()) {
            cf.discard(&self.store)?;
        }
        if let Some(rec) = self.store.get(rel) {
            self.store.remove(rel, rec.id)?;
        }
        Ok(())
    }

    /// Asks the flusher to make `cf`'s progress durable soon (immediately once it is complete).
    pub fn mark_dirty(&self, cf: &Arc<CacheFile>) {
        if let Some(tx) = self.flush_tx.lock().as_ref() {
            let _ = tx.send(cf.clone());
        }
    }

    /// Stops the flusher after it has made everything pending durable.
    pub fn shutdown(&self) {
        self.flush_tx.lock().take();
        if let Some(h) = self.flusher.lock().take() {
            let _ = h.join();
        }
        // Copies still referenced (open handles at unmount) are persisted here.
        let live: Vec<_> = self
            .live
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for cf in live {
            self.persist(&cf);
        }
    }

    fn persist(&self, cf: &CacheFile) {
        match cf.persist(&self.store, now_secs()) {
            Ok(true) if cf.map().is_complete() => tracing::info!(
                path = %cf.rel().display(),
                bytes = cf.identity().size,
                "cache copy complete"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(path = %cf.rel().display(), error = %e, "could not record cache progress; dropping the copy");
                cf.disable();
            }
        }
    }
}

fn flusher(cache: Weak<Cache>, rx: mpsc::Receiver<Arc<CacheFile>>) {
    let mut pending: HashMap<*const CacheFile, Arc<CacheFile>> = HashMap::new();
    let mut last = Instant::now();
    loop {
        let disconnected = match rx.recv_timeout(FLUSH_INTERVAL) {
            Ok(cf) => {
                let complete = cf.is_complete();
                pending.insert(Arc::as_ptr(&cf), cf);
                if !complete && last.elapsed() < FLUSH_INTERVAL {
                    continue;
                }
                false
            }
            Err(mpsc::RecvTimeoutError::Timeout) => false,
            Err(mpsc::RecvTimeoutError::Disconnected) => true,
        };
        if let Some(cache) = cache.upgrade() {
            for (_, cf) in pending.drain() {
                cache.persist(&cf);
            }
        }
        last = Instant::now();
        if disconnected {
            return;
        }
    }
}
