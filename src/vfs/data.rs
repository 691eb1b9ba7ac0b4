//! Opening files for reading, reading them, closing them.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use nix::sys::stat::FileStat;

use super::iomode::{BackingFile, ReaderPlan};
use super::{FsError, Handle, HandleKind, OpenMode, Opened, Register, Vfs};
use crate::cache::{CacheFile, FetchError, Found, Perms, Rest};
use crate::config::{CacheState, Discovery};
use crate::policy::{Decision, category_of};
use crate::source::pread_full;
use crate::stats::Stats;
use crate::worker::Reason;

impl Vfs {
    /// Opens inode `ino` with open(2) `flags` (a writer's open when it writes or truncates).
    pub fn open(
        self: &Arc<Self>,
        ino: u64,
        flags: i32,
        caller: &super::Caller,
        register: Register,
    ) -> Result<Opened, FsError> {
        let rel = self.path(ino)?;
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return self.open_writer(ino, &rel, flags, caller, register);
        }
        let nas_rel = rel.clone();
        let opened = self.nas(move |nas| {
            let f = nas.open_file(&nas_rel)?;
            let st = nix::sys::stat::fstat(&f)?;
            Ok((f, st))
        });
        let exec = flags & FMODE_EXEC != 0;
        match opened {
            Ok((file, st)) => self.open_reader(ino, &rel, file, &st, exec, register),
            Err(e) if e.nas_unanswered() => self.open_from_index(ino, &rel, register).map_err(
                |why| {
                    tracing::debug!(path = %rel.display(), error = %why, "no complete copy to serve without the NAS");
                    e
                },
            ),
            Err(e) => Err(e),
        }
    }

    /// Decides how a reader of `rel` (NAS file `nas`, just opened) reads, and registers it.
    fn open_reader(
        &self,
        ino: u64,
        rel: &Path,
        nas: File,
        st: &FileStat,
        exec: bool,
        register: Register,
    ) -> Result<Opened, FsError> {
        let identity = self.cache.rule().identity(st);
        let attr = self.attr_of(st);
        // While the file is open for writing through the mount, readers read the NAS.
        let writing = self.inodes.lock().get_mut(ino).is_some_and(|n| n.writing());
        // Red makes copies; green only serves complete ones; gray never gets here (Disabled).
        // A file modified too recently is not copied yet (coarse NAS timestamps).
        let settings = self.live.settings();
        let making = settings.state() == CacheState::Red
            && crate::source::unstable_for(&identity, settings.stable_after).is_zero();
        let cacheable =
            !writing && self.live.policy().decide(rel, identity.size) == Decision::Cache;
        // A copy found is pinned (kept from eviction) until the handle closes.
        let mut found = Found::None;
        if cacheable {
            match self
                .cache
                .find(rel, identity, Some(Perms::of(st)), making, true)
            {
                Ok(Found::Partial(_)) if !making => self.cache.close_ref(rel),
                Ok(f) => found = f,
                Err(e) => {
                    tracing::warn!(path = %rel.display(), error = %e, "cache unavailable; reading from the NAS")
                }
            }
        }
        let pinned = !matches!(found, Found::None);
        if let Found::Partial(cf) = &found
            && self.worker.is_required(rel)
            && !cf.queued.swap(true, Ordering::AcqRel)
        {
            self.worker
                .enqueue(rel, Reason::Required, cf.identity().size);
        }
        if cacheable {
            let hit = matches!(found, Found::Complete(_));
            self.stats.category(category_of(rel), |c| {
                if hit { c.hits += 1 } else { c.misses += 1 }
            });
        }
        // The SSD copy is opened before the inode is locked.
        let mut ssd = None;
        if let Found::Complete(path) = &found {
            match File::open(path) {
                Ok(f) => ssd = Some(f),
                Err(e) => {
                    tracing::warn!(path = %rel.display(), error = %e, "cache copy unreadable; dropping it");
                    self.cache.close_ref(rel);
                    let _ = self.cache.discard(rel);
                    found = Found::None;
                }
            }
        }
        let unpin = |pinned: bool| {
            if pinned {
                self.cache.close_ref(rel);
            }
        };
        let pinned = pinned && !matches!(found, Found::None);

        let mut inodes = self.inodes.lock();
        let Some(node) = inodes.get_mut(ino) else {
            drop(inodes);
            unpin(pinned);
            return Err(FsError::Stale);
        };
        let keep_cache = node.opened().last_identity == Some(identity) && !node.writing();
        // Changed on the NAS since the kernel was last told its attributes: what the kernel
        // caches of it (the size, say) is out of date, whatever its attribute timeout.
        let changed = node.shown.is_some_and(|s| s != (attr.size, attr.mtime));
        node.shown = Some((attr.size, attr.mtime));
        node.opened().last_identity = Some(identity);
        let stale = node.opened().stale.clone();
        let complete = ssd.is_some();
        let passthrough = self.passthrough_ok.load(Ordering::Relaxed);
        let mut handle = Handle {
            ino,
            kind: HandleKind::Nas,
            nas: Some(nas),
            cache_ref: None,
            stale,
            writer: false,
            exec,
            identity: Some(identity),
            attr,
        };
        let mode = match node
            .opened()
            .io
            .plan_reader(identity, complete, passthrough)
        {
            ReaderPlan::Share(backing) => {
                node.opened().io.joined_shared();
                let copy = matches!(node.opened().io.backing_file(), Some(BackingFile::Copy(_)));
                drop(inodes);
                // Sharing the NAS file a writer opened: the copy is not what it reads.
                if copy {
                    handle.cache_ref = pinned.then(|| rel.to_path_buf());
                } else {
                    unpin(pinned);
                }
                handle.kind = HandleKind::Passthrough {
                    backing: backing.clone(),
                    copy,
                };
                Stats::add(&self.stats.opens_passthrough, 1);
                OpenMode::Passthrough(backing)
            }
            ReaderPlan::Refuse => {
                drop(inodes);
                unpin(pinned);
                tracing::warn!(
                    path = %rel.display(),
                    "the file changed while other handles still read it through passthrough; refusing the open until they close"
                );
                return Err(FsError::Busy);
            }
            ReaderPlan::StartCopyPassthrough => {
                let data = ssd.take().expect("a complete copy was opened");
                match register(&data) {
                    Ok(b) => {
                        let b = Arc::new(b);
                        node.opened()
                            .io
                            .joined_passthrough(&b, BackingFile::Copy(identity));
                        drop(inodes);
                        handle.cache_ref = Some(rel.to_path_buf());
                        handle.kind = HandleKind::Passthrough {
                            backing: b.clone(),
                            copy: true,
                        };
                        Stats::add(&self.stats.opens_passthrough, 1);
                        OpenMode::Passthrough(b)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "passthrough unavailable; serving copies from user space");
                        self.passthrough_ok.store(false, Ordering::Relaxed);
                        node.opened().io.joined_daemon();
                        drop(inodes);
                        handle.cache_ref = Some(rel.to_path_buf());
                        handle.kind = HandleKind::Ssd(data);
                        Stats::add(&self.stats.opens_ssd, 1);
                        OpenMode::Daemon { keep_cache }
                    }
                }
            }
            ReaderPlan::Daemon { nas_only } => {
                node.opened().io.joined_daemon();
                drop(inodes);
                match (found, ssd, nas_only) {
                    (Found::Complete(_), Some(data), false) => {
                        handle.cache_ref = Some(rel.to_path_buf());
                        handle.kind = HandleKind::Ssd(data);
                        Stats::add(&self.stats.opens_ssd, 1);
                    }
                    (Found::Partial(cf), _, false) => {
                        handle.cache_ref = Some(rel.to_path_buf());
                        handle.kind = HandleKind::Fill(cf);
                        Stats::add(&self.stats.opens_filling, 1);
                    }
                    _ => {
                        unpin(pinned);
                        Stats::add(&self.stats.opens_nas, 1);
                    }
                }
                OpenMode::Daemon { keep_cache }
            }
        };
        if exec && let Some(node) = self.inodes.lock().get_mut(ino) {
            node.opened().executing += 1;
        }
        if changed {
            self.forget_attributes(ino);
        }
        let fh = self.new_fh();
        // The handle exists before the kernel can send a read for it.
        self.handles.lock().insert(fh, Arc::new(handle));
        Ok(Opened { fh, mode })
    }

    /// Opens the complete copy of `rel` without the NAS (read-only opens while the NAS does not
    /// answer); anything else fails.
    fn open_from_index(&self, ino: u64, rel: &Path, register: Register) -> Result<Opened, FsError> {
        if !self.opts.offline_copies {
            return Err(FsError::Offline);
        }
        let rec = self
            .cache
            .store()
            .get(rel)
            .filter(|e| e.is_complete())
            .ok_or(FsError::Offline)?;
        // The identity recorded at the last check, as the rule in force sees it.
        let identity = self.cache.rule().mask(rec.identity);
        // Pinned against eviction like any open copy (found under the path's lock).
        let path = match self.cache.find(rel, identity, None, false, true) {
            Ok(Found::Complete(p)) => p,
            Ok(Found::Partial(_)) => {
                self.cache.close_ref(rel);
                return Err(FsError::Offline);
            }
            _ => return Err(FsError::Offline),
        };
        let unpin = || self.cache.close_ref(rel);
        let data = File::open(&path).map_err(|e| {
            unpin();
            FsError::Io(e)
        })?;
        let attr = self.index_attr(rel).inspect_err(|_| unpin())?;
        let passthrough = self.passthrough_ok.load(Ordering::Relaxed);
        let mut inodes = self.inodes.lock();
        let Some(node) = inodes.get_mut(ino) else {
            drop(inodes);
            unpin();
            return Err(FsError::Stale);
        };
        let mut handle = Handle {
            ino,
            kind: HandleKind::Nas,
            nas: None,
            cache_ref: Some(rel.to_path_buf()),
            stale: node.opened().stale.clone(),
            writer: false,
            exec: false,
            identity: Some(identity),
            attr,
        };
        let mode = match node.opened().io.plan_offline_reader(identity, passthrough) {
            ReaderPlan::Share(b)
                if matches!(node.opened().io.backing_file(), Some(BackingFile::Copy(_))) =>
            {
                node.opened().io.joined_shared();
                handle.kind = HandleKind::Passthrough {
                    backing: b.clone(),
                    copy: true,
                };
                OpenMode::Passthrough(b)
            }
            ReaderPlan::StartCopyPassthrough => match register(&data) {
                Ok(b) => {
                    let b = Arc::new(b);
                    node.opened()
                        .io
                        .joined_passthrough(&b, BackingFile::Copy(identity));
                    handle.kind = HandleKind::Passthrough {
                        backing: b.clone(),
                        copy: true,
                    };
                    OpenMode::Passthrough(b)
                }
                Err(_) => {
                    node.opened().io.joined_daemon();
                    handle.kind = HandleKind::Ssd(data);
                    OpenMode::Daemon { keep_cache: false }
                }
            },
            ReaderPlan::Daemon { nas_only: false } => {
                node.opened().io.joined_daemon();
                handle.kind = HandleKind::Ssd(data);
                OpenMode::Daemon { keep_cache: false }
            }
            // The NAS file itself is what the other handles use: not without the NAS.
            _ => {
                drop(inodes);
                unpin();
                return Err(FsError::Offline);
            }
        };
        drop(inodes);
        Stats::add(&self.stats.opens_offline, 1);
        let fh = self.new_fh();
        self.handles.lock().insert(fh, Arc::new(handle));
        Ok(Opened { fh, mode })
    }

    /// Reads `size` bytes at `offset` through handle `fh`.
    pub fn read(self: &Arc<Self>, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let h = self.handle(fh)?;
        let started = std::time::Instant::now();
        let result = self.read_handle(&h, offset, size);
        let latency = &self.stats.read_latency;
        match &h.kind {
            HandleKind::Ssd(_) => latency.ssd.observe(started.elapsed()),
            HandleKind::Fill(_) => latency.fill.observe(started.elapsed()),
            HandleKind::Nas | HandleKind::Write => latency.nas.observe(started.elapsed()),
            HandleKind::Passthrough { .. } => {}
        }
        if result.is_err() {
            Stats::add(&self.stats.read_errors, 1);
        }
        result
    }

    fn read_handle(
        self: &Arc<Self>,
        h: &Arc<Handle>,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, FsError> {
        // A read that fetches from the NAS checks the NAS file's identity in the same trip to
        // the NAS pool (below); the others check it here.
        let fetches = matches!(&h.kind, HandleKind::Fill(cf) if !cf.has_range(offset, size));
        if h.reads_copy() && !fetches {
            self.check_copy_still_current(h);
        }
        // The file changed (through the mount, or on the NAS) since this handle opened its
        // copy: the copy is not the NAS file's content any more.
        let from_nas = match &h.kind {
            HandleKind::Passthrough { .. } => return Err(FsError::WrongHandle), // the kernel reads these
            HandleKind::Nas | HandleKind::Write => true,
            HandleKind::Ssd(_) | HandleKind::Fill(_) => h.stale.load(Ordering::Acquire),
        };
        if from_nas {
            // A reader waiting on the NAS: background copies yield to it.
            let _fg =
                (!matches!(h.kind, HandleKind::Write)).then(|| self.worker.foreground().enter());
            return self.read_nas(h, offset, size);
        }
        match &h.kind {
            HandleKind::Ssd(f) => match read_at(f, offset, size) {
                Ok(buf) => {
                    Stats::add(&self.stats.bytes_from_ssd, buf.len() as u64);
                    Ok(buf)
                }
                // The SSD failed under an open copy: the NAS still has the bytes.
                Err(e) if h.nas.is_some() => {
                    tracing::warn!(error = %e, "cache copy unreadable; reading the NAS");
                    self.copy_went_stale(h);
                    self.read_nas(h, offset, size)
                }
                Err(e) => Err(FsError::Io(e)),
            },
            HandleKind::Fill(cf) => {
                // Bytes already on the SSD are read on this thread, which never waits for the
                // NAS: bytes that went missing since `has_range` (a rest that failed) are read
                // through the pool below.
                if !fetches {
                    match cf.read_cached(offset, size) {
                        Ok(buf) => {
                            self.note_loading(cf, buf.len() as u64);
                            Stats::add(&self.stats.bytes_from_ssd, buf.len() as u64);
                            return Ok(buf);
                        }
                        Err(FetchError::NotCached) => {}
                        Err(e) => {
                            self.fill_failed(cf, e)?;
                            return self.read_nas(h, offset, size);
                        }
                    }
                }
                let _fg = self.worker.foreground().enter();
                let (this, hh, cf) = (self.clone(), h.clone(), cf.clone());
                self.nas(move |_| {
                    if this.copy_changed(&hh) {
                        this.copy_went_stale(&hh);
                    }
                    if hh.stale.load(Ordering::Acquire) {
                        return this.read_nas_here(&hh, offset, size);
                    }
                    match this.read_fill(&hh, &cf, offset, size)? {
                        Some(buf) => Ok(buf),
                        None => this.read_nas_here(&hh, offset, size),
                    }
                })
            }
            _ => unreachable!("handled above"),
        }
    }

    /// Reads the NAS file of handle `h`, within the deadline.
    fn read_nas(
        self: &Arc<Self>,
        h: &Arc<Handle>,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, FsError> {
        let (this, hh) = (self.clone(), h.clone());
        self.nas(move |_| this.read_nas_here(&hh, offset, size))
    }

    /// Reads the NAS file of handle `h` on this thread (a NAS pool thread).
    fn read_nas_here(&self, h: &Handle, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        // Opened from the index: there is no NAS file to read.
        let nas = h.nas.as_ref().ok_or(FsError::Offline)?;
        let buf = read_at(nas, offset, size)?;
        Stats::add(&self.stats.bytes_from_nas, buf.len() as u64);
        Ok(buf)
    }

    /// Reads through a partial copy: present chunks from the SSD, missing ones from the NAS
    /// (cached on the way; call it on a NAS pool thread then). The rest of a chunk this read
    /// started is fetched behind it, on another NAS pool thread. `None`: the copy cannot serve
    /// the read (the NAS file changed, or the SSD failed): read the NAS instead.
    fn read_fill(
        self: &Arc<Self>,
        h: &Arc<Handle>,
        cf: &Arc<CacheFile>,
        offset: u64,
        size: u32,
    ) -> Result<Option<Vec<u8>>, FsError> {
        let nas = h.nas.as_ref().ok_or(FsError::Offline)?;
        match cf.read(nas, offset, size) {
            Ok(read) => {
                let (buf, fetched) = (read.buf, read.fetched);
                self.note_loading(cf, buf.len() as u64);
                if fetched > 0 {
                    self.stats
                        .category(category_of(cf.rel()), |c| c.bytes_fetched += fetched);
                    // With rests pending, they record the copy when they end: a record now
                    // would hold no new chunk, and its fsyncs would share the disk with the
                    // answer.
                    if read.rest.is_empty() {
                        self.cache.mark_dirty(cf);
                    }
                }
                Stats::add(&self.stats.bytes_fetched, fetched);
                Stats::add(&self.stats.bytes_from_nas, fetched.min(buf.len() as u64));
                Stats::add(
                    &self.stats.bytes_from_ssd,
                    (buf.len() as u64).saturating_sub(fetched),
                );
                self.fill_rest(h, cf, read.rest);
                Ok(Some(buf))
            }
            Err(e) => self.fill_failed(cf, e).map(|()| None),
        }
    }

    /// A read through copy `cf` failed: a NAS error is the reader's; otherwise the copy cannot
    /// serve (and goes, when the NAS file changed).
    fn fill_failed(&self, cf: &CacheFile, e: FetchError) -> Result<(), FsError> {
        match e {
            FetchError::Nas(e) => Err(FsError::Io(e)),
            FetchError::Changed => {
                Stats::add(&self.stats.stale_dropped, 1);
                let _ = self.cache.discard(cf.rel());
                Ok(())
            }
            FetchError::Disabled | FetchError::NotCached => Ok(()),
        }
    }

    /// Fetches the rests of the chunks a read started, on this NAS pool thread once the read has
    /// answered (so that the answer does not share the CPU and the NAS with them). Nobody waits
    /// for them but the readers of those chunks' missing pieces.
    fn fill_rest(self: &Arc<Self>, h: &Arc<Handle>, cf: &Arc<CacheFile>, rests: Vec<Rest>) {
        if rests.is_empty() {
            return;
        }
        let (this, hh, cf) = (self.clone(), h.clone(), cf.clone());
        self.nas_io.after(move || {
            let Some(nas) = hh.nas.as_ref() else { return };
            let cat = category_of(cf.rel());
            for rest in rests {
                // Counted before each step is published: whoever sees the bytes sees them counted.
                let mut count = |n: u64| {
                    Stats::add(&this.stats.bytes_fetched, n);
                    this.stats.category(cat, |c| c.bytes_fetched += n);
                };
                if let Err(e) = rest.run(nas, &mut count) {
                    if let Err(e) = this.fill_failed(&cf, e) {
                        tracing::debug!(path = %cf.rel().display(), error = %e, "fetching the rest of a chunk failed");
                    }
                    break;
                }
            }
            this.cache.mark_dirty(&cf);
        });
    }

    /// Before a read of a copy: did the NAS file change since the handle opened (rewritten in
    /// place or truncated by another machine)? Then this and every handle of the copy read the
    /// NAS from now on. A NAS that does not answer leaves the copy in use (last-known-good).
    fn check_copy_still_current(self: &Arc<Self>, h: &Arc<Handle>) {
        if h.stale.load(Ordering::Acquire) || h.nas.is_none() || self.offline() {
            return;
        }
        let (this, hh) = (self.clone(), h.clone());
        if let Ok(true) = self.nas(move |_| Ok(this.copy_changed(&hh))) {
            self.copy_went_stale(h);
        }
    }

    /// Whether the NAS file of a handle reading a copy no longer has the identity it had at
    /// open (on this thread: a NAS pool thread). A failed `fstat` says nothing.
    fn copy_changed(&self, h: &Handle) -> bool {
        match (h.identity, &h.nas) {
            (Some(id), Some(nas)) if !h.stale.load(Ordering::Acquire) => {
                nix::sys::stat::fstat(nas).is_ok_and(|st| self.cache.rule().identity(&st) != id)
            }
            _ => false,
        }
    }

    /// The NAS file behind `h` changed: every handle reading its copy reads the NAS from now on,
    /// and the copy goes. Later opens start afresh.
    fn copy_went_stale(&self, h: &Handle) {
        h.stale.store(true, Ordering::Release);
        if let Some(node) = self.inodes.lock().get_mut(h.ino)
            && node
                .opened_ref()
                .is_some_and(|o| Arc::ptr_eq(&o.stale, &h.stale))
            && !node.writing()
        {
            node.opened().stale = Default::default();
        }
        Stats::add(&self.stats.stale_dropped, 1);
        if let Some(rel) = &h.cache_ref {
            tracing::info!(path = %rel.display(), "NAS file changed under an open handle; reading the NAS, dropping the copy");
            self.forget_copies(rel);
        }
    }

    /// Counts bytes read through a filling copy; once they pass the threshold the file is being
    /// loaded for real and the worker completes it (`workflow_only` discovery). A scanner that
    /// reads a header of each of many files stays below it and triggers no copy.
    fn note_loading(&self, cf: &Arc<CacheFile>, n: u64) {
        // Once queued, a read costs one atomic add and one load here.
        let total = cf.read_bytes.fetch_add(n, Ordering::Relaxed) + n;
        if !cf.queued.load(Ordering::Relaxed)
            && total >= loading_threshold(cf.identity().size)
            && self.live.settings().discovery == Discovery::WorkflowOnly
            && !cf.queued.swap(true, Ordering::AcqRel)
        {
            self.worker
                .enqueue(cf.rel(), Reason::Loaded, cf.identity().size);
        }
    }

    /// `close(2)` of a descriptor of handle `fh`: a writer's errors from the NAS (ENOSPC,
    /// EDQUOT, EIO, which NFS and SMB report at close) reach the caller, as a close of a
    /// duplicate of the NAS descriptor reports them. Readers have nothing to report.
    pub fn flush(&self, fh: u64) -> Result<(), FsError> {
        let h = self.handle(fh)?;
        if !h.writer || h.nas.is_none() {
            return Ok(());
        }
        let hh = h.clone();
        self.nas(move |_| {
            let dup = hh.nas.as_ref().unwrap().try_clone()?;
            Ok(close_checked(dup)?)
        })
    }

    /// The last descriptor of handle `fh` was closed (or its last mapping went away).
    pub fn release(&self, fh: u64) {
        let Some(h) = self.handles.lock().remove(&fh) else {
            return;
        };
        if let HandleKind::Fill(cf) = &h.kind {
            self.cache.mark_dirty(cf);
        }
        if let Some(rel) = &h.cache_ref {
            self.cache.close_ref(rel);
        }
        let path = self.inodes.lock().path(h.ino);
        if h.writer
            && let Some(rel) = &path
        {
            // What readers may have cached while it was written is not the new content.
            self.forget_copies(rel);
        }
        {
            let mut inodes = self.inodes.lock();
            if let Some(node) = inodes.get_mut(h.ino) {
                node.opened().io.released(h.writer);
                if h.exec {
                    node.opened().executing = node.opened().executing.saturating_sub(1);
                }
                if h.writer && !node.writing() {
                    node.opened().stale = Default::default();
                }
                if node.open_count() == 0 && node.nlookup == 0 {
                    inodes.forget(h.ino, 0);
                }
            }
        }
        self.close_nas_file(h);
    }

    /// Closes the NAS file of a released handle on the NAS pool (a close can wait on the NAS:
    /// NFS writes back at close), and logs what it reports; nobody waits for it.
    fn close_nas_file(&self, h: Arc<Handle>) {
        let Ok(mut h) = Arc::try_unwrap(h) else {
            return; // a read still holds it (stuck on the NAS): it closes when that ends
        };
        let Some(file) = h.nas.take() else {
            return;
        };
        let writer = h.writer;
        self.nas_io.detach(move || {
            if let Err(e) = close_checked(file)
                && writer
            {
                tracing::warn!(error = %e, "closing a file written through the mount failed on the NAS");
            }
        });
    }
}

/// The open flag (`__FMODE_EXEC`, include/linux/fs.h) with which the kernel opens a file it is
/// about to execute; such a handle stays open while the program runs (its text is mapped).
const FMODE_EXEC: i32 = 0o40;

/// Bytes read from a file past which it counts as loaded for real: min(64 MiB, 10 %) (DESIGN.md
/// §4), but at least 4 MiB (or the whole file): the kernel reads ahead of a reader by up to
/// 1 MiB, so a header read of a small file must not count as loading it. A model header
/// (safetensors JSON ≤ 8 MiB on large files) stays below it.
pub fn loading_threshold(size: u64) -> u64 {
    (64u64 << 20).min(size / 10).max(4 << 20).min(size).max(1)
}

/// Reads up to `size` bytes at `offset` (short only at the end of the file).
fn read_at(f: &File, offset: u64, size: u32) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; size as usize];
    let n = pread_full(f, &mut buf, offset)?;
    buf.truncate(n);
    Ok(buf)
}

/// `close(2)` with its error (dropping a `File` ignores it).
fn close_checked(f: File) -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    let fd = f.into_raw_fd();
    // SAFETY: `fd` was just taken out of an owned `File`; nothing else closes it.
    if unsafe { libc::close(fd) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::loading_threshold;

    #[test]
    fn loading_threshold_bounds() {
        const MIB: u64 = 1 << 20;
        assert_eq!(loading_threshold(20_000 * MIB), 64 * MIB);
        assert_eq!(loading_threshold(100 * MIB), 10 * MIB);
        assert_eq!(loading_threshold(10 * MIB), 4 * MIB);
        assert_eq!(loading_threshold(3 * MIB), 3 * MIB);
        assert_eq!(loading_threshold(0), 1);
    }
}
