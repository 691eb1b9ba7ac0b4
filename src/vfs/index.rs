//! Answers from the cache index, for when the NAS does not answer (DESIGN.md §2.6): it is
//! offline (the health probe says so), or a call to it passed its deadline (a hung NFS server),
//! or every NAS thread is stuck. Complete copies are served as last-known-good — they matched
//! the NAS at their last check — with the identity, owner and mode recorded then; the
//! directories above them are listed from the index with their recorded owner and mode;
//! everything else fails with `EIO`. `-o offline_copies=0` refuses even the copies.
//!
//! These answers never give more access than the NAS did: write bits are cleared, and a file
//! or directory whose owner and mode were never recorded (an index written by an older version,
//! not seen on the NAS since) is shown as readable by root only.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::time::UNIX_EPOCH;

use super::inodes::{ROOT_INO, ino_for};
use super::types::system_time;
use super::{Attr, FsError, Kind, Vfs};
use crate::cache::{EntryRecord, Perms};
use crate::stats::Stats;

/// Mode of a file whose owner and mode were never recorded: root may read it, nobody else.
const UNKNOWN_FILE_MODE: u32 = libc::S_IFREG | 0o400;
/// Mode of such a directory: root may list and enter it, nobody else.
const UNKNOWN_DIR_MODE: u32 = libc::S_IFDIR | 0o500;

/// Errors that suggest the NAS itself is gone, not just one file: they trigger a health probe.
pub(super) fn nas_trouble(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EIO
                | libc::ENOTCONN
                | libc::ESTALE
                | libc::ETIMEDOUT
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::ECONNRESET
                | libc::ENODEV
        )
    )
}

/// One entry of a listing from the index: a complete copy, or a directory above one.
pub(super) struct Indexed {
    pub name: std::ffi::OsString,
    pub attr: Attr,
}

impl Vfs {
    /// The attributes of `rel` from the index: a complete copy, or a directory above one.
    /// Anything else: [`FsError::Offline`] (`EIO`).
    pub(super) fn index_attr(&self, rel: &Path) -> Result<Attr, FsError> {
        if !self.opts.offline_copies {
            return Err(FsError::Offline);
        }
        let store = self.cache.store();
        let attr = if rel.as_os_str().is_empty() {
            let mut a = self.indexed_dir(rel);
            a.ino = ROOT_INO;
            a
        } else if let Some(rec) = store.get(rel).filter(EntryRecord::is_complete) {
            self.indexed_file(rel, &rec)
        } else if store.complete_below(rel) {
            self.indexed_dir(rel)
        } else {
            return Err(FsError::Offline);
        };
        Stats::add(&self.stats.index_answers, 1);
        Ok(attr)
    }

    /// The complete copies and directories directly in `dir`, from the index.
    pub(super) fn index_listing(&self, dir: &Path) -> Result<Vec<Indexed>, FsError> {
        if !self.opts.offline_copies {
            return Err(FsError::Offline);
        }
        let children = self.cache.store().complete_children(dir);
        if children.is_empty() && !dir.as_os_str().is_empty() {
            return Err(FsError::Offline);
        }
        Stats::add(&self.stats.index_answers, 1);
        Ok(children
            .into_iter()
            .map(|(name, rec)| {
                let rel = dir.join(&name);
                let attr = match rec {
                    Some(rec) => self.indexed_file(&rel, &rec),
                    None => self.indexed_dir(&rel),
                };
                Indexed { name, attr }
            })
            .collect())
    }

    fn indexed_file(&self, rel: &Path, rec: &EntryRecord) -> Attr {
        let id = rec.identity;
        let perms = rec.perms.unwrap_or(Perms {
            mode: UNKNOWN_FILE_MODE,
            uid: 0,
            gid: 0,
            ino: id.ino,
        });
        let mtime = system_time(
            id.mtime_ns.div_euclid(1_000_000_000),
            id.mtime_ns.rem_euclid(1_000_000_000),
        );
        Attr {
            ino: self.indexed_ino(rel, perms.ino),
            size: id.size,
            blocks: id.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            kind: Kind::File,
            perm: read_only(perms.mode),
            nlink: 1,
            uid: perms.uid,
            gid: perms.gid,
            rdev: 0,
            blksize: 4096,
        }
    }

    fn indexed_dir(&self, rel: &Path) -> Attr {
        let perms = self.cache.store().dir_perms(rel).unwrap_or(Perms {
            mode: UNKNOWN_DIR_MODE,
            uid: 0,
            gid: 0,
            ino: 0,
        });
        Attr {
            ino: self.indexed_ino(rel, perms.ino),
            size: 4096,
            blocks: 8,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            kind: Kind::Dir,
            perm: read_only(perms.mode),
            nlink: 2,
            uid: perms.uid,
            gid: perms.gid,
            rdev: 0,
            blksize: 4096,
        }
    }

    /// The inode number of an indexed path: from its recorded NAS inode, else a stable number
    /// made from the path (top bit set, like other numbers not from the NAS root's device).
    fn indexed_ino(&self, rel: &Path, nas_ino: u64) -> u64 {
        if rel.as_os_str().is_empty() {
            return ROOT_INO;
        }
        if nas_ino != 0 {
            return ino_for(self.root_dev, self.root_ino, self.root_dev, nas_ino);
        }
        let mut h = DefaultHasher::new();
        rel.hash(&mut h);
        h.finish() | (1 << 63)
    }
}

/// Permission bits with every write bit cleared: nothing can be changed without the NAS.
fn read_only(mode: u32) -> u16 {
    (mode & 0o7777 & !0o222) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_never_widen_access() {
        assert_eq!(read_only(libc::S_IFREG | 0o600), 0o400);
        assert_eq!(read_only(libc::S_IFREG | 0o4755), 0o4555);
        assert_eq!(read_only(libc::S_IFDIR | 0o770), 0o550);
        assert_eq!(read_only(UNKNOWN_FILE_MODE), 0o400);
        assert_eq!(read_only(UNKNOWN_DIR_MODE), 0o500);
    }
}
