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
    // Once the flusher has recorded progress of the copies in the index, kill.
    wait_for(
        "progress recorded in the index",
        Duration::from_secs(30),
        || m.status()["cache_entries"].as_u64().unwrap() >= 2,
    );
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

#[test]
fn kill_9_during_writes_damages_nothing_that_was_written() {
    require_mount!();
    let d = crate::util::Dirs::new();
    let cached = d.nas_file("loras/cached.safetensors", 3 * CHUNK as usize, 5);
    let m = d.mount(&["min_size_mb=0"]);
    assert_eq!(
        fs::read(m.path("loras/cached.safetensors")).unwrap(),
        cached
    );
    m.wait_copies(1);
    let mut m = m;

    // A writer appends 1 MiB blocks, each made durable with fsync, until the daemon dies.
    let block = |i: usize| random_bytes(1 << 20, 1000 + i as u64);
    let path = m.path("loras/incoming.safetensors");
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let mut f = fs::File::create(&path).unwrap();
        let mut synced = 0usize;
        for i in 0..10_000 {
            if f.write_all(&block(i)).is_err() || f.sync_data().is_err() {
                break;
            }
            synced = i + 1;
        }
        synced
    });
    // Nine blocks on the NAS: the ninth is written only after the eighth was synced.
    wait_for("some blocks written", Duration::from_secs(30), || {
        fs::metadata(d.nas.join("loras/incoming.safetensors")).is_ok_and(|md| md.len() >= 9 << 20)
    });
    m.kill9();
    let synced = writer.join().unwrap();
    assert!(synced >= 8, "the writer was mid-stream ({synced} blocks)");

    // On the NAS: every synced block intact, and nothing but the writer's bytes after them.
    let on_nas = fs::read(d.nas.join("loras/incoming.safetensors")).unwrap();
    assert!(on_nas.len() >= synced << 20);
    for (i, got) in on_nas.chunks(1 << 20).enumerate() {
        assert_eq!(got, &block(i)[..got.len()], "block {i} on the NAS");
    }

    // A new daemon clears the stale mount and serves both files correctly.
    let m = d.mount(&["min_size_mb=0"]);
    assert_eq!(
        fs::read(m.path("loras/cached.safetensors")).unwrap(),
        cached
    );
    assert_eq!(
        fs::read(m.path("loras/incoming.safetensors")).unwrap(),
        on_nas
    );
    assert!(
        m.log().contains("cleared a stale arenafs mount"),
        "{}",
        m.log()
    );
}
