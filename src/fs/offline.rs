//! Offline mode (DESIGN.md §2.6): while [`crate::health::Health`] says the NAS is gone, the file
//! system answers from the cache index alone. Complete copies are served as last-known-good (they
//! matched the NAS at the last successful check) with the attributes recorded for them, the
//! directories above them are listed from the index, and everything else fails with `EIO` at
//! once, without touching the NAS. `-o offline_copies=0` refuses even the copies.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::path::{Component, Path};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileHandle, FileType, FopenFlags, INodeNo, ReplyOpen};

use super::inodes::{IoMode, ROOT_INO, ino_for};
use super::{DirListing, Handle, HandleKind, Inner};
use crate::stats::Stats;

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

impl Inner {
    /// Whether the NAS is offline.
    pub(super) fn offline(&self) -> bool {
        self.health.offline()
    }

    /// Notes an error from the NAS: one that smells like a lost NAS asks for a probe now.
    pub(super) fn saw(&self, e: &std::io::Error) {
        if nas_trouble(e) {
            self.health.kick();
        }
    }

    /// The complete copies of the index as (path, size, mtime ns, NAS inode).
    fn complete_copies(&self) -> Vec<(std::path::PathBuf, crate::cache::EntryRecord)> {
        if !self.opts.offline_copies {
            return Vec::new();
        }
        let store = self.cache.store();
        store
            .summaries()
            .into_iter()
            .filter(|(_, _, _, complete)| *complete)
            .filter_map(|(p, ..)| store.get(&p).map(|e| (p, e)))
            .collect()
    }

    fn dir_ino(&self, rel: &Path) -> u64 {
        if rel.as_os_str().is_empty() {
            return ROOT_INO;
        }
        if let Some(ino) = self.inodes.lock().find_path(rel) {
            return ino;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        rel.hash(&mut h);
        h.finish() | (1 << 63)
    }

    fn dir_attr(&self, ino: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: 4096,
            blocks: 8,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::Directory,
            perm: 0o555,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Attributes of `rel` from the index: a complete copy, or a directory above one.
    pub(super) fn offline_attr(&self, rel: &Path) -> Result<FileAttr, Errno> {
        if !self.opts.offline_copies {
            return Err(Errno::EIO);
        }
        if rel.as_os_str().is_empty() {
            return Ok(self.dir_attr(ROOT_INO));
        }
        if let Some(e) = self.cache.store().get(rel).filter(|e| e.is_complete()) {
            let id = e.identity;
            let ino = if id.ino != 0 {
                ino_for(self.root_dev, self.root_ino, self.root_dev, id.ino)
            } else {
                self.dir_ino(rel) // a stable number for the path
            };
            let mtime = if id.mtime_ns >= 0 {
                UNIX_EPOCH + Duration::from_nanos(id.mtime_ns as u64)
            } else {
                UNIX_EPOCH
            };
            return Ok(FileAttr {
                ino: INodeNo(ino),
                size: id.size,
                blocks: id.size.div_ceil(512),
                atime: mtime,
                mtime,
                ctime: mtime,
                crtime: UNIX_EPOCH,
                kind: FileType::RegularFile,
                perm: 0o444,
                nlink: 1,
                uid: 0,
                gid: 0,
                rdev: 0,
                blksize: 4096,
                flags: 0,
            });
        }
        let is_dir = self
            .complete_copies()
            .iter()
            .any(|(p, _)| p.starts_with(rel) && p != rel);
        if is_dir {
            Ok(self.dir_attr(self.dir_ino(rel)))
        } else {
            Err(Errno::EIO)
        }
    }

    /// The listing of directory `rel` from the index.
    pub(super) fn offline_listing(&self, rel: &Path) -> Result<DirListing, Errno> {
        let mut names: BTreeMap<OsString, (FileType, u64)> = BTreeMap::new();
        for (p, e) in self.complete_copies() {
            let Ok(rest) = p.strip_prefix(rel) else {
                continue;
            };
            let mut comps = rest.components();
            let Some(Component::Normal(first)) = comps.next() else {
                continue;
            };
            let entry = if comps.next().is_some() {
                (FileType::Directory, self.dir_ino(&rel.join(first)))
            } else {
                let ino = ino_for(self.root_dev, self.root_ino, self.root_dev, e.identity.ino);
                (FileType::RegularFile, ino)
            };
            names.entry(first.to_os_string()).or_insert(entry);
        }
        if names.is_empty() && !rel.as_os_str().is_empty() {
            return Err(Errno::EIO);
        }
        Ok(names.into_iter().map(|(n, (k, i))| (n, k, i)).collect())
    }

    /// Opens a complete copy without the NAS (read-only opens while offline).
    pub(super) fn open_offline(&self, ino: u64, rel: &Path, reply: ReplyOpen) {
        let entry = self
            .cache
            .store()
            .get(rel)
            .filter(|e| e.is_complete() && self.opts.offline_copies);
        let Some(entry) = entry else {
            reply.error(Errno::EIO);
            return;
        };
        let data = match File::open(self.cache.store().data_path(entry.id)) {
            Ok(f) => f,
            Err(_) => {
                reply.error(Errno::EIO);
                return;
            }
        };
        let mut inodes = self.inodes.lock();
        let Some(node) = inodes.get_mut(ino) else {
            reply.error(Errno::ESTALE);
            return;
        };
        let fh = self.new_fh();
        let stale = node.stale.clone();
        let handle = |kind| Handle {
            ino,
            kind,
            cache_ref: Some(rel.to_path_buf()),
            nas: None,
            stale: stale.clone(),
            writer: false,
            identity: None,
        };
        Stats::add(&self.stats.opens_offline, 1);
        match (&node.mode, node.open > 0) {
            (
                IoMode::Passthrough {
                    backing,
                    nas: false,
                    ..
                },
                true,
            ) => {
                let Some(b) = backing.upgrade() else {
                    reply.error(Errno::EIO);
                    return;
                };
                node.open += 1;
                drop(inodes);
                self.reply_passthrough(fh, handle(HandleKind::Passthrough(b.clone())), &b, reply);
            }
            (IoMode::Passthrough { .. }, true) => {
                drop(inodes);
                reply.error(Errno::EIO);
            }
            (_, busy) => {
                if !busy
                    && self.passthrough_ok.load(Ordering::Relaxed)
                    && let Ok(b) = reply.open_backing(&data)
                {
                    let b = Arc::new(b);
                    node.mode = IoMode::Passthrough {
                        backing: Arc::downgrade(&b),
                        nas: false,
                        readable: true,
                        identity: Some(entry.identity),
                    };
                    node.open += 1;
                    drop(inodes);
                    self.reply_passthrough(
                        fh,
                        handle(HandleKind::Passthrough(b.clone())),
                        &b,
                        reply,
                    );
                    return;
                }
                node.mode = IoMode::Cached;
                node.open += 1;
                drop(inodes);
                self.insert_handle(fh, handle(HandleKind::Ssd(data)));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
        }
    }
}
