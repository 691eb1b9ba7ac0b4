//! `arenafs update check|apply|rollback|status`: the model updater on a NAS directory.

use std::path::PathBuf;

use anyhow::{Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

use super::UsageError;
use super::args::{UpdateArgs, UpdateCommand};
use arenafs::update::manifest::Manifest;
use arenafs::update::{Outcome, Settings, Updater};

fn manifest_path(given: &Option<PathBuf>) -> Result<PathBuf> {
    match given {
        Some(p) => Ok(p.clone()),
        None => match std::env::var_os("ARENA_UPDATE_MANIFEST").filter(|v| !v.is_empty()) {
            Some(p) => Ok(PathBuf::from(p)),
            None => Err(UsageError(
                "no manifest: give --manifest FILE or set ARENA_UPDATE_MANIFEST".into(),
            )
            .into()),
        },
    }
}

fn short(v: &str) -> &str {
    &v[..v.len().min(12)]
}

fn line(o: &Outcome) -> String {
    let installed = o
        .installed
        .as_ref()
        .map(|v| short(&v.version).to_string())
        .unwrap_or_else(|| "none".into());
    let offered = o
        .offered
        .as_ref()
        .map(|r| short(&r.version).to_string())
        .unwrap_or_default();
    match o.action {
        "failed" => format!(
            "{}: FAILED ({}): {}",
            o.id,
            o.reason.unwrap_or("error"),
            o.error.as_deref().unwrap_or("")
        ),
        "available" => format!(
            "{}: update available: {installed} -> {offered} ({})",
            o.id, o.target
        ),
        "up_to_date" => format!("{}: up to date ({installed})", o.id),
        "installed" => format!(
            "{}: installed {offered} at {} ({} bytes downloaded{})",
            o.id,
            o.target,
            o.fetched_bytes,
            if o.verified == Some(true) {
                ", sha256 verified"
            } else {
                ", no sha256 to verify against"
            }
        ),
        "adopted" => format!(
            "{}: the file at {} is {offered} already; recorded",
            o.id, o.target
        ),
        "would_install" => format!(
            "{}: would install {offered} at {} ({} bytes)",
            o.id,
            o.target,
            o.offered
                .as_ref()
                .and_then(|r| r.size)
                .map(|s| s.to_string())
                .unwrap_or_else(|| "?".into())
        ),
        "rolled_back" => format!("{}: rolled back to {installed} at {}", o.id, o.target),
        _ => {
            let state = o.state.clone().unwrap_or_default();
            let kept: Vec<&str> = state
                .history
                .iter()
                .map(|k| short(&k.what.version))
                .collect();
            let check = match &state.last_check {
                Some(c) if c.error.is_some() => "last check failed".to_string(),
                Some(c) if c.available => format!(
                    "update available ({})",
                    c.version.as_deref().map(short).unwrap_or("")
                ),
                Some(_) => "up to date at the last check".into(),
                None => "never checked".into(),
            };
            format!(
                "{}: {} installed {installed}; kept {}; {check}",
                o.id,
                o.target,
                if kept.is_empty() {
                    "none".into()
                } else {
                    kept.join(", ")
                }
            )
        }
    }
}

/// `arenafs update ...`.
pub(crate) fn update(command: UpdateCommand) -> Result<()> {
    let (args, what, dry_run) = match command {
        UpdateCommand::Check(a) => (a, "check", false),
        UpdateCommand::Apply { args, dry_run } => (args, "apply", dry_run),
        UpdateCommand::Rollback(a) => (a, "rollback", false),
        UpdateCommand::Status(a) => (a, "status", false),
    };
    let UpdateArgs {
        ids,
        manifest,
        nas,
        json,
    } = args;
    let path = manifest_path(&manifest)?;
    let manifest = Manifest::load(&path).map_err(|e| UsageError(e.to_string()))?;
    let models = manifest.select(&ids).map_err(UsageError)?;
    if !nas.is_dir() {
        return Err(UsageError(format!("--nas {}: not a directory", nas.display())).into());
    }
    let settings = Settings::from_env().map_err(UsageError)?;
    let updater = Updater::new(&nas, settings).map_err(UsageError)?;
    let mut outcomes = Vec::new();
    for model in models {
        let outcome = match what {
            "check" => updater.check(model),
            "apply" => {
                let bar =
                    (!json && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
                        let b = ProgressBar::new(0);
                        b.set_style(
                            ProgressStyle::with_template(
                                "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                            )
                            .expect("valid template"),
                        );
                        b.set_message(model.id.clone());
                        b
                    });
                let mut progress = |done: u64, total: Option<u64>| {
                    if let Some(b) = &bar {
                        if let Some(t) = total {
                            b.set_length(t);
                        }
                        b.set_position(done);
                    }
                };
                let o = updater.apply(model, dry_run, &mut progress);
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
                o
            }
            "rollback" => updater.rollback(model),
            _ => updater.status(model),
        };
        if !json {
            println!("{}", line(&outcome));
        }
        outcomes.push(outcome);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&outcomes)?);
    }
    let failed = outcomes.iter().filter(|o| o.action == "failed").count();
    if failed > 0 {
        bail!("{failed} of {} models failed", outcomes.len());
    }
    Ok(())
}
