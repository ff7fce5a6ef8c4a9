//! A Qwen3-VL configuration read from GGUF metadata, as llama.cpp's converter writes it
//! (`qwen3vl.*` in the text file, `clip.vision.*` in the projector), with the tensor
//! shapes for what the metadata does not say. It is spelled as HF's `config.json` and
//! parsed by the model's own reader, so a GGUF is held to the same bounds as a
//! checkpoint.

use crate::error::Result;
use crate::file::GgufFile;
use crate::names;
use candle_core::quantized::gguf_file::Value;
use q3vl_model::{PreprocessorConfig, Qwen3VlConfig};
use serde_json::{json, Value as Json};

/// The text architecture llama.cpp gives Qwen3-VL.
pub const TEXT_ARCH: &str = "qwen3vl";
/// The projector type of Qwen3-VL's mmproj.
pub const PROJECTOR: &str = "qwen3vl_merger";

/// The token ids the config takes from the vocabulary.
const VISION_TOKENS: [(&str, &str); 4] = [
    ("image_token_id", "<|image_pad|>"),
    ("video_token_id", "<|video_pad|>"),
    ("vision_start_token_id", "<|vision_start|>"),
    ("vision_end_token_id", "<|vision_end|>"),
];

/// The text file's architecture must be `qwen3vl`.
pub fn check_text_arch(text: &GgufFile) -> Result<()> {
    match text.str("general.architecture")? {
        TEXT_ARCH => Ok(()),
        other => Err(text.bad(format!(
            "general.architecture is {other:?}, not {TEXT_ARCH:?} (a Qwen3-VL text model)"
        ))),
    }
}

/// The projector must be a `clip` file of type `qwen3vl_merger`.
pub fn check_mmproj_arch(mmproj: &GgufFile) -> Result<()> {
    let arch = mmproj.str("general.architecture")?;
    let ty = mmproj.str("clip.projector_type").unwrap_or("");
    if arch != "clip" || ty != PROJECTOR {
        return Err(mmproj.bad(format!(
            "general.architecture {arch:?} with clip.projector_type {ty:?} is not a Qwen3-VL projector (clip, {PROJECTOR:?})"
        )));
    }
    Ok(())
}

/// The rows and columns of a 2-D tensor, or an error naming it.
fn dims2(f: &GgufFile, name: &str) -> Result<[usize; 2]> {
    match f.info(name) {
        Some((_, &[r, c])) => Ok([r, c]),
        Some((_, d)) => Err(f.bad(format!("tensor {name} has shape {d:?}, expected 2-D"))),
        None => Err(f.bad(format!("tensor {name} is missing"))),
    }
}

/// `config.json`'s `text_config`, and the vision token ids, from the text file.
fn text_json(text: &GgufFile, tokens: &[String]) -> Result<(Json, Json)> {
    let k = |key: &str| format!("{TEXT_ARCH}.{key}");
    let sections: Vec<i128> = text.array(&k("rope.dimension_sections"), crate::file::integer)?;
    let [vocab, _] = dims2(text, names::TOKEN_EMBD)?;
    let tied = text.info(names::OUTPUT).is_none();
    let text_config = json!({
        "hidden_size": text.usize(&k("embedding_length"))?,
        "num_hidden_layers": text.usize(&k("block_count"))?,
        "num_attention_heads": text.usize(&k("attention.head_count"))?,
        "num_key_value_heads": text.usize(&k("attention.head_count_kv"))?,
        "head_dim": text.usize(&k("attention.key_length"))?,
        "intermediate_size": text.usize(&k("feed_forward_length"))?,
        "vocab_size": vocab,
        "rope_theta": text.f64(&k("rope.freq_base"))?,
        "rope_scaling": {"rope_type": "default", "mrope_section": sections.iter().take(3).collect::<Vec<_>>(), "mrope_interleaved": true},
        "rms_norm_eps": text.f64(&k("attention.layer_norm_rms_epsilon"))?,
        "max_position_embeddings": text.usize(&k("context_length"))?,
        "tie_word_embeddings": tied,
    });
    let mut ids = serde_json::Map::new();
    for (key, token) in VISION_TOKENS {
        let id = tokens
            .iter()
            .position(|t| t == token)
            .ok_or_else(|| text.bad(format!("tokenizer.ggml.tokens has no {token}")))?;
        ids.insert(key.into(), json!(id));
    }
    Ok((text_config, Json::Object(ids)))
}

