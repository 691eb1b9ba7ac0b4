//! The one-I/O-mode-per-inode rule, as a state machine.
//!
//! The kernel lets an inode's open handles use kernel passthrough only all together and only to
//! one backing file; page-cache handles (served by the daemon) cannot be open beside them. Every
//! open of a file — reader, writer, offline or during a NAS hang — asks this machine how to join
//! the handles already open, then tells it what it did. It holds no file and does no I/O, so the
//! decisions are tested here without FUSE.
//!
//! The rules:
//! - Handles of an inode share one mode: [`Mode::Passthrough`] to one backing file (the SSD copy
//!   for readers, the NAS file once a writer opened it) or [`Mode::Daemon`].
//! - A reader of an unchanged SSD copy shares its backing file; a reader of a file written
//!   through the mount shares the NAS backing file when it was opened readable; otherwise the
//!   open is refused with `ETXTBSY` until the other handles close.
//! - A writer first waits until no reader holds the SSD copy through passthrough, then
//!   *reserves* the inode: from then on no reader starts passthrough to the SSD copy (they read
//!   the NAS through the daemon), so the writer's NAS open (with `O_TRUNC`, possibly) is never
//!   followed by a refusal.

use std::sync::{Arc, Weak};

use crate::source::Identity;

/// The backing file of passthrough handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingFile {
    /// The SSD copy of the NAS file with this identity.
    Copy(Identity),
    /// The NAS file itself (a writer opened it); `readable`: opened for reading too.
    Nas {
        /// Whether readers may share it.
        readable: bool,
    },
}

/// How the open handles of an inode do their I/O.
#[derive(Debug)]
pub enum Mode<B> {
    /// No handle open.
    Idle,
    /// Kernel passthrough to one backing file, registered as `backing`.
    Passthrough {
        /// The registration all handles share (alive while one of them is).
        backing: Weak<B>,
        /// What it is.
        file: BackingFile,
    },
    /// Reads and writes go through the daemon (page-cache I/O).
    Daemon,
}

/// What a reader's open should do.
#[derive(Debug)]
pub enum ReaderPlan<B> {
    /// Use passthrough with the backing file the other handles use.
    Share(Arc<B>),
    /// Register the SSD copy as backing file, then call [`InodeIo::joined_passthrough`].
    StartCopyPassthrough,
    /// Read through the daemon, then call [`InodeIo::joined_daemon`]. `nas_only`: a writer has
    /// the file, so the cache copy is not its content.
    Daemon {
        /// Read the NAS, not a cache copy.
        nas_only: bool,
    },
    /// The other handles use a mode this open cannot join: `ETXTBSY`.
    Refuse,
}

/// What a writer's open should do once it holds its reservation and its NAS file.
#[derive(Debug, PartialEq, Eq)]
pub enum WriterPlan<B> {
    /// Use passthrough with the NAS backing file the other handles use.
    Share(Arc<B>),
    /// Register the NAS file as backing file, then call [`InodeIo::joined_passthrough`].
    StartNasPassthrough,
    /// Write through the daemon, then call [`InodeIo::joined_daemon`].
    Daemon,
    /// `ETXTBSY` (call [`InodeIo::cancel_writer`]).
    Refuse,
}

/// The I/O state of one inode.
#[derive(Debug)]
pub struct InodeIo<B> {
    mode: Mode<B>,
    /// Handles open.
    open: u32,
    /// Writers open or reserved.
    writers: u32,
}

impl<B> Default for InodeIo<B> {
    fn default() -> Self {
        Self {
            mode: Mode::Idle,
            open: 0,
            writers: 0,
        }
    }
}

impl<B> InodeIo<B> {
    /// Handles open.
    pub fn open(&self) -> u32 {
        self.open
    }

    /// Whether a writer has the file open (or is opening it).
    pub fn writing(&self) -> bool {
        self.writers > 0
    }

    /// The mode of the open handles.
    pub fn mode(&self) -> &Mode<B> {
        &self.mode
    }

    /// For handles reading the SSD copy through passthrough: the identity of the NAS file that
    /// copy holds (what the kernel serves them, whatever the NAS holds now).
    pub fn held(&self) -> Option<Identity> {
        match &self.mode {
            Mode::Passthrough {
                file: BackingFile::Copy(id),
                ..
            } if self.open > 0 => Some(*id),
            _ => None,
        }
    }

    /// Whether readers hold the SSD copy through passthrough (a writer must wait for them).
    pub fn copy_readers(&self) -> bool {
        self.held().is_some()
    }

    /// How a reader of the NAS file with `identity` joins. `complete`: a complete SSD copy of
    /// it exists; `passthrough`: the kernel offers passthrough.
    pub fn plan_reader(
        &self,
        identity: Identity,
        complete: bool,
        passthrough: bool,
    ) -> ReaderPlan<B> {
        if self.open > 0
            && let Mode::Passthrough { backing, file } = &self.mode
        {
            let usable = match file {
                // The SSD copy: only while it is still the NAS file's content.
                BackingFile::Copy(held) => *held == identity,
                // The NAS file itself: live bytes, if it was opened readable.
                BackingFile::Nas { readable } => *readable,
            };
            return match backing.upgrade() {
                Some(b) if usable => ReaderPlan::Share(b),
                _ => ReaderPlan::Refuse,
            };
        }
        let nas_only = self.writing();
        if self.open == 0 && complete && passthrough && !nas_only {
            ReaderPlan::StartCopyPassthrough
        } else {
            ReaderPlan::Daemon { nas_only }
        }
    }

