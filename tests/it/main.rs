//! Mount-level tests: each mounts arenafs for real over a temporary NAS directory and reads
//! through the kernel with ordinary system calls and tools.

mod adopt;
mod cli;
mod client;
mod comfyui;
mod conformance;
mod control;
mod crash;
mod data;
mod deploy;
mod discovery;
mod farm;
mod faultnas;
mod faults;
mod fsx;
mod hang;
mod lifecycle;
mod offline;
mod package;
mod policy;
mod update;
mod util;
mod write;
