//! The FUSE adapter: maps kernel requests onto the NAS, the cache and the worker.
//!
//! Reads take one of four paths, chosen at `open` (DESIGN.md §3):
//! - **passthrough**: the copy is complete and matches the NAS; the kernel reads the SSD file
//!   directly and the daemon never sees the reads;
//! - **ssd**: the same, served by the daemon, when passthrough is unavailable or the inode already
//!   has handles open in page-cache mode (the kernel allows one mode per inode);
//! - **fill**: an allowed file without a complete copy: reads go through [`CacheFile::read`], and
//!   the first read queues the worker to complete the copy;
//! - **nas**: everything else is read from the NAS.
//!
//! Changes are written through to the NAS (`write.rs`), as the calling user (`creds.rs`). A
//! file opened for writing loses its cache copy at once; handles that were reading a copy read
//! the NAS from then on, so no reader sees old and new bytes mixed.

pub mod creds;
pub mod inodes;
mod nasio;
use write::ReplyXattrExt;
mod offline;
mod write;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use nix::sys::stat::FileStat;
use parking_lot::Mutex;

use crate::cache::{Cache, CacheFile, FetchError, Found};
use crate::config::{CacheState, Discovery, Live};
use crate::policy::{Decision, category_of};
use crate::source::{DirEntryKind, Nas, pread_full};
use crate::stats::Stats;
use crate::worker::{Reason, Worker};
use inodes::{Inodes, IoMode, ROOT_INO, ino_for};

/// Largest read the kernel sends when asked for big requests (`max_pages` = 256 pages).
const MAX_READAHEAD: u32 = 1 << 20;

/// Settings of the filesystem layer.
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// How long the kernel may cache attributes and entries (also negative ones).
    pub attr_ttl: Duration,
    /// Whether to use kernel passthrough for complete copies when the kernel offers it.
    pub passthrough: bool,
    /// Make every change to the NAS as this (uid, gid) instead of the caller.
    pub write_as: Option<(u32, u32)>,
    /// Serve complete copies while the NAS is offline.
    pub offline_copies: bool,
    /// How long a read may wait for the NAS before it fails with `EIO`.
    pub nas_timeout: Duration,
}

enum HandleKind {
    Passthrough(#[allow(dead_code)] Arc<BackingId>),
    Ssd(File),
    Fill {
        cf: Arc<CacheFile>,
        nas: File,
    },
    Nas(File),
    /// Open for writing, served in user space: reads and writes go to the NAS file.
    Write(File),
}

/// A directory listing: (name, type, inode).
type DirListing = Vec<(std::ffi::OsString, FileType, u64)>;

/// An open directory; listed from the NAS at the first `readdir`.
struct DirHandle {
    rel: PathBuf,
    listing: Mutex<Option<Arc<DirListing>>>,
}

struct Handle {
    ino: u64,
    kind: HandleKind,
    /// The NAS path whose cache copy this handle keeps from eviction.
    cache_ref: Option<PathBuf>,
    /// The NAS file, where the kind does not hold it (SSD and passthrough handles): for reads
    /// once the copy is stale, `fstat`, `fsync` and `fallocate`.
    nas: Option<File>,
    /// The inode's flag for "the content changed through the mount".
    stale: Arc<AtomicBool>,
    /// Whether the handle counts as a writer of its inode.
    writer: bool,
    /// The NAS file's identity when a handle reading a copy opened; checked on every read, so
    /// a file rewritten in place on the NAS (by another machine) is read from the NAS from
    /// then on.
    identity: Option<crate::source::Identity>,
}

impl Handle {
    /// The NAS file behind the handle, if it holds one.
    fn nas_file(&self) -> Option<&File> {
        match &self.kind {
            HandleKind::Fill { nas, .. } | HandleKind::Nas(nas) | HandleKind::Write(nas) => {
                Some(nas)
            }
            HandleKind::Ssd(_) | HandleKind::Passthrough(_) => self.nas.as_ref(),
        }
    }
}

/// The arenafs filesystem: what the kernel talks to. A cheap handle on [`Inner`], so that work
/// can leave the request thread (NAS reads with a deadline).
pub struct ArenaFs(Arc<Inner>);

impl std::ops::Deref for ArenaFs {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The state of the filesystem.
pub struct Inner {
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
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    passthrough_ok: Arc<AtomicBool>,
    health: Arc<crate::health::Health>,
    nas_io: nasio::NasIo,
}

/// What the filesystem works with, shared with the rest of the daemon.
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
}

impl ArenaFs {
    /// Builds the filesystem over an opened NAS and cache.
    pub fn new(parts: Parts, opts: FsOptions) -> std::io::Result<Self> {
        Inner::new(parts, opts).map(|i| ArenaFs(Arc::new(i)))
    }
}

impl Inner {
    fn new(parts: Parts, opts: FsOptions) -> std::io::Result<Self> {
        let Parts {
            nas,
            cache,
            worker,
            live,
            stats,
            passthrough_ok,
            health,
        } = parts;
        let root = nas.stat(Path::new(""))?;
        Ok(Self {
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
            nas_io: nasio::NasIo::new(16)?,
        })
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        self.handles.lock().get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.inodes.lock().path(ino.0).ok_or(Errno::ESTALE)
    }

