//! Inode numbers and the table from inode to NAS path.
//!
//! Inode numbers come from the NAS (`st_ino`) when the file lives on the same device as the NAS
//! root, so hard links share an inode, `find` and `ls -i` agree with `stat`, and a file replaced on
//! the NAS (new `st_ino`) is a new inode to the kernel, with a fresh page cache. Files on other
//! devices under the root (nested mounts) get a hash of (device, inode) with the top bit set, which
//! cannot collide with the root device's numbers in practice. Inode 1 is the FUSE root.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use super::iomode::InodeIo;
use crate::source::Identity;

/// FUSE's root inode number.
pub const ROOT_INO: u64 = 1;

/// Maps a NAS (device, inode) to the inode number shown through the mount.
pub fn ino_for(root_dev: u64, root_ino: u64, dev: u64, ino: u64) -> u64 {
    if dev == root_dev {
        if ino == root_ino {
            return ROOT_INO;
        }
        if ino != ROOT_INO && ino < (1 << 63) {
            return ino;
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (dev, ino).hash(&mut h);
    h.finish() | (1 << 63)
}

/// One known inode. Most are never opened (a walk looks up every file), so what an open needs
/// lives in [`Opened`], allocated at the first open: a known inode costs about 64 bytes.
#[derive(Debug)]
pub struct Node {
    /// NAS-relative path (the last one it was looked up under).
    pub rel: Box<Path>,
    /// Kernel lookup count.
    pub nlookup: u64,
    /// The size and mtime the kernel was last given (lookup, listing, getattr): an open that
    /// finds the NAS file different tells the kernel to drop what it caches.
    pub shown: Option<(u64, std::time::SystemTime)>,
    /// The path was unlinked or replaced: only open handles still reach the file.
    pub gone: bool,
    opened: Option<Box<Opened>>,
}

/// What the opens of an inode leave behind.
#[derive(Debug, Default)]
pub struct Opened {
    /// The I/O mode of its open handles.
    pub io: InodeIo<fuser::BackingId>,
    /// Identity of the file at the last open: when it is unchanged, the kernel may keep its page
    /// cache for the inode (`FOPEN_KEEP_CACHE`).
    pub last_identity: Option<Identity>,
    /// For a directory: its mtime (s, ns) when it was last opened, to let the kernel keep its
    /// cached listing while the directory is unchanged.
    pub dir_mtime: Option<(i64, i64)>,
    /// Set when the file's content changes through the mount: handles that read a cache copy
    /// read the NAS from then on. Replaced by a fresh flag once no writer is left, so later
    /// handles are not affected.
    pub stale: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Handles the kernel opened to execute the file (a running program): the file must not
    /// be truncated (`ETXTBSY`).
    pub executing: u32,
}

impl Node {
    fn new(rel: &Path) -> Self {
        Self {
            rel: rel.into(),
            nlookup: 0,
            shown: None,
            gone: false,
            opened: None,
        }
    }

    /// The open state, created at the first use.
    pub fn opened(&mut self) -> &mut Opened {
        self.opened.get_or_insert_default()
    }

    /// The open state to change, if the inode was ever opened.
    pub fn opened_mut(&mut self) -> Option<&mut Opened> {
        self.opened.as_deref_mut()
    }

    /// The open state, if the inode was ever opened.
    pub fn opened_ref(&self) -> Option<&Opened> {
        self.opened.as_deref()
    }

    /// Handles open.
    pub fn open_count(&self) -> u32 {
        self.opened.as_ref().map_or(0, |o| o.io.open())
    }

    /// Whether a writer is open or reserved.
    pub fn writing(&self) -> bool {
        self.opened.as_ref().is_some_and(|o| o.io.writing())
    }

    /// Handles open to execute the file.
    pub fn executing(&self) -> u32 {
        self.opened.as_ref().map_or(0, |o| o.executing)
    }
}

/// The inode table.
#[derive(Debug)]
pub struct Inodes {
    nodes: HashMap<u64, Node>,
}

impl Default for Inodes {
    fn default() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT_INO, Node::new(Path::new("")));
        Self { nodes }
    }
}

impl Inodes {
    /// Records a lookup of `rel` as `ino` (counting it).
    pub fn remember(&mut self, ino: u64, rel: &Path) -> &mut Node {
        let node = self.nodes.entry(ino).or_insert_with(|| Node::new(rel));
        if (*node.rel != *rel || node.gone) && ino != ROOT_INO {
            node.rel = rel.into();
            node.gone = false;
        }
        node.nlookup += 1;
        node
    }

