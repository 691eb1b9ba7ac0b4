//! The manifest of tracked models (TOML, one `[[model]]` table each), checked with line numbers
//! like the env file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::models::{self, ModelRef};

/// Most models one manifest may track.
pub const MAX_MODELS: usize = 10_000;
/// Most old versions kept per model.
pub const MAX_KEEP: u32 = 20;

/// Where a model comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A file of a Hugging Face repository, at a branch (followed) or a commit (pinned).
    Hf {
        /// `owner/name`.
        repo: String,
        /// Path of the file in the repository.
        path: String,
        /// Branch, tag or commit.
        revision: String,
    },
    /// A file of a CivitAI model version.
    Civitai {
        /// The model's id.
        model_id: u64,
        /// `None`: the latest version; else this version id.
        version: Option<u64>,
        /// `None`: the primary file; else the file of this name.
        file: Option<String>,
    },
}

impl Source {
    /// The service's name, as messages and metrics say it.
    pub fn service(&self) -> &'static str {
        match self {
            Source::Hf { .. } => "huggingface",
            Source::Civitai { .. } => "civitai",
        }
    }
}

/// One tracked model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Model {
    /// Unique id within the manifest (`[A-Za-z0-9._-]`, at most 64).
    pub id: String,
    /// The target as written: `category/path`.
    pub target: ModelRef,
    /// Where it comes from.
    pub source: Source,
    /// A SHA-256 the installed file must have (lowercase hex), if pinned.
    pub sha256: Option<String>,
    /// Old versions kept for rollback.
    pub keep: u32,
    /// Line of its `[[model]]` table.
    pub line: usize,
}

impl Model {
    /// The NAS-relative path of the target: where it is now in ComfyUI's search order, else in
    /// the category's first folder.
    pub fn target_path(&self, nas_root: &Path) -> PathBuf {
        let candidates = self.target.candidates();
        candidates
            .iter()
            .find(|p| nas_root.join(p).is_file())
            .or(candidates.first())
            .cloned()
            .unwrap_or_else(|| PathBuf::from(&self.target.category).join(&self.target.filename))
    }
}

/// The manifest: its models in file order.
#[derive(Clone, Debug, Default)]
pub struct Manifest {
    /// The models.
    pub models: Vec<Model>,
}

