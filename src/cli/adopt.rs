//! `arenafs adopt`: taking over the copies of the Arena AutoCache node ([`arenafs::cache::adopt`])
//! while no daemon uses the cache.

use anyhow::{Context, Result};
use arenafs::config;

use super::UsageError;
use super::args::AdoptArgs;

/// `arenafs adopt OLD_ROOT`: prints one line per old file and a summary (or the JSON report).
pub(crate) fn adopt(a: AdoptArgs) -> Result<()> {
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
        loaded.settings.identity,
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
    let how = if a.dry_run {
        String::new()
    } else {
        format!(": {} reflinked, {} copied", report.reflinked, report.copied)
    };
    println!(
        "{} {} copies ({}){how}; the old files are left in place",
        if a.dry_run { "would adopt" } else { "adopted" },
        report.adopted,
        arenafs::ctl::human_bytes(report.adopted_bytes),
    );
    Ok(())
}
