//! End-to-end tests of the resolver on small hand-made workflows: one per rule family, the
//! subgraph and bypass cases the public corpus lacks, malformed input, and PNG containers.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;

fn resolve(v: &Value) -> Resolution {
    resolve_json(v.to_string().as_bytes()).expect("resolves")
}

/// (category, filename) of every entry with `status`, sorted.
fn files(r: &Resolution, status: ModelStatus) -> Vec<(String, String)> {
    let mut out: Vec<_> = r
        .with_status(status)
        .map(|m| {
            (
                m.category.clone().unwrap_or_default(),
                m.filename.clone().unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    out
}

fn exec(r: &Resolution) -> Vec<(String, String)> {
    files(r, ModelStatus::Exec)
}

fn mentioned(r: &Resolution) -> Vec<(String, String)> {
    files(r, ModelStatus::MentionedOnly)
}

fn pair(category: &str, filename: &str) -> (String, String) {
    (category.to_owned(), filename.to_owned())
}

fn unresolved(r: &Resolution) -> Vec<&ModelRef> {
    r.with_status(ModelStatus::Unresolved).collect()
}

/// An API prompt: node "1" of `class` with `inputs`, saved by node "9".
fn api_loader(class: &str, inputs: Value) -> Value {
    json!({
        "1": {"class_type": class, "inputs": inputs},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
    })
}

/// A UI node with one output of type `ty` unless `outputs` says otherwise.
fn ui_node(id: i64, class: &str, widgets: Value) -> Value {
    json!({"id": id, "type": class, "mode": 0, "inputs": [], "outputs": [{"name": "OUT", "type": "*"}],
           "widgets_values": widgets})
}

/// A UI output node with one `images` input fed by `link`.
fn ui_save(id: i64, link: i64) -> Value {
    json!({"id": id, "type": "SaveImage", "mode": 0,
           "inputs": [{"name": "images", "type": "IMAGE", "link": link}], "outputs": [],
           "widgets_values": ["x"]})
}

fn ui(nodes: Vec<Value>, links: Vec<Value>) -> Value {
    json!({"last_node_id": 100, "last_link_id": 100, "nodes": nodes, "links": links, "version": 0.4})
}

// ---------------------------------------------------------------- loader rule families

#[test]
fn every_positional_loader_rule_reads_its_widget() {
    // For each loader rule with a position: a UI node whose widget at that position names a
    // file, linked to an output. Each file must be executed in the rule's category.
    let rules = RuleSet::builtin();
    for (class, file_rules) in &rules.loaders {
        if file_rules.iter().any(|r| r.index.is_none()) {
            continue;
        }
        let len = file_rules.iter().filter_map(|r| r.index).max().unwrap_or(0) + 2;
        let mut widgets = vec![json!(1); len];
        let mut want = Vec::new();
        for rule in file_rules {
            let ext = match rule.extensions.as_deref() {
                Some([e, ..]) if e == ".gguf" => ".gguf",
                Some(_) => "",
                None => ".safetensors",
            };
            let name = format!(
                "dir/{}_{}{ext}",
                class.replace(['|', ' ', '(', ')'], "_"),
                rule.widget.as_deref().unwrap_or("w")
            );
            widgets[rule.index.unwrap_or(0)] = json!(name);
            want.push(pair(category_key(&rule.category), &name));
        }
        want.sort();
        let mut loader = ui_node(1, class, Value::Array(widgets));
        loader["outputs"] = json!([{"name": "OUT", "type": "*", "links": [1]}]);
        let r = resolve(&ui(
            vec![loader, ui_save(2, 1)],
            vec![json!([1, 1, 0, 2, 0, "*"])],
        ));
        assert_eq!(exec(&r), want, "{class}");
        assert!(r.warnings.is_empty(), "{class}: {:?}", r.warnings);
    }
}

/// A loader class, its API inputs, and the (category, file) pairs it should execute.
type LoaderCase = (&'static str, Value, Vec<(&'static str, &'static str)>);

#[test]
fn core_loaders_by_input_name() {
    let cases: Vec<LoaderCase> = vec![
        (
            "CheckpointLoaderSimple",
            json!({"ckpt_name": "a.safetensors"}),
            vec![("checkpoints", "a.safetensors")],
        ),
        (
            "CheckpointLoader",
            json!({"config_name": "v1.yaml", "ckpt_name": "b.ckpt"}),
            vec![("checkpoints", "b.ckpt"), ("configs", "v1.yaml")],
        ),
        (
            "DiffusersLoader",
            json!({"model_path": "stable-diffusion-2"}),
            vec![("diffusers", "stable-diffusion-2")],
        ),
        (
            "LoraLoader",
            json!({"lora_name": "l.safetensors", "strength_model": 1.0, "model": ["5", 0]}),
            vec![("loras", "l.safetensors")],
        ),
        (
            "CreateHookModelAsLora",
            json!({"ckpt_name": "c.safetensors"}),
            vec![("checkpoints", "c.safetensors")],
        ),
        (
            "UNETLoader",
            json!({"unet_name": "u.safetensors", "weight_dtype": "default"}),
            vec![("diffusion_models", "u.safetensors")],
        ),
        (
            "DualCLIPLoader",
            json!({"clip_name1": "t5.safetensors", "clip_name2": "l.safetensors", "type": "flux"}),
            vec![
                ("text_encoders", "l.safetensors"),
                ("text_encoders", "t5.safetensors"),
            ],
        ),
        (
            "QuadrupleCLIPLoader",
            json!({"clip_name1": "1", "clip_name2": "2", "clip_name3": "3", "clip_name4": "4"}),
            vec![
                ("text_encoders", "1"),
                ("text_encoders", "2"),
                ("text_encoders", "3"),
                ("text_encoders", "4"),
            ],
        ),
        (
            "DiffControlNetLoader",
            json!({"control_net_name": "cn.pth", "model": ["5", 0]}),
            vec![("controlnet", "cn.pth")],
        ),
        (
            "AudioEncoderLoader",
            json!({"audio_encoder_name": "w.safetensors"}),
            vec![("audio_encoders", "w.safetensors")],
        ),
        (
            "TrainLoraNode",
            json!({"existing_lora": "[None]", "steps": 10}),
            vec![],
        ),
        (
            "TrainLoraNode",
            json!({"existing_lora": "old.safetensors", "steps": 10}),
            vec![("loras", "old.safetensors")],
        ),
        (
            "SAMLoader",
            json!({"model_name": "sam_vit_b.pth", "device_mode": "AUTO"}),
            vec![("sams", "sam_vit_b.pth")],
        ),
    ];
    for (class, inputs, want) in cases {
        let r = resolve(&api_loader(class, inputs));
        let want: Vec<_> = want.into_iter().map(|(c, f)| pair(c, f)).collect();
        assert_eq!(exec(&r), want, "{class}");
        assert_eq!(r.format, WorkflowFormat::Api);
    }
}

#[test]
fn vae_loader_special_names() {
    let r = resolve(&api_loader("VAELoader", json!({"vae_name": "taesdxl"})));
    let approx: Vec<_> = r.with_status(ModelStatus::Exec).collect();
    assert_eq!(approx.len(), 2);
    assert!(
        approx
            .iter()
            .all(|m| m.category.as_deref() == Some("vae_approx")
                && m.filename.as_deref() == Some("taesdxl"))
    );
    let paths: Vec<_> = approx.iter().filter_map(|m| m.path.as_deref()).collect();
    assert_eq!(paths, ["taesdxl_decoder", "taesdxl_encoder"]);
    assert_eq!(
        candidate_paths("vae_approx", paths[0])[0],
        "vae_approx/taesdxl_decoder.bin"
    );

    let r = resolve(&api_loader("VAELoader", json!({"vae_name": "pixel_space"})));
    assert!(r.models.is_empty());
    let r = resolve(&api_loader(
        "VAELoader",
        json!({"vae_name": "ae.safetensors"}),
    ));
    assert_eq!(exec(&r), [pair("vae", "ae.safetensors")]);
}

#[test]
fn gguf_loaders_restrict_extensions() {
    let r = resolve(&api_loader(
        "UnetLoaderGGUF",
        json!({"unet_name": "flux-Q4.gguf"}),
    ));
    let m = &r.models[0];
    assert_eq!(m.category.as_deref(), Some("diffusion_models"));
    assert_eq!(m.extensions.as_deref(), Some(&[".gguf".to_owned()][..]));
    assert_eq!(
        candidate_paths("diffusion_models", "flux-Q4.gguf"),
        ["unet/flux-Q4.gguf", "diffusion_models/flux-Q4.gguf"]
    );
    assert!(r.warnings.is_empty());

    let r = resolve(&api_loader(
        "UnetLoaderGGUF",
        json!({"unet_name": "flux.safetensors"}),
    ));
    assert_eq!(exec(&r), [pair("diffusion_models", "flux.safetensors")]);
    assert!(
        r.warnings.iter().any(|w| w.contains(".gguf")),
        "{:?}",
        r.warnings
    );

    let r = resolve(&api_loader(
        "DualCLIPLoaderGGUF",
        json!({"clip_name1": "t5-Q8.gguf", "clip_name2": "clip_l.safetensors"}),
    ));
    assert_eq!(
        exec(&r),
        [
            pair("text_encoders", "clip_l.safetensors"),
            pair("text_encoders", "t5-Q8.gguf")
        ]
    );
}

#[test]
fn ipadapter_loaders() {
    let r = resolve(&api_loader(
        "IPAdapterModelLoader",
        json!({"ipadapter_file": "ip-adapter_sd15.safetensors"}),
    ));
    assert_eq!(exec(&r), [pair("ipadapter", "ip-adapter_sd15.safetensors")]);

    let mut ui_insight = ui_node(
        1,
        "IPAdapterInsightFaceLoader",
        json!(["CPU", "antelopev2"]),
    );
    ui_insight["outputs"] = json!([{"name": "INSIGHTFACE", "type": "INSIGHTFACE", "links": [1]}]);
    let r = resolve(&ui(
        vec![ui_insight, ui_save(2, 1)],
        vec![json!([1, 1, 0, 2, 0, "INSIGHTFACE"])],
    ));
    assert_eq!(exec(&r), [pair("insightface", "antelopev2")]);
    assert_eq!(
        candidate_paths("insightface", "antelopev2"),
        ["insightface/models/antelopev2"]
    );

    for class in [
        "IPAdapterUnifiedLoader",
        "IPAdapterUnifiedLoaderFaceID",
        "IPAdapterUnifiedLoaderCommunity",
    ] {
        let r = resolve(&api_loader(
            class,
            json!({"preset": "PLUS (high strength)", "model": ["5", 0]}),
        ));
        let u = unresolved(&r);
        assert_eq!(u.len(), 1, "{class}");
        let reason = u[0].reason.as_deref().unwrap_or_default();
        assert!(
            reason.contains(class) && reason.contains("\"PLUS (high strength)\""),
            "{reason}"
        );
        assert!(!reason.contains("does not run"), "{reason}");
        assert_eq!(u[0].nodes, ["1"]);
        assert!(exec(&r).is_empty());
    }
}

#[test]
fn wanvideo_loaders() {
    let prompt = json!({
        "1": {"class_type": "WanVideoModelLoader", "inputs": {"model": "wan2.1_t2v_14B_fp8.safetensors",
              "base_precision": "bf16", "lora": ["2", 0]}},
        "2": {"class_type": "WanVideoLoraSelectMulti", "inputs": {"lora_0": "a.safetensors", "strength_0": 1.0,
              "lora_1": "none", "strength_1": 1.0, "lora_2": "none", "strength_2": 1.0,
              "lora_3": "none", "strength_3": 1.0, "lora_4": "none", "strength_4": 1.0}},
        "3": {"class_type": "WanVideoVAELoader", "inputs": {"model_name": "wan_vae.safetensors"}},
        "4": {"class_type": "LoadWanVideoT5TextEncoder", "inputs": {"model_name": "umt5-xxl.safetensors"}},
        "5": {"class_type": "LoadWanVideoClipTextEncoder", "inputs": {"model_name": "clip_vision_h.safetensors"}},
        "6": {"class_type": "WanVideoLoraSelectByName", "inputs": {"lora_name": "detail"}},
        "7": {"class_type": "WanVideoSampler", "inputs": {"model": ["1", 0], "vae": ["3", 0], "t5": ["4", 0],
              "clip": ["5", 0], "extra": ["6", 0]}},
        "8": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["7", 0]}}
    });
    let r = resolve(&prompt);
    assert_eq!(
        exec(&r),
        [
            pair("clip_vision", "clip_vision_h.safetensors"),
            pair("diffusion_models", "wan2.1_t2v_14B_fp8.safetensors"),
            pair("loras", "a.safetensors"),
            pair("text_encoders", "umt5-xxl.safetensors"),
            pair("vae", "wan_vae.safetensors"),
        ]
    );
    let u = unresolved(&r);
    assert_eq!(u.len(), 1);
    assert_eq!(u[0].category.as_deref(), Some("loras"));
    assert!(
        u[0].reason
            .as_deref()
            .unwrap_or_default()
            .contains("\"detail\"")
    );
}

#[test]
fn power_lora_rows() {
    let mut loader = ui_node(
        1,
        "Power Lora Loader (rgthree)",
        json!([
            {}, {"type": "PowerLoraLoaderHeaderWidget"},
            {"on": true, "lora": "sd15/on.safetensors", "strength": 1},
            {"on": false, "lora": "off.safetensors", "strength": 1},
            {}, ""
        ]),
    );
    loader["outputs"] = json!([{"name": "MODEL", "type": "MODEL", "links": [1]}]);
    let r = resolve(&ui(
        vec![loader, ui_save(2, 1)],
        vec![json!([1, 1, 0, 2, 0, "MODEL"])],
    ));
    assert_eq!(exec(&r), [pair("loras", "sd15/on.safetensors")]);
    assert_eq!(mentioned(&r), [pair("loras", "off.safetensors")]);
}

#[test]
fn embeddings_in_prompt_text() {
    let prompt = json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.ckpt"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1],
              "text": "a photo, embedding:style_a, (embedding:neg\\bad:1.2) x\nembedding:last,"}},
        "3": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "embedding:from_string"}},
        "4": {"class_type": "CLIPTextEncodeSDXL", "inputs": {"clip": ["1", 1], "text_g": ["3", 0], "text_l": "x"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "embedding:unused"}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["4", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0]}},
        "8": {"class_type": "Note", "inputs": {"text": "use embedding:documented"}}
    });
    let r = resolve(&prompt);
    assert_eq!(
        exec(&r),
        [
            pair("checkpoints", "m.ckpt"),
            pair("embeddings", "from_string"),
            pair("embeddings", "last"),
            pair("embeddings", "neg\\bad"),
            pair("embeddings", "style_a"),
        ]
    );
    assert_eq!(mentioned(&r), [pair("embeddings", "unused")]);
    let bad = r
        .models
        .iter()
        .find(|m| m.filename.as_deref() == Some("neg\\bad"))
        .expect("entry");
    assert_eq!(bad.path.as_deref(), Some("neg/bad"));
}

