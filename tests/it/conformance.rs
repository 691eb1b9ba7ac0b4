//! The POSIX suite `pjdfstest` (Rust edition, crates.io 0.2.2) against a mount, with
//! `allow_other` and `default_permissions` (the defaults). Goal and result: 0 failures.

use std::process::Command;

use crate::util::{Dirs, require_mount};

/// `pjdfstest` from PATH, else from cargo's bin directory (where scripts/install-deps puts it).
fn pjdfstest() -> Option<std::path::PathBuf> {
    let in_path = Command::new("pjdfstest").arg("--version").output();
    if in_path.is_ok_and(|o| o.status.success()) {
        return Some("pjdfstest".into());
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo")))?;
    let p = home.join("bin/pjdfstest");
    p.exists().then_some(p)
}

#[test]
fn pjdfstest_passes() {
    require_mount!();
    let Some(bin) = pjdfstest() else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "pjdfstest is missing; scripts/install-deps installs it"
        );
        eprintln!("skipping: pjdfstest not installed (scripts/install-deps installs it)");
        return;
    };
    let d = Dirs::new();
    // The suite creates files as other users in the mount's root.
    std::fs::set_permissions(&d.nas, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let secondary = tempfile::Builder::new()
        .prefix("arenafs-pjdfstest-second")
        .tempdir_in("/var/tmp")
        .unwrap();
    let m = d.mount(&[]);
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/conformance/pjdfstest.toml"
    );
    let out = Command::new(&bin)
        .args(["-c", config, "-p"])
        .arg(&m.mnt)
        .arg("-s")
        .arg(secondary.path())
        .current_dir(&m.mnt)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or_else(|| {
            panic!(
                "no summary from pjdfstest:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    eprintln!("pjdfstest: {summary}");
    let failed: Vec<&str> = stdout.lines().filter(|l| l.contains("FAILED")).collect();
    assert!(
        summary.starts_with("Summary: 0 failed"),
        "{summary}\n{}\n--- daemon log ---\n{}",
        failed.join("\n"),
        m.log()
    );
    assert!(out.status.success(), "{summary}");
}
