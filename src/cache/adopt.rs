//! Taking over the copies of the Python Arena AutoCache node (`arenafs adopt`, or `-o adopt=DIR`
//! at mount), so a migrating studio does not fetch terabytes from the NAS again.
//!
//! **Matching.** The node kept its copies as `<ARENA_CACHE_ROOT>/<category>/<filename>`. Each such
//! file is matched to the NAS file ComfyUI would open for (category, filename) (legacy folder
//! names included) and is a candidate when it has the NAS file's size and mtime (to the
//! nanosecond, as `shutil.copy2` keeps it), or, with `verify`, the NAS file's size whatever its
//! mtime.
//!
//! **Ownership.** The old files stay writable by the node's (ComfyUI's) user, and a rewrite in
//! place (`shutil.copyfile` truncates its target and writes it again) must never change the bytes
//! of a cache copy whose NAS identity still matches. So the adopted data is a file of arenafs's
//! own: a reflink (`FICLONE`: shared extents, copy-on-write, no space used until one side
//! changes) where the file system can, otherwise a plain copy. It goes into a fresh data file that
//! the index does not know yet, is fsynced and checked, and only then recorded: a crash before
//! the record leaves an orphan data file that the next daemon start deletes
//! ([`Store::remove_orphans`]), so the index never claims bytes that are not durable.
//!
//! **Check.** The cache copy itself (not the old file, which can change meanwhile) is compared
//! with the NAS file before it is recorded: its size, then the SHA-256 of both, over the whole
//! files with `verify`, otherwise over a sample ([`sample_ranges`]: the first and the last MiB
//! and six MiB spread evenly between them; the whole file when it is not larger than that). The
//! sample catches a copy that is truncated and padded, zero-filled, or another file of the same
//! size, whatever its mtime says; it cannot catch a difference that lies wholly outside the
//! sampled MiB (a few bytes changed in the middle of a tensor): `verify` reads everything. The
//! NAS file's identity is taken before the copy and checked again after the comparison, so a
//! NAS file that changed meanwhile is not adopted. Old files are never changed or deleted:
//! removing them is the operator's call.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{ChunkMap, EntryRecord, Store};
use crate::models;
use crate::source::{Identity, IdentityRule, Nas, pread_full};

/// How to adopt.
#[derive(Clone, Copy, Debug, Default)]
pub struct AdoptOptions {
    /// Compare the whole contents (SHA-256) whatever the mtime, instead of size, mtime and a
    /// sample.
    pub verify: bool,
    /// Only report.
    pub dry_run: bool,
}

/// One old copy and what became of it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct AdoptItem {
    /// The old copy.
    pub old: PathBuf,
    /// The NAS-relative path it was matched to.
    pub nas_path: Option<PathBuf>,
    /// Its size.
    pub bytes: u64,
    /// `adopted` (or `would_adopt`), `already_cached`, or why not: `not_on_nas`,
    /// `size_differs`, `mtime_differs`, `content_differs`, `nas_changed` (the NAS file changed
    /// during the adoption), `not_a_model_reference`, `temporary`, `error`.
    pub outcome: &'static str,
}

/// What an adoption did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AdoptReport {
    /// Every file looked at.
    pub items: Vec<AdoptItem>,
    /// Copies adopted (or that would be).
    pub adopted: usize,
    /// Their bytes.
    pub adopted_bytes: u64,
    /// Of them, reflinked into the cache (sharing the old file's extents copy-on-write).
    pub reflinked: usize,
    /// Of them, copied into the cache.
    pub copied: usize,
}

/// Length of each sampled region of the check without `verify`.
const SAMPLE_LEN: u64 = 1 << 20;
/// Sampled regions between the first and the last MiB: with them a check reads 8 MiB of each
/// file, a fraction of a second from a NAS, however large the model.
const SAMPLE_SPREAD: u64 = 6;

