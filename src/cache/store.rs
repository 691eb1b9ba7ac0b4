//! Cache layout, index and lock.
//!
//! ```text
//! <cache dir>/                 given by the user; may hold other files (e.g. the old node's cache)
//!   arenafs-v1/                everything arenafs owns; the name carries the format version
//!     FORMAT                   "arenafs cache format 1"; checked at start
//!     lock                     flock(LOCK_EX) held by the running daemon; holds its pid
//!     index.redb               one embedded database: NAS path → entry record
//!     data/<xx>/<id>.dat       sparse copies, named by a 16-hex-digit entry id
//! ```
//!
//! Crash safety (DESIGN.md §2.2): a record never claims a chunk before the chunk's data is durable.
//! Callers write chunks, `fdatasync` the data file, and only then [`Store::put`] a record whose map
//! was snapshotted before the sync. Records are committed with redb's immediate durability, so after
//! `kill -9` the index holds exactly what was durable at the last commit.
//!
//! Ownership: arenafs deletes only files inside `arenafs-v1/data/` whose names it generates, and
//! only when the index does not reference them and their id was allocated by an earlier run.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::ChunkMap;
use super::entries::{Aged, Entries, Totals};
use crate::source::Identity;

/// Name of the versioned subdirectory of the cache dir.
pub const SUBDIR: &str = "arenafs-v1";
const FORMAT_TEXT: &str = "arenafs cache format 1\n";
/// Version of an index record's encoding. Version 1 records (no owner and mode) are still read;
/// every record written is of the current version.
const RECORD_VERSION: u8 = 2;
/// Entry ids are reserved in blocks, so that every id a crashed run may have used for a data file
/// is below the persisted high-water mark and the next run can recognise its orphans.
const ID_BLOCK: u64 = 1024;

const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_NEXT_ID: &str = "next_id";
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
/// Owner and mode of the NAS directories above cached files: what an answer without the NAS
/// serves for them.
const DIRS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("dirs");

/// Errors opening or using the cache store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The cache directory could not be created or used.
    #[error("cache directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Another daemon holds the lock.
    #[error(
        "cache directory {path} is in use by another arenafs daemon{pid}; stop it first or use another --cache-dir"
    )]
    Locked {
        /// The cache subdirectory.
        path: PathBuf,
        /// " (pid N)" when known.
        pid: String,
    },
    /// The subdirectory holds a format this build does not understand.
    #[error("cache directory {path} has an unknown format ({found:?}); refusing to use it")]
    Format {
        /// The cache subdirectory.
        path: PathBuf,
        /// The first line of its FORMAT file.
        found: String,
    },
    /// The index database failed.
    #[error("cache index: {0}")]
    Index(redb::Error),
    /// The index was closed after an I/O error and its reopening has not succeeded yet.
    #[error("cache index: closed after an I/O error; reopening")]
    Closed,
    /// An I/O error on a data file.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Keeps redb's error typed (each of its error types converts into [`redb::Error`]).
fn index_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Index(e.into())
}

fn closed() -> StoreError {
    StoreError::Closed
}

/// Whether redb refuses to go on with this handle (an earlier I/O error) or it is closed.
fn needs_reopen(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Index(redb::Error::PreviousIo) | StoreError::Closed
    )
}

/// Owner, mode and NAS inode number of a NAS file or directory, as seen at its last check: what
/// the mount answers for it when the NAS does not (offline, hung), so that such answers never
/// give more access than the NAS does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms {
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// NAS inode number (whatever the identity rule keeps).
    pub ino: u64,
}

impl Perms {
    /// From a NAS `stat`.
    pub fn of(st: &nix::sys::stat::FileStat) -> Self {
        Self {
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            ino: st.st_ino,
        }
    }

    const LEN: usize = 4 + 4 + 4 + 8;

    fn encode_into(&self, out: &mut Vec<u8>) {
        for v in [self.mode, self.uid, self.gid] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.ino.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != Self::LEN {
            return None;
        }
        let u = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        Some(Self {
            mode: u(0),
            uid: u(4),
            gid: u(8),
            ino: u64::from_le_bytes(b[12..20].try_into().unwrap()),
        })
    }
}

/// What the index knows about one cached NAS file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryRecord {
    /// Entry id; names the data file.
    pub id: u64,
    /// Identity of the NAS file when the copy began.
    pub identity: Identity,
    /// Chunks durably present.
    pub map: ChunkMap,
    /// Last use, seconds since the epoch.
    pub last_access: u64,
    /// Owner and mode of the NAS file at its last check (`None`: a record of version 1, not
    /// seen on the NAS since).
    pub perms: Option<Perms>,
}

