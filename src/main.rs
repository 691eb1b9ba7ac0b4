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
    /// Show what the daemon is doing: state, space, copies with progress.
    Status(StatusArgs),
    /// Show the counters: since the daemon started and over all runs.
    Stats(StatsArgs),
    /// Queue copies of models (category/filename ...), within the cooldown and byte budget.
    Prefetch(PrefetchArgs),
    /// Say, without changing anything, what caching these models would mean.
    Resolve(ResolveArgs),
    /// Remove copies from the cache: by size, age, category or file.
    Trim(TrimArgs),
    /// Re-read the env file now (it is also re-read when it changes).
    Reload(Target),
    /// Take over the copies of the Python Arena AutoCache node (`<root>/<category>/<file>`)
    /// that match the NAS, without copying them again. Run it while the cache is not mounted
    /// (or mount with -o adopt=DIR).
    Adopt(AdoptArgs),
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
    /// Write the man pages, shell completions and example env file into DIR (for packaging:
    /// scripts/package). Hidden: not a user command.
    #[command(name = "gen-assets", hide = true)]
    GenAssets {
        /// Output directory (created if missing).
        dir: PathBuf,
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
    /// Group of the control socket (name or number), so that e.g. ComfyUI's user can reach it.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Also serve the control API over TCP (read-only unless --token-file is given).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<std::net::SocketAddr>,
    /// File holding a bearer token that allows changes over the TCP listener.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Log file of a background daemon [default: /var/log/arenafs/<escaped mount point>.log].
    #[arg(long)]
    log_file: Option<PathBuf>,
}

/// Which daemon to talk to.
#[derive(clap::Args, Debug)]
struct Target {
    /// The mount point whose daemon to ask [default: the only arenafs mount].
    #[arg(short = 'm', long)]
    mountpoint: Option<PathBuf>,
    /// The control socket (instead of deriving it from the mount point).
    #[arg(long)]
    socket: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> Result<PathBuf> {
        arenafs::ctl::find_socket(self.mountpoint.as_deref(), self.socket.as_deref())
    }
}

#[derive(clap::Args, Debug)]
struct StatusArgs {
    /// The mount point (same as --mountpoint).
    #[arg(value_name = "MOUNTPOINT")]
    at: Option<PathBuf>,
    #[command(flatten)]
    target: Target,
    /// Print the daemon's JSON answer.
    #[arg(long, conflicts_with = "watch")]
    json: bool,
    /// Redraw until interrupted, with a progress bar per running copy.
    #[arg(long)]
    watch: bool,
    /// Seconds between redraws with --watch.
    #[arg(long, default_value_t = 1.0, requires = "watch")]
    interval: f64,
}

#[derive(clap::Args, Debug)]
struct StatsArgs {
    /// The mount point (same as --mountpoint).
    #[arg(value_name = "MOUNTPOINT")]
    at: Option<PathBuf>,
    #[command(flatten)]
    target: Target,
    /// Print the daemon's JSON answer.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct PrefetchArgs {
    /// Models as category/filename (category key or folder name).
    #[arg(
        required_unless_present = "workflow",
        conflicts_with = "workflow",
        value_name = "CATEGORY/FILE"
    )]
    models: Vec<String>,
    /// Prefetch the models a workflow loads (JSON or PNG); they become the required set.
    #[arg(long, value_name = "FILE")]
    workflow: Option<PathBuf>,
    #[command(flatten)]
    target: Target,
    /// Wait until the copies are complete, showing their progress.
    #[arg(long)]
    wait: bool,
    /// Print the daemon's JSON answer.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct ResolveArgs {
    /// Models as category/filename (category key or folder name).
    #[arg(
        required_unless_present = "workflow",
        conflicts_with = "workflow",
        value_name = "CATEGORY/FILE"
    )]
    models: Vec<String>,
    /// Name the models a workflow (JSON or PNG) loads; works without a daemon (see --nas).
    #[arg(long, value_name = "FILE")]
    workflow: Option<PathBuf>,
    /// With --workflow and no daemon: look the models up in this NAS directory.
    #[arg(long, value_name = "DIR", requires = "workflow", conflicts_with_all = ["mountpoint", "socket"])]
    nas: Option<PathBuf>,
    #[command(flatten)]
    target: Target,
    /// Print the daemon's JSON answer.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true)
    .args(["to", "older_than", "category", "file"])))]
