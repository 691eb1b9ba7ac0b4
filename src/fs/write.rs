//! Write-through: every change made through the mount is made on the NAS, as the caller, and
//! returns the NAS's error codes. The cache follows: any change of a path drops its copy (and
//! its copy job) before the operation answers.
//!
//! Files opened for writing use kernel passthrough to the NAS file when the inode has no other
//! handle open (writes at the NAS's native speed); otherwise they are served in user space.
//!
//! One kernel rule shapes the rest: an inode with passthrough handles open accepts only opens
//! that use the same backing file. A write open while readers read the SSD copy through
//! passthrough therefore waits for those readers to close (model loads hold a file for seconds),
//! at most [`WRITER_WAIT`], and fails with `ETXTBSY` if they do not. The readers see the old
//! content whole; the copy is dropped the moment the writer gets the file.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use fuser::{BackingId, Errno, FileAttr, Request, TimeOrNow};

use super::creds::{self, Caller};
use super::inodes::{IoMode, ino_for};
use super::{Handle, HandleKind, Inner};
use crate::stats::Stats;

/// Open flags passed on to the NAS for a writer (the kernel handles `O_APPEND` offsets itself).
const PASSED_FLAGS: i32 = libc::O_ACCMODE | libc::O_TRUNC | libc::O_SYNC | libc::O_DSYNC;

/// How long a write open waits for readers of the SSD copy (through passthrough) to close.
pub const WRITER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A handle opened for writing.
pub(super) struct Opened {
    pub fh: u64,
    pub backing: Option<Arc<BackingId>>,
}

fn errno(e: io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

/// `TimeOrNow` as a `utimensat` time.
pub(super) fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => {
            let (sec, nsec) = match t.duration_since(SystemTime::UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(e) => {
                    let d = e.duration();
                    let mut sec = -(d.as_secs() as i64);
                    let mut nsec = -(d.subsec_nanos() as i64);
                    if nsec < 0 {
                        sec -= 1;
                        nsec += 1_000_000_000;
                    }
                    (sec, nsec)
                }
            };
            libc::timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            }
        }
    }
}

impl Inner {
    /// Who a change is made as: the caller, or `write_as`.
    pub(super) fn caller(&self, req: &Request) -> Caller {
        match self.opts.write_as {
            Some((uid, gid)) => Caller::fixed(uid, gid),
            None => Caller::of(req.uid(), req.gid(), req.pid()),
        }
    }

    /// Runs a NAS operation as `caller`.
    pub(super) fn as_caller<T>(
        &self,
        caller: &Caller,
        f: impl FnOnce() -> io::Result<T>,
    ) -> Result<T, Errno> {
        // No change is attempted on a NAS that is gone (it could hang the caller).
        if self.offline() {
            return Err(Errno::EIO);
        }
        let _identity = creds::switch(caller).map_err(|e| {
            tracing::error!(error = %e, uid = caller.uid, "cannot act as the caller");
            Errno::EPERM
        })?;
        f().map_err(errno)
    }

    /// Drops the cache copies and copy jobs of `rel` and everything below it.
    pub(super) fn forget_copies(&self, rel: &Path) {
        self.worker.cancel_under(rel);
        let n = self.cache.discard_under(rel);
        if n > 0 {
            tracing::debug!(path = %rel.display(), copies = n, "path changed; cache copies dropped");
        }
    }

    /// The content of `ino` (at `rel`) changes: handles reading a copy switch to the NAS, and
    /// the copy goes.
    fn content_changed(&self, ino: u64, rel: &Path) {
        if let Some(node) = self.inodes.lock().get_mut(ino) {
            node.stale.store(true, Ordering::Release);
            if node.writers == 0 {
                node.stale = Default::default();
            }
        }
        self.forget_copies(rel);
    }

    /// Attributes of `rel` for an entry reply, remembering the inode.
    pub(super) fn entry_of(&self, rel: &Path) -> Result<FileAttr, Errno> {
        let st = self.nas.stat(rel).map_err(errno)?;
        let attr = self.attr(&st);
        self.inodes.lock().remember(attr.ino.0, rel);
        Ok(attr)
    }

    fn ino_of(&self, rel: &Path) -> Option<u64> {
        self.nas
            .stat(rel)
            .ok()
            .map(|st| ino_for(self.root_dev, self.root_ino, st.st_dev, st.st_ino))
    }

