//! The command line without a mount: `config check`, usage errors.

use std::process::Command;

use crate::util::BIN;

fn run(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("ARENA_ENV_FILE");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_check_reports_sources_and_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("arena_autocache.env");
    std::fs::write(
        &env,
        format!(
            "ARENA_CACHE_ROOT={}\nARENA_AUTOCACHE_AUTOPATCH=0\nARENA_CACHE_MAX_GB=ten\n",
            dir.path().join("cache").display()
        ),
    )
    .unwrap();
    let (code, out, _) = run(
        &["config", "check", env.to_str().unwrap()],
        &[("ARENA_CACHE_COOLDOWN_MS", "100")],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("state: Green"), "{out}");
    assert!(out.contains(&format!("({}:2)", env.display())), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("ARENA_CACHE_COOLDOWN_MS") && l.ends_with("(environment)"))
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("ARENA_CACHE_MAX_GB") && l.contains("(default)"))
    );
    assert!(
        out.contains(&format!(
            "warning: {}:3: ARENA_CACHE_MAX_GB: 'ten'",
            env.display()
        )),
        "{out}"
    );
    assert!(out.contains("ok: 1 warning(s)"));
}

#[test]
fn config_check_fails_only_when_it_cannot_work() {
    let (code, _, err) = run(&["config", "check", "/nonexistent/arena.env"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("env file /nonexistent/arena.env"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("a.env");
    std::fs::write(&env, "ARENA_CACHE_MIN_SIZE_MB=1\n").unwrap();
    let (code, _, err) = run(&["config", "check", env.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "no cache directory");
    assert!(err.contains("no cache directory"), "{err}");
    let plain = dir.path().join("plain");
    std::fs::write(&plain, "x").unwrap();
    std::fs::write(&env, format!("ARENA_CACHE_ROOT={}\n", plain.display())).unwrap();
    let (code, _, err) = run(&["config", "check", env.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("not usable"), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, _) = run(&["mount"], &[]);
    assert_eq!(code, 2);
    let (code, _, _) = run(&["frobnicate", "--nope"], &[]);
    assert_eq!(code, 2);
    let (code, out, _) = run(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(out.starts_with("arenafs "));
}

#[test]
fn nodefault_permissions_needs_noallow_other() {
    let dir = tempfile::tempdir().unwrap();
    let (nas, mnt, cache) = (
        dir.path().join("nas"),
        dir.path().join("mnt"),
        dir.path().join("cache"),
    );
    let args = |opts: &'static str| {
        let mut a: Vec<String> = ["mount", "--foreground", "-o", opts, "--cache-dir"]
            .map(String::from)
            .to_vec();
        for p in [&cache, &nas, &mnt] {
            a.push(p.display().to_string());
        }
        a
    };
    for opts in ["nodefault_permissions", "allow_other,nodefault_permissions"] {
        let a = args(opts);
        let (code, _, err) = run(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
        assert_eq!(code, 1, "{opts}: {err}");
        assert!(
            err.contains("nodefault_permissions needs noallow_other"),
            "{opts}: {err}"
        );
    }
    // Allowed with noallow_other: it goes on, here to the missing NAS directory.
    let a = args("noallow_other,nodefault_permissions");
    let (code, _, err) = run(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("NAS directory"), "{err}");
}
