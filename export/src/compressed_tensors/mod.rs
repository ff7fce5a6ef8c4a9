//! `q3vl export compressed-tensors`: a verified bundle pair as a Hugging Face checkpoint
//! in the compressed-tensors `pack-quantized` format, which HF transformers and vLLM
//! load (`docs/export.md`).
//!
//! The folder holds `config.json` (the source's, with a `quantization_config`),
//! `model.safetensors` (or shards and an index), the tokenizer, chat template,
//! generation and preprocessor configs, and `q3vl_export.json` (provenance: the source checkpoint,
//! both bundles by digest, the verification's results, the sha256 of every other file).
//! Streaming with bounded memory; the same bundles always give the same bytes.

pub mod config;
mod files;
pub mod pack;
pub mod plan;
mod weights;

use crate::error::Result;
use crate::output;
use crate::source::{self, Provenance, PROVENANCE_FILE};
use crate::Request;
use plan::ExportPlan;
use q3vl_bundle::{Bundle, ShardPolicy};
use q3vl_convert::cancel::Cancel;
use q3vl_convert::progress::Progress;
use q3vl_model::layout::LM_HEAD;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// The export format's name, as `q3vl_export.json` and `--force` know it.
pub const FORMAT: &str = "compressed-tensors";

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The export folder.
    pub path: PathBuf,
    /// Always [`FORMAT`].
    pub format: &'static str,
    /// Linear modules stored `pack-quantized`.
    pub compressed_modules: usize,
    /// Linear modules left dense (the `ignore` list).
    pub dense_linears: usize,
    /// Tensors in the safetensors files.
    pub tensors: usize,
    /// Bytes of every file written.
    pub bytes: u64,
    /// Whether the pair carried a valid verification stamp.
    pub verified: bool,
    /// Where the export is not a byte-for-byte repack, and why.
    pub notes: Vec<String>,
    /// Wall time.
    pub seconds: f64,
    /// Peak resident set (VmHWM).
    pub peak_rss_bytes: Option<u64>,
}

/// Exports the pair in `req.bundle` to `req.out`, in safetensors files of at most about
/// `shard` bytes each.
pub fn export(
    req: &Request,
    shard: ShardPolicy,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<Summary> {
    let t0 = Instant::now();
    let src = source::open(&req.bundle, req.allow_unverified)?;
    let plan = plan::build(&src.bundles)?;
    let untie = unties_head(&src.bundles.language);
    let notes = notes(&plan, untie);
    let out = output::begin(&req.out, FORMAT, req.force, &src.bundles)?;
    let mut files = files::write_small_files(&src, &plan, untie, &out.dir)?;
    for f in weights::write_weights(&src, &plan, &out.dir, shard, progress, cancel)? {
        files.insert(f.file, f.entry);
    }
    let mut prov = Provenance::new(FORMAT, &src, req.producer.clone(), notes.clone())?;
    prov.files = files.clone();
    let prov_bytes = crate::small_files::write_json(
        &out.dir,
        PROVENANCE_FILE,
        &serde_json::to_value(&prov).expect("provenance serializes"),
    )?;
    crate::check_cancel(cancel)?;
    let path = out.install()?;
    Ok(Summary {
        path,
        format: FORMAT,
        compressed_modules: plan.compressed.len(),
        dense_linears: plan.ignore.len(),
        tensors: plan.tensors.len(),
        bytes: files.values().map(|f| f.size).sum::<u64>() + prov_bytes.size,
        verified: src.verification.is_some(),
        notes,
        seconds: t0.elapsed().as_secs_f64(),
        peak_rss_bytes: q3vl_host::peak_rss_bytes(),
    })
}

/// The bundle stores its own head although the source tied it (the `int8hu` head is
/// quantized from a copy of the embedding): the export must not tie it back.
fn unties_head(lang: &Bundle) -> bool {
    lang.metadata()
        .head
        .as_ref()
        .is_some_and(|h| h.tied_in_source && h.tensor == LM_HEAD)
}

/// Where the export is not a byte-for-byte repack of the bundles.
fn notes(plan: &ExportPlan, untie: bool) -> Vec<String> {
    let mut notes = vec![format!(
        "dtype {}: the loader casts weight_scale to the model dtype; float16 keeps the \
         bundle's f16 scales exact and rounds each dequantized weight q*s once to f16, \
         float32 keeps q*s exact, bfloat16 rounds the scales to 8 bits",
        config::MODEL_DTYPE
    )];
    if plan.head_dequantized {
        notes.push(format!(
            "{LM_HEAD}: the bundle's int8 head (values -128..127, one f16 scale per 32) is \
             stored dense f32 as q*s, exactly: vLLM applies compressed-tensors to linear \
             layers only, not to its LM head"
        ));
    }
    if untie {
        notes.push(
            "tie_word_embeddings is false: the bundle stores its own int8 head, quantized \
             from the tied embedding, which stays f16"
                .into(),
        );
    }
    notes
}
