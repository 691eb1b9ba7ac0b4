//! Resolution of a UI ("workflow") graph: subgraphs flattened, links followed the way the
//! frontend follows them when it builds a prompt, then the rules applied to every node.
//!
//! The frontend, not ComfyUI, decides what a UI graph executes: it drops muted (mode 2) and
//! bypassed (mode 4) nodes, wires a bypassed node's outputs to its inputs of the same type,
//! passes links through frontend-only nodes (reroutes, primitives, `GetNode`/`SetNode`), and
//! flattens subgraph instances into `host:inner` ids. ComfyUI then runs only what is upstream of
//! an output node. This module replays those rules (after `ExecutableNodeDTO` in
//! ComfyUI_frontend) over scopes — the root graph and one scope per subgraph instance — without
//! copying the graph, and with every walk bounded and cycle-checked.
//!
//! Legacy group nodes (`extra.groupNodes`) cannot be unpacked exactly without the node
//! definitions ComfyUI serves at run time, so a group instance is executed as a unit: its inner
//! loaders run when the group node is upstream of an output (or holds one).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};

use serde_json::Value;

use super::WorkflowError;
use super::apply::{NodeView, WidgetValue, apply};
use super::graph::{Graph, MODE_BYPASSED, MODE_MUTED, Node, SUBGRAPH_INPUT_ID, Widgets, id_string};
use super::report::{Report, Warnings};
use super::rules::RuleSet;

/// Subgraphs nested deeper than this are not expanded (real ones nest a few levels).
const MAX_SUBGRAPH_DEPTH: usize = 32;
/// Nodes in all scopes together: instances multiply definitions, and a hostile file could nest
/// a hundred instances of a hundred instances.
const MAX_FLAT_NODES: usize = 200_000;
/// Steps of one link walk (through reroutes, bypassed nodes and subgraph borders).
const MAX_RESOLVE_STEPS: usize = 10_000;
/// Constant-string nodes followed in a row when a file widget is linked.
const MAX_VALUE_HOPS: usize = 8;
/// Values of the frontend's `control_after_generate` companion widget.
const CONTROL_VALUES: &[&str] = &["fixed", "increment", "decrement", "randomize"];

/// Resolves a UI graph into `report`.
pub(crate) fn resolve(
    root: &Value,
    rules: &RuleSet,
    report: &mut Report,
) -> Result<(), WorkflowError> {
    let Some(root_graph) = Graph::parse(root, "workflow", &mut report.warnings) else {
        return Err(WorkflowError::NotAWorkflow(
            "\"nodes\" is not an array".into(),
        ));
    };
    let mut defs = HashMap::new();
    collect_definitions(root, 0, &mut defs, &mut report.warnings);
    let mut groups = HashMap::new();
    if let Some(map) = root
        .get("extra")
        .and_then(|e| e.get("groupNodes"))
        .and_then(Value::as_object)
    {
        for (name, def) in map {
            if let Some(graph) =
                Graph::parse_group(def, &format!("group node {name}"), &mut report.warnings)
            {
                groups.insert(name.as_str(), graph);
            }
        }
    }
    let graphs = Graphs {
        root: root_graph,
        defs,
        groups,
    };

    let mut ui = Ui::expand(&graphs, rules);
    ui.execute();
    for sid in 0..ui.scopes.len() {
        for idx in 0..ui.scopes[sid].graph.nodes.len() {
            apply(&UiNode { ui: &ui, sid, idx }, rules, report);
        }
    }
    ui.declare(&graphs, report);
    for warning in ui.warnings.into_inner().into_vec() {
        report.warnings.push(warning);
    }
    Ok(())
}

/// Every graph of the workflow.
struct Graphs<'a> {
    root: Graph<'a>,
    /// Subgraph definitions by id (nested `definitions` included).
    defs: HashMap<&'a str, Graph<'a>>,
    /// Legacy group node definitions by name.
    groups: HashMap<&'a str, Graph<'a>>,
}