impl EntryRecord {
    /// Version 2: version, id, size, mtime ns, ino, ctime ns, chunk size, last access (u64
    /// each), a perms flag (u8) and, if set, mode, uid, gid (u32) and NAS inode (u64), then the
    /// chunk map as a word count (u32) and its words (u64). Little endian. (Version 1: no ctime,
    /// no perms.)
    fn encode(&self) -> Vec<u8> {
        let words = self.map.words();
        let mut out = Vec::with_capacity(1 + 8 * 7 + 1 + Perms::LEN + 4 + words.len() * 8);
        out.push(RECORD_VERSION);
        for v in [
            self.id,
            self.identity.size,
            self.identity.mtime_ns as u64,
            self.identity.ino,
            self.identity.ctime_ns as u64,
            self.map.chunk_size(),
            self.last_access,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        match &self.perms {
            Some(p) => {
                out.push(1);
                p.encode_into(&mut out);
            }
            None => out.push(0),
        }
        out.extend_from_slice(&(words.len() as u32).to_le_bytes());
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let (&version, rest) = bytes.split_first()?;
        let words = match version {
            1 => 6,
            2 => 7,
            _ => return None,
        };
        if rest.len() < words * 8 {
            return None;
        }
        let u = |i: usize| u64::from_le_bytes(rest[i * 8..i * 8 + 8].try_into().unwrap());
        let (id, size, mtime_ns, ino) = (u(0), u(1), u(2), u(3));
        let (ctime_ns, chunk_size, last_access) = match version {
            1 => (0, u(4), u(5)),
            _ => (u(4), u(5), u(6)),
        };
        let rest = &rest[words * 8..];
        let (perms, tail) = match version {
            1 => (None, rest),
            _ => match *rest.first()? {
                0 => (None, &rest[1..]),
                1 => {
                    let p = Perms::decode(rest.get(1..1 + Perms::LEN)?)?;
                    (Some(p), &rest[1 + Perms::LEN..])
                }
                _ => return None,
            },
        };
        let nwords = u32::from_le_bytes(tail.get(..4)?.try_into().unwrap()) as usize;
        let body = &tail[4..];
        if body.len() != nwords.checked_mul(8)? {
            return None;
        }
        let words = body
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Some(Self {
            id,
            identity: Identity {
                size,
                mtime_ns: mtime_ns as i64,
                ino,
                ctime_ns: ctime_ns as i64,
            },
            map: ChunkMap::from_words(size, chunk_size, words)?,
            last_access,
            perms,
        })
    }

    /// Whether the copy is complete.
    pub fn is_complete(&self) -> bool {
        self.map.is_complete()
    }
}

/// Bytes of index pages redb keeps in memory. The whole index is read once at startup and held
/// in [`Store`]'s own maps; redb's cache only serves the writes, so it is kept small (its default,
/// 1 GiB, would hold the whole index file a second time).
const INDEX_CACHE_BYTES: usize = 4 << 20;

fn open_db(path: &Path) -> Result<Database, StoreError> {
    Database::builder()
        .set_cache_size(INDEX_CACHE_BYTES)
        .create(path)
        .map_err(index_err)
}

/// The cache store: layout, lock and index. Cheap operations; data I/O happens in [`super::CacheFile`].
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// The index; `None` only while a reopen after an I/O error has not succeeded yet.
    db: parking_lot::RwLock<Option<Database>>,
    /// The index in memory.
    entries: Mutex<Entries>,
    /// Owner and mode of NAS directories seen (this run, or recorded in [`DIRS`] by an earlier
    /// one); those with entries below them are recorded.
    dirs: Mutex<BTreeMap<PathBuf, Perms>>,
    /// Directories not recorded as they are now (made durable by [`Store::flush_access`] once
    /// something is cached below them).
    dirs_dirty: Mutex<BTreeSet<PathBuf>>,
    next_id: AtomicU64,
    reserved_until: Mutex<u64>,
    first_id_of_run: u64,
    touched: Mutex<std::collections::HashSet<PathBuf>>,
    /// Removals whose index write failed (a full SSD): retried by [`Store::retry_removals`].
    pending_removals: Mutex<Vec<(PathBuf, u64)>>,
    _lock: File,
}