    fn attr(&self, st: &FileStat) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino_for(self.root_dev, self.root_ino, st.st_dev, st.st_ino)),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: systime(st.st_atime, st.st_atime_nsec),
            mtime: systime(st.st_mtime, st.st_mtime_nsec),
            ctime: systime(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: file_type(DirEntryKind::from_mode(st.st_mode)),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Decides how to open a regular file for reading and replies.
    fn open_file(&self, ino: u64, rel: &Path, reply: ReplyOpen) -> Result<(), Errno> {
        let nas = self.nas.open_file(rel).inspect_err(|e| self.saw(e))?;
        let st = nix::sys::stat::fstat(&nas).map_err(|e| Errno::from_i32(e as i32))?;
        let identity = self.cache.rule().identity(&st);
        // While the file is open for writing through the mount, readers read the NAS.
        let writing = self
            .inodes
            .lock()
            .get_mut(ino)
            .is_some_and(|n| n.writers > 0);

        // Red makes copies; green only serves complete ones; gray never gets here (Disabled).
        let making = self.live.settings().state() == CacheState::Red;
        let cacheable =
            !writing && self.live.policy().decide(rel, identity.size) == Decision::Cache;
        let found = match cacheable {
            true => match self.cache.find(rel, identity, making) {
                Ok(Found::Partial(_)) if !making => Found::None,
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(path = %rel.display(), error = %e, "cache unavailable; reading from the NAS");
                    Found::None
                }
            },
            false => Found::None,
        };
        if let Found::Partial(cf) = &found
            && self.worker.is_required(rel)
            && !cf.queued.swap(true, Ordering::AcqRel)
        {
            self.worker.enqueue(rel, Reason::Required);
        }
        let cache_ref = cacheable.then(|| rel.to_path_buf());
        if cacheable {
            let hit = matches!(found, Found::Complete(_));
            self.stats.category(category_of(rel), |c| {
                if hit { c.hits += 1 } else { c.misses += 1 }
            });
        }

        let mut inodes = self.inodes.lock();
        let node = inodes.get_mut(ino).ok_or(Errno::ESTALE)?;
        let keep_cache = node.last_identity == Some(identity) && node.writers == 0;
        node.last_identity = Some(identity);
        let flags = if keep_cache {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        let fh = self.new_fh();
        let stale = node.stale.clone();

        // The kernel allows one I/O mode per inode: once a handle uses passthrough, every open of
        // the inode must use passthrough with the same backing file.
        if let (
            IoMode::Passthrough {
                backing,
                nas: on_nas,
                readable,
                identity: held,
            },
            true,
        ) = (&node.mode, node.open > 0)
        {
            let usable = match on_nas {
                // The NAS file itself (a writer has it open): live bytes.
                true => *readable,
                // The SSD copy: only while it is still the NAS file's content (the name may
                // have changed; the content may not).
                false => *held == Some(identity),
            };
            let Some(backing) = backing.upgrade().filter(|_| usable) else {
                drop(inodes);
                tracing::warn!(
                    path = %rel.display(),
                    "the file changed while other handles still read it through passthrough; refusing the open until they close"
                );
                reply.error(Errno::ETXTBSY);
                return Ok(());
            };
            let on_nas = *on_nas;
            node.open += 1;
            drop(inodes);
            let handle = Handle {
                ino,
                kind: HandleKind::Passthrough(backing.clone()),
                cache_ref: if on_nas { None } else { cache_ref },
                nas: Some(nas),
                stale,
                writer: false,
                identity: None,
            };
            self.reply_passthrough(fh, handle, &backing, reply);
            return Ok(());
        }

        // A complete copy with no handle open in page-cache mode: start passthrough. (A data
        // file that cannot be opened is handled below, with the user-space path.)
        if let Found::Complete(path) = &found
            && node.open == 0
            && self.passthrough_ok.load(Ordering::Relaxed)
            && let Ok(data) = File::open(path)
        {
            match reply.open_backing(&data) {
                Ok(backing) => {
                    let backing = Arc::new(backing);
                    node.mode = IoMode::Passthrough {
                        backing: Arc::downgrade(&backing),
                        nas: false,
                        readable: true,
                        identity: Some(identity),
                    };
                    node.open += 1;
                    drop(inodes);
                    let handle = Handle {
                        ino,
                        kind: HandleKind::Passthrough(backing.clone()),
                        cache_ref,
                        nas: Some(nas),
                        stale,
                        writer: false,
                        identity: None,
                    };
                    self.reply_passthrough(fh, handle, &backing, reply);
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "passthrough unavailable; serving copies from user space");
                    self.passthrough_ok.store(false, Ordering::Relaxed);
                }
            }
        }

        // Every other handle reads through the daemon with the page cache.
        let (kind, nas_extra) = match found {
            Found::Complete(path) => match File::open(&path) {
                Ok(f) => {
                    Stats::add(&self.stats.opens_ssd, 1);
                    (HandleKind::Ssd(f), Some(nas))
                }
                Err(e) => {
                    tracing::warn!(path = %rel.display(), error = %e, "cache copy unreadable; dropping it");
                    let _ = self.cache.discard(rel);
                    Stats::add(&self.stats.opens_nas, 1);
                    (HandleKind::Nas(nas), None)
                }
            },
            Found::Partial(cf) => {
                Stats::add(&self.stats.opens_filling, 1);
                (HandleKind::Fill { cf, nas }, None)
            }
            Found::None => {
                Stats::add(&self.stats.opens_nas, 1);
                (HandleKind::Nas(nas), None)
            }
        };
        node.mode = IoMode::Cached;
        node.open += 1;
        drop(inodes);
        // The handle exists before the kernel can send a read for it.
        self.insert_handle(
            fh,
            Handle {
                ino,
                kind,
                cache_ref,
                nas: nas_extra,
                stale,
                writer: false,
                identity: Some(identity),
            },
        );
        reply.opened(FileHandle(fh), flags);
        Ok(())
    }