    /// How a reader joins while the NAS does not answer: only the SSD copy (of `identity`, as
    /// the index recorded it) can be served.
    pub fn plan_offline_reader(&self, identity: Identity, passthrough: bool) -> ReaderPlan<B> {
        match self.plan_reader(identity, true, passthrough) {
            ReaderPlan::Daemon { nas_only: true } => ReaderPlan::Refuse,
            plan => plan,
        }
    }

    /// A writer asks to open: `false` while readers hold the SSD copy through passthrough (wait
    /// and ask again), else the inode is reserved for it and readers no longer start passthrough
    /// to the copy. Follow with [`Self::plan_writer`] or [`Self::cancel_writer`].
    pub fn reserve_writer(&mut self) -> bool {
        if self.copy_readers() {
            return false;
        }
        self.writers += 1;
        true
    }

    /// Ends a reservation that did not lead to an open handle.
    pub fn cancel_writer(&mut self) {
        self.writers = self.writers.saturating_sub(1);
    }

    /// How a reserved writer joins. `write_only`: opened `O_WRONLY` (then a NAS backing file that
    /// is not readable is fine).
    pub fn plan_writer(&self, write_only: bool, passthrough: bool) -> WriterPlan<B> {
        debug_assert!(self.writers > 0, "plan_writer without a reservation");
        if self.open > 0 {
            return match &self.mode {
                Mode::Passthrough {
                    backing,
                    file: BackingFile::Nas { readable },
                } if write_only || *readable => match backing.upgrade() {
                    Some(b) => WriterPlan::Share(b),
                    None => WriterPlan::Refuse,
                },
                Mode::Passthrough { .. } => WriterPlan::Refuse,
                Mode::Daemon | Mode::Idle => WriterPlan::Daemon,
            };
        }
        if passthrough {
            WriterPlan::StartNasPassthrough
        } else {
            WriterPlan::Daemon
        }
    }

    /// A handle started passthrough to `backing`, newly registered for `file` (the plans'
    /// `Start…`).
    pub fn joined_passthrough(&mut self, backing: &Arc<B>, file: BackingFile) {
        debug_assert!(self.open == 0, "new backing file beside open handles");
        self.mode = Mode::Passthrough {
            backing: Arc::downgrade(backing),
            file,
        };
        self.open += 1;
    }

    /// A handle shares the backing file of the open handles (the plans' `Share`).
    pub fn joined_shared(&mut self) {
        debug_assert!(matches!(self.mode, Mode::Passthrough { .. }));
        self.open += 1;
    }

    /// What the passthrough handles' backing file is, if they have one.
    pub fn backing_file(&self) -> Option<BackingFile> {
        match &self.mode {
            Mode::Passthrough { file, .. } if self.open > 0 => Some(*file),
            _ => None,
        }
    }

    /// A handle joined in daemon mode.
    pub fn joined_daemon(&mut self) {
        debug_assert!(
            self.open == 0 || matches!(self.mode, Mode::Daemon),
            "daemon handle beside passthrough handles"
        );
        self.mode = Mode::Daemon;
        self.open += 1;
    }

    /// A handle closed; `writer`: it was a writer's.
    pub fn released(&mut self, writer: bool) {
        self.open = self.open.saturating_sub(1);
        if writer {
            self.writers = self.writers.saturating_sub(1);
        }
        if self.open == 0 {
            self.mode = Mode::Idle;
        }
    }

