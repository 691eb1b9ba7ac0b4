//! The cache as the filesystem sees it: finds a valid copy for a NAS file (checking its identity),
//! shares one [`CacheFile`] between all readers and the worker, and makes progress durable in the
//! background.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex};

use super::{CacheFile, ChunkMap, Perms, Store, StoreError};
use crate::config::Live;
use crate::source::{Identity, IdentityRule};
use crate::stats::Stats;

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
///
/// Locking: finding, creating and dropping the copy of one NAS path are exclusive per path
/// ([`Cache::lock_path`]), so an eviction cannot remove a copy while an open of the same path is
/// finding it (which would leave an index record without its data file). The maps below are
/// locked only for lookups and updates in memory, never across I/O: an open of one file never
/// waits for the `fdatasync` or index commit of another.
#[derive(Debug)]
pub struct Cache {
    pub(super) store: Store,
    rule: IdentityRule,
    chunk_size: u64,
    pub(super) live: Mutex<HashMap<PathBuf, Weak<CacheFile>>>,
    flush_tx: Mutex<Option<mpsc::Sender<Arc<CacheFile>>>>,
    flusher: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Handles open through the mount, per NAS path: such copies are never evicted.
    pub(super) open: Mutex<HashMap<PathBuf, u32>>,
    pub(super) settings: Arc<Live>,
    pub(super) stats: Arc<Stats>,
    /// Serialises space decisions, so two new copies cannot both claim the last free bytes.
    pub(super) space: Mutex<()>,
    /// Paths whose copy is being found, created or dropped (see [`Cache::lock_path`]).
    busy_paths: Mutex<HashSet<PathBuf>>,
    path_freed: Condvar,
    /// Where chunk bytes come from before the NAS (`ARENA_HTTP_SOURCE`).
    http: std::sync::OnceLock<Arc<crate::httpsrc::HttpSource>>,
}

/// Exclusive use of one NAS path's copy; released on drop.
pub(super) struct PathGuard<'a> {
    cache: &'a Cache,
    rel: PathBuf,
}

