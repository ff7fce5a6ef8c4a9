//! The metadata of the two GGUF files: the keys llama.cpp's converter writes for
//! `Qwen3VLForConditionalGeneration` (text: architecture `qwen3vl`; projector: `clip`
//! with `qwen3vl_merger`), with the value types its loaders check, and q3vl's provenance.

use super::file::Value;
use q3vl_model::Qwen3VlConfig;

/// `general.file_type` of a text model mostly Q8_0 (`MOSTLY_Q8_0`), or mostly F16.
pub const FILE_TYPE_Q8_0: u32 = 7;
/// `general.file_type` of a mostly-F16 file (`MOSTLY_F16`).
pub const FILE_TYPE_F16: u32 = 1;

fn kv(key: &str, v: Value) -> (String, Value) {
    (key.to_string(), v)
}

/// The text model's keys before the tokenizer's.
pub fn text(cfg: &Qwen3VlConfig, name: &str, file_type: u32) -> Vec<(String, Value)> {
    let t = &cfg.text;
    let a = |k: &str| format!("qwen3vl.{k}");
    let [s0, s1, s2] = t.mrope_section.map(|x| x as i32);
    vec![
        kv("general.architecture", Value::Str("qwen3vl".into())),
        kv("general.type", Value::Str("model".into())),
        kv("general.name", Value::Str(name.into())),
        kv(&a("block_count"), Value::U32(t.num_hidden_layers as u32)),
        kv(
            &a("context_length"),
            Value::U32(t.max_position_embeddings as u32),
        ),
        kv(&a("embedding_length"), Value::U32(t.hidden_size as u32)),
        kv(
            &a("feed_forward_length"),
            Value::U32(t.intermediate_size as u32),
        ),
        kv(
            &a("attention.head_count"),
            Value::U32(t.num_attention_heads as u32),
        ),
        kv(
            &a("attention.head_count_kv"),
            Value::U32(t.num_key_value_heads as u32),
        ),
        kv(
            &a("rope.dimension_sections"),
            Value::I32s(vec![s0, s1, s2, 0]),
        ),
        kv(&a("rope.freq_base"), Value::F32(t.rope_theta as f32)),
        kv(
            &a("attention.layer_norm_rms_epsilon"),
            Value::F32(t.rms_norm_eps as f32),
        ),
        kv(&a("attention.key_length"), Value::U32(t.head_dim as u32)),
        kv(&a("attention.value_length"), Value::U32(t.head_dim as u32)),
        kv("general.file_type", Value::U32(file_type)),
        kv(
            &a("n_deepstack_layers"),
            Value::U32(cfg.vision.deepstack_visual_indexes.len() as u32),
        ),
        kv("general.quantization_version", Value::U32(2)),
    ]
}

/// The default sampling llama.cpp's tools read, from `generation_config.json` (what the
/// converter copies: top-k, top-p, min-p, temperature, repetition penalty).
pub fn sampling(generation: &serde_json::Value) -> Vec<(String, Value)> {
    let f = |k: &str| generation.get(k).and_then(serde_json::Value::as_f64);
    let mut out = Vec::new();
    if let Some(k) = generation.get("top_k").and_then(serde_json::Value::as_i64) {
        out.push(kv("general.sampling.top_k", Value::I32(k as i32)));
    }
    let floats = [
        ("top_p", "top_p"),
        ("min_p", "min_p"),
        ("temperature", "temp"),
    ];
    for (from, to) in floats
        .into_iter()
        .chain([("repetition_penalty", "penalty_repeat")])
    {
        if let Some(x) = f(from) {
            out.push(kv(&format!("general.sampling.{to}"), Value::F32(x as f32)));
        }
    }
    out
}

/// The projector's keys. `image_mean`/`image_std` come from the vision bundle's
/// preprocessing; the layer-norm epsilon is the text config's RMS epsilon, as the
/// converter writes it (the vision LayerNorms use 1e-6 as well).
pub fn mmproj(
    cfg: &Qwen3VlConfig,
    name: &str,
    mean: [f32; 3],
    std: [f32; 3],
) -> Vec<(String, Value)> {
    let v = &cfg.vision;
    let c = |k: &str| format!("clip.vision.{k}");
    let side = ((v.num_position_embeddings as f64).sqrt() as usize) * v.patch_size;
    let deepstack = (0..v.depth)
        .map(|j| v.deepstack_visual_indexes.contains(&j))
        .collect();
    vec![
        kv("general.architecture", Value::Str("clip".into())),
        kv("general.type", Value::Str("mmproj".into())),
        kv("general.name", Value::Str(name.into())),
        kv("general.file_type", Value::U32(FILE_TYPE_F16)),
        kv("clip.has_vision_encoder", Value::Bool(true)),
        kv(&c("projection_dim"), Value::U32(v.out_hidden_size as u32)),
        kv(&c("image_size"), Value::U32(side as u32)),
        kv(&c("patch_size"), Value::U32(v.patch_size as u32)),
        kv(&c("embedding_length"), Value::U32(v.hidden_size as u32)),
        kv(
            &c("feed_forward_length"),
            Value::U32(v.intermediate_size as u32),
        ),
        kv(&c("block_count"), Value::U32(v.depth as u32)),
        kv(&c("attention.head_count"), Value::U32(v.num_heads as u32)),
        kv(&c("image_mean"), Value::F32s(mean.to_vec())),
        kv(&c("image_std"), Value::F32s(std.to_vec())),
        kv("clip.projector_type", Value::Str("qwen3vl_merger".into())),
        kv("clip.use_gelu", Value::Bool(true)),
        kv(
            &c("spatial_merge_size"),
            Value::U32(v.spatial_merge_size as u32),
        ),
        kv(
            &c("attention.layer_norm_epsilon"),
            Value::F32(cfg.text.rms_norm_eps as f32),
        ),
        kv(&c("is_deepstack_layers"), Value::Bools(deepstack)),
        kv("general.quantization_version", Value::U32(2)),
    ]
}
