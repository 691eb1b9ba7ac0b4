//! The ComfyUI package (`comfyui/`) inside a real ComfyUI server (0.3.64, from
//! `../shared/vendor/`, with its PyPI dependencies in a venv that `scripts/install-deps` makes):
//! `models/` is an arenafs mount; a queued prompt's upscale model becomes this instance's required
//! set and is copied, the image is made, a second run reads the SSD copy, and the Stats and Trim
//! nodes answer from the daemon (tests/python/comfyui_e2e.py drives ComfyUI's HTTP API).

use std::fs;
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

/// Starts ComfyUI on the CPU, on 127.0.0.1, with `base` as its base directory.
fn start(py: &Path, src: &Path, base: &Path, port: u16, socket: &Path) -> Server {
    let log = base.join("comfyui.log");
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
    Server { child, log }
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
    let m = d.mount(&["min_size_mb=0"]);

    let base = d.tmp.path().join("comfy");
    for sub in ["custom_nodes", "input", "output"] {
        fs::create_dir_all(base.join(sub)).unwrap();
    }
    symlink(&m.mnt, base.join("models")).unwrap();
    symlink(PACKAGE, base.join("custom_nodes/arenafs")).unwrap();
    let port = free_port();
    let server = start(py, src, &base, port, &m.socket);

    let url = format!("http://127.0.0.1:{port}");
    let out = run(
        py,
        &[
            "check",
            &url,
            m.socket.to_str().unwrap(),
            base.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "comfyui_e2e.py check: {}\nstdout:\n{stdout}\nstderr:\n{}\nComfyUI log:\n{}\ndaemon log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        server.log(),
        m.log()
    );
    let log = server.log();
    assert!(
        log.contains(&format!(
            "arenafs: using the daemon at {} (from ARENAFS_SOCKET)",
            m.socket.display()
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
    for sub in ["custom_nodes", "input", "output", "models/upscale_models"] {
        fs::create_dir_all(base.join(sub)).unwrap();
    }
    let model = base.join("models/upscale_models/tiny.safetensors");
    let out = run(py, &["make-model", model.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    symlink(PACKAGE, base.join("custom_nodes/arenafs")).unwrap();
    let port = free_port();
    let server = start(py, src, &base, port, &tmp.path().join("no-daemon.sock"));
    let url = format!("http://127.0.0.1:{port}");
    let out = run(py, &["check-no-daemon", &url, base.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "comfyui_e2e.py check-no-daemon: {}\nstdout:\n{stdout}\nstderr:\n{}\nComfyUI log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
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
    for sub in ["custom_nodes", "input", "output"] {
        fs::create_dir_all(base.join(sub)).unwrap();
    }
    symlink(&m.mnt, base.join("models")).unwrap();
    symlink(PACKAGE, base.join("custom_nodes/arenafs")).unwrap();
    let port = free_port();
    let server = start(py, src, &base, port, &m.socket);
    let url = format!("http://127.0.0.1:{port}");
    let out = run(py, &["check-progress", &url, base.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    s.nas.throttle(0);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "comfyui_e2e.py check-progress: {}\nstdout:\n{stdout}\nstderr:\n{}\nComfyUI log:\n{}\ndaemon log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        server.log(),
        m.log()
    );
}
