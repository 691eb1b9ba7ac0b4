//! Workflow resolver: reads a ComfyUI workflow and names the model files it will load.
//!
//! arenafs caches "what the active workflow needs, nothing else", so it needs to know, from a
//! workflow alone, which files ComfyUI would open if the workflow were queued. This module answers
//! that without I/O (mapping names onto the NAS is left to the caller, with [`candidate_paths`]
//! giving ComfyUI's search order):
//!
//! - Input: a UI ("workflow") graph, v0.4 or v1 links, with subgraphs and legacy group nodes; an
//!   API ("prompt") graph; either wrapped as `{"workflow": …}` / `{"prompt": …}` (or a `/prompt`
//!   request body); or a PNG carrying them in `tEXt`/`zTXt`/`iTXt` chunks.
//! - Output: one [`ModelRef`] per (status, category, path) with the nodes that use it, where the
//!   status says whether the file is loaded ([`ModelStatus::Exec`]), only mentioned, declared as a
//!   download hint, or chosen at run time in a way the JSON cannot tell.
//!
//! Which node classes load which files, which classes are outputs and which exist only in the
//! frontend is data ([`RuleSet`], `rules.json`), so new custom nodes need no code.
//!
//! Untrusted input never panics: bodies are size-bounded, JSON nesting is bounded by serde_json,
//! subgraph nesting and link walks are bounded and cycle-checked, and anything malformed turns
//! into an error or a warning. `docs/workflow-resolver.md` explains how statuses are decided.

mod api;
mod apply;
mod embeddings;
mod graph;
mod paths;
mod png_text;
mod report;
mod rules;
mod ui;

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use paths::{candidate_paths, category_key, normalize_path};
pub use rules::{AliasFile, FileRule, RuleSet, UnresolvedRule, WidgetRef};

use report::Report;

/// Largest workflow text accepted (a JSON body, a file, or one decompressed PNG text chunk).
/// Real workflows are kilobytes to a few megabytes; the bound leaves room for ones that embed
/// data in widgets while capping memory (a parsed `serde_json::Value` costs several times the
/// text).
pub const MAX_WORKFLOW_BYTES: usize = 64 << 20;

/// How nested `{"workflow": "<json text>"}` wrappers may be before the input is refused.
const MAX_WRAPPER_DEPTH: usize = 4;

/// What a workflow does with a model file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelStatus {
    /// A loader ComfyUI would run: active, upstream of an active output node.
    Exec,
    /// Named by a loader that would not run (muted, bypassed, inside an inactive subgraph, not
    /// upstream of an output node, or a switched-off row).
    MentionedOnly,
    /// An entry of a `models` list (top level or a node's `properties.models`), active or not:
    /// a download hint with `url` and `directory`.
    Declared,
    /// A loader whose file is chosen at run time (presets, searches, values computed by other
    /// nodes); `reason` says why.
    Unresolved,
}

/// Which form the resolved graph had.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkflowFormat {
    /// The frontend's graph ("workflow").
    Ui,
    /// The execution graph ("prompt").
    Api,
}

/// One model file (or one unresolvable loader) of a workflow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    /// ComfyUI category key (`checkpoints`, `diffusion_models`, …) after the legacy mapping
    /// (`unet` → `diffusion_models`, `clip` → `text_encoders`); `None` for some unresolved
    /// entries and for `models` entries without a directory.
    pub category: Option<String>,
    /// The name exactly as written in the workflow.
    pub filename: Option<String>,
    /// The name normalised as ComfyUI does before opening it: `\` → `/`, no leading `/`, `.` and
    /// empty components dropped, `..` clamped at the category root. Case is preserved.
    pub path: Option<String>,
    /// What the workflow does with it.
    pub status: ModelStatus,
    /// Execution ids of the nodes that use it: the node id at top level, `host:inner` through
    /// subgraph instances and legacy group nodes (as in API prompts). Empty for top-level
    /// `models` entries.
    pub nodes: Vec<String>,
    /// Download address (declared entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Models subfolder as written (declared entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    /// Why the file cannot be named (unresolved entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Extensions the loader accepts when narrower than the category's (`[".gguf"]`), or
    /// `["folder"]` when the name is a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Vec<String>>,
    /// Folders other versions of the loader read it from (category keys), searched after
    /// `category`: a workflow saved with an older version names a file in the old folder.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_categories: Vec<String>,
}