    /// Opens `rel` (inode `ino`) for writing as `caller` and registers the handle. `backing`
    /// registers a file for passthrough with the kernel.
    pub(super) fn open_writer(
        &self,
        ino: u64,
        rel: &Path,
        flags: i32,
        caller: &Caller,
        backing: &dyn Fn(&File) -> io::Result<BackingId>,
    ) -> Result<Opened, Errno> {
        let acc = flags & libc::O_ACCMODE;
        // Before the NAS open: an O_TRUNC must not happen if the wait ends in ETXTBSY.
        self.wait_for_copy_readers(ino, rel)?;
        let file = self.as_caller(caller, || {
            self.nas
                .open_with(rel, flags & PASSED_FLAGS & !libc::O_CREAT, 0)
        })?;
        self.writer_handle(ino, rel, file, acc, caller, backing)
    }

    /// Registers `file`, just opened for writing, as a handle of `ino`.
    pub(super) fn writer_handle(
        &self,
        ino: u64,
        rel: &Path,
        file: File,
        acc: i32,
        caller: &Caller,
        backing: &dyn Fn(&File) -> io::Result<BackingId>,
    ) -> Result<Opened, Errno> {
        self.wait_for_copy_readers(ino, rel)?;
        // From here on the copy is not the file's content.
        let stale = {
            let mut inodes = self.inodes.lock();
            let node = inodes.get_mut(ino).ok_or(Errno::ESTALE)?;
            node.writers += 1;
            node.stale.store(true, Ordering::Release);
            node.last_identity = None;
            node.stale.clone()
        };
        self.forget_copies(rel);
        Stats::add(&self.stats.opens_write, 1);
        let fh = self.new_fh();

        let mut inodes = self.inodes.lock();
        let Some(node) = inodes.get_mut(ino) else {
            return Err(Errno::ESTALE);
        };
        // Which backing file the handle shares through passthrough (`None`: user space).
        let backing_id = match (&node.mode, node.open > 0) {
            // Other handles already use the NAS file through passthrough: share it.
            (
                IoMode::Passthrough {
                    backing: b,
                    nas: true,
                    readable,
                    ..
                },
                true,
            ) if (acc == libc::O_WRONLY || *readable) && b.upgrade().is_some() => b.upgrade(),
            // A reader started passthrough to the SSD copy since the wait, or the NAS backing
            // file of other writers cannot serve this one: the kernel would refuse any other
            // mode.
            (IoMode::Passthrough { .. }, true) => {
                node.writers = node.writers.saturating_sub(1);
                drop(inodes);
                tracing::warn!(path = %rel.display(), "file busy in another I/O mode; refusing the write open");
                return Err(Errno::ETXTBSY);
            }
            // Handles in page-cache mode: the kernel writes through its page cache to us.
            (IoMode::Cached, true) => None,
            // First handle: passthrough to the NAS file if the kernel offers it.
            _ => {
                let shared = self.passthrough_ok.load(Ordering::Relaxed).then(|| {
                    // Later readers share the backing file: open it for reading too if allowed.
                    let reopened = (acc != libc::O_RDWR).then(|| {
                        self.as_caller(caller, || self.nas.open_with(rel, libc::O_RDWR, 0))
                    });
                    let readable = acc == libc::O_RDWR || matches!(reopened, Some(Ok(_)));
                    let bfile = match &reopened {
                        Some(Ok(f)) => f,
                        _ => &file,
                    };
                    backing(bfile)
                        .inspect_err(|e| tracing::debug!(error = %e, "no passthrough for a writer"))
                        .ok()
                        .map(|b| (Arc::new(b), readable))
                });
                match shared.flatten() {
                    Some((b, readable)) => {
                        node.mode = IoMode::Passthrough {
                            backing: Arc::downgrade(&b),
                            nas: true,
                            readable,
                            identity: None,
                        };
                        Some(b)
                    }
                    None => {
                        node.mode = IoMode::Cached;
                        None
                    }
                }
            }
        };
        node.open += 1;
        drop(inodes);
        let (kind, nas) = match &backing_id {
            Some(b) => (HandleKind::Passthrough(b.clone()), Some(file)),
            None => (HandleKind::Write(file), None),
        };
        self.insert_handle(
            fh,
            Handle {
                ino,
                kind,
                cache_ref: None,
                nas,
                stale,
                writer: true,
                identity: None,
            },
        );
        Ok(Opened {
            fh,
            backing: backing_id,
        })
    }

