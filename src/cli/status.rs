//! `arenafs status`, `stats` and `reload`: what a running daemon is doing, its counters, and
//! re-reading its env file.

use anyhow::Result;
use arenafs::ctl::{format_stats, format_status, human_bytes, job_line};

use super::args::{StatsArgs, StatusArgs, Target};
use super::control::{call, print_answer};
use super::progress::Bars;

/// `arenafs status`: one summary, or with `--watch` a redraw every `--interval` seconds.
pub(crate) fn status(a: StatusArgs) -> Result<()> {
    let socket = a.target.or_at(a.at).socket()?;
    if !a.watch {
        let st = call(&socket, "GET", "/arena/status", None)?;
        print_answer(&st, a.json, format_status);
        return Ok(());
    }
    let every = std::time::Duration::from_secs_f64(a.interval.clamp(0.1, 3600.0));
    let mut bars = Bars::new();
    loop {
        let st = call(&socket, "GET", "/arena/status", None)?;
        let mut jobs = st["jobs"].as_array().cloned().unwrap_or_default();
        // The updater's downloads get a bar each too.
        for m in st["update"]["running"]["models"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if m["state"] == "downloading" || m["state"] == "waiting_for_readers" {
                jobs.push(serde_json::json!({
                    "path": format!("update {} ({})", m["id"].as_str().unwrap_or("?"), m["state"].as_str().unwrap_or("")),
                    "state": "running",
                    "total_bytes": m["total_bytes"],
                    "done_bytes": m["done_bytes"],
                }));
            }
        }
        if bars.on_terminal() {
            bars.set_header(format!(
                "{}: {} used of {}, {} running, {} queued",
                st["mountpoint"].as_str().unwrap_or("?"),
                human_bytes(st["cache_used_bytes"].as_u64().unwrap_or(0)),
                human_bytes(st["cache_limit_bytes"].as_u64().unwrap_or(0)),
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
                human_bytes(st["cache_used_bytes"].as_u64().unwrap_or(0))
            );
            for j in &jobs {
                println!("  {}", job_line(j));
            }
        }
        std::thread::sleep(every);
    }
}

/// `arenafs stats`.
pub(crate) fn stats(a: StatsArgs) -> Result<()> {
    let socket = a.target.or_at(a.at).socket()?;
    let st = call(&socket, "GET", "/arena/stats", None)?;
    print_answer(&st, a.json, format_stats);
    Ok(())
}

/// `arenafs reload`: prints the settings that changed.
pub(crate) fn reload(t: Target) -> Result<()> {
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
