//! Write-through: every change made through the mount is made on the NAS, as the caller, and
//! returns the NAS's error codes. The cache follows: any change of a path drops its copy (and
//! its copy job) before the operation answers.
//!
//! Files opened for writing use kernel passthrough to the NAS file when the inode has no other
//! handle open (writes at the NAS's native speed); otherwise they are served in user space. The
//! passthrough registration is made as the caller, so the kernel writes as the caller too: the
//! NAS charges the caller's quota, and a write by someone else than the owner clears set-user-ID
//! and set-group-ID bits as it would on the NAS directly.
//!
//! One kernel rule shapes the rest ([`super::iomode`]): an inode with passthrough handles open
//! accepts only opens that use the same backing file. A write open while readers read the SSD
//! copy through passthrough therefore waits for those readers to close (model loads hold a file
//! for seconds), at most [`WRITER_WAIT`], and fails with `ETXTBSY` if they do not. The readers
//! see the old content whole; the copy is dropped the moment the writer gets the file. Once the
//! wait is over the writer holds a reservation on the inode, so no reader starts passthrough to
//! the copy between the writer's `O_TRUNC` and its handle (which would make the writer fail
//! after truncating the NAS file).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::stat::FileStat;

use super::creds::{self, Caller};
use super::iomode::{BackingFile, WriterPlan};
use super::{
    Attr, Entry, FsError, Handle, HandleKind, OpenMode, Opened, Register, SetAttr, SetTime, Vfs,
};
use crate::stats::Stats;

/// Open flags passed on to the NAS for a writer (the kernel handles `O_APPEND` offsets itself).
const PASSED_FLAGS: i32 = libc::O_ACCMODE | libc::O_TRUNC | libc::O_SYNC | libc::O_DSYNC;

/// How long a write open waits for readers of the SSD copy (through passthrough) to close.
pub const WRITER_WAIT: Duration = Duration::from_secs(10);

