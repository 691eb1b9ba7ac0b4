//! Deployment: the fstab path through `mount(8)` and `mount.fuse3`, the systemd units (checked by
//! `systemd-analyze verify`, and their command lines run for real, with the readiness
//! notification a `Type=notify` service sends), and reloading the env file on SIGHUP.
//!
//! `mount(8)` runs `mount.fuse3` with a fixed PATH, so the fstab test cannot point it at the
//! binary under test through PATH: it runs in a private mount namespace of its own thread, where
//! a directory holding `arenafs` is bind-mounted over `/usr/local/sbin`.
//!
//! PID 1 is not systemd on the machines these tests run on, so the unit is exercised the way
//! systemd would run it: its `ExecStart=`/`ExecReload=`/`ExecStop=` lines are read from
//! `systemd/arenafs@.service`, their specifiers expanded for a temporary mount point, the daemon
//! is given `NOTIFY_SOCKET` (a datagram socket of the test) and the unit's capability bounding set
//! (`setpriv`), and the test listens for `READY=1`, `RELOADING=1` and `STOPPING=1`.
//!
//! The scripts: `scripts/mount` installs only what running needs.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::{BIN, Dirs, is_arenafs_mount, random_bytes, require_mount, wait_for};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read_repo_file(rel: &str) -> String {
    fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The values of `key=` in a unit file (comments and other keys skipped). The units use no line
/// continuations, which keeps this honest.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|v| {
            assert!(!v.ends_with('\\'), "line continuation in {key}=");
            v.trim().to_string()
        })
        .collect()
}

fn unit_value(unit: &str, key: &str) -> String {
    let v = unit_values(unit, key);
    assert_eq!(v.len(), 1, "exactly one {key}= in the unit: {v:?}");
    v.into_iter().next().unwrap()
}

/// The specifiers the unit uses, with the values systemd would give them for one instance.
struct Specifiers {
    /// `%f`: the unescaped instance as a path (the mount point).
    path: String,
    /// `%i`: the instance (the escaped mount point).
    instance: String,
    /// `%E`: the configuration directory (`/etc` for system units).
    config: String,
    /// `%t`: the runtime directory (`/run` for system units).
    runtime: String,
}

impl Specifiers {
    fn expand(&self, s: &str) -> String {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('f') => out.push_str(&self.path),
                Some('i') => out.push_str(&self.instance),
                Some('E') => out.push_str(&self.config),
                Some('t') => out.push_str(&self.runtime),
                Some('%') => out.push('%'),
                other => panic!("specifier %{other:?} in {s:?} is not handled by this test"),
            }
        }
        out
    }
}

/// An `Exec*=` line as systemd runs it: prefix flags stripped (only `-`, "failure is ignored",
/// is used), specifiers expanded, `$MAINPID` replaced, `/usr/bin/arenafs` replaced by the binary
/// under test. Returns the argv and whether a failure would be ignored.
fn exec_argv(line: &str, spec: &Specifiers, mainpid: Option<u32>) -> (Vec<String>, bool) {
    let ignore_failure = line.starts_with('-');
    let line = line.trim_start_matches('-');
    assert!(
        !line.starts_with(['@', '+', '!', ':']) && !line.contains(['"', '\'', ';']),
        "the test splits simple command lines only: {line}"
    );
    let argv = line
        .split_whitespace()
        .map(|w| {
            let w = spec.expand(w);
            let w = match mainpid {
                Some(pid) => w.replace("$MAINPID", &pid.to_string()),
                None => w,
            };
            if w == "/usr/bin/arenafs" {
                BIN.to_string()
            } else {
                w
            }
        })
        .collect();
    (argv, ignore_failure)
}

fn run_argv(argv: &[String]) -> Output {
    Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

/// Receives the daemon's `sd_notify` datagrams, as systemd's notify socket would.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    /// Every message received so far, in order.
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(path: PathBuf) -> Self {
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Self {
            sock,
            path,
            seen: Vec::new(),
        }
    }

    /// Waits for a message with the line `line`; returns that message (all its lines).
    fn wait_for_line(&mut self, line: &str, timeout: Duration) -> String {
        let start = Instant::now();
        let mut buf = vec![0u8; 4096];
        loop {
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.seen.push(msg.clone());
                    if msg.lines().any(|l| l == line) {
                        return msg;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("notify socket: {e}"),
            }
            if start.elapsed() > timeout {
                panic!("no {line} within {timeout:?}; received {:?}", self.seen);
            }
        }
    }
}