impl Store {
    /// Opens (creating if needed) the cache under `cache_dir`, takes the lock and loads the index.
    pub fn open(cache_dir: &Path) -> Result<Self, StoreError> {
        let dir = cache_dir.join(SUBDIR);
        let dir_err = |source| StoreError::Dir {
            path: dir.clone(),
            source,
        };
        fs::create_dir_all(dir.join("data")).map_err(dir_err)?;
        let lock = take_lock(&dir)?;
        check_format(&dir)?;

        let db = open_db(&dir.join("index.redb"))?;
        let mut entries = Vec::new();
        let mut dirs = BTreeMap::new();
        let mut next_id = 1;
        {
            let txn = db.begin_write().map_err(index_err)?;
            txn.open_table(ENTRIES).map_err(index_err)?;
            txn.open_table(META).map_err(index_err)?;
            txn.open_table(BLOBS).map_err(index_err)?;
            txn.open_table(DIRS).map_err(index_err)?;
            txn.commit().map_err(index_err)?;
        }
        let mut bad = Vec::new();
        {
            let txn = db.begin_read().map_err(index_err)?;
            let table = txn.open_table(ENTRIES).map_err(index_err)?;
            for item in table.iter().map_err(index_err)? {
                let (k, v) = item.map_err(index_err)?;
                let key = PathBuf::from(std::ffi::OsStr::from_bytes(k.value()));
                match EntryRecord::decode(v.value()) {
                    Some(rec) => {
                        next_id = next_id.max(rec.id + 1);
                        entries.push((key, rec));
                    }
                    None => bad.push(k.value().to_vec()),
                }
            }
            let table = txn.open_table(DIRS).map_err(index_err)?;
            for item in table.iter().map_err(index_err)? {
                let (k, v) = item.map_err(index_err)?;
                if let Some(p) = Perms::decode(v.value()) {
                    dirs.insert(PathBuf::from(std::ffi::OsStr::from_bytes(k.value())), p);
                }
            }
            let meta = txn.open_table(META).map_err(index_err)?;
            if let Some(v) = meta.get(META_NEXT_ID).map_err(index_err)? {
                next_id = next_id.max(v.value());
            }
        }
        if !bad.is_empty() {
            tracing::warn!(
                count = bad.len(),
                "discarding unreadable cache index records"
            );
            let txn = db.begin_write().map_err(index_err)?;
            {
                let mut table = txn.open_table(ENTRIES).map_err(index_err)?;
                for k in &bad {
                    table.remove(k.as_slice()).map_err(index_err)?;
                }
            }
            txn.commit().map_err(index_err)?;
        }
        let store = Self {
            dir,
            db: parking_lot::RwLock::new(Some(db)),
            entries: Mutex::new(Entries::load(entries)),
            dirs: Mutex::new(dirs),
            dirs_dirty: Mutex::new(BTreeSet::new()),
            next_id: AtomicU64::new(next_id),
            reserved_until: Mutex::new(next_id),
            first_id_of_run: next_id,
            touched: Mutex::new(Default::default()),
            pending_removals: Mutex::new(Vec::new()),
            _lock: lock,
        };
        // The first block of ids is reserved now, so that the first copy of the run does not
        // wait for an index commit.
        store.reserve_ids(next_id)?;
        Ok(store)
    }