// ---------------------------------------------------------------- statuses

/// checkpoint(1) → lora(2) → sampler(3) → save(4); the lora's mode and the save's mode vary.
fn chain(lora_mode: i64, save_mode: i64) -> Value {
    ui(
        vec![
            json!({"id": 1, "type": "CheckpointLoaderSimple", "mode": 0,
                   "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]}], "widgets_values": ["base.safetensors"]}),
            json!({"id": 2, "type": "LoraLoaderModelOnly", "mode": lora_mode,
                   "inputs": [{"name": "model", "type": "MODEL", "link": 1}],
                   "outputs": [{"name": "MODEL", "type": "MODEL", "links": [2]}], "widgets_values": ["style.safetensors", 1.0]}),
            json!({"id": 3, "type": "KSampler", "mode": 0,
                   "inputs": [{"name": "model", "type": "MODEL", "link": 2}],
                   "outputs": [{"name": "LATENT", "type": "LATENT", "links": [3]}], "widgets_values": [1, "fixed", 20]}),
            json!({"id": 4, "type": "SaveImage", "mode": save_mode,
                   "inputs": [{"name": "images", "type": "LATENT", "link": 3}], "outputs": [], "widgets_values": ["x"]}),
        ],
        vec![
            json!([1, 1, 0, 2, 0, "MODEL"]),
            json!([2, 2, 0, 3, 0, "MODEL"]),
            json!([3, 3, 0, 4, 0, "LATENT"]),
        ],
    )
}

#[test]
fn active_chain_executes() {
    let r = resolve(&chain(0, 0));
    assert_eq!(
        exec(&r),
        [
            pair("checkpoints", "base.safetensors"),
            pair("loras", "style.safetensors")
        ]
    );
    assert!(mentioned(&r).is_empty());
    assert_eq!(r.format, WorkflowFormat::Ui);
}

#[test]
fn bypassed_node_passes_its_input_through() {
    let r = resolve(&chain(4, 0));
    assert_eq!(exec(&r), [pair("checkpoints", "base.safetensors")]);
    assert_eq!(mentioned(&r), [pair("loras", "style.safetensors")]);
}

#[test]
fn muted_node_cuts_the_chain() {
    let r = resolve(&chain(2, 0));
    assert!(exec(&r).is_empty());
    assert_eq!(
        mentioned(&r),
        [
            pair("checkpoints", "base.safetensors"),
            pair("loras", "style.safetensors")
        ]
    );
}

#[test]
fn inactive_output_runs_nothing() {
    for mode in [2, 4] {
        let r = resolve(&chain(0, mode));
        assert!(exec(&r).is_empty(), "mode {mode}");
        assert_eq!(mentioned(&r).len(), 2);
    }
}

#[test]
fn reroutes_and_get_set_nodes_pass_links() {
    let g = ui(
        vec![
            json!({"id": 1, "type": "CheckpointLoaderSimple", "outputs": [{"type": "MODEL", "links": [1]}],
                   "widgets_values": ["a.safetensors"]}),
            json!({"id": 2, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 1}],
                   "outputs": [{"type": "MODEL", "links": [2]}]}),
            json!({"id": 3, "type": "SetNode", "inputs": [{"name": "MODEL", "type": "MODEL", "link": 2}],
                   "outputs": [{"type": "*"}], "widgets_values": ["model"]}),
            json!({"id": 4, "type": "GetNode", "outputs": [{"type": "MODEL", "links": [3]}], "widgets_values": ["model"]}),
            json!({"id": 5, "type": "KSampler", "inputs": [{"name": "model", "type": "MODEL", "link": 3}],
                   "outputs": [{"type": "LATENT", "links": [4]}]}),
            ui_save(6, 4),
        ],
        vec![
            json!([1, 1, 0, 2, 0, "*"]),
            json!([2, 2, 0, 3, 0, "MODEL"]),
            json!([3, 4, 0, 5, 0, "MODEL"]),
            json!([4, 5, 0, 6, 0, "LATENT"]),
        ],
    );
    let r = resolve(&g);
    assert_eq!(exec(&r), [pair("checkpoints", "a.safetensors")]);
}

