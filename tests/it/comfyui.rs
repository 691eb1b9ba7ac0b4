//! The ComfyUI package (`comfyui/`) inside a real ComfyUI server (0.3.64, from
//! `../shared/vendor/`, with its PyPI dependencies in a venv that `scripts/install-deps` makes):
//! `models/` is an arenafs mount; a queued prompt's upscale model becomes this instance's required
//! set and is copied, the image is made, a second run reads the SSD copy, and the Stats and Trim
//! nodes answer from the daemon (tests/python/comfyui_e2e.py drives ComfyUI's HTTP API).

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::util::{Dirs, LoopDirs, random_bytes, require_mount};

const VENV_PYTHON: &str = "/var/tmp/arenafs-comfy-venv/bin/python";
const COMFYUI: &str = "/var/tmp/arenafs-comfyui/ComfyUI";
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/comfyui_e2e.py");
const PACKAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/comfyui");

/// The venv's python and the ComfyUI source, if `scripts/install-deps` made them (it does when
/// `../shared/vendor/` holds ComfyUI). Under `CI=true` their absence is a failure.
fn comfyui() -> Option<(&'static Path, &'static Path)> {
    let (py, src) = (Path::new(VENV_PYTHON), Path::new(COMFYUI));
    if py.exists() && src.join("main.py").exists() {
        return Some((py, src));
    }
    let why = format!("{VENV_PYTHON} or {COMFYUI} is missing (scripts/install-deps makes them)");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}");
    }
    eprintln!("skipping: {why}");
    None
}