/// The regions (offset, length) of a `size`-byte file that the check without `verify` compares:
/// the first and the last [`SAMPLE_LEN`] bytes and [`SAMPLE_SPREAD`] regions of that length
/// spread evenly between them; the whole file when it is not larger than all of them together.
pub fn sample_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= (SAMPLE_SPREAD + 2) * SAMPLE_LEN {
        return vec![(0, size)];
    }
    let last = size - SAMPLE_LEN;
    let mut ranges = vec![(0, SAMPLE_LEN)];
    // More than 7 MiB between the starts of the first and the last region: no overlaps.
    ranges.extend((1..=SAMPLE_SPREAD).map(|k| (last * k / (SAMPLE_SPREAD + 1), SAMPLE_LEN)));
    ranges.push((last, SAMPLE_LEN));
    ranges
}

/// SHA-256 of the bytes of `file` in `ranges` (offset, length), in order. A file shorter than a
/// range contributes what it has.
fn digest(file: &fs::File, ranges: &[(u64, u64)]) -> io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for &(start, len) in ranges {
        let end = start + len;
        let mut off = start;
        while off < end {
            let want = (end - off).min(buf.len() as u64) as usize;
            let n = pread_full(file, &mut buf[..want], off)?;
            h.update(&buf[..n]);
            if n < want {
                break;
            }
            off += n as u64;
        }
    }
    Ok(h.finalize().into())
}

/// Whether `a` and `b` hold the same bytes: everywhere with `full`, else in the sampled regions.
fn same_contents(a: &fs::File, b: &fs::File, size: u64, full: bool) -> io::Result<bool> {
    let ranges = if full {
        vec![(0, size)]
    } else {
        sample_ranges(size)
    };
    Ok(digest(a, &ranges)? == digest(b, &ranges)?)
}

/// Opens an old copy read-only, refusing anything but a regular file.
fn open_old(path: &Path) -> io::Result<fs::File> {
    let f = fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok(f)
}

/// Names of partial files the node (or a download tool) leaves behind.
fn temporary(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    name.starts_with('.')
        || [
            ".tmp",
            ".part",
            ".partial",
            ".lock",
            ".incomplete",
            ".download",
        ]
        .iter()
        .any(|s| lower.ends_with(s))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            // arenafs's own data may live under the same root.
            if e.file_name() != super::store::SUBDIR {
                walk(&e.path(), out)?;
            }
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    Ok(())
}

/// Adopts the node's copies under `old_root` into `store`.
pub fn adopt(
    store: &Store,
    nas: &Nas,
    rule: IdentityRule,
    chunk_size: u64,
    old_root: &Path,
    opts: AdoptOptions,
) -> io::Result<AdoptReport> {
    let mut files = Vec::new();
    walk(old_root, &mut files)?;
    files.sort();
    let mut report = AdoptReport::default();
    for old in files {
        let md = fs::metadata(&old)?;
        let mut item = AdoptItem {
            old: old.clone(),
            nas_path: None,
            bytes: md.len(),
            outcome: "error",
        };
        let outcome =
            decide(store, nas, rule, old_root, &old, &md, opts, &mut item).and_then(|d| match d {
                Decision::Candidate(target, identity) if !opts.dry_run => {
                    take(store, nas, rule, chunk_size, &old, &target, identity, opts)
                }
                Decision::Candidate(target, identity) => {
                    dry_check(nas, &old, &target, identity, opts)
                }
                Decision::Not(why) => Ok(Taken::Not(why)),
            });
        item.outcome = match outcome {
            Ok(Taken::Reflinked) => {
                report.reflinked += 1;
                "adopted"
            }
            Ok(Taken::Copied) => {
                report.copied += 1;
                "adopted"
            }
            Ok(Taken::WouldAdopt) => "would_adopt",
            Ok(Taken::Not(why)) => why,
            Err(e) => {
                tracing::warn!(file = %old.display(), error = %e, "not adopted");
                "error"
            }
        };
        if matches!(item.outcome, "adopted" | "would_adopt") {
            report.adopted += 1;
            report.adopted_bytes += item.bytes;
        }
        report.items.push(item);
    }
    Ok(report)
}