#[test]
fn a_file_can_be_executed_and_mentioned() {
    let mut g = chain(0, 0);
    g["nodes"]
        .as_array_mut()
        .expect("nodes")
        .push(json!({"id": 7, "type": "CheckpointLoaderSimple", "mode": 2,
        "outputs": [{"type": "MODEL"}], "widgets_values": ["base.safetensors"]}));
    let r = resolve(&g);
    assert!(exec(&r).contains(&pair("checkpoints", "base.safetensors")));
    assert_eq!(mentioned(&r), [pair("checkpoints", "base.safetensors")]);
    let e = r
        .with_status(ModelStatus::Exec)
        .find(|m| m.category.as_deref() == Some("checkpoints"))
        .expect("exec");
    assert_eq!(e.nodes, ["1"]);
}

#[test]
fn linked_file_widgets() {
    // A PrimitiveNode's value is the widget's; another node's output is a run-time value.
    let g = ui(
        vec![
            json!({"id": 1, "type": "PrimitiveNode", "outputs": [{"type": "COMBO", "links": [1], "widget": {"name": "ckpt_name"}}],
                   "widgets_values": ["from_primitive.safetensors", "fixed"]}),
            json!({"id": 2, "type": "CheckpointLoaderSimple",
                   "inputs": [{"name": "ckpt_name", "type": "COMBO", "link": 1, "widget": {"name": "ckpt_name"}}],
                   "outputs": [{"type": "MODEL", "links": [2]}], "widgets_values": ["stale.safetensors"]}),
            json!({"id": 3, "type": "Some Model Picker", "outputs": [{"type": "STRING", "links": [3]}], "widgets_values": ["x"]}),
            json!({"id": 4, "type": "LoraLoaderModelOnly",
                   "inputs": [{"name": "model", "type": "MODEL", "link": 2},
                              {"name": "lora_name", "type": "COMBO", "link": 3, "widget": {"name": "lora_name"}}],
                   "outputs": [{"type": "MODEL", "links": [4]}], "widgets_values": ["stale_lora.safetensors", 1]}),
            ui_save(5, 4),
        ],
        vec![
            json!([1, 1, 0, 2, 0, "COMBO"]),
            json!([2, 2, 0, 4, 0, "MODEL"]),
            json!([3, 3, 0, 4, 1, "STRING"]),
            json!([4, 4, 0, 5, 0, "MODEL"]),
        ],
    );
    let r = resolve(&g);
    assert_eq!(
        exec(&r),
        [pair("checkpoints", "from_primitive.safetensors")]
    );
    let u = unresolved(&r);
    assert_eq!(u.len(), 1);
    assert_eq!(u[0].category.as_deref(), Some("loras"));
    assert!(
        u[0].reason
            .as_deref()
            .unwrap_or_default()
            .contains("node 3 (Some Model Picker)")
    );
}