    /// Runs a write transaction. After an I/O error (a full SSD, say) redb refuses every later
    /// write on the same handle, so the index is then reopened (it comes back as of its last
    /// commit) and the write tried once more: the cache works again as soon as space returns,
    /// without a remount.
    fn write_txn<T>(
        &self,
        f: impl Fn(&redb::WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match self.try_write(&f) {
            Err(e) if needs_reopen(&e) => {
                self.reopen()?;
                self.try_write(&f)
            }
            other => other,
        }
    }

    fn try_write<T>(
        &self,
        f: &impl Fn(&redb::WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let guard = self.db.read();
        let db = guard.as_ref().ok_or_else(closed)?;
        let txn = db.begin_write().map_err(index_err)?;
        let value = f(&txn)?;
        txn.commit().map_err(index_err)?;
        Ok(value)
    }

    fn reopen(&self) -> Result<(), StoreError> {
        let mut guard = self.db.write();
        *guard = None; // the old handle must be closed before the file can be opened again
        let db = open_db(&self.dir.join("index.redb"))?;
        *guard = Some(db);
        tracing::info!("cache index reopened after an I/O error");
        Ok(())
    }

    /// The versioned cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of entries in the index.
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts and byte sums over all entries (kept as entries change: no scan).
    pub fn totals(&self) -> Totals {
        self.entries.lock().totals()
    }

    /// Number of complete entries.
    pub fn complete_count(&self) -> usize {
        self.totals().complete
    }

    /// Bytes the entries will hold when complete (their NAS sizes).
    pub fn reserved_bytes(&self) -> u64 {
        self.totals().reserved
    }

    /// Bytes held by present chunks, over all entries.
    pub fn used_bytes(&self) -> u64 {
        self.totals().present
    }

    /// The record for a NAS path, if any.
    pub fn get(&self, rel: &Path) -> Option<EntryRecord> {
        self.entries.lock().get(rel)
    }

    /// Whether a NAS path is indexed.
    pub fn contains(&self, rel: &Path) -> bool {
        self.entries.lock().contains(rel)
    }

    /// The NAS size recorded for `rel`.
    pub fn size_of(&self, rel: &Path) -> Option<u64> {
        self.entries.lock().size_of(rel)
    }

    /// Up to `limit` of the least recently used entries that `keep` does not keep, oldest first
    /// (one pass over the index; `keep` is asked only about entries old enough to matter).
    pub fn oldest(&self, limit: usize, keep: impl FnMut(&Path) -> bool) -> Vec<Aged> {
        self.entries.lock().oldest(limit, keep)
    }

    /// Every entry `pick` picks, least recently used first.
    pub fn by_age(&self, pick: impl FnMut(&Path, &Aged) -> bool) -> Vec<Aged> {
        self.entries.lock().by_age(pick)
    }

    /// The entry id and recorded owner and mode of `rel`, if it is indexed (cheap: no record
    /// is copied).
    pub fn perms_of(&self, rel: &Path) -> Option<(u64, Option<Perms>)> {
        self.entries.lock().perms_of(rel)
    }

    /// The paths indexed at or below `dir` (a point lookup and one ordered range).
    pub fn paths_under(&self, dir: &Path) -> Vec<PathBuf> {
        self.entries.lock().paths_under(dir)
    }

    /// Whether a complete copy lies strictly below `dir`.
    pub fn complete_below(&self, dir: &Path) -> bool {
        self.entries.lock().complete_below(dir)
    }

    /// The names directly in `dir` that lead to complete copies: a file (its record) or a
    /// directory above one (`None`).
    pub fn complete_children(
        &self,
        dir: &Path,
    ) -> BTreeMap<std::ffi::OsString, Option<EntryRecord>> {
        self.entries.lock().complete_children(dir)
    }

    /// Records the owner and mode of the NAS file of entry `id` at `rel` when they changed
    /// (durably: what answers without the NAS serve).
    pub fn set_perms(&self, rel: &Path, id: u64, perms: Perms) -> Result<(), StoreError> {
        match self.entries.lock().perms_of(rel) {
            Some((i, p)) if i == id && p != Some(perms) => {}
            _ => return Ok(()),
        }
        // Only entries still indexed with the same id: a removal in between wins.
        self.write_txn(|txn| {
            let mut table = txn.open_table(ENTRIES).map_err(index_err)?;
            let key = rel.as_os_str().as_bytes();
            let current = table
                .get(key)
                .map_err(index_err)?
                .and_then(|v| EntryRecord::decode(v.value()));
            if let Some(mut cur) = current
                && cur.id == id
            {
                cur.perms = Some(perms);
                table
                    .insert(key, cur.encode().as_slice())
                    .map_err(index_err)?;
            }
            Ok(())
        })?;
        self.entries.lock().set_perms(rel, id, perms);
        Ok(())
    }

    /// Records the owner and mode of every entry that has none (records written before they
    /// were kept), asking `stat` for them; returns how many were filled in. For a background
    /// thread: `stat` goes to the NAS, and no lock is held while it waits.
    pub fn fill_missing_perms(
        &self,
        stat: impl Fn(&Path) -> io::Result<nix::sys::stat::FileStat>,
    ) -> usize {
        let missing = self.entries.lock().missing_perms();
        let mut filled = 0;
        for (rel, id) in missing {
            let Ok(st) = stat(&rel) else { continue };
            match self.set_perms(&rel, id, Perms::of(&st)) {
                Ok(()) => filled += 1,
                Err(e) => {
                    tracing::warn!(path = %rel.display(), error = %e, "could not record the owner and mode of a cached file");
                    break;
                }
            }
        }
        filled
    }

    /// The recorded owner and mode of NAS directory `rel`.
    pub fn dir_perms(&self, rel: &Path) -> Option<Perms> {
        self.dirs.lock().get(rel).copied()
    }

    /// Notes the owner and mode of NAS directory `rel` (made durable by
    /// [`Store::flush_access`] once something is cached below it).
    pub fn note_dir(&self, rel: &Path, perms: Perms) {
        let mut dirs = self.dirs.lock();
        if dirs.get(rel) == Some(&perms) {
            return;
        }
        dirs.insert(rel.to_path_buf(), perms);
        self.dirs_dirty.lock().insert(rel.to_path_buf());
    }

    /// Records a use of `rel` (in memory; made durable by [`Store::flush_access`]).
    pub fn touch(&self, rel: &Path, now: u64) {
        if self.entries.lock().touch(rel, now) {
            self.touched.lock().insert(rel.to_path_buf());
        }
    }

    /// Writes the access times recorded by [`Store::touch`] in one transaction.
    pub fn flush_access(&self) -> Result<usize, StoreError> {
        self.flush_dirs()?;
        let touched: Vec<PathBuf> = self.touched.lock().drain().collect();
        if touched.is_empty() {
            return Ok(0);
        }
        let records = self.entries.lock().records_of(&touched);
        self.write_txn(|txn| {
            let mut table = txn.open_table(ENTRIES).map_err(index_err)?;
            for (p, rec) in &records {
                // Only entries still indexed with the same id: a removal in between wins.
                let current = table
                    .get(p.as_os_str().as_bytes())
                    .map_err(index_err)?
                    .and_then(|v| EntryRecord::decode(v.value()));
                if let Some(cur) = current
                    && cur.id == rec.id
                {
                    let mut updated = cur;
                    updated.last_access = rec.last_access;
                    table
                        .insert(p.as_os_str().as_bytes(), updated.encode().as_slice())
                        .map_err(index_err)?;
                }
            }
            Ok(())
        })?;
        Ok(records.len())
    }

    /// Writes, in one transaction, the directory records noted since they were last written,
    /// of the directories with something cached below them (the others wait until there is).
    fn flush_dirs(&self) -> Result<(), StoreError> {
        let ready: Vec<PathBuf> = {
            let dirty = self.dirs_dirty.lock();
            if dirty.is_empty() {
                return Ok(());
            }
            let entries = self.entries.lock();
            dirty
                .iter()
                .filter(|d| entries.any_under(d))
                .cloned()
                .collect()
        };
        if ready.is_empty() {
            return Ok(());
        }
        let records: Vec<(PathBuf, Perms)> = {
            let dirs = self.dirs.lock();
            ready
                .iter()
                .filter_map(|p| dirs.get(p).map(|d| (p.clone(), *d)))
                .collect()
        };
        self.write_txn(|txn| {
            let mut table = txn.open_table(DIRS).map_err(index_err)?;
            for (p, d) in &records {
                let mut v = Vec::with_capacity(Perms::LEN);
                d.encode_into(&mut v);
                table
                    .insert(p.as_os_str().as_bytes(), v.as_slice())
                    .map_err(index_err)?;
            }
            Ok(())
        })?;
        // Still dirty: those noted again with other perms meanwhile.
        let dirs = self.dirs.lock();
        let mut dirty = self.dirs_dirty.lock();
        for (p, d) in &records {
            if dirs.get(p) == Some(d) {
                dirty.remove(p);
            }
        }
        Ok(())
    }

    /// A value persisted across runs (e.g. statistics totals).
    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let guard = self.db.read();
        let txn = guard
            .as_ref()
            .ok_or_else(closed)?
            .begin_read()
            .map_err(index_err)?;
        let table = txn.open_table(BLOBS).map_err(index_err)?;
        Ok(table
            .get(key)
            .map_err(index_err)?
            .map(|v| v.value().to_vec()))
    }

    /// Stores a value persisted across runs.
    pub fn meta_put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write_txn(|txn| {
            let mut table = txn.open_table(BLOBS).map_err(index_err)?;
            table.insert(key, value).map_err(index_err)?;
            Ok(())
        })
    }

