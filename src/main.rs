//! The `arenafs` command line.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use arenafs::daemon::{self, READY_FD_ENV};
use arenafs::options::MountConfig;

#[derive(Parser, Debug)]
#[command(
    name = "arenafs",
    version,
    about = "Serve ComfyUI models from an SSD cache of a slow NAS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Mount NAS at MOUNTPOINT, caching on CACHE_DIR.
    Mount(MountArgs),
    /// Print the daemon's counters (JSON).
    Stats(SocketArgs),
    /// Print the daemon's status (JSON).
    Status(SocketArgs),
    /// Unmount an arenafs mount (the daemon then exits).
    Unmount {
        /// The mount point.
        mountpoint: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct MountArgs {
    /// The NAS directory to present.
    nas: PathBuf,
    /// Where to mount it (ComfyUI's models directory).
    mountpoint: PathBuf,
    /// SSD cache directory (arenafs keeps its data in a versioned subdirectory).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Mount options, comma-separated (every flag has an -o twin: cache_dir=DIR, ...).
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Stay in the foreground instead of returning once the mount is ready.
    #[arg(short, long)]
    foreground: bool,
    /// Files below this size (MB) are read from the NAS without caching [default: 10].
    #[arg(long)]
    min_size_mb: Option<u64>,
    /// Categories to cache, comma-separated (keys or folder names) [default: the model folders].
    #[arg(long, value_delimiter = ',')]
    categories: Option<Vec<String>>,
    /// Control socket [default: /run/arenafs/<escaped mount point>.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Log file of a background daemon [default: /var/log/arenafs/<escaped mount point>.log].
    #[arg(long)]
    log_file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct SocketArgs {
    /// The mount point whose daemon to ask.
    mountpoint: Option<PathBuf>,
    /// The control socket (instead of deriving it from the mount point).
    #[arg(long)]
    socket: Option<PathBuf>,
}

/// `mount.fuse3` runs `arenafs NAS MOUNTPOINT -o OPTS`: treat a first argument that is not a
/// subcommand as `mount`.
fn normalise_args(mut args: Vec<String>) -> Vec<String> {
    const COMMANDS: &[&str] = &["mount", "stats", "status", "unmount", "help"];
    if let Some(first) = args.get(1)
        && !first.starts_with('-')
        && !COMMANDS.contains(&first.as_str())
    {
        args.insert(1, "mount".into());
    }
    args
}

fn main() -> ExitCode {
    let args = normalise_args(std::env::args().collect());
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging();
    match run(cli, &args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("arenafs: {e:#}");
            daemon::report_failure(&format!("{e:#}"));
            ExitCode::from(1)
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

fn run(cli: Cli, args: &[String]) -> Result<()> {
    match cli.command {
        Command::Mount(m) => mount(m, args),
        Command::Stats(s) => print_get(&s, "/arena/stats"),
        Command::Status(s) => print_get(&s, "/arena/status"),
        Command::Unmount { mountpoint } => {
            arenafs::mount::unmount(&mountpoint)
                .with_context(|| format!("unmounting {}", mountpoint.display()))?;
            Ok(())
        }
    }
}

fn mount(m: MountArgs, args: &[String]) -> Result<()> {
    let mut cfg = MountConfig::default();
    for o in &m.options {
        cfg.apply_opts(o).map_err(anyhow::Error::msg)?;
    }
    if let Some(d) = m.cache_dir {
        cfg.cache_dir = Some(d);
    }
    if let Some(mb) = m.min_size_mb {
        cfg.min_size = mb * 1000 * 1000;
    }
    if let Some(c) = m.categories {
        cfg.categories = c;
    }
    if let Some(s) = m.socket {
        cfg.socket = Some(s);
    }
    if let Some(l) = m.log_file {
        cfg.log_file = Some(l);
    }
    if m.foreground {
        return daemon::run(&m.nas, &m.mountpoint, &cfg);
    }
    let log = cfg.log_file.clone().unwrap_or_else(|| {
        PathBuf::from("/var/log/arenafs").join(format!(
            "{}.log",
            arenafs::mount::systemd_escape_path(
                &arenafs::mount::absolute(&m.mountpoint).unwrap_or(m.mountpoint.clone())
            )
        ))
    });
    spawn_background(args, &log)
}

/// Re-runs this command in the foreground as a detached child, logging to `log`, and waits until
/// it reports that the mount is ready (exit 0) or why it failed (exit 1).
fn spawn_background(args: &[String], log: &std::path::Path) -> Result<()> {
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

fn print_get(s: &SocketArgs, path: &str) -> Result<()> {
    let socket = match (&s.socket, &s.mountpoint) {
        (Some(p), _) => p.clone(),
        (None, Some(mp)) => arenafs::control::default_socket(&arenafs::mount::absolute(mp)?),
        (None, None) => bail!("give a mount point or --socket"),
    };
    let body = arenafs::control::client::get(&socket, path)?;
    println!("{body}");
    Ok(())
}
