//! From a workflow to files on the NAS: places each entry of a [`Resolution`] where ComfyUI would
//! find it (its folder search order, legacy folders, extension rules), and, with a running cache,
//! says what is cached and what a prefetch would copy under the policy and the byte budget.
//!
//! Used by `arenafs resolve --workflow` (with or without a daemon) and by `POST /arena/workflow`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::source::Nas;
use crate::workflow::{ModelRef, ModelStatus, Resolution, WorkflowFormat, candidate_paths};

/// One entry of a resolution, placed on the NAS.
#[derive(Clone, Debug, Serialize)]
pub struct Located {
    /// What the resolver said (category, filename as written, normalised path, status, nodes,
    /// url/directory/reason/extensions where they apply).
    #[serde(flatten)]
    pub model: ModelRef,
    /// The NAS-relative path ComfyUI would open (the first candidate that exists); `null` when
    /// not found or not looked up.
    pub nas_path: Option<PathBuf>,
    /// Whether it exists on the NAS; `null` when the NAS was not consulted or the entry names no
    /// file.
    pub on_nas: Option<bool>,
    /// Its size (files only).
    pub size: Option<u64>,
    /// When it is nowhere and its loader has read other folders in other versions: every path
    /// looked at, in ComfyUI's search order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<PathBuf>,
    /// `complete`, `partial` or `none`; `null` where unknown (no daemon asked).
    pub cache: Option<&'static str>,
    /// Bytes already cached; `null` where unknown.
    pub cached_bytes: Option<u64>,
    /// Whether a prefetch of the workflow would copy it (exec entries only); `null` where unknown.
    pub copy: Option<bool>,
    /// Why it would or would not be copied (`queued`, `complete`, `not_exec`, `too_small`,
    /// `category_not_allowed`, `budget_exceeded`, ...); `null` where unknown.
    pub why: Option<&'static str>,
}

/// A resolution placed on the NAS, with totals.
#[derive(Clone, Debug, Serialize)]
pub struct WorkflowReport {
    /// The graph form the statuses were decided on.
    pub format: WorkflowFormat,
    /// One entry per (status, category, path), as the resolver gave them.
    pub models: Vec<Located>,
    /// Sums.
    pub totals: WorkflowTotals,
    /// The resolver's warnings.
    pub warnings: Vec<String>,
}

/// Sums over the `exec` entries (the files the workflow loads).
#[derive(Clone, Debug, Default, Serialize)]
pub struct WorkflowTotals {
    /// Entries per status.
    pub exec: usize,
    /// Entries only mentioned.
    pub mentioned_only: usize,
    /// `models` list entries.
    pub declared: usize,
    /// Loaders whose files cannot be named.
    pub unresolved: usize,
    /// `exec` entries not on the NAS (`null` when the NAS was not consulted).
    pub missing: Option<usize>,
    /// Bytes of the `exec` files on the NAS.
    pub bytes_on_nas: Option<u64>,
    /// Bytes of them already cached.
    pub bytes_cached: Option<u64>,
    /// Bytes a prefetch would copy.
    pub bytes_to_copy: Option<u64>,
    /// What is left of the byte budget (`null` without one or when unknown).
    pub budget_remaining: Option<u64>,
}

/// A file found on the NAS: its path and size (`None` for a directory).
type Found = (PathBuf, Option<u64>);

/// Where a file of `model` is on the NAS: the first of ComfyUI's candidates that exists, with
/// its size (`None` for a directory entry), searched in the model's category and then in the
/// folders other versions of its loader read (`previous_categories`). `Err(candidates)` when
/// nothing exists: every path looked at, when there was more than one folder to look in.
fn find(nas: &Nas, model: &ModelRef) -> Option<Result<Found, Vec<PathBuf>>> {
    let (Some(category), Some(path)) = (&model.category, &model.path) else {
        return None;
    };
    let folder = model
        .extensions
        .as_deref()
        .is_some_and(|e| e.iter().any(|x| x == "folder"));
    let candidates: Vec<String> = std::iter::once(category)
        .chain(&model.previous_categories)
        .flat_map(|c| candidate_paths(c, path))
        .collect();
    if candidates.is_empty() {
        return None;
    }
    for c in &candidates {
        let rel = PathBuf::from(c);
        if let Ok(st) = nas.stat(&rel) {
            match st.st_mode & libc::S_IFMT {
                libc::S_IFREG if !folder => return Some(Ok((rel, Some(st.st_size as u64)))),
                libc::S_IFDIR if folder => return Some(Ok((rel, None))),
                _ => {}
            }
        }
    }
    let looked = if model.previous_categories.is_empty() {
        Vec::new()
    } else {
        candidates.into_iter().map(PathBuf::from).collect()
    };
    Some(Err(looked))
}

