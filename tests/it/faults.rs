//! Faults under a running mount: the NAS file changing under an open reader, the SSD filling
//! up or failing, and many readers while eviction runs. Whatever happens, a read returns the
//! NAS's bytes or an error, never bytes of a superseded version (DESIGN.md §2.1, §2.6).

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::util::{CHUNK, Dirs, LoopCache, Mounted, require_mount, wait_for};

/// Random bytes from the kernel: quick in a debug build, unlike a seeded generator (the tests
/// keep what they wrote, so they need no seed).
fn urandom(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    io::Read::read_exact(&mut fs::File::open("/dev/urandom").unwrap(), &mut v).unwrap();
    v
}

/// Writes a NAS file of `len` random bytes (creating parent dirs) and returns them.
fn nas_file(d: &Dirs, rel: &str, len: usize) -> Vec<u8> {
    let data = urandom(len);
    let p = d.nas.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, &data).unwrap();
    data
}

/// SHA-256 of a file with coreutils' `sha256sum` (quick whatever the build profile).
fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "sha256sum {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Reads up to `len` bytes at `offset` from an open file (short only at the end of the file).
fn pread_fd(f: &fs::File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    Ok(buf)
}

/// Drops the kernel's cached pages of `[offset, offset + len)` of an open file, so the next read
/// of that range reaches the daemon.
fn drop_pages(f: &fs::File, offset: u64, len: u64) {
    nix::fcntl::posix_fadvise(
        f,
        offset as i64,
        len as i64,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
}

/// Drops the kernel's cached pages of a file (all of them), so the next read reaches the daemon.
fn drop_cached_pages(path: &Path) {
    drop_pages(&fs::File::open(path).unwrap(), 0, 0);
}

/// How the NAS file changes under the reader.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Change {
    /// Truncated in place on the NAS (same inode, new size and mtime).
    Truncate,
    /// Replaced by rename with other bytes of the same size and the same mtime (`touch -r`):
    /// only the inode number tells.
    Replace,
}

/// What the reader's earlier history makes of a range.
#[derive(Clone, Copy, Debug)]
enum Held {
    /// In the SSD copy (fetched through another handle), not in the kernel's page cache.
    Ssd,
    /// In the SSD copy and read through the reader before the change (kernel page cache too).
    SsdAndPages,
    /// Nowhere: the read fetches it from the NAS.
    Nothing,
}

