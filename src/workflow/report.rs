//! Collects what the resolver finds into [`ModelRef`]s: one entry per (status, category, path),
//! node ids merged, warnings deduplicated and bounded, output in a stable order.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::paths::{category_key, normalize_path};
use super::{ModelRef, ModelStatus, Resolution, WorkflowFormat};

/// Warnings kept per resolution; a hostile workflow can trigger one per node, and a report of
/// thousands helps nobody.
const MAX_WARNINGS: usize = 100;

/// Deduplicated, bounded list of warnings.
#[derive(Debug, Default)]
pub(crate) struct Warnings {
    list: Vec<String>,
    seen: HashSet<String>,
    dropped: usize,
}

impl Warnings {
    pub(crate) fn push(&mut self, message: impl Into<String>) {
        let message = message.into();
        if self.seen.contains(&message) {
            return;
        }
        self.seen.insert(message.clone());
        if self.list.len() >= MAX_WARNINGS {
            self.dropped += 1;
            return;
        }
        self.list.push(message);
    }

    pub(crate) fn into_vec(mut self) -> Vec<String> {
        if self.dropped > 0 {
            self.list
                .push(format!("... and {} more warnings", self.dropped));
        }
        self.list
    }
}

/// Identity of an entry within a resolution.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    status: ModelStatus,
    category: Option<String>,
    path: Option<String>,
    /// Unresolved entries of one file are told apart by why they are unresolved.
    reason: Option<String>,
}

/// Everything found so far.
#[derive(Debug, Default)]
pub(crate) struct Report {
    models: Vec<ModelRef>,
    index: HashMap<Key, usize>,
    /// (entry, node) pairs already recorded, so that merging stays linear in the nodes.
    nodes_seen: HashSet<(usize, String)>,
    pub(crate) warnings: Warnings,
}

impl Report {
    /// A file a loader node names, with the status the node's execution gives it.
    pub(crate) fn file(
        &mut self,
        status: ModelStatus,
        category: &str,
        filename: &str,
        path: Option<&str>,
        node: &str,
        extensions: Option<&[String]>,
    ) {
        self.file_moved(status, category, &[], filename, path, node, extensions);
    }

    /// [`Self::file`] for a loader that other versions read from other folders (`previous`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn file_moved(
        &mut self,
        status: ModelStatus,
        category: &str,
        previous: &[String],
        filename: &str,
        path: Option<&str>,
        node: &str,
        extensions: Option<&[String]>,
    ) {
        let Some(path) = normalize_path(path.unwrap_or(filename)) else {
            self.warnings
                .push(format!("node {node}: {filename:?} names no file; ignored"));
            return;
        };
        let category = category_key(category).to_owned();
        let key = Key {
            status,
            category: Some(category.clone()),
            path: Some(path.clone()),
            reason: None,
        };
        self.upsert(key, Some(node), || ModelRef {
            category: Some(category),
            filename: Some(filename.to_owned()),
            path: Some(path),
            status,
            nodes: Vec::new(),
            url: None,
            directory: None,
            reason: None,
            extensions: extensions.map(<[String]>::to_vec),
            previous_categories: previous
                .iter()
                .map(|c| category_key(c).to_owned())
                .collect(),
        });
    }

    /// An entry of a `models` list.
    pub(crate) fn declared(
        &mut self,
        name: &str,
        directory: Option<&str>,
        url: Option<&str>,
        node: Option<&str>,
    ) {
        let Some(path) = normalize_path(name) else {
            self.warnings
                .push(format!("models entry {name:?} names no file; ignored"));
            return;
        };
        let category = directory.map(|d| category_key(d).to_owned());
        let key = Key {
            status: ModelStatus::Declared,
            category: category.clone(),
            path: Some(path.clone()),
            reason: None,
        };
        let at = self.upsert(key, node, || ModelRef {
            category,
            filename: Some(name.to_owned()),
            path: Some(path),
            status: ModelStatus::Declared,
            nodes: Vec::new(),
            url: url.map(str::to_owned),
            directory: directory.map(str::to_owned),
            reason: None,
            extensions: None,
            previous_categories: Vec::new(),
        });
        let entry = &mut self.models[at];
        match (&entry.url, url) {
            (None, Some(url)) => entry.url = Some(url.to_owned()),
            (Some(have), Some(url)) if have != url => self.warnings.push(format!(
                "models entries for {name:?} give different urls ({have}, {url}); keeping the first"
            )),
            _ => {}
        }
    }

    /// A loader whose file cannot be named from the workflow.
    pub(crate) fn unresolved(
        &mut self,
        category: Option<&str>,
        filename: Option<&str>,
        node: &str,
        reason: String,
    ) {
        let category = category.map(|c| category_key(c).to_owned());
        let path = filename.and_then(normalize_path);
        let key = Key {
            status: ModelStatus::Unresolved,
            category: category.clone(),
            path: path.clone(),
            reason: Some(reason.clone()),
        };
        self.upsert(key, Some(node), || ModelRef {
            category,
            filename: filename.map(str::to_owned),
            path,
            status: ModelStatus::Unresolved,
            nodes: Vec::new(),
            url: None,
            directory: None,
            reason: Some(reason),
            extensions: None,
            previous_categories: Vec::new(),
        });
    }

    fn upsert(&mut self, key: Key, node: Option<&str>, make: impl FnOnce() -> ModelRef) -> usize {
        let at = *self.index.entry(key).or_insert_with(|| {
            self.models.push(make());
            self.models.len() - 1
        });
        if let Some(node) = node
            && self.nodes_seen.insert((at, node.to_owned()))
        {
            self.models[at].nodes.push(node.to_owned());
        }
        at
    }

    /// Entries found so far with `status`, as (category, path) pairs.
    pub(crate) fn paths_with(
        &self,
        status: ModelStatus,
    ) -> HashSet<(Option<String>, Option<String>)> {
        self.models
            .iter()
            .filter(|m| m.status == status)
            .map(|m| (m.category.clone(), m.path.clone()))
            .collect()
    }

    /// The resolution, in a stable order: by status, category, path; node ids in natural order.
    pub(crate) fn finish(mut self, format: WorkflowFormat) -> Resolution {
        self.warn_case_variants();
        let mut models = self.models;
        for model in &mut models {
            model.nodes.sort_by(|a, b| natural_id_order(a, b));
        }
        models.sort_by(|a, b| {
            (a.status, &a.category, &a.path, &a.filename, &a.reason).cmp(&(
                b.status,
                &b.category,
                &b.path,
                &b.filename,
                &b.reason,
            ))
        });
        Resolution {
            models,
            format,
            warnings: self.warnings.into_vec(),
        }
    }

    /// ComfyUI on Linux treats names case-sensitively, so `A.safetensors` and `a.safetensors` are
    /// two files; on a case-insensitive NAS they are one. Both are kept; the clash is reported.
    fn warn_case_variants(&mut self) {
        let mut spellings: BTreeMap<(String, String), Vec<&str>> = BTreeMap::new();
        let mut seen: HashSet<(&str, &str)> = HashSet::new();
        for model in &self.models {
            if let (Some(category), Some(path)) = (&model.category, &model.path)
                && seen.insert((category, path))
            {
                spellings
                    .entry((category.clone(), path.to_lowercase()))
                    .or_default()
                    .push(path);
            }
        }
        let clashes: Vec<String> = spellings
            .into_iter()
            .filter(|(_, seen)| seen.len() > 1)
            .map(|((category, _), seen)| {
                format!(
                    "{category}: {} differ only in letter case; they are different files on a \
                     case-sensitive NAS",
                    seen.join(", ")
                )
            })
            .collect();
        for clash in clashes {
            self.warnings.push(clash);
        }
    }
}