    /// Path of the data file of entry `id`.
    pub fn data_path(&self, id: u64) -> PathBuf {
        self.dir
            .join("data")
            .join(format!("{:02x}", id & 0xff))
            .join(format!("{id:016x}.dat"))
    }

    /// Creates an empty sparse data file of `size` bytes under a fresh id. The entry is not in
    /// the index until the first [`Store::put`].
    pub fn create_data_file(&self, size: u64) -> Result<(u64, File), StoreError> {
        let id = self.allocate_id()?;
        let path = self.data_path(id);
        fs::create_dir_all(path.parent().expect("data path has a parent"))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        file.set_len(size)?;
        Ok((id, file))
    }

    /// Records (durably) an entry for `rel`. The caller guarantees that every chunk the map claims
    /// is durable in the data file.
    pub fn put(&self, rel: &Path, rec: &EntryRecord) -> Result<(), StoreError> {
        self.write_txn(|txn| {
            let mut table = txn.open_table(ENTRIES).map_err(index_err)?;
            table
                .insert(rel.as_os_str().as_bytes(), rec.encode().as_slice())
                .map_err(index_err)?;
            Ok(())
        })?;
        self.entries.lock().insert(rel, rec.clone());
        Ok(())
    }

    /// Records (durably, in one transaction) many entries, as [`Store::put`] does one.
    pub fn put_many(&self, records: &[(PathBuf, EntryRecord)]) -> Result<(), StoreError> {
        self.write_txn(|txn| {
            let mut table = txn.open_table(ENTRIES).map_err(index_err)?;
            for (rel, rec) in records {
                table
                    .insert(rel.as_os_str().as_bytes(), rec.encode().as_slice())
                    .map_err(index_err)?;
            }
            Ok(())
        })?;
        let mut entries = self.entries.lock();
        for (rel, rec) in records {
            entries.insert(rel, rec.clone());
        }
        Ok(())
    }

