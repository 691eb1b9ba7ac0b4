//! The file-system core: what the mount does, in plain Rust, without the kernel protocol.
//!
//! [`Vfs`] takes plain arguments (inode and handle numbers, names, offsets) and returns plain
//! results ([`Entry`], [`Attr`], [`Opened`], listings) or one [`FsError`] with one mapping to an
//! errno; [`crate::fs`] only unpacks kernel requests, calls it and replies.
//!
//! # Never freeze
//! Every NAS call — metadata included — runs on the [`nasio`] pool and is waited for at most
//! `nas_timeout` (or until the health probe says the NAS is offline). The request thread holds no
//! lock while it waits. When the NAS does not answer, paths the index knows as complete copies
//! are answered from the index (the identity, owner and mode recorded at their last check:
//! [`index`]), and everything else fails with `EIO`. The offline verdict makes later calls skip
//! the NAS at once.
//!
//! # Reads
//! Reads take one of four paths, chosen at `open` (DESIGN.md §3):
//! - **passthrough**: the copy is complete and matches the NAS; the kernel reads the SSD file
//!   directly and the daemon never sees the reads;
//! - **ssd**: the same, served by the daemon, when passthrough is unavailable or the inode already
//!   has handles open in page-cache mode (the kernel allows one mode per inode: [`iomode`]);
//! - **fill**: an allowed file without a complete copy: reads go through
//!   [`crate::cache::CacheFile::read`], and loading it for real queues the worker to complete it;
//! - **nas**: everything else is read from the NAS.
//!
//! Changes are written through to the NAS ([`write`]), as the calling user ([`creds`]). A file
//! opened for writing loses its cache copy at once; handles that were reading a copy read the NAS
//! from then on, so no reader sees old and new bytes mixed.

pub mod creds;
mod data;
mod dir;
mod error;
mod index;
pub mod inodes;
pub mod iomode;
pub mod nasio;
mod types;
mod write;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::stat::FileStat;
use parking_lot::Mutex;

pub use creds::Caller;
pub use error::FsError;
pub use types::{
    Attr, DirEntry, DirEntryPlus, DirOpened, Entry, Kind, OpenMode, Opened, SetAttr, SetTime,
    StatFs, XattrReply,
};

use crate::cache::{Cache, CacheFile, Perms};
use crate::config::Live;
use crate::source::{Identity, Nas};
use crate::stats::Stats;
use crate::worker::Worker;
use inodes::{Inodes, ino_for};

/// Registers a file with the kernel as a passthrough backing file (the adapter's
/// `ReplyOpen::open_backing`).
pub type Register<'a> = &'a dyn Fn(&File) -> std::io::Result<fuser::BackingId>;

/// Settings of the file-system core.
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// How long the kernel may cache attributes and entries (also negative ones).
    pub attr_ttl: Duration,
    /// Whether to use kernel passthrough for complete copies when the kernel offers it.
    pub passthrough: bool,
    /// Make every change to the NAS as this (uid, gid) instead of the caller.
    pub write_as: Option<(u32, u32)>,
    /// Serve complete copies while the NAS is offline or hung.
    pub offline_copies: bool,
    /// How long any NAS call may take before the request is answered without it.
    pub nas_timeout: Duration,
}

/// What a handle reads from or writes to.
enum HandleKind {
    /// The kernel does the I/O itself, on this backing file; `copy`: it is the SSD copy.
    Passthrough {
        /// Held, not read: the kernel's registration lives while a handle uses it.
        #[allow(dead_code)]
        backing: Arc<fuser::BackingId>,
        copy: bool,
    },
    /// The complete SSD copy, read by the daemon.
    Ssd(File),
    /// A partial copy: present chunks from the SSD, the rest from the NAS (cached on the way).
    Fill(Arc<CacheFile>),
    /// The NAS file.
    Nas,
    /// Open for writing, served by the daemon: reads and writes go to the NAS file.
    Write,
}