/// Places every entry on the NAS (or, without one, only passes the resolution on).
pub fn locate(res: Resolution, nas: Option<&Nas>) -> WorkflowReport {
    let models: Vec<Located> = res
        .models
        .into_iter()
        .map(|model| {
            let found = nas.and_then(|n| find(n, &model));
            let (nas_path, on_nas, size, candidates) = match found {
                Some(Ok((p, size))) => (Some(p), Some(true), size, Vec::new()),
                Some(Err(looked)) => (None, Some(false), None, looked),
                None => (None, None, None, Vec::new()),
            };
            Located {
                model,
                nas_path,
                on_nas,
                size,
                candidates,
                cache: None,
                cached_bytes: None,
                copy: None,
                why: None,
            }
        })
        .collect();
    let mut report = WorkflowReport {
        format: res.format,
        models,
        totals: WorkflowTotals::default(),
        warnings: res.warnings,
    };
    report.total(nas.is_some());
    report
}

impl WorkflowReport {
    /// NAS paths of the `exec` files found, without duplicates, in order.
    pub fn exec_paths(&self) -> Vec<PathBuf> {
        let mut seen: HashSet<&PathBuf> = HashSet::new();
        self.exec()
            .filter(|m| m.size.is_some())
            .filter_map(|m| m.nas_path.as_ref())
            .filter(|p| seen.insert(*p))
            .cloned()
            .collect()
    }

    fn exec(&self) -> impl Iterator<Item = &Located> {
        self.models
            .iter()
            .filter(|m| m.model.status == ModelStatus::Exec)
    }