/// A daemon the test started itself; on drop (also on panic) the mount is detached and the
/// process ended.
struct Daemon {
    child: Option<Child>,
    mnt: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn assert_running(&mut self) {
        if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("daemon exited ({st}):\n{}", self.log());
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                panic!("daemon did not exit within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        crate::util::stop_daemon(self.child.take(), &self.mnt);
    }
}

/// A temporary tree for one test, traversable by other users (ComfyUI's user is not root).
fn open_tempdir(prefix: &str) -> tempfile::TempDir {
    // No '-' in the prefix: the escaped mount point stays readable in failure messages.
    let tmp = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    tmp
}

/// `setpriv` arguments that give the daemon what the unit gives it: the capability bounding set
/// and no_new_privs. (`UMask=` is applied too; the device policy, address families and the
/// other seccomp-based settings need systemd and are checked by `systemd-analyze verify` only.)
fn unit_privileges(unit: &str) -> Vec<String> {
    let caps: Vec<String> = unit_value(unit, "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| {
            let name = c
                .strip_prefix("CAP_")
                .expect("CAP_ name")
                .to_ascii_lowercase();
            format!("+{name}")
        })
        .collect();
    let mut args = vec![
        "--bounding-set".to_string(),
        format!("-all,{}", caps.join(",")),
    ];
    if unit_value(unit, "NoNewPrivileges") == "yes" {
        args.push("--no-new-privs".into());
    }
    args
}

