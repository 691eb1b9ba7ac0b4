//! Applies the rule tables to one node, whatever graph form it came from: the UI and API
//! readers each implement [`NodeView`] and share the decisions made here.

use serde_json::Value;

use super::ModelStatus;
use super::embeddings::embedding_names;
use super::paths::{has_extension, looks_like_model_file};
use super::report::Report;
use super::rules::{FileRule, RuleSet};

/// A widget's value as the node would receive it.
#[derive(Clone, Debug)]
pub(crate) enum WidgetValue<'a> {
    /// A value saved in the workflow (the node's own, a promoted one, a primitive's).
    Literal(&'a Value),
    /// Computed at run time by another node, described for the reason text.
    Dynamic(String),
    /// Not in the workflow.
    Missing,
}

/// What the rules need to know about a node.
pub(crate) trait NodeView<'a> {
    /// Node class (`class_type`).
    fn class(&self) -> &'a str;
    /// Execution id for reports.
    fn id(&self) -> String;
    /// `Ok` if ComfyUI would run the node, otherwise why not.
    fn runs(&self) -> Result<(), &'static str>;
    /// A widget by input name and array position.
    fn widget(&self, name: Option<&str>, index: Option<usize>) -> WidgetValue<'a>;
    /// Array-form widget values (UI graphs), where positions are meaningful.
    fn positional_values(&self) -> Option<&'a [Value]>;
    /// Every saved value of the node: widgets, or literal inputs.
    fn all_values(&self) -> Vec<&'a Value>;
    /// Text a text encoder tokenizes: its own string values and those of the nodes feeding its
    /// linked inputs (one hop).
    fn text_values(&self) -> Vec<&'a Value>;
}

/// The file name a widget value holds: a string, or `{"content": "..."}` as some custom combo
/// widgets save it.
fn file_name(value: &Value) -> Option<&str> {
    match value {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// Records everything the rules say about `node`.
pub(crate) fn apply<'a>(node: &impl NodeView<'a>, rules: &RuleSet, report: &mut Report) {
    let class = node.class();
    let runs = node.runs();
    let status = if runs.is_ok() {
        ModelStatus::Exec
    } else {
        ModelStatus::MentionedOnly
    };
    let not_running = |reason: String| match runs {
        Ok(()) => reason,
        Err(why) => format!("{reason} (the node does not run: {why})"),
    };
    if let Some(file_rules) = rules.loaders.get(class) {
        for rule in file_rules {
            apply_file_rule(node, rule, status, rules, report, &not_running);
        }
    }
    if let Some(rule) = rules.unresolved.get(class) {
        let value = match rule
            .widget
            .as_deref()
            .map(|w| node.widget(Some(w), rule.index))
        {
            Some(WidgetValue::Literal(v)) => v.to_string(),
            Some(WidgetValue::Dynamic(from)) => format!("(computed by {from})"),
            Some(WidgetValue::Missing) | None => "(not saved)".to_owned(),
        };
        let reason = rule
            .reason
            .replace("{class}", class)
            .replace("{value}", &value);
        report.unresolved(
            rule.category.as_deref(),
            None,
            &node.id(),
            not_running(reason),
        );
    }
    if rules.is_text_encoder(class) {
        for text in node.text_values().into_iter().filter_map(Value::as_str) {
            for name in embedding_names(text) {
                report.file(status, "embeddings", &name, None, &node.id(), None);
            }
        }
    }
}

fn apply_file_rule<'a>(
    node: &impl NodeView<'a>,
    rule: &FileRule,
    status: ModelStatus,
    rules: &RuleSet,
    report: &mut Report,
    not_running: &dyn Fn(String) -> String,
) {
    let class = node.class();
    let extensions = rule.extensions.as_deref();
    let add = |report: &mut Report, status: ModelStatus, name: &str| {
        if rules.is_no_file(name) {
            return;
        }
        if let Some(aliases) = rule.values.get(name) {
            for alias in aliases {
                report.file(
                    status,
                    &alias.category,
                    name,
                    Some(&alias.path),
                    &node.id(),
                    None,
                );
            }
            return;
        }
        if let Some(exts) = extensions
            && !exts.iter().any(|e| e == "folder")
        {
            let exts: Vec<&str> = exts.iter().map(String::as_str).collect();
            if !has_extension(name, &exts) {
                report.warnings.push(format!(
                    "node {} ({class}): {name:?} does not end with {}; the loader lists only \
                     such files",
                    node.id(),
                    exts.join(" or ")
                ));
            }
        }
        report.file_moved(
            status,
            &rule.category,
            &rule.previous_categories,
            name,
            None,
            &node.id(),
            extensions,
        );
    };

    if let Some(key) = &rule.object_key {
        // One object per row ({"on": true, "lora": "...", ...}).
        for row in node.all_values().into_iter().filter_map(Value::as_object) {
            let Some(name) = row.get(key).and_then(Value::as_str) else {
                continue;
            };
            let enabled = rule
                .enabled_key
                .as_ref()
                .is_none_or(|k| row.get(k).and_then(Value::as_bool).unwrap_or(true));
            let status = if enabled {
                status
            } else {
                ModelStatus::MentionedOnly
            };
            add(report, status, name);
        }
        return;
    }
    if rule.index.is_none()
        && let Some(values) = node.positional_values()
    {
        // Position unknown: take every value that looks like a model file.
        for name in values.iter().filter_map(Value::as_str) {
            if looks_like_model_file(name) {
                add(report, status, name);
            }
        }
        return;
    }
    let widget = rule.widget.as_deref().unwrap_or("?");
    match node.widget(rule.widget.as_deref(), rule.index) {
        WidgetValue::Literal(value) => match file_name(value) {
            Some(name) => add(report, status, name),
            None if value.is_null() => report.unresolved(
                Some(&rule.category),
                None,
                &node.id(),
                not_running(format!("{class}: {widget} is empty")),
            ),
            None => report.unresolved(
                Some(&rule.category),
                None,
                &node.id(),
                not_running(format!("{class}: {widget} is not a file name ({value})")),
            ),
        },
        WidgetValue::Dynamic(from) => report.unresolved(
            Some(&rule.category),
            None,
            &node.id(),
            not_running(format!(
                "{class}: {widget} is computed by {from} at run time"
            )),
        ),
        WidgetValue::Missing => report.unresolved(
            Some(&rule.category),
            None,
            &node.id(),
            not_running(format!("{class}: no saved value for {widget}")),
        ),
    }
}
