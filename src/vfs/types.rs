//! What the file-system core answers: plain values, no kernel types (the adapter in
//! [`crate::fs`] turns them into replies).

use std::ffi::OsString;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::stat::FileStat;

use crate::source::DirEntryKind;

/// The type of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// FIFO.
    Fifo,
    /// Character device.
    CharDevice,
    /// Block device.
    BlockDevice,
    /// Unix socket.
    Socket,
}

impl Kind {
    /// From a directory entry's type.
    pub fn of_entry(kind: DirEntryKind) -> Self {
        match kind {
            DirEntryKind::File => Kind::File,
            DirEntryKind::Dir => Kind::Dir,
            DirEntryKind::Symlink => Kind::Symlink,
            DirEntryKind::Other(libc::S_IFIFO) => Kind::Fifo,
            DirEntryKind::Other(libc::S_IFCHR) => Kind::CharDevice,
            DirEntryKind::Other(libc::S_IFBLK) => Kind::BlockDevice,
            DirEntryKind::Other(_) => Kind::Socket,
        }
    }

    /// From an `st_mode`.
    pub fn of_mode(mode: u32) -> Self {
        Self::of_entry(DirEntryKind::from_mode(mode))
    }
}

/// Attributes of a file as the mount shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Inode number through the mount.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    /// Access time.
    pub atime: SystemTime,
    /// Modification time.
    pub mtime: SystemTime,
    /// Change time.
    pub ctime: SystemTime,
    /// File type.
    pub kind: Kind,
    /// Permission bits (with set-id and sticky bits).
    pub perm: u16,
    /// Hard links.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number (devices).
    pub rdev: u32,
    /// Preferred I/O size.
    pub blksize: u32,
}

impl Attr {
    /// The attributes of a NAS `stat`, shown as inode `ino`.
    pub fn of_stat(st: &FileStat, ino: u64) -> Self {
        Attr {
            ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: system_time(st.st_atime, st.st_atime_nsec),
            mtime: system_time(st.st_mtime, st.st_mtime_nsec),
            ctime: system_time(st.st_ctime, st.st_ctime_nsec),
            kind: Kind::of_mode(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
        }
    }
}

/// A time from seconds and nanoseconds since the epoch (negative seconds allowed).
pub fn system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

/// The answer to a lookup: the entry's attributes, or a negative entry (the name does not
/// exist; the kernel may remember that).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// The name exists (the kernel took a lookup reference on `attr.ino`).
    Found(Attr),
    /// The name does not exist.
    Negative,
}

/// How an opened file does its I/O.
#[derive(Debug)]
pub enum OpenMode {
    /// Kernel passthrough to this backing file: the daemon sees no reads or writes.
    Passthrough(Arc<fuser::BackingId>),
    /// Reads and writes come to the daemon through the page cache; `keep_cache`: the kernel may
    /// keep the pages it has of the inode (the file is unchanged since they were read).
    Daemon {
        /// `FOPEN_KEEP_CACHE`.
        keep_cache: bool,
    },
}

/// An open file handle.
#[derive(Debug)]
pub struct Opened {
    /// Handle number.
    pub fh: u64,
    /// Its I/O mode.
    pub mode: OpenMode,
}

/// An open directory handle.
#[derive(Clone, Copy, Debug)]
pub struct DirOpened {
    /// Handle number.
    pub fh: u64,
    /// The kernel may keep the listing it cached (the directory is unchanged).
    pub keep_cache: bool,
}

/// One entry of a directory listing.
#[derive(Clone, Debug)]
pub struct DirEntry {
    /// Name.
    pub name: OsString,
    /// Type.
    pub kind: Kind,
    /// Inode number.
    pub ino: u64,
    /// Offset of the next entry (what the kernel passes back to continue).
    pub next: u64,
}

/// One entry of a listing with attributes (`readdirplus`): the kernel takes a lookup reference
/// on each entry it is sent.
#[derive(Clone, Debug)]
pub struct DirEntryPlus {
    /// Name.
    pub name: OsString,
    /// Attributes.
    pub attr: Attr,
    /// Offset of the next entry.
    pub next: u64,
}

/// File-system statistics (of the NAS).
#[derive(Clone, Copy, Debug)]
pub struct StatFs {
    /// Blocks (of `frsize`).
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Blocks available to unprivileged users.
    pub bavail: u64,
    /// Inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Block size.
    pub bsize: u32,
    /// Longest name.
    pub namelen: u32,
    /// Fragment size.
    pub frsize: u32,
}

/// An answer to an xattr read: the size when asked with size 0, else the bytes.
#[derive(Debug)]
pub enum XattrReply {
    /// The size of the value or list.
    Size(u32),
    /// The value or list.
    Data(Vec<u8>),
}

/// A time to set.
#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    /// The current time.
    Now,
    /// This time.
    At(SystemTime),
}

/// What a `setattr` changes (`None`: unchanged).
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    /// Permission bits.
    pub mode: Option<u32>,
    /// Owner.
    pub uid: Option<u32>,
    /// Group.
    pub gid: Option<u32>,
    /// Size (truncate or extend).
    pub size: Option<u64>,
    /// Access time.
    pub atime: Option<SetTime>,
    /// Modification time.
    pub mtime: Option<SetTime>,
    /// The handle the change came through, if any.
    pub fh: Option<u64>,
}
