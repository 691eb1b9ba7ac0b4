//! Workflow discovery wired to the cache: `arenafs resolve --workflow` with and without a daemon,
//! `POST /arena/workflow` (resolve, prefetch, PNG bodies, refusals) and
//! `arenafs prefetch --workflow --wait`.

use std::fs;
use std::process::Command;

use arenafs::control::client::{self, ClientError};
use serde_json::{Value, json};

use crate::util::{BIN, CHUNK, Dirs, random_bytes, require_mount};

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An API prompt: a checkpoint and a LoRA feeding a sampler that is saved, a VAE that is not on
/// the NAS, a text encoder found in the legacy `clip/` folder, and a LoRA loader nothing uses.
fn prompt() -> Value {
    json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd\\base.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {"lora_name": "style.safetensors",
              "strength_model": 1.0, "strength_clip": 1.0, "model": ["1", 0], "clip": ["1", 1]}},
        "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5.safetensors", "type": "sd3"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["3", 0]}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": "missing.safetensors"}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["4", 0],
              "negative": ["4", 0], "seed": 1, "steps": 20, "cfg": 7, "sampler_name": "euler",
              "scheduler": "normal", "denoise": 1, "latent_image": ["7", 0]}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["5", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}},
        "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "unused.safetensors",
               "strength_model": 1.0, "strength_clip": 1.0, "model": ["1", 0], "clip": ["1", 1]}}
    })
}

fn nas_files(d: &Dirs) {
    d.nas_file("checkpoints/sd/base.safetensors", 3 * CHUNK as usize, 1);
    d.nas_file("loras/style.safetensors", 2 * CHUNK as usize, 2);
    d.nas_file("loras/unused.safetensors", 2 * CHUNK as usize, 3);
    d.nas_file("clip/t5.safetensors", CHUNK as usize, 4);
}

fn entry<'a>(r: &'a Value, status: &str, filename: &str) -> &'a Value {
    r["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["status"] == status && m["filename"] == filename)
        .unwrap_or_else(|| panic!("{status} {filename} in {r:#}"))
}

fn png_with_prompt(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, 2, 2);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder
            .add_text_chunk("prompt".into(), text.to_string())
            .unwrap();
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&[0u8; 12]).unwrap();
        writer.finish().unwrap();
    }
    out
}

