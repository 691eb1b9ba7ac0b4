//! `arenafs mount` and `arenafs unmount`: starting a daemon (in the foreground, or detached with
//! the command returning once the mount is ready) and stopping one.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use arenafs::config;
use arenafs::daemon::{self, READY_FD_ENV};
use arenafs::options::MountOptions;

use super::args::MountArgs;

/// `arenafs mount` (and the `mount.fuse3` form): settings from the flags, `-o` options, the env
/// file and the environment; then the daemon in the foreground, or a detached one that this
/// command waits for until the mount is ready. `args` is the whole command line (re-run by the
/// detached daemon).
pub(crate) fn mount(m: MountArgs, args: &[String]) -> Result<()> {
    let mut mopts = MountOptions::default();
    for o in &m.options {
        mopts.apply_opts(o).map_err(anyhow::Error::msg)?;
    }
    // Flags are settings given as options; they come after -o, so they win.
    for (key, value) in [
        ("cache_root", m.cache_dir.map(|p| p.display().to_string())),
        ("cache_min_size_mb", m.min_size_mb),
        (
            "cache_categories",
            m.categories.map(|c| c.replace(',', ":")),
        ),
    ] {
        if let Some(v) = value {
            mopts.settings.push((key.to_string(), v));
        }
    }
    if let Some(s) = m.socket {
        mopts.socket = Some(s);
    }
    if let Some(l) = m.log_file {
        mopts.log_file = Some(l);
    }
    if let Some(g) = m.socket_group {
        mopts.socket_group = Some(g);
    }
    if let Some(a) = m.listen {
        mopts.listen = Some(a);
    }
    if let Some(t) = m.token_file {
        mopts.token_file = Some(t);
    }
    if let Some(e) = m.env {
        mopts.env_file = Some(e);
    }
    mopts.validate().map_err(anyhow::Error::msg)?;
    let inputs = config::Inputs::from_process(mopts.env_file.clone(), mopts.settings.clone());
    let loaded = config::load(&inputs)?;
    super::logging::init(loaded.settings.verbose);
    let (nas, mountpoint) = match m.paths.as_slice() {
        [nas, mnt] => (nas.clone(), mnt.clone()),
        [mnt] => match &loaded.settings.nas_root {
            Some(nas) => (nas.clone(), mnt.clone()),
            None => {
                bail!("no NAS directory: give `arenafs mount NAS MOUNTPOINT` or set ARENA_NAS_ROOT")
            }
        },
        _ => unreachable!("clap takes 1 or 2 paths"),
    };
    if m.foreground {
        return daemon::run(&nas, &mountpoint, &mopts, loaded, inputs);
    }
    for w in &loaded.warnings {
        eprintln!("arenafs: warning: {w}");
    }
    let log = mopts.log_file.clone().unwrap_or_else(|| {
        PathBuf::from("/var/log/arenafs").join(format!(
            "{}.log",
            arenafs::mount::systemd_escape_path(
                &arenafs::mount::absolute(&mountpoint).unwrap_or(mountpoint.clone())
            )
        ))
    });
    spawn_background(args, &log)
}

/// Re-runs this command in the foreground as a detached child, logging to `log`, and waits until
/// it reports that the mount is ready (exit 0) or why it failed (exit 1).
fn spawn_background(args: &[String], log: &Path) -> Result<()> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("log directory {}", dir.display()))?;
    }
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("log file {}", log.display()))?;
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let write_raw = std::os::fd::AsRawFd::as_raw_fd(&write_end);
    let exe = std::env::current_exe().context("locating the arenafs binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args[1..])
        .arg("--foreground")
        .env(READY_FD_ENV, write_raw.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log_file);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            let flags = libc::fcntl(write_raw, libc::F_GETFD);
            if flags < 0 || libc::fcntl(write_raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the daemon")?;
    drop(write_end);
    let mut answer = String::new();
    std::fs::File::from(read_end).read_to_string(&mut answer)?;
    if answer.starts_with("ready") {
        return Ok(());
    }
    let status = child.wait()?;
    match answer.strip_prefix("error: ") {
        Some(msg) => bail!("{}", msg.trim_end()),
        None => bail!("the daemon did not start ({status}); see {}", log.display()),
    }
}

/// `arenafs unmount MOUNTPOINT`.
pub(crate) fn unmount(mountpoint: &Path) -> Result<()> {
    arenafs::mount::unmount(mountpoint)
        .with_context(|| format!("unmounting {}", mountpoint.display()))?;
    Ok(())
}