    /// Waits until no handle reads `ino` through passthrough to its SSD copy (see the module
    /// docs); `ETXTBSY` after [`WRITER_WAIT`].
    fn wait_for_copy_readers(&self, ino: u64, rel: &Path) -> Result<(), Errno> {
        let busy = || {
            self.inodes.lock().get_mut(ino).is_some_and(|n| {
                n.open > 0 && matches!(n.mode, IoMode::Passthrough { nas: false, .. })
            })
        };
        if !busy() {
            return Ok(());
        }
        tracing::info!(path = %rel.display(), "write open waits for readers of the cache copy to close");
        let deadline = std::time::Instant::now() + WRITER_WAIT;
        while busy() {
            if std::time::Instant::now() >= deadline {
                tracing::warn!(
                    path = %rel.display(),
                    "readers kept the cache copy open; write open refused (ETXTBSY)"
                );
                return Err(Errno::ETXTBSY);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(())
    }

    /// `create`: makes the file on the NAS as the caller and opens it for writing.
    pub(super) fn do_create(
        &self,
        caller: &Caller,
        rel: &Path,
        mode: u32,
        flags: i32,
        backing: &dyn Fn(&File) -> io::Result<BackingId>,
    ) -> Result<(FileAttr, Opened), Errno> {
        let acc = flags & libc::O_ACCMODE;
        let open_flags = (flags & (PASSED_FLAGS | libc::O_EXCL)) | libc::O_CREAT;
        let file = self.as_caller(caller, || {
            self.nas.open_with(rel, open_flags, mode & 0o7777)
        })?;
        let st = nix::sys::stat::fstat(&file).map_err(|e| Errno::from_i32(e as i32))?;
        let attr = self.attr(&st);
        self.inodes.lock().remember(attr.ino.0, rel);
        let opened = self.writer_handle(attr.ino.0, rel, file, acc, caller, backing)?;
        Ok((attr, opened))
    }

    /// `mkdir`, `mknod`, `symlink`: makes the entry as the caller and returns its attributes.
    pub(super) fn do_make(
        &self,
        caller: &Caller,
        rel: &Path,
        make: impl FnOnce() -> io::Result<()>,
    ) -> Result<FileAttr, Errno> {
        self.as_caller(caller, make)?;
        // A path that had a copy (removed and made again) must not find it.
        self.forget_copies(rel);
        self.entry_of(rel)
    }

    /// `unlink` / `rmdir`.
    pub(super) fn do_remove(&self, caller: &Caller, rel: &Path, dir: bool) -> Result<(), Errno> {
        let ino = self.ino_of(rel);
        self.as_caller(caller, || {
            if dir {
                self.nas.rmdir(rel)
            } else {
                self.nas.unlink(rel)
            }
        })?;
        self.forget_copies(rel);
        if let Some(ino) = ino {
            self.inodes.lock().unlinked(ino, rel);
        }
        Ok(())
    }

    /// `rename` with its flags (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
    pub(super) fn do_rename(
        &self,
        caller: &Caller,
        old: &Path,
        new: &Path,
        flags: u32,
    ) -> Result<(), Errno> {
        let replaced = self.ino_of(new);
        self.as_caller(caller, || self.nas.rename(old, new, flags))?;
        // Neither name may serve a copy made under the other.
        self.forget_copies(old);
        self.forget_copies(new);
        let mut inodes = self.inodes.lock();
        if flags & libc::RENAME_EXCHANGE != 0 {
            // An absolute path never names a NAS entry: a safe parking place for the swap.
            let park = PathBuf::from("/arenafs-rename-exchange");
            inodes.renamed(old, &park);
            inodes.renamed(new, old);
            inodes.renamed(&park, new);
        } else {
            if let Some(ino) = replaced {
                inodes.unlinked(ino, new);
            }
            inodes.renamed(old, new);
        }
        Ok(())
    }

    /// `link`.
    pub(super) fn do_link(
        &self,
        caller: &Caller,
        old: &Path,
        new: &Path,
    ) -> Result<FileAttr, Errno> {
        self.as_caller(caller, || self.nas.link(old, new))?;
        self.forget_copies(new);
        self.entry_of(new)
    }

    /// `setattr`: mode, owner, size and times, each as the caller; then the new attributes.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn do_setattr(
        &self,
        caller: &Caller,
        ino: u64,
        handle: Option<Arc<Handle>>,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> Result<FileAttr, Errno> {
        let fd = handle.as_ref().and_then(|h| h.nas_file());
        // A file whose name is gone is changed through its handle.
        let rel = self.inodes.lock().path(ino);
        // New content under readers of the SSD copy: they must close first (see the module docs).
        if size.is_some() {
            let shown = rel.clone().unwrap_or_default();
            self.wait_for_copy_readers(ino, &shown)?;
        }
        let target = match (&rel, fd) {
            (Some(rel), _) => Target::Path(rel),
            (None, Some(f)) => Target::Fd(f),
            (None, None) => return Err(Errno::ENOENT),
        };
        self.as_caller(caller, || {
            if let Some(m) = mode {
                match target {
                    Target::Path(rel) => self.nas.chmod(rel, m & 0o7777)?,
                    Target::Fd(f) => {
                        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(m & 0o7777))?
                    }
                }
            }
            if uid.is_some() || gid.is_some() {
                let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
                match target {
                    Target::Path(rel) => self.nas.chown(rel, u, g)?,
                    // SAFETY: a valid fd.
                    Target::Fd(f) => {
                        if unsafe { libc::fchown(f.as_raw_fd(), u, g) } != 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                }
            }
            if let Some(len) = size {
                // Through the handle when it was opened for writing (its permission was
                // checked at open), else by opening the file for writing.
                let writable = handle
                    .as_ref()
                    .filter(|h| h.writer)
                    .and_then(|h| h.nas_file());
                match (writable, target) {
                    (Some(f), _) => f.set_len(len)?,
                    (None, Target::Path(rel)) => {
                        self.nas.open_with(rel, libc::O_WRONLY, 0)?.set_len(len)?
                    }
                    (None, Target::Fd(f)) => f.set_len(len)?,
                }
            }
            if atime.is_some() || mtime.is_some() {
                let times = [timespec(atime), timespec(mtime)];
                match target {
                    Target::Path(rel) => self.nas.utimens(rel, &times)?,
                    // SAFETY: a valid fd and a two-element array.
                    Target::Fd(f) => {
                        if unsafe { libc::futimens(f.as_raw_fd(), times.as_ptr()) } != 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                }
            }
            Ok(())
        })?;
        if (size.is_some() || mtime.is_some())
            && let Some(rel) = &rel
        {
            self.content_changed(ino, rel);
        }
        let st = match (fd, &rel) {
            (Some(f), _) => nix::sys::stat::fstat(f).map_err(|e| Errno::from_i32(e as i32))?,
            (None, Some(rel)) => self.nas.stat(rel).map_err(errno)?,
            (None, None) => return Err(Errno::ENOENT),
        };
        if size.is_none() {
            // Same bytes, new metadata: readers of the SSD copy may keep sharing it.
            let now = self.cache.rule().identity(&st);
            if let Some(node) = self.inodes.lock().get_mut(ino)
                && let IoMode::Passthrough {
                    nas: false,
                    identity: held @ Some(_),
                    ..
                } = &mut node.mode
            {
                *held = Some(now);
            }
        }
        let mut attr = self.attr(&st);
        attr.ino = fuser::INodeNo(ino);
        Ok(attr)
    }

    /// `write` on a user-space writer handle.
    pub(super) fn do_write(&self, h: &Handle, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let HandleKind::Write(f) = &h.kind else {
            return Err(Errno::EBADF);
        };
        f.write_all_at(data, offset).map_err(errno)?;
        Stats::add(&self.stats.bytes_written, data.len() as u64);
        Ok(data.len() as u32)
    }

    /// `fsync` / `fdatasync` of a handle's NAS file.
    pub(super) fn do_fsync(&self, h: &Handle, datasync: bool) -> Result<(), Errno> {
        if !h.writer {
            return Ok(());
        }
        let Some(f) = h.nas_file() else {
            return Ok(());
        };
        if datasync {
            f.sync_data().map_err(errno)
        } else {
            f.sync_all().map_err(errno)
        }
    }

    /// `fallocate` on a writer's NAS file.
    pub(super) fn do_fallocate(
        &self,
        h: &Handle,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), Errno> {
        let f = h.nas_file().filter(|_| h.writer).ok_or(Errno::EBADF)?;
        // SAFETY: a valid fd.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                mode,
                offset as libc::off_t,
                length as libc::off_t,
            )
        };
        if r != 0 {
            return Err(errno(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// `getxattr` / `listxattr` answer: the size when `size` is 0, else the bytes.
    pub(super) fn xattr_read(
        &self,
        caller: &Caller,
        size: u32,
        read: impl Fn(&mut [u8]) -> io::Result<usize>,
    ) -> Result<XattrAnswer, Errno> {
        self.as_caller(caller, || {
            if size == 0 {
                return Ok(XattrAnswer::Size(read(&mut [])? as u32));
            }
            let mut buf = vec![0u8; size as usize];
            let n = read(&mut buf)?;
            buf.truncate(n);
            Ok(XattrAnswer::Data(buf))
        })
    }

    /// A name below a directory inode, refusing what the kernel never sends.
    pub(super) fn child_of(&self, parent: fuser::INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        let dir = self.path(parent)?;
        super::child(&dir, name)
    }
}

/// What a setattr works on.
#[derive(Clone, Copy)]
enum Target<'a> {
    Path(&'a Path),
    Fd(&'a File),
}

/// An answer to an xattr read.
pub(super) enum XattrAnswer {
    Size(u32),
    Data(Vec<u8>),
}

/// Sends an xattr read's answer (or error).
pub(super) trait ReplyXattrExt {
    fn reply(self, reply: fuser::ReplyXattr);
}

impl ReplyXattrExt for Result<XattrAnswer, Errno> {
    fn reply(self, reply: fuser::ReplyXattr) {
        match self {
            Ok(XattrAnswer::Size(n)) => reply.size(n),
            Ok(XattrAnswer::Data(d)) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }
}