/// One reader keeps reading a partially cached file while the NAS file changes. Returns the
/// reads that got bytes the NAS did not hold at that moment.
fn reader_through_a_change(change: Change, passthrough: bool) -> Vec<String> {
    let d = Dirs::new();
    let rel = "loras/model.safetensors";
    let c = CHUNK as usize;
    let size = 8 * c + 4321;
    let v1 = nas_file(&d, rel, size);
    let nas_path = d.nas.join(rel);
    // Nothing completes copies in the background: the file stays partially cached, with
    // exactly the chunks the reads below fetch.
    let mut opts = vec!["min_size_mb=0", "cache_discovery=manual_only"];
    if !passthrough {
        opts.push("passthrough=0");
    }
    let m = d.mount(&opts);
    let p = m.path(rel);

    // Chunks 1 and 5 cached through an earlier handle.
    for k in [1, 5] {
        let f = fs::File::open(&p).unwrap();
        assert_eq!(
            pread_fd(&f, k * CHUNK, 4096).unwrap(),
            v1[k as usize * c..][..4096]
        );
    }
    // The reader, and a NAS reader that opened the file at the same moment.
    let reader = fs::File::open(&p).unwrap();
    let direct = fs::File::open(&nas_path).unwrap();
    for k in [0, 3] {
        let got = pread_fd(&reader, k * CHUNK, 256 << 10).unwrap();
        assert_eq!(got, v1[k as usize * c..][..256 << 10]);
    }
    for k in [1, 5] {
        drop_pages(&reader, k * CHUNK, CHUNK);
    }
    // The rests of chunks 0 and 3 are fetched behind the reads.
    wait_for("chunks 0, 1, 3, 5 cached", Duration::from_secs(30), || {
        m.stats().bytes_fetched >= 4 * CHUNK
    });
    let s = m.stats();
    assert_eq!(
        s.bytes_fetched,
        4 * CHUNK,
        "chunks 0, 1, 3, 5 cached: {s:?}"
    );
    assert_eq!(s.opens_filling, 3, "{s:?}");

    let new_len = match change {
        Change::Truncate => {
            let new_len = 4 * CHUNK + 1000;
            fs::OpenOptions::new()
                .write(true)
                .open(&nas_path)
                .unwrap()
                .set_len(new_len)
                .unwrap();
            new_len
        }
        Change::Replace => {
            let tmp = d.nas.join("loras/.model.tmp");
            fs::write(&tmp, urandom(size)).unwrap();
            let st = Command::new("touch")
                .arg("-r")
                .arg(&nas_path)
                .arg(&tmp)
                .status()
                .unwrap();
            assert!(st.success());
            fs::rename(&tmp, &nas_path).unwrap();
            size as u64
        }
    };
    // Past the attribute timeout (1 s): the documented window for the kernel's own caches.
    std::thread::sleep(Duration::from_millis(1500));

    // (offset, length, what the reader's history holds there). The first read lands on a
    // cached chunk: nothing has fetched from the changed NAS file yet.
    let reads: Vec<(u64, usize, Held)> = vec![
        (5 * CHUNK + 100, 64 << 10, Held::Ssd),
        (CHUNK + 100, 64 << 10, Held::Ssd),
        (100, 64 << 10, Held::SsdAndPages),
        (3 * CHUNK, 128 << 10, Held::SsdAndPages),
        (2 * CHUNK + 7, 64 << 10, Held::Nothing),
        (new_len - 100, 64 << 10, Held::Nothing),
        (6 * CHUNK, 64 << 10, Held::Nothing),
        (8 * CHUNK, 8192, Held::Nothing),
        (CHUNK - 300, 600, Held::SsdAndPages),
        (5 * CHUNK + 200, 64 << 10, Held::Ssd),
    ];
    let mut bad = Vec::new();
    let mut errors = 0;
    for (off, len, held) in reads {
        let got = pread_fd(&reader, off, len);
        // What a direct read of the NAS returns now: by path, and (for a file replaced by
        // rename) through a descriptor opened before the change, which still reads the old
        // file.
        let by_path = pread_fd(&fs::File::open(&nas_path).unwrap(), off, len).unwrap();
        let by_fd = pread_fd(&direct, off, len).unwrap();
        match got {
            Ok(got) if got == by_path || got == by_fd => {}
            Ok(got) => bad.push(format!(
                "{change:?}, passthrough={passthrough}: pread({off}, {len}) [{held:?}] got {} \
                 bytes{}, the NAS holds {} bytes there",
                got.len(),
                if v1.get(off as usize..off as usize + got.len()) == Some(&got[..]) {
                    " of the old version"
                } else {
                    ""
                },
                by_path.len()
            )),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => errors += 1,
            Err(e) => bad.push(format!(
                "{change:?}, passthrough={passthrough}: pread({off}, {len}) [{held:?}]: {e}"
            )),
        }
    }
    // A fresh open reads exactly the new NAS content.
    let now = fs::read(&nas_path).unwrap();
    match fs::read(&p) {
        Ok(got) if got == now => {}
        Ok(got) => bad.push(format!(
            "{change:?}, passthrough={passthrough}: a fresh open read {} bytes, not the NAS's {}{}",
            got.len(),
            now.len(),
            if got == v1 { " (the old version)" } else { "" }
        )),
        Err(e) => bad.push(format!(
            "{change:?}, passthrough={passthrough}: a fresh open failed: {e}"
        )),
    }
    // And the reader, now that the change is known everywhere, reads what the NAS holds.
    match pread_fd(&reader, 0, size + 10) {
        Ok(got) if got == now || got == pread_fd(&direct, 0, size + 10).unwrap() => {}
        Ok(got) => bad.push(format!(
            "{change:?}, passthrough={passthrough}: the reader's full read after a fresh open \
             got {} bytes, the NAS holds {}",
            got.len(),
            now.len()
        )),
        Err(e) if e.raw_os_error() == Some(libc::EIO) => errors += 1,
        Err(e) => bad.push(format!(
            "{change:?}, passthrough={passthrough}: the reader's full read: {e}"
        )),
    }
    eprintln!("{change:?}, passthrough={passthrough}: {errors} reads failed with EIO");
    if !bad.is_empty() {
        bad.push(format!("daemon log:\n{}", m.log()));
    }
    bad
}