/// A time to set as a `utimensat` time.
fn timespec(t: Option<SetTime>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(SetTime::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(SetTime::At(t)) => {
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

impl Vfs {
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
        // A node never opened has no handle to tell.
        if let Some(o) = self.inodes.lock().get_mut(ino).and_then(|n| n.opened_mut()) {
            o.stale.store(true, Ordering::Release);
            if !o.io.writing() {
                o.stale = Default::default();
            }
        }
        self.forget_copies(rel);
    }

    /// An entry answer for `rel`, just made or linked, from its `stat`.
    fn entry_made(&self, rel: &Path, st: &FileStat) -> Attr {
        // A path that had a copy (removed and made again) must not find it.
        self.forget_copies(rel);
        let attr = self.attr_of(st);
        self.remember(&attr, rel);
        attr
    }

    /// Waits until no reader holds the SSD copy of `ino` through passthrough, then reserves the
    /// inode for a writer (see the module docs); `ETXTBSY` after [`WRITER_WAIT`]. No lock is
    /// held while it waits.
    fn reserve_writer(&self, ino: u64, rel: &Path, wait: bool) -> Result<(), FsError> {
        let reserve = || {
            self.inodes
                .lock()
                .get_mut(ino)
                .map(|n| n.opened().io.reserve_writer())
                .ok_or(FsError::Stale)
        };
        if reserve()? {
            return Ok(());
        }
        if wait {
            tracing::info!(path = %rel.display(), "write open waits for readers of the cache copy to close");
            let deadline = Instant::now() + WRITER_WAIT;
            while Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
                if reserve()? {
                    return Ok(());
                }
            }
        }
        tracing::warn!(
            path = %rel.display(),
            "readers kept the cache copy open; write open refused (ETXTBSY)"
        );
        Err(FsError::Busy)
    }

    /// Ends a writer's reservation that did not lead to a handle.
    fn cancel_writer(&self, ino: u64) {
        if let Some(n) = self.inodes.lock().get_mut(ino) {
            n.opened().io.cancel_writer();
        }
    }

    /// Opens `rel` (inode `ino`) for writing as `caller` and registers the handle.
    pub(super) fn open_writer(
        &self,
        ino: u64,
        rel: &Path,
        flags: i32,
        caller: &Caller,
        register: Register,
    ) -> Result<Opened, FsError> {
        // A running program's file is never truncated. (The kernel refuses write opens of it
        // itself, but checks an `O_RDONLY|O_TRUNC` open only after the file system truncated.)
        if flags & libc::O_TRUNC != 0
            && self
                .inodes
                .lock()
                .get_mut(ino)
                .is_some_and(|n| n.executing() > 0)
        {
            return Err(FsError::Busy);
        }
        // Before the NAS open: an O_TRUNC must not happen if the wait ends in ETXTBSY.
        self.reserve_writer(ino, rel, true)?;
        let nas_rel = rel.to_path_buf();
        let opened = self.nas_as(caller, move |nas| {
            let f = nas.open_with(&nas_rel, flags & PASSED_FLAGS & !libc::O_CREAT, 0)?;
            let st = nix::sys::stat::fstat(&f)?;
            Ok((f, st))
        });
        let (file, st) = match opened {
            Ok(v) => v,
            Err(e) => {
                self.cancel_writer(ino);
                return Err(e);
            }
        };
        self.writer_handle(
            ino,
            rel,
            file,
            &st,
            flags & libc::O_ACCMODE,
            caller,
            register,
        )
    }

    /// Registers `file`, just opened for writing, as a handle of reserved inode `ino`.
    #[allow(clippy::too_many_arguments)]
    fn writer_handle(
        &self,
        ino: u64,
        rel: &Path,
        file: File,
        st: &FileStat,
        acc: i32,
        caller: &Caller,
        register: Register,
    ) -> Result<Opened, FsError> {
        self.content_changed(ino, rel);
        Stats::add(&self.stats.opens_write, 1);
        let passthrough = self.passthrough_ok.load(Ordering::Relaxed);
        let write_only = acc == libc::O_WRONLY;
        // Later readers share a writer's backing file: it is opened for reading too when the
        // caller may read it (asked before the inode is locked: it is a NAS call).
        let mut readable = (acc == libc::O_RDWR)
            .then(|| file.try_clone().ok())
            .flatten();
        if readable.is_none() && passthrough && self.inode_idle(ino) {
            let nas_rel = rel.to_path_buf();
            readable = self
                .nas_as(caller, move |nas| nas.open_with(&nas_rel, libc::O_RDWR, 0))
                .ok();
        }
        let mut inodes = self.inodes.lock();
        let Some(node) = inodes.get_mut(ino) else {
            return Err(FsError::Stale);
        };
        let stale = node.opened().stale.clone();
        let (kind, mode) = match node.opened().io.plan_writer(write_only, passthrough) {
            WriterPlan::Share(b) => {
                node.opened().io.joined_shared();
                (
                    HandleKind::Passthrough {
                        backing: b.clone(),
                        copy: false,
                    },
                    OpenMode::Passthrough(b),
                )
            }
            WriterPlan::Refuse => {
                node.opened().io.cancel_writer();
                drop(inodes);
                tracing::warn!(path = %rel.display(), "file busy in another I/O mode; refusing the write open");
                return Err(FsError::Busy);
            }
            WriterPlan::StartNasPassthrough => {
                let bfile = readable.as_ref().unwrap_or(&file);
                // As the caller: the kernel writes through the backing file with the
                // credentials it was registered with.
                let registered = creds::switch(caller)
                    .map_err(FsError::Identity)
                    .and_then(|_as_caller| register(bfile).map_err(FsError::Io));
                match registered {
                    Ok(b) => {
                        let b = Arc::new(b);
                        node.opened().io.joined_passthrough(
                            &b,
                            BackingFile::Nas {
                                readable: readable.is_some(),
                            },
                        );
                        (
                            HandleKind::Passthrough {
                                backing: b.clone(),
                                copy: false,
                            },
                            OpenMode::Passthrough(b),
                        )
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "no passthrough for a writer");
                        node.opened().io.joined_daemon();
                        (HandleKind::Write, OpenMode::Daemon { keep_cache: false })
                    }
                }
            }
            WriterPlan::Daemon => {
                node.opened().io.joined_daemon();
                (HandleKind::Write, OpenMode::Daemon { keep_cache: false })
            }
        };
        drop(inodes);
        let fh = self.new_fh();
        self.handles.lock().insert(
            fh,
            Arc::new(Handle {
                ino,
                kind,
                nas: Some(file),
                cache_ref: None,
                stale,
                writer: true,
                exec: false,
                identity: None,
                attr: self.attr_of(st),
            }),
        );
        Ok(Opened { fh, mode })
    }

    /// Whether no handle of `ino` is open.
    fn inode_idle(&self, ino: u64) -> bool {
        self.inodes
            .lock()
            .get_mut(ino)
            .is_some_and(|n| n.open_count() == 0)
    }

    /// `create`: makes the file on the NAS as the caller and opens it for writing.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: &Caller,
        register: Register,
    ) -> Result<(Attr, Opened), FsError> {
        let rel = self.child_of(parent, name)?;
        let open_flags = (flags & (PASSED_FLAGS | libc::O_EXCL)) | libc::O_CREAT;
        let nas_rel = rel.clone();
        let (file, st) = self.nas_as(caller, move |nas| {
            let f = nas.open_with(&nas_rel, open_flags, mode & 0o7777)?;
            let st = nix::sys::stat::fstat(&f)?;
            Ok((f, st))
        })?;
        let attr = self.attr_of(&st);
        self.remember(&attr, &rel);
        if let Err(e) = self.reserve_writer(attr.ino, &rel, false) {
            self.forget(attr.ino, 1);
            return Err(e);
        }
        let opened = self.writer_handle(
            attr.ino,
            &rel,
            file,
            &st,
            flags & libc::O_ACCMODE,
            caller,
            register,
        );
        if opened.is_err() {
            self.forget(attr.ino, 1);
        }
        Ok((attr, opened?))
    }

    /// `mkdir` as the caller.
    pub fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        caller: &Caller,
    ) -> Result<Entry, FsError> {
        self.make(parent, name, caller, move |nas, rel| {
            nas.mkdir(rel, mode & 0o7777)
        })
    }

    /// `mknod` (FIFOs, sockets, devices) as the caller.
    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        caller: &Caller,
    ) -> Result<Entry, FsError> {
        self.make(parent, name, caller, move |nas, rel| {
            nas.mknod(rel, mode, rdev as u64)
        })
    }

    /// `symlink` as the caller.
    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &Path,
        caller: &Caller,
    ) -> Result<Entry, FsError> {
        let target = target.to_path_buf();
        self.make(parent, name, caller, move |nas, rel| {
            nas.symlink(&target, rel)
        })
    }

    /// Makes `name` in `parent` with `make`, as the caller, and answers its entry.
    fn make(
        &self,
        parent: u64,
        name: &OsStr,
        caller: &Caller,
        make: impl FnOnce(&crate::source::Nas, &Path) -> io::Result<()> + Send + 'static,
    ) -> Result<Entry, FsError> {
        let rel = self.child_of(parent, name)?;
        let nas_rel = rel.clone();
        let st = self.nas_as(caller, move |nas| {
            make(nas, &nas_rel)?;
            nas.stat(&nas_rel)
        })?;
        Ok(Entry::Found(self.entry_made(&rel, &st)))
    }

    /// `unlink` (`dir`: `rmdir`) as the caller.
    pub fn remove(
        &self,
        parent: u64,
        name: &OsStr,
        dir: bool,
        caller: &Caller,
    ) -> Result<(), FsError> {
        let rel = self.child_of(parent, name)?;
        let nas_rel = rel.clone();
        let st = self.nas_as(caller, move |nas| {
            let st = nas.stat(&nas_rel).ok();
            if dir {
                nas.rmdir(&nas_rel)?;
            } else {
                nas.unlink(&nas_rel)?;
            }
            Ok(st)
        })?;
        self.forget_copies(&rel);
        if let Some(st) = st {
            self.inodes.lock().unlinked(self.ino_of(&st), &rel);
        }
        Ok(())
    }

    /// `rename` with its flags (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`) as the caller.
    #[allow(clippy::too_many_arguments)]
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        caller: &Caller,
    ) -> Result<(), FsError> {
        let old = self.child_of(parent, name)?;
        let new = self.child_of(newparent, newname)?;
        let (o, n) = (old.clone(), new.clone());
        let replaced = self.nas_as(caller, move |nas| {
            let replaced = nas.stat(&n).ok();
            nas.rename(&o, &n, flags)?;
            Ok(replaced)
        })?;
        // Neither name may serve a copy made under the other.
        self.forget_copies(&old);
        self.forget_copies(&new);
        let mut inodes = self.inodes.lock();
        if flags & libc::RENAME_EXCHANGE != 0 {
            // An absolute path never names a NAS entry: a safe parking place for the swap.
            let park = PathBuf::from("/arenafs-rename-exchange");
            inodes.renamed(&old, &park);
            inodes.renamed(&new, &old);
            inodes.renamed(&park, &new);
        } else {
            if let Some(st) = replaced {
                inodes.unlinked(self.ino_of(&st), &new);
            }
            inodes.renamed(&old, &new);
        }
        Ok(())
    }

    /// `link` as the caller.
    pub fn link(
        &self,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
        caller: &Caller,
    ) -> Result<Entry, FsError> {
        let old = self.path(ino)?;
        let new = self.child_of(newparent, newname)?;
        let n = new.clone();
        let st = self.nas_as(caller, move |nas| {
            nas.link(&old, &n)?;
            nas.stat(&n)
        })?;
        Ok(Entry::Found(self.entry_made(&new, &st)))
    }

    /// `setattr`: mode, owner, size and times, each as the caller; then the new attributes.
    pub fn setattr(&self, ino: u64, set: SetAttr, caller: &Caller) -> Result<Attr, FsError> {
        let handle = match set.fh {
            Some(fh) => self.handles.lock().get(&fh).cloned(),
            None => None,
        };
        // A file whose name is gone is changed through its handle.
        let rel = self.inodes.lock().path(ino);
        if rel.is_none() && handle.as_ref().is_none_or(|h| h.nas.is_none()) {
            return Err(FsError::NotFound);
        }
        // New content under readers of the SSD copy: they must close first (module docs).
        let reserved = set.size.is_some();
        if reserved {
            let shown = rel.clone().unwrap_or_default();
            self.reserve_writer(ino, &shown, true)?;
        }
        let (path, h) = (rel.clone(), handle.clone());
        let changed = self.nas_as(caller, move |nas| {
            let fd = h.as_ref().and_then(|h| h.nas.as_ref());
            let by_path = |rel: &Path| -> io::Result<()> {
                if let Some(m) = set.mode {
                    nas.chmod(rel, m & 0o7777)?;
                }
                if set.uid.is_some() || set.gid.is_some() {
                    nas.chown(
                        rel,
                        set.uid.unwrap_or(u32::MAX),
                        set.gid.unwrap_or(u32::MAX),
                    )?;
                }
                Ok(())
            };
            match (&path, fd) {
                (Some(rel), _) => by_path(rel)?,
                (None, Some(f)) => {
                    if let Some(m) = set.mode {
                        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(
                            m & 0o7777,
                        ))?;
                    }
                    if set.uid.is_some() || set.gid.is_some() {
                        let (u, g) = (set.uid.unwrap_or(u32::MAX), set.gid.unwrap_or(u32::MAX));
                        // SAFETY: a valid fd.
                        if unsafe { libc::fchown(f.as_raw_fd(), u, g) } != 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                }
                (None, None) => return Err(io::Error::from_raw_os_error(libc::ENOENT)),
            }
            if let Some(len) = set.size {
                // Through the handle when it was opened for writing (its permission was
                // checked at open), else by opening the file for writing.
                let writable = h.as_ref().filter(|h| h.writer).and_then(|h| h.nas.as_ref());
                match (writable, &path, fd) {
                    (Some(f), _, _) => f.set_len(len)?,
                    (None, Some(rel), _) => nas.open_with(rel, libc::O_WRONLY, 0)?.set_len(len)?,
                    (None, None, Some(f)) => f.set_len(len)?,
                    (None, None, None) => unreachable!("checked above"),
                }
            }
            if set.atime.is_some() || set.mtime.is_some() {
                let times = [timespec(set.atime), timespec(set.mtime)];
                match (&path, fd) {
                    (Some(rel), _) => nas.utimens(rel, &times)?,
                    // SAFETY: a valid fd and a two-element array.
                    (None, Some(f)) => {
                        if unsafe { libc::futimens(f.as_raw_fd(), times.as_ptr()) } != 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    (None, None) => unreachable!("checked above"),
                }
            }
            match (fd, &path) {
                (Some(f), _) => nix::sys::stat::fstat(f).map_err(io::Error::from),
                (None, Some(rel)) => nas.stat(rel),
                (None, None) => unreachable!("checked above"),
            }
        });
        if reserved {
            self.cancel_writer(ino);
        }
        let st = changed?;
        if (set.size.is_some() || set.mtime.is_some())
            && let Some(rel) = &rel
        {
            self.content_changed(ino, rel);
        }
        if set.size.is_none() {
            // Same bytes, new metadata: readers of the SSD copy may keep sharing it.
            let now = self.cache.rule().identity(&st);
            if let Some(node) = self.inodes.lock().get_mut(ino) {
                node.opened().io.rehold(now);
            }
        }
        let mut attr = self.attr_of(&st);
        attr.ino = ino;
        Ok(attr)
    }

    /// `write` on a handle served in user space. `kill_suidgid`: the kernel asks that the write
    /// clear set-user-ID and set-group-ID bits (a write by someone else than the owner), which
    /// the NAS does when the write is made as that caller.
    pub fn write(
        &self,
        fh: u64,
        offset: u64,
        data: &[u8],
        kill_suidgid: Option<&Caller>,
    ) -> Result<u32, FsError> {
        let h = self.handle(fh)?;
        if !matches!(h.kind, HandleKind::Write) {
            return Err(FsError::WrongHandle);
        }
        let len = data.len();
        let data = data.to_vec();
        let write = move |hh: &Handle| hh.nas.as_ref().unwrap().write_all_at(&data, offset);
        match kill_suidgid {
            Some(caller) => self.nas_as(caller, move |_| write(&h))?,
            None => self.nas(move |_| Ok(write(&h)?))?,
        }
        Stats::add(&self.stats.bytes_written, len as u64);
        Ok(len as u32)
    }

    /// `fsync` / `fdatasync` of a writer's NAS file.
    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<(), FsError> {
        let h = self.handle(fh)?;
        if !h.writer || h.nas.is_none() {
            return Ok(());
        }
        self.nas(move |_| {
            let f = h.nas.as_ref().unwrap();
            Ok(if datasync {
                f.sync_data()
            } else {
                f.sync_all()
            }?)
        })
    }

    /// `fallocate` on a writer's NAS file.
    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<(), FsError> {
        let h = self.handle(fh)?;
        if !h.writer || h.nas.is_none() {
            return Err(FsError::WrongHandle);
        }
        self.nas(move |_| {
            let f = h.nas.as_ref().unwrap();
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
                return Err(FsError::Io(io::Error::last_os_error()));
            }
            Ok(())
        })
    }
}