#[test]
fn resolve_workflow_without_a_daemon() {
    let d = Dirs::new();
    nas_files(&d);
    let wf = d.tmp.path().join("wf.json");
    fs::write(&wf, prompt().to_string()).unwrap();

    // Neither NAS nor mount: only parsed, nothing claimed about the NAS.
    let (code, out, err) = cli(&["resolve", "--workflow", wf.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    let base = entry(&r, "exec", "sd\\base.safetensors");
    assert_eq!(base["path"], "sd/base.safetensors", "normalised");
    assert_eq!(base["category"], "checkpoints");
    assert_eq!(base["nodes"], json!(["1"]));
    assert_eq!(base["on_nas"], Value::Null);
    assert_eq!(base["cache"], Value::Null);
    assert_eq!(
        entry(&r, "mentioned_only", "unused.safetensors")["on_nas"],
        Value::Null
    );

    // Against the NAS directory: found, sizes, missing ones named; still exit 0.
    let (code, out, err) = cli(&[
        "resolve",
        "--workflow",
        wf.to_str().unwrap(),
        "--nas",
        d.nas.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    let base = entry(&r, "exec", "sd\\base.safetensors");
    assert_eq!(base["on_nas"], true);
    assert_eq!(base["size"], 3 * CHUNK);
    assert_eq!(
        entry(&r, "exec", "t5.safetensors")["nas_path"],
        "clip/t5.safetensors"
    );
    assert_eq!(entry(&r, "exec", "missing.safetensors")["on_nas"], false);
    assert_eq!(r["totals"]["exec"], 4);
    assert_eq!(r["totals"]["missing"], 1);
    assert_eq!(r["totals"]["bytes_on_nas"], 6 * CHUNK);
    let (code, out, _) = cli(&[
        "resolve",
        "--workflow",
        wf.to_str().unwrap(),
        "--nas",
        d.nas.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("missing on the NAS: vae/missing.safetensors"),
        "{out}"
    );

    // A PNG carrying the prompt gives the same answer.
    let png = d.tmp.path().join("image.png");
    fs::write(&png, png_with_prompt(&prompt().to_string())).unwrap();
    let (code, out, _) = cli(&[
        "resolve",
        "--workflow",
        png.to_str().unwrap(),
        "--nas",
        d.nas.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0);
    let from_png: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(from_png["models"], r["models"]);

    // Not a workflow: exit 1 with a reason; no such file: exit 1.
    let junk = d.tmp.path().join("junk.json");
    fs::write(&junk, "{\"nodes\": 7").unwrap();
    let (code, _, err) = cli(&["resolve", "--workflow", junk.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    let (code, _, _) = cli(&["resolve", "--workflow", "/nonexistent.json"]);
    assert_eq!(code, 1);
    let (code, _, _) = cli(&["resolve", "--workflow", wf.to_str().unwrap(), "loras/x"]);
    assert_eq!(code, 2, "models and --workflow together");
}

#[test]
fn the_workflow_endpoint_resolves_and_prefetches() {
    require_mount!();
    let d = Dirs::new();
    nas_files(&d);
    let m = d.mount(&["min_size_mb=0", "cache_cooldown_ms=0"]);

    // A plain resolution changes nothing.
    let r = client::call_bytes(
        &m.socket,
        "POST",
        "/arena/workflow",
        Some(prompt().to_string().into_bytes()),
    )
    .unwrap();
    assert_eq!(r["action"], "resolve");
    let base = entry(&r, "exec", "sd\\base.safetensors");
    assert_eq!(base["cache"], "none");
    assert_eq!(base["copy"], true);
    assert_eq!(base["why"], "queued");
    let unused = entry(&r, "mentioned_only", "unused.safetensors");
    assert_eq!(unused["copy"], false);
    assert_eq!(unused["why"], "not_exec");
    assert_eq!(r["totals"]["bytes_to_copy"], 6 * CHUNK);
    let st = m.status();
    assert_eq!(st["jobs"], json!([]));
    assert_eq!(st["required_models_count"], 0);

    // The same through a PNG body, with the action in the query.
    let r2 = client::call_bytes(
        &m.socket,
        "POST",
        "/arena/workflow?action=resolve",
        Some(png_with_prompt(&prompt().to_string())),
    )
    .unwrap();
    assert_eq!(r2["models"], r["models"]);

    // Refusals.
    let err = |r: Result<Value, ClientError>| match r {
        Err(ClientError::Api { status, code, .. }) => (status, code),
        other => panic!("expected an error: {other:?}"),
    };
    let bad = |body: &[u8], path: &str| {
        err(client::call_bytes(
            &m.socket,
            "POST",
            path,
            Some(body.to_vec()),
        ))
    };
    assert_eq!(
        bad(b"{\"nodes\": 7", "/arena/workflow"),
        (400, "BAD_JSON".into())
    );
    assert_eq!(
        bad(b"{\"hello\": \"world\"}", "/arena/workflow"),
        (400, "BAD_WORKFLOW".into())
    );
    assert_eq!(
        bad(b"\x89PNG\r\n\x1a\nnot really", "/arena/workflow"),
        (400, "BAD_WORKFLOW".into())
    );
    let with_action = json!({"action": "launch", "prompt": prompt()}).to_string();
    assert_eq!(
        bad(with_action.as_bytes(), "/arena/workflow"),
        (400, "BAD_REQUEST".into())
    );
    let nothing = json!({"action": "prefetch", "prompt": {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}}}})
    .to_string();
    assert_eq!(
        bad(nothing.as_bytes(), "/arena/workflow"),
        (400, "EMPTY_REQUIRED_SET".into())
    );

    // Prefetch: the exec set becomes the required set and is copied; mentioned files are not.
    let wf = d.tmp.path().join("wf.json");
    fs::write(&wf, prompt().to_string()).unwrap();
    let (code, out, err) = cli(&[
        "prefetch",
        "--workflow",
        wf.to_str().unwrap(),
        "--wait",
        "--socket",
        m.socket.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("cached complete"), "{out}");
    let st = m.status();
    assert_eq!(st["required_models_count"], 3, "{st}");
    assert_eq!(
        st["autopatch_status"]["not_found"],
        json!(["vae/missing.safetensors"])
    );
    assert_eq!(st["cache_complete_entries"], 3);
    let r = client::call_bytes(
        &m.socket,
        "POST",
        "/arena/workflow",
        Some(prompt().to_string().into_bytes()),
    )
    .unwrap();
    for f in [
        "sd\\base.safetensors",
        "style.safetensors",
        "t5.safetensors",
    ] {
        assert_eq!(entry(&r, "exec", f)["cache"], "complete", "{f}");
    }
    assert_eq!(
        entry(&r, "mentioned_only", "unused.safetensors")["cache"],
        "none"
    );
    assert_eq!(
        fs::read(m.path("checkpoints/sd/base.safetensors")).unwrap(),
        random_bytes(3 * CHUNK as usize, 1)
    );

    // `resolve --workflow -m MOUNTPOINT`-style: through the daemon, with cache facts.
    let (code, out, _) = cli(&[
        "resolve",
        "--workflow",
        wf.to_str().unwrap(),
        "--socket",
        m.socket.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("checkpoints/sd/base.safetensors  [node 1]  on NAS: checkpoints/sd/base.safetensors (12.0 MiB), cached complete"),
        "{out}"
    );
}

/// `prefetch_strategy=prefetch_allowlist` (the override node's) adds the allow-list's files to
/// that request's required set, and only to it; without an allow-list it is a clear refusal that
/// changes nothing; `lazy` asks for the workflow's models only.
#[test]
fn a_prefetch_can_bring_the_allowlist_along() {
    require_mount!();
    let d = Dirs::new();
    nas_files(&d);
    let list = d.tmp.path().join("allow.txt");
    fs::write(
        &list,
        "loras/unused.safetensors\n# gone\nvae/nowhere.safetensors\n",
    )
    .unwrap();
    let err = |r: Result<Value, ClientError>| match r {
        Err(ClientError::Api { status, code, .. }) => (status, code),
        other => panic!("expected an error: {other:?}"),
    };
    let body = || Some(prompt().to_string().into_bytes());

    // Without an allow-list configured, the request is refused and starts nothing.
    let bare = d.mount(&["min_size_mb=0", "cache_cooldown_ms=0"]);
    let target = "/arena/workflow?action=prefetch&client_id=a&prefetch_strategy=prefetch_allowlist";
    assert_eq!(
        err(client::call_bytes(&bare.socket, "POST", target, body())),
        (409, "NO_ALLOWLIST".into())
    );
    assert_eq!(bare.status()["required_models_count"], 0);
    assert_eq!(
        err(client::call_bytes(
            &bare.socket,
            "POST",
            "/arena/workflow?action=prefetch&prefetch_strategy=eager",
            body()
        )),
        (400, "BAD_REQUEST".into())
    );
    drop(bare);

    let allow = format!("cache_prefetch_allowlist={}", list.display());
    let m = d.mount(&["min_size_mb=0", "cache_cooldown_ms=0", &allow]);
    // The daemon's own strategy is lazy: nothing of the allow-list was queued at start.
    assert_eq!(m.status()["jobs"], json!([]));
    let r = client::call_bytes(&m.socket, "POST", target, body()).unwrap();
    assert_eq!(r["allowlist"], 2);
    m.wait_copies(4);
    let st = m.status();
    let a = &st["clients"]["a"];
    // 4 of the workflow (one missing) + 2 of the allow-list (one missing).
    assert_eq!(a["required_models"], 6, "{st}");
    assert_eq!(a["found"], 4, "{st}");
    assert_eq!(a["complete"], 4, "{st}");
    assert_eq!(
        fs::read(m.path("loras/unused.safetensors")).unwrap(),
        random_bytes(2 * CHUNK as usize, 3)
    );

    // Lazy (or no strategy): the workflow's models only.
    let lazy = "/arena/workflow?action=prefetch&client_id=b&prefetch_strategy=lazy";
    let r = client::call_bytes(&m.socket, "POST", lazy, body()).unwrap();
    assert!(r.get("allowlist").is_none(), "{r}");
    assert_eq!(m.status()["clients"]["b"]["required_models"], 4);
}
