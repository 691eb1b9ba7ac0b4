//! Crash safety and NAS traffic, on a loop-device NAS whose reads the kernel counts.

use std::fs;
use std::time::Duration;

use crate::util::{CHUNK, LoopDirs, random_bytes, require_mount, sha256_file, wait_for};

fn setup(size_mb: u64) -> LoopDirs {
    LoopDirs::new(size_mb)
}

#[test]
fn each_nas_byte_is_read_at_most_once() {
    require_mount!();
    let s = setup(256);
    let size = 24 * CHUNK as usize + 4321;
    fs::create_dir(s.nas.dir.join("checkpoints")).unwrap();
    fs::write(
        s.nas.dir.join("checkpoints/big.safetensors"),
        random_bytes(size, 7),
    )
    .unwrap();
    s.nas.remount(); // cold page cache: every read below reaches the device
    s.nas.throttle(60_000_000); // slow enough that the reader and the worker overlap
    let m = s.mount(&[]);
    let before = s.nas.bytes_read();
    let p = m.path("checkpoints/big.safetensors");
    // A reader streams the file while the worker completes it.
    let hash = sha256_file(&p);
    m.wait_copies(1);
    let read = s.nas.bytes_read() - before;
    s.nas.throttle(0);
    assert!(
        read <= size as u64 + size as u64 / 50,
        "NAS bytes read {read} for a {size}-byte file (≤ 1.02×)"
    );
    assert!(read >= size as u64, "the counter saw the reads ({read})");
    assert_eq!(
        hash,
        sha256_file(&s.nas.dir.join("checkpoints/big.safetensors"))
    );
    // And the warm read costs the NAS nothing.
    let before = s.nas.bytes_read();
    assert_eq!(sha256_file(&p), hash);
    assert!(s.nas.bytes_read() - before < 1 << 20);
}

#[test]
fn kill_9_mid_fill_then_remount_serves_only_correct_bytes() {
    require_mount!();
    let s = setup(512);
    let names = [
        "checkpoints/a.safetensors",
        "loras/b.safetensors",
        "vae/c.safetensors",
    ];
    let size = 16 * CHUNK as usize + 99;
    for (i, n) in names.iter().enumerate() {
        let p = s.nas.dir.join(n);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, random_bytes(size, i as u64)).unwrap();
    }
    s.nas.remount();
    s.nas.throttle(16_000_000); // ~4 s per file: the kill lands mid-copy
    let mut m = s.mount(&["max_concurrency=3"]);
    for n in names {
        // Load each file for real (past the threshold, 10 % here): that queues its copy.
        let len = 2 * CHUNK as usize;
        assert_eq!(crate::util::pread(&m.path(n), 0, len).len(), len);
    }
    wait_for("background copies running", Duration::from_secs(30), || {
        let st = m.status();
        st["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["state"] == "running")
            .count()
            >= 2
            && st["stats"]["session_bytes_downloaded"].as_u64().unwrap() >= 2 * CHUNK
    });
    let st = m.stats();
    assert_eq!(
        st.copies_completed, 0,
        "the kill must land mid-copy: {st:?}"
    );
    assert!(st.bytes_fetched < (names.len() * size) as u64);
    // Let the flusher record some progress, then kill.
    std::thread::sleep(Duration::from_millis(700));
    m.kill9();
    s.nas.throttle(0);

    let m = s.mount(&[]);
    assert!(m.log().contains("cleared a stale arenafs mount"));
    for n in names {
        assert_eq!(
            sha256_file(&m.path(n)),
            sha256_file(&s.nas.dir.join(n)),
            "{n}"
        );
    }
    m.wait_copies(names.len() as u64);
    let after = m.stats();
    assert!(
        after.bytes_fetched < (names.len() * size) as u64,
        "partial copies were resumed, not refetched: {after:?}"
    );
    for n in names {
        assert_eq!(
            sha256_file(&m.path(n)),
            sha256_file(&s.nas.dir.join(n)),
            "{n} warm"
        );
    }
    assert!(m.stats().opens_passthrough >= names.len() as u64);
}
