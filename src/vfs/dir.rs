//! Directories: opening, listing (with attributes for `readdirplus`), syncing.
//!
//! A handle lists its directory from the NAS once, at its first `readdir`, and keeps the
//! listing; `readdirplus` stats the entries it is about to send in batches of [`STAT_BATCH`]
//! (one NAS call each, within the deadline) and keeps those attributes too, so an entry that
//! did not fit in one reply is not asked for again. When the NAS does not answer, the listing
//! and attributes come from the index (complete copies and the directories above them).

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use super::inodes::ROOT_INO;
use super::{Attr, DirEntry, DirEntryPlus, DirOpened, FsError, Kind, Vfs};

/// Entries stated per NAS call in `readdirplus` (a reply of 4 KiB holds about 25).
const STAT_BATCH: usize = 32;

/// One listed entry.
struct Listed {
    name: OsString,
    kind: Kind,
    ino: u64,
    /// `Some(None)`: stated, vanished since the listing.
    attr: Option<Option<Attr>>,
}

/// A directory listing, from the NAS or the index.
struct Listing {
    entries: Vec<Listed>,
    /// Whether it came from the index (the NAS did not answer).
    from_index: bool,
}

/// An open directory.
pub(super) struct DirHandle {
    rel: PathBuf,
    /// The directory's own attributes at `opendir` (for `.` and `..` in `readdirplus`).
    attr: Attr,
    /// Its mtime changed since the kernel last listed it: names the kernel knows may be gone.
    changed: bool,
    listing: Mutex<Option<Listing>>,
}

