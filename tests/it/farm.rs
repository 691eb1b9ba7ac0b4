//! Background copies through an HTTP source (`http_source=`, docs/farm.md): nginx (Debian's)
//! serving the NAS tree, directly or behind a forward proxy of the tests' own that misbehaves
//! on demand. Copies must match the NAS byte for byte whatever the HTTP side does; a mismatch
//! costs a fallback to the NAS, counted with its reason.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::util::{CHUNK, Dirs, require_mount, wait_for};

/// The Debian program at `path`, or `None` when it is missing: the test skips, except under
/// `CI=true`, where a missing tool is a failure (scripts/install-deps installs it).
fn debian_tool(path: &'static str) -> Option<&'static Path> {
    let bin = Path::new(path);
    if !bin.exists() {
        let why = format!("{path} is missing (scripts/install-deps installs it)");
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        eprintln!("skipping: {why}");
        return None;
    }
    Some(bin)
}

/// nginx serving `root` on 127.0.0.1, killed when dropped.
struct Nginx {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx, or says why not (skipped unless `CI` is set).
    fn start(root: &Path) -> Option<Nginx> {
        Self::start_limited(root, "0")
    }

    /// nginx sending each answer at most `rate` per second (`limit_rate`; "0": no limit).
    fn start_limited(root: &Path, rate: &str) -> Option<Nginx> {
        let bin = debian_tool("/usr/sbin/nginx")?;
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.path().display();
        let conf = format!(
            "daemon off; master_process off; user root; worker_processes 1;\n\
             pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
               log_format ranges '$status $body_bytes_sent \"$http_range\" $uri';\n\
               access_log {d}/access.log ranges;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               default_type application/octet-stream;\n\
               server {{ listen 127.0.0.1:{port}; root {}; location / {{ limit_rate {rate}; }} }}\n\
             }}\n",
            root.display()
        );
        fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let n = Nginx { child, port, dir };
        wait_for("nginx to listen", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(n)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The access log: (status, body bytes sent, Range header, path) per request.
    fn log(&self) -> Vec<(u16, u64, String, String)> {
        fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut p = l.splitn(3, ' ');
                let status = p.next()?.parse().ok()?;
                let bytes = p.next()?.parse().ok()?;
                // `"RANGE" PATH`: the path may hold spaces.
                let (range, path) = p.next()?.strip_prefix('"')?.split_once("\" ")?;
                Some((status, bytes, range.to_string(), path.to_string()))
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How the proxy of the tests answers.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    /// Forwards to the origin and returns its answer (a plain forward proxy).
    Forward,
    /// Answers a ranged request with the whole file (`200`).
    Whole,
    /// Answers with a `Content-Range` one byte off.
    BadRange,
    /// Answers with the `Last-Modified` of an older version (what a cache that kept one does).
    Stale,
    /// Forwards the first request, then stops: later connections are closed unanswered (a
    /// proxy that goes away in the middle of a copy).
    Stops,
}

/// A forward proxy on 127.0.0.1 that records request lines and headers.
struct Proxy {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    fn start(mode: Mode) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let s = s.clone();
                std::thread::spawn(move || proxy_one(stream, mode, &s));
            }
        });
        Proxy { port, seen }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn proxy_one(mut client: TcpStream, mode: Mode, seen: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            break;
        }
        head.push(line);
    }
    let nth = {
        let mut seen = seen.lock().unwrap();
        seen.push(head.join("\n"));
        seen.len()
    };
    if mode == Mode::Stops && nth > 1 {
        let _ = client.shutdown(std::net::Shutdown::Both);
        return;
    }
    // `GET http://host:port/path HTTP/1.1` (absolute form).
    let Some(target) = head[0].split_whitespace().nth(1) else {
        return;
    };
    let Some(rest) = target.strip_prefix("http://") else {
        let _ = client.write_all(b"HTTP/1.1 400 X\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let header = |name: &str| {
        head.iter()
            .find_map(|h| {
                let (k, v) = h.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    let range = if mode == Mode::Whole {
        String::new()
    } else {
        format!("Range: {}\r\n", header("range"))
    };
    let if_match = match header("if-match") {
        v if v.is_empty() => String::new(),
        v => format!("If-Match: {v}\r\n"),
    };
    let mut origin = TcpStream::connect(authority).unwrap();
    write!(
        origin,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\n{range}{if_match}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    origin.read_to_end(&mut answer).unwrap();
    if mode == Mode::Stale {
        let text = String::from_utf8_lossy(&answer[..answer.len().min(4096)]).to_string();
        if let Some(i) = text.find("Last-Modified: ") {
            let at = i + "Last-Modified: ".len();
            let end = text[at..].find("\r\n").unwrap() + at;
            let old = b"Sun, 06 Nov 1994 08:49:37 GMT";
            let mut out = answer[..at].to_vec();
            out.extend_from_slice(&old[..(end - at).min(old.len())]);
            out.extend_from_slice(&answer[end..]);
            answer = out;
        }
    }
    if mode == Mode::BadRange {
        let text = String::from_utf8_lossy(&answer[..answer.len().min(4096)]).to_string();
        if let Some(i) = text.find("Content-Range: bytes ") {
            let at = i + "Content-Range: bytes ".len();
            let end = text[at..].find('-').unwrap() + at;
            let start: u64 = text[at..end].parse().unwrap();
            let shifted = format!("{}", start + 1);
            let mut out = answer[..at].to_vec();
            out.extend_from_slice(shifted.as_bytes());
            out.extend_from_slice(&answer[end..]);
            answer = out;
        }
    }
    let _ = client.write_all(&answer);
}

fn prefetch(socket: &Path, models: &[&str]) {
    arenafs::control::client::call(
        socket,
        "POST",
        "/arena/prefetch",
        Some(&json!({ "models": models })),
    )
    .unwrap();
}

/// Copies fetched from nginx match the NAS; the bytes went over HTTP in ranged requests
/// (206 answers summing to the files' sizes), with no fallback.
#[test]
fn copies_come_over_http_and_match_the_nas() {
    require_mount!();
    let d = Dirs::new();
    let a = d.nas_file("loras/a.safetensors", 3 * CHUNK as usize + 123, 1);
    let b = d.nas_file("loras/sub dir/b.safetensors", 2 * CHUNK as usize, 2);
    let Some(nginx) = Nginx::start(&d.nas) else {
        return;
    };
    let source = format!("http_source={}", nginx.url());
    let m = d.mount(&["min_size_mb=0", "cache_cooldown_ms=0", &source]);
    prefetch(
        &m.socket,
        &["loras/a.safetensors", "loras/sub dir/b.safetensors"],
    );
    m.wait_copies(2);
    let st = m.status();
    let total = (a.len() + b.len()) as u64;
    assert_eq!(st["http_source"]["bytes"], total, "{st}");
    assert_eq!(st["http_source"]["fallbacks"], json!({}), "{st}");
    assert_eq!(fs::read(m.path("loras/a.safetensors")).unwrap(), a);
    assert_eq!(fs::read(m.path("loras/sub dir/b.safetensors")).unwrap(), b);
    let log = nginx.log();
    assert!(!log.is_empty());
    assert!(
        log.iter()
            .all(|(status, _, range, _)| *status == 206 && range.starts_with("bytes=")),
        "{log:?}"
    );
    assert_eq!(log.iter().map(|l| l.1).sum::<u64>(), total, "{log:?}");
    assert!(
        log.iter().any(|l| l.3 == "/loras/sub dir/b.safetensors"),
        "{log:?}"
    );
    let metrics = arenafs::control::client::get(&m.socket, "/metrics").unwrap();
    assert!(
        metrics.contains(&format!("arenafs_http_source_bytes_total {total}")),
        "{metrics}"
    );

    // A reader's misses come over HTTP too: a file read through the mount, never prefetched.
    let c = d.nas_file("loras/c.safetensors", 2 * CHUNK as usize + 5, 3);
    assert_eq!(fs::read(m.path("loras/c.safetensors")).unwrap(), c);
    m.wait_copies(3);
    let st = m.status();
    let all = total + c.len() as u64;
    assert_eq!(st["http_source"]["bytes"], all, "{st}");
    assert_eq!(
        st["stats"]["bytes_fetched"], all,
        "nothing from the NAS directly: {st}"
    );
    let human = Command::new(crate::util::daemon_bin())
        .args(["status", "--socket"])
        .arg(&m.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains(&format!(
            "http source  {}: {} over HTTP, 0 B from the NAS directly; fallbacks: none",
            nginx.url(),
            arenafs::ctl::human_bytes(all)
        )),
        "{text}"
    );
    let sent: u64 = nginx
        .log()
        .iter()
        .filter(|l| l.3 == "/loras/c.safetensors")
        .map(|l| l.1)
        .sum();
    assert_eq!(sent, c.len() as u64);
}

/// A proxy that answers a range with the whole file, one whose `Content-Range` is off, one that
/// gives an older version's `Last-Modified`, one that stops in the middle of a copy, one that
/// is not there: each copy falls back to the NAS, is right, and the fallback is counted with
/// its reason. A plain forward proxy gets absolute-form requests (never `CONNECT`) with the
/// Dragonfly prefetch header, and no fallback.
#[test]
fn a_misbehaving_proxy_costs_a_fallback_not_correctness() {
    require_mount!();
    let d = Dirs::new();
    let Some(nginx) = Nginx::start(&d.nas) else {
        return;
    };
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let whole = Proxy::start(Mode::Whole);
    let bad = Proxy::start(Mode::BadRange);
    let good = Proxy::start(Mode::Forward);
    let stale = Proxy::start(Mode::Stale);
    let stops = Proxy::start(Mode::Stops);
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        ("whole", whole.url(), Some("not_partial")),
        ("bad_range", bad.url(), Some("bad_range")),
        ("stale", stale.url(), Some("stale")),
        ("stops", stops.url(), Some("transport")),
        ("down", closed, Some("connect")),
        ("forward", good.url(), None),
    ];
    for (i, (name, proxy, reason)) in cases.into_iter().enumerate() {
        let rel = format!("loras/{name}.safetensors");
        let bytes = d.nas_file(&rel, 2 * CHUNK as usize + 7, 10 + i as u64);
        let source = format!("http_source={}", nginx.url());
        let proxy = format!("http_proxy={proxy}");
        let m = d.mount(&["min_size_mb=0", "cache_cooldown_ms=0", &source, &proxy]);
        prefetch(&m.socket, &[&rel]);
        m.wait_copies(i as u64 + 1);
        let st = m.status();
        match reason {
            Some(r) => assert_eq!(st["http_source"]["fallbacks"][r], 1, "{name}: {st}"),
            None => {
                assert_eq!(st["http_source"]["fallbacks"], json!({}), "{name}: {st}");
                assert_eq!(
                    st["http_source"]["bytes"],
                    bytes.len() as u64,
                    "{name}: {st}"
                );
            }
        }
        assert_eq!(fs::read(m.path(&rel)).unwrap(), bytes, "{name}");
    }
    let seen = good.seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    for req in &seen {
        let first = req.lines().next().unwrap();
        assert!(
            first.starts_with(&format!(
                "GET {}/loras/forward.safetensors HTTP/1.1",
                nginx.url()
            )),
            "{req}"
        );
        assert!(
            req.contains("X-Dragonfly-Prefetch: true")
                || req.contains("x-dragonfly-prefetch: true"),
            "{req}"
        );
    }
    // After the first answer, each request carries the pinned validator.
    assert!(
        seen.iter()
            .skip(1)
            .all(|r| r.to_ascii_lowercase().contains("if-match: ")),
        "{seen:?}"
    );
}

/// Squid (Debian's) as a caching tier on 127.0.0.1: whole-object fetches behind ranged misses,
/// collapsed forwarding. Killed when dropped.
struct Squid {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Squid {
    fn start() -> Option<Squid> {
        let bin = debian_tool("/usr/sbin/squid")?;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("cache")).unwrap();
        fs::create_dir_all(d.join("logs")).unwrap();
        // Squid drops to its own user: its directories are its own.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        let st = Command::new("chown")
            .args(["-R", "proxy:proxy"])
            .arg(d.join("cache"))
            .arg(d.join("logs"))
            .status()
            .unwrap();
        assert!(st.success());
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = d.display();
        let conf = format!(
            "http_port 127.0.0.1:{port}\n\
             acl local src 127.0.0.1/32\n\
             http_access allow local\n\
             http_access deny all\n\
             cache_effective_user proxy\n\
             pid_filename {p}/logs/squid.pid\n\
             cache_log {p}/logs/cache.log\n\
             access_log {p}/logs/access.log\n\
             coredump_dir {p}/cache\n\
             cache_dir ufs {p}/cache 2048 16 256\n\
             cache_mem 64 MB\n\
             maximum_object_size 2 GB\n\
             maximum_object_size_in_memory 8 MB\n\
             range_offset_limit none\n\
             collapsed_forwarding on\n\
             quick_abort_min -1 KB\n\
             refresh_pattern . 0 100% 525600\n\
             shutdown_lifetime 1 seconds\n"
        );
        let conf_path = d.join("squid.conf");
        fs::write(&conf_path, conf).unwrap();
        let init = Command::new(bin)
            .args(["-z", "-N", "-f"])
            .arg(&conf_path)
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
        let child = Command::new(bin)
            .args(["-N", "-f"])
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s = Squid {
            child,
            port,
            _dir: dir,
        };
        wait_for("squid to listen", Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(s)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Four nodes (mounts with their own mount points, caches and sockets) prefetch the same
/// 256 MiB model at once through one Squid in front of nginx (40 MB/s per answer): nginx sends
/// the file about once, not four times, and all four copies are the NAS's bytes. Then the file
/// is rewritten on the NAS: each node's next copy has the new bytes, whatever Squid kept.
/// Prints the time for all four against one node alone (a first file, same size).
#[test]
fn four_nodes_fetch_one_model_about_once() {
    require_mount!();
    let d = Dirs::new();
    let size = 256 << 20;
    let alone = d.nas_file("checkpoints/alone.safetensors", size, 41);
    let model = d.nas_file("checkpoints/shared.safetensors", size, 42);
    let Some(nginx) = Nginx::start_limited(&d.nas, "40m") else {
        return;
    };
    let Some(squid) = Squid::start() else {
        return;
    };
    let source = format!("http_source={}", nginx.url());
    let proxy = format!("http_proxy={}", squid.url());
    let opts = ["min_size_mb=0", "cache_cooldown_ms=0", &source, &proxy];
    let nodes: Vec<crate::util::Mounted> = (0..4)
        .map(|i| {
            let t = d.tmp.path().join(format!("node{i}"));
            fs::create_dir_all(t.join("mnt")).unwrap();
            fs::create_dir_all(t.join("cache")).unwrap();
            crate::util::Mounted::start(
                &d.nas,
                &t.join("mnt"),
                &t.join("cache"),
                &t.join("ctl.sock"),
                &opts,
            )
        })
        .collect();
    let sent = |path: &str| -> u64 {
        nginx
            .log()
            .iter()
            .filter(|l| l.3 == path)
            .map(|l| l.1)
            .sum()
    };

    // One node alone.
    let t = std::time::Instant::now();
    prefetch(&nodes[0].socket, &["checkpoints/alone.safetensors"]);
    nodes[0].wait_copies(1);
    let one = t.elapsed();
    assert_eq!(
        fs::read(nodes[0].path("checkpoints/alone.safetensors")).unwrap(),
        alone
    );

    // Four at once.
    let t = std::time::Instant::now();
    for n in &nodes {
        prefetch(&n.socket, &["checkpoints/shared.safetensors"]);
    }
    for (i, n) in nodes.iter().enumerate() {
        n.wait_copies(if i == 0 { 2 } else { 1 });
    }
    let four = t.elapsed();
    let origin = sent("/checkpoints/shared.safetensors");
    println!(
        "four nodes, one {} MiB model through squid: nginx sent {origin} bytes ({:.2}x the file); all four complete in {:.1} s, one node alone {:.1} s",
        size >> 20,
        origin as f64 / size as f64,
        four.as_secs_f64(),
        one.as_secs_f64()
    );
    assert!(origin >= size as u64, "{origin}");
    assert!(
        origin < 2 * size as u64,
        "nginx sent {origin} bytes for four nodes: the tier did not share"
    );
    for n in &nodes {
        let st = n.status();
        assert_eq!(st["http_source"]["fallbacks"], json!({}), "{st}");
        assert_eq!(
            fs::read(n.path("checkpoints/shared.safetensors")).unwrap(),
            model
        );
    }

    // Rewritten on the NAS (a later second, so the NAS mtime differs): the next copies hold the
    // new bytes, whether Squid revalidates or serves what it kept (then the Last-Modified check
    // sends the node to the NAS).
    let written = fs::metadata(d.nas.join("checkpoints/shared.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    wait_for("a later second", Duration::from_secs(5), || {
        std::time::SystemTime::now()
            .duration_since(written)
            .is_ok_and(|e| e >= Duration::from_secs(1))
    });
    let new = d.nas_file("checkpoints/shared.safetensors", size, 43);
    for n in &nodes {
        prefetch(&n.socket, &["checkpoints/shared.safetensors"]);
    }
    for (i, n) in nodes.iter().enumerate() {
        // Done: no job left, and the index (written in batches) records the copy complete.
        let want = if i == 0 { 2 } else { 1 };
        wait_for("the new version's copy", Duration::from_secs(120), || {
            let st = n.status();
            st["jobs"].as_array().is_some_and(|j| j.is_empty())
                && st["cache_complete_entries"] == want
        });
        assert_eq!(
            fs::read(n.path("checkpoints/shared.safetensors")).unwrap(),
            new
        );
    }

    // Rewritten *while* the four copy it: no node serves a mix, and each ends with the new
    // bytes (its copy falls back or starts over; the identity rule drops what was fetched).
    let moving = "checkpoints/moving.safetensors";
    d.nas_file(moving, size, 44);
    for n in &nodes {
        prefetch(&n.socket, &[moving]);
    }
    wait_for("all four copying", Duration::from_secs(60), || {
        nodes.iter().all(|n| {
            n.status()["jobs"].as_array().is_some_and(|jobs| {
                jobs.iter()
                    .any(|j| j["path"] == moving && j["done_bytes"].as_u64().unwrap_or(0) > 0)
            })
        })
    });
    let rewritten = d.nas_file(moving, size, 45);
    for n in &nodes {
        wait_for("the copy to end", Duration::from_secs(120), || {
            n.status()["jobs"].as_array().is_some_and(|j| j.is_empty())
        });
        prefetch(&n.socket, &[moving]);
    }
    for (i, n) in nodes.iter().enumerate() {
        let want = if i == 0 { 3 } else { 2 };
        wait_for(
            "the rewritten file's copy",
            Duration::from_secs(120),
            || {
                let st = n.status();
                st["jobs"].as_array().is_some_and(|j| j.is_empty())
                    && st["cache_complete_entries"] == want
            },
        );
        assert!(
            fs::read(n.path(moving)).unwrap() == rewritten,
            "node {i} served a mix"
        );
    }
}
