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
    let switched = Switched {
        restore: Some((uid, gid, saved)),
    };
    // From here on, dropping `switched` restores the daemon's identity, also on failure.
    set_fs_ids(caller.uid, caller.gid)?;
    Ok(switched)
}

/// Sets this thread's file-system ids and checks that they took: `setfsuid`/`setfsgid` return
/// the previous id whether or not they succeeded, so the result is read back with an invalid
/// id (-1), which changes nothing.
fn set_fs_ids(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: per-thread identity changes and reads.
    let (now_gid, now_uid) = unsafe {
        libc::setfsgid(gid);
        libc::setfsuid(uid);
        (libc::setfsgid(u32::MAX), libc::setfsuid(u32::MAX))
    };
    if (now_uid as u32, now_gid as u32) != (uid, gid) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("could not switch to uid {uid} gid {gid} (still uid {now_uid} gid {now_gid})"),
        ));
    }
    Ok(())
}

impl Drop for Switched {
    fn drop(&mut self) {
        if let Some((uid, gid, groups)) = self.restore.take() {
            if let Err(e) = set_fs_ids(uid, gid) {
                tracing::error!(error = %e, "could not restore the daemon's identity");
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

    /// Whether the root-only tests can run; under `CI=true` they must.
    fn root() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "this test needs root, and CI runs as root"
            );
            eprintln!("skipping: needs root");
        }
        root
    }

    #[test]
    fn switching_changes_only_this_thread() {
        if !root() {
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

#[cfg(test)]
mod switch_failure {
    use super::*;

    /// A switch the kernel refuses is an error, not a silent "still root". Without
    /// CAP_SETUID/CAP_SETGID a thread can only switch to its own ids, so a thread that dropped
    /// them (by switching to nobody first) cannot switch to another user.
    #[test]
    fn a_refused_switch_is_an_error() {
        if !tests_root() {
            return;
        }
        std::thread::spawn(|| {
            let _nobody = switch(&Caller::fixed(65534, 65534)).unwrap();
            // The fs ids are nobody's now, but the thread keeps its capabilities: to see a
            // refusal, drop CAP_SETUID/CAP_SETGID from this thread's effective set.
            caps_drop_setid();
            let err = set_fs_ids(1234, 1234).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        })
        .join()
        .unwrap();
    }

    fn tests_root() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "needs root");
        }
        root
    }

    /// Clears CAP_SETUID and CAP_SETGID from this thread's effective set (capset(2) acts on
    /// the calling thread).
    fn caps_drop_setid() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const V3: u32 = 0x2008_0522;
        let mut h = Header {
            version: V3,
            pid: 0,
        };
        let mut d = [Data::default(); 2];
        // SAFETY: capget/capset with a v3 header and two data structs, as the ABI asks.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()), 0);
            // capability(7): CAP_SETGID is 6, CAP_SETUID is 7.
            let clear = !((1u32 << 7) | (1u32 << 6));
            d[0].effective &= clear;
            h.version = V3;
            assert_eq!(libc::syscall(libc::SYS_capset, &h, d.as_ptr()), 0);
        }
    }
}
