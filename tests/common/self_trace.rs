//! Oracle traces written by q3vl's own fp32 reference (`q3vl_verify::self_oracle`), for
//! checkpoints made at test time where Python and Hugging Face are not available.

use q3vl_model::Checkpoint;
use std::path::{Path, PathBuf};

pub use q3vl_verify::self_oracle::TraceRequest;

/// Runs the fp32 reference of checkpoint `ckpt` on `req` and writes its trace to
/// `trace` (the image, if any, is copied into the same folder). Returns `trace`.
pub fn write(ckpt: &Path, trace: &Path, req: &TraceRequest<'_>) -> PathBuf {
    let weights = Checkpoint::open(ckpt).unwrap();
    q3vl_verify::self_oracle::write_trace(ckpt, &weights, trace, req).unwrap()
}

/// q3vl's fp32 reference on the bundle pair in `out` (converted from checkpoint `ckpt`),
/// for the prompts (and images) of the oracle traces `names` in folder `oracle`, with full
/// logits: a trace per name in `dir`, which a runtime given the bundles' weights in another
/// format must reproduce.
pub fn write_on_bundles(
    ckpt: &Path,
    oracle: &Path,
    out: &Path,
    dir: &Path,
    names: &[&str],
) -> Vec<PathBuf> {
    let pair = q3vl_bundle::Bundles::open(out).unwrap();
    let weights = q3vl_verify::BundleSource::new(&pair);
    names
        .iter()
        .map(|name| {
            let src = q3vl_verify::OracleTrace::open(&oracle.join(format!("{name}.safetensors")));
            let src = src.unwrap();
            let image = Some(src.meta("image"))
                .filter(|i| !i.is_empty())
                .map(|i| oracle.join(i));
            let req = TraceRequest {
                prompt: src.meta("prompt"),
                image: image.as_deref(),
                full_logits: true,
            };
            let trace = dir.join(format!("{name}.safetensors"));
            q3vl_verify::self_oracle::write_trace(ckpt, &weights, &trace, &req).unwrap()
        })
        .collect()
}
