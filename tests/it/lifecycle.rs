//! Mounting, unmounting, restarting, and the errors a user sees when something is wrong.

use std::fs;
use std::process::Command;
use std::time::Duration;

use crate::util::{BIN, CHUNK, Dirs, is_arenafs_mount, require_mount, wait_for};

fn arenafs(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

#[test]
fn sigterm_unmounts_cleanly_and_a_remount_is_warm() {
    require_mount!();
    let d = Dirs::new();
    let data = d.nas_file("checkpoints/m.safetensors", 3 * CHUNK as usize, 1);
    let mut m = d.mount(&["min_size_mb=0"]);
    assert_eq!(fs::read(m.path("checkpoints/m.safetensors")).unwrap(), data);
    m.wait_copies(1);
    let pid = m.child.as_ref().unwrap().id() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGTERM).unwrap();
    let status = m.wait_exit();
    assert!(status.success(), "daemon exit after SIGTERM: {status}");
    assert!(!is_arenafs_mount(&d.mnt));
    assert!(!d.socket.exists(), "control socket removed at unmount");

    let m = d.mount(&["min_size_mb=0"]);
    assert_eq!(fs::read(m.path("checkpoints/m.safetensors")).unwrap(), data);
    let s = m.stats();
    assert_eq!(
        s.opens_passthrough, 1,
        "first open after restart is warm: {s:?}"
    );
    assert_eq!(s.bytes_fetched, 0);
}

#[test]
fn umount_ends_the_daemon() {
    require_mount!();
    let d = Dirs::new();
    let mut m = d.mount(&[]);
    assert!(m.unmount().success());
}

#[test]
fn background_mode_returns_when_ready() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("loras/a.safetensors", 100, 1);
    let out = arenafs(&[
        "mount".as_ref(),
        d.nas.as_os_str(),
        d.mnt.as_os_str(),
        "--cache-dir".as_ref(),
        d.cache.as_os_str(),
        "--socket".as_ref(),
        d.socket.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Ready means usable right away, without waiting.
    assert!(is_arenafs_mount(&d.mnt));
    assert_eq!(
        fs::read(d.mnt.join("loras/a.safetensors")).unwrap().len(),
        100
    );
    let out = arenafs(&["unmount".as_ref(), d.mnt.as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "daemon to remove its socket",
        Duration::from_secs(10),
        || !d.socket.exists(),
    );
}

#[test]
fn mount_type_form_of_mount_fuse3() {
    // `mount.fuse3` runs `arenafs NAS MOUNTPOINT -o OPTIONS`.
    require_mount!();
    let d = Dirs::new();
    let opts = format!(
        "cache_dir={},socket={},allow_other,_netdev,nofail",
        d.cache.display(),
        d.socket.display()
    );
    let out = arenafs(&[
        d.nas.as_os_str(),
        d.mnt.as_os_str(),
        "-o".as_ref(),
        opts.as_ref(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_arenafs_mount(&d.mnt));
    let m = arenafs::mount::mount_at(&d.mnt).unwrap();
    assert_eq!(m.source, d.nas.to_str().unwrap());
    Command::new("umount").arg(&d.mnt).status().unwrap();
    wait_for("daemon exit", Duration::from_secs(10), || {
        !d.socket.exists()
    });
}

#[test]
fn stale_mount_of_a_killed_daemon_is_cleared() {
    require_mount!();
    let d = Dirs::new();
    let data = d.nas_file("loras/a.safetensors", 1000, 1);
    let mut m = d.mount(&[]);
    m.kill9();
    let err = fs::metadata(&d.mnt).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "mount is stale");
    a_new_daemon_clears_the_stale_mount(&d, &data);
}

/// Mounts again over the stale mount a killed daemon left and reads `loras/a.safetensors`.
fn a_new_daemon_clears_the_stale_mount(d: &Dirs, data: &[u8]) {
    let m2 = d.mount(&[]);
    assert!(
        m2.log().contains("cleared a stale arenafs mount"),
        "{}",
        m2.log()
    );
    assert_eq!(fs::read(m2.path("loras/a.safetensors")).unwrap(), data);
}

/// A daemon restarted right after a crash (systemd's `Restart=`) clears the stale mount even
/// while the kernel still caches the mount point's attributes (so a `stat` of it succeeds).
#[test]
fn a_restart_right_after_a_crash_clears_the_stale_mount() {
    require_mount!();
    let d = Dirs::new();
    let data = d.nas_file("loras/a.safetensors", 1000, 1);
    let mut m = d.mount(&["attr_timeout=300"]);
    assert!(fs::metadata(&d.mnt).unwrap().is_dir());
    m.kill9();
    assert!(
        fs::metadata(&d.mnt).is_ok(),
        "the kernel answers a stat from its cache"
    );
    a_new_daemon_clears_the_stale_mount(&d, &data);
}

fn one_line_error(out: &std::process::Output, needle: &str) {
    assert!(!out.status.success(), "expected failure");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<_> = err.lines().filter(|l| l.starts_with("arenafs:")).collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    assert!(lines[0].contains(needle), "{needle:?} in {err}");
}

#[test]
fn errors_are_one_line_and_fail() {
    require_mount!();
    let d = Dirs::new();
    let missing = d.tmp.path().join("no-such-nas");
    let fg = |nas: &std::path::Path, mnt: &std::path::Path, cache: &std::path::Path| {
        arenafs(&[
            "mount".as_ref(),
            nas.as_os_str(),
            mnt.as_os_str(),
            "--cache-dir".as_ref(),
            cache.as_os_str(),
            "--foreground".as_ref(),
        ])
    };
    one_line_error(&fg(&missing, &d.mnt, &d.cache), "no-such-nas");

    let file = d.tmp.path().join("plain");
    fs::write(&file, "x").unwrap();
    one_line_error(&fg(&d.nas, &d.mnt, &file.join("cache")), "cache directory");

    let _m = d.mount(&[]);
    let other_mnt = d.tmp.path().join("mnt2");
    fs::create_dir(&other_mnt).unwrap();
    // Busy mount point.
    one_line_error(&fg(&d.nas, &d.mnt, &d.tmp.path().join("cache2")), "busy");
    // Second daemon on the same cache dir.
    one_line_error(
        &fg(&d.nas, &other_mnt, &d.cache),
        "in use by another arenafs daemon",
    );
    assert!(!is_arenafs_mount(&other_mnt));
    // Unknown option.
    let out = arenafs(&[
        d.nas.as_os_str(),
        other_mnt.as_os_str(),
        "-o".as_ref(),
        "bogus".as_ref(),
    ]);
    one_line_error(&out, "unknown mount option 'bogus'");
}

#[test]
fn cache_lives_in_a_versioned_subdirectory_and_foreign_files_survive() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("loras/a.safetensors", 2 * CHUNK as usize, 1);
    let foreign = d.cache.join("old-node-copy.safetensors");
    fs::write(&foreign, "not ours").unwrap();
    let m = d.mount(&["min_size_mb=0"]);
    fs::read(m.path("loras/a.safetensors")).unwrap();
    m.wait_copies(1);
    drop(m);
    assert_eq!(
        fs::read_to_string(d.cache.join("arenafs-v1/FORMAT")).unwrap(),
        "arenafs cache format 1\n"
    );
    assert_eq!(fs::read_to_string(&foreign).unwrap(), "not ours");
}
