//! A NAS of the tests' own: a FUSE file system over a plain directory (what `bindfs` does),
//! served by threads of the test process, that can be told to
//! - **hang**: every request waits until it is told to go on, as on a hard NFS mount whose
//!   server stopped answering (the kernel keeps the callers in `D` state, and a signal does not
//!   end them);
//! - **fail `flush`** with an errno, as NFS and SMB report `EDQUOT`/`ENOSPC` at `close(2)`.
//!
//! It is a test harness standing in for a remote file system this kernel cannot mount here, not
//! a mock of arenafs: arenafs runs unchanged on top of it, through the kernel.

#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::{Condvar, Mutex};

/// How long the kernel may cache what the NAS says (short: the tests change the NAS often).
const TTL: Duration = Duration::from_millis(100);

/// A gate requests wait at while it is closed.
#[derive(Default)]
struct Gate {
    closed: Mutex<bool>,
    opened: Condvar,
    /// Requests waiting at it.
    waiting: AtomicUsize,
}

impl Gate {
    fn pass(&self) {
        let mut closed = self.closed.lock();
        if *closed {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            while *closed {
                self.opened.wait(&mut closed);
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn set(&self, closed: bool) {
        *self.closed.lock() = closed;
        if !closed {
            self.opened.notify_all();
        }
    }
}

/// What the tests steer.
#[derive(Default)]
struct Control {
    /// Every request waits here (a hung NAS).
    all: Gate,
    /// Truncations (an open with `O_TRUNC`, a `setattr` of the size) wait here.
    truncates: Gate,
    /// Errno `flush` fails with (0: none).
    flush_errno: AtomicI32,
    /// `fsyncdir` requests answered.
    dir_syncs: AtomicUsize,
}

impl Control {
    /// Waits while the NAS hangs.
    fn gate(&self) {
        self.all.pass();
    }
}

struct Fs {
    root: PathBuf,
    control: Arc<Control>,
    /// Inode → path below `root` (the backing directory's inode numbers; the root is 1).
    paths: Mutex<HashMap<u64, PathBuf>>,
    files: Mutex<HashMap<u64, Arc<File>>>,
    next_fh: AtomicUsize,
}

fn err(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs())
    }
}

fn kind(md: &fs::Metadata) -> FileType {
    let t = md.file_type();
    if t.is_dir() {
        FileType::Directory
    } else if t.is_symlink() {
        FileType::Symlink
    } else {
        FileType::RegularFile
    }
}

impl Fs {
    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.paths.lock().get(&ino.0).cloned().ok_or(Errno::ESTALE)
    }

    fn ino(&self, md: &fs::Metadata, path: &Path) -> u64 {
        let ino = if path == self.root { 1 } else { md.ino() };
        self.paths.lock().insert(ino, path.to_path_buf());
        ino
    }

    fn attr(&self, md: &fs::Metadata, path: &Path) -> FileAttr {
        FileAttr {
            ino: INodeNo(self.ino(md, path)),
            size: md.size(),
            blocks: md.blocks(),
            atime: time(md.atime(), md.atime_nsec()),
            mtime: time(md.mtime(), md.mtime_nsec()),
            ctime: time(md.ctime(), md.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind: kind(md),
            perm: (md.mode() & 0o7777) as u16,
            nlink: md.nlink() as u32,
            uid: md.uid(),
            gid: md.gid(),
            rdev: md.rdev() as u32,
            blksize: 4096,
            flags: 0,
        }
    }

    fn stat(&self, path: &Path) -> Result<FileAttr, Errno> {
        let md = fs::symlink_metadata(path).map_err(err)?;
        Ok(self.attr(&md, path))
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        self.files.lock().get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn keep(&self, f: File) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed) as u64 + 1;
        self.files.lock().insert(fh, Arc::new(f));
        fh
    }
}

