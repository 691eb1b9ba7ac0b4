//! NAS access: the source of truth.
//!
//! Every path handed to this module is relative to the NAS root and was built by the filesystem
//! from names the kernel looked up one component at a time, so it contains no `..` and no empty
//! components. File contents are opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: if a
//! directory on the NAS is swapped for a symlink after it was looked up, the open fails instead of
//! escaping the NAS root. Symlinks themselves are presented as symlinks and resolved by the kernel,
//! exactly as a client of the NAS would see them.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode};

/// What decides whether a cache copy still belongs to the NAS file (DESIGN.md §2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Inode number on the NAS; 0 when the identity rule ignores inode numbers.
    pub ino: u64,
    /// Change time, nanoseconds since the epoch; 0 when the identity rule ignores it.
    pub ctime_ns: i64,
}

/// Which fields of a NAS file's metadata make up its identity (`ARENA_CACHE_IDENTITY`,
/// `-o identity=`; docs/design-choices.md says when to choose which).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityRule {
    /// Size and mtime (ns): for NAS mounts whose inode numbers are not stable (SMB with
    /// `noserverino`, some FUSE-based NAS clients).
    SizeMtime,
    /// Size, mtime (ns) and inode number: the default; also catches a file replaced by rename
    /// with its size and mtime preserved (`cp -p` then `mv`).
    #[default]
    SizeMtimeIno,
    /// Also the change time: catches a rewrite that restored the old mtime (`touch -r`, `rsync
    /// -t` in place), at the cost of dropping copies on any metadata change (chmod, rename).
    SizeMtimeInoCtime,
}

impl IdentityRule {
    /// Every rule, by its setting name.
    pub const ALL: [(&'static str, IdentityRule); 3] = [
        ("size_mtime", IdentityRule::SizeMtime),
        ("size_mtime_ino", IdentityRule::SizeMtimeIno),
        ("size_mtime_ino_ctime", IdentityRule::SizeMtimeInoCtime),
    ];

    /// The rule a setting names.
    pub fn parse(name: &str) -> Option<Self> {
        let name = name.trim().to_ascii_lowercase();
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, r)| *r)
    }

    /// The setting name of the rule.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, r)| *r == self)
            .map(|(n, _)| *n)
            .expect("every rule has a name")
    }

    /// The identity of a file under this rule.
    pub fn identity(self, st: &FileStat) -> Identity {
        self.mask(Identity {
            size: st.st_size as u64,
            mtime_ns: st.st_mtime.saturating_mul(1_000_000_000) + st.st_mtime_nsec,
            ino: st.st_ino,
            ctime_ns: st.st_ctime.saturating_mul(1_000_000_000) + st.st_ctime_nsec,
        })
    }

    /// `identity` with the fields this rule ignores cleared: an identity recorded under a
    /// stricter rule compares equal, one recorded under a looser rule (its fields cleared)
    /// does not match a file whose identity needs them.
    pub fn mask(self, identity: Identity) -> Identity {
        let (ino, ctime) = match self {
            IdentityRule::SizeMtime => (false, false),
            IdentityRule::SizeMtimeIno => (true, false),
            IdentityRule::SizeMtimeInoCtime => (true, true),
        };
        Identity {
            ino: if ino { identity.ino } else { 0 },
            ctime_ns: if ctime { identity.ctime_ns } else { 0 },
            ..identity
        }
    }
}

/// How long until a file with `identity` (as the NAS clock sees it) was last modified `window`
/// ago (`ARENA_CACHE_STABLE_SECS`) and may be copied; zero when it was. NAS timestamps can be as
/// coarse as a second or two (SMB, FAT-backed shares), so a file rewritten twice within one tick
/// could keep its mtime, and its identity, with other bytes: it is read from the NAS until then.
pub fn unstable_for(identity: &Identity, window: std::time::Duration) -> std::time::Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let age = now.saturating_sub(identity.mtime_ns);
    let stable = window.as_nanos() as i64;
    if age >= stable {
        std::time::Duration::ZERO
    } else {
        // A file stamped in the future (a NAS clock ahead of ours) waits until our clock
        // passes its mtime by the margin.
        std::time::Duration::from_nanos((stable - age) as u64)
    }
}