fn collect_definitions<'a>(
    value: &'a Value,
    depth: usize,
    defs: &mut HashMap<&'a str, Graph<'a>>,
    warnings: &mut Warnings,
) {
    let Some(list) = value
        .get("definitions")
        .and_then(|d| d.get("subgraphs"))
        .and_then(Value::as_array)
    else {
        return;
    };
    if depth > MAX_SUBGRAPH_DEPTH {
        warnings.push("subgraph definitions nested too deeply; the deepest are ignored");
        return;
    }
    for def in list {
        let Some(id) = def.get("id").and_then(Value::as_str) else {
            warnings.push("a subgraph definition has no id; ignored");
            continue;
        };
        if !defs.contains_key(id) {
            let name = def.get("name").and_then(Value::as_str).unwrap_or(id);
            match Graph::parse(def, &format!("subgraph {name}"), warnings) {
                Some(graph) => {
                    defs.insert(id, graph);
                }
                None => warnings.push(format!("subgraph {name} has no nodes; ignored")),
            }
        }
        collect_definitions(def, depth + 1, defs, warnings);
    }
}

/// The class of a legacy group node instance names its definition (`workflow>NAME`; before
/// frontend 1.2.63 `workflow/NAME`).
fn group_name(class: &str) -> Option<&str> {
    class
        .strip_prefix("workflow>")
        .or_else(|| class.strip_prefix("workflow/"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScopeKind {
    Root,
    Subgraph,
    Group,
}

/// Values a subgraph instance gives its promoted widgets, by subgraph input name.
type Promoted<'a> = HashMap<String, &'a Value>;
/// Values a subgraph instance gives inner widgets through `proxyWidgets`, by (inner node id,
/// widget name).
type Overrides<'a> = HashMap<(String, String), &'a Value>;

/// One graph as instantiated at one place: the root, or a subgraph / group node instance.
struct Scope<'g, 'a> {
    graph: &'g Graph<'a>,
    kind: ScopeKind,
    /// Prefix of execution ids (`""`, `"5:"`, `"5:7:"`).
    prefix: String,
    /// The scope holding the instance node, and that node's index.
    parent: Option<(usize, usize)>,
    /// Why nothing in this scope runs (an instance, or one around it, is muted or bypassed).
    inactive: Option<&'static str>,
    /// Subgraph definition ids from the root down to this scope (cycle guard).
    chain: Vec<&'a str>,
    promoted: Promoted<'a>,
    overrides: Overrides<'a>,
    /// Group scopes: the instance's saved values assigned to each inner node, by node index.
    group_values: HashMap<usize, &'a [Value]>,
    /// Instance node index → its scope.
    children: HashMap<usize, usize>,
}

/// One step of a link walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Step<'a> {
    /// What feeds input `slot` of a node; `ty` overrides the input's type for bypass matching.
    In {
        sid: usize,
        idx: usize,
        slot: usize,
        ty: Option<&'a str>,
    },
    /// What output `slot` of a node really is, seen by an input of type `ty`.
    Out {
        sid: usize,
        idx: usize,
        slot: i64,
        ty: &'a str,
    },
}

/// Where a link walk ends.
#[derive(Clone, Copy, Debug)]
enum Source<'a> {
    /// An executed node.
    Node(usize, usize),
    /// A frontend `PrimitiveNode`: its value is copied into the widget it feeds.
    Primitive(usize, usize),
    /// A promoted widget of a subgraph instance.
    HostWidget(&'a Value),
    /// Nothing (unconnected, muted, or broken).
    Nothing,
}

struct Ui<'g, 'a> {
    rules: &'g RuleSet,
    scopes: Vec<Scope<'g, 'a>>,
    /// Executed nodes (scope, index).
    reached: HashSet<(usize, usize)>,
    warnings: RefCell<Warnings>,
}

impl<'g, 'a> Ui<'g, 'a> {
    /// Builds the scope tree: one scope per subgraph / group instance, breadth first.
    fn expand(graphs: &'g Graphs<'a>, rules: &'g RuleSet) -> Self {
        let mut ui = Ui {
            rules,
            scopes: vec![Scope {
                graph: &graphs.root,
                kind: ScopeKind::Root,
                prefix: String::new(),
                parent: None,
                inactive: None,
                chain: Vec::new(),
                promoted: HashMap::new(),
                overrides: HashMap::new(),
                group_values: HashMap::new(),
                children: HashMap::new(),
            }],
            reached: HashSet::new(),
            warnings: RefCell::new(Warnings::default()),
        };
        let mut flat = graphs.root.nodes.len();
        let mut queue = VecDeque::from([0]);
        while let Some(sid) = queue.pop_front() {
            let graph = ui.scopes[sid].graph;
            for (idx, node) in graph.nodes.iter().enumerate() {
                let (child_graph, kind) = if let Some(def) = graphs.defs.get(node.class) {
                    (def, ScopeKind::Subgraph)
                } else if let Some(def) = group_name(node.class).and_then(|n| graphs.groups.get(n))
                {
                    (def, ScopeKind::Group)
                } else {
                    continue;
                };
                let parent = &ui.scopes[sid];
                let id = format!("{}{}", parent.prefix, node.id);
                if kind == ScopeKind::Subgraph && parent.chain.contains(&node.class) {
                    ui.warn(format!(
                        "node {id}: subgraph {} contains itself; not expanded",
                        node.class
                    ));
                    continue;
                }
                if parent.chain.len() >= MAX_SUBGRAPH_DEPTH {
                    ui.warn(format!(
                        "node {id}: subgraphs nested too deeply; not expanded"
                    ));
                    continue;
                }
                if flat + child_graph.nodes.len() > MAX_FLAT_NODES {
                    ui.warn(format!(
                        "node {id}: more than {MAX_FLAT_NODES} nodes after expanding subgraphs; \
                         not expanded"
                    ));
                    continue;
                }
                flat += child_graph.nodes.len();
                let inactive = parent.inactive.or(match node.mode {
                    MODE_MUTED => Some("inside a muted subgraph or group node"),
                    MODE_BYPASSED => Some("inside a bypassed subgraph or group node"),
                    _ => None,
                });
                let mut chain = parent.chain.clone();
                let mut child = Scope {
                    graph: child_graph,
                    kind,
                    prefix: format!("{id}:"),
                    parent: Some((sid, idx)),
                    inactive,
                    chain: Vec::new(),
                    promoted: HashMap::new(),
                    overrides: HashMap::new(),
                    group_values: HashMap::new(),
                    children: HashMap::new(),
                };
                match kind {
                    ScopeKind::Subgraph => {
                        chain.push(node.class);
                        let (promoted, overrides) = host_values(node, parent);
                        child.promoted = promoted;
                        child.overrides = overrides;
                    }
                    _ => child.group_values = ui.group_values(node, child_graph, &id),
                }
                child.chain = chain;
                ui.scopes.push(child);
                let cid = ui.scopes.len() - 1;
                ui.scopes[sid].children.insert(idx, cid);
                if kind == ScopeKind::Subgraph {
                    queue.push_back(cid);
                }
            }
        }
        ui
    }

    fn warn(&self, message: String) {
        self.warnings.borrow_mut().push(message);
    }

    fn node(&self, sid: usize, idx: usize) -> &'g Node<'a> {
        &self.scopes[sid].graph.nodes[idx]
    }

    fn exec_id(&self, sid: usize, idx: usize) -> String {
        format!("{}{}", self.scopes[sid].prefix, self.node(sid, idx).id)
    }

    fn child(&self, sid: usize, idx: usize) -> Option<(usize, ScopeKind)> {
        let cid = *self.scopes[sid].children.get(&idx)?;
        Some((cid, self.scopes[cid].kind))
    }

    /// A group instance's saved values, split over its inner nodes, when they line up with the
    /// definition (same number of values per node); otherwise the definition's own values are
    /// used, with a warning.
    fn group_values(
        &self,
        host: &Node<'a>,
        group: &Graph<'a>,
        id: &str,
    ) -> HashMap<usize, &'a [Value]> {
        let Widgets::List(values) = host.widgets else {
            return HashMap::new();
        };
        let counts: Vec<usize> = group
            .nodes
            .iter()
            .map(|n| n.widgets.values().len())
            .collect();
        if counts.iter().sum::<usize>() != values.len() {
            self.warn(format!(
                "group node {id}: its saved values do not line up with the group definition; \
                 using the definition's values"
            ));
            return HashMap::new();
        }
        let mut out = HashMap::new();
        let mut at = 0;
        for (idx, count) in counts.into_iter().enumerate() {
            out.insert(idx, &values[at..at + count]);
            at += count;
        }
        out
    }

    /// Whether execution starts at this node.
    fn is_output(&self, sid: usize, idx: usize) -> bool {
        let node = self.node(sid, idx);
        let rules = self.rules;
        if rules.is_virtual(node.class) {
            return false;
        }
        if rules.is_output(node.class) {
            return true;
        }
        if let Some((cid, ScopeKind::Group)) = self.child(sid, idx) {
            return self.scopes[cid]
                .graph
                .nodes
                .iter()
                .any(|n| rules.is_output(n.class));
        }
        // A node with no output slots does nothing unless it is an output node.
        if node.outputs.as_ref().is_some_and(Vec::is_empty)
            && !rules.loaders.contains_key(node.class)
            && !rules.unresolved.contains_key(node.class)
        {
            self.warn(format!(
                "node {} ({}) has no output slots: taken as an output node",
                self.exec_id(sid, idx),
                node.class
            ));
            return true;
        }
        false
    }

    /// Marks every node upstream of an active output node.
    fn execute(&mut self) {
        let mut queue = VecDeque::new();
        for sid in 0..self.scopes.len() {
            let scope = &self.scopes[sid];
            if scope.kind == ScopeKind::Group || scope.inactive.is_some() {
                continue;
            }
            for (idx, node) in scope.graph.nodes.iter().enumerate() {
                let expanded_subgraph =
                    matches!(self.child(sid, idx), Some((_, ScopeKind::Subgraph)));
                if node.mode == MODE_MUTED || node.mode == MODE_BYPASSED || expanded_subgraph {
                    continue;
                }
                if self.is_output(sid, idx) {
                    queue.push_back((sid, idx));
                }
            }
        }
        let mut reached: HashSet<(usize, usize)> = queue.iter().copied().collect();
        while let Some((sid, idx)) = queue.pop_front() {
            for (slot, input) in self.node(sid, idx).inputs.iter().enumerate() {
                if input.link.is_none() {
                    continue;
                }
                let step = Step::In {
                    sid,
                    idx,
                    slot,
                    ty: None,
                };
                if let Source::Node(s, i) = self.resolve(step)
                    && reached.insert((s, i))
                {
                    queue.push_back((s, i));
                }
            }
        }
        self.reached = reached;
    }

    /// Follows a link to where its value comes from.
    fn resolve(&self, mut step: Step<'a>) -> Source<'a> {
        let mut seen = HashSet::new();
        loop {
            if !seen.insert(step) {
                let (Step::In { sid, idx, .. } | Step::Out { sid, idx, .. }) = step;
                self.warn(format!(
                    "links loop through node {}; ignored",
                    self.exec_id(sid, idx)
                ));
                return Source::Nothing;
            }
            if seen.len() > MAX_RESOLVE_STEPS {
                self.warn(format!(
                    "a link chain is longer than {MAX_RESOLVE_STEPS} steps; cut"
                ));
                return Source::Nothing;
            }
            step = match step {
                Step::In { sid, idx, slot, ty } => match self.step_in(sid, idx, slot, ty) {
                    Ok(next) => next,
                    Err(end) => return end,
                },
                Step::Out { sid, idx, slot, ty } => match self.step_out(sid, idx, slot, ty) {
                    Ok(next) => next,
                    Err(end) => return end,
                },
            };
        }
    }

    fn step_in(
        &self,
        sid: usize,
        idx: usize,
        slot: usize,
        ty: Option<&'a str>,
    ) -> Result<Step<'a>, Source<'a>> {
        let scope = &self.scopes[sid];
        if scope.kind == ScopeKind::Group {
            // Group definitions keep no usable links (see the module docs).
            return Err(Source::Nothing);
        }
        let node = self.node(sid, idx);
        let Some(input) = node.inputs.get(slot) else {
            return Err(Source::Nothing);
        };
        let Some(link_id) = &input.link else {
            return Err(Source::Nothing);
        };
        let Some(link) = scope.graph.links.get(link_id) else {
            self.warn(format!(
                "node {}: input {} uses link {link_id}, which does not exist",
                self.exec_id(sid, idx),
                input.name
            ));
            return Err(Source::Nothing);
        };
        if link.origin == SUBGRAPH_INPUT_ID {
            return self.host_input(sid, link.origin_slot);
        }
        let Some(&origin) = scope.graph.by_id.get(&link.origin) else {
            self.warn(format!(
                "node {}: input {} is linked from node {}, which does not exist",
                self.exec_id(sid, idx),
                input.name,
                link.origin
            ));
            return Err(Source::Nothing);
        };
        Ok(Step::Out {
            sid,
            idx: origin,
            slot: link.origin_slot,
            ty: ty.unwrap_or(input.ty),
        })
    }

    fn step_out(
        &self,
        sid: usize,
        idx: usize,
        slot: i64,
        ty: &'a str,
    ) -> Result<Step<'a>, Source<'a>> {
        let node = self.node(sid, idx);
        if node.mode == MODE_BYPASSED {
            return match bypass_slot(node, slot, ty) {
                Some(input) => Ok(Step::In {
                    sid,
                    idx,
                    slot: input,
                    ty: None,
                }),
                None => Err(Source::Nothing),
            };
        }
        if let Some((cid, ScopeKind::Subgraph)) = self.child(sid, idx) {
            if node.mode == MODE_MUTED {
                return Err(Source::Nothing);
            }
            let inner = self.scopes[cid].graph;
            let Some(link) = inner.io_outputs.get(&slot) else {
                return Err(Source::Nothing);
            };
            if link.origin == SUBGRAPH_INPUT_ID {
                return self.host_input(cid, link.origin_slot);
            }
            let Some(&origin) = inner.by_id.get(&link.origin) else {
                return Err(Source::Nothing);
            };
            return Ok(Step::Out {
                sid: cid,
                idx: origin,
                slot: link.origin_slot,
                ty,
            });
        }
        if self.rules.is_virtual(node.class) {
            match node.class {
                "PrimitiveNode" => return Err(Source::Primitive(sid, idx)),
                "GetNode" => {
                    let name = node.widgets.get(None, Some(0)).and_then(Value::as_str);
                    return match name.and_then(|n| self.scopes[sid].graph.set_nodes.get(n)) {
                        Some(&set) => Ok(Step::In {
                            sid,
                            idx: set,
                            slot: 0,
                            ty: Some(ty),
                        }),
                        None => Err(Source::Nothing),
                    };
                }
                _ => {}
            }
            return match usize::try_from(slot) {
                Ok(s) if s < node.inputs.len() => Ok(Step::In {
                    sid,
                    idx,
                    slot: s,
                    ty: Some(ty),
                }),
                _ => Err(Source::Nothing),
            };
        }
        if node.mode == MODE_MUTED {
            return Err(Source::Nothing);
        }
        Err(Source::Node(sid, idx))
    }

    /// The subgraph input `origin_slot` of scope `sid`: the instance's input link, or its
    /// promoted widget value.
    fn host_input(&self, sid: usize, origin_slot: i64) -> Result<Step<'a>, Source<'a>> {
        let scope = &self.scopes[sid];
        let Some((psid, hidx)) = scope.parent.filter(|_| scope.kind == ScopeKind::Subgraph) else {
            return Err(Source::Nothing);
        };
        let host = self.node(psid, hidx);
        let slot = usize::try_from(origin_slot).ok();
        let name = slot
            .and_then(|s| scope.graph.io_inputs.get(s))
            .copied()
            .filter(|n| !n.is_empty());
        let host_slot = name
            .and_then(|n| host.inputs.iter().position(|i| i.name == n))
            .or_else(|| slot.filter(|&s| s < host.inputs.len()));
        if let Some(hs) = host_slot
            && host.inputs[hs].link.is_some()
        {
            return Ok(Step::In {
                sid: psid,
                idx: hidx,
                slot: hs,
                ty: None,
            });
        }
        let key = name.or_else(|| host_slot.map(|hs| host.inputs[hs].name));
        Err(key
            .and_then(|k| scope.promoted.get(k))
            .map_or(Source::Nothing, |v| Source::HostWidget(v)))
    }

    /// A widget's value as the node would receive it (see [`NodeView::widget`]).
    fn widget_value(
        &self,
        sid: usize,
        idx: usize,
        name: Option<&str>,
        index: Option<usize>,
        hops: usize,
    ) -> WidgetValue<'a> {
        let scope = &self.scopes[sid];
        let node = self.node(sid, idx);
        if let Some(name) = name {
            let linked = node.inputs.iter().position(|i| {
                i.link.is_some()
                    && (i.widget == Some(name) || (i.widget.is_some() && i.name == name))
            });
            if let Some(slot) = linked {
                let step = Step::In {
                    sid,
                    idx,
                    slot,
                    ty: None,
                };
                match self.resolve(step) {
                    Source::HostWidget(v) => return WidgetValue::Literal(v),
                    Source::Primitive(s, i) => {
                        if let Some(v) = self.node(s, i).widgets.get(Some("value"), Some(0)) {
                            return WidgetValue::Literal(v);
                        }
                    }
                    Source::Node(s, i) => {
                        let source = self.node(s, i);
                        if hops < MAX_VALUE_HOPS
                            && let Some(r) = self.rules.string_sources.get(source.class)
                        {
                            return self.widget_value(
                                s,
                                i,
                                Some(&r.widget),
                                Some(r.index),
                                hops + 1,
                            );
                        }
                        return WidgetValue::Dynamic(format!(
                            "node {} ({})",
                            self.exec_id(s, i),
                            source.class
                        ));
                    }
                    Source::Nothing => {}
                }
            }
            if let Some(v) = scope.overrides.get(&(node.id.clone(), name.to_owned())) {
                return WidgetValue::Literal(v);
            }
        }
        if let Some(values) = scope.group_values.get(&idx) {
            if let Some(v) = index.and_then(|i| values.get(i)) {
                return WidgetValue::Literal(v);
            }
            return WidgetValue::Missing;
        }
        match node.widgets.get(name, index) {
            Some(v) => WidgetValue::Literal(v),
            None => WidgetValue::Missing,
        }
    }

    fn own_values(&self, sid: usize, idx: usize) -> Vec<&'a Value> {
        match self.scopes[sid].group_values.get(&idx) {
            Some(values) => values.iter().collect(),
            None => self.node(sid, idx).widgets.values(),
        }
    }

    /// Records `models` lists: the root's, each node's (once per instance), and those of
    /// definitions never instantiated.
    fn declare(&self, graphs: &Graphs<'a>, report: &mut Report) {
        let declare_list = |list: &'a [Value], node: Option<&str>, report: &mut Report| {
            for entry in list {
                let Some(name) = entry.get("name").and_then(Value::as_str) else {
                    report
                        .warnings
                        .push("a models entry has no name; ignored".to_owned());
                    continue;
                };
                let directory = entry.get("directory").and_then(Value::as_str);
                let url = entry.get("url").and_then(Value::as_str);
                report.declared(name, directory, url, node);
            }
        };
        let node_models = |node: &Node<'a>| {
            node.properties
                .and_then(|p| p.get("models"))
                .and_then(Value::as_array)
                .map(Vec::as_slice)
        };
        let mut instantiated: HashSet<*const Graph<'a>> = HashSet::new();
        for (sid, scope) in self.scopes.iter().enumerate() {
            instantiated.insert(scope.graph);
            if let Some(models) = scope.graph.models {
                let node = scope.parent.map(|(p, h)| self.exec_id(p, h));
                declare_list(models, node.as_deref(), report);
            }
            for (idx, node) in scope.graph.nodes.iter().enumerate() {
                if let Some(models) = node_models(node) {
                    declare_list(models, Some(&self.exec_id(sid, idx)), report);
                }
            }
        }
        for graph in graphs.defs.values().chain(graphs.groups.values()) {
            if instantiated.contains(&(graph as *const Graph<'a>)) {
                continue;
            }
            if let Some(models) = graph.models {
                declare_list(models, None, report);
            }
            for node in &graph.nodes {
                if let Some(models) = node_models(node) {
                    declare_list(models, None, report);
                }
            }
        }
    }
}