macro_rules! tryr {
    ($reply:ident, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => {
                $reply.error(e);
                return;
            }
        }
    };
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.control.gate();
        let p = tryr!(reply, self.path(parent)).join(name);
        let attr = tryr!(reply, self.stat(&p));
        reply.entry(&TTL, &attr, Generation(0));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.control.gate();
        let p = tryr!(reply, self.path(ino));
        let attr = tryr!(reply, self.stat(&p));
        reply.attr(&TTL, &attr);
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.control.gate();
        if size.is_some() {
            self.control.truncates.pass();
        }
        let p = tryr!(reply, self.path(ino));
        if let Some(m) = mode {
            tryr!(
                reply,
                fs::set_permissions(&p, fs::Permissions::from_mode(m)).map_err(err)
            );
        }
        if uid.is_some() || gid.is_some() {
            tryr!(reply, std::os::unix::fs::lchown(&p, uid, gid).map_err(err));
        }
        if let Some(len) = size {
            let f = tryr!(reply, OpenOptions::new().write(true).open(&p).map_err(err));
            tryr!(reply, f.set_len(len).map_err(err));
        }
        if let Some(t) = mtime {
            let t = match t {
                TimeOrNow::Now => SystemTime::now(),
                TimeOrNow::SpecificTime(t) => t,
            };
            let f = tryr!(reply, File::open(&p).map_err(err));
            tryr!(reply, f.set_modified(t).map_err(err));
        }
        let attr = tryr!(reply, self.stat(&p));
        reply.attr(&TTL, &attr);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.control.gate();
        let p = tryr!(reply, self.path(ino));
        let t = tryr!(reply, fs::read_link(&p).map_err(err));
        reply.data(t.as_os_str().as_encoded_bytes());
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.control.gate();
        let p = tryr!(reply, self.path(parent)).join(name);
        tryr!(reply, fs::create_dir(&p).map_err(err));
        tryr!(
            reply,
            fs::set_permissions(&p, fs::Permissions::from_mode(mode & 0o7777)).map_err(err)
        );
        let attr = tryr!(reply, self.stat(&p));
        reply.entry(&TTL, &attr, Generation(0));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.control.gate();
        let p = tryr!(reply, self.path(parent)).join(name);
        tryr!(reply, fs::remove_file(&p).map_err(err));
        reply.ok();
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.control.gate();
        let p = tryr!(reply, self.path(parent)).join(name);
        tryr!(reply, fs::remove_dir(&p).map_err(err));
        reply.ok();
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.control.gate();
        let from = tryr!(reply, self.path(parent)).join(name);
        let to = tryr!(reply, self.path(newparent)).join(newname);
        tryr!(reply, fs::rename(&from, &to).map_err(err));
        reply.ok();
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.control.gate();
        if flags.0 & libc::O_TRUNC != 0 {
            self.control.truncates.pass();
        }
        let p = tryr!(reply, self.path(ino));
        let acc = flags.0 & libc::O_ACCMODE;
        let f = OpenOptions::new()
            .read(acc != libc::O_WRONLY)
            .write(acc != libc::O_RDONLY)
            .custom_flags(flags.0 & libc::O_TRUNC)
            .open(&p);
        let f = tryr!(reply, f.map_err(err));
        reply.opened(FileHandle(self.keep(f)), FopenFlags::empty());
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.control.gate();
        let p = tryr!(reply, self.path(parent)).join(name);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(flags & libc::O_TRUNC != 0)
            .mode(mode & 0o7777)
            .open(&p);
        let f = tryr!(reply, f.map_err(err));
        let attr = tryr!(reply, self.stat(&p));
        let fh = FileHandle(self.keep(f));
        reply.created(&TTL, &attr, Generation(0), fh, FopenFlags::empty());
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
        self.control.gate();
        let f = tryr!(reply, self.file(fh));
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) => {
                    reply.error(err(e));
                    return;
                }
            }
        }
        reply.data(&buf[..done]);
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
        self.control.gate();
        let f = tryr!(reply, self.file(fh));
        tryr!(reply, f.write_all_at(data, offset).map_err(err));
        reply.written(data.len() as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.control.gate();
        match self.control.flush_errno.load(Ordering::SeqCst) {
            0 => reply.ok(),
            e => reply.error(Errno::from_i32(e)),
        }
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
        self.control.gate();
        self.files.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.control.gate();
        let f = tryr!(reply, self.file(fh));
        tryr!(reply, f.sync_all().map_err(err));
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.control.gate();
        tryr!(reply, self.path(ino));
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.control.gate();
        let p = tryr!(reply, self.path(ino));
        let mut entries: Vec<(OsString, FileType, u64)> = vec![
            (".".into(), FileType::Directory, ino.0),
            ("..".into(), FileType::Directory, 1),
        ];
        let list = tryr!(reply, fs::read_dir(&p).map_err(err));
        for e in list.flatten() {
            let Ok(md) = e.metadata() else { continue };
            let ino = self.ino(&md, &e.path());
            entries.push((e.file_name(), kind(&md), ino));
        }
        for (i, (name, kind, ino)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, &name) {
                break;
            }
        }
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
        self.control.gate();
        self.control.dir_syncs.fetch_add(1, Ordering::SeqCst);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.control.gate();
        let s = tryr!(
            reply,
            nix::sys::statvfs::statvfs(&self.root).map_err(|e| Errno::from_i32(e as i32))
        );
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
}

