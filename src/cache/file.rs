//! A cache copy being filled: shared by every reader of the file and by the background worker.
//!
//! Lock order: `persist_lock` before `state`. `state` is never held across I/O: a chunk being
//! fetched is marked in `inflight`, fetched without the lock, then published; readers of the same
//! missing chunk wait on `cond` instead of fetching it again (DESIGN.md §2.3: each NAS byte once).
//!
//! First byte first: a read that misses fetches the pieces it asked for (at least
//! [`FIRST_FETCH`]) and answers; the rest of the chunk is fetched behind it by a [`Rest`], in
//! [`FETCH_STEP`] steps. While a chunk is being fetched, the pieces already written to the SSD are
//! served to other readers; the chunk becomes present in the map (and so in the index) only when
//! all of it is written, so a crash at any moment leaves whole chunks or missing ones.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex, MutexGuard};

use super::{ChunkMap, EntryRecord, Perms, Store, StoreError};
use crate::source::{Identity, IdentityRule, pread_full};

/// Pieces a chunk is cut into while it is fetched (one bit each): 64 KiB of a 4 MiB chunk.
const PIECES: u64 = 64;
/// The least a read's first fetch of a chunk takes (or a quarter of the chunk, if less): a
/// sequential reader's next requests find their bytes there.
pub const FIRST_FETCH: u64 = 1 << 20;
/// Bytes the rest of a chunk is fetched in: a reader waiting for a piece is woken this often.
pub const FETCH_STEP: u64 = 1 << 20;

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
    /// A read that may not touch the NAS needs bytes that are not on the SSD.
    #[error("not on the SSD")]
    NotCached,
}

/// Where the bytes of a chunk came from.
#[derive(Debug)]
pub enum Chunk {
    /// Already on the SSD.
    Present,
    /// This many bytes were fetched from the NAS by this call (and written to the SSD unless
    /// that failed).
    Fetched(u64),
}

struct FillState {
    map: ChunkMap,
    /// Chunks being fetched, with the pieces of each already written to the SSD.
    inflight: HashMap<u64, u64>,
}

impl FillState {
    /// Bytes per piece.
    fn piece(&self) -> u64 {
        self.map.chunk_size().div_ceil(PIECES)
    }

    /// The pieces of chunk `idx` that hold any byte of `[s, e)` (within the chunk).
    fn pieces(&self, idx: u64, s: u64, e: u64) -> u64 {
        let (cs, _) = self.map.chunk_range(idx);
        let p = self.piece();
        bits((s - cs) / p, (e - cs).div_ceil(p))
    }

    /// Every piece of chunk `idx`.
    fn all_pieces(&self, idx: u64) -> u64 {
        let (cs, ce) = self.map.chunk_range(idx);
        self.pieces(idx, cs, ce)
    }

    /// Whether `[s, e)` of chunk `idx` can be read from the SSD.
    fn readable(&self, idx: u64, s: u64, e: u64) -> bool {
        self.map.is_present(idx)
            || self.inflight.get(&idx).is_some_and(|have| {
                let want = self.pieces(idx, s, e);
                have & want == want
            })
    }
}

/// Bytes a read fetched from the NAS, from `start`.
struct Fetched {
    start: u64,
    buf: Vec<u8>,
}

impl Fetched {
    fn len(&self) -> usize {
        self.buf.len()
    }
}

/// Bits `a..b` (`b` ≤ 64).
fn bits(a: u64, b: u64) -> u64 {
    let n = b - a;
    if n >= 64 {
        u64::MAX
    } else {
        ((1u64 << n) - 1) << a
    }
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
    /// The HTTP source and this file's use of it.
    http: std::sync::OnceLock<(Arc<crate::httpsrc::HttpSource>, Mutex<HttpUse>)>,
}

/// A file's use of the HTTP source: the validator its first answer had, and whether it fell
/// back to the NAS (then it reads the NAS for as long as this copy is live).
#[derive(Default)]
struct HttpUse {
    validator: Option<String>,
    failed: bool,
}