#[test]
fn object_form_widgets_and_windows_paths() {
    let g = ui(
        vec![
            json!({"id": 1, "type": "CheckpointLoaderSimple", "outputs": [{"type": "MODEL", "links": [1]}],
                   "widgets_values": {"ckpt_name": "SD15\\real.safetensors"}}),
            json!({"id": 2, "type": "CheckpointLoaderSimple", "outputs": [{"type": "MODEL", "links": [2]}],
                   "widgets_values": ["SD15/real.safetensors"]}),
            json!({"id": 3, "type": "Merge", "inputs": [{"name": "a", "type": "MODEL", "link": 1},
                   {"name": "b", "type": "MODEL", "link": 2}], "outputs": [{"type": "MODEL", "links": [3]}]}),
            ui_save(4, 3),
        ],
        vec![
            json!([1, 1, 0, 3, 0, "MODEL"]),
            json!([2, 2, 0, 3, 1, "MODEL"]),
            json!([3, 3, 0, 4, 0, "MODEL"]),
        ],
    );
    let r = resolve(&g);
    let e: Vec<_> = r.with_status(ModelStatus::Exec).collect();
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].path.as_deref(), Some("SD15/real.safetensors"));
    assert_eq!(e[0].nodes, ["1", "2"]);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[test]
fn case_variants_stay_apart() {
    let prompt = json!({
        "1": {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "Detail.safetensors", "model": ["2", 0]}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "detail.safetensors"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}
    });
    let r = resolve(&prompt);
    assert_eq!(exec(&r).len(), 2);
    assert!(r.warnings.iter().any(|w| w.contains("letter case")));
}

#[test]
fn custom_output_nodes() {
    // By name pattern, and by having no output slots at all.
    let mut loader = ui_node(1, "CheckpointLoaderSimple", json!(["a.ckpt"]));
    loader["outputs"] = json!([{"type": "MODEL", "links": [1, 2]}]);
    let sink = json!({"id": 2, "type": "Image Saver Deluxe", "inputs": [{"name": "m", "type": "MODEL", "link": 1}],
                      "outputs": [{"type": "MODEL"}]});
    let r = resolve(&ui(
        vec![loader.clone(), sink],
        vec![json!([1, 1, 0, 2, 0, "MODEL"])],
    ));
    assert_eq!(exec(&r), [pair("checkpoints", "a.ckpt")]);
    let sink = json!({"id": 3, "type": "Mystery Sink", "inputs": [{"name": "m", "type": "MODEL", "link": 2}], "outputs": []});
    let r = resolve(&ui(
        vec![loader, sink],
        vec![json!([2, 1, 0, 3, 0, "MODEL"])],
    ));
    assert_eq!(exec(&r), [pair("checkpoints", "a.ckpt")]);
    assert!(r.warnings.iter().any(|w| w.contains("Mystery Sink")));
}

#[test]
fn custom_rules_extend_the_table() {
    let mut rules = RuleSet::builtin().clone();
    rules.extend(
        RuleSet::from_json(
            r#"{"loaders": {"MyLoader": [{"widget": "file", "index": 1, "category": "unet"}]},
                               "outputs": ["MySink"]}"#,
        )
        .expect("rules"),
    );
    let prompt = json!({
        "1": {"class_type": "MyLoader", "inputs": {"file": "x.safetensors"}},
        "2": {"class_type": "MySink", "inputs": {"m": ["1", 0]}}
    });
    let r = Resolver::new(&rules)
        .resolve_json(prompt.to_string().as_bytes())
        .expect("resolves");
    assert_eq!(exec(&r), [pair("diffusion_models", "x.safetensors")]);
    // The built-in resolver knows neither class.
    assert!(resolve(&prompt).models.is_empty());
}

// ---------------------------------------------------------------- subgraphs

