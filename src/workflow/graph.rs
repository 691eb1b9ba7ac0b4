//! The frontend's graph format, read leniently into borrowed structures.
//!
//! Workflows come from many frontend versions and custom nodes, and hand edits: every field may
//! be missing or of the wrong type. A node that cannot be read (no class) is skipped with a
//! warning; a malformed field reads as absent. Nothing here follows links: that is `ui.rs`.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::report::Warnings;

/// Node mode: muted ("never"): not executed; its consumers lose the input.
pub(crate) const MODE_MUTED: i64 = 2;
/// Node mode: bypassed: not executed; its outputs pass its inputs of the same type through.
pub(crate) const MODE_BYPASSED: i64 = 4;

/// Node id of a subgraph's input side in its links (`origin_id`).
pub(crate) const SUBGRAPH_INPUT_ID: &str = "-10";
/// Node id of a subgraph's output side in its links (`target_id`).
pub(crate) const SUBGRAPH_OUTPUT_ID: &str = "-20";

/// One graph: the root, a subgraph definition, or a legacy group node definition.
#[derive(Debug, Default)]
pub(crate) struct Graph<'a> {
    pub nodes: Vec<Node<'a>>,
    pub by_id: HashMap<String, usize>,
    /// Links by link id.
    pub links: HashMap<String, Link>,
    /// Subgraph definitions: input names in slot order.
    pub io_inputs: Vec<&'a str>,
    /// Subgraph definitions: the link feeding each output slot.
    pub io_outputs: HashMap<i64, Link>,
    /// `SetNode` constants (KJNodes) → node index, for `GetNode` lookups.
    pub set_nodes: HashMap<&'a str, usize>,
    /// The graph's `models` list, if any.
    pub models: Option<&'a [Value]>,
}

/// One node.
#[derive(Debug)]
pub(crate) struct Node<'a> {
    pub id: String,
    pub class: &'a str,
    pub mode: i64,
    pub inputs: Vec<Input<'a>>,
    /// Output slot types; `None` when the node has no `outputs` field at all.
    pub outputs: Option<Vec<&'a str>>,
    pub widgets: Widgets<'a>,
    pub properties: Option<&'a Map<String, Value>>,
}

/// One input slot.
#[derive(Debug)]
pub(crate) struct Input<'a> {
    pub name: &'a str,
    pub ty: &'a str,
    pub link: Option<String>,
    /// The widget this input stands for (a widget converted to an input, or promoted).
    pub widget: Option<&'a str>,
}

/// A node's saved widget values.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Widgets<'a> {
    None,
    /// The usual form: values in widget order.
    List(&'a [Value]),
    /// Object form (some custom nodes): values by widget name.
    Map(&'a Map<String, Value>),
}

impl<'a> Widgets<'a> {
    /// Every saved value.
    pub fn values(self) -> Vec<&'a Value> {
        match self {
            Widgets::None => Vec::new(),
            Widgets::List(list) => list.iter().collect(),
            Widgets::Map(map) => map.values().collect(),
        }
    }

    /// A value by position (array form) or name (object form).
    pub fn get(self, name: Option<&str>, index: Option<usize>) -> Option<&'a Value> {
        match self {
            Widgets::None => None,
            Widgets::List(list) => index.and_then(|i| list.get(i)),
            Widgets::Map(map) => name.and_then(|n| map.get(n)),
        }
    }
}

/// A link between an output slot and an input slot.
#[derive(Clone, Debug)]
pub(crate) struct Link {
    pub origin: String,
    pub origin_slot: i64,
    pub target: String,
    pub target_slot: i64,
}

/// A JSON node or link id as a string (`12`, `"12"`, `-10`); ids that are neither are absent.
pub(crate) fn id_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => n.as_i64().map(|i| i.to_string()).or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 1e15)
                .map(|f| format!("{}", f as i64))
        }),
        _ => None,
    }
}

impl<'a> Graph<'a> {
    /// Reads a UI graph or subgraph definition; `None` if it has no `nodes` array.
    pub fn parse(value: &'a Value, what: &str, warnings: &mut Warnings) -> Option<Graph<'a>> {
        let nodes = value.get("nodes")?.as_array()?;
        let mut graph = Graph {
            models: value
                .get("models")
                .and_then(Value::as_array)
                .map(Vec::as_slice),
            ..Graph::default()
        };
        for (position, raw) in nodes.iter().enumerate() {
            let Some(id) = raw.get("id").and_then(id_string) else {
                warnings.push(format!("{what}: node #{position} has no id; skipped"));
                continue;
            };
            graph.add_node(id, raw, what, warnings);
        }
        for raw in value
            .get("links")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let Some((id, link)) = parse_link(raw) else {
                warnings.push(format!("{what}: a link cannot be read; ignored"));
                continue;
            };
            if link.target == SUBGRAPH_OUTPUT_ID {
                graph
                    .io_outputs
                    .entry(link.target_slot)
                    .or_insert_with(|| link.clone());
            }
            graph.links.entry(id).or_insert(link);
        }
        graph.io_inputs = value
            .get("inputs")
            .and_then(Value::as_array)
            .map(|inputs| {
                inputs
                    .iter()
                    .map(|i| i.get("name").and_then(Value::as_str).unwrap_or(""))
                    .collect()
            })
            .unwrap_or_default();
        Some(graph)
    }