impl std::fmt::Debug for CacheFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheFile")
            .field("rel", &self.rel)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// What a read through a copy got.
#[derive(Debug, Default)]
pub struct Read {
    /// The bytes asked for (short only at the end of the file).
    pub buf: Vec<u8>,
    /// Bytes this read fetched from the NAS.
    pub fetched: u64,
    /// The chunks this read started fetching and did not finish: run them (on a NAS thread)
    /// after answering. Dropping one gives the chunk up (it stays missing).
    pub rest: Vec<Rest>,
}

/// The rest of a chunk a read started to fetch. It holds the chunk: other readers of its missing
/// pieces wait for it, and nobody else fetches them.
#[derive(Debug)]
pub struct Rest {
    cf: Arc<CacheFile>,
    idx: u64,
    done: bool,
}

impl Rest {
    /// Fetches the missing pieces of the chunk, [`FETCH_STEP`] at a time, calling `on_step` with
    /// the bytes of each step before it is published; the chunk is then present.
    pub fn run(mut self, nas: &File, on_step: &mut dyn FnMut(u64)) -> Result<(), FetchError> {
        loop {
            let (s, e) = {
                let st = self.cf.state.lock();
                if self.cf.is_disabled() {
                    return Err(FetchError::Disabled);
                }
                let have = st.inflight.get(&self.idx).copied().unwrap_or(0);
                let (cs, ce) = st.map.chunk_range(self.idx);
                let p = st.piece();
                let Some(first) = (0..PIECES).find(|i| have & (1 << i) == 0 && cs + i * p < ce)
                else {
                    unreachable!("a rest is published when its last piece is")
                };
                let mut last = first + 1;
                while last < PIECES
                    && have & (1 << last) == 0
                    && (last + 1 - first) * p <= FETCH_STEP
                    && cs + last * p < ce
                {
                    last += 1;
                }
                (cs + first * p, (cs + last * p).min(ce))
            };
            let (buf, written) = self.cf.fetch(s, e, nas)?;
            on_step(buf.len() as u64);
            if !written {
                return Err(FetchError::Disabled);
            }
            let mut st = self.cf.state.lock();
            if self.cf.add_pieces(&mut st, self.idx, s, e) {
                self.done = true;
            }
            drop(st);
            self.cf.cond.notify_all();
            if self.done {
                return Ok(());
            }
        }
    }
}

