//! The command line's definition (clap): commands, their flags and help texts. The man pages and
//! completions are generated from it ([`super::assets`]).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "arenafs",
    version,
    about = "Serve ComfyUI models from an SSD cache of a slow NAS"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
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
    /// that match the NAS, without reading them from the NAS again (reflinked or copied into
    /// the cache). Run it while the cache is not mounted (or mount with -o adopt=DIR).
    Adopt(AdoptArgs),
    /// Unmount an arenafs mount (the daemon then exits).
    Unmount {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Keep tracked models (a manifest) up to date on the NAS from Hugging Face and CivitAI:
    /// check, apply (download, verify, install), rollback, status.
    Update {
        #[command(subcommand)]
        command: UpdateCommand,
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
    /// Add N synthetic complete entries (no data files) to the index of CACHE_DIR, for the scale
    /// benchmark (scripts/bench-scale). Hidden: not a user command.
    #[command(name = "gen-index", hide = true)]
    GenIndex {
        /// The cache directory (as given to mount).
        cache_dir: PathBuf,
        /// How many entries.
        #[arg(long)]
        entries: u64,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum UpdateCommand {
    /// Ask the services what they offer, without downloading; say what is newer.
    Check(UpdateArgs),
    /// Download, verify and install what is newer (or what --dry-run says would be).
    Apply {
        #[command(flatten)]
        args: UpdateArgs,
        /// Say what would be downloaded, and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Put the previous version of each model back (a second rollback undoes the first).
    Rollback(UpdateArgs),
    /// What is installed, kept for rollback, and last checked.
    Status(UpdateArgs),
}

#[derive(clap::Args, Debug)]
pub(crate) struct UpdateArgs {
    /// The models' ids [default: every model of the manifest].
    pub(crate) ids: Vec<String>,
    /// The manifest [default: $ARENA_UPDATE_MANIFEST].
    #[arg(long)]
    pub(crate) manifest: Option<PathBuf>,
    /// The NAS directory to act on, without a daemon [default: through the daemon of the
    /// mount (-m), with its manifest and settings].
    #[arg(long, conflicts_with_all = ["mountpoint", "socket"])]
    pub(crate) nas: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) target: Target,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Through the daemon: wait for an apply to end, with a progress bar (check and rollback
    /// always wait).
    #[arg(long)]
    pub(crate) wait: bool,
}

#[derive(Subcommand, Debug)]
pub(crate) enum ConfigCommand {
    /// Print the effective settings, where each came from, and every warning. Exit 1 only when
    /// the file cannot be read or the settings cannot work.
    Check {
        /// The env file [default: $ARENA_ENV_FILE, else /etc/arenafs/arenafs.env if present].
        file: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
pub(crate) struct MountArgs {
    /// `[NAS] MOUNTPOINT`: the NAS directory to present (default: ARENA_NAS_ROOT) and where to
    /// mount it (ComfyUI's models directory).
    #[arg(num_args = 1..=2, required = true, value_names = ["NAS", "MOUNTPOINT"])]
    pub(crate) paths: Vec<PathBuf>,
    /// SSD cache directory (arenafs keeps its data in a versioned subdirectory) [default:
    /// ARENA_CACHE_ROOT].
    #[arg(long)]
    pub(crate) cache_dir: Option<PathBuf>,
    /// The env file with the settings [default: $ARENA_ENV_FILE, else /etc/arenafs/arenafs.env].
    #[arg(long)]
    pub(crate) env: Option<PathBuf>,
    /// Mount options, comma-separated (every flag has an -o twin: cache_dir=DIR, ...).
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    pub(crate) options: Vec<String>,
    /// Stay in the foreground instead of returning once the mount is ready.
    #[arg(short, long)]
    pub(crate) foreground: bool,
    /// Files below this size (MB) are read from the NAS without caching [default: 10].
    #[arg(long)]
    pub(crate) min_size_mb: Option<String>,
    /// Categories to cache, comma-separated (keys or folder names), added to the defaults
    /// unless ARENA_CACHE_CATEGORIES_MODE=override.
    #[arg(long)]
    pub(crate) categories: Option<String>,
    /// Control socket [default: /run/arenafs/<escaped mount point>.sock].
    #[arg(long)]
    pub(crate) socket: Option<PathBuf>,
    /// Group of the control socket (name or number), so that e.g. ComfyUI's user can reach it.
    #[arg(long, value_name = "GROUP")]
    pub(crate) socket_group: Option<String>,
    /// Also serve the control API over TCP (read-only unless --token-file is given).
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) listen: Option<std::net::SocketAddr>,
    /// File holding a bearer token that allows changes over the TCP listener.
    #[arg(long, value_name = "FILE")]
    pub(crate) token_file: Option<PathBuf>,
    /// Log file of a background daemon [default: /var/log/arenafs/<escaped mount point>.log].
    #[arg(long)]
    pub(crate) log_file: Option<PathBuf>,
}

/// Which daemon to talk to.
#[derive(clap::Args, Debug)]
pub(crate) struct Target {
    /// The mount point whose daemon to ask [default: the only arenafs mount].
    #[arg(short = 'm', long)]
    pub(crate) mountpoint: Option<PathBuf>,
    /// The control socket (instead of deriving it from the mount point).
    #[arg(long)]
    pub(crate) socket: Option<PathBuf>,
}

impl Target {
    /// `at` (a command's positional mount point) stands for `--mountpoint` when that is not given.
    pub(crate) fn or_at(mut self, at: Option<PathBuf>) -> Self {
        if self.mountpoint.is_none() {
            self.mountpoint = at;
        }
        self
    }

    /// The daemon's control socket.
    pub(crate) fn socket(&self) -> Result<PathBuf> {
        arenafs::ctl::find_socket(self.mountpoint.as_deref(), self.socket.as_deref())
    }
}

#[derive(clap::Args, Debug)]
pub(crate) struct StatusArgs {
    /// The mount point (same as --mountpoint).
    #[arg(value_name = "MOUNTPOINT")]
    pub(crate) at: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) target: Target,
    /// Print the daemon's JSON answer.
    #[arg(long, conflicts_with = "watch")]
    pub(crate) json: bool,
    /// Redraw until interrupted, with a progress bar per running copy.
    #[arg(long)]
    pub(crate) watch: bool,
    /// Seconds between redraws with --watch.
    #[arg(long, default_value_t = 1.0, requires = "watch")]
    pub(crate) interval: f64,
}

#[derive(clap::Args, Debug)]
pub(crate) struct StatsArgs {
    /// The mount point (same as --mountpoint).
    #[arg(value_name = "MOUNTPOINT")]
    pub(crate) at: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) target: Target,
    /// Print the daemon's JSON answer.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct PrefetchArgs {
    /// Models as category/filename (category key or folder name).
    #[arg(
        required_unless_present = "workflow",
        conflicts_with = "workflow",
        value_name = "CATEGORY/FILE"
    )]
    pub(crate) models: Vec<String>,
    /// Prefetch the models a workflow loads (JSON or PNG); they become the required set.
    #[arg(long, value_name = "FILE")]
    pub(crate) workflow: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) target: Target,
    /// Wait until the copies are complete, showing their progress.
    #[arg(long)]
    pub(crate) wait: bool,
    /// Print the daemon's JSON answer.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct ResolveArgs {
    /// Models as category/filename (category key or folder name).
    #[arg(
        required_unless_present = "workflow",
        conflicts_with = "workflow",
        value_name = "CATEGORY/FILE"
    )]
    pub(crate) models: Vec<String>,
    /// Name the models a workflow (JSON or PNG) loads; works without a daemon (see --nas).
    #[arg(long, value_name = "FILE")]
    pub(crate) workflow: Option<PathBuf>,
    /// With --workflow and no daemon: look the models up in this NAS directory.
    #[arg(long, value_name = "DIR", requires = "workflow", conflicts_with_all = ["mountpoint", "socket"])]
    pub(crate) nas: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) target: Target,
    /// Print the daemon's JSON answer.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true)
    .args(["to", "older_than", "category", "file"])))]
