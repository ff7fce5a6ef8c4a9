//! The tokenizer keys of the text GGUF, as llama.cpp's converter writes them for Qwen3
//! (`gpt2` model, `qwen2` pre-tokenizer), read from the language bundle's
//! `tokenizer/tokenizer.json`, `tokenizer_config.json` and the model config.
//!
//! The vocabulary runs over every id below the config's `vocab_size`: an id the tokenizer
//! has is its token (type 1, normal; an added token: 3, control, when marked special or
//! spelled `<|…|>`, else 4, user-defined), an id it lacks is `[PAD{id}]` (type 5,
//! unused), so every string is unique and the count equals the embedding's rows.

use super::file::Value;
use serde_json::Value as Json;
use std::collections::HashMap;

/// Token types (llama.cpp's `TokenType`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The tokenizer keys, in the converter's order; an error says what is missing.
pub fn keys(
    tokenizer: &Json,
    tok_config: &Json,
    config: &Json,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>, String> {
    let (tokens, types) = vocabulary(tokenizer, vocab_size)?;
    let merges = merges(tokenizer)?;
    let id_of = |name: &str| -> Option<u32> {
        let text = tok_config.get(name)?;
        let text = text.as_str().or_else(|| text.get("content")?.as_str())?;
        tokens.iter().position(|t| t == text).map(|i| i as u32)
    };
    let config_id = |key: &str| {
        config
            .get(key)
            .or_else(|| config.get("text_config")?.get(key))
            .and_then(Json::as_u64)
            .map(|x| x as u32)
    };
    let eos = id_of("eos_token").or_else(|| config_id("eos_token_id"));
    let pad = id_of("pad_token").or_else(|| config_id("pad_token_id"));
    let bos = id_of("bos_token").or_else(|| config_id("bos_token_id"));
    let template = q3vl_model::prompt::inline_template(tok_config)
        .ok_or("tokenizer_config.json has no chat_template")?;
    let flag = |k: &str| tok_config.get(k).and_then(Json::as_bool).unwrap_or(false);
    let s = |k: &str| format!("tokenizer.{k}");
    let mut kv = vec![
        (s("ggml.model"), Value::Str("gpt2".into())),
        (s("ggml.pre"), Value::Str("qwen2".into())),
        (s("ggml.tokens"), Value::Strs(tokens)),
        (s("ggml.token_type"), Value::I32s(types)),
        (s("ggml.merges"), Value::Strs(merges)),
    ];
    for (key, id) in [("eos", eos), ("padding", pad), ("bos", bos)] {
        if let Some(id) = id {
            kv.push((s(&format!("ggml.{key}_token_id")), Value::U32(id)));
        }
    }
    kv.push((s("ggml.add_bos_token"), Value::Bool(flag("add_bos_token"))));
    kv.push((s("ggml.add_eos_token"), Value::Bool(flag("add_eos_token"))));
    kv.push((s("chat_template"), Value::Str(template.into())));
    Ok(kv)
}

/// Every token string and type below `vocab_size`.
fn vocabulary(tokenizer: &Json, vocab_size: usize) -> Result<(Vec<String>, Vec<i32>), String> {
    let vocab = tokenizer["model"]["vocab"]
        .as_object()
        .ok_or("tokenizer.json has no model.vocab")?;
    let mut by_id: HashMap<usize, (String, i32)> = HashMap::new();
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or("tokenizer.json: a vocab id is not a number")? as usize;
        by_id.insert(id, (text.clone(), NORMAL));
    }
    for added in tokenizer["added_tokens"].as_array().into_iter().flatten() {
        let id = added["id"]
            .as_u64()
            .ok_or("tokenizer.json: an added token has no id")? as usize;
        let text = added["content"]
            .as_str()
            .ok_or("tokenizer.json: an added token has no content")?;
        let looks_special = text.starts_with("<|") && text.ends_with("|>");
        let ty = if added["special"] == true || looks_special {
            CONTROL
        } else {
            USER_DEFINED
        };
        by_id.insert(id, (text.to_string(), ty));
    }
    if let Some(id) = by_id.keys().find(|&&id| id >= vocab_size) {
        return Err(format!(
            "tokenizer.json has id {id}, past the model's vocab_size {vocab_size}"
        ));
    }
    Ok((0..vocab_size)
        .map(|i| {
            by_id
                .remove(&i)
                .unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED))
        })
        .unzip())
}

/// The merges as `"left right"` strings (tokenizer.json holds pairs or such strings).
fn merges(tokenizer: &Json) -> Result<Vec<String>, String> {
    let list = tokenizer["model"]["merges"]
        .as_array()
        .ok_or("tokenizer.json has no model.merges")?;
    list.iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(p) if p.len() == 2 => {
                let part = |v: &Json| v.as_str().map(|s| s.replace(' ', "\u{120}"));
                match (part(&p[0]), part(&p[1])) {
                    (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                    _ => Err("tokenizer.json: a merge is not two strings".to_string()),
                }
            }
            _ => Err("tokenizer.json: a merge is neither a string nor a pair".to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_types_padding_and_merges_follow_the_converter() {
        let tok = json!({
            "model": {"vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]},
            "added_tokens": [
                {"id": 3, "content": "<|im_end|>", "special": true},
                {"id": 4, "content": "<|fim_pad|>", "special": false},
                {"id": 5, "content": "<think>", "special": false},
            ]
        });
        let cfg = json!({"eos_token": "<|im_end|>", "bos_token": null, "chat_template": "T"});
        let model = json!({"text_config": {"bos_token_id": 4}});
        let kv: HashMap<String, Value> = keys(&tok, &cfg, &model, 8).unwrap().into_iter().collect();
        let tokens = [
            "a",
            "b",
            "ab",
            "<|im_end|>",
            "<|fim_pad|>",
            "<think>",
            "[PAD6]",
            "[PAD7]",
        ];
        assert_eq!(
            kv["tokenizer.ggml.tokens"],
            Value::Strs(tokens.map(String::from).to_vec())
        );
        assert_eq!(
            kv["tokenizer.ggml.token_type"],
            Value::I32s(vec![1, 1, 1, 3, 3, 4, 5, 5])
        );
        assert_eq!(kv["tokenizer.ggml.merges"], Value::Strs(vec!["a b".into()]));
        assert_eq!(kv["tokenizer.ggml.eos_token_id"], Value::U32(3));
        assert_eq!(kv["tokenizer.ggml.bos_token_id"], Value::U32(4));
        assert!(!kv.contains_key("tokenizer.ggml.padding_token_id"));
        assert!(
            keys(&tok, &cfg, &model, 4).is_err(),
            "an id past vocab_size"
        );
    }
}