    /// The NAS file's metadata changed but not its bytes (chmod, utimes): readers of the SSD
    /// copy may go on sharing it under the new identity.
    pub fn rehold(&mut self, identity: Identity) {
        if let Mode::Passthrough {
            file: BackingFile::Copy(held),
            ..
        } = &mut self.mode
        {
            *held = identity;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(size: u64) -> Identity {
        Identity {
            size,
            mtime_ns: 1,
            ino: 2,
            ctime_ns: 0,
        }
    }

    /// A stand-in for a kernel backing registration.
    #[derive(Debug, PartialEq, Eq)]
    struct Token(u32);

    #[test]
    fn readers_share_the_copy_while_it_is_unchanged() {
        let mut io = InodeIo::<Token>::default();
        assert!(matches!(
            io.plan_reader(id(5), true, true),
            ReaderPlan::StartCopyPassthrough
        ));
        let b = Arc::new(Token(1));
        io.joined_passthrough(&b, BackingFile::Copy(id(5)));
        assert_eq!(io.held(), Some(id(5)));
        match io.plan_reader(id(5), true, true) {
            ReaderPlan::Share(s) => assert!(Arc::ptr_eq(&s, &b)),
            other => panic!("{other:?}"),
        }
        io.joined_shared();
        // The NAS file changed: a new open cannot join the old copy.
        assert!(matches!(
            io.plan_reader(id(6), false, true),
            ReaderPlan::Refuse
        ));
        io.released(false);
        io.released(false);
        assert!(matches!(io.mode(), Mode::Idle));
        assert_eq!(io.held(), None);
        assert!(matches!(
            io.plan_reader(id(6), false, true),
            ReaderPlan::Daemon { nas_only: false }
        ));
    }

    #[test]
    fn without_passthrough_or_a_complete_copy_readers_use_the_daemon() {
        let mut io = InodeIo::<Token>::default();
        assert!(matches!(
            io.plan_reader(id(5), true, false),
            ReaderPlan::Daemon { nas_only: false }
        ));
        io.joined_daemon();
        // A complete copy does not start passthrough beside a daemon handle.
        assert!(matches!(
            io.plan_reader(id(5), true, true),
            ReaderPlan::Daemon { .. }
        ));
    }

    #[test]
    fn a_writer_waits_for_copy_readers_then_reserves() {
        let mut io = InodeIo::<Token>::default();
        let b = Arc::new(Token(1));
        io.joined_passthrough(&b, BackingFile::Copy(id(5)));
        assert!(!io.reserve_writer(), "copy readers: wait");
        io.released(false);
        assert!(io.reserve_writer());
        // A reader arriving between the reservation and the writer's NAS open reads the NAS
        // through the daemon: it must not start passthrough to the old copy.
        match io.plan_reader(id(5), true, true) {
            ReaderPlan::Daemon { nas_only } => assert!(nas_only),
            other => panic!("{other:?}"),
        }
        io.joined_daemon();
        // The writer joins the reader's mode instead of being refused.
        assert_eq!(io.plan_writer(false, true), WriterPlan::Daemon);
        io.joined_daemon();
        io.released(false);
        io.released(true);
        assert!(!io.writing());
        assert!(matches!(io.mode(), Mode::Idle));
    }

    #[test]
    fn writers_share_the_nas_backing_file() {
        let mut io = InodeIo::<Token>::default();
        assert!(io.reserve_writer());
        assert_eq!(io.plan_writer(true, true), WriterPlan::StartNasPassthrough);
        let b = Arc::new(Token(2));
        io.joined_passthrough(&b, BackingFile::Nas { readable: false });
        // A second writer O_WRONLY shares it; an O_RDWR one cannot read through it.
        assert!(io.reserve_writer());
        assert_eq!(io.plan_writer(true, true), WriterPlan::Share(b.clone()));
        io.joined_shared();
        assert!(io.reserve_writer());
        assert_eq!(io.plan_writer(false, true), WriterPlan::Refuse);
        io.cancel_writer();
        // Readers cannot read through a write-only backing file.
        assert!(matches!(
            io.plan_reader(id(1), false, true),
            ReaderPlan::Refuse
        ));
        io.released(true);
        io.released(true);
        assert!(!io.writing());

        let mut io = InodeIo::<Token>::default();
        assert!(io.reserve_writer());
        io.joined_passthrough(&b, BackingFile::Nas { readable: true });
        match io.plan_reader(id(1), true, true) {
            ReaderPlan::Share(s) => assert!(Arc::ptr_eq(&s, &b)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_cancelled_reservation_frees_the_copy() {
        let mut io = InodeIo::<Token>::default();
        assert!(io.reserve_writer());
        io.cancel_writer();
        assert!(matches!(
            io.plan_reader(id(5), true, true),
            ReaderPlan::StartCopyPassthrough
        ));
    }

    #[test]
    fn a_dropped_registration_is_not_shared() {
        let mut io = InodeIo::<Token>::default();
        {
            let b = Arc::new(Token(3));
            io.joined_passthrough(&b, BackingFile::Copy(id(5)));
        }
        assert!(matches!(
            io.plan_reader(id(5), true, true),
            ReaderPlan::Refuse
        ));
    }

    #[test]
    fn offline_readers_only_get_the_copy() {
        let mut io = InodeIo::<Token>::default();
        assert!(matches!(
            io.plan_offline_reader(id(5), true),
            ReaderPlan::StartCopyPassthrough
        ));
        assert!(matches!(
            io.plan_offline_reader(id(5), false),
            ReaderPlan::Daemon { nas_only: false }
        ));
        assert!(io.reserve_writer());
        assert!(matches!(
            io.plan_offline_reader(id(5), true),
            ReaderPlan::Refuse
        ));
    }

    #[test]
    fn metadata_changes_keep_readers_sharing() {
        let mut io = InodeIo::<Token>::default();
        let b = Arc::new(Token(1));
        io.joined_passthrough(&b, BackingFile::Copy(id(5)));
        let touched = Identity {
            mtime_ns: 99,
            ..id(5)
        };
        io.rehold(touched);
        assert!(matches!(
            io.plan_reader(touched, true, true),
            ReaderPlan::Share(_)
        ));
    }
}