/// The NAS directory arenafs presents.
#[derive(Debug)]
pub struct Nas {
    root: PathBuf,
    /// The root directory, opened once; replaced only by [`Nas::probe`] when the path resolves
    /// to the same directory again after an outage.
    root_fd: parking_lot::RwLock<Arc<OwnedFd>>,
    /// (device, inode) of the root when it was opened: what "still the NAS" means.
    root_id: (u64, u64),
}

impl Nas {
    /// Opens the NAS root. Fails if it does not exist or is not a directory.
    pub fn open(root: &Path) -> io::Result<Self> {
        let root_fd: OwnedFd = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)?;
        let st = nix::sys::stat::fstat(&root_fd).map_err(io::Error::from)?;
        Ok(Self {
            root: std::path::absolute(root)?,
            root_fd: parking_lot::RwLock::new(Arc::new(root_fd)),
            root_id: (st.st_dev, st.st_ino),
        })
    }

    fn fd(&self) -> Arc<OwnedFd> {
        self.root_fd.read().clone()
    }

    /// Checks that the NAS answers and that its root path still names the directory that was
    /// mounted (an NFS mount point that fell back to an empty local directory, or a directory
    /// renamed away, does not). When the path names it again after an outage, the root is
    /// reopened. Blocking: call it where a hung NAS cannot stall anything else.
    pub fn probe(&self) -> Result<(), String> {
        let st = nix::sys::stat::stat(&self.root)
            .map_err(|e| format!("{}: {e}", self.root.display()))?;
        if (st.st_dev, st.st_ino) != self.root_id {
            return Err(format!(
                "{} is no longer the NAS directory that was mounted (another file system or directory is there)",
                self.root.display()
            ));
        }
        let fd = self.fd();
        let healthy = nix::sys::stat::fstat(&*fd)
            .ok()
            .filter(|s| (s.st_dev, s.st_ino) == self.root_id)
            .and_then(|_| nix::sys::statvfs::fstatvfs(&*fd).ok())
            .is_some();
        if healthy {
            return Ok(());
        }
        let fresh: OwnedFd = nix::fcntl::open(
            &self.root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("reopening {}: {e}", self.root.display()))?;
        let st = nix::sys::stat::fstat(&fresh).map_err(|e| e.to_string())?;
        if (st.st_dev, st.st_ino) != self.root_id {
            return Err(format!(
                "{} changed while reopening it",
                self.root.display()
            ));
        }
        nix::sys::statvfs::fstatvfs(&fresh).map_err(|e| format!("{}: {e}", self.root.display()))?;
        *self.root_fd.write() = Arc::new(fresh);
        Ok(())
    }

    /// The NAS root as given.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `lstat` of a path relative to the root (`""` is the root itself), resolved beneath the
    /// root like every other access: a directory swapped for a symlink on the NAS fails the call
    /// instead of leading outside.
    pub fn stat(&self, rel: &Path) -> io::Result<FileStat> {
        let fd = self.open_beneath(rel, OFlag::O_PATH | OFlag::O_NOFOLLOW)?;
        nix::sys::stat::fstat(&fd).map_err(io::Error::from)
    }

    /// `lstat` of the entries `names` of directory `dir` (one open of the directory).
    pub fn stat_children(
        &self,
        dir: &Path,
        names: &[&OsStr],
    ) -> io::Result<Vec<io::Result<FileStat>>> {
        let fd = self.open_beneath(dir, OFlag::O_PATH | OFlag::O_DIRECTORY)?;
        Ok(names
            .iter()
            .map(|n| {
                nix::sys::stat::fstatat(&fd, *n, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(io::Error::from)
            })
            .collect())
    }

    /// Opens a regular file read-only, never following symlinks.
    pub fn open_file(&self, rel: &Path) -> io::Result<File> {
        let fd = self.open_beneath(rel, OFlag::O_RDONLY | OFlag::O_NOFOLLOW)?;
        Ok(File::from(fd))
    }

    /// Reads a symlink's target (the link is found beneath the root).
    pub fn readlink(&self, rel: &Path) -> io::Result<OsString> {
        let fd = self.open_beneath(rel, OFlag::O_PATH | OFlag::O_NOFOLLOW)?;
        nix::fcntl::readlinkat(&fd, "").map_err(io::Error::from)
    }

    /// Lists a directory: `(name, file type from d_type or lstat, d_ino)`, without `.` and `..`.
    /// Lists directory `rel`, without `.`, `..` and the names arenafs keeps for itself
    /// ([`is_reserved`]).
    pub fn read_dir(&self, rel: &Path) -> io::Result<Vec<(OsString, DirEntryKind, u64)>> {
        let fd = self.open_beneath(rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(io::Error::from)?;
        let mut listed = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(io::Error::from)?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." || is_reserved(name) {
                continue;
            }
            let kind = entry.file_type().map(DirEntryKind::from_nix);
            listed.push((name.to_os_string(), kind, entry.ino()));
        }
        let mut out = Vec::with_capacity(listed.len());
        for (name, kind, ino) in listed {
            let kind = match kind {
                Some(k) => k,
                // No d_type from this file system: lstat it in the listed directory.
                None => match nix::sys::stat::fstatat(
                    &dir,
                    name.as_os_str(),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                ) {
                    Ok(st) => DirEntryKind::from_mode(st.st_mode),
                    Err(_) => continue, // vanished between readdir and stat
                },
            };
            out.push((name, kind, ino));
        }
        Ok(out)
    }

    /// `fsync` of a directory (its entries made durable on the NAS).
    pub fn sync_dir(&self, rel: &Path) -> io::Result<()> {
        let fd = self.open_beneath(rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
        File::from(fd).sync_all()
    }

    /// `statvfs` of the NAS root.
    pub fn statvfs(&self) -> io::Result<nix::sys::statvfs::Statvfs> {
        nix::sys::statvfs::fstatvfs(&*self.fd()).map_err(io::Error::from)
    }

    fn open_beneath(&self, rel: &Path, flags: OFlag) -> io::Result<OwnedFd> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        nix::fcntl::openat2(&*self.fd(), dot_if_empty(rel), how).map_err(io::Error::from)
    }
}