#[test]
fn unit_exec_lines_run_with_readiness_notification() {
    require_mount!();
    if !has_command("setpriv") {
        // util-linux: installed by scripts/install-deps.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "setpriv missing"
        );
        eprintln!("skipping: setpriv missing");
        return;
    }
    let unit = read_repo_file("systemd/arenafs@.service");
    assert_eq!(unit_value(&unit, "Type"), "notify");
    let tmp = open_tempdir("arenafsunit");
    let t = tmp.path();
    let (nas, mnt, cache) = (t.join("nas"), t.join("mnt"), t.join("cache"));
    for d in [&nas, &mnt, &cache, &t.join("etc/arenafs"), &t.join("run")] {
        fs::create_dir_all(d).unwrap();
    }
    fs::create_dir(nas.join("loras")).unwrap();
    fs::set_permissions(nas.join("loras"), fs::Permissions::from_mode(0o755)).unwrap();
    let data = random_bytes(3 << 20, 7);
    fs::write(nas.join("loras/a.safetensors"), &data).unwrap();
    fs::set_permissions(
        nas.join("loras/a.safetensors"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();

    let instance = arenafs::mount::systemd_escape_path(&mnt);
    let spec = Specifiers {
        path: mnt.display().to_string(),
        instance: instance.clone(),
        config: t.join("etc").display().to_string(),
        runtime: t.join("run").display().to_string(),
    };
    // The instance's env file, where the unit says it is.
    let env_file = PathBuf::from(spec.expand(&unit_value(&unit, "AssertPathExists")));
    assert_eq!(env_file, t.join(format!("etc/arenafs/{instance}.env")));
    fs::write(
        &env_file,
        format!(
            "ARENA_NAS_ROOT={}\nARENA_CACHE_ROOT={}\nARENA_CACHE_MIN_SIZE_MB=0\nARENA_CACHE_STABLE_SECS=0\n",
            nas.display(),
            cache.display()
        ),
    )
    .unwrap();
    let socket = t.join(format!("run/arenafs/{instance}.sock"));

    let mut notify = NotifySocket::bind(t.join("notify.sock"));
    let (start_argv, _) = exec_argv(&unit_value(&unit, "ExecStart"), &spec, None);
    let log = t.join("daemon.log");
    let umask = u32::from_str_radix(&unit_value(&unit, "UMask"), 8).unwrap();
    // stderr is "the journal": systemd names its stream in JOURNAL_STREAM (device:inode).
    let log_file = fs::File::create(&log).unwrap();
    let journal_stream = {
        use std::os::unix::fs::MetadataExt;
        let md = log_file.metadata().unwrap();
        format!("{}:{}", md.dev(), md.ino())
    };
    let mut cmd = Command::new("setpriv");
    cmd.args(unit_privileges(&unit))
        .arg("--")
        .args(&start_argv)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("JOURNAL_STREAM", journal_stream)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    // SAFETY: umask(2) is async-signal-safe and touches only the child.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            libc::umask(umask as libc::mode_t);
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    let mut daemon = Daemon {
        child: Some(child),
        mnt: mnt.clone(),
        log,
    };

    // Ready means usable: the mount answers and so does the control socket.
    let ready = notify.wait_for_line("READY=1", Duration::from_secs(30));
    assert!(is_arenafs_mount(&mnt), "READY=1 before the mount");
    let status: serde_json::Value = serde_json::from_str(
        &arenafs::control::client::get(&socket, "/arena/status")
            .unwrap_or_else(|e| panic!("control socket at READY=1: {e}\n{}", daemon.log())),
    )
    .unwrap();
    assert!(
        ready.lines().any(|l| l.starts_with("STATUS=serving ")),
        "{ready:?}"
    );
    assert_eq!(status["passthrough_available"], true, "{}", daemon.log());
    // With the unit's capabilities only: the first read makes a complete copy (one chunk),
    // the next open is served by kernel passthrough (CAP_SYS_ADMIN), ComfyUI's (non-root) user
    // reads through allow_other, and root writes through to the NAS.
    assert_eq!(fs::read(mnt.join("loras/a.safetensors")).unwrap(), data);
    let get = |path: &str| -> serde_json::Value {
        serde_json::from_str(&arenafs::control::client::get(&socket, path).unwrap()).unwrap()
    };
    wait_for("a complete copy", Duration::from_secs(30), || {
        get("/arena/status")["cache_complete_entries"] == 1
    });
    assert_eq!(fs::read(mnt.join("loras/a.safetensors")).unwrap(), data);
    let stats = get("/arena/stats");
    assert_eq!(
        stats["opens_passthrough"],
        1,
        "passthrough under the unit's capability set: {stats}\n{}",
        daemon.log()
    );
    let as_nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(mnt.join("loras/a.safetensors"))
        .output()
        .unwrap();
    check(&as_nobody, "reading as uid 65534");
    assert!(as_nobody.stdout == data, "bytes read as uid 65534");
    fs::write(mnt.join("loras/written.txt"), "through").unwrap();
    assert_eq!(
        fs::read_to_string(nas.join("loras/written.txt")).unwrap(),
        "through"
    );

    // systemctl reload: ExecReload sends SIGHUP; the daemon says RELOADING=1 (with the
    // monotonic time Type=notify-reload wants) and READY=1 again, and stays mounted.
    let (reload_argv, _) = exec_argv(&unit_value(&unit, "ExecReload"), &spec, Some(daemon.pid()));
    check(&run_argv(&reload_argv), "ExecReload");
    let reloading = notify.wait_for_line("RELOADING=1", Duration::from_secs(10));
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading:?}"
    );
    notify.wait_for_line("READY=1", Duration::from_secs(10));
    daemon.assert_running();
    assert!(is_arenafs_mount(&mnt));

    // systemctl stop: ExecStop unmounts; the daemon says STOPPING=1 and exits 0.
    let (stop_argv, _) = exec_argv(&unit_value(&unit, "ExecStop"), &spec, Some(daemon.pid()));
    check(&run_argv(&stop_argv), "ExecStop");
    // Then systemd sends SIGTERM to what is left of the service: harmless while it finishes.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid() as i32),
        nix::sys::signal::SIGTERM,
    );
    notify.wait_for_line("STOPPING=1", Duration::from_secs(10));
    let st = daemon.wait_exit(Duration::from_secs(30));
    assert!(
        st.success(),
        "daemon exit after ExecStop: {st}\n{}",
        daemon.log()
    );
    assert!(!is_arenafs_mount(&mnt));
    assert!(!socket.exists(), "control socket removed");
    // What systemd does after ExecStop (SIGTERM to what is left) must not be an error, and
    // ExecStop of a mount that is already gone is ignored ("-").
    let (_, ignored) = exec_argv(&unit_value(&unit, "ExecStop"), &spec, None);
    assert!(ignored, "ExecStop failure ignored for a mount already gone");
    // Journal lines carry their priority (`<6>` info, `<4>` warning, `<3>` error) and no error
    // was logged.
    let log = daemon.log();
    assert!(
        log.lines()
            .all(|l| l.starts_with(['<']) && l.as_bytes().get(2) == Some(&b'>')),
        "{log}"
    );
    assert!(log.lines().any(|l| l.starts_with("<6>")), "{log}");
    assert!(!log.lines().any(|l| l.starts_with("<3>")), "{log}");
}

