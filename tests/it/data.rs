//! Bytes through the mount equal the NAS bytes, on every read path (DESIGN.md §2.1).

use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use rand::{Rng, SeedableRng};

use crate::util::{CHUNK, Dirs, Mounted, pread, require_mount, sha256_file};

/// Sizes that exercise the edges: empty, one byte, around one chunk, several chunks plus a tail.
fn edge_sizes() -> Vec<(String, usize)> {
    let c = CHUNK as usize;
    [0, 1, c - 1, c, c + 1, 3 * c + 7]
        .into_iter()
        .map(|n| (format!("checkpoints/size_{n}.safetensors"), n))
        .collect()
}

fn mmap_read(path: &Path, shared: bool) -> Vec<u8> {
    let f = fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    if len == 0 {
        return Vec::new();
    }
    let flags = if shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    // SAFETY: mapping a file we opened read-only, reading it, unmapping it; the slice does not
    // outlive the mapping.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            flags,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap {}", path.display());
        let out = std::slice::from_raw_parts(p as *const u8, len).to_vec();
        libc::munmap(p, len);
        out
    }
}

/// Every kind of read, compared with the NAS content.
fn check_all_reads(m: &Mounted, files: &[(String, Vec<u8>)], seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (rel, data) in files {
        let p = m.path(rel);
        assert_eq!(fs::read(&p).unwrap(), *data, "full read of {rel}");
        assert_eq!(mmap_read(&p, false), *data, "private mmap of {rel}");
        assert_eq!(mmap_read(&p, true), *data, "shared mmap of {rel}");
        if data.is_empty() {
            assert!(pread(&p, 0, 10).is_empty());
            continue;
        }
        for _ in 0..40 {
            let off = rng.random_range(0..data.len() as u64 + 3);
            let len = rng.random_range(1..(3 * CHUNK as usize / 2));
            let got = pread(&p, off, len);
            let s = (off as usize).min(data.len());
            let e = (off as usize + len).min(data.len());
            assert_eq!(got, data[s..e], "pread {rel} at {off} len {len}");
        }
        // Straddling every chunk boundary.
        for b in (CHUNK..data.len() as u64).step_by(CHUNK as usize) {
            let got = pread(&p, b - 3, 7);
            let e = (b as usize + 4).min(data.len());
            assert_eq!(
                got,
                data[b as usize - 3..e],
                "boundary read of {rel} at {b}"
            );
        }
    }
}

fn files(d: &Dirs) -> Vec<(String, Vec<u8>)> {
    edge_sizes()
        .into_iter()
        .enumerate()
        .map(|(i, (rel, n))| {
            let data = d.nas_file(&rel, n, i as u64);
            (rel, data)
        })
        .collect()
}

#[test]
fn cold_then_warm_reads_match_the_nas() {
    require_mount!();
    let d = Dirs::new();
    let files = files(&d);
    let m = d.mount(&["min_size_mb=0"]);
    // Cold: random reads first, so chunks are filled out of order by readers and the worker.
    check_all_reads(&m, &files, 1);
    // Every non-empty file was read, so the worker completes each one.
    m.wait_copies(files.iter().filter(|(_, d)| !d.is_empty()).count() as u64);
    let before = m.stats();
    check_all_reads(&m, &files, 2);
    let after = m.stats();
    assert!(
        after.opens_passthrough > before.opens_passthrough,
        "warm opens use passthrough: {after:?}"
    );
    assert_eq!(
        after.opens_filling, before.opens_filling,
        "no warm open refills"
    );
    assert_eq!(
        after.bytes_fetched, before.bytes_fetched,
        "warm reads fetch nothing"
    );
    assert_eq!(after.read_errors, 0);
}

