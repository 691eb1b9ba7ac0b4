//! Running NAS operations as the calling user.
//!
//! Changes to the NAS are made with the caller's file-system identity: per-thread `setfsuid`,
//! `setfsgid` and supplementary groups (the raw `setgroups` system call, which, unlike glibc's
//! wrapper, changes only the calling thread). Files then come out owned as if the user had
//! written to the NAS directly, the NAS checks permissions itself, and an NFS export with
//! `root_squash` does not turn every write into `nobody`'s. `write_as=UID:GID` fixes one identity
//! instead.
//!
//! The first switch on a thread also gives it its own umask (`unshare(CLONE_FS)`, umask 0): the
//! kernel has already applied the caller's umask to the modes it sends, and the daemon's must
//! not be applied a second time. Other threads keep the process umask.

use std::cell::Cell;
use std::io;

/// Who a change is made as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// File-system user id.
    pub uid: u32,
    /// File-system group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Caller {
    /// The caller of a request: its ids and, read from `/proc/PID/status`, its supplementary
    /// groups (none if the process is gone).
    pub fn of(uid: u32, gid: u32, pid: u32) -> Self {
        let groups = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                    g.split_whitespace()
                        .filter_map(|n| n.parse().ok())
                        .collect()
                })
            })
            .unwrap_or_default();
        Self { uid, gid, groups }
    }

    /// A fixed identity without supplementary groups.
    pub fn fixed(uid: u32, gid: u32) -> Self {
        Self {
            uid,
            gid,
            groups: Vec::new(),
        }
    }
}

thread_local! {
    static OWN_UMASK: Cell<bool> = const { Cell::new(false) };
}

fn own_umask() -> io::Result<()> {
    if OWN_UMASK.with(Cell::get) {
        return Ok(());
    }
    // SAFETY: unshare(CLONE_FS) only detaches this thread's cwd/root/umask.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sets this thread's (now private) umask.
    unsafe { libc::umask(0) };
    OWN_UMASK.with(|c| c.set(true));
    Ok(())
}

fn setgroups(groups: &[u32]) -> io::Result<()> {
    // SAFETY: the raw system call with a valid array; it affects this thread only.
    let r = unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            groups.len() as libc::size_t,
            groups.as_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The identity of this thread while it lasts; dropping it restores the daemon's.
#[must_use]
pub struct Switched {
    restore: Option<(u32, u32, Vec<u32>)>,
}

/// Makes this thread act as `caller` for file-system checks until the guard is dropped.
pub fn switch(caller: &Caller) -> io::Result<Switched> {
    own_umask()?;
    // SAFETY: plain getters.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if caller.uid == uid && caller.gid == gid {
        return Ok(Switched { restore: None });
    }
    let saved = nix::unistd::getgroups()
        .map(|g| g.into_iter().map(|g| g.as_raw()).collect::<Vec<_>>())
        .unwrap_or_default();
    let groups = if caller.groups.is_empty() {
        vec![caller.gid]
    } else {
        caller.groups.clone()
    };
    setgroups(&groups)?;
    // SAFETY: per-thread identity changes; the previous values are restored on drop.
    unsafe {
        libc::setfsgid(caller.gid);
        libc::setfsuid(caller.uid);
    }
    Ok(Switched {
        restore: Some((uid, gid, saved)),
    })
}

impl Drop for Switched {
    fn drop(&mut self) {
        if let Some((uid, gid, groups)) = self.restore.take() {
            // SAFETY: restores this thread's identity.
            unsafe {
                libc::setfsuid(uid);
                libc::setfsgid(gid);
            }
            if let Err(e) = setgroups(&groups) {
                tracing::error!(error = %e, "could not restore the daemon's groups");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_supplementary_groups() {
        let me = std::process::id();
        let c = Caller::of(1, 2, me);
        let expected: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        assert_eq!(c.groups, expected);
        assert!(Caller::of(1, 2, u32::MAX).groups.is_empty());
    }

    #[test]
    fn switching_changes_only_this_thread() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let p = dir.path().join("made-by-nobody");
        std::thread::spawn({
            let p = p.clone();
            move || {
                let _g = switch(&Caller::fixed(65534, 65534)).unwrap();
                std::fs::write(&p, b"x").unwrap();
                // Root's file cannot be written as nobody.
                assert!(std::fs::write("/etc/arenafs-test-denied", b"x").is_err());
            }
        })
        .join()
        .unwrap();
        let md = std::fs::metadata(&p).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((md.uid(), md.gid()), (65534, 65534));
        // This thread is still root.
        let q = dir.path().join("made-by-root");
        std::fs::write(&q, b"y").unwrap();
        assert_eq!(std::fs::metadata(&q).unwrap().uid(), 0);
    }
}