/// A manifest that cannot be used, with every problem found (each with its line).
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ManifestError {
    /// One line per problem: `FILE:LINE: what`.
    pub problems: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(default)]
    model: Vec<toml::Spanned<RawModel>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    id: String,
    target: String,
    hf: Option<RawHf>,
    civitai: Option<RawCivitai>,
    sha256: Option<String>,
    keep: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHf {
    repo: String,
    path: String,
    revision: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCivitai {
    model_id: u64,
    version: Option<RawVersion>,
    file: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawVersion {
    Id(u64),
    Word(String),
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn valid_repo(repo: &str) -> bool {
    let mut parts = repo.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

fn valid_repo_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && !path.contains(['\0', '\\', '?', '#'])
}

/// Is `s` a SHA-256 in hex (either case)?
pub fn valid_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Manifest {
    /// Reads and checks the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|e| ManifestError {
            problems: vec![format!("{}: cannot read the manifest: {e}", path.display())],
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Checks manifest `text`; `name` prefixes the messages.
    pub fn parse(text: &str, name: &str) -> Result<Manifest, ManifestError> {
        let raw: RawManifest = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
            ManifestError {
                problems: vec![format!("{name}:{line}: {}", e.message().trim_end())],
            }
        })?;
        let mut problems = Vec::new();
        let mut models = Vec::new();
        let mut ids = std::collections::HashMap::new();
        let mut targets = std::collections::HashMap::new();
        if raw.model.len() > MAX_MODELS {
            problems.push(format!(
                "{name}: {} models; at most {MAX_MODELS} can be tracked",
                raw.model.len()
            ));
        }
        for spanned in raw.model.into_iter().take(MAX_MODELS) {
            let line = line_of(text, spanned.span().start);
            let m = spanned.into_inner();
            let mut bad = |what: String| problems.push(format!("{name}:{line}: {what}"));
            if !valid_id(&m.id) {
                bad(format!(
                    "id {:?}: use 1 to 64 letters, digits, '.', '_' or '-'",
                    m.id
                ));
            } else if let Some(first) = ids.insert(m.id.clone(), line) {
                bad(format!("id {:?} is also used at line {first}", m.id));
            }
            let target = match models::parse_path(&m.target) {
                Ok(t) => Some(t),
                Err(e) => {
                    bad(format!("target {:?}: {e}", m.target));
                    None
                }
            };
            if let Some(t) = &target {
                let key = format!("{}/{}", t.category, t.filename);
                if let Some(first) = targets.insert(key, line) {
                    bad(format!(
                        "target {:?} is also tracked at line {first}",
                        m.target
                    ));
                }
            }
            let source = match (m.hf, m.civitai) {
                (Some(hf), None) => {
                    if !valid_repo(&hf.repo) {
                        bad(format!("hf.repo {:?}: expected \"owner/name\"", hf.repo));
                    }
                    if !valid_repo_path(&hf.path) {
                        bad(format!(
                            "hf.path {:?}: a relative path inside the repository",
                            hf.path
                        ));
                    }
                    let revision = hf.revision.unwrap_or_else(|| "main".into());
                    if revision.is_empty()
                        || revision.len() > 255
                        || revision.contains(['\0', '?', '#', ' ', '\\'])
                        || revision.split('/').any(|c| c.is_empty() || c == "..")
                    {
                        bad(format!(
                            "hf.revision {revision:?}: not a branch, tag or commit"
                        ));
                    }
                    Some(Source::Hf {
                        repo: hf.repo,
                        path: hf.path,
                        revision,
                    })
                }
                (None, Some(c)) => {
                    let version = match c.version {
                        None => None,
                        Some(RawVersion::Id(v)) => Some(v),
                        Some(RawVersion::Word(w)) if w == "latest" => None,
                        Some(RawVersion::Word(w)) => match w.parse::<u64>() {
                            Ok(v) => Some(v),
                            Err(_) => {
                                bad(format!("civitai.version {w:?}: \"latest\" or a version id"));
                                None
                            }
                        },
                    };
                    let file = match c.file {
                        None => None,
                        Some(f) if f == "primary" => None,
                        Some(f) if f.is_empty() || f.contains(['/', '\0']) => {
                            bad(format!("civitai.file {f:?}: \"primary\" or a file name"));
                            None
                        }
                        Some(f) => Some(f),
                    };
                    Some(Source::Civitai {
                        model_id: c.model_id,
                        version,
                        file,
                    })
                }
                (Some(_), Some(_)) => {
                    bad("both hf and civitai: a model has one source".into());
                    None
                }
                (None, None) => {
                    bad("no source: give hf = { ... } or civitai = { ... }".into());
                    None
                }
            };
            let sha256 = m.sha256.map(|s| s.to_ascii_lowercase());
            if let Some(s) = &sha256
                && !valid_sha256(s)
            {
                bad(format!("sha256 {s:?}: 64 hex digits"));
            }
            let keep = m.keep.unwrap_or(1);
            if keep > MAX_KEEP {
                bad(format!("keep = {keep}: at most {MAX_KEEP}"));
            }
            if let (Some(target), Some(source)) = (target, source) {
                models.push(Model {
                    id: m.id,
                    target,
                    source,
                    sha256,
                    keep,
                    line,
                });
            }
        }
        if problems.is_empty() {
            Ok(Manifest { models })
        } else {
            Err(ManifestError { problems })
        }
    }

    /// The models with these ids (all of them for none); an unknown id is an error.
    pub fn select(&self, ids: &[String]) -> Result<Vec<&Model>, String> {
        if ids.is_empty() {
            return Ok(self.models.iter().collect());
        }
        ids.iter()
            .map(|id| {
                self.models
                    .iter()
                    .find(|m| &m.id == id)
                    .ok_or_else(|| format!("no model {id:?} in the manifest"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
# studio models
[[model]]
id = "sdxl-base"
target = "checkpoints/sd_xl_base_1.0.safetensors"
hf = { repo = "stabilityai/stable-diffusion-xl-base-1.0", path = "sd_xl_base_1.0.safetensors", revision = "main" }
keep = 2

[[model]]
id = "detail-lora"
target = "loras/detail.safetensors"
civitai = { model_id = 58390, version = "latest", file = "primary" }
sha256 = "ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
"#;

    #[test]
    fn a_good_manifest_parses() {
        let m = Manifest::parse(GOOD, "m.toml").unwrap();
        assert_eq!(m.models.len(), 2);
        let a = &m.models[0];
        assert_eq!(a.id, "sdxl-base");
        assert_eq!(a.line, 3);
        assert_eq!(a.keep, 2);
        assert_eq!(
            a.source,
            Source::Hf {
                repo: "stabilityai/stable-diffusion-xl-base-1.0".into(),
                path: "sd_xl_base_1.0.safetensors".into(),
                revision: "main".into()
            }
        );
        let b = &m.models[1];
        assert_eq!(b.line, 9);
        assert_eq!(b.keep, 1);
        assert_eq!(
            b.source,
            Source::Civitai {
                model_id: 58390,
                version: None,
                file: None
            }
        );
        assert!(b.sha256.as_deref().unwrap().starts_with("abcdef"));
        assert_eq!(
            b.target_path(Path::new("/nonexistent")),
            PathBuf::from("loras/detail.safetensors")
        );
        assert_eq!(m.select(&["detail-lora".into()]).unwrap().len(), 1);
        assert!(m.select(&["nope".into()]).is_err());
    }

    #[test]
    fn problems_name_their_lines() {
        let text = "[[model]]\nid = \"a\"\ntarget = \"../etc/passwd\"\nhf = { repo = \"x\", path = \"/abs\" }\n\n[[model]]\nid = \"a\"\ntarget = \"loras/x.safetensors\"\ncivitai = { model_id = 1, version = \"newest\" }\nsha256 = \"12\"\nkeep = 99\n\n[[model]]\nid = \"c\"\ntarget = \"loras/y.safetensors\"\n";
        let e = Manifest::parse(text, "m.toml").unwrap_err();
        let all = e.problems.join("\n");
        for want in [
            "m.toml:1: target \"../etc/passwd\"",
            "m.toml:1: hf.repo \"x\"",
            "m.toml:1: hf.path \"/abs\"",
            "m.toml:6: id \"a\" is also used at line 1",
            "m.toml:6: civitai.version \"newest\"",
            "m.toml:6: sha256 \"12\"",
            "m.toml:6: keep = 99",
            "m.toml:13: no source",
        ] {
            assert!(all.contains(want), "{want} not in:\n{all}");
        }
        // Syntax and unknown keys: the line of the error.
        let e = Manifest::parse("[[model]]\nid = \"a\"\ntarget = \n", "m.toml").unwrap_err();
        assert!(e.problems[0].starts_with("m.toml:3:"), "{e}");
        let e = Manifest::parse("[[model]]\nid = \"a\"\ntarget = \"loras/a\"\nhf = { repo = \"a/b\", path = \"p\", branch = \"x\" }\n", "m.toml")
            .unwrap_err();
        assert!(
            e.problems[0].starts_with("m.toml:4:") && e.to_string().contains("branch"),
            "{e}"
        );
        // The same target twice.
        let e = Manifest::parse(
            "[[model]]\nid = \"a\"\ntarget = \"loras/a.safetensors\"\nhf = { repo = \"a/b\", path = \"p\" }\n[[model]]\nid = \"b\"\ntarget = \"loras/a.safetensors\"\nhf = { repo = \"a/b\", path = \"q\" }\n",
            "m.toml",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("m.toml:5: target \"loras/a.safetensors\" is also tracked at line 1"),
            "{e}"
        );
    }
}
