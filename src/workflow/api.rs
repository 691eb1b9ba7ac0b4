//! Resolution of an API ("prompt") graph: `{"<id>": {class_type, inputs}}`.
//!
//! The frontend has already dropped muted and bypassed nodes and flattened subgraphs (ids like
//! `5:3`), so what is left is what ComfyUI would consider; it runs the nodes upstream of an
//! output node (`execution.validate_prompt`). An input is a link when it is a two-element list of
//! a node id and an output index (`is_link`).

use std::collections::{BTreeMap, HashSet, VecDeque};

use serde_json::{Map, Value};

use super::apply::{NodeView, WidgetValue, apply};
use super::graph::id_string;
use super::report::Report;
use super::rules::RuleSet;

/// Constant-string nodes followed in a row when a file input is linked.
const MAX_VALUE_HOPS: usize = 8;

struct ApiNode<'a> {
    class: &'a str,
    inputs: Option<&'a Map<String, Value>>,
}

struct Api<'p, 'a> {
    rules: &'p RuleSet,
    nodes: BTreeMap<&'a str, ApiNode<'a>>,
    reached: HashSet<&'a str>,
}

/// The node id an input links to, if it is a link.
fn link(value: &Value) -> Option<String> {
    match value.as_array()?.as_slice() {
        [id, slot] if slot.is_i64() || slot.is_u64() => {
            if id.is_string() || id.is_number() {
                id_string(id)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Resolves an API prompt into `report`.
pub(crate) fn resolve(prompt: &Map<String, Value>, rules: &RuleSet, report: &mut Report) {
    let mut nodes = BTreeMap::new();
    for (id, raw) in prompt {
        let Some(class) = raw.get("class_type").and_then(Value::as_str) else {
            report
                .warnings
                .push(format!("prompt entry {id:?} has no class_type; skipped"));
            continue;
        };
        let inputs = raw.get("inputs").and_then(Value::as_object);
        nodes.insert(id.as_str(), ApiNode { class, inputs });
    }
    let mut api = Api {
        rules,
        nodes,
        reached: HashSet::new(),
    };
    api.execute();
    for &id in api.nodes.keys() {
        apply(&ApiView { api: &api, id }, rules, report);
    }
}

impl<'a> Api<'_, 'a> {
    fn execute(&mut self) {
        let mut queue: VecDeque<&'a str> = self
            .nodes
            .iter()
            .filter(|(_, n)| self.rules.is_output(n.class))
            .map(|(&id, _)| id)
            .collect();
        let mut reached: HashSet<&'a str> = queue.iter().copied().collect();
        while let Some(id) = queue.pop_front() {
            let Some(inputs) = self.nodes.get(id).and_then(|n| n.inputs) else {
                continue;
            };
            for value in inputs.values() {
                let Some(source) = link(value) else { continue };
                if let Some((&source, _)) = self.nodes.get_key_value(source.as_str())
                    && reached.insert(source)
                {
                    queue.push_back(source);
                }
            }
        }
        self.reached = reached;
    }

    fn input(&self, id: &str, name: &str, hops: usize) -> WidgetValue<'a> {
        let Some(value) = self
            .nodes
            .get(id)
            .and_then(|n| n.inputs)
            .and_then(|i| i.get(name))
        else {
            return WidgetValue::Missing;
        };
        let Some(source) = link(value) else {
            return WidgetValue::Literal(value);
        };
        match self.nodes.get(source.as_str()) {
            Some(node) => match self.rules.string_sources.get(node.class) {
                Some(r) if hops < MAX_VALUE_HOPS => self.input(&source, &r.widget, hops + 1),
                _ => WidgetValue::Dynamic(format!("node {source} ({})", node.class)),
            },
            None => WidgetValue::Dynamic(format!("node {source}, which is not in the prompt")),
        }
    }

    fn literals(&self, id: &str) -> Vec<&'a Value> {
        self.nodes
            .get(id)
            .and_then(|n| n.inputs)
            .map(|inputs| inputs.values().filter(|v| link(v).is_none()).collect())
            .unwrap_or_default()
    }
}

struct ApiView<'x, 'p, 'a> {
    api: &'x Api<'p, 'a>,
    id: &'a str,
}

impl<'a> NodeView<'a> for ApiView<'_, '_, 'a> {
    fn class(&self) -> &'a str {
        self.api.nodes.get(self.id).map_or("", |n| n.class)
    }

    fn id(&self) -> String {
        self.id.to_owned()
    }

    fn runs(&self) -> Result<(), &'static str> {
        if self.api.reached.contains(self.id) {
            Ok(())
        } else {
            Err("not upstream of an output node")
        }
    }

    fn widget(&self, name: Option<&str>, _index: Option<usize>) -> WidgetValue<'a> {
        match name {
            Some(name) => self.api.input(self.id, name, 0),
            None => WidgetValue::Missing,
        }
    }

    fn positional_values(&self) -> Option<&'a [Value]> {
        None
    }

    fn all_values(&self) -> Vec<&'a Value> {
        self.api.literals(self.id)
    }

    fn text_values(&self) -> Vec<&'a Value> {
        let mut values = self.api.literals(self.id);
        let inputs = self.api.nodes.get(self.id).and_then(|n| n.inputs);
        for value in inputs.into_iter().flat_map(Map::values) {
            let Some(source) = link(value) else { continue };
            if let Some(node) = self.api.nodes.get(source.as_str())
                && !self.api.rules.is_text_encoder(node.class)
            {
                values.extend(self.api.literals(&source));
            }
        }
        values
    }
}
