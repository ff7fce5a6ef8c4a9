//! The tokenizer files a language bundle carries, with the chat template always inside
//! `tokenizer_config.json` (newer transformers save it only to `chat_template.jinja`
//! or `chat_template.json`; the engine reads one place).

use crate::error::{ConvertError, Result};
use q3vl_bundle::names::TOKENIZER_DIR;
use q3vl_model::prompt::PromptBuilder;
use q3vl_model::Qwen3VlConfig;
use serde_json::Value;
use std::path::Path;

/// `(path inside the bundle, bytes)` for every tokenizer file of the source.
/// `tokenizer.json` and `tokenizer_config.json` are required; `generation_config.json`
/// is copied when present.
pub fn tokenizer_files(src: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let read = |name: &str| -> Result<Vec<u8>> {
        let p = src.join(name);
        q3vl_model::input::read_regular(&p).map_err(|e| ConvertError::io(&p, e))
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
    // The bundle carries one template, inside its config: the engine looks nowhere else.
    let cfg_out = if q3vl_model::prompt::inline_template(&Value::Object(obj.clone())).is_some() {
        cfg_bytes
    } else {
        let why = match obj.get("chat_template") {
            None | Some(Value::Null) => "has no chat_template",
            Some(_) => "has a chat_template that is neither text nor a list with a \"default\" one",
        };
        let template = external_template(src)?.ok_or_else(|| {
            ConvertError::input(
                &cfg_path,
                format!(
                    "{why}, and there is no chat_template.jinja or chat_template.json beside it"
                ),
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

/// Loads the tokenizer files a bundle will carry (`files`, from [`tokenizer_files`])
/// exactly as `q3vl run` will, and renders and tokenises a test conversation with
/// them, so a tokenizer or chat template that cannot work is refused before anything
/// is written. The error names the source file at fault.
pub fn check_tokenizer(src: &Path, files: &[(String, Vec<u8>)], cfg: &Qwen3VlConfig) -> Result<()> {
    let get = |name: &str| {
        files
            .iter()
            .find(|(rel, _)| rel.rsplit('/').next() == Some(name))
            .map(|(_, b)| b.as_slice())
            .unwrap_or_default()
    };
    let cfg_path = src.join("tokenizer_config.json");
    let tcfg: Value = serde_json::from_slice(get("tokenizer_config.json"))
        .map_err(|e| ConvertError::input(&cfg_path, format!("not valid JSON: {e}")))?;
    let pb = PromptBuilder::from_parts(src, get("tokenizer.json"), &tcfg, cfg)?;
    pb.self_test().map_err(|e| {
        ConvertError::input(
            &cfg_path,
            format!("its chat template and tokenizer fail on a test conversation: {e}"),
        )
    })
}

/// The template from `chat_template.jinja` (text) or `chat_template.json`
/// (`{"chat_template": ...}`), if either exists.
fn external_template(src: &Path) -> Result<Option<Value>> {
    let jinja = src.join("chat_template.jinja");
    if jinja.is_file() {
        let t = q3vl_model::input::read_regular_to_string(&jinja)
            .map_err(|e| ConvertError::io(&jinja, e))?;
        return Ok(Some(Value::String(t)));
    }
    let json = src.join("chat_template.json");
    if json.is_file() {
        let b = q3vl_model::input::read_regular(&json).map_err(|e| ConvertError::io(&json, e))?;
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
    fn the_tokenizer_and_template_must_render_a_conversation() {
        let shapes = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/shapes");
        let cfg = Qwen3VlConfig::from_dir(&shapes).unwrap();
        let files = tokenizer_files(&shapes).unwrap();
        check_tokenizer(&shapes, &files, &cfg).unwrap();
        let with = |name: &str, bytes: &[u8]| {
            let mut f = files.clone();
            for (rel, b) in f.iter_mut() {
                if rel.ends_with(name) {
                    *b = bytes.to_vec();
                }
            }
            check_tokenizer(&shapes, &f, &cfg).unwrap_err().to_string()
        };
        let e = with("tokenizer.json", b"{\"model\": 1}");
        assert!(e.contains("tokenizer.json"), "{e}");
        let e = with("tokenizer_config.json", br#"{"chat_template": "{% if %}"}"#);
        assert!(
            e.contains("tokenizer_config.json") && e.contains("does not parse"),
            "{e}"
        );
        // A template that never places the image: `run --image` could not work.
        let e = with(
            "tokenizer_config.json",
            br#"{"chat_template": "{{ messages[0].role }}"}"#,
        );
        assert!(
            e.contains("tokenizer_config.json") && e.contains("placeholder"),
            "{e}"
        );
    }

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
        // A template the config holds in an unusable form is replaced by the one beside
        // it (the engine reads only the config), and refused when there is none (found
        // by the fuzzer: `true` passed, and the bundle's tokenizer failed at run time).
        std::fs::write(
            d.path().join("tokenizer_config.json"),
            r#"{"chat_template": true}"#,
        )
        .unwrap();
        let files = tokenizer_files(d.path()).unwrap();
        let cfg: Value = serde_json::from_slice(&files[1].1).unwrap();
        assert_eq!(cfg["chat_template"], "{{ y }}");
        std::fs::remove_file(d.path().join("chat_template.jinja")).unwrap();
        std::fs::remove_file(d.path().join("chat_template.json")).unwrap();
        let e = tokenizer_files(d.path()).unwrap_err().to_string();
        assert!(e.contains("neither text nor a list"), "{e}");
        // A template already in place is copied byte for byte.
        let raw = br#"{"chat_template":   "z"}"#;
        std::fs::write(d.path().join("tokenizer_config.json"), raw).unwrap();
        assert_eq!(tokenizer_files(d.path()).unwrap()[1].1, raw.to_vec());
    }
}