    /// After a rename of `old` to `new`: every known inode at or below `old` moves.
    pub fn renamed(&mut self, old: &Path, new: &Path) {
        for node in self.nodes.values_mut() {
            if let Ok(rest) = node.rel.strip_prefix(old)
                && !node.gone
            {
                node.rel = if rest.as_os_str().is_empty() {
                    new.into()
                } else {
                    new.join(rest).into_boxed_path()
                };
            }
        }
    }

    /// The inode known at `rel` (if any) no longer has that name.
    pub fn unlinked(&mut self, ino: u64, rel: &Path) {
        if let Some(node) = self.nodes.get_mut(&ino)
            && *node.rel == *rel
            && ino != ROOT_INO
        {
            node.gone = true;
        }
    }

    /// Drops `n` lookups; forgets the inode when none are left and no handle is open.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.nlookup = node.nlookup.saturating_sub(n);
            if node.nlookup == 0 && node.open_count() == 0 {
                self.nodes.remove(&ino);
            }
        }
    }

    /// The NAS path of an inode (`None`: unknown, or its name is gone).
    pub fn path(&self, ino: u64) -> Option<PathBuf> {
        self.nodes
            .get(&ino)
            .filter(|n| !n.gone)
            .map(|n| n.rel.to_path_buf())
    }

    /// The names known directly below directory `dir` (a linear scan: only after the NAS
    /// changed the directory).
    pub fn names_below(&self, dir: &Path) -> Vec<std::ffi::OsString> {
        self.nodes
            .iter()
            .filter(|(ino, n)| **ino != ROOT_INO && !n.gone && n.rel.parent() == Some(dir))
            .filter_map(|(_, n)| n.rel.file_name().map(|n| n.to_os_string()))
            .collect()
    }

    /// The node of an inode.
    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Node> {
        self.nodes.get_mut(&ino)
    }

    /// Number of known inodes (the root included).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether only the root is known.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers() {
        assert_eq!(ino_for(5, 2, 5, 2), ROOT_INO);
        assert_eq!(ino_for(5, 2, 5, 1234), 1234);
        let other = ino_for(5, 2, 6, 1234);
        assert!(other >= 1 << 63);
        assert_eq!(other, ino_for(5, 2, 6, 1234));
        assert_ne!(other, ino_for(5, 2, 7, 1234));
        // A NAS inode numbered 1 must not alias the FUSE root.
        assert_ne!(ino_for(5, 2, 5, 1), ROOT_INO);
    }

    #[test]
    fn lookup_and_forget() {
        let mut t = Inodes::default();
        t.remember(10, Path::new("a/b"));
        t.remember(10, Path::new("a/b"));
        assert_eq!(t.path(10).unwrap(), Path::new("a/b"));
        t.forget(10, 1);
        assert!(t.path(10).is_some());
        t.get_mut(10).unwrap().opened().io.joined_daemon();
        t.forget(10, 1);
        assert!(t.path(10).is_some(), "open inodes stay");
        t.get_mut(10).unwrap().opened().io.released(false);
        t.remember(10, Path::new("a/c"));
        assert_eq!(t.path(10).unwrap(), Path::new("a/c"));
        t.forget(10, 1);
        assert!(t.path(10).is_none());
        t.forget(ROOT_INO, 100);
        assert_eq!(t.path(ROOT_INO).unwrap(), Path::new(""));
    }

    #[test]
    fn renames_move_subtrees_and_unlinks_hide_names() {
        let mut t = Inodes::default();
        t.remember(10, Path::new("a"));
        t.remember(11, Path::new("a/b"));
        t.remember(12, Path::new("a/b/c.safetensors"));
        t.remember(13, Path::new("ab"));
        t.renamed(Path::new("a"), Path::new("x/y"));
        assert_eq!(t.path(10).unwrap(), Path::new("x/y"));
        assert_eq!(t.path(12).unwrap(), Path::new("x/y/b/c.safetensors"));
        assert_eq!(
            t.path(13).unwrap(),
            Path::new("ab"),
            "a prefix of a name is not a parent"
        );
        t.unlinked(12, Path::new("elsewhere"));
        assert!(t.path(12).is_some(), "another name of the inode");
        t.unlinked(12, Path::new("x/y/b/c.safetensors"));
        assert!(t.path(12).is_none());
        t.remember(12, Path::new("x/y/b/c2.safetensors"));
        assert_eq!(t.path(12).unwrap(), Path::new("x/y/b/c2.safetensors"));
    }
}