/// A subgraph definition holding a checkpoint loader whose `ckpt_name` is promoted through
/// subgraph input 0 and whose MODEL goes to subgraph output 0.
fn promoting_def(id: &str, inner_value: &str) -> Value {
    json!({
        "id": id, "name": "Loader", "version": 1,
        "inputs": [{"id": "i0", "name": "ckpt_name", "type": "COMBO", "linkIds": [1]}],
        "outputs": [{"id": "o0", "name": "MODEL", "type": "MODEL", "linkIds": [2]}],
        "nodes": [{"id": 1, "type": "CheckpointLoaderSimple", "mode": 0,
                   "inputs": [{"name": "ckpt_name", "type": "COMBO", "link": 1, "widget": {"name": "ckpt_name"}}],
                   "outputs": [{"name": "MODEL", "type": "MODEL", "links": [2]}],
                   "widgets_values": [inner_value]}],
        "links": [
            {"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 1, "target_slot": 0, "type": "COMBO"},
            {"id": 2, "origin_id": 1, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "MODEL"}
        ]
    })
}

fn instance(id: i64, def: &str, mode: i64, value: Option<&str>, out_link: i64) -> Value {
    let mut node = json!({"id": id, "type": def, "mode": mode,
        "inputs": [{"name": "ckpt_name", "type": "COMBO", "link": null, "widget": {"name": "ckpt_name"}}],
        "outputs": [{"name": "MODEL", "type": "MODEL", "links": [out_link]}]});
    if let Some(value) = value {
        node["widgets_values"] = json!([value]);
    }
    node
}

fn sink(id: i64, inputs: &[i64]) -> Value {
    let inputs: Vec<Value> = inputs
        .iter()
        .map(|l| json!({"name": "model", "type": "MODEL", "link": l}))
        .collect();
    json!({"id": id, "type": "SaveModelThing", "inputs": inputs, "outputs": []})
}

#[test]
fn promoted_widgets_take_the_instance_value() {
    let g = json!({
        "nodes": [instance(5, "def-a", 0, Some("first.safetensors"), 1),
                  instance(6, "def-a", 0, Some("second.safetensors"), 2),
                  instance(7, "def-a", 0, None, 3),
                  sink(9, &[1, 2, 3])],
        "links": [[1, 5, 0, 9, 0, "MODEL"], [2, 6, 0, 9, 1, "MODEL"], [3, 7, 0, 9, 2, "MODEL"]],
        "definitions": {"subgraphs": [promoting_def("def-a", "inner.safetensors")]}
    });
    let r = resolve(&g);
    assert_eq!(
        exec(&r),
        [
            pair("checkpoints", "first.safetensors"),
            pair("checkpoints", "inner.safetensors"),
            pair("checkpoints", "second.safetensors")
        ]
    );
    let first = r
        .models
        .iter()
        .find(|m| m.filename.as_deref() == Some("first.safetensors"))
        .expect("first");
    assert_eq!(first.nodes, ["5:1"]);
    let inner = r
        .models
        .iter()
        .find(|m| m.filename.as_deref() == Some("inner.safetensors"))
        .expect("inner");
    assert_eq!(inner.nodes, ["7:1"]);
}

#[test]
fn nested_subgraphs_pass_promoted_values_down() {
    // outer (def-outer) holds an instance of def-a and promotes its ckpt_name again.
    let outer = json!({
        "id": "def-outer", "name": "Outer",
        "inputs": [{"name": "ckpt_name", "type": "COMBO", "linkIds": [11]}],
        "outputs": [{"name": "MODEL", "type": "MODEL", "linkIds": [12]}],
        "nodes": [{"id": 3, "type": "def-a", "mode": 0,
                   "inputs": [{"name": "ckpt_name", "type": "COMBO", "link": 11, "widget": {"name": "ckpt_name"}}],
                   "outputs": [{"name": "MODEL", "type": "MODEL", "links": [12]}],
                   "widgets_values": ["middle.safetensors"]}],
        "links": [
            {"id": 11, "origin_id": -10, "origin_slot": 0, "target_id": 3, "target_slot": 0, "type": "COMBO"},
            {"id": 12, "origin_id": 3, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "MODEL"}
        ],
        "definitions": {"subgraphs": [promoting_def("def-a", "inner.safetensors")]}
    });
    let mut top = instance(8, "def-outer", 0, Some("top.safetensors"), 1);
    top["type"] = json!("def-outer");
    let g = json!({
        "nodes": [top, sink(9, &[1])],
        "links": [[1, 8, 0, 9, 0, "MODEL"]],
        "definitions": {"subgraphs": [outer]}
    });
    let r = resolve(&g);
    assert_eq!(exec(&r), [pair("checkpoints", "top.safetensors")]);
    assert_eq!(r.models[0].nodes, ["8:3:1"]);
}

#[test]
fn proxy_widgets_give_per_instance_values() {
    let def = json!({
        "id": "def-p", "name": "P", "inputs": [],
        "outputs": [{"name": "MODEL", "type": "MODEL", "linkIds": [2]}],
        "nodes": [{"id": 4, "type": "UNETLoader", "outputs": [{"name": "MODEL", "type": "MODEL", "links": [2]}],
                   "widgets_values": ["shared.safetensors", "default"]}],
        "links": [{"id": 2, "origin_id": 4, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "MODEL"}]
    });
    let host = |id: i64, proxies: Value, values: Value, link: i64| {
        json!({"id": id, "type": "def-p", "mode": 0, "inputs": [],
               "outputs": [{"name": "MODEL", "type": "MODEL", "links": [link]}],
               "properties": {"proxyWidgets": proxies}, "widgets_values": values})
    };
    let g = json!({
        "nodes": [
            host(1, json!([["4", "unet_name"]]), json!(["one.safetensors"]), 1),
            host(2, json!("[[\"4\", \"4: unet_name\"]]"), json!(["two.safetensors"]), 2),
            host(3, json!([["4", "unet_name"]]), json!([null]), 3),
            sink(9, &[1, 2, 3])
        ],
        "links": [[1, 1, 0, 9, 0, "MODEL"], [2, 2, 0, 9, 1, "MODEL"], [3, 3, 0, 9, 2, "MODEL"]],
        "definitions": {"subgraphs": [def]}
    });
    let r = resolve(&g);
    assert_eq!(
        exec(&r),
        [
            pair("diffusion_models", "one.safetensors"),
            pair("diffusion_models", "shared.safetensors"),
            pair("diffusion_models", "two.safetensors")
        ]
    );
}

#[test]
fn inactive_subgraph_instances() {
    // Bypassed instance: its inner loader does not run and its MODEL input passes through.
    let def = json!({
        "id": "def-l", "name": "Lora",
        "inputs": [{"name": "model", "type": "MODEL", "linkIds": [1]}],
        "outputs": [{"name": "MODEL", "type": "MODEL", "linkIds": [2]}],
        "nodes": [{"id": 1, "type": "LoraLoaderModelOnly", "inputs": [{"name": "model", "type": "MODEL", "link": 1}],
                   "outputs": [{"name": "MODEL", "type": "MODEL", "links": [2]}], "widgets_values": ["in_sub.safetensors", 1]}],
        "links": [
            {"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 1, "target_slot": 0, "type": "MODEL"},
            {"id": 2, "origin_id": 1, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "MODEL"}
        ]
    });
    let graph = |mode: i64| {
        json!({
            "nodes": [
                {"id": 1, "type": "CheckpointLoaderSimple", "outputs": [{"type": "MODEL", "links": [1]}], "widgets_values": ["ck.safetensors"]},
                {"id": 2, "type": "def-l", "mode": mode, "inputs": [{"name": "model", "type": "MODEL", "link": 1}],
                 "outputs": [{"name": "MODEL", "type": "MODEL", "links": [2]}]},
                sink(3, &[2])
            ],
            "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"]],
            "definitions": {"subgraphs": [def]}
        })
    };
    let r = resolve(&graph(0));
    assert_eq!(
        exec(&r),
        [
            pair("checkpoints", "ck.safetensors"),
            pair("loras", "in_sub.safetensors")
        ]
    );
    let r = resolve(&graph(4));
    assert_eq!(exec(&r), [pair("checkpoints", "ck.safetensors")]);
    assert_eq!(mentioned(&r), [pair("loras", "in_sub.safetensors")]);
    let r = resolve(&graph(2));
    assert!(exec(&r).is_empty());
    assert_eq!(mentioned(&r).len(), 2);
}