impl Vfs {
    /// Opens directory `ino`.
    pub fn opendir(&self, ino: u64) -> Result<DirOpened, FsError> {
        let rel = self.path(ino)?;
        let (mut attr, keep_cache, changed) = match self.nas_stat(&rel) {
            Ok(st) => {
                if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                    return Err(FsError::NotDir);
                }
                self.note_seen(&rel, &st);
                // The kernel may keep its cached listing while the directory's mtime is
                // unchanged (every create, unlink and rename in it changes the mtime). The
                // NAS is listed only when the kernel asks for entries.
                let mtime = (st.st_mtime, st.st_mtime_nsec);
                let mut inodes = self.inodes.lock();
                let node = inodes.get_mut(ino).ok_or(FsError::Stale)?;
                let before = node.opened().dir_mtime.replace(mtime);
                let keep = before == Some(mtime);
                (self.attr_of(&st), keep, before.is_some() && !keep)
            }
            Err(e) if e.nas_unanswered() => {
                let attr = self.index_attr(&rel).map_err(|_| e)?;
                if attr.kind != Kind::Dir {
                    return Err(FsError::NotDir);
                }
                (attr, false, false)
            }
            Err(e) => return Err(e),
        };
        attr.ino = ino;
        let fh = self.new_fh();
        self.dirs.lock().insert(
            fh,
            Arc::new(DirHandle {
                rel,
                attr,
                changed,
                listing: Mutex::new(None),
            }),
        );
        Ok(DirOpened { fh, keep_cache })
    }

    fn dir_handle(&self, fh: u64) -> Result<Arc<DirHandle>, FsError> {
        self.dirs.lock().get(&fh).cloned().ok_or(FsError::BadHandle)
    }

    /// Lists the directory of `d` (once per handle).
    fn ensure_listing(&self, ino: u64, d: &DirHandle) -> Result<(), FsError> {
        if d.listing.lock().is_some() {
            return Ok(());
        }
        let rel = d.rel.clone();
        let listing = match self.nas(move |nas| Ok(nas.read_dir(&rel)?)) {
            Ok(entries) => Listing {
                entries: entries
                    .into_iter()
                    .map(|(name, kind, d_ino)| Listed {
                        name,
                        kind: Kind::of_entry(kind),
                        ino: super::inodes::ino_for(
                            self.root_dev,
                            self.root_ino,
                            self.root_dev,
                            d_ino,
                        ),
                        attr: None,
                    })
                    .collect(),
                from_index: false,
            },
            Err(e) if e.nas_unanswered() => {
                let entries = self.index_listing(&d.rel).map_err(|_| e)?;
                // The kernel must not keep this partial listing as the directory's content
                // once the NAS is back: the next open lists the NAS again.
                if let Some(node) = self.inodes.lock().get_mut(ino) {
                    node.opened().dir_mtime = None;
                }
                Listing {
                    entries: entries
                        .into_iter()
                        .map(|i| Listed {
                            name: i.name,
                            kind: i.attr.kind,
                            ino: i.attr.ino,
                            attr: Some(Some(i.attr)),
                        })
                        .collect(),
                    from_index: true,
                }
            }
            Err(e) => return Err(e),
        };
        if d.changed && !listing.from_index {
            // Names removed on the NAS by another machine leave the kernel's cache now, not
            // when their timeout ends.
            let listed: std::collections::HashSet<&OsStr> =
                listing.entries.iter().map(|e| e.name.as_os_str()).collect();
            let mut gone = self.inodes.lock().names_below(&d.rel);
            gone.retain(|n| !listed.contains(n.as_os_str()));
            self.forget_entries(ino, gone);
        }
        let mut slot = d.listing.lock();
        if slot.is_none() {
            *slot = Some(listing);
        }
        Ok(())
    }

    /// Lists directory `ino` (handle `fh`) from `offset`, calling `add` for each entry until it
    /// returns `true` (the reply is full).
    pub fn readdir(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        add: &mut dyn FnMut(DirEntry) -> bool,
    ) -> Result<(), FsError> {
        let d = self.dir_handle(fh)?;
        self.ensure_listing(ino, &d)?;
        let listing = d.listing.lock();
        let listing = listing.as_ref().expect("listed above");
        let dots = [
            (OsStr::new("."), Kind::Dir, ino),
            (OsStr::new(".."), Kind::Dir, ROOT_INO),
        ];
        let all = dots.into_iter().chain(
            listing
                .entries
                .iter()
                .map(|e| (e.name.as_os_str(), e.kind, e.ino)),
        );
        for (i, (name, kind, ino)) in all.enumerate().skip(offset as usize) {
            let entry = DirEntry {
                name: name.to_os_string(),
                kind,
                ino,
                next: i as u64 + 1,
            };
            if add(entry) {
                break;
            }
        }
        Ok(())
    }

    /// Lists directory `ino` (handle `fh`) from `offset` with attributes, calling `add` for each
    /// entry until it returns `true`. Each entry passed to `add` counts as a lookup of it,
    /// except the one `add` refused.
    pub fn readdirplus(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        add: &mut dyn FnMut(DirEntryPlus) -> bool,
    ) -> Result<(), FsError> {
        let d = self.dir_handle(fh)?;
        self.ensure_listing(ino, &d)?;
        // "." and "..": the kernel takes no lookup reference for them.
        for (i, name) in [".", ".."].into_iter().enumerate().skip(offset as usize) {
            let entry = DirEntryPlus {
                name: name.into(),
                attr: d.attr,
                next: i as u64 + 1,
            };
            if add(entry) {
                return Ok(());
            }
        }
        let mut next = offset.saturating_sub(2) as usize;
        loop {
            let batch = self.stat_batch(&d, next)?;
            if batch.is_empty() {
                return Ok(());
            }
            for (i, name, attr) in batch {
                next = i + 1;
                let Some(attr) = attr else {
                    continue; // vanished since the listing
                };
                let rel = d.rel.join(&name);
                // Every entry sent with attributes counts as a lookup.
                self.remember(&attr, &rel);
                let entry = DirEntryPlus {
                    name,
                    attr,
                    next: i as u64 + 3,
                };
                if add(entry) {
                    self.forget(attr.ino, 1); // did not fit: not sent
                    return Ok(());
                }
            }
        }
    }

    /// The entries of the listing from index `from` on, up to [`STAT_BATCH`] of them, with
    /// their attributes (stated now on the NAS, in one call, where not known yet).
    #[allow(clippy::type_complexity)]
    fn stat_batch(
        &self,
        d: &DirHandle,
        from: usize,
    ) -> Result<Vec<(usize, OsString, Option<Attr>)>, FsError> {
        let (names, from_index): (Vec<(usize, OsString)>, bool) = {
            let listing = d.listing.lock();
            let l = listing.as_ref().expect("listed");
            let names = l
                .entries
                .iter()
                .enumerate()
                .skip(from)
                .take(STAT_BATCH)
                .filter(|(_, e)| e.attr.is_none())
                .map(|(i, e)| (i, e.name.clone()))
                .collect();
            (names, l.from_index)
        };
        if !names.is_empty() && !from_index {
            let rel = d.rel.clone();
            let asked: Vec<OsString> = names.iter().map(|(_, n)| n.clone()).collect();
            // The listing is the NAS's: the index cannot stand in for its attributes.
            let stats = self.nas(move |nas| {
                let refs: Vec<&OsStr> = asked.iter().map(OsString::as_os_str).collect();
                Ok(nas.stat_children(&rel, &refs)?)
            })?;
            let mut listing = d.listing.lock();
            let l = listing.as_mut().expect("listed");
            for ((i, _), st) in names.iter().zip(stats) {
                let attr = st.ok().map(|st| {
                    self.note_seen(&d.rel.join(&l.entries[*i].name), &st);
                    self.attr_of(&st)
                });
                l.entries[*i].attr = Some(attr);
            }
        }
        let listing = d.listing.lock();
        let l = listing.as_ref().expect("listed");
        Ok(l.entries
            .iter()
            .enumerate()
            .skip(from)
            .take(STAT_BATCH)
            .map(|(i, e)| (i, e.name.clone(), e.attr.flatten()))
            .collect())
    }

    /// Closes directory handle `fh`.
    pub fn releasedir(&self, fh: u64) {
        self.dirs.lock().remove(&fh);
    }

    /// `fsync` of directory handle `fh`: syncs the NAS directory (its entries made durable).
    pub fn fsyncdir(&self, fh: u64) -> Result<(), FsError> {
        let d = self.dir_handle(fh)?;
        let rel = d.rel.clone();
        self.nas(move |nas| Ok(nas.sync_dir(&rel)?))
    }
}
