//! Mounting and unmounting, and recovery from a mount left stale by a crashed daemon.
//!
//! arenafs mounts with `mount(2)` itself (it runs as root: passthrough needs CAP_SYS_ADMIN) so the
//! mount table shows the file system type `fuse.arenafs` and the NAS directory as the source, the
//! way `mount.fuse3` would, and so a stale mount can be recognised as ours.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

/// File system type in the mount table.
pub const FSTYPE: &str = "fuse.arenafs";

/// Errors preparing the mount point or mounting.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mount point is unusable.
    #[error("mount point {path}: {reason}")]
    MountPoint {
        /// The mount point.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `mount(2)` failed.
    #[error("mounting {path} failed: {source}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// Kernel-level mount options.
#[derive(Clone, Debug)]
pub struct KernelOptions {
    /// Let users other than root use the mount (ComfyUI usually runs as another user).
    pub allow_other: bool,
    /// Let the kernel check permissions from the file modes.
    pub default_permissions: bool,
    /// Mount read-only.
    pub read_only: bool,
    /// Other mount flags (`noatime`, `noexec`, ...).
    pub flags: MsFlags,
}

/// One line of `/proc/self/mountinfo`, the parts we need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount point.
    pub target: PathBuf,
    /// File system type (`fuse.arenafs`, `ext4`, ...).
    pub fstype: String,
    /// Source.
    pub source: String,
    /// Device number, `major:minor` (names the mount's `/sys/class/bdi` entry).
    pub dev: String,
}

/// Parses mountinfo text (see proc(5)); octal escapes (`\040`) are decoded.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut l = left.split(' ');
            let dev = l.nth(2)?;
            let target = l.nth(1)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let source = r.next()?;
            Some(MountEntry {
                target: PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(target))),
                fstype: String::from_utf8_lossy(&unescape(fstype)).into_owned(),
                source: String::from_utf8_lossy(&unescape(source)).into_owned(),
                dev: dev.to_owned(),
            })
        })
        .collect()
}

fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The topmost mount at `target`, if `target` is a mount point.
pub fn mount_at(target: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|m| m.target == target)
}

/// Makes `mountpoint` absolute without touching it (a stale FUSE mount cannot be stat'ed).
pub fn absolute(mountpoint: &Path) -> io::Result<PathBuf> {
    let abs = std::path::absolute(mountpoint)?;
    // Normalise `.` and `..` lexically, as mountinfo lists normalised paths.
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
}

/// Whether the FUSE mount at `mountpoint` has lost its daemon. `statfs` always asks the
/// daemon (a `stat` may be answered from attributes the kernel still caches), so it fails with
/// `ENOTCONN` at once on a connection whose daemon died.
fn connection_lost(mountpoint: &Path) -> bool {
    matches!(
        nix::sys::statfs::statfs(mountpoint),
        Err(nix::errno::Errno::ENOTCONN | nix::errno::Errno::ECONNABORTED)
    )
}

/// Checks the mount point; clears a stale arenafs mount there (and only an arenafs one).
pub fn prepare_mountpoint(mountpoint: &Path) -> Result<(), MountError> {
    let err = |reason: String| MountError::MountPoint {
        path: mountpoint.to_path_buf(),
        reason,
    };
    if let Some(m) = mount_at(mountpoint) {
        if !connection_lost(mountpoint) {
            return Err(err(format!(
                "busy: already a mount point ({} from {})",
                m.fstype, m.source
            )));
        }
        if m.fstype != FSTYPE {
            return Err(err(format!(
                "transport endpoint is not connected: a stale {} mount that is not arenafs's; not touching it",
                m.fstype
            )));
        }
        nix::mount::umount2(mountpoint, MntFlags::MNT_DETACH)
            .map_err(|e| err(format!("cannot clear the stale arenafs mount: {e}")))?;
        tracing::warn!(
            mountpoint = %mountpoint.display(),
            "cleared a stale arenafs mount left by a daemon that died"
        );
        return prepare_mountpoint(mountpoint);
    }
    match std::fs::metadata(mountpoint) {
        Ok(md) if md.is_dir() => Ok(()),
        Ok(_) => Err(err("not a directory".into())),
        Err(e) => Err(err(e.to_string())),
    }
}

