//! `arenafs resolve`: what caching some models would mean (a dry run), named one by one or as
//! the models a workflow loads.

use anyhow::{Context, Result};
use arenafs::ctl::{format_models, format_workflow};
use serde_json::Value;

use super::args::ResolveArgs;
use super::control::{call, print_answer, read_workflow, refs};

/// `arenafs resolve`.
pub(crate) fn resolve(a: ResolveArgs) -> Result<()> {
    if a.workflow.is_some() {
        return resolve_workflow(a);
    }
    let socket = a.target.socket()?;
    let body = serde_json::json!({ "models": refs(&a.models)? });
    let answer = call(&socket, "POST", "/arena/resolve", Some(&body))?;
    print_answer(&answer, a.json, format_models);
    Ok(())
}

/// `resolve --workflow`: asks the daemon when one is named (it knows the cache); otherwise
/// resolves here, against `--nas` or the mount point if given, else only parses.
fn resolve_workflow(a: ResolveArgs) -> Result<()> {
    let file = a.workflow.as_deref().expect("checked by the caller");
    let print = |v: &Value| print_answer(v, a.json, format_workflow);
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
