//! The FUSE adapter: unpacks each kernel request, calls the file-system core ([`crate::vfs`])
//! and replies. No file-system logic lives here: the core can be tested without the kernel, and
//! the mount tests prove the whole.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::vfs::{Attr, Entry, FsError, Kind, OpenMode, Opened, SetAttr, SetTime, Vfs, XattrReply};

/// Largest read the kernel sends when asked for big requests (`max_pages` = 256 pages).
pub const MAX_READAHEAD: u32 = 1 << 20;

/// The file system the kernel talks to: the core and the entry/attribute timeout.
pub struct ArenaFs {
    vfs: Arc<Vfs>,
    ttl: Duration,
}

impl ArenaFs {
    /// The adapter over a core.
    pub fn new(vfs: Arc<Vfs>) -> Self {
        let ttl = vfs.options().attr_ttl;
        Self { vfs, ttl }
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

/// Logs a failed request (expected misses at debug level) and turns it into its errno.
fn failed(op: &'static str, e: FsError) -> Errno {
    if e.is_expected() || matches!(e, FsError::Io(_)) {
        tracing::debug!(op, error = %e, "request failed");
    } else {
        tracing::info!(op, error = %e, "request failed");
    }
    errno(&e)
}

/// Replies with the error of a failed core call, or goes on with its value.
macro_rules! try_reply {
    ($reply:ident, $op:literal, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(err) => {
                $reply.error(failed($op, err));
                return;
            }
        }
    };
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::Socket => FileType::Socket,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: SystemTime::UNIX_EPOCH,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    })
}

fn reply_opened(reply: ReplyOpen, opened: Opened) {
    let fh = FileHandle(opened.fh);
    match &opened.mode {
        // FOPEN_KEEP_CACHE is not allowed with passthrough.
        OpenMode::Passthrough(b) => reply.opened_passthrough(fh, FopenFlags::empty(), b),
        OpenMode::Daemon { keep_cache } => {
            let flags = if *keep_cache {
                FopenFlags::FOPEN_KEEP_CACHE
            } else {
                FopenFlags::empty()
            };
            reply.opened(fh, flags)
        }
    }
}

impl ArenaFs {
    fn entry(&self, reply: ReplyEntry, entry: Entry) {
        match entry {
            Entry::Found(attr) => reply.entry(&self.ttl, &file_attr(&attr), Generation(0)),
            // Inode 0: a negative entry the kernel may cache for the entry timeout.
            Entry::Negative => {
                let attr = FileAttr {
                    ino: INodeNo(0),
                    size: 0,
                    blocks: 0,
                    atime: SystemTime::UNIX_EPOCH,
                    mtime: SystemTime::UNIX_EPOCH,
                    ctime: SystemTime::UNIX_EPOCH,
                    crtime: SystemTime::UNIX_EPOCH,
                    kind: FileType::RegularFile,
                    perm: 0,
                    nlink: 0,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    blksize: 0,
                    flags: 0,
                };
                reply.entry(&self.ttl, &attr, Generation(0))
            }
        }
    }

    fn caller(&self, req: &Request) -> crate::vfs::Caller {
        self.vfs.caller(req.uid(), req.gid(), req.pid())
    }
}

