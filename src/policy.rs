//! What gets cached: pure decisions over a NAS path and its size (DESIGN.md §4).
//!
//! The category of a file is the first component of its path under the NAS root. Folder names map
//! to ComfyUI's category keys as `folder_paths` does (`clip` → `text_encoders`, `unet` →
//! `diffusion_models`, `t2i_adapter` → `controlnet`), so either spelling works in settings.

use std::collections::BTreeSet;
use std::path::{Component, Path};

/// Categories cached when no setting says otherwise (keys; folder aliases map onto them).
pub const DEFAULT_CATEGORIES: &[&str] = &[
    "checkpoints",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "controlnet",
    "upscale_models",
    "embeddings",
    "hypernetworks",
    "clip_vision",
    "style_models",
    "gligen",
    "photomaker",
    "model_patches",
    "audio_encoders",
];

/// Category keys ComfyUI and popular custom nodes know (COMFYUI.md §1); others draw a warning.
pub const KNOWN_CATEGORIES: &[&str] = &[
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "gligen",
    "upscale_models",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
    "latent_upscale_models",
    "background_removal",
    "frame_interpolation",
    "geometry_estimation",
    "optical_flow",
    "detection",
    "ipadapter",
    "sams",
    "insightface",
    "ultralytics",
    "mmdets",
    "onnx",
    "unet_gguf",
    "clip_gguf",
];

/// Path components that `ARENA_CACHE_SKIP_HARDCODED` never caches (the original's v2 list).
pub const HARDCODED_SKIPS: &[&str] = &[
    "controlnet",
    "control_net",
    "insightface",
    "ipadapter",
    "clip_vision",
];

/// Files smaller than this are read from the NAS without caching, by default (10 MB, as the
/// original tool's `ARENA_CACHE_MIN_SIZE_MB=10`).
pub const DEFAULT_MIN_SIZE: u64 = 10 * 1000 * 1000;

/// Maps a folder name to its ComfyUI category key.
pub fn category_key(folder: &str) -> &str {
    match folder {
        "clip" | "clip_gguf" => "text_encoders",
        "unet" | "unet_gguf" => "diffusion_models",
        "t2i_adapter" => "controlnet",
        other => other,
    }
}

/// The folders ComfyUI searches for a category key, in its order (`folder_paths`); a key not
/// listed has one folder of its own name.
pub fn category_folders(key: &str) -> &[&str] {
    match key {
        "text_encoders" => &["text_encoders", "clip"],
        "diffusion_models" => &["unet", "diffusion_models"],
        "controlnet" => &["controlnet", "t2i_adapter"],
        _ => &[],
    }
}

/// The category key of a NAS-relative path: its first component, mapped. `None` for files at the
/// root (they belong to no category).
pub fn category_of(rel: &Path) -> Option<&str> {
    let mut comps = rel.components();
    let first = comps.next()?;
    comps.next()?; // a file directly under the root has no category
    match first {
        Component::Normal(name) => name.to_str().map(category_key),
        _ => None,
    }
}

/// Why a file is or is not cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Read through the SSD cache and complete the copy.
    Cache,
    /// Caching is disabled (gray state).
    Disabled,
    /// Its category is not in the allow-list.
    CategoryNotAllowed,
    /// It is below the size floor.
    TooSmall,
    /// An exclude pattern matches it.
    Excluded,
    /// `ARENA_CACHE_SKIP_HARDCODED` and its path names a skipped family.
    Hardcoded,
}

/// The caching policy of a mount (pure; built from the settings).
#[derive(Clone, Debug)]
pub struct Policy {
    categories: BTreeSet<String>,
    min_size: u64,
    exclude: globset::GlobSet,
    skip_hardcoded: bool,
    enabled: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self::new(DEFAULT_CATEGORIES.iter().copied(), DEFAULT_MIN_SIZE)
    }
}

impl Policy {
    /// A policy caching `categories` (keys or folder names) from `min_size` bytes up.
    pub fn new<'a>(categories: impl IntoIterator<Item = &'a str>, min_size: u64) -> Self {
        Self {
            categories: categories
                .into_iter()
                .map(|c| category_key(c.trim()).to_string())
                .filter(|c| !c.is_empty())
                .collect(),
            min_size,
            exclude: globset::GlobSet::empty(),
            skip_hardcoded: false,
            enabled: true,
        }
    }

    /// The policy the settings describe.
    pub fn from_settings(s: &crate::config::Settings) -> Self {
        let cats = s.effective_categories();
        let mut p = Self::new(cats.iter().map(String::as_str), s.min_size);
        p.exclude = glob_set(&s.exclude);
        p.skip_hardcoded = s.skip_hardcoded;
        p.enabled = s.state() != crate::config::CacheState::Gray;
        p
    }

    /// The allowed category keys.
    pub fn categories(&self) -> impl Iterator<Item = &str> {
        self.categories.iter().map(String::as_str)
    }

    /// The size floor in bytes.
    pub fn min_size(&self) -> u64 {
        self.min_size
    }

    /// Whether a regular file at `rel` of `size` bytes is cached.
    pub fn decide(&self, rel: &Path, size: u64) -> Decision {
        if !self.enabled {
            return Decision::Disabled;
        }
        match category_of(rel) {
            Some(c) if self.categories.contains(c) => {}
            _ => return Decision::CategoryNotAllowed,
        }
        if self.skip_hardcoded && names_hardcoded(rel) {
            return Decision::Hardcoded;
        }
        if self.exclude.is_match(rel) {
            return Decision::Excluded;
        }
        if size < self.min_size {
            return Decision::TooSmall;
        }
        Decision::Cache
    }
}