    fn reply_passthrough(&self, fh: u64, handle: Handle, backing: &BackingId, reply: ReplyOpen) {
        Stats::add(&self.stats.opens_passthrough, 1);
        // The handle exists before the kernel can use it. FOPEN_KEEP_CACHE is not allowed with
        // passthrough.
        self.insert_handle(fh, handle);
        reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), backing);
    }

    /// The listing of an open directory, read from the NAS on first use.
    fn listing(&self, fh: FileHandle) -> Result<(PathBuf, Arc<DirListing>), Errno> {
        let dir = self.dirs.lock().get(&fh.0).cloned().ok_or(Errno::EBADF)?;
        let mut listing = dir.listing.lock();
        if let Some(l) = listing.as_ref() {
            return Ok((dir.rel.clone(), l.clone()));
        }
        if self.offline() {
            let entries = Arc::new(self.offline_listing(&dir.rel)?);
            *listing = Some(entries.clone());
            return Ok((dir.rel.clone(), entries));
        }
        let entries: DirListing = self
            .nas
            .read_dir(&dir.rel)
            .inspect_err(|e| self.saw(e))?
            .into_iter()
            .map(|(name, kind, d_ino)| {
                let ino = ino_for(self.root_dev, self.root_ino, self.root_dev, d_ino);
                (name, file_type(kind), ino)
            })
            .collect();
        let entries = Arc::new(entries);
        *listing = Some(entries.clone());
        Ok((dir.rel.clone(), entries))
    }

    fn insert_handle(&self, fh: u64, handle: Handle) {
        if let Some(rel) = &handle.cache_ref {
            self.cache.open_ref(rel);
        }
        self.handles.lock().insert(fh, Arc::new(handle));
    }

    fn read_handle(&self, h: &Handle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        // Changed on the NAS (rewritten in place, truncated) since this handle opened?
        if matches!(h.kind, HandleKind::Ssd(_) | HandleKind::Fill { .. })
            && !h.stale.load(Ordering::Acquire)
            && let (Some(id), Some(nas)) = (h.identity, h.nas_file())
            && let Ok(st) = nix::sys::stat::fstat(nas)
            && self.cache.rule().identity(&st) != id
        {
            self.copy_went_stale(h);
        }
        // The file was written through the mount since this handle opened: its copy is not
        // the NAS file's content any more.
        if h.stale.load(Ordering::Acquire)
            && matches!(h.kind, HandleKind::Ssd(_) | HandleKind::Fill { .. })
            && let Some(nas) = h.nas_file()
        {
            let buf = read_at(nas, offset, size)?;
            Stats::add(&self.stats.bytes_from_nas, buf.len() as u64);
            return Ok(buf);
        }
        match &h.kind {
            HandleKind::Passthrough(_) => Err(Errno::EIO), // the kernel reads these itself
            HandleKind::Write(f) => {
                let buf = read_at(f, offset, size)?;
                Stats::add(&self.stats.bytes_from_nas, buf.len() as u64);
                Ok(buf)
            }
            HandleKind::Ssd(f) => match read_at(f, offset, size) {
                Ok(buf) => {
                    Stats::add(&self.stats.bytes_from_ssd, buf.len() as u64);
                    Ok(buf)
                }
                // The SSD failed under an open copy: the NAS still has the bytes.
                Err(e) => match h.nas_file() {
                    Some(nas) => {
                        tracing::warn!(error = ?e, "cache copy unreadable; reading the NAS");
                        self.copy_went_stale(h);
                        let buf = read_at(nas, offset, size)?;
                        Stats::add(&self.stats.bytes_from_nas, buf.len() as u64);
                        Ok(buf)
                    }
                    None => Err(e),
                },
            },
            HandleKind::Nas(f) => {
                let _fg = self.worker.foreground().enter();
                let buf = read_at(f, offset, size)?;
                Stats::add(&self.stats.bytes_from_nas, buf.len() as u64);
                Ok(buf)
            }
            HandleKind::Fill { cf, nas } => {
                let _fg = self.worker.foreground().enter();
                match cf.read(nas, offset, size) {
                    Ok((buf, fetched)) => {
                        self.note_loading(cf, buf.len() as u64);
                        if fetched > 0 {
                            self.stats
                                .category(category_of(cf.rel()), |c| c.bytes_fetched += fetched);
                        }
                        Stats::add(&self.stats.bytes_fetched, fetched);
                        Stats::add(&self.stats.bytes_from_nas, fetched.min(buf.len() as u64));
                        Stats::add(
                            &self.stats.bytes_from_ssd,
                            (buf.len() as u64).saturating_sub(fetched),
                        );
                        if fetched > 0 {
                            self.cache.mark_dirty(cf);
                        }
                        Ok(buf)
                    }
                    Err(FetchError::Nas(e)) => Err(e.into()),
                    Err(e) => {
                        if matches!(e, FetchError::Changed) {
                            Stats::add(&self.stats.stale_dropped, 1);
                            let _ = self.cache.discard(cf.rel());
                        }
                        // Serve what the NAS holds now.
                        let buf = read_at(nas, offset, size)?;
                        Stats::add(&self.stats.bytes_from_nas, buf.len() as u64);
                        Ok(buf)
                    }
                }
            }
        }
    }
}