pub(crate) struct TrimArgs {
    /// Evict least recently used copies until the cache holds at most SIZE (50G, 800MiB).
    #[arg(long, value_parser = arenafs::ctl::parse_size, value_name = "SIZE")]
    pub(crate) to: Option<u64>,
    /// Remove copies not used for DUR (90s, 30m, 12h, 7d, 2w).
    #[arg(long, value_parser = arenafs::ctl::parse_duration, value_name = "DUR")]
    pub(crate) older_than: Option<std::time::Duration>,
    /// Remove the copies of a category (key or folder name).
    #[arg(long, value_name = "CATEGORY")]
    pub(crate) category: Option<String>,
    /// Remove the copy of one model (category/filename), even if pinned.
    #[arg(long, value_name = "CATEGORY/FILE")]
    pub(crate) file: Option<String>,
    /// Only say what would be removed.
    #[arg(long)]
    pub(crate) dry_run: bool,
    #[command(flatten)]
    pub(crate) target: Target,
    /// Print the daemon's JSON answer.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct AdoptArgs {
    /// The node's cache root (its ARENA_CACHE_ROOT).
    pub(crate) old_root: PathBuf,
    /// The NAS directory [default: ARENA_NAS_ROOT].
    #[arg(long)]
    pub(crate) nas: Option<PathBuf>,
    /// arenafs's cache directory [default: ARENA_CACHE_ROOT from the env file or environment].
    #[arg(long)]
    pub(crate) cache_dir: Option<PathBuf>,
    /// The env file with the settings.
    #[arg(long)]
    pub(crate) env: Option<PathBuf>,
    /// Compare all the bytes (SHA-256), whatever the mtime, instead of size, mtime and a sample
    /// of the bytes.
    #[arg(long)]
    pub(crate) verify: bool,
    /// Only say what would be adopted.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `mount.fuse3` runs `arenafs NAS MOUNTPOINT -o OPTS`: treat a first argument that is not a
/// subcommand as `mount`.
pub(crate) fn normalise_args(mut args: Vec<String>) -> Vec<String> {
    if let Some(first) = args.get(1)
        && !first.starts_with('-')
        && !is_command(first)
    {
        args.insert(1, "mount".into());
    }
    args
}

/// Whether `name` is one of the commands (hidden ones and `help` included).
fn is_command(name: &str) -> bool {
    use clap::CommandFactory;
    name == "help"
        || Cli::command()
            .get_subcommands()
            .any(|c| c.get_name() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn the_mount_helper_form_is_read_as_mount() {
        assert_eq!(
            normalise_args(argv(&["arenafs", "/nas", "/mnt", "-o", "cache_dir=/c"])),
            argv(&["arenafs", "mount", "/nas", "/mnt", "-o", "cache_dir=/c"])
        );
        for command in [
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
        ] {
            let args = argv(&["arenafs", command, "x"]);
            assert_eq!(normalise_args(args.clone()), args, "{command}");
        }
        for untouched in [&["arenafs"][..], &["arenafs", "--version"]] {
            assert_eq!(normalise_args(argv(untouched)), argv(untouched));
        }
    }
}
