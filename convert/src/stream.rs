//! Converting one tensor, chunk by chunk: read rows from the memory-mapped source,
//! widen, check, quantize or narrow on all cores, hand the bytes to the streaming
//! writer, and drop the source pages from the resident set.
//!
//! At most one chunk of source rows (a few MiB) is converted at a time, plus the
//! writer's few chunks in flight and one tensor's scales, so memory stays flat
//! whatever the tensor size (the 8B embedding is 1.2 GB).

use crate::cancel::Cancel;
use crate::error::{ConvertError, Result};
use crate::half_store::narrow_into;
use crate::plan::OutTensor;
use crate::progress::Progress;
use crate::quantize::{quantize_row, QuantKind, BLOCK};
use half::f16;
use q3vl_bundle::names::scales_name;
use q3vl_bundle::{Scheme, WeightsWriter};
use q3vl_model::weights::widen_into;
use q3vl_model::Checkpoint;
use rayon::prelude::*;

/// Source values per chunk (8 MiB of bf16).
const CHUNK_ELEMS: usize = 4 << 20;
/// Values per parallel task when narrowing to f16.
const TASK_ELEMS: usize = 64 << 10;

/// What converting a tensor found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TensorStats {
    /// Nonzero values that became subnormal or zero in f16.
    pub f16_underflow: u64,
    /// Blocks with a nonzero maximum whose scale flushed to zero.
    pub scale_underflow: u64,
}

/// Problems found in one parallel task; the lowest index wins, so the error is the
/// same whatever the thread count.
#[derive(Debug, Clone, Copy, Default)]
struct Found {
    nonfinite: Option<(usize, f32)>,
    overflow: Option<(usize, f32)>,
    scale_overflow: Option<(usize, usize)>,
    underflow: u64,
}

impl Found {
    fn merge(a: Found, b: Found) -> Found {
        fn first<T: Copy>(x: Option<(usize, T)>, y: Option<(usize, T)>) -> Option<(usize, T)> {
            match (x, y) {
                (Some(p), Some(q)) => Some(if q.0 < p.0 { q } else { p }),
                (p, q) => p.or(q),
            }
        }
        Found {
            nonfinite: first(a.nonfinite, b.nonfinite),
            overflow: first(a.overflow, b.overflow),
            scale_overflow: first(a.scale_overflow, b.scale_overflow),
            underflow: a.underflow + b.underflow,
        }
    }
}

fn first_nonfinite(v: &[f32], base: usize) -> Option<(usize, f32)> {
    v.iter()
        .position(|x| !x.is_finite())
        .map(|i| (base + i, v[i]))
}

