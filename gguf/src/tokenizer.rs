//! The tokenizer of a GGUF text file, rebuilt as a Hugging Face `tokenizer.json`: a
//! byte-level BPE over `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, with Qwen2's
//! pre-tokenizer (the only one `tokenizer.ggml.pre = qwen2` names), the control and
//! user-defined tokens as added tokens, and the chat template from
//! `tokenizer.chat_template`. The verifier then rebuilds each trace's prompt with it,
//! so a vocabulary, merge list or template a converter broke shows as wrong prompt ids.

use crate::error::Result;
use crate::file::GgufFile;
use serde_json::{json, Value as Json};

/// Qwen2's pre-tokenizer split (`tokenizer.json` of every Qwen2/Qwen3 model).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Token types (llama.cpp's `TokenType`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// The vocabulary of a text file: each id's token string.
pub fn tokens(text: &GgufFile) -> Result<Vec<String>> {
    text.array("tokenizer.ggml.tokens", |v| v.to_string().ok().cloned())
}

/// The tokenizer as `tokenizer.json` bytes, and a `tokenizer_config.json` holding the
/// chat template and the eos token.
pub fn hf_files(text: &GgufFile, tokens: &[String]) -> Result<(Vec<u8>, Json)> {
    match text.str("tokenizer.ggml.model")? {
        "gpt2" => {}
        other => {
            return Err(text.bad(format!(
                "tokenizer.ggml.model is {other:?}, not \"gpt2\" (byte-level BPE)"
            )))
        }
    }
    match text.str("tokenizer.ggml.pre")? {
        "qwen2" => {}
        other => {
            return Err(text.bad(format!(
                "tokenizer.ggml.pre is {other:?}, not \"qwen2\" (Qwen3's pre-tokenizer)"
            )))
        }
    }
    let types: Vec<i32> = text.array("tokenizer.ggml.token_type", |v| v.to_i32().ok())?;
    if types.len() != tokens.len() {
        return Err(text.bad(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let merges: Vec<String> =
        text.array("tokenizer.ggml.merges", |v| v.to_string().ok().cloned())?;
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, (tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        match ty {
            NORMAL => {
                vocab.insert(tok.clone(), json!(id));
            }
            CONTROL | USER_DEFINED => added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == CONTROL,
            })),
            // Unused and unknown slots: ids no text encodes to.
            _ => {}
        }
    }
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
            byte_level,
        ]},
        "post_processor": byte_level,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    });
    let template = text.str("tokenizer.chat_template")?;
    let eos = text
        .usize("tokenizer.ggml.eos_token_id")
        .ok()
        .and_then(|i| tokens.get(i).cloned());
    let config = json!({"chat_template": template, "eos_token": eos});
    let bytes = serde_json::to_vec(&tokenizer).expect("a JSON value serializes");
    Ok((bytes, config))
}
