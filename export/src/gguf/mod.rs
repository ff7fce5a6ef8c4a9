//! `q3vl export gguf`: a verified bundle pair as the two GGUF files llama.cpp runs (the
//! text model and its vision projector, "mmproj"), with the keys, names and types
//! llama.cpp's own converter writes for Qwen3-VL (`docs/export.md`).
//!
//! The int8 weights become Q8_0 without re-quantizing: the same int8 values and f16
//! scales. Both files carry q3vl's provenance under `q3vl.provenance` (the source, the
//! bundles, the stamp's summary), and the folder holds `q3vl_export.json` with the
//! sha256 of both. Streaming with bounded memory; the same bundles give the same bytes.

pub mod file;
pub mod keys;
pub mod plan;
pub mod tokenizer;
mod weights;

use crate::error::{ExportError, Result};
use crate::output;
use crate::source::{self, ExportSource, Provenance, PROVENANCE_FILE};
use crate::Request;
use file::{GgmlType, GgufWriter, Value};
use plan::GgufTensor;
use q3vl_bundle::names::TOKENIZER_DIR;
use q3vl_bundle::{FileEntry, Scheme};
use q3vl_convert::cancel::Cancel;
use q3vl_convert::progress::Progress;
use q3vl_model::layout::LM_HEAD;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The export format's name, as `q3vl_export.json` and `--force` know it.
pub const FORMAT: &str = "gguf";

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The export folder.
    pub path: PathBuf,
    /// The text model's file name.
    pub model: String,
    /// The projector's file name.
    pub mmproj: String,
    /// Tensors stored Q8_0 (repacked from int8, not re-quantized).
    pub q8_0_tensors: usize,
    /// Bytes of every file written.
    pub bytes: u64,
    /// Whether the pair carried a valid verification stamp.
    pub verified: bool,
    /// Wall time.
    pub seconds: f64,
    /// Peak resident set (VmHWM).
    pub peak_rss_bytes: Option<u64>,
}

/// Exports the pair in `req.bundle` to `req.out`.
pub fn export(req: &Request, progress: &dyn Progress, cancel: &Cancel) -> Result<Summary> {
    let t0 = Instant::now();
    let src = source::open(&req.bundle, req.allow_unverified)?;
    let cfg = src.bundles.language.config().clone();
    let text = plan::text(&src.bundles.language, &cfg)?;
    let mmproj = plan::mmproj(&src.bundles, &cfg)?;
    let q8 = text.iter().filter(|t| t.info.ty == GgmlType::Q8_0).count();
    let name = model_name(&src);
    let suffix = if q8 > 0 { "Q8_0" } else { "F16" };
    let (model_file, mmproj_file) = (
        format!("{name}-{suffix}.gguf"),
        format!("mmproj-{name}-F16.gguf"),
    );
    let absmax = src.bundles.language.scheme(LM_HEAD) == Some(Scheme::Int8AbsMax);
    let prov = Provenance::new(FORMAT, &src, req.producer.clone(), notes(q8, absmax))?;
    let prov_json = serde_json::to_string(&prov).expect("provenance serializes");
    let file_type = if q8 > 0 {
        keys::FILE_TYPE_Q8_0
    } else {
        keys::FILE_TYPE_F16
    };
    let mut text_kv = keys::text(&cfg, &name, file_type);
    let sampling = keys::sampling(&generation_config(&src)?);
    text_kv.extend(sampling.clone());
    text_kv.extend(tokenizer_keys(&src, cfg.text.vocab_size)?);
    text_kv.push(("q3vl.provenance".into(), Value::Str(prov_json.clone())));
    let (mean, std) = image_stats(&src)?;
    let mut mm_kv = keys::mmproj(&cfg, &name, mean, std);
    mm_kv.extend(sampling);
    mm_kv.push(("q3vl.provenance".into(), Value::Str(prov_json)));

    let out = output::begin(&req.out, FORMAT, req.force, &src.bundles)?;
    let total: u64 = text.iter().chain(&mmproj).map(|t| t.info.bytes()).sum();
    progress.begin("exporting", total);
    let mut files = BTreeMap::new();
    for (file, kv, tensors) in [
        (&model_file, &text_kv, &text),
        (&mmproj_file, &mm_kv, &mmproj),
    ] {
        let entry = write_file(&src, &out.dir.join(file), kv, tensors, progress, cancel)?;
        files.insert(file.clone(), entry);
    }
    progress.end();
    let mut prov = prov;
    prov.files = files.clone();
    let prov_value = serde_json::to_value(&prov).expect("provenance serializes");
    let prov_entry = crate::small_files::write_json(&out.dir, PROVENANCE_FILE, &prov_value)?;
    crate::check_cancel(cancel)?;
    let path = out.install()?;
    Ok(Summary {
        path,
        model: model_file,
        mmproj: mmproj_file,
        q8_0_tensors: q8,
        bytes: files.values().map(|f| f.size).sum::<u64>() + prov_entry.size,
        verified: src.verification.is_some(),
        seconds: t0.elapsed().as_secs_f64(),
        peak_rss_bytes: q3vl_host::peak_rss_bytes(),
    })
}

