//! Migrating from the Python node: `arenafs adopt` and `-o adopt=DIR` take over its copies, and
//! the mount then serves them without fetching a byte from the NAS.

use std::fs;
use std::process::Command;

use crate::util::{BIN, CHUNK, Dirs, require_mount};

fn copy_like_copy2(from: &std::path::Path, to: &std::path::Path) {
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    fs::copy(from, to).unwrap();
    let mtime = fs::metadata(from).unwrap().modified().unwrap();
    fs::File::options()
        .write(true)
        .open(to)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
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

    let out = Command::new(BIN)
        .args(["adopt", old_s, "--nas", nas, "--cache-dir", cache])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("adopted 1 copies"), "{stdout}");

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
