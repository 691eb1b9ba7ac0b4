//! `arenafs prefetch`: queuing copies of models (named, or those a workflow loads) and, with
//! `--wait`, following them to the end.

use std::collections::HashSet;

use anyhow::{Result, bail};
use arenafs::ctl::{format_models, format_workflow};
use serde_json::Value;

use super::args::PrefetchArgs;
use super::control::{call, print_answer, read_workflow, refs};
use super::progress::Bars;

/// `arenafs prefetch`; with `--wait`, shows the copies' progress until they end and then what
/// the cache holds (exit 1 when a copy did not complete).
pub(crate) fn prefetch(a: PrefetchArgs) -> Result<()> {
    let socket = a.target.socket()?;
    let (answer, again): (Value, Box<dyn Fn() -> Result<Value>>) = match &a.workflow {
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
    let human: fn(&Value) -> String = if a.workflow.is_some() {
        format_workflow
    } else {
        format_models
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
    let mut waiting: HashSet<String> = answer["models"]
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
        let jobs: Vec<Value> = jobs["jobs"]
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
