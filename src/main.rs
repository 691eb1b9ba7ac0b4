//! The `arenafs` command line: parses the arguments, sets up logging, runs the command
//! ([`cli`]) and maps the outcome to an exit code (0 success, 1 failure, 2 usage error).

mod cli;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use arenafs::daemon;
use cli::UsageError;
use cli::args::{Cli, Command, ConfigCommand, normalise_args};

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

/// Runs one command. `mount` sets up its logging itself, once it knows the settings.
fn run(cli: Cli, args: &[String]) -> Result<()> {
    if !matches!(cli.command, Command::Mount(_)) {
        cli::logging::init(false);
    }
    match cli.command {
        Command::Mount(m) => {
            cli::mount::mount(m, args).inspect_err(|e| daemon::notify_failure(&format!("{e:#}")))
        }
        Command::Status(a) => cli::status::status(a),
        Command::Stats(a) => cli::status::stats(a),
        Command::Prefetch(a) => cli::prefetch::prefetch(a),
        Command::Resolve(a) => cli::resolve::resolve(a),
        Command::Trim(a) => cli::trim::trim(a),
        Command::Adopt(a) => cli::adopt::adopt(a),
        Command::Reload(t) => cli::status::reload(t),
        Command::Unmount { mountpoint } => cli::mount::unmount(&mountpoint),
        Command::Update { command } => cli::update::update(command),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => cli::config::check(file),
        Command::GenAssets { dir } => cli::assets::gen_assets(&dir),
        Command::GenIndex { cache_dir, entries } => cli::bench::gen_index(&cache_dir, entries),
    }
}
