//! What gets cached, how fast and how much (issue: cache policy, copy worker and eviction), on
//! real mounts.

use std::fs;
use std::time::{Duration, Instant};

use crate::util::{CHUNK, Dirs, LoopDirs, Mounted, pread, random_bytes, require_mount, wait_for};

fn write_env(d: &Dirs, text: &str) -> String {
    let p = d.tmp.path().join("arena_autocache.env");
    fs::write(&p, text).unwrap();
    format!("env={}", p.display())
}

fn complete(m: &Mounted) -> u64 {
    m.status()["cache_complete_entries"].as_u64().unwrap()
}

#[test]
fn exclude_globs_and_skip_hardcoded() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("loras/test/a.safetensors", 100, 1);
    d.nas_file("checkpoints/old.ckpt", 100, 2);
    d.nas_file("controlnet/c.safetensors", 100, 3);
    d.nas_file("loras/b.safetensors", 100, 4);
    let env = write_env(
        &d,
        "ARENA_CACHE_EXCLUDE=loras/test/**,**/*.ckpt\nARENA_CACHE_SKIP_HARDCODED=1\nARENA_CACHE_MIN_SIZE_MB=0\n",
    );
    let m = d.mount(&[&env]);
    for f in [
        "loras/test/a.safetensors",
        "checkpoints/old.ckpt",
        "controlnet/c.safetensors",
    ] {
        assert_eq!(fs::read(m.path(f)).unwrap().len(), 100);
    }
    assert_eq!(m.stats().opens_nas, 3);
    fs::read(m.path("loras/b.safetensors")).unwrap();
    assert_eq!(m.stats().opens_filling, 1);
}

#[test]
fn gray_green_red() {
    require_mount!();
    let d = Dirs::new();
    let a = d.nas_file("loras/a.safetensors", 2 * CHUNK as usize, 1);
    let b = d.nas_file("loras/b.safetensors", 2 * CHUNK as usize, 2);
    let env_path = d.tmp.path().join("arena_autocache.env");
    let env = format!("env={}", env_path.display());

    // Red (no env file): copies are made and served.
    let m = d.mount(&["min_size_mb=0"]);
    assert_eq!(fs::read(m.path("loras/a.safetensors")).unwrap(), a);
    m.wait_copies(1);
    drop(m);

    // Green: the existing copy is served, no new copy is made.
    fs::write(
        &env_path,
        "ARENA_AUTO_CACHE_ENABLED=1\nARENA_AUTOCACHE_AUTOPATCH=0\nARENA_CACHE_MIN_SIZE_MB=0\n",
    )
    .unwrap();
    let m = d.mount(&[&env]);
    assert_eq!(m.status()["cache_state"], "green");
    assert_eq!(fs::read(m.path("loras/a.safetensors")).unwrap(), a);
    assert_eq!(fs::read(m.path("loras/b.safetensors")).unwrap(), b);
    let s = m.stats();
    assert_eq!(
        (s.opens_passthrough, s.opens_nas, s.opens_filling),
        (1, 1, 0),
        "{s:?}"
    );
    assert_eq!(m.status()["cache_entries"], 1);
    drop(m);

    // Gray: pure pass-through, even for the file that has a copy.
    fs::write(&env_path, "ARENA_AUTO_CACHE_ENABLED=0\n").unwrap();
    let m = d.mount(&[&env]);
    assert_eq!(m.status()["cache_state"], "gray");
    assert_eq!(fs::read(m.path("loras/a.safetensors")).unwrap(), a);
    let s = m.stats();
    assert_eq!((s.opens_passthrough, s.opens_nas), (0, 1), "{s:?}");
    drop(m);

    // ARENA_CACHE_MODE=disabled is gray too.
    fs::write(&env_path, "ARENA_CACHE_MODE=disabled\n").unwrap();
    let m = d.mount(&[&env]);
    assert_eq!(m.status()["cache_state"], "gray");
}

