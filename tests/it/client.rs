//! Real clients: python `safetensors` (numpy, which mmaps the file) and `gguf` (`GGUFReader`, a
//! shared `numpy.memmap`) read model files through the mount, cold and then from complete SSD
//! copies, and get the same tensors and metadata as from the NAS (tests/python/read_models.py).

use std::path::Path;
use std::process::Command;

use crate::util::{Dirs, require_mount};

/// The venv that `scripts/install-deps` makes with pinned numpy, safetensors and gguf.
const VENV_PYTHON: &str = "/var/tmp/arenafs-venv/bin/python";
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/read_models.py");

/// The venv's python, if it is there. Under `CI=true` a missing venv is a failure.
fn venv_python() -> Option<&'static Path> {
    let py = Path::new(VENV_PYTHON);
    if py.exists() {
        return Some(py);
    }
    let why = format!("{VENV_PYTHON} is missing (scripts/install-deps creates it)");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}");
    }
    eprintln!("skipping: {why}");
    None
}

/// Runs `read_models.py` with `args` and returns its stdout, failing the test with its output if it
/// does not exit 0 (a SIGBUS from a failed mmap read shows as a signal, with a traceback).
fn read_models(py: &Path, args: &[&Path]) -> String {
    let out = Command::new(py)
        .args(["-X", "faulthandler", SCRIPT])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{py:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "read_models.py {args:?}: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn python_safetensors_and_gguf_read_through_the_mount() {
    require_mount!();
    let Some(py) = venv_python() else {
        return;
    };
    let d = Dirs::new();
    let made = read_models(py, &[Path::new("make"), &d.nas]);
    let files: Vec<&Path> = made.lines().map(Path::new).collect();
    assert!(files.len() >= 4, "make wrote {files:?}");
    let compare = |mnt: &Path| {
        let mut args = vec![Path::new("compare"), &d.nas, mnt];
        args.extend(&files);
        let out = read_models(py, &args);
        eprint!("{out}");
    };

    let m = d.mount(&["min_size_mb=0"]);
    // Cold: the loaders' mmap reads fill the copies while the worker completes them.
    compare(&m.mnt);
    let cold = m.stats();
    assert!(
        cold.opens_filling >= files.len() as u64,
        "cold opens fill the cache: {cold:?}"
    );
    m.wait_copies(files.len() as u64);

    // Warm: every file is a complete copy, served without the NAS.
    let before = m.stats();
    compare(&m.mnt);
    let after = m.stats();
    let from_cache = |s: &arenafs::stats::StatsSnapshot| s.opens_passthrough + s.opens_ssd;
    assert!(
        from_cache(&after) - from_cache(&before) >= files.len() as u64,
        "warm opens are served from the SSD copies: {after:?}"
    );
    assert_eq!(
        after.opens_filling, before.opens_filling,
        "no warm open refills: {after:?}"
    );
    assert_eq!(
        after.bytes_fetched, before.bytes_fetched,
        "warm reads fetch nothing from the NAS: {after:?}"
    );
    assert_eq!(after.read_errors, 0, "{after:?}");
}