/// Everything a workflow says about its models.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    /// One entry per (status, category, path); a file may appear once per status.
    pub models: Vec<ModelRef>,
    /// The form of the graph the statuses were decided on.
    pub format: WorkflowFormat,
    /// Things worth telling a person: malformed parts skipped, heuristics used, disagreements.
    pub warnings: Vec<String>,
}

impl Resolution {
    /// Entries with the given status.
    pub fn with_status(&self, status: ModelStatus) -> impl Iterator<Item = &ModelRef> {
        self.models.iter().filter(move |m| m.status == status)
    }
}

/// Why a workflow could not be resolved at all.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    /// The input is bigger than [`MAX_WORKFLOW_BYTES`].
    #[error("workflow is {size} bytes, more than the limit of {limit} bytes")]
    TooLarge {
        /// Size seen (at least).
        size: u64,
        /// The limit.
        limit: usize,
    },
    /// The input is not JSON (or is truncated).
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Valid JSON, but neither a UI graph nor an API prompt.
    #[error("not a ComfyUI workflow: {0}")]
    NotAWorkflow(String),
    /// The PNG could not be decoded far enough to read its text chunks.
    #[error("not a readable PNG: {0}")]
    Png(String),
    /// The PNG has no `workflow` or `prompt` text chunk.
    #[error("the PNG has no ComfyUI workflow (no \"workflow\" or \"prompt\" text chunk)")]
    NoWorkflowInPng,
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A rules file is malformed.
    #[error("invalid resolver rules: {0}")]
    Rules(String),
}

/// A resolver over a rule set; the free functions use the built-in rules.
#[derive(Clone, Copy, Debug)]
pub struct Resolver<'r> {
    rules: &'r RuleSet,
}

impl Default for Resolver<'static> {
    fn default() -> Self {
        Resolver {
            rules: RuleSet::builtin(),
        }
    }
}

/// Resolves a UI or API workflow given as JSON text (wrappers accepted, see the module docs).
pub fn resolve_json(bytes: &[u8]) -> Result<Resolution, WorkflowError> {
    Resolver::default().resolve_json(bytes)
}

/// Resolves the workflow embedded in a PNG's text chunks.
pub fn resolve_png(bytes: &[u8]) -> Result<Resolution, WorkflowError> {
    Resolver::default().resolve_png(bytes)
}

/// Resolves a workflow file, PNG or JSON, told apart by content (the PNG signature), not by name.
pub fn resolve_file(path: &Path) -> Result<Resolution, WorkflowError> {
    Resolver::default().resolve_file(path)
}

impl<'r> Resolver<'r> {
    /// A resolver over `rules` (for example the built-in set extended from a file).
    pub fn new(rules: &'r RuleSet) -> Self {
        Resolver { rules }
    }

    /// See [`resolve_json`].
    pub fn resolve_json(&self, bytes: &[u8]) -> Result<Resolution, WorkflowError> {
        check_size(bytes.len() as u64)?;
        let value: Value = serde_json::from_slice(bytes)?;
        self.resolve_value(value)
    }

    /// Resolves an already parsed JSON value (UI graph, API prompt or a wrapper).
    pub fn resolve_value(&self, value: Value) -> Result<Resolution, WorkflowError> {
        let parts = Parts::split(value, 0)?;
        self.resolve_parts(parts)
    }

    /// See [`resolve_png`].
    pub fn resolve_png(&self, bytes: &[u8]) -> Result<Resolution, WorkflowError> {
        self.resolve_png_reader(std::io::Cursor::new(bytes))
    }

