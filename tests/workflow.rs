//! The workflow resolver over the shared corpus of real public workflows
//! (`../shared/fixtures/workflows/`, read in place), compared with `EXPECTED.json`, whose
//! statuses were read by hand.
//!
//! `EXPECTED.json` maps a file name to `exec` and `mentioned_only` lists of
//! `[category, filename]`, a `declared` list of `[directory, name, url]`, and `unresolved`
//! objects whose `node` is `"<id> <class>"`. An absent key is an empty set; the three sets are
//! compared exactly, and every expected unresolved loader must be reported as unresolved.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use arenafs::workflow::{ModelStatus, Resolution, resolve_file};
use serde_json::Value;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/workflows")
}

/// The corpus directory, or `None` (with a message) when this clone has none beside it.
fn corpus() -> Option<PathBuf> {
    let dir = fixtures_dir();
    if dir.join("EXPECTED.json").is_file() {
        return Some(dir);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "workflow fixtures missing at {}: CI must run next to shared/",
            dir.display()
        );
    }
    eprintln!(
        "skipping: no workflow fixtures at {} (a clone outside the workspace)",
        dir.display()
    );
    None
}

fn pairs(expected: &Value, key: &str) -> BTreeSet<(String, String)> {
    expected
        .get(key)
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .map(|pair| {
                    (
                        pair[0].as_str().expect("category").to_owned(),
                        pair[1].as_str().expect("filename").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn got_pairs(resolution: &Resolution, status: ModelStatus) -> BTreeSet<(String, String)> {
    resolution
        .with_status(status)
        .map(|m| {
            (
                m.category.clone().unwrap_or_default(),
                m.filename.clone().unwrap_or_default(),
            )
        })
        .collect()
}

fn declared(expected: &Value) -> BTreeSet<(String, String, String)> {
    expected
        .get("declared")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .map(|t| {
                    let s = |i: usize| t[i].as_str().expect("string").to_owned();
                    (s(0), s(1), s(2))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn got_declared(resolution: &Resolution) -> BTreeSet<(String, String, String)> {
    resolution
        .with_status(ModelStatus::Declared)
        .map(|m| {
            (
                m.directory.clone().unwrap_or_default(),
                m.filename.clone().unwrap_or_default(),
                m.url.clone().unwrap_or_default(),
            )
        })
        .collect()
}

/// Differences between what a file should resolve to and what it does, one line each.
fn check(name: &str, expected: &Value, resolution: &Resolution) -> Vec<String> {
    let mut problems = Vec::new();
    for (key, status) in [
        ("exec", ModelStatus::Exec),
        ("mentioned_only", ModelStatus::MentionedOnly),
    ] {
        let want = pairs(expected, key);
        let got = got_pairs(resolution, status);
        if want != got {
            problems.push(format!("{name}: {key}: expected {want:?}, got {got:?}"));
        }
    }
    let (want, got) = (declared(expected), got_declared(resolution));
    if want != got {
        problems.push(format!("{name}: declared: expected {want:?}, got {got:?}"));
    }
    for item in expected
        .get("unresolved")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let node = item["node"].as_str().expect("node");
        let (id, class) = node.split_once(' ').expect("\"<id> <class>\"");
        let reported = resolution.with_status(ModelStatus::Unresolved).any(|m| {
            m.nodes.iter().any(|n| n == id)
                && m.reason.as_deref().is_some_and(|r| r.contains(class))
        });
        if !reported {
            problems.push(format!("{name}: node {node} is not reported unresolved"));
        }
    }
    problems
}

#[test]
fn corpus_matches_expectations() {
    let Some(dir) = corpus() else { return };
    let expected: Value = serde_json::from_slice(
        &std::fs::read(dir.join("EXPECTED.json")).expect("read EXPECTED.json"),
    )
    .expect("EXPECTED.json parses");
    let expected = expected.as_object().expect("EXPECTED.json is an object");

    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("list fixtures")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".json") && n != "EXPECTED.json")
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no workflow files in {}", dir.display());

    let mut problems = Vec::new();
    for name in &files {
        let Some(want) = expected.get(name) else {
            problems.push(format!("{name}: no entry in EXPECTED.json"));
            continue;
        };
        match resolve_file(&dir.join(name)) {
            Ok(resolution) => problems.extend(check(name, want, &resolution)),
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    for name in expected.keys() {
        if !files.contains(name) {
            problems.push(format!("{name}: in EXPECTED.json but not in the folder"));
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} workflows differ:\n{}",
        problems.len(),
        files.len(),
        problems.join("\n")
    );
    println!("{} workflows match EXPECTED.json", files.len());
}

#[test]
fn corpus_statuses_are_consistent() {
    // Properties every resolution has, whatever the expectations say.
    let Some(dir) = corpus() else { return };
    for entry in std::fs::read_dir(&dir).expect("list fixtures") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.ends_with(".json") || name == "EXPECTED.json" {
            continue;
        }
        let resolution = resolve_file(&path).expect("resolves");
        for model in &resolution.models {
            match model.status {
                ModelStatus::Exec | ModelStatus::MentionedOnly => {
                    assert!(
                        model.category.is_some() && model.path.is_some(),
                        "{name}: {model:?}"
                    );
                    assert!(!model.nodes.is_empty(), "{name}: {model:?}");
                }
                ModelStatus::Declared => assert!(model.url.is_some(), "{name}: {model:?}"),
                ModelStatus::Unresolved => assert!(model.reason.is_some(), "{name}: {model:?}"),
            }
            if let Some(path) = &model.path {
                assert!(
                    !path.contains('\\') && !path.starts_with('/'),
                    "{name}: {path}"
                );
            }
        }
        // The JSON the CLI and the API will print round-trips.
        let json = serde_json::to_string(&resolution).expect("serializes");
        let back: Resolution = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, resolution);
    }
}