/// Compiles glob patterns (validated by the config loader; a bad one is skipped).
pub fn glob_set(patterns: &[String]) -> globset::GlobSet {
    let mut b = globset::GlobSetBuilder::new();
    for p in patterns {
        if let Ok(g) = globset::GlobBuilder::new(p).literal_separator(true).build() {
            b.add(g);
        }
    }
    b.build().unwrap_or_else(|_| globset::GlobSet::empty())
}

fn names_hardcoded(rel: &Path) -> bool {
    rel.components().any(|c| {
        let c = c.as_os_str().to_string_lossy().to_ascii_lowercase();
        HARDCODED_SKIPS.iter().any(|h| c.contains(h))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_map_folder_aliases() {
        assert_eq!(
            category_of(Path::new("clip/t5.safetensors")),
            Some("text_encoders")
        );
        assert_eq!(
            category_of(Path::new("unet/a/b.gguf")),
            Some("diffusion_models")
        );
        assert_eq!(
            category_of(Path::new("t2i_adapter/x.pth")),
            Some("controlnet")
        );
        assert_eq!(category_of(Path::new("loras/x.safetensors")), Some("loras"));
        assert_eq!(category_of(Path::new("top.safetensors")), None);
        assert_eq!(category_of(Path::new("")), None);
    }

    #[test]
    fn decide_by_category_and_size() {
        let p = Policy::default();
        assert_eq!(
            p.decide(Path::new("checkpoints/a.safetensors"), 20_000_000),
            Decision::Cache
        );
        assert_eq!(
            p.decide(Path::new("clip/a.safetensors"), 20_000_000),
            Decision::Cache
        );
        assert_eq!(
            p.decide(Path::new("checkpoints/a.safetensors"), 9_999_999),
            Decision::TooSmall
        );
        assert_eq!(
            p.decide(Path::new("custom_stuff/a.bin"), 20_000_000),
            Decision::CategoryNotAllowed
        );
        assert_eq!(
            p.decide(Path::new("a.safetensors"), 20_000_000),
            Decision::CategoryNotAllowed
        );
    }

    #[test]
    fn excludes_hardcoded_and_states() {
        use crate::config::Settings;
        let mut s = Settings {
            exclude: vec!["loras/test/**".into(), "**/*.ckpt".into()],
            skip_hardcoded: true,
            min_size: 0,
            ..Settings::default()
        };
        let p = Policy::from_settings(&s);
        assert_eq!(
            p.decide(Path::new("loras/test/a.safetensors"), 1),
            Decision::Excluded
        );
        assert_eq!(
            p.decide(Path::new("checkpoints/x/old.ckpt"), 1),
            Decision::Excluded
        );
        assert_eq!(
            p.decide(Path::new("loras/a.safetensors"), 1),
            Decision::Cache
        );
        assert_eq!(
            p.decide(Path::new("controlnet/x.safetensors"), 1),
            Decision::Hardcoded
        );
        assert_eq!(
            p.decide(Path::new("loras/IPAdapter_faces/x.bin"), 1),
            Decision::Hardcoded
        );
        assert_eq!(
            p.decide(Path::new("clip_vision/x.bin"), 1),
            Decision::Hardcoded
        );
        s.enabled = false;
        assert_eq!(
            Policy::from_settings(&s).decide(Path::new("loras/a"), 1),
            Decision::Disabled
        );
        s.enabled = true;
        s.autopatch = false; // green still serves copies: the policy allows, the cache makes none
        assert_eq!(
            Policy::from_settings(&s).decide(Path::new("loras/a"), 1),
            Decision::Cache
        );
    }

    #[test]
    fn explicit_list_accepts_either_spelling() {
        let p = Policy::new(["unet", " loras "], 0);
        assert_eq!(
            p.categories().collect::<Vec<_>>(),
            ["diffusion_models", "loras"]
        );
        assert_eq!(
            p.decide(Path::new("diffusion_models/x"), 0),
            Decision::Cache
        );
        assert_eq!(
            p.decide(Path::new("vae/x"), 0),
            Decision::CategoryNotAllowed
        );
    }
}