/// Changes to the NAS namespace and metadata (write-through). Each works on the parent directory
/// opened beneath the root and the last component, never following a symlink in the last
/// component, so no change can land outside the NAS root.
impl Nas {
    /// The parent directory of `rel` (opened `O_PATH` beneath the root) and the last component.
    fn parent<'a>(&self, rel: &'a Path) -> io::Result<(OwnedFd, &'a OsStr)> {
        let name = rel
            .file_name()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let dir = rel.parent().unwrap_or(Path::new(""));
        let fd = self.open_beneath(dir, OFlag::O_PATH | OFlag::O_DIRECTORY)?;
        Ok((fd, name))
    }

    /// Opens a file with `flags` (access mode, `O_TRUNC`, `O_SYNC`, ...), never following a
    /// symlink; `O_CREAT` creates it with `mode` (exactly: the caller applies the umask).
    pub fn open_with(&self, rel: &Path, flags: i32, mode: u32) -> io::Result<File> {
        let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        if flags & libc::O_CREAT == 0 {
            let fd = self.open_beneath(rel, OFlag::from_bits_truncate(flags))?;
            return Ok(File::from(fd));
        }
        let (dir, name) = self.parent(rel)?;
        let name = cstr(name)?;
        // SAFETY: valid fd and NUL-terminated name; the returned fd is owned below.
        let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor we own.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// `mkdir` with exactly `mode`.
    pub fn mkdir(&self, rel: &Path, mode: u32) -> io::Result<()> {
        let (dir, name) = self.parent(rel)?;
        let name = cstr(name)?;
        // SAFETY: valid fd and NUL-terminated name.
        check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) })
    }

    /// `mknod` (FIFOs, sockets, devices) with exactly `mode`.
    pub fn mknod(&self, rel: &Path, mode: u32, rdev: u64) -> io::Result<()> {
        let (dir, name) = self.parent(rel)?;
        let name = cstr(name)?;
        // SAFETY: valid fd and NUL-terminated name.
        check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) })
    }

    /// Removes a file (not a directory).
    pub fn unlink(&self, rel: &Path) -> io::Result<()> {
        let (dir, name) = self.parent(rel)?;
        let name = cstr(name)?;
        // SAFETY: valid fd and NUL-terminated name.
        check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) })
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, rel: &Path) -> io::Result<()> {
        let (dir, name) = self.parent(rel)?;
        let name = cstr(name)?;
        // SAFETY: valid fd and NUL-terminated name.
        check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) })
    }

    /// Creates a symlink at `rel` pointing to `target` (stored as given).
    pub fn symlink(&self, target: &Path, rel: &Path) -> io::Result<()> {
        let (dir, name) = self.parent(rel)?;
        let (name, target) = (cstr(name)?, cstr(target.as_os_str())?);
        // SAFETY: valid fd and NUL-terminated strings.
        check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
    }

    /// A hard link `new` to `old`.
    pub fn link(&self, old: &Path, new: &Path) -> io::Result<()> {
        let (odir, oname) = self.parent(old)?;
        let (ndir, nname) = self.parent(new)?;
        let (oname, nname) = (cstr(oname)?, cstr(nname)?);
        // SAFETY: valid fds and NUL-terminated names.
        check(unsafe {
            libc::linkat(
                odir.as_raw_fd(),
                oname.as_ptr(),
                ndir.as_raw_fd(),
                nname.as_ptr(),
                0,
            )
        })
    }

    /// `renameat2` with `flags` (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
    pub fn rename(&self, old: &Path, new: &Path, flags: u32) -> io::Result<()> {
        let (odir, oname) = self.parent(old)?;
        let (ndir, nname) = self.parent(new)?;
        let (oname, nname) = (cstr(oname)?, cstr(nname)?);
        // SAFETY: valid fds and NUL-terminated names.
        check(unsafe {
            libc::renameat2(
                odir.as_raw_fd(),
                oname.as_ptr(),
                ndir.as_raw_fd(),
                nname.as_ptr(),
                flags,
            )
        })
    }

    /// Runs `f` on (directory fd, name) of `rel`; the root itself is (root, ".").
    fn at<T>(&self, rel: &Path, f: impl FnOnce(i32, &std::ffi::CStr) -> T) -> io::Result<T> {
        if rel.as_os_str().is_empty() {
            let root = self.fd();
            return Ok(f(root.as_raw_fd(), c"."));
        }
        let (dir, name) = self.parent(rel)?;
        let name = cstr(name)?;
        Ok(f(dir.as_raw_fd(), &name))
    }

    /// `chmod`; refused (`EOPNOTSUPP`) on a symlink, as Linux does.
    pub fn chmod(&self, rel: &Path, mode: u32) -> io::Result<()> {
        // SAFETY: valid fd and NUL-terminated name.
        check(self.at(rel, |d, n| unsafe {
            libc::fchmodat(d, n.as_ptr(), mode, libc::AT_SYMLINK_NOFOLLOW)
        })?)
    }

    /// `lchown`; `u32::MAX` leaves an id unchanged.
    pub fn chown(&self, rel: &Path, uid: u32, gid: u32) -> io::Result<()> {
        // SAFETY: valid fd and NUL-terminated name.
        check(self.at(rel, |d, n| unsafe {
            libc::fchownat(d, n.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW)
        })?)
    }

    /// `utimensat` without following a symlink (`UTIME_NOW` / `UTIME_OMIT` allowed).
    pub fn utimens(&self, rel: &Path, times: &[libc::timespec; 2]) -> io::Result<()> {
        // SAFETY: valid fd, NUL-terminated name and a two-element array.
        check(self.at(rel, |d, n| unsafe {
            libc::utimensat(d, n.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
        })?)
    }

    /// `faccessat` with the effective ids (the caller's, once switched).
    pub fn access(&self, rel: &Path, mask: i32) -> io::Result<()> {
        // SAFETY: valid fd and NUL-terminated name.
        check(self.at(rel, |d, n| unsafe {
            libc::faccessat(d, n.as_ptr(), mask, libc::AT_EACCESS)
        })?)
    }

    /// A `/proc/self/fd` path for `rel` opened `O_PATH` (for the xattr calls, which have no
    /// `*at` form), with the fd that keeps it valid. Symlinks are refused with `EPERM`, as
    /// Linux refuses user xattrs on them.
    fn proc_path(&self, rel: &Path) -> io::Result<(OwnedFd, std::ffi::CString)> {
        let fd = self.open_beneath(rel, OFlag::O_PATH | OFlag::O_NOFOLLOW)?;
        let st = nix::sys::stat::fstat(&fd).map_err(io::Error::from)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let path = std::ffi::CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .expect("no NUL in a number");
        Ok((fd, path))
    }

    /// `getxattr`; with an empty `buf`, the size of the value.
    pub fn getxattr(&self, rel: &Path, name: &OsStr, buf: &mut [u8]) -> io::Result<usize> {
        let (_fd, path) = self.proc_path(rel)?;
        let name = cstr(name)?;
        // SAFETY: valid strings and a buffer of the given length.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// `listxattr`; with an empty `buf`, the size of the list.
    pub fn listxattr(&self, rel: &Path, buf: &mut [u8]) -> io::Result<usize> {
        let (_fd, path) = self.proc_path(rel)?;
        // SAFETY: a valid string and a buffer of the given length.
        let n = unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// `setxattr`.
    pub fn setxattr(&self, rel: &Path, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
        let (_fd, path) = self.proc_path(rel)?;
        let name = cstr(name)?;
        // SAFETY: valid strings and a value of the given length.
        check(unsafe {
            libc::setxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        })
    }

    /// `removexattr`.
    pub fn removexattr(&self, rel: &Path, name: &OsStr) -> io::Result<()> {
        let (_fd, path) = self.proc_path(rel)?;
        let name = cstr(name)?;
        // SAFETY: valid strings.
        check(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) })
    }
}