impl Drop for Rest {
    fn drop(&mut self) {
        if !self.done {
            self.cf.state.lock().inflight.remove(&self.idx);
            self.cf.cond.notify_all();
        }
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
                inflight: HashMap::new(),
            }),
            cond: Condvar::new(),
            disabled: AtomicBool::new(false),
            persist_lock: Mutex::new(persisted),
            queued: AtomicBool::new(false),
            read_bytes: AtomicU64::new(0),
            nas_bytes: AtomicU64::new(0),
            http: std::sync::OnceLock::new(),
        }
    }

    /// Takes chunk bytes from `http` before the NAS.
    pub fn use_http(&self, http: Arc<crate::httpsrc::HttpSource>) {
        let _ = self.http.set((http, Mutex::new(HttpUse::default())));
    }

    /// Bytes `[start, end)` from the HTTP source, or `None` (none configured, this file fell
    /// back, or it falls back now). No lock is held while the request runs.
    fn fetch_http(&self, start: u64, end: u64) -> Option<Vec<u8>> {
        let (src, state) = self.http.get()?;
        let mut validator = {
            let st = state.lock();
            if st.failed {
                return None;
            }
            st.validator.clone()
        };
        let mtime_secs = self.identity.mtime_ns.div_euclid(1_000_000_000);
        match src.fetch(
            &self.rel,
            start,
            end,
            (self.identity.size, mtime_secs),
            &mut validator,
        ) {
            Ok(buf) => {
                let mut st = state.lock();
                if st.validator.is_none() {
                    st.validator = validator;
                }
                Some(buf)
            }
            Err(reason) => {
                let mut st = state.lock();
                if !st.failed {
                    st.failed = true;
                    src.fallback(&self.rel, reason);
                }
                None
            }
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

    /// Whether every byte of `[offset, offset + size)` is on the SSD (a read of it needs no NAS).
    pub fn has_range(&self, offset: u64, size: u32) -> bool {
        let end = offset
            .saturating_add(u64::from(size))
            .min(self.identity.size);
        if offset >= end {
            return true;
        }
        let st = self.state.lock();
        st.map.chunks_for(offset, end - offset).all(|i| {
            let (cs, ce) = st.map.chunk_range(i);
            st.readable(i, offset.max(cs), end.min(ce))
        })
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
            .find(|i| !st.map.is_present(*i) && !st.inflight.contains_key(i))
            .or_else(|| order.into_iter().find(|i| !st.map.is_present(*i)))
    }

    /// Records that `[s, e)` of chunk `idx` (held by the caller) is written; when that completes
    /// the chunk, publishes it and returns true.
    fn add_pieces(&self, st: &mut MutexGuard<'_, FillState>, idx: u64, s: u64, e: u64) -> bool {
        let add = st.pieces(idx, s, e);
        let all = st.all_pieces(idx);
        let have = st.inflight.entry(idx).or_insert(0);
        *have |= add;
        if *have == all {
            st.inflight.remove(&idx);
            st.map.set_present(idx);
            return true;
        }
        false
    }

    /// Waits until `[s, e)` of chunk `idx` is readable from the SSD (`Ok(false)`) or nobody is
    /// fetching the chunk, which the caller then holds (`Ok(true)`). Before waiting, the rests
    /// in `held` are run here, so that no two readers wait for each other's rests.
    /// Without `nas`, neither fetches nor waits: what is not readable is [`FetchError::NotCached`].
    fn claim(
        &self,
        idx: u64,
        s: u64,
        e: u64,
        nas: Option<&File>,
        held: &mut Vec<Rest>,
        fetched: &mut u64,
    ) -> Result<bool, FetchError> {
        let mut st = self.state.lock();
        loop {
            if self.is_disabled() {
                return Err(FetchError::Disabled);
            }
            if st.readable(idx, s, e) {
                return Ok(false);
            }
            let Some(nas) = nas else {
                return Err(FetchError::NotCached);
            };
            if let std::collections::hash_map::Entry::Vacant(v) = st.inflight.entry(idx) {
                v.insert(0);
                return Ok(true);
            }
            if held.is_empty() {
                self.cond.wait(&mut st);
            } else {
                drop(st);
                for rest in held.drain(..) {
                    rest.run(nas, &mut |n| *fetched += n)?;
                }
                st = self.state.lock();
            }
        }
    }

    /// Makes chunk `idx` present, fetching it from `nas` unless it is present or another caller is
    /// already fetching it (then waits for that fetch).
    pub fn ensure_chunk(&self, idx: u64, nas: &File) -> Result<Chunk, FetchError> {
        let (start, end) = self.state.lock().map.chunk_range(idx);
        if !self.claim(idx, start, end, Some(nas), &mut Vec::new(), &mut 0)? {
            return Ok(Chunk::Present);
        }
        let result = self.fetch(start, end, nas);
        let mut st = self.state.lock();
        let out = match result {
            Ok((buf, true)) => {
                self.add_pieces(&mut st, idx, start, end);
                Ok(Chunk::Fetched(buf.len() as u64))
            }
            Ok((buf, false)) => {
                st.inflight.remove(&idx);
                Ok(Chunk::Fetched(buf.len() as u64))
            }
            Err(e) => {
                st.inflight.remove(&idx);
                Err(e)
            }
        };
        drop(st);
        self.cond.notify_all();
        out
    }

    /// Reads `[start, end)` from the HTTP source if there is one (else, or when it fails, from
    /// the NAS), checks the NAS identity, writes it to the SSD. Returns the bytes and whether
    /// they were written to the SSD.
    fn fetch(&self, start: u64, end: u64, nas: &File) -> Result<(Vec<u8>, bool), FetchError> {
        if let Some(buf) = self.fetch_http(start, end) {
            return self.keep(start, end, buf, nas);
        }
        let mut buf = vec![0u8; (end - start) as usize];
        let n = pread_full(nas, &mut buf, start).map_err(FetchError::Nas)?;
        self.nas_bytes.fetch_add(n as u64, Ordering::Relaxed);
        if n != buf.len() {
            self.disable();
            return Err(FetchError::Changed);
        }
        self.keep(start, end, buf, nas)
    }

    /// Checks that the NAS file is still the one this copy is of, then writes `buf` (bytes
    /// `[start, end)` of it) to the SSD. Returns the bytes and whether they were written.
    fn keep(
        &self,
        start: u64,
        end: u64,
        buf: Vec<u8>,
        nas: &File,
    ) -> Result<(Vec<u8>, bool), FetchError> {
        let st = nix::sys::stat::fstat(nas).map_err(|e| FetchError::Nas(e.into()))?;
        if self.rule.identity(&st) != self.identity {
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

    /// Reads `[offset, offset + size)` (clipped to the file), from the SSD where it is there and
    /// from the NAS (caching on the way) where not. A chunk missing here is fetched from the
    /// pieces asked for on; what is left of it comes back as a [`Rest`] for the caller to run
    /// after answering.
    pub fn read(self: &Arc<Self>, nas: &File, offset: u64, size: u32) -> Result<Read, FetchError> {
        self.read_from(Some(nas), offset, size)
    }

    /// Reads `[offset, offset + size)` from the SSD only, never touching the NAS nor waiting for
    /// a fetch ([`FetchError::NotCached`] when any of it is not there).
    pub fn read_cached(self: &Arc<Self>, offset: u64, size: u32) -> Result<Vec<u8>, FetchError> {
        self.read_from(None, offset, size).map(|r| r.buf)
    }

    fn read_from(
        self: &Arc<Self>,
        nas: Option<&File>,
        offset: u64,
        size: u32,
    ) -> Result<Read, FetchError> {
        let len = self.identity.size;
        let end = offset.saturating_add(u64::from(size)).min(len);
        let mut out = Read::default();
        if offset >= end {
            return Ok(out);
        }
        out.buf.reserve((end - offset) as usize);
        let chunk_size = self.state.lock().map.chunk_size();
        for idx in offset / chunk_size..end.div_ceil(chunk_size) {
            let cs = idx * chunk_size;
            let ce = (cs + chunk_size).min(len);
            let s = offset.max(cs);
            let e = end.min(ce);
            if self.claim(idx, s, e, nas, &mut out.rest, &mut out.fetched)? {
                let nas = nas.expect("only a read with the NAS claims");
                let fetched = self.fetch_first(idx, s, e, nas, &mut out.rest)?;
                out.fetched += fetched.len() as u64;
                let from = fetched.start;
                out.buf
                    .extend_from_slice(&fetched.buf[(s - from) as usize..(e - from) as usize]);
                continue;
            }
            let at = out.buf.len();
            out.buf.resize(at + (e - s) as usize, 0);
            let n = pread_full(&self.data, &mut out.buf[at..], s).map_err(|err| {
                tracing::warn!(path = %self.rel.display(), error = %err, "cache read failed");
                self.disable();
                FetchError::Disabled
            })?;
            if n != (e - s) as usize {
                self.disable();
                return Err(FetchError::Disabled);
            }
        }
        Ok(out)
    }

    /// Fetches the pieces of claimed chunk `idx` that hold `[s, e)` (at least [`FIRST_FETCH`] or a
    /// quarter of the chunk); pushes a [`Rest`] for the others, or publishes the chunk.
    fn fetch_first(
        self: &Arc<Self>,
        idx: u64,
        s: u64,
        e: u64,
        nas: &File,
        rests: &mut Vec<Rest>,
    ) -> Result<Fetched, FetchError> {
        let (fs, fe) = {
            let st = self.state.lock();
            let (cs, ce) = st.map.chunk_range(idx);
            let p = st.piece();
            let fs = cs + (s - cs) / p * p;
            let least = FIRST_FETCH.min(st.map.chunk_size() / 4);
            let fe = (cs + (e - cs).div_ceil(p) * p).max(fs + least);
            (fs, (cs + (fe - cs).div_ceil(p) * p).min(ce))
        };
        // The claim goes with the rest (or on error, when it drops).
        let rest = Rest {
            cf: self.clone(),
            idx,
            done: false,
        };
        let (buf, written) = self.fetch(fs, fe, nas)?;
        if written {
            let mut rest = rest;
            let mut st = self.state.lock();
            rest.done = self.add_pieces(&mut st, idx, fs, fe);
            drop(st);
            self.cond.notify_all();
            if !rest.done {
                rests.push(rest);
            }
        }
        Ok(Fetched { start: fs, buf })
    }

    /// Reads `[offset, offset + size)` as [`Self::read`] does, running the rests here. Returns the
    /// bytes and the bytes fetched from the NAS.
    pub fn read_all(
        self: &Arc<Self>,
        nas: &File,
        offset: u64,
        size: u32,
    ) -> Result<(Vec<u8>, u64), FetchError> {
        let Read {
            buf,
            mut fetched,
            rest,
        } = self.read(nas, offset, size)?;
        for r in rest {
            r.run(nas, &mut |n| fetched += n)?;
        }
        Ok((buf, fetched))
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
            let (got, _) = cf.read_all(&nas, off, size).unwrap();
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
                        let (got, _) = cf.read_all(&nas, off, 5000).unwrap();
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
        cf.read_all(&nas, 0, 10).unwrap();
        std::fs::write(dir.path().join("nas.bin"), content(300)).unwrap();
        assert!(matches!(
            cf.read_all(&nas, 100, 10),
            Err(FetchError::Changed)
        ));
        assert!(cf.is_disabled());
        assert!(matches!(
            cf.read_all(&nas, 0, 10),
            Err(FetchError::Disabled)
        ));
    }

    #[test]
    fn a_read_fetches_its_pieces_first() {
        // Chunks of 4096 bytes: pieces of 64, a first fetch of at least 1024.
        let data = content(3 * 4096);
        let (_d, store, cf, nas) = setup(&data, 4096);
        let read = cf.read(&nas, 4096 + 3000, 100).unwrap();
        assert_eq!(read.buf, &data[7096..7196]);
        // Pieces 46..=47 hold the bytes asked for; the fetch runs on to 1024 bytes.
        assert_eq!(read.fetched, 1024);
        assert_eq!(cf.nas_bytes(), 1024);
        assert_eq!(read.rest.len(), 1);
        // What was fetched is served while the rest is pending; the chunk is not present yet.
        assert!(cf.has_range(4096 + 2944, 1024));
        assert!(!cf.has_range(4096 + 2943, 2));
        assert!(!cf.is_complete() && cf.map().present_count() == 0);
        cf.persist(&store, 1).unwrap();
        assert!(store.get(Path::new("loras/x")).unwrap().map.present_count() == 0);
        let mut steps = 0;
        read.rest
            .into_iter()
            .next()
            .unwrap()
            .run(&nas, &mut |n| steps += n)
            .unwrap();
        assert_eq!(steps, 4096 - 1024);
        assert!(cf.map().is_present(1));
        assert_eq!(cf.nas_bytes(), 4096);
        assert_eq!(
            cf.read_all(&nas, 4096, 4096).unwrap(),
            (data[4096..8192].to_vec(), 0)
        );
    }

    #[test]
    fn a_cached_read_never_fetches_nor_waits() {
        let data = content(8192);
        let (_d, _s, cf, nas) = setup(&data, 4096);
        assert!(matches!(cf.read_cached(0, 10), Err(FetchError::NotCached)));
        let read = cf.read(&nas, 0, 10).unwrap();
        // The first 1024 bytes are written; the rest of the chunk is held, not fetched yet.
        assert_eq!(cf.read_cached(0, 1024).unwrap(), &data[..1024]);
        assert!(matches!(
            cf.read_cached(1000, 100),
            Err(FetchError::NotCached)
        ));
        // The holder gives up: what was served before is missing again, and still not waited for.
        drop(read);
        assert!(matches!(cf.read_cached(0, 10), Err(FetchError::NotCached)));
        assert_eq!(cf.nas_bytes(), 1024);
    }

    #[test]
    fn a_dropped_rest_releases_its_chunk() {
        let data = content(8192);
        let (_d, _s, cf, nas) = setup(&data, 4096);
        let read = cf.read(&nas, 0, 10).unwrap();
        assert_eq!(read.rest.len(), 1);
        drop(read);
        // Nobody holds the chunk: a reader of its missing bytes fetches them itself.
        let (got, fetched) = cf.read_all(&nas, 2000, 3000).unwrap();
        assert_eq!(got, &data[2000..5000]);
        assert!(fetched > 0);
        assert_eq!(cf.next_missing(0), None);
    }

    #[test]
    fn a_read_across_chunks_leaves_a_rest_per_chunk() {
        let data = content(3 * 4096);
        let (_d, _s, cf, nas) = setup(&data, 4096);
        // The middle chunk is asked for whole: fetched and present at once.
        let read = cf.read(&nas, 4000, 4096 + 200).unwrap();
        assert_eq!(read.buf, &data[4000..8296]);
        assert_eq!(read.rest.len(), 2);
        assert!(cf.map().is_present(1));
        // A reader of the missing pieces of a chunk held by a rest waits for it.
        let waiter = std::thread::spawn({
            let (cf, nas) = (cf.clone(), nas.try_clone().unwrap());
            move || cf.read_all(&nas, 0, 100).unwrap()
        });
        for r in read.rest {
            r.run(&nas, &mut |_| {}).unwrap();
        }
        let (got, fetched) = waiter.join().unwrap();
        assert_eq!((got.as_slice(), fetched), (&data[..100], 0));
        assert!(cf.is_complete());
        assert_eq!(cf.nas_bytes(), data.len() as u64);
    }

    #[test]
    fn readers_holding_rests_fetch_each_byte_once() {
        // Readers across chunk ends hold rests and wait for each other's pieces.
        let data = content(4 * 4096);
        for round in 0..50u64 {
            let (_d, _s, cf, nas) = setup(&data, 4096);
            let nas = Arc::new(nas);
            let t: Vec<_> = (0..4u64)
                .map(|t| {
                    let (cf, nas, data) = (cf.clone(), nas.clone(), data.clone());
                    std::thread::spawn(move || {
                        for i in 0..8u64 {
                            let off = (round * 131 + t * 4003 + i * 1999) % data.len() as u64;
                            let (got, _) = cf.read_all(&nas, off, 2500).unwrap();
                            let end = (off as usize + 2500).min(data.len());
                            assert_eq!(got, &data[off as usize..end]);
                        }
                    })
                })
                .collect();
            for t in t {
                t.join().unwrap();
            }
            assert!(cf.nas_bytes() <= data.len() as u64);
        }
    }

    #[test]
    fn persist_records_only_written_chunks() {
        let data = content(256);
        let (_d, store, cf, nas) = setup(&data, 64);
        cf.read_all(&nas, 70, 10).unwrap();
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
