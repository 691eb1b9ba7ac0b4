//! A NAS that stops answering, and one that reports errors at close: on the tests' own NAS
//! ([`crate::faultnas`]), which can hang every request like a hard NFS mount whose server is
//! gone, and fail `flush` like NFS and SMB do when a quota is exceeded.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::faultnas::FaultNas;
use crate::util::{Mounted, random_bytes, require_mount, sha256_file, wait_for};

/// A test's directories: the NAS's backing directory, the NAS mount, arenafs's mount point and
/// cache, and the control socket.
struct Setup {
    tmp: tempfile::TempDir,
    back: PathBuf,
    nas: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("arenafs-hang")
            .tempdir()
            .unwrap();
        let back = tmp.path().join("back");
        let nas = tmp.path().join("nas");
        for d in [
            &back,
            &nas,
            &tmp.path().join("mnt"),
            &tmp.path().join("cache"),
        ] {
            fs::create_dir_all(d).unwrap();
        }
        Self { tmp, back, nas }
    }

    fn file(&self, rel: &str, len: usize, seed: u64) -> Vec<u8> {
        let data = random_bytes(len, seed);
        let p = self.back.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, &data).unwrap();
        data
    }

    fn mount(&self, opts: &[&str]) -> Mounted {
        let t = self.tmp.path();
        Mounted::start(
            &self.nas,
            &t.join("mnt"),
            &t.join("cache"),
            &t.join("ctl.sock"),
            opts,
        )
    }
}

/// Makes the kernel forget the dentries and inodes it does not use (of every file system), so
/// the next path walk through the mount asks the daemon again.
fn forget_kernel_entries() {
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
}

/// What one call on an uncached path did: how long it took, and its errno (0: it succeeded).
fn call(kind: usize, path: &Path) -> (Duration, i32) {
    let t = Instant::now();
    let r = match kind % 3 {
        0 => fs::symlink_metadata(path).map(drop),
        1 => fs::File::open(path).map(drop),
        _ => fs::read_dir(path.parent().unwrap()).and_then(|d| {
            d.map(|e| e.map(drop))
                .collect::<std::io::Result<Vec<()>>>()
                .map(drop)
        }),
    };
    (
        t.elapsed(),
        r.err().and_then(|e| e.raw_os_error()).unwrap_or(0),
    )
}

