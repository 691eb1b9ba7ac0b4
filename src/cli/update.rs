//! `arenafs update check|apply|rollback|status`: the model updater, on a NAS directory
//! (`--nas DIR`, no daemon needed) or through the daemon of a mount (`-m MOUNTPOINT`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use super::UsageError;
use super::args::{UpdateArgs, UpdateCommand};
use super::control::call;
use arenafs::update::manifest::Manifest;
use arenafs::update::{Settings, Updater};

fn short(v: &str) -> &str {
    &v[..v.len().min(12)]
}

fn bar() -> ProgressBar {
    let b = ProgressBar::new(0);
    b.set_style(
        ProgressStyle::with_template(
            "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("valid template"),
    );
    b
}

/// One line for an outcome (the JSON of [`arenafs::update::Outcome`]).
fn line(o: &Value) -> String {
    let s = |k: &str| o[k].as_str().unwrap_or("");
    let id = s("id");
    let target = s("target");
    let installed = o["installed"]["version"]
        .as_str()
        .map(short)
        .unwrap_or("none");
    let offered = o["offered"]["version"].as_str().map(short).unwrap_or("");
    match s("action") {
        "failed" => format!("{id}: FAILED ({}): {}", s("reason"), s("error")),
        "available" => format!("{id}: update available: {installed} -> {offered} ({target})"),
        "up_to_date" => format!("{id}: up to date ({installed})"),
        "installed" => format!(
            "{id}: installed {offered} at {target} ({} bytes downloaded{})",
            o["fetched_bytes"],
            if o["verified"] == true {
                ", sha256 verified"
            } else {
                ", no sha256 to verify against"
            }
        ),
        "adopted" => format!("{id}: the file at {target} is {offered} already; recorded"),
        "would_install" => format!(
            "{id}: would install {offered} at {target} ({} bytes)",
            o["offered"]["size"]
                .as_u64()
                .map(|s| s.to_string())
                .unwrap_or_else(|| "?".into())
        ),
        "rolled_back" => format!("{id}: rolled back to {installed} at {target}"),
        _ => {
            let kept: Vec<&str> = o["state"]["history"]
                .as_array()
                .map(|h| {
                    h.iter()
                        .filter_map(|k| k["version"].as_str().map(short))
                        .collect()
                })
                .unwrap_or_default();
            let c = &o["state"]["last_check"];
            let check = if c.is_null() {
                "never checked".to_string()
            } else if !c["error"].is_null() {
                "last check failed".into()
            } else if c["available"] == true {
                format!(
                    "update available ({})",
                    c["version"].as_str().map(short).unwrap_or("")
                )
            } else {
                "up to date at the last check".into()
            };
            format!(
                "{id}: {target} installed {installed}; kept {}; {check}",
                if kept.is_empty() {
                    "none".into()
                } else {
                    kept.join(", ")
                }
            )
        }
    }
}

fn finish(outcomes: &[Value], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(outcomes)?);
    } else {
        for o in outcomes {
            println!("{}", line(o));
        }
    }
    let failed = outcomes.iter().filter(|o| o["action"] == "failed").count();
    if failed > 0 {
        bail!("{failed} of {} models failed", outcomes.len());
    }
    Ok(())
}

/// `arenafs update ...`.
pub(crate) fn update(command: UpdateCommand) -> Result<()> {
    let (args, what, dry_run) = match command {
        UpdateCommand::Check(a) => (a, "check", false),
        UpdateCommand::Apply { args, dry_run } => (args, "apply", dry_run),
        UpdateCommand::Rollback(a) => (a, "rollback", false),
        UpdateCommand::Status(a) => (a, "status", false),
    };
    match &args.nas {
        Some(nas) => on_nas(nas, what, dry_run, &args),
        None => {
            if args.manifest.is_some() {
                return Err(UsageError(
                    "through the daemon, its own manifest is used (ARENA_UPDATE_MANIFEST); --manifest goes with --nas".into(),
                )
                .into());
            }
            let socket = args.target.socket()?;
            via_daemon(&socket, what, dry_run, &args)
        }
    }
}

