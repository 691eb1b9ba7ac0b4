//! The one error type of the file-system core, and its one mapping to an errno.

use std::io;

use super::nasio::Waited;

/// Why a file-system operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The NAS (or the SSD, where said) answered with this error; its errno goes to the caller.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The NAS did not answer within `nas_timeout`.
    #[error("the NAS did not answer in time")]
    NasTimeout,
    /// The NAS is offline (the health probe says so): not asked at all.
    #[error("the NAS is offline")]
    Offline,
    /// Every NAS thread is busy (stuck in a hung NAS): not asked at all.
    #[error("too many NAS calls are stuck")]
    NasBusy,
    /// The inode is unknown (the kernel forgot it, or its name is gone).
    #[error("stale inode")]
    Stale,
    /// No open handle with this number.
    #[error("bad file handle")]
    BadHandle,
    /// A name the kernel never sends (`.`, `..`, a slash).
    #[error("invalid name")]
    InvalidName,
    /// Other handles of the file use an I/O mode this one cannot join.
    #[error("file busy")]
    Busy,
    /// Not a directory.
    #[error("not a directory")]
    NotDir,
    /// No such entry.
    #[error("no such file or directory")]
    NotFound,
    /// The daemon could not take the caller's identity for a change.
    #[error("cannot act as the caller: {0}")]
    Identity(io::Error),
    /// The handle does not allow this operation.
    #[error("operation not allowed on this handle")]
    WrongHandle,
    /// A name arenafs keeps on the NAS for itself (`.arenafs-*`).
    #[error("the name is reserved for arenafs")]
    Reserved,
}

impl FsError {
    /// The errno the caller gets.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            FsError::NasTimeout | FsError::Offline | FsError::NasBusy => libc::EIO,
            FsError::Stale => libc::ESTALE,
            FsError::BadHandle | FsError::WrongHandle => libc::EBADF,
            FsError::InvalidName => libc::EINVAL,
            FsError::Busy => libc::ETXTBSY,
            FsError::NotDir => libc::ENOTDIR,
            FsError::NotFound => libc::ENOENT,
            FsError::Reserved => libc::EPERM,
            FsError::Identity(_) => libc::EPERM,
        }
    }

    /// Whether the NAS did not answer (timed out, offline, or no thread to ask it on): the
    /// cases where an answer from the cache index may stand in.
    pub fn nas_unanswered(&self) -> bool {
        matches!(
            self,
            FsError::NasTimeout | FsError::Offline | FsError::NasBusy
        )
    }

    /// An expected miss, logged at debug level only.
    pub fn is_expected(&self) -> bool {
        matches!(self, FsError::NotFound)
            || matches!(self, FsError::Io(e) if e.raw_os_error() == Some(libc::ENOENT))
    }
}

impl From<Waited> for FsError {
    fn from(w: Waited) -> Self {
        match w {
            Waited::TimedOut => FsError::NasTimeout,
            Waited::Busy => FsError::NasBusy,
            Waited::GaveUp => FsError::Offline,
        }
    }
}

impl From<nix::Error> for FsError {
    fn from(e: nix::Error) -> Self {
        FsError::Io(e.into())
    }
}

impl From<crate::cache::FetchError> for FsError {
    fn from(e: crate::cache::FetchError) -> Self {
        match e {
            crate::cache::FetchError::Nas(e) => FsError::Io(e),
            _ => FsError::Io(io::Error::from_raw_os_error(libc::EIO)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos() {
        assert_eq!(FsError::NasTimeout.errno(), libc::EIO);
        assert_eq!(FsError::Offline.errno(), libc::EIO);
        assert_eq!(FsError::NasBusy.errno(), libc::EIO);
        assert_eq!(
            FsError::Io(io::Error::from_raw_os_error(libc::EDQUOT)).errno(),
            libc::EDQUOT
        );
        assert_eq!(FsError::Io(io::Error::other("x")).errno(), libc::EIO);
        assert_eq!(FsError::Busy.errno(), libc::ETXTBSY);
        assert_eq!(FsError::Stale.errno(), libc::ESTALE);
        assert!(FsError::NasBusy.nas_unanswered());
        assert!(!FsError::Stale.nas_unanswered());
        assert_eq!(FsError::from(Waited::GaveUp).errno(), libc::EIO);
    }
}