    /// Allocates an entry id without a data file (synthetic entries of the scale benchmark).
    pub fn new_id(&self) -> Result<u64, StoreError> {
        self.allocate_id()
    }

    /// Removes the entry for `rel` if it still has id `id`: first from the index (durably), then
    /// its data file. Returns whether something was removed.
    pub fn remove(&self, rel: &Path, id: u64) -> Result<bool, StoreError> {
        if self
            .entries
            .lock()
            .perms_of(rel)
            .is_none_or(|(i, _)| i != id)
        {
            // Not indexed (never persisted): only the data file may exist.
            remove_if_exists(&self.data_path(id))?;
            return Ok(false);
        }
        let removed = self.write_txn(|txn| {
            let mut table = txn.open_table(ENTRIES).map_err(index_err)?;
            table
                .remove(rel.as_os_str().as_bytes())
                .map_err(index_err)?;
            Ok(())
        });
        if let Err(e) = removed {
            // The data file stays until the index lets go of it: retried later.
            let mut pending = self.pending_removals.lock();
            if !pending.iter().any(|(p, i)| p == rel && *i == id) {
                pending.push((rel.to_path_buf(), id));
            }
            return Err(e);
        }
        self.entries.lock().remove(rel, id);
        remove_if_exists(&self.data_path(id))?;
        Ok(true)
    }

    /// Retries removals that failed on the index (once the SSD has room again). Returns how
    /// many went through.
    pub fn retry_removals(&self) -> usize {
        let pending: Vec<(PathBuf, u64)> = std::mem::take(&mut *self.pending_removals.lock());
        let mut done = 0;
        for (rel, id) in pending {
            if self.remove(&rel, id).is_ok() {
                done += 1;
            }
        }
        if done > 0 {
            tracing::info!(
                count = done,
                "removed cache copies whose removal had failed earlier"
            );
        }
        done
    }

