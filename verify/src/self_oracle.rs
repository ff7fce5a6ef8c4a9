//! Oracle traces written by q3vl's own fp32 reference (`q3vl_model::reference`), for
//! checking a model on any prompt without Python: `verify --src CKPT --prompt P`.
//!
//! The reference matches HF at every layer on the committed fixtures (the fp32
//! ladder), so a trace it writes stands in for `oracle/trace.py`'s. The layout is
//! `docs/oracle-trace.md`'s, format 2: format 1's tensors plus `logits.lse` and
//! `decode.lse` (the log-sum-exp over the whole vocabulary of every row, in f64),
//! with `oracle` = `q3vl-reference` and `oracle_mode` = `whole`.

use crate::error::{Result, VerifyError};
use candle_core::Tensor;
use q3vl_model::image::{self, Resize};
use q3vl_model::prompt::PromptBuilder;
use q3vl_model::reference::{self, Continuation, ImageInput};
use q3vl_model::{taps, PreprocessorConfig, Qwen3VlConfig, WeightSource};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The format tag the traces carry.
pub const FORMAT: &str = "qwen3vl-oracle-trace/2";
/// Top-k width of `logits.top_*` and `decode.top_*`.
pub const TOP_K: usize = 64;
/// Greedy decode steps recorded (eos does not stop them).
pub const DECODE_STEPS: usize = 24;

/// What one trace records.
#[derive(Debug, Clone)]
pub struct TraceRequest<'a> {
    /// The user text.
    pub prompt: &'a str,
    /// An image (PNG or JPEG), copied beside the trace; None for a text-only trace.
    pub image: Option<&'a Path>,
    /// Also store the full `logits` `[T, V]` and `decode.logits` `[D, V]`.
    pub full_logits: bool,
}

/// One tensor to store: name, dtype, shape, little-endian bytes.
type Stored = (String, Dtype, Vec<usize>, Vec<u8>);

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

fn i64s(name: &str, shape: Vec<usize>, v: &[i64]) -> Stored {
    let b = le_bytes(v, i64::to_le_bytes);
    (name.into(), Dtype::I64, shape, b)
}

fn f32s(name: &str, shape: Vec<usize>, v: &[f32]) -> Stored {
    let b = le_bytes(v, f32::to_le_bytes);
    (name.into(), Dtype::F32, shape, b)
}

fn f64s(name: &str, shape: Vec<usize>, v: &[f64]) -> Stored {
    let b = le_bytes(v, f64::to_le_bytes);
    (name.into(), Dtype::F64, shape, b)
}

/// A reference tensor stored under its own shape.
fn tensor(name: &str, t: &Tensor) -> Result<Stored> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(f32s(name, t.dims().to_vec(), &v))
}

/// The `k` best (id, logit) of a row, best first; equal logits in id order.
pub fn top_k(row: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut ids: Vec<usize> = (0..row.len()).collect();
    let better = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
    let k = k.min(row.len());
    if k < row.len() {
        ids.select_nth_unstable_by(k, better);
        ids.truncate(k);
    }
    ids.sort_by(better);
    ids.into_iter().map(|i| (i, row[i])).collect()
}

/// log Σ exp(x) over the whole row, in f64.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
}

/// `{group}.top_ids`, `{group}.top_values` and `{group}.lse` of a `[R, V]` logits tensor
/// (plus `{full}` itself, when asked).
fn logits_group(group: &str, logits: &Tensor, full: Option<&str>) -> Result<Vec<Stored>> {
    let (r, v) = logits.dims2()?;
    let flat = logits.flatten_all()?.to_vec1::<f32>()?;
    let k = TOP_K.min(v);
    let (mut ids, mut vals, mut lse) = (Vec::new(), Vec::new(), Vec::new());
    for row in flat.chunks_exact(v) {
        for (i, x) in top_k(row, k) {
            ids.push(i as i64);
            vals.push(x);
        }
        lse.push(log_sum_exp(row));
    }
    let mut out = vec![
        i64s(&format!("{group}.top_ids"), vec![r, k], &ids),
        f32s(&format!("{group}.top_values"), vec![r, k], &vals),
        f64s(&format!("{group}.lse"), vec![r], &lse),
    ];
    if let Some(name) = full {
        out.push(f32s(name, vec![r, v], &flat));
    }
    Ok(out)
}

/// The prompt's ids and M-RoPE positions (`[3, T]`: the t row, then h, then w).
fn input_tensors(ids: &[u32], positions: &[[i64; 3]]) -> Vec<Stored> {
    let t = ids.len();
    let ids: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let pos: Vec<i64> = (0..3)
        .flat_map(|axis| positions.iter().map(move |p| p[axis]))
        .collect();
    vec![
        i64s("input_ids", vec![t], &ids),
        i64s("position_ids", vec![3, t], &pos),
    ]
}

