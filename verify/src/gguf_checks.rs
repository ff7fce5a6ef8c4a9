//! What breaks a Qwen3-VL GGUF silently, checked by name against the oracle's own
//! configuration (the HF checkpoint given with `--src`): the M-RoPE sections, the rope
//! base, the RMSNorm and LayerNorm epsilons, the DeepStack layers, the image
//! normalization, the shapes, and the tokenizer's vocabulary and special ids. Each
//! fault fails its own gate, so a report says which one a converter got wrong.

use crate::error::Result;
use crate::gates::GateResult;
use q3vl_gguf::{GgufFile, GgufModel};
use q3vl_model::prompt::PromptBuilder;
use q3vl_model::{PreprocessorConfig, Qwen3VlConfig};
use std::path::Path;

/// The LayerNorm epsilon of Qwen3-VL's vision tower (HF's `nn.LayerNorm(eps=1e-6)`).
const VISION_LN_EPS: f32 = 1e-6;

/// One gate comparing what the GGUF says with what the oracle says.
fn same(name: &str, gguf: String, oracle: String, what: &str) -> GateResult {
    let ok = gguf == oracle;
    let detail = match ok {
        true => format!("{what} as the checkpoint has it"),
        false => format!("{what}: the GGUF says {gguf}, the checkpoint {oracle}"),
    };
    GateResult::new(name, ok, gguf, format!("= {oracle}"), detail)
}

fn meta(f: &GgufFile, key: &str) -> String {
    f.get(key)
        .map(q3vl_gguf::config::show)
        .unwrap_or_else(|| "missing".into())
}

/// The metadata gates of `model` against the checkpoint in `src`.
pub fn metadata_gates(model: &GgufModel, src: &Path) -> Result<Vec<GateResult>> {
    let cfg = Qwen3VlConfig::from_dir(src)?;
    let pre = PreprocessorConfig::from_dir(src)?;
    let text = &model.text;
    let t = &cfg.text;
    let [s0, s1, s2] = t.mrope_section;
    let mut gates = vec![
        same(
            "gguf.rope_sections",
            meta(text, "qwen3vl.rope.dimension_sections"),
            format!("[{s0}, {s1}, {s2}, 0]"),
            "M-RoPE sections (t, h, w, padding)",
        ),
        same(
            "gguf.rope_base",
            meta(text, "qwen3vl.rope.freq_base"),
            format!("{}", t.rope_theta as f32),
            "rope base",
        ),
        rope_dims(model, t.head_dim),
        same(
            "gguf.rms_eps",
            meta(text, "qwen3vl.attention.layer_norm_rms_epsilon"),
            format!("{}", t.rms_norm_eps as f32),
            "RMSNorm epsilon",
        ),
        same(
            "gguf.shapes",
            shapes(
                &model.cfg,
                model
                    .mmproj
                    .as_ref()
                    .map(|m| meta(m, "clip.vision.image_size")),
            ),
            shapes(&cfg, model.mmproj.as_ref().map(|_| image_size(&cfg))),
            "layer counts and widths",
        ),
        head(model, &cfg),
        deepstack(model, &cfg),
    ];
    gates.extend(vision(model, &pre));
    gates.push(tokenizer(model, &cfg, src)?);
    Ok(gates)
}

/// The image side the position table covers, as llama.cpp's converter writes it.
fn image_size(c: &Qwen3VlConfig) -> String {
    let v = &c.vision;
    (((v.num_position_embeddings as f64).sqrt() as usize) * v.patch_size).to_string()
}

/// The dimensions a converter could get wrong, as one line (`image`: the projector's
/// `image_size`, when there is one).
fn shapes(c: &Qwen3VlConfig, image: Option<String>) -> String {
    let t = &c.text;
    let mut s = format!(
        "text {}×{} heads {}/{}×{} ffn {} vocab {}",
        t.num_hidden_layers,
        t.hidden_size,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.head_dim,
        t.intermediate_size,
        t.vocab_size
    );
    if let Some(image) = image {
        let v = &c.vision;
        s += &format!(
            "; vision {}×{} heads {} ffn {} patch {}×{} merge {} positions {} image {}",
            v.depth,
            v.hidden_size,
            v.num_heads,
            v.intermediate_size,
            v.patch_size,
            v.temporal_patch_size,
            v.spatial_merge_size,
            v.num_position_embeddings,
            image
        );
    }
    s
}

/// How much of each head llama.cpp rotates (`rope.dimension_count`, the head width
/// when absent), the value width, and no rope scaling: keys q3vl's reference does not
/// read, so a wrong one would pass the ladder and still break llama.cpp.
fn rope_dims(model: &GgufModel, head_dim: usize) -> GateResult {
    let t = &model.text;
    let key = |k: &str| format!("qwen3vl.{k}");
    let rotated = t.get(&key("rope.dimension_count")).map_or_else(
        || format!("{} (default)", meta(t, &key("attention.key_length"))),
        q3vl_gguf::config::show,
    );
    let scaling = t
        .get(&key("rope.scaling.type"))
        .map_or("none".into(), q3vl_gguf::config::show);
    let value = meta(t, &key("attention.value_length"));
    same(
        "gguf.rope_dims",
        format!(
            "rotated {} value {value} scaling {scaling}",
            rotated.trim_end_matches(" (default)")
        ),
        format!("rotated {head_dim} value {head_dim} scaling none"),
        "rotated dimensions, value width, rope scaling",
    )
}