/// Whether an old file may be adopted, before any byte is read.
enum Decision {
    /// It may: the NAS file (relative path) and its identity as it was when matched.
    Candidate(PathBuf, Identity),
    /// It may not, for this reason (an outcome of [`AdoptItem`]).
    Not(&'static str),
}

/// What became of an old file.
enum Taken {
    /// Adopted, its data reflinked.
    Reflinked,
    /// Adopted, its data copied.
    Copied,
    /// It would be adopted (a dry run).
    WouldAdopt,
    /// Not adopted, for this reason (an outcome of [`AdoptItem`]).
    Not(&'static str),
}

#[allow(clippy::too_many_arguments)]
fn decide(
    store: &Store,
    nas: &Nas,
    rule: IdentityRule,
    old_root: &Path,
    old: &Path,
    md: &fs::Metadata,
    opts: AdoptOptions,
    item: &mut AdoptItem,
) -> io::Result<Decision> {
    let rel = old.strip_prefix(old_root).expect("walked below the root");
    let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if temporary(name) {
        return Ok(Decision::Not("temporary"));
    }
    let mut parts = rel.components();
    let category = parts.next().and_then(|c| c.as_os_str().to_str());
    let filename = parts.as_path().to_str();
    let (Some(category), Some(filename)) = (category, filename) else {
        return Ok(Decision::Not("not_a_model_reference"));
    };
    if filename.is_empty() {
        return Ok(Decision::Not("not_a_model_reference"));
    }
    let Ok(reference) = models::parse(category, filename) else {
        return Ok(Decision::Not("not_a_model_reference"));
    };
    let Some(target) = reference.resolve(nas) else {
        return Ok(Decision::Not("not_on_nas"));
    };
    item.nas_path = Some(target.clone());
    let st = nas.stat(&target)?;
    if st.st_size as u64 != md.len() {
        return Ok(Decision::Not("size_differs"));
    }
    let identity = rule.identity(&st);
    if store
        .get(&target)
        .is_some_and(|e| rule.mask(e.identity) == identity && e.is_complete())
    {
        return Ok(Decision::Not("already_cached"));
    }
    let old_ns = md.mtime() * 1_000_000_000 + md.mtime_nsec();
    if !opts.verify && old_ns != identity.mtime_ns {
        return Ok(Decision::Not("mtime_differs"));
    }
    Ok(Decision::Candidate(target, identity))
}

/// A dry run's check: the old file itself against the NAS file (what a real run checks of the
/// copy it makes).
fn dry_check(
    nas: &Nas,
    old: &Path,
    target: &Path,
    identity: Identity,
    opts: AdoptOptions,
) -> io::Result<Taken> {
    let same = same_contents(
        &open_old(old)?,
        &nas.open_file(target)?,
        identity.size,
        opts.verify,
    )?;
    Ok(if same {
        Taken::WouldAdopt
    } else {
        Taken::Not("content_differs")
    })
}

/// Makes a copy of `old` that only arenafs can change in a fresh data file and, if it holds the
/// NAS file's bytes and the NAS file is still `identity`, records it as the complete copy of
/// `target`. A data file that is not recorded is removed.
#[allow(clippy::too_many_arguments)]
fn take(
    store: &Store,
    nas: &Nas,
    rule: IdentityRule,
    chunk_size: u64,
    old: &Path,
    target: &Path,
    identity: Identity,
    opts: AdoptOptions,
) -> io::Result<Taken> {
    let src = open_old(old)?;
    let (id, data) = store.create_data_file(0).map_err(io::Error::other)?;
    let path = store.data_path(id);
    let made = fill_and_check(&src, &data, &path, nas, rule, target, identity, opts);
    drop(data);
    let kept = match made {
        Ok(t @ (Taken::Reflinked | Taken::Copied)) => {
            let perms = nas.stat(target).ok().map(|st| super::Perms::of(&st));
            record(store, chunk_size, target, id, identity, perms)
                .map(|()| t)
                .map_err(io::Error::other)
        }
        other => other,
    };
    if !matches!(kept, Ok(Taken::Reflinked | Taken::Copied)) {
        // Never recorded: the data file is ours to delete (the index does not name it).
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(file = %path.display(), error = %e, "removing an unused data file");
        }
    }
    kept
}

/// Fills the empty data file `data` (at `path`) from `src` by reflink or copy, makes it durable,
/// and checks it: the NAS file's size, its bytes (all with `verify`, else the sample), and the NAS
/// file still being `identity`.
#[allow(clippy::too_many_arguments)]
fn fill_and_check(
    src: &fs::File,
    data: &fs::File,
    path: &Path,
    nas: &Nas,
    rule: IdentityRule,
    target: &Path,
    identity: Identity,
    opts: AdoptOptions,
) -> io::Result<Taken> {
    let reflinked = reflink_or_copy(src, data)?;
    data.sync_all()?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    if data.metadata()?.len() != identity.size {
        // The old file changed size since it was matched.
        return Ok(Taken::Not("size_differs"));
    }
    if !same_contents(data, &nas.open_file(target)?, identity.size, opts.verify)? {
        return Ok(Taken::Not("content_differs"));
    }
    if rule.identity(&nas.stat(target)?) != identity {
        return Ok(Taken::Not("nas_changed"));
    }
    Ok(if reflinked {
        Taken::Reflinked
    } else {
        Taken::Copied
    })
}

/// Records the durable, checked copy in data file `id` as the complete copy of `target`.
fn record(
    store: &Store,
    chunk_size: u64,
    target: &Path,
    id: u64,
    identity: Identity,
    perms: Option<super::Perms>,
) -> Result<(), super::StoreError> {
    let mut map = ChunkMap::new(identity.size, chunk_size);
    for c in 0..map.chunk_count() {
        map.set_present(c);
    }
    let rec = EntryRecord {
        id,
        identity,
        map,
        last_access: super::live::now_secs(),
        perms,
    };
    if let Some(prev) = store.get(target) {
        store.remove(target, prev.id)?;
    }
    store.put(target, &rec)
}

/// Fills the empty file `dst` with the contents of `src`: a reflink (`FICLONE`) where the file
/// system can share extents between them, otherwise a copy. Returns whether it was a reflink.
fn reflink_or_copy(src: &fs::File, dst: &fs::File) -> io::Result<bool> {
    // SAFETY: FICLONE takes the source descriptor as its argument; both descriptors are open
    // files owned by the caller for the whole call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        return Ok(true);
    }
    // Not on this file system, or across two of them (EOPNOTSUPP, EXDEV, EINVAL, ENOTTY, ...):
    // a copy does, and reports any real I/O error itself.
    tracing::debug!(error = %io::Error::last_os_error(), "no reflink; copying");
    dst.set_len(0)?;
    let mut reader = src;
    let mut writer = dst;
    io::copy(&mut reader, &mut writer)?;
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn write(p: &Path, data: &[u8], mtime: SystemTime) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
        fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    }

    #[test]
    fn adopts_what_matches_and_leaves_the_rest() {
        let t = tempfile::tempdir().unwrap();
        let (nas_dir, old, cache) = (
            t.path().join("nas"),
            t.path().join("old"),
            t.path().join("cache"),
        );
        let when = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        let later = when + Duration::from_secs(60);
        write(&nas_dir.join("loras/a.safetensors"), b"aaaa", when);
        write(&nas_dir.join("clip/t5.safetensors"), b"tttt", when);
        write(&nas_dir.join("vae/v.safetensors"), b"vvvv", when);
        write(&nas_dir.join("checkpoints/c.safetensors"), b"cccc", when);
        write(&old.join("loras/a.safetensors"), b"aaaa", when); // copy2: adopted
        write(&old.join("text_encoders/t5.safetensors"), b"tttt", when); // key name, legacy folder
        write(&old.join("vae/v.safetensors"), b"vvvv", later); // mtime differs
        write(&old.join("checkpoints/c.safetensors"), b"XXXX", later); // content differs
        write(&old.join("loras/gone.safetensors"), b"gggg", when); // not on the NAS
        write(&old.join("loras/b.safetensors.tmp"), b"bb", when); // partial
        let nas = Nas::open(&nas_dir).unwrap();
        let store = Store::open(&cache).unwrap();
        let rule = IdentityRule::SizeMtimeIno;

        let dry = adopt(
            &store,
            &nas,
            rule,
            4,
            &old,
            AdoptOptions {
                dry_run: true,
                verify: false,
            },
        )
        .unwrap();
        assert_eq!(dry.adopted, 2);
        assert_eq!(store.len(), 0, "a dry run changes nothing");

        let r = adopt(&store, &nas, rule, 4, &old, AdoptOptions::default()).unwrap();
        let outcome = |name: &str| {
            r.items
                .iter()
                .find(|i| i.old.ends_with(name))
                .map(|i| i.outcome)
                .unwrap()
        };
        assert_eq!(outcome("loras/a.safetensors"), "adopted");
        assert_eq!(outcome("text_encoders/t5.safetensors"), "adopted");
        assert_eq!(outcome("vae/v.safetensors"), "mtime_differs");
        assert_eq!(outcome("checkpoints/c.safetensors"), "mtime_differs");
        assert_eq!(outcome("loras/gone.safetensors"), "not_on_nas");
        assert_eq!(outcome("loras/b.safetensors.tmp"), "temporary");
        assert_eq!((r.adopted, r.reflinked + r.copied), (2, 2));
        let e = store.get(Path::new("clip/t5.safetensors")).unwrap();
        assert!(e.is_complete());
        assert_eq!(fs::read(store.data_path(e.id)).unwrap(), b"tttt");
        // The old files are untouched.
        assert_eq!(fs::read(old.join("loras/a.safetensors")).unwrap(), b"aaaa");

        // With --verify: contents decide, mtimes do not.
        let v = adopt(
            &store,
            &nas,
            rule,
            4,
            &old,
            AdoptOptions {
                verify: true,
                dry_run: false,
            },
        )
        .unwrap();
        let outcome = |name: &str| {
            v.items
                .iter()
                .find(|i| i.old.ends_with(name))
                .map(|i| i.outcome)
                .unwrap()
        };
        assert_eq!(outcome("vae/v.safetensors"), "adopted");
        assert_eq!(outcome("checkpoints/c.safetensors"), "content_differs");
        assert_eq!(outcome("loras/a.safetensors"), "already_cached");
    }

    /// Pseudo-random bytes (xorshift), different for each seed.
    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// The data files in the store's directory.
    fn data_files(store: &Store) -> usize {
        fs::read_dir(store.dir().join("data"))
            .unwrap()
            .flat_map(|d| fs::read_dir(d.unwrap().path()).unwrap())
            .count()
    }

    /// A NAS file and an old copy of it made with the NAS file's mtime (as `shutil.copy2` does),
    /// whose bytes are `old_bytes`.
    struct Case {
        _t: tempfile::TempDir,
        nas: Nas,
        store: Store,
        old_root: PathBuf,
        old: PathBuf,
    }

    fn case(nas_bytes: &[u8], old_bytes: &[u8]) -> Case {
        let t = tempfile::tempdir().unwrap();
        let when = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 987_654_321);
        write(
            &t.path().join("nas/checkpoints/m.safetensors"),
            nas_bytes,
            when,
        );
        let old_root = t.path().join("old");
        let old = old_root.join("checkpoints/m.safetensors");
        write(&old, old_bytes, when);
        Case {
            nas: Nas::open(&t.path().join("nas")).unwrap(),
            store: Store::open(&t.path().join("cache")).unwrap(),
            old_root,
            old,
            _t: t,
        }
    }

    impl Case {
        fn adopt(&self, verify: bool, dry_run: bool) -> AdoptReport {
            adopt(
                &self.store,
                &self.nas,
                IdentityRule::SizeMtimeIno,
                4 << 20,
                &self.old_root,
                AdoptOptions { verify, dry_run },
            )
            .unwrap()
        }
    }

    #[test]
    fn sample_ranges_cover_the_ends_and_the_middle() {
        assert_eq!(sample_ranges(0), vec![(0, 0)]);
        assert_eq!(sample_ranges(8 << 20), vec![(0, 8 << 20)]);
        for size in [(8 << 20) + 1, 100 << 20, 7_000_000_017] {
            let r = sample_ranges(size);
            assert_eq!(r.len(), 8);
            assert_eq!(r[0], (0, SAMPLE_LEN));
            assert_eq!(r[7], (size - SAMPLE_LEN, SAMPLE_LEN));
            for w in r.windows(2) {
                assert!(w[0].0 + w[0].1 <= w[1].0, "{size}: {r:?}");
            }
        }
    }

    /// The node's user can still write the old file: a rewrite in place (what
    /// `shutil.copyfile` does: truncate, write again) must not reach the adopted copy.
    #[test]
    fn a_rewrite_in_place_of_the_old_file_leaves_the_cache_copy_alone() {
        let nas_bytes = bytes(3 << 20, 1);
        let c = case(&nas_bytes, &nas_bytes);
        let r = c.adopt(false, false);
        assert_eq!(r.adopted, 1, "{r:?}");
        let e = c.store.get(Path::new("checkpoints/m.safetensors")).unwrap();
        let data = c.store.data_path(e.id);

        let mut f = fs::File::options()
            .write(true)
            .truncate(true)
            .open(&c.old)
            .unwrap();
        std::io::Write::write_all(&mut f, &bytes(3 << 20, 2)).unwrap();
        f.sync_all().unwrap();
        drop(f);

        assert!(
            fs::read(&data).unwrap() == nas_bytes,
            "the cache copy changed"
        );
        assert!(
            fs::metadata(&data).unwrap().ino() != fs::metadata(&c.old).unwrap().ino(),
            "the cache copy is a file of its own"
        );
        assert_eq!(
            fs::metadata(&data).unwrap().mode() & 0o777,
            0o600,
            "only arenafs can write it"
        );
    }

    /// Same size, mtime forged to the NAS file's: the bytes decide, where the sample looks.
    #[test]
    fn the_sample_refuses_other_bytes_with_a_forged_mtime() {
        let size = 12 << 20;
        let nas_bytes = bytes(size, 3);
        for (what, at) in [
            ("first MiB", 100),
            ("last MiB", size - 1),
            (
                "a MiB between",
                sample_ranges(size as u64)[3].0 as usize + 5,
            ),
        ] {
            let mut other = nas_bytes.clone();
            other[at] ^= 0xff;
            let c = case(&nas_bytes, &other);
            let dry = c.adopt(false, true);
            assert_eq!(dry.items[0].outcome, "content_differs", "dry run, {what}");
            let r = c.adopt(false, false);
            assert_eq!(r.items[0].outcome, "content_differs", "{what}");
            assert_eq!((r.adopted, r.reflinked, r.copied), (0, 0, 0), "{what}");
            assert!(c.store.is_empty(), "{what}");
            assert_eq!(
                data_files(&c.store),
                0,
                "{what}: the unused copy is removed"
            );
        }
    }

    /// What the sample cannot see: a difference wholly outside the sampled MiB is adopted on
    /// size and mtime alone. `verify` compares every byte and refuses it.
    #[test]
    fn a_difference_outside_the_sample_needs_verify() {
        let size = 12 << 20;
        let nas_bytes = bytes(size, 4);
        let unsampled = SAMPLE_LEN as usize + 1;
        assert!(
            sample_ranges(size as u64)
                .iter()
                .all(|&(o, l)| !(o..o + l).contains(&(unsampled as u64)))
        );
        let mut other = nas_bytes.clone();
        other[unsampled] ^= 0xff;

        let c = case(&nas_bytes, &other);
        assert_eq!(c.adopt(false, false).items[0].outcome, "adopted");

        let c = case(&nas_bytes, &other);
        let r = c.adopt(true, false);
        assert_eq!(r.items[0].outcome, "content_differs");
        assert!(c.store.is_empty());
        assert_eq!(data_files(&c.store), 0);
    }
}
