//! Changing settings in the env file while the daemon runs (`POST /arena/settings`): the lines of
//! the changed keys are rewritten in place, everything else (comments, unknown keys, blank lines,
//! their order) is kept, and the file is replaced atomically with its owner and mode.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::config::find_key;

/// `text` with `KEY=value` for each of `changes` (env names): every line that sets the key (by
/// any of its names) is replaced; a key set nowhere is appended.
pub fn edit(text: &str, changes: &[(&'static str, String)]) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    let mut written = vec![false; changes.len()];
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        let change = line_key(body)
            .and_then(|k| find_key(&k))
            .and_then(|def| changes.iter().position(|(env, _)| *env == def.env));
        match change {
            Some(i) => {
                out.push_str(&assignment(changes[i].0, &changes[i].1));
                out.push('\n');
                written[i] = true;
            }
            None => out.push_str(line),
        }
    }
    for (i, (env, value)) in changes.iter().enumerate() {
        if !written[i] {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&assignment(env, value));
            out.push('\n');
        }
    }
    out
}

/// The key a line sets, if it is an assignment (`KEY=...`, `export KEY=...`).
fn line_key(line: &str) -> Option<String> {
    let t = line.trim_start();
    if t.is_empty() || t.starts_with('#') {
        return None;
    }
    let t = t.strip_prefix("export ").unwrap_or(t).trim_start();
    let (k, _) = t.split_once('=')?;
    let k = k.trim();
    (!k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')).then(|| k.into())
}

/// `KEY=value`, the value double-quoted when it holds anything but plain characters.
fn assignment(env: &str, value: &str) -> String {
    let plain = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.,:/+-@%".contains(&b));
    if plain {
        format!("{env}={value}")
    } else {
        let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
        format!("{env}=\"{escaped}\"")
    }
}

/// Whether the daemon could replace `path` (the file and its directory are writable).
pub fn writable(path: &Path) -> bool {
    let ok = |p: &Path| nix::unistd::access(p, nix::unistd::AccessFlags::W_OK).is_ok();
    ok(path) && path.parent().is_some_and(ok)
}

/// Replaces `path` with `text` atomically (a file beside it, made durable, then renamed over it),
/// keeping the owner and mode of the file it replaces.
pub fn replace(path: &Path, text: &str) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let md = fs::metadata(path)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.arenafs-{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        // Owner first (a chown clears set-id bits), then the mode; a daemon that may not give
        // the file away leaves it its own.
        let _ = std::os::unix::fs::fchown(&f, Some(md.uid()), Some(md.gid()));
        f.set_permissions(fs::Permissions::from_mode(md.mode() & 0o7777))?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_keep_everything_else() {
        let text = "# Arena settings\n\
                    ARENA_CACHE_DISCOVERY=workflow_only   # inline\n\
                    SOMETHING_ELSE=1\n\
                    \n\
                    export ARENA_CACHE_MAX_CONCURRENCY=\"2\"\n\
                    # ARENA_AUTO_CACHE_ENABLED=0\n\
                    ARENA_CACHE_DISCOVERY=workflow_only";
        let out = edit(
            text,
            &[
                ("ARENA_CACHE_DISCOVERY", "manual_only".into()),
                ("ARENA_CACHE_MAX_CONCURRENCY", "4".into()),
                ("ARENA_AUTO_CACHE_ENABLED", "0".into()),
                ("ARENA_CACHE_EXCLUDE", "a b/*.ckpt,\"x\"".into()),
            ],
        );
        assert_eq!(
            out,
            "# Arena settings\n\
             ARENA_CACHE_DISCOVERY=manual_only\n\
             SOMETHING_ELSE=1\n\
             \n\
             ARENA_CACHE_MAX_CONCURRENCY=4\n\
             # ARENA_AUTO_CACHE_ENABLED=0\n\
             ARENA_CACHE_DISCOVERY=manual_only\n\
             ARENA_AUTO_CACHE_ENABLED=0\n\
             ARENA_CACHE_EXCLUDE=\"a b/*.ckpt,\\\"x\\\"\"\n"
        );
        // What is written reads back as the value given.
        let last = out.lines().last().unwrap();
        let (k, v) = dotenvy::from_read_iter(last.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(
            (k.as_str(), v.as_str()),
            ("ARENA_CACHE_EXCLUDE", "a b/*.ckpt,\"x\"")
        );
    }

    #[test]
    fn a_key_is_found_by_any_of_its_names() {
        let out = edit("cache_dir=/x\n", &[("ARENA_CACHE_ROOT", "/y".into())]);
        assert_eq!(out, "ARENA_CACHE_ROOT=/y\n");
        assert_eq!(
            edit("", &[("ARENA_CACHE_VERBOSE", "1".into())]),
            "ARENA_CACHE_VERBOSE=1\n"
        );
    }

    #[test]
    fn replace_keeps_the_mode_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("arena.env");
        fs::write(&p, "A=1\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        replace(&p, "A=2\n").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "A=2\n");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o640);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(writable(&p));
    }
}