impl Inner {
    /// The NAS file behind `h` changed: every handle reading its copy reads the NAS from now on,
    /// and the copy goes. Later opens start afresh.
    fn copy_went_stale(&self, h: &Handle) {
        h.stale.store(true, Ordering::Release);
        if let Some(node) = self.inodes.lock().get_mut(h.ino)
            && Arc::ptr_eq(&node.stale, &h.stale)
            && node.writers == 0
        {
            node.stale = Default::default();
        }
        Stats::add(&self.stats.stale_dropped, 1);
        if let Some(rel) = &h.cache_ref {
            tracing::info!(path = %rel.display(), "NAS file changed under an open handle; reading the NAS, dropping the copy");
            self.forget_copies(rel);
        }
    }

    /// Counts bytes read through a filling copy; once they pass the threshold the file is being
    /// loaded for real and the worker completes it (`workflow_only` discovery). A scanner that
    /// reads a header of each of many files stays below it and triggers no copy.
    fn note_loading(&self, cf: &Arc<CacheFile>, n: u64) {
        // Once queued, a read costs one atomic add and one load here.
        let total = cf.read_bytes.fetch_add(n, Ordering::Relaxed) + n;
        if !cf.queued.load(Ordering::Relaxed)
            && total >= loading_threshold(cf.identity().size)
            && self.live.settings().discovery == Discovery::WorkflowOnly
            && !cf.queued.swap(true, Ordering::AcqRel)
        {
            self.worker.enqueue(cf.rel(), Reason::Loaded);
        }
    }
}