    /// Deletes data files left by earlier runs that the index does not reference (a crash between
    /// creating a data file and recording it). Returns how many were removed.
    pub fn remove_orphans(&self) -> io::Result<usize> {
        let live = self.entries.lock().ids();
        let mut removed = 0;
        for sub in fs::read_dir(self.dir.join("data"))? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for f in fs::read_dir(sub.path())? {
                let f = f?;
                let Some(id) = parse_data_name(f.file_name().as_bytes()) else {
                    continue; // not a name we generate: not ours to delete
                };
                if id < self.first_id_of_run && !live.contains(&id) {
                    remove_if_exists(&f.path())?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    fn allocate_id(&self) -> Result<u64, StoreError> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        self.reserve_ids(id)?;
        Ok(id)
    }

    /// Makes sure `id` is below the persisted high-water mark, reserving a block past it if not.
    fn reserve_ids(&self, id: u64) -> Result<(), StoreError> {
        let mut reserved = self.reserved_until.lock();
        if id >= *reserved {
            let until = id + ID_BLOCK;
            self.write_txn(|txn| {
                let mut meta = txn.open_table(META).map_err(index_err)?;
                meta.insert(META_NEXT_ID, until).map_err(index_err)?;
                Ok(())
            })?;
            *reserved = until;
        }
        Ok(())
    }
}

fn parse_data_name(name: &[u8]) -> Option<u64> {
    let hex = name.strip_suffix(b".dat")?;
    if hex.len() != 16 || !hex.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn take_lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join("lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(|source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
    // SAFETY: flock on a valid, owned descriptor.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let pid = fs::read_to_string(&path)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .map(|p| format!(" (pid {p})"))
                .unwrap_or_default();
            return Err(StoreError::Locked {
                path: dir.to_path_buf(),
                pid,
            });
        }
        return Err(StoreError::Dir {
            path: dir.to_path_buf(),
            source: err,
        });
    }
    file.set_len(0)?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}

fn check_format(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join("FORMAT");
    match fs::read_to_string(&path) {
        Ok(found) if found == FORMAT_TEXT => Ok(()),
        Ok(found) => Err(StoreError::Format {
            path: dir.to_path_buf(),
            found: found.lines().next().unwrap_or("").to_string(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let tmp = dir.join("FORMAT.tmp");
            fs::write(&tmp, FORMAT_TEXT)?;
            File::open(&tmp)?.sync_all()?;
            fs::rename(&tmp, &path)?;
            Ok(())
        }
        Err(source) => Err(StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, size: u64) -> EntryRecord {
        let mut map = ChunkMap::new(size, 4);
        map.set_present(0);
        EntryRecord {
            id,
            identity: Identity {
                size,
                mtime_ns: -5,
                ino: 77,
                ctime_ns: 123_456_789,
            },
            map,
            last_access: 123,
            perms: None,
        }
    }

    /// The whole encoding of a record: changing it needs a new `RECORD_VERSION` that still
    /// reads the old ones (or a new `SUBDIR`).
    #[test]
    fn record_roundtrip_and_golden_bytes() {
        let mut r = rec(9, 10);
        r.perms = Some(Perms {
            mode: 0o100640,
            uid: 1000,
            gid: 1001,
            ino: 77,
        });
        let bytes = r.encode();
        let golden: Vec<u8> = [
            &[2u8][..],                                        // version
            &[9, 0, 0, 0, 0, 0, 0, 0],                         // id
            &[10, 0, 0, 0, 0, 0, 0, 0],                        // size
            &[0xfb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // mtime ns (-5)
            &[77, 0, 0, 0, 0, 0, 0, 0],                        // identity inode
            &[0x15, 0xcd, 0x5b, 0x07, 0, 0, 0, 0],             // ctime ns (123456789)
            &[4, 0, 0, 0, 0, 0, 0, 0],                         // chunk size
            &[123, 0, 0, 0, 0, 0, 0, 0],                       // last access
            &[1],                                              // perms present
            &[0xa0, 0x81, 0, 0],                               // mode 0o100640
            &[0xe8, 3, 0, 0],                                  // uid 1000
            &[0xe9, 3, 0, 0],                                  // gid 1001
            &[77, 0, 0, 0, 0, 0, 0, 0],                        // NAS inode
            &[1, 0, 0, 0],                                     // map words
            &[1, 0, 0, 0, 0, 0, 0, 0],                         // chunk 0 present
        ]
        .concat();
        assert_eq!(bytes, golden);
        assert_eq!(EntryRecord::decode(&bytes), Some(r.clone()));
        for cut in 0..bytes.len() {
            assert!(EntryRecord::decode(&bytes[..cut]).is_none(), "cut {cut}");
        }
        let mut wrong = bytes.clone();
        wrong[0] = 3;
        assert!(EntryRecord::decode(&wrong).is_none());
        let mut wrong = bytes.clone();
        wrong[57] = 2; // neither absent nor present
        assert!(EntryRecord::decode(&wrong).is_none());

        // Without perms: the flag is 0 and nothing follows it but the map.
        r.perms = None;
        let bytes = r.encode();
        let mut golden_none = golden[..57].to_vec();
        golden_none.push(0);
        golden_none.extend_from_slice(&golden[78..]);
        assert_eq!(bytes, golden_none);
        assert_eq!(EntryRecord::decode(&bytes), Some(r.clone()));

        // A version 1 record (no ctime, no perms) still reads, as a record without them.
        let mut v1 = golden[..33].to_vec();
        v1[0] = 1;
        v1.extend_from_slice(&golden[41..57]);
        v1.extend_from_slice(&golden[78..]);
        r.identity.ctime_ns = 0;
        assert_eq!(EntryRecord::decode(&v1), Some(r));
    }

    #[test]
    fn persist_reopen_remove() {
        let dir = tempfile::tempdir().unwrap();
        let (id, _f) = {
            let store = Store::open(dir.path()).unwrap();
            let (id, f) = store.create_data_file(10).unwrap();
            let mut r = rec(id, 10);
            r.id = id;
            store.put(Path::new("loras/a.safetensors"), &r).unwrap();
            (id, f)
        };
        let store = Store::open(dir.path()).unwrap();
        let got = store.get(Path::new("loras/a.safetensors")).unwrap();
        assert_eq!(got.id, id);
        assert_eq!(got.map.present_count(), 1);
        assert!(store.data_path(id).exists());
        store.touch(Path::new("loras/a.safetensors"), 999);
        assert_eq!(store.flush_access().unwrap(), 1);
        store.meta_put("k", b"v").unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store
                .get(Path::new("loras/a.safetensors"))
                .unwrap()
                .last_access,
            999
        );
        assert_eq!(store.meta_get("k").unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(store.len(), 1);
        assert!(store.remove(Path::new("loras/a.safetensors"), id).unwrap());
        assert!(!store.data_path(id).exists());
        assert!(store.get(Path::new("loras/a.safetensors")).is_none());
    }

    #[test]
    fn missing_perms_are_filled_in() {
        let dir = tempfile::tempdir().unwrap();
        let nas = dir.path().join("nas");
        fs::create_dir(&nas).unwrap();
        fs::write(nas.join("a"), b"x").unwrap();
        let store = Store::open(&dir.path().join("cache")).unwrap();
        store.put(Path::new("a"), &rec(1, 10)).unwrap(); // no perms, as a version 1 record
        store.put(Path::new("gone"), &rec(2, 10)).unwrap();
        let filled = store.fill_missing_perms(|rel| {
            nix::sys::stat::stat(&nas.join(rel)).map_err(io::Error::from)
        });
        assert_eq!(filled, 1, "the file still on the NAS");
        let want = Perms::of(&nix::sys::stat::stat(&nas.join("a")).unwrap());
        assert_eq!(store.get(Path::new("a")).unwrap().perms, Some(want));
        assert_eq!(store.get(Path::new("gone")).unwrap().perms, None);
        // Durably: a reopened index has them.
        drop(store);
        let store = Store::open(&dir.path().join("cache")).unwrap();
        assert_eq!(store.get(Path::new("a")).unwrap().perms, Some(want));
    }

    #[test]
    fn second_open_is_refused_while_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("in use by another arenafs daemon"));
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id()))
        );
    }