#[test]
fn user_space_fallback_serves_correct_bytes() {
    require_mount!();
    let d = Dirs::new();
    let files = files(&d);
    let m = d.mount(&["min_size_mb=0", "passthrough=0"]);
    check_all_reads(&m, &files, 3);
    m.wait_copies(files.iter().filter(|(_, d)| !d.is_empty()).count() as u64);
    check_all_reads(&m, &files, 4);
    let s = m.stats();
    assert_eq!(s.opens_passthrough, 0);
    assert!(
        s.opens_ssd > 0,
        "complete copies served from user space: {s:?}"
    );
    assert!(s.bytes_from_ssd > 0);
    assert_eq!(m.status()["passthrough_available"], false);
}

#[test]
fn concurrent_readers_of_one_file() {
    require_mount!();
    let d = Dirs::new();
    let data = Arc::new(d.nas_file("loras/shared.safetensors", 6 * CHUNK as usize + 12345, 9));
    let m = d.mount(&["min_size_mb=0"]);
    let path = Arc::new(m.path("loras/shared.safetensors"));
    let threads: Vec<_> = (0..12)
        .map(|t| {
            let (data, path) = (data.clone(), path.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + t);
                for _ in 0..60 {
                    let off = rng.random_range(0..data.len() as u64);
                    let len = rng.random_range(1..2 * CHUNK as usize);
                    let got = pread(&path, off, len);
                    let e = (off as usize + len).min(data.len());
                    assert_eq!(got, data[off as usize..e]);
                }
                if t % 3 == 0 {
                    assert_eq!(fs::read(&*path).unwrap(), *data);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    m.wait_copies(1);
    assert!(
        m.stats().bytes_fetched <= data.len() as u64,
        "each chunk fetched once"
    );
    assert_eq!(
        sha256_file(&path),
        sha256_file(&d.nas.join("loras/shared.safetensors"))
    );
}

#[test]
fn small_and_disallowed_files_are_not_cached() {
    require_mount!();
    let d = Dirs::new();
    let small = d.nas_file("checkpoints/tiny.safetensors", 1000, 1);
    let other = d.nas_file("custom/other.bin", 11_000_000, 2);
    let big = d.nas_file("loras/big.safetensors", 11_000_000, 3);
    let m = d.mount(&[]);
    assert_eq!(
        fs::read(m.path("checkpoints/tiny.safetensors")).unwrap(),
        small
    );
    assert_eq!(fs::read(m.path("custom/other.bin")).unwrap(), other);
    let s = m.stats();
    assert_eq!(
        (s.opens_nas, s.opens_filling, s.bytes_fetched),
        (2, 0, 0),
        "{s:?}"
    );
    assert_eq!(fs::read(m.path("loras/big.safetensors")).unwrap(), big);
    m.wait_copies(1);
    assert_eq!(m.status()["cache_entries"], 1);
}

#[test]
fn changed_nas_file_is_never_served_from_the_stale_copy() {
    require_mount!();
    let d = Dirs::new();
    let rel = "vae/model.safetensors";
    let size = 2 * CHUNK as usize + 5;
    d.nas_file(rel, size, 1);
    let m = d.mount(&["min_size_mb=0", "attr_timeout=0"]);
    let p = m.path(rel);
    fs::read(&p).unwrap();
    m.wait_copies(1);

    // Rewritten in place, same size: only the mtime tells.
    let v2 = crate::util::random_bytes(size, 2);
    fs::write(d.nas.join(rel), &v2).unwrap();
    let t = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    fs::File::options()
        .write(true)
        .open(d.nas.join(rel))
        .unwrap()
        .set_modified(t)
        .unwrap();
    assert_eq!(fs::read(&p).unwrap(), v2, "in-place rewrite");

    // Replaced by rename with a different size.
    let v3 = crate::util::random_bytes(size + 100, 3);
    fs::write(d.nas.join("vae/tmp"), &v3).unwrap();
    fs::rename(d.nas.join("vae/tmp"), d.nas.join(rel)).unwrap();
    assert_eq!(fs::read(&p).unwrap(), v3, "replaced by rename");
    assert_eq!(mmap_read(&p, true), v3);

    // And across a restart: the index holds the old identity.
    m.wait_copies(1);
    drop(m);
    let v4 = crate::util::random_bytes(size, 4);
    fs::write(d.nas.join("vae/tmp"), &v4).unwrap();
    fs::rename(d.nas.join("vae/tmp"), d.nas.join(rel)).unwrap();
    let m = d.mount(&["min_size_mb=0"]);
    assert_eq!(
        fs::read(m.path(rel)).unwrap(),
        v4,
        "changed while unmounted"
    );
}

#[test]
fn metadata_matches_the_nas() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("checkpoints/a/b/deep.safetensors", 100, 1);
    d.nas_file("loras/x.safetensors", 12_000_000, 2);
    std::os::unix::fs::symlink(
        "../loras/x.safetensors",
        d.nas.join("checkpoints/link.safetensors"),
    )
    .unwrap();
    fs::set_permissions(
        d.nas.join("loras/x.safetensors"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    let m = d.mount(&[]);
    let walk = |root: &Path| {
        let out = std::process::Command::new("find")
            .arg(".")
            .args(["-printf", "%p %y %s %m %T@ %l\n"])
            .current_dir(root)
            .output()
            .unwrap();
        let mut lines: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with(". "))
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    };
    assert_eq!(walk(&m.mnt), walk(&d.nas));
    let via_link = fs::read(m.path("checkpoints/link.safetensors")).unwrap();
    assert_eq!(
        via_link,
        fs::read(d.nas.join("loras/x.safetensors")).unwrap()
    );
    let du = |p: &Path| {
        let o = std::process::Command::new("du")
            .arg("-sb")
            .arg(p)
            .output()
            .unwrap();
        String::from_utf8(o.stdout)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(du(&m.mnt), du(&d.nas));

    // Listings are cached by the kernel only while the directory is unchanged.
    let names = |p: &Path| {
        let mut v: Vec<_> = fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&m.path("loras")), names(&d.nas.join("loras")));
    d.nas_file("loras/new.safetensors", 5, 3);
    assert_eq!(names(&m.path("loras")), names(&d.nas.join("loras")));
    fs::remove_file(d.nas.join("loras/new.safetensors")).unwrap();
    assert_eq!(names(&m.path("loras")), names(&d.nas.join("loras")));
    assert_eq!(names(&m.path("loras")).len(), 1);
}

#[test]
fn a_read_only_mount_refuses_writes() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("loras/x.safetensors", 10, 1);
    let m = d.mount(&["ro"]);
    let erofs = |r: std::io::Result<()>| {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS));
    };
    erofs(fs::write(m.path("loras/new.safetensors"), b"x"));
    erofs(
        fs::OpenOptions::new()
            .append(true)
            .open(m.path("loras/x.safetensors"))
            .map(drop),
    );
    erofs(fs::create_dir(m.path("newdir")));
    erofs(fs::remove_file(m.path("loras/x.safetensors")));
    erofs(fs::rename(m.path("loras/x.safetensors"), m.path("loras/y")));
    erofs(std::os::unix::fs::symlink("x", m.path("loras/l")));
    erofs(fs::set_permissions(
        m.path("loras/x.safetensors"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    ));
    assert_eq!(
        fs::read(d.nas.join("loras/x.safetensors")).unwrap().len(),
        10
    );
}

#[test]
fn ordinary_tools_and_python_see_the_nas() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("checkpoints/sd.safetensors", 3 * CHUNK as usize + 11, 1);
    d.nas_file("text_encoders/t5.gguf", 0, 2);
    let m = d.mount(&["min_size_mb=0"]);
    let sh = |script: &str, dir: &Path| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // ls -la (without the "total" line, whose block count may differ), stat, sha256sum, cat | wc.
    let listing = "ls -la --time-style=full-iso checkpoints text_encoders | grep -v '^total' | grep -v ' \\.\\.\\?$'; \
                   stat -c '%n %s %a %Y %F' checkpoints/sd.safetensors text_encoders/t5.gguf; \
                   sha256sum checkpoints/sd.safetensors; cat checkpoints/sd.safetensors | wc -c";
    assert_eq!(sh(listing, &m.mnt), sh(listing, &d.nas));
    // cp out of the mount.
    let copy = d.tmp.path().join("copy");
    sh(
        &format!("cp checkpoints/sd.safetensors {}", copy.display()),
        &m.mnt,
    );
    assert_eq!(
        sha256_file(&copy),
        sha256_file(&d.nas.join("checkpoints/sd.safetensors"))
    );
    // Python open() and mmap (MAP_SHARED read-only, as numpy.memmap and gguf use it).
    let py = "import hashlib, mmap, sys\n\
              with open(sys.argv[1], 'rb') as f:\n\
              \x20   a = hashlib.sha256(f.read()).hexdigest()\n\
              with open(sys.argv[1], 'rb') as f:\n\
              \x20   m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n\
              \x20   b = hashlib.sha256(m[:]).hexdigest()\n\
              print(a, b)\n";
    let run_py = |p: &Path| {
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(py)
            .arg(p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let want = run_py(&d.nas.join("checkpoints/sd.safetensors"));
    assert_eq!(run_py(&m.path("checkpoints/sd.safetensors")), want);
    m.wait_copies(1);
    assert_eq!(run_py(&m.path("checkpoints/sd.safetensors")), want, "warm");
}

/// A reader holds a complete copy through passthrough while another machine appends to the NAS
/// file: `fstat` through the reader's descriptor (what a loader does before `mmap`) and `stat`
/// of the path show the size of what the reader reads, so a mapping of that size works. Once
/// the reader closes, the mount shows the NAS file as it is now.
#[test]
fn a_held_copy_reports_the_size_it_serves() {
    use std::io::Write;
    require_mount!();
    let d = Dirs::new();
    let old = d.nas_file("checkpoints/m.safetensors", 3 * CHUNK as usize, 1);
    let m = d.mount(&["min_size_mb=0", "attr_timeout=0"]);
    let p = m.path("checkpoints/m.safetensors");
    assert_eq!(fs::read(&p).unwrap(), old);
    m.wait_copies(1);
    let before = m.stats().opens_passthrough;
    let reader = fs::File::open(&p).unwrap();
    assert_eq!(
        m.stats().opens_passthrough,
        before + 1,
        "a passthrough open"
    );

    let mut nas = fs::OpenOptions::new()
        .append(true)
        .open(d.nas.join("checkpoints/m.safetensors"))
        .unwrap();
    nas.write_all(&[7u8; 1 << 20]).unwrap();
    drop(nas);
    assert_eq!(reader.metadata().unwrap().len(), old.len() as u64, "fstat");
    assert_eq!(fs::metadata(&p).unwrap().len(), old.len() as u64, "stat");
    // A mapping of the size fstat shows reads the copy whole. (A new open is refused with
    // ETXTBSY until the reader closes: the kernel has one backing file per inode.)
    let len = reader.metadata().unwrap().len() as usize;
    // SAFETY: a read-only private mapping of a file we hold open, copied out and unmapped; the
    // slice does not outlive the mapping.
    let mapped = unsafe {
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            reader.as_raw_fd(),
            0,
        );
        assert_ne!(ptr, libc::MAP_FAILED);
        let out = std::slice::from_raw_parts(ptr as *const u8, len).to_vec();
        libc::munmap(ptr, len);
        out
    };
    assert_eq!(mapped, old);
    drop(reader);
    assert_eq!(
        fs::metadata(&p).unwrap().len(),
        old.len() as u64 + (1 << 20)
    );
    let now = fs::read(&p).unwrap();
    assert_eq!(&now[..old.len()], &old[..]);
    assert_eq!(now.len(), old.len() + (1 << 20));
}

/// The identity rule is a setting: with `size_mtime_ino_ctime`, a file rewritten in place whose
/// mtime was put back (`touch -r`, `rsync -t`) is seen as changed; copies made under a stricter
/// rule are still used after a switch to a looser one.
#[test]
fn the_identity_rule_is_a_setting() {
    require_mount!();
    let d = Dirs::new();
    let c = CHUNK as usize;
    let old = d.nas_file("loras/m.safetensors", 2 * c, 1);
    let nas = d.nas.join("loras/m.safetensors");
    let mut m = d.mount(&[
        "min_size_mb=0",
        "identity=size_mtime_ino_ctime",
        "attr_timeout=0",
    ]);
    let p = m.path("loras/m.safetensors");
    assert_eq!(fs::read(&p).unwrap(), old);
    m.wait_copies(1);
    // Rewritten in place with other bytes of the same size, the mtime put back.
    let mtime = fs::metadata(&nas).unwrap().modified().unwrap();
    let new = crate::util::random_bytes(2 * c, 2);
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&nas).unwrap();
        f.write_all_at(&new, 0).unwrap();
        f.set_modified(mtime).unwrap();
    }
    assert_eq!(fs::metadata(&nas).unwrap().modified().unwrap(), mtime);
    assert_eq!(fs::read(&p).unwrap(), new, "the ctime tells the rewrite");
    m.wait_copies(1);
    m.unmount();

    // The copy (made under the ctime rule) serves a mount with a looser rule.
    let m = d.mount(&["min_size_mb=0", "identity=size_mtime"]);
    let before = m.stats();
    assert_eq!(fs::read(m.path("loras/m.safetensors")).unwrap(), new);
    let after = m.stats();
    assert_eq!(
        after.bytes_fetched, before.bytes_fetched,
        "served from the copy"
    );
    assert_eq!(
        after.opens_passthrough + after.opens_ssd,
        before.opens_passthrough + before.opens_ssd + 1
    );
}

