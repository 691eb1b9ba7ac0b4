//! `arenafs trim`: removing copies from the cache by size, age, category or file.

use anyhow::Result;

use super::args::TrimArgs;
use super::control::{call, print_answer, refs};

/// `arenafs trim`.
pub(crate) fn trim(a: TrimArgs) -> Result<()> {
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