/// Waits until thread `t` has finished, at most `limit`; `true` if it has not.
fn wait_until<T>(t: &std::thread::JoinHandle<T>, limit: Duration) -> bool {
    let start = Instant::now();
    while !t.is_finished() {
        if start.elapsed() > limit {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// The NAS hangs with 64 calls in flight on uncached paths: a complete copy still opens and is
/// read whole within 2 × `nas_timeout` + 1 s; the uncached calls fail with `EIO` within the
/// same bound; status says offline; everything works again, without a remount, once the NAS
/// answers.
#[test]
fn a_hung_nas_never_freezes_the_mount() {
    require_mount!();
    const TIMEOUT: Duration = Duration::from_secs(2);
    let bound = 2 * TIMEOUT + Duration::from_secs(1);
    let s = Setup::new();
    s.file("checkpoints/complete.safetensors", 12 << 20, 1);
    let want = sha256_file(&s.back.join("checkpoints/complete.safetensors"));
    let dirs = ["loras", "vae", "text_encoders", "controlnet"];
    let mut uncached = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        for j in 0..16 {
            let rel = format!("{d}/m{j}.safetensors");
            s.file(&rel, 4096, (i * 100 + j) as u64);
            uncached.push(rel);
        }
    }
    let nas = FaultNas::mount(&s.back, &s.nas);
    let m = s.mount(&["min_size_mb=0", "nas_timeout=2"]);
    assert_eq!(
        sha256_file(&m.path("checkpoints/complete.safetensors")),
        want
    );
    m.wait_copies(1);

    forget_kernel_entries();
    nas.hang();
    let started = Instant::now();
    let calls: Vec<_> = uncached
        .iter()
        .enumerate()
        .map(|(i, rel)| {
            let p = m.path(rel);
            std::thread::spawn(move || call(i, &p))
        })
        .collect();
    wait_for(
        "calls held by the hung NAS",
        Duration::from_secs(10),
        || nas.waiting() > 0,
    );

    // The complete copy: looked up, opened and read whole while the NAS hangs. (Should the
    // mount freeze, the NAS answers again after a while so that the test ends and fails.)
    let complete = m.path("checkpoints/complete.safetensors");
    let t = Instant::now();
    let read = std::thread::spawn(move || sha256_file(&complete));
    let stuck = wait_until(&read, 10 * bound);
    let read_time = t.elapsed();
    if stuck {
        nas.resume();
    }
    let got = read.join().unwrap();
    assert!(
        !stuck,
        "the complete copy could not be read while the NAS hung\n{}",
        m.log()
    );
    assert_eq!(got, want, "the complete copy read while the NAS hangs");
    assert!(
        read_time <= bound,
        "reading the complete copy took {read_time:?} (bound {bound:?})\n{}",
        m.log()
    );

    // The uncached calls: EIO, within the bound.
    let mut slowest = Duration::ZERO;
    for (rel, c) in uncached.iter().zip(calls) {
        if wait_until(&c, 10 * bound) {
            nas.resume();
        }
        let (took, errno) = c.join().unwrap();
        assert_eq!(errno, libc::EIO, "{rel}: errno {errno} after {took:?}");
        assert!(
            took <= bound,
            "{rel} failed after {took:?} (bound {bound:?})"
        );
        slowest = slowest.max(took);
    }
    // A new call on an uncached path, now that the NAS is known to be offline.
    let (fresh, errno) = call(0, &m.path("loras/never-seen.safetensors"));
    assert_eq!(errno, libc::EIO);
    let status = m.status();
    assert_eq!(status["offline"], true, "{status}");
    // The control API answers too: what needs the NAS says so instead of waiting.
    let t = Instant::now();
    let resolved = arenafs::control::client::call_bytes(
        &m.socket,
        "POST",
        "/arena/resolve",
        Some(br#"{"models":["loras/m0.safetensors"]}"#.to_vec()),
    );
    match resolved {
        Err(arenafs::control::client::ClientError::Api { status, code, .. }) => {
            assert_eq!((status, code.as_str()), (503, "NAS_UNAVAILABLE"));
        }
        other => panic!("resolve while the NAS hangs: {other:?}"),
    }
    assert!(
        t.elapsed() <= bound,
        "resolve answered after {:?}",
        t.elapsed()
    );
    let metrics = arenafs::control::client::get(&m.socket, "/metrics").unwrap();
    assert!(metrics.contains("arenafs_nas_up 0"), "{metrics}");
    assert!(
        status["nas_threads"]["busy"].as_u64().unwrap() > 0,
        "the calls stuck in the NAS: {status}"
    );
    eprintln!(
        "hung NAS: complete copy read whole in {read_time:?}; 64 uncached calls failed within \
         {slowest:?} (the slowest); an uncached stat once offline failed in {fresh:?}; all \
         within {:?} of the hang",
        started.elapsed()
    );
    assert!(m.stats().index_answers > 0);

    // The NAS answers again: service resumes without a remount.
    nas.resume();
    wait_for("online again", Duration::from_secs(30), || {
        m.status()["offline"] == false
    });
    for (i, rel) in uncached.iter().enumerate().step_by(7) {
        assert_eq!(
            fs::read(m.path(rel)).unwrap(),
            random_bytes(4096, (i / 16 * 100 + i % 16) as u64),
            "{rel} after the NAS came back"
        );
    }
    assert_eq!(
        sha256_file(&m.path("checkpoints/complete.safetensors")),
        want
    );
    drop(m);
}

/// NFS and SMB report quota and space errors at `close(2)`: a copy onto the mount must fail
/// then, not report success with the data lost. With passthrough writers and without.
#[test]
fn a_close_error_on_the_nas_reaches_the_writer() {
    require_mount!();
    for passthrough in ["1", "0"] {
        let s = Setup::new();
        s.file("loras/old.safetensors", 4096, 1);
        let src = s.tmp.path().join("src.bin");
        fs::write(&src, random_bytes(1 << 20, 2)).unwrap();
        let nas = FaultNas::mount(&s.back, &s.nas);
        let m = s.mount(&[&format!("passthrough={passthrough}")]);
        nas.fail_flush(libc::EDQUOT);
        let out = Command::new("cp")
            .arg(&src)
            .arg(m.path("loras/new.safetensors"))
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "passthrough={passthrough}: cp succeeded although the NAS failed the close"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("Disk quota exceeded"),
            "passthrough={passthrough}: {stderr}"
        );
        nas.fail_flush(0);
        let out = Command::new("cp")
            .arg(&src)
            .arg(m.path("loras/again.safetensors"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            fs::read(s.back.join("loras/again.safetensors")).unwrap(),
            fs::read(&src).unwrap()
        );
        drop(m);
        drop(nas);
    }
}

/// `fsync` of a directory through the mount syncs the NAS directory (its new entries made
/// durable there), instead of answering without it.
#[test]
fn fsync_of_a_directory_reaches_the_nas() {
    require_mount!();
    let s = Setup::new();
    s.file("loras/a.safetensors", 100, 1);
    let nas = FaultNas::mount(&s.back, &s.nas);
    let m = s.mount(&[]);
    fs::write(m.path("loras/b.safetensors"), b"new").unwrap();
    let before = nas.dir_syncs();
    fs::File::open(m.path("loras")).unwrap().sync_all().unwrap();
    assert_eq!(
        nas.dir_syncs(),
        before + 1,
        "the NAS directory was not synced"
    );
    drop(m);
}

/// A writer that truncates a file with a complete copy: a reader opening the file between the
/// writer's wait for copy readers and its truncation on the NAS must not make the writer fail
/// after the NAS file is already truncated.
#[test]
fn a_truncating_open_never_fails_after_truncating() {
    require_mount!();
    let s = Setup::new();
    let old = s.file("checkpoints/m.safetensors", 8 << 20, 1);
    let new = random_bytes(5 << 20, 2);
    let nas = FaultNas::mount(&s.back, &s.nas);
    let m = s.mount(&["min_size_mb=0"]);
    let p = m.path("checkpoints/m.safetensors");
    assert_eq!(fs::read(&p).unwrap(), old);
    m.wait_copies(1);

    nas.hold_truncates(true);
    let writer = std::thread::spawn({
        let (p, new) = (p.clone(), new.clone());
        move || fs::write(&p, &new)
    });
    wait_for(
        "the writer's truncation on the NAS",
        Duration::from_secs(20),
        || nas.truncates_waiting() > 0,
    );
    // A reader opens the file while the writer's open is in the NAS.
    let reader = fs::File::open(&p).unwrap();
    nas.hold_truncates(false);
    let written = writer.join().unwrap();
    assert!(
        written.is_ok(),
        "the writer failed after the NAS file was truncated: {written:?}\n{}",
        m.log()
    );
    drop(reader);
    assert_eq!(
        fs::read(s.back.join("checkpoints/m.safetensors")).unwrap(),
        new
    );
    assert_eq!(fs::read(&p).unwrap(), new);
    drop(m);
}