    /// Resolves the workflow embedded in a PNG read from `reader`.
    pub fn resolve_png_reader(
        &self,
        reader: impl std::io::BufRead + Seek,
    ) -> Result<Resolution, WorkflowError> {
        let chunks = png_text::workflow_chunks(reader)?;
        let mut warnings = chunks.warnings;
        let mut parse = |what: &str, text: Option<String>| -> Option<Value> {
            let text = text?;
            match serde_json::from_str(&text) {
                Ok(value) => Some(value),
                Err(e) => {
                    warnings.push(format!("the PNG's {what:?} chunk is not valid JSON: {e}"));
                    None
                }
            }
        };
        let ui = parse("workflow", chunks.workflow);
        let api = parse("prompt", chunks.prompt);
        if ui.is_none() && api.is_none() {
            return match warnings.pop() {
                Some(why) => Err(WorkflowError::NotAWorkflow(why)),
                None => Err(WorkflowError::NoWorkflowInPng),
            };
        }
        let mut parts = Parts::default();
        for value in [ui, api].into_iter().flatten() {
            parts.absorb(Parts::split(value, 1)?);
        }
        let mut resolution = self.resolve_parts(parts)?;
        resolution.warnings.extend(warnings);
        Ok(resolution)
    }

    /// See [`resolve_file`].
    pub fn resolve_file(&self, path: &Path) -> Result<Resolution, WorkflowError> {
        let io_error = |source| WorkflowError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(io_error)?;
        let mut magic = [0u8; 8];
        let mut got = 0;
        while got < magic.len() {
            match file.read(&mut magic[got..]).map_err(io_error)? {
                0 => break,
                n => got += n,
            }
        }
        file.rewind().map_err(io_error)?;
        if magic[..got] == png_text::SIGNATURE {
            return self.resolve_png_reader(BufReader::new(file));
        }
        let mut text = Vec::new();
        file.take(MAX_WORKFLOW_BYTES as u64 + 1)
            .read_to_end(&mut text)
            .map_err(io_error)?;
        self.resolve_json(&text)
    }

    fn resolve_parts(&self, parts: Parts) -> Result<Resolution, WorkflowError> {
        let mut resolution = match (parts.ui, parts.api) {
            (Some(ui), None) => self.resolve_ui(&ui)?,
            (None, Some(api)) => self.resolve_api(&api),
            (Some(ui), Some(api)) => self.resolve_both(&ui, &api)?,
            (None, None) => {
                return Err(WorkflowError::NotAWorkflow(
                    "no workflow graph or prompt found".into(),
                ));
            }
        };
        resolution.warnings.extend(parts.warnings);
        Ok(resolution)
    }

    fn resolve_ui(&self, ui: &Value) -> Result<Resolution, WorkflowError> {
        let mut report = Report::default();
        ui::resolve(ui, self.rules, &mut report)?;
        Ok(report.finish(WorkflowFormat::Ui))
    }

    fn resolve_api(&self, api: &Map<String, Value>) -> Resolution {
        let mut report = Report::default();
        api::resolve(api, self.rules, &mut report);
        report.finish(WorkflowFormat::Api)
    }

    /// Both graphs (a PNG, a `/prompt` body): the UI graph decides, because it is what ComfyUI
    /// loads when the file is opened and the only one with inactive nodes and `models` lists.
    /// The prompt is what actually ran when the file was made; files it loads that the UI graph
    /// does not execute are reported as warnings (the graph was edited, or a custom node's
    /// frontend rewrote the prompt).
    fn resolve_both(
        &self,
        ui: &Value,
        api: &Map<String, Value>,
    ) -> Result<Resolution, WorkflowError> {
        let api_resolution = self.resolve_api(api);
        let mut report = Report::default();
        match ui::resolve(ui, self.rules, &mut report) {
            Ok(()) => {}
            Err(e) => {
                let mut resolution = api_resolution;
                resolution.warnings.push(format!(
                    "the workflow graph is unusable ({e}); resolved the prompt"
                ));
                return Ok(resolution);
            }
        }
        let ui_exec = report.paths_with(ModelStatus::Exec);
        for model in api_resolution.with_status(ModelStatus::Exec) {
            if !ui_exec.contains(&(model.category.clone(), model.path.clone())) {
                report.warnings.push(format!(
                    "the embedded prompt loads {}/{} (node {}), which the workflow graph does \
                     not execute",
                    model.category.as_deref().unwrap_or("?"),
                    model.path.as_deref().unwrap_or("?"),
                    model.nodes.join(", ")
                ));
            }
        }
        Ok(report.finish(WorkflowFormat::Ui))
    }
}