/// An open file.
struct Handle {
    ino: u64,
    kind: HandleKind,
    /// The NAS file (`None`: opened from the index while the NAS did not answer).
    nas: Option<File>,
    /// The NAS path whose cache copy this handle keeps from eviction.
    cache_ref: Option<PathBuf>,
    /// The inode's flag for "the content changed through the mount".
    stale: Arc<AtomicBool>,
    /// Whether the handle counts as a writer of its inode.
    writer: bool,
    /// Whether the kernel opened it to execute the file.
    exec: bool,
    /// The NAS file's identity when the handle opened; reads of a copy check it, so a file
    /// rewritten in place on the NAS (by another machine) is read from the NAS from then on.
    identity: Option<Identity>,
    /// The attributes at open: the answer for the handle when the NAS does not answer.
    attr: Attr,
}

impl Handle {
    /// For a handle the kernel serves from the SSD copy: the identity it holds, whatever the
    /// NAS holds now (a stat of the file must report that size, or `mmap` breaks).
    fn held(&self) -> Option<Identity> {
        match self.kind {
            HandleKind::Passthrough { copy: true, .. } => self.identity,
            _ => None,
        }
    }

    /// Whether this handle reads a cache copy (complete or partial) through the daemon.
    fn reads_copy(&self) -> bool {
        matches!(self.kind, HandleKind::Ssd(_) | HandleKind::Fill(_))
    }
}

/// The file-system core of one mount.
pub struct Vfs {
    nas: Arc<Nas>,
    cache: Arc<Cache>,
    worker: Arc<Worker>,
    live: Arc<Live>,
    stats: Arc<Stats>,
    opts: FsOptions,
    root_dev: u64,
    root_ino: u64,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    dirs: Mutex<HashMap<u64, Arc<dir::DirHandle>>>,
    next_fh: AtomicU64,
    passthrough_ok: Arc<AtomicBool>,
    health: Arc<crate::health::Health>,
    nas_io: Arc<nasio::NasIo>,
    /// Tells the kernel to drop what it caches (set once the session runs).
    notifier: std::sync::OnceLock<fuser::Notifier>,
    /// Names the kernel must forget, sent from a thread of their own: the kernel locks the
    /// directory to drop a name, which a request in that directory may hold.
    forget_names: std::sync::OnceLock<std::sync::mpsc::Sender<(u64, OsString)>>,
}

/// What the file system works with, shared with the rest of the daemon.
pub struct Parts {
    /// The NAS.
    pub nas: Arc<Nas>,
    /// The cache.
    pub cache: Arc<Cache>,
    /// The copy scheduler.
    pub worker: Arc<Worker>,
    /// The settings in force.
    pub live: Arc<Live>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Set at `init` when the kernel offers passthrough (cleared if it stops working).
    pub passthrough_ok: Arc<AtomicBool>,
    /// Whether the NAS is there.
    pub health: Arc<crate::health::Health>,
    /// The pool that runs NAS calls within the deadline.
    pub nas_io: Arc<nasio::NasIo>,
}

impl Vfs {
    /// The core over an opened NAS and cache (the NAS root is looked at once, here).
    pub fn new(parts: Parts, opts: FsOptions) -> std::io::Result<Arc<Self>> {
        let Parts {
            nas,
            cache,
            worker,
            live,
            stats,
            passthrough_ok,
            health,
            nas_io,
        } = parts;
        let root = nas.stat(Path::new(""))?;
        cache.store().note_dir(Path::new(""), Perms::of(&root));
        Ok(Arc::new(Self {
            nas,
            cache,
            worker,
            live,
            stats,
            opts,
            root_dev: root.st_dev,
            root_ino: root.st_ino,
            inodes: Mutex::new(Inodes::default()),
            handles: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            passthrough_ok,
            health,
            nas_io,
            notifier: std::sync::OnceLock::new(),
            forget_names: std::sync::OnceLock::new(),
        }))
    }

    /// The settings the core runs with.
    pub fn options(&self) -> &FsOptions {
        &self.opts
    }

    /// Gives the core the session's notifier, through which it tells the kernel to drop what it
    /// caches of an inode that the daemon learned has changed.
    pub fn set_notifier(&self, notifier: fuser::Notifier) {
        let (tx, rx) = std::sync::mpsc::channel::<(u64, OsString)>();
        let names = notifier.clone();
        let spawned = std::thread::Builder::new()
            .name("arenafs-forget".into())
            .spawn(move || {
                for (parent, name) in rx {
                    if let Err(e) = names.inval_entry(fuser::INodeNo(parent), &name)
                        && e.raw_os_error() != Some(libc::ENOENT)
                    {
                        tracing::debug!(parent, ?name, error = %e, "could not invalidate the kernel's entry");
                    }
                }
            });
        match spawned {
            Ok(_) => {
                let _ = self.forget_names.set(tx);
            }
            Err(e) => tracing::warn!(error = %e, "no thread to invalidate the kernel's entries"),
        }
        let _ = self.notifier.set(notifier);
    }