impl Filesystem for ArenaFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(MAX_READAHEAD);
        let _ = config.set_max_background(64);
        // Directory listings always come with attributes (stated on the NAS in batches): a walk
        // that stats each entry then needs no lookup per file. (With READDIRPLUS_AUTO the kernel
        // asks for attributes only with the first batch of a listing.)
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        // O_TRUNC arrives with the open, so a truncating open is a writer's open (it waits for
        // readers of the SSD copy like any writer) instead of a read open plus a later setattr.
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        // Lookups and listings of one directory run in parallel: one stuck on a hung NAS does
        // not hold the others (the kernel would otherwise serialise them on the directory).
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        // The kernel does not clear set-id bits itself (with a setattr as the writer, which
        // a non-owner may not make); writes made as the caller clear them on the NAS.
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        let wanted = self.vfs.options().passthrough;
        let ok = wanted
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        self.vfs.set_passthrough(ok);
        if wanted && !ok {
            tracing::warn!(
                "the kernel does not offer FUSE passthrough; complete copies are served from user space"
            );
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let entry = try_reply!(reply, "lookup", self.vfs.lookup(parent.0, name));
        self.entry(reply, entry);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.vfs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let attr = try_reply!(reply, "getattr", self.vfs.getattr(ino.0, fh.map(|f| f.0)));
        reply.attr(&self.ttl, &file_attr(&attr));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let target = try_reply!(reply, "readlink", self.vfs.readlink(ino.0));
        reply.data(&target);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let caller = self.caller(req);
        let register = |f: &std::fs::File| reply.open_backing(f);
        let opened = self.vfs.open(ino.0, flags.0, &caller, &register);
        let opened = try_reply!(reply, "open", opened);
        reply_opened(reply, opened);
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
        let buf = try_reply!(reply, "read", self.vfs.read(fh.0, offset, size));
        reply.data(&buf);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        try_reply!(reply, "flush", self.vfs.flush(fh.0));
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
        self.vfs.release(fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let d = try_reply!(reply, "opendir", self.vfs.opendir(ino.0));
        let mut flags = FopenFlags::FOPEN_CACHE_DIR;
        if d.keep_cache {
            flags |= FopenFlags::FOPEN_KEEP_CACHE;
        }
        reply.opened(FileHandle(d.fh), flags);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listed = self.vfs.readdir(ino.0, fh.0, offset, &mut |e| {
            reply.add(INodeNo(e.ino), e.next, file_type(e.kind), &e.name)
        });
        try_reply!(reply, "readdir", listed);
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
        let ttl = self.ttl;
        let listed = self.vfs.readdirplus(ino.0, fh.0, offset, &mut |e| {
            let attr = file_attr(&e.attr);
            reply.add(attr.ino, e.next, &e.name, &ttl, &attr, Generation(0))
        });
        try_reply!(reply, "readdirplus", listed);
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
        self.vfs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        try_reply!(reply, "fsyncdir", self.vfs.fsyncdir(fh.0));
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = try_reply!(reply, "statfs", self.vfs.statfs());
        reply.statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
        );
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let caller = self.caller(req);
        try_reply!(
            reply,
            "access",
            self.vfs.access(ino.0, mask.bits(), &caller)
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
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
            fh: fh.map(|f| f.0),
        };
        let attr = try_reply!(reply, "setattr", self.vfs.setattr(ino.0, set, &caller));
        reply.attr(&self.ttl, &file_attr(&attr));
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
        let caller = self.caller(req);
        let entry = try_reply!(
            reply,
            "mknod",
            self.vfs.mknod(parent.0, name, mode, rdev, &caller)
        );
        self.entry(reply, entry);
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
        let caller = self.caller(req);
        let entry = try_reply!(
            reply,
            "mkdir",
            self.vfs.mkdir(parent.0, name, mode, &caller)
        );
        self.entry(reply, entry);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let caller = self.caller(req);
        try_reply!(
            reply,
            "unlink",
            self.vfs.remove(parent.0, name, false, &caller)
        );
        reply.ok();
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let caller = self.caller(req);
        try_reply!(
            reply,
            "rmdir",
            self.vfs.remove(parent.0, name, true, &caller)
        );
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
        let caller = self.caller(req);
        let entry = try_reply!(
            reply,
            "symlink",
            self.vfs.symlink(parent.0, link_name, target, &caller)
        );
        self.entry(reply, entry);
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
        let caller = self.caller(req);
        try_reply!(
            reply,
            "rename",
            self.vfs
                .rename(parent.0, name, newparent.0, newname, flags.bits(), &caller)
        );
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
        let caller = self.caller(req);
        let entry = try_reply!(
            reply,
            "link",
            self.vfs.link(ino.0, newparent.0, newname, &caller)
        );
        self.entry(reply, entry);
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
        let caller = self.caller(req);
        let register = |f: &std::fs::File| reply.open_backing(f);
        let made = self
            .vfs
            .create(parent.0, name, mode, flags, &caller, &register);
        let (attr, opened) = try_reply!(reply, "create", made);
        let (ttl, attr, fh) = (self.ttl, file_attr(&attr), FileHandle(opened.fh));
        match &opened.mode {
            OpenMode::Passthrough(b) => {
                reply.created_passthrough(&ttl, &attr, Generation(0), fh, FopenFlags::empty(), b)
            }
            OpenMode::Daemon { .. } => {
                reply.created(&ttl, &attr, Generation(0), fh, FopenFlags::empty())
            }
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill = write_flags
            .contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            .then(|| self.caller(req));
        let n = try_reply!(
            reply,
            "write",
            self.vfs.write(fh.0, offset, data, kill.as_ref())
        );
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
        try_reply!(reply, "fsync", self.vfs.fsync(fh.0, datasync));
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
        try_reply!(
            reply,
            "fallocate",
            self.vfs.fallocate(fh.0, offset, length, mode)
        );
        reply.ok();
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let caller = self.caller(req);
        let answer = try_reply!(
            reply,
            "getxattr",
            self.vfs.getxattr(ino.0, name, size, &caller)
        );
        reply_xattr(reply, answer);
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let caller = self.caller(req);
        let answer = try_reply!(reply, "listxattr", self.vfs.listxattr(ino.0, size, &caller));
        reply_xattr(reply, answer);
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
        let caller = self.caller(req);
        try_reply!(
            reply,
            "setxattr",
            self.vfs.setxattr(ino.0, name, value, flags, &caller)
        );
        reply.ok();
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let caller = self.caller(req);
        try_reply!(
            reply,
            "removexattr",
            self.vfs.removexattr(ino.0, name, &caller)
        );
        reply.ok();
    }
}

fn reply_xattr(reply: ReplyXattr, answer: XattrReply) {
    match answer {
        XattrReply::Size(n) => reply.size(n),
        XattrReply::Data(d) => reply.data(&d),
    }
}