    #[test]
    fn unknown_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(SUBDIR)).unwrap();
        fs::write(dir.path().join(SUBDIR).join("FORMAT"), "something else\n").unwrap();
        assert!(matches!(
            Store::open(dir.path()).unwrap_err(),
            StoreError::Format { .. }
        ));
    }

    #[test]
    fn orphans_are_removed_but_foreign_files_kept() {
        let dir = tempfile::tempdir().unwrap();
        let orphan = {
            let store = Store::open(dir.path()).unwrap();
            let (id, _) = store.create_data_file(5).unwrap();
            store.data_path(id)
        };
        let foreign = dir.path().join(SUBDIR).join("data/00/notes.txt");
        fs::create_dir_all(foreign.parent().unwrap()).unwrap();
        fs::write(&foreign, "mine").unwrap();
        let outside = dir.path().join("old-node-cache.safetensors");
        fs::write(&outside, "x").unwrap();

        let store = Store::open(dir.path()).unwrap();
        // A file created in this run is never an orphan.
        let (fresh, _) = store.create_data_file(5).unwrap();
        assert_eq!(store.remove_orphans().unwrap(), 1);
        assert!(!orphan.exists());
        assert!(foreign.exists());
        assert!(outside.exists());
        assert!(store.data_path(fresh).exists());
    }

    /// After an I/O error redb answers `PreviousIo` to every later call on the handle, whichever
    /// of its error types carries it; only that (and a closed index) asks for a reopen, whatever
    /// the text of other errors says.
    #[test]
    fn a_previous_io_error_asks_for_a_reopen_and_nothing_else_does() {
        use redb::{CommitError, DatabaseError, StorageError, TableError, TransactionError};
        assert!(needs_reopen(&closed()));
        assert!(needs_reopen(&index_err(StorageError::PreviousIo)));
        assert!(needs_reopen(&index_err(TransactionError::Storage(
            StorageError::PreviousIo
        ))));
        assert!(needs_reopen(&index_err(TableError::Storage(
            StorageError::PreviousIo
        ))));
        assert!(needs_reopen(&index_err(CommitError::Storage(
            StorageError::PreviousIo
        ))));
        assert!(needs_reopen(&index_err(DatabaseError::Storage(
            StorageError::PreviousIo
        ))));

        // The failing write itself: an I/O error, whose message may say anything (a path, an
        // error text of the file system).
        let io = |m: &str| index_err(StorageError::Io(io::Error::other(m.to_string())));
        assert!(!needs_reopen(&io("No space left on device")));
        assert!(!needs_reopen(&io("Previous I/O error in /ssd/cache")));
        assert!(!needs_reopen(&index_err(StorageError::Corrupted(
            "Previous I/O error occurred".into()
        ))));
        assert!(!needs_reopen(&index_err(CommitError::TransactionPoisoned)));
        assert!(!needs_reopen(&StoreError::Io(io::Error::other(
            "closed after an I/O error"
        ))));
    }

    #[test]
    fn uncreatable_cache_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plainfile");
        fs::write(&file, "x").unwrap();
        assert!(matches!(
            Store::open(&file.join("sub")).unwrap_err(),
            StoreError::Dir { .. }
        ));
    }
}
