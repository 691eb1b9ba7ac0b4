//! Shared fixtures for the mount-level tests: temporary NAS and cache dirs, a daemon mounted for
//! real through the `arenafs` binary (unmounted on drop, also on panic), a loop-device NAS whose
//! reads are counted by the kernel and can be throttled, and small helpers.

#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arenafs::stats::StatsSnapshot;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

pub const CHUNK: u64 = arenafs::daemon::CHUNK_SIZE;
pub const BIN: &str = env!("CARGO_BIN_EXE_arenafs");

/// The daemon the mount tests run: this build's, or the one `ARENAFS_TEST_BIN` names (to run
/// the tests against another build, e.g. to see a new test fail before its fix).
pub fn daemon_bin() -> String {
    std::env::var("ARENAFS_TEST_BIN").unwrap_or_else(|_| BIN.to_string())
}

/// Whether mount tests can run here. Under `CI=true` a machine that cannot mount is a failure.
pub fn can_mount() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let fuse = Path::new("/dev/fuse").exists();
    if root && fuse {
        return true;
    }
    let why = format!("mount tests need root and /dev/fuse (root={root}, /dev/fuse={fuse})");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}");
    }
    eprintln!("skipping: {why}");
    false
}

macro_rules! require_mount {
    () => {
        if !crate::util::can_mount() {
            return;
        }
    };
}
pub(crate) use require_mount;

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

pub fn sha256_file(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("{:x}", h.finalize())
}

pub fn pread(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f.read_at(&mut buf[done..], offset + done as u64).unwrap();
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    buf
}

/// Runs `sh -c script` as `uid:gid` with supplementary `groups` (util-linux `setpriv`).
pub fn sh_as(uid: u32, gid: u32, groups: &str, script: &str) -> std::process::Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            &format!("--groups={groups}"),
            "sh",
            "-c",
            script,
        ])
        .output()
        .unwrap()
}

/// Waits until `cond` holds, panicking with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn is_arenafs_mount(mnt: &Path) -> bool {
    arenafs::mount::mount_at(mnt).is_some_and(|m| m.fstype == arenafs::mount::FSTYPE)
}

/// Temporary directories for one test: `nas/`, `mnt/`, `cache/`.
pub struct Dirs {
    pub tmp: tempfile::TempDir,
    pub nas: PathBuf,
    pub mnt: PathBuf,
    pub cache: PathBuf,
    pub socket: PathBuf,
}

impl Dirs {
    pub fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("arenafs-it")
            .tempdir()
            .unwrap();
        let nas = tmp.path().join("nas");
        let mnt = tmp.path().join("mnt");
        let cache = tmp.path().join("cache");
        for d in [&nas, &mnt, &cache] {
            fs::create_dir_all(d).unwrap();
        }
        let socket = tmp.path().join("ctl.sock");
        Self {
            tmp,
            nas,
            mnt,
            cache,
            socket,
        }
    }

    /// Writes a NAS file (creating parent dirs) and returns its content.
    pub fn nas_file(&self, rel: &str, len: usize, seed: u64) -> Vec<u8> {
        let data = random_bytes(len, seed);
        let p = self.nas.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, &data).unwrap();
        data
    }

    pub fn mount(&self, opts: &[&str]) -> Mounted {
        Mounted::start(&self.nas, &self.mnt, &self.cache, &self.socket, opts)
    }
}