    /// Reads a legacy group node definition (`extra.groupNodes[name]`): nodes are addressed by
    /// position; their internal links are not needed (see `ui.rs`).
    pub fn parse_group(value: &'a Value, what: &str, warnings: &mut Warnings) -> Option<Graph<'a>> {
        let nodes = value.get("nodes")?.as_array()?;
        let mut graph = Graph::default();
        for (position, raw) in nodes.iter().enumerate() {
            let id = raw
                .get("index")
                .and_then(id_string)
                .unwrap_or_else(|| position.to_string());
            graph.add_node(id, raw, what, warnings);
        }
        Some(graph)
    }

    fn add_node(&mut self, id: String, raw: &'a Value, what: &str, warnings: &mut Warnings) {
        let Some(class) = raw.get("type").and_then(Value::as_str) else {
            warnings.push(format!("{what}: node {id} has no type; skipped"));
            return;
        };
        if self.by_id.contains_key(&id) {
            warnings.push(format!(
                "{what}: node id {id} is used twice; the second is ignored"
            ));
            return;
        }
        let inputs = raw
            .get("inputs")
            .and_then(Value::as_array)
            .map(|inputs| inputs.iter().map(parse_input).collect())
            .unwrap_or_default();
        let outputs = raw.get("outputs").and_then(Value::as_array).map(|outputs| {
            outputs
                .iter()
                .map(|o| o.get("type").and_then(Value::as_str).unwrap_or("*"))
                .collect()
        });
        let widgets = match raw.get("widgets_values") {
            Some(Value::Array(list)) => Widgets::List(list),
            Some(Value::Object(map)) => Widgets::Map(map),
            _ => Widgets::None,
        };
        let node = Node {
            id: id.clone(),
            class,
            mode: raw.get("mode").and_then(Value::as_i64).unwrap_or(0),
            inputs,
            outputs,
            widgets,
            properties: raw.get("properties").and_then(Value::as_object),
        };
        let index = self.nodes.len();
        if class == "SetNode"
            && let Some(name) = widgets.get(None, Some(0)).and_then(Value::as_str)
        {
            self.set_nodes.entry(name).or_insert(index);
        }
        self.by_id.insert(id, index);
        self.nodes.push(node);
    }
}

fn parse_input(raw: &Value) -> Input<'_> {
    Input {
        name: raw.get("name").and_then(Value::as_str).unwrap_or(""),
        ty: raw.get("type").and_then(Value::as_str).unwrap_or("*"),
        link: raw.get("link").and_then(id_string),
        widget: raw
            .get("widget")
            .and_then(|w| w.get("name"))
            .and_then(Value::as_str),
    }
}

/// A link in either form: `[id, origin_id, origin_slot, target_id, target_slot, type]` (v0.4)
/// or an object with those keys (v1, subgraphs).
fn parse_link(raw: &Value) -> Option<(String, Link)> {
    let field = |key: &str, position: usize| match raw {
        Value::Array(a) => a.get(position),
        Value::Object(o) => o.get(key),
        _ => None,
    };
    let id = id_string(field("id", 0)?)?;
    let link = Link {
        origin: id_string(field("origin_id", 1)?)?,
        origin_slot: field("origin_slot", 2)?.as_i64()?,
        target: id_string(field("target_id", 3)?)?,
        target_slot: field("target_slot", 4)?.as_i64()?,
    };
    Some((id, link))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_both_link_forms_and_odd_ids() {
        let v = json!({
            "nodes": [
                {"id": 1, "type": "A", "outputs": [{"type": "MODEL"}]},
                {"id": "2", "type": "B", "inputs": [{"name": "model", "type": "MODEL", "link": 7}]},
                {"id": 3.0, "type": "C", "widgets_values": {"x": 1}},
                {"type": "NoId"},
                {"id": 5},
                {"id": 1, "type": "Dup"}
            ],
            "links": [[7, 1, 0, 2, 0, "MODEL"], {"id": 8, "origin_id": 1, "origin_slot": 0,
                "target_id": -20, "target_slot": 0}, "junk", [1, 2]]
        });
        let mut w = Warnings::default();
        let g = Graph::parse(&v, "test", &mut w).expect("graph");
        assert_eq!(g.nodes.len(), 3);
        assert_eq!(g.by_id["3"], 2);
        assert!(matches!(g.nodes[2].widgets, Widgets::Map(_)));
        assert_eq!(g.links["7"].origin, "1");
        assert_eq!(g.io_outputs[&0].origin, "1");
        assert_eq!(g.links.len(), 2);
        assert_eq!(g.nodes[1].inputs[0].link.as_deref(), Some("7"));
    }

    #[test]
    fn wrong_types_read_as_absent() {
        let v = json!({"nodes": [{"id": 1, "type": "A", "inputs": "x", "outputs": 3,
            "mode": "zero", "widgets_values": 5, "properties": []}], "links": {}});
        let mut w = Warnings::default();
        let g = Graph::parse(&v, "test", &mut w).expect("graph");
        let n = &g.nodes[0];
        assert!(n.inputs.is_empty() && n.outputs.is_none() && n.properties.is_none());
        assert_eq!(n.mode, 0);
        assert!(matches!(n.widgets, Widgets::None));
        assert!(Graph::parse(&json!({"nodes": {}}), "x", &mut w).is_none());
    }
}