/// Bytes read from a file past which it counts as loaded for real: min(64 MiB, 10 %) (DESIGN.md
/// §4). A model header (safetensors JSON ≤ 8 MiB on large files) stays below it.
pub fn loading_threshold(size: u64) -> u64 {
    (64 << 20).min(size / 10).max(1)
}

fn read_at(f: &File, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; size as usize];
    let n = pread_full(f, &mut buf, offset)?;
    buf.truncate(n);
    Ok(buf)
}

fn systime(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn file_type(kind: DirEntryKind) -> FileType {
    match kind {
        DirEntryKind::File => FileType::RegularFile,
        DirEntryKind::Dir => FileType::Directory,
        DirEntryKind::Symlink => FileType::Symlink,
        DirEntryKind::Other(libc::S_IFIFO) => FileType::NamedPipe,
        DirEntryKind::Other(libc::S_IFCHR) => FileType::CharDevice,
        DirEntryKind::Other(libc::S_IFBLK) => FileType::BlockDevice,
        DirEntryKind::Other(_) => FileType::Socket,
    }
}

fn child(parent: &Path, name: &OsStr) -> Result<PathBuf, Errno> {
    // The kernel never sends these, but the NAS path must never leave the root.
    if name.is_empty() || name == "." || name == ".." || name.as_encoded_bytes().contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    Ok(parent.join(name))
}

macro_rules! try_reply {
    ($reply:ident, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(err) => {
                let err: Errno = err.into();
                $reply.error(err);
                return;
            }
        }
    };
}