/// The stage taps the format names (vision ones only when an image ran).
fn tap_names(cfg: &Qwen3VlConfig, with_image: bool) -> Vec<String> {
    let mut names = Vec::new();
    if with_image {
        names.push(taps::VISION_EMBED.to_string());
        names.extend((0..cfg.vision.depth).map(taps::vision_block));
        names.push(taps::VISION_MERGER.to_string());
        names.extend((0..cfg.vision.deepstack_visual_indexes.len()).map(taps::vision_deepstack));
    }
    names.push(taps::TEXT_EMBED.to_string());
    names.extend((0..cfg.text.num_hidden_layers).map(taps::text_layer));
    names.push(taps::TEXT_NORM.to_string());
    names
}

/// Runs the fp32 reference on `req`, its weights read from `weights` (the checkpoint
/// itself, or a bundle pair's [`crate::BundleSource`]), its config, tokenizer and
/// preprocessor from checkpoint folder `ckpt`, and writes the trace to `trace` (the
/// image, if any, copied into the same folder). Nothing is written unless the run
/// succeeds. Returns `trace`.
pub fn write_trace(
    ckpt: &Path,
    weights: &dyn WeightSource,
    trace: &Path,
    req: &TraceRequest<'_>,
) -> Result<PathBuf> {
    let cfg = Qwen3VlConfig::from_dir(ckpt)?;
    let pb = PromptBuilder::from_dir(ckpt, &cfg)?;
    let pre = PreprocessorConfig::from_dir(ckpt)?;
    let patched = match req.image {
        Some(p) => Some(image::preprocess(
            &image::load_rgb(p)?,
            &pre,
            Resize::Dynamic,
        )?),
        None => None,
    };
    let pv = patched.as_ref().map(|p| p.to_tensor()).transpose()?;
    let grid = patched.as_ref().map(|p| p.grid_thw);
    let prompt = pb.chat(req.prompt, grid)?;
    let img: Vec<ImageInput> = pv
        .iter()
        .zip(grid)
        .map(|(t, g)| ImageInput {
            pixel_values: t,
            grid_thw: g,
        })
        .collect();
    let steps = [Continuation::Greedy(DECODE_STEPS)];
    let run = reference::run(&cfg, weights, &prompt, &img, &steps, true)?;

    let mut stored = input_tensors(&prompt.ids, &prompt.positions);
    if let (Some(t), Some(g)) = (&pv, grid) {
        stored.push(tensor("pixel_values", t)?);
        let g: Vec<i64> = g.iter().map(|&x| x as i64).collect();
        stored.push(i64s("image_grid_thw", vec![1, 3], &g));
    }
    for name in tap_names(&cfg, pv.is_some()) {
        let t = run.taps.get(&name).ok_or_else(|| VerifyError::Trace {
            path: trace.to_path_buf(),
            msg: format!("the reference recorded no {name}"),
        })?;
        stored.push(tensor(&name, t)?);
    }
    let full = |n: &'static str| req.full_logits.then_some(n);
    stored.extend(logits_group(
        "logits",
        &run.taps[taps::LOGITS],
        full("logits"),
    )?);
    let cont = &run.continuations[0];
    let tokens: Vec<i64> = cont.tokens.iter().map(|&x| x as i64).collect();
    stored.push(i64s("decode.tokens", vec![tokens.len()], &tokens));
    if let Some(decode) = cont.logits.as_ref() {
        stored.extend(logits_group("decode", decode, full("decode.logits"))?);
    }
    let folder = trace.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(folder).map_err(|e| io(folder, e))?;
    let meta = metadata(ckpt, req, folder)?;
    save(trace, &stored, meta)?;
    Ok(trace.to_path_buf())
}

fn io(path: &Path, source: std::io::Error) -> VerifyError {
    VerifyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The trace's `__metadata__`; copies the image beside the trace.
fn metadata(ckpt: &Path, req: &TraceRequest<'_>, folder: &Path) -> Result<HashMap<String, String>> {
    use sha2::{Digest, Sha256};
    let (image, image_sha256) = match req.image {
        Some(p) => {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let bytes = q3vl_model::input::read_regular(p).map_err(|e| io(p, e))?;
            let to = folder.join(&name);
            if std::fs::canonicalize(p).ok() != std::fs::canonicalize(&to).ok() {
                std::fs::write(&to, &bytes).map_err(|e| io(&to, e))?;
            }
            (name, hex::encode(Sha256::digest(&bytes)))
        }
        None => (String::new(), String::new()),
    };
    let model = std::fs::canonicalize(ckpt).unwrap_or_else(|_| ckpt.to_path_buf());
    let model = model
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    Ok([
        ("format", FORMAT.to_string()),
        ("model", model),
        ("revision", String::new()),
        ("transformers", String::new()),
        ("torch", String::new()),
        ("dtype", "float32".into()),
        ("attn", "eager".into()),
        ("prompt", req.prompt.to_string()),
        ("image", image),
        ("image_sha256", image_sha256),
        ("decode_steps", DECODE_STEPS.to_string()),
        ("oracle", "q3vl-reference".into()),
        ("oracle_mode", "whole".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect())
}

/// Writes the safetensors file through a temporary name, so a reader never sees half.
fn save(path: &Path, stored: &[Stored], meta: HashMap<String, String>) -> Result<()> {
    let views = stored
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>();
    let bad = |e: safetensors::SafeTensorError| VerifyError::Trace {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views.map_err(bad)?, Some(meta), &tmp).map_err(bad)?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}