fn check_size(size: u64) -> Result<(), WorkflowError> {
    if size > MAX_WORKFLOW_BYTES as u64 {
        return Err(WorkflowError::TooLarge {
            size,
            limit: MAX_WORKFLOW_BYTES,
        });
    }
    Ok(())
}

/// The graphs found in an input, after unwrapping.
#[derive(Debug, Default)]
struct Parts {
    ui: Option<Value>,
    api: Option<Map<String, Value>>,
    /// Wrapped parts that could not be used while others could.
    warnings: Vec<String>,
}

impl Parts {
    /// Takes a value apart: a UI graph (`nodes` array), an API prompt (entries with
    /// `class_type`), a wrapper (`workflow`, `prompt`, `extra_data.extra_pnginfo.workflow`), or a
    /// string holding one of those as JSON text.
    fn split(value: Value, depth: usize) -> Result<Parts, WorkflowError> {
        if depth > MAX_WRAPPER_DEPTH {
            return Err(WorkflowError::NotAWorkflow(
                "wrappers nested too deeply".into(),
            ));
        }
        match value {
            Value::String(text) => {
                check_size(text.len() as u64)?;
                Parts::split(serde_json::from_str(&text)?, depth + 1)
            }
            Value::Object(map) if map.get("nodes").is_some_and(Value::is_array) => Ok(Parts {
                ui: Some(Value::Object(map)),
                ..Parts::default()
            }),
            Value::Object(mut map) if is_wrapper(&map) => {
                let mut parts = Parts::default();
                let pnginfo_workflow = map
                    .get_mut("extra_data")
                    .and_then(|e| e.get_mut("extra_pnginfo"))
                    .and_then(|e| e.get_mut("workflow"))
                    .map(Value::take);
                let mut first_error = None;
                for (what, inner) in [
                    ("workflow", map.remove("workflow")),
                    ("extra_data.extra_pnginfo.workflow", pnginfo_workflow),
                    ("prompt", map.remove("prompt")),
                ] {
                    let Some(inner) = inner.filter(|v| !v.is_null()) else {
                        continue;
                    };
                    match Parts::split(inner, depth + 1) {
                        Ok(inner) => parts.absorb(inner),
                        Err(e) => {
                            parts.warnings.push(format!("{what:?} is unusable: {e}"));
                            first_error.get_or_insert(e);
                        }
                    }
                }
                match first_error {
                    Some(e) if parts.ui.is_none() && parts.api.is_none() => Err(e),
                    _ => Ok(parts),
                }
            }
            Value::Object(map) if map.values().any(|v| v.get("class_type").is_some()) => {
                Ok(Parts {
                    api: Some(map),
                    ..Parts::default()
                })
            }
            Value::Object(_) => Err(WorkflowError::NotAWorkflow(
                "an object with neither \"nodes\" nor node entries with \"class_type\"".into(),
            )),
            other => Err(WorkflowError::NotAWorkflow(format!(
                "the top level is {}",
                json_kind(&other)
            ))),
        }
    }

    /// Keeps the first UI graph and the first prompt seen.
    fn absorb(&mut self, other: Parts) {
        self.warnings.extend(other.warnings);
        if self.ui.is_none() {
            self.ui = other.ui;
        }
        if self.api.is_none() {
            self.api = other.api;
        }
    }
}

/// Whether an object wraps graphs rather than being an API prompt itself: it has a `workflow`,
/// `prompt` or `extra_data` key that is not a node entry.
fn is_wrapper(map: &Map<String, Value>) -> bool {
    ["workflow", "prompt", "extra_data"].iter().any(|key| {
        map.get(*key)
            .is_some_and(|v| (v.is_object() || v.is_string()) && v.get("class_type").is_none())
    })
}

/// "an array", "a number", … for messages.
pub(crate) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;