fn cstr(s: &OsStr) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(s.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn dot_if_empty(rel: &Path) -> &Path {
    if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    }
}

/// The kind of a directory entry, as readdir reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DirEntryKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// FIFO, socket or device.
    Other(u32),
}

impl DirEntryKind {
    fn from_nix(t: nix::dir::Type) -> Self {
        use nix::dir::Type;
        match t {
            Type::File => Self::File,
            Type::Directory => Self::Dir,
            Type::Symlink => Self::Symlink,
            Type::Fifo => Self::Other(libc::S_IFIFO),
            Type::CharacterDevice => Self::Other(libc::S_IFCHR),
            Type::BlockDevice => Self::Other(libc::S_IFBLK),
            Type::Socket => Self::Other(libc::S_IFSOCK),
        }
    }

    /// From an `st_mode`.
    pub fn from_mode(mode: u32) -> Self {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Self::File,
            libc::S_IFDIR => Self::Dir,
            libc::S_IFLNK => Self::Symlink,
            other => Self::Other(other),
        }
    }
}

/// `pread` until `buf` is full or EOF; returns the bytes read.
pub fn pread_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Names that arenafs keeps on the NAS for itself (`.arenafs-*`: the updater's staged downloads
/// and old versions): never listed through the mount, never found by a lookup, never created
/// through it, never copied.
pub fn is_reserved(name: &OsStr) -> bool {
    name.as_encoded_bytes()
        .starts_with(RESERVED_PREFIX.as_bytes())
}

/// The prefix of [`is_reserved`] names.
pub const RESERVED_PREFIX: &str = ".arenafs-";

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn stat_open_list_readlink() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("loras")).unwrap();
        std::fs::write(dir.path().join("loras/a.safetensors"), b"hello").unwrap();
        symlink("a.safetensors", dir.path().join("loras/link")).unwrap();
        let nas = Nas::open(dir.path()).unwrap();

        assert_eq!(
            nas.stat(Path::new("loras/a.safetensors")).unwrap().st_size,
            5
        );
        assert!(nas.stat(Path::new("")).is_ok());
        let mut buf = [0u8; 16];
        let f = nas.open_file(Path::new("loras/a.safetensors")).unwrap();
        assert_eq!(pread_full(&f, &mut buf, 1).unwrap(), 4);
        assert_eq!(&buf[..4], b"ello");

        let mut list: Vec<_> = nas
            .read_dir(Path::new("loras"))
            .unwrap()
            .into_iter()
            .map(|(n, k, _)| (n, k))
            .collect();
        list.sort();
        assert_eq!(
            list,
            vec![
                ("a.safetensors".into(), DirEntryKind::File),
                ("link".into(), DirEntryKind::Symlink)
            ]
        );
        assert_eq!(
            nas.readlink(Path::new("loras/link")).unwrap(),
            "a.safetensors"
        );
        // Opening through a symlink is refused: the kernel resolves symlinks, not us.
        assert!(nas.open_file(Path::new("loras/link")).is_err());
    }

    #[test]
    fn symlinked_directory_cannot_escape_root() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        let dir = tempfile::tempdir().unwrap();
        symlink(outside.path(), dir.path().join("evil")).unwrap();
        symlink("secret", outside.path().join("link")).unwrap();
        let nas = Nas::open(dir.path()).unwrap();
        assert!(nas.open_file(Path::new("evil/secret")).is_err());
        // Metadata too: a directory swapped for a symlink after it was looked up must not lead
        // a stat, a listing or a readlink outside.
        assert!(nas.stat(Path::new("evil/secret")).is_err());
        assert!(nas.readlink(Path::new("evil/link")).is_err());
        assert!(nas.read_dir(Path::new("evil")).is_err());
        assert!(
            nas.stat_children(Path::new("evil"), &[OsStr::new("secret")])
                .is_err()
        );
        // The symlink itself is seen as a symlink.
        assert_eq!(
            DirEntryKind::from_mode(nas.stat(Path::new("evil")).unwrap().st_mode),
            DirEntryKind::Symlink
        );
    }

    #[test]
    fn rules_by_name_and_masks() {
        for (name, rule) in IdentityRule::ALL {
            assert_eq!(IdentityRule::parse(name), Some(rule));
            assert_eq!(rule.name(), name);
        }
        assert_eq!(
            IdentityRule::parse(" Size_Mtime "),
            Some(IdentityRule::SizeMtime)
        );
        assert_eq!(IdentityRule::parse("size"), None);
        let full = Identity {
            size: 1,
            mtime_ns: 2,
            ino: 3,
            ctime_ns: 4,
        };
        let ino_only = IdentityRule::SizeMtimeIno.mask(full);
        assert_eq!((ino_only.ino, ino_only.ctime_ns), (3, 0));
        // Recorded under a stricter rule: still matches under a looser one.
        assert_eq!(
            IdentityRule::SizeMtime.mask(full),
            IdentityRule::SizeMtime.mask(ino_only)
        );
        // Recorded under a looser rule: does not match under a stricter one.
        assert_ne!(IdentityRule::SizeMtimeInoCtime.mask(ino_only), full);
    }

    #[test]
    fn young_files_wait() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        let at = |mtime_ns| Identity {
            size: 1,
            mtime_ns,
            ino: 0,
            ctime_ns: 0,
        };
        let two = std::time::Duration::from_secs(2);
        assert_eq!(
            unstable_for(&at(now - 10_000_000_000), two),
            std::time::Duration::ZERO
        );
        let wait = unstable_for(&at(now - 500_000_000), two);
        assert!(wait > std::time::Duration::from_millis(1000) && wait <= two);
        assert!(unstable_for(&at(now + 60_000_000_000), two) > two);
        assert_eq!(
            unstable_for(&at(now), std::time::Duration::ZERO),
            std::time::Duration::ZERO
        );
    }

    #[test]
    fn identity_rules() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"abc").unwrap();
        let nas = Nas::open(dir.path()).unwrap();
        let st = nas.stat(Path::new("f")).unwrap();
        let a = IdentityRule::SizeMtimeIno.identity(&st);
        let b = IdentityRule::SizeMtime.identity(&st);
        assert_eq!(a.size, 3);
        assert_eq!(b.ino, 0);
        assert_ne!(a.ino, 0);
        assert_eq!(a.mtime_ns, b.mtime_ns);
    }

    #[test]
    fn missing_root_is_an_error() {
        assert!(Nas::open(Path::new("/nonexistent/arenafs/nas")).is_err());
    }
}