/// The model's name for the file names and `general.name`: the HF id's last part, or
/// the source folder's name.
fn model_name(src: &ExportSource) -> String {
    let s = &src.bundles.language.metadata().source;
    let raw = s
        .hf_id
        .as_deref()
        .and_then(|id| id.rsplit('/').next())
        .unwrap_or(&s.folder);
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "model".into()
    } else {
        clean
    }
}

fn notes(q8: usize, absmax_head: bool) -> Vec<String> {
    let mut notes = vec![format!(
        "{q8} tensors are Q8_0 blocks made of the bundle's int8 values and f16 scales, \
         interleaved: not re-quantized"
    )];
    if absmax_head {
        notes.push(
            "output.weight is the int8 head (int8-block32-absmax) with its values -128..127; \
             llama.cpp's own quantizer never writes -128, its Q8_0 kernels take it"
                .into(),
        );
    }
    notes
}

/// The tokenizer keys from the language bundle's tokenizer files and config.
fn tokenizer_keys(src: &ExportSource, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let dir = src.bundles.language.dir();
    let json = |rel: &str| crate::small_files::read_json(&dir.join(rel));
    let tok = json(&format!("{TOKENIZER_DIR}/tokenizer.json"))?;
    let tok_cfg = json(&format!("{TOKENIZER_DIR}/tokenizer_config.json"))?;
    let cfg = json("config.json")?;
    tokenizer::keys(&tok, &tok_cfg, &cfg, vocab_size).map_err(|msg| ExportError::Unsupported {
        path: dir.join(TOKENIZER_DIR),
        msg,
    })
}

/// The language bundle's `generation_config.json` (listed in its metadata), or `{}`.
fn generation_config(src: &ExportSource) -> Result<serde_json::Value> {
    let rel = format!("{TOKENIZER_DIR}/generation_config.json");
    let lang = &src.bundles.language;
    match lang.metadata().files.contains_key(&rel) {
        true => crate::small_files::read_json(&lang.dir().join(rel)),
        false => Ok(serde_json::json!({})),
    }
}

/// The image normalization the vision bundle records.
fn image_stats(src: &ExportSource) -> Result<([f32; 3], [f32; 3])> {
    let v = &src.bundles.vision;
    let p = v
        .metadata()
        .preprocessing
        .as_ref()
        .ok_or_else(|| ExportError::Unsupported {
            path: v.dir().to_path_buf(),
            msg: "metadata.json has no preprocessing (image mean and std)".into(),
        })?;
    Ok((p.image_mean, p.image_std))
}

/// Writes one GGUF file: its keys, its tensors' infos, then their data in order.
fn write_file(
    src: &ExportSource,
    path: &Path,
    kv: &[(String, Value)],
    tensors: &[GgufTensor],
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<FileEntry> {
    let infos = tensors.iter().map(|t| t.info.clone()).collect();
    let mut w = GgufWriter::create(path, kv, infos).map_err(|e| weights::write_error(path, e))?;
    for t in tensors {
        weights::emit(src, t, &mut |bytes| {
            crate::check_cancel(cancel)?;
            progress.advance(bytes.len() as u64);
            w.write(&t.info.name, bytes)
                .map_err(|e| weights::write_error(path, e))
        })?;
    }
    let (size, sha256) = w.finish().map_err(|e| weights::write_error(path, e))?;
    Ok(FileEntry { sha256, size })
}