/// Orders execution ids (`12`, `3:4`) by their numeric components where they are numbers.
fn natural_id_order(a: &str, b: &str) -> std::cmp::Ordering {
    let key = |s: &str| -> Vec<(u64, String)> {
        s.split(':')
            .map(|p| match p.parse::<u64>() {
                Ok(n) => (n, String::new()),
                Err(_) => (u64::MAX, p.to_owned()),
            })
            .collect()
    };
    key(a).cmp(&key(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_within_a_status_and_keeps_statuses_apart() {
        let mut r = Report::default();
        r.file(ModelStatus::Exec, "checkpoints", "a.ckpt", None, "4", None);
        r.file(
            ModelStatus::Exec,
            "checkpoints",
            r"./a.ckpt",
            None,
            "12",
            None,
        );
        r.file(
            ModelStatus::MentionedOnly,
            "checkpoints",
            "a.ckpt",
            None,
            "3",
            None,
        );
        r.file(ModelStatus::Exec, "unet", "u.gguf", None, "2:1", None);
        let res = r.finish(WorkflowFormat::Ui);
        assert_eq!(res.models.len(), 3);
        assert_eq!(res.models[0].nodes, ["4", "12"]);
        assert_eq!(res.models[0].filename.as_deref(), Some("a.ckpt"));
        assert_eq!(res.models[1].category.as_deref(), Some("diffusion_models"));
        assert_eq!(res.models[2].status, ModelStatus::MentionedOnly);
    }

    #[test]
    fn case_variants_are_reported() {
        let mut r = Report::default();
        r.file(ModelStatus::Exec, "loras", "A.safetensors", None, "1", None);
        r.file(ModelStatus::Exec, "loras", "a.safetensors", None, "2", None);
        let res = r.finish(WorkflowFormat::Api);
        assert_eq!(res.models.len(), 2);
        assert!(res.warnings.iter().any(|w| w.contains("letter case")));
    }

    #[test]
    fn warnings_are_bounded() {
        let mut w = Warnings::default();
        for i in 0..1000 {
            w.push(format!("w{i}"));
            w.push(format!("w{i}"));
        }
        let list = w.into_vec();
        assert_eq!(list.len(), MAX_WARNINGS + 1);
        assert!(list[MAX_WARNINGS].contains("900 more"));
    }

    #[test]
    fn many_nodes_on_one_file_merge_in_linear_time() {
        let n = 100_000;
        let start = std::time::Instant::now();
        let mut r = Report::default();
        for i in 0..n {
            let node = (i % (n / 2)).to_string();
            r.file(
                ModelStatus::Exec,
                "loras",
                "a.safetensors",
                None,
                &node,
                None,
            );
            // Case variants of one name, each its own entry.
            let name: String = format!("{i:017b}")
                .chars()
                .map(|c| if c == '1' { 'A' } else { 'a' })
                .collect();
            r.file(ModelStatus::Exec, "vae", &name, None, "1", None);
        }
        let res = r.finish(WorkflowFormat::Api);
        let elapsed = start.elapsed();
        assert_eq!(res.models.len(), n + 1);
        assert_eq!(res.models[0].nodes.len(), n / 2, "each node once");
        assert_eq!(res.models[0].nodes[..3], ["0", "1", "2"]);
        assert!(res.warnings.iter().any(|w| w.contains("letter case")));
        // Quadratic merging took minutes here.
        assert!(elapsed < std::time::Duration::from_secs(20), "{elapsed:?}");
    }

    #[test]
    fn natural_order_of_ids() {
        let mut ids = vec!["10", "9", "2:10", "2:9", "x"];
        ids.sort_by(|a, b| natural_id_order(a, b));
        assert_eq!(ids, ["2:9", "2:10", "9", "10", "x"]);
    }
}
