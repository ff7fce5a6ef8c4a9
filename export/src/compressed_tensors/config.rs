//! The export's `config.json`: the source checkpoint's own config (the language
//! bundle keeps it verbatim) with a compressed-tensors `quantization_config`, the
//! dtype that keeps the scales exact, and the head untied when the bundle stores one.

use serde_json::{json, Value};

/// The compressed-tensors version whose format the export follows (the version the
/// oracle environment pins and the loading test runs).
pub const COMPRESSED_TENSORS_VERSION: &str = "0.20.1";

/// The `quantization_config`: one group, the decoder's linear layers as symmetric
/// int8 with one scale per 32 input columns (q3vl's int8 per-block-32 exactly),
/// weights only; `ignore` lists every linear module left dense.
pub fn quantization_config(ignore: &[String]) -> Value {
    json!({
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "int",
                    "symmetric": true,
                    "strategy": "group",
                    "group_size": q3vl_bundle::BLOCK,
                    "dynamic": false,
                    "actorder": null,
                    "observer": "minmax",
                },
                "input_activations": null,
                "output_activations": null,
                "format": "pack-quantized",
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": null,
        "global_compression_ratio": null,
        "version": COMPRESSED_TENSORS_VERSION,
    })
}

/// The model dtype the export declares. The loader casts every scale to it: float16
/// holds the bundle's f16 scales exactly (bfloat16 would round them to 8 bits); the
/// dequantized weight `q · s` is then rounded once to f16 (float32 keeps it exact).
pub const MODEL_DTYPE: &str = "float16";

/// `source` (the checkpoint's config) made the export's: with `quantization_config`,
/// [`MODEL_DTYPE`] wherever the config names a dtype, and `tie_word_embeddings`
/// false when `untie` (the bundle stores its own head, made from a tied embedding).
/// A config that is not a JSON object is an error (what is wrong, for the caller to
/// name the file).
pub fn export_config(
    mut source: Value,
    ignore: &[String],
    untie: bool,
) -> std::result::Result<Value, String> {
    let Some(top) = source.as_object_mut() else {
        return Err("is not a JSON object".into());
    };
    top.insert("quantization_config".into(), quantization_config(ignore));
    top.insert("dtype".into(), MODEL_DTYPE.into());
    if top.contains_key("torch_dtype") {
        top.insert("torch_dtype".into(), MODEL_DTYPE.into());
    }
    if untie {
        top.insert("tie_word_embeddings".into(), false.into());
    }
    for sub in ["text_config", "vision_config"] {
        let Some(cfg) = top.get_mut(sub).and_then(Value::as_object_mut) else {
            continue;
        };
        for key in ["dtype", "torch_dtype"] {
            if cfg.contains_key(key) {
                cfg.insert(key.into(), MODEL_DTYPE.into());
            }
        }
        if untie && sub == "text_config" && cfg.contains_key("tie_word_embeddings") {
            cfg.insert("tie_word_embeddings".into(), false.into());
        }
    }
    Ok(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_carries_the_scheme_and_unties_only_when_asked() {
        let src = json!({
            "dtype": "bfloat16",
            "tie_word_embeddings": true,
            "text_config": {"tie_word_embeddings": true, "dtype": "bfloat16"},
            "vision_config": {"depth": 2},
        });
        let ignore = vec!["lm_head".to_string()];
        let c = export_config(src.clone(), &ignore, true).unwrap();
        let w = &c["quantization_config"]["config_groups"]["group_0"]["weights"];
        assert_eq!(w["num_bits"], 8);
        assert_eq!(w["group_size"], 32);
        assert_eq!(w["strategy"], "group");
        assert_eq!(w["symmetric"], true);
        assert_eq!(c["quantization_config"]["ignore"], json!(["lm_head"]));
        assert_eq!(c["dtype"], MODEL_DTYPE);
        assert_eq!(c["text_config"]["dtype"], MODEL_DTYPE);
        assert!(c["vision_config"].get("dtype").is_none());
        assert_eq!(c["tie_word_embeddings"], false);
        assert_eq!(c["text_config"]["tie_word_embeddings"], false);
        let kept = export_config(src, &ignore, false).unwrap();
        assert!(export_config(json!([1]), &ignore, false).is_err());
        assert_eq!(kept["tie_word_embeddings"], true);
        assert_eq!(kept["text_config"]["tie_word_embeddings"], true);
    }
}
