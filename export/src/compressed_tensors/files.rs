//! The export's small files: `config.json` (the source's, made the export's by
//! [`super::config`]), the tokenizer, chat template, generation and preprocessor configs,
//! each copied from the bundles only when their `metadata.json` lists it (so a file no
//! checksum covers is never handed on).

use super::config;
use super::plan::ExportPlan;
use crate::error::{ExportError, Result};
use crate::small_files::{read_json, write_file, write_json};
use crate::source::ExportSource;
use q3vl_bundle::names::{CONFIG_FILE, PREPROCESSOR_FILE, TOKENIZER_DIR};
use q3vl_bundle::{Bundle, FileEntry};
use std::collections::BTreeMap;
use std::path::Path;

/// Writes the configs and tokenizer files; returns each file's size and sha256.
pub fn write_small_files(
    src: &ExportSource,
    plan: &ExportPlan,
    untie: bool,
    dir: &Path,
) -> Result<BTreeMap<String, FileEntry>> {
    let (lang, vision) = (&src.bundles.language, &src.bundles.vision);
    let mut files = BTreeMap::new();
    let source_config = read_json(&lang.dir().join(CONFIG_FILE))?;
    let cfg = config::export_config(source_config, &plan.ignore, untie)
        .map_err(|msg| unsupported(&lang.dir().join(CONFIG_FILE), msg))?;
    files.insert(CONFIG_FILE.into(), write_json(dir, CONFIG_FILE, &cfg)?);
    let tok = |name: &str| format!("{TOKENIZER_DIR}/{name}");
    let copies = [
        (lang, tok("tokenizer.json"), true),
        (lang, tok("tokenizer_config.json"), true),
        (lang, tok("generation_config.json"), false),
        (vision, PREPROCESSOR_FILE.to_string(), true),
    ];
    for (bundle, rel, required) in copies {
        if let Some(bytes) = listed_file(bundle, &rel, required)? {
            let name = rel.rsplit('/').next().unwrap_or(&rel);
            files.insert(name.into(), write_file(dir, name, &bytes)?);
        }
    }
    // Processors (transformers' AutoProcessor, vLLM's multimodal path) read the template
    // from its own file; the bundle keeps it in tokenizer_config.json.
    let tok_config = lang.dir().join(tok("tokenizer_config.json"));
    let tok_json = read_json(&tok_config)?;
    let template = q3vl_model::prompt::inline_template(&tok_json)
        .map(str::to_owned)
        .ok_or_else(|| unsupported(&tok_config, "has no chat_template string".into()))?;
    let entry = write_file(dir, CHAT_TEMPLATE_FILE, template.as_bytes())?;
    files.insert(CHAT_TEMPLATE_FILE.into(), entry);
    Ok(files)
}

/// The bytes of bundle file `rel` when its `metadata.json` lists it (the checksums and
/// the stamp cover exactly those); a required file it does not list is an error.
fn listed_file(b: &Bundle, rel: &str, required: bool) -> Result<Option<Vec<u8>>> {
    let path = b.dir().join(rel);
    if !b.metadata().files.contains_key(rel) {
        return match required {
            true => Err(unsupported(
                &path,
                "is not listed in the bundle's metadata.json".into(),
            )),
            false => Ok(None),
        };
    }
    let bytes = q3vl_model::input::read_regular(&path).map_err(|e| ExportError::io(&path, e))?;
    Ok(Some(bytes))
}

fn unsupported(path: &Path, msg: String) -> ExportError {
    ExportError::Unsupported {
        path: path.to_path_buf(),
        msg,
    }
}

/// The chat template's own file in an HF checkpoint.
const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
