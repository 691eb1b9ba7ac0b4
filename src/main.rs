//! The `arenafs` command line.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use arenafs::config;
use arenafs::daemon::{self, READY_FD_ENV};
use arenafs::options::MountOptions;

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
    /// Work with the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print the effective settings, where each came from, and every warning. Exit 1 only when
    /// the file cannot be read or the settings cannot work.
    Check {
        /// The env file [default: $ARENA_ENV_FILE, else /etc/arenafs/arenafs.env if present].
        file: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct MountArgs {
    /// `[NAS] MOUNTPOINT`: the NAS directory to present (default: ARENA_NAS_ROOT) and where to
    /// mount it (ComfyUI's models directory).
    #[arg(num_args = 1..=2, required = true, value_names = ["NAS", "MOUNTPOINT"])]
    paths: Vec<PathBuf>,
    /// SSD cache directory (arenafs keeps its data in a versioned subdirectory) [default:
    /// ARENA_CACHE_ROOT].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// The env file with the settings [default: $ARENA_ENV_FILE, else /etc/arenafs/arenafs.env].
    #[arg(long)]
    env: Option<PathBuf>,
    /// Mount options, comma-separated (every flag has an -o twin: cache_dir=DIR, ...).
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Stay in the foreground instead of returning once the mount is ready.
    #[arg(short, long)]
    foreground: bool,
    /// Files below this size (MB) are read from the NAS without caching [default: 10].
    #[arg(long)]
    min_size_mb: Option<String>,
    /// Categories to cache, comma-separated (keys or folder names), added to the defaults
    /// unless ARENA_CACHE_CATEGORIES_MODE=override.
    #[arg(long)]
    categories: Option<String>,
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
    const COMMANDS: &[&str] = &["mount", "stats", "status", "unmount", "config", "help"];
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
    match run(cli, &args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("arenafs: {e:#}");
            daemon::report_failure(&format!("{e:#}"));
            ExitCode::from(1)
        }
    }
}

/// Logs to stderr (the journal under systemd); `RUST_LOG` wins over `ARENA_CACHE_VERBOSE`.
fn init_logging(verbose: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if verbose {
        "arenafs=debug,info"
    } else {
        "info"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

fn run(cli: Cli, args: &[String]) -> Result<()> {
    if !matches!(cli.command, Command::Mount(_)) {
        init_logging(false);
    }
    match cli.command {
        Command::Mount(m) => mount(m, args),
        Command::Stats(s) => print_get(&s, "/arena/stats"),
        Command::Status(s) => print_get(&s, "/arena/status"),
        Command::Unmount { mountpoint } => {
            arenafs::mount::unmount(&mountpoint)
                .with_context(|| format!("unmounting {}", mountpoint.display()))?;
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => config_check(file),
    }
}

fn config_check(file: Option<PathBuf>) -> Result<()> {
    let loaded = config::load(&config::Inputs::from_process(file, Vec::new()))?;
    match &loaded.env_file {
        Some(p) => println!("env file: {}", p.display()),
        None => println!("env file: none (built-in defaults and the environment)"),
    }
    let s = &loaded.settings;
    println!("state: {:?}", s.state());
    for k in config::KEYS {
        println!(
            "{:32} = {:40} ({})",
            k.env,
            config::display_value(s, k.env),
            loaded.source_of(k.env)
        );
    }
    for w in &loaded.warnings {
        println!("warning: {w}");
    }
    match &s.cache_dir {
        None => bail!("no cache directory: set ARENA_CACHE_ROOT (or give --cache-dir)"),
        Some(dir) => {
            let usable = if dir.exists() {
                dir.is_dir()
                    && nix::unistd::access(
                        dir,
                        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
                    )
                    .is_ok()
            } else {
                // Creatable when its nearest existing ancestor is a writable directory.
                dir.ancestors().find(|a| a.exists()).is_some_and(|a| {
                    a.is_dir() && nix::unistd::access(a, nix::unistd::AccessFlags::W_OK).is_ok()
                })
            };
            if !usable {
                bail!(
                    "cache directory {} is not usable (not a writable directory)",
                    dir.display()
                );
            }
        }
    }
    println!("ok: {} warning(s)", loaded.warnings.len());
    Ok(())
}

fn mount(m: MountArgs, args: &[String]) -> Result<()> {
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
    if let Some(e) = m.env {
        mopts.env_file = Some(e);
    }
    let inputs = config::Inputs::from_process(mopts.env_file.clone(), mopts.settings.clone());
    let loaded = config::load(&inputs)?;
    init_logging(loaded.settings.verbose);
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