/// The values a subgraph instance gives its inner widgets.
///
/// Two saved forms exist. With `properties.proxyWidgets` (`[[innerId, widget], …]`, an array or
/// its JSON text), `widgets_values[i]` is the instance's value for entry `i`; `innerId` `-1`
/// names the instance's own promoted input. Otherwise `widgets_values` holds one value per
/// input that carries a `widget` (a promoted widget), in input order; older saves also keep the
/// `control_after_generate` value after a seed, which is skipped. Values the enclosing instance
/// sets on this instance through its own `proxyWidgets` win.
fn host_values<'a>(host: &Node<'a>, parent: &Scope<'_, 'a>) -> (Promoted<'a>, Overrides<'a>) {
    let mut promoted = HashMap::new();
    let mut overrides = HashMap::new();
    let proxies = proxy_widgets(host);
    match host.widgets {
        Widgets::List(values) if !proxies.is_empty() => {
            for ((inner, widget), value) in proxies.iter().zip(values) {
                if value.is_null() {
                    continue;
                }
                for name in widget_names(widget) {
                    if inner == "-1" {
                        promoted.insert(name, value);
                    } else {
                        overrides.insert((inner.clone(), name), value);
                    }
                }
            }
        }
        Widgets::List(values) => {
            let promoted_inputs: Vec<&str> = host
                .inputs
                .iter()
                .filter(|i| i.widget.is_some())
                .map(|i| i.name)
                .collect();
            let has_companions = values.len() > promoted_inputs.len();
            let mut at = 0;
            for name in promoted_inputs {
                let Some(value) = values.get(at) else { break };
                if !value.is_null() {
                    promoted.insert(name.to_owned(), value);
                }
                at += 1;
                let companion = values
                    .get(at)
                    .and_then(Value::as_str)
                    .is_some_and(|s| CONTROL_VALUES.contains(&s));
                if has_companions && companion && value.is_number() {
                    at += 1;
                }
            }
        }
        Widgets::Map(map) => {
            for input in host.inputs.iter().filter(|i| i.widget.is_some()) {
                if let Some(value) = map
                    .get(input.name)
                    .or_else(|| input.widget.and_then(|w| map.get(w)))
                {
                    promoted.insert(input.name.to_owned(), value);
                }
            }
        }
        Widgets::None => {}
    }
    for ((inner, widget), value) in &parent.overrides {
        if *inner == host.id {
            promoted.insert(widget.clone(), *value);
        }
    }
    (promoted, overrides)
}