#[test]
fn output_node_inside_a_subgraph() {
    let def = json!({
        "id": "def-s", "name": "Render", "inputs": [], "outputs": [],
        "nodes": [
            {"id": 1, "type": "CheckpointLoaderSimple", "outputs": [{"type": "MODEL", "links": [1]}], "widgets_values": ["x.ckpt"]},
            {"id": 2, "type": "PreviewImage", "inputs": [{"name": "images", "type": "IMAGE", "link": 1}], "outputs": []}
        ],
        "links": [{"id": 1, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "IMAGE"}],
        "models": [{"name": "x.ckpt", "url": "https://example.invalid/x.ckpt", "directory": "checkpoints"}]
    });
    let g = json!({
        "nodes": [{"id": 4, "type": "def-s", "mode": 0, "inputs": [], "outputs": []}],
        "links": [],
        "definitions": {"subgraphs": [def]}
    });
    let r = resolve(&g);
    assert_eq!(exec(&r), [pair("checkpoints", "x.ckpt")]);
    assert_eq!(r.models[0].nodes, ["4:1"]);
    let d: Vec<_> = r.with_status(ModelStatus::Declared).collect();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].nodes, ["4"]);
}

#[test]
fn recursive_and_deep_subgraphs_are_bounded() {
    let def = json!({
        "id": "loop", "name": "Loop", "inputs": [], "outputs": [],
        "nodes": [{"id": 1, "type": "loop", "outputs": []},
                  {"id": 2, "type": "CheckpointLoaderSimple", "outputs": [{"type": "MODEL"}], "widgets_values": ["r.ckpt"]}],
        "links": []
    });
    let g = json!({"nodes": [{"id": 1, "type": "loop", "outputs": []}], "links": [],
                   "definitions": {"subgraphs": [def]}});
    let r = resolve(&g);
    assert!(
        r.warnings.iter().any(|w| w.contains("contains itself")),
        "{:?}",
        r.warnings
    );
    assert_eq!(mentioned(&r), [pair("checkpoints", "r.ckpt")]);

    // Fan-out: each level holds 20 instances of the next; the node budget stops the expansion.
    let mut defs = Vec::new();
    for level in 0..8 {
        let nodes: Vec<Value> = (0..20)
            .map(|i| json!({"id": i, "type": format!("lvl{}", level + 1), "outputs": []}))
            .collect();
        defs.push(json!({"id": format!("lvl{level}"), "name": "L", "nodes": nodes, "links": []}));
    }
    defs.push(
        json!({"id": "lvl8", "name": "leaf", "nodes": [{"id": 1, "type": "CheckpointLoaderSimple",
        "outputs": [{"type": "MODEL"}], "widgets_values": ["leaf.ckpt"]}], "links": []}),
    );
    let g = json!({"nodes": [{"id": 1, "type": "lvl0", "outputs": []}], "links": [], "definitions": {"subgraphs": defs}});
    let start = Instant::now();
    let r = resolve(&g);
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("nodes after expanding")),
        "{:?}",
        r.warnings
    );
}

#[test]
fn declared_models_everywhere() {
    let def = json!({
        "id": "unused-def", "name": "Unused", "inputs": [], "outputs": [], "links": [],
        "nodes": [{"id": 1, "type": "VAELoader", "widgets_values": ["v.safetensors"],
                   "properties": {"models": [{"name": "v.safetensors", "url": "https://h/v", "directory": "vae"}]}}]
    });
    let g = json!({
        "nodes": [{"id": 3, "type": "UNETLoader", "mode": 4, "widgets_values": ["u.safetensors"],
                   "properties": {"models": [{"name": "u.safetensors", "url": "https://h/u", "directory": "unet"},
                                             {"url": "https://h/nameless"}]}}],
        "links": [],
        "models": [{"name": "u.safetensors", "url": "https://h/u2", "directory": "diffusion_models"},
                   {"name": "t.safetensors", "url": "https://h/t", "directory": "clip"}],
        "definitions": {"subgraphs": [def]}
    });
    let r = resolve(&g);
    let mut d: Vec<_> = r
        .with_status(ModelStatus::Declared)
        .map(|m| {
            (
                m.category.clone().unwrap_or_default(),
                m.directory.clone().unwrap_or_default(),
                m.filename.clone().unwrap_or_default(),
                m.nodes.clone(),
            )
        })
        .collect();
    d.sort();
    assert_eq!(
        d,
        [
            // The top-level entry came first: its directory is kept, the node's id is merged.
            (
                "diffusion_models".into(),
                "diffusion_models".into(),
                "u.safetensors".into(),
                vec!["3".to_owned()]
            ),
            (
                "text_encoders".into(),
                "clip".into(),
                "t.safetensors".into(),
                vec![]
            ),
            ("vae".into(), "vae".into(), "v.safetensors".into(), vec![]),
        ]
    );
    assert!(
        r.warnings.iter().any(|w| w.contains("different urls")),
        "{:?}",
        r.warnings
    );
    assert!(
        r.warnings.iter().any(|w| w.contains("no name")),
        "{:?}",
        r.warnings
    );
    // A definition no node instantiates is a library entry, not part of the graph: its models
    // list is declared, its loaders are not mentioned.
    assert_eq!(mentioned(&r), [pair("diffusion_models", "u.safetensors")]);
}

#[test]
fn legacy_group_nodes() {
    let group = json!({
        "nodes": [
            {"type": "CheckpointLoaderSimple", "index": 0, "outputs": [{"type": "MODEL", "links": []}], "widgets_values": ["def.ckpt"]},
            {"type": "LoraLoaderModelOnly", "index": 1, "inputs": [{"name": "model", "type": "MODEL", "link": null}],
             "outputs": [{"type": "MODEL"}], "widgets_values": ["def_lora.safetensors", 1]}
        ],
        "links": [[0, 0, 1, 0, 1, "MODEL"]],
        "external": [[1, 0, "MODEL"]]
    });
    let graph = |values: Value| {
        json!({
            "nodes": [{"id": 7, "type": "workflow>Loaders", "outputs": [{"type": "MODEL", "links": [1]}], "widgets_values": values},
                      sink(8, &[1])],
            "links": [[1, 7, 0, 8, 0, "MODEL"]],
            "extra": {"groupNodes": {"Loaders": group}}
        })
    };
    let r = resolve(&graph(json!(["host.ckpt", "host_lora.safetensors", 0.5])));
    assert_eq!(
        exec(&r),
        [
            pair("checkpoints", "host.ckpt"),
            pair("loras", "host_lora.safetensors")
        ]
    );
    let ck = r
        .models
        .iter()
        .find(|m| m.filename.as_deref() == Some("host.ckpt"))
        .expect("ck");
    assert_eq!(ck.nodes, ["7:0"]);
    let r = resolve(&graph(json!(["host.ckpt"])));
    assert_eq!(
        exec(&r),
        [
            pair("checkpoints", "def.ckpt"),
            pair("loras", "def_lora.safetensors")
        ]
    );
    assert!(r.warnings.iter().any(|w| w.contains("do not line up")));
}