#[test]
fn sighup_reloads_the_env_file_and_keeps_the_mount() {
    require_mount!();
    let d = Dirs::new();
    let data = d.nas_file("loras/a.safetensors", 1 << 20, 3);
    let env = d.tmp.path().join("arenafs.env");
    fs::write(&env, "ARENA_CACHE_MAX_CONCURRENCY=2\n").unwrap();
    let opt = format!("env={}", env.display());
    let mut m = d.mount(&[&opt]);
    assert_eq!(m.status()["max_concurrency"], 2);

    // Change the file without changing what the 2 s poller looks at (mtime, size, inode), so
    // that only SIGHUP can make the daemon read it.
    let mtime = fs::metadata(&env).unwrap().modified().unwrap();
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&env)
            .unwrap();
        f.write_all(b"ARENA_CACHE_MAX_CONCURRENCY=5\n").unwrap();
        f.set_modified(mtime).unwrap();
    }
    std::thread::sleep(arenafs::reload::CHECK_INTERVAL + Duration::from_millis(700));
    assert_eq!(
        m.status()["max_concurrency"],
        2,
        "the poller did not see the change (the test's premise)"
    );

    let pid = nix::unistd::Pid::from_raw(m.child.as_ref().unwrap().id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::SIGHUP).unwrap();
    wait_for(
        "max_concurrency 5 after SIGHUP",
        Duration::from_secs(10),
        || m.status()["max_concurrency"] == 5,
    );
    assert!(is_arenafs_mount(&d.mnt), "SIGHUP does not unmount");
    assert!(m.child.as_mut().unwrap().try_wait().unwrap().is_none());
    assert_eq!(fs::read(m.path("loras/a.safetensors")).unwrap(), data);
    assert!(
        m.log().contains("ARENA_CACHE_MAX_CONCURRENCY: 2 -> 5"),
        "{}",
        m.log()
    );

    // An env file that cannot be read: the settings in force stay, and so does the mount.
    fs::remove_file(&env).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::SIGHUP).unwrap();
    wait_for(
        "the failed reload in the log",
        Duration::from_secs(10),
        || m.log().contains("reload on SIGHUP failed"),
    );
    assert_eq!(m.status()["max_concurrency"], 5);
    assert!(is_arenafs_mount(&d.mnt));
    assert!(m.unmount().success());
}