/// `properties.proxyWidgets` as (inner node id, widget name) pairs; preview pseudo-widgets
/// (`$$…`) are left out.
fn proxy_widgets(host: &Node<'_>) -> Vec<(String, String)> {
    let Some(raw) = host.properties.and_then(|p| p.get("proxyWidgets")) else {
        return Vec::new();
    };
    let parsed;
    let list = match raw {
        Value::Array(list) => list,
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Array(list)) => {
                parsed = list;
                &parsed
            }
            _ => return Vec::new(),
        },
        _ => return Vec::new(),
    };
    list.iter()
        .map(|entry| {
            let inner = entry.get(0).and_then(id_string).unwrap_or_default();
            let widget = entry.get(1).and_then(Value::as_str).unwrap_or_default();
            (inner, widget.to_owned())
        })
        .filter(|(_, w)| !w.starts_with("$$"))
        .collect()
}

/// A proxy widget name and, for legacy `"5: ckpt_name"` names, the name without the id prefix.
fn widget_names(name: &str) -> Vec<String> {
    let mut names = vec![name.to_owned()];
    let mut rest = name;
    while let Some((head, tail)) = rest.split_once(':') {
        let head = head.trim();
        if head.is_empty() || !head.bytes().all(|b| b.is_ascii_digit()) {
            break;
        }
        rest = tail.trim();
        if !rest.is_empty() {
            names.push(rest.to_owned());
        }
    }
    names
}