    /// Tells the kernel that names below directory `parent` are gone (soon, from another
    /// thread).
    fn forget_entries(&self, parent: u64, names: Vec<OsString>) {
        if let Some(tx) = self.forget_names.get() {
            for name in names {
                let _ = tx.send((parent, name));
            }
        }
    }

    /// Tells the kernel that the attributes it caches of `ino` are out of date (it asks again).
    fn forget_attributes(&self, ino: u64) {
        if let Some(n) = self.notifier.get()
            && let Err(e) = n.inval_inode(fuser::INodeNo(ino), -1, 0)
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            tracing::debug!(ino, error = %e, "could not invalidate the kernel's attributes");
        }
    }

    /// Records whether the kernel agreed to passthrough (at `init`).
    pub fn set_passthrough(&self, ok: bool) {
        self.passthrough_ok.store(ok, Ordering::Relaxed);
    }

    /// Who a change is made as: the caller of the request, or `write_as`.
    pub fn caller(&self, uid: u32, gid: u32, pid: u32) -> Caller {
        match self.opts.write_as {
            Some((uid, gid)) => Caller::fixed(uid, gid),
            None => Caller::of(uid, gid, pid),
        }
    }

    // -----------------------------------------------------------------------------------------
    // NAS calls

    /// Whether the NAS is offline (the probe's verdict).
    fn offline(&self) -> bool {
        self.health.offline()
    }

    /// Runs `f` on the NAS pool within the deadline (see the module docs). Errors that smell
    /// like a lost NAS, and calls that do not answer, ask the health probe to look now.
    fn nas<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Nas) -> Result<T, FsError> + Send + 'static,
    ) -> Result<T, FsError> {
        if self.offline() {
            return Err(FsError::Offline);
        }
        let nas = self.nas.clone();
        let health = &self.health;
        let answer = self
            .nas_io
            .call(self.opts.nas_timeout, &|| health.offline(), move || f(&nas));
        match answer {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if let FsError::Io(io) = &e
                    && index::nas_trouble(io)
                {
                    self.health.kick();
                }
                Err(e)
            }
            Err(w) => {
                let e = FsError::from(w);
                if !matches!(e, FsError::Offline) {
                    Stats::add(&self.stats.nas_timeouts, 1);
                    tracing::warn!(timeout = ?self.opts.nas_timeout, error = %e, "a NAS call did not answer; answering without the NAS");
                    self.health.kick();
                }
                Err(e)
            }
        }
    }

    /// Runs `f` on the NAS pool as `caller` (a change, or a check of the caller's rights).
    fn nas_as<T: Send + 'static>(
        &self,
        caller: &Caller,
        f: impl FnOnce(&Nas) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, FsError> {
        let caller = caller.clone();
        self.nas(move |nas| {
            let _identity = creds::switch(&caller).map_err(|e| {
                tracing::error!(error = %e, uid = caller.uid, "cannot act as the caller");
                FsError::Identity(e)
            })?;
            f(nas).map_err(FsError::Io)
        })
    }

    /// `lstat` of a NAS path, within the deadline.
    fn nas_stat(&self, rel: &Path) -> Result<FileStat, FsError> {
        let rel = rel.to_path_buf();
        self.nas(move |nas| Ok(nas.stat(&rel)?))
    }

    // -----------------------------------------------------------------------------------------
    // Inodes and handles

    fn handle(&self, fh: u64) -> Result<Arc<Handle>, FsError> {
        self.handles
            .lock()
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    /// The NAS path of an inode.
    fn path(&self, ino: u64) -> Result<PathBuf, FsError> {
        self.inodes.lock().path(ino).ok_or(FsError::Stale)
    }

    /// A name below a directory inode, refusing what the kernel never sends.
    fn child_of(&self, parent: u64, name: &OsStr) -> Result<PathBuf, FsError> {
        let dir = self.path(parent)?;
        child(&dir, name)
    }

    /// The inode number a NAS file is shown as.
    fn ino_of(&self, st: &FileStat) -> u64 {
        ino_for(self.root_dev, self.root_ino, st.st_dev, st.st_ino)
    }

    /// The attributes of a NAS `stat`.
    fn attr_of(&self, st: &FileStat) -> Attr {
        Attr::of_stat(st, self.ino_of(st))
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// A successful lookup of `rel`: the kernel holds one more reference on the inode.
    fn remember(&self, attr: &Attr, rel: &Path) {
        self.inodes.lock().remember(attr.ino, rel).shown = Some((attr.size, attr.mtime));
    }

    /// Keeps the owner and mode of what the NAS just showed, where the index will need them
    /// to answer without the NAS: directories above cached files, and cached files.
    fn note_seen(&self, rel: &Path, st: &FileStat) {
        let store = self.cache.store();
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            store.note_dir(rel, Perms::of(st));
        } else if let Some((id, perms)) = store.perms_of(rel)
            && perms != Some(Perms::of(st))
            && let Err(e) = store.set_perms(rel, id, Perms::of(st))
        {
            tracing::warn!(path = %rel.display(), error = %e, "could not record the owner and mode of a cached file");
        }
    }

    // -----------------------------------------------------------------------------------------
    // Metadata

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Entry, FsError> {
        if crate::source::is_reserved(name) {
            return Ok(Entry::Negative);
        }
        let rel = self.child_of(parent, name)?;
        match self.nas_stat(&rel) {
            Ok(st) => {
                let attr = self.attr_of(&st);
                self.note_seen(&rel, &st);
                self.remember(&attr, &rel);
                Ok(Entry::Found(attr))
            }
            // A negative entry: ComfyUI probes `unet/x` before `diffusion_models/x`.
            Err(FsError::Io(e)) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Entry::Negative),
            Err(e) if e.nas_unanswered() => {
                let attr = self.index_attr(&rel).map_err(|_| e)?;
                self.remember(&attr, &rel);
                Ok(Entry::Found(attr))
            }
            Err(e) => Err(e),
        }
    }

    /// Whether NAS-relative `rel` has a handle open through the mount (the updater waits for
    /// it to close before it replaces the file).
    pub fn is_open(&self, rel: &Path) -> bool {
        let inos: Vec<u64> = self.handles.lock().values().map(|h| h.ino).collect();
        if inos.is_empty() {
            return false;
        }
        let inodes = self.inodes.lock();
        inos.into_iter()
            .any(|ino| inodes.path(ino).as_deref() == Some(rel))
    }

    /// The kernel dropped `n` references on `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.lock().forget(ino, n);
    }

    /// The attributes of inode `ino` (through handle `fh` if given).
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<Attr, FsError> {
        // An open handle knows its file even after its name is gone (`fstat` of an unlinked
        // file sends no handle: any handle of the inode will do then).
        let path = self.inodes.lock().path(ino);
        let handle = {
            let handles = self.handles.lock();
            match fh.and_then(|fh| handles.get(&fh)) {
                Some(h) => Some(h.clone()),
                None if path.is_none() => handles
                    .values()
                    .find(|h| h.ino == ino && h.nas.is_some())
                    .cloned(),
                None => None,
            }
        };
        let mut attr = match (handle, path) {
            (Some(h), _) => self.handle_attr(&h)?,
            (None, Some(rel)) => match self.nas_stat(&rel) {
                Ok(st) => {
                    self.note_seen(&rel, &st);
                    self.attr_of(&st)
                }
                Err(e) if e.nas_unanswered() => self.index_attr(&rel).map_err(|_| e)?,
                Err(e) => return Err(e),
            },
            (None, None) => return Err(FsError::Stale),
        };
        attr.ino = ino;
        // Handles reading the SSD copy through passthrough see the size and mtime it holds.
        if let Some(node) = self.inodes.lock().get_mut(ino) {
            if let Some(held) = node.opened_ref().and_then(|o| o.io.held()) {
                hold(&mut attr, held);
            }
            node.shown = Some((attr.size, attr.mtime));
        }
        Ok(attr)
    }

    /// The attributes of the file a handle has open.
    fn handle_attr(&self, h: &Arc<Handle>) -> Result<Attr, FsError> {
        let mut attr = match &h.nas {
            Some(_) => {
                let hh = h.clone();
                match self.nas(move |_| Ok(nix::sys::stat::fstat(hh.nas.as_ref().unwrap())?)) {
                    Ok(st) => self.attr_of(&st),
                    Err(e) if e.nas_unanswered() => h.attr,
                    Err(e) => return Err(e),
                }
            }
            None => h.attr,
        };
        if let Some(held) = h.held() {
            hold(&mut attr, held);
        }
        Ok(attr)
    }

    /// The target of symlink `ino`.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let rel = self.path(ino)?;
        let target = self.nas(move |nas| Ok(nas.readlink(&rel)?))?;
        Ok(target.into_encoded_bytes())
    }

    /// Statistics of the NAS file system.
    pub fn statfs(&self) -> Result<StatFs, FsError> {
        let s = self.nas(|nas| Ok(nas.statvfs()?))?;
        Ok(StatFs {
            blocks: s.blocks(),
            bfree: s.blocks_free(),
            bavail: s.blocks_available(),
            files: s.files(),
            ffree: s.files_free(),
            bsize: s.block_size() as u32,
            namelen: s.name_max() as u32,
            frsize: s.fragment_size() as u32,
        })
    }

    /// `access(2)` as the caller.
    pub fn access(&self, ino: u64, mask: i32, caller: &Caller) -> Result<(), FsError> {
        let rel = self.path(ino)?;
        self.nas_as(caller, move |nas| nas.access(&rel, mask))
    }

    /// `getxattr` (`size` 0: the size of the value).
    pub fn getxattr(
        &self,
        ino: u64,
        name: &OsStr,
        size: u32,
        caller: &Caller,
    ) -> Result<XattrReply, FsError> {
        let rel = self.path(ino)?;
        let name = name.to_os_string();
        self.xattr_read(caller, size, move |nas, buf| nas.getxattr(&rel, &name, buf))
    }

    /// `listxattr` (`size` 0: the size of the list).
    pub fn listxattr(&self, ino: u64, size: u32, caller: &Caller) -> Result<XattrReply, FsError> {
        let rel = self.path(ino)?;
        self.xattr_read(caller, size, move |nas, buf| nas.listxattr(&rel, buf))
    }

    fn xattr_read(
        &self,
        caller: &Caller,
        size: u32,
        read: impl Fn(&Nas, &mut [u8]) -> std::io::Result<usize> + Send + 'static,
    ) -> Result<XattrReply, FsError> {
        self.nas_as(caller, move |nas| {
            if size == 0 {
                return Ok(XattrReply::Size(read(nas, &mut [])? as u32));
            }
            let mut buf = vec![0u8; size as usize];
            let n = read(nas, &mut buf)?;
            buf.truncate(n);
            Ok(XattrReply::Data(buf))
        })
    }

    /// `setxattr` as the caller.
    pub fn setxattr(
        &self,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        caller: &Caller,
    ) -> Result<(), FsError> {
        let rel = self.path(ino)?;
        let (name, value) = (name.to_os_string(), value.to_vec());
        self.nas_as(caller, move |nas| nas.setxattr(&rel, &name, &value, flags))
    }

    /// `removexattr` as the caller.
    pub fn removexattr(&self, ino: u64, name: &OsStr, caller: &Caller) -> Result<(), FsError> {
        let rel = self.path(ino)?;
        let name = name.to_os_string();
        self.nas_as(caller, move |nas| nas.removexattr(&rel, &name))
    }

    /// NAS pool threads alive and busy (stuck ones included), for status and metrics.
    pub fn nas_threads(&self) -> (usize, usize) {
        self.nas_io.threads()
    }
}

/// Shows the size and mtime of the content a handle holds.
fn hold(attr: &mut Attr, held: Identity) {
    attr.size = held.size;
    attr.blocks = held.size.div_ceil(512);
    attr.mtime = types::system_time(
        held.mtime_ns.div_euclid(1_000_000_000),
        held.mtime_ns.rem_euclid(1_000_000_000),
    );
}

/// `parent/name`, refusing names the kernel never sends: the NAS path must never leave the root.
fn child(parent: &Path, name: &OsStr) -> Result<PathBuf, FsError> {
    if name.is_empty() || name == "." || name == ".." || name.as_encoded_bytes().contains(&b'/') {
        return Err(FsError::InvalidName);
    }
    if crate::source::is_reserved(name) {
        return Err(FsError::Reserved);
    }
    Ok(parent.join(name))
}
