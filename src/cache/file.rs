//! A cache copy being filled: shared by every reader of the file and by the background worker.
//!
//! Lock order: `persist_lock` before `state`. `state` is never held across I/O: a chunk being
//! fetched is marked in `inflight`, fetched without the lock, then published; readers of the same
//! missing chunk wait on `cond` instead of fetching it again (DESIGN.md §2.3: each NAS byte once).

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};

use super::{ChunkMap, EntryRecord, Perms, Store, StoreError};
use crate::source::{Identity, IdentityRule, pread_full};

/// Why a chunk could not be served from the cache.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Reading the NAS failed.
    #[error("NAS read failed: {0}")]
    Nas(io::Error),
    /// The NAS file no longer has the identity the copy was started from.
    #[error("NAS file changed while it was being cached")]
    Changed,
    /// This copy is no longer filled (changed, or the SSD failed); read the NAS directly.
    #[error("cache copy disabled")]
    Disabled,
}

/// Where the bytes of a chunk came from.
#[derive(Debug)]
pub enum Chunk {
    /// Already on the SSD.
    Present,
    /// Fetched from the NAS by this call (and written to the SSD unless that failed).
    Fetched(Vec<u8>),
}

struct FillState {
    map: ChunkMap,
    inflight: HashSet<u64>,
}

/// A sparse cache copy of one NAS file.
pub struct CacheFile {
    rel: PathBuf,
    id: u64,
    identity: Identity,
    perms: Option<Perms>,
    rule: IdentityRule,
    data: File,
    state: Mutex<FillState>,
    cond: Condvar,
    disabled: AtomicBool,
    persist_lock: Mutex<u64>,
    /// Set once the worker has been asked to complete this copy.
    pub queued: AtomicBool,
    /// Bytes readers read through this copy (any offsets, repeats included): past a threshold
    /// the file counts as loaded for real.
    pub read_bytes: AtomicU64,
    nas_bytes: AtomicU64,
}