/// Mounts a FUSE file system of type `fuse.arenafs` at `mountpoint` and returns the `/dev/fuse`
/// descriptor to serve it with.
pub fn mount(
    source: &Path,
    mountpoint: &Path,
    opts: &KernelOptions,
) -> Result<OwnedFd, MountError> {
    let fail = |source: io::Error| MountError::Mount {
        path: mountpoint.to_path_buf(),
        source,
    };
    let dev: OwnedFd = File::options()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| {
            fail(io::Error::new(
                e.kind(),
                format!("/dev/fuse: {e} (is the fuse module loaded and are you root?)"),
            ))
        })?
        .into();
    let root_mode = std::fs::metadata(mountpoint).map_err(fail)?.mode() & libc::S_IFMT;
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={}",
        std::os::fd::AsRawFd::as_raw_fd(&dev),
        root_mode,
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    if opts.allow_other {
        data.push_str(",allow_other");
    }
    if opts.default_permissions {
        data.push_str(",default_permissions");
    }
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | opts.flags;
    if opts.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let src = CString::new(source.as_os_str().as_bytes()).map_err(|e| fail(io::Error::other(e)))?;
    nix::mount::mount(
        Some(src.as_c_str()),
        mountpoint,
        Some(FSTYPE),
        flags,
        Some(data.as_str()),
    )
    .map_err(|e| fail(e.into()))?;
    Ok(dev)
}

/// Unmounts `mountpoint`; if it is busy, detaches it lazily (open files keep working until
/// closed) and says so.
pub fn unmount(mountpoint: &Path) -> io::Result<()> {
    match nix::mount::umount2(mountpoint, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => {
            tracing::warn!(mountpoint = %mountpoint.display(), "mount busy; detaching it lazily");
            nix::mount::umount2(mountpoint, MntFlags::MNT_DETACH).map_err(Into::into)
        }
        Err(e) => Err(e.into()),
    }
}

/// systemd's path escaping (`systemd-escape --path`): `/opt/ComfyUI/models` →
/// `opt-ComfyUI-models`. Used to name the control socket of a mount.
pub fn systemd_escape_path(path: &Path) -> String {
    let s = path.as_os_str().as_bytes();
    let trimmed: Vec<&[u8]> = s.split(|&c| c == b'/').filter(|c| !c.is_empty()).collect();
    if trimmed.is_empty() {
        return "-".into();
    }
    let joined = trimmed.join(&b'/');
    let mut out = String::new();
    for (i, &c) in joined.iter().enumerate() {
        match c {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            c if c.is_ascii_alphanumeric() || c == b':' || c == b'_' || c == b'.' => {
                out.push(c as char)
            }
            c => out.push_str(&format!("\\x{c:02x}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parsing() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    99 22 0:50 / /mnt/with\\040space rw,nosuid - fuse.arenafs /nas/models rw,user_id=0\n\
                    100 22 0:51 / /x rw - fuse /dev/fuse rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].target, Path::new("/mnt/with space"));
        assert_eq!(m[1].fstype, FSTYPE);
        assert_eq!(m[1].source, "/nas/models");
        assert_eq!(m[1].dev, "0:50");
        assert_eq!(m[0].target, Path::new("/"));
        assert_eq!(m[2].fstype, "fuse");
    }

    #[test]
    fn escape_like_systemd() {
        assert_eq!(
            systemd_escape_path(Path::new("/opt/ComfyUI/models")),
            "opt-ComfyUI-models"
        );
        assert_eq!(systemd_escape_path(Path::new("/")), "-");
        assert_eq!(
            systemd_escape_path(Path::new("/a b/c-d/")),
            "a\\x20b-c\\x2dd"
        );
        assert_eq!(
            systemd_escape_path(Path::new("/.hidden/x")),
            "\\x2ehidden-x"
        );
    }

    #[test]
    fn absolute_normalises() {
        assert_eq!(
            absolute(Path::new("/a/./b/../c")).unwrap(),
            Path::new("/a/c")
        );
    }

    #[test]
    fn mountpoint_checks() {
        let dir = tempfile::tempdir().unwrap();
        assert!(prepare_mountpoint(dir.path()).is_ok());
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        assert!(
            prepare_mountpoint(&file)
                .unwrap_err()
                .to_string()
                .contains("not a directory")
        );
        assert!(prepare_mountpoint(&dir.path().join("missing")).is_err());
        assert!(
            prepare_mountpoint(Path::new("/proc"))
                .unwrap_err()
                .to_string()
                .contains("busy")
        );
    }
}
