//! The rule tables the resolver reads: which node classes load which files, which classes are
//! output nodes, which are frontend-only, which encode text (and so may load embeddings).
//!
//! They are data, not code, because ComfyUI's node zoo grows faster than any resolver: the
//! built-in set lives in `rules.json` next to this file (compiled in), and a deployment can merge
//! a file of its own on top with [`RuleSet::from_json`] and [`RuleSet::extend`] without a rebuild.
//! The format is documented in `docs/workflow-resolver.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use super::WorkflowError;

/// The rules compiled into the binary.
const BUILTIN_RULES: &str = include_str!("rules.json");

static BUILTIN: LazyLock<RuleSet> = LazyLock::new(|| {
    // The built-in table is a constant of this crate; `builtin_rules_parse` proves it parses.
    RuleSet::from_json(BUILTIN_RULES).expect("src/workflow/rules.json is valid")
});

/// A set of resolver rules (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    /// Free text for people reading a rules file; ignored.
    #[serde(default, rename = "_comment", skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Node class → the file widgets it loads.
    #[serde(default)]
    pub loaders: BTreeMap<String, Vec<FileRule>>,
    /// Node class → why its files cannot be named from the workflow alone.
    #[serde(default)]
    pub unresolved: BTreeMap<String, UnresolvedRule>,
    /// Classes whose `OUTPUT_NODE` is true: execution starts from them.
    #[serde(default)]
    pub outputs: BTreeSet<String>,
    /// Substrings of class names taken as output nodes when the class is not in `outputs`
    /// (custom save/preview nodes); a class that is a loader never matches.
    #[serde(default)]
    pub output_name_patterns: Vec<String>,
    /// Frontend-only classes: never executed; links pass through them slot for slot.
    #[serde(default)]
    pub virtual_nodes: BTreeSet<String>,
    /// Classes whose string widgets are tokenized by a CLIP tokenizer (`embedding:NAME`).
    #[serde(default)]
    pub text_encoders: BTreeSet<String>,
    /// Substrings of class names also treated as text encoders.
    #[serde(default)]
    pub text_encoder_name_patterns: Vec<String>,
    /// Classes that only output a constant string: a file widget linked to one takes its value.
    #[serde(default)]
    pub string_sources: BTreeMap<String, WidgetRef>,
    /// Widget values that mean "no file" (`None`, `[None]`, ...).
    #[serde(default)]
    pub no_file_values: BTreeSet<String>,
}

/// One file-valued widget of a loader class.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRule {
    /// Input name: the key in object-form `widgets_values` and in API prompts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub widget: Option<String>,
    /// Position in array-form `widgets_values`. Without it, array values are scanned for strings
    /// that look like model files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// ComfyUI category key the file is looked up in.
    pub category: String,
    /// Folders that other versions of the loader read the same widget from (a package that moved
    /// the loader between releases), searched after `category`, in this order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_categories: Vec<String>,
    /// Extensions the loader accepts when narrower than the category's (`.gguf`), or
    /// `["folder"]` for loaders that take a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Vec<String>>,
    /// Special values that load other files (or none, with an empty list).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, Vec<AliasFile>>,
    /// For loaders whose widgets are objects (one per row): the key holding the file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_key: Option<String>,
    /// With `object_key`: the boolean key that switches a row on; rows that are off are
    /// mentioned, not loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled_key: Option<String>,
    /// Free text for people; ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A file a special widget value stands for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasFile {
    /// Category key.
    pub category: String,
    /// Path in the category, or a prefix without extension for `vae_approx` names.
    pub path: String,
}

/// A loader whose files are chosen at run time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnresolvedRule {
    /// The widget worth quoting in the reason (a preset name, a search string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub widget: Option<String>,
    /// Its position in array-form `widgets_values`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The category searched, when there is a single one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Why; `{class}` and `{value}` are replaced by the node class and the quoted widget value.
    pub reason: String,
}