impl Filesystem for ArenaFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(MAX_READAHEAD);
        let _ = config.set_max_background(64);
        // Directory listings with attributes, when the kernel sees they will be used (a walk
        // that stats), plain ones otherwise (ComfyUI's scans only need d_type).
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        // O_TRUNC arrives with the open, so a truncating open is a writer's open (it waits for
        // readers of the SSD copy like any writer) instead of a read open plus a later setattr.
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        if self.opts.passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.passthrough_ok.store(true, Ordering::Relaxed);
        } else {
            self.passthrough_ok.store(false, Ordering::Relaxed);
            if self.opts.passthrough {
                tracing::warn!(
                    "the kernel does not offer FUSE passthrough; complete copies are served from user space"
                );
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let rel = try_reply!(reply, self.path(parent).and_then(|p| child(&p, name)));
        if self.offline() {
            let attr = try_reply!(reply, self.offline_attr(&rel));
            self.inodes.lock().remember(attr.ino.0, &rel);
            reply.entry(&self.opts.attr_ttl, &attr, Generation(0));
            return;
        }
        match self.nas.stat(&rel).inspect_err(|e| self.saw(e)) {
            Ok(st) => {
                let attr = self.attr(&st);
                self.inodes.lock().remember(attr.ino.0, &rel);
                reply.entry(&self.opts.attr_ttl, &attr, Generation(0));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // Negative entry: ComfyUI probes `unet/x` before `diffusion_models/x`.
                let mut attr = self.attr(&nix_zero_stat());
                attr.ino = INodeNo(0);
                reply.entry(&self.opts.attr_ttl, &attr, Generation(0));
            }
            Err(e) => reply.error(e.into()),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.lock().forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        // An open handle knows its file even after its name is gone (the kernel sends no
        // handle for `fstat`: any handle of the inode will do then).
        let handle = {
            let handles = self.handles.lock();
            match fh.and_then(|fh| handles.get(&fh.0)) {
                Some(h) => Some(h.clone()),
                None if self.inodes.lock().path(ino.0).is_none() => handles
                    .values()
                    .find(|h| h.ino == ino.0 && h.nas_file().is_some())
                    .cloned(),
                None => None,
            }
        };
        let by_handle =
            handle.and_then(|h| h.nas_file().and_then(|f| nix::sys::stat::fstat(f).ok()));
        let st = match by_handle {
            Some(st) => st,
            None => {
                let rel = try_reply!(reply, self.path(ino));
                if self.offline() {
                    let mut attr = try_reply!(reply, self.offline_attr(&rel));
                    attr.ino = ino;
                    reply.attr(&self.opts.attr_ttl, &attr);
                    return;
                }
                try_reply!(reply, self.nas.stat(&rel).inspect_err(|e| self.saw(e)))
            }
        };
        let mut attr = self.attr(&st);
        attr.ino = ino;
        reply.attr(&self.opts.attr_ttl, &attr);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let rel = try_reply!(reply, self.path(ino));
        if self.offline() {
            reply.error(Errno::EIO);
            return;
        }
        let target = try_reply!(reply, self.nas.readlink(&rel));
        reply.data(target.as_encoded_bytes());
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let rel = try_reply!(reply, self.path(ino));
        if self.offline() {
            if flags.acc_mode() == OpenAccMode::O_RDONLY && flags.0 & libc::O_TRUNC == 0 {
                self.open_offline(ino.0, &rel, reply);
            } else {
                reply.error(Errno::EIO);
            }
            return;
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            let caller = self.caller(req);
            let opened =
                self.open_writer(ino.0, &rel, flags.0, &caller, &|f| reply.open_backing(f));
            match opened {
                Ok(w) => {
                    let fh = FileHandle(w.fh);
                    match &w.backing {
                        Some(b) => reply.opened_passthrough(fh, FopenFlags::empty(), b),
                        None => reply.opened(fh, FopenFlags::empty()),
                    }
                }
                Err(e) => reply.error(e),
            }
            return;
        }
        if let Err(e) = self.open_file(ino.0, &rel, reply) {
            // `open_file` only fails before it replies.
            tracing::debug!(path = %rel.display(), error = ?e, "open failed");
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let h = try_reply!(reply, self.handle(fh));
        let started = std::time::Instant::now();
        let touches_nas = match &h.kind {
            HandleKind::Nas(_) | HandleKind::Write(_) => true,
            // Chunks already on the SSD need no trip through the NAS pool (offline, a partial
            // copy is not served at all).
            HandleKind::Fill { cf, .. } => {
                self.offline() || h.stale.load(Ordering::Relaxed) || !cf.has_range(offset, size)
            }
            HandleKind::Ssd(_) => h.stale.load(Ordering::Relaxed),
            HandleKind::Passthrough(_) => false,
        };
        let result = if touches_nas && self.offline() {
            Err(Errno::EIO)
        } else if touches_nas {
            let inner = self.0.clone();
            let handle = h.clone();
            let answer = self.nas_io.run(self.opts.nas_timeout, move || {
                inner.read_handle(&handle, offset, size)
            });
            answer.unwrap_or_else(|| {
                tracing::warn!(
                    timeout = ?self.opts.nas_timeout,
                    "a NAS read did not answer in time; failing it with EIO"
                );
                self.health.kick();
                Err(Errno::EIO)
            })
        } else {
            self.read_handle(&h, offset, size)
        };
        let latency = &self.stats.read_latency;
        match &h.kind {
            HandleKind::Ssd(_) => latency.ssd.observe(started.elapsed()),
            HandleKind::Fill { .. } => latency.fill.observe(started.elapsed()),
            HandleKind::Nas(_) | HandleKind::Write(_) => latency.nas.observe(started.elapsed()),
            HandleKind::Passthrough(_) => {}
        }
        match result {
            Ok(buf) => reply.data(&buf),
            Err(e) => {
                Stats::add(&self.stats.read_errors, 1);
                reply.error(e);
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let handle = self.handles.lock().remove(&fh.0);
        if let Some(h) = handle {
            if let HandleKind::Fill { cf, .. } = &h.kind {
                self.cache.mark_dirty(cf);
            }
            if let Some(rel) = &h.cache_ref {
                self.cache.close_ref(rel);
            }
            if h.writer
                && let Some(rel) = self.inodes.lock().path(h.ino)
            {
                // What readers may have cached while it was written is not the new content.
                self.forget_copies(&rel);
            }
            let mut inodes = self.inodes.lock();
            if let Some(node) = inodes.get_mut(h.ino) {
                if h.writer {
                    node.writers = node.writers.saturating_sub(1);
                    if node.writers == 0 {
                        node.stale = Default::default();
                    }
                }
                node.open = node.open.saturating_sub(1);
                if node.open == 0 {
                    node.mode = IoMode::Idle;
                    if node.nlookup == 0 {
                        inodes.forget(h.ino, 0);
                    }
                }
            }
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let rel = try_reply!(reply, self.path(ino));
        if self.offline() {
            let attr = try_reply!(reply, self.offline_attr(&rel));
            if attr.kind != FileType::Directory {
                reply.error(Errno::ENOTDIR);
                return;
            }
            let fh = self.new_fh();
            self.dirs.lock().insert(
                fh,
                Arc::new(DirHandle {
                    rel,
                    listing: Mutex::new(None),
                }),
            );
            reply.opened(FileHandle(fh), FopenFlags::empty());
            return;
        }
        let st = try_reply!(reply, self.nas.stat(&rel).inspect_err(|e| self.saw(e)));
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            reply.error(Errno::ENOTDIR);
            return;
        }
        // The kernel may keep its cached listing while the directory's mtime is unchanged
        // (every create, unlink and rename in it changes the mtime). The NAS is listed only
        // when the kernel asks for entries.
        let mtime = (st.st_mtime, st.st_mtime_nsec);
        let keep = {
            let mut inodes = self.inodes.lock();
            let node = try_reply!(reply, inodes.get_mut(ino.0).ok_or(Errno::ESTALE));
            node.dir_mtime.replace(mtime) == Some(mtime)
        };
        let fh = self.new_fh();
        self.dirs.lock().insert(
            fh,
            Arc::new(DirHandle {
                rel,
                listing: Mutex::new(None),
            }),
        );
        let mut flags = FopenFlags::FOPEN_CACHE_DIR;
        if keep {
            flags |= FopenFlags::FOPEN_KEEP_CACHE;
        }
        reply.opened(FileHandle(fh), flags);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (_, entries) = try_reply!(reply, self.listing(fh));
        let dots = [
            (OsStr::new("."), FileType::Directory, ino.0),
            (OsStr::new(".."), FileType::Directory, ROOT_INO),
        ];
        let all = dots
            .into_iter()
            .chain(entries.iter().map(|(n, k, i)| (n.as_os_str(), *k, *i)));
        for (i, (name, kind, ino)) in all.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (dir, entries) = try_reply!(reply, self.listing(fh));
        let ttl = self.opts.attr_ttl;
        let offline = self.offline();
        if offset < 2 {
            // "." and "..": the kernel takes no lookup reference for them.
            let mut attr = if offline {
                try_reply!(reply, self.offline_attr(&dir))
            } else {
                self.attr(&try_reply!(reply, self.nas.stat(&dir)))
            };
            attr.ino = ino;
            for (i, name) in [".", ".."].into_iter().enumerate().skip(offset as usize) {
                if reply.add(attr.ino, i as u64 + 1, name, &ttl, &attr, Generation(0)) {
                    reply.ok();
                    return;
                }
            }
        }
        for (i, (name, _, _)) in entries
            .iter()
            .enumerate()
            .skip(offset.saturating_sub(2) as usize)
        {
            let rel = dir.join(name);
            let attr = if offline {
                match self.offline_attr(&rel) {
                    Ok(a) => a,
                    Err(_) => continue,
                }
            } else {
                let Ok(st) = self.nas.stat(&rel) else {
                    continue; // vanished since opendir
                };
                self.attr(&st)
            };
            // Every entry sent with attributes counts as a lookup.
            self.inodes.lock().remember(attr.ino.0, &rel);
            if reply.add(attr.ino, i as u64 + 3, name, &ttl, &attr, Generation(0)) {
                self.inodes.lock().forget(attr.ino.0, 1); // did not fit: not sent
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.lock().remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        if self.offline() {
            reply.error(Errno::EIO);
            return;
        }
        let s = try_reply!(reply, self.nas.statvfs());
        reply.statfs(
            s.blocks(),
            s.blocks_free(),
            s.blocks_available(),
            s.files(),
            s.files_free(),
            s.block_size() as u32,
            s.name_max() as u32,
            s.fragment_size() as u32,
        );
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let rel = try_reply!(reply, self.path(ino));
        let caller = self.caller(req);
        try_reply!(
            reply,
            self.as_caller(&caller, || self.nas.access(&rel, mask.bits()))
        );
        reply.ok();
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let caller = self.caller(req);
        let handle = fh.and_then(|fh| self.handles.lock().get(&fh.0).cloned());
        let attr = try_reply!(
            reply,
            self.do_setattr(&caller, ino.0, handle, mode, uid, gid, size, atime, mtime)
        );
        reply.attr(&self.opts.attr_ttl, &attr);
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let rel = try_reply!(reply, self.child_of(parent, name));
        let caller = self.caller(req);
        let attr = try_reply!(
            reply,
            self.do_make(&caller, &rel, || self.nas.mknod(&rel, mode, rdev as u64))
        );
        reply.entry(&self.opts.attr_ttl, &attr, Generation(0));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let rel = try_reply!(reply, self.child_of(parent, name));
        let caller = self.caller(req);
        let attr = try_reply!(
            reply,
            self.do_make(&caller, &rel, || self.nas.mkdir(&rel, mode & 0o7777))
        );
        reply.entry(&self.opts.attr_ttl, &attr, Generation(0));
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let rel = try_reply!(reply, self.child_of(parent, name));
        let caller = self.caller(req);
        try_reply!(reply, self.do_remove(&caller, &rel, false));
        reply.ok();
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let rel = try_reply!(reply, self.child_of(parent, name));
        let caller = self.caller(req);
        try_reply!(reply, self.do_remove(&caller, &rel, true));
        reply.ok();
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let rel = try_reply!(reply, self.child_of(parent, link_name));
        let caller = self.caller(req);
        let attr = try_reply!(
            reply,
            self.do_make(&caller, &rel, || self.nas.symlink(target, &rel))
        );
        reply.entry(&self.opts.attr_ttl, &attr, Generation(0));
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        let old = try_reply!(reply, self.child_of(parent, name));
        let new = try_reply!(reply, self.child_of(newparent, newname));
        let caller = self.caller(req);
        try_reply!(reply, self.do_rename(&caller, &old, &new, flags.bits()));
        reply.ok();
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let old = try_reply!(reply, self.path(ino));
        let new = try_reply!(reply, self.child_of(newparent, newname));
        let caller = self.caller(req);
        let attr = try_reply!(reply, self.do_link(&caller, &old, &new));
        reply.entry(&self.opts.attr_ttl, &attr, Generation(0));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let rel = try_reply!(reply, self.child_of(parent, name));
        let caller = self.caller(req);
        let made = self.do_create(&caller, &rel, mode, flags, &|f| reply.open_backing(f));
        let (attr, opened) = try_reply!(reply, made);
        let ttl = self.opts.attr_ttl;
        match &opened.backing {
            Some(b) => reply.created_passthrough(
                &ttl,
                &attr,
                Generation(0),
                FileHandle(opened.fh),
                FopenFlags::empty(),
                b,
            ),
            None => reply.created(
                &ttl,
                &attr,
                Generation(0),
                FileHandle(opened.fh),
                FopenFlags::empty(),
            ),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let h = try_reply!(reply, self.handle(fh));
        let n = try_reply!(reply, self.do_write(&h, offset, data));
        reply.written(n);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let h = try_reply!(reply, self.handle(fh));
        try_reply!(reply, self.do_fsync(&h, datasync));
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let h = try_reply!(reply, self.handle(fh));
        try_reply!(reply, self.do_fallocate(&h, offset, length, mode));
        reply.ok();
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let rel = try_reply!(reply, self.path(ino));
        let caller = self.caller(req);
        let answer = self.xattr_read(&caller, size, |buf| self.nas.getxattr(&rel, name, buf));
        answer.reply(reply);
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let rel = try_reply!(reply, self.path(ino));
        let caller = self.caller(req);
        let answer = self.xattr_read(&caller, size, |buf| self.nas.listxattr(&rel, buf));
        answer.reply(reply);
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let rel = try_reply!(reply, self.path(ino));
        let caller = self.caller(req);
        try_reply!(
            reply,
            self.as_caller(&caller, || self.nas.setxattr(&rel, name, value, flags))
        );
        reply.ok();
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let rel = try_reply!(reply, self.path(ino));
        let caller = self.caller(req);
        try_reply!(
            reply,
            self.as_caller(&caller, || self.nas.removexattr(&rel, name))
        );
        reply.ok();
    }
}

fn nix_zero_stat() -> FileStat {
    // SAFETY: `stat` is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}