impl std::fmt::Debug for CacheFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheFile")
            .field("rel", &self.rel)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl CacheFile {
    /// Wraps an open data file whose durable chunks are `map`.
    pub fn new(
        rel: PathBuf,
        id: u64,
        identity: Identity,
        perms: Option<Perms>,
        rule: IdentityRule,
        data: File,
        map: ChunkMap,
    ) -> Self {
        let persisted = map.present_count();
        Self {
            rel,
            id,
            identity,
            perms,
            rule,
            data,
            state: Mutex::new(FillState {
                map,
                inflight: HashSet::new(),
            }),
            cond: Condvar::new(),
            disabled: AtomicBool::new(false),
            persist_lock: Mutex::new(persisted),
            queued: AtomicBool::new(false),
            read_bytes: AtomicU64::new(0),
            nas_bytes: AtomicU64::new(0),
        }
    }

    /// The NAS path this copy belongs to.
    pub fn rel(&self) -> &PathBuf {
        &self.rel
    }

    /// Entry id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Identity of the NAS file the copy was started from.
    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// The data file.
    pub fn data(&self) -> &File {
        &self.data
    }

    /// Whether every chunk has been written.
    pub fn is_complete(&self) -> bool {
        self.state.lock().map.is_complete()
    }

    /// Whether every chunk of `[offset, offset + size)` is present (a read of it needs no NAS).
    pub fn has_range(&self, offset: u64, size: u32) -> bool {
        let st = self.state.lock();
        st.map
            .chunks_for(offset, u64::from(size))
            .all(|i| st.map.is_present(i))
    }

    /// A snapshot of the chunk map.
    pub fn map(&self) -> ChunkMap {
        self.state.lock().map.clone()
    }

    /// Whether the copy was given up (NAS changed or SSD failed).
    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::Acquire)
    }

    /// Stops filling and serving this copy.
    pub fn disable(&self) {
        if !self.disabled.swap(true, Ordering::AcqRel) {
            tracing::debug!(path = %self.rel.display(), id = self.id, "cache copy given up");
        }
        self.cond.notify_all();
    }

    /// Bytes this copy fetched from the NAS.
    pub fn nas_bytes(&self) -> u64 {
        self.nas_bytes.load(Ordering::Relaxed)
    }

    /// The first missing chunk at or after `from` (wrapping). Chunks another caller is fetching
    /// count as missing only when nothing else is: waiting for them is the last resort.
    pub fn next_missing(&self, from: u64) -> Option<u64> {
        let st = self.state.lock();
        let n = st.map.chunk_count();
        if n == 0 || st.map.is_complete() {
            return None;
        }
        let order = (0..n).map(|k| (from % n + k) % n);
        order
            .clone()
            .find(|i| !st.map.is_present(*i) && !st.inflight.contains(i))
            .or_else(|| order.into_iter().find(|i| !st.map.is_present(*i)))
    }

    /// Makes chunk `idx` present, fetching it from `nas` unless it is present or another caller is
    /// already fetching it (then waits for that fetch).
    pub fn ensure_chunk(&self, idx: u64, nas: &File) -> Result<Chunk, FetchError> {
        let (start, end) = {
            let mut st = self.state.lock();
            loop {
                if self.is_disabled() {
                    return Err(FetchError::Disabled);
                }
                if st.map.is_present(idx) {
                    return Ok(Chunk::Present);
                }
                if !st.inflight.contains(&idx) {
                    st.inflight.insert(idx);
                    break st.map.chunk_range(idx);
                }
                self.cond.wait(&mut st);
            }
        };
        let result = self.fetch(start, end, nas);
        let mut st = self.state.lock();
        st.inflight.remove(&idx);
        let out = match result {
            Ok((buf, true)) => {
                st.map.set_present(idx);
                Ok(Chunk::Fetched(buf))
            }
            Ok((buf, false)) => Ok(Chunk::Fetched(buf)),
            Err(e) => Err(e),
        };
        drop(st);
        self.cond.notify_all();
        out
    }

    /// Reads `[start, end)` from the NAS, checks the identity, writes it to the SSD.
    /// Returns the bytes and whether they were written to the SSD.
    fn fetch(&self, start: u64, end: u64, nas: &File) -> Result<(Vec<u8>, bool), FetchError> {
        let mut buf = vec![0u8; (end - start) as usize];
        let n = pread_full(nas, &mut buf, start).map_err(FetchError::Nas)?;
        self.nas_bytes.fetch_add(n as u64, Ordering::Relaxed);
        let st = nix::sys::stat::fstat(nas).map_err(|e| FetchError::Nas(e.into()))?;
        if n != buf.len() || self.rule.identity(&st) != self.identity {
            self.disable();
            return Err(FetchError::Changed);
        }
        // Keep the NAS pages out of the page cache: the SSD copy is the cached one.
        let _ = nix::fcntl::posix_fadvise(
            nas,
            start as i64,
            (end - start) as i64,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
        if let Err(e) = self.data.write_all_at(&buf, start) {
            tracing::warn!(path = %self.rel.display(), error = %e, "cache write failed; serving from the NAS");
            self.disable();
            return Ok((buf, false));
        }
        Ok((buf, true))
    }

    /// Reads `[offset, offset + size)` (clipped to the file), from the SSD where present and from
    /// the NAS (caching on the way) where not. Returns the bytes and how many bytes this call
    /// fetched from the NAS.
    pub fn read(&self, nas: &File, offset: u64, size: u32) -> Result<(Vec<u8>, u64), FetchError> {
        let len = self.identity.size;
        let end = offset.saturating_add(u64::from(size)).min(len);
        if offset >= end {
            return Ok((Vec::new(), 0));
        }
        let mut fetched = 0;
        let mut out = Vec::with_capacity((end - offset) as usize);
        let chunk_size = self.state.lock().map.chunk_size();
        for idx in offset / chunk_size..end.div_ceil(chunk_size) {
            let cs = idx * chunk_size;
            let s = offset.max(cs);
            let e = end.min(cs + chunk_size);
            match self.ensure_chunk(idx, nas)? {
                Chunk::Fetched(buf) => {
                    fetched += buf.len() as u64;
                    out.extend_from_slice(&buf[(s - cs) as usize..(e - cs) as usize]);
                }
                Chunk::Present => {
                    let at = out.len();
                    out.resize(at + (e - s) as usize, 0);
                    let n = pread_full(&self.data, &mut out[at..], s).map_err(|err| {
                        tracing::warn!(path = %self.rel.display(), error = %err, "cache read failed");
                        self.disable();
                        FetchError::Disabled
                    })?;
                    if n != (e - s) as usize {
                        self.disable();
                        return Err(FetchError::Disabled);
                    }
                }
            }
        }
        Ok((out, fetched))
    }

    /// Makes the chunks written so far durable and records them in the index. Returns whether a
    /// record was written. Does nothing for a disabled copy.
    pub fn persist(&self, store: &Store, last_access: u64) -> Result<bool, StoreError> {
        let mut persisted = self.persist_lock.lock();
        if self.is_disabled() {
            return Ok(false);
        }
        let map = self.map();
        if map.present_count() == *persisted && store.get(&self.rel).is_some() {
            return Ok(false);
        }
        // Data first, then the record that claims it (DESIGN.md §2.2).
        self.data.sync_data()?;
        store.put(
            &self.rel,
            &EntryRecord {
                id: self.id,
                identity: self.identity,
                map: map.clone(),
                last_access,
                perms: self.perms,
            },
        )?;
        *persisted = map.present_count();
        Ok(true)
    }

    /// Holds the lock a [`Self::persist`] holds across its `fdatasync` (tests: a long fsync).
    #[cfg(test)]
    pub(crate) fn hold_persist(&self) -> parking_lot::MutexGuard<'_, u64> {
        self.persist_lock.lock()
    }

    /// Disables the copy and removes it from the store, excluding a concurrent [`Self::persist`].
    pub fn discard(&self, store: &Store) -> Result<(), StoreError> {
        let _guard = self.persist_lock.lock();
        self.disable();
        store.remove(&self.rel, self.id)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::Arc;

    fn setup(content: &[u8], chunk: u64) -> (tempfile::TempDir, Store, Arc<CacheFile>, File) {
        let dir = tempfile::tempdir().unwrap();
        let nas_path = dir.path().join("nas.bin");
        std::fs::write(&nas_path, content).unwrap();
        let nas = File::open(&nas_path).unwrap();
        let st = nix::sys::stat::fstat(&nas).unwrap();
        let identity = IdentityRule::SizeMtimeIno.identity(&st);
        let store = Store::open(&dir.path().join("cache")).unwrap();
        let (id, data) = store.create_data_file(content.len() as u64).unwrap();
        let cf = Arc::new(CacheFile::new(
            "loras/x".into(),
            id,
            identity,
            None,
            IdentityRule::SizeMtimeIno,
            data,
            ChunkMap::new(content.len() as u64, chunk),
        ));
        (dir, store, cf, nas)
    }

    fn content(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn reads_match_and_fetch_each_chunk_once() {
        let data = content(1000);
        let (_d, _s, cf, nas) = setup(&data, 64);
        for (off, size) in [(0, 1), (63, 2), (100, 300), (990, 100), (0, 1000), (500, 0)] {
            let (got, _) = cf.read(&nas, off, size).unwrap();
            let end = (off as usize + size as usize).min(data.len());
            assert_eq!(got, &data[off as usize..end], "off {off} size {size}");
        }
        assert!(cf.is_complete());
        assert_eq!(cf.nas_bytes(), 1000);
    }

    #[test]
    fn concurrent_readers_share_fetches() {
        let data = content(64 * 1024);
        let (_d, _s, cf, nas) = setup(&data, 4096);
        let nas = Arc::new(nas);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (cf, nas, data) = (cf.clone(), nas.clone(), data.clone());
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        let off = (i * 997 + t * 131) % data.len() as u64;
                        let (got, _) = cf.read(&nas, off, 5000).unwrap();
                        let end = (off as usize + 5000).min(data.len());
                        assert_eq!(got, &data[off as usize..end]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(cf.nas_bytes() <= data.len() as u64);
    }

    #[test]
    fn changed_nas_file_disables_the_copy() {
        let data = content(256);
        let (dir, _s, cf, nas) = setup(&data, 64);
        cf.read(&nas, 0, 10).unwrap();
        std::fs::write(dir.path().join("nas.bin"), content(300)).unwrap();
        assert!(matches!(cf.read(&nas, 100, 10), Err(FetchError::Changed)));
        assert!(cf.is_disabled());
        assert!(matches!(cf.read(&nas, 0, 10), Err(FetchError::Disabled)));
    }

    #[test]
    fn persist_records_only_written_chunks() {
        let data = content(256);
        let (_d, store, cf, nas) = setup(&data, 64);
        cf.read(&nas, 70, 10).unwrap();
        assert!(cf.persist(&store, 1).unwrap());
        assert!(!cf.persist(&store, 1).unwrap());
        let rec = store.get(Path::new("loras/x")).unwrap();
        assert_eq!(rec.map.present_count(), 1);
        assert!(rec.map.is_present(1));
        cf.discard(&store).unwrap();
        assert!(store.get(Path::new("loras/x")).is_none());
        assert!(!cf.persist(&store, 1).unwrap());
        assert!(store.get(Path::new("loras/x")).is_none());
    }
}
