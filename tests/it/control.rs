//! The control API and the CLI commands that use it, against a mounted daemon: every endpoint,
//! every error code and refusal, socket permissions, the TCP listener, and a daemon that keeps
//! serving after a flood of malformed requests.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use arenafs::control::client::{self, ClientError};
use serde_json::{Value, json};

use crate::util::{BIN, CHUNK, Dirs, LoopDirs, Mounted, random_bytes, require_mount, wait_for};

/// Runs the CLI; returns (exit code, stdout, stderr).
fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn post(m: &Mounted, path: &str, body: Value) -> Result<Value, ClientError> {
    client::call(&m.socket, "POST", path, Some(&body))
}

fn api_err(r: Result<Value, ClientError>) -> (u16, String, Value) {
    match r {
        Err(ClientError::Api {
            status, code, body, ..
        }) => (status, code, body),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Sends raw bytes on a fresh connection and returns what came back (possibly nothing). With
/// `hang_up`, the write side is closed after the bytes (a client that gave up mid-request);
/// otherwise the request must be complete and ask for `Connection: close`.
fn raw_ex(socket: &Path, bytes: &[u8], hang_up: bool) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    if hang_up {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A POST request with `body` and a correct Content-Length.
fn post_raw(path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn raw(socket: &Path, bytes: &[u8]) -> String {
    raw_ex(socket, bytes, false)
}

fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or("")
}

fn sock(m: &Mounted) -> &str {
    m.socket.to_str().unwrap()
}

#[test]
fn status_resolve_and_the_cli_summary() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("loras/big.safetensors", 16 * CHUNK as usize, 1);
    d.nas_file("loras/small.safetensors", 1000, 2);
    d.nas_file("clip/t5.safetensors", CHUNK as usize, 3);
    d.nas_file("ultralytics/det.pt", CHUNK as usize, 4);
    let m = d.mount(&["min_size_mb=1", "cache_max_concurrency=3"]);

    // The socket: mode 0660, owned by the daemon's user.
    let md = fs::metadata(&m.socket).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o660);

    let st = m.status();
    for (k, v) in [
        ("status", json!("success")),
        ("enabled", json!(true)),
        ("cache_state", json!("red")),
        ("discovery_mode", json!("workflow_only")),
        ("prefetch_strategy", json!("lazy")),
        ("max_concurrency", json!(3)),
        ("required_models_count", json!(0)),
        ("session_bytes_downloaded", json!(0)),
        ("offline", json!(false)),
        ("queue_length", json!(0)),
    ] {
        assert_eq!(st[k], v, "{k} in {st}");
    }
    assert_eq!(st["autopatch_status"]["state"], "idle");
    assert_eq!(st["mountpoint"], json!(m.mnt));
    assert!(st["cache_limit_bytes"].as_u64().unwrap() > 0);
    assert!(st["passthrough_available"].is_boolean());

    // Resolve: a dry run, one answer per model, in the order asked.
    let r = post(
        &m,
        "/arena/resolve",
        json!({"models": [
            {"category": "loras", "filename": "big.safetensors"},
            "loras/small.safetensors",
            {"category": "text_encoders", "filename": "t5.safetensors"},
            "ultralytics/det.pt",
            "vae/nothing.safetensors",
            "loras/big.safetensors",
        ]}),
    )
    .unwrap();
    let models = r["models"].as_array().unwrap();
    assert_eq!(models.len(), 5, "duplicates merged: {r}");
    let pick = |i: usize, k: &str| models[i][k].clone();
    assert_eq!(pick(0, "status"), "found");
    assert_eq!(pick(0, "size"), 16 * CHUNK);
    assert_eq!(pick(0, "cached"), "none");
    assert_eq!(pick(0, "copy"), true);
    assert_eq!(pick(1, "reason"), "too_small");
    assert_eq!(pick(2, "path"), "clip/t5.safetensors", "the legacy folder");
    assert_eq!(pick(2, "reason"), "queued");
    assert_eq!(pick(3, "reason"), "category_not_allowed");
    assert_eq!(pick(4, "status"), "not_found");
    let t = &r["totals"];
    assert_eq!(t["found"], 4);
    assert_eq!(t["not_found"], 1);
    assert_eq!(t["to_fetch_bytes"], 17 * CHUNK);
    assert_eq!(t["within_budget"], true);
    assert_eq!(t["budget_remaining"], Value::Null);
    // Nothing was queued or created.
    let st = m.status();
    assert_eq!(st["jobs"], json!([]));
    assert_eq!(st["cache_entries"], 0);

    // Once read, the copy shows as partial, then complete.
    crate::util::pread(&m.path("loras/big.safetensors"), 0, 1);
    // The read answered from its first MiB; the rest of its chunk follows.
    let resolve = || {
        post(
            &m,
            "/arena/resolve",
            json!({"models": ["loras/big.safetensors"]}),
        )
        .unwrap()
    };
    crate::util::wait_for("the first chunk cached", Duration::from_secs(30), || {
        resolve()["models"][0]["cached_bytes"] == CHUNK
    });
    let r = resolve();
    assert_eq!(r["models"][0]["cached"], "partial", "{r}");
    assert_eq!(r["models"][0]["cached_bytes"], CHUNK);
    fs::read(m.path("loras/big.safetensors")).unwrap();
    m.wait_copies(1);
    let r = post(
        &m,
        "/arena/resolve",
        json!({"models": ["loras/big.safetensors"]}),
    )
    .unwrap();
    assert_eq!(r["models"][0]["cached"], "complete");
    assert_eq!(r["models"][0]["reason"], "complete");

    // The CLI: human summary, JSON, resolve table, usage errors.
    let (code, out, err) = cli(&["status", "--socket", sock(&m)]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("state        red (serving and making copies)"),
        "{out}"
    );
    assert!(out.contains("1 complete"), "{out}");
    let (code, out, _) = cli(&["status", "--json", "--socket", sock(&m)]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["status"],
        "success"
    );
    let (code, out, _) = cli(&[
        "resolve",
        "loras/big.safetensors",
        "vae/nothing.safetensors",
        "--socket",
        sock(&m),
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("loras/big.safetensors: loras/big.safetensors (64.0 MiB), cached complete"),
        "{out}"
    );
    assert!(
        out.contains("vae/nothing.safetensors: not found on the NAS"),
        "{out}"
    );
    for bad in [
        "../etc/passwd",
        "/etc/passwd",
        "loras",
        "loras/a\\..\\..\\x",
    ] {
        let (code, _, err) = cli(&["resolve", bad, "--socket", sock(&m)]);
        assert_eq!(code, 2, "{bad}: {err}");
    }
    let (code, out, _) = cli(&["stats", "--socket", sock(&m)]);
    assert_eq!(code, 0);
    assert!(out.contains("opens_filling"), "{out}");
    let (code, out, _) = cli(&["stats", "--json", "--socket", sock(&m)]);
    assert_eq!(code, 0);
    let stats: Value = serde_json::from_str(&out).unwrap();
    // Two opens before the copy was complete (the 1-byte read and the whole read).
    assert_eq!(stats["categories"]["loras"]["misses"], 2, "{stats}");

    let mut m = m;
    m.unmount();
    assert!(!m.socket.exists(), "the socket goes with the mount");
}

/// Clients of the original node check `"status": "success"`, and read the four booleans of its
/// `autopatch_status`.
#[test]
fn every_success_answers_success_like_the_original() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("loras/a.safetensors", 2 * CHUNK as usize, 1);
    d.nas_file("loras/b.safetensors", 2 * CHUNK as usize, 2);
    d.nas_file("checkpoints/c.safetensors", CHUNK as usize, 3);
    let env = d.tmp.path().join("arena.env");
    fs::write(&env, "ARENA_CACHE_MAX_CONCURRENCY=2\n").unwrap();
    let m = d.mount(&[
        &format!("env={}", env.display()),
        "min_size_mb=0",
        "cache_cooldown_ms=0",
    ]);
    let success = |what: &str, v: &Value| assert_eq!(v["status"], "success", "{what}: {v}");
    let flags = |st: &Value| -> [bool; 4] {
        let ap = &st["autopatch_status"];
        [
            "started",
            "patched",
            "copy_worker_running",
            "settings_initialized",
        ]
        .map(|k| ap[k].as_bool().unwrap_or_else(|| panic!("{k} in {st}")))
    };

    let st = m.status();
    success("status", &st);
    assert_eq!(flags(&st), [false, true, true, true], "{st}");
    assert_eq!(
        st["autopatch_status"]["state"], "idle",
        "arenafs's own keys stay"
    );
    let get = |path: &str| client::call(&m.socket, "GET", path, None).unwrap();
    success("stats", &get("/arena/stats"));
    success("jobs", &get("/arena/jobs"));
    let r = post(
        &m,
        "/arena/resolve",
        json!({"models": ["loras/a.safetensors"]}),
    )
    .unwrap();
    success("resolve", &r);

    let r = post(
        &m,
        "/arena/autopatch",
        json!({"action": "start", "required_models": [
            {"category": "loras", "filename": "a.safetensors"}]}),
    )
    .unwrap();
    success("autopatch start", &r);
    let st = m.status();
    assert_eq!(flags(&st), [true, true, true, true], "{st}");
    m.wait_copies(1);
    assert_eq!(
        m.status()["autopatch_status"]["started"],
        true,
        "done, not stopped"
    );
    let r = post(&m, "/arena/autopatch", json!({"action": "stop"})).unwrap();
    success("autopatch stop", &r);
    assert_eq!(flags(&m.status()), [false, true, true, true]);

    let r = post(
        &m,
        "/arena/prefetch",
        json!({"models": ["loras/b.safetensors"]}),
    )
    .unwrap();
    success("prefetch", &r);
    m.wait_copies(2);
    let r = post(
        &m,
        "/arena/trim",
        json!({"category": "loras", "dry_run": true}),
    )
    .unwrap();
    success("trim", &r);
    assert_eq!(r["removed"].as_array().unwrap().len(), 2, "{r}");
    let r = client::call_bytes(
        &m.socket,
        "POST",
        "/arena/workflow",
        Some(
            br#"{"1":{"class_type":"CheckpointLoaderSimple","inputs":{"ckpt_name":"c.safetensors"}}}"#
                .to_vec(),
        ),
    )
    .unwrap();
    success("workflow", &r);
    let r = client::call(&m.socket, "POST", "/arena/reload", None).unwrap();
    success("reload", &r);

    // Gray: the copy worker makes nothing any more.
    fs::write(&env, "ARENA_AUTO_CACHE_ENABLED=0\n").unwrap();
    let r = client::call(&m.socket, "POST", "/arena/reload", None).unwrap();
    success("reload", &r);
    let st = m.status();
    assert_eq!(st["cache_state"], "gray", "{st}");
    assert_eq!(flags(&st), [false, true, false, true], "{st}");

    // Errors keep their shape.
    let (_, code, body) = api_err(post(&m, "/arena/prefetch", json!({"models": []})));
    assert_eq!(code, "EMPTY_REQUIRED_SET");
    assert_eq!(body["status"], "error");
}

#[test]
fn prefetch_budget_and_cooldown() {
    require_mount!();
    let d = Dirs::new();
    let size = 5 * CHUNK as usize;
    for i in 0..3 {
        d.nas_file(&format!("loras/f{i}.safetensors"), size, i);
    }
    let m = d.mount(&[
        "min_size_mb=0",
        "cache_session_byte_budget=30000000",
        "cache_cooldown_ms=60000",
    ]);

    // Over the budget: refused as a whole, nothing queued.
    let (code_http, code, body) = api_err(post(
        &m,
        "/arena/prefetch",
        json!({"models": ["loras/f0.safetensors", "loras/f1.safetensors"]}),
    ));
    assert_eq!((code_http, code.as_str()), (409, "BUDGET_EXCEEDED"));
    assert_eq!(body["needed"], 2 * size as u64);
    assert_eq!(body["remaining"], 30_000_000);
    assert_eq!(m.status()["jobs"], json!([]));
    let (_, code, _) = api_err(post(
        &m,
        "/arena/autopatch",
        json!({"action": "start", "required_models": [
            {"category": "loras", "filename": "f0.safetensors"},
            {"category": "loras", "filename": "f1.safetensors"}]}),
    ));
    assert_eq!(code, "BUDGET_EXCEEDED");
    let r = post(
        &m,
        "/arena/resolve",
        json!({"models": ["loras/f0.safetensors", "loras/f1.safetensors"]}),
    )
    .unwrap();
    assert_eq!(r["totals"]["within_budget"], false);
    assert_eq!(r["models"][0]["reason"], "budget_exceeded");

    // Within it: `prefetch --wait` returns when the copy is complete.
    let (code, out, err) = cli(&[
        "prefetch",
        "loras/f0.safetensors",
        "--wait",
        "--socket",
        sock(&m),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("cached complete"), "{out}");
    assert_eq!(m.status()["cache_complete_entries"], 1);
    assert_eq!(
        fs::read(m.path("loras/f0.safetensors")).unwrap(),
        random_bytes(size, 0)
    );

    // A second bulk request within the cooldown.
    let (code, _, err) = cli(&["prefetch", "loras/f2.safetensors", "--socket", sock(&m)]);
    assert_eq!(code, 1);
    assert!(err.contains("COOLDOWN_ACTIVE"), "{err}");
    let answer = raw(
        &m.socket,
        &post_raw("/arena/prefetch", br#"{"models":["loras/f2.safetensors"]}"#),
    );
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: "),
        "{answer}"
    );
    assert!(answer.contains("\"retry_after_ms\":"), "{answer}");

    let (status, code, _) = api_err(post(&m, "/arena/prefetch", json!({"models": []})));
    assert_eq!((status, code.as_str()), (400, "EMPTY_REQUIRED_SET"));
}

/// A loop-device NAS with `n` loras of 6 chunks (`loras/f0.safetensors` ...), its reads
/// throttled to 4 MB/s so that copies of them take seconds.
fn slow_loras(n: u64) -> LoopDirs {
    let s = LoopDirs::new(128);
    fs::create_dir(s.nas.dir.join("loras")).unwrap();
    for i in 0..n {
        fs::write(
            s.nas.dir.join(format!("loras/f{i}.safetensors")),
            random_bytes(6 * CHUNK as usize, i),
        )
        .unwrap();
    }
    s.nas.remount();
    s.nas.throttle(4_000_000);
    s
}

#[test]
fn autopatch_start_stop_and_refusals() {
    require_mount!();
    let s = slow_loras(2);
    let m = s.mount(&["min_size_mb=0", "cache_cooldown_ms=60000"]);

    let (status, code, _) = api_err(post(
        &m,
        "/arena/autopatch",
        json!({"action": "start", "required_models": []}),
    ));
    assert_eq!((status, code.as_str()), (400, "EMPTY_REQUIRED_SET"));
    let (status, code, body) = api_err(post(
        &m,
        "/arena/autopatch",
        json!({"action": "start", "required_models": [
            {"category": "loras", "filename": "f0.safetensors"},
            {"category": "loras", "filename": "../../../etc/shadow"}]}),
    ));
    assert_eq!((status, code.as_str()), (400, "INVALID_REFERENCE"));
    assert_eq!(body["index"], 1);
    let (status, code, _) = api_err(post(&m, "/arena/autopatch", json!({"action": "pause"})));
    assert_eq!((status, code.as_str()), (400, "BAD_REQUEST"));

    let r = post(
        &m,
        "/arena/autopatch",
        json!({"action": "start", "required_models": [
            {"category": "loras", "filename": "f0.safetensors"},
            {"category": "loras", "filename": "gone.safetensors"}]}),
    )
    .unwrap();
    assert_eq!(r["queued"], 1, "{r}");
    assert_eq!(r["not_found"], 1);
    let st = m.status();
    assert_eq!(st["required_models_count"], 1);
    assert_eq!(st["autopatch_status"]["state"], "running", "{st}");
    assert_eq!(
        st["autopatch_status"]["not_found"],
        json!(["loras/gone.safetensors"])
    );

    // `status --watch` away from a terminal prints a line per copy per round.
    let mut watch = Command::new(BIN)
        .args([
            "status",
            "--watch",
            "--interval",
            "0.2",
            "--socket",
            sock(&m),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    watch.kill().unwrap();
    let out = String::from_utf8_lossy(&watch.wait_with_output().unwrap().stdout).into_owned();
    assert!(
        out.lines()
            .filter(|l| l.contains("loras/f0.safetensors"))
            .count()
            >= 2,
        "{out}"
    );

    // A new set while the old one copies.
    let (status, code, _) = api_err(post(
        &m,
        "/arena/autopatch",
        json!({"action": "start", "required_models": ["loras/f1.safetensors"]}),
    ));
    assert_eq!((status, code.as_str()), (409, "ALREADY_RUNNING"));

    let r = post(&m, "/arena/autopatch", json!({"action": "stop"})).unwrap();
    assert_eq!(r["cancelled"], 1, "{r}");
    wait_for("the copy to stop", Duration::from_secs(20), || {
        m.status()["jobs"] == json!([])
    });
    let st = m.status();
    assert_eq!(st["autopatch_status"]["state"], "stopped");
    assert_eq!(st["required_models_count"], 0);
    assert_eq!(st["cache_complete_entries"], 0, "stopped before the end");

    // Stopped, but the cooldown of the first start still runs.
    let (status, code, body) = api_err(post(
        &m,
        "/arena/autopatch",
        json!({"action": "start", "required_models": ["loras/f1.safetensors"]}),
    ));
    assert_eq!((status, code.as_str()), (429, "COOLDOWN_ACTIVE"));
    assert!(body["retry_after_ms"].as_u64().unwrap() > 0);
    s.nas.throttle(0);
}

/// Several ComfyUI instances on one mount: each client id has a required set of its own; the
/// worker copies their union; one client's stop cancels only what no other set needs.
#[test]
fn required_sets_per_client() {
    require_mount!();
    let s = slow_loras(3);
    let m = s.mount(&["min_size_mb=0", "cache_cooldown_ms=60000"]);
    let start = |client: &str, files: &[&str]| {
        let models: Vec<Value> = files
            .iter()
            .map(|f| json!({"category": "loras", "filename": format!("{f}.safetensors")}))
            .collect();
        post(
            &m,
            "/arena/autopatch",
            json!({"action": "start", "client_id": client, "required_models": models}),
        )
    };
    let jobs = || -> Vec<String> {
        let mut v: Vec<String> = m.status()["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["path"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };

    let (status, _, _) = api_err(start("../a", &["f0"]));
    assert_eq!(status, 400, "a client id is a name, not a path");

    let r = start("gpu0", &["f0", "f1"]).unwrap();
    assert_eq!(
        (r["queued"].as_u64(), r["client_id"].as_str()),
        (Some(2), Some("gpu0")),
        "{r}"
    );
    // Another client, within the first one's cooldown and while its copies run: accepted.
    let r = start("gpu1", &["f1", "f2"]).unwrap();
    assert_eq!(r["queued"], 1, "f1 is already queued: {r}");
    // The same client again: its own set still copies, and its own cooldown runs.
    let (status, code, _) = api_err(start("gpu0", &["f2"]));
    assert_eq!((status, code.as_str()), (409, "ALREADY_RUNNING"));

    let st = m.status();
    assert_eq!(st["required_models_count"], 3, "the union: {st}");
    assert_eq!(st["clients"]["gpu0"]["required_models"], 2);
    assert_eq!(st["clients"]["gpu1"]["state"], "running");
    assert_eq!(
        st["autopatch_status"]["state"], "idle",
        "no set without a client id"
    );
    assert_eq!(
        jobs(),
        [
            "loras/f0.safetensors",
            "loras/f1.safetensors",
            "loras/f2.safetensors"
        ]
    );

    // gpu0 stops: f0 is cancelled, f1 keeps copying for gpu1.
    let r = post(
        &m,
        "/arena/autopatch",
        json!({"action": "stop", "client_id": "gpu0"}),
    )
    .unwrap();
    assert_eq!(r["cancelled"], 1, "{r}");
    wait_for("f0 to stop", Duration::from_secs(20), || {
        !jobs().contains(&"loras/f0.safetensors".to_owned())
    });
    assert_eq!(jobs(), ["loras/f1.safetensors", "loras/f2.safetensors"]);
    let st = m.status();
    assert_eq!(st["required_models_count"], 2, "{st}");
    assert_eq!(st["clients"]["gpu0"]["state"], "stopped");
    let (code, out, _) = cli(&["status", "--socket", sock(&m)]);
    assert_eq!(code, 0);
    assert!(out.contains("client gpu0 stopped: 2 models"), "{out}");
    assert!(out.contains("client gpu1 running: 2 models"), "{out}");
    let (status, code, _) = api_err(start("gpu0", &["f0"]));
    assert_eq!(
        (status, code.as_str()),
        (429, "COOLDOWN_ACTIVE"),
        "gpu0's own cooldown"
    );

    // A request without a client id is the original's one set, beside the clients' sets.
    let r = post(
        &m,
        "/arena/autopatch",
        json!({"action": "start", "required_models": ["loras/f0.safetensors"]}),
    )
    .unwrap();
    assert_eq!(r["queued"], 1, "{r}");
    assert!(r.get("client_id").is_none());
    assert_eq!(m.status()["autopatch_status"]["state"], "running");
    for body in [
        json!({"action": "stop"}),
        json!({"action": "stop", "client_id": "gpu1"}),
    ] {
        post(&m, "/arena/autopatch", body).unwrap();
    }
    wait_for("every copy to stop", Duration::from_secs(20), || {
        jobs().is_empty()
    });
    assert_eq!(m.status()["required_models_count"], 0);
    s.nas.throttle(0);
}

#[test]
fn trim_reload_and_jobs() {
    require_mount!();
    let d = Dirs::new();
    for i in 0..3 {
        d.nas_file(&format!("loras/f{i}.safetensors"), 2 * CHUNK as usize, i);
    }
    d.nas_file("vae/v.safetensors", 2 * CHUNK as usize, 9);
    let m = d.mount(&["min_size_mb=0"]);
    for f in [
        "loras/f0.safetensors",
        "loras/f1.safetensors",
        "loras/f2.safetensors",
        "vae/v.safetensors",
    ] {
        fs::read(m.path(f)).unwrap();
    }
    m.wait_copies(4);
    // The worker's jobs for these loads end once they find nothing left to copy.
    wait_for("the jobs to end", Duration::from_secs(20), || {
        let jobs = client::call(&m.socket, "GET", "/arena/jobs", None).unwrap();
        jobs["running"] == 0 && jobs["jobs"] == json!([])
    });

    // Refusals: nothing said, unknown fields, bad references.
    let (status, code, _) = api_err(post(&m, "/arena/trim", json!({})));
    assert_eq!((status, code.as_str()), (400, "BAD_REQUEST"));
    let (_, code, _) = api_err(post(&m, "/arena/trim", json!({"everything": true})));
    assert_eq!(code, "BAD_JSON");
    let (_, code, _) = api_err(post(&m, "/arena/trim", json!({"file": "../../x"})));
    assert_eq!(code, "INVALID_REFERENCE");
    let (_, code, _) = api_err(post(&m, "/arena/trim", json!({"category": "../loras"})));
    assert_eq!(code, "INVALID_REFERENCE");
    let (code, _, _) = cli(&["trim", "--socket", sock(&m)]);
    assert_eq!(code, 2, "trim without a criterion is a usage error");
    let (code, _, _) = cli(&["trim", "--to", "lots", "--socket", sock(&m)]);
    assert_eq!(code, 2);

    // A dry run removes nothing.
    let r = post(
        &m,
        "/arena/trim",
        json!({"category": "loras", "dry_run": true}),
    )
    .unwrap();
    assert_eq!(r["removed"].as_array().unwrap().len(), 3);
    assert_eq!(r["freed_bytes"], 6 * CHUNK);
    assert_eq!(m.status()["cache_complete_entries"], 4);
    let (code, out, _) = cli(&[
        "trim",
        "--category",
        "loras",
        "--dry-run",
        "--socket",
        sock(&m),
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("would remove 3 copies, 24.0 MiB"), "{out}");

    // By file, then by size.
    let (code, out, err) = cli(&["trim", "--file", "vae/v.safetensors", "--socket", sock(&m)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("removed vae/v.safetensors"), "{out}");
    assert_eq!(m.status()["cache_complete_entries"], 3);
    let r = post(&m, "/arena/trim", json!({"to_bytes": 2 * CHUNK + 1})).unwrap();
    assert_eq!(r["removed"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(m.status()["cache_used_bytes"], 2 * CHUNK);
    // Reads still give the NAS bytes.
    assert_eq!(
        fs::read(m.path("loras/f0.safetensors")).unwrap(),
        random_bytes(2 * CHUNK as usize, 0)
    );

    // Reload without an env file: NO_ENV.
    let (status, code, _) = api_err(client::call(&m.socket, "POST", "/arena/reload", None));
    assert_eq!((status, code.as_str()), (409, "NO_ENV"));
    let (code, _, err) = cli(&["reload", "--socket", sock(&m)]);
    assert_eq!(code, 1);
    assert!(err.contains("NO_ENV"), "{err}");
}

#[test]
fn reload_reports_what_changed() {
    require_mount!();
    let d = Dirs::new();
    let env = d.tmp.path().join("arena.env");
    fs::write(&env, "ARENA_CACHE_MAX_CONCURRENCY=2\n").unwrap();
    let m = d.mount(&[&format!("env={}", env.display())]);
    fs::write(&env, "ARENA_CACHE_MAX_CONCURRENCY=5\n").unwrap();
    let (code, out, err) = cli(&["reload", "--socket", sock(&m)]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("changed ARENA_CACHE_MAX_CONCURRENCY: 2 -> 5"),
        "{out}"
    );
    assert_eq!(m.status()["max_concurrency"], 5);
    // A broken value is a warning, the rest applies; an unreadable file keeps the settings.
    fs::write(
        &env,
        "ARENA_CACHE_MAX_CONCURRENCY=5\nARENA_CACHE_MAX_GB=lots\n",
    )
    .unwrap();
    assert!(client::call(&m.socket, "POST", "/arena/reload", None).is_ok());
    fs::remove_file(&env).unwrap();
    fs::create_dir(&env).unwrap();
    let (status, code, _) = api_err(client::call(&m.socket, "POST", "/arena/reload", None));
    assert_eq!((status, code.as_str()), (422, "CONFIG_ERROR"));
    assert_eq!(m.status()["max_concurrency"], 5);
}

/// The settings panel's endpoint: a change is checked, written to the env file (its comments and
/// other lines kept) and applied; a bad value changes nothing; without an env file, `NO_ENV`.
#[test]
fn settings_change_through_the_api() {
    require_mount!();
    let d = Dirs::new();
    let env = d.tmp.path().join("arena.env");
    let original = "# the studio's settings\n\
                    ARENA_CACHE_DISCOVERY=workflow_only\n\
                    SOMETHING_OF_OURS=keep me\n\
                    \n\
                    # ARENA_CACHE_MAX_CONCURRENCY=9\n";
    fs::write(&env, original).unwrap();
    fs::set_permissions(&env, fs::Permissions::from_mode(0o640)).unwrap();
    let m = d.mount(&[&format!("env={}", env.display()), "cache_verbose=0"]);
    let settings = |body: Value| post(&m, "/arena/settings", body);

    let got = client::call(&m.socket, "GET", "/arena/settings", None).unwrap();
    assert_eq!(got["env_file"], env.to_str().unwrap());
    assert_eq!(got["writable"], true);
    assert_eq!(got["settings"]["ARENA_CACHE_DISCOVERY"], "workflow_only");

    let r = settings(json!({"settings": {
        "ARENA_CACHE_DISCOVERY": "manual_only",
        "max_concurrency": 4,
        "ARENA_CACHE_PREFETCH_STRATEGY": "prefetch_allowlist",
        "ARENA_CACHE_VERBOSE": true,
    }}))
    .unwrap();
    assert_eq!(r["status"], "success");
    assert_eq!(
        r["overridden"],
        json!(["ARENA_CACHE_VERBOSE (set by a -o option)"]),
        "{r}"
    );
    let st = m.status();
    assert_eq!(st["discovery_mode"], "manual_only");
    assert_eq!(st["max_concurrency"], 4);
    assert_eq!(st["prefetch_strategy"], "prefetch_allowlist");
    assert_eq!(
        fs::read_to_string(&env).unwrap(),
        "# the studio's settings\n\
         ARENA_CACHE_DISCOVERY=manual_only\n\
         SOMETHING_OF_OURS=keep me\n\
         \n\
         # ARENA_CACHE_MAX_CONCURRENCY=9\n\
         ARENA_CACHE_PREFETCH_STRATEGY=prefetch_allowlist\n\
         ARENA_CACHE_VERBOSE=1\n\
         ARENA_CACHE_MAX_CONCURRENCY=4\n"
    );
    assert_eq!(fs::metadata(&env).unwrap().mode() & 0o777, 0o640);
    let (code, out, _) = cli(&["status", "--socket", sock(&m)]);
    assert_eq!(code, 0);
    assert!(out.contains("discovery manual_only"), "{out}");

    // Refusals change nothing.
    let before = fs::read_to_string(&env).unwrap();
    for (body, status, code) in [
        (
            json!({"settings": {"ARENA_CACHE_DISCOVERY": "sometimes"}}),
            422,
            "CONFIG_ERROR",
        ),
        (
            json!({"settings": {"ARENA_NO_SUCH_KEY": "1"}}),
            422,
            "CONFIG_ERROR",
        ),
        (
            json!({"settings": {"ARENA_CACHE_ROOT": "/elsewhere"}}),
            400,
            "BAD_REQUEST",
        ),
        (
            json!({"settings": {"ARENA_CACHE_EXCLUDE": "a\nARENA_CACHE_MAX_GB=1"}}),
            400,
            "BAD_REQUEST",
        ),
        (
            json!({"settings": {"ARENA_CACHE_MAX_GB": [1]}}),
            400,
            "BAD_REQUEST",
        ),
        (json!({"settings": {}}), 400, "BAD_REQUEST"),
        (json!({"discovery": "manual_only"}), 400, "BAD_JSON"),
    ] {
        let (s, c, _) = api_err(settings(body.clone()));
        assert_eq!((s, c.as_str()), (status, code), "{body}");
    }
    assert_eq!(fs::read_to_string(&env).unwrap(), before);
    assert_eq!(m.status()["discovery_mode"], "manual_only");
    let leftovers: Vec<_> = fs::read_dir(d.tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Without an env file there is nothing to write.
    let d2 = Dirs::new();
    let m2 = d2.mount(&[]);
    let got = client::call(&m2.socket, "GET", "/arena/settings", None).unwrap();
    assert_eq!(got["env_file"], Value::Null);
    assert_eq!(got["writable"], false);
    let (s, c, body) = api_err(post(
        &m2,
        "/arena/settings",
        json!({"settings": {"ARENA_CACHE_DISCOVERY": "manual_only"}}),
    ));
    assert_eq!((s, c.as_str()), (409, "NO_ENV"), "{body}");
    assert_eq!(m2.status()["discovery_mode"], "workflow_only");
}

#[test]
fn metrics_are_valid_prometheus_text() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("loras/a.safetensors", 2 * CHUNK as usize, 1);
    d.nas_file("loras/tiny.safetensors", 100, 2);
    let m = d.mount(&["min_size_mb=1", "passthrough=0"]);
    fs::read(m.path("loras/a.safetensors")).unwrap();
    fs::read(m.path("loras/tiny.safetensors")).unwrap();
    m.wait_copies(1);
    // A second open is a hit served from the SSD in user space (passthrough off); drop the
    // page cache so that its reads reach the daemon.
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    fs::read(m.path("loras/a.safetensors")).unwrap();
    let reply = client::raw(&m.socket, "GET", "/metrics", None).unwrap();
    assert_eq!(reply.status, 200);
    assert!(reply.content_type.starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(reply.body).unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
    };
    assert_eq!(value(r#"arenafs_opens_total{source="filling"}"#), 1.0);
    assert_eq!(value(r#"arenafs_opens_total{source="ssd"}"#), 1.0);
    assert_eq!(value(r#"arenafs_opens_total{source="nas"}"#), 1.0);
    assert_eq!(value(r#"arenafs_cache_hits_total{category="loras"}"#), 1.0);
    assert_eq!(
        value(r#"arenafs_cache_misses_total{category="loras"}"#),
        1.0
    );
    assert_eq!(value("arenafs_cache_used_bytes"), (2 * CHUNK) as f64);
    assert_eq!(value("arenafs_cache_complete_entries"), 1.0);
    assert_eq!(value(r#"arenafs_cache_state{state="red"}"#), 1.0);
    assert_eq!(value("arenafs_nas_up"), 1.0);
    assert!(value(r#"arenafs_read_duration_seconds_count{source="ssd"}"#) >= 1.0);
    assert_eq!(
        value(r#"arenafs_read_duration_seconds_bucket{source="ssd",le="+Inf"}"#),
        value(r#"arenafs_read_duration_seconds_count{source="ssd"}"#)
    );
    assert!(value(r#"arenafs_read_bytes_total{tier="ssd"}"#) >= (2 * CHUNK) as f64);

    // promtool, Prometheus' own checker (package `prometheus`, installed by scripts/install-deps).
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "promtool is missing; scripts/install-deps installs it"
        );
        eprintln!("skipping the promtool check: promtool not installed");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool lints too (counter names, units); it prints nothing when all is well.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

#[test]
fn malformed_requests_do_not_hurt_the_daemon() {
    require_mount!();
    let d = Dirs::new();
    let data = d.nas_file("loras/a.safetensors", 3 * CHUNK as usize, 7);
    let m = d.mount(&["min_size_mb=0"]);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "unknown path",
            b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "404",
        ),
        (
            "traversal in the path",
            b"GET /arena/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "404",
        ),
        (
            "wrong method",
            b"DELETE /arena/status HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "405",
        ),
        (
            "GET on a POST endpoint",
            b"GET /arena/autopatch HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "405",
        ),
        ("bad JSON", post_raw("/arena/resolve", b"{bad}"), "400"),
        (
            "JSON of the wrong shape",
            post_raw("/arena/resolve", br#"{"models":42}"#),
            "400",
        ),
        (
            "invalid UTF-8 in the body",
            post_raw("/arena/resolve", b"{\"models\":[\"\xff\xfe\"]}"),
            "400",
        ),
        (
            "invalid UTF-8 in the path",
            b"GET /arena/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "NUL in a reference",
            post_raw(
                "/arena/resolve",
                br#"{"models":["loras/a\u0000.safetensors"]}"#,
            ),
            "400",
        ),
        (
            "traversal in a reference",
            post_raw("/arena/resolve", br#"{"models":["loras/../../../etc"]}"#),
            "400",
        ),
        (
            "declared body over the limit",
            b"POST /arena/resolve HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n{"
                .to_vec(),
            "413",
        ),
        (
            "not HTTP",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
            "",
        ),
        (
            "truncated headers",
            b"POST /arena/resolve HTTP/1.1\r\nHost: x\r\nContent-Le".to_vec(),
            "",
        ),
        (
            "truncated body",
            b"POST /arena/resolve HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"models\":["
                .to_vec(),
            "",
        ),
        ("empty", Vec::new(), ""),
    ];
    for (what, bytes, want) in &cases {
        let answer = raw_ex(&m.socket, bytes, true);
        let line = status_line(&answer);
        if want.is_empty() {
            assert!(
                line.is_empty() || line.contains(" 400 "),
                "{what}: {answer}"
            );
        } else {
            assert!(line.contains(&format!(" {want} ")), "{what}: {answer}");
            if *want != "400" || answer.contains("application/json") {
                assert!(answer.contains("\"status\":\"error\""), "{what}: {answer}");
            }
        }
    }
    // A body over 8 MiB that is really sent, chunked.
    let mut s = UnixStream::connect(&m.socket).unwrap();
    s.write_all(b"POST /arena/resolve HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let chunk = vec![b' '; 1 << 20];
    let mut answer = String::new();
    for _ in 0..12 {
        if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .is_err()
            || s.write_all(&chunk).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.read_to_string(&mut answer);
    assert!(status_line(&answer).contains(" 413 "), "{answer}");

    // Many connections at once, some left open and idle.
    let idle: Vec<UnixStream> = (0..50)
        .map(|_| UnixStream::connect(&m.socket).unwrap())
        .collect();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let socket = m.socket.clone();
            std::thread::spawn(move || {
                for j in 0..25 {
                    let body = if (i + j) % 2 == 0 {
                        format!("{{\"models\":[\"loras/{i}-{j}\"]}}")
                    } else {
                        "{\"models\":".to_string()
                    };
                    let req = format!(
                        "POST /arena/resolve HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let answer = raw(&socket, req.as_bytes());
                    assert!(
                        answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.1 400"),
                        "{answer}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    drop(idle);

    // Still serving: status, and reads through the mount.
    assert_eq!(m.status()["status"], "success");
    assert_eq!(fs::read(m.path("loras/a.safetensors")).unwrap(), data);
    assert!(
        m.log().lines().all(|l| !l.contains("panicked")),
        "{}",
        m.log()
    );
}

/// A GET on a fresh connection that must be answered within `bound`; returns (HTTP status, time).
fn timed_get(socket: &Path, path: &str, bound: Duration) -> (u16, Duration) {
    let start = std::time::Instant::now();
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(bound)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        panic!("GET {path}: no answer within {bound:?} ({e})");
    }
    let code = String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, start.elapsed())
}

/// Sends `request` from a thread while `status` and `/metrics` are asked for, each of which
/// must answer within a few seconds; returns the answer to `request`.
fn while_status_answers(socket: &Path, request: Vec<u8>) -> String {
    let sock = socket.to_path_buf();
    let big = std::thread::spawn(move || raw(&sock, &request));
    let bound = Duration::from_secs(5);
    let mut rounds = 0;
    while rounds < 3 || !big.is_finished() {
        for path in ["/arena/status", "/metrics"] {
            let (code, took) = timed_get(socket, path, bound);
            assert_eq!(code, 200, "{path}");
            eprintln!("{path} answered in {took:?}");
        }
        rounds += 1;
    }
    big.join().unwrap()
}

#[test]
fn a_flood_of_references_is_refused_while_status_answers() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("loras/a.safetensors", CHUNK as usize, 1);
    let m = d.mount(&["min_size_mb=0", "cache_cooldown_ms=0"]);
    let limit = arenafs::control::api::MAX_REFERENCES;

    // 200,000 distinct references: about 5 MB, within the body limit.
    let many: Vec<String> = (0..200_000)
        .map(|i| format!("\"loras/m{i}.safetensors\""))
        .collect();
    let list = many.join(",");
    for (path, body) in [
        ("/arena/resolve", format!("{{\"models\":[{list}]}}")),
        ("/arena/prefetch", format!("{{\"models\":[{list}]}}")),
        (
            "/arena/autopatch",
            format!("{{\"action\":\"start\",\"required_models\":[{list}]}}"),
        ),
    ] {
        assert!(body.len() < 8 << 20);
        let answer = while_status_answers(&m.socket, post_raw(path, body.as_bytes()));
        assert!(status_line(&answer).contains(" 413 "), "{path}: {answer}");
        assert!(
            answer.contains("\"code\":\"TOO_MANY_MODELS\""),
            "{path}: {answer}"
        );
        assert!(answer.contains("\"count\":200000"), "{path}: {answer}");
        assert!(
            answer.contains(&format!("\"limit\":{limit}")),
            "{path}: {answer}"
        );
    }
    assert_eq!(m.status()["jobs"], json!([]), "nothing queued");
    assert_eq!(m.status()["autopatch_status"]["state"], "idle");

    // Up to the limit, duplicates included, is answered; duplicates are merged.
    let refs: Vec<Value> = (0..limit)
        .map(|i| match i % 3 {
            0 => json!("loras/a.safetensors"),
            1 => json!({"category": "loras", "filename": "a.safetensors"}),
            _ => json!(format!("loras/n{}.safetensors", i % 1000)),
        })
        .collect();
    let body = serde_json::to_vec(&json!({ "models": refs })).unwrap();
    let answer = while_status_answers(&m.socket, post_raw("/arena/resolve", &body));
    assert!(status_line(&answer).contains(" 200 "), "{answer}");
    let r: Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(r["totals"]["models"], 1 + 1000, "{}", r["totals"]);
    assert_eq!(r["totals"]["found"], 1);
    assert_eq!(r["models"][0]["path"], "loras/a.safetensors");

    // A workflow naming more files than that is refused the same way.
    let nodes: serde_json::Map<String, Value> = (0..=limit)
        .map(|i| {
            (
                i.to_string(),
                json!({"class_type": "CheckpointLoaderSimple",
                       "inputs": {"ckpt_name": format!("c{i}.safetensors")}}),
            )
        })
        .collect();
    let body = serde_json::to_vec(&Value::Object(nodes)).unwrap();
    let answer = while_status_answers(&m.socket, post_raw("/arena/workflow", &body));
    assert!(status_line(&answer).contains(" 413 "), "{answer}");
    assert!(answer.contains("TOO_MANY_MODELS"), "{answer}");
    assert!(
        answer.contains(&format!("\"count\":{}", limit + 1)),
        "{answer}"
    );

    // A large workflow body (tens of MiB) is parsed away from the thread that answers status.
    let filler = "x".repeat(1 << 10);
    let nodes: serde_json::Map<String, Value> = (0..40_000)
        .map(|i| {
            (
                i.to_string(),
                json!({"class_type": "Note", "inputs": {"text": filler}}),
            )
        })
        .collect();
    let body = serde_json::to_vec(&Value::Object(nodes)).unwrap();
    assert!(body.len() > 32 << 20 && body.len() < arenafs::workflow::MAX_WORKFLOW_BYTES);
    let answer = while_status_answers(&m.socket, post_raw("/arena/workflow", &body));
    assert!(status_line(&answer).contains(" 200 "), "{answer}");
}

#[test]
fn socket_group_and_the_tcp_listener() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("loras/a.safetensors", CHUNK as usize, 1);
    let port = free_port();
    let m = d.mount(&["socket_group=daemon", &format!("listen=127.0.0.1:{port}")]);
    let md = fs::metadata(&m.socket).unwrap();
    let daemon_gid = nix::unistd::Group::from_name("daemon")
        .unwrap()
        .unwrap()
        .gid
        .as_raw();
    assert_eq!(md.gid(), daemon_gid);
    assert_eq!(md.permissions().mode() & 0o777, 0o660);

    // Over TCP: reads yes, changes no (no token configured).
    let (code, body) = tcp(port, "GET", "/arena/status", None);
    assert_eq!(code, 200, "{body}");
    let (code, body) = tcp(port, "GET", "/metrics", None);
    assert_eq!(code, 200);
    assert!(body.contains("arenafs_opens_total"));
    let (code, body) = tcp(port, "POST", "/arena/reload", None);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("READ_ONLY"));
    let (code, _) = tcp(port, "POST", "/arena/trim", Some("Bearer guess"));
    assert_eq!(code, 403);
    drop(m);

    // With a token: changes need it.
    let token = d.tmp.path().join("token");
    fs::write(&token, "s3cret-token\n").unwrap();
    let port = free_port();
    let _m = d.mount(&[
        &format!("listen=127.0.0.1:{port}"),
        &format!("token_file={}", token.display()),
    ]);
    let (code, body) = tcp(port, "POST", "/arena/reload", None);
    assert_eq!(code, 401, "{body}");
    let (code, _) = tcp(port, "POST", "/arena/reload", Some("Bearer s3cret-tokeN"));
    assert_eq!(code, 401);
    let (code, body) = tcp(port, "POST", "/arena/reload", Some("Bearer s3cret-token"));
    assert_eq!(code, 409, "reached the endpoint (no env file): {body}");
    assert!(body.contains("NO_ENV"));
}

/// Each listener serves a bounded number of connections; a client that does not send its request
/// headers in time is dropped, which frees its place.
#[test]
fn connections_are_capped_and_slow_headers_time_out() {
    require_mount!();
    let d = Dirs::new();
    let port = free_port();
    let m = d.mount(&[
        &format!("listen=127.0.0.1:{port}"),
        "control_connections=4",
        "control_header_timeout=3",
    ]);
    let connect = || {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s
    };
    // Four connections take every place: two say nothing, two send half a request (slow loris).
    let start = std::time::Instant::now();
    let mut held: Vec<std::net::TcpStream> = (0..4).map(|_| connect()).collect();
    for s in &mut held[2..] {
        s.write_all(b"GET /arena/status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .unwrap();
    }
    // The fifth is answered at once, with an error, and closed.
    let mut fifth = connect();
    fifth
        .write_all(b"GET /arena/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    fifth.read_to_string(&mut answer).unwrap();
    assert!(status_line(&answer).contains(" 503 "), "{answer}");
    assert!(
        answer.contains("\"code\":\"TOO_MANY_CONNECTIONS\""),
        "{answer}"
    );
    assert!(answer.contains("\"status\":\"error\""), "{answer}");
    // The unix socket has places of its own: status answers there.
    let (code, _) = timed_get(&m.socket, "/arena/status", Duration::from_secs(5));
    assert_eq!(code, 200);

    // Who does not finish its headers within the timeout is disconnected, without an answer.
    for (i, s) in held.iter_mut().enumerate() {
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap_or_else(|e| {
            panic!("connection {i} still open after {:?}: {e}", start.elapsed())
        });
        assert!(got.is_empty(), "{i}: {}", String::from_utf8_lossy(&got));
    }
    let closed_after = start.elapsed();
    assert!(
        closed_after >= Duration::from_millis(2900) && closed_after < Duration::from_secs(12),
        "{closed_after:?}"
    );
    // Their places are free again.
    wait_for(
        "a place on the TCP listener",
        Duration::from_secs(10),
        || tcp(port, "GET", "/arena/status", None).0 == 200,
    );
}

#[test]
fn a_bad_socket_group_or_token_file_fails_the_mount() {
    require_mount!();
    let d = Dirs::new();
    for (opt, want) in [
        (
            "socket_group=no-such-group-here".to_string(),
            "no-such-group-here",
        ),
        (
            format!("token_file={}", d.tmp.path().join("missing").display()),
            "token file",
        ),
    ] {
        let out = Command::new(BIN)
            .arg("mount")
            .arg(&d.nas)
            .arg(&d.mnt)
            .arg("--cache-dir")
            .arg(&d.cache)
            .arg("--socket")
            .arg(&d.socket)
            .args(["-o", &opt, "--log-file"])
            .arg(d.tmp.path().join("log"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{opt}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{opt}: {err}");
        assert!(
            !crate::util::is_arenafs_mount(&d.mnt),
            "{opt}: left mounted"
        );
    }
}

#[test]
fn the_cli_finds_the_daemon_from_the_mount_point() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("loras/a.safetensors", CHUNK as usize, 1);
    // Background mount with the default socket under /run/arenafs.
    let (code, _, err) = cli(&[
        "mount",
        d.nas.to_str().unwrap(),
        d.mnt.to_str().unwrap(),
        "--cache-dir",
        d.cache.to_str().unwrap(),
        "--log-file",
        d.tmp.path().join("log").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let socket = arenafs::control::default_socket(&d.mnt);
    assert!(socket.exists());
    let (code, out, err) = cli(&["status", d.mnt.to_str().unwrap()]);
    let (code2, out2, _) = cli(&[
        "resolve",
        "loras/a.safetensors",
        "-m",
        d.mnt.to_str().unwrap(),
    ]);
    let (ucode, _, uerr) = cli(&["unmount", d.mnt.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("mount        {}", d.mnt.display())),
        "{out}"
    );
    assert_eq!(code2, 0);
    assert!(out2.contains("loras/a.safetensors"), "{out2}");
    assert_eq!(ucode, 0, "{uerr}");
    wait_for("the socket to go", Duration::from_secs(10), || {
        !socket.exists()
    });

    // No daemon: a clear message and exit 1.
    let (code, _, err) = cli(&["status", d.mnt.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("no arenafs daemon is running for"), "{err}");
    let (code, _, err) = cli(&["stats", "--socket", "/nonexistent/arenafs.sock"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no arenafs daemon answers at /nonexistent/arenafs.sock"),
        "{err}"
    );
    let (code, _, _) = cli(&["prefetch", "--socket", "/x.sock"]);
    assert_eq!(code, 2, "prefetch needs models");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP request over TCP; returns (status, body).
fn tcp(port: u16, method: &str, path: &str, auth: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let body = if method == "POST" { "{}" } else { "" };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (code, body)
}
