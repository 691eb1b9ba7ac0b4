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
