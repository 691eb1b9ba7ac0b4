//! What the control commands share: asking the daemon over its socket, printing its answer (JSON
//! or for people, through [`arenafs::ctl`]), and checking what is sent before sending it.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::UsageError;

/// One request to the daemon's control socket; its JSON answer.
pub(crate) fn call(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    Ok(arenafs::control::client::call(socket, method, path, body)?)
}

/// Prints an answer as pretty JSON with `--json`, else as `human` renders it.
pub(crate) fn print_answer(v: &Value, json: bool, human: fn(&Value) -> String) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        print!("{}", human(v));
    }
}

/// Checks model references here, so that a typo is a usage error (exit 2).
pub(crate) fn refs(models: &[String]) -> Result<Vec<String>> {
    for m in models {
        arenafs::models::parse_path(m).map_err(|e| UsageError(format!("{m}: {e}")))?;
    }
    Ok(models.to_vec())
}

/// Reads a workflow file (JSON or PNG), refusing one larger than a workflow can be.
pub(crate) fn read_workflow(path: &Path) -> Result<Vec<u8>> {
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