/// LiteGraph's `isValidConnection`: `*`/empty match anything; otherwise case-insensitive
/// equality, with comma-separated type lists matching if they share a type.
fn types_match(a: &str, b: &str) -> bool {
    let wild = |t: &str| t.is_empty() || t == "*";
    if wild(a) || wild(b) || a == b {
        return true;
    }
    let (a, b) = (a.to_lowercase(), b.to_lowercase());
    a.split(',')
        .any(|x| b.split(',').any(|y| x.trim() == y.trim()))
}

/// The input a bypassed node passes to its output `slot` (`#getBypassSlotIndex`): the input at
/// the same position if its type fits, else the first input of exactly the type wanted, else the
/// first input whose type fits both.
fn bypass_slot(node: &Node<'_>, slot: i64, ty: &str) -> Option<usize> {
    let slot = usize::try_from(slot).ok()?;
    let inputs = &node.inputs;
    if ty.is_empty() || ty == "*" {
        return if slot < inputs.len() {
            Some(slot)
        } else {
            (!inputs.is_empty()).then_some(0)
        };
    }
    let out_ty = node
        .outputs
        .as_ref()
        .and_then(|o| o.get(slot))
        .copied()
        .unwrap_or("*");
    if let Some(input) = inputs.get(slot)
        && types_match(input.ty, out_ty)
        && types_match(input.ty, ty)
    {
        return Some(slot);
    }
    inputs.iter().position(|i| i.ty == ty).or_else(|| {
        inputs
            .iter()
            .position(|i| types_match(i.ty, out_ty) && types_match(i.ty, ty))
    })
}