// ---------------------------------------------------------------- malformed input

#[test]
fn link_cycles_terminate() {
    // 2 and 3 feed each other; a reroute feeds itself; the output hangs off the cycle.
    let g = ui(
        vec![
            json!({"id": 1, "type": "CheckpointLoaderSimple", "outputs": [{"type": "MODEL", "links": [1]}], "widgets_values": ["c.ckpt"]}),
            json!({"id": 2, "type": "ModelMerge", "inputs": [{"name": "a", "type": "MODEL", "link": 1}, {"name": "b", "type": "MODEL", "link": 3}],
                   "outputs": [{"type": "MODEL", "links": [2, 4]}]}),
            json!({"id": 3, "type": "ModelMerge", "mode": 4, "inputs": [{"name": "a", "type": "MODEL", "link": 2}],
                   "outputs": [{"type": "MODEL", "links": [3]}]}),
            json!({"id": 4, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 5}], "outputs": [{"type": "*", "links": [5, 6]}]}),
            json!({"id": 5, "type": "SaveImage", "inputs": [{"name": "a", "type": "MODEL", "link": 4}, {"name": "b", "type": "*", "link": 6}], "outputs": []}),
        ],
        vec![
            json!([1, 1, 0, 2, 0, "MODEL"]),
            json!([2, 2, 0, 3, 0, "MODEL"]),
            json!([3, 3, 0, 2, 1, "MODEL"]),
            json!([4, 2, 0, 5, 0, "MODEL"]),
            json!([5, 4, 0, 4, 0, "*"]),
            json!([6, 4, 0, 5, 1, "*"]),
        ],
    );
    let r = resolve(&g);
    assert_eq!(exec(&r), [pair("checkpoints", "c.ckpt")]);
    assert!(
        r.warnings.iter().any(|w| w.contains("loop")),
        "{:?}",
        r.warnings
    );

    let api = json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "c.ckpt", "x": ["2", 0]}},
        "2": {"class_type": "Thing", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}}
    });
    assert_eq!(exec(&resolve(&api)), [pair("checkpoints", "c.ckpt")]);
}

#[test]
fn long_reroute_chains_are_cut_not_overflowed() {
    let n = 30_000;
    let mut nodes = vec![
        json!({"id": 0, "type": "CheckpointLoaderSimple", "outputs": [{"type": "MODEL"}], "widgets_values": ["far.ckpt"]}),
    ];
    let mut links = Vec::new();
    for i in 1..=n {
        nodes.push(json!({"id": i, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": i}], "outputs": [{"type": "*"}]}));
        links.push(json!([i, i - 1, 0, i, 0, "*"]));
    }
    nodes.push(json!({"id": n + 1, "type": "SaveImage", "inputs": [{"name": "x", "type": "*", "link": n + 1}], "outputs": []}));
    links.push(json!([n + 1, n, 0, n + 1, 0, "*"]));
    let r = resolve(&ui(nodes, links));
    assert_eq!(mentioned(&r), [pair("checkpoints", "far.ckpt")]);
    assert!(r.warnings.iter().any(|w| w.contains("longer than")));
}

#[test]
fn truncated_and_non_json_input_is_an_error() {
    let text = chain(0, 0).to_string();
    for cut in [1, text.len() / 3, text.len() / 2, text.len() - 1] {
        assert!(
            matches!(
                resolve_json(&text.as_bytes()[..cut]),
                Err(WorkflowError::Json(_))
            ),
            "cut at {cut}"
        );
    }
    assert!(matches!(resolve_json(b""), Err(WorkflowError::Json(_))));
    assert!(matches!(
        resolve_json(&[0xff, 0xfe, 0x00]),
        Err(WorkflowError::Json(_))
    ));
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(matches!(
        resolve_json(deep.as_bytes()),
        Err(WorkflowError::Json(_))
    ));
}

#[test]
fn wrong_shapes_are_errors_or_warnings() {
    for v in [
        json!([1, 2]),
        json!(3),
        json!(null),
        json!({}),
        json!({"nodes": {}}),
        json!({"foo": {"bar": 1}}),
        json!({"workflow": null}),
        json!({"workflow": 5}),
    ] {
        assert!(
            matches!(
                resolve_json(v.to_string().as_bytes()),
                Err(WorkflowError::NotAWorkflow(_))
            ),
            "{v}"
        );
    }
    assert!(matches!(
        resolve_json(br#"{"workflow": "{not json"}"#),
        Err(WorkflowError::Json(_))
    ));
    // Garbage inside an otherwise valid graph: warnings, no panic.
    let g = json!({
        "nodes": [null, 1, "x", {"id": {}, "type": "A"}, {"id": 1, "type": 5},
                  {"id": 2, "type": "CheckpointLoaderSimple", "mode": "x", "widgets_values": [7], "inputs": [5, null, {"link": [1]}],
                   "outputs": [{"type": 3}], "properties": {"models": "x", "proxyWidgets": 3}},
                  {"id": 3, "type": "VAELoader", "widgets_values": [null], "properties": {"models": [5, {"name": 3}]}},
                  {"id": 4, "type": "CLIPLoader"},
                  {"id": 5, "type": "SaveImage", "inputs": [{"name": "i", "link": 99}, {"name": "j", "link": "7"}], "outputs": []}],
        "links": [null, [7, 42, 0, 5, 1, "X"], {"id": 8}],
        "definitions": {"subgraphs": [null, {"id": 4}, {"name": "no id", "nodes": []}]},
        "extra": {"groupNodes": {"g": 5}},
        "models": [1, {"name": ""}]
    });
    let r = resolve(&g);
    assert!(exec(&r).is_empty());
    let u = unresolved(&r);
    assert_eq!(u.len(), 3, "{u:?}");
    assert!(!r.warnings.is_empty());
    let api = json!({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ["9", 0]}},
                     "2": {"class_type": 5}, "3": [], "4": {"class_type": "SaveImage", "inputs": [1, 2]},
                     "5": {"class_type": "SaveImage", "inputs": {"images": ["1", "x"], "more": [["1", 0]]}}});
    let r = resolve(&api);
    assert_eq!(unresolved(&r).len(), 1);
}

#[test]
fn huge_bodies_fail_fast() {
    // 50 MB of junk: rejected at the first byte.
    let junk: Vec<u8> = b"\x17\xff\x00junk"
        .iter()
        .copied()
        .cycle()
        .take(50_000_000)
        .collect();
    let start = Instant::now();
    assert!(resolve_json(&junk).is_err());
    assert!(resolve_png(&junk).is_err());
    // 50 MB that starts like a workflow and is cut off.
    let mut almost = b"{\"nodes\": [{\"id\": 1, \"type\": \"".to_vec();
    almost.resize(50_000_000, b'a');
    assert!(matches!(resolve_json(&almost), Err(WorkflowError::Json(_))));
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    // Over the limit: refused before parsing.
    let big = vec![b' '; MAX_WORKFLOW_BYTES + 1];
    assert!(matches!(
        resolve_json(&big),
        Err(WorkflowError::TooLarge { .. })
    ));
}

// ---------------------------------------------------------------- wrappers and containers

#[test]
fn wrappers_are_unpacked() {
    let g = chain(0, 0);
    let api = api_loader("CheckpointLoaderSimple", json!({"ckpt_name": "api.ckpt"}));
    for wrapped in [
        json!({"workflow": g}),
        json!({"workflow": g.to_string()}),
        json!(g.to_string()),
    ] {
        let r = resolve(&wrapped);
        assert_eq!(r.format, WorkflowFormat::Ui);
        assert_eq!(exec(&r).len(), 2);
    }
    let r = resolve(&json!({"prompt": api}));
    assert_eq!(r.format, WorkflowFormat::Api);
    assert_eq!(exec(&r), [pair("checkpoints", "api.ckpt")]);
    // A /prompt request body: the UI graph decides, the prompt is checked against it.
    let body =
        json!({"client_id": "x", "prompt": api, "extra_data": {"extra_pnginfo": {"workflow": g}}});
    let r = resolve(&body);
    assert_eq!(r.format, WorkflowFormat::Ui);
    assert_eq!(
        exec(&r),
        [
            pair("checkpoints", "base.safetensors"),
            pair("loras", "style.safetensors")
        ]
    );
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("checkpoints/api.ckpt")),
        "{:?}",
        r.warnings
    );
    // An unusable UI part falls back to the prompt.
    let r = resolve(&json!({"workflow": {"nodes": 5, "links": []}, "prompt": api}));
    assert_eq!(r.format, WorkflowFormat::Api);
}