#[test]
fn a_scanner_schedules_no_copies_but_a_real_load_does() {
    require_mount!();
    let d = Dirs::new();
    // 500 sparse files of 20 MiB: reading a header of each is what model browsers and hashers do.
    let n = 500;
    for i in 0..n {
        let p = d.nas.join(format!("loras/set{}/m{i}.safetensors", i % 10));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        let f = fs::File::create(&p).unwrap();
        f.set_len(5 * CHUNK).unwrap();
    }
    let m = d.mount(&["min_size_mb=0"]);
    for i in 0..n {
        let got = pread(
            &m.path(&format!("loras/set{}/m{i}.safetensors", i % 10)),
            0,
            1 << 20,
        );
        assert_eq!(got.len(), 1 << 20);
    }
    // A copy is queued by the read that passes the threshold, before it answers: had any read
    // queued one, it would show as a job (queued or running) or as copied bytes now.
    let st = m.status();
    let s = m.stats();
    assert_eq!(
        s.session_bytes_downloaded, 0,
        "no background copy ran: {s:?}"
    );
    assert_eq!(st["jobs"].as_array().unwrap().len(), 0);
    assert!(
        s.bytes_fetched <= n as u64 * CHUNK,
        "cached at most a chunk per file: {s:?}"
    );
    assert_eq!(complete(&m), 0);

    // Scattered reads past the threshold (min(64 MiB, 10 %), at least 4 MiB) load one file for
    // real: it is completed.
    let p = m.path("loras/set3/m3.safetensors");
    for off in [
        3 * CHUNK,
        CHUNK + 5,
        3 * CHUNK + (2 << 20),
        CHUNK + (2 << 20),
    ] {
        pread(&p, off, 1 << 20);
    }
    wait_for("the loaded file's copy", Duration::from_secs(30), || {
        m.stats().copies_completed == 1
    });
    assert!(m.stats().session_bytes_downloaded > 0);
}

#[test]
fn config_reload_applies_to_new_opens() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("checkpoints/a.safetensors", 1000, 1);
    let env_path = d.tmp.path().join("arena_autocache.env");
    fs::write(&env_path, "ARENA_CACHE_CATEGORIES=loras\nARENA_CACHE_CATEGORIES_MODE=override\nARENA_CACHE_MIN_SIZE_MB=0\n").unwrap();
    let m = d.mount(&[&format!("env={}", env_path.display())]);
    fs::read(m.path("checkpoints/a.safetensors")).unwrap();
    assert_eq!(m.stats().opens_nas, 1);
    fs::write(
        &env_path,
        "ARENA_CACHE_CATEGORIES=loras,checkpoints\nARENA_CACHE_CATEGORIES_MODE=override\nARENA_CACHE_MIN_SIZE_MB=0\n",
    )
    .unwrap();
    wait_for("reload", Duration::from_secs(10), || {
        m.log().contains("configuration reloaded")
    });
    assert!(
        m.log()
            .contains("ARENA_CACHE_CATEGORIES: loras -> loras,checkpoints"),
        "{}",
        m.log()
    );
    fs::read(m.path("checkpoints/a.safetensors")).unwrap();
    assert_eq!(m.stats().opens_filling, 1);
    // A broken edit keeps the settings in force and says so.
    fs::write(&env_path, "ARENA_CACHE_MAX_GB=lots\nARENA_CACHE_CATEGORIES=loras,checkpoints\nARENA_CACHE_CATEGORIES_MODE=override\nARENA_CACHE_MIN_SIZE_MB=0\n").unwrap();
    wait_for("warning", Duration::from_secs(10), || {
        m.log().contains("'lots' is not a non-negative number")
    });
}