/// A node of a UI scope, as the rules see it.
struct UiNode<'u, 'g, 'a> {
    ui: &'u Ui<'g, 'a>,
    sid: usize,
    idx: usize,
}

impl<'a> NodeView<'a> for UiNode<'_, '_, 'a> {
    fn class(&self) -> &'a str {
        self.ui.node(self.sid, self.idx).class
    }

    fn id(&self) -> String {
        self.ui.exec_id(self.sid, self.idx)
    }

    fn runs(&self) -> Result<(), &'static str> {
        let scope = &self.ui.scopes[self.sid];
        if let Some(why) = scope.inactive {
            return Err(why);
        }
        match self.ui.node(self.sid, self.idx).mode {
            MODE_MUTED => return Err("muted"),
            MODE_BYPASSED => return Err("bypassed"),
            _ => {}
        }
        let executed = match (scope.kind, scope.parent) {
            (ScopeKind::Group, Some(host)) => self.ui.reached.contains(&host),
            _ => self.ui.reached.contains(&(self.sid, self.idx)),
        };
        if executed {
            Ok(())
        } else {
            Err("not upstream of an output node")
        }
    }

    fn widget(&self, name: Option<&str>, index: Option<usize>) -> WidgetValue<'a> {
        self.ui.widget_value(self.sid, self.idx, name, index, 0)
    }

    fn positional_values(&self) -> Option<&'a [Value]> {
        if let Some(values) = self.ui.scopes[self.sid].group_values.get(&self.idx) {
            return Some(values);
        }
        match self.ui.node(self.sid, self.idx).widgets {
            Widgets::List(values) => Some(values),
            _ => None,
        }
    }

    fn all_values(&self) -> Vec<&'a Value> {
        self.ui.own_values(self.sid, self.idx)
    }

    fn text_values(&self) -> Vec<&'a Value> {
        let ui = self.ui;
        let mut values = ui.own_values(self.sid, self.idx);
        for (slot, input) in ui.node(self.sid, self.idx).inputs.iter().enumerate() {
            if input.link.is_none() {
                continue;
            }
            let step = Step::In {
                sid: self.sid,
                idx: self.idx,
                slot,
                ty: None,
            };
            match ui.resolve(step) {
                Source::HostWidget(v) => values.push(v),
                Source::Primitive(s, i) => values.extend(ui.own_values(s, i)),
                Source::Node(s, i) if !ui.rules.is_text_encoder(ui.node(s, i).class) => {
                    values.extend(ui.own_values(s, i));
                }
                Source::Node(..) | Source::Nothing => {}
            }
        }
        values
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_with(inputs: &[&'static str], outputs: &[&'static str]) -> Node<'static> {
        Node {
            id: "1".into(),
            class: "X",
            mode: MODE_BYPASSED,
            inputs: inputs
                .iter()
                .map(|ty| super::super::graph::Input {
                    name: "in",
                    ty,
                    link: Some("1".into()),
                    widget: None,
                })
                .collect(),
            outputs: Some(outputs.to_vec()),
            widgets: Widgets::None,
            properties: None,
        }
    }

    #[test]
    fn bypass_matches_like_the_frontend() {
        // LTXVAddGuide: (positive, negative, vae, latent, image) → (positive, negative, latent)
        let n = node_with(
            &["CONDITIONING", "CONDITIONING", "VAE", "LATENT", "IMAGE"],
            &["CONDITIONING", "CONDITIONING", "LATENT"],
        );
        assert_eq!(bypass_slot(&n, 0, "CONDITIONING"), Some(0));
        assert_eq!(bypass_slot(&n, 1, "CONDITIONING"), Some(1));
        assert_eq!(bypass_slot(&n, 2, "LATENT"), Some(3));
        assert_eq!(bypass_slot(&n, 2, "*"), Some(2));
        assert_eq!(bypass_slot(&n, 2, "MASK"), None);
        assert_eq!(bypass_slot(&node_with(&[], &["X"]), 0, "*"), None);
        assert_eq!(bypass_slot(&n, -1, "LATENT"), None);
    }

    #[test]
    fn type_matching() {
        assert!(types_match("*", "MODEL"));
        assert!(types_match("model", "MODEL"));
        assert!(types_match("INT,FLOAT", "float"));
        assert!(!types_match("MODEL", "CLIP"));
    }

    #[test]
    fn legacy_proxy_names() {
        assert_eq!(widget_names("ckpt_name"), ["ckpt_name"]);
        assert_eq!(widget_names("5: ckpt_name"), ["5: ckpt_name", "ckpt_name"]);
        assert_eq!(
            widget_names("3: 5: seed"),
            ["3: 5: seed", "5: seed", "seed"]
        );
        assert_eq!(widget_names("a: b"), ["a: b"]);
    }
}