/// The head: a checkpoint with its own head must not lose it (llama.cpp would then use
/// the embedding table); a tied one may carry a copy (q3vl's int8hu does).
fn head(model: &GgufModel, cfg: &Qwen3VlConfig) -> GateResult {
    let own = !model.cfg.tie_word_embeddings;
    let ok = own || cfg.tie_word_embeddings;
    let say = |own: bool| match own {
        true => "own output.weight",
        false => "tied to token_embd",
    };
    let detail = match ok {
        true => "the head as the checkpoint allows".to_string(),
        false => "the checkpoint has its own lm_head; the GGUF has no output.weight, so llama.cpp uses the embedding table".into(),
    };
    let want = match cfg.tie_word_embeddings {
        true => "tied (or a copy)",
        false => "own output.weight",
    };
    GateResult::new("gguf.head", ok, say(own), format!("= {want}"), detail)
}

/// DeepStack: the text model's count and (with the projector) which ViT blocks feed it.
fn deepstack(model: &GgufModel, cfg: &Qwen3VlConfig) -> GateResult {
    let want = &cfg.vision.deepstack_visual_indexes;
    let count = meta(&model.text, "qwen3vl.n_deepstack_layers");
    let (gguf, oracle) = match model.mmproj {
        Some(_) => (
            format!(
                "{count} layers {:?}",
                model.cfg.vision.deepstack_visual_indexes
            ),
            format!("{} layers {want:?}", want.len()),
        ),
        None => (format!("{count} layers"), format!("{} layers", want.len())),
    };
    same("gguf.deepstack", gguf, oracle, "DeepStack layers")
}

/// The projector's image normalization and LayerNorm epsilon (skipped without one).
fn vision(model: &GgufModel, pre: &PreprocessorConfig) -> Vec<GateResult> {
    let Some(m) = &model.mmproj else {
        let why = "no --mmproj: the projector's metadata was not given";
        return ["gguf.image_norm", "gguf.vision_eps"]
            .map(|g| GateResult::skipped(g, "-", "-", why))
            .to_vec();
    };
    // Both sides as f32 numbers, printed alike (1.0 and 1 are one value).
    let f32s = |key: &str| {
        let v = m.array(key, |x| x.to_f32().ok()).unwrap_or_default();
        format!("{v:?}")
    };
    let f = |v: [f32; 3]| format!("{:?}", v.to_vec());
    vec![
        same(
            "gguf.image_norm",
            format!(
                "mean {} std {}",
                f32s("clip.vision.image_mean"),
                f32s("clip.vision.image_std")
            ),
            format!("mean {} std {}", f(pre.image_mean), f(pre.image_std)),
            "image mean and std",
        ),
        same(
            "gguf.vision_eps",
            meta(m, "clip.vision.attention.layer_norm_epsilon"),
            format!("{VISION_LN_EPS}"),
            "vision LayerNorm epsilon",
        ),
    ]
}

/// Every token string and the special ids against the checkpoint's tokenizer.
fn tokenizer(model: &GgufModel, cfg: &Qwen3VlConfig, src: &Path) -> Result<GateResult> {
    let oracle = PromptBuilder::from_dir(src, cfg)?;
    let ours = PromptBuilder::from_parts(
        model.text.path(),
        &model.tokenizer_json,
        &model.tokenizer_config,
        &model.cfg,
    )?;
    let (a, b) = (ours.tokenizer(), oracle.tokenizer());
    let n = a.get_vocab_size(true).max(b.get_vocab_size(true));
    let differ: Vec<u32> = (0..n as u32)
        .filter(|&id| a.id_to_token(id) != b.id_to_token(id))
        .collect();
    let ids = |c: &Qwen3VlConfig| {
        [
            c.image_token_id,
            c.video_token_id,
            c.vision_start_token_id,
            c.vision_end_token_id,
        ]
    };
    let special_ok = ids(&model.cfg) == ids(cfg);
    let ok = differ.is_empty() && special_ok;
    let detail = match (differ.first(), special_ok) {
        (None, true) => "every token and the vision token ids as the checkpoint has them".into(),
        (Some(id), _) => format!(
            "{} ids differ, the first {id}: {:?} in the GGUF, {:?} in the checkpoint",
            differ.len(),
            a.id_to_token(*id),
            b.id_to_token(*id)
        ),
        (None, false) => format!(
            "vision token ids {:?} in the GGUF, {:?} in the checkpoint",
            ids(&model.cfg),
            ids(cfg)
        ),
    };
    Ok(GateResult::new(
        "gguf.tokenizer",
        ok,
        format!("{}/{n} ids differ", differ.len()),
        "0 differ",
        detail,
    ))
}
