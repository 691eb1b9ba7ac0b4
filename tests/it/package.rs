//! Packaging: the files a package installs besides the binary are generated from the code
//! (`arenafs gen-assets`: man pages from the clap definition, completions, the example env file
//! from the key table), and the Debian package is built with cargo-deb, listed and unpacked with
//! `dpkg-deb`, and its binary run, without installing anything.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

use crate::util::BIN;

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn check(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn gen_assets(dir: &Path) {
    check(
        &Command::new(BIN)
            .arg("gen-assets")
            .arg(dir)
            .output()
            .unwrap(),
        "arenafs gen-assets",
    );
}

fn load(file: &Path) -> arenafs::config::Loaded {
    arenafs::config::load(&arenafs::config::Inputs {
        env_file: Some(file.to_path_buf()),
        environment: Vec::new(),
        options: Vec::new(),
    })
    .unwrap()
}

/// packaging/arenafs.env (installed as /etc/arenafs/arenafs.env) is what `gen-assets` writes
/// from `config::KEYS`; regenerate it with `UPDATE_PACKAGING=1 cargo test --test it package::`.
#[test]
fn env_example_is_generated_from_the_key_table() {
    let tmp = tempfile::tempdir().unwrap();
    gen_assets(tmp.path());
    let generated = fs::read_to_string(tmp.path().join("arenafs.env")).unwrap();
    let committed_path = manifest_dir().join("packaging/arenafs.env");
    let committed = fs::read_to_string(&committed_path).unwrap_or_default();
    if committed != generated {
        if std::env::var("UPDATE_PACKAGING").is_ok() {
            fs::write(&committed_path, &generated).unwrap();
        } else {
            panic!(
                "packaging/arenafs.env is out of date: run UPDATE_PACKAGING=1 cargo test --test it package::"
            );
        }
    }

    // Every key once, commented out.
    for k in arenafs::config::KEYS {
        let lines = generated
            .lines()
            .filter(|l| l.starts_with(&format!("#{}=", k.env)))
            .count();
        assert_eq!(lines, 1, "{} in the example", k.env);
    }
    assert!(
        generated
            .lines()
            .all(|l| l.is_empty() || l.starts_with('#')),
        "everything is commented out"
    );
    // As installed it changes nothing: the settings are the defaults, without a warning.
    let empty = tmp.path().join("empty.env");
    fs::write(&empty, "").unwrap();
    let as_installed = load(&committed_path);
    assert!(
        as_installed.warnings.is_empty(),
        "{:?}",
        as_installed.warnings
    );
    assert_eq!(as_installed.settings, load(&empty).settings);
    // Every value shown is valid: uncommented, the file loads without a warning.
    let uncommented: String = generated
        .lines()
        .map(|l| match l.strip_prefix("#ARENA_") {
            Some(rest) => format!("ARENA_{rest}\n"),
            None => format!("{l}\n"),
        })
        .collect();
    let all = tmp.path().join("all.env");
    fs::write(&all, uncommented).unwrap();
    let loaded = load(&all);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

/// The visible commands of the CLI, from `arenafs --help`.
fn commands() -> Vec<String> {
    let help = check(
        &Command::new(BIN).arg("--help").output().unwrap(),
        "arenafs --help",
    );
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn man_pages_and_completions_come_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    gen_assets(tmp.path());
    let man = tmp.path().join("man");
    let page = fs::read_to_string(man.join("arenafs.8")).unwrap();
    assert!(page.contains("\n.TH arenafs 8 "), "{}", &page[..200]);
    for section in [
        "SUBCOMMANDS",
        "SIGNALS",
        "ENVIRONMENT",
        "FILES",
        "\"SEE ALSO\"",
    ] {
        assert!(page.contains(&format!(".SH {section}")), "{section}");
    }
    let commands = commands();
    assert!(commands.len() >= 10, "{commands:?}");
    for c in &commands {
        assert!(
            man.join(format!("arenafs-{c}.8")).exists(),
            "man page of {c}"
        );
        assert!(page.contains(&format!("arenafs\\-{c}(8)")), "{c} listed");
    }
    assert!(!man.join("arenafs-gen-assets.8").exists(), "hidden command");
    let mount = fs::read_to_string(man.join("arenafs-mount.8")).unwrap();
    assert!(mount.contains("cache\\-dir"));

    let completions = tmp.path().join("completions");
    let bash = completions.join("arenafs");
    check(
        &Command::new("bash").arg("-n").arg(&bash).output().unwrap(),
        "bash -n on the completion",
    );
    let bash = fs::read_to_string(bash).unwrap();
    assert!(bash.contains("--cache-dir") && bash.contains("prefetch"));
    assert!(!bash.contains("gen-assets"), "hidden command completed");
    for f in ["_arenafs", "arenafs.fish"] {
        let text = fs::read_to_string(completions.join(f)).unwrap();
        assert!(text.contains("cache-dir"), "{f}");
    }
}

fn has_cargo_deb() -> bool {
    Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds the .deb from the binary this test run already built (no second, release build: see
/// below), lists it, reads its control files, unpacks it into a temporary root and runs the
/// unpacked binary. scripts/package does the same with a release binary.
#[test]
fn deb_package_builds_and_unpacks() {
    if !has_cargo_deb() {
        // scripts/install-deps installs it (scripts/install-cargo-deb, pinned).
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "cargo-deb missing under CI=true (scripts/install-deps installs it)"
        );
        eprintln!("skipping: cargo-deb missing (scripts/install-cargo-deb)");
        return;
    }
    let start = Instant::now();
    // cargo-deb packages `target/release/arenafs` from the target dir it is given: a scratch
    // one holding this run's binary. Building a release binary here would take minutes;
    // `--strip` keeps the debug build's symbols out (the real package keeps line tables, as
    // the release profile asks), `--fast` compresses lightly.
    let scratch = tempfile::tempdir().unwrap();
    let target = scratch.path().join("target");
    fs::create_dir_all(target.join("release")).unwrap();
    fs::copy(BIN, target.join("release/arenafs")).unwrap();
    // Cargo.toml names the generated assets under target/deb-assets/ in the source tree.
    let assets = manifest_dir().join("target/deb-assets");
    let _ = fs::remove_dir_all(&assets);
    gen_assets(&assets);
    let deb = scratch.path().join("arenafs.deb");
    let out = Command::new("cargo")
        .args(["deb", "--no-build", "--locked", "--strip", "--fast", "-o"])
        .arg(&deb)
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(manifest_dir())
        .output()
        .unwrap();
    check(&out, "cargo deb");
    let built = start.elapsed();

    let contents = check(
        &Command::new("dpkg-deb")
            .arg("--contents")
            .arg(&deb)
            .output()
            .unwrap(),
        "dpkg-deb --contents",
    );
    let paths: Vec<&str> = contents
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    let mut expected: Vec<String> = [
        "./usr/bin/arenafs",
        "./usr/lib/systemd/system/arenafs@.service",
        "./etc/arenafs/arenafs.env",
        "./usr/share/man/man8/arenafs.8.gz",
        "./usr/share/bash-completion/completions/arenafs",
        "./usr/share/zsh/vendor-completions/_arenafs",
        "./usr/share/fish/vendor_completions.d/arenafs.fish",
        "./usr/share/doc/arenafs/README.md",
        "./usr/share/doc/arenafs/copyright",
        "./usr/share/doc/arenafs/docs/deployment.md",
        "./usr/share/doc/arenafs/docs/troubleshooting.md",
        "./usr/share/doc/arenafs/docs/SEMANTICS.md",
        "./usr/share/doc/arenafs/docs/migration.md",
        "./usr/share/doc/arenafs/docs/configuration.md",
        "./usr/share/doc/arenafs/examples/opt-ComfyUI-models.mount",
        "./usr/share/doc/arenafs/examples/requires-nas.conf",
    ]
    .iter()
    .map(|p| p.to_string())
    .collect();
    expected.extend(
        commands()
            .iter()
            .map(|c| format!("./usr/share/man/man8/arenafs-{c}.8.gz")),
    );
    for p in &expected {
        assert!(
            paths.contains(&p.as_str()),
            "{p} in the package:\n{contents}"
        );
    }
    let binary = contents
        .lines()
        .find(|l| l.ends_with(" ./usr/bin/arenafs"))
        .unwrap();
    assert!(binary.starts_with("-rwxr-xr-x 0/0 "), "{binary}");

    let field = |name: &str| {
        check(
            &Command::new("dpkg-deb")
                .arg("--field")
                .arg(&deb)
                .arg(name)
                .output()
                .unwrap(),
            "dpkg-deb --field",
        )
        .trim()
        .to_string()
    };
    assert_eq!(field("Package"), "arenafs");
    assert!(
        field("Version").starts_with(env!("CARGO_PKG_VERSION")),
        "{}",
        field("Version")
    );
    let depends = field("Depends");
    assert!(
        depends.contains("fuse3") && depends.contains("libc6"),
        "{depends}"
    );

    let control = scratch.path().join("control");
    check(
        &Command::new("dpkg-deb")
            .arg("-e")
            .arg(&deb)
            .arg(&control)
            .output()
            .unwrap(),
        "dpkg-deb -e",
    );
    assert_eq!(
        fs::read_to_string(control.join("conffiles"))
            .unwrap()
            .trim(),
        "/etc/arenafs/arenafs.env"
    );
    for script in ["postinst", "postrm"] {
        check(
            &Command::new("sh")
                .arg("-n")
                .arg(control.join(script))
                .output()
                .unwrap(),
            &format!("sh -n {script}"),
        );
    }

    let root = scratch.path().join("root");
    check(
        &Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&root)
            .output()
            .unwrap(),
        "dpkg-deb -x",
    );
    let version = check(
        &Command::new(root.join("usr/bin/arenafs"))
            .arg("--version")
            .output()
            .unwrap(),
        "unpacked arenafs --version",
    );
    assert_eq!(
        version.trim(),
        format!("arenafs {}", env!("CARGO_PKG_VERSION"))
    );
    let same = |packaged: &str, repo: &str| {
        assert_eq!(
            fs::read(root.join(packaged)).unwrap(),
            fs::read(manifest_dir().join(repo)).unwrap(),
            "{packaged}"
        );
    };
    same(
        "usr/lib/systemd/system/arenafs@.service",
        "systemd/arenafs@.service",
    );
    same("etc/arenafs/arenafs.env", "packaging/arenafs.env");
    same(
        "usr/share/doc/arenafs/docs/SEMANTICS.md",
        "docs/SEMANTICS.md",
    );
    eprintln!(
        "package test: cargo deb {:.1} s, total {:.1} s, .deb {} KiB",
        built.as_secs_f64(),
        start.elapsed().as_secs_f64(),
        fs::metadata(&deb).unwrap().len() / 1024
    );
}