#[test]
fn eviction_keeps_the_cache_under_its_limit_in_lru_order_and_spares_open_files() {
    require_mount!();
    let d = Dirs::new();
    let size = 5 * CHUNK as usize; // 20.97 MB
    for i in 0..5 {
        d.nas_file(&format!("loras/f{i}.safetensors"), size, i);
    }
    // Room for two copies.
    let m = d.mount(&["min_size_mb=0", "cache_max_gb=0.05"]);
    let read = |i: u64| fs::read(m.path(&format!("loras/f{i}.safetensors"))).unwrap();
    read(0);
    m.wait_copies(1);
    read(1);
    m.wait_copies(2);
    read(0); // f0 is now more recently used than f1
    read(2);
    wait_for("eviction", Duration::from_secs(10), || {
        m.stats().evictions == 1
    });
    // A file is cached when opening it is a passthrough hit.
    let cached = |i: u64| {
        let before = m.stats().opens_passthrough;
        read(i);
        m.stats().opens_passthrough > before
    };
    assert!(m.status()["usage"]["used"].as_u64().unwrap() <= 50_000_000);
    assert!(cached(0), "recently used copy kept");
    assert!(cached(2), "new copy made");
    // f1 was the least recently used: evicted (reading it now starts a new copy).
    assert!(!cached(1));
    wait_for("f1 copied again", Duration::from_secs(10), || {
        m.stats().evictions >= 2
    });

    // An open file is never evicted: hold f3's copy open while others need room.
    read(3);
    // (A file whose pages are still in the kernel's page cache is read without the daemon, so
    // a re-read does not always make a new copy: wait for f3's copy to be recorded.)
    wait_for("f3 copy", Duration::from_secs(10), || {
        m.status()["jobs"].as_array().unwrap().is_empty() && complete(&m) >= 1
    });
    assert!(cached(3));
    let holder = fs::File::open(m.path("loras/f3.safetensors")).unwrap();
    for i in [4, 0, 1, 2] {
        read(i);
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = m.stats().opens_passthrough;
    let f3 = fs::read(m.path("loras/f3.safetensors")).unwrap();
    assert_eq!(f3.len(), size);
    assert!(
        m.stats().opens_passthrough > before,
        "the open copy survived"
    );
    drop(holder);
    assert!(m.status()["usage"]["used"].as_u64().unwrap() <= 50_000_000);
}

#[test]
fn pinned_copies_are_not_evicted() {
    require_mount!();
    let d = Dirs::new();
    let size = 5 * CHUNK as usize;
    for i in 0..3 {
        d.nas_file(&format!("loras/f{i}.safetensors"), size, i);
    }
    let m = d.mount(&[
        "min_size_mb=0",
        "cache_max_gb=0.05",
        "cache_pin=loras/f0.safetensors",
    ]);
    for i in 0..3 {
        fs::read(m.path(&format!("loras/f{i}.safetensors"))).unwrap();
        m.wait_copies(1);
        wait_for("copy done", Duration::from_secs(10), || {
            m.status()["jobs"].as_array().unwrap().is_empty()
        });
    }
    let before = m.stats().opens_passthrough;
    fs::read(m.path("loras/f0.safetensors")).unwrap();
    assert!(
        m.stats().opens_passthrough > before,
        "pinned copy kept although least recently used"
    );
}

/// A loop-device NAS with `files` random files `loras/fN.safetensors` of `size` bytes, its page
/// cache cold.
fn loop_setup(files: usize, size: usize) -> (LoopDirs, Vec<String>) {
    let s = LoopDirs::new(64 + (files * size) as u64 / (1 << 20) * 2);
    fs::create_dir(s.nas.dir.join("loras")).unwrap();
    let names: Vec<String> = (0..files)
        .map(|i| format!("loras/f{i}.safetensors"))
        .collect();
    for (i, n) in names.iter().enumerate() {
        fs::write(s.nas.dir.join(n), random_bytes(size, i as u64)).unwrap();
    }
    s.nas.remount();
    (s, names)
}

#[test]
fn concurrency_never_exceeds_the_limit() {
    require_mount!();
    let (s, names) = loop_setup(5, 4 * CHUNK as usize);
    // One file (f4) is read by a client while the others copy: the copies yield to it.
    let (names, reader) = (names[..4].to_vec(), names[4].clone());
    let list = s.tmp.path().join("prefetch.txt");
    fs::write(&list, names.join("\n")).unwrap();
    s.nas.throttle(20_000_000);
    let m = s.mount(&[
        "cache_max_concurrency=2",
        "cache_prefetch_strategy=prefetch_allowlist",
        &format!("cache_prefetch_allowlist={}", list.display()),
    ]);
    let start = Instant::now();
    let mut max_running = 0;
    let mut seen_two = false;
    let mut read_done = false;
    while complete(&m) < names.len() as u64 {
        if !read_done && m.status()["jobs"].as_array().unwrap().len() >= 2 {
            fs::read(m.path(&reader)).unwrap();
            read_done = true;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "copies did not finish"
        );
        let running = m.status()["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["state"] == "running")
            .count();
        max_running = max_running.max(running);
        seen_two |= running == 2;
        std::thread::sleep(Duration::from_millis(20));
    }
    s.nas.throttle(0);
    assert!(
        max_running <= 2,
        "at most 2 copies at once, saw {max_running}"
    );
    assert!(seen_two, "copies overlapped for real");
    assert!(read_done);
    assert!(
        m.stats().worker_yields > 0,
        "copies waited for the reader: {:?}",
        m.stats()
    );
}

#[test]
fn the_byte_budget_stops_copies() {
    require_mount!();
    let size = 5 * CHUNK as usize; // 20.97 MB
    let (s, _names) = loop_setup(3, size);
    // Eager mode copies what fits in the budget: one file of three.
    let m = s.mount(&[
        "cache_mode=eager",
        "cache_session_byte_budget=30000000",
        "min_size_mb=0",
    ]);
    let t = Instant::now();
    while complete(&m) != 1 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "eager copy: {}\n{}",
            m.status(),
            m.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Eager copies are queued at start, together: once the queue is empty, no other one comes.
    wait_for("the eager queue drained", Duration::from_secs(30), || {
        let st = m.status();
        st["jobs"].as_array().unwrap().is_empty() && st["queue_length"] == 0
    });
    assert_eq!(complete(&m), 1);
    // A file loaded for real is completed only while the budget lasts. Find one without a copy
    // (the one eager copied depends on the directory order).
    let p = (0..3)
        .map(|i| m.path(&format!("loras/f{i}.safetensors")))
        .find(|p| {
            let before = m.stats().opens_filling;
            pread(p, 0, 1);
            m.stats().opens_filling > before
        })
        .unwrap();
    // Past the loading threshold (4 MiB for a 20 MiB file).
    for off in [0, 2 << 20, 3 * CHUNK, 3 * CHUNK + (2 << 20)] {
        pread(&p, off, 1 << 20);
    }
    // The copy that load queued stops when the budget is spent (and says so).
    wait_for(
        "the budget to stop the copy",
        Duration::from_secs(30),
        || {
            let st = m.status();
            m.log().contains("BUDGET_EXCEEDED")
                && st["jobs"].as_array().unwrap().is_empty()
                && st["queue_length"] == 0
        },
    );
    let s = m.stats();
    assert!(s.session_bytes_downloaded <= 30_000_000, "{s:?}");
    assert_eq!(complete(&m), 1, "the budget stopped the second copy");
    assert!(m.log().contains("BUDGET_EXCEEDED"), "{}", m.log());
}

#[test]
fn statistics_survive_a_restart() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("loras/a.safetensors", 100, 1);
    let m = d.mount(&["min_size_mb=0"]);
    fs::read(m.path("loras/a.safetensors")).unwrap();
    drop(m);
    let m = d.mount(&["min_size_mb=0"]);
    fs::read(m.path("loras/a.safetensors")).unwrap();
    let body = arenafs::control::client::get(&m.socket, "/arena/stats").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["opens_passthrough"], 1, "since start");
    assert_eq!(v["totals"]["overall"]["opens_filling"], 1, "{v}");
    assert_eq!(v["totals"]["overall"]["opens_passthrough"], 1);
    assert_eq!(v["totals"]["categories"]["loras"]["hits"], 1);
    assert_eq!(v["totals"]["categories"]["loras"]["misses"], 1);
}

