//! Streaming the export's tensors into safetensors files, in the writer's order, each
//! from its origin in the bundles ([`super::plan::Origin`]), with bounded memory.

use super::pack;
use super::plan::{ExportPlan, ExportTensor, Origin, Which};
use crate::error::{ExportError, Result};
use crate::source::ExportSource;
use q3vl_bundle::names::scales_name;
use q3vl_bundle::{Bundle, ShardPolicy, TensorPlan, WeightsWriter};
use q3vl_convert::cancel::Cancel;
use q3vl_convert::progress::Progress;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Bytes handed to the writer at a time.
const CHUNK: usize = 8 << 20;

/// Streams every planned tensor into safetensors files in `dir`, in the writer's order.
pub fn write_weights(
    src: &ExportSource,
    plan: &ExportPlan,
    dir: &Path,
    shard: ShardPolicy,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<Vec<q3vl_bundle::WrittenFile>> {
    let plans: Vec<TensorPlan> = plan.tensors.iter().map(|t| t.plan.clone()).collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut w = WeightsWriter::create(dir, &plans, shard, &meta)?;
    let by_name: HashMap<&str, &ExportTensor> = plan
        .tensors
        .iter()
        .map(|t| (t.plan.name.as_str(), t))
        .collect();
    progress.begin("exporting", plans.iter().map(TensorPlan::bytes).sum());
    let order: Vec<String> = w.order().into_iter().map(str::to_owned).collect();
    for name in &order {
        let t = by_name[name.as_str()];
        emit(src, t, &mut |bytes| {
            crate::check_cancel(cancel)?;
            progress.advance(bytes.len() as u64);
            Ok(w.write(name, bytes)?)
        })?;
    }
    let files = w.finish()?;
    progress.end();
    Ok(files)
}

/// Produces tensor `t`'s bytes in pieces of about [`CHUNK`], in row-major order. Each
/// piece's mapped source pages are let go once read, so the resident set stays near one
/// piece however large the tensor (the 8B's embedding table is 1.2 GB).
fn emit(
    src: &ExportSource,
    t: &ExportTensor,
    sink: &mut dyn FnMut(Vec<u8>) -> Result<()>,
) -> Result<()> {
    let (lang, vision) = (&src.bundles.language, &src.bundles.vision);
    match &t.origin {
        Origin::Packed(n) => {
            let (q, _, _) = q8(lang, n)?;
            for (i, c) in q.chunks(CHUNK).enumerate() {
                sink(pack::pack_q8(c))?;
                release(lang, n, i * CHUNK, c.len());
            }
        }
        Origin::Scale(n) => {
            let (_, s, _) = q8(lang, n)?;
            let per = CHUNK / 4;
            for (i, c) in s.chunks(per).enumerate() {
                sink(c.iter().flat_map(|x| x.to_f32().to_le_bytes()).collect())?;
                release(lang, &scales_name(n), i * per * 2, c.len() * 2);
            }
        }
        Origin::Shape(s) => sink(s.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect())?,
        Origin::Stored(Which::Language, n) => stored(lang, n, sink)?,
        Origin::Stored(Which::Vision, n) => stored(vision, n, sink)?,
        Origin::Dequantized(n) => {
            let (q, s, [_, cols]) = q8(lang, n)?;
            let per = (CHUNK / 4 / cols).max(1) * cols;
            let nb = cols / q3vl_bundle::BLOCK;
            for (i, (qc, sc)) in q.chunks(per).zip(s.chunks(per / cols * nb)).enumerate() {
                sink(dequantize_bytes(qc, sc))?;
                release(lang, n, i * per, qc.len());
            }
            lang.release(n);
        }
    }
    Ok(())
}

/// Drops bytes `at .. at + len` of stored tensor `name` from the resident set.
fn release(b: &Bundle, name: &str, at: usize, len: usize) {
    b.checkpoint().release(name, at..at + len);
}

/// The f32 little-endian bytes of `q · s`, one f16 scale per 32 values.
fn dequantize_bytes(q: &[i8], s: &[half::f16]) -> Vec<u8> {
    q.chunks(q3vl_bundle::BLOCK)
        .zip(s)
        .flat_map(|(blk, sc)| {
            let sf = sc.to_f32();
            blk.iter().flat_map(move |&v| (v as f32 * sf).to_le_bytes())
        })
        .collect()
}

/// An int8 weight the plan found (so its absence now is a bundle changed under us).
fn q8<'a>(b: &'a Bundle, name: &str) -> Result<(&'a [i8], &'a [half::f16], [usize; 2])> {
    b.q8(name).ok_or_else(|| ExportError::Unsupported {
        path: b.dir().to_path_buf(),
        msg: format!("tensor {name}: is not an int8 weight with f16 scales"),
    })
}

/// A stored tensor's bytes as they are, in pieces.
fn stored(b: &Bundle, name: &str, sink: &mut dyn FnMut(Vec<u8>) -> Result<()>) -> Result<()> {
    let (_, _, bytes) = b.raw(name)?;
    for (i, c) in bytes.chunks(CHUNK).enumerate() {
        sink(c.to_vec())?;
        release(b, name, i * CHUNK, c.len());
    }
    Ok(())
}