/// A ComfyUI server, killed when dropped.
struct Server {
    child: Child,
    log: PathBuf,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts ComfyUI on the CPU, on a free port of 127.0.0.1, with `base` as its base directory
/// (made here, with this package installed and `models/` a symlink to `models` when given), and
/// waits until it serves. A port taken between choosing it and binding it costs another try.
fn launch(py: &Path, src: &Path, base: &Path, models: Option<&Path>, socket: &Path) -> Server {
    for sub in ["custom_nodes", "input", "output"] {
        fs::create_dir_all(base.join(sub)).unwrap();
    }
    if let Some(models) = models {
        symlink(models, base.join("models")).unwrap();
    }
    symlink(PACKAGE, base.join("custom_nodes/arenafs")).unwrap();
    let log = base.join("comfyui.log");
    let mut last = String::new();
    for _ in 0..3 {
        let port = free_port();
        let out = fs::File::create(&log).unwrap();
        let child = Command::new(py)
            .arg(src.join("main.py"))
            .args(["--cpu", "--listen", "127.0.0.1", "--disable-auto-launch"])
            .args(["--port", &port.to_string()])
            .arg("--base-directory")
            .arg(base)
            .env("ARENAFS_SOCKET", socket)
            .current_dir(src)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut server = Server {
            child,
            log: log.clone(),
            url: format!("http://127.0.0.1:{port}"),
        };
        let serving = format!("To see the GUI go to: http://127.0.0.1:{port}");
        let started = std::time::Instant::now();
        loop {
            if server.log().contains(&serving) {
                return server;
            }
            if server.child.try_wait().unwrap().is_some() {
                break; // exited: the port was taken, say; try another
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(180),
                "ComfyUI did not start:\n{}",
                server.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        last = server.log();
    }
    panic!("ComfyUI exited three times:\n{last}");
}

/// Fails the test, with everything worth reading, unless a helper exited 0 and printed OK.
fn assert_ok(what: &str, out: &std::process::Output, logs: &[String]) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "{what}: {}\nstdout:\n{stdout}\nstderr:\n{}\nlogs:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        logs.join("\n----\n")
    );
}

fn run(py: &Path, args: &[&str]) -> std::process::Output {
    Command::new(py)
        .args(["-X", "faulthandler", SCRIPT])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_queued_prompt_feeds_the_cache_and_the_nodes_answer() {
    require_mount!();
    let Some((py, src)) = comfyui() else {
        return;
    };
    let d = Dirs::new();
    let model = d.nas.join("upscale_models/tiny.safetensors");
    let out = run(py, &["make-model", model.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A file only the allow-list names, for the override node's prefetch strategy.
    fs::create_dir_all(d.nas.join("loras")).unwrap();
    fs::write(
        d.nas.join("loras/extra.safetensors"),
        random_bytes(3 << 20, 9),
    )
    .unwrap();
    let allowlist = d.tmp.path().join("allowlist.txt");
    fs::write(
        &allowlist,
        "# for prompts that ask for it\nloras/extra.safetensors\n",
    )
    .unwrap();
    let m = d.mount(&[
        "min_size_mb=0",
        &format!("cache_prefetch_allowlist={}", allowlist.display()),
    ]);
    let base = d.tmp.path().join("comfy");
    let server = launch(py, src, &base, Some(&m.mnt), &m.socket);
    let socket = m.socket.to_str().unwrap();
    let out = run(py, &["check", &server.url, socket, base.to_str().unwrap()]);
    assert_ok("comfyui_e2e.py check", &out, &[server.log(), m.log()]);
    let log = server.log();
    assert!(
        log.contains(&format!(
            "arenafs: using the daemon at {socket} (from ARENAFS_SOCKET)"
        )),
        "{log}"
    );
    assert!(!log.contains("IMPORT FAILED"), "{log}");
}

#[test]
fn without_the_daemon_comfyui_works_as_before() {
    let Some((py, src)) = comfyui() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("comfy");
    let model = base.join("models/upscale_models/tiny.safetensors");
    let out = run(py, &["make-model", model.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = launch(py, src, &base, None, &tmp.path().join("no-daemon.sock"));
    let out = run(
        py,
        &["check-no-daemon", &server.url, base.to_str().unwrap()],
    );
    assert_ok("comfyui_e2e.py check-no-daemon", &out, &[server.log()]);
    assert!(
        server
            .log()
            .contains("arenafs: the daemon is not reachable"),
        "{}",
        server.log()
    );
}

/// While a queued prompt's model copies (from a NAS throttled to 4 MB/s), its progress reaches
/// ComfyUI's websocket as `arenafs.progress` events, and a last one with no jobs when it is done.
#[test]
fn copy_progress_reaches_the_websocket() {
    require_mount!();
    let Some((py, src)) = comfyui() else {
        return;
    };
    let s = LoopDirs::new(64);
    fs::create_dir(s.nas.dir.join("upscale_models")).unwrap();
    fs::write(
        s.nas.dir.join("upscale_models/big.safetensors"),
        random_bytes(24 << 20, 5),
    )
    .unwrap();
    s.nas.remount();
    s.nas.throttle(4_000_000);
    let m = s.mount(&["min_size_mb=0"]);
    let base = s.tmp.path().join("comfy");
    let server = launch(py, src, &base, Some(&m.mnt), &m.socket);
    let out = run(py, &["check-progress", &server.url, base.to_str().unwrap()]);
    s.nas.throttle(0);
    assert_ok(
        "comfyui_e2e.py check-progress",
        &out,
        &[server.log(), m.log()],
    );
}

const NODE_MODULES: &str = "/var/tmp/arenafs-node/node_modules";
const PANEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/panel.mjs");

/// Debian's chromium and playwright-core (scripts/install-deps installs both).
fn browser() -> bool {
    let ok = Path::new("/usr/bin/chromium").exists()
        && Path::new(NODE_MODULES).join("playwright-core").exists();
    if !ok {
        let why = "chromium or playwright-core is missing (scripts/install-deps installs them)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        eprintln!("skipping: {why}");
    }
    ok
}

/// The panel as a person uses it, in headless chromium: the Arena settings show the daemon's
/// values and a change reaches the daemon (and its env file); Dry-run lists the open workflow's
/// model; Run shows the copy in progress on the badge. Screenshots go to target/ui-screenshots.
#[test]
fn the_panel_in_a_real_browser() {
    require_mount!();
    let Some((py, src)) = comfyui() else {
        return;
    };
    if !browser() {
        return;
    }
    let s = LoopDirs::new(96);
    let model = s.nas.dir.join("upscale_models/big.safetensors");
    // About 19 MB: a few seconds of copying from a NAS at 4 MB/s.
    let out = run(py, &["make-model", model.to_str().unwrap(), "128", "32"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.nas.remount();
    let env = s.tmp.path().join("arena.env");
    fs::write(
        &env,
        "# studio settings\nARENA_CACHE_DISCOVERY=workflow_only\n",
    )
    .unwrap();
    let m = s.mount(&["min_size_mb=0", &format!("env={}", env.display())]);
    s.nas.throttle(4_000_000);
    let base = s.tmp.path().join("comfy");
    let server = launch(py, src, &base, Some(&m.mnt), &m.socket);
    let img = run(
        py,
        &["make-image", base.join("input/p.png").to_str().unwrap()],
    );
    assert!(
        img.status.success(),
        "{}",
        String::from_utf8_lossy(&img.stderr)
    );
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
    fs::create_dir_all(&shots).unwrap();
    let up = run(py, &["wait-up", &server.url]);
    assert!(
        up.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&up.stderr),
        server.log()
    );
    let out = Command::new("node")
        .arg(PANEL)
        .arg(&server.url)
        .arg(&shots)
        .output()
        .unwrap();
    s.nas.throttle(0);
    assert_ok("panel.mjs", &out, &[server.log(), m.log()]);
    // The change went through the daemon into its env file.
    let text = fs::read_to_string(&env).unwrap();
    assert!(text.starts_with("# studio settings\n"), "{text}");
    assert!(
        text.contains("ARENA_CACHE_DISCOVERY=workflow_only"),
        "{text}"
    );
    assert_eq!(
        m.log()
            .matches("settings changed through the control API")
            .count(),
        2,
        "manual_only, then workflow_only again: {}",
        m.log()
    );

    // The NAS goes away while the page is open: the badge and a toast say so.
    let mut offline = Command::new("node")
        .arg(PANEL)
        .arg(&server.url)
        .arg(&shots)
        .arg("offline")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(offline.stdout.take().unwrap()).lines();
    let ready = lines.next().and_then(Result::ok);
    if ready.as_deref() == Some("READY") {
        let st = Command::new("umount")
            .arg("-l")
            .arg(&s.nas.dir)
            .status()
            .unwrap();
        assert!(st.success());
    }
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let out = offline.wait_with_output().unwrap();
    assert!(
        ready.as_deref() == Some("READY") && rest.last().map(String::as_str) == Some("OK"),
        "panel.mjs offline: {ready:?} {rest:?}\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log(),
        m.log()
    );
    for shot in [
        "arena-settings.png",
        "arena-dryrun.png",
        "arena-progress.png",
        "arena-offline.png",
        "arena-offline-no-websocket.png",
    ] {
        assert!(
            shots.join(shot).metadata().unwrap().len() > 10_000,
            "{shot}"
        );
    }
}

/// Two ComfyUI servers on one mount (two GPUs' worth) queue different workflows: each has a
/// required set of its own, both models are copied, neither gets `ALREADY_RUNNING`.
#[test]
fn two_instances_share_one_mount() {
    require_mount!();
    let Some((py, src)) = comfyui() else {
        return;
    };
    let d = Dirs::new();
    for name in ["a", "b"] {
        let model = d.nas.join(format!("upscale_models/{name}.safetensors"));
        let out = run(py, &["make-model", model.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A long cooldown: the two sets are bulk requests within it.
    let m = d.mount(&["min_size_mb=0", "cache_cooldown_ms=600000"]);
    let bases: Vec<PathBuf> = (0..2)
        .map(|i| d.tmp.path().join(format!("comfy{i}")))
        .collect();
    let servers: Vec<Server> = bases
        .iter()
        .map(|b| launch(py, src, b, Some(&m.mnt), &m.socket))
        .collect();
    let out = run(
        py,
        &[
            "check-two",
            &servers[0].url,
            &servers[1].url,
            m.socket.to_str().unwrap(),
            bases[0].to_str().unwrap(),
            bases[1].to_str().unwrap(),
        ],
    );
    assert_ok(
        "comfyui_e2e.py check-two",
        &out,
        &[servers[0].log(), servers[1].log(), m.log()],
    );
}

/// The package's helpers without ComfyUI (tests/python/package_units.py): the badge's progress
/// and update summary, the override node, the feeder's snapshot of a queued prompt, the idle
/// poller's change detection.
#[test]
fn the_package_helpers() {
    let Some((py, _)) = comfyui() else {
        return;
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/package_units.py");
    let out = Command::new(py).arg(script).output().unwrap();
    assert_ok("package_units.py", &out, &[]);
}
