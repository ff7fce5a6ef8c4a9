//! The tokenizer files a language bundle carries, with the chat template always inside
//! `tokenizer_config.json` (newer transformers save it only to `chat_template.jinja`
//! or `chat_template.json`; the engine reads one place).

use crate::error::{ConvertError, Result};
use q3vl_bundle::names::TOKENIZER_DIR;
use serde_json::Value;
use std::path::Path;

/// `(path inside the bundle, bytes)` for every tokenizer file of the source.
/// `tokenizer.json` and `tokenizer_config.json` are required; `generation_config.json`
/// is copied when present.
pub fn tokenizer_files(src: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let read = |name: &str| -> Result<Vec<u8>> {
        let p = src.join(name);
        std::fs::read(&p).map_err(|e| ConvertError::io(&p, e))
    };
    let mut out = vec![(
        format!("{TOKENIZER_DIR}/tokenizer.json"),
        read("tokenizer.json")?,
    )];
    let cfg_path = src.join("tokenizer_config.json");
    let cfg_bytes = read("tokenizer_config.json")?;
    let mut cfg: Value = serde_json::from_slice(&cfg_bytes)
        .map_err(|e| ConvertError::input(&cfg_path, format!("not valid JSON: {e}")))?;
    let obj = cfg
        .as_object_mut()
        .ok_or_else(|| ConvertError::input(&cfg_path, "is not a JSON object"))?;
    let has_template = obj.get("chat_template").is_some_and(|t| !t.is_null());
    let cfg_out = if has_template {
        cfg_bytes
    } else {
        let template = external_template(src)?.ok_or_else(|| {
            ConvertError::input(
                &cfg_path,
                "has no chat_template, and there is no chat_template.jinja or chat_template.json beside it",
            )
        })?;
        obj.insert("chat_template".into(), template);
        let mut b = serde_json::to_vec_pretty(&cfg).expect("json serializes");
        b.push(b'\n');
        b
    };
    out.push((format!("{TOKENIZER_DIR}/tokenizer_config.json"), cfg_out));
    if src.join("generation_config.json").is_file() {
        out.push((
            format!("{TOKENIZER_DIR}/generation_config.json"),
            read("generation_config.json")?,
        ));
    }
    Ok(out)
}

/// The template from `chat_template.jinja` (text) or `chat_template.json`
/// (`{"chat_template": ...}`), if either exists.
fn external_template(src: &Path) -> Result<Option<Value>> {
    let jinja = src.join("chat_template.jinja");
    if jinja.is_file() {
        let t = std::fs::read_to_string(&jinja).map_err(|e| ConvertError::io(&jinja, e))?;
        return Ok(Some(Value::String(t)));
    }
    let json = src.join("chat_template.json");
    if json.is_file() {
        let b = std::fs::read(&json).map_err(|e| ConvertError::io(&json, e))?;
        let v: Value = serde_json::from_slice(&b)
            .map_err(|e| ConvertError::input(&json, format!("not valid JSON: {e}")))?;
        let t = v
            .get("chat_template")
            .filter(|t| !t.is_null())
            .cloned()
            .ok_or_else(|| ConvertError::input(&json, "has no \"chat_template\""))?;
        return Ok(Some(t));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_is_moved_into_tokenizer_config() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("tokenizer.json"), "{}").unwrap();
        std::fs::write(
            d.path().join("tokenizer_config.json"),
            r#"{"eos_token": "x"}"#,
        )
        .unwrap();
        let e = tokenizer_files(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer_config.json") && e.contains("chat_template"),
            "{e}"
        );
        std::fs::write(
            d.path().join("chat_template.json"),
            r#"{"chat_template": "{{ x }}"}"#,
        )
        .unwrap();
        let files = tokenizer_files(d.path()).unwrap();
        let cfg: Value = serde_json::from_slice(&files[1].1).unwrap();
        assert_eq!(cfg["chat_template"], "{{ x }}");
        std::fs::write(d.path().join("chat_template.jinja"), "{{ y }}").unwrap();
        std::fs::write(d.path().join("generation_config.json"), "{}").unwrap();
        let files = tokenizer_files(d.path()).unwrap();
        let cfg: Value = serde_json::from_slice(&files[1].1).unwrap();
        assert_eq!(cfg["chat_template"], "{{ y }}");
        assert_eq!(files.len(), 3);
        assert_eq!(files[2].0, "tokenizer/generation_config.json");
        // A template already in place is copied byte for byte.
        let raw = br#"{"chat_template":   "z"}"#;
        std::fs::write(d.path().join("tokenizer_config.json"), raw).unwrap();
        assert_eq!(tokenizer_files(d.path()).unwrap()[1].1, raw.to_vec());
    }
}