/// The NAS of a test, mounted at `dir`; unmounted (after it answers again) on drop.
pub struct FaultNas {
    pub dir: PathBuf,
    control: Arc<Control>,
    session: Option<fuser::BackgroundSession>,
}

impl FaultNas {
    /// Serves directory `backing` at `dir` (both must exist).
    pub fn mount(backing: &Path, dir: &Path) -> Self {
        let control = Arc::new(Control::default());
        let root = backing.canonicalize().unwrap();
        let fs = Fs {
            root: root.clone(),
            control: control.clone(),
            paths: Mutex::new(HashMap::from([(1, root)])),
            files: Mutex::new(HashMap::new()),
            next_fh: AtomicUsize::new(0),
        };
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![
            fuser::MountOption::FSName("faultnas".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        cfg.acl = fuser::SessionACL::All;
        cfg.n_threads = Some(16);
        let session = fuser::Session::new(fs, dir, &cfg)
            .and_then(fuser::Session::spawn)
            .expect("mount the test NAS");
        Self {
            dir: dir.to_path_buf(),
            control,
            session: Some(session),
        }
    }

    /// From now on every request waits (a hung NAS).
    pub fn hang(&self) {
        self.control.all.set(true);
    }

    /// Requests are answered again.
    pub fn resume(&self) {
        self.control.all.set(false);
    }

    /// Requests waiting because the NAS hangs.
    pub fn waiting(&self) -> usize {
        self.control.all.waiting.load(Ordering::SeqCst)
    }

    /// Truncations wait (`true`) or go on (`false`).
    pub fn hold_truncates(&self, hold: bool) {
        self.control.truncates.set(hold);
    }

    /// Truncations waiting.
    pub fn truncates_waiting(&self) -> usize {
        self.control.truncates.waiting.load(Ordering::SeqCst)
    }

    /// `fsyncdir` requests answered so far.
    pub fn dir_syncs(&self) -> usize {
        self.control.dir_syncs.load(Ordering::SeqCst)
    }

    /// `flush` (every `close(2)` of a descriptor) fails with `errno` (0: succeeds again).
    pub fn fail_flush(&self, errno: i32) {
        self.control.flush_errno.store(errno, Ordering::SeqCst);
    }
}

impl Drop for FaultNas {
    fn drop(&mut self) {
        self.resume();
        self.hold_truncates(false);
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        drop(self.session.take());
    }
}