/// What other machines change on the NAS shows through the mount within the attribute timeout
/// (the default, 10 s): a new file, a new size, a removed file, a renamed directory. A listing shows new names at
/// once, and an open shows a new size at once (to `fstat` too, what a loader maps).
#[test]
fn changes_on_the_nas_show_within_the_attribute_timeout() {
    use std::io::Write;
    use std::time::{Duration, Instant};
    require_mount!();
    let ttl = arenafs::options::DEFAULT_ATTR_TTL;
    let d = Dirs::new();
    d.nas_file("loras/a.safetensors", 1000, 1);
    d.nas_file("vae/b.safetensors", 1000, 2);
    d.nas_file("vae/c.safetensors", 1000, 3);
    d.nas_file("vae/sub/d.safetensors", 1000, 4);
    let m = d.mount(&[&format!("attr_timeout={}", ttl.as_secs_f64())]);
    // The kernel caches all of it, the missing names too.
    for p in [
        "loras/a.safetensors",
        "vae/b.safetensors",
        "vae/c.safetensors",
    ] {
        assert_eq!(fs::metadata(m.path(p)).unwrap().len(), 1000);
    }
    assert!(fs::metadata(m.path("loras/new.safetensors")).is_err());
    assert!(fs::metadata(m.path("vae/new.safetensors")).is_err());
    assert!(fs::metadata(m.path("vae/sub/d.safetensors")).is_ok());
    assert!(fs::metadata(m.path("vae/sub2")).is_err());
    let names = |p: &str| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(m.path(p))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("loras"), ["a.safetensors"]);

    // Another machine changes the NAS.
    let grow = |p: &str| {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(d.nas.join(p))
            .unwrap();
        f.write_all(&[1u8; 500]).unwrap();
    };
    grow("loras/a.safetensors");
    grow("vae/b.safetensors");
    fs::write(d.nas.join("loras/new.safetensors"), b"new").unwrap();
    fs::write(d.nas.join("vae/new.safetensors"), b"new").unwrap();
    fs::remove_file(d.nas.join("vae/c.safetensors")).unwrap();
    fs::rename(d.nas.join("vae/sub"), d.nas.join("vae/sub2")).unwrap();
    let changed = Instant::now();

    // At once: an open's size, a listing's names.
    let f = fs::File::open(m.path("loras/a.safetensors")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1500, "fstat after an open");
    drop(f);
    assert_eq!(
        fs::metadata(m.path("loras/a.safetensors")).unwrap().len(),
        1500
    );
    assert_eq!(names("loras"), ["a.safetensors", "new.safetensors"]);
    assert_eq!(
        fs::metadata(m.path("loras/new.safetensors")).unwrap().len(),
        3
    );
    // What only the timeout refreshes, within it.
    let everything = || {
        fs::metadata(m.path("vae/b.safetensors")).is_ok_and(|md| md.len() == 1500)
            && fs::metadata(m.path("vae/new.safetensors")).is_ok()
            && fs::metadata(m.path("vae/c.safetensors")).is_err()
            && fs::metadata(m.path("vae/sub/d.safetensors")).is_err()
            && fs::metadata(m.path("vae/sub2/d.safetensors")).is_ok()
    };
    crate::util::wait_for(
        "the NAS's changes",
        ttl + Duration::from_secs(3),
        everything,
    );
    eprintln!("the NAS's changes showed after {:?}", changed.elapsed());
}