/// `config.json`'s `vision_config` from the projector, and its preprocessing.
fn vision_json(m: &GgufFile, out_hidden: usize) -> Result<(Json, Json)> {
    let c = |key: &str| format!("clip.vision.{key}");
    let deepstack: Vec<bool> = m.array(&c("is_deepstack_layers"), |v| v.to_bool().ok())?;
    let [positions, _] = dims2(m, "v.position_embd.weight")?;
    let halves = (0..)
        .take_while(|&k| m.info(&names::patch_half(k)).is_some())
        .count();
    let channels = match m.info(&names::patch_half(0)) {
        Some((_, &[_, c, _, _])) => c,
        Some((_, d)) => {
            return Err(m.bad(format!(
                "tensor {} has shape {d:?}, expected [out, channels, p, p]",
                names::patch_half(0)
            )))
        }
        None => return Err(m.bad(format!("tensor {} is missing", names::patch_half(0)))),
    };
    let patch = m.usize(&c("patch_size"))?;
    let vision = json!({
        "depth": m.usize(&c("block_count"))?,
        "hidden_size": m.usize(&c("embedding_length"))?,
        "intermediate_size": m.usize(&c("feed_forward_length"))?,
        "num_heads": m.usize(&c("attention.head_count"))?,
        "patch_size": patch,
        "temporal_patch_size": halves,
        "spatial_merge_size": m.usize(&c("spatial_merge_size"))?,
        "in_channels": channels,
        "out_hidden_size": m.usize(&c("projection_dim")).unwrap_or(out_hidden),
        "num_position_embeddings": positions,
        "deepstack_visual_indexes": deepstack.iter().enumerate().filter(|(_, &d)| d).map(|(j, _)| j).collect::<Vec<_>>(),
    });
    let f32s = |key: &str| m.array(&c(key), |v| v.to_f32().ok());
    let preprocessor = json!({
        "image_mean": f32s("image_mean")?,
        "image_std": f32s("image_std")?,
        "patch_size": patch,
        "temporal_patch_size": halves,
        "merge_size": m.usize(&c("spatial_merge_size"))?,
    });
    Ok((vision, preprocessor))
}

/// A vision section for a text file read without its projector: never run (an image
/// needs the projector), only there so the configuration is whole.
fn absent_vision(out_hidden: usize) -> Json {
    json!({
        "depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 1,
        "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2,
        "in_channels": 3, "out_hidden_size": out_hidden, "num_position_embeddings": 4,
        "deepstack_visual_indexes": [],
    })
}

/// The configuration and preprocessing of a GGUF pair (`mmproj` None: text only).
pub fn read(
    text: &GgufFile,
    mmproj: Option<&GgufFile>,
    tokens: &[String],
) -> Result<(Qwen3VlConfig, PreprocessorConfig)> {
    let (text_config, ids) = text_json(text, tokens)?;
    let hidden = text_config["hidden_size"].as_u64().unwrap_or(0) as usize;
    let (vision, pre) = match mmproj {
        Some(m) => vision_json(m, hidden)?,
        None => (absent_vision(hidden), json!({})),
    };
    if let Some(m) = mmproj {
        let out = vision["out_hidden_size"].as_u64().unwrap_or(0) as usize;
        if out != hidden {
            return Err(m.bad(format!(
                "does not match {}: the projector outputs {out} values per token, the text model's width is {hidden}",
                text.path().display()
            )));
        }
    }
    let mut cfg = json!({
        "model_type": "qwen3_vl",
        "tie_word_embeddings": text_config["tie_word_embeddings"],
        "text_config": text_config,
        "vision_config": vision,
    });
    if let (Json::Object(c), Json::Object(ids)) = (&mut cfg, ids) {
        c.extend(ids);
    }
    let named = |f: &GgufFile, e: q3vl_model::Error| f.bad(format!("metadata: {e}"));
    let cfg = Qwen3VlConfig::from_json(&cfg).map_err(|e| named(text, e))?;
    let pre = PreprocessorConfig::from_json(&pre).map_err(|e| named(mmproj.unwrap_or(text), e))?;
    if let Some(m) = mmproj {
        check_pair(text, m, &cfg)?;
    }
    Ok((cfg, pre))
}

/// The projector must feed this text model: its output width is the text width, and
/// it has as many DeepStack mergers as the text model has DeepStack layers.
fn check_pair(text: &GgufFile, m: &GgufFile, cfg: &Qwen3VlConfig) -> Result<()> {
    let [out, _] = dims2(m, "mm.2.weight")?;
    if out != cfg.text.hidden_size {
        return Err(m.bad(format!(
            "tensor mm.2.weight has {out} rows, not the text model's width {}",
            cfg.text.hidden_size
        )));
    }
    let key = format!("{TEXT_ARCH}.n_deepstack_layers");
    let want = text
        .get(&key)
        .map(|_| text.usize(&key))
        .transpose()?
        .unwrap_or(0);
    let have = cfg.vision.deepstack_visual_indexes.len();
    if want != have {
        return Err(m.bad(format!(
            "does not match {}: it has {have} DeepStack layers, {key} is {want}",
            text.path().display()
        )));
    }
    Ok(())
}

/// A metadata value as a person reads it in a report (`[24, 20, 20, 0]`).
pub fn show(v: &Value) -> String {
    match v {
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(show).collect();
            format!("[{}]", items.join(", "))
        }
        Value::String(s) => format!("{s:?}"),
        Value::F32(x) => format!("{x}"),
        Value::F64(x) => format!("{x}"),
        Value::Bool(b) => format!("{b}"),
        Value::U8(x) => x.to_string(),
        Value::I8(x) => x.to_string(),
        Value::U16(x) => x.to_string(),
        Value::I16(x) => x.to_string(),
        Value::U32(x) => x.to_string(),
        Value::I32(x) => x.to_string(),
        Value::U64(x) => x.to_string(),
        Value::I64(x) => x.to_string(),
    }
}
