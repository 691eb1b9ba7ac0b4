//! Taking over the copies of the Python Arena AutoCache node (`arenafs adopt`, or `-o adopt=DIR`
//! at mount), so a migrating studio does not copy terabytes again.
//!
//! The node kept its copies as `<ARENA_CACHE_ROOT>/<category>/<filename>`. Each such file is
//! matched to the NAS file ComfyUI would open for (category, filename) (legacy folder names
//! included) and adopted when it has the NAS file's size and mtime (to the nanosecond, as
//! `shutil.copy2` keeps it) or, with `verify`, the same SHA-256 whatever its mtime. An adopted
//! copy becomes a complete entry under the NAS file's identity; its data is hard-linked into the
//! cache when both live on one file system (no space used, the old file untouched) and copied
//! otherwise. Old files are never changed or deleted: removing them is the operator's call.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{ChunkMap, EntryRecord, Store};
use crate::models;
use crate::source::{IdentityRule, Nas};

/// How to adopt.
#[derive(Clone, Copy, Debug, Default)]
pub struct AdoptOptions {
    /// Compare contents (SHA-256) instead of trusting size and mtime.
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
    /// `size_differs`, `mtime_differs`, `content_differs`, `not_a_model_reference`, `temporary`.
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
    /// Of them, hard-linked (the rest were copied).
    pub linked: usize,
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

fn sha256(path: &Path) -> io::Result<[u8; 32]> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            // arenafs's own data may live under the same root.
            if e.file_name() != "arenafs-v1" {
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
            outcome: "adopted",
        };
        item.outcome = match decide(store, nas, rule, old_root, &old, &md, opts, &mut item) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(file = %old.display(), error = %e, "not adopted");
                "error"
            }
        };
        if matches!(item.outcome, "adopted" | "would_adopt") {
            report.adopted += 1;
            report.adopted_bytes += item.bytes;
            if !opts.dry_run
                && let Some(target) = item.nas_path.clone()
            {
                match take(store, nas, rule, chunk_size, &old, &target) {
                    Ok(linked) => report.linked += usize::from(linked),
                    Err(e) => {
                        tracing::warn!(file = %old.display(), error = %e, "adoption failed");
                        report.adopted -= 1;
                        report.adopted_bytes -= item.bytes;
                        item.outcome = "error";
                    }
                }
            }
        }
        report.items.push(item);
    }
    Ok(report)
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
) -> io::Result<&'static str> {
    let rel = old.strip_prefix(old_root).expect("walked below the root");
    let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if temporary(name) {
        return Ok("temporary");
    }
    let mut parts = rel.components();
    let category = parts.next().and_then(|c| c.as_os_str().to_str());
    let filename = parts.as_path().to_str();
    let (Some(category), Some(filename)) = (category, filename) else {
        return Ok("not_a_model_reference");
    };
    if filename.is_empty() {
        return Ok("not_a_model_reference");
    }
    let Ok(reference) = models::parse(category, filename) else {
        return Ok("not_a_model_reference");
    };
    let Some(target) = reference.resolve(nas) else {
        return Ok("not_on_nas");
    };
    item.nas_path = Some(target.clone());
    let st = nas.stat(&target)?;
    if st.st_size as u64 != md.len() {
        return Ok("size_differs");
    }
    let identity = rule.identity(&st);
    if store
        .get(&target)
        .is_some_and(|e| e.identity == identity && e.is_complete())
    {
        return Ok("already_cached");
    }
    if opts.verify {
        let nas_file = nas.open_file(&target)?;
        let nas_path = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&nas_file)
        ));
        if sha256(old)? != sha256(&nas_path)? {
            return Ok("content_differs");
        }
    } else {
        let old_ns = md.mtime() * 1_000_000_000 + md.mtime_nsec();
        if old_ns != identity.mtime_ns {
            return Ok("mtime_differs");
        }
    }
    Ok(if opts.dry_run {
        "would_adopt"
    } else {
        "adopted"
    })
}

/// Puts `old` into the cache as the complete copy of `target`: data first (durable), then the
/// index entry. Returns whether it was hard-linked.
fn take(
    store: &Store,
    nas: &Nas,
    rule: IdentityRule,
    chunk_size: u64,
    old: &Path,
    target: &Path,
) -> io::Result<bool> {
    let st = nas.stat(target)?;
    let size = st.st_size as u64;
    let (id, file) = store.create_data_file(0).map_err(io::Error::other)?;
    drop(file);
    let path = store.data_path(id);
    fs::remove_file(&path)?;
    let linked = match fs::hard_link(old, &path) {
        Ok(()) => true,
        Err(_) => {
            fs::copy(old, &path)?;
            false
        }
    };
    fs::File::open(&path)?.sync_all()?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    let mut map = ChunkMap::new(size, chunk_size);
    for c in 0..map.chunk_count() {
        map.set_present(c);
    }
    let rec = EntryRecord {
        id,
        identity: rule.identity(&st),
        map,
        last_access: super::live::now_secs(),
        perms: Some(super::Perms::of(&st)),
    };
    if let Some(prev) = store.get(target) {
        store.remove(target, prev.id).map_err(io::Error::other)?;
    }
    store.put(target, &rec).map_err(io::Error::other)?;
    Ok(linked)
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
        assert_eq!((r.adopted, r.linked), (2, 2));
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
}