/// A listing of a directory that another machine changed drops the names it no longer has
/// from the kernel's cache, whatever the attribute timeout.
#[test]
fn a_listing_forgets_removed_names() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("vae/a.safetensors", 1000, 1);
    d.nas_file("vae/b.safetensors", 1000, 2);
    d.nas_file("vae/sub/c.safetensors", 1000, 3);
    let m = d.mount(&["attr_timeout=300"]);
    let list = || fs::read_dir(m.path("vae")).unwrap().count();
    assert_eq!(list(), 3);
    for p in [
        "vae/a.safetensors",
        "vae/b.safetensors",
        "vae/sub/c.safetensors",
    ] {
        assert!(fs::metadata(m.path(p)).is_ok());
    }
    fs::remove_file(d.nas.join("vae/a.safetensors")).unwrap();
    fs::rename(d.nas.join("vae/sub"), d.nas.join("vae/sub2")).unwrap();
    // Without a listing, the kernel keeps them (the timeout is 300 s).
    assert!(fs::metadata(m.path("vae/a.safetensors")).is_ok());
    assert!(fs::metadata(m.path("vae/sub")).is_ok());
    assert_eq!(list(), 2);
    // The listing told the kernel: gone long before the timeout.
    crate::util::wait_for(
        "the removed names to go",
        std::time::Duration::from_secs(60),
        || {
            fs::metadata(m.path("vae/a.safetensors")).is_err()
                && fs::metadata(m.path("vae/sub")).is_err()
        },
    );
    assert!(fs::metadata(m.path("vae/b.safetensors")).is_ok());
    assert!(fs::metadata(m.path("vae/sub2/c.safetensors")).is_ok());
}

/// Changes made through the mount show through it at once, whatever the attribute timeout.
#[test]
fn changes_through_the_mount_show_at_once() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("loras/sub/b.safetensors", 1000, 2);
    let m = d.mount(&["attr_timeout=300"]);
    assert!(fs::metadata(m.path("loras/sub/b.safetensors")).is_ok());
    assert!(fs::metadata(m.path("loras/new.safetensors")).is_err());
    fs::write(m.path("loras/new.safetensors"), b"new").unwrap();
    assert_eq!(
        fs::metadata(m.path("loras/new.safetensors")).unwrap().len(),
        3
    );
    fs::write(m.path("loras/new.safetensors"), b"longer").unwrap();
    assert_eq!(
        fs::metadata(m.path("loras/new.safetensors")).unwrap().len(),
        6
    );
    fs::rename(m.path("loras/sub"), m.path("loras/sub2")).unwrap();
    assert!(fs::metadata(m.path("loras/sub/b.safetensors")).is_err());
    assert!(fs::metadata(m.path("loras/sub2/b.safetensors")).is_ok());
    fs::remove_file(m.path("loras/new.safetensors")).unwrap();
    assert!(fs::metadata(m.path("loras/new.safetensors")).is_err());
}