struct TrimArgs {
    /// Evict least recently used copies until the cache holds at most SIZE (50G, 800MiB).
    #[arg(long, value_parser = arenafs::ctl::parse_size, value_name = "SIZE")]
    to: Option<u64>,
    /// Remove copies not used for DUR (90s, 30m, 12h, 7d, 2w).
    #[arg(long, value_parser = arenafs::ctl::parse_duration, value_name = "DUR")]
    older_than: Option<std::time::Duration>,
    /// Remove the copies of a category (key or folder name).
    #[arg(long, value_name = "CATEGORY")]
    category: Option<String>,
    /// Remove the copy of one model (category/filename), even if pinned.
    #[arg(long, value_name = "CATEGORY/FILE")]
    file: Option<String>,
    /// Only say what would be removed.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    target: Target,
    /// Print the daemon's JSON answer.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct AdoptArgs {
    /// The node's cache root (its ARENA_CACHE_ROOT).
    old_root: PathBuf,
    /// The NAS directory [default: ARENA_NAS_ROOT].
    #[arg(long)]
    nas: Option<PathBuf>,
    /// arenafs's cache directory [default: ARENA_CACHE_ROOT from the env file or environment].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// The env file with the settings.
    #[arg(long)]
    env: Option<PathBuf>,
    /// Compare contents (SHA-256, reads both files) instead of trusting size and mtime.
    #[arg(long)]
    verify: bool,
    /// Only say what would be adopted.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// A mistake in the command line: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// `mount.fuse3` runs `arenafs NAS MOUNTPOINT -o OPTS`: treat a first argument that is not a
/// subcommand as `mount`.
fn normalise_args(mut args: Vec<String>) -> Vec<String> {
    const COMMANDS: &[&str] = &[
        "mount",
        "status",
        "stats",
        "prefetch",
        "resolve",
        "trim",
        "reload",
        "adopt",
        "unmount",
        "config",
        "gen-assets",
        "help",
    ];
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
        Err(e) if e.is::<UsageError>() => {
            eprintln!("arenafs: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("arenafs: {e:#}");
            daemon::report_failure(&format!("{e:#}"));
            ExitCode::from(1)
        }
    }
}

/// Logs to stderr (the journal under systemd); `RUST_LOG` wins over `ARENA_CACHE_VERBOSE`.
/// When stderr is the journal, each line starts with its syslog priority (`<4>` for a warning),
/// so `journalctl -p warning` works, and carries no timestamp of its own.
fn init_logging(verbose: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if verbose {
        "arenafs=debug,info"
    } else {
        "info"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    if stderr_is_journal() {
        builder
            .event_format(JournalPriority(
                tracing_subscriber::fmt::format().without_time(),
            ))
            .init();
    } else {
        builder.init();
    }
}

/// Whether stderr is the journal's stream: systemd sets `JOURNAL_STREAM=DEV:INODE` of the
/// stream it connects, which survives into children that may have other stderrs.
fn stderr_is_journal() -> bool {
    let Ok(want) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    want == format!("{}:{}", st.st_dev, st.st_ino)
}

/// Prefixes each log line with its syslog priority for the journal (sd-daemon(3) style).
struct JournalPriority<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JournalPriority<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            tracing::Level::DEBUG | tracing::Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

fn run(cli: Cli, args: &[String]) -> Result<()> {
    if !matches!(cli.command, Command::Mount(_)) {
        init_logging(false);
    }
    match cli.command {
        Command::Mount(m) => {
            mount(m, args).inspect_err(|e| daemon::notify_failure(&format!("{e:#}")))
        }
        Command::Status(a) => status(a),
        Command::Stats(a) => {
            let socket = with_at(a.at, a.target).socket()?;
            let st = call(&socket, "GET", "/arena/stats", None)?;
            print_answer(&st, a.json, arenafs::ctl::format_stats);
            Ok(())
        }
        Command::Prefetch(a) => prefetch(a),
        Command::Resolve(a) if a.workflow.is_some() => resolve_workflow(a),
        Command::Resolve(a) => {
            let socket = a.target.socket()?;
            let body = serde_json::json!({ "models": refs(&a.models)? });
            let answer = call(&socket, "POST", "/arena/resolve", Some(&body))?;
            print_answer(&answer, a.json, arenafs::ctl::format_models);
            Ok(())
        }
        Command::Trim(a) => trim(a),
        Command::Adopt(a) => adopt(a),
        Command::Reload(t) => {
            let answer = call(&t.socket()?, "POST", "/arena/reload", None)?;
            let changed = answer["changed"].as_array().cloned().unwrap_or_default();
            if changed.is_empty() {
                println!("reloaded; nothing changed");
            }
            for c in changed {
                println!("changed {}", c.as_str().unwrap_or(""));
            }
            Ok(())
        }
        Command::Unmount { mountpoint } => {
            arenafs::mount::unmount(&mountpoint)
                .with_context(|| format!("unmounting {}", mountpoint.display()))?;
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => config_check(file),
        Command::GenAssets { dir } => gen_assets(&dir),
    }
}

/// Writes what a package installs besides the binary, all derived from the code so that it
/// cannot drift: man pages (section 8: `arenafs.8` and one per command), bash/zsh/fish
/// completions, and the example env file (every key of [`config::KEYS`], commented out).
fn gen_assets(dir: &std::path::Path) -> Result<()> {
    use clap::CommandFactory;
    let man_dir = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man_dir, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(&mut page)?;
    page.extend_from_slice(MAN_EXTRA.as_bytes());
    std::fs::write(man_dir.join("arenafs.8"), page)?;
    write_subcommand_pages(&cmd, &man_dir)?;
    // The completion generators offer hidden commands too: complete the visible ones only.
    let full = Cli::command();
    let mut visible = clap::Command::new("arenafs")
        .version(env!("CARGO_PKG_VERSION"))
        .about(full.get_about().cloned().unwrap_or_default())
        .subcommand_required(true)
        .subcommands(full.get_subcommands().filter(|c| !c.is_hide_set()).cloned());
    for (shell, name) in [
        (clap_complete::Shell::Bash, "arenafs"),
        (clap_complete::Shell::Zsh, "_arenafs"),
        (clap_complete::Shell::Fish, "arenafs.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut visible, "arenafs", &mut out);
        std::fs::write(completions.join(name), out)?;
    }
    std::fs::write(dir.join("arenafs.env"), env_example())?;
    Ok(())
}

/// One page per visible command (`arenafs-mount.8`, `arenafs-config-check.8`, ...).
fn write_subcommand_pages(cmd: &clap::Command, dir: &std::path::Path) -> Result<()> {
    for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        let man = clap_mangen::Man::new(sub.clone()).section("8");
        man.generate_to(dir)?;
        write_subcommand_pages(sub, dir)?;
    }
    Ok(())
}

/// Sections of `arenafs(8)` that clap does not produce.
const MAN_EXTRA: &str = r#".SH "MOUNT FORM"
As the helper of
.BR mount (8)
for the type
.BR fuse.arenafs ,
run by
.BR mount.fuse3 (8):
.PP
.RS
.B arenafs
.I NAS MOUNTPOINT
.B \-o
.I OPTIONS
.RE
.PP
is read as
.BR "arenafs mount" .
An fstab line:
.PP
.RS
.nf
/mnt/nas/models /opt/ComfyUI/models fuse.arenafs cache_dir=/ssd/arenafs,env=/etc/arenafs/models.env,allow_other,_netdev,nofail,x\-systemd.requires\-mounts\-for=/mnt/nas/models 0 0
.fi
.RE
.SH SIGNALS
.TP
.B SIGHUP
Re\-read the env file
.RB ( "systemctl reload" ).
The mount stays.
.TP
.BR SIGTERM ", " SIGINT
Unmount and exit.
.SH ENVIRONMENT
.TP
.B ARENA_*
Every setting of the env file; wins over the file.
.TP
.B ARENA_ENV_FILE
The env file when no
.B \-\-env
is given.
.TP
.B RUST_LOG
Log filter (for example
.BR arenafs=debug );
wins over
.BR ARENA_CACHE_VERBOSE .
.TP
.B NOTIFY_SOCKET
Set by systemd for
.BR Type=notify :
the daemon sends READY=1 once the mount is usable, RELOADING=1 and READY=1 around a reload,
STOPPING=1 when it unmounts.
.SH FILES
.TP
.I /etc/arenafs/arenafs.env
Default env file (every key, commented out).
.TP
.I /run/arenafs/<escaped mount point>.sock
Control socket.
.TP
.I /var/log/arenafs/<escaped mount point>.log
Log of a daemon started without
.BR \-\-foreground .
.TP
.I /usr/lib/systemd/system/arenafs@.service
systemd unit; the instance is the escaped mount point.
.TP
.I /usr/share/doc/arenafs/
Installation, configuration, troubleshooting, semantics, migration from the Arena AutoCache node.
.SH "SEE ALSO"
.BR mount.fuse3 (8),
.BR fstab (5),
.BR systemd.mount (5),
.BR systemd-escape (1)
"#;

/// The example env file: every key of [`config::KEYS`], commented out at its default (or at an
/// example value when the default is not a value), with what it does.
fn env_example() -> String {
    let mut out = String::from(
        "# arenafs settings: an env file (KEY=value, # comments, optional `export` and quotes).\n\
         # Every key is listed, commented out at its default; uncomment what you change.\n\
         # Precedence: this file < ARENA_* variables in the daemon's environment < -o options\n\
         # and flags. The file is re-read when it changes (and on SIGHUP / systemctl reload);\n\
         # ARENA_NAS_ROOT and ARENA_CACHE_ROOT apply at the next mount.\n\
         # Check it with: arenafs config check FILE\n\
         # Generated from the code (arenafs gen-assets); docs: /usr/share/doc/arenafs/docs/configuration.md\n",
    );
    for k in config::KEYS {
        out.push('\n');
        let mut line = String::new();
        for word in k.doc.split_whitespace() {
            if !line.is_empty() && line.len() + word.len() + 1 > 96 {
                out.push_str(&format!("# {line}\n"));
                line.clear();
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        out.push_str(&format!("# {line}\n"));
        let opts = std::iter::once(k.opt)
            .chain(k.aliases.iter().copied())
            .map(|o| format!("{o}="))
            .collect::<Vec<_>>()
            .join(", ");
        let usable_default = !k.default.is_empty() && !k.default.contains(' ');
        if usable_default {
            out.push_str(&format!("# -o {opts}\n#{}={}\n", k.env, k.default));
        } else {
            let default = if k.default.is_empty() {
                "unset"
            } else {
                k.default
            };
            out.push_str(&format!(
                "# -o {opts}; default: {default}; for example:\n#{}={}\n",
                k.env, k.example
            ));
        }
    }
    out
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

fn with_at(at: Option<PathBuf>, mut t: Target) -> Target {
    if t.mountpoint.is_none() {
        t.mountpoint = at;
    }
    t
}

fn call(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<serde_json::Value> {
    Ok(arenafs::control::client::call(socket, method, path, body)?)
}

fn print_answer(v: &serde_json::Value, json: bool, human: fn(&serde_json::Value) -> String) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        print!("{}", human(v));
    }
}

/// Checks model references here, so that a typo is a usage error (exit 2).
fn refs(models: &[String]) -> Result<Vec<String>> {
    for m in models {
        arenafs::models::parse_path(m).map_err(|e| UsageError(format!("{m}: {e}")))?;
    }
    Ok(models.to_vec())
}

fn status(a: StatusArgs) -> Result<()> {
    let socket = with_at(a.at, a.target).socket()?;
    if !a.watch {
        let st = call(&socket, "GET", "/arena/status", None)?;
        print_answer(&st, a.json, arenafs::ctl::format_status);
        return Ok(());
    }
    let every = std::time::Duration::from_secs_f64(a.interval.clamp(0.1, 3600.0));
    let mut bars = Bars::new();
    loop {
        let st = call(&socket, "GET", "/arena/status", None)?;
        let jobs = st["jobs"].as_array().cloned().unwrap_or_default();
        if bars.on_terminal() {
            bars.header.set_message(format!(
                "{}: {} used of {}, {} running, {} queued",
                st["mountpoint"].as_str().unwrap_or("?"),
                arenafs::ctl::human_bytes(st["cache_used_bytes"].as_u64().unwrap_or(0)),
                arenafs::ctl::human_bytes(st["cache_limit_bytes"].as_u64().unwrap_or(0)),
                jobs.iter().filter(|j| j["state"] == "running").count(),
                st["queue_length"].as_u64().unwrap_or(0)
            ));
            bars.update(&jobs);
        } else {
            // Not a terminal (a log, a pipe): one line per copy per round.
            println!(
                "{} running, {} queued, {} used",
                jobs.iter().filter(|j| j["state"] == "running").count(),
                st["queue_length"].as_u64().unwrap_or(0),
                arenafs::ctl::human_bytes(st["cache_used_bytes"].as_u64().unwrap_or(0))
            );
            for j in &jobs {
                println!("  {}", arenafs::ctl::job_line(j));
            }
        }
        std::thread::sleep(every);
    }
}

/// One progress bar per running copy (the "visual copy status indicator").
struct Bars {
    multi: indicatif::MultiProgress,
    header: indicatif::ProgressBar,
    bars: std::collections::HashMap<String, indicatif::ProgressBar>,
}

impl Bars {
    fn new() -> Self {
        let multi = indicatif::MultiProgress::new();
        let header = multi.add(indicatif::ProgressBar::new_spinner());
        header.set_style(indicatif::ProgressStyle::with_template("{msg}").expect("template"));
        Self {
            multi,
            header,
            bars: Default::default(),
        }
    }

    fn on_terminal(&self) -> bool {
        !self.multi.is_hidden()
    }

    /// Shows the running copies of `jobs`; bars of copies that ended are finished.
    fn update(&mut self, jobs: &[serde_json::Value]) {
        let style = indicatif::ProgressStyle::with_template(
            "{wide_msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("template");
        let mut seen = std::collections::HashSet::new();
        for j in jobs.iter().filter(|j| j["state"] == "running") {
            let path = j["path"].as_str().unwrap_or("?").to_string();
            seen.insert(path.clone());
            let bar = self.bars.entry(path.clone()).or_insert_with(|| {
                let b = self.multi.add(indicatif::ProgressBar::new(0));
                b.set_style(style.clone());
                b.set_message(path.clone());
                b
            });
            bar.set_length(j["total_bytes"].as_u64().unwrap_or(0));
            bar.set_position(j["done_bytes"].as_u64().unwrap_or(0));
        }
        self.bars.retain(|path, bar| {
            if seen.contains(path) {
                return true;
            }
            bar.finish();
            false
        });
    }
}

fn read_workflow(path: &std::path::Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).with_context(|| format!("workflow {}", path.display()))?;
    if meta.len() > arenafs::workflow::MAX_WORKFLOW_BYTES as u64 {
        bail!(
            "workflow {}: {} bytes is more than a workflow can be ({} bytes)",
            path.display(),
            meta.len(),
            arenafs::workflow::MAX_WORKFLOW_BYTES
        );
    }
    std::fs::read(path).with_context(|| format!("workflow {}", path.display()))
}

/// `resolve --workflow`: asks the daemon when one is named (it knows the cache); otherwise
/// resolves here, against `--nas` or the mount point if given, else only parses.
fn resolve_workflow(a: ResolveArgs) -> Result<()> {
    let file = a.workflow.as_deref().expect("checked by the caller");
    let print = |v: &serde_json::Value| print_answer(v, a.json, arenafs::ctl::format_workflow);
    if a.target.mountpoint.is_some() || a.target.socket.is_some() {
        let daemon = a.target.socket().and_then(|socket| {
            Ok(arenafs::control::client::call_bytes(
                &socket,
                "POST",
                "/arena/workflow",
                Some(read_workflow(file)?),
            )?)
        });
        match daemon {
            Ok(answer) => {
                print(&answer);
                return Ok(());
            }
            // A mount point without a daemon is still a view of the NAS tree.
            Err(e) if a.target.socket.is_none() => {
                eprintln!("arenafs: {e:#}; resolving without the daemon (cache state unknown)")
            }
            Err(e) => return Err(e),
        }
    }
    let resolution = arenafs::workflow::resolve_file(file)?;
    let root = a.nas.as_ref().or(a.target.mountpoint.as_ref());
    let nas = root
        .map(|d| {
            arenafs::source::Nas::open(d).with_context(|| format!("NAS directory {}", d.display()))
        })
        .transpose()?;
    let report = arenafs::discover::locate(resolution, nas.as_ref());
    print(&serde_json::to_value(&report)?);
    Ok(())
}

fn prefetch(a: PrefetchArgs) -> Result<()> {
    let socket = a.target.socket()?;
    let (answer, again): (
        serde_json::Value,
        Box<dyn Fn() -> Result<serde_json::Value>>,
    ) = match &a.workflow {
        Some(file) => {
            let bytes = read_workflow(file)?;
            let answer = arenafs::control::client::call_bytes(
                &socket,
                "POST",
                "/arena/workflow?action=prefetch",
                Some(bytes.clone()),
            )?;
            let socket = socket.clone();
            let again = move || {
                Ok(arenafs::control::client::call_bytes(
                    &socket,
                    "POST",
                    "/arena/workflow",
                    Some(bytes.clone()),
                )?)
            };
            (answer, Box::new(again))
        }
        None => {
            let body = serde_json::json!({ "models": refs(&a.models)? });
            let answer = call(&socket, "POST", "/arena/prefetch", Some(&body))?;
            let socket = socket.clone();
            let again = move || call(&socket, "POST", "/arena/resolve", Some(&body));
            (answer, Box::new(again))
        }
    };
    let human: fn(&serde_json::Value) -> String = if a.workflow.is_some() {
        arenafs::ctl::format_workflow
    } else {
        arenafs::ctl::format_models
    };
    if !a.wait {
        print_answer(&answer, a.json, human);
        return Ok(());
    }
    let path_key = if a.workflow.is_some() {
        "nas_path"
    } else {
        "path"
    };
    let mut waiting: std::collections::HashSet<String> = answer["models"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| {
            m["reason"] == "queued"
                || m["reason"] == "already_queued"
                || m["why"] == "queued"
                || m["why"] == "already_queued"
        })
        .filter_map(|m| m[path_key].as_str().map(str::to_string))
        .collect();
    let mut bars = Bars::new();
    while !waiting.is_empty() {
        let jobs = call(&socket, "GET", "/arena/jobs", None)?;
        let jobs: Vec<serde_json::Value> = jobs["jobs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|j| j["path"].as_str().is_some_and(|p| waiting.contains(p)))
            .cloned()
            .collect();
        bars.update(&jobs);
        waiting.retain(|p| jobs.iter().any(|j| j["path"] == p.as_str()));
        if !waiting.is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
    bars.update(&[]);
    // What the cache holds now, from the daemon (not assumed).
    let now = again()?;
    print_answer(&now, a.json, human);
    let incomplete: Vec<String> = now["models"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| {
            let reason = m["reason"].as_str().or(m["why"].as_str());
            m[path_key].is_string()
                && m["cached"] != "complete"
                && m["cache"] != "complete"
                && matches!(
                    reason,
                    Some("queued" | "already_queued" | "budget_exceeded")
                )
        })
        .map(|m| m[path_key].as_str().unwrap_or("?").to_string())
        .collect();
    if !incomplete.is_empty() {
        bail!(
            "not complete: {} (see the daemon's log)",
            incomplete.join(", ")
        );
    }
    Ok(())
}

fn adopt(a: AdoptArgs) -> Result<()> {
    let mut settings = Vec::new();
    if let Some(c) = &a.cache_dir {
        settings.push(("cache_root".to_string(), c.display().to_string()));
    }
    let loaded = config::load(&config::Inputs::from_process(a.env.clone(), settings))?;
    let nas_dir = a
        .nas
        .clone()
        .or(loaded.settings.nas_root.clone())
        .ok_or_else(|| UsageError("give --nas DIR (or set ARENA_NAS_ROOT)".into()))?;
    let cache_dir = loaded
        .settings
        .cache_dir
        .clone()
        .ok_or_else(|| UsageError("give --cache-dir DIR (or set ARENA_CACHE_ROOT)".into()))?;
    let nas = arenafs::source::Nas::open(&nas_dir)
        .with_context(|| format!("NAS directory {}", nas_dir.display()))?;
    let store = arenafs::cache::Store::open(&cache_dir).with_context(|| {
        format!(
            "cache {} (if a daemon is using it, unmount first or mount with -o adopt={})",
            cache_dir.display(),
            a.old_root.display()
        )
    })?;
    let report = arenafs::cache::adopt::adopt(
        &store,
        &nas,
        arenafs::source::IdentityRule::SizeMtimeIno,
        arenafs::daemon::CHUNK_SIZE,
        &a.old_root,
        arenafs::cache::adopt::AdoptOptions {
            verify: a.verify,
            dry_run: a.dry_run,
        },
    )
    .with_context(|| format!("adopting from {}", a.old_root.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for i in &report.items {
        let to = i
            .nas_path
            .as_ref()
            .map(|p| format!(" -> {}", p.display()))
            .unwrap_or_default();
        println!("{:15} {}{to}", i.outcome, i.old.display());
    }
    println!(
        "{} {} copies ({}), {} hard-linked; the old files are left in place",
        if a.dry_run { "would adopt" } else { "adopted" },
        report.adopted,
        arenafs::ctl::human_bytes(report.adopted_bytes),
        report.linked
    );
    Ok(())
}

fn trim(a: TrimArgs) -> Result<()> {
    let socket = a.target.socket()?;
    if let Some(f) = &a.file {
        refs(std::slice::from_ref(f))?;
    }
    let body = serde_json::json!({
        "to_bytes": a.to,
        "older_than_secs": a.older_than.map(|d| d.as_secs()),
        "category": a.category,
        "file": a.file,
        "dry_run": a.dry_run,
    });
    let answer = call(&socket, "POST", "/arena/trim", Some(&body))?;
    print_answer(&answer, a.json, arenafs::ctl::format_trim);
    Ok(())
}