fn has_command(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The mount at `target` as this thread sees it (the fstab test runs in a mount namespace of
/// its own thread; `/proc/self` would show the main thread's).
fn thread_mount_at(target: &Path) -> Option<arenafs::mount::MountEntry> {
    let text = fs::read_to_string("/proc/thread-self/mountinfo").ok()?;
    arenafs::mount::parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|m| m.target == target)
}

/// A mount made by `mount(8)`, whose daemon is a child of `mount.fuse3`, not of the test.
struct FstabMount {
    mnt: PathBuf,
    socket: PathBuf,
}

impl FstabMount {
    fn umount(&self) {
        check(
            &Command::new("umount").arg(&self.mnt).output().unwrap(),
            "umount",
        );
        // The daemon exits: its socket goes.
        wait_for("daemon exit after umount", Duration::from_secs(15), || {
            !self.socket.exists()
        });
        assert!(thread_mount_at(&self.mnt).is_none());
    }
}

impl Drop for FstabMount {
    fn drop(&mut self) {
        if thread_mount_at(&self.mnt).is_some() {
            let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Where `mount(8)` looks for the program of a `fuse.TYPE` mount: it runs `mount.fuse3` with
/// PATH reset to this (whatever the caller's PATH), and `mount.fuse3` runs `TYPE` from it.
const MOUNT_HELPER_PATH_DIR: &str = "/usr/local/sbin";

/// Moves the calling thread into a mount namespace of its own, private (nothing made in it
/// reaches the rest of the machine), with `bin` mounted over [`MOUNT_HELPER_PATH_DIR`]: there
/// `mount(8)` finds the `arenafs` under test, and no installed one, without changing the
/// machine. Threads and processes started from this thread inherit the namespace.
fn private_namespace_with_helper(bin: &Path) {
    // SAFETY: unshare(CLONE_NEWNS) affects the calling thread only (with CLONE_FS, which it
    // implies, the thread gets its own root/cwd/umask copy); no memory is involved.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNS): {}",
        std::io::Error::last_os_error()
    );
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .unwrap();
    nix::mount::mount(
        Some(bin),
        MOUNT_HELPER_PATH_DIR,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
}

#[test]
fn fstab_line_mounts_through_mount_fuse3() {
    require_mount!();
    assert!(
        has_command("mount.fuse3") || Path::new("/sbin/mount.fuse3").exists(),
        "mount.fuse3 missing (package fuse3; scripts/install-deps installs it)"
    );
    assert!(
        Path::new(MOUNT_HELPER_PATH_DIR).is_dir(),
        "{MOUNT_HELPER_PATH_DIR} missing"
    );
    let tmp = open_tempdir("arenafsfstab");
    let t = tmp.path().to_path_buf();
    let d = Dirs {
        nas: t.join("nas"),
        mnt: t.join("mnt"),
        cache: t.join("cache"),
        socket: t.join("ctl.sock"),
        tmp,
    };
    for p in [&d.nas, &d.mnt, &d.cache] {
        fs::create_dir_all(p).unwrap();
    }
    let data = d.nas_file("checkpoints/m.safetensors", 2 << 20, 5);
    let env = t.join("models.env");
    fs::write(&env, "ARENA_CACHE_MIN_SIZE_MB=0\n").unwrap();
    let bin = t.join("bin");
    fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(BIN, bin.join("arenafs")).unwrap();

    // The options of the example mount unit (the same as the fstab line in the docs), with this
    // test's directories, plus its own socket and log and the systemd ordering option.
    let example = read_repo_file("systemd/opt-ComfyUI-models.mount");
    assert_eq!(unit_value(&example, "Type"), "fuse.arenafs");
    let opts = unit_value(&example, "Options")
        .replace("/ssd/arenafs", d.cache.to_str().unwrap())
        .replace("/etc/arenafs/models.env", env.to_str().unwrap());
    for o in ["allow_other", "_netdev", "nofail"] {
        assert!(opts.split(',').any(|x| x == o), "{o} in {opts}");
    }
    let opts = format!(
        "{opts},socket={},log_file={},x-systemd.requires-mounts-for={}",
        d.socket.display(),
        t.join("daemon.log").display(),
        d.nas.display()
    );
    let fstab = t.join("fstab");
    fs::write(
        &fstab,
        format!(
            "# test fstab\n{} {} fuse.arenafs {opts} 0 0\n",
            d.nas.display(),
            d.mnt.display()
        ),
    )
    .unwrap();
    let log = || fs::read_to_string(t.join("daemon.log")).unwrap_or_default();

    std::thread::scope(|s| {
        s.spawn(|| {
            private_namespace_with_helper(&bin);
            let fm = FstabMount {
                mnt: d.mnt.clone(),
                socket: d.socket.clone(),
            };
            // 1. mount -t fuse.arenafs -o ... NAS MNT
            let out = Command::new("mount")
                .args(["-t", "fuse.arenafs", "-o", &opts])
                .arg(&d.nas)
                .arg(&d.mnt)
                .output()
                .unwrap();
            check(&out, "mount -t fuse.arenafs");
            // mount returned: the mount is ready.
            let entry = thread_mount_at(&d.mnt).expect("mounted");
            assert_eq!(entry.fstype, "fuse.arenafs");
            assert_eq!(entry.source, d.nas.to_str().unwrap());
            assert_eq!(
                fs::read(d.mnt.join("checkpoints/m.safetensors")).unwrap(),
                data,
                "{}",
                log()
            );
            fm.umount();

            // 2. The fstab line, by `mount -a` and by its mount point.
            let out = Command::new("mount")
                .args(["-a", "--fstab"])
                .arg(&fstab)
                .output()
                .unwrap();
            check(&out, "mount -a");
            assert_eq!(
                fs::read(d.mnt.join("checkpoints/m.safetensors")).unwrap(),
                data
            );
            fm.umount();
            let out = Command::new("mount")
                .arg("--fstab")
                .arg(&fstab)
                .arg(&d.mnt)
                .output()
                .unwrap();
            check(&out, "mount MOUNTPOINT (from fstab)");
            assert!(thread_mount_at(&d.mnt).is_some_and(|m| m.fstype == "fuse.arenafs"));
            fm.umount();
        });
    });
    assert!(
        !is_arenafs_mount(&d.mnt),
        "nothing leaks out of the namespace"
    );
    // Three daemons ran, started by mount.fuse3, and logged no error.
    assert_eq!(log().matches(" mounted ").count(), 3, "{}", log());
    assert!(!log().contains("ERROR"), "{}", log());
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if !has_command("systemd-analyze") {
        // Package systemd; scripts/install-deps installs it, so CI runs this test.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "systemd-analyze missing under CI=true (scripts/install-deps installs systemd)"
        );
        eprintln!("skipping: systemd-analyze missing (apt-get install systemd)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // verify checks that ExecStart's program exists: point it at the binary under test. That
    // is the only change made to the files.
    let copy = |name: &str, as_name: &str| {
        let text = read_repo_file(&format!("systemd/{name}")).replace("/usr/bin/arenafs", BIN);
        fs::write(dir.join(as_name), text).unwrap();
    };
    copy("arenafs@.service", "arenafs@.service");
    copy("arenafs@.service", "arenafs@opt-ComfyUI-models.service");
    copy("opt-ComfyUI-models.mount", "opt-ComfyUI-models.mount");
    let dropin = dir.join("arenafs@opt-ComfyUI-models.service.d");
    fs::create_dir(&dropin).unwrap();
    fs::copy(
        repo_file("systemd/requires-nas.conf"),
        dropin.join("requires-nas.conf"),
    )
    .unwrap();
    for unit in [
        "arenafs@.service",
        "arenafs@opt-ComfyUI-models.service",
        "opt-ComfyUI-models.mount",
    ] {
        // --man=no: the man page is installed by the package, not here (tests/it/package.rs
        // checks it is in the .deb).
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(dir.join(unit))
            .output()
            .unwrap();
        check(&out, &format!("systemd-analyze verify {unit}"));
        // verify exits 0 on unknown keys and bad values; it only warns. (Warnings about the
        // machine's own units, which verify loads as dependencies, are not ours.)
        let stderr = String::from_utf8_lossy(&out.stderr);
        let ours: Vec<&str> = stderr
            .lines()
            .filter(|l| {
                l.contains(dir.to_str().unwrap())
                    || l.contains("arenafs")
                    || l.contains("opt-ComfyUI-models")
            })
            .collect();
        assert!(
            ours.is_empty(),
            "systemd-analyze verify {unit} warns:\n{stderr}"
        );
    }
    // The drop-in is read (and names the NAS as RequiresMountsFor=).
    assert_eq!(
        unit_value(
            &read_repo_file("systemd/requires-nas.conf"),
            "RequiresMountsFor"
        ),
        "/mnt/nas/models"
    );
}

/// The scripts of `scripts/` that `script` runs: a script is run by its path
/// (`scripts/NAME`, `"$(dirname "$0")/NAME"`); comment lines do not count.
fn scripts_run_by(script: &str, all: &[String]) -> Vec<String> {
    let code: String = read_repo_file(&format!("scripts/{script}"))
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    all.iter()
        .filter(|name| {
            let needle = format!("/{name}");
            code.match_indices(&needle).any(|(at, _)| {
                !code[at + needle.len()..]
                    .chars()
                    .next()
                    .is_some_and(is_name_char)
            })
        })
        .cloned()
        .collect()
}

/// The README's first command, `scripts/mount`, installs what running needs (fuse3, through
/// scripts/install-run-deps) and none of the test or packaging tools, which take minutes to
/// build: neither it nor a script it runs reaches scripts/install-deps, pjdfstest, cargo-deb,
/// pip or the venv. Every shell script also passes `bash -n`.
#[test]
fn the_mount_script_installs_only_what_running_needs() {
    let mut all: Vec<String> = fs::read_dir(repo_file("scripts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    all.sort();
    for name in &all {
        if read_repo_file(&format!("scripts/{name}")).starts_with("#!/usr/bin/env bash") {
            let out = Command::new("bash")
                .arg("-n")
                .arg(repo_file(&format!("scripts/{name}")))
                .output()
                .unwrap();
            check(&out, &format!("bash -n scripts/{name}"));
        }
    }
    let mut reached = vec!["mount".to_string()];
    let mut next = 0;
    while next < reached.len() {
        for called in scripts_run_by(&reached[next], &all) {
            if !reached.contains(&called) {
                reached.push(called);
            }
        }
        next += 1;
    }
    assert!(
        reached.contains(&"install-run-deps".to_string()),
        "scripts/mount installs fuse3: {reached:?}"
    );
    for test_only in ["install-deps", "install-cargo-deb"] {
        assert!(
            !reached.contains(&test_only.to_string()),
            "scripts/mount reaches scripts/{test_only}: {reached:?}"
        );
    }
    for script in &reached {
        let text = read_repo_file(&format!("scripts/{script}"));
        for tool in [
            "pjdfstest",
            "cargo install",
            "cargo deb",
            "pip install",
            "bin/pip",
            "venv",
        ] {
            assert!(
                !text.contains(tool),
                "scripts/{script}, run by scripts/mount, mentions {tool}"
            );
        }
    }
}
