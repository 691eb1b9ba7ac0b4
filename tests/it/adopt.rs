//! Migrating from the Python node: `arenafs adopt` and `-o adopt=DIR` take over its copies, and
//! the mount then serves them without fetching a byte from the NAS. The adopted data is arenafs's
//! own (reflinked or copied): what the node's user does to the old files afterwards never
//! reaches it, and an old file is adopted only when its bytes match the NAS file's.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

use crate::util::{BIN, CHUNK, Dirs, LoopNas, random_bytes, require_mount};

/// Gives `to` the mtime of `from` (`touch -r`).
fn touch_r(from: &Path, to: &Path) {
    let mtime = fs::metadata(from).unwrap().modified().unwrap();
    fs::File::options()
        .write(true)
        .open(to)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
}

fn copy_like_copy2(from: &Path, to: &Path) {
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    fs::copy(from, to).unwrap();
    touch_r(from, to);
}

/// What `shutil.copyfile` does to an existing target: truncates it and writes it again, in place
/// (same inode).
fn rewrite_in_place(path: &Path, data: &[u8]) {
    let mut f = fs::File::options()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn arenafs_adopt(old: &Path, nas: &Path, cache: &Path, more: &[&str]) -> String {
    let out: Output = Command::new(BIN)
        .arg("adopt")
        .arg(old)
        .arg("--nas")
        .arg(nas)
        .arg("--cache-dir")
        .arg(cache)
        .args(more)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn adopted_copies_are_served_without_nas_reads() {
    require_mount!();
    let d = Dirs::new();
    let a = d.nas_file("loras/a.safetensors", 3 * CHUNK as usize, 1);
    let b = d.nas_file("unet/b.safetensors", 2 * CHUNK as usize, 2);
    let old = d.tmp.path().join("ArenaAutoCache");
    copy_like_copy2(
        &d.nas.join("loras/a.safetensors"),
        &old.join("loras/a.safetensors"),
    );
    let (nas, cache, old_s) = (
        d.nas.to_str().unwrap(),
        d.cache.to_str().unwrap(),
        old.to_str().unwrap(),
    );

    let stdout = arenafs_adopt(&old, &d.nas, &d.cache, &[]);
    assert!(stdout.contains("adopted 1 copies"), "{stdout}");
    // The cache and the old root share a file system here: a reflink where it can, else a copy.
    assert!(
        stdout.contains(": 1 reflinked, 0 copied;") || stdout.contains(": 0 reflinked, 1 copied;"),
        "{stdout}"
    );

    // At mount (opt-in): the node's copy of a diffusion model, kept under its key name.
    copy_like_copy2(
        &d.nas.join("unet/b.safetensors"),
        &old.join("diffusion_models/b.safetensors"),
    );
    let m = d.mount(&["min_size_mb=0", &format!("adopt={old_s}")]);
    assert_eq!(m.status()["cache_complete_entries"], 2, "{}", m.log());
    assert_eq!(fs::read(m.path("loras/a.safetensors")).unwrap(), a);
    assert_eq!(fs::read(m.path("unet/b.safetensors")).unwrap(), b);
    let s = m.stats();
    assert_eq!(s.bytes_fetched, 0, "{s:?}");
    assert_eq!(s.opens_passthrough + s.opens_ssd, 2, "{s:?}");
    assert!(
        old.join("loras/a.safetensors").exists(),
        "old files are left in place"
    );

    // While the cache is in use, the command says what to do.
    let out = Command::new(BIN)
        .args(["adopt", old_s, "--nas", nas, "--cache-dir", cache])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unmount first"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The node's user rewrites an old file in place after the adoption (ComfyUI-Manager or a
/// script re-downloading it with `shutil.copyfile`), even giving it back its old mtime: the mount
/// still serves the NAS file's bytes, from the SSD.
#[test]
fn a_rewrite_in_place_of_an_adopted_file_is_not_served() {
    require_mount!();
    let d = Dirs::new();
    let a = d.nas_file("loras/a.safetensors", 3 * CHUNK as usize, 11);
    let nas_file = d.nas.join("loras/a.safetensors");
    let old = d.tmp.path().join("ArenaAutoCache");
    let old_file = old.join("loras/a.safetensors");
    copy_like_copy2(&nas_file, &old_file);
    let out = arenafs_adopt(&old, &d.nas, &d.cache, &[]);
    assert!(out.contains("adopted 1 copies"), "{out}");

    rewrite_in_place(&old_file, &random_bytes(3 * CHUNK as usize, 12));
    touch_r(&nas_file, &old_file);

    let m = d.mount(&["min_size_mb=0"]);
    assert_eq!(m.status()["cache_complete_entries"], 1, "{}", m.log());
    assert!(
        fs::read(m.path("loras/a.safetensors")).unwrap() == a,
        "the mount serves the NAS file's bytes"
    );
    let s = m.stats();
    assert_eq!(s.bytes_fetched, 0, "{s:?}");
    assert_eq!(s.opens_passthrough + s.opens_ssd, 1, "{s:?}");
}

/// An old file of the NAS file's size whose mtime was forged to the NAS file's (`touch -r`) but
/// whose bytes differ in a region the check samples (the last MiB here) is not adopted, in a dry
/// run or a real one, and the mount fetches the NAS file.
#[test]
fn other_bytes_with_a_forged_mtime_are_not_adopted() {
    require_mount!();
    let d = Dirs::new();
    let len = 3 * CHUNK as usize;
    let c = d.nas_file("checkpoints/c.safetensors", len, 21);
    let nas_file = d.nas.join("checkpoints/c.safetensors");
    let old = d.tmp.path().join("ArenaAutoCache");
    let old_file = old.join("checkpoints/c.safetensors");
    let mut other = c.clone();
    other[len - 10] ^= 0xff;
    fs::create_dir_all(old_file.parent().unwrap()).unwrap();
    fs::write(&old_file, &other).unwrap();
    touch_r(&nas_file, &old_file);

    for more in [&["--dry-run"][..], &[]] {
        let out = arenafs_adopt(&old, &d.nas, &d.cache, more);
        assert!(
            out.lines()
                .any(|l| l.starts_with("content_differs") && l.contains("c.safetensors")),
            "{more:?}: {out}"
        );
        assert!(out.contains("adopt 0 copies") || out.contains("adopted 0 copies"));
    }

    let m = d.mount(&["min_size_mb=0"]);
    assert_eq!(m.status()["cache_complete_entries"], 0, "{}", m.log());
    assert!(fs::read(m.path("checkpoints/c.safetensors")).unwrap() == c);
    assert!(m.stats().bytes_fetched > 0);
}

/// On a file system that shares extents (XFS with reflink), the old copy is reflinked into the
/// cache: no data is copied, and a rewrite in place of the old file still leaves the cache copy
/// alone (copy-on-write).
#[test]
fn adopt_reflinks_where_the_file_system_can() {
    require_mount!();
    if Command::new("mkfs.xfs").arg("-V").output().is_err() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "mkfs.xfs missing under CI=true (scripts/install-deps installs xfsprogs)"
        );
        eprintln!("skipping: mkfs.xfs missing (apt-get install xfsprogs)");
        return;
    }
    let d = Dirs::new();
    let v = d.nas_file("vae/v.safetensors", 2 * CHUNK as usize + 5, 31);
    let ssd = d.tmp.path().join("ssd");
    fs::create_dir(&ssd).unwrap();
    // 300 MiB is the smallest XFS that mkfs.xfs makes.
    let _xfs = LoopNas::formatted(
        &d.tmp.path().join("ssd.img"),
        &ssd,
        320,
        &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    );
    let old = ssd.join("arena_cache");
    let old_file = old.join("vae/v.safetensors");
    let cache = ssd.join("arenafs");
    copy_like_copy2(&d.nas.join("vae/v.safetensors"), &old_file);

    let report: serde_json::Value =
        serde_json::from_str(&arenafs_adopt(&old, &d.nas, &cache, &["--json"])).unwrap();
    assert_eq!(
        (&report["adopted"], &report["reflinked"], &report["copied"]),
        (&1.into(), &1.into(), &0.into()),
        "{report:#}"
    );

    rewrite_in_place(&old_file, &random_bytes(v.len(), 32));
    let data: Vec<_> = walk_files(&cache.join("arenafs-v1/data"));
    assert_eq!(data.len(), 1, "{data:?}");
    assert!(fs::read(&data[0]).unwrap() == v, "the cache copy changed");
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}