#[test]
fn serialized_shape() {
    let r = resolve(&api_loader(
        "IPAdapterUnifiedLoader",
        json!({"preset": "STANDARD"}),
    ));
    let v = serde_json::to_value(&r).expect("serializes");
    let m = &v["models"][0];
    assert_eq!(m["status"], "unresolved");
    assert!(m.get("category").is_some_and(Value::is_null));
    assert!(m.get("filename").is_some_and(Value::is_null));
    assert!(m.get("path").is_some_and(Value::is_null));
    assert!(m.get("url").is_none());
    assert_eq!(v["format"], "api");
    let r = resolve(&chain(2, 0));
    let v = serde_json::to_value(&r).expect("serializes");
    assert_eq!(v["models"][0]["status"], "mentioned_only");
}

fn png_with(
    text: impl FnOnce(&mut png::Encoder<'_, &mut Vec<u8>>),
    after: Option<png::text_metadata::ITXtChunk>,
) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, 2, 2);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        text(&mut encoder);
        let mut writer = encoder.write_header().expect("header");
        writer.write_image_data(&[0u8; 12]).expect("pixels");
        if let Some(chunk) = after {
            writer.write_text_chunk(&chunk).expect("text after IDAT");
        }
        writer.finish().expect("finish");
    }
    out
}

#[test]
fn png_text_chunks() {
    let ui_text = chain(0, 0).to_string();
    let api_text = api_loader(
        "CheckpointLoaderSimple",
        json!({"ckpt_name": "base.safetensors"}),
    )
    .to_string();

    // tEXt, as ComfyUI writes it: both chunks, the UI graph decides.
    let bytes = png_with(
        |e| {
            e.add_text_chunk("prompt".into(), api_text.clone())
                .expect("text");
            e.add_text_chunk("workflow".into(), ui_text.clone())
                .expect("text");
        },
        None,
    );
    let r = resolve_png(&bytes).expect("resolves");
    assert_eq!(r.format, WorkflowFormat::Ui);
    assert_eq!(exec(&r).len(), 2);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);

    // iTXt (non-Latin-1 text), compressed zTXt, and a chunk after the image data.
    let unicode = api_loader(
        "CheckpointLoaderSimple",
        json!({"ckpt_name": "モデル.safetensors"}),
    )
    .to_string();
    let bytes = png_with(
        |e| {
            e.add_itxt_chunk("prompt".into(), unicode.clone())
                .expect("itxt")
        },
        None,
    );
    assert_eq!(
        exec(&resolve_png(&bytes).expect("itxt")),
        [pair("checkpoints", "モデル.safetensors")]
    );
    let bytes = png_with(
        |e| {
            e.add_ztxt_chunk("workflow".into(), ui_text.clone())
                .expect("ztxt")
        },
        None,
    );
    assert_eq!(exec(&resolve_png(&bytes).expect("ztxt")).len(), 2);
    let mut late = png::text_metadata::ITXtChunk::new("prompt", unicode.clone());
    late.compressed = true;
    late.compress_text().expect("compress");
    let bytes = png_with(|_| {}, Some(late));
    assert_eq!(
        exec(&resolve_png(&bytes).expect("late")),
        [pair("checkpoints", "モデル.safetensors")]
    );

    // No workflow, a broken workflow, a broken PNG.
    let bytes = png_with(
        |e| {
            e.add_text_chunk("parameters".into(), "a1111 text".into())
                .expect("text")
        },
        None,
    );
    assert!(matches!(
        resolve_png(&bytes),
        Err(WorkflowError::NoWorkflowInPng)
    ));
    let bytes = png_with(
        |e| {
            e.add_text_chunk("workflow".into(), "{broken".into())
                .expect("text")
        },
        None,
    );
    assert!(matches!(
        resolve_png(&bytes),
        Err(WorkflowError::NotAWorkflow(_))
    ));
    let good = png_with(
        |e| {
            e.add_text_chunk("workflow".into(), ui_text.clone())
                .expect("text")
        },
        None,
    );
    assert!(matches!(
        resolve_png(&good[..20]),
        Err(WorkflowError::Png(_))
    ));
    assert!(matches!(
        resolve_png(b"not a png"),
        Err(WorkflowError::Png(_))
    ));

    // resolve_file goes by content, not by name.
    let dir = tempfile::tempdir().expect("tempdir");
    let png_named_json = dir.path().join("workflow.json");
    std::fs::write(&png_named_json, &good).expect("write");
    assert_eq!(exec(&resolve_file(&png_named_json).expect("png")).len(), 2);
    let json_named_png = dir.path().join("image.png");
    std::fs::write(&json_named_png, &api_text).expect("write");
    assert_eq!(
        resolve_file(&json_named_png).expect("json").format,
        WorkflowFormat::Api
    );
    assert!(matches!(
        resolve_file(&dir.path().join("missing")),
        Err(WorkflowError::Io { .. })
    ));
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").expect("write");
    assert!(matches!(resolve_file(&empty), Err(WorkflowError::Json(_))));
}