#[test]
fn the_bandwidth_cap_slows_background_copies() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("loras/a.safetensors", 6 * CHUNK as usize, 1);
    let list = d.tmp.path().join("prefetch.txt");
    fs::write(&list, "loras/a.safetensors\n").unwrap();
    let start = Instant::now();
    let m = d.mount(&[
        "min_size_mb=0",
        "cache_bwlimit_mbps=8",
        "cache_prefetch_strategy=prefetch_allowlist",
        &format!("cache_prefetch_allowlist={}", list.display()),
    ]);
    m.wait_copies(1);
    // 25.2 MB at 8 MB/s, less at most one second of burst: no faster than ~2 s.
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(2000),
        "copy took only {took:?}"
    );
}

#[test]
fn manual_only_discovery_completes_nothing_by_itself() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("loras/a.safetensors", 5 * CHUNK as usize, 1);
    let m = d.mount(&["min_size_mb=0", "cache_discovery=manual_only"]);
    let p = m.path("loras/a.safetensors");
    // 5 MiB in chunks 0, 2 and 4: past the loading threshold (4 MiB for a 20 MiB file).
    for off in [0, 2 << 20, 2 * CHUNK, 2 * CHUNK + (2 << 20), 4 * CHUNK] {
        pread(&p, off, 1 << 20);
    }
    // Copies are queued by the reads themselves, before they answer: none is queued now, none
    // will be.
    assert_eq!(m.status()["queue_length"], 0);
    assert!(m.status()["jobs"].as_array().unwrap().is_empty());
    // The rests of the chunks the reads started are fetched behind them.
    wait_for("the read chunks cached", Duration::from_secs(30), || {
        m.stats().bytes_fetched >= 3 * CHUNK
    });
    let s = m.stats();
    assert_eq!(s.session_bytes_downloaded, 0, "no background copy: {s:?}");
    assert_eq!(s.bytes_fetched, 3 * CHUNK, "reads keep what they fetched");
    assert_eq!(complete(&m), 0);
}