impl Drop for PathGuard<'_> {
    fn drop(&mut self) {
        self.cache.busy_paths.lock().remove(&self.rel);
        self.cache.path_freed.notify_all();
    }
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Cache {
    /// Wraps an opened store and starts the background flusher.
    /// Fetches chunks (of copies and of reads that miss) from `http` first, falling back to the
    /// NAS per file.
    pub fn use_http_source(&self, http: Arc<crate::httpsrc::HttpSource>) {
        let _ = self.http.set(http);
    }

    /// The HTTP source, when one is configured.
    pub fn http_source(&self) -> Option<&Arc<crate::httpsrc::HttpSource>> {
        self.http.get()
    }

    pub fn new(
        store: Store,
        rule: IdentityRule,
        chunk_size: u64,
        settings: Arc<Live>,
        stats: Arc<Stats>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel::<Arc<CacheFile>>();
        let cache = Arc::new(Self {
            store,
            rule,
            chunk_size,
            live: Mutex::new(HashMap::new()),
            flush_tx: Mutex::new(Some(tx)),
            flusher: Mutex::new(None),
            open: Mutex::new(HashMap::new()),
            settings,
            stats,
            space: Mutex::new(()),
            busy_paths: Mutex::new(HashSet::new()),
            path_freed: Condvar::new(),
            http: std::sync::OnceLock::new(),
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

    /// Waits until no one else finds, creates or drops the copy of `rel`, and holds it.
    pub(super) fn lock_path(&self, rel: &Path) -> PathGuard<'_> {
        let mut busy = self.busy_paths.lock();
        while busy.contains(rel) {
            self.path_freed.wait(&mut busy);
        }
        busy.insert(rel.to_path_buf());
        PathGuard {
            cache: self,
            rel: rel.to_path_buf(),
        }
    }

    /// Looks up a usable copy of `rel` whose NAS file now has `identity` (and `perms`). A copy
    /// recorded for another identity is dropped (the NAS file changed). With `create`, a missing
    /// copy is started. With `pin`, a copy found is protected from eviction, as by
    /// [`Cache::open_ref`], before anyone else can drop it (release with [`Cache::close_ref`]).
    pub fn find(
        &self,
        rel: &Path,
        identity: Identity,
        perms: Option<Perms>,
        create: bool,
        pin: bool,
    ) -> Result<Found, StoreError> {
        let found = {
            let _path = self.lock_path(rel);
            let found = self.find_locked(rel, identity, perms)?;
            if pin && !matches!(found, Found::None) {
                self.open_ref(rel);
            }
            found
        };
        if !matches!(found, Found::None) || !create {
            return Ok(found);
        }
        // Room is made without holding this path (eviction takes other paths' locks).
        if !self.make_room(rel, identity.size) {
            return Ok(Found::None);
        }
        let _path = self.lock_path(rel);
        // Another open may have created it meanwhile.
        let found = self.find_locked(rel, identity, perms)?;
        let found = match found {
            Found::None => {
                let (id, data) = self.store.create_data_file(identity.size)?;
                let cf = Arc::new(CacheFile::new(
                    rel.to_path_buf(),
                    id,
                    identity,
                    perms,
                    self.rule,
                    data,
                    ChunkMap::new(identity.size, self.chunk_size),
                ));
                if let Some(h) = self.http.get() {
                    cf.use_http(h.clone());
                }
                self.live
                    .lock()
                    .insert(rel.to_path_buf(), Arc::downgrade(&cf));
                Found::Partial(cf)
            }
            other => other,
        };
        if pin {
            self.open_ref(rel);
        }
        Ok(found)
    }

    /// [`Cache::find`] without creating, under the path's lock.
    fn find_locked(
        &self,
        rel: &Path,
        identity: Identity,
        perms: Option<Perms>,
    ) -> Result<Found, StoreError> {
        let live = self.live.lock().get(rel).and_then(Weak::upgrade);
        if let Some(cf) = live {
            if cf.identity() == identity && !cf.is_disabled() {
                return Ok(if cf.is_complete() {
                    Found::Complete(self.store.data_path(cf.id()))
                } else {
                    Found::Partial(cf)
                });
            }
            self.live.lock().remove(rel);
            if !cf.is_disabled() {
                tracing::info!(path = %rel.display(), "NAS file changed; dropping its cache copy");
            }
            cf.discard(&self.store)?;
        }
        let Some(rec) = self.store.get(rel) else {
            return Ok(Found::None);
        };
        // A record made under a stricter rule matches when the fields this rule uses do.
        if self.rule.mask(rec.identity) != identity {
            tracing::info!(path = %rel.display(), "NAS file changed; dropping its cache copy");
            self.store.remove(rel, rec.id)?;
            return Ok(Found::None);
        }
        if let Some(p) = perms
            && rec.perms != Some(p)
            && let Err(e) = self.store.set_perms(rel, rec.id, p)
        {
            tracing::warn!(path = %rel.display(), error = %e, "could not record the owner and mode of a cached file");
        }
        if rec.is_complete() {
            return Ok(Found::Complete(self.store.data_path(rec.id)));
        }
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
                    perms.or(rec.perms),
                    self.rule,
                    data,
                    rec.map,
                ));
                if let Some(h) = self.http.get() {
                    cf.use_http(h.clone());
                }
                self.live
                    .lock()
                    .insert(rel.to_path_buf(), Arc::downgrade(&cf));
                Ok(Found::Partial(cf))
            }
            _ => {
                tracing::warn!(path = %rel.display(), "cache data file missing or wrong size; dropping the entry");
                self.store.remove(rel, rec.id)?;
                Ok(Found::None)
            }
        }
    }

    /// Bytes of `rel` (whose NAS file has `identity`) not yet in the cache.
    pub fn missing_bytes(&self, rel: &Path, identity: Identity) -> u64 {
        if let Some(cf) = self.live.lock().get(rel).and_then(Weak::upgrade)
            && cf.identity() == identity
            && !cf.is_disabled()
        {
            let map = cf.map();
            return map.len() - map.present_bytes();
        }
        match self.store.get(rel) {
            Some(rec) if self.rule.mask(rec.identity) == identity => {
                rec.map.len() - rec.map.present_bytes()
            }
            _ => identity.size,
        }
    }

    /// Drops the copy of `rel` whatever its state (used when a complete copy turns out unusable).
    pub fn discard(&self, rel: &Path) -> Result<(), StoreError> {
        let _path = self.lock_path(rel);
        self.discard_locked(rel)
    }

    /// Drops the copy of `rel` unless a handle has it open (eviction). Returns whether it went.
    pub(super) fn discard_if_idle(&self, rel: &Path) -> Result<bool, StoreError> {
        let _path = self.lock_path(rel);
        if self.is_busy(rel) {
            return Ok(false);
        }
        self.discard_locked(rel).map(|()| true)
    }

    fn discard_locked(&self, rel: &Path) -> Result<(), StoreError> {
        let live = self.live.lock().remove(rel).and_then(|w| w.upgrade());
        if let Some(cf) = live {
            cf.discard(&self.store)?;
        }
        if let Some(rec) = self.store.get(rel) {
            self.store.remove(rel, rec.id)?;
        }
        Ok(())
    }

    /// Drops every copy at or below `prefix` (a path renamed, replaced or removed on the NAS).
    /// Returns how many were dropped. Touches only the entries below `prefix`.
    pub fn discard_under(&self, prefix: &Path) -> usize {
        let mut paths = self.store.paths_under(prefix);
        paths.extend(
            self.live
                .lock()
                .keys()
                .filter(|p| p.starts_with(prefix))
                .cloned(),
        );
        paths.sort();
        paths.dedup();
        let mut n = 0;
        for p in &paths {
            match self.discard(p) {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "could not drop a cache copy")
                }
            }
        }
        n
    }

    /// Records that `rel` was opened through the mount: most recently used, and not evictable
    /// until [`Cache::close_ref`].
    pub fn open_ref(&self, rel: &Path) {
        *self.open.lock().entry(rel.to_path_buf()).or_default() += 1;
        self.store.touch(rel, now_secs());
    }

    /// Ends an [`Cache::open_ref`].
    pub fn close_ref(&self, rel: &Path) {
        let mut open = self.open.lock();
        if let Some(n) = open.get_mut(rel) {
            *n -= 1;
            if *n == 0 {
                open.remove(rel);
            }
        }
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

    /// Makes the access times of recent opens durable (they order eviction after a restart).
    pub fn flush_access(&self) {
        if let Err(e) = self.store.flush_access() {
            tracing::warn!(error = %e, "could not record access times");
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

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::config::Settings;

    const CHUNK: u64 = 4096;

    /// A cache over an empty store, and a directory standing in for the NAS.
    fn cache() -> (tempfile::TempDir, Arc<Cache>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("nas")).unwrap();
        let store = Store::open(&dir.path().join("cache")).unwrap();
        let c = Cache::new(
            store,
            IdentityRule::SizeMtimeIno,
            CHUNK,
            Arc::new(Live::new(Settings::default())),
            Arc::new(Stats::default()),
        );
        (dir, c)
    }

    /// A NAS file of `chunks` chunks: its open file and identity.
    fn nas_file(dir: &Path, name: &str, chunks: u64) -> (std::fs::File, Identity) {
        let p = dir.join("nas").join(name);
        std::fs::write(&p, vec![name.len() as u8; (chunks * CHUNK) as usize]).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let id = IdentityRule::SizeMtimeIno.identity(&nix::sys::stat::fstat(&f).unwrap());
        (f, id)
    }

    fn partial(found: Found) -> Arc<CacheFile> {
        match found {
            Found::Partial(cf) => cf,
            other => panic!("expected a partial copy, got {other:?}"),
        }
    }

    /// Waits until thread `tid` of this process sleeps (blocked on a lock).
    fn wait_blocked(tid: i32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
            let state = stat
                .rsplit(')')
                .next()
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap();
            if state == "S" || state == "D" {
                return;
            }
            assert!(Instant::now() < deadline, "thread {tid} never blocked");
            std::thread::yield_now();
        }
    }

    /// While the copy of one file is being made durable (its `fdatasync` can take seconds for a
    /// multi-GB file) and something drops it, finding another file's copy does not wait.
    #[test]
    fn an_open_never_waits_for_another_files_fsync() {
        let (dir, c) = cache();
        let (_fb, idb) = nas_file(dir.path(), "b", 2);
        let (_fa, ida) = nas_file(dir.path(), "aa", 2);
        let b = partial(c.find(Path::new("b"), idb, None, true, false).unwrap());
        let fsync = b.hold_persist(); // the flusher syncing b's data
        let (tx, rx) = std::sync::mpsc::channel();
        let dropper = std::thread::spawn({
            let c = c.clone();
            move || {
                // SAFETY: gettid has no preconditions.
                tx.send(unsafe { libc::gettid() }).unwrap();
                c.discard(Path::new("b")).unwrap();
            }
        });
        wait_blocked(rx.recv().unwrap());
        let (done_tx, done) = std::sync::mpsc::channel();
        let opener = std::thread::spawn({
            let c = c.clone();
            move || {
                let found = c.find(Path::new("aa"), ida, None, true, false).unwrap();
                done_tx.send(()).unwrap();
                drop(found);
            }
        });
        let waited = done.recv_timeout(Duration::from_secs(10));
        drop(fsync);
        dropper.join().unwrap();
        opener.join().unwrap();
        assert!(
            waited.is_ok(),
            "finding one copy waited for another copy's fsync"
        );
    }

    /// An eviction of a path and an open of it never interleave: no index record is left (or
    /// made again) for a data file that was deleted.
    #[test]
    fn find_and_discard_of_one_path_are_exclusive() {
        let (dir, c) = cache();
        let rel = Path::new("m");
        for round in 0..60 {
            let (nas, id) = nas_file(dir.path(), "m", 2);
            // A partial copy in the index, not in use.
            {
                let cf = partial(c.find(rel, id, None, true, false).unwrap());
                cf.read_all(&nas, 0, 1).unwrap();
                cf.persist(c.store(), 1).unwrap();
            }
            let nas = Arc::new(nas);
            let dropper = std::thread::spawn({
                let c = c.clone();
                move || c.discard(Path::new("m")).unwrap()
            });
            let opener = std::thread::spawn({
                let (c, nas) = (c.clone(), nas.clone());
                move || {
                    if let Ok(Found::Partial(cf)) = c.find(Path::new("m"), id, None, false, false) {
                        let _ = cf.read_all(&nas, CHUNK, 1);
                        let _ = cf.persist(c.store(), 2);
                    }
                }
            });
            dropper.join().unwrap();
            opener.join().unwrap();
            if let Some(rec) = c.store().get(rel) {
                assert!(
                    c.store().data_path(rec.id).exists(),
                    "round {round}: an index record for a deleted data file"
                );
            }
            c.discard(rel).unwrap();
        }
    }
}
