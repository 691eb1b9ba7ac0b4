//! Model names as ComfyUI turns them into files: normalising the name written in a workflow,
//! the folders searched per category and the names tried in each (COMFYUI.md §1–§2).
//!
//! Pure string functions: the resolver reports NAS-relative candidates in ComfyUI's search order
//! and leaves looking them up to whoever holds the NAS, so that negative lookups happen in the
//! same order ComfyUI would do them.

/// `folder_paths.supported_pt_extensions`, sorted as ComfyUI's sorted file lists are.
pub(crate) const PT_EXTENSIONS: &[&str] = &[
    ".bin",
    ".ckpt",
    ".pkl",
    ".pt",
    ".pt2",
    ".pth",
    ".safetensors",
    ".sft",
];

/// Extensions a model file name can end with besides the PyTorch set.
const OTHER_MODEL_EXTENSIONS: &[&str] = &[".gguf", ".onnx"];

/// Extensions `load_embed` appends, in its order, when `NAME` itself is not a file.
const EMBEDDING_EXTENSIONS: &[&str] = &[".safetensors", ".pt", ".bin"];

use crate::policy::category_folders;
pub use crate::policy::category_key;

/// Normalises a model name as `get_full_path` does (`relpath(join("/", name), "/")`) after
/// turning Windows separators into `/`: no leading `/`, no `.` or empty components, `..` clamped
/// at the category root. `None` for a name that names no file (empty, `.`, `/`).
pub fn normalize_path(name: &str) -> Option<String> {
    let unix = name.replace('\\', "/");
    let mut parts: Vec<&str> = Vec::new();
    for part in unix.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Whether `name` ends with one of `extensions` (compared lowercased, as `folder_paths` does).
pub(crate) fn has_extension(name: &str, extensions: &[&str]) -> bool {
    let lower = name.to_ascii_lowercase();
    extensions.iter().any(|ext| lower.ends_with(ext))
}

/// Whether a string looks like a model file name (used where a widget's position is unknown).
pub(crate) fn looks_like_model_file(name: &str) -> bool {
    has_extension(name, PT_EXTENSIONS) || has_extension(name, OTHER_MODEL_EXTENSIONS)
}

/// Candidate NAS-relative paths ComfyUI would try for `(category, path)`, in its search order.
///
/// - `diffusion_models` → `unet/…` then `diffusion_models/…`; `text_encoders` → `text_encoders/…`
///   then `clip/…`; `controlnet` → `controlnet/…` then `t2i_adapter/…`; legacy names (`unet`,
///   `clip`, `t2i_adapter`) are accepted as categories.
/// - `embeddings`: `NAME`, `NAME.safetensors`, `NAME.pt`, `NAME.bin` (`load_embed`).
/// - `vae_approx` with a name that has no model extension (a TAESD prefix such as
///   `taesd_decoder`): `NAME.<ext>` for every PyTorch extension in sorted order, because
///   `VAELoader` takes the first listed file starting with `NAME.`.
/// - `insightface`: `insightface/models/NAME` (a model pack directory).
///
/// Only the default folders are known here; extra roots from `extra_model_paths.yaml` are the
/// caller's business. Returns nothing for a path that names no file.
pub fn candidate_paths(category: &str, path: &str) -> Vec<String> {
    let key = category_key(category);
    let Some(rel) = normalize_path(path) else {
        return Vec::new();
    };
    let names: Vec<String> = match key {
        "embeddings" => std::iter::once(rel.clone())
            .chain(EMBEDDING_EXTENSIONS.iter().map(|ext| format!("{rel}{ext}")))
            .collect(),
        "vae_approx" if !has_extension(&rel, PT_EXTENSIONS) => PT_EXTENSIONS
            .iter()
            .map(|ext| format!("{rel}{ext}"))
            .collect(),
        "insightface" => vec![format!("models/{rel}")],
        _ => vec![rel],
    };
    let default_folder = [key];
    let folders = match category_folders(key) {
        [] => &default_folder[..],
        some => some,
    };
    folders
        .iter()
        .flat_map(|folder| names.iter().map(move |name| format!("{folder}/{name}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_like_get_full_path() {
        assert_eq!(
            normalize_path(r"sd15\model.safetensors").as_deref(),
            Some("sd15/model.safetensors")
        );
        assert_eq!(normalize_path("/a//./b").as_deref(), Some("a/b"));
        assert_eq!(
            normalize_path("../../etc/passwd").as_deref(),
            Some("etc/passwd")
        );
        assert_eq!(normalize_path(r"a\..\..\b").as_deref(), Some("b"));
        assert_eq!(normalize_path(""), None);
        assert_eq!(normalize_path("./"), None);
        assert_eq!(normalize_path(".."), None);
        // Case is preserved: ComfyUI on Linux treats names case-sensitively.
        assert_eq!(
            normalize_path("SD15/Model.ckpt").as_deref(),
            Some("SD15/Model.ckpt")
        );
    }

    #[test]
    fn search_order_per_category() {
        assert_eq!(
            candidate_paths("diffusion_models", "x.safetensors"),
            ["unet/x.safetensors", "diffusion_models/x.safetensors"]
        );
        assert_eq!(
            candidate_paths("unet", "x.gguf"),
            ["unet/x.gguf", "diffusion_models/x.gguf"]
        );
        assert_eq!(
            candidate_paths("text_encoders", r"t5\x.safetensors"),
            ["text_encoders/t5/x.safetensors", "clip/t5/x.safetensors"]
        );
        assert_eq!(
            candidate_paths("clip", "x.safetensors"),
            ["text_encoders/x.safetensors", "clip/x.safetensors"]
        );
        assert_eq!(
            candidate_paths("controlnet", "c.pth"),
            ["controlnet/c.pth", "t2i_adapter/c.pth"]
        );
        assert_eq!(
            candidate_paths("checkpoints", "sd15/a.ckpt"),
            ["checkpoints/sd15/a.ckpt"]
        );
        assert_eq!(candidate_paths("ipadapter", "x.bin"), ["ipadapter/x.bin"]);
        assert!(candidate_paths("checkpoints", "").is_empty());
    }

    #[test]
    fn embeddings_try_extensions() {
        assert_eq!(
            candidate_paths("embeddings", "easynegative"),
            [
                "embeddings/easynegative",
                "embeddings/easynegative.safetensors",
                "embeddings/easynegative.pt",
                "embeddings/easynegative.bin",
            ]
        );
        assert_eq!(
            candidate_paths("embeddings", "SDA768.pt")[0],
            "embeddings/SDA768.pt"
        );
    }

    #[test]
    fn taesd_prefixes_expand_to_sorted_extensions() {
        let c = candidate_paths("vae_approx", "taesd_decoder");
        assert_eq!(c.len(), PT_EXTENSIONS.len());
        assert_eq!(c[0], "vae_approx/taesd_decoder.bin");
        assert!(c.contains(&"vae_approx/taesd_decoder.pth".to_owned()));
        assert_eq!(
            candidate_paths("vae_approx", "taef1_decoder.safetensors"),
            ["vae_approx/taef1_decoder.safetensors"]
        );
        assert_eq!(
            candidate_paths("insightface", "buffalo_l"),
            ["insightface/models/buffalo_l"]
        );
    }

    #[test]
    fn extension_checks_ignore_case() {
        assert!(has_extension("X.GGUF", &[".gguf"]));
        assert!(looks_like_model_file("a/b.SafeTensors"));
        assert!(!looks_like_model_file("AdamW"));
    }
}