fn on_nas(nas: &Path, what: &str, dry_run: bool, args: &UpdateArgs) -> Result<()> {
    let loaded = arenafs::config::load(&arenafs::config::Inputs::from_process(None, Vec::new()))?;
    let path: PathBuf = match (&args.manifest, &loaded.settings.update_manifest) {
        (Some(p), _) | (None, Some(p)) => p.clone(),
        (None, None) => {
            return Err(UsageError(
                "no manifest: give --manifest FILE or set ARENA_UPDATE_MANIFEST (environment or env file)".into(),
            )
            .into());
        }
    };
    let manifest = Manifest::load(&path).map_err(|e| UsageError(e.to_string()))?;
    let models = manifest.select(&args.ids).map_err(UsageError)?;
    if !nas.is_dir() {
        return Err(UsageError(format!("--nas {}: not a directory", nas.display())).into());
    }
    let settings = Settings::resolve(&loaded.settings).map_err(UsageError)?;
    let updater = Updater::new(nas, settings).map_err(UsageError)?;
    let shown = !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut outcomes = Vec::new();
    for model in models {
        let outcome = match what {
            "check" => updater.check(model),
            "apply" => {
                let b = shown.then(|| {
                    let b = bar();
                    b.set_message(model.id.clone());
                    b
                });
                let mut progress = |done: u64, total: Option<u64>| {
                    if let Some(b) = &b {
                        if let Some(t) = total {
                            b.set_length(t);
                        }
                        b.set_position(done);
                    }
                };
                let o = updater.apply(model, dry_run, &mut progress);
                if let Some(b) = b {
                    b.finish_and_clear();
                }
                o
            }
            "rollback" => updater.rollback(model),
            _ => updater.status(model),
        };
        let v = serde_json::to_value(&outcome)?;
        if !args.json {
            println!("{}", line(&v));
        }
        outcomes.push(v);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcomes)?);
    }
    let failed = outcomes.iter().filter(|o| o["action"] == "failed").count();
    if failed > 0 {
        bail!("{failed} of {} models failed", outcomes.len());
    }
    Ok(())
}

fn via_daemon(socket: &Path, what: &str, dry_run: bool, args: &UpdateArgs) -> Result<()> {
    let status = call(socket, "GET", "/arena/update/status", None)?;
    if what == "status" {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&status)?);
            return Ok(());
        }
        print!("{}", arenafs::ctl::format_update(&status));
        return Ok(());
    }
    let before = status["last"]["run"].as_u64().unwrap_or(0);
    let body = json!({"ids": args.ids, "dry_run": dry_run});
    let started = call(
        socket,
        "POST",
        &format!("/arena/update/{what}"),
        Some(&body),
    )?;
    if what == "apply" && !args.wait {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&started)?);
        } else {
            println!(
                "update apply started ({} models); follow it with `arenafs update status` or `arenafs status --watch`",
                started["started"]["models"].as_array().map_or(0, Vec::len)
            );
        }
        return Ok(());
    }
    let shown = !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let multi = MultiProgress::new();
    let mut bars: std::collections::HashMap<String, ProgressBar> = Default::default();
    loop {
        let st = call(socket, "GET", "/arena/update/status", None)?;
        if st["running"].is_null() && st["last"]["run"].as_u64().unwrap_or(0) > before {
            for b in bars.values() {
                b.finish_and_clear();
            }
            let outcomes = st["last"]["outcomes"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            return finish(&outcomes, args.json);
        }
        if shown {
            for m in st["running"]["models"].as_array().into_iter().flatten() {
                let id = m["id"].as_str().unwrap_or("").to_string();
                if m["state"] != "downloading" && !bars.contains_key(&id) {
                    continue;
                }
                let b = bars.entry(id.clone()).or_insert_with(|| multi.add(bar()));
                b.set_message(format!("{id} {}", m["state"].as_str().unwrap_or("")));
                if let Some(t) = m["total_bytes"].as_u64() {
                    b.set_length(t);
                }
                b.set_position(m["done_bytes"].as_u64().unwrap_or(0));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
