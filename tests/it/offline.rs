//! Offline mode: with the NAS gone (its mount point fell back to an empty local directory),
//! complete copies are still served, everything else fails with EIO quickly, nothing is dropped
//! from the cache, and service resumes by itself when the NAS comes back.

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::{CHUNK, LoopDirs, random_bytes, require_mount, wait_for};

#[test]
fn a_lost_nas_serves_complete_copies_and_comes_back() {
    require_mount!();
    let s = LoopDirs::new(64);
    let nas = &s.nas.dir;
    fs::create_dir_all(nas.join("loras/sub")).unwrap();
    let a = random_bytes(3 * CHUNK as usize, 1);
    let b = random_bytes(2 * CHUNK as usize, 2);
    let c = random_bytes(CHUNK as usize + 7, 3);
    fs::write(nas.join("loras/a.safetensors"), &a).unwrap();
    fs::write(nas.join("loras/b.safetensors"), &b).unwrap();
    fs::write(nas.join("loras/sub/c.safetensors"), &c).unwrap();
    let m = s.mount(&["min_size_mb=0", "attr_timeout=0.1"]);
    assert_eq!(fs::read(m.path("loras/a.safetensors")).unwrap(), a);
    assert_eq!(fs::read(m.path("loras/sub/c.safetensors")).unwrap(), c);
    m.wait_copies(2);
    let entries = m.status()["cache_entries"].as_u64().unwrap();
    assert_eq!(entries, 2);

    // The NAS goes: its mount point is now an empty local directory.
    let st = Command::new("umount").arg("-l").arg(nas).status().unwrap();
    assert!(st.success());
    wait_for("offline mode", Duration::from_secs(15), || {
        m.status()["offline"] == true
    });
    let status = m.status();
    assert!(
        status["nas_health"]["reason"]
            .as_str()
            .unwrap()
            .contains("no longer the NAS"),
        "{status}"
    );

    // Complete copies: served, whole.
    assert_eq!(fs::read(m.path("loras/a.safetensors")).unwrap(), a);
    assert_eq!(fs::read(m.path("loras/sub/c.safetensors")).unwrap(), c);
    let mut listed: Vec<String> = fs::read_dir(m.path("loras"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        ["a.safetensors", "sub"],
        "listed from the cache index"
    );
    // The rest: EIO, quickly.
    let t = Instant::now();
    let err = fs::read(m.path("loras/b.safetensors")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(
        fs::write(m.path("loras/new.bin"), b"x")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EIO)
    );
    let metrics = arenafs::control::client::get(&m.socket, "/metrics").unwrap();
    assert!(metrics.contains("\narenafs_nas_up 0\n"), "{metrics}");
    assert!(m.stats().opens_offline >= 2);
    assert_eq!(
        m.status()["cache_entries"].as_u64().unwrap(),
        entries,
        "nothing dropped"
    );

    // The NAS comes back at the same place: service resumes without a remount.
    let st = Command::new("mount")
        .arg(&s.nas.dev)
        .arg(nas)
        .status()
        .unwrap();
    assert!(st.success());
    wait_for("online again", Duration::from_secs(15), || {
        m.status()["offline"] == false
    });
    assert_eq!(fs::read(m.path("loras/b.safetensors")).unwrap(), b);
    assert_eq!(fs::read(m.path("loras/a.safetensors")).unwrap(), a);
    assert!(m.status()["cache_entries"].as_u64().unwrap() >= entries);
    assert!(m.log().contains("NAS back online"), "{}", m.log());
}

#[test]
fn a_hung_nas_fails_reads_in_bounded_time() {
    require_mount!();
    let s = LoopDirs::new(64);
    let nas = &s.nas.dir;
    fs::create_dir_all(nas.join("loras")).unwrap();
    let a = random_bytes(2 * CHUNK as usize, 1);
    let b = random_bytes(2 * CHUNK as usize, 2);
    fs::write(nas.join("loras/a.safetensors"), &a).unwrap();
    fs::write(nas.join("loras/b.safetensors"), &b).unwrap();
    s.nas.remount(); // nothing of the NAS in the page cache
    let m = s.mount(&["min_size_mb=0", "nas_timeout=2"]);
    assert_eq!(fs::read(m.path("loras/a.safetensors")).unwrap(), a);
    m.wait_copies(1);
    // Look b up while the disk still answers; then it all but stops (4 KiB/s).
    assert_eq!(
        fs::metadata(m.path("loras/b.safetensors")).unwrap().len(),
        b.len() as u64
    );
    s.nas.throttle(4096);
    let t = Instant::now();
    let err = fs::read(m.path("loras/b.safetensors")).unwrap_err();
    let waited = t.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(waited < Duration::from_secs(20), "failed after {waited:?}");
    // The complete copy is still served.
    assert_eq!(fs::read(m.path("loras/a.safetensors")).unwrap(), a);
    s.nas.throttle(0);
    wait_for("reads work again", Duration::from_secs(30), || {
        fs::read(m.path("loras/b.safetensors")).is_ok_and(|got| got == b)
    });
    assert!(m.log().contains("did not answer in time"), "{}", m.log());
}

/// Runs `sh -c script` as nobody (uid and gid 65534, no other groups).
fn as_nobody(script: &str) -> std::process::Output {
    crate::util::sh_as(65534, 65534, "65534", script)
}

/// While the NAS is offline, the copies are served with the owners and modes the NAS had (write
/// bits cleared), and so are the directories above them: a private model stays private.
#[test]
fn offline_answers_keep_the_owners_and_modes_of_the_nas() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    require_mount!();
    let s = LoopDirs::new(64);
    let nas = &s.nas.dir;
    let mode = |p: &std::path::Path, m: u32| {
        fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
    };
    fs::create_dir_all(nas.join("loras/private")).unwrap();
    mode(&nas.join("loras"), 0o755);
    mode(&nas.join("loras/private"), 0o700);
    let shared = random_bytes(CHUNK as usize + 1, 1);
    let secret = random_bytes(CHUNK as usize + 2, 2);
    let inner = random_bytes(CHUNK as usize + 3, 3);
    fs::write(nas.join("loras/shared.safetensors"), &shared).unwrap();
    std::os::unix::fs::chown(nas.join("loras/shared.safetensors"), Some(1000), Some(1000)).unwrap();
    mode(&nas.join("loras/shared.safetensors"), 0o644);
    fs::write(nas.join("loras/secret.safetensors"), &secret).unwrap();
    mode(&nas.join("loras/secret.safetensors"), 0o600);
    fs::write(nas.join("loras/private/inner.safetensors"), &inner).unwrap();
    mode(&nas.join("loras/private/inner.safetensors"), 0o644);
    mode(s.tmp.path(), 0o755);
    let m = s.mount(&["min_size_mb=0", "attr_timeout=0.1"]);
    mode(&m.mnt, 0o755);
    assert_eq!(
        fs::read(m.path("loras/shared.safetensors")).unwrap(),
        shared
    );
    assert_eq!(
        fs::read(m.path("loras/secret.safetensors")).unwrap(),
        secret
    );
    assert_eq!(
        fs::read(m.path("loras/private/inner.safetensors")).unwrap(),
        inner
    );
    m.wait_copies(3);
    let shared_path = m.path("loras/shared.safetensors");
    let secret_path = m.path("loras/secret.safetensors");
    let inner_path = m.path("loras/private/inner.safetensors");
    let online = |p: &std::path::Path| as_nobody(&format!("cat {} >/dev/null", p.display()));
    assert!(online(&shared_path).status.success());
    assert!(!online(&secret_path).status.success());
    assert!(!online(&inner_path).status.success());

    let st = Command::new("umount").arg("-l").arg(nas).status().unwrap();
    assert!(st.success());
    wait_for("offline mode", Duration::from_secs(15), || {
        m.status()["offline"] == true
    });
    // Past the attribute timeout, the kernel asks the daemon (now answering from the index).
    wait_for("attributes from the index", Duration::from_secs(15), || {
        fs::metadata(&secret_path).is_ok_and(|md| md.mode() & 0o222 == 0)
    });
    let md = fs::metadata(&shared_path).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid()),
        (0o444, 1000, 1000)
    );
    assert!(m.stats().index_answers > 0);
    let md = fs::metadata(&secret_path).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o400, 0, 0));
    let md = fs::metadata(m.path("loras/private")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid()), (0o500, 0));
    // What nobody could not read online, nobody cannot read offline.
    let out = as_nobody(&format!("cat {} >/dev/null", shared_path.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in [&secret_path, &inner_path] {
        let out = as_nobody(&format!("cat {} >/dev/null", p.display()));
        assert!(!out.status.success(), "nobody read {} offline", p.display());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = as_nobody(&format!("ls {}", m.path("loras/private").display()));
    assert!(
        !out.status.success(),
        "nobody listed a private directory offline"
    );
    // Root still reads the copies.
    assert_eq!(fs::read(&secret_path).unwrap(), secret);
    assert_eq!(fs::read(&inner_path).unwrap(), inner);
}
