//! arenafs: a FUSE filesystem that presents a NAS model tree unchanged and serves its files from
//! an SSD cache.
//!
//! # Layout
//! - [`source`]: NAS access (stat, open, list) and file identity.
//! - [`config`]: settings from the env file, the environment and options.
//! - [`reload`]: applying changed settings while mounted; eager and allow-list copies.
//! - [`policy`]: which files are cached (category, size floor, excludes, state).
//! - [`cache`]: the SSD cache: layout, index, chunk maps, live copies being filled.
//! - [`worker`]: background completion of copies.
//! - [`vfs`]: the file-system core: every operation of the mount, without the kernel protocol.
//! - [`fs`]: the FUSE adapter (unpacks requests, calls [`vfs`], replies).
//! - [`health`]: whether the NAS is there (offline mode).
//! - [`models`]: model references (`category/file`) and their NAS paths.
//! - [`mount`]: mounting, stale-mount recovery, unmounting.
//! - [`options`]: mount options (`-o`) and their flag twins.
//! - [`daemon`]: runs a mount until it is unmounted.
//! - [`control`]: the control socket (server and client).
//! - [`ctl`]: the control commands of the CLI (finding a daemon, printing its answers).
//! - [`stats`]: counters of a daemon run.
//! - [`workflow`]: which model files a ComfyUI workflow loads (pure, no I/O on the NAS).
//! - [`discover`]: a resolved workflow placed on the NAS, with cache facts.

pub mod cache;
pub mod config;
pub mod control;
pub mod ctl;
pub mod daemon;
pub mod discover;
pub mod envfile;
pub mod fs;
pub mod health;
pub mod httpsrc;
pub mod models;
pub mod mount;
pub mod options;
pub mod policy;
pub mod reload;
pub mod source;
pub mod stats;
pub mod update;
pub mod vfs;
pub mod worker;
pub mod workflow;
