//! `arenafs config`: the configuration as the daemon would read it.

use std::path::PathBuf;

use anyhow::{Result, bail};
use arenafs::config;

/// `arenafs config check [FILE]`: the settings in force, where each came from, every warning;
/// fails only when the file cannot be read or the settings cannot work (no usable cache directory).
pub(crate) fn check(file: Option<PathBuf>) -> Result<()> {
    let loaded = config::load(&config::Inputs::from_process(file, Vec::new()))?;
    match &loaded.env_file {
        Some(p) => println!("env file: {}", p.display()),
        None => println!("env file: none (built-in defaults and the environment)"),
    }
    let s = &loaded.settings;
    println!("state: {:?}", s.state());
    for k in config::KEYS {
        println!(
            "{:32} = {:40} ({})",
            k.env,
            config::display_value(s, k.env),
            loaded.source_of(k.env)
        );
    }
    for w in &loaded.warnings {
        println!("warning: {w}");
    }
    match &s.cache_dir {
        None => bail!("no cache directory: set ARENA_CACHE_ROOT (or give --cache-dir)"),
        Some(dir) => {
            let usable = if dir.exists() {
                dir.is_dir()
                    && nix::unistd::access(
                        dir,
                        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
                    )
                    .is_ok()
            } else {
                // Creatable when its nearest existing ancestor is a writable directory.
                dir.ancestors().find(|a| a.exists()).is_some_and(|a| {
                    a.is_dir() && nix::unistd::access(a, nix::unistd::AccessFlags::W_OK).is_ok()
                })
            };
            if !usable {
                bail!(
                    "cache directory {} is not usable (not a writable directory)",
                    dir.display()
                );
            }
        }
    }
    println!("ok: {} warning(s)", loaded.warnings.len());
    Ok(())
}