    /// Recomputes the totals (after cache facts were filled in).
    pub fn total(&mut self, looked_up: bool) {
        let count = |s| self.models.iter().filter(|m| m.model.status == s).count();
        let mut t = WorkflowTotals {
            exec: count(ModelStatus::Exec),
            mentioned_only: count(ModelStatus::MentionedOnly),
            declared: count(ModelStatus::Declared),
            unresolved: count(ModelStatus::Unresolved),
            budget_remaining: self.totals.budget_remaining,
            ..Default::default()
        };
        if looked_up {
            let mut seen: HashSet<&Path> = HashSet::new();
            let (mut missing, mut on_nas, mut cached, mut to_copy) = (0, 0, None, None);
            for m in self.exec() {
                if m.on_nas == Some(false) {
                    missing += 1;
                }
                let Some(p) = m.nas_path.as_deref() else {
                    continue;
                };
                if !seen.insert(p) {
                    continue;
                }
                on_nas += m.size.unwrap_or(0);
                if let Some(c) = m.cached_bytes {
                    *cached.get_or_insert(0) += c;
                }
                if let Some(copy) = m.copy {
                    let add = if copy {
                        m.size.unwrap_or(0) - m.cached_bytes.unwrap_or(0)
                    } else {
                        0
                    };
                    *to_copy.get_or_insert(0) += add;
                }
            }
            t.missing = Some(missing);
            t.bytes_on_nas = Some(on_nas);
            t.bytes_cached = cached;
            t.bytes_to_copy = to_copy;
        }
        self.totals = t;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_entries_in_comfyui_search_order() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "unet/flux.safetensors",
            "diffusion_models/flux.safetensors",
            "clip/t5.safetensors",
            "embeddings/neg.pt",
        ] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"12345").unwrap();
        }
        std::fs::create_dir_all(dir.path().join("insightface/models/antelopev2")).unwrap();
        let wf = serde_json::json!({
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux.safetensors", "weight_dtype": "default"}},
            "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5.safetensors", "type": "flux"}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "embedding:neg, a cat", "clip": ["2", 0]}},
            "4": {"class_type": "VAELoader", "inputs": {"vae_name": "missing.safetensors"}},
            "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["3", 0]}},
            "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["4", 0]}},
            "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0]}},
        });
        let res = crate::workflow::resolve_json(wf.to_string().as_bytes()).unwrap();
        let nas = Nas::open(dir.path()).unwrap();
        let r = locate(res.clone(), Some(&nas));
        let at = |f: &str| {
            r.models
                .iter()
                .find(|m| m.model.filename.as_deref() == Some(f))
                .unwrap_or_else(|| panic!("{f} in {r:?}"))
        };
        assert_eq!(
            at("flux.safetensors").nas_path.as_deref(),
            Some(Path::new("unet/flux.safetensors")),
            "unet/ is searched before diffusion_models/"
        );
        assert_eq!(
            at("t5.safetensors").nas_path.as_deref(),
            Some(Path::new("clip/t5.safetensors"))
        );
        assert_eq!(
            at("neg").nas_path.as_deref(),
            Some(Path::new("embeddings/neg.pt"))
        );
        assert_eq!(at("missing.safetensors").on_nas, Some(false));
        assert_eq!(r.totals.exec, 4);
        assert_eq!(r.totals.missing, Some(1));
        assert_eq!(r.totals.bytes_on_nas, Some(15));
        assert_eq!(r.exec_paths().len(), 3);
        // Without a NAS: parsed only, nothing claimed.
        let bare = locate(res, None);
        assert!(bare.models.iter().all(|m| m.on_nas.is_none()));
        assert_eq!(bare.totals.missing, None);
        assert_eq!(bare.totals.exec, 4);
    }

    /// A loader that moved between folders across versions of its package: a workflow saved
    /// with the old version names a file in the old folder, and finds it there.
    #[test]
    fn a_loader_that_changed_folders_is_searched_in_all_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("text_encoders/clip_vision_h.safetensors");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"12345").unwrap();
        let wf = |name: &str| {
            serde_json::json!({
                "1": {"class_type": "LoadWanVideoClipTextEncoder",
                      "inputs": {"model_name": name, "precision": "fp16", "load_device": "offload_device"}},
                "2": {"class_type": "WanVideoSampler", "inputs": {"clip": ["1", 0]}},
            })
            .to_string()
        };
        let nas = Nas::open(dir.path()).unwrap();
        let res =
            crate::workflow::resolve_json(wf("clip_vision_h.safetensors").as_bytes()).unwrap();
        let r = locate(res, Some(&nas));
        let m = &r.models[0];
        assert_eq!(m.model.category.as_deref(), Some("clip_vision"));
        assert_eq!(m.model.previous_categories, ["text_encoders"]);
        assert_eq!(
            m.nas_path.as_deref(),
            Some(Path::new("text_encoders/clip_vision_h.safetensors")),
            "{r:?}"
        );
        assert!(m.candidates.is_empty());
        // Also in the current folder: that one is what the current version opens.
        let q = dir.path().join("clip_vision/clip_vision_h.safetensors");
        std::fs::create_dir_all(q.parent().unwrap()).unwrap();
        std::fs::write(&q, b"123").unwrap();
        let res =
            crate::workflow::resolve_json(wf("clip_vision_h.safetensors").as_bytes()).unwrap();
        let r = locate(res, Some(&nas));
        assert_eq!(
            r.models[0].nas_path.as_deref(),
            Some(Path::new("clip_vision/clip_vision_h.safetensors"))
        );
        // Nowhere: every folder looked at is reported, in search order.
        let res = crate::workflow::resolve_json(wf("gone.safetensors").as_bytes()).unwrap();
        let r = locate(res, Some(&nas));
        let m = &r.models[0];
        assert_eq!(m.on_nas, Some(false));
        assert_eq!(
            m.candidates,
            [
                PathBuf::from("clip_vision/gone.safetensors"),
                PathBuf::from("text_encoders/gone.safetensors"),
                PathBuf::from("clip/gone.safetensors"),
            ]
        );
        let json = serde_json::to_value(m).unwrap();
        assert_eq!(json["previous_categories"][0], "text_encoders");
        assert_eq!(json["candidates"][1], "text_encoders/gone.safetensors");
    }
}