#[test]
fn nas_file_truncated_or_replaced_under_a_reader() {
    require_mount!();
    let mut bad = Vec::new();
    for change in [Change::Truncate, Change::Replace] {
        for passthrough in [true, false] {
            bad.extend(reader_through_a_change(change, passthrough));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Fills `dir` with a ballast file until its file system is full; returns its path.
fn fill_up(dir: &Path) -> PathBuf {
    let path = dir.join("ballast");
    let mut f = fs::File::create(&path).unwrap();
    let block = vec![0x5au8; 1 << 20];
    loop {
        match io::Write::write(&mut f, &block) {
            Ok(n) if n == block.len() => {}
            Ok(_) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("ballast: {e}"),
        }
    }
    // The last few blocks one page at a time.
    loop {
        match io::Write::write(&mut f, &block[..4096]) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("ballast: {e}"),
        }
    }
    let _ = f.sync_all();
    path
}

fn complete(m: &Mounted) -> u64 {
    m.status()["cache_complete_entries"].as_u64().unwrap()
}

/// Waits until `n` copies are complete; the failure message has the status and the log.
fn wait_complete(m: &Mounted, n: u64) {
    let start = std::time::Instant::now();
    while complete(m) < n {
        if start.elapsed() > Duration::from_secs(60) {
            panic!(
                "no {n} complete copies after 60 s\nstatus: {}\nlog:\n{}",
                m.status(),
                m.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn jobs_done(m: &Mounted) {
    crate::util::wait_for("copy jobs to end", Duration::from_secs(60), || {
        m.status()["jobs"].as_array().unwrap().is_empty()
    });
}

#[test]
fn ssd_full_keeps_reads_working() {
    require_mount!();
    let d = Dirs::new();
    let cache_dir = d.tmp.path().join("cachefs");
    fs::create_dir(&cache_dir).unwrap();
    // Declared before the mount: dropped (unmounted) after it.
    let cache = LoopCache::new(&d.tmp.path().join("cache.img"), &cache_dir, 80);
    let c = CHUNK as usize;
    let big = "checkpoints/big.safetensors";
    nas_file(&d, big, 24 * c + 17); // 96 MiB: more than the whole cache file system
    let mid = "loras/mid.safetensors";
    let mid_bytes = nas_file(&d, mid, 10 * c + 5); // 40 MiB: fits while the SSD is empty
    // Background copies crawl (4 MB/s), so the SSD fills up under a running copy.
    let m = Mounted::start(
        &d.nas,
        &d.mnt,
        cache.dir(),
        &d.socket,
        &["cache_bwlimit_mbps=4"],
    );

    // A file larger than the SSD is read from the NAS.
    assert_eq!(
        sha256sum(&m.path(big)),
        sha256sum(&d.nas.join(big)),
        "{big}"
    );
    assert!(
        m.log().contains("copy does not fit in the cache"),
        "{}",
        m.log()
    );
    assert_eq!(complete(&m), 0);

    // A copy starts (a real load: past the threshold), then the SSD fills up under it.
    let reader = fs::File::open(m.path(mid)).unwrap();
    assert_eq!(pread_fd(&reader, 0, 6 << 20).unwrap(), mid_bytes[..6 << 20]);
    crate::util::wait_for("the copy job", Duration::from_secs(10), || {
        !m.status()["jobs"].as_array().unwrap().is_empty()
    });
    let ballast = fill_up(cache.dir());
    // The open reader, and fresh opens, read the NAS bytes.
    assert!(
        pread_fd(&reader, 0, mid_bytes.len()).unwrap() == mid_bytes,
        "the open reader's full read"
    );
    jobs_done(&m);
    drop(reader);
    // The SSD stays full for a while, as it does when something else filled it: past a
    // housekeeping round (10 s), which writes to the cache index too. Reads keep working,
    // through the daemon (the kernel's page cache dropped before each).
    let nas_sums = [sha256sum(&d.nas.join(mid)), sha256sum(&d.nas.join(big))];
    let full_since = std::time::Instant::now();
    while full_since.elapsed() < Duration::from_secs(12) {
        for (rel, want) in [mid, big].into_iter().zip(&nas_sums) {
            drop_cached_pages(&m.path(rel));
            assert_eq!(
                sha256sum(&m.path(rel)),
                *want,
                "{rel} while the SSD is full"
            );
        }
    }
    // Nothing half-written counts as complete or is served as a copy.
    assert_eq!(complete(&m), 0, "{}", m.status());
    let s = m.stats();
    assert_eq!((s.opens_passthrough, s.opens_ssd), (0, 0), "{s:?}");
    assert_eq!(s.read_errors, 0, "{s:?}");
    let log = m.log();
    assert!(
        log.contains("No space left on device"),
        "the log says why copies stopped:\n{log}"
    );

    // Space again: the next read makes a complete copy, without a remount.
    let ballast_len = fs::metadata(&ballast).unwrap().len();
    fs::remove_file(&ballast).unwrap();
    // ext4 hands freed blocks back at its next journal commit: make it now.
    assert!(
        Command::new("sync")
            .arg("-f")
            .arg(cache.dir())
            .status()
            .unwrap()
            .success()
    );
    crate::util::wait_for("the ballast's space", Duration::from_secs(30), || {
        cache.free_bytes() >= ballast_len
    });
    // (Dropping the kernel's pages makes the read reach the daemon.)
    drop_cached_pages(&m.path(mid));
    assert_eq!(fs::read(m.path(mid)).unwrap(), mid_bytes);
    wait_complete(&m, 1);
    jobs_done(&m);
    let before = m.stats().opens_passthrough;
    assert_eq!(sha256sum(&m.path(mid)), sha256sum(&d.nas.join(mid)));
    assert!(
        m.stats().opens_passthrough > before,
        "served from the new copy: {:?}",
        m.stats()
    );
    assert_eq!(m.stats().read_errors, 0);
}

/// How the cache becomes unusable under the mount.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Breakage {
    /// Every data file deleted directly on the SSD (the index still lists them).
    DataDeleted,
    /// The cache file system fails like a dead disk: every access returns `EIO`.
    FsFailed,
}

/// Reads of a complete, a partial and an uncached file, through handles opened before the
/// cache broke and through fresh opens after. Returns the reads that did not get the NAS bytes.
fn reads_after_the_cache_breaks(breakage: Breakage, passthrough: bool) -> Vec<String> {
    let d = Dirs::new();
    let cache_dir = d.tmp.path().join("cachefs");
    fs::create_dir(&cache_dir).unwrap();
    // Declared before the mount: dropped (unmounted) after it.
    let cache = LoopCache::new(&d.tmp.path().join("cache.img"), &cache_dir, 128);
    let c = CHUNK as usize;
    let files = [
        ("loras/complete.safetensors", 3 * c + 11),
        ("loras/partial.safetensors", 6 * c + 22),
        ("loras/uncached.safetensors", 3 * c + 33),
    ];
    let data: Vec<Vec<u8>> = files
        .iter()
        .map(|(rel, len)| nas_file(&d, rel, *len))
        .collect();
    let mut opts = vec!["min_size_mb=0", "cache_discovery=manual_only"];
    if !passthrough {
        opts.push("passthrough=0");
    }
    let m = Mounted::start(&d.nas, &d.mnt, cache.dir(), &d.socket, &opts);
    let path = |i: usize| m.path(files[i].0);
    assert_eq!(fs::read(path(0)).unwrap(), data[0]);
    wait_complete(&m, 1);
    for k in [0, 3] {
        assert_eq!(crate::util::pread(&path(1), k * CHUNK, 4096).len(), 4096);
    }
    // Held handles; those of the cached files have read a little.
    let held: Vec<fs::File> = (0..3)
        .map(|i| {
            let f = fs::File::open(path(i)).unwrap();
            if i < 2 {
                assert_eq!(pread_fd(&f, 0, 4096).unwrap(), data[i][..4096]);
            }
            f
        })
        .collect();
    let s = m.stats();
    let complete_opens = if passthrough {
        s.opens_passthrough
    } else {
        s.opens_ssd
    };
    assert_eq!(complete_opens, 1, "the complete copy is served: {s:?}");

    match breakage {
        Breakage::DataDeleted => {
            let mut n = 0;
            for sub in fs::read_dir(cache.dir().join("arenafs-v1/data")).unwrap() {
                for f in fs::read_dir(sub.unwrap().path()).unwrap() {
                    fs::remove_file(f.unwrap().path()).unwrap();
                    n += 1;
                }
            }
            // The complete and the partial copy, and the (empty) one the open of the
            // uncached file started.
            assert_eq!(n, 3);
        }
        Breakage::FsFailed => cache.shut_down(),
    }
    for f in &held {
        drop_pages(f, 0, u64::MAX >> 1);
    }

    let mut bad = Vec::new();
    // The kernel allows one backing file per inode while passthrough handles are open: a
    // passthrough handle opened before the disk failed keeps reading it (the kernel reads it,
    // not the daemon), and so do new opens of that file until the handle closes. They may fail
    // with EIO; they must not return other bytes. Everything else reads the NAS bytes.
    let stuck_on_ssd = |i: usize, held_open: bool| {
        breakage == Breakage::FsFailed && passthrough && i == 0 && held_open
    };
    let mut check =
        |what: &str, i: usize, held_open: bool, got: io::Result<Vec<u8>>, want: &[u8]| match got {
            Ok(got) if got == want => {}
            Ok(got) => bad.push(format!(
                "{breakage:?}, passthrough={passthrough}: {what} of {} got {} bytes, not the \
                 NAS's {}",
                files[i].0,
                got.len(),
                want.len()
            )),
            Err(e) if stuck_on_ssd(i, held_open) && e.raw_os_error() == Some(libc::EIO) => {
                eprintln!(
                    "{breakage:?}: {what} of {} (passthrough handle open): {e}",
                    files[i].0
                )
            }
            Err(e) => bad.push(format!(
                "{breakage:?}, passthrough={passthrough}: {what} of {}: {e}",
                files[i].0
            )),
        };
    for (i, f) in held.iter().enumerate() {
        check(
            "held handle",
            i,
            true,
            pread_fd(f, 0, data[i].len() + 1),
            &data[i],
        );
    }
    // Fresh opens while the held handles are open (rounds 0, 1), and after they closed (2).
    let mut held = Some(held);
    for round in 0..3 {
        if round == 2 {
            held.take();
        }
        for i in 0..3 {
            let what = format!("fresh open (round {round})");
            check(&what, i, held.is_some(), fs::read(path(i)), &data[i]);
            let off = (data[i].len() / 3 + 4097 * round) as u64;
            let got = fs::File::open(path(i)).and_then(|f| pread_fd(&f, off, 3 * c / 2));
            let want = &data[i][off as usize..(off as usize + 3 * c / 2).min(data[i].len())];
            check(
                &format!("pread (round {round})"),
                i,
                held.is_some(),
                got,
                want,
            );
        }
    }
    if !bad.is_empty() {
        bad.push(format!("daemon log:\n{}", m.log()));
    }
    bad
}

#[test]
fn cache_dir_read_only_or_removed() {
    require_mount!();
    let mut bad = Vec::new();
    for breakage in [Breakage::DataDeleted, Breakage::FsFailed] {
        for passthrough in [true, false] {
            bad.extend(reads_after_the_cache_breaks(breakage, passthrough));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The daemon's warnings and evictions, at most `max` lines.
fn notable_log_lines(m: &Mounted, max: usize) -> String {
    m.log()
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("evicted"))
        .take(max)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Resident memory of a process, bytes.
fn rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb << 10
}

#[test]
fn many_readers_while_eviction_runs() {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    require_mount!();
    const THREADS: u64 = 32;
    const LOAD: Duration = Duration::from_secs(12);
    let d = Dirs::new();
    let c = CHUNK as usize;
    // (path, size, state before the load)
    let spec: Vec<(&str, usize, &str)> = vec![
        ("checkpoints/c0.safetensors", 5 * c + 1, "complete"),
        ("checkpoints/c1.safetensors", 5 * c + 2222, "complete"),
        ("loras/p0.safetensors", 5 * c + 333, "partial"),
        ("vae/u0.safetensors", 5 * c + 44, "uncached"),
        ("vae/u1.safetensors", 4 * c + 5555, "uncached"),
        ("diffusion_models/u2.safetensors", 6 * c, "uncached"),
        ("loras/s0.safetensors", 1_000_000, "below min_size_mb"),
        ("loras/s1.safetensors", 3 * c / 2 + 7, "below min_size_mb"),
        ("loras/s2.safetensors", 1, "below min_size_mb"),
        ("custom_nodes_data/x.bin", 3 * c + 9, "not a model category"),
    ];
    let data: Arc<Vec<Vec<u8>>> = Arc::new(
        spec.iter()
            .map(|(rel, len, _)| nas_file(&d, rel, *len))
            .collect(),
    );
    // 70 MB: three of the six cacheable files (21–25 MB each) fit at a time.
    let m = d.mount(&["min_size_mb=5", "cache_max_gb=0.07"]);
    let paths: Arc<Vec<PathBuf>> = Arc::new(spec.iter().map(|(rel, ..)| m.path(rel)).collect());
    for (i, (_, _, state)) in spec.iter().enumerate() {
        match *state {
            "complete" => {
                assert_eq!(fs::read(&paths[i]).unwrap(), data[i]);
                wait_complete(&m, 1 + i as u64);
            }
            "partial" => {
                assert_eq!(crate::util::pread(&paths[i], 2 * CHUNK, 4096).len(), 4096);
            }
            _ => {}
        }
    }
    jobs_done(&m);
    // The partial copy is recorded by the flusher.
    crate::util::wait_for("the partial copy's record", Duration::from_secs(10), || {
        m.status()["cache_entries"] == 3
    });
    assert_eq!(m.status()["cache_complete_entries"], 2);
    let pid = m.child.as_ref().unwrap().id();

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let (reads, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (data, paths, stop, failures) =
                (data.clone(), paths.clone(), stop.clone(), failures.clone());
            let (reads, bytes) = (reads.clone(), bytes.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + t);
                let fail = |msg: String| {
                    let mut f = failures.lock().unwrap();
                    if f.len() < 20 {
                        f.push(msg);
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    let i = rng.random_range(0..data.len());
                    let (want, p) = (&data[i], &paths[i]);
                    if rng.random_ratio(1, 4) {
                        match fs::read(p) {
                            Ok(got) if got == *want => {
                                bytes.fetch_add(got.len() as u64, Ordering::Relaxed)
                            }
                            Ok(got) => {
                                fail(format!(
                                    "full read of {} got {} bytes, not the NAS's",
                                    p.display(),
                                    got.len()
                                ));
                                0
                            }
                            Err(e) => {
                                fail(format!("full read of {}: {e}", p.display()));
                                0
                            }
                        };
                        reads.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let f = match fs::File::open(p) {
                        Ok(f) => f,
                        Err(e) => {
                            fail(format!("open {}: {e}", p.display()));
                            continue;
                        }
                    };
                    // Now and then the kernel's pages go, so reads reach the daemon again.
                    if rng.random_ratio(1, 3) {
                        drop_pages(&f, 0, 0);
                    }
                    for _ in 0..rng.random_range(1..6) {
                        let off = rng.random_range(0..want.len() as u64 + 3);
                        let len = rng.random_range(1..=2 << 20);
                        let s = (off as usize).min(want.len());
                        let e = (off as usize + len).min(want.len());
                        match pread_fd(&f, off, len) {
                            Ok(got) if got == want[s..e] => {
                                bytes.fetch_add(got.len() as u64, Ordering::Relaxed);
                            }
                            Ok(got) => fail(format!(
                                "pread({off}, {len}) of {} got {} bytes that are not the NAS's",
                                p.display(),
                                got.len()
                            )),
                            Err(e) => fail(format!("pread({off}, {len}) of {}: {e}", p.display())),
                        }
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    std::thread::sleep(LOAD / 2);
    let rss_mid = rss(pid);
    std::thread::sleep(LOAD / 2);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let rss_end = rss(pid);
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{THREADS} readers: {} reads, {:.0} MB/s, daemon RSS {} MiB at the middle, {} MiB at the end",
        reads.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed) as f64 / secs / 1e6,
        rss_mid >> 20,
        rss_end >> 20
    );
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{}\ndaemon log (warnings and evictions):\n{}",
        failures.join("\n"),
        notable_log_lines(&m, 40)
    );

    jobs_done(&m);
    for (i, (rel, ..)) in spec.iter().enumerate() {
        assert_eq!(sha256sum(&paths[i]), sha256sum(&d.nas.join(rel)), "{rel}");
    }
    let s = m.stats();
    assert_eq!(s.read_errors, 0, "{s:?}");
    assert!(s.evictions > 0, "eviction ran: {s:?}");
    let used = m.status()["usage"]["used"].as_u64().unwrap();
    assert!(
        used <= 70_000_000,
        "the cache stayed within its limit: {used}"
    );
    // Buffers come and go with the load; a leak grows with it.
    assert!(
        rss_end <= rss_mid + (64 << 20),
        "daemon RSS grew from {} MiB to {} MiB in the second half of the load",
        rss_mid >> 20,
        rss_end >> 20
    );
}