/// A daemon serving a mount, started with `--foreground`.
pub struct Mounted {
    pub child: Option<Child>,
    pub mnt: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Mounted {
    pub fn start(nas: &Path, mnt: &Path, cache: &Path, socket: &Path, opts: &[&str]) -> Self {
        let log = socket.with_extension(format!(
            "log{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut cmd = Command::new(daemon_bin());
        cmd.arg("mount")
            .arg(nas)
            .arg(mnt)
            .arg("--cache-dir")
            .arg(cache)
            .arg("--socket")
            .arg(socket)
            .arg("--foreground")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        // The tests write NAS files and read them at once: copies start without waiting for
        // the files' mtimes to age (the window has a test of its own, which sets it). Older
        // builds run through ARENAFS_TEST_BIN may not know the option, nor need it.
        if !opts.iter().any(|o| o.starts_with("stable_secs="))
            && std::env::var_os("ARENAFS_TEST_BIN").is_none()
        {
            cmd.arg("-o").arg("stable_secs=0");
        }
        // The tests change the NAS behind the mount's back and wait for the kernel to see it:
        // a 1 s attribute timeout unless a test sets its own (the default has a test of its own).
        if !opts.iter().any(|o| o.starts_with("attr_timeout=")) {
            cmd.arg("-o").arg("attr_timeout=1");
        }
        for o in opts {
            cmd.arg("-o").arg(o);
        }
        let mut child = cmd.spawn().expect("spawn arenafs");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "arenafs exited early ({status}):\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if is_arenafs_mount(mnt)
                && arenafs::control::client::get(socket, "/arena/stats").is_ok()
            {
                break;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!(
                    "mount did not become ready:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            child: Some(child),
            mnt: mnt.to_path_buf(),
            socket: socket.to_path_buf(),
            log,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn stats(&self) -> StatsSnapshot {
        let body = arenafs::control::client::get(&self.socket, "/arena/stats").unwrap();
        serde_json::from_str(&body).unwrap()
    }

    pub fn status(&self) -> serde_json::Value {
        let body = arenafs::control::client::get(&self.socket, "/arena/status").unwrap();
        serde_json::from_str(&body).unwrap()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `n` copies are complete in the index (filled by readers or the worker).
    pub fn wait_copies(&self, n: u64) {
        wait_for("complete cache copies", Duration::from_secs(60), || {
            self.status()["cache_complete_entries"].as_u64().unwrap() >= n
        });
    }

    /// `kill -9` the daemon, leaving the mount stale.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Unmounts with `umount` and waits for the daemon to exit; returns its exit status.
    pub fn unmount(&mut self) -> std::process::ExitStatus {
        let st = Command::new("umount").arg(&self.mnt).status().unwrap();
        assert!(st.success(), "umount failed");
        self.wait_exit()
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                panic!("daemon did not exit:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        stop_daemon(self.child.take(), &self.mnt);
    }
}

/// Ends a test's daemon however the test left it: detaches its mount, gives it 10 s to exit,
/// then kills it; a stale mount (after `kill -9`) must not outlive the test either.
pub fn stop_daemon(child: Option<Child>, mnt: &Path) {
    if let Some(mut c) = child {
        let _ = nix::mount::umount2(mnt, nix::mount::MntFlags::MNT_DETACH);
        let start = Instant::now();
        while c.try_wait().ok().flatten().is_none() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    if arenafs::mount::mount_at(mnt).is_some() {
        let _ = nix::mount::umount2(mnt, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A NAS on an ext4 image on a loop device (direct I/O, so the image is not cached twice): its
/// reads are counted by the block layer and can be throttled with blkio (BENCHMARKING.md).
pub struct LoopNas {
    pub dir: PathBuf,
    pub dev: String,
    image: PathBuf,
    majmin: String,
}

impl LoopNas {
    /// Creates a `size_mb` ext4 image, attaches and mounts it at `dir` (which must exist).
    pub fn new(image: &Path, dir: &Path, size_mb: u64) -> Self {
        Self::formatted(image, dir, size_mb, &["mkfs.ext4", "-q", "-F"])
    }

    /// [`LoopNas::new`] with another file system: `mkfs` is its command line, the image appended.
    pub fn formatted(image: &Path, dir: &Path, size_mb: u64, mkfs: &[&str]) -> Self {
        run(Command::new("truncate")
            .arg("-s")
            .arg(format!("{size_mb}M"))
            .arg(image));
        run(Command::new(mkfs[0]).args(&mkfs[1..]).arg(image));
        let dev = run(Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(image));
        let name = dev.trim_start_matches("/dev/");
        let majmin = fs::read_to_string(format!("/sys/block/{name}/dev"))
            .unwrap()
            .trim()
            .to_string();
        let nas = Self {
            dir: dir.to_path_buf(),
            dev,
            image: image.to_path_buf(),
            majmin,
        };
        nas.mount_fs();
        nas
    }

    fn mount_fs(&self) {
        run(Command::new("mount").arg(&self.dev).arg(&self.dir));
    }

    /// Unmounts and remounts the file system: its page cache is then cold, so reads hit the
    /// device (and its counters) again.
    pub fn remount(&self) {
        run(Command::new("umount").arg(&self.dir));
        self.mount_fs();
    }

    /// Bytes read from the device so far (sectors × 512).
    pub fn bytes_read(&self) -> u64 {
        let name = self.dev.trim_start_matches("/dev/");
        let stat = fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
        let sectors: u64 = stat.split_whitespace().nth(2).unwrap().parse().unwrap();
        sectors * 512
    }

    /// Limits reads from the device to `bps` bytes per second (0 lifts the limit).
    pub fn throttle(&self, bps: u64) {
        fs::write(
            "/sys/fs/cgroup/blkio/blkio.throttle.read_bps_device",
            format!("{} {bps}", self.majmin),
        )
        .expect("blkio throttling (cgroup v1) is needed for this test");
    }
}

impl Drop for LoopNas {
    fn drop(&mut self) {
        let _ = fs::write(
            "/sys/fs/cgroup/blkio/blkio.throttle.read_bps_device",
            format!("{} 0", self.majmin),
        );
        // A test may have taken the NAS away already.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .stderr(std::process::Stdio::null())
            .status();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        let _ = fs::remove_file(&self.image);
    }
}

/// A loop-device NAS with mount point and cache dirs beside it, for one test.
pub struct LoopDirs {
    pub nas: LoopNas,
    pub tmp: tempfile::TempDir,
}

impl LoopDirs {
    /// An empty `size_mb` NAS.
    pub fn new(size_mb: u64) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("arenafs-loop")
            .tempdir()
            .unwrap();
        let dir = tmp.path().join("nas");
        fs::create_dir(&dir).unwrap();
        let nas = LoopNas::new(&tmp.path().join("nas.img"), &dir, size_mb);
        for d in ["mnt", "cache"] {
            fs::create_dir(tmp.path().join(d)).unwrap();
        }
        Self { nas, tmp }
    }

    /// Mounts arenafs over the NAS.
    pub fn mount(&self, opts: &[&str]) -> Mounted {
        let t = self.tmp.path();
        Mounted::start(
            &self.nas.dir,
            &t.join("mnt"),
            &t.join("cache"),
            &t.join("ctl.sock"),
            opts,
        )
    }
}

/// A cache dir on a small ext4 file system of its own (an image on a loop device), so that a
/// test can fill it up or break it under a running daemon. Unmounted and detached on drop.
pub struct LoopCache {
    fs: LoopNas,
}

impl LoopCache {
    /// Creates a `size_mb` file system at `dir` (which must exist).
    pub fn new(image: &Path, dir: &Path, size_mb: u64) -> Self {
        Self {
            fs: LoopNas::new(image, dir, size_mb),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.fs.dir
    }

    /// Free bytes, counting the blocks reserved for root (the daemon runs as root).
    pub fn free_bytes(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(&self.fs.dir).unwrap();
        s.blocks_free() * s.fragment_size()
    }

    /// Makes the file system fail like a dead disk: from now on every access to it (reads
    /// included) fails with `EIO`. ext4's `FS_IOC_SHUTDOWN` without flushing the journal. (A
    /// `mount -o remount,ro` is refused while the daemon holds files open for writing.)
    pub fn shut_down(&self) {
        // _IOR('X', 125, __u32) and EXT4_GOING_FLAGS_NOLOGFLUSH.
        const FS_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587d;
        let flags: u32 = 2;
        let dir = fs::File::open(&self.fs.dir).unwrap();
        // SAFETY: the ioctl reads one u32 from the pointer, which points to a live local.
        let rc = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&dir),
                FS_IOC_SHUTDOWN,
                &flags as *const u32,
            )
        };
        assert_eq!(
            rc,
            0,
            "FS_IOC_SHUTDOWN: {}",
            std::io::Error::last_os_error()
        );
    }
}