/// A widget named by input name and array position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WidgetRef {
    /// Input name.
    pub widget: String,
    /// Position in array-form `widgets_values`.
    pub index: usize,
}

impl RuleSet {
    /// The built-in rules (a shared, parsed-once copy).
    pub fn builtin() -> &'static RuleSet {
        &BUILTIN
    }

    /// Parses a rules file (JSON, the format of `rules.json`) and checks it.
    pub fn from_json(text: &str) -> Result<RuleSet, WorkflowError> {
        let rules: RuleSet =
            serde_json::from_str(text).map_err(|e| WorkflowError::Rules(e.to_string()))?;
        rules.check()?;
        Ok(rules)
    }

    /// Merges `other` on top of `self`: its classes replace ours (a class moves between
    /// `loaders` and `unresolved` if `other` says so), its lists are added to ours.
    pub fn extend(&mut self, other: RuleSet) {
        for (class, rules) in other.loaders {
            self.unresolved.remove(&class);
            self.loaders.insert(class, rules);
        }
        for (class, rule) in other.unresolved {
            self.loaders.remove(&class);
            self.unresolved.insert(class, rule);
        }
        self.outputs.extend(other.outputs);
        self.output_name_patterns.extend(other.output_name_patterns);
        self.virtual_nodes.extend(other.virtual_nodes);
        self.text_encoders.extend(other.text_encoders);
        self.text_encoder_name_patterns
            .extend(other.text_encoder_name_patterns);
        self.string_sources.extend(other.string_sources);
        self.no_file_values.extend(other.no_file_values);
    }

    fn check(&self) -> Result<(), WorkflowError> {
        for (class, rules) in &self.loaders {
            for rule in rules {
                if rule.widget.is_none() && rule.object_key.is_none() {
                    return Err(WorkflowError::Rules(format!(
                        "loader {class}: a rule needs \"widget\" or \"object_key\""
                    )));
                }
                if rule.category.is_empty() {
                    return Err(WorkflowError::Rules(format!(
                        "loader {class}: empty category"
                    )));
                }
            }
        }
        if let Some(pattern) = self
            .output_name_patterns
            .iter()
            .chain(&self.text_encoder_name_patterns)
            .find(|p| p.is_empty())
        {
            return Err(WorkflowError::Rules(format!(
                "empty name pattern {pattern:?} would match every class"
            )));
        }
        Ok(())
    }

    /// Whether execution starts at nodes of this class.
    pub fn is_output(&self, class: &str) -> bool {
        self.outputs.contains(class)
            || (!self.loaders.contains_key(class)
                && !self.unresolved.contains_key(class)
                && !self.virtual_nodes.contains(class)
                && self
                    .output_name_patterns
                    .iter()
                    .any(|p| class.contains(p.as_str())))
    }

    /// Whether the class exists only in the frontend.
    pub fn is_virtual(&self, class: &str) -> bool {
        self.virtual_nodes.contains(class)
    }

    /// Whether the class tokenizes its text with `embedding:` support.
    pub fn is_text_encoder(&self, class: &str) -> bool {
        self.text_encoders.contains(class)
            || self
                .text_encoder_name_patterns
                .iter()
                .any(|p| class.contains(p.as_str()))
    }

    /// Whether a widget value means "no file".
    pub fn is_no_file(&self, value: &str) -> bool {
        self.no_file_values.contains(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_rules_parse() {
        let rules = RuleSet::from_json(BUILTIN_RULES).expect("built-in rules parse");
        assert!(rules.loaders.contains_key("CheckpointLoaderSimple"));
        assert!(
            rules
                .unresolved
                .contains_key("IPAdapterUnifiedLoaderFaceID")
        );
        assert!(rules.is_output("SaveImage"));
        assert!(rules.is_output("SaveImageExtended"));
        assert!(rules.is_output("SomeCustomPreviewNode"));
        assert!(!rules.is_output("KSampler"));
        assert!(rules.is_virtual("Reroute"));
        assert!(rules.is_text_encoder("CLIPTextEncode"));
        assert!(rules.is_text_encoder("CLIPTextEncodeSomethingNew"));
    }

    #[test]
    fn core_loader_table_is_complete() {
        // COMFYUI.md §5: every core loader and the custom ones it lists.
        let rules = RuleSet::builtin();
        for class in [
            "CheckpointLoaderSimple",
            "unCLIPCheckpointLoader",
            "ImageOnlyCheckpointLoader",
            "CheckpointLoader",
            "DiffusersLoader",
            "LoraLoader",
            "LoraLoaderModelOnly",
            "CreateHookLora",
            "CreateHookLoraModelOnly",
            "CreateHookModelAsLora",
            "CreateHookModelAsLoraModelOnly",
            "VAELoader",
            "UNETLoader",
            "CLIPLoader",
            "DualCLIPLoader",
            "TripleCLIPLoader",
            "QuadrupleCLIPLoader",
            "CLIPVisionLoader",
            "ControlNetLoader",
            "DiffControlNetLoader",
            "StyleModelLoader",
            "GLIGENLoader",
            "HypernetworkLoader",
            "UpscaleModelLoader",
            "PhotoMakerLoader",
            "ModelPatchLoader",
            "AudioEncoderLoader",
            "TrainLoraNode",
            "UnetLoaderGGUF",
            "UnetLoaderGGUFAdvanced",
            "CLIPLoaderGGUF",
            "DualCLIPLoaderGGUF",
            "TripleCLIPLoaderGGUF",
            "QuadrupleCLIPLoaderGGUF",
            "IPAdapterModelLoader",
            "IPAdapterInsightFaceLoader",
            "WanVideoModelLoader",
            "WanVideoVAELoader",
            "LoadWanVideoT5TextEncoder",
            "LoadWanVideoClipTextEncoder",
            "SAMLoader",
        ] {
            assert!(rules.loaders.contains_key(class), "{class} missing");
        }
        for class in [
            "IPAdapterUnifiedLoader",
            "IPAdapterUnifiedLoaderFaceID",
            "IPAdapterUnifiedLoaderCommunity",
        ] {
            assert!(rules.unresolved.contains_key(class), "{class} missing");
        }
    }

    #[test]
    fn extend_overrides_and_moves_classes() {
        let mut rules = RuleSet::builtin().clone();
        let extra = RuleSet::from_json(
            r#"{
              "loaders": {
                "MyLoader": [{"widget": "file", "index": 0, "category": "checkpoints"}],
                "IPAdapterUnifiedLoader": [{"widget": "preset", "index": 0, "category": "ipadapter"}]
              },
              "unresolved": {"CLIPLoader": {"reason": "test"}},
              "outputs": ["MySink"]
            }"#,
        )
        .expect("parses");
        rules.extend(extra);
        assert!(rules.loaders.contains_key("MyLoader"));
        assert!(rules.loaders.contains_key("IPAdapterUnifiedLoader"));
        assert!(!rules.unresolved.contains_key("IPAdapterUnifiedLoader"));
        assert!(rules.unresolved.contains_key("CLIPLoader"));
        assert!(!rules.loaders.contains_key("CLIPLoader"));
        assert!(rules.is_output("MySink"));
        assert!(rules.is_output("SaveImage"));
    }

    #[test]
    fn bad_rules_are_errors() {
        for text in [
            "{",
            r#"{"loaders": {"X": [{"index": 0, "category": "loras"}]}}"#,
            r#"{"loaders": {"X": [{"widget": "a", "category": ""}]}}"#,
            r#"{"unknown_key": 1}"#,
            r#"{"output_name_patterns": [""]}"#,
            r#"{"loaders": {"X": [{"widget": 3, "category": "loras"}]}}"#,
        ] {
            assert!(
                matches!(RuleSet::from_json(text), Err(WorkflowError::Rules(_))),
                "{text}"
            );
        }
    }
}