/// A NAS file modified less than `stable_secs` ago is read from the NAS but not copied (coarse
/// NAS timestamps could hide a second rewrite); once its mtime is old enough, it is copied.
/// A prefetch of such a file waits for it and then copies it.
#[test]
fn a_file_modified_a_moment_ago_is_copied_once_it_settles() {
    require_mount!();
    let d = Dirs::new();
    let data = d.nas_file("loras/fresh.safetensors", 2 * CHUNK as usize, 1);
    let m = d.mount(&["min_size_mb=0", "stable_secs=3600"]);
    let p = m.path("loras/fresh.safetensors");
    assert_eq!(fs::read(&p).unwrap(), data);
    let st = m.stats();
    assert_eq!(st.bytes_fetched, 0, "nothing cached: {st:?}");
    assert_eq!(st.opens_nas, 1, "{st:?}");
    assert_eq!(m.status()["cache_entries"], 0);
    // An hour old now (another machine's `touch`): copied as it is read.
    let st = std::process::Command::new("touch")
        .args(["-d", "2 hours ago"])
        .arg(d.nas.join("loras/fresh.safetensors"))
        .status()
        .unwrap();
    assert!(st.success());
    // The kernel's attributes expire within the attribute timeout; it reads the new identity.
    crate::util::wait_for(
        "a copy of the settled file",
        Duration::from_secs(30),
        || {
            assert_eq!(fs::read(&p).unwrap(), data);
            m.status()["cache_complete_entries"] == 1
        },
    );
    drop(m);

    // A prefetch of a file modified just now: copied once it is a second old.
    let d = Dirs::new();
    let data = d.nas_file("loras/new.safetensors", 2 * CHUNK as usize, 2);
    let m = d.mount(&["min_size_mb=0", "stable_secs=1"]);
    let answer = arenafs::control::client::call_bytes(
        &m.socket,
        "POST",
        "/arena/prefetch",
        Some(br#"{"models":["loras/new.safetensors"]}"#.to_vec()),
    )
    .unwrap();
    assert_eq!(answer["status"], "success", "{answer}");
    m.wait_copies(1);
    assert_eq!(fs::read(m.path("loras/new.safetensors")).unwrap(), data);
}