/// Converts tensor `t` from `ck` into `w`, polling `cancel` between chunks.
pub fn stream_tensor(
    ck: &Checkpoint,
    t: &OutTensor,
    w: &mut WeightsWriter,
    cancel: &Cancel,
    progress: &dyn Progress,
) -> Result<TensorStats> {
    let (info, bytes) = ck.bytes(&t.source)?;
    let dtype = info.dtype;
    let es = dtype.bitsize() / 8;
    let (rows, cols) = t.rows_cols();
    let row_bytes = cols * es;
    let chunk_rows = (CHUNK_ELEMS / cols.max(1)).max(1);
    // The source check allows only float dtypes; this turns any other into an error.
    widen_into(&t.source, dtype, &[], &mut [])?;
    let mut stats = TensorStats::default();
    let mut r0 = 0;
    while r0 < rows {
        cancel.check()?;
        let r1 = (r0 + chunk_rows).min(rows);
        let range = r0 * row_bytes..r1 * row_bytes;
        let next = r1 * row_bytes..(r1 + chunk_rows).min(rows) * row_bytes;
        ck.prefetch(&t.source, next);
        let src = &bytes[range.clone()];
        let base = r0 * cols;
        match t.scheme {
            Scheme::Int8Clip | Scheme::Int8AbsMax => {
                let kind = QuantKind::of(t.scheme).expect("int8 scheme");
                let nb = cols / BLOCK;
                let mut q = vec![0i8; src.len() / es];
                let mut s = vec![f16::ZERO; (r1 - r0) * nb];
                let found = q
                    .par_chunks_mut(cols)
                    .zip(s.par_chunks_mut(nb))
                    .zip(src.par_chunks(row_bytes))
                    .enumerate()
                    .map_init(
                        || vec![0f32; cols],
                        |buf, (i, ((qrow, srow), srcrow))| {
                            let mut f = Found::default();
                            if widen_into(&t.source, dtype, srcrow, buf).is_err() {
                                return f;
                            }
                            f.nonfinite = first_nonfinite(buf, base + i * cols);
                            if f.nonfinite.is_none() {
                                let rep = quantize_row(buf, kind, qrow, srow);
                                f.underflow = rep.zero_scale_blocks as u64;
                                f.scale_overflow = rep.scale_overflow.map(|b| (r0 + i, b));
                            }
                            f
                        },
                    )
                    .reduce(Found::default, Found::merge);
                report(t, &found)?;
                stats.scale_underflow += found.underflow;
                w.write(&t.name, i8_bytes(q))?;
                w.write(
                    &scales_name(&t.name),
                    s.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )?;
            }
            Scheme::F16 => {
                let n = src.len() / es;
                let mut out = vec![0u8; n * 2];
                let found = out
                    .par_chunks_mut(TASK_ELEMS * 2)
                    .zip(src.par_chunks(TASK_ELEMS * es))
                    .enumerate()
                    .map_init(
                        || vec![0f32; TASK_ELEMS],
                        |buf, (i, (o, sb))| {
                            let mut f = Found::default();
                            let vals = &mut buf[..sb.len() / es];
                            if widen_into(&t.source, dtype, sb, vals).is_err() {
                                return f;
                            }
                            let at = base + i * TASK_ELEMS;
                            f.nonfinite = first_nonfinite(vals, at);
                            let rep = narrow_into(vals, o);
                            f.underflow = rep.underflow;
                            f.overflow = rep.overflow.map(|j| (at + j, vals[j]));
                            f
                        },
                    )
                    .reduce(Found::default, Found::merge);
                report(t, &found)?;
                stats.f16_underflow += found.underflow;
                w.write(&t.name, out)?;
            }
            Scheme::F32 => {
                let mut vals = vec![0f32; src.len() / es];
                widen_into(&t.source, dtype, src, &mut vals)?;
                let found = Found {
                    nonfinite: first_nonfinite(&vals, base),
                    ..Found::default()
                };
                report(t, &found)?;
                w.write(&t.name, vals.iter().flat_map(|x| x.to_le_bytes()).collect())?;
            }
        }
        ck.release(&t.source, range.clone());
        progress.advance(range.len() as u64);
        r0 = r1;
    }
    Ok(stats)
}

/// Turns the first problem of a chunk into an error naming the tensor.
fn report(t: &OutTensor, f: &Found) -> Result<()> {
    if let Some((index, value)) = f.nonfinite {
        return Err(q3vl_model::Error::NonFinite {
            name: t.source.clone(),
            index,
            value,
        }
        .into());
    }
    if let Some((index, value)) = f.overflow {
        return Err(ConvertError::F16Overflow {
            name: t.source.clone(),
            index,
            value,
        });
    }
    if let Some((row, block)) = f.scale_overflow {
        return Err(ConvertError::ScaleOverflow {
            name: t.source.clone(),
            row,
            block,
        });
    }
    Ok(())
}

/// The bytes of an int8 buffer, without copying.
fn i8_bytes(v: Vec<i8>) -> Vec<u8> {
    let mut v = std::mem::ManuallyDrop::new(v);
    let (ptr, len, cap) = (v.as_mut_ptr(), v.len(), v.capacity());
    // SAFETY: i8 and u8 have the same size and alignment, every bit pattern is valid
    // for both, and the original vector is not dropped.
    unsafe { Vec::from_raw_parts(ptr as *mut u8, len, cap) }
}
