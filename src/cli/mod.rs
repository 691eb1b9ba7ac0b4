//! The commands of the `arenafs` binary; `main.rs` parses the command line and dispatches here.
//!
//! # Layout
//! - [`args`]: the clap definition of every command and flag; the `mount.fuse3` argument form.
//! - [`logging`]: tracing to stderr, with syslog priorities when stderr is the journal.
//! - [`mount`]: `mount` (foreground, or a detached daemon waited for) and `unmount`.
//! - [`control`]: what the control commands share (requests to the daemon, printing answers).
//! - [`status`]: `status` (`--watch`), `stats`, `reload`.
//! - [`prefetch`], [`resolve`], [`trim`]: the commands of those names.
//! - [`progress`]: progress bars of running copies.
//! - [`adopt`]: taking over the Arena AutoCache node's copies.
//! - [`config`]: `config check`.
//! - [`update`]: `update check|apply|rollback|status` (the model updater, [`arenafs::update`]).
//! - [`assets`]: `gen-assets` (man pages, completions, example env file for packages).
//! - [`bench`]: `gen-index` (synthetic index entries for the scale benchmark).

pub(crate) mod adopt;
pub(crate) mod args;
pub(crate) mod assets;
pub(crate) mod bench;
pub(crate) mod config;
pub(crate) mod control;
pub(crate) mod logging;
pub(crate) mod mount;
pub(crate) mod prefetch;
pub(crate) mod progress;
pub(crate) mod resolve;
pub(crate) mod status;
pub(crate) mod trim;
pub(crate) mod update;

/// A mistake in the command line: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub(crate) String);
