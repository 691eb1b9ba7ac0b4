//! `arenafs gen-assets DIR`: what a package installs besides the binary (scripts/package puts it
//! in target/deb-assets/ for cargo-deb). Everything is derived from the code so that it cannot
//! drift: the man pages and completions from the clap definition ([`super::args`]), the example
//! env file from the key table ([`config::KEYS`]).

use std::path::Path;

use anyhow::{Context, Result};
use arenafs::config;

use super::args::Cli;

/// Writes into `dir` the man pages (section 8: `arenafs.8` and one per command), the bash, zsh
/// and fish completions, and the example env file (every key, commented out).
pub(crate) fn gen_assets(dir: &Path) -> Result<()> {
    use clap::CommandFactory;
    let man_dir = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man_dir, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(&mut page)?;
    page.extend_from_slice(MAN_EXTRA.as_bytes());
    std::fs::write(man_dir.join("arenafs.8"), page)?;
    write_subcommand_pages(&cmd, &man_dir)?;
    // The completion generators offer hidden commands too: complete the visible ones only.
    let full = Cli::command();
    let mut visible = clap::Command::new("arenafs")
        .version(env!("CARGO_PKG_VERSION"))
        .about(full.get_about().cloned().unwrap_or_default())
        .subcommand_required(true)
        .subcommands(full.get_subcommands().filter(|c| !c.is_hide_set()).cloned());
    for (shell, name) in [
        (clap_complete::Shell::Bash, "arenafs"),
        (clap_complete::Shell::Zsh, "_arenafs"),
        (clap_complete::Shell::Fish, "arenafs.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut visible, "arenafs", &mut out);
        std::fs::write(completions.join(name), out)?;
    }
    std::fs::write(dir.join("arenafs.env"), env_example())?;
    Ok(())
}

/// One page per visible command (`arenafs-mount.8`, `arenafs-config-check.8`, ...).
fn write_subcommand_pages(cmd: &clap::Command, dir: &Path) -> Result<()> {
    for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        let man = clap_mangen::Man::new(sub.clone()).section("8");
        man.generate_to(dir)?;
        write_subcommand_pages(sub, dir)?;
    }
    Ok(())
}

/// Sections of `arenafs(8)` that clap does not produce.
const MAN_EXTRA: &str = r#".SH "MOUNT FORM"
As the helper of
.BR mount (8)
for the type
.BR fuse.arenafs ,
run by
.BR mount.fuse3 (8):
.PP
.RS
.B arenafs
.I NAS MOUNTPOINT
.B \-o
.I OPTIONS
.RE
.PP
is read as
.BR "arenafs mount" .
An fstab line:
.PP
.RS
.nf
/mnt/nas/models /opt/ComfyUI/models fuse.arenafs cache_dir=/ssd/arenafs,env=/etc/arenafs/models.env,allow_other,_netdev,nofail,x\-systemd.requires\-mounts\-for=/mnt/nas/models 0 0
.fi
.RE
.SH SIGNALS
.TP
.B SIGHUP
Re\-read the env file
.RB ( "systemctl reload" ).
The mount stays.
.TP
.BR SIGTERM ", " SIGINT
Unmount and exit.
.SH ENVIRONMENT
.TP
.B ARENA_*
Every setting of the env file; wins over the file.
.TP
.B ARENA_ENV_FILE
The env file when no
.B \-\-env
is given.
.TP
.B RUST_LOG
Log filter (for example
.BR arenafs=debug );
wins over
.BR ARENA_CACHE_VERBOSE .
.TP
.B NOTIFY_SOCKET
Set by systemd for
.BR Type=notify :
the daemon sends READY=1 once the mount is usable, RELOADING=1 and READY=1 around a reload,
STOPPING=1 when it unmounts.
.SH FILES
.TP
.I /etc/arenafs/arenafs.env
Default env file (every key, commented out).
.TP
.I /run/arenafs/<escaped mount point>.sock
Control socket.
.TP
.I /var/log/arenafs/<escaped mount point>.log
Log of a daemon started without
.BR \-\-foreground .
.TP
.I /usr/lib/systemd/system/arenafs@.service
systemd unit; the instance is the escaped mount point.
.TP
.I /usr/share/doc/arenafs/
Installation, configuration, troubleshooting, semantics, migration from the Arena AutoCache node.
.SH "SEE ALSO"
.BR mount.fuse3 (8),
.BR fstab (5),
.BR systemd.mount (5),
.BR systemd-escape (1)
"#;

/// The example env file: every key of [`config::KEYS`], commented out at its default (or at an
/// example value when the default is not a value), with what it does.
fn env_example() -> String {
    let mut out = String::from(
        "# arenafs settings: an env file (KEY=value, # comments, optional `export` and quotes).\n\
         # Every key is listed, commented out at its default; uncomment what you change.\n\
         # Precedence: this file < ARENA_* variables in the daemon's environment < -o options\n\
         # and flags. The file is re-read when it changes (and on SIGHUP / systemctl reload);\n\
         # ARENA_NAS_ROOT and ARENA_CACHE_ROOT apply at the next mount.\n\
         # Check it with: arenafs config check FILE\n\
         # Generated from the code (arenafs gen-assets); docs: /usr/share/doc/arenafs/docs/configuration.md\n",
    );
    for k in config::KEYS {
        out.push('\n');
        let mut line = String::new();
        for word in k.doc.split_whitespace() {
            if !line.is_empty() && line.len() + word.len() + 1 > 96 {
                out.push_str(&format!("# {line}\n"));
                line.clear();
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        out.push_str(&format!("# {line}\n"));
        let opts = std::iter::once(k.opt)
            .chain(k.aliases.iter().copied())
            .map(|o| format!("{o}="))
            .collect::<Vec<_>>()
            .join(", ");
        let usable_default = !k.default.is_empty() && !k.default.contains(' ');
        if usable_default {
            out.push_str(&format!("# -o {opts}\n#{}={}\n", k.env, k.default));
        } else {
            let default = if k.default.is_empty() {
                "unset"
            } else {
                k.default
            };
            // A value with spaces is quoted, as env files need it.
            let example = if k.example.contains(' ') {
                format!("\"{}\"", k.example)
            } else {
                k.example.to_string()
            };
            out.push_str(&format!(
                "# -o {opts}; default: {default}; for example:\n#{}={example}\n",
                k.env
            ));
        }
    }
    out
}
